// The cycle's inputs and results as plain types (functions/contracts.ts parses the same with zod).

/** A size as a person writes it ("32 MiB") or a whole number of bytes. */
export type SizeInput = number | string;

export interface CycleParamsInput {
  readonly chunkSize?: SizeInput | undefined;
  readonly window?: SizeInput | undefined;
  readonly windowLevels?: readonly SizeInput[] | undefined;
  readonly adaptive?: boolean | undefined;
}

export interface CycleDiskInput {
  readonly disk: string;
  /** The new source snapshot of this disk, taken for this cycle. */
  readonly sourceSnapshotId: string;
  readonly volumeSizeGiB: number;
}

/**
 * One disk's base for a set's first cycle when that set has no checkpoint yet but its disks share
 * one with another set's checkpoint (failback: the recovered volume was created from that
 * checkpoint's target snapshot, the original side kept that cycle's source snapshot).
 */
export interface CycleBaseDisk {
  readonly disk: string;
  /** What the new source snapshot is diffed against: the snapshot its volume was created from. */
  readonly previousSourceSnapshotId: string;
  /** The new target snapshot's parent: a snapshot holding the same data as the previous source. */
  readonly parentTargetSnapshotId: string;
}

/** The shared checkpoint a set's first cycle starts from (its disks not listed are copied in full). */
export interface CycleBase {
  /** The other set's checkpoint both sides share (recorded with the cycle, for the record). */
  readonly checkpointId: string;
  readonly disks: readonly CycleBaseDisk[];
}

/** What a cycle is started with: one protection plan's disks. */
export interface CycleInput {
  readonly plan: string;
  readonly set: string;
  readonly cycleId: string;
  readonly disks: readonly CycleDiskInput[];
  readonly params?: CycleParamsInput | undefined;
  /** Only for a set without checkpoints: its first cycle is incremental from this base. */
  readonly base?: CycleBase | undefined;
  /** ISO 8601: when the execution started, before its source snapshots were taken. */
  readonly startedAt?: string | undefined;
}

/** One disk's differ task. */
export interface DiffTask {
  readonly set: string;
  readonly cycleId: string;
  readonly disk: string;
}

/** The cycle as the state machine carries it from prepare to finalize (a reference, not state). */
export interface CycleRef {
  readonly plan: string;
  readonly set: string;
  readonly cycleId: string;
  readonly lockOwner: string;
  readonly sequence: number;
  readonly disks: DiffTask[];
}

export const TICK_STATUSES = ['running', 'done', 'stuck', 'failed'] as const;
export type TickStatus = (typeof TICK_STATUSES)[number];

export interface DiskProgressReport {
  readonly disk: string;
  /** Descriptors of this cycle; undefined until the differ has finished. */
  readonly descriptors?: number | undefined;
  readonly completed: number;
  readonly bytes: number;
  readonly completedBytes: number;
  readonly inflightBytes: number;
  readonly windowBytes: number;
  /** Grants issued by this tick (the writers issue most grants themselves, ACK-clocked). */
  readonly granted: number;
  /** Grants this tick found lost or expired and granted again. */
  readonly reclaimed: number;
}

export interface TickResult {
  readonly status: TickStatus;
  /** Why the cycle failed or is stuck; absent while it runs. */
  readonly reason?: string | undefined;
  /** Consecutive ticks without a completed descriptor. */
  readonly idleTicks: number;
  readonly disks: DiskProgressReport[];
  /** The caller's count of this tick, echoed as given (the state machine counts ticks with it). */
  readonly round?: number | undefined;
}

export interface DifferResult {
  readonly set: string;
  readonly cycleId: string;
  readonly disk: string;
  readonly kind: 'full' | 'incremental';
  /** False when the differ stopped before its deadline: call it again with the same task. */
  readonly done: boolean;
  readonly descriptors: number;
  readonly blocks: number;
  readonly bytes: number;
}

export interface PublishedDisk {
  readonly disk: string;
  readonly kind: 'full' | 'incremental';
  readonly sourceSnapshotId: string;
  readonly targetSnapshotId: string;
  readonly descriptors: number;
  readonly blocks: number;
  readonly bytes: number;
  /** Hex of the LINEAR aggregate sent with CompleteSnapshot. */
  readonly aggregateSha256: string;
}

export type FinalizeResult =
  | {
      readonly status: 'published';
      readonly checkpointId: string;
      readonly sequence: number;
      readonly disks: PublishedDisk[];
    }
  /** Target snapshots are still completing: wait and finalize again with the same input. */
  | { readonly status: 'completing'; readonly pending: string[] };

export interface AbortResult {
  readonly status: 'aborted';
  readonly reason: string;
  /** The checkpoint that stays current (the last good one), if the set has any. */
  readonly currentCheckpointId?: string | undefined;
}
