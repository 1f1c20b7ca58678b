// Point-in-time recovery of a file-image disk: its image as of a kept checkpoint, written to a new
// file from the current image and the history (history.ts), and verified against that
// checkpoint's manifest before it is handed over.
import { type FileHandle, open, rm, stat, truncate } from 'node:fs/promises';
import { dirname } from 'node:path';
import { errorMessage, FerryError } from '../engine/errors.ts';
import type { CheckpointDisk } from '../engine/ports.ts';
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

/**
 * What planning needs of a checkpoint: its id, its sequence and where its disks were written (a
 * catalog entry, or what a node is told of one in a recover question).
 */
export interface PlannedCheckpoint {
  readonly id: string;
  readonly sequence: number;
  readonly disks: readonly Pick<CheckpointDisk, 'target'>[];
}

/** What planning needs of the recovered disk: its name, replica, size and manifest reference. */
export type PlannedDisk = Pick<CheckpointDisk, 'disk' | 'target' | 'sizeBytes' | 'targetRef'>;

/** How one disk of a checkpoint is rebuilt: what is copied, what is applied, what it is checked against. */
export interface DiskRecoveryPlan {
  readonly disk: string;
  readonly checkpoint: PlannedCheckpoint;
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
  catalog: readonly PlannedCheckpoint[],
  damaged: readonly number[],
  checkpoint: PlannedCheckpoint,
  disk: PlannedDisk,
  opts: { readonly readManifest?: boolean } = { readManifest: true },
): Promise<DiskRecoveryPlan> {
  const refuse = refusal(checkpoint, disk);
  if (!disk.target.startsWith('file:')) {
    throw refuse(`its target ${disk.target} is not a local file image (recovery reads file: targets only)`);
  }
  const { later } = laterCheckpoints(catalog, damaged, checkpoint, disk);
  const image = disk.target.slice('file:'.length);
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

/** A RecoveryError for `disk` of `checkpoint`: `why` in full, and `reason` for a listing. */
export function refusal(
  checkpoint: Pick<PlannedCheckpoint, 'id'>,
  disk: Pick<PlannedDisk, 'disk'>,
): (why: string, reason?: string) => RecoveryError {
  return (why, reason = `disk ${disk.disk}: ${why}`) =>
    new RecoveryError(`checkpoint ${checkpoint.id}, disk ${disk.disk}: ${why}`, {
      disk: disk.disk,
      checkpoint: checkpoint.id,
      reason,
    });
}

/**
 * What the catalog says of a disk's recovery, wherever its replica is: the checkpoint must record
 * the manifest to verify against, and no later catalog entry may be damaged (whether it changed the
 * disk would be unknown). Returns the later checkpoints that wrote the disk's replica, oldest first
 * (their history must all be there), and the manifest reference.
 */
export function laterCheckpoints<C extends PlannedCheckpoint>(
  catalog: readonly C[],
  damaged: readonly number[],
  checkpoint: PlannedCheckpoint,
  disk: PlannedDisk,
): { later: C[]; targetRef: string } {
  const refuse = refusal(checkpoint, disk);
  if (disk.targetRef === undefined) throw refuse('the catalog records no manifest to verify it against');
  const later = catalog
    .filter((c) => c.sequence > checkpoint.sequence && c.disks.some((d) => d.target === disk.target))
    .sort((a, b) => a.sequence - b.sequence);
  const unreadable = damaged.find((s) => s > checkpoint.sequence);
  if (unreadable !== undefined) {
    throw refuse(
      `the catalog entry of checkpoint #${unreadable} is damaged, so whether it changed this disk is unknown`,
    );
  }
  return { later, targetRef: disk.targetRef };
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
    const { regions } = await verifyRecovered(
      out,
      { disk, checkpoint: checkpoint.id, size: plan.size, manifest: await readManifest(plan.manifest) },
      progress('verify'),
      'the history or the image was altered',
    );
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

/**
 * Hashes a recovered image region by region against the checkpoint's manifest (and its size against
 * the disk's): a RecoveryError naming the first offset that differs, and `suspect` as the likely
 * cause, when it does not match. Returns the number of regions verified.
 */
export async function verifyRecovered(
  out: string,
  expected: {
    readonly disk: string;
    readonly checkpoint: string;
    readonly size: number;
    readonly manifest: Buffer;
  },
  onBytes: (bytes: number) => void,
  suspect: string,
): Promise<{ regions: number }> {
  const { disk, checkpoint } = expected;
  const { regions, mismatches } = await compareWithManifest(out, expected.manifest, onBytes);
  const size = (await stat(out)).size;
  if (mismatches.length > 0 || size !== expected.size) {
    const at = mismatches[0] ?? 0;
    throw new RecoveryError(
      `checkpoint ${checkpoint}, disk ${disk}: the materialised image does not match the checkpoint's ` +
        `manifest at offset ${at}${mismatches.length > 1 ? ` (and ${mismatches.length - 1} more regions)` : ''}: ` +
        `${suspect}; nothing was kept`,
      { disk, checkpoint, offset: at },
    );
  }
  return { regions };
}

/** Copies `size` bytes of `from` into `to` at the same offsets, writing only non-zero 64 KiB runs. */
async function copySparse(
  from: string,
  to: FileHandle,
  size: number,
  onBytes: (bytes: number) => void,
): Promise<void> {
  await to.truncate(size);
  for await (const run of nonZeroRuns(from, size, { onBytes })) await writeAll(to, run.data, run.offset);
}

/**
 * The non-zero data of the file `from` (which must be `size` bytes), as runs of whole 64 KiB pieces
 * (the last one short) at their offsets, each at most `maxRun` bytes: what a sparse copy writes.
 * Reads COPY_BUFFER at a time; `onBytes` is told each buffer read. A run's data is valid until the
 * next one is asked for.
 */
export async function* nonZeroRuns(
  from: string,
  size: number,
  opts: { readonly maxRun?: number; readonly onBytes?: (bytes: number) => void } = {},
): AsyncGenerator<{ readonly offset: number; readonly data: Uint8Array }> {
  const maxRun = opts.maxRun ?? COPY_BUFFER;
  const src = await open(from, 'r');
  try {
    const actual = (await src.stat()).size;
    if (actual !== size) throw new FerryError(`${from} is ${actual} bytes, not ${size}`);
    for (let off = 0; off < size; off += COPY_BUFFER) {
      const data = await readAt(src, off, Math.min(COPY_BUFFER, size - off), `file:${from}`);
      let run = -1; // start of the pending non-zero run within `data`
      for (let at = 0; at < data.length; at += SPARSE_RUN) {
        const zero = isZero(data.subarray(at, at + SPARSE_RUN));
        if (!zero && run < 0) run = at;
        else if ((zero && run >= 0) || (run >= 0 && at + SPARSE_RUN - run > maxRun)) {
          yield { offset: off + run, data: data.subarray(run, at) };
          run = zero ? -1 : at;
        }
      }
      if (run >= 0) yield { offset: off + run, data: data.subarray(run) };
      opts.onBytes?.(data.length);
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
