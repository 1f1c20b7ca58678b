// Replication from a real nbdkit export into a local file, through the whole local pipeline:
// a full copy of a sparse disk (holes skipped via block status), then fragmented increments.
import { mkdtemp, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type JobSpec, runLocalJob } from '../../cli/run.ts';
import type { ReplicationEvent } from '../../shared/engine/replicate.ts';
import { KiB, MiB } from '../../shared/engine/units.ts';
import { LocalStateStore } from '../../shared/local/state-dir.ts';
import { createDiskImage, firstDifference, mutateDisk } from '../../shared/local/workload.ts';
import { startNbdkit } from '../support/nbdkit.ts';

let dir: string;

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'ferry-replicate-nbd-'));
});

afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('replication from nbdkit', () => {
  it('copies a sparse disk in full, then two fragmented increments, bit-identical each time', async () => {
    // Prepare: a 48 MiB thin disk (about half allocated, in 1 MiB runs) served by nbdkit's file
    // plugin over a unix socket; the file behind it changes between cycles like a guest's disk.
    const size = 48 * MiB;
    const src = join(dir, 'src.img');
    const dst = join(dir, 'dst.img');
    const state = join(dir, 'state');
    await createDiskImage(src, { size, seed: 7, allocated: 0.5 });
    const server = await startNbdkit({ plugin: 'file', args: [`file=${src}`] });
    const cycle = async (changed?: string) => {
      const events: ReplicationEvent[] = [];
      const spec: JobSpec = {
        set: 'vm',
        disks: [{ id: 'sda', source: server.uri, target: `file:${dst}`, ...(changed ? { changed } : {}) }],
        params: { checkpointInterval: '4MiB' },
      };
      const result = await runLocalJob(spec, { stateDir: state, onEvent: (e) => events.push(e) });
      return { result, events };
    };
    try {
      // Act 1: full copy.
      const full = await cycle();

      // Assess 1: identical, and only allocated data crossed (about half the disk).
      expect(await firstDifference(src, dst)).toBeUndefined();
      const sent = full.result.disks[0]!.bytesSent;
      expect(sent).toBeGreaterThan(size / 4);
      expect(sent).toBeLessThan((size * 3) / 4);
      expect((await stat(dst)).size).toBe(size);

      // Act 2: two increments of scattered 4 KiB writes (some zeroing) plus a few larger runs.
      for (const seed of [8, 9]) {
        const changes = await mutateDisk(src, {
          size,
          seed,
          smallWrites: 3000,
          largeWrites: 3,
          largeSize: MiB,
        });
        const changed = join(dir, `changes-${seed}.json`);
        await writeFile(changed, JSON.stringify(changes));
        const incr = await cycle(changed);

        // Assess 2: identical after each increment, having sent far less than the disk.
        expect(await firstDifference(src, dst)).toBeUndefined();
        const d = incr.result.disks[0]!;
        expect(d.bytesSent).toBeLessThanOrEqual(3000 * 4 * KiB + 3 * MiB);
        expect(incr.events.some((e) => e.type === 'published')).toBe(true);
      }
      const catalog = await new LocalStateStore(state).listCheckpoints('vm');
      expect(catalog.map((c) => c.disks[0]!.kind)).toEqual(['full', 'incremental', 'incremental']);
    } finally {
      await server.stop();
    }
  });
});
