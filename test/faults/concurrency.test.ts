// Fault matrix: a second Ferry process working on the same set while a replicate runs: the same
// command started twice (an overlapping schedule), and `ferry verify` run while a replicate is
// committing. Whatever the interleaving, a published checkpoint must be bit-exact: recovery of an
// "interrupted" commit must not undo a commit that is still under way.
import { watch } from 'node:fs';
import { join } from 'node:path';
import { describe, expect } from 'vitest';
import {
  describeRun,
  exists,
  FaultSet,
  faultCase,
  ferry,
  NbdImage,
  reportTable,
  SLOW_PARAMS,
} from './support.ts';

/** A two-disk set with a published full copy and a pending incremental cycle. */
async function incrementalSet(name: string, seed: number): Promise<FaultSet> {
  const set = await FaultSet.create(name, { disks: ['os', 'data'], seed });
  await set.seed();
  await set.mutate(seed);
  return set;
}

describe('another ferry process on the same set', () => {
  reportTable('another ferry process on the same set');

  faultCase(
    'verify while replicate commits',
    'ferry replicate stopped (SIGSTOP) as its commit first writes disk os; ferry verify runs; replicate continues',
    async (row) => {
      // Deterministic: the replicate is frozen inside its commit (after it began writing an image,
      // before publication) while verify runs, then thawed. An operator's verify from cron, a
      // monitoring probe or a second replicate can land there.
      const set = await incrementalSet('verify-during-commit', 23);
      const os = set.disk('os');
      const image = os.replica.slice(os.replica.lastIndexOf('/') + 1);
      let pid: number | undefined;
      let stopped = false;
      let stoppedBeforePublish = false;
      const watcher = watch(join(set.dir, 'replica'), (_event, name) => {
        if (stopped || pid === undefined || name !== image) return;
        stopped = true;
        process.kill(pid, 'SIGSTOP');
        stoppedBeforePublish = true;
      });
      try {
        const running = set.replicate({ onSpawn: (child) => (pid = child.pid) });
        let ended = false;
        void running.then(() => {
          ended = true;
        });
        while (!stopped && !ended) await new Promise((resolve) => setTimeout(resolve, 5));
        watcher.close();
        expect(stopped, 'the replicate ended without writing its image (nothing to interrupt)').toBe(true);
        const published = await exists(set.catalogFile(2));
        expect(stoppedBeforePublish && !published, 'the stop came after publication: cannot inject').toBe(
          true,
        );
        const verify = await ferry(['verify', '--set', set.set, '--state', set.state]);
        row.note(
          `verify meanwhile: exit ${verify.code}${verify.stderr ? `, "${verify.stderr.trim().split('\n').at(-1)?.slice(0, 70)}"` : ''}`,
        );
        process.kill(pid!, 'SIGCONT');
        const run = await running;
        const outcome = await set.checkContract(run);
        await set.remove();
        return outcome;
      } finally {
        watcher.close();
        if (pid !== undefined) {
          try {
            process.kill(pid, 'SIGCONT');
          } catch {
            // already gone
          }
        }
      }
    },
  );

  faultCase(
    'two runs of one set at once',
    'the same replicate command started twice concurrently (an overlapping schedule)',
    async (row) => {
      const set = await incrementalSet('overlap', 22);
      set.params = [...SLOW_PARAMS];
      const nbds = await Promise.all(
        set.disks.map((d) => NbdImage.start(d.source, join(set.dir, `${d.id}.sock`), { rate: '8M' })),
      );
      try {
        set.disks.forEach((d, i) => {
          d.sourceUri = nbds[i]!.uri;
        });
        await set.writeJob();
        const [a, b] = await Promise.all([ferry(set.replicateArgs()), ferry(set.replicateArgs())]);
        const loser = [a, b].find((r) => r.code !== 0);
        row.note(
          `exits ${a.code} and ${b.code}${loser ? `: ${loser.stderr.trim().split('\n').at(-1)?.slice(0, 90)}` : ''}`,
        );
        const listing = await set.checkpoints();
        const fresh = listing.ids.filter((id) => !set.published.includes(id));
        expect(
          fresh.length,
          `at most one of two overlapping runs publishes: ${fresh.join(', ')}`,
        ).toBeLessThanOrEqual(1);
        // Both may say they published it (the same checkpoint): the contract is about what is on
        // disk, and that is checked below; a run that fails must fail cleanly.
        for (const r of [a, b]) if (r.code !== 0) expect(r.stderr, describeRun(r)).toMatch(/^ferry: \S/m);
        await Promise.all(nbds.map((n) => n.restart()));
        // Whichever finished: the contract holds for the pair (a success published bit-exact, or
        // nothing was and the previous checkpoint holds and a rerun completes).
        const outcome = await set.checkContract(a.code === 0 ? a : b);
        await set.remove();
        return outcome;
      } finally {
        await Promise.all(nbds.map((n) => n.stop()));
      }
    },
  );
});
