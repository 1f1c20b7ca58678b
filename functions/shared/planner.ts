// The planner: `prepare` opens a cycle (plan lock, job, target snapshots, windows); `tick` keeps it
// moving (reclaims expired grants, adapts windows from the writers' signals, tops windows up,
// repairs lost grants) and reports whether the cycle is running, done, stuck or failed.
import type {
  DynamoGrants,
  DynamoPlanLocks,
  DynamoWindows,
  GrantLease,
} from '../../shared/aws/dynamo/budget.ts';
import { StateConflictError } from '../../shared/aws/dynamo/errors.ts';
import type { DynamoStateStore } from '../../shared/aws/dynamo/state-store.ts';
import { snapshotClientToken } from '../../shared/aws/ebs/writer.ts';
import { resolveParams } from '../../shared/engine/config.ts';
import type { CycleInput, CycleRef, DiskProgressReport, TickResult } from '../contracts.ts';
import { scanCompletions } from './completions.ts';
import type { CycleDiskRecord, CycleRecord } from './cycle-store.ts';
import { descriptorsPerPage, MAX_DESCRIPTORS_PER_PAGE } from './descriptor-pages.ts';
import { CycleStateError, PlanBusyError } from './errors.ts';
import {
  type GrantingDeps,
  type PendingGrant,
  parseLeaseId,
  sendPending,
  type TopUpStop,
  topUpDisk,
} from './granting.ts';
import { EBS_BLOCK_SIZE, type Meter, type SnapshotWriter } from './ports.ts';
import { CONTROLLER_HISTORY_MS, evaluateWindow } from './window-control.ts';

// A descriptor granted this many times without completing fails the cycle: each grant already had
// the writers' own retries and SQS's redeliveries behind it, so the chunk is poison, not unlucky.
export const MAX_GRANT_ATTEMPTS = 5;
// Missing descriptors one tick re-queues when it repairs a disk: a window's worth or two.
const REPAIR_LIMIT = 1000;

export interface PlannerDeps extends GrantingDeps {
  readonly state: DynamoStateStore;
  readonly locks: DynamoPlanLocks;
  readonly windows: DynamoWindows;
  readonly grants: DynamoGrants;
  readonly writer: Pick<SnapshotWriter, 'startSnapshot'>;
  readonly meter: Meter;
  /** The node's in-flight budget (NODE_BUDGET); the cycle's parameters are checked against it. */
  readonly nodeBudget: number;
  readonly lockMs: number;
  readonly stuckTicks: number;
  readonly maxGrantsPerTick: number;
  readonly snapshotTimeoutMinutes: number;
  readonly kmsKeyArn: string | undefined;
  /**
   * The deployment's tag (SNAPSHOT_TAG_KEY=SNAPSHOT_TAG_VALUE) every target snapshot starts with:
   * IAM allows StartSnapshot only with it and every later EBS call only on snapshots carrying it.
   */
  readonly snapshotTags: Readonly<Record<string, string>>;
  /** Cap on descriptors per page (tests use small pages to exercise paging). */
  readonly maxDescriptorsPerPage?: number;
  /** Milliseconds left in this invocation; granting stops `marginMs` before the deadline. */
  readonly remainingMs?: () => number;
  readonly marginMs?: number;
}

/** The lock owner of a cycle: a retried prepare of the same cycle takes its own lock again. */
export const lockOwnerOf = (cycleId: string): string => `cycle:${cycleId}`;

const iso = (ms: number): string => new Date(ms).toISOString();

/**
 * Opens a cycle. Idempotent for one cycle id (Step Functions may retry it): the lock is re-taken by
 * the same owner, existing records are kept, StartSnapshot's ClientToken returns the same snapshot.
 * Refuses with PlanBusyError while another cycle of the plan holds the lock.
 */
export async function prepare(deps: PlannerDeps, input: CycleInput): Promise<CycleRef> {
  const { plan, set, cycleId } = input;
  const ctx = { plan, set, cycleId };
  const params = resolveParams(
    { ...input.params, nodeBudget: deps.nodeBudget },
    { targetBlockSize: EBS_BLOCK_SIZE },
  );
  const lockOwner = lockOwnerOf(cycleId);
  const now = deps.now();
  const lock = await deps.locks.acquirePlanLock(plan, lockOwner, deps.lockMs, now);
  if (lock === undefined) {
    const held = await deps.locks.getPlanLock(plan);
    const by = held === undefined ? 'another cycle' : `${held.owner} until ${iso(held.lockExpiresAt)}`;
    throw new PlanBusyError(
      `plan ${plan} is busy: its lock is held by ${by}; cycle ${cycleId} is refused because cycles of one plan never overlap`,
      { ...ctx, holder: held?.owner, lockExpiresAt: held?.lockExpiresAt },
    );
  }

  const setRecord = await deps.state.getSet(set);
  if (setRecord !== undefined && setRecord.plan !== plan) {
    throw new CycleStateError(`replication set ${set} belongs to plan ${setRecord.plan}, not ${plan}`, ctx);
  }
  if (setRecord === undefined) await deps.state.putSet({ set, plan, createdAt: iso(now) });

  try {
    await deps.state.createJob({
      set,
      cycleId,
      plan,
      status: 'replicating',
      startedAt: iso(now),
      updatedAt: iso(now),
    });
  } catch (err) {
    if (!(err instanceof StateConflictError)) throw err;
    const job = await deps.state.getJob(set, cycleId);
    if (job?.status !== 'replicating') {
      throw new CycleStateError(`cycle ${cycleId} of set ${set} already ran (job ${job?.status})`, ctx);
    }
  }

  const latest = await deps.state.latestCheckpoint(set);
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
    initialLevel,
    adaptive: params.adaptive,
    createdAt: now,
    ...(input.startedAt === undefined ? {} : { startedAt: Date.parse(input.startedAt) }),
    state: 'active',
    ticks: 0,
    idleTicks: 0,
    lastCompleted: 0,
  };
  const cycle = (await deps.store.createCycle(fresh)) ? fresh : await deps.store.requireCycle(set, cycleId);
  if (cycle.state !== 'active') {
    throw new CycleStateError(
      `cycle ${cycleId} of set ${set} is ${cycle.state}; it cannot be prepared again`,
      ctx,
    );
  }
  const perPage = descriptorsPerPage(cycle.chunkSize, deps.maxDescriptorsPerPage ?? MAX_DESCRIPTORS_PER_PAGE);

  for (const d of input.disks) {
    const previous = latest?.disks.find((p) => p.disk === d.disk);
    await releaseStaleLeases(deps, set, d.disk, cycleId);
    const { snapshotId, encrypted } = await deps.writer.startSnapshot({
      disk: d.disk,
      volumeSizeGiB: d.volumeSizeGiB,
      parentSnapshotId: previous?.target,
      clientToken: snapshotClientToken({ set, disk: d.disk, cycle: cycleId }),
      description: `Ferry ${set}/${d.disk} cycle ${cycleId}`.slice(0, 255),
      timeoutMinutes: deps.snapshotTimeoutMinutes,
      kmsKeyArn: previous === undefined ? deps.kmsKeyArn : undefined,
      // Deterministic for the cycle: a retried StartSnapshot with the same ClientToken must send
      // the same parameters. The ferry:* keys name what the snapshot is a copy of.
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
      nextSeq: 0,
      retry: {},
      completed: 0,
      completedBytes: 0,
      writtenBlocks: 0,
    };
    if (!(await deps.store.createCycleDisk(record))) {
      const existing = await deps.store.requireCycleDisk(set, d.disk, cycleId);
      if (existing.targetSnapshotId !== snapshotId || existing.sourceSnapshotId !== d.sourceSnapshotId) {
        throw new CycleStateError(
          `disk ${d.disk} of cycle ${cycleId} was prepared with other snapshots (${existing.sourceSnapshotId} -> ${existing.targetSnapshotId})`,
          { ...ctx, disk: d.disk },
        );
      }
    }
    const window = await deps.windows.getWindow(set, d.disk);
    await deps.windows.putWindow(
      set,
      d.disk,
      { level: cycle.initialLevel, windowBytes: cycle.windowLevels[cycle.initialLevel]!, updatedAt: now },
      window?.version,
    );
    await deps.state.putDisk({
      set,
      disk: d.disk,
      source: d.sourceSnapshotId,
      target: snapshotId,
      sizeBytes: d.volumeSizeGiB * 1024 * 1024 * 1024,
      blockSize: EBS_BLOCK_SIZE,
    });
    deps.log.info('disk prepared', {
      disk: d.disk,
      kind: record.kind,
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

/**
 * Releases every lease of the disk left by an earlier cycle (grant lease keys have no cycle; the plan
 * lock guarantees that cycle is over), then repairs window bytes that leaked without a lease.
 */
async function releaseStaleLeases(deps: PlannerDeps, set: string, disk: string, cycleId: string) {
  let ours = 0;
  for (const lease of await deps.store.listLeases(set, disk)) {
    if (parseLeaseId(lease.owner)?.cycleId === cycleId) {
      ours++;
      continue;
    }
    await deps.grants.completeGrant(set, disk, lease.seq, lease.owner);
    deps.log.info('released a lease left by an earlier cycle', { disk, seq: lease.seq, owner: lease.owner });
  }
  const window = await deps.windows.getWindow(set, disk);
  if (ours === 0 && window !== undefined && window.inflight > 0) {
    if (await deps.store.resetLeakedWindow(set, disk, window.inflight)) {
      deps.log.warn('window bytes leaked by a crashed grant were reset', { disk, bytes: window.inflight });
    }
  }
}

// ---- tick ------------------------------------------------------------------------------------------

interface DiskTick {
  rec: CycleDiskRecord;
  done: boolean;
  granted: number;
  reclaimed: number;
  stop: TopUpStop | undefined;
}

function report(
  status: TickResult['status'],
  idleTicks: number,
  disks: DiskProgressReport[],
  reason?: string,
): TickResult {
  return reason === undefined ? { status, idleTicks, disks } : { status, reason, idleTicks, disks };
}

/**
 * One planner tick. Bounded: at most `maxGrantsPerTick` grants, and it stops granting `marginMs`
 * before the invocation's deadline. Safe to run while writers top windows up concurrently.
 */
export async function tick(deps: PlannerDeps, ref: CycleRef): Promise<TickResult> {
  const { store } = deps;
  const { plan, set, cycleId } = ref;
  const ctx = { plan, set, cycleId };
  const cycle = await store.requireCycle(set, cycleId);
  if (cycle.state === 'published') return report('done', 0, [], 'the cycle is already published');
  if (cycle.state === 'aborted')
    return report('failed', cycle.idleTicks, [], cycle.failure ?? 'the cycle was aborted');

  const now = deps.now();
  if ((await deps.locks.renewPlanLock(plan, ref.lockOwner, deps.lockMs, now)) === undefined) {
    const reason = `plan ${plan} lock is no longer held by ${ref.lockOwner} (it expired and was taken over)`;
    await store.recordFailure(set, cycleId, reason);
    return report('failed', cycle.idleTicks, [], reason);
  }
  if (cycle.failure !== undefined) return report('failed', cycle.idleTicks, [], cycle.failure);

  const disks = new Map<string, DiskTick>();
  for (const disk of cycle.disks) {
    const rec = await store.requireCycleDisk(set, disk, cycleId);
    disks.set(disk, { rec, done: false, granted: 0, reclaimed: 0, stop: undefined });
  }

  // 1. Expired leases: their bytes come back (exactly once); their descriptors are granted again.
  const failure = await reclaim(deps, cycle, disks, now);
  if (failure !== undefined) {
    await store.recordFailure(set, cycleId, failure);
    return report('failed', cycle.idleTicks, [], failure);
  }

  // 2. Windows follow the writers' signals; 3. progress is confirmed and lost grants repaired.
  for (const d of disks.values()) {
    if (cycle.adaptive && d.rec.diffDone) await adaptWindow(deps, cycle, d, now);
    await confirmProgress(deps, d);
  }

  // 4. Top up windows round-robin, one grant per disk per round, so a busy disk cannot take the
  //    whole node budget before the others get a grant.
  const pending: PendingGrant[] = [];
  const order = [...disks.values()];
  const rotate = cycle.ticks % Math.max(1, order.length);
  let open = [...order.slice(rotate), ...order.slice(0, rotate)].filter((d) => !d.done);
  const deadline = () => deps.remainingMs !== undefined && deps.remainingMs() < (deps.marginMs ?? 0);
  while (open.length > 0 && pending.length < deps.maxGrantsPerTick && !deadline()) {
    const next: DiskTick[] = [];
    for (const d of open) {
      const r = await topUpDisk(deps, d.rec, 1);
      d.rec = r.record;
      d.stop = r.stop;
      d.granted += r.pending.length;
      pending.push(...r.pending);
      if (r.stop === 'max') next.push(d);
    }
    open = next;
  }
  const sent = await sendPending(deps, pending);
  deps.meter.add('GrantsIssuedByTick', 'Count', sent);

  // 5. Report.
  const progress: DiskProgressReport[] = [];
  let completed = 0;
  for (const d of disks.values()) {
    const window = await deps.windows.getWindow(set, d.rec.disk);
    completed += d.rec.completed;
    progress.push({
      disk: d.rec.disk,
      ...(d.rec.diffDone ? { descriptors: d.rec.descriptors ?? 0 } : {}),
      completed: d.rec.completed,
      bytes: d.rec.diffBytes,
      completedBytes: d.rec.completedBytes,
      inflightBytes: window?.inflight ?? 0,
      windowBytes: window?.windowBytes ?? 0,
      granted: d.granted,
      reclaimed: d.reclaimed,
    });
  }
  const allDone = [...disks.values()].every((d) => d.done);
  const idleTicks = allDone || completed > cycle.lastCompleted ? 0 : cycle.idleTicks + 1;
  await store.saveTick(set, cycleId, { idleTicks, lastCompleted: completed });
  if (allDone) {
    deps.log.info('cycle replicated; ready to finalize', { ...ctx, completed });
    return report('done', idleTicks, progress);
  }
  if (idleTicks >= deps.stuckTicks) {
    const reason = `no descriptor completed in ${idleTicks} ticks (${completed} completed); writers may be failing or absent`;
    deps.log.error('cycle stuck', { ...ctx, idleTicks });
    return report('stuck', idleTicks, progress, reason);
  }
  return report('running', idleTicks, progress);
}

/** Reclaims the set's expired leases; queues this cycle's seqs again. Returns a failure to record, if any. */
async function reclaim(
  deps: PlannerDeps,
  cycle: CycleRecord,
  disks: Map<string, DiskTick>,
  now: number,
): Promise<string | undefined> {
  const won: GrantLease[] = await deps.grants.reclaimExpired(cycle.set, now);
  const retries = new Map<string, Map<number, number>>();
  for (const lease of won) {
    const holder = parseLeaseId(lease.owner);
    const d = disks.get(lease.disk);
    if (holder?.cycleId !== cycle.cycleId || d === undefined) {
      deps.log.info('reclaimed a lease of another cycle', {
        disk: lease.disk,
        seq: lease.seq,
        owner: lease.owner,
      });
      continue;
    }
    d.reclaimed++;
    const attempt = holder.attempt + 1;
    if (attempt > MAX_GRANT_ATTEMPTS) {
      return `descriptor seq ${lease.seq} of disk ${lease.disk} was granted ${holder.attempt} times and never completed (lease expired each time)`;
    }
    const m = retries.get(lease.disk) ?? new Map<number, number>();
    m.set(lease.seq, Math.max(attempt, m.get(lease.seq) ?? 0));
    retries.set(lease.disk, m);
  }
  for (const [disk, m] of retries) {
    await deps.store.addRetries(cycle.set, disk, cycle.cycleId, m);
    const d = disks.get(disk)!;
    d.rec = await deps.store.requireCycleDisk(cycle.set, disk, cycle.cycleId);
    deps.log.info('expired grants reclaimed; granting again', { disk, seqs: [...m.keys()].slice(0, 20) });
  }
  deps.meter.add('GrantsReclaimed', 'Count', won.length);
  return undefined;
}

/** Replays the disk's signals into its controller; persists a new level. */
async function adaptWindow(deps: PlannerDeps, cycle: CycleRecord, d: DiskTick, now: number) {
  const { set, disk, cycleId } = d.rec;
  const window = await deps.windows.getWindow(set, disk);
  if (window === undefined) return;
  const from = Math.max(window.updatedAt, (d.rec.evaluatedAt ?? window.updatedAt) - CONTROLLER_HISTORY_MS);
  const buckets = await deps.store.readSignals(set, disk, cycleId, from, now);
  const level = Math.min(window.level, cycle.windowLevels.length - 1);
  const decision = evaluateWindow({
    levels: cycle.windowLevels,
    level,
    lastChangeAt: window.updatedAt,
    evaluatedAt: d.rec.evaluatedAt,
    climbHoldMs: d.rec.climbHoldMs,
    now,
    buckets,
  });
  if (decision.changed) {
    try {
      await deps.windows.putWindow(
        set,
        disk,
        { level: decision.level, windowBytes: cycle.windowLevels[decision.level]!, updatedAt: now },
        window.version,
      );
      deps.log.info('window changed', {
        disk,
        from: window.windowBytes,
        to: cycle.windowLevels[decision.level],
        reason: decision.reason,
      });
      deps.meter.add(decision.level < level ? 'WindowStepDown' : 'WindowStepUp', 'Count', 1);
    } catch (err) {
      // Another tick moved it first (a retried tick): its decision stands.
      if (!(err instanceof StateConflictError)) throw err;
    }
  }
  await deps.store.saveController(set, disk, cycleId, {
    climbHoldMs: decision.climbHoldMs,
    evaluatedAt: now,
  });
}

/**
 * Decides whether a disk is done, from the completion pages, not the counters: when the counters say
 * done, and when nothing of the disk is in flight yet descriptors are missing (a grant lost to a
 * crash or the DLQ), which it queues again.
 */
async function confirmProgress(deps: PlannerDeps, d: DiskTick) {
  const { store } = deps;
  const rec = d.rec;
  if (!rec.diffDone || rec.state !== 'active') return;
  const total = rec.descriptors ?? 0;
  const countersDone = rec.completed >= total;
  const idle = rec.nextSeq >= total && Object.keys(rec.retry).length === 0;
  if (!countersDone && !idle) return;
  if (!countersDone) {
    const leases = await store.listLeases(rec.set, rec.disk);
    if (leases.some((l) => parseLeaseId(l.owner)?.cycleId === rec.cycleId)) return;
  }
  const scan = await scanCompletions(store, rec, REPAIR_LIMIT);
  if (scan.completed !== rec.completed || scan.writtenBlocks !== rec.writtenBlocks) {
    await store.setCompleted(rec.set, rec.disk, rec.cycleId, scan);
  }
  if (scan.completed >= total) {
    d.done = true;
  } else if (idle && scan.missing.length > 0) {
    const leased = new Set(
      (await store.listLeases(rec.set, rec.disk))
        .filter((l) => parseLeaseId(l.owner)?.cycleId === rec.cycleId)
        .map((l) => l.seq),
    );
    const lost = scan.missing.filter((s) => !leased.has(s));
    // Unknown earlier attempts: count this as a second one.
    await store.addRetries(rec.set, rec.disk, rec.cycleId, new Map(lost.map((s) => [s, 2])));
    deps.log.warn('descriptors were granted but never completed and nothing holds them; granting again', {
      disk: rec.disk,
      count: lost.length,
      first: lost.slice(0, 10),
    });
  }
  d.rec = await store.requireCycleDisk(rec.set, rec.disk, rec.cycleId);
}
