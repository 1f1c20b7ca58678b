// Deterministic changes to a local volume, for the demo and the tests: regions of data, scattered
// small writes (a fragmented change map), a block rewritten to zeros. Seeded, so a run repeats.
import { seededRandom } from '../shared/engine/random.ts';
import { SNAPSHOT_BLOCK } from './ec2.ts';

/** Fills `volume[offset, offset + length)` with seeded pseudo-random bytes. */
export function fillRegion(volume: Buffer, offset: number, length: number, seed: number): void {
  const random = seededRandom(seed);
  const end = Math.min(volume.length, offset + length);
  for (let i = offset; i + 4 <= end; i += 4) volume.writeUInt32LE(Math.floor(random() * 2 ** 32), i);
  for (let i = end - ((end - offset) % 4); i < end; i++) volume[i] = Math.floor(random() * 256);
}

/**
 * `count` writes of `size` bytes at seeded, `size`-aligned offsets anywhere in the volume: the
 * fragmented change map of a busy database. Returns the offsets written.
 */
export function scatterWrites(volume: Buffer, count: number, size: number, seed: number): number[] {
  const random = seededRandom(seed);
  const slots = Math.floor(volume.length / size);
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
