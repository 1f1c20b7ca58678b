// The deployment configuration: defaults, and refusals that name the setting to fix.
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import {
  configFromContext,
  type FerryConfigInput,
  loadFerryConfigFile,
  parseFerryConfig,
  planParams,
} from '../../infra/config.ts';

const plan = (over: Record<string, unknown> = {}) => ({
  name: 'web',
  schedule: 'rate(15 minutes)',
  rpoMinutes: 30,
  disks: [{ disk: 'root', volumeId: 'vol-0123456789abcdef0' }],
  ...over,
});

const refusal = (input: unknown): string => {
  try {
    parseFerryConfig(input, 'test config');
  } catch (err) {
    expect((err as Error).name).toBe('ConfigError');
    return (err as Error).message;
  }
  throw new Error('expected the configuration to be refused');
};

describe('parseFerryConfig', () => {
  it('fills in the defaults', () => {
    // Prepare / Act
    const config = parseFerryConfig({ plans: [plan()] });
    // Assess
    expect(config.nodeBudget).toBe('256 MiB');
    expect(config.logRetentionDays).toBe(30);
    expect(config.writerConcurrency).toBe(20);
    expect(config.plans[0]).toMatchObject({ timezone: 'UTC', enabled: true });
    expect(config.sourceKmsKeyArns).toEqual([]);
  });

  it('merges window defaults under a plan’s own parameters', () => {
    const config = parseFerryConfig({
      windowDefaults: { chunkSize: '1 MiB', window: '32 MiB' },
      plans: [plan({ params: { window: '64 MiB' } })],
    });
    expect(planParams(config, config.plans[0]!)).toEqual({ chunkSize: '1 MiB', window: '64 MiB' });
  });

  it.each<[string, unknown, RegExp]>([
    ['an unknown key', { plans: [], nodeBudjet: '1 GiB' }, /unknown setting nodeBudjet/],
    ['an unknown plan key', { plans: [plan({ rpo: 5 })] }, /plans\[0\]: unknown setting rpo/],
    [
      'a volume id that is not one',
      { plans: [plan({ disks: [{ disk: 'root', volumeId: 'disk-1' }] })] },
      /plans\[0\]\.disks\[0\]\.volumeId: is not an EBS volume id/,
    ],
    [
      'an RPO below the minimum',
      { plans: [plan({ rpoMinutes: 1 })] },
      /plans\[0\]\.rpoMinutes: must be at least 5/,
    ],
    [
      'an RPO beyond what an alarm can watch',
      { plans: [plan({ rpoMinutes: 20_000 })] },
      /plans\[0\]\.rpoMinutes: must be at most 10080/,
    ],
    [
      'a schedule that is not one',
      { plans: [plan({ schedule: 'every 5 min' })] },
      /plans\[0\]\.schedule: must be/,
    ],
    [
      'a schedule slower than the RPO',
      { plans: [plan({ schedule: 'rate(1 hour)', rpoMinutes: 30 })] },
      /plans\[0\]\.schedule: rate\(1 hour\) starts a cycle less often than the RPO of 30 minutes/,
    ],
    [
      'a plan without disks',
      { plans: [plan({ disks: [] })] },
      /plans\[0\]\.disks: a plan needs at least one disk/,
    ],
    ['a plan name used twice', { plans: [plan(), plan()] }, /plans\[1\]\.name: plan web appears twice/],
    [
      'a disk used twice in a plan',
      {
        plans: [
          plan({
            disks: [
              { disk: 'root', volumeId: 'vol-0123456789abcdef0' },
              { disk: 'root', volumeId: 'vol-0fedcba9876543210' },
            ],
          }),
        ],
      },
      /plans\[0\]\.disks\[1\]\.disk: disk root appears twice/,
    ],
    [
      'a window smaller than a chunk',
      { plans: [plan({ params: { chunkSize: '2 MiB', window: '1 MiB', adaptive: false } })] },
      /plans\[0\]\.params: window 1 MiB is smaller than one chunk/,
    ],
    [
      'a chunk that is not whole EBS blocks',
      { windowDefaults: { chunkSize: '768 KiB' }, plans: [] },
      /windowDefaults: chunkSize 768 KiB is not a multiple of the target's 512 KiB block size/,
    ],
    ['a node budget that is not a size', { nodeBudget: 'lots', plans: [] }, /nodeBudget: cannot read "lots"/],
    [
      'a KMS key that is not an ARN',
      { snapshotKmsKeyArn: 'alias/ferry', plans: [] },
      /snapshotKmsKeyArn: is not a KMS key ARN/,
    ],
    ['a log retention CloudWatch does not offer', { logRetentionDays: 31, plans: [] }, /logRetentionDays/],
  ])('refuses %s, naming the setting', (_what, input, message) => {
    expect(refusal(input)).toMatch(message);
  });
});

describe('configFromContext', () => {
  const valid: FerryConfigInput = { plans: [plan()] };

  it('reads the file named by -c config', () => {
    const dir = mkdtempSync(join(tmpdir(), 'ferry-config-'));
    writeFileSync(join(dir, 'ferry.json'), JSON.stringify(valid));
    const config = configFromContext((key) => (key === 'config' ? 'ferry.json' : undefined), dir);
    expect(config.plans.map((p) => p.name)).toEqual(['web']);
  });

  it('reads inline JSON given as -c ferry', () => {
    const config = configFromContext((key) => (key === 'ferry' ? JSON.stringify(valid) : undefined));
    expect(config.plans).toHaveLength(1);
  });

  it('names the file when it cannot be read or parsed', () => {
    const dir = mkdtempSync(join(tmpdir(), 'ferry-config-'));
    writeFileSync(join(dir, 'broken.json'), '{ "plans": [');
    expect(() => loadFerryConfigFile('missing.json', dir)).toThrow(
      /cannot read the Ferry configuration file .*missing\.json/,
    );
    expect(() => loadFerryConfigFile('broken.json', dir)).toThrow(/broken\.json is not valid JSON/);
  });

  it('refuses no configuration and two configurations', () => {
    expect(() => configFromContext(() => undefined)).toThrow(/no Ferry configuration: pass -c config=/);
    expect(() => configFromContext((key) => (key === 'config' ? 'a.json' : '{}'))).toThrow(/not both/);
  });

  it('accepts the example configuration shipped in infra/config', () => {
    const config = loadFerryConfigFile('infra/config/example.json');
    expect(config.plans.length).toBeGreaterThan(0);
  });
});
