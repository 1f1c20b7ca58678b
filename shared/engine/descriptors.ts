// Change maps -> descriptors: normalise changed extents, align them to the target's block size,
// coalesce, and cut them into descriptors of at most chunk_size that carry their sub-extents.
import { ChangeMapError, ConfigError } from './errors.ts';
import type { Extent } from './extents.ts';

/** One unit of work: a span of at most chunk_size bytes and the changed extents inside it. */
export interface Descriptor {
  /** Dense, 0-based, in offset order within one disk's cycle. */
  readonly seq: number;
  /** Start of the first changed extent (block-aligned). */
  readonly offset: number;
  /**
   * Span from `offset` to the end of the last extent: inside one chunk_size-aligned cell of the
   * disk, so never more than chunk_size.
   */
  readonly length: number;
  /** Changed extents in absolute disk offsets: sorted, disjoint, block-aligned, inside the span. */
  readonly extents: readonly Extent[];
  /** Sum of the extents' lengths: the bytes that move and count against windows and budgets. */
  readonly bytes: number;
}

export interface NormalizeOptions {
  /**
   * The source disk's size in bytes. A raw extent that ends beyond it is refused (ChangeMapError):
   * the map describes another disk, or this disk before it was resized.
   */
  readonly diskSize: number;
  /** The target's write unit (EBS 512 KiB, Azure 512 B); every extent is widened to it. */
  readonly blockSize: number;
  /** Names the disk in errors. */
  readonly disk?: string;
}

export interface CutOptions {
  /** Largest descriptor span; a multiple of the block size the extents were normalised to. */
  readonly chunkSize: number;
  /** First sequence number (default 0). */
  readonly startSeq?: number;
}

const isCount = (n: number): boolean => Number.isSafeInteger(n) && n >= 0;

/** Rounds down to a multiple of `unit`; `%` is exact for safe integers, unlike division. */
const alignDown = (n: number, unit: number): number => n - (n % unit);

const alignUp = (n: number, unit: number): number => {
  const rest = n % unit;
  return rest === 0 ? n : n - rest + unit;
};

/** Where an extent sits in the map as given: its 0-based position, and the disk when it is known. */
function mapError(disk: string | undefined, index: number, offset: number, why: string): ChangeMapError {
  const where = disk === undefined ? 'change map' : `change map of disk ${disk}`;
  return new ChangeMapError(`${where}: entry ${index} at offset ${offset} ${why}`, { disk, offset });
}

/**
 * Sorts, widens to whole blocks and merges a change map. Accepts extents in any order, overlapping,
 * touching or empty, because change-tracking APIs return all of those.
 * Refuses the first extent, in the map's own order, that is malformed or ends past the end of the
 * disk (offset + length > diskSize), with a ChangeMapError naming the disk, the extent's 0-based
 * position in the map, its offset and length, and the disk's size: such a map belongs to another
 * disk or to this disk before a resize, and clipping it would publish a checkpoint that silently
 * misses changes. An empty extent names no byte and is dropped, including one at offset == diskSize
 * (it ends at the end, not past it); one that starts past the end is refused like any other, since
 * it still says the map is for a bigger disk.
 * Only the raw extents are checked: widening to the target's block size may reach past the end, so
 * the last block of a disk whose size is not a multiple of `blockSize` comes out short.
 * O(n log n) time and O(n) memory in the number of extents, whatever the disk's size.
 */
export function normalizeExtents(extents: Iterable<Extent>, opts: NormalizeOptions): Extent[] {
  const { diskSize, blockSize, disk } = opts;
  if (!Number.isSafeInteger(blockSize) || blockSize <= 0) {
    throw new ConfigError(`block size ${blockSize} is not a positive whole number of bytes`, {
      disk,
      setting: 'blockSize',
    });
  }
  if (!isCount(diskSize)) {
    throw new ChangeMapError(`disk ${disk ?? '(unnamed)'}: size ${diskSize} is not a whole number of bytes`, {
      disk,
    });
  }

  const aligned: Extent[] = [];
  let index = 0;
  for (const e of extents) {
    const i = index++;
    const { offset, length } = e;
    if (!isCount(offset))
      throw mapError(disk, i, offset, 'has an offset that is not a whole number of bytes');
    if (!isCount(length)) throw mapError(disk, i, offset, `has an invalid length ${length}`);
    const end = offset + length;
    if (!Number.isSafeInteger(end)) throw mapError(disk, i, offset, `with length ${length} ends beyond 2^53`);
    if (end > diskSize) {
      throw mapError(
        disk,
        i,
        offset,
        `with length ${length} ends at ${end}, past the end of the disk (${diskSize} bytes): ` +
          'the map is for another disk or for this disk before a resize',
      );
    }
    if (length === 0) continue;
    const start = alignDown(offset, blockSize);
    // The raw extent is inside the disk; only the widening may reach past its end (a short last block).
    const stop = Math.min(alignUp(end, blockSize), diskSize);
    aligned.push({ offset: start, length: stop - start });
  }

  aligned.sort((a, b) => a.offset - b.offset);

  const merged: Extent[] = [];
  let start = -1;
  let stop = -1;
  for (const e of aligned) {
    if (e.offset <= stop) {
      stop = Math.max(stop, e.offset + e.length);
      continue;
    }
    if (stop > start) merged.push({ offset: start, length: stop - start });
    start = e.offset;
    stop = e.offset + e.length;
  }
  if (stop > start) merged.push({ offset: start, length: stop - start });
  return merged;
}

/**
 * Cuts normalised extents into descriptors: one per chunkSize-aligned cell of the disk that holds a
 * change, taking everything changed in that cell and splitting extents at cell boundaries. Aligned
 * cells rather than greedy spans from the first changed byte: no two descriptors share a cell, so a
 * target whose own units (manifest regions, snapshot blocks) divide chunkSize sees each unit written
 * by one chunk, and sequential copies cut the same either way. Lazy, so a 16 TiB full copy never
 * holds all its descriptors at once.
 * Throws if `extents` is not sorted and disjoint (it must come from normalizeExtents).
 */
export function* cutDescriptors(extents: readonly Extent[], opts: CutOptions): Generator<Descriptor> {
  const { chunkSize } = opts;
  let seq = opts.startSeq ?? 0;
  if (!Number.isSafeInteger(chunkSize) || chunkSize <= 0) {
    throw new ConfigError(`chunkSize ${chunkSize} is not a positive whole number of bytes`, {
      setting: 'chunkSize',
    });
  }
  if (!isCount(seq)) {
    throw new ConfigError(`startSeq ${seq} is not a whole number`, { setting: 'startSeq' });
  }

  // Checks the normalised-input contract as each extent is reached: O(1) each, never a second pass.
  let previousEnd = -1;
  const enter = (k: number): number | undefined => {
    const e = extents[k];
    if (e === undefined) return undefined;
    if (!isCount(e.offset) || !Number.isSafeInteger(e.length) || e.length <= 0 || e.offset <= previousEnd) {
      const why = 'is empty, overlaps or touches the previous one: cut only normalised extents';
      throw new ChangeMapError(`extent at offset ${e.offset} (length ${e.length}) ${why}`, {
        offset: e.offset,
      });
    }
    previousEnd = e.offset + e.length;
    return e.offset;
  };

  let i = 0;
  // Where the unsent part of extents[i] begins: an extent split at a chunk boundary resumes mid-way.
  let cursor = enter(0) ?? 0;
  while (i < extents.length) {
    const offset = cursor;
    const limit = alignDown(offset, chunkSize) + chunkSize;
    const parts: Extent[] = [];
    let bytes = 0;
    let end = offset;
    while (i < extents.length && cursor < limit) {
      const e = extents[i]!;
      const eEnd = e.offset + e.length;
      end = Math.min(eEnd, limit);
      parts.push({ offset: cursor, length: end - cursor });
      bytes += end - cursor;
      if (end < eEnd) {
        cursor = end;
        break;
      }
      i++;
      cursor = enter(i) ?? cursor;
    }
    yield { seq: seq++, offset, length: end - offset, extents: parts, bytes };
  }
}

/** Normalises a change map and cuts it into descriptors; see normalizeExtents and cutDescriptors. */
export function planDescriptors(
  extents: Iterable<Extent>,
  opts: NormalizeOptions & { readonly chunkSize: number },
): Generator<Descriptor> {
  const { chunkSize, blockSize, disk } = opts;
  // Checked here, not in cutDescriptors: only this function knows both sizes, and a chunk that is not
  // whole blocks would leave cuts mid-block.
  if (!Number.isSafeInteger(chunkSize) || chunkSize <= 0 || chunkSize % blockSize !== 0) {
    throw new ConfigError(
      `chunkSize ${chunkSize} is not a positive multiple of the block size ${blockSize}`,
      {
        disk,
        setting: 'chunkSize',
      },
    );
  }
  return cutDescriptors(normalizeExtents(extents, opts), { chunkSize });
}

/** Counts normalised extents and the bytes they cover: what a cycle will move. */
export function summarizeExtents(normalized: readonly Extent[]): { extents: number; bytes: number } {
  let bytes = 0;
  for (const e of normalized) bytes += e.length;
  return { extents: normalized.length, bytes };
}
