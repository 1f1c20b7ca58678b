// Fault matrix: I/O errors. The source fails 1 % of its reads (nbdkit's error filter, EIO): the
// engine retries, and the run completes bit-exact or fails cleanly. The target's filesystem fills
// up (a small tmpfs, or a loop-mounted ext4 where tmpfs cannot be mounted): ENOSPC fails the run
// with the cause named, the previous checkpoint survives, and the rerun after space is freed
// publishes bit-exact.
import { open, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, describe, expect } from 'vitest';
import {
  describeRun,
  FaultSet,
  faultCase,
  MiB,
  mountSmall,
  NbdImage,
  reportTable,
  type SmallMount,
  workdir,
} from './support.ts';

/** Mounted filesystems and the directories holding them: unmounted and removed after the cases. */
const mounts: { mount: SmallMount; base: string }[] = [];

afterAll(async () => {
  for (const { mount, base } of mounts) {
    await mount.unmount();
    await rm(base, { recursive: true, force: true });
  }
});

/** Read retries the run reported (plain output prints one line per retry). */
const retries = (stderr: string) => (stderr.match(/: retry \d+ at offset/g) ?? []).length;

describe('I/O errors at the source and the target', () => {
  reportTable('I/O errors at the source and the target');

  faultCase(
    'source read errors',
    'nbdkit error filter: 1 % of NBD reads fail with EIO, a full copy then a fragmented incremental',
    async (row) => {
      const set = await FaultSet.create('read-errors', {
        seed: 61,
        size: 32 * MiB,
        params: ['--chunk-size', '256KiB', '--checkpoint-interval', '1MiB'],
      });
      const d = set.disks[0]!;
      const nbd = await NbdImage.start(d.source, join(set.dir, 'src.sock'), { readErrorRate: '1%' });
      try {
        d.sourceUri = nbd.uri;
        // Full copy: about 80 reads of 256 KiB.
        const full = await set.replicate();
        const a = await set.checkContract(full, {
          what: 'full copy with read errors',
          rerun: async () => {
            await nbd.restart();
            const again = await set.replicateHere();
            await nbd.restart({ readErrorRate: '1%' });
            return again;
          },
        });
        // A fragmented incremental: thousands of small reads, so some of them fail.
        await set.mutate(61, { smallWrites: 1500, largeWrites: 1, largeSize: MiB });
        const inc = await set.replicate();
        const b = await set.checkContract(inc, {
          what: 'incremental with read errors',
          rerun: async () => {
            await nbd.restart();
            return set.replicateHere();
          },
        });
        row.note(`${retries(full.stderr)} + ${retries(inc.stderr)} retries reported`);
        await set.remove();
        return a === b ? a : `full copy: ${a}; incremental: ${b}`;
      } finally {
        await nbd.stop();
      }
    },
  );

  faultCase(
    'target filesystem full during an incremental',
    'ENOSPC: 32 MiB filesystem, 24 MiB image, about 12 MiB of changes to stage; then grown to 96 MiB',
    async (row) => {
      const base = await workdir('enospc-inc');
      const mount = await mountSmall(join(base, 'small'), 32 * MiB);
      if ('reason' in mount) return row.notRunnable(mount.reason);
      mounts.push({ mount, base });
      row.note(mount.kind);
      const set = await FaultSet.create('enospc-inc', {
        seed: 62,
        size: 24 * MiB,
        allocated: 1,
        replicaDir: mount.dir,
      });
      await set.seed();
      await set.mutate(62, { smallWrites: 100, largeWrites: 5, largeSize: 4 * MiB });
      const run = await set.replicate();
      expect(run.code, `the run cannot fit: ${describeRun(run)}`).not.toBe(0);
      expect(run.stderr, 'the error names the cause').toMatch(/ENOSPC|no space/i);
      expect(run.stderr, 'the error names the disk').toMatch(/disk d0\b/);
      const outcome = await set.checkContract(run, {
        rerun: async () => {
          await mount.resize(96 * MiB);
          return set.replicateHere();
        },
      });
      await set.remove();
      return outcome;
    },
  );

  faultCase(
    'target filesystem full during a first full copy',
    'ENOSPC: 16 MiB filesystem, 24 MiB fully allocated disk; then grown to 64 MiB',
    async (row) => {
      const base = await workdir('enospc-full');
      const mount = await mountSmall(join(base, 'small'), 16 * MiB);
      if ('reason' in mount) return row.notRunnable(mount.reason);
      mounts.push({ mount, base });
      row.note(mount.kind);
      const set = await FaultSet.create('enospc-full', {
        seed: 63,
        size: 24 * MiB,
        allocated: 1,
        replicaDir: mount.dir,
      });
      const run = await set.replicate();
      expect(run.code, `the copy cannot fit: ${describeRun(run)}`).not.toBe(0);
      expect(run.stderr, 'the error names the cause').toMatch(/ENOSPC|no space/i);
      expect(run.stderr, 'the error names the disk').toMatch(/disk d0\b/);
      const outcome = await set.checkContract(run, {
        rerun: async () => {
          await mount.resize(64 * MiB);
          return set.replicateHere();
        },
      });
      await set.remove();
      return outcome;
    },
  );

  faultCase(
    'state directory full during an incremental',
    'ENOSPC: the state directory (progress, catalog) on a full 1 MiB filesystem; then space freed',
    async (row) => {
      const base = await workdir('enospc-state');
      const mount = await mountSmall(join(base, 'state'), MiB);
      if ('reason' in mount) return row.notRunnable(mount.reason);
      mounts.push({ mount, base });
      row.note(mount.kind);
      const set = await FaultSet.create('enospc-state', { seed: 64, stateDir: mount.dir });
      await set.seed();
      await set.mutate(64);
      const filler = join(mount.dir, 'filler');
      await fill(filler);
      const run = await set.replicate();
      expect(run.code, `the run cannot save its state: ${describeRun(run)}`).not.toBe(0);
      expect(run.stderr, 'the error names the cause').toMatch(/ENOSPC|no space/i);
      const outcome = await set.checkContract(run, {
        rerun: async () => {
          await rm(filler);
          return set.replicateHere();
        },
      });
      await set.remove();
      return outcome;
    },
  );
});

/** Fills the filesystem holding `path` with one file, to the last byte it accepts. */
async function fill(path: string): Promise<void> {
  const fh = await open(path, 'w');
  try {
    const block = Buffer.alloc(4096, 0x5a);
    for (;;) {
      try {
        await fh.write(block);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'ENOSPC') break;
        throw err;
      }
    }
    // A partial block may still fit; then nothing does.
    for (let size = 2048; size >= 1; size = Math.floor(size / 2)) {
      await fh.write(block.subarray(0, size)).catch(() => undefined);
    }
  } finally {
    await fh.close();
  }
}
