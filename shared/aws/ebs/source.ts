// An EBS snapshot as a replication source: its blocks (full copy) or its changes since an earlier
// snapshot (incremental) as streamed extents, and checksum-verified reads through GetSnapshotBlock.
import { ConfigError, TransferError } from '../../engine/errors.ts';
import type { Extent } from '../../engine/extents.ts';
import type { DiskSource } from '../../engine/ports.ts';
import { type EbsDeps, NO_RETRY, type ResolvedEbsDeps, resolveDeps } from './client.ts';
import { EBS_BLOCK_SIZE, EbsError } from './errors.ts';
import {
  blockRuns,
  getSnapshotBlock,
  listChangedBlockPages,
  listSnapshotBlockPages,
  volumeBytes,
} from './reader.ts';

// 65,536 block tokens (~15 MB): a 32 GiB change set read without re-listing. Beyond it, reads list
// again from the block they need, a page at a time, so memory stays bounded on any disk size.
export const DEFAULT_TOKEN_CACHE_SIZE = 65_536;
// 8 blocks (4 MiB): a chunk cut finer than 512 KiB (a file target's 4 KiB pages) reads each block
// once, not once per page; concurrent reads of one block share a request.
export const DEFAULT_BLOCK_CACHE_SIZE = 8;
// 1,000 blocks per re-list: one List call serves the next 500 MiB of reads.
const RELIST_PAGE_SIZE = 1000;
// Known-empty block ranges remembered from re-lists (a read of a hole costs no request).
const MAX_GAPS = 64;

export interface EbsSourceOptions extends EbsDeps {
  readonly snapshotId: string;
  /** The snapshot the previous cycle copied: `changedExtents` lists the changes since it. */
  readonly baseSnapshotId?: string | undefined;
  /** Names the disk in messages. */
  readonly disk?: string | undefined;
  /** Skips the List call that learns the volume size. */
  readonly sizeBytes?: number | undefined;
  readonly tokenCacheSize?: number | undefined;
  readonly blockCacheSize?: number | undefined;
  /** The source owns `client` and destroys it on close (a client made just for this source). */
  readonly ownsClient?: boolean | undefined;
}

const SNAPSHOT_ID = /^snap-[0-9a-f]+$/;

/** Streams of extents into the list the engine's DiskJob.changed takes; adjacent extents merge. */
export async function collectExtents(extents: AsyncIterable<Extent>): Promise<Extent[]> {
  const out: Extent[] = [];
  for await (const e of extents) {
    const last = out[out.length - 1];
    if (last && last.offset + last.length === e.offset)
      out[out.length - 1] = { offset: last.offset, length: last.length + e.length };
    else out.push(e);
  }
  return out;
}

/**
 * Reads one completed snapshot (`ebs://SNAPSHOT`), or the change from `baseSnapshotId` to it
 * (`ebs-diff://BASE..SNAPSHOT`). Reads are single attempts (the engine retries); the listings retry
 * each page themselves, since nothing above them does.
 */
export class EbsSource implements DiskSource {
  readonly name: string;
  readonly snapshotId: string;
  readonly baseSnapshotId: string | undefined;
  private readonly disk: string;
  private readonly listDeps: ResolvedEbsDeps;
  private readonly readDeps: ResolvedEbsDeps;
  /** Block index -> its GetSnapshotBlock token, or null for a block that reads as zeros. */
  private readonly tokens = new Map<number, string | null>();
  private readonly tokenCacheSize: number;
  private readonly gaps: { from: number; to: number }[] = [];
  private readonly blocks = new Map<number, Promise<Uint8Array | null>>();
  private readonly blockCacheSize: number;
  private relisting: Promise<void> = Promise.resolve();
  private readonly ownsClient: boolean;

  private constructor(
    opts: EbsSourceOptions,
    readonly sizeBytes: number,
  ) {
    this.snapshotId = opts.snapshotId;
    this.baseSnapshotId = opts.baseSnapshotId;
    this.name =
      opts.baseSnapshotId === undefined
        ? `ebs://${opts.snapshotId}`
        : `ebs-diff://${opts.baseSnapshotId}..${opts.snapshotId}`;
    this.disk = opts.disk ?? this.name;
    this.listDeps = resolveDeps(opts);
    this.readDeps = { ...this.listDeps, retry: NO_RETRY };
    this.tokenCacheSize = opts.tokenCacheSize ?? DEFAULT_TOKEN_CACHE_SIZE;
    this.blockCacheSize = opts.blockCacheSize ?? DEFAULT_BLOCK_CACHE_SIZE;
    this.ownsClient = opts.ownsClient === true;
  }

  /** Opens a completed snapshot; learns its size with one List call unless `sizeBytes` is given. */
  static async open(opts: EbsSourceOptions): Promise<EbsSource> {
    for (const [setting, id] of [
      ['snapshotId', opts.snapshotId],
      ['baseSnapshotId', opts.baseSnapshotId],
    ] as const) {
      if (id !== undefined && !SNAPSHOT_ID.test(id)) {
        throw new ConfigError(`EBS source: ${setting} "${id}" is not a snapshot id (snap-…)`, { setting });
      }
    }
    let size = opts.sizeBytes;
    let source: EbsSource | undefined;
    if (size === undefined) {
      const first = await listSnapshotBlockPages(resolveDeps(opts), {
        snapshotId: opts.snapshotId,
        disk: opts.disk,
        maxResults: 100,
      }).next();
      if (first.done) throw new ConfigError(`EBS source ${opts.snapshotId}: no answer to ListSnapshotBlocks`);
      size = volumeBytes(first.value.volumeSizeGiB);
      source = new EbsSource(opts, size);
      for (const b of first.value.blocks) source.remember(b.index, b.token, false);
    }
    return source ?? new EbsSource(opts, size);
  }

  /** Every block with data in the snapshot (its whole chain), as extents: the full-copy change map. */
  async *allocatedExtents(signal?: AbortSignal): AsyncGenerator<Extent> {
    const self = this;
    yield* blockRuns(
      (async function* () {
        for await (const page of listSnapshotBlockPages(self.listDeps, {
          snapshotId: self.snapshotId,
          disk: self.disk,
          signal,
        })) {
          for (const b of page.blocks) {
            self.remember(b.index, b.token, false);
            yield b.index;
          }
        }
      })(),
      { volumeBytes: this.sizeBytes },
    );
  }

  /**
   * Blocks that differ between `baseSnapshotId` and this snapshot, as extents: the incremental change
   * map. Blocks that only the base has read as zeros here, and are part of the change.
   */
  async *changedExtents(signal?: AbortSignal): AsyncGenerator<Extent> {
    if (this.baseSnapshotId === undefined) {
      throw new ConfigError(`${this.name}: changedExtents needs a base snapshot (ebs-diff://BASE..NEW)`, {
        setting: 'baseSnapshotId',
      });
    }
    const self = this;
    const base = this.baseSnapshotId;
    yield* blockRuns(
      (async function* () {
        for await (const page of listChangedBlockPages(self.listDeps, {
          firstSnapshotId: base,
          secondSnapshotId: self.snapshotId,
          disk: self.disk,
          signal,
        })) {
          for (const b of page.blocks) {
            self.remember(b.index, b.secondToken ?? null, false);
            yield b.index;
          }
        }
      })(),
      { volumeBytes: this.sizeBytes },
    );
  }

  async read(offset: number, length: number, signal?: AbortSignal): Promise<Uint8Array> {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
      throw new TransferError(`${this.name}: invalid read of ${length} bytes at ${offset}`, {
        disk: this.disk,
        offset,
        retryable: false,
      });
    }
    if (offset + length > this.sizeBytes) {
      throw new TransferError(
        `${this.name}: read of ${length} bytes at offset ${offset} is past the end of the ${this.sizeBytes}-byte volume`,
        { disk: this.disk, offset, retryable: false },
      );
    }
    const out = new Uint8Array(length);
    if (length === 0) return out;
    const first = Math.floor(offset / EBS_BLOCK_SIZE);
    const last = Math.floor((offset + length - 1) / EBS_BLOCK_SIZE);
    const parts: Promise<void>[] = [];
    for (let index = first; index <= last; index++) {
      parts.push(
        this.block(index, signal).then((data) => {
          if (data === null) return; // a hole: `out` is zeros already
          const blockStart = index * EBS_BLOCK_SIZE;
          const from = Math.max(offset, blockStart);
          const to = Math.min(offset + length, blockStart + EBS_BLOCK_SIZE);
          out.set(data.subarray(from - blockStart, to - blockStart), from - offset);
        }),
      );
    }
    await Promise.all(parts);
    return out;
  }

  async close(): Promise<void> {
    this.blocks.clear();
    this.tokens.clear();
    if (this.ownsClient) this.listDeps.client.destroy();
  }

  /** One block's data, or null for a block that reads as zeros; shared by concurrent readers. */
  private block(index: number, signal?: AbortSignal): Promise<Uint8Array | null> {
    const cached = this.blocks.get(index);
    if (cached) {
      this.blocks.delete(index);
      this.blocks.set(index, cached);
      return cached;
    }
    const loading = this.fetch(index, signal);
    this.blocks.set(index, loading);
    loading.catch(() => this.blocks.delete(index));
    while (this.blocks.size > this.blockCacheSize) this.blocks.delete(this.blocks.keys().next().value!);
    return loading;
  }

  private async fetch(index: number, signal?: AbortSignal): Promise<Uint8Array | null> {
    for (let attempt = 1; ; attempt++) {
      const token = await this.tokenFor(index, signal);
      if (token === null) return null;
      try {
        const { data } = await getSnapshotBlock(this.readDeps, {
          snapshotId: this.snapshotId,
          blockIndex: index,
          blockToken: token,
          disk: this.disk,
          signal,
        });
        return data;
      } catch (err) {
        // Block tokens expire (seven days) and a cached one may be stale: list afresh, once.
        const stale = err instanceof EbsError && err.reason === 'INVALID_BLOCK_TOKEN';
        if (!stale || attempt > 1) throw err;
        this.tokens.delete(index);
      }
    }
  }

  private async tokenFor(index: number, signal?: AbortSignal): Promise<string | null> {
    const known = this.lookup(index);
    if (known !== undefined) return known;
    // One re-list at a time: concurrent reads nearby are usually served by the same page.
    const run = this.relisting.then(async () => this.lookup(index) ?? (await this.relist(index, signal)));
    this.relisting = run.then(
      () => {},
      () => {},
    );
    return run;
  }

  private lookup(index: number): string | null | undefined {
    const token = this.tokens.get(index);
    if (token !== undefined) return token;
    return this.gaps.some((g) => index >= g.from && index < g.to) ? null : undefined;
  }

  /**
   * Lists this snapshot's blocks from `index` until it knows whether `index` has data; returns its
   * token, or null for a hole (and remembers the hole up to the next block with data).
   */
  private async relist(index: number, signal?: AbortSignal): Promise<string | null> {
    let firstListed: number | undefined;
    let token: string | null = null;
    for await (const page of listSnapshotBlockPages(this.readDeps, {
      snapshotId: this.snapshotId,
      disk: this.disk,
      startingBlockIndex: index,
      maxResults: RELIST_PAGE_SIZE,
      signal,
    })) {
      for (const b of page.blocks) {
        this.remember(b.index, b.token, true);
        if (b.index === index) token = b.token;
      }
      firstListed = page.blocks[0]?.index;
      if (firstListed !== undefined) break;
    }
    const to = firstListed ?? Math.ceil(this.sizeBytes / EBS_BLOCK_SIZE);
    if (to > index) {
      this.gaps.push({ from: index, to });
      if (this.gaps.length > MAX_GAPS) this.gaps.shift();
    }
    return token;
  }

  /**
   * Caches a token. Listings fill the cache up to its size and then stop (the engine reads from the
   * lowest offsets, which were listed first); re-lists during reads evict the oldest entries.
   */
  private remember(index: number, token: string | null, evict: boolean): void {
    if (this.tokens.has(index)) this.tokens.delete(index);
    else if (this.tokens.size >= this.tokenCacheSize) {
      if (!evict) return;
      this.tokens.delete(this.tokens.keys().next().value!);
    }
    this.tokens.set(index, token);
  }
}
