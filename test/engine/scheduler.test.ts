// Window and budget accounting of the scheduler under random grants, completions and failures.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import type { Descriptor } from '../../shared/engine/descriptors.ts';
import { type Grant, Scheduler } from '../../shared/engine/scheduler.ts';

const KiB = 1024;

function descriptors(sizes: readonly number[]): Descriptor[] {
  let offset = 0;
  return sizes.map((bytes, seq) => {
    const d = { seq, offset, length: bytes, bytes, extents: [{ offset, length: bytes }] };
    offset += bytes;
    return d;
  });
}

describe('Scheduler', () => {
  it('never exceeds a window or the node budget, and grants every descriptor exactly once', () => {
    const disk = fc.record({
      sizes: fc.array(
        fc.integer({ min: 1, max: 64 }).map((k) => k * KiB),
        { minLength: 0, maxLength: 60 },
      ),
      window: fc.integer({ min: 64, max: 512 }).map((k) => k * KiB),
    });
    const action = fc.record({
      kind: fc.constantFrom('grant', 'grant', 'complete', 'release', 'resize'),
      pick: fc.nat(),
      window: fc.integer({ min: 64, max: 512 }).map((k) => k * KiB),
    });
    fc.assert(
      fc.property(
        fc.array(disk, { minLength: 1, maxLength: 5 }),
        fc.integer({ min: 64, max: 1024 }).map((k) => k * KiB),
        fc.array(action, { maxLength: 400 }),
        (disks, budget, actions) => {
          // Prepare
          const s = new Scheduler(budget);
          const windows = new Map<string, number>();
          disks.forEach((d, i) => {
            s.addDisk(`d${i}`, descriptors(d.sizes), d.window);
            windows.set(`d${i}`, d.window);
          });
          const outstanding: Grant[] = [];
          const completed = new Map<string, Set<number>>();
          const everGranted = new Map<string, Map<number, number>>();
          // The window counts from the disk's oldest unfinished grant to its newest (TCP-style).
          const span = (disk: string) => {
            const granted = everGranted.get(disk) ?? new Map<number, number>();
            const done = completed.get(disk) ?? new Set<number>();
            let oldest = Number.POSITIVE_INFINITY;
            for (const seq of granted.keys()) if (!done.has(seq)) oldest = Math.min(oldest, seq);
            let bytes = 0;
            for (const [seq, b] of granted) if (seq >= oldest) bytes += b;
            return bytes;
          };
          const check = () => {
            let total = 0;
            for (const g of outstanding) total += g.descriptor.bytes;
            expect(s.inflight).toBe(total);
            expect(s.inflight).toBeLessThanOrEqual(budget);
          };
          const grant = () => {
            const g = s.next();
            if (!g) return false;
            // Assess at every grant: the disk's in-flight bytes, and its span from the oldest
            // unfinished chunk, fit the window in force (a lone chunk always goes).
            const granted = everGranted.get(g.disk) ?? new Map<number, number>();
            const regrant = granted.has(g.descriptor.seq);
            granted.set(g.descriptor.seq, g.descriptor.bytes);
            everGranted.set(g.disk, granted);
            const stats = s.stats(g.disk);
            expect(stats.span).toBe(span(g.disk));
            expect(stats.inflight).toBeLessThanOrEqual(stats.span);
            if (!regrant && stats.span !== g.descriptor.bytes) {
              expect(stats.span).toBeLessThanOrEqual(windows.get(g.disk)!);
            }
            outstanding.push(g);
            return true;
          };
          // Act: random interleaving, then drain.
          for (const a of actions) {
            if (a.kind === 'grant') grant();
            else if (a.kind === 'resize') {
              const id = `d${a.pick % disks.length}`;
              s.setWindow(id, a.window);
              windows.set(id, a.window);
            } else if (outstanding.length > 0) {
              const [g] = outstanding.splice(a.pick % outstanding.length, 1);
              if (a.kind === 'complete') {
                s.complete(g!);
                const set = completed.get(g!.disk) ?? new Set();
                expect(set.has(g!.descriptor.seq)).toBe(false);
                set.add(g!.descriptor.seq);
                completed.set(g!.disk, set);
              } else s.release(g!);
            }
            check();
          }
          for (let guard = 0; guard < 100_000 && !s.allDone; guard++) {
            while (grant()) check();
            const g = outstanding.shift();
            if (!g) break;
            s.complete(g);
            const set = completed.get(g.disk) ?? new Set();
            expect(set.has(g.descriptor.seq)).toBe(false);
            set.add(g.descriptor.seq);
            completed.set(g.disk, set);
            check();
          }
          // Assess: everything done, each descriptor completed once.
          expect(s.allDone).toBe(true);
          disks.forEach((d, i) => {
            expect(completed.get(`d${i}`)?.size ?? 0).toBe(d.sizes.length);
          });
        },
      ),
      { numRuns: 300 },
    );
  });

  it('shares the budget fairly: a small disk is not starved by a huge one', () => {
    // Prepare: budget of 8 chunks, each disk could take 32 chunks by its window.
    const chunk = 1024 * KiB;
    const s = new Scheduler(8 * chunk);
    s.addDisk('huge', descriptors(Array(10_000).fill(chunk)), 32 * chunk);
    s.addDisk('small', descriptors(Array(20).fill(chunk)), 32 * chunk);
    const outstanding: Grant[] = [];
    let smallDoneAt = -1;
    // Act: ACK-clocked loop completing the oldest grant each step.
    for (let step = 0; step < 200; step++) {
      for (let g = s.next(); g; g = s.next()) outstanding.push(g);
      if (step > 0) {
        // Assess while both are backlogged: in-flight bytes differ by at most one chunk.
        if (s.stats('small').backlogged) {
          const diff = Math.abs(s.stats('huge').inflight - s.stats('small').inflight);
          expect(diff).toBeLessThanOrEqual(chunk);
        }
      }
      s.complete(outstanding.shift()!);
      if (smallDoneAt < 0 && s.isDone('small')) smallDoneAt = step;
    }
    // The small disk gets half the budget, so 20 chunks finish in about 40 completions, not 10,000.
    expect(smallDoneAt).toBeGreaterThan(0);
    expect(smallDoneAt).toBeLessThanOrEqual(45);
  });

  it('grants the next descriptor as soon as a completion frees room (ACK clock)', () => {
    const s = new Scheduler(1024 * KiB);
    s.addDisk('a', descriptors(Array(10).fill(64 * KiB)), 128 * KiB);
    const first = s.next()!;
    const second = s.next()!;
    expect(s.next()).toBeUndefined();
    expect(second.windowLimited).toBe(true);
    s.complete(first);
    const third = s.next();
    expect(third?.descriptor.seq).toBe(2);
  });

  it('re-grants a released descriptor before new ones and rejects a double completion', () => {
    const s = new Scheduler(1024 * KiB);
    s.addDisk('a', descriptors([4 * KiB, 4 * KiB]), 64 * KiB);
    const g0 = s.next()!;
    s.release(g0);
    expect(s.next()?.descriptor.seq).toBe(0);
    const g1 = s.next()!;
    s.complete(g1);
    expect(() => s.complete(g1)).toThrow(/released twice/);
  });
});
