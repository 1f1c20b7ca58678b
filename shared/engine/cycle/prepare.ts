// prepare: opens a cycle (plan lock, job, cycle, target snapshots, disk records, flows); idempotent.
import { createHash } from 'node:crypto';
import { resolveParams } from '../config.ts';
import type { Clock } from '../ports.ts';
import { GiB } from '../units.ts';
import { descriptorsPerPage, MAX_DESCRIPTORS_PER_PAGE } from './descriptor-pages.ts';
import { CycleStateError, PlanBusyError } from './errors.ts';
import {
  type CycleCatalog,
  type CycleDiskRecord,
  type CycleLedger,
  type CycleRecord,
  EBS_BLOCK_SIZE,
  type GrantFlow,
  type Log,
  type Meter,
  type PlanLocks,
  type SnapshotWriter,
} from './ports.ts';
import type { CycleInput, CycleRef } from './types.ts';

export interface PrepareDeps {
  readonly ledger: CycleLedger;
  readonly flow: GrantFlow;
  readonly locks: PlanLocks;
  readonly catalog: CycleCatalog;
  readonly writer: Pick<SnapshotWriter, 'startSnapshot'>;
  readonly clock: Clock;
  readonly log: Log;
  readonly meter: Meter;
  /** The node's in-flight budget; the cycle's parameters are checked against it. */
  readonly nodeBudget: number;
  readonly lockMs: number;
  readonly snapshotTimeoutMinutes: number;
  readonly kmsKeyArn: string | undefined;
  /**
   * The deployment's tag every target snapshot starts with: IAM allows StartSnapshot only with it
   * and every later EBS call only on snapshots carrying it.
   */
  readonly snapshotTags: Readonly<Record<string, string>>;
  /** Cap on descriptors per page (tests use small pages to exercise paging). */
  readonly maxDescriptorsPerPage?: number | undefined;
}

/** The lock owner of a cycle: a retried prepare of the same cycle takes its own lock again. */
export const lockOwnerOf = (cycleId: string): string => `cycle:${cycleId}`;

/**
 * Deterministic StartSnapshot ClientToken: the same cycle of the same disk never starts twice.
 * 46 characters, inside the 64 EC2-family idempotency tokens allow.
 */
export function snapshotClientToken(parts: {
  set: string;
  disk: string;
  cycle: string;
  attempt?: number;
}): string {
  const hash = createHash('sha256')
    .update(JSON.stringify([parts.set, parts.disk, parts.cycle, parts.attempt ?? 1]))
    .digest('hex');
  return `ferry-${hash.slice(0, 40)}`;
}

export const iso = (ms: number): string => new Date(ms).toISOString();

/**
 * Opens a cycle. Idempotent for one cycle id: the lock is re-taken by the same owner, existing
 * records are kept, StartSnapshot's ClientToken returns the same snapshot, `flow.create` keeps an
 * existing flow. Refuses with PlanBusyError while another cycle of the plan holds the lock.
 */
export async function prepare(deps: PrepareDeps, input: CycleInput): Promise<CycleRef> {
  const { plan, set, cycleId } = input;
  const ctx = { plan, set, cycleId };
  const params = resolveParams(
    { ...input.params, nodeBudget: deps.nodeBudget },
    { targetBlockSize: EBS_BLOCK_SIZE },
  );
  if (input.base !== undefined) {
    // Refused before the lock is taken and the job recorded: nothing is left behind.
    const published = await deps.catalog.latestCheckpoint(set);
    if (published !== undefined) {
      throw new CycleStateError(
        `set ${set} has checkpoint ${published.id} already: a base (checkpoint ${input.base.checkpointId}) is only for a set's first cycle`,
        ctx,
      );
    }
  }
  const lockOwner = lockOwnerOf(cycleId);
  const now = deps.clock.now();
  const lock = await deps.locks.acquire(plan, lockOwner, deps.lockMs, now);
  if (lock === undefined) {
    const held = await deps.locks.get(plan);
    const by = held === undefined ? 'another cycle' : `${held.owner} until ${iso(held.lockExpiresAt)}`;
    throw new PlanBusyError(
      `plan ${plan} is busy: its lock is held by ${by}; cycle ${cycleId} is refused because cycles of one plan never overlap`,
      { ...ctx, holder: held?.owner, lockExpiresAt: held?.lockExpiresAt },
    );
  }

  const setRecord = await deps.catalog.getSet(set);
  if (setRecord !== undefined && setRecord.plan !== plan) {
    throw new CycleStateError(`replication set ${set} belongs to plan ${setRecord.plan}, not ${plan}`, ctx);
  }
  if (setRecord === undefined) await deps.catalog.putSet({ set, plan, createdAt: iso(now) });

  try {
    await deps.catalog.createJob({
      set,
      cycleId,
      plan,
      status: 'replicating',
      startedAt: iso(now),
      updatedAt: iso(now),
    });
  } catch (err) {
    // The catalog rejects an existing job with its own error: read it back to tell a retried
    // prepare (job replicating) from a cycle id that already ran.
    const job = await deps.catalog.getJob(set, cycleId);
    if (job === undefined) throw err;
    if (job.status !== 'replicating') {
      throw new CycleStateError(`cycle ${cycleId} of set ${set} already ran (job ${job.status})`, ctx);
    }
  }

  const latest = await deps.catalog.latestCheckpoint(set);
  /** The disk's last checkpoint, or the base its first cycle was given, or none (a full copy). */
  const previousOf = (disk: string): { source: string; target: string } | undefined => {
    const published = latest?.disks.find((p) => p.disk === disk);
    if (published !== undefined) return published;
    const b = input.base?.disks.find((p) => p.disk === disk);
    return b === undefined
      ? undefined
      : { source: b.previousSourceSnapshotId, target: b.parentTargetSnapshotId };
  };
  const initialLevel = params.adaptive ? params.windowLevels.indexOf(params.window) : 0;
  const levels = params.adaptive ? [...params.windowLevels] : [params.window];
  const fresh: CycleRecord = {
    plan,
    set,
    cycleId,
    lockOwner,
    sequence: (latest?.sequence ?? 0) + 1,
    parentCheckpointId: latest?.id,
    disks: input.disks.map((d) => d.disk),
    chunkSize: params.chunkSize,
    windowLevels: levels,
    initialLevel: Math.max(0, initialLevel),
    adaptive: params.adaptive,
    createdAt: now,
    ...(input.startedAt === undefined ? {} : { startedAt: Date.parse(input.startedAt) }),
    state: 'active',
    ticks: 0,
    idleTicks: 0,
    lastCompleted: 0,
  };
  const cycle = (await deps.ledger.createCycle(fresh)) ? fresh : await deps.ledger.getCycle(set, cycleId);
  if (cycle === undefined)
    throw new CycleStateError(`cycle ${cycleId} of set ${set} vanished while prepared`, ctx);
  if (cycle.state !== 'active') {
    throw new CycleStateError(
      `cycle ${cycleId} of set ${set} is ${cycle.state}; it cannot be prepared again`,
      ctx,
    );
  }
  const perPage = descriptorsPerPage(cycle.chunkSize, deps.maxDescriptorsPerPage ?? MAX_DESCRIPTORS_PER_PAGE);

  for (const d of input.disks) {
    const previous = previousOf(d.disk);
    const { snapshotId, encrypted } = await deps.writer.startSnapshot({
      disk: d.disk,
      volumeSizeGiB: d.volumeSizeGiB,
      parentSnapshotId: previous?.target,
      clientToken: snapshotClientToken({ set, disk: d.disk, cycle: cycleId }),
      description: `Ferry ${set}/${d.disk} cycle ${cycleId}`.slice(0, 255),
      timeoutMinutes: deps.snapshotTimeoutMinutes,
      kmsKeyArn: previous === undefined ? deps.kmsKeyArn : undefined,
      // Deterministic for the cycle: a retried StartSnapshot with the same ClientToken must send the
      // same parameters. The ferry:* keys name what the snapshot is a copy of.
      tags: {
        ...deps.snapshotTags,
        'ferry:role': 'target',
        'ferry:set': set,
        'ferry:disk': d.disk,
        'ferry:cycle': cycleId,
      },
    });
    const record: CycleDiskRecord = {
      set,
      disk: d.disk,
      cycleId,
      kind: previous === undefined ? 'full' : 'incremental',
      state: 'active',
      volumeSizeGiB: d.volumeSizeGiB,
      sourceSnapshotId: d.sourceSnapshotId,
      previousSourceSnapshotId: previous?.source,
      targetSnapshotId: snapshotId,
      targetStartedAt: now,
      parentTargetSnapshotId: previous?.target,
      chunkSize: cycle.chunkSize,
      perPage,
      encrypted,
      diffDone: false,
      diffSeq: 0,
      diffStartBlock: 0,
      diffBlocks: 0,
      diffBytes: 0,
    };
    if (!(await deps.ledger.createDisk(record))) {
      const existing = await deps.ledger.getDisk(set, d.disk, cycleId);
      if (existing?.targetSnapshotId !== snapshotId || existing.sourceSnapshotId !== d.sourceSnapshotId) {
        throw new CycleStateError(
          `disk ${d.disk} of cycle ${cycleId} was prepared with other snapshots (${existing?.sourceSnapshotId} -> ${existing?.targetSnapshotId})`,
          { ...ctx, disk: d.disk },
        );
      }
    }
    // No allowance until the first tick has reserved node budget for it.
    await deps.flow.create(
      { set, disk: d.disk, cycleId },
      { window: cycle.windowLevels[cycle.initialLevel]!, allowance: 0 },
    );
    await deps.catalog.putDisk({
      set,
      disk: d.disk,
      source: d.sourceSnapshotId,
      target: snapshotId,
      sizeBytes: d.volumeSizeGiB * GiB,
      blockSize: EBS_BLOCK_SIZE,
    });
    deps.log.info('disk prepared', {
      disk: d.disk,
      kind: record.kind,
      ...(input.base === undefined ? {} : { base: input.base.checkpointId }),
      sourceSnapshotId: d.sourceSnapshotId,
      previousSourceSnapshotId: previous?.source,
      targetSnapshotId: snapshotId,
      targetStartedAt: now,
      parentTargetSnapshotId: previous?.target,
    });
  }
  deps.meter.add('CyclesPrepared', 'Count', 1);
  return {
    plan,
    set,
    cycleId,
    lockOwner,
    sequence: cycle.sequence,
    disks: input.disks.map((d) => ({ set, cycleId, disk: d.disk })),
  };
}
