// SHA-256 per chunk and the EBS-style LINEAR aggregate over per-block (or per-chunk) digests.
import { createHash } from 'node:crypto';

export function sha256(data: Uint8Array): Uint8Array {
  return createHash('sha256').update(data).digest();
}

export function sha256Hex(data: Uint8Array): string {
  return createHash('sha256').update(data).digest('hex');
}

/**
 * SHA-256 over the concatenated raw digests, in the order given (ascending block index for EBS
 * `ChecksumAggregationMethod: LINEAR`, ascending descriptor seq for a Ferry disk). Accepts raw
 * 32-byte digests or hex strings, so stored progress can feed it without conversion.
 */
export function linearAggregate(digests: Iterable<Uint8Array | string>): Uint8Array {
  const hash = createHash('sha256');
  for (const d of digests) hash.update(typeof d === 'string' ? Buffer.from(d, 'hex') : d);
  return hash.digest();
}

export const toBase64 = (digest: Uint8Array): string => Buffer.from(digest).toString('base64');
export const toHex = (digest: Uint8Array): string => Buffer.from(digest).toString('hex');

/** Streaming form of `linearAggregate`, fed one digest at a time in order. */
export class LinearAggregator {
  private readonly hash = createHash('sha256');
  private count = 0;

  add(digest: Uint8Array | string): void {
    this.hash.update(typeof digest === 'string' ? Buffer.from(digest, 'hex') : digest);
    this.count++;
  }

  get size(): number {
    return this.count;
  }

  hex(): string {
    return this.hash.digest('hex');
  }
}
