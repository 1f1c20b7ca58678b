// Point-in-time recovery of file targets, through the local runner: each published cycle keeps what
// it overwrote as history, any kept checkpoint is materialised bit-exact (compared with a copy of
// the source taken when it was published), retention prunes oldest first and crash-safely, and
// damaged history is caught by the verification, leaving nothing behind.
import { copyFile, mkdtemp, open, readdir, readFile, stat, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { recoverability, recoveredPath, recoverSet } from '../../cli/recover.ts';
import { type JobSpec, recoverLocalSet, runLocalJob } from '../../cli/run.ts';
import { MiB } from '../../shared/engine/units.ts';
import { historyDir, readHistory } from '../../shared/local/history.ts';
import { RecoveryError } from '../../shared/local/materialise.ts';
import { LocalStateStore } from '../../shared/local/state-dir.ts';
import { createDiskImage, firstDifference, mutateDisk } from '../../shared/local/workload.ts';

const SET = 'erp';

interface World {
  dir: string;
  state: string;
  sizes: Record<string, number>;
  src: (id: string) => string;
  dst: (id: string) => string;
  /** The copy of source `id` taken when checkpoint `seq` was published. */
  asOf: (id: string, seq: number) => string;
}

async function world(): Promise<World> {
  const dir = await mkdtemp(join(tmpdir(), 'ferry-history-'));
  const w: World = {
    dir,
    state: join(dir, 'state'),
    sizes: { a: 8 * MiB, b: 12 * MiB },
    src: (id) => join(dir, `${id}.src.img`),
    dst: (id) => join(dir, `${id}.dst.img`),
    asOf: (id, seq) => join(dir, `${id}.as-of-${seq}.img`),
  };
  await createDiskImage(w.src('a'), { size: w.sizes.a!, seed: 11 });
  await createDiskImage(w.src('b'), { size: w.sizes.b!, seed: 12 });
  return w;
}

/** Runs one cycle: disks with a change map go incremental, the others full. Keeps copies of the sources. */
async function cycle(
  w: World,
  changed: Record<string, string>,
  extra: Partial<JobSpec> = {},
  opts: Partial<Parameters<typeof runLocalJob>[1]> = {},
): Promise<number> {
  const spec: JobSpec = {
    set: SET,
    disks: ['a', 'b'].map((id) => ({
      id,
      source: `file:${w.src(id)}`,
      target: `file:${w.dst(id)}`,
      ...(changed[id] ? { changed: changed[id] } : {}),
    })),
    params: { checkpointInterval: '1 MiB', window: '2 MiB', windowLevels: ['1 MiB', '2 MiB'] },
    ...extra,
  };
  const r = await runLocalJob(spec, { stateDir: w.state, ...opts });
  for (const id of ['a', 'b']) await copyFile(w.src(id), w.asOf(id, r.checkpoint.sequence));
  return r.checkpoint.sequence;
}

/** Changes the sources of `ids` and returns their change maps. */
async function change(w: World, seed: number, ids = ['a', 'b']): Promise<Record<string, string>> {
  const maps: Record<string, string> = {};
  for (const id of ids) {
    const extents = await mutateDisk(w.src(id), {
      size: w.sizes[id]!,
      seed: seed + id.charCodeAt(0),
      smallWrites: 200,
      largeWrites: 2,
      largeSize: MiB,
    });
    maps[id] = join(w.dir, `${id}.changes.${seed}.json`);
    await writeFile(maps[id]!, JSON.stringify(extents));
  }
  return maps;
}

/**
 * Five checkpoints: #1 full, #2 incremental, #3 disk b grown to 16 MiB (a full re-seed over its
 * image) and disk a incremental, #4 and #5 incremental.
 */
async function fiveCheckpoints(w: World, extra: Partial<JobSpec> = {}): Promise<void> {
  expect(await cycle(w, {}, extra)).toBe(1);
  expect(await cycle(w, await change(w, 100), extra)).toBe(2);
  w.sizes.b = 16 * MiB;
  await truncate(w.src('b'), w.sizes.b);
  const grown = await change(w, 200);
  expect(await cycle(w, { a: grown.a! }, extra)).toBe(3);
  expect(await cycle(w, await change(w, 300), extra)).toBe(4);
  expect(await cycle(w, await change(w, 400), extra)).toBe(5);
}

/**
 * One world with five checkpoints, built on first use and shared by the tests of a describe that
 * only read it, or damage parts of it that no other of them reads (each says which).
 */
function sharedFiveCheckpoints(): () => Promise<World> {
  let built: Promise<World> | undefined;
  return () => {
    built ??= world().then(async (w) => {
      await fiveCheckpoints(w);
      return w;
    });
    return built;
  };
}

/** Recovers checkpoint `seq` into a fresh directory and returns it. */
async function recover(w: World, seq: number | string): Promise<string> {
  const to = join(w.dir, `recovered-${seq}-${Math.random().toString(36).slice(2)}`);
  await recoverSet({ set: SET, stateDir: w.state, choice: { checkpoint: String(seq) }, to });
  return to;
}

async function expectRecovered(w: World, seq: number): Promise<void> {
  const to = await recover(w, seq);
  for (const id of ['a', 'b']) {
    expect(
      await firstDifference(recoveredPath(to, id), w.asOf(id, seq)),
      `disk ${id} of #${seq}`,
    ).toBeUndefined();
  }
}

/** What refusing to recover `seq` said; the directory it was asked to write must not exist. */
async function refusal(w: World, seq: number): Promise<RecoveryError> {
  const to = join(w.dir, `refused-${seq}`);
  const err = await recoverSet({
    set: SET,
    stateDir: w.state,
    choice: { checkpoint: String(seq) },
    to,
  }).catch((e: unknown) => e);
  expect(err).toBeInstanceOf(RecoveryError);
  expect(await stat(to).catch(() => undefined)).toBeUndefined();
  return err as RecoveryError;
}

class Crash extends Error {}

describe('point-in-time recovery of file targets', () => {
  // Read by the first two tests only: recovering never writes the replicas or their history (the
  // second test asserts exactly that).
  const five = sharedFiveCheckpoints();

  it('recovers every checkpoint bit-exact, across increments and a re-seed of a grown disk', async () => {
    // Prepare
    const w = await five();
    // Assess: what each disk's history holds.
    const kinds = async (id: string) =>
      [...(await readHistory(w.dst(id))).entries.values()].map((e) => `${e.sequence}:${e.kind}`);
    expect(await kinds('a')).toEqual(['2:undo', '3:undo', '4:undo', '5:undo']);
    expect(await kinds('b')).toEqual(['2:undo', '3:undo', '4:undo', '5:undo']);
    // Act and assess: every checkpoint, oldest first.
    for (let seq = 1; seq <= 5; seq++) await expectRecovered(w, seq);
  });

  it('writes the recovered images sparse and leaves the replica and its history as they were', async () => {
    const w = await five();
    const before = await snapshot(w);
    const to = await recover(w, 'latest');
    // The sources are 60% allocated in 1 MiB runs: the copy allocates its non-zero 64 KiB runs only.
    const out = recoveredPath(to, 'b');
    const st = await stat(out);
    expect(st.size).toBe(16 * MiB);
    const data = await readFile(out);
    let nonZero = 0;
    for (let at = 0; at < data.length; at += 64 * 1024) {
      if (data.subarray(at, at + 64 * 1024).some((b) => b !== 0)) nonZero += 64 * 1024;
    }
    expect(nonZero).toBeLessThan(st.size);
    expect(st.blocks * 512).toBeLessThanOrEqual(nonZero + 64 * 1024);
    expect(await snapshot(w)).toEqual(before);
  });

  it('keeps no history for a cycle that was rolled back, and still recovers every published checkpoint', async () => {
    // Prepare: two checkpoints, then a cycle whose publication fails.
    const w = await world();
    await cycle(w, {});
    await cycle(w, await change(w, 100));
    const maps = await change(w, 200);
    await expect(
      runLocalJob(
        {
          set: SET,
          disks: ['a', 'b'].map((id) => ({
            id,
            source: `file:${w.src(id)}`,
            target: `file:${w.dst(id)}`,
            changed: maps[id]!,
          })),
          params: {},
        },
        {
          stateDir: w.state,
          step: (s) => {
            if (s === 'before-publish') throw new Error('catalog unavailable');
          },
        },
      ),
    ).rejects.toThrow(/catalog unavailable/);
    // Assess: the history holds #2's entry only, and both checkpoints recover.
    for (const id of ['a', 'b']) expect([...(await readHistory(w.dst(id))).entries.keys()]).toEqual([2]);
    await expectRecovered(w, 1);
    await expectRecovered(w, 2);
    // The rerun publishes #3 and keeps its history.
    expect(await cycle(w, maps)).toBe(3);
    for (let seq = 1; seq <= 3; seq++) await expectRecovered(w, seq);
  });

  it('keeps the history of a cycle whose clean-up a crash interrupted, when recovery completes it', async () => {
    const w = await world();
    await cycle(w, {});
    const maps = await change(w, 100);
    await expect(
      cycle(
        w,
        maps,
        {},
        {
          step: (s) => {
            if (s === 'after-publish') throw new Crash(s);
          },
        },
      ),
    ).rejects.toThrow(Crash);
    for (const id of ['a', 'b']) await copyFile(w.src(id), w.asOf(id, 2));
    expect(await new LocalStateStore(w.state).load(SET)).toBeDefined();
    // Act: recovering finishes the interrupted clean-up first (as verify does), then reads.
    await expectRecovered(w, 1);
    // Assess
    expect(await new LocalStateStore(w.state).load(SET)).toBeUndefined();
    expect([...(await readHistory(w.dst('a'))).entries.keys()]).toEqual([2]);
    await expectRecovered(w, 2);
    await recoverLocalSet(SET, w.state); // nothing left to do
  });

  it('keeps what a full copy changed, not the image it replaced: ~0 bytes when unchanged, the changed MiB when one changed', async () => {
    // Prepare: one 32 MiB disk of random data, replicated by full copies only (no change map).
    const w = await world();
    const src = w.src('a');
    await createDiskImage(src, { size: 32 * MiB, seed: 21, allocated: 1 });
    const full = async (): Promise<number> => {
      const r = await runLocalJob(
        { set: SET, disks: [{ id: 'a', source: `file:${src}`, target: `file:${w.dst('a')}` }], params: {} },
        { stateDir: w.state },
      );
      await copyFile(src, w.asOf('a', r.checkpoint.sequence));
      return r.checkpoint.sequence;
    };
    const undoBytes = async (seq: number) => {
      const entry = (await readHistory(w.dst('a'))).entries.get(seq)!;
      expect(entry.kind).toBe('undo');
      return (await stat(entry.data)).size;
    };
    const header = (extents: number) => 8 + extents * 16;
    // Act: #1 seeds, #2 copies the same data again, #3 after one MiB changed, #4 after the disk
    // shrank to 30.5 MiB (the cut region and the one past it differ).
    expect(await full()).toBe(1);
    expect(await full()).toBe(2);
    const fh = await open(src, 'r+');
    await fh.write(Buffer.alloc(MiB, 0x5a), 0, MiB, 5 * MiB);
    await fh.close();
    expect(await full()).toBe(3);
    await truncate(src, 30 * MiB + MiB / 2);
    expect(await full()).toBe(4);
    // Assess: each entry holds the previous checkpoint's bytes of the changed regions only.
    expect(await undoBytes(2)).toBe(header(0));
    expect(await undoBytes(3)).toBe(header(1) + MiB);
    expect(await undoBytes(4)).toBe(header(1) + 2 * MiB);
    const entries = [...(await readHistory(w.dst('a'))).entries.values()];
    expect(entries.map((e) => e.size)).toEqual([32 * MiB, 32 * MiB, 32 * MiB]);
    // Every checkpoint still recovers bit-exact, the shrunk one and those before it.
    for (let seq = 1; seq <= 4; seq++) {
      const to = await recover(w, seq);
      expect(await firstDifference(recoveredPath(to, 'a'), w.asOf('a', seq)), `#${seq}`).toBeUndefined();
      expect((await stat(recoveredPath(to, 'a'))).size).toBe((await stat(w.asOf('a', seq))).size);
    }
  });
});

describe('retention', () => {
  it('with count 2, prunes older history after each publication; a pruned checkpoint is refused by name', async () => {
    // Prepare
    const w = await world();
    await fiveCheckpoints(w, { retain: { count: 2 } });
    // Assess: only #5's entry is left (it turns #5 into #4); #4 and #5 recover.
    for (const id of ['a', 'b']) expect([...(await readHistory(w.dst(id))).entries.keys()]).toEqual([5]);
    await expectRecovered(w, 4);
    await expectRecovered(w, 5);
    const err = await refusal(w, 3);
    expect(err.message).toMatch(
      /^checkpoint erp#3, disk a: not recoverable any more: no history of erp#4 in /,
    );
    expect(err.message).toMatch(/pruned by the retention setting/);
    // The listing says the same.
    const view = await recoverability(await new LocalStateStore(w.state).readCatalog(SET));
    expect([...view.entries()].map(([id, r]) => `${id}:${r.recoverable}`)).toEqual([
      'erp#1:false',
      'erp#2:false',
      'erp#3:false',
      'erp#4:true',
      'erp#5:true',
    ]);
  });

  it('a crash in the middle of pruning leaves every kept checkpoint recoverable, and the next run finishes it', async () => {
    // Prepare: five checkpoints with the default retention (all kept).
    const w = await world();
    await fiveCheckpoints(w);
    const maps = await change(w, 500);
    // Act: #6 with count 3 keeps #4..#6; the prune "dies" once it moved #2's entry aside.
    const events: unknown[] = [];
    await cycle(
      w,
      maps,
      { retain: { count: 3 } },
      {
        pruneStep: () => {
          throw new Crash('mid-prune');
        },
        onHistory: (e) => events.push(e),
      },
    );
    // Assess: the run published; the entry moved aside is no entry, the ones after it are whole.
    expect(events).toEqual([
      { type: 'prune-failed', disk: 'a', error: 'mid-prune' },
      { type: 'prune-failed', disk: 'b', error: 'mid-prune' },
    ]);
    expect(await readdir(historyDir(w.dst('a')))).toEqual(
      expect.arrayContaining(['00000002.pruning', '00000003', '00000004', '00000005', '00000006']),
    );
    for (let seq = 3; seq <= 6; seq++) await expectRecovered(w, seq);
    // The next publication finishes the prune: #5..#7 kept, nothing aside left.
    await cycle(w, await change(w, 600), { retain: { count: 3 } });
    expect(await readdir(historyDir(w.dst('a')))).toEqual(['00000006', '00000007']);
    for (let seq = 5; seq <= 7; seq++) await expectRecovered(w, seq);
    await refusal(w, 4);
  });
});

describe('damaged history', () => {
  // Shared by the next two tests, which damage different records: disk a's undo of #4 (needed to
  // recover #3 and older; its manifest is intact, so planning passes it) and disk b's manifest of #3
  // (checked when #2 or older is planned). Each asserts a checkpoint the other's damage leaves
  // alone: #3 fails on disk a's data, #2 is refused at disk b's manifest before anything is written.
  const five = sharedFiveCheckpoints();

  it('a changed byte in an undo record fails the verification, naming disk, checkpoint and offset; nothing is left', async () => {
    // Prepare: flip the first saved byte of #4's undo record of disk a (what #4 overwrote of #3).
    const w = await five();
    const entry = (await readHistory(w.dst('a'))).entries.get(4)!;
    const fh = await open(entry.data, 'r+');
    const index = Buffer.alloc(24);
    await fh.read(index, 0, 24, 0);
    const count = Number(index.readBigUInt64LE(0));
    const firstOffset = Number(index.readBigUInt64LE(8));
    const byte = Buffer.alloc(1);
    await fh.read(byte, 0, 1, 8 + count * 16);
    await fh.write(Buffer.from([byte[0]! ^ 0xff]), 0, 1, 8 + count * 16);
    await fh.close();
    // Act
    const err = await refusal(w, 3);
    // Assess
    const region = Math.floor(firstOffset / MiB) * MiB;
    expect(err.message).toMatch(
      new RegExp(
        `^checkpoint erp#3, disk a: the materialised image does not match the checkpoint's manifest at offset ${region}[ :]`,
      ),
    );
    expect(err.offset).toBe(region);
    // Checkpoints the damaged record is not needed for still recover.
    await expectRecovered(w, 4);
  });

  it('a changed manifest in the history is refused before anything is written', async () => {
    const w = await five();
    const entry = (await readHistory(w.dst('b'))).entries.get(3)!;
    const manifest = await readFile(entry.manifest);
    manifest[0]! ^= 1;
    await writeFile(entry.manifest, manifest);
    const err = await refusal(w, 2);
    expect(err.message).toMatch(
      /^checkpoint erp#2, disk b: the manifest .* does not match the catalog .*: the history was altered$/,
    );
  });

  it('refuses a target that is not a local file, or a node it cannot reach', async () => {
    const w = await world();
    await new LocalStateStore(w.state).publishCheckpoint({
      id: `${SET}#1`,
      set: SET,
      sequence: 1,
      createdAt: new Date().toISOString(),
      parent: undefined,
      disks: [
        {
          disk: 'a',
          source: 'file:/dev/null',
          target: 'ferry://127.0.0.1:7790/a',
          sizeBytes: MiB,
          kind: 'full',
          chunks: 1,
          bytes: MiB,
          aggregate: { algorithm: 'ferry-chunk-sha256', value: '0'.repeat(64) },
          targetRef: 'manifest-sha256:x',
        },
      ],
    });
    const err = await refusal(w, 1);
    // A node's replica is recovered from its node (test/net/node-recovery.test.ts): without a way
    // to reach it, the refusal says what to give.
    expect(err.message).toBe(
      'checkpoint erp#1, disk a: its replica ferry://127.0.0.1:7790/a is on a ferry node: give --join FILE (or FERRY_JOIN, or --insecure for a node on this host) to recover it from there',
    );
  });
});

/** Sizes and modification times of the replicas and everything in their history. */
async function snapshot(w: World): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  for (const id of ['a', 'b']) {
    for (const path of [w.dst(id), `${w.dst(id)}.ferry-manifest`]) {
      const st = await stat(path);
      out[path] = `${st.size}@${st.mtimeMs}`;
    }
    for (const e of (await readHistory(w.dst(id))).entries.values()) {
      for (const path of [e.data, e.manifest]) {
        const st = await stat(path);
        out[path] = `${st.size}@${st.mtimeMs}`;
      }
    }
  }
  return out;
}
