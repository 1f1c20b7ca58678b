// The StateStore contract: every adapter (memory, local directory, DynamoDB) must pass this suite.
import { describe, expect, it } from 'vitest';
import type { RecoveryCheckpoint, StateStore } from '../../shared/engine/ports.ts';

const digest = (i: number) => i.toString(16).padStart(64, '0');
const digests = (from: number, to: number) => Array.from({ length: to - from }, (_, i) => digest(from + i));

export function checkpoint(set: string, sequence: number, parent?: string): RecoveryCheckpoint {
  return {
    id: `${set}#${sequence}`,
    set,
    sequence,
    createdAt: new Date(1_700_000_000_000 + sequence).toISOString(),
    parent,
    disks: [
      {
        disk: 'os',
        source: 'file:/src/os.img',
        target: 'file:/dst/os.img',
        sizeBytes: 1 << 30,
        kind: sequence === 1 ? 'full' : 'incremental',
        chunks: 3,
        bytes: 3 << 20,
        aggregate: { algorithm: 'ferry-chunk-sha256', value: digest(sequence) },
        targetRef: `ref-${sequence}`,
      },
    ],
  };
}

export function stateStoreContract(name: string, create: () => Promise<StateStore>): void {
  describe(`StateStore contract: ${name}`, () => {
    it('returns nothing for a disk without progress', async () => {
      const store = await create();
      expect(await store.loadProgress('set', 'disk')).toBeUndefined();
    });

    it('accumulates digests across saves of one cycle and returns them in order', async () => {
      const store = await create();
      const ids = { cycleId: 'set#1', fingerprint: 'f1' };
      await store.saveProgress('set', 'disk', { ...ids, watermark: 3, bytesDone: 300 }, digests(0, 3));
      await store.saveProgress('set', 'disk', { ...ids, watermark: 5, bytesDone: 500 }, digests(3, 5));
      const p = await store.loadProgress('set', 'disk');
      expect(p).toEqual({ ...ids, watermark: 5, bytesDone: 500, digests: digests(0, 5) });
    });

    it('starts over when the cycle or plan changes', async () => {
      const store = await create();
      await store.saveProgress(
        'set',
        'disk',
        { cycleId: 'set#1', fingerprint: 'f1', watermark: 2, bytesDone: 2 },
        digests(0, 2),
      );
      await store.saveProgress(
        'set',
        'disk',
        { cycleId: 'set#2', fingerprint: 'f2', watermark: 1, bytesDone: 1 },
        digests(7, 8),
      );
      const p = await store.loadProgress('set', 'disk');
      expect(p?.digests).toEqual(digests(7, 8));
      expect(p?.cycleId).toBe('set#2');
    });

    it('keeps disks and sets apart, including ids that share a prefix', async () => {
      const store = await create();
      const ids = { cycleId: 'a.b#1', fingerprint: 'f' };
      await store.saveProgress('a.b', 'disk-1', { ...ids, watermark: 1, bytesDone: 1 }, digests(0, 1));
      expect(await store.loadProgress('a.b', 'disk-2')).toBeUndefined();
      expect(await store.loadProgress('a', 'disk-1')).toBeUndefined();
      await store.clearProgress('a.b', 'disk-1');
      expect(await store.loadProgress('a.b', 'disk-1')).toBeUndefined();
    });

    it('publishes a checkpoint exactly once and lists the catalog in sequence order', async () => {
      const store = await create();
      await store.publishCheckpoint(checkpoint('web', 1));
      await store.publishCheckpoint(checkpoint('web', 2, 'web#1'));
      await store.publishCheckpoint(checkpoint('db', 1));
      await expect(store.publishCheckpoint(checkpoint('web', 2, 'web#1'))).rejects.toThrow(
        /already published/,
      );
      expect((await store.latestCheckpoint('web'))?.id).toBe('web#2');
      expect((await store.listCheckpoints('web')).map((c) => c.id)).toEqual(['web#1', 'web#2']);
      expect(await store.listCheckpoints()).toHaveLength(3);
      expect(await store.latestCheckpoint('none')).toBeUndefined();
      expect(await store.latestCheckpoint('web')).toEqual(checkpoint('web', 2, 'web#1'));
    });

    it('records each disk aggregate with the algorithm it names, whichever that is', async () => {
      // Prepare: one disk published by the engine, one by the serverless finalizer.
      const store = await create();
      const base = checkpoint('mixed', 1);
      const cp = {
        ...base,
        disks: [
          base.disks[0]!,
          {
            ...base.disks[0]!,
            disk: 'data',
            aggregate: { algorithm: 'ebs-linear-sha256' as const, value: digest(0xeb5) },
          },
        ],
      };

      // Act
      await store.publishCheckpoint(cp);

      // Assess: both read back with their own algorithm; neither is taken for the other.
      const read = await store.latestCheckpoint('mixed');
      expect(read?.disks.map((d) => d.aggregate)).toEqual([
        { algorithm: 'ferry-chunk-sha256', value: digest(1) },
        { algorithm: 'ebs-linear-sha256', value: digest(0xeb5) },
      ]);
    });

    it('lets only one of several concurrent publishers of a sequence win', async () => {
      const store = await create();
      const results = await Promise.allSettled(
        Array.from({ length: 8 }, () => store.publishCheckpoint(checkpoint('race', 1))),
      );
      expect(results.filter((r) => r.status === 'fulfilled')).toHaveLength(1);
      expect(await store.listCheckpoints('race')).toHaveLength(1);
    });
  });
}
