// A file image's history: for each published cycle that changed the image in place, what it
// overwrote of the previous checkpoint, so older checkpoints can be materialised (materialise.ts).
//
//   PATH.ferry-history/<seq>/          one entry per published cycle <seq> (8 digits), complete or absent
//       meta.json                      which cycle, what kind of record, the previous image's size and
//                                      its manifest's reference
//       undo                           kind "undo": the previous checkpoint's bytes under every extent
//                                      cycle <seq> changed (the undo log file-target.ts wrote, linked)
//       image                          kind "image": the whole previous image, replaced by a re-seed
//                                      (linked, so it costs no copy)
//       manifest                       the previous checkpoint's per-MiB manifest (linked)
//   PATH.ferry-history/<seq>.tmp/      an entry being built; rebuilt by the rerun that finishes it
//   PATH.ferry-history/<seq>.pruning/  an entry being deleted; removed by the next prune
//
// An entry is built under .tmp and renamed into place, and deleted by renaming it aside first, so a
// crash leaves every entry whole or absent. Entries are pruned oldest first: a checkpoint is
// recoverable while the entries of every later cycle are there, so a crash while pruning removes
// history of pruned checkpoints only, never a hole under a kept one.
import { link, mkdir, readdir, readFile, rename, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { errorMessage } from '../engine/errors.ts';
import { syncDir, writeFileSynced } from './durable.ts';

export const HISTORY_SUFFIX = '.ferry-history';

const metaSchema = z.strictObject({
  /** The published cycle whose commit overwrote what this entry holds. */
  cycleId: z.string(),
  sequence: z.number().int().positive(),
  kind: z.enum(['undo', 'image']),
  /** Size of the previous checkpoint's image. */
  size: z.number().int().nonnegative(),
  /** Reference of the previous checkpoint's manifest (what its catalog entry recorded). */
  manifestRef: z.string(),
});

export type HistoryMeta = z.infer<typeof metaSchema>;

/** A complete entry, with the paths of its files. */
export interface HistoryEntry extends HistoryMeta {
  readonly dir: string;
  /** The undo log (kind "undo") or the whole previous image (kind "image"). */
  readonly data: string;
  readonly manifest: string;
}

/** Named points of a prune, for the crash tests (FERRY_TEST_CRASH_AT=mid-prune). */
export type PruneStep = 'mid-prune';

export const historyDir = (imagePath: string): string => `${imagePath}${HISTORY_SUFFIX}`;
const entryName = (sequence: number): string => String(sequence).padStart(8, '0');

/**
 * Keeps the undo data of a published cycle as its history entry. `undo` is an undo log or, for a
 * re-seed, the previous image (`kind`); `manifest` is the previous checkpoint's manifest file. Both are
 * linked, not copied, so this must run before the caller replaces or removes them. Idempotent: an
 * entry of this sequence already there (a rerun after a crash, or a state directory started over)
 * is replaced by this one.
 */
export async function recordHistory(
  imagePath: string,
  cycle: { readonly id: string; readonly sequence: number },
  kept: {
    readonly kind: 'undo' | 'image';
    readonly data: string;
    readonly manifest: string;
    /** The previous manifest's reference, as file-target.ts computes it. */
    readonly manifestRef: string;
  },
): Promise<void> {
  const dir = historyDir(imagePath);
  const entry = join(dir, entryName(cycle.sequence));
  const tmp = `${entry}.tmp`;
  await mkdir(dir, { recursive: true });
  await rm(tmp, { recursive: true, force: true });
  await mkdir(tmp);
  await link(kept.data, join(tmp, kept.kind));
  await link(kept.manifest, join(tmp, 'manifest'));
  const meta: HistoryMeta = {
    cycleId: cycle.id,
    sequence: cycle.sequence,
    kind: kept.kind,
    size: kept.kind === 'image' ? (await stat(kept.data)).size : (await stat(imagePath)).size,
    manifestRef: kept.manifestRef,
  };
  await writeFileSynced(join(tmp, 'meta.json'), JSON.stringify(meta));
  await syncDir(tmp);
  await rm(entry, { recursive: true, force: true });
  await rename(tmp, entry);
  await syncDir(dir);
}

/** What an image's history holds: its complete entries by sequence, and those it cannot read. */
export interface HistoryView {
  readonly entries: ReadonlyMap<number, HistoryEntry>;
  readonly damaged: ReadonlyMap<number, string>;
}

/** Reads an image's history (empty when it has none). */
export async function readHistory(imagePath: string): Promise<HistoryView> {
  const dir = historyDir(imagePath);
  const entries = new Map<number, HistoryEntry>();
  const damaged = new Map<number, string>();
  for (const name of await entryNames(dir)) {
    const sequence = Number(name);
    const at = join(dir, name);
    try {
      const meta = metaSchema.parse(JSON.parse(await readFile(join(at, 'meta.json'), 'utf8')));
      if (meta.sequence !== sequence) throw new Error(`it records cycle #${meta.sequence}`);
      entries.set(sequence, {
        ...meta,
        dir: at,
        data: join(at, meta.kind),
        manifest: join(at, 'manifest'),
      });
    } catch (err) {
      damaged.set(sequence, `${join(at, 'meta.json')} cannot be read (${errorMessage(err)})`);
    }
  }
  return { entries, damaged };
}

/**
 * Deletes the entries no kept checkpoint needs: those of cycles up to `keepFrom` (the oldest kept
 * checkpoint is materialised from the entries of the cycles after it). Oldest first, each renamed
 * aside before it is deleted; finishes what an interrupted prune left. Returns the sequences pruned.
 */
export async function pruneHistory(
  imagePath: string,
  keepFrom: number,
  step?: (step: PruneStep) => void | Promise<void>,
): Promise<number[]> {
  const dir = historyDir(imagePath);
  const names = await readdir(dir).catch(notFound);
  if (names === undefined) return [];
  // Left by an interrupted prune (or an interrupted record, which its rerun rebuilt already: the
  // set's lock is held and any unfinished commit recovered before a prune runs).
  for (const name of names.filter((n) => /^\d+\.(pruning|tmp)$/.test(n))) {
    await rm(join(dir, name), { recursive: true, force: true });
  }
  const pruned: number[] = [];
  for (const name of (await entryNames(dir)).filter((n) => Number(n) <= keepFrom)) {
    const aside = join(dir, `${name}.pruning`);
    await rename(join(dir, name), aside);
    await syncDir(dir);
    await step?.('mid-prune');
    await rm(aside, { recursive: true, force: true });
    pruned.push(Number(name));
  }
  return pruned;
}

/** The names of complete entries, oldest first. */
async function entryNames(dir: string): Promise<string[]> {
  const names = (await readdir(dir).catch(notFound)) ?? [];
  return names.filter((n) => /^\d+$/.test(n)).sort((a, b) => Number(a) - Number(b));
}

function notFound(err: unknown): undefined {
  if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
  throw err;
}
