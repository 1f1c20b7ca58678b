// The StateStore contract against the in-memory fake and the local state directory.
import { spawnSync } from 'node:child_process';
import { mkdir, mkdtemp, writeFile } from 'node:fs/promises';
import { hostname, tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { CatalogError } from '../../shared/engine/errors.ts';
import { LocalStateStore } from '../../shared/local/state-dir.ts';
import { checkpoint, stateStoreContract } from '../contract/state-store.ts';
import { MemoryStateStore } from '../support/memory.ts';

stateStoreContract('memory', async () => new MemoryStateStore());
stateStoreContract(
  'local directory',
  async () => new LocalStateStore(await mkdtemp(join(tmpdir(), 'ferry-state-'))),
);

describe('LocalStateStore', () => {
  it('ignores digests appended by a save that crashed before its record was written', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'ferry-state-'));
    const store = new LocalStateStore(dir);
    const ids = { cycleId: 's#1', fingerprint: 'f' };
    await store.saveProgress('s', 'd', { ...ids, watermark: 1, bytesDone: 1 }, ['aa'.repeat(32)]);
    // A crash between the digest append and the record rename leaves extra digests on disk.
    await writeFile(
      join(dir, 'progress', 's', 'd.digests'),
      Buffer.concat([Buffer.alloc(32, 0xaa), Buffer.alloc(64, 0xbb)]),
    );
    const p = await store.loadProgress('s', 'd');
    expect(p?.digests).toEqual(['aa'.repeat(32)]);
    await store.saveProgress('s', 'd', { ...ids, watermark: 2, bytesDone: 2 }, ['cc'.repeat(32)]);
    expect((await store.loadProgress('s', 'd'))?.digests).toEqual(['aa'.repeat(32), 'cc'.repeat(32)]);
  });

  it('names the damaged file when a record is not JSON', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'ferry-state-'));
    const store = new LocalStateStore(dir);
    await store.saveProgress('s', 'd', { cycleId: 's#1', fingerprint: 'f', watermark: 0, bytesDone: 0 }, []);
    await writeFile(join(dir, 'progress', 's', 'd.json'), '{not json');
    await expect(store.loadProgress('s', 'd')).rejects.toThrow(/d\.json is not valid JSON/);
  });

  it('refuses set and disk names that would leave their folder', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'ferry-state-'));
    const store = new LocalStateStore(dir);
    const ids = { cycleId: 'x#1', fingerprint: 'f', watermark: 0, bytesDone: 0 };
    for (const [set, disk] of [
      ['..', 'd'],
      ['s', '..'],
      ['s', '../d'],
      ['a/b', 'd'],
      ['.hidden', 'd'],
      ['s', ''],
    ] as const) {
      await expect(store.saveProgress(set, disk, ids, [])).rejects.toThrow(/name .* is not allowed/);
    }
    await expect(store.publishCheckpoint(checkpoint('..', 1))).rejects.toThrow(
      /set name "\.\." is not allowed/,
    );
    await expect(store.listCheckpoints('../x')).rejects.toThrow(/not allowed/);
  });

  it('keeps working around a damaged catalog entry, and refuses to take an older one for the latest', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'ferry-state-'));
    const store = new LocalStateStore(dir);
    for (const n of [1, 2, 3])
      await store.publishCheckpoint(checkpoint('web', n, n > 1 ? `web#${n - 1}` : undefined));
    const entry = (n: number) => join(dir, 'catalog', 'web', `0000000${n}.json`);

    // The oldest entry emptied: the others are listed, the damage is reported by path.
    await writeFile(entry(1), '');
    const view = await store.readCatalog('web');
    expect(view.checkpoints.map((c) => c.id)).toEqual(['web#2', 'web#3']);
    expect(view.damaged).toEqual([expect.objectContaining({ path: entry(1), sequence: 1 })]);
    expect((await store.latestCheckpoint('web'))?.id).toBe('web#3');

    // The latest entry damaged (truncated, or holding another checkpoint): no silent fallback to #2.
    await writeFile(entry(3), '{"id": "web#3", "se');
    const err = await store.latestCheckpoint('web').catch((e: unknown) => e);
    expect(err).toBeInstanceOf(CatalogError);
    expect((err as CatalogError).sequence).toBe(3);
    expect((err as CatalogError).message).toContain(entry(3));
    await writeFile(entry(3), JSON.stringify(checkpoint('web', 2, 'web#1')));
    await expect(store.latestCheckpoint('web')).rejects.toThrow(/holds checkpoint #2 of set web, not #3/);
  });

  it('reads a catalog entry from before aggregates were named as the ferry-chunk-sha256 one', async () => {
    // Prepare: an entry as this directory's writer (the engine) recorded it before issue #12.
    const dir = await mkdtemp(join(tmpdir(), 'ferry-state-'));
    const store = new LocalStateStore(dir);
    const { aggregate, ...disk } = checkpoint('web', 1).disks[0]!;
    const legacy = { ...checkpoint('web', 1), disks: [{ ...disk, aggregateSha256: aggregate.value }] };
    await mkdir(join(dir, 'catalog', 'web'), { recursive: true });
    await writeFile(join(dir, 'catalog', 'web', '00000001.json'), JSON.stringify(legacy));

    // Act
    const read = await store.latestCheckpoint('web');

    // Assess: the value, now named by the algorithm that computed it; nothing reported damaged.
    expect(read?.disks[0]?.aggregate).toEqual({ algorithm: 'ferry-chunk-sha256', value: aggregate.value });
    expect(read).toEqual(checkpoint('web', 1));
    expect((await store.readCatalog('web')).damaged).toEqual([]);
  });

  it('reports an entry whose aggregate names an unknown algorithm as damaged, not as some other one', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'ferry-state-'));
    const store = new LocalStateStore(dir);
    const cp = checkpoint('web', 1);
    const disk = { ...cp.disks[0]!, aggregate: { algorithm: 'md5-of-chunks', value: 'aa'.repeat(32) } };
    await mkdir(join(dir, 'catalog', 'web'), { recursive: true });
    await writeFile(join(dir, 'catalog', 'web', '00000001.json'), JSON.stringify({ ...cp, disks: [disk] }));

    const view = await store.readCatalog('web');

    expect(view.checkpoints).toEqual([]);
    expect(view.damaged).toEqual([
      expect.objectContaining({ sequence: 1, reason: expect.stringMatching(/00000001\.json is malformed/) }),
    ]);
  });

  it('records a commit intent durably until it is cleared', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'ferry-state-'));
    const store = new LocalStateStore(dir);
    expect(await store.load('s')).toBeUndefined();
    const intent = { set: 's', cycleId: 's#4', disks: [{ disk: 'os', target: 'file:/dr/os.img' }] };
    await store.begin(intent);
    expect(await new LocalStateStore(dir).load('s')).toEqual(intent);
    expect(await store.load('other')).toBeUndefined();
    await store.clear('s');
    expect(await store.load('s')).toBeUndefined();
  });

  it('says that a state directory cannot be written, with the cause', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'ferry-state-'));
    await writeFile(join(dir, 'file'), 'x');
    // A directory below a regular file cannot be created (ENOTDIR), as a read-only mount cannot.
    await expect(new LocalStateStore(join(dir, 'file', 'state')).checkWritable()).rejects.toThrow(
      /state directory .*file\/state is not writable: ENOTDIR/,
    );
    await new LocalStateStore(join(dir, 'ok')).checkWritable();
  });

  it('lets one process at a time hold a set, and takes over the lock of a process that died', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'ferry-state-'));
    const store = new LocalStateStore(dir);
    const release = await store.lockSet('erp');
    await expect(new LocalStateStore(dir).lockSet('erp')).rejects.toThrow(
      new RegExp(`set erp is in use by process ${process.pid} on .*; wait for it to finish`),
    );
    const other = await store.lockSet('web'); // sets are independent
    await other();
    await release();
    const again = await store.lockSet('erp');
    await again();

    // A lock left by a process that no longer exists (SIGKILL leaves it behind) is taken over.
    const dead = spawnSync(process.execPath, ['-e', 'process.stdout.write(String(process.pid))']);
    const pid = Number(dead.stdout.toString());
    await writeFile(
      join(dir, 'locks', 'erp.lock'),
      JSON.stringify({ pid, host: hostname(), since: '2026-12-04T00:00:00.000Z' }),
    );
    const taken = await store.lockSet('erp');
    await expect(store.lockSet('erp')).rejects.toThrow(/in use/);
    await taken();
  });
});
