// Reads a snapshot back through the EBS direct APIs (ListSnapshotBlocks, GetSnapshotBlock with its
// checksum verified, through Ferry's EBS adapter) and compares it with the bytes it should hold.
import type { EbsDeps } from '../shared/aws/ebs/client.ts';
import { getSnapshotBlock, listSnapshotBlockPages } from '../shared/aws/ebs/reader.ts';
import { SNAPSHOT_BLOCK } from './ec2.ts';

export interface SnapshotComparison {
  readonly snapshotId: string;
  /** Blocks the snapshot holds data for (read and compared). */
  readonly blocksRead: number;
  /** Block indexes where the snapshot and the expected bytes differ, ascending (empty: bit-exact). */
  readonly differing: readonly number[];
}

const isZero = (b: Uint8Array): boolean => {
  for (let i = 0; i < b.length; i++) if (b[i] !== 0) return false;
  return true;
};

/**
 * Compares every block of `snapshotId` with `expected` (a volume image, a whole number of blocks): a
 * block the snapshot holds must equal the expected one, a block it lacks must be zeros there, and
 * nothing beyond the image may hold anything but zeros.
 */
export async function compareSnapshot(
  deps: EbsDeps,
  snapshotId: string,
  expected: Buffer,
): Promise<SnapshotComparison> {
  const blocks = Math.ceil(expected.length / SNAPSHOT_BLOCK);
  const expectedBlock = (i: number) => expected.subarray(i * SNAPSHOT_BLOCK, (i + 1) * SNAPSHOT_BLOCK);
  const seen = new Set<number>();
  const differing: number[] = [];
  for await (const page of listSnapshotBlockPages(deps, { snapshotId })) {
    for (const b of page.blocks) {
      const read = await getSnapshotBlock(deps, { snapshotId, blockIndex: b.index, blockToken: b.token });
      seen.add(b.index);
      const same =
        b.index < blocks ? Buffer.from(read.data).equals(expectedBlock(b.index)) : isZero(read.data);
      if (!same) differing.push(b.index);
    }
  }
  for (let i = 0; i < blocks; i++) if (!seen.has(i) && !isZero(expectedBlock(i))) differing.push(i);
  return { snapshotId, blocksRead: seen.size, differing: differing.sort((a, b) => a - b) };
}
