// The replication cycle state machine (Standard, JSONPath): snapshot the sources, prepare, diff,
// replicate (planner ticks), finalize, or abort. Long loops run in bounded child executions of this
// same state machine so no history can reach the 25,000-event limit (see history-budget.ts); chunks
// never pass through it (they flow SQS -> chunk-writer).
import { ArnFormat, Aws, Duration, Stack } from 'aws-cdk-lib';
import * as iam from 'aws-cdk-lib/aws-iam';
import type * as lambda from 'aws-cdk-lib/aws-lambda';
import type * as logs from 'aws-cdk-lib/aws-logs';
import * as sfn from 'aws-cdk-lib/aws-stepfunctions';
import * as tasks from 'aws-cdk-lib/aws-stepfunctions-tasks';
import { Construct } from 'constructs';
import {
  DIFF_CONCURRENCY,
  EC2_RETRIES,
  FINALIZE_POLL_SECONDS,
  HANDLER_RETRIES,
  LAMBDA_SERVICE_RETRIES,
  MAX_DIFF_CALLS_PER_CHILD,
  MAX_FINALIZE_CALLS,
  MAX_ROUNDS_PER_CYCLE,
  MAX_SNAPSHOT_POLLS_PER_CHILD,
  MAX_TICKS_PER_CHILD,
  SNAPSHOT_POLL_SECONDS,
  START_CHILD_RETRIES,
  TICK_WAIT_SECONDS,
} from './history-budget.ts';

/** The `child` values a child execution is started with; anything else starts a cycle. */
export const CHILD_KINDS = {
  awaitSnapshots: 'await-snapshots',
  diff: 'diff',
  replicate: 'replicate',
} as const;

/**
 * Errors the handlers throw (shared/engine/cycle/errors.ts names, and functions/contracts.ts's
 * EventValidationError) that retrying cannot fix: they go straight to the Catch. The engine's
 * ConfigError (a plan's parameters refused), ChangeMapError (a change map that cannot be cut into
 * descriptors) and IntegrityError (data that does not match its checksum or descriptor) give the
 * same answer however often they are asked.
 */
export const PERMANENT_ERRORS = [
  'EventValidationError',
  'ConfigError',
  'ChangeMapError',
  'IntegrityError',
  'PlanBusyError',
  'PlanLockLostError',
  'CycleStateError',
  'CycleFailedError',
];

const LAMBDA_SERVICE_ERRORS = [
  'Lambda.ServiceException',
  'Lambda.AWSLambdaException',
  'Lambda.SdkClientException',
  'Lambda.TooManyRequestsException',
  'Lambda.ClientExecutionTimeoutException',
];

export interface SnapshotTag {
  readonly key: string;
  readonly value: string;
}

export interface CycleStateMachineProps {
  readonly stateMachineName: string;
  readonly planner: lambda.IFunction;
  readonly differ: lambda.IFunction;
  readonly finalizer: lambda.IFunction;
  /** The tag every snapshot Ferry creates carries; IAM on snapshots is conditioned on it. */
  readonly snapshotTag: SnapshotTag;
  /** The EBS volumes the configured plans snapshot (CreateSnapshot is allowed on these only). */
  readonly sourceVolumeIds: readonly string[];
  readonly logGroup: logs.ILogGroup;
}

export class CycleStateMachine extends Construct {
  readonly stateMachine: sfn.StateMachine;

  constructor(scope: Construct, id: string, props: CycleStateMachineProps) {
    super(scope, id);
    const stack = Stack.of(this);
    // The state machine starts children of itself. Its ARN is built from its name, not referenced,
    // so the definition and the role's policy do not depend on the resource they belong to.
    const selfArn = stack.formatArn({
      service: 'states',
      resource: 'stateMachine',
      resourceName: props.stateMachineName,
      arnFormat: ArnFormat.COLON_RESOURCE_NAME,
    });
    const self = sfn.StateMachine.fromStateMachineArn(this, 'Self', selfArn);

    // ---- helpers ---------------------------------------------------------------------------------

    /** A Lambda task whose payload is the function's input (payloadResponseOnly: no envelope). */
    const invoke = (
      name: string,
      fn: lambda.IFunction,
      payload: Record<string, unknown>,
      resultPath: string,
    ) => {
      const task = new tasks.LambdaInvoke(this, name, {
        lambdaFunction: fn,
        payload: sfn.TaskInput.fromObject(payload),
        payloadResponseOnly: true,
        retryOnServiceExceptions: false,
        resultPath,
      });
      // Retriers are tried in order: permanent errors first, so States.TaskFailed cannot match them.
      task.addRetry({ errors: PERMANENT_ERRORS, maxAttempts: 0 });
      task.addRetry({
        errors: LAMBDA_SERVICE_ERRORS,
        interval: Duration.seconds(2),
        maxAttempts: LAMBDA_SERVICE_RETRIES,
        backoffRate: 2,
        jitterStrategy: sfn.JitterType.FULL,
      });
      // Every handler is idempotent for its input, so an unknown error is retried a little.
      task.addRetry({
        errors: ['States.TaskFailed'],
        interval: Duration.seconds(5),
        maxAttempts: HANDLER_RETRIES,
        backoffRate: 3,
        jitterStrategy: sfn.JitterType.FULL,
      });
      return task;
    };

    /** An EC2 call through the AWS SDK integration; IAM for it is written by hand below. */
    const ec2Call = (name: string, action: string, json: Record<string, unknown>) => {
      const state = new sfn.CustomState(this, name, {
        stateJson: { Type: 'Task', Resource: `arn:${Aws.PARTITION}:states:::aws-sdk:ec2:${action}`, ...json },
      });
      state.addRetry({
        errors: ['States.TaskFailed'],
        interval: Duration.seconds(5),
        maxAttempts: EC2_RETRIES,
        backoffRate: 2,
        jitterStrategy: sfn.JitterType.FULL,
      });
      return state;
    };

    /** A child execution of this state machine, waited for (.sync:2: its output arrives as JSON). */
    const startChild = (
      name: string,
      input: Record<string, unknown>,
      resultSelector: Record<string, string>,
      resultPath: string,
    ) => {
      const task = new tasks.StepFunctionsStartExecution(this, name, {
        stateMachine: self,
        integrationPattern: sfn.IntegrationPattern.RUN_JOB,
        input: sfn.TaskInput.fromObject(input),
        associateWithParent: true,
        resultSelector,
        resultPath,
      });
      // Only the API call is retried; a child that failed already used its own retries.
      task.addRetry({
        errors: [
          'StepFunctions.ExecutionLimitExceededException',
          'StepFunctions.AWSStepFunctionsException',
          'StepFunctions.SdkClientException',
        ],
        interval: Duration.seconds(5),
        maxAttempts: START_CHILD_RETRIES,
        backoffRate: 2,
        jitterStrategy: sfn.JitterType.FULL,
      });
      return task;
    };

    /** Counts a parent round and refuses to start one beyond MAX_ROUNDS_PER_CYCLE. */
    const roundGate = (phase: string, next: sfn.IChainable, exhausted: sfn.IChainable) =>
      new sfn.Pass(this, `${phase}: count round`, {
        parameters: { 'rounds.$': 'States.MathAdd($.budget.rounds, 1)' },
        resultPath: '$.budget',
      }).next(
        new sfn.Choice(this, `${phase}: rounds left?`)
          .when(sfn.Condition.numberGreaterThan('$.budget.rounds', MAX_ROUNDS_PER_CYCLE), exhausted)
          .otherwise(next),
      );

    const hasString = (path: string, value: string) =>
      sfn.Condition.and(sfn.Condition.isPresent(path), sfn.Condition.stringEquals(path, value));

    /**
     * Deletes the source snapshots this execution created (found by their ferry:cycle tag, so given
     * snapshots are never touched), then goes on to `end`. Best effort: a failed delete leaves a
     * tagged snapshot behind but never changes how the execution ends.
     */
    const deleteOwnSourceSnapshots = (prefix: string, end: sfn.IChainable) => {
      const find = ec2Call(`${prefix}: find source snapshots`, 'describeSnapshots', {
        Parameters: {
          OwnerIds: ['self'],
          Filters: [
            { Name: `tag:${props.snapshotTag.key}`, Values: [props.snapshotTag.value] },
            { Name: 'tag:ferry:role', Values: ['source'] },
            { Name: 'tag:ferry:cycle', 'Values.$': 'States.Array($$.Execution.Name)' },
          ],
        },
        ResultSelector: { 'ids.$': '$.Snapshots[*].SnapshotId' },
        ResultPath: '$.cleanup',
      });
      const remove = new sfn.Map(this, `${prefix}: delete source snapshots`, {
        itemsPath: '$.cleanup.ids',
        maxConcurrency: 4,
        resultPath: sfn.JsonPath.DISCARD,
      });
      remove.itemProcessor(
        ec2Call(`${prefix}: delete source snapshot`, 'deleteSnapshot', {
          Parameters: { 'SnapshotId.$': '$' },
          ResultPath: null,
        }),
      );
      find.addCatch(end, { errors: ['States.ALL'], resultPath: '$.cleanupError' });
      remove.addCatch(end, { errors: ['States.ALL'], resultPath: '$.cleanupError' });
      find.next(remove).next(end);
      return find;
    };

    // ---- abort (after prepare: there is a cycle to abandon) ----------------------------------------

    const cycleFailed = new sfn.Fail(this, 'Cycle failed', {
      error: 'CycleAborted',
      causePath: '$.abort.reason',
    });
    const abortCycle = invoke(
      'Abort cycle',
      props.finalizer,
      { action: 'abort', 'cycle.$': '$.cycle', 'reason.$': '$.abort.reason', 'error.$': '$.abort.error' },
      '$.aborted',
    );
    // Whether or not the abort went through, the execution fails: nothing was published.
    abortCycle.addCatch(cycleFailed, { errors: ['States.ALL'], resultPath: '$.abortError' });
    abortCycle.next(cycleFailed);

    const abortBecause = (name: string, reason: string) =>
      new sfn.Pass(this, name, { parameters: { reason, error: {} }, resultPath: '$.abort' }).next(abortCycle);
    const abortOnError = new sfn.Pass(this, 'Abort: step failed', {
      parameters: {
        'reason.$': "States.Format('a cycle step failed with {}', $.error.Error)",
        'error.$': '$.error',
      },
      resultPath: '$.abort',
    }).next(abortCycle);
    const catchToAbort = { errors: ['States.ALL'], resultPath: '$.error' };
    const roundsExhausted = abortBecause(
      'Abort: rounds exhausted',
      `the cycle used all ${MAX_ROUNDS_PER_CYCLE} rounds of child executions without finishing`,
    );

    // ---- finalize ----------------------------------------------------------------------------------

    const finalize = invoke(
      'Finalize cycle',
      props.finalizer,
      { action: 'finalize', 'cycle.$': '$.cycle' },
      '$.finalize',
    );
    finalize.addCatch(abortOnError, catchToAbort);
    const finalizeStart = new sfn.Pass(this, 'Finalize: start', {
      result: sfn.Result.fromObject({ calls: 0 }),
      resultPath: '$.fin',
    }).next(finalize);
    finalize.next(
      new sfn.Choice(this, 'Checkpoint published?')
        .when(
          sfn.Condition.stringEquals('$.finalize.status', 'published'),
          new sfn.Succeed(this, 'Checkpoint published', { outputPath: '$.finalize' }),
        )
        .when(
          sfn.Condition.numberGreaterThanEquals('$.fin.calls', MAX_FINALIZE_CALLS - 1),
          abortBecause(
            'Abort: target snapshots not completed',
            `the target snapshots were still completing after ${MAX_FINALIZE_CALLS} finalize calls`,
          ),
        )
        .otherwise(
          new sfn.Pass(this, 'Finalize: count call', {
            parameters: { 'calls.$': 'States.MathAdd($.fin.calls, 1)' },
            resultPath: '$.fin',
          })
            .next(
              new sfn.Wait(this, 'Wait for target snapshots', {
                time: sfn.WaitTime.duration(Duration.seconds(FINALIZE_POLL_SECONDS)),
              }),
            )
            .next(finalize),
        ),
    );

    // ---- replicate: rounds of replicate children until the planner says done ------------------------

    const plannerReported = new sfn.Choice(this, 'Abort: planner gave a reason?')
      .when(
        sfn.Condition.isPresent('$.replicate.tick.reason'),
        new sfn.Pass(this, 'Abort: planner reported', {
          parameters: {
            'reason.$':
              "States.Format('the planner reported the cycle {}: {}', $.replicate.status, $.replicate.tick.reason)",
            error: {},
          },
          resultPath: '$.abort',
        }).next(abortCycle),
      )
      .otherwise(
        new sfn.Pass(this, 'Abort: planner reported without reason', {
          parameters: {
            'reason.$': "States.Format('the planner reported the cycle {}', $.replicate.status)",
            error: {},
          },
          resultPath: '$.abort',
        }).next(abortCycle),
      );
    const replicateRound = startChild(
      'Replicate round',
      { child: CHILD_KINDS.replicate, 'cycle.$': '$.cycle' },
      { 'status.$': '$.Output.status', 'tick.$': '$.Output' },
      '$.replicate',
    );
    replicateRound.addCatch(abortOnError, catchToAbort);
    const replicate = roundGate('Replicate', replicateRound, roundsExhausted);
    replicateRound.next(
      new sfn.Choice(this, 'Cycle status?')
        .when(sfn.Condition.stringEquals('$.replicate.status', 'done'), finalizeStart)
        .when(sfn.Condition.stringEquals('$.replicate.status', 'running'), replicate)
        .otherwise(plannerReported),
    );

    // ---- diff: rounds of diff children over the disks not diffed yet --------------------------------

    const diffRound = startChild(
      'Diff round',
      { child: CHILD_KINDS.diff, 'tasks.$': '$.diffRound.tasks' },
      { 'anyLeft.$': '$.Output.anyLeft', 'results.$': '$.Output.results' },
      '$.diff',
    );
    diffRound.addCatch(abortOnError, catchToAbort);
    const diff = roundGate('Diff', diffRound, roundsExhausted);
    diffRound.next(
      new sfn.Choice(this, 'All disks diffed?')
        .when(
          sfn.Condition.booleanEquals('$.diff.anyLeft', true),
          new sfn.Pass(this, 'Diff: remaining disks', {
            // Only reached when at least one disk is left, so the filter never comes back empty.
            parameters: { 'tasks.$': '$.diff.results[?(@.done == false)].task' },
            resultPath: '$.diffRound',
          }).next(diff),
        )
        .otherwise(replicate),
    );

    // ---- prepare ---------------------------------------------------------------------------------

    const prepare = invoke(
      'Prepare cycle',
      props.planner,
      { action: 'prepare', 'cycle.$': '$.cycleInput' },
      '$.cycle',
    );
    // Cycles of one plan never overlap: the planner holds a per-plan lock in DynamoDB and refuses a
    // second cycle with PlanBusyError. That start is skipped, not failed (the RPO alarm notices).
    // The source snapshots this start took are deleted again: they would only pile up.
    prepare.addCatch(
      deleteOwnSourceSnapshots(
        'Busy',
        new sfn.Succeed(this, 'Plan busy', { comment: 'Another cycle of this plan holds its lock.' }),
      ),
      { errors: ['PlanBusyError'], resultPath: '$.error' },
    );
    prepare.addCatch(
      deleteOwnSourceSnapshots(
        'Prepare failed',
        new sfn.Fail(this, 'Prepare failed', { errorPath: '$.error.Error', causePath: '$.error.Cause' }),
      ),
      { errors: ['States.ALL'], resultPath: '$.error' },
    );
    prepare.next(
      new sfn.Pass(this, 'Diff: all disks', {
        parameters: { 'tasks.$': '$.cycle.disks' },
        resultPath: '$.diffRound',
      }).next(diff),
    );
    const cycleInput = (name: string, withParams: boolean) =>
      new sfn.Pass(this, name, {
        parameters: {
          'plan.$': '$.plan',
          'set.$': '$.set',
          // The execution name is the cycle id: unique per state machine and shown in the console.
          'cycleId.$': '$$.Execution.Name',
          // Before the source snapshots were taken: the checkpoint's age (RPO metric) counts from it.
          'startedAt.$': '$$.Execution.StartTime',
          'disks.$': '$.disks',
          ...(withParams ? { 'params.$': '$.params' } : {}),
        },
        resultPath: '$.cycleInput',
      }).next(prepare);
    const toPrepare = new sfn.Choice(this, 'Cycle params given?')
      .when(sfn.Condition.isPresent('$.params'), cycleInput('Cycle input with params', true))
      .otherwise(cycleInput('Cycle input', false));

    // ---- source snapshots --------------------------------------------------------------------------

    const sourcesFailed = deleteOwnSourceSnapshots(
      'Sources failed',
      new sfn.Fail(this, 'Source snapshots failed', {
        errorPath: '$.error.Error',
        causePath: '$.error.Cause',
      }),
    );
    const awaitRound = startChild(
      'Await round',
      { child: CHILD_KINDS.awaitSnapshots, 'snapshotIds.$': '$.disks[*].sourceSnapshotId' },
      { 'pending.$': '$.Output.pending' },
      '$.await',
    );
    awaitRound.addCatch(sourcesFailed, { errors: ['States.ALL'], resultPath: '$.error' });
    const awaitSources = roundGate(
      'Sources',
      awaitRound,
      new sfn.Fail(this, 'Rounds exhausted', {
        error: 'RoundsExhausted',
        cause: `source snapshots were not completed within ${MAX_ROUNDS_PER_CYCLE} rounds`,
      }),
    );
    awaitRound.next(
      new sfn.Choice(this, 'Sources completed?')
        .when(sfn.Condition.booleanEquals('$.await.pending', true), awaitSources)
        .otherwise(toPrepare),
    );

    const tags = [
      { Key: props.snapshotTag.key, Value: props.snapshotTag.value },
      { Key: 'ferry:role', Value: 'source' },
      { Key: 'ferry:plan', 'Value.$': '$.plan' },
      { Key: 'ferry:disk', 'Value.$': '$.disk.disk' },
      { Key: 'ferry:cycle', 'Value.$': '$.cycleId' },
    ];
    const createSnapshot = ec2Call('Create source snapshot', 'createSnapshot', {
      Parameters: {
        'VolumeId.$': '$.disk.volumeId',
        'Description.$':
          "States.Format('Ferry source of plan {} disk {} cycle {}', $.plan, $.disk.disk, $.cycleId)",
        TagSpecifications: [{ ResourceType: 'snapshot', Tags: tags }],
      },
      ResultSelector: { 'sourceSnapshotId.$': '$.SnapshotId', 'volumeSizeGiB.$': '$.VolumeSize' },
      ResultPath: '$.created',
    }).next(
      new sfn.Pass(this, 'Source snapshot started', {
        parameters: {
          'disk.$': '$.disk.disk',
          'sourceSnapshotId.$': '$.created.sourceSnapshotId',
          'volumeSizeGiB.$': '$.created.volumeSizeGiB',
        },
      }),
    );
    const snapshotDisk = new sfn.Choice(this, 'Snapshot given?')
      .when(
        sfn.Condition.and(
          sfn.Condition.isPresent('$.disk.sourceSnapshotId'),
          sfn.Condition.isPresent('$.disk.volumeSizeGiB'),
        ),
        new sfn.Pass(this, 'Use given snapshot', {
          parameters: {
            'disk.$': '$.disk.disk',
            'sourceSnapshotId.$': '$.disk.sourceSnapshotId',
            'volumeSizeGiB.$': '$.disk.volumeSizeGiB',
          },
        }),
      )
      .when(sfn.Condition.isPresent('$.disk.volumeId'), createSnapshot)
      .otherwise(
        new sfn.Fail(this, 'Invalid disk input', {
          error: 'InvalidCycleInput',
          cause: 'every disk needs a volumeId, or a sourceSnapshotId and its volumeSizeGiB',
        }),
      );
    const snapshotSources = new sfn.Map(this, 'Snapshot sources', {
      itemsPath: '$.disks',
      itemSelector: {
        'disk.$': '$$.Map.Item.Value',
        'plan.$': '$.plan',
        'set.$': '$.set',
        'cycleId.$': '$$.Execution.Name',
      },
      maxConcurrency: DIFF_CONCURRENCY,
      resultPath: '$.disks',
    });
    snapshotSources.itemProcessor(snapshotDisk);
    snapshotSources.addCatch(sourcesFailed, { errors: ['States.ALL'], resultPath: '$.error' });
    snapshotSources.next(awaitSources);

    const startCycle = new sfn.Pass(this, 'Start cycle', {
      result: sfn.Result.fromObject({ rounds: 0 }),
      resultPath: '$.budget',
    }).next(snapshotSources);

    // ---- child: await source snapshots -------------------------------------------------------------

    const describe = ec2Call('Describe source snapshots', 'describeSnapshots', {
      Parameters: { 'SnapshotIds.$': '$.snapshotIds' },
      ResultSelector: { 'states.$': '$.Snapshots[*].State' },
      ResultPath: '$.describe',
    });
    const awaitChild = new sfn.Pass(this, 'Await: start', {
      parameters: { 'snapshotIds.$': '$.snapshotIds', polls: 0 },
    }).next(describe);
    describe.next(
      new sfn.Pass(this, 'Read snapshot states', {
        parameters: {
          'snapshotIds.$': '$.snapshotIds',
          'polls.$': 'States.MathAdd($.polls, 1)',
          'anyPending.$': "States.ArrayContains($.describe.states, 'pending')",
          'anyError.$': "States.ArrayContains($.describe.states, 'error')",
        },
      }).next(
        new sfn.Choice(this, 'Source snapshots ready?')
          .when(
            sfn.Condition.booleanEquals('$.anyError', true),
            new sfn.Fail(this, 'Source snapshot failed', {
              error: 'SourceSnapshotFailed',
              cause: 'EC2 reports a source snapshot in state error',
            }),
          )
          .when(
            sfn.Condition.or(
              sfn.Condition.booleanEquals('$.anyPending', false),
              sfn.Condition.numberGreaterThanEquals('$.polls', MAX_SNAPSHOT_POLLS_PER_CHILD),
            ),
            new sfn.Pass(this, 'Await: report', { parameters: { 'pending.$': '$.anyPending' } }),
          )
          .otherwise(
            new sfn.Wait(this, 'Wait for source snapshots', {
              time: sfn.WaitTime.duration(Duration.seconds(SNAPSHOT_POLL_SECONDS)),
            }).next(describe),
          ),
      ),
    );

    // ---- child: diff disks ---------------------------------------------------------------------------

    const diffDisk = invoke(
      'Diff disk',
      props.differ,
      { 'set.$': '$.task.set', 'cycleId.$': '$.task.cycleId', 'disk.$': '$.task.disk' },
      '$.result',
    );
    diffDisk.next(
      new sfn.Choice(this, 'Disk diffed?')
        .when(
          sfn.Condition.booleanEquals('$.result.done', true),
          new sfn.Pass(this, 'Disk diffed', { parameters: { done: true, 'task.$': '$.task' } }),
        )
        .when(
          sfn.Condition.numberGreaterThanEquals('$.calls', MAX_DIFF_CALLS_PER_CHILD - 1),
          new sfn.Pass(this, 'Disk not diffed yet', { parameters: { done: false, 'task.$': '$.task' } }),
        )
        .otherwise(
          new sfn.Pass(this, 'Count diff call', {
            parameters: { 'task.$': '$.task', 'calls.$': 'States.MathAdd($.calls, 1)' },
          }).next(diffDisk),
        ),
    );
    const diffChild = new sfn.Map(this, 'Diff disks', {
      itemsPath: '$.tasks',
      itemSelector: { 'task.$': '$$.Map.Item.Value', calls: 0 },
      maxConcurrency: DIFF_CONCURRENCY,
      resultSelector: { 'doneFlags.$': '$[*].done', 'results.$': '$' },
      resultPath: '$.diff',
    });
    diffChild.itemProcessor(diffDisk);
    diffChild.next(
      new sfn.Pass(this, 'Diff: report', {
        parameters: {
          'anyLeft.$': 'States.ArrayContains($.diff.doneFlags, false)',
          'results.$': '$.diff.results',
        },
      }),
    );

    // ---- child: replicate (planner ticks) -------------------------------------------------------------

    const tick = invoke('Tick', props.planner, { action: 'tick', 'cycle.$': '$.cycle' }, '$.tick');
    const replicateChild = new sfn.Pass(this, 'Replicate: start', {
      parameters: { 'cycle.$': '$.cycle', ticks: 0 },
    }).next(tick);
    tick.next(
      new sfn.Choice(this, 'Tick status?')
        .when(
          sfn.Condition.or(
            sfn.Condition.not(sfn.Condition.stringEquals('$.tick.status', 'running')),
            sfn.Condition.numberGreaterThanEquals('$.ticks', MAX_TICKS_PER_CHILD - 1),
          ),
          new sfn.Succeed(this, 'Replicate: report', { outputPath: '$.tick' }),
        )
        .otherwise(
          new sfn.Pass(this, 'Count tick', {
            parameters: { 'cycle.$': '$.cycle', 'ticks.$': 'States.MathAdd($.ticks, 1)' },
          })
            .next(
              new sfn.Wait(this, 'Wait for writers', {
                time: sfn.WaitTime.duration(Duration.seconds(TICK_WAIT_SECONDS)),
              }),
            )
            .next(tick),
        ),
    );

    // ---- entry -------------------------------------------------------------------------------------

    const route = new sfn.Choice(this, 'Route')
      .when(hasString('$.child', CHILD_KINDS.replicate), replicateChild)
      .when(hasString('$.child', CHILD_KINDS.diff), diffChild)
      .when(hasString('$.child', CHILD_KINDS.awaitSnapshots), awaitChild)
      .otherwise(startCycle);

    this.stateMachine = new sfn.StateMachine(this, 'StateMachine', {
      stateMachineName: props.stateMachineName,
      stateMachineType: sfn.StateMachineType.STANDARD,
      queryLanguage: sfn.QueryLanguage.JSON_PATH,
      comment:
        'Ferry replication cycle: snapshot sources, prepare, diff, replicate (planner ticks), finalize or abort. ' +
        'Inputs with "child" are bounded child executions started by a cycle.',
      definitionBody: sfn.DefinitionBody.fromChainable(route),
      tracingEnabled: true,
      logs: { destination: props.logGroup, level: sfn.LogLevel.ALL, includeExecutionData: true },
    });

    // ---- IAM for the EC2 calls ---------------------------------------------------------------------

    const snapshotArns = stack.formatArn({
      service: 'ec2',
      account: '',
      resource: 'snapshot',
      resourceName: '*',
    });
    if (props.sourceVolumeIds.length > 0) {
      this.stateMachine.addToRolePolicy(
        new iam.PolicyStatement({
          sid: 'SnapshotConfiguredVolumes',
          actions: ['ec2:CreateSnapshot'],
          resources: props.sourceVolumeIds.map((id) =>
            stack.formatArn({ service: 'ec2', resource: 'volume', resourceName: id }),
          ),
        }),
      );
    }
    this.stateMachine.addToRolePolicy(
      new iam.PolicyStatement({
        sid: 'CreateTaggedSourceSnapshots',
        actions: ['ec2:CreateSnapshot'],
        resources: [snapshotArns],
        conditions: {
          StringEquals: { [`aws:RequestTag/${props.snapshotTag.key}`]: props.snapshotTag.value },
        },
      }),
    );
    this.stateMachine.addToRolePolicy(
      new iam.PolicyStatement({
        sid: 'TagSourceSnapshotsOnCreate',
        actions: ['ec2:CreateTags'],
        resources: [snapshotArns],
        conditions: {
          StringEquals: {
            'ec2:CreateAction': 'CreateSnapshot',
            [`aws:RequestTag/${props.snapshotTag.key}`]: props.snapshotTag.value,
          },
        },
      }),
    );
    this.stateMachine.addToRolePolicy(
      new iam.PolicyStatement({
        sid: 'DeleteOwnSourceSnapshots',
        actions: ['ec2:DeleteSnapshot'],
        resources: [snapshotArns],
        conditions: {
          StringEquals: {
            [`aws:ResourceTag/${props.snapshotTag.key}`]: props.snapshotTag.value,
            'aws:ResourceTag/ferry:role': 'source',
          },
        },
      }),
    );
    this.stateMachine.addToRolePolicy(
      new iam.PolicyStatement({
        sid: 'DescribeSnapshots',
        actions: ['ec2:DescribeSnapshots'],
        resources: ['*'],
      }),
    );
  }
}
