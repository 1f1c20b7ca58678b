// The ports the cycle logic needs from the outside: the EBS source and target, the event bus, logs,
// metrics and time. The handlers bind them to the AWS adapters; tests bind them to the emulators.

/** EBS direct API block size: every descriptor is cut and written in these. */
export const EBS_BLOCK_SIZE = 512 * 1024;

/** A block of a source snapshot as a List call names it. */
export interface SourceBlockRef {
  readonly index: number;
  /** The GetSnapshotBlock token; undefined when the block reads as zeros in the new snapshot. */
  readonly token: string | undefined;
}

export interface ChangePage {
  readonly volumeSizeGiB: number;
  /** Ascending block indexes; a page may be empty. */
  readonly blocks: readonly SourceBlockRef[];
}

/** Lists a source snapshot's blocks: all with data (full copy) or those changed since a previous one. */
export interface ChangeLister {
  /**
   * Pages in ascending block order from `startingBlockIndex`. With `previousSnapshotId`: blocks that
   * differ between it and `snapshotId` (ListChangedBlocks); without: every block with data
   * (ListSnapshotBlocks). Restartable at any block index, which is how the differ resumes.
   */
  listBlocks(req: {
    disk: string;
    snapshotId: string;
    previousSnapshotId: string | undefined;
    startingBlockIndex: number;
    signal?: AbortSignal | undefined;
  }): AsyncIterable<ChangePage>;
}

/** What one port call went through, for the adaptive controller's signals. */
export interface CallSignals {
  /** Called once per retried attempt (throttled or another retryable failure). */
  onRetry?: ((info: { throttled: boolean }) => void) | undefined;
  signal?: AbortSignal | undefined;
}

export interface ReadBlock {
  readonly data: Uint8Array;
  /** Base64 SHA-256 of `data` as the source vouched for it (already verified by the reader). */
  readonly checksum: string;
}

/** Reads source blocks (GetSnapshotBlock), checksum-verified. */
export interface BlockReader {
  readBlock(
    req: { disk: string; snapshotId: string; index: number; token: string } & CallSignals,
  ): Promise<ReadBlock>;
}

export interface TargetBlock {
  readonly index: number;
  readonly data: Uint8Array;
}

export interface WrittenBlock {
  readonly index: number;
  /** Base64 SHA-256 the target accepted for the block. */
  readonly checksum: string;
}

export type SnapshotStatus = 'pending' | 'completed' | 'error';

/** Writes one target snapshot per disk per cycle (StartSnapshot / PutSnapshotBlock / CompleteSnapshot). */
export interface SnapshotWriter {
  /**
   * Idempotent for one `clientToken`: a retried start returns the same snapshot. `encrypted` says
   * whether the new snapshot is (missing blocks of an encrypted snapshot do not read as zeros).
   */
  startSnapshot(req: {
    disk: string;
    volumeSizeGiB: number;
    parentSnapshotId: string | undefined;
    clientToken: string;
    description: string;
    timeoutMinutes: number;
    kmsKeyArn: string | undefined;
    /** Tags the new snapshot carries from its start (IAM on snapshots is conditioned on them). */
    tags?: Readonly<Record<string, string>> | undefined;
  }): Promise<{ snapshotId: string; encrypted: boolean }>;
  /**
   * Writes whole blocks (each EBS_BLOCK_SIZE long). Returns the blocks actually written, ascending:
   * zero blocks may be skipped where that is safe (`skipZeroBlocks`, full unencrypted copies only).
   * Idempotent: writing a block again with the same data is harmless.
   */
  putBlocks(
    req: {
      disk: string;
      snapshotId: string;
      blocks: readonly TargetBlock[];
      skipZeroBlocks: boolean;
      /** The descriptor, for messages. */
      seq?: number | undefined;
      /** When the snapshot was started (epoch ms): "does not exist" right after it is waited out. */
      snapshotStartedAt?: number | undefined;
    } & CallSignals,
  ): Promise<WrittenBlock[]>;
  /** CompleteSnapshot with ChangedBlocksCount and the LINEAR aggregate (base64); idempotent. */
  completeSnapshot(req: {
    disk: string;
    snapshotId: string;
    changedBlocksCount: number;
    aggregateChecksum: string;
  }): Promise<void>;
  /** Waits until the snapshot leaves `pending` or `signal` aborts; returns the status then. */
  waitForCompletion(req: { disk: string; snapshotId: string; signal: AbortSignal }): Promise<SnapshotStatus>;
}

/** Announces what happened (EventBridge PutEvents in the cloud). At-least-once. */
export interface EventPublisher {
  publish(event: { source: string; detailType: string; detail: Record<string, unknown> }): Promise<void>;
}

/** Structured logs (Powertools Logger fits). Never pass block data or credentials. */
export interface Log {
  debug(message: string, extra?: Record<string, unknown>): void;
  info(message: string, extra?: Record<string, unknown>): void;
  warn(message: string, extra?: Record<string, unknown>): void;
  error(message: string, extra?: Record<string, unknown>): void;
}

export type MetricUnitName = 'Count' | 'Bytes' | 'Milliseconds' | 'Seconds';

/** Metrics (Powertools Metrics fits through a small adapter). */
export interface Meter {
  /**
   * Adds one data point. Without `dimensions` it is aggregated with the invocation's other metrics
   * (dimension `service` only); with them it is emitted on its own, carrying `service` and these
   * (an alarm on one plan needs `plan`).
   */
  add(name: string, unit: MetricUnitName, value: number, dimensions?: Readonly<Record<string, string>>): void;
}

export const silentLog: Log = { debug() {}, info() {}, warn() {}, error() {} };
export const noMeter: Meter = { add() {} };

/** Wall-clock epoch milliseconds: leases, locks and signal buckets are shared across Lambdas. */
export type Now = () => number;
