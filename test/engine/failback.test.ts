// The failback rule: a region moves exactly when the two sides differ, and its reason is which side
// left the shared checkpoint. Checked on worked examples and as a property against a model.
import { createHash } from 'node:crypto';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { differingRegions, planFailbackDisk, regionExtents } from '../../shared/engine/failback.ts';

const R = 1024; // a small region size: the rule does not depend on it

/** One 32-byte digest per region, each the hash of its label (equal labels, equal digests). */
const digests = (labels: readonly string[]): Uint8Array =>
  Buffer.concat(labels.map((l) => createHash('sha256').update(l).digest()));

describe('planFailbackDisk', () => {
  it('moves each region the sides disagree on, with which side changed it', () => {
    // Prepare: six regions; the last is short (size not a multiple of R).
    const size = 5 * R + 100;
    const shared = digests(['a', 'b', 'c', 'd', 'e', 'f']);
    const recovered = digests(['a', 'B', 'c', 'D', 'E', 'f']);
    const original = digests(['a', 'b', 'C', 'd2', 'E', 'F']);
    // Act
    const plan = planFailbackDisk({ disk: 'os', size, regionSize: R, shared, recovered, original });
    // Assess: 1 recovered only, 2 original only, 3 both (differently), 4 both to the same bytes, 5 original (short).
    expect(plan.moves).toEqual([
      { index: 1, offset: R, length: R, why: 'recovered' },
      { index: 2, offset: 2 * R, length: R, why: 'original' },
      { index: 3, offset: 3 * R, length: R, why: 'both' },
      { index: 5, offset: 5 * R, length: 100, why: 'original' },
    ]);
    expect(plan.alreadyEqual).toBe(1);
    expect(plan.counts).toEqual({
      recovered: { regions: 1, bytes: R },
      original: { regions: 2, bytes: R + 100 },
      both: { regions: 1, bytes: R },
    });
    expect(plan.extents).toEqual([
      { offset: R, length: 3 * R },
      { offset: 5 * R, length: 100 },
    ]);
  });

  it('moves nothing when neither side changed', () => {
    const same = digests(['a', 'b']);
    const plan = planFailbackDisk({
      disk: 'd',
      size: 2 * R,
      regionSize: R,
      shared: same,
      recovered: same,
      original: same,
    });
    expect(plan.moves).toEqual([]);
    expect(plan.extents).toEqual([]);
  });

  it('refuses digest lists of another disk size, naming the disk', () => {
    expect(() =>
      planFailbackDisk({
        disk: 'data',
        size: 3 * R,
        regionSize: R,
        shared: digests(['a', 'b', 'c']),
        recovered: digests(['a', 'b']),
        original: digests(['a', 'b', 'c']),
      }),
    ).toThrow(/^disk data: recovered image digests: 2 region digests for a disk of 3 regions$/);
  });

  it('property: a region moves iff the sides differ, for the reason the model gives', () => {
    const label = fc.constantFrom('x', 'y', 'z');
    fc.assert(
      fc.property(
        fc.array(fc.tuple(label, label, label), { minLength: 1, maxLength: 40 }),
        fc.integer({ min: 1, max: R }),
        (rows, tail) => {
          const size = (rows.length - 1) * R + tail;
          const plan = planFailbackDisk({
            disk: 'p',
            size,
            regionSize: R,
            shared: digests(rows.map((r) => r[0])),
            recovered: digests(rows.map((r) => r[1])),
            original: digests(rows.map((r) => r[2])),
          });
          const expected = rows.flatMap(([s, rec, orig], index) => {
            if (rec === orig) return [];
            const why = rec !== s && orig !== s ? 'both' : rec !== s ? 'recovered' : 'original';
            return [{ index, why }];
          });
          expect(plan.moves.map((m) => ({ index: m.index, why: m.why }))).toEqual(expected);
          // The extents cover exactly the moved bytes, inside the disk.
          const moved = plan.moves.reduce((s, m) => s + m.length, 0);
          expect(plan.extents.reduce((s, e) => s + e.length, 0)).toBe(moved);
          for (const e of plan.extents) expect(e.offset + e.length).toBeLessThanOrEqual(size);
        },
      ),
    );
  });
});

describe('differingRegions and regionExtents', () => {
  it('finds the regions that changed since a manifest, as merged extents', () => {
    const size = 4 * R - 10;
    const changed = differingRegions(
      'os',
      size,
      R,
      digests(['a', 'b', 'c', 'd']),
      digests(['a', 'B', 'C', 'D']),
    );
    expect(changed).toEqual([1, 2, 3]);
    expect(regionExtents(changed, size, R)).toEqual([{ offset: R, length: 3 * R - 10 }]);
  });
});
