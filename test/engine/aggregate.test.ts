// A checkpoint disk's aggregate is checked only by the algorithm it names: values of two algorithms
// are never compared, and entries from before the name read as their catalog's writer meant them.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { linearAggregateBase64 } from '../../shared/aws/ebs/writer.ts';
import {
  aggregateProblem,
  chunkAggregate,
  diskAggregateSchema,
  ebsLinearAggregate,
  withNamedAggregate,
} from '../../shared/engine/aggregate.ts';
import { linearAggregate } from '../../shared/engine/integrity.ts';
import { AGGREGATE_ALGORITHMS, type DiskAggregate } from '../../shared/engine/ports.ts';

const check = { checkpoint: 'web#7', disk: 'os', verifier: 'ferry verify' };
const hex = fc.uint8Array({ minLength: 32, maxLength: 32 }).map((b) => Buffer.from(b).toString('hex'));
const aggregate = fc.record({ algorithm: fc.constantFrom(...AGGREGATE_ALGORITHMS), value: hex });

describe('aggregateProblem', () => {
  it('accepts the same value of the same algorithm', () => {
    const a = chunkAggregate('ab'.repeat(32));
    expect(aggregateProblem(check, a, { ...a })).toBeUndefined();
  });

  it('reports another value of the same algorithm with both values', () => {
    const problem = aggregateProblem(check, chunkAggregate('ab'.repeat(32)), chunkAggregate('cd'.repeat(32)));
    expect(problem).toBe(
      `disk os of checkpoint web#7 records the ferry-chunk-sha256 aggregate ${'ab'.repeat(32)}, ` +
        `but ferry verify computed ${'cd'.repeat(32)}`,
    );
  });

  it('never compares values across algorithms: it names the disk, checkpoint and algorithm instead', () => {
    fc.assert(
      fc.property(aggregate, aggregate, (recorded: DiskAggregate, computed: DiskAggregate) => {
        fc.pre(recorded.algorithm !== computed.algorithm);
        // Even the same digest bytes under another name are not a match.
        for (const c of [computed, { ...computed, value: recorded.value }]) {
          expect(aggregateProblem(check, recorded, c)).toBe(
            `disk os of checkpoint web#7 records an aggregate of algorithm ${recorded.algorithm}, ` +
              `which ferry verify cannot check (it checks ${computed.algorithm} only)`,
          );
        }
      }),
    );
  });
});

describe('the publishers’ encodings', () => {
  it('records the LINEAR checksum as the hex of the digest CompleteSnapshot takes in base64', () => {
    const blocks = [Buffer.alloc(32, 1), Buffer.alloc(32, 2), Buffer.alloc(32, 3)];
    const named = ebsLinearAggregate(linearAggregate(blocks));
    expect(named.algorithm).toBe('ebs-linear-sha256');
    expect(Buffer.from(named.value, 'hex').toString('base64')).toBe(linearAggregateBase64(blocks));
    expect(diskAggregateSchema.parse(named)).toEqual(named);
  });

  it('refuses a value that is not a SHA-256 in lowercase hex, and an unknown algorithm', () => {
    const value = 'ab'.repeat(32);
    for (const bad of [
      { algorithm: 'ferry-chunk-sha256', value: Buffer.from(value, 'hex').toString('base64') },
      { algorithm: 'ferry-chunk-sha256', value: value.toUpperCase() },
      { algorithm: 'ebs-linear-sha256', value: value.slice(2) },
      { algorithm: 'sha256', value },
    ]) {
      expect(diskAggregateSchema.safeParse(bad).success, JSON.stringify(bad)).toBe(false);
    }
  });
});

describe('withNamedAggregate', () => {
  const disk = { disk: 'os', chunks: 3 };
  const value = 'ef'.repeat(32);

  it('names a legacy aggregateSha256 with the algorithm its catalog’s writer computed', () => {
    for (const algorithm of AGGREGATE_ALGORITHMS) {
      expect(withNamedAggregate({ ...disk, aggregateSha256: value }, algorithm)).toEqual({
        ...disk,
        aggregate: { algorithm, value },
      });
    }
  });

  it('leaves a named aggregate, and an entry holding both fields, for the schema to judge', () => {
    const named = { ...disk, aggregate: chunkAggregate(value) };
    expect(withNamedAggregate(named, 'ebs-linear-sha256')).toBe(named);
    const both = { ...named, aggregateSha256: value };
    expect(withNamedAggregate(both, 'ebs-linear-sha256')).toBe(both);
    expect(withNamedAggregate(null, 'ebs-linear-sha256')).toBeNull();
    expect(withNamedAggregate(disk, 'ebs-linear-sha256')).toBe(disk);
  });
});
