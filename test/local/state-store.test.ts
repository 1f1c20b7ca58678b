// The StateStore contract against the in-memory fake and the local state directory.
import { mkdtemp, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { LocalStateStore } from '../../shared/local/state-dir.ts';
import { stateStoreContract } from '../contract/state-store.ts';
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
});
