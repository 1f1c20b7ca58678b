// Which checkpoint an operator means by `latest`, a number, an id or a time.
import { describe, expect, it } from 'vitest';
import { ConfigError } from '../../shared/engine/errors.ts';
import { selectCheckpoint } from '../../shared/engine/point-in-time.ts';
import type { RecoveryCheckpoint } from '../../shared/engine/ports.ts';

const cp = (sequence: number, createdAt: string): RecoveryCheckpoint => ({
  id: `erp#${sequence}`,
  set: 'erp',
  sequence,
  createdAt,
  parent: sequence > 1 ? `erp#${sequence - 1}` : undefined,
  disks: [],
});

// Out of order on purpose: the catalog's order is not the rule's.
const CATALOG = [
  cp(3, '2026-12-05T12:00:00.000Z'),
  cp(1, '2026-12-05T10:00:00.000Z'),
  cp(2, '2026-12-05T11:00:00.000Z'),
];
const pick = (choice: { checkpoint?: string; at?: string }) => selectCheckpoint('erp', CATALOG, choice).id;

describe('selectCheckpoint', () => {
  it('takes the latest by default and by name, a number, or an id', () => {
    expect(pick({})).toBe('erp#3');
    expect(pick({ checkpoint: 'latest' })).toBe('erp#3');
    expect(pick({ checkpoint: '2' })).toBe('erp#2');
    expect(pick({ checkpoint: 'erp#1' })).toBe('erp#1');
  });

  it('takes the newest checkpoint created at or before a time', () => {
    expect(pick({ at: '2026-12-05T11:00:00Z' })).toBe('erp#2');
    expect(pick({ at: '2026-12-05T11:59:59.999Z' })).toBe('erp#2');
    expect(pick({ at: '2026-12-05T13:30:00+01:00' })).toBe('erp#3');
    expect(pick({ at: '2027-01-01T00:00:00Z' })).toBe('erp#3');
  });

  it('refuses, naming what the set holds, a checkpoint or time that matches none', () => {
    expect(() => pick({ checkpoint: '9' })).toThrow(
      'checkpoint 9 is not in the catalog: set erp has checkpoints erp#1 (2026-12-05T10:00:00.000Z) to erp#3 (2026-12-05T12:00:00.000Z)',
    );
    expect(() => pick({ checkpoint: 'web#1' })).toThrow(/^checkpoint web#1 is not in the catalog/);
    expect(() => pick({ at: '2026-12-05T09:59:59Z' })).toThrow(
      /^no checkpoint at or before 2026-12-05T09:59:59Z: set erp has checkpoints erp#1/,
    );
    expect(() => selectCheckpoint('erp', [], {})).toThrow('set erp has no checkpoint');
  });

  it('refuses a time without a zone, a bare date, and a checkpoint and a time together', () => {
    for (const at of ['2026-12-05T11:00:00', '2026-12-05', 'yesterday', '']) {
      expect(() => pick({ at }), at).toThrow(ConfigError);
      expect(() => pick({ at }), at).toThrow(/give a time as ISO 8601 with its zone/);
    }
    expect(() => pick({ checkpoint: '1', at: '2026-12-05T11:00:00Z' })).toThrow(
      'give --checkpoint or --at, not both',
    );
  });
});
