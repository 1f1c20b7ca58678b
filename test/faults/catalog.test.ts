// Fault matrix: one damaged entry in the checkpoint catalog. The catalog must tolerate it: report
// it by file name and keep working with the intact entries; but it must never pick a base that is
// not the real last checkpoint, so a damaged LATEST entry refuses incrementals.
import { readdir, readFile, truncate } from 'node:fs/promises';
import { dirname } from 'node:path';
import { describe, expect } from 'vitest';
import { describeRun, difference, FaultSet, faultCase, ferry, reportTable } from './support.ts';

/** A one-disk set with three published checkpoints: a full copy and two incrementals. */
async function threeCheckpoints(name: string, seed: number): Promise<FaultSet> {
  const set = await FaultSet.create(name, { seed });
  await set.seed();
  await set.mutate(seed);
  await set.cycle('second checkpoint');
  await set.mutate(seed + 1);
  await set.cycle('third checkpoint');
  expect(set.published).toEqual([`${name}#1`, `${name}#2`, `${name}#3`]);
  return set;
}

const said = (r: { stdout: string; stderr: string }) => `${r.stdout}\n${r.stderr}`;

describe('a damaged checkpoint catalog entry', () => {
  reportTable('a damaged checkpoint catalog entry');

  faultCase(
    'oldest catalog entry emptied',
    'catalog/<set>/00000001.json truncated to 0 bytes, 3 checkpoints',
    async (row) => {
      const set = await threeCheckpoints('cat-oldest', 41);
      const damaged = set.catalogFile(1);
      await truncate(damaged, 0);
      set.published = set.published.slice(1);

      // checkpoints: the intact entries, and the damaged file named.
      const listing = await set.checkpoints();
      expect(listing.ids).toEqual(['cat-oldest#2', 'cat-oldest#3']);
      expect(said(listing.run), 'checkpoints --json names the damaged file').toMatch(/00000001\.json/);
      const plain = await ferry(['checkpoints', '--state', set.state, '--set', set.set]);
      expect(plain.code, describeRun(plain)).toBe(0);
      expect(plain.stdout).toMatch(/cat-oldest#3/);
      expect(said(plain), 'checkpoints names the damaged file').toMatch(/00000001\.json/);

      // verify: the latest checkpoint still verifies.
      const verify = await ferry(['verify', '--set', set.set, '--state', set.state]);
      expect(verify.code, describeRun(verify)).toBe(0);
      expect(said(verify), 'verify names the damaged file').toMatch(/00000001\.json/);

      // replicate: the next incremental builds on #3 and publishes #4.
      await set.mutate(43);
      const run = await set.replicate();
      expect(said(run), 'replicate names the damaged file').toMatch(/00000001\.json/);
      const outcome = await set.checkContract(run);
      expect(set.published.at(-1)).toBe('cat-oldest#4');
      row.note('checkpoints, verify and replicate name 00000001.json');
      await set.remove();
      return outcome;
    },
  );

  faultCase(
    'latest catalog entry truncated',
    'catalog/<set>/00000003.json cut in half (a torn write), then an incremental, then a full copy',
    async (row) => {
      const set = await threeCheckpoints('cat-latest', 44);
      const damaged = set.catalogFile(3);
      const text = await readFile(damaged, 'utf8');
      await truncate(damaged, Math.floor(text.length / 2));
      set.published = set.published.slice(0, 2);

      const listing = await set.checkpoints();
      expect(listing.ids).toEqual(['cat-latest#1', 'cat-latest#2']);
      expect(said(listing.run), 'checkpoints names the damaged file').toMatch(/00000003\.json/);

      // An incremental on top of #3 must be refused: #2 is not what the replica holds.
      await set.mutate(46);
      const inc = await set.replicate();
      expect(inc.code, `the incremental must be refused: ${describeRun(inc)}`).not.toBe(0);
      expect(inc.signal).toBeNull();
      expect(inc.stderr, 'the refusal names the damaged file').toMatch(/00000003\.json/);
      expect(await catalogFiles(damaged), 'nothing new is published').toEqual([
        '00000001.json',
        '00000002.json',
        '00000003.json',
      ]);
      for (const d of set.disks) {
        const diff = await difference(d.shadow, d.replica);
        expect(diff === undefined, `the refused incremental changed the replica of ${d.id}: ${diff}`).toBe(
          true,
        );
      }

      // A full copy re-seeds the set: it publishes bit-exact, or refuses naming the file and
      // leaves the replica alone (the contract either way).
      for (const d of set.disks) d.changed = undefined;
      const full = await set.replicate();
      if (full.code === 0) {
        const after = await set.checkpoints();
        const fresh = after.ids.filter((id) => !set.published.includes(id));
        expect(fresh, 'the full copy publishes one checkpoint').toHaveLength(1);
        await set.assertBitExact(`full copy after a damaged latest entry (${fresh[0]})`);
        row.note(`full copy then published ${fresh[0]} bit-exact`);
      } else {
        expect(full.stderr, `a refused full copy names the damaged file: ${describeRun(full)}`).toMatch(
          /00000003\.json/,
        );
        await set.assertHoldsPrevious('refused full copy');
        row.note('full copy refused too, naming the file');
      }
      await set.remove();
      return 'incremental refused naming 00000003.json, nothing published, replica untouched';
    },
  );
});

async function catalogFiles(entry: string): Promise<string[]> {
  return (await readdir(dirname(entry))).filter((f) => /^\d+\.json$/.test(f)).sort();
}
