// Test helper: runs a real nbdkit on a private unix socket (or loopback TCP) and always stops it.

import { spawn } from 'node:child_process';
import { existsSync, watch } from 'node:fs';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { freeLoopbackPort, stopChild } from '../../shared/runtime/processes.ts';

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

  const watcher = watch(dir);
  const child = spawn(NBDKIT, argv, { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr?.setEncoding('utf8').on('data', (s: string) => {
    stderr += s;
  });
  const exited = new Promise<void>((resolve) => {
    child.once('exit', () => resolve());
    child.once('error', () => resolve());
  });

  try {
    await new Promise<void>((resolve, reject) => {
      const check = () => {
        readFile(pidFile, 'utf8').then(
          (text) => {
            if (text.endsWith('\n')) resolve();
          },
          () => undefined,
        );
      };
      watcher.on('change', check);
      child.once('error', reject);
      child.once('exit', (code, signal) => {
        reject(
          new Error(`nbdkit ${argv.join(' ')} exited (${code ?? signal}) before it was ready: ${stderr}`),
        );
      });
      // The pid file may have appeared before the watcher saw anything.
      check();
    });
  } catch (err) {
    await stopChild(child, exited, KILL_AFTER_MS);
    await rm(dir, { recursive: true, force: true });
    throw err;
  } finally {
    watcher.close();
  }

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
