// The GrantFlow contract (shared/engine/cycle/ports.ts): the memory fake and the DynamoDB adapter must
// both pass it. Exactly-once counting and the optimistic lock are what the cycle's bookkeeping rests on.
import { describe, expect, it } from 'vitest';
import type { FlowAdvance, FlowKey, FlowState, GrantFlow, Regrant } from '../../shared/engine/cycle/ports.ts';

const MiB = 1 << 20;

let keys = 0;
/** A key of its own per test, so adapters sharing a table do not see each other's flows. */
export const flowKey = (over: Partial<FlowKey> = {}): FlowKey => ({
  set: 'finance',
  disk: `vol-${++keys}`,
  cycleId: 'cycle-2024-06-01T00:00Z',
  ...over,
});

const entry = (seq: number, bytes = MiB, blocks = 2) => ({ seq, bytes, blocks });

/** An advance that only moves the cursor to `next` (granting [state.next, next) of `bytes` each). */
function grantUpTo(state: FlowState, next: number, bytes = MiB): FlowAdvance {
  return {
    low: state.low,
    lowBytes: state.lowBytes,
    dropDone: [],
    next,
    grantedBytes: state.grantedBytes + (next - state.next) * bytes,
    regrants: new Map(),
    dropRegrants: [],
  };
}

/** An advance that raises low over the completed prefix, as the grant logic would. */
function raiseLow(state: FlowState): FlowAdvance {
  let low = state.low;
  let lowBytes = state.lowBytes;
  const dropDone: number[] = [];
  while (state.done.has(low)) {
    lowBytes += state.done.get(low)!;
    dropDone.push(low);
    low++;
  }
  return {
    low,
    lowBytes,
    dropDone,
    next: state.next,
    grantedBytes: state.grantedBytes,
    regrants: new Map(),
    dropRegrants: [...state.regrants.keys()].filter((s) => s < low),
  };
}

export function grantFlowContract(name: string, create: () => Promise<GrantFlow>): void {
  describe(`GrantFlow contract: ${name}`, () => {
    it('creates an open, empty flow once; a second create returns the first unchanged', async () => {
      const flow = await create();
      const key = flowKey();

      const created = await flow.create(key, { window: 64 * MiB, allowance: 32 * MiB });
      const again = await flow.create(key, { window: 1, allowance: 1 });

      expect(created).toMatchObject({
        open: true,
        next: 0,
        low: 0,
        grantedBytes: 0,
        lowBytes: 0,
        completedCount: 0,
        completedBytes: 0,
        writtenBlocks: 0,
        window: 64 * MiB,
        allowance: 32 * MiB,
        allowanceUntil: 0,
        marks: [],
      });
      expect(created.done).toEqual(new Map());
      expect(created.regrants).toEqual(new Map());
      expect(again).toEqual(created);
      expect(await flow.get(key)).toEqual(created);
      expect(await flow.get(flowKey())).toBeUndefined();
    });

    it('counts each seq once: repeats in a call, in later calls, and below low are skipped', async () => {
      const flow = await create();
      const key = flowKey();
      const s0 = await flow.create(key, { window: 64 * MiB, allowance: 64 * MiB });
      await flow.advance(key, s0.version, grantUpTo(s0, 10));

      const first = await flow.complete(key, [entry(0), entry(3, 2 * MiB, 4), entry(3, 2 * MiB, 4)]);
      const second = await flow.complete(key, [entry(3, 2 * MiB, 4), entry(4)]);
      const raised = await flow.advance(key, second.state.version, raiseLow(second.state));
      const third = await flow.complete(key, [entry(0), entry(3), entry(4)]);

      expect(first.counted.sort((a, b) => a - b)).toEqual([0, 3]);
      expect(second.counted).toEqual([4]);
      expect(raised?.low).toBe(1);
      expect(third.counted).toEqual([]);
      expect(third.state).toMatchObject({ completedCount: 3, completedBytes: 4 * MiB, writtenBlocks: 8 });
      expect(third.state.done).toEqual(
        new Map([
          [3, 2 * MiB],
          [4, MiB],
        ]),
      );
    });

    it('counts each seq exactly once under concurrent duplicate completions', async () => {
      const flow = await create();
      const key = flowKey();
      const s0 = await flow.create(key, { window: 64 * MiB, allowance: 64 * MiB });
      await flow.advance(key, s0.version, grantUpTo(s0, 40));
      // Eight writers deliver overlapping batches at once (SQS duplicates and redeliveries).
      const batches = Array.from({ length: 8 }, (_, w) =>
        Array.from({ length: 10 }, (_, i) => entry((w * 3 + i) % 30, MiB + ((w * 3 + i) % 30))),
      );

      const results = await Promise.all(batches.map((b) => flow.complete(key, b)));
      const after = await flow.get(key);

      const counted = results.flatMap((r) => r.counted).sort((a, b) => a - b);
      expect(counted).toEqual(Array.from({ length: 30 }, (_, i) => i));
      expect(after?.completedCount).toBe(30);
      expect(after?.completedBytes).toBe(30 * MiB + (29 * 30) / 2);
      expect(after?.writtenBlocks).toBe(60);
      expect(after?.done.size).toBe(30);
    });

    it('counts exactly once when every call carries the same seqs at once', async () => {
      const flow = await create();
      const key = flowKey();
      const s0 = await flow.create(key, { window: 64 * MiB, allowance: 64 * MiB });
      await flow.advance(key, s0.version, grantUpTo(s0, 10));
      const same = [entry(1), entry(2), entry(5)];

      const results = await Promise.all(Array.from({ length: 6 }, () => flow.complete(key, same)));

      const counted = results.flatMap((r) => r.counted).sort((a, b) => a - b);
      expect(counted).toEqual([1, 2, 5]);
      expect((await flow.get(key))?.completedCount).toBe(3);
    });

    it('does not bump the version on complete, and counts on a closed flow', async () => {
      const flow = await create();
      const key = flowKey();
      const s0 = await flow.create(key, { window: 64 * MiB, allowance: 64 * MiB });
      const s1 = (await flow.advance(key, s0.version, grantUpTo(s0, 4)))!;
      const closed = await flow.control(key, { open: false });

      const done = await flow.complete(key, [entry(2)]);

      expect(done.counted).toEqual([2]);
      expect(done.state.version).toBe(closed.version);
      expect(closed.version).toBeGreaterThan(s1.version);
      expect(done.state.open).toBe(false);
    });

    it('advances once per version: a concurrent advance loses and changes nothing', async () => {
      const flow = await create();
      const key = flowKey();
      const s0 = await flow.create(key, { window: 64 * MiB, allowance: 64 * MiB });

      const [a, b] = await Promise.all([
        flow.advance(key, s0.version, grantUpTo(s0, 3)),
        flow.advance(key, s0.version, grantUpTo(s0, 5)),
      ]);

      const winners = [a, b].filter((s) => s !== undefined);
      expect(winners).toHaveLength(1);
      const after = await flow.get(key);
      expect(after).toEqual(winners[0]);
      expect(after?.version).toBeGreaterThan(s0.version);
      expect([3, 5]).toContain(after?.next);
      expect(after?.grantedBytes).toBe(after!.next * MiB);
      expect(await flow.advance(key, s0.version, grantUpTo(s0, 9))).toBeUndefined();
    });

    it('keeps completions that landed between the read and the advance', async () => {
      const flow = await create();
      const key = flowKey();
      const s0 = await flow.create(key, { window: 64 * MiB, allowance: 64 * MiB });
      const read = (await flow.advance(key, s0.version, grantUpTo(s0, 6)))!;
      // The granting writer read `read`; meanwhile two completions land.
      await flow.complete(key, [entry(0), entry(4)]);

      const advanced = await flow.advance(key, read.version, { ...grantUpTo(read, 8), dropDone: [] });

      expect(advanced).toBeDefined();
      expect(advanced?.next).toBe(8);
      expect(advanced?.done).toEqual(
        new Map([
          [0, MiB],
          [4, MiB],
        ]),
      );
      expect(advanced?.completedCount).toBe(2);
    });

    it('drops done and re-grant entries below the new low and issues re-grants', async () => {
      const flow = await create();
      const key = flowKey();
      const s0 = await flow.create(key, { window: 64 * MiB, allowance: 64 * MiB });
      const s1 = (await flow.advance(key, s0.version, grantUpTo(s0, 6)))!;
      const s2 = await flow.control(key, {
        addRegrants: new Map<number, Regrant>([
          [1, { attempt: 2 }],
          [4, { attempt: 2 }],
        ]),
      });
      expect(s2.version).toBeGreaterThan(s1.version);
      const { state: s3 } = await flow.complete(key, [entry(0), entry(1), entry(2)]);

      const change = raiseLow(s3);
      const s4 = await flow.advance(key, s3.version, {
        ...change,
        regrants: new Map([[4, { attempt: 2, at: 1_717_200_000_500 }]]),
      });

      expect(change).toMatchObject({ low: 3, lowBytes: 3 * MiB, dropDone: [0, 1, 2], dropRegrants: [1] });
      expect(s4).toMatchObject({ low: 3, lowBytes: 3 * MiB, next: 6, completedCount: 3 });
      expect(s4?.done).toEqual(new Map());
      expect(s4?.regrants).toEqual(new Map([[4, { attempt: 2, at: 1_717_200_000_500 }]]));
    });

    it('refuses to advance a closed flow', async () => {
      const flow = await create();
      const key = flowKey();
      await flow.create(key, { window: 64 * MiB, allowance: 64 * MiB });
      const closed = await flow.control(key, { open: false });

      expect(await flow.advance(key, closed.version, grantUpTo(closed, 2))).toBeUndefined();
      const reopened = await flow.control(key, { open: true });
      expect((await flow.advance(key, reopened.version, grantUpTo(reopened, 2)))?.next).toBe(2);
    });

    it("applies the tick's settings and makes an advance computed before them lose", async () => {
      const flow = await create();
      const key = flowKey();
      const s0 = await flow.create(key, { window: 64 * MiB, allowance: 64 * MiB });
      const marks = [
        { at: 1_717_200_000_000, next: 0 },
        { at: 1_717_200_005_000, next: 0 },
      ];

      const set = await flow.control(key, {
        window: 16 * MiB,
        allowance: 8 * MiB,
        allowanceUntil: 1_717_200_060_000,
        marks,
      });
      const partial = await flow.control(key, { window: 24 * MiB });

      expect(set).toMatchObject({
        window: 16 * MiB,
        allowance: 8 * MiB,
        allowanceUntil: 1_717_200_060_000,
        marks,
      });
      expect(partial).toMatchObject({ window: 24 * MiB, allowance: 8 * MiB, marks });
      expect(await flow.advance(key, s0.version, grantUpTo(s0, 1))).toBeUndefined();
      expect(await flow.get(key)).toEqual(partial);
    });
  });
}
