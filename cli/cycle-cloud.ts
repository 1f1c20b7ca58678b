// `ferry cycle start --cloud`: one replication cycle of a deployed stack's plan, started on its cycle
// state machine with the input the plan's schedule uses (EventBridge Scheduler, `<stack>-plans`) or a
// given one, and followed to its checkpoint with the same progress lines as `ferry recover --cloud`.
import { randomBytes } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { GetScheduleCommand, SchedulerClient } from '@aws-sdk/client-scheduler';
import { SFNClient, StartExecutionCommand } from '@aws-sdk/client-sfn';
import { z } from 'zod';
import { ConfigError } from '../shared/engine/errors.ts';
import { planScheduleName } from '../shared/engine/recovery/names.ts';
import { formatBytes } from '../shared/engine/units.ts';
import {
  type CloudIo,
  CloudRecoveryError,
  type CommonFlags,
  checkStack,
  type ExecutionEnd,
  findStateMachineNamed,
  followExecution,
  shortCause,
} from './recover-cloud.ts';

/** The cycle state machine's name in a stack (infra/stack.ts names it so). */
export const cycleStateMachineName = (stack: string): string => `${stack}-cycle`;
/** The schedule group holding one schedule per plan (infra/stack.ts). */
export const planScheduleGroup = (stack: string): string => `${stack}-plans`;

// Plan names as the stack accepts them (they name the plan's schedule too).
const PLAN = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
// The cycle id is the execution name: 1-80 of letters, digits and . _ : - (functions/contracts.ts).
const CYCLE_ID = /^[A-Za-z0-9][A-Za-z0-9._:-]{0,79}$/;
// A cycle input is small (up to 64 disks): anything much larger is not one.
const MAX_INPUT_BYTES = 256 * 1024;

export interface CycleStartFlags extends CommonFlags {
  readonly plan?: string | undefined;
  /** A JSON file with the cycle input, instead of the schedule's. */
  readonly input?: string | undefined;
  readonly name?: string | undefined;
  readonly stateMachineArn?: string | undefined;
  readonly detach?: boolean | undefined;
}

const refuse = (setting: string, message: string): never => {
  throw new ConfigError(`${setting}: ${message}`, { setting });
};

// The request's outline; the cycle's own contract (prepare) checks every field of it.
const cycleRequestSchema = z.looseObject({
  plan: z.string(),
  set: z.string().optional(),
  disks: z.array(z.looseObject({ disk: z.string() })).min(1),
});

/** What the cycle machine ends with when it published (infra/cycle-state-machine.ts, finalize's answer). */
const publishedSchema = z.looseObject({
  status: z.literal('published'),
  checkpointId: z.string(),
  sequence: z.number(),
  disks: z.array(
    z.looseObject({ disk: z.string(), kind: z.string(), bytes: z.number(), blocks: z.number() }),
  ),
});

/** A new cycle id: the plan, `manual`, the start time and a random suffix (readable in the console). */
export function manualCycleName(plan: string, now = new Date()): string {
  const stamp = now.toISOString().replace(/[-:]/g, '').replace(/\..*$/, '');
  return `${plan.slice(0, 55)}-manual-${stamp}-${randomBytes(2).toString('hex')}`;
}

/**
 * The cycle input: the given file's, or what the plan's schedule starts the cycle machine with.
 * Either must be a cycle of this plan (the cycle's prepare checks the rest).
 */
export async function cycleInputFor(
  plan: string,
  stack: string,
  flags: Pick<CycleStartFlags, 'input'>,
  scheduler: () => SchedulerClient,
): Promise<Record<string, unknown>> {
  let text: string;
  let from: string;
  if (flags.input !== undefined) {
    from = flags.input;
    text = await readFile(flags.input, 'utf8').catch((err: unknown) =>
      refuse('--input', `cannot read ${flags.input}: ${(err as Error).message}`),
    );
  } else {
    const group = planScheduleGroup(stack);
    from = `schedule ${planScheduleName(plan)} in ${group}`;
    const schedule = await scheduler()
      .send(new GetScheduleCommand({ Name: planScheduleName(plan), GroupName: group }))
      .catch((err: unknown) => {
        if ((err as Error).name === 'ResourceNotFoundException') {
          return refuse(
            '--plan',
            `plan ${plan} has no schedule ${planScheduleName(plan)} in ${group} (is it a plan of stack ${stack}?); give the cycle input with --input`,
          );
        }
        throw err;
      });
    text = schedule.Target?.Input ?? '';
  }
  if (text.length > MAX_INPUT_BYTES) refuse('--input', `${from} is over ${formatBytes(MAX_INPUT_BYTES)}`);
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (err) {
    return refuse('--input', `${from} is not JSON: ${(err as Error).message}`);
  }
  const parsed = cycleRequestSchema.safeParse(value);
  if (!parsed.success) {
    const issue = parsed.error.issues[0]!;
    return refuse(
      '--input',
      `${from} is not a cycle input: ${issue.path.join('.') || 'input'}: ${issue.message}`,
    );
  }
  if (parsed.data.plan !== plan) {
    refuse('--input', `${from} is a cycle of plan ${parsed.data.plan}, not ${plan}`);
  }
  return parsed.data;
}

/** The lines an operator reads at the end of a cycle. */
export function describeCycleEnd(end: ExecutionEnd): string[] {
  const published = publishedSchema.safeParse(end.output);
  if (!published.success)
    return [`cycle ended ${end.status.toLowerCase()}: ${JSON.stringify(end.output ?? null)}`];
  const cp = published.data;
  return [
    `checkpoint ${cp.checkpointId} published (#${cp.sequence})`,
    ...cp.disks.map((d) => `  ${d.disk}: ${d.kind}, ${d.blocks} blocks, ${formatBytes(d.bytes)} written`),
  ];
}

/** `ferry cycle start --cloud`: starts the cycle, follows it, prints its checkpoint. */
export async function startCycleCloud(
  flags: CycleStartFlags,
  io: CloudIo,
): Promise<ExecutionEnd | { executionArn: string; status: 'RUNNING' }> {
  const env = io.env ?? process.env;
  const stack = checkStack(flags.stack);
  if (flags.plan === undefined) refuse('--plan', 'name the protection plan whose cycle to start');
  const plan = flags.plan as string;
  if (!PLAN.test(plan))
    refuse('--plan', `${JSON.stringify(plan)} is not a plan name (1-64 letters, digits, . _ -)`);
  if (flags.name !== undefined && !CYCLE_ID.test(flags.name))
    refuse('--name', 'must be 1-80 letters, digits, . _ : - (it becomes the cycle id)');
  const region = flags.region === undefined ? {} : { region: flags.region };
  const sfn = io.sfn ?? new SFNClient(region);
  const input = await cycleInputFor(plan, stack, flags, () => io.scheduler ?? new SchedulerClient(region));
  const arn =
    flags.stateMachineArn ??
    env.FERRY_CYCLE_STATE_MACHINE_ARN ??
    (await findStateMachineNamed(sfn, stack, cycleStateMachineName(stack)));
  const name = flags.name ?? manualCycleName(plan);
  const started = await sfn
    .send(new StartExecutionCommand({ stateMachineArn: arn, name, input: JSON.stringify(input) }))
    .catch((err: unknown) => {
      if ((err as Error).name === 'ExecutionAlreadyExists')
        refuse(
          '--name',
          `${name}: a cycle of that name already ran with another input (cycle ids are never reused)`,
        );
      throw err;
    });
  const executionArn = started.executionArn;
  if (executionArn === undefined) throw new CloudRecoveryError('StartExecution answered without an ARN');
  io.err(`ferry: cycle ${name} of plan ${plan} started: execution ${executionArn}`);
  if (flags.detach) {
    io.out(flags.json ? JSON.stringify({ executionArn, cycleId: name, status: 'RUNNING' }) : executionArn);
    return { executionArn, status: 'RUNNING' };
  }
  const end = await followExecution(sfn, executionArn, {
    ...(io.pollMs === undefined ? {} : { pollMs: io.pollMs }),
    ...(io.signal === undefined ? {} : { signal: io.signal }),
    onLine: (line) => io.err(line),
    what: 'cycle',
    item: 'iteration',
  });
  if (flags.json) io.out(JSON.stringify({ cycleId: name, ...end }, null, 2));
  else for (const line of describeCycleEnd(end)) io.out(line);
  const published = publishedSchema.safeParse(end.output).success;
  if (end.status !== 'SUCCEEDED' || !published) {
    const why = [end.error, shortCause(end.cause)].filter((x) => x).join(': ');
    throw new CloudRecoveryError(
      `cycle ${name} of plan ${plan} ${end.status === 'SUCCEEDED' ? 'published no checkpoint' : end.status.toLowerCase()}${why ? `: ${why}` : ''}`,
    );
  }
  return end;
}
