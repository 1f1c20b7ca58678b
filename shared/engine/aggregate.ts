// A checkpoint disk's aggregate checksum, named by its algorithm: what each publisher records, how a
// catalog reads entries from before the name, and how a verifier compares by name, never across.
import { z } from 'zod';
import { AGGREGATE_ALGORITHMS, type AggregateAlgorithm, type DiskAggregate } from './ports.ts';

/** The aggregate the engine publishes: SHA-256 (hex) over the cycle's chunk digests in seq order. */
export const chunkAggregate = (hex: string): DiskAggregate => ({
  algorithm: 'ferry-chunk-sha256',
  value: hex,
});

/** The aggregate the serverless finalizer publishes: EBS's LINEAR checksum over the block digests. */
export const ebsLinearAggregate = (digest: Uint8Array): DiskAggregate => ({
  algorithm: 'ebs-linear-sha256',
  value: Buffer.from(digest).toString('hex'),
});

/** A recorded aggregate as a catalog holds it: an algorithm this build knows, a 32-byte hex digest. */
export const diskAggregateSchema = z.strictObject({
  algorithm: z.enum(AGGREGATE_ALGORITHMS),
  value: z.string().regex(/^[0-9a-f]{64}$/, 'expected a SHA-256 as 64 lowercase hex digits'),
});

/**
 * A catalog disk entry written before the aggregate named its algorithm holds `aggregateSha256`
 * instead: this returns it with `aggregate: { algorithm, value }`, anything else as it is. Which
 * algorithm the old field meant depends on which publisher wrote that catalog, so the adapter that
 * reads it says (issue #12); an entry that has both fields is left for its schema to refuse.
 */
export function withNamedAggregate(entry: unknown, algorithm: AggregateAlgorithm): unknown {
  if (typeof entry !== 'object' || entry === null || 'aggregate' in entry) return entry;
  const { aggregateSha256, ...rest } = entry as Record<string, unknown>;
  if (typeof aggregateSha256 !== 'string') return entry;
  return { ...rest, aggregate: { algorithm, value: aggregateSha256 } };
}

/** Which checkpoint and disk an aggregate belongs to, and who checks it (for messages). */
export interface AggregateCheck {
  readonly checkpoint: string;
  readonly disk: string;
  /** The verifier, as an operator knows it: "ferry verify", "the finalizer". */
  readonly verifier: string;
}

/**
 * Says that `check.verifier`, which checks only the algorithms `checks`, cannot check a recorded
 * aggregate of another: naming the disk, the checkpoint and the algorithm, instead of comparing
 * values of two different hashes.
 */
export function uncheckableAggregate(
  check: AggregateCheck,
  recorded: DiskAggregate,
  checks: readonly AggregateAlgorithm[],
): string {
  return (
    `disk ${check.disk} of checkpoint ${check.checkpoint} records an aggregate of algorithm ` +
    `${recorded.algorithm}, which ${check.verifier} cannot check (it checks ${checks.join(', ')} only)`
  );
}

/**
 * Why the aggregate a checkpoint records for a disk is not the one a verifier computed, or
 * undefined when it is. The algorithms are compared first: a value of one says nothing about the
 * other, so a different algorithm is reported as uncheckable, not as a mismatch.
 */
export function aggregateProblem(
  check: AggregateCheck,
  recorded: DiskAggregate,
  computed: DiskAggregate,
): string | undefined {
  if (recorded.algorithm !== computed.algorithm) {
    return uncheckableAggregate(check, recorded, [computed.algorithm]);
  }
  if (recorded.value === computed.value) return undefined;
  return (
    `disk ${check.disk} of checkpoint ${check.checkpoint} records the ${recorded.algorithm} aggregate ` +
    `${recorded.value}, but ${check.verifier} computed ${computed.value}`
  );
}
