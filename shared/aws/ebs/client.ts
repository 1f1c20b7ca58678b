// The EBS client and the single path every EBS call takes: rate limit, per-attempt timeout, error
// translation. Retrying is one layer above (the engine's withRetry), never inside the SDK.
import { EBSClient } from '@aws-sdk/client-ebs';
import { AbortedError } from '../../engine/errors.ts';
import type { Clock, Random } from '../../engine/ports.ts';
import { DEFAULT_RETRY_POLICY, type RetryPolicy, withRetry } from '../../engine/retry.ts';
import { systemClock, systemRandom } from '../../runtime/clock.ts';
import { aborted, attemptTimedOut, type EbsCallSite, translateEbsError } from './errors.ts';
import { EbsRateLimiter } from './limiter.ts';

/** Per-attempt time limits, in ms of the injected clock. */
export interface EbsTimeouts {
  /** PutSnapshotBlock / GetSnapshotBlock: one 512 KiB body each way. */
  readonly blockMs: number;
  /** StartSnapshot, CompleteSnapshot and the List calls: small JSON exchanges. */
  readonly controlMs: number;
}

export const DEFAULT_EBS_TIMEOUTS: EbsTimeouts = Object.freeze({
  // 60 s: a 64 MiB window is 128 blocks sharing one link; at 10 Mbit/s each takes ~55 s to drain.
  // Longer only delays noticing a dead connection that the next attempt would not have.
  blockMs: 60_000,
  // 30 s: these answer in milliseconds when EBS is healthy; a slow one is a stuck connection.
  controlMs: 30_000,
});

/** No retries here: the caller (the engine's pump) retries, with backoff, jitter and window feedback. */
export const NO_RETRY: RetryPolicy = Object.freeze({ maxAttempts: 1, baseDelayMs: 0, maxDelayMs: 0 });

/**
 * What the stateless EBS functions need. Only `client` is required; the rest default to the real
 * clock, Math.random, DEFAULT_RETRY_POLICY, one rate limiter per client, DEFAULT_EBS_TIMEOUTS.
 */
export interface EbsDeps {
  /** Create it with `createEbsClient` (maxAttempts 1): SDK retries under ours would multiply. */
  readonly client: EBSClient;
  readonly clock?: Clock;
  readonly random?: Random;
  /** Retry policy for the calls a function retries itself (see each function). */
  readonly retry?: RetryPolicy;
  readonly limiter?: EbsRateLimiter;
  readonly timeouts?: Partial<EbsTimeouts>;
  /** Sees every retried failure (throttles included): feed it to a window controller or a metric. */
  readonly onRetry?: (err: unknown, attempt: number, site: EbsCallSite) => void;
}

export interface ResolvedEbsDeps {
  readonly client: EBSClient;
  readonly clock: Clock;
  readonly random: Random;
  readonly retry: RetryPolicy;
  readonly limiter: EbsRateLimiter;
  readonly timeouts: EbsTimeouts;
  readonly onRetry: ((err: unknown, attempt: number, site: EbsCallSite) => void) | undefined;
}

// One limiter per client unless the caller shares one explicitly: the account-level quotas are
// shared by every snapshot the process touches through that client.
const limiters = new WeakMap<EBSClient, EbsRateLimiter>();

export function resolveDeps(deps: EbsDeps): ResolvedEbsDeps {
  const clock = deps.clock ?? systemClock;
  let limiter = deps.limiter ?? limiters.get(deps.client);
  if (!limiter) {
    limiter = new EbsRateLimiter(clock);
    limiters.set(deps.client, limiter);
  }
  return {
    client: deps.client,
    clock,
    random: deps.random ?? systemRandom,
    retry: deps.retry ?? DEFAULT_RETRY_POLICY,
    limiter,
    timeouts: { ...DEFAULT_EBS_TIMEOUTS, ...deps.timeouts },
    onRetry: deps.onRetry,
  };
}

export interface EbsClientOptions {
  readonly region?: string;
  /** An EBS-compatible endpoint (the emulator in tests); the regional endpoint when absent. */
  readonly endpoint?: string;
  readonly credentials?: { accessKeyId: string; secretAccessKey: string; sessionToken?: string };
  /** Socket connect limit; a backstop under the per-attempt timeouts. */
  readonly connectionTimeoutMs?: number;
  /** Whole-request limit in the HTTP handler; a backstop under the per-attempt timeouts. */
  readonly requestTimeoutMs?: number;
  /** Concurrent connections: the top window level (64 MiB) is 128 blocks in flight per disk. */
  readonly maxSockets?: number;
}

// 5 s to connect: a regional endpoint answers in tens of ms; a stuck connect is better retried.
const DEFAULT_CONNECTION_TIMEOUT_MS = 5_000;
// 256 sockets: two disks at the top window level (128 blocks each) without queueing for a socket.
const DEFAULT_MAX_SOCKETS = 256;

/**
 * An EBSClient configured for Ferry: no SDK retries (maxAttempts 1, ours are the only layer),
 * keep-alive connections enough for the top window, connect and request timeouts as backstops.
 */
export function createEbsClient(opts: EbsClientOptions = {}): EBSClient {
  const agent = { keepAlive: true, maxSockets: opts.maxSockets ?? DEFAULT_MAX_SOCKETS };
  return new EBSClient({
    ...(opts.region === undefined ? {} : { region: opts.region }),
    ...(opts.endpoint === undefined ? {} : { endpoint: opts.endpoint }),
    ...(opts.credentials === undefined ? {} : { credentials: opts.credentials }),
    maxAttempts: 1,
    requestHandler: {
      connectionTimeout: opts.connectionTimeoutMs ?? DEFAULT_CONNECTION_TIMEOUT_MS,
      requestTimeout: opts.requestTimeoutMs ?? DEFAULT_EBS_TIMEOUTS.blockMs,
      throwOnRequestTimeout: true,
      httpAgent: agent,
      httpsAgent: agent,
    },
  });
}

const never = new Promise<never>(() => {});

// One 'abort' listener per caller signal, fanned out to every call in flight under it: a listener
// per call would pile up on the engine's run-wide signal (hundreds of calls in flight at the top
// window), and AbortSignal.any leaks on Node 20.
const inFlight = new WeakMap<AbortSignal, Set<AbortController>>();

function link(signal: AbortSignal | undefined, request: AbortController): () => void {
  if (!signal) return () => {};
  let set = inFlight.get(signal);
  if (!set) {
    const calls = new Set<AbortController>();
    set = calls;
    inFlight.set(signal, calls);
    signal.addEventListener(
      'abort',
      () => {
        for (const c of calls) c.abort();
        calls.clear();
      },
      { once: true },
    );
  }
  set.add(request);
  const calls = set;
  return () => calls.delete(request);
}

/** Sleeps on the deps' clock; the caller's abort ends it with an AbortedError naming the call. */
export async function pause(
  deps: ResolvedEbsDeps,
  ms: number,
  site: EbsCallSite,
  signal?: AbortSignal,
): Promise<void> {
  if (signal?.aborted) throw aborted(site);
  const wait = new AbortController();
  const unlink = link(signal, wait);
  try {
    await deps.clock.sleep(ms, wait.signal);
  } catch (err) {
    if (signal?.aborted || err instanceof AbortedError) throw aborted(site);
    throw err;
  } finally {
    unlink();
  }
}

/**
 * One attempt of one EBS call: waits for the rate limiter, sends with an abort signal that fires on
 * the caller's abort or the attempt timeout, and translates any failure. The timeout also wins the
 * race when a (mocked) client ignores its abort signal, so a hung call can never hang a chunk.
 */
export async function callEbs<T>(
  deps: ResolvedEbsDeps,
  site: EbsCallSite,
  send: (abortSignal: AbortSignal) => Promise<T>,
  signal?: AbortSignal,
): Promise<T> {
  if (signal?.aborted) throw aborted(site);
  const request = new AbortController();
  const unlink = link(signal, request);
  try {
    await deps.limiter.acquire(site.op, site.snapshotId, request.signal);
  } catch (err) {
    unlink();
    if (signal?.aborted || err instanceof AbortedError) throw aborted(site);
    throw err;
  }
  const timeoutMs =
    site.op === 'PutSnapshotBlock' || site.op === 'GetSnapshotBlock'
      ? deps.timeouts.blockMs
      : deps.timeouts.controlMs;
  const timer = new AbortController();
  let timedOut = false;
  const timeout = deps.clock.sleep(timeoutMs, timer.signal).then(
    () => {
      timedOut = true;
      request.abort();
      throw attemptTimedOut(site, timeoutMs);
    },
    () => never,
  );
  try {
    return await Promise.race([send(request.signal), timeout]);
  } catch (err) {
    if (signal?.aborted) throw aborted(site);
    if (timedOut) throw attemptTimedOut(site, timeoutMs);
    throw translateEbsError(err, site);
  } finally {
    timer.abort();
    unlink();
  }
}

/** `callEbs` under withRetry with the deps' policy; `onRetry` sees each retried failure. */
export async function retryEbs<T>(
  deps: ResolvedEbsDeps,
  site: EbsCallSite,
  send: (abortSignal: AbortSignal) => Promise<T>,
  signal?: AbortSignal,
): Promise<T> {
  if (signal?.aborted) throw aborted(site);
  // withRetry's backoff sleeps listen on this call's own signal, linked to the caller's.
  const call = new AbortController();
  const unlink = link(signal, call);
  try {
    return await withRetry(
      () => callEbs(deps, site, send, call.signal),
      { clock: deps.clock, random: deps.random, policy: deps.retry, signal: call.signal },
      (err, attempt) => deps.onRetry?.(err, attempt, site),
    );
  } catch (err) {
    // withRetry's own abort (between attempts) does not know the call; name it.
    throw err instanceof AbortedError && err.disk === undefined ? aborted(site) : err;
  } finally {
    unlink();
  }
}
