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
import { RECOVERY_TAGS } from '../shared/engine/recovery/names.ts';
import {
  DIFF_CONCURRENCY,
  EC2_RETRIES,
  FINALIZE_POLL_SECONDS,
  MAX_DIFF_CALLS_PER_CHILD,
  MAX_FINALIZE_CALLS,
  MAX_ROUNDS_PER_CYCLE,
  MAX_SNAPSHOT_POLLS_PER_CHILD,
  MAX_TICKS_PER_CHILD,
  PARENT_SNAPSHOT_POLLS,
  PARENT_TICKS,
  SNAPSHOT_POLL_SECONDS,
  START_CHILD_RETRIES,
  TICK_WAIT_SECONDS,
} from './history-budget.ts';
import { lambdaTask, retryStartExecution } from './lambda-task.ts';

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
      /** Where the result goes; undefined: it replaces the input. */
      resultPath: string | undefined,
      resultSelector?: Record<string, unknown>,
    ) => {
      return lambdaTask(this, name, {
        fn,
        payload: sfn.TaskInput.fromObject(payload),
        resultPath,
        resultSelector,
        permanentErrors: PERMANENT_ERRORS,
      });
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
      resultSelector: Record<string, unknown>,
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
      retryStartExecution(task, START_CHILD_RETRIES);
      return task;
    };

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

    // ---- parent and child ----------------------------------------------------------------------------
    // A child is started with {"child": kind, ...} and enters the same loop states as the parent. The
    // Choice that ends each pass of a loop tells the two apart by $.child: a child goes round until its
    // own bound and then reports; the parent goes round until its PARENT_* bound and then starts
    // children, one round at a time, until the loop is done.

    const inChild = sfn.Condition.isPresent('$.child');

    /** A counter at `$.<name>.count` (an object, so a Pass can replace it) and a Pass adding one. */
    const counter = (name: string) => ({
      path: `$.${name}.count`,
      increment: (stateName: string) =>
        new sfn.Pass(this, stateName, {
          parameters: { 'count.$': `States.MathAdd($.${name}.count, 1)` },
          resultPath: `$.${name}`,
        }),
    });
    /** Child executions the cycle has started (all phases together). */
    const rounds = counter('rounds');
    /** Source snapshot checks this execution has made, the one being made included. */
    const polls = counter('polls');
    // Planner ticks this execution has made, the last one included, are counted without a Pass: the
    // Tick sends the count plus one as its `round` and keeps the planner's echo at $.tick.count.
    const tickCount = '$.tick.count';
    /** Finalize calls the cycle has made, less one. */
    const finalizes = counter('finalizes');
    /** Differ rounds a diff child has made, less one. */
    const diffRounds = counter('diffRounds');
    const noRoundsLeft = sfn.Condition.numberGreaterThanEquals(rounds.path, MAX_ROUNDS_PER_CYCLE);

    /** One round of children in the parent: counts it, then starts the child and waits for it. */
    const childRound = (
      phase: string,
      input: Record<string, unknown>,
      resultSelector: Record<string, unknown>,
      resultPath: string,
    ) => {
      const start = startChild(`${phase} round`, input, resultSelector, resultPath);
      return { first: rounds.increment(`${phase}: count round`).next(start), start };
    };

    // A failed step's error is at $.error. A child fails with it (its parent's StartExecution then
    // fails, and the parent handles the failure once); the parent goes to its own handler.
    const childFailed = new sfn.Fail(this, 'Child failed', {
      errorPath: '$.error.Error',
      causePath: '$.error.Cause',
    });
    const failedIn = (name: string, parentHandler: sfn.IChainable) =>
      new sfn.Choice(this, name).when(inChild, childFailed).otherwise(parentHandler);

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
    const stepFailed = failedIn('Step failed: in a child?', abortOnError);
    const roundsExhausted = abortBecause(
      'Abort: rounds exhausted',
      `the cycle used all ${MAX_ROUNDS_PER_CYCLE} rounds of child executions without finishing`,
    );

    // ---- finalize (parent only) ----------------------------------------------------------------------

    const finalize = invoke(
      'Finalize cycle',
      props.finalizer,
      { action: 'finalize', 'cycle.$': '$.cycle' },
      '$.finalize',
    );
    finalize.addCatch(abortOnError, catchToAbort);
    finalize.next(
      new sfn.Choice(this, 'Checkpoint published?')
        .when(
          sfn.Condition.stringEquals('$.finalize.status', 'published'),
          new sfn.Succeed(this, 'Checkpoint published', { outputPath: '$.finalize' }),
        )
        .when(
          sfn.Condition.numberGreaterThanEquals(finalizes.path, MAX_FINALIZE_CALLS - 1),
          abortBecause(
            'Abort: target snapshots not completed',
            `the target snapshots were still completing after ${MAX_FINALIZE_CALLS} finalize calls`,
          ),
        )
        .otherwise(
          finalizes
            .increment('Finalize: count call')
            .next(
              new sfn.Wait(this, 'Wait for target snapshots', {
                time: sfn.WaitTime.duration(Duration.seconds(FINALIZE_POLL_SECONDS)),
              }),
            )
            .next(finalize),
        ),
    );

    // ---- replicate: planner ticks until the planner says done (parent, then replicate children) ------

    // $.tick is {status, result, count}: the planner's answer, as a tick or a replicate child reports
    // it, and the ticks counted so far (the execution starts it at 0).
    const tick = invoke(
      'Tick',
      props.planner,
      { action: 'tick', 'cycle.$': '$.cycle', 'round.$': `States.MathAdd(${tickCount}, 1)` },
      '$.tick',
      { 'status.$': '$.status', 'result.$': '$', 'count.$': '$.round' },
    );
    tick.addCatch(stepFailed, catchToAbort);
    const waitForWriters = new sfn.Wait(this, 'Wait for writers', {
      time: sfn.WaitTime.duration(Duration.seconds(TICK_WAIT_SECONDS)),
    });
    waitForWriters.next(tick);
    const plannerReported = new sfn.Choice(this, 'Abort: planner gave a reason?')
      .when(
        sfn.Condition.isPresent('$.tick.result.reason'),
        new sfn.Pass(this, 'Abort: planner reported', {
          parameters: {
            'reason.$':
              "States.Format('the planner reported the cycle {}: {}', $.tick.status, $.tick.result.reason)",
            error: {},
          },
          resultPath: '$.abort',
        }).next(abortCycle),
      )
      .otherwise(
        new sfn.Pass(this, 'Abort: planner reported without reason', {
          parameters: {
            'reason.$': "States.Format('the planner reported the cycle {}', $.tick.status)",
            error: {},
          },
          resultPath: '$.abort',
        }).next(abortCycle),
      );
    const replicateRound = childRound(
      'Replicate',
      { child: CHILD_KINDS.replicate, 'cycle.$': '$.cycle', tick: { count: 0 } },
      // The parent starts a round only once its own PARENT_TICKS are made: its count stays there.
      { 'status.$': '$.Output.status', 'result.$': '$.Output.result', count: PARENT_TICKS },
      '$.tick',
    );
    replicateRound.start.addCatch(abortOnError, catchToAbort);
    const running = sfn.Condition.stringEquals('$.tick.status', 'running');
    const tickStatus = new sfn.Choice(this, 'Tick status?')
      .when(
        sfn.Condition.and(
          inChild,
          sfn.Condition.or(
            sfn.Condition.not(running),
            sfn.Condition.numberGreaterThanEquals(tickCount, MAX_TICKS_PER_CHILD),
          ),
        ),
        new sfn.Succeed(this, 'Replicate: report', { outputPath: '$.tick' }),
      )
      .when(inChild, waitForWriters)
      .when(sfn.Condition.stringEquals('$.tick.status', 'done'), finalize)
      .when(sfn.Condition.and(running, sfn.Condition.numberLessThan(tickCount, PARENT_TICKS)), waitForWriters)
      .when(sfn.Condition.and(running, noRoundsLeft), roundsExhausted)
      .when(running, replicateRound.first)
      .otherwise(plannerReported);
    tick.next(tickStatus);
    replicateRound.start.next(tickStatus);

    // ---- diff: rounds of one differ call per disk left (parent: one round, then diff children) -------

    // $.cycle.disks are the differ tasks: the prepared cycle's disks in the parent, the disks left in
    // a diff child (whose "cycle" is only that). $.diff.results are the round's tasks, each with its
    // done flag; the filter for the tasks left only runs when one is left (it must not come back empty).
    const diffDisk = invoke(
      'Diff disk',
      props.differ,
      { 'set.$': '$.task.set', 'cycleId.$': '$.task.cycleId', 'disk.$': '$.task.disk' },
      undefined,
      // The differ's answer names its task (differResultSchema): the task again, and whether it is done.
      { 'set.$': '$.set', 'cycleId.$': '$.cycleId', 'disk.$': '$.disk', 'done.$': '$.done' },
    );
    const diffDisks = new sfn.Map(this, 'Diff disks', {
      itemsPath: '$.cycle.disks',
      itemSelector: { 'task.$': '$$.Map.Item.Value' },
      maxConcurrency: DIFF_CONCURRENCY,
      resultSelector: { 'anyLeft.$': 'States.ArrayContains($[*].done, false)', 'results.$': '$' },
      resultPath: '$.diff',
    });
    diffDisks.itemProcessor(diffDisk);
    const tasksLeft = '$.diff.results[?(@.done == false)]';
    diffDisks.addCatch(stepFailed, catchToAbort);
    const diffRound = childRound(
      'Diff',
      { child: CHILD_KINDS.diff, cycle: { 'disks.$': tasksLeft }, diffRounds: { count: 0 } },
      { 'anyLeft.$': '$.Output.anyLeft', 'results.$': '$.Output.results' },
      '$.diff',
    );
    diffRound.start.addCatch(abortOnError, catchToAbort);
    const anyLeft = sfn.Condition.booleanEquals('$.diff.anyLeft', true);
    const allDiffed = new sfn.Choice(this, 'All disks diffed?')
      .when(
        sfn.Condition.and(
          inChild,
          sfn.Condition.or(
            sfn.Condition.not(anyLeft),
            sfn.Condition.numberGreaterThanEquals(diffRounds.path, MAX_DIFF_CALLS_PER_CHILD - 1),
          ),
        ),
        new sfn.Succeed(this, 'Diff: report', { outputPath: '$.diff' }),
      )
      .when(
        inChild,
        new sfn.Pass(this, 'Diff: next round', {
          parameters: {
            'child.$': '$.child',
            cycle: { 'disks.$': tasksLeft },
            diffRounds: { 'count.$': `States.MathAdd(${diffRounds.path}, 1)` },
          },
        }).next(diffDisks),
      )
      .when(sfn.Condition.not(anyLeft), tick)
      .when(noRoundsLeft, roundsExhausted)
      .otherwise(diffRound.first);
    diffDisks.next(allDiffed);
    diffRound.start.next(allDiffed);

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
    prepare.next(diffDisks);

    // ---- await the source snapshots (parent, then await children) ------------------------------------

    const sourcesFailed = deleteOwnSourceSnapshots(
      'Sources failed',
      new sfn.Fail(this, 'Source snapshots failed', {
        errorPath: '$.error.Error',
        causePath: '$.error.Cause',
      }),
    );
    // $.sources says whether any snapshot is still pending, and whether any is in error.
    const describe = ec2Call('Describe source snapshots', 'describeSnapshots', {
      Parameters: { 'SnapshotIds.$': '$.cycleInput.disks[*].sourceSnapshotId' },
      ResultSelector: {
        'anyPending.$': "States.ArrayContains($.Snapshots[*].State, 'pending')",
        'anyError.$': "States.ArrayContains($.Snapshots[*].State, 'error')",
      },
      ResultPath: '$.sources',
    });
    describe.addCatch(failedIn('Sources failed: in a child?', sourcesFailed), {
      errors: ['States.ALL'],
      resultPath: '$.error',
    });
    const waitForSources = new sfn.Wait(this, 'Wait for source snapshots', {
      time: sfn.WaitTime.duration(Duration.seconds(SNAPSHOT_POLL_SECONDS)),
    });
    waitForSources.next(describe);
    const countPoll = polls.increment('Count poll').next(waitForSources);
    const awaitRound = childRound(
      'Await',
      {
        child: CHILD_KINDS.awaitSnapshots,
        cycleInput: { 'disks.$': '$.cycleInput.disks' },
        // The child's first check follows its first wait: the parent has just checked.
        polls: { count: 1 },
      },
      { 'anyPending.$': '$.Output.anyPending', 'anyError.$': '$.Output.anyError' },
      '$.sources',
    );
    awaitRound.start.addCatch(sourcesFailed, { errors: ['States.ALL'], resultPath: '$.error' });
    const anyFailed = sfn.Condition.booleanEquals('$.sources.anyError', true);
    const anyPending = sfn.Condition.booleanEquals('$.sources.anyPending', true);
    const sourcesReady = new sfn.Choice(this, 'Source snapshots ready?')
      .when(
        sfn.Condition.and(anyFailed, inChild),
        new sfn.Fail(this, 'Source snapshot failed', {
          error: 'SourceSnapshotFailed',
          cause: 'EC2 reports a source snapshot in state error',
        }),
      )
      .when(
        anyFailed,
        new sfn.Pass(this, 'Source snapshot in error', {
          parameters: {
            Error: 'SourceSnapshotFailed',
            Cause: 'EC2 reports a source snapshot in state error',
          },
          resultPath: '$.error',
        }).next(sourcesFailed),
      )
      .when(
        sfn.Condition.and(
          inChild,
          sfn.Condition.or(
            sfn.Condition.not(anyPending),
            sfn.Condition.numberGreaterThanEquals(polls.path, MAX_SNAPSHOT_POLLS_PER_CHILD),
          ),
        ),
        new sfn.Succeed(this, 'Await: report', { outputPath: '$.sources' }),
      )
      .when(inChild, countPoll)
      .when(sfn.Condition.not(anyPending), prepare)
      .when(sfn.Condition.numberLessThan(polls.path, PARENT_SNAPSHOT_POLLS), countPoll)
      .when(
        noRoundsLeft,
        new sfn.Fail(this, 'Rounds exhausted', {
          error: 'RoundsExhausted',
          cause: `source snapshots were not completed within ${MAX_ROUNDS_PER_CYCLE} rounds`,
        }),
      )
      .otherwise(awaitRound.first);
    describe.next(sourcesReady);
    awaitRound.start.next(sourcesReady);

    // ---- source snapshots (parent only) ------------------------------------------------------------

    const diskTagKey = 'ferry:disk';
    const tags = [
      { Key: props.snapshotTag.key, Value: props.snapshotTag.value },
      { Key: 'ferry:role', Value: 'source' },
      { Key: 'ferry:plan', 'Value.$': '$.plan' },
      { Key: diskTagKey, 'Value.$': '$.disk.disk' },
      { Key: 'ferry:cycle', 'Value.$': '$.cycleId' },
    ];
    const createSnapshot = ec2Call('Create source snapshot', 'createSnapshot', {
      Parameters: {
        'VolumeId.$': '$.disk.volumeId',
        'Description.$':
          "States.Format('Ferry source of plan {} disk {} cycle {}', $.plan, $.disk.disk, $.cycleId)",
        TagSpecifications: [{ ResourceType: 'snapshot', Tags: tags }],
      },
      // The answer alone is the disk's entry for prepare: its volume, the new snapshot and the size.
      // Prepare pairs it with the requested disk of the same index ($.cycleInput.requested): JSONPath
      // cannot merge the disk's name from the input into a task's result, and a Pass to do it would
      // cost a state transition per disk and cycle.
      ResultSelector: {
        'volumeId.$': '$.VolumeId',
        'sourceSnapshotId.$': '$.SnapshotId',
        'volumeSizeGiB.$': '$.VolumeSize',
      },
      // No ResultPath: the result replaces the item's state.
    });
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
      // The snapshots complete the input prepare is given.
      resultPath: '$.cycleInput.disks',
    });
    snapshotSources.itemProcessor(snapshotDisk);
    snapshotSources.addCatch(sourcesFailed, { errors: ['States.ALL'], resultPath: '$.error' });
    snapshotSources.next(waitForSources);

    /** The cycle's state: its request, prepare's input (disks follow) and every counter at its start. */
    const startCycle = (name: string, withParams: boolean, withBase = false) =>
      new sfn.Pass(this, name, {
        parameters: {
          'plan.$': '$.plan',
          'set.$': '$.set',
          'disks.$': '$.disks',
          cycleInput: {
            // The disks as requested, in order: prepare names each created snapshot by its index.
            'requested.$': '$.disks',
            'plan.$': '$.plan',
            'set.$': '$.set',
            // The execution name is the cycle id: unique per state machine and shown in the console.
            'cycleId.$': '$$.Execution.Name',
            // Before the source snapshots were taken: the checkpoint's age (RPO metric) counts from it.
            'startedAt.$': '$$.Execution.StartTime',
            ...(withParams ? { 'params.$': '$.params' } : {}),
            // A set's first cycle from a checkpoint it shares with another set (failback).
            ...(withBase ? { 'base.$': '$.base' } : {}),
          },
          rounds: { count: 0 },
          // The first check follows the first wait: a snapshot just created is never completed at
          // once, so checking before waiting would cost a Describe and a Choice per cycle (a given
          // snapshot, usually completed, waits one interval).
          polls: { count: 1 },
          tick: { count: 0 },
          finalizes: { count: 0 },
        },
      }).next(snapshotSources);

    // ---- entry -------------------------------------------------------------------------------------

    // A child enters its loop where the parent left it: a replicate child ticks, a diff child diffs
    // the disks left, an await child waits before it checks again.
    const route = new sfn.Choice(this, 'Route')
      .when(hasString('$.child', CHILD_KINDS.replicate), tick)
      .when(hasString('$.child', CHILD_KINDS.diff), diffDisks)
      .when(hasString('$.child', CHILD_KINDS.awaitSnapshots), waitForSources)
      .when(
        sfn.Condition.and(sfn.Condition.isPresent('$.base'), sfn.Condition.isPresent('$.params')),
        startCycle('Start cycle from a base with params', true, true),
      )
      .when(sfn.Condition.isPresent('$.base'), startCycle('Start cycle from a base', false, true))
      .when(sfn.Condition.isPresent('$.params'), startCycle('Start cycle with params', true))
      .otherwise(startCycle('Start cycle', false));

    this.stateMachine = new sfn.StateMachine(this, 'StateMachine', {
      stateMachineName: props.stateMachineName,
      stateMachineType: sfn.StateMachineType.STANDARD,
      queryLanguage: sfn.QueryLanguage.JSON_PATH,
      comment:
        'Ferry replication cycle: snapshot sources, prepare, diff, replicate (planner ticks), finalize or abort. ' +
        'Inputs with "child" are bounded child executions started by a cycle when a loop outgrows it.',
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
    // A failback's reverse plan snapshots the volumes a failover or migration created (it replicates
    // the recovered machines' disks back): those carry the recovery job's mode tag; a drill's never
    // qualify.
    this.stateMachine.addToRolePolicy(
      new iam.PolicyStatement({
        sid: 'SnapshotRecoveredVolumes',
        actions: ['ec2:CreateSnapshot'],
        resources: [stack.formatArn({ service: 'ec2', resource: 'volume', resourceName: '*' })],
        conditions: {
          StringEquals: { [`aws:ResourceTag/${RECOVERY_TAGS.mode}`]: ['failover', 'migration'] },
        },
      }),
    );
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
