// A protection plan of two disks replicated by the serverless cycle logic on the memory fakes: a
// full cycle, then an incremental one; each published checkpoint's target snapshots read back equal
// to the sources, block for block, and the node budget held at every step.
import { describe, expect, it } from 'vitest';
import { CHECKPOINT_PUBLISHED } from '../../../shared/engine/cycle/finalize.ts';
import { sameImage } from '../../support/cycle-fakes.ts';
import { BLOCK, blockOf, driveCycle, input, World } from '../../support/cycle-harness.ts';

/** A fragmented disk: runs of changed blocks, single blocks, a zero block, spread over 1 GiB. */
function diskA(): Map<number, Uint8Array> {
  const m = new Map<number, Uint8Array>();
  for (const i of [0, 1, 2, 3, 4, 5]) m.set(i, blockOf(100 + i));
  for (const i of [100, 101, 300, 301, 302, 777]) m.set(i, blockOf(100 + i));
  for (let i = 1000; i < 1020; i++) m.set(i, blockOf(100 + i));
  m.set(1500, new Uint8Array(BLOCK)); // written as zeros: a full copy may skip it
  for (let i = 2000; i < 2048; i += 3) m.set(i, blockOf(100 + i));
  return m;
}

function diskB(): Map<number, Uint8Array> {
  const m = new Map<number, Uint8Array>();
  for (let i = 10; i < 40; i++) m.set(i, blockOf(5000 + i));
  for (const i of [512, 513, 514, 1024, 2047]) m.set(i, blockOf(5000 + i));
  return m;
}

function applied(base: Map<number, Uint8Array>, changes: Map<number, Uint8Array>): Map<number, Uint8Array> {
  const out = new Map(base);
  for (const [i, b] of changes) out.set(i, b);
  return out;
}

describe('a serverless cycle on the memory fakes, full then incremental', () => {
  it('publishes checkpoints whose target snapshots equal the sources block for block', async () => {
    // Prepare: small pages and List pages, so the differ pages and the writers cross pages.
    const world = new World({ maxDescriptorsPerPage: 8, snapshots: { listPageBlocks: 7 } });
    const a1 = diskA();
    const b1 = diskB();

    // Act: the full cycle.
    const full = await driveCycle(world, input(world, 'c1', { 'vol-a': a1, 'vol-b': b1 }));

    // Assess
    expect(full.finalized?.status).toBe('published');
    const cp1 = world.catalog.checkpoints.at(-1)!;
    expect(cp1.sequence).toBe(1);
    expect(cp1.disks.map((d) => d.kind)).toEqual(['full', 'full']);
    for (const [disk, source] of [
      ['vol-a', a1],
      ['vol-b', b1],
    ] as const) {
      const d = cp1.disks.find((x) => x.disk === disk)!;
      expect(sameImage(world.ebs.image(d.target), source)).toBeUndefined();
      expect(d.aggregate.algorithm).toBe('ebs-linear-sha256');
      expect(world.ebs.target(d.target).status).toBe('completed');
    }
    // The zero block of a full copy was skipped.
    expect(world.ebs.target(cp1.disks[0]!.target).written.has(1500)).toBe(false);
    expect(world.violations).toEqual([]);
    expect(world.events.events.map((e) => e.detailType)).toEqual([CHECKPOINT_PUBLISHED]);
    for (const { state } of world.flow.all()) expect(state.grantedBytes - state.completedBytes).toBe(0);

    // Act: an incremental cycle over a changed disk A (a block zeroed, new blocks) and unchanged B.
    const changes = new Map<number, Uint8Array>([
      [3, blockOf(9003)],
      [101, new Uint8Array(BLOCK)],
      [1600, blockOf(9600)],
      [1601, blockOf(9601)],
    ]);
    const a2 = applied(a1, changes);
    const inc = await driveCycle(world, input(world, 'c2', { 'vol-a': a2, 'vol-b': b1 }));

    // Assess: only the changes moved, a zero block included, and the images equal the sources.
    expect(inc.finalized?.status).toBe('published');
    const cp2 = world.catalog.checkpoints.at(-1)!;
    expect(cp2.sequence).toBe(2);
    expect(cp2.parent).toBe(cp1.id);
    expect(cp2.disks.map((d) => d.kind)).toEqual(['incremental', 'incremental']);
    const a = cp2.disks.find((d) => d.disk === 'vol-a')!;
    expect([...world.ebs.target(a.target).written.keys()].sort((x, y) => x - y)).toEqual([
      3, 101, 1600, 1601,
    ]);
    expect(sameImage(world.ebs.image(a.target), a2)).toBeUndefined();
    const b = cp2.disks.find((d) => d.disk === 'vol-b')!;
    expect(b.chunks).toBe(0);
    expect(sameImage(world.ebs.image(b.target), b1)).toBeUndefined();
    expect(world.violations).toEqual([]);
    expect(world.locks.locks.size).toBe(0);
    expect(world.budget.live('node-1', world.clock.now()).size).toBe(0);
  });
});
