// Failover and failback as an operator runs them: a two-disk set replicated through two cycles is
// failed over (ferry replicate is refused from then on, ferry checkpoints shows the event), blocks
// change on both sides, and ferry failback moves back exactly the 1 MiB chunks where the recovered
// images and the original disks differ, says why each moved, publishes the reverse set's
// checkpoint, leaves the original disks equal to the recovered images (cmp), and re-protects the set.
import { copyFile, mkdir, mkdtemp, open, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import type { RecoveryCheckpoint } from '../../shared/engine/ports.ts';
import { KiB, MiB } from '../../shared/engine/units.ts';
import { createDiskImage, mutateDisk } from '../../shared/local/workload.ts';
import { ferry, type Run, run } from '../support/ferry-cli.ts';

const SET = 'erp';
const DISKS = ['os', 'data'] as const;
const SIZES: Record<string, number> = { os: 6 * MiB, data: 8 * MiB };

interface World {
  dir: string;
  state: string;
  dr: string;
  src: (id: string) => string;
  replica: (id: string) => string;
  recovered: (id: string) => string;
}

const said = (r: Run) => `exit ${r.code ?? r.signal}\n${r.stdout}${r.stderr}`;

async function world(): Promise<World> {
  const dir = await mkdtemp(join(tmpdir(), 'ferry-failback-'));
  const w: World = {
    dir,
    state: join(dir, 'state'),
    dr: join(dir, 'dr'),
    src: (id) => join(dir, `${id}.img`),
    replica: (id) => join(dir, 'replica', `${id}.img`),
    recovered: (id) => join(dir, 'dr', `${id}.img`),
  };
  await mkdir(join(dir, 'replica'));
  await createDiskImage(w.src('os'), { size: SIZES.os!, seed: 31 });
  await createDiskImage(w.src('data'), { size: SIZES.data!, seed: 32 });
  return w;
}

/** One `ferry replicate` of the set: full the first time, then incremental from mutateDisk's change maps. */
async function cycle(w: World, seed: number, full: boolean): Promise<Run> {
  const disks = [];
  for (const id of DISKS) {
    let changed: string | undefined;
    if (!full) {
      const extents = await mutateDisk(w.src(id), {
        size: SIZES[id]!,
        seed: seed + id.length,
        smallWrites: 40,
      });
      changed = join(w.dir, `${id}.${seed}.json`);
      await writeFile(changed, JSON.stringify(extents));
    }
    disks.push({
      id,
      source: `file:${w.src(id)}`,
      target: `file:${w.replica(id)}`,
      ...(changed ? { changed } : {}),
    });
  }
  const job = join(w.dir, `job.${seed}.json`);
  await writeFile(job, JSON.stringify({ set: SET, disks }));
  return ferry(['replicate', '--job', job, '--state', w.state, '--json']);
}

/** Writes 4 KiB of `byte` at `offset` (inside one 1 MiB chunk). */
async function scribble(path: string, offset: number, byte: number): Promise<void> {
  const fh = await open(path, 'r+');
  try {
    await fh.write(Buffer.alloc(4 * KiB, byte), 0, 4 * KiB, offset);
  } finally {
    await fh.close();
  }
}

async function catalog(
  w: World,
  set: string,
): Promise<(RecoveryCheckpoint & { events: { type: string }[] })[]> {
  const r = await ferry(['checkpoints', '--state', w.state, '--set', set, '--json']);
  expect(r.code, said(r)).toBe(0);
  return JSON.parse(r.stdout);
}

describe('ferry recover --failover and ferry failback', () => {
  it('fails over, refuses replication, then moves back only the chunks that differ, bit-exact', async () => {
    // Prepare: two checkpoints, then a failover to the latest.
    const w = await world();
    expect((await cycle(w, 100, true)).code).toBe(0);
    expect((await cycle(w, 200, false)).code).toBe(0);
    const failover = await ferry(['recover', '--failover', '--set', SET, '--state', w.state, '--to', w.dr]);
    expect(failover.code, said(failover)).toBe(0);
    expect(failover.stdout).toMatch(
      /^set erp failed over to erp#2 \(.*\): its disks run from .*\/dr now; ferry replicate refuses the set until "ferry failback --set erp"/m,
    );
    for (const id of DISKS) expect((await run('cmp', [w.recovered(id), w.src(id)])).code).toBe(0);

    // A cycle into the failed-over set is refused, naming the set and the way out; nothing moves.
    const refused = await cycle(w, 300, false);
    expect(refused.code).toBe(2);
    expect(refused.stderr).toMatch(
      /^ferry: set erp is failed over \(failover to checkpoint erp#2 at .*; its disks run from .*\/dr\): replication into it is paused\. Fail it back with "ferry failback --set erp", or, .* "ferry recover --clear-failover --set erp"/m,
    );
    // A second failover is refused too, before anything is written.
    const again = await ferry([
      'recover',
      '--failover',
      '--set',
      SET,
      '--state',
      w.state,
      '--to',
      join(w.dir, 'dr2'),
    ]);
    expect(again.code).toBe(2);
    expect(again.stderr).toMatch(/^ferry: set erp is already failed over \(failover to checkpoint erp#2/);
    // ferry checkpoints shows the event with the checkpoint, and the set's state.
    const listed = await ferry(['checkpoints', '--state', w.state, '--set', SET]);
    expect(listed.stdout).toMatch(
      /^ {4}event failover .*: failed over to erp#2 \(.*\): 2 disk\(s\) in .*\/dr; replication paused$/m,
    );
    expect(listed.stdout).toMatch(/^set erp is FAILED OVER \(failover to erp#2 at .*\)/m);
    expect((await catalog(w, SET))[1]!.events.map((e) => e.type)).toEqual(['failover']);

    // The refused cycle's change maps were made by changing the sources (as a still-running original
    // would): for exact counts, put the originals back to erp#2 first, then change chosen chunks.
    for (const id of DISKS) await copyFile(w.recovered(id), w.src(id));
    // os: chunk 0 recovered only, chunk 2 both (different bytes), chunk 4 original only.
    await scribble(w.recovered('os'), 0 * MiB + 8 * KiB, 0xa1);
    await scribble(w.recovered('os'), 2 * MiB, 0xa2);
    await scribble(w.src('os'), 2 * MiB + 64 * KiB, 0xb2);
    await scribble(w.src('os'), 4 * MiB + 512 * KiB, 0xb4);
    // data: chunk 1 changed on both sides to the same bytes (nothing to move), chunk 7 original only.
    await scribble(w.recovered('data'), 1 * MiB, 0xc1);
    await scribble(w.src('data'), 1 * MiB, 0xc1);
    await scribble(w.src('data'), 7 * MiB + 4 * KiB, 0xd7);
    const expected = { os: join(w.dir, 'os.expected.img'), data: join(w.dir, 'data.expected.img') };
    for (const id of DISKS) await copyFile(w.recovered(id), expected[id]);

    // Act
    const back = await ferry(['failback', '--set', SET, '--state', w.state]);

    // Assess: what moved and why, exactly.
    expect(back.code, said(back)).toBe(0);
    expect(back.stdout).toMatch(
      /^disk os: 3 of 6 chunks moved \(3 MiB\) to .*\/os\.img: 1 changed on the recovered side, 1 changed on the original side, 1 changed on both sides$/m,
    );
    expect(back.stdout).toMatch(
      /^disk data: 1 of 8 chunks moved \(1 MiB\) to .*\/data\.img: 0 changed on the recovered side, 1 changed on the original side, 0 changed on both sides; 1 equal on both sides \(not moved\)$/m,
    );
    expect(back.stdout).toMatch(
      /^set erp failed back \(shared checkpoint erp#2\): published as erp-failback#1; original disks equal the recovered images \(14 regions compared\)$/m,
    );
    expect(back.stdout).toMatch(/^set erp re-protected as erp#3 \(.*\); replication resumed$/m);
    // Progress went to standard error: hashing, then the cycle's lines.
    expect(back.stderr).toMatch(/^disk os: hashing the recovered image \(0%\)$/m);
    expect(back.stderr).toMatch(/^disk os: hashing the original disk \(100%\)$/m);
    // Bit-exact, by cmp.
    for (const id of DISKS) {
      const cmp = await run('cmp', [w.src(id), expected[id]]);
      expect(cmp.code, `disk ${id}: ${cmp.stdout}`).toBe(0);
    }
    // The reverse set's checkpoint moved exactly those chunks, as an increment.
    const reverse = await catalog(w, 'erp-failback');
    expect(reverse.map((c) => c.id)).toEqual(['erp-failback#1']);
    expect(
      reverse[0]!.disks.map((d) => ({ disk: d.disk, kind: d.kind, bytes: d.bytes, chunks: d.chunks })),
    ).toEqual([
      { disk: 'os', kind: 'incremental', bytes: 3 * MiB, chunks: 3 },
      { disk: 'data', kind: 'incremental', bytes: 1 * MiB, chunks: 1 },
    ]);
    // The set's catalog shows the failback; the re-protecting cycle moved what the failover changed.
    const sets = await catalog(w, SET);
    expect(sets.map((c) => c.id)).toEqual(['erp#1', 'erp#2', 'erp#3']);
    expect(sets[1]!.events.map((e) => e.type)).toEqual(['failover', 'failback']);
    // Differ from erp#2 now: the recovered side's os chunks 0 and 2 and data chunk 1 (the original
    // side's os chunk 4 and data chunk 7 were put back as the recovered images have them).
    expect(sets[2]!.disks.map((d) => ({ disk: d.disk, kind: d.kind, bytes: d.bytes }))).toEqual([
      { disk: 'os', kind: 'incremental', bytes: 2 * MiB },
      { disk: 'data', kind: 'incremental', bytes: 1 * MiB },
    ]);
    const verify = await ferry(['verify', '--set', SET, '--state', w.state]);
    expect(verify.code, said(verify)).toBe(0);
    const reverseVerify = await ferry(['verify', '--set', 'erp-failback', '--state', w.state]);
    expect(reverseVerify.code, said(reverseVerify)).toBe(0);
    // The set replicates again, and its replica recovers to the originals as they are.
    expect((await cycle(w, 400, false)).code).toBe(0);
    const out = join(w.dir, 'out');
    expect((await ferry(['recover', '--set', SET, '--state', w.state, '--to', out])).code).toBe(0);
    for (const id of DISKS) expect((await run('cmp', [join(out, `${id}.img`), w.src(id)])).code).toBe(0);
    // Nothing is left to fail back.
    const none = await ferry(['failback', '--set', SET, '--state', w.state]);
    expect(none.code).toBe(2);
    expect(none.stderr).toBe(
      'ferry: set erp is not failed over: nothing to fail back (ferry recover --failover fails it over)\n',
    );
  });

  it('copies a disk in full when its original is gone, and says so; the other disk moves only what differs', async () => {
    // Prepare
    const w = await world();
    expect((await cycle(w, 100, true)).code).toBe(0);
    expect((await cycle(w, 200, false)).code).toBe(0);
    expect(
      (await ferry(['recover', '--failover', '--set', SET, '--state', w.state, '--to', w.dr])).code,
    ).toBe(0);
    await scribble(w.recovered('os'), 3 * MiB, 0xee);
    await rm(w.src('data'));
    // Act
    const back = await ferry([
      'failback',
      '--set',
      SET,
      '--state',
      w.state,
      '--reverse-set',
      'erp-home',
      '--no-resync',
    ]);
    // Assess
    expect(back.code, said(back)).toBe(0);
    expect(back.stdout).toMatch(
      /^disk os: 1 of 6 chunks moved \(1 MiB\) .*: 1 changed on the recovered side, 0/m,
    );
    expect(back.stdout).toMatch(
      /^disk data: copied in full \(8 MiB\): the original disk .*\/data\.img is missing$/m,
    );
    expect(back.stdout).toMatch(
      /^set erp: replication resumed, not re-protected \(not asked for \(--no-resync\)\)/m,
    );
    for (const id of DISKS) expect((await run('cmp', [w.src(id), w.recovered(id)])).code).toBe(0);
    const reverse = await catalog(w, 'erp-home');
    expect(reverse[0]!.disks.map((d) => d.kind)).toEqual(['incremental', 'full']);
  });

  it('--clear-failover resumes replication without a failback, and says so in the catalog', async () => {
    const w = await world();
    expect((await cycle(w, 100, true)).code).toBe(0);
    expect(
      (await ferry(['recover', '--failover', '--set', SET, '--state', w.state, '--to', w.dr])).code,
    ).toBe(0);
    const cleared = await ferry(['recover', '--clear-failover', '--set', SET, '--state', w.state]);
    expect(cleared.code, said(cleared)).toBe(0);
    expect(cleared.stdout).toMatch(
      /^set erp: failover mark cleared \(it was failed over to erp#1 into .*\); replication into it resumes$/m,
    );
    expect((await cycle(w, 200, false)).code).toBe(0);
    expect((await catalog(w, SET))[0]!.events.map((e) => e.type)).toEqual(['failover', 'failover-cleared']);
    const twice = await ferry(['recover', '--clear-failover', '--set', SET, '--state', w.state]);
    expect(twice.code).toBe(2);
    expect(twice.stderr).toBe('ferry: set erp is not failed over\n');
  });
});
