// Change maps -> descriptors: properties over random change maps, and the cases operators hit.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import {
  cutDescriptors,
  type Descriptor,
  normalizeExtents,
  planDescriptors,
  summarizeExtents,
} from '../../shared/engine/descriptors.ts';
import { ChangeMapError, ConfigError } from '../../shared/engine/errors.ts';
import type { Extent } from '../../shared/engine/extents.ts';
import { GiB, KiB, MiB, TiB } from '../../shared/engine/units.ts';

const RUNS = 300;

/**
 * A disk, its target's block size, a chunk size and a messy change map, as CBT or a diff returns it
 * for this disk: every extent ends at or before the end of the disk (maps that reach past it are
 * refused, see badCaseArb).
 */
interface Case {
  diskSize: number;
  blockSize: number;
  chunkSize: number;
  startSeq: number;
  extents: Extent[];
  shuffleSeed: number;
}

const caseArb: fc.Arbitrary<Case> = fc
  .record({
    blockShift: fc.integer({ min: 9, max: 20 }),
    chunkBlocks: fc.integer({ min: 1, max: 16 }),
    // Descriptors per disk stay small whatever the block size, so 300 runs stay quick.
    diskChunks: fc.integer({ min: 0, max: 24 }),
    startSeq: fc.nat({ max: 1000 }),
    shuffleSeed: fc.integer(),
  })
  .chain(({ blockShift, chunkBlocks, diskChunks, startSeq, shuffleSeed }) => {
    const blockSize = 2 ** blockShift;
    const chunkSize = blockSize * chunkBlocks;
    return fc
      .integer({ min: 1, max: Math.max(1, diskChunks * chunkSize) + blockSize - 1 })
      .chain((diskSize) => {
        // Anywhere on the disk, often in its last blocks (the short last block, the exact end).
        const offset = fc.oneof(
          fc.nat({ max: diskSize }),
          fc.integer({ min: Math.max(0, diskSize - 2 * blockSize), max: diskSize }),
        );
        // Empty, short, long, or exactly up to the end of the disk: never past it.
        const lengthAt = (at: number) => {
          const room = diskSize - at;
          return fc.oneof(
            fc.constant(0),
            fc.integer({ min: 0, max: Math.min(room, 2 * blockSize) }),
            fc.integer({ min: 0, max: room }),
            fc.constant(room),
          );
        };
        const extent = offset.chain((o) => lengthAt(o).map((length) => ({ offset: o, length })));
        const loose = fc.array(extent, { maxLength: 40 });
        // A chain of extents whose gaps are negative (overlap), zero (touching) or positive; a link
        // that would leave the disk is pulled back inside it.
        const chained = fc
          .record({
            start: offset,
            links: fc.array(
              fc.record({
                gap: fc.oneof(fc.constant(0), fc.integer({ min: -blockSize, max: 3 * blockSize })),
                length: fc.oneof(
                  fc.constant(0),
                  fc.integer({ min: 1, max: 2 * blockSize }),
                  fc.integer({ min: 1, max: diskSize }),
                ),
              }),
              { maxLength: 40 },
            ),
          })
          .map(({ start, links }) => {
            const out: Extent[] = [];
            let at = start;
            for (const { gap, length: l } of links) {
              const o = Math.min(Math.max(0, at + gap), diskSize);
              const length = Math.min(l, diskSize - o);
              out.push({ offset: o, length });
              at = o + length;
            }
            return out;
          });
        return fc.tuple(loose, chained).map(([a, b]) => ({
          diskSize,
          blockSize,
          chunkSize,
          startSeq,
          extents: [...a, ...b],
          shuffleSeed,
        }));
      });
  });

/** An extent that reaches past the end of a disk of `diskSize` bytes, in the ways a wrong map does. */
const pastEndArb = (diskSize: number): fc.Arbitrary<Extent> =>
  fc.oneof(
    // Crosses the end: starts inside (or at the end) and runs on past it.
    fc.nat({ max: diskSize }).chain((offset) =>
      fc.integer({ min: diskSize - offset + 1, max: diskSize - offset + 4 * MiB }).map((length) => ({
        offset,
        length,
      })),
    ),
    // Wholly beyond, near or very far (10^15 on a small disk), empty or not.
    fc.record({
      offset: fc.oneof(
        fc.integer({ min: diskSize + 1, max: diskSize + 4 * MiB }),
        fc.integer({ min: diskSize + 1, max: 2 ** 50 }),
      ),
      length: fc.oneof(fc.constant(0), fc.integer({ min: 1, max: 4 * MiB })),
    }),
  );

/** A map for the wrong (or a resized) disk: a good map with bad extents from position `at` on. */
interface BadCase extends Case {
  /** Position of the first extent past the end, in the map as given. */
  at: number;
}

const badCaseArb: fc.Arbitrary<BadCase> = caseArb.chain((c) =>
  fc
    .record({
      at: fc.nat({ max: c.extents.length }),
      first: pastEndArb(c.diskSize),
      // Later extents, good or bad: only the first bad one is named.
      rest: fc.array(
        fc.oneof(pastEndArb(c.diskSize), fc.constantFrom(...c.extents, { offset: 0, length: 0 })),
        {
          maxLength: 5,
        },
      ),
    })
    .map(({ at, first, rest }) => ({
      ...c,
      at,
      extents: [...c.extents.slice(0, at), first, ...c.extents.slice(at), ...rest],
    })),
);

/** Deterministic Fisher-Yates, so a failing shuffle replays from fast-check's seed. */
function shuffled<T>(items: readonly T[], seed: number): T[] {
  const out = [...items];
  let state = seed >>> 0 || 1;
  for (let i = out.length - 1; i > 0; i--) {
    state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
    const j = state % (i + 1);
    [out[i], out[j]] = [out[j]!, out[i]!];
  }
  return out;
}

/**
 * The expected changed bytes, by a different route than the code under test: each extent widened to
 * whole blocks straight from the definition, then the union taken with a coverage sweep over start and
 * end events instead of sort-and-merge.
 */
function expectedUnion(c: Case): Extent[] {
  const events: [number, number][] = [];
  for (const e of c.extents) {
    if (e.length === 0) continue;
    const start = Math.floor(e.offset / c.blockSize) * c.blockSize;
    const end = Math.min(Math.ceil((e.offset + e.length) / c.blockSize) * c.blockSize, c.diskSize);
    if (start >= end) continue;
    events.push([start, +1], [end, -1]);
  }
  // Starts before ends at the same place, so touching ranges come out as one.
  events.sort((a, b) => a[0] - b[0] || b[1] - a[1]);
  const union: Extent[] = [];
  let depth = 0;
  let openedAt = 0;
  for (const [at, delta] of events) {
    if (depth === 0 && delta > 0) openedAt = at;
    depth += delta;
    if (depth === 0) union.push({ offset: openedAt, length: at - openedAt });
  }
  return union;
}

/** Joins the descriptors' extents where they touch (a split extent continues in the next descriptor). */
function coveredBy(descriptors: readonly Descriptor[]): Extent[] {
  const out: Extent[] = [];
  for (const e of descriptors.flatMap((d) => d.extents)) {
    const last = out[out.length - 1];
    if (last && last.offset + last.length === e.offset) {
      out[out.length - 1] = { offset: last.offset, length: last.length + e.length };
    } else {
      out.push({ offset: e.offset, length: e.length });
    }
  }
  return out;
}

function plan(c: Case, extents: readonly Extent[] = c.extents): Descriptor[] {
  const normalized = normalizeExtents(extents, { diskSize: c.diskSize, blockSize: c.blockSize, disk: 'd0' });
  return [...cutDescriptors(normalized, { chunkSize: c.chunkSize, startSeq: c.startSeq })];
}

describe('cutting a change map into descriptors (properties)', () => {
  it('covers exactly the block-aligned changed bytes (the last block short on an odd-sized disk)', () => {
    fc.assert(
      fc.property(caseArb, (c) => {
        // Prepare
        const expected = expectedUnion(c);
        // Act
        const descriptors = plan(c);
        // Assess
        expect(coveredBy(descriptors)).toEqual(expected);
      }),
      { numRuns: RUNS },
    );
  });

  it('normalises to sorted, disjoint, non-touching, aligned extents inside the disk', () => {
    fc.assert(
      fc.property(caseArb, (c) => {
        // Act
        const normalized = normalizeExtents(c.extents, { diskSize: c.diskSize, blockSize: c.blockSize });
        // Assess
        expect(normalized).toEqual(expectedUnion(c));
        normalized.forEach((e, i) => {
          expect(e.length).toBeGreaterThan(0);
          expect(e.offset % c.blockSize).toBe(0);
          const end = e.offset + e.length;
          expect(end % c.blockSize === 0 || end === c.diskSize).toBe(true);
          expect(end).toBeLessThanOrEqual(c.diskSize);
          const next = normalized[i + 1];
          if (next) expect(end).toBeLessThan(next.offset);
        });
      }),
      { numRuns: RUNS },
    );
  });

  it('keeps descriptors in order, non-overlapping, with sorted disjoint extents inside their span', () => {
    fc.assert(
      fc.property(caseArb, (c) => {
        // Act
        const descriptors = plan(c);
        // Assess
        descriptors.forEach((d, i) => {
          const next = descriptors[i + 1];
          if (next) expect(d.offset + d.length).toBeLessThanOrEqual(next.offset);
          expect(d.extents.length).toBeGreaterThan(0);
          expect(d.extents[0]!.offset).toBe(d.offset);
          const last = d.extents[d.extents.length - 1]!;
          expect(last.offset + last.length).toBe(d.offset + d.length);
          d.extents.forEach((e, j) => {
            expect(e.length).toBeGreaterThan(0);
            expect(e.offset).toBeGreaterThanOrEqual(d.offset);
            expect(e.offset + e.length).toBeLessThanOrEqual(d.offset + d.length);
            const after = d.extents[j + 1];
            // Strictly before: touching extents would have been merged.
            if (after) expect(e.offset + e.length).toBeLessThan(after.offset);
          });
        });
      }),
      { numRuns: RUNS },
    );
  });

  it('never exceeds chunkSize and keeps every cut on a block boundary', () => {
    fc.assert(
      fc.property(caseArb, (c) => {
        // Act
        const descriptors = plan(c);
        // Assess
        for (const d of descriptors) {
          expect(d.length).toBeGreaterThan(0);
          expect(d.length).toBeLessThanOrEqual(c.chunkSize);
          expect(d.offset % c.blockSize).toBe(0);
          for (const e of d.extents) {
            expect(e.offset % c.blockSize).toBe(0);
            const end = e.offset + e.length;
            expect(end % c.blockSize === 0 || end === c.diskSize).toBe(true);
          }
        }
      }),
      { numRuns: RUNS },
    );
  });

  it('counts bytes as the sum of the extents, and gives each changed chunk-aligned cell one descriptor', () => {
    fc.assert(
      fc.property(caseArb, (c) => {
        // Act
        const descriptors = plan(c);
        // Assess
        descriptors.forEach((d, i) => {
          expect(d.bytes).toBe(d.extents.reduce((sum, e) => sum + e.length, 0));
          // Each descriptor lies inside one aligned cell, and the next one starts in a later cell.
          const cell = Math.floor(d.offset / c.chunkSize);
          expect(Math.floor((d.offset + d.length - 1) / c.chunkSize)).toBe(cell);
          const next = descriptors[i + 1];
          if (next) expect(Math.floor(next.offset / c.chunkSize)).toBeGreaterThan(cell);
        });
      }),
      { numRuns: RUNS },
    );
  });

  it('is deterministic: the same map in any order gives identical descriptors', () => {
    fc.assert(
      fc.property(caseArb, (c) => {
        // Prepare
        const reordered = shuffled(c.extents, c.shuffleSeed);
        // Act
        const a = plan(c);
        const b = plan(c, reordered);
        // Assess
        expect(b).toEqual(a);
      }),
      { numRuns: RUNS },
    );
  });

  it('accepts every map that stays inside the disk, extents ending exactly at its end included', () => {
    fc.assert(
      fc.property(caseArb, (c) => {
        // Act
        const act = () => [...planDescriptors(c.extents, { ...c, disk: 'd0' })];
        // Assess
        expect(act).not.toThrow();
      }),
      { numRuns: RUNS },
    );
  });

  it('refuses a map with any extent past the end of the disk, naming the disk and the first such extent', () => {
    fc.assert(
      fc.property(badCaseArb, (c) => {
        // Prepare
        const first = c.extents[c.at]!;
        // Act: planning is eager, so nothing is cut (or sent) from a map that is refused.
        let thrown: unknown;
        try {
          planDescriptors(c.extents, { ...c, disk: 'd0' });
        } catch (err) {
          thrown = err;
        }
        // Assess
        expect(thrown).toBeInstanceOf(ChangeMapError);
        expect(thrown).toMatchObject({ disk: 'd0', offset: first.offset });
        const message = (thrown as Error).message;
        expect(message).toContain(
          `disk d0: entry ${c.at} at offset ${first.offset} with length ${first.length}`,
        );
        expect(message).toContain(`past the end of the disk (${c.diskSize} bytes)`);
        expect(message).not.toContain('\n');
      }),
      { numRuns: RUNS },
    );
  });

  it('numbers descriptors densely from startSeq', () => {
    fc.assert(
      fc.property(caseArb, (c) => {
        // Act
        const descriptors = plan(c);
        // Assess
        expect(descriptors.map((d) => d.seq)).toEqual(descriptors.map((_, i) => c.startSeq + i));
      }),
      { numRuns: RUNS },
    );
  });
});

describe('normalizeExtents', () => {
  it('widens to blocks, keeps the short last block and merges overlapping and touching extents', () => {
    // Prepare: a 10 KiB disk (its last 4 KiB block is 2 KiB short) and a messy map.
    const extents: Extent[] = [
      { offset: 9 * KiB, length: KiB }, // ends exactly at the end: widened to the short last block
      { offset: 100, length: 10 }, // widened to block 0
      { offset: 4 * KiB, length: 0 }, // empty: dropped, not widened
      { offset: 4 * KiB - 1, length: 1 }, // touches block 0 once widened
      { offset: 10 * KiB, length: 0 }, // empty at the very end: dropped, not refused
    ];
    // Act
    const normalized = normalizeExtents(extents, { diskSize: 10 * KiB, blockSize: 4 * KiB });
    // Assess
    expect(normalized).toEqual([
      { offset: 0, length: 4 * KiB },
      { offset: 8 * KiB, length: 2 * KiB },
    ]);
    expect(summarizeExtents(normalized)).toEqual({ extents: 2, bytes: 6 * KiB });
  });

  it('refuses an extent far beyond the disk (a map for another disk), naming disk, position, offset, length and size', () => {
    // Prepare: the case seen in the field: offset 10^15 on a 64 MiB disk.
    const extents = [
      { offset: 0, length: 4 * KiB },
      { offset: 10 ** 15, length: 4 * KiB },
    ];
    // Act
    const act = () => normalizeExtents(extents, { diskSize: 64 * MiB, blockSize: 512, disk: 'db-data' });
    // Assess
    expect(act).toThrow(ChangeMapError);
    expect(act).toThrow(
      'change map of disk db-data: entry 1 at offset 1000000000000000 with length 4096 ends at ' +
        '1000000000004096, past the end of the disk (67108864 bytes): the map is for another disk ' +
        'or for this disk before a resize',
    );
    expect(act).toThrow(expect.objectContaining({ disk: 'db-data', offset: 10 ** 15 }));
  });

  it('refuses an extent that crosses the end of the disk (a map from before a resize) instead of cutting it', () => {
    // Prepare: the disk shrank from 64 MiB to 60 MiB; the map still describes its old last blocks.
    const extents = [
      { offset: 8 * MiB, length: 4 * KiB },
      { offset: 60 * MiB - 4 * KiB, length: 8 * KiB },
    ];
    // Act
    const act = () => normalizeExtents(extents, { diskSize: 60 * MiB, blockSize: 512 * KiB, disk: 'os' });
    // Assess
    expect(act).toThrow(ChangeMapError);
    expect(act).toThrow(
      `disk os: entry 1 at offset ${60 * MiB - 4 * KiB} with length ${8 * KiB} ends at ${60 * MiB + 4 * KiB}, ` +
        `past the end of the disk (${60 * MiB} bytes)`,
    );
  });

  it('names the first extent past the end in the order given, not in offset order', () => {
    // Prepare: two bad extents; the later one in the map has the lower offset.
    const extents = [
      { offset: 0, length: KiB },
      { offset: 5 * MiB, length: KiB },
      { offset: 2 * MiB, length: KiB },
      { offset: 4 * MiB, length: 2 * MiB },
    ];
    // Act
    const act = () => normalizeExtents(extents, { diskSize: 4 * MiB, blockSize: 4 * KiB, disk: 'd' });
    // Assess
    expect(act).toThrow(`disk d: entry 1 at offset ${5 * MiB} with length ${KiB}`);
  });

  it('counts positions in a streamed (iterable) map, as a source lister gives it', () => {
    // Prepare
    function* listed(): Generator<Extent> {
      for (let i = 0; i < 5; i++) yield { offset: i * MiB, length: MiB };
    }
    // Act
    const act = () => normalizeExtents(listed(), { diskSize: 4 * MiB, blockSize: 4 * KiB, disk: 'vol-1' });
    // Assess
    expect(act).toThrow(`disk vol-1: entry 4 at offset ${4 * MiB} with length ${MiB}`);
  });

  it('drops an empty extent at the end of the disk, and refuses one past it', () => {
    // Prepare
    const opts = { diskSize: 10 * KiB, blockSize: 4 * KiB, disk: 'd' };
    // Act
    const atEnd = normalizeExtents([{ offset: 10 * KiB, length: 0 }], opts);
    const pastEnd = () => normalizeExtents([{ offset: 10 * KiB + 1, length: 0 }], opts);
    // Assess
    expect(atEnd).toEqual([]);
    expect(pastEnd).toThrow(ChangeMapError);
    expect(pastEnd).toThrow(`disk d: entry 0 at offset ${10 * KiB + 1} with length 0`);
  });

  it('refuses any non-empty extent on an empty disk', () => {
    // Act
    const act = () => normalizeExtents([{ offset: 0, length: 1 }], { diskSize: 0, blockSize: 512 });
    // Assess
    expect(act).toThrow(
      'change map: entry 0 at offset 0 with length 1 ends at 1, past the end of the disk (0 bytes)',
    );
  });

  it('names the disk and the offset when an offset is negative', () => {
    // Prepare
    const extents = [
      { offset: 0, length: 4096 },
      { offset: -4096, length: 4096 },
    ];
    // Act
    const act = () => normalizeExtents(extents, { diskSize: GiB, blockSize: 4096, disk: 'vm-7/disk-1' });
    // Assess
    expect(act).toThrow(ChangeMapError);
    expect(act).toThrow(/vm-7\/disk-1.*-4096/);
    try {
      act();
    } catch (err) {
      expect(err).toMatchObject({ name: 'ChangeMapError', disk: 'vm-7/disk-1', offset: -4096 });
    }
  });

  it.each([
    ['a fractional offset', { offset: 1.5, length: 512 }, /offset 1\.5/],
    ['a NaN length', { offset: 512, length: Number.NaN }, /offset 512.*NaN/],
    ['a negative length', { offset: 1024, length: -1 }, /offset 1024.*-1/],
    ['an offset past 2^53', { offset: 2 ** 53, length: 512 }, /offset 9007199254740992/],
    ['an end past 2^53', { offset: 2 ** 52, length: 2 ** 52 }, /offset 4503599627370496/],
  ])('refuses %s with a ChangeMapError naming the disk and offset', (_what, extent, message) => {
    // Act
    const act = () => normalizeExtents([extent], { diskSize: TiB, blockSize: 512, disk: 'db-data' });
    // Assess
    expect(act).toThrow(ChangeMapError);
    expect(act).toThrow(/db-data/);
    expect(act).toThrow(message);
  });

  it('gives nothing for an empty map', () => {
    // Act
    const normalized = normalizeExtents([], { diskSize: TiB, blockSize: 512 * KiB });
    // Assess
    expect(normalized).toEqual([]);
    expect([...cutDescriptors(normalized, { chunkSize: MiB })]).toEqual([]);
    expect(summarizeExtents(normalized)).toEqual({ extents: 0, bytes: 0 });
  });
});

describe('cutDescriptors', () => {
  it('splits an extent that crosses a chunk boundary and packs small ones together', () => {
    // Prepare
    const extents: Extent[] = [
      { offset: 0, length: 512 * KiB },
      { offset: MiB, length: 1536 * KiB },
      { offset: 2816 * KiB, length: 128 * KiB },
    ];
    // Act
    const descriptors = [...cutDescriptors(extents, { chunkSize: MiB })];
    // Assess: a change starting exactly at the chunk's end opens the next descriptor.
    expect(descriptors).toEqual([
      { seq: 0, offset: 0, length: 512 * KiB, extents: [{ offset: 0, length: 512 * KiB }], bytes: 512 * KiB },
      { seq: 1, offset: MiB, length: MiB, extents: [{ offset: MiB, length: MiB }], bytes: MiB },
      {
        seq: 2,
        offset: 2 * MiB,
        length: 896 * KiB,
        extents: [
          { offset: 2 * MiB, length: 512 * KiB },
          { offset: 2816 * KiB, length: 128 * KiB },
        ],
        bytes: 640 * KiB,
      },
    ]);
  });

  it('cuts a 16 TiB full copy lazily', () => {
    // Prepare
    const full = [{ offset: 0, length: 16 * TiB }];
    // Act
    const iterator = cutDescriptors(full, { chunkSize: MiB });
    const first = [iterator.next().value, iterator.next().value];
    // Assess
    expect(first).toEqual([
      { seq: 0, offset: 0, length: MiB, extents: [{ offset: 0, length: MiB }], bytes: MiB },
      { seq: 1, offset: MiB, length: MiB, extents: [{ offset: MiB, length: MiB }], bytes: MiB },
    ]);
  });

  it('refuses extents that are not normalised', () => {
    // Prepare
    const unsorted = [
      { offset: 2 * MiB, length: MiB },
      { offset: 0, length: MiB },
    ];
    // Act
    const act = () => [...cutDescriptors(unsorted, { chunkSize: MiB })];
    // Assess
    expect(act).toThrow(ChangeMapError);
    expect(act).toThrow(/offset 0/);
  });
});

describe('planDescriptors on a fragmented terabyte disk', () => {
  it('cuts 100k scattered 4 KiB changes, one per descriptor, at EBS block size', () => {
    // Prepare: 100k changes 10 MiB apart, each at a different spot in its 512 KiB block, listed backwards.
    const count = 100_000;
    const extents: Extent[] = [];
    for (let i = count - 1; i >= 0; i--)
      extents.push({ offset: i * 10 * MiB + (i % 128) * 4 * KiB, length: 4 * KiB });
    // Act
    const descriptors = [
      ...planDescriptors(extents, { diskSize: TiB, blockSize: 512 * KiB, chunkSize: MiB, disk: 'big' }),
    ];
    // Assess: each change widens to its own 512 KiB block, far from the next.
    expect(descriptors).toHaveLength(count);
    expect(descriptors.reduce((sum, d) => sum + d.bytes, 0)).toBe(count * 512 * KiB);
    expect(descriptors[count - 1]).toEqual({
      seq: count - 1,
      offset: (count - 1) * 10 * MiB,
      length: 512 * KiB,
      extents: [{ offset: (count - 1) * 10 * MiB, length: 512 * KiB }],
      bytes: 512 * KiB,
    });
  });

  it('packs 100k 4 KiB changes 256 KiB apart four to a 1 MiB descriptor at 4 KiB blocks', () => {
    // Prepare
    const count = 100_000;
    const extents = Array.from({ length: count }, (_, i) => ({ offset: i * 256 * KiB, length: 4 * KiB }));
    // Act
    const descriptors = [...planDescriptors(extents, { diskSize: TiB, blockSize: 4 * KiB, chunkSize: MiB })];
    // Assess
    expect(descriptors).toHaveLength(count / 4);
    expect(descriptors.every((d) => d.extents.length === 4 && d.bytes === 16 * KiB)).toBe(true);
    expect(descriptors[1]).toMatchObject({ offset: MiB, length: 768 * KiB + 4 * KiB });
  });

  it('refuses a map past the end when it is called, before any descriptor is cut', () => {
    // Prepare: the bad extent comes last, after many good ones.
    const extents = Array.from({ length: 1000 }, (_, i) => ({ offset: i * MiB, length: 4 * KiB }));
    extents.push({ offset: TiB - 4 * KiB, length: 8 * KiB });
    // Act
    const act = () =>
      planDescriptors(extents, { diskSize: TiB, blockSize: 512 * KiB, chunkSize: MiB, disk: 'big' });
    // Assess
    expect(act).toThrow(ChangeMapError);
    expect(act).toThrow(/disk big: entry 1000 at offset 1099511623680 with length 8192/);
  });

  it('refuses a chunk size that is not whole blocks', () => {
    // Act
    const act = () => planDescriptors([], { diskSize: TiB, blockSize: 512 * KiB, chunkSize: 768 * KiB });
    // Assess
    expect(act).toThrow(ConfigError);
    expect(act).toThrow(/chunkSize 786432.*524288/);
  });
});
