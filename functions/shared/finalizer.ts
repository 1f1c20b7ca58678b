// The finalizer: `finalize` validates every disk, completes its target snapshot, publishes the
// recovery checkpoint exactly once and announces it; `abort` ends a failed cycle publishing nothing,
// so the last good checkpoint stays current. Both release the plan lock.
import type { DynamoGrants, DynamoPlanLocks } from '../../shared/aws/dynamo/budget.ts';
import { StateConflictError } from '../../shared/aws/dynamo/errors.ts';
import type { JobStatus } from '../../shared/aws/dynamo/schema.ts';
import type { DynamoStateStore } from '../../shared/aws/dynamo/state-store.ts';
import { aggregateProblem, ebsLinearAggregate } from '../../shared/engine/aggregate.ts';
import { errorMessage } from '../../shared/engine/errors.ts';
import type { CheckpointDisk, RecoveryCheckpoint } from '../../shared/engine/ports.ts';
import type { AbortResult, CycleRef, FinalizeResult } from '../contracts.ts';
import { validateDisk } from './completions.ts';
import type { CycleDiskRecord, CycleRecord, CycleStore } from './cycle-store.ts';
import { CycleFailedError, CycleStateError, PlanLockLostError } from './errors.ts';
import { parseLeaseId } from './granting.ts';
import type { EventPublisher, Log, Meter, Now, SnapshotWriter } from './ports.ts';

export const EVENT_SOURCE = 'ferry';
// Longest wait for snapshots in one invocation: a Lambda lives at most 15 minutes.
const MAX_WAIT_MS = 15 * 60 * 1000;
export const CHECKPOINT_PUBLISHED = 'Ferry Checkpoint Published';

export interface FinalizerDeps {
  readonly store: CycleStore;
  readonly grants: DynamoGrants;
  readonly state: DynamoStateStore;
  readonly locks: DynamoPlanLocks;
  readonly writer: Pick<SnapshotWriter, 'completeSnapshot' | 'waitForCompletion'>;
  readonly events: EventPublisher;
  readonly now: Now;
  readonly log: Log;
  readonly meter: Meter;
  readonly lockMs: number;
  /** Milliseconds left in this invocation; waiting for snapshots stops `marginMs` before. */
  readonly remainingMs: () => number;
  readonly marginMs: number;
}

/** A checkpoint id is unique across sets (the catalog's id claim is global). */
export const checkpointIdOf = (set: string, cycleId: string): string => `${set}/${cycleId}`;

const iso = (ms: number): string => new Date(ms).toISOString();

/**
 * Finalizes a cycle. Idempotent: a repeated call after a crash resumes where the last one stopped
 * (CompleteSnapshot is not sent twice, the checkpoint is published once, the event is sent at least
 * once). Answers `completing` while target snapshots are still sealing: call again after a wait.
 */
export async function finalize(deps: FinalizerDeps, ref: CycleRef): Promise<FinalizeResult> {
  const { store } = deps;
  const { plan, set, cycleId } = ref;
  const ctx = { plan, set, cycleId };
  const cycle = await store.requireCycle(set, cycleId);
  const disks = await Promise.all(cycle.disks.map((disk) => store.requireCycleDisk(set, disk, cycleId)));
  if (cycle.state === 'published') return publishedResult(cycle, disks, await validateAll(deps, disks));
  if (cycle.state === 'aborted') {
    throw new CycleStateError(`cycle ${cycleId} of set ${set} was aborted; it cannot be finalized`, ctx);
  }
  if (cycle.failure !== undefined) {
    throw new CycleFailedError(`cycle ${cycleId} of set ${set} failed: ${cycle.failure}`, ctx);
  }
  if ((await deps.locks.renewPlanLock(plan, ref.lockOwner, deps.lockMs, deps.now())) === undefined) {
    throw new PlanLockLostError(
      `plan ${plan} lock is no longer held by ${ref.lockOwner}; not publishing`,
      ctx,
    );
  }

  // From here on writers acknowledge stray grants without writing: the snapshots are being sealed.
  if (cycle.state === 'active') {
    await store.setCycleState(set, cycleId, ['active'], 'finalizing');
    await moveJob(deps, set, cycleId, 'finalizing');
  }
  for (const d of disks)
    if (d.state === 'active') await store.setDiskState(set, d.disk, cycleId, 'finalizing');

  const validated = await validateAll(deps, disks);
  for (const d of disks) {
    if (d.completeRequested) continue;
    const v = validated.get(d.disk)!;
    await deps.writer.completeSnapshot({
      disk: d.disk,
      snapshotId: d.targetSnapshotId,
      changedBlocksCount: v.blocks,
      aggregateChecksum: v.aggregate.toString('base64'),
    });
    await store.markCompleteRequested(set, d.disk, cycleId);
    deps.log.info('target snapshot completion requested', {
      disk: d.disk,
      snapshotId: d.targetSnapshotId,
      changedBlocksCount: v.blocks,
    });
  }

  const pending = await waitForSnapshots(deps, disks);
  if (pending.length > 0) return { status: 'completing', pending };

  const latest = await deps.state.latestCheckpoint(set);
  const checkpoint: RecoveryCheckpoint = {
    id: checkpointIdOf(set, cycleId),
    set,
    sequence: cycle.sequence,
    createdAt: iso(deps.now()),
    parent: cycle.parentCheckpointId,
    disks: disks.map((d): CheckpointDisk => {
      const v = validated.get(d.disk)!;
      return {
        disk: d.disk,
        source: d.sourceSnapshotId,
        target: d.targetSnapshotId,
        sizeBytes: d.volumeSizeGiB * 1024 * 1024 * 1024,
        kind: d.kind,
        chunks: v.descriptors,
        bytes: v.bytes,
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
  await store.setCycleState(set, cycleId, ['finalizing'], 'published', { checkpointId: checkpoint.id });
  for (const d of disks) await store.setDiskState(set, d.disk, cycleId, 'published');
  await moveJob(deps, set, cycleId, 'published', { checkpointId: checkpoint.id });
  deps.meter.add('CheckpointsPublished', 'Count', 1);
  // The RPO alarm's metric (infra CHECKPOINT_AGE_METRIC): how old this checkpoint's data is as it
  // becomes current, per plan. Measured from the execution's start (before the source snapshots were
  // taken) where the state machine passed it, so it never understates the age; else from prepare.
  deps.meter.add('CheckpointAgeSeconds', 'Seconds', checkpointAgeSeconds(cycle, deps.now()), { plan });
  deps.log.info('recovery checkpoint published', {
    ...ctx,
    checkpointId: checkpoint.id,
    sequence: cycle.sequence,
  });

  const published = await store.requireCycle(set, cycleId);
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
    await store.markEventSent(set, cycleId);
  }
  await releaseCycleLeases(deps, set, cycleId, cycle.disks);
  await deps.locks.releasePlanLock(plan, ref.lockOwner);
  return publishedResult(published, disks, validated);
}

/** Seconds from the point in time the checkpoint's data was taken (at the latest) to `now`. */
export function checkpointAgeSeconds(
  cycle: Pick<CycleRecord, 'startedAt' | 'createdAt'>,
  now: number,
): number {
  return Math.max(0, Math.round((now - (cycle.startedAt ?? cycle.createdAt)) / 1000));
}

/**
 * Returns the bytes of this cycle's leases still held when it ends (re-grants of chunks that were
 * already written, grants of an aborted cycle): the node budget is shared with other plans, and
 * they should not wait for these leases to expire.
 */
async function releaseCycleLeases(
  deps: FinalizerDeps,
  set: string,
  cycleId: string,
  disks: readonly string[],
) {
  let released = 0;
  for (const disk of disks) {
    for (const lease of await deps.store.listLeases(set, disk)) {
      if (parseLeaseId(lease.owner)?.cycleId !== cycleId) continue;
      if ((await deps.grants.completeGrant(set, disk, lease.seq, lease.owner)) !== undefined) released++;
    }
  }
  if (released > 0) deps.log.info('released leases left when the cycle ended', { cycleId, released });
}

async function validateAll(deps: FinalizerDeps, disks: readonly CycleDiskRecord[]) {
  const out = new Map<string, Awaited<ReturnType<typeof validateDisk>>>();
  for (const d of disks) out.set(d.disk, await validateDisk(deps.store, d));
  return out;
}

function publishedResult(
  cycle: CycleRecord,
  disks: readonly CycleDiskRecord[],
  validated: Map<string, Awaited<ReturnType<typeof validateDisk>>>,
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
        aggregateSha256: v.aggregate.toString('hex'),
      };
    }),
  };
}

/** Waits for every target snapshot, within this invocation's time; the ones still pending. */
async function waitForSnapshots(deps: FinalizerDeps, disks: readonly CycleDiskRecord[]): Promise<string[]> {
  const budget = Math.min(MAX_WAIT_MS, Math.max(1, deps.remainingMs() - deps.marginMs));
  const signal = AbortSignal.timeout(budget);
  const statuses = await Promise.all(
    disks.map(async (d) => ({
      d,
      status: await deps.writer.waitForCompletion({ disk: d.disk, snapshotId: d.targetSnapshotId, signal }),
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
}

/** Publishes exactly once; a retry after a crash finds its own checkpoint and carries on. */
async function publishOnce(deps: FinalizerDeps, checkpoint: RecoveryCheckpoint): Promise<void> {
  try {
    await deps.state.publishCheckpoint(checkpoint);
  } catch (err) {
    if (!(err instanceof StateConflictError)) throw err;
    const mine = (await deps.state.listCheckpoints(checkpoint.set)).find(
      (c) => c.id === checkpoint.id && c.sequence === checkpoint.sequence,
    );
    if (mine === undefined) throw err;
    // Ours only if it records what this validation computed, compared by the algorithm it names.
    for (const d of checkpoint.disks) {
      const recorded = mine.disks.find((r) => r.disk === d.disk);
      const check = { checkpoint: checkpoint.id, disk: d.disk, verifier: 'the finalizer' };
      const problem =
        recorded === undefined
          ? `checkpoint ${checkpoint.id} is published without disk ${d.disk}`
          : aggregateProblem(check, recorded.aggregate, d.aggregate);
      if (problem !== undefined) {
        throw new CycleFailedError(`${problem}: it is not this cycle's publication`, { set: checkpoint.set });
      }
    }
    deps.log.info('checkpoint was already published by an earlier attempt', { checkpointId: checkpoint.id });
  }
}

/** Moves the job forward from wherever it is (a retried call may find it moved already). */
async function moveJob(
  deps: FinalizerDeps,
  set: string,
  cycleId: string,
  to: JobStatus,
  extra: { checkpointId?: string; error?: string } = {},
): Promise<void> {
  const job = await deps.state.getJob(set, cycleId);
  if (job === undefined || job.status === to) return;
  if (job.status === 'published' || job.status === 'failed') return;
  try {
    await deps.state.updateJobStatus(set, cycleId, job.status, to, iso(deps.now()), extra);
  } catch (err) {
    if (!(err instanceof StateConflictError)) throw err;
  }
}

/**
 * Ends a failed cycle: publishes nothing, marks the cycle and its job failed, stops its writers and
 * releases the plan lock. The last good checkpoint stays current. Idempotent.
 */
export async function abort(deps: FinalizerDeps, ref: CycleRef, reason: string): Promise<AbortResult> {
  const { store } = deps;
  const { plan, set, cycleId } = ref;
  const cycle = await store.getCycle(set, cycleId);
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
    await store.setCycleState(set, cycleId, ['active', 'finalizing'], 'aborted', { failure: reason });
    for (const disk of cycle.disks) {
      const rec = await store.getCycleDisk(set, disk, cycleId);
      if (rec !== undefined && rec.state !== 'aborted')
        await store.setDiskState(set, disk, cycleId, 'aborted');
    }
  }
  await moveJob(deps, set, cycleId, 'failed', { error: reason.slice(0, 2000) });
  if (cycle !== undefined) await releaseCycleLeases(deps, set, cycleId, cycle.disks);
  // Conditional on the owner: an abort after a refused prepare never frees another cycle's lock.
  await deps.locks.releasePlanLock(plan, ref.lockOwner).catch((err: unknown) => {
    deps.log.warn('plan lock not released', { plan, error: errorMessage(err) });
  });
  const current = await deps.state.latestCheckpoint(set);
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
