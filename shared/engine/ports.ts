// The engine's ports: everything outside the pure core comes in through these interfaces.
// Adapters (shared/local, shared/aws, ...) implement them; tests implement them with fakes.
import type { Descriptor } from './descriptors.ts';
import type { Extent } from './extents.ts';

/** Monotonic time in milliseconds and a way to wait; a simulated clock implements the same. */
export interface Clock {
  now(): number;
  sleep(ms: number, signal?: AbortSignal): Promise<void>;
}

/** Randomness for jitter; deterministic in tests. Returns a float in [0, 1). */
export type Random = () => number;

/** A disk to read from (file image, NBD export, EBS snapshot, ...). */
export interface DiskSource {
  /** Human name for messages and progress (never a credential). */
  readonly name: string;
  readonly sizeBytes: number;
  /** Reads exactly `length` bytes at `offset`; rejects rather than returning short. */
  read(offset: number, length: number, signal?: AbortSignal): Promise<Uint8Array>;
  /**
   * Extents that hold data, for full copies (NBD block status, sparse files); sorted, disjoint.
   * Absent when the source cannot tell: a full copy then reads the whole disk.
   */
  allocatedExtents?(signal?: AbortSignal): AsyncIterable<Extent>;
  close(): Promise<void>;
}

/** Whether this cycle's target is a full copy or an increment over the previous checkpoint. */
export type CopyKind = 'full' | 'incremental';

/** A disk to write into (file image, EBS snapshot, Azure page blob, ...). One per disk per cycle. */
export interface DiskTarget {
  readonly name: string;
  /** Smallest unit the target writes; descriptors are aligned to it (EBS 512 KiB, Azure 512 B). */
  readonly blockSize: number;
  /** Prepares the target for a cycle (create/size the image, start the snapshot). Idempotent. */
  open(sizeBytes: number, kind: CopyKind): Promise<void>;
  /**
   * Writes one chunk: `data` is the descriptor's changed extents concatenated in order
   * (`descriptor.bytes` long). Must verify `sha256` (hex, over `data`) before it counts the chunk
   * as written, and be idempotent: a chunk may be written again after a crash or retry.
   */
  writeChunk(descriptor: Descriptor, data: Uint8Array, sha256: string, signal?: AbortSignal): Promise<void>;
  /** Reads back what the target holds (validation, `ferry verify`). */
  read(offset: number, length: number, signal?: AbortSignal): Promise<Uint8Array>;
  /** Makes the cycle's writes durable and final (fsync, CompleteSnapshot). */
  commit(summary: DiskCommit): Promise<void>;
  close(): Promise<void>;
}

/** What a target is told when its disk's cycle is complete and validated. */
export interface DiskCommit {
  readonly chunks: number;
  readonly bytes: number;
  /** SHA-256 (hex) over the per-chunk digests in sequence order. */
  readonly aggregateSha256: string;
}
