// `ferry recover --cloud` run as an operator runs it (a child process), against a local run of the
// Recovery state machine's definition: a Step Functions API endpoint on 127.0.0.1
// (local-cloud/recovery.ts serveLocalStepFunctions) over aws-local-stepfunctions, the recovery
// Lambda a fake in the contract's shapes. What is real: the CLI, the SDK's wire protocol, the
// definition's run; what is not: the Lambda (test/local-cloud/recovery-*.test.ts run the real one).
import { App, Stack } from 'aws-cdk-lib';
import { Template } from 'aws-cdk-lib/assertions';
import * as lambda from 'aws-cdk-lib/aws-lambda';
import * as logs from 'aws-cdk-lib/aws-logs';
import * as sfn from 'aws-cdk-lib/aws-stepfunctions';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { RecoveryStateMachine } from '../../infra/recovery-state-machine.ts';
import type { TemplateJson } from '../../local-cloud/asl.ts';
import {
  LocalRecovery,
  type LocalStepFunctions,
  recoveryDefinitionFromTemplate,
  serveLocalStepFunctions,
} from '../../local-cloud/recovery.ts';
import { ferry } from '../support/ferry-cli.ts';

type Json = Record<string, unknown>;

/** The recovery Lambda in the contract's shapes: one machine, healthy at once, torn down at once. */
async function fakeRecovery(event: Json): Promise<unknown> {
  switch (event.action) {
    case 'resolve':
      if (event.checkpoint === 99) {
        const e = new Error('recovery of plan web refused: checkpoint 99 is not in the catalog of set web');
        e.name = 'RecoveryRefusedError';
        throw e;
      }
      return {
        jobId: event.jobId,
        mode: event.mode,
        plan: event.plan,
        set: 'web',
        checkpoint: { id: 'web/c3', sequence: 3, publishedAt: '2026-12-05T10:00:00Z' },
        machines: [{ name: 'web-1' }],
        unusedDisks: [],
        ttlSeconds: 300,
        startedAt: new Date().toISOString(),
      };
    case 'launch':
      return {
        name: 'web-1',
        kind: 'instance',
        instanceId: 'i-0123456789abcdef0',
        volumeIds: [],
        launchedAt: 'now',
      };
    case 'health':
      return { done: true, healthy: true, machines: [], secondsToRunning: 42 };
    case 'teardown':
      return {
        terminated: ['i-0123456789abcdef0'],
        deregistered: [],
        deletedVolumes: [],
        deletedSnapshots: [],
        waiting: [],
      };
    case 'verify-teardown':
      return { clean: true, remaining: { instances: 0, volumes: 0, images: 0, snapshots: 0 } };
    case 'record': {
      const r = event.report as Json;
      return {
        jobId: event.jobId,
        mode: r.mode,
        plan: r.plan,
        checkpoint: r.checkpoint,
        startedAt: r.startedAt,
        finishedAt: new Date().toISOString(),
        outcome: 'succeeded',
        secondsToRunning: 42,
        machines: [
          {
            name: 'web-1',
            instanceId: 'i-0123456789abcdef0',
            volumeIds: [],
            healthy: true,
            state: 'running',
          },
        ],
        cleanup: { terminated: 1, deregistered: 0, deletedVolumes: 0, deletedSnapshots: 0, clean: true },
      };
    }
  }
  throw new Error(`unexpected action ${String(event.action)}`);
}

let api: LocalStepFunctions;

beforeAll(async () => {
  const stack = new Stack(new App(), 'Local', { env: { account: '123456789012', region: 'us-east-1' } });
  new RecoveryStateMachine(stack, 'Recovery', {
    stateMachineName: 'Local-recovery',
    recovery: lambda.Function.fromFunctionArn(
      stack,
      'Fn',
      'arn:aws:lambda:us-east-1:123456789012:function:Recovery',
    ),
    cycle: sfn.StateMachine.fromStateMachineArn(
      stack,
      'Cycle',
      'arn:aws:states:us-east-1:123456789012:stateMachine:Local-cycle',
    ),
    plans: [],
    logGroup: new logs.LogGroup(stack, 'Logs'),
  });
  const { definition, stateMachineName } = recoveryDefinitionFromTemplate(
    Template.fromStack(stack).toJSON() as TemplateJson,
  );
  api = await serveLocalStepFunctions(
    new LocalRecovery({ definition, stateMachineName, bindings: { recovery: fakeRecovery } }),
    stateMachineName,
  );
});

afterAll(async () => {
  await api?.stop();
});

const env = () => ({
  ...process.env,
  AWS_ENDPOINT_URL_SFN: api.endpoint,
  AWS_REGION: 'us-east-1',
  AWS_ACCESS_KEY_ID: 'local',
  AWS_SECRET_ACCESS_KEY: 'local',
  AWS_PROFILE: '',
});

describe('ferry recover --cloud against a local run of the Recovery definition', () => {
  it('starts a drill, follows it step by step and prints its report; exit 0', async () => {
    const r = await ferry(
      [
        'recover',
        '--cloud',
        '--stack',
        'Local',
        '--plan',
        'web',
        '--ttl',
        '5',
        '--job',
        'drill-web-1',
        '--poll',
        '0.05',
      ],
      { env: env() },
    );
    expect(r.stderr).toContain('ferry: drill started: job drill-web-1');
    for (const step of [
      'Resolve',
      'Launch machines',
      'Check health',
      'Drill: wait for TTL',
      'Teardown',
      'Verify teardown',
      'Record report',
      'recovery finished',
    ]) {
      expect(r.stderr).toContain(`  ${step}`);
    }
    expect(r.stdout).toContain('drill of plan web from checkpoint web/c3 (job drill-web-1)');
    expect(r.stdout).toContain('time to running (RTO achieved): 42 s');
    expect(r.stdout).toContain('outcome: succeeded');
    expect(r.code).toBe(0);
    expect(api.executions.get('drill-web-1')?.input).toEqual({
      mode: 'drill',
      plan: 'web',
      jobId: 'drill-web-1',
      ttlMinutes: 5,
    });
  });

  it('a checkpoint the catalog does not have: the refusal on one line, exit 2', async () => {
    const r = await ferry(
      [
        'recover',
        '--cloud',
        '--stack',
        'Local',
        '--plan',
        'web',
        '--checkpoint',
        '99',
        '--job',
        'drill-web-2',
        '--poll',
        '0.05',
      ],
      { env: env() },
    );
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(
      /ferry: recovery job drill-web-2 failed: RecoveryRefusedError: recovery of plan web refused: checkpoint 99 is not in the catalog of set web\n$/,
    );
    expect(r.stderr).not.toContain('Launch machines');
  });
});
