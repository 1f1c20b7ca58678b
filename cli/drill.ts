// `ferry recover --test`: a recovery drill. The disks of a checkpoint, materialised and verified,
// are served read-only as NBD exports through nbdkit's copy-on-write filter (a test machine's
// writes land in a throwaway overlay), until a TTL or Ctrl-C; then every server is stopped and
// every file of the drill removed, and both are checked. A drill records itself in the state
// directory while it runs, so `ferry recover --cleanup` can end it from elsewhere (or clean up after
// a drill whose process died), and leaves a report there when it ends.

import { spawn } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { chmod, mkdir, rm, rmdir, stat } from 'node:fs/promises';
import { hostname } from 'node:os';
import { join, resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { ConfigError, errorMessage, FerryError } from '../shared/engine/errors.ts';
import {
  type DrillCheck,
  type DrillRecord,
  type DrillReport,
  drillReportPath,
  readDrillRecords,
  readDrillReport,
  removeDrillRecord,
  writeDrillRecord,
  writeDrillReport,
} from '../shared/local/drills.ts';
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
// `ferry recover --cleanup` asks a live drill's process to end it (SIGTERM) and gives it this long:
// its own teardown waits up to STOP_GRACE_MS per server, all at once, plus removing files.
const OWNER_GRACE_MS = STOP_GRACE_MS + 20_000;
// A health check's output still arriving after its shell exited is waited for this long.
const OUTPUT_GRACE_MS = 1000;
// How often the clean-up looks whether a process it signalled has exited.
const EXIT_POLL_MS = 100;

export interface DrillExport {
  readonly disk: string;
  readonly uri: string;
  readonly pid: number;
}

export interface Drill {
  readonly id: string;
  readonly exports: readonly DrillExport[];
  /** Milliseconds from the command's start until every export accepted connections. */
  readonly readyMs: number;
  /**
   * Stops every server and removes every file of the drill; resolves with what it checked. With a
   * state directory, the report is saved there (also when the teardown fails) and the record removed.
   * `check` is the health check's result, for the report.
   */
  stop(reason: string, check?: DrillCheck): Promise<DrillTeardown>;
  /** Resolves when a server exits on its own (the drill is then over), with its disk. */
  readonly lost: Promise<string>;
}

export interface DrillTeardown {
  readonly servers: number;
  readonly removed: readonly string[];
  readonly report: DrillReport;
  /** Where the report was saved, with a state directory. */
  readonly reportPath?: string;
}

/** Where a drill records itself and its report, and when it started (for the time until ready). */
export interface DrillContext {
  readonly stateDir: string;
  readonly set: string;
  readonly startedMs: number;
  readonly ttlMs: number;
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
export async function startDrill(
  recovered: RecoverResult,
  dir: string,
  ctx: DrillContext = { stateDir: '', set: '', startedMs: Date.now(), ttlMs: 0 },
): Promise<Drill> {
  const id = `drill-${new Date(ctx.startedMs).toISOString().replace(/[-:.]/g, '')}-${process.pid}`;
  const overlay = join(dir, '.overlay');
  const servers: Server[] = [];
  const pidFile = (disk: string) => join(dir, `.${disk}.pid`);
  // Everything the drill leaves in `dir`: removed at its end, and checked to be gone.
  const files = [
    ...recovered.disks.map((d) => d.path),
    overlay,
    ...recovered.disks.map((d) => pidFile(d.disk)),
  ];
  let record: DrillRecord | undefined;
  const teardown = async (reason: string, check?: DrillCheck): Promise<DrillTeardown> => {
    await Promise.all(servers.map((s) => s.stop()));
    for (const path of files) await rm(path, { recursive: true, force: true });
    if (recovered.createdDir) await rmdir(dir).catch(() => {});
    const left = await leftOver(
      servers.map((s) => ({ disk: s.disk, pid: s.pid })),
      files,
    );
    const removed = recovered.createdDir ? [...files, dir] : files;
    const report: DrillReport = {
      id,
      set: ctx.set,
      checkpoint: recovered.checkpoint.id,
      startedAt: new Date(ctx.startedMs).toISOString(),
      readyAfterMs: record?.readyMs ?? 0,
      exports: record?.exports ?? [],
      endedAt: new Date().toISOString(),
      reason,
      cleanedBy: 'drill',
      serversStopped: servers.length,
      removed,
      left,
      clean: left.length === 0,
      ...(check === undefined ? {} : { check }),
    };
    let reportPath: string | undefined;
    if (ctx.stateDir !== '' && record !== undefined) {
      reportPath = await writeDrillReport(ctx.stateDir, report);
      if (report.clean) await removeDrillRecord(ctx.stateDir, id);
    }
    if (!report.clean) throw new FerryError(`the drill did not end cleanly: ${left.join('; ')}`);
    return { servers: servers.length, removed, report, ...(reportPath ? { reportPath } : {}) };
  };
  try {
    await mkdir(overlay, { recursive: true });
    for (const d of recovered.disks) {
      await chmod(d.path, 0o444);
      servers.push(await serve(d.disk, d.path, overlay, pidFile(d.disk)));
    }
    const ready = Date.now();
    if (ctx.stateDir !== '') {
      record = {
        id,
        set: ctx.set,
        checkpoint: recovered.checkpoint.id,
        owner: { pid: process.pid, host: hostname() },
        startedAt: new Date(ctx.startedMs).toISOString(),
        readyAt: new Date(ready).toISOString(),
        readyMs: ready - ctx.startedMs,
        until: new Date(ready + ctx.ttlMs).toISOString(),
        dir: resolve(dir),
        createdDir: recovered.createdDir,
        exports: servers.map((s) => ({ disk: s.disk, uri: s.uri, pid: s.pid, image: resolve(s.image) })),
        files: files.map((f) => resolve(f)),
      };
      await writeDrillRecord(ctx.stateDir, record);
    }
  } catch (err) {
    await teardown('it failed to start').catch(() => {});
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
    id,
    exports: servers.map((s) => ({ disk: s.disk, uri: s.uri, pid: s.pid })),
    readyMs: record?.readyMs ?? Date.now() - ctx.startedMs,
    lost,
    stop(reason, check) {
      stopping = true;
      return teardown(reason, check);
    },
  };
}

/** The environment variable a check finds disk `disk`'s export in: FERRY_DRILL_URI_<DISK>. */
export const drillUriVariable = (disk: string): string =>
  `FERRY_DRILL_URI_${disk.toUpperCase().replace(/[^A-Z0-9]/g, '_')}`;

/**
 * A drill's health check: `command` run by /bin/sh once every export is up, with each export's URI
 * in FERRY_DRILL_URI_<DISK> (and all of them, `disk=uri` separated by spaces, in FERRY_DRILL_URIS),
 * its output passed through to `output`. Healthy when it exits 0 within `timeoutMs` (the drill's
 * TTL); killed (its whole process group) when the time is up or `signal` aborts. What it checks is
 * the operator's: boot the disks in a VM and wait for a login prompt, fsck a filesystem, read a
 * database file. Writes it makes land in the drill's overlay, never in the replica.
 */
export async function runDrillCheck(
  drill: Pick<Drill, 'id' | 'exports'>,
  command: string,
  timeoutMs: number,
  output: (chunk: Buffer) => void,
  signal?: AbortSignal,
): Promise<DrillCheck> {
  const env: NodeJS.ProcessEnv = {
    ...process.env,
    FERRY_DRILL_ID: drill.id,
    FERRY_DRILL_URIS: drill.exports.map((e) => `${e.disk}=${e.uri}`).join(' '),
  };
  for (const e of drill.exports) env[drillUriVariable(e.disk)] = e.uri;
  const started = Date.now();
  const child = spawn('/bin/sh', ['-c', command], { env, stdio: ['ignore', 'pipe', 'pipe'], detached: true });
  child.stdout.on('data', output);
  child.stderr.on('data', output);
  let killedBy: string | undefined;
  const kill = (why: string) => {
    killedBy ??= why;
    try {
      // The group: a shell's children (a VM, a copy) go with it.
      if (child.pid !== undefined) process.kill(-child.pid, 'SIGKILL');
    } catch {
      // Already gone.
    }
  };
  const timer = setTimeout(() => kill("killed at the drill's TTL"), timeoutMs);
  const onAbort = () =>
    kill(typeof signal?.reason === 'string' ? signal.reason : 'killed: the drill was interrupted');
  signal?.addEventListener('abort', onAbort, { once: true });
  const { code, error } = await new Promise<{ code: number | null; error?: Error }>((resolve) => {
    child.once('error', (err) => resolve({ code: null, error: err }));
    child.once('close', (c) => resolve({ code: c }));
    // A process that left the group (setsid) may hold the output pipes open: the verdict is the
    // shell's exit, with a moment for its last output.
    child.once('exit', (c) => setTimeout(() => resolve({ code: c }), OUTPUT_GRACE_MS).unref());
  });
  clearTimeout(timer);
  signal?.removeEventListener('abort', onAbort);
  const durationMs = Date.now() - started;
  const healthy = error === undefined && killedBy === undefined && code === 0;
  const reason = healthy
    ? undefined
    : (killedBy ?? (error ? `could not run: ${error.message}` : `exit status ${code}`));
  return { command, healthy, exitCode: code, durationMs, ...(reason === undefined ? {} : { reason }) };
}

/** What is still there of a drill: servers alive (and still nbdkit), files present. */
async function leftOver(
  servers: readonly { disk: string; pid: number; image?: string }[],
  files: readonly string[],
): Promise<string[]> {
  const left: string[] = [];
  for (const s of servers) {
    if (isAlive(s.pid) && isNbdkit(s.pid, s.image)) {
      left.push(`the server of disk ${s.disk} (pid ${s.pid}) is still running`);
    }
  }
  for (const path of files) if (await stat(path).catch(() => undefined)) left.push(`${path} is still there`);
  return left;
}

/**
 * `ferry recover --cleanup`: ends every drill recorded in `stateDir` (of `set`, if given) and
 * checks nothing of it is left. A drill whose process is alive on this host is asked to end itself
 * (SIGTERM: it tears down and writes its report as at its TTL); one whose process is gone (killed,
 * crashed) or does not end in time is torn down here: its servers stopped if they are still
 * nbdkit serving its images, its files and folder removed. Each ends with a report, saved beside
 * the record, which is removed once nothing is left.
 */
export async function cleanupDrills(stateDir: string, set?: string): Promise<DrillReport[]> {
  const { records, unreadable } = await readDrillRecords(stateDir, set);
  if (unreadable.length > 0) {
    throw new FerryError(
      `drill record ${unreadable[0]!.path} cannot be read (${unreadable[0]!.reason}): end its servers and remove its files by hand, then the record`,
    );
  }
  const reports: DrillReport[] = [];
  for (const record of records) reports.push(await cleanupDrill(stateDir, record));
  return reports;
}

async function cleanupDrill(stateDir: string, record: DrillRecord): Promise<DrillReport> {
  const { owner } = record;
  const servers = record.exports.map((e) => ({ disk: e.disk, pid: e.pid, image: e.image }));
  if (owner.host !== hostname()) {
    const left = [
      `the drill runs on host ${owner.host} (pid ${owner.pid}): run ferry recover --cleanup there`,
    ];
    return { ...baseReport(record, 'not cleaned up from this host', 0, []), left, clean: false };
  }
  if (isAlive(owner.pid) && isDrillOwner(owner.pid)) {
    process.kill(owner.pid, 'SIGTERM');
    if (await exited(owner.pid, OWNER_GRACE_MS)) {
      const own = await readDrillReport(stateDir, record.id);
      const left = await leftOver(servers, record.files);
      if (own !== undefined && left.length === 0) {
        await removeDrillRecord(stateDir, record.id);
        const report: DrillReport = {
          ...own,
          reason: `ferry recover --cleanup: its process ${owner.pid} ended it on SIGTERM`,
          left,
          clean: true,
        };
        await writeDrillReport(stateDir, report);
        return report;
      }
    }
  }
  // Its process is gone (or did not end it): stop what still serves its images, remove its files.
  let stopped = 0;
  for (const s of servers) {
    if (!isAlive(s.pid) || !isNbdkit(s.pid, s.image)) continue;
    process.kill(s.pid, 'SIGTERM');
    if (!(await exited(s.pid, STOP_GRACE_MS))) {
      process.kill(s.pid, 'SIGKILL');
      await exited(s.pid, STOP_GRACE_MS);
    }
    stopped++;
  }
  for (const path of record.files) await rm(path, { recursive: true, force: true });
  if (record.createdDir) await rmdir(record.dir).catch(() => {});
  const left = await leftOver(servers, record.files);
  const removed = record.createdDir ? [...record.files, record.dir] : record.files;
  const report: DrillReport = {
    ...baseReport(record, `ferry recover --cleanup: its process ${owner.pid} was gone`, stopped, removed),
    left,
    clean: left.length === 0,
  };
  await writeDrillReport(stateDir, report);
  if (report.clean) await removeDrillRecord(stateDir, record.id);
  return report;
}

function baseReport(
  record: DrillRecord,
  reason: string,
  serversStopped: number,
  removed: readonly string[],
): Omit<DrillReport, 'left' | 'clean'> {
  return {
    id: record.id,
    set: record.set,
    checkpoint: record.checkpoint,
    startedAt: record.startedAt,
    readyAfterMs: record.readyMs,
    exports: record.exports,
    endedAt: new Date().toISOString(),
    reason,
    cleanedBy: 'cleanup',
    serversStopped,
    removed,
  };
}

/** A drill report as lines for an operator. */
export function describeDrillReport(r: DrillReport, stateDir?: string): string[] {
  return [
    `drill ${r.id} of checkpoint ${r.checkpoint} (set ${r.set}): exports ready ${(r.readyAfterMs / 1000).toFixed(1)} s after the command started; ended ${r.endedAt} (${r.reason})`,
    ...r.exports.map((e) => `  disk ${e.disk}: ${e.uri} (nbdkit pid ${e.pid})`),
    ...(r.check === undefined
      ? []
      : [
          r.check.healthy
            ? `  health check passed in ${(r.check.durationMs / 1000).toFixed(1)} s: ${r.check.command}`
            : `  health check FAILED (${r.check.reason}) after ${(r.check.durationMs / 1000).toFixed(1)} s: ${r.check.command}`,
        ]),
    r.clean
      ? `  cleaned up: ${r.serversStopped} NBD server(s) stopped, ${r.removed.length} file(s) and folder(s) removed; checked: no server alive, no file left`
      : `  NOT CLEAN: ${r.left.join('; ')}`,
    ...(stateDir === undefined ? [] : [`  report: ${drillReportPath(stateDir, r.id)}`]),
  ];
}

/** Waits until `pid` is gone, at most `ms`; whether it is. */
async function exited(pid: number, ms: number): Promise<boolean> {
  for (let waited = 0; waited < ms; waited += EXIT_POLL_MS) {
    if (!isAlive(pid)) return true;
    await sleep(EXIT_POLL_MS);
  }
  return !isAlive(pid);
}

/** Whether `pid` is still nbdkit (serving `image`, when given), not a process that reused its pid. */
function isNbdkit(pid: number, image?: string): boolean {
  const cmdline = commandLine(pid);
  if (cmdline === undefined) return true; // no /proc: trust the pid
  return cmdline.includes('nbdkit') && (image === undefined || cmdline.includes(image));
}

/** Whether `pid` is a `ferry recover --test` (the drill's own process), not a process that reused its pid. */
function isDrillOwner(pid: number): boolean {
  const cmdline = commandLine(pid);
  return cmdline === undefined || (cmdline.includes('recover') && cmdline.includes('--test'));
}

function commandLine(pid: number): string | undefined {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').join(' ');
  } catch {
    return undefined;
  }
}

interface Server {
  readonly disk: string;
  readonly image: string;
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
    image,
    uri: `nbd://127.0.0.1:${port}`,
    pid: child.pid ?? -1,
    exited,
    stop: () => {
      stopped ??= stopChild(child, exited, STOP_GRACE_MS);
      return stopped;
    },
  };
}

/** Whether `pid` runs. A zombie (exited, not yet reaped by whoever adopted it) does not. */
function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
  return !isZombie(pid);
}

function isZombie(pid: number): boolean {
  try {
    // The state follows the command name in parentheses, which may itself hold spaces.
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2).startsWith('Z');
  } catch {
    return false;
  }
}
