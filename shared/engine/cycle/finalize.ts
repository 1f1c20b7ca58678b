// finalize (validate, CompleteSnapshot, publish once, announce) and abort (publish nothing).
import { aggregateProblem, ebsLinearAggregate } from '../aggregate.ts';
import { errorMessage } from '../errors.ts';
import type { CheckpointDisk, Clock, RecoveryCheckpoint } from '../ports.ts';
import { GiB } from '../units.ts';
import { CycleFailedError, CycleStateError, PlanLockLostError } from './errors.ts';
import type {
  CycleCatalog,
  CycleDiskRecord,
  CycleLedger,
  CycleRecord,
  EventPublisher,
  GrantFlow,
  JobStatus,
  Log,
  Meter,
  NodeBudget,
  PlanLocks,
  SnapshotWriter,
} from './ports.ts';
import { iso } from './prepare.ts';
import { budgetHolderOf } from './tick.ts';
import type { AbortResult, CycleRef, FinalizeResult } from './types.ts';
import { type DiskValidation, validateDisk } from './validation.ts';

export const EVENT_SOURCE = 'ferry';
export const CHECKPOINT_PUBLISHED = 'Ferry Checkpoint Published';
// Longest wait for snapshots in one invocation: a Lambda lives at most 15 minutes.
const MAX_WAIT_MS = 15 * 60 * 1000;

export interface FinalizeDeps {
  readonly ledger: Pick<
    CycleLedger,
    | 'getCycle'
    | 'updateCycle'
    | 'recordFailure'
    | 'getDisk'
    | 'updateDisk'
    | 'listCompletions'
    | 'getDescriptorPage'
  >;
  readonly flow: Pick<GrantFlow, 'control'>;
  readonly locks: Pick<PlanLocks, 'renew' | 'release'>;
  readonly budget: Pick<NodeBudget, 'release'>;
  readonly catalog: Pick<
    CycleCatalog,
    'getJob' | 'updateJobStatus' | 'latestCheckpoint' | 'listCheckpoints' | 'publishCheckpoint'
  >;
  readonly writer: Pick<SnapshotWriter, 'completeSnapshot' | 'waitForCompletion'>;
  readonly events: EventPublisher;
  readonly clock: Clock;
  readonly log: Log;
  readonly meter: Meter;
  readonly nodeId: string;
  readonly lockMs: number;
  /** Milliseconds left in this invocation; waiting for snapshots stops `marginMs` before. */
  readonly remainingMs: () => number;
  readonly marginMs: number;
}

/** A checkpoint id is unique across sets (the catalog's id claim is global). */
export const checkpointIdOf = (set: string, cycleId: string): string => `${set}/${cycleId}`;

/** Seconds from the point in time the checkpoint's data was taken (at the latest) to `now`. */
export function checkpointAgeSeconds(
  cycle: Pick<CycleRecord, 'startedAt' | 'createdAt'>,
  now: number,
): number {
  return Math.max(0, Math.round((now - (cycle.startedAt ?? cycle.createdAt)) / 1000));
}

const hex = (digest: Uint8Array): string => Buffer.from(digest).toString('hex');

async function loadCycle(deps: FinalizeDeps, ref: CycleRef) {
  const { set, cycleId } = ref;
  const cycle = await deps.ledger.getCycle(set, cycleId);
  if (cycle === undefined) {
    throw new CycleStateError(`cycle ${cycleId} of set ${set} does not exist`, {
      plan: ref.plan,
      set,
      cycleId,
    });
  }
  const disks: CycleDiskRecord[] = [];
  for (const disk of cycle.disks) {
    const rec = await deps.ledger.getDisk(set, disk, cycleId);
    if (rec === undefined) {
      throw new CycleStateError(`disk ${disk} of cycle ${cycleId} has no record`, { set, cycleId, disk });
    }
    disks.push(rec);
  }
  return { cycle, disks };
}

/**
 * Finalizes a cycle: closes every flow (writers then write nothing new), validates every disk,
 * completes its target snapshot with the LINEAR aggregate, publishes the checkpoint, announces it,
 * gives the node reservation and the plan lock back. Idempotent: a repeated call after a crash
 * resumes where the last one stopped (CompleteSnapshot is not sent twice, the checkpoint is published
 * once, the event is sent at least once). Answers `completing` while target snapshots are still
 * sealing: call again after a wait.
 */
export async function finalize(deps: FinalizeDeps, ref: CycleRef): Promise<FinalizeResult> {
  const { ledger } = deps;
  const { plan, set, cycleId } = ref;
  const ctx = { plan, set, cycleId };
  let { cycle, disks } = await loadCycle(deps, ref);
  if (cycle.state === 'published') return publishedResult(cycle, disks, await validateAll(deps, disks));
  if (cycle.state === 'aborted') {
    throw new CycleStateError(`cycle ${cycleId} of set ${set} was aborted; it cannot be finalized`, ctx);
  }
  if (cycle.failure !== undefined) {
    throw new CycleFailedError(`cycle ${cycleId} of set ${set} failed: ${cycle.failure}`, ctx);
  }
  if ((await deps.locks.renew(plan, ref.lockOwner, deps.lockMs, deps.clock.now())) === undefined) {
    throw new PlanLockLostError(
      `plan ${plan} lock is no longer held by ${ref.lockOwner}; not publishing`,
      ctx,
    );
  }

  // From here on writers acknowledge stray grants without writing: the snapshots are being sealed.
  if (cycle.state === 'active') {
    cycle = (await ledger.updateCycle(set, cycleId, { state: 'finalizing' }, ['active'])) ?? cycle;
    await moveJob(deps, set, cycleId, 'finalizing');
  }
  // Closed with no allowance: the node reservation behind it is given back below.
  for (const d of disks)
    await deps.flow.control({ set, disk: d.disk, cycleId }, { open: false, allowance: 0 });
  disks = await Promise.all(
    disks.map(async (d) =>
      d.state === 'active'
        ? ((await ledger.updateDisk(set, d.disk, cycleId, { state: 'finalizing' }, { state: 'active' })) ?? d)
        : d,
    ),
  );

  const validated = await validateAll(deps, disks);
  for (const d of disks) {
    if (d.completeRequested === true) continue;
    const v = validated.get(d.disk)!;
    await deps.writer.completeSnapshot({
      disk: d.disk,
      snapshotId: d.targetSnapshotId,
      changedBlocksCount: v.blocks,
      aggregateChecksum: Buffer.from(v.aggregate).toString('base64'),
    });
    await ledger.updateDisk(set, d.disk, cycleId, { completeRequested: true });
    deps.log.info('target snapshot completion requested', {
      disk: d.disk,
      snapshotId: d.targetSnapshotId,
      changedBlocksCount: v.blocks,
    });
  }

  const pending = await waitForSnapshots(deps, disks);
  if (pending.length > 0) return { status: 'completing', pending };

  const latest = await deps.catalog.latestCheckpoint(set);
  const checkpoint: RecoveryCheckpoint = {
    id: checkpointIdOf(set, cycleId),
    set,
    sequence: cycle.sequence,
    createdAt: iso(deps.clock.now()),
    parent: cycle.parentCheckpointId,
    disks: disks.map((d): CheckpointDisk => {
      const v = validated.get(d.disk)!;
      return {
        disk: d.disk,
        source: d.sourceSnapshotId,
        target: d.targetSnapshotId,
        sizeBytes: d.volumeSizeGiB * GiB,
        kind: d.kind,
        chunks: v.descriptors,
        bytes: v.bytes,
        // The same digest CompleteSnapshot was sent (base64 there), named by its algorithm.
        aggregate: ebsLinearAggregate(v.aggregate),
        targetRef: d.targetSnapshotId,
      };
    }),
  };
  if (latest !== undefined && latest.id !== checkpoint.id && latest.sequence >= cycle.sequence) {
    throw new CycleFailedError(
      `checkpoint ${latest.id} (sequence ${latest.sequence}) was published after this cycle was prepared; not publishing ${checkpoint.id}`,
      ctx,
    );
  }
  await publishOnce(deps, checkpoint);
  const published =
    (await ledger.updateCycle(set, cycleId, { state: 'published', checkpointId: checkpoint.id }, [
      'finalizing',
    ])) ??
    (await ledger.getCycle(set, cycleId)) ??
    cycle;
  for (const d of disks) await ledger.updateDisk(set, d.disk, cycleId, { state: 'published' });
  await moveJob(deps, set, cycleId, 'published', { checkpointId: checkpoint.id });
  deps.meter.add('CheckpointsPublished', 'Count', 1);
  // The RPO alarm's metric: how old this checkpoint's data is as it becomes current, per plan.
  deps.meter.add('CheckpointAgeSeconds', 'Seconds', checkpointAgeSeconds(cycle, deps.clock.now()), { plan });
  deps.log.info('recovery checkpoint published', {
    ...ctx,
    checkpointId: checkpoint.id,
    sequence: cycle.sequence,
  });

  if (published.eventSent !== true) {
    await deps.events.publish({
      source: EVENT_SOURCE,
      detailType: CHECKPOINT_PUBLISHED,
      detail: {
        plan,
        set,
        cycleId,
        checkpointId: checkpoint.id,
        sequence: checkpoint.sequence,
        parent: checkpoint.parent ?? null,
        createdAt: checkpoint.createdAt,
        disks: checkpoint.disks.map((d) => ({
          disk: d.disk,
          kind: d.kind,
          sourceSnapshotId: d.source,
          targetSnapshotId: d.target,
          bytes: d.bytes,
        })),
      },
    });
    await ledger.updateCycle(set, cycleId, { eventSent: true });
  }
  await deps.budget.release(deps.nodeId, budgetHolderOf(set, cycleId));
  await deps.locks.release(plan, ref.lockOwner);
  return publishedResult(published, disks, validated);
}

async function validateAll(deps: FinalizeDeps, disks: readonly CycleDiskRecord[]) {
  const out = new Map<string, DiskValidation>();
  for (const d of disks) out.set(d.disk, await validateDisk(deps.ledger, d));
  return out;
}

function publishedResult(
  cycle: CycleRecord,
  disks: readonly CycleDiskRecord[],
  validated: Map<string, DiskValidation>,
): FinalizeResult {
  return {
    status: 'published',
    checkpointId: cycle.checkpointId ?? checkpointIdOf(cycle.set, cycle.cycleId),
    sequence: cycle.sequence,
    disks: disks.map((d) => {
      const v = validated.get(d.disk)!;
      return {
        disk: d.disk,
        kind: d.kind,
        sourceSnapshotId: d.sourceSnapshotId,
        targetSnapshotId: d.targetSnapshotId,
        descriptors: v.descriptors,
        blocks: v.blocks,
        bytes: v.bytes,
        aggregateSha256: hex(v.aggregate),
      };
    }),
  };
}

/** Waits for every target snapshot within this invocation's time; returns the ones still pending. */
async function waitForSnapshots(deps: FinalizeDeps, disks: readonly CycleDiskRecord[]): Promise<string[]> {
  const budget = Math.min(MAX_WAIT_MS, Math.max(1, deps.remainingMs() - deps.marginMs));
  const timeout = new AbortController();
  const done = new AbortController();
  deps.clock.sleep(budget, done.signal).then(
    () => timeout.abort(),
    () => undefined,
  );
  try {
    const statuses = await Promise.all(
      disks.map(async (d) => ({
        d,
        status: await deps.writer.waitForCompletion({
          disk: d.disk,
          snapshotId: d.targetSnapshotId,
          signal: timeout.signal,
        }),
      })),
    );
    const failed = statuses.filter((s) => s.status === 'error');
    if (failed.length > 0) {
      const names = failed.map((s) => `${s.d.disk} (${s.d.targetSnapshotId})`).join(', ');
      throw new CycleFailedError(`target snapshot(s) ended in error: ${names}`, {
        set: disks[0]?.set,
        cycleId: disks[0]?.cycleId,
      });
    }
    return statuses.filter((s) => s.status === 'pending').map((s) => s.d.disk);
  } finally {
    done.abort();
  }
}

/**
 * Publishes exactly once; a retry after a crash finds its own checkpoint and carries on. An entry
 * with this id and sequence is ours only if it records, for every disk, the LINEAR aggregate this
 * validation computed, compared by the algorithm it names.
 */
async function publishOnce(deps: FinalizeDeps, checkpoint: RecoveryCheckpoint): Promise<void> {
  try {
    await deps.catalog.publishCheckpoint(checkpoint);
  } catch (err) {
    // The catalog rejects an existing id or sequence with its own error: look for our own.
    const mine = (await deps.catalog.listCheckpoints(checkpoint.set)).find(
      (c) => c.id === checkpoint.id && c.sequence === checkpoint.sequence,
    );
    if (mine === undefined) throw err;
    for (const d of checkpoint.disks) {
      const recorded = mine.disks.find((r) => r.disk === d.disk);
      const check = { checkpoint: checkpoint.id, disk: d.disk, verifier: 'the finalizer' };
      const problem =
        recorded === undefined
          ? `checkpoint ${checkpoint.id} is published without disk ${d.disk}`
          : aggregateProblem(check, recorded.aggregate, d.aggregate);
      if (problem !== undefined) {
        throw new CycleFailedError(`${problem}: it is not this cycle's publication`, {
          set: checkpoint.set,
          disk: d.disk,
        });
      }
    }
    deps.log.info('checkpoint was already published by an earlier attempt', { checkpointId: checkpoint.id });
  }
}

const TERMINAL_JOB: readonly JobStatus[] = ['published', 'failed', 'abandoned'];

/** Moves the job forward from wherever it is (a retried call may find it moved already). */
async function moveJob(
  deps: Pick<FinalizeDeps, 'catalog' | 'clock'>,
  set: string,
  cycleId: string,
  to: JobStatus,
  extra: { checkpointId?: string; error?: string } = {},
): Promise<void> {
  const job = await deps.catalog.getJob(set, cycleId);
  if (job === undefined || job.status === to || TERMINAL_JOB.includes(job.status)) return;
  try {
    await deps.catalog.updateJobStatus(set, cycleId, job.status, to, iso(deps.clock.now()), extra);
  } catch (err) {
    // Someone moved it first: fine if it is where we wanted it or further.
    const now = await deps.catalog.getJob(set, cycleId);
    if (now === undefined || (now.status !== to && !TERMINAL_JOB.includes(now.status))) throw err;
  }
}

/**
 * Ends a failed cycle: publishes nothing, marks the cycle, its disks and its job failed, closes its
 * flows (writers then acknowledge its grants without writing), gives back its node reservation and
 * the plan lock. The last good checkpoint stays current. Idempotent.
 */
export async function abort(deps: FinalizeDeps, ref: CycleRef, reason: string): Promise<AbortResult> {
  const { ledger } = deps;
  const { plan, set, cycleId } = ref;
  const cycle = await ledger.getCycle(set, cycleId);
  if (cycle?.state === 'published') {
    throw new CycleStateError(
      `cycle ${cycleId} of set ${set} is already published; there is nothing to abort`,
      {
        plan,
        set,
        cycleId,
      },
    );
  }
  if (cycle !== undefined) {
    await ledger.recordFailure(set, cycleId, reason);
    await ledger.updateCycle(set, cycleId, { state: 'aborted' }, ['active', 'finalizing']);
    for (const disk of cycle.disks) {
      const rec = await ledger.getDisk(set, disk, cycleId);
      if (rec === undefined) continue;
      // A prepare that stopped between the disk record and its flow leaves no flow to close.
      await deps.flow.control({ set, disk, cycleId }, { open: false, allowance: 0 }).catch((err: unknown) => {
        deps.log.warn('flow not closed', { disk, error: errorMessage(err) });
      });
      if (rec.state !== 'aborted') await ledger.updateDisk(set, disk, cycleId, { state: 'aborted' });
    }
  }
  await moveJob(deps, set, cycleId, 'failed', { error: reason.slice(0, 2000) });
  await deps.budget.release(deps.nodeId, budgetHolderOf(set, cycleId));
  // Conditional on the owner: an abort after a refused prepare never frees another cycle's lock.
  await deps.locks.release(plan, ref.lockOwner).catch((err: unknown) => {
    deps.log.warn('plan lock not released', { plan, error: errorMessage(err) });
  });
  const current = await deps.catalog.latestCheckpoint(set);
  deps.meter.add('CyclesAborted', 'Count', 1);
  deps.log.error('cycle aborted; nothing published', {
    plan,
    set,
    cycleId,
    reason,
    currentCheckpointId: current?.id,
  });
  return current === undefined
    ? { status: 'aborted', reason }
    : { status: 'aborted', reason, currentCheckpointId: current.id };
}
