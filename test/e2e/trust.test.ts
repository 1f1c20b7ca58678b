// The promises an operator relies on, through the `ferry` command: disks that would overwrite each
// other are refused at planning, an unwritable state or target is found before any data moves, and
// a damaged catalog entry is reported without making the catalog unusable (or silently replaced).
import { copyFile, mkdtemp, readdir, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { MiB } from '../../shared/engine/units.ts';
import { createDiskImage, firstDifference, mutateDisk } from '../../shared/local/workload.ts';
import { ferry } from '../support/ferry-cli.ts';

async function twoDisks() {
  const dir = await mkdtemp(join(tmpdir(), 'ferry-trust-'));
  const src = (id: string) => join(dir, `${id}.img`);
  await createDiskImage(src('os'), { size: 4 * MiB, seed: 1 });
  await createDiskImage(src('data'), { size: 6 * MiB, seed: 2 });
  return { dir, src, state: join(dir, 'state') };
}

describe('ferry replicate refuses what would destroy data, before any data moves', () => {
  it('refuses two disks on one target file, naming both, and a source that is its own target', async () => {
    const { dir, src, state } = await twoDisks();
    const job = join(dir, 'job.json');
    await writeFile(
      job,
      JSON.stringify({
        set: 'erp',
        disks: [
          { id: 'os', source: `file:${src('os')}`, target: `file:${join(dir, 'dr.img')}` },
          // The same file through another spelling of its path.
          { id: 'data', source: `file:${src('data')}`, target: `file:${dir}/./dr.img` },
        ],
      }),
    );
    const shared = await ferry(['replicate', '--job', job, '--state', state]);
    expect(shared.code).toBe(2);
    expect(shared.stderr.trim()).toMatch(/^ferry: disks os and data have the same target file/);
    expect((await readdir(dir)).filter((f) => f.startsWith('dr.img'))).toEqual([]);

    const self = await ferry([
      'replicate',
      '--source',
      src('os'),
      '--target',
      `file:${src('os')}`,
      '--state',
      state,
    ]);
    expect(self.code).toBe(2);
    expect(self.stderr.trim()).toMatch(/^ferry: disk disk0: source and target are the same file/);
  });

  it('finds an unwritable state directory or target before copying, with the real cause', async () => {
    const { dir, src } = await twoDisks();
    await writeFile(join(dir, 'plain-file'), 'x');
    const state = await ferry([
      'replicate',
      '--source',
      src('os'),
      '--target',
      join(dir, 'out.img'),
      '--state',
      join(dir, 'plain-file', 'state'),
    ]);
    expect(state.code).toBe(1);
    expect(state.stderr.trim()).toMatch(
      /^ferry: state directory .*plain-file\/state is not writable: ENOTDIR/,
    );
    expect((await readdir(dir)).filter((f) => f.startsWith('out.img'))).toEqual([]);

    const target = await ferry([
      'replicate',
      '--source',
      src('os'),
      '--disk',
      'os',
      '--target',
      join(dir, 'plain-file', 'os.img'),
      '--state',
      join(dir, 'state'),
    ]);
    expect(target.code).toBe(1);
    expect(target.stderr.trim()).toMatch(
      /^ferry: disk os: target .*plain-file\/os\.img cannot be written: ENOTDIR/,
    );
  });
});

describe('a damaged catalog entry', () => {
  async function threeCheckpoints() {
    const { dir, src, state } = await twoDisks();
    const dst = join(dir, 'os.dr.img');
    const base = ['replicate', '--source', src('os'), '--target', dst, '--disk', 'os', '--state', state];
    expect((await ferry(base)).code).toBe(0);
    const changes = async (seed: number) => {
      const file = join(dir, `changes.${seed}.json`);
      await writeFile(
        file,
        JSON.stringify(await mutateDisk(src('os'), { size: 4 * MiB, seed, smallWrites: 50 })),
      );
      return file;
    };
    for (const seed of [5, 6])
      expect((await ferry([...base, '--changed', await changes(seed)])).code).toBe(0);
    const entry = (n: number) => join(state, 'catalog', 'default', `0000000${n}.json`);
    return { dir, src, dst, state, base, changes, entry };
  }

  it('when it is the oldest: reported by name, and checkpoints, verify and replicate keep working', async () => {
    const { src, dst, state, base, changes, entry } = await threeCheckpoints();
    await writeFile(entry(1), '');
    const list = await ferry(['checkpoints', '--state', state, '--json']);
    expect(list.code).toBe(0);
    expect((JSON.parse(list.stdout) as { id: string }[]).map((c) => c.id)).toEqual([
      'default#2',
      'default#3',
    ]);
    expect(list.stderr).toContain(`catalog entry ${entry(1)} (checkpoint #1 of set default) is damaged`);
    const verify = await ferry(['verify', '--state', state]);
    expect(verify.code).toBe(0);
    expect(verify.stdout).toMatch(/disk os: OK .*default#3/);
    const next = await ferry([...base, '--changed', await changes(7)]);
    expect(next.code, next.stderr).toBe(0);
    expect(next.stdout).toMatch(/checkpoint default#4 published/);
    expect(await firstDifference(src('os'), dst)).toBeUndefined();
  });

  it('when it is the latest: incrementals are refused with the remedy, a full copy starts the next one', async () => {
    const { src, dst, state, base, changes, entry } = await threeCheckpoints();
    const before = join(state, 'before.img');
    await copyFile(dst, before);
    await writeFile(entry(3), '{"id": "default#3", "set": "def');
    const inc = await ferry([...base, '--changed', await changes(8)]);
    expect(inc.code).not.toBe(0);
    expect(inc.stderr.trim().split('\n').at(-1)).toMatch(
      new RegExp(
        `^ferry: catalog entry ${entry(3)} \\(checkpoint #3\\) is damaged: .*restore the file from a backup, or run a full copy`,
      ),
    );
    expect(await firstDifference(before, dst)).toBeUndefined(); // nothing moved
    const full = await ferry(base);
    expect(full.code, full.stderr).toBe(0);
    expect(full.stdout).toMatch(/checkpoint default#4 published/);
    expect(await firstDifference(src('os'), dst)).toBeUndefined();
  });
});
