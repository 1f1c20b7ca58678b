// Builds each function's dependencies from its parsed environment and the clients given: the
// handlers call these with the container's SDK clients, the tests and the local run with clients
// pointed at emulators. Nothing here holds a rule; it only connects adapters.
import type { DynamoDBClient } from '@aws-sdk/client-dynamodb';
import type { SQSClient } from '@aws-sdk/client-sqs';
import type { DynamoDBDocumentClient } from '@aws-sdk/lib-dynamodb';
import {
  DynamoBudget,
  DynamoGrants,
  DynamoPlanLocks,
  DynamoWindows,
} from '../../shared/aws/dynamo/budget.ts';
import { DynamoStateStore } from '../../shared/aws/dynamo/state-store.ts';
import { GrantQueue } from '../../shared/aws/sqs/grant-queue.ts';
import type { ChunkWriterEnv, DifferEnv, FinalizerEnv, PlannerEnv } from '../contracts.ts';
import type { WriterDeps } from './chunk-writer.ts';
import { CycleStore } from './cycle-store.ts';
import type { DifferDeps } from './differ.ts';
import type { EbsPorts } from './ebs-binding.ts';
import type { FinalizerDeps } from './finalizer.ts';
import { DescriptorCache, type GrantingDeps } from './granting.ts';
import type { PlannerDeps } from './planner.ts';
import type { EventPublisher, Log, Meter, Now } from './ports.ts';

export interface Wiring {
  readonly dynamo: DynamoDBClient | DynamoDBDocumentClient;
  readonly sqs?: SQSClient;
  readonly ebs?: EbsPorts;
  readonly events?: EventPublisher;
  readonly now?: Now;
  readonly log: Log;
  readonly meter: Meter;
  /** Per-invocation time left; the handlers replace it with the Lambda context's. */
  readonly remainingMs?: () => number;
  /** Cap on descriptors per page (tests: small pages exercise paging). */
  readonly maxDescriptorsPerPage?: number;
  /** Grant queue options (tests inject an instant sleep). */
  readonly queueSleep?: (ms: number, signal?: AbortSignal) => Promise<void>;
}

function need<T>(value: T | undefined, what: string): T {
  if (value === undefined) throw new Error(`wiring: ${what} is required for this function`);
  return value;
}

function granting(w: Wiring, env: PlannerEnv | ChunkWriterEnv): GrantingDeps & { store: CycleStore } {
  const store = new CycleStore(w.dynamo, env.TABLE_NAME);
  const budget = new DynamoBudget(w.dynamo, {
    table: env.TABLE_NAME,
    node: env.NODE_ID,
    capacityBytes: env.NODE_BUDGET,
  });
  return {
    store,
    grants: new DynamoGrants(w.dynamo, { table: env.TABLE_NAME }, budget),
    windows: new DynamoWindows(w.dynamo, { table: env.TABLE_NAME }),
    queue: new GrantQueue(
      need(w.sqs, 'an SQS client'),
      env.QUEUE_URL,
      w.queueSleep === undefined ? {} : { sleep: w.queueSleep },
    ),
    pages: new DescriptorCache(store),
    now: w.now ?? Date.now,
    leaseMs: env.LEASE_SECONDS * 1000,
    log: w.log,
  };
}

export function plannerDeps(w: Wiring, env: PlannerEnv): PlannerDeps {
  const g = granting(w, env);
  return {
    ...g,
    state: new DynamoStateStore(w.dynamo, env.TABLE_NAME),
    locks: new DynamoPlanLocks(w.dynamo, { table: env.TABLE_NAME }),
    writer: need(w.ebs, 'the EBS ports').writer,
    meter: w.meter,
    nodeBudget: env.NODE_BUDGET,
    lockMs: env.PLAN_LOCK_SECONDS * 1000,
    stuckTicks: env.STUCK_TICKS,
    maxGrantsPerTick: env.MAX_GRANTS_PER_TICK,
    snapshotTimeoutMinutes: env.SNAPSHOT_TIMEOUT_MINUTES,
    kmsKeyArn: env.KMS_KEY_ARN,
    snapshotTags: { [env.SNAPSHOT_TAG_KEY]: env.SNAPSHOT_TAG_VALUE },
    ...(w.maxDescriptorsPerPage === undefined ? {} : { maxDescriptorsPerPage: w.maxDescriptorsPerPage }),
    ...(w.remainingMs === undefined ? {} : { remainingMs: w.remainingMs }),
    marginMs: env.DEADLINE_MARGIN_MS,
  };
}

export function writerDeps(w: Wiring, env: ChunkWriterEnv): WriterDeps {
  const g = granting(w, env);
  const ebs = need(w.ebs, 'the EBS ports');
  return {
    ...g,
    queue: g.queue as GrantQueue,
    reader: ebs.reader,
    writer: ebs.writer,
    concurrency: env.WRITER_CONCURRENCY,
    marginMs: env.DEADLINE_MARGIN_MS,
    meter: w.meter,
  };
}

export function differDeps(w: Wiring, env: DifferEnv): DifferDeps {
  return {
    store: new CycleStore(w.dynamo, env.TABLE_NAME),
    lister: need(w.ebs, 'the EBS ports').lister,
    now: w.now ?? Date.now,
    log: w.log,
    meter: w.meter,
    remainingMs: w.remainingMs ?? (() => Number.MAX_SAFE_INTEGER),
    marginMs: env.DEADLINE_MARGIN_MS,
  };
}

export function finalizerDeps(w: Wiring, env: FinalizerEnv): FinalizerDeps {
  const budget = new DynamoBudget(w.dynamo, {
    table: env.TABLE_NAME,
    node: env.NODE_ID,
    capacityBytes: env.NODE_BUDGET,
  });
  return {
    store: new CycleStore(w.dynamo, env.TABLE_NAME),
    grants: new DynamoGrants(w.dynamo, { table: env.TABLE_NAME }, budget),
    state: new DynamoStateStore(w.dynamo, env.TABLE_NAME),
    locks: new DynamoPlanLocks(w.dynamo, { table: env.TABLE_NAME }),
    writer: need(w.ebs, 'the EBS ports').writer,
    events: need(w.events, 'an event publisher'),
    now: w.now ?? Date.now,
    log: w.log,
    meter: w.meter,
    lockMs: env.PLAN_LOCK_SECONDS * 1000,
    remainingMs: w.remainingMs ?? (() => Number.MAX_SAFE_INTEGER),
    marginMs: env.DEADLINE_MARGIN_MS,
  };
}
