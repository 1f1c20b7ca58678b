// The tick: reclaim, adapt windows, share the node budget, kick-start and refill grants, confirm done.
import { planGrants, shareBudget } from '../grant-rule.ts';
import type { Clock } from '../ports.ts';
import type { DescriptorCache } from './descriptor-cache.ts';
import { CycleStateError } from './errors.ts';
import {
  applyGrants,
  capAt,
  inflightOf,
  lookahead,
  nextMarks,
  planReclaim,
  prepareLane,
  sameMarks,
} from './grant-plan.ts';
import { sendGrants } from './grant-send.ts';
import type {
  CycleDiskRecord,
  CycleLedger,
  CycleRecord,
  FlowControl,
  FlowKey,
  FlowState,
  GrantChannel,
  GrantFlow,
  GrantMark,
  Log,
  Meter,
  NodeBudget,
  PlanLocks,
  Regrant,
} from './ports.ts';
import type { CycleRef, DiskProgressReport, TickResult } from './types.ts';
import { missingCompletions } from './validation.ts';
import { evaluateWindow, replayFrom } from './window-control.ts';

// Seqs one tick sends again per disk when the ledger lacks completions the flow counted: a repair
// bypasses the window (the seq is counted, not in flight), so it is kept to a trickle.
export const REPAIR_PER_TICK = 16;

export interface TickDeps {
  readonly ledger: Pick<
    CycleLedger,
    | 'getCycle'
    | 'updateCycle'
    | 'recordFailure'
    | 'getDisk'
    | 'updateDisk'
    | 'readSignals'
    | 'listCompletions'
    | 'getDescriptorPage'
  >;
  readonly flow: Pick<GrantFlow, 'get' | 'control' | 'advance'>;
  readonly locks: Pick<PlanLocks, 'renew'>;
  readonly budget: Pick<NodeBudget, 'reserve'>;
  readonly channel: Pick<GrantChannel, 'send'>;
  /** Per container. */
  readonly pages: DescriptorCache;
  readonly clock: Clock;
  readonly log: Log;
  readonly meter: Meter;
  /** The node whose budget the cycle shares (NODE_ID) and that budget (NODE_BUDGET). */
  readonly nodeId: string;
  readonly nodeBudget: number;
  readonly lockMs: number;
  /**
   * How long a grant may stay unfinished before it is granted again, and how long the node
   * reservation (and the allowances behind it) lasts without a tick renewing it.
   */
  readonly leaseMs: number;
  readonly stuckTicks: number;
  readonly maxGrantsPerTick: number;
  /** Milliseconds left in this invocation; granting stops `marginMs` before the deadline. */
  readonly remainingMs?: (() => number) | undefined;
  readonly marginMs?: number | undefined;
}

/** The node reservation's holder for a cycle (unique across sets, like checkpoint ids). */
export const budgetHolderOf = (set: string, cycleId: string): string => `${set}/${cycleId}`;

interface DiskTick {
  readonly key: FlowKey;
  rec: CycleDiskRecord;
  state: FlowState;
  /** The disk's seqs are all counted and the ledger confirms every one. */
  done: boolean;
  granted: number;
  reclaimed: number;
  addRegrants: Map<number, Regrant>;
  marks: GrantMark[];
  window: number;
  allowance: number;
}

function report(
  status: TickResult['status'],
  idleTicks: number,
  disks: DiskProgressReport[],
  reason?: string,
): TickResult {
  return reason === undefined ? { status, idleTicks, disks } : { status, reason, idleTicks, disks };
}

/** Whether every seq of the disk is counted complete by its flow. */
const counted = (d: DiskTick): boolean =>
  d.rec.diffDone && d.rec.descriptors !== undefined && d.state.completedCount >= d.rec.descriptors;

/**
 * One tick. Bounded: at most `maxGrantsPerTick` grants, and none once `marginMs` of the deadline is
 * left. Safe to run while writers top windows up: its grants are conditional on the flow's version.
 * `round`, the caller's count of this tick, is echoed in the result and nothing else: the state
 * machine keeps its tick counter in the tick's result instead of a state of its own.
 */
export async function tick(deps: TickDeps, ref: CycleRef, round?: number): Promise<TickResult> {
  const result = await tickCycle(deps, ref);
  return round === undefined ? result : { ...result, round };
}

async function tickCycle(deps: TickDeps, ref: CycleRef): Promise<TickResult> {
  const { ledger } = deps;
  const { plan, set, cycleId } = ref;
  const ctx = { plan, set, cycleId };
  const cycle = await ledger.getCycle(set, cycleId);
  if (cycle === undefined) throw new CycleStateError(`cycle ${cycleId} of set ${set} does not exist`, ctx);
  if (cycle.state === 'published') return report('done', 0, [], 'the cycle is already published');
  if (cycle.state === 'aborted')
    return report('failed', cycle.idleTicks, [], cycle.failure ?? 'the cycle was aborted');

  const now = deps.clock.now();
  if ((await deps.locks.renew(plan, ref.lockOwner, deps.lockMs, now)) === undefined) {
    const reason = `plan ${plan} lock is no longer held by ${ref.lockOwner} (it expired and was taken over)`;
    await ledger.recordFailure(set, cycleId, reason);
    return report('failed', cycle.idleTicks, [], reason);
  }
  if (cycle.failure !== undefined) return report('failed', cycle.idleTicks, [], cycle.failure);

  // 1. Each disk and its flow: two reads.
  const disks: DiskTick[] = [];
  for (const disk of cycle.disks) {
    const key = { set, disk, cycleId };
    const rec = await ledger.getDisk(set, disk, cycleId);
    const state = rec === undefined ? undefined : await deps.flow.get(key);
    if (rec === undefined || state === undefined) {
      throw new CycleStateError(
        `disk ${disk} of cycle ${cycleId} was not prepared (no disk record or flow)`,
        {
          ...ctx,
          disk,
        },
      );
    }
    disks.push({
      key,
      rec,
      state,
      done: false,
      granted: 0,
      reclaimed: 0,
      addRegrants: new Map(),
      marks: [...state.marks],
      window: state.window,
      allowance: state.allowance,
    });
  }

  // 2. Reclaim: grants older than a lease that never completed are granted again.
  for (const d of disks) {
    if (!d.rec.diffDone) continue;
    const r = planReclaim(d.state, now, deps.leaseMs);
    if (r.exhausted !== undefined) {
      const reason = `descriptor seq ${r.exhausted.seq} of disk ${d.rec.disk} was granted ${r.exhausted.attempts} times and never completed`;
      await ledger.recordFailure(set, cycleId, reason);
      deps.log.error('a descriptor used up its grants; the cycle fails', {
        ...ctx,
        disk: d.rec.disk,
        seq: r.exhausted.seq,
      });
      return report('failed', cycle.idleTicks, [], reason);
    }
    d.addRegrants = r.addRegrants;
    d.reclaimed = r.addRegrants.size;
    d.marks = nextMarks(d.state, now, deps.leaseMs);
    if (d.reclaimed > 0) {
      deps.log.info('lost or expired grants are granted again', {
        disk: d.rec.disk,
        seqs: [...r.addRegrants.keys()].slice(0, 20),
      });
      deps.meter.add('GrantsReclaimed', 'Count', d.reclaimed);
    }
  }

  // 3. Windows follow the writers' signals.
  if (cycle.adaptive) for (const d of disks) if (d.rec.diffDone) await adaptWindow(deps, cycle, d, now);

  // 4. The node budget, shared across the disks with work, reserved for a lease.
  await shareNodeBudget(deps, cycle, disks, now);

  // 5. One control write per disk, only when something changed or the allowance would lapse soon.
  const until = now + deps.leaseMs;
  for (const d of disks) {
    const s = d.state;
    const change: FlowControl = {
      ...(d.window !== s.window ? { window: d.window } : {}),
      ...(d.allowance !== s.allowance || s.allowanceUntil - now < deps.leaseMs / 2
        ? { allowance: d.allowance, allowanceUntil: until }
        : {}),
      ...(sameMarks(d.marks, s.marks) ? {} : { marks: d.marks }),
      ...(d.addRegrants.size > 0 ? { addRegrants: d.addRegrants } : {}),
    };
    if (Object.keys(change).length > 0) d.state = await deps.flow.control(d.key, change);
  }

  // 6. Done is confirmed from the recorded completions; seqs the ledger lacks are written again.
  for (const d of disks) if (counted(d)) await confirm(deps, d);

  // 7. Kick-start and refill windows across disks through the one grant rule.
  const deadline = () => deps.remainingMs !== undefined && deps.remainingMs() < (deps.marginMs ?? 0);
  if (!deadline()) await grantAcross(deps, cycle, disks, now);

  // 8. Report.
  const progress: DiskProgressReport[] = [];
  let completed = 0;
  for (const d of disks) {
    completed += d.state.completedCount;
    progress.push({
      disk: d.rec.disk,
      ...(d.rec.diffDone ? { descriptors: d.rec.descriptors ?? 0 } : {}),
      completed: d.state.completedCount,
      bytes: d.rec.diffBytes,
      completedBytes: d.state.completedBytes,
      inflightBytes: inflightOf(d.state),
      windowBytes: d.state.window,
      granted: d.granted,
      reclaimed: d.reclaimed,
    });
  }
  const allDone = disks.every((d) => d.done);
  const idleTicks = allDone || completed > cycle.lastCompleted ? 0 : cycle.idleTicks + 1;
  await ledger.updateCycle(set, cycleId, {
    ticks: cycle.ticks + 1,
    idleTicks,
    lastCompleted: completed,
    lastTickAt: now,
  });
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

/** Replays the disk's signals into its controller; keeps the controller's state when it changed. */
async function adaptWindow(deps: TickDeps, cycle: CycleRecord, d: DiskTick, now: number): Promise<void> {
  const { set, disk, cycleId } = d.key;
  const input = { state: d.rec.controller, evaluatedUntil: cycle.lastTickAt, now };
  const buckets = await deps.ledger.readSignals(set, disk, cycleId, replayFrom(input), now + 1);
  const e = evaluateWindow({
    ...input,
    levels: cycle.windowLevels,
    initialLevel: cycle.initialLevel,
    buckets,
  });
  if (e.persist !== undefined) {
    const saved = await deps.ledger.updateDisk(set, disk, cycleId, {
      controller: e.persist as unknown as Record<string, unknown>,
      evaluatedAt: now,
    });
    if (saved !== undefined) d.rec = saved;
  }
  if (e.window !== d.state.window) {
    deps.log.info('window changed', { disk, from: d.state.window, to: e.window, reason: e.reason });
    deps.meter.add(e.window < d.state.window ? 'WindowStepDown' : 'WindowStepUp', 'Count', 1);
  }
  d.window = e.window;
}

/**
 * Each disk's allowance: its share of the node budget by the grant rule (`shareBudget`), within what
 * the node lets this cycle reserve beside the other cycles' live reservations. A disk's demand is its
 * window, or less when fewer bytes are left to grant. The reservation asked for never drops below the
 * allowances still in force, so the flows always hold less than the cycle has reserved; what a tick
 * gives back is given back by the next one, once the smaller allowances are written.
 */
async function shareNodeBudget(
  deps: TickDeps,
  cycle: CycleRecord,
  disks: DiskTick[],
  now: number,
): Promise<void> {
  const working = disks.filter((d) => d.rec.diffDone && !counted(d) && d.state.open);
  const lanes = working.map((d, i) => {
    const inflight = inflightOf(d.state);
    const ungranted = Math.max(0, d.rec.diffBytes - d.state.grantedBytes);
    return {
      window: Math.min(d.window, inflight + ungranted),
      span: d.state.grantedBytes - d.state.lowBytes,
      inflight,
      lastGrant: i,
    };
  });
  const inflight = lanes.reduce((sum, l) => sum + l.inflight, 0);
  const shares = shareBudget(lanes, { limit: deps.nodeBudget, inflight }, cycle.chunkSize);
  const wanted = shares.reduce((sum, s) => sum + s, 0);
  const inForce = disks.reduce((sum, d) => sum + capAt(d.state, now), 0);
  const reserved = await deps.budget.reserve(
    deps.nodeId,
    budgetHolderOf(cycle.set, cycle.cycleId),
    Math.max(wanted, inForce),
    now + deps.leaseMs,
    now,
    deps.nodeBudget,
  );
  let allowances = shares;
  if (reserved < wanted) {
    deps.meter.add('NodeBudgetShort', 'Bytes', wanted - reserved);
    allowances = shareBudget(lanes, { limit: reserved, inflight }, cycle.chunkSize);
    const sum = allowances.reduce((a, b) => a + b, 0);
    // Other cycles hold the rest and this cycle has more in flight than it got: no disk grants
    // until its in-flight bytes drain below its scaled share.
    if (sum > reserved) allowances = allowances.map((a) => Math.floor((a * reserved) / sum));
  }
  for (const d of disks) d.allowance = 0;
  working.forEach((d, i) => {
    d.allowance = allowances[i]!;
  });
}

/** A counted disk is done when the ledger holds a completion of every seq; missing ones are repaired. */
async function confirm(deps: TickDeps, d: DiskTick): Promise<void> {
  const total = d.rec.descriptors ?? 0;
  const missing = await missingCompletions(deps.ledger, d.rec, total, REPAIR_PER_TICK);
  if (missing.length === 0) {
    d.done = true;
    return;
  }
  deps.log.warn(
    'the flow counts descriptors complete that the ledger has no completion of; writing them again',
    {
      disk: d.rec.disk,
      count: missing.length,
      first: missing.slice(0, 10),
    },
  );
  const descriptors = await deps.pages.many(d.rec, missing);
  await sendGrants(
    deps,
    d.key,
    missing.map((seq) => ({ seq, attempt: 2, repair: true })),
    descriptors,
  );
  deps.meter.add('GrantsRepaired', 'Count', missing.length);
}

/** Plans the tick's grants across the disks (window, allowance as cap, fairness) and sends them. */
async function grantAcross(
  deps: TickDeps,
  cycle: CycleRecord,
  disks: DiskTick[],
  now: number,
): Promise<void> {
  const active = disks.filter((d) => d.rec.diffDone && !d.done && d.state.open);
  const max = deps.maxGrantsPerTick;
  const prepared = [];
  for (const [i, d] of active.entries()) {
    const total = d.rec.descriptors ?? 0;
    const descriptors = await deps.pages.many(d.rec, lookahead(d.state, total, now, max));
    // Ties go to the disk granted longest ago: rotate the order every tick.
    const rotation = (i - (cycle.ticks % Math.max(1, active.length)) + active.length) % active.length;
    prepared.push({
      d,
      descriptors,
      lane: prepareLane(d.state, total, (seq) => descriptors.get(seq)?.bytes, now, max, rotation),
    });
  }
  if (prepared.length === 0) return;
  const plan = planGrants(
    prepared.map((p) => p.lane.lane),
    { limit: Number.POSITIVE_INFINITY, inflight: 0 },
    max,
  );
  let sent = 0;
  for (const [i, p] of prepared.entries()) {
    const { change, grants } = applyGrants(p.d.state, p.lane, plan.grants[i]!, now);
    if (change === undefined) continue;
    const after = await deps.flow.advance(p.d.key, p.d.state.version, change);
    // A writer advanced first: it is granting for this disk already.
    if (after === undefined) continue;
    p.d.state = after;
    if (grants.length > 0) {
      const n = await sendGrants(deps, p.d.key, grants, p.descriptors);
      p.d.granted += n;
      sent += n;
    }
  }
  deps.meter.add('GrantsIssuedByTick', 'Count', sent);
}
