// The serverless cycle under faults: duplicate deliveries, a chunk writer killed mid-batch, EBS
// throttling, a permanent EBS error, an overlapping cycle of the same plan, a writer at its deadline.
// Each ends bit-exact, or failed loudly with nothing published and the last good checkpoint current.
import type { SQSEvent } from 'aws-lambda';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type {
  AbortResult,
  CycleInput,
  CycleRef,
  FinalizeResult,
  TickResult,
} from '../../functions/contracts.ts';
import { scanCompletions } from '../../functions/shared/completions.ts';
import type { EbsPorts } from '../../functions/shared/ebs-binding.ts';
import { DynamoBudget, DynamoPlanLocks, DynamoWindows } from '../../shared/aws/dynamo/budget.ts';
import { DynamoStateStore } from '../../shared/aws/dynamo/state-store.ts';
import { decodeGrant } from '../../shared/aws/sqs/grant-message.ts';
import {
  acknowledge,
  blockOf,
  type Deployment,
  deploy,
  differingBlocks,
  driveCycle,
  type Emulators,
  LEASE_SECONDS,
  lambdaContext,
  MiB,
  readSnapshot,
  receiveEvent,
  resend,
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

/** A disk with `runs` runs of changed blocks of varying length, seeded. */
function disk(seed: number, runs = 8): Map<number, Buffer> {
  const m = new Map<number, Buffer>();
  for (let r = 0; r < runs; r++) {
    const start = r * 200 + (seed % 7);
    for (let i = 0; i < 1 + ((r + seed) % 5); i++) m.set(start + i, blockOf(seed * 1000 + start + i));
  }
  return m;
}

interface Plan {
  input: CycleInput;
  sources: Map<string, Map<number, Buffer>>;
}

async function fullPlan(plan: string, seeds: readonly number[]): Promise<Plan> {
  const sources = new Map<string, Map<number, Buffer>>();
  const disks = [];
  for (const seed of seeds) {
    const blocks = disk(seed);
    const name = `vol-${seed}`;
    sources.set(name, blocks);
    disks.push({ disk: name, sourceSnapshotId: await sourceSnapshot(e, blocks), volumeSizeGiB: 1 });
  }
  return {
    input: {
      plan,
      set: plan,
      cycleId: 'c1',
      disks,
      params: { chunkSize: '1 MiB', window: '4 MiB', windowLevels: ['2 MiB', '4 MiB', '8 MiB'] },
    },
    sources,
  };
}

/**
 * Asserts the published checkpoint's targets equal the sources, every completion counted once, and
 * no byte of window or node budget still held once the cycle ended.
 */
async function expectExact(d: Deployment, plan: Plan, final: FinalizeResult | AbortResult) {
  expect(final.status).toBe('published');
  const budget = new DynamoBudget(e.ddb.client, {
    table: d.table,
    node: 'serverless',
    capacityBytes: 6 * MiB,
  });
  expect(await budget.inflight()).toBe(0);
  const windows = new DynamoWindows(e.ddb.client, { table: d.table });
  const cp = await new DynamoStateStore(e.ddb.client, d.table).latestCheckpoint(plan.input.set);
  expect(cp?.id).toBe((final as { checkpointId?: string }).checkpointId);
  for (const [name, source] of plan.sources) {
    const target = cp!.disks.find((x) => x.disk === name)!.target;
    expect(differingBlocks(await readSnapshot(e, target), source)).toEqual([]);
    const rec = await d.store.requireCycleDisk(plan.input.set, name, plan.input.cycleId);
    const scan = await scanCompletions(d.store, rec, 10);
    expect(scan.missing).toEqual([]);
    expect(scan.completed).toBe(rec.descriptors);
    expect(rec.completed).toBe(rec.descriptors);
    expect(await d.store.listLeases(plan.input.set, name)).toEqual([]);
    expect((await windows.getWindow(plan.input.set, name))?.inflight).toBe(0);
  }
}

const totalDescriptors = async (d: Deployment, plan: Plan) => {
  let n = 0;
  for (const name of plan.sources.keys()) {
    n += (await d.store.requireCycleDisk(plan.input.set, name, plan.input.cycleId)).descriptors ?? 0;
  }
  return n;
};

/** Ports whose writer dies after its first block: every later call of these ports never returns. */
function killingPorts(inner: EbsPorts): { ports: EbsPorts; killed: Promise<never> } {
  let kill: (err: Error) => void = () => {};
  const killed = new Promise<never>((_, reject) => {
    kill = reject;
  });
  killed.catch(() => {});
  let dead = false;
  const hang = () => new Promise<never>(() => {});
  return {
    killed,
    ports: {
      lister: inner.lister,
      reader: { readBlock: (req) => (dead ? hang() : inner.reader.readBlock(req)) },
      writer: {
        ...inner.writer,
        async putBlocks(req) {
          if (dead) return hang();
          await inner.writer.putBlocks({ ...req, blocks: req.blocks.slice(0, 1) });
          dead = true;
          kill(new Error('chunk writer killed'));
          return hang();
        },
      },
    },
  };
}

describe('faults', () => {
  it('stays bit-exact under duplicate deliveries, counting each completion once', async () => {
    // Prepare: every grant is delivered twice (the second copy sent when the first is received).
    const d = await deploy(e);
    const plan = await fullPlan('plan-dup', [11, 12]);
    const seen = new Set<string>();
    let resent = 0;
    const onBatch = async (event: SQSEvent) => {
      for (const r of event.Records) {
        const { leaseId } = decodeGrant(r.body);
        if (seen.has(leaseId)) continue;
        seen.add(leaseId);
        await resend(e, d, r.body);
        resent++;
      }
    };

    // Act
    const run = await driveCycle(e, d, plan.input, { onBatch });

    // Copies still queued when the cycle ended are delivered too.
    for (let event = await receiveEvent(e, d); event !== undefined; event = await receiveEvent(e, d)) {
      const out = await d.writer(event);
      await acknowledge(
        e,
        d,
        event,
        out.batchItemFailures.map((f) => f.itemIdentifier),
      );
    }

    // Assess: exact, each descriptor written once; every extra copy acknowledged as stale or duplicate.
    await expectExact(d, plan, run.final);
    expect(resent).toBe(await totalDescriptors(d, plan));
    expect(d.metric('Grants_written')).toBe(await totalDescriptors(d, plan));
    expect(d.metric('Grants_stale') + d.metric('Grants_duplicate')).toBe(resent);
    expect(d.metric('Grants_failed') + d.metric('Grants_retry')).toBe(0);
  });

  it('recovers from a writer killed mid-batch: its leases expire, are reclaimed and granted again', async () => {
    // Prepare: the second writer invocation dies after writing one block of its first grant. Its
    // messages stay invisible for longer than the test runs, so only the reclaim can recover them.
    const d = await deploy(e, { visibilitySeconds: 120 });
    const plan = await fullPlan('plan-kill', [21, 22]);
    let crashedEvent: SQSEvent | undefined;
    const invokeWriter = async (event: SQSEvent, n: number) => {
      if (n !== 2) return d.writer(event);
      crashedEvent = event;
      const { ports, killed } = killingPorts(d.ports.current);
      try {
        return await Promise.race([d.writer(event, undefined, ports), killed]);
      } catch {
        return undefined; // the invocation crashed: nothing acknowledged
      }
    };

    // Act: when nothing moves, the clock passes the lease length so the planner may reclaim.
    const run = await driveCycle(e, d, plan.input, {
      invokeWriter,
      advanceWhenIdleMs: (LEASE_SECONDS + 1) * 1000,
    });

    // Assess: exact; one invocation crashed; its grants were reclaimed and written by others.
    expect(run.crashedInvocations).toBe(1);
    await expectExact(d, plan, run.final);
    expect(d.metric('GrantsReclaimed')).toBeGreaterThanOrEqual(1);
    // SQS redelivers the crashed invocation's messages at last: their leases are gone, so they are
    // acknowledged without writing anything.
    const before = d.metric('Grants_written');
    const late = await d.writer(crashedEvent!);
    expect(late.batchItemFailures).toEqual([]);
    expect(d.metric('Grants_written')).toBe(before);
    expect(d.metric('Grants_stale')).toBeGreaterThanOrEqual(crashedEvent!.Records.length);
  });

  it('completes through EBS throttling, and the throttles step the window down', async () => {
    // Prepare: a storm of throttled writes (and some reads) at the start of the cycle.
    const d = await deploy(e);
    const plan = await fullPlan('plan-throttle', [31, 32]);
    const throttledBefore = e.emu.counters.throttled.PutSnapshotBlock;
    e.emu.faults.throttleNext('PutSnapshotBlock', 30, 'RESOURCE_LEVEL_THROTTLE');
    e.emu.faults.throttleNext('GetSnapshotBlock', 10, 'ACCOUNT_THROTTLED');

    // Act
    const run = await driveCycle(e, d, plan.input);

    // Assess: exact; the throttles happened and some tick moved a window below its 4 MiB start.
    await expectExact(d, plan, run.final);
    expect(e.emu.counters.throttled.PutSnapshotBlock - throttledBefore).toBe(30);
    const windows = run.ticks.flatMap((t: TickResult) => t.disks.map((x) => x.windowBytes));
    expect(Math.min(...windows.filter((w) => w > 0))).toBeLessThan(4 * 1024 * 1024);
    expect(d.metric('WindowStepDown')).toBeGreaterThanOrEqual(1);
  });

  it('fails a cycle on a permanent error, publishes nothing and keeps the last good checkpoint', async () => {
    // Prepare: a good full cycle first.
    const d = await deploy(e);
    const plan = await fullPlan('plan-perm', [41]);
    const first = await driveCycle(e, d, plan.input);
    await expectExact(d, plan, first.final);
    const state = new DynamoStateStore(e.ddb.client, d.table);
    const good = await state.latestCheckpoint('plan-perm');
    const name = 'vol-41';
    const changed = new Map([[5, blockOf(777)]]);
    const src2 = await sourceSnapshot(e, changed, { parent: plan.input.disks[0]!.sourceSnapshotId });

    // Act: the incremental cycle's writes are refused (access denied: no retry can help).
    e.emu.faults.accessDenied('PutSnapshotBlock');
    let second: Awaited<ReturnType<typeof driveCycle>>;
    try {
      second = await driveCycle(e, d, {
        ...plan.input,
        cycleId: 'c2',
        disks: [{ disk: name, sourceSnapshotId: src2, volumeSizeGiB: 1 }],
      });
    } finally {
      e.emu.faults.allowAccess('PutSnapshotBlock');
    }

    // Assess: aborted with the cause; nothing published; the job failed; the lock is free again.
    const aborted = second.final as AbortResult;
    expect(aborted.status).toBe('aborted');
    expect(aborted.reason).toMatch(/vol-41 .*failed permanently.*AccessDenied/);
    expect(aborted.currentCheckpointId).toBe(good!.id);
    expect((await state.listCheckpoints('plan-perm')).map((c) => c.id)).toEqual([good!.id]);
    expect(await state.getJob('plan-perm', 'c2')).toMatchObject({ status: 'failed' });
    expect(
      await new DynamoPlanLocks(e.ddb.client, { table: d.table }).getPlanLock('plan-perm'),
    ).toBeUndefined();
    const budget = new DynamoBudget(e.ddb.client, {
      table: d.table,
      node: 'serverless',
      capacityBytes: 6 * MiB,
    });
    expect(await budget.inflight()).toBe(0);
    // The next cycle is an increment over the last good checkpoint and publishes as sequence 2.
    const third = await driveCycle(e, d, {
      ...plan.input,
      cycleId: 'c3',
      disks: [{ disk: name, sourceSnapshotId: src2, volumeSizeGiB: 1 }],
    });
    expect(third.final).toMatchObject({ status: 'published', sequence: 2 });
    const cp = await state.latestCheckpoint('plan-perm');
    expect(cp?.parent).toBe(good!.id);
    const source = new Map([...plan.sources.get(name)!, ...changed]);
    expect(differingBlocks(await readSnapshot(e, cp!.disks[0]!.target), source)).toEqual([]);
  });

  it('refuses a second prepare while a cycle of the plan holds the lock', async () => {
    // Prepare
    const d = await deploy(e);
    const plan = await fullPlan('plan-lock', [51]);
    const ref = (await d.planner({ action: 'prepare', cycle: plan.input })) as CycleRef;

    // Act
    const refused = await d
      .planner({ action: 'prepare', cycle: { ...plan.input, cycleId: 'c2' } })
      .catch((err) => err);

    // Assess: refused by name, naming the holder; after the first cycle ends the plan is free.
    expect(refused).toMatchObject({ name: 'PlanBusyError', holder: 'cycle:c1' });
    expect(refused.message).toMatch(/plan plan-lock is busy: its lock is held by cycle:c1 .* never overlap/);
    expect(await d.store.getCycle('plan-lock', 'c2')).toBeUndefined();
    await d.finalizer({ action: 'abort', cycle: ref, reason: 'operator cancelled' });
    const next = await d.planner({ action: 'prepare', cycle: { ...plan.input, cycleId: 'c2' } });
    expect(next).toMatchObject({ cycleId: 'c2', lockOwner: 'cycle:c2' });
  });

  it('hands grants back untouched when the writer is near its deadline', async () => {
    // Prepare: a cycle with grants waiting in the queue.
    const d = await deploy(e);
    const plan = await fullPlan('plan-deadline', [61]);
    const ref = (await d.planner({ action: 'prepare', cycle: plan.input })) as CycleRef;
    for (const task of ref.disks) await d.differ(task);
    await d.planner({ action: 'tick', cycle: ref });
    const event = (await receiveEvent(e, d))!;

    // Act: 500 ms left, below the 1 s margin.
    const out = await d.writer(event, lambdaContext(500));

    // Assess: every grant reported failed and visible again at once (visibility reset), none written.
    expect(out.batchItemFailures.map((f) => f.itemIdentifier).sort()).toEqual(
      event.Records.map((r) => r.messageId).sort(),
    );
    expect(d.metric('Grants_written')).toBe(0);
    const again = await receiveEvent(e, d);
    expect(again?.Records.map((r) => r.body).sort()).toEqual(event.Records.map((r) => r.body).sort());
  });
});
