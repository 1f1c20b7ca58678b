// The serverless differ given a block listing that reaches past the end of the volume (a listing for
// another or a resized volume): the cycle fails with a ChangeMapError naming the disk and the block,
// it is aborted as the state machine aborts it, and nothing is published.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { AbortResult, CycleInput, CycleRef } from '../../functions/contracts.ts';
import type { EbsPorts } from '../../functions/shared/ebs-binding.ts';
import { DynamoStateStore } from '../../shared/aws/dynamo/state-store.ts';
import type { ChangePage } from '../../shared/engine/cycle/ports.ts';
import { ChangeMapError } from '../../shared/engine/errors.ts';
import {
  BLOCK,
  blockOf,
  deploy,
  differingBlocks,
  driveCycle,
  type Emulators,
  readSnapshot,
  sourceSnapshot,
  startEmulators,
} from './support/harness.ts';

let e: Emulators;

beforeAll(async () => {
  e = await startEmulators();
});
afterAll(async () => {
  await e?.stop();
});

/** The lister of `inner`, with `extra` block indexes appended to the last page of every listing. */
function listingPastTheEnd(inner: EbsPorts, extra: readonly number[]): EbsPorts {
  return {
    ...inner,
    lister: {
      async *listBlocks(req) {
        let held: ChangePage | undefined;
        for await (const page of inner.lister.listBlocks(req)) {
          if (held !== undefined) yield held;
          held = page;
        }
        if (held === undefined) return;
        yield { ...held, blocks: [...held.blocks, ...extra.map((index) => ({ index, token: 'token' }))] };
      },
    },
  };
}

describe('the differ with a listing past the end of the volume', () => {
  // 1 GiB holds blocks 0-2047: 2048 is the first past the end; 1907348632 is the block at 10^15.
  it.each([
    ['just past the end', 2048],
    ['far beyond the volume', Math.floor(10 ** 15 / BLOCK)],
  ])(
    'fails the cycle on a block %s, naming the disk and the block, and publishes nothing',
    async (_what, bad) => {
      // Prepare: a published full copy of a 1 GiB volume, then a real change to it.
      // Names of their own per case: the EBS emulator is shared, and target snapshots are named by them.
      const d = await deploy(e);
      const name = `vol-${bad}`;
      const set = `past-end-${bad}`;
      const base = new Map([
        [0, blockOf(1)],
        [7, blockOf(2)],
        [2047, blockOf(3)],
      ]);
      const src1 = await sourceSnapshot(e, base);
      const input: CycleInput = {
        plan: set,
        set,
        cycleId: 'c1',
        disks: [{ disk: name, sourceSnapshotId: src1, volumeSizeGiB: 1 }],
      };
      const first = await driveCycle(e, d, input);
      expect(first.final.status).toBe('published');
      const state = new DynamoStateStore(e.ddb.client, d.table);
      const good = await state.latestCheckpoint(set);
      const changed = new Map([[7, blockOf(9)]]);
      const src2 = await sourceSnapshot(e, changed, { parent: src1 });
      const inner = d.ports.current;
      d.ports.current = listingPastTheEnd(inner, [bad, bad + 1]);
      const second: CycleInput = {
        ...input,
        cycleId: 'c2',
        disks: [{ disk: name, sourceSnapshotId: src2, volumeSizeGiB: 1 }],
      };

      // Act
      const ref = (await d.planner({ action: 'prepare', cycle: second })) as CycleRef;
      const err = await d.differ(ref.disks[0]!).catch((x: unknown) => x);
      d.ports.current = inner;
      // The state machine treats ChangeMapError as permanent and goes straight to the abort.
      const aborted = (await d.finalizer({
        action: 'abort',
        cycle: ref,
        reason: (err as Error).message,
      })) as AbortResult;

      // Assess: the first bad block is named with the disk, its offset and the volume's size.
      expect(err).toBeInstanceOf(ChangeMapError);
      expect(err).toMatchObject({ name: 'ChangeMapError', disk: name, offset: bad * BLOCK });
      expect((err as Error).message).toContain(
        `change map of disk ${name}: listing of snapshot ${src2} returned block ${bad} at offset ${bad * BLOCK} with length ${BLOCK}, past the end of the disk (1 GiB: 1073741824 bytes, blocks 0 to 2047)`,
      );
      expect(aborted).toMatchObject({ status: 'aborted', currentCheckpointId: good!.id });
      expect((await state.listCheckpoints(set)).map((c) => c.id)).toEqual([good!.id]);
      expect(differingBlocks(await readSnapshot(e, good!.disks[0]!.target), base)).toEqual([]);

      // A cycle with the true listing then publishes the change over the last good checkpoint.
      const third = await driveCycle(e, d, { ...second, cycleId: 'c3' });
      expect(third.final).toMatchObject({ status: 'published', sequence: 2 });
      const cp = await state.latestCheckpoint(set);
      expect(cp?.parent).toBe(good!.id);
      expect(
        differingBlocks(await readSnapshot(e, cp!.disks[0]!.target), new Map([...base, ...changed])),
      ).toEqual([]);
    },
  );
});
