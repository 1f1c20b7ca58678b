// The serverless cycle under faults where the handlers' boundary is what is tested, through the real
// handlers on the emulators: a permanent EBS error (AccessDenied from the emulator, the abort within
// the DynamoDB operations the stack grants each function, the next cycle over the last good
// checkpoint) and a writer whose Lambda context says its deadline is near (the SQS visibility reset).
// The cycle's logic under faults is tested on the fakes (test/engine/cycle/faults.test.ts: writers
// killed at each point of a batch, grants reclaimed past the lease and their late delivery, throttling
// stepping the window down, duplicates), and end to end through the deployed state machine in
// test/functions/local-cloud.test.ts (killed writers under EBS throttling, every grant delivered twice,
// AccessDenied, the cycle after it).
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { AbortResult, CycleInput, CycleRef, FinalizeResult } from '../../functions/contracts.ts';
import { TABLE_ACTIONS } from '../../infra/table-access.ts';
import { DynamoStateStore } from '../../shared/aws/dynamo/state-store.ts';
import { inflightOf } from '../../shared/engine/cycle/grant-plan.ts';
import {
  blockOf,
  type Deployment,
  deploy,
  differingBlocks,
  driveCycle,
  type Emulators,
  lambdaContext,
  readSnapshot,
  receiveEvent,
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
 * Asserts the published checkpoint's targets equal the sources, every descriptor counted once by its
 * flow and recorded in the ledger, nothing left in flight, and the node reservation given back.
 */
async function expectExact(d: Deployment, plan: Plan, final: FinalizeResult | AbortResult) {
  expect(final.status).toBe('published');
  const { set, cycleId } = plan.input;
  const cp = await new DynamoStateStore(e.ddb.client, d.table).latestCheckpoint(set);
  expect(cp?.id).toBe((final as { checkpointId?: string }).checkpointId);
  for (const [name, source] of plan.sources) {
    const target = cp!.disks.find((x) => x.disk === name)!.target;
    expect(differingBlocks(await readSnapshot(e, target), source)).toEqual([]);
    const rec = await d.disk(set, name, cycleId);
    const flow = await d.flowOf(set, name, cycleId);
    expect(flow).toMatchObject({ completedCount: rec.descriptors, open: false, allowance: 0 });
    expect(inflightOf(flow)).toBe(0);
    const seqs = new Set((await d.completions(set, name, cycleId)).map((c) => c.seq));
    expect(seqs.size).toBe(rec.descriptors);
  }
  expect(await d.reservations()).toEqual({});
}

describe('faults', () => {
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
    expect(await d.locks.get('plan-perm')).toBeUndefined();
    expect(await d.reservations()).toEqual({});
    const flow = await d.flowOf('plan-perm', name, 'c2');
    expect(flow).toMatchObject({ open: false, allowance: 0 });
    // Aborting took no DynamoDB operation beyond what the stack grants each function.
    for (const [fn, ops] of d.operations) {
      const granted: readonly string[] = TABLE_ACTIONS[fn];
      for (const op of ops) expect(granted, `${fn} ${op}`).toContain(`dynamodb:${op}`);
    }
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

  it('hands grants back untouched when its Lambda context says the deadline is near', async () => {
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
