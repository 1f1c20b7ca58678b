// The serverless contracts: every Lambda's input and output (the state machine's data) and every
// function's environment, as zod schemas parsed at the boundary. Shared by the handlers, the CDK
// stack (which types each function's environment from these) and the local run.
import { z } from 'zod';
import { TICK_STATUSES } from '../shared/engine/cycle/types.ts';
import { type ErrorContext, FerryError } from '../shared/engine/errors.ts';
import { parseSize } from '../shared/engine/units.ts';

/**
 * An event or environment that does not match its contract; `field` is the first offending path.
 * Its `name` is what the state machine's Catch matches (a permanent error: asking again cannot help).
 */
export class EventValidationError extends FerryError {
  readonly field: string | undefined;
  constructor(message: string, ctx: ErrorContext & { field?: string | undefined } = {}) {
    super(message, { ...ctx, setting: ctx.field });
    this.name = 'EventValidationError';
    this.field = ctx.field;
  }
}

// ---- identifiers -------------------------------------------------------------------------------

// Ids end up in DynamoDB keys (URI-encoded), SQS grant messages (<= 256 characters each) and
// checkpoint ids. A Step Functions execution name is at most 80 characters of this alphabet, so
// the state machine can pass `$$.Execution.Name` as the cycle id unchanged.
const CYCLE_ID = /^[A-Za-z0-9][A-Za-z0-9._:-]{0,79}$/;
// Plans, sets and disks are operator names: letters, digits and a few separators, nothing that would
// need quoting in a log line or a console URL.
const NAME = /^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$/;
// EC2 snapshot ids: `snap-` and 8 or 17 hex digits.
const SNAPSHOT_ID = /^snap-[0-9a-f]{8,17}$/;

const name = (what: string) =>
  z.string({ error: `expected the ${what} as a string` }).regex(NAME, {
    error: `must be 1-128 characters of letters, digits and . _ : / - (starting with a letter or digit)`,
  });

export const cycleIdSchema = z.string({ error: 'expected the cycle id as a string' }).regex(CYCLE_ID, {
  error: 'must be 1-80 characters of letters, digits and . _ : - (a Step Functions execution name)',
});
export const snapshotIdSchema = z
  .string({ error: 'expected an EBS snapshot id as a string' })
  .regex(SNAPSHOT_ID, { error: 'is not an EBS snapshot id (snap- and 8 or 17 hex digits)' });

// EBS volumes are 1 GiB to 64 TiB.
const volumeSizeGiB = z
  .number({ error: 'expected the volume size in GiB as a number' })
  .int()
  .min(1)
  .max(65_536);

// ---- the cycle the scheduler starts ------------------------------------------------------------

const size = z.union([z.number(), z.string()], {
  error: 'expected a size such as "32 MiB" or a whole number of bytes',
});

/** Replication parameters a plan may set per cycle; the node budget is the deployment's (NODE_BUDGET). */
export const cycleParamsSchema = z.strictObject({
  chunkSize: size.optional(),
  window: size.optional(),
  windowLevels: z.array(size).min(1).optional(),
  adaptive: z.boolean().optional(),
});

export const cycleDiskInputSchema = z.strictObject({
  disk: name('disk id'),
  /**
   * The new source snapshot of this disk (an EBS snapshot taken for this cycle). Creating it (EC2
   * CreateSnapshot and its waiter) is a step before the planner; the local run takes one given.
   */
  sourceSnapshotId: snapshotIdSchema,
  /** The source volume's size; the target snapshot is started with it and the differ checks it. */
  volumeSizeGiB,
});

/** The shared checkpoint a set's first cycle starts from (shared/engine/cycle/types.ts CycleBase). */
const cycleBaseSchema = z.strictObject({
  checkpointId: z.string().min(1).max(512),
  disks: z
    .array(
      z.strictObject({
        disk: name('disk id'),
        previousSourceSnapshotId: snapshotIdSchema,
        parentTargetSnapshotId: snapshotIdSchema,
      }),
    )
    .min(1, { error: 'a base names at least one disk' })
    .max(64),
});

const cycleFields = {
  plan: name('protection plan'),
  set: name('replication set'),
  cycleId: cycleIdSchema,
  params: cycleParamsSchema.optional(),
  /**
   * When the cycle's execution started (ISO 8601, `$$.Execution.StartTime`), before its source
   * snapshots were taken: the published checkpoint's age (the RPO metric) is measured from it, so
   * it never looks younger than its data. Absent (a cycle started by hand): from prepare.
   */
  startedAt: z.iso
    .datetime({ offset: true, error: 'expected an ISO 8601 date-time such as 2026-11-05T10:00:00Z' })
    .optional(),
  /** Only for a set without checkpoints: its first cycle is incremental from this shared checkpoint. */
  base: cycleBaseSchema.optional(),
};

/** The cycle prepare opens: one protection plan's disks, each with its new source snapshot. */
export const cycleInputSchema = z
  .strictObject({
    ...cycleFields,
    disks: z.array(cycleDiskInputSchema).min(1, { error: 'a cycle needs at least one disk' }).max(64),
  })
  .superRefine((c, ctx) => {
    const seen = new Set<string>();
    c.disks.forEach((d, i) => {
      if (seen.has(d.disk)) {
        ctx.addIssue({ code: 'custom', path: ['disks', i, 'disk'], message: `disk ${d.disk} appears twice` });
      }
      seen.add(d.disk);
    });
    const based = new Set<string>();
    c.base?.disks.forEach((b, i) => {
      if (!seen.has(b.disk) || based.has(b.disk)) {
        ctx.addIssue({
          code: 'custom',
          path: ['base', 'disks', i, 'disk'],
          message: based.has(b.disk)
            ? `disk ${b.disk} appears twice in the base`
            : `the base names disk ${b.disk}, which is not a disk of this cycle (${[...seen].join(', ')})`,
        });
      }
      based.add(b.disk);
    });
  });
export type CycleInput = z.infer<typeof cycleInputSchema>;

const VOLUME_ID = /^vol-[0-9a-f]{8,17}$/;
const volumeIdSchema = z
  .string({ error: 'expected an EBS volume id as a string' })
  .regex(VOLUME_ID, { error: 'is not an EBS volume id (vol- and 8 or 17 hex digits)' });

/** A source snapshot the state machine created: EC2 CreateSnapshot's answer, nothing added. */
const createdSnapshotSchema = z.strictObject({
  volumeId: volumeIdSchema,
  sourceSnapshotId: snapshotIdSchema,
  volumeSizeGiB,
});

/** A disk as the schedule (or an operator) requests it: a volume to snapshot, or a snapshot given. */
const requestedDiskSchema = z.strictObject({
  disk: name('disk id'),
  volumeId: volumeIdSchema.optional(),
  sourceSnapshotId: snapshotIdSchema.optional(),
  volumeSizeGiB: volumeSizeGiB.optional(),
});

/**
 * What the state machine gives prepare: the cycle, its disks as requested, and per requested disk,
 * in the same order, either the snapshot given with it or EC2's answer to the CreateSnapshot it made
 * (which does not name the disk: it is named here, by index, checked against the volume). Parsed
 * into a `CycleInput`.
 */
export const preparedCycleSchema = z
  .strictObject({
    ...cycleFields,
    requested: z.array(requestedDiskSchema).min(1).max(64).optional(),
    disks: z
      .array(
        z.union([cycleDiskInputSchema, createdSnapshotSchema], {
          error:
            "expected {disk, sourceSnapshotId, volumeSizeGiB} or CreateSnapshot's {volumeId, sourceSnapshotId, volumeSizeGiB}",
        }),
      )
      .min(1, { error: 'a cycle needs at least one disk' })
      .max(64),
  })
  .transform(({ requested, ...c }, ctx) => {
    const disks = c.disks.map((d, i) => {
      if ('disk' in d) return d;
      const asked = requested?.[i];
      if (asked?.volumeId !== d.volumeId) {
        ctx.addIssue({
          code: 'custom',
          path: ['disks', i],
          message:
            `snapshot ${d.sourceSnapshotId} of volume ${d.volumeId} has no requested disk of that volume at ` +
            `index ${i} (requested: ${asked ? `${asked.disk} ${asked.volumeId ?? 'without a volume'}` : 'nothing'})`,
        });
        return z.NEVER;
      }
      return { disk: asked.disk, sourceSnapshotId: d.sourceSnapshotId, volumeSizeGiB: d.volumeSizeGiB };
    });
    return { ...c, disks };
  })
  .pipe(cycleInputSchema);

/** One disk's differ task: the Map state iterates over these. */
export const diffTaskSchema = z.strictObject({
  set: name('replication set'),
  cycleId: cycleIdSchema,
  disk: name('disk id'),
});
export type DiffTask = z.infer<typeof diffTaskSchema>;

/** The cycle as the state machine carries it from prepare to finalize (a reference, not state). */
export const cycleRefSchema = z.strictObject({
  plan: name('protection plan'),
  set: name('replication set'),
  cycleId: cycleIdSchema,
  /** The plan lock's owner; renewals and the release are conditional on it. */
  lockOwner: z.string().min(1).max(256),
  /** The sequence number the checkpoint of this cycle will get. */
  sequence: z.number().int().positive(),
  disks: z.array(diffTaskSchema).min(1),
});
export type CycleRef = z.infer<typeof cycleRefSchema>;

// ---- planner -----------------------------------------------------------------------------------

export const plannerEventSchema = z.discriminatedUnion(
  'action',
  [
    z.strictObject({ action: z.literal('prepare'), cycle: preparedCycleSchema }),
    z.strictObject({
      action: z.literal('tick'),
      cycle: cycleRefSchema,
      /** The caller's count of this tick (the state machine's tick counter), echoed in the result. */
      round: z.number().int().positive().optional(),
    }),
  ],
  { error: 'expected action "prepare" or "tick"' },
);
export type PlannerEvent = z.infer<typeof plannerEventSchema>;

/** prepare's answer: the reference every later state is given. */
export const prepareResultSchema = cycleRefSchema;
export type PrepareResult = CycleRef;

export { TICK_STATUSES };
export type TickStatus = (typeof TICK_STATUSES)[number];

export const diskProgressSchema = z.strictObject({
  disk: z.string(),
  /** Descriptors of this cycle; undefined until the differ has finished. */
  descriptors: z.number().int().nonnegative().optional(),
  completed: z.number().int().nonnegative(),
  bytes: z.number().int().nonnegative(),
  completedBytes: z.number().int().nonnegative(),
  inflightBytes: z.number().int().nonnegative(),
  windowBytes: z.number().int().nonnegative(),
  /** Grants issued by this tick (the writers issue most grants themselves, ACK-clocked). */
  granted: z.number().int().nonnegative(),
  reclaimed: z.number().int().nonnegative(),
});
export type DiskProgressReport = z.infer<typeof diskProgressSchema>;

export const tickResultSchema = z.strictObject({
  status: z.enum(TICK_STATUSES),
  /** Why the cycle failed or is stuck; absent while it runs. */
  reason: z.string().optional(),
  /** Consecutive ticks without a completed descriptor. */
  idleTicks: z.number().int().nonnegative(),
  disks: z.array(diskProgressSchema),
  /** The event's `round`, echoed: the state machine counts its ticks with it (no Pass state). */
  round: z.number().int().positive().optional(),
});
export type TickResult = z.infer<typeof tickResultSchema>;

// ---- differ ------------------------------------------------------------------------------------

export const differEventSchema = diffTaskSchema;
export type DifferEvent = DiffTask;

export const differResultSchema = z.strictObject({
  set: z.string(),
  cycleId: z.string(),
  disk: z.string(),
  kind: z.enum(['full', 'incremental']),
  /** False when the differ stopped before its deadline: invoke it again with the same input. */
  done: z.boolean(),
  /** Counts so far (final when done). */
  descriptors: z.number().int().nonnegative(),
  blocks: z.number().int().nonnegative(),
  bytes: z.number().int().nonnegative(),
});
export type DifferResult = z.infer<typeof differResultSchema>;

// ---- finalizer ---------------------------------------------------------------------------------

/** A Step Functions Catch's error output (ResultPath), passed on to abort. */
export const stateErrorSchema = z.object({ Error: z.string().optional(), Cause: z.string().optional() });

export const finalizerEventSchema = z.discriminatedUnion(
  'action',
  [
    z.strictObject({ action: z.literal('finalize'), cycle: cycleRefSchema }),
    z.strictObject({
      action: z.literal('abort'),
      cycle: cycleRefSchema,
      /** Why the cycle is abandoned (a tick's reason, "stuck", an operator's note). */
      reason: z.string().max(2000).optional(),
      error: stateErrorSchema.optional(),
    }),
  ],
  { error: 'expected action "finalize" or "abort"' },
);
export type FinalizerEvent = z.infer<typeof finalizerEventSchema>;

export const publishedDiskSchema = z.strictObject({
  disk: z.string(),
  kind: z.enum(['full', 'incremental']),
  sourceSnapshotId: z.string(),
  targetSnapshotId: z.string(),
  descriptors: z.number().int().nonnegative(),
  blocks: z.number().int().nonnegative(),
  bytes: z.number().int().nonnegative(),
  /** Hex of the LINEAR aggregate sent with CompleteSnapshot. */
  aggregateSha256: z.string(),
});

export const finalizeResultSchema = z.discriminatedUnion('status', [
  z.strictObject({
    status: z.literal('published'),
    checkpointId: z.string(),
    sequence: z.number().int().positive(),
    disks: z.array(publishedDiskSchema),
  }),
  /** Target snapshots are still completing: wait and invoke finalize again with the same input. */
  z.strictObject({ status: z.literal('completing'), pending: z.array(z.string()) }),
]);
export type FinalizeResult = z.infer<typeof finalizeResultSchema>;

export const abortResultSchema = z.strictObject({
  status: z.literal('aborted'),
  reason: z.string(),
  /** The checkpoint that stays current (the last good one), if the set has any. */
  currentCheckpointId: z.string().optional(),
});
export type AbortResult = z.infer<typeof abortResultSchema>;

// ---- environments ------------------------------------------------------------------------------

const envInt = (what: string, min: number, max: number, fallback: number) =>
  z.coerce
    .number({ error: `${what}: expected a whole number` })
    .int({ error: `${what}: expected a whole number` })
    .min(min)
    .max(max)
    .default(fallback);

const envSize = (what: string, fallback: string) =>
  z
    .string()
    .default(fallback)
    .transform((value, ctx) => {
      try {
        return parseSize(value, what);
      } catch (err) {
        ctx.addIssue({ code: 'custom', message: (err as Error).message });
        return z.NEVER;
      }
    });

const tableName = z.string({ error: 'TABLE_NAME must name the DynamoDB state table' }).min(3).max(255);
const queueUrl = z.url({ error: 'QUEUE_URL must be the grant queue URL' });

// Defaults, each with the reason for its value.
export const ENV_DEFAULTS = Object.freeze({
  // The node whose budget the cycles share: one per deployment (the serverless form is one node).
  NODE_ID: 'serverless',
  // Four disks at the top window level, as the engine's default.
  NODE_BUDGET: '256 MiB',
  // Two clocks of the tick. A grant not completed this long after it was granted is granted again
  // (its writer crashed, or its message went to the DLQ): it covers one chunk's read + write with
  // retries (seconds, minutes when throttled) and the time the grant waited in the queue. And the
  // node reservation a tick takes (with the allowances behind it) lasts this long without a tick
  // renewing it, so a dead cycle's share of the node budget comes back within it.
  LEASE_SECONDS: 300,
  // The plan lock is renewed on every tick; an hour covers a long finalize and a paused state machine,
  // and is how long a crashed cycle blocks the next one of its plan.
  PLAN_LOCK_SECONDS: 3600,
  // Ticks without one completed descriptor before the planner reports `stuck` (with the state
  // machine's 10 s wait between ticks: about 10 minutes).
  STUCK_TICKS: 60,
  // Grants one tick may issue: bounded work per invocation; writers top windows up in between.
  MAX_GRANTS_PER_TICK: 2000,
  // EBS loses a pending snapshot after this long without a write; a day lets a stuck cycle be
  // diagnosed and the finalizer is never that late.
  SNAPSHOT_TIMEOUT_MINUTES: 1440,
  // Grants one writer invocation works on at once: the whole SQS batch (10). Lambda bills the
  // invocation's duration, and a chunk's time is mostly waiting on EBS, so a batch written at once
  // costs about one chunk's duration instead of one per chunk (at 4, ten chunks took three rounds).
  // 10 x 1 MiB chunks is 20 EBS calls in flight and 10 MiB of buffers; larger chunks go fewer at a
  // time (the writer holds at most WRITER_BUFFER_BYTES, 256 MiB, of chunks at once).
  WRITER_CONCURRENCY: 10,
  // Stop this long before the Lambda deadline and hand unfinished work back.
  DEADLINE_MARGIN_MS: 10_000,
});

const common = {
  TABLE_NAME: tableName,
  DEADLINE_MARGIN_MS: envInt('DEADLINE_MARGIN_MS', 0, 600_000, ENV_DEFAULTS.DEADLINE_MARGIN_MS),
};
// The node whose budget a cycle reserves from (the tick) and gives back (the finalizer).
const nodeId = { NODE_ID: z.string().min(1).max(128).default(ENV_DEFAULTS.NODE_ID) };
const planLock = {
  PLAN_LOCK_SECONDS: envInt('PLAN_LOCK_SECONDS', 60, 86_400, ENV_DEFAULTS.PLAN_LOCK_SECONDS),
};

export const plannerEnvSchema = z.object({
  ...common,
  ...nodeId,
  ...planLock,
  NODE_BUDGET: envSize('NODE_BUDGET', ENV_DEFAULTS.NODE_BUDGET),
  QUEUE_URL: queueUrl,
  LEASE_SECONDS: envInt('LEASE_SECONDS', 10, 43_200, ENV_DEFAULTS.LEASE_SECONDS),
  STUCK_TICKS: envInt('STUCK_TICKS', 1, 100_000, ENV_DEFAULTS.STUCK_TICKS),
  MAX_GRANTS_PER_TICK: envInt('MAX_GRANTS_PER_TICK', 1, 100_000, ENV_DEFAULTS.MAX_GRANTS_PER_TICK),
  SNAPSHOT_TIMEOUT_MINUTES: envInt(
    'SNAPSHOT_TIMEOUT_MINUTES',
    10,
    4320,
    ENV_DEFAULTS.SNAPSHOT_TIMEOUT_MINUTES,
  ),
  /** Customer-managed key for the target snapshots; absent: the account's EBS default. */
  KMS_KEY_ARN: z.string().startsWith('arn:').optional(),
  // The deployment's tag on every target snapshot: IAM allows StartSnapshot only with it in the
  // request (aws:RequestTag) and every later EBS call only on snapshots carrying it.
  SNAPSHOT_TAG_KEY: z
    .string({ error: 'SNAPSHOT_TAG_KEY must name the tag every target snapshot carries' })
    .min(1)
    .max(127)
    .refine((key) => !key.toLowerCase().startsWith('aws:'), {
      error: 'SNAPSHOT_TAG_KEY: the aws: prefix is reserved',
    }),
  SNAPSHOT_TAG_VALUE: z
    .string({ error: 'SNAPSHOT_TAG_VALUE must be the value of the deployment tag (the stack name)' })
    .min(1)
    .max(255),
});
// The writer tops its disk's window up within the allowance the tick wrote on the flow: it needs no
// node budget or lease of its own.
export const chunkWriterEnvSchema = z.object({
  ...common,
  QUEUE_URL: queueUrl,
  WRITER_CONCURRENCY: envInt('WRITER_CONCURRENCY', 1, 10, ENV_DEFAULTS.WRITER_CONCURRENCY),
});
export const differEnvSchema = z.object({ ...common });
export const finalizerEnvSchema = z.object({
  ...common,
  // The finalizer gives the cycle's node reservation back when the cycle ends.
  ...nodeId,
  ...planLock,
  /** The EventBridge bus "Ferry Checkpoint Published" goes to. */
  EVENT_BUS_NAME: z.string({ error: 'EVENT_BUS_NAME must name the EventBridge bus' }).min(1).max(256),
});

export type PlannerEnv = z.infer<typeof plannerEnvSchema>;
export type ChunkWriterEnv = z.infer<typeof chunkWriterEnvSchema>;
export type DifferEnv = z.infer<typeof differEnvSchema>;
export type FinalizerEnv = z.infer<typeof finalizerEnvSchema>;

/** Per function, the environment schema its handler validates: the CDK stack types env from these. */
export const functionEnvironments = {
  planner: plannerEnvSchema,
  'chunk-writer': chunkWriterEnvSchema,
  differ: differEnvSchema,
  finalizer: finalizerEnvSchema,
} as const;
export type FunctionName = keyof typeof functionEnvironments;
/** What the stack must set for a function (the schema's input: defaults may be left out). */
export type FunctionEnvironment<F extends FunctionName> = z.input<(typeof functionEnvironments)[F]>;

// ---- parsing at the boundary ---------------------------------------------------------------------

function fieldPath(path: readonly PropertyKey[]): string {
  return path.map((k, i) => (typeof k === 'number' ? `[${k}]` : `${i ? '.' : ''}${String(k)}`)).join('');
}

/** One line per problem, each naming its field: `cycle.disks[0].sourceSnapshotId: is not an EBS snapshot id`. */
export function describeIssues(error: z.ZodError, max = 3): string {
  const lines = error.issues.slice(0, max).map((issue) => {
    if (issue.code === 'unrecognized_keys') {
      const where = fieldPath(issue.path);
      return `${where ? `${where}: ` : ''}unknown field${issue.keys.length > 1 ? 's' : ''} ${issue.keys.join(', ')}`;
    }
    const where = fieldPath(issue.path);
    return `${where || '(event)'}: ${issue.message}`;
  });
  const more = error.issues.length > max ? ` (and ${error.issues.length - max} more)` : '';
  return lines.join('; ') + more;
}

/** Parses `value` with `schema` or throws an EventValidationError that names `what` and the field. */
export function parseContract<S extends z.ZodType>(schema: S, value: unknown, what: string): z.infer<S> {
  const parsed = schema.safeParse(value);
  if (parsed.success) return parsed.data;
  throw new EventValidationError(`${what} is invalid: ${describeIssues(parsed.error)}`, {
    field: parsed.error.issues[0] ? fieldPath(parsed.error.issues[0].path) : undefined,
  });
}

/** Parses a function's environment (process.env) once per container; names every missing variable. */
export function parseEnvironment<F extends FunctionName>(
  fn: F,
  env: Record<string, string | undefined>,
): z.infer<(typeof functionEnvironments)[F]> {
  const schema = functionEnvironments[fn];
  const parsed = schema.safeParse(env);
  if (parsed.success) return parsed.data as z.infer<(typeof functionEnvironments)[F]>;
  throw new EventValidationError(
    `environment of the ${fn} function is invalid: ${describeIssues(parsed.error, 10)}`,
    {
      field: parsed.error.issues[0] ? fieldPath(parsed.error.issues[0].path) : undefined,
    },
  );
}
