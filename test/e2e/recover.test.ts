// `ferry recover` as an operator runs it: a set of two disks replicated through five cycles (with a
// disk that grew and was re-seeded), every checkpoint written back out and compared with `cmp`
// against a copy of the source taken when it was published; retention with --retain, a crash in
// the middle of pruning, damaged history, and the refusals that protect the operator's files; and
// drills (--test): the disks served over NBD through a copy-on-write overlay, then all removed.
// The `ferry` binary runs where its surface (flags, exit status, what it prints) is what is
// checked; the cycles that build a catalog and most recoveries run the CLI's own functions
// (runLocalJob, recoverSet) in this process, since each spawn costs about a second of start-up.
import type { ChildProcess } from 'node:child_process';
import {
  copyFile,
  mkdir,
  mkdtemp,
  open,
  readdir,
  readFile,
  stat,
  truncate,
  writeFile,
} from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { recoverSet } from '../../cli/recover.ts';
import { parseJobSpec, runLocalJob } from '../../cli/run.ts';
import { ConfigError } from '../../shared/engine/errors.ts';
import type { RecoveryCheckpoint } from '../../shared/engine/ports.ts';
import { MiB } from '../../shared/engine/units.ts';
import { historyDir } from '../../shared/local/history.ts';
import { LocalStateStore } from '../../shared/local/state-dir.ts';
import { createDiskImage, mutateDisk } from '../../shared/local/workload.ts';
import { ferry, type Run, run } from '../support/ferry-cli.ts';

const SET = 'erp';
const DISKS = ['os', 'data'] as const;

interface World {
  dir: string;
  state: string;
  sizes: Record<string, number>;
  src: (id: string) => string;
  dst: (id: string) => string;
  asOf: (id: string, seq: number) => string;
  cycles: number;
}

async function world(): Promise<World> {
  const dir = await mkdtemp(join(tmpdir(), 'ferry-recover-'));
  const w: World = {
    dir,
    state: join(dir, 'state'),
    sizes: { os: 6 * MiB, data: 8 * MiB },
    src: (id) => join(dir, `${id}.img`),
    dst: (id) => join(dir, 'dr', `${id}.img`),
    asOf: (id, seq) => join(dir, `${id}.as-of-${seq}.img`),
    cycles: 0,
  };
  await mkdir(join(dir, 'dr'));
  await createDiskImage(w.src('os'), { size: w.sizes.os!, seed: 21 });
  await createDiskImage(w.src('data'), { size: w.sizes.data!, seed: 22 });
  return w;
}

const said = (r: Run) => `exit ${r.code ?? r.signal}\n${r.stdout}${r.stderr}`;

/**
 * One cycle of the set through a job file: the disks in `changed` incremental (their sources
 * changed first, with seed `seed`), the others full. In this process (runLocalJob, as `ferry
 * replicate --job` runs it) unless `cli` is set, or a crash or command-line flags are asked for.
 * On success, keeps a copy of each source as of the checkpoint.
 */
async function cycle(
  w: World,
  seed: number,
  opts: {
    incremental?: readonly string[];
    flags?: readonly string[];
    crashAt?: string;
    retain?: number;
  } = {},
): Promise<Run> {
  const incremental = opts.incremental ?? (w.cycles === 0 ? [] : DISKS);
  const disks = [];
  for (const id of DISKS) {
    let changed: string | undefined;
    if (incremental.includes(id)) {
      const extents = await mutateDisk(w.src(id), {
        size: w.sizes[id]!,
        seed: seed + id.length,
        smallWrites: 150,
        largeWrites: 2,
        largeSize: MiB,
      });
      changed = join(w.dir, `${id}.${seed}.json`);
      await writeFile(changed, JSON.stringify(extents));
    }
    disks.push({
      id,
      source: `file:${w.src(id)}`,
      target: `file:${w.dst(id)}`,
      ...(changed ? { changed } : {}),
    });
  }
  const job = join(w.dir, `job.${seed}.json`);
  // A count in the job file too: --retain on the command line overrides it.
  const spec = {
    set: SET,
    disks,
    params: { checkpointInterval: '1 MiB' },
    retain: { count: opts.retain ?? 24 },
  };
  await writeFile(job, JSON.stringify(spec));
  let r: Run;
  if (opts.flags === undefined && opts.crashAt === undefined) {
    const result = await runLocalJob(parseJobSpec(spec, `job file ${job}`), { stateDir: w.state });
    r = { code: 0, signal: null, stdout: JSON.stringify(result), stderr: '' };
  } else {
    r = await ferry(['replicate', '--job', job, '--state', w.state, '--json', ...(opts.flags ?? [])], {
      env: { ...process.env, ...(opts.crashAt ? { FERRY_TEST_CRASH_AT: opts.crashAt } : {}) },
    });
  }
  if (r.code === 0 || opts.crashAt !== undefined) {
    w.cycles++;
    for (const id of DISKS) await copyFile(w.src(id), w.asOf(id, w.cycles));
  }
  return r;
}

/** Five checkpoints: #1 full, #2 incremental, #3 with disk data grown (re-seeded in full), #4, #5. */
async function fiveCheckpoints(w: World): Promise<void> {
  for (const seed of [100, 200]) expect((await cycle(w, seed)).code).toBe(0);
  w.sizes.data = 12 * MiB;
  await truncate(w.src('data'), w.sizes.data);
  await mutateDisk(w.src('data'), {
    size: w.sizes.data,
    seed: 300,
    smallWrites: 50,
    largeWrites: 2,
    largeSize: MiB,
  });
  const grown = await cycle(w, 301, { incremental: ['os'] });
  expect(grown.code, said(grown)).toBe(0);
  expect((JSON.parse(grown.stdout) as { disks: { disk: string; kind: string }[] }).disks).toEqual([
    expect.objectContaining({ disk: 'os', kind: 'incremental' }),
    expect.objectContaining({ disk: 'data', kind: 'full' }),
  ]);
  for (const seed of [400, 500]) expect((await cycle(w, seed)).code).toBe(0);
}

function recover(w: World, to: string, ...choice: string[]): Promise<Run> {
  return ferry(['recover', '--set', SET, '--state', w.state, ...choice, '--to', to]);
}

let outputs = 0;

/**
 * Recovers checkpoint `seq` and compares each disk with `cmp` against the source as it was then:
 * through `ferry recover` when `cli` is set (its lines checked too), else with recoverSet.
 */
async function expectRecovered(
  w: World,
  seq: number,
  opts: { choice?: { checkpoint?: string; at?: string }; cli?: boolean } = {},
): Promise<void> {
  const to = join(w.dir, `out-${seq}-${++outputs}`);
  const choice = opts.choice ?? { checkpoint: String(seq) };
  if (opts.cli) {
    const flags = Object.entries(choice).flatMap(([k, v]) => [`--${k}`, v]);
    const r = await recover(w, to, ...flags);
    expect(r.code, said(r)).toBe(0);
    for (const id of DISKS) {
      expect(r.stdout).toMatch(
        new RegExp(
          `^disk ${id}: ${join(to, `${id}.img`)} \\(.*\\) verified against checkpoint erp#${seq} \\(\\d+ regions\\)$`,
          'm',
        ),
      );
    }
  } else {
    const r = await recoverSet({ set: SET, stateDir: w.state, choice, to });
    expect(r.checkpoint.id).toBe(`erp#${seq}`);
    expect(r.disks.map((d) => [d.disk, d.path])).toEqual(DISKS.map((id) => [id, join(to, `${id}.img`)]));
  }
  for (const id of DISKS) {
    const cmp = await run('cmp', [join(to, `${id}.img`), w.asOf(id, seq)]);
    expect(cmp.code, `disk ${id} of #${seq}: ${cmp.stdout}${cmp.stderr}`).toBe(0);
  }
  expect((await readdir(to)).sort()).toEqual(['data.img', 'os.img']);
}

/** The set's checkpoint ids, read from the state directory. */
const ids = async (w: World): Promise<string[]> =>
  (await new LocalStateStore(w.state).listCheckpoints(SET)).map((c) => c.id);

async function catalog(w: World): Promise<(RecoveryCheckpoint & { recovery: { recoverable: boolean } })[]> {
  const r = await ferry(['checkpoints', '--state', w.state, '--set', SET, '--json']);
  expect(r.code, said(r)).toBe(0);
  return JSON.parse(r.stdout);
}

describe('ferry recover', () => {
  it('writes every kept checkpoint of a two-disk set, each bit-exact against the source as it was', async () => {
    // Prepare
    const w = await world();
    await fiveCheckpoints(w);
    // Act and assess: by number, oldest first; then latest (the binary's default), an id and a time.
    for (let seq = 1; seq <= 5; seq++) await expectRecovered(w, seq);
    await expectRecovered(w, 5, { choice: { checkpoint: 'latest' } });
    await expectRecovered(w, 5, { choice: {}, cli: true });
    await expectRecovered(w, 3, { choice: { checkpoint: 'erp#3' } });
    const list = await catalog(w);
    const second = Date.parse(list[1]!.createdAt);
    await expectRecovered(w, 2, { choice: { at: new Date(second).toISOString() } });
    await expectRecovered(w, 2, {
      choice: { at: new Date(Date.parse(list[2]!.createdAt) - 1).toISOString() },
    });
    // Every checkpoint is listed as recoverable, and the plain listing carries no marker.
    expect(list.map((c) => c.recovery.recoverable)).toEqual([true, true, true, true, true]);
    const plain = await ferry(['checkpoints', '--state', w.state, '--set', SET]);
    expect(plain.stdout).not.toMatch(/not recoverable/);
    // The replicas still verify: recovering read them, never wrote them.
    const verify = await ferry(['verify', '--set', SET, '--state', w.state]);
    expect(verify.code, said(verify)).toBe(0);
  });

  it('refuses, before writing anything, an unknown checkpoint, a time before the first, and a file it would replace', async () => {
    // Prepare
    const w = await world();
    for (const seed of [100, 200]) expect((await cycle(w, seed)).code).toBe(0);
    const to = join(w.dir, 'out');
    // Act and assess: the binary says a refusal on one line and exits 2 (a ConfigError) ...
    const unknown = await recover(w, to, '--checkpoint', '7');
    expect(unknown.code).toBe(2);
    expect(unknown.stderr).toMatch(
      /^ferry: checkpoint 7 is not in the catalog: set erp has checkpoints erp#1 \(.*\) to erp#2 \(.*\)\n$/,
    );
    // ... and the same function refuses the others with a ConfigError (so exit 2) before writing.
    const refusal = (choice: { checkpoint?: string; at?: string }) =>
      recoverSet({ set: SET, stateDir: w.state, choice, to }).then(
        () => expect.unreachable('recovered'),
        (e: unknown) => e,
      );
    const early = await refusal({ at: '2000-01-01T00:00:00Z' });
    expect(early).toBeInstanceOf(ConfigError);
    expect((early as Error).message).toMatch(/^no checkpoint at or before 2000-01-01T00:00:00Z: set erp has/);
    const both = await refusal({ checkpoint: '1', at: '2000-01-01T00:00:00Z' });
    expect(both).toBeInstanceOf(ConfigError);
    expect((both as Error).message).toBe('give --checkpoint or --at, not both');
    expect(await stat(to).catch(() => undefined)).toBeUndefined();
    // An existing file of the same name is refused and left as it was; nothing else is written.
    await mkdir(to);
    await writeFile(join(to, 'data.img'), 'mine');
    const existing = await refusal({ checkpoint: '1' });
    expect(existing).toBeInstanceOf(ConfigError);
    expect((existing as Error).message).toBe(
      `${join(to, 'data.img')} exists: ferry recover writes new files only; give an empty --to`,
    );
    // While another process holds the set (a replicate or verify of it), recover is refused.
    const unlock = await new LocalStateStore(w.state).lockSet(SET);
    try {
      const busy = await recover(w, join(w.dir, 'busy'), '--checkpoint', '1');
      expect(busy.code).toBe(1);
      expect(busy.stderr).toMatch(new RegExp(`^ferry: set erp is in use by process ${process.pid} on `));
    } finally {
      await unlock();
    }
    expect(await stat(join(w.dir, 'busy')).catch(() => undefined)).toBeUndefined();
    // And a bad --retain or job file retention is refused before any data moves.
    const bad = await cycle(w, 300, { flags: ['--retain', '0'] });
    expect(bad.code).toBe(2);
    expect(bad.stderr).toMatch(
      /^ferry: --retain "0": give the number of checkpoints to keep recoverable, a whole number of at least 1\n$/,
    );
    const job = join(w.dir, 'bad-retain.json');
    await writeFile(
      job,
      JSON.stringify({
        set: SET,
        disks: [{ id: 'os', source: w.src('os'), target: w.dst('os') }],
        retain: { count: 0 },
      }),
    );
    const badJob = await ferry(['replicate', '--job', job, '--state', w.state]);
    expect(badJob.code).toBe(2);
    expect(badJob.stderr).toMatch(/^ferry: job file .*bad-retain\.json at retain\.count: must be at least 1/);
    expect(await ids(w)).toEqual(['erp#1', 'erp#2']);
  });

  it('with --retain 2, prunes older history; a pruned checkpoint is refused by name and marked in the listing', async () => {
    // Prepare
    const w = await world();
    await fiveCheckpoints(w);
    // Act: the sixth cycle keeps the last two.
    const sixth = await cycle(w, 600, { flags: ['--retain', '2'] });
    expect(sixth.code, said(sixth)).toBe(0);
    // Assess
    for (const id of DISKS) expect(await readdir(historyDir(w.dst(id)))).toEqual(['00000006']);
    await expectRecovered(w, 5);
    await expectRecovered(w, 6, { cli: true });
    const to = join(w.dir, 'pruned');
    const pruned = await recover(w, to, '--checkpoint', '4');
    expect(pruned.code).toBe(1);
    expect(pruned.stderr).toBe(
      `ferry: checkpoint erp#4, disk os: not recoverable any more: no history of erp#5 in ${historyDir(w.dst('os'))} (pruned by the retention setting, or never kept)\n`,
    );
    expect(await stat(to).catch(() => undefined)).toBeUndefined();
    const plain = await ferry(['checkpoints', '--state', w.state, '--set', SET]);
    const headers = plain.stdout.split('\n').filter((l) => l.startsWith('erp#'));
    expect(
      headers.map((l) =>
        l.endsWith(
          '[not recoverable: disk os has no history of erp#5 (pruned by the retention setting, or never kept)]',
        ),
      ),
    ).toEqual([false, false, false, true, false, false]);
    expect(headers.map((l) => l.includes('not recoverable'))).toEqual([true, true, true, true, false, false]);
  });

  it('after a crash in the middle of pruning, every kept checkpoint recovers, and the next run finishes the prune', async () => {
    // Prepare
    const w = await world();
    await fiveCheckpoints(w);
    // Act: the sixth cycle publishes, then dies (SIGKILL) once the first old entry is moved aside.
    const crashed = await cycle(w, 600, { flags: ['--retain', '3'], crashAt: 'mid-prune' });
    expect(crashed.signal, said(crashed)).toBe('SIGKILL');
    // Assess: #6 is published; #4..#6 (what --retain 3 keeps) recover bit-exact.
    expect(await ids(w)).toContain('erp#6');
    expect(await readdir(historyDir(w.dst('os')))).toContain('00000002.pruning');
    for (let seq = 4; seq <= 6; seq++) await expectRecovered(w, seq);
    // The next publication finishes it: only what #5..#7 need is left.
    const next = await cycle(w, 700, { retain: 3 });
    expect(next.code, said(next)).toBe(0);
    for (const id of DISKS) expect(await readdir(historyDir(w.dst(id)))).toEqual(['00000006', '00000007']);
    for (let seq = 5; seq <= 7; seq++) await expectRecovered(w, seq);
  });

  it('detects a changed history file at verification, names disk, checkpoint and offset, and leaves nothing in --to', async () => {
    // Prepare: three checkpoints; one byte of what #3 overwrote of disk data is changed.
    const w = await world();
    for (const seed of [100, 200, 300]) expect((await cycle(w, seed)).code).toBe(0);
    const undo = join(historyDir(w.dst('data')), '00000003', 'undo');
    const fh = await open(undo, 'r+');
    const head = Buffer.alloc(16);
    await fh.read(head, 0, 16, 0);
    const count = Number(head.readBigUInt64LE(0));
    const offset = Number(head.readBigUInt64LE(8));
    const byte = Buffer.alloc(1);
    await fh.read(byte, 0, 1, 8 + count * 16);
    await fh.write(Buffer.from([byte[0]! ^ 0x80]), 0, 1, 8 + count * 16);
    await fh.close();
    const to = join(w.dir, 'out');
    // Act
    const r = await recover(w, to, '--checkpoint', '2');
    // Assess
    expect(r.code).toBe(1);
    const region = Math.floor(offset / MiB) * MiB;
    // Progress lines first (standard error is no terminal here), then the one line that says why.
    expect(r.stderr).toMatch(/^disk os: copying the image/);
    expect(r.stderr.split('\n').at(-2)).toBe(
      `ferry: checkpoint erp#2, disk data: the materialised image does not match the checkpoint's manifest at offset ${region}: the history or the image was altered; nothing was kept`,
    );
    expect(await stat(to).catch(() => undefined)).toBeUndefined();
    // A checkpoint that does not need the changed record still recovers.
    await expectRecovered(w, 3);
  });
});

describe('ferry recover --test (a drill)', () => {
  it('serves the checkpoint over NBD through a copy-on-write overlay, then removes every server and file', async () => {
    // Prepare: two checkpoints; the drill serves #1.
    const w = await world();
    for (const seed of [100, 200]) expect((await cycle(w, seed)).code).toBe(0);
    const drillDir = join(w.dir, 'drill');
    const untouched = [w.dst('os'), w.dst('data'), `${w.dst('os')}.ferry-manifest`];
    const before = await Promise.all(untouched.map((p) => readFile(p)));
    let child: ChildProcess | undefined;
    let stdout = '';
    let onReady = () => {};
    const ready = new Promise<void>((resolve) => {
      onReady = resolve;
    });
    const finished = ferry(
      [
        'recover',
        '--test',
        '--ttl',
        '10m',
        '--set',
        SET,
        '--state',
        w.state,
        '--checkpoint',
        '1',
        '--to',
        drillDir,
      ],
      {
        onSpawn: (c) => {
          child = c;
          c.stdout?.on('data', (b: Buffer) => {
            stdout += b;
            if (/^disk data: nbd:/m.test(stdout) && /^disk os: nbd:/m.test(stdout)) onReady();
          });
        },
      },
    );
    try {
      // A drill that ends early fails the assertions below rather than hanging here.
      await Promise.race([ready, finished]);
      const uri = (disk: string) =>
        new RegExp(`^disk ${disk}: (nbd://127\\.0\\.0\\.1:\\d+) \\(nbdkit pid (\\d+)\\)$`, 'm').exec(stdout);
      const os = uri('os');
      const data = uri('data');
      expect(os, stdout).not.toBeNull();
      expect(data, stdout).not.toBeNull();
      // Act: a test machine overwrites disk os through NBD, then reads it back.
      const written = join(w.dir, 'written.img');
      await createDiskImage(written, { size: w.sizes.os!, seed: 99, allocated: 1 });
      const put = await run('nbdcopy', [written, os![1]!]);
      expect(put.code, put.stderr).toBe(0);
      const readBack = join(w.dir, 'read-back.img');
      const get = await run('nbdcopy', [os![1]!, readBack]);
      expect(get.code, get.stderr).toBe(0);
      // Assess: the writes are visible through NBD, and nothing under it changed.
      expect((await run('cmp', [readBack, written])).code).toBe(0);
      expect((await run('cmp', [join(drillDir, 'os.img'), w.asOf('os', 1)])).code).toBe(0);
      const after = await Promise.all(untouched.map((p) => readFile(p)));
      for (const [i, b] of after.entries()) expect(b.equals(before[i]!), untouched[i]).toBe(true);
      // Ctrl-C ends the drill: the servers are gone and so is everything it wrote.
      child!.kill('SIGINT');
      const end = await finished;
      expect(end.code, said(end)).toBe(0);
      expect(end.stdout).toMatch(
        /^drill ended \(SIGINT\): 2 NBD server\(s\) stopped and gone, .*nothing of the drill remains$/m,
      );
      expect(await stat(drillDir).catch(() => undefined)).toBeUndefined();
      for (const pid of [os![2]!, data![2]!]) expect(() => process.kill(Number(pid), 0)).toThrow(/ESRCH/);
    } finally {
      child?.kill('SIGKILL');
    }
  });

  it('ends by itself at its TTL and leaves nothing behind', async () => {
    const w = await world();
    expect((await cycle(w, 100)).code).toBe(0);
    const drillDir = join(w.dir, 'drill');
    const r = await ferry([
      'recover',
      '--test',
      '--ttl',
      '1s',
      '--set',
      SET,
      '--state',
      w.state,
      '--to',
      drillDir,
    ]);
    expect(r.code, said(r)).toBe(0);
    expect(r.stdout).toMatch(/^disk os: nbd:\/\/127\.0\.0\.1:\d+ \(nbdkit pid \d+\)$/m);
    expect(r.stdout).toMatch(
      /^drill ended \(its TTL passed\): 2 NBD server\(s\) stopped and gone, .*nothing of the drill remains$/m,
    );
    expect(await stat(drillDir).catch(() => undefined)).toBeUndefined();
    const bad = await ferry([
      'recover',
      '--test',
      '--ttl',
      'forever',
      '--set',
      SET,
      '--state',
      w.state,
      '--to',
      drillDir,
    ]);
    expect(bad.code).toBe(2);
    expect(bad.stderr).toMatch(/^ferry: --ttl "forever": give how long the drill lasts, from 1s to 7d/);
  });
});
