// Names a recovery job gives what it creates: tag keys (teardown and IAM find the job's resources by
// them), the plan's schedule name, image names and the idempotency tokens of launch requests.
import { createHash } from 'node:crypto';
import { ConfigError } from '../errors.ts';

/**
 * Tags on everything a recovery job creates. Teardown finds a job's resources by `job` alone and
 * deletes nothing without it; IAM scopes terminate/deregister/delete to resources carrying it.
 */
export const RECOVERY_TAGS = Object.freeze({
  job: 'ferry:recovery-job',
  mode: 'ferry:recovery-mode',
  plan: 'ferry:plan',
  machine: 'ferry:recovery-machine',
  /** On volumes created one per disk (volumes-only machines): the checkpoint's disk name. */
  disk: 'ferry:recovery-disk',
  /** `true` on everything a drill creates (the isolated, torn-down-at-TTL mode). */
  drill: 'ferry:drill',
});

// EventBridge Scheduler: schedule names are 1-64 of letters, digits, - _ . (the stack's plan names
// are refused otherwise, so a plan's name is its schedule's name, unchanged and unique in the group).
const SCHEDULE_NAME = /^[0-9A-Za-z._-]{1,64}$/;

/** The name of a plan's cycle schedule in the stack's schedule group: the plan's own name. */
export function planScheduleName(plan: string): string {
  if (!SCHEDULE_NAME.test(plan)) {
    throw new ConfigError(
      `plan ${plan} has no schedule name: schedules are named after their plan, 1-64 of letters, digits, - _ .`,
      { setting: 'plan' },
    );
  }
  return plan;
}

const digest = (parts: readonly string[]): string =>
  createHash('sha256').update(JSON.stringify(parts)).digest('hex');

/**
 * The idempotency token of a job's request for one machine (RunInstances, CreateVolume): the same
 * job and machine always send the same token, so a retried launch never launches twice. EC2 takes
 * at most 64 ASCII characters.
 */
export function launchClientToken(jobId: string, machine: string, what: string): string {
  return `ferry-${digest([jobId, machine, what]).slice(0, 48)}`;
}

/**
 * The image a job registers for a machine. Image names are unique per account and region, so a
 * retried RegisterImage (which has no client token) is refused as a duplicate and finds this one.
 * EC2 allows 3-128 of letters, digits and ( ) [ ] space . / - ' @ _.
 */
export function recoveryImageName(jobId: string, machine: string): string {
  const clean = `${jobId}/${machine}`.replace(/[^A-Za-z0-9()[\] ./'@_-]/g, '_');
  const full = `ferry ${clean}`;
  if (full.length <= 128) return full;
  return `ferry ${clean.slice(0, 100)} ${digest([jobId, machine]).slice(0, 16)}`;
}
