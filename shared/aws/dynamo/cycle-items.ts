// The serverless cycle's items in the state table (next to schema.ts's): keys, retention and the
// record schemas the cycle adapters (cycle-ledger.ts, grant-flow.ts, node-budget.ts) read back.
//
//   item                       pk                    sk                           written
//   cycle                      SET#<set>             CYCLE#<cycle>                prepare, tick, finalizer
//   disk of a cycle            DISK#<set>#<disk>     CYCLE#<cycle>                prepare, differ, tick
//   descriptor page            DISK#<set>#<disk>     DESC#<cycle>#<page:8>        differ (TTL)
//   completion batch           DISK#<set>#<disk>     DONE#<cycle>#<batchId>       writer, per batch (TTL)
//   writer signals             DISK#<set>#<disk>     SIG#<cycle>#<bucket:13>      writer, per batch (TTL)
//   grant flow                 DISK#<set>#<disk>     FLOW#<cycle>                 writer (2 per batch), tick
//   node budget reservations   BUDGET#<node>         RESERVATIONS                 tick
//
// Ids are URI-encoded like schema.ts's keys, so '#' only ever separates key parts and a prefix such
// as `DONE#<cycle>#` never matches another cycle. Everything a disk touches per writer batch lives
// in that disk's partition. Pages, completion batches and signals carry `expiresAt` (epoch seconds),
// the table's TTL attribute; cycle, disk and flow records stay as the cycle's history.
import { z } from 'zod';
import {
  CYCLE_STATES,
  type CycleDiskRecord,
  type CycleRecord,
  DISK_KINDS,
} from '../../engine/cycle/ports.ts';
import { diskPk, type Key, keys } from './schema.ts';

/** The attribute (epoch seconds) DynamoDB's TTL deletes pages, completions and signals by. */
export const TTL_ATTRIBUTE = 'expiresAt';
// Descriptor pages and completion batches outlive their cycle by a month: long enough to investigate
// a failed cycle, short enough that a year of hourly cycles does not pile up.
export const PAGE_RETENTION_SECONDS = 30 * 24 * 60 * 60;
// Signals only steer the next few ticks.
export const SIGNAL_RETENTION_SECONDS = 24 * 60 * 60;

const enc = (id: string): string => encodeURIComponent(id);
const pad = (n: number, width: number): string => String(n).padStart(width, '0');

export const cycleKeys = {
  cycle: (set: string, cycleId: string): Key => ({ pk: keys.set(set).pk, sk: `CYCLE#${enc(cycleId)}` }),
  disk: (set: string, disk: string, cycleId: string): Key => ({
    pk: diskPk(set, disk),
    sk: `CYCLE#${enc(cycleId)}`,
  }),
  descriptorPage: (set: string, disk: string, cycleId: string, page: number): Key => ({
    pk: diskPk(set, disk),
    sk: `DESC#${enc(cycleId)}#${pad(page, 8)}`,
  }),
  completionBatch: (set: string, disk: string, cycleId: string, batchId: string): Key => ({
    pk: diskPk(set, disk),
    sk: `DONE#${enc(cycleId)}#${enc(batchId)}`,
  }),
  /** Prefix of every completion batch of a disk's cycle. */
  completionPrefix: (set: string, disk: string, cycleId: string): Key => ({
    pk: diskPk(set, disk),
    sk: `DONE#${enc(cycleId)}#`,
  }),
  signals: (set: string, disk: string, cycleId: string, bucket: number): Key => ({
    pk: diskPk(set, disk),
    sk: `SIG#${enc(cycleId)}#${pad(bucket, 13)}`,
  }),
  flow: (set: string, disk: string, cycleId: string): Key => ({
    pk: diskPk(set, disk),
    sk: `FLOW#${enc(cycleId)}`,
  }),
  nodeBudget: (node: string): Key => ({ pk: `BUDGET#${enc(node)}`, sk: 'RESERVATIONS' }),
};

/** Epoch seconds at which TTL may delete an item written at `nowMs` and kept `seconds`. */
export const expiresAt = (nowMs: number, seconds: number): number => Math.floor(nowMs / 1000) + seconds;

// ---- records ---------------------------------------------------------------------------------------
// z.object (not strict): items also carry their keys. The types are the port's, so a field the port
// adds and the schema lacks fails the build (the `satisfies` below).

const count = z.number().int().nonnegative();

export const cycleItem = z.object({
  plan: z.string(),
  set: z.string(),
  cycleId: z.string(),
  lockOwner: z.string(),
  sequence: z.number().int().positive(),
  parentCheckpointId: z.string().optional(),
  disks: z.array(z.string()),
  chunkSize: z.number().int().positive(),
  windowLevels: z.array(z.number().int().positive()),
  initialLevel: count,
  adaptive: z.boolean(),
  createdAt: count,
  startedAt: count.optional(),
  state: z.enum(CYCLE_STATES),
  failure: z.string().optional(),
  ticks: count,
  idleTicks: count,
  lastCompleted: count,
  lastTickAt: count.optional(),
  checkpointId: z.string().optional(),
  eventSent: z.boolean().optional(),
}) satisfies z.ZodType<CycleRecord>;

export const cycleDiskItem = z.object({
  set: z.string(),
  disk: z.string(),
  cycleId: z.string(),
  kind: z.enum(DISK_KINDS),
  state: z.enum(CYCLE_STATES),
  volumeSizeGiB: z.number().int().positive(),
  sourceSnapshotId: z.string(),
  previousSourceSnapshotId: z.string().optional(),
  targetSnapshotId: z.string(),
  targetStartedAt: count,
  parentTargetSnapshotId: z.string().optional(),
  chunkSize: z.number().int().positive(),
  perPage: z.number().int().positive(),
  encrypted: z.boolean(),
  diffDone: z.boolean(),
  diffSeq: count,
  diffStartBlock: count,
  diffBlocks: count,
  diffBytes: count,
  descriptors: count.optional(),
  controller: z.record(z.string(), z.unknown()).optional(),
  evaluatedAt: count.optional(),
  completeRequested: z.boolean().optional(),
}) satisfies z.ZodType<CycleDiskRecord>;

// Fields of the port's records that no schema above may miss: a compile-time check that the schema
// keys are exactly the port's (an added port field without a schema entry would be dropped on read).
type Exact<A, B> = [Exclude<keyof A, keyof B>, Exclude<keyof B, keyof A>] extends [never, never]
  ? true
  : false;
const cycleKeysExact: Exact<z.infer<typeof cycleItem>, CycleRecord> = true;
const diskKeysExact: Exact<z.infer<typeof cycleDiskItem>, CycleDiskRecord> = true;
void cycleKeysExact;
void diskKeysExact;

export const descriptorPageItem = z.object({
  cycleId: z.string(),
  page: count,
  count,
  body: z.string(),
});

export const completionBatchItem = z.object({ e: z.instanceof(Uint8Array) });

export const signalsItem = z.object({
  at: count,
  attempts: count.default(0),
  successes: count.default(0),
  throttles: count.default(0),
  errors: count.default(0),
  bytes: count.default(0),
  latencyMs: z.number().nonnegative().default(0),
  windowLimited: count.default(0),
  nodePressure: count.default(0),
});
