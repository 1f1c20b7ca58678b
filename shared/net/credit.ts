// The node's credit allocation: which session gets the next unit of credit, decided by the engine's
// grant rule (grant-rule.ts) over views of the sessions. Pure: the node applies the plan it returns.
import { fitsWindow, type Lane, pickNext } from '../engine/grant-rule.ts';

// Grants go out in whole chunks so that credit split across disks never leaves each of them a
// fraction of a chunk (no disk could send, a deadlock). 1 MiB is the spec's chunk size; a source
// with larger chunks says so in its first WANT or CHUNK and the unit grows to it.
export const INITIAL_GRANT_UNIT = 1024 * 1024;
// A session that has not sent a chunk yet holds one chunk of credit; if it asked for chunks larger
// than INITIAL_GRANT_UNIT, such sessions together hold at most this share of the budget beyond the
// first INITIAL_GRANT_UNIT each. Idle HELLOs asking for 64 MiB chunks cannot take the budget, and a
// first 1 MiB chunk is never held back by them.
export const UNPROVEN_LARGE_SHARE = 0.5;

/** One session as credit allocation sees it (the node's Session is one). Sizes in bytes. */
export interface CreditSession {
  /** Takes part in allocation: has connections, is not idle, finished or going away. */
  readonly wantsCredit: boolean;
  /** Credit granted and not yet used, plus chunks being received or written: its in-flight bytes. */
  readonly held: number;
  /** Grant step: the largest chunk the source has sent or asked for. */
  readonly unit: number;
  /** The most it may hold: its window, bounded by the data it has sent (Session.cap); never below `unit`. */
  readonly cap: number;
  /** It has sent a chunk in this incarnation: a source moving data, not an idle HELLO. */
  readonly proven: boolean;
  /** Order of its last grant; the smaller goes first between sessions holding equal bytes. */
  readonly lastGrantTick: number;
}

/**
 * The session as a lane of the grant rule: what it holds is both its span and its in-flight bytes
 * (credit is consumed in order, so nothing finished sits inside it), its cap is its window, and its
 * next grant is one unit, or before its first chunk what tops it up to one unit.
 */
export function creditLane(s: CreditSession): Lane {
  return s.wantsCredit ? laneOf(s) : { ...laneOf(s), next: undefined };
}

/** Credit the session may be granted next by its window and cap, 0 for none (the budget aside). */
export function creditStep(s: Omit<CreditSession, 'wantsCredit'>): number {
  const lane = laneOf(s);
  return fitsWindow(lane) ? lane.next! : 0;
}

function laneOf(s: Omit<CreditSession, 'wantsCredit'>): Lane {
  const next = s.proven ? s.unit : s.unit - s.held;
  return {
    window: s.cap,
    span: s.held,
    inflight: s.held,
    next: next > 0 ? next : undefined,
    lastGrant: s.lastGrantTick,
  };
}

export interface CreditPlan {
  /** Grants in the order the rule made them: index into the sessions given, and bytes of credit. */
  readonly grants: readonly { readonly session: number; readonly bytes: number }[];
  /** The session whose unit the budget held back (the fairest, so nothing else was granted), if any. */
  readonly budgetHeld: number | undefined;
}

/**
 * Grants credit until the rule stops: windows full, or the fairest session's unit does not fit the
 * budget. Before the rule, the node's own policy filters out unproven sessions asking for large
 * chunks beyond their share (UNPROVEN_LARGE_SHARE). `sessions` must be all of the node's sessions:
 * everything they hold counts against `budget`.
 */
export function allocateCredit(sessions: readonly CreditSession[], budget: number): CreditPlan {
  // Copied field by field: the node's sessions answer these through getters, which a spread drops.
  const state = sessions.map((s) => ({
    wantsCredit: s.wantsCredit,
    held: s.held,
    unit: s.unit,
    cap: s.cap,
    proven: s.proven,
    lastGrantTick: s.lastGrantTick,
  }));
  const grants: { session: number; bytes: number }[] = [];
  const largeShare = Math.floor(budget * UNPROVEN_LARGE_SHARE);
  const isLarge = (s: CreditSession) => !s.proven && s.unit > INITIAL_GRANT_UNIT;
  const beyondFirst = (held: number) => Math.max(0, held - INITIAL_GRANT_UNIT);
  let total = 0;
  // Credit beyond their first INITIAL_GRANT_UNIT held by sessions yet to send a chunk.
  let unprovenLarge = 0;
  for (const s of state) {
    total += s.held;
    if (isLarge(s)) unprovenLarge += beyondFirst(s.held);
  }
  let tick = Math.max(-1, ...state.map((s) => s.lastGrantTick)) + 1;
  for (;;) {
    const lanes = state.map((s) => {
      const lane = creditLane(s);
      // Sessions yet to send a chunk, asking for large ones, share part of the budget.
      if (
        lane.next !== undefined &&
        isLarge(s) &&
        unprovenLarge + lane.next > Math.max(largeShare, s.unit - INITIAL_GRANT_UNIT)
      ) {
        return { ...lane, next: undefined };
      }
      return lane;
    });
    const decision = pickNext(lanes, { limit: budget, inflight: total });
    if (decision.lane === undefined) return { grants, budgetHeld: decision.budgetHeld };
    const s = state[decision.lane]!;
    const bytes = lanes[decision.lane]!.next!;
    if (isLarge(s)) unprovenLarge += beyondFirst(s.held + bytes) - beyondFirst(s.held);
    s.held += bytes;
    s.lastGrantTick = tick++;
    total += bytes;
    grants.push({ session: decision.lane, bytes });
  }
}
