// `ferry recover` (plain, --test, --failover) and `ferry checkpoints` for a set replicated to a
// `ferry serve` node, as an operator runs them: the node over TLS, every command with --join. The
// drill serves the recovered disks through nbdkit and leaves the node's replicas untouched;
// `ferry failback` moves back only the regions either side changed since the shared checkpoint (its
// manifest asked of the node) and re-protects the set on the node.
import { type ChildProcess, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { copyFile, mkdir, mkdtemp, open, readFile, rm, stat, writeFile } from 'node:fs/promises';
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

/** A fresh directory with a `ferry serve` node (its images, its join file) and a 4 MiB source disk. */
async function nodeWorld(seed: number) {
  const dir = await mkdtemp(join(tmpdir(), 'ferry-node-recovery-cli-'));
  cleanups.push(() => rm(dir, { recursive: true, force: true }));
  const images = join(dir, 'images');
  const nodeState = join(dir, 'node');
  await mkdir(images);
  const address = await serve(images, nodeState);
  const src = join(dir, 'os.img');
  await createDiskImage(src, { size: 4 * MiB, seed });
  return { dir, images, address, joinFile: join(nodeState, 'join.json'), state: join(dir, 'state'), src };
}

describe('ferry recover from a ferry serve node', () => {
  it('recovers, drills, fails over and fails back with --join; checkpoints asks the node', async () => {
    // Prepare: a node, and two cycles of a 4 MiB disk to it.
    const { dir, images, address, joinFile, state, src } = await nodeWorld(77);
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

    // Act / Assess: failback needs to reach the node (the shared checkpoint's manifest is there).
    const blindBack = await ferry(['failback', '--set', SET, '--state', state], {
      env: { ...process.env, FERRY_JOIN: '' },
    });
    expect(blindBack.code, said(blindBack)).toBe(2);
    expect(blindBack.stderr).toMatch(
      /set cli-node is replicated to a ferry node \(os -> ferry:\/\/.*\/os\): give --join FILE/,
    );
    // The recovered machine wrote into its first MiB; the original disk changed in its last MiB.
    const poke = async (path: string, offset: number, seed: number) => {
      const fh = await open(path, 'r+');
      await fh.write(Buffer.alloc(4096, seed), 0, 4096, offset);
      await fh.close();
    };
    await poke(join(failTo, 'os.img'), 8192, 0xa1);
    await poke(src, 3 * MiB + 4096, 0xb2);
    const back = await ferry(['failback', '--set', SET, '--state', state, '--join', joinFile, '--json']);
    expect(back.code, said(back)).toBe(0);
    const result = JSON.parse(back.stdout);
    // Only the two regions that differ from checkpoint 2 moved (one per side), of four.
    expect(result.disks).toEqual([
      expect.objectContaining({
        disk: 'os',
        kind: 'incremental',
        regions: 4,
        moved: { regions: 2, bytes: 2 * MiB },
        changedOn: expect.objectContaining({
          recovered: expect.objectContaining({ regions: 1 }),
          original: expect.objectContaining({ regions: 1 }),
        }),
      }),
    ]);
    expect(result).toMatchObject({
      shared: 'cli-node#2',
      reverse: 'cli-node-failback#1',
      resync: 'cli-node#3',
    });
    // Bit-exact: the original is the recovered image; the node's replica caught up with it.
    expect(await sha(src)).toBe(await sha(join(failTo, 'os.img')));
    expect(await sha(join(images, 'os'))).toBe(await sha(src));
    const verified = await ferry(['verify', '--set', SET, '--state', state, '--join', joinFile]);
    expect(verified.code, said(verified)).toBe(0);
  });
});

describe('ferry migrate to a ferry serve node', () => {
  it("derives the final cycle's changes from the node's manifest, fails over from the node, and proves the window zero", async () => {
    // Prepare: a node and one cycle of a 4 MiB disk to it; then the source changes in one MiB.
    const { dir, images, address, joinFile, state, src } = await nodeWorld(91);
    const disk = ['--set', SET, '--state', state, '--disk', 'os', '--source', `file:${src}`];
    const target = ['--target', `ferry://${address}/os`, '--join', joinFile];
    const first = await ferry(['replicate', ...disk, ...target]);
    expect(first.code, said(first)).toBe(0);
    const fh = await open(src, 'r+');
    await fh.write(Buffer.alloc(4096, 0xc3), 0, 4096, 2 * MiB + 512 * 1024);
    await fh.close();
    // Act
    const to = join(dir, 'migrated');
    const r = await ferry(['migrate', ...disk, ...target, '--to', to, '--json']);
    // Assess: one region derived as changed against the node's manifest; the image is the source.
    expect(r.code, said(r)).toBe(0);
    const result = JSON.parse(r.stdout);
    expect(result.changeMaps).toEqual([expect.objectContaining({ disk: 'os', how: 'derived', regions: 1 })]);
    expect(result.checkpoint).toBe(`${SET}#2`);
    expect(result.dataLoss).toMatchObject({ zero: true });
    expect(await sha(join(to, 'os.img'))).toBe(await sha(src));
    expect(await sha(join(images, 'os'))).toBe(await sha(src));
  });
});
