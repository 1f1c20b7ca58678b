// The local cloud: the synthesized FerryStack run on one machine. The cycle state machine's plain ASL
// runs in aws-local-stepfunctions; its Lambda task states invoke the real `handler` exports
// in-process (configured, as deployed, from their template environment, with the SDK's
// AWS_ENDPOINT_URL_<SERVICE> pointing at DynamoDB, SQS and EBS emulators); its EC2 states run
// against LocalEc2 (volumes in memory, snapshots in the EBS emulator); its child executions run the
// same definition recursively; its Wait states are shortened (`waits: 'fast'`, for tests and the demo)
// or run as synthesized (`waits: 'real'`, for a measurement whose Step Functions transitions must be
// what AWS would bill). A local event source mapping feeds the grant queue to the chunk-writer while
// an execution runs.
//
// One LocalCloud per process: Lambda handlers keep their container (clients, configuration) in
// module state, as they do in Lambda, so the first cloud's environment is theirs for good.
import { CreateTableCommand, DescribeTableCommand, DynamoDBClient } from '@aws-sdk/client-dynamodb';
import type { EBSClient } from '@aws-sdk/client-ebs';
import { SQSClient } from '@aws-sdk/client-sqs';
import type { SQSEvent } from 'aws-lambda';
import { ExecutionError, StateMachine, type StateMachineDefinition } from 'aws-local-stepfunctions';
import { handler as chunkWriterHandler } from '../functions/chunk-writer/handler.ts';
import type { FunctionName } from '../functions/contracts.ts';
import { ENV_DEFAULTS } from '../functions/contracts.ts';
import { handler as differHandler } from '../functions/differ/handler.ts';
import { handler as finalizerHandler } from '../functions/finalizer/handler.ts';
import { handler as plannerHandler } from '../functions/planner/handler.ts';
import { EC2_MODULE, EVENTBRIDGE_MODULE, provideRuntimeModule } from '../functions/shared/optional-sdk.ts';
import { clients, onClientCreated } from '../functions/shared/runtime.ts';
import { tableDefinition } from '../shared/aws/dynamo/schema.ts';
import { DynamoStateStore } from '../shared/aws/dynamo/state-store.ts';
import { createEbsClient } from '../shared/aws/ebs/client.ts';
import { createGrantQueue } from '../shared/aws/sqs/grant-queue.ts';
import type { RecoveryCheckpoint } from '../shared/engine/ports.ts';
import {
  allStates,
  ensurePromiseWithResolvers,
  FAKE,
  logicalIdOfFakeArn,
  type WaitLoop,
  waitLoops,
} from './asl.ts';
import type { CycleWork } from './cost.ts';
import { Ec2Error, LocalEc2, type SnapshotStore } from './ec2.ts';
import {
  type EventSourceStats,
  LocalEventSource,
  type WriterBatchReport,
  type WriterFaults,
} from './event-source.ts';
import {
  currentFunction,
  type Handler,
  type InvocationResult,
  instrumentClients,
  invokeLambda,
  type KillSwitch,
} from './lambda.ts';
import type { LocalExecutionEnd, LocalMachine } from './recovery.ts';
import {
  type DeployedFunction,
  type DeployedStack,
  resolveEnvironment,
  synthesizeDeployment,
} from './synth.ts';
import { diffUsage, type Usage, UsageMeter } from './usage.ts';
import { compareSnapshot, type SnapshotComparison } from './verify.ts';

type Json = Record<string, unknown>;

/** The handler each function's entry exports: what Lambda would run. */
const HANDLERS: Record<FunctionName, Handler> = {
  planner: plannerHandler,
  differ: differHandler,
  'chunk-writer': chunkWriterHandler,
  finalizer: finalizerHandler,
};

// ---- tuning -------------------------------------------------------------------------------------

/**
 * Defaults of a fast local run (`waits: 'fast'`), each with its reason. The deployment's own values
 * stay where they fit; with `waits: 'real'` the timing ones are the deployment's too (localSettings).
 */
export const LOCAL_DEFAULTS = Object.freeze({
  // Every Wait state (10 s between ticks, 60 s between snapshot polls) and every retry pause: the
  // loops run as deployed, only faster; a small cycle takes seconds.
  waitMs: 200,
  // LEASE_SECONDS at its minimum: a killed writer's grants are reclaimed after 10 s, not 5 minutes.
  leaseSeconds: 10,
  // Ticks without progress before the planner says "stuck": scaled with the shorter wait (about a
  // minute at 200 ms), so a 10 s lease expiry is not mistaken for a stall.
  stuckTicks: 300,
  // The local grant queue's visibility timeout. As deployed (30 minutes against a 5-minute lease) it
  // is longer than the lease, so a dead writer's grants are reclaimed by the planner, not redelivered.
  visibilityTimeoutSeconds: 20,
  // Writer invocations at once with fast waits (the deployment allows `writerConcurrency`, 20 by
  // default): enough to run several batches in parallel on a laptop without drowning it. Real waits
  // run one at a time (REAL_WAITS_WRITER_CONCURRENCY).
  writerConcurrency: 4,
  // The event source's long-poll wait per ReceiveMessage: short, so a stop is noticed quickly.
  pollWaitSeconds: 1,
});

/**
 * Writer invocations at once with real waits, the measuring mode: one. Invocations here share one
 * Node process and its CPU, so with four at once each one's measured duration (the Lambda GB-s the
 * cost is computed from) also holds the other three's work: 3.5x longer per invocation, for the same
 * cycle time (a small cycle measured both ways). On Lambda each invocation has its own CPU.
 */
export const REAL_WAITS_WRITER_CONCURRENCY = 1;

/** Lambda's SQS event source mapping long-polls for 20 s (the most SQS allows). */
const ESM_POLL_WAIT_SECONDS = 20;

/**
 * How Wait states and retry pauses run: 'fast' cuts them all to `waitMs` (a small cycle takes
 * seconds, but it goes round its tick loop many more times than on AWS, so its Step Functions
 * transitions are not AWS's); 'real' runs them as synthesized (10 s between ticks, 60 s between
 * snapshot polls), with the deployment's lease, stuck-tick limit, visibility timeout and long poll.
 */
export type WaitMode = 'fast' | 'real';

/** AWS's default task timeout (99999999 s) overflows a Node timer; this is as good as none locally. */
const NO_TASK_TIMEOUT_SECONDS = 24 * 24 * 60 * 60;

export interface LocalCloudOptions {
  readonly endpoints: { readonly dynamodb: string; readonly sqs: string; readonly ebs: string };
  /** Where EC2's snapshots are written: the EBS emulator's state. */
  readonly snapshots: SnapshotStore;
  /** A synthesized deployment; synthesized here (about two seconds) when absent. */
  readonly deployment?: DeployedStack;
  /** 'fast' by default. The options below override what it implies. */
  readonly waits?: WaitMode;
  /** With fast waits: every Wait state and retry pause. */
  readonly waitMs?: number;
  readonly leaseSeconds?: number;
  readonly stuckTicks?: number;
  readonly visibilityTimeoutSeconds?: number;
  /** Writer invocations at once (the event source's maximum): 4 with fast waits, 1 with real. */
  readonly writerConcurrency?: number;
  readonly pollWaitSeconds?: number;
  /** POWERTOOLS_LOG_LEVEL of the functions; SILENT by default (the run reports through events). */
  readonly logLevel?: string;
}

/** What a local run's timing was: recorded with every measurement, so its counts can be read. */
export interface LocalCloudSettings {
  readonly waits: WaitMode;
  /** With fast waits, the length of every Wait state and retry pause; absent: as synthesized. */
  readonly waitMs?: number;
  readonly leaseSeconds: number;
  readonly stuckTicks: number;
  readonly visibilityTimeoutSeconds: number;
  /** Writer invocations at once: above one, each one's measured duration holds the others' work. */
  readonly writerConcurrency: number;
  readonly pollWaitSeconds: number;
  /** The definition's Wait loops, with their synthesized durations (honoured with real waits only). */
  readonly waitLoops: readonly WaitLoop[];
}

/** A function setting as the template sets it, else the handlers' default. */
function deployedSetting(deployment: DeployedStack, key: 'LEASE_SECONDS' | 'STUCK_TICKS'): number {
  const set = deployment.functions.map((f) => f.environment[key]).find((v) => v !== undefined);
  return typeof set === 'string' || typeof set === 'number' ? Number(set) : ENV_DEFAULTS[key];
}

/** The settings `opts` imply for `deployment`: fast waits' local defaults, or the deployment's. */
export function localSettings(
  opts: Pick<
    LocalCloudOptions,
    | 'waits'
    | 'waitMs'
    | 'leaseSeconds'
    | 'stuckTicks'
    | 'visibilityTimeoutSeconds'
    | 'writerConcurrency'
    | 'pollWaitSeconds'
  >,
  deployment: DeployedStack,
): LocalCloudSettings {
  const real = opts.waits === 'real';
  const waitMs = opts.waitMs ?? LOCAL_DEFAULTS.waitMs;
  return {
    waits: real ? 'real' : 'fast',
    ...(real ? {} : { waitMs }),
    leaseSeconds:
      opts.leaseSeconds ??
      (real ? deployedSetting(deployment, 'LEASE_SECONDS') : LOCAL_DEFAULTS.leaseSeconds),
    stuckTicks:
      opts.stuckTicks ?? (real ? deployedSetting(deployment, 'STUCK_TICKS') : LOCAL_DEFAULTS.stuckTicks),
    visibilityTimeoutSeconds:
      opts.visibilityTimeoutSeconds ??
      (real ? deployment.queue.visibilityTimeoutSeconds : LOCAL_DEFAULTS.visibilityTimeoutSeconds),
    writerConcurrency: Math.min(
      opts.writerConcurrency ?? (real ? REAL_WAITS_WRITER_CONCURRENCY : LOCAL_DEFAULTS.writerConcurrency),
      deployment.eventSource.maximumConcurrency ?? Number.POSITIVE_INFINITY,
    ),
    pollWaitSeconds: opts.pollWaitSeconds ?? (real ? ESM_POLL_WAIT_SECONDS : LOCAL_DEFAULTS.pollWaitSeconds),
    waitLoops: waitLoops(deployment.definition),
  };
}

/** What a run reports as it goes; the CLI prints these. */
export type LocalCloudEvent =
  | {
      readonly kind: 'execution';
      readonly execution: string;
      readonly depth: number;
      readonly type: 'ExecutionStarted' | 'ExecutionSucceeded' | 'ExecutionFailed';
      readonly error?: string;
      readonly cause?: string;
    }
  | {
      readonly kind: 'state';
      readonly execution: string;
      readonly depth: number;
      readonly type: 'StateEntered' | 'StateExited' | 'StateFailed' | 'StateRetried' | 'StateCaught';
      readonly state: string;
      readonly stateType: string;
      /** The Map iteration, inside a Map state. */
      readonly index?: number;
      readonly output?: unknown;
      readonly error?: string;
      readonly cause?: string;
    }
  | ({ readonly kind: 'writer' } & WriterBatchReport)
  | {
      readonly kind: 'announcement';
      readonly busName: string;
      readonly source: string;
      readonly detailType: string;
      readonly detail: Json;
    };

export interface RunOptions {
  /** The execution name: the cycle id. */
  readonly name: string;
  readonly onEvent?: (event: LocalCloudEvent) => void;
  readonly faults?: WriterFaults;
}

export interface ExecutionOutcome {
  readonly name: string;
  readonly status: 'SUCCEEDED' | 'FAILED';
  readonly output?: unknown;
  readonly error?: string;
  readonly cause?: string;
  /** Child executions started (await, diff and replicate rounds). */
  readonly children: number;
  readonly writers: EventSourceStats;
  readonly ms: number;
  /** What the execution would be billed for: every request, invocation and transition it caused. */
  readonly usage: Usage;
  /** What it replicated (chunks, blocks, bytes), for the usage per chunk and per GiB. */
  readonly work: CycleWork;
}

/** An EventBridge put, as the local bus keeps it. */
export interface Announcement {
  readonly busName: string;
  readonly source: string;
  readonly detailType: string;
  readonly detail: Json;
}

let started = false;

interface RunContext {
  readonly onEvent: (event: LocalCloudEvent) => void;
  children: number;
  /** The disks of the checkpoint the finalizer published, if it did. */
  published?: readonly { descriptors: number; blocks: number; bytes: number }[];
  /** The disks as the last tick reported them (a cycle that published nothing). */
  lastTick?: readonly { completed: number; completedBytes: number }[];
}

/** 512 KiB: the EBS block, for a tick's completed bytes in blocks. */
const EBS_BLOCK = 512 * 1024;

function cycleWork(ctx: RunContext): CycleWork {
  const add = (xs: readonly number[]) => xs.reduce((a, b) => a + b, 0);
  if (ctx.published !== undefined) {
    return {
      chunks: add(ctx.published.map((d) => d.descriptors)),
      blocks: add(ctx.published.map((d) => d.blocks)),
      bytes: add(ctx.published.map((d) => d.bytes)),
      source: 'finalizer',
    };
  }
  if (ctx.lastTick !== undefined) {
    const bytes = add(ctx.lastTick.map((d) => d.completedBytes));
    return {
      chunks: add(ctx.lastTick.map((d) => d.completed)),
      blocks: Math.ceil(bytes / EBS_BLOCK),
      bytes,
      source: 'tick',
    };
  }
  return { chunks: 0, blocks: 0, bytes: 0, source: 'none' };
}

export class LocalCloud {
  readonly ec2: LocalEc2;
  /** Every announcement the finalizer put on the event bus, in order. */
  readonly announcements: Announcement[] = [];
  /** Every billable request, invocation and transition of the functions and the state machine. */
  readonly meter: UsageMeter;
  private readonly machine: StateMachine;
  private readonly definition: StateMachineDefinition;
  private readonly functions: Map<string, DeployedFunction>;
  private readonly esmSqs: SQSClient;
  private readonly dynamo: DynamoDBClient;
  /** The verifier's own EBS client (not the functions'). */
  private readonly ebs: EBSClient;
  private readonly restoreEnv: () => void;
  private onAnnouncement: ((a: Announcement) => void) | undefined;

  private constructor(
    opts: LocalCloudOptions,
    /** How this cloud times its runs (what `opts` imply for the deployment). */
    readonly settings: LocalCloudSettings,
    readonly deployment: DeployedStack,
    readonly tableName: string,
    readonly queueUrl: string,
    readonly eventBusName: string,
    restoreEnv: () => void,
    esmSqs: SQSClient,
    dynamo: DynamoDBClient,
    meter: UsageMeter,
  ) {
    this.restoreEnv = restoreEnv;
    this.esmSqs = esmSqs;
    this.dynamo = dynamo;
    this.meter = meter;
    this.ebs = createEbsClient({
      endpoint: opts.endpoints.ebs,
      region: FAKE.region,
      credentials: { accessKeyId: 'local', secretAccessKey: 'local' },
    });
    this.ec2 = new LocalEc2(opts.snapshots);
    this.definition = localDefinition(deployment.definition);
    this.machine = new StateMachine(this.definition);
    this.functions = new Map(deployment.functions.map((f) => [f.logicalId, f]));
    provideRuntimeModule(EC2_MODULE, this.countedEc2Module());
    provideRuntimeModule(EVENTBRIDGE_MODULE, this.eventBridgeModule());
  }

  /**
   * Creates the deployment's table and grant queue in the emulators, sets the functions' environment
   * (the template's, with references resolved locally) and points the SDK at the emulators.
   */
  static async start(opts: LocalCloudOptions): Promise<LocalCloud> {
    if (started) throw new Error('one LocalCloud per process: the handlers keep their first environment');
    started = true;
    ensurePromiseWithResolvers();
    const deployment = opts.deployment ?? synthesizeDeployment();
    const settings = localSettings(opts, deployment);
    const credentials = { accessKeyId: 'local', secretAccessKey: 'local' };
    const dynamo = new DynamoDBClient({
      endpoint: opts.endpoints.dynamodb,
      region: FAKE.region,
      credentials,
    });
    const sqs = new SQSClient({ endpoint: opts.endpoints.sqs, region: FAKE.region, credentials });

    const tableName = `${deployment.stackName}-state`;
    await dynamo.send(new CreateTableCommand(tableDefinition(tableName)));
    while (
      (await dynamo.send(new DescribeTableCommand({ TableName: tableName }))).Table?.TableStatus !== 'ACTIVE'
    ) {
      await new Promise((r) => setTimeout(r, 10));
    }
    const { queueUrl } = await createGrantQueue(sqs, {
      name: `${deployment.stackName}-grants`,
      visibilitySeconds: settings.visibilityTimeoutSeconds,
      maxReceiveCount: deployment.queue.maxReceiveCount,
    });
    const eventBusName = `${deployment.stackName}-events`;

    const env = functionsEnvironment(
      deployment,
      { tableName, queueUrl, eventBusName },
      settings,
      opts.logLevel ?? 'SILENT',
    );
    const restoreEnv = setEnvironment({
      ...env,
      AWS_REGION: FAKE.region,
      AWS_ACCESS_KEY_ID: credentials.accessKeyId,
      AWS_SECRET_ACCESS_KEY: credentials.secretAccessKey,
      AWS_SESSION_TOKEN: undefined,
      AWS_ENDPOINT_URL_DYNAMODB: opts.endpoints.dynamodb,
      AWS_ENDPOINT_URL_SQS: opts.endpoints.sqs,
      AWS_ENDPOINT_URL_EBS: opts.endpoints.ebs,
    });
    // Every client the handlers use is made freezable and counted; they are created now, from this
    // environment. The event source mapping's client is counted too: its polls are billed.
    const meter = new UsageMeter(currentFunction);
    onClientCreated((client) => {
      instrumentClients([client]);
      meter.attach(client, 'function');
    });
    clients.dynamo();
    clients.sqs();
    clients.ebs();
    meter.attach(sqs, 'event-source');
    return new LocalCloud(
      opts,
      settings,
      deployment,
      tableName,
      queueUrl,
      eventBusName,
      restoreEnv,
      sqs,
      dynamo,
      meter,
    );
  }

  /**
   * Starts an execution of the cycle state machine with `input` (what a schedule would start it
   * with) and runs it to its end, with the grant queue's event source mapping polling meanwhile.
   */
  async runExecution(input: Json, opts: RunOptions): Promise<ExecutionOutcome> {
    const t0 = performance.now();
    const onEvent = opts.onEvent ?? (() => {});
    const ctx: RunContext = { onEvent, children: 0 };
    const writer = this.functionNamed('chunk-writer');
    const esm = new LocalEventSource({
      sqs: this.esmSqs,
      queueUrl: this.queueUrl,
      batchSize: this.deployment.eventSource.batchSize,
      reportBatchItemFailures: this.deployment.eventSource.reportBatchItemFailures,
      concurrency: this.settings.writerConcurrency,
      waitTimeSeconds: this.settings.pollWaitSeconds,
      invoke: async (event: SQSEvent, kill: KillSwitch | undefined) =>
        this.metered(
          writer,
          await invokeLambda(writer, this.deployment.stackName, HANDLERS[writer.name], event, kill),
        ),
      ...(opts.faults === undefined ? {} : { faults: opts.faults }),
      onBatch: (report) => onEvent({ kind: 'writer', ...report }),
    });
    this.onAnnouncement = (a) => onEvent({ kind: 'announcement', ...a });
    // The execution's usage: from here until the event source has stopped polling (its last empty
    // receives are billed too). One execution at a time, or each counts the other's requests.
    const before = this.meter.snapshot();
    esm.start();
    let run: Awaited<ReturnType<LocalCloud['execute']>>;
    let ms: number;
    try {
      run = await this.execute(input, opts.name, 0, ctx);
      ms = Math.round(performance.now() - t0);
    } finally {
      await esm.stop();
      this.onAnnouncement = undefined;
    }
    return {
      name: opts.name,
      ...run,
      children: ctx.children,
      writers: esm.stats,
      ms,
      usage: diffUsage(this.meter.snapshot(), before),
      work: cycleWork(ctx),
    };
  }

  /**
   * The cycle machine as serveLocalStepFunctions runs it: each execution started there runs here,
   * its top-level states reported as Step Functions' history would show them (child executions have
   * histories of their own). One at a time, as runExecution requires.
   */
  asMachine(): LocalMachine {
    let queue: Promise<unknown> = Promise.resolve();
    return {
      run: (input, name, onStep) => {
        const run = queue.then(async (): Promise<LocalExecutionEnd> => {
          const outcome = await this.runExecution(input, {
            name,
            onEvent: (e) => {
              if (e.kind !== 'state' || e.depth !== 0 || e.type === 'StateExited') return;
              onStep?.({
                type: e.type,
                state: e.state,
                stateType: e.stateType,
                ...(e.error === undefined ? {} : { error: e.error }),
                ...(e.cause === undefined ? {} : { cause: e.cause }),
              });
            },
          });
          return {
            status: outcome.status,
            ...(outcome.output === undefined ? {} : { output: outcome.output }),
            ...(outcome.error === undefined ? {} : { error: outcome.error }),
            ...(outcome.cause === undefined ? {} : { cause: outcome.cause }),
          };
        });
        queue = run.catch(() => undefined);
        return run;
      },
    };
  }

  /** The checkpoint the catalog (DynamoDB) names current for `set`. */
  async latestCheckpoint(set: string): Promise<RecoveryCheckpoint | undefined> {
    return new DynamoStateStore(this.dynamo, this.tableName).latestCheckpoint(set);
  }

  /** Reads `snapshotId` back block by block (ListSnapshotBlocks, GetSnapshotBlock) against `expected`. */
  async compareSnapshot(snapshotId: string, expected: Buffer): Promise<SnapshotComparison> {
    return compareSnapshot({ client: this.ebs }, snapshotId, expected);
  }

  async stop(): Promise<void> {
    await this.ec2.settle();
    this.ebs.destroy();
    this.esmSqs.destroy();
    this.dynamo.destroy();
    this.restoreEnv();
  }

  // ---- executions ------------------------------------------------------------------------------

  private async execute(
    input: Json,
    name: string,
    depth: number,
    ctx: RunContext,
  ): Promise<Pick<ExecutionOutcome, 'status' | 'output' | 'error' | 'cause'>> {
    const executionArn = `arn:aws:states:${FAKE.region}:${FAKE.account}:execution:${this.deployment.stateMachineName}:${name}`;
    const execution = this.machine.run(input as never, {
      context: { Execution: { Name: name, Id: executionArn } },
      overrides: {
        // Inputs and outputs are the JSON the states pass; the bindings check what they read.
        taskResourceLocalHandlers: this.taskHandlers(name, depth, ctx) as never,
        // Real waits: none overridden, each Wait and retry pause as synthesized.
        ...(this.settings.waitMs === undefined
          ? {}
          : {
              waitTimeOverrides: this.everyState('Wait', this.settings.waitMs),
              retryIntervalOverrides: this.everyState('Retry', this.settings.waitMs),
            }),
      },
    });
    const events = (async () => {
      for await (const ev of execution.eventLogs) {
        this.countTransition(ev as EventLog);
        forward(ev as EventLog, name, depth, ctx.onEvent);
      }
    })();
    try {
      const output = await execution.result;
      return { status: 'SUCCEEDED', output };
    } catch (err) {
      const caught = err instanceof ExecutionError ? (err.cause as Error | undefined) : (err as Error);
      return { status: 'FAILED', error: caught?.name ?? 'Error', cause: caught?.message ?? String(err) };
    } finally {
      await events.catch(() => undefined);
    }
  }

  /** One local binding per Task state, found from its Resource. */
  private taskHandlers(execution: string, depth: number, ctx: RunContext) {
    const handlers: Record<string, (input: never) => Promise<unknown>> = {};
    for (const [stateName, state] of allStates(this.definition)) {
      if (state.Type !== 'Task') continue;
      const resource = String(state.Resource);
      const lambdaId = logicalIdOfFakeArn(resource);
      if (lambdaId !== undefined) {
        const fn = this.functions.get(lambdaId);
        if (fn === undefined)
          throw new Error(`state "${stateName}" invokes ${lambdaId}, not in the template`);
        handlers[stateName] = (input) => this.invokeTask(fn, input, ctx);
      } else if (resource.startsWith('arn:aws:states:::aws-sdk:ec2:')) {
        const action = resource.slice('arn:aws:states:::aws-sdk:ec2:'.length);
        handlers[stateName] = async (input) => this.ec2Call(action, input);
      } else if (resource === 'arn:aws:states:::states:startExecution.sync:2') {
        handlers[stateName] = (input) => this.startChild(input as Json, execution, depth, ctx);
      } else {
        throw new Error(`state "${stateName}": the local cloud has no binding for ${resource}`);
      }
    }
    return handlers;
  }

  /** A Lambda task: the handler's answer, or its error as Step Functions reports it (name = errorType). */
  private async invokeTask(fn: DeployedFunction, input: unknown, ctx: RunContext): Promise<unknown> {
    const r = this.metered(fn, await invokeLambda(fn, this.deployment.stackName, HANDLERS[fn.name], input));
    if (r.status === 'ok') {
      noteWork(fn.name, r.result, ctx);
      return r.result;
    }
    if (r.status === 'error') {
      const e = r.error as Error;
      throw named(e?.name ?? 'Error', JSON.stringify({ errorType: e?.name, errorMessage: e?.message }));
    }
    throw named('Sandbox.Timedout', `${fn.name} did not answer within ${fn.timeoutSeconds} s`);
  }

  /** Counts an invocation (its measured time at the function's memory) and passes its result on. */
  private metered(fn: DeployedFunction, r: InvocationResult): InvocationResult {
    this.meter.invocation(fn.name, fn.memoryMb, r.ms, r.status === 'ok' || r.status === 'error');
    return r;
  }

  /** Standard workflows bill each state entered and each retry; an execution's start is counted too. */
  private countTransition(ev: EventLog): void {
    if (ev.type === 'ExecutionStarted') this.meter.execution();
    else if (ev.type === 'StateEntered' || ev.type === 'StateRetried') this.meter.transition(ev.state.name);
  }

  private ec2Call(action: string, input: never): unknown {
    this.meter.ec2(action);
    try {
      if (action === 'createSnapshot') return this.ec2.createSnapshot(input);
      if (action === 'describeSnapshots') return this.ec2.describeSnapshots(input);
      if (action === 'deleteSnapshot') return this.ec2.deleteSnapshot(input);
    } catch (err) {
      // SDK integrations name errors after the service: Ec2.<code>.
      if (err instanceof Ec2Error) throw named(`Ec2.${err.code}`, err.message);
      throw err;
    }
    throw named('States.Runtime', `the local cloud has no EC2 ${action}`);
  }

  /** StartExecution.sync:2 of this state machine: the child runs to its end; its output is JSON. */
  private async startChild(task: Json, parent: string, depth: number, ctx: RunContext): Promise<unknown> {
    const input = (task.Input ?? {}) as Json;
    const name = `${parent}.${String(input.child ?? 'child')}-${++ctx.children}`;
    const startDate = new Date().toISOString();
    const r = await this.execute(input, name, depth + 1, ctx);
    const arn = `arn:aws:states:${FAKE.region}:${FAKE.account}:execution:${this.deployment.stateMachineName}:${name}`;
    if (r.status === 'SUCCEEDED') {
      return {
        ExecutionArn: arn,
        Name: name,
        Input: JSON.stringify(input),
        Output: r.output,
        StartDate: startDate,
        StopDate: new Date().toISOString(),
        Status: 'SUCCEEDED',
      };
    }
    // As the .sync integration fails: States.TaskFailed, the child's failure in the cause.
    throw named(
      'States.TaskFailed',
      JSON.stringify({ ExecutionArn: arn, Status: 'FAILED', Error: r.error, Cause: r.cause }),
    );
  }

  private functionNamed(name: FunctionName): DeployedFunction {
    const fn = this.deployment.functions.find((f) => f.name === name);
    if (fn === undefined) throw new Error(`the template has no ${name} function`);
    return fn;
  }

  private everyState(kind: 'Wait' | 'Retry', ms: number): Record<string, number> {
    const out: Record<string, number> = {};
    for (const [name, s] of allStates(this.definition)) {
      if (kind === 'Wait' ? s.Type === 'Wait' : s.Retry !== undefined) out[name] = ms;
    }
    return out;
  }

  /** `@aws-sdk/client-eventbridge`'s shape for PutEvents, onto the local bus. */
  private eventBridgeModule(): Record<string, unknown> {
    const cloud = this;
    class PutEventsCommand {
      constructor(
        readonly input: {
          Entries?: { EventBusName?: string; Source?: string; DetailType?: string; Detail?: string }[];
        },
      ) {}
    }
    class EventBridgeClient {
      async send(command: unknown) {
        if (!(command instanceof PutEventsCommand))
          throw new Error('the local event bus answers PutEvents only');
        const entries = command.input.Entries ?? [];
        cloud.meter.putEvents(entries.length);
        for (const e of entries) {
          const a: Announcement = {
            busName: e.EventBusName ?? 'default',
            source: e.Source ?? '',
            detailType: e.DetailType ?? '',
            detail: JSON.parse(e.Detail ?? '{}') as Json,
          };
          cloud.announcements.push(a);
          cloud.onAnnouncement?.(a);
        }
        return {
          FailedEntryCount: 0,
          Entries: entries.map((_, i) => ({ EventId: `local-${cloud.announcements.length}-${i}` })),
        };
      }
      destroy() {}
    }
    return { EventBridgeClient, PutEventsCommand };
  }

  /** LocalEc2's SDK-shaped module, its calls counted (the finalizer's DescribeSnapshots). */
  private countedEc2Module(): Record<string, unknown> {
    const mod = this.ec2.sdkModule();
    const Inner = mod.EC2Client as new (
      config: Record<string, unknown>,
    ) => { send(command: unknown): Promise<unknown> };
    const meter = this.meter;
    class EC2Client {
      private readonly inner: { send(command: unknown): Promise<unknown> };
      constructor(config: Record<string, unknown>) {
        this.inner = new Inner(config);
      }
      async send(command: unknown) {
        meter.ec2(String((command as object).constructor.name).replace(/Command$/, ''));
        return this.inner.send(command);
      }
      destroy() {}
    }
    return { ...mod, EC2Client };
  }
}

/** Records what the cycle replicated from the answers that report it: a tick's, the finalizer's. */
function noteWork(fn: FunctionName, result: unknown, ctx: RunContext): void {
  const r = result as { status?: string; disks?: unknown[]; idleTicks?: number } | undefined;
  if (!Array.isArray(r?.disks)) return;
  if (fn === 'finalizer' && r.status === 'published') {
    ctx.published = r.disks as { descriptors: number; blocks: number; bytes: number }[];
  } else if (fn === 'planner' && r.idleTicks !== undefined) {
    ctx.lastTick = r.disks as { completed: number; completedBytes: number }[];
  }
}

// ---- helpers ------------------------------------------------------------------------------------

/** The part of aws-local-stepfunctions' event log read here (its type is not exported). */
type EventLog =
  | { type: 'ExecutionStarted' | 'ExecutionSucceeded' }
  | { type: 'ExecutionFailed'; Error: string; Cause: unknown }
  | {
      type: 'StateEntered' | 'StateExited' | 'StateRetried' | 'StateCaught';
      state: { name: string; type: string; output?: unknown };
      index?: number;
    }
  | {
      type: 'StateFailed';
      state: { name: string; type: string };
      index?: number;
      Error: string;
      Cause: unknown;
    }
  | { type: 'ExecutionAborted' | 'ExecutionTimeout' | `MapIteration${string}` | `ParallelBranch${string}` };

function named(name: string, message: string): Error {
  const e = new Error(message);
  e.name = name;
  return e;
}

/**
 * The deployed definition as it runs locally: Task states without TimeoutSeconds get one long enough
 * to be none (AWS's default is 99999999 s; aws-local-stepfunctions follows the ASL spec's 60 s, which
 * would cut a replicate child short).
 */
function localDefinition(def: StateMachineDefinition): StateMachineDefinition {
  const copy = structuredClone(def);
  for (const [, state] of allStates(copy)) {
    if (
      state.Type === 'Task' &&
      state.TimeoutSeconds === undefined &&
      state.TimeoutSecondsPath === undefined
    ) {
      state.TimeoutSeconds = NO_TASK_TIMEOUT_SECONDS;
    }
  }
  return copy;
}

/** The union of the functions' environments, resolved locally, with the local tuning applied. */
function functionsEnvironment(
  deployment: DeployedStack,
  local: { tableName: string; queueUrl: string; eventBusName: string },
  settings: LocalCloudSettings,
  logLevel: string,
): Record<string, string> {
  const env: Record<string, string> = {};
  // Set per function by the deployment; the handlers name their service themselves.
  const perFunction = new Set(['POWERTOOLS_SERVICE_NAME', 'NODE_OPTIONS']);
  for (const fn of deployment.functions) {
    for (const [key, value] of Object.entries(resolveEnvironment(deployment, fn, local))) {
      if (perFunction.has(key)) continue;
      if (env[key] !== undefined && env[key] !== value) {
        throw new Error(
          `functions disagree on ${key} (${env[key]} vs ${value}): they share one process here`,
        );
      }
      env[key] = value;
    }
  }
  return {
    ...env,
    LEASE_SECONDS: String(settings.leaseSeconds),
    STUCK_TICKS: String(settings.stuckTicks),
    POWERTOOLS_LOG_LEVEL: logLevel,
    POWERTOOLS_METRICS_DISABLED: 'true',
  };
}

/** Sets (or, for undefined, unsets) process.env keys; returns what puts them back. */
function setEnvironment(vars: Record<string, string | undefined>): () => void {
  const previous = Object.fromEntries(Object.keys(vars).map((k) => [k, process.env[k]]));
  const apply = (values: Record<string, string | undefined>) => {
    for (const [k, v] of Object.entries(values)) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  };
  apply(vars);
  return () => apply(previous);
}

function forward(
  ev: EventLog,
  execution: string,
  depth: number,
  onEvent: (e: LocalCloudEvent) => void,
): void {
  switch (ev.type) {
    case 'ExecutionStarted':
    case 'ExecutionSucceeded':
      onEvent({ kind: 'execution', execution, depth, type: ev.type });
      return;
    case 'ExecutionFailed':
      onEvent({
        kind: 'execution',
        execution,
        depth,
        type: ev.type,
        error: ev.Error,
        cause: String(ev.Cause),
      });
      return;
    case 'StateEntered':
    case 'StateExited':
    case 'StateRetried':
    case 'StateCaught':
      onEvent({
        kind: 'state',
        execution,
        depth,
        type: ev.type,
        state: ev.state.name,
        stateType: ev.state.type,
        ...(ev.index === undefined ? {} : { index: ev.index }),
        ...(ev.type === 'StateExited' ? { output: ev.state.output } : {}),
      });
      return;
    case 'StateFailed':
      onEvent({
        kind: 'state',
        execution,
        depth,
        type: ev.type,
        state: ev.state.name,
        stateType: ev.state.type,
        ...(ev.index === undefined ? {} : { index: ev.index }),
        error: ev.Error,
        cause: String(ev.Cause),
      });
      return;
    default:
      return;
  }
}
