// Per-disk completion tracking: out-of-order completions advance a contiguous watermark, which is
// made durable at least every `checkpointInterval` bytes so a crashed run re-sends little.

/**
 * Tracks which descriptors of one disk are done. Completions arrive out of order (many chunks in
 * flight); only the contiguous prefix is durable, so after a crash at most the bytes completed
 * above the watermark (bounded by the window) plus the unsaved interval are sent again.
 */
export class DiskProgressTracker {
  private watermarkSeq: number;
  private bytesBelowWatermark: number;
  private readonly above = new Map<number, { bytes: number; digest: string }>();
  private unsavedDigests: string[] = [];
  private bytesAtLastSave: number;

  /** `onAdvance` receives each digest once, in seq order, as the watermark passes it. */
  constructor(
    private readonly checkpointInterval: number,
    resume: { watermark: number; bytesDone: number } = { watermark: 0, bytesDone: 0 },
    private readonly onAdvance: (digest: string) => void = () => {},
  ) {
    this.watermarkSeq = resume.watermark;
    this.bytesBelowWatermark = resume.bytesDone;
    this.bytesAtLastSave = resume.bytesDone;
  }

  get watermark(): number {
    return this.watermarkSeq;
  }

  /** Bytes durable-eligible (below the watermark). */
  get bytesDone(): number {
    return this.bytesBelowWatermark;
  }

  /** Bytes completed in total, including those above the watermark. */
  get bytesCompleted(): number {
    let sum = this.bytesBelowWatermark;
    for (const v of this.above.values()) sum += v.bytes;
    return sum;
  }

  /** Records a verified chunk. Returns true when a durable save is due. Called once per chunk. */
  complete(seq: number, bytes: number, digest: string): boolean {
    if (seq < this.watermarkSeq || this.above.has(seq)) {
      throw new Error(`descriptor ${seq} completed twice`);
    }
    this.above.set(seq, { bytes, digest });
    for (let next = this.above.get(this.watermarkSeq); next; next = this.above.get(this.watermarkSeq)) {
      this.above.delete(this.watermarkSeq);
      this.unsavedDigests.push(next.digest);
      this.onAdvance(next.digest);
      this.bytesBelowWatermark += next.bytes;
      this.watermarkSeq++;
    }
    return this.due;
  }

  /** Completed bytes below the watermark that are not yet durable. */
  get unsaved(): number {
    return this.bytesBelowWatermark - this.bytesAtLastSave;
  }

  /** Undurable bytes beyond one interval: a save is running behind the completions. */
  get lag(): number {
    return Math.max(0, this.unsaved - this.checkpointInterval);
  }

  /** A full interval has passed the watermark since the last durable save. */
  get due(): boolean {
    return this.bytesBelowWatermark - this.bytesAtLastSave >= this.checkpointInterval;
  }

  /** Takes what a save must persist; call `saved()` once it is durable. */
  pendingSave(): { watermark: number; bytesDone: number; appended: string[] } {
    return {
      watermark: this.watermarkSeq,
      bytesDone: this.bytesBelowWatermark,
      appended: this.unsavedDigests.slice(),
    };
  }

  saved(save: { watermark: number; bytesDone: number; appended: string[] }): void {
    this.bytesAtLastSave = save.bytesDone;
    // Digests appended after pendingSave() was taken stay queued for the next save.
    this.unsavedDigests = this.unsavedDigests.slice(save.appended.length);
  }
}
