// What every handler shares: SDK clients created once per container, Powertools logging and metrics
// behind the Log/Meter ports, and the invocation wrapper (context keys, metrics flush, error logs).
import { Logger } from '@aws-lambda-powertools/logger';
import { Metrics, MetricUnit } from '@aws-lambda-powertools/metrics';
import { DynamoDBClient } from '@aws-sdk/client-dynamodb';
import type { EBSClient } from '@aws-sdk/client-ebs';
import { SQSClient } from '@aws-sdk/client-sqs';
import type { Context } from 'aws-lambda';
import { createEbsClient } from '../../shared/aws/ebs/client.ts';
import { type Log, type Meter, noMeter, silentLog } from '../../shared/engine/cycle/ports.ts';
import { errorMessage, FerryError } from '../../shared/engine/errors.ts';

// Clients are module state on purpose: one per container, reused by every warm invocation. Region
// and credentials come from the Lambda environment; AWS_ENDPOINT_URL_<SERVICE> (the SDK's own
// variables) points them at emulators for the local run.
let dynamo: DynamoDBClient | undefined;
let sqs: SQSClient | undefined;
let ebs: EBSClient | undefined;

/** Sees every client `clients` creates (to add middleware to its stack). */
export type ClientHook = (client: DynamoDBClient | SQSClient | EBSClient) => void;
const clientHooks: ClientHook[] = [];

/**
 * For hosts that are not the Lambda runtime (the local cloud: its fault switches and request
 * counters): `hook` is called with every client created so far and with each one created later.
 * Never set in Lambda.
 */
export function onClientCreated(hook: ClientHook): void {
  clientHooks.push(hook);
  for (const client of [dynamo, sqs, ebs]) if (client !== undefined) hook(client);
}

function created<C extends DynamoDBClient | SQSClient | EBSClient>(client: C): C {
  for (const hook of clientHooks) hook(client);
  return client;
}

export const clients = {
  dynamo: (): DynamoDBClient => {
    dynamo ??= created(new DynamoDBClient({}));
    return dynamo;
  },
  sqs: (): SQSClient => {
    // The grant queue is in the function's region, so the client's own endpoint reaches it; and
    // where AWS_ENDPOINT_URL_SQS names an emulator, that endpoint (not the queue URL's host) is used.
    sqs ??= created(new SQSClient({ useQueueUrlAsEndpoint: false }));
    return sqs;
  },
  // One retry layer: the adapter retries with backoff and reports throttling to the controller, so
  // the SDK must not retry underneath it (createEbsClient sets maxAttempts 1 and keep-alive sockets).
  ebs: (): EBSClient => {
    ebs ??= created(createEbsClient());
    return ebs;
  },
};

/** Logging and metrics for one function; tests pass `silentObservability`. */
export interface Observability {
  readonly log: Log;
  readonly meter: Meter;
  /** Called at the start of each invocation. */
  begin(context: Context | undefined): void;
  /** Keys every further log line of this invocation carries (plan, cycle, action). */
  annotate(keys: Record<string, string | number | undefined>): void;
  /** Called at the end of each invocation: flushes metrics. */
  end(): void;
}

const UNITS = {
  Count: MetricUnit.Count,
  Bytes: MetricUnit.Bytes,
  Milliseconds: MetricUnit.Milliseconds,
  Seconds: MetricUnit.Seconds,
};

/** Powertools Logger + Metrics (EMF) for a function; service name and namespace from the environment. */
export function powertools(serviceName: string): Observability {
  const logger = new Logger({ serviceName });
  const metrics = new Metrics({
    serviceName,
    namespace: process.env.POWERTOOLS_METRICS_NAMESPACE ?? 'Ferry',
  });
  let coldStart = true;
  return {
    log: {
      debug: (m, e) => logger.debug(m, e ?? {}),
      info: (m, e) => logger.info(m, e ?? {}),
      warn: (m, e) => logger.warn(m, e ?? {}),
      error: (m, e) => logger.error(m, e ?? {}),
    },
    meter: {
      add: (name, unit, value, dimensions) => {
        if (dimensions === undefined) {
          metrics.addMetric(name, UNITS[unit], value);
          return;
        }
        // A metric with its own dimensions is its own EMF record (published at once); it keeps the
        // default `service` dimension, which the alarms include.
        const single = metrics.singleMetric();
        single.addDimensions({ ...dimensions });
        single.addMetric(name, UNITS[unit], value);
      },
    },
    begin(context) {
      logger.resetKeys();
      if (context !== undefined) logger.addContext(context);
      if (coldStart) {
        metrics.captureColdStartMetric();
        coldStart = false;
      }
    },
    annotate(keys) {
      logger.appendKeys(
        Object.fromEntries(Object.entries(keys).filter(([, v]) => v !== undefined)) as Record<string, string>,
      );
    },
    end() {
      // An invocation that failed before counting anything has nothing to flush (and no warning to log).
      if (metrics.hasStoredMetrics()) metrics.publishStoredMetrics();
    },
  };
}

/** No logs, no metrics: for tests and tools that call the handlers in-process. */
export const silentObservability: Observability = {
  log: silentLog,
  meter: noMeter,
  begin() {},
  annotate() {},
  end() {},
};

// Without a Lambda context (a direct call) an invocation gets as long as Lambda's longest (15
// minutes): the deadlines derived from it become timers, and a timer past 2^31 ms fires at once.
const NO_CONTEXT_REMAINING_MS = 15 * 60 * 1000;

/** Milliseconds left in the invocation; without a context (a direct call), Lambda's longest. */
export function remainingTime(context: Context | undefined): () => number {
  return () => context?.getRemainingTimeInMillis?.() ?? NO_CONTEXT_REMAINING_MS;
}

/**
 * Runs one invocation: context keys on every log line, an error log naming the cycle (never a stack
 * of block data), metrics flushed either way. The error is rethrown unchanged: its `name` is what
 * the state machine's Catch matches.
 */
export async function invoke<T>(
  obs: Observability,
  context: Context | undefined,
  run: (annotate: Observability['annotate']) => Promise<T>,
): Promise<T> {
  obs.begin(context);
  try {
    return await run((keys) => obs.annotate(keys));
  } catch (err) {
    obs.log.error('invocation failed', {
      error: errorMessage(err),
      errorName: err instanceof Error ? err.name : 'Error',
      ...(err instanceof FerryError && err.disk !== undefined ? { disk: err.disk } : {}),
    });
    throw err;
  } finally {
    obs.end();
  }
}
