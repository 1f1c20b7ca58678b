// In-memory fakes of the engine's ports for engine tests: sources, targets, and the state store.
import type { Descriptor } from '../../shared/engine/descriptors.ts';
import { FerryError, IntegrityError } from '../../shared/engine/errors.ts';
import type { Extent } from '../../shared/engine/extents.ts';
import { sha256Hex } from '../../shared/engine/integrity.ts';
import type { Clock, CopyKind, DiskCommit, DiskSource, DiskTarget } from '../../shared/engine/ports.ts';

// The state store fake is product code (the fleet simulation runs on it too); tests take it from here.
export { MemoryStateStore } from '../../shared/engine/memory-state-store.ts';

export class MemorySource implements DiskSource {
  reads = 0;
  readonly allocatedExtents: (() => AsyncIterable<Extent>) | undefined;
  constructor(
    readonly data: Uint8Array,
    readonly name = 'mem:source',
    allocated?: Extent[],
  ) {
    this.allocatedExtents = allocated
      ? async function* () {
          yield* allocated;
        }
      : undefined;
  }
  get sizeBytes(): number {
    return this.data.length;
  }
  async read(offset: number, length: number): Promise<Uint8Array> {
    this.reads++;
    if (offset + length > this.data.length) throw new FerryError(`read past end at ${offset}`);
    return this.data.slice(offset, offset + length);
  }
  async close(): Promise<void> {}
}

export interface MemoryTargetOptions {
  blockSize?: number;
  /** Simulated write latency (ms of the injected clock). */
  latencyMs?: number;
  clock?: Clock;
  /** Called before each write; may throw to inject failures. */
  beforeWrite?: (d: Descriptor) => void;
}

/** A target with staged writes applied at commit, like the file target; counts what it receives. */
export class MemoryTarget implements DiskTarget {
  readonly name: string;
  readonly blockSize: number;
  image: Uint8Array | undefined;
  private staged = new Map<number, Uint8Array>();
  bytesWritten = 0;
  chunksWritten = 0;
  inflight = 0;
  peakInflight = 0;
  commits = 0;
  private size = 0;
  private kind: CopyKind = 'full';

  constructor(
    private readonly opts: MemoryTargetOptions = {},
    name = 'mem:target',
  ) {
    this.name = name;
    this.blockSize = opts.blockSize ?? 4096;
  }

  async open(sizeBytes: number, kind: CopyKind, resume: boolean): Promise<void> {
    if (!resume) this.staged.clear();
    if (kind === 'incremental' && this.image?.length !== sizeBytes) throw new FerryError('no base image');
    this.size = sizeBytes;
    this.kind = kind;
  }

  async writeChunk(d: Descriptor, data: Uint8Array, sha256: string): Promise<void> {
    this.inflight += d.bytes;
    this.peakInflight = Math.max(this.peakInflight, this.inflight);
    try {
      this.opts.beforeWrite?.(d);
      if (this.opts.latencyMs && this.opts.clock) await this.opts.clock.sleep(this.opts.latencyMs);
      if (sha256Hex(data) !== sha256)
        throw new IntegrityError(`checksum mismatch at ${d.offset}`, { offset: d.offset });
      let at = 0;
      for (const e of d.extents) {
        this.staged.set(e.offset, data.slice(at, at + e.length));
        at += e.length;
      }
      this.bytesWritten += d.bytes;
      this.chunksWritten++;
    } finally {
      this.inflight -= d.bytes;
    }
  }

  async read(offset: number, length: number): Promise<Uint8Array> {
    return (this.image ?? new Uint8Array(0)).slice(offset, offset + length);
  }

  async commit(summary: DiskCommit): Promise<string> {
    const image = this.kind === 'full' ? new Uint8Array(this.size) : this.image!.slice();
    for (const [offset, data] of this.staged) image.set(data, offset);
    this.image = image;
    this.commits++;
    return `mem:${summary.aggregateSha256.slice(0, 8)}`;
  }

  async afterPublish(): Promise<void> {
    this.staged.clear();
  }

  async close(): Promise<void> {}
}

/** Deterministic pseudo-random bytes. */
export function randomBytes(size: number, seed = 1): Uint8Array {
  const out = new Uint8Array(size);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < size; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = x & 0xff;
  }
  return out;
}
