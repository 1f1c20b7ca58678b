// Progress display for `ferry replicate` and `ferry demo`: live bars on a terminal, plain periodic
// lines otherwise (logs, CI), nothing with --json.
import cliProgress from 'cli-progress';
import type { ReplicationEvent } from '../shared/engine/replicate.ts';
import { formatBytes } from '../shared/engine/units.ts';

export type Reporter = { onEvent(e: ReplicationEvent): void; stop(): void };

interface DiskView {
  bytesDone: number;
  bytesTotal: number;
  rate: number;
  window: number;
}

// Plain mode prints a line per disk at most this often: enough to see a run move in a CI log
// without drowning it.
const PLAIN_INTERVAL_MS = 2000;

export function createReporter(mode: 'tty' | 'plain' | 'silent', log: (line: string) => void): Reporter {
  if (mode === 'silent') return { onEvent() {}, stop() {} };
  return mode === 'tty' ? ttyReporter() : plainReporter(log);
}

const eta = (v: DiskView): string => {
  if (v.bytesDone >= v.bytesTotal) return 'done';
  if (v.rate <= 0) return '--';
  const s = Math.ceil((v.bytesTotal - v.bytesDone) / v.rate);
  return s >= 60 ? `${Math.floor(s / 60)}m${String(s % 60).padStart(2, '0')}s` : `${s}s`;
};

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
        log(
          `disk ${e.disk}: ${formatBytes(v.bytesDone)} / ${formatBytes(v.bytesTotal)} (${pct}%) ` +
            `${formatBytes(v.rate)}/s window ${formatBytes(v.window)} eta ${eta(v)}`,
        );
        return;
      }
      const line = describeEvent(e);
      if (line) log(line);
    },
    stop() {},
  };
}

function ttyReporter(): Reporter {
  const multi = new cliProgress.MultiBar(
    {
      format: ' {disk} [{bar}] {percentage}% | {done} / {total} | {rate}/s | window {window} | ETA {eta}',
      hideCursor: true,
      clearOnComplete: false,
      barsize: 24,
      autopadding: true,
    },
    cliProgress.Presets.shades_classic,
  );
  const bars = new Map<string, cliProgress.SingleBar>();
  const payload = (disk: string, v: DiskView) => ({
    disk: disk.padEnd(8),
    done: formatBytes(v.bytesDone),
    total: formatBytes(v.bytesTotal),
    rate: formatBytes(v.rate),
    window: formatBytes(v.window),
    eta: eta(v),
  });
  return {
    onEvent(e) {
      if (e.type === 'planned') {
        const v = { bytesDone: e.resumedBytes, bytesTotal: e.bytesTotal, rate: 0, window: 0 };
        bars.set(e.disk, multi.create(Math.max(1, e.bytesTotal), e.resumedBytes, payload(e.disk, v)));
        return;
      }
      if (e.type === 'progress') {
        const v = { bytesDone: e.bytesDone, bytesTotal: e.bytesTotal, rate: e.rate, window: e.window };
        bars.get(e.disk)?.update(e.bytesDone, payload(e.disk, v));
        return;
      }
      if (e.type === 'window' || e.type === 'retry' || e.type === 'published') {
        const line = describeEvent(e);
        if (line) multi.log(`${line}\n`);
      }
    },
    stop() {
      multi.stop();
    },
  };
}
