// One replication cycle of a set of disks: plan descriptors, stream chunks under rolling windows
// and the node budget, verify, make progress durable, commit every disk, publish one checkpoint.
import { chunkAggregate } from './aggregate.ts';
import type { ReplicationParams } from './config.ts';
import { WindowController } from './controller.ts';
import { cutDescriptors, type Descriptor, normalizeExtents } from './descriptors.ts';
import {
  AbortedError,
  CatalogError,
  ConfigError,
  errorMessage,
  FerryError,
  IntegrityError,
  TransferError,
} from './errors.ts';
import type { Extent } from './extents.ts';
import { LinearAggregator, sha256Hex } from './integrity.ts';
import type {
  CheckpointDisk,
  Clock,
  CommitJournal,
  CopyKind,
  DiskAggregate,
  DiskSource,
  DiskTarget,
  PublishedCheckpoint,
  Random,
  RecoveryCheckpoint,
  ResumeClaim,
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
  | { type: 'published'; checkpoint: RecoveryCheckpoint }
  /** A resume was refused: the target no longer holds what the progress record vouched for. */
  | { type: 'resume-refused'; disk: string; reason: string }
  /** An interrupted commit of an earlier run was rolled back, or its clean-up finished. */
  | {
      type: 'recovered';
      cycleId: string;
      action: 'rolled-back' | 'completed';
      /** Disks whose targets were rolled back (or cleaned up). */
      disks: number;
      /** Disks whose targets cannot roll back (they commit elsewhere, e.g. on a node). */
      unsupported: string[];
    }
  | { type: 'rolled-back'; cycleId: string; reason: string };

/**
 * Named points of a cycle, reported to `ReplicationPorts.step` as the cycle passes them; the local
 * runner's fault-injection hook kills the process at one of them to test crash recovery.
 */
export type CycleStep = 'planned' | 'mid-transfer' | `commit:${number}` | 'before-publish' | 'after-publish';

export interface ReplicationPorts {
  readonly clock: Clock;
  readonly random: Random;
  readonly state: StateStore;
  /**
   * Makes a set's commit atomic across its disks when targets change data in place: without it a
   * crash between two disks' commits leaves the previous checkpoint unverifiable until a rerun.
   */
  readonly journal?: CommitJournal;
  /** Reopens a target by name, to recover an interrupted commit of disks not in this job. */
  readonly reopenTarget?: (disk: string, target: string) => DiskTarget | undefined;
  /** Told each named point of the cycle as it is passed (fault injection in tests). */
  readonly step?: (step: CycleStep) => void | Promise<void>;
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
  /** The checkpoint's aggregate for the disk (`ferry-chunk-sha256`). */
  readonly aggregate: DiskAggregate;
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

  try {
    checkDistinctTargets(job);
    // An earlier run that crashed between committing its disks and publishing (or cleaning up) left a
    // commit intent: finish or undo it first, so this cycle starts from a published checkpoint.
    const jobTargets = new Map(job.disks.map((d) => [d.id, d.target]));
    await recoverCommit(job.set, {
      ...ports,
      reopenTarget: (disk, target) =>
        jobTargets.get(disk)?.name === target ? jobTargets.get(disk) : ports.reopenTarget?.(disk, target),
    });
    const { previous, sequence } = await cycleBase(job, state);
    const cycleId = `${job.set}#${sequence}`;
    const scheduler = new Scheduler(params.nodeBudget);
    const runs = new Map<string, DiskRun>();
    const step = async (name: CycleStep) => ports.step?.(name);

    // Disks are planned at once: each plan waits on round trips (block status, opening the target),
    // and over a long link four disks planned one after another would start four times later.
    const planned = await settleAll(
      job.disks.map((disk) => planDisk(disk, job.set, cycleId, params, state, signal, emit)),
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

    await step('planned');
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
    // The set commits as one: the intent is durable before any target touches the previous
    // checkpoint's data, and any failure before publication rolls every disk back to it.
    const targets = [...runs.values()].map((run) => ({ disk: run.job.id, target: run.job.target }));
    await ports.journal?.begin({
      set: job.set,
      cycleId,
      disks: targets.map((t) => ({ disk: t.disk, target: t.target.name })),
    });
    let checkpoint: RecoveryCheckpoint | undefined;
    let disks: CheckpointDisk[] = [];
    try {
      // Targets commit at once, as they planned: a commit is round trips too (a node, a snapshot).
      disks = await settleAll(
        [...runs.values()].map(async (run, index): Promise<CheckpointDisk> => {
          const done = run.tracker.bytesDone;
          const aggregateSha256 = run.aggregate.hex();
          const chunks = run.tracker.watermark;
          const targetRef = await run.job.target
            .commit({ chunks, bytes: done, aggregateSha256, extents: run.extents })
            .catch((err: unknown) => {
              throw inDisk(run.job, 'commit', err);
            });
          await step(`commit:${index}`);
          return {
            disk: run.job.id,
            source: run.job.source.name,
            target: run.job.target.name,
            sizeBytes: run.job.source.sizeBytes,
            kind: run.kind,
            chunks,
            bytes: done,
            aggregate: chunkAggregate(aggregateSha256),
            ...(targetRef === undefined ? {} : { targetRef }),
          };
        }),
      );
      checkpoint = {
        id: cycleId,
        set: job.set,
        sequence,
        createdAt: new Date(clock.now()).toISOString(),
        parent: previous?.id,
        disks,
      };
      await step('before-publish');
      await state.publishCheckpoint(checkpoint);
    } catch (err) {
      if ((await undoCommit(job.set, cycleId, targets, { ...ports, emit }, err)) !== 'published') throw err;
    }
    if (checkpoint === undefined) throw new FerryError(`${cycleId}: published without a checkpoint record`);
    for (const d of disks) emit({ type: 'disk-done', disk: d.disk, bytes: d.bytes, chunks: d.chunks });
    emit({ type: 'published', checkpoint });
    await step('after-publish');
    await finishCommit(job.set, targets, { ...ports }, checkpoint);

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
        aggregate: disks[i]!.aggregate,
      })),
    };
  } finally {
    ports.signal?.removeEventListener('abort', onOuterAbort);
  }
}

/** Two disks on one target would overwrite each other; a source that is its own target, itself. */
function checkDistinctTargets(job: ReplicationJob): void {
  const seen = new Map<string, string>();
  for (const d of job.disks) {
    const other = seen.get(d.target.name);
    if (other !== undefined) {
      throw new ConfigError(`disks ${other} and ${d.id} have the same target ${d.target.name}`, {
        disk: d.id,
        setting: 'target',
      });
    }
    seen.set(d.target.name, d.id);
  }
  for (const d of job.disks) {
    const owner = seen.get(d.source.name);
    if (owner !== undefined) {
      throw new ConfigError(
        owner === d.id
          ? `disk ${d.id}: source and target are the same (${d.source.name})`
          : `disk ${d.id}: its source ${d.source.name} is the target of disk ${owner}`,
        { disk: d.id, setting: 'source' },
      );
    }
  }
}

/**
 * The checkpoint this cycle builds on and the sequence it will publish as. A damaged latest catalog
 * entry is no base for an increment (its images moved on without a readable record); full copies
 * of every disk need no base and take the next sequence after it.
 */
async function cycleBase(
  job: ReplicationJob,
  state: StateStore,
): Promise<{ previous: RecoveryCheckpoint | undefined; sequence: number }> {
  try {
    const previous = await state.latestCheckpoint(job.set);
    return { previous, sequence: (previous?.sequence ?? 0) + 1 };
  } catch (err) {
    if (!(err instanceof CatalogError) || err.sequence === undefined) throw err;
    const incremental = job.disks.filter((d) => d.changed !== undefined).map((d) => d.id);
    if (incremental.length > 0) {
      throw new CatalogError(
        `${err.message}. It is the latest checkpoint of set ${job.set}, the base of an incremental ` +
          `cycle (disks ${incremental.join(', ')}): restore the file from a backup, or run a full copy ` +
          `of every disk (without change maps) to start checkpoint #${err.sequence + 1}`,
        { path: err.path, sequence: err.sequence, cause: err },
      );
    }
    return { previous: undefined, sequence: err.sequence + 1 };
  }
}

type CommitPorts = Pick<ReplicationPorts, 'state' | 'journal' | 'reopenTarget' | 'onEvent'>;

/**
 * Finishes what a crashed run left between committing a set and cleaning up after publication:
 * rolls every target back when the cycle was not published, or completes the clean-up when it
 * was. Idempotent; a no-op without a journal or an intent. `ferry verify` calls it too, so the
 * checkpoint it checks is the one the images hold.
 */
export async function recoverCommit(set: string, ports: CommitPorts): Promise<void> {
  const intent = await ports.journal?.load(set);
  if (intent === undefined) return;
  const targets = intent.disks.map(({ disk, target }) => {
    const t = ports.reopenTarget?.(disk, target);
    if (t === undefined) {
      throw new FerryError(
        `set ${set}: the commit of ${intent.cycleId} was interrupted, and disk ${disk}'s target ${target} ` +
          'cannot be reopened here to finish it; run the same job again',
        { disk },
      );
    }
    return { disk, target: t };
  });
  const latest = await ports.state.latestCheckpoint(set);
  const published = latest?.id === intent.cycleId;
  const able = targets.filter(
    ({ target }) => (published ? target.afterPublish : target.rollback) !== undefined,
  );
  const unsupported = targets.filter((t) => !able.includes(t)).map((t) => t.disk);
  if (published) await finishCommit(set, targets, ports, latest);
  else {
    for (const { target } of able) await target.rollback?.();
    await ports.journal?.clear(set);
  }
  ports.onEvent?.({
    type: 'recovered',
    cycleId: intent.cycleId,
    action: published ? 'completed' : 'rolled-back',
    disks: able.length,
    unsupported,
  });
}

/**
 * After publication: targets drop their staging and undo data (or keep it as `published`'s
 * history), progress goes, then the intent.
 */
async function finishCommit(
  set: string,
  targets: readonly { disk: string; target: DiskTarget }[],
  ports: CommitPorts,
  published: PublishedCheckpoint,
): Promise<void> {
  for (const { disk, target } of targets) {
    await target.afterPublish?.({ id: published.id, sequence: published.sequence });
    await ports.state.clearProgress(set, disk);
  }
  await ports.journal?.clear(set);
}

/**
 * A commit or the publication failed: put every disk back to the previous checkpoint. The
 * publication may in fact have happened (an error after the entry was written): look before undoing,
 * and say so, since a published cycle is finished, not undone.
 * A rollback that fails leaves the intent, so the next run (or `ferry verify`) tries again.
 */
async function undoCommit(
  set: string,
  cycleId: string,
  targets: readonly { disk: string; target: DiskTarget }[],
  ports: CommitPorts & { emit: (e: ReplicationEvent) => void },
  cause: unknown,
): Promise<'published' | 'rolled-back'> {
  try {
    const latest = await ports.state.latestCheckpoint(set).catch(() => undefined);
    if (latest?.id === cycleId) return 'published';
    for (const { target } of targets) await target.rollback?.();
    await ports.journal?.clear(set);
    ports.emit({ type: 'rolled-back', cycleId, reason: errorMessage(cause) });
    return 'rolled-back';
  } catch (err) {
    throw new FerryError(
      `${errorMessage(cause)}; rolling the set back to its previous checkpoint failed too (${errorMessage(err)}): ` +
        'the next ferry replicate or verify on this state directory rolls it back again',
      { cause: err },
    );
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
  emit: (e: ReplicationEvent) => void,
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

  // A damaged progress record is no reason to fail: the cycle starts over from the last checkpoint.
  let saved = await state.loadProgress(set, disk.id).catch((err: unknown) => {
    emit({ type: 'resume-refused', disk: disk.id, reason: errorMessage(err) });
    return undefined;
  });
  if (saved !== undefined && (saved.cycleId !== cycleId || saved.fingerprint !== fingerprint)) {
    saved = undefined; // another cycle's or another plan's progress: never resumed
  }
  if (saved !== undefined && target.checkResume !== undefined) {
    // Skipping chunks is a claim that the target holds them: let the target prove it, or start over.
    const reason = await target.checkResume(
      resumeClaim(cycleId, extents, params.chunkSize, saved.digests),
      signal,
    );
    if (reason !== undefined) {
      emit({ type: 'resume-refused', disk: disk.id, reason });
      saved = undefined;
    }
  }
  // Progress that is not resumed must not survive: the next save would extend its digests.
  if (saved === undefined) await state.clearProgress(set, disk.id);
  const resume = saved !== undefined;
  const aggregate = new LinearAggregator();
  if (saved !== undefined) for (const d of saved.digests) aggregate.add(d);

  await target.open(source.sizeBytes, kind, resume, cycleId).catch((err: unknown) => {
    throw inDisk(disk, 'open', err);
  });
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
    resumedBytes: saved?.bytesDone ?? 0,
    tracker: new DiskProgressTracker(
      params.checkpointInterval,
      saved === undefined ? undefined : { watermark: saved.watermark, bytesDone: saved.bytesDone },
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

/** The chunks a resume would skip, each with the digest the progress record holds for it. */
function resumeClaim(
  cycleId: string,
  extents: readonly Extent[],
  chunkSize: number,
  digests: readonly string[],
): ResumeClaim {
  const chunks: { descriptor: Descriptor; sha256: string }[] = [];
  for (const descriptor of cutDescriptors(extents, { chunkSize })) {
    const sha256 = digests[descriptor.seq];
    if (sha256 === undefined) break;
    chunks.push({ descriptor, sha256 });
  }
  return { cycleId, chunks };
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
    // Data before the record that vouches for it: every chunk below this watermark has resolved its
    // write, so after the flush a power loss cannot take back what the record says is done.
    await run.job.target.flush?.();
    await ports.state.saveProgress(run.set, run.job.id, { ...ids, ...save }, save.appended);
    run.tracker.saved(save);
    await ports.step?.('mid-transfer');
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

/** A target's failure outside a chunk (opening, committing), with the disk and target named. */
function inDisk(disk: DiskJob, what: string, err: unknown): unknown {
  if ((err instanceof FerryError && err.disk !== undefined) || err instanceof AbortedError) return err;
  return new FerryError(
    `disk ${disk.id}: ${what} of target ${disk.target.name} failed: ${errorMessage(err)}`,
    {
      disk: disk.id,
      cause: err,
    },
  );
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
