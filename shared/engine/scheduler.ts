// Grants descriptors to workers under two levels of backpressure: each disk's rolling window and
// the node's in-flight budget, shared fairly. Synchronous and pure: the caller owns concurrency.
import type { Descriptor } from './descriptors.ts';
import { FerryError } from './errors.ts';
import { fitsWindow, pickNext, type Lane as RuleLane } from './grant-rule.ts';

/** A descriptor handed to a worker; its bytes are reserved until `complete` or `release`. */
export interface Grant {
  readonly disk: string;
  readonly descriptor: Descriptor;
  /** The disk had more work waiting when this was granted and its window was full afterwards. */
  readonly windowLimited: boolean;
}

interface Lane {
  readonly disk: string;
  readonly pending: Iterator<Descriptor>;
  /** Next descriptor pulled from `pending` but not yet granted (head of line). */
  head: Descriptor | undefined;
  /** Descriptors handed back (a worker gave up before finishing); granted before `pending`. */
  readonly returned: Descriptor[];
  /** Seqs granted and not yet completed or released. */
  readonly outstanding: Set<number>;
  /**
   * Granted descriptors from the oldest unfinished one on, in grant order, with whether each is
   * done. The window bounds their bytes (`span`), as TCP's send window is counted from the oldest
   * unacknowledged byte: a straggler holds the window, so what a crash can lose beyond the last
   * durable watermark never exceeds the window.
   */
  readonly ledger: { seq: number; bytes: number; done: boolean }[];
  ledgerHead: number;
  readonly ledgerIndex: Map<number, { seq: number; bytes: number; done: boolean }>;
  span: number;
  /** Completed bytes not yet durable beyond the checkpoint interval; they count against the window. */
  lag: number;
  window: number;
  inflight: number;
  exhausted: boolean;
  /** Grants issued, for round-robin tie breaks. */
  lastGrantTick: number;
  /** Set when the budget, not the window, held this disk back on its last attempt. */
  budgetLimited: boolean;
}

export interface LaneStats {
  readonly disk: string;
  readonly window: number;
  readonly inflight: number;
  /** Bytes from the oldest unfinished grant to the newest: what the window bounds. */
  readonly span: number;
  readonly done: boolean;
  /** Has descriptors waiting to be granted. */
  readonly backlogged: boolean;
  readonly budgetLimited: boolean;
}

/**
 * Fairness rule (grant-rule.ts `pickNext`, the one rule the node and the serverless planner use too):
 * among disks that have work and window room, the one with the fewest bytes in flight goes next
 * (max-min fairness). If that disk's next chunk does not fit the node budget, nothing is granted
 * until completions free budget — a large disk cannot keep taking budget that a small disk is
 * waiting for. The scheduler only keeps each disk's ledger and shows it to the rule (`view`).
 */
export class Scheduler {
  private readonly lanes = new Map<string, Lane>();
  private inflightTotal = 0;
  private tick = 0;

  constructor(private readonly nodeBudget: number) {
    if (!(nodeBudget > 0)) throw new FerryError(`node budget must be positive, got ${nodeBudget}`);
  }

  addDisk(disk: string, descriptors: Iterable<Descriptor>, window: number): void {
    if (this.lanes.has(disk)) throw new FerryError(`disk ${disk} added twice`, { disk });
    this.lanes.set(disk, {
      disk,
      pending: descriptors[Symbol.iterator](),
      head: undefined,
      returned: [],
      outstanding: new Set(),
      ledger: [],
      ledgerHead: 0,
      ledgerIndex: new Map(),
      span: 0,
      lag: 0,
      window,
      inflight: 0,
      exhausted: false,
      lastGrantTick: -1,
      budgetLimited: false,
    });
  }

  /** Changes a disk's window. Shrinking below what is in flight only stops new grants until it drains. */
  setWindow(disk: string, window: number): void {
    this.lane(disk).window = window;
  }

  /**
   * Completed bytes of the disk that are past the checkpoint interval and not yet durable (a slow
   * state store). They shrink the window until saved, so the bytes a crash can lose — undurable
   * completions plus the span — stay within the interval plus the window.
   */
  setLag(disk: string, bytes: number): void {
    this.lane(disk).lag = Math.max(0, bytes);
  }

  get inflight(): number {
    return this.inflightTotal;
  }

  get budget(): number {
    return this.nodeBudget;
  }

  /** Grants the next descriptor, or undefined when the windows or the budget are full (or all is granted). */
  next(): Grant | undefined {
    const lanes = [...this.lanes.values()];
    const decision = pickNext(
      lanes.map((lane) => this.view(lane)),
      { limit: this.nodeBudget, inflight: this.inflightTotal },
    );
    if (decision.lane === undefined) {
      if (decision.budgetHeld !== undefined) lanes[decision.budgetHeld]!.budgetLimited = true;
      return undefined;
    }
    const best = lanes[decision.lane]!;
    const descriptor = this.peek(best)!;
    best.budgetLimited = false;
    this.take(best);
    best.outstanding.add(descriptor.seq);
    if (!best.ledgerIndex.has(descriptor.seq)) {
      const entry = { seq: descriptor.seq, bytes: descriptor.bytes, done: false };
      best.ledger.push(entry);
      best.ledgerIndex.set(descriptor.seq, entry);
      best.span += descriptor.bytes;
    }
    best.inflight += descriptor.bytes;
    best.lastGrantTick = this.tick++;
    this.inflightTotal += descriptor.bytes;
    const after = this.view(best);
    return {
      disk: best.disk,
      descriptor,
      windowLimited: after.next !== undefined && !fitsWindow(after),
    };
  }

  /** The grant's chunk is written and verified: its bytes are free for the next grant (ACK clock). */
  complete(grant: Grant): void {
    this.free(grant);
    const lane = this.lane(grant.disk);
    lane.ledgerIndex.get(grant.descriptor.seq)!.done = true;
    while (lane.ledgerHead < lane.ledger.length && lane.ledger[lane.ledgerHead]!.done) {
      const entry = lane.ledger[lane.ledgerHead++]!;
      lane.ledgerIndex.delete(entry.seq);
      lane.span -= entry.bytes;
    }
    if (lane.ledgerHead > 1024 && lane.ledgerHead * 2 > lane.ledger.length) {
      lane.ledger.splice(0, lane.ledgerHead);
      lane.ledgerHead = 0;
    }
  }

  /** The worker gave up on the grant (abort, crash); the descriptor goes back to the front of its disk. */
  release(grant: Grant): void {
    this.free(grant);
    this.lane(grant.disk).returned.push(grant.descriptor);
  }

  /** True when every descriptor of the disk has been granted and completed. */
  isDone(disk: string): boolean {
    const lane = this.lane(disk);
    return lane.inflight === 0 && this.peek(lane) === undefined;
  }

  get allDone(): boolean {
    for (const disk of this.lanes.keys()) if (!this.isDone(disk)) return false;
    return true;
  }

  stats(disk: string): LaneStats {
    const lane = this.lane(disk);
    return {
      disk,
      window: lane.window,
      inflight: lane.inflight,
      span: lane.span,
      done: this.isDone(disk),
      backlogged: this.peek(lane) !== undefined,
      budgetLimited: lane.budgetLimited,
    };
  }

  /**
   * The disk as the grant rule sees it. A re-granted descriptor is already inside the span; a new
   * one must fit beside it. Completed bytes a lagging save has not made durable count as span: the
   * save holds new grants until it lands (it always lands or fails the run), even on an empty span,
   * so what a crash can lose stays within the checkpoint interval plus the window.
   */
  private view(lane: Lane): RuleLane {
    const head = this.peek(lane);
    return {
      window: lane.window,
      span: lane.span + lane.lag,
      inflight: lane.inflight,
      next: head?.bytes,
      nextInSpan: head !== undefined && lane.ledgerIndex.has(head.seq),
      lastGrant: lane.lastGrantTick,
    };
  }

  private free(grant: Grant): void {
    const lane = this.lane(grant.disk);
    const bytes = grant.descriptor.bytes;
    if (!lane.outstanding.delete(grant.descriptor.seq)) {
      throw new FerryError(`grant for seq ${grant.descriptor.seq} released twice`, {
        disk: grant.disk,
        seq: grant.descriptor.seq,
      });
    }
    lane.inflight -= bytes;
    this.inflightTotal -= bytes;
  }

  private peek(lane: Lane): Descriptor | undefined {
    if (lane.returned.length > 0) return lane.returned[lane.returned.length - 1];
    if (lane.head === undefined && !lane.exhausted) {
      const r = lane.pending.next();
      if (r.done) lane.exhausted = true;
      else lane.head = r.value;
    }
    return lane.head;
  }

  private take(lane: Lane): void {
    if (lane.returned.length > 0) lane.returned.pop();
    else lane.head = undefined;
  }

  private lane(disk: string): Lane {
    const lane = this.lanes.get(disk);
    if (!lane) throw new FerryError(`unknown disk ${disk}`, { disk });
    return lane;
  }
}
