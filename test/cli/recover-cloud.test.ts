// `ferry recover --cloud` and `ferry checkpoints --cloud`: flags to the Recovery state machine's input
// (refusals before anything starts), the state machine found by name, the execution started, followed
// through its history to the end with progress lines, and the report printed. Step Functions is an
// aws-sdk-client-mock here: moto's Step Functions cannot run the recovery Lambda, so there is no
// emulator whose execution would mean anything (the definition itself runs in test/infra and
// test/local-cloud). The catalog listing runs against dynalite.
import { CreateTableCommand, TagResourceCommand } from '@aws-sdk/client-dynamodb';
import { DescribeSnapshotsCommand, EC2Client } from '@aws-sdk/client-ec2';
import {
  DescribeExecutionCommand,
  GetExecutionHistoryCommand,
  type HistoryEvent,
  ListStateMachinesCommand,
  SFNClient,
  StartExecutionCommand,
} from '@aws-sdk/client-sfn';
import { mockClient } from 'aws-sdk-client-mock';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import {
  checkpointsCloud,
  describeReport,
  followExecution,
  recoverCloud,
  recoveryRequest,
  runCloudCommand,
} from '../../cli/recover-cloud.ts';
import { type Dynalite, startDynalite } from '../../local-cloud/emulators/dynalite.ts';
import { tableDefinition } from '../../shared/aws/dynamo/schema.ts';
import { DynamoStateStore } from '../../shared/aws/dynamo/state-store.ts';

const ARN = 'arn:aws:states:eu-west-1:111122223333:stateMachine:Prod-recovery';
const sfnClient = new SFNClient({
  region: 'eu-west-1',
  credentials: { accessKeyId: 'x', secretAccessKey: 'y' },
});
const sfn = mockClient(sfnClient);
// EC2 for the recoverability check of the catalog listing (moto's: test/local-cloud/recovery-moto).
const ec2Client = new EC2Client({
  region: 'eu-west-1',
  credentials: { accessKeyId: 'x', secretAccessKey: 'y' },
});
const ec2 = mockClient(ec2Client);

const at = (s: number) => new Date(Date.UTC(2026, 11, 5, 10, 0, s));
const REPORT = {
  jobId: 'drill-web-1',
  mode: 'drill',
  plan: 'web',
  checkpoint: { id: 'web/c7', sequence: 7, publishedAt: '2026-12-05T09:00:00Z' },
  outcome: 'succeeded',
  secondsToRunning: 142,
  machines: [
    { name: 'web-1', instanceId: 'i-0123456789abcdef0', volumeIds: [], healthy: true, state: 'running' },
  ],
  cleanup: { terminated: 1, deregistered: 1, deletedVolumes: 0, deletedSnapshots: 0, clean: true },
};

/** An execution's history as Step Functions keeps it, oldest first. */
const HISTORY: HistoryEvent[] = [
  { id: 1, type: 'ExecutionStarted', timestamp: at(0) },
  {
    id: 2,
    type: 'ChoiceStateEntered',
    timestamp: at(0),
    stateEnteredEventDetails: { name: 'Check request' },
  },
  { id: 3, type: 'TaskStateEntered', timestamp: at(1), stateEnteredEventDetails: { name: 'Resolve' } },
  { id: 4, type: 'MapStateEntered', timestamp: at(2), stateEnteredEventDetails: { name: 'Launch machines' } },
  { id: 5, type: 'MapIterationStarted', timestamp: at(2), mapIterationStartedEventDetails: { index: 0 } },
  {
    id: 6,
    type: 'TaskFailed',
    timestamp: at(3),
    taskFailedEventDetails: {
      resourceType: 'lambda',
      resource: 'invoke',
      error: 'States.TaskFailed',
      cause: JSON.stringify({ errorType: 'Error', errorMessage: 'RequestLimitExceeded\nretrying' }),
    },
  },
  { id: 7, type: 'TaskStateEntered', timestamp: at(30), stateEnteredEventDetails: { name: 'Check health' } },
  { id: 8, type: 'TaskStateEntered', timestamp: at(60), stateEnteredEventDetails: { name: 'Check health' } },
  {
    id: 9,
    type: 'WaitStateEntered',
    timestamp: at(61),
    stateEnteredEventDetails: { name: 'Drill: wait for TTL' },
  },
  { id: 10, type: 'TaskStateEntered', timestamp: at(125), stateEnteredEventDetails: { name: 'Teardown' } },
  { id: 11, type: 'ExecutionSucceeded', timestamp: at(130) },
];

/** Serves GetExecutionHistory newest first in pages of 3, showing only the first `visible` events. */
function serveHistory(visible: () => number) {
  sfn.on(GetExecutionHistoryCommand).callsFake((input: { nextToken?: string; reverseOrder?: boolean }) => {
    const events = HISTORY.slice(0, visible()).reverse();
    const from = Number(input.nextToken ?? 0);
    const page = events.slice(from, from + 3);
    return { events: page, ...(from + 3 < events.length ? { nextToken: String(from + 3) } : {}) };
  });
}

beforeEach(() => {
  sfn.reset();
  ec2.reset();
});

describe('recoveryRequest', () => {
  it('turns flags into the state machine input and names the execution after the job', () => {
    const { request, executionName } = recoveryRequest({ plan: 'web', checkpoint: '7', ttl: '45' });
    expect(request).toMatchObject({ mode: 'drill', plan: 'web', checkpoint: 7, ttlMinutes: 45 });
    expect(executionName).toBe(request.jobId);
    expect(executionName).toMatch(/^drill-web-\d{8}T\d{6}-[0-9a-f]{4}$/);
    expect(
      recoveryRequest({ plan: 'web', mode: 'failover', at: '2026-12-05T10:00:00Z', job: 'dr-1' }),
    ).toEqual({
      request: { mode: 'failover', plan: 'web', jobId: 'dr-1', checkpoint: { at: '2026-12-05T10:00:00Z' } },
      executionName: 'dr-1',
    });
    const cleanup = recoveryRequest({ plan: 'web', mode: 'cleanup', job: 'drill-web-1' });
    expect(cleanup.request).toEqual({ mode: 'cleanup', plan: 'web', jobId: 'drill-web-1' });
    expect(cleanup.executionName).toMatch(/^cleanup-drill-web-1-[0-9a-f]{6}$/);
    // A failback names no checkpoint (its failover's is the shared one); its cutover may say quiesced.
    expect(
      recoveryRequest({ plan: 'web', mode: 'failback', cutover: true, sourceQuiesced: true, job: 'fb-1' })
        .request,
    ).toEqual({ mode: 'failback', plan: 'web', jobId: 'fb-1', cutover: true, sourceQuiesced: true });
    expect(
      recoveryRequest({ plan: 'web', mode: 'migration', sourceQuiesced: true, job: 'm-1' }).request,
    ).toEqual({ mode: 'migration', plan: 'web', jobId: 'm-1', sourceQuiesced: true });
  });

  it('refuses what cannot work before anything is started, naming the flag', () => {
    const refused = (flags: Parameters<typeof recoveryRequest>[0]) => {
      try {
        recoveryRequest(flags);
      } catch (err) {
        expect((err as Error).name).toBe('ConfigError');
        return (err as Error).message;
      }
      throw new Error('not refused');
    };
    expect(refused({})).toMatch(/^--plan: /);
    expect(refused({ plan: 'web', mode: 'explode' })).toMatch(/^--mode: must be one of drill, failover/);
    expect(refused({ plan: 'web', checkpoint: '3', at: '2026-12-05T10:00:00Z' })).toMatch(
      /^--at: give either/,
    );
    expect(refused({ plan: 'web', checkpoint: 'yesterday' })).toMatch(/^--checkpoint: expected latest/);
    expect(refused({ plan: 'web', at: 'monday' })).toMatch(/^--at: expected an ISO 8601/);
    expect(refused({ plan: 'web', mode: 'failover', ttl: '30' })).toMatch(/^--ttl: only a drill/);
    expect(refused({ plan: 'web', ttl: '0' })).toMatch(/^--ttl: expected whole minutes/);
    expect(refused({ plan: 'web', mode: 'migration', checkpoint: '2' })).toMatch(/final cycle/);
    expect(refused({ plan: 'web', mode: 'cleanup' })).toMatch(/^--job: a cleanup needs/);
    expect(refused({ mode: 'cleanup', job: 'drill-web-1' })).toMatch(/^--plan: /);
    expect(refused({ plan: 'web', mode: 'cleanup', job: 'j', ttl: '5' })).toMatch(
      /^--ttl: is not for a cleanup/,
    );
    expect(refused({ plan: 'web', job: 'has space' })).toMatch(/^--job: /);
    expect(refused({ plan: 'web', machines: { name: 'x' } })).toMatch(/^--machines: /);
    expect(refused({ plan: 'web', cutover: true })).toMatch(/^--cutover: is for a failback/);
    expect(refused({ plan: 'web', mode: 'failover', sourceQuiesced: true })).toMatch(/^--source-quiesced: /);
    expect(refused({ plan: 'web', mode: 'failback', checkpoint: '2' })).toMatch(
      /^--checkpoint: a failback starts from the checkpoint its failover recovered/,
    );
    expect(refused({ plan: 'web', mode: 'failback', machines: [{ name: 'x' }] })).toMatch(
      /^--machines: a failback launches machines only with --cutover/,
    );
    expect(refused({ plan: 'web', mode: 'failback', reverseSet: 'no spaces' })).toMatch(/^--reverse-set: /);
  });
});

describe('describeReport', () => {
  it('says what a failback replicated back, from which checkpoint, into which set', () => {
    const lines = describeReport({
      jobId: 'fb-1',
      mode: 'failback',
      plan: 'web',
      outcome: 'succeeded',
      machines: [],
      failback: {
        failoverJobId: 'fo-1',
        sharedCheckpointId: 'web/c7',
        reverseSet: 'web-failback-fo-1',
        fromBase: true,
        cutover: false,
        disks: [{ disk: 'root', volumeId: 'vol-0aaaaaaaaaaaaaaaa' }],
        reverseCheckpointId: 'web-failback-fo-1/c1',
      },
    });
    expect(lines).toEqual([
      'failback of plan web (job fb-1)',
      'failback of job fo-1 from shared checkpoint web/c7 into set web-failback-fo-1 (its first cycle: incremental from the shared checkpoint)',
      'recovered volumes: root <- vol-0aaaaaaaaaaaaaaaa',
      'reverse checkpoint: web-failback-fo-1/c1',
      'outcome: succeeded',
    ]);
  });
});

describe('ferry recover --cloud (Step Functions mocked)', () => {
  it('finds the state machine by name, starts the job, follows its history to the end and prints the report', async () => {
    // Prepare: the machine is on the second page; the execution runs for two polls.
    sfn
      .on(ListStateMachinesCommand)
      .resolvesOnce({
        stateMachines: [
          { name: 'Other-recovery', stateMachineArn: 'arn:other', type: 'STANDARD', creationDate: at(0) },
        ],
        nextToken: 't2',
      })
      .resolvesOnce({
        stateMachines: [
          { name: 'Prod-recovery', stateMachineArn: ARN, type: 'STANDARD', creationDate: at(0) },
        ],
      });
    sfn.on(StartExecutionCommand).resolves({ executionArn: `${ARN}:drill-web-1`, startDate: at(0) });
    let polls = 0;
    sfn.on(DescribeExecutionCommand).callsFake(() => {
      polls++;
      return polls < 3 ? { status: 'RUNNING' } : { status: 'SUCCEEDED', output: JSON.stringify(REPORT) };
    });
    serveHistory(() => (polls === 1 ? 5 : polls === 2 ? 9 : HISTORY.length));
    const out: string[] = [];
    const err: string[] = [];
    // Act
    const end = await recoverCloud(
      { stack: 'Prod', plan: 'web', job: 'drill-web-1', ttl: '60' },
      { out: (l) => out.push(l), err: (l) => err.push(l), sfn: sfnClient, pollMs: 0, env: {} },
    );
    // Assess
    expect(end.status).toBe('SUCCEEDED');
    const start = sfn.commandCalls(StartExecutionCommand)[0]!.args[0].input;
    expect(start.stateMachineArn).toBe(ARN);
    expect(start.name).toBe('drill-web-1');
    expect(JSON.parse(start.input!)).toEqual({
      mode: 'drill',
      plan: 'web',
      jobId: 'drill-web-1',
      ttlMinutes: 60,
    });
    // Each event once, in order, though the history was read three times; loops counted on one line.
    expect(err).toEqual([
      `ferry: drill started: job drill-web-1, execution ${ARN}:drill-web-1`,
      '+1s  Resolve',
      '+2s  Launch machines',
      '+2s  machine 1 started',
      '+3s  failed: States.TaskFailed: RequestLimitExceeded retrying',
      '+30s  Check health',
      '+1m00s  Check health (2)',
      '+1m01s  Drill: wait for TTL',
      '+2m05s  Teardown',
      '+2m10s  recovery finished',
    ]);
    expect(out).toEqual([
      'drill of plan web from checkpoint web/c7 (job drill-web-1)',
      'time to running (RTO achieved): 142 s',
      'machine web-1  i-0123456789abcdef0  running  healthy',
      'clean-up: {"terminated":1,"deregistered":1,"deletedVolumes":0,"deletedSnapshots":0,"clean":true}',
      'outcome: succeeded',
    ]);
  });

  it('a failed job is an error naming the job and the cause; a refused input is a ConfigError', async () => {
    sfn.on(StartExecutionCommand).resolves({ executionArn: `${ARN}:x`, startDate: at(0) });
    sfn.on(GetExecutionHistoryCommand).resolves({ events: [] });
    sfn
      .on(DescribeExecutionCommand)
      .resolvesOnce({
        status: 'FAILED',
        error: 'TeardownFailed',
        cause: 'what the job created could not be verified gone',
      })
      .resolvesOnce({
        status: 'FAILED',
        error: 'RecoveryRefusedError',
        cause: JSON.stringify({
          errorType: 'RecoveryRefusedError',
          errorMessage: 'machine web-1: bootDisk root is not in checkpoint web/c3',
        }),
      });
    const io = {
      out: () => {},
      err: () => {},
      sfn: sfnClient,
      pollMs: 0,
      env: { FERRY_RECOVERY_STATE_MACHINE_ARN: ARN },
    };
    await expect(recoverCloud({ stack: 'Prod', plan: 'web', job: 'drill-9' }, io)).rejects.toThrow(
      /^recovery job drill-9 failed: TeardownFailed: what the job created could not be verified gone$/,
    );
    expect(sfn.commandCalls(ListStateMachinesCommand)).toHaveLength(0);

    const refused = await recoverCloud({ stack: 'Prod', plan: 'web', job: 'drill-10' }, io).catch(
      (e: Error) => e,
    );
    expect((refused as Error).name).toBe('ConfigError');
    expect((refused as Error).message).toContain('machine web-1: bootDisk root is not in checkpoint web/c3');
  });

  it('an unknown stack, a reused job id with another input: one clear line each', async () => {
    sfn.on(ListStateMachinesCommand).resolves({ stateMachines: [] });
    const io = { out: () => {}, err: () => {}, sfn: sfnClient, pollMs: 0, env: {} };
    await expect(recoverCloud({ stack: 'Nope', plan: 'web' }, io)).rejects.toThrow(
      /^--stack Nope: no state machine named Nope-recovery/,
    );
    const exists = new Error('Execution Already Exists');
    exists.name = 'ExecutionAlreadyExists';
    sfn.on(StartExecutionCommand).rejects(exists);
    await expect(
      recoverCloud({ stack: 'Prod', plan: 'web', job: 'dr-1', stateMachineArn: ARN }, io),
    ).rejects.toThrow(/^--job dr-1: a recovery job of that name already ran with another input/);
  });

  it('--detach prints the execution and does not follow it; the command line reaches the same code', async () => {
    sfn.on(StartExecutionCommand).resolves({ executionArn: `${ARN}:dr-1`, startDate: at(0) });
    const out: string[] = [];
    await runCloudCommand(
      [
        'recover',
        '--cloud',
        '--stack',
        'Prod',
        '--plan',
        'web',
        '--mode',
        'failover',
        '--job',
        'dr-1',
        '--state-machine-arn',
        ARN,
        '--detach',
      ],
      { out: (l) => out.push(l), err: () => {}, sfn: sfnClient, env: {} },
    );
    expect(out).toEqual([`${ARN}:dr-1`]);
    expect(JSON.parse(sfn.commandCalls(StartExecutionCommand)[0]!.args[0].input.input!)).toEqual({
      mode: 'failover',
      plan: 'web',
      jobId: 'dr-1',
    });
    expect(sfn.commandCalls(DescribeExecutionCommand)).toHaveLength(0);
    await expect(
      runCloudCommand(['recover', '--cloud', '--stack', 'Prod', '--plan', 'web', '--mode', 'nuke'], {
        out: () => {},
        err: () => {},
        sfn: sfnClient,
      }),
    ).rejects.toThrow(/argument 'nuke' is invalid/);
  });

  it('stops following when aborted and says the execution goes on', async () => {
    sfn.on(DescribeExecutionCommand).resolves({ status: 'RUNNING' });
    sfn.on(GetExecutionHistoryCommand).resolves({ events: [] });
    const abort = new AbortController();
    const following = followExecution(sfnClient, `${ARN}:x`, { pollMs: 60_000, signal: abort.signal });
    abort.abort();
    await expect(following).rejects.toThrow(/stopped following .*; it goes on/);
  });
});

describe('ferry checkpoints --cloud (dynalite)', () => {
  let ddb: Dynalite;
  beforeAll(async () => {
    ddb = await startDynalite();
  });
  afterAll(async () => {
    await ddb.stop();
  });

  it("finds the stack's table by its ferry:deployment tag and lists the catalog", async () => {
    // Prepare: the stack's table (as CloudFormation names it) and another stack's.
    for (const [name, stack] of [
      ['Prod-State0A1B2C3D-XYZ', 'Prod'],
      ['Prod2-State9-ABC', 'Prod2'],
    ] as const) {
      const created = await ddb.client.send(new CreateTableCommand(tableDefinition(name)));
      await ddb.client.send(
        new TagResourceCommand({
          ResourceArn: created.TableDescription!.TableArn!,
          Tags: [{ Key: 'ferry:deployment', Value: stack }],
        }),
      );
    }
    await new DynamoStateStore(ddb.client, 'Prod-State0A1B2C3D-XYZ').publishCheckpoint({
      id: 'web/c1',
      set: 'web',
      sequence: 1,
      createdAt: '2026-12-05T10:00:00.000Z',
      parent: undefined,
      disks: [
        {
          disk: 'root',
          kind: 'full',
          source: 'snap-0123456789abcdef0',
          target: 'snap-0fedcba9876543210',
          sizeBytes: 8 * 1048576,
          chunks: 1,
          bytes: 1048576,
          aggregate: { algorithm: 'ebs-linear-sha256', value: 'ab'.repeat(32) },
        },
      ],
    });
    ec2
      .on(DescribeSnapshotsCommand)
      .resolvesOnce({ Snapshots: [{ SnapshotId: 'snap-0fedcba9876543210', State: 'completed' }] })
      .resolvesOnce({ Snapshots: [] });
    const out: string[] = [];
    const io = {
      out: (l: string) => out.push(l),
      err: () => {},
      dynamo: ddb.client,
      ec2: ec2Client,
      env: {},
    };
    // Act
    const list = await checkpointsCloud({ stack: 'Prod' }, io);
    // Assess
    expect(list.map((c) => c.id)).toEqual(['web/c1']);
    expect(out[0]).toMatch(/^web\/c1 {2}2026-12-05T10:00:00.000Z {2}1 disk\(s\) {2}1(\.0)? MiB replicated$/);
    expect(out[1]).toContain('root: full');
    expect(ec2.commandCalls(DescribeSnapshotsCommand)[0]!.args[0].input.Filters).toEqual([
      { Name: 'snapshot-id', Values: ['snap-0fedcba9876543210'] },
    ]);
    // Its snapshot deleted (retention, or by hand): marked, with the disk and the snapshot.
    out.length = 0;
    await checkpointsCloud({ table: 'Prod-State0A1B2C3D-XYZ' }, io);
    expect(out[0]).toMatch(
      /replicated {2}\[not recoverable: snapshot snap-0fedcba9876543210 of disk root is gone\]$/,
    );
    await expect(checkpointsCloud({ stack: 'Staging' }, { ...io, out: () => {} })).rejects.toThrow(
      /^--stack Staging: no DynamoDB table tagged ferry:deployment=Staging/,
    );
  });
});
