// prepare-failback: from a plan's failover to the reverse cycle that replicates the recovered machines'
// volumes back. It reads which job failed the plan over and which checkpoint it recovered (the one both
// sides share), finds each disk's recovered volume (an instance's block-device mapping against the
// device name the failover gave the disk, or a volumes-only machine's tagged volume), and builds the
// cycle state machine's input: the reverse set's first cycle starts from the shared checkpoint, so it
// moves only the blocks written since the failover. Everything is checked before the cycle starts.
import type { RecoveryCheckpoint, StateStore } from '../ports.ts';
import { RecoveryRefusedError } from './errors.ts';
import { RECOVERY_TAGS } from './names.ts';
import type { FailoverRecords, RecoveryCompute } from './ports.ts';
import type {
  FailbackCycleInput,
  FailbackDisk,
  PlanRecoveryDefaults,
  PrepareFailbackRequest,
  PrepareFailbackResult,
  RecoveryReport,
} from './types.ts';

const SNAPSHOT_ID = /^snap-[0-9a-f]{8,17}$/;
// The cycle contract's name rule (functions/contracts.ts): what a reverse set's name must satisfy.
const SET_NAME = /^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$/;
/** Instance states whose volumes can no longer be replicated back. */
const GONE = new Set(['shutting-down', 'terminated']);

export interface FailbackDeps {
  readonly records: FailoverRecords;
  readonly catalog: Pick<StateStore, 'listCheckpoints'>;
  readonly compute: Pick<RecoveryCompute, 'describeInstances' | 'listTagged'>;
}

/** The reverse set of a failover job, unless the request names one. */
export const defaultReverseSet = (set: string, failoverJobId: string): string =>
  `${set}-failback-${failoverJobId}`;

function refuse(plan: string, problems: readonly string[], field: string, checkpoint?: string): never {
  throw new RecoveryRefusedError(`failback of plan ${plan} refused: ${problems.join('; ')}`, {
    field,
    checkpoint,
  });
}

/**
 * The reverse cycle of the plan's failover, or a RecoveryRefusedError naming every problem: the plan
 * not failed over, the failover's report or checkpoint gone, a machine terminated, a disk whose volume
 * cannot be found, a shared checkpoint whose original side is not an EBS snapshot.
 */
export async function prepareFailback(
  deps: FailbackDeps,
  request: PrepareFailbackRequest,
  defaults: PlanRecoveryDefaults | undefined,
): Promise<PrepareFailbackResult> {
  const { plan } = request;
  const set = defaults?.set ?? plan;
  const mark = await deps.records.failedOver(plan);
  if (mark === undefined) {
    refuse(
      plan,
      [
        'it is not failed over (no failover or migration of it is recorded in the catalog): nothing to fail back',
      ],
      'plan',
    );
  }
  const job = await deps.records.get(mark.jobId);
  if (job === undefined || (job.mode !== 'failover' && job.mode !== 'migration')) {
    refuse(
      plan,
      [
        job === undefined
          ? `it is marked failed over by job ${mark.jobId}, whose report is not in the catalog`
          : `it is marked failed over by job ${mark.jobId}, a ${job.mode}, not a failover or migration`,
      ],
      'plan',
    );
  }
  const checkpointId = mark.checkpointId ?? job.checkpoint?.id;
  const checkpoint = (await deps.catalog.listCheckpoints(set)).find((c) => c.id === checkpointId);
  if (checkpoint === undefined) {
    refuse(
      plan,
      [
        `checkpoint ${checkpointId ?? '(none recorded)'}, which failover ${job.jobId} recovered, is not in set ${set}'s catalog: a failback starts from it`,
      ],
      'plan',
      checkpointId,
    );
  }

  const problems: string[] = [];
  const disks = await recoveredVolumes(deps, job, checkpoint, problems);
  if (disks.length === 0 && problems.length === 0) {
    problems.push(`job ${job.jobId} recovered no disk of checkpoint ${checkpoint.id}`);
  }
  const reverseSet = request.reverseSet ?? defaultReverseSet(set, job.jobId);
  if (!SET_NAME.test(reverseSet)) {
    refuse(
      plan,
      [
        `reverse set ${JSON.stringify(reverseSet)} is not a set name (1-128 of letters, digits and . _ : / -): give "reverseSet"`,
      ],
      'reverseSet',
    );
  }
  if (problems.length > 0) refuse(plan, problems, 'plan', checkpoint.id);

  const fromBase = (await deps.catalog.listCheckpoints(reverseSet)).length === 0;
  const cycleInput: FailbackCycleInput = {
    plan: reverseSet,
    set: reverseSet,
    disks: disks.map((d) => ({ disk: d.disk, volumeId: d.volumeId })),
    ...(fromBase
      ? {
          base: {
            checkpointId: checkpoint.id,
            disks: disks.map((d) => ({
              disk: d.disk,
              previousSourceSnapshotId: d.previousSourceSnapshotId,
              parentTargetSnapshotId: d.parentTargetSnapshotId,
            })),
          },
        }
      : {}),
  };
  return {
    part: {
      failoverJobId: job.jobId,
      sharedCheckpointId: checkpoint.id,
      reverseSet,
      fromBase,
      disks,
      cutover: request.cutover,
      ...(request.sourceQuiesced === undefined ? {} : { sourceQuiesced: request.sourceQuiesced }),
    },
    cycleInput,
    ...(request.cutover
      ? {
          cutoverResolve: {
            action: 'resolve',
            jobId: request.jobId,
            mode: 'failback',
            plan,
            set: reverseSet,
            ...(request.machines === undefined ? {} : { machines: request.machines }),
          },
        }
      : {}),
  };
}

/** Each recovered disk's volume and the shared checkpoint's snapshots of it; problems are collected. */
async function recoveredVolumes(
  deps: FailbackDeps,
  job: RecoveryReport,
  checkpoint: RecoveryCheckpoint,
  problems: string[],
): Promise<FailbackDisk[]> {
  const instanceIds = job.machines.flatMap((m) => (m.instanceId === undefined ? [] : [m.instanceId]));
  const instances = new Map(
    (await deps.compute.describeInstances(instanceIds)).map((i) => [i.instanceId, i] as const),
  );
  const needsTags = job.machines.some((m) => m.instanceId === undefined);
  const tagged = needsTags ? (await deps.compute.listTagged(RECOVERY_TAGS.job, job.jobId)).volumes : [];

  const out: FailbackDisk[] = [];
  for (const m of job.machines) {
    if (m.kind === 'instance' && m.instanceId === undefined) {
      problems.push(
        `machine ${m.name}: job ${job.jobId} did not launch it: it has no volumes to replicate back`,
      );
      continue;
    }
    if (m.disks === undefined) {
      problems.push(
        `machine ${m.name}: job ${job.jobId}'s report does not say which disk became which device (it was recorded by an older version): start the reverse cycle by hand (infra/README.md, Failback)`,
      );
      continue;
    }
    const volumeOf = (disk: string, deviceName: string): string | undefined => {
      if (m.instanceId === undefined) {
        return tagged.find(
          (v) =>
            v.tags[RECOVERY_TAGS.machine] === m.name &&
            v.tags[RECOVERY_TAGS.disk] === disk &&
            v.state !== 'deleting' &&
            v.state !== 'deleted',
        )?.volumeId;
      }
      return instances.get(m.instanceId)?.volumes?.find((v) => v.deviceName === deviceName)?.volumeId;
    };
    if (m.instanceId !== undefined) {
      const instance = instances.get(m.instanceId);
      if (instance === undefined || GONE.has(instance.state)) {
        problems.push(
          `machine ${m.name}: instance ${m.instanceId} is ${instance?.state ?? 'gone'}: its volumes cannot be replicated back`,
        );
        continue;
      }
    }
    for (const d of m.disks) {
      const shared = checkpoint.disks.find((c) => c.disk === d.disk);
      const volumeId = volumeOf(d.disk, d.deviceName);
      if (shared === undefined) {
        problems.push(`machine ${m.name}: disk ${d.disk} is not a disk of checkpoint ${checkpoint.id}`);
      } else if (volumeId === undefined) {
        problems.push(
          m.instanceId === undefined
            ? `machine ${m.name}: no volume of job ${job.jobId} is tagged with disk ${d.disk}`
            : `machine ${m.name}: instance ${m.instanceId} has no volume at ${d.deviceName} (disk ${d.disk}); was it detached?`,
        );
      } else if (!SNAPSHOT_ID.test(shared.source) || !SNAPSHOT_ID.test(shared.target)) {
        problems.push(
          `disk ${d.disk}: checkpoint ${checkpoint.id} was not replicated from an EBS snapshot (${shared.source}): only EBS sources fail back through the cycle`,
        );
      } else {
        out.push({
          disk: d.disk,
          machine: m.name,
          volumeId,
          previousSourceSnapshotId: shared.target,
          parentTargetSnapshotId: shared.source,
        });
      }
    }
  }
  return out;
}
