// A disk's completions read back against its descriptors before its snapshot is completed:
// duplicates deduplicated only when identical, every seq present, blocks inside their descriptor and
// ascending across the disk, all of them unless zero blocks could be skipped, and the LINEAR
// aggregate over the recorded block checksums in block order.
import { createHash } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { CycleFailedError } from '../../../shared/engine/cycle/errors.ts';
import type { CycleDiskRecord, PlannedDescriptor, WrittenBlock } from '../../../shared/engine/cycle/ports.ts';
import { missingCompletions, validateDisk } from '../../../shared/engine/cycle/validation.ts';
import { IntegrityError } from '../../../shared/engine/errors.ts';
import { MemoryCycleLedger } from '../../support/cycle-fakes.ts';

const BLOCK = 512 * 1024;
const sha = (tag: string) => createHash('sha256').update(tag).digest();
const written = (index: number, tag = `b${index}`): WrittenBlock => ({
  index,
  checksum: sha(tag).toString('base64'),
});

/** Descriptor `seq` over blocks [2 seq, 2 seq + 1] (1 MiB chunks of two blocks). */
function descriptor(seq: number): PlannedDescriptor {
  const offset = seq * 2 * BLOCK;
  return {
    seq,
    offset,
    length: 2 * BLOCK,
    bytes: 2 * BLOCK,
    extents: [{ offset, length: 2 * BLOCK }],
    tokens: ['t', 't'],
  };
}

async function disk(over: Partial<CycleDiskRecord> = {}, count = 4) {
  const ledger = new MemoryCycleLedger();
  const rec: CycleDiskRecord = {
    set: 's',
    disk: 'vol-a',
    cycleId: 'c',
    kind: 'incremental',
    state: 'finalizing',
    volumeSizeGiB: 1,
    sourceSnapshotId: 'snap-00000001',
    targetSnapshotId: 'snap-00000002',
    targetStartedAt: 0,
    chunkSize: 2 * BLOCK,
    perPage: 3,
    encrypted: false,
    diffDone: true,
    diffSeq: count,
    diffStartBlock: 0,
    diffBlocks: 2 * count,
    diffBytes: 2 * BLOCK * count,
    descriptors: count,
    ...over,
  };
  const all = Array.from({ length: count }, (_, i) => descriptor(i));
  for (let page = 0; page * rec.perPage < count; page++) {
    await ledger.putDescriptorPage(
      's',
      'vol-a',
      'c',
      page,
      all.slice(page * rec.perPage, (page + 1) * rec.perPage),
    );
  }
  return { ledger, rec };
}

const record = (
  ledger: MemoryCycleLedger,
  batch: string,
  entries: { seq: number; blocks: WrittenBlock[] }[],
) => ledger.recordCompletions('s', 'vol-a', 'c', batch, entries);

const both = (seq: number) => ({ seq, blocks: [written(2 * seq), written(2 * seq + 1)] });

describe('validateDisk', () => {
  it('deduplicates identical copies and computes the LINEAR aggregate in block order', async () => {
    const { ledger, rec } = await disk();
    await record(ledger, 'b2', [both(3), both(1)]);
    await record(ledger, 'b1', [both(0), both(1), both(2)]);

    const v = await validateDisk(ledger, rec);

    const expected = createHash('sha256');
    for (let i = 0; i < 8; i++) expected.update(sha(`b${i}`));
    expect(v).toMatchObject({ descriptors: 4, blocks: 8, bytes: 8 * BLOCK });
    expect(Buffer.from(v.aggregate).toString('hex')).toBe(expected.digest('hex'));
  });

  it('refuses two copies of a seq that disagree, naming disk, seq and block', async () => {
    const { ledger, rec } = await disk();
    await record(ledger, 'b1', [both(0), both(1), both(2), both(3)]);
    await record(ledger, 'b2', [{ seq: 2, blocks: [written(4), written(5, 'other')] }]);

    const err = await validateDisk(ledger, rec).catch((e: unknown) => e);

    expect(err).toBeInstanceOf(IntegrityError);
    expect((err as Error).message).toMatch(
      /disk vol-a seq 2 was recorded twice with different blocks: block 5/,
    );
    expect((err as IntegrityError).seq).toBe(2);
  });

  it('refuses a disk with a seq missing', async () => {
    const { ledger, rec } = await disk();
    await record(ledger, 'b1', [both(0), both(1), both(3)]);

    await expect(validateDisk(ledger, rec)).rejects.toThrow(/seq 2 \(offset 2097152\) has no completion/);
    await expect(missingCompletions(ledger, rec, 4, 10)).resolves.toEqual([2]);
  });

  it('refuses a block outside its descriptor and blocks out of order', async () => {
    const outside = await disk();
    await record(outside.ledger, 'b1', [
      both(0),
      { seq: 1, blocks: [written(2), written(4)] },
      both(2),
      both(3),
    ]);
    await expect(validateDisk(outside.ledger, outside.rec)).rejects.toThrow(
      /completion of seq 1 names block 4 outside it/,
    );

    const backwards = await disk();
    await record(backwards.ledger, 'b1', [
      both(0),
      { seq: 1, blocks: [written(3), written(2)] },
      both(2),
      both(3),
    ]);
    await expect(validateDisk(backwards.ledger, backwards.rec)).rejects.toThrow(
      /block 2 \(seq 1\) does not ascend/,
    );
  });

  it('takes fewer blocks than a descriptor holds only where zero blocks could be skipped', async () => {
    const short = [both(0), { seq: 1, blocks: [written(2)] }, both(2), both(3)];
    const incremental = await disk();
    await record(incremental.ledger, 'b1', short);
    const err = await validateDisk(incremental.ledger, incremental.rec).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(CycleFailedError);
    expect((err as Error).message).toMatch(/seq 1 recorded 1 of its 2 blocks/);

    const full = await disk({ kind: 'full' });
    await record(full.ledger, 'b1', short);
    await expect(validateDisk(full.ledger, full.rec)).resolves.toMatchObject({ blocks: 7 });

    const encrypted = await disk({ kind: 'full', encrypted: true });
    await record(encrypted.ledger, 'b1', short);
    await expect(validateDisk(encrypted.ledger, encrypted.rec)).rejects.toThrow(/recorded 1 of its 2 blocks/);
  });
});
