// Test helper: runs a real nbdkit on a private unix socket (or loopback TCP) and always stops it.

import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  freeLoopbackPort,
  type StartedServer,
  startWhenReady,
  stopChild,
} from '../../shared/runtime/processes.ts';

// Debian installs nbdkit in /usr/sbin on some releases and /usr/bin on others; /usr/sbin is not always on PATH.
const NBDKIT = existsSync('/usr/sbin/nbdkit') ? '/usr/sbin/nbdkit' : 'nbdkit';

export interface NbdkitOptions {
  plugin: string;
  /** Plugin arguments, e.g. ['size=64M'] or [path]; filter parameters go here too. */
  args?: string[];
  filters?: string[];
  /** Unix socket path (default: a fresh one in a temp dir), or false to listen on 127.0.0.1 TCP. */
  socket?: string | false;
  /** Extra nbdkit options before the plugin name, e.g. ['--no-sr']. */
  options?: string[];
}

export interface Nbdkit {
  /** nbd+unix:///?socket=... or nbd://127.0.0.1:PORT/ */
  readonly uri: string;
  readonly socket: string | undefined;
  /** Stops the server (SIGTERM) and waits for it to exit. Safe to call twice. */
  stop(): Promise<void>;
}

export async function startNbdkit(opts: NbdkitOptions): Promise<Nbdkit> {
  const dir = await mkdtemp(join(tmpdir(), 'ferry-nbdkit-'));
  const pidFile = join(dir, 'nbdkit.pid');
  let uri: string;
  let listen: string[];
  let socket: string | undefined;
  if (opts.socket === false) {
    const port = await freeLoopbackPort();
    uri = `nbd://127.0.0.1:${port}/`;
    listen = ['-i', '127.0.0.1', '-p', String(port)];
  } else {
    socket = opts.socket ?? join(dir, 'nbd.sock');
    uri = `nbd+unix:///?socket=${socket}`;
    listen = ['-U', socket];
  }
  const argv = [
    '-f',
    // If the test process dies, nbdkit goes with it: no leaked servers.
    '--exit-with-parent',
    // nbdkit writes the pid file once it accepts connections: that is the readiness signal.
    '-P',
    pidFile,
    ...listen,
    ...(opts.options ?? []),
    ...(opts.filters ?? []).map((f) => `--filter=${f}`),
    opts.plugin,
    ...(opts.args ?? []),
  ];

  let started: StartedServer;
  try {
    started = await startWhenReady(NBDKIT, argv, { pidFile, graceMs: KILL_AFTER_MS });
  } catch (err) {
    await rm(dir, { recursive: true, force: true });
    throw err;
  }
  const { child, exited } = started;

  let stopped: Promise<void> | undefined;
  return {
    uri,
    socket,
    stop: () => {
      // nbdkit leaves its socket file behind; remove it so the path can be served again.
      stopped ??= stopChild(child, exited, KILL_AFTER_MS).then(async () => {
        if (socket !== undefined) await rm(socket, { force: true });
        await rm(dir, { recursive: true, force: true });
      });
      return stopped;
    },
  };
}

/** nbdkit waits for connected clients before it exits on SIGTERM; a test that leaks one must not hang. */
const KILL_AFTER_MS = 10_000;
