// What a published checkpoint promises, through the local runner with real file targets: a set
// commits as one (a failed commit or publication rolls every disk back, a crash in between is
// rolled back by the next run or by verify), and a resume skips only chunks the target proves it
// still holds.
import { copyFile, mkdtemp, open, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { type JobSpec, recoverLocalSet, runLocalJob } from '../../cli/run.ts';
import type { DiskTarget } from '../../shared/engine/ports.ts';
import type { CycleStep, ReplicationEvent } from '../../shared/engine/replicate.ts';
import { MiB } from '../../shared/engine/units.ts';
import { verifyFileImage } from '../../shared/local/file-target.ts';
import { LocalStateStore } from '../../shared/local/state-dir.ts';
import { createDiskImage, firstDifference, mutateDisk } from '../../shared/local/workload.ts';

const DISKS = [
  { id: 'a', size: 8 * MiB, seed: 11 },
  { id: 'b', size: 12 * MiB, seed: 12 },
];

interface World {
  dir: string;
  state: string;
  src: (id: string) => string;
  dst: (id: string) => string;
  /** A copy of each source as of the first checkpoint. */
  base: (id: string) => string;
}

async function world(): Promise<World> {
  const dir = await mkdtemp(join(tmpdir(), 'ferry-atomic-'));
  const w: World = {
    dir,
    state: join(dir, 'state'),
    src: (id) => join(dir, `${id}.src.img`),
    dst: (id) => join(dir, `${id}.dst.img`),
    base: (id) => join(dir, `${id}.base.img`),
  };
  for (const d of DISKS) {
    await createDiskImage(w.src(d.id), { size: d.size, seed: d.seed });
    await copyFile(w.src(d.id), w.base(d.id));
  }
  return w;
}

function job(w: World, changed?: Record<string, string>): JobSpec {
  return {
    set: 'erp',
    disks: DISKS.map((d) => ({
      id: d.id,
      source: `file:${w.src(d.id)}`,
      target: `file:${w.dst(d.id)}`,
      ...(changed?.[d.id] ? { changed: changed[d.id] } : {}),
    })),
    params: { checkpointInterval: '1 MiB', window: '2 MiB', windowLevels: ['1 MiB', '2 MiB'] },
  };
}

/** Changes every source and writes the change maps; returns them by disk. */
async function change(w: World, seed: number): Promise<Record<string, string>> {
  const maps: Record<string, string> = {};
  for (const d of DISKS) {
    const extents = await mutateDisk(w.src(d.id), {
      size: d.size,
      seed: seed + d.seed,
      smallWrites: 300,
      largeWrites: 2,
      largeSize: MiB,
    });
    maps[d.id] = join(w.dir, `${d.id}.changes.${seed}.json`);
    await writeFile(maps[d.id]!, JSON.stringify(extents));
  }
  return maps;
}

/** Every replica equals `image(id)` byte for byte and verifies against the latest checkpoint. */
async function expectReplicas(w: World, image: (id: string) => string, sequence: number): Promise<void> {
  const latest = await new LocalStateStore(w.state).latestCheckpoint('erp');
  expect(latest?.sequence).toBe(sequence);
  for (const d of DISKS) {
    expect(await firstDifference(w.dst(d.id), image(d.id)), `disk ${d.id}`).toBeUndefined();
    const ref = latest?.disks.find((x) => x.disk === d.id)?.targetRef;
    expect((await verifyFileImage(w.dst(d.id), ref)).ok, `verify ${d.id}`).toBe(true);
  }
}

/** `target` with some of its methods replaced; the others still run on the target itself. */
function override(target: DiskTarget, methods: Partial<DiskTarget>): DiskTarget {
  return new Proxy(target, {
    get: (t, key) => {
      if (key in methods) return methods[key as keyof DiskTarget];
      const value = Reflect.get(t, key);
      return typeof value === 'function' ? value.bind(t) : value;
    },
  });
}

/** Wraps disk `id`'s target so its commit applies everything and then fails (an I/O error late in it). */
const failCommitOf =
  (id: string) =>
  (target: DiskTarget, disk: string): DiskTarget =>
    disk !== id
      ? target
      : override(target, {
          commit: async (summary) => {
            await target.commit(summary);
            throw new Error(`EIO writing the manifest of disk ${disk}`);
          },
        });

class Crash extends Error {}

describe('a set commits as one', () => {
  it('rolls every disk back when one disk fails its commit, and a rerun publishes bit-exact', async () => {
    // Prepare
    const w = await world();
    await runLocalJob(job(w), { stateDir: w.state });
    const maps = await change(w, 100);
    const events: ReplicationEvent[] = [];
    // Act: disk b's commit fails after changing its image; disk a commits fine.
    await expect(
      runLocalJob(job(w, maps), {
        stateDir: w.state,
        wrapTarget: failCommitOf('b'),
        onEvent: (e) => events.push(e),
      }),
    ).rejects.toThrow(/EIO writing the manifest of disk b/);
    // Assess: nothing published, both images back at checkpoint #1, which verifies.
    await expectReplicas(w, w.base, 1);
    expect(events.some((e) => e.type === 'rolled-back')).toBe(true);
    expect(await new LocalStateStore(w.state).load('erp')).toBeUndefined();
    // A rerun resumes the cycle (its staging was kept) and publishes #2, bit-exact.
    const again = await runLocalJob(job(w, maps), { stateDir: w.state });
    expect(again.disks.every((d) => d.resumedBytes === d.bytesTotal)).toBe(true);
    await expectReplicas(w, w.src, 2);
    expect((await readdir(w.dir)).filter((f) => /ferry-(staging|undo|cycle)/.test(f))).toEqual([]);
  });

  it('rolls back a full re-seed over existing images when the publication fails', async () => {
    const w = await world();
    await runLocalJob(job(w), { stateDir: w.state });
    await change(w, 200);
    await expect(
      runLocalJob(job(w), {
        stateDir: w.state,
        step: (s: CycleStep) => {
          if (s === 'before-publish') throw new Error('catalog unavailable');
        },
      }),
    ).rejects.toThrow(/catalog unavailable/);
    await expectReplicas(w, w.base, 1);
    await runLocalJob(job(w), { stateDir: w.state });
    await expectReplicas(w, w.src, 2);
  });

  for (const at of ['commit:0', 'commit:1', 'before-publish'] as const) {
    it(`after a crash at ${at}, verify rolls the set back and a rerun publishes bit-exact`, async () => {
      // Prepare
      const w = await world();
      await runLocalJob(job(w), { stateDir: w.state });
      const maps = await change(w, 300);
      // Act: the process "dies" at the step: a throw there, and a rollback that dies too, so the
      // commit intent and whatever the targets had applied stay behind, as after a SIGKILL.
      await expect(
        runLocalJob(job(w, maps), {
          stateDir: w.state,
          step: (s) => {
            if (s === at) throw new Crash(at);
          },
          wrapTarget: (t) =>
            override(t, {
              rollback: async () => {
                throw new Crash('died');
              },
            }),
        }),
      ).rejects.toThrow(/rolls it back again/);
      const intent = await new LocalStateStore(w.state).load('erp');
      expect(intent?.cycleId).toBe('erp#2');
      // Assess: recovery (what `ferry verify` runs first) puts checkpoint #1 back.
      const events: ReplicationEvent[] = [];
      await recoverLocalSet('erp', w.state, (e) => events.push(e));
      expect(events).toEqual([
        { type: 'recovered', cycleId: 'erp#2', action: 'rolled-back', disks: 2, unsupported: [] },
      ]);
      await expectReplicas(w, w.base, 1);
      await recoverLocalSet('erp', w.state); // idempotent: nothing left to do
      await runLocalJob(job(w, maps), { stateDir: w.state });
      await expectReplicas(w, w.src, 2);
    });
  }

  it('after a crash between publication and clean-up, the next run completes the clean-up', async () => {
    const w = await world();
    await runLocalJob(job(w), { stateDir: w.state });
    const maps = await change(w, 400);
    await expect(
      runLocalJob(job(w, maps), {
        stateDir: w.state,
        step: (s) => {
          if (s === 'after-publish') throw new Crash(s);
        },
      }),
    ).rejects.toThrow(Crash);
    // Published: the new images are in place; the manifest is installed by the recovery.
    const events: ReplicationEvent[] = [];
    await recoverLocalSet('erp', w.state, (e) => events.push(e));
    expect(events).toEqual([
      { type: 'recovered', cycleId: 'erp#2', action: 'completed', disks: 2, unsupported: [] },
    ]);
    await expectReplicas(w, w.src, 2);
    expect(await new LocalStateStore(w.state).loadProgress('erp', 'a')).toBeUndefined();
  });
});

describe('a resume skips only what the target proves it holds', () => {
  /** Runs an increment until its first durable progress save, then stops it (as a kill would). */
  async function interrupted(w: World, maps: Record<string, string>): Promise<void> {
    await expect(
      runLocalJob(job(w, maps), {
        stateDir: w.state,
        step: (s) => {
          if (s === 'mid-transfer') throw new Crash(s);
        },
      }),
    ).rejects.toThrow(Crash);
    const progress = await new LocalStateStore(w.state).loadProgress('erp', 'b');
    expect(progress?.watermark ?? 0).toBeGreaterThan(0);
  }

  const damage: Record<string, (staging: string) => Promise<void>> = {
    'a deleted staging file': (p) => rm(p),
    'a truncated staging file': async (p) => {
      const fh = await open(p, 'r+');
      await fh.truncate(MiB);
      await fh.close();
    },
    'a changed byte in a trusted chunk': async (p) => {
      // The first changed extent of the map lies below the watermark: flip bytes across the image's
      // first few MiB, where the first chunks were written.
      const fh = await open(p, 'r+');
      for (let off = 0; off < 4 * MiB; off += 4096) await fh.write(Buffer.from([0x5a]), 0, 1, off + 7);
      await fh.close();
    },
  };

  for (const [what, harm] of Object.entries(damage)) {
    it(`starts the cycle over after ${what}, and publishes bit-exact`, async () => {
      const w = await world();
      await runLocalJob(job(w), { stateDir: w.state });
      const maps = await change(w, 500);
      await interrupted(w, maps);
      await harm(`${w.dst('b')}.ferry-staging`);
      const events: ReplicationEvent[] = [];
      const r = await runLocalJob(job(w, maps), { stateDir: w.state, onEvent: (e) => events.push(e) });
      const refused = events.filter((e) => e.type === 'resume-refused');
      expect(refused.map((e) => e.disk)).toContain('b');
      expect(r.disks.find((d) => d.disk === 'b')?.resumedBytes).toBe(0);
      await expectReplicas(w, w.src, 2);
    });
  }

  it('starts over when the progress record is lost or damaged', async () => {
    const w = await world();
    await runLocalJob(job(w), { stateDir: w.state });
    const maps = await change(w, 600);
    await interrupted(w, maps);
    await writeFile(join(w.state, 'progress', 'erp', 'b.json'), '{"cycleId": "erp#2", "wat');
    await rm(join(w.state, 'progress', 'erp', 'a.json'), { force: true });
    const r = await runLocalJob(job(w, maps), { stateDir: w.state });
    expect(r.disks.map((d) => d.resumedBytes)).toEqual([0, 0]);
    await expectReplicas(w, w.src, 2);
  });

  it('resumes an intact interruption without re-sending what was proven', async () => {
    const w = await world();
    await runLocalJob(job(w), { stateDir: w.state });
    const maps = await change(w, 700);
    await interrupted(w, maps);
    const r = await runLocalJob(job(w, maps), { stateDir: w.state });
    expect(r.disks.find((d) => d.disk === 'b')?.resumedBytes).toBeGreaterThan(0);
    await expectReplicas(w, w.src, 2);
  });
});
