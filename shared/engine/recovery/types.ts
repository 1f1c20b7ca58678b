// The recovery's data as the engine sees it: machine settings, what resolve decides, what launch,
// health and teardown report. functions/recovery/contracts.ts validates the same shapes with zod
// (a type-level test keeps the two assignable).
import type { CycleBase } from '../cycle/types.ts';

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
  /** Text the guest prints on its serial console once booted: healthy only when the console shows it. */
  readonly bootMessage?: string | undefined;
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
  /**
   * A failback's cutover only (given by the state machine, never the operator): the reverse set whose
   * checkpoint `finalCycle` names, recovered onto the plan's own machines.
   */
  readonly set?: string | undefined;
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
  /** The machine's bootMessage, which its health waits for on the console. */
  readonly bootMessage?: string | undefined;
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
  /** Failback: what prepare-failback decided (and, once it ran, the reverse cycle's checkpoint). */
  readonly failback?: FailbackPart | undefined;
  readonly error?: { readonly Error?: string | undefined; readonly Cause?: string | undefined } | undefined;
}

export interface ReportedMachine {
  readonly name: string;
  readonly kind?: MachineKind | undefined;
  readonly instanceId?: string | undefined;
  readonly volumeIds: readonly string[];
  /**
   * Which disk of the checkpoint became which device (instances) or volume (volumes-only machines):
   * what a failback reads to find each disk's recovered volume. Absent in reports written before it.
   */
  readonly disks?: readonly { readonly disk: string; readonly deviceName: string }[] | undefined;
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
  readonly failback?: FailbackPart | undefined;
  readonly error?: string | undefined;
}

// ---- failback ------------------------------------------------------------------------------------

/** A recovered disk a failback replicates back: the volume a failover's machine runs on. */
export interface FailbackDisk {
  readonly disk: string;
  readonly machine: string;
  readonly volumeId: string;
  /** The shared checkpoint's target snapshot: the volume was created from it (what it is diffed against). */
  readonly previousSourceSnapshotId: string;
  /** The shared checkpoint's source snapshot: the original side, parent of the reverse target snapshot. */
  readonly parentTargetSnapshotId: string;
}

/** The reverse cycle, as the cycle state machine takes it (functions/contracts.ts cycleInputSchema). */
export interface FailbackCycleInput {
  readonly plan: string;
  readonly set: string;
  readonly disks: readonly { readonly disk: string; readonly volumeId: string }[];
  /** The set's first cycle only: the checkpoint both sides share, so the cycle is incremental. */
  readonly base?: CycleBase | undefined;
}

/** What prepare-failback decided; the report's `failback` part. */
export interface FailbackPart {
  /** The failover (or migration) job whose machines are failed back. */
  readonly failoverJobId: string;
  /** The checkpoint the failover recovered: what both sides share. */
  readonly sharedCheckpointId: string;
  /** The reverse set (and plan) the recovered volumes replicate into. */
  readonly reverseSet: string;
  /** True when the reverse set had no checkpoint yet: this cycle starts from the shared one. */
  readonly fromBase: boolean;
  readonly disks: readonly FailbackDisk[];
  /** The operator asked for the cutover: the plan's machines relaunched from the reverse checkpoint. */
  readonly cutover: boolean;
  /** Cutover: the operator stopped the recovered machines before it (the data-loss window is zero). */
  readonly sourceQuiesced?: boolean | undefined;
  /** Set once the reverse cycle published. */
  readonly reverseCheckpointId?: string | undefined;
}

export interface PrepareFailbackRequest {
  readonly jobId: string;
  readonly plan: string;
  readonly cutover: boolean;
  /** Default `<set>-failback-<failover job>`. */
  readonly reverseSet?: string | undefined;
  readonly sourceQuiesced?: boolean | undefined;
  /** Cutover: machine settings over the plan's defaults. */
  readonly machines?: readonly MachineSettings[] | undefined;
}

/** A cutover's resolve event, short of the reverse checkpoint (the state machine adds `finalCycle`). */
export interface CutoverResolve {
  readonly action: 'resolve';
  readonly jobId: string;
  readonly mode: 'failback';
  readonly plan: string;
  readonly set: string;
  readonly machines?: readonly MachineSettings[] | undefined;
}

export interface PrepareFailbackResult {
  readonly part: FailbackPart;
  readonly cycleInput: FailbackCycleInput;
  readonly cutoverResolve?: CutoverResolve | undefined;
}
