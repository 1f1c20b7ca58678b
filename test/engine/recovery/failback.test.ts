// prepare-failback on the in-memory EC2: a failover launched by the real launch code and reported by
// the real report builder, then the reverse cycle's input built from it (each disk's recovered volume,
// the shared checkpoint's snapshots swapped into a base), and every refusal before anything starts.
import { describe, expect, it } from 'vitest';
import type { RecoveryCheckpoint } from '../../../shared/engine/ports.ts';
import { RecoveryRefusedError } from '../../../shared/engine/recovery/errors.ts';
import { defaultReverseSet, prepareFailback } from '../../../shared/engine/recovery/failback.ts';
import { launchMachine } from '../../../shared/engine/recovery/launch.ts';
import type {
  FailoverMark,
  FailoverRecords,
  RecoveryRecords,
} from '../../../shared/engine/recovery/ports.ts';
import { buildReport, recordRecovery } from '../../../shared/engine/recovery/report.ts';
import type {
  PrepareFailbackRequest,
  RecoveryReport,
  ResolvedMachine,
} from '../../../shared/engine/recovery/types.ts';
import { FakeCompute } from './fake-compute.ts';
import { ebsCheckpoint, fixedClock } from './fixtures.ts';

/** Failover records in memory, as the catalog keeps them (one report per job, one mark per plan). */
class MemoryRecords implements RecoveryRecords, FailoverRecords {
  readonly reports = new Map<string, RecoveryReport>();
  readonly marks = new Map<string, FailoverMark>();
  async put(report: RecoveryReport) {
    this.reports.set(report.jobId, report);
  }
  async markFailedOver(report: RecoveryReport) {
    this.marks.set(report.plan, {
      plan: report.plan,
      jobId: report.jobId,
      mode: report.mode,
      checkpointId: report.checkpoint?.id,
      at: report.finishedAt,
    });
  }
  async clearFailedOver(plan: string, jobId: string) {
    if (this.marks.get(plan)?.jobId === jobId) this.marks.delete(plan);
  }
  async failedOver(plan: string) {
    return this.marks.get(plan);
  }
  async get(jobId: string) {
    return this.reports.get(jobId);
  }
}

function machinesOf(checkpoint: RecoveryCheckpoint): ResolvedMachine[] {
  const snap = (disk: string) => checkpoint.disks.find((d) => d.disk === disk)!.target;
  return [
    {
      name: 'app',
      kind: 'instance',
      bootDisk: 'root',
      dataDisks: ['data'],
      instanceType: 'm5.large',
      subnetId: 'subnet-0000000000000000a',
      architecture: 'x86_64',
      bootMode: 'uefi',
      ena: true,
      platform: 'linux',
      disks: [
        { disk: 'root', snapshotId: snap('root'), sizeGiB: 8, deviceName: '/dev/xvda' },
        { disk: 'data', snapshotId: snap('data'), sizeGiB: 20, deviceName: '/dev/sdf' },
      ],
    },
    {
      name: 'files',
      kind: 'volumes',
      dataDisks: ['logs'],
      availabilityZone: 'us-east-1a',
      architecture: 'x86_64',
      ena: false,
      platform: 'linux',
      disks: [{ disk: 'logs', snapshotId: snap('logs'), sizeGiB: 4, deviceName: '/dev/sdf' }],
    },
  ];
}

/** A plan `erp` (set `erp`) failed over to its second checkpoint by job `fo-1`, on the fake EC2. */
async function failedOver() {
  const compute = new FakeCompute();
  const records = new MemoryRecords();
  const clock = fixedClock();
  const checkpoints = [
    ebsCheckpoint(compute, 'erp', 1, { root: 8, data: 20, logs: 4 }),
    ebsCheckpoint(compute, 'erp', 2, { root: 8, data: 20, logs: 4 }),
  ];
  const catalog = new Map<string, RecoveryCheckpoint[]>([['erp', checkpoints]]);
  const shared = checkpoints[1]!;
  const machines = machinesOf(shared);
  const ctx = { jobId: 'fo-1', mode: 'failover' as const, plan: 'erp' };
  const launched = [];
  for (const m of machines) launched.push(await launchMachine({ compute, clock }, ctx, m));
  compute.boot();
  await recordRecovery({ records, clock }, 'fo-1', {
    mode: 'failover',
    plan: 'erp',
    set: 'erp',
    checkpoint: { id: shared.id, sequence: shared.sequence, publishedAt: shared.createdAt },
    startedAt: '2026-12-05T12:00:00.000Z',
    machines,
    launched,
    health: { done: true, healthy: true, machines: [] },
  });
  const deps = {
    records,
    compute,
    catalog: { listCheckpoints: async (set: string) => catalog.get(set) ?? [] },
  };
  return { compute, records, catalog, deps, shared, launched };
}

const request: PrepareFailbackRequest = { jobId: 'fb-1', plan: 'erp', cutover: false };

describe('prepare-failback', () => {
  it("finds each disk's recovered volume and starts the reverse set from the shared checkpoint", async () => {
    const { deps, shared, launched, compute } = await failedOver();
    const out = await prepareFailback(deps, request, undefined);
    const [app, files] = launched;
    const appVolumes = app!.instanceId
      ? (await compute.describeInstances([app!.instanceId]))[0]!.volumes!
      : [];
    const at = (device: string) => appVolumes.find((v) => v.deviceName === device)!.volumeId;
    const snapOf = (disk: string) => shared.disks.find((d) => d.disk === disk)!;
    const reverseSet = defaultReverseSet('erp', 'fo-1');
    expect(out.part).toMatchObject({
      failoverJobId: 'fo-1',
      sharedCheckpointId: shared.id,
      reverseSet,
      fromBase: true,
      cutover: false,
    });
    expect(out.cycleInput).toEqual({
      plan: reverseSet,
      set: reverseSet,
      disks: [
        { disk: 'root', volumeId: at('/dev/xvda') },
        { disk: 'data', volumeId: at('/dev/sdf') },
        { disk: 'logs', volumeId: files!.volumeIds[0] },
      ],
      base: {
        checkpointId: shared.id,
        // The recovered volume was created from the target snapshot; the original side is the source.
        disks: ['root', 'data', 'logs'].map((disk) => ({
          disk,
          previousSourceSnapshotId: snapOf(disk).target,
          parentTargetSnapshotId: snapOf(disk).source,
        })),
      },
    });
    expect(at('/dev/xvda')).not.toBe(at('/dev/sdf'));
    expect(out).not.toHaveProperty('cutoverResolve');
  });

  it('a reverse set that has a checkpoint continues without a base; a cutover carries its resolve event', async () => {
    const { deps, catalog, compute } = await failedOver();
    const reverseSet = defaultReverseSet('erp', 'fo-1');
    catalog.set(reverseSet, [ebsCheckpoint(compute, reverseSet, 1, { root: 8, data: 20, logs: 4 })]);
    const out = await prepareFailback(
      deps,
      {
        ...request,
        cutover: true,
        sourceQuiesced: true,
        machines: [{ name: 'app', instanceType: 'm5.large' }],
      },
      undefined,
    );
    expect(out.part.fromBase).toBe(false);
    expect(out.cycleInput).not.toHaveProperty('base');
    expect(out.part).toMatchObject({ cutover: true, sourceQuiesced: true });
    expect(out.cutoverResolve).toEqual({
      action: 'resolve',
      jobId: 'fb-1',
      mode: 'failback',
      plan: 'erp',
      set: reverseSet,
      machines: [{ name: 'app', instanceType: 'm5.large' }],
    });
  });

  it('refuses, naming why, before anything starts', async () => {
    const refusal = async (deps: Parameters<typeof prepareFailback>[0], req = request) => {
      const err = await prepareFailback(deps, req, undefined).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(RecoveryRefusedError);
      return (err as Error).message;
    };

    const notFailedOver = await failedOver();
    notFailedOver.records.marks.clear();
    expect(await refusal(notFailedOver.deps)).toContain('plan erp refused: it is not failed over');

    const gone = await failedOver();
    gone.catalog.set('erp', gone.catalog.get('erp')!.slice(0, 1));
    expect(await refusal(gone.deps)).toContain(`checkpoint ${gone.shared.id}, which failover fo-1 recovered`);

    const terminated = await failedOver();
    await terminated.compute.terminateInstances([terminated.launched[0]!.instanceId!]);
    expect(await refusal(terminated.deps)).toMatch(/machine app: instance i-\w+ is terminated/);

    const older = await failedOver();
    const report = older.records.reports.get('fo-1')!;
    older.records.reports.set('fo-1', {
      ...report,
      machines: report.machines.map(({ disks: _, ...m }) => m),
    });
    expect(await refusal(older.deps)).toContain('does not say which disk became which device');

    const onPrem = await failedOver();
    const [first, second] = onPrem.catalog.get('erp')!;
    onPrem.catalog.set('erp', [
      first!,
      { ...second!, disks: second!.disks.map((d) => ({ ...d, source: 'nbd://vcenter/erp-root' })) },
    ]);
    expect(await refusal(onPrem.deps)).toContain('was not replicated from an EBS snapshot');

    const unlaunched = await failedOver();
    const r = unlaunched.records.reports.get('fo-1')!;
    unlaunched.records.reports.set('fo-1', {
      ...r,
      machines: r.machines.map((m) => (m.name === 'app' ? { ...m, instanceId: undefined } : m)),
    });
    expect(await refusal(unlaunched.deps)).toContain('machine app: job fo-1 did not launch it');

    const named = await failedOver();
    expect(await refusal(named.deps, { ...request, reverseSet: 'bad name' })).toContain('is not a set name');
  });
});

describe('the failback report', () => {
  it('a failback without cutover succeeds when its reverse cycle published; a cutover clears the failover mark', async () => {
    const { records, shared, launched } = await failedOver();
    const part = {
      failoverJobId: 'fo-1',
      sharedCheckpointId: shared.id,
      reverseSet: 'erp-failback-fo-1',
      fromBase: true,
      disks: [],
      cutover: false,
    };
    const base = { mode: 'failback' as const, plan: 'erp', startedAt: '2026-12-05T12:00:00.000Z' };
    expect(buildReport('fb', { ...base, failback: part }, 'E').outcome).toBe('failed');
    const synced = buildReport('fb', { ...base, failback: { ...part, reverseCheckpointId: 'r/1' } }, 'E');
    expect(synced).toMatchObject({ outcome: 'succeeded', failback: { reverseCheckpointId: 'r/1' } });

    const clock = fixedClock();
    const cutover = { ...part, cutover: true, sourceQuiesced: true, reverseCheckpointId: 'r/2' };
    await recordRecovery({ records, clock }, 'fb-2', { ...base, failback: cutover });
    // Nothing launched: the plan stays failed over.
    expect(records.marks.get('erp')?.jobId).toBe('fo-1');
    const health = { done: true, healthy: true, machines: [] };
    const r = await recordRecovery({ records, clock }, 'fb-3', {
      ...base,
      failback: cutover,
      launched,
      health,
    });
    expect(r).toMatchObject({ outcome: 'succeeded', dataLossWindowSeconds: 0 });
    expect(records.marks.has('erp')).toBe(false);
  });
});
