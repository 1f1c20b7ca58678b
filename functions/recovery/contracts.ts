// The recovery Lambda's contract: one function, `functions/recovery/handler.ts`, dispatching on
// `action` (resolve, prepare-failback, launch, health, pause, teardown, verify-teardown, record). Every input and output
// the Recovery state machine carries, and the function's environment, as zod schemas parsed at the
// boundary. The state machine, the CDK stack and `ferry recover --cloud` build against these.
import { z } from 'zod';
import { cycleIdSchema, describeIssues, EventValidationError, parseContract } from '../contracts.ts';

export {
  planScheduleName,
  RECOVERY_TAGS,
} from '../../shared/engine/recovery/names.ts';
export { EventValidationError, parseContract };

/**
 * Error names a Catch should treat as permanent (asking again cannot help): a malformed event or
 * environment, or a recovery refused before anything was created (an unbootable combination, a
 * checkpoint that is not in the catalog, a disk assigned twice).
 */
export const RECOVERY_PERMANENT_ERRORS = ['EventValidationError', 'RecoveryRefusedError'] as const;

// ---- identifiers -------------------------------------------------------------------------------

// The same operator-name alphabet as the cycle's contract (plans, sets, disks, machines).
const NAME = /^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$/;
const name = (what: string) =>
  z.string({ error: `expected the ${what} as a string` }).regex(NAME, {
    error: 'must be 1-128 characters of letters, digits and . _ : / - (starting with a letter or digit)',
  });

/**
 * A recovery job's id: the Recovery execution's name (`$$.Execution.Name`), so every resource it
 * creates can be traced back to the execution. Tagged on everything the job creates.
 */
export const jobIdSchema = cycleIdSchema;

export const RECOVERY_MODES = ['drill', 'failover', 'migration', 'failback', 'cleanup'] as const;
export type RecoveryMode = (typeof RECOVERY_MODES)[number];
export const recoveryModeSchema = z.enum(RECOVERY_MODES, {
  error: `expected a mode: ${RECOVERY_MODES.join(', ')}`,
});
/** Modes that launch machines (cleanup only tears a job down; it has nothing to resolve). */
export const LAUNCH_MODES = ['drill', 'failover', 'migration', 'failback'] as const;
export const launchModeSchema = z.enum(LAUNCH_MODES, {
  error: `expected a mode that launches machines: ${LAUNCH_MODES.join(', ')} (cleanup has nothing to resolve: run teardown with the job id)`,
});

const SUBNET_ID = /^subnet-[0-9a-f]{8,17}$/;
const SECURITY_GROUP_ID = /^sg-[0-9a-f]{8,17}$/;
const INSTANCE_ID = /^i-[0-9a-f]{8,17}$/;
const IMAGE_ID = /^ami-[0-9a-f]{8,17}$/;
const VOLUME_ID = /^vol-[0-9a-f]{8,17}$/;
const SNAPSHOT_ID = /^snap-[0-9a-f]{8,17}$/;
// family.size: m5.large, c7gn.16xlarge, u-6tb1.metal, mac2-m2pro.metal
const INSTANCE_TYPE = /^[a-z][a-z0-9-]*\.[a-z0-9]+$/;
const AVAILABILITY_ZONE = /^[a-z]{2}(-[a-z]+)+-\d[a-z]$/;
const KMS_KEY_ARN = /^arn:aws[a-z-]*:kms:[a-z0-9-]+:\d{12}:(key|alias)\/[A-Za-z0-9/_-]+$/;

export const subnetIdSchema = z
  .string({ error: 'expected a subnet id as a string' })
  .regex(SUBNET_ID, { error: 'is not a subnet id (subnet- and 8 or 17 hex digits)' });
export const securityGroupIdSchema = z
  .string({ error: 'expected a security group id as a string' })
  .regex(SECURITY_GROUP_ID, { error: 'is not a security group id (sg- and 8 or 17 hex digits)' });
const instanceIdSchema = z.string().regex(INSTANCE_ID, { error: 'is not an instance id' });
const imageIdSchema = z.string().regex(IMAGE_ID, { error: 'is not an image id' });
const volumeIdSchema = z.string().regex(VOLUME_ID, { error: 'is not a volume id' });
const snapshotIdSchema = z.string().regex(SNAPSHOT_ID, { error: 'is not an EBS snapshot id' });
const isoTime = z.iso.datetime({
  offset: true,
  error: 'expected an ISO 8601 date-time such as 2026-12-05T10:00:00Z',
});

// ---- tags --------------------------------------------------------------------------------------

// EC2 allows 50 tags per resource; Ferry adds up to 6 of its own (job, mode, plan, machine, drill, name).
const MAX_USER_TAGS = 40;
export const userTagsSchema = z
  .record(
    z
      .string()
      .min(1)
      .max(128)
      .refine((k) => !/^(aws|ferry):/i.test(k), {
        error: 'tag keys starting with aws: or ferry: are reserved (Ferry tags what it creates itself)',
      }),
    z.string().max(256),
    { error: 'expected tags as an object of strings' },
  )
  .refine((t) => Object.keys(t).length <= MAX_USER_TAGS, {
    error: `at most ${MAX_USER_TAGS} tags per machine`,
  });

// ---- machine settings ----------------------------------------------------------------------------

export const ARCHITECTURES = ['x86_64', 'arm64'] as const;
export const BOOT_MODES = ['uefi', 'legacy-bios', 'uefi-preferred'] as const;
export const PLATFORMS = ['linux', 'windows'] as const;

/**
 * How one machine of the set is brought up. Every field may come from the plan's recovery defaults
 * (RECOVERY_DEFAULTS); a machine given in the event overrides its defaults field by field, by name.
 * With a boot disk it becomes an instance (RegisterImage + RunInstances); without one, its disks
 * become plain volumes (CreateVolume), for data-only sets.
 */
export const machineSettingsSchema = z.strictObject({
  name: name('machine name'),
  /** The disk (as named in the checkpoint) the machine boots from. */
  bootDisk: name('boot disk').optional(),
  /** Further disks of the checkpoint, attached as /dev/sdf, /dev/sdg, ... in this order. */
  dataDisks: z.array(name('data disk')).max(21).optional(),
  instanceType: z
    .string({ error: 'expected an instance type such as m5.large' })
    .regex(INSTANCE_TYPE, { error: 'is not an instance type (family.size, e.g. m5.large)' })
    .optional(),
  subnetId: subnetIdSchema.optional(),
  securityGroupIds: z.array(securityGroupIdSchema).min(1).max(5).optional(),
  /** Where a volumes-only machine's volumes are created; else the subnet's zone. */
  availabilityZone: z
    .string()
    .regex(AVAILABILITY_ZONE, { error: 'is not an availability zone (e.g. eu-west-1a)' })
    .optional(),
  architecture: z.enum(ARCHITECTURES, { error: 'expected x86_64 or arm64' }).optional(),
  bootMode: z.enum(BOOT_MODES, { error: 'expected uefi, legacy-bios or uefi-preferred' }).optional(),
  /**
   * The guest has the ENA network driver and the NVMe storage driver, which every Nitro instance
   * type needs (guests replicated from EC2 have them; VMware and Nutanix guests often do not).
   */
  ena: z.boolean({ error: 'expected true or false' }).optional(),
  /** The guest's OS. Windows cannot be launched from a snapshot with its license (see resolve). */
  platform: z.enum(PLATFORMS, { error: 'expected linux or windows' }).optional(),
  tags: userTagsSchema.optional(),
  /**
   * Text the guest prints on its serial console once it has booted (a login prompt, a boot-finished
   * line): the machine is healthy only when EC2's console output shows it, besides both status checks.
   */
  bootMessage: z
    .string({ error: 'expected the text to wait for on the console' })
    .min(1)
    .max(200, { error: 'at most 200 characters' })
    .optional(),
});
export type MachineSettings = z.infer<typeof machineSettingsSchema>;

/** One plan's recovery defaults (an entry of RECOVERY_DEFAULTS). */
export const planRecoveryDefaultsSchema = z.strictObject({
  /** The plan's replication set (default: the plan name, as the stack's schedules do). */
  set: name('replication set').optional(),
  machines: z.array(machineSettingsSchema).max(64).default([]),
  /** Drills launch here (an isolated subnet), never in a machine's own subnet from these defaults. */
  drillSubnetId: subnetIdSchema.optional(),
  drillSecurityGroupIds: z.array(securityGroupIdSchema).min(1).max(5).optional(),
  /** How long a drill lives before its automatic teardown. */
  ttlMinutes: z.number().int().min(5).max(10_080).optional(),
});
export type PlanRecoveryDefaults = z.infer<typeof planRecoveryDefaultsSchema>;

/** RECOVERY_DEFAULTS: `{ [plan]: PlanRecoveryDefaults }`, JSON in the function's environment. */
export const recoveryDefaultsSchema = z.record(name('plan'), planRecoveryDefaultsSchema);
export type RecoveryDefaults = z.infer<typeof recoveryDefaultsSchema>;

// ---- resolve -------------------------------------------------------------------------------------

/**
 * Which checkpoint: `latest`, a sequence number, a checkpoint id (`set/cycle`), or `{ at }` (the
 * newest checkpoint published at or before that time).
 */
export const checkpointChoiceSchema = z.union(
  [
    z.literal('latest'),
    z.number().int().positive(),
    z.string().min(1).max(256),
    z.strictObject({ at: isoTime }),
  ],
  { error: 'expected "latest", a checkpoint number, a checkpoint id or { "at": ISO time }' },
);
export type CheckpointChoiceInput = z.infer<typeof checkpointChoiceSchema>;

export const resolveEventSchema = z.strictObject({
  action: z.literal('resolve'),
  jobId: jobIdSchema,
  mode: launchModeSchema,
  plan: name('protection plan'),
  checkpoint: checkpointChoiceSchema.optional(),
  machines: z.array(machineSettingsSchema).max(64).optional(),
  /** Drills only: minutes until the automatic teardown (default the plan's, else 60). */
  ttlMinutes: z.number().int().min(5).max(10_080).optional(),
  /** Migration: the checkpoint the final incremental cycle published (recovered exactly). */
  finalCycle: z.strictObject({ checkpointId: z.string().min(1).max(256) }).optional(),
  /** A failback's cutover (the state machine gives it): the reverse set finalCycle's checkpoint is in. */
  set: name('reverse set').optional(),
});
export type ResolveEvent = z.infer<typeof resolveEventSchema>;

export const resolvedDiskSchema = z.strictObject({
  disk: z.string(),
  snapshotId: snapshotIdSchema,
  sizeGiB: z.number().int().min(1).max(65_536),
  /** /dev/xvda for the boot disk, /dev/sdf.. for data disks (volumes-only machines too: where to attach). */
  deviceName: z.string(),
});
export type ResolvedDisk = z.infer<typeof resolvedDiskSchema>;

export const resolvedMachineSchema = machineSettingsSchema.extend({
  kind: z.enum(['instance', 'volumes']),
  disks: z.array(resolvedDiskSchema).min(1),
  /** Everything needed to launch, filled from the defaults: set for instances. */
  architecture: z.enum(ARCHITECTURES),
  ena: z.boolean(),
  platform: z.enum(PLATFORMS),
});
export type ResolvedMachine = z.infer<typeof resolvedMachineSchema>;

export const checkpointRefSchema = z.strictObject({
  id: z.string(),
  sequence: z.number().int().positive(),
  publishedAt: z.string(),
});
export type CheckpointRef = z.infer<typeof checkpointRefSchema>;

export const resolveResultSchema = z.strictObject({
  jobId: jobIdSchema,
  mode: launchModeSchema,
  plan: z.string(),
  set: z.string(),
  checkpoint: checkpointRefSchema,
  machines: z.array(resolvedMachineSchema),
  /** Disks of the checkpoint no machine uses (reported, not launched). */
  unusedDisks: z.array(z.string()),
  /** Drills: seconds until the automatic teardown; 0 for other modes (nothing is torn down). */
  ttlSeconds: z.number().int().nonnegative(),
  /** When the job started (resolve's time): time to running is measured from it. */
  startedAt: z.string(),
});
export type ResolveResult = z.infer<typeof resolveResultSchema>;

// ---- prepare-failback ------------------------------------------------------------------------------

export const failbackDiskSchema = z.strictObject({
  disk: z.string(),
  machine: z.string(),
  volumeId: volumeIdSchema,
  previousSourceSnapshotId: snapshotIdSchema,
  parentTargetSnapshotId: snapshotIdSchema,
});

/** What prepare-failback decided; the report's `failback` part (with the reverse checkpoint once published). */
export const failbackPartSchema = z.strictObject({
  failoverJobId: z.string(),
  sharedCheckpointId: z.string(),
  reverseSet: z.string(),
  fromBase: z.boolean(),
  disks: z.array(failbackDiskSchema),
  cutover: z.boolean(),
  /** Cutover: the operator stopped the recovered machines before it (the data-loss window is zero). */
  sourceQuiesced: z.boolean().optional(),
  reverseCheckpointId: z.string().optional(),
});

/** The operator's failback input, with the action and the job id (the state machine adds them). */
export const prepareFailbackEventSchema = z.strictObject({
  action: z.literal('prepare-failback'),
  jobId: jobIdSchema,
  mode: z.literal('failback').optional(),
  plan: name('protection plan'),
  /** Relaunch the plan's machines from the reverse cycle's checkpoint (the migration back). */
  cutover: z.boolean({ error: 'cutover must be true or false' }).default(false),
  /** The set the recovered volumes replicate into (default `<set>-failback-<failover job>`). */
  reverseSet: name('reverse set').optional(),
  /** Cutover: the recovered machines were stopped before the reverse cycle (no write is lost). */
  sourceQuiesced: z.boolean({ error: 'sourceQuiesced must be true or false' }).optional(),
  /** Cutover: settings over the plan's recovery defaults, as for a failover. */
  machines: z.array(machineSettingsSchema).max(64).optional(),
});
export type PrepareFailbackEvent = z.infer<typeof prepareFailbackEventSchema>;

export const prepareFailbackResultSchema = z.strictObject({
  part: failbackPartSchema,
  /** The reverse cycle's input, as the cycle state machine takes it (cycleInputSchema's request). */
  cycleInput: z.strictObject({
    plan: z.string(),
    set: z.string(),
    disks: z.array(z.strictObject({ disk: z.string(), volumeId: volumeIdSchema })),
    base: z
      .strictObject({
        checkpointId: z.string(),
        disks: z.array(
          z.strictObject({
            disk: z.string(),
            previousSourceSnapshotId: snapshotIdSchema,
            parentTargetSnapshotId: snapshotIdSchema,
          }),
        ),
      })
      .optional(),
  }),
  /** Cutover only: resolve's event but for the reverse checkpoint (the state machine adds finalCycle). */
  cutoverResolve: z
    .strictObject({
      action: z.literal('resolve'),
      jobId: jobIdSchema,
      mode: z.literal('failback'),
      plan: z.string(),
      set: z.string(),
      machines: z.array(machineSettingsSchema).optional(),
    })
    .optional(),
});
export type PrepareFailbackResult = z.infer<typeof prepareFailbackResultSchema>;

// ---- launch --------------------------------------------------------------------------------------

export const launchEventSchema = z.strictObject({
  action: z.literal('launch'),
  jobId: jobIdSchema,
  mode: launchModeSchema,
  /** The plan, tagged on what is launched (optional for callers that do not have it). */
  plan: name('protection plan').optional(),
  machine: resolvedMachineSchema,
});
export type LaunchEvent = z.infer<typeof launchEventSchema>;

export const launchResultSchema = z.strictObject({
  name: z.string(),
  kind: z.enum(['instance', 'volumes']),
  instanceId: instanceIdSchema.optional(),
  imageId: imageIdSchema.optional(),
  volumeIds: z.array(volumeIdSchema),
  launchedAt: z.string(),
  bootMessage: z.string().optional(),
});
export type LaunchResult = z.infer<typeof launchResultSchema>;

// ---- health --------------------------------------------------------------------------------------

export const machineHealthSchema = z.strictObject({
  name: z.string(),
  instanceId: z.string().optional(),
  /** pending, running, stopped, terminated, ... ; `available`/`in-use` summarised for volumes. */
  state: z.string(),
  systemStatus: z.string(),
  instanceStatus: z.string(),
  healthy: z.boolean(),
  /** When this machine was first seen healthy (carried over from `previous`). */
  healthyAt: z.string().optional(),
  reason: z.string().optional(),
});
export type MachineHealth = z.infer<typeof machineHealthSchema>;

export const healthResultSchema = z.strictObject({
  /** Every machine healthy, or one failed for good (terminated, stopped, impaired, timed out). */
  done: z.boolean(),
  healthy: z.boolean(),
  machines: z.array(machineHealthSchema),
  /** Once all are healthy: from the job's start to the last machine seen healthy (achieved RTO). */
  secondsToRunning: z.number().int().nonnegative().optional(),
});
export type HealthResult = z.infer<typeof healthResultSchema>;

export const healthEventSchema = z.strictObject({
  action: z.literal('health'),
  jobId: jobIdSchema,
  launched: z.array(launchResultSchema),
  startedAt: isoTime,
  /** The previous health result, so each machine's first healthy time is kept across polls. */
  previous: healthResultSchema.optional(),
  /** Give up (done, not healthy) when machines are not all healthy this long after startedAt. */
  timeoutSeconds: z.number().int().min(60).max(86_400).optional(),
});
export type HealthEvent = z.infer<typeof healthEventSchema>;

// ---- pause ---------------------------------------------------------------------------------------

export const pauseEventSchema = z.strictObject({
  action: z.literal('pause'),
  jobId: jobIdSchema,
  plan: name('protection plan'),
});
export type PauseEvent = z.infer<typeof pauseEventSchema>;

export const pauseResultSchema = z.strictObject({
  schedule: z.string(),
  group: z.string(),
  /** False when the schedule does not exist (nothing can start a cycle of the plan). */
  found: z.boolean(),
  wasEnabled: z.boolean(),
});
export type PauseResult = z.infer<typeof pauseResultSchema>;

// ---- teardown ------------------------------------------------------------------------------------

export const teardownResultSchema = z.strictObject({
  terminated: z.array(z.string()),
  deregistered: z.array(z.string()),
  deletedVolumes: z.array(z.string()),
  deletedSnapshots: z.array(z.string()),
  /** Volumes still attached (their instance is shutting down): a later teardown deletes them. */
  waiting: z.array(z.string()),
});
export type TeardownResult = z.infer<typeof teardownResultSchema>;

export const teardownEventSchema = z.strictObject({
  action: z.literal('teardown'),
  jobId: jobIdSchema,
  /**
   * The report part earlier rounds of this teardown left (`{}` before the first, `{ teardown }`
   * after): the answer counts them too.
   */
  previous: z.strictObject({ teardown: teardownResultSchema.optional() }).optional(),
});
export type TeardownEvent = z.infer<typeof teardownEventSchema>;

export const verifyTeardownEventSchema = z.strictObject({
  action: z.literal('verify-teardown'),
  jobId: jobIdSchema,
});
export type VerifyTeardownEvent = z.infer<typeof verifyTeardownEventSchema>;

export const remainingSchema = z.strictObject({
  instances: z.number().int().nonnegative(),
  volumes: z.number().int().nonnegative(),
  images: z.number().int().nonnegative(),
  snapshots: z.number().int().nonnegative(),
});
export const verifyTeardownResultSchema = z.strictObject({
  clean: z.boolean(),
  remaining: remainingSchema,
});
export type VerifyTeardownResult = z.infer<typeof verifyTeardownResultSchema>;

// ---- record --------------------------------------------------------------------------------------

export const RECOVERY_OUTCOMES = [
  'succeeded',
  'unhealthy',
  'failed',
  'cleaned-up',
  'cleanup-failed',
] as const;

/**
 * What the state machine collected, as it has it: record builds the report from these (time to
 * running, outcome, data-loss window) so no arithmetic happens in the state machine. Absent parts
 * are parts the job did not reach.
 */
export const recoveryReportInputSchema = z.strictObject({
  mode: recoveryModeSchema,
  plan: name('protection plan'),
  set: z.string().optional(),
  checkpoint: checkpointRefSchema.optional(),
  startedAt: isoTime,
  machines: z.array(resolvedMachineSchema).optional(),
  launched: z.array(launchResultSchema).optional(),
  health: healthResultSchema.optional(),
  pause: pauseResultSchema.optional(),
  teardown: teardownResultSchema.optional(),
  verify: verifyTeardownResultSchema.optional(),
  /** Migration: the operator quiesced the source before the final cycle (no write is lost). */
  sourceQuiesced: z.boolean().optional(),
  failback: failbackPartSchema.optional(),
  /** A Catch's error output, when the job failed. */
  error: z.object({ Error: z.string().optional(), Cause: z.string().optional() }).optional(),
});
export type RecoveryReportInput = z.infer<typeof recoveryReportInputSchema>;

export const recoveryReportSchema = z.strictObject({
  jobId: z.string(),
  mode: recoveryModeSchema,
  plan: z.string(),
  set: z.string().optional(),
  checkpoint: checkpointRefSchema.optional(),
  startedAt: z.string(),
  finishedAt: z.string(),
  outcome: z.enum(RECOVERY_OUTCOMES),
  /** The achieved RTO: job start to every machine healthy. */
  secondsToRunning: z.number().int().nonnegative().optional(),
  machines: z.array(
    z.strictObject({
      name: z.string(),
      kind: z.enum(['instance', 'volumes']).optional(),
      instanceId: z.string().optional(),
      volumeIds: z.array(z.string()),
      healthy: z.boolean().optional(),
      state: z.string().optional(),
      reason: z.string().optional(),
      disks: z.array(z.strictObject({ disk: z.string(), deviceName: z.string() })).optional(),
    }),
  ),
  schedulePaused: z.boolean().optional(),
  cleanup: z
    .strictObject({
      terminated: z.number().int().nonnegative(),
      deregistered: z.number().int().nonnegative(),
      deletedVolumes: z.number().int().nonnegative(),
      deletedSnapshots: z.number().int().nonnegative(),
      clean: z.boolean().optional(),
      remaining: remainingSchema.optional(),
    })
    .optional(),
  /** Migration: writes possibly lost (0 when quiesced); else at least checkpoint publication to start. */
  dataLossWindowSeconds: z.number().int().nonnegative().optional(),
  failback: failbackPartSchema.optional(),
  error: z.string().optional(),
});
export type RecoveryReport = z.infer<typeof recoveryReportSchema>;

export const recordEventSchema = z.strictObject({
  action: z.literal('record'),
  jobId: jobIdSchema,
  report: recoveryReportInputSchema,
});
export type RecordEvent = z.infer<typeof recordEventSchema>;

/** record answers with the report it wrote. */
export const recordResultSchema = recoveryReportSchema;

// ---- the event -----------------------------------------------------------------------------------

export const recoveryEventSchema = z.discriminatedUnion(
  'action',
  [
    resolveEventSchema,
    prepareFailbackEventSchema,
    launchEventSchema,
    healthEventSchema,
    pauseEventSchema,
    teardownEventSchema,
    verifyTeardownEventSchema,
    recordEventSchema,
  ],
  {
    error:
      'expected action resolve, prepare-failback, launch, health, pause, teardown, verify-teardown or record',
  },
);
export type RecoveryEvent = z.infer<typeof recoveryEventSchema>;

// ---- environment -----------------------------------------------------------------------------------

const jsonDefaults = z
  .string()
  .default('{}')
  .transform((text, ctx) => {
    let value: unknown;
    try {
      value = JSON.parse(text);
    } catch {
      ctx.addIssue({ code: 'custom', message: 'RECOVERY_DEFAULTS: not JSON' });
      return z.NEVER;
    }
    const parsed = recoveryDefaultsSchema.safeParse(value);
    if (!parsed.success) {
      const issue = parsed.error.issues[0];
      ctx.addIssue({
        code: 'custom',
        message: `RECOVERY_DEFAULTS.${issue?.path.join('.') ?? ''}: ${issue?.message ?? 'invalid'}`,
      });
      return z.NEVER;
    }
    return parsed.data;
  });

export const recoveryEnvSchema = z.object({
  TABLE_NAME: z.string({ error: 'TABLE_NAME must name the DynamoDB state table' }).min(3).max(255),
  /** Per plan: its set, machines, drill subnet and TTL (JSON). */
  RECOVERY_DEFAULTS: jsonDefaults,
  /** Customer-managed key for recovered volumes; absent: the account's EBS default key. */
  RECOVERY_KMS_KEY_ARN: z.string().regex(KMS_KEY_ARN, { error: 'is not a KMS key ARN' }).optional(),
  /** The EventBridge Scheduler group holding one schedule per plan (`<stack>-plans`). */
  SCHEDULE_GROUP: z
    .string({ error: 'SCHEDULE_GROUP must name the plans schedule group' })
    .regex(/^[0-9a-zA-Z-_.]{1,64}$/, { error: 'SCHEDULE_GROUP: 1-64 of letters, digits, - _ .' }),
});
export type RecoveryEnv = z.infer<typeof recoveryEnvSchema>;
/** What the stack must set (defaults may be left out). */
export type RecoveryEnvironment = z.input<typeof recoveryEnvSchema>;

/** Parses the recovery function's environment once per container; names every bad variable. */
export function parseRecoveryEnvironment(env: Record<string, string | undefined>): RecoveryEnv {
  const parsed = recoveryEnvSchema.safeParse(env);
  if (parsed.success) return parsed.data;
  const first = parsed.error.issues[0];
  throw new EventValidationError(
    `environment of the recovery function is invalid: ${describeIssues(parsed.error, 10)}`,
    { field: first === undefined ? undefined : first.path.map(String).join('.') },
  );
}
