// Point-in-time recovery of a file-image disk: its image as of a kept checkpoint, written to a new
// file from the current image and the history (history.ts), and verified against that
// checkpoint's manifest before it is handed over.
import { type FileHandle, open, rm, stat, truncate } from 'node:fs/promises';
import { dirname } from 'node:path';
import { errorMessage, FerryError } from '../engine/errors.ts';
import type { CheckpointDisk, RecoveryCheckpoint } from '../engine/ports.ts';
import { KiB, MiB } from '../engine/units.ts';
import { syncDir } from './durable.ts';
import {
  applyUndoLog,
  compareWithManifest,
  manifestDigest,
  readAt,
  readManifest,
  writeAll,
} from './file-target.ts';
import { type HistoryEntry, historyDir, readHistory } from './history.ts';

// 64 KiB: the run of zeros a copy leaves as a hole. Small enough that a thin disk's free space
// stays unallocated, large enough that scanning costs nothing next to reading the data.
const SPARSE_RUN = 64 * KiB;
// 1 MiB read at a time: bounds the memory a recovery uses, whatever the disk's size.
const COPY_BUFFER = MiB;

/** A checkpoint cannot be materialised (any more), or what was materialised does not verify. */
export class RecoveryError extends FerryError {
  readonly checkpoint: string;
  /** Why, in a phrase that names the disk but not the checkpoint (for a listing of checkpoints). */
  readonly reason: string;

  constructor(
    message: string,
    ctx: { disk: string; checkpoint: string; reason?: string; offset?: number; cause?: unknown },
  ) {
    super(message, ctx);
    this.name = 'RecoveryError';
    this.checkpoint = ctx.checkpoint;
    this.reason = ctx.reason ?? message;
  }
}

/** How one disk of a checkpoint is rebuilt: what is copied, what is applied, what it is checked against. */
export interface DiskRecoveryPlan {
  readonly disk: string;
  readonly checkpoint: RecoveryCheckpoint;
  /** The replica's image. */
  readonly image: string;
  /** The disk's size at the checkpoint. */
  readonly size: number;
  /** The checkpoint's manifest (per-MiB digests), whose reference is the catalog's `targetRef`. */
  readonly manifest: string;
  /** The file copied first: the current image, or the image a later re-seed replaced. */
  readonly base: string;
  /** The base's size (a re-seed may have resized the disk since the checkpoint). */
  readonly baseSize: number;
  /**
   * History entries applied over the copy, newest first (each restores the checkpoint before it:
   * the copy cut or extended to the entry's size, then its undo log written over it).
   */
  readonly undo: readonly HistoryEntry[];
  /** Bytes of work (copy, apply, verify), for progress. */
  readonly bytes: number;
}

/**
 * Works out how disk `disk` of `checkpoint` is rebuilt, or refuses with the reason it cannot be:
 * a target that is not a local file, a later checkpoint whose history for the disk is gone
 * (pruned) or unreadable, or a kept manifest that does not match the catalog. `catalog` is every
 * readable checkpoint of the set; `damaged` the sequences of entries that cannot be read. Reads
 * history metadata and (unless `readManifest` is false, for a listing) the checkpoint's manifest,
 * never the disk's data.
 */
export async function planDiskRecovery(
  catalog: readonly RecoveryCheckpoint[],
  damaged: readonly number[],
  checkpoint: RecoveryCheckpoint,
  disk: CheckpointDisk,
  opts: { readonly readManifest?: boolean } = { readManifest: true },
): Promise<DiskRecoveryPlan> {
  const refuse = (why: string, reason = `disk ${disk.disk}: ${why}`) =>
    new RecoveryError(`checkpoint ${checkpoint.id}, disk ${disk.disk}: ${why}`, {
      disk: disk.disk,
      checkpoint: checkpoint.id,
      reason,
    });
  if (!disk.target.startsWith('file:')) {
    throw refuse(`its target ${disk.target} is not a local file image (recovery reads file: targets only)`);
  }
  if (disk.targetRef === undefined) throw refuse('the catalog records no manifest to verify it against');
  const image = disk.target.slice('file:'.length);
  const later = catalog
    .filter((c) => c.sequence > checkpoint.sequence && c.disks.some((d) => d.target === disk.target))
    .sort((a, b) => a.sequence - b.sequence);
  const unreadable = damaged.find((s) => s > checkpoint.sequence);
  if (unreadable !== undefined) {
    throw refuse(
      `the catalog entry of checkpoint #${unreadable} is damaged, so whether it changed this disk is unknown`,
    );
  }
  const history = await readHistory(image);
  const chain: HistoryEntry[] = [];
  for (const next of later) {
    const entry = history.entries.get(next.sequence);
    if (entry === undefined) {
      const why = history.damaged.get(next.sequence) ?? 'pruned by the retention setting, or never kept';
      throw refuse(
        `not recoverable any more: no history of ${next.id} in ${historyDir(image)} (${why})`,
        `disk ${disk.disk} has no history of ${next.id} (${why})`,
      );
    }
    if (entry.cycleId !== next.id) {
      throw refuse(`the history entry ${entry.dir} belongs to ${entry.cycleId}, not ${next.id}`);
    }
    chain.push(entry);
  }
  // The entry of the cycle right after the checkpoint holds its manifest and size.
  const first = chain[0];
  const manifest = first?.manifest ?? `${image}.ferry-manifest`;
  const size = first?.size ?? (await sizeOf(image, refuse));
  if (size !== disk.sizeBytes) {
    throw refuse(`the history records a ${size}-byte image, the catalog a ${disk.sizeBytes}-byte disk`);
  }
  // A listing trusts the reference the history recorded (a manifest is 32 MiB per TiB of disk); a
  // recovery hashes the manifest it will verify against.
  let ref: string | undefined = opts.readManifest === false ? first?.manifestRef : undefined;
  try {
    ref ??= manifestDigest(await readManifest(manifest));
  } catch (err) {
    throw refuse(`its manifest ${manifest} cannot be read (${errorMessage(err)})`);
  }
  if (ref !== disk.targetRef) {
    throw refuse(
      `the manifest ${manifest} does not match the catalog (${ref}, recorded ${disk.targetRef}): ` +
        (first === undefined ? 'the image has changed since' : 'the history was altered'),
    );
  }
  // An entry written before re-seeds kept undo logs holds the whole image the re-seed replaced: the
  // oldest one after the checkpoint is the copy's base, and only the entries before it are undone.
  const reseed = chain.findIndex((e) => e.kind === 'image');
  const base = reseed >= 0 ? chain[reseed]!.data : image;
  const baseSize = await sizeOf(base, refuse);
  const undo = (reseed >= 0 ? chain.slice(0, reseed) : chain).reverse();
  let bytes = baseSize + size;
  for (const e of undo) bytes += await sizeOf(e.data, refuse);
  return { disk: disk.disk, checkpoint, image, size, manifest, base, baseSize, undo, bytes };
}

export interface MaterialiseProgress {
  readonly disk: string;
  readonly phase: 'copy' | 'apply' | 'verify';
  readonly bytesDone: number;
  readonly bytesTotal: number;
}

/**
 * Writes the planned disk to `out`, a new file (an existing one is refused, never replaced): the
 * base copied sparse (all-zero 64 KiB runs left as holes), the history applied newest first, then
 * every region hashed against the checkpoint's manifest. On a mismatch or any failure the file is
 * removed and a RecoveryError names the disk, the checkpoint and the first offset that differs.
 * Returns the number of regions verified.
 */
export async function materialiseDisk(
  plan: DiskRecoveryPlan,
  out: string,
  opts: { onProgress?: (p: MaterialiseProgress) => void; signal?: AbortSignal } = {},
): Promise<{ regions: number }> {
  const { disk, checkpoint } = plan;
  let done = 0;
  const progress = (phase: MaterialiseProgress['phase']) => (bytes: number) => {
    opts.signal?.throwIfAborted();
    done += bytes;
    opts.onProgress?.({ disk, phase, bytesDone: done, bytesTotal: plan.bytes });
  };
  const fh = await open(out, 'wx');
  let created = true;
  try {
    try {
      await copySparse(plan.base, fh, plan.baseSize, progress('copy'));
      await fh.sync();
    } finally {
      await fh.close();
    }
    for (const entry of plan.undo) {
      // A re-seed may have resized the disk: the entry's log restores the regions it changed of an
      // image of the entry's size, and cutting or extending (with zeros) to it comes first.
      await truncate(out, entry.size);
      await applyUndoLog(entry.data, out, `history ${entry.dir}`, progress('apply'));
    }
    const { regions, mismatches } = await compareWithManifest(
      out,
      await readManifest(plan.manifest),
      progress('verify'),
    );
    const size = (await stat(out)).size;
    if (mismatches.length > 0 || size !== plan.size) {
      const at = mismatches[0] ?? 0;
      throw new RecoveryError(
        `checkpoint ${checkpoint.id}, disk ${disk}: the materialised image does not match the checkpoint's ` +
          `manifest at offset ${at}${mismatches.length > 1 ? ` (and ${mismatches.length - 1} more regions)` : ''}: ` +
          'the history or the image was altered; nothing was kept',
        { disk, checkpoint: checkpoint.id, offset: at },
      );
    }
    await syncDir(dirname(out));
    created = false;
    return { regions };
  } catch (err) {
    if (err instanceof RecoveryError || opts.signal?.aborted) throw err;
    throw new RecoveryError(`checkpoint ${checkpoint.id}, disk ${disk}: ${errorMessage(err)}`, {
      disk,
      checkpoint: checkpoint.id,
      cause: err,
    });
  } finally {
    if (created) await rm(out, { force: true });
  }
}

/** Copies `size` bytes of `from` into `to` at the same offsets, writing only non-zero 64 KiB runs. */
async function copySparse(
  from: string,
  to: FileHandle,
  size: number,
  onBytes: (bytes: number) => void,
): Promise<void> {
  const src = await open(from, 'r');
  try {
    const actual = (await src.stat()).size;
    if (actual !== size) throw new FerryError(`${from} is ${actual} bytes, not ${size}`);
    await to.truncate(size);
    for (let off = 0; off < size; off += COPY_BUFFER) {
      const data = await readAt(src, off, Math.min(COPY_BUFFER, size - off), `file:${from}`);
      let run = -1; // start of the pending non-zero run within `data`
      for (let at = 0; at < data.length; at += SPARSE_RUN) {
        const zero = isZero(data.subarray(at, at + SPARSE_RUN));
        if (!zero && run < 0) run = at;
        else if (zero && run >= 0) {
          await writeAll(to, data.subarray(run, at), off + run);
          run = -1;
        }
      }
      if (run >= 0) await writeAll(to, data.subarray(run), off + run);
      onBytes(data.length);
    }
  } finally {
    await src.close();
  }
}

const ZEROS = Buffer.alloc(SPARSE_RUN);
const isZero = (piece: Uint8Array): boolean =>
  Buffer.from(piece.buffer, piece.byteOffset, piece.length).equals(ZEROS.subarray(0, piece.length));

async function sizeOf(path: string, refuse: (why: string) => Error): Promise<number> {
  try {
    return (await stat(path)).size;
  } catch (err) {
    throw refuse(`${path} cannot be read (${errorMessage(err)})`);
  }
}
