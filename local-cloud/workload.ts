// Deterministic changes to a local volume, for the demo and the tests: regions of data, scattered
// small writes (a fragmented change map), a block rewritten to zeros. Seeded, so a run repeats. The
// `ferry local-cloud` workload is built from them at a size: the small one the demo and the tests
// run, or a larger one whose cycles are big enough for their costs per GiB to mean something.

import { seededRandom } from '../shared/engine/random.ts';
import { MiB } from '../shared/engine/units.ts';
import { SNAPSHOT_BLOCK } from './ec2.ts';

/** Fills `volume[offset, offset + length)` with seeded pseudo-random bytes. */
export function fillRegion(volume: Buffer, offset: number, length: number, seed: number): void {
  const random = seededRandom(seed);
  const end = Math.min(volume.length, offset + length);
  for (let i = offset; i + 4 <= end; i += 4) volume.writeUInt32LE(Math.floor(random() * 2 ** 32), i);
  for (let i = end - ((end - offset) % 4); i < end; i++) volume[i] = Math.floor(random() * 256);
}

/**
 * `count` writes of `size` bytes at seeded, `size`-aligned offsets within the first `within` bytes of
 * the volume (all of it by default): the fragmented change map of a busy database. Returns the
 * offsets written.
 */
export function scatterWrites(
  volume: Buffer,
  count: number,
  size: number,
  seed: number,
  within: number = volume.length,
): number[] {
  const random = seededRandom(seed);
  const slots = Math.floor(Math.min(within, volume.length) / size);
  const offsets: number[] = [];
  for (let k = 0; k < count; k++) {
    const offset = Math.floor(random() * slots) * size;
    fillRegion(volume, offset, size, seed * 7919 + k);
    offsets.push(offset);
  }
  return offsets;
}

/** Rewrites block `index` with zeros (a changed block whose new contents are all zero). */
export function zeroBlock(volume: Buffer, index: number): void {
  volume.fill(0, index * SNAPSHOT_BLOCK, (index + 1) * SNAPSHOT_BLOCK);
}

/** Index of the first block that is not all zeros, at or after `from`. */
export function firstDataBlock(volume: Buffer, from = 0): number | undefined {
  for (let i = from; i * SNAPSHOT_BLOCK < volume.length; i++) {
    const b = volume.subarray(i * SNAPSHOT_BLOCK, (i + 1) * SNAPSHOT_BLOCK);
    if (b.some((x) => x !== 0)) return i;
  }
  return undefined;
}

// ---- the `ferry local-cloud` workload ----------------------------------------------------------

/**
 * How big the workload is, as multiples of the small one: its volumes and full-cycle changes grow
 * by `fullScale`, its incremental changes by `incrementalScale`. Scattered writes grow with the area
 * they land in, so the change map stays as fragmented (the same writes per block) at any size.
 */
export interface WorkloadSize {
  readonly name: string;
  readonly fullScale: number;
  readonly incrementalScale: number;
}

export const WORKLOAD_SIZES = Object.freeze({
  // Two disks of 48 and 96 MiB: about 88 MiB changed in the full cycle, 100 MiB per incremental. Runs
  // in seconds: the tests and the demo.
  small: { name: 'small', fullScale: 1, incrementalScale: 1 },
  // Two disks of 576 MiB and 1.1 GiB: about 1 GiB changed in the full cycle and 250 MiB per
  // incremental, so a cycle's fixed Step Functions transitions are spread over as many GiB as a
  // modest real cycle, and a measurement still fits in memory and takes minutes, not hours.
  large: { name: 'large', fullScale: 12, incrementalScale: 2.5 },
} satisfies Record<string, WorkloadSize>);

export type WorkloadSizeName = keyof typeof WORKLOAD_SIZES;

/** The small workload's disks; each grows with the larger of the two scales. */
const SMALL_DISKS = [
  { disk: 'root', size: 48 * MiB },
  { disk: 'data', size: 96 * MiB },
] as const;

/** `bytes` × `scale`, rounded to the 4 KiB a write is aligned to. */
const scaled = (bytes: number, scale: number): number => Math.round((bytes * scale) / 4096) * 4096;
const times = (n: number, scale: number): number => Math.max(1, Math.round(n * scale));

/** The workload's disks at `size`: whole MiB, so whole 512 KiB blocks. */
export function workloadDisks(size: WorkloadSize): { disk: string; size: number }[] {
  const scale = Math.max(size.fullScale, size.incrementalScale);
  return SMALL_DISKS.map((d) => ({ disk: d.disk, size: Math.ceil((d.size * scale) / MiB) * MiB }));
}

/**
 * Changes the volumes for cycle `n` (0: the full cycle): data regions and scattered 64 KiB writes
 * before the full one; before each incremental, scattered small writes (4 KiB on root, 16 KiB on data)
 * in each disk's hot area, a region of data rewritten and a block zeroed. At the small size this is
 * exactly the workload `ferry local-cloud` has always run.
 */
export function changeVolumes(volume: (disk: string) => Buffer, size: WorkloadSize, n: number): void {
  if (n === 0) {
    const f = size.fullScale;
    fillRegion(volume('root'), 0, scaled(12 * MiB, f), 1);
    fillRegion(volume('data'), scaled(8 * MiB, f), scaled(32 * MiB, f), 2);
    scatterWrites(volume('data'), times(200, f), 64 * 1024, 3);
    return;
  }
  // The hot areas: as large as the small workload's disks, times the incremental scale.
  const i = size.incrementalScale;
  scatterWrites(volume('root'), times(300, i), 4096, 10 + n, scaled(48 * MiB, i));
  scatterWrites(volume('data'), times(150, i), 16 * 1024, 20 + n, scaled(96 * MiB, i));
  fillRegion(volume('data'), scaled((50 + n * 4) * MiB, i), scaled(4 * MiB, i), 30 + n);
  zeroBlock(volume('data'), 20 + n);
}
