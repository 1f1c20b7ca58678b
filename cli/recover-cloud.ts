// `ferry recover --cloud` and `ferry checkpoints --cloud`: the deployed stack's Recovery state machine
// started with @aws-sdk/client-sfn and followed to its end (progress lines from its history, then its
// report), and the stack's DynamoDB checkpoint catalog listed (with whether each checkpoint's
// snapshots are still there to recover from). No CloudFormation client: the state
// machine is found by its name (<stack>-recovery) and the table by its ferry:deployment tag, or both
// are given (--state-machine-arn / FERRY_RECOVERY_STATE_MACHINE_ARN, --table / FERRY_TABLE).
import { randomBytes } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { DynamoDBClient, ListTablesCommand, ListTagsOfResourceCommand } from '@aws-sdk/client-dynamodb';
import { DescribeSnapshotsCommand, EC2Client } from '@aws-sdk/client-ec2';
import {
  DescribeExecutionCommand,
  type ExecutionStatus,
  GetExecutionHistoryCommand,
  type HistoryEvent,
  ListStateMachinesCommand,
  SFNClient,
  StartExecutionCommand,
} from '@aws-sdk/client-sfn';
import { Command, Option } from 'commander';
import { z } from 'zod';
import { DynamoStateStore } from '../shared/aws/dynamo/state-store.ts';
import { ConfigError, FerryError } from '../shared/engine/errors.ts';
import type { RecoveryCheckpoint } from '../shared/engine/ports.ts';
import { formatBytes } from '../shared/engine/units.ts';

/** The Recovery state machine's name in a stack (infra/stack.ts names it so). */
export const recoveryStateMachineName = (stack: string): string => `${stack}-recovery`;
/** The tag every resource of a stack carries (infra/stack.ts); the catalog table is found by it. */
export const DEPLOYMENT_TAG_KEY = 'ferry:deployment';

/** The modes an operator starts. */
export const CLOUD_MODES = ['drill', 'failover', 'migration', 'failback', 'cleanup'] as const;
export type CloudMode = (typeof CLOUD_MODES)[number];

// Seconds between DescribeExecution/GetExecutionHistory polls: a recovery step takes seconds to
// minutes, and two calls every 5 s stay far below Step Functions' API quotas.
const POLL_MS = 5_000;
// A drill's TTL as the recovery function accepts it (functions/recovery/contracts.ts): 5 minutes to 7 days.
const MIN_TTL_MINUTES = 5;
const MAX_TTL_MINUTES = 7 * 24 * 60;
// Step Functions execution names: 1-80 characters of this alphabet (they are the recovery job id).
const JOB_ID = /^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$/;
const PLAN = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
const STACK = /^[A-Za-z][A-Za-z0-9-]{0,127}$/;

/** An error of the cloud commands; an operator input mistake is a ConfigError instead. */
export class CloudRecoveryError extends FerryError {
  constructor(message: string, opts: { cause?: unknown } = {}) {
    super(message, opts);
    this.name = 'CloudRecoveryError';
  }
}

// ---- the execution input ------------------------------------------------------------------------

/** What `ferry recover --cloud` was asked, as flags give it. */
export interface CloudRecoverFlags {
  readonly plan?: string | undefined;
  readonly mode?: string | undefined;
  readonly checkpoint?: string | undefined;
  readonly at?: string | undefined;
  readonly ttl?: string | undefined;
  readonly job?: string | undefined;
  /** A JSON file with the machines' launch settings (MachineSettings[]), overriding the plan's. */
  readonly machines?: unknown;
  /** Failback: relaunch the plan's machines from the reverse cycle's checkpoint. */
  readonly cutover?: boolean | undefined;
  /** Migration, failback cutover: the source (or the recovered machines) was stopped first. */
  readonly sourceQuiesced?: boolean | undefined;
  /** Failback: the reverse set (default `<set>-failback-<failover job>`). */
  readonly reverseSet?: string | undefined;
}

const checkpointChoice = z.union([
  z.literal('latest'),
  z.number().int().positive(),
  z.strictObject({ at: z.iso.datetime({ offset: true }) }),
]);

/** The Recovery state machine's input (infra/README.md, "Recovery"): the resolve request, no action. */
export const recoveryRequestSchema = z.strictObject({
  mode: z.enum(['drill', 'failover', 'migration', 'failback', 'cleanup']),
  plan: z.string().regex(PLAN),
  jobId: z.string().regex(JOB_ID).optional(),
  checkpoint: checkpointChoice.optional(),
  ttlMinutes: z.number().int().min(MIN_TTL_MINUTES).max(MAX_TTL_MINUTES).optional(),
  machines: z.array(z.record(z.string(), z.unknown())).min(1).optional(),
  sourceQuiesced: z.boolean().optional(),
  cutover: z.boolean().optional(),
  reverseSet: z
    .string()
    .regex(/^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$/)
    .optional(),
});
export type RecoveryRequest = z.infer<typeof recoveryRequestSchema>;

const refuse = (setting: string, message: string): never => {
  throw new ConfigError(`${setting}: ${message}`, { setting });
};

/** A new job id (the execution's name): mode, plan and the start time, readable in the console. */
export function newJobId(mode: string, plan: string, now = new Date()): string {
  const stamp = now.toISOString().replace(/[-:]/g, '').replace(/\..*$/, '');
  return `${`${mode}-${plan}`.slice(0, 55)}-${stamp}-${randomBytes(2).toString('hex')}`;
}

/**
 * The execution input and name for the flags, every flag checked before anything is started. A
 * cleanup tears down the job --job names; every other mode starts a new job named by --job or a new id.
 */
export function recoveryRequest(
  flags: CloudRecoverFlags,
  now = new Date(),
): { request: RecoveryRequest; executionName: string } {
  const mode = (flags.mode ?? 'drill') as CloudMode;
  if (!CLOUD_MODES.includes(mode))
    refuse('--mode', `must be one of ${CLOUD_MODES.join(', ')}, not ${flags.mode}`);
  if (flags.job !== undefined && !JOB_ID.test(flags.job))
    refuse('--job', 'must be 1-80 letters, digits, . _ - (a Step Functions execution name)');
  if (mode === 'cleanup') {
    if (flags.job === undefined) refuse('--job', 'a cleanup needs the id of the recovery job to tear down');
    for (const [flag, v] of [
      ['--checkpoint', flags.checkpoint],
      ['--at', flags.at],
      ['--ttl', flags.ttl],
      ['--machines', flags.machines],
      ['--cutover', flags.cutover],
      ['--source-quiesced', flags.sourceQuiesced],
      ['--reverse-set', flags.reverseSet],
    ] as const) {
      if (v !== undefined) refuse(flag, 'is not for a cleanup (it tears down what the job created)');
    }
    const job = flags.job as string;
    return {
      // The plan is the report's: the cleanup is recorded in the plan's catalog.
      request: { mode, plan: checkPlan(flags.plan), jobId: job },
      // The cleanup's own execution; the job it cleans up keeps its name.
      executionName: `${`cleanup-${job}`.slice(0, 66)}-${randomBytes(3).toString('hex')}`,
    };
  }
  const plan = checkPlan(flags.plan);
  if (mode !== 'failback') {
    if (flags.cutover) refuse('--cutover', 'is for a failback (--mode failback)');
    if (flags.reverseSet !== undefined) refuse('--reverse-set', 'is for a failback (--mode failback)');
  }
  if (flags.sourceQuiesced && mode !== 'migration' && !(mode === 'failback' && flags.cutover))
    refuse('--source-quiesced', 'is for a migration or a failback --cutover');
  if (mode === 'failback') {
    for (const [flag, v] of [
      ['--checkpoint', flags.checkpoint],
      ['--at', flags.at],
    ] as const) {
      if (v !== undefined) refuse(flag, 'a failback starts from the checkpoint its failover recovered');
    }
    if (flags.machines !== undefined && !flags.cutover)
      refuse('--machines', 'a failback launches machines only with --cutover');
  }
  if (flags.checkpoint !== undefined && flags.at !== undefined)
    refuse('--at', 'give either --checkpoint or --at, not both');
  let checkpoint: RecoveryRequest['checkpoint'];
  if (flags.at !== undefined) {
    if (mode === 'migration') refuse('--at', 'a migration recovers the checkpoint of its final cycle');
    if (!z.iso.datetime({ offset: true }).safeParse(flags.at).success)
      refuse('--at', `expected an ISO 8601 time with its zone, e.g. 2026-12-05T10:00:00Z, not ${flags.at}`);
    checkpoint = { at: flags.at };
  } else if (flags.checkpoint !== undefined) {
    if (mode === 'migration')
      refuse('--checkpoint', 'a migration recovers the checkpoint of its final cycle');
    if (flags.checkpoint === 'latest') checkpoint = 'latest';
    else if (/^[1-9]\d{0,15}$/.test(flags.checkpoint)) checkpoint = Number(flags.checkpoint);
    else refuse('--checkpoint', `expected latest or a checkpoint number, not ${flags.checkpoint}`);
  }
  let ttlMinutes: number | undefined;
  if (flags.ttl !== undefined) {
    if (mode !== 'drill') refuse('--ttl', 'only a drill is torn down at a TTL');
    ttlMinutes = Number(flags.ttl);
    if (!/^\d+$/.test(flags.ttl) || ttlMinutes < MIN_TTL_MINUTES || ttlMinutes > MAX_TTL_MINUTES)
      refuse('--ttl', `expected whole minutes from 1 to ${MAX_TTL_MINUTES} (7 days), not ${flags.ttl}`);
  }
  const jobId = flags.job ?? newJobId(mode, plan, now);
  const parsed = recoveryRequestSchema.safeParse({
    mode,
    plan,
    jobId,
    ...(checkpoint === undefined ? {} : { checkpoint }),
    ...(ttlMinutes === undefined ? {} : { ttlMinutes }),
    ...(flags.machines === undefined ? {} : { machines: flags.machines }),
    ...(flags.sourceQuiesced ? { sourceQuiesced: true } : {}),
    ...(flags.cutover ? { cutover: true } : {}),
    ...(flags.reverseSet === undefined ? {} : { reverseSet: flags.reverseSet }),
  });
  if (!parsed.success) {
    const issue = parsed.error.issues[0]!;
    const field = String(issue.path[0] ?? 'input');
    refuse(
      field === 'machines' ? '--machines' : field === 'reverseSet' ? '--reverse-set' : field,
      issue.message,
    );
  }
  return { request: parsed.data!, executionName: jobId };
}

function checkPlan(plan: string | undefined): string {
  if (plan === undefined) return refuse('--plan', 'name the protection plan to recover');
  if (!PLAN.test(plan))
    refuse('--plan', `${JSON.stringify(plan)} is not a plan name (1-64 letters, digits, . _ -)`);
  return plan;
}

// ---- finding the stack's parts ------------------------------------------------------------------

/** The Recovery state machine's ARN: given, or found by its name with ListStateMachines. */
export function findRecoveryStateMachine(sfn: SFNClient, stack: string): Promise<string> {
  return findStateMachineNamed(sfn, stack, recoveryStateMachineName(stack));
}

/** A state machine of the stack, found by its name with ListStateMachines. */
export async function findStateMachineNamed(sfn: SFNClient, stack: string, name: string): Promise<string> {
  let nextToken: string | undefined;
  do {
    const page = await sfn.send(new ListStateMachinesCommand({ maxResults: 1000, nextToken }));
    const found = page.stateMachines?.find((m) => m.name === name);
    if (found?.stateMachineArn !== undefined) return found.stateMachineArn;
    nextToken = page.nextToken;
  } while (nextToken !== undefined);
  throw new ConfigError(
    `--stack ${stack}: no state machine named ${name} in this account and region (deployed with cdk deploy? right --region?)`,
    { setting: 'stack' },
  );
}

/** The stack's state table: the one whose ferry:deployment tag names the stack. */
export async function findStateTable(dynamo: DynamoDBClient, stack: string): Promise<string> {
  // CloudFormation names the table <stack>-State<hash>-<suffix>; the tag confirms it.
  const candidates: string[] = [];
  let start: string | undefined;
  do {
    const page = await dynamo.send(new ListTablesCommand({ ExclusiveStartTableName: start, Limit: 100 }));
    candidates.push(...(page.TableNames ?? []).filter((t) => t.startsWith(`${stack}-`)));
    start = page.LastEvaluatedTableName;
  } while (start !== undefined);
  const tagged: string[] = [];
  for (const table of candidates) {
    const arn = await tableArn(dynamo, table);
    const tags = await dynamo.send(new ListTagsOfResourceCommand({ ResourceArn: arn }));
    if (tags.Tags?.some((t) => t.Key === DEPLOYMENT_TAG_KEY && t.Value === stack)) tagged.push(table);
  }
  if (tagged.length === 1) return tagged[0]!;
  throw new ConfigError(
    tagged.length === 0
      ? `--stack ${stack}: no DynamoDB table tagged ${DEPLOYMENT_TAG_KEY}=${stack} (give it with --table or FERRY_TABLE)`
      : `--stack ${stack}: ${tagged.length} tables are tagged ${DEPLOYMENT_TAG_KEY}=${stack} (${tagged.join(', ')}): pick one with --table`,
    { setting: 'table' },
  );
}

async function tableArn(dynamo: DynamoDBClient, table: string): Promise<string> {
  const { DescribeTableCommand } = await import('@aws-sdk/client-dynamodb');
  const d = await dynamo.send(new DescribeTableCommand({ TableName: table }));
  const arn = d.Table?.TableArn;
  if (arn === undefined) throw new CloudRecoveryError(`DynamoDB describes table ${table} without an ARN`);
  return arn;
}

// ---- start and follow ---------------------------------------------------------------------------

export interface ExecutionEnd {
  readonly executionArn: string;
  readonly status: ExecutionStatus;
  readonly output?: unknown;
  readonly error?: string;
  readonly cause?: string;
}

/** Starts the execution; a repeated start of the same job with the same input is the same execution. */
export async function startRecovery(
  sfn: SFNClient,
  stateMachineArn: string,
  executionName: string,
  request: RecoveryRequest,
): Promise<string> {
  try {
    const r = await sfn.send(
      new StartExecutionCommand({ stateMachineArn, name: executionName, input: JSON.stringify(request) }),
    );
    if (r.executionArn === undefined) throw new CloudRecoveryError('StartExecution answered without an ARN');
    return r.executionArn;
  } catch (err) {
    if ((err as Error).name === 'ExecutionAlreadyExists') {
      throw new ConfigError(
        `--job ${executionName}: a recovery job of that name already ran with another input (job ids are never reused)`,
        { setting: 'job', cause: err },
      );
    }
    throw err;
  }
}

export interface FollowOptions {
  /** Between polls; POLL_MS by default. */
  readonly pollMs?: number;
  readonly onLine?: (line: string) => void;
  /** Aborting stops following (the execution goes on). */
  readonly signal?: AbortSignal;
  /** For elapsed times in the lines; the execution's start by default. */
  readonly now?: () => number;
  /** What the execution is, in its end lines (default `recovery`), and what a Map iteration is. */
  readonly what?: string;
  readonly item?: string;
}

/**
 * Errors a job ends with when its input was refused before anything was created: the state
 * machine's own checks (infra/recovery-state-machine.ts RECOVERY_ERRORS.refused) and the recovery
 * function's (functions/recovery/contracts.ts RECOVERY_PERMANENT_ERRORS).
 */
const REFUSALS: readonly string[] = ['RecoveryRefused', 'RecoveryRefusedError', 'EventValidationError'];

const TERMINAL: readonly string[] = ['SUCCEEDED', 'FAILED', 'TIMED_OUT', 'ABORTED'];

/**
 * Follows an execution to its end: polls DescribeExecution and reads the history events it has not
 * seen yet (newest first, down to the last one seen), turning them into progress lines.
 */
export async function followExecution(
  sfn: SFNClient,
  executionArn: string,
  opts: FollowOptions = {},
): Promise<ExecutionEnd> {
  const pollMs = opts.pollMs ?? POLL_MS;
  const progress = new ProgressLines(opts.onLine ?? (() => {}), opts.what, opts.item);
  let lastSeen = 0;
  for (;;) {
    if (opts.signal?.aborted) throw new CloudRecoveryError(`stopped following ${executionArn}; it goes on`);
    const d = await sfn.send(new DescribeExecutionCommand({ executionArn }));
    const fresh: HistoryEvent[] = [];
    let nextToken: string | undefined;
    read: do {
      const page = await sfn.send(
        new GetExecutionHistoryCommand({ executionArn, reverseOrder: true, maxResults: 200, nextToken }),
      );
      for (const ev of page.events ?? []) {
        if ((ev.id ?? 0) <= lastSeen) break read;
        fresh.push(ev);
      }
      nextToken = page.nextToken;
    } while (nextToken !== undefined);
    fresh.reverse();
    for (const ev of fresh) progress.add(ev);
    lastSeen = fresh.at(-1)?.id ?? lastSeen;
    const status = d.status ?? 'RUNNING';
    if (TERMINAL.includes(status)) {
      return {
        executionArn,
        status,
        ...(d.output === undefined ? {} : { output: parseJson(d.output) }),
        ...(d.error === undefined ? {} : { error: d.error }),
        ...(d.cause === undefined ? {} : { cause: d.cause }),
      };
    }
    await sleep(pollMs, opts.signal);
  }
}

function parseJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

const sleep = (ms: number, signal: AbortSignal | undefined) =>
  new Promise<void>((resolve) => {
    if (ms <= 0 || signal?.aborted) return resolve();
    const t = setTimeout(done, ms);
    function done() {
      clearTimeout(t);
      signal?.removeEventListener('abort', done);
      resolve();
    }
    signal?.addEventListener('abort', done, { once: true });
  });

// States whose entry says nothing to an operator (plumbing of the definition's loops and paths).
const QUIET_TYPES = new Set(['PassStateEntered', 'ChoiceStateEntered', 'SucceedStateEntered']);

/**
 * History events as progress lines: each state entered (a loop's repeats counted on one line), each
 * task failure and retry, Wait states with their length, the end. Elapsed time from the first event.
 */
export class ProgressLines {
  private start: number | undefined;
  private last: { state: string; count: number } | undefined;
  private readonly names = new Map<number, string>();

  /**
   * `what` names the execution in its end lines, `item` a Map iteration (a recovery's Map launches
   * one machine per iteration).
   */
  constructor(
    private readonly emit: (line: string) => void,
    private readonly what = 'recovery',
    private readonly item = 'machine',
  ) {}

  add(ev: HistoryEvent): void {
    const t = ev.timestamp instanceof Date ? ev.timestamp.getTime() : Date.parse(String(ev.timestamp));
    this.start ??= t;
    const at = `+${formatElapsed(t - this.start)}`;
    const type = ev.type ?? '';
    if (type.endsWith('StateEntered')) {
      const name = ev.stateEnteredEventDetails?.name ?? '?';
      this.names.set(ev.id ?? 0, name);
      if (QUIET_TYPES.has(type)) return;
      if (this.last?.state === name) {
        this.last.count++;
        this.emit(`${at}  ${name} (${this.last.count})`);
        return;
      }
      this.last = { state: name, count: 1 };
      this.emit(`${at}  ${name}`);
      return;
    }
    if (type === 'WaitStateEntered') return;
    if (type === 'MapIterationStarted') {
      this.emit(`${at}  ${this.item} ${(ev.mapIterationStartedEventDetails?.index ?? 0) + 1} started`);
      return;
    }
    if (type === 'TaskFailed' || type === 'LambdaFunctionFailed') {
      const d = ev.taskFailedEventDetails ?? ev.lambdaFunctionFailedEventDetails;
      this.emit(`${at}  failed: ${d?.error ?? 'error'}: ${shortCause(d?.cause)}`);
      return;
    }
    if (type === 'ExecutionFailed') {
      const d = ev.executionFailedEventDetails;
      this.emit(`${at}  ${this.what} failed: ${d?.error ?? 'error'}: ${shortCause(d?.cause)}`);
      return;
    }
    if (type === 'ExecutionSucceeded') this.emit(`${at}  ${this.what} finished`);
    if (type === 'ExecutionAborted') this.emit(`${at}  ${this.what} stopped (aborted)`);
    if (type === 'ExecutionTimedOut') this.emit(`${at}  ${this.what} timed out`);
  }
}

/** A Lambda error's cause is JSON ({errorType, errorMessage, trace}): the message, on one line. */
export function shortCause(cause: string | undefined): string {
  if (cause === undefined) return '';
  const parsed = parseJson(cause) as { errorMessage?: unknown; Cause?: unknown } | string;
  const text =
    typeof parsed === 'object' && parsed !== null
      ? String(parsed.errorMessage ?? parsed.Cause ?? cause)
      : String(parsed);
  const line = text.replace(/\s+/g, ' ').trim();
  return line.length > 300 ? `${line.slice(0, 297)}...` : line;
}

function formatElapsed(ms: number): string {
  const s = Math.max(0, Math.round(ms / 1000));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, '0')}s`;
  return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, '0')}m`;
}

// ---- the report ---------------------------------------------------------------------------------

type Json = Record<string, unknown>;

/** The report's lines for an operator; the whole report is printed with --json. */
export function describeReport(output: unknown): string[] {
  if (output === null || typeof output !== 'object') return [`report: ${JSON.stringify(output)}`];
  const r = output as Json;
  const lines: string[] = [];
  const cp = r.checkpoint as Json | undefined;
  const head = [
    r.mode === undefined ? undefined : `${String(r.mode)}`,
    r.plan === undefined ? undefined : `of plan ${String(r.plan)}`,
    cp?.id === undefined ? undefined : `from checkpoint ${String(cp.id)}`,
    r.jobId === undefined ? undefined : `(job ${String(r.jobId)})`,
  ].filter((x) => x !== undefined);
  if (head.length > 0) lines.push(head.join(' '));
  if (typeof r.secondsToRunning === 'number')
    lines.push(`time to running (RTO achieved): ${r.secondsToRunning} s`);
  for (const m of (r.machines as Json[] | undefined) ?? []) {
    const parts = [
      `machine ${String(m.name ?? '?')}`,
      m.instanceId === undefined ? undefined : String(m.instanceId),
      m.state === undefined ? undefined : String(m.state),
      m.healthy === undefined ? undefined : m.healthy ? 'healthy' : 'NOT healthy',
      m.reason === undefined ? undefined : String(m.reason),
    ].filter((x) => x !== undefined);
    lines.push(parts.join('  '));
  }
  const fb = r.failback as Json | undefined;
  if (fb !== undefined) {
    const disks = ((fb.disks as Json[] | undefined) ?? []).map(
      (d) => `${String(d.disk)} <- ${String(d.volumeId)}`,
    );
    lines.push(
      `failback of job ${String(fb.failoverJobId)} from shared checkpoint ${String(fb.sharedCheckpointId)} into set ${String(fb.reverseSet)}` +
        `${fb.fromBase ? ' (its first cycle: incremental from the shared checkpoint)' : ''}`,
    );
    if (disks.length > 0) lines.push(`recovered volumes: ${disks.join(', ')}`);
    lines.push(
      fb.reverseCheckpointId === undefined
        ? 'reverse cycle: no checkpoint published'
        : `reverse checkpoint: ${String(fb.reverseCheckpointId)}${fb.cutover ? "; the plan's machines were relaunched from it" : ''}`,
    );
  }
  if (typeof r.dataLossWindowSeconds === 'number')
    lines.push(`data-loss window: ${r.dataLossWindowSeconds} s`);
  const cleanup = (r.cleanup ?? r.teardown) as Json | undefined;
  if (cleanup !== undefined) lines.push(`clean-up: ${compact(cleanup)}`);
  if (r.schedule !== undefined) lines.push(`schedule: ${compact(r.schedule)}`);
  if (r.outcome !== undefined) lines.push(`outcome: ${String(r.outcome)}`);
  return lines.length > 0 ? lines : [compact(r)];
}

function compact(v: unknown): string {
  return JSON.stringify(v);
}

// ---- the commands -------------------------------------------------------------------------------

export interface CloudIo {
  readonly out: (line: string) => void;
  readonly err: (line: string) => void;
  /** Clients are created from the flags unless given (tests). */
  readonly sfn?: SFNClient;
  readonly dynamo?: DynamoDBClient;
  readonly ec2?: EC2Client;
  readonly scheduler?: import('@aws-sdk/client-scheduler').SchedulerClient;
  readonly env?: NodeJS.ProcessEnv;
  readonly pollMs?: number;
  readonly signal?: AbortSignal;
}

export interface CommonFlags {
  stack?: string;
  region?: string;
  json?: boolean;
}

export function checkStack(stack: string | undefined): string {
  if (stack === undefined)
    return refuse('--stack', 'name the deployed Ferry stack (cdk deploy ... its stack name)');
  if (!STACK.test(stack)) refuse('--stack', `${JSON.stringify(stack)} is not a CloudFormation stack name`);
  return stack;
}

async function readMachines(path: string): Promise<unknown> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    throw new ConfigError(`--machines: cannot read ${path}: ${(err as Error).message}`, {
      setting: 'machines',
    });
  }
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new ConfigError(`--machines: ${path} is not JSON: ${(err as Error).message}`, {
      setting: 'machines',
    });
  }
}

/** `ferry recover --cloud ...`: start the Recovery state machine, follow it, print its report. */
export async function recoverCloud(
  flags: CloudRecoverFlags &
    CommonFlags & { stateMachineArn?: string; detach?: boolean; machinesFile?: string },
  io: CloudIo,
): Promise<ExecutionEnd | { executionArn: string; status: 'RUNNING' }> {
  const env = io.env ?? process.env;
  const stack = checkStack(flags.stack);
  const machines = flags.machinesFile === undefined ? undefined : await readMachines(flags.machinesFile);
  const { request, executionName } = recoveryRequest({
    ...flags,
    ...(machines === undefined ? {} : { machines }),
  });
  const sfn = io.sfn ?? new SFNClient(flags.region === undefined ? {} : { region: flags.region });
  const arn =
    flags.stateMachineArn ??
    env.FERRY_RECOVERY_STATE_MACHINE_ARN ??
    (await findRecoveryStateMachine(sfn, stack));
  const executionArn = await startRecovery(sfn, arn, executionName, request);
  io.err(`ferry: ${request.mode} started: job ${request.jobId ?? executionName}, execution ${executionArn}`);
  if (flags.detach) {
    if (flags.json) io.out(JSON.stringify({ executionArn, jobId: request.jobId, status: 'RUNNING' }));
    else io.out(executionArn);
    return { executionArn, status: 'RUNNING' };
  }
  const end = await followExecution(sfn, executionArn, {
    ...(io.pollMs === undefined ? {} : { pollMs: io.pollMs }),
    ...(io.signal === undefined ? {} : { signal: io.signal }),
    onLine: (line) => io.err(line),
  });
  if (flags.json) io.out(JSON.stringify({ ...end }, null, 2));
  else if (end.output !== undefined) for (const line of describeReport(end.output)) io.out(line);
  if (end.status !== 'SUCCEEDED') {
    const why = [end.error, shortCause(end.cause)].filter((x) => x).join(': ');
    const message = `recovery job ${request.jobId ?? executionName} ${end.status.toLowerCase()}${why ? `: ${why}` : ''}`;
    // A refused input (nothing was created) is the operator's to fix: exit 2 like other settings.
    if (end.error !== undefined && REFUSALS.includes(end.error))
      throw new ConfigError(message, { setting: 'input' });
    throw new CloudRecoveryError(message);
  }
  return end;
}

/** Whether a checkpoint can still be recovered: every disk's target snapshot still exists, completed. */
export interface CloudRecoverability {
  readonly recoverable: boolean;
  /** Why not: the first disk whose snapshot is gone or not completed. */
  readonly reason?: string;
}

// DescribeSnapshots takes up to 200 filter values per call.
const SNAPSHOT_IDS_PER_CALL = 200;

/**
 * Per checkpoint, whether its target snapshots still exist (retention or a person may have deleted
 * them): asked with a snapshot-id filter, which answers only the ones that exist.
 */
export async function cloudRecoverability(
  ec2: EC2Client,
  checkpoints: readonly RecoveryCheckpoint[],
): Promise<Map<string, CloudRecoverability>> {
  const snapshotOf = (d: RecoveryCheckpoint['disks'][number]) => d.targetRef ?? d.target;
  const ids = [...new Set(checkpoints.flatMap((cp) => cp.disks.map(snapshotOf)))].filter((id) =>
    id.startsWith('snap-'),
  );
  const state = new Map<string, string>();
  for (let i = 0; i < ids.length; i += SNAPSHOT_IDS_PER_CALL) {
    const part = ids.slice(i, i + SNAPSHOT_IDS_PER_CALL);
    let NextToken: string | undefined;
    do {
      const page = await ec2.send(
        new DescribeSnapshotsCommand({ Filters: [{ Name: 'snapshot-id', Values: part }], NextToken }),
      );
      for (const s of page.Snapshots ?? []) if (s.SnapshotId) state.set(s.SnapshotId, String(s.State));
      NextToken = page.NextToken;
    } while (NextToken !== undefined);
  }
  const out = new Map<string, CloudRecoverability>();
  for (const cp of checkpoints) {
    let reason: string | undefined;
    for (const d of cp.disks) {
      const id = snapshotOf(d);
      const s = state.get(id);
      if (!id.startsWith('snap-')) reason = `disk ${d.disk} is not an EBS snapshot (${id})`;
      else if (s === undefined) reason = `snapshot ${id} of disk ${d.disk} is gone`;
      else if (s !== 'completed') reason = `snapshot ${id} of disk ${d.disk} is ${s}`;
      if (reason !== undefined) break;
    }
    out.set(cp.id, reason === undefined ? { recoverable: true } : { recoverable: false, reason });
  }
  return out;
}

/**
 * `ferry checkpoints --cloud`: the stack's catalog, from its DynamoDB table, each checkpoint marked
 * when its snapshots are no longer there to recover from.
 */
export async function checkpointsCloud(
  flags: CommonFlags & { set?: string; table?: string },
  io: CloudIo,
): Promise<RecoveryCheckpoint[]> {
  const env = io.env ?? process.env;
  const region = flags.region === undefined ? {} : { region: flags.region };
  const dynamo = io.dynamo ?? new DynamoDBClient(region);
  const ec2 = io.ec2 ?? new EC2Client(region);
  const table = flags.table ?? env.FERRY_TABLE ?? (await findStateTable(dynamo, checkStack(flags.stack)));
  const list = await new DynamoStateStore(dynamo, table).listCheckpoints(flags.set);
  const recovery = await cloudRecoverability(ec2, list);
  if (flags.json) {
    io.out(
      JSON.stringify(
        list.map((cp) => ({ ...cp, recovery: recovery.get(cp.id) })),
        null,
        2,
      ),
    );
    return list;
  }
  if (list.length === 0)
    io.out(`no checkpoints in table ${table}${flags.set ? ` for set ${flags.set}` : ''}`);
  for (const cp of list) {
    const bytes = cp.disks.reduce((s, d) => s + d.bytes, 0);
    const r = recovery.get(cp.id);
    // Marked only when it cannot be recovered, as the local listing does.
    const marker = r === undefined || r.recoverable ? '' : `  [not recoverable: ${r.reason}]`;
    io.out(
      `${cp.id}  ${cp.createdAt}  ${cp.disks.length} disk(s)  ${formatBytes(bytes)} replicated${marker}`,
    );
    for (const d of cp.disks)
      io.out(`    ${d.disk}: ${d.kind} ${formatBytes(d.bytes)} ${d.source} -> ${d.target}`);
  }
  return list;
}

/**
 * Runs `recover --cloud ...` or `checkpoints --cloud ...` (argv without node and script). cli/main.ts
 * hands any command line with --cloud here; errors propagate to its one-line error handling.
 */
export async function runCloudCommand(argv: readonly string[], io: CloudIo): Promise<void> {
  const program = new Command()
    .name('ferry')
    .exitOverride()
    .configureOutput({ writeOut: (s) => io.out(s.trimEnd()), writeErr: (s) => io.err(s.trimEnd()) });
  const common = (c: Command) =>
    c
      .requiredOption(
        '--cloud',
        'work on the deployed stack (AWS credentials and region from the environment)',
      )
      .option('--stack <name>', 'the Ferry stack (cdk deploy) to work on')
      .option('--region <region>', 'its AWS region (default: AWS_REGION or the profile)')
      .option('--json', 'print JSON');
  /** Options of a command that starts an execution and follows it. */
  const followed = (c: Command, arnVariable: string) =>
    c
      .option('--state-machine-arn <arn>', `skip the lookup by name (or ${arnVariable})`)
      .option('--detach', 'print the execution ARN and return at once instead of following it')
      .option(
        '--poll <seconds>',
        'seconds between looks at the execution while following it',
        String(POLL_MS / 1000),
      );
  /** The io a followed command polls with (--poll, unless the caller set it). */
  const following = (o: { poll: string }): CloudIo => {
    const poll = Number(o.poll);
    if (!(poll >= 0 && poll <= 300)) refuse('--poll', `expected seconds from 0 to 300, not ${o.poll}`);
    return { ...io, pollMs: io.pollMs ?? poll * 1000 };
  };
  const recover = common(program.command('recover'))
    .description(
      'start the Recovery state machine of a deployed stack and follow it to its end (drill, failover, migration, failback, cleanup)',
    )
    .option('--plan <name>', 'protection plan to recover')
    .addOption(new Option('--mode <mode>', 'what to do').choices([...CLOUD_MODES]).default('drill'))
    .option('--checkpoint <n>', 'latest (default) or a checkpoint number')
    .option('--at <time>', 'the newest checkpoint at or before this time (ISO 8601 with its zone)')
    .option(
      '--ttl <minutes>',
      'a drill is torn down this many minutes after its machines are up (default: the plan’s)',
    )
    .option('--job <id>', 'the job id (execution name); for --mode cleanup the job to tear down')
    .option('--machines <file>', "JSON file with the machines' launch settings (default: the plan's)")
    .option(
      '--cutover',
      "failback: after the reverse cycle, relaunch the plan's machines from its checkpoint and clear the failover",
    )
    .option(
      '--source-quiesced',
      'migration, failback --cutover: the source (or the recovered machines) was stopped first: nothing is lost',
    )
    .option(
      '--reverse-set <name>',
      'failback: the set the recovered volumes replicate into (default SET-failback-JOB)',
    );
  followed(recover, 'FERRY_RECOVERY_STATE_MACHINE_ARN').action(async (o) => {
    await recoverCloud({ ...o, machinesFile: o.machines, machines: undefined }, following(o));
  });
  const cycle = program.command('cycle').description("a deployed stack's replication cycles");
  const start = common(cycle.command('start'))
    .description(
      'start one replication cycle of a plan on a deployed stack, with the input its schedule uses (or --input), and follow it to its checkpoint',
    )
    .option('--plan <name>', 'the protection plan')
    .option(
      '--input <file>',
      'a cycle input as JSON (infra/README.md, "Starting a cycle by hand") instead of the schedule\'s',
    )
    .option('--name <name>', 'the execution name, which is the cycle id (default PLAN-manual-TIME-RANDOM)');
  followed(start, 'FERRY_CYCLE_STATE_MACHINE_ARN').action(async (o) => {
    const { startCycleCloud } = await import('./cycle-cloud.ts');
    await startCycleCloud(o, following(o));
  });
  common(program.command('checkpoints'))
    .description("list the checkpoints in a deployed stack's DynamoDB catalog")
    .option('--set <name>', 'only this replication set')
    .option('--table <name>', 'skip the lookup by tag (or FERRY_TABLE)')
    .action(async (o) => {
      await checkpointsCloud(o, io);
    });
  try {
    await program.parseAsync([...argv], { from: 'user' });
  } catch (err) {
    const code = (err as { code?: string }).code;
    if (code === 'commander.helpDisplayed' || code === 'commander.version') return;
    if (typeof code === 'string' && code.startsWith('commander.'))
      throw new ConfigError((err as Error).message.replace(/^error: /, ''), { setting: 'command line' });
    throw err;
  }
}
