// `ferry verify` of a checkpoint whose replica is on a node: the node re-hashes its image against its
// manifest and the checkpoint's reference, over the same authenticated connection as replication.
import { mkdtemp, open } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { runLocalJob } from '../../cli/run.ts';
import { MiB } from '../../shared/engine/units.ts';
import { ImageDirectory } from '../../shared/local/image-dir.ts';
import { createDiskImage } from '../../shared/local/workload.ts';
import { startNode } from '../../shared/net/node.ts';
import { ferry } from '../support/ferry-cli.ts';

const cleanups: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (let c = cleanups.pop(); c; c = cleanups.pop()) await c();
});

const workdir = () => mkdtemp(join(tmpdir(), 'ferry-remote-verify-'));

describe('ferry verify of a replica on a node', () => {
  it('has the node re-hash it: OK, MISMATCH once damaged, NOT CHECKED without a way to reach it', async () => {
    // Prepare: a 16 MiB disk replicated to a node on this host.
    const images = await workdir();
    const node = await startNode({
      listen: '127.0.0.1:0',
      targets: await ImageDirectory.open(images),
      sessionDir: images,
      insecure: true,
      log: () => {},
    });
    cleanups.push(() => node.close());
    const source = join(await workdir(), 'v0.img');
    await createDiskImage(source, { size: 16 * MiB, seed: 21 });
    const state = await workdir();
    await runLocalJob(
      {
        set: 'rv',
        disks: [{ id: 'v0', source: `file:${source}`, target: `ferry://127.0.0.1:${node.port}/v0` }],
        params: { chunkSize: '1 MiB', window: '64 MiB', adaptive: false },
      },
      { stateDir: state, insecure: true },
    );
    const env = { ...process.env, FERRY_JOIN: '' };
    const verify = (...extra: string[]) =>
      ferry(['verify', '--set', 'rv', '--state', state, ...extra], { env });

    // Act / Assess: the replica as committed.
    const ok = await verify('--insecure');
    expect(ok.stdout).toBe('disk v0: OK (16 regions match checkpoint rv#1)\n');
    expect(ok.code).toBe(0);

    // Act / Assess: one byte of the node's image changed at 5 MiB.
    const fh = await open(join(images, 'v0'), 'r+');
    const byte = Buffer.alloc(1);
    await fh.read(byte, 0, 1, 5 * MiB);
    byte[0] = byte[0]! ^ 0xff;
    await fh.write(byte, 0, 1, 5 * MiB);
    await fh.close();
    const bad = await verify('--insecure');
    expect(bad.stdout).toBe(`disk v0: MISMATCH at offsets ${5 * MiB}\n`);
    expect(bad.code).toBe(1);

    // Act / Assess: no join file and not --insecure: said, not guessed.
    const none = await verify();
    expect(none.stdout).toMatch(
      /^disk v0: NOT CHECKED \(ferry:\/\/127\.0\.0\.1:\d+\/v0 is a ferry node's replica: give --join FILE/,
    );
    expect(none.code).toBe(1);
  });
});
