// The operational parameters: defaults, sizes as people write them, and every refusal naming its setting.
import { describe, expect, it } from 'vitest';
import {
  DEFAULT_PARAMS,
  describeParams,
  resolveParams,
  unknownSettings,
} from '../../shared/engine/config.ts';
import { ConfigError } from '../../shared/engine/errors.ts';
import { KiB, MiB } from '../../shared/engine/units.ts';

const EBS = { targetBlockSize: 512 * KiB };
const AZURE = { targetBlockSize: 512 };

/** Runs `act`, expecting a ConfigError, and returns it for inspection. */
function refusal(act: () => unknown): ConfigError {
  try {
    act();
  } catch (err) {
    expect(err).toBeInstanceOf(ConfigError);
    return err as ConfigError;
  }
  throw new Error('expected a ConfigError, but the parameters were accepted');
}

describe('resolveParams defaults', () => {
  it('gives the product spec defaults when nothing is set', () => {
    // Act
    const params = resolveParams(undefined, EBS);
    // Assess
    expect(params).toEqual({
      chunkSize: MiB,
      window: 32 * MiB,
      windowLevels: [16 * MiB, 24 * MiB, 32 * MiB, 48 * MiB, 64 * MiB],
      checkpointInterval: 500 * MiB,
      nodeBudget: 256 * MiB,
      adaptive: true,
    });
    expect(resolveParams({}, EBS)).toEqual(DEFAULT_PARAMS);
  });

  it('accepts its own defaults for both EBS and Azure block sizes', () => {
    // Act
    const azure = resolveParams({}, AZURE);
    // Assess
    expect(azure).toEqual(DEFAULT_PARAMS);
  });

  it('describes the parameters in one line', () => {
    // Act
    const line = describeParams(resolveParams({ window: '8 MiB', adaptive: false }, EBS));
    // Assess
    expect(line).not.toContain('\n');
    expect(line).toMatch(/chunk 1 MiB, window 8 MiB fixed, checkpoint every 500 MiB, node budget 256 MiB/);
  });
});

describe('resolveParams sizes', () => {
  it.each([
    ['1 MB', MiB],
    ['1MiB', MiB],
    ['2 MiB', 2 * MiB],
    [2 * MiB, 2 * MiB],
  ])('reads chunkSize %j as %d bytes', (chunkSize, bytes) => {
    // Act
    const params = resolveParams({ chunkSize }, EBS);
    // Assess
    expect(params.chunkSize).toBe(bytes);
  });

  it('reads every size setting, including the levels, from strings', () => {
    // Prepare
    const input = {
      chunkSize: '512KiB',
      window: '32MB',
      windowLevels: ['8 MiB', '32MB', 64 * MiB],
      checkpointInterval: '1 GiB',
      nodeBudget: '128 MB',
    };
    // Act
    const params = resolveParams(input, EBS);
    // Assess
    expect(params).toEqual({
      chunkSize: 512 * KiB,
      window: 32 * MiB,
      windowLevels: [8 * MiB, 32 * MiB, 64 * MiB],
      checkpointInterval: 1024 * MiB,
      nodeBudget: 128 * MiB,
      adaptive: true,
    });
  });

  it('pins stop-and-wait with a one-chunk fixed window', () => {
    // Act
    const params = resolveParams({ window: '1 MB', adaptive: false }, EBS);
    // Assess
    expect(params).toMatchObject({ window: MiB, chunkSize: MiB, adaptive: false });
  });

  it('does not hold unused default levels against a large fixed chunk', () => {
    // Act: the default 16 MiB level is below this chunk, but nothing adapts.
    const params = resolveParams({ chunkSize: '32 MiB', window: '32 MiB', adaptive: false }, EBS);
    // Assess
    expect(params.chunkSize).toBe(32 * MiB);
  });

  it('refuses a size it cannot read, naming the setting', () => {
    // Act
    const err = refusal(() => resolveParams({ window: 'lots' }, EBS));
    // Assess
    expect(err.setting).toBe('window');
    expect(err.message).toMatch(/window.*lots/);
  });
});

describe('resolveParams refusals', () => {
  it.each([
    [
      'a chunk that is not whole target blocks',
      { chunkSize: '768 KiB' },
      'chunkSize',
      "chunkSize 768 KiB is not a multiple of the target's 512 KiB block size",
    ],
    ['a zero chunk', { chunkSize: 0 }, 'chunkSize', /chunkSize 0 B must hold at least one.*512 KiB/],
    ['a chunk above the sanity cap', { chunkSize: '128 MiB' }, 'chunkSize', /chunkSize 128 MiB.*64 MiB/],
    [
      'a window smaller than a chunk',
      { chunkSize: '2 MiB', window: '1 MiB', adaptive: false },
      'window',
      /window 1 MiB is smaller than one chunk \(chunkSize 2 MiB\)/,
    ],
    [
      'levels out of order',
      { windowLevels: ['16 MiB', '48 MiB', '32 MiB'] },
      'windowLevels',
      /windowLevels must be strictly ascending, but 32 MiB follows 48 MiB/,
    ],
    [
      'a repeated level',
      { windowLevels: ['16 MiB', '32 MiB', '32 MiB'] },
      'windowLevels',
      /windowLevels.*ascending/,
    ],
    [
      'a level smaller than a chunk',
      { chunkSize: '4 MiB', windowLevels: ['2 MiB', '32 MiB'] },
      'windowLevels',
      /windowLevels: level 2 MiB is smaller than one chunk \(chunkSize 4 MiB\)/,
    ],
    [
      'explicit bad levels even when not adaptive',
      { adaptive: false, windowLevels: ['64 MiB', '16 MiB'] },
      'windowLevels',
      /windowLevels/,
    ],
    [
      'an adaptive window that is not a level',
      { window: '20 MiB' },
      'window',
      /window 20 MiB is not one of the adaptive levels \(16 MiB, 24 MiB, 32 MiB, 48 MiB, 64 MiB\)/,
    ],
    [
      'a checkpoint interval smaller than a chunk',
      { checkpointInterval: '512 KiB' },
      'checkpointInterval',
      /checkpointInterval 512 KiB is smaller than one chunk/,
    ],
    [
      'a node budget smaller than a chunk',
      { nodeBudget: '512 KiB' },
      'nodeBudget',
      /nodeBudget 512 KiB is smaller than one chunk/,
    ],
    ['adaptive that is not a boolean', { adaptive: 'yes' }, 'adaptive', /adaptive/],
    ['a negative size', { nodeBudget: -1 }, 'nodeBudget', /nodeBudget.*-1/],
    ['a fractional number of bytes', { window: 1.5 }, 'window', /window.*1\.5/],
    ['a size that is neither text nor a number', { window: Number.NaN }, 'window', /window: expected a size/],
    ['an empty list of levels', { windowLevels: [] }, 'windowLevels', /windowLevels/],
    [
      'a level of the wrong type',
      { windowLevels: ['16 MiB', true] },
      'windowLevels[1]',
      /windowLevels\[1\]: expected a size/,
    ],
    ['an unreadable level', { windowLevels: ['16 MiB', 'big'] }, 'windowLevels[1]', /windowLevels\[1\].*big/],
  ])('refuses %s, naming the setting', (_what, input, setting, message) => {
    // Act
    const err = refusal(() => resolveParams(input, EBS));
    // Assess
    expect(err.setting).toBe(setting);
    expect(err.message).toMatch(message);
  });

  it('rejects an unknown key by name', () => {
    // Act: a typo of `window` must not silently fall back to the default.
    const err = refusal(() => resolveParams({ windowSize: '64 MiB' }, EBS));
    // Assess
    expect(err.setting).toBe('windowSize');
    expect(err.message).toMatch(/unknown setting windowSize/);
  });

  it('rejects a "__proto__" key as it rejects any unknown key', () => {
    // Prepare: JSON.parse makes "__proto__" an own key (an object literal would set the prototype).
    const input = JSON.parse('{"window": "32 MiB", "__proto__": {"window": "1 KiB"}}');
    // Act
    const err = refusal(() => resolveParams(input, EBS));
    // Assess
    expect(err.setting).toBe('__proto__');
    expect(err.message).toBe(
      'unknown setting __proto__ (known: chunkSize, window, windowLevels, checkpointInterval, nodeBudget, adaptive)',
    );
  });

  it('words unknown settings the same for readers that refuse them before a schema sees them', () => {
    const err = unknownSettings(['__proto__'], 'job file erp.json');
    expect(err).toBeInstanceOf(ConfigError);
    expect(err.setting).toBe('__proto__');
    expect(err.message).toBe(
      'job file erp.json: unknown setting __proto__ (known: chunkSize, window, windowLevels, checkpointInterval, nodeBudget, adaptive)',
    );
  });

  it('names every unknown key when there are several', () => {
    // Act
    const err = refusal(() => resolveParams({ chunk_size: '1 MB', per_disk_window: '32 MB' }, EBS));
    // Assess
    expect(err.message).toMatch(/chunk_size, per_disk_window/);
  });

  it('refuses parameters that are not an object', () => {
    // Act
    const err = refusal(() => resolveParams('chunkSize=1MB', EBS));
    // Assess
    expect(err.message).toMatch(/replication parameters: .*expected object/);
  });

  it('accepts a 768 KiB chunk for 512 B Azure pages but not for 512 KiB EBS blocks', () => {
    // Act
    const azure = resolveParams({ chunkSize: '768 KiB', window: '1 MiB', adaptive: false }, AZURE);
    const ebs = refusal(() => resolveParams({ chunkSize: '768 KiB', window: '1 MiB', adaptive: false }, EBS));
    // Assess
    expect(azure.chunkSize).toBe(768 * KiB);
    expect(ebs.setting).toBe('chunkSize');
  });
});
