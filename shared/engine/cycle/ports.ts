// The ports of the serverless cycle: what the pure cycle logic (prepare, diff, grant, write,
// tick, finalize, abort) needs from the outside. DynamoDB, SQS and the EBS direct APIs implement them
// in shared/aws; memory fakes in test/support implement them for the logic tests; one contract suite
// per port (test/contract/) runs against both.
//
// The cost model behind the shapes: a chunk's bookkeeping must cost at most 3 DynamoDB writes and 2
// reads. So a disk's whole grant state is one small item (`FlowState`, < 1 KB) changed by two
// conditional updates per writer batch (`complete`, `advance`), completions are recorded per writer
// batch (`recordCompletions`, one small item for up to a batch of chunks), and nothing is leased:
// what is in flight is derived from the flow (granted minus completed), so a crash anywhere cannot
// leak window or budget. A grant whose message is lost (a crash between `advance` and `send`, a
// message in the DLQ) is found by the tick from the flow's grant marks and granted again.
import type { Descriptor } from '../descriptors.ts';
import type { RecoveryCheckpoint } from '../ports.ts';

// ---- EBS and the outside world ------------------------------------------------------------------

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
   * Adds one data point. Without `dimensions` it is aggregated with the invocation's other metrics;
   * with them it is emitted on its own, carrying these (an alarm on one plan needs `plan`).
   */
  add(name: string, unit: MetricUnitName, value: number, dimensions?: Readonly<Record<string, string>>): void;
}

export const silentLog: Log = { debug() {}, info() {}, warn() {}, error() {} };
export const noMeter: Meter = { add() {} };

// ---- records -------------------------------------------------------------------------------------

export const CYCLE_STATES = ['active', 'finalizing', 'published', 'aborted'] as const;
export type CycleState = (typeof CYCLE_STATES)[number];
export const DISK_KINDS = ['full', 'incremental'] as const;
export type DiskKind = (typeof DISK_KINDS)[number];

/** One cycle of a plan. Written by prepare, the tick and the finalizer; never per chunk. */
export interface CycleRecord {
  readonly plan: string;
  readonly set: string;
  readonly cycleId: string;
  readonly lockOwner: string;
  readonly sequence: number;
  readonly parentCheckpointId?: string | undefined;
  readonly disks: readonly string[];
  readonly chunkSize: number;
  readonly windowLevels: readonly number[];
  readonly initialLevel: number;
  readonly adaptive: boolean;
  readonly createdAt: number;
  /** When the cycle's execution started (epoch ms), if the state machine said: the data's age. */
  readonly startedAt?: number | undefined;
  readonly state: CycleState;
  /** The first permanent failure recorded by anyone (writer, planner); the cycle cannot publish. */
  readonly failure?: string | undefined;
  readonly ticks: number;
  readonly idleTicks: number;
  /** Completed descriptors (all disks) at the last tick, to tell progress from a stall. */
  readonly lastCompleted: number;
  /**
   * When the last tick ran (epoch ms): the window controllers evaluated every disk up to here, so the
   * next tick replays signals from here on without a per-disk write each tick.
   */
  readonly lastTickAt?: number | undefined;
  readonly checkpointId?: string | undefined;
  readonly eventSent?: boolean | undefined;
}

/**
 * One disk of a cycle: what it copies from and to, and the differ's progress. Immutable once the
 * differ is done except `state`, the controller's state and `completeRequested`, so a writer
 * container caches it for the cycle.
 */
export interface CycleDiskRecord {
  readonly set: string;
  readonly disk: string;
  readonly cycleId: string;
  readonly kind: DiskKind;
  readonly state: CycleState;
  readonly volumeSizeGiB: number;
  readonly sourceSnapshotId: string;
  readonly previousSourceSnapshotId?: string | undefined;
  readonly targetSnapshotId: string;
  /** When prepare started the target snapshot (epoch ms). */
  readonly targetStartedAt: number;
  readonly parentTargetSnapshotId?: string | undefined;
  readonly chunkSize: number;
  /** Descriptors per page, fixed per disk and cycle, so the page of a seq needs no index. */
  readonly perPage: number;
  /** Whether the target snapshot is encrypted: zero blocks are then always written. */
  readonly encrypted: boolean;
  // The differ's resume point: descriptors [0, diffSeq) are stored in whole pages; listing resumes
  // at block diffStartBlock, where descriptor diffSeq starts.
  readonly diffDone: boolean;
  readonly diffSeq: number;
  readonly diffStartBlock: number;
  readonly diffBlocks: number;
  readonly diffBytes: number;
  /** Total descriptors; set when the differ is done. */
  readonly descriptors?: number | undefined;
  /** The window controller's persisted state (WindowController.state()) and how far it evaluated. */
  readonly controller?: Readonly<Record<string, unknown>> | undefined;
  readonly evaluatedAt?: number | undefined;
  readonly completeRequested?: boolean | undefined;
}

/** A descriptor as the differ stored it: the engine's descriptor plus each block's read token. */
export interface PlannedDescriptor extends Descriptor {
  /** One per 512 KiB block of the descriptor's extents, in order; undefined = reads as zeros. */
  readonly tokens: readonly (string | undefined)[];
}

/** A chunk written: its seq and the blocks the target accepted, with their SHA-256s. */
export interface CompletionEntry {
  readonly seq: number;
  readonly blocks: readonly WrittenBlock[];
}

/** Writer signals for the window controller, summed per 250 ms bucket. */
export interface SignalDelta {
  readonly attempts: number;
  readonly successes: number;
  readonly throttles: number;
  readonly errors: number;
  readonly bytes: number;
  readonly latencyMs: number;
  readonly windowLimited: number;
  readonly nodePressure: number;
}
export interface SignalBucket extends SignalDelta {
  /** Start of the bucket, epoch ms. */
  readonly at: number;
}
export const SIGNAL_BUCKET_MS = 250;

// ---- CycleLedger ---------------------------------------------------------------------------------

/** Patches the ledger applies to a cycle; `undefined` fields are left alone. */
export type CyclePatch = Partial<
  Pick<
    CycleRecord,
    'state' | 'ticks' | 'idleTicks' | 'lastCompleted' | 'lastTickAt' | 'checkpointId' | 'eventSent'
  >
>;
export type DiskPatch = Partial<
  Pick<
    CycleDiskRecord,
    | 'state'
    | 'diffDone'
    | 'diffSeq'
    | 'diffStartBlock'
    | 'diffBlocks'
    | 'diffBytes'
    | 'descriptors'
    | 'controller'
    | 'evaluatedAt'
    | 'completeRequested'
  >
>;

/**
 * Cycles, their disks, descriptor pages, completions and writer signals. Every method must be
 * idempotent where it says so; "conditional" methods resolve false/undefined when their condition
 * does not hold, and never throw for it.
 */
export interface CycleLedger {
  /** Creates the cycle; false when it exists already (a retried prepare). */
  createCycle(record: CycleRecord): Promise<boolean>;
  getCycle(set: string, cycleId: string): Promise<CycleRecord | undefined>;
  /**
   * Applies `patch` when the cycle's state is one of `from` (any state when omitted); returns the
   * record after, or undefined when the condition failed (or the cycle does not exist).
   */
  updateCycle(
    set: string,
    cycleId: string,
    patch: CyclePatch,
    from?: readonly CycleState[],
  ): Promise<CycleRecord | undefined>;
  /** Records the cycle's first failure; true when this call recorded it (later ones keep the first). */
  recordFailure(set: string, cycleId: string, failure: string): Promise<boolean>;

  createDisk(record: CycleDiskRecord): Promise<boolean>;
  getDisk(set: string, disk: string, cycleId: string): Promise<CycleDiskRecord | undefined>;
  /**
   * Applies `patch` when every field of `expect` equals the stored value (e.g. `{diffSeq: 400}` for
   * the differ's resume point, `{state: 'active'}`); returns the record after or undefined.
   */
  updateDisk(
    set: string,
    disk: string,
    cycleId: string,
    patch: DiskPatch,
    expect?: Partial<Pick<CycleDiskRecord, 'state' | 'diffSeq' | 'diffDone'>>,
  ): Promise<CycleDiskRecord | undefined>;

  /** Stores a page of descriptors; idempotent (same page, same content). A page holds ≤ perPage. */
  putDescriptorPage(
    set: string,
    disk: string,
    cycleId: string,
    page: number,
    descriptors: readonly PlannedDescriptor[],
  ): Promise<void>;
  getDescriptorPage(
    set: string,
    disk: string,
    cycleId: string,
    page: number,
  ): Promise<PlannedDescriptor[] | undefined>;

  /**
   * Durably records a writer batch's completions under `batchId` (unique per batch; a retried call
   * with the same id and entries is harmless). Small: one item per batch, not per page. The same seq
   * may be recorded by several batches (duplicate deliveries); readers deduplicate.
   */
  recordCompletions(
    set: string,
    disk: string,
    cycleId: string,
    batchId: string,
    entries: readonly CompletionEntry[],
  ): Promise<void>;
  /** Every recorded completion of the disk, in no particular order, duplicates included. */
  listCompletions(set: string, disk: string, cycleId: string): AsyncIterable<CompletionEntry>;

  /** Adds a writer batch's signals to the bucket holding `at` (atomic add). */
  addSignals(set: string, disk: string, cycleId: string, at: number, delta: SignalDelta): Promise<void>;
  /** Buckets with `from <= at < to`, ascending. */
  readSignals(set: string, disk: string, cycleId: string, from: number, to: number): Promise<SignalBucket[]>;
}

// ---- GrantFlow -----------------------------------------------------------------------------------

/** A seq to grant again (its grant was lost) or granted again (in flight since `at`). */
export interface Regrant {
  readonly attempt: number;
  /** Epoch ms of the re-grant; undefined while it waits to be granted. */
  readonly at?: number | undefined;
}

/** Where the cursor stood at a tick: every seq below `next` had been granted by `at`. */
export interface GrantMark {
  readonly at: number;
  readonly next: number;
}

/**
 * A disk's grant state in one cycle: one small record. Seqs [0, low) are complete; [low, next) were
 * granted, `done` holds those of them completed; [next, descriptors) wait. In flight =
 * grantedBytes - completedBytes; span (what the window bounds) = grantedBytes - lowBytes.
 */
export interface FlowState {
  /** Bumped by every `advance` and `control` (not by `complete`): the optimistic lock for grants. */
  readonly version: number;
  /** Granting allowed; false once the cycle finalizes or aborts (writers then write nothing new). */
  readonly open: boolean;
  readonly next: number;
  readonly low: number;
  /** Sum of descriptor bytes of seqs [0, next). */
  readonly grantedBytes: number;
  /** Sum of descriptor bytes of seqs [0, low). */
  readonly lowBytes: number;
  /** Completed seqs at or above `low`, with their descriptor bytes. */
  readonly done: ReadonlyMap<number, number>;
  /** Counted exactly once per seq. */
  readonly completedCount: number;
  readonly completedBytes: number;
  readonly writtenBlocks: number;
  /** Seqs in [low, next) to grant again (`at` undefined) or granted again (`at` set). */
  readonly regrants: ReadonlyMap<number, Regrant>;
  /** The disk's window (bytes the span may reach), set by the tick's controller. */
  readonly window: number;
  /** The disk's share of the node budget (bytes it may have in flight), set by the tick. */
  readonly allowance: number;
  /**
   * Epoch ms until which `allowance` holds: the node reservation behind it lasts that long. Past it
   * nobody grants (the cap is 0) until a tick renews it, so a cycle whose planner stopped cannot keep
   * granting on bytes another cycle may have reserved since. 0 on create.
   */
  readonly allowanceUntil: number;
  /** Recent cursor positions, oldest first, a few at most (the tick keeps them for reclaim). */
  readonly marks: readonly GrantMark[];
}

export interface FlowKey {
  readonly set: string;
  readonly disk: string;
  readonly cycleId: string;
}

/** What one `advance` changes; every field is the new value. */
export interface FlowAdvance {
  readonly low: number;
  readonly lowBytes: number;
  /** `done` entries to drop (those now below `low`). */
  readonly dropDone: readonly number[];
  readonly next: number;
  readonly grantedBytes: number;
  /** Re-grants issued now (`at` set) and entries to drop (those now below `low`). */
  readonly regrants: ReadonlyMap<number, Regrant>;
  readonly dropRegrants: readonly number[];
}

/** What the tick sets; every field optional. `addRegrants` adds seqs to grant again. */
export interface FlowControl {
  readonly window?: number | undefined;
  readonly allowance?: number | undefined;
  readonly allowanceUntil?: number | undefined;
  readonly marks?: readonly GrantMark[] | undefined;
  readonly open?: boolean | undefined;
  readonly addRegrants?: ReadonlyMap<number, Regrant> | undefined;
}

/**
 * The per-disk grant state. `complete` and `advance` are the per-batch hot path: one conditional
 * write each, never a read first (both return the state after).
 */
export interface GrantFlow {
  /** Creates the flow (idempotent: an existing flow is returned unchanged); `allowanceUntil` starts at 0. */
  create(key: FlowKey, initial: { window: number; allowance: number }): Promise<FlowState>;
  /** Strongly consistent. */
  get(key: FlowKey): Promise<FlowState | undefined>;
  /**
   * Counts completions exactly once per seq: entries whose seq is below `low` or already in `done`
   * are skipped (`counted` lists the ones this call counted). Atomic; never conflicts with `advance`
   * (does not bump `version`). Works whether or not the flow is open. Returns the state after.
   */
  complete(
    key: FlowKey,
    entries: readonly { seq: number; bytes: number; blocks: number }[],
  ): Promise<{ state: FlowState; counted: number[] }>;
  /**
   * Moves low and the cursor and issues re-grants, if `version` is still `expectVersion` and the
   * flow is open. Returns the state after, or undefined when another advance (or control) won the race.
   * Completions that landed meanwhile are kept.
   */
  advance(key: FlowKey, expectVersion: number, change: FlowAdvance): Promise<FlowState | undefined>;
  /** The tick's and finalizer's settings; unconditional (one planner per cycle). Returns the state after. */
  control(key: FlowKey, change: FlowControl): Promise<FlowState>;
}

// ---- PlanLocks -----------------------------------------------------------------------------------

export interface PlanLock {
  readonly plan: string;
  readonly owner: string;
  /** Epoch ms. */
  readonly lockExpiresAt: number;
}

/** One cycle of a plan at a time. All methods conditional; `now` is the caller's clock. */
export interface PlanLocks {
  /** Takes the lock if free, expired, or already `owner`'s; undefined when someone else holds it. */
  acquire(plan: string, owner: string, ttlMs: number, now: number): Promise<PlanLock | undefined>;
  /** Extends `owner`'s lock; undefined when it is no longer `owner`'s (expired and taken over). */
  renew(plan: string, owner: string, ttlMs: number, now: number): Promise<PlanLock | undefined>;
  /** Releases `owner`'s lock; false when it was not `owner`'s. */
  release(plan: string, owner: string): Promise<boolean>;
  get(plan: string): Promise<PlanLock | undefined>;
}

// ---- NodeBudget ----------------------------------------------------------------------------------

/**
 * The node's in-flight budget, shared by the cycles running on it at once: each cycle's tick
 * reserves the bytes its disks may have in flight until `until`; a reservation not renewed expires,
 * so a crashed cycle's bytes come back by themselves.
 */
export interface NodeBudget {
  /**
   * Sets `holder`'s reservation to at most `bytes`, limited by the budget less other live
   * reservations (those with `until > now`). Returns the bytes reserved (maybe fewer, maybe 0).
   * Atomic against concurrent reservations: the sum of live reservations never exceeds `limit`.
   */
  reserve(
    node: string,
    holder: string,
    bytes: number,
    until: number,
    now: number,
    limit: number,
  ): Promise<number>;
  /** Drops `holder`'s reservation (idempotent). */
  release(node: string, holder: string): Promise<void>;
}

// ---- GrantChannel --------------------------------------------------------------------------------

/** A grant as it travels to a writer. */
export interface Grant {
  readonly set: string;
  readonly cycleId: string;
  readonly disk: string;
  /** Extents in absolute disk offsets, exactly as the engine cut them. */
  readonly descriptor: Descriptor;
  /** 1 for the first issue; re-grants count up. */
  readonly attempt: number;
  /**
   * Sent by the tick for a seq the flow counts complete but the ledger holds no completion of: the
   * writer writes it even though the flow says done (it is not in flight, and counts nothing).
   */
  readonly repair?: boolean | undefined;
}

/** One received grant message, as the queue delivers it (an SQS record). */
export interface GrantRecord {
  readonly messageId: string;
  /** Identifies this delivery for `handBack`. */
  readonly receiptHandle: string;
  readonly body: string;
}

/** Carries grants to the writers (SQS). At-least-once delivery. */
export interface GrantChannel {
  /** Sends all or reports the ones not sent (the caller marks them to grant again). */
  send(grants: readonly Grant[]): Promise<{ unsent: Grant[] }>;
  /**
   * Decodes a received body; throws (any error, naming what is wrong) for one that is not a grant
   * this channel sent. Pure: the writer leaves such a message for the DLQ.
   */
  decode(body: string): Grant;
  /** Makes a received grant visible again at once (a writer near its deadline hands it back). */
  handBack(receiptHandle: string): Promise<void>;
}

// ---- Catalog -------------------------------------------------------------------------------------

export interface ReplicationSetRecord {
  readonly set: string;
  readonly plan: string;
  readonly createdAt: string;
}
export interface CatalogDiskRecord {
  readonly set: string;
  readonly disk: string;
  readonly source: string;
  readonly target: string;
  readonly sizeBytes: number;
  readonly blockSize: number;
}
export const JOB_STATUSES = [
  'planning',
  'replicating',
  'finalizing',
  'published',
  'failed',
  'abandoned',
] as const;
export type JobStatus = (typeof JOB_STATUSES)[number];
export interface JobRecord {
  readonly set: string;
  readonly cycleId: string;
  readonly plan: string;
  readonly status: JobStatus;
  readonly startedAt: string;
  readonly updatedAt: string;
  readonly checkpointId?: string | undefined;
  readonly error?: string | undefined;
}

/**
 * The recovery catalog as the cycle uses it; DynamoStateStore implements it structurally. Conflicts
 * reject with the adapter's own error: the cycle logic does not know it and re-reads instead.
 */
export interface CycleCatalog {
  getSet(set: string): Promise<ReplicationSetRecord | undefined>;
  /** Creates or replaces. */
  putSet(record: ReplicationSetRecord): Promise<void>;
  /** Creates or replaces. */
  putDisk(record: CatalogDiskRecord): Promise<void>;
  /** Rejects when a job with this cycle id exists. */
  createJob(record: JobRecord): Promise<void>;
  getJob(set: string, cycleId: string): Promise<JobRecord | undefined>;
  /** Moves the job from `from` to `to`; rejects when it is not in `from` (someone moved it first). */
  updateJobStatus(
    set: string,
    cycleId: string,
    from: JobStatus,
    to: JobStatus,
    updatedAt: string,
    extra?: { checkpointId?: string; error?: string },
  ): Promise<unknown>;
  /** The set's last published checkpoint; rejects when that entry cannot be read. */
  latestCheckpoint(set: string): Promise<RecoveryCheckpoint | undefined>;
  listCheckpoints(set?: string): Promise<RecoveryCheckpoint[]>;
  /** Exactly once: rejects if a checkpoint with this id or sequence exists. */
  publishCheckpoint(checkpoint: RecoveryCheckpoint): Promise<void>;
}
