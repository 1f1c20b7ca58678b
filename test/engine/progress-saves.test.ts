// Every durable progress save records exactly what is below its watermark: the bytes of the
// descriptors with seq < watermark and, appended, the digests of seqs [previous watermark, watermark).
// A target with chunk-dependent latency (virtual time) makes completions arrive out of order, so chunks
// above an unfinished one are complete when saves are taken; none of them may be counted.
import { describe, expect, it } from 'vitest';
import { resolveParams } from '../../shared/engine/config.ts';
import type { Descriptor } from '../../shared/engine/descriptors.ts';
import { TransferError } from '../../shared/engine/errors.ts';
import type { Extent } from '../../shared/engine/extents.ts';
import { type DiskJob, replicate } from '../../shared/engine/replicate.ts';
import { KiB, MiB } from '../../shared/engine/units.ts';
import { VirtualClock } from '../../shared/runtime/virtual-clock.ts';
import { MemorySource, randomBytes } from '../support/memory.ts';
import {
  bytesBelow,
  type ExpectedChunk,
  expectedChunks,
  fragmentedExtents,
  inversions,
  type RecordedSave,
  RecordingStateStore,
  VaryingLatencyTarget,
} from '../support/out-of-order.ts';

const BLOCK = 4096;
/** Parameters as an operator's settings resolve them: a checkpoint interval is at least one chunk. */
const params = (settings: Record<string, unknown>) => resolveParams(settings, { targetBlockSize: BLOCK });

/** Latency that varies by chunk and is not periodic: 1 to 37 ms, every seventh chunk 60 ms. */
const jagged = (d: Descriptor): number => (d.seq % 7 === 3 ? 60 : 1 + ((d.seq * 13) % 37));

/**
 * Checks one disk's saves, in the order they were made, against the chunks expected from the source:
 * exact bytes below the watermark, exactly the digests of [previous watermark, watermark), and a
 * watermark that never goes back. `from` is the watermark the run started at (a resume point).
 */
function expectExactSaves(saves: readonly RecordedSave[], chunks: readonly ExpectedChunk[], from = 0) {
  let previous = from;
  for (const [i, save] of saves.entries()) {
    const { watermark, bytesDone } = save.progress;
    const where = `save ${i} (watermark ${watermark}, previous ${previous})`;
    expect(watermark, where).toBeGreaterThanOrEqual(previous);
    expect(watermark, where).toBeLessThanOrEqual(chunks.length);
    expect(bytesDone, where).toBe(bytesBelow(chunks, watermark));
    expect(save.appended, where).toEqual(chunks.slice(previous, watermark).map((c) => c.digest));
    previous = watermark;
  }
}

/** Saves taken while some chunk above the save's watermark had already been written. */
function savesWithCompletionsAbove(saves: readonly RecordedSave[]): number {
  return saves.filter((s) => (s.context as number[]).some((seq) => seq >= s.progress.watermark)).length;
}

describe('durable progress saves under out-of-order completions', () => {
  it('record exactly the bytes and digests below the watermark, at every save (fragmented full copy)', async () => {
    // Prepare: varied chunk sizes (fragmented allocation), jagged latency, a save due every 512 KiB.
    const clock = new VirtualClock();
    const data = randomBytes(32 * MiB, 31);
    const allocated = fragmentedExtents(data.length, 9);
    const target = new VaryingLatencyTarget(clock, jagged, { blockSize: BLOCK });
    // Each save records which writes had finished when it was taken.
    const state = new RecordingStateStore(() => [...target.finished]);
    const chunks = expectedChunks(data, allocated, { blockSize: BLOCK, chunkSize: 256 * KiB });
    expect(new Set(chunks.map((c) => c.bytes)).size).toBeGreaterThan(3);

    // Act
    await replicate(
      {
        set: 's',
        disks: [
          { id: 'd', source: new MemorySource(data, 'mem:frag', allocated), target, changed: undefined },
        ],
        params: params({
          chunkSize: '256 KiB',
          window: '2 MiB',
          checkpointInterval: '256 KiB',
          adaptive: false,
        }),
      },
      { clock, random: () => 0.5, state },
    );

    // Assess: out of order for real, many saves, some taken with chunks done above the watermark.
    expect(inversions(target.finished)).toBeGreaterThan(0);
    expect(state.recorded.length).toBeGreaterThan(5);
    expect(savesWithCompletionsAbove(state.recorded)).toBeGreaterThan(0);
    expectExactSaves(state.recorded, chunks);
    expect(state.recorded.at(-1)!.progress.watermark).toBe(chunks.length);
  });

  it('keeps two disks apart, each save exact for its own disk (incremental, sparse change map)', async () => {
    // Prepare: two disks, each with a base image and a scattered change map of odd-sized extents.
    const clock = new VirtualClock();
    const targets = new Map<string, VaryingLatencyTarget>();
    const state = new RecordingStateStore((disk) => [...(targets.get(disk)?.finished ?? [])]);
    const disks: DiskJob[] = [];
    const expected = new Map<string, ExpectedChunk[]>();
    for (const [i, id] of ['a', 'b'].entries()) {
      const data = randomBytes(16 * MiB, 40 + i);
      const changed: Extent[] = [];
      for (let k = 0; k < 300; k++) {
        // Inside the disk (the last 4 blocks are never a start), so no extent reaches past its end.
        const offset = ((k * 7919 + i * 104_729) % (16 * 256 - 4)) * BLOCK + (k % 3) * 100;
        changed.push({ offset, length: 2000 + ((k * 31) % 9000) });
      }
      const target = new VaryingLatencyTarget(clock, (d) => jagged(d) + i * 3, {
        blockSize: BLOCK,
        name: `mem:${id}`,
      });
      target.image = new Uint8Array(data.length); // the base the increment applies to
      targets.set(id, target);
      disks.push({ id, source: new MemorySource(data), target, changed });
      expected.set(id, expectedChunks(data, changed, { blockSize: BLOCK, chunkSize: 128 * KiB }));
    }

    // Act
    await replicate(
      {
        set: 's',
        disks,
        params: params({
          chunkSize: '128 KiB',
          window: '1 MiB',
          checkpointInterval: '128 KiB',
          adaptive: false,
        }),
      },
      { clock, random: () => 0.5, state },
    );

    // Assess
    for (const id of ['a', 'b']) {
      const saves = state.recorded.filter((s) => s.disk === id);
      expect(inversions(targets.get(id)!.finished)).toBeGreaterThan(0);
      expect(saves.length).toBeGreaterThan(3);
      expect(savesWithCompletionsAbove(saves)).toBeGreaterThan(0);
      expectExactSaves(saves, expected.get(id)!);
    }
  });

  it('stays exact across a failure and the resumed run that follows it', async () => {
    // Prepare: the first run dies for good after 20 writes, with chunks done above its watermark.
    const clock = new VirtualClock();
    const data = randomBytes(24 * MiB, 33);
    const chunks = expectedChunks(data, [{ offset: 0, length: data.length }], {
      blockSize: BLOCK,
      chunkSize: MiB,
    });
    // The node loses power after 20 writes; it comes back (same target, staged chunks kept) for the rerun.
    let powered = true;
    let writes = 0;
    const target = new VaryingLatencyTarget(clock, jagged, {
      blockSize: BLOCK,
      beforeWrite: () => {
        if (powered && ++writes > 20) throw new TransferError('node lost power', { retryable: false });
      },
    });
    const state = new RecordingStateStore(() => [...target.finished]);
    const job = {
      set: 's',
      disks: [{ id: 'd', source: new MemorySource(data), target, changed: undefined }],
      params: params({ chunkSize: '1 MiB', window: '8 MiB', checkpointInterval: '1 MiB', adaptive: false }),
    };
    const ports = { clock, random: () => 0.5, state };
    await expect(replicate(job, ports)).rejects.toThrow(/node lost power/);
    const failedRun = state.recorded.length;
    const resumeFrom = state.recorded.at(-1)!.progress.watermark;
    expect(resumeFrom).toBeGreaterThan(0);
    expect(resumeFrom).toBeLessThan(chunks.length);

    // Act: the rerun resumes from the last save.
    powered = false;
    const r = await replicate(job, ports);

    // Assess: the failed run's saves (the last taken after the failure) and the resumed run's saves.
    expect(savesWithCompletionsAbove(state.recorded.slice(0, failedRun))).toBeGreaterThan(0);
    expectExactSaves(state.recorded.slice(0, failedRun), chunks);
    expectExactSaves(state.recorded.slice(failedRun), chunks, resumeFrom);
    expect(r.disks[0]!.resumedBytes).toBe(bytesBelow(chunks, resumeFrom));
    expect(Buffer.from(target.image!).equals(Buffer.from(data))).toBe(true);
  });
});
