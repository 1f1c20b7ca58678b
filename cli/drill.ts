// `ferry recover --test`: a recovery drill. The disks of a checkpoint, materialised and verified,
// are served read-only as NBD exports through nbdkit's copy-on-write filter (a test machine's
// writes land in a throwaway overlay), until a TTL or Ctrl-C; then every server is stopped and
// every file of the drill removed, and both are checked.

import { existsSync } from 'node:fs';
import { chmod, mkdir, rm, rmdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { ConfigError, errorMessage, FerryError } from '../shared/engine/errors.ts';
import {
  freeLoopbackPort,
  type StartedServer,
  startWhenReady,
  stopChild,
} from '../shared/runtime/processes.ts';
import type { RecoverResult } from './recover.ts';

// Debian installs nbdkit in /usr/sbin on some releases and /usr/bin on others; /usr/sbin is not
// always on PATH.
const NBDKIT = existsSync('/usr/sbin/nbdkit') ? '/usr/sbin/nbdkit' : 'nbdkit';
// nbdkit waits for connected clients before it exits on SIGTERM: a test machine still attached
// gets this long, then the server is killed, so a drill always ends.
const STOP_GRACE_MS = 10_000;
// A free port is picked, then handed to nbdkit: another process may take it in between. Rare,
// and a new port is tried this often before the drill gives up.
const PORT_ATTEMPTS = 3;
// The longest TTL: a drill is a test, not a second production copy, and a forgotten one must end.
const MAX_TTL_MS = 7 * 86_400_000;

export interface DrillExport {
  readonly disk: string;
  readonly uri: string;
  readonly pid: number;
}

export interface Drill {
  readonly exports: readonly DrillExport[];
  /** Stops every server and removes every file of the drill; resolves with what it checked. */
  stop(): Promise<DrillTeardown>;
  /** Resolves when a server exits on its own (the drill is then over), with its disk. */
  readonly lost: Promise<string>;
}

export interface DrillTeardown {
  readonly servers: number;
  readonly removed: readonly string[];
}

/** `--ttl` as typed: a number with s, m, h or d, e.g. "90s", "30m", "2h". */
export function parseTtl(text: string): number {
  const m = /^(\d+(?:\.\d+)?)(s|m|h|d)$/.exec(text.trim());
  const unit = { s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 } as const;
  const ms = m ? Number(m[1]) * unit[m[2] as keyof typeof unit] : Number.NaN;
  if (!(ms >= 1000 && ms <= MAX_TTL_MS)) {
    throw new ConfigError(
      `--ttl ${JSON.stringify(text)}: give how long the drill lasts, from 1s to 7d, e.g. 30m or 2h`,
      { setting: 'ttl' },
    );
  }
  return ms;
}

/**
 * Serves each recovered disk on 127.0.0.1 through `nbdkit --filter=cow file`: the filter opens
 * the image read-only and keeps writes in an overlay under the drill's own directory (nbdkit
 * unlinks it at once, so it goes with the server). The images are made read-only as well.
 */
export async function startDrill(recovered: RecoverResult, dir: string): Promise<Drill> {
  const overlay = join(dir, '.overlay');
  const servers: Server[] = [];
  const pidFile = (disk: string) => join(dir, `.${disk}.pid`);
  // Everything the drill leaves in `dir`: removed at its end, and checked to be gone.
  const files = [
    ...recovered.disks.map((d) => d.path),
    overlay,
    ...recovered.disks.map((d) => pidFile(d.disk)),
  ];
  const teardown = async (): Promise<DrillTeardown> => {
    await Promise.all(servers.map((s) => s.stop()));
    const alive = servers.filter((s) => isAlive(s.pid)).map((s) => `${s.disk} (pid ${s.pid})`);
    for (const path of files) await rm(path, { recursive: true, force: true });
    if (recovered.createdDir) await rmdir(dir).catch(() => {});
    const left = [];
    for (const path of files) if (await stat(path).catch(() => undefined)) left.push(path);
    if (alive.length > 0 || left.length > 0) {
      const what = [
        ...alive.map((a) => `the server of disk ${a} is still running`),
        ...left.map((p) => `${p} is still there`),
      ];
      throw new FerryError(`the drill did not end cleanly: ${what.join('; ')}`);
    }
    return { servers: servers.length, removed: recovered.createdDir ? [...files, dir] : files };
  };
  try {
    await mkdir(overlay, { recursive: true });
    for (const d of recovered.disks) {
      await chmod(d.path, 0o444);
      servers.push(await serve(d.disk, d.path, overlay, pidFile(d.disk)));
    }
  } catch (err) {
    await teardown().catch(() => {});
    throw err;
  }
  let stopping = false;
  const lost = new Promise<string>((resolve) => {
    for (const s of servers) {
      void s.exited.then(() => {
        if (!stopping) resolve(s.disk);
      });
    }
  });
  return {
    exports: servers.map((s) => ({ disk: s.disk, uri: s.uri, pid: s.pid })),
    lost,
    stop() {
      stopping = true;
      return teardown();
    },
  };
}

interface Server {
  readonly disk: string;
  readonly uri: string;
  readonly pid: number;
  readonly exited: Promise<void>;
  stop(): Promise<void>;
}

async function serve(disk: string, image: string, overlay: string, pidFile: string): Promise<Server> {
  let lastError: unknown;
  for (let attempt = 0; attempt < PORT_ATTEMPTS; attempt++) {
    const port = await freeLoopbackPort();
    try {
      return await start(disk, image, overlay, pidFile, port);
    } catch (err) {
      lastError = err;
      if (!/Address already in use/i.test(errorMessage(err))) break;
    }
  }
  throw lastError;
}

async function start(
  disk: string,
  image: string,
  overlay: string,
  pidFile: string,
  port: number,
): Promise<Server> {
  await rm(pidFile, { force: true });
  const argv = [
    '-f',
    // If ferry dies, its servers go with it: no export outlives the drill's owner.
    '--exit-with-parent',
    // nbdkit writes the pid file once it accepts connections: the readiness signal.
    '-P',
    pidFile,
    '-i',
    '127.0.0.1',
    '-p',
    String(port),
    '--filter=cow',
    'file',
    image,
  ];
  let started: StartedServer;
  try {
    started = await startWhenReady(NBDKIT, argv, {
      pidFile,
      env: { ...process.env, TMPDIR: overlay },
      graceMs: STOP_GRACE_MS,
    });
  } catch (err) {
    const spawnFailed = (err as NodeJS.ErrnoException).code !== undefined;
    throw new FerryError(
      spawnFailed
        ? `cannot start nbdkit for disk ${disk} (${errorMessage(err)}): is nbdkit installed?`
        : `nbdkit for disk ${disk}: ${errorMessage(err)}`,
    );
  }
  const { child, exited } = started;
  let stopped: Promise<void> | undefined;
  return {
    disk,
    uri: `nbd://127.0.0.1:${port}`,
    pid: child.pid ?? -1,
    exited,
    stop: () => {
      stopped ??= stopChild(child, exited, STOP_GRACE_MS);
      return stopped;
    },
  };
}

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}
