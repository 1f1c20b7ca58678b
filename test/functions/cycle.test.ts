// A protection plan of two EBS disks replicated by the serverless functions, called as the state
// machine and the SQS event source mapping would call them: a full cycle, then an incremental one;
// the published checkpoints' target snapshots read back equal to the sources, block for block.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { CycleInput, FinalizeResult } from '../../functions/contracts.ts';
import { TABLE_ACTIONS } from '../../infra/table-access.ts';
import { DynamoStateStore } from '../../shared/aws/dynamo/state-store.ts';
import { CHECKPOINT_PUBLISHED } from '../../shared/engine/cycle/finalize.ts';
import { inflightOf } from '../../shared/engine/cycle/grant-plan.ts';
import {
  BLOCK,
  blockOf,
  deploy,
  differingBlocks,
  driveCycle,
  type Emulators,
  lambdaContext,
  readSnapshot,
  SNAPSHOT_TAG,
  sourceSnapshot,
  startEmulators,
} from './support/harness.ts';

let e: Emulators;

beforeAll(async () => {
  // Small List pages, so the differ pages and resumes as it would on a large disk.
  e = await startEmulators({ listScanWindowBlocks: 256 });
});
afterAll(async () => {
  await e?.stop();
});

/** A fragmented disk: runs of changed blocks, single blocks, a zero block, spread over 1 GiB. */
function diskA(): Map<number, Buffer> {
  const m = new Map<number, Buffer>();
  for (const i of [0, 1, 2, 3, 4, 5]) m.set(i, blockOf(100 + i));
  for (const i of [100, 101, 300, 301, 302, 777]) m.set(i, blockOf(100 + i));
  for (let i = 1000; i < 1020; i++) m.set(i, blockOf(100 + i));
  m.set(1500, Buffer.alloc(BLOCK)); // written as zeros: a full copy may skip it
  for (let i = 2000; i < 2048; i += 3) m.set(i, blockOf(100 + i));
  return m;
}

function diskB(): Map<number, Buffer> {
  const m = new Map<number, Buffer>();
  for (let i = 10; i < 40; i++) m.set(i, blockOf(5000 + i));
  for (const i of [512, 513, 514, 1024, 2047]) m.set(i, blockOf(5000 + i));
  return m;
}

function applied(base: Map<number, Buffer>, changes: Map<number, Buffer>): Map<number, Buffer> {
  const out = new Map(base);
  for (const [i, b] of changes) out.set(i, b);
  return out;
}

describe('a serverless replication cycle, full then incremental', () => {
  it('publishes checkpoints whose target snapshots equal the sources byte for byte', async () => {
    // Prepare
    const d = await deploy(e);
    const a1 = diskA();
    const b1 = diskB();
    const srcA1 = await sourceSnapshot(e, a1);
    const srcB1 = await sourceSnapshot(e, b1);
    const cycle1: CycleInput = {
      plan: 'plan-finance',
      set: 'finance',
      cycleId: 'c1',
      disks: [
        { disk: 'vol-a', sourceSnapshotId: srcA1, volumeSizeGiB: 1 },
        { disk: 'vol-b', sourceSnapshotId: srcB1, volumeSizeGiB: 1 },
      ],
      params: { chunkSize: '1 MiB', window: '4 MiB', windowLevels: ['2 MiB', '4 MiB', '8 MiB'] },
    };

    // Act: the full cycle.
    const full = await driveCycle(e, d, cycle1);

    // Assess: published, both disks full, each target equal to its source.
    const published = full.final as FinalizeResult;
    expect(published.status).toBe('published');
    if (published.status !== 'published') return;
    expect(published.sequence).toBe(1);
    expect(published.disks.map((x) => x.kind)).toEqual(['full', 'full']);
    const state = new DynamoStateStore(e.ddb.client, d.table);
    const cp1 = await state.latestCheckpoint('finance');
    expect(cp1?.id).toBe(published.checkpointId);
    for (const [disk, source] of [
      ['vol-a', a1],
      ['vol-b', b1],
    ] as const) {
      const target = cp1!.disks.find((x) => x.disk === disk)!.target;
      expect(differingBlocks(await readSnapshot(e, target), source)).toEqual([]);
    }
    // The zero block of the full copy was skipped, not written.
    const targetA1 = cp1!.disks.find((x) => x.disk === 'vol-a')!.target;
    expect((await readSnapshot(e, targetA1)).has(1500)).toBe(false);
    // Every descriptor counted once by its flow, recorded in the ledger, nothing left in flight, and
    // the flow closed (writers write nothing more for this cycle).
    for (const disk of ['vol-a', 'vol-b']) {
      const rec = await d.disk('finance', disk, 'c1');
      const flow = await d.flowOf('finance', disk, 'c1');
      const seqs = new Set((await d.completions('finance', disk, 'c1')).map((c) => c.seq));
      expect(rec.descriptors).toBeGreaterThan(0);
      expect(flow).toMatchObject({ completedCount: rec.descriptors, low: rec.descriptors, open: false });
      expect(inflightOf(flow)).toBe(0);
      expect([...seqs].sort((x, y) => x - y)).toEqual([...Array(rec.descriptors).keys()]);
    }

    // Act: the incremental cycle. Blocks overwritten, new blocks, a block rewritten as zeros.
    const changesA = new Map<number, Buffer>([
      [3, blockOf(9003)],
      [4, Buffer.alloc(BLOCK)],
      [200, blockOf(9200)],
      [1010, blockOf(9010)],
      [1011, blockOf(9011)],
      [2046, blockOf(9046)],
    ]);
    const changesB = new Map<number, Buffer>([
      [10, blockOf(9510)],
      [1025, blockOf(9525)],
    ]);
    const srcA2 = await sourceSnapshot(e, changesA, { parent: srcA1 });
    const srcB2 = await sourceSnapshot(e, changesB, { parent: srcB1 });
    const incremental = await driveCycle(e, d, {
      ...cycle1,
      cycleId: 'c2',
      disks: [
        { disk: 'vol-a', sourceSnapshotId: srcA2, volumeSizeGiB: 1 },
        { disk: 'vol-b', sourceSnapshotId: srcB2, volumeSizeGiB: 1 },
      ],
    });

    // Assess: incremental snapshots over the first cycle's, equal to the new sources.
    const second = incremental.final as FinalizeResult;
    expect(second.status).toBe('published');
    if (second.status !== 'published') return;
    expect(second.sequence).toBe(2);
    expect(second.disks.map((x) => x.kind)).toEqual(['incremental', 'incremental']);
    // Only the changed blocks moved: one descriptor per changed run of blocks.
    expect(second.disks.find((x) => x.disk === 'vol-a')!.blocks).toBe(changesA.size);
    expect(second.disks.find((x) => x.disk === 'vol-b')!.blocks).toBe(changesB.size);
    const cp2 = await state.latestCheckpoint('finance');
    expect(cp2).toMatchObject({ id: second.checkpointId, parent: cp1!.id, sequence: 2 });
    for (const [disk, source] of [
      ['vol-a', applied(a1, changesA)],
      ['vol-b', applied(b1, changesB)],
    ] as const) {
      const cpDisk = cp2!.disks.find((x) => x.disk === disk)!;
      expect(e.emu.state.describeSnapshot(cpDisk.target)?.parentId).toBe(
        cp1!.disks.find((x) => x.disk === disk)!.target,
      );
      expect(differingBlocks(await readSnapshot(e, cpDisk.target), source)).toEqual([]);
    }
    // Announced once per checkpoint; the lock is free for the next cycle.
    expect(d.events.events.map((x) => [x.detailType, x.detail.checkpointId])).toEqual([
      [CHECKPOINT_PUBLISHED, cp1!.id],
      [CHECKPOINT_PUBLISHED, cp2!.id],
    ]);
    expect(await d.locks.get('plan-finance')).toBeUndefined();
    // Grants went out mostly from the writers (ACK-clocked), not only from the ticks.
    expect(d.metric('GrantsIssuedByTick')).toBeLessThan(d.metric('Grants_written'));
    // Each function sent exactly the DynamoDB operations the stack grants it, no more.
    for (const [fn, actions] of Object.entries(TABLE_ACTIONS)) {
      const sent = [...(d.operations.get(fn as keyof typeof TABLE_ACTIONS) ?? [])].sort();
      expect(sent, fn).toEqual(actions.map((a) => a.replace('dynamodb:', '')).sort());
    }
  });

  it('tags target snapshots with the deployment tag and reports each checkpoint’s age per plan', async () => {
    // Prepare: a one-disk cycle whose execution started two minutes ago (its source snapshot was
    // taken after that), and one started by hand without a start time.
    const d = await deploy(e);
    const src = await sourceSnapshot(e, diskB());
    const startedAt = new Date(Date.now() - 120_000).toISOString();
    const input: CycleInput = {
      plan: 'plan-age',
      set: 'age',
      cycleId: 'g1',
      startedAt,
      disks: [{ disk: 'vol-b', sourceSnapshotId: src, volumeSizeGiB: 1 }],
    };

    // Act
    const first = await driveCycle(e, d, input);
    const second = await driveCycle(e, d, { ...input, cycleId: 'g2', startedAt: undefined });

    // Assess: the target snapshot carries the deployment tag the planner's environment names.
    expect(first.final.status).toBe('published');
    expect(second.final.status).toBe('published');
    const rec = await d.disk('age', 'vol-b', 'g1');
    expect(e.emu.state.describeSnapshot(rec.targetSnapshotId)?.tags).toEqual([
      { Key: SNAPSHOT_TAG.key, Value: SNAPSHOT_TAG.value },
      { Key: 'ferry:role', Value: 'target' },
      { Key: 'ferry:set', Value: 'age' },
      { Key: 'ferry:disk', Value: 'vol-b' },
      { Key: 'ferry:cycle', Value: 'g1' },
    ]);
    // One CheckpointAgeSeconds per publish, dimension plan (what the RPO alarm watches): measured
    // from the execution's start when given, else from prepare.
    const ages = d.dimensioned.filter((m) => m.name === 'CheckpointAgeSeconds');
    expect(ages.map((m) => [m.unit, m.dimensions])).toEqual([
      ['Seconds', { plan: 'plan-age' }],
      ['Seconds', { plan: 'plan-age' }],
    ]);
    expect(ages[0]!.value).toBeGreaterThanOrEqual(120);
    expect(ages[1]!.value).toBeLessThan(120);
  });

  it('stops the differ at the deadline its Lambda context gives, and resumes it to the same descriptors', async () => {
    // Prepare: a disk whose listing comes in several pages.
    const d = await deploy(e);
    const blocks = diskA();
    const src = await sourceSnapshot(e, blocks);
    const input: CycleInput = {
      plan: 'plan-resume',
      set: 'resume',
      cycleId: 'r1',
      disks: [{ disk: 'vol-a', sourceSnapshotId: src, volumeSizeGiB: 1 }],
    };
    const ref = await d.planner({ action: 'prepare', cycle: input });
    const task = { set: 'resume', cycleId: 'r1', disk: 'vol-a' };

    // Act: every invocation is told its deadline is near, so each stops after one List page.
    const results = [];
    for (let r = await d.differ(task, lambdaContext(500)); ; r = await d.differ(task, lambdaContext(500))) {
      results.push(r);
      if (r.done) break;
    }

    // Assess: it took several invocations, and the descriptors are the engine's cut of all blocks.
    expect(results.length).toBeGreaterThan(2);
    const last = results.at(-1)!;
    expect(last).toMatchObject({ done: true, blocks: blocks.size, bytes: blocks.size * BLOCK });
    const rec = await d.disk('resume', 'vol-a', 'r1');
    expect(rec.descriptors).toBe(last.descriptors);
    // Runs of 1 MiB: [0-1][2-3][4-5] [100-101] [300-301][302] [777] [1000..1019]=10 [1500] and
    // 2000, 2003, ... each alone (every third block): 16.
    expect(last.descriptors).toBe(3 + 1 + 2 + 1 + 10 + 1 + 16);
    expect(ref).toMatchObject({ sequence: 1, disks: [task] });
  });
});
