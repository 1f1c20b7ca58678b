// A file image's history: for each published cycle that changed the image in place, what it
// overwrote of the previous checkpoint, so older checkpoints can be materialised (materialise.ts).
//
//   PATH.ferry-history/<seq>/          one entry per published cycle <seq> (8 digits), complete or absent
//       meta.json                      which cycle, what kind of record, the previous image's size and
//                                      its manifest's reference
//       undo                           kind "undo": the previous checkpoint's bytes under every extent
//                                      cycle <seq> changed (an increment's undo log, linked; for a
//                                      re-seed, the regions whose digests changed, written here)
//       image                          kind "image", no longer written but still read: the whole
//                                      previous image a re-seed replaced
//       manifest                       the previous checkpoint's per-MiB manifest (linked)
//   PATH.ferry-history/<seq>.tmp/      an entry being built; rebuilt by the rerun that finishes it
//   PATH.ferry-history/<seq>.pruning/  an entry being deleted; removed by the next prune
//
// An entry is built under .tmp and renamed into place, and deleted by renaming it aside first, so a
// crash leaves every entry whole or absent. Entries are pruned oldest first: a checkpoint is
// recoverable while the entries of every later cycle are there, so a crash while pruning removes
// history of pruned checkpoints only, never a hole under a kept one.
import { link, mkdir, readdir, readFile, rename, rm } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { z } from 'zod';
import { errorMessage } from '../engine/errors.ts';
import { syncDir, writeAtomic, writeFileSynced } from './durable.ts';

export const HISTORY_SUFFIX = '.ferry-history';

const metaSchema = z.strictObject({
  /** The published cycle whose commit overwrote what this entry holds. */
  cycleId: z.string(),
  sequence: z.number().int().positive(),
  /** "image": the whole previous image, as re-seeds were kept before they wrote undo logs. */
  kind: z.enum(['undo', 'image']),
  /** Size of the previous checkpoint's image (an undo log is applied to the image cut or extended to it). */
  size: z.number().int().nonnegative(),
  /** Reference of the previous checkpoint's manifest (what its catalog entry recorded). */
  manifestRef: z.string(),
});

export type HistoryMeta = z.infer<typeof metaSchema>;

/** A complete entry, with the paths of its files. */
export interface HistoryEntry extends HistoryMeta {
  readonly dir: string;
  /** The undo log (kind "undo") or, in entries written before re-seeds kept undo logs, the whole previous image (kind "image"). */
  readonly data: string;
  readonly manifest: string;
}

/** Named points of a prune, for the crash tests (FERRY_TEST_CRASH_AT=mid-prune). */
export type PruneStep = 'mid-prune';

export const historyDir = (imagePath: string): string => `${imagePath}${HISTORY_SUFFIX}`;
const entryName = (sequence: number): string => String(sequence).padStart(8, '0');

/**
 * Keeps the undo data of a published cycle as its history entry. `undo` is the path of an undo log
 * to link (so this must run before the caller removes it), or writes one at the path it is given
 * (and syncs it); `manifest` is the previous checkpoint's manifest file, linked too; `size` is the
 * previous image's size. Idempotent: an entry of this sequence already there (a rerun after a
 * crash, or a state directory started over) is replaced by this one.
 */
export async function recordHistory(
  imagePath: string,
  cycle: { readonly id: string; readonly sequence: number },
  kept: {
    readonly undo: string | ((path: string) => Promise<void>);
    readonly size: number;
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
  if (typeof kept.undo === 'string') await link(kept.undo, join(tmp, 'undo'));
  else await kept.undo(join(tmp, 'undo'));
  await link(kept.manifest, join(tmp, 'manifest'));
  const meta: HistoryMeta = {
    cycleId: cycle.id,
    sequence: cycle.sequence,
    kind: 'undo',
    size: kept.size,
    manifestRef: kept.manifestRef,
  };
  await writeFileSynced(join(tmp, 'meta.json'), JSON.stringify(meta));
  await syncDir(tmp);
  await rm(entry, { recursive: true, force: true });
  await rename(tmp, entry);
  await syncDir(dir);
}

/**
 * Names entry `sequence` after the cycle it belongs to, `to`, when it was recorded under `from` (a
 * replication node opens its images with an id of its own, and learns the checkpoint's id only when
 * told of the publication). Idempotent: an entry already named `to` is left as it is; one named
 * otherwise is refused (its recovery is refused in turn, never done wrong); a missing one is none.
 */
export async function relabelHistory(
  imagePath: string,
  sequence: number,
  from: string,
  to: string,
): Promise<void> {
  const meta = join(historyDir(imagePath), entryName(sequence), 'meta.json');
  const text = await readFile(meta, 'utf8').catch(notFound);
  if (text === undefined) return; // nothing was kept (a first copy overwrote nothing)
  const entry = metaSchema.parse(JSON.parse(text));
  if (entry.cycleId === to) return;
  if (entry.cycleId !== from) {
    throw new Error(`${meta} records cycle ${entry.cycleId}, neither ${from} nor ${to}`);
  }
  // meta.json is renamed into place whole: a crash leaves the old name or the new one.
  await writeAtomic(meta, JSON.stringify({ ...entry, cycleId: to }));
  await syncDir(dirname(meta));
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
