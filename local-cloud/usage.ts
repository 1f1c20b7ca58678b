// What a local cloud run would be billed for, counted where it happens: every request the handlers'
// SDK clients and the event source mapping send (a middleware on each client's stack, by service and
// operation; DynamoDB in request units from ConsumedCapacity, SQS in 64 KB payload chunks, EBS in
// blocks), Lambda invocations with their measured duration, Step Functions state transitions,
// EventBridge events and EC2 calls. Usage is a tree of counters; a cycle's usage is the difference
// of two snapshots taken around it.
import { PRICES } from './prices.ts';

/** Counters by name (a tree whose leaves are numbers): what `diffUsage` and `sumUsage` walk. */
type Counters = { [name: string]: number | Counters };

export interface Usage {
  /** Requests sent, by service and operation; an SDK retry is another request. */
  requests: Record<string, Record<string, number>>;
  /** The same requests by who sent them (a function, or `event-source`), with DynamoDB's units. */
  byFunction: Record<string, FunctionRequests>;
  dynamodb: {
    /** Read request units (RRU): ConsumedCapacity of reads (an eventually consistent read of 4 KB is 0.5). */
    readUnits: number;
    /** Write request units (WRU): ConsumedCapacity of writes. */
    writeUnits: number;
    /** Conditional writes refused; each is counted as 1 WRU (AWS charges at least that, dynalite reports none). */
    failedConditionalWrites: number;
  };
  sqs: {
    /** Requests as SQS bills them: each 64 KB chunk of a request's payload is one. */
    billedRequests: number;
  };
  /** The grant queue's event source mapping (Lambda's poller): its SQS calls are billed like any. */
  eventSource: { receives: number; emptyReceives: number; messagesReceived: number; deleteBatches: number };
  ebs: {
    /** PutSnapshotBlock calls that wrote their block (what is billed). */
    blocksWritten: number;
    /** GetSnapshotBlock calls that returned their block. */
    blocksRead: number;
    /** ListChangedBlocks and ListSnapshotBlocks calls answered. */
    listRequests: number;
  };
  /** By function: invocations, measured in-process milliseconds and GB-seconds at the deployed memory. */
  lambda: Record<string, { invocations: number; ms: number; gbSeconds: number; unanswered: number }>;
  stepFunctions: {
    executions: number;
    transitions: number;
    /** Transitions by the state entered (or retried): which loops a cycle went round how often. */
    byState: Record<string, number>;
  };
  eventBridge: { events: number };
}

export interface FunctionRequests {
  requests: Record<string, Record<string, number>>;
  dynamodbReadUnits: number;
  dynamodbWriteUnits: number;
  /** Conditional writes DynamoDB refused (ConditionalCheckFailedException): each a write paid for. */
  dynamodbConditionalFailures: number;
}

export function emptyUsage(): Usage {
  return {
    requests: {},
    byFunction: {},
    dynamodb: { readUnits: 0, writeUnits: 0, failedConditionalWrites: 0 },
    sqs: { billedRequests: 0 },
    eventSource: { receives: 0, emptyReceives: 0, messagesReceived: 0, deleteBatches: 0 },
    ebs: { blocksWritten: 0, blocksRead: 0, listRequests: 0 },
    lambda: {},
    stepFunctions: { executions: 0, transitions: 0, byState: {} },
    eventBridge: { events: 0 },
  };
}

function walk(a: Counters, b: Counters, sign: 1 | -1): Counters {
  const out: Counters = {};
  for (const key of new Set([...Object.keys(a), ...Object.keys(b)])) {
    const x = a[key];
    const y = b[key];
    if (typeof x === 'object' || typeof y === 'object') {
      out[key] = walk(typeof x === 'object' ? x : {}, typeof y === 'object' ? y : {}, sign);
    } else {
      out[key] = (x ?? 0) + sign * (y ?? 0);
    }
  }
  return out;
}

/** Drops the operations nobody called (a difference keeps every name either side had). */
function pruned(requests: Usage['requests']): Usage['requests'] {
  const out: Usage['requests'] = {};
  for (const [service, ops] of Object.entries(requests)) {
    const called = Object.entries(ops).filter(([, n]) => n !== 0);
    if (called.length > 0) out[service] = Object.fromEntries(called);
  }
  return out;
}

/** `after` minus `before`: what happened between two snapshots. */
export function diffUsage(after: Usage, before: Usage): Usage {
  const d = walk(after as unknown as Counters, before as unknown as Counters, -1) as unknown as Usage;
  const byFunction = Object.fromEntries(
    Object.entries(d.byFunction).map(([name, f]) => [name, { ...f, requests: pruned(f.requests) }]),
  );
  const byState = Object.fromEntries(Object.entries(d.stepFunctions.byState).filter(([, n]) => n !== 0));
  return {
    ...d,
    requests: pruned(d.requests),
    byFunction,
    stepFunctions: { ...d.stepFunctions, byState },
  };
}

/** The usage of several runs together. */
export function sumUsage(usages: readonly Usage[]): Usage {
  return usages.reduce(
    (sum, u) => walk(sum as unknown as Counters, u as unknown as Counters, 1) as unknown as Usage,
    emptyUsage(),
  );
}

/** DynamoDB operations by the capacity they consume; the others (DescribeTable...) consume none. */
export const DYNAMODB_READS: ReadonlySet<string> = new Set([
  'GetItem',
  'Query',
  'Scan',
  'BatchGetItem',
  'TransactGetItems',
]);
export const DYNAMODB_WRITES: ReadonlySet<string> = new Set([
  'PutItem',
  'UpdateItem',
  'DeleteItem',
  'BatchWriteItem',
  'TransactWriteItems',
]);

const SERVICES: Record<string, string> = {
  DynamoDBClient: 'dynamodb',
  SQSClient: 'sqs',
  EBSClient: 'ebs',
};

/** Where a client's requests come from: a function's, or the event source mapping's poller. */
export type RequestOrigin = 'function' | 'event-source';

/** An SDK v3 client's middleware stack, as far as counting needs it. */
interface SdkClient {
  middlewareStack: {
    add(
      mw: (
        next: (args: { input: Record<string, unknown> }) => Promise<{ output: Record<string, unknown> }>,
        context: { clientName?: string; commandName?: string },
      ) => (args: { input: Record<string, unknown> }) => Promise<{ output: Record<string, unknown> }>,
      opts: { step: 'initialize'; name: string },
    ): void;
  };
}

type Meta = { $metadata?: { attempts?: number } };
const attemptsOf = (x: unknown): number => Math.max(1, (x as Meta | undefined)?.$metadata?.attempts ?? 1);

type Capacity = { CapacityUnits?: number };
function capacityUnits(consumed: unknown): number | undefined {
  if (consumed === undefined || consumed === null) return undefined;
  const all = (Array.isArray(consumed) ? consumed : [consumed]) as Capacity[];
  return all.reduce((sum, c) => sum + (c.CapacityUnits ?? 0), 0);
}

const utf8 = (s: unknown): number => (typeof s === 'string' ? Buffer.byteLength(s) : 0);

/** Payload bytes of an SQS request as billed: what it sends, or what it receives. */
function sqsPayloadBytes(operation: string, input: Record<string, unknown>, output: Record<string, unknown>) {
  if (operation === 'SendMessage') return utf8(input.MessageBody);
  if (operation === 'SendMessageBatch')
    return ((input.Entries ?? []) as { MessageBody?: string }[]).reduce((n, e) => n + utf8(e.MessageBody), 0);
  if (operation === 'ReceiveMessage')
    return ((output.Messages ?? []) as { Body?: string }[]).reduce((n, m) => n + utf8(m.Body), 0);
  return 0;
}

function add(requests: Usage['requests'], service: string, operation: string, n: number): void {
  const ops = requests[service] ?? {};
  requests[service] = ops;
  ops[operation] = (ops[operation] ?? 0) + n;
}

/** The counters of one local cloud; `snapshot` them around a cycle and take the difference. */
export class UsageMeter {
  private readonly usage = emptyUsage();
  private readonly attached = new WeakSet<object>();

  /** `sender` names the function a request is sent from (undefined: outside any invocation). */
  constructor(private readonly sender: () => string | undefined = () => undefined) {}

  /** A deep copy of the counters so far. */
  snapshot(): Usage {
    return structuredClone(this.usage);
  }

  /**
   * Counts every request `client` sends from now on (once per client, whatever the calls). DynamoDB
   * calls that consume capacity are sent with ReturnConsumedCapacity TOTAL, unless the caller asked
   * itself, and the figure is taken off the answer again: the caller sees what it would have seen.
   * A request that never returns (a frozen invocation's) is not counted: it was never sent.
   */
  attach(client: unknown, origin: RequestOrigin): void {
    const c = client as SdkClient;
    if (this.attached.has(c)) return;
    this.attached.add(c);
    c.middlewareStack.add(
      (next, context) => async (args) => {
        const service = SERVICES[context.clientName ?? ''] ?? (context.clientName ?? 'unknown').toLowerCase();
        const operation = (context.commandName ?? 'Unknown').replace(/Command$/, '');
        const inject =
          service === 'dynamodb' &&
          (DYNAMODB_READS.has(operation) || DYNAMODB_WRITES.has(operation)) &&
          args.input.ReturnConsumedCapacity === undefined;
        const by = origin === 'event-source' ? 'event-source' : (this.sender() ?? 'outside');
        let result: { output: Record<string, unknown> };
        try {
          result = await next(
            inject ? { ...args, input: { ...args.input, ReturnConsumedCapacity: 'TOTAL' } } : args,
          );
        } catch (err) {
          this.failed(by, service, operation, attemptsOf(err), err);
          throw err;
        }
        this.answered(by, service, operation, origin, args.input, result.output);
        if (inject) delete result.output.ConsumedCapacity;
        return result;
      },
      { step: 'initialize', name: 'ferryLocalUsage' },
    );
  }

  /** One invocation of `fn` (configured with `memoryMb`), `ms` long as measured here. */
  invocation(fn: string, memoryMb: number, ms: number, answered: boolean): void {
    this.count('lambda', 'Invoke', 1);
    const f = this.usage.lambda[fn] ?? { invocations: 0, ms: 0, gbSeconds: 0, unanswered: 0 };
    this.usage.lambda[fn] = f;
    f.invocations += 1;
    f.ms += ms;
    // Lambda bills duration in 1 ms steps at the configured memory.
    f.gbSeconds += (Math.max(1, Math.ceil(ms)) / 1000) * (memoryMb / 1024);
    if (!answered) f.unanswered += 1;
  }

  /** A state machine execution started (the top one, or a child of StartExecution.sync). */
  execution(): void {
    this.count('states', 'StartExecution', 1);
    this.usage.stepFunctions.executions += 1;
  }

  /** `state` entered, or retried: each is a billed state transition. */
  transition(state: string): void {
    this.count('states', 'StateTransition', 1);
    const sfn = this.usage.stepFunctions;
    sfn.transitions += 1;
    sfn.byState[state] = (sfn.byState[state] ?? 0) + 1;
  }

  /** One PutEvents call with `entries` events. */
  putEvents(entries: number): void {
    this.count('events', 'PutEvents', 1);
    this.usage.eventBridge.events += entries;
  }

  /** An EC2 call (a state's SDK integration, or the finalizer's DescribeSnapshots); EC2 calls are free. */
  ec2(action: string): void {
    this.count('ec2', action.charAt(0).toUpperCase() + action.slice(1), 1);
  }

  private count(service: string, operation: string, n: number, by?: string): void {
    add(this.usage.requests, service, operation, n);
    if (by !== undefined) add(this.sent(by).requests, service, operation, n);
  }

  private sent(by: string): FunctionRequests {
    const f = this.usage.byFunction[by] ?? {
      requests: {},
      dynamodbReadUnits: 0,
      dynamodbWriteUnits: 0,
      dynamodbConditionalFailures: 0,
    };
    this.usage.byFunction[by] = f;
    return f;
  }

  private answered(
    by: string,
    service: string,
    operation: string,
    origin: RequestOrigin,
    input: Record<string, unknown>,
    output: Record<string, unknown>,
  ): void {
    const attempts = attemptsOf(output);
    this.count(service, operation, attempts, by);
    const u = this.usage;
    if (service === 'dynamodb') {
      const units = capacityUnits(output.ConsumedCapacity) ?? 0;
      if (DYNAMODB_READS.has(operation)) {
        u.dynamodb.readUnits += units;
        this.sent(by).dynamodbReadUnits += units;
      }
      if (DYNAMODB_WRITES.has(operation)) {
        u.dynamodb.writeUnits += units;
        this.sent(by).dynamodbWriteUnits += units;
      }
    } else if (service === 'sqs') {
      const bytes = sqsPayloadBytes(operation, input, output);
      u.sqs.billedRequests += attempts * Math.max(1, Math.ceil(bytes / PRICES.sqs.payloadChunkBytes));
      if (origin === 'event-source' && operation === 'ReceiveMessage') {
        const received = ((output.Messages ?? []) as unknown[]).length;
        u.eventSource.receives += attempts;
        u.eventSource.messagesReceived += received;
        if (received === 0) u.eventSource.emptyReceives += 1;
      }
      if (origin === 'event-source' && operation === 'DeleteMessageBatch') u.eventSource.deleteBatches += 1;
    } else if (service === 'ebs') {
      if (operation === 'PutSnapshotBlock') u.ebs.blocksWritten += 1;
      if (operation === 'GetSnapshotBlock') u.ebs.blocksRead += 1;
      if (operation === 'ListChangedBlocks' || operation === 'ListSnapshotBlocks') u.ebs.listRequests += 1;
    }
  }

  private failed(by: string, service: string, operation: string, attempts: number, err: unknown): void {
    this.count(service, operation, attempts, by);
    if (service === 'sqs') this.usage.sqs.billedRequests += attempts;
    // A refused conditional write still consumes write capacity (at least 1 WRU, more for a large item).
    if (
      service === 'dynamodb' &&
      DYNAMODB_WRITES.has(operation) &&
      (err as { name?: string } | undefined)?.name === 'ConditionalCheckFailedException'
    ) {
      this.usage.dynamodb.failedConditionalWrites += 1;
      this.usage.dynamodb.writeUnits += 1;
      this.sent(by).dynamodbWriteUnits += 1;
      this.sent(by).dynamodbConditionalFailures += 1;
    }
  }
}
