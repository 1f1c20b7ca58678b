// The grant arithmetic on a disk's flow record: where low moves, what a top-up grants under the
// window and the allowance, what the tick reclaims from its grant marks; and, as a property over
// random sizes, completion orders, losses and control changes, that a flow driven only through
// planAdvance never grants past its window or allowance, never grants a seq twice from the cursor,
// and finishes.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import {
  capAt,
  inflightOf,
  lowAfter,
  MAX_GRANT_ATTEMPTS,
  MAX_MARKS,
  nextMarks,
  planAdvance,
  planReclaim,
} from '../../../shared/engine/cycle/grant-plan.ts';
import type { FlowState } from '../../../shared/engine/cycle/ports.ts';
import { MemoryGrantFlow } from '../../support/cycle-fakes.ts';

const KiB = 1024;
const MiB = 1024 * KiB;
const NOW = 1_000_000;

function flow(over: Partial<FlowState> = {}): FlowState {
  return {
    version: 0,
    open: true,
    next: 0,
    low: 0,
    grantedBytes: 0,
    lowBytes: 0,
    done: new Map(),
    completedCount: 0,
    completedBytes: 0,
    writtenBlocks: 0,
    regrants: new Map(),
    window: 4 * MiB,
    allowance: 64 * MiB,
    allowanceUntil: NOW + 60_000,
    marks: [],
    ...over,
  };
}

const mib = () => MiB;

describe('planAdvance', () => {
  it('grants cursor seqs until the window is full, and says the window held it', () => {
    const plan = planAdvance(flow(), 100, mib, NOW, 50);
    expect(plan.grants.map((g) => g.seq)).toEqual([0, 1, 2, 3]);
    expect(plan.change).toMatchObject({ next: 4, grantedBytes: 4 * MiB, low: 0 });
    expect(plan.limit).toBe('window');
  });

  it('stops at the allowance and says the budget held it', () => {
    const plan = planAdvance(flow({ allowance: 2 * MiB }), 100, mib, NOW, 50);
    expect(plan.grants.map((g) => g.seq)).toEqual([0, 1]);
    expect(plan.limit).toBe('budget');
  });

  it('grants nothing once the allowance has lapsed', () => {
    const plan = planAdvance(flow({ allowanceUntil: NOW }), 100, mib, NOW, 50);
    expect(plan.grants).toEqual([]);
    expect(plan.change).toBeUndefined();
    expect(capAt(flow({ allowanceUntil: NOW }), NOW)).toBe(0);
  });

  it('moves low past completed seqs and refills the room they freed', () => {
    // seqs 0..3 granted, 0, 1 and 3 done: low moves to 2, the span is 2..3 (2 MiB), two more fit.
    const s = flow({
      next: 4,
      grantedBytes: 4 * MiB,
      done: new Map([
        [0, MiB],
        [1, MiB],
        [3, MiB],
      ]),
      completedCount: 3,
      completedBytes: 3 * MiB,
      regrants: new Map([[1, { attempt: 2, at: NOW - 5 }]]),
    });
    const plan = planAdvance(s, 100, mib, NOW, 50);
    expect(plan.change).toMatchObject({
      low: 2,
      lowBytes: 2 * MiB,
      dropDone: [0, 1],
      next: 6,
      dropRegrants: [1],
    });
    expect(plan.grants.map((g) => g.seq)).toEqual([4, 5]);
  });

  it('grants waiting re-grants first, inside the span, with their attempt', () => {
    const s = flow({ next: 4, grantedBytes: 4 * MiB, regrants: new Map([[2, { attempt: 3 }]]) });
    const plan = planAdvance(s, 100, mib, NOW, 50);
    expect(plan.grants).toEqual([{ seq: 2, attempt: 3, bytes: MiB }]);
    expect(plan.change?.regrants.get(2)).toEqual({ attempt: 3, at: NOW });
    expect(plan.change?.next).toBe(4);
  });

  it('takes one grant into an empty span even when the window is smaller', () => {
    const plan = planAdvance(flow({ window: MiB / 2 }), 100, mib, NOW, 50);
    expect(plan.grants.map((g) => g.seq)).toEqual([0]);
  });

  it('stops where descriptor sizes are not known', () => {
    const plan = planAdvance(flow(), 100, (seq) => (seq < 2 ? MiB : undefined), NOW, 50);
    expect(plan.grants.map((g) => g.seq)).toEqual([0, 1]);
    expect(plan.limit).toBe('none');
  });
});

describe('planReclaim and the grant marks', () => {
  const lease = 60_000;
  const granted = flow({
    next: 6,
    grantedBytes: 6 * MiB,
    done: new Map([[1, MiB]]),
    marks: [
      { at: NOW - 70_000, next: 3 },
      { at: NOW - 10_000, next: 6 },
    ],
    regrants: new Map([
      [4, { attempt: 2, at: NOW - 61_000 }],
      [5, { attempt: 3 }],
    ]),
  });

  it('grants again what a mark older than a lease covers, and expired re-grants, never waiting ones', () => {
    const r = planReclaim(granted, NOW, lease);
    // 0 and 2 were granted by the old mark; 1 is done; 3 only by the young mark; 4's re-grant expired;
    // 5 waits to be granted.
    expect([...r.addRegrants]).toEqual([
      [0, { attempt: 2 }],
      [2, { attempt: 2 }],
      [4, { attempt: 3 }],
    ]);
    expect(r.exhausted).toBeUndefined();
  });

  it('gives up on a seq granted MAX_GRANT_ATTEMPTS times', () => {
    const s = flow({
      next: 1,
      grantedBytes: MiB,
      regrants: new Map([[0, { attempt: MAX_GRANT_ATTEMPTS, at: 0 }]]),
    });
    expect(planReclaim(s, NOW, lease).exhausted).toEqual({ seq: 0, attempts: MAX_GRANT_ATTEMPTS });
  });

  it('keeps marks thin: one per quarter lease while the cursor moves, none below low, at most six', () => {
    // The cursor has not moved past the newest mark: nothing to add.
    const later = NOW + 10_000;
    expect(nextMarks(granted, later, lease)).toEqual(granted.marks);
    // It moved, but the newest mark is younger than a quarter lease: nothing yet.
    const moved = { ...granted, next: 8, grantedBytes: 8 * MiB };
    expect(nextMarks(moved, NOW, lease)).toEqual(granted.marks);
    expect(nextMarks(moved, later, lease)).toEqual([...granted.marks, { at: later, next: 8 }]);
    // Marks that cover nothing at or above low go.
    const past = { ...moved, low: 3, lowBytes: 3 * MiB, done: new Map() };
    expect(nextMarks(past, later, lease)).toEqual([
      { at: NOW - 10_000, next: 6 },
      { at: later, next: 8 },
    ]);
    let s = flow();
    for (let i = 1; i <= 10; i++)
      s = { ...s, next: i, grantedBytes: i * MiB, marks: nextMarks({ ...s, next: i }, i * lease, lease) };
    expect(s.marks.length).toBe(MAX_MARKS);
  });
});

describe('a flow driven only through planAdvance (property)', () => {
  it('stays inside its window and allowance, grants each seq once from the cursor, and finishes', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.constantFrom(MiB / 2, MiB), { minLength: 1, maxLength: 60 }),
        fc.array(
          fc.record({
            complete: fc.array(fc.nat(), { maxLength: 6 }),
            lose: fc.option(fc.nat(), { nil: undefined }),
            window: fc.option(
              fc.integer({ min: 1, max: 8 }).map((k) => k * MiB),
              { nil: undefined },
            ),
            allowance: fc.option(
              fc.integer({ min: 0, max: 8 }).map((k) => k * MiB),
              { nil: undefined },
            ),
            max: fc.integer({ min: 1, max: 8 }),
          }),
          { maxLength: 80 },
        ),
        async (sizes, steps) => {
          const f = new MemoryGrantFlow();
          const key = { set: 's', disk: 'd', cycleId: 'c' };
          await f.create(key, { window: 4 * MiB, allowance: 0 });
          await f.control(key, { allowance: 4 * MiB, allowanceUntil: Number.MAX_SAFE_INTEGER });
          const fromCursor = new Set<number>();
          const inFlight = new Set<number>();
          const bytesOf = (seq: number) => sizes[seq];
          const step = async (s: (typeof steps)[number] | undefined) => {
            let state = (await f.get(key))!;
            // Complete some in-flight seqs (chosen by index into what is in flight).
            const flying = [...inFlight];
            const done = (s?.complete ?? flying.map((_, i) => i)).map(
              (i) => flying[i % Math.max(1, flying.length)],
            );
            const entries = done
              .filter((x) => x !== undefined)
              .map((seq) => ({ seq: seq!, bytes: sizes[seq!]!, blocks: 1 }));
            for (const e of entries) inFlight.delete(e.seq);
            state = (await f.complete(key, entries)).state;
            // Lose a grant: the tick will have marked it to grant again.
            const lost =
              s?.lose === undefined ? undefined : [...inFlight][s.lose % Math.max(1, inFlight.size)];
            if (lost !== undefined) {
              inFlight.delete(lost);
              state = await f.control(key, { addRegrants: new Map([[lost, { attempt: 2 }]]) });
            }
            if (s?.window !== undefined || s?.allowance !== undefined) {
              state = await f.control(key, {
                ...(s.window === undefined ? {} : { window: s.window }),
                ...(s.allowance === undefined ? {} : { allowance: s.allowance }),
              });
            }
            const plan = planAdvance(state, sizes.length, bytesOf, NOW, s?.max ?? 64);
            if (plan.change === undefined) return;
            const after = (await f.advance(key, state.version, plan.change))!;
            for (const g of plan.grants) {
              if (g.attempt === 1) {
                expect(fromCursor.has(g.seq)).toBe(false);
                fromCursor.add(g.seq);
              }
              inFlight.add(g.seq);
            }
            if (plan.grants.length > 0) {
              expect(inflightOf(after)).toBeLessThanOrEqual(capAt(after, NOW));
            }
            // New grants from the cursor grow the span only within the window (or one chunk into
            // an empty span); re-grants lie inside the span already.
            if (after.next > state.next) {
              const span = after.grantedBytes - after.lowBytes;
              expect(span <= after.window || span <= MiB).toBe(true);
            }
            expect(after.low).toBeLessThanOrEqual(after.next);
            for (const seq of after.done.keys()) expect(seq >= after.low && seq < after.next).toBe(true);
          };
          for (const s of steps) await step(s);
          // Then calm: a window and an allowance that hold a chunk, everything in flight completes.
          await f.control(key, { window: 4 * MiB, allowance: 4 * MiB });
          for (let i = 0; i < 4 * sizes.length + 10; i++) await step(undefined);
          const end = (await f.get(key))!;
          expect(end.completedCount).toBe(sizes.length);
          expect(inflightOf(end)).toBe(0);
          expect(lowAfter(end).low).toBe(sizes.length);
        },
      ),
      {
        examples: [
          // Found with FC_SEED=3: two grants lost while the allowance is one chunk; granting the first
          // again must not let the lane count the second's bytes out of flight.
          [
            [MiB / 2, MiB],
            [
              { complete: [], lose: undefined, window: undefined, allowance: undefined, max: 2 },
              { complete: [], lose: 0, window: undefined, allowance: MiB, max: 1 },
              { complete: [], lose: 0, window: undefined, allowance: undefined, max: 2 },
            ],
          ],
        ],
      },
    );
  });
});
