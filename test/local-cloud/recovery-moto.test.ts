// The Recovery state machine as `cdk deploy` would deploy it, run locally: the synthesized FerryStack's
// Recovery definition in aws-local-stepfunctions, its tasks invoking the real recovery handler
// (functions/recovery/handler.ts) configured from its template environment, EC2 and EventBridge
// Scheduler on moto_server, the checkpoint catalog on dynalite. Every mode end to end: a drill torn
// down and verified by tag (zero left), a failover pausing the plan's schedule, a migration
// recovering exactly its final cycle's checkpoint, a cleanup on command; and a checkpoint whose
// snapshot is gone refused with nothing created. moto's gaps: RegisterImage ignores block-device
// mappings (image registration is covered at the SDK level by the recovery core's tests), and its
// instances pass status checks at once.

import type { DynamoDBClient } from '@aws-sdk/client-dynamodb';
import {
  CreateSecurityGroupCommand,
  CreateSnapshotCommand,
  CreateSubnetCommand,
  CreateVolumeCommand,
  CreateVpcCommand,
  DeleteSnapshotCommand,
  DescribeImagesCommand,
  DescribeInstancesCommand,
  DescribeSnapshotsCommand,
  DescribeVolumesCommand,
  EC2Client,
} from '@aws-sdk/client-ec2';
import {
  CreateScheduleCommand,
  CreateScheduleGroupCommand,
  GetScheduleCommand,
  SchedulerClient,
} from '@aws-sdk/client-scheduler';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { TemplateJson } from '../../local-cloud/asl.ts';
import { type Dynalite, startDynalite } from '../../local-cloud/emulators/dynalite.ts';
import {
  asLambdaTask,
  createStateTable,
  LocalRecovery,
  type RecoveryBindings,
  recoveryDefinitionFromTemplate,
  recoveryEnvironment,
  serveLocalStepFunctions,
  setRecoveryEnvironment,
} from '../../local-cloud/recovery.ts';
import { synthesizeTemplate } from '../../local-cloud/synth.ts';
import { DynamoStateStore } from '../../shared/aws/dynamo/state-store.ts';
import type { RecoveryCheckpoint } from '../../shared/engine/ports.ts';
import { ferry } from '../support/ferry-cli.ts';
import { type Moto, startMoto } from '../support/moto.ts';

type Json = Record<string, unknown>;
type LocalRecoveryDefinition = ConstructorParameters<typeof LocalRecovery>[0]['definition'];

const STACK = 'FerryLocal';
const TABLE = `${STACK}-state`;
const JOB_TAG = 'ferry:recovery-job';

let moto: Moto;
let ddb: Dynalite;
let ec2: EC2Client;
let scheduler: SchedulerClient;
let store: DynamoStateStore;
let recovery: LocalRecovery;
let bindings: RecoveryBindings;
let definitionOf: { definition: LocalRecoveryDefinition; stateMachineName: string };
let restoreEnv: () => void = () => {};
let volumes: { root: string; data: string };
let subnets: { prod: string; drill: string };
let sequence = 0;
const tableRequests = new Set<string>();

/** Snapshots of both disks in moto, published as the next checkpoint of set `web`. */
async function publishCheckpoint(): Promise<RecoveryCheckpoint> {
  const snap = async (volumeId: string) =>
    (
      await ec2.send(
        new CreateSnapshotCommand({
          VolumeId: volumeId,
          TagSpecifications: [
            { ResourceType: 'snapshot', Tags: [{ Key: 'ferry:deployment', Value: STACK }] },
          ],
        }),
      )
    ).SnapshotId!;
  sequence++;
  const disk = (name: string, target: string) => ({
    disk: name,
    source: `snap-${'0'.repeat(16)}${sequence}`,
    target,
    sizeBytes: 8 * 1024 ** 3,
    kind: 'incremental' as const,
    chunks: 1,
    bytes: 1024 ** 2,
    aggregate: { algorithm: 'ebs-linear-sha256' as const, value: 'ab'.repeat(32) },
  });
  const checkpoint: RecoveryCheckpoint = {
    id: `web/cycle-${sequence}`,
    set: 'web',
    sequence,
    createdAt: new Date(Date.now() - (10 - sequence) * 60_000).toISOString(),
    parent: sequence === 1 ? undefined : `web/cycle-${sequence - 1}`,
    disks: [disk('root', await snap(volumes.root)), disk('data', await snap(volumes.data))],
  };
  await store.publishCheckpoint(checkpoint);
  return checkpoint;
}

/** Everything EC2 has that carries the job's tag, still alive. */
async function leftOf(jobId: string) {
  const Filters = [{ Name: `tag:${JOB_TAG}`, Values: [jobId] }];
  const instances = (await ec2.send(new DescribeInstancesCommand({ Filters }))).Reservations?.flatMap(
    (r) => r.Instances ?? [],
  );
  return {
    running: (instances ?? []).filter(
      (i) => i.State?.Name !== 'terminated' && i.State?.Name !== 'shutting-down',
    ).length,
    volumes: (await ec2.send(new DescribeVolumesCommand({ Filters }))).Volumes?.length ?? 0,
    images: (await ec2.send(new DescribeImagesCommand({ Owners: ['self'], Filters }))).Images?.length ?? 0,
    snapshots:
      (await ec2.send(new DescribeSnapshotsCommand({ OwnerIds: ['self'], Filters }))).Snapshots?.length ?? 0,
  };
}

beforeAll(async () => {
  [moto, ddb] = await Promise.all([startMoto(), startDynalite()]);
  ec2 = new EC2Client(moto.clientConfig);
  scheduler = new SchedulerClient(moto.clientConfig);
  // The account as the operator prepared it: a VPC with a production and an isolated drill subnet.
  const vpc = (await ec2.send(new CreateVpcCommand({ CidrBlock: '10.0.0.0/16' }))).Vpc!.VpcId!;
  const subnet = async (cidr: string) =>
    (await ec2.send(new CreateSubnetCommand({ VpcId: vpc, CidrBlock: cidr, AvailabilityZone: 'us-east-1a' })))
      .Subnet!.SubnetId!;
  const [prod, drill] = [await subnet('10.0.1.0/24'), await subnet('10.0.2.0/24')];
  subnets = { prod, drill };
  const sg = async (name: string) =>
    (await ec2.send(new CreateSecurityGroupCommand({ GroupName: name, Description: name, VpcId: vpc })))
      .GroupId!;
  const [prodSg, drillSg] = [await sg('web'), await sg('drill')];
  const volume = async () =>
    (await ec2.send(new CreateVolumeCommand({ AvailabilityZone: 'us-east-1a', Size: 8 }))).VolumeId!;
  volumes = { root: await volume(), data: await volume() };

  // The stack as cdk deploy would deploy it, with the plan's recovery defaults.
  const template = synthesizeTemplate(
    {
      plans: [
        {
          name: 'web',
          schedule: 'rate(15 minutes)',
          rpoMinutes: 30,
          disks: [
            { disk: 'root', volumeId: volumes.root },
            { disk: 'data', volumeId: volumes.data },
          ],
          recovery: {
            machines: [
              {
                name: 'web-1',
                bootDisk: 'root',
                dataDisks: ['data'],
                instanceType: 't3.micro',
                subnetId: prod,
                securityGroupIds: [prodSg],
                ena: true,
              },
            ],
            drillSubnetId: drill,
            drillSecurityGroupIds: [drillSg],
            ttlMinutes: 5,
          },
        },
      ],
    },
    STACK,
  ) as TemplateJson;
  const { definition, stateMachineName, functionLogicalId } = recoveryDefinitionFromTemplate(template);
  const env = recoveryEnvironment(template, functionLogicalId, TABLE);

  // What cdk deploy creates besides: the state table and the plan's schedule in its group.
  await createStateTable(ddb.client, TABLE);
  store = new DynamoStateStore(ddb.client, TABLE);
  await scheduler.send(new CreateScheduleGroupCommand({ Name: env.SCHEDULE_GROUP }));
  await scheduler.send(
    new CreateScheduleCommand({
      Name: 'web',
      GroupName: env.SCHEDULE_GROUP,
      ScheduleExpression: 'rate(15 minutes)',
      FlexibleTimeWindow: { Mode: 'OFF' },
      State: 'ENABLED',
      Target: {
        Arn: `arn:aws:states:us-east-1:123456789012:stateMachine:${STACK}-cycle`,
        RoleArn: 'arn:aws:iam::123456789012:role/FerryLocal-ScheduleRole',
        Input: '{"plan":"web"}',
      },
    }),
  );
  await publishCheckpoint();
  await publishCheckpoint();

  restoreEnv = setRecoveryEnvironment(env, {
    dynamodb: ddb.endpoint,
    ec2: moto.endpoint,
    scheduler: moto.endpoint,
  });
  // Every DynamoDB request the handler makes, to hold against the role's table actions.
  const { onClientCreated } = await import('../../functions/shared/runtime.ts');
  onClientCreated((client) => {
    (client as DynamoDBClient).middlewareStack.add(
      (next, context) => async (args) => {
        if (String(context.clientName).startsWith('DynamoDB')) tableRequests.add(String(context.commandName));
        return next(args);
      },
      { step: 'initialize', name: 'recordTableRequests' },
    );
  });
  // Imported after the environment is set: the handler builds its container from it on first use.
  const { handler } = await import('../../functions/recovery/handler.ts');
  definitionOf = { definition, stateMachineName };
  bindings = {
    recovery: asLambdaTask((event) => handler(event)),
    // A migration's final cycle: the plan's disks snapshotted and published, as a cycle would.
    runCycle: async (input) => {
      expect(input).toMatchObject({ plan: 'web', set: 'web' });
      const cp = await publishCheckpoint();
      return { status: 'published', checkpointId: cp.id, sequence: cp.sequence, disks: [] };
    },
  };
  recovery = new LocalRecovery({ definition, stateMachineName, bindings });
}, 120_000);

/** The same definition with the recovery Lambda wrapped: `around` sees each event first. */
function recoveryWith(around: (event: Json, next: (event: Json) => Promise<unknown>) => Promise<unknown>) {
  return new LocalRecovery({
    ...definitionOf,
    bindings: { ...bindings, recovery: (event) => around(event, bindings.recovery) },
  });
}

afterAll(async () => {
  restoreEnv();
  ec2?.destroy();
  scheduler?.destroy();
  await Promise.all([moto?.stop(), ddb?.stop()]);
});

describe('the Recovery state machine on moto_server with the real recovery handler', () => {
  it('drill: launches in the isolated subnet, waits its TTL, tears down and verifies zero left by tag', async () => {
    // Act
    const r = await recovery.run({ mode: 'drill', plan: 'web', checkpoint: 1 }, 'drill-web-1');
    // Assess
    expect(r.status, `${r.error}: ${r.cause}`).toBe('SUCCEEDED');
    expect(r.actions).toEqual(
      expect.arrayContaining(['resolve', 'launch', 'health', 'teardown', 'verify-teardown', 'record']),
    );
    const report = r.output as Json;
    expect(report).toMatchObject({
      jobId: 'drill-web-1',
      mode: 'drill',
      outcome: 'succeeded',
      checkpoint: { id: 'web/cycle-1', sequence: 1 },
      cleanup: { clean: true, remaining: { instances: 0, volumes: 0, images: 0, snapshots: 0 } },
    });
    expect(report.secondsToRunning).toEqual(expect.any(Number));
    expect(await leftOf('drill-web-1')).toEqual({ running: 0, volumes: 0, images: 0, snapshots: 0 });
    // It ran in the isolated drill subnet, tagged as a drill (terminated instances stay listed a while).
    const launched = (
      await ec2.send(
        new DescribeInstancesCommand({ Filters: [{ Name: `tag:${JOB_TAG}`, Values: ['drill-web-1'] }] }),
      )
    ).Reservations!.flatMap((x) => x.Instances ?? []);
    expect(launched.map((i) => i.SubnetId)).toEqual([subnets.drill]);
    expect(launched[0]!.Tags).toEqual(expect.arrayContaining([{ Key: 'ferry:drill', Value: 'true' }]));
    // The replica's snapshots are untouched.
    const replica = await ec2.send(
      new DescribeSnapshotsCommand({
        OwnerIds: ['self'],
        Filters: [{ Name: 'tag:ferry:deployment', Values: [STACK] }],
      }),
    );
    expect(replica.Snapshots).toHaveLength(2 * sequence);
    expect(r.metrics).toEqual([]);
  });

  it('failover: the machines run, the plan’s schedule is paused, the job is recorded; cleanup removes it on command', async () => {
    const r = await recovery.run({ mode: 'failover', plan: 'web' }, 'failover-web-1');
    expect(r.status, `${r.error}: ${r.cause}`).toBe('SUCCEEDED');
    expect(r.output).toMatchObject({
      mode: 'failover',
      outcome: 'succeeded',
      checkpoint: { sequence: 2 },
      schedulePaused: true,
    });
    const schedule = await scheduler.send(
      new GetScheduleCommand({ Name: 'web', GroupName: `${STACK}-plans` }),
    );
    expect(schedule.State).toBe('DISABLED');
    expect((await leftOf('failover-web-1')).running).toBe(1);
    const failedOver = (
      await ec2.send(
        new DescribeInstancesCommand({ Filters: [{ Name: `tag:${JOB_TAG}`, Values: ['failover-web-1'] }] }),
      )
    ).Reservations!.flatMap((x) => x.Instances ?? []);
    expect(failedOver.map((i) => i.SubnetId)).toEqual([subnets.prod]);

    const cleanup = await recovery.run(
      { mode: 'cleanup', plan: 'web', jobId: 'failover-web-1' },
      'cleanup-1',
    );
    expect(cleanup.status, `${cleanup.error}: ${cleanup.cause}`).toBe('SUCCEEDED');
    expect(cleanup.actions).toEqual(expect.arrayContaining(['teardown', 'verify-teardown', 'record']));
    expect(cleanup.actions).not.toContain('resolve');
    expect(await leftOf('failover-web-1')).toEqual({ running: 0, volumes: 0, images: 0, snapshots: 0 });
  });

  it('migration: one last cycle, then exactly the checkpoint it published', async () => {
    const before = sequence;
    const r = await recovery.run({ mode: 'migration', plan: 'web', sourceQuiesced: true }, 'migration-web-1');
    expect(r.status, `${r.error}: ${r.cause}`).toBe('SUCCEEDED');
    expect(r.cycles).toHaveLength(1);
    expect(sequence).toBe(before + 1);
    expect(r.output).toMatchObject({
      mode: 'migration',
      outcome: 'succeeded',
      checkpoint: { id: `web/cycle-${before + 1}` },
      dataLossWindowSeconds: 0,
    });
    expect((await leftOf('migration-web-1')).running).toBe(1);
  });

  it('a checkpoint that is no longer recoverable is refused and nothing is created', async () => {
    // Prepare: the first checkpoint's root snapshot is deleted (as retention would).
    const cp = (await store.listCheckpoints('web')).find((c) => c.sequence === 1)!;
    await ec2.send(new DeleteSnapshotCommand({ SnapshotId: cp.disks[0]!.target }));
    // Act
    const r = await recovery.run({ mode: 'drill', plan: 'web', checkpoint: 1 }, 'drill-web-2');
    // Assess
    expect(r.status).toBe('FAILED');
    expect(r.error).toBe('RecoveryRefusedError');
    expect(r.cause).toContain('no longer recoverable');
    expect(r.actions).toEqual(['resolve']);
    expect(await leftOf('drill-web-2')).toEqual({ running: 0, volumes: 0, images: 0, snapshots: 0 });
  });

  it('a machine that fails its health check is reported and the drill is still torn down', async () => {
    // Prepare: the instance is terminated under the job before its first health check.
    const broken = recoveryWith(async (event, next) => {
      if (event.action === 'health' && ((event.previous as Json).machines as unknown[]).length === 0) {
        const ids = (event.launched as { instanceId?: string }[]).flatMap((l) =>
          l.instanceId ? [l.instanceId] : [],
        );
        const { TerminateInstancesCommand } = await import('@aws-sdk/client-ec2');
        await ec2.send(new TerminateInstancesCommand({ InstanceIds: ids }));
      }
      return next(event);
    });
    // Act
    const r = await broken.run({ mode: 'drill', plan: 'web', checkpoint: 2 }, 'drill-web-3');
    // Assess
    expect(r.error, r.cause).toBe('MachinesUnhealthy');
    expect(r.actions.slice(-3)).toEqual(['teardown', 'verify-teardown', 'record']);
    expect(await leftOf('drill-web-3')).toEqual({ running: 0, volumes: 0, images: 0, snapshots: 0 });
  });

  it('a teardown interrupted after part of its work is retried, verified and not alarmed', async () => {
    let interrupted = false;
    const flaky = recoveryWith(async (event, next) => {
      const answer = await next(event);
      if (event.action === 'teardown' && !interrupted) {
        // The Lambda did its work and timed out before answering, once: the task's retry runs it again.
        interrupted = true;
        const e = new Error('Sandbox.Timedout');
        e.name = 'Sandbox.Timedout';
        throw e;
      }
      return answer;
    });
    const r = await flaky.run({ mode: 'drill', plan: 'web', checkpoint: 2 }, 'drill-web-4');
    expect(r.status, `${r.error}: ${r.cause}`).toBe('SUCCEEDED');
    expect(r.steps.some((s) => s.state === 'Teardown' && s.type === 'StateRetried')).toBe(true);
    expect(r.metrics).toEqual([]);
    expect(await leftOf('drill-web-4')).toEqual({ running: 0, volumes: 0, images: 0, snapshots: 0 });
  });

  it('ferry recover --cloud and ferry checkpoints --cloud, as an operator runs them, against this local run', async () => {
    // Prepare: a Step Functions endpoint over this run; the CLI is a child process with its own env.
    const api = await serveLocalStepFunctions(recovery, definitionOf.stateMachineName);
    const env = {
      PATH: process.env.PATH,
      HOME: process.env.HOME,
      AWS_REGION: 'us-east-1',
      AWS_ACCESS_KEY_ID: 'local',
      AWS_SECRET_ACCESS_KEY: 'local',
      AWS_ENDPOINT_URL_SFN: api.endpoint,
      AWS_ENDPOINT_URL_DYNAMODB: ddb.endpoint,
      AWS_ENDPOINT_URL_EC2: moto.endpoint,
    };
    try {
      // Act
      const run = await ferry(
        [
          'recover',
          '--cloud',
          '--stack',
          STACK,
          '--plan',
          'web',
          '--ttl',
          '5',
          '--job',
          'drill-cli-1',
          '--poll',
          '0.1',
        ],
        { env },
      );
      const list = await ferry(['checkpoints', '--cloud', '--stack', STACK, '--table', TABLE], { env });
      // Assess
      expect(run.stderr).toContain('  Drill: wait for TTL');
      expect(run.stderr).toContain('  Verify teardown');
      expect(run.stdout).toMatch(/^drill of plan web from checkpoint web\/cycle-\d+ \(job drill-cli-1\)$/m);
      expect(run.stdout).toMatch(/^machine web-1 {2}i-[0-9a-f]+/m);
      expect(run.stdout).toContain('outcome: succeeded');
      expect(run.code, run.stderr).toBe(0);
      expect(await leftOf('drill-cli-1')).toEqual({ running: 0, volumes: 0, images: 0, snapshots: 0 });
      expect(list.code, list.stderr).toBe(0);
      // Checkpoint 1 lost its root snapshot above: the listing says so.
      expect(list.stdout).toMatch(
        /^web\/cycle-1 .* \[not recoverable: snapshot snap-[0-9a-f]+ of disk root is gone\]$/m,
      );
      expect(list.stdout).toMatch(/^web\/cycle-2 .*replicated$/m);
      expect(list.stdout).toContain(`root: incremental`);
    } finally {
      await api.stop();
    }
  });

  it("failback: the reverse cycle from the failover's recovered volumes and the shared checkpoint, then the cutover", async () => {
    // Prepare: a failover of the latest checkpoint, whose machine runs in production.
    const failover = await recovery.run({ mode: 'failover', plan: 'web' }, 'failover-web-fb');
    expect(failover.status, `${failover.error}: ${failover.cause}`).toBe('SUCCEEDED');
    const shared = (await store.listCheckpoints('web')).at(-1)!;
    expect(failover.output).toMatchObject({ checkpoint: { id: shared.id } });
    const [instance] = (
      await ec2.send(
        new DescribeInstancesCommand({ Filters: [{ Name: `tag:${JOB_TAG}`, Values: ['failover-web-fb'] }] }),
      )
    ).Reservations!.flatMap((x) => x.Instances ?? []);
    const volumeAt = (device: string) =>
      instance!.BlockDeviceMappings!.find((b) => b.DeviceName === device)!.Ebs!.VolumeId!;
    const recovered = { root: volumeAt('/dev/xvda'), data: volumeAt('/dev/sdf') };
    // The reverse cycle, as the cycle machine would run it: each recovered volume snapshotted (only
    // a failover's or migration's volumes may be: the IAM condition), a checkpoint of the reverse set.
    const reverseCycles: Json[] = [];
    const reverseCycle = async (input: Json) => {
      reverseCycles.push(input);
      const set = String(input.set);
      const disks = [];
      for (const d of input.disks as { disk: string; volumeId: string }[]) {
        const [volume] = (await ec2.send(new DescribeVolumesCommand({ VolumeIds: [d.volumeId] }))).Volumes!;
        expect(volume!.Tags).toEqual(
          expect.arrayContaining([{ Key: 'ferry:recovery-mode', Value: 'failover' }]),
        );
        const snapshotId = (await ec2.send(new CreateSnapshotCommand({ VolumeId: d.volumeId }))).SnapshotId!;
        disks.push({
          disk: d.disk,
          source: snapshotId,
          target: snapshotId,
          sizeBytes: 8 * 1024 ** 3,
          kind: 'incremental' as const,
          chunks: 1,
          bytes: 1024 ** 2,
          aggregate: { algorithm: 'ebs-linear-sha256' as const, value: 'cd'.repeat(32) },
        });
      }
      const before = await store.listCheckpoints(set);
      const n = before.length + 1;
      const cp: RecoveryCheckpoint = {
        id: `${set}/cycle-${n}`,
        set,
        sequence: n,
        createdAt: new Date().toISOString(),
        parent: before.at(-1)?.id,
        disks,
      };
      await store.publishCheckpoint(cp);
      return { status: 'published', checkpointId: cp.id, sequence: n, disks: [] };
    };
    const local = new LocalRecovery({ ...definitionOf, bindings: { ...bindings, runCycle: reverseCycle } });
    const reverseSet = 'web-failback-failover-web-fb';

    // Act 1: replicate back (the recovered machine keeps running).
    const back = await local.run({ mode: 'failback', plan: 'web' }, 'failback-web-1');
    expect(back.status, `${back.error}: ${back.cause}`).toBe('SUCCEEDED');
    expect(back.actions).toEqual(['prepare-failback', 'record']);
    const snap = (disk: string) => shared.disks.find((d) => d.disk === disk)!;
    expect(reverseCycles[0]).toMatchObject({
      plan: reverseSet,
      set: reverseSet,
      disks: [
        { disk: 'root', volumeId: recovered.root },
        { disk: 'data', volumeId: recovered.data },
      ],
      // Diffed against what the volumes were created from; written over the original side.
      base: {
        checkpointId: shared.id,
        disks: ['root', 'data'].map((disk) => ({
          disk,
          previousSourceSnapshotId: snap(disk).target,
          parentTargetSnapshotId: snap(disk).source,
        })),
      },
    });
    expect(back.output).toMatchObject({
      mode: 'failback',
      outcome: 'succeeded',
      failback: {
        failoverJobId: 'failover-web-fb',
        sharedCheckpointId: shared.id,
        reverseSet,
        fromBase: true,
        reverseCheckpointId: `${reverseSet}/cycle-1`,
      },
    });
    expect((await leftOf('failback-web-1')).running).toBe(0);

    // Act 2: the cutover: one more reverse cycle (no base now), the plan's machine from its checkpoint.
    const cutover = await local.run(
      { mode: 'failback', plan: 'web', cutover: true, sourceQuiesced: true },
      'failback-web-2',
    );
    expect(cutover.status, `${cutover.error}: ${cutover.cause}`).toBe('SUCCEEDED');
    expect(reverseCycles[1]).not.toHaveProperty('base');
    expect(cutover.output).toMatchObject({
      outcome: 'succeeded',
      checkpoint: { id: `${reverseSet}/cycle-2` },
      dataLossWindowSeconds: 0,
      failback: { cutover: true, fromBase: false, reverseCheckpointId: `${reverseSet}/cycle-2` },
    });
    const relaunched = (
      await ec2.send(
        new DescribeInstancesCommand({ Filters: [{ Name: `tag:${JOB_TAG}`, Values: ['failback-web-2'] }] }),
      )
    ).Reservations!.flatMap((x) => x.Instances ?? []);
    expect(relaunched.map((i) => i.SubnetId)).toEqual([subnets.prod]);
    // The plan is no longer failed over: a further failback has nothing to do and creates nothing.
    const again = await local.run({ mode: 'failback', plan: 'web' }, 'failback-web-3');
    expect(again.status).toBe('FAILED');
    expect(again.cause).toContain('it is not failed over');
    expect(reverseCycles).toHaveLength(2);
  });

  it("made only the DynamoDB requests the stack's recovery role allows", () => {
    const allowed = new Set(['GetItemCommand', 'QueryCommand', 'PutItemCommand', 'DeleteItemCommand']);
    expect([...tableRequests]).toEqual(expect.arrayContaining(['QueryCommand', 'PutItemCommand']));
    expect([...tableRequests].filter((c) => !allowed.has(c))).toEqual([]);
  });
});
