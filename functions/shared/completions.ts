// Reading a disk's completions back against its descriptors: the tick's exact progress check and
// repair, and the finalizer's validation and LINEAR aggregate. Page by page, never the whole disk.
import { LinearAggregator } from '../../shared/engine/integrity.ts';
import type { Completion, CycleDiskRecord, CycleStore } from './cycle-store.ts';
import { blockIndexes } from './descriptor-pages.ts';
import { CycleFailedError, CycleStateError } from './errors.ts';

export interface CompletionScan {
  /** Descriptors with a recorded completion. */
  readonly completed: number;
  readonly writtenBlocks: number;
  /** Seqs without a completion, ascending, at most `limit` of them. */
  readonly missing: number[];
}

function pagesOf(rec: CycleDiskRecord): number {
  const n = rec.descriptors ?? 0;
  return Math.ceil(n / rec.perPage);
}

/** Counts completions exactly and lists what is missing. Requires the differ to be done. */
export async function scanCompletions(
  store: CycleStore,
  rec: CycleDiskRecord,
  limit: number,
): Promise<CompletionScan> {
  const total = rec.descriptors ?? 0;
  let completed = 0;
  let writtenBlocks = 0;
  const missing: number[] = [];
  let expectedPage = 0;
  const noteMissing = (from: number, to: number) => {
    for (let s = from; s < to && missing.length < limit; s++) missing.push(s);
  };
  for await (const { page, completions } of store.completionPages(rec.set, rec.disk, rec.cycleId)) {
    if (page >= pagesOf(rec)) continue;
    // Pages with no completion at all have no item.
    noteMissing(expectedPage * rec.perPage, page * rec.perPage);
    let next = page * rec.perPage;
    for (const c of completions) {
      if (c.seq >= total) continue;
      noteMissing(next, c.seq);
      next = c.seq + 1;
      completed++;
      writtenBlocks += c.blocks.length;
    }
    noteMissing(next, Math.min(total, (page + 1) * rec.perPage));
    expectedPage = page + 1;
  }
  noteMissing(expectedPage * rec.perPage, total);
  return { completed, writtenBlocks, missing };
}

export interface DiskValidation {
  readonly descriptors: number;
  readonly blocks: number;
  readonly bytes: number;
  /** LINEAR aggregate: SHA-256 over the written blocks' raw SHA-256s in ascending block order. */
  readonly aggregate: Buffer;
}

/**
 * Validates a disk before its snapshot is completed: every descriptor has exactly one completion;
 * each completion names only blocks of its descriptor, ascending, and all of them unless zero
 * blocks could be skipped (a full copy to an unencrypted snapshot); block indexes ascend across
 * the whole disk. Computes the LINEAR aggregate from the recorded checksums on the way.
 * Throws CycleFailedError naming the disk, seq and block on the first violation.
 */
export async function validateDisk(store: CycleStore, rec: CycleDiskRecord): Promise<DiskValidation> {
  const where = { set: rec.set, cycleId: rec.cycleId, disk: rec.disk };
  if (!rec.diffDone || rec.descriptors === undefined) {
    throw new CycleStateError(`disk ${rec.disk} of cycle ${rec.cycleId} has not been diffed`, where);
  }
  const skipAllowed = rec.kind === 'full' && !rec.encrypted;
  const fail = (why: string, seq?: number) =>
    new CycleFailedError(`disk ${rec.disk} of cycle ${rec.cycleId} failed validation: ${why}`, {
      ...where,
      seq,
    });
  const aggregate = new LinearAggregator();
  let blocks = 0;
  let bytes = 0;
  let lastIndex = -1;
  for (let page = 0; page < pagesOf(rec); page++) {
    const descriptors = await store.getDescriptorPage(rec.set, rec.disk, rec.cycleId, page);
    const first = page * rec.perPage;
    const count = Math.min(rec.perPage, rec.descriptors - first);
    if (descriptors === undefined || descriptors.length !== count) {
      throw fail(`descriptor page ${page} holds ${descriptors?.length ?? 0} descriptors, expected ${count}`);
    }
    const completions = new Map<number, Completion>();
    for (const c of (await store.getCompletionPage(rec.set, rec.disk, rec.cycleId, page)) ?? []) {
      completions.set(c.seq, c);
    }
    for (const d of descriptors) {
      const c = completions.get(d.seq);
      if (c === undefined)
        throw fail(`descriptor seq ${d.seq} (offset ${d.offset}) has no completion`, d.seq);
      const expected = blockIndexes(d);
      const allowed = new Set(expected);
      for (const b of c.blocks) {
        if (!allowed.has(b.index))
          throw fail(`completion of seq ${d.seq} names block ${b.index} outside it`, d.seq);
        if (b.index <= lastIndex) {
          throw fail(`block ${b.index} (seq ${d.seq}) does not ascend after block ${lastIndex}`, d.seq);
        }
        lastIndex = b.index;
        aggregate.add(b.digest);
      }
      if (!skipAllowed && c.blocks.length !== expected.length) {
        throw fail(`seq ${d.seq} recorded ${c.blocks.length} of its ${expected.length} blocks`, d.seq);
      }
      blocks += c.blocks.length;
      bytes += d.bytes;
    }
    if (completions.size !== count) {
      throw fail(`completion page ${page} holds ${completions.size} completions for ${count} descriptors`);
    }
  }
  return { descriptors: rec.descriptors, blocks, bytes, aggregate: Buffer.from(aggregate.hex(), 'hex') };
}
