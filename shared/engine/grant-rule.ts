// The one rule that decides which disk gets the next grant: per-disk windows counted from the oldest
// unfinished grant (as TCP counts its send window from the oldest unacknowledged byte), max-min fair
// across disks under the node's in-flight budget. The in-process scheduler, the replication node and
// the serverless planner all decide through this module, so the three agree on the same inputs.
// Pure and synchronous: callers own their state and apply each decision themselves.

/** One disk (or a node session) as the grant rule sees it. Sizes in bytes. */
export interface Lane {
  /** The most the span may reach. */
  readonly window: number;
  /** Bytes from the oldest unfinished grant to the newest, finished ones in between included. */
  readonly span: number;
  /** Bytes granted and not yet completed (what counts against the node budget). */
  readonly inflight: number;
  /** Bytes of the next grant waiting; undefined when the lane has nothing to grant. */
  readonly next: number | undefined;
  /** The next grant is a re-grant already inside the span: it always fits the window. */
  readonly nextInSpan?: boolean | undefined;
  /** Tie break between lanes holding equal bytes: the smaller (granted longest ago) goes first. */
  readonly lastGrant: number;
  /**
   * An extra cap on this lane's in-flight bytes beside the window (the serverless planner's share of
   * the node budget for the disk); none when undefined.
   */
  readonly cap?: number | undefined;
}

/** What held a lane back on its last decision: the controller's window-limited and pressure signals. */
export type Limit = 'none' | 'window' | 'budget';

export interface Budget {
  /** The node's in-flight budget. */
  readonly limit: number;
  /** Bytes in flight across all lanes now. */
  readonly inflight: number;
}

/**
 * Whether the lane's next grant fits its window and cap. An empty span always takes one grant (within
 * the cap), so a window shrunk below a chunk slows a disk, never stalls it.
 */
export function fitsWindow(lane: Lane): boolean {
  if (lane.next === undefined) return false;
  // The cap is a share of the node budget: strict, or the shares could sum past the budget.
  if (lane.cap !== undefined && lane.inflight + lane.next > lane.cap) return false;
  if (lane.nextInSpan === true) return true;
  return lane.span === 0 || lane.span + lane.next <= lane.window;
}

export type Decision =
  /** Grant the next of lane `lane`. */
  | { readonly lane: number }
  /** Nothing fits a window; or the fairest lane's next does not fit the budget (`budgetHeld`). */
  | { readonly lane: undefined; readonly budgetHeld?: number | undefined };

/**
 * One decision. Fairness rule: among lanes whose next grant fits their window, the one with the
 * fewest bytes in flight goes next (max-min fairness), ties to the one granted longest ago. If that
 * lane's next does not fit the node budget, nothing is granted until completions free budget: a
 * large disk cannot keep taking budget that a small disk is waiting for.
 */
export function pickNext(lanes: readonly Lane[], budget: Budget): Decision {
  let best: number | undefined;
  for (let i = 0; i < lanes.length; i++) {
    const lane = lanes[i]!;
    if (!fitsWindow(lane)) continue;
    const b = best === undefined ? undefined : lanes[best]!;
    if (
      b === undefined ||
      lane.inflight < b.inflight ||
      (lane.inflight === b.inflight && lane.lastGrant < b.lastGrant)
    ) {
      best = i;
    }
  }
  if (best === undefined) return { lane: undefined };
  if (budget.inflight + lanes[best]!.next! > budget.limit) return { lane: undefined, budgetHeld: best };
  return { lane: best };
}

/** A lane with the sizes of the grants it has waiting, in order (re-grants first). */
export interface LaneQueue extends Omit<Lane, 'next' | 'nextInSpan'> {
  /** Bytes of each waiting grant, in grant order; a lookahead is enough. */
  readonly upcoming: readonly number[];
  /** How many of `upcoming` (from the front) are re-grants inside the span. */
  readonly inSpan?: number | undefined;
}

export interface Plan {
  /** How many of each lane's `upcoming` to grant, in lane order. */
  readonly grants: number[];
  /** Lane indexes in the order the rule granted them. */
  readonly order: number[];
  /** Per lane, what stopped it: `window` (its window or cap was full with work waiting), `budget`, or `none`. */
  readonly limits: Limit[];
  /** Per lane, in-flight bytes after the plan. */
  readonly inflight: number[];
}

/**
 * Applies `pickNext` repeatedly (at most `max` grants), each decision updating the chosen lane's
 * span and in-flight bytes as a real grant would. The serverless planner plans a tick's grants with
 * it and, with each lane's window as its demand, each disk's share of the node budget.
 */
export function planGrants(
  lanes: readonly LaneQueue[],
  budget: Budget,
  max = Number.POSITIVE_INFINITY,
): Plan {
  const state = lanes.map((l) => ({ ...l, taken: 0 }));
  const grants = lanes.map(() => 0);
  const order: number[] = [];
  const limits: Limit[] = lanes.map(() => 'none');
  let inflight = budget.inflight;
  let tick = Math.max(0, ...lanes.map((l) => l.lastGrant)) + 1;
  const view = (s: (typeof state)[number]): Lane => ({
    window: s.window,
    span: s.span,
    inflight: s.inflight,
    next: s.upcoming[s.taken],
    nextInSpan: s.taken < (s.inSpan ?? 0),
    lastGrant: s.lastGrant,
    cap: s.cap,
  });
  while (order.length < max) {
    const views = state.map(view);
    const d = pickNext(views, { limit: budget.limit, inflight });
    if (d.lane === undefined) {
      if (d.budgetHeld !== undefined) limits[d.budgetHeld] = 'budget';
      break;
    }
    const s = state[d.lane]!;
    const bytes = s.upcoming[s.taken]!;
    const inSpan = s.taken < (s.inSpan ?? 0);
    s.taken++;
    s.inflight += bytes;
    if (!inSpan) s.span += bytes;
    s.lastGrant = tick++;
    inflight += bytes;
    grants[d.lane]!++;
    order.push(d.lane);
  }
  for (let i = 0; i < state.length; i++) {
    const v = view(state[i]!);
    if (limits[i] === 'none' && v.next !== undefined && !fitsWindow(v)) limits[i] = 'window';
  }
  return { grants, order, limits, inflight: state.map((s) => s.inflight) };
}

/**
 * Each lane's share of the node budget: the in-flight bytes the rule would let it reach if every lane
 * asked for its whole window in `unit`-sized grants. Shares never sum past the budget (less what is
 * already in flight beyond them), and every lane with work gets at least one unit when the budget
 * holds one per lane, so no disk starves.
 */
export function shareBudget(
  lanes: readonly Omit<LaneQueue, 'upcoming' | 'inSpan'>[],
  budget: Budget,
  unit: number,
): number[] {
  const queues: LaneQueue[] = lanes.map((l) => {
    const room = Math.max(0, l.window - l.inflight);
    const count = Math.max(l.inflight === 0 ? 1 : 0, Math.floor(room / unit));
    return { ...l, span: l.inflight, cap: undefined, upcoming: Array.from({ length: count }, () => unit) };
  });
  return planGrants(queues, budget).inflight;
}
