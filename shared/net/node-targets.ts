// What a node writes into: the port `ferry serve` is given by its composition root (the CLI builds a
// directory of file images), so the node itself knows DiskTarget and nothing of any one kind of it.
import type { DiskTarget } from '../engine/ports.ts';

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
}
