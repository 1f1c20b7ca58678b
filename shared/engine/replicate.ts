// One replication cycle of a set of disks: plan descriptors, stream chunks under rolling windows
// and the node budget, verify, make progress durable, commit every disk, publish one checkpoint.
import type { ReplicationParams } from './config.ts';
import { WindowController } from './controller.ts';
import { cutDescriptors, type Descriptor, normalizeExtents } from './descriptors.ts';
import { AbortedError, errorMessage, FerryError, IntegrityError, TransferError } from './errors.ts';
import type { Extent } from './extents.ts';
import { LinearAggregator, sha256Hex } from './integrity.ts';
import type {
  CheckpointDisk,
  Clock,
  CopyKind,
  DiskSource,
  DiskTarget,
  Random,
  RecoveryCheckpoint,
  StateStore,
} from './ports.ts';
import { DiskProgressTracker } from './progress.ts';
import { DEFAULT_RETRY_POLICY, type RetryPolicy, withRetry } from './retry.ts';
import { type Grant, Scheduler } from './scheduler.ts';
import { settleAll } from './settle.ts';

export interface DiskJob {
  /** Stable id of the disk within its set (names state and checkpoint entries). */
  readonly id: string;
  readonly source: DiskSource;
  readonly target: DiskTarget;
  /** Changed extents since the last checkpoint; undefined means a full copy of allocated data. */
  readonly changed: readonly Extent[] | undefined;
}

export interface ReplicationJob {
  /** The replication set (protection group); checkpoints are per set. */
  readonly set: string;
  readonly disks: readonly DiskJob[];
  readonly params: ReplicationParams;
}

export type ReplicationEvent =
  | {
      type: 'planned';
      disk: string;
      kind: CopyKind;
      bytesTotal: number;
      extents: number;
      resumedBytes: number;
    }
  | {
      type: 'progress';
      disk: string;
      bytesDone: number;
      bytesTotal: number;
      inflight: number;
      window: number;
      /** Bytes per second over the last evaluation interval. */
      rate: number;
    }
  | { type: 'window'; disk: string; window: number; reason: string }
  | { type: 'retry'; disk: string; offset: number; attempt: number; error: string }
  | { type: 'checkpoint-saved'; disk: string; bytesDone: number }
  | { type: 'disk-done'; disk: string; bytes: number; chunks: number }
  | { type: 'published'; checkpoint: RecoveryCheckpoint };

export interface ReplicationPorts {
  readonly clock: Clock;
  readonly random: Random;
  readonly state: StateStore;
  readonly onEvent?: (event: ReplicationEvent) => void;
  readonly signal?: AbortSignal;
  readonly retry?: RetryPolicy;
  /** How often windows are re-evaluated and progress is reported (ms of the injected clock). */
  readonly tickMs?: number;
}

export interface DiskResult {
  readonly disk: string;
  readonly kind: CopyKind;
  readonly bytesTotal: number;
  /** Bytes sent in this run (excludes what a resumed run skipped). */
  readonly bytesSent: number;
  readonly resumedBytes: number;
  readonly chunks: number;
  readonly aggregateSha256: string;
}

export interface ReplicationResult {
  readonly checkpoint: RecoveryCheckpoint;
  readonly disks: readonly DiskResult[];
  readonly elapsedMs: number;
}

// 250 ms: frequent enough that the controller reacts to a throttling storm within a second, rare
// enough that progress lines and window decisions cost nothing next to the data path.
const DEFAULT_TICK_MS = 250;

/** Per-disk state of one run. */
interface DiskRun {
  readonly job: DiskJob;
  readonly set: string;
  readonly chunkSize: number;
  /** Identity of this run's durable progress records. */
  readonly cycleId: string;
  readonly fingerprint: string;
  readonly kind: CopyKind;
  readonly extents: readonly Extent[];
  readonly bytesTotal: number;
  readonly resumedBytes: number;
  readonly tracker: DiskProgressTracker;
  readonly aggregate: LinearAggregator;
  readonly controller: WindowController | undefined;
  bytesSent: number;
  bytesAtLastTick: number;
  saving: Promise<void> | undefined;
}

/**
 * Runs one cycle. On success exactly one recovery checkpoint is published. On failure nothing is
 * published, the previous checkpoint stays current, and durable progress lets a rerun resume.
 */
export async function replicate(job: ReplicationJob, ports: ReplicationPorts): Promise<ReplicationResult> {
  const { clock, state, params } = { ...ports, params: job.params };
  const emit = ports.onEvent ?? (() => {});
  const tickMs = ports.tickMs ?? DEFAULT_TICK_MS;
  const started = clock.now();
  const abort = new AbortController();
  const onOuterAbort = () => abort.abort();
  ports.signal?.addEventListener('abort', onOuterAbort, { once: true });
  const signal = abort.signal;

  const previous = await state.latestCheckpoint(job.set);
  const sequence = (previous?.sequence ?? 0) + 1;
  const cycleId = `${job.set}#${sequence}`;
  const scheduler = new Scheduler(params.nodeBudget);
  const runs = new Map<string, DiskRun>();

  try {
    // Disks are planned at once: each plan waits on round trips (block status, opening the target),
    // and over a long link four disks planned one after another would start four times later.
    const planned = await settleAll(
      job.disks.map((disk) => planDisk(disk, job.set, cycleId, params, state, signal)),
    );
    for (const run of planned) {
      const disk = run.job;
      runs.set(disk.id, run);
      scheduler.addDisk(disk.id, skipDone(run), run.controller?.window ?? params.window);
      emit({
        type: 'planned',
        disk: disk.id,
        kind: run.kind,
        bytesTotal: run.bytesTotal,
        extents: run.extents.length,
        resumedBytes: run.resumedBytes,
      });
    }

    await pump(scheduler, runs, { ...ports, signal, tickMs }, abort, emit);

    // Every disk is written and verified chunk by chunk; now check the whole before committing.
    for (const run of runs.values()) {
      const done = run.tracker.bytesDone;
      if (done !== run.bytesTotal) {
        throw new IntegrityError(
          `disk ${run.job.id}: ${done} of ${run.bytesTotal} bytes verified at the end of the cycle`,
          { disk: run.job.id },
        );
      }
    }
    // Targets commit at once, as they planned: a commit is round trips too (a remote node, a snapshot).
    const disks: CheckpointDisk[] = await settleAll(
      [...runs.values()].map(async (run): Promise<CheckpointDisk> => {
        const done = run.tracker.bytesDone;
        const aggregateSha256 = run.aggregate.hex();
        const chunks = run.tracker.watermark;
        const targetRef = await run.job.target.commit({
          chunks,
          bytes: done,
          aggregateSha256,
          extents: run.extents,
        });
        return {
          disk: run.job.id,
          source: run.job.source.name,
          target: run.job.target.name,
          sizeBytes: run.job.source.sizeBytes,
          kind: run.kind,
          chunks,
          bytes: done,
          aggregateSha256,
          ...(targetRef === undefined ? {} : { targetRef }),
        };
      }),
    );
    for (const d of disks) emit({ type: 'disk-done', disk: d.disk, bytes: d.bytes, chunks: d.chunks });

    const checkpoint: RecoveryCheckpoint = {
      id: cycleId,
      set: job.set,
      sequence,
      createdAt: new Date(clock.now()).toISOString(),
      parent: previous?.id,
      disks,
    };
    await state.publishCheckpoint(checkpoint);
    emit({ type: 'published', checkpoint });
    for (const run of runs.values()) {
      await state.clearProgress(job.set, run.job.id);
      await run.job.target.afterPublish?.();
    }

    return {
      checkpoint,
      elapsedMs: clock.now() - started,
      disks: [...runs.values()].map((run, i) => ({
        disk: run.job.id,
        kind: run.kind,
        bytesTotal: run.bytesTotal,
        bytesSent: run.bytesSent,
        resumedBytes: run.resumedBytes,
        chunks: disks[i]!.chunks,
        aggregateSha256: disks[i]!.aggregateSha256,
      })),
    };
  } finally {
    ports.signal?.removeEventListener('abort', onOuterAbort);
  }
}

/** Normalises the disk's change map, resumes matching progress, and prepares its target. */
async function planDisk(
  disk: DiskJob,
  set: string,
  cycleId: string,
  params: ReplicationParams,
  state: StateStore,
  signal: AbortSignal,
): Promise<DiskRun> {
  const { source, target } = disk;
  const kind: CopyKind = disk.changed === undefined ? 'full' : 'incremental';
  const raw = disk.changed ?? (await allocated(source, signal));
  const extents = normalizeExtents(raw, {
    diskSize: source.sizeBytes,
    blockSize: target.blockSize,
    disk: disk.id,
  });
  const bytesTotal = extents.reduce((sum, e) => sum + e.length, 0);
  const fingerprint = planFingerprint(kind, source.sizeBytes, target.blockSize, params.chunkSize, extents);

  const saved = await state.loadProgress(set, disk.id);
  const resume = saved !== undefined && saved.cycleId === cycleId && saved.fingerprint === fingerprint;
  const aggregate = new LinearAggregator();
  if (resume) for (const d of saved.digests) aggregate.add(d);

  await target.open(source.sizeBytes, kind, resume);
  const controller = params.adaptive
    ? new WindowController({ levels: params.windowLevels, initial: params.window })
    : undefined;
  return {
    job: disk,
    set,
    chunkSize: params.chunkSize,
    cycleId,
    fingerprint,
    kind,
    extents,
    bytesTotal,
    resumedBytes: resume ? saved.bytesDone : 0,
    tracker: new DiskProgressTracker(
      params.checkpointInterval,
      resume ? { watermark: saved.watermark, bytesDone: saved.bytesDone } : undefined,
      (digest) => aggregate.add(digest),
    ),
    aggregate,
    controller,
    bytesSent: 0,
    bytesAtLastTick: 0,
    saving: undefined,
  };
}

async function allocated(source: DiskSource, signal: AbortSignal): Promise<Extent[]> {
  if (!source.allocatedExtents) return [{ offset: 0, length: source.sizeBytes }];
  const extents: Extent[] = [];
  for await (const e of source.allocatedExtents(signal)) extents.push(e);
  return extents;
}

function planFingerprint(
  kind: CopyKind,
  size: number,
  blockSize: number,
  chunkSize: number,
  extents: readonly Extent[],
): string {
  const numbers = new Float64Array(4 + extents.length * 2);
  numbers.set([kind === 'full' ? 0 : 1, size, blockSize, chunkSize]);
  extents.forEach((e, i) => {
    numbers[4 + 2 * i] = e.offset;
    numbers[5 + 2 * i] = e.length;
  });
  return sha256Hex(new Uint8Array(numbers.buffer));
}

/** The disk's descriptors from its resume point on (cutting is cheap next to sending). */
function* skipDone(run: DiskRun): Generator<Descriptor> {
  const from = run.tracker.watermark;
  for (const d of cutDescriptors(run.extents, { chunkSize: run.chunkSize })) if (d.seq >= from) yield d;
}

/** Grants, runs and completes chunks until every disk is done or one fails. */
async function pump(
  scheduler: Scheduler,
  runs: Map<string, DiskRun>,
  ports: ReplicationPorts & { signal: AbortSignal; tickMs: number },
  abort: AbortController,
  emit: (e: ReplicationEvent) => void,
): Promise<void> {
  const { clock, signal } = ports;
  const retry = ports.retry ?? DEFAULT_RETRY_POLICY;
  const active = new Set<Promise<void>>();
  let failure: unknown;
  let wake: (() => void) | undefined;
  const notify = () => {
    wake?.();
    wake = undefined;
  };
  let nextTick = clock.now() + ports.tickMs;
  let tickTimer: Promise<void> | undefined;

  const fail = (err: unknown) => {
    if (failure === undefined) failure = err;
    abort.abort();
  };

  const runChunk = async (grant: Grant): Promise<void> => {
    const run = runs.get(grant.disk)!;
    const d = grant.descriptor;
    const { source, target } = run.job;
    const deps = { clock, random: ports.random, policy: retry, signal };
    const report = (err: unknown, attempt: number) =>
      emit({ type: 'retry', disk: grant.disk, offset: d.offset, attempt, error: errorMessage(err) });
    // Only the target's failures steer the window: a flaky source is not a congested target.
    const onWriteRetry = (err: unknown, attempt: number) => {
      const throttled = err instanceof TransferError && err.throttled;
      run.controller?.record({
        at: clock.now(),
        bytes: 0,
        latencyMs: 0,
        throttled,
        error: !throttled,
        windowLimited: grant.windowLimited,
        nodePressure: false,
      });
      report(err, attempt);
    };
    const data = await withRetry(() => readChunk(source, d, signal), deps, report);
    const digest = sha256Hex(data);
    let latencyMs = 0;
    await withRetry(
      async () => {
        const t0 = clock.now();
        await target.writeChunk(d, data, digest, signal);
        latencyMs = clock.now() - t0;
      },
      deps,
      onWriteRetry,
    );
    run.bytesSent += d.bytes;
    run.controller?.record({
      at: clock.now(),
      bytes: d.bytes,
      latencyMs,
      throttled: false,
      error: false,
      windowLimited: grant.windowLimited,
      nodePressure: scheduler.stats(grant.disk).budgetLimited,
    });
    if (run.tracker.complete(d.seq, d.bytes, digest)) saveProgress(run);
    scheduler.setLag(grant.disk, run.tracker.lag);
  };

  /** Saves the disk's watermark and the digests below it; resolves to the bytes now durable. */
  const persist = async (run: DiskRun): Promise<number> => {
    const save = run.tracker.pendingSave();
    if (save.appended.length === 0) return save.bytesDone;
    const ids = { cycleId: run.cycleId, fingerprint: run.fingerprint };
    await ports.state.saveProgress(run.set, run.job.id, { ...ids, ...save }, save.appended);
    run.tracker.saved(save);
    return save.bytesDone;
  };

  const saveProgress = (run: DiskRun) => {
    if (run.saving) return;
    run.saving = persist(run)
      .then((bytesDone) => emit({ type: 'checkpoint-saved', disk: run.job.id, bytesDone }))
      .catch(fail)
      .finally(() => {
        run.saving = undefined;
        scheduler.setLag(run.job.id, run.tracker.lag);
        // The watermark may have passed another interval while this save was being written.
        if (failure === undefined && run.tracker.due) saveProgress(run);
        notify();
      });
  };

  const start = (grant: Grant) => {
    const task: Promise<void> = runChunk(grant)
      .then(
        () => scheduler.complete(grant),
        (err) => {
          scheduler.release(grant);
          fail(annotate(err, grant));
        },
      )
      .finally(() => {
        active.delete(task);
        notify();
      });
    active.add(task);
  };

  const tick = () => {
    const now = clock.now();
    const seconds = ports.tickMs / 1000;
    for (const [id, run] of runs) {
      if (run.controller) {
        const decision = run.controller.evaluate(now);
        if (decision.changed) {
          scheduler.setWindow(id, decision.window);
          emit({ type: 'window', disk: id, window: decision.window, reason: decision.reason });
        }
      }
      const completed = run.tracker.bytesCompleted;
      const stats = scheduler.stats(id);
      emit({
        type: 'progress',
        disk: id,
        bytesDone: completed,
        bytesTotal: run.bytesTotal,
        inflight: stats.inflight,
        window: stats.window,
        rate: (completed - run.bytesAtLastTick) / seconds,
      });
      run.bytesAtLastTick = completed;
    }
  };

  try {
    while (failure === undefined) {
      if (signal.aborted) {
        fail(new AbortedError());
        break;
      }
      for (let g = scheduler.next(); g !== undefined; g = scheduler.next()) start(g);
      if (scheduler.allDone) break;
      if (tickTimer === undefined) {
        tickTimer = clock.sleep(Math.max(0, nextTick - clock.now()), signal).then(
          () => {
            tickTimer = undefined;
            nextTick = clock.now() + ports.tickMs;
            tick();
            notify();
          },
          () => {
            tickTimer = undefined;
            notify();
          },
        );
      }
      await new Promise<void>((resolve) => {
        wake = resolve;
      });
    }
  } finally {
    // Let every in-flight chunk settle before deciding anything: no write may land after we return.
    await Promise.allSettled([...active]);
    abort.abort();
    await tickTimer?.catch(() => {});
    // A finished save may chain the next one; wait until none is running.
    for (const run of runs.values()) while (run.saving) await run.saving;
    tick();
  }

  // Durable progress of whatever completed: after a failure a rerun resumes instead of re-sending,
  // and after success a crash during commit resumes with every chunk already done.
  for (const run of runs.values()) await persist(run);
  if (failure !== undefined) throw failure;
}

async function readChunk(source: DiskSource, d: Descriptor, signal: AbortSignal): Promise<Uint8Array> {
  if (d.extents.length === 1) return source.read(d.offset, d.bytes, signal);
  const data = new Uint8Array(d.bytes);
  let at = 0;
  if (source.readInto !== undefined) {
    const reads: Promise<void>[] = [];
    for (const e of d.extents) {
      reads.push(source.readInto(e.offset, data.subarray(at, at + e.length), signal));
      at += e.length;
    }
    await Promise.all(reads);
    return data;
  }
  const parts = await Promise.all(d.extents.map((e) => source.read(e.offset, e.length, signal)));
  for (const part of parts) {
    data.set(part, at);
    at += part.length;
  }
  return data;
}

function annotate(err: unknown, grant: Grant): unknown {
  if (err instanceof FerryError && err.disk !== undefined) return err;
  if (err instanceof AbortedError) return err;
  const d = grant.descriptor;
  return new FerryError(
    `disk ${grant.disk}: chunk ${d.seq} at offset ${d.offset} failed: ${errorMessage(err)}`,
    {
      disk: grant.disk,
      offset: d.offset,
      seq: d.seq,
      cause: err,
    },
  );
}
