// The recovery's data as the engine sees it: machine settings, what resolve decides, what launch,
// health and teardown report. functions/recovery/contracts.ts validates the same shapes with zod
// (a type-level test keeps the two assignable).

export type Architecture = 'x86_64' | 'arm64';
export type BootMode = 'uefi' | 'legacy-bios' | 'uefi-preferred';
export type Platform = 'linux' | 'windows';
export type LaunchMode = 'drill' | 'failover' | 'migration' | 'failback';
export type RecoveryMode = LaunchMode | 'cleanup';
export type MachineKind = 'instance' | 'volumes';

export interface MachineSettings {
  readonly name: string;
  readonly bootDisk?: string | undefined;
  readonly dataDisks?: readonly string[] | undefined;
  readonly instanceType?: string | undefined;
  readonly subnetId?: string | undefined;
  readonly securityGroupIds?: readonly string[] | undefined;
  readonly availabilityZone?: string | undefined;
  readonly architecture?: Architecture | undefined;
  readonly bootMode?: BootMode | undefined;
  readonly ena?: boolean | undefined;
  readonly platform?: Platform | undefined;
  readonly tags?: Readonly<Record<string, string>> | undefined;
}

export interface PlanRecoveryDefaults {
  readonly set?: string | undefined;
  readonly machines: readonly MachineSettings[];
  readonly drillSubnetId?: string | undefined;
  readonly drillSecurityGroupIds?: readonly string[] | undefined;
  readonly ttlMinutes?: number | undefined;
}

/** `latest`, a sequence number, a checkpoint id, or the newest at or before a time. */
export type CheckpointChoiceInput = 'latest' | number | string | { readonly at: string };

export interface ResolveRequest {
  readonly jobId: string;
  readonly mode: LaunchMode;
  readonly plan: string;
  readonly checkpoint?: CheckpointChoiceInput | undefined;
  readonly machines?: readonly MachineSettings[] | undefined;
  readonly ttlMinutes?: number | undefined;
  readonly finalCycle?: { readonly checkpointId: string } | undefined;
}

export interface ResolvedDisk {
  readonly disk: string;
  readonly snapshotId: string;
  readonly sizeGiB: number;
  readonly deviceName: string;
}

export interface ResolvedMachine extends MachineSettings {
  readonly kind: MachineKind;
  readonly disks: readonly ResolvedDisk[];
  readonly architecture: Architecture;
  readonly ena: boolean;
  readonly platform: Platform;
}

export interface CheckpointRef {
  readonly id: string;
  readonly sequence: number;
  readonly publishedAt: string;
}

export interface ResolveResult {
  readonly jobId: string;
  readonly mode: LaunchMode;
  readonly plan: string;
  readonly set: string;
  readonly checkpoint: CheckpointRef;
  readonly machines: readonly ResolvedMachine[];
  readonly unusedDisks: readonly string[];
  readonly ttlSeconds: number;
  readonly startedAt: string;
}

export interface LaunchResult {
  readonly name: string;
  readonly kind: MachineKind;
  readonly instanceId?: string | undefined;
  readonly imageId?: string | undefined;
  readonly volumeIds: readonly string[];
  readonly launchedAt: string;
}

export interface MachineHealth {
  readonly name: string;
  readonly instanceId?: string | undefined;
  readonly state: string;
  readonly systemStatus: string;
  readonly instanceStatus: string;
  readonly healthy: boolean;
  readonly healthyAt?: string | undefined;
  readonly reason?: string | undefined;
}

export interface HealthResult {
  readonly done: boolean;
  readonly healthy: boolean;
  readonly machines: readonly MachineHealth[];
  readonly secondsToRunning?: number | undefined;
}

export interface TeardownResult {
  readonly terminated: readonly string[];
  readonly deregistered: readonly string[];
  readonly deletedVolumes: readonly string[];
  readonly deletedSnapshots: readonly string[];
  readonly waiting: readonly string[];
}

export interface Remaining {
  readonly instances: number;
  readonly volumes: number;
  readonly images: number;
  readonly snapshots: number;
}

export interface VerifyTeardownResult {
  readonly clean: boolean;
  readonly remaining: Remaining;
}

export interface PauseResult {
  readonly schedule: string;
  readonly group: string;
  readonly found: boolean;
  readonly wasEnabled: boolean;
}

export type RecoveryOutcome = 'succeeded' | 'unhealthy' | 'failed' | 'cleaned-up' | 'cleanup-failed';

/** What the state machine collected; absent parts are parts the job did not reach. */
export interface RecoveryReportInput {
  readonly mode: RecoveryMode;
  readonly plan: string;
  readonly set?: string | undefined;
  readonly checkpoint?: CheckpointRef | undefined;
  readonly startedAt: string;
  readonly machines?: readonly ResolvedMachine[] | undefined;
  readonly launched?: readonly LaunchResult[] | undefined;
  readonly health?: HealthResult | undefined;
  readonly pause?: PauseResult | undefined;
  readonly teardown?: TeardownResult | undefined;
  readonly verify?: VerifyTeardownResult | undefined;
  readonly sourceQuiesced?: boolean | undefined;
  readonly error?: { readonly Error?: string | undefined; readonly Cause?: string | undefined } | undefined;
}

export interface ReportedMachine {
  readonly name: string;
  readonly kind?: MachineKind | undefined;
  readonly instanceId?: string | undefined;
  readonly volumeIds: readonly string[];
  readonly healthy?: boolean | undefined;
  readonly state?: string | undefined;
  readonly reason?: string | undefined;
}

export interface RecoveryReport {
  readonly jobId: string;
  readonly mode: RecoveryMode;
  readonly plan: string;
  readonly set?: string | undefined;
  readonly checkpoint?: CheckpointRef | undefined;
  readonly startedAt: string;
  readonly finishedAt: string;
  readonly outcome: RecoveryOutcome;
  readonly secondsToRunning?: number | undefined;
  readonly machines: readonly ReportedMachine[];
  readonly schedulePaused?: boolean | undefined;
  readonly cleanup?:
    | {
        readonly terminated: number;
        readonly deregistered: number;
        readonly deletedVolumes: number;
        readonly deletedSnapshots: number;
        readonly clean?: boolean | undefined;
        readonly remaining?: Remaining | undefined;
      }
    | undefined;
  readonly dataLossWindowSeconds?: number | undefined;
  readonly error?: string | undefined;
}
