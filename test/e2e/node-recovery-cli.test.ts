// `ferry recover` (plain, --test, --failover) and `ferry checkpoints` for a set replicated to a
// `ferry serve` node, as an operator runs them: the node over TLS, every command with --join. The
// drill serves the recovered disks through nbdkit and leaves the node's replicas untouched;
// `ferry failback` refuses such a set, naming what it lacks.
import { type ChildProcess, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { copyFile, mkdir, mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { MiB } from '../../shared/engine/units.ts';
import { createDiskImage, mutateDisk } from '../../shared/local/workload.ts';
import { BIN, ferry, type Run } from '../support/ferry-cli.ts';

const SET = 'cli-node';
const said = (r: Run) => `exit ${r.code ?? r.signal}\n${r.stdout}${r.stderr}`;

const cleanups: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (let c = cleanups.pop(); c; c = cleanups.pop()) await c();
});

/** `ferry serve` over TLS as a child; resolves with its address once it listens. */
async function serve(images: string, state: string): Promise<string> {
  const child: ChildProcess = spawn(
    process.execPath,
    [BIN, 'serve', '--listen', '127.0.0.1:0', '--target', `file:${images}`, '--state', state],
    { stdio: ['ignore', 'pipe', 'pipe'] },
  );
  const exited = new Promise<void>((resolve) => child.on('close', () => resolve()));
  cleanups.push(async () => {
    child.kill('SIGTERM');
    await exited;
  });
  let stdout = '';
  return new Promise<string>((resolve, reject) => {
    child.stdout!.on('data', (b) => {
      stdout += b;
      const m = /ferry node listening on (\S+)/.exec(stdout);
      if (m) resolve(m[1]!);
    });
    void exited.then(() => reject(new Error(`ferry serve exited before listening: ${stdout}`)));
  });
}

const sha = async (path: string) =>
  createHash('sha256')
    .update(await readFile(path))
    .digest('hex');

describe('ferry recover from a ferry serve node', () => {
  it('recovers, drills and fails over with --join; checkpoints asks the node; failback refuses', async () => {
    // Prepare: a node, and two cycles of a 4 MiB disk to it.
    const dir = await mkdtemp(join(tmpdir(), 'ferry-node-recovery-cli-'));
    cleanups.push(() => rm(dir, { recursive: true, force: true }));
    const images = join(dir, 'images');
    const nodeState = join(dir, 'node');
    await mkdir(images);
    const address = await serve(images, nodeState);
    const joinFile = join(nodeState, 'join.json');
    const state = join(dir, 'state');
    const src = join(dir, 'os.img');
    await createDiskImage(src, { size: 4 * MiB, seed: 77 });
    const replicate = (...more: string[]) =>
      ferry([
        'replicate',
        '--set',
        SET,
        '--state',
        state,
        '--disk',
        'os',
        '--source',
        `file:${src}`,
        '--target',
        `ferry://${address}/os`,
        '--join',
        joinFile,
        '--window',
        '8MiB',
        '--no-adaptive',
        ...more,
      ]);
    const first = await replicate();
    expect(first.code, said(first)).toBe(0);
    await copyFile(src, join(dir, 'os.as-of-1.img'));
    const changes = await mutateDisk(src, { size: 4 * MiB, seed: 78, smallWrites: 30, largeWrites: 1 });
    await writeFile(join(dir, 'changes.json'), JSON.stringify(changes));
    const second = await replicate('--changed', join(dir, 'changes.json'));
    expect(second.code, said(second)).toBe(0);
    const replica = await sha(join(images, 'os'));

    // Act / Assess: the listing asks the node with --join, and says what is missing without it.
    const listed = await ferry(['checkpoints', '--set', SET, '--state', state, '--join', joinFile]);
    expect(listed.code, said(listed)).toBe(0);
    expect(listed.stdout).toMatch(/^cli-node#1 .*replicated$/m);
    expect(listed.stdout).not.toMatch(/not recoverable/);
    const blind = await ferry(['checkpoints', '--set', SET, '--state', state], {
      env: { ...process.env, FERRY_JOIN: '' },
    });
    expect(blind.stdout).toMatch(
      /cli-node#1 .*\[not recoverable: disk os: its replica .* is on a ferry node: give --join FILE/,
    );

    // Act / Assess: checkpoint 1 recovered from the node.
    const out = join(dir, 'out');
    const recovered = await ferry([
      'recover',
      '--set',
      SET,
      '--state',
      state,
      '--checkpoint',
      '1',
      '--to',
      out,
      '--join',
      joinFile,
    ]);
    expect(recovered.code, said(recovered)).toBe(0);
    expect(recovered.stdout).toMatch(
      /^disk os: .*os\.img \(4 MiB\) verified against checkpoint cli-node#1 \(4 regions\)$/m,
    );
    expect(await sha(join(out, 'os.img'))).toBe(await sha(join(dir, 'os.as-of-1.img')));

    // Act / Assess: a drill of checkpoint 1 (nbdkit), ended by --cleanup; the replica is untouched.
    const drillTo = join(dir, 'drill');
    let stdout = '';
    let ready = () => {};
    const exported = new Promise<void>((resolve) => {
      ready = resolve;
    });
    let drillChild: ChildProcess | undefined;
    const drill = ferry(
      [
        'recover',
        '--test',
        '--ttl',
        '1h',
        '--set',
        SET,
        '--state',
        state,
        '--checkpoint',
        '1',
        '--to',
        drillTo,
      ],
      {
        env: { ...process.env, FERRY_JOIN: joinFile },
        onSpawn: (c) => {
          drillChild = c;
          c.stdout?.on('data', (b: Buffer) => {
            stdout += b;
            if (/^disk os: nbd:/m.test(stdout)) ready();
          });
        },
      },
    );
    cleanups.push(async () => {
      drillChild?.kill('SIGKILL');
    });
    await Promise.race([exported, drill]);
    expect(stdout).toMatch(/^drill \S+ of checkpoint cli-node#1: serving 1 disk\(s\)/m);
    expect(await sha(join(drillTo, 'os.img'))).toBe(await sha(join(dir, 'os.as-of-1.img')));
    const cleanup = await ferry(['recover', '--cleanup', '--state', state]);
    expect(cleanup.code, said(cleanup)).toBe(0);
    expect(cleanup.stdout).toMatch(/checked: no server alive, no file left$/m);
    expect((await drill).code).toBe(0);
    expect(await stat(drillTo).catch(() => undefined)).toBeUndefined();
    expect(await sha(join(images, 'os'))).toBe(replica);

    // Act / Assess: a failover to the latest checkpoint, from the node; then failback refuses.
    const failTo = join(dir, 'failover');
    const failover = await ferry([
      'recover',
      '--failover',
      '--set',
      SET,
      '--state',
      state,
      '--to',
      failTo,
      '--join',
      joinFile,
    ]);
    expect(failover.code, said(failover)).toBe(0);
    expect(failover.stdout).toMatch(/set cli-node failed over to cli-node#2/);
    expect(await sha(join(failTo, 'os.img'))).toBe(await sha(src));
    const failback = await ferry(['failback', '--set', SET, '--state', state]);
    expect(failback.code, said(failback)).toBe(2);
    expect(failback.stderr).toMatch(
      /set cli-node: ferry failback does not work for a set replicated to a ferry node yet \(os -> ferry:\/\/.*\/os\): it needs the shared checkpoint's manifest from the node/,
    );
  });
});
