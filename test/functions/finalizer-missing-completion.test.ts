// The finalizer must not publish a checkpoint when a descriptor of any disk has no completion, even
// though the disk's flow counts it complete. Here the cycle runs to the end on the emulators, then
// one descriptor's completion is removed from the completion batches of the second disk (as a lost
// write would leave it) before `finalize` runs: the cycle fails naming the disk and the sequence
// number, nothing is published, and CompleteSnapshot reaches EBS for neither disk's target snapshot.
import { DeleteCommand, PutCommand, QueryCommand } from '@aws-sdk/lib-dynamodb';
import type { Context } from 'aws-lambda';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { AbortResult, CycleInput, CycleRef } from '../../functions/contracts.ts';
import type { EbsPorts } from '../../functions/shared/ebs-binding.ts';
import { decodeCompletions, encodeCompletions } from '../../shared/aws/dynamo/cycle-codecs.ts';
import { cycleKeys } from '../../shared/aws/dynamo/cycle-items.ts';
import { DynamoStateStore } from '../../shared/aws/dynamo/state-store.ts';
import {
  blockOf,
  type Deployment,
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

/** Runs of changed blocks spread over the disk: many descriptors over several descriptor pages. */
function disk(seed: number): Map<number, Buffer> {
  const m = new Map<number, Buffer>();
  for (let r = 0; r < 12; r++) {
    const start = r * 150 + (seed % 5);
    for (let i = 0; i < 1 + ((r + seed) % 3); i++) m.set(start + i, blockOf(seed * 1000 + start + i));
  }
  return m;
}

/** Records every CompleteSnapshot the finalizer asks its writer port for, then passes it on. */
function recordCompletes(d: Deployment): string[] {
  const requested: string[] = [];
  const inner = d.ports.current;
  const ports: EbsPorts = {
    ...inner,
    writer: {
      ...inner.writer,
      completeSnapshot: (req) => {
        requested.push(req.snapshotId);
        return inner.writer.completeSnapshot(req);
      },
    },
  };
  d.ports.current = ports;
  return requested;
}

/**
 * Deletes descriptor `seq`'s completion from every completion batch of the disk that holds it (a
 * batch holding only it goes; the others are rewritten with their other entries).
 */
async function removeCompletion(d: Deployment, set: string, disk: string, cycleId: string, seq: number) {
  const prefix = cycleKeys.completionPrefix(set, disk, cycleId);
  const batches = await e.ddb.doc.send(
    new QueryCommand({
      TableName: d.table,
      KeyConditionExpression: 'pk = :pk AND begins_with(sk, :sk)',
      ExpressionAttributeValues: { ':pk': prefix.pk, ':sk': prefix.sk },
      ConsistentRead: true,
    }),
  );
  let removed = 0;
  for (const item of batches.Items ?? []) {
    const entries = decodeCompletions(item.e as Uint8Array);
    const kept = entries.filter((c) => c.seq !== seq);
    if (kept.length === entries.length) continue;
    removed++;
    const key = { pk: item.pk, sk: item.sk };
    if (kept.length === 0) await e.ddb.doc.send(new DeleteCommand({ TableName: d.table, Key: key }));
    else
      await e.ddb.doc.send(
        new PutCommand({ TableName: d.table, Item: { ...item, e: encodeCompletions(kept) } }),
      );
  }
  expect(removed).toBeGreaterThan(0);
  expect((await d.completions(set, disk, cycleId)).map((c) => c.seq)).not.toContain(seq);
  // The flow still counts it complete: only the finalizer's validation can notice.
  expect((await d.flowOf(set, disk, cycleId)).completedCount).toBe(
    (await d.disk(set, disk, cycleId)).descriptors,
  );
}

/**
 * The deployment with a finalizer that, before its first `finalize`, removes one completion of
 * `disk`: after the last tick confirmed every completion, so only the finalizer can notice.
 */
function removingBeforeFinalize(d: Deployment, disk: string, pick: (descriptors: number) => number) {
  const removed: { seq?: number; ref?: CycleRef } = {};
  const finalizer = async (event: unknown, context?: Context) => {
    const ev = event as { action: string; cycle: CycleRef };
    if (ev.action === 'finalize' && removed.seq === undefined) {
      removed.ref = ev.cycle;
      const { set, cycleId } = ev.cycle;
      const rec = await d.disk(set, disk, cycleId);
      removed.seq = pick(rec.descriptors!);
      await removeCompletion(d, set, disk, cycleId, removed.seq);
    }
    return d.finalizer(event, context);
  };
  return { deployment: { ...d, finalizer } as Deployment, removed };
}

/** What the state machine does when finalize throws: its Catch calls abort with the error. */
async function abortAfter(d: Deployment, ref: CycleRef, err: Error): Promise<AbortResult> {
  return (await d.finalizer({
    action: 'abort',
    cycle: ref,
    reason: `a cycle step failed with ${err.name}`,
    error: { Error: err.name, Cause: err.message },
  })) as AbortResult;
}

describe('finalize with a descriptor that has no completion', () => {
  it('fails naming the disk and seq, publishes nothing and never sends CompleteSnapshot (full cycle)', async () => {
    // Prepare: two disks; the second loses the completion of a descriptor on a later page.
    const d = await deploy(e);
    const sources = new Map([
      ['vol-1', disk(1)],
      ['vol-2', disk(2)],
    ]);
    const input: CycleInput = {
      plan: 'plan-missing',
      set: 'missing',
      cycleId: 'c1',
      disks: [],
      params: { chunkSize: '1 MiB', window: '4 MiB', windowLevels: ['2 MiB', '4 MiB', '8 MiB'] },
    };
    const disks = [];
    for (const [name, blocks] of sources)
      disks.push({ disk: name, sourceSnapshotId: await sourceSnapshot(e, blocks), volumeSizeGiB: 1 });
    const requested = recordCompletes(d);
    const completesBefore = e.emu.counters.calls.CompleteSnapshot;
    const { deployment, removed } = removingBeforeFinalize(d, 'vol-2', (n) => Math.floor(n / 2) + 1);

    // Act
    const err = await driveCycle(e, deployment, { ...input, disks }).then(
      () => undefined,
      (x: unknown) => x as Error & { disk?: string; seq?: number },
    );

    // Assess: the cycle failed by name, for that disk and seq, with nothing sent to complete.
    expect(removed.seq).toBeGreaterThan(4); // not on the first descriptor page
    expect(err).toBeInstanceOf(Error);
    expect(err!.name).toBe('CycleFailedError');
    expect(err!.message).toMatch(new RegExp(`disk vol-2 .*\\bseq ${removed.seq}\\b.* has no completion`));
    expect(err!.disk).toBe('vol-2');
    expect(err!.seq).toBe(removed.seq);
    expect(requested).toEqual([]);
    expect(e.emu.counters.calls.CompleteSnapshot).toBe(completesBefore);
    const state = new DynamoStateStore(e.ddb.client, d.table);
    expect(await state.listCheckpoints('missing')).toEqual([]);
    expect(d.events.events).toEqual([]);
    for (const name of sources.keys()) {
      const rec = await d.disk('missing', name, 'c1');
      expect(rec.completeRequested ?? false).toBe(false);
      expect(e.emu.state.describeSnapshot(rec.targetSnapshotId)?.status).toBe('pending');
    }
    // A retried finalize (a Lambda retry) fails the same way and still sends nothing.
    const ref = removed.ref!;
    await expect(d.finalizer({ action: 'finalize', cycle: ref })).rejects.toThrow(
      new RegExp(`\\bseq ${removed.seq}\\b`),
    );
    expect(requested).toEqual([]);
    // The state machine's Catch aborts the cycle: nothing published, the plan free again.
    const aborted = await abortAfter(d, ref, err!);
    expect(aborted).toMatchObject({ status: 'aborted' });
    expect(aborted.currentCheckpointId).toBeUndefined();
    expect(await state.listCheckpoints('missing')).toEqual([]);
    expect(await state.getJob('missing', 'c1')).toMatchObject({ status: 'failed' });
    expect(await d.locks.get(input.plan)).toBeUndefined();
    expect(e.emu.counters.calls.CompleteSnapshot).toBe(completesBefore);
  });

  it('keeps the previous checkpoint current when an incremental cycle loses a completion', async () => {
    // Prepare: a good full cycle, then an increment with changes on both disks.
    const d = await deploy(e);
    const base = new Map([
      ['vol-a', disk(3)],
      ['vol-b', disk(4)],
    ]);
    const params = { chunkSize: '1 MiB', window: '4 MiB', windowLevels: ['2 MiB', '4 MiB', '8 MiB'] };
    const disks1 = [];
    for (const [name, blocks] of base)
      disks1.push({ disk: name, sourceSnapshotId: await sourceSnapshot(e, blocks), volumeSizeGiB: 1 });
    const input: CycleInput = { plan: 'plan-inc', set: 'inc', cycleId: 'c1', disks: disks1, params };
    const first = await driveCycle(e, d, input);
    expect(first.final.status).toBe('published');
    const state = new DynamoStateStore(e.ddb.client, d.table);
    const good = await state.latestCheckpoint('inc');
    const disks2 = [];
    for (const [i, spec] of disks1.entries()) {
      const changes = new Map<number, Buffer>();
      for (let r = 0; r < 10; r++) changes.set(r * 170 + i, blockOf(70_000 + i * 100 + r));
      disks2.push({
        ...spec,
        sourceSnapshotId: await sourceSnapshot(e, changes, { parent: spec.sourceSnapshotId }),
      });
    }
    const requested = recordCompletes(d);
    const completesBefore = e.emu.counters.calls.CompleteSnapshot;
    const { deployment, removed } = removingBeforeFinalize(d, 'vol-b', (n) => n - 2);

    // Act
    const err = await driveCycle(e, deployment, { ...input, cycleId: 'c2', disks: disks2 }).then(
      () => undefined,
      (x: unknown) => x as Error,
    );

    // Assess: failed naming disk and seq; the catalog still ends at the good checkpoint.
    expect(err?.message).toMatch(new RegExp(`disk vol-b .*\\bseq ${removed.seq}\\b`));
    expect(requested).toEqual([]);
    expect(e.emu.counters.calls.CompleteSnapshot).toBe(completesBefore);
    expect((await state.listCheckpoints('inc')).map((c) => c.id)).toEqual([good!.id]);
    expect((await state.latestCheckpoint('inc'))?.id).toBe(good!.id);
    expect(d.events.events).toHaveLength(1); // only the first checkpoint was announced
    for (const [name, blocks] of base) {
      const target = good!.disks.find((x) => x.disk === name)!.target;
      expect(differingBlocks(await readSnapshot(e, target), blocks)).toEqual([]);
    }
  });
});
