// A disk's aggregate is SHA-256 over its per-chunk digests in SEQUENCE order, whatever order the
// chunks complete in. The target here makes every fourth chunk slow (virtual time), so completions
// really are out of order; the expected aggregate is computed from the source data alone.
import { describe, expect, it } from 'vitest';
import { DEFAULT_PARAMS, type ReplicationParams } from '../../shared/engine/config.ts';
import { TransferError } from '../../shared/engine/errors.ts';
import { replicate } from '../../shared/engine/replicate.ts';
import { MiB } from '../../shared/engine/units.ts';
import { VirtualClock } from '../../shared/runtime/virtual-clock.ts';
import { MemorySource, MemoryStateStore, randomBytes } from '../support/memory.ts';
import {
  everyFourthSlow,
  expectedChunks,
  fragmentedExtents,
  inversions,
  seqOrderAggregate,
  VaryingLatencyTarget,
} from '../support/out-of-order.ts';

const BLOCK = 4096;
const params = (over: Partial<ReplicationParams> = {}): ReplicationParams => ({ ...DEFAULT_PARAMS, ...over });

describe('the disk aggregate under out-of-order completions', () => {
  it('is built over the chunk digests in sequence order, not completion order (full copy)', async () => {
    // Prepare: 20 MiB plus a ragged tail; every fourth chunk takes 40 ms, the rest 2 ms.
    const clock = new VirtualClock();
    const data = randomBytes(20 * MiB + 12_288, 21);
    const target = new VaryingLatencyTarget(clock, everyFourthSlow(40, 2), { blockSize: BLOCK });
    const expected = expectedChunks(data, [{ offset: 0, length: data.length }], {
      blockSize: BLOCK,
      chunkSize: MiB,
    });

    // Act
    const r = await replicate(
      {
        set: 's',
        disks: [{ id: 'd', source: new MemorySource(data), target, changed: undefined }],
        params: params({ adaptive: false }),
      },
      { clock, random: () => 0.5, state: new MemoryStateStore() },
    );

    // Assess: the writes finished out of order, yet every record of the aggregate is in seq order.
    expect(target.finished).toHaveLength(expected.length);
    expect(inversions(target.finished)).toBeGreaterThan(0);
    const aggregate = seqOrderAggregate(expected);
    expect(r.disks[0]!.aggregate).toEqual({ algorithm: 'ferry-chunk-sha256', value: aggregate });
    expect(r.checkpoint.disks[0]!.aggregate).toEqual({ algorithm: 'ferry-chunk-sha256', value: aggregate });
    expect(target.commitSummaries.map((s) => s.aggregateSha256)).toEqual([aggregate]);
    expect(r.disks[0]!.chunks).toBe(expected.length);
    expect(Buffer.from(target.image!).equals(Buffer.from(data))).toBe(true);
  });

  it('is in sequence order for a fragmented disk whose chunks carry many extents', async () => {
    // Prepare: allocated runs of varied length and gaps, so chunks differ in size and extent count.
    const clock = new VirtualClock();
    const data = randomBytes(24 * MiB, 22);
    const allocated = fragmentedExtents(data.length, 5);
    const target = new VaryingLatencyTarget(clock, everyFourthSlow(40, 2), { blockSize: BLOCK });
    const expected = expectedChunks(data, allocated, { blockSize: BLOCK, chunkSize: MiB });
    expect(new Set(expected.map((c) => c.bytes)).size).toBeGreaterThan(3);

    // Act
    const r = await replicate(
      {
        set: 's',
        disks: [
          { id: 'd', source: new MemorySource(data, 'mem:frag', allocated), target, changed: undefined },
        ],
        params: params({ adaptive: false, window: 8 * MiB }),
      },
      { clock, random: () => 0.5, state: new MemoryStateStore() },
    );

    // Assess
    expect(inversions(target.finished)).toBeGreaterThan(0);
    expect(r.disks[0]!.aggregate.value).toBe(seqOrderAggregate(expected));
    expect(target.commitSummaries[0]!.aggregateSha256).toBe(seqOrderAggregate(expected));
  });

  it('is in sequence order after a resume, when both runs completed chunks out of order', async () => {
    // Prepare: the first run dies for good after 12 writes; progress is saved every MiB.
    const clock = new VirtualClock();
    const state = new MemoryStateStore();
    const data = randomBytes(16 * MiB, 23);
    const p = params({ adaptive: false, window: 6 * MiB, checkpointInterval: MiB });
    const expected = expectedChunks(data, [{ offset: 0, length: data.length }], {
      blockSize: BLOCK,
      chunkSize: MiB,
    });
    // The node loses power after 12 writes; it comes back (same target, staged chunks kept) for the rerun.
    let powered = true;
    let writes = 0;
    const target = new VaryingLatencyTarget(clock, everyFourthSlow(40, 2), {
      blockSize: BLOCK,
      beforeWrite: () => {
        if (powered && ++writes > 12) throw new TransferError('node lost power', { retryable: false });
      },
    });
    const job = {
      set: 's',
      disks: [{ id: 'd', source: new MemorySource(data), target, changed: undefined }],
      params: p,
    };
    await expect(replicate(job, { clock, random: () => 0.5, state })).rejects.toThrow(/node lost power/);
    const saved = await state.loadProgress('s', 'd');
    expect(saved!.watermark).toBeGreaterThan(0);
    expect(saved!.watermark).toBeLessThan(expected.length);
    const firstRun = target.finished.length;

    // Act: the rerun, with its own out-of-order completions above the saved watermark.
    powered = false;
    const r = await replicate(job, { clock, random: () => 0.5, state });

    // Assess: both runs finished writes out of order; the aggregate is the seq-order one.
    expect(inversions(target.finished.slice(0, firstRun))).toBeGreaterThan(0);
    expect(inversions(target.finished.slice(firstRun))).toBeGreaterThan(0);
    expect(r.disks[0]!.resumedBytes).toBe(saved!.bytesDone);
    expect(r.disks[0]!.aggregate.value).toBe(seqOrderAggregate(expected));
    expect(target.commitSummaries.map((c) => c.aggregateSha256)).toEqual([seqOrderAggregate(expected)]);
    expect(Buffer.from(target.image!).equals(Buffer.from(data))).toBe(true);
  });
});
