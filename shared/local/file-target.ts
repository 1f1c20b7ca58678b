// A raw disk image on the local filesystem as a replication target, with staged increments and a
// per-region manifest so a checkpoint's image can be re-verified without its source.
import { createHash } from 'node:crypto';
import { writeSync } from 'node:fs';
import { type FileHandle, link, open, readFile, rename, rm, stat } from 'node:fs/promises';
import { dirname } from 'node:path';
import { z } from 'zod';
import type { Descriptor } from '../engine/descriptors.ts';
import { FerryError, IntegrityError, TransferError } from '../engine/errors.ts';
import type { Extent } from '../engine/extents.ts';
import { sha256Hex } from '../engine/integrity.ts';
import type { CopyKind, DiskCommit, DiskTarget, PublishedCheckpoint, ResumeClaim } from '../engine/ports.ts';
import { MiB } from '../engine/units.ts';
import { syncDir, writeAtomic } from './durable.ts';
import { recordHistory } from './history.ts';

// 4 KiB: the filesystem and page-cache unit; change maps are aligned to it, so a 512-byte CBT
// extent costs one page, not more.
export const FILE_TARGET_BLOCK_SIZE = 4096;
// 1 MiB manifest regions: 32 bytes of digest per MiB (32 MiB of manifest per TiB of disk), and a
// mismatch found by `ferry verify` is located to within a MiB.
export const MANIFEST_REGION = MiB;

export interface FileTargetOptions {
  /** Read every chunk back after writing and compare its hash (default true). */
  readonly verifyWrites?: boolean;
  /**
   * Keep each published cycle's undo data as history (see history.ts), so older checkpoints can be
   * materialised; whoever keeps it prunes it (default false: the undo data is dropped).
   */
  readonly keepHistory?: boolean;
}

/**
 * Write modes. `direct`: a full copy into an image that holds no checkpoint yet. `staged`: the
 * image holds the last checkpoint, so chunks go to a sparse staging file and `commit` applies them.
 *
 * Files beside the image `PATH`, and what each guarantees:
 *   PATH.ferry-cycle.json     the cycle whose writes the cycle file (staging, or the image when
 *                             direct) holds: written at open, checked before a resume
 *   PATH.ferry-staging        this cycle's chunks at their disk offsets (sparse)
 *   PATH.ferry-undo           an increment's undo log: the image's bytes under every extent the
 *                             commit overwrites, durable (renamed into place) before the first write
 *   PATH.ferry-undo-image     a re-seeding full copy's undo: the previous image, kept as a link while
 *                             the staging file is renamed over PATH
 *   PATH.ferry-manifest       per-MiB digests of the image of the last published checkpoint
 *   PATH.ferry-manifest.next  the same for the committed cycle, installed once it is published
 *   PATH.ferry-history/       with `keepHistory`: published cycles' undo data (history.ts)
 * Until publication `rollback` restores the previous image and manifest from these and keeps the
 * staging file, so a rerun resumes; `afterPublish` installs the manifest and removes the rest,
 * with `keepHistory` after keeping the undo data (for a re-seed, the previous image's bytes in the
 * regions the manifests say changed) and the previous manifest in the history.
 */
type Mode = 'direct' | 'staged';

const cycleRecordSchema = z.strictObject({
  cycleId: z.string(),
  mode: z.enum(['direct', 'staged']),
  kind: z.enum(['full', 'incremental']),
  size: z.number().int().nonnegative(),
});
type CycleRecord = z.infer<typeof cycleRecordSchema>;

export class FileTarget implements DiskTarget {
  readonly name: string;
  readonly blockSize = FILE_TARGET_BLOCK_SIZE;
  private readonly stagingPath: string;
  private readonly manifestPath: string;
  private readonly nextManifestPath: string;
  private readonly cyclePath: string;
  private readonly undoPath: string;
  private readonly undoImagePath: string;
  private readonly verifyWrites: boolean;
  private readonly keepHistory: boolean;
  private fh: FileHandle | undefined;
  private mode: Mode = 'direct';
  private kind: CopyKind = 'full';
  private size = 0;
  /**
   * Manifest digests of the regions a full copy's chunks touched, computed from the read-back as
   * they were written (the link is the bottleneck then, not the CPU), so commit need not read them
   * again. A region's digest assumes its bytes outside the noting chunk's span are zeros (a fresh
   * sparse image); commit uses it only if the cycle changed nothing in that region outside the span,
   * and otherwise (a region shared by two chunks, or written before a resume) reads and hashes it.
   */
  private readonly regionDigests = new Map<number, RegionDigest>();

  constructor(
    readonly path: string,
    opts: FileTargetOptions = {},
  ) {
    this.name = `file:${path}`;
    this.stagingPath = `${path}.ferry-staging`;
    this.manifestPath = `${path}.ferry-manifest`;
    this.nextManifestPath = `${path}.ferry-manifest.next`;
    this.cyclePath = `${path}.ferry-cycle.json`;
    this.undoPath = `${path}.ferry-undo`;
    this.undoImagePath = `${path}.ferry-undo-image`;
    this.verifyWrites = opts.verifyWrites ?? true;
    this.keepHistory = opts.keepHistory ?? false;
  }

  async open(sizeBytes: number, kind: CopyKind, resume: boolean, cycleId = 'unnamed'): Promise<void> {
    this.size = sizeBytes;
    this.kind = kind;
    this.regionDigests.clear();
    if (resume) {
      // The engine resumes only after checkResume proved the cycle file holds the trusted chunks.
      const record = await this.readCycleRecord();
      if (record?.cycleId !== cycleId) {
        throw new FerryError(`${this.name}: no record of cycle ${cycleId} to resume (${this.cyclePath})`);
      }
      this.mode = record.mode;
      this.fh = await open(this.cycleFile(), 'r+');
      return;
    }
    const imageSize = await sizeOf(this.path);
    if (kind === 'incremental' && imageSize !== sizeBytes) {
      throw new FerryError(
        imageSize === undefined
          ? `${this.name}: an incremental cycle needs the previous checkpoint's image, and there is none (run a full copy first)`
          : `${this.name}: image is ${imageSize} bytes but the source disk is ${sizeBytes}; run a full copy to re-seed`,
      );
    }
    this.mode = kind === 'full' && imageSize === undefined ? 'direct' : 'staged';
    // A fresh cycle: whatever an abandoned attempt left is discarded (its record first, so a crash
    // here can never pair the old record with the new file).
    // (Undo data is never left behind by a commit: the engine's recovery finishes or rolls back an
    // interrupted one before a new cycle opens its targets.)
    for (const p of [this.cyclePath, this.undoPath, this.undoImagePath, this.nextManifestPath]) {
      await rm(p, { force: true });
    }
    this.fh = await createSparse(this.cycleFile(), sizeBytes);
    await this.fh.sync();
    await writeAtomic(this.cyclePath, JSON.stringify({ cycleId, mode: this.mode, kind, size: sizeBytes }));
  }

  async checkResume(claim: ResumeClaim): Promise<string | undefined> {
    const record = await this.readCycleRecord().catch((err) => err as Error);
    if (record instanceof Error) return `${this.cyclePath} is unreadable (${record.message})`;
    if (record === undefined)
      return `${this.cyclePath} is missing: no record of which cycle the target holds`;
    if (record.cycleId !== claim.cycleId) {
      return `the target holds cycle ${record.cycleId}, not ${claim.cycleId}`;
    }
    const file = record.mode === 'staged' ? this.stagingPath : this.path;
    const size = await sizeOf(file);
    if (size !== record.size) {
      return size === undefined ? `${file} is missing` : `${file} is ${size} bytes, not ${record.size}`;
    }
    // Hash every chunk the resume would skip: reading them back here costs local disk time only,
    // and it is the one proof that they survived (a damaged or replaced file hashes differently).
    const fh = await open(file, 'r');
    try {
      for (const { descriptor: d, sha256 } of claim.chunks) {
        const span = await readAt(fh, d.offset, d.length, this.name).catch(() => undefined);
        if (span === undefined || extentsDigest(span, d) !== sha256) {
          return `chunk ${d.seq} at offset ${d.offset} in ${file} does not match its recorded digest`;
        }
      }
    } finally {
      await fh.close();
    }
    return undefined;
  }

  async flush(): Promise<void> {
    await this.fh?.datasync();
  }

  async writeChunk(d: Descriptor, data: Uint8Array, sha256: string): Promise<void> {
    const fh = this.handle();
    // With read-back on, the hash of what is on disk proves transport and storage at once; hashing
    // the incoming buffer as well would only spend CPU on the same proof.
    if (data.length !== d.bytes || (!this.verifyWrites && sha256Hex(data) !== sha256)) {
      throw new IntegrityError(
        `${this.name}: chunk ${d.seq} at offset ${d.offset} arrived corrupted (checksum mismatch)`,
        {
          offset: d.offset,
          seq: d.seq,
        },
      );
    }
    let at = 0;
    for (const e of d.extents) {
      const part = data.subarray(at, at + e.length);
      at += e.length;
      // A fresh full copy reads zeros in holes already; writing them would only un-sparse the image.
      if (this.kind === 'full' && isZero(part)) continue;
      // A fragmented chunk is dozens of small extents: each would cost a thread-pool round trip as
      // an asynchronous write, while a synchronous one into the page cache takes microseconds.
      if (part.length <= SYNC_WRITE_MAX) writeAllSync(fh, part, e.offset);
      else await writeAll(fh, part, e.offset);
    }
    if (this.verifyWrites) {
      const span = await readAt(fh, d.offset, d.length, this.name);
      if (extentsDigest(span, d) !== sha256) {
        throw new IntegrityError(
          `${this.name}: chunk ${d.seq} at offset ${d.offset} does not match its source checksum after writing`,
          {
            offset: d.offset,
            seq: d.seq,
          },
        );
      }
      // A full copy's image is this cycle's writes on a fresh sparse file (the staged one is applied
      // to a fresh file too): a region inside this chunk's span holds exactly what was read back.
      if (this.kind === 'full') this.noteRegions(d, span);
    }
  }

  private noteRegions(d: Descriptor, span: Uint8Array): void {
    const end = d.offset + d.length;
    for (let r = Math.floor(d.offset / MANIFEST_REGION); r * MANIFEST_REGION < end; r++) {
      const from = r * MANIFEST_REGION;
      const to = Math.min(from + MANIFEST_REGION, this.size);
      const lo = Math.max(from, d.offset);
      const hi = Math.min(to, end);
      const digest = createHash('sha256')
        .update(zeros(lo - from))
        .update(span.subarray(lo - d.offset, hi - d.offset))
        .update(zeros(to - hi))
        .digest();
      this.regionDigests.set(r, { digest, lo: d.offset, hi: end });
    }
  }

  async read(offset: number, length: number): Promise<Uint8Array> {
    const fh = await open(this.path, 'r');
    try {
      return await readAt(fh, offset, length, this.name);
    } finally {
      await fh.close();
    }
  }

  async commit(summary: DiskCommit): Promise<string> {
    const fh = this.handle();
    await fh.sync();
    if (this.mode === 'staged' && this.kind === 'full') await this.swapInStaging();
    else if (this.mode === 'staged') {
      await this.writeUndo(summary.extents);
      await this.apply(summary.extents);
    }
    const ref = await updateManifest(
      this.path,
      this.manifestPath,
      this.nextManifestPath,
      this.size,
      summary.extents,
      this.kind === 'full' ? this.regionDigests : undefined,
    );
    return ref;
  }

  /**
   * Puts the image of the last published checkpoint back, from the undo data `commit` kept, and
   * keeps the staging file so the cycle can resume. Works on a fresh instance (crash recovery),
   * is idempotent, and each step is either done or redone by calling it again.
   */
  async rollback(): Promise<void> {
    await this.close();
    if ((await sizeOf(this.undoImagePath)) !== undefined) {
      // Re-seed: the new image goes back to being the staging file, the old one back to PATH. If the
      // swap never happened, PATH and the undo link are one file and rename() leaves both in place.
      if ((await sizeOf(this.stagingPath)) === undefined) await rename(this.path, this.stagingPath);
      await rename(this.undoImagePath, this.path);
      await rm(this.undoImagePath, { force: true });
    } else if ((await sizeOf(this.undoPath)) !== undefined) {
      await applyUndoLog(this.undoPath, this.path, this.name);
      await rm(this.undoPath, { force: true });
    }
    await rm(`${this.undoPath}.tmp`, { force: true });
    await rm(this.nextManifestPath, { force: true });
    await syncDir(dirname(this.path));
  }

  async afterPublish(published?: PublishedCheckpoint): Promise<void> {
    await this.close();
    await this.installCommitted(published);
    for (const p of [this.stagingPath, this.cyclePath]) await rm(p, { force: true });
  }

  /** The committed cycle becomes the image's truth: its manifest goes in, the undo data goes. */
  private async installCommitted(published: PublishedCheckpoint | undefined): Promise<void> {
    // The manifest first: until it is installed, the undo data stays for a rollback.
    if ((await sizeOf(this.nextManifestPath)) !== undefined) {
      // While the previous manifest is still in place: a rerun after a crash records it again.
      if (this.keepHistory && published !== undefined) await this.keepAsHistory(published);
      await rename(this.nextManifestPath, this.manifestPath);
      await syncDir(dirname(this.path));
    }
    for (const p of [this.undoPath, this.undoImagePath]) await rm(p, { force: true });
  }

  /**
   * Keeps the published cycle's undo data and the previous checkpoint's manifest in the history as
   * the cycle's entry: an increment's undo log is linked; a re-seed's is written from the previous
   * image, holding only the regions whose digests the two manifests disagree on (a full copy that
   * changed little keeps little). Nothing is kept for a direct copy (it overwrote nothing), for undo
   * data of another cycle than the one published, or without a previous manifest to verify against.
   */
  private async keepAsHistory(published: PublishedCheckpoint): Promise<void> {
    const record = await this.readCycleRecord().catch(() => undefined);
    if (record?.cycleId !== published.id || record.mode !== 'staged') return;
    if ((await sizeOf(this.manifestPath)) === undefined) return;
    const previous = await readManifest(this.manifestPath);
    const kept = { manifest: this.manifestPath, manifestRef: manifestDigest(previous) };
    const previousSize = await sizeOf(this.undoImagePath);
    if (previousSize !== undefined) {
      const changed = changedRegions(
        previous,
        previousSize,
        await readManifest(this.nextManifestPath),
        (await stat(this.path)).size,
      );
      await recordHistory(this.path, published, {
        ...kept,
        size: previousSize,
        undo: (out) => writeUndoLog(this.undoImagePath, changed, out, this.name),
      });
    } else if ((await sizeOf(this.undoPath)) !== undefined) {
      // An increment does not resize the image: its previous size is the image's.
      await recordHistory(this.path, published, {
        ...kept,
        size: (await stat(this.path)).size,
        undo: this.undoPath,
      });
    }
  }

  async close(): Promise<void> {
    await this.fh?.close();
    this.fh = undefined;
  }

  /** Copies the staged extents into the image. Idempotent: staging stays until publication. */
  private async apply(extents: readonly Extent[]): Promise<void> {
    const staging = this.handle();
    const image = await open(this.path, 'r+');
    try {
      for (const e of extents) {
        for (let off = e.offset; off < e.offset + e.length; off += MANIFEST_REGION) {
          const len = Math.min(MANIFEST_REGION, e.offset + e.length - off);
          await writeAll(image, await readAt(staging, off, len, this.name), off);
        }
      }
      await image.sync();
    } finally {
      await image.close();
    }
  }

  /**
   * Saves the image's bytes under every extent the increment will overwrite, in one file that is
   * renamed into place only when complete and durable: if it exists, it is whole, and if it does
   * not, the image has not been touched.
   */
  private async writeUndo(extents: readonly Extent[]): Promise<void> {
    const tmp = `${this.undoPath}.tmp`;
    await writeUndoLog(this.path, extents, tmp, this.name);
    await rename(tmp, this.undoPath);
    await syncDir(dirname(this.path));
  }

  /**
   * A re-seeding full copy: the staging file is the whole new image, so it replaces the old one by
   * rename; the old one stays linked as the undo image until publication.
   */
  private async swapInStaging(): Promise<void> {
    if ((await sizeOf(this.undoImagePath)) === undefined) {
      await link(this.path, this.undoImagePath);
      await syncDir(dirname(this.path));
    }
    await rename(this.stagingPath, this.path);
    await syncDir(dirname(this.path));
  }

  private cycleFile(): string {
    return this.mode === 'staged' ? this.stagingPath : this.path;
  }

  private async readCycleRecord(): Promise<CycleRecord | undefined> {
    let text: string;
    try {
      text = await readFile(this.cyclePath, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw err;
    }
    return cycleRecordSchema.parse(JSON.parse(text));
  }

  private handle(): FileHandle {
    if (!this.fh) throw new FerryError(`${this.name}: target used before open()`);
    return this.fh;
  }
}

/** Result of re-hashing an image against its manifest. */
export interface VerifyReport {
  readonly ok: boolean;
  readonly regions: number;
  /** Offsets of the first mismatching regions (at most 10). */
  readonly mismatches: number[];
  readonly manifestRef: string;
}

/** Re-hashes an image region by region and compares it with its manifest and the checkpoint's reference. */
export async function verifyFileImage(path: string, expectedRef: string | undefined): Promise<VerifyReport> {
  const manifest = await readManifest(`${path}.ferry-manifest`);
  const manifestRef = manifestDigest(manifest);
  const { regions, mismatches } = await compareWithManifest(path, manifest);
  const refOk = expectedRef === undefined || expectedRef === manifestRef;
  return { ok: refOk && mismatches.length === 0, regions, mismatches, manifestRef };
}

/**
 * Hashes a file region by region (MANIFEST_REGION, the last one short) and compares each digest
 * with `manifest`. Returns the region count and the offsets of the first mismatching regions (at
 * most 10; offset 0 also when the manifest has another number of regions). `onBytes` is told each
 * region's length as it is hashed.
 */
export async function compareWithManifest(
  path: string,
  manifest: Uint8Array,
  onBytes?: (bytes: number) => void,
): Promise<{ regions: number; mismatches: number[] }> {
  const fh = await open(path, 'r');
  try {
    const size = (await fh.stat()).size;
    const regions = Math.ceil(size / MANIFEST_REGION);
    const mismatches: number[] = [];
    if (manifest.length !== regions * 32) mismatches.push(0);
    for (let i = 0; i < regions && mismatches.length < 10; i++) {
      const off = i * MANIFEST_REGION;
      const length = Math.min(MANIFEST_REGION, size - off);
      const digest = createHash('sha256')
        .update(await readAt(fh, off, length, `file:${path}`))
        .digest();
      if (!digest.equals(manifest.subarray(i * 32, i * 32 + 32))) mismatches.push(off);
      onBytes?.(length);
    }
    return { regions, mismatches };
  } finally {
    await fh.close();
  }
}

/**
 * Rewrites the image's manifest and returns the reference recorded in the checkpoint. An increment
 * (`full` undefined) re-hashes only the regions its extents touched. A full copy (`full`: the digests
 * its chunks already gave) describes every region: those the copy never touched are zeros (it wrote
 * a fresh sparse image), those in `full` whose changes all lie in the noting chunk's span are known,
 * and only the rest are read and hashed.
 */
async function updateManifest(
  imagePath: string,
  manifestPath: string,
  outPath: string,
  size: number,
  touched: readonly Extent[],
  full: ReadonlyMap<number, RegionDigest> | undefined,
): Promise<string> {
  const regions = Math.ceil(size / MANIFEST_REGION);
  let manifest: Buffer | undefined =
    full === undefined ? await readManifest(manifestPath).catch(() => undefined) : undefined;
  let indices: Iterable<TouchedRegion> = touchedRegions(touched);
  if (manifest === undefined || manifest.length !== regions * 32) {
    manifest = Buffer.alloc(regions * 32);
    if (full === undefined) indices = range(regions);
    else {
      const zero = zeroRegionDigest(MANIFEST_REGION);
      for (let i = 0; i < regions; i++) {
        const length = Math.min(MANIFEST_REGION, size - i * MANIFEST_REGION);
        (length === MANIFEST_REGION ? zero : zeroRegionDigest(length)).copy(manifest, i * 32);
      }
    }
  }
  const fh = await open(imagePath, 'r');
  try {
    for (const { index: i, lo, hi } of indices) {
      const known = full?.get(i);
      if (known !== undefined && known.lo <= lo && hi <= known.hi) {
        known.digest.copy(manifest, i * 32);
        continue;
      }
      const off = i * MANIFEST_REGION;
      const data = await readAt(fh, off, Math.min(MANIFEST_REGION, size - off), `file:${imagePath}`);
      createHash('sha256')
        .update(data)
        .digest()
        .copy(manifest, i * 32);
    }
  } finally {
    await fh.close();
  }
  await writeAtomic(outPath, manifest);
  return manifestDigest(manifest);
}

/** The reference a checkpoint records for a manifest (`targetRef`): a digest of its digests. */
export const manifestDigest = (manifest: Uint8Array): string => `manifest-sha256:${sha256Hex(manifest)}`;

export async function readManifest(path: string): Promise<Buffer> {
  const fh = await open(path, 'r');
  try {
    const size = (await fh.stat()).size;
    return Buffer.from(await readAt(fh, 0, size, `file:${path}`));
  } finally {
    await fh.close();
  }
}

/** A manifest region and the span of the cycle's changes inside it. */
interface TouchedRegion {
  readonly index: number;
  readonly lo: number;
  hi: number;
}

/** A region's digest noted from one chunk, whose span [lo, hi) it trusts to hold all the changes. */
interface RegionDigest {
  readonly digest: Buffer;
  readonly lo: number;
  readonly hi: number;
}

/** The regions that sorted, disjoint extents touch, in order, each with the span of its changes. */
function* touchedRegions(extents: readonly Extent[]): Generator<TouchedRegion> {
  let current: TouchedRegion | undefined;
  for (const e of extents) {
    const end = e.offset + e.length;
    const last = Math.floor((end - 1) / MANIFEST_REGION);
    for (let i = Math.floor(e.offset / MANIFEST_REGION); i <= last; i++) {
      const lo = Math.max(e.offset, i * MANIFEST_REGION);
      const hi = Math.min(end, (i + 1) * MANIFEST_REGION);
      if (current?.index === i) {
        current.hi = hi;
        continue;
      }
      if (current !== undefined) yield current;
      current = { index: i, lo, hi };
    }
  }
  if (current !== undefined) yield current;
}

/** Every region, each as wholly changed: none is trusted from a chunk. */
function* range(n: number): Generator<TouchedRegion> {
  for (let i = 0; i < n; i++) yield { index: i, lo: i * MANIFEST_REGION, hi: (i + 1) * MANIFEST_REGION };
}

/**
 * Writes to `out` (created or truncated, then synced) an undo log of `imagePath`: its bytes under
 * `extents` (sorted, disjoint). Layout: the extent count (u64 LE), then offset and length (u64 LE
 * each) per extent, then the saved bytes of every extent in order; `applyUndoLog` reads it.
 */
export async function writeUndoLog(
  imagePath: string,
  extents: readonly Extent[],
  out: string,
  name: string,
): Promise<void> {
  const index = Buffer.alloc(8 + extents.length * 16);
  index.writeBigUInt64LE(BigInt(extents.length), 0);
  extents.forEach((e, i) => {
    index.writeBigUInt64LE(BigInt(e.offset), 8 + i * 16);
    index.writeBigUInt64LE(BigInt(e.length), 16 + i * 16);
  });
  const fh = await open(out, 'w');
  const image = await open(imagePath, 'r');
  try {
    await writeAll(fh, index, 0);
    let at = index.length;
    for (const e of extents) {
      for (let off = e.offset; off < e.offset + e.length; off += MANIFEST_REGION) {
        const len = Math.min(MANIFEST_REGION, e.offset + e.length - off);
        await writeAll(fh, await readAt(image, off, len, name), at);
        at += len;
      }
    }
    await fh.sync();
  } finally {
    await image.close();
    await fh.close();
  }
}

/**
 * What a re-seed changed of the previous image, as the extents of the previous image to keep so
 * that, truncated or extended to `previousSize` and with those bytes written back, the new image
 * is the previous one again: every region whose digest differs in the two manifests (a region cut
 * short by a resize differs too: its length is in its digest), and every region beyond the new
 * size that is not all zeros (extending leaves zeros). Adjacent regions are merged. A manifest
 * whose length does not fit its image's size is not trusted: then the whole previous image is kept.
 */
export function changedRegions(
  previous: Uint8Array,
  previousSize: number,
  next: Uint8Array,
  nextSize: number,
): Extent[] {
  const regions = Math.ceil(previousSize / MANIFEST_REGION);
  const nextRegions = Math.ceil(nextSize / MANIFEST_REGION);
  if (previous.length !== regions * 32 || next.length !== nextRegions * 32) {
    return previousSize === 0 ? [] : [{ offset: 0, length: previousSize }];
  }
  const extents: Extent[] = [];
  for (let i = 0; i < regions; i++) {
    const offset = i * MANIFEST_REGION;
    const length = Math.min(MANIFEST_REGION, previousSize - offset);
    const digest = Buffer.from(previous.buffer, previous.byteOffset + i * 32, 32);
    const same =
      i < nextRegions
        ? digest.equals(next.subarray(i * 32, i * 32 + 32))
        : digest.equals(zeroRegionDigest(length));
    if (same) continue;
    const last = extents.at(-1);
    if (last !== undefined && last.offset + last.length === offset) {
      extents[extents.length - 1] = { offset: last.offset, length: last.length + length };
    } else extents.push({ offset, length });
  }
  return extents;
}

/**
 * Writes an undo log's saved bytes back over the image at their offsets, and syncs it (see
 * FileTarget.writeUndo for the layout). `onBytes` is told each piece's length as it is written.
 */
export async function applyUndoLog(
  undoPath: string,
  imagePath: string,
  name: string,
  onBytes?: (bytes: number) => void,
): Promise<void> {
  const undo = await open(undoPath, 'r');
  const image = await open(imagePath, 'r+');
  try {
    const count = Number(Buffer.from(await readAt(undo, 0, 8, name)).readBigUInt64LE(0));
    const index = Buffer.from(await readAt(undo, 8, count * 16, name));
    let at = 8 + count * 16;
    for (let i = 0; i < count; i++) {
      const offset = Number(index.readBigUInt64LE(i * 16));
      const length = Number(index.readBigUInt64LE(i * 16 + 8));
      for (let off = offset; off < offset + length; off += MANIFEST_REGION) {
        const len = Math.min(MANIFEST_REGION, offset + length - off);
        await writeAll(image, await readAt(undo, at, len, name), off);
        at += len;
        onBytes?.(len);
      }
    }
    await image.sync();
  } finally {
    await image.close();
    await undo.close();
  }
}

async function sizeOf(path: string): Promise<number | undefined> {
  try {
    return (await stat(path)).size;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw err;
  }
}

async function createSparse(path: string, size: number): Promise<FileHandle> {
  const fh = await open(path, 'w+');
  await fh.truncate(size);
  return fh;
}

export async function writeAll(fh: FileHandle, data: Uint8Array, offset: number): Promise<void> {
  let done = 0;
  while (done < data.length) {
    const { bytesWritten } = await fh.write(data, done, data.length - done, offset + done);
    done += bytesWritten;
  }
}

export async function readAt(
  fh: FileHandle,
  offset: number,
  length: number,
  name: string,
): Promise<Uint8Array> {
  const buf = Buffer.allocUnsafe(length); // filled completely or rejected
  let done = 0;
  while (done < length) {
    const { bytesRead } = await fh.read(buf, done, length - done, offset + done);
    if (bytesRead === 0) {
      throw new TransferError(`${name}: short read at offset ${offset + done}`, {
        offset: offset + done,
        retryable: false,
      });
    }
    done += bytesRead;
  }
  return buf;
}

/**
 * SHA-256 of the descriptor's extents within `span`, the bytes of its whole span (at most a chunk)
 * read back in one read rather than one per extent, so a fragmented chunk costs one system call.
 */
function extentsDigest(span: Uint8Array, d: Descriptor): string {
  const hash = createHash('sha256');
  for (const e of d.extents) hash.update(span.subarray(e.offset - d.offset, e.offset - d.offset + e.length));
  return hash.digest('hex');
}

const ZERO_REGION = Buffer.alloc(MANIFEST_REGION);
/** `length` zero bytes, at most a region's worth, without allocating. */
const zeros = (length: number): Uint8Array => ZERO_REGION.subarray(0, length);

const zeroDigests = new Map<number, Buffer>();
/** The digest of `length` zero bytes (a region no chunk touched), computed once per length. */
function zeroRegionDigest(length: number): Buffer {
  let digest = zeroDigests.get(length);
  if (digest === undefined) {
    digest = createHash('sha256').update(Buffer.alloc(length)).digest();
    zeroDigests.set(length, digest);
  }
  return digest;
}

// Extents up to this size are written synchronously (see writeChunk).
const SYNC_WRITE_MAX = 64 * 1024;

function writeAllSync(fh: FileHandle, data: Uint8Array, offset: number): void {
  let done = 0;
  while (done < data.length) done += writeSync(fh.fd, data, done, data.length - done, offset + done);
}

function isZero(data: Uint8Array): boolean {
  // Compare 8 bytes at a time where alignment allows; chunks are large and mostly non-zero.
  const words = data.byteOffset % 8 === 0 ? Math.floor(data.length / 8) : 0;
  const view = new BigUint64Array(data.buffer, data.byteOffset, words);
  for (let i = 0; i < words; i++) if (view[i] !== 0n) return false;
  for (let i = words * 8; i < data.length; i++) if (data[i] !== 0) return false;
  return true;
}
