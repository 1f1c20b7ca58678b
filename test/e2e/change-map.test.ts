// A change map that reaches past the end of the disk, through the `ferry` command: refused with one
// line naming the disk and the first bad extent, nothing published, the replica left as it was.
import { copyFile, mkdtemp, readFile, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import type { Extent } from '../../shared/engine/extents.ts';
import { KiB, MiB } from '../../shared/engine/units.ts';
import { createDiskImage, mutateDisk } from '../../shared/local/workload.ts';
import { ferry } from '../support/ferry-cli.ts';

describe('ferry replicate with a change map past the end of the disk', () => {
  it('refuses an extent far beyond the disk and one crossing its end, publishing nothing and leaving the replica as it was', async () => {
    // Prepare: a disk whose size is not a multiple of 4 KiB (its last block is short), copied in full.
    const size = 16 * MiB + 1536;
    const dir = await mkdtemp(join(tmpdir(), 'ferry-change-map-'));
    const src = join(dir, 'src.img');
    const dst = join(dir, 'dst.img');
    const firstCopy = join(dir, 'first-copy.img');
    const state = join(dir, 'state');
    await createDiskImage(src, { size, seed: 11 });
    const replicate = (changed?: string) =>
      ferry([
        'replicate',
        '--source',
        `file:${src}`,
        '--target',
        `file:${dst}`,
        ...(changed === undefined ? [] : ['--changed', changed]),
        '--state',
        state,
        '--set',
        'web',
        '--disk',
        'os',
      ]);
    const full = await replicate();
    expect(full.code, full.stderr).toBe(0);
    await copyFile(src, firstCopy);
    // The source then changes for real, so a map that were clipped instead of refused would move data.
    const changes = await mutateDisk(src, {
      size,
      seed: 5,
      smallWrites: 200,
      largeWrites: 2,
      largeSize: MiB,
    });
    const maps: { name: string; extents: Extent[]; index: number; bad: Extent }[] = [
      {
        name: 'far.json',
        extents: [...changes, { offset: 10 ** 15, length: 4 * KiB }],
        index: changes.length,
        bad: { offset: 10 ** 15, length: 4 * KiB },
      },
      {
        name: 'crossing.json',
        extents: [...changes.slice(0, 10), { offset: size - 4 * KiB, length: 8 * KiB }, ...changes.slice(10)],
        index: 10,
        bad: { offset: size - 4 * KiB, length: 8 * KiB },
      },
    ];

    for (const map of maps) {
      await writeFile(join(dir, map.name), JSON.stringify(map.extents));
      // Act
      const run = await replicate(join(dir, map.name));
      // Assess: a failure (not a signal), in one line naming the disk, the extent and the disk's size.
      expect(run.signal, map.name).toBeNull();
      expect(run.code, `${map.name}: ${run.stdout}${run.stderr}`).not.toBe(0);
      expect(run.stdout, map.name).not.toMatch(/published/);
      const lines = run.stderr.trim().split('\n');
      expect(lines, map.name).toHaveLength(1);
      expect(lines[0]).toContain(
        `ferry: change map of disk os: entry ${map.index} at offset ${map.bad.offset} with length ${map.bad.length}`,
      );
      expect(lines[0]).toContain(`past the end of the disk (${size} bytes)`);
    }

    // Assess: only the first checkpoint is listed, it still verifies, and the replica holds exactly
    // what the source held at the first copy.
    const list = await ferry(['checkpoints', '--json', '--state', state]);
    expect(list.code, list.stderr).toBe(0);
    expect((JSON.parse(list.stdout) as { id: string }[]).map((c) => c.id)).toEqual(['web#1']);
    const verify = await ferry(['verify', '--state', state, '--set', 'web']);
    expect(verify.code, verify.stdout + verify.stderr).toBe(0);
    expect(verify.stdout).toMatch(/disk os: OK/);
    expect(Buffer.compare(await readFile(dst), await readFile(firstCopy))).toBe(0);

    // Act: the right map, with a change that ends exactly at the (odd) end of the disk.
    await writeFile(
      join(dir, 'good.json'),
      JSON.stringify([...changes, { offset: size - 100, length: 100 }, { offset: size, length: 0 }]),
    );
    const good = await replicate(join(dir, 'good.json'));
    // Assess: published, and the replica now equals the changed source.
    expect(good.code, good.stderr).toBe(0);
    expect(good.stdout).toMatch(/checkpoint web#2 published/);
    expect(Buffer.compare(await readFile(dst), await readFile(src))).toBe(0);
  });
});
