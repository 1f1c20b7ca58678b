// One Ferry run for the WAN benchmark, in its own process so its peak RSS and CPU are its own.
// Usage: node --import tsx bench/lib/ferry-child.ts CONFIG.json — writes the result to config.resultPath;
//        node --import tsx bench/lib/ferry-child.ts --baseline — prints the RSS of the loaded code alone.
import { readFileSync } from 'node:fs';
import { readFile, writeFile } from 'node:fs/promises';
import { performance } from 'node:perf_hooks';
import { type JobSpec, parseJobSpec, runLocalJob } from '../../cli/run.ts';
import { AbortedError, errorMessage } from '../../shared/engine/errors.ts';
import type { ReplicationEvent } from '../../shared/engine/replicate.ts';

export interface FerryChildConfig {
  readonly spec: JobSpec;
  readonly stateDir: string;
  readonly resultPath: string;
  /** Abort the run after this long (a capped case); goodput is then what completed in that time. */
  readonly timeLimitMs?: number;
  /** ferry:// targets over plain TCP, to a node started with --insecure (ferry-remote-plain). */
  readonly insecure?: boolean;
  /** How often process memory is sampled (default 250 ms). */
  readonly memorySampleMs?: number;
}

/** One sample per disk per engine tick (250 ms). */
export interface ProgressSample {
  readonly t: number;
  readonly disk: string;
  readonly bytesDone: number;
  readonly inflight: number;
  readonly window: number;
  readonly rate: number;
}

export interface FerryChildResult {
  readonly ok: boolean;
  readonly capped: boolean;
  readonly error?: string;
  /** ms from just before runLocalJob to its end (NBD connect, block status, transfer, commit). */
  readonly elapsedMs: number;
  /** performance.timeOrigin + now() at the start, to line the samples up with the parent's clock. */
  readonly startedAtEpochMs: number;
  /** ms from the start until every disk was planned (NBD connections open, block status read). */
  readonly plannedAtMs: number | undefined;
  /** ms from the start until the last chunk completed (before commit and the manifest). */
  readonly transferEndMs: number | undefined;
  /** Bytes the cycle had to move, per disk, from the plan. */
  readonly planned: Record<string, { bytesTotal: number; extents: number }>;
  /** Bytes completed (written and verified), per disk, at the end or at the cap. */
  readonly completed: Record<string, number>;
  readonly maxRssKiB: number;
  readonly cpuUserMs: number;
  readonly cpuSystemMs: number;
  readonly progress: readonly ProgressSample[];
  readonly windows: readonly { t: number; disk: string; window: number; reason: string }[];
  readonly retries: number;
  /** Every sample: [t, rss, V8 heap used, array buffers] in bytes: where the process's memory is. */
  readonly memory: readonly (readonly [number, number, number, number])[];
}

/**
 * Peak RSS of this process, KiB, from VmHWM. Not process.resourceUsage().maxRSS: Linux carries
 * ru_maxrss across execve, so a spawned child reports its parent's peak if that was higher.
 */
function peakRssKiB(): number {
  const m = /VmHWM:\s+(\d+)\s+kB/.exec(readFileSync('/proc/self/status', 'utf8'));
  return m ? Number(m[1]) : process.resourceUsage().maxRSS;
}

async function main(): Promise<void> {
  const configPath = process.argv[2];
  if (configPath === '--baseline') {
    // The same process with every module a run loads and no run: what Node and the code cost alone.
    await import('../../shared/local/nbd/source.ts');
    await import('../../shared/net/remote-target.ts');
    process.stdout.write(`${JSON.stringify({ maxRssKiB: peakRssKiB() })}\n`);
    return;
  }
  if (!configPath) throw new Error('usage: ferry-child.ts CONFIG.json');
  const config = JSON.parse(await readFile(configPath, 'utf8')) as FerryChildConfig;
  const spec = parseJobSpec(config.spec, configPath);
  const progress: ProgressSample[] = [];
  const windows: { t: number; disk: string; window: number; reason: string }[] = [];
  const planned: Record<string, { bytesTotal: number; extents: number }> = {};
  const completed: Record<string, number> = {};
  let retries = 0;
  let lastCompleteAt: number | undefined;
  let plannedAt: number | undefined;
  const abort = new AbortController();
  let capped = false;
  const started = performance.now();
  const since = () => performance.now() - started;
  const memory: [number, number, number, number][] = [];
  const sampleMemory = () => {
    const m = process.memoryUsage();
    memory.push([Math.round(since()), m.rss, m.heapUsed, m.arrayBuffers]);
  };
  const memoryTimer = setInterval(sampleMemory, config.memorySampleMs ?? 250);
  const timer =
    config.timeLimitMs === undefined
      ? undefined
      : setTimeout(() => {
          capped = true;
          abort.abort();
        }, config.timeLimitMs);

  const onEvent = (e: ReplicationEvent) => {
    const t = since();
    switch (e.type) {
      case 'planned':
        planned[e.disk] = { bytesTotal: e.bytesTotal, extents: e.extents };
        plannedAt = t;
        break;
      case 'progress': {
        progress.push({
          t,
          disk: e.disk,
          bytesDone: e.bytesDone,
          inflight: e.inflight,
          window: e.window,
          rate: e.rate,
        });
        const before = completed[e.disk] ?? 0;
        completed[e.disk] = e.bytesDone;
        if (e.bytesDone > before && e.bytesDone === e.bytesTotal) lastCompleteAt = t;
        break;
      }
      case 'window':
        windows.push({ t, disk: e.disk, window: e.window, reason: e.reason });
        break;
      case 'retry':
        retries++;
        break;
      case 'disk-done':
        completed[e.disk] = e.bytes;
        break;
      default:
        break;
    }
  };

  let ok = true;
  let error: string | undefined;
  try {
    await runLocalJob(spec, {
      stateDir: config.stateDir,
      onEvent,
      signal: abort.signal,
      ...(config.insecure ? { insecure: true } : {}),
    });
  } catch (err) {
    ok = false;
    if (!(capped && err instanceof AbortedError) && !capped) error = errorMessage(err);
    if (capped) ok = true;
  } finally {
    if (timer) clearTimeout(timer);
    clearInterval(memoryTimer);
    sampleMemory();
  }
  const elapsedMs = since();
  const usage = process.resourceUsage();
  const result: FerryChildResult = {
    ok: ok && error === undefined,
    capped,
    ...(error === undefined ? {} : { error }),
    elapsedMs,
    startedAtEpochMs: performance.timeOrigin + started,
    plannedAtMs: plannedAt,
    transferEndMs: lastCompleteAt,
    planned,
    completed,
    maxRssKiB: peakRssKiB(),
    cpuUserMs: usage.userCPUTime / 1000,
    cpuSystemMs: usage.systemCPUTime / 1000,
    progress,
    windows,
    retries,
    memory,
  };
  await writeFile(config.resultPath, JSON.stringify(result));
}

main().then(
  () => process.exit(0),
  (err) => {
    process.stderr.write(`ferry-child: ${errorMessage(err)}\n`);
    process.exit(1);
  },
);
