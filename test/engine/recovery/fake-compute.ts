// An in-memory RecoveryCompute (EC2 as the recovery uses it) for engine tests: instances, images,
// volumes and snapshots with tags, client tokens honoured, every mutating call counted.
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
} from '../../../shared/engine/recovery/ports.ts';

export const FAKE_TYPES: Record<string, InstanceTypeFacts> = {
  'm5.large': {
    instanceType: 'm5.large',
    architectures: ['x86_64'],
    bootModes: ['legacy-bios', 'uefi'],
    ena: 'required',
    nvme: 'required',
    hypervisor: 'nitro',
  },
  't2.micro': {
    instanceType: 't2.micro',
    architectures: ['i386', 'x86_64'],
    bootModes: ['legacy-bios'],
    ena: 'unsupported',
    nvme: 'unsupported',
    hypervisor: 'xen',
  },
  'm6g.large': {
    instanceType: 'm6g.large',
    architectures: ['arm64'],
    bootModes: ['uefi'],
    ena: 'required',
    nvme: 'required',
    hypervisor: 'nitro',
  },
};

let counter = 0;
const hexId = (prefix: string) => `${prefix}-${(++counter).toString(16).padStart(17, '0')}`;

interface Instance {
  instanceId: string;
  state: string;
  systemStatus: string;
  instanceStatus: string;
  tags: Tags;
  spec: InstanceSpec;
  volumeIds: string[];
}

export class FakeCompute implements RecoveryCompute {
  readonly snapshots = new Map<string, SnapshotFacts & { tags: Tags }>();
  readonly images = new Map<string, { imageId: string; state: string; tags: Tags; spec: ImageSpec }>();
  readonly instances = new Map<string, Instance>();
  readonly volumes = new Map<string, { volumeId: string; state: string; tags: Tags; spec?: VolumeSpec }>();
  readonly subnets = new Map<string, SubnetFacts>();
  readonly groups = new Map<string, SecurityGroupFacts>();
  readonly calls: string[] = [];
  private readonly tokens = new Map<string, string>();

  addSnapshot(sizeGiB: number, tags: Tags = {}, state = 'completed'): string {
    const snapshotId = hexId('snap');
    this.snapshots.set(snapshotId, { snapshotId, state, sizeGiB, tags });
    return snapshotId;
  }
  addSubnet(vpcId = 'vpc-0000000000000000a', availabilityZone = 'us-east-1a'): string {
    const subnetId = hexId('subnet');
    this.subnets.set(subnetId, { subnetId, vpcId, availabilityZone });
    return subnetId;
  }
  addGroup(vpcId = 'vpc-0000000000000000a'): string {
    const groupId = hexId('sg');
    this.groups.set(groupId, { groupId, vpcId });
    return groupId;
  }

  async describeInstanceTypes(types: readonly string[]): Promise<InstanceTypeFacts[]> {
    return types.flatMap((t) => (FAKE_TYPES[t] ? [FAKE_TYPES[t]] : []));
  }
  async describeSnapshots(ids: readonly string[]): Promise<SnapshotFacts[]> {
    return ids.flatMap((id) => {
      const s = this.snapshots.get(id);
      return s ? [{ snapshotId: s.snapshotId, state: s.state, sizeGiB: s.sizeGiB }] : [];
    });
  }
  async describeSubnets(ids: readonly string[]): Promise<SubnetFacts[]> {
    return ids.flatMap((id) => (this.subnets.has(id) ? [this.subnets.get(id)!] : []));
  }
  async describeSecurityGroups(ids: readonly string[]): Promise<SecurityGroupFacts[]> {
    return ids.flatMap((id) => (this.groups.has(id) ? [this.groups.get(id)!] : []));
  }
  async registerImage(spec: ImageSpec): Promise<string> {
    this.calls.push('registerImage');
    const same = [...this.images.values()].find((i) => i.spec.name === spec.name);
    if (same) return same.imageId;
    const imageId = hexId('ami');
    this.images.set(imageId, { imageId, state: 'available', tags: spec.tags, spec });
    return imageId;
  }
  async runInstance(spec: InstanceSpec): Promise<string> {
    this.calls.push('runInstance');
    const known = this.tokens.get(spec.clientToken);
    if (known) return known;
    const instanceId = hexId('i');
    const volumeIds = spec.devices.map(() => {
      const volumeId = hexId('vol');
      this.volumes.set(volumeId, { volumeId, state: 'in-use', tags: spec.tags });
      return volumeId;
    });
    this.instances.set(instanceId, {
      instanceId,
      state: 'pending',
      systemStatus: 'initializing',
      instanceStatus: 'initializing',
      tags: spec.tags,
      spec,
      volumeIds,
    });
    this.tokens.set(spec.clientToken, instanceId);
    return instanceId;
  }
  async createVolume(spec: VolumeSpec): Promise<string> {
    this.calls.push('createVolume');
    const known = this.tokens.get(spec.clientToken);
    if (known) return known;
    const volumeId = hexId('vol');
    this.volumes.set(volumeId, { volumeId, state: 'available', tags: spec.tags, spec });
    this.tokens.set(spec.clientToken, volumeId);
    return volumeId;
  }
  async listTagged(key: string, value: string): Promise<TaggedResources> {
    const has = (t: Tags) => t[key] === value;
    return {
      instances: [...this.instances.values()]
        .filter((i) => has(i.tags))
        .map(({ instanceId, state, tags }) => ({ instanceId, state, tags })),
      volumes: [...this.volumes.values()]
        .filter((v) => has(v.tags))
        .map(({ volumeId, state, tags }) => ({ volumeId, state, tags })),
      images: [...this.images.values()]
        .filter((i) => has(i.tags))
        .map(({ imageId, state, tags }) => ({ imageId, state, tags })),
      snapshots: [...this.snapshots.values()]
        .filter((s) => has(s.tags))
        .map(({ snapshotId, state, tags }) => ({ snapshotId, state, tags })),
    };
  }
  async describeInstances(ids: readonly string[]): Promise<InstanceObservation[]> {
    return ids.flatMap((id) => {
      const i = this.instances.get(id);
      return i
        ? [
            {
              instanceId: id,
              state: i.state,
              systemStatus: i.systemStatus,
              instanceStatus: i.instanceStatus,
              volumes: i.spec.devices.map((d, n) => ({
                deviceName: d.deviceName,
                volumeId: i.volumeIds[n]!,
              })),
            },
          ]
        : [];
    });
  }
  /** What each instance's serial console shows (set by a test), as consoleOutput answers it. */
  readonly consoles = new Map<string, string>();
  async consoleOutput(instanceId: string): Promise<string | undefined> {
    return this.instances.has(instanceId) ? this.consoles.get(instanceId) : undefined;
  }
  async describeVolumes(ids: readonly string[]): Promise<VolumeObservation[]> {
    return ids.flatMap((id) => {
      const v = this.volumes.get(id);
      return v ? [{ volumeId: id, state: v.state }] : [];
    });
  }
  async terminateInstances(ids: readonly string[]): Promise<void> {
    this.calls.push('terminateInstances');
    for (const id of ids) {
      const i = this.instances.get(id);
      if (!i) continue;
      i.state = 'terminated';
      // Volumes that go with the instance are deleted; the others are detached and stay.
      i.spec.devices.forEach((d, n) => {
        const v = this.volumes.get(i.volumeIds[n]!);
        if (v) v.state = d.deleteOnTermination ? 'deleted' : 'available';
      });
    }
  }
  async deregisterImage(imageId: string): Promise<void> {
    this.calls.push('deregisterImage');
    this.images.delete(imageId);
  }
  async deleteVolume(volumeId: string): Promise<void> {
    this.calls.push('deleteVolume');
    this.volumes.delete(volumeId);
  }
  async deleteSnapshot(snapshotId: string): Promise<void> {
    this.calls.push('deleteSnapshot');
    this.snapshots.delete(snapshotId);
  }
  /** Makes every instance running with both status checks `status`. */
  boot(status = 'ok'): void {
    for (const i of this.instances.values()) {
      if (i.state !== 'pending' && i.state !== 'running') continue;
      i.state = 'running';
      i.systemStatus = 'ok';
      i.instanceStatus = status;
    }
  }
}
