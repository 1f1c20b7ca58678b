// The Recovery state machine run locally: the synthesized definition (plain ASL) in
// aws-local-stepfunctions, its Lambda tasks bound to the recovery handler (the real one, configured
// from its template environment, with EC2 and EventBridge Scheduler pointed at an emulator such as
// moto_server, DynamoDB at dynalite), the migration's final cycle to a function the caller gives, and
// CloudWatch's PutMetricData (the teardown alarm's metric) recorded. Waits and retry pauses are cut to
// `waitMs`: a drill's TTL passes in milliseconds. Also: an account prepared on those emulators as a
// deployed stack would find it (prepareRecoveryAccount), for `ferry local-cloud --recover`.
import { CreateTableCommand, DescribeTableCommand, type DynamoDBClient } from '@aws-sdk/client-dynamodb';
import {
  CreateSecurityGroupCommand,
  CreateSnapshotCommand,
  CreateSubnetCommand,
  CreateVolumeCommand,
  CreateVpcCommand,
  DescribeImagesCommand,
  DescribeInstancesCommand,
  DescribeSnapshotsCommand,
  DescribeVolumesCommand,
  type EC2Client,
} from '@aws-sdk/client-ec2';
import {
  CreateScheduleCommand,
  CreateScheduleGroupCommand,
  GetScheduleCommand,
  type SchedulerClient,
} from '@aws-sdk/client-scheduler';
import { ExecutionError, StateMachine, type StateMachineDefinition } from 'aws-local-stepfunctions';
import { tableDefinition } from '../shared/aws/dynamo/schema.ts';
import { DynamoStateStore } from '../shared/aws/dynamo/state-store.ts';
import type { RecoveryCheckpoint } from '../shared/engine/ports.ts';
import { planScheduleName, RECOVERY_TAGS } from '../shared/engine/recovery/names.ts';
import {
  allStates,
  ensurePromiseWithResolvers,
  FAKE,
  fakeArn,
  logicalIdOfFakeArn,
  machineFromTemplate,
  type TemplateJson,
} from './asl.ts';
import { synthesizeTemplate } from './synth.ts';

type Json = Record<string, unknown>;

/** What the definition's tasks are bound to. */
export interface RecoveryBindings {
  /** The recovery Lambda: every action's event in, its answer out; a thrown error's name is its type. */
  readonly recovery: (event: Json) => Promise<unknown>;
  /**
   * A migration's final cycle: the cycle state machine's input in, its output out (what the cycle's
   * execution ends with). Absent: a migration fails at its final cycle.
   */
  readonly runCycle?: (input: Json) => Promise<unknown>;
}

/** A data point the machine put (the teardown alarm's metric). */
export interface LocalMetric {
  readonly namespace: string;
  readonly name: string;
  readonly value: number;
  readonly dimensions: Readonly<Record<string, string>>;
}

/** One state the execution entered, and how it left it. */
export interface RecoveryStep {
  readonly type: 'StateEntered' | 'StateFailed' | 'StateRetried' | 'StateCaught';
  readonly state: string;
  /** Task, Choice, Pass, Wait, Map, Succeed, Fail. */
  readonly stateType: string;
  readonly error?: string;
  readonly cause?: string;
}

export interface RecoveryOutcome {
  readonly name: string;
  readonly status: 'SUCCEEDED' | 'FAILED';
  readonly output?: unknown;
  readonly error?: string;
  readonly cause?: string;
  /** Every state entered, failed, retried or caught, in order. */
  readonly steps: readonly RecoveryStep[];
  /** The recovery actions invoked, in order (resolve, launch, ...), retries included. */
  readonly actions: readonly string[];
  readonly metrics: readonly LocalMetric[];
  /** The inputs the final cycle was started with (migration). */
  readonly cycles: readonly Json[];
}

/** The Recovery state machine's definition in a synthesized template, as plain ASL. */
export function recoveryDefinitionFromTemplate(template: TemplateJson): {
  definition: StateMachineDefinition;
  stateMachineName: string;
  /** The logical id of the recovery Lambda its tasks invoke. */
  functionLogicalId: string;
} {
  const { definition, stateMachineName } = machineFromTemplate(template, 'recovery');
  const ids = new Set<string>();
  for (const [, s] of allStates(definition)) {
    const id = s.Type === 'Task' ? logicalIdOfFakeArn(String(s.Resource)) : undefined;
    if (id !== undefined) ids.add(id);
  }
  if (ids.size !== 1) throw new Error(`the Recovery state machine should invoke one Lambda, not ${ids.size}`);
  return { definition, stateMachineName, functionLogicalId: [...ids][0]! };
}

/** AWS's default task timeout overflows a Node timer; this is as good as none locally. */
const NO_TASK_TIMEOUT_SECONDS = 24 * 24 * 60 * 60;
const CYCLE_RESOURCE = 'arn:aws:states:::states:startExecution.sync:2';
const METRIC_RESOURCE = 'arn:aws:states:::aws-sdk:cloudwatch:putMetricData';

export interface LocalRecoveryOptions {
  readonly definition: StateMachineDefinition;
  readonly stateMachineName: string;
  readonly bindings: RecoveryBindings;
  /** Every Wait state and retry pause, in milliseconds (default 0). */
  readonly waitMs?: number;
  /** 'real': Wait states and retry pauses as synthesized (a drill waits its TTL); waitMs is ignored. */
  readonly waits?: 'fast' | 'real';
}

/** Runs executions of a Recovery definition with the given bindings. */
export class LocalRecovery {
  private readonly machine: StateMachine;
  private readonly definition: StateMachineDefinition;

  constructor(private readonly opts: LocalRecoveryOptions) {
    ensurePromiseWithResolvers();
    this.definition = structuredClone(opts.definition);
    for (const [, state] of allStates(this.definition)) {
      // aws-local-stepfunctions follows the ASL spec's 60 s default; AWS's is a year.
      if (state.Type === 'Task' && state.TimeoutSeconds === undefined)
        state.TimeoutSeconds = NO_TASK_TIMEOUT_SECONDS;
    }
    this.machine = new StateMachine(this.definition);
  }

  /** Runs one execution named `name` (the job id unless the input gives one) to its end. */
  async run(input: Json, name: string, onStep?: (step: RecoveryStep) => void): Promise<RecoveryOutcome> {
    const steps: RecoveryStep[] = [];
    const actions: string[] = [];
    const metrics: LocalMetric[] = [];
    const cycles: Json[] = [];
    const handlers: Record<string, (input: Json) => Promise<unknown>> = {};
    const waits: Record<string, number> = {};
    const retries: Record<string, number> = {};
    const ms = this.opts.waitMs ?? 0;
    for (const [stateName, state] of allStates(this.definition)) {
      if (this.opts.waits !== 'real') {
        if (state.Type === 'Wait') waits[stateName] = ms;
        if (state.Retry !== undefined) retries[stateName] = ms;
      }
      if (state.Type !== 'Task') continue;
      const resource = String(state.Resource);
      if (logicalIdOfFakeArn(resource) !== undefined) {
        handlers[stateName] = async (event) => {
          actions.push(String(event.action));
          return this.opts.bindings.recovery(event);
        };
      } else if (resource === CYCLE_RESOURCE) {
        handlers[stateName] = async (task) => this.finalCycle(task, name, cycles);
      } else if (resource === METRIC_RESOURCE) {
        handlers[stateName] = async (params) => {
          metrics.push(...metricData(params));
          return {};
        };
      } else {
        throw new Error(`state "${stateName}": no local binding for ${resource}`);
      }
    }
    const executionArn = `arn:aws:states:${FAKE.region}:${FAKE.account}:execution:${this.opts.stateMachineName}:${name}`;
    const execution = this.machine.run(input as never, {
      context: { Execution: { Name: name, Id: executionArn } } as never,
      overrides: {
        taskResourceLocalHandlers: handlers as never,
        waitTimeOverrides: waits,
        retryIntervalOverrides: retries,
      },
    });
    const events = (async () => {
      for await (const ev of execution.eventLogs) {
        const e = ev as {
          type: string;
          state?: { name: string; type: string };
          Error?: string;
          Cause?: unknown;
        };
        if (
          e.state !== undefined &&
          (e.type === 'StateEntered' ||
            e.type === 'StateFailed' ||
            e.type === 'StateRetried' ||
            e.type === 'StateCaught')
        ) {
          const step: RecoveryStep = {
            type: e.type,
            state: e.state.name,
            stateType: e.state.type,
            ...(e.Error === undefined ? {} : { error: e.Error }),
            ...(e.Cause === undefined ? {} : { cause: String(e.Cause) }),
          };
          steps.push(step);
          onStep?.(step);
        }
      }
    })();
    const base = { name, steps, actions, metrics, cycles };
    try {
      const output = await execution.result;
      return { ...base, status: 'SUCCEEDED', output };
    } catch (err) {
      const caught = err instanceof ExecutionError ? (err.cause as Error | undefined) : (err as Error);
      return {
        ...base,
        status: 'FAILED',
        error: caught?.name ?? 'Error',
        cause: caught?.message ?? String(err),
      };
    } finally {
      await events.catch(() => undefined);
    }
  }

  /** StartExecution.sync:2 of the cycle machine: the cycle's output as JSON, or the .sync failure. */
  private async finalCycle(task: Json, parent: string, cycles: Json[]): Promise<unknown> {
    const input = (task.Input ?? {}) as Json;
    cycles.push(input);
    const runCycle = this.opts.bindings.runCycle;
    const arn = `arn:aws:states:${FAKE.region}:${FAKE.account}:execution:cycle:${parent}-final`;
    if (runCycle === undefined) throw named('States.TaskFailed', 'no cycle is bound in this local run');
    try {
      const output = await runCycle(input);
      return { ExecutionArn: arn, Output: output, Status: 'SUCCEEDED' };
    } catch (err) {
      throw named(
        'States.TaskFailed',
        JSON.stringify({
          ExecutionArn: arn,
          Status: 'FAILED',
          Error: (err as Error).name,
          Cause: (err as Error).message,
        }),
      );
    }
  }
}

function metricData(params: Json): LocalMetric[] {
  const namespace = String(params.Namespace);
  const data = (params.MetricData ?? []) as {
    MetricName?: string;
    Value?: number;
    Dimensions?: { Name: string; Value: string }[];
  }[];
  return data.map((d) => ({
    namespace,
    name: String(d.MetricName),
    value: Number(d.Value ?? 0),
    dimensions: Object.fromEntries((d.Dimensions ?? []).map((x) => [x.Name, x.Value])),
  }));
}

function named(name: string, message: string): Error {
  const e = new Error(message);
  e.name = name;
  return e;
}

/**
 * A Lambda handler's failure as Step Functions reports it from a direct Lambda task: the error's
 * name is the error type (what Retry and Catch match).
 */
export function asLambdaTask(
  handler: (event: unknown) => Promise<unknown>,
): (event: Json) => Promise<unknown> {
  return async (event) => {
    try {
      return await handler(event);
    } catch (err) {
      const e = err as Error;
      throw named(e?.name ?? 'Error', JSON.stringify({ errorType: e?.name, errorMessage: e?.message }));
    }
  };
}

// ---- the recovery Lambda's deployment, locally ---------------------------------------------------

/** Where the recovery Lambda's resources are in the local run. */
export interface RecoveryEndpoints {
  /** DynamoDB (dynalite): the state table with the checkpoint catalog. */
  readonly dynamodb: string;
  /** EC2 and EventBridge Scheduler (moto_server). */
  readonly ec2: string;
  readonly scheduler: string;
}

/**
 * The recovery function's environment as the template deploys it, references resolved locally: the
 * table's Ref to `tableName`, the snapshot key's Arn to a well-formed fake key ARN.
 */
export function recoveryEnvironment(template: TemplateJson, functionLogicalId: string, tableName: string) {
  const fn = template.Resources[functionLogicalId];
  const vars = ((fn?.Properties?.Environment as { Variables?: Json } | undefined)?.Variables ?? {}) as Json;
  const out: Record<string, string> = {};
  for (const [key, value] of Object.entries(vars)) {
    if (typeof value === 'string' || typeof value === 'number') {
      out[key] = String(value);
      continue;
    }
    const v = (value ?? {}) as Json;
    const ref = typeof v.Ref === 'string' ? v.Ref : undefined;
    const getAtt = Array.isArray(v['Fn::GetAtt']) ? (v['Fn::GetAtt'] as string[]) : undefined;
    const type = template.Resources[ref ?? getAtt?.[0] ?? '']?.Type;
    if (ref !== undefined && type === 'AWS::DynamoDB::Table') out[key] = tableName;
    else if (getAtt?.[1] === 'Arn' && type === 'AWS::KMS::Key')
      out[key] = `arn:${FAKE.partition}:kms:${FAKE.region}:${FAKE.account}:key/${getAtt[0]}`;
    else throw new Error(`no local value for the recovery function's ${key}: ${JSON.stringify(value)}`);
  }
  return out;
}

/** Creates the deployment's state table in DynamoDB (dynalite) and waits until it is active. */
export async function createStateTable(dynamo: DynamoDBClient, tableName: string): Promise<void> {
  await dynamo.send(new CreateTableCommand(tableDefinition(tableName)));
  while (
    (await dynamo.send(new DescribeTableCommand({ TableName: tableName }))).Table?.TableStatus !== 'ACTIVE'
  ) {
    await new Promise((r) => setTimeout(r, 10));
  }
}

/**
 * Points the process at the local endpoints as the recovery Lambda's container would be configured
 * (its template environment, fake credentials, AWS_ENDPOINT_URL_<SERVICE>); returns what undoes it.
 * The handler creates its clients from this environment on first use, once per process.
 */
export function setRecoveryEnvironment(
  env: Record<string, string>,
  endpoints: RecoveryEndpoints,
): () => void {
  const vars: Record<string, string | undefined> = {
    ...env,
    POWERTOOLS_LOG_LEVEL: 'SILENT',
    POWERTOOLS_METRICS_DISABLED: 'true',
    AWS_REGION: FAKE.region,
    AWS_ACCESS_KEY_ID: 'local',
    AWS_SECRET_ACCESS_KEY: 'local',
    AWS_SESSION_TOKEN: undefined,
    AWS_ENDPOINT_URL_DYNAMODB: endpoints.dynamodb,
    AWS_ENDPOINT_URL_EC2: endpoints.ec2,
    AWS_ENDPOINT_URL_SCHEDULER: endpoints.scheduler,
  };
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

export { fakeArn };

// ---- the Step Functions API over local executions (for `ferry recover --cloud` against a local run) --

/** How a local execution ended, as DescribeExecution reports it. */
export interface LocalExecutionEnd {
  readonly status: 'SUCCEEDED' | 'FAILED';
  readonly output?: unknown;
  readonly error?: string;
  readonly cause?: string;
}

/** A state machine run locally: LocalRecovery, or the cycle machine in a LocalCloud (adapted). */
export interface LocalMachine {
  run(input: Json, name: string, onStep?: (step: RecoveryStep) => void): Promise<LocalExecutionEnd>;
}

/** A Step Functions API endpoint (the JSON protocol's calls the CLI makes) over local runs of a machine. */
export interface LocalStepFunctions {
  /** http://127.0.0.1:PORT: AWS_ENDPOINT_URL_SFN for the CLI. */
  readonly endpoint: string;
  readonly stateMachineArn: string;
  /** Every execution started, by name, with its outcome once it ended. */
  readonly executions: ReadonlyMap<string, { input: Json; outcome?: LocalExecutionEnd }>;
  stop(): Promise<void>;
}

interface HistoryEventJson {
  id: number;
  previousEventId: number;
  timestamp: number;
  type: string;
  [details: string]: unknown;
}

/**
 * Serves ListStateMachines, StartExecution, DescribeExecution and GetExecutionHistory on 127.0.0.1
 * for one state machine run by `machine` (the Recovery machine, or a LocalCloud's cycle machine): an
 * execution started here runs in-process and its history grows as it goes, as Step Functions shows
 * it (state entered, task failed, end).
 */
export async function serveLocalStepFunctions(
  machine: LocalMachine,
  stateMachineName: string,
): Promise<LocalStepFunctions> {
  const { createServer } = await import('node:http');
  const stateMachineArn = `arn:aws:states:${FAKE.region}:${FAKE.account}:stateMachine:${stateMachineName}`;
  const executions = new Map<
    string,
    { input: Json; start: number; history: HistoryEventJson[]; outcome?: LocalExecutionEnd }
  >();
  const seconds = () => Date.now() / 1000;
  const push = (history: HistoryEventJson[], type: string, details: Json = {}) =>
    history.push({
      id: history.length + 1,
      previousEventId: history.length,
      timestamp: seconds(),
      type,
      ...details,
    });
  const arnOf = (name: string) => `${stateMachineArn.replace(':stateMachine:', ':execution:')}:${name}`;
  const nameOf = (arn: unknown) => String(arn).split(':').at(-1) ?? '';

  const calls: Record<string, (body: Json) => Json> = {
    ListStateMachines: () => ({
      stateMachines: [{ stateMachineArn, name: stateMachineName, type: 'STANDARD', creationDate: seconds() }],
    }),
    StartExecution: (body) => {
      if (body.stateMachineArn !== stateMachineArn)
        throw apiError('StateMachineDoesNotExist', String(body.stateMachineArn));
      const name = String(body.name);
      const input = JSON.parse(String(body.input ?? '{}')) as Json;
      const existing = executions.get(name);
      if (existing !== undefined) {
        if (JSON.stringify(existing.input) === JSON.stringify(input))
          return { executionArn: arnOf(name), startDate: existing.start };
        throw apiError('ExecutionAlreadyExists', `Execution Already Exists: '${arnOf(name)}'`);
      }
      const history: HistoryEventJson[] = [];
      const exec = { input, start: seconds(), history } as {
        input: Json;
        start: number;
        history: HistoryEventJson[];
        outcome?: LocalExecutionEnd;
      };
      executions.set(name, exec);
      push(history, 'ExecutionStarted', { executionStartedEventDetails: { input: JSON.stringify(input) } });
      void machine
        .run(input, name, (step) => {
          if (step.type === 'StateEntered')
            push(history, `${step.stateType}StateEntered`, {
              stateEnteredEventDetails: { name: step.state },
            });
          else if (step.type === 'StateFailed' && step.stateType === 'Task')
            push(history, 'TaskFailed', {
              taskFailedEventDetails: {
                resourceType: 'lambda',
                resource: 'invoke',
                error: step.error,
                cause: step.cause,
              },
            });
        })
        .then((outcome) => {
          exec.outcome = outcome;
          if (outcome.status === 'SUCCEEDED')
            push(history, 'ExecutionSucceeded', {
              executionSucceededEventDetails: { output: JSON.stringify(outcome.output) },
            });
          else
            push(history, 'ExecutionFailed', {
              executionFailedEventDetails: { error: outcome.error, cause: outcome.cause },
            });
        })
        .catch((err: unknown) => {
          // The local runner itself failed (not the execution): reported as the execution's failure.
          const e = err as Error;
          exec.outcome = { status: 'FAILED', error: e?.name ?? 'Error', cause: e?.message ?? String(err) };
          push(history, 'ExecutionFailed', {
            executionFailedEventDetails: { error: exec.outcome.error, cause: exec.outcome.cause },
          });
        });
      return { executionArn: arnOf(name), startDate: exec.start };
    },
    DescribeExecution: (body) => {
      const exec = executions.get(nameOf(body.executionArn));
      if (exec === undefined) throw apiError('ExecutionDoesNotExist', String(body.executionArn));
      const o = exec.outcome;
      return {
        executionArn: body.executionArn,
        stateMachineArn,
        name: nameOf(body.executionArn),
        status: o === undefined ? 'RUNNING' : o.status,
        startDate: exec.start,
        input: JSON.stringify(exec.input),
        ...(o?.output === undefined ? {} : { output: JSON.stringify(o.output) }),
        ...(o?.error === undefined ? {} : { error: o.error }),
        ...(o?.cause === undefined ? {} : { cause: o.cause }),
      };
    },
    GetExecutionHistory: (body) => {
      const exec = executions.get(nameOf(body.executionArn));
      if (exec === undefined) throw apiError('ExecutionDoesNotExist', String(body.executionArn));
      const events = body.reverseOrder ? [...exec.history].reverse() : [...exec.history];
      const from = Number(body.nextToken ?? 0);
      const max = Number(body.maxResults ?? 100) || 100;
      const page = events.slice(from, from + max);
      return { events: page, ...(from + max < events.length ? { nextToken: String(from + max) } : {}) };
    },
  };

  const server = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const action = String(req.headers['x-amz-target'] ?? '').replace(/^AWSStepFunctions\./, '');
      const reply = (status: number, body: Json) => {
        res.writeHead(status, { 'content-type': 'application/x-amz-json-1.0' });
        res.end(JSON.stringify(body));
      };
      const call = calls[action];
      if (call === undefined) return reply(400, { __type: 'UnknownOperationException', message: action });
      try {
        reply(200, call(JSON.parse(Buffer.concat(chunks).toString('utf8') || '{}') as Json));
      } catch (err) {
        const e = err as Error & { code?: string };
        reply(400, { __type: e.code ?? 'InternalError', message: e.message });
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as { port: number }).port;
  return {
    endpoint: `http://127.0.0.1:${port}`,
    stateMachineArn,
    executions,
    stop: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}

function apiError(code: string, message: string): Error & { code: string } {
  return Object.assign(new Error(message), { code });
}

// ---- an account prepared as a deployed stack would find it (for `ferry local-cloud --recover`) -----

/** What the local account holds for one plan: EC2 on moto_server, the catalog on dynalite. */
export interface RecoveryAccount {
  readonly stack: string;
  readonly plan: string;
  readonly table: string;
  readonly definition: StateMachineDefinition;
  readonly stateMachineName: string;
  /** The recovery function's environment, as the template deploys it. */
  readonly environment: Record<string, string>;
  /** The plan's disks: EC2 volumes in moto. */
  readonly volumes: readonly { readonly disk: string; readonly volumeId: string }[];
  readonly subnets: { readonly production: string; readonly drill: string };
  /**
   * Snapshots every volume of the plan in moto (CreateSnapshot twice: a source and a target snapshot,
   * tagged ferry:deployment and ferry:role as a cycle leaves them) and publishes them to the catalog as
   * the set's next checkpoint. It
   * stands in for a cycle: the snapshots hold whatever moto's volumes hold, and the checkpoint's
   * chunk counts and checksums describe no replicated data.
   */
  publishCheckpoint(): Promise<RecoveryCheckpoint>;
  /**
   * The same for any set and volumes (a failback's reverse cycle, stood in for): each volume
   * snapshotted in moto, published as the set's next checkpoint.
   */
  publishSnapshots(
    set: string,
    disks: readonly { readonly disk: string; readonly volumeId: string }[],
  ): Promise<RecoveryCheckpoint>;
  /** What still exists with the job's tag: instances not terminated, volumes, images, snapshots. */
  leftByTag(jobId: string): Promise<LeftByTag>;
  /** The plan's schedule's state (ENABLED or DISABLED). */
  scheduleState(): Promise<string | undefined>;
}

export interface LeftByTag {
  readonly instances: number;
  readonly volumes: number;
  readonly images: number;
  readonly snapshots: number;
}

export interface RecoveryAccountClients {
  readonly ec2: EC2Client;
  readonly scheduler: SchedulerClient;
  readonly dynamo: DynamoDBClient;
}

/** The plan a local recovery runs: two disks to one machine, a drill subnet apart from production. */
export const LOCAL_RECOVERY_PLAN = 'web';
const LOCAL_STACK = 'FerryLocal';
const AZ = 'us-east-1a';
// moto keeps no data in its volumes; 8 GiB is the smallest boot volume AWS images are usually made of.
const VOLUME_GIB = 8;
// The stack's RECOVERY_DEFAULTS refuse a TTL under 5 minutes; fast waits cut it to milliseconds.
const DRILL_TTL_MINUTES = 5;

/**
 * Prepares what `cdk deploy` and the operator leave in an account for one plan, on emulators: a VPC
 * with a production and an isolated drill subnet and their security groups, the plan's volumes, the
 * synthesized stack (its Recovery definition and the recovery function's environment), the state
 * table and the plan's schedule in the stack's schedule group. No checkpoint yet: publishCheckpoint.
 */
export async function prepareRecoveryAccount(
  clients: RecoveryAccountClients,
  stack = LOCAL_STACK,
): Promise<RecoveryAccount> {
  const { ec2, scheduler, dynamo } = clients;
  const plan = LOCAL_RECOVERY_PLAN;
  const table = `${stack}-state`;
  const vpc = (await ec2.send(new CreateVpcCommand({ CidrBlock: '10.0.0.0/16' }))).Vpc?.VpcId;
  const subnet = async (cidr: string) =>
    String(
      (await ec2.send(new CreateSubnetCommand({ VpcId: vpc, CidrBlock: cidr, AvailabilityZone: AZ }))).Subnet
        ?.SubnetId,
    );
  const securityGroup = async (name: string) =>
    String(
      (await ec2.send(new CreateSecurityGroupCommand({ GroupName: name, Description: name, VpcId: vpc })))
        .GroupId,
    );
  const subnets = { production: await subnet('10.0.1.0/24'), drill: await subnet('10.0.2.0/24') };
  const groups = { production: await securityGroup(plan), drill: await securityGroup(`${plan}-drill`) };
  const volumes: { disk: string; volumeId: string }[] = [];
  for (const disk of ['root', 'data']) {
    const out = await ec2.send(new CreateVolumeCommand({ AvailabilityZone: AZ, Size: VOLUME_GIB }));
    volumes.push({ disk, volumeId: String(out.VolumeId) });
  }

  const template = synthesizeTemplate(
    {
      plans: [
        {
          name: plan,
          schedule: 'rate(15 minutes)',
          rpoMinutes: 30,
          disks: volumes,
          recovery: {
            machines: [
              {
                name: `${plan}-1`,
                bootDisk: 'root',
                dataDisks: ['data'],
                instanceType: 't3.micro',
                subnetId: subnets.production,
                securityGroupIds: [groups.production],
                ena: true,
              },
            ],
            drillSubnetId: subnets.drill,
            drillSecurityGroupIds: [groups.drill],
            ttlMinutes: DRILL_TTL_MINUTES,
          },
        },
      ],
    },
    stack,
  ) as TemplateJson;
  const { definition, stateMachineName, functionLogicalId } = recoveryDefinitionFromTemplate(template);
  const environment = recoveryEnvironment(template, functionLogicalId, table);
  const scheduleGroup = environment.SCHEDULE_GROUP;
  if (scheduleGroup === undefined) throw new Error('the recovery function has no SCHEDULE_GROUP');

  await createStateTable(dynamo, table);
  const store = new DynamoStateStore(dynamo, table);
  await scheduler.send(new CreateScheduleGroupCommand({ Name: scheduleGroup }));
  await scheduler.send(
    new CreateScheduleCommand({
      Name: planScheduleName(plan),
      GroupName: scheduleGroup,
      ScheduleExpression: 'rate(15 minutes)',
      FlexibleTimeWindow: { Mode: 'OFF' },
      State: 'ENABLED',
      Target: {
        Arn: `arn:${FAKE.partition}:states:${FAKE.region}:${FAKE.account}:stateMachine:${stack}-cycle`,
        RoleArn: `arn:${FAKE.partition}:iam::${FAKE.account}:role/${stack}-ScheduleRole`,
        Input: JSON.stringify({ plan }),
      },
    }),
  );

  const publishSnapshots = async (
    set: string,
    of: readonly { readonly disk: string; readonly volumeId: string }[],
  ): Promise<RecoveryCheckpoint> => {
    const before = await store.listCheckpoints(set);
    const sequence = before.length + 1;
    const disks = [];
    // As a cycle leaves them: a source snapshot of the volume, and the replica's target snapshot.
    const snapshot = async (volumeId: string, role: 'source' | 'target') =>
      String(
        (
          await ec2.send(
            new CreateSnapshotCommand({
              VolumeId: volumeId,
              TagSpecifications: [
                {
                  ResourceType: 'snapshot',
                  Tags: [
                    { Key: 'ferry:deployment', Value: stack },
                    { Key: 'ferry:role', Value: role },
                  ],
                },
              ],
            }),
          )
        ).SnapshotId,
      );
    for (const { disk, volumeId } of of) {
      disks.push({
        disk,
        source: await snapshot(volumeId, 'source'),
        target: await snapshot(volumeId, 'target'),
        sizeBytes: VOLUME_GIB * 1024 ** 3,
        kind: sequence === 1 ? ('full' as const) : ('incremental' as const),
        chunks: 0,
        bytes: 0,
        // No data was replicated: zeros, which no verifier would accept for a disk's aggregate.
        aggregate: { algorithm: 'ebs-linear-sha256' as const, value: '0'.repeat(64) },
      });
    }
    const checkpoint: RecoveryCheckpoint = {
      id: `${set}/cycle-${sequence}`,
      set,
      sequence,
      createdAt: new Date().toISOString(),
      parent: before.at(-1)?.id,
      disks,
    };
    await store.publishCheckpoint(checkpoint);
    return checkpoint;
  };
  const publishCheckpoint = () => publishSnapshots(plan, volumes);

  const leftByTag = async (jobId: string): Promise<LeftByTag> => {
    const Filters = [{ Name: `tag:${RECOVERY_TAGS.job}`, Values: [jobId] }];
    const reservations = (await ec2.send(new DescribeInstancesCommand({ Filters }))).Reservations ?? [];
    // Terminated instances stay listed for a while, as on AWS: they are gone.
    const instances = reservations
      .flatMap((r) => r.Instances ?? [])
      .filter((i) => i.State?.Name !== 'terminated' && i.State?.Name !== 'shutting-down').length;
    return {
      instances,
      volumes: (await ec2.send(new DescribeVolumesCommand({ Filters }))).Volumes?.length ?? 0,
      images: (await ec2.send(new DescribeImagesCommand({ Owners: ['self'], Filters }))).Images?.length ?? 0,
      snapshots:
        (await ec2.send(new DescribeSnapshotsCommand({ OwnerIds: ['self'], Filters }))).Snapshots?.length ??
        0,
    };
  };

  const scheduleState = async () =>
    (await scheduler.send(new GetScheduleCommand({ Name: planScheduleName(plan), GroupName: scheduleGroup })))
      .State;

  return {
    stack,
    plan,
    table,
    definition,
    stateMachineName,
    environment,
    volumes,
    subnets,
    publishCheckpoint,
    publishSnapshots,
    leftByTag,
    scheduleState,
  };
}
