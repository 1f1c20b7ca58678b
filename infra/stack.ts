// FerryStack: everything `cdk deploy` puts into the customer's account for the serverless form —
// the cycle state machine, the grant queue and its dead letters, the state table, the four cycle
// Lambdas, one schedule per protection plan, the checkpoint event bus, KMS keys, alarms and
// least-privilege IAM; and beside it the Recovery state machine with its Lambda.
import { CfnOutput, Duration, RemovalPolicy, Stack, type StackProps, Tags, TimeZone } from 'aws-cdk-lib';
import * as cloudwatch from 'aws-cdk-lib/aws-cloudwatch';
import * as cwActions from 'aws-cdk-lib/aws-cloudwatch-actions';
import * as dynamodb from 'aws-cdk-lib/aws-dynamodb';
import * as events from 'aws-cdk-lib/aws-events';
import * as eventTargets from 'aws-cdk-lib/aws-events-targets';
import * as iam from 'aws-cdk-lib/aws-iam';
import * as kms from 'aws-cdk-lib/aws-kms';
import * as lambdaEvents from 'aws-cdk-lib/aws-lambda-event-sources';
import * as logs from 'aws-cdk-lib/aws-logs';
import * as scheduler from 'aws-cdk-lib/aws-scheduler';
import * as schedulerTargets from 'aws-cdk-lib/aws-scheduler-targets';
import * as sns from 'aws-cdk-lib/aws-sns';
import * as snsSubscriptions from 'aws-cdk-lib/aws-sns-subscriptions';
import * as sqs from 'aws-cdk-lib/aws-sqs';
import { NagSuppressions } from 'cdk-nag';
import type { Construct } from 'constructs';
import {
  planScheduleName,
  RECOVERY_TAGS,
  type RecoveryEnvironment,
} from '../functions/recovery/contracts.ts';
import { TTL_ATTRIBUTE } from '../shared/aws/dynamo/cycle-items.ts';
import { tableDefinition } from '../shared/aws/dynamo/schema.ts';
import { ConfigError } from '../shared/engine/errors.ts';
import { type FerryConfig, type ProtectionPlan, planParams, recoveryDefaults } from './config.ts';
import { CycleStateMachine } from './cycle-state-machine.ts';
import { FerryFunction, type FerryFunctionProps, serviceNameOf } from './function.ts';
import { RecoveryStateMachine, TEARDOWN_FAILED_METRIC } from './recovery-state-machine.ts';
import { TABLE_ACTIONS } from './table-access.ts';

/** The tag key on every snapshot Ferry creates; its value is the stack name. IAM is conditioned on it. */
export const SNAPSHOT_TAG_KEY = 'ferry:deployment';

/** What the finalizer emits per published checkpoint, and the RPO alarm watches. */
export const CHECKPOINT_AGE_METRIC = {
  namespace: 'Ferry',
  metricName: 'CheckpointAgeSeconds',
  /** Powertools Metrics adds `service` (ferry-finalizer) to every metric; `plan` is the finalizer's. */
  serviceDimension: 'service',
  planDimension: 'plan',
} as const;

/** The finalizer's announcement (EventBridge source and detail-type). */
export const CHECKPOINT_EVENT = { source: 'ferry', detailType: 'Ferry Checkpoint Published' } as const;

// Lambda timeouts, each with its reason.
// A tick issues at most MAX_GRANTS_PER_TICK grants and re-grants lost ones: seconds; prepare starts one
// target snapshot per disk (StartSnapshot allows 10/s): well under a minute for 64 disks.
const PLANNER_TIMEOUT = Duration.minutes(5);
// The differ pages ListChangedBlocks until its deadline and is invoked again (resumable).
const DIFFER_TIMEOUT = Duration.minutes(15);
// A batch of up to 10 grants, written at once; the EBS "snapshot does not exist yet" window and
// throttling backoff can take minutes, and the writer hands unfinished grants back before the end.
const WRITER_TIMEOUT = Duration.minutes(5);
// CompleteSnapshot, then waiting for the snapshots to leave `pending` until close to the deadline.
const FINALIZER_TIMEOUT = Duration.minutes(15);
// AWS: an SQS event source's visibility timeout should be at least six times the function timeout,
// so a message is not redelivered while a (retried) invocation still works on it.
const GRANT_VISIBILITY_TIMEOUT = Duration.minutes(WRITER_TIMEOUT.toMinutes() * 6);
// A grant delivered this often without being deleted is poison: the dead-letter queue keeps it and
// the alarm fires. The planner's own attempt limit (MAX_GRANT_ATTEMPTS 5) re-grants the descriptor.
const MAX_RECEIVE_COUNT = 5;
// Grants in a batch per writer invocation; the writer works on WRITER_CONCURRENCY of them at a time.
const WRITER_BATCH_SIZE = 10;

// What DynamoDB needs on the table's customer-managed key for a principal that reads and writes
// items (the same CDK's table grant methods give).
const STATE_KEY_ACTIONS = [
  'kms:Decrypt',
  'kms:DescribeKey',
  'kms:Encrypt',
  'kms:ReEncrypt*',
  'kms:GenerateDataKey*',
] as const;

// The recovery Lambda's actions each take seconds (RegisterImage, RunInstances, describes, deletes);
// five minutes leave room for EC2's throttling backoff on a set of many machines.
const RECOVERY_TIMEOUT = Duration.minutes(5);
// Lambda environment variables are limited to 4 KB in all: RECOVERY_DEFAULTS must fit beside the rest.
const LAMBDA_ENVIRONMENT_BYTES = 4096;
// What the recovery function does on the state table (the catalog and shared/aws/dynamo/
// recovery-records.ts): checkpoints and records (GetItem, Query), the job's report and the plan's
// failed-over mark (PutItem), and a failback's cutover removes that mark (DeleteItem, conditional on
// the failed-back job). It updates nothing.
const RECOVERY_TABLE_ACTIONS = [
  'dynamodb:GetItem',
  'dynamodb:Query',
  'dynamodb:PutItem',
  'dynamodb:DeleteItem',
];

/** What a plan's schedule starts the cycle state machine with (a migration's final cycle too). */
export function planCycleInput(config: FerryConfig, plan: ProtectionPlan): Record<string, unknown> {
  return {
    plan: plan.name,
    set: plan.set ?? plan.name,
    disks: plan.disks.map((d) => ({ disk: d.disk, volumeId: d.volumeId })),
    params: planParams(config, plan),
  };
}

/** cdk-nag's rendering of the snapshot ARN pattern (the region is a token or, with an env, a name). */
const SNAPSHOT_ARN_FINDING =
  '/^Resource::arn:<AWS::Partition>:ec2:(<AWS::Region>|[a-z0-9-]+)::snapshot\\/\\*$/';

export interface FerryStackProps extends StackProps {
  readonly config: FerryConfig;
}

export class FerryStack extends Stack {
  readonly table: dynamodb.Table;
  readonly grantQueue: sqs.Queue;
  readonly deadLetterQueue: sqs.Queue;
  readonly cycle: CycleStateMachine;
  readonly recovery: RecoveryStateMachine;
  /** The recovery Lambda (functions/recovery/handler.ts): every action of the Recovery state machine. */
  readonly recoveryFunction: FerryFunction<'recovery'>;
  readonly functions: {
    readonly planner: FerryFunction<'planner'>;
    readonly differ: FerryFunction<'differ'>;
    readonly chunkWriter: FerryFunction<'chunk-writer'>;
    readonly finalizer: FerryFunction<'finalizer'>;
  };
  readonly eventBus: events.EventBus;
  readonly notifications: sns.Topic;

  constructor(scope: Construct, id: string, props: FerryStackProps) {
    super(scope, id, props);
    const { config } = props;
    const snapshotTag = { key: SNAPSHOT_TAG_KEY, value: this.stackName };
    Tags.of(this).add('ferry:deployment', this.stackName);
    const logRetention = config.logRetentionDays as logs.RetentionDays;

    // ---- keys ------------------------------------------------------------------------------------

    const stateKey = new kms.Key(this, 'StateKey', {
      description: 'Ferry: the state table, the grant queues and the notifications topic',
      enableKeyRotation: true,
      removalPolicy: RemovalPolicy.RETAIN,
    });
    // CloudWatch alarms and EventBridge publish to the encrypted notifications topic.
    stateKey.addToResourcePolicy(
      new iam.PolicyStatement({
        sid: 'AllowAlarmsAndEventsToUseTheNotificationsTopic',
        principals: [
          new iam.ServicePrincipal('cloudwatch.amazonaws.com'),
          new iam.ServicePrincipal('events.amazonaws.com'),
        ],
        actions: ['kms:Decrypt', 'kms:GenerateDataKey'],
        // In a key policy "*" is this key. No aws:SourceAccount condition: not every service puts it
        // on the KMS calls SNS makes for it, and a refused call would silently drop the alarm.
        resources: ['*'],
      }),
    );
    const snapshotKey: kms.IKey =
      config.snapshotKmsKeyArn === undefined
        ? new kms.Key(this, 'SnapshotKey', {
            description: 'Ferry: the target EBS snapshots (recovery checkpoints)',
            enableKeyRotation: true,
            // Deleting the key would make every replicated snapshot unreadable.
            removalPolicy: RemovalPolicy.RETAIN,
          })
        : kms.Key.fromKeyArn(this, 'SnapshotKey', config.snapshotKmsKeyArn);

    // ---- state table (shared/aws/dynamo/schema.ts, mirrored key by key) -----------------------------

    const definition = tableDefinition('ferry');
    const attributeType = (name: string): dynamodb.AttributeType => {
      const type = definition.AttributeDefinitions?.find((a) => a.AttributeName === name)?.AttributeType;
      if (type === 'S') return dynamodb.AttributeType.STRING;
      if (type === 'N') return dynamodb.AttributeType.NUMBER;
      if (type === 'B') return dynamodb.AttributeType.BINARY;
      throw new Error(`schema.ts defines no attribute type for ${name}`);
    };
    const keyOf = (
      schema: { AttributeName?: string | undefined; KeyType?: string | undefined }[] | undefined,
    ) => {
      const hash = schema?.find((k) => k.KeyType === 'HASH')?.AttributeName;
      const range = schema?.find((k) => k.KeyType === 'RANGE')?.AttributeName;
      if (hash === undefined || range === undefined)
        throw new Error('schema.ts keys need a hash and a range key');
      return {
        partitionKey: { name: hash, type: attributeType(hash) },
        sortKey: { name: range, type: attributeType(range) },
      };
    };
    this.table = new dynamodb.Table(this, 'State', {
      ...keyOf(definition.KeySchema),
      billingMode: dynamodb.BillingMode.PAY_PER_REQUEST,
      pointInTimeRecoverySpecification: { pointInTimeRecoveryEnabled: true },
      encryption: dynamodb.TableEncryption.CUSTOMER_MANAGED,
      encryptionKey: stateKey,
      // The checkpoint catalog lives here: a stack deletion must not take it along.
      removalPolicy: RemovalPolicy.RETAIN,
      deletionProtection: true,
      // Descriptor pages, completion batches and writer signals expire by this attribute (epoch seconds).
      timeToLiveAttribute: TTL_ATTRIBUTE,
    });

    // ---- grant queue ---------------------------------------------------------------------------------

    this.deadLetterQueue = new sqs.Queue(this, 'GrantDeadLetters', {
      encryption: sqs.QueueEncryption.KMS,
      encryptionMasterKey: stateKey,
      // Longer than the grant queue's retention (SQS keeps the original enqueue time on redrive).
      retentionPeriod: Duration.days(14),
      enforceSSL: true,
    });
    this.grantQueue = new sqs.Queue(this, 'Grants', {
      encryption: sqs.QueueEncryption.KMS,
      encryptionMasterKey: stateKey,
      // One data key per hour instead of per 5 minutes: far fewer KMS requests per chunk.
      dataKeyReuse: Duration.hours(1),
      visibilityTimeout: GRANT_VISIBILITY_TIMEOUT,
      // A grant unfinished for LEASE_SECONDS has been granted again by the tick; a day is ample.
      retentionPeriod: Duration.days(1),
      deadLetterQueue: { queue: this.deadLetterQueue, maxReceiveCount: MAX_RECEIVE_COUNT },
      enforceSSL: true,
    });

    // ---- events and notifications --------------------------------------------------------------------

    this.notifications = new sns.Topic(this, 'Notifications', {
      displayName: 'Ferry alarms and published checkpoints',
      masterKey: stateKey,
      enforceSSL: true,
    });
    for (const email of config.notifyEmails) {
      this.notifications.addSubscription(new snsSubscriptions.EmailSubscription(email));
    }
    this.eventBus = new events.EventBus(this, 'Events', {
      description: 'Ferry announcements: published recovery checkpoints',
    });
    // A replayable record of every announcement, for audits and for consumers that join later.
    this.eventBus.archive('Announcements', {
      description: 'Every Ferry announcement, a year back',
      eventPattern: { source: [CHECKPOINT_EVENT.source] },
      retention: Duration.days(365),
    });
    new events.Rule(this, 'CheckpointPublished', {
      eventBus: this.eventBus,
      description: 'Tell the operators a recovery checkpoint was published',
      eventPattern: { source: [CHECKPOINT_EVENT.source], detailType: [CHECKPOINT_EVENT.detailType] },
      targets: [new eventTargets.SnsTopic(this.notifications)],
    });

    // ---- functions -------------------------------------------------------------------------------------

    const house = {
      POWERTOOLS_METRICS_NAMESPACE: CHECKPOINT_AGE_METRIC.namespace,
      POWERTOOLS_LOG_LEVEL: 'INFO',
    };
    const nodeBudget = String(config.nodeBudget);
    const planner = new FerryFunction(this, 'Planner', {
      name: 'planner',
      description:
        'Ferry planner: prepares cycles, shares the node budget, grants per disk window, re-grants lost grants',
      environment: {
        TABLE_NAME: this.table.tableName,
        QUEUE_URL: this.grantQueue.queueUrl,
        NODE_BUDGET: nodeBudget,
        KMS_KEY_ARN: snapshotKey.keyArn,
        // The target snapshots must carry the tag StartSnapshot is allowed with (see IAM below).
        SNAPSHOT_TAG_KEY: snapshotTag.key,
        SNAPSHOT_TAG_VALUE: snapshotTag.value,
      },
      house,
      memorySize: 512,
      timeout: PLANNER_TIMEOUT,
      logRetention,
    });
    const differ = new FerryFunction(this, 'Differ', {
      name: 'differ',
      description: 'Ferry differ: lists changed EBS blocks of a source snapshot and stores descriptors',
      environment: { TABLE_NAME: this.table.tableName },
      house,
      memorySize: 1024,
      timeout: DIFFER_TIMEOUT,
      logRetention,
    });
    const chunkWriter = new FerryFunction(this, 'ChunkWriter', {
      name: 'chunk-writer',
      description: 'Ferry chunk-writer: reads, verifies and writes granted chunks, tops windows up',
      environment: { TABLE_NAME: this.table.tableName, QUEUE_URL: this.grantQueue.queueUrl },
      house,
      // Chunks are buffered whole (1 MiB x WRITER_CONCURRENCY, the whole batch) and Lambda network
      // bandwidth grows with memory.
      memorySize: 1024,
      timeout: WRITER_TIMEOUT,
      logRetention,
    });
    const finalizer = new FerryFunction(this, 'Finalizer', {
      name: 'finalizer',
      description: 'Ferry finalizer: validates disks, completes snapshots, publishes the checkpoint',
      environment: { TABLE_NAME: this.table.tableName, EVENT_BUS_NAME: this.eventBus.eventBusName },
      house,
      memorySize: 512,
      timeout: FINALIZER_TIMEOUT,
      logRetention,
    });
    this.functions = { planner, differ, chunkWriter, finalizer };

    chunkWriter.fn.addEventSource(
      new lambdaEvents.SqsEventSource(this.grantQueue, {
        batchSize: WRITER_BATCH_SIZE,
        reportBatchItemFailures: true,
        maxConcurrency: config.writerConcurrency,
      }),
    );

    // ---- IAM: data -------------------------------------------------------------------------------------

    // Each function the table operations it makes (table-access.ts), on the table only: nothing
    // queries an index. On the table's key, what CDK's table grants give a reader and writer.
    for (const [f, actions] of [
      [planner, TABLE_ACTIONS.planner],
      [differ, TABLE_ACTIONS.differ],
      [chunkWriter, TABLE_ACTIONS['chunk-writer']],
      [finalizer, TABLE_ACTIONS.finalizer],
    ] as const) {
      f.role.addToPrincipalPolicy(
        new iam.PolicyStatement({
          sid: 'StateTable',
          actions: [...actions],
          resources: [this.table.tableArn],
        }),
      );
      stateKey.grant(f.role, ...STATE_KEY_ACTIONS);
    }
    // The planner issues grants; writers issue the ACK-clocked top-ups (consuming is the event source's).
    this.grantQueue.grantSendMessages(planner.role);
    this.grantQueue.grantSendMessages(chunkWriter.role);
    this.eventBus.grantPutEventsTo(finalizer.role);

    // ---- IAM: EBS direct APIs, scoped to snapshots carrying this deployment's tag -------------------------

    const anySnapshot = this.formatArn({
      service: 'ec2',
      account: '',
      resource: 'snapshot',
      resourceName: '*',
    });
    const taggedSnapshots = { StringEquals: { [`aws:ResourceTag/${snapshotTag.key}`]: snapshotTag.value } };
    // StartSnapshot supports aws:RequestTag (the new snapshot has no tags yet to check against).
    planner.role.addToPrincipalPolicy(
      new iam.PolicyStatement({
        sid: 'StartTaggedTargetSnapshots',
        actions: ['ebs:StartSnapshot'],
        resources: [anySnapshot],
        conditions: { StringEquals: { [`aws:RequestTag/${snapshotTag.key}`]: snapshotTag.value } },
      }),
    );
    // StartSnapshot with Tags also authorizes ec2:CreateTags on the new snapshot: only Ferry's keys,
    // and only with this deployment's tag in the request.
    planner.role.addToPrincipalPolicy(
      new iam.PolicyStatement({
        sid: 'TagTargetSnapshotsOnStart',
        actions: ['ec2:CreateTags'],
        resources: [anySnapshot],
        conditions: {
          StringEquals: { [`aws:RequestTag/${snapshotTag.key}`]: snapshotTag.value },
          'ForAllValues:StringLike': { 'aws:TagKeys': ['ferry:*'] },
        },
      }),
    );
    differ.role.addToPrincipalPolicy(
      new iam.PolicyStatement({
        sid: 'ListTaggedSourceSnapshots',
        actions: ['ebs:ListChangedBlocks', 'ebs:ListSnapshotBlocks'],
        resources: [anySnapshot],
        conditions: taggedSnapshots,
      }),
    );
    chunkWriter.role.addToPrincipalPolicy(
      new iam.PolicyStatement({
        sid: 'ReadSourceWriteTargetSnapshots',
        actions: ['ebs:GetSnapshotBlock', 'ebs:PutSnapshotBlock'],
        resources: [anySnapshot],
        conditions: taggedSnapshots,
      }),
    );
    finalizer.role.addToPrincipalPolicy(
      new iam.PolicyStatement({
        sid: 'CompleteTaggedTargetSnapshots',
        actions: ['ebs:CompleteSnapshot'],
        resources: [anySnapshot],
        conditions: taggedSnapshots,
      }),
    );
    // A snapshot's state (pending/completed/error) is only visible through EC2.
    finalizer.role.addToPrincipalPolicy(
      new iam.PolicyStatement({
        sid: 'DescribeSnapshots',
        actions: ['ec2:DescribeSnapshots'],
        resources: ['*'],
      }),
    );

    // ---- IAM: KMS for encrypted snapshots (the EBS direct API guide's key permissions) -----------------

    // Writing or completing a snapshot encrypted with the target key.
    for (const f of [planner, chunkWriter, finalizer]) {
      snapshotKey.grant(
        f.role,
        'kms:Encrypt',
        'kms:Decrypt',
        'kms:GenerateDataKey',
        'kms:GenerateDataKeyWithoutPlaintext',
        'kms:ReEncryptFrom',
        'kms:ReEncryptTo',
        'kms:DescribeKey',
      );
      f.role.addToPrincipalPolicy(
        new iam.PolicyStatement({
          sid: 'LetEbsUseTheSnapshotKey',
          actions: ['kms:CreateGrant'],
          resources: [snapshotKey.keyArn],
          conditions: { Bool: { 'kms:GrantIsForAWSResource': 'true' } },
        }),
      );
    }
    // Reading source snapshots encrypted with customer-managed keys (aws/ebs needs no IAM grant).
    if (config.sourceKmsKeyArns.length > 0) {
      for (const f of [differ, chunkWriter]) {
        f.role.addToPrincipalPolicy(
          new iam.PolicyStatement({
            sid: 'ReadEncryptedSources',
            actions: ['kms:Decrypt', 'kms:DescribeKey'],
            resources: config.sourceKmsKeyArns,
          }),
        );
        f.role.addToPrincipalPolicy(
          new iam.PolicyStatement({
            sid: 'LetEbsUseTheSourceKeys',
            actions: ['kms:CreateGrant'],
            resources: config.sourceKmsKeyArns,
            conditions: { Bool: { 'kms:GrantIsForAWSResource': 'true' } },
          }),
        );
      }
    }

    // ---- the cycle state machine ---------------------------------------------------------------------

    const stateMachineLogs = new logs.LogGroup(this, 'CycleLogs', {
      // Step Functions vended logs must go to a group under /aws/vendedlogs/ (resource policy size).
      logGroupName: `/aws/vendedlogs/states/${this.stackName}-cycle`,
      retention: logRetention,
      removalPolicy: RemovalPolicy.RETAIN,
    });
    const volumeIds = [...new Set(config.plans.flatMap((p) => p.disks.map((d) => d.volumeId)))];
    this.cycle = new CycleStateMachine(this, 'Cycle', {
      stateMachineName: `${this.stackName}-cycle`,
      planner: planner.fn,
      differ: differ.fn,
      finalizer: finalizer.fn,
      snapshotTag,
      sourceVolumeIds: volumeIds,
      logGroup: stateMachineLogs,
    });

    // ---- schedules: one per protection plan ---------------------------------------------------------

    const scheduleGroupName = `${this.stackName}-plans`;
    const scheduleGroup = new scheduler.ScheduleGroup(this, 'Schedules', { scheduleGroupName });
    // One role for every plan's schedule, so a failover's pause (which rewrites the schedule with its
    // role) can be allowed to pass exactly this role and no other.
    const scheduleRole = new iam.Role(this, 'ScheduleRole', {
      assumedBy: new iam.ServicePrincipal('scheduler.amazonaws.com', {
        conditions: { StringEquals: { 'aws:SourceAccount': this.account } },
      }),
      description: 'Ferry: EventBridge Scheduler starts the cycle state machine for each plan',
    });
    for (const plan of config.plans) {
      new scheduler.Schedule(this, `Plan-${plan.name}`, {
        // Named after the plan: the recovery function pauses a plan's schedule by this name.
        scheduleName: planScheduleName(plan.name),
        description: `Ferry protection plan ${plan.name}: RPO ${plan.rpoMinutes} minutes`,
        scheduleGroup,
        schedule: scheduler.ScheduleExpression.expression(plan.schedule, TimeZone.of(plan.timezone)),
        // OFF: a cycle starts at the scheduled minute, not somewhere in a window that eats the RPO.
        // Overlap is prevented by the planner's per-plan lock, not by the schedule.
        timeWindow: scheduler.TimeWindow.off(),
        enabled: plan.enabled,
        target: new schedulerTargets.StepFunctionsStartExecution(this.cycle.stateMachine, {
          role: scheduleRole,
          input: scheduler.ScheduleTargetInput.fromObject(planCycleInput(config, plan)),
          // A start that fails for minutes is superseded by the next scheduled one.
          retryAttempts: 3,
          maxEventAge: Duration.minutes(5),
        }),
      });
    }

    // ---- recovery: the Lambda, its least-privilege role, the Recovery state machine -------------------

    this.recoveryFunction = this.recoveryLambda(config, {
      snapshotKey,
      stateKey,
      snapshotTag,
      scheduleGroupName,
      scheduleRole,
      logRetention,
      house,
    });
    this.recovery = new RecoveryStateMachine(this, 'Recovery', {
      stateMachineName: `${this.stackName}-recovery`,
      recovery: this.recoveryFunction.fn,
      cycle: this.cycle.stateMachine,
      plans: config.plans.map((plan) => ({ plan: plan.name, cycleInput: planCycleInput(config, plan) })),
      logGroup: new logs.LogGroup(this, 'RecoveryLogs', {
        logGroupName: `/aws/vendedlogs/states/${this.stackName}-recovery`,
        retention: logRetention,
        removalPolicy: RemovalPolicy.RETAIN,
      }),
    });

    // ---- alarms ---------------------------------------------------------------------------------------

    const notify = new cwActions.SnsAction(this.notifications);
    const deadLetters = new cloudwatch.Alarm(this, 'DeadLetterGrants', {
      alarmDescription:
        'Grants reached the dead-letter queue: a chunk failed repeatedly. Inspect and redrive.',
      metric: this.deadLetterQueue.metricApproximateNumberOfMessagesVisible({
        period: Duration.minutes(1),
        statistic: 'Maximum',
      }),
      threshold: 0,
      comparisonOperator: cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
      evaluationPeriods: 1,
      treatMissingData: cloudwatch.TreatMissingData.NOT_BREACHING,
    });
    deadLetters.addAlarmAction(notify);
    const failedCycles = new cloudwatch.Alarm(this, 'FailedCycles', {
      alarmDescription: 'A replication cycle failed or was aborted; the last good checkpoint stays current.',
      metric: this.cycle.stateMachine.metricFailed({ period: Duration.minutes(5), statistic: 'Sum' }),
      threshold: 0,
      comparisonOperator: cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
      evaluationPeriods: 1,
      treatMissingData: cloudwatch.TreatMissingData.NOT_BREACHING,
    });
    failedCycles.addAlarmAction(notify);
    // A drill (or a cleanup) whose teardown could not be verified leaves machines running and costing:
    // the Recovery state machine emits one data point per such teardown before it fails.
    const teardownFailed = new cloudwatch.Alarm(this, 'RecoveryTeardownFailed', {
      alarmDescription:
        'A recovery teardown could not be verified: instances, volumes, images or snapshots of a recovery job may remain. See the Recovery execution and run a cleanup for its job.',
      metric: new cloudwatch.Metric({
        namespace: TEARDOWN_FAILED_METRIC.namespace,
        metricName: TEARDOWN_FAILED_METRIC.metricName,
        dimensionsMap: { [TEARDOWN_FAILED_METRIC.dimension]: `${this.stackName}-recovery` },
        statistic: 'Sum',
        period: Duration.minutes(5),
      }),
      threshold: 0,
      comparisonOperator: cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
      evaluationPeriods: 1,
      treatMissingData: cloudwatch.TreatMissingData.NOT_BREACHING,
    });
    teardownFailed.addAlarmAction(notify);
    for (const plan of config.plans) {
      // One period of exactly the RPO: no checkpoint published in it (missing data) or one whose
      // data is older than the RPO both breach.
      const rpo = new cloudwatch.Alarm(this, `Rpo-${plan.name}`, {
        alarmDescription: `Protection plan ${plan.name} missed its RPO of ${plan.rpoMinutes} minutes.`,
        metric: new cloudwatch.Metric({
          namespace: CHECKPOINT_AGE_METRIC.namespace,
          metricName: CHECKPOINT_AGE_METRIC.metricName,
          dimensionsMap: {
            [CHECKPOINT_AGE_METRIC.serviceDimension]: serviceNameOf('finalizer'),
            [CHECKPOINT_AGE_METRIC.planDimension]: plan.name,
          },
          statistic: 'Maximum',
          period: Duration.minutes(plan.rpoMinutes),
        }),
        threshold: plan.rpoMinutes * 60,
        comparisonOperator: cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
        evaluationPeriods: 1,
        treatMissingData: cloudwatch.TreatMissingData.BREACHING,
        // A disabled plan publishes nothing: its alarm exists but does not notify.
        actionsEnabled: plan.enabled,
      });
      rpo.addAlarmAction(notify);
      rpo.addOkAction(notify);
    }

    // ---- outputs: what an operator needs to start a cycle by hand and to watch one ---------------------

    new CfnOutput(this, 'CycleStateMachineArn', {
      description: 'aws stepfunctions start-execution --state-machine-arn <this> (see infra/README.md)',
      value: this.cycle.stateMachine.stateMachineArn,
    });
    new CfnOutput(this, 'RecoveryStateMachineArn', {
      description: 'ferry recover --cloud, or the Step Functions console (inputs in infra/README.md)',
      value: this.recovery.stateMachine.stateMachineArn,
    });
    new CfnOutput(this, 'StateTableName', { value: this.table.tableName });
    new CfnOutput(this, 'GrantQueueUrl', { value: this.grantQueue.queueUrl });
    new CfnOutput(this, 'DeadLetterQueueUrl', { value: this.deadLetterQueue.queueUrl });
    new CfnOutput(this, 'EventBusName', { value: this.eventBus.eventBusName });
    new CfnOutput(this, 'NotificationsTopicArn', { value: this.notifications.topicArn });
    new CfnOutput(this, 'SnapshotKeyArn', { value: snapshotKey.keyArn });

    this.suppressNagFindings();
  }

  /**
   * The recovery Lambda and its role. EC2 creation is allowed only with the recovery-job tag in the
   * request, termination and deletion only on resources carrying it, reads of the replica's
   * snapshots only on snapshots carrying this deployment's tag; the plans' schedules may be paused
   * (and only their role passed back); the snapshot key may be used only through EC2.
   */
  private recoveryLambda(
    config: FerryConfig,
    parts: {
      snapshotKey: kms.IKey;
      stateKey: kms.IKey;
      snapshotTag: { key: string; value: string };
      scheduleGroupName: string;
      scheduleRole: iam.IRole;
      logRetention: logs.RetentionDays;
      house: FerryFunctionProps<'recovery'>['house'];
    },
  ): FerryFunction<'recovery'> {
    const environment: RecoveryEnvironment = {
      TABLE_NAME: this.table.tableName,
      RECOVERY_DEFAULTS: JSON.stringify(recoveryDefaults(config)),
      RECOVERY_KMS_KEY_ARN: parts.snapshotKey.keyArn,
      SCHEDULE_GROUP: parts.scheduleGroupName,
    };
    const bytes = Buffer.byteLength(environment.RECOVERY_DEFAULTS ?? '');
    if (bytes > LAMBDA_ENVIRONMENT_BYTES - 1024) {
      throw new ConfigError(
        `plans[].recovery: the plans' recovery defaults take ${bytes} bytes as JSON; Lambda allows 4 KB of environment in all (keep them under 3 KB: fewer tags or machines per plan)`,
        { setting: 'plans[].recovery' },
      );
    }
    const fn = new FerryFunction(this, 'RecoveryLambda', {
      name: 'recovery',
      description: 'Ferry recovery: resolves a checkpoint, launches, checks, pauses, tears down, records',
      environment,
      house: parts.house,
      memorySize: 512,
      timeout: RECOVERY_TIMEOUT,
      logRetention: parts.logRetention,
    });
    const role = fn.role;
    const arn = (resource: string, account = this.account) =>
      this.formatArn({ service: 'ec2', account, resource, resourceName: '*' });
    const instances = arn('instance');
    const volumes = arn('volume');
    const images = arn('image', '');
    const snapshots = arn('snapshot', '');
    const job = RECOVERY_TAGS.job;
    const jobInRequest = { StringLike: { [`aws:RequestTag/${job}`]: '?*' } };
    const jobOnResource = { StringLike: { [`aws:ResourceTag/${job}`]: '?*' } };
    const replica = {
      StringEquals: { [`aws:ResourceTag/${parts.snapshotTag.key}`]: parts.snapshotTag.value },
    };
    const allow = (
      sid: string,
      actions: string[],
      resources: string[],
      conditions?: Record<string, unknown>,
    ) => role.addToPrincipalPolicy(new iam.PolicyStatement({ sid, actions, resources, conditions }));

    allow('StateTable', RECOVERY_TABLE_ACTIONS, [this.table.tableArn]);
    parts.stateKey.grant(role, ...STATE_KEY_ACTIONS);
    // Describe calls support no resource-level permissions.
    allow(
      'Describe',
      [
        'ec2:DescribeSnapshots',
        'ec2:DescribeImages',
        'ec2:DescribeInstances',
        'ec2:DescribeInstanceStatus',
        'ec2:DescribeVolumes',
        'ec2:DescribeSubnets',
        'ec2:DescribeSecurityGroups',
        'ec2:DescribeInstanceTypes',
      ],
      ['*'],
    );
    // Images, instances and volumes are created only with the job's tag in the request ...
    allow('RegisterTaggedImages', ['ec2:RegisterImage'], [images], jobInRequest);
    allow('LaunchTaggedInstances', ['ec2:RunInstances'], [instances, volumes], jobInRequest);
    allow('CreateTaggedVolumes', ['ec2:CreateVolume'], [volumes], jobInRequest);
    // ... from the replica's snapshots only (the target snapshots carry this deployment's tag) ...
    allow(
      'FromReplicaSnapshots',
      ['ec2:RegisterImage', 'ec2:RunInstances', 'ec2:CreateVolume'],
      [snapshots],
      replica,
    );
    // ... and instances only from images a recovery job registered, into the account's subnets.
    allow('LaunchFromJobImages', ['ec2:RunInstances'], [images], jobOnResource);
    allow(
      'LaunchIntoSubnets',
      ['ec2:RunInstances'],
      [arn('subnet'), arn('security-group'), arn('network-interface')],
    );
    allow('TagOnCreate', ['ec2:CreateTags'], [instances, volumes, images, arn('network-interface')], {
      ...jobInRequest,
      StringEquals: { 'ec2:CreateAction': ['RunInstances', 'CreateVolume', 'RegisterImage'] },
    });
    // The EC2 adapter tags a registered image again (emulators drop RegisterImage's tags): only an
    // image that already carries a job's tag, with a job tag in the request.
    allow('RetagJobImages', ['ec2:CreateTags'], [images], {
      StringLike: { ...jobInRequest.StringLike, ...jobOnResource.StringLike },
    });
    // Health: the console output of a job's own instances (a machine's bootMessage).
    allow('ReadJobConsoles', ['ec2:GetConsoleOutput'], [instances], jobOnResource);
    // Teardown: only what carries a recovery job's tag. The replica's snapshots never do.
    allow('TerminateJobInstances', ['ec2:TerminateInstances'], [instances], jobOnResource);
    allow('DeregisterJobImages', ['ec2:DeregisterImage'], [images], jobOnResource);
    allow('DeleteJobVolumes', ['ec2:DeleteVolume'], [volumes], jobOnResource);
    allow('DeleteJobSnapshots', ['ec2:DeleteSnapshot'], [snapshots], jobOnResource);
    // Volumes from the replica's (encrypted) snapshots, encrypted with the snapshot key: through EC2 only.
    const viaEc2 = { StringEquals: { 'kms:ViaService': `ec2.${this.region}.amazonaws.com` } };
    allow(
      'SnapshotKeyThroughEc2',
      [
        'kms:Decrypt',
        'kms:DescribeKey',
        'kms:GenerateDataKeyWithoutPlaintext',
        'kms:ReEncryptFrom',
        'kms:ReEncryptTo',
      ],
      [parts.snapshotKey.keyArn],
      viaEc2,
    );
    allow('LetEbsUseTheSnapshotKey', ['kms:CreateGrant'], [parts.snapshotKey.keyArn], {
      ...viaEc2,
      Bool: { 'kms:GrantIsForAWSResource': 'true' },
    });
    // Failover and migration pause the plan's schedule: read it, write it back disabled, with its role.
    allow(
      'PausePlanSchedules',
      ['scheduler:GetSchedule', 'scheduler:UpdateSchedule'],
      [
        this.formatArn({
          service: 'scheduler',
          resource: 'schedule',
          resourceName: `${parts.scheduleGroupName}/*`,
        }),
      ],
    );
    allow('PassScheduleRole', ['iam:PassRole'], [parts.scheduleRole.roleArn], {
      StringEquals: { 'iam:PassedToService': 'scheduler.amazonaws.com' },
    });
    return fn;
  }

  /** cdk-nag AwsSolutions findings that are deliberate, each with the reason it is acceptable. */
  private suppressNagFindings(): void {
    const { planner, differ, chunkWriter, finalizer } = this.functions;
    for (const f of [planner, differ, chunkWriter, finalizer]) {
      NagSuppressions.addResourceSuppressions(
        f.fn,
        [
          {
            id: 'AwsSolutions-L1',
            reason:
              'Ferry pins Lambda to Node.js 22 (a supported LTS runtime), the runtime its handlers are built and tested for; moving to a newer one is a deliberate upgrade.',
          },
        ],
        true,
      );
      NagSuppressions.addResourceSuppressions(
        f.role,
        [
          {
            id: 'AwsSolutions-IAM5',
            reason:
              f === finalizer
                ? 'X-Ray PutTraceSegments/PutTelemetryRecords and ec2:DescribeSnapshots support no resource-level permissions and require Resource "*".'
                : 'X-Ray PutTraceSegments/PutTelemetryRecords support no resource-level permissions and require Resource "*".',
            appliesTo: ['Resource::*'],
          },
          {
            id: 'AwsSolutions-IAM5',
            reason:
              "KMS GenerateDataKey*/ReEncrypt* are what SQS and DynamoDB need on this stack's own key only (the state table's and the grant queue's).",
            appliesTo: ['Action::kms:GenerateDataKey*', 'Action::kms:ReEncrypt*'],
          },
          {
            id: 'AwsSolutions-IAM5',
            reason:
              "Snapshot ids are created at run time, so the EBS direct API (and tag-on-create) statements use the snapshot ARN pattern, each conditioned on this deployment's ferry:deployment tag.",
            appliesTo: [{ regex: SNAPSHOT_ARN_FINDING }],
          },
        ],
        true,
      );
    }
    NagSuppressions.addResourceSuppressions(
      this.recoveryFunction.fn,
      [
        {
          id: 'AwsSolutions-L1',
          reason:
            'Ferry pins Lambda to Node.js 22 (a supported LTS runtime), the runtime its handlers are built and tested for; moving to a newer one is a deliberate upgrade.',
        },
      ],
      true,
    );
    NagSuppressions.addResourceSuppressions(
      this.recoveryFunction.role,
      [
        {
          id: 'AwsSolutions-IAM5',
          reason:
            'EC2 Describe* calls and X-Ray PutTraceSegments/PutTelemetryRecords support no resource-level permissions and require Resource "*".',
          appliesTo: ['Resource::*'],
        },
        {
          id: 'AwsSolutions-IAM5',
          reason:
            "KMS GenerateDataKey*/ReEncrypt* are what DynamoDB needs on this stack's own state-table key only.",
          appliesTo: ['Action::kms:GenerateDataKey*', 'Action::kms:ReEncrypt*'],
        },
        {
          id: 'AwsSolutions-IAM5',
          reason:
            "Images, instances, volumes and network interfaces of a recovery job are created at run time: creation is allowed only with the ferry:recovery-job tag in the request, teardown only on resources carrying it, and snapshots only when they carry this deployment's ferry:deployment tag (the replica).",
          appliesTo: [
            {
              regex:
                '/^Resource::arn:<AWS::Partition>:ec2:(<AWS::Region>|[a-z0-9-]+)::(image|snapshot)\\/\\*$/',
            },
            {
              regex:
                '/^Resource::arn:<AWS::Partition>:ec2:(<AWS::Region>|[a-z0-9-]+):(<AWS::AccountId>|\\d{12}):(instance|volume|network-interface)\\/\\*$/',
            },
          ],
        },
        {
          id: 'AwsSolutions-IAM5',
          reason:
            "RunInstances names the subnet and security groups of the operator's choosing (the plan's recovery settings or the request), validated by resolve before any launch; they are in this account and region only.",
          appliesTo: [
            {
              regex:
                '/^Resource::arn:<AWS::Partition>:ec2:(<AWS::Region>|[a-z0-9-]+):(<AWS::AccountId>|\\d{12}):(subnet|security-group)\\/\\*$/',
            },
          ],
        },
        {
          id: 'AwsSolutions-IAM5',
          reason:
            "Pausing a plan reads and updates the plans' schedules of this stack's schedule group only.",
          appliesTo: [
            {
              regex: `/^Resource::arn:<AWS::Partition>:scheduler:(<AWS::Region>|[a-z0-9-]+):(<AWS::AccountId>|\\d{12}):schedule\\/${this.stackName}-plans\\/\\*$/`,
            },
          ],
        },
      ],
      true,
    );
    NagSuppressions.addResourceSuppressions(
      this.recovery.stateMachine,
      [
        {
          id: 'AwsSolutions-IAM5',
          reason:
            'Step Functions log delivery and X-Ray actions, and cloudwatch:PutMetricData (conditioned on the Ferry namespace), support no resource-level permissions and require Resource "*".',
          appliesTo: ['Resource::*'],
        },
        {
          id: 'AwsSolutions-IAM5',
          reason:
            'Lambda invoke grants cover the versions and aliases of the recovery function only (its ARN followed by ":*").',
          appliesTo: [{ regex: '/^Resource::<RecoveryLambdaFunction[A-Za-z0-9]+\\.Arn>:\\*$/' }],
        },
        {
          id: 'AwsSolutions-IAM5',
          reason:
            "Waiting for a migration's final cycle (.sync) needs Describe/StopExecution on executions of the cycle state machine, whose names are generated at run time.",
          appliesTo: [{ regex: '/^Resource::arn:<AWS::Partition>:states:.*:execution:.*\\*$/' }],
        },
      ],
      true,
    );
    NagSuppressions.addResourceSuppressions(
      this.cycle.stateMachine,
      [
        {
          id: 'AwsSolutions-IAM5',
          reason:
            'Step Functions log delivery and X-Ray actions, and ec2:DescribeSnapshots, support no resource-level permissions and require Resource "*".',
          appliesTo: ['Resource::*'],
        },
        {
          id: 'AwsSolutions-IAM5',
          reason:
            'Lambda invoke grants cover the versions and aliases of the four Ferry functions only (function ARN followed by ":*").',
          appliesTo: [{ regex: '/^Resource::<(Planner|Differ|Finalizer)Function[A-Za-z0-9]+\\.Arn>:\\*$/' }],
        },
        {
          id: 'AwsSolutions-IAM5',
          reason:
            'Source snapshots are created at run time, so CreateSnapshot/CreateTags use the snapshot ARN pattern, conditioned on the ferry:deployment request tag.',
          appliesTo: [{ regex: SNAPSHOT_ARN_FINDING }],
        },
        {
          id: 'AwsSolutions-IAM5',
          reason:
            "A failback's reverse plan snapshots the volumes a failover or migration created at run time: CreateSnapshot on any volume only when it carries ferry:recovery-mode failover or migration.",
          appliesTo: [
            {
              regex:
                '/^Resource::arn:<AWS::Partition>:ec2:(<AWS::Region>|[a-z0-9-]+):(<AWS::AccountId>|\\d{12}):volume\\/\\*$/',
            },
          ],
        },
        {
          id: 'AwsSolutions-IAM5',
          reason:
            'Waiting for a child execution (.sync) needs Describe/StopExecution on executions of this state machine, whose names are generated at run time.',
          appliesTo: [
            {
              regex: `/^Resource::arn:<AWS::Partition>:states:(<AWS::Region>|[a-z0-9-]+):(<AWS::AccountId>|\\d{12}):execution:${this.stackName}-cycle\\*$/`,
            },
          ],
        },
      ],
      true,
    );
  }
}
