// Failback's reverse plan on the deployed definition, run locally (as test/functions/local-cloud.test.ts
// runs it): a plan replicates a disk; a machine recovered from that checkpoint runs on a volume
// created from its target snapshot and changes a few blocks; the reverse plan's first cycle, given
// the shared checkpoint as its base, diffs the recovered volume's snapshot against the snapshot it was
// created from and writes only those blocks over the original side's source snapshot — incremental,
// never a full copy — and its checkpoint reads back equal to the recovered volume.
import { afterAll, beforeAll, expect, it } from 'vitest';
import { LocalCloud } from '../../local-cloud/cloud.ts';
import { type LocalEmulators, startLocalEmulators } from '../../local-cloud/start-emulators.ts';
import { fillRegion, zeroBlock } from '../../local-cloud/workload.ts';
import { MiB } from '../../shared/engine/units.ts';

let emulators: LocalEmulators;
let cloud: LocalCloud;

beforeAll(async () => {
  emulators = await startLocalEmulators();
  cloud = await LocalCloud.start({ endpoints: emulators.endpoints, snapshots: emulators.snapshots });
}, 120_000);

afterAll(async () => {
  await cloud?.stop();
  await emulators?.stop();
});

it('replicates the recovered volume back incrementally from the shared checkpoint, bit-exact', async () => {
  // Prepare: the forward plan's checkpoint of a 16 MiB disk.
  const original = cloud.ec2.createVolume(16 * MiB);
  fillRegion(cloud.ec2.volume(original), 0, 10 * MiB, 1);
  const content = Buffer.from(cloud.ec2.volume(original));
  const forward = await cloud.runExecution(
    { plan: 'erp', set: 'erp', disks: [{ disk: 'root', volumeId: original }] },
    { name: 'erp-full' },
  );
  expect(forward.status, `${forward.error}: ${forward.cause}`).toBe('SUCCEEDED');
  const shared = (await cloud.latestCheckpoint('erp'))!;
  const disk = shared.disks[0]!;
  expect((await cloud.compareSnapshot(disk.target, content)).differing).toEqual([]);

  // The recovered machine's volume, from the checkpoint's target snapshot; it rewrites 1 MiB (two
  // blocks) and zeroes one block that held data.
  const recovered = cloud.ec2.createVolumeFromSnapshot(disk.target, content);
  fillRegion(cloud.ec2.volume(recovered), 2 * MiB, 1 * MiB, 9);
  zeroBlock(cloud.ec2.volume(recovered), 16); // block 16: 8 MiB in
  const expected = Buffer.from(cloud.ec2.volume(recovered));
  const putsBefore = emulators.ebs.counters.succeeded.PutSnapshotBlock;

  // Act: the reverse plan's first cycle, its base the shared checkpoint (the console input of a failback).
  const reverse = await cloud.runExecution(
    {
      plan: 'erp-failback',
      set: 'erp-failback',
      disks: [{ disk: 'root', volumeId: recovered }],
      base: {
        checkpointId: shared.id,
        disks: [{ disk: 'root', previousSourceSnapshotId: disk.target, parentTargetSnapshotId: disk.source }],
      },
    },
    { name: 'erp-failback-1' },
  );

  // Assess: incremental, three blocks written, the whole disk equal to the recovered volume.
  expect(reverse.status, `${reverse.error}: ${reverse.cause}`).toBe('SUCCEEDED');
  const back = (await cloud.latestCheckpoint('erp-failback'))!;
  expect(back.disks[0]).toMatchObject({ disk: 'root', kind: 'incremental', bytes: 3 * 512 * 1024 });
  expect(emulators.ebs.counters.succeeded.PutSnapshotBlock - putsBefore).toBe(3);
  expect((await cloud.compareSnapshot(back.disks[0]!.target, expected)).differing).toEqual([]);
  // The original plan's catalog is untouched: its checkpoint is still the shared one.
  expect((await cloud.latestCheckpoint('erp'))?.id).toBe(shared.id);
}, 180_000);
