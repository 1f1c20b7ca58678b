// resolve: from a recovery request and the plan's defaults to the exact machines to launch, with every
// check made before anything is created: the checkpoint (point in time, or the migration's final one)
// and that its snapshots still exist, each disk given to exactly one machine, device names and sizes,
// the subnets (drills only in their isolated one) and whether each machine can boot on its type.

import { ConfigError } from '../errors.ts';
import { type CheckpointChoice, selectCheckpoint } from '../point-in-time.ts';
import type { Clock, RecoveryCheckpoint, StateStore } from '../ports.ts';
import { bootRefusals, defaultArchitecture, defaultBootMode } from './boot.ts';
import { RecoveryRefusedError } from './errors.ts';
import type { InstanceTypeFacts, RecoveryCompute, SubnetFacts } from './ports.ts';
import type {
  CheckpointChoiceInput,
  MachineKind,
  MachineSettings,
  PlanRecoveryDefaults,
  ResolvedDisk,
  ResolvedMachine,
  ResolveRequest,
  ResolveResult,
} from './types.ts';

const GiB = 1024 ** 3;
// EBS volumes are 1 GiB to 64 TiB.
const MAX_VOLUME_GIB = 65_536;
/** A drill's lifetime when neither the request nor the plan says: long enough to look, short enough to cost little. */
export const DEFAULT_DRILL_TTL_MINUTES = 60;
/**
 * The root device of every registered image. EC2 accepts /dev/xvda or /dev/sda1 for the root; on
 * Nitro the guest sees NVMe devices whatever the name, on Xen HVM it sees xvda, and Linux guests find
 * their root filesystem by UUID or label, so one name serves both architectures and boot modes.
 */
export const ROOT_DEVICE = '/dev/xvda';
/**
 * Data disks: /dev/sdf to /dev/sdz, in the order given. EC2 recommends sdf-sdp for EBS volumes
 * (sdb-sde may be taken by instance store); past sdp the names still work on HVM. 21 data disks is
 * within every Nitro type's attachment limit (27 or more, less the root and one network interface).
 */
export const DATA_DEVICES = Array.from({ length: 21 }, (_, i) => `/dev/sd${String.fromCharCode(102 + i)}`);

const SNAPSHOT_ID = /^snap-[0-9a-f]{8,17}$/;

interface Issue {
  readonly message: string;
  readonly field: string;
  readonly machine?: string | undefined;
}

/** A machine after merging the request with the defaults, before the cloud is asked anything. */
export interface MachineDraft {
  readonly settings: MachineSettings;
  readonly kind: MachineKind;
  readonly disks: readonly ResolvedDisk[];
  /** Where the machine's settings came from, as a field path (`machines[0]`). */
  readonly field: string;
}

export interface MachinePlan {
  readonly machines: readonly MachineDraft[];
  readonly unusedDisks: readonly string[];
}

function refuse(plan: string, issues: readonly Issue[], checkpoint?: string): never {
  const first = issues[0];
  const lines = issues.map((i) =>
    i.machine === undefined ? i.message : `machine ${i.machine}: ${i.message}`,
  );
  throw new RecoveryRefusedError(`recovery of plan ${plan} refused: ${lines.join('; ')}`, {
    field: first?.field,
    machine: first?.machine,
    checkpoint,
  });
}

function refuseNoMachines(plan: string): never {
  refuse(plan, [
    {
      message: `no machines to recover: give machines in the request or in RECOVERY_DEFAULTS for plan ${plan}`,
      field: 'machines',
    },
  ]);
}

/** Request settings over the defaults, field by field (an absent field keeps the default). */
function overlay(base: MachineSettings | undefined, over: MachineSettings | undefined): MachineSettings {
  const out: Record<string, unknown> = { ...(base ?? {}) };
  for (const [k, v] of Object.entries(over ?? {})) if (v !== undefined) out[k] = v;
  return out as unknown as MachineSettings;
}

/**
 * The machines of a request against one checkpoint, without asking the cloud: merged with the
 * plan's defaults by name, every disk of the checkpoint used by at most one machine (the others are
 * reported unused), device names and sizes, and the subnet each machine needs. Refuses with every
 * problem at once, each naming its field.
 */
export function planMachines(
  request: ResolveRequest,
  defaults: PlanRecoveryDefaults | undefined,
  checkpoint: RecoveryCheckpoint,
): MachinePlan {
  const issues: Issue[] = [];
  const defaultsField = `RECOVERY_DEFAULTS.${request.plan}`;
  const fromDefaults = new Map<string, { settings: MachineSettings; index: number }>();
  (defaults?.machines ?? []).forEach((m, index) => {
    if (fromDefaults.has(m.name)) {
      issues.push({
        message: 'appears twice in the defaults',
        field: `${defaultsField}.machines[${index}].name`,
        machine: m.name,
      });
    }
    fromDefaults.set(m.name, { settings: m, index });
  });
  const fromRequest = new Map<string, { settings: MachineSettings; index: number }>();
  (request.machines ?? []).forEach((m, index) => {
    if (fromRequest.has(m.name)) {
      issues.push({
        message: 'appears twice in the request',
        field: `machines[${index}].name`,
        machine: m.name,
      });
    }
    fromRequest.set(m.name, { settings: m, index });
  });
  const names = [...new Set([...fromDefaults.keys(), ...fromRequest.keys()])];
  if (names.length === 0) refuseNoMachines(request.plan);

  const cpDisks = new Map<string, { snapshotId: string; sizeBytes: number }>();
  for (const d of checkpoint.disks) {
    const snapshotId = d.targetRef ?? d.target;
    if (!SNAPSHOT_ID.test(snapshotId)) {
      issues.push({
        message: `checkpoint ${checkpoint.id} disk ${d.disk} is not an EBS snapshot (${snapshotId}): recover local and node targets with ferry recover`,
        field: 'checkpoint',
      });
    }
    cpDisks.set(d.disk, { snapshotId, sizeBytes: d.sizeBytes });
  }

  const usedBy = new Map<string, string>();
  const machines: MachineDraft[] = [];
  for (const name of names) {
    const req = fromRequest.get(name);
    const def = fromDefaults.get(name);
    const field = req !== undefined ? `machines[${req.index}]` : `${defaultsField}.machines[${def!.index}]`;
    let settings = overlay(def?.settings, req?.settings);
    const at = (f: string) => `${field}.${f}`;
    const issue = (message: string, f: string) => issues.push({ message, field: at(f), machine: name });

    if (request.mode === 'drill') {
      // A drill runs isolated: in the subnet the request names for it, else the plan's drill subnet,
      // never in the production subnet the defaults give the machine for a failover.
      const subnetId = req?.settings.subnetId ?? defaults?.drillSubnetId;
      const securityGroupIds = req?.settings.securityGroupIds ?? defaults?.drillSecurityGroupIds;
      settings = { ...settings, subnetId, securityGroupIds };
      if (subnetId !== undefined && subnetId === def?.settings.subnetId) {
        issue(
          `drill subnet ${subnetId} is the machine's failover subnet (its recovery default): a drill must run isolated, in the plan's drillSubnetId`,
          'subnetId',
        );
      }
    }

    const kind: MachineKind = settings.bootDisk === undefined ? 'volumes' : 'instance';
    const wanted = [
      ...(settings.bootDisk === undefined ? [] : [{ disk: settings.bootDisk, f: 'bootDisk' }]),
      ...(settings.dataDisks ?? []).map((disk, i) => ({ disk, f: `dataDisks[${i}]` })),
    ];
    if (wanted.length === 0) issue('has no disks: give a bootDisk and/or dataDisks', 'bootDisk');
    if ((settings.dataDisks ?? []).length > DATA_DEVICES.length) {
      issue(
        `has ${settings.dataDisks?.length} data disks; at most ${DATA_DEVICES.length} can be attached`,
        'dataDisks',
      );
    }
    const disks: ResolvedDisk[] = [];
    let data = 0;
    for (const { disk, f } of wanted) {
      const cp = cpDisks.get(disk);
      if (cp === undefined) {
        issue(
          `disk ${disk} is not in checkpoint ${checkpoint.id} (its disks: ${[...cpDisks.keys()].join(', ')})`,
          f,
        );
        continue;
      }
      const other = usedBy.get(disk);
      if (other !== undefined) {
        issue(
          other === name
            ? `disk ${disk} is given twice`
            : `disk ${disk} is already machine ${other}'s: each disk belongs to one machine`,
          f,
        );
        continue;
      }
      usedBy.set(disk, name);
      const sizeGiB = Math.ceil(cp.sizeBytes / GiB);
      if (sizeGiB < 1 || sizeGiB > MAX_VOLUME_GIB) {
        issue(`disk ${disk} is ${cp.sizeBytes} bytes: an EBS volume is 1 GiB to 64 TiB`, f);
        continue;
      }
      const isBoot = kind === 'instance' && f === 'bootDisk';
      const deviceName = isBoot ? ROOT_DEVICE : DATA_DEVICES[data++];
      if (deviceName === undefined) continue;
      disks.push({ disk, snapshotId: cp.snapshotId, sizeGiB, deviceName });
    }

    if (kind === 'instance') {
      if (settings.instanceType === undefined) {
        issue('has no instanceType: give one in the request or the recovery defaults', 'instanceType');
      }
      if (settings.subnetId === undefined) {
        issue(
          request.mode === 'drill'
            ? `has no drill subnet: give machines[].subnetId or the plan's drillSubnetId (an isolated subnet)`
            : 'has no subnetId: give one in the request or the recovery defaults',
          'subnetId',
        );
      }
    } else if (settings.availabilityZone === undefined && settings.subnetId === undefined) {
      issue('its volumes need an availabilityZone (or a subnetId to take the zone from)', 'availabilityZone');
    }
    machines.push({ settings, kind, disks, field });
  }
  if (issues.length > 0) refuse(request.plan, issues, checkpoint.id);
  const unusedDisks = [...cpDisks.keys()].filter((d) => !usedBy.has(d));
  return { machines, unusedDisks };
}

/** The request's checkpoint choice in the point-in-time rule's terms. */
function choiceOf(choice: CheckpointChoiceInput | undefined): CheckpointChoice {
  if (choice === undefined || choice === 'latest') return { checkpoint: 'latest' };
  if (typeof choice === 'number') return { checkpoint: String(choice) };
  if (typeof choice === 'string') return { checkpoint: choice };
  return { at: choice.at };
}

/** The checkpoint a request names (a migration: exactly its final cycle's). */
export function chooseCheckpoint(
  request: ResolveRequest,
  set: string,
  catalog: readonly RecoveryCheckpoint[],
): RecoveryCheckpoint {
  let choice: CheckpointChoice;
  let field = 'checkpoint';
  if (request.mode === 'migration' || (request.mode === 'failback' && request.finalCycle !== undefined)) {
    field = 'finalCycle.checkpointId';
    if (request.finalCycle === undefined) {
      refuse(request.plan, [
        {
          message:
            'a migration fails over to the checkpoint its final cycle published: give finalCycle.checkpointId',
          field,
        },
      ]);
    }
    const given = request.checkpoint;
    if (given !== undefined && given !== request.finalCycle.checkpointId) {
      refuse(request.plan, [
        {
          message: `a migration recovers its final cycle's checkpoint ${request.finalCycle.checkpointId}, not ${JSON.stringify(given)}: leave checkpoint out`,
          field: 'checkpoint',
        },
      ]);
    }
    choice = { checkpoint: request.finalCycle.checkpointId };
  } else {
    choice = choiceOf(request.checkpoint);
    if (typeof request.checkpoint === 'object') field = 'checkpoint.at';
  }
  try {
    return selectCheckpoint(set, catalog, choice);
  } catch (err) {
    if (err instanceof ConfigError) refuse(request.plan, [{ message: err.message, field }]);
    throw err;
  }
}

export interface ResolveDeps {
  readonly catalog: Pick<StateStore, 'listCheckpoints'>;
  readonly compute: Pick<
    RecoveryCompute,
    'describeInstanceTypes' | 'describeSnapshots' | 'describeSubnets' | 'describeSecurityGroups'
  >;
  readonly clock: Pick<Clock, 'now'>;
}

/**
 * Everything a recovery job will launch, decided and checked before anything is created. Refuses
 * with a RecoveryRefusedError naming every problem and the first one's field.
 */
export async function resolveRecovery(
  deps: ResolveDeps,
  request: ResolveRequest,
  defaults: PlanRecoveryDefaults | undefined,
): Promise<ResolveResult> {
  const startedAt = new Date(deps.clock.now()).toISOString();
  if (request.set !== undefined && !(request.mode === 'failback' && request.finalCycle !== undefined)) {
    refuse(request.plan, [
      {
        message: `"set" is for a failback's cutover (the reverse set its final cycle published in), not a ${request.mode}`,
        field: 'set',
      },
    ]);
  }
  // A failback's cutover recovers the reverse set's checkpoint onto the plan's own machines.
  const set = request.set ?? defaults?.set ?? request.plan;
  if (request.ttlMinutes !== undefined && request.mode !== 'drill') {
    refuse(request.plan, [
      { message: `only drills are torn down at a TTL, not a ${request.mode}`, field: 'ttlMinutes' },
    ]);
  }
  if ((request.machines ?? []).length === 0 && (defaults?.machines ?? []).length === 0) {
    refuseNoMachines(request.plan);
  }
  const catalog = await deps.catalog.listCheckpoints(set);
  const checkpoint = chooseCheckpoint(request, set, catalog);
  const plan = planMachines(request, defaults, checkpoint);

  const instanceTypes = [
    ...new Set(plan.machines.flatMap((m) => (m.kind === 'instance' ? [m.settings.instanceType!] : []))),
  ];
  const subnetIds = [
    ...new Set(plan.machines.flatMap((m) => (m.settings.subnetId ? [m.settings.subnetId] : []))),
  ];
  const groupIds = [...new Set(plan.machines.flatMap((m) => m.settings.securityGroupIds ?? []))];
  const snapshotIds = plan.machines.flatMap((m) => m.disks.map((d) => d.snapshotId));
  const [snapshots, types, subnets, groups] = await Promise.all([
    deps.compute.describeSnapshots(snapshotIds),
    instanceTypes.length ? deps.compute.describeInstanceTypes(instanceTypes) : [],
    subnetIds.length ? deps.compute.describeSubnets(subnetIds) : [],
    groupIds.length ? deps.compute.describeSecurityGroups(groupIds) : [],
  ]);

  const issues: Issue[] = [];
  const snapshotState = new Map(snapshots.map((s) => [s.snapshotId, s]));
  for (const m of plan.machines) {
    for (const d of m.disks) {
      const s = snapshotState.get(d.snapshotId);
      if (s === undefined) {
        issues.push({
          message: `checkpoint ${checkpoint.id} is no longer recoverable: snapshot ${d.snapshotId} of disk ${d.disk} does not exist (deleted by retention or by hand)`,
          field: 'checkpoint',
        });
      } else if (s.state !== 'completed') {
        issues.push({
          message: `snapshot ${d.snapshotId} of disk ${d.disk} in checkpoint ${checkpoint.id} is ${s.state}, not completed`,
          field: 'checkpoint',
        });
      }
    }
  }

  const typeFacts = new Map(types.map((t) => [t.instanceType, t]));
  const subnetFacts = new Map(subnets.map((s) => [s.subnetId, s]));
  const groupVpc = new Map(groups.map((g) => [g.groupId, g.vpcId]));
  const machines: ResolvedMachine[] = [];
  for (const m of plan.machines) {
    const s = m.settings;
    const issue = (message: string, f: string) =>
      issues.push({ message, field: `${m.field}.${f}`, machine: s.name });
    let subnet: SubnetFacts | undefined;
    if (s.subnetId !== undefined) {
      subnet = subnetFacts.get(s.subnetId);
      if (subnet === undefined) issue(`subnet ${s.subnetId} does not exist`, 'subnetId');
    }
    for (const [i, g] of (s.securityGroupIds ?? []).entries()) {
      const vpc = groupVpc.get(g);
      if (vpc === undefined) issue(`security group ${g} does not exist`, `securityGroupIds[${i}]`);
      else if (subnet !== undefined && vpc !== subnet.vpcId) {
        issue(
          `security group ${g} is in ${vpc}, subnet ${subnet.subnetId} in ${subnet.vpcId}`,
          `securityGroupIds[${i}]`,
        );
      }
    }
    if (m.kind === 'volumes' && s.bootMessage !== undefined) {
      issue(
        'a bootMessage is read from an instance console: give the machine a bootDisk, or leave it out',
        'bootMessage',
      );
    }
    const facts: InstanceTypeFacts | undefined =
      m.kind === 'instance' ? typeFacts.get(s.instanceType!) : undefined;
    if (m.kind === 'instance' && facts === undefined) {
      issue(`instance type ${s.instanceType} does not exist in this region`, 'instanceType');
    }
    const architecture = s.architecture ?? defaultArchitecture(facts);
    const resolved: ResolvedMachine = {
      ...s,
      kind: m.kind,
      disks: m.disks,
      architecture,
      // Every Graviton type is Nitro, so an arm64 guest recovered from one has both drivers.
      ena: s.ena ?? architecture === 'arm64',
      platform: s.platform ?? 'linux',
      ...(m.kind === 'instance' ? { bootMode: s.bootMode ?? defaultBootMode(architecture) } : {}),
      ...(m.kind === 'volumes' && s.availabilityZone === undefined && subnet !== undefined
        ? { availabilityZone: subnet.availabilityZone }
        : {}),
    };
    if (m.kind === 'instance' && facts !== undefined) {
      const reasons = bootRefusals(
        {
          name: s.name,
          instanceType: s.instanceType!,
          architecture,
          bootMode: resolved.bootMode!,
          ena: resolved.ena,
          platform: resolved.platform,
        },
        facts,
      );
      for (const r of reasons) issue(`cannot boot: ${r.reason}`, r.field);
    }
    machines.push(resolved);
  }
  if (issues.length > 0) refuse(request.plan, issues, checkpoint.id);

  const ttlMinutes =
    request.mode === 'drill' ? (request.ttlMinutes ?? defaults?.ttlMinutes ?? DEFAULT_DRILL_TTL_MINUTES) : 0;
  return {
    jobId: request.jobId,
    mode: request.mode,
    plan: request.plan,
    set,
    checkpoint: { id: checkpoint.id, sequence: checkpoint.sequence, publishedAt: checkpoint.createdAt },
    machines,
    unusedDisks: plan.unusedDisks,
    ttlSeconds: ttlMinutes * 60,
    startedAt,
  };
}
