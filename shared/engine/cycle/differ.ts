// The snapshot differ: lists changed blocks, cuts descriptors, stores them in pages; resumable.
import { cutDescriptors } from '../descriptors.ts';
import { ChangeMapError } from '../errors.ts';
import type { Extent } from '../extents.ts';
import type { Clock } from '../ports.ts';
import { GiB } from '../units.ts';
import { blockIndexes, MAX_BLOCK_TOKEN_CHARS } from './descriptor-pages.ts';
import { CycleStateError } from './errors.ts';
import {
  type ChangeLister,
  type CycleDiskRecord,
  type CycleLedger,
  EBS_BLOCK_SIZE,
  type Log,
  type Meter,
  type PlannedDescriptor,
  type SourceBlockRef,
} from './ports.ts';
import type { DifferResult, DiffTask } from './types.ts';

export interface DifferDeps {
  readonly ledger: Pick<CycleLedger, 'getDisk' | 'updateDisk' | 'putDescriptorPage'>;
  readonly lister: ChangeLister;
  readonly clock: Clock;
  readonly log: Log;
  readonly meter: Meter;
  /** Milliseconds left in this invocation; the differ stops `marginMs` before. */
  readonly remainingMs: () => number;
  readonly marginMs: number;
}

/** Merges ascending block indexes into byte extents (adjacent blocks become one extent). */
function blocksToExtents(blocks: readonly SourceBlockRef[]): Extent[] {
  const out: Extent[] = [];
  let start = -1;
  let end = -1;
  for (const b of blocks) {
    if (b.index === end) {
      end++;
      continue;
    }
    if (end > start) out.push({ offset: start * EBS_BLOCK_SIZE, length: (end - start) * EBS_BLOCK_SIZE });
    start = b.index;
    end = b.index + 1;
  }
  if (end > start) out.push({ offset: start * EBS_BLOCK_SIZE, length: (end - start) * EBS_BLOCK_SIZE });
  return out;
}

function result(rec: CycleDiskRecord, done: boolean): DifferResult {
  return {
    set: rec.set,
    cycleId: rec.cycleId,
    disk: rec.disk,
    kind: rec.kind,
    done,
    descriptors: rec.diffSeq,
    blocks: rec.diffBlocks,
    bytes: rec.diffBytes,
  };
}

/**
 * Diffs one disk of a cycle. Returns counts only (never descriptors); `done: false` means it stopped
 * before its deadline and must be called again with the same task. Idempotent: a repeated or resumed
 * call rewrites the same pages. Progress is saved conditionally on the resume point, so two
 * invocations racing on one disk cannot both move it (the loser gets CycleStateError).
 */
export async function runDiffer(deps: DifferDeps, task: DiffTask): Promise<DifferResult> {
  const { ledger } = deps;
  const where = { set: task.set, cycleId: task.cycleId, disk: task.disk };
  let rec = await ledger.getDisk(task.set, task.disk, task.cycleId);
  if (rec === undefined) {
    throw new CycleStateError(
      `disk ${task.disk} of cycle ${task.cycleId} in set ${task.set} was never prepared`,
      where,
    );
  }
  if (rec.diffDone) return result(rec, true);
  if (rec.state !== 'active') {
    throw new CycleStateError(
      `disk ${rec.disk} of cycle ${rec.cycleId} is ${rec.state}: nothing to diff`,
      where,
    );
  }
  const diskCtx = { disk: rec.disk };
  // Blocks of the volume the cycle was prepared for: a listed block at or past this index belongs to
  // another (or a resized) volume, and is refused rather than cut into a descriptor past the end.
  const volumeBlocks = (rec.volumeSizeGiB * GiB) / EBS_BLOCK_SIZE;
  const { chunkSize, perPage } = rec;
  if (rec.diffSeq % perPage !== 0) {
    throw new CycleStateError(`differ of disk ${rec.disk} stopped mid-page (seq ${rec.diffSeq})`, where);
  }

  // Blocks listed but not yet in a final descriptor; the last descriptor cut is held back here,
  // because blocks of the next List page may still fall into its span.
  let buffer: SourceBlockRef[] = [];
  // Final descriptors not yet stored (fewer than a page, except just before a page is written).
  const ready: PlannedDescriptor[] = [];
  let nextSeq = rec.diffSeq;
  const startSeq = rec.diffSeq;
  let lastIndex = rec.diffStartBlock - 1;
  let blocks = rec.diffBlocks;
  let bytes = rec.diffBytes;

  const cut = (final: boolean): void => {
    if (buffer.length === 0) return;
    const tokens = new Map(buffer.map((b) => [b.index, b.token]));
    const cutNow = [...cutDescriptors(blocksToExtents(buffer), { chunkSize, startSeq: nextSeq })];
    const keep = final ? cutNow : cutNow.slice(0, -1);
    for (const d of keep) ready.push({ ...d, tokens: blockIndexes(d).map((i) => tokens.get(i)) });
    nextSeq += keep.length;
    if (final) {
      buffer = [];
    } else {
      const heldFrom = Math.floor(cutNow.at(-1)!.offset / EBS_BLOCK_SIZE);
      buffer = buffer.filter((b) => b.index >= heldFrom);
    }
  };

  const storePage = async (count: number, done: boolean): Promise<void> => {
    const page = ready.splice(0, count);
    const current = rec!;
    const firstSeq = current.diffSeq;
    if (page.length > 0)
      await ledger.putDescriptorPage(current.set, current.disk, current.cycleId, firstSeq / perPage, page);
    for (const d of page) {
      blocks += blockIndexes(d).length;
      bytes += d.bytes;
    }
    // Listing resumes where the first descriptor not yet stored starts, or after the last block seen.
    const resumeAt = ready[0]?.offset ?? (buffer[0] ? buffer[0].index * EBS_BLOCK_SIZE : undefined);
    const diffSeq = firstSeq + page.length;
    const saved = await ledger.updateDisk(
      current.set,
      current.disk,
      current.cycleId,
      {
        diffSeq,
        diffStartBlock: resumeAt === undefined ? lastIndex + 1 : Math.floor(resumeAt / EBS_BLOCK_SIZE),
        diffBlocks: blocks,
        diffBytes: bytes,
        diffDone: done,
        ...(done ? { descriptors: diffSeq } : {}),
      },
      { diffSeq: firstSeq, diffDone: false },
    );
    if (saved === undefined) {
      throw new CycleStateError(
        `differ progress of disk ${current.disk} in cycle ${current.cycleId} moved while this differ ran: concurrent modification`,
        where,
      );
    }
    rec = saved;
    deps.meter.add('DescriptorsStored', 'Count', page.length);
  };

  const controller = new AbortController();
  const pages = deps.lister.listBlocks({
    disk: rec.disk,
    snapshotId: rec.sourceSnapshotId,
    previousSnapshotId: rec.previousSourceSnapshotId,
    startingBlockIndex: rec.diffStartBlock,
    signal: controller.signal,
  });
  try {
    for await (const page of pages) {
      if (page.volumeSizeGiB !== rec.volumeSizeGiB) {
        throw new ChangeMapError(
          `source snapshot ${rec.sourceSnapshotId} of disk ${rec.disk} is ${page.volumeSizeGiB} GiB, but the cycle was prepared for ${rec.volumeSizeGiB} GiB`,
          diskCtx,
        );
      }
      for (const b of page.blocks) {
        if (!Number.isSafeInteger(b.index) || b.index <= lastIndex) {
          throw new ChangeMapError(
            `listing of snapshot ${rec.sourceSnapshotId} returned block ${b.index} after block ${lastIndex}: blocks must ascend`,
            { ...diskCtx, offset: b.index * EBS_BLOCK_SIZE },
          );
        }
        if (b.index >= volumeBlocks) {
          const offset = b.index * EBS_BLOCK_SIZE;
          throw new ChangeMapError(
            `change map of disk ${rec.disk}: listing of snapshot ${rec.sourceSnapshotId} returned block ${b.index} ` +
              `at offset ${offset} with length ${EBS_BLOCK_SIZE}, past the end of the disk ` +
              `(${rec.volumeSizeGiB} GiB: ${rec.volumeSizeGiB * GiB} bytes, blocks 0 to ${volumeBlocks - 1}): ` +
              'the listing is for another volume or for this one before a resize',
            { ...diskCtx, offset },
          );
        }
        if (b.token !== undefined && (b.token.length === 0 || b.token.length > MAX_BLOCK_TOKEN_CHARS)) {
          throw new ChangeMapError(
            `block token of block ${b.index} of snapshot ${rec.sourceSnapshotId} is ${b.token.length} characters (1-${MAX_BLOCK_TOKEN_CHARS} stored)`,
            { ...diskCtx, offset: b.index * EBS_BLOCK_SIZE },
          );
        }
        lastIndex = b.index;
        buffer.push(b);
      }
      cut(false);
      while (ready.length >= perPage) await storePage(perPage, false);
      // Stop only after storing something: an invocation that saved nothing would resume where it
      // started and never finish.
      if (deps.remainingMs() < deps.marginMs && rec.diffSeq > startSeq) {
        deps.log.info('differ stopping before its deadline; call again to resume', {
          disk: rec.disk,
          descriptors: rec.diffSeq,
          resumeAtBlock: rec.diffStartBlock,
        });
        return result(rec, false);
      }
    }
  } finally {
    // Stops the lister's paging if we leave early.
    controller.abort();
  }
  cut(true);
  while (ready.length > perPage) await storePage(perPage, false);
  await storePage(ready.length, true);
  deps.log.info('differ done', {
    disk: rec.disk,
    kind: rec.kind,
    descriptors: rec.diffSeq,
    blocks: rec.diffBlocks,
    bytes: rec.diffBytes,
  });
  return result(rec, true);
}
