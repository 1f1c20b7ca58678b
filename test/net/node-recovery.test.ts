// Point-in-time recovery of sets replicated to a node (issue #11): the node keeps each published
// cycle's history under its checkpoint, prunes it by the source's retention, and streams any kept
// checkpoint back, over TLS with a join file; the source verifies what it wrote against the
// checkpoint's manifest. Refusals (pruned, a credential without the disk, a manifest that does not
// match the catalog) come before any byte is written, and leave nothing behind.
import { copyFile, mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { recoverability, recoveredPath, recoverSet } from '../../cli/recover.ts';
import { type HistoryEvent, type JobSpec, runLocalJob } from '../../cli/run.ts';
import { MiB } from '../../shared/engine/units.ts';
import { readHistory } from '../../shared/local/history.ts';
import { ImageDirectory } from '../../shared/local/image-dir.ts';
import type { MaterialiseProgress } from '../../shared/local/materialise.ts';
import { LocalStateStore } from '../../shared/local/state-dir.ts';
import { createDiskImage, mutateDisk } from '../../shared/local/workload.ts';
import { type NodeOptions, startNode } from '../../shared/net/node.ts';
import type { NodeTargets } from '../../shared/net/node-targets.ts';
import { issueCredential, openNodePki } from '../../shared/net/pki.ts';
import { ferry } from '../support/ferry-cli.ts';

const SET = 'nr';
const DISKS = { a: 4 * MiB, b: 6 * MiB } as const;
type Disk = keyof typeof DISKS;

const cleanups: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (let c = cleanups.pop(); c; c = cleanups.pop()) await c();
});

async function workdir(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'ferry-node-recovery-'));
  cleanups.push(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

interface World {
  dir: string;
  state: string;
  images: string;
  nodeState: string;
  join: string;
  port: number;
  log: string[];
  src: (d: Disk) => string;
  /** The copy of source `d` taken when checkpoint `seq` was published. */
  asOf: (d: Disk, seq: number) => string;
}

/** A TLS node on loopback (its images keep history), and two source disks. */
async function world(wrap?: (targets: ImageDirectory) => NodeTargets): Promise<World> {
  const dir = await workdir();
  const images = join(dir, 'images');
  const nodeState = join(dir, 'node');
  const { mkdir } = await import('node:fs/promises');
  await mkdir(images);
  const pki = await openNodePki(nodeState);
  const log: string[] = [];
  const targets = await ImageDirectory.open(images);
  const opts: NodeOptions = {
    listen: '127.0.0.1:0',
    targets: wrap ? wrap(targets) : targets,
    stateDir: nodeState,
    tls: pki.tls,
    log: (line) => log.push(line),
  };
  const node = await startNode(opts);
  cleanups.push(() => node.close());
  const w: World = {
    dir,
    state: join(dir, 'state'),
    images,
    nodeState,
    join: pki.joinFile,
    port: node.port,
    log,
    src: (d) => join(dir, `${d}.src.img`),
    asOf: (d, seq) => join(dir, `${d}.as-of-${seq}.img`),
  };
  for (const [i, d] of (['a', 'b'] as const).entries()) {
    await createDiskImage(w.src(d), { size: DISKS[d], seed: 31 + i });
  }
  return w;
}

const target = (w: World, d: Disk) => `ferry://127.0.0.1:${w.port}/${d}`;

/** One cycle of both disks to the node (incremental when `changed` has maps); keeps copies of the sources. */
async function cycle(
  w: World,
  changed: Partial<Record<Disk, string>> = {},
  extra: Partial<JobSpec> = {},
  onHistory?: (e: HistoryEvent) => void,
): Promise<number> {
  const spec: JobSpec = {
    set: SET,
    disks: (['a', 'b'] as const).map((d) => ({
      id: d,
      source: `file:${w.src(d)}`,
      target: target(w, d),
      join: w.join,
      ...(changed[d] ? { changed: changed[d] } : {}),
    })),
    params: { chunkSize: '1 MiB', window: '8 MiB', adaptive: false },
    ...extra,
  };
  const r = await runLocalJob(spec, { stateDir: w.state, ...(onHistory ? { onHistory } : {}) });
  for (const d of ['a', 'b'] as const) await copyFile(w.src(d), w.asOf(d, r.checkpoint.sequence));
  return r.checkpoint.sequence;
}

/** Changes both sources; returns their change maps. */
async function change(w: World, seed: number): Promise<Record<Disk, string>> {
  const maps = {} as Record<Disk, string>;
  for (const d of ['a', 'b'] as const) {
    const extents = await mutateDisk(w.src(d), {
      size: DISKS[d],
      seed: seed + d.charCodeAt(0),
      smallWrites: 40,
      largeWrites: 1,
      largeSize: MiB,
    });
    maps[d] = join(w.dir, `${d}.changes.${seed}.json`);
    await writeFile(maps[d], JSON.stringify(extents));
  }
  return maps;
}

/** Four cycles: a full copy, then three increments with changes between them. */
async function fourCycles(w: World, extra: Partial<JobSpec> = {}, onHistory?: (e: HistoryEvent) => void) {
  await cycle(w, {}, extra, onHistory);
  for (const seed of [100, 200, 300]) await cycle(w, await change(w, seed), extra, onHistory);
}

const exists = (path: string) =>
  stat(path).then(
    () => true,
    () => false,
  );

describe('point-in-time recovery from a ferry node', () => {
  it('keeps history on the node under each checkpoint and recovers every kept checkpoint bit-exact', async () => {
    // Prepare: four cycles to the node over TLS.
    const w = await world();
    await fourCycles(w);

    // Assess: the node's history is named after the checkpoints that overwrote it.
    for (const d of ['a', 'b'] as const) {
      const history = await readHistory(join(w.images, d));
      expect([...history.entries.values()].map((e) => [e.sequence, e.cycleId])).toEqual([
        [2, `${SET}#2`],
        [3, `${SET}#3`],
        [4, `${SET}#4`],
      ]);
    }

    // Act / Assess: every checkpoint, recovered from the node, is the source as it was.
    for (const seq of [1, 2, 3, 4]) {
      const to = join(w.dir, `out-${seq}`);
      const progress: MaterialiseProgress[] = [];
      const r = await recoverSet({
        set: SET,
        stateDir: w.state,
        choice: { checkpoint: String(seq) },
        to,
        access: { join: w.join },
        onProgress: (p) => progress.push(p),
      });
      expect(r.checkpoint.id).toBe(`${SET}#${seq}`);
      for (const d of ['a', 'b'] as const) {
        const got = await readFile(recoveredPath(to, d));
        expect(got.equals(await readFile(w.asOf(d, seq))), `disk ${d} of checkpoint ${seq}`).toBe(true);
        // Sparse: only the non-zero data was written (the disks are part zeros).
        const st = await stat(recoveredPath(to, d));
        expect(st.blocks * 512).toBeLessThan(DISKS[d]);
      }
      expect(r.disks.map((d) => [d.disk, d.regions])).toEqual([
        ['a', 4],
        ['b', 6],
      ]);
      expect(new Set(progress.map((p) => p.phase))).toEqual(new Set(['copy', 'verify']));
    }

    // Assess: the listing asks the node, and every checkpoint is recoverable.
    const catalog = await new LocalStateStore(w.state).readCatalog(SET);
    const listing = await recoverability(catalog, { join: w.join });
    expect([...listing.values()]).toEqual([1, 2, 3, 4].map(() => ({ recoverable: true })));
    // No node data or credentials in its log: lines name disks and checkpoints only.
    expect(w.log.join('\n')).not.toMatch(/BEGIN|PRIVATE/);
  });

  it('prunes the node history by the source retention: pruned checkpoints are refused and nothing is written', async () => {
    // Prepare: retain 2 over four cycles.
    const w = await world();
    const events: HistoryEvent[] = [];
    await fourCycles(w, { retain: { count: 2 } }, (e) => events.push(e));

    // Assess: each publication pruned the entry no kept checkpoint needs, on the node.
    expect(events).toEqual([
      { type: 'pruned', disk: 'a', sequences: [2] },
      { type: 'pruned', disk: 'b', sequences: [2] },
      { type: 'pruned', disk: 'a', sequences: [3] },
      { type: 'pruned', disk: 'b', sequences: [3] },
    ]);
    expect([...(await readHistory(join(w.images, 'a'))).entries.keys()]).toEqual([4]);

    // Act / Assess: checkpoint 2 is refused with the reason, before anything is written.
    const to = join(w.dir, 'out-2');
    await expect(
      recoverSet({ set: SET, stateDir: w.state, choice: { checkpoint: '2' }, to, access: { join: w.join } }),
    ).rejects.toThrow(
      /checkpoint nr#2, disk a: not recoverable any more: no history of nr#3 .*pruned by the retention setting/,
    );
    expect(await exists(to)).toBe(false);

    // Act / Assess: the kept ones (3, 4) are recovered bit-exact.
    for (const seq of [3, 4]) {
      const out = join(w.dir, `out-${seq}`);
      await recoverSet({
        set: SET,
        stateDir: w.state,
        choice: { checkpoint: String(seq) },
        to: out,
        access: { join: w.join },
      });
      for (const d of ['a', 'b'] as const) {
        expect((await readFile(recoveredPath(out, d))).equals(await readFile(w.asOf(d, seq)))).toBe(true);
      }
    }
    const listing = await recoverability(await new LocalStateStore(w.state).readCatalog(SET), {
      join: w.join,
    });
    expect(listing.get(`${SET}#1`)).toEqual({
      recoverable: false,
      reason: expect.stringMatching(/^disk a has no history of nr#2 \(pruned by the retention setting/),
    });
    expect(listing.get(`${SET}#2`)?.recoverable).toBe(false);
    expect(listing.get(`${SET}#3`)).toEqual({ recoverable: true });
  });

  it('refuses a credential without the disk, and says so per checkpoint when the node cannot be reached', async () => {
    // Prepare
    const w = await world();
    await cycle(w);
    const scoped = join(w.dir, 'other.json');
    await issueCredential(w.nodeState, scoped, { disks: 'other-*' });
    const to = join(w.dir, 'out');

    // Act / Assess: the node refuses the credential for disk a; nothing is written.
    await expect(
      recoverSet({ set: SET, stateDir: w.state, choice: {}, to, access: { join: scoped } }),
    ).rejects.toThrow(/checkpoint nr#1, disk a: the node could not be asked: .*may not write disk a/);
    expect(await exists(to)).toBe(false);

    // Act / Assess: without a way to reach the node, said; with the node gone, said per checkpoint.
    await expect(recoverSet({ set: SET, stateDir: w.state, choice: {}, to })).rejects.toThrow(
      /is on a ferry node: give --join FILE/,
    );
    const catalog = await new LocalStateStore(w.state).readCatalog(SET);
    for (const c of cleanups.splice(1)) await c(); // the node stops; the work directory stays
    const listing = await recoverability(catalog, { join: w.join });
    expect(listing.get(`${SET}#1`)).toEqual({
      recoverable: false,
      reason: expect.stringMatching(/^disk a: its node 127\.0\.0\.1:\d+ could not be reached/),
    });
  });

  it('refuses a manifest that does not match the catalog, on the node and from a node that lies', async () => {
    // Prepare: a node whose plan answers with a manifest one bit off.
    const lying = await world((images) => ({
      name: images.name,
      target: (d) => images.target(d),
      exists: (d) => images.exists(d),
      nameHistory: (...a) => images.nameHistory(...a),
      pruneHistory: (...a) => images.pruneHistory(...a),
      materialise: (...a) => images.materialise(...a),
      planRecovery: async (d, q, withManifest) => {
        const planned = await images.planRecovery(d, q, withManifest);
        const manifest = planned.manifest ? Buffer.from(planned.manifest) : undefined;
        if (manifest) manifest[0]! ^= 1;
        return { ...planned, manifest };
      },
    }));
    await cycle(lying);
    const to = join(lying.dir, 'out');

    // Act / Assess: the client checks the manifest's digest before it trusts it.
    await expect(
      recoverSet({ set: SET, stateDir: lying.state, choice: {}, to, access: { join: lying.join } }),
    ).rejects.toThrow(/disk a: the manifest the node sent does not match the catalog .*not trusted/);
    expect(await exists(to)).toBe(false);

    // Prepare: an honest node whose replica's manifest was altered.
    const w = await world();
    await cycle(w);
    const manifest = join(w.images, 'b.ferry-manifest');
    const bytes = await readFile(manifest);
    bytes[5]! ^= 0xff;
    await writeFile(manifest, bytes);

    // Act / Assess: the node itself refuses it (disk b), and the output directory is gone again.
    const out = join(w.dir, 'out');
    await expect(
      recoverSet({ set: SET, stateDir: w.state, choice: {}, to: out, access: { join: w.join } }),
    ).rejects.toThrow(/checkpoint nr#1, disk b: the manifest .* does not match the catalog/);
    expect(await exists(out)).toBe(false);
  });

  it('keeps recovery correct, or refuses it cleanly, after a run killed between commit and after-publish', async () => {
    // Prepare: checkpoint 1, then cycle 2 killed right after it was published (the node never
    // heard AFTER_PUBLISH).
    const w = await world();
    await cycle(w);
    const replicate = (...more: string[]) =>
      ferry([
        'replicate',
        '--set',
        SET,
        '--state',
        w.state,
        '--disk',
        'a',
        '--source',
        `file:${w.src('a')}`,
        '--target',
        target(w, 'a'),
        '--disk',
        'b',
        '--source',
        `file:${w.src('b')}`,
        '--target',
        target(w, 'b'),
        '--join',
        w.join,
        '--window',
        '8MiB',
        '--no-adaptive',
        ...more,
      ]);
    const maps = await change(w, 400);
    const killed = await killedAfterPublish(w, maps);
    expect(killed.signal).toBe('SIGKILL');
    for (const d of ['a', 'b'] as const) await copyFile(w.src(d), w.asOf(d, 2));

    // Act: the next run finishes the commit first: it tells the node which checkpoint it became.
    const next = await replicate(
      '--changed',
      await writeJson(w, 'a-none.json', []),
      '--changed',
      await writeJson(w, 'b-none.json', []),
    );
    expect(next.code, next.stderr).toBe(0);

    // Assess: the node kept cycle 2's history under #2, so checkpoint 1 is still recovered exactly.
    expect((await readHistory(join(w.images, 'a'))).entries.get(2)?.cycleId, w.log.join('\n')).toBe(
      `${SET}#2`,
    );
    const out1 = join(w.dir, 'out-1');
    await recoverSet({
      set: SET,
      stateDir: w.state,
      choice: { checkpoint: '1' },
      to: out1,
      access: { join: w.join },
    });
    for (const d of ['a', 'b'] as const) {
      expect((await readFile(recoveredPath(out1, d))).equals(await readFile(w.asOf(d, 1)))).toBe(true);
    }

    // Prepare: checkpoint 4 killed the same way; this time the interrupted commit is finished by a
    // `ferry verify` that cannot reach the node, so the node learns its fate only from cycle 5's
    // HELLO, which does not say which checkpoint it became.
    const maps4 = await change(w, 500);
    const killed4 = await killedAfterPublish(w, maps4);
    expect(killed4.signal).toBe('SIGKILL');
    const verify = await ferry(['verify', '--set', SET, '--state', w.state], {
      env: { ...process.env, FERRY_JOIN: '' },
    });
    expect(verify.stderr).toMatch(/finished the clean-up of nr#4 .*committed on a ferry node/);
    const fifth = await replicate(
      '--changed',
      await writeJson(w, 'a-none5.json', []),
      '--changed',
      await writeJson(w, 'b-none5.json', []),
    );
    expect(fifth.code, fifth.stderr).toBe(0);

    // Assess: checkpoint 3 is refused for want of cycle 4's history (never a wrong image); 4 and 5 are recovered.
    const out3 = join(w.dir, 'out-3');
    await expect(
      recoverSet({
        set: SET,
        stateDir: w.state,
        choice: { checkpoint: '3' },
        to: out3,
        access: { join: w.join },
      }),
    ).rejects.toThrow(/checkpoint nr#3, disk a: not recoverable any more: no history of nr#4/);
    expect(await exists(out3)).toBe(false);
    expect(w.log.join('\n')).toMatch(/the commit of cycle nr#4 was published; it is final, without history/);
    const out4 = join(w.dir, 'out-4');
    await recoverSet({
      set: SET,
      stateDir: w.state,
      choice: { checkpoint: '4' },
      to: out4,
      access: { join: w.join },
    });
    for (const d of ['a', 'b'] as const) {
      expect((await readFile(recoveredPath(out4, d))).equals(await readFile(w.src(d)))).toBe(true);
    }

    // Prepare: checkpoint 6 killed the same way, its commit finished by a `ferry verify --join`:
    // verify tells the node which checkpoint the commit became, so its history is kept.
    for (const d of ['a', 'b'] as const) await copyFile(w.src(d), w.asOf(d, 5));
    const maps6 = await change(w, 600);
    const killed6 = await killedAfterPublish(w, maps6);
    expect(killed6.signal).toBe('SIGKILL');
    const verify6 = await ferry(['verify', '--set', SET, '--state', w.state, '--join', w.join]);
    expect(verify6.code, verify6.stderr).toBe(0);
    // Assess: checkpoint 5 needs cycle 6's history, and has it.
    const out5 = join(w.dir, 'out-5');
    await recoverSet({
      set: SET,
      stateDir: w.state,
      choice: { checkpoint: '5' },
      to: out5,
      access: { join: w.join },
    });
    for (const d of ['a', 'b'] as const) {
      expect((await readFile(recoveredPath(out5, d))).equals(await readFile(w.asOf(d, 5)))).toBe(true);
    }
    expect((await readdir(w.images)).filter((n) => n.startsWith('.ferry-recovery'))).toEqual([
      '.ferry-recovery',
    ]);
    expect(await readdir(join(w.images, '.ferry-recovery'))).toEqual([]);
  });
});

/** A run of both disks with these change maps, killed between the node's commit and AFTER_PUBLISH. */
async function killedAfterPublish(w: World, maps: Record<Disk, string>) {
  return ferry(
    [
      'replicate',
      '--job',
      await jobFile(w, maps),
      '--state',
      w.state,
      '--join',
      w.join,
      '--window',
      '8MiB',
      '--no-adaptive',
    ],
    { env: { ...process.env, FERRY_TEST_CRASH_AT: 'after-publish' } },
  );
}

async function writeJson(w: World, name: string, value: unknown): Promise<string> {
  const path = join(w.dir, name);
  await writeFile(path, JSON.stringify(value));
  return path;
}

/** A job file of both disks with these change maps. */
async function jobFile(w: World, maps: Record<Disk, string>): Promise<string> {
  return writeJson(w, `job-${Date.now()}.json`, {
    set: SET,
    disks: (['a', 'b'] as const).map((d) => ({
      id: d,
      source: `file:${w.src(d)}`,
      target: target(w, d),
      changed: maps[d],
    })),
  });
}
