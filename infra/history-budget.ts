// The cycle state machine's loop bounds and the arithmetic that keeps every execution under the Step
// Functions Standard event-history limit (25,000 events). The state machine is built from these
// constants and the tests assert the worst cases below stay under the limit.
//
// Shape: a cycle is one parent execution. Every loop whose length depends on the data (waiting for
// source snapshots, re-invoking the differ, ticking the planner) runs in a CHILD execution of the same
// state machine (StartExecution .sync:2 of itself), bounded in iterations; when a child runs out of
// iterations it returns "not finished yet" and the parent starts another child. The parent counts its
// own rounds too, so no execution's history can grow without bound. Chunks never pass through Step
// Functions: grants are SQS messages consumed by the chunk-writer Lambda, so a cycle's transitions
// grow with time (one tick every TICK_WAIT_SECONDS), never with the number of chunks.

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

/** A replicate child: Route, start, then per tick: Tick, status Choice, count Pass, Wait. */
export function replicateChildEvents(): HistoryEstimate {
  const fixed = EXECUTION + SIMPLE /* Route */ + SIMPLE /* start */ + SIMPLE; /* report */
  const perTick = (task: number) => task + SIMPLE /* status */ + SIMPLE /* count */ + SIMPLE; /* wait */
  return {
    nominal: fixed + MAX_TICKS_PER_CHILD * perTick(TASK),
    worst: fixed + MAX_TICKS_PER_CHILD * perTick(lambdaTaskWorst),
  };
}

/** An await child: per poll DescribeSnapshots, a Pass that reads the states, a Choice, a Wait. */
export function awaitChildEvents(): HistoryEstimate {
  const fixed = EXECUTION + SIMPLE /* Route */ + SIMPLE /* start */ + SIMPLE; /* report */
  const perPoll = (task: number) => task + SIMPLE /* read */ + SIMPLE /* choice */ + SIMPLE; /* wait */
  return {
    nominal: fixed + MAX_SNAPSHOT_POLLS_PER_CHILD * perPoll(TASK),
    worst: fixed + MAX_SNAPSHOT_POLLS_PER_CHILD * perPoll(ec2TaskWorst),
  };
}

/** A diff child: a Map over the disks, each looping differ call, done Choice, count Pass. */
export function diffChildEvents(disks = MAX_DISKS): HistoryEstimate {
  const fixed = EXECUTION + SIMPLE /* Route */ + MAP + SIMPLE; /* report */
  const perDisk = (task: number) =>
    MAP_ITEM +
    MAX_DIFF_CALLS_PER_CHILD * (task + SIMPLE /* choice */ + SIMPLE) /* count */ +
    SIMPLE; /* result */
  return { nominal: fixed + disks * perDisk(TASK), worst: fixed + disks * perDisk(lambdaTaskWorst) };
}

/**
 * The parent (the cycle): source snapshots, prepare, then rounds of children (each round: count Pass,
 * budget Choice, StartExecution.sync, outcome Choice), finalize polls, and an abort at the end. The
 * clean-up of source snapshots (plan busy, prepare or snapshots failed: about 1,100 events at most)
 * only runs on paths that end before a cycle is prepared, so without finalize calls or replicate
 * rounds: those paths stay far below this worst case.
 */
export function parentEvents(disks = MAX_DISKS): HistoryEstimate {
  const estimate = (lambda: number, ec2: number, startChild: number) => {
    const start = EXECUTION + SIMPLE /* Route */ + SIMPLE; /* init */
    const snapshots = MAP + disks * (MAP_ITEM + SIMPLE /* given? */ + ec2 + SIMPLE); /* shape */
    const prepare = SIMPLE /* params? */ + SIMPLE /* input */ + lambda + SIMPLE; /* diff init */
    const rounds = MAX_ROUNDS_PER_CYCLE * (SIMPLE + SIMPLE + startChild + SIMPLE);
    const finalize = SIMPLE /* init */ + MAX_FINALIZE_CALLS * (lambda + SIMPLE + SIMPLE + SIMPLE);
    const abort = SIMPLE /* reason? */ + SIMPLE /* reason */ + lambda + SIMPLE; /* fail */
    return start + snapshots + prepare + rounds + finalize + abort;
  };
  return {
    nominal: estimate(TASK, TASK, SYNC_TASK),
    worst: estimate(lambdaTaskWorst, ec2TaskWorst, SYNC_TASK + RETRY * START_CHILD_RETRIES),
  };
}
