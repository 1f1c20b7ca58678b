// Synth tests of FerryStack: the template's security and wiring properties, cdk-nag's AwsSolutions
// pack with zero unsuppressed findings, and the cycle state machine's definition validated and run
// locally (aws-local-stepfunctions) with fake tasks, child executions included.
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { App, Aspects, Stack } from 'aws-cdk-lib';
import { Annotations, Match, Template } from 'aws-cdk-lib/assertions';
import { StateMachine, type StateMachineDefinition } from 'aws-local-stepfunctions';
import { AwsSolutionsChecks } from 'cdk-nag';
import { beforeAll, describe, expect, it } from 'vitest';
import { plannerEventSchema } from '../../functions/contracts.ts';
import { type FerryConfigInput, parseFerryConfig } from '../../infra/config.ts';
import {
  awaitChildEvents,
  diffChildEvents,
  FINALIZE_POLL_SECONDS,
  HISTORY_LIMIT,
  MAX_DIFF_CALLS_PER_CHILD,
  MAX_FINALIZE_CALLS,
  MAX_ROUNDS_PER_CYCLE,
  MAX_SNAPSHOT_POLLS_PER_CHILD,
  MAX_TICKS_PER_CHILD,
  PARENT_SNAPSHOT_POLLS,
  PARENT_TICKS,
  parentEvents,
  replicateChildEvents,
  SNAPSHOT_POLL_SECONDS,
  TICK_WAIT_SECONDS,
} from '../../infra/history-budget.ts';
import { FerryStack, SNAPSHOT_TAG_KEY } from '../../infra/stack.ts';
import { TABLE_ACTIONS } from '../../infra/table-access.ts';
import { TTL_ATTRIBUTE } from '../../shared/aws/dynamo/cycle-items.ts';
import { tableDefinition } from '../../shared/aws/dynamo/schema.ts';
import { allStates, plainDefinition } from './asl.ts';

// aws-local-stepfunctions uses Promise.withResolvers (Node 22); this is Node 20.
const P = Promise as unknown as { withResolvers?: () => unknown };
P.withResolvers ??= () => {
  let resolve: unknown;
  let reject: unknown;
  const promise = new Promise((a, b) => {
    resolve = a;
    reject = b;
  });
  return { promise, resolve, reject };
};

const SAMPLE: FerryConfigInput = {
  nodeBudget: '256 MiB',
  windowDefaults: { chunkSize: '1 MiB', window: '32 MiB' },
  notifyEmails: ['dr-ops@example.com'],
  sourceKmsKeyArns: ['arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab'],
  plans: [
    {
      name: 'web-tier',
      schedule: 'rate(15 minutes)',
      rpoMinutes: 30,
      disks: [
        { disk: 'root', volumeId: 'vol-0123456789abcdef0' },
        { disk: 'data', volumeId: 'vol-0fedcba9876543210' },
      ],
    },
    {
      name: 'db',
      set: 'db-primary',
      schedule: 'cron(0 * * * ? *)',
      timezone: 'Europe/Berlin',
      rpoMinutes: 120,
      enabled: false,
      disks: [{ disk: 'pg', volumeId: 'vol-0aaaaaaaaaaaaaaaa' }],
      params: { window: '64 MiB', adaptive: false },
    },
  ],
};

/** The feature flags `cdk synth` runs with (cdk.json), without its default configuration file. */
const { config: _defaultConfig, ...FLAGS } = JSON.parse(readFileSync('cdk.json', 'utf8')).context as Record<
  string,
  unknown
>;

/** Bundling skipped: the handlers are bundled once in their own test below and by `cdk synth`. */
function synth(config: FerryConfigInput, opts: { nag?: boolean; validate?: boolean } = {}) {
  const app = new App({
    context: { ...FLAGS, 'aws:cdk:bundling-stacks': [] },
    builtinCloudFormationValidation: opts.validate ?? false,
  });
  const stack = new FerryStack(app, 'FerryTest', { config: parseFerryConfig(config) });
  if (opts.nag) Aspects.of(stack).add(new AwsSolutionsChecks());
  return { stack, template: Template.fromStack(stack) };
}

type Resource = { Type: string; Properties: Record<string, unknown> };
type Statement = {
  Action: string | string[];
  Resource: unknown;
  Condition?: Record<string, Record<string, unknown>>;
};

const actionsOf = (s: Statement): string[] => (Array.isArray(s.Action) ? s.Action : [s.Action]);
const resourcesOf = (s: Statement): unknown[] => (Array.isArray(s.Resource) ? s.Resource : [s.Resource]);

let stack: FerryStack;
let template: Template;
let resources: Record<string, Resource>;

beforeAll(() => {
  ({ stack, template } = synth(SAMPLE, { nag: true, validate: true }));
  resources = template.toJSON().Resources as Record<string, Resource>;
});

/** Logical id of the role a function runs as, found by the function's description. */
function roleOf(descriptionStart: string): string {
  const fns = Object.values(resources).filter(
    (r) =>
      r.Type === 'AWS::Lambda::Function' &&
      String(r.Properties.Description ?? '').startsWith(descriptionStart),
  );
  expect(fns).toHaveLength(1);
  return (fns[0]!.Properties.Role as { 'Fn::GetAtt': string[] })['Fn::GetAtt'][0]!;
}

/** Every statement of the inline policies attached to a role. */
function statementsOf(roleId: string): Statement[] {
  return Object.values(resources)
    .filter(
      (r) =>
        r.Type === 'AWS::IAM::Policy' &&
        (r.Properties.Roles as { Ref: string }[]).some((ref) => ref.Ref === roleId),
    )
    .flatMap((r) => (r.Properties.PolicyDocument as { Statement: Statement[] }).Statement);
}

const allStatements = (): Statement[] =>
  Object.values(resources)
    .filter((r) => r.Type === 'AWS::IAM::Policy')
    .flatMap((r) => (r.Properties.PolicyDocument as { Statement: Statement[] }).Statement);

describe('FerryStack template', () => {
  it('has a Standard cycle state machine with tracing and full logging (the Recovery one: recovery-stack.test.ts)', () => {
    template.resourceCountIs('AWS::StepFunctions::StateMachine', 2);
    template.hasResourceProperties('AWS::StepFunctions::StateMachine', {
      StateMachineType: 'STANDARD',
      StateMachineName: 'FerryTest-cycle',
      TracingConfiguration: { Enabled: true },
      LoggingConfiguration: Match.objectLike({ Level: 'ALL' }),
    });
  });

  it('encrypts the grant queue with the stack key and redrives to an encrypted dead-letter queue', () => {
    const queues = template.findResources('AWS::SQS::Queue');
    const [dlqId] = Object.entries(queues).find(([, q]) => q.Properties.RedrivePolicy === undefined)!;
    template.hasResourceProperties('AWS::SQS::Queue', {
      KmsMasterKeyId: { 'Fn::GetAtt': [Match.stringLikeRegexp('^StateKey'), 'Arn'] },
      RedrivePolicy: { deadLetterTargetArn: { 'Fn::GetAtt': [dlqId, 'Arn'] }, maxReceiveCount: 5 },
      // Six times the chunk-writer's 5-minute timeout.
      VisibilityTimeout: 1800,
    });
    expect(queues[dlqId]!.Properties.KmsMasterKeyId).toEqual({
      'Fn::GetAtt': [expect.stringMatching(/^StateKey/), 'Arn'],
    });
    // Both queues refuse requests without TLS.
    const policies = Object.values(template.findResources('AWS::SQS::QueuePolicy'));
    expect(policies).toHaveLength(2);
    for (const p of policies) {
      expect(JSON.stringify(p.Properties.PolicyDocument)).toContain('"aws:SecureTransport":"false"');
    }
  });

  it('mirrors the single-table design of shared/aws/dynamo/schema.ts, with PITR and KMS', () => {
    const def = tableDefinition('x');
    template.resourceCountIs('AWS::DynamoDB::Table', 1);
    // No secondary index: every read is by key or key prefix (the IAM grants name no index either).
    expect(def.GlobalSecondaryIndexes).toBeUndefined();
    template.hasResourceProperties('AWS::DynamoDB::Table', {
      KeySchema: def.KeySchema,
      AttributeDefinitions: def.AttributeDefinitions,
      GlobalSecondaryIndexes: Match.absent(),
      TimeToLiveSpecification: { AttributeName: TTL_ATTRIBUTE, Enabled: true },
      BillingMode: 'PAY_PER_REQUEST',
      PointInTimeRecoverySpecification: { PointInTimeRecoveryEnabled: true },
      SSESpecification: {
        SSEEnabled: true,
        SSEType: 'KMS',
        KMSMasterKeyId: { 'Fn::GetAtt': [Match.stringLikeRegexp('^StateKey'), 'Arn'] },
      },
    });
    const [table] = Object.values(template.findResources('AWS::DynamoDB::Table'));
    expect(table!.DeletionPolicy).toBe('Retain');
  });

  it('runs five Node 22 ARM64 functions (four for the cycle, one for recovery), traced, each with its own log group', () => {
    const fns = Object.values(template.findResources('AWS::Lambda::Function'));
    expect(fns).toHaveLength(5);
    for (const fn of fns) {
      expect(fn.Properties).toMatchObject({
        Runtime: 'nodejs22.x',
        Architectures: ['arm64'],
        TracingConfig: { Mode: 'Active' },
        LoggingConfig: { LogGroup: { Ref: expect.any(String) } },
      });
    }
    // One per function and one per state machine.
    template.resourcePropertiesCountIs('AWS::Logs::LogGroup', { RetentionInDays: 30 }, 7);
    template.hasResourceProperties('AWS::Lambda::Function', {
      Description: Match.stringLikeRegexp('^Ferry planner'),
      Environment: {
        Variables: Match.objectLike({
          TABLE_NAME: { Ref: Match.anyValue() },
          QUEUE_URL: { Ref: Match.anyValue() },
          NODE_BUDGET: '256 MiB',
          KMS_KEY_ARN: { 'Fn::GetAtt': [Match.stringLikeRegexp('^SnapshotKey'), 'Arn'] },
          SNAPSHOT_TAG_KEY: SNAPSHOT_TAG_KEY,
          SNAPSHOT_TAG_VALUE: 'FerryTest',
          POWERTOOLS_SERVICE_NAME: 'ferry-planner',
          POWERTOOLS_METRICS_NAMESPACE: 'Ferry',
        }),
      },
    });
    template.hasResourceProperties('AWS::Lambda::Function', {
      Description: Match.stringLikeRegexp('^Ferry finalizer'),
      Environment: { Variables: Match.objectLike({ EVENT_BUS_NAME: { Ref: Match.anyValue() } }) },
    });
  });

  it('feeds the chunk-writer from the grant queue with partial batch failures', () => {
    template.resourceCountIs('AWS::Lambda::EventSourceMapping', 1);
    template.hasResourceProperties('AWS::Lambda::EventSourceMapping', {
      FunctionName: { Ref: Match.stringLikeRegexp('^ChunkWriterFunction') },
      EventSourceArn: { 'Fn::GetAtt': [Match.stringLikeRegexp('^Grants'), 'Arn'] },
      FunctionResponseTypes: ['ReportBatchItemFailures'],
      BatchSize: 10,
      ScalingConfig: { MaximumConcurrency: 20 },
    });
  });

  it('schedules every protection plan with its input, flexible window off', () => {
    const schedules = Object.values(template.findResources('AWS::Scheduler::Schedule'));
    expect(schedules).toHaveLength(2);
    const byPlan = new Map(
      schedules.map((s) => {
        const input = JSON.parse(s.Properties.Target.Input as string);
        return [input.plan as string, { props: s.Properties, input }];
      }),
    );
    const web = byPlan.get('web-tier')!;
    expect(web.props).toMatchObject({
      ScheduleExpression: 'rate(15 minutes)',
      ScheduleExpressionTimezone: 'UTC',
      FlexibleTimeWindow: { Mode: 'OFF' },
      State: 'ENABLED',
      Target: { Arn: { Ref: expect.stringMatching(/^CycleStateMachine/) } },
    });
    expect(web.input).toEqual({
      plan: 'web-tier',
      set: 'web-tier',
      disks: [
        { disk: 'root', volumeId: 'vol-0123456789abcdef0' },
        { disk: 'data', volumeId: 'vol-0fedcba9876543210' },
      ],
      params: { chunkSize: '1 MiB', window: '32 MiB' },
    });
    const db = byPlan.get('db')!;
    expect(db.props).toMatchObject({
      ScheduleExpression: 'cron(0 * * * ? *)',
      ScheduleExpressionTimezone: 'Europe/Berlin',
      State: 'DISABLED',
    });
    expect(db.input).toMatchObject({
      set: 'db-primary',
      params: { chunkSize: '1 MiB', window: '64 MiB', adaptive: false },
    });
  });

  it('alarms on dead letters, failed cycles and each plan’s RPO (missing data breaches)', () => {
    template.hasResourceProperties('AWS::CloudWatch::Alarm', {
      MetricName: 'ApproximateNumberOfMessagesVisible',
      Namespace: 'AWS/SQS',
      Threshold: 0,
      ComparisonOperator: 'GreaterThanThreshold',
      AlarmActions: [{ Ref: Match.stringLikeRegexp('^Notifications') }],
    });
    template.hasResourceProperties('AWS::CloudWatch::Alarm', {
      MetricName: 'ExecutionsFailed',
      Namespace: 'AWS/States',
    });
    for (const [plan, rpoMinutes, enabled] of [
      ['web-tier', 30, true],
      ['db', 120, false],
    ] as const) {
      template.hasResourceProperties('AWS::CloudWatch::Alarm', {
        Namespace: 'Ferry',
        MetricName: 'CheckpointAgeSeconds',
        // Exactly the dimensions the finalizer's metric carries (Powertools adds `service`).
        Dimensions: [
          { Name: 'plan', Value: plan },
          { Name: 'service', Value: 'ferry-finalizer' },
        ],
        Statistic: 'Maximum',
        Period: rpoMinutes * 60,
        Threshold: rpoMinutes * 60,
        EvaluationPeriods: 1,
        TreatMissingData: 'breaching',
        // A disabled plan's alarm exists but does not notify.
        ActionsEnabled: enabled,
      });
    }
  });

  it('encrypts with customer-managed keys that rotate', () => {
    const keys = Object.values(template.findResources('AWS::KMS::Key'));
    expect(keys).toHaveLength(2);
    for (const key of keys) expect(key.Properties.EnableKeyRotation).toBe(true);
    template.hasResourceProperties('AWS::SNS::Topic', {
      KmsMasterKeyId: { 'Fn::GetAtt': [Match.stringLikeRegexp('^StateKey'), 'Arn'] },
    });
  });

  it('announces published checkpoints from a rule on the Ferry bus', () => {
    template.hasResourceProperties('AWS::Events::Rule', {
      EventBusName: { Ref: Match.stringLikeRegexp('^Events') },
      EventPattern: { source: ['ferry'], 'detail-type': ['Ferry Checkpoint Published'] },
    });
    template.resourceCountIs('AWS::Events::Archive', 1);
  });
});

describe('least-privilege IAM', () => {
  it('grants no ebs:* or * action anywhere', () => {
    for (const s of allStatements()) {
      for (const action of actionsOf(s)) {
        expect(action).not.toBe('*');
        expect(action).not.toMatch(/^ebs:\*$|^ebs:.*\*/);
      }
    }
  });

  it('scopes every EBS direct action to Ferry-tagged snapshot ARNs', () => {
    const ebs = allStatements().filter((s) => actionsOf(s).some((a) => a.startsWith('ebs:')));
    expect(ebs.length).toBeGreaterThan(0);
    for (const s of ebs) {
      for (const resource of resourcesOf(s)) {
        expect(resource).not.toBe('*');
        expect(JSON.stringify(resource)).toMatch(/:ec2:.*::snapshot\/\*"\]\]\}$/);
      }
      const tagCondition = Object.values(s.Condition ?? {}).find(
        (c) => c[`aws:ResourceTag/${SNAPSHOT_TAG_KEY}`] ?? c[`aws:RequestTag/${SNAPSHOT_TAG_KEY}`],
      );
      expect(tagCondition, JSON.stringify(s)).toBeDefined();
      expect(Object.values(tagCondition!)).toContain('FerryTest');
    }
    // StartSnapshot can only be checked against the tags in its request; the others against the snapshot's.
    const start = ebs.find((s) => actionsOf(s).includes('ebs:StartSnapshot'))!;
    expect(start.Condition).toEqual({
      StringEquals: { [`aws:RequestTag/${SNAPSHOT_TAG_KEY}`]: 'FerryTest' },
    });
  });

  it('gives each function only the EBS actions it calls', () => {
    const ebsActions = (roleId: string) =>
      statementsOf(roleId)
        .flatMap(actionsOf)
        .filter((a) => a.startsWith('ebs:'))
        .sort();
    expect(ebsActions(roleOf('Ferry planner'))).toEqual(['ebs:StartSnapshot']);
    expect(ebsActions(roleOf('Ferry differ'))).toEqual(['ebs:ListChangedBlocks', 'ebs:ListSnapshotBlocks']);
    expect(ebsActions(roleOf('Ferry chunk-writer'))).toEqual([
      'ebs:GetSnapshotBlock',
      'ebs:PutSnapshotBlock',
    ]);
    expect(ebsActions(roleOf('Ferry finalizer'))).toEqual(['ebs:CompleteSnapshot']);
    // Only the writers of grants may send to the queue; only the finalizer may announce.
    const sends = (roleId: string) =>
      statementsOf(roleId).some((s) => actionsOf(s).includes('sqs:SendMessage'));
    expect([roleOf('Ferry planner'), roleOf('Ferry chunk-writer')].every(sends)).toBe(true);
    expect([roleOf('Ferry differ'), roleOf('Ferry finalizer')].some(sends)).toBe(false);
    const puts = (roleId: string) =>
      statementsOf(roleId).some((s) => actionsOf(s).includes('events:PutEvents'));
    expect(puts(roleOf('Ferry finalizer'))).toBe(true);
    expect(puts(roleOf('Ferry planner'))).toBe(false);
  });

  it('gives each function only the DynamoDB actions it makes, on the state table and no index', () => {
    const tableOf = (roleId: string) =>
      statementsOf(roleId).filter((s) => actionsOf(s).some((a) => a.startsWith('dynamodb:')));
    for (const [fn, description] of [
      ['planner', 'Ferry planner'],
      ['differ', 'Ferry differ'],
      ['chunk-writer', 'Ferry chunk-writer'],
      ['finalizer', 'Ferry finalizer'],
    ] as const) {
      const statements = tableOf(roleOf(description));
      expect(statements.flatMap(actionsOf).sort(), fn).toEqual([...TABLE_ACTIONS[fn]].sort());
      for (const resource of statements.flatMap(resourcesOf)) {
        expect(resource, fn).toEqual({ 'Fn::GetAtt': [expect.stringMatching(/^State/), 'Arn'] });
      }
    }
    // Nothing scans, works in batches or reads the table's description; only the recovery function
    // deletes (a failback cutover's removal of the plan's failover mark).
    const all = allStatements().flatMap(actionsOf);
    for (const action of ['Scan', 'BatchWriteItem', 'BatchGetItem', 'DescribeTable']) {
      expect(all).not.toContain(`dynamodb:${action}`);
    }
    const deleting = allStatements().filter((s) => actionsOf(s).includes('dynamodb:DeleteItem'));
    expect(deleting.map((s) => actionsOf(s).sort())).toEqual([
      ['dynamodb:DeleteItem', 'dynamodb:GetItem', 'dynamodb:PutItem', 'dynamodb:Query'],
    ]);
  });

  it('lets the state machine snapshot only the configured volumes, and volumes a failover or migration created', () => {
    const sm = Object.values(resources).find((r) => r.Type === 'AWS::StepFunctions::StateMachine')!;
    const roleId = (sm.Properties.RoleArn as { 'Fn::GetAtt': string[] })['Fn::GetAtt'][0]!;
    const create = statementsOf(roleId).filter((s) => actionsOf(s).includes('ec2:CreateSnapshot'));
    const onVolumes = create.filter((s) =>
      resourcesOf(s).some((r) => JSON.stringify(r).includes(':volume/')),
    );
    const byId = onVolumes
      .filter((s) => s.Condition === undefined)
      .flatMap(resourcesOf)
      .map((r) => JSON.stringify(r));
    expect(byId).toHaveLength(3);
    for (const id of ['vol-0123456789abcdef0', 'vol-0fedcba9876543210', 'vol-0aaaaaaaaaaaaaaaa']) {
      expect(byId.some((v) => v.includes(`:volume/${id}`))).toBe(true);
    }
    // Any volume only with the recovery mode tag of a failover or migration (a failback's source).
    const recovered = onVolumes.filter((s) => s.Condition !== undefined);
    expect(recovered).toHaveLength(1);
    expect(JSON.stringify(resourcesOf(recovered[0]!))).toContain(':volume/*');
    expect(recovered[0]!.Condition).toEqual({
      StringEquals: { 'aws:ResourceTag/ferry:recovery-mode': ['failover', 'migration'] },
    });
    const tags = statementsOf(roleId).find((s) => actionsOf(s).includes('ec2:CreateTags'))!;
    expect(tags.Condition?.StringEquals).toMatchObject({ 'ec2:CreateAction': 'CreateSnapshot' });
    // It may delete only source snapshots of this deployment (the ones a skipped start took).
    const deletes = statementsOf(roleId).filter((s) => actionsOf(s).includes('ec2:DeleteSnapshot'));
    expect(deletes).toHaveLength(1);
    expect(deletes[0]!.Condition).toEqual({
      StringEquals: {
        [`aws:ResourceTag/${SNAPSHOT_TAG_KEY}`]: 'FerryTest',
        'aws:ResourceTag/ferry:role': 'source',
      },
    });
  });

  it('reads customer-managed source keys only from the functions that read sources', () => {
    const readsSourceKey = (roleId: string) =>
      statementsOf(roleId).some((s) => JSON.stringify(s.Resource).includes('111122223333:key/'));
    expect(readsSourceKey(roleOf('Ferry differ'))).toBe(true);
    expect(readsSourceKey(roleOf('Ferry chunk-writer'))).toBe(true);
    expect(readsSourceKey(roleOf('Ferry planner'))).toBe(false);
    expect(readsSourceKey(roleOf('Ferry finalizer'))).toBe(false);
  });
});

describe('cdk-nag AwsSolutions', () => {
  it('reports no unsuppressed error or warning', () => {
    const errors = Annotations.fromStack(stack).findError('*', Match.stringLikeRegexp('AwsSolutions-.*'));
    const warnings = Annotations.fromStack(stack).findWarning('*', Match.stringLikeRegexp('AwsSolutions-.*'));
    expect(errors.map((e) => `${e.id}: ${e.entry.data}`)).toEqual([]);
    expect(warnings.map((w) => `${w.id}: ${w.entry.data}`)).toEqual([]);
  });

  it('justifies every suppression in a sentence', () => {
    const reasons = Object.values(resources).flatMap((r) =>
      (
        (r as { Metadata?: { cdk_nag?: { rules_to_suppress: { reason: string }[] } } }).Metadata?.cdk_nag
          ?.rules_to_suppress ?? []
      ).map((s) => s.reason),
    );
    expect(reasons.length).toBeGreaterThan(0);
    for (const reason of reasons) expect(reason).toMatch(/^[A-Z].{30,}\.$/);
  });
});

describe('configuration variants', () => {
  it('uses a given snapshot key instead of creating one, and omits the source-key grants without source keys', () => {
    const keyArn = 'arn:aws:kms:eu-west-1:111122223333:key/abcd1234-12ab-34cd-56ef-1234567890ab';
    const { template: t } = synth({ snapshotKmsKeyArn: keyArn, plans: [] });
    t.resourceCountIs('AWS::KMS::Key', 1);
    t.resourceCountIs('AWS::Scheduler::Schedule', 0);
    t.hasResourceProperties('AWS::Lambda::Function', {
      Environment: { Variables: Match.objectLike({ KMS_KEY_ARN: keyArn }) },
    });
    expect(JSON.stringify(t.toJSON())).not.toContain('ReadEncryptedSources');
    // Without configured volumes the cycle state machine may call CreateSnapshot only on volumes a
    // failover or migration created (the recovery role creates volumes from snapshots:
    // recovery-stack.test.ts checks its conditions).
    const res = t.toJSON().Resources as Record<string, Resource>;
    const cycle = Object.values(res).find(
      (r) =>
        r.Type === 'AWS::StepFunctions::StateMachine' && r.Properties.StateMachineName === 'FerryTest-cycle',
    )!;
    const cycleRole = (cycle.Properties.RoleArn as { 'Fn::GetAtt': string[] })['Fn::GetAtt'][0]!;
    const cyclePolicies = Object.values(res).filter(
      (r) =>
        r.Type === 'AWS::IAM::Policy' &&
        (r.Properties.Roles as { Ref: string }[]).some((ref) => ref.Ref === cycleRole),
    );
    expect(cyclePolicies.length).toBeGreaterThan(0);
    const onVolumes = cyclePolicies
      .flatMap((p) => (p.Properties.PolicyDocument as { Statement: Statement[] }).Statement)
      .filter((st) => JSON.stringify(st.Resource).includes(':volume/'));
    expect(onVolumes.map((st) => st.Condition)).toEqual([
      { StringEquals: { 'aws:ResourceTag/ferry:recovery-mode': ['failover', 'migration'] } },
    ]);
  });

  it('refuses an invalid configuration before building anything', () => {
    expect(() =>
      synth({ plans: [{ name: 'x', schedule: 'rate(5 minutes)', rpoMinutes: 1, disks: [] }] }),
    ).toThrow(/plans\[0\]\.rpoMinutes/);
  });

  it('passes the same checks under an explicit account and region', () => {
    const app = new App({
      context: { 'aws:cdk:bundling-stacks': [] },
      builtinCloudFormationValidation: false,
    });
    const s = new FerryStack(app, 'FerryEnv', {
      config: parseFerryConfig(SAMPLE),
      env: { account: '111122223333', region: 'eu-west-1' },
    });
    Aspects.of(s).add(new AwsSolutionsChecks());
    Template.fromStack(s);
    expect(Annotations.fromStack(s).findError('*', Match.stringLikeRegexp('AwsSolutions-.*'))).toEqual([]);
    expect(Stack.of(s).region).toBe('eu-west-1');
  });
});

// ---- the cycle state machine, run locally ---------------------------------------------------------

type Json = Record<string, unknown>;
type Handler = (input: Json) => unknown;

/** Runs the definition like Step Functions would, child executions included, with fake tasks. */
function runner(def: StateMachineDefinition) {
  const machine = new StateMachine(def);
  const states = allStates(def);
  const zeroWaits = Object.fromEntries([...states].filter(([, s]) => s.Type === 'Wait').map(([n]) => [n, 0]));
  const zeroRetries = Object.fromEntries([...states].filter(([, s]) => s.Retry).map(([n]) => [n, 0]));
  let executions = 0;
  const children: string[] = [];
  const run = (input: Json, name: string, handlers: Record<string, Handler>): Promise<Json> => {
    executions++;
    const child = (task: Json) => {
      const childInput = task.Input as Json;
      children.push(childInput.child as string);
      return run(childInput, `child-${executions}`, handlers).then((Output) => ({ Output }));
    };
    const execution = machine.run(input as never, {
      context: { Execution: { Name: name, Id: `arn:aws:states:us-east-1:123456789012:execution:x:${name}` } },
      overrides: {
        taskResourceLocalHandlers: {
          'Await round': child,
          'Diff round': child,
          'Replicate round': child,
          ...handlers,
        } as never,
        waitTimeOverrides: zeroWaits,
        retryIntervalOverrides: zeroRetries,
      },
    });
    return execution.result as Promise<Json>;
  };
  return { run, children, executions: () => executions };
}

const named = (name: string, message: string) => Object.assign(new Error(message), { name });
/** The planner's tick answer with the event's `round` echoed, as the handler does. */
const echoRound = (i: Json, answer: Json): Json => ({ ...answer, round: i.round });
/** CreateSnapshot's answer: the new snapshot with the tags it was created with (as EC2 answers). */
const snapshotStarted = (i: Json): Json => ({
  SnapshotId: 'snap-0bbbbbbbbbbbbbbbb',
  VolumeId: i.VolumeId,
  VolumeSize: 8,
  Tags: (i.TagSpecifications as { Tags: unknown[] }[])[0]?.Tags,
});

describe('the cycle state machine, run locally', () => {
  let def: StateMachineDefinition;
  beforeAll(() => {
    def = plainDefinition(template);
  });

  it('is valid ASL for aws-local-stepfunctions (JSONPath only)', () => {
    expect(() => new StateMachine(def)).not.toThrow();
    const declared = def as StateMachineDefinition & { QueryLanguage?: string };
    expect(declared.QueryLanguage ?? 'JSONPath').toBe('JSONPath');
    for (const [name, state] of allStates(def)) {
      expect(state.QueryLanguage ?? 'JSONPath', name).toBe('JSONPath');
      // JSONata expressions and variables are silently ignored by the local runner.
      expect(JSON.stringify(state), name).not.toMatch(/\{%|"Assign"|"Arguments"|"Output"/);
    }
  });

  it('is built from the history budget’s bounds', () => {
    const states = allStates(def);
    const waits = Object.fromEntries(
      [...states].filter(([, s]) => s.Type === 'Wait').map(([n, s]) => [n, s.Seconds]),
    );
    expect(waits).toEqual({
      'Wait for writers': TICK_WAIT_SECONDS,
      'Wait for source snapshots': SNAPSHOT_POLL_SECONDS,
      'Wait for target snapshots': FINALIZE_POLL_SECONDS,
    });
    const text = JSON.stringify(def);
    for (const bound of [
      MAX_TICKS_PER_CHILD,
      MAX_DIFF_CALLS_PER_CHILD - 1,
      MAX_SNAPSHOT_POLLS_PER_CHILD,
      MAX_ROUNDS_PER_CYCLE,
      MAX_FINALIZE_CALLS - 1,
    ]) {
      expect(text).toMatch(new RegExp(`"Numeric(GreaterThan|GreaterThanEquals)":${bound}[,}]`));
    }
    // Chunks never pass through the state machine: no state talks to SQS.
    expect(text).not.toMatch(/sqs/i);
  });

  it('keeps every execution below the 25,000-event history limit, even if every retry is used', () => {
    for (const estimate of [replicateChildEvents(), awaitChildEvents(), diffChildEvents(), parentEvents()]) {
      expect(estimate.nominal).toBeLessThan(estimate.worst);
      expect(estimate.worst).toBeLessThan(HISTORY_LIMIT);
    }
  });

  it('runs a full cycle: snapshots, prepare, diff and replicate across children, finalize', async () => {
    const { run, children } = runner(def);
    const calls: string[] = [];
    let describes = 0;
    let ticks = 0;
    let finalizes = 0;
    const diffCalls = new Map<string, number>();
    // Each loop outgrows the parent's own passes and a first child, so it needs a second child (the
    // sources: one child).
    const pendingDescribes = PARENT_SNAPSHOT_POLLS + 1;
    const rootCalls = 1 + MAX_DIFF_CALLS_PER_CHILD + 2;
    const tickCount = PARENT_TICKS + MAX_TICKS_PER_CHILD + 3;
    const rounds: number[] = [];
    let prepared: Json | undefined;

    const output = await run(
      {
        plan: 'web-tier',
        set: 'web-tier',
        disks: [
          { disk: 'root', volumeId: 'vol-0123456789abcdef0' },
          { disk: 'data', sourceSnapshotId: 'snap-0aaaaaaaaaaaaaaaa', volumeSizeGiB: 16 },
        ],
        params: { window: '32 MiB' },
      },
      'cycle-1',
      {
        'Create source snapshot': (i) => {
          calls.push(`create ${i.VolumeId}`);
          expect(i.TagSpecifications).toEqual([
            {
              ResourceType: 'snapshot',
              Tags: expect.arrayContaining([
                { Key: SNAPSHOT_TAG_KEY, Value: 'FerryTest' },
                { Key: 'ferry:cycle', Value: 'cycle-1' },
              ]),
            },
          ]);
          return { ...snapshotStarted(i), State: 'pending' };
        },
        'Describe source snapshots': (i) => {
          describes++;
          const state = describes <= pendingDescribes ? 'pending' : 'completed';
          return { Snapshots: (i.SnapshotIds as string[]).map((id) => ({ SnapshotId: id, State: state })) };
        },
        'Prepare cycle': (i) => {
          prepared = i;
          // What the planner does first: parse the event (created snapshots get their disk names).
          const { cycle } = plannerEventSchema.parse(i);
          calls.push('prepare');
          return {
            plan: cycle.plan,
            set: cycle.set,
            cycleId: cycle.cycleId,
            lockOwner: `cycle:${cycle.cycleId}`,
            sequence: 7,
            disks: cycle.disks.map((d) => ({
              set: cycle.set,
              cycleId: cycle.cycleId,
              disk: d.disk,
            })),
          };
        },
        'Diff disk': (i) => {
          const n = (diffCalls.get(i.disk as string) ?? 0) + 1;
          diffCalls.set(i.disk as string, n);
          const done = i.disk === 'root' ? n >= rootCalls : true;
          return { ...i, kind: 'full', done, descriptors: n, blocks: n, bytes: n };
        },
        Tick: (i) => {
          expect(i).toEqual({
            action: 'tick',
            cycle: expect.objectContaining({ sequence: 7 }),
            round: expect.any(Number),
          });
          ticks++;
          rounds.push(i.round as number);
          return echoRound(i, { status: ticks < tickCount ? 'running' : 'done', idleTicks: 0, disks: [] });
        },
        'Finalize cycle': () => {
          finalizes++;
          if (finalizes < 3) return { status: 'completing', pending: ['snap-0ccccccccccccccc'] };
          return { status: 'published', checkpointId: 'web-tier/7', sequence: 7, disks: [] };
        },
        'Abort cycle': () => {
          throw new Error('abort must not be called');
        },
      },
    );

    expect(output).toEqual({ status: 'published', checkpointId: 'web-tier/7', sequence: 7, disks: [] });
    expect(calls).toEqual(['create vol-0123456789abcdef0', 'prepare']);
    // The execution name is the cycle id. A created snapshot arrives as EC2's answer (no Pass per
    // disk reshapes it) and prepare's contract names it by the requested disk of its index.
    const requested = [
      { disk: 'root', volumeId: 'vol-0123456789abcdef0' },
      { disk: 'data', sourceSnapshotId: 'snap-0aaaaaaaaaaaaaaaa', volumeSizeGiB: 16 },
    ];
    const startedAt = expect.stringMatching(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$/);
    expect(prepared).toEqual({
      action: 'prepare',
      cycle: {
        plan: 'web-tier',
        set: 'web-tier',
        cycleId: 'cycle-1',
        requested,
        disks: [
          { volumeId: 'vol-0123456789abcdef0', sourceSnapshotId: 'snap-0bbbbbbbbbbbbbbbb', volumeSizeGiB: 8 },
          { disk: 'data', sourceSnapshotId: 'snap-0aaaaaaaaaaaaaaaa', volumeSizeGiB: 16 },
        ],
        params: { window: '32 MiB' },
        // The execution's start: the checkpoint's age (the RPO metric) counts from it.
        startedAt,
      },
    });
    expect(plannerEventSchema.parse(prepared).cycle).toEqual({
      plan: 'web-tier',
      set: 'web-tier',
      cycleId: 'cycle-1',
      disks: [
        { disk: 'root', sourceSnapshotId: 'snap-0bbbbbbbbbbbbbbbb', volumeSizeGiB: 8 },
        { disk: 'data', sourceSnapshotId: 'snap-0aaaaaaaaaaaaaaaa', volumeSizeGiB: 16 },
      ],
      params: { window: '32 MiB' },
      startedAt,
    });
    expect(diffCalls).toEqual(
      new Map([
        ['root', rootCalls],
        ['data', 1],
      ]),
    );
    expect(ticks).toBe(tickCount);
    // Each execution counts its own ticks from 1 (the count rides on the tick's round, not a Pass).
    const counted = (n: number) => Array.from({ length: n }, (_, k) => k + 1);
    expect(rounds).toEqual([...counted(PARENT_TICKS), ...counted(MAX_TICKS_PER_CHILD), ...counted(3)]);
    expect(finalizes).toBe(3);
    expect(children).toEqual(['await-snapshots', 'diff', 'diff', 'replicate', 'replicate']);
  });

  const prepared = (i: Json) => {
    const cycle = i.cycle as Json;
    return {
      plan: cycle.plan,
      set: cycle.set,
      cycleId: cycle.cycleId,
      lockOwner: 'cycle:x',
      sequence: 1,
      disks: [{ set: cycle.set, cycleId: cycle.cycleId, disk: 'root' }],
    };
  };
  const givenDisk = {
    plan: 'p',
    set: 's',
    disks: [{ disk: 'root', sourceSnapshotId: 'snap-0aaaaaaaaaaaaaaaa', volumeSizeGiB: 8 }],
  };
  const completed = (i: Json) => ({
    Snapshots: (i.SnapshotIds as string[]).map(() => ({ State: 'completed' })),
  });
  const diffed = (i: Json) => ({ ...i, kind: 'full', done: true, descriptors: 1, blocks: 1, bytes: 1 });

  it('aborts with the planner’s reason when a tick reports the cycle failed, and publishes nothing', async () => {
    const { run } = runner(def);
    let aborted: Json | undefined;
    const result = run(givenDisk, 'cycle-2', {
      'Describe source snapshots': completed,
      'Prepare cycle': prepared,
      'Diff disk': diffed,
      Tick: (i) =>
        echoRound(i, {
          status: 'failed',
          reason: 'disk root: target snapshot in error',
          idleTicks: 0,
          disks: [],
        }),
      'Finalize cycle': () => {
        throw new Error('finalize must not be called');
      },
      'Abort cycle': (i) => {
        aborted = i;
        return { status: 'aborted', reason: i.reason };
      },
    });
    await expect(result).rejects.toThrow();
    expect(aborted).toEqual({
      action: 'abort',
      cycle: expect.objectContaining({ cycleId: 'cycle-2' }),
      reason: 'the planner reported the cycle failed: disk root: target snapshot in error',
      error: {},
    });
  });

  it('aborts with the error when a step fails for good, without retrying a permanent error', async () => {
    const { run } = runner(def);
    let ticks = 0;
    let aborted: Json | undefined;
    const result = run(givenDisk, 'cycle-3', {
      'Describe source snapshots': completed,
      'Prepare cycle': prepared,
      'Diff disk': diffed,
      Tick: () => {
        ticks++;
        throw named('PlanLockLostError', 'plan p lock is no longer held');
      },
      'Abort cycle': (i) => {
        aborted = i;
        return { status: 'aborted', reason: i.reason };
      },
    });
    await expect(result).rejects.toThrow();
    expect(ticks).toBe(1);
    expect(aborted?.reason).toMatch(/^a cycle step failed with /);
    expect(aborted?.error).toMatchObject({ Error: expect.any(String) });
  });

  it('retries a transient handler error and carries on', async () => {
    const { run } = runner(def);
    let ticks = 0;
    const output = await run(givenDisk, 'cycle-4', {
      'Describe source snapshots': completed,
      'Prepare cycle': prepared,
      'Diff disk': diffed,
      Tick: (i) => {
        ticks++;
        if (ticks === 1) throw named('TransferError', 'DynamoDB throttled');
        return echoRound(i, { status: 'done', idleTicks: 0, disks: [] });
      },
      'Finalize cycle': () => ({ status: 'published', checkpointId: 'c', sequence: 1, disks: [] }),
    });
    expect(output.status).toBe('published');
    expect(ticks).toBe(2);
  });

  it('skips the start when another cycle of the plan holds the lock, deleting the snapshots it took', async () => {
    const { run, children } = runner(def);
    const deleted: string[] = [];
    let found: Json | undefined;
    const output = await run(
      { plan: 'p', set: 's', disks: [{ disk: 'root', volumeId: 'vol-0123456789abcdef0' }] },
      'cycle-5',
      {
        'Create source snapshot': snapshotStarted,
        'Describe source snapshots': completed,
        'Prepare cycle': () => {
          throw named('PlanBusyError', 'plan p is busy');
        },
        'Busy: find source snapshots': (i) => {
          found = i;
          return { Snapshots: [{ SnapshotId: 'snap-0bbbbbbbbbbbbbbbb' }] };
        },
        'Busy: delete source snapshot': (i) => {
          deleted.push(i.SnapshotId as string);
          return {};
        },
        'Diff disk': () => {
          throw new Error('diff must not be called');
        },
      },
    );
    expect(output.error).toMatchObject({ Error: 'PlanBusyError' });
    expect(children).toEqual([]);
    // Only snapshots this execution tagged as its own sources are looked up and deleted.
    expect(found?.Filters).toEqual([
      { Name: `tag:${SNAPSHOT_TAG_KEY}`, Values: ['FerryTest'] },
      { Name: 'tag:ferry:role', Values: ['source'] },
      { Name: 'tag:ferry:cycle', Values: ['cycle-5'] },
    ]);
    expect(deleted).toEqual(['snap-0bbbbbbbbbbbbbbbb']);
  });

  it('runs a cycle that fits the parent’s own passes without any child execution', async () => {
    const { run, children, executions } = runner(def);
    let describes = 0;
    let ticks = 0;
    const output = await run(
      { plan: 'p', set: 's', disks: [{ disk: 'root', volumeId: 'vol-0123456789abcdef0' }] },
      'cycle-8',
      {
        'Create source snapshot': snapshotStarted,
        'Describe source snapshots': (i) => {
          describes++;
          return {
            Snapshots: (i.SnapshotIds as string[]).map(() => ({
              State: describes < PARENT_SNAPSHOT_POLLS ? 'pending' : 'completed',
            })),
          };
        },
        'Prepare cycle': prepared,
        'Diff disk': diffed,
        Tick: (i) => {
          ticks++;
          return echoRound(i, { status: ticks < PARENT_TICKS ? 'running' : 'done', idleTicks: 0, disks: [] });
        },
        'Finalize cycle': () => ({ status: 'published', checkpointId: 'c', sequence: 1, disks: [] }),
      },
    );
    expect(output.status).toBe('published');
    expect([describes, ticks]).toEqual([PARENT_SNAPSHOT_POLLS, PARENT_TICKS]);
    expect(children).toEqual([]);
    expect(executions()).toBe(1);
  });

  it('fails before preparing anything when a source snapshot ends in error', async () => {
    const { run } = runner(def);
    let lookedUp = false;
    const result = run(givenDisk, 'cycle-6', {
      'Describe source snapshots': (i) => ({
        Snapshots: (i.SnapshotIds as string[]).map(() => ({ State: 'error' })),
      }),
      'Sources failed: find source snapshots': () => {
        lookedUp = true;
        return { Snapshots: [] };
      },
      'Prepare cycle': () => {
        throw new Error('prepare must not be called');
      },
    });
    await expect(result).rejects.toThrow();
    expect(lookedUp).toBe(true);
  });

  it('aborts when the target snapshots never finish completing', async () => {
    const { run } = runner(def);
    let finalizes = 0;
    let aborted: Json | undefined;
    const result = run(givenDisk, 'cycle-7', {
      'Describe source snapshots': completed,
      'Prepare cycle': prepared,
      'Diff disk': diffed,
      Tick: (i) => echoRound(i, { status: 'done', idleTicks: 0, disks: [] }),
      'Finalize cycle': () => {
        finalizes++;
        return { status: 'completing', pending: ['snap-0ccccccccccccccc'] };
      },
      'Abort cycle': (i) => {
        aborted = i;
        return { status: 'aborted', reason: i.reason };
      },
    });
    await expect(result).rejects.toThrow();
    expect(finalizes).toBe(MAX_FINALIZE_CALLS);
    expect(aborted?.reason).toMatch(/still completing after 240 finalize calls/);
  });
});

describe('bundling', () => {
  it('bundles every handler with esbuild (ESM, source maps) without Docker', () => {
    const app = new App({ context: FLAGS, builtinCloudFormationValidation: false });
    const s = new FerryStack(app, 'FerryBundled', { config: parseFerryConfig({ plans: [] }) });
    const assembly = app.synth();
    const bundles = readdirSync(assembly.directory)
      .filter((name) => name.startsWith('asset.'))
      .map((name) => readdirSync(join(assembly.directory, name)).sort());
    expect(bundles).toEqual(Array.from({ length: 5 }, () => ['index.mjs', 'index.mjs.map']));
    expect(s.node.tryGetContext('aws:cdk:bundling-stacks')).toBeUndefined();
  }, 60_000);
});
