// Synth tests of the recovery additions to FerryStack: the Recovery state machine beside the cycle
// machine, the recovery Lambda's environment (parsed by the handler's own schema) and its
// least-privilege role, the schedules it pauses, the teardown alarm, cdk-nag clean, and the
// configuration's recovery defaults refused at synth when they cannot work.
import { readFileSync } from 'node:fs';
import { App, Aspects } from 'aws-cdk-lib';
import { Annotations, Match, Template } from 'aws-cdk-lib/assertions';
import { StateMachine } from 'aws-local-stepfunctions';
import { AwsSolutionsChecks } from 'cdk-nag';
import { beforeAll, describe, expect, it } from 'vitest';
import { parseRecoveryEnvironment, RECOVERY_TAGS } from '../../functions/recovery/contracts.ts';
import { type FerryConfigInput, parseFerryConfig, recoveryDefaults } from '../../infra/config.ts';
import { TEARDOWN_FAILED_METRIC } from '../../infra/recovery-state-machine.ts';
import { FerryStack, planCycleInput } from '../../infra/stack.ts';
import { ensurePromiseWithResolvers, type TemplateJson } from '../../local-cloud/asl.ts';
import { recoveryDefinitionFromTemplate, recoveryEnvironment } from '../../local-cloud/recovery.ts';
import { readDeployment } from '../../local-cloud/synth.ts';

const CONFIG: FerryConfigInput = {
  plans: [
    {
      name: 'web-tier',
      schedule: 'rate(15 minutes)',
      rpoMinutes: 30,
      disks: [
        { disk: 'root', volumeId: 'vol-0123456789abcdef0' },
        { disk: 'data', volumeId: 'vol-0fedcba9876543210' },
      ],
      recovery: {
        machines: [
          {
            name: 'web-1',
            bootDisk: 'root',
            dataDisks: ['data'],
            instanceType: 'm6i.large',
            subnetId: 'subnet-0123456789abcdef0',
          },
        ],
        drillSubnetId: 'subnet-0fedcba9876543210',
        ttlMinutes: 30,
      },
    },
    {
      name: 'db',
      set: 'db-primary',
      schedule: 'rate(1 hour)',
      rpoMinutes: 120,
      enabled: false,
      disks: [{ disk: 'pg', volumeId: 'vol-0aaaaaaaaaaaaaaaa' }],
    },
  ],
};

const { config: _defaultConfig, ...FLAGS } = JSON.parse(readFileSync('cdk.json', 'utf8')).context as Record<
  string,
  unknown
>;

type Resource = { Type: string; Properties: Record<string, unknown> };
type Statement = {
  Sid?: string;
  Action: string | string[];
  Resource: unknown;
  Condition?: Record<string, Record<string, unknown>>;
};
const list = <T>(x: T | T[]): T[] => (Array.isArray(x) ? x : [x]);

let stack: FerryStack;
let template: Template;
let resources: Record<string, Resource>;

beforeAll(() => {
  const app = new App({ context: { ...FLAGS, 'aws:cdk:bundling-stacks': [] } });
  stack = new FerryStack(app, 'FerryTest', { config: parseFerryConfig(CONFIG) });
  Aspects.of(stack).add(new AwsSolutionsChecks());
  template = Template.fromStack(stack);
  resources = template.toJSON().Resources as Record<string, Resource>;
});

/** The statements of every policy attached to the role `roleId`. */
function statementsOf(roleId: string): Statement[] {
  return Object.values(resources)
    .filter(
      (r) =>
        r.Type === 'AWS::IAM::Policy' &&
        list(r.Properties.Roles as unknown[]).some((x) => (x as { Ref?: string }).Ref === roleId),
    )
    .flatMap((p) => (p.Properties.PolicyDocument as { Statement: Statement[] }).Statement);
}

function recoveryRoleId(): string {
  const fn = Object.values(resources).find(
    (r) =>
      r.Type === 'AWS::Lambda::Function' &&
      (r.Properties.Environment as { Variables: Record<string, unknown> }).Variables
        .POWERTOOLS_SERVICE_NAME === 'ferry-recovery',
  )!;
  return (fn.Properties.Role as { 'Fn::GetAtt': string[] })['Fn::GetAtt'][0]!;
}

describe('FerryStack recovery', () => {
  it('deploys a Standard Recovery state machine named <stack>-recovery beside the cycle machine', () => {
    template.resourceCountIs('AWS::StepFunctions::StateMachine', 2);
    template.hasResourceProperties('AWS::StepFunctions::StateMachine', {
      StateMachineName: 'FerryTest-recovery',
      StateMachineType: 'STANDARD',
      TracingConfiguration: { Enabled: true },
      LoggingConfiguration: Match.objectLike({ Level: 'ALL', IncludeExecutionData: true }),
    });
    template.hasOutput('RecoveryStateMachineArn', {});
    // Valid ASL for aws-local-stepfunctions (its constructor validates the definition).
    ensurePromiseWithResolvers();
    const { definition } = recoveryDefinitionFromTemplate(template.toJSON() as TemplateJson);
    expect(() => new StateMachine(definition)).not.toThrow();
    // The cycle's local run still finds its own machine and only the four cycle functions.
    const cycle = readDeployment(template.toJSON() as TemplateJson, 'FerryTest');
    expect(cycle.stateMachineName).toBe('FerryTest-cycle');
    expect(cycle.functions.map((f) => f.name).sort()).toEqual([
      'chunk-writer',
      'differ',
      'finalizer',
      'planner',
    ]);
  });

  it("gives a migration's final cycle exactly the input each plan's schedule starts the cycle with", () => {
    const { definition } = recoveryDefinitionFromTemplate(template.toJSON() as TemplateJson);
    const config = parseFerryConfig(CONFIG);
    const inputs = Object.values(definition.States as Record<string, { Type: string; Result?: unknown }>)
      .filter((s) => s.Type === 'Pass' && s.Result !== undefined && (s.Result as { disks?: unknown }).disks)
      .map((s) => s.Result);
    expect(inputs).toEqual(config.plans.map((p) => planCycleInput(config, p)));
    const schedules = Object.values(resources).filter((r) => r.Type === 'AWS::Scheduler::Schedule');
    for (const s of schedules) {
      const target = s.Properties.Target as { Input: string; RoleArn: unknown };
      const plan = config.plans.find((p) => p.name === s.Properties.Name)!;
      // Schedules are named after their plan: the pause action finds them by that name.
      expect(plan).toBeDefined();
      expect(s.Properties.GroupName).toEqual(expect.anything());
      expect(JSON.parse(target.Input)).toEqual(planCycleInput(config, plan));
      expect(target.RoleArn).toEqual({ 'Fn::GetAtt': [expect.stringMatching(/^ScheduleRole/), 'Arn'] });
    }
  });

  it("sets the recovery function's environment as its handler parses it", () => {
    const json = template.toJSON() as TemplateJson;
    const { functionLogicalId } = recoveryDefinitionFromTemplate(json);
    const fn = resources[functionLogicalId]!;
    const vars = (fn.Properties.Environment as { Variables: Record<string, unknown> }).Variables;
    expect(vars.SCHEDULE_GROUP).toBe('FerryTest-plans');
    expect(vars.TABLE_NAME).toEqual({ Ref: expect.stringMatching(/^State/) });
    expect(vars.RECOVERY_KMS_KEY_ARN).toEqual({
      'Fn::GetAtt': [expect.stringMatching(/^SnapshotKey/), 'Arn'],
    });
    const env = parseRecoveryEnvironment(recoveryEnvironment(json, functionLogicalId, 'FerryTest-state'));
    expect(env.RECOVERY_DEFAULTS).toEqual(recoveryDefaults(parseFerryConfig(CONFIG)));
    expect(env.RECOVERY_DEFAULTS['web-tier']).toMatchObject({ set: 'web-tier', ttlMinutes: 30 });
    expect(env.RECOVERY_DEFAULTS.db).toEqual({ set: 'db-primary', machines: [] });
    expect(fn.Properties).toMatchObject({ Runtime: 'nodejs22.x', Architectures: ['arm64'], Timeout: 300 });
  });

  it('the recovery role: EC2 writes only with the job tag, deletes only of tagged resources, nothing else on "*"', () => {
    const statements = statementsOf(recoveryRoleId());
    const actions = statements.flatMap((s) => list(s.Action));
    expect(actions.filter((a) => a.includes('*') && !a.startsWith('kms:'))).toEqual([]);
    for (const s of statements) {
      const resourcesOf = list(s.Resource);
      const ec2Writes = list(s.Action).filter((a) => a.startsWith('ec2:') && !a.startsWith('ec2:Describe'));
      // Only Describe* and X-Ray may name every resource.
      if (resourcesOf.includes('*')) {
        expect(
          list(s.Action).every((a) => a.startsWith('ec2:Describe') || a.startsWith('xray:')),
          JSON.stringify(s),
        ).toBe(true);
      }
      for (const a of ec2Writes) {
        const cond = JSON.stringify(s.Condition ?? {});
        if (
          [
            'ec2:TerminateInstances',
            'ec2:DeregisterImage',
            'ec2:DeleteVolume',
            'ec2:DeleteSnapshot',
            'ec2:GetConsoleOutput',
          ].includes(a)
        ) {
          expect(s.Condition).toEqual({ StringLike: { [`aws:ResourceTag/${RECOVERY_TAGS.job}`]: '?*' } });
        } else if (a === 'ec2:CreateTags') {
          expect(cond, JSON.stringify(s)).toContain(`aws:RequestTag/${RECOVERY_TAGS.job}`);
        } else if (s.Sid !== 'LaunchIntoSubnets') {
          // RegisterImage / RunInstances / CreateVolume: the job tag requested, or the replica's tag.
          expect(cond, JSON.stringify(s)).toMatch(
            /aws:RequestTag\/ferry:recovery-job|aws:ResourceTag\/ferry:(recovery-job|deployment)/,
          );
        }
      }
    }
    // Into the account's subnets and security groups only, by ARN.
    const subnets = statements.find((s) => s.Sid === 'LaunchIntoSubnets')!;
    expect(list(subnets.Action)).toEqual(['ec2:RunInstances']);
    for (const kind of ['subnet', 'security-group', 'network-interface'])
      expect(JSON.stringify(subnets.Resource)).toContain(`:${kind}/*`);
    // The snapshot key only through EC2; the schedules' own role passed to Scheduler only.
    for (const s of statements.filter(
      (x) => list(x.Action).some((a) => a.startsWith('kms:')) && x.Sid?.startsWith('SnapshotKey'),
    )) {
      expect(JSON.stringify(s.Condition)).toContain('kms:ViaService');
    }
    const pass = statements.find((s) => list(s.Action).includes('iam:PassRole'))!;
    expect(pass.Condition).toEqual({ StringEquals: { 'iam:PassedToService': 'scheduler.amazonaws.com' } });
    expect(pass.Resource).toEqual({ 'Fn::GetAtt': [expect.stringMatching(/^ScheduleRole/), 'Arn'] });
    const pause = statements.find((s) => s.Sid === 'PausePlanSchedules')!;
    expect(list(pause.Action).sort()).toEqual(['scheduler:GetSchedule', 'scheduler:UpdateSchedule']);
    expect(JSON.stringify(pause.Resource)).toContain(':schedule/FerryTest-plans/*');
    const table = statements.find((s) => s.Sid === 'StateTable')!;
    expect(list(table.Action).sort()).toEqual([
      'dynamodb:DeleteItem',
      'dynamodb:GetItem',
      'dynamodb:PutItem',
      'dynamodb:Query',
    ]);
  });

  it("the Recovery machine's role: invoke the recovery function, run the cycle machine, one metric namespace", () => {
    const machine = Object.values(resources).find(
      (r) =>
        r.Type === 'AWS::StepFunctions::StateMachine' &&
        r.Properties.StateMachineName === 'FerryTest-recovery',
    )!;
    const roleId = (machine.Properties.RoleArn as { 'Fn::GetAtt': string[] })['Fn::GetAtt'][0]!;
    const statements = statementsOf(roleId);
    const metric = statements.find((s) => list(s.Action).includes('cloudwatch:PutMetricData'))!;
    expect(metric.Condition).toEqual({
      StringEquals: { 'cloudwatch:namespace': TEARDOWN_FAILED_METRIC.namespace },
    });
    const start = statements.find((s) => list(s.Action).includes('states:StartExecution'))!;
    expect(start.Resource).toEqual({ Ref: expect.stringMatching(/^CycleStateMachine/) });
    const actions = statements.flatMap((s) => list(s.Action));
    expect(actions.filter((a) => a.startsWith('ec2:'))).toEqual([]);
    expect(actions).toContain('lambda:InvokeFunction');
  });

  it('alarms when a recovery teardown cannot be verified', () => {
    template.hasResourceProperties('AWS::CloudWatch::Alarm', {
      MetricName: TEARDOWN_FAILED_METRIC.metricName,
      Namespace: TEARDOWN_FAILED_METRIC.namespace,
      Dimensions: [{ Name: TEARDOWN_FAILED_METRIC.dimension, Value: 'FerryTest-recovery' }],
      Statistic: 'Sum',
      Threshold: 0,
      ComparisonOperator: 'GreaterThanThreshold',
      TreatMissingData: 'notBreaching',
      AlarmActions: [{ Ref: Match.stringLikeRegexp('^Notifications') }],
    });
  });

  it('passes the cdk-nag AwsSolutions checks with no unsuppressed finding', () => {
    const findings = Annotations.fromStack(stack).findError('*', Match.stringLikeRegexp('AwsSolutions-.*'));
    expect(findings.map((f) => `${f.id}: ${String(f.entry.data).slice(0, 200)}`)).toEqual([]);
  });
});

describe('recovery defaults in the configuration', () => {
  const plan = (recovery: unknown) => ({
    plans: [
      {
        name: 'web',
        schedule: 'rate(15 minutes)',
        rpoMinutes: 30,
        disks: [
          { disk: 'root', volumeId: 'vol-0123456789abcdef0' },
          { disk: 'data', volumeId: 'vol-0fedcba9876543210' },
        ],
        recovery,
      },
    ],
  });
  const refusal = (input: unknown) => {
    try {
      parseFerryConfig(input, 'test config');
    } catch (err) {
      return (err as Error).message;
    }
    throw new Error('not refused');
  };

  it('refuses disks that are not the plan’s, a disk used twice, a machine twice, unknown keys', () => {
    expect(refusal(plan({ machines: [{ name: 'a', bootDisk: 'sda' }] }))).toBe(
      'test config is invalid: plans[0].recovery.machines[0].bootDisk: sda is not a disk of plan web (root, data)',
    );
    expect(
      refusal(
        plan({
          machines: [
            { name: 'a', bootDisk: 'root' },
            { name: 'b', dataDisks: ['root'] },
          ],
        }),
      ),
    ).toContain('plans[0].recovery.machines[1].dataDisks[0]: disk root is already used by machine a');
    expect(refusal(plan({ machines: [{ name: 'a' }, { name: 'a' }] }))).toContain(
      'plans[0].recovery.machines[1].name: machine a appears twice',
    );
    expect(refusal(plan({ set: 'x', machines: [] }))).toContain('plans[0].recovery: unknown setting set');
    expect(refusal(plan({ ttlMinutes: 1 }))).toContain('plans[0].recovery.ttlMinutes');
  });

  it('refuses defaults too large for the Lambda environment at synth', () => {
    const machines = Array.from({ length: 40 }, (_, i) => ({
      name: `machine-${i}`,
      instanceType: 'm6i.large',
      tags: { owner: 'a-rather-long-owner-name', costCenter: 'cc-0000001' },
    }));
    const app = new App({ context: { ...FLAGS, 'aws:cdk:bundling-stacks': [] } });
    expect(() => new FerryStack(app, 'Big', { config: parseFerryConfig(plan({ machines })) })).toThrow(
      /plans\[\]\.recovery: the plans' recovery defaults take \d+ bytes as JSON; Lambda allows 4 KB/,
    );
  });
});
