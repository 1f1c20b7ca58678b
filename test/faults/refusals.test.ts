// Fault matrix: jobs that must be refused before any data moves, naming what is wrong: a change map
// reaching past the end of the disk, two disks of one job on one target file (also when the two
// paths are spelled differently), a target that is the source itself. Nothing is published, the
// previous checkpoint still verifies and its images are untouched, and the corrected job then
// publishes bit-exact.
import { copyFile, symlink, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect } from 'vitest';
import {
  describeRun,
  difference,
  exists,
  FaultSet,
  faultCase,
  ferry,
  MiB,
  type Run,
  reportTable,
} from './support.ts';

/** A refusal: a clean failure (no signal), one line naming every one of `names`. */
function expectRefused(run: Run, names: readonly (string | RegExp)[]): void {
  expect(run.signal, describeRun(run)).toBeNull();
  expect(run.code, `must be refused: ${describeRun(run)}`).not.toBe(0);
  expect(run.stderr, `one clear line: ${describeRun(run)}`).toMatch(/^ferry: \S/m);
  for (const name of names) expect(run.stderr, `the refusal names ${name}`).toMatch(name);
}

const exitNote = (run: Run) => `exit ${run.code}: ${run.stderr.trim().split('\n').at(-1)?.slice(0, 90)}`;

describe('jobs refused at planning', () => {
  reportTable('jobs refused at planning');

  for (const bad of [
    { name: 'change map far beyond the disk', extent: { offset: 1e15, length: 4096 } },
    { name: 'change map crossing the end of the disk', extent: { offset: 16 * MiB - 4096, length: 8192 } },
  ]) {
    faultCase(
      bad.name,
      `extent {offset: ${bad.extent.offset}, length: ${bad.extent.length}} on a 16 MiB disk, then the right map`,
      async (row) => {
        const set = await FaultSet.create(bad.name.replaceAll(' ', '-'), { seed: 71 });
        await set.seed();
        await set.mutate(71);
        const d = set.disks[0]!;
        const right = d.changed!;
        d.changed = join(set.dir, 'wrong-map.json');
        await writeFile(d.changed, JSON.stringify([{ offset: 0, length: 4096 }, bad.extent]));
        const run = await set.replicate();
        expectRefused(run, [/disk d0\b/, new RegExp(String(bad.extent.offset))]);
        row.note(exitNote(run));
        const outcome = await set.checkContract(run, {
          rerun: () => {
            d.changed = right;
            return set.replicateHere();
          },
        });
        await set.remove();
        return outcome.replace('rerun', 'rerun with the right map');
      },
    );
  }

  faultCase(
    'two disks on one target, first copy',
    'job: disks alpha and beta both -> file:DIR/shared.img, no checkpoint yet',
    async (row) => {
      const set = await FaultSet.create('one-target-full', { disks: ['alpha', 'beta'], seed: 72 });
      const shared = join(set.dir, 'replica', 'shared.img');
      for (const d of set.disks) d.target = `file:${shared}`;
      const run = await set.replicate();
      expectRefused(run, [/\balpha\b/, /\bbeta\b/]);
      row.note(exitNote(run));
      expect(await exists(shared), 'the refused job must not create the target').toBe(false);
      expect((await set.checkpoints()).ids).toEqual([]);
      await set.remove();
      return 'refused naming both disks, nothing written or published';
    },
  );

  for (const alias of ['same path', 'path spelled differently', 'symlink']) {
    faultCase(
      `two disks on one target, incremental (${alias})`,
      `alpha -> X and beta -> X (${alias}) with change maps, after a checkpoint of alpha -> X, beta -> Y`,
      async (row) => {
        const name = `one-target-${alias.replaceAll(' ', '-')}`;
        const set = await FaultSet.create(name, { disks: ['alpha', 'beta'], seed: 73 });
        await set.seed();
        await set.mutate(73);
        const [alpha, beta] = set.disks as [(typeof set.disks)[0], (typeof set.disks)[0]];
        const own = beta.target;
        if (alias === 'same path') beta.target = alpha.target;
        else if (alias === 'path spelled differently') {
          beta.target = `file:${join(set.dir, 'replica')}/./../replica//${alpha.id}.img`;
        } else {
          const link = join(set.dir, 'replica', 'alias.img');
          await symlink(alpha.replica, link);
          beta.target = `file:${link}`;
        }
        const run = await set.replicate();
        expectRefused(run, [/\balpha\b/, /\bbeta\b/]);
        row.note(exitNote(run));
        const outcome = await set.checkContract(run, {
          rerun: () => {
            beta.target = own;
            return set.replicateHere();
          },
        });
        await set.remove();
        return outcome
          .replace('refused', 'refused naming both disks')
          .replace('rerun', 'rerun with own targets');
      },
    );
  }

  faultCase(
    'target is the source',
    '--source file:X --target file:X, and the same through a symlink',
    async (row) => {
      const set = await FaultSet.create('source-is-target', { seed: 74 });
      const d = set.disks[0]!;
      const pristine = join(set.dir, 'pristine.img');
      await copyFile(d.source, pristine);
      const link = join(set.dir, 'source-link.img');
      await symlink(d.source, link);
      for (const target of [d.source, link]) {
        const run = await ferry([
          'replicate',
          '--source',
          `file:${d.source}`,
          '--target',
          `file:${target}`,
          '--state',
          set.state,
          '--set',
          set.set,
          '--disk',
          d.id,
        ]);
        expectRefused(run, [/disk d0\b/]);
        row.note(`${target === link ? 'symlink' : 'same path'}: ${exitNote(run)}`);
        const diff = await difference(pristine, d.source);
        expect(diff === undefined, `the refused job changed the source: ${diff}`).toBe(true);
      }
      expect((await set.checkpoints()).ids).toEqual([]);
      await set.remove();
      return 'refused naming the disk, source untouched, nothing published';
    },
  );

  for (const resize of [
    { name: 'grown', size: 24 * MiB },
    { name: 'shrunk', size: 8 * MiB },
  ]) {
    faultCase(
      `disk ${resize.name} since the last checkpoint`,
      `16 MiB disk ${resize.name} to ${resize.size / MiB} MiB, incremental with a map inside it; then a full copy`,
      async (row) => {
        const set = await FaultSet.create(`resized-${resize.name}`, { seed: 75 });
        await set.seed();
        const d = set.disks[0]!;
        await set.mutate(75, { size: Math.min(set.size, resize.size), smallWrites: 50, largeWrites: 1 });
        await truncate(d.source, resize.size);
        const run = await set.replicate();
        expectRefused(run, [/disk d0\b|d0\.img/]);
        row.note(exitNote(run));
        const outcome = await set.checkContract(run, {
          rerun: () => {
            d.changed = undefined;
            return set.replicateHere();
          },
        });
        await set.remove();
        return outcome.replace('rerun', 'full copy');
      },
    );
  }
});
