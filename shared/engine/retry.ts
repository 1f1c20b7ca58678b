// Retry with exponential backoff and full jitter, for transfer errors the port marked retryable.
import { AbortedError, TransferError } from './errors.ts';
import type { Clock, Random } from './ports.ts';

export interface RetryPolicy {
  /** Attempts in all, first included. */
  readonly maxAttempts: number;
  readonly baseDelayMs: number;
  readonly maxDelayMs: number;
}

// 8 attempts with base 100 ms doubling, capped at 10 s: about 25 s of worst-case waiting, enough to
// ride out a throttling burst or a dropped connection without stalling a cycle for minutes.
export const DEFAULT_RETRY_POLICY: RetryPolicy = { maxAttempts: 8, baseDelayMs: 100, maxDelayMs: 10_000 };

export function isRetryable(err: unknown): boolean {
  return err instanceof TransferError && err.retryable;
}

export function backoffDelay(policy: RetryPolicy, attempt: number, random: Random): number {
  const ceiling = Math.min(policy.maxDelayMs, policy.baseDelayMs * 2 ** (attempt - 1));
  return Math.floor(random() * ceiling);
}

/**
 * Runs `op` until it succeeds, fails permanently, or runs out of attempts. `onRetry` sees every
 * retryable failure (the adaptive controller learns from throttles this way).
 */
export async function withRetry<T>(
  op: (attempt: number) => Promise<T>,
  deps: { clock: Clock; random: Random; policy: RetryPolicy; signal?: AbortSignal | undefined },
  onRetry: (err: unknown, attempt: number) => void = () => {},
): Promise<T> {
  for (let attempt = 1; ; attempt++) {
    if (deps.signal?.aborted) throw new AbortedError();
    try {
      return await op(attempt);
    } catch (err) {
      if (!isRetryable(err) || attempt >= deps.policy.maxAttempts || deps.signal?.aborted) throw err;
      onRetry(err, attempt);
      await deps.clock.sleep(backoffDelay(deps.policy, attempt, deps.random), deps.signal);
    }
  }
}
