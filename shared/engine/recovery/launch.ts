// launch: one resolved machine into the cloud. An instance is an image registered from its boot
// disk's snapshot (data disks as further mappings) and one RunInstances; a volumes-only machine is
// one CreateVolume per disk. Everything is tagged with the job; a retried launch finds what an
// earlier attempt created (by tag, then by client token or image name) and never launches twice.
import type { Clock } from '../ports.ts';
import { launchClientToken, RECOVERY_TAGS, recoveryImageName } from './names.ts';
import type { ImageSpec, InstanceSpec, RecoveryCompute, Tags, VolumeSpec } from './ports.ts';
import type { LaunchMode, LaunchResult, ResolvedMachine } from './types.ts';

export interface LaunchContext {
  readonly jobId: string;
  readonly mode: LaunchMode;
  readonly plan?: string | undefined;
  /** Customer-managed key for every volume launched; absent: the account's EBS default key. */
  readonly kmsKeyArn?: string | undefined;
}

/** The tags of everything a job creates for one machine: the job's own over the machine's. */
export function recoveryTags(ctx: LaunchContext, machine: ResolvedMachine): Tags {
  return {
    Name: `${machine.name} (ferry ${ctx.mode})`,
    ...(machine.tags ?? {}),
    [RECOVERY_TAGS.job]: ctx.jobId,
    [RECOVERY_TAGS.mode]: ctx.mode,
    [RECOVERY_TAGS.machine]: machine.name,
    ...(ctx.plan === undefined ? {} : { [RECOVERY_TAGS.plan]: ctx.plan }),
    ...(ctx.mode === 'drill' ? { [RECOVERY_TAGS.drill]: 'true' } : {}),
  };
}

export interface InstanceLaunchPlan {
  readonly image: ImageSpec;
  /** Without the image id, which the registration answers. */
  readonly instance: Omit<InstanceSpec, 'imageId'>;
}

/**
 * What to ask EC2 for an instance machine. Drill volumes go with their instance (delete on
 * termination); a failover's stay when its instance is terminated, as production data should.
 */
export function planInstanceLaunch(ctx: LaunchContext, machine: ResolvedMachine): InstanceLaunchPlan {
  if (machine.kind !== 'instance' || machine.instanceType === undefined || machine.subnetId === undefined) {
    throw new Error(`machine ${machine.name} is not a resolved instance (resolve checks this first)`);
  }
  const tags = recoveryTags(ctx, machine);
  const deleteOnTermination = ctx.mode === 'drill';
  const root = machine.disks.find((d) => d.disk === machine.bootDisk) ?? machine.disks[0]!;
  const devices = machine.disks.map((d) => ({
    deviceName: d.deviceName,
    snapshotId: d.snapshotId,
    sizeGiB: d.sizeGiB,
    deleteOnTermination,
  }));
  return {
    image: {
      name: recoveryImageName(ctx.jobId, machine.name),
      description: `Ferry ${ctx.mode} ${ctx.jobId}: machine ${machine.name}`.slice(0, 255),
      architecture: machine.architecture,
      bootMode: machine.bootMode ?? (machine.architecture === 'arm64' ? 'uefi' : 'legacy-bios'),
      ena: machine.ena,
      rootDeviceName: root.deviceName,
      devices,
      tags,
    },
    instance: {
      instanceType: machine.instanceType,
      subnetId: machine.subnetId,
      securityGroupIds: machine.securityGroupIds,
      clientToken: launchClientToken(ctx.jobId, machine.name, 'instance'),
      devices: devices.map(({ deviceName, sizeGiB }) => ({ deviceName, sizeGiB, deleteOnTermination })),
      kmsKeyArn: ctx.kmsKeyArn,
      tags,
    },
  };
}

/** What to ask EC2 for a volumes-only machine: one encrypted volume per disk, in its zone. */
export function planVolumeLaunch(ctx: LaunchContext, machine: ResolvedMachine): VolumeSpec[] {
  if (machine.availabilityZone === undefined) {
    throw new Error(`machine ${machine.name} has no availability zone (resolve sets it)`);
  }
  const tags = recoveryTags(ctx, machine);
  return machine.disks.map((d) => ({
    snapshotId: d.snapshotId,
    sizeGiB: d.sizeGiB,
    availabilityZone: machine.availabilityZone!,
    clientToken: launchClientToken(ctx.jobId, machine.name, `volume:${d.disk}`),
    kmsKeyArn: ctx.kmsKeyArn,
    tags: { ...tags, [RECOVERY_TAGS.disk]: d.disk },
  }));
}

export interface LaunchDeps {
  readonly compute: Pick<RecoveryCompute, 'listTagged' | 'registerImage' | 'runInstance' | 'createVolume'>;
  readonly clock: Pick<Clock, 'now'>;
}

// States in which an earlier attempt's resource is still the machine's (not on its way out).
const LIVE_INSTANCE = new Set(['pending', 'running']);
const LIVE_VOLUME = new Set(['creating', 'available', 'in-use']);
const LIVE_IMAGE = new Set(['pending', 'available']);

/**
 * Launches one machine; must be idempotent: a retry after a crash or a timeout answers with what the
 * first attempt created (found by the job's tags, else by its client token or image name).
 */
export async function launchMachine(
  deps: LaunchDeps,
  ctx: LaunchContext,
  machine: ResolvedMachine,
): Promise<LaunchResult> {
  const earlier = await deps.compute.listTagged(RECOVERY_TAGS.job, ctx.jobId);
  const mine = <T extends { tags: Tags }>(items: readonly T[]) =>
    items.filter((r) => r.tags[RECOVERY_TAGS.machine] === machine.name);
  const launchedAt = () => new Date(deps.clock.now()).toISOString();

  if (machine.kind === 'volumes') {
    const have = new Map(
      mine(earlier.volumes)
        .filter((v) => LIVE_VOLUME.has(v.state))
        .map((v) => [v.tags[RECOVERY_TAGS.disk], v.volumeId]),
    );
    const volumeIds: string[] = [];
    for (const spec of planVolumeLaunch(ctx, machine)) {
      const disk = spec.tags[RECOVERY_TAGS.disk]!;
      volumeIds.push(have.get(disk) ?? (await deps.compute.createVolume(spec)));
    }
    return { name: machine.name, kind: 'volumes', volumeIds, launchedAt: launchedAt() };
  }

  const plan = planInstanceLaunch(ctx, machine);
  const image = mine(earlier.images).find((i) => LIVE_IMAGE.has(i.state));
  const imageId = image?.imageId ?? (await deps.compute.registerImage(plan.image));
  const instance = mine(earlier.instances).find((i) => LIVE_INSTANCE.has(i.state));
  const instanceId = instance?.instanceId ?? (await deps.compute.runInstance({ ...plan.instance, imageId }));
  return {
    name: machine.name,
    kind: 'instance',
    instanceId,
    imageId,
    volumeIds: [],
    launchedAt: launchedAt(),
    ...(machine.bootMessage === undefined ? {} : { bootMessage: machine.bootMessage }),
  };
}
