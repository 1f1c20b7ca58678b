// The RecoveryCompute contract: one suite, run against the in-memory fake and against the EC2 adapter
// on moto_server. What every implementation must do for launch, health and teardown to be right.
import { beforeEach, describe, expect, it } from 'vitest';
import { checkHealth } from '../../../shared/engine/recovery/health.ts';
import { launchMachine, planInstanceLaunch } from '../../../shared/engine/recovery/launch.ts';
import { RECOVERY_TAGS } from '../../../shared/engine/recovery/names.ts';
import type { RecoveryCompute, Tags } from '../../../shared/engine/recovery/ports.ts';
import { teardownJob, verifyTeardown } from '../../../shared/engine/recovery/teardown.ts';
import type { ResolvedMachine } from '../../../shared/engine/recovery/types.ts';

export interface ComputeFixture {
  readonly compute: RecoveryCompute;
  /** A completed snapshot of `sizeGiB` with `tags` (a replica's target snapshot). */
  snapshot(sizeGiB: number, tags?: Tags): Promise<string>;
  /** A subnet and its zone, and a security group of its VPC. */
  network(): Promise<{ subnetId: string; availabilityZone: string; groupId: string }>;
  /** Lets instances reach running with passing status checks (the fake boots; EC2/moto do by themselves). */
  boot(): Promise<void>;
}

const clock = { now: () => Date.parse('2026-12-05T12:00:00.000Z') };

export function computeContract(name: string, setup: () => Promise<ComputeFixture>) {
  describe(`RecoveryCompute contract: ${name}`, () => {
    let f: ComputeFixture;
    let app: ResolvedMachine;
    let files: ResolvedMachine;
    let replica: string[];

    beforeEach(async () => {
      f = await setup();
      const net = await f.network();
      replica = [
        await f.snapshot(8, { 'ferry:role': 'target' }),
        await f.snapshot(2, { 'ferry:role': 'target' }),
        await f.snapshot(1, { 'ferry:role': 'target' }),
      ];
      app = {
        name: 'app',
        kind: 'instance',
        bootDisk: 'root',
        dataDisks: ['data'],
        instanceType: 'm5.large',
        subnetId: net.subnetId,
        securityGroupIds: [net.groupId],
        architecture: 'x86_64',
        bootMode: 'uefi',
        ena: true,
        platform: 'linux',
        tags: { team: 'erp' },
        disks: [
          { disk: 'root', snapshotId: replica[0]!, sizeGiB: 8, deviceName: '/dev/xvda' },
          { disk: 'data', snapshotId: replica[1]!, sizeGiB: 2, deviceName: '/dev/sdf' },
        ],
      };
      files = {
        name: 'files',
        kind: 'volumes',
        dataDisks: ['logs'],
        availabilityZone: net.availabilityZone,
        architecture: 'x86_64',
        ena: false,
        platform: 'linux',
        disks: [{ disk: 'logs', snapshotId: replica[2]!, sizeGiB: 1, deviceName: '/dev/sdf' }],
      };
    });

    it('reads facts: snapshots that exist, subnets, groups and instance types; unknown ids are absent', async () => {
      const snaps = await f.compute.describeSnapshots([replica[0]!, 'snap-0123456789abcdef0']);
      expect(snaps).toEqual([{ snapshotId: replica[0], state: 'completed', sizeGiB: 8 }]);
      const types = await f.compute.describeInstanceTypes(['m5.large', 'zz9.huge']);
      expect(types).toHaveLength(1);
      expect(types[0]).toMatchObject({ instanceType: 'm5.large', ena: 'required', nvme: 'required' });
      expect(types[0]!.architectures).toContain('x86_64');
      const subnets = await f.compute.describeSubnets([app.subnetId!, 'subnet-0123456789abcdef0']);
      expect(subnets.map((s) => s.subnetId)).toEqual([app.subnetId]);
      const groups = await f.compute.describeSecurityGroups(app.securityGroupIds!);
      expect(groups[0]!.vpcId).toBe(subnets[0]!.vpcId);
    });

    it('launches from the replica snapshots, tags everything with the job, and is healthy once booted', async () => {
      const ctx = { jobId: 'drill-1', mode: 'drill' as const, plan: 'erp' };
      const launched = [await launchMachine({ compute: f.compute, clock }, ctx, app)];
      launched.push(await launchMachine({ compute: f.compute, clock }, ctx, files));
      const found = await f.compute.listTagged(RECOVERY_TAGS.job, 'drill-1');
      expect(found.instances.map((i) => i.instanceId)).toEqual([launched[0]!.instanceId]);
      expect(found.images.map((i) => i.imageId)).toEqual([launched[0]!.imageId]);
      expect(found.instances[0]!.tags).toMatchObject({
        [RECOVERY_TAGS.job]: 'drill-1',
        [RECOVERY_TAGS.mode]: 'drill',
        [RECOVERY_TAGS.drill]: 'true',
        [RECOVERY_TAGS.machine]: 'app',
        [RECOVERY_TAGS.plan]: 'erp',
        team: 'erp',
      });
      expect(found.images[0]!.tags[RECOVERY_TAGS.job]).toBe('drill-1');
      // The volumes-only machine's volume, and the instance's own volumes, carry the job's tag.
      expect(found.volumes.map((v) => v.volumeId)).toEqual(
        expect.arrayContaining([...launched[1]!.volumeIds]),
      );
      // The replica's snapshots are not the job's.
      expect(found.snapshots).toEqual([]);
      await f.boot();
      const health = await checkHealth({ compute: f.compute, clock }, launched, {
        startedAt: '2026-12-05T11:59:00.000Z',
      });
      expect(health).toMatchObject({ done: true, healthy: true, secondsToRunning: 60 });
      // Which volume holds which disk: by the device names the launch gave them (what a failback reads).
      const [observed] = await f.compute.describeInstances([launched[0]!.instanceId!]);
      const devices = (observed?.volumes ?? []).map((v) => v.deviceName).sort();
      expect(devices).toEqual(['/dev/sdf', '/dev/xvda']);
      const tagged = new Set(found.volumes.map((v) => v.volumeId));
      for (const v of observed!.volumes!) expect(tagged.has(v.volumeId), v.deviceName).toBe(true);
      // The console (what a bootMessage is looked for in): text or nothing yet; an unknown instance has none.
      const console = await f.compute.consoleOutput(launched[0]!.instanceId!);
      expect(console === undefined || typeof console === 'string').toBe(true);
      expect(await f.compute.consoleOutput('i-0123456789abcdef0')).toBeUndefined();
    });

    it('a retried launch creates nothing more; registering the same image again answers the same image', async () => {
      const ctx = { jobId: 'drill-2', mode: 'drill' as const };
      const first = await launchMachine({ compute: f.compute, clock }, ctx, app);
      const again = await launchMachine({ compute: f.compute, clock }, ctx, app);
      expect(again.instanceId).toBe(first.instanceId);
      expect(again.imageId).toBe(first.imageId);
      const vols = await launchMachine({ compute: f.compute, clock }, ctx, files);
      expect((await launchMachine({ compute: f.compute, clock }, ctx, files)).volumeIds).toEqual(
        vols.volumeIds,
      );
      const { image } = planInstanceLaunch(ctx, app);
      expect(await f.compute.registerImage(image)).toBe(first.imageId);
      const found = await f.compute.listTagged(RECOVERY_TAGS.job, 'drill-2');
      expect(found.instances).toHaveLength(1);
      expect(found.images).toHaveLength(1);
    });

    it('teardown leaves nothing by tag, spares the replica and other jobs, and is idempotent', async () => {
      const ctx = { jobId: 'drill-3', mode: 'drill' as const };
      await launchMachine({ compute: f.compute, clock }, ctx, app);
      await launchMachine({ compute: f.compute, clock }, ctx, files);
      const other = await launchMachine(
        { compute: f.compute, clock },
        { jobId: 'drill-4', mode: 'drill' },
        { ...files, name: 'other' },
      );
      const own = await f.snapshot(1, { [RECOVERY_TAGS.job]: 'drill-3' });
      let result = await teardownJob({ compute: f.compute }, 'drill-3');
      expect(result.terminated).toHaveLength(1);
      expect(result.deregistered).toHaveLength(1);
      expect(result.deletedSnapshots).toEqual([own]);
      // Attached volumes go with their instance or on a later pass: teardown runs until verify is clean.
      for (
        let pass = 0;
        pass < 5 && !(await verifyTeardown({ compute: f.compute }, 'drill-3')).clean;
        pass++
      ) {
        result = await teardownJob({ compute: f.compute }, 'drill-3');
      }
      expect(await verifyTeardown({ compute: f.compute }, 'drill-3')).toEqual({
        clean: true,
        remaining: { instances: 0, volumes: 0, images: 0, snapshots: 0 },
      });
      const survivors = await f.compute.describeSnapshots(replica);
      expect(survivors.map((s) => s.snapshotId).sort()).toEqual([...replica].sort());
      const others = await f.compute.listTagged(RECOVERY_TAGS.job, 'drill-4');
      expect(others.volumes.map((v) => v.volumeId)).toEqual(other.volumeIds);
      expect(await teardownJob({ compute: f.compute }, 'drill-3')).toEqual({
        terminated: [],
        deregistered: [],
        deletedVolumes: [],
        deletedSnapshots: [],
        waiting: [],
      });
    });
  });
}
