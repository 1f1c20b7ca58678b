// The grant arithmetic on a disk's flow record, pure: low, top-ups, reclaim, grant marks.
import { fitsWindow, type Lane, type LaneQueue, type Limit, planGrants } from '../grant-rule.ts';
import { EBS_BLOCK_SIZE, type FlowAdvance, type FlowState, type GrantMark, type Regrant } from './ports.ts';

// A descriptor granted this many times without completing fails the cycle: each grant already had
// the writers' own retries and the queue's redeliveries behind it, so the chunk is poison, not unlucky.
export const MAX_GRANT_ATTEMPTS = 5;
// Grant marks a flow keeps: with one added at most every leaseMs / MARK_SPACING, six span at least
// 1.25 leases, so the oldest is old enough to reclaim from before it is dropped, and the record stays
// small (each mark is two numbers).
export const MAX_MARKS = 6;
export const MARK_SPACING = 4;

/** One seq to send: a re-grant (attempt > 1) or the cursor's next (attempt 1). */
export interface SeqGrant {
  readonly seq: number;
  readonly attempt: number;
  readonly bytes: number;
}

/** Bytes granted and not completed: what counts against the allowance and the node budget. */
export const inflightOf = (s: FlowState): number => s.grantedBytes - s.completedBytes;

/** The allowance in force at `now`: none once the reservation behind it has lapsed. */
export const capAt = (s: FlowState, now: number): number => (now < s.allowanceUntil ? s.allowance : 0);

/** Where `low` can move: past the completed seqs right above it, never past the cursor. */
export function lowAfter(s: FlowState): { low: number; lowBytes: number; dropDone: number[] } {
  let low = s.low;
  let lowBytes = s.lowBytes;
  const dropDone: number[] = [];
  for (;;) {
    const bytes = s.done.get(low);
    if (bytes === undefined || low >= s.next) break;
    dropDone.push(low);
    lowBytes += bytes;
    low++;
  }
  return { low, lowBytes, dropDone };
}

/** Seqs waiting to be granted again (ascending), those still in [low, next) and not done. */
export function waitingRegrants(s: FlowState, low: number): { seq: number; attempt: number }[] {
  const out: { seq: number; attempt: number }[] = [];
  for (const [seq, r] of s.regrants) {
    if (r.at === undefined && seq >= low && seq < s.next && !s.done.has(seq))
      out.push({ seq, attempt: r.attempt });
  }
  return out.sort((a, b) => a.seq - b.seq);
}

/**
 * Seqs whose descriptors a plan may need: the waiting re-grants, then cursor seqs as far as the
 * window and the allowance could reach with the smallest descriptor (one EBS block), at most `max`.
 * Callers load these descriptors' sizes before planning.
 */
export function lookahead(s: FlowState, total: number, now: number, max: number): number[] {
  const { low, lowBytes } = lowAfter(s);
  const waiting = waitingRegrants(s, low).map((w) => w.seq);
  const span = s.grantedBytes - lowBytes;
  const room = Math.min(Math.max(0, s.window - span), Math.max(0, capAt(s, now) - inflightOf(s)));
  const cursor = Math.min(max, total - s.next, Math.ceil(room / EBS_BLOCK_SIZE) + 1);
  const out = waiting.slice(0, max);
  for (let i = 0; i < cursor; i++) out.push(s.next + i);
  return out;
}

/** A flow as one lane of the grant rule, with what granting from it means for the record. */
export interface PreparedLane {
  readonly lane: LaneQueue;
  /** The grants `lane.upcoming` stands for, in order. */
  readonly upcoming: readonly SeqGrant[];
  readonly low: number;
  readonly lowBytes: number;
  readonly dropDone: readonly number[];
  readonly dropRegrants: readonly number[];
}

/**
 * The flow as a lane of the grant rule. Waiting re-grants come first and lie inside the span; their
 * bytes are still counted in flight by the record (granted, never completed), and granting them
 * again changes no count. So the lane carries the record's in-flight bytes whole, and a re-grant
 * weighs 0 bytes in the rule: it goes while the record's in-flight bytes are within the allowance,
 * and after any plan the lane's in-flight bytes are exactly what the record will derive. `bytesOf`
 * gives a seq's descriptor bytes, or undefined when not loaded: the lane's work stops there. `total`
 * is the disk's descriptor count.
 */
export function prepareLane(
  s: FlowState,
  total: number,
  bytesOf: (seq: number) => number | undefined,
  now: number,
  max: number,
  lastGrant = 0,
): PreparedLane {
  const { low, lowBytes, dropDone } = lowAfter(s);
  const dropRegrants: number[] = [];
  for (const [seq, r] of s.regrants) {
    // Below low or done: complete; waiting but past the cursor cannot happen, drop it all the same.
    if (seq < low || s.done.has(seq) || (r.at === undefined && seq >= s.next)) dropRegrants.push(seq);
  }
  const upcoming: SeqGrant[] = [];
  let blocked = false;
  for (const w of waitingRegrants(s, low)) {
    const bytes = bytesOf(w.seq);
    if (bytes === undefined || upcoming.length >= max) {
      blocked = true;
      break;
    }
    upcoming.push({ seq: w.seq, attempt: w.attempt, bytes });
  }
  const inSpan = upcoming.length;
  if (s.open && !blocked) {
    for (let seq = s.next; seq < total && upcoming.length < max; seq++) {
      const bytes = bytesOf(seq);
      if (bytes === undefined) break;
      upcoming.push({ seq, attempt: 1, bytes });
    }
  }
  const lane: LaneQueue = {
    window: s.window,
    span: s.grantedBytes - lowBytes,
    inflight: inflightOf(s),
    upcoming: s.open ? upcoming.map((u, i) => (i < inSpan ? 0 : u.bytes)) : [],
    inSpan,
    lastGrant,
    cap: capAt(s, now),
  };
  return { lane, upcoming, low, lowBytes, dropDone, dropRegrants };
}

/** What held the lane back after `count` grants: its window, its allowance (`budget`), or nothing. */
export function limitOf(p: PreparedLane, count: number): Limit {
  const weights = p.lane.upcoming;
  const inSpan = p.lane.inSpan ?? 0;
  let added = 0;
  let spanAdded = 0;
  for (let i = 0; i < count; i++) {
    added += weights[i] ?? 0;
    if (i >= inSpan) spanAdded += weights[i] ?? 0;
  }
  const next = weights[count];
  if (next === undefined) return 'none';
  const view: Lane = {
    window: p.lane.window,
    span: p.lane.span + spanAdded,
    inflight: p.lane.inflight + added,
    next,
    nextInSpan: count < inSpan,
    lastGrant: p.lane.lastGrant,
    cap: p.lane.cap,
  };
  if (fitsWindow(view)) return 'none';
  // The window alone would have let it through: the allowance (the node budget's share) held it.
  return fitsWindow({ ...view, cap: undefined }) ? 'budget' : 'window';
}

/**
 * The record change for granting the first `count` of the lane's upcoming (and moving low), or
 * undefined when nothing would change.
 */
export function applyGrants(
  s: FlowState,
  p: PreparedLane,
  count: number,
  now: number,
): { change: FlowAdvance | undefined; grants: SeqGrant[] } {
  const grants = p.upcoming.slice(0, count);
  let next = s.next;
  let grantedBytes = s.grantedBytes;
  const regrants = new Map<number, Regrant>();
  for (const g of grants) {
    if (g.seq < s.next) regrants.set(g.seq, { attempt: g.attempt, at: now });
    else {
      next = g.seq + 1;
      grantedBytes += g.bytes;
    }
  }
  const unchanged =
    grants.length === 0 && p.low === s.low && p.dropDone.length === 0 && p.dropRegrants.length === 0;
  if (unchanged) return { change: undefined, grants };
  return {
    change: {
      low: p.low,
      lowBytes: p.lowBytes,
      dropDone: p.dropDone,
      next,
      grantedBytes,
      regrants,
      dropRegrants: p.dropRegrants,
    },
    grants,
  };
}

export interface AdvancePlan {
  /** The one `advance` to write, or undefined when nothing changes. */
  readonly change: FlowAdvance | undefined;
  readonly grants: SeqGrant[];
  /** What stopped granting: the controller's window-limited and node-pressure evidence. */
  readonly limit: Limit;
}

/**
 * A writer's top-up after its completions: moves low past completed seqs, then grants waiting
 * re-grants and cursor seqs while the grant rule's `fitsWindow` holds with the disk's allowance as
 * its cap, at most `max`. `total` is the disk's descriptor count.
 */
export function planAdvance(
  s: FlowState,
  total: number,
  bytesOf: (seq: number) => number | undefined,
  now: number,
  max: number,
): AdvancePlan {
  const p = prepareLane(s, total, bytesOf, now, max);
  const plan = planGrants([p.lane], { limit: Number.POSITIVE_INFINITY, inflight: 0 }, max);
  const count = plan.grants[0]!;
  return { ...applyGrants(s, p, count, now), limit: limitOf(p, count) };
}

export interface ReclaimPlan {
  /** Seqs to grant again, each with the attempt its next grant will be. */
  readonly addRegrants: Map<number, Regrant>;
  /** A seq that used up its attempts: the cycle fails. */
  readonly exhausted?: { seq: number; attempts: number } | undefined;
}

/**
 * Grants lost or stuck: a seq in [low, next), not done, whose grant time is older than `leaseMs`.
 * Its grant time is its re-grant's `at`, else the time of the oldest mark that already covered it
 * (every seq below a mark's `next` had been granted by its `at`): an upper bound, so a seq is never
 * reclaimed early, only up to a mark's spacing late. Waiting re-grants are not timed.
 */
export function planReclaim(s: FlowState, now: number, leaseMs: number): ReclaimPlan {
  const addRegrants = new Map<number, Regrant>();
  const { low } = lowAfter(s);
  for (let seq = low; seq < s.next; seq++) {
    if (s.done.has(seq)) continue;
    const r = s.regrants.get(seq);
    if (r !== undefined && r.at === undefined) continue;
    const at = r?.at ?? s.marks.find((m) => m.next > seq)?.at;
    if (at === undefined || now - at <= leaseMs) continue;
    const attempt = (r?.attempt ?? 1) + 1;
    if (attempt > MAX_GRANT_ATTEMPTS) return { addRegrants, exhausted: { seq, attempts: attempt - 1 } };
    addRegrants.set(seq, { attempt });
  }
  return { addRegrants };
}

/**
 * The marks to keep: those still covering a seq at or above low, plus a new one for the cursor when
 * it moved and the newest is older than leaseMs / MARK_SPACING; at most MAX_MARKS, oldest dropped.
 */
export function nextMarks(s: FlowState, now: number, leaseMs: number): GrantMark[] {
  const { low } = lowAfter(s);
  const marks = s.marks.filter((m) => m.next > low);
  const newest = marks.at(-1);
  if (
    s.next > low &&
    (newest === undefined || (s.next > newest.next && now - newest.at >= leaseMs / MARK_SPACING))
  ) {
    marks.push({ at: now, next: s.next });
  }
  while (marks.length > MAX_MARKS) marks.shift();
  return marks;
}

/** Whether two mark lists are the same (the tick writes marks only when they change). */
export const sameMarks = (a: readonly GrantMark[], b: readonly GrantMark[]): boolean =>
  a.length === b.length && a.every((m, i) => m.at === b[i]!.at && m.next === b[i]!.next);
