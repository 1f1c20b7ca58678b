// launch (what is asked of EC2, tags, idempotent retries), health (status checks, first healthy time,
// RTO, failures), teardown (only the job's resources, idempotent, verified) and the report.
import { describe, expect, it } from 'vitest';
import { assessHealth, checkHealth } from '../../../shared/engine/recovery/health.ts';
import {
  launchMachine,
  planInstanceLaunch,
  planVolumeLaunch,
} from '../../../shared/engine/recovery/launch.ts';
import {
  launchClientToken,
  RECOVERY_TAGS,
  recoveryImageName,
} from '../../../shared/engine/recovery/names.ts';
import type { RecoveryRecords } from '../../../shared/engine/recovery/ports.ts';
import { buildReport, recordRecovery } from '../../../shared/engine/recovery/report.ts';
import { teardownJob, teardownPlan, verifyTeardown } from '../../../shared/engine/recovery/teardown.ts';
import type { LaunchResult, RecoveryReport, ResolvedMachine } from '../../../shared/engine/recovery/types.ts';
import { FakeCompute } from './fake-compute.ts';
import { fixedClock } from './fixtures.ts';

const KMS = 'arn:aws:kms:us-east-1:123456789012:key/11111111-2222-3333-4444-555555555555';

function machines(compute: FakeCompute): { app: ResolvedMachine; files: ResolvedMachine } {
  const root = compute.addSnapshot(8, { 'ferry:role': 'target' });
  const data = compute.addSnapshot(20, { 'ferry:role': 'target' });
  const logs = compute.addSnapshot(4, { 'ferry:role': 'target' });
  return {
    app: {
      name: 'app',
      kind: 'instance',
      bootDisk: 'root',
      dataDisks: ['data'],
      instanceType: 'm5.large',
      subnetId: 'subnet-0000000000000000a',
      securityGroupIds: ['sg-0000000000000000a'],
      architecture: 'x86_64',
      bootMode: 'uefi',
      ena: true,
      platform: 'linux',
      tags: { team: 'erp', Name: 'erp app' },
      disks: [
        { disk: 'root', snapshotId: root, sizeGiB: 8, deviceName: '/dev/xvda' },
        { disk: 'data', snapshotId: data, sizeGiB: 20, deviceName: '/dev/sdf' },
      ],
    },
    files: {
      name: 'files',
      kind: 'volumes',
      dataDisks: ['logs'],
      availabilityZone: 'us-east-1a',
      architecture: 'x86_64',
      ena: false,
      platform: 'linux',
      disks: [{ disk: 'logs', snapshotId: logs, sizeGiB: 4, deviceName: '/dev/sdf' }],
    },
  };
}

describe('launch planning', () => {
  it('registers the boot disk as root and data disks as mappings, tags the image only, encrypts at launch', () => {
    const compute = new FakeCompute();
    const { app } = machines(compute);
    const plan = planInstanceLaunch({ jobId: 'drill-1', mode: 'drill', plan: 'erp', kmsKeyArn: KMS }, app);
    expect(plan.image).toMatchObject({
      name: recoveryImageName('drill-1', 'app'),
      architecture: 'x86_64',
      bootMode: 'uefi',
      ena: true,
      rootDeviceName: '/dev/xvda',
      devices: [
        {
          deviceName: '/dev/xvda',
          snapshotId: app.disks[0]!.snapshotId,
          sizeGiB: 8,
          deleteOnTermination: true,
        },
        {
          deviceName: '/dev/sdf',
          snapshotId: app.disks[1]!.snapshotId,
          sizeGiB: 20,
          deleteOnTermination: true,
        },
      ],
    });
    expect(plan.image.tags).toEqual({
      Name: 'erp app',
      team: 'erp',
      [RECOVERY_TAGS.job]: 'drill-1',
      [RECOVERY_TAGS.mode]: 'drill',
      [RECOVERY_TAGS.machine]: 'app',
      [RECOVERY_TAGS.plan]: 'erp',
      [RECOVERY_TAGS.drill]: 'true',
    });
    expect(plan.instance).toMatchObject({
      instanceType: 'm5.large',
      subnetId: 'subnet-0000000000000000a',
      securityGroupIds: ['sg-0000000000000000a'],
      kmsKeyArn: KMS,
      clientToken: launchClientToken('drill-1', 'app', 'instance'),
    });
    expect(plan.instance.clientToken.length).toBeLessThanOrEqual(64);
  });

  it('a failover keeps its volumes when the instance is terminated and is not tagged as a drill', () => {
    const compute = new FakeCompute();
    const { app } = machines(compute);
    const plan = planInstanceLaunch({ jobId: 'fo-1', mode: 'failover' }, app);
    expect(plan.instance.devices.every((d) => !d.deleteOnTermination)).toBe(true);
    expect(plan.image.tags[RECOVERY_TAGS.drill]).toBeUndefined();
    // The user's tags cannot overwrite the job's own.
    const forged = planInstanceLaunch(
      { jobId: 'fo-1', mode: 'failover' },
      {
        ...app,
        tags: { [RECOVERY_TAGS.job]: 'other' },
      },
    );
    expect(forged.image.tags[RECOVERY_TAGS.job]).toBe('fo-1');
  });

  it('client tokens and image names are deterministic per job and machine, and distinct across them', () => {
    expect(launchClientToken('j', 'a', 'instance')).toBe(launchClientToken('j', 'a', 'instance'));
    expect(launchClientToken('j', 'a', 'instance')).not.toBe(launchClientToken('j', 'b', 'instance'));
    expect(launchClientToken('j', 'a', 'instance')).not.toBe(launchClientToken('k', 'a', 'instance'));
    const long = recoveryImageName('j'.repeat(80), 'm'.repeat(128));
    expect(long.length).toBeLessThanOrEqual(128);
    expect(recoveryImageName('job:1', 'db#2')).toMatch(/^[A-Za-z0-9()[\] ./'@_-]{3,128}$/);
  });

  it('a volumes-only machine is one encrypted volume per disk in its zone, tagged with the disk', () => {
    const compute = new FakeCompute();
    const { files } = machines(compute);
    const [spec] = planVolumeLaunch({ jobId: 'j', mode: 'failover', kmsKeyArn: KMS }, files);
    expect(spec).toMatchObject({
      snapshotId: files.disks[0]!.snapshotId,
      sizeGiB: 4,
      availabilityZone: 'us-east-1a',
      kmsKeyArn: KMS,
    });
    expect(spec!.tags[RECOVERY_TAGS.disk]).toBe('logs');
  });
});

describe('launchMachine', () => {
  it('launches once: a retry finds the image and instance by tag and creates nothing more', async () => {
    const compute = new FakeCompute();
    const { app, files } = machines(compute);
    const deps = { compute, clock: fixedClock() };
    const ctx = { jobId: 'drill-1', mode: 'drill' as const };
    const first = await launchMachine(deps, ctx, app);
    const again = await launchMachine(deps, ctx, app);
    expect(again).toEqual(first);
    expect(first).toMatchObject({ name: 'app', kind: 'instance', launchedAt: '2026-12-05T12:00:00.000Z' });
    expect(compute.calls.filter((c) => c === 'registerImage')).toHaveLength(1);
    expect(compute.calls.filter((c) => c === 'runInstance')).toHaveLength(1);
    const vols = await launchMachine(deps, ctx, files);
    expect(await launchMachine(deps, ctx, files)).toEqual(vols);
    expect(vols.volumeIds).toHaveLength(1);
    expect(compute.calls.filter((c) => c === 'createVolume')).toHaveLength(1);
  });
});

describe('health', () => {
  const launched: LaunchResult[] = [
    { name: 'app', kind: 'instance', instanceId: 'i-1', imageId: 'ami-1', volumeIds: [], launchedAt: 'x' },
    { name: 'files', kind: 'volumes', volumeIds: ['vol-1'], launchedAt: 'x' },
  ];
  const startedAt = '2026-12-05T12:00:00.000Z';
  const at = (s: number) => Date.parse(startedAt) + s * 1000;
  const ok = { instanceId: 'i-1', state: 'running', systemStatus: 'ok', instanceStatus: 'ok' };

  it('waits while status checks initialise, then reports healthy with the RTO to the first healthy poll', () => {
    const volumes = [{ volumeId: 'vol-1', state: 'available' }];
    const booting = assessHealth(
      launched,
      { instances: [{ ...ok, instanceStatus: 'initializing' }], volumes },
      { startedAt, now: at(60) },
    );
    expect(booting).toMatchObject({ done: false, healthy: false });
    expect(booting.machines[1]).toMatchObject({
      name: 'files',
      healthy: true,
      healthyAt: new Date(at(60)).toISOString(),
    });
    const up = assessHealth(
      launched,
      { instances: [ok], volumes },
      { startedAt, now: at(200), previous: booting },
    );
    expect(up).toMatchObject({ done: true, healthy: true, secondsToRunning: 200 });
    // A later poll keeps the first healthy times: the RTO does not grow.
    const later = assessHealth(
      launched,
      { instances: [ok], volumes },
      { startedAt, now: at(400), previous: up },
    );
    expect(later.secondsToRunning).toBe(200);
  });

  it('an impaired guest or a terminated instance ends the wait unhealthy, with the reason', () => {
    const volumes = [{ volumeId: 'vol-1', state: 'available' }];
    const impaired = assessHealth(
      launched,
      { instances: [{ ...ok, instanceStatus: 'impaired' }], volumes },
      { startedAt, now: at(300) },
    );
    expect(impaired).toMatchObject({ done: true, healthy: false });
    expect(impaired.machines[0]!.reason).toContain('instance (the guest did not boot');
    const gone = assessHealth(
      launched,
      { instances: [{ ...ok, state: 'terminated', stateReason: 'Server.InternalError' }], volumes },
      { startedAt, now: at(30) },
    );
    expect(gone.machines[0]!.reason).toBe('instance is terminated: Server.InternalError');
    expect(gone.done).toBe(true);
  });

  it('gives up at the timeout, and an instance EC2 does not list yet is waited for', () => {
    const volumes = [{ volumeId: 'vol-1', state: 'creating' }];
    const early = assessHealth(
      launched,
      { instances: [], volumes },
      { startedAt, now: at(5), timeoutSeconds: 600 },
    );
    expect(early).toMatchObject({ done: false, healthy: false });
    const late = assessHealth(
      launched,
      { instances: [], volumes },
      { startedAt, now: at(601), timeoutSeconds: 600 },
    );
    expect(late).toMatchObject({ done: true, healthy: false });
    expect(late.machines[0]!.reason).toBe('not healthy 600 s after the job started');
  });

  it('checkHealth asks EC2 about exactly the launched instances and volumes', async () => {
    const compute = new FakeCompute();
    const { app, files } = machines(compute);
    const deps = { compute, clock: fixedClock() };
    const ctx = { jobId: 'j', mode: 'failover' as const };
    const all = [await launchMachine(deps, ctx, app), await launchMachine(deps, ctx, files)];
    expect((await checkHealth(deps, all, { startedAt })).done).toBe(false);
    compute.boot();
    expect(await checkHealth(deps, all, { startedAt })).toMatchObject({
      done: true,
      healthy: true,
      secondsToRunning: 0,
    });
  });

  it('a machine with a bootMessage is healthy only once its console shows it, besides the status checks', async () => {
    // Prepare
    const compute = new FakeCompute();
    const { app } = machines(compute);
    const clock = fixedClock();
    const deps = { compute, clock };
    const launched = [
      await launchMachine(deps, { jobId: 'j', mode: 'drill' }, { ...app, bootMessage: 'login:' }),
    ];
    expect(launched[0]!.bootMessage).toBe('login:');
    const id = launched[0]!.instanceId!;
    compute.boot();
    // Act / Assess: checks pass, no console yet, then a console still booting: not healthy, not failed.
    const poll = () => checkHealth(deps, launched, { startedAt, timeoutSeconds: 600 });
    expect(await poll()).toMatchObject({
      done: false,
      machines: [{ healthy: false, reason: 'status checks pass, but its console has no output yet' }],
    });
    compute.consoles.set(id, '[    1.2] EXT4-fs (nvme0n1p1): mounted\nStarting systemd-journald\n');
    expect(await poll()).toMatchObject({
      done: false,
      machines: [
        { healthy: false, reason: 'status checks pass, but its console does not show "login:" yet' },
      ],
    });
    // A guest that never gets there is reported with the reason at the timeout.
    clock.advance(700_000);
    const late = await poll();
    expect(late).toMatchObject({ done: true, healthy: false });
    expect(late.machines[0]!.reason).toBe(
      'not healthy 600 s after the job started: status checks pass, but its console does not show "login:" yet',
    );
    compute.consoles.set(id, 'Ubuntu 24.04 LTS web-1 ttyS0\n\nweb-1 login: ');
    expect(await checkHealth(deps, launched, { startedAt })).toMatchObject({ done: true, healthy: true });
    // Without a bootMessage the console is never read.
    const calls: string[] = [];
    const spy = {
      ...deps,
      compute: Object.assign(Object.create(compute), {
        consoleOutput: async (i: string) => void calls.push(i),
      }),
    };
    await checkHealth(spy, [{ ...launched[0]!, bootMessage: undefined }], { startedAt });
    expect(calls).toEqual([]);
  });
});

describe('teardown', () => {
  async function launchedWorld() {
    const compute = new FakeCompute();
    const { app, files } = machines(compute);
    const deps = { compute, clock: fixedClock() };
    await launchMachine(deps, { jobId: 'drill-1', mode: 'drill' }, app);
    await launchMachine(deps, { jobId: 'drill-1', mode: 'drill' }, files);
    await launchMachine(deps, { jobId: 'drill-2', mode: 'drill' }, { ...files, name: 'other' });
    const ownSnapshot = compute.addSnapshot(1, { [RECOVERY_TAGS.job]: 'drill-1' });
    return { compute, app, files, ownSnapshot };
  }

  it('removes only what the job created: the replica snapshots and another job survive; a rerun does nothing', async () => {
    const { compute, app, ownSnapshot } = await launchedWorld();
    const replica = app.disks.map((d) => d.snapshotId);
    const first = await teardownJob({ compute }, 'drill-1');
    expect(first.terminated).toHaveLength(1);
    expect(first.deregistered).toHaveLength(1);
    expect(first.deletedSnapshots).toEqual([ownSnapshot]);
    expect(first.deletedVolumes).toHaveLength(1);
    for (const id of replica) expect(compute.snapshots.has(id)).toBe(true);
    expect(await verifyTeardown({ compute }, 'drill-1')).toEqual({
      clean: true,
      remaining: { instances: 0, volumes: 0, images: 0, snapshots: 0 },
    });
    expect((await verifyTeardown({ compute }, 'drill-2')).clean).toBe(false);
    const again = await teardownJob({ compute }, 'drill-1');
    expect(again).toEqual({
      terminated: [],
      deregistered: [],
      deletedVolumes: [],
      deletedSnapshots: [],
      waiting: [],
    });
  });

  it('a volume still attached waits for a later pass; verify counts it', async () => {
    const compute = new FakeCompute();
    const { app } = machines(compute);
    await launchMachine({ compute, clock: fixedClock() }, { jobId: 'fo-1', mode: 'failover' }, app);
    // A failover's volumes outlive the instance (not deleted on termination) and are attached while
    // it shuts down: the first pass terminates and waits, the second deletes them.
    const volumes = [...compute.volumes.keys()];
    const first = await teardownJob({ compute }, 'fo-1');
    expect(first.terminated).toHaveLength(1);
    expect(first.waiting).toEqual(volumes);
    expect((await verifyTeardown({ compute }, 'fo-1')).remaining.volumes).toBeGreaterThan(0);
    const second = await teardownJob({ compute }, 'fo-1', first);
    expect(second.deletedVolumes).toEqual(volumes);
    // Given the first round, the second's answer is the whole teardown: the instance the first
    // terminated is counted once, and nothing waits any more.
    expect(second.terminated).toEqual(first.terminated);
    expect(second.waiting).toEqual([]);
    expect((await verifyTeardown({ compute }, 'fo-1')).clean).toBe(true);
  });

  it('never acts on a resource without the job tag, whatever the lister answers', () => {
    const plan = teardownPlan('j1', {
      instances: [{ instanceId: 'i-1', state: 'running', tags: { [RECOVERY_TAGS.job]: 'j2' } }],
      volumes: [{ volumeId: 'vol-1', state: 'available', tags: {} }],
      images: [{ imageId: 'ami-1', state: 'available', tags: { [RECOVERY_TAGS.job]: 'j1x' } }],
      snapshots: [{ snapshotId: 'snap-1', state: 'completed', tags: { 'ferry:role': 'target' } }],
    });
    expect(plan).toEqual({
      terminate: [],
      deregister: [],
      deleteVolumes: [],
      waiting: [],
      deleteSnapshots: [],
    });
  });
});

describe('report', () => {
  const checkpoint = { id: 'erp/c3', sequence: 3, publishedAt: '2026-12-05T11:50:00.000Z' };
  const base = { plan: 'erp', set: 'erp', checkpoint, startedAt: '2026-12-05T12:00:00.000Z' };
  const health = {
    done: true,
    healthy: true,
    secondsToRunning: 185,
    machines: [{ name: 'app', state: 'running', systemStatus: 'ok', instanceStatus: 'ok', healthy: true }],
  };
  const launched = [
    { name: 'app', kind: 'instance' as const, instanceId: 'i-1', volumeIds: [], launchedAt: 'x' },
  ];
  const teardown = {
    terminated: ['i-1'],
    deregistered: ['ami-1'],
    deletedVolumes: [],
    deletedSnapshots: [],
    waiting: [],
  };
  const clean = { clean: true, remaining: { instances: 0, volumes: 0, images: 0, snapshots: 0 } };

  it('a drill: RTO, health per machine, clean-up counts, succeeded', () => {
    const r = buildReport('d1', { ...base, mode: 'drill', launched, health, teardown, verify: clean }, 'END');
    expect(r).toMatchObject({
      jobId: 'd1',
      outcome: 'succeeded',
      secondsToRunning: 185,
      finishedAt: 'END',
      machines: [{ name: 'app', kind: 'instance', instanceId: 'i-1', healthy: true, state: 'running' }],
      cleanup: { terminated: 1, deregistered: 1, deletedVolumes: 0, deletedSnapshots: 0, clean: true },
    });
  });

  it('outcomes: left-over resources, unhealthy machines, a caught error, a cleanup job', () => {
    const dirty = { clean: false, remaining: { instances: 1, volumes: 0, images: 0, snapshots: 0 } };
    const sick = { ...health, healthy: false };
    expect(buildReport('d', { ...base, mode: 'drill', health, verify: dirty }, 'E').outcome).toBe(
      'cleanup-failed',
    );
    expect(buildReport('d', { ...base, mode: 'drill', health: sick, verify: clean }, 'E').outcome).toBe(
      'unhealthy',
    );
    expect(
      buildReport('d', { ...base, mode: 'drill', health: sick, verify: clean }, 'E').secondsToRunning,
    ).toBeUndefined();
    const failed = buildReport(
      'f',
      { ...base, mode: 'failover', error: { Error: 'CloudRequestError', Cause: 'x'.repeat(5000) } },
      'E',
    );
    expect(failed.outcome).toBe('failed');
    expect(failed.error!.length).toBe(1000);
    expect(buildReport('c', { ...base, mode: 'cleanup', teardown, verify: clean }, 'E').outcome).toBe(
      'cleaned-up',
    );
    expect(buildReport('c', { ...base, mode: 'cleanup', verify: dirty }, 'E').outcome).toBe('cleanup-failed');
  });

  it('a migration reports its data-loss window: zero when quiesced, else from publication to the first launch', () => {
    expect(
      buildReport('m', { ...base, mode: 'migration', health, sourceQuiesced: true }, 'E')
        .dataLossWindowSeconds,
    ).toBe(0);
    // The final checkpoint is published after the job started: the window runs to the cutover.
    const published = { ...checkpoint, publishedAt: '2026-12-05T12:05:00.000Z' };
    const cutAt = (launchedAt: string) => [{ ...launched[0]!, launchedAt }];
    expect(
      buildReport(
        'm',
        {
          ...base,
          mode: 'migration',
          checkpoint: published,
          launched: [...cutAt('2026-12-05T12:06:30.000Z'), ...cutAt('2026-12-05T12:06:10.000Z')],
          health,
        },
        'E',
      ).dataLossWindowSeconds,
    ).toBe(70);
    // Nothing launched: the source is still the primary, nothing was lost.
    expect(
      buildReport('m', { ...base, mode: 'migration', checkpoint: published, health }, 'E')
        .dataLossWindowSeconds,
    ).toBeUndefined();
    expect(
      buildReport('f', { ...base, mode: 'failover', health }, 'E').dataLossWindowSeconds,
    ).toBeUndefined();
  });

  it('record writes the report and marks a failover that launched machines', async () => {
    const put: RecoveryReport[] = [];
    const marked: RecoveryReport[] = [];
    const records: RecoveryRecords = {
      put: async (r) => void put.push(r),
      markFailedOver: async (r) => void marked.push(r),
      clearFailedOver: async () => {
        throw new Error('only a failback cutover clears a mark');
      },
    };
    const deps = { records, clock: fixedClock('2026-12-05T12:10:00.000Z') };
    const r = await recordRecovery(deps, 'fo', { ...base, mode: 'failover', launched, health });
    expect(r.finishedAt).toBe('2026-12-05T12:10:00.000Z');
    expect(put).toEqual([r]);
    expect(marked).toEqual([r]);
    await recordRecovery(deps, 'd', { ...base, mode: 'drill', launched, health, verify: clean });
    await recordRecovery(deps, 'f2', { ...base, mode: 'failover', error: { Error: 'RecoveryRefusedError' } });
    expect(marked).toHaveLength(1);
  });
});
