// The cycle under trouble, on the memory fakes: duplicate deliveries, a fragmented change map,
// throttling, a permanent error, grants the queue did not take, malformed messages, and writers
// killed at every point of their batch. Each cycle still publishes a bit-exact checkpoint (or, for
// a permanent error, publishes nothing), no flow leaks in-flight bytes, and the node budget holds
// after every flow and budget write.
import { describe, expect, it } from 'vitest';
import { writeBatch } from '../../../shared/engine/cycle/writer.ts';
import { sameImage } from '../../support/cycle-fakes.ts';
import {
  BLOCK,
  blockOf,
  Crash,
  type DriveResult,
  driveCycle,
  input,
  MiB,
  World,
} from '../../support/cycle-harness.ts';

function run(count: number, from = 0, step = 1, tag = 0): Map<number, Uint8Array> {
  const m = new Map<number, Uint8Array>();
  for (let i = 0; i < count; i++) m.set(from + i * step, blockOf(tag + from + i * step));
  return m;
}

/** The checkpoint published for `result` equals `sources`, no flow holds bytes, the budget held. */
function assertPublished(
  world: World,
  result: DriveResult,
  sources: Record<string, Map<number, Uint8Array>>,
) {
  expect(result.aborted).toBeUndefined();
  expect(result.finalized?.status).toBe('published');
  const cp = world.catalog.checkpoints.find((c) => c.id === `${result.ref.set}/${result.ref.cycleId}`)!;
  for (const [disk, blocks] of Object.entries(sources)) {
    const d = cp.disks.find((x) => x.disk === disk)!;
    expect(sameImage(world.ebs.image(d.target), blocks), disk).toBeUndefined();
  }
  for (const { key, state } of world.flow.all()) {
    if (key.cycleId !== result.ref.cycleId) continue;
    expect(state.grantedBytes - state.completedBytes, `${key.disk} in flight`).toBe(0);
  }
  expect(world.violations).toEqual([]);
}

describe('the cycle under trouble', () => {
  it('delivers every grant twice half the time and writes each chunk once in the count', async () => {
    const world = new World({ queue: { duplicateRate: 0.5 } });
    const a = run(96);
    const b = run(40, 300, 3, 7);

    const result = await driveCycle(world, input(world, 'dup', { a, b }));

    assertPublished(world, result, { a, b });
    const duplicates = result.batches.reduce((n, r) => n + r.outcomes.duplicate, 0);
    expect(duplicates).toBeGreaterThan(10);
    const flowA = world.flow.all().find((f) => f.key.disk === 'a')!.state;
    expect(flowA.completedCount).toBe(48);
  });

  it('replicates a fragmented change map: hundreds of single blocks far apart', async () => {
    const world = new World({ maxDescriptorsPerPage: 50, snapshots: { listPageBlocks: 37 } });
    // Every third block over 300 MiB: no two changed blocks touch, each descriptor holds one block;
    // 200 descriptors fill four pages of 50, and the snapshot lists them in six pages of 37.
    const frag = run(200, 0, 3, 11);

    const result = await driveCycle(world, input(world, 'frag', { frag }), { batchSize: 10, parallel: 4 });

    assertPublished(world, result, { frag });
    const rec = world.ledger.disks.values().next().value!;
    expect(rec.descriptors).toBe(200);
    expect(rec.diffBytes).toBe(200 * BLOCK);
  });

  it('steps the window down when the target throttles, and never grants past it', async () => {
    // Slow writes, so the cycle lasts long enough for several of the controller's step-downs.
    const world = new World({ snapshots: { writeLatencyMs: 100 } });
    // Every write went through two throttled retries: well over the controller's fault rate.
    world.ebs.writeFault = () => ({ throttledRetries: 2 });
    const windows: number[] = [];
    const a = run(300);

    const result = await driveCycle(
      world,
      input(
        world,
        'throttled',
        { a },
        { chunkSize: '1 MiB', window: '8 MiB', windowLevels: ['2 MiB', '4 MiB', '8 MiB'] },
      ),
      { tickEveryMs: 500, afterTick: (t) => windows.push(t.disks[0]?.windowBytes ?? 0) },
    );

    assertPublished(world, result, { a });
    expect(windows[0]).toBe(8 * MiB);
    expect(Math.min(...windows)).toBe(2 * MiB);
    const rec = world.ledger.disks.values().next().value!;
    expect((rec.controller as { level: number }).level).toBe(0);
    expect(world.metrics.get('WindowStepDown')).toBeGreaterThanOrEqual(2);
  });

  it('fails the cycle on a permanent error and publishes nothing', async () => {
    const world = new World();
    world.ebs.writeFault = ({ seq }) => (seq === 5 ? { fail: { retryable: false } } : {});
    const a = run(32);

    const result = await driveCycle(world, input(world, 'poison', { a }));

    expect(result.finalized).toBeUndefined();
    expect(result.aborted).toMatch(/disk a seq 5 failed permanently/);
    expect(world.catalog.checkpoints).toEqual([]);
    expect(world.catalog.jobs.values().next().value?.status).toBe('failed');
    expect(world.ledger.cycle('set-a', 'poison')?.state).toBe('aborted');
    expect(world.flow.all().every((f) => !f.state.open)).toBe(true);
    expect(world.locks.locks.size).toBe(0);
    expect(world.budget.live('node-1', world.clock.now()).size).toBe(0);
    const target = [...world.ebs.targets.values()][0]!;
    expect(target.completedWith).toBeUndefined();
    expect(world.violations).toEqual([]);
  });

  it('retries a transient write failure through the queue', async () => {
    const world = new World({ queue: { visibilityMs: 2000 } });
    let failures = 3;
    world.ebs.writeFault = ({ seq }) => (seq === 7 && failures-- > 0 ? { fail: { retryable: true } } : {});
    const a = run(32);

    const result = await driveCycle(world, input(world, 'transient', { a }));

    assertPublished(world, result, { a });
    expect(result.batches.reduce((n, r) => n + r.outcomes.retry, 0)).toBe(3);
  });

  it('grants again what the queue did not take', async () => {
    const world = new World();
    world.queue.failNextSends = 3;
    const a = run(40);

    const result = await driveCycle(world, input(world, 'unsent', { a }));

    assertPublished(world, result, { a });
    expect(world.queue.failNextSends).toBe(0);
  });

  it('leaves a malformed message for the DLQ and carries on', async () => {
    const world = new World({ queue: { maxReceives: 3, visibilityMs: 1000 } });
    world.queue.enqueue('{"not":"a grant"}');
    const a = run(20);

    const result = await driveCycle(world, input(world, 'malformed', { a }));

    assertPublished(world, result, { a });
    expect(result.batches.reduce((n, r) => n + r.outcomes.malformed, 0)).toBeGreaterThan(0);
    // Never acknowledged: once its receives are used up, the queue moves it to the DLQ.
    for (let i = 0; i < 3; i++) {
      await world.clock.sleep(1000);
      world.queue.receive(10);
    }
    expect(world.queue.dlq.map((m) => m.body)).toEqual(['{"not":"a grant"}']);
  });

  it('hands grants back when the deadline is near', async () => {
    const world = new World();
    const a = run(20);
    const { prepare } = await import('../../../shared/engine/cycle/prepare.ts');
    const { tick } = await import('../../../shared/engine/cycle/tick.ts');
    const { writeBatch } = await import('../../../shared/engine/cycle/writer.ts');
    const { diffAll } = await import('../../support/cycle-harness.ts');
    const ref = await prepare(world.prepareDeps(), input(world, 'late', { a }));
    await diffAll(world, ref);
    await tick(world.tickDeps(), ref);
    const records = world.queue.receive(10);

    // Act: 5 s left, 10 s margin.
    const r = await writeBatch(world.writerDeps(world.container()), records, () => 5000);

    // Assess: nothing written, all handed back and visible again at once.
    expect(r.outcomes['handed-back']).toBe(records.length);
    expect(r.batchItemFailures).toHaveLength(records.length);
    expect(world.ebs.puts).toBe(0);
    expect(world.queue.receive(10)).toHaveLength(records.length);
  });
});

describe('a writer killed at each point of its batch', () => {
  it('is granted again by the tick when the queue hides its grants past the lease, and their late delivery writes nothing', async () => {
    // Prepare: the second batch's writer dies after its first block; its messages stay invisible
    // for two minutes, six leases, so only the tick's reclaim (the flows' grant marks) recovers them.
    const world = new World({ leaseMs: 20_000, queue: { visibilityMs: 120_000 } });
    const a = run(40);
    const b = run(20, 100, 2, 5);
    let batch = 0;
    const crashes = () =>
      ++batch === 2 ? new Crash({ port: 'writer', method: 'putBlocks', nth: 1 }) : undefined;

    // Act
    const result = await driveCycle(world, input(world, 'reclaimed', { a, b }), { crashes, batchSize: 10 });

    // Assess: exact, one writer died, its grants were reclaimed and written by others.
    assertPublished(world, result, { a, b });
    expect(result.killed).toBe(1);
    expect(world.metrics.get('GrantsReclaimed')).toBeGreaterThanOrEqual(1);
    // The queue delivers the dead writer's messages at last: their flows are closed (published),
    // so they are acknowledged without a block written.
    const puts = world.ebs.puts;
    await world.clock.sleep(120_000);
    const late = world.queue.receive(10);
    expect(late.length).toBeGreaterThan(0);
    const r = await writeBatch(world.writerDeps(world.container()), late, () => 60_000);
    expect(r.outcomes.stale).toBe(late.length);
    expect(r.batchItemFailures).toEqual([]);
    expect(world.ebs.puts).toBe(puts);
  });

  const points = [
    { name: 'after its blocks were written', port: 'writer', method: 'putBlocks' },
    { name: 'mid-batch, after the third chunk of ten', port: 'writer', method: 'putBlocks', nth: 3 },
    { name: 'after recording the completions', port: 'ledger', method: 'recordCompletions' },
    { name: 'after counting them', port: 'flow', method: 'complete' },
    { name: 'after the advance, before sending', port: 'flow', method: 'advance' },
    { name: 'after sending, before its signals', port: 'channel', method: 'send' },
  ] as const;

  for (const point of points) {
    it(`loses nothing when killed ${point.name}`, async () => {
      // Prepare: short leases and visibility, so lost grants come back within a few ticks.
      const world = new World({ leaseMs: 20_000, queue: { visibilityMs: 5000 } });
      const a = run(200);
      const b = run(60, 1000, 2, 3);
      // Arm every other batch at this point until three writers died there (a batch that never
      // reaches the point, one of duplicates only, say, is not killed).
      let batch = 0;
      const armed: Crash[] = [];
      const crashes = () => {
        batch++;
        if (batch % 2 === 1 || armed.filter((c) => c.killed).length >= 3) return undefined;
        const crash = new Crash({
          port: point.port,
          method: point.method,
          nth: 'nth' in point ? point.nth : 1,
        });
        armed.push(crash);
        return crash;
      };

      const result = await driveCycle(
        world,
        input(
          world,
          'killed',
          { a, b },
          { chunkSize: '1 MiB', window: '16 MiB', windowLevels: ['8 MiB', '16 MiB'] },
        ),
        { crashes, batchSize: 10 },
      );

      assertPublished(world, result, { a, b });
      expect(result.killed).toBeGreaterThanOrEqual(3);
    });
  }
});
