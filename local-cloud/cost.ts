// A cycle's measured usage priced: requests per chunk and per GiB, dollars per GiB by service, the
// overhead ratio (everything beyond the EBS direct API fees, over those fees), and its Step Functions
// transitions split into Wait-loop passes and the fixed path. Pure: the usage comes from
// local-cloud/usage.ts, the prices from local-cloud/prices.ts, the Wait loops from local-cloud/asl.ts.

import type { WaitLoop } from './asl.ts';
import { PRICES, type Prices } from './prices.ts';
import { DYNAMODB_READS, DYNAMODB_WRITES, type Usage } from './usage.ts';

const GiB = 1024 ** 3;

/** What a cycle replicated: its descriptors (chunks), their blocks and bytes. */
export interface CycleWork {
  /** Descriptors the cycle completed; each counts once, however often it was written. */
  readonly chunks: number;
  readonly blocks: number;
  readonly bytes: number;
  /** Where the figures come from: the finalizer's published checkpoint, or the last tick's progress. */
  readonly source: 'finalizer' | 'tick' | 'none';
}

/** Counts per chunk (or per GiB). DynamoDB reads and writes are request units (RRU, WRU). */
export interface UnitCounts {
  readonly dynamodbWrites: number;
  readonly dynamodbReads: number;
  readonly dynamodbWriteRequests: number;
  readonly dynamodbReadRequests: number;
  readonly sqsRequests: number;
  readonly sqsEmptyReceives: number;
  readonly lambdaInvocations: number;
  readonly lambdaGbSeconds: number;
  readonly stepFunctionsTransitions: number;
  readonly ebsPutSnapshotBlock: number;
  readonly ebsGetSnapshotBlock: number;
}

/** Per chunk, by the function that sent the requests (`event-source`: the mapping's poller). */
export interface FunctionCounts {
  readonly dynamodbWrites: number;
  readonly dynamodbReads: number;
  readonly dynamodbWriteRequests: number;
  readonly dynamodbReadRequests: number;
  /** Conditional writes refused (counted in the writes and the WRU above). */
  readonly dynamodbConditionalFailures: number;
  readonly sqsRequests: number;
  readonly ebsRequests: number;
  readonly invocations: number;
  readonly gbSeconds: number;
}

/** Dollars by service; `ebsDirect` is the three EBS lines, `overhead` all the others. */
export interface ServiceCosts {
  readonly ebsPutSnapshotBlock: number;
  readonly ebsGetSnapshotBlock: number;
  readonly ebsList: number;
  readonly dynamodbWrites: number;
  readonly dynamodbReads: number;
  readonly sqs: number;
  readonly lambdaRequests: number;
  readonly lambdaDuration: number;
  readonly stepFunctions: number;
  readonly eventBridge: number;
  readonly ebsDirect: number;
  readonly overhead: number;
  readonly total: number;
}

export interface CycleCost {
  readonly chunks: number;
  readonly blocks: number;
  readonly bytes: number;
  readonly workSource: CycleWork['source'];
  /** Requests by service and operation. */
  readonly requests: Usage['requests'];
  /** DynamoDB reads and writes below are in request units (ConsumedCapacity), not requests. */
  readonly dynamodbUnits: 'request-units';
  /** Lambda duration is in-process time on emulators, not AWS's. */
  readonly lambdaDurationSource: 'measured-local';
  /** Absent for a cycle that replicated nothing. */
  readonly perChunk?: UnitCounts;
  readonly perGiB?: UnitCounts;
  readonly perChunkByFunction?: Readonly<Record<string, FunctionCounts>>;
  readonly costPerGiB?: ServiceCosts;
  readonly costPerCycle: ServiceCosts;
  /** (DynamoDB + SQS + Lambda + Step Functions + EventBridge) / EBS direct API fees; absent without fees. */
  readonly overheadRatio?: number;
}

const sum = (xs: Iterable<number>): number => {
  let s = 0;
  for (const x of xs) s += x;
  return s;
};

function unitCounts(u: Usage): UnitCounts {
  const ddb = Object.entries(u.requests.dynamodb ?? {});
  const lambda = Object.values(u.lambda);
  return {
    dynamodbWrites: u.dynamodb.writeUnits,
    dynamodbReads: u.dynamodb.readUnits,
    dynamodbWriteRequests: sum(ddb.filter(([op]) => DYNAMODB_WRITES.has(op)).map(([, n]) => n)),
    dynamodbReadRequests: sum(ddb.filter(([op]) => DYNAMODB_READS.has(op)).map(([, n]) => n)),
    sqsRequests: sum(Object.values(u.requests.sqs ?? {})),
    sqsEmptyReceives: u.eventSource.emptyReceives,
    lambdaInvocations: sum(lambda.map((f) => f.invocations)),
    lambdaGbSeconds: sum(lambda.map((f) => f.gbSeconds)),
    stepFunctionsTransitions: u.stepFunctions.transitions,
    ebsPutSnapshotBlock: u.requests.ebs?.PutSnapshotBlock ?? 0,
    ebsGetSnapshotBlock: u.requests.ebs?.GetSnapshotBlock ?? 0,
  };
}

function byFunction(u: Usage): Record<string, FunctionCounts> {
  const out: Record<string, FunctionCounts> = {};
  for (const name of new Set([...Object.keys(u.byFunction), ...Object.keys(u.lambda)])) {
    const f = u.byFunction[name];
    const ddb = Object.entries(f?.requests.dynamodb ?? {});
    out[name] = {
      dynamodbWrites: f?.dynamodbWriteUnits ?? 0,
      dynamodbReads: f?.dynamodbReadUnits ?? 0,
      dynamodbWriteRequests: sum(ddb.filter(([op]) => DYNAMODB_WRITES.has(op)).map(([, n]) => n)),
      dynamodbReadRequests: sum(ddb.filter(([op]) => DYNAMODB_READS.has(op)).map(([, n]) => n)),
      dynamodbConditionalFailures: f?.dynamodbConditionalFailures ?? 0,
      sqsRequests: sum(Object.values(f?.requests.sqs ?? {})),
      ebsRequests: sum(Object.values(f?.requests.ebs ?? {})),
      invocations: u.lambda[name]?.invocations ?? 0,
      gbSeconds: u.lambda[name]?.gbSeconds ?? 0,
    };
  }
  return out;
}

/** Each value divided by `n` (per chunk, per GiB). */
function per<T extends object>(values: T, n: number): T {
  return Object.fromEntries(Object.entries(values).map(([k, v]) => [k, (v as number) / n])) as T;
}

/** The cycle's usage priced with `prices`. */
export function serviceCosts(u: Usage, prices: Prices = PRICES): ServiceCosts {
  const lambda = Object.values(u.lambda);
  const lines = {
    ebsPutSnapshotBlock: u.ebs.blocksWritten * prices.ebs.putSnapshotBlock,
    ebsGetSnapshotBlock: u.ebs.blocksRead * prices.ebs.getSnapshotBlock,
    ebsList: u.ebs.listRequests * prices.ebs.listRequest,
    dynamodbWrites: u.dynamodb.writeUnits * prices.dynamodb.writeRequestUnit,
    dynamodbReads: u.dynamodb.readUnits * prices.dynamodb.readRequestUnit,
    sqs: u.sqs.billedRequests * prices.sqs.request,
    lambdaRequests: sum(lambda.map((f) => f.invocations)) * prices.lambda.request,
    lambdaDuration: sum(lambda.map((f) => f.gbSeconds)) * prices.lambda.gbSecondArm64,
    stepFunctions: u.stepFunctions.transitions * prices.stepFunctions.stateTransition,
    eventBridge: u.eventBridge.events * prices.eventBridge.customEvent,
  };
  const ebsDirect = lines.ebsPutSnapshotBlock + lines.ebsGetSnapshotBlock + lines.ebsList;
  const overhead =
    lines.dynamodbWrites +
    lines.dynamodbReads +
    lines.sqs +
    lines.lambdaRequests +
    lines.lambdaDuration +
    lines.stepFunctions +
    lines.eventBridge;
  return { ...lines, ebsDirect, overhead, total: ebsDirect + overhead };
}

/** Per chunk, per GiB and in dollars: what `usage` costs for the `work` it did. */
export function cycleCost(usage: Usage, work: CycleWork, prices: Prices = PRICES): CycleCost {
  const costPerCycle = serviceCosts(usage, prices);
  const counts = unitCounts(usage);
  const gib = work.bytes / GiB;
  return {
    chunks: work.chunks,
    blocks: work.blocks,
    bytes: work.bytes,
    workSource: work.source,
    requests: usage.requests,
    dynamodbUnits: 'request-units',
    lambdaDurationSource: 'measured-local',
    ...(work.chunks > 0
      ? {
          perChunk: per(counts, work.chunks),
          perChunkByFunction: Object.fromEntries(
            Object.entries(byFunction(usage)).map(([name, c]) => [name, per(c, work.chunks)]),
          ),
        }
      : {}),
    ...(gib > 0 ? { perGiB: per(counts, gib), costPerGiB: per(costPerCycle, gib) } : {}),
    costPerCycle,
    ...(costPerCycle.ebsDirect > 0 ? { overheadRatio: costPerCycle.overhead / costPerCycle.ebsDirect } : {}),
  };
}

/** One Wait loop's share of a cycle's transitions. */
export interface WaitLoopTransitions {
  readonly wait: string;
  /** The Wait's synthesized duration; what a pass costs in time on AWS. */
  readonly seconds: number | undefined;
  /** Times the Wait was entered: passes around the loop. */
  readonly passes: number;
  readonly statesPerPass: number;
  /** passes × statesPerPass: what waiting cost, on top of the cycle's fixed path. */
  readonly transitions: number;
}

/**
 * A cycle's Step Functions transitions split into the passes around its Wait loops (ticks while the
 * writers work, polls while snapshots complete: they grow with how long the cycle takes, so with its
 * size over its throughput, and with how long the Waits are) and the rest, its fixed path (snapshot,
 * prepare, diff, the first tick and finalize, child executions): the same for any cycle size.
 */
export interface TransitionBreakdown {
  readonly transitions: number;
  readonly executions: number;
  readonly waitLoops: readonly WaitLoopTransitions[];
  readonly outsideWaitLoops: number;
}

export function transitionBreakdown(u: Usage, loops: readonly WaitLoop[]): TransitionBreakdown {
  const byState = u.stepFunctions.byState ?? {};
  const waitLoops = loops.map((l) => {
    const passes = byState[l.wait] ?? 0;
    return {
      wait: l.wait,
      seconds: l.seconds,
      passes,
      statesPerPass: l.states.length,
      transitions: passes * l.states.length,
    };
  });
  return {
    transitions: u.stepFunctions.transitions,
    executions: u.stepFunctions.executions,
    waitLoops,
    outsideWaitLoops: u.stepFunctions.transitions - sum(waitLoops.map((l) => l.transitions)),
  };
}
