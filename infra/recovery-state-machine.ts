// The Recovery state machine (Standard, JSONPath): turns a checkpoint's target snapshots into images,
// volumes and instances for a drill, a failover, a migration (after one last cycle) or a failback, or
// tears a job down on command (cleanup). Every step is an action of the one recovery Lambda
// (functions/recovery/contracts.ts); the machine only sequences them, waits, bounds its loops and
// collects the report's parts, which `record` turns into the report.
import { Duration } from 'aws-cdk-lib';
import * as iam from 'aws-cdk-lib/aws-iam';
import type * as lambda from 'aws-cdk-lib/aws-lambda';
import type * as logs from 'aws-cdk-lib/aws-logs';
import * as sfn from 'aws-cdk-lib/aws-stepfunctions';
import * as tasks from 'aws-cdk-lib/aws-stepfunctions-tasks';
import { Construct } from 'constructs';
import { RECOVERY_PERMANENT_ERRORS } from '../functions/recovery/contracts.ts';
import { HANDLER_RETRIES, LAMBDA_SERVICE_RETRIES } from './history-budget.ts';
import { lambdaTask, retryStartExecution } from './lambda-task.ts';

// ---- bounds and timing, each with its reason ------------------------------------------------------

/** Seconds between health checks: EC2 status checks change every minute or so. */
export const HEALTH_POLL_SECONDS = 30;
/**
 * How long machines may take to pass their status checks before the job reports them unhealthy
 * (the health action's timeoutSeconds). Linux guests pass within 2-5 minutes; Windows guests
 * registered from snapshots take up to 15 on their first boot.
 */
export const HEALTH_TIMEOUT_SECONDS = 30 * 60;
/** Health checks the machine makes at most: the timeout's worth and ten more (the action ends it first). */
export const MAX_HEALTH_POLLS = HEALTH_TIMEOUT_SECONDS / HEALTH_POLL_SECONDS + 10;
/**
 * Teardown + verify rounds before the job alarms. Instances take a minute or two to terminate, and
 * their volumes can only be deleted after that: the first rounds usually find things still going.
 */
export const TEARDOWN_ATTEMPTS = 5;
/** Seconds between teardown rounds. */
export const TEARDOWN_RETRY_SECONDS = 60;
/** Machines launched at once: RegisterImage and RunInstances share the account's EC2 request rates. */
export const LAUNCH_CONCURRENCY = 8;
/** Machines per job (resolve's machines allow 64). */
export const MAX_MACHINES = 64;

/** The metric the teardown alarm watches: one data point per teardown that could not be verified. */
export const TEARDOWN_FAILED_METRIC = {
  namespace: 'Ferry',
  metricName: 'RecoveryTeardownFailed',
  dimension: 'StateMachine',
} as const;

/** The error names the machine ends with, for the console, the CLI and alarms. */
export const RECOVERY_ERRORS = {
  /** The input was refused before anything was created. */
  refused: 'RecoveryRefused',
  /** A step failed; the report says which and what was cleaned up. */
  failed: 'RecoveryFailed',
  /** Machines were launched but not all passed their health checks in time. */
  unhealthy: 'MachinesUnhealthy',
  /** What the job created could not be verified gone (the alarm fires). */
  teardownFailed: 'TeardownFailed',
  /** The report could not be written to the catalog. */
  recordFailed: 'RecordFailed',
  /** A migration's final cycle did not publish a checkpoint. */
  finalCycle: 'FinalCycleNotPublished',
  /** A failback's reverse cycle did not publish a checkpoint. */
  reverseCycle: 'ReverseCycleNotPublished',
} as const;

export interface PlanCycle {
  /** The protection plan. */
  readonly plan: string;
  /** What the plan's schedule starts the cycle state machine with. */
  readonly cycleInput: Record<string, unknown>;
}

export interface RecoveryStateMachineProps {
  readonly stateMachineName: string;
  readonly recovery: lambda.IFunction;
  /** The cycle state machine: a migration runs one last cycle of the plan first. */
  readonly cycle: sfn.IStateMachine;
  /** Each plan's cycle input, as its schedule gives it (the migration's final cycle). */
  readonly plans: readonly PlanCycle[];
  readonly logGroup: logs.ILogGroup;
}

// Where an execution keeps things (JSONPath has no variables):
//   $.request   the operator's input            $.jobId     the job (given, or the execution name)
//   $.resolved  {job: resolve's answer, report: its part of the report}
//   $.r.<part>  the other parts of the report, each an object (`{}` until its step ran)
//   $.healthLoop, $.teardownLoop  the loops' counters
//   $.failback  prepare-failback's answer   $.reverse   the reverse cycle's checkpoint, for the report and the cutover
// `record` gets the parts merged into one object (recoveryReportInputSchema): the machine does no
// arithmetic and builds no report itself.
const LATER_PARTS = ['failback', 'launch', 'health', 'pause', 'teardown', 'verify', 'failure'] as const;
const REPORT_PART_PATHS = ['$.r.base', '$.resolved.report', ...LATER_PARTS.map((p) => `$.r.${p}`)];

/** `States.JsonMerge` of every report part, in order (AWS allows intrinsics ten deep: this is eight). */
const mergedReport = REPORT_PART_PATHS.slice(1).reduce(
  (acc, path) => `States.JsonMerge(${acc}, ${path}, false)`,
  REPORT_PART_PATHS[0]!,
);

export class RecoveryStateMachine extends Construct {
  readonly stateMachine: sfn.StateMachine;

  constructor(scope: Construct, id: string, props: RecoveryStateMachineProps) {
    super(scope, id);

    /**
     * An action of the recovery Lambda; its answer shaped by `resultSelector`, kept at `resultPath`.
     * The event is `payload`, or with a string the object at that path (built by a Pass before it:
     * a direct Lambda task's event must be an object, not an intrinsic's result).
     */
    const action = (
      name: string,
      payload: sfn.TaskInput | string | undefined,
      resultPath: string | undefined,
      resultSelector?: Record<string, unknown>,
    ) => {
      return lambdaTask(this, name, {
        fn: props.recovery,
        ...(typeof payload === 'string' ? { inputPath: payload } : { payload }),
        resultPath,
        resultSelector,
        permanentErrors: RECOVERY_PERMANENT_ERRORS,
      });
    };
    const retryStart = (task: tasks.StepFunctionsStartExecution) =>
      retryStartExecution(task, FINAL_CYCLE_RETRIES);
    const refuse = (name: string, cause: string) =>
      new sfn.Fail(this, name, { error: RECOVERY_ERRORS.refused, cause });
    const payload = (fields: Record<string, unknown>) => sfn.TaskInput.fromObject(fields);
    const job = { 'jobId.$': '$.jobId' };

    // ---- the end: record the report, then end as its outcome says --------------------------------

    const recordFailed = new sfn.Fail(this, 'Report not recorded', {
      error: RECOVERY_ERRORS.recordFailed,
      causePath: '$.recordError.Cause',
    });
    const record = action(
      'Record report',
      payload({ action: 'record', ...job, 'report.$': mergedReport }),
      '$.report',
    );
    record.addCatch(recordFailed, { errors: ['States.ALL'], resultPath: '$.recordError' });
    const outcome = (value: string) => sfn.Condition.stringEquals('$.report.outcome', value);
    record.next(
      new sfn.Choice(this, 'Outcome?')
        .when(
          sfn.Condition.or(outcome('succeeded'), outcome('cleaned-up')),
          new sfn.Succeed(this, 'Recovered', { outputPath: '$.report' }),
        )
        .when(
          outcome('unhealthy'),
          new sfn.Fail(this, 'Machines unhealthy', {
            error: RECOVERY_ERRORS.unhealthy,
            cause: 'machines were launched but did not all pass their status checks in time (see the report)',
          }),
        )
        .when(
          outcome('cleanup-failed'),
          new sfn.Fail(this, 'Teardown failed', {
            error: RECOVERY_ERRORS.teardownFailed,
            cause: 'what the job created could not be verified gone: see the report, run a cleanup again',
          }),
        )
        .when(
          sfn.Condition.and(
            sfn.Condition.isPresent('$.report.error'),
            sfn.Condition.isString('$.report.error'),
          ),
          new sfn.Fail(this, 'Recovery failed', {
            error: RECOVERY_ERRORS.failed,
            causePath: '$.report.error',
          }),
        )
        // A causePath that points nowhere would fail the execution with States.Runtime instead.
        .otherwise(
          new sfn.Fail(this, 'Recovery failed without a reason', {
            error: RECOVERY_ERRORS.failed,
            cause: 'the job did not succeed: see the report in the catalog and the execution history',
          }),
        ),
    );

    // ---- teardown: delete by tag, verify by tag, a few rounds, then alarm --------------------------

    // Each round is given what the rounds before it removed ($.r.teardown, `{}` before the first), so
    // the report counts the whole teardown, not only its last round.
    const teardown = action(
      'Teardown',
      payload({ action: 'teardown', ...job, 'previous.$': '$.r.teardown' }),
      '$.r.teardown',
      {
        'teardown.$': '$',
      },
    );
    const verify = action('Verify teardown', payload({ action: 'verify-teardown', ...job }), '$.r.verify', {
      'verify.$': '$',
    });
    const alarm = new sfn.CustomState(this, 'Teardown failed: alarm', {
      stateJson: {
        Type: 'Task',
        Resource: 'arn:aws:states:::aws-sdk:cloudwatch:putMetricData',
        Parameters: {
          Namespace: TEARDOWN_FAILED_METRIC.namespace,
          MetricData: [
            {
              MetricName: TEARDOWN_FAILED_METRIC.metricName,
              Dimensions: [{ Name: TEARDOWN_FAILED_METRIC.dimension, Value: props.stateMachineName }],
              Unit: 'Count',
              Value: 1,
            },
          ],
        },
        ResultPath: null,
      },
    });
    alarm.addRetry({
      errors: ['States.TaskFailed'],
      interval: Duration.seconds(2),
      maxAttempts: 3,
      backoffRate: 2,
      jitterStrategy: sfn.JitterType.FULL,
    });
    // The alarm is best effort: the report is recorded and the execution fails either way.
    alarm.addCatch(record, { errors: ['States.ALL'], resultPath: '$.alarmError' });
    alarm.next(record);
    const again = new sfn.Choice(this, 'Teardown: try again?')
      .when(sfn.Condition.numberGreaterThanEquals('$.teardownLoop.count', TEARDOWN_ATTEMPTS - 1), alarm)
      .otherwise(
        new sfn.Pass(this, 'Teardown: count round', {
          parameters: { 'count.$': 'States.MathAdd($.teardownLoop.count, 1)' },
          resultPath: '$.teardownLoop',
        })
          .next(
            new sfn.Wait(this, 'Wait before teardown again', {
              time: sfn.WaitTime.duration(Duration.seconds(TEARDOWN_RETRY_SECONDS)),
            }),
          )
          .next(teardown),
      );
    teardown.addCatch(again, { errors: ['States.ALL'], resultPath: '$.teardownError' });
    verify.addCatch(again, { errors: ['States.ALL'], resultPath: '$.teardownError' });
    teardown.next(verify);
    verify.next(
      new sfn.Choice(this, 'Torn down?')
        .when(sfn.Condition.booleanEquals('$.r.verify.verify.clean', true), record)
        .otherwise(again),
    );

    // ---- a failed step: drills are torn down at once, everything is reported ---------------------

    const stepFailed = new sfn.Pass(this, 'Step failed', {
      parameters: { 'error.$': '$.caught' },
      resultPath: '$.r.failure',
    }).next(
      new sfn.Choice(this, 'Failed: a drill?')
        .when(sfn.Condition.stringEquals('$.request.mode', 'drill'), teardown)
        .otherwise(record),
    );
    const catchStep = { errors: ['States.ALL'], resultPath: '$.caught' };

    // ---- after the machines are up ------------------------------------------------------------------

    const waitTtl = new sfn.Wait(this, 'Drill: wait for TTL', {
      time: sfn.WaitTime.secondsPath('$.resolved.job.ttlSeconds'),
    });
    waitTtl.next(teardown);
    const pause = action(
      'Pause schedule',
      payload({ action: 'pause', ...job, 'plan.$': '$.resolved.job.plan' }),
      '$.r.pause',
      { 'pause.$': '$' },
    );
    pause.addCatch(stepFailed, catchStep);
    pause.next(record);
    const machinesUp = new sfn.Choice(this, 'Machines up: mode?')
      .when(sfn.Condition.stringEquals('$.request.mode', 'drill'), waitTtl)
      .when(
        sfn.Condition.or(
          sfn.Condition.stringEquals('$.request.mode', 'failover'),
          sfn.Condition.stringEquals('$.request.mode', 'migration'),
        ),
        pause,
      )
      .otherwise(record);

    // ---- health: the action says when it is done (all healthy, one failed for good, timed out) -----

    const health = action(
      'Check health',
      payload({
        action: 'health',
        ...job,
        'launched.$': '$.r.launch.launched',
        'startedAt.$': '$.resolved.job.startedAt',
        'previous.$': '$.healthLoop.previous',
        timeoutSeconds: HEALTH_TIMEOUT_SECONDS,
      }),
      '$.r.health',
      { 'health.$': '$' },
    );
    health.addCatch(stepFailed, catchStep);
    const waitHealth = new sfn.Wait(this, 'Wait for status checks', {
      time: sfn.WaitTime.duration(Duration.seconds(HEALTH_POLL_SECONDS)),
    });
    waitHealth.next(health);
    health.next(
      new sfn.Choice(this, 'Healthy yet?')
        .when(sfn.Condition.booleanEquals('$.r.health.health.done', true), machinesUp)
        // A backstop only: the action's own timeout ends the loop before this.
        .when(sfn.Condition.numberGreaterThanEquals('$.healthLoop.count', MAX_HEALTH_POLLS - 1), machinesUp)
        .otherwise(
          new sfn.Pass(this, 'Health: count check', {
            parameters: {
              'count.$': 'States.MathAdd($.healthLoop.count, 1)',
              'previous.$': '$.r.health.health',
            },
            resultPath: '$.healthLoop',
          }).next(waitHealth),
        ),
    );

    // ---- launch: one Map iteration per machine --------------------------------------------------

    const launch = new sfn.Map(this, 'Launch machines', {
      itemsPath: '$.resolved.job.machines',
      itemSelector: {
        action: 'launch',
        'jobId.$': '$.jobId',
        'mode.$': '$.resolved.job.mode',
        'plan.$': '$.resolved.job.plan',
        'machine.$': '$$.Map.Item.Value',
      },
      maxConcurrency: LAUNCH_CONCURRENCY,
      resultSelector: { 'launched.$': '$' },
      resultPath: '$.r.launch',
    });
    // The Map item is the launch event.
    launch.itemProcessor(action('Launch machine', undefined, undefined));
    launch.addCatch(stepFailed, catchStep);
    launch.next(health);

    // ---- resolve: everything validated before anything is created --------------------------------

    const refused = new sfn.Fail(this, 'Recovery refused', {
      errorPath: '$.caught.Error',
      causePath: '$.caught.Cause',
    });
    /** Resolve's answer: the job, and the report's part of it. */
    const resolveSelector = {
      'job.$': '$',
      report: { 'set.$': '$.set', 'checkpoint.$': '$.checkpoint', 'machines.$': '$.machines' },
    };
    /** A Pass that puts the object an intrinsic builds at `$.event.<name>`, for a task's InputPath. */
    const event = (name: string, intrinsic: string) =>
      new sfn.Pass(this, name, { parameters: { 'value.$': intrinsic }, resultPath: '$.event' });
    const resolve = action('Resolve', '$.event.value', '$.resolved', resolveSelector);
    resolve.addCatch(refused, catchStep);
    // The operator's input is the resolve event, with the action and the job id.
    const resolveEvent = event('Resolve: event', 'States.JsonMerge($.request, $.resolveArgs, false)');
    resolveEvent.next(resolve);
    resolve.next(launch);

    // ---- migration: validate, one last cycle of the plan, then exactly its checkpoint -------------

    // A migration's resolve events: `validate` checks the request as a failover of the latest
    // checkpoint would (same machines, subnets and boot checks; nothing is created) before the final
    // cycle runs; `final` recovers exactly the checkpoint that cycle published.
    const migrationArgs = (name: string, withMachines: boolean) => {
      const event = (mode: string) => ({
        action: 'resolve',
        'jobId.$': '$.jobId',
        mode,
        'plan.$': '$.request.plan',
        ...(withMachines ? { 'machines.$': '$.request.machines' } : {}),
      });
      return new sfn.Pass(this, name, {
        parameters: { validate: event('failover'), final: event('migration') },
        resultPath: '$.migrationArgs',
      });
    };
    const validateMigration = action(
      'Validate migration',
      '$.migrationArgs.validate',
      '$.resolved',
      resolveSelector,
    );
    validateMigration.addCatch(refused, catchStep);
    const unknownPlan = new sfn.Pass(this, 'Final cycle: unknown plan', {
      parameters: {
        Error: RECOVERY_ERRORS.refused,
        'Cause.$': "States.Format('plan {} is not a protection plan of this stack', $.request.plan)",
      },
      resultPath: '$.caught',
    }).next(refused);
    /** The final cycle of each plan: its schedule's input, a .sync child of the cycle machine. */
    const finalCycleOfPlan = (): sfn.IChainable => {
      const resolveMigration = action(
        'Resolve final checkpoint',
        '$.event.value',
        '$.resolved',
        resolveSelector,
      );
      resolveMigration.addCatch(stepFailed, catchStep);
      const finalEvent = event(
        'Resolve final checkpoint: event',
        'States.JsonMerge($.migrationArgs.final, $.finalCycleArgs, false)',
      );
      finalEvent.next(resolveMigration);
      resolveMigration.next(launch);

      const finalCycle = new tasks.StepFunctionsStartExecution(this, 'Final cycle', {
        stateMachine: props.cycle,
        integrationPattern: sfn.IntegrationPattern.RUN_JOB,
        input: sfn.TaskInput.fromObject({
          'plan.$': '$.cycleInput.plan',
          'set.$': '$.cycleInput.set',
          'disks.$': '$.cycleInput.disks',
          'params.$': '$.cycleInput.params',
        }),
        associateWithParent: true,
        resultSelector: { 'output.$': '$.Output' },
        resultPath: '$.finalCycle',
      });
      retryStart(finalCycle);
      finalCycle.addCatch(stepFailed, catchStep);
      finalCycle.next(
        new sfn.Choice(this, 'Final cycle published?')
          .when(
            sfn.Condition.and(
              sfn.Condition.isPresent('$.finalCycle.output.status'),
              sfn.Condition.stringEquals('$.finalCycle.output.status', 'published'),
              sfn.Condition.isPresent('$.finalCycle.output.checkpointId'),
            ),
            new sfn.Pass(this, 'Final checkpoint', {
              parameters: { finalCycle: { 'checkpointId.$': '$.finalCycle.output.checkpointId' } },
              resultPath: '$.finalCycleArgs',
            }).next(finalEvent),
          )
          .otherwise(
            new sfn.Pass(this, 'Final cycle not published', {
              parameters: {
                Error: RECOVERY_ERRORS.finalCycle,
                Cause:
                  'the final cycle ended without publishing a checkpoint (another cycle of the plan held its lock?): nothing was launched',
              },
              resultPath: '$.caught',
            }).next(stepFailed),
          ),
      );
      const cycleOfPlan = new sfn.Choice(this, 'Final cycle: plan?');
      props.plans.forEach((p, i) => {
        cycleOfPlan.when(
          sfn.Condition.stringEquals('$.request.plan', p.plan),
          new sfn.Pass(this, `Final cycle input ${i + 1}`, {
            comment: `plan ${p.plan}`,
            result: sfn.Result.fromObject(p.cycleInput),
            resultPath: '$.cycleInput',
          }).next(finalCycle),
        );
      });
      cycleOfPlan.otherwise(unknownPlan);
      return cycleOfPlan;
    };
    // A Choice needs a rule, and unreachable states are invalid: a stack without plans has no cycle.
    validateMigration.next(props.plans.length > 0 ? finalCycleOfPlan() : unknownPlan);

    const quiesced = (name: string, value: boolean | undefined) =>
      new sfn.Pass(this, name, {
        parameters: {
          'mode.$': '$.r.base.mode',
          'plan.$': '$.r.base.plan',
          'startedAt.$': '$.r.base.startedAt',
          ...(value === undefined
            ? { 'sourceQuiesced.$': '$.request.sourceQuiesced' }
            : { sourceQuiesced: value }),
        },
        resultPath: '$.r.base',
      });
    const machinesGiven = sfn.Condition.isPresent('$.request.machines');
    const migration = new sfn.Choice(this, 'Migration: input?')
      .when(
        sfn.Condition.or(
          sfn.Condition.isPresent('$.request.checkpoint'),
          sfn.Condition.isPresent('$.request.ttlMinutes'),
        ),
        refuse(
          'Migration: checkpoint given',
          'a migration recovers the checkpoint its final cycle publishes: give no checkpoint or ttlMinutes',
        ),
      )
      .when(
        sfn.Condition.and(
          sfn.Condition.isPresent('$.request.sourceQuiesced'),
          sfn.Condition.not(sfn.Condition.isBoolean('$.request.sourceQuiesced')),
        ),
        refuse('Migration: bad sourceQuiesced', 'sourceQuiesced must be true or false'),
      )
      .when(
        sfn.Condition.isPresent('$.request.sourceQuiesced'),
        quiesced('Migration: quiesced as given', undefined).next(
          new sfn.Choice(this, 'Migration: machines given?')
            .when(machinesGiven, migrationArgs('Migration args with machines', true).next(validateMigration))
            .otherwise(migrationArgs('Migration args', false).next(validateMigration)),
        ),
      )
      .otherwise(
        quiesced('Migration: not quiesced', false).next(
          new sfn.Choice(this, 'Migration: machines given? (not quiesced)')
            .when(
              machinesGiven,
              migrationArgs('Migration args with machines (not quiesced)', true).next(validateMigration),
            )
            .otherwise(migrationArgs('Migration args (not quiesced)', false).next(validateMigration)),
        ),
      );

    // ---- failback: the recovered volumes back to the original side, then (cutover) its machines -----

    // prepare-failback finds the plan's failover, each disk's recovered volume and the checkpoint both
    // sides share, and builds the reverse cycle's input (with that checkpoint as its base the first
    // time) and, for a cutover, the resolve event that relaunches the plan's machines from the
    // reverse checkpoint. Nothing is created before it answers.
    const prepareFailback = action('Prepare failback', '$.event.value', '$.failback');
    prepareFailback.addCatch(refused, catchStep);
    const failbackEvent = event(
      'Prepare failback: event',
      'States.JsonMerge($.request, $.failbackArgs, false)',
    );
    failbackEvent.next(prepareFailback);
    /** The reverse cycle, a .sync child of the cycle machine (linked to this execution in the console). */
    const reverseCycleTask = (name: string, withBase: boolean) => {
      const task = new tasks.StepFunctionsStartExecution(this, name, {
        stateMachine: props.cycle,
        integrationPattern: sfn.IntegrationPattern.RUN_JOB,
        input: sfn.TaskInput.fromObject({
          'plan.$': '$.failback.cycleInput.plan',
          'set.$': '$.failback.cycleInput.set',
          'disks.$': '$.failback.cycleInput.disks',
          ...(withBase ? { 'base.$': '$.failback.cycleInput.base' } : {}),
        }),
        associateWithParent: true,
        resultSelector: { 'output.$': '$.Output' },
        resultPath: '$.reverseCycle',
      });
      retryStart(task);
      task.addCatch(stepFailed, catchStep);
      return task;
    };
    // The reverse set's first cycle starts from the shared checkpoint; later ones from the set's own.
    const reverseFromBase = reverseCycleTask('Reverse cycle from the shared checkpoint', true);
    const reverseNext = reverseCycleTask('Reverse cycle', false);
    prepareFailback.next(
      new sfn.Pass(this, 'Failback: report part', {
        parameters: { 'failback.$': '$.failback.part' },
        resultPath: '$.r.failback',
      }).next(
        new sfn.Choice(this, 'Reverse cycle: base?')
          .when(sfn.Condition.isPresent('$.failback.cycleInput.base'), reverseFromBase)
          .otherwise(reverseNext),
      ),
    );
    const resolveCutover = action('Resolve cutover', '$.event.value', '$.resolved', resolveSelector);
    resolveCutover.addCatch(stepFailed, catchStep);
    resolveCutover.next(launch);
    const cutoverEvent = event(
      'Resolve cutover: event',
      'States.JsonMerge($.failback.cutoverResolve, $.reverse.forResolve, false)',
    );
    cutoverEvent.next(resolveCutover);
    const reversePublished = new sfn.Choice(this, 'Reverse cycle published?')
      .when(
        sfn.Condition.and(
          sfn.Condition.isPresent('$.reverseCycle.output.status'),
          sfn.Condition.stringEquals('$.reverseCycle.output.status', 'published'),
          sfn.Condition.isPresent('$.reverseCycle.output.checkpointId'),
        ),
        new sfn.Pass(this, 'Reverse checkpoint', {
          parameters: {
            forReport: { 'reverseCheckpointId.$': '$.reverseCycle.output.checkpointId' },
            forResolve: { finalCycle: { 'checkpointId.$': '$.reverseCycle.output.checkpointId' } },
          },
          resultPath: '$.reverse',
        })
          .next(
            new sfn.Pass(this, 'Failback: reverse checkpoint in the report', {
              parameters: {
                'failback.$': 'States.JsonMerge($.failback.part, $.reverse.forReport, false)',
              },
              resultPath: '$.r.failback',
            }),
          )
          .next(
            new sfn.Choice(this, 'Cutover?')
              .when(
                sfn.Condition.and(
                  sfn.Condition.isPresent('$.failback.cutoverResolve'),
                  sfn.Condition.booleanEquals('$.failback.part.cutover', true),
                ),
                cutoverEvent,
              )
              .otherwise(record),
          ),
      )
      .otherwise(
        new sfn.Pass(this, 'Reverse cycle not published', {
          parameters: {
            Error: RECOVERY_ERRORS.reverseCycle,
            Cause:
              'the reverse cycle ended without publishing a checkpoint (another cycle of the reverse set held its lock?): nothing was launched',
          },
          resultPath: '$.caught',
        }).next(stepFailed),
      );
    reverseFromBase.next(reversePublished);
    reverseNext.next(reversePublished);

    // ---- entry -------------------------------------------------------------------------------------

    const start = (name: string, jobIdPath: string) =>
      new sfn.Pass(this, name, {
        parameters: {
          'request.$': '$',
          'jobId.$': jobIdPath,
          resolveArgs: { action: 'resolve', 'jobId.$': jobIdPath },
          failbackArgs: { action: 'prepare-failback', 'jobId.$': jobIdPath },
          resolved: { report: {} },
          r: {
            base: {
              'mode.$': '$.mode',
              'plan.$': '$.plan',
              'startedAt.$': '$$.Execution.StartTime',
            },
            ...Object.fromEntries(LATER_PARTS.map((p) => [p, {}])),
          },
          healthLoop: { count: 0, previous: { done: false, healthy: false, machines: [] } },
          teardownLoop: { count: 0 },
        },
      }).next(
        new sfn.Choice(this, `Mode? (${name})`)
          .when(sfn.Condition.stringEquals('$.request.mode', 'cleanup'), teardown)
          .when(sfn.Condition.stringEquals('$.request.mode', 'migration'), migration)
          .when(sfn.Condition.stringEquals('$.request.mode', 'failback'), failbackEvent)
          .otherwise(resolveEvent),
      );

    const isString = (path: string) =>
      sfn.Condition.and(sfn.Condition.isPresent(path), sfn.Condition.isString(path));
    const entry = new sfn.Choice(this, 'Check request')
      .when(
        sfn.Condition.not(isString('$.mode')),
        refuse('No mode', 'the input needs "mode": drill, failover, migration, failback or cleanup'),
      )
      .when(
        sfn.Condition.not(isString('$.plan')),
        refuse('No plan', 'the input needs "plan": the protection plan'),
      )
      .when(
        sfn.Condition.and(
          sfn.Condition.stringEquals('$.mode', 'cleanup'),
          sfn.Condition.not(isString('$.jobId')),
        ),
        refuse('Cleanup without job', 'a cleanup needs "jobId": the recovery job to tear down'),
      )
      .when(isString('$.jobId'), start('Given job', '$.jobId'))
      .otherwise(start('New job', '$$.Execution.Name'));

    this.stateMachine = new sfn.StateMachine(this, 'StateMachine', {
      stateMachineName: props.stateMachineName,
      stateMachineType: sfn.StateMachineType.STANDARD,
      queryLanguage: sfn.QueryLanguage.JSON_PATH,
      comment:
        'Ferry recovery: resolve a checkpoint, launch its machines, check their health, then tear a drill down ' +
        'at its TTL or pause the plan for a failover/migration; cleanup tears a job down on command. See infra/README.md.',
      definitionBody: sfn.DefinitionBody.fromChainable(entry),
      tracingEnabled: true,
      logs: { destination: props.logGroup, level: sfn.LogLevel.ALL, includeExecutionData: true },
    });

    this.stateMachine.addToRolePolicy(
      new iam.PolicyStatement({
        sid: 'TeardownFailedMetric',
        actions: ['cloudwatch:PutMetricData'],
        resources: ['*'],
        conditions: { StringEquals: { 'cloudwatch:namespace': TEARDOWN_FAILED_METRIC.namespace } },
      }),
    );
  }
}

// ---- the event-history budget (Standard workflows fail at 25,000 events) -------------------------

// Events per state, as history-budget.ts counts them for the cycle machine: a task 5 (and 3 per
// retried attempt), a Pass/Choice/Wait/Succeed/Fail 2, a .sync StartExecution 6, a Map 4 and 2 per
// item, the execution's start and end 2.
const TASK = 5;
const RETRY = 3;
const SIMPLE = 2;
const SYNC_TASK = 6;
const MAP = 4;
const MAP_ITEM = 2;
const EXECUTION = 2;
const FINAL_CYCLE_RETRIES = 3;

/**
 * An upper bound on one execution's history: every path's states added together (no execution takes
 * them all), every task using every retry, every loop its full bound, MAX_MACHINES machines.
 */
export function recoveryHistoryWorst(): number {
  const lambda = TASK + RETRY * (LAMBDA_SERVICE_RETRIES + HANDLER_RETRIES);
  const start = EXECUTION + 3 * SIMPLE; // check, job, mode
  const migration =
    4 * SIMPLE + lambda + 2 * SIMPLE + SYNC_TASK + RETRY * FINAL_CYCLE_RETRIES + 3 * SIMPLE + lambda;
  const failback =
    SIMPLE + lambda + 2 * SIMPLE + SYNC_TASK + RETRY * FINAL_CYCLE_RETRIES + 4 * SIMPLE + SIMPLE + lambda;
  const resolve = SIMPLE + lambda;
  const launch = MAP + MAX_MACHINES * (MAP_ITEM + lambda);
  const health = MAX_HEALTH_POLLS * (lambda + 3 * SIMPLE);
  const after = 2 * SIMPLE + lambda; // mode, TTL wait, pause
  const teardown = TEARDOWN_ATTEMPTS * (2 * lambda + 4 * SIMPLE) + TASK + RETRY * 3;
  const failure = 2 * SIMPLE;
  const end = lambda + 2 * SIMPLE;
  return start + migration + failback + resolve + launch + health + after + teardown + failure + end;
}
