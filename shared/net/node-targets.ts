// What a node writes into: the port `ferry serve` is given by its composition root (the CLI builds a
// directory of file images), so the node itself knows DiskTarget and nothing of any one kind of it.
import type { DiskTarget } from '../engine/ports.ts';
import type { MaterialisedReplica, RecoveryQuery } from '../engine/replica-recovery.ts';

export type { MaterialisedReplica, RecoveryQuery };

/** A replica re-hashed against its manifest: what `ferry verify` of a replica on its node reports. */
export interface ReplicaReport {
  readonly ok: boolean;
  readonly regions: number;
  /** Offsets of the first regions that do not match (a few, not all). */
  readonly mismatches: readonly number[];
  /** The reference the replica's manifest gives (compared with the checkpoint's). */
  readonly manifestRef: string;
}

/** Where a node keeps its replicas, one per disk. */
export interface NodeTargets {
  /** Where the replicas are, for operator messages (e.g. `file:/srv/images`); never a credential. */
  readonly name: string;
  /**
   * A new target for `disk`, for one session, one resume check or one settled commit: the node
   * opens, writes, commits, rolls back and closes it as the engine would, and closes it after each
   * use. Must not touch storage before one of its methods is called. Its block size must divide
   * the protocol's block (the node refuses a session otherwise).
   */
  target(disk: string): DiskTarget;
  /**
   * Whether `disk` has a replica already: a new session then stages beside it, so it counts twice
   * against its credential's image quota.
   */
  exists(disk: string): Promise<boolean>;
  /**
   * Optional: re-hashes `disk`'s replica against its manifest and, when given, the checkpoint's
   * reference. Without it the node answers a verify with the reason it cannot.
   */
  verify?(disk: string, expectedRef: string | undefined): Promise<ReplicaReport>;
  /**
   * Optional: a target keeps a published cycle's history under the id it was opened with (the
   * node's session id, `recordedAs`); this names entry `sequence` after the checkpoint it became.
   * Without it the node keeps no history of its own (its targets are then told no checkpoint).
   */
  nameHistory?(disk: string, sequence: number, recordedAs: string, checkpoint: string): Promise<void>;
  /**
   * Optional: deletes the history of `disk`'s replica that no checkpoint from `keepFrom` on needs
   * (the entries of cycles up to it); returns the sequences deleted. Without it the node answers a
   * prune with the reason it cannot, and the history (if any) stays.
   */
  pruneHistory?(disk: string, keepFrom: number): Promise<number[]>;
  /**
   * Optional: whether `disk`'s replica can give the checkpoint's image, from what it holds and its
   * history; with `readManifest`, the checkpoint's manifest too (what the image is verified
   * against). Rejects when it cannot, with an error whose message says why and whose `reason`, if
   * it has one, says it in a phrase that names the disk but not the checkpoint (for a listing).
   * Reads no data of the disk.
   */
  planRecovery?(
    disk: string,
    query: RecoveryQuery,
    readManifest: boolean,
  ): Promise<{ readonly sizeBytes: number; readonly manifest: Buffer | undefined }>;
  /**
   * Optional (with planRecovery): writes the checkpoint's image somewhere the node's images are not,
   * verified against the checkpoint's manifest, for sending; rejects as planRecovery does.
   */
  materialise?(disk: string, query: RecoveryQuery, signal?: AbortSignal): Promise<MaterialisedReplica>;
}
