// The CycleLedger contract (shared/engine/cycle/ports.ts): the memory fake and the DynamoDB adapter
// must both pass it.
import { createHash } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import type {
  CompletionEntry,
  CycleDiskRecord,
  CycleLedger,
  CycleRecord,
  PlannedDescriptor,
  SignalDelta,
} from '../../shared/engine/cycle/ports.ts';
import { EBS_BLOCK_SIZE } from '../../shared/engine/cycle/ports.ts';

const BLOCK = EBS_BLOCK_SIZE;

export function cycleRecord(over: Partial<CycleRecord> = {}): CycleRecord {
  return {
    plan: 'plan-finance',
    set: 'finance',
    cycleId: 'c1',
    lockOwner: 'exec-1',
    sequence: 3,
    parentCheckpointId: 'finance#2',
    disks: ['vol-os', 'vol-data'],
    chunkSize: 1 << 20,
    windowLevels: [8 << 20, 32 << 20, 64 << 20],
    initialLevel: 1,
    adaptive: true,
    createdAt: 1_717_200_000_000,
    state: 'active',
    ticks: 0,
    idleTicks: 0,
    lastCompleted: 0,
    ...over,
  };
}

export function diskRecord(over: Partial<CycleDiskRecord> = {}): CycleDiskRecord {
  return {
    set: 'finance',
    disk: 'vol-os',
    cycleId: 'c1',
    kind: 'incremental',
    state: 'active',
    volumeSizeGiB: 8,
    sourceSnapshotId: 'snap-0123456789abcdef0',
    previousSourceSnapshotId: 'snap-0fedcba9876543210',
    targetSnapshotId: 'snap-0aaaaaaaaaaaaaaaa',
    targetStartedAt: 1_717_200_001_000,
    chunkSize: 1 << 20,
    perPage: 200,
    encrypted: false,
    diffDone: false,
    diffSeq: 0,
    diffStartBlock: 0,
    diffBlocks: 0,
    diffBytes: 0,
    ...over,
  };
}

/** `count` descriptors from `firstSeq`, 1 MiB cells, alternately one and two changed blocks. */
export function plannedDescriptors(firstSeq: number, count: number): PlannedDescriptor[] {
  return Array.from({ length: count }, (_, i) => {
    const seq = firstSeq + i;
    const offset = seq * 2 * BLOCK;
    const two = seq % 2 === 1;
    return {
      seq,
      offset,
      length: (two ? 2 : 1) * BLOCK,
      extents: [{ offset, length: (two ? 2 : 1) * BLOCK }],
      bytes: (two ? 2 : 1) * BLOCK,
      tokens: two ? [`tok-${seq}-a`, undefined] : [`tok-${seq}`],
    };
  });
}

export const checksumOf = (label: string): string => createHash('sha256').update(label).digest('base64');

export function completion(seq: number, blocks = 2): CompletionEntry {
  return {
    seq,
    blocks: Array.from({ length: blocks }, (_, k) => ({
      index: seq * 2 + k,
      checksum: checksumOf(`block ${seq * 2 + k}`),
    })),
  };
}

const noSignals: SignalDelta = {
  attempts: 0,
  successes: 0,
  throttles: 0,
  errors: 0,
  bytes: 0,
  latencyMs: 0,
  windowLimited: 0,
  nodePressure: 0,
};

async function collect<T>(it: AsyncIterable<T>): Promise<T[]> {
  const out: T[] = [];
  for await (const x of it) out.push(x);
  return out;
}

/** Completions deduplicated by seq, as the tick and the finalizer read them. */
async function completionsBySeq(ledger: CycleLedger, set: string, disk: string, cycleId: string) {
  const bySeq = new Map<number, CompletionEntry>();
  for (const e of await collect(ledger.listCompletions(set, disk, cycleId))) {
    const seen = bySeq.get(e.seq);
    if (seen !== undefined) expect(e).toEqual(seen); // a duplicate is the same record
    bySeq.set(e.seq, e);
  }
  return new Map([...bySeq].sort(([a], [b]) => a - b));
}

export function cycleLedgerContract(name: string, create: () => Promise<CycleLedger>): void {
  describe(`CycleLedger contract: ${name}`, () => {
    describe('cycles', () => {
      it('creates a cycle once and reads it back as written', async () => {
        const ledger = await create();
        const rec = cycleRecord({ startedAt: 1_717_199_990_000 });
        expect(await ledger.createCycle(rec)).toBe(true);
        expect(await ledger.createCycle({ ...rec, lockOwner: 'exec-2' })).toBe(false);
        expect(await ledger.getCycle('finance', 'c1')).toEqual(rec);
        expect(await ledger.getCycle('finance', 'c2')).toBeUndefined();
        expect(await ledger.getCycle('other', 'c1')).toBeUndefined();
      });

      it('applies a patch only from the states named, and never creates a cycle', async () => {
        const ledger = await create();
        await ledger.createCycle(cycleRecord());

        const ticked = await ledger.updateCycle('finance', 'c1', { ticks: 4, idleTicks: 1, lastTickAt: 77 });
        const refused = await ledger.updateCycle('finance', 'c1', { state: 'published' }, ['finalizing']);
        const moved = await ledger.updateCycle('finance', 'c1', { state: 'finalizing' }, ['active']);
        const missing = await ledger.updateCycle('finance', 'nope', { ticks: 1 });

        expect(ticked).toEqual(cycleRecord({ ticks: 4, idleTicks: 1, lastTickAt: 77 }));
        expect(refused).toBeUndefined();
        expect(moved?.state).toBe('finalizing');
        expect(missing).toBeUndefined();
        expect(await ledger.getCycle('finance', 'nope')).toBeUndefined();
        expect(await ledger.getCycle('finance', 'c1')).toEqual(
          cycleRecord({ ticks: 4, idleTicks: 1, lastTickAt: 77, state: 'finalizing' }),
        );
      });

      it('returns the record unchanged for an empty patch whose condition holds', async () => {
        const ledger = await create();
        await ledger.createCycle(cycleRecord());
        expect(await ledger.updateCycle('finance', 'c1', {}, ['active'])).toEqual(cycleRecord());
        expect(await ledger.updateCycle('finance', 'c1', {}, ['aborted'])).toBeUndefined();
      });

      it('keeps the first failure recorded', async () => {
        const ledger = await create();
        await ledger.createCycle(cycleRecord());
        const [a, b] = await Promise.all([
          ledger.recordFailure('finance', 'c1', 'seq 7: AccessDenied'),
          ledger.recordFailure('finance', 'c1', 'seq 9: AccessDenied'),
        ]);
        expect([a, b].filter(Boolean)).toHaveLength(1);
        const first = a ? 'seq 7: AccessDenied' : 'seq 9: AccessDenied';
        expect((await ledger.getCycle('finance', 'c1'))?.failure).toBe(first);
        expect(await ledger.recordFailure('finance', 'c1', 'later')).toBe(false);
        expect(await ledger.recordFailure('finance', 'nope', 'x')).toBe(false);
      });
    });

    describe('disks of a cycle', () => {
      it('creates a disk once and reads it back, per set, disk and cycle', async () => {
        const ledger = await create();
        const rec = diskRecord();
        expect(await ledger.createDisk(rec)).toBe(true);
        expect(await ledger.createDisk({ ...rec, perPage: 10 })).toBe(false);
        expect(await ledger.getDisk('finance', 'vol-os', 'c1')).toEqual(rec);
        expect(await ledger.getDisk('finance', 'vol-os', 'c2')).toBeUndefined();
        expect(await ledger.getDisk('finance', 'vol-data', 'c1')).toBeUndefined();
      });

      it("moves the differ's resume point only from the point expected", async () => {
        const ledger = await create();
        await ledger.createDisk(diskRecord());
        const step = { diffSeq: 200, diffStartBlock: 900, diffBlocks: 300, diffBytes: 300 * BLOCK };

        const first = await ledger.updateDisk('finance', 'vol-os', 'c1', step, {
          diffSeq: 0,
          diffDone: false,
        });
        const stale = await ledger.updateDisk('finance', 'vol-os', 'c1', { diffSeq: 999 }, { diffSeq: 0 });
        const done = await ledger.updateDisk(
          'finance',
          'vol-os',
          'c1',
          { diffDone: true, descriptors: 230, diffSeq: 230 },
          { diffSeq: 200 },
        );

        expect(first).toEqual(diskRecord(step));
        expect(stale).toBeUndefined();
        expect(done).toEqual(diskRecord({ ...step, diffDone: true, descriptors: 230, diffSeq: 230 }));
        expect(await ledger.updateDisk('finance', 'vol-os', 'nope', { diffSeq: 1 })).toBeUndefined();
        expect(await ledger.getDisk('finance', 'vol-os', 'nope')).toBeUndefined();
      });

      it("stores the controller's state as given", async () => {
        const ledger = await create();
        await ledger.createDisk(diskRecord());
        const controller = { level: 2, climbHoldMs: 1500, history: [1, 2.5, 3], nested: { ok: true } };
        const out = await ledger.updateDisk(
          'finance',
          'vol-os',
          'c1',
          { controller, evaluatedAt: 1234, completeRequested: true },
          { state: 'active' },
        );
        expect(out?.controller).toEqual(controller);
        expect(await ledger.getDisk('finance', 'vol-os', 'c1')).toEqual(
          diskRecord({ controller, evaluatedAt: 1234, completeRequested: true }),
        );
        expect(
          await ledger.updateDisk('finance', 'vol-os', 'c1', { state: 'aborted' }, { state: 'finalizing' }),
        ).toBe(undefined);
      });
    });

    describe('descriptor pages', () => {
      it('stores pages idempotently and returns descriptors with their tokens', async () => {
        const ledger = await create();
        const page0 = plannedDescriptors(0, 200);
        const page1 = plannedDescriptors(200, 7);
        await ledger.putDescriptorPage('finance', 'vol-os', 'c1', 0, page0);
        await ledger.putDescriptorPage('finance', 'vol-os', 'c1', 1, page1);
        await ledger.putDescriptorPage('finance', 'vol-os', 'c1', 1, page1); // a resumed differ

        expect(await ledger.getDescriptorPage('finance', 'vol-os', 'c1', 0)).toEqual(page0);
        expect(await ledger.getDescriptorPage('finance', 'vol-os', 'c1', 1)).toEqual(page1);
        expect(await ledger.getDescriptorPage('finance', 'vol-os', 'c1', 2)).toBeUndefined();
        expect(await ledger.getDescriptorPage('finance', 'vol-os', 'c2', 0)).toBeUndefined();
        expect(await ledger.getDescriptorPage('finance', 'vol-data', 'c1', 0)).toBeUndefined();
      });

      it('keeps sparse extents and blocks that read as zeros', async () => {
        const ledger = await create();
        const d: PlannedDescriptor = {
          seq: 5,
          offset: 10 * BLOCK,
          length: 4 * BLOCK,
          extents: [
            { offset: 10 * BLOCK, length: BLOCK },
            { offset: 13 * BLOCK, length: BLOCK },
          ],
          bytes: 2 * BLOCK,
          tokens: [undefined, 'tok-13'],
        };
        await ledger.putDescriptorPage('finance', 'vol-os', 'c1', 0, [d]);
        expect(await ledger.getDescriptorPage('finance', 'vol-os', 'c1', 0)).toEqual([d]);
      });
    });

    describe('completions', () => {
      it('lists every recorded completion, zero-block ones included', async () => {
        const ledger = await create();
        await ledger.recordCompletions('finance', 'vol-os', 'c1', 'batch-a', [
          completion(0),
          completion(2, 0),
        ]);
        await ledger.recordCompletions('finance', 'vol-os', 'c1', 'batch-b', [
          completion(1, 1),
          completion(3),
        ]);

        const got = await completionsBySeq(ledger, 'finance', 'vol-os', 'c1');

        expect(got).toEqual(
          new Map([
            [0, completion(0)],
            [1, completion(1, 1)],
            [2, completion(2, 0)],
            [3, completion(3)],
          ]),
        );
      });

      it('deduplicates on read what duplicate deliveries and retried batches recorded twice', async () => {
        const ledger = await create();
        await ledger.recordCompletions('finance', 'vol-os', 'c1', 'batch-a', [completion(4), completion(5)]);
        await ledger.recordCompletions('finance', 'vol-os', 'c1', 'batch-a', [completion(4), completion(5)]); // retried
        await ledger.recordCompletions('finance', 'vol-os', 'c1', 'batch-b', [completion(5), completion(6)]); // redelivered 5

        const listed = await collect(ledger.listCompletions('finance', 'vol-os', 'c1'));
        const got = await completionsBySeq(ledger, 'finance', 'vol-os', 'c1');

        expect(new Set(listed.map((e) => e.seq))).toEqual(new Set([4, 5, 6]));
        expect([...got.keys()]).toEqual([4, 5, 6]);
      });

      it("keeps disks and cycles apart, including a cycle id that is another's prefix", async () => {
        const ledger = await create();
        await ledger.recordCompletions('finance', 'vol-os', 'c1', 'b', [completion(0)]);
        await ledger.recordCompletions('finance', 'vol-os', 'c10', 'b', [completion(1)]);
        await ledger.recordCompletions('finance', 'vol-data', 'c1', 'b', [completion(2)]);
        await ledger.recordCompletions('finance#2', 'vol-os', 'c1', 'b', [completion(3)]);

        expect([...(await completionsBySeq(ledger, 'finance', 'vol-os', 'c1')).keys()]).toEqual([0]);
        expect([...(await completionsBySeq(ledger, 'finance', 'vol-os', 'c10')).keys()]).toEqual([1]);
        expect([...(await completionsBySeq(ledger, 'finance', 'vol-data', 'c1')).keys()]).toEqual([2]);
        expect(await collect(ledger.listCompletions('finance', 'vol-os', 'c2'))).toEqual([]);
      });

      it('records concurrent batches of one disk without losing any', async () => {
        const ledger = await create();
        await Promise.all(
          Array.from({ length: 20 }, (_, b) =>
            ledger.recordCompletions('finance', 'vol-os', 'c1', `batch-${b}`, [
              completion(b * 2),
              completion(b * 2 + 1),
            ]),
          ),
        );
        const got = await completionsBySeq(ledger, 'finance', 'vol-os', 'c1');
        expect([...got.keys()]).toEqual(Array.from({ length: 40 }, (_, i) => i));
      });
    });

    describe('signals', () => {
      it('adds concurrent deltas into their 250 ms bucket and reads [from, to) in order', async () => {
        const ledger = await create();
        const t0 = 1_717_200_000_000; // a bucket boundary
        const delta = { ...noSignals, attempts: 2, successes: 2, bytes: 2 << 20, latencyMs: 35.5 };
        await Promise.all([
          ledger.addSignals('finance', 'vol-os', 'c1', t0 + 10, delta),
          ledger.addSignals('finance', 'vol-os', 'c1', t0 + 249, {
            ...delta,
            throttles: 1,
            windowLimited: 1,
          }),
          ledger.addSignals('finance', 'vol-os', 'c1', t0 + 250, {
            ...noSignals,
            errors: 1,
            nodePressure: 1,
          }),
          ledger.addSignals('finance', 'vol-os', 'c1', t0 + 1000, { ...noSignals, attempts: 1 }),
        ]);

        const all = await ledger.readSignals('finance', 'vol-os', 'c1', t0, t0 + 1250);
        const middle = await ledger.readSignals('finance', 'vol-os', 'c1', t0 + 1, t0 + 1000);

        expect(all).toEqual([
          {
            ...noSignals,
            at: t0,
            attempts: 4,
            successes: 4,
            throttles: 1,
            bytes: 4 << 20,
            latencyMs: 71,
            windowLimited: 1,
          },
          { ...noSignals, at: t0 + 250, errors: 1, nodePressure: 1 },
          { ...noSignals, at: t0 + 1000, attempts: 1 },
        ]);
        expect(middle.map((b) => b.at)).toEqual([t0 + 250]);
        expect(await ledger.readSignals('finance', 'vol-os', 'c2', t0, t0 + 1250)).toEqual([]);
        expect(await ledger.readSignals('finance', 'vol-os', 'c1', t0 + 1250, t0 + 1250)).toEqual([]);
      });
    });
  });
}
