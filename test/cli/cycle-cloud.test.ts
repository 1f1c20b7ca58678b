// `ferry cycle start --cloud` as an operator runs it, against a local run of the deployed stack: the
// cycle state machine's synthesized definition in a LocalCloud (the real handlers on dynalite, fauxqs
// and the EBS emulator) behind a local Step Functions API (local-cloud/recovery.ts
// serveLocalStepFunctions), the plan's schedule in EventBridge Scheduler on moto_server. The real
// `ferry` binary finds the machine by name, takes the schedule's input, starts and follows the cycle
// and prints its checkpoint, which the catalog holds and which reads back equal to the volume.
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  CreateScheduleCommand,
  CreateScheduleGroupCommand,
  SchedulerClient,
} from '@aws-sdk/client-scheduler';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { LocalCloud } from '../../local-cloud/cloud.ts';
import { type LocalStepFunctions, serveLocalStepFunctions } from '../../local-cloud/recovery.ts';
import { type LocalEmulators, startLocalEmulators } from '../../local-cloud/start-emulators.ts';
import { fillRegion } from '../../local-cloud/workload.ts';
import { MiB } from '../../shared/engine/units.ts';
import { ferry, type Run } from '../support/ferry-cli.ts';
import { type Moto, startMoto } from '../support/moto.ts';

const said = (r: Run) => `exit ${r.code ?? r.signal}\n${r.stdout}${r.stderr}`;

let emulators: LocalEmulators;
let cloud: LocalCloud;
let moto: Moto;
let api: LocalStepFunctions;
let stack: string;
let volumeId: string;
let dir: string;

beforeAll(async () => {
  [emulators, moto] = await Promise.all([startLocalEmulators(), startMoto()]);
  cloud = await LocalCloud.start({ endpoints: emulators.endpoints, snapshots: emulators.snapshots });
  stack = cloud.deployment.stackName;
  api = await serveLocalStepFunctions(cloud.asMachine(), `${stack}-cycle`);
  volumeId = cloud.ec2.createVolume(8 * MiB);
  fillRegion(cloud.ec2.volume(volumeId), 0, 6 * MiB, 3);
  // The plan's schedule, as the stack creates it: its target input is the cycle input.
  const scheduler = new SchedulerClient(moto.clientConfig);
  await scheduler.send(new CreateScheduleGroupCommand({ Name: `${stack}-plans` }));
  await scheduler.send(
    new CreateScheduleCommand({
      Name: 'erp',
      GroupName: `${stack}-plans`,
      ScheduleExpression: 'rate(15 minutes)',
      FlexibleTimeWindow: { Mode: 'OFF' },
      State: 'ENABLED',
      Target: {
        Arn: `arn:aws:states:us-east-1:123456789012:stateMachine:${stack}-cycle`,
        RoleArn: `arn:aws:iam::123456789012:role/${stack}-ScheduleRole`,
        Input: JSON.stringify({ plan: 'erp', set: 'erp', disks: [{ disk: 'root', volumeId }] }),
      },
    }),
  );
  scheduler.destroy();
  dir = await mkdtemp(join(tmpdir(), 'ferry-cycle-cloud-'));
}, 180_000);

afterAll(async () => {
  await api?.stop();
  await cloud?.stop();
  await Promise.all([emulators?.stop(), moto?.stop()]);
  if (dir !== undefined) await rm(dir, { recursive: true, force: true });
});

const env = () => ({
  ...process.env,
  AWS_ENDPOINT_URL_SFN: api.endpoint,
  AWS_ENDPOINT_URL_SCHEDULER: moto.endpoint,
  AWS_REGION: 'us-east-1',
  AWS_ACCESS_KEY_ID: 'local',
  AWS_SECRET_ACCESS_KEY: 'local',
  AWS_PROFILE: '',
});

describe('ferry cycle start --cloud against a local run of the stack', () => {
  it("starts the plan's cycle with its schedule's input, follows it and prints its checkpoint", async () => {
    // Act
    const r = await ferry(
      [
        'cycle',
        'start',
        '--cloud',
        '--stack',
        stack,
        '--plan',
        'erp',
        '--name',
        'erp-manual-1',
        '--poll',
        '0.05',
      ],
      { env: env() },
    );
    // Assess: what the operator sees, and what the catalog and the snapshot hold.
    expect(r.code, said(r)).toBe(0);
    expect(r.stderr).toContain(`ferry: cycle erp-manual-1 of plan erp started: execution arn:aws:states:`);
    expect(r.stderr).toMatch(/^\+\S+ {2}cycle finished$/m);
    expect(r.stdout).toMatch(/^checkpoint erp\/erp-manual-1 published \(#1\)$/m);
    expect(r.stdout).toMatch(/^ {2}root: full, \d+ blocks, [\d.]+ MiB written$/m);
    expect(api.executions.get('erp-manual-1')?.input).toEqual({
      plan: 'erp',
      set: 'erp',
      disks: [{ disk: 'root', volumeId }],
    });
    const cp = (await cloud.latestCheckpoint('erp'))!;
    expect(cp.id).toBe('erp/erp-manual-1');
    const expected = Buffer.from(cloud.ec2.volume(volumeId));
    expect((await cloud.compareSnapshot(cp.disks[0]!.target, expected)).differing).toEqual([]);
  }, 180_000);

  it('takes a cycle input from --input (an incremental after a change) and prints it as JSON', async () => {
    fillRegion(cloud.ec2.volume(volumeId), 1 * MiB, MiB / 2, 7);
    const input = join(dir, 'erp-cycle.json');
    await writeFile(input, JSON.stringify({ plan: 'erp', set: 'erp', disks: [{ disk: 'root', volumeId }] }));
    const r = await ferry(
      [
        'cycle',
        'start',
        '--cloud',
        '--stack',
        stack,
        '--plan',
        'erp',
        '--input',
        input,
        '--json',
        '--poll',
        '0.05',
      ],
      { env: env() },
    );
    expect(r.code, said(r)).toBe(0);
    const end = JSON.parse(r.stdout);
    expect(end).toMatchObject({
      status: 'SUCCEEDED',
      output: { status: 'published', sequence: 2, disks: [{ disk: 'root', kind: 'incremental' }] },
    });
    expect(end.cycleId).toMatch(/^erp-manual-\d{8}T\d{6}-[0-9a-f]{4}$/);
  }, 180_000);

  it('refuses, before starting anything, a plan without a schedule, an input of another plan, a bad name', async () => {
    const before = api.executions.size;
    const none = await ferry(['cycle', 'start', '--cloud', '--stack', stack, '--plan', 'nope'], {
      env: env(),
    });
    expect(none.code, said(none)).toBe(2);
    expect(none.stderr).toContain(`--plan: plan nope has no schedule nope in ${stack}-plans`);
    const other = join(dir, 'other-cycle.json');
    await writeFile(other, JSON.stringify({ plan: 'web', disks: [{ disk: 'root', volumeId }] }));
    const wrong = await ferry(
      ['cycle', 'start', '--cloud', '--stack', stack, '--plan', 'erp', '--input', other],
      { env: env() },
    );
    expect(wrong.code, said(wrong)).toBe(2);
    expect(wrong.stderr).toContain('is a cycle of plan web, not erp');
    const named = await ferry(
      ['cycle', 'start', '--cloud', '--stack', stack, '--plan', 'erp', '--name', 'has space'],
      { env: env() },
    );
    expect(named.code).toBe(2);
    expect(named.stderr).toContain('--name: must be 1-80 letters');
    const local = await ferry(['cycle', 'start', '--plan', 'erp']);
    expect(local.code).toBe(2);
    expect(local.stderr).toContain('ferry cycle start runs a cycle on a deployed stack: add --cloud');
    expect(api.executions.size).toBe(before);
  }, 120_000);
});
