// Fault matrix: the source process killed with SIGKILL from outside, no hook involved. nbdkit makes
// the interrupted phase last seconds (a delayed block status; a 4 Mbit/s rate), and the kill fires
// on what the run visibly did (the NBD request in nbdkit's log; the first durable progress record),
// so it lands inside that phase however loaded the machine is.
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect } from 'vitest';
import { FaultSet, faultCase, fileHas, NbdImage, reportTable, SLOW_PARAMS } from './support.ts';

const SLOW_SOURCE = { rate: '4M' } as const;

describe('kill -9 of the source process, timed from outside (nbdkit delay and rate filters)', () => {
  reportTable('kill -9 of the source process, timed from outside');

  faultCase(
    'kill during planning',
    'SIGKILL while a full copy waits for NBD block status (delay-extents=5s)',
    async () => {
      // A re-seeding full copy plans from the source's allocation map: kill while that is asked.
      const set = await FaultSet.create('kill-planning', { seed: 21 });
      await set.seed();
      await set.mutate(21);
      const d = set.disks[0]!;
      const log = join(set.dir, 'nbdkit.log');
      const nbd = await NbdImage.start(d.source, join(set.dir, 'src.sock'), { delayExtents: '5', log });
      try {
        d.sourceUri = nbd.uri;
        d.changed = undefined;
        const run = await set.replicateKilledWhen(() => fileHas(log, ' Extents id='), 'planning');
        await nbd.restart();
        const outcome = await set.checkContract(run);
        await set.remove();
        return outcome;
      } finally {
        await nbd.stop();
      }
    },
  );

  faultCase(
    'kill mid-transfer of an incremental',
    'SIGKILL at the first durable progress record, source at 4 Mbit/s',
    async () => {
      const set = await FaultSet.create('kill-mid-inc', { seed: 22, params: SLOW_PARAMS });
      await set.seed();
      await set.mutate(22);
      const d = set.disks[0]!;
      const nbd = await NbdImage.start(d.source, join(set.dir, 'src.sock'), SLOW_SOURCE);
      try {
        d.sourceUri = nbd.uri;
        const run = await set.replicateKilledWhen(set.progressSaved(), 'mid-transfer');
        await nbd.restart();
        const outcome = await set.checkContract(run);
        await set.remove();
        return outcome;
      } finally {
        await nbd.stop();
      }
    },
  );

  faultCase(
    'kill mid-transfer of the first full copy',
    'SIGKILL at the first durable progress record, no checkpoint yet',
    async () => {
      const set = await FaultSet.create('kill-mid-full', { seed: 23, params: SLOW_PARAMS });
      const d = set.disks[0]!;
      const nbd = await NbdImage.start(d.source, join(set.dir, 'src.sock'), SLOW_SOURCE);
      try {
        d.sourceUri = nbd.uri;
        const run = await set.replicateKilledWhen(set.progressSaved(), 'mid-transfer');
        await nbd.restart();
        const outcome = await set.checkContract(run);
        await set.remove();
        return outcome;
      } finally {
        await nbd.stop();
      }
    },
  );

  faultCase(
    'kill mid-transfer, twice, then resume',
    'two SIGKILLs at successive durable progress records of one incremental',
    async (row) => {
      // A resume that is itself killed: the second attempt must resume from the first one's record.
      const set = await FaultSet.create('kill-twice', { seed: 24, params: SLOW_PARAMS });
      await set.seed();
      await set.mutate(24);
      const d = set.disks[0]!;
      const nbd = await NbdImage.start(d.source, join(set.dir, 'src.sock'), SLOW_SOURCE);
      try {
        d.sourceUri = nbd.uri;
        const first = await set.replicateKilledWhen(set.progressSaved(), 'first kill');
        const progress = set.progressFile(d.id);
        const saved = await readProgress(progress);
        // Once in five full-suite runs here the next connect to nbdkit (rate filter) was refused
        // (ECONNREFUSED) after the first SIGKILL; not diagnosed. The source server is not what this
        // case tests, so the same image is served afresh before the second attempt.
        await nbd.restart(SLOW_SOURCE);
        const second = await set.replicateKilledWhen(
          async () => (await readProgress(progress)) > saved,
          'second kill',
        );
        row.note(`killed at ${saved} then ${await readProgress(progress)} bytes durable`);
        expect(first.signal).toBe('SIGKILL');
        await nbd.restart();
        const outcome = await set.checkContract(second);
        await set.remove();
        return outcome;
      } finally {
        await nbd.stop();
      }
    },
  );
});

/** Bytes a progress record says are durable (0 when there is none or it cannot be read). */
async function readProgress(path: string): Promise<number> {
  const text = await readFile(path, 'utf8').catch(() => '');
  try {
    return Number((JSON.parse(text) as { bytesDone?: number }).bytesDone ?? 0);
  } catch {
    return 0;
  }
}
