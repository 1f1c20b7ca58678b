// The cycle's steps one by one on the memory fakes: prepare (idempotent, refusing an overlapping
// cycle or a cycle id that already ran), the differ (resumable, refusing a listing past the volume
// or of another size), and the tick's own judgements (a lost plan lock, a descriptor that used up its
// grants, seqs the ledger lacks written again).
import { describe, expect, it } from 'vitest';
import { runDiffer } from '../../../shared/engine/cycle/differ.ts';
import { CycleStateError, PlanBusyError } from '../../../shared/engine/cycle/errors.ts';
import { finalize } from '../../../shared/engine/cycle/finalize.ts';
import { MAX_GRANT_ATTEMPTS } from '../../../shared/engine/cycle/grant-plan.ts';
import { prepare } from '../../../shared/engine/cycle/prepare.ts';
import { tick } from '../../../shared/engine/cycle/tick.ts';
import type { CycleInput } from '../../../shared/engine/cycle/types.ts';
import { ChangeMapError } from '../../../shared/engine/errors.ts';
import { sameImage } from '../../support/cycle-fakes.ts';
import {
  BLOCK,
  blockOf,
  diffAll,
  driveCycle,
  input,
  World,
  writeRound,
} from '../../support/cycle-harness.ts';

function run(count: number, from = 0): Map<number, Uint8Array> {
  const m = new Map<number, Uint8Array>();
  for (let i = 0; i < count; i++) m.set(from + i, blockOf(from + i));
  return m;
}

describe('prepare', () => {
  it('is idempotent for one cycle id', async () => {
    const world = new World();
    const cycle = input(world, 'c1', { a: run(8), b: run(4) });

    const first = await prepare(world.prepareDeps(), cycle);
    const again = await prepare(world.prepareDeps(), cycle);

    expect(again).toEqual(first);
    expect(world.ebs.targets.size).toBe(2);
    expect(world.catalog.jobs.size).toBe(1);
    expect(world.flow.all()).toHaveLength(2);
    const target = [...world.ebs.targets.values()][0]!;
    expect(target.tags).toMatchObject({
      'ferry:stack': 'test',
      'ferry:role': 'target',
      'ferry:set': 'set-a',
      'ferry:cycle': 'c1',
    });
    // No allowance before the first tick has reserved node budget.
    expect(world.flow.all().every((f) => f.state.allowance === 0 && f.state.window === 4 * 1024 * 1024)).toBe(
      true,
    );
  });

  it('refuses a second cycle of the same plan while the first holds the lock', async () => {
    const world = new World();
    await prepare(world.prepareDeps(), input(world, 'c1', { a: run(2) }));

    const err = await prepare(world.prepareDeps(), input(world, 'c2', { a: run(2) })).catch(
      (e: unknown) => e,
    );

    expect(err).toBeInstanceOf(PlanBusyError);
    expect((err as PlanBusyError).holder).toBe('cycle:c1');
    expect((err as Error).message).toMatch(
      /plan plan-a is busy: its lock is held by cycle:c1 until 2026-01-01T01:00:00.000Z/,
    );
  });

  it('refuses a cycle id that already ran', async () => {
    const world = new World();
    const a = run(4);
    const cycle = input(world, 'c1', { a });
    await driveCycle(world, cycle);

    await expect(prepare(world.prepareDeps(), cycle)).rejects.toThrow(
      /cycle c1 of set set-a already ran \(job published\)/,
    );
  });
});

describe("a set's first cycle from a shared checkpoint (failback)", () => {
  // The forward set's checkpoint, then a reverse set whose disk starts from it. On EBS the base is
  // the checkpoint's target snapshot (the recovered volume was created from it) and the parent is its
  // source snapshot (the original side); the fake keeps sources and targets apart, so here the base
  // is the source and the parent the target: both hold the checkpoint's data, which is what counts.
  async function forward() {
    const world = new World();
    const blocks = run(8);
    const done = await driveCycle(world, input(world, 'c1', { a: blocks }));
    const checkpoint = (await world.catalog.latestCheckpoint('set-a'))!;
    expect(done.finalized?.status).toBe('published');
    const disk = checkpoint.disks[0]!;
    return { world, blocks, checkpoint, base: { source: disk.source, target: disk.target } };
  }

  it('is incremental: only the blocks that differ from the base are written, and the image is exact', async () => {
    // Prepare: the recovered side changed blocks 2 and 5 and wrote block 9.
    const { world, blocks, checkpoint, base } = await forward();
    const recovered = new Map(blocks);
    recovered.set(2, blockOf(102));
    recovered.set(5, blockOf(105));
    recovered.set(9, blockOf(109));
    const reverse: CycleInput = {
      ...input(world, 'r1', { a: recovered }, undefined, { plan: 'plan-a-failback', set: 'set-a-failback' }),
      base: {
        checkpointId: checkpoint.id,
        disks: [{ disk: 'a', previousSourceSnapshotId: base.source, parentTargetSnapshotId: base.target }],
      },
    };
    const putsBefore = world.ebs.puts;

    // Act
    const done = await driveCycle(world, reverse);

    // Assess
    expect(done.finalized?.status).toBe('published');
    const published = (await world.catalog.latestCheckpoint('set-a-failback'))!;
    expect(published.disks[0]).toMatchObject({ disk: 'a', kind: 'incremental', bytes: 3 * BLOCK });
    expect(published.parent).toBeUndefined();
    const target = world.ebs.target(published.disks[0]!.target);
    expect(target.parent).toBe(base.target);
    expect([...target.written.keys()].sort((x, y) => x - y)).toEqual([2, 5, 9]);
    expect(world.ebs.puts - putsBefore).toBeLessThanOrEqual(3);
    expect(sameImage(world.ebs.image(target.id), recovered)).toBeUndefined();
  });

  it('copies a disk the base does not name in full, and refuses a base once the set has a checkpoint', async () => {
    // Prepare
    const { world, checkpoint, base } = await forward();
    const names = { plan: 'plan-a-failback', set: 'set-a-failback' };
    const baseOfA = {
      checkpointId: checkpoint.id,
      disks: [{ disk: 'a', previousSourceSnapshotId: base.source, parentTargetSnapshotId: base.target }],
    };
    const first: CycleInput = {
      ...input(world, 'r1', { a: run(8), b: run(3) }, undefined, names),
      base: baseOfA,
    };

    // Act
    await driveCycle(world, first);
    const jobs = world.catalog.jobs.size;
    const again = await prepare(world.prepareDeps(), {
      ...input(world, 'r2', { a: run(8) }, undefined, names),
      base: baseOfA,
    }).catch((e: unknown) => e);

    // Assess
    const published = (await world.catalog.latestCheckpoint('set-a-failback'))!;
    expect(published.disks.map((d) => [d.disk, d.kind])).toEqual([
      ['a', 'incremental'],
      ['b', 'full'],
    ]);
    expect(again).toBeInstanceOf(CycleStateError);
    expect((again as Error).message).toBe(
      `set set-a-failback has checkpoint ${published.id} already: a base (checkpoint ${checkpoint.id}) is only for a set's first cycle`,
    );
    // Refused before the lock and the job: nothing left behind, the next cycle of the plan goes ahead.
    expect(world.catalog.jobs.size).toBe(jobs);
    await expect(
      prepare(world.prepareDeps(), input(world, 'r3', { a: run(8) }, undefined, names)),
    ).resolves.toMatchObject({ cycleId: 'r3' });
  });
});

describe('the differ', () => {
  it('resumes where it stopped before its deadline and cuts the same descriptors', async () => {
    // Prepare: the same disk diffed in one go and in invocations that stop after every page.
    const blocks = new Map([...run(30), ...run(20, 400), ...run(5, 1500)]);
    const once = new World({ maxDescriptorsPerPage: 4, snapshots: { listPageBlocks: 3 } });
    const refOnce = await prepare(once.prepareDeps(), input(once, 'c1', { a: blocks }));
    await diffAll(once, refOnce);
    const parts = new World({ maxDescriptorsPerPage: 4, snapshots: { listPageBlocks: 3 } });
    const refParts = await prepare(parts.prepareDeps(), input(parts, 'c1', { a: blocks }));

    // Act: no time left after the first stored page, every time.
    let calls = 0;
    for (;;) {
      calls++;
      const r = await runDiffer(
        parts.differDeps(() => 0),
        refParts.disks[0]!,
      );
      if (r.done) break;
    }

    // Assess
    expect(calls).toBeGreaterThan(3);
    const pages = (w: World) => [...w.ledger.pages.values()].flat().map(({ tokens: _, ...d }) => d);
    expect(pages(parts)).toEqual(pages(once));
    const rec = [...parts.ledger.disks.values()][0]!;
    expect(rec).toMatchObject({ diffDone: true, descriptors: 28, diffBlocks: 55, diffBytes: 55 * BLOCK });
  });

  it('refuses a listed block past the end of the volume', async () => {
    const world = new World();
    // A 1 GiB volume has blocks 0 to 2047.
    const ref = await prepare(world.prepareDeps(), input(world, 'c1', { a: new Map([[2048, blockOf(1)]]) }));

    const err = await runDiffer(world.differDeps(), ref.disks[0]!).catch((e: unknown) => e);

    expect(err).toBeInstanceOf(ChangeMapError);
    expect((err as Error).message).toMatch(
      /change map of disk a: listing of snapshot snap-\w+ returned block 2048 at offset 1073741824 with length 524288, past the end of the disk \(1 GiB: 1073741824 bytes, blocks 0 to 2047\)/,
    );
  });

  it('refuses a source snapshot of another size than the cycle was prepared for', async () => {
    const world = new World();
    const source = world.ebs.source(run(2), 2);
    const ref = await prepare(world.prepareDeps(), {
      plan: 'p',
      set: 's',
      cycleId: 'c1',
      disks: [{ disk: 'a', sourceSnapshotId: source, volumeSizeGiB: 1 }],
    });

    await expect(runDiffer(world.differDeps(), ref.disks[0]!)).rejects.toThrow(
      /is 2 GiB, but the cycle was prepared for 1 GiB/,
    );
  });

  it('refuses a disk that was never prepared', async () => {
    const world = new World();
    await expect(runDiffer(world.differDeps(), { set: 's', cycleId: 'c', disk: 'x' })).rejects.toBeInstanceOf(
      CycleStateError,
    );
  });
});

describe('the tick', () => {
  it('echoes the round it is given, and only that: the state machine counts its ticks with it', async () => {
    const world = new World();
    const ref = await prepare(world.prepareDeps(), input(world, 'c1', { a: run(4) }));
    await diffAll(world, ref);

    const counted = await tick(world.tickDeps(), ref, 7);
    const uncounted = await tick(world.tickDeps(), ref);

    expect(counted.round).toBe(7);
    expect(uncounted).not.toHaveProperty('round');
    expect(counted.status).toBe(uncounted.status);
  });

  it('fails the cycle when its plan lock was taken over', async () => {
    const world = new World();
    const ref = await prepare(world.prepareDeps(), input(world, 'c1', { a: run(4) }));
    await diffAll(world, ref);
    world.locks.locks.set('plan-a', {
      plan: 'plan-a',
      owner: 'cycle:other',
      lockExpiresAt: Number.MAX_SAFE_INTEGER,
    });

    const t = await tick(world.tickDeps(), ref);

    expect(t.status).toBe('failed');
    expect(t.reason).toMatch(/lock is no longer held by cycle:c1/);
    expect(world.ledger.cycle('set-a', 'c1')?.failure).toBe(t.reason);
  });

  it('fails the cycle when a descriptor is granted MAX_GRANT_ATTEMPTS times and never completes', async () => {
    // Prepare: every grant of seq 3 is lost before a writer sees it.
    const world = new World({ leaseMs: 10_000 });
    const drop = () => {
      const at = world.queue.messages.findIndex(
        (m) => (JSON.parse(m.body) as { descriptor: { seq: number } }).descriptor.seq === 3,
      );
      if (at >= 0) world.queue.messages.splice(at, 1);
    };
    const origSend = world.queue.send.bind(world.queue);
    world.queue.send = async (grants) => {
      const out = await origSend(grants);
      drop();
      return out;
    };

    const result = await driveCycle(world, input(world, 'c1', { a: run(16) }), { maxTicks: 2000 });

    expect(result.aborted).toBe(
      `descriptor seq 3 of disk a was granted ${MAX_GRANT_ATTEMPTS} times and never completed`,
    );
    expect(world.catalog.checkpoints).toEqual([]);
  });

  it('writes again a seq the flow counts complete but the ledger has no completion of', async () => {
    // Prepare: run a cycle until every seq is counted, then lose one seq's completion record.
    const world = new World();
    const a = run(12);
    const ref = await prepare(world.prepareDeps(), input(world, 'c1', { a }));
    await diffAll(world, ref);
    const warm = world.container();
    for (let i = 0; i < 50; i++) {
      const f = world.flow.all()[0]!.state;
      if (f.completedCount === 6) break;
      await tick(world.tickDeps(), ref);
      await writeRound(world, {}, warm);
      await world.clock.sleep(1000);
    }
    for (const batches of world.ledger.completions.values()) {
      for (const [id, entries] of batches)
        batches.set(
          id,
          entries.filter((e) => e.seq !== 4),
        );
    }

    // Act: the tick finds seq 4 missing and sends it again; a writer writes it.
    const found = await tick(world.tickDeps(), ref);
    await writeRound(world, {}, warm);
    const confirmed = await tick(world.tickDeps(), ref);
    const published = await finalize(world.finalizeDeps(), ref);

    // Assess
    expect(found.status).toBe('running');
    expect(confirmed.status).toBe('done');
    expect(published.status).toBe('published');
    const cp = world.catalog.checkpoints[0]!;
    expect(sameImage(world.ebs.image(cp.disks[0]!.target), a)).toBeUndefined();
    expect(world.flow.all()[0]!.state.completedCount).toBe(6);
  });
});
