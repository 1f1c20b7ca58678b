// The finalizer publishes each disk's aggregate named `ebs-linear-sha256` (EBS's LINEAR checksum,
// hex). When a retried finalize finds its checkpoint already in the catalog, it takes the entry for
// its own only if it records that aggregate by that name: an entry from before aggregates were named
// reads as the LINEAR one and is accepted; one naming another algorithm is refused, by name.
import { createHash } from 'node:crypto';
import { PutCommand } from '@aws-sdk/lib-dynamodb';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { CycleInput, CycleRef, FinalizeResult } from '../../functions/contracts.ts';
import { keys } from '../../shared/aws/dynamo/schema.ts';
import { DynamoStateStore } from '../../shared/aws/dynamo/state-store.ts';
import { linearAggregate } from '../../shared/engine/integrity.ts';
import type { CheckpointDisk } from '../../shared/engine/ports.ts';
import {
  blockOf,
  type Deployment,
  deploy,
  driveCycle,
  type Emulators,
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

const GiB = 1024 ** 3;
const params = { chunkSize: '1 MiB', window: '4 MiB', windowLevels: ['2 MiB', '4 MiB', '8 MiB'] };

/** A few runs of changed blocks, and their LINEAR aggregate: SHA-256 over block SHA-256s in index order. */
function volume(seed: number): { blocks: Map<number, Buffer>; linear: string } {
  const blocks = new Map<number, Buffer>();
  for (let r = 0; r < 4; r++)
    for (let i = 0; i < 3; i++) blocks.set(r * 40 + i, blockOf(seed * 100 + r * 3 + i));
  const digests = [...blocks.keys()]
    .sort((a, b) => a - b)
    .map((i) => createHash('sha256').update(blocks.get(i)!).digest());
  return { blocks, linear: Buffer.from(linearAggregate(digests)).toString('hex') };
}

/**
 * The deployment with a finalizer that, before its first `finalize`, puts `entry(ref)` in the catalog
 * where this cycle's checkpoint goes: as an earlier attempt that published and then crashed left it.
 */
function withEntryBeforeFinalize(d: Deployment, entry: (ref: CycleRef) => Promise<void>): Deployment {
  let done = false;
  const finalizer: Deployment['finalizer'] = async (event, context) => {
    const ev = event as { action: string; cycle: CycleRef };
    if (ev.action === 'finalize' && !done) {
      done = true;
      await entry(ev.cycle);
    }
    return d.finalizer(event, context);
  };
  return { ...d, finalizer };
}

async function cycleOf(set: string, seed: number): Promise<{ input: CycleInput; linear: string }> {
  const { blocks, linear } = volume(seed);
  const input: CycleInput = {
    plan: `plan-${set}`,
    set,
    cycleId: 'c1',
    disks: [{ disk: 'vol-1', sourceSnapshotId: await sourceSnapshot(e, blocks), volumeSizeGiB: 1 }],
    params,
  };
  return { input, linear };
}

/** The disk as the catalog entry records it, with `aggregate` in whichever shape is given. */
const diskEntry = (aggregate: Record<string, unknown>) => ({
  disk: 'vol-1',
  source: 'snap-earlier-attempt',
  target: 'snap-earlier-attempt',
  sizeBytes: GiB,
  kind: 'full',
  chunks: 1,
  bytes: 1,
  ...aggregate,
});

describe('the finalizer and its checkpoint already in the catalog', () => {
  it('takes an entry from before aggregates were named for its own: the value is the LINEAR one', async () => {
    // Prepare: the entry an earlier finalizer wrote, `aggregateSha256` holding the LINEAR hex.
    const base = await deploy(e);
    const { input, linear } = await cycleOf('legacy', 1);
    const d = withEntryBeforeFinalize(base, async (ref) => {
      const item = {
        ...keys.checkpoint(ref.set, 1),
        id: `${ref.set}/${ref.cycleId}`,
        set: ref.set,
        sequence: 1,
        createdAt: '2026-01-01T00:00:00.000Z',
        disks: [diskEntry({ aggregateSha256: linear })],
      };
      await e.ddb.doc.send(new PutCommand({ TableName: d.table, Item: item }));
    });

    // Act
    const run = await driveCycle(e, d, input);

    // Assess: published, the entry read back under the algorithm that computed it.
    expect(run.final).toMatchObject({ status: 'published', checkpointId: 'legacy/c1' });
    expect((run.final as FinalizeResult & { status: 'published' }).disks[0]!.aggregateSha256).toBe(linear);
    const cp = await new DynamoStateStore(e.ddb.client, d.table).latestCheckpoint('legacy');
    expect(cp?.disks[0]?.aggregate).toEqual({ algorithm: 'ebs-linear-sha256', value: linear });
  });

  it('refuses an entry whose aggregate names another algorithm, naming the disk, checkpoint and algorithm', async () => {
    // Prepare: the same digest, but recorded as the engine's chunk aggregate.
    const base = await deploy(e);
    const { input, linear } = await cycleOf('named', 2);
    const state = new DynamoStateStore(e.ddb.client, base.table);
    const d = withEntryBeforeFinalize(base, async (ref) => {
      const disk = diskEntry({ aggregate: { algorithm: 'ferry-chunk-sha256', value: linear } });
      await state.publishCheckpoint({
        id: `${ref.set}/${ref.cycleId}`,
        set: ref.set,
        sequence: 1,
        createdAt: '2026-01-01T00:00:00.000Z',
        parent: undefined,
        disks: [disk as CheckpointDisk],
      });
    });

    // Act
    const err = await driveCycle(e, d, input).then(
      () => undefined,
      (x: unknown) => x as Error,
    );

    // Assess: not compared as values of one hash; said which algorithm the finalizer cannot check.
    expect(err?.name).toBe('CycleFailedError');
    expect(err?.message).toBe(
      'disk vol-1 of checkpoint named/c1 records an aggregate of algorithm ferry-chunk-sha256, which ' +
        "the finalizer cannot check (it checks ebs-linear-sha256 only): it is not this cycle's publication",
    );
  });
});
