// The SQS grant queue under the cycle's GrantChannel (grant-channel.ts): sending encoded grants in
// batches with per-entry retries, giving a received grant back (visibility), deleting and counting
// messages, and creating a queue with its DLQ for tests and the local cloud. Receiving is the Lambda
// event source mapping's; the writer decodes what it delivers.

import { setTimeout as delay } from 'node:timers/promises';
import {
  type BatchResultErrorEntry,
  ChangeMessageVisibilityCommand,
  CreateQueueCommand,
  DeleteMessageBatchCommand,
  type DeleteMessageBatchCommandOutput,
  DeleteMessageCommand,
  GetQueueAttributesCommand,
  SendMessageBatchCommand,
  type SendMessageBatchRequestEntry,
  type SQSClient,
} from '@aws-sdk/client-sqs';
import type { Grant } from '../../engine/cycle/ports.ts';
import {
  AbortedError,
  ConfigError,
  type ErrorContext,
  errorMessage,
  TransferError,
} from '../../engine/errors.ts';
import type { Random } from '../../engine/ports.ts';
import { SQS_MAX_BATCH_ENTRIES } from './grant-message.ts';

// SQS's own bound on a visibility timeout; checked here so a bad value is a ConfigError, not a 400.
const MAX_VISIBILITY_SECONDS = 12 * 60 * 60;

// Entry failures that are not the sender's fault (an SQS node hiccup) usually clear within a second
// or two: 5 rounds with backoff from 50 ms doubling (≤ 50+100+200+400 ms of jitter ceilings, under a
// second in all) ride that out without holding a planner invocation for long. Whole-call failures
// are the SDK's own retry's business, and then the caller's.
const DEFAULT_SEND_ATTEMPTS = 5;
const ENTRY_RETRY_BASE_MS = 50;
const ENTRY_RETRY_MAX_MS = 2_000;

export interface GrantQueueOptions {
  /** Rounds of SendMessageBatch / DeleteMessageBatch for entries that failed server-side (default 5). */
  readonly entryAttempts?: number;
  /** Waits between those rounds; tests inject an instant one. */
  readonly sleep?: (ms: number, signal?: AbortSignal) => Promise<void>;
  readonly random?: Random;
}

export interface QueueDepth {
  /** Waiting to be received. Approximate, and it lags after visibility timeouts lapse. */
  readonly visible: number;
  /** Received and neither deleted nor lapsed: grants being written. */
  readonly inFlight: number;
  readonly delayed: number;
}

export interface EntryFailure {
  readonly receipt: string;
  readonly code: string;
  readonly message: string;
}

/**
 * Some grants were not sent. `unsent` are exactly the grants not confirmed by SQS (those of later
 * batches included); retry with them, not with the whole list, or the sent ones are duplicated.
 */
export class GrantSendError<G = Grant> extends TransferError {
  readonly unsent: readonly G[];

  constructor(
    message: string,
    ctx: ErrorContext & { retryable: boolean; throttled?: boolean; unsent: readonly G[] },
  ) {
    super(message, ctx);
    this.name = 'GrantSendError';
    this.unsent = ctx.unsent;
  }
}

/**
 * The receipt no longer holds the grant: its visibility lapsed (it may already be with another
 * worker) or it was deleted. The holder must stop treating the grant as its own.
 */
export class GrantLeaseLostError extends TransferError {
  constructor(message: string, ctx: ErrorContext = {}) {
    super(message, { ...ctx, retryable: false });
    this.name = 'GrantLeaseLostError';
  }
}

const THROTTLING = new Set([
  'RequestThrottled',
  'ThrottlingException',
  'Throttling',
  'KmsThrottled',
  // Returned when the queue's in-flight limit (120,000) is reached: back off until workers finish.
  'OverLimit',
]);
const ACCESS_DENIED = new Set([
  'AccessDenied',
  'AccessDeniedException',
  'InvalidSecurity',
  'KmsAccessDenied',
  'KmsDisabled',
  'KmsNotFound',
  'KmsInvalidState',
  'KmsInvalidKeyUsage',
  'KmsOptInRequired',
  'UnrecognizedClientException',
  'InvalidClientTokenId',
  'SignatureDoesNotMatch',
  'ExpiredToken',
]);
const NO_QUEUE = new Set([
  'QueueDoesNotExist',
  'AWS.SimpleQueueService.NonExistentQueue',
  'QueueDeletedRecently',
]);
const RECEIPT_GONE = new Set(['MessageNotInflight', 'ReceiptHandleIsInvalid']);
const NETWORK = new Set([
  'ECONNRESET',
  'ECONNREFUSED',
  'ETIMEDOUT',
  'EPIPE',
  'EAI_AGAIN',
  'ENOTFOUND',
  'TimeoutError',
  'RequestTimeout',
]);

interface SdkErrorShape {
  name?: unknown;
  code?: unknown;
  $fault?: unknown;
  $metadata?: { httpStatusCode?: number };
  $retryable?: { throttling?: boolean };
}

function errorCode(err: unknown): string {
  const e = (typeof err === 'object' && err !== null ? err : {}) as SdkErrorShape;
  if (typeof e.code === 'string' && NETWORK.has(e.code)) return e.code;
  return typeof e.name === 'string' ? e.name : 'Error';
}

/** True for codes that mean "back off": throttling and SQS's 5xx (how it sheds load too). */
function isThrottleCode(code: string | undefined, status?: number): boolean {
  return (
    (code !== undefined && (THROTTLING.has(code) || code === 'ServiceUnavailable')) ||
    (status !== undefined && status >= 500)
  );
}

/**
 * Translates an SDK failure into the engine's errors. Exported for the other SQS users (the planner's
 * top-up, the local cloud run) so they classify alike.
 */
export function translateSqsError(
  err: unknown,
  queueUrl: string,
  action: string,
  signal?: AbortSignal,
): Error {
  if (err instanceof TransferError || err instanceof AbortedError || err instanceof ConfigError) return err;
  const code = errorCode(err);
  if (signal?.aborted || code === 'AbortError') return new AbortedError(`${action} on ${queueUrl} aborted`);
  const e = (typeof err === 'object' && err !== null ? err : {}) as SdkErrorShape;
  const status = e.$metadata?.httpStatusCode;
  const what = `SQS ${action} on ${queueUrl}`;
  const detail = errorMessage(err);
  if (THROTTLING.has(code) || e.$retryable?.throttling === true) {
    return new TransferError(`${what} throttled (${code}): ${detail}`, {
      retryable: true,
      throttled: true,
      cause: err,
    });
  }
  if (isThrottleCode(code, status) || e.$fault === 'server') {
    return new TransferError(`${what} failed on the server side (${code}): ${detail}`, {
      retryable: true,
      throttled: true,
      cause: err,
    });
  }
  if (NO_QUEUE.has(code)) {
    return new TransferError(`${what}: queue ${queueUrl} does not exist (${code})`, {
      retryable: false,
      cause: err,
    });
  }
  if (ACCESS_DENIED.has(code) || status === 403) {
    return new TransferError(
      `${what}: access denied to queue ${queueUrl} or its KMS key (${code}): check the role's policy`,
      { retryable: false, cause: err },
    );
  }
  if (NETWORK.has(code)) {
    return new TransferError(`${what}: connection failed (${code})`, { retryable: true, cause: err });
  }
  return new TransferError(`${what} failed (${code}): ${detail}`, { retryable: false, cause: err });
}

async function defaultSleep(ms: number, signal?: AbortSignal): Promise<void> {
  try {
    await delay(ms, undefined, signal ? { signal } : undefined);
  } catch (err) {
    if (signal?.aborted) throw new AbortedError();
    throw err;
  }
}

function checkRange(setting: string, value: number, min: number, max: number): void {
  if (!Number.isInteger(value) || value < min || value > max) {
    throw new ConfigError(`${setting} ${value} is not a whole number in ${min}..${max}`, { setting });
  }
}

function* batches<T>(items: readonly T[], size: number): Generator<T[]> {
  for (let i = 0; i < items.length; i += size) yield items.slice(i, i + size);
}

/** What a batch sender needs of a grant to name it in an error. */
export interface Named {
  readonly disk: string;
  readonly descriptor: { readonly seq: number };
}

/** Why sending stopped: a TransferError's context, with the message naming the first grant not sent. */
export interface SendFailure {
  readonly message: string;
  readonly retryable: boolean;
  readonly throttled: boolean;
  readonly disk?: string | undefined;
  readonly seq?: number | undefined;
  readonly cause?: unknown;
}

/**
 * Sends encoded grants with SendMessageBatch, 10 per request, in order. Entries that fail server-side
 * are retried on their own (`entryAttempts` rounds); sending stops at a whole-call failure, a
 * sender-fault entry or exhausted retries, and `unsent` then lists exactly the grants not confirmed
 * (those of later batches included). Shared by GrantQueue and SqsGrantChannel.
 */
export async function sendGrantBodies<G extends Named>(
  client: SQSClient,
  queueUrl: string,
  bodies: readonly { grant: G; body: string }[],
  opts: {
    entryAttempts: number;
    backoff: (attempt: number) => Promise<void>;
    signal?: AbortSignal | undefined;
  },
): Promise<{ unsent: G[]; failure?: SendFailure }> {
  const chunks = [...batches(bodies, SQS_MAX_BATCH_ENTRIES)];
  for (const [n, chunk] of chunks.entries()) {
    const later = chunks.slice(n + 1).flatMap((c) => c.map((b) => b.grant));
    // Ids are positions in the chunk, so a failed entry maps straight back to its grant.
    let pending = chunk.map((b, i) => ({ ...b, id: `g${i}` }));
    for (let attempt = 1; ; attempt++) {
      const entries: SendMessageBatchRequestEntry[] = pending.map((p) => ({ Id: p.id, MessageBody: p.body }));
      let failed: BatchResultErrorEntry[];
      try {
        const out = await client.send(new SendMessageBatchCommand({ QueueUrl: queueUrl, Entries: entries }), {
          abortSignal: opts.signal,
        });
        failed = out.Failed ?? [];
      } catch (err) {
        const t = translateSqsError(err, queueUrl, 'SendMessageBatch', opts.signal);
        if (!(t instanceof TransferError)) throw t;
        return {
          unsent: [...pending.map((p) => p.grant), ...later],
          failure: {
            message: `${pending.length + later.length} grant(s) not sent: ${t.message}`,
            retryable: t.retryable,
            throttled: t.throttled,
            cause: t,
          },
        };
      }
      if (failed.length === 0) break;
      const failedIds = new Map(failed.map((f) => [f.Id, f]));
      const retry = pending.filter((p) => failedIds.has(p.id));
      const senderFault = failed.find((f) => f.SenderFault !== false);
      if (senderFault !== undefined || attempt >= opts.entryAttempts) {
        const first = retry[0]?.grant;
        const f = senderFault ?? failed[0]!;
        const code = f.Code ?? 'unknown';
        const why =
          senderFault !== undefined
            ? `refused by SQS (${code})`
            : `still failing after ${attempt} attempts (${code})`;
        return {
          unsent: [...retry.map((p) => p.grant), ...later],
          failure: {
            message: `${retry.length} grant(s) ${why}, first disk ${first?.disk} seq ${first?.descriptor.seq}, queue ${queueUrl}`,
            retryable: senderFault === undefined,
            throttled: senderFault === undefined && isThrottleCode(code),
            disk: first?.disk,
            seq: first?.descriptor.seq,
          },
        };
      }
      pending = retry;
      await opts.backoff(attempt);
    }
  }
  return { unsent: [] };
}

/** A grant queue: one SQS standard queue (with a DLQ) carrying encoded grants. */
export class GrantQueue {
  private readonly entryAttempts: number;
  private readonly sleep: (ms: number, signal?: AbortSignal) => Promise<void>;
  private readonly random: Random;

  constructor(
    private readonly client: SQSClient,
    readonly queueUrl: string,
    opts: GrantQueueOptions = {},
  ) {
    this.entryAttempts = opts.entryAttempts ?? DEFAULT_SEND_ATTEMPTS;
    checkRange('entryAttempts', this.entryAttempts, 1, 100);
    this.sleep = opts.sleep ?? defaultSleep;
    this.random = opts.random ?? Math.random;
  }

  /** Sends bodies already encoded (sendGrantBodies with this queue's retry settings). */
  sendBodies<G extends Named>(
    bodies: readonly { grant: G; body: string }[],
    signal?: AbortSignal,
  ): Promise<{ unsent: G[]; failure?: SendFailure }> {
    return sendGrantBodies(this.client, this.queueUrl, bodies, {
      entryAttempts: this.entryAttempts,
      backoff: (attempt) => this.backoff(attempt, signal),
      signal,
    });
  }

  /**
   * Keeps a grant invisible for `seconds` more from now (not added to what is left): a slow writer
   * calls it before its lease lapses. Throws GrantLeaseLostError if the receipt no longer holds it.
   */
  async extendVisibility(receipt: string, seconds: number, signal?: AbortSignal): Promise<void> {
    checkRange('visibilitySeconds', seconds, 0, MAX_VISIBILITY_SECONDS);
    try {
      await this.client.send(
        new ChangeMessageVisibilityCommand({
          QueueUrl: this.queueUrl,
          ReceiptHandle: receipt,
          VisibilityTimeout: seconds,
        }),
        { abortSignal: signal },
      );
    } catch (err) {
      const code = errorCode(err);
      if (RECEIPT_GONE.has(code)) {
        throw new GrantLeaseLostError(
          `grant lease on ${this.queueUrl} lost (${code}): its visibility lapsed or it was completed`,
          { cause: err },
        );
      }
      throw translateSqsError(err, this.queueUrl, 'ChangeMessageVisibility', signal);
    }
  }

  /** The grant is written and recorded: remove it for good. Idempotent, as SQS's DeleteMessage is. */
  async complete(receipt: string, signal?: AbortSignal): Promise<void> {
    try {
      await this.client.send(new DeleteMessageCommand({ QueueUrl: this.queueUrl, ReceiptHandle: receipt }), {
        abortSignal: signal,
      });
    } catch (err) {
      throw translateSqsError(err, this.queueUrl, 'DeleteMessage', signal);
    }
  }

  /**
   * Completes many grants, 10 per request, retrying server-side entry failures on their own. Returns
   * the entries that could not be deleted: those grants will be redelivered, which is harmless when
   * completion was recorded first (the redelivered grant is then recognised as done).
   */
  async completeAll(receipts: readonly string[], signal?: AbortSignal): Promise<EntryFailure[]> {
    const failures: EntryFailure[] = [];
    for (const chunk of batches(receipts, SQS_MAX_BATCH_ENTRIES)) {
      let pending = chunk.map((receipt, i) => ({ receipt, id: `r${i}` }));
      for (let attempt = 1; pending.length > 0; attempt++) {
        let out: DeleteMessageBatchCommandOutput;
        try {
          out = await this.client.send(
            new DeleteMessageBatchCommand({
              QueueUrl: this.queueUrl,
              Entries: pending.map((p) => ({ Id: p.id, ReceiptHandle: p.receipt })),
            }),
            { abortSignal: signal },
          );
        } catch (err) {
          throw translateSqsError(err, this.queueUrl, 'DeleteMessageBatch', signal);
        }
        const retry: typeof pending = [];
        for (const f of out.Failed ?? []) {
          const p = pending.find((q) => q.id === f.Id);
          if (p === undefined) continue;
          if (f.SenderFault === false && attempt < this.entryAttempts) retry.push(p);
          else failures.push({ receipt: p.receipt, code: f.Code ?? 'unknown', message: f.Message ?? '' });
        }
        pending = retry;
        if (pending.length > 0) await this.backoff(attempt, signal);
      }
    }
    return failures;
  }

  /**
   * Gives the grant back now (visibility 0): another worker receives it at once. For a writer that
   * stops early (deadline, abort). A receipt that no longer holds the grant is fine: it is back anyway.
   */
  async release(receipt: string, signal?: AbortSignal): Promise<void> {
    try {
      await this.extendVisibility(receipt, 0, signal);
    } catch (err) {
      if (err instanceof GrantLeaseLostError) return;
      throw err;
    }
  }

  /** Approximate message counts: for progress and scaling hints, never for correctness. */
  async depth(signal?: AbortSignal): Promise<QueueDepth> {
    let attrs: Record<string, string>;
    try {
      const out = await this.client.send(
        new GetQueueAttributesCommand({
          QueueUrl: this.queueUrl,
          AttributeNames: [
            'ApproximateNumberOfMessages',
            'ApproximateNumberOfMessagesNotVisible',
            'ApproximateNumberOfMessagesDelayed',
          ],
        }),
        { abortSignal: signal },
      );
      attrs = out.Attributes ?? {};
    } catch (err) {
      throw translateSqsError(err, this.queueUrl, 'GetQueueAttributes', signal);
    }
    return {
      visible: Number(attrs.ApproximateNumberOfMessages ?? 0),
      inFlight: Number(attrs.ApproximateNumberOfMessagesNotVisible ?? 0),
      delayed: Number(attrs.ApproximateNumberOfMessagesDelayed ?? 0),
    };
  }

  private async backoff(attempt: number, signal?: AbortSignal): Promise<void> {
    const ceiling = Math.min(ENTRY_RETRY_MAX_MS, ENTRY_RETRY_BASE_MS * 2 ** (attempt - 1));
    await this.sleep(Math.floor(this.random() * ceiling), signal);
  }
}

// A grant comes back legitimately when its worker crashes, times out or releases it under
// throttling; five receptions ride out such faults, while a poison grant (one no worker can
// process) reaches the DLQ within minutes instead of cycling until its retention period ends.
export const DEFAULT_MAX_RECEIVE_COUNT = 5;
// A 1 MiB chunk takes seconds to fetch, verify and write even when throttled: a minute lets a slow
// but healthy writer finish without extending, and still returns a crashed worker's grant quickly.
export const DEFAULT_GRANT_VISIBILITY_SECONDS = 60;
// The DLQ keeps messages for SQS's maximum (14 days), so an operator back from a weekend can read them.
const DLQ_RETENTION_SECONDS = 14 * 24 * 60 * 60;

export interface CreateGrantQueueOptions {
  /** Queue name; the DLQ is `${name}-dlq`. */
  readonly name: string;
  readonly maxReceiveCount?: number;
  readonly visibilitySeconds?: number;
}

export interface CreatedGrantQueue {
  readonly queueUrl: string;
  readonly dlqUrl: string;
  readonly dlqArn: string;
}

/**
 * Creates a grant queue with its DLQ and redrive policy, for tests and the local cloud run (the
 * deployed queues come from CDK). Idempotent for the same options, as CreateQueue is.
 */
export async function createGrantQueue(
  client: SQSClient,
  opts: CreateGrantQueueOptions,
): Promise<CreatedGrantQueue> {
  const maxReceiveCount = opts.maxReceiveCount ?? DEFAULT_MAX_RECEIVE_COUNT;
  const visibilitySeconds = opts.visibilitySeconds ?? DEFAULT_GRANT_VISIBILITY_SECONDS;
  checkRange('maxReceiveCount', maxReceiveCount, 1, 1000);
  checkRange('visibilitySeconds', visibilitySeconds, 0, MAX_VISIBILITY_SECONDS);
  const dlqName = `${opts.name}-dlq`;
  try {
    const dlq = await client.send(
      new CreateQueueCommand({
        QueueName: dlqName,
        Attributes: { MessageRetentionPeriod: String(DLQ_RETENTION_SECONDS) },
      }),
    );
    const dlqUrl = dlq.QueueUrl!;
    const attrs = await client.send(
      new GetQueueAttributesCommand({ QueueUrl: dlqUrl, AttributeNames: ['QueueArn'] }),
    );
    const dlqArn = attrs.Attributes?.QueueArn;
    if (dlqArn === undefined) throw new Error(`no QueueArn for ${dlqUrl}`);
    const main = await client.send(
      new CreateQueueCommand({
        QueueName: opts.name,
        Attributes: {
          VisibilityTimeout: String(visibilitySeconds),
          RedrivePolicy: JSON.stringify({ deadLetterTargetArn: dlqArn, maxReceiveCount }),
        },
      }),
    );
    return { queueUrl: main.QueueUrl!, dlqUrl, dlqArn };
  } catch (err) {
    throw translateSqsError(err, opts.name, 'CreateQueue');
  }
}
