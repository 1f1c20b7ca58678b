// Client-side rate limits for the EBS direct API quotas: token buckets on the injected clock.
//
// EBS throttles per snapshot (PutSnapshotBlock and GetSnapshotBlock, 1,000 requests/s each) and per
// account (the same two, StartSnapshot and CompleteSnapshot 10/s, each List call 50/s). A process
// that paces itself below those never spends a round trip on a throttle it could have predicted;
// throttles that still happen (other processes in the account) are retried and steer the window.
// The limits are per process: concurrent Lambdas share the account's quota, so give them a share.
import { AbortedError, ConfigError } from '../../engine/errors.ts';
import type { Clock } from '../../engine/ports.ts';
import type { EbsOperation } from './errors.ts';

/** Requests per second; Infinity switches a limit off. */
export interface EbsRateLimits {
  readonly putSnapshotBlockPerSnapshot: number;
  readonly getSnapshotBlockPerSnapshot: number;
  readonly putSnapshotBlockPerAccount: number;
  readonly getSnapshotBlockPerAccount: number;
  readonly startSnapshotPerAccount: number;
  readonly completeSnapshotPerAccount: number;
  readonly listSnapshotBlocksPerAccount: number;
  readonly listChangedBlocksPerAccount: number;
}

// The documented EBS direct API quotas (Amazon EBS endpoints and quotas). Matching them is safe
// because the buckets below hold only BURST_SECONDS of their rate: AWS does not publish how much
// burst the service tolerates, and a small client burst costs no sustained throughput.
export const DEFAULT_EBS_RATE_LIMITS: EbsRateLimits = Object.freeze({
  putSnapshotBlockPerSnapshot: 1000,
  getSnapshotBlockPerSnapshot: 1000,
  putSnapshotBlockPerAccount: 1000,
  getSnapshotBlockPerAccount: 1000,
  startSnapshotPerAccount: 10,
  completeSnapshotPerAccount: 10,
  listSnapshotBlocksPerAccount: 50,
  listChangedBlocksPerAccount: 50,
});

/**
 * Burst of the limiter's buckets, in seconds of their rate. The fleet simulation (bench/sim.ts)
 * showed a one-second client burst against a service that tolerates 0.2 s: every throttle of the
 * run came from the first second, re-sending chunks over the link.
 */
export const BURST_SECONDS = 0.1;

// Per-snapshot buckets kept at once. A process writes a handful of snapshots at a time; an evicted
// bucket comes back full, which can at worst allow one extra burst on that snapshot.
const MAX_SNAPSHOT_BUCKETS = 256;

/**
 * A token bucket that reserves: `take` always consumes a token and waits for the debt to refill,
 * so concurrent callers are served in call order without polling.
 */
export class TokenBucket {
  private tokens: number;
  private last: number;
  private readonly capacity: number;

  constructor(
    private readonly clock: Clock,
    readonly ratePerSecond: number,
    /** Burst size; one second of the rate by default (at least one request). */
    capacity?: number,
  ) {
    if (!(ratePerSecond > 0)) {
      throw new ConfigError(`rate limit ${ratePerSecond}/s must be positive (Infinity to switch it off)`, {
        setting: 'rateLimits',
      });
    }
    this.capacity = capacity ?? Math.max(1, Number.isFinite(ratePerSecond) ? ratePerSecond : 1);
    this.tokens = this.capacity;
    this.last = clock.now();
  }

  /** Resolves when the caller may send one request. */
  async take(signal?: AbortSignal): Promise<void> {
    if (this.ratePerSecond === Number.POSITIVE_INFINITY) return;
    if (signal?.aborted) throw new AbortedError();
    const now = this.clock.now();
    if (now > this.last) {
      this.tokens = Math.min(this.capacity, this.tokens + ((now - this.last) / 1000) * this.ratePerSecond);
      this.last = now;
    }
    this.tokens -= 1;
    if (this.tokens >= 0) return;
    await this.clock.sleep(Math.ceil((-this.tokens / this.ratePerSecond) * 1000), signal);
  }
}

/** The buckets for every EBS operation, shared by all callers that use one limiter. */
export class EbsRateLimiter {
  readonly limits: EbsRateLimits;
  private readonly account: Record<EbsOperation, TokenBucket>;
  private readonly perSnapshot = new Map<string, { put: TokenBucket; get: TokenBucket }>();

  constructor(
    private readonly clock: Clock,
    limits: Partial<EbsRateLimits> = {},
  ) {
    for (const key of Object.keys(limits)) {
      if (!(key in DEFAULT_EBS_RATE_LIMITS)) {
        throw new ConfigError(
          `unknown EBS rate limit ${key} (known: ${Object.keys(DEFAULT_EBS_RATE_LIMITS).join(', ')})`,
          { setting: key },
        );
      }
    }
    this.limits = { ...DEFAULT_EBS_RATE_LIMITS, ...limits };
    const l = this.limits;
    this.account = {
      StartSnapshot: bucket(clock, l.startSnapshotPerAccount),
      PutSnapshotBlock: bucket(clock, l.putSnapshotBlockPerAccount),
      CompleteSnapshot: bucket(clock, l.completeSnapshotPerAccount),
      ListSnapshotBlocks: bucket(clock, l.listSnapshotBlocksPerAccount),
      ListChangedBlocks: bucket(clock, l.listChangedBlocksPerAccount),
      GetSnapshotBlock: bucket(clock, l.getSnapshotBlockPerAccount),
    };
  }

  /** Waits until one call of `op` (on `snapshotId`, for block calls) fits every limit. */
  async acquire(op: EbsOperation, snapshotId?: string, signal?: AbortSignal): Promise<void> {
    if ((op === 'PutSnapshotBlock' || op === 'GetSnapshotBlock') && snapshotId !== undefined) {
      const buckets = this.snapshotBuckets(snapshotId);
      await (op === 'PutSnapshotBlock' ? buckets.put : buckets.get).take(signal);
    }
    await this.account[op].take(signal);
  }

  private snapshotBuckets(snapshotId: string): { put: TokenBucket; get: TokenBucket } {
    let buckets = this.perSnapshot.get(snapshotId);
    if (buckets) {
      // Re-insert: Map order is the eviction order, most recently used last.
      this.perSnapshot.delete(snapshotId);
      this.perSnapshot.set(snapshotId, buckets);
      return buckets;
    }
    buckets = {
      put: bucket(this.clock, this.limits.putSnapshotBlockPerSnapshot),
      get: bucket(this.clock, this.limits.getSnapshotBlockPerSnapshot),
    };
    this.perSnapshot.set(snapshotId, buckets);
    if (this.perSnapshot.size > MAX_SNAPSHOT_BUCKETS) {
      const oldest = this.perSnapshot.keys().next().value;
      if (oldest !== undefined) this.perSnapshot.delete(oldest);
    }
    return buckets;
  }
}

/** A bucket holding BURST_SECONDS of `rate`, at least one request (an Infinity rate never waits). */
function bucket(clock: Clock, rate: number): TokenBucket {
  return new TokenBucket(clock, rate, Math.max(1, rate * BURST_SECONDS));
}
