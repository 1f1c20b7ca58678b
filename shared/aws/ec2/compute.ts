// The recovery's RecoveryCompute port on EC2 (@aws-sdk/client-ec2): snapshot, subnet and instance
// type facts for resolve; RegisterImage, RunInstances and CreateVolume for launch; tag-filtered reads,
// terminate, deregister and delete for teardown. Every list pages with the SDK's paginators; nothing
// here waits (the Recovery state machine polls).
import {
  type _InstanceType,
  CreateTagsCommand,
  CreateVolumeCommand,
  DeleteSnapshotCommand,
  DeleteVolumeCommand,
  DeregisterImageCommand,
  DescribeInstanceStatusCommand,
  DescribeInstanceTypesCommand,
  type EC2Client,
  type Filter,
  GetConsoleOutputCommand,
  paginateDescribeImages,
  paginateDescribeInstances,
  paginateDescribeSecurityGroups,
  paginateDescribeSnapshots,
  paginateDescribeSubnets,
  paginateDescribeVolumes,
  RegisterImageCommand,
  RunInstancesCommand,
  type Tag,
  TerminateInstancesCommand,
} from '@aws-sdk/client-ec2';
import type {
  ImageSpec,
  InstanceObservation,
  InstanceSpec,
  InstanceTypeFacts,
  RecoveryCompute,
  SecurityGroupFacts,
  SnapshotFacts,
  SubnetFacts,
  TaggedResources,
  Tags,
  VolumeObservation,
  VolumeSpec,
} from '../../engine/recovery/ports.ts';
import { ec2Call, ec2Error, ec2ErrorCode, ec2Must } from './errors.ts';

// EC2 accepts up to 200 values per filter; 100 keeps requests small and well inside that.
const FILTER_VALUES = 100;
// gp3: the current general-purpose EBS type (3,000 IOPS and 125 MiB/s baseline at any size, cheaper
// than gp2); a recovered machine that needs more is resized after it runs.
const VOLUME_TYPE = 'gp3';

const chunks = <T>(items: readonly T[], size = FILTER_VALUES): T[][] => {
  const out: T[][] = [];
  for (let i = 0; i < items.length; i += size) out.push(items.slice(i, i + size));
  return out;
};
const tagList = (tags: Tags): Tag[] => Object.entries(tags).map(([Key, Value]) => ({ Key, Value }));
const tagRecord = (tags: readonly Tag[] | undefined): Tags =>
  Object.fromEntries((tags ?? []).flatMap((t) => (t.Key === undefined ? [] : [[t.Key, t.Value ?? '']])));
const machineOf = (tags: Tags) => tags['ferry:recovery-machine'] ?? 'unknown';

async function collect<P, T>(
  pages: AsyncIterable<P>,
  pick: (page: P) => readonly T[] | undefined,
): Promise<T[]> {
  const out: T[] = [];
  for await (const page of pages) out.push(...(pick(page) ?? []));
  return out;
}

export class Ec2RecoveryCompute implements RecoveryCompute {
  /** `client` is the caller's, created once per container. */
  constructor(private readonly client: EC2Client) {}

  private get pager() {
    return { client: this.client };
  }

  async describeInstanceTypes(types: readonly string[]): Promise<InstanceTypeFacts[]> {
    const out: InstanceTypeFacts[] = [];
    // One type per request: EC2 refuses a whole request that names one unknown type.
    for (const type of types) {
      const res = await ec2Call(
        `DescribeInstanceTypes ${type}`,
        () => this.client.send(new DescribeInstanceTypesCommand({ InstanceTypes: [type as _InstanceType] })),
        { gone: ['InvalidInstanceType'] },
      );
      for (const t of res?.InstanceTypes ?? []) {
        out.push({
          instanceType: t.InstanceType ?? type,
          architectures: t.ProcessorInfo?.SupportedArchitectures ?? [],
          bootModes: t.SupportedBootModes ?? [],
          ena: t.NetworkInfo?.EnaSupport,
          nvme: t.EbsInfo?.NvmeSupport,
          hypervisor: t.Hypervisor,
        });
      }
    }
    return out;
  }

  async describeSnapshots(ids: readonly string[]): Promise<SnapshotFacts[]> {
    const out: SnapshotFacts[] = [];
    // A filter (not SnapshotIds) so that an id EC2 does not know is absent instead of an error.
    for (const part of chunks([...new Set(ids)])) {
      const found = await ec2Must('DescribeSnapshots', () =>
        collect(
          paginateDescribeSnapshots(this.pager, { Filters: [{ Name: 'snapshot-id', Values: part }] }),
          (p) => p.Snapshots,
        ),
      );
      for (const s of found) {
        out.push({ snapshotId: s.SnapshotId!, state: s.State ?? 'unknown', sizeGiB: s.VolumeSize ?? 0 });
      }
    }
    return out;
  }

  async describeSubnets(ids: readonly string[]): Promise<SubnetFacts[]> {
    const found = await ec2Must('DescribeSubnets', () =>
      collect(
        paginateDescribeSubnets(this.pager, { Filters: [{ Name: 'subnet-id', Values: [...new Set(ids)] }] }),
        (p) => p.Subnets,
      ),
    );
    return found.map((s) => ({
      subnetId: s.SubnetId!,
      vpcId: s.VpcId!,
      availabilityZone: s.AvailabilityZone!,
    }));
  }

  async describeSecurityGroups(ids: readonly string[]): Promise<SecurityGroupFacts[]> {
    const found = await ec2Must('DescribeSecurityGroups', () =>
      collect(
        paginateDescribeSecurityGroups(this.pager, {
          Filters: [{ Name: 'group-id', Values: [...new Set(ids)] }],
        }),
        (p) => p.SecurityGroups,
      ),
    );
    return found.map((g) => ({ groupId: g.GroupId!, vpcId: g.VpcId! }));
  }

  /**
   * Registers the image, or answers the one an earlier attempt registered under the same name (image
   * names are unique per account and region; RegisterImage has no client token). The tags go on
   * the image only: the snapshots it is registered from belong to the checkpoint.
   */
  async registerImage(spec: ImageSpec): Promise<string> {
    const existing = await this.imageNamed(spec.name);
    if (existing !== undefined) return existing;
    const machine = machineOf(spec.tags);
    let imageId: string | undefined;
    try {
      const res = await this.client.send(
        new RegisterImageCommand({
          Name: spec.name,
          Description: spec.description,
          Architecture: spec.architecture,
          BootMode: spec.bootMode,
          EnaSupport: spec.ena,
          // Snapshot-backed images are HVM (the API's default is paravirtual, which nothing current boots).
          VirtualizationType: 'hvm',
          RootDeviceName: spec.rootDeviceName,
          // No encryption settings here: EC2 refuses them for a mapping from a snapshot. The instance's
          // volumes are encrypted at launch (RunInstances).
          BlockDeviceMappings: spec.devices.map((d) => ({
            DeviceName: d.deviceName,
            Ebs: {
              SnapshotId: d.snapshotId,
              VolumeSize: d.sizeGiB,
              VolumeType: VOLUME_TYPE,
              DeleteOnTermination: d.deleteOnTermination,
            },
          })),
          TagSpecifications: [{ ResourceType: 'image', Tags: tagList(spec.tags) }],
        }),
      );
      imageId = res.ImageId;
    } catch (err) {
      if (ec2ErrorCode(err) === 'InvalidAMIName.Duplicate') {
        const raced = await this.imageNamed(spec.name);
        if (raced !== undefined) return raced;
      }
      throw ec2Error(`RegisterImage for machine ${machine}`, err);
    }
    if (imageId === undefined)
      throw new Error(`EC2 RegisterImage for machine ${machine} answered no image id`);
    // Tags again by CreateTags: AWS applies TagSpecifications atomically, but emulators (moto) ignore
    // them on RegisterImage, and teardown finds the image by these tags alone.
    await ec2Must(`CreateTags on image ${imageId}`, () =>
      this.client.send(new CreateTagsCommand({ Resources: [imageId], Tags: tagList(spec.tags) })),
    );
    return imageId;
  }

  private async imageNamed(name: string): Promise<string | undefined> {
    const found = await ec2Must('DescribeImages', () =>
      collect(
        paginateDescribeImages(this.pager, { Owners: ['self'], Filters: [{ Name: 'name', Values: [name] }] }),
        (p) => p.Images,
      ),
    );
    return found.find((i) => i.State === 'available' || i.State === 'pending')?.ImageId;
  }

  async runInstance(spec: InstanceSpec): Promise<string> {
    const machine = machineOf(spec.tags);
    const res = await ec2Must(`RunInstances for machine ${machine}`, () =>
      this.client.send(
        new RunInstancesCommand({
          ImageId: spec.imageId,
          InstanceType: spec.instanceType as _InstanceType,
          MinCount: 1,
          MaxCount: 1,
          SubnetId: spec.subnetId,
          ...(spec.securityGroupIds === undefined ? {} : { SecurityGroupIds: [...spec.securityGroupIds] }),
          ClientToken: spec.clientToken,
          // Every volume encrypted at launch, with the recovery's key when one is set. The size is
          // the image's (EC2 needs a size or a snapshot to accept the override).
          BlockDeviceMappings: spec.devices.map((d) => ({
            DeviceName: d.deviceName,
            Ebs: {
              VolumeSize: d.sizeGiB,
              VolumeType: VOLUME_TYPE,
              DeleteOnTermination: d.deleteOnTermination,
              Encrypted: true,
              ...(spec.kmsKeyArn === undefined ? {} : { KmsKeyId: spec.kmsKeyArn }),
            },
          })),
          // IMDSv2 only: a recovered machine gets no credential endpoint that a forged request can read.
          MetadataOptions: { HttpTokens: 'required', HttpEndpoint: 'enabled' },
          TagSpecifications: [
            { ResourceType: 'instance', Tags: tagList(spec.tags) },
            { ResourceType: 'volume', Tags: tagList(spec.tags) },
          ],
        }),
      ),
    );
    const id = res.Instances?.[0]?.InstanceId;
    if (id === undefined) throw new Error(`EC2 RunInstances for machine ${machine} answered no instance`);
    return id;
  }

  async createVolume(spec: VolumeSpec): Promise<string> {
    const disk = spec.tags['ferry:recovery-disk'] ?? spec.snapshotId;
    const res = await ec2Must(`CreateVolume for disk ${disk} of machine ${machineOf(spec.tags)}`, () =>
      this.client.send(
        new CreateVolumeCommand({
          AvailabilityZone: spec.availabilityZone,
          SnapshotId: spec.snapshotId,
          Size: spec.sizeGiB,
          VolumeType: VOLUME_TYPE,
          Encrypted: true,
          ...(spec.kmsKeyArn === undefined ? {} : { KmsKeyId: spec.kmsKeyArn }),
          ClientToken: spec.clientToken,
          TagSpecifications: [{ ResourceType: 'volume', Tags: tagList(spec.tags) }],
        }),
      ),
    );
    if (res.VolumeId === undefined)
      throw new Error(`EC2 CreateVolume for disk ${disk} answered no volume id`);
    return res.VolumeId;
  }

  async listTagged(key: string, value: string): Promise<TaggedResources> {
    const Filters: Filter[] = [{ Name: `tag:${key}`, Values: [value] }];
    const [reservations, volumes, images, snapshots] = await Promise.all([
      ec2Must('DescribeInstances', () =>
        collect(paginateDescribeInstances(this.pager, { Filters }), (p) => p.Reservations),
      ),
      ec2Must('DescribeVolumes', () =>
        collect(paginateDescribeVolumes(this.pager, { Filters }), (p) => p.Volumes),
      ),
      ec2Must('DescribeImages', () =>
        collect(paginateDescribeImages(this.pager, { Owners: ['self'], Filters }), (p) => p.Images),
      ),
      ec2Must('DescribeSnapshots', () =>
        collect(paginateDescribeSnapshots(this.pager, { OwnerIds: ['self'], Filters }), (p) => p.Snapshots),
      ),
    ]);
    return {
      instances: reservations
        .flatMap((r) => r.Instances ?? [])
        .map((i) => ({
          instanceId: i.InstanceId!,
          state: i.State?.Name ?? 'unknown',
          tags: tagRecord(i.Tags),
        })),
      volumes: volumes.map((v) => ({
        volumeId: v.VolumeId!,
        state: v.State ?? 'unknown',
        tags: tagRecord(v.Tags),
      })),
      images: images.map((i) => ({
        imageId: i.ImageId!,
        state: i.State ?? 'unknown',
        tags: tagRecord(i.Tags),
      })),
      snapshots: snapshots.map((s) => ({
        snapshotId: s.SnapshotId!,
        state: s.State ?? 'unknown',
        tags: tagRecord(s.Tags),
      })),
    };
  }

  async describeInstances(ids: readonly string[]): Promise<InstanceObservation[]> {
    if (ids.length === 0) return [];
    // A filter, so an instance EC2 does not list yet (eventual consistency) is absent, not an error.
    const reservations = await ec2Must('DescribeInstances', () =>
      collect(
        paginateDescribeInstances(this.pager, { Filters: [{ Name: 'instance-id', Values: [...ids] }] }),
        (p) => p.Reservations,
      ),
    );
    const instances = reservations.flatMap((r) => r.Instances ?? []);
    const found = instances.map((i) => i.InstanceId!);
    const statuses = new Map<string, { system: string; instance: string }>();
    if (found.length > 0) {
      const res = await ec2Call(
        'DescribeInstanceStatus',
        () =>
          this.client.send(
            new DescribeInstanceStatusCommand({ InstanceIds: found, IncludeAllInstances: true }),
          ),
        { gone: ['InvalidInstanceID.NotFound'] },
      );
      for (const s of res?.InstanceStatuses ?? []) {
        statuses.set(s.InstanceId!, {
          system: s.SystemStatus?.Status ?? 'unknown',
          instance: s.InstanceStatus?.Status ?? 'unknown',
        });
      }
    }
    return instances.map((i) => ({
      instanceId: i.InstanceId!,
      state: i.State?.Name ?? 'unknown',
      systemStatus: statuses.get(i.InstanceId!)?.system ?? 'unknown',
      instanceStatus: statuses.get(i.InstanceId!)?.instance ?? 'unknown',
      stateReason: i.StateReason?.Message,
      volumes: (i.BlockDeviceMappings ?? []).flatMap((b) =>
        b.DeviceName !== undefined && b.Ebs?.VolumeId !== undefined
          ? [{ deviceName: b.DeviceName, volumeId: b.Ebs.VolumeId }]
          : [],
      ),
    }));
  }

  async consoleOutput(instanceId: string): Promise<string | undefined> {
    const ask = (latest: boolean) =>
      this.client.send(new GetConsoleOutputCommand({ InstanceId: instanceId, Latest: latest }));
    // The latest output (what the guest printed last) exists on Nitro instances only; others answer
    // UnsupportedOperation and have the buffered output instead.
    const res = await ec2Call(
      'GetConsoleOutput',
      () =>
        ask(true).catch((err: unknown) => {
          if (ec2ErrorCode(err) === 'UnsupportedOperation') return ask(false);
          throw err;
        }),
      { gone: ['InvalidInstanceID.NotFound'] },
    );
    const output = res?.Output;
    return output === undefined || output === '' ? undefined : Buffer.from(output, 'base64').toString('utf8');
  }

  async describeVolumes(ids: readonly string[]): Promise<VolumeObservation[]> {
    const out: VolumeObservation[] = [];
    for (const part of chunks(ids)) {
      const found = await ec2Must('DescribeVolumes', () =>
        collect(
          paginateDescribeVolumes(this.pager, { Filters: [{ Name: 'volume-id', Values: part }] }),
          (p) => p.Volumes,
        ),
      );
      for (const v of found) out.push({ volumeId: v.VolumeId!, state: v.State ?? 'unknown' });
    }
    return out;
  }

  async terminateInstances(ids: readonly string[]): Promise<void> {
    for (const part of chunks(ids)) {
      await ec2Call(
        `TerminateInstances ${part.join(', ')}`,
        () => this.client.send(new TerminateInstancesCommand({ InstanceIds: part })),
        { gone: ['InvalidInstanceID.NotFound'] },
      );
    }
  }

  /** Deregisters the image and nothing else: its snapshots are the checkpoint's. */
  async deregisterImage(imageId: string): Promise<void> {
    await ec2Call(
      `DeregisterImage ${imageId}`,
      () => this.client.send(new DeregisterImageCommand({ ImageId: imageId })),
      { gone: ['InvalidAMIID.NotFound', 'InvalidAMIID.Unavailable'] },
    );
  }

  async deleteVolume(volumeId: string): Promise<void> {
    await ec2Call(
      `DeleteVolume ${volumeId}`,
      () => this.client.send(new DeleteVolumeCommand({ VolumeId: volumeId })),
      { gone: ['InvalidVolume.NotFound'] },
    );
  }

  async deleteSnapshot(snapshotId: string): Promise<void> {
    await ec2Call(
      `DeleteSnapshot ${snapshotId}`,
      () => this.client.send(new DeleteSnapshotCommand({ SnapshotId: snapshotId })),
      { gone: ['InvalidSnapshot.NotFound'] },
    );
  }
}
