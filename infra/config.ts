// The deployment's configuration: protection plans, node budget and window defaults, read from CDK
// context or a JSON file and validated with zod, every error naming the setting to fix.
import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { z } from 'zod';
import { planRecoveryDefaultsSchema, type RecoveryDefaults } from '../functions/recovery/contracts.ts';
import { resolveParams } from '../shared/engine/config.ts';
import { ConfigError } from '../shared/engine/errors.ts';
import { parseSize } from '../shared/engine/units.ts';

/** EBS direct API block size: chunk sizes and windows must be whole blocks. */
const EBS_BLOCK_SIZE = 512 * 1024;

// A CloudWatch alarm evaluates at most 7 days (period x evaluation periods <= 604,800 s), and the RPO
// alarm uses one period of exactly the RPO, so an RPO longer than a week cannot be alarmed on.
const MAX_RPO_MINUTES = 7 * 24 * 60;
// Cycles take minutes at the very least (snapshot, diff, finalize); a shorter RPO cannot be met.
const MIN_RPO_MINUTES = 5;

// The same alphabet the state machine contract accepts for plan, set and disk names
// (functions/contracts.ts): they end up in DynamoDB keys, tags, alarm dimensions and schedule names.
const NAME = /^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$/;
// Schedule and alarm names are built from the plan name and allow fewer characters.
const PLAN_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
const VOLUME_ID = /^vol-[0-9a-f]{8,17}$/;
const KMS_KEY_ARN = /^arn:aws[a-z-]*:kms:[a-z0-9-]+:\d{12}:key\/[A-Za-z0-9-]+$/;
// EventBridge Scheduler expressions: rate(5 minutes), cron(0 */2 * * ? *), at(...) is refused (one-off).
const SCHEDULE = /^(rate\(\s*\d+\s+(minute|minutes|hour|hours|day|days)\s*\)|cron\([^()]+\))$/;
const EMAIL = /^[^@\s]+@[^@\s]+\.[^@\s]+$/;

const size = z.union([z.string(), z.number()], {
  error: 'expected a size such as "32 MiB" or a whole number of bytes',
});

/** Replication parameters a plan passes to every cycle (the per-cycle subset the planner accepts). */
const paramsSchema = z.strictObject({
  chunkSize: size.optional(),
  window: size.optional(),
  windowLevels: z.array(size).min(1).optional(),
  adaptive: z.boolean().optional(),
});

const diskSchema = z.strictObject({
  disk: z.string({ error: 'expected the disk name as a string' }).regex(NAME, {
    error: 'must be 1-128 characters of letters, digits and . _ : / - (starting with a letter or digit)',
  }),
  volumeId: z
    .string({ error: 'expected the EBS volume id as a string' })
    .regex(VOLUME_ID, { error: 'is not an EBS volume id (vol- and 8 or 17 hex digits)' }),
});

const planSchema = z.strictObject({
  name: z.string({ error: 'expected the plan name as a string' }).regex(PLAN_NAME, {
    error: 'must be 1-64 characters of letters, digits and . _ - (starting with a letter or digit)',
  }),
  /** The replication set the plan's checkpoints belong to; defaults to the plan name. */
  set: z
    .string()
    .regex(NAME, { error: 'must be 1-128 characters of letters, digits and . _ : / -' })
    .optional(),
  /** EventBridge Scheduler expression: rate(...) or cron(...). */
  schedule: z.string({ error: 'expected a schedule expression such as "rate(15 minutes)"' }).regex(SCHEDULE, {
    error: 'must be an EventBridge Scheduler rate(...) or cron(...) expression, e.g. "rate(15 minutes)"',
  }),
  /** IANA time zone for cron expressions. */
  timezone: z.string().min(1).default('UTC'),
  rpoMinutes: z
    .number({ error: 'expected the RPO in minutes as a number' })
    .int({ error: 'must be a whole number of minutes' })
    .min(MIN_RPO_MINUTES, { error: `must be at least ${MIN_RPO_MINUTES} minutes` })
    .max(MAX_RPO_MINUTES, {
      error: `must be at most ${MAX_RPO_MINUTES} minutes (7 days, the longest alarm)`,
    }),
  /** A disabled plan's schedule is created but does not fire. */
  enabled: z.boolean().default(true),
  disks: z
    .array(diskSchema)
    .min(1, { error: 'a plan needs at least one disk' })
    .max(64, { error: 'a plan holds at most 64 disks (one cycle input)' }),
  params: paramsSchema.optional(),
  /**
   * How the plan's machines are recovered (functions/recovery/contracts.ts): launch settings per
   * machine, the isolated subnet and security groups drills use, the drill TTL. The set is the plan's.
   */
  recovery: planRecoveryDefaultsSchema.omit({ set: true }).optional(),
});

export const ferryConfigSchema = z.strictObject({
  /** Aggregate in-flight bytes across all disks (NODE_BUDGET of the planner and chunk-writer). */
  nodeBudget: size.default('256 MiB'),
  /** Window defaults every plan starts from; a plan's own params override them key by key. */
  windowDefaults: paramsSchema.default({}),
  /**
   * Customer-managed key for the target snapshots. Absent: the stack creates one (rotation on).
   */
  snapshotKmsKeyArn: z.string().regex(KMS_KEY_ARN, { error: 'is not a KMS key ARN' }).optional(),
  /**
   * Customer-managed keys the source volumes are encrypted with (reading their snapshots needs them).
   * Volumes encrypted with the AWS-managed aws/ebs key need nothing here.
   */
  sourceKmsKeyArns: z.array(z.string().regex(KMS_KEY_ARN, { error: 'is not a KMS key ARN' })).default([]),
  /** Highest number of chunk-writer Lambdas the grant queue runs at once (SQS event source maximum). */
  writerConcurrency: z.number().int().min(2).max(1000).default(20),
  /** Days the functions' and the state machine's logs are kept. */
  logRetentionDays: z
    .union([
      z.literal(1),
      z.literal(3),
      z.literal(5),
      z.literal(7),
      z.literal(14),
      z.literal(30),
      z.literal(60),
      z.literal(90),
      z.literal(180),
      z.literal(365),
    ])
    .default(30),
  /** Addresses subscribed to the alarm and checkpoint notifications topic. */
  notifyEmails: z.array(z.string().regex(EMAIL, { error: 'is not an email address' })).default([]),
  plans: z.array(planSchema).default([]),
});

export type FerryConfigInput = z.input<typeof ferryConfigSchema>;
export type FerryConfig = z.output<typeof ferryConfigSchema>;
export type ProtectionPlan = FerryConfig['plans'][number];

function fieldPath(path: readonly PropertyKey[]): string {
  return path.map((k, i) => (typeof k === 'number' ? `[${k}]` : `${i ? '.' : ''}${String(k)}`)).join('');
}

/** Rate expressions in minutes; cron expressions are not compared with the RPO. */
function rateMinutes(expression: string): number | undefined {
  const m = /^rate\(\s*(\d+)\s+(minute|minutes|hour|hours|day|days)\s*\)$/.exec(expression);
  if (!m) return undefined;
  const n = Number(m[1]);
  const unit = m[2]!.startsWith('minute') ? 1 : m[2]!.startsWith('hour') ? 60 : 1440;
  return n * unit;
}

/**
 * Validates a configuration object. Throws a ConfigError whose message names every offending setting
 * (`plans[0].rpoMinutes: must be at least 5 minutes`); returns the configuration with defaults filled.
 */
export function parseFerryConfig(input: unknown, source = 'configuration'): FerryConfig {
  const parsed = ferryConfigSchema.safeParse(input);
  if (!parsed.success) {
    const lines = parsed.error.issues.slice(0, 5).map((issue) => {
      const where = fieldPath(issue.path);
      if (issue.code === 'unrecognized_keys') {
        return `${where ? `${where}: ` : ''}unknown setting${issue.keys.length > 1 ? 's' : ''} ${issue.keys.join(', ')}`;
      }
      return `${where || '(root)'}: ${issue.message}`;
    });
    const first = parsed.error.issues[0];
    throw new ConfigError(`${source} is invalid: ${lines.join('; ')}`, {
      setting: first ? fieldPath(first.path) : undefined,
    });
  }
  const config = parsed.data;
  const refuse = (setting: string, message: string): never => {
    throw new ConfigError(`${source} is invalid: ${setting}: ${message}`, { setting });
  };

  let nodeBudget = 0;
  try {
    nodeBudget = parseSize(config.nodeBudget, 'nodeBudget');
  } catch (err) {
    refuse('nodeBudget', (err as Error).message.replace(/^nodeBudget: /, ''));
  }
  // The engine's own rules (chunk a multiple of the 512 KiB EBS block, window >= chunk, ascending
  // levels, node budget >= a window) are checked now, so a bad plan fails `cdk synth`, not a cycle.
  const check = (setting: string, params: object) => {
    try {
      resolveParams({ ...params, nodeBudget }, { targetBlockSize: EBS_BLOCK_SIZE });
    } catch (err) {
      refuse(setting, (err as Error).message);
    }
  };
  check('windowDefaults', config.windowDefaults);

  const names = new Set<string>();
  config.plans.forEach((plan, i) => {
    if (names.has(plan.name)) refuse(`plans[${i}].name`, `plan ${plan.name} appears twice`);
    names.add(plan.name);
    const disks = new Set<string>();
    plan.disks.forEach((d, j) => {
      if (disks.has(d.disk)) refuse(`plans[${i}].disks[${j}].disk`, `disk ${d.disk} appears twice`);
      disks.add(d.disk);
    });
    check(`plans[${i}].params`, { ...config.windowDefaults, ...plan.params });
    checkRecovery(plan, `plans[${i}].recovery`, refuse);
    const every = rateMinutes(plan.schedule);
    if (every !== undefined && every > plan.rpoMinutes) {
      refuse(
        `plans[${i}].schedule`,
        `${plan.schedule} starts a cycle less often than the RPO of ${plan.rpoMinutes} minutes: the RPO can never be met`,
      );
    }
  });
  return config;
}

/**
 * A plan's recovery defaults name only disks of the plan (its checkpoints hold exactly those), each
 * disk once, and machines by distinct names: checked at synth, not found out during a disaster.
 */
function checkRecovery(
  plan: ProtectionPlan,
  where: string,
  refuse: (setting: string, message: string) => never,
): void {
  const disks = new Set(plan.disks.map((d) => d.disk));
  const used = new Map<string, string>();
  const names = new Set<string>();
  plan.recovery?.machines.forEach((m, j) => {
    const at = `${where}.machines[${j}]`;
    if (names.has(m.name)) refuse(`${at}.name`, `machine ${m.name} appears twice`);
    names.add(m.name);
    const named = [
      ...(m.bootDisk === undefined ? [] : [['bootDisk', m.bootDisk] as const]),
      ...(m.dataDisks ?? []).map((d, k) => [`dataDisks[${k}]`, d] as const),
    ];
    for (const [field, disk] of named) {
      if (!disks.has(disk)) {
        refuse(`${at}.${field}`, `${disk} is not a disk of plan ${plan.name} (${[...disks].join(', ')})`);
      }
      const other = used.get(disk);
      if (other !== undefined) refuse(`${at}.${field}`, `disk ${disk} is already used by machine ${other}`);
      used.set(disk, m.name);
    }
  });
}

/** Every plan's recovery defaults, as the recovery function reads them (RECOVERY_DEFAULTS). */
export function recoveryDefaults(config: FerryConfig): RecoveryDefaults {
  return Object.fromEntries(
    config.plans.map((plan) => [plan.name, { set: plan.set ?? plan.name, machines: [], ...plan.recovery }]),
  );
}

/** The replication parameters a plan's cycles are started with (defaults, then the plan's own). */
export function planParams(config: FerryConfig, plan: ProtectionPlan): z.output<typeof paramsSchema> {
  return { ...config.windowDefaults, ...plan.params };
}

/** Reads a JSON configuration file; relative paths are taken from `cwd` (where `cdk` runs). */
export function loadFerryConfigFile(path: string, cwd = process.cwd()): FerryConfig {
  const file = resolve(cwd, path);
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    throw new ConfigError(`cannot read the Ferry configuration file ${file}: ${(err as Error).message}`, {
      setting: 'config',
      cause: err,
    });
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (err) {
    throw new ConfigError(`${file} is not valid JSON: ${(err as Error).message}`, {
      setting: 'config',
      cause: err,
    });
  }
  return parseFerryConfig(json, file);
}

/**
 * The configuration from CDK context: `-c config=<file.json>` names a file; `-c ferry='{"plans":[...]}'`
 * (or an object set in cdk.json under "ferry") gives it inline. Exactly one of the two.
 */
export function configFromContext(tryGetContext: (key: string) => unknown, cwd = process.cwd()): FerryConfig {
  const file = tryGetContext('config');
  const inline = tryGetContext('ferry');
  if (file !== undefined && inline !== undefined) {
    throw new ConfigError(
      'give the Ferry configuration either as -c config=<file> or as -c ferry=<json>, not both',
      {
        setting: 'config',
      },
    );
  }
  if (inline !== undefined) {
    if (typeof inline === 'string') {
      let json: unknown;
      try {
        json = JSON.parse(inline);
      } catch (err) {
        throw new ConfigError(`context "ferry" is not valid JSON: ${(err as Error).message}`, {
          setting: 'ferry',
        });
      }
      return parseFerryConfig(json, 'context "ferry"');
    }
    return parseFerryConfig(inline, 'context "ferry"');
  }
  if (typeof file !== 'string' || file.length === 0) {
    throw new ConfigError(
      'no Ferry configuration: pass -c config=<file.json> (see infra/config/example.json) or -c ferry=<json>',
      { setting: 'config' },
    );
  }
  return loadFerryConfigFile(file, cwd);
}
