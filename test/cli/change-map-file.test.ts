// Reading `--changed FILE`: every way a change map can be malformed is refused with a ChangeMapError
// that names the disk, the file, the entry and what is wrong with it.
import { mkdtemp, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { readChangeFile } from '../../cli/change-map.ts';
import { ChangeMapError } from '../../shared/engine/errors.ts';

async function mapFile(text: string): Promise<string> {
  const path = join(await mkdtemp(join(tmpdir(), 'ferry-change-map-')), 'x.json');
  await writeFile(path, text);
  return path;
}

const good = '{"offset": 0, "length": 4096}';

describe('readChangeFile', () => {
  it.each([
    [
      'Infinity (1e999)',
      `[${good}, ${good}, ${good}, {"offset": 1e999, "length": 1}]`,
      'entry 3: offset Infinity is not a finite number',
    ],
    [
      'a fraction',
      `[${good}, {"offset": 0.5, "length": 4096}]`,
      'entry 1: offset 0.5 is not a whole number of bytes',
    ],
    ['a negative length', `[{"offset": 0, "length": -4096}]`, 'entry 0: length -4096 is negative'],
    ['a number past 2^53', '[{"offset": 1e300, "length": 1}]', 'entry 0: offset 1e+300 is beyond 2^53 bytes'],
    [
      'an end past 2^53',
      '[{"offset": 9007199254740990, "length": 4096}]',
      'entry 0: extent at offset 9007199254740990 with length 4096 ends beyond 2^53 bytes',
    ],
    [
      'a string',
      '[{"offset": "NaN", "length": 1}]',
      'entry 0: offset the string "NaN" is not a number of bytes',
    ],
    ['null', '[{"offset": 0, "length": null}]', 'entry 0: length null is not a number of bytes'],
    ['a missing field', `[${good}, {"offset": 4096}]`, 'entry 1: has no length'],
    [
      'an unknown field',
      '[{"offset": 0, "length": 1, "len": 1}]',
      'entry 0: has unknown field "len" (allowed: offset, length)',
    ],
    [
      'a "__proto__" field',
      '[{"offset": 0, "length": 1, "__proto__": {"length": 2}}]',
      'entry 0: has unknown field "__proto__" (allowed: offset, length)',
    ],
    ['an entry that is a list', '[[0, 4096]]', 'entry 0: is a list, not {"offset": N, "length": N}'],
    ['an entry that is a number', '[4096]', 'entry 0: is 4096, not {"offset": N, "length": N}'],
    [
      'a number',
      '42',
      'must be a JSON list of {"offset": N, "length": N} in bytes (or {"extents": [...]}), not 42',
    ],
    [
      'null',
      'null',
      'must be a JSON list of {"offset": N, "length": N} in bytes (or {"extents": [...]}), not null',
    ],
    [
      'a lone extent',
      good,
      'must be a JSON list of {"offset": N, "length": N} in bytes (or {"extents": [...]}), not an object with "offset", "length"',
    ],
    [
      'extents that are not a list',
      '{"extents": {"offset": 0}}',
      'has "extents" that are an object, not a list of {"offset": N, "length": N}',
    ],
  ])('refuses %s, naming the entry and why', async (_what, text, why) => {
    // Prepare
    const path = await mapFile(text);
    // Act
    const err = await readChangeFile(path, 'os').catch((e: unknown) => e);
    // Assess
    expect(err).toBeInstanceOf(ChangeMapError);
    expect((err as ChangeMapError).message).toBe(`disk os: change map ${path} ${why}`);
    expect((err as ChangeMapError).disk).toBe('os');
  });

  it('says why a file is not JSON', async () => {
    const path = await mapFile('[{"offset": 0,');
    await expect(readChangeFile(path, 'os')).rejects.toThrow(
      new RegExp(`^disk os: change map ${path} cannot be read as JSON: `),
    );
  });

  it('reads a list, or an object holding one, in the order given', async () => {
    const extents = [
      { offset: 8192, length: 4096 },
      { offset: 0, length: 0 },
      { offset: 2 ** 52, length: 2 ** 20 },
    ];
    expect(await readChangeFile(await mapFile(JSON.stringify(extents)), 'os')).toEqual(extents);
    expect(await readChangeFile(await mapFile(JSON.stringify({ extents })), 'os')).toEqual(extents);
    expect(await readChangeFile(await mapFile('[]'), 'os')).toEqual([]);
  });
});
