// The `ferry` command as an operator runs it: the README's `npm start`, replicate, checkpoints,
// verify, errors, and a run killed with SIGKILL that resumes from its last intermediate checkpoint.
import type { ChildProcess } from 'node:child_process';
import { mkdtemp, open, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, relative } from 'node:path';
import { describe, expect, it } from 'vitest';
import { parseJobSpec, runLocalJob } from '../../cli/run.ts';
import type { ReplicationResult } from '../../shared/engine/replicate.ts';
import { MiB } from '../../shared/engine/units.ts';
import { createDiskImage, firstDifference, mutateDisk } from '../../shared/local/workload.ts';
import { type Run, run, ferry as runFerry } from '../support/ferry-cli.ts';
import { startNbdkit } from '../support/nbdkit.ts';

function ferry(args: string[], onSpawn?: (child: ChildProcess) => void) {
  return runFerry(args, onSpawn ? { onSpawn } : {});
}

async function workdir(): Promise<string> {
  return mkdtemp(join(tmpdir(), 'ferry-cli-'));
}

describe('ferry CLI', () => {
  it('prints help', async () => {
    const r = await ferry(['--help']);
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/replicate/);
    expect(r.stdout).toMatch(/checkpoints/);
    expect(r.stdout).toMatch(/verify/);
    expect(r.stdout).toMatch(/demo/);
  });

  it("runs the README's main command exactly as written: `npm start`, three cycles, every replica verified", async () => {
    // Act: what the Quick start says to type, in the repository root, with no flags of our own.
    const r = await run('npm', ['start']);
    const dir = /^ferry demo in (\S+)$/m.exec(r.stdout)?.[1];
    try {
      // Assess
      expect(r.code, r.stdout + r.stderr).toBe(0);
      expect(dir).toBeDefined();
      // Progress: each disk planned and completed in each cycle, and live lines in between.
      for (const disk of ['os', 'data', 'logs']) {
        expect(r.stdout.match(new RegExp(`^disk ${disk}: full copy, `, 'gm'))).toHaveLength(1);
        expect(r.stdout.match(new RegExp(`^disk ${disk}: incremental copy, `, 'gm'))).toHaveLength(2);
        expect(r.stdout.match(new RegExp(`^disk ${disk}: complete and verified`, 'gm'))).toHaveLength(3);
      }
      expect(r.stdout).toMatch(/^disk \w+: [\d.]+ \w*B \/ [\d.]+ \w*B \(\d+%\) /m);
      // Three cycles, each published and each replica compared with its source byte for byte.
      for (const n of [1, 2, 3]) {
        expect(r.stdout).toMatch(
          new RegExp(`^checkpoint demo#${n}: .* sent in .* replicas bit-identical to sources ✓$`, 'm'),
        );
      }
      expect(r.stdout).not.toMatch(/MISMATCH|DIFFER|FAILED/);
      expect(r.stdout).toMatch(/^demo passed: 3 checkpoints published and verified\.$/m);
      // No AWS code runs in the demo, so no SDK notice either.
      expect(r.stderr).not.toMatch(/NodeVersionSupportWarning|AWS SDK/);
    } finally {
      if (dir !== undefined) await rm(dir, { recursive: true, force: true });
    }
  }, 300_000); // Full scale (608 MiB, three cycles) takes about 30 s on a 2-core machine.

  it('runs the demo smaller, as JSON, and refuses a bad --scale', async () => {
    const dir = await workdir();
    const r = await ferry(['demo', '--json', '--scale', '0.05', '--dir', dir]);
    expect(r.code, r.stderr).toBe(0);
    const report = JSON.parse(r.stdout) as {
      ok: boolean;
      cycles: { kind: string; changedExtents: number; bytesSent: number; verified: boolean }[];
    };
    expect(report.ok).toBe(true);
    expect(report.cycles.map((c) => c.kind)).toEqual(['full', 'incremental', 'incremental']);
    expect(report.cycles.every((c) => c.verified && c.bytesSent > 0)).toBe(true);
    expect(report.cycles[1]!.changedExtents).toBeGreaterThan(1000);

    const bad = await ferry(['demo', '--scale', '-1']);
    expect(bad.code).toBe(2);
    expect(bad.stderr).toMatch(/--scale must be a number above 0/);
    await rm(dir, { recursive: true, force: true });
  });

  it('replicates full then incremental, lists checkpoints, and verifies the replica', async () => {
    // Prepare
    const dir = await workdir();
    const src = join(dir, 'src.img');
    const dst = join(dir, 'dst.img');
    const state = join(dir, 'state');
    await createDiskImage(src, { size: 24 * MiB, seed: 3 });
    // Act: full copy, then a fragmented incremental.
    const full = await ferry([
      'replicate',
      '--source',
      `file:${src}`,
      '--target',
      `file:${dst}`,
      '--state',
      state,
      '--set',
      'web',
      '--disk',
      'os',
      '--json',
    ]);
    expect(full.stderr).toBe('');
    expect(full.code).toBe(0);
    const changes = await mutateDisk(src, { size: 24 * MiB, seed: 9, smallWrites: 500 });
    await writeFile(join(dir, 'changes.json'), JSON.stringify(changes));
    const inc = await ferry([
      'replicate',
      '--source',
      `file:${src}`,
      '--target',
      `file:${dst}`,
      '--changed',
      join(dir, 'changes.json'),
      '--state',
      state,
      '--set',
      'web',
      '--disk',
      'os',
    ]);
    // Assess
    expect(inc.code).toBe(0);
    expect(inc.stdout).toMatch(/checkpoint web#2 published/);
    expect(inc.stderr).toMatch(/disk os: incremental copy/);
    expect(await firstDifference(src, dst)).toBeUndefined();
    const result = JSON.parse(full.stdout) as ReplicationResult;
    expect(result.checkpoint.id).toBe('web#1');
    const list = await ferry(['checkpoints', '--state', state, '--json']);
    expect((JSON.parse(list.stdout) as { id: string }[]).map((c) => c.id)).toEqual(['web#1', 'web#2']);
    const verify = await ferry(['verify', '--state', state, '--set', 'web']);
    expect(verify.code).toBe(0);
    expect(verify.stdout).toMatch(/disk os: OK/);

    // Act: corrupt the replica behind Ferry's back.
    const fh = await open(dst, 'r+');
    await fh.write(Buffer.from('oops'), 0, 4, 5 * MiB + 100);
    await fh.close();
    const bad = await ferry(['verify', '--state', state, '--set', 'web']);
    // Assess: the damaged MiB is named.
    expect(bad.code).toBe(1);
    expect(bad.stdout).toMatch(new RegExp(`disk os: MISMATCH at offsets ${5 * MiB}`));
  });

  it('refuses bad settings and inputs with one line naming what is wrong', async () => {
    const dir = await workdir();
    const src = join(dir, 'src.img');
    await createDiskImage(src, { size: 4 * MiB, seed: 1 });
    const base = [
      'replicate',
      '--source',
      `file:${src}`,
      '--target',
      `file:${join(dir, 'dst.img')}`,
      '--state',
      join(dir, 's'),
    ];

    const window = await ferry([...base, '--window', '512KiB']);
    expect(window.code).toBe(2);
    expect(window.stderr).toMatch(/^ferry: .*window/);
    expect(window.stderr.trim().split('\n')).toHaveLength(1);

    const size = await ferry([...base, '--chunk-size', 'lots']);
    expect(size.code).toBe(2);
    expect(size.stderr).toMatch(/chunkSize: cannot read "lots" as a size/);

    const missing = await ferry([
      'replicate',
      '--source',
      `file:${join(dir, 'nope.img')}`,
      '--target',
      `file:${join(dir, 'x.img')}`,
      '--state',
      join(dir, 's'),
    ]);
    expect(missing.code).toBe(1);
    expect(missing.stderr).toMatch(/nope\.img cannot be opened/);

    await writeFile(
      join(dir, 'bad.json'),
      JSON.stringify([
        { offset: 0, length: 4096 },
        { offset: -1, length: 4096 },
      ]),
    );
    const badMap = await ferry([...base, '--changed', join(dir, 'bad.json'), '--disk', 'db']);
    // A change map is input like a setting: exit 2, and the entry at fault named.
    expect(badMap.code).toBe(2);
    expect(badMap.stderr).toBe(
      `ferry: disk db: change map ${join(dir, 'bad.json')} entry 1: offset -1 is negative\n`,
    );
    await writeFile(
      join(dir, 'huge.json'),
      '[{"offset": 0, "length": 4096}, {"offset": 1e999, "length": 1}]',
    );
    const huge = await ferry([...base, '--changed', join(dir, 'huge.json'), '--disk', 'db']);
    expect(huge.code).toBe(2);
    expect(huge.stderr).toMatch(
      /^ferry: disk db: change map .*huge\.json entry 1: offset Infinity is not a finite number\n$/,
    );

    const pairs = await ferry(['replicate', '--source', `file:${src}`, '--state', join(dir, 's')]);
    expect(pairs.code).toBe(2);
    expect(pairs.stderr).toMatch(/1 --source but 0 --target/);

    const serve = await ferry(['serve', '--listen', '127.0.0.1:0', '--target', 'nbd://localhost/disk']);
    expect(serve.code).toBe(2);
    expect(serve.stderr).toMatch(/target nbd:\/\/localhost\/disk: a ferry serve node writes file images/);

    // Nothing was published by any of the failures.
    const list = await ferry(['checkpoints', '--state', join(dir, 's')]);
    expect(list.stdout).toMatch(/no checkpoints/);
  });

  it('refuses set and disk names that could leave the state folder, naming the flag, before writing anything', async () => {
    // Prepare
    const dir = await workdir();
    const src = join(dir, 'src.img');
    await createDiskImage(src, { size: MiB, seed: 4 });
    const state = join(dir, 'state');
    const replicate = ['replicate', '--source', `file:${src}`, '--state', state];
    const cases: { args: string[]; message: RegExp }[] = [
      {
        args: ['checkpoints', '--state', state, '--set', '..'],
        message: /--set: set name "\.\." is not allowed/,
      },
      { args: ['verify', '--state', state, '--set', '..'], message: /--set: set name "\.\." is not allowed/ },
      {
        args: ['verify', '--state', state, '--set', 'a/b'],
        message: /--set: set name "a\/b" is not allowed/,
      },
      {
        args: [...replicate, '--target', `file:${join(dir, 'dst.img')}`, '--set', '..'],
        message: /--set: set name "\.\." is not allowed/,
      },
      {
        args: [...replicate, '--target', `file:${join(dir, 'dst.img')}`, '--disk', '../x'],
        message: /--disk: disk name "\.\.\/x" is not allowed/,
      },
      { args: [...replicate, '--target', 'ferry://127.0.0.1:1/..'], message: /names disk "\.\."/ },
      { args: [...replicate, '--target', 'ferry://127.0.0.1:1/../x'], message: /names disk "\.\.\/x"/ },
      {
        args: [...replicate, '--target', 'ferry://127.0.0.1:1/.hidden'],
        message: /names disk "\.hidden", which is not allowed/,
      },
    ];
    for (const c of cases) {
      // Act
      const r = await ferry(c.args);
      // Assess: exit 2, one line that says what is wrong and what is allowed.
      expect(r.code, `${c.args.join(' ')}: ${r.stderr}`).toBe(2);
      expect(r.stderr).toMatch(c.message);
      expect(r.stderr).toMatch(/^ferry: .*letters, digits.*\n$/);
      expect(r.stderr.trim().split('\n'), r.stderr).toHaveLength(1);
    }
    // No file was written anywhere (an empty state folder may have been made), in particular none
    // beside the state folder.
    const files = (await readdir(dir, { recursive: true, withFileTypes: true }))
      .filter((e) => !e.isDirectory())
      .map((e) => relative(dir, join(e.parentPath, e.name)));
    expect(files).toEqual(['src.img']);
  });

  it('refuses a "__proto__" key in a job file\'s params like any unknown setting', async () => {
    // Prepare: JSON.parse keeps "__proto__" as an own key; a schema copying the object would drop it.
    const dir = await workdir();
    const src = join(dir, 'src.img');
    await createDiskImage(src, { size: MiB, seed: 5 });
    const job = (params: string) =>
      `{"set": "s", "disks": [{"id": "d", "source": "file:${src}", "target": "file:${join(dir, 'dst.img')}"}], "params": ${params}}`;
    await writeFile(join(dir, 'proto.json'), job('{"__proto__": {"window": "1KiB"}}'));
    await writeFile(join(dir, 'bogus.json'), job('{"bogus": 1}'));
    // Act
    const proto = await ferry(['replicate', '--job', join(dir, 'proto.json'), '--state', join(dir, 'state')]);
    const bogus = await ferry(['replicate', '--job', join(dir, 'bogus.json'), '--state', join(dir, 'state')]);
    // Assess: both refused the same way, and nothing was copied.
    expect(bogus.code).toBe(2);
    expect(bogus.stderr).toMatch(/^ferry: .*unknown setting bogus \(known: chunkSize, /);
    expect(proto.code, proto.stdout).toBe(2);
    expect(proto.stderr).toMatch(
      /^ferry: job file .*proto\.json: unknown setting __proto__ \(known: chunkSize, /,
    );
    expect(proto.stderr.trim().split('\n')).toHaveLength(1);
    expect(await readdir(dir)).not.toContain('dst.img');
  });

  it('lists checkpoints as whole lines, the last one ended by a newline', async () => {
    // Prepare: two checkpoints of a two-disk set, replicated in this process (what
    // `ferry replicate --source A --target A' --disk a --source B ... --set erp` runs).
    const dir = await workdir();
    const state = join(dir, 'state');
    for (const d of ['a', 'b']) await createDiskImage(join(dir, `${d}.img`), { size: MiB, seed: 6 });
    const disk = (d: string) => ({
      id: d,
      source: `file:${join(dir, `${d}.img`)}`,
      target: `file:${join(dir, `${d}-dr.img`)}`,
    });
    for (let i = 0; i < 2; i++) {
      await runLocalJob(parseJobSpec({ set: 'erp', disks: [disk('a'), disk('b')] }, 'job'), {
        stateDir: state,
      });
    }
    const ids = JSON.parse((await ferry(['checkpoints', '--state', state, '--json'])).stdout) as {
      id: string;
      createdAt: string;
    }[];
    // Act
    const list = await ferry(['checkpoints', '--state', state]);
    // Assess: exactly these lines, each ended by "\n", nothing after the last disk line.
    expect(list.code, list.stderr).toBe(0);
    expect(list.stderr).toBe('');
    const line = (d: string) =>
      `    ${d}: full 1 MiB file:${join(dir, `${d}.img`)} -> file:${join(dir, `${d}-dr.img`)}\n`;
    expect(list.stdout).toBe(
      ids
        .map((cp) => `${cp.id}  ${cp.createdAt}  2 disk(s)  2 MiB replicated\n${line('a')}${line('b')}`)
        .join(''),
    );
    expect(ids.map((cp) => cp.id)).toEqual(['erp#1', 'erp#2']);
  });

  it('resumes a run killed with SIGKILL from its last intermediate checkpoint', async () => {
    // Prepare: a 96 MiB disk served by nbdkit through a 160 Mbit/s rate limit (about 5 s to read),
    // logging every read so the bytes each run fetched can be counted exactly.
    const dir = await workdir();
    const src = join(dir, 'src.img');
    const dst = join(dir, 'dst.img');
    const state = join(dir, 'state');
    const size = 96 * MiB;
    await createDiskImage(src, { size, seed: 21, allocated: 1 });
    const interval = 8 * MiB;
    const window = 16 * MiB;
    const args = ['--target', `file:${dst}`, '--state', state, '--set', 'db', '--disk', 'sdb'];
    const params = ['--checkpoint-interval', '8MiB', '--window', '16MiB', '--no-adaptive', '--json'];

    const slow = await startNbdkit({
      plugin: 'file',
      args: [`file=${src}`, 'rate=160M', `logfile=${join(dir, 'run1.log')}`],
      filters: ['log', 'rate'],
    });
    let run1: Run;
    try {
      // Act 1: start, wait until at least three intervals are durable, then kill -9.
      run1 = await ferry(['replicate', '--source', slow.uri, ...args, ...params], (child) => {
        const progress = join(state, 'progress', 'db', 'sdb.json');
        const poll = setInterval(async () => {
          const text = await readFile(progress, 'utf8').catch(() => undefined);
          if (text && (JSON.parse(text) as { bytesDone: number }).bytesDone >= 3 * interval) {
            clearInterval(poll);
            child.kill('SIGKILL');
          }
        }, 20);
        child.on('close', () => clearInterval(poll));
      });
    } finally {
      await slow.stop();
    }
    expect(run1.signal).toBe('SIGKILL');

    // Act 2: rerun the same cycle against an unthrottled server.
    const fast = await startNbdkit({
      plugin: 'file',
      args: [`file=${src}`, `logfile=${join(dir, 'run2.log')}`],
      filters: ['log'],
    });
    let run2: Run;
    try {
      run2 = await ferry(['replicate', '--source', fast.uri, ...args, ...params]);
    } finally {
      await fast.stop();
    }

    // Assess: resumed, bit-exact, and the bytes read by both runs overlap by at most interval + window.
    expect(run2.code, run2.stderr).toBe(0);
    const result = JSON.parse(run2.stdout) as ReplicationResult;
    expect(result.disks[0]!.resumedBytes).toBeGreaterThanOrEqual(3 * interval);
    expect(result.disks[0]!.resumedBytes + result.disks[0]!.bytesSent).toBe(size);
    expect(await firstDifference(src, dst)).toBeUndefined();
    const first = readRanges(await readFile(join(dir, 'run1.log'), 'utf8'));
    const second = readRanges(await readFile(join(dir, 'run2.log'), 'utf8'));
    const resent = overlap(first, second);
    expect(resent).toBeLessThanOrEqual(interval + window);
    const verify = await ferry(['verify', '--state', state, '--set', 'db']);
    expect(verify.code, verify.stderr).toBe(0);
  });
});

type Range = [number, number];

/** Read requests from an nbdkit log filter file, as [start, end) ranges. */
function readRanges(log: string): Range[] {
  const out: Range[] = [];
  for (const m of log.matchAll(/Read id=\d+ offset=(0x[0-9a-f]+) count=(0x[0-9a-f]+)/g)) {
    const start = Number(m[1]);
    out.push([start, start + Number(m[2])]);
  }
  return out;
}

function merge(ranges: Range[]): Range[] {
  const sorted = [...ranges].sort((a, b) => a[0] - b[0]);
  const out: Range[] = [];
  for (const r of sorted) {
    const last = out[out.length - 1];
    if (last && r[0] <= last[1]) last[1] = Math.max(last[1], r[1]);
    else out.push([r[0], r[1]]);
  }
  return out;
}

/** Bytes present in both sets of ranges. */
function overlap(a: Range[], b: Range[]): number {
  const x = merge(a);
  const y = merge(b);
  let i = 0;
  let j = 0;
  let total = 0;
  while (i < x.length && j < y.length) {
    const lo = Math.max(x[i]![0], y[j]![0]);
    const hi = Math.min(x[i]![1], y[j]![1]);
    if (hi > lo) total += hi - lo;
    if (x[i]![1] < y[j]![1]) i++;
    else j++;
  }
  return total;
}
