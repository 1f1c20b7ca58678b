// Fault matrix: the source process (`ferry replicate`) killed with SIGKILL at named points of a
// cycle, through the engine's crash hook FERRY_TEST_CRASH_AT (deterministic: no timing involved).
// Two-disk sets, so "during commit of disk 1 of 2" is a real state: one disk applied, one not.
import { join } from 'node:path';
import { describe, expect } from 'vitest';
import {
  describeRun,
  expectKilled,
  FaultSet,
  faultCase,
  ferry,
  NbdImage,
  reportTable,
  SLOW_PARAMS,
} from './support.ts';

const TWO_DISKS = { disks: ['os', 'data'], size: 16 * 1024 * 1024 } as const;

/** A two-disk set with a published full copy and a pending incremental cycle. */
async function incrementalSet(name: string, seed: number): Promise<FaultSet> {
  const set = await FaultSet.create(name, { ...TWO_DISKS, seed });
  await set.seed();
  await set.mutate(seed);
  return set;
}

describe('kill -9 of the source process at named points (FERRY_TEST_CRASH_AT)', () => {
  reportTable('kill -9 of the source process at named points');

  faultCase('crash after planning', 'SIGKILL at "planned", incremental, 2 disks', async () => {
    const set = await incrementalSet('crash-planned', 11);
    const run = await set.replicate({ crashAt: 'planned' });
    expectKilled(run, 'planned');
    const outcome = await set.checkContract(run);
    await set.remove();
    return outcome;
  });

  faultCase(
    'crash mid-transfer',
    'SIGKILL at "mid-transfer" (first durable progress), incremental',
    async () => {
      const set = await incrementalSet('crash-mid', 12);
      const run = await set.replicate({ crashAt: 'mid-transfer' });
      expectKilled(run, 'mid-transfer');
      const outcome = await set.checkContract(run);
      await set.remove();
      return outcome;
    },
  );

  faultCase('crash during commit of disk 1 of 2', 'SIGKILL at "commit:0", incremental, 2 disks', async () => {
    const set = await incrementalSet('crash-commit0', 13);
    const run = await set.replicate({ crashAt: 'commit:0' });
    expectKilled(run, 'commit:0');
    const outcome = await set.checkContract(run);
    await set.remove();
    return outcome;
  });

  faultCase(
    'crash during commit of a re-seeding full copy',
    'SIGKILL at "commit:0", full copy over published images, 2 disks',
    async () => {
      // A full copy over images that hold a checkpoint: committing it replaces every byte, so the
      // previous checkpoint survives a crash only if the old image is kept until publication.
      const set = await incrementalSet('crash-reseed', 14);
      for (const d of set.disks) d.changed = undefined;
      const run = await set.replicate({ crashAt: 'commit:0' });
      expectKilled(run, 'commit:0');
      const outcome = await set.checkContract(run);
      await set.remove();
      return outcome;
    },
  );

  faultCase('crash after commit, before publish', 'SIGKILL at "before-publish", 2 disks', async () => {
    const set = await incrementalSet('crash-prepublish', 15);
    const run = await set.replicate({ crashAt: 'before-publish' });
    expectKilled(run, 'before-publish');
    const outcome = await set.checkContract(run);
    await set.remove();
    return outcome;
  });

  faultCase(
    'crash after publish, before cleanup',
    'SIGKILL at "after-publish", then the next cycle',
    async (row) => {
      const set = await incrementalSet('crash-postpublish', 16);
      const run = await set.replicate({ crashAt: 'after-publish' });
      expectKilled(run, 'after-publish');
      const outcome = await set.checkContract(run);
      // What the crash left behind (staging, progress) must not leak into the next cycle.
      await set.mutate(17);
      await set.cycle('the cycle after a crash after publish');
      row.note('next cycle bit-exact');
      await set.remove();
      return outcome;
    },
  );

  faultCase(
    'crash after publish, next cycle straight away',
    'SIGKILL at "after-publish", then the next incremental with no verify in between',
    async (row) => {
      // The clean-up a crash skipped must be finished (or made harmless) by replicate itself.
      const set = await incrementalSet('crash-postpublish-next', 18);
      const run = await set.replicate({ crashAt: 'after-publish' });
      expectKilled(run, 'after-publish');
      const listing = await set.checkpoints();
      expect(listing.ids, 'the checkpoint was published before the crash').toContain(
        'crash-postpublish-next#2',
      );
      await set.assertBitExact('published before the crash');
      set.published.push('crash-postpublish-next#2');
      await set.mutate(19);
      await set.cycle('the next cycle, straight after the crash');
      const verify = await ferry(['verify', '--set', set.set, '--state', set.state]);
      expect(verify.code, describeRun(verify)).toBe(0);
      row.note(`then ${set.published.at(-1)} published bit-exact and verified`);
      await set.remove();
      return 'published bit-exact';
    },
  );

  faultCase(
    'crash during commit, then again in the rerun',
    'SIGKILL at "commit:0"; the rerun (which first rolls back) SIGKILLed at "commit:1"; then a rerun',
    async () => {
      // Recovery must itself survive a crash right after it: the rerun recovers, commits again, dies.
      const set = await incrementalSet('crash-twice', 20);
      const first = await set.replicate({ crashAt: 'commit:0' });
      expectKilled(first, 'commit:0');
      const second = await set.replicate({ crashAt: 'commit:1' });
      expectKilled(second, 'commit:1');
      const outcome = await set.checkContract(second);
      await set.remove();
      return outcome;
    },
  );

  faultCase(
    'SIGTERM mid-transfer',
    'ferry replicate asked to stop (SIGTERM) at its first durable progress record',
    async (row) => {
      // The graceful path: an operator's Ctrl-C or a service manager stopping the run.
      const set = await incrementalSet('sigterm', 21);
      set.params = [...SLOW_PARAMS];
      const d = set.disks[0]!;
      const nbd = await NbdImage.start(d.source, join(set.dir, 'src.sock'), { rate: '4M' });
      try {
        d.sourceUri = nbd.uri;
        const saved = set.progressSaved();
        let signalled = false;
        const run = await set.replicate({
          onSpawn: (child) => {
            const poll = setInterval(async () => {
              if (!signalled && (await saved())) {
                signalled = true;
                clearInterval(poll);
                child.kill('SIGTERM');
              }
            }, 10);
            child.once('close', () => clearInterval(poll));
          },
        });
        expect(signalled, `the run ended before it could be stopped: ${describeRun(run)}`).toBe(true);
        expect(run.signal, 'the CLI handles SIGTERM itself and exits').toBeNull();
        row.note(`exit ${run.code}: ${run.stderr.trim().split('\n').at(-1)?.slice(0, 80)}`);
        await nbd.restart();
        const outcome = await set.checkContract(run);
        await set.remove();
        return outcome;
      } finally {
        await nbd.stop();
      }
    },
  );
});
