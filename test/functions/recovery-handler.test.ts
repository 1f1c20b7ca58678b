// The recovery Lambda (functions/recovery/handler.ts) action by action, against real emulators:
// dynalite holds the catalog (checkpoints published with DynamoStateStore whose disks are snapshots
// made in moto_server), moto_server serves EC2 and EventBridge Scheduler. Each mode end to end as the
// state machine drives it, and the refusals, each naming its field, before anything is created.
import { DynamoDBClient } from '@aws-sdk/client-dynamodb';
import {
  CreateSnapshotCommand,
  CreateVolumeCommand,
  DeleteSnapshotCommand,
  DescribeSecurityGroupsCommand,
  DescribeSnapshotsCommand,
  DescribeSubnetsCommand,
  EC2Client,
} from '@aws-sdk/client-ec2';
import {
  CreateScheduleCommand,
  CreateScheduleGroupCommand,
  GetScheduleCommand,
  SchedulerClient,
} from '@aws-sdk/client-scheduler';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import {
  type HealthResult,
  healthResultSchema,
  type LaunchResult,
  launchResultSchema,
  parseRecoveryEnvironment,
  pauseResultSchema,
  type ResolveResult,
  recordResultSchema,
  resolveResultSchema,
  teardownResultSchema,
  verifyTeardownResultSchema,
} from '../../functions/recovery/contracts.ts';
import { createRecoveryHandler, handler as lambdaEntry } from '../../functions/recovery/handler.ts';
import { recoveryDeps } from '../../functions/recovery/wiring.ts';
import { silentObservability } from '../../functions/shared/runtime.ts';
import { type Dynalite, startDynalite } from '../../local-cloud/emulators/dynalite.ts';
import { DynamoRecoveryRecords } from '../../shared/aws/dynamo/recovery-records.ts';
import { DynamoStateStore } from '../../shared/aws/dynamo/state-store.ts';
import { silentLog } from '../../shared/engine/cycle/ports.ts';
import type { RecoveryCheckpoint } from '../../shared/engine/ports.ts';
import { type Moto, startMoto } from '../support/moto.ts';

const GROUP = 'ferry-plans';
const GiB = 1024 ** 3;

let moto: Moto;
let dynalite: Dynalite;
let dynamo: DynamoDBClient;
let ec2: EC2Client;
let scheduler: SchedulerClient;

beforeAll(async () => {
  [moto, dynalite] = await Promise.all([startMoto(), startDynalite()]);
  const config = { region: moto.clientConfig.region, credentials: moto.clientConfig.credentials };
  dynamo = new DynamoDBClient({ ...config, endpoint: dynalite.endpoint });
  ec2 = new EC2Client(moto.clientConfig);
  scheduler = new SchedulerClient(moto.clientConfig);
});
afterAll(async () => {
  for (const c of [dynamo, ec2, scheduler]) c?.destroy();
  await Promise.all([moto?.stop(), dynalite?.stop()]);
});

interface World {
  table: string;
  handler: (event: unknown) => Promise<unknown>;
  catalog: RecoveryCheckpoint[];
  records: DynamoRecoveryRecords;
  subnets: { prod: string; drill: string };
  /** Every snapshot of every checkpoint (the replica). */
  replica: string[];
  clock: { now: () => number; advance(s: number): void };
}

async function snapshot(sizeGiB: number): Promise<string> {
  const vol = await ec2.send(new CreateVolumeCommand({ AvailabilityZone: 'us-east-1a', Size: sizeGiB }));
  const snap = await ec2.send(
    new CreateSnapshotCommand({
      VolumeId: vol.VolumeId!,
      TagSpecifications: [{ ResourceType: 'snapshot', Tags: [{ Key: 'ferry:role', Value: 'target' }] }],
    }),
  );
  return snap.SnapshotId!;
}

/** A fresh table and EC2: set erp with checkpoints 1..3 of disks root (8 GiB), data (2), logs (1). */
async function world(): Promise<World> {
  await moto.reset();
  // A fresh, ACTIVE table per test (dynalite's helper waits for the status).
  const table = await dynalite.createTable();
  const store = new DynamoStateStore(dynamo, table);
  const catalog: RecoveryCheckpoint[] = [];
  const replica: string[] = [];
  for (const sequence of [1, 2, 3]) {
    const disks = [];
    for (const [disk, gib] of [
      ['root', 8],
      ['data', 2],
      ['logs', 1],
    ] as const) {
      const snap = await snapshot(gib);
      replica.push(snap);
      disks.push({
        disk,
        source: snap,
        target: snap,
        targetRef: snap,
        sizeBytes: gib * GiB,
        kind: sequence === 1 ? ('full' as const) : ('incremental' as const),
        chunks: 1,
        bytes: 1,
        aggregate: { algorithm: 'ebs-linear-sha256' as const, value: '0'.repeat(64) },
      });
    }
    const cp: RecoveryCheckpoint = {
      id: `erp/cycle-${sequence}`,
      set: 'erp',
      sequence,
      createdAt: `2026-12-0${sequence}T10:00:00.000Z`,
      parent: sequence > 1 ? `erp/cycle-${sequence - 1}` : undefined,
      disks,
    };
    await store.publishCheckpoint(cp);
    catalog.push(cp);
  }
  const subnets = (await ec2.send(new DescribeSubnetsCommand({}))).Subnets!;
  const prod = subnets.find((s) => s.AvailabilityZone === 'us-east-1a')!;
  const drill = subnets.find((s) => s.AvailabilityZone === 'us-east-1b')!;
  const groups = await ec2.send(
    new DescribeSecurityGroupsCommand({ Filters: [{ Name: 'vpc-id', Values: [prod.VpcId!] }] }),
  );
  await scheduler.send(new CreateScheduleGroupCommand({ Name: GROUP }));
  await scheduler.send(
    new CreateScheduleCommand({
      Name: 'erp',
      GroupName: GROUP,
      ScheduleExpression: 'rate(15 minutes)',
      FlexibleTimeWindow: { Mode: 'OFF' },
      State: 'ENABLED',
      Target: {
        Arn: 'arn:aws:states:us-east-1:123456789012:stateMachine:ferry-cycle',
        RoleArn: 'arn:aws:iam::123456789012:role/ferry-scheduler',
      },
    }),
  );
  const env = parseRecoveryEnvironment({
    TABLE_NAME: table,
    SCHEDULE_GROUP: GROUP,
    RECOVERY_KMS_KEY_ARN: 'arn:aws:kms:us-east-1:123456789012:key/11111111-2222-3333-4444-555555555555',
    RECOVERY_DEFAULTS: JSON.stringify({
      erp: {
        set: 'erp',
        machines: [
          {
            name: 'app',
            bootDisk: 'root',
            dataDisks: ['data'],
            instanceType: 'm5.large',
            subnetId: prod.SubnetId,
            securityGroupIds: [groups.SecurityGroups![0]!.GroupId],
            ena: true,
          },
          { name: 'archive', dataDisks: ['logs'], availabilityZone: 'us-east-1a' },
        ],
        drillSubnetId: drill.SubnetId,
        ttlMinutes: 30,
      },
    }),
  });
  let now = Date.parse('2026-12-05T12:00:00.000Z');
  const clock = {
    now: () => now,
    advance: (s: number) => {
      now += s * 1000;
    },
  };
  const deps = recoveryDeps({ dynamo, ec2, scheduler, clock, log: silentLog }, env);
  const handler = createRecoveryHandler(() => ({ deps, obs: silentObservability }));
  return {
    table,
    handler,
    catalog,
    records: new DynamoRecoveryRecords(dynamo, table),
    subnets: { prod: prod.SubnetId!, drill: drill.SubnetId! },
    replica,
    clock,
  };
}

async function rejection(p: Promise<unknown>, label = ''): Promise<Error & { field?: string }> {
  const err = await p.then(
    (answer) => ({ answer }),
    (e: unknown) => e,
  );
  expect(err, `${label} ${JSON.stringify(err)}`).toBeInstanceOf(Error);
  return err as Error & { field?: string };
}

/** What the state machine does between resolve and record: launch each machine, poll health. */
async function launchAndWatch(w: World, resolved: ResolveResult) {
  const launched: LaunchResult[] = [];
  for (const machine of resolved.machines) {
    launched.push(
      (await w.handler({
        action: 'launch',
        jobId: resolved.jobId,
        mode: resolved.mode,
        plan: resolved.plan,
        machine,
      })) as LaunchResult,
    );
  }
  w.clock.advance(95);
  const health = (await w.handler({
    action: 'health',
    jobId: resolved.jobId,
    launched,
    startedAt: resolved.startedAt,
  })) as HealthResult;
  return { launched, health };
}

async function snapshotsLeft(ids: string[]): Promise<number> {
  const out = await ec2.send(
    new DescribeSnapshotsCommand({ Filters: [{ Name: 'snapshot-id', Values: ids }] }),
  );
  return out.Snapshots?.length ?? 0;
}

describe('recovery handler', () => {
  let w: World;
  beforeEach(async () => {
    w = await world();
  });

  it('a drill: resolve, launch, health, teardown until verified clean, record; the replica survives', async () => {
    // Act
    const resolved = (await w.handler({
      action: 'resolve',
      jobId: 'drill-1',
      mode: 'drill',
      plan: 'erp',
    })) as ResolveResult;
    const { launched, health } = await launchAndWatch(w, resolved);
    const teardown = await w.handler({ action: 'teardown', jobId: 'drill-1' });
    let verify = (await w.handler({ action: 'verify-teardown', jobId: 'drill-1' })) as { clean: boolean };
    for (let pass = 0; pass < 3 && !verify.clean; pass++) {
      await w.handler({ action: 'teardown', jobId: 'drill-1' });
      verify = (await w.handler({ action: 'verify-teardown', jobId: 'drill-1' })) as { clean: boolean };
    }
    const report = await w.handler({
      action: 'record',
      jobId: 'drill-1',
      report: {
        mode: 'drill',
        plan: 'erp',
        set: resolved.set,
        checkpoint: resolved.checkpoint,
        startedAt: resolved.startedAt,
        machines: resolved.machines,
        launched,
        health,
        teardown,
        verify,
      },
    });
    // Assess: every answer is what the contract says the state machine receives.
    resolveResultSchema.parse(resolved);
    for (const l of launched) launchResultSchema.parse(l);
    healthResultSchema.parse(health);
    teardownResultSchema.parse(teardown);
    verifyTeardownResultSchema.parse(verify);
    recordResultSchema.parse(report);
    expect(resolved.checkpoint).toMatchObject({ id: 'erp/cycle-3', sequence: 3 });
    expect(resolved.ttlSeconds).toBe(1800);
    expect(resolved.unusedDisks).toEqual([]);
    expect(resolved.machines.find((m) => m.name === 'app')).toMatchObject({
      kind: 'instance',
      subnetId: w.subnets.drill,
    });
    expect(launched.map((l) => l.kind)).toEqual(['instance', 'volumes']);
    expect(health).toMatchObject({ done: true, healthy: true, secondsToRunning: 95 });
    expect(verify).toEqual({ clean: true, remaining: { instances: 0, volumes: 0, images: 0, snapshots: 0 } });
    expect(report).toMatchObject({ jobId: 'drill-1', outcome: 'succeeded', secondsToRunning: 95 });
    expect(await w.records.get('drill-1')).toEqual(report);
    expect(await snapshotsLeft(w.replica)).toBe(w.replica.length);
    expect(await w.records.failedOver('erp')).toBeUndefined();
  });

  it('a failover of checkpoint 2 in the machines own subnet pauses the schedule and marks the plan', async () => {
    const resolved = (await w.handler({
      action: 'resolve',
      jobId: 'fo-1',
      mode: 'failover',
      plan: 'erp',
      checkpoint: 2,
    })) as ResolveResult;
    const { launched, health } = await launchAndWatch(w, resolved);
    const pause = await w.handler({ action: 'pause', jobId: 'fo-1', plan: 'erp' });
    const again = await w.handler({ action: 'pause', jobId: 'fo-1', plan: 'erp' });
    await w.handler({
      action: 'record',
      jobId: 'fo-1',
      report: {
        mode: 'failover',
        plan: 'erp',
        checkpoint: resolved.checkpoint,
        startedAt: resolved.startedAt,
        launched,
        health,
        pause,
      },
    });
    expect(resolved.ttlSeconds).toBe(0);
    expect(resolved.machines.find((m) => m.name === 'app')!.subnetId).toBe(w.subnets.prod);
    expect(resolved.machines[0]!.disks[0]!.snapshotId).toBe(w.catalog[1]!.disks[0]!.targetRef);
    expect(pauseResultSchema.parse(pause)).toEqual({
      schedule: 'erp',
      group: GROUP,
      found: true,
      wasEnabled: true,
    });
    expect(again).toMatchObject({ wasEnabled: false });
    expect((await scheduler.send(new GetScheduleCommand({ Name: 'erp', GroupName: GROUP }))).State).toBe(
      'DISABLED',
    );
    expect(await w.records.failedOver('erp')).toMatchObject({
      jobId: 'fo-1',
      mode: 'failover',
      checkpointId: 'erp/cycle-2',
    });
    expect((await w.records.list('erp')).map((r) => r.outcome)).toEqual(['succeeded']);
    // A cleanup job later removes the failover's machines.
    await w.handler({ action: 'teardown', jobId: 'fo-1' });
    let verify = (await w.handler({ action: 'verify-teardown', jobId: 'fo-1' })) as { clean: boolean };
    for (let pass = 0; pass < 3 && !verify.clean; pass++) {
      await w.handler({ action: 'teardown', jobId: 'fo-1' });
      verify = (await w.handler({ action: 'verify-teardown', jobId: 'fo-1' })) as { clean: boolean };
    }
    expect(verify.clean).toBe(true);
  });

  it('a migration recovers exactly its final cycle checkpoint and reports no data loss when quiesced', async () => {
    const resolved = (await w.handler({
      action: 'resolve',
      jobId: 'mig-1',
      mode: 'migration',
      plan: 'erp',
      finalCycle: { checkpointId: 'erp/cycle-2' },
    })) as ResolveResult;
    const { launched, health } = await launchAndWatch(w, resolved);
    const report = await w.handler({
      action: 'record',
      jobId: 'mig-1',
      report: {
        mode: 'migration',
        plan: 'erp',
        checkpoint: resolved.checkpoint,
        startedAt: resolved.startedAt,
        launched,
        health,
        sourceQuiesced: true,
      },
    });
    expect(resolved.checkpoint.id).toBe('erp/cycle-2');
    expect(report).toMatchObject({ outcome: 'succeeded', dataLossWindowSeconds: 0 });
  });

  it('refuses bad events with the field at fault, before anything is created', async () => {
    const cases: [unknown, string, string][] = [
      [{ action: 'explode', jobId: 'j' }, 'EventValidationError', 'action'],
      [{ action: 'resolve', jobId: 'j', mode: 'cleanup', plan: 'erp' }, 'EventValidationError', 'mode'],
      [
        {
          action: 'resolve',
          jobId: 'j',
          mode: 'drill',
          plan: 'erp',
          machines: [{ name: 'app', subnetId: 'net-1' }],
        },
        'EventValidationError',
        'machines[0].subnetId',
      ],
      [{ action: 'resolve', jobId: 'j', mode: 'drill', plan: 'erp', extra: 1 }, 'EventValidationError', ''],
      [
        { action: 'resolve', jobId: 'j', mode: 'drill', plan: 'erp', checkpoint: 7 },
        'RecoveryRefusedError',
        'checkpoint',
      ],
      [
        {
          action: 'resolve',
          jobId: 'j',
          mode: 'drill',
          plan: 'erp',
          machines: [{ name: 'app', instanceType: 'm6g.large', architecture: 'x86_64' }],
        },
        'RecoveryRefusedError',
        'machines[0].architecture',
      ],
      [
        {
          action: 'resolve',
          jobId: 'j',
          mode: 'drill',
          plan: 'erp',
          machines: [{ name: 'app', instanceType: 'zz9.huge' }],
        },
        'RecoveryRefusedError',
        'machines[0].instanceType',
      ],
      [
        { action: 'resolve', jobId: 'j', mode: 'migration', plan: 'erp' },
        'RecoveryRefusedError',
        'finalCycle.checkpointId',
      ],
      [
        { action: 'health', jobId: 'j', launched: [], startedAt: 'yesterday' },
        'EventValidationError',
        'startedAt',
      ],
    ];
    for (const [event, name, field] of cases) {
      const err = await rejection(w.handler(event), JSON.stringify(event));
      expect(err.name, JSON.stringify(event)).toBe(name);
      expect(err.field ?? '', JSON.stringify(event)).toBe(field);
    }
    const unknown = await rejection(
      w.handler({ action: 'resolve', jobId: 'j', mode: 'drill', plan: 'erp', extra: 1 }),
    );
    expect(unknown.message).toBe('recovery event is invalid: unknown field extra');
    expect((await w.handler({ action: 'verify-teardown', jobId: 'j' })) as object).toMatchObject({
      clean: true,
    });
  });

  it('a checkpoint whose snapshot was deleted is no longer recoverable: refused, nothing created', async () => {
    await ec2.send(new DeleteSnapshotCommand({ SnapshotId: w.catalog[2]!.disks[1]!.targetRef! }));
    const err = await rejection(
      w.handler({ action: 'resolve', jobId: 'gone-1', mode: 'drill', plan: 'erp' }),
    );
    expect(err.name).toBe('RecoveryRefusedError');
    expect(err.message).toContain('checkpoint erp/cycle-3 is no longer recoverable');
    // An older checkpoint still recovers.
    const older = (await w.handler({
      action: 'resolve',
      jobId: 'gone-1',
      mode: 'drill',
      plan: 'erp',
      checkpoint: 2,
    })) as ResolveResult;
    expect(older.checkpoint.sequence).toBe(2);
    expect(await w.handler({ action: 'verify-teardown', jobId: 'gone-1' })).toMatchObject({ clean: true });
  });

  it('the environment is checked with every bad variable named', () => {
    expect(() =>
      parseRecoveryEnvironment({
        TABLE_NAME: 'ferry',
        RECOVERY_DEFAULTS: '{"erp":{"machines":[{"name":1}]}}',
      }),
    ).toThrow(
      /RECOVERY_DEFAULTS.erp.machines.0.name: expected the machine name as a string; SCHEDULE_GROUP: SCHEDULE_GROUP must name the plans schedule group/,
    );
  });

  it('the Lambda entry builds its clients from the environment (AWS_ENDPOINT_URL_* for emulators)', async () => {
    const vars: Record<string, string> = {
      TABLE_NAME: w.table,
      SCHEDULE_GROUP: GROUP,
      RECOVERY_DEFAULTS: '{}',
      AWS_REGION: moto.clientConfig.region,
      AWS_ACCESS_KEY_ID: 'testing',
      AWS_SECRET_ACCESS_KEY: 'testing',
      AWS_ENDPOINT_URL_DYNAMODB: dynalite.endpoint,
      AWS_ENDPOINT_URL_EC2: moto.endpoint,
      AWS_ENDPOINT_URL_SCHEDULER: moto.endpoint,
      POWERTOOLS_LOG_LEVEL: 'SILENT',
      POWERTOOLS_METRICS_DISABLED: 'true',
    };
    const saved = Object.fromEntries(Object.keys(vars).map((k) => [k, process.env[k]]));
    Object.assign(process.env, vars);
    try {
      expect(await lambdaEntry({ action: 'pause', jobId: 'fo-9', plan: 'erp' })).toMatchObject({
        found: true,
        wasEnabled: true,
      });
      // No defaults for the plan and no machines in the event: refused by name.
      await expect(
        lambdaEntry({ action: 'resolve', jobId: 'fo-9', mode: 'failover', plan: 'erp' }),
      ).rejects.toMatchObject({
        name: 'RecoveryRefusedError',
        field: 'machines',
      });
    } finally {
      for (const [k, v] of Object.entries(saved)) {
        if (v === undefined) delete process.env[k];
        else process.env[k] = v;
      }
    }
  });
});
