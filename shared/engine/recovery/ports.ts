// The recovery's ports: the compute cloud it launches into (EC2), the plan schedules it pauses
// (EventBridge Scheduler) and where its reports go (the catalog table). Adapters translate their
// SDK's errors into CloudRequestError (retryable or not).
import type { Architecture, BootMode, PauseResult, RecoveryMode, RecoveryReport } from './types.ts';

export type Tags = Readonly<Record<string, string>>;

/** What EC2 says about an instance type (DescribeInstanceTypes). */
export interface InstanceTypeFacts {
  readonly instanceType: string;
  readonly architectures: readonly string[];
  /** Boot modes the type supports; empty when the cloud does not say. */
  readonly bootModes: readonly string[];
  /** `required` on Nitro types: the guest needs the ENA driver. */
  readonly ena: 'required' | 'supported' | 'unsupported' | undefined;
  /** `required` on Nitro types: EBS volumes appear as NVMe devices. */
  readonly nvme: 'required' | 'supported' | 'unsupported' | undefined;
  readonly hypervisor: string | undefined;
}

export interface SnapshotFacts {
  readonly snapshotId: string;
  /** pending, completed, error, recoverable, recovering */
  readonly state: string;
  readonly sizeGiB: number;
}

export interface SubnetFacts {
  readonly subnetId: string;
  readonly vpcId: string;
  readonly availabilityZone: string;
}

export interface SecurityGroupFacts {
  readonly groupId: string;
  readonly vpcId: string;
}

/** RegisterImage from snapshots: the boot disk as root device, data disks as further mappings. */
export interface ImageSpec {
  readonly name: string;
  readonly description: string;
  readonly architecture: Architecture;
  readonly bootMode: BootMode;
  readonly ena: boolean;
  readonly rootDeviceName: string;
  readonly devices: readonly {
    readonly deviceName: string;
    readonly snapshotId: string;
    readonly sizeGiB: number;
    readonly deleteOnTermination: boolean;
  }[];
  /** Tags on the image only: never on the snapshots (they are the checkpoint's, not the job's). */
  readonly tags: Tags;
}

export interface InstanceSpec {
  readonly imageId: string;
  readonly instanceType: string;
  readonly subnetId: string;
  readonly securityGroupIds?: readonly string[] | undefined;
  /** Idempotency token: the same job and machine always send the same one. */
  readonly clientToken: string;
  /** Every device of the image, launched encrypted (with this key, else the account's default). */
  readonly devices: readonly {
    readonly deviceName: string;
    readonly sizeGiB: number;
    readonly deleteOnTermination: boolean;
  }[];
  readonly kmsKeyArn?: string | undefined;
  /** Tags on the instance and on the volumes it creates. */
  readonly tags: Tags;
}

export interface VolumeSpec {
  readonly snapshotId: string;
  readonly sizeGiB: number;
  readonly availabilityZone: string;
  readonly clientToken: string;
  readonly kmsKeyArn?: string | undefined;
  readonly tags: Tags;
}

export interface TaggedInstance {
  readonly instanceId: string;
  /** pending, running, shutting-down, terminated, stopping, stopped */
  readonly state: string;
  readonly tags: Tags;
}
export interface TaggedVolume {
  readonly volumeId: string;
  /** creating, available, in-use, deleting, deleted, error */
  readonly state: string;
  readonly tags: Tags;
}
export interface TaggedImage {
  readonly imageId: string;
  readonly state: string;
  readonly tags: Tags;
}
export interface TaggedSnapshot {
  readonly snapshotId: string;
  readonly state: string;
  readonly tags: Tags;
}

/** Everything in the account and region that carries a tag with a value. */
export interface TaggedResources {
  readonly instances: readonly TaggedInstance[];
  readonly volumes: readonly TaggedVolume[];
  readonly images: readonly TaggedImage[];
  readonly snapshots: readonly TaggedSnapshot[];
}

export interface InstanceObservation {
  readonly instanceId: string;
  readonly state: string;
  /** ok, impaired, initializing, insufficient-data, not-applicable; `unknown` when EC2 has none yet. */
  readonly systemStatus: string;
  readonly instanceStatus: string;
  /** EC2's reason for a state change (`Server.InternalError: ...`), for the report. */
  readonly stateReason?: string | undefined;
  /** The EBS volumes attached, by device name as the launch named them (`/dev/xvda`, `/dev/sdf`). */
  readonly volumes?: readonly { readonly deviceName: string; readonly volumeId: string }[] | undefined;
}

export interface VolumeObservation {
  readonly volumeId: string;
  readonly state: string;
}

/**
 * EC2 as the recovery uses it. Reads page through every result. Contracts:
 * - registerImage, runInstance and createVolume must be idempotent for the same spec (image name,
 *   client token): a retry answers with what the first call created.
 * - terminate/deregister/delete must treat "already gone" as done.
 * - nothing here waits: the state machine polls health and teardown.
 */
export interface RecoveryCompute {
  describeInstanceTypes(types: readonly string[]): Promise<InstanceTypeFacts[]>;
  /** Snapshots among `ids` that exist; an id EC2 does not know is absent from the answer. */
  describeSnapshots(ids: readonly string[]): Promise<SnapshotFacts[]>;
  /** Subnets among `ids` that exist. */
  describeSubnets(ids: readonly string[]): Promise<SubnetFacts[]>;
  describeSecurityGroups(ids: readonly string[]): Promise<SecurityGroupFacts[]>;
  registerImage(spec: ImageSpec): Promise<string>;
  runInstance(spec: InstanceSpec): Promise<string>;
  createVolume(spec: VolumeSpec): Promise<string>;
  listTagged(key: string, value: string): Promise<TaggedResources>;
  describeInstances(ids: readonly string[]): Promise<InstanceObservation[]>;
  describeVolumes(ids: readonly string[]): Promise<VolumeObservation[]>;
  /**
   * The instance's serial console output as text (the latest EC2 has), or undefined when it has none
   * yet; an instance EC2 does not know answers undefined too.
   */
  consoleOutput(instanceId: string): Promise<string | undefined>;
  terminateInstances(ids: readonly string[]): Promise<void>;
  deregisterImage(imageId: string): Promise<void>;
  deleteVolume(volumeId: string): Promise<void>;
  deleteSnapshot(snapshotId: string): Promise<void>;
}

/** A plan's cycle schedule. pause must be idempotent (a paused schedule stays paused). */
export interface PlanSchedules {
  pause(plan: string): Promise<PauseResult>;
}

/** Where a recovery's report goes; `put` replaces the job's report (a retried record is harmless). */
export interface RecoveryRecords {
  put(report: RecoveryReport): Promise<void>;
  /** Marks the plan as failed over to the report's checkpoint (failover, migration). */
  markFailedOver(report: RecoveryReport): Promise<void>;
  /**
   * Removes the plan's failover mark if it is still job `failoverJobId`'s (a failback's cutover):
   * a mark a later failover wrote stays.
   */
  clearFailedOver(plan: string, failoverJobId: string): Promise<void>;
}

/** A plan's failover mark: which job failed it over, to which checkpoint. */
export interface FailoverMark {
  readonly plan: string;
  readonly jobId: string;
  readonly mode: RecoveryMode | string;
  readonly checkpointId?: string | undefined;
  readonly at: string;
}

/** What a failback reads of earlier jobs. */
export interface FailoverRecords {
  failedOver(plan: string): Promise<FailoverMark | undefined>;
  get(jobId: string): Promise<RecoveryReport | undefined>;
}
