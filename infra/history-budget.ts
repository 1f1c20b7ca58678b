// The cycle state machine's loop bounds and the arithmetic that keeps every execution under the Step
// Functions Standard event-history limit (25,000 events). The state machine is built from these
// constants and the tests assert the worst cases below stay under the limit.
//
// Shape: a cycle is one parent execution. Each loop whose length depends on the data (waiting for
// source snapshots, re-invoking the differ, ticking the planner) runs its first passes in the parent
// itself, up to the parent's own bound for that loop (PARENT_*): a small cycle starts no child at all.
// A loop that needs more runs on in CHILD executions of the same state machine (StartExecution .sync:2
// of itself), which enter the same loop states and are bounded in iterations (MAX_*_PER_CHILD); when a
// child runs out of iterations it returns "not finished yet" and the parent starts another child. The
// parent counts its child rounds too, so no execution's history can grow without bound. Chunks never
// pass through Step Functions: grants are SQS messages consumed by the chunk-writer Lambda, so a
// cycle's transitions grow with time (one tick every TICK_WAIT_SECONDS), never with the number of
// chunks.

/** Step Functions Standard: an execution fails when its history reaches this many events. */
export const HISTORY_LIMIT = 25_000;

// ---- timing ------------------------------------------------------------------------------------

/**
 * Seconds between planner ticks. The planner's STUCK_TICKS default (60) assumes 10 s (about ten idle
 * minutes before "stuck"); writers top windows up themselves after every batch, so a tick only
 * re-grants lost grants, adapts windows and shares the node budget, and a longer wait costs
 * throughput only on repairs.
 */
export const TICK_WAIT_SECONDS = 10;
/** Seconds between checks of the source snapshots EC2 is taking (minutes to hours each). */
export const SNAPSHOT_POLL_SECONDS = 60;
/** Seconds between finalize calls while the target snapshots are completing. */
export const FINALIZE_POLL_SECONDS = 60;
/** Differ Lambdas running at once per cycle: ListChangedBlocks/ListSnapshotBlocks share account quotas. */
export const DIFF_CONCURRENCY = 8;
/** Disks per cycle (cycleInputSchema allows 64). */
export const MAX_DISKS = 64;

// ---- bounds --------------------------------------------------------------------------------------

/** Planner ticks one replicate child runs (800 x 10 s: at least 2.2 hours per child). */
export const MAX_TICKS_PER_CHILD = 800;
/** Source snapshot checks one await child runs (1,000 x 60 s: at least 16.7 hours per child). */
export const MAX_SNAPSHOT_POLLS_PER_CHILD = 1000;
/** Differ invocations per disk in one diff child (15 x up to 15 minutes each). */
export const MAX_DIFF_CALLS_PER_CHILD = 15;
/** Children one cycle starts in all (800 replicate children alone are at least 74 days). */
export const MAX_ROUNDS_PER_CYCLE = 800;
/**
 * Source snapshot checks the parent makes itself before it hands the wait to children (10 x 60 s:
 * snapshots of an incremental's changes usually complete within minutes). Bounded by the parent's
 * history: see parentEvents.
 */
export const PARENT_SNAPSHOT_POLLS = 10;
/**
 * Planner ticks the parent runs itself before it hands replication to children (20 x 10 s: a cycle
 * that replicates within about 3 minutes starts no child). Bounded by the parent's history.
 */
export const PARENT_TICKS = 20;
/** Finalize calls before the cycle is aborted (240 x 60 s plus the finalizer's own waiting). */
export const MAX_FINALIZE_CALLS = 240;

// ---- retries (they add history events, so they are part of the budget) ---------------------------

/** Lambda service errors (throttled invoke, 5xx): the invocation never ran or may be retried safely. */
export const LAMBDA_SERVICE_RETRIES = 3;
/** Errors the handler threw that are not known to be permanent (every handler is idempotent). */
export const HANDLER_RETRIES = 2;
/** EC2 API errors on CreateSnapshot / DescribeSnapshots (throttling, rate limits). */
export const EC2_RETRIES = 3;
/** StartExecution of a child failing at the API (throttled, execution limit). */
export const START_CHILD_RETRIES = 3;

// ---- events per state, from the Step Functions history event types --------------------------------
// A Lambda or SDK task: StateEntered, Scheduled, Started, Succeeded, StateExited.
const TASK = 5;
// Each retried attempt adds Scheduled, Started, Failed.
const RETRY = 3;
// Pass, Choice, Wait, Succeed, Fail: StateEntered, StateExited.
const SIMPLE = 2;
// StartExecution .sync: StateEntered, Scheduled, Started, Submitted, Succeeded, StateExited.
const SYNC_TASK = 6;
// Map: MapStateEntered, MapStateStarted, MapStateSucceeded, MapStateExited; each item adds
// MapIterationStarted and MapIterationSucceeded.
const MAP = 4;
const MAP_ITEM = 2;
// ExecutionStarted and ExecutionSucceeded/Failed.
const EXECUTION = 2;

const lambdaTaskWorst = TASK + RETRY * (LAMBDA_SERVICE_RETRIES + HANDLER_RETRIES);
const ec2TaskWorst = TASK + RETRY * EC2_RETRIES;

export interface HistoryEstimate {
  /** Events with no retry at all. */
  readonly nominal: number;
  /** Events if every task used every retry it is allowed. */
  readonly worst: number;
}

/** A replicate child: Route, then per tick: Tick (it carries the count), status Choice, Wait; its report. */
export function replicateChildEvents(): HistoryEstimate {
  const fixed = EXECUTION + SIMPLE /* Route */ + SIMPLE; /* report */
  const perTick = (task: number) => task + SIMPLE /* status */ + SIMPLE; /* wait */
  return {
    nominal: fixed + MAX_TICKS_PER_CHILD * perTick(TASK),
    worst: fixed + MAX_TICKS_PER_CHILD * perTick(lambdaTaskWorst),
  };
}

/** An await child: Route, then per poll a Wait, DescribeSnapshots, a Choice and a count Pass; its report. */
export function awaitChildEvents(): HistoryEstimate {
  const fixed = EXECUTION + SIMPLE /* Route */ + SIMPLE; /* report */
  const perPoll = (task: number) => SIMPLE /* wait */ + task + SIMPLE /* choice */ + SIMPLE; /* count */
  return {
    nominal: fixed + MAX_SNAPSHOT_POLLS_PER_CHILD * perPoll(TASK),
    worst: fixed + MAX_SNAPSHOT_POLLS_PER_CHILD * perPoll(ec2TaskWorst),
  };
}

/** One diff round: a Map over the disks left, one differ call each, and the Choice after it. */
const diffRoundEvents = (disks: number, lambda: number) => MAP + disks * (MAP_ITEM + lambda) + SIMPLE;

/** A diff child: rounds of the diff Map, each followed by a next-round Pass; its report. */
export function diffChildEvents(disks = MAX_DISKS): HistoryEstimate {
  const fixed = EXECUTION + SIMPLE /* Route */ + SIMPLE; /* report */
  const perRound = (lambda: number) => diffRoundEvents(disks, lambda) + SIMPLE; /* next round */
  return {
    nominal: fixed + MAX_DIFF_CALLS_PER_CHILD * perRound(TASK),
    worst: fixed + MAX_DIFF_CALLS_PER_CHILD * perRound(lambdaTaskWorst),
  };
}

/**
 * The parent (the cycle): source snapshots, its own snapshot polls, prepare, its own diff round and
 * ticks, rounds of children (each round: the loop's Choice, a count Pass, StartExecution.sync),
 * finalize polls, and an abort at the end. The clean-up of source snapshots (plan busy, prepare or
 * snapshots failed: about 1,100 events at most) only runs on paths that end before a cycle is
 * prepared, so without finalize calls or replicate rounds: those paths stay far below this worst case.
 */
export function parentEvents(disks = MAX_DISKS): HistoryEstimate {
  const estimate = (lambda: number, ec2: number, startChild: number) => {
    const start = EXECUTION + SIMPLE /* Route */ + SIMPLE; /* start */
    // Per disk: the given? Choice, then CreateSnapshot (or a Pass for a given snapshot: fewer events).
    const snapshots = MAP + disks * (MAP_ITEM + SIMPLE /* given? */ + ec2);
    const polls =
      PARENT_SNAPSHOT_POLLS * (ec2 + SIMPLE /* choice */ + SIMPLE /* count */ + SIMPLE); /* wait */
    const prepare = lambda;
    const diff = diffRoundEvents(disks, lambda);
    const ticks = PARENT_TICKS * (lambda + SIMPLE /* status */ + SIMPLE); /* wait */
    const rounds = MAX_ROUNDS_PER_CYCLE * (SIMPLE /* loop choice */ + SIMPLE /* count */ + startChild);
    const finalize = MAX_FINALIZE_CALLS * (lambda + SIMPLE + SIMPLE + SIMPLE);
    const abort = SIMPLE /* reason? */ + SIMPLE /* reason */ + lambda + SIMPLE; /* fail */
    return start + snapshots + polls + prepare + diff + ticks + rounds + finalize + abort;
  };
  return {
    nominal: estimate(TASK, TASK, SYNC_TASK),
    worst: estimate(lambdaTaskWorst, ec2TaskWorst, SYNC_TASK + RETRY * START_CHILD_RETRIES),
  };
}
