// Fakes and oracles for tests that need chunks to complete out of sequence order: a memory target
// whose write latency depends on the chunk, a state store that records every durable progress save,
// and the expected per-chunk digests computed from the source data, independently of the engine run.
import type { Descriptor } from '../../shared/engine/descriptors.ts';
import { cutDescriptors, normalizeExtents } from '../../shared/engine/descriptors.ts';
import type { Extent } from '../../shared/engine/extents.ts';
import { linearAggregate, sha256Hex, toHex } from '../../shared/engine/integrity.ts';
import type { Clock, DiskCommit, DiskProgress } from '../../shared/engine/ports.ts';
import { MemoryStateStore, MemoryTarget } from './memory.ts';

/**
 * A MemoryTarget whose write latency (ms of the injected clock) is chosen per descriptor, so a
 * slow chunk finishes after faster chunks granted behind it. Records the order writes finished in
 * and what it was told at commit.
 */
export class VaryingLatencyTarget extends MemoryTarget {
  /** Seqs in the order their writes finished. */
  readonly finished: number[] = [];
  readonly commitSummaries: DiskCommit[] = [];

  constructor(
    private readonly clock: Clock,
    private readonly latencyMs: (d: Descriptor) => number,
    opts: { blockSize?: number; name?: string; beforeWrite?: (d: Descriptor) => void } = {},
  ) {
    super({ blockSize: opts.blockSize ?? 4096, beforeWrite: opts.beforeWrite }, opts.name ?? 'mem:varying');
  }

  override async writeChunk(d: Descriptor, data: Uint8Array, sha256: string, signal?: AbortSignal) {
    await this.clock.sleep(this.latencyMs(d), signal);
    await super.writeChunk(d, data, sha256);
    this.finished.push(d.seq);
  }

  override async commit(summary: DiskCommit): Promise<string> {
    this.commitSummaries.push(summary);
    return super.commit(summary);
  }
}

/** Every fourth chunk (seq 0, 4, 8, ...) takes `slowMs`, the others `fastMs`. */
export const everyFourthSlow =
  (slowMs = 40, fastMs = 2) =>
  (d: Descriptor): number =>
    d.seq % 4 === 0 ? slowMs : fastMs;

/** Pairs of positions (i < j) where a later-finished seq is lower: 0 when writes finished in order. */
export function inversions(order: readonly number[]): number {
  let n = 0;
  for (let i = 0; i < order.length; i++)
    for (let j = i + 1; j < order.length; j++) if (order[j]! < order[i]!) n++;
  return n;
}

export interface RecordedSave {
  readonly set: string;
  readonly disk: string;
  readonly progress: Omit<DiskProgress, 'digests'>;
  readonly appended: readonly string[];
  /** Whatever the test wants to know at the moment of the save (e.g. which writes had finished). */
  readonly context: unknown;
}

/** A MemoryStateStore that records every `saveProgress` call, as called, before storing it. */
export class RecordingStateStore extends MemoryStateStore {
  readonly recorded: RecordedSave[] = [];

  /** `snapshot(disk)` is called at each save; its result is kept as the save's `context`. */
  constructor(private readonly snapshot: (disk: string) => unknown = () => undefined) {
    super();
  }

  override async saveProgress(
    set: string,
    disk: string,
    progress: Omit<DiskProgress, 'digests'>,
    appended: readonly string[],
  ): Promise<void> {
    this.recorded.push({
      set,
      disk,
      progress: { ...progress },
      appended: [...appended],
      context: this.snapshot(disk),
    });
    return super.saveProgress(set, disk, progress, appended);
  }
}

export interface ExpectedChunk {
  readonly seq: number;
  readonly bytes: number;
  /** SHA-256 (hex) of the descriptor's extents of `data`, concatenated in order. */
  readonly digest: string;
}

/**
 * What the engine must produce for a disk, from the source data alone: the descriptors of the change
 * map (normalised and cut as a plan is) and each one's digest over the source bytes it covers.
 */
export function expectedChunks(
  data: Uint8Array,
  changed: readonly Extent[],
  opts: { blockSize: number; chunkSize: number },
): ExpectedChunk[] {
  const extents = normalizeExtents(changed, { diskSize: data.length, blockSize: opts.blockSize });
  const out: ExpectedChunk[] = [];
  for (const d of cutDescriptors(extents, { chunkSize: opts.chunkSize })) {
    const bytes = Buffer.concat(d.extents.map((e) => data.subarray(e.offset, e.offset + e.length)));
    out.push({ seq: d.seq, bytes: d.bytes, digest: sha256Hex(bytes) });
  }
  return out;
}

/** SHA-256 (hex) over the chunks' digests in sequence order: the disk aggregate a checkpoint records. */
export function seqOrderAggregate(chunks: readonly ExpectedChunk[]): string {
  const sorted = [...chunks].sort((a, b) => a.seq - b.seq);
  return toHex(linearAggregate(sorted.map((c) => c.digest)));
}

/** Sum of the bytes of the chunks with seq < watermark. */
export function bytesBelow(chunks: readonly ExpectedChunk[], watermark: number): number {
  let sum = 0;
  for (const c of chunks) if (c.seq < watermark) sum += c.bytes;
  return sum;
}

/** Fragmented allocated extents over a disk of `size` bytes: runs of varied length and gaps, seeded. */
export function fragmentedExtents(size: number, seed: number): Extent[] {
  const out: Extent[] = [];
  let x = seed >>> 0 || 1;
  const next = () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return x >>> 0;
  };
  let at = 0;
  while (at < size) {
    const gap = (next() % 96) * 4096;
    const length = (1 + (next() % 700)) * 4096 + (next() % 3 === 0 ? 1234 : 0);
    const offset = at + gap;
    if (offset >= size) break;
    out.push({ offset, length: Math.min(length, size - offset) });
    at = offset + length;
  }
  return out;
}
