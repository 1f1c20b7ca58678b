// Drills and `ferry recover --cleanup`: a running drill records itself in the state directory, the
// clean-up ends it from another process (or cleans up after one that was killed) and checks that no
// server and no file of it is left, and every drill leaves a report (checkpoint, time until ready,
// exports, what was cleaned up) in the state directory.
import type { ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { mkdtemp, readdir, readFile, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { MiB } from '../../shared/engine/units.ts';
import type { DrillReport } from '../../shared/local/drills.ts';
import { createDiskImage } from '../../shared/local/workload.ts';
import { ferry, type Run } from '../support/ferry-cli.ts';

const SET = 'web';
const said = (r: Run) => `exit ${r.code ?? r.signal}\n${r.stdout}${r.stderr}`;

/** A set of two disks with one checkpoint, in a fresh directory. */
async function replicated(): Promise<{ dir: string; state: string }> {
  const dir = await mkdtemp(join(tmpdir(), 'ferry-drill-'));
  const state = join(dir, 'state');
  const args = ['replicate', '--set', SET, '--state', state];
  for (const [i, id] of ['os', 'data'].entries()) {
    await createDiskImage(join(dir, `${id}.img`), { size: 4 * MiB, seed: 50 + i });
    args.push(
      '--disk',
      id,
      '--source',
      `file:${join(dir, `${id}.img`)}`,
      '--target',
      `file:${join(dir, `${id}.replica`)}`,
    );
  }
  const r = await ferry(args);
  expect(r.code, said(r)).toBe(0);
  return { dir, state };
}

interface Started {
  child: ChildProcess;
  finished: Promise<Run>;
  pids: number[];
  stdout: () => string;
}

/** Starts `ferry recover --test` with a long TTL and resolves once both exports are printed. */
async function startDrill(state: string, to: string): Promise<Started> {
  let child: ChildProcess | undefined;
  let stdout = '';
  let onReady = () => {};
  const ready = new Promise<void>((resolve) => {
    onReady = resolve;
  });
  const finished = ferry(['recover', '--test', '--ttl', '1h', '--set', SET, '--state', state, '--to', to], {
    onSpawn: (c) => {
      child = c;
      c.stdout?.on('data', (b: Buffer) => {
        stdout += b;
        if (/^disk os: nbd:/m.test(stdout) && /^disk data: nbd:/m.test(stdout)) onReady();
      });
    },
  });
  // A drill that ends early fails the assertions that follow rather than hanging here.
  await Promise.race([ready, finished]);
  const pids = [...stdout.matchAll(/\(nbdkit pid (\d+)\)$/gm)].map((m) => Number(m[1]));
  return { child: child!, finished, pids, stdout: () => stdout };
}

/** The process is gone: no such pid, or a zombie (exited, waiting for whoever adopted it to reap it). */
const gone = (pid: number) => {
  try {
    process.kill(pid, 0);
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'ESRCH';
  }
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  return stat.slice(stat.lastIndexOf(')') + 2).startsWith('Z');
};

async function reports(state: string): Promise<DrillReport[]> {
  const names = (await readdir(join(state, 'drills'))).filter((n) => n.endsWith('.report.json'));
  return Promise.all(names.map(async (n) => JSON.parse(await readFile(join(state, 'drills', n), 'utf8'))));
}

describe('ferry recover --cleanup', () => {
  it('ends a running drill from another process, checks nothing is left, and keeps its report', async () => {
    // Prepare
    const { dir, state } = await replicated();
    const to = join(dir, 'drill');
    const drill = await startDrill(state, to);
    try {
      expect(drill.pids).toHaveLength(2);
      const records = (await readdir(join(state, 'drills'))).filter((n) => !n.endsWith('.report.json'));
      expect(records).toHaveLength(1);
      // Act
      const cleanup = await ferry(['recover', '--cleanup', '--state', state]);
      // Assess: the clean-up says what it ended and checked; the drill's own process ended it.
      expect(cleanup.code, said(cleanup)).toBe(0);
      expect(cleanup.stdout).toMatch(
        /^drill drill-\S+ of checkpoint web#1 \(set web\): exports ready \d+\.\d s after the command started; ended \S+ \(ferry recover --cleanup: its process \d+ ended it on SIGTERM\)$/m,
      );
      expect(cleanup.stdout).toMatch(/^ {2}disk os: nbd:\/\/127\.0\.0\.1:\d+ \(nbdkit pid \d+\)$/m);
      expect(cleanup.stdout).toMatch(
        /^ {2}cleaned up: 2 NBD server\(s\) stopped, \d+ file\(s\) and folder\(s\) removed; checked: no server alive, no file left$/m,
      );
      const end = await drill.finished;
      expect(end.code, said(end)).toBe(0);
      expect(end.stdout).toMatch(/^drill ended \(SIGTERM\): 2 NBD server\(s\) stopped and gone/m);
      for (const pid of drill.pids) expect(gone(pid)).toBe(true);
      expect(await stat(to).catch(() => undefined)).toBeUndefined();
      // The report is kept in the state directory; the record is gone.
      const [report, ...more] = await reports(state);
      expect(more).toEqual([]);
      expect(report).toMatchObject({
        set: SET,
        checkpoint: 'web#1',
        cleanedBy: 'drill',
        serversStopped: 2,
        clean: true,
        left: [],
      });
      expect(report!.readyAfterMs).toBeGreaterThan(0);
      expect(report!.exports.map((e) => e.disk)).toEqual(['os', 'data']);
      expect((await readdir(join(state, 'drills'))).filter((n) => !n.endsWith('.report.json'))).toEqual([]);
      // Nothing left to clean.
      const again = await ferry(['recover', '--cleanup', '--state', state]);
      expect(again.stdout).toBe(`no drill is recorded in ${state}\n`);
    } finally {
      drill.child.kill('SIGKILL');
    }
  });

  it('cleans up after a drill whose process was killed, and checks it', async () => {
    // Prepare: the drill's process dies without its teardown.
    const { dir, state } = await replicated();
    const to = join(dir, 'drill');
    const drill = await startDrill(state, to);
    drill.child.kill('SIGKILL');
    await drill.finished;
    expect(await stat(join(to, 'os.img'))).toBeDefined(); // left behind
    // Act
    const cleanup = await ferry(['recover', '--cleanup', '--state', state, '--set', SET]);
    // Assess
    expect(cleanup.code, said(cleanup)).toBe(0);
    expect(cleanup.stdout).toMatch(/\(ferry recover --cleanup: its process \d+ was gone\)$/m);
    expect(cleanup.stdout).toMatch(
      /^ {2}cleaned up: [0-2] NBD server\(s\) stopped, \d+ file\(s\) and folder\(s\) removed; checked: no server alive, no file left$/m,
    );
    for (const pid of drill.pids) expect(gone(pid)).toBe(true);
    expect(await stat(to).catch(() => undefined)).toBeUndefined();
    const [report] = await reports(state);
    expect(report).toMatchObject({ checkpoint: 'web#1', cleanedBy: 'cleanup', clean: true });
    expect(report!.removed).toContain(to);
  });

  it('refuses drill options with --cleanup', async () => {
    const r = await ferry(['recover', '--cleanup', '--state', '/nonexistent', '--to', '/tmp/x']);
    expect(r.code).toBe(2);
    expect(r.stderr).toBe('ferry: --to is not for --cleanup\n');
  });
});

describe('ferry recover --test --check', () => {
  it('runs the health check against the exports, ends the drill, reports it healthy and leaves nothing', async () => {
    // Prepare
    const { dir, state } = await replicated();
    const to = join(dir, 'drill');
    const replica = await readFile(join(dir, 'os.replica'));
    // The check reads each export back over NBD and compares it with the source, then writes to one
    // (the overlay takes it).
    const check =
      `nbdcopy "$FERRY_DRILL_URI_OS" - | cmp - ${join(dir, 'os.img')} && ` +
      `nbdcopy "$FERRY_DRILL_URI_DATA" - | cmp - ${join(dir, 'data.img')} && ` +
      `head -c 65536 /dev/urandom | nbdcopy - "$FERRY_DRILL_URI_OS" && echo checked`;
    // Act
    const r = await ferry([
      'recover',
      '--test',
      '--ttl',
      '10m',
      '--check',
      check,
      '--set',
      SET,
      '--state',
      state,
      '--to',
      to,
    ]);
    // Assess
    expect(r.code, said(r)).toBe(0);
    expect(r.stderr).toContain(
      'ferry: drill health check (FERRY_DRILL_URI_OS, FERRY_DRILL_URI_DATA): nbdcopy',
    );
    expect(r.stderr).toContain('checked\n');
    expect(r.stdout).toMatch(/^drill ended \(its health check passed\): 2 NBD server\(s\) stopped and gone/m);
    expect(r.stdout).toMatch(/^ {2}health check passed in \d+\.\d s: nbdcopy/m);
    const [report] = await reports(state);
    expect(report).toMatchObject({ clean: true, check: { healthy: true, exitCode: 0, command: check } });
    expect(await stat(to).catch(() => undefined)).toBeUndefined();
    // What the check wrote went to the overlay: the replica is as it was.
    expect((await readFile(join(dir, 'os.replica'))).equals(replica)).toBe(true);
  });

  it('a failing check fails the drill (exit 1), which is still torn down and reported', async () => {
    const { dir, state } = await replicated();
    const to = join(dir, 'drill');
    const r = await ferry([
      'recover',
      '--test',
      '--check',
      'echo no login prompt >&2; exit 7',
      '--set',
      SET,
      '--state',
      state,
      '--to',
      to,
    ]);
    expect(r.code, said(r)).toBe(1);
    expect(r.stderr).toContain('no login prompt');
    expect(r.stdout).toMatch(/^drill ended \(its health check failed \(exit status 7\)\)/m);
    expect(r.stdout).toMatch(
      /^ {2}health check FAILED \(exit status 7\) after \d+\.\d s: echo no login prompt/m,
    );
    const [report] = await reports(state);
    expect(report).toMatchObject({
      clean: true,
      check: { healthy: false, exitCode: 7, reason: 'exit status 7' },
    });
    expect(await stat(to).catch(() => undefined)).toBeUndefined();
    const misuse = await ferry(['recover', '--check', 'true', '--set', SET, '--state', state, '--to', to]);
    expect(misuse.code).toBe(2);
    expect(misuse.stderr).toBe('ferry: --check is for drills (--test)\n');
  });
});
