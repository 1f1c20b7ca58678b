// Fixtures for the recovery engine tests: a published EBS checkpoint whose disks are snapshots of a
// FakeCompute, a clock, and resolve's dependencies over them.
import type { RecoveryCheckpoint } from '../../../shared/engine/ports.ts';
import type { ResolveDeps } from '../../../shared/engine/recovery/resolve.ts';
import type { FakeCompute } from './fake-compute.ts';

const GiB = 1024 ** 3;

export const fixedClock = (iso = '2026-12-05T12:00:00.000Z') => {
  let now = Date.parse(iso);
  return {
    now: () => now,
    advance: (ms: number) => {
      now += ms;
    },
  };
};

/** A checkpoint of `set` whose disks (name → GiB) are fresh snapshots in `compute`. */
export function ebsCheckpoint(
  compute: FakeCompute,
  set: string,
  sequence: number,
  disks: Record<string, number>,
  createdAt = `2026-12-0${sequence}T10:00:00.000Z`,
): RecoveryCheckpoint {
  return {
    id: `${set}/cycle-${sequence}`,
    set,
    sequence,
    createdAt,
    parent: sequence > 1 ? `${set}/cycle-${sequence - 1}` : undefined,
    disks: Object.entries(disks).map(([disk, gib]) => {
      const snapshotId = compute.addSnapshot(gib, { 'ferry:role': 'target' });
      return {
        disk,
        source: `snap-${'0'.repeat(16)}${sequence}`,
        target: snapshotId,
        sizeBytes: gib * GiB,
        kind: sequence === 1 ? ('full' as const) : ('incremental' as const),
        chunks: 1,
        bytes: 1,
        aggregate: { algorithm: 'ebs-linear-sha256', value: '00'.repeat(32) },
        targetRef: snapshotId,
      };
    }),
  };
}

export function resolveDeps(compute: FakeCompute, catalog: RecoveryCheckpoint[]): ResolveDeps {
  return {
    catalog: { listCheckpoints: async (set) => catalog.filter((c) => set === undefined || c.set === set) },
    compute,
    clock: fixedClock(),
  };
}
