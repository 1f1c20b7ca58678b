// Which regions a failback moves, and why: the recovered and the original side of each disk are
// compared, region by region, with the manifest of the last checkpoint both sides share. Also the
// comparison a migration uses to tell whether its source changed after the final cycle read it.

import { FerryError } from './errors.ts';
import type { Extent } from './extents.ts';

/** SHA-256: every manifest and region digest here is this long. */
export const DIGEST_BYTES = 32;

/** Why a region moves: which side changed it since the shared checkpoint. */
export type ChangedOn = 'recovered' | 'original' | 'both';

export interface RegionMove {
  readonly index: number;
  readonly offset: number;
  readonly length: number;
  readonly why: ChangedOn;
}

export interface FailbackDiskPlan {
  readonly disk: string;
  readonly size: number;
  readonly regionSize: number;
  readonly regions: number;
  /** Regions whose bytes go from the recovered image to the original, ascending. */
  readonly moves: readonly RegionMove[];
  /** The moves as extents (adjacent regions merged), for the reverse cycle's change map. */
  readonly extents: readonly Extent[];
  /** Moves per reason, in regions and bytes. */
  readonly counts: Readonly<Record<ChangedOn, { regions: number; bytes: number }>>;
  /** Regions both sides changed to the same bytes: they already agree, nothing moves. */
  readonly alreadyEqual: number;
}

export interface FailbackDiskInput {
  readonly disk: string;
  readonly size: number;
  readonly regionSize: number;
  /** The shared checkpoint's manifest: one digest per region, in order. */
  readonly shared: Uint8Array;
  /** The recovered image's digests, region by region. */
  readonly recovered: Uint8Array;
  /** The original disk's digests, region by region. */
  readonly original: Uint8Array;
}

/**
 * The failback rule, per region: it moves when the recovered side differs from the original side.
 * The reason is which side differs from the shared checkpoint (the recovered side, the original
 * side, or both). A region neither side changed is never read again; a region both sides changed
 * to the same bytes does not move. The three digest lists must describe the same disk size.
 */
export function planFailbackDisk(input: FailbackDiskInput): FailbackDiskPlan {
  const { disk, size, regionSize } = input;
  const regions = regionCount(size, regionSize);
  for (const [what, digests] of [
    ['shared checkpoint manifest', input.shared],
    ['recovered image digests', input.recovered],
    ['original disk digests', input.original],
  ] as const) {
    checkLength(disk, what, digests, regions);
  }
  const moves: RegionMove[] = [];
  const counts = {
    recovered: { regions: 0, bytes: 0 },
    original: { regions: 0, bytes: 0 },
    both: { regions: 0, bytes: 0 },
  };
  let alreadyEqual = 0;
  for (let i = 0; i < regions; i++) {
    const onRecovered = !sameDigest(input.recovered, input.shared, i);
    const onOriginal = !sameDigest(input.original, input.shared, i);
    if (!onRecovered && !onOriginal) continue;
    if (sameDigest(input.recovered, input.original, i)) {
      alreadyEqual++;
      continue;
    }
    const why: ChangedOn = onRecovered && onOriginal ? 'both' : onRecovered ? 'recovered' : 'original';
    const offset = i * regionSize;
    const length = Math.min(regionSize, size - offset);
    moves.push({ index: i, offset, length, why });
    counts[why].regions++;
    counts[why].bytes += length;
  }
  return { disk, size, regionSize, regions, moves, extents: mergeRegions(moves), counts, alreadyEqual };
}

/**
 * The regions (indices, ascending) whose digests in `actual` differ from `expected`: what changed on
 * a disk since the manifest was taken. Both must hold one digest per region of a `size`-byte disk.
 */
export function differingRegions(
  disk: string,
  size: number,
  regionSize: number,
  expected: Uint8Array,
  actual: Uint8Array,
): number[] {
  const regions = regionCount(size, regionSize);
  checkLength(disk, 'manifest', expected, regions);
  checkLength(disk, 'digests', actual, regions);
  const out: number[] = [];
  for (let i = 0; i < regions; i++) if (!sameDigest(expected, actual, i)) out.push(i);
  return out;
}

/** Region indices as extents of a `size`-byte disk, adjacent regions merged (the last one short). */
export function regionExtents(indices: readonly number[], size: number, regionSize: number): Extent[] {
  return mergeRegions(
    indices.map((i) => ({ offset: i * regionSize, length: Math.min(regionSize, size - i * regionSize) })),
  );
}

export const regionCount = (size: number, regionSize: number): number => Math.ceil(size / regionSize);

function mergeRegions(regions: readonly { offset: number; length: number }[]): Extent[] {
  const out: Extent[] = [];
  for (const r of regions) {
    const last = out[out.length - 1];
    if (last !== undefined && last.offset + last.length === r.offset) {
      out[out.length - 1] = { offset: last.offset, length: last.length + r.length };
    } else out.push({ offset: r.offset, length: r.length });
  }
  return out;
}

function sameDigest(a: Uint8Array, b: Uint8Array, index: number): boolean {
  const at = index * DIGEST_BYTES;
  for (let k = at; k < at + DIGEST_BYTES; k++) if (a[k] !== b[k]) return false;
  return true;
}

function checkLength(disk: string, what: string, digests: Uint8Array, regions: number): void {
  if (digests.length !== regions * DIGEST_BYTES) {
    throw new FerryError(
      `disk ${disk}: ${what}: ${digests.length / DIGEST_BYTES} region digests for a disk of ${regions} regions`,
      { disk },
    );
  }
}
