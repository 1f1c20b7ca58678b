// Pausing a plan's cycle schedule (shared/aws/scheduler) against a real moto_server (which serves
// EventBridge Scheduler), plus the error translation moto cannot produce, with aws-sdk-client-mock.
import {
  CreateScheduleCommand,
  CreateScheduleGroupCommand,
  GetScheduleCommand,
  SchedulerClient,
  UpdateScheduleCommand,
} from '@aws-sdk/client-scheduler';
import { mockClient } from 'aws-sdk-client-mock';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { SchedulerPlanSchedules } from '../../shared/aws/scheduler/plan-schedules.ts';
import { planScheduleName } from '../../shared/engine/recovery/names.ts';
import { type Moto, startMoto } from '../support/moto.ts';

const GROUP = 'ferry-stack-plans';
const TARGET = {
  Arn: 'arn:aws:states:us-east-1:123456789012:stateMachine:ferry-stack-cycle',
  RoleArn: 'arn:aws:iam::123456789012:role/ferry-scheduler',
  Input: JSON.stringify({
    plan: 'erp',
    set: 'erp',
    disks: [{ disk: 'root', volumeId: 'vol-0000000000000000a' }],
  }),
  RetryPolicy: { MaximumRetryAttempts: 3, MaximumEventAgeInSeconds: 300 },
};

describe('pause a plan schedule on moto_server', () => {
  let moto: Moto;
  let client: SchedulerClient;

  beforeAll(async () => {
    moto = await startMoto();
    client = new SchedulerClient(moto.clientConfig);
  });
  afterAll(async () => {
    client?.destroy();
    await moto?.stop();
  });
  beforeEach(async () => {
    await moto.reset();
    await client.send(new CreateScheduleGroupCommand({ Name: GROUP }));
    await client.send(
      new CreateScheduleCommand({
        Name: planScheduleName('erp'),
        GroupName: GROUP,
        Description: 'Ferry protection plan erp: RPO 15 minutes',
        ScheduleExpression: 'cron(0/15 * * * ? *)',
        ScheduleExpressionTimezone: 'Europe/Berlin',
        FlexibleTimeWindow: { Mode: 'OFF' },
        State: 'ENABLED',
        Target: TARGET,
      }),
    );
  });

  it('disables the schedule and keeps every other setting; a second pause changes nothing', async () => {
    // Prepare
    const schedules = new SchedulerPlanSchedules(client, GROUP);
    // Act
    const first = await schedules.pause('erp');
    const second = await schedules.pause('erp');
    // Assess
    expect(first).toEqual({ schedule: 'erp', group: GROUP, found: true, wasEnabled: true });
    expect(second).toEqual({ schedule: 'erp', group: GROUP, found: true, wasEnabled: false });
    const after = await client.send(new GetScheduleCommand({ Name: 'erp', GroupName: GROUP }));
    expect(after).toMatchObject({
      State: 'DISABLED',
      Description: 'Ferry protection plan erp: RPO 15 minutes',
      ScheduleExpression: 'cron(0/15 * * * ? *)',
      ScheduleExpressionTimezone: 'Europe/Berlin',
      FlexibleTimeWindow: { Mode: 'OFF' },
      Target: TARGET,
    });
  });

  it('a plan without a schedule (or group) answers found: false', async () => {
    expect(await new SchedulerPlanSchedules(client, GROUP).pause('other')).toEqual({
      schedule: 'other',
      group: GROUP,
      found: false,
      wasEnabled: false,
    });
    expect((await new SchedulerPlanSchedules(client, 'no-such-group').pause('erp')).found).toBe(false);
  });

  it('refuses a plan name no schedule can have', async () => {
    await expect(new SchedulerPlanSchedules(client, GROUP).pause('erp/eu:1')).rejects.toThrow(
      'plan erp/eu:1 has no schedule name',
    );
  });
});

describe('scheduler errors', () => {
  it('a concurrent update is retryable, a permission is not; both name the schedule', async () => {
    // Mocked here, not at collection time: the moto tests above use the real client.
    const scheduler = mockClient(SchedulerClient);
    const fail = (name: string, status: number) =>
      Object.assign(new Error(`${name} says no`), { name, $metadata: { httpStatusCode: status } });
    scheduler
      .on(GetScheduleCommand)
      .resolves({ Name: 'erp', State: 'ENABLED', ScheduleExpression: 'rate(1 hour)' });
    scheduler.on(UpdateScheduleCommand).rejects(fail('ConflictException', 409));
    const schedules = new SchedulerPlanSchedules(new SchedulerClient({ maxAttempts: 1 }), GROUP);
    await expect(schedules.pause('erp')).rejects.toMatchObject({
      name: 'CloudRetryableError',
      message: `EventBridge Scheduler UpdateSchedule (schedule erp in group ${GROUP}) failed: ConflictException: ConflictException says no`,
    });
    scheduler.on(GetScheduleCommand).rejects(fail('AccessDeniedException', 403));
    await expect(schedules.pause('erp')).rejects.toMatchObject({ name: 'CloudRequestError' });
    scheduler.restore();
  });
});
