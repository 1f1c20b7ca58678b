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
   * Optional: reads `dest.length` bytes at `offset` into `dest`. A chunk of many small extents is
   * then read into one buffer, without a buffer (and a copy) per extent.
   */
  readInto?(offset: number, dest: Uint8Array, signal?: AbortSignal): Promise<void>;
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
  /**
   * Prepares the target for a cycle (staging area, a started snapshot). Idempotent. `resume` is
   * true when the engine resumes this cycle from saved progress: chunks already written must
   * survive; when false, anything left from an abandoned attempt is discarded.
   */
  open(sizeBytes: number, kind: CopyKind, resume: boolean, cycleId?: string): Promise<void>;
  /**
   * Optional: proves, before a resume, that the target still holds what the durable progress
   * record vouches for: this cycle's writes (`cycleId` stamped by `open`) and, for every chunk
   * below the watermark, data whose SHA-256 is the recorded digest. Returns undefined when it does,
   * or the reason it does not; the engine then restarts the cycle instead of skipping those chunks.
   * Targets without it are trusted (they keep their own ledger).
   */
  checkResume?(claim: ResumeClaim, signal?: AbortSignal): Promise<string | undefined>;
  /**
   * Writes one chunk: `data` is the descriptor's changed extents concatenated in order
   * (`descriptor.bytes` long). Must verify `sha256` (hex, over `data`) before it counts the chunk
   * as written, and be idempotent: a chunk may be written again after a crash or retry.
   */
  writeChunk(descriptor: Descriptor, data: Uint8Array, sha256: string, signal?: AbortSignal): Promise<void>;
  /**
   * Optional durability barrier: every chunk whose `writeChunk` has resolved is on stable storage
   * when this resolves. The engine calls it before each progress save, so a progress record never
   * vouches for data a power loss could take back.
   */
  flush?(): Promise<void>;
  /** Reads back what the target holds (validation, `ferry verify`). */
  read(offset: number, length: number, signal?: AbortSignal): Promise<Uint8Array>;
  /**
   * Makes the cycle's writes durable (apply staging, fsync, CompleteSnapshot). Must be
   * idempotent: a crash between commit and publication re-runs it. Returns a target-specific
   * reference that proves the whole disk (a manifest digest, a snapshot id). A target that changes
   * the previous checkpoint's data in place keeps what it needs to undo that until `afterPublish`
   * and implements `rollback`.
   */
  commit(summary: DiskCommit): Promise<string | undefined>;
  /**
   * Optional: undoes a `commit` whose checkpoint was not published, so the previous checkpoint is
   * exactly as it was; keeps this cycle's staged writes, so a rerun can resume. Idempotent and
   * crash-safe (a crash inside it is repaired by calling it again), and a no-op when nothing was
   * committed. The engine calls it on every disk of the set when any commit or the publication
   * fails, and on the next run after a crash between commit and publication.
   */
  rollback?(): Promise<void>;
  /**
   * Called after the checkpoint is published: drop staging and undo data kept for `commit`. A
   * target that keeps history may keep this cycle's undo data as `published`'s (what it overwrote
   * of the previous checkpoint). Idempotent: a crash inside it is finished by calling it again.
   */
  afterPublish?(published?: PublishedCheckpoint): Promise<void>;
  close(): Promise<void>;
}

/** What a target is told when its disk's cycle is complete and validated. */
export interface DiskCommit {
  readonly chunks: number;
  readonly bytes: number;
  /**
   * SHA-256 (hex) over the per-chunk digests in sequence order: always the `ferry-chunk-sha256`
   * aggregate (a node checks it against its own; the checkpoint records it by that name).
   */
  readonly aggregateSha256: string;
  /** The cycle's changed extents (normalised), for targets that apply a staged increment. */
  readonly extents: readonly Extent[];
}

/** What a resume skips: the cycle and every chunk below the saved watermark with its digest. */
export interface ResumeClaim {
  readonly cycleId: string;
  readonly chunks: readonly { readonly descriptor: Descriptor; readonly sha256: string }[];
}

/** Durable progress of one disk within one cycle: everything below `watermark` is written and verified. */
export interface DiskProgress {
  readonly cycleId: string;
  /** Identifies the plan (extents, chunk size); progress of another plan is never resumed. */
  readonly fingerprint: string;
  /** Every descriptor with seq < watermark is done. */
  readonly watermark: number;
  readonly bytesDone: number;
  /** Hex SHA-256 of each descriptor below the watermark, in seq order (for the disk aggregate). */
  readonly digests: readonly string[];
}

/**
 * The algorithms a checkpoint disk's aggregate can be computed with. Publishers compute different
 * ones, so a recorded value means something only together with its algorithm's name:
 * - `ferry-chunk-sha256`: SHA-256 over the cycle's per-chunk SHA-256s (32 raw bytes each) in
 *   descriptor seq order. Published by the engine's `replicate` (local state directory; the same
 *   value a node checks a COMMIT against).
 * - `ebs-linear-sha256`: EBS's LINEAR aggregate checksum, SHA-256 over the per-block (512 KiB)
 *   SHA-256s of the blocks written, in ascending block index. Published by the serverless finalizer
 *   (DynamoDB catalog), which sent the same digest, base64, with CompleteSnapshot.
 */
export const AGGREGATE_ALGORITHMS = ['ferry-chunk-sha256', 'ebs-linear-sha256'] as const;
export type AggregateAlgorithm = (typeof AGGREGATE_ALGORITHMS)[number];

/**
 * A disk's aggregate checksum with the algorithm that computed it. `value` is the 32-byte digest
 * as 64 lowercase hex digits, for every algorithm (the encoding both publishers always recorded;
 * EBS takes and shows its LINEAR checksum in base64: the same bytes).
 */
export interface DiskAggregate {
  readonly algorithm: AggregateAlgorithm;
  readonly value: string;
}

/** One disk of a published recovery checkpoint. */
export interface CheckpointDisk {
  readonly disk: string;
  readonly source: string;
  readonly target: string;
  readonly sizeBytes: number;
  readonly kind: CopyKind;
  readonly chunks: number;
  readonly bytes: number;
  /** The disk's aggregate checksum, named by its algorithm; verifiers check it only by that name. */
  readonly aggregate: DiskAggregate;
  /** Target-specific proof of the whole disk (e.g. a manifest digest, a snapshot id). */
  readonly targetRef?: string;
}

/** Which checkpoint a cycle was published as (told to targets in `afterPublish`). */
export type PublishedCheckpoint = Pick<RecoveryCheckpoint, 'id' | 'sequence'>;

/** A validated, complete, consistent set of disks an operator can recover to. */
export interface RecoveryCheckpoint {
  readonly id: string;
  readonly set: string;
  readonly sequence: number;
  readonly createdAt: string;
  readonly parent: string | undefined;
  readonly disks: readonly CheckpointDisk[];
}

/**
 * Where progress and the checkpoint catalog live (a local directory, DynamoDB, ...).
 * `saveProgress` must be atomic: after a crash the store holds the old record or the new one.
 */
export interface StateStore {
  loadProgress(set: string, disk: string): Promise<DiskProgress | undefined>;
  /** `appended` are the digests for seqs [previous watermark, new watermark), so saves stay O(interval). */
  saveProgress(
    set: string,
    disk: string,
    progress: Omit<DiskProgress, 'digests'>,
    appended: readonly string[],
  ): Promise<void>;
  clearProgress(set: string, disk: string): Promise<void>;
  /** Publishes exactly once: rejects if a checkpoint with this id or sequence already exists. */
  publishCheckpoint(checkpoint: RecoveryCheckpoint): Promise<void>;
  /**
   * The set's last published checkpoint. Rejects with a CatalogError when the entry that would be
   * the latest cannot be read: a cycle must never silently take an older one as its base.
   */
  latestCheckpoint(set: string): Promise<RecoveryCheckpoint | undefined>;
  listCheckpoints(set?: string): Promise<RecoveryCheckpoint[]>;
}

/**
 * A durable note that a set's commit is under way: written before any target changes the previous
 * checkpoint's data, removed once the cycle is published and cleaned up, or rolled back. After a
 * crash, whoever next uses the set finds it and finishes the job: rolls the targets back when the
 * cycle was not published, or completes their clean-up when it was.
 */
export interface CommitIntent {
  readonly set: string;
  readonly cycleId: string;
  /** The disks whose targets may hold undo data, with the target names to reopen them by. */
  readonly disks: readonly { readonly disk: string; readonly target: string }[];
}

/** Where commit intents live; `begin` and `clear` must be atomic and durable when they resolve. */
export interface CommitJournal {
  begin(intent: CommitIntent): Promise<void>;
  load(set: string): Promise<CommitIntent | undefined>;
  clear(set: string): Promise<void>;
}
