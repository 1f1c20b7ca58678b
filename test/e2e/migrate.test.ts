// Migration (a planned cutover): one last incremental cycle, a failover to exactly the checkpoint it
// published, and the data-loss window checked by re-reading every source against that checkpoint.
// As an operator runs it (a quiesced source: zero), and in process with a write landing after the
// final cycle read the source (not zero, and which regions).
import { closeSync, openSync, writeSync } from 'node:fs';
import { copyFile, mkdir, mkdtemp, readFile, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { migrateSet } from '../../cli/recovery-modes.ts';
import { parseJobSpec } from '../../cli/run.ts';
import { KiB, MiB } from '../../shared/engine/units.ts';
import { createDiskImage, mutateDisk } from '../../shared/local/workload.ts';
import { ferry, type Run, run } from '../support/ferry-cli.ts';

const SET = 'crm';
const DISKS = ['os', 'data'] as const;
const SIZES: Record<string, number> = { os: 5 * MiB, data: 7 * MiB + 512 * KiB };

const said = (r: Run) => `exit ${r.code ?? r.signal}\n${r.stdout}${r.stderr}`;

async function world() {
  const dir = await mkdtemp(join(tmpdir(), 'ferry-migrate-'));
  await mkdir(join(dir, 'replica'));
  const src = (id: string) => join(dir, `${id}.img`);
  for (const [i, id] of DISKS.entries()) await createDiskImage(src(id), { size: SIZES[id]!, seed: 40 + i });
  const job = join(dir, 'job.json');
  const disks = DISKS.map((id) => ({
    id,
    source: `file:${src(id)}`,
    target: `file:${join(dir, 'replica', `${id}.img`)}`,
  }));
  await writeFile(job, JSON.stringify({ set: SET, disks }));
  return { dir, state: join(dir, 'state'), job, src, to: join(dir, 'dr'), disks };
}

describe('ferry migrate', () => {
  it('runs a last incremental cycle (change maps derived by hashing), fails over to it, and finds a zero data-loss window', async () => {
    // Prepare: a first (full) checkpoint, then the sources change without change maps.
    const w = await world();
    const first = await ferry(['replicate', '--job', w.job, '--state', w.state, '--json']);
    expect(first.code, said(first)).toBe(0);
    for (const id of DISKS)
      await mutateDisk(w.src(id), { size: SIZES[id]!, seed: 7 + id.length, smallWrites: 6, largeWrites: 0 });
    // Act
    const r = await ferry(['migrate', '--job', w.job, '--state', w.state, '--to', w.to]);
    // Assess
    expect(r.code, said(r)).toBe(0);
    expect(r.stderr).toMatch(
      /^disk os: change map derived: \d+ region\(s\) of the source differ from crm#1's manifest$/m,
    );
    expect(r.stdout).toMatch(/^checkpoint crm#2 published: 2 disk\(s\)/m);
    expect(r.stdout).toMatch(/^ {2}os: incremental, /m);
    expect(r.stdout).toMatch(/^ {2}data: incremental, /m);
    expect(r.stdout).toMatch(/^set crm migrated to crm#2: its disks run from .*\/dr now/m);
    expect(r.stdout).toMatch(
      /^data-loss window: zero \(checked: every 1 MiB region of each source disk, read after the failover, hashed \(SHA-256\) and compared with crm#2's manifest, at .*: all equal\)$/m,
    );
    for (const id of DISKS) expect((await run('cmp', [join(w.to, `${id}.img`), w.src(id)])).code).toBe(0);
    // The set is failed over: replication is refused; the catalog holds the migration with its check.
    const again = await ferry(['replicate', '--job', w.job, '--state', w.state]);
    expect(again.code).toBe(2);
    expect(again.stderr).toMatch(/^ferry: set crm is failed over \(migration to checkpoint crm#2/);
    const listed = await ferry(['checkpoints', '--set', SET, '--state', w.state, '--json']);
    const events = (
      JSON.parse(listed.stdout) as { id: string; events: { type: string; summary: string }[] }[]
    )[1]!.events;
    expect(events.map((e) => e.type)).toEqual(['migration']);
    expect(events[0]!.summary).toMatch(/data-loss window zero/);
    // A second migration is refused before any cycle.
    const twice = await ferry(['migrate', '--job', w.job, '--state', w.state, '--to', join(w.dir, 'dr2')]);
    expect(twice.code).toBe(2);
    expect(twice.stderr).toMatch(/^ferry: set crm is failed over/);
  });

  it('reports a non-zero window, with the regions, when a source is written after the cycle read it', async () => {
    // Prepare
    const w = await world();
    expect((await ferry(['replicate', '--job', w.job, '--state', w.state])).code).toBe(0);
    const spec = parseJobSpec(JSON.parse(await readFile(w.job, 'utf8')), 'job');
    const before = join(w.dir, 'data.before.img');
    await copyFile(w.src('data'), before);
    // Act: once the final cycle is published, the (not quiesced) source takes a write in its 3rd MiB.
    const result = await migrateSet(spec, {
      stateDir: w.state,
      to: w.to,
      // Synchronous, so the write is on disk before the migration goes on.
      onEvent: (e) => {
        if (e.type !== 'published') return;
        const fd = openSync(w.src('data'), 'r+');
        writeSync(fd, Buffer.alloc(4 * KiB, 0x5a), 0, 4 * KiB, 2 * MiB + 100 * KiB);
        closeSync(fd);
      },
    });
    // Assess: the checkpoint has the data as it was read; the check finds the one changed region.
    expect(result.changeMaps.map((m) => [m.disk, m.how, m.regions])).toEqual([
      ['os', 'derived', 0],
      ['data', 'derived', 0],
    ]);
    expect(result.dataLoss.zero).toBe(false);
    expect(result.dataLoss.disks).toEqual([
      expect.objectContaining({ disk: 'os', changedRegions: 0, changedBytes: 0 }),
      expect.objectContaining({
        disk: 'data',
        regions: 8,
        changedRegions: 1,
        changedBytes: MiB,
        firstChangedOffset: 2 * MiB,
      }),
    ]);
    expect((await run('cmp', [join(w.to, 'data.img'), before])).code).toBe(0);
    expect(result.event.summary).toMatch(
      /data-loss window NOT zero: disk data 1 region\(s\) changed after the final cycle read them/,
    );
  });
});
