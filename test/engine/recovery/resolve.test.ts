// resolve: checkpoint choice, disk assignment, device names, drill isolation and boot-ability, all
// refused before anything is created, each refusal naming its field.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import type { RecoveryCheckpoint } from '../../../shared/engine/ports.ts';
import { RecoveryRefusedError } from '../../../shared/engine/recovery/errors.ts';
import { planMachines, resolveRecovery } from '../../../shared/engine/recovery/resolve.ts';
import type { PlanRecoveryDefaults, ResolveRequest } from '../../../shared/engine/recovery/types.ts';
import { FakeCompute } from './fake-compute.ts';
import { ebsCheckpoint, resolveDeps } from './fixtures.ts';

function world() {
  const compute = new FakeCompute();
  const prodSubnet = compute.addSubnet('vpc-0000000000000000a', 'us-east-1a');
  const drillSubnet = compute.addSubnet('vpc-0000000000000000b', 'us-east-1b');
  const drillGroup = compute.addGroup('vpc-0000000000000000b');
  const prodGroup = compute.addGroup('vpc-0000000000000000a');
  const catalog = [
    ebsCheckpoint(compute, 'erp', 1, { root: 8, data: 20, logs: 4, spare: 1 }),
    ebsCheckpoint(compute, 'erp', 2, { root: 8, data: 20, logs: 4, spare: 1 }),
    ebsCheckpoint(compute, 'erp', 3, { root: 8, data: 20, logs: 4, spare: 1 }),
  ];
  const defaults: PlanRecoveryDefaults = {
    set: 'erp',
    machines: [
      {
        name: 'app',
        bootDisk: 'root',
        dataDisks: ['data'],
        instanceType: 'm5.large',
        subnetId: prodSubnet,
        securityGroupIds: [prodGroup],
        ena: true,
        tags: { team: 'erp' },
      },
      { name: 'archive', dataDisks: ['logs'], availabilityZone: 'us-east-1a' },
    ],
    drillSubnetId: drillSubnet,
    drillSecurityGroupIds: [drillGroup],
  };
  return { compute, catalog, defaults, prodSubnet, drillSubnet, drillGroup, prodGroup };
}

const request = (over: Partial<ResolveRequest> = {}): ResolveRequest => ({
  jobId: 'drill-1',
  mode: 'drill',
  plan: 'erp-plan',
  ...over,
});

async function refusal(p: Promise<unknown>): Promise<RecoveryRefusedError> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(RecoveryRefusedError);
  return err as RecoveryRefusedError;
}

describe('resolve', () => {
  it('resolves a drill of the latest checkpoint: machines, devices, sizes, the drill subnet and TTL', async () => {
    // Prepare
    const w = world();
    // Act
    const out = await resolveRecovery(resolveDeps(w.compute, w.catalog), request(), w.defaults);
    // Assess
    const latest = w.catalog[2]!;
    expect(out.checkpoint).toEqual({ id: 'erp/cycle-3', sequence: 3, publishedAt: latest.createdAt });
    expect(out.set).toBe('erp');
    expect(out.ttlSeconds).toBe(3600);
    expect(out.startedAt).toBe('2026-12-05T12:00:00.000Z');
    expect(out.unusedDisks).toEqual(['spare']);
    const app = out.machines.find((m) => m.name === 'app')!;
    expect(app).toMatchObject({
      kind: 'instance',
      instanceType: 'm5.large',
      subnetId: w.drillSubnet,
      securityGroupIds: [w.drillGroup],
      architecture: 'x86_64',
      bootMode: 'legacy-bios',
      ena: true,
      platform: 'linux',
      tags: { team: 'erp' },
    });
    expect(app.disks).toEqual([
      { disk: 'root', snapshotId: latest.disks[0]!.targetRef, sizeGiB: 8, deviceName: '/dev/xvda' },
      { disk: 'data', snapshotId: latest.disks[1]!.targetRef, sizeGiB: 20, deviceName: '/dev/sdf' },
    ]);
    const archive = out.machines.find((m) => m.name === 'archive')!;
    expect(archive.kind).toBe('volumes');
    expect(archive.disks).toEqual([
      { disk: 'logs', snapshotId: latest.disks[2]!.targetRef, sizeGiB: 4, deviceName: '/dev/sdf' },
    ]);
    expect(w.compute.calls).toEqual([]);
  });

  it('a failover uses the machines own subnet; an event machine overrides its defaults field by field', async () => {
    const w = world();
    const out = await resolveRecovery(
      resolveDeps(w.compute, w.catalog),
      request({ mode: 'failover', machines: [{ name: 'app', instanceType: 't2.micro' }] }),
      w.defaults,
    );
    const app = out.machines.find((m) => m.name === 'app')!;
    expect(app).toMatchObject({ instanceType: 't2.micro', subnetId: w.prodSubnet, bootDisk: 'root' });
    expect(out.ttlSeconds).toBe(0);
  });

  it('picks a checkpoint by number, by id and by time', async () => {
    const w = world();
    const deps = resolveDeps(w.compute, w.catalog);
    expect((await resolveRecovery(deps, request({ checkpoint: 1 }), w.defaults)).checkpoint.sequence).toBe(1);
    expect(
      (await resolveRecovery(deps, request({ checkpoint: 'erp/cycle-2' }), w.defaults)).checkpoint.id,
    ).toBe('erp/cycle-2');
    const at = await resolveRecovery(
      deps,
      request({ checkpoint: { at: '2026-12-02T23:00:00Z' } }),
      w.defaults,
    );
    expect(at.checkpoint.sequence).toBe(2);
    expect((await resolveRecovery(deps, request({ ttlMinutes: 15 }), w.defaults)).ttlSeconds).toBe(900);
  });

  it('refuses a checkpoint the catalog does not hold, and a time before the first', async () => {
    const w = world();
    const deps = resolveDeps(w.compute, w.catalog);
    const unknown = await refusal(resolveRecovery(deps, request({ checkpoint: 9 }), w.defaults));
    expect(unknown.field).toBe('checkpoint');
    expect(unknown.message).toContain(
      'checkpoint 9 is not in the catalog: set erp has checkpoints erp/cycle-1',
    );
    const early = await refusal(
      resolveRecovery(deps, request({ checkpoint: { at: '2026-01-01T00:00:00Z' } }), w.defaults),
    );
    expect(early.field).toBe('checkpoint.at');
  });

  it('a migration recovers exactly its final cycle checkpoint, even when a newer one exists', async () => {
    const w = world();
    const deps = resolveDeps(w.compute, w.catalog);
    const out = await resolveRecovery(
      deps,
      request({ mode: 'migration', finalCycle: { checkpointId: 'erp/cycle-2' } }),
      w.defaults,
    );
    expect(out.checkpoint.id).toBe('erp/cycle-2');
    const missing = await refusal(resolveRecovery(deps, request({ mode: 'migration' }), w.defaults));
    expect(missing.field).toBe('finalCycle.checkpointId');
    const both = await refusal(
      resolveRecovery(
        deps,
        request({ mode: 'migration', checkpoint: 'latest', finalCycle: { checkpointId: 'erp/cycle-2' } }),
        w.defaults,
      ),
    );
    expect(both.field).toBe('checkpoint');
  });

  it('refuses a checkpoint whose snapshot is gone: no longer recoverable, nothing created', async () => {
    const w = world();
    w.compute.snapshots.delete(w.catalog[2]!.disks[1]!.targetRef!);
    const err = await refusal(resolveRecovery(resolveDeps(w.compute, w.catalog), request(), w.defaults));
    expect(err.message).toContain('checkpoint erp/cycle-3 is no longer recoverable: snapshot');
    expect(err.message).toContain('of disk data does not exist');
    expect(err.field).toBe('checkpoint');
    expect(w.compute.calls).toEqual([]);
  });

  it('refuses a disk given to two machines, naming both, and a disk the checkpoint lacks', async () => {
    const w = world();
    const deps = resolveDeps(w.compute, w.catalog);
    const twice = await refusal(
      resolveRecovery(deps, request({ machines: [{ name: 'extra', dataDisks: ['data'] }] }), w.defaults),
    );
    expect(twice.message).toContain("machine extra: disk data is already machine app's");
    expect(twice.field).toBe('machines[0].dataDisks[0]');
    const absent = await refusal(
      resolveRecovery(deps, request({ machines: [{ name: 'app', dataDisks: ['nope'] }] }), w.defaults),
    );
    expect(absent.message).toContain(
      'disk nope is not in checkpoint erp/cycle-3 (its disks: root, data, logs, spare)',
    );
    expect(absent.field).toBe('machines[0].dataDisks[0]');
  });

  it('refuses a plan with no machines, and a machine with no disks', async () => {
    const w = world();
    const deps = resolveDeps(w.compute, w.catalog);
    const none = await refusal(resolveRecovery(deps, request(), undefined));
    expect(none.field).toBe('machines');
    const empty = await refusal(resolveRecovery(deps, request({ machines: [{ name: 'x' }] }), w.defaults));
    expect(empty.message).toContain('machine x: has no disks');
  });

  it('a drill needs a subnet and never runs in a machine production subnet', async () => {
    const w = world();
    const deps = resolveDeps(w.compute, w.catalog);
    const noSubnet = await refusal(
      resolveRecovery(deps, request(), { ...w.defaults, drillSubnetId: undefined }),
    );
    expect(noSubnet.field).toBe('RECOVERY_DEFAULTS.erp-plan.machines[0].subnetId');
    expect(noSubnet.message).toContain('has no drill subnet');
    const prod = await refusal(
      resolveRecovery(deps, request({ machines: [{ name: 'app', subnetId: w.prodSubnet }] }), w.defaults),
    );
    expect(prod.message).toContain("is the machine's failover subnet");
    expect(prod.field).toBe('machines[0].subnetId');
  });

  it('refuses a security group of another VPC and an instance without a type', async () => {
    const w = world();
    const deps = resolveDeps(w.compute, w.catalog);
    const vpc = await refusal(
      resolveRecovery(
        deps,
        request({ machines: [{ name: 'app', securityGroupIds: [w.prodGroup] }] }),
        w.defaults,
      ),
    );
    expect(vpc.field).toBe('machines[0].securityGroupIds[0]');
    const noType = await refusal(
      resolveRecovery(deps, request({ machines: [{ name: 'db', bootDisk: 'spare' }] }), w.defaults),
    );
    expect(noType.field).toBe('machines[0].instanceType');
  });

  it('refuses machines that cannot boot, each with its reason and setting', async () => {
    const w = world();
    const deps = resolveDeps(w.compute, w.catalog);
    const cases: [Record<string, unknown>, string, string][] = [
      [{ ena: false }, 'ena', 'needs the ENA network driver and the NVMe storage driver'],
      [{ instanceType: 'm6g.large', architecture: 'x86_64' }, 'architecture', 'runs arm64, not the guest'],
      [{ instanceType: 't2.micro', bootMode: 'uefi' }, 'bootMode', 'boots legacy-bios only'],
      [{ instanceType: 'm6g.large', bootMode: 'legacy-bios' }, 'bootMode', 'Graviton boots UEFI only'],
      [{ platform: 'windows' }, 'platform', 'lose its Windows license billing code'],
      [{ instanceType: 'x9.huge' }, 'instanceType', 'does not exist in this region'],
    ];
    for (const [over, field, words] of cases) {
      const err = await refusal(
        resolveRecovery(deps, request({ machines: [{ name: 'app', ...over }] }), w.defaults),
      );
      expect(err.field, JSON.stringify(over)).toBe(`machines[0].${field}`);
      expect(err.message).toContain(words);
      expect(err.machine).toBe('app');
    }
    expect(w.compute.calls).toEqual([]);
  });

  it('an arm64 type gives an unspecified guest arm64, UEFI and ENA', async () => {
    const w = world();
    const out = await resolveRecovery(
      resolveDeps(w.compute, w.catalog),
      request({ machines: [{ name: 'app', instanceType: 'm6g.large', ena: undefined }] }),
      { ...w.defaults, machines: w.defaults.machines.map((m) => ({ ...m, ena: undefined })) },
    );
    expect(out.machines.find((m) => m.name === 'app')).toMatchObject({
      architecture: 'arm64',
      bootMode: 'uefi',
      ena: true,
    });
  });

  it('a volumes-only machine takes its zone from its subnet', async () => {
    const w = world();
    const out = await resolveRecovery(
      resolveDeps(w.compute, w.catalog),
      request({
        mode: 'failover',
        machines: [{ name: 'files', dataDisks: ['spare'], subnetId: w.drillSubnet }],
      }),
      w.defaults,
    );
    expect(out.machines.find((m) => m.name === 'files')).toMatchObject({
      kind: 'volumes',
      availabilityZone: 'us-east-1b',
    });
    // It has no console to wait on.
    await expect(
      resolveRecovery(
        resolveDeps(w.compute, w.catalog),
        request({
          mode: 'failover',
          machines: [{ name: 'files', dataDisks: ['spare'], subnetId: w.drillSubnet, bootMessage: 'login:' }],
        }),
        w.defaults,
      ),
    ).rejects.toThrow(/machine files: a bootMessage is read from an instance console/);
  });

  it('refuses a TTL for anything but a drill, and a checkpoint that is not on EBS', async () => {
    const w = world();
    const ttl = await refusal(
      resolveRecovery(
        resolveDeps(w.compute, w.catalog),
        request({ mode: 'failover', ttlMinutes: 30 }),
        w.defaults,
      ),
    );
    expect(ttl.field).toBe('ttlMinutes');
    const local: RecoveryCheckpoint = {
      ...w.catalog[2]!,
      disks: w.catalog[2]!.disks.map((d) => ({ ...d, target: 'file:/x.img', targetRef: undefined })),
    };
    const notEbs = await refusal(resolveRecovery(resolveDeps(w.compute, [local]), request(), w.defaults));
    expect(notEbs.message).toContain('is not an EBS snapshot (file:/x.img)');
  });
});

describe('planMachines (property)', () => {
  it('every disk of the checkpoint is used by exactly one machine or reported unused', () => {
    const compute = new FakeCompute();
    const names = ['a', 'b', 'c', 'd', 'e', 'f'];
    const cp = ebsCheckpoint(compute, 's', 1, Object.fromEntries(names.map((n) => [n, 1])));
    fc.assert(
      fc.property(
        // For each disk: which of 3 machines takes it (or none, -1), and as boot or data.
        fc.array(fc.tuple(fc.integer({ min: -1, max: 2 }), fc.boolean()), {
          minLength: names.length,
          maxLength: names.length,
        }),
        (choices) => {
          const machines = [0, 1, 2].map((m) => {
            const mine = names.filter((_, i) => choices[i]![0] === m);
            const boot = mine.find((_, j) => j === 0 && choices[names.indexOf(mine[0]!)]![1]);
            return {
              name: `m${m}`,
              bootDisk: boot,
              dataDisks: mine.filter((d) => d !== boot),
              instanceType: 't2.micro',
              subnetId: 'subnet-0000000000000000a',
              availabilityZone: 'us-east-1a',
            };
          });
          const used = machines.filter((m) => m.bootDisk !== undefined || m.dataDisks.length > 0);
          if (used.length === 0) return;
          const out = planMachines(
            { jobId: 'j', mode: 'failover', plan: 'p', machines: used },
            undefined,
            cp,
          );
          const assigned = out.machines.flatMap((m) => m.disks.map((d) => d.disk));
          expect(new Set(assigned).size).toBe(assigned.length);
          expect([...assigned, ...out.unusedDisks].sort()).toEqual([...names].sort());
          for (const m of out.machines) {
            const devices = m.disks.map((d) => d.deviceName);
            expect(new Set(devices).size).toBe(devices.length);
            if (m.kind === 'instance') expect(m.disks[0]!.deviceName).toBe('/dev/xvda');
          }
        },
      ),
    );
  });
});
