// Fault matrix: an incremental killed mid-transfer (kill -9 at its first durable progress record,
// the source slowed to 4 Mbit/s by nbdkit), then the files a resume relies on are damaged before
// the rerun: the staging file lost, truncated or altered, the progress record lost. A resume must
// prove what it skips is really there, or start the cycle again; it must never publish a hole.
import { open, readFile, rm, truncate } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect } from 'vitest';
import { exists, FaultSet, faultCase, NbdImage, reportTable, SLOW_PARAMS } from './support.ts';

/**
 * Seeds a one-disk set, starts an incremental from a slow NBD source and kills it once progress is
 * durable; `damage` then runs on the interrupted state, and the contract is checked with the rerun.
 */
async function killThenDamage(
  name: string,
  seed: number,
  damage: (set: FaultSet, staging: string) => Promise<string | undefined>,
  note: (s: string) => void,
): Promise<string> {
  const set = await FaultSet.create(name, { seed, params: SLOW_PARAMS });
  await set.seed();
  await set.mutate(seed);
  const d = set.disks[0]!;
  const nbd = await NbdImage.start(d.source, join(set.dir, 'src.sock'), { rate: '4M' });
  try {
    d.sourceUri = nbd.uri;
    const run = await set.replicateKilledWhen(set.progressSaved(), 'mid-transfer');
    const staging = `${d.replica}.ferry-staging`;
    const done = await damage(set, staging);
    if (done) note(done);
    await nbd.restart();
    const outcome = await set.checkContract(run);
    await set.remove();
    return outcome;
  } finally {
    await nbd.stop();
  }
}

/** The lowest offset of the disk's change map: its first chunk, which the first record covers. */
async function firstChangedOffset(set: FaultSet): Promise<number> {
  const extents = JSON.parse(await readFile(set.disks[0]!.changed!, 'utf8')) as { offset: number }[];
  return Math.min(...extents.map((e) => e.offset));
}

async function requireStaging(staging: string): Promise<void> {
  expect(await exists(staging), `the interrupted incremental left no staging file at ${staging}`).toBe(true);
}

describe('damaged resume state after kill -9 mid-incremental', () => {
  reportTable('damaged resume state after kill -9 mid-incremental');

  faultCase('lost staging file', 'kill -9 mid-incremental, <target>.ferry-staging deleted', (row) =>
    killThenDamage(
      'lost-staging',
      31,
      async (_set, staging) => {
        await requireStaging(staging);
        await rm(staging);
        return undefined;
      },
      row.note,
    ),
  );

  faultCase(
    'truncated staging file',
    'kill -9 mid-incremental, staging cut just past the first staged block',
    (row) =>
      killThenDamage(
        'cut-staging',
        32,
        async (set, staging) => {
          await requireStaging(staging);
          const at = (await firstChangedOffset(set)) + 4096 + 123;
          await truncate(staging, at);
          return `staging cut at ${at}`;
        },
        row.note,
      ),
  );

  faultCase(
    'altered staging file',
    'kill -9 mid-incremental, one byte of an already staged chunk flipped',
    (row) =>
      killThenDamage(
        'flip-staging',
        33,
        async (set, staging) => {
          await requireStaging(staging);
          // Chunk 0 is below the durable watermark: a resume skips it unless it re-checks it.
          const at = await firstChangedOffset(set);
          const fh = await open(staging, 'r+');
          try {
            const b = Buffer.alloc(1);
            await fh.read(b, 0, 1, at);
            b[0] = b[0]! ^ 0xff;
            await fh.write(b, 0, 1, at);
          } finally {
            await fh.close();
          }
          return `staging byte ${at} flipped`;
        },
        row.note,
      ),
  );

  faultCase(
    'lost progress record',
    'kill -9 mid-incremental, state/progress/<set>/<disk>.json deleted',
    (row) =>
      killThenDamage(
        'lost-progress',
        34,
        async (set) => {
          const record = set.progressFile(set.disks[0]!.id);
          expect(await exists(record), `no progress record at ${record}`).toBe(true);
          await rm(record);
          return undefined;
        },
        row.note,
      ),
  );
});
