// teardown: removes everything a recovery job created, found by its tag alone, and counts what is
// left. Idempotent (run it again after an interruption); the state machine repeats teardown and
// verify until nothing remains. It never touches a resource without the job's tag: the checkpoint's
// snapshots are registered into the job's images but are not the job's, and must survive it.
import { RECOVERY_TAGS } from './names.ts';
import type { RecoveryCompute, TaggedResources } from './ports.ts';
import type { Remaining, TeardownResult, VerifyTeardownResult } from './types.ts';

export interface TeardownDeps {
  readonly compute: Pick<
    RecoveryCompute,
    'listTagged' | 'terminateInstances' | 'deregisterImage' | 'deleteVolume' | 'deleteSnapshot'
  >;
}

// A volume in one of these cannot be deleted yet (its instance is still shutting down, or it is
// being created): a later teardown deletes it.
const VOLUME_WAIT = new Set(['in-use', 'creating']);
const VOLUME_GONE = new Set(['deleting', 'deleted']);

/** What is left of a job (pure): instances not terminated, volumes not deleted, images, snapshots. */
export function remainingOf(found: TaggedResources): Remaining {
  return {
    instances: found.instances.filter((i) => i.state !== 'terminated').length,
    volumes: found.volumes.filter((v) => v.state !== 'deleted').length,
    images: found.images.filter((i) => i.state !== 'deregistered').length,
    snapshots: found.snapshots.length,
  };
}

/**
 * What teardown will do with what it found (pure): every resource must carry the job's tag with
 * exactly this job's id, whatever the lister's filter did.
 */
export function teardownPlan(jobId: string, found: TaggedResources) {
  const ours = <T extends { tags: Readonly<Record<string, string>> }>(items: readonly T[]) =>
    items.filter((r) => r.tags[RECOVERY_TAGS.job] === jobId);
  const volumes = ours(found.volumes).filter((v) => !VOLUME_GONE.has(v.state));
  return {
    terminate: ours(found.instances)
      .filter((i) => i.state !== 'terminated' && i.state !== 'shutting-down')
      .map((i) => i.instanceId),
    deregister: ours(found.images)
      .filter((i) => i.state !== 'deregistered')
      .map((i) => i.imageId),
    deleteVolumes: volumes.filter((v) => !VOLUME_WAIT.has(v.state)).map((v) => v.volumeId),
    waiting: volumes.filter((v) => VOLUME_WAIT.has(v.state)).map((v) => v.volumeId),
    deleteSnapshots: ours(found.snapshots).map((s) => s.snapshotId),
  };
}

/**
 * Terminates the job's instances, deregisters its images (never with their snapshots), deletes its
 * detached volumes and any snapshot it made itself. Volumes still attached to a terminating
 * instance are reported `waiting`. `previous` is what earlier rounds of the same teardown did: the
 * answer counts every round (a later round finds only what the first left, so its own lists alone
 * would under-report what the teardown removed).
 */
export async function teardownJob(
  deps: TeardownDeps,
  jobId: string,
  previous?: TeardownResult,
): Promise<TeardownResult> {
  const plan = teardownPlan(jobId, await deps.compute.listTagged(RECOVERY_TAGS.job, jobId));
  if (plan.terminate.length > 0) await deps.compute.terminateInstances(plan.terminate);
  for (const id of plan.deregister) await deps.compute.deregisterImage(id);
  for (const id of plan.deleteVolumes) await deps.compute.deleteVolume(id);
  for (const id of plan.deleteSnapshots) await deps.compute.deleteSnapshot(id);
  const both = (before: readonly string[] | undefined, now: readonly string[]) => [
    ...new Set([...(before ?? []), ...now]),
  ];
  return {
    terminated: both(previous?.terminated, plan.terminate),
    deregistered: both(previous?.deregistered, plan.deregister),
    deletedVolumes: both(previous?.deletedVolumes, plan.deleteVolumes),
    deletedSnapshots: both(previous?.deletedSnapshots, plan.deleteSnapshots),
    // Only this round's: what is still waiting now.
    waiting: plan.waiting,
  };
}

/** Counts by tag what the job left; clean when nothing is. */
export async function verifyTeardown(
  deps: { readonly compute: Pick<RecoveryCompute, 'listTagged'> },
  jobId: string,
): Promise<VerifyTeardownResult> {
  const remaining = remainingOf(await deps.compute.listTagged(RECOVERY_TAGS.job, jobId));
  const clean = Object.values(remaining).every((n) => n === 0);
  return { clean, remaining };
}
