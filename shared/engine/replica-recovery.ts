// Point-in-time recovery of a replica that keeps its own history (a file image's, on a node): the
// question a replica is asked and the image it answers with. The node's port (shared/net/node-targets.ts)
// and the file images that implement it (shared/local/image-dir.ts) both speak these.

/** A checkpoint of one disk as a recover question names it, with the later checkpoints that wrote it. */
export interface RecoveryQuery {
  readonly checkpoint: {
    readonly id: string;
    readonly sequence: number;
    readonly sizeBytes: number;
    readonly targetRef: string;
  };
  /** Ascending by sequence: a replica holds the checkpoint while it holds the history of each. */
  readonly later: readonly { readonly id: string; readonly sequence: number }[];
}

/** A checkpoint's image made for sending; `remove` must be called once it is sent (or not). */
export interface MaterialisedReplica {
  readonly sizeBytes: number;
  /** Its non-zero data in offset order, in runs of at most `maxRun` bytes (each valid until the next). */
  runs(maxRun: number): AsyncIterable<{ readonly offset: number; readonly data: Uint8Array }>;
  remove(): Promise<void>;
}
