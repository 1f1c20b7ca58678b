// The serverless cycle's own DynamoDB items, in the state table next to the adapter's (schema.ts):
// the cycle, each disk's part of it, its descriptors and completions (paged), and the writers'
// signals for the adaptive controller. Single-item conditional writes only, like the rest.
//
//   item                      pk                        sk
//   cycle                     SET#<set>                 CYCLE#<cycle>
//   disk of a cycle           DISK#<set>#<disk>         CYCLE#<cycle>
//   descriptor page           DISK#<set>#<disk>         DESC#<cycle>#<page:8>
//   completion page           DISK#<set>#<disk>         DONE#<cycle>#<page:8>
//   writer signals            DISK#<set>#<disk>         SIG#<cycle>#<bucket:13>
//
// - Descriptor pages hold `perPage` descriptors each (fixed per disk and cycle, see
//   descriptor-pages.ts) with the source block tokens a writer needs; never all in one item.
// - A completion page holds one attribute `s<seq>` per completed descriptor (its written blocks'
//   indexes and SHA-256s) and a count `n`. Recording a completion is ONE conditional UpdateItem
//   (`SET s<seq> ... ADD n 1` if `s<seq>` does not exist): a duplicate delivery can never record a
//   descriptor twice nor count it twice.
// - The disk-of-cycle record holds the grant cursor (`nextSeq`), the re-grant map (`retry`:
//   seq -> attempt), progress counters and the differ's resume point. Counters are a fast path for
//   progress; "done" is always confirmed by reading the completion pages.
// - Pages, completions and signals carry `expiresAt` (epoch seconds) for DynamoDB TTL: the table's
//   TTL attribute must be `expiresAt`. Cycle records stay (they are the cycle's history).
import type { DynamoDBClient } from '@aws-sdk/client-dynamodb';
import {
  type DynamoDBDocumentClient,
  GetCommand,
  PutCommand,
  QueryCommand,
  type QueryCommandInput,
  UpdateCommand,
  type UpdateCommandInput,
} from '@aws-sdk/lib-dynamodb';
import { z } from 'zod';
import { dynamoCall, StateConflictError } from '../../shared/aws/dynamo/errors.ts';
import {
  describeKey,
  documentClient,
  type GrantLease,
  grantItem,
  type Key,
  keys,
  parseItem,
} from '../../shared/aws/dynamo/schema.ts';
import {
  decodePage,
  encodePage,
  type PlannedDescriptor,
  packBlocks,
  unpackBlocks,
} from './descriptor-pages.ts';
import { CycleStateError } from './errors.ts';

type Client = DynamoDBDocumentClient | DynamoDBClient;

// Descriptor and completion pages outlive their cycle by a month: long enough to investigate a
// failed cycle, short enough that a year of hourly cycles does not pile up.
export const PAGE_RETENTION_SECONDS = 30 * 24 * 60 * 60;
/** The attribute (epoch seconds) DynamoDB's TTL deletes pages and signals by: the table's TTL setting. */
export const TTL_ATTRIBUTE = 'expiresAt';
// Signals only steer the next few ticks.
export const SIGNAL_RETENTION_SECONDS = 24 * 60 * 60;
// The controller's own bucket size (controller.ts bucketMs): signals are summed per bucket.
export const SIGNAL_BUCKET_MS = 250;

const enc = (id: string): string => encodeURIComponent(id);
const pad = (n: number, width: number): string => String(n).padStart(width, '0');
const diskPk = (set: string, disk: string): string => keys.window(set, disk).pk;

export const cycleKeys = {
  cycle: (set: string, cycleId: string): Key => ({ pk: keys.set(set).pk, sk: `CYCLE#${enc(cycleId)}` }),
  cycleDisk: (set: string, disk: string, cycleId: string): Key => ({
    pk: diskPk(set, disk),
    sk: `CYCLE#${enc(cycleId)}`,
  }),
  descriptorPage: (set: string, disk: string, cycleId: string, page: number): Key => ({
    pk: diskPk(set, disk),
    sk: `DESC#${enc(cycleId)}#${pad(page, 8)}`,
  }),
  completionPage: (set: string, disk: string, cycleId: string, page: number): Key => ({
    pk: diskPk(set, disk),
    sk: `DONE#${enc(cycleId)}#${pad(page, 8)}`,
  }),
  signals: (set: string, disk: string, cycleId: string, bucket: number): Key => ({
    pk: diskPk(set, disk),
    sk: `SIG#${enc(cycleId)}#${pad(bucket, 13)}`,
  }),
  /** The adapter's grant leases of one disk (schema.ts `GRANT#<seq>`), read for clean-up. */
  grantPrefix: (set: string, disk: string): Key => ({ pk: diskPk(set, disk), sk: 'GRANT#' }),
};

const count = z.number().int().nonnegative();

export const CYCLE_STATES = ['active', 'finalizing', 'published', 'aborted'] as const;
export type CycleState = (typeof CYCLE_STATES)[number];

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
  /** When the cycle's execution started (epoch ms), if the state machine said: the data's age. */
  startedAt: count.optional(),
  state: z.enum(CYCLE_STATES),
  /** The first permanent failure recorded by anyone (writer, planner); the cycle cannot publish. */
  failure: z.string().optional(),
  ticks: count,
  idleTicks: count,
  /** Completed descriptors (all disks) at the last tick, to tell progress from a stall. */
  lastCompleted: count,
  checkpointId: z.string().optional(),
  eventSent: z.boolean().optional(),
});
export type CycleRecord = z.infer<typeof cycleItem>;

export const DISK_KINDS = ['full', 'incremental'] as const;

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
  /** When prepare started the target snapshot (epoch ms). */
  targetStartedAt: count,
  parentTargetSnapshotId: z.string().optional(),
  chunkSize: z.number().int().positive(),
  perPage: z.number().int().positive(),
  // The differ's resume point: descriptors [0, diffSeq) are stored in whole pages; listing resumes
  // at block diffStartBlock, where descriptor diffSeq starts.
  diffDone: z.boolean(),
  diffSeq: count,
  diffStartBlock: count,
  diffBlocks: count,
  diffBytes: count,
  /** Total descriptors; set when the differ is done. */
  descriptors: count.optional(),
  // Granting: every seq below nextSeq was granted at least once; `retry` holds seqs to grant again.
  nextSeq: count,
  retry: z.record(z.string(), z.number().int().positive()),
  completed: count,
  completedBytes: count,
  writtenBlocks: count,
  /** Whether the target snapshot is encrypted: zero blocks are then always written. */
  encrypted: z.boolean(),
  /** The controller's climb hold (hysteresis) and how far it has evaluated, kept across ticks. */
  climbHoldMs: z.number().positive().optional(),
  evaluatedAt: count.optional(),
  completeRequested: z.boolean().optional(),
});
export type CycleDiskRecord = z.infer<typeof cycleDiskItem>;

const descriptorPageItem = z.object({ cycleId: z.string(), page: count, count: count, body: z.string() });
const completionPageItem = z.looseObject({ cycleId: z.string(), page: count, n: count });

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
export type SignalBucket = z.infer<typeof signalsItem>;

/** One writer's contribution to a signal bucket. */
export type SignalDelta = Omit<SignalBucket, 'at'>;

/** A completed descriptor as recorded: its written blocks, ascending, with raw SHA-256s. */
export interface Completion {
  readonly seq: number;
  readonly blocks: { index: number; digest: Uint8Array }[];
}

export class CycleStore {
  readonly doc: DynamoDBDocumentClient;

  constructor(
    client: Client,
    readonly table: string,
  ) {
    this.doc = documentClient(client);
  }

  // ---- cycle -------------------------------------------------------------------------------------

  /** Creates the cycle; false when it exists (a retried prepare), in which case nothing changes. */
  async createCycle(record: CycleRecord): Promise<boolean> {
    return this.create(cycleKeys.cycle(record.set, record.cycleId), record);
  }

  async getCycle(set: string, cycleId: string): Promise<CycleRecord | undefined> {
    return this.get(cycleKeys.cycle(set, cycleId), cycleItem);
  }

  async requireCycle(set: string, cycleId: string): Promise<CycleRecord> {
    const cycle = await this.getCycle(set, cycleId);
    if (cycle === undefined) {
      throw new CycleStateError(`cycle ${cycleId} of set ${set} does not exist (was it prepared?)`, {
        set,
        cycleId,
      });
    }
    return cycle;
  }

  /**
   * Records the first permanent failure of an active cycle; later ones are dropped (the first one is
   * the cause). False when the cycle is no longer active: a straggler's failure after the finalizer
   * validated every disk does not count.
   */
  async recordFailure(set: string, cycleId: string, failure: string): Promise<boolean> {
    const out = await this.update(cycleKeys.cycle(set, cycleId), {
      UpdateExpression: 'SET #failure = if_not_exists(#failure, :failure)',
      ConditionExpression: '#state = :active',
      ExpressionAttributeNames: { '#failure': 'failure', '#state': 'state' },
      ExpressionAttributeValues: { ':failure': failure.slice(0, 2000), ':active': 'active' },
    });
    return out !== undefined;
  }

  /** Moves the cycle from one of `from` to `to`; false when it is in none of them. */
  async setCycleState(
    set: string,
    cycleId: string,
    from: readonly CycleState[],
    to: CycleState,
    extra: Partial<Pick<CycleRecord, 'failure' | 'checkpointId'>> = {},
  ): Promise<boolean> {
    const names: Record<string, string> = { '#state': 'state' };
    const values: Record<string, unknown> = { ':to': to };
    const sets = ['#state = :to'];
    from.forEach((s, i) => {
      values[`:from${i}`] = s;
    });
    for (const [k, v] of Object.entries(extra)) {
      if (v === undefined) continue;
      names[`#${k}`] = k;
      values[`:${k}`] = v;
      sets.push(k === 'failure' ? `#${k} = if_not_exists(#${k}, :${k})` : `#${k} = :${k}`);
    }
    const out = await this.update(cycleKeys.cycle(set, cycleId), {
      UpdateExpression: `SET ${sets.join(', ')}`,
      ConditionExpression: `#state IN (${from.map((_, i) => `:from${i}`).join(', ')})`,
      ExpressionAttributeNames: names,
      ExpressionAttributeValues: values,
    });
    return out !== undefined;
  }

  /** Saves a tick's bookkeeping. */
  async saveTick(set: string, cycleId: string, tick: { idleTicks: number; lastCompleted: number }) {
    await this.update(cycleKeys.cycle(set, cycleId), {
      UpdateExpression: 'SET #idle = :idle, #last = :last ADD #ticks :one',
      ConditionExpression: 'attribute_exists(pk)',
      ExpressionAttributeNames: { '#idle': 'idleTicks', '#last': 'lastCompleted', '#ticks': 'ticks' },
      ExpressionAttributeValues: { ':idle': tick.idleTicks, ':last': tick.lastCompleted, ':one': 1 },
    });
  }

  async markEventSent(set: string, cycleId: string): Promise<void> {
    await this.update(cycleKeys.cycle(set, cycleId), {
      UpdateExpression: 'SET #sent = :true',
      ExpressionAttributeNames: { '#sent': 'eventSent' },
      ExpressionAttributeValues: { ':true': true },
    });
  }

  // ---- disk of a cycle ---------------------------------------------------------------------------

  async createCycleDisk(record: CycleDiskRecord): Promise<boolean> {
    return this.create(cycleKeys.cycleDisk(record.set, record.disk, record.cycleId), record);
  }

  async getCycleDisk(set: string, disk: string, cycleId: string): Promise<CycleDiskRecord | undefined> {
    return this.get(cycleKeys.cycleDisk(set, disk, cycleId), cycleDiskItem);
  }

  async requireCycleDisk(set: string, disk: string, cycleId: string): Promise<CycleDiskRecord> {
    const rec = await this.getCycleDisk(set, disk, cycleId);
    if (rec === undefined) {
      throw new CycleStateError(`disk ${disk} is not part of cycle ${cycleId} of set ${set}`, {
        set,
        cycleId,
        disk,
      });
    }
    return rec;
  }

  async setDiskState(set: string, disk: string, cycleId: string, state: CycleState): Promise<void> {
    await this.update(cycleKeys.cycleDisk(set, disk, cycleId), {
      UpdateExpression: 'SET #state = :state',
      ConditionExpression: 'attribute_exists(pk)',
      ExpressionAttributeNames: { '#state': 'state' },
      ExpressionAttributeValues: { ':state': state },
    });
  }

  /**
   * Saves the differ's progress after a page: conditional on the resume point it started from, so
   * two differs of one disk (a retried state) cannot interleave their pages.
   */
  async saveDiffProgress(
    rec: Pick<CycleDiskRecord, 'set' | 'disk' | 'cycleId' | 'diffSeq'>,
    next: { diffSeq: number; diffStartBlock: number; diffBlocks: number; diffBytes: number; done: boolean },
  ): Promise<CycleDiskRecord> {
    const key = cycleKeys.cycleDisk(rec.set, rec.disk, rec.cycleId);
    const out = await this.update(key, {
      UpdateExpression: `SET #seq = :seq, #start = :start, #blocks = :blocks, #bytes = :bytes, #done = :done${
        next.done ? ', #descriptors = :seq' : ''
      }`,
      ConditionExpression: '#seq = :expected AND #done = :false',
      ExpressionAttributeNames: {
        '#seq': 'diffSeq',
        '#start': 'diffStartBlock',
        '#blocks': 'diffBlocks',
        '#bytes': 'diffBytes',
        '#done': 'diffDone',
        ...(next.done ? { '#descriptors': 'descriptors' } : {}),
      },
      ExpressionAttributeValues: {
        ':seq': next.diffSeq,
        ':start': next.diffStartBlock,
        ':blocks': next.diffBlocks,
        ':bytes': next.diffBytes,
        ':done': next.done,
        ':expected': rec.diffSeq,
        ':false': false,
      },
      ReturnValues: 'ALL_NEW',
    });
    if (out === undefined) {
      throw new StateConflictError(
        `differ progress of disk ${rec.disk} in cycle ${rec.cycleId} moved while this differ ran: concurrent modification`,
        { table: this.table, key: describeKey(key), disk: rec.disk },
      );
    }
    return parseItem(cycleDiskItem, out, this.table, key);
  }

  /** Claims `seq` from the cursor; the new record, or undefined when someone else moved it. */
  async claimCursor(rec: CycleDiskRecord, seq: number): Promise<CycleDiskRecord | undefined> {
    const key = cycleKeys.cycleDisk(rec.set, rec.disk, rec.cycleId);
    const out = await this.update(key, {
      UpdateExpression: 'SET #next = :after',
      ConditionExpression: '#next = :seq AND #state = :active',
      ExpressionAttributeNames: { '#next': 'nextSeq', '#state': 'state' },
      ExpressionAttributeValues: { ':seq': seq, ':after': seq + 1, ':active': 'active' },
      ReturnValues: 'ALL_NEW',
    });
    return out === undefined ? undefined : parseItem(cycleDiskItem, out, this.table, key);
  }

  /** Claims `seq` from the re-grant map; undefined when someone else took it. */
  async claimRetry(rec: CycleDiskRecord, seq: number): Promise<CycleDiskRecord | undefined> {
    const key = cycleKeys.cycleDisk(rec.set, rec.disk, rec.cycleId);
    const out = await this.update(key, {
      UpdateExpression: 'REMOVE #retry.#seq',
      ConditionExpression: 'attribute_exists(#retry.#seq) AND #state = :active',
      ExpressionAttributeNames: { '#retry': 'retry', '#seq': String(seq), '#state': 'state' },
      ExpressionAttributeValues: { ':active': 'active' },
      ReturnValues: 'ALL_NEW',
    });
    return out === undefined ? undefined : parseItem(cycleDiskItem, out, this.table, key);
  }

  /** Queues seqs to be granted again (after a reclaim, a lost send, a repair), keeping the higher attempt. */
  async addRetries(set: string, disk: string, cycleId: string, entries: ReadonlyMap<number, number>) {
    if (entries.size === 0) return;
    const names: Record<string, string> = { '#retry': 'retry' };
    const values: Record<string, unknown> = {};
    const sets: string[] = [];
    let i = 0;
    for (const [seq, attempt] of entries) {
      names[`#s${i}`] = String(seq);
      values[`:a${i}`] = attempt;
      sets.push(`#retry.#s${i} = :a${i}`);
      i++;
    }
    await this.update(cycleKeys.cycleDisk(set, disk, cycleId), {
      UpdateExpression: `SET ${sets.join(', ')}`,
      ConditionExpression: 'attribute_exists(pk)',
      ExpressionAttributeNames: names,
      ExpressionAttributeValues: values,
    });
  }

  /** Counts one completion (after `recordCompletion` won); a fast path, repaired by `setCompleted`. */
  async countCompletion(set: string, disk: string, cycleId: string, bytes: number, blocks: number) {
    await this.update(cycleKeys.cycleDisk(set, disk, cycleId), {
      UpdateExpression: 'ADD #completed :one, #bytes :bytes, #blocks :blocks',
      ExpressionAttributeNames: {
        '#completed': 'completed',
        '#bytes': 'completedBytes',
        '#blocks': 'writtenBlocks',
      },
      ExpressionAttributeValues: { ':one': 1, ':bytes': bytes, ':blocks': blocks },
    });
  }

  /** Overwrites the completion counters with an exact recount from the completion pages. */
  async setCompleted(
    set: string,
    disk: string,
    cycleId: string,
    exact: { completed: number; writtenBlocks: number },
  ) {
    await this.update(cycleKeys.cycleDisk(set, disk, cycleId), {
      UpdateExpression: 'SET #completed = :c, #blocks = :w',
      ExpressionAttributeNames: { '#completed': 'completed', '#blocks': 'writtenBlocks' },
      ExpressionAttributeValues: { ':c': exact.completed, ':w': exact.writtenBlocks },
    });
  }

  /** Saves the controller state a tick carries to the next one. */
  async saveController(
    set: string,
    disk: string,
    cycleId: string,
    state: { climbHoldMs: number; evaluatedAt: number },
  ): Promise<void> {
    await this.update(cycleKeys.cycleDisk(set, disk, cycleId), {
      UpdateExpression: 'SET #hold = :hold, #evaluated = :evaluated',
      ExpressionAttributeNames: { '#hold': 'climbHoldMs', '#evaluated': 'evaluatedAt' },
      ExpressionAttributeValues: { ':hold': state.climbHoldMs, ':evaluated': state.evaluatedAt },
    });
  }

  async markCompleteRequested(set: string, disk: string, cycleId: string): Promise<void> {
    await this.update(cycleKeys.cycleDisk(set, disk, cycleId), {
      UpdateExpression: 'SET #requested = :true',
      ExpressionAttributeNames: { '#requested': 'completeRequested' },
      ExpressionAttributeValues: { ':true': true },
    });
  }

  // ---- descriptor pages --------------------------------------------------------------------------

  /** Writes one page (idempotent: a resumed differ rewrites the same content). */
  async putDescriptorPage(
    rec: Pick<CycleDiskRecord, 'set' | 'disk' | 'cycleId'>,
    page: number,
    descriptors: readonly PlannedDescriptor[],
    nowMs: number,
  ): Promise<void> {
    const key = cycleKeys.descriptorPage(rec.set, rec.disk, rec.cycleId, page);
    await dynamoCall('PutItem', this.where(key, rec.disk), () =>
      this.doc.send(
        new PutCommand({
          TableName: this.table,
          Item: {
            ...key,
            cycleId: rec.cycleId,
            page,
            count: descriptors.length,
            body: encodePage(descriptors),
            [TTL_ATTRIBUTE]: Math.floor(nowMs / 1000) + PAGE_RETENTION_SECONDS,
          },
        }),
      ),
    );
  }

  async getDescriptorPage(
    set: string,
    disk: string,
    cycleId: string,
    page: number,
  ): Promise<PlannedDescriptor[] | undefined> {
    const key = cycleKeys.descriptorPage(set, disk, cycleId, page);
    const item = await this.get(key, descriptorPageItem);
    if (item === undefined) return undefined;
    try {
      return decodePage(item.body);
    } catch (err) {
      throw new CycleStateError(
        `descriptor page ${describeKey(key)} in table ${this.table} is damaged: ${(err as Error).message}`,
        { set, cycleId, disk, cause: err },
      );
    }
  }

  // ---- completions -------------------------------------------------------------------------------

  /**
   * Records that descriptor `seq` is written, with its blocks' checksums. True when this call
   * recorded it; false when it was already recorded (a duplicate delivery): nothing changes then.
   */
  async recordCompletion(
    rec: Pick<CycleDiskRecord, 'set' | 'disk' | 'cycleId' | 'perPage'>,
    seq: number,
    blocks: readonly { index: number; checksum: string }[],
    nowMs: number,
  ): Promise<boolean> {
    const page = Math.floor(seq / rec.perPage);
    const key = cycleKeys.completionPage(rec.set, rec.disk, rec.cycleId, page);
    const out = await this.update(key, {
      UpdateExpression: 'SET #s = :blocks, #cycle = :cycle, #page = :page, #expires = :expires ADD #n :one',
      ConditionExpression: 'attribute_not_exists(#s)',
      ExpressionAttributeNames: {
        '#s': `s${seq}`,
        '#cycle': 'cycleId',
        '#page': 'page',
        '#expires': TTL_ATTRIBUTE,
        '#n': 'n',
      },
      ExpressionAttributeValues: {
        ':blocks': packBlocks(blocks),
        ':cycle': rec.cycleId,
        ':page': page,
        ':expires': Math.floor(nowMs / 1000) + PAGE_RETENTION_SECONDS,
        ':one': 1,
      },
    });
    return out !== undefined;
  }

  /** True when descriptor `seq` has a recorded completion. */
  async isCompleted(
    rec: Pick<CycleDiskRecord, 'set' | 'disk' | 'cycleId' | 'perPage'>,
    seq: number,
  ): Promise<boolean> {
    const key = cycleKeys.completionPage(rec.set, rec.disk, rec.cycleId, Math.floor(seq / rec.perPage));
    const out = await dynamoCall('GetItem', this.where(key, rec.disk), () =>
      this.doc.send(
        new GetCommand({
          TableName: this.table,
          Key: key,
          ConsistentRead: true,
          ProjectionExpression: '#s',
          ExpressionAttributeNames: { '#s': `s${seq}` },
        }),
      ),
    );
    return out.Item?.[`s${seq}`] !== undefined;
  }

  /** One completion page's completions in seq order; undefined when nothing on it completed yet. */
  async getCompletionPage(
    set: string,
    disk: string,
    cycleId: string,
    page: number,
  ): Promise<Completion[] | undefined> {
    const key = cycleKeys.completionPage(set, disk, cycleId, page);
    const out = await dynamoCall('GetItem', this.where(key, disk), () =>
      this.doc.send(new GetCommand({ TableName: this.table, Key: key, ConsistentRead: true })),
    );
    return out.Item === undefined
      ? undefined
      : this.parseCompletions(out.Item, { set, disk, cycleId }).completions;
  }

  /**
   * Every completion page of a disk's cycle in page order, each with its completions in seq order.
   * A generator, so a huge disk is validated page by page, never held whole.
   */
  async *completionPages(
    set: string,
    disk: string,
    cycleId: string,
  ): AsyncGenerator<{ page: number; completions: Completion[] }> {
    const prefix = { pk: diskPk(set, disk), sk: `DONE#${enc(cycleId)}#` };
    for await (const item of this.queryPrefix(prefix))
      yield this.parseCompletions(item, { set, disk, cycleId });
  }

  private parseCompletions(
    item: Record<string, unknown>,
    where: { set: string; disk: string; cycleId: string },
  ): { page: number; completions: Completion[] } {
    const key = { pk: String(item.pk), sk: String(item.sk) };
    const page = parseItem(completionPageItem, item, this.table, key);
    const completions: Completion[] = [];
    for (const [name, value] of Object.entries(item)) {
      const m = /^s(\d+)$/.exec(name);
      if (m === null) continue;
      if (!(value instanceof Uint8Array)) {
        throw new CycleStateError(`completion ${name} in ${describeKey(key)} is not binary`, where);
      }
      try {
        completions.push({ seq: Number(m[1]), blocks: unpackBlocks(value) });
      } catch (err) {
        throw new CycleStateError(`completion ${name} in ${describeKey(key)}: ${(err as Error).message}`, {
          ...where,
          cause: err,
        });
      }
    }
    completions.sort((a, b) => a.seq - b.seq);
    if (completions.length !== page.n) {
      throw new CycleStateError(
        `completion page ${describeKey(key)} counts ${page.n} completions but holds ${completions.length}`,
        where,
      );
    }
    return { page: page.page, completions };
  }

  // ---- signals -----------------------------------------------------------------------------------

  async recordSignals(set: string, disk: string, cycleId: string, at: number, delta: Partial<SignalDelta>) {
    const bucket = Math.floor(at / SIGNAL_BUCKET_MS);
    const names: Record<string, string> = { '#at': 'at', '#expires': TTL_ATTRIBUTE };
    const values: Record<string, unknown> = {
      ':at': bucket * SIGNAL_BUCKET_MS,
      ':expires': Math.floor(at / 1000) + SIGNAL_RETENTION_SECONDS,
    };
    const adds: string[] = [];
    for (const [k, v] of Object.entries(delta)) {
      if (v === undefined || v === 0) continue;
      names[`#${k}`] = k;
      values[`:${k}`] = v;
      adds.push(`#${k} :${k}`);
    }
    if (adds.length === 0) return;
    await this.update(cycleKeys.signals(set, disk, cycleId, bucket), {
      UpdateExpression: `SET #at = :at, #expires = :expires ADD ${adds.join(', ')}`,
      ExpressionAttributeNames: names,
      ExpressionAttributeValues: values,
    });
  }

  /** Signal buckets with `from <= at <= to`, oldest first. */
  async readSignals(set: string, disk: string, cycleId: string, from: number, to: number) {
    const first = cycleKeys.signals(set, disk, cycleId, Math.max(0, Math.floor(from / SIGNAL_BUCKET_MS)));
    const last = cycleKeys.signals(set, disk, cycleId, Math.floor(to / SIGNAL_BUCKET_MS));
    const out: SignalBucket[] = [];
    for await (const item of this.query({
      KeyConditionExpression: 'pk = :pk AND sk BETWEEN :first AND :last',
      ExpressionAttributeValues: { ':pk': first.pk, ':first': first.sk, ':last': last.sk },
    })) {
      out.push(parseItem(signalsItem, item, this.table, { pk: String(item.pk), sk: String(item.sk) }));
    }
    return out;
  }

  // ---- the adapter's grant leases of a disk ---------------------------------------------------------

  /** The disk's grant leases (any cycle), consistent read. */
  async listLeases(set: string, disk: string): Promise<GrantLease[]> {
    const out: GrantLease[] = [];
    for await (const item of this.queryPrefix(cycleKeys.grantPrefix(set, disk))) {
      out.push(parseItem(grantItem, item, this.table, { pk: String(item.pk), sk: String(item.sk) }));
    }
    return out;
  }

  /**
   * Sets a disk window's in-flight bytes from `seen` to 0. Only for prepare, after every lease of the
   * disk is gone: whatever is left then leaked (a crash between reserve and lease, see budget.ts).
   * Conditional on the value seen, so it never erases a reservation made meanwhile.
   */
  async resetLeakedWindow(set: string, disk: string, seen: number): Promise<boolean> {
    const out = await this.update(keys.window(set, disk), {
      UpdateExpression: 'SET #inflight = :zero',
      ConditionExpression: '#inflight = :seen',
      ExpressionAttributeNames: { '#inflight': 'inflight' },
      ExpressionAttributeValues: { ':zero': 0, ':seen': seen },
    });
    return out !== undefined;
  }

  // ---- internals ---------------------------------------------------------------------------------

  private where(key: Key, disk?: string) {
    return { table: this.table, key: describeKey(key), disk };
  }

  private async get<T>(key: Key, schema: z.ZodType<T>): Promise<T | undefined> {
    const out = await dynamoCall('GetItem', this.where(key), () =>
      this.doc.send(new GetCommand({ TableName: this.table, Key: key, ConsistentRead: true })),
    );
    return out.Item === undefined ? undefined : parseItem(schema, out.Item, this.table, key);
  }

  private async create(key: Key, attributes: object): Promise<boolean> {
    const item = Object.fromEntries(Object.entries(attributes).filter(([, v]) => v !== undefined));
    const out = await dynamoCall(
      'PutItem',
      this.where(key),
      () =>
        this.doc.send(
          new PutCommand({
            TableName: this.table,
            Item: { ...item, ...key },
            ConditionExpression: 'attribute_not_exists(pk)',
          }),
        ),
      () => false as const,
    );
    return out !== false;
  }

  /** Conditional update; `undefined` when the condition failed. */
  private async update(
    key: Key,
    input: Omit<UpdateCommandInput, 'TableName' | 'Key'>,
  ): Promise<Record<string, unknown> | undefined> {
    const out = await dynamoCall(
      'UpdateItem',
      this.where(key),
      () => this.doc.send(new UpdateCommand({ TableName: this.table, Key: key, ...input })),
      () => undefined,
    );
    return out === undefined ? undefined : (out.Attributes ?? {});
  }

  private queryPrefix(prefix: Key): AsyncGenerator<Record<string, unknown>> {
    return this.query({
      KeyConditionExpression: 'pk = :pk AND begins_with(sk, :prefix)',
      ExpressionAttributeValues: { ':pk': prefix.pk, ':prefix': prefix.sk },
    });
  }

  private async *query(input: Omit<QueryCommandInput, 'TableName'>): AsyncGenerator<Record<string, unknown>> {
    let lastKey: Record<string, unknown> | undefined;
    do {
      const res = await dynamoCall(
        'Query',
        { table: this.table, key: String(input.ExpressionAttributeValues?.[':pk']) },
        () =>
          this.doc.send(
            new QueryCommand({
              TableName: this.table,
              ConsistentRead: true,
              ...input,
              ExclusiveStartKey: lastKey,
            }),
          ),
      );
      for (const item of res.Items ?? []) yield item;
      lastKey = res.LastEvaluatedKey;
    } while (lastKey !== undefined);
  }
}
