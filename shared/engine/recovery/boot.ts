// Can a machine launched from snapshots boot on the instance type asked for? The documented limits
// of snapshot-based launch, checked against what EC2 says about the type, each refusal with its
// reason and what to change. A machine that cannot boot is refused before anything is created.
import type { InstanceTypeFacts } from './ports.ts';
import type { Architecture, BootMode, Platform } from './types.ts';

export interface BootCandidate {
  readonly name: string;
  readonly instanceType: string;
  readonly architecture: Architecture;
  readonly bootMode: BootMode;
  /** The guest has the ENA and NVMe drivers. */
  readonly ena: boolean;
  readonly platform: Platform;
}

/** Why a machine cannot boot, and the setting to change (`platform`, `architecture`, `bootMode`, `ena`). */
export interface BootRefusal {
  readonly field: 'platform' | 'architecture' | 'bootMode' | 'ena';
  readonly reason: string;
}

/**
 * The boot mode a machine gets when none is given: what EC2 itself uses for an image without one
 * (Graviton boots UEFI only; x86 instance types default to legacy BIOS), so a guest installed on a
 * BIOS machine (the common VMware case) is not switched to UEFI behind the operator's back.
 */
export function defaultBootMode(architecture: Architecture): BootMode {
  return architecture === 'arm64' ? 'uefi' : 'legacy-bios';
}

/** The architecture a machine gets when none is given: the only one its instance type runs, else x86_64. */
export function defaultArchitecture(facts: InstanceTypeFacts | undefined): Architecture {
  const archs = facts?.architectures.filter((a) => a === 'x86_64' || a === 'arm64') ?? [];
  return archs.length === 1 && archs[0] === 'arm64' ? 'arm64' : 'x86_64';
}

/**
 * Why `machine` cannot boot on its instance type; empty when nothing stands in the way. Windows is
 * refused outright: an image registered from a snapshot carries no Windows license billing code, so
 * the instance would run unlicensed Windows billed as Linux (AWS documents this: use VM Import, or
 * launch a licensed Windows AMI and attach the recovered disks as volumes).
 */
export function bootRefusals(machine: BootCandidate, facts: InstanceTypeFacts): BootRefusal[] {
  const out: BootRefusal[] = [];
  const type = machine.instanceType;
  if (machine.platform === 'windows') {
    out.push({
      field: 'platform',
      reason: `a Windows machine cannot be launched from a snapshot: the image would lose its Windows license billing code (unlicensed, billed as Linux); recover its disks as volumes (no bootDisk) and attach them to an instance from a licensed Windows AMI, or import the disk with VM Import`,
    });
  }
  if (!facts.architectures.includes(machine.architecture)) {
    out.push({
      field: 'architecture',
      reason: `instance type ${type} runs ${facts.architectures.join('/') || 'no known architecture'}, not the guest's ${machine.architecture}: choose a ${machine.architecture} instance type`,
    });
  }
  // An empty list means EC2 did not say: the launch is left to decide.
  if (facts.bootModes.length > 0) {
    const supported = (mode: string) => facts.bootModes.includes(mode);
    const refused =
      machine.bootMode === 'uefi-preferred'
        ? !supported('uefi') && !supported('legacy-bios')
        : !supported(machine.bootMode);
    if (refused) {
      const hint =
        machine.bootMode === 'legacy-bios'
          ? machine.architecture === 'arm64'
            ? 'Graviton boots UEFI only: a BIOS-booting guest needs an x86_64 type'
            : 'choose an instance type that boots legacy BIOS'
          : 'choose a Nitro instance type (e.g. m5, m6i), or legacy-bios if the guest boots that way';
      out.push({
        field: 'bootMode',
        reason: `instance type ${type} boots ${facts.bootModes.join('/')} only, not the guest's ${machine.bootMode}: ${hint}`,
      });
    }
  }
  const needsEna = facts.ena === 'required';
  const needsNvme = facts.nvme === 'required';
  if ((needsEna || needsNvme) && !machine.ena) {
    const needs = [needsEna ? 'the ENA network driver' : '', needsNvme ? 'the NVMe storage driver' : '']
      .filter(Boolean)
      .join(' and ');
    out.push({
      field: 'ena',
      reason: `instance type ${type} (${facts.hypervisor ?? 'Nitro'}) needs ${needs} in the guest: set ena: true once the guest has them (guests replicated from EC2 do; VMware and Nutanix guests need them installed before replication), or choose a Xen type such as t2 or m4`,
    });
  }
  return out;
}
