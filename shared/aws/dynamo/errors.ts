// Translates DynamoDB SDK exceptions into Ferry's domain errors, naming the table and key involved.
import { type ErrorContext, FerryError, TransferError } from '../../engine/errors.ts';

export interface DynamoErrorContext extends ErrorContext {
  table: string;
  /** The item's key as `pk / sk`, when one item is involved. */
  key?: string | undefined;
}

/**
 * A conditional write lost: someone else changed the item first, or it already exists
 * ("already published", "concurrent modification"). Retrying the same write cannot help; re-read.
 */
export class StateConflictError extends FerryError {
  readonly table: string;
  readonly key: string | undefined;
  constructor(message: string, ctx: DynamoErrorContext) {
    super(message, ctx);
    this.name = 'StateConflictError';
    this.table = ctx.table;
    this.key = ctx.key;
  }
}

/** An item read back does not have the shape this code wrote: damaged or written by other code. */
export class MalformedStateError extends FerryError {
  readonly table: string;
  readonly key: string | undefined;
  constructor(message: string, ctx: DynamoErrorContext) {
    super(message, ctx);
    this.name = 'MalformedStateError';
    this.table = ctx.table;
    this.key = ctx.key;
  }
}

// DynamoDB's own throttling answers: back off and try again; also a signal for the controller.
const THROTTLED = new Set([
  'ProvisionedThroughputExceededException',
  'ThrottlingException',
  'RequestLimitExceeded',
  'ThrottledException',
]);

// Answers that no retry can change: the role, the key or the table is wrong.
const PERMANENT = new Set([
  'AccessDeniedException',
  'UnrecognizedClientException',
  'InvalidSignatureException',
  'MissingAuthenticationTokenException',
  'ResourceNotFoundException',
  'KMSAccessDeniedException',
  'KMSDisabledException',
  'KMSNotFoundException',
  'KMSInvalidStateException',
]);

// Service-side or transport trouble that usually clears up.
const TRANSIENT = new Set([
  'InternalServerError',
  'InternalFailure',
  'ServiceUnavailable',
  'TimeoutError',
  'RequestTimeout',
  'RequestTimeoutException',
]);
const TRANSIENT_CODES = new Set(['ECONNRESET', 'ECONNREFUSED', 'ETIMEDOUT', 'EPIPE', 'EAI_AGAIN']);

export function isConditionalCheckFailed(err: unknown): boolean {
  return err instanceof Error && err.name === 'ConditionalCheckFailedException';
}

/** Maps an SDK failure of `op` on `table` to a FerryError; FerryErrors pass through unchanged. */
export function translateDynamoError(err: unknown, op: string, ctx: DynamoErrorContext): FerryError {
  if (err instanceof FerryError) return err;
  const name = err instanceof Error ? err.name : 'Error';
  const code = (err as { code?: unknown } | null)?.code;
  const where = `DynamoDB ${op} on table ${ctx.table}${ctx.key ? ` (${ctx.key})` : ''}`;
  const full = { ...ctx, cause: err };
  if (THROTTLED.has(name) || (err as { $retryable?: { throttling?: boolean } })?.$retryable?.throttling) {
    return new TransferError(`${where} was throttled (${name})`, {
      ...full,
      retryable: true,
      throttled: true,
    });
  }
  if (isConditionalCheckFailed(err)) {
    return new StateConflictError(`${where} failed: concurrent modification`, full);
  }
  if (PERMANENT.has(name)) {
    return new TransferError(`${where} was refused (${name}): check the table and the role's permissions`, {
      ...full,
      retryable: false,
    });
  }
  if (TRANSIENT.has(name) || (typeof code === 'string' && TRANSIENT_CODES.has(code))) {
    return new TransferError(`${where} failed (${name}), may succeed on retry`, { ...full, retryable: true });
  }
  // ValidationException and anything unknown: a defect in the request, not a passing condition.
  // Its message says what DynamoDB refused (never an item's data).
  const detail = err instanceof Error && err.message !== '' ? `: ${err.message}` : '';
  return new TransferError(`${where} failed (${name})${detail}`, { ...full, retryable: false });
}

/**
 * Runs one SDK call, translating its failure. `onConditionFailed` turns a lost conditional write
 * into the caller's own answer (a value such as `false`, or a specific error to throw).
 */
export async function dynamoCall<T, F = never>(
  op: string,
  ctx: DynamoErrorContext,
  call: () => Promise<T>,
  onConditionFailed?: () => F,
): Promise<T | F> {
  try {
    return await call();
  } catch (err) {
    if (onConditionFailed && isConditionalCheckFailed(err)) return onConditionFailed();
    throw translateDynamoError(err, op, ctx);
  }
}
