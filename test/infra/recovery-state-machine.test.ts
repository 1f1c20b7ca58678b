// The Recovery state machine's synthesized definition, run in aws-local-stepfunctions with a fake
// recovery Lambda: the order of actions per mode, what each action is given, the report's parts, the
// bounded loops, and every failure path (refused, launch failed, unhealthy, teardown never clean,
// final cycle not published). The real handler on moto_server: test/local-cloud/recovery-*.test.ts.
import { App, Stack } from 'aws-cdk-lib';
import { Template } from 'aws-cdk-lib/assertions';
import * as lambda from 'aws-cdk-lib/aws-lambda';
import * as logs from 'aws-cdk-lib/aws-logs';
import * as sfn from 'aws-cdk-lib/aws-stepfunctions';
import { beforeAll, describe, expect, it } from 'vitest';
import { HISTORY_LIMIT } from '../../infra/history-budget.ts';
import {
  MAX_HEALTH_POLLS,
  RECOVERY_ERRORS,
  RecoveryStateMachine,
  recoveryHistoryWorst,
  TEARDOWN_ATTEMPTS,
  TEARDOWN_FAILED_METRIC,
} from '../../infra/recovery-state-machine.ts';
import type { TemplateJson } from '../../local-cloud/asl.ts';
import { LocalRecovery, recoveryDefinitionFromTemplate } from '../../local-cloud/recovery.ts';

type Json = Record<string, unknown>;

const CYCLE_INPUT = {
  plan: 'web',
  set: 'web-set',
  disks: [{ disk: 'root', volumeId: 'vol-0123456789abcdef0' }],
  params: { window: '32 MiB' },
};

let definition: ReturnType<typeof recoveryDefinitionFromTemplate>;

beforeAll(() => {
  const app = new App();
  const stack = new Stack(app, 'T', { env: { account: '123456789012', region: 'us-east-1' } });
  new RecoveryStateMachine(stack, 'Recovery', {
    stateMachineName: 'T-recovery',
    recovery: lambda.Function.fromFunctionArn(
      stack,
      'Fn',
      'arn:aws:lambda:us-east-1:123456789012:function:RecoveryFunction',
    ),
    cycle: sfn.StateMachine.fromStateMachineArn(
      stack,
      'Cycle',
      'arn:aws:states:us-east-1:123456789012:stateMachine:T-cycle',
    ),
    plans: [
      { plan: 'db', cycleInput: { ...CYCLE_INPUT, plan: 'db', set: 'db' } },
      { plan: 'web', cycleInput: CYCLE_INPUT },
    ],
    logGroup: new logs.LogGroup(stack, 'Logs'),
  });
  definition = recoveryDefinitionFromTemplate(Template.fromStack(stack).toJSON() as TemplateJson);
});

interface FakeOptions {
  /** Health answers `done` from this check on (1-based); never when 0. */
  readonly healthyAfter?: number;
  readonly healthy?: boolean;
  /** verify-teardown answers clean from this round on (1-based); never when 0. */
  readonly cleanAfter?: number;
  /** Actions that throw, with the error name. */
  readonly fail?: Partial<Record<string, string>>;
  readonly ttlSeconds?: number;
  /** prepare-failback: whether the reverse set has no checkpoint yet (its cycle starts from the base). */
  readonly fromBase?: boolean;
}

const FAILBACK_DISK = {
  disk: 'root',
  machine: 'web-1',
  volumeId: 'vol-0aaaaaaaaaaaaaaaa',
  previousSourceSnapshotId: 'snap-0bbbbbbbbbbbbbbbb',
  parentTargetSnapshotId: 'snap-0cccccccccccccccc',
};

/** A fake recovery Lambda: answers in the contract's shapes and records every event. */
function fakeRecovery(opts: FakeOptions = {}) {
  const events: Json[] = [];
  const count = (action: string) => events.filter((e) => e.action === action).length;
  const handler = async (event: Json): Promise<unknown> => {
    events.push(event);
    const failing = opts.fail?.[String(event.action)];
    if (failing !== undefined) {
      const e = new Error(`${String(event.action)} failed (test)`);
      e.name = failing;
      throw e;
    }
    switch (event.action) {
      case 'resolve':
        return {
          jobId: event.jobId,
          mode: event.mode,
          plan: event.plan,
          set: 'web-set',
          checkpoint: {
            id: (event.finalCycle as Json | undefined)?.checkpointId ?? 'web-set/c1',
            sequence: 1,
            publishedAt: '2026-12-05T10:00:00Z',
          },
          machines: [
            { name: 'web-1', kind: 'instance' },
            { name: 'web-2', kind: 'instance' },
          ],
          unusedDisks: [],
          ttlSeconds: opts.ttlSeconds ?? 3600,
          startedAt: '2026-12-05T10:01:00Z',
        };
      case 'prepare-failback': {
        const fromBase = opts.fromBase ?? true;
        const reverseSet = 'web-set-failback-fo-1';
        return {
          part: {
            failoverJobId: 'fo-1',
            sharedCheckpointId: 'web-set/c1',
            reverseSet,
            fromBase,
            disks: [FAILBACK_DISK],
            cutover: event.cutover === true,
          },
          cycleInput: {
            plan: reverseSet,
            set: reverseSet,
            disks: [{ disk: 'root', volumeId: FAILBACK_DISK.volumeId }],
            ...(fromBase
              ? {
                  base: {
                    checkpointId: 'web-set/c1',
                    disks: [
                      {
                        disk: 'root',
                        previousSourceSnapshotId: FAILBACK_DISK.previousSourceSnapshotId,
                        parentTargetSnapshotId: FAILBACK_DISK.parentTargetSnapshotId,
                      },
                    ],
                  },
                }
              : {}),
          },
          ...(event.cutover === true
            ? {
                cutoverResolve: {
                  action: 'resolve',
                  jobId: event.jobId,
                  mode: 'failback',
                  plan: event.plan,
                  set: reverseSet,
                },
              }
            : {}),
        };
      }
      case 'launch':
        return {
          name: (event.machine as Json).name,
          kind: 'instance',
          instanceId: 'i-0123456789abcdef0',
          volumeIds: [],
          launchedAt: '2026-12-05T10:01:05Z',
        };
      case 'health': {
        const done = opts.healthyAfter !== 0 && count('health') >= (opts.healthyAfter ?? 1);
        return { done, healthy: done && (opts.healthy ?? true), machines: [] };
      }
      case 'pause':
        return { schedule: event.plan, group: 'T-plans', found: true, wasEnabled: true };
      case 'teardown':
        return {
          terminated: ['i-0123456789abcdef0'],
          deregistered: [],
          deletedVolumes: [],
          deletedSnapshots: [],
          waiting: [],
        };
      case 'verify-teardown': {
        const clean = opts.cleanAfter !== 0 && count('verify-teardown') >= (opts.cleanAfter ?? 1);
        return { clean, remaining: { instances: clean ? 0 : 1, volumes: 0, images: 0, snapshots: 0 } };
      }
      case 'record': {
        // As the real record decides it (functions/recovery): failure, then teardown, then health.
        const r = event.report as Json;
        const outcome = r.error
          ? 'failed'
          : r.verify && !(r.verify as Json).clean
            ? 'cleanup-failed'
            : r.health && !(r.health as Json).healthy
              ? 'unhealthy'
              : r.mode === 'cleanup'
                ? 'cleaned-up'
                : 'succeeded';
        return {
          jobId: event.jobId,
          mode: r.mode,
          plan: r.plan,
          outcome,
          machines: [],
          startedAt: r.startedAt,
          finishedAt: 'now',
          ...(r.error ? { error: 'a step failed' } : {}),
        };
      }
    }
    throw new Error(`unknown action ${String(event.action)}`);
  };
  return { handler, events, actions: () => events.map((e) => String(e.action)) };
}

function run(input: Json, fake = fakeRecovery(), runCycle?: (input: Json) => Promise<unknown>) {
  const local = new LocalRecovery({
    ...definition,
    bindings: { recovery: fake.handler, ...(runCycle === undefined ? {} : { runCycle }) },
  });
  return local.run(input, 'job-1');
}

const recorded = (fake: ReturnType<typeof fakeRecovery>) =>
  fake.events.find((e) => e.action === 'record')?.report as Json | undefined;

describe('Recovery state machine', () => {
  it('drill: resolve, launch each machine, health until done, wait the TTL, teardown until verified, record', async () => {
    // Prepare
    const fake = fakeRecovery({ healthyAfter: 3, cleanAfter: 2, ttlSeconds: 7 });
    // Act
    const r = await run({ mode: 'drill', plan: 'web', checkpoint: 3, ttlMinutes: 5 }, fake);
    // Assess
    expect(r.status).toBe('SUCCEEDED');
    expect(fake.actions()).toEqual([
      'resolve',
      'launch',
      'launch',
      'health',
      'health',
      'health',
      'teardown',
      'verify-teardown',
      'teardown',
      'verify-teardown',
      'record',
    ]);
    // The operator's input is resolve's event, with the action and the job (the execution name).
    expect(fake.events[0]).toEqual({
      action: 'resolve',
      jobId: 'job-1',
      mode: 'drill',
      plan: 'web',
      checkpoint: 3,
      ttlMinutes: 5,
    });
    expect(fake.events[1]).toMatchObject({
      action: 'launch',
      jobId: 'job-1',
      mode: 'drill',
      plan: 'web',
      machine: { name: 'web-1' },
    });
    // Each health check after the first carries the previous answer.
    const checks = fake.events.filter((e) => e.action === 'health');
    expect(checks[0]).toMatchObject({
      previous: { done: false, machines: [] },
      startedAt: '2026-12-05T10:01:00Z',
    });
    expect(checks[0]!.launched).toHaveLength(2);
    expect(checks[2]!.previous).toEqual({ done: false, healthy: false, machines: [] });
    expect(r.steps.filter((s) => s.type === 'StateEntered').map((s) => s.state)).toContain(
      'Drill: wait for TTL',
    );
    expect(r.output).toMatchObject({ outcome: 'succeeded', jobId: 'job-1' });
    // The report's parts, merged: what record turns into the report.
    expect(Object.keys(recorded(fake)!).sort()).toEqual(
      [
        'checkpoint',
        'health',
        'launched',
        'machines',
        'mode',
        'plan',
        'set',
        'startedAt',
        'teardown',
        'verify',
      ].sort(),
    );
  });

  it('a given jobId names the job; failover pauses the plan and tears nothing down', async () => {
    const fake = fakeRecovery();
    const r = await run({ mode: 'failover', plan: 'web', jobId: 'dr-2026-12-05' }, fake);
    expect(r.status).toBe('SUCCEEDED');
    expect(fake.actions()).toEqual(['resolve', 'launch', 'launch', 'health', 'pause', 'record']);
    expect(fake.events.every((e) => e.jobId === 'dr-2026-12-05')).toBe(true);
    expect(fake.events.find((e) => e.action === 'pause')).toEqual({
      action: 'pause',
      jobId: 'dr-2026-12-05',
      plan: 'web',
    });
    expect(recorded(fake)).toMatchObject({ mode: 'failover', pause: { wasEnabled: true } });
    expect(recorded(fake)!.teardown).toBeUndefined();
  });

  it("migration: validates first, runs the plan's cycle as its schedule would, recovers exactly its checkpoint", async () => {
    const fake = fakeRecovery();
    const cycles: Json[] = [];
    const r = await run({ mode: 'migration', plan: 'web', sourceQuiesced: true }, fake, async (input) => {
      cycles.push(input);
      return { status: 'published', checkpointId: 'web-set/final', disks: [] };
    });
    expect(r.status).toBe('SUCCEEDED');
    expect(fake.actions()).toEqual(['resolve', 'resolve', 'launch', 'launch', 'health', 'pause', 'record']);
    // Validated as a failover of the latest checkpoint would be, before the cycle runs.
    expect(fake.events[0]).toEqual({ action: 'resolve', jobId: 'job-1', mode: 'failover', plan: 'web' });
    expect(fake.events[1]).toEqual({
      action: 'resolve',
      jobId: 'job-1',
      mode: 'migration',
      plan: 'web',
      finalCycle: { checkpointId: 'web-set/final' },
    });
    expect(cycles).toHaveLength(1);
    expect(cycles[0]).toMatchObject(CYCLE_INPUT);
    expect(recorded(fake)).toMatchObject({ sourceQuiesced: true, checkpoint: { id: 'web-set/final' } });
  });

  it('migration: a final cycle that publishes nothing launches nothing and is reported', async () => {
    const fake = fakeRecovery();
    const r = await run({ mode: 'migration', plan: 'web' }, fake, async () => ({ plan: 'web' }));
    expect(r.status).toBe('FAILED');
    expect(r.error).toBe(RECOVERY_ERRORS.failed);
    expect(fake.actions()).toEqual(['resolve', 'record']);
    expect(recorded(fake)).toMatchObject({
      sourceQuiesced: false,
      error: { Error: RECOVERY_ERRORS.finalCycle },
    });
  });

  it('migration: a checkpoint, a TTL, a bad sourceQuiesced or an unknown plan are refused before anything runs', async () => {
    for (const input of [
      { mode: 'migration', plan: 'web', checkpoint: 2 },
      { mode: 'migration', plan: 'web', ttlMinutes: 10 },
      { mode: 'migration', plan: 'web', sourceQuiesced: 'yes' },
    ]) {
      const fake = fakeRecovery();
      const r = await run(input, fake, async () => ({}));
      expect(r.error, JSON.stringify(input)).toBe(RECOVERY_ERRORS.refused);
      expect(fake.actions()).toEqual([]);
    }
    const fake = fakeRecovery();
    const r = await run({ mode: 'migration', plan: 'nope' }, fake, async () => ({}));
    expect(r.error).toBe(RECOVERY_ERRORS.refused);
    expect(r.cause).toContain('plan nope is not a protection plan');
    expect(r.cycles).toEqual([]);
  });

  it('failback: prepare, the reverse cycle from the shared checkpoint, record; nothing is launched', async () => {
    const fake = fakeRecovery();
    const r = await run({ mode: 'failback', plan: 'web' }, fake, async () => ({
      status: 'published',
      checkpointId: 'web-set-failback-fo-1/c1',
      disks: [],
    }));
    expect(r.status).toBe('SUCCEEDED');
    expect(fake.actions()).toEqual(['prepare-failback', 'record']);
    // The operator's input is prepare-failback's event, with the action and the job.
    expect(fake.events[0]).toEqual({
      action: 'prepare-failback',
      jobId: 'job-1',
      mode: 'failback',
      plan: 'web',
    });
    // The cycle is started with exactly what prepare-failback built, base included, linked to this job.
    expect(r.cycles).toEqual([
      {
        AWS_STEP_FUNCTIONS_STARTED_BY_EXECUTION_ID: expect.stringContaining(':execution:T-recovery:job-1'),
        plan: 'web-set-failback-fo-1',
        set: 'web-set-failback-fo-1',
        disks: [{ disk: 'root', volumeId: FAILBACK_DISK.volumeId }],
        base: {
          checkpointId: 'web-set/c1',
          disks: [
            {
              disk: 'root',
              previousSourceSnapshotId: FAILBACK_DISK.previousSourceSnapshotId,
              parentTargetSnapshotId: FAILBACK_DISK.parentTargetSnapshotId,
            },
          ],
        },
      },
    ]);
    expect(recorded(fake)).toMatchObject({
      mode: 'failback',
      failback: { reverseCheckpointId: 'web-set-failback-fo-1/c1', fromBase: true, cutover: false },
    });
    expect(r.steps.map((s) => s.state)).not.toContain('Pause schedule');
  });

  it('failback: a reverse set with a checkpoint cycles without a base', async () => {
    const fake = fakeRecovery({ fromBase: false });
    const r = await run({ mode: 'failback', plan: 'web' }, fake, async () => ({
      status: 'published',
      checkpointId: 'web-set-failback-fo-1/c2',
      disks: [],
    }));
    expect(r.status).toBe('SUCCEEDED');
    expect(r.cycles).toHaveLength(1);
    expect(r.cycles[0]).not.toHaveProperty('base');
    expect(r.cycles[0]).toMatchObject({ set: 'web-set-failback-fo-1' });
  });

  it("failback cutover: after the reverse cycle, resolve its checkpoint on the plan's machines, launch, health, record", async () => {
    const fake = fakeRecovery();
    const r = await run(
      { mode: 'failback', plan: 'web', cutover: true, sourceQuiesced: true },
      fake,
      async () => ({ status: 'published', checkpointId: 'web-set-failback-fo-1/c2', disks: [] }),
    );
    expect(r.status).toBe('SUCCEEDED');
    expect(fake.actions()).toEqual(['prepare-failback', 'resolve', 'launch', 'launch', 'health', 'record']);
    expect(fake.events[0]).toMatchObject({ cutover: true, sourceQuiesced: true });
    expect(fake.events[1]).toEqual({
      action: 'resolve',
      jobId: 'job-1',
      mode: 'failback',
      plan: 'web',
      set: 'web-set-failback-fo-1',
      finalCycle: { checkpointId: 'web-set-failback-fo-1/c2' },
    });
    expect(recorded(fake)).toMatchObject({
      failback: { reverseCheckpointId: 'web-set-failback-fo-1/c2', cutover: true },
      checkpoint: { id: 'web-set-failback-fo-1/c2' },
    });
    // The plan's schedule stays as the failover left it: paused.
    expect(fake.actions()).not.toContain('pause');
  });

  it('failback: a reverse cycle that publishes nothing relaunches nothing and is reported; a refusal ends at once', async () => {
    const fake = fakeRecovery();
    const r = await run({ mode: 'failback', plan: 'web', cutover: true }, fake, async () => ({ plan: 'x' }));
    expect(r.status).toBe('FAILED');
    expect(r.error).toBe(RECOVERY_ERRORS.failed);
    expect(fake.actions()).toEqual(['prepare-failback', 'record']);
    expect(recorded(fake)).toMatchObject({
      error: { Error: RECOVERY_ERRORS.reverseCycle },
      failback: { cutover: true },
    });
    expect(recorded(fake)?.failback).not.toHaveProperty('reverseCheckpointId');

    const refusing = fakeRecovery({ fail: { 'prepare-failback': 'RecoveryRefusedError' } });
    const refused = await run({ mode: 'failback', plan: 'web' }, refusing, async () => ({}));
    expect(refused.error).toBe('RecoveryRefusedError');
    expect(refusing.actions()).toEqual(['prepare-failback']);
    expect(refused.cycles).toEqual([]);
  });

  it('cleanup: teardown and verify by the job id, then record; without a job id it is refused', async () => {
    const fake = fakeRecovery();
    const r = await run({ mode: 'cleanup', plan: 'web', jobId: 'drill-web-1' }, fake);
    expect(r.status).toBe('SUCCEEDED');
    expect(fake.actions()).toEqual(['teardown', 'verify-teardown', 'record']);
    // The first round is given the empty report part: there is nothing before it to count.
    expect(fake.events[0]).toEqual({ action: 'teardown', jobId: 'drill-web-1', previous: {} });
    expect(r.output).toMatchObject({ outcome: 'cleaned-up' });

    const none = fakeRecovery();
    const refused = await run({ mode: 'cleanup', plan: 'web' }, none);
    expect(refused.error).toBe(RECOVERY_ERRORS.refused);
    expect(none.actions()).toEqual([]);
  });

  it('an input resolve refuses ends the job at once: no retry, nothing launched, nothing recorded', async () => {
    const fake = fakeRecovery({ fail: { resolve: 'RecoveryRefusedError' } });
    const r = await run({ mode: 'drill', plan: 'web' }, fake);
    expect(r.status).toBe('FAILED');
    expect(r.error).toBe('RecoveryRefusedError');
    expect(fake.actions()).toEqual(['resolve']);
    const missing = await run({ plan: 'web' }, fakeRecovery());
    expect(missing.error).toBe(RECOVERY_ERRORS.refused);
  });

  it('a drill whose launch fails is torn down at once and reported failed', async () => {
    const fake = fakeRecovery({ fail: { launch: 'Ec2LaunchError' } });
    const r = await run({ mode: 'drill', plan: 'web' }, fake);
    expect(r.status).toBe('FAILED');
    expect(r.error).toBe(RECOVERY_ERRORS.failed);
    // Each launch tried three times (two handler retries), then teardown without waiting the TTL.
    expect(fake.actions().filter((a) => a === 'launch').length).toBeGreaterThanOrEqual(3);
    expect(fake.actions().slice(-3)).toEqual(['teardown', 'verify-teardown', 'record']);
    expect(r.steps.map((s) => s.state)).not.toContain('Drill: wait for TTL');
    expect(recorded(fake)).toMatchObject({ error: { Error: 'Ec2LaunchError' }, verify: { clean: true } });
  });

  it('machines that never pass their checks: the health action ends the loop, the drill is still torn down', async () => {
    const fake = fakeRecovery({ healthyAfter: 2, healthy: false });
    const r = await run({ mode: 'drill', plan: 'web' }, fake);
    expect(r.error).toBe(RECOVERY_ERRORS.unhealthy);
    expect(fake.actions()).toEqual([
      'resolve',
      'launch',
      'launch',
      'health',
      'health',
      'teardown',
      'verify-teardown',
      'record',
    ]);
  });

  it('the health loop is bounded even if the action never says done', async () => {
    const fake = fakeRecovery({ healthyAfter: 0 });
    const r = await run({ mode: 'failover', plan: 'web' }, fake);
    expect(fake.actions().filter((a) => a === 'health')).toHaveLength(MAX_HEALTH_POLLS);
    expect(r.error).toBe(RECOVERY_ERRORS.unhealthy);
  });

  it('a teardown never verified clean: a few rounds, then the alarm metric, the report, and TeardownFailed', async () => {
    const fake = fakeRecovery({ cleanAfter: 0 });
    const r = await run({ mode: 'drill', plan: 'web' }, fake);
    expect(r.status).toBe('FAILED');
    expect(r.error).toBe(RECOVERY_ERRORS.teardownFailed);
    expect(fake.actions().filter((a) => a === 'verify-teardown')).toHaveLength(TEARDOWN_ATTEMPTS);
    expect(r.metrics).toEqual([
      {
        namespace: TEARDOWN_FAILED_METRIC.namespace,
        name: TEARDOWN_FAILED_METRIC.metricName,
        value: 1,
        dimensions: { [TEARDOWN_FAILED_METRIC.dimension]: 'T-recovery' },
      },
    ]);
    expect(fake.actions().at(-1)).toBe('record');
  });

  it('a teardown interrupted (the action fails) is retried by the next round and verified', async () => {
    let calls = 0;
    const fake = fakeRecovery();
    const flaky = async (event: Json) => {
      if (event.action === 'teardown' && ++calls <= 3) {
        const e = new Error('instance still shutting down');
        e.name = 'TeardownIncomplete';
        throw e;
      }
      return fake.handler(event);
    };
    const local = new LocalRecovery({ ...definition, bindings: { recovery: flaky } });
    const r = await local.run({ mode: 'cleanup', plan: 'web', jobId: 'drill-1' }, 'cleanup-1');
    expect(r.status).toBe('SUCCEEDED');
    // Three failed attempts are one round (two retries), the next round tears down and verifies.
    expect(
      r.steps.filter((s) => s.state === 'Wait before teardown again' && s.type === 'StateEntered'),
    ).toHaveLength(1);
    expect(fake.actions()).toEqual(['teardown', 'verify-teardown', 'record']);
    expect(r.metrics).toEqual([]);
  });

  it('stays far below the event-history limit in the worst case', () => {
    expect(recoveryHistoryWorst()).toBeLessThan(HISTORY_LIMIT / 2);
  });
});
