// Retention: which checkpoints stay recoverable under a count and an age limit, and how the
// setting is read. The rule decides what history is deleted, so it is checked as a property too.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { ConfigError } from '../../shared/engine/errors.ts';
import {
  DEFAULT_RETAIN_COUNT,
  oldestKept,
  parseRetainCount,
  resolveRetention,
  retentionSchema,
} from '../../shared/engine/retention.ts';

const DAY = 86_400_000;
const NOW = Date.parse('2026-12-05T12:00:00Z');

/** Checkpoints 1..n, one a day, the last created at NOW. */
const daily = (n: number) =>
  Array.from({ length: n }, (_, i) => ({
    sequence: i + 1,
    createdAt: new Date(NOW - (n - 1 - i) * DAY).toISOString(),
  }));

describe('oldestKept', () => {
  it('keeps the newest `count` checkpoints', () => {
    expect(oldestKept(daily(30), { count: 24 }, NOW)).toBe(7);
    expect(oldestKept(daily(5), { count: 24 }, NOW)).toBe(1);
    expect(oldestKept(daily(5), { count: 1 }, NOW)).toBe(5);
    expect(oldestKept([], { count: 3 }, NOW)).toBeUndefined();
  });

  it('with an age limit as well, keeps a checkpoint only while it is within both', () => {
    // Checkpoints 1..10 are 9..0 days old; 2.5 days keeps the last three (0, 1 and 2 days old).
    expect(oldestKept(daily(10), { count: 24, maxAgeDays: 2.5 }, NOW)).toBe(8);
    expect(oldestKept(daily(10), { count: 2, maxAgeDays: 2.5 }, NOW)).toBe(9);
  });

  it('always keeps the latest, however old', () => {
    expect(oldestKept(daily(3), { count: 5, maxAgeDays: 1 }, NOW + 30 * DAY)).toBe(3);
  });

  it('keeps no checkpoint behind one it dropped, even when the clock went backwards', () => {
    // #2 looks newer than #3 (a clock step back): #3 is too old, so #2 goes with it.
    const list = [
      { sequence: 1, createdAt: new Date(NOW - DAY).toISOString() },
      { sequence: 2, createdAt: new Date(NOW - DAY).toISOString() },
      { sequence: 3, createdAt: new Date(NOW - 5 * DAY).toISOString() },
      { sequence: 4, createdAt: new Date(NOW).toISOString() },
    ];
    expect(oldestKept(list, { count: 10, maxAgeDays: 2 }, NOW)).toBe(4);
  });

  it('property: the kept checkpoints are the newest ones, within both limits, the latest always among them', () => {
    fc.assert(
      fc.property(
        fc.uniqueArray(fc.integer({ min: 1, max: 60 }), { minLength: 1, maxLength: 30 }),
        fc.array(fc.integer({ min: 0, max: 40 * DAY }), { minLength: 30, maxLength: 30 }),
        fc.integer({ min: 1, max: 40 }),
        fc.option(fc.double({ min: 0.01, max: 30, noNaN: true }), { nil: undefined }),
        (sequences, ages, count, maxAgeDays) => {
          const list = sequences.map((sequence, i) => ({
            sequence,
            createdAt: new Date(NOW - ages[i]!).toISOString(),
          }));
          const from = oldestKept(list, { count, maxAgeDays }, NOW);
          const latest = Math.max(...sequences);
          expect(from).toBeDefined();
          const kept = list.filter((c) => c.sequence >= from!);
          expect(kept.some((c) => c.sequence === latest)).toBe(true);
          expect(kept.length).toBeLessThanOrEqual(count);
          for (const c of kept) {
            if (c.sequence !== latest && maxAgeDays !== undefined)
              expect(NOW - Date.parse(c.createdAt)).toBeLessThanOrEqual(maxAgeDays * DAY);
          }
        },
      ),
    );
  });
});

describe('the retention setting', () => {
  it('keeps the last 24 by default', () => {
    expect(DEFAULT_RETAIN_COUNT).toBe(24);
    expect(resolveRetention()).toEqual({ count: 24, maxAgeDays: undefined });
    expect(resolveRetention({ maxAgeDays: 7 })).toEqual({ count: 24, maxAgeDays: 7 });
  });

  it('refuses counts below 1, fractions, ages of 0 and unknown keys', () => {
    for (const bad of [{ count: 0 }, { count: 2.5 }, { count: '3' }, { maxAgeDays: 0 }, { days: 3 }]) {
      expect(retentionSchema.safeParse(bad).success, JSON.stringify(bad)).toBe(false);
    }
    expect(retentionSchema.parse({ count: 3, maxAgeDays: 1.5 })).toEqual({ count: 3, maxAgeDays: 1.5 });
  });

  it('reads --retain N as a whole number of at least 1, naming the flag otherwise', () => {
    expect(parseRetainCount('2')).toBe(2);
    for (const bad of ['0', '-1', '1.5', 'two', '', '1e3']) {
      expect(() => parseRetainCount(bad), bad).toThrow(ConfigError);
    }
    expect(() => parseRetainCount('0')).toThrow(/^--retain "0": give the number of checkpoints to keep/);
  });
});
