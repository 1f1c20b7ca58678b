// EC2 exceptions as the recovery's errors: throttling, capacity and eventual consistency are
// retryable (CloudRetryableError), everything else is permanent (CloudRequestError), and "already
// gone" is success where the caller says so. Messages name the request and the resource.
import { CloudRequestError } from '../../engine/recovery/errors.ts';

// Codes asking again can cure: throttling, EC2 itself, capacity that comes back, and resources that
// a moment ago did not exist yet or were still busy (EC2's reads are eventually consistent).
const RETRYABLE = new Set([
  'RequestLimitExceeded',
  'Throttling',
  'ThrottlingException',
  'InternalError',
  'InternalFailure',
  'ServiceUnavailable',
  'Unavailable',
  'InsufficientInstanceCapacity',
  'InsufficientVolumeCapacity',
  'InsufficientCapacity',
  'InvalidAMIID.Unavailable',
  'IncorrectState',
  'IncorrectInstanceState',
  'VolumeInUse',
  'InvalidSnapshot.InUse',
]);

interface AwsError {
  name?: string;
  Code?: string;
  message?: string;
  $metadata?: { httpStatusCode?: number };
}

/** The EC2 error code of an SDK exception (`InvalidSubnetID.NotFound`), if it has one. */
export function ec2ErrorCode(err: unknown): string | undefined {
  if (typeof err !== 'object' || err === null) return undefined;
  const e = err as AwsError;
  return e.Code ?? e.name;
}

export function isRetryableEc2Error(err: unknown): boolean {
  const code = ec2ErrorCode(err);
  if (code !== undefined && RETRYABLE.has(code)) return true;
  const status = (err as AwsError | null)?.$metadata?.httpStatusCode;
  if (status !== undefined) return status >= 500 || status === 429;
  // No HTTP answer at all: a dropped connection or a timeout.
  return true;
}

/**
 * Runs one EC2 request; `what` names it for the operator (`RunInstances for machine app`). A code in
 * `gone` answers `undefined` (the resource is already gone: idempotent deletes).
 */
export async function ec2Call<T>(
  what: string,
  fn: () => Promise<T>,
  opts: { gone?: readonly string[] } = {},
): Promise<T | undefined> {
  try {
    return await fn();
  } catch (err) {
    const code = ec2ErrorCode(err);
    if (code !== undefined && opts.gone?.includes(code)) return undefined;
    throw ec2Error(what, err);
  }
}

/** The recovery's error for an EC2 exception: one line naming the request, its code and EC2's words. */
export function ec2Error(what: string, err: unknown): CloudRequestError {
  const code = ec2ErrorCode(err);
  const message = err instanceof Error ? err.message : String(err);
  return new CloudRequestError(`EC2 ${what} failed: ${code ?? 'error'}: ${message}`, {
    retryable: isRetryableEc2Error(err),
    code,
    cause: err,
  });
}

/** Like ec2Call, for requests whose answer is needed (no code is treated as gone). */
export async function ec2Must<T>(what: string, fn: () => Promise<T>): Promise<T> {
  return (await ec2Call(what, fn)) as T;
}
