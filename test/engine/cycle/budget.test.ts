// The node budget across disks and cycles, and what a cycle costs in requests: two cycles of
// different plans share one node's budget without ever exceeding it (checked after every flow and
// budget write), a crashed cycle's reservation expires and its bytes come back, and a 64-chunk cycle
// in batches of 10 stays within 3 ledger+flow writes and 2 reads per chunk.
import { describe, expect, it } from 'vitest';
import { prepare } from '../../../shared/engine/cycle/prepare.ts';
import { tick } from '../../../shared/engine/cycle/tick.ts';
import { sameImage } from '../../support/cycle-fakes.ts';
import {
  blockOf,
  diffAll,
  driveAll,
  driveCycle,
  input,
  MiB,
  NODE,
  World,
} from '../../support/cycle-harness.ts';

function run(count: number, from = 0, tag = 0): Map<number, Uint8Array> {
  const m = new Map<number, Uint8Array>();
  for (let i = 0; i < count; i++) m.set(from + i, blockOf(tag + from + i));
  return m;
}

const params = { chunkSize: '1 MiB', window: '4 MiB', windowLevels: ['2 MiB', '4 MiB', '8 MiB'] };

describe('the node budget', () => {
  it('is shared by two cycles of different plans and never exceeded', async () => {
    // Prepare: four disks wanting 4 MiB each on a node of 6 MiB.
    const world = new World({ nodeBudget: 6 * MiB });
    const sources = { a1: run(80), a2: run(60, 500, 1), b1: run(70, 100, 2), b2: run(50, 900, 3) };
    const inA = input(world, 'ca', { a1: sources.a1, a2: sources.a2 }, params, {
      plan: 'plan-a',
      set: 'set-a',
    });
    const inB = input(world, 'cb', { b1: sources.b1, b2: sources.b2 }, params, {
      plan: 'plan-b',
      set: 'set-b',
    });
    const refA = await prepare(world.prepareDeps(), inA);
    const refB = await prepare(world.prepareDeps(), inB);
    await diffAll(world, refA);
    await diffAll(world, refB);

    // Act
    const [a, b] = await driveAll(world, [refA, refB], { parallel: 3 });

    // Assess: both published bit-exact, the budget held at every step and was used.
    for (const [result, disks] of [
      [a!, ['a1', 'a2']],
      [b!, ['b1', 'b2']],
    ] as const) {
      expect(result.finalized?.status).toBe('published');
      const cp = world.catalog.checkpoints.find((c) => c.set === result.ref.set)!;
      for (const disk of disks) {
        const d = cp.disks.find((x) => x.disk === disk)!;
        expect(sameImage(world.ebs.image(d.target), sources[disk])).toBeUndefined();
      }
    }
    expect(world.violations).toEqual([]);
    expect(world.peakInflight).toBeGreaterThan(4 * MiB);
    expect(world.peakInflight).toBeLessThanOrEqual(6 * MiB);
    expect(world.budget.live(NODE, world.clock.now()).size).toBe(0);
  });

  it("gives a crashed cycle's reservation back once it expires", async () => {
    // Prepare: cycle A reserves the whole node (two disks x 4 MiB on a 6 MiB node) and its planner
    // dies after one tick; its grants are lost with it.
    const world = new World({ nodeBudget: 6 * MiB, leaseMs: 30_000 });
    const inA = input(world, 'dead', { a1: run(40), a2: run(40, 100) }, params, {
      plan: 'plan-a',
      set: 'set-a',
    });
    const refA = await prepare(world.prepareDeps(), inA);
    await diffAll(world, refA);
    await tick(world.tickDeps(), refA);
    expect(world.budget.live(NODE, world.clock.now()).get('set-a/dead')).toBe(6 * MiB);
    world.queue.messages.splice(0);

    // Act: cycle B runs beside the dead one.
    const b1 = run(60, 300, 5);
    const reservations: number[] = [];
    const result = await driveCycle(
      world,
      input(world, 'alive', { b1 }, params, { plan: 'plan-b', set: 'set-b' }),
      {
        afterTick: () =>
          reservations.push(world.budget.live(NODE, world.clock.now()).get('set-b/alive') ?? 0),
      },
    );

    // Assess: B got nothing while A's reservation lived, its full share after, and published.
    expect(reservations[0]).toBe(0);
    expect(Math.max(...reservations)).toBe(4 * MiB);
    expect(result.finalized?.status).toBe('published');
    expect(world.violations).toEqual([]);
    // A's allowances lapsed with its reservation: nobody may grant on them any more.
    for (const { key, state } of world.flow.all()) {
      if (key.cycleId === 'dead') expect(state.allowanceUntil).toBeLessThanOrEqual(world.clock.now());
    }
  });
});

describe('the request budget', () => {
  it('costs at most 3 ledger+flow writes and 2 reads per chunk on a 64-chunk cycle in batches of 10', async () => {
    // Prepare: 64 chunks of 1 MiB, a window that lets a whole batch of 10 be in flight.
    const world = new World();
    const a = run(128);

    // Act
    const result = await driveCycle(
      world,
      input(
        world,
        'cost',
        { a },
        { chunkSize: '1 MiB', window: '16 MiB', windowLevels: ['8 MiB', '16 MiB'] },
      ),
      { batchSize: 10, parallel: 2 },
    );

    // Assess: everything the cycle did, prepare to publication, counted per chunk.
    expect(result.finalized?.status).toBe('published');
    const chunks = 64;
    const writes = world.ledger.calls.writes + world.flow.calls.writes;
    const reads = world.ledger.calls.reads + world.flow.calls.reads;
    expect(writes / chunks).toBeLessThanOrEqual(3);
    expect(reads / chunks).toBeLessThanOrEqual(2);
  });
});
