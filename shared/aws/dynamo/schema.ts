// The DynamoDB table and item design for Ferry's serverless state, with zod schemas for every item.
//
// ONE table, string keys `pk` / `sk`, on-demand billing, no secondary index. A single table because
// every state change is a single-item conditional write (no transactions), so nothing gains from
// separate tables, and one table is one KMS key, one IAM resource and one backup policy. Ids
// (set, disk, plan, cycle, checkpoint) come from operators and may hold '#', '/' or ':': they are
// URI-encoded inside keys, so '#' only ever separates key parts.
//
//   item                     pk                              sk
//   replication set          SET#<set>                       SET
//   disk of a set            SET#<set>                       DISK#<disk>
//   job (one cycle)          SET#<set>                       JOB#<cycleId>
//   progress record          DISK#<set>#<disk>               PROGRESS
//   digest page              DISK#<set>#<disk>               DIGESTS#<epoch>#<page:8>
//   checkpoint              CATALOG#<set>                   CP#<sequence:12>
//   sets with checkpoints    CATALOG                         SET#<set>
//   checkpoint id claim      CHECKPOINT#<id>                 ID
//   plan lock                PLAN#<plan>                     LOCK
//
// The serverless cycle's items (cycle, disk of a cycle, descriptor pages, completion batches,
// signals, grant flow, node reservations) share this table and the disk partitions above: their
// keys and layout are in cycle-items.ts.
//
// Why this partitioning:
// - Everything one disk touches per chunk (progress and digests here; the cycle's flow, completions
//   and signals in cycle-items.ts) lives in that disk's own partition, so disks do not share a
//   partition's ~1,000 writes/s and a many-disk set is not one hot key.
// - Digests are paged, DIGEST_PAGE_SIZE raw 32-byte digests per item (items are <= 400 KB). The
//   page key carries an epoch derived from (cycleId, fingerprint), so a new cycle never overwrites
//   a page an older progress record still vouches for.
// - Checkpoints are sequence-sorted per set (zero-padded sequence), so "latest" is one Query with
//   ScanIndexForward=false, Limit=1. The CATALOG registry lists the sets that have checkpoints, so
//   listing the whole catalog is Queries with consistent reads, never a Scan.

import { createHash } from 'node:crypto';
import type { CreateTableCommandInput } from '@aws-sdk/client-dynamodb';
import { DynamoDBClient } from '@aws-sdk/client-dynamodb';
import { DynamoDBDocumentClient } from '@aws-sdk/lib-dynamodb';
import { z } from 'zod';
import { diskAggregateSchema, withNamedAggregate } from '../../engine/aggregate.ts';
import { JOB_STATUSES } from '../../engine/cycle/ports.ts';
import { MalformedStateError } from './errors.ts';

export const KEY = { pk: 'pk', sk: 'sk' } as const;

/**
 * Digests per page item. 1,000 raw SHA-256 digests are 32 KB: far below the 400 KB item limit, a
 * save rewrites at most one partial page (about 32 WCU) plus whole new pages, and a 1 MB Query
 * page returns ~30 pages (30,000 chunks, 30 GiB of disk at 1 MiB chunks) per round trip.
 */
export const DIGEST_PAGE_SIZE = 1000;
export const DIGEST_BYTES = 32;

/** The table as CreateTable input: used by the emulator tests; the CDK table mirrors these keys. */
export function tableDefinition(tableName: string): CreateTableCommandInput {
  return {
    TableName: tableName,
    BillingMode: 'PAY_PER_REQUEST',
    AttributeDefinitions: [
      { AttributeName: KEY.pk, AttributeType: 'S' },
      { AttributeName: KEY.sk, AttributeType: 'S' },
    ],
    KeySchema: [
      { AttributeName: KEY.pk, KeyType: 'HASH' },
      { AttributeName: KEY.sk, KeyType: 'RANGE' },
    ],
  };
}

/**
 * The document client the adapters talk through. A bare DynamoDBClient is wrapped (the wrapper
 * shares the caller's client, its credentials and connections); a document client is used as
 * given. Items are built without undefined values, so the caller's marshalling options do not
 * matter.
 */
export function documentClient(client: DynamoDBDocumentClient | DynamoDBClient): DynamoDBDocumentClient {
  if (client instanceof DynamoDBDocumentClient) return client;
  if (client instanceof DynamoDBClient) {
    return DynamoDBDocumentClient.from(client, { marshallOptions: { removeUndefinedValues: true } });
  }
  throw new TypeError('expected a DynamoDBClient or DynamoDBDocumentClient');
}

export type Key = { pk: string; sk: string };

const enc = (id: string): string => encodeURIComponent(id);
const pad = (n: number, width: number): string => String(n).padStart(width, '0');

export const keys = {
  set: (set: string): Key => ({ pk: `SET#${enc(set)}`, sk: 'SET' }),
  disk: (set: string, disk: string): Key => ({ pk: `SET#${enc(set)}`, sk: `DISK#${enc(disk)}` }),
  diskPrefix: (set: string): Key => ({ pk: `SET#${enc(set)}`, sk: 'DISK#' }),
  job: (set: string, cycleId: string): Key => ({ pk: `SET#${enc(set)}`, sk: `JOB#${enc(cycleId)}` }),
  progress: (set: string, disk: string): Key => ({ pk: diskPk(set, disk), sk: 'PROGRESS' }),
  digestPage: (set: string, disk: string, epoch: string, page: number): Key => ({
    pk: diskPk(set, disk),
    sk: `DIGESTS#${epoch}#${pad(page, 8)}`,
  }),
  /** Prefix of every digest page of a disk (all epochs), for clean-up. */
  digestPrefix: (set: string, disk: string, epoch?: string): Key => ({
    pk: diskPk(set, disk),
    sk: epoch === undefined ? 'DIGESTS#' : `DIGESTS#${epoch}#`,
  }),
  checkpoint: (set: string, sequence: number): Key => ({
    pk: `CATALOG#${enc(set)}`,
    sk: `CP#${pad(sequence, 12)}`,
  }),
  checkpointPrefix: (set: string): Key => ({ pk: `CATALOG#${enc(set)}`, sk: 'CP#' }),
  catalogSet: (set: string): Key => ({ pk: 'CATALOG', sk: `SET#${enc(set)}` }),
  catalogSetPrefix: (): Key => ({ pk: 'CATALOG', sk: 'SET#' }),
  checkpointId: (id: string): Key => ({ pk: `CHECKPOINT#${enc(id)}`, sk: 'ID' }),
  planLock: (plan: string): Key => ({ pk: `PLAN#${enc(plan)}`, sk: 'LOCK' }),
};

/** The partition of everything one disk of a set touches (progress, digests, and the cycle's items). */
export function diskPk(set: string, disk: string): string {
  return `DISK#${enc(set)}#${enc(disk)}`;
}

/** Short name of a (cycle, plan) pair for digest page keys; equal inputs give equal epochs. */
export function progressEpoch(cycleId: string, fingerprint: string): string {
  return createHash('sha256').update(cycleId).update('\0').update(fingerprint).digest('hex').slice(0, 16);
}

export const describeKey = (key: Key): string => `${key.pk} / ${key.sk}`;

// Item schemas. z.object (not strict): items also carry their keys.
const count = z.number().int().nonnegative();

export const replicationSetItem = z.object({
  set: z.string(),
  plan: z.string(),
  createdAt: z.string(),
  description: z.string().optional(),
});
export type ReplicationSetRecord = z.infer<typeof replicationSetItem>;

export const diskItem = z.object({
  set: z.string(),
  disk: z.string(),
  source: z.string(),
  target: z.string(),
  sizeBytes: count,
  blockSize: z.number().int().positive(),
});
export type DiskRecord = z.infer<typeof diskItem>;

// The job statuses are the cycle's (one list, in the engine's ports); the item schema checks them.
export { JOB_STATUSES, type JobStatus } from '../../engine/cycle/ports.ts';

export const jobItem = z.object({
  set: z.string(),
  cycleId: z.string(),
  plan: z.string(),
  status: z.enum(JOB_STATUSES),
  startedAt: z.string(),
  updatedAt: z.string(),
  checkpointId: z.string().optional(),
  /** Why the job failed, for the console; never data or a credential. */
  error: z.string().optional(),
});
export type JobRecord = z.infer<typeof jobItem>;

export const progressItem = z.object({
  cycleId: z.string(),
  fingerprint: z.string(),
  epoch: z.string(),
  watermark: count,
  bytesDone: count,
  version: z.number().int().positive(),
});
export type ProgressRecord = z.infer<typeof progressItem>;

export const digestPageItem = z.object({
  epoch: z.string(),
  page: count,
  count: z.number().int().min(0).max(DIGEST_PAGE_SIZE),
  digests: z.instanceof(Uint8Array),
});

export const checkpointItem = z.object({
  id: z.string(),
  set: z.string(),
  sequence: z.number().int().positive(),
  createdAt: z.string(),
  parent: z.string().optional(),
  disks: z.array(
    // Items written before the aggregate named its algorithm hold `aggregateSha256`: only the
    // serverless finalizer publishes into this table, and it recorded EBS's LINEAR checksum (hex).
    z.preprocess(
      (disk) => withNamedAggregate(disk, 'ebs-linear-sha256'),
      z.object({
        disk: z.string(),
        source: z.string(),
        target: z.string(),
        sizeBytes: count,
        kind: z.enum(['full', 'incremental']),
        chunks: count,
        bytes: count,
        aggregate: diskAggregateSchema,
        targetRef: z.string().optional(),
      }),
    ),
  ),
});

export const catalogSetItem = z.object({ set: z.string() });

export const checkpointIdItem = z.object({ set: z.string(), sequence: z.number().int().positive() });

export const planLockItem = z.object({
  plan: z.string(),
  owner: z.string(),
  lockExpiresAt: count,
  /** Incremented on every acquisition: a fencing token for writes made under the lock. */
  fence: z.number().int().positive(),
});
export type PlanLock = z.infer<typeof planLockItem>;

/** Validates an item read back; a malformed item is an error naming its table and key. */
export function parseItem<T>(schema: z.ZodType<T>, item: unknown, table: string, key: Key): T {
  const parsed = schema.safeParse(item);
  if (parsed.success) return parsed.data;
  const issue = parsed.error.issues[0];
  const where = issue?.path.length ? ` at ${issue.path.join('.')}` : '';
  throw new MalformedStateError(
    `DynamoDB item ${describeKey(key)} in table ${table} is malformed${where}: ${issue?.message ?? 'invalid'}`,
    { table, key: describeKey(key) },
  );
}
