// Retention: which published checkpoints stay recoverable (their history kept), and how an
// operator's retention setting is read and checked.
import { z } from 'zod';
import { ConfigError } from './errors.ts';

/**
 * How many checkpoints of a set stay recoverable, and for how long. Both limits apply when both are
 * given (a checkpoint stays while it is within both), so the setting bounds the history's disk use.
 */
export interface RetentionPolicy {
  /** The newest `count` checkpoints are kept (the latest counts as one). */
  readonly count: number;
  /** Checkpoints created more than this many days ago are not kept; absent: no age limit. */
  readonly maxAgeDays?: number | undefined;
}

// 24: a day of hourly checkpoints (the usual RPO schedule), so an operator who finds in the morning
// that the night's checkpoints hold encrypted or deleted data can still step back past them; each
// kept checkpoint costs about the bytes its next cycle changed, not a copy of the disk.
export const DEFAULT_RETAIN_COUNT = 24;

/** The setting as written in a job file: `"retain": { "count": 24, "maxAgeDays": 7 }`. */
export const retentionSchema = z.strictObject({
  count: z
    .number({ error: 'must be a whole number of checkpoints, at least 1' })
    .int({ error: 'must be a whole number of checkpoints, at least 1' })
    .min(1, { error: 'must be at least 1 (the latest checkpoint is always kept)' })
    .optional(),
  maxAgeDays: z
    .number({ error: 'must be a number of days above 0' })
    .positive({ error: 'must be a number of days above 0' })
    .optional(),
});

export type RetentionSetting = z.infer<typeof retentionSchema>;

/** The policy for a setting: the default count unless one is given. */
export function resolveRetention(setting: RetentionSetting = {}): RetentionPolicy {
  return { count: setting.count ?? DEFAULT_RETAIN_COUNT, maxAgeDays: setting.maxAgeDays };
}

/** `--retain N` as typed on the command line: a whole number of checkpoints, at least 1. */
export function parseRetainCount(value: string, flag = '--retain'): number {
  const n = /^\s*\d+\s*$/.test(value) ? Number(value) : Number.NaN;
  if (!Number.isSafeInteger(n) || n < 1) {
    throw new ConfigError(
      `${flag} ${JSON.stringify(value)}: give the number of checkpoints to keep recoverable, a whole number of at least 1`,
      { setting: 'retain' },
    );
  }
  return n;
}

const DAY_MS = 86_400_000;

/**
 * The sequence of the oldest checkpoint the policy keeps, or undefined when there is none.
 * Kept checkpoints are always the newest ones without a gap: walking back from the latest (always
 * kept), the first checkpoint outside a limit ends the walk, so a clock that went backwards can
 * shorten what is kept but never leaves an older checkpoint kept behind a dropped one.
 * `checkpoints` may be in any order; `nowMs` is wall-clock time (createdAt is ISO wall time).
 */
export function oldestKept(
  checkpoints: readonly { readonly sequence: number; readonly createdAt: string }[],
  policy: RetentionPolicy,
  nowMs: number,
): number | undefined {
  const newestFirst = [...checkpoints].sort((a, b) => b.sequence - a.sequence);
  const cutoff = policy.maxAgeDays === undefined ? undefined : nowMs - policy.maxAgeDays * DAY_MS;
  let oldest: number | undefined;
  for (const [i, cp] of newestFirst.entries()) {
    if (i > 0) {
      if (i >= policy.count) break;
      const created = Date.parse(cp.createdAt);
      // An unreadable time is no reason to keep a checkpoint past the others.
      if (cutoff !== undefined && !(created >= cutoff)) break;
    }
    oldest = cp.sequence;
  }
  return oldest;
}
