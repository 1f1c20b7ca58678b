// The deployed definition, run locally: the state machine `cdk synth` produces, resolved to plain
// ASL and executed by aws-local-stepfunctions, its Lambda tasks bound to the real handlers, SQS on
// fauxqs, DynamoDB on dynalite, EBS on Ferry's emulator, EC2 snapshots of in-memory volumes. A
// two-disk plan replicates a full and then incremental cycles; every published checkpoint's target
// snapshots are read back block by block and compared with the volumes as they were snapshotted.
// Faults: killed writers, duplicate deliveries, throttling, and a permanent AccessDenied that must
// fail the cycle loudly and publish nothing.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type ExecutionOutcome, LocalCloud, type LocalCloudEvent } from '../../local-cloud/cloud.ts';
import { type LocalEmulators, startLocalEmulators } from '../../local-cloud/start-emulators.ts';
import { fillRegion, scatterWrites, zeroBlock } from '../../local-cloud/workload.ts';
import { MiB } from '../../shared/engine/units.ts';

const PLAN = 'web-tier';

let emulators: LocalEmulators;
let cloud: LocalCloud;
const volumes: { disk: string; volumeId: string }[] = [];
/** What each volume held when the last cycle snapshotted it: what its target snapshot must hold. */
const snapshotted = new Map<string, Buffer>();

beforeAll(async () => {
  emulators = await startLocalEmulators();
  cloud = await LocalCloud.start({ endpoints: emulators.endpoints, snapshots: emulators.snapshots });
  volumes.push({ disk: 'root', volumeId: cloud.ec2.createVolume(24 * MiB) });
  volumes.push({ disk: 'data', volumeId: cloud.ec2.createVolume(40 * MiB) });
}, 120_000);

afterAll(async () => {
  await cloud?.stop();
  await emulators?.stop();
});

const volume = (disk: string): Buffer => {
  const v = volumes.find((x) => x.disk === disk);
  if (v === undefined) throw new Error(`no volume ${disk}`);
  return cloud.ec2.volume(v.volumeId);
};

/** Runs one cycle of the plan; records what the volumes held as it started (its snapshots). */
async function cycle(name: string, opts: Parameters<LocalCloud['runExecution']>[1] = { name }) {
  for (const { disk } of volumes) snapshotted.set(disk, Buffer.from(volume(disk)));
  const events: LocalCloudEvent[] = [];
  const outcome = await cloud.runExecution(
    { plan: PLAN, set: PLAN, disks: volumes.map(({ disk, volumeId }) => ({ disk, volumeId })) },
    { ...opts, name, onEvent: (e) => events.push(e) },
  );
  return { outcome, events };
}

/** The checkpoint the catalog names current is `checkpointId`, and its snapshots equal the volumes. */
async function expectPublishedBitExact(outcome: ExecutionOutcome) {
  expect(outcome.status, `${outcome.error}: ${outcome.cause}`).toBe('SUCCEEDED');
  const output = outcome.output as { status: string; checkpointId: string };
  expect(output.status).toBe('published');
  const checkpoint = await cloud.latestCheckpoint(PLAN);
  expect(checkpoint?.id).toBe(output.checkpointId);
  expect(checkpoint?.disks.map((d) => d.disk).sort()).toEqual(['data', 'root']);
  for (const d of checkpoint?.disks ?? []) {
    const expected = snapshotted.get(d.disk);
    if (expected === undefined) throw new Error(`no snapshot taken of ${d.disk}`);
    const compared = await cloud.compareSnapshot(d.target, expected);
    expect(compared.differing, `${d.disk} (${d.target}) differs from its volume`).toEqual([]);
  }
  return checkpoint;
}

describe('the synthesized cycle state machine, run locally against emulators', () => {
  it('replicates a full cycle of a two-disk plan, bit-exact', async () => {
    fillRegion(volume('root'), 0, 6 * MiB, 1);
    fillRegion(volume('root'), 20 * MiB, 2 * MiB, 2);
    fillRegion(volume('data'), 4 * MiB, 12 * MiB, 3);
    scatterWrites(volume('data'), 40, 64 * 1024, 4);

    const { outcome, events } = await cycle('cycle-full');
    const checkpoint = await expectPublishedBitExact(outcome);
    // The execution ran the deployed loop, the writer fed by the event source. A cycle this small
    // fits the parent's own loop passes: no child execution (children are run in test/infra).
    expect(outcome.children).toBe(0);
    expect(outcome.writers.invocations).toBeGreaterThan(0);
    expect(events.some((e) => e.kind === 'announcement' && e.detail.checkpointId === checkpoint?.id)).toBe(
      true,
    );
  }, 180_000);

  it('replicates an incremental cycle of a fragmented change map, including blocks zeroed since', async () => {
    const before = await cloud.latestCheckpoint(PLAN);
    scatterWrites(volume('root'), 60, 4096, 5);
    scatterWrites(volume('data'), 30, 16 * 1024, 6);
    zeroBlock(volume('data'), 10); // inside the region the full cycle wrote
    const putsBefore = emulators.ebs.counters.succeeded.PutSnapshotBlock;

    const { outcome } = await cycle('cycle-incr-1');
    const checkpoint = await expectPublishedBitExact(outcome);
    expect(checkpoint?.sequence).toBeGreaterThan(before?.sequence ?? 0);
    // Only changed blocks travel: at most 60 + 30 scattered writes (each within two blocks) + 1.
    const puts = emulators.ebs.counters.succeeded.PutSnapshotBlock - putsBefore;
    expect(puts).toBeGreaterThan(0);
    expect(puts).toBeLessThanOrEqual(2 * (60 + 30) + 1);
  }, 180_000);

  it('stays bit-exact with chunk-writers killed mid-batch under throttling: their grants are granted again', async () => {
    scatterWrites(volume('root'), 80, 64 * 1024, 7);
    fillRegion(volume('data'), 24 * MiB, 8 * MiB, 8);
    const throttledBefore = emulators.ebs.counters.throttled.PutSnapshotBlock;

    const { outcome, events } = await cycle('cycle-killed', {
      name: 'cycle-killed',
      faults: {
        // Two writers freeze after two blocks each: nothing redelivers their grants before the tick
        // grants them again from the flows' grant marks (the queue's visibility outlasts the lease).
        kill: { invocations: [1, 3], afterPutBlocks: 2 },
        beforeInvoke: (n) => {
          if (n % 3 === 2)
            emulators.ebs.faults.throttleNext('PutSnapshotBlock', 4, 'RESOURCE_LEVEL_THROTTLE');
        },
      },
    });
    await expectPublishedBitExact(outcome);
    expect(outcome.writers.killed).toBe(2);
    expect(events.filter((e) => e.kind === 'writer' && e.outcome === 'killed')).toHaveLength(2);
    expect(emulators.ebs.counters.throttled.PutSnapshotBlock).toBeGreaterThan(throttledBefore);
  }, 240_000);

  it('stays bit-exact when every grant is delivered twice', async () => {
    scatterWrites(volume('data'), 50, 128 * 1024, 10);
    const { outcome } = await cycle('cycle-duplicates', {
      name: 'cycle-duplicates',
      faults: { duplicateDeliveries: true },
    });
    await expectPublishedBitExact(outcome);
    // Every batch was sent twice: more invocations' records than grants, yet one checkpoint.
    expect(outcome.writers.invocations).toBeGreaterThan(1);
  }, 180_000);

  it('fails a cycle loudly on AccessDenied and publishes nothing: the last good checkpoint stays current', async () => {
    const before = await cloud.latestCheckpoint(PLAN);
    fillRegion(volume('root'), 8 * MiB, 1 * MiB, 9);
    emulators.ebs.faults.accessDenied('PutSnapshotBlock');
    try {
      const { outcome, events } = await cycle('cycle-denied');
      expect(outcome.status).toBe('FAILED');
      expect(`${outcome.error} ${outcome.cause}`).toMatch(/AccessDenied|denied/i);
      expect(events.some((e) => e.kind === 'announcement')).toBe(false);
    } finally {
      emulators.ebs.faults.allowAccess('PutSnapshotBlock');
    }
    const after = await cloud.latestCheckpoint(PLAN);
    expect(after?.id).toBe(before?.id);
  }, 180_000);

  it('runs the next cycle after a failed one, bit-exact', async () => {
    const { outcome } = await cycle('cycle-after-failure');
    await expectPublishedBitExact(outcome);
  }, 180_000);
});
