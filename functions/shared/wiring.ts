// Builds each function's dependencies on the cycle core (shared/engine/cycle) from its parsed
// environment and the clients given: the handlers call these once per container with the
// container's SDK clients, the tests with clients pointed at emulators. Nothing here holds a rule;
// it only connects adapters to the core's ports.
import type { DynamoDBClient } from '@aws-sdk/client-dynamodb';
import type { SQSClient } from '@aws-sdk/client-sqs';
import type { DynamoDBDocumentClient } from '@aws-sdk/lib-dynamodb';
import { DynamoCycleLedger } from '../../shared/aws/dynamo/cycle-ledger.ts';
import { DynamoGrantFlow } from '../../shared/aws/dynamo/grant-flow.ts';
import { DynamoNodeBudget } from '../../shared/aws/dynamo/node-budget.ts';
import { DynamoPlanLocks } from '../../shared/aws/dynamo/plan-locks.ts';
import { DynamoStateStore } from '../../shared/aws/dynamo/state-store.ts';
import { SqsGrantChannel } from '../../shared/aws/sqs/grant-channel.ts';
import { DescriptorCache } from '../../shared/engine/cycle/descriptor-cache.ts';
import type { DifferDeps } from '../../shared/engine/cycle/differ.ts';
import type { FinalizeDeps } from '../../shared/engine/cycle/finalize.ts';
import type { EventPublisher, Log, Meter } from '../../shared/engine/cycle/ports.ts';
import type { PrepareDeps } from '../../shared/engine/cycle/prepare.ts';
import type { TickDeps } from '../../shared/engine/cycle/tick.ts';
import { WriterCache, type WriterDeps } from '../../shared/engine/cycle/writer.ts';
import type { Clock, Random } from '../../shared/engine/ports.ts';
import { systemClock, systemRandom } from '../../shared/runtime/clock.ts';
import type { ChunkWriterEnv, DifferEnv, FinalizerEnv, PlannerEnv } from '../contracts.ts';
import type { EbsPorts } from './ebs-binding.ts';

export interface Wiring {
  readonly dynamo: DynamoDBClient | DynamoDBDocumentClient;
  readonly sqs?: SQSClient;
  readonly ebs?: EbsPorts;
  readonly events?: EventPublisher;
  /** Wall-clock time: locks, grant times and signal buckets are shared across Lambdas. */
  readonly clock?: Clock;
  /** Writer batch ids. */
  readonly random?: Random;
  readonly log: Log;
  readonly meter: Meter;
  /** Cap on descriptors per page (tests: small pages exercise paging). */
  readonly maxDescriptorsPerPage?: number;
  /** The grant channel's pause between send retries (tests inject an instant one). */
  readonly queueSleep?: (ms: number, signal?: AbortSignal) => Promise<void>;
}

/** Dependencies a handler completes with the invocation's time left (the Lambda context's). */
type PerContainer<D> = Omit<D, 'remainingMs'>;

export interface PlannerDeps {
  readonly prepare: PrepareDeps;
  readonly tick: PerContainer<TickDeps>;
}
export type DifferContainerDeps = PerContainer<DifferDeps>;
export type FinalizerDeps = PerContainer<FinalizeDeps>;

function need<T>(value: T | undefined, what: string): T {
  if (value === undefined) throw new Error(`wiring: ${what} is required for this function`);
  return value;
}

const clockOf = (w: Wiring): Clock => w.clock ?? systemClock;

function ledgerOf(w: Wiring, table: string): DynamoCycleLedger {
  const clock = clockOf(w);
  return new DynamoCycleLedger(w.dynamo, { table, now: () => clock.now() });
}

function channelOf(w: Wiring, queueUrl: string): SqsGrantChannel {
  return new SqsGrantChannel(
    need(w.sqs, 'an SQS client'),
    queueUrl,
    w.queueSleep === undefined ? {} : { sleep: w.queueSleep },
  );
}

/** The planner's prepare and tick; the tick's descriptor cache lives as long as the container. */
export function plannerDeps(w: Wiring, env: PlannerEnv): PlannerDeps {
  const clock = clockOf(w);
  const ledger = ledgerOf(w, env.TABLE_NAME);
  const flow = new DynamoGrantFlow(w.dynamo, { table: env.TABLE_NAME });
  const locks = new DynamoPlanLocks(w.dynamo, { table: env.TABLE_NAME });
  const lockMs = env.PLAN_LOCK_SECONDS * 1000;
  return {
    prepare: {
      ledger,
      flow,
      locks,
      catalog: new DynamoStateStore(w.dynamo, env.TABLE_NAME),
      writer: need(w.ebs, 'the EBS ports').writer,
      clock,
      log: w.log,
      meter: w.meter,
      nodeBudget: env.NODE_BUDGET,
      lockMs,
      snapshotTimeoutMinutes: env.SNAPSHOT_TIMEOUT_MINUTES,
      kmsKeyArn: env.KMS_KEY_ARN,
      snapshotTags: { [env.SNAPSHOT_TAG_KEY]: env.SNAPSHOT_TAG_VALUE },
      ...(w.maxDescriptorsPerPage === undefined ? {} : { maxDescriptorsPerPage: w.maxDescriptorsPerPage }),
    },
    tick: {
      ledger,
      flow,
      locks,
      budget: new DynamoNodeBudget(w.dynamo, { table: env.TABLE_NAME }),
      channel: channelOf(w, env.QUEUE_URL),
      pages: new DescriptorCache(ledger),
      clock,
      log: w.log,
      meter: w.meter,
      nodeId: env.NODE_ID,
      nodeBudget: env.NODE_BUDGET,
      lockMs,
      leaseMs: env.LEASE_SECONDS * 1000,
      stuckTicks: env.STUCK_TICKS,
      maxGrantsPerTick: env.MAX_GRANTS_PER_TICK,
      marginMs: env.DEADLINE_MARGIN_MS,
    },
  };
}

export function differDeps(w: Wiring, env: DifferEnv): DifferContainerDeps {
  return {
    ledger: ledgerOf(w, env.TABLE_NAME),
    lister: need(w.ebs, 'the EBS ports').lister,
    clock: clockOf(w),
    log: w.log,
    meter: w.meter,
    marginMs: env.DEADLINE_MARGIN_MS,
  };
}

/** The writer's batch deps; its disk records and descriptor pages are cached for the container. */
export function writerDeps(w: Wiring, env: ChunkWriterEnv): WriterDeps {
  const ledger = ledgerOf(w, env.TABLE_NAME);
  const ebs = need(w.ebs, 'the EBS ports');
  return {
    ledger,
    flow: new DynamoGrantFlow(w.dynamo, { table: env.TABLE_NAME }),
    channel: channelOf(w, env.QUEUE_URL),
    reader: ebs.reader,
    writer: ebs.writer,
    cache: new WriterCache(ledger),
    clock: clockOf(w),
    random: w.random ?? systemRandom,
    log: w.log,
    meter: w.meter,
    concurrency: env.WRITER_CONCURRENCY,
    marginMs: env.DEADLINE_MARGIN_MS,
  };
}

export function finalizerDeps(w: Wiring, env: FinalizerEnv): FinalizerDeps {
  return {
    ledger: ledgerOf(w, env.TABLE_NAME),
    flow: new DynamoGrantFlow(w.dynamo, { table: env.TABLE_NAME }),
    locks: new DynamoPlanLocks(w.dynamo, { table: env.TABLE_NAME }),
    budget: new DynamoNodeBudget(w.dynamo, { table: env.TABLE_NAME }),
    catalog: new DynamoStateStore(w.dynamo, env.TABLE_NAME),
    writer: need(w.ebs, 'the EBS ports').writer,
    events: need(w.events, 'an event publisher'),
    clock: clockOf(w),
    log: w.log,
    meter: w.meter,
    nodeId: env.NODE_ID,
    lockMs: env.PLAN_LOCK_SECONDS * 1000,
    marginMs: env.DEADLINE_MARGIN_MS,
  };
}
