// Progress display for `ferry replicate`, `ferry demo` and `ferry recover`: live bars on a terminal, plain periodic
// lines otherwise (logs, CI), nothing with --json.
import cliProgress from 'cli-progress';
import type { ReplicationEvent } from '../shared/engine/replicate.ts';
import { formatBytes } from '../shared/engine/units.ts';
import type { MaterialiseProgress } from '../shared/local/materialise.ts';

export type Reporter = { onEvent(e: ReplicationEvent): void; stop(): void };

export interface DiskView {
  bytesDone: number;
  bytesTotal: number;
  rate: number;
  window: number;
}

// Plain mode prints a line per disk at most this often: enough to see a run move in a CI log
// without drowning it.
const PLAIN_INTERVAL_MS = 2000;

/** `stream` is where the bars are drawn (standard error unless a test gives its own terminal). */
export function createReporter(
  mode: 'tty' | 'plain' | 'silent',
  log: (line: string) => void,
  stream: NodeJS.WritableStream = process.stderr,
): Reporter {
  if (mode === 'silent') return { onEvent() {}, stop() {} };
  return mode === 'tty' ? ttyReporter(stream) : plainReporter(log);
}

/** Time left at the current rate, "" while there is no rate to go by, "done" at the end. */
export function formatEta(v: DiskView): string {
  if (v.bytesDone >= v.bytesTotal) return 'done';
  if (!(v.rate > 0) || !Number.isFinite(v.rate)) return '';
  const s = Math.ceil((v.bytesTotal - v.bytesDone) / v.rate);
  if (s >= 3600) return `${Math.floor(s / 3600)}h${String(Math.floor(s / 60) % 60).padStart(2, '0')}m`;
  return s >= 60 ? `${Math.floor(s / 60)}m${String(s % 60).padStart(2, '0')}s` : `${s}s`;
}

// The bar's line. cli-progress fills {bar} and {percentage} itself, and also {total}, {value} and
// {eta} (raw bytes, and seconds or "INF") over any payload field of the same name: the payload
// therefore uses names of its own.
export const BAR_FORMAT =
  ' {disk} [{bar}] {percentage}% | {done} / {size} | {rate}/s | window {window}{timeLeft}';

/** The payload of a disk's bar: sizes for people on both sides of the slash, no ETA without a rate. */
export function barFields(disk: string, v: DiskView): Record<string, string> {
  const eta = formatEta(v);
  return {
    disk: disk.padEnd(8),
    done: formatBytes(v.bytesDone),
    size: formatBytes(v.bytesTotal),
    rate: formatBytes(v.rate),
    // Not known until the first tick (the planned event has none).
    window: v.window > 0 ? formatBytes(v.window) : '-',
    timeLeft: eta === '' ? '' : eta === 'done' ? ' | done' : ` | ETA ${eta}`,
  };
}

/** What recovering an interrupted commit did, including the disks it could not reach. */
export function describeRecovery(e: Extract<ReplicationEvent, { type: 'recovered' }>): string {
  const done =
    e.action === 'rolled-back'
      ? `rolled back the interrupted commit of ${e.cycleId} on ${e.disks} disk(s) to the last checkpoint`
      : `finished the clean-up of ${e.cycleId} (${e.disks} disk(s)), published before a crash`;
  if (e.unsupported.length === 0) return done;
  return `${done}; disk(s) ${e.unsupported.join(', ')} committed on a ferry node, which keeps its own state (not rolled back from here)`;
}

export function describeEvent(e: ReplicationEvent): string | undefined {
  switch (e.type) {
    case 'planned':
      return `disk ${e.disk}: ${e.kind} copy, ${formatBytes(e.bytesTotal)} in ${e.extents} extents${
        e.resumedBytes > 0 ? `, resuming with ${formatBytes(e.resumedBytes)} already done` : ''
      }`;
    case 'window':
      return `disk ${e.disk}: window -> ${formatBytes(e.window)} (${e.reason})`;
    case 'retry':
      return `disk ${e.disk}: retry ${e.attempt} at offset ${e.offset}: ${e.error}`;
    case 'disk-done':
      return `disk ${e.disk}: complete and verified, ${formatBytes(e.bytes)} in ${e.chunks} chunks`;
    case 'published':
      return `checkpoint ${e.checkpoint.id} published (${e.checkpoint.disks.length} disks)`;
    case 'resume-refused':
      return `disk ${e.disk}: cannot resume (${e.reason}); the cycle starts over for this disk`;
    case 'recovered':
      return describeRecovery(e);
    case 'rolled-back':
      return `commit of ${e.cycleId} failed (${e.reason}): every disk rolled back to the last checkpoint`;
    default:
      return undefined;
  }
}

function plainReporter(log: (line: string) => void): Reporter {
  const views = new Map<string, DiskView>();
  const lastPrinted = new Map<string, number>();
  return {
    onEvent(e) {
      if (e.type === 'progress') {
        const v = { bytesDone: e.bytesDone, bytesTotal: e.bytesTotal, rate: e.rate, window: e.window };
        views.set(e.disk, v);
        const now = Date.now();
        if (now - (lastPrinted.get(e.disk) ?? 0) < PLAIN_INTERVAL_MS || v.bytesDone >= v.bytesTotal) return;
        lastPrinted.set(e.disk, now);
        const pct = v.bytesTotal === 0 ? 100 : Math.floor((100 * v.bytesDone) / v.bytesTotal);
        const eta = formatEta(v);
        log(
          `disk ${e.disk}: ${formatBytes(v.bytesDone)} / ${formatBytes(v.bytesTotal)} (${pct}%) ` +
            `${formatBytes(v.rate)}/s window ${formatBytes(v.window)}${eta ? ` eta ${eta}` : ''}`,
        );
        return;
      }
      const line = describeEvent(e);
      if (line) log(line);
    },
    stop() {},
  };
}

function ttyReporter(stream: NodeJS.WritableStream): Reporter {
  const multi = new cliProgress.MultiBar(
    {
      format: BAR_FORMAT,
      stream,
      hideCursor: true,
      // Redraw every bar on every update: cli-progress skips a bar whose text has not changed, and a
      // line logged above the bars (multi.log) then overwrites the first bar instead of pushing it down.
      forceRedraw: true,
      clearOnComplete: false,
      barsize: 24,
      autopadding: true,
    },
    cliProgress.Presets.shades_classic,
  );
  const bars = new Map<string, cliProgress.SingleBar>();
  return {
    onEvent(e) {
      if (e.type === 'planned') {
        const v = { bytesDone: e.resumedBytes, bytesTotal: e.bytesTotal, rate: 0, window: 0 };
        bars.set(e.disk, multi.create(Math.max(1, e.bytesTotal), e.resumedBytes, barFields(e.disk, v)));
        return;
      }
      if (e.type === 'progress') {
        const v = { bytesDone: e.bytesDone, bytesTotal: e.bytesTotal, rate: e.rate, window: e.window };
        bars.get(e.disk)?.update(e.bytesDone, barFields(e.disk, v));
        return;
      }
      // The bars show the rest; what changes a run's course is printed above them.
      if (e.type !== 'checkpoint-saved' && e.type !== 'disk-done') {
        const line = describeEvent(e);
        if (line) multi.log(`${line}\n`);
      }
    },
    stop() {
      // Nothing was drawn without a bar (stop() would still print an empty line).
      if (bars.size === 0) return;
      // multi.log only queues a line for the next redraw, and stop() does not redraw it: draw once
      // more so the last lines logged (the checkpoint published) are not lost.
      multi.update();
      multi.stop();
    },
  };
}

/** Progress of `ferry recover`: a bar per disk on a terminal, a line per disk and phase otherwise. */
export interface RecoveryReporter {
  planned(disks: readonly { disk: string; bytes: number }[]): void;
  progress(p: MaterialiseProgress): void;
  /** A line that stays (a disk verified); drawn above the bars on a terminal. */
  log(line: string): void;
  stop(): void;
}

const RECOVERY_BAR_FORMAT = ' {disk} [{bar}] {percentage}% | {phase}';
const PHASES: Record<MaterialiseProgress['phase'], string> = {
  copy: 'copying the image',
  apply: 'applying history',
  verify: 'verifying',
};

export function createRecoveryReporter(
  mode: 'tty' | 'plain' | 'silent',
  log: (line: string) => void,
  stream: NodeJS.WritableStream = process.stderr,
): RecoveryReporter {
  if (mode === 'silent') return { planned() {}, progress() {}, log() {}, stop() {} };
  if (mode === 'plain') {
    const phase = new Map<string, string>();
    const lastPrinted = new Map<string, number>();
    return {
      planned() {},
      progress(p) {
        const now = Date.now();
        const changed = phase.get(p.disk) !== p.phase;
        if (!changed && now - (lastPrinted.get(p.disk) ?? 0) < PLAIN_INTERVAL_MS) return;
        phase.set(p.disk, p.phase);
        lastPrinted.set(p.disk, now);
        const pct = p.bytesTotal === 0 ? 100 : Math.floor((100 * p.bytesDone) / p.bytesTotal);
        log(`disk ${p.disk}: ${PHASES[p.phase]} (${pct}%)`);
      },
      log,
      stop() {},
    };
  }
  const multi = new cliProgress.MultiBar(
    {
      format: RECOVERY_BAR_FORMAT,
      stream,
      hideCursor: true,
      forceRedraw: true,
      clearOnComplete: false,
      barsize: 24,
      autopadding: true,
    },
    cliProgress.Presets.shades_classic,
  );
  const bars = new Map<string, cliProgress.SingleBar>();
  let stopped = false;
  return {
    planned(disks) {
      for (const d of disks) {
        bars.set(d.disk, multi.create(Math.max(1, d.bytes), 0, { disk: d.disk.padEnd(8), phase: 'waiting' }));
      }
    },
    progress(p) {
      bars.get(p.disk)?.update(p.bytesDone, { disk: p.disk.padEnd(8), phase: PHASES[p.phase] });
    },
    log(line) {
      multi.log(`${line}\n`);
    },
    stop() {
      // Once: the command stops it before its closing lines, and again on the way out.
      if (bars.size === 0 || stopped) return;
      stopped = true;
      multi.update();
      multi.stop();
    },
  };
}
