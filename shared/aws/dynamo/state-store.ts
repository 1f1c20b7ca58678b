// The engine's StateStore port on DynamoDB (progress, digests, checkpoint catalog), plus set, disk and job records.
import type { DynamoDBClient } from '@aws-sdk/client-dynamodb';
import {
  BatchWriteCommand,
  type BatchWriteCommandInput,
  type DynamoDBDocumentClient,
  GetCommand,
  PutCommand,
  QueryCommand,
  type QueryCommandInput,
  UpdateCommand,
} from '@aws-sdk/lib-dynamodb';
import type { z } from 'zod';
import { FerryError, TransferError } from '../../engine/errors.ts';
import type { DiskProgress, RecoveryCheckpoint, StateStore } from '../../engine/ports.ts';
import { dynamoCall, StateConflictError } from './errors.ts';
import {
  catalogSetItem,
  checkpointItem,
  DIGEST_BYTES,
  DIGEST_PAGE_SIZE,
  type DiskRecord,
  describeKey,
  digestPageItem,
  diskItem,
  documentClient,
  type JobRecord,
  type JobStatus,
  jobItem,
  type Key,
  keys,
  type ProgressRecord,
  parseItem,
  progressEpoch,
  progressItem,
  type ReplicationSetRecord,
  replicationSetItem,
} from './schema.ts';

// Pages written in parallel by one save: a save is normally one or two pages (500 MB of 1 MiB
// chunks); a large catch-up save should not open hundreds of requests at once.
const PAGE_WRITE_CONCURRENCY = 8;
// BatchWriteItem takes at most 25 requests.
const BATCH_WRITE_MAX = 25;
// Unprocessed batch items are DynamoDB shedding load; 5 rounds of 50 ms doubling is 1.5 s of
// patience before the clean-up reports itself throttled and lets the caller's retry take over.
const BATCH_RETRY_ROUNDS = 5;
const BATCH_RETRY_BASE_MS = 50;

const HEX_DIGEST = /^[0-9a-f]{64}$/i;

export class DynamoStateStore implements StateStore {
  private readonly doc: DynamoDBDocumentClient;

  /** `client` is the caller's (created once per Lambda at module scope); `table` holds every item. */
  constructor(
    client: DynamoDBDocumentClient | DynamoDBClient,
    readonly table: string,
  ) {
    this.doc = documentClient(client);
  }

  // ---- progress ------------------------------------------------------------------------------

  async loadProgress(set: string, disk: string): Promise<DiskProgress | undefined> {
    const record = await this.getProgressRecord(set, disk);
    if (record === undefined) return undefined;
    const raw = await this.readDigests(set, disk, record);
    const digests: string[] = [];
    for (let i = 0; i < record.watermark; i++) {
      digests.push(Buffer.from(raw.buffer, raw.byteOffset + i * DIGEST_BYTES, DIGEST_BYTES).toString('hex'));
    }
    const { cycleId, fingerprint, watermark, bytesDone } = record;
    return { cycleId, fingerprint, watermark, bytesDone, digests };
  }

  /**
   * Digest pages first, then the record that vouches for them, conditional on the version read:
   * a crash in between leaves pages the old record does not count (or a rewritten partial page
   * whose prefix is unchanged), never a record that counts digests which are not stored.
   */
  async saveProgress(
    set: string,
    disk: string,
    progress: Omit<DiskProgress, 'digests'>,
    appended: readonly string[],
  ): Promise<void> {
    const where = { disk, table: this.table, key: describeKey(keys.progress(set, disk)) };
    for (const [i, d] of appended.entries()) {
      if (!HEX_DIGEST.test(d)) {
        throw new FerryError(`digest ${i} appended for disk ${disk} is not a hex SHA-256`, { disk });
      }
    }
    const previous = await this.getProgressRecord(set, disk);
    const epoch = progressEpoch(progress.cycleId, progress.fingerprint);
    const sameCycle =
      previous !== undefined &&
      previous.cycleId === progress.cycleId &&
      previous.fingerprint === progress.fingerprint &&
      previous.epoch === epoch;
    const kept = sameCycle ? previous.watermark : 0;
    if (kept + appended.length !== progress.watermark) {
      throw new FerryError(
        `progress of disk ${disk}: ${kept} stored + ${appended.length} appended digests != watermark ${progress.watermark}`,
        { disk, seq: progress.watermark },
      );
    }

    await this.writeDigestPages(set, disk, epoch, kept, appended);

    const key = keys.progress(set, disk);
    const record: ProgressRecord = {
      cycleId: progress.cycleId,
      fingerprint: progress.fingerprint,
      epoch,
      watermark: progress.watermark,
      bytesDone: progress.bytesDone,
      version: (previous?.version ?? 0) + 1,
    };
    await dynamoCall(
      'PutItem',
      where,
      () =>
        this.doc.send(
          new PutCommand({
            TableName: this.table,
            Item: { ...key, ...record },
            ...(previous === undefined
              ? { ConditionExpression: 'attribute_not_exists(pk)' }
              : {
                  ConditionExpression: '#version = :version',
                  ExpressionAttributeNames: { '#version': 'version' },
                  ExpressionAttributeValues: { ':version': previous.version },
                }),
          }),
        ),
      () => {
        throw new StateConflictError(
          `progress of disk ${disk} in set ${set} changed while it was being saved: concurrent modification`,
          where,
        );
      },
    );

    // The previous cycle's pages are vouched for by nothing now. Removing them is housekeeping: a
    // failure leaves garbage that clearProgress also removes, so it must not fail a durable save.
    if (previous !== undefined && !sameCycle) {
      await this.deleteAll(keys.digestPrefix(set, disk, previous.epoch)).catch(() => undefined);
    }
  }

  async clearProgress(set: string, disk: string): Promise<void> {
    // The record first: once it is gone nothing vouches for the pages, whatever happens next.
    await this.deleteAll(keys.progress(set, disk), true);
    await this.deleteAll(keys.digestPrefix(set, disk));
  }

  // ---- checkpoint catalog -------------------------------------------------------------------

  async publishCheckpoint(checkpoint: RecoveryCheckpoint): Promise<void> {
    const parsed = checkpointItem.safeParse(checkpoint);
    if (!parsed.success) {
      throw new FerryError(
        `checkpoint ${checkpoint.id} is invalid: ${parsed.error.issues[0]?.message ?? 'invalid'}`,
      );
    }
    const cp = parsed.data;
    const already = (key: Key) => () => {
      throw new StateConflictError(`checkpoint ${cp.id} is already published`, {
        table: this.table,
        key: describeKey(key),
      });
    };
    // 1. Claim the id. The same (set, sequence) may claim it again, so a publisher that crashed
    //    after this step can finish; another sequence or set cannot reuse the id.
    const idKey = keys.checkpointId(cp.id);
    await this.put(idKey, { set: cp.set, sequence: cp.sequence, id: cp.id }, already(idKey), {
      ConditionExpression: 'attribute_not_exists(pk) OR (#set = :set AND #sequence = :sequence)',
      ExpressionAttributeNames: { '#set': 'set', '#sequence': 'sequence' },
      ExpressionAttributeValues: { ':set': cp.set, ':sequence': cp.sequence },
    });
    // 2. Register the set before its first checkpoint exists, so a catalog listing finds it.
    await this.put(keys.catalogSet(cp.set), { set: cp.set });
    // 3. The checkpoint itself, exactly once per (set, sequence).
    const cpKey = keys.checkpoint(cp.set, cp.sequence);
    await this.put(cpKey, checkpointToItem(checkpoint), already(cpKey), {
      ConditionExpression: 'attribute_not_exists(pk)',
    });
  }

  async latestCheckpoint(set: string): Promise<RecoveryCheckpoint | undefined> {
    const prefix = keys.checkpointPrefix(set);
    // Sort keys are zero-padded sequences: the newest checkpoint is the first item backwards.
    const out = await dynamoCall('Query', { table: this.table, key: describeKey(prefix) }, () =>
      this.doc.send(new QueryCommand(this.prefixQuery(prefix, { ScanIndexForward: false, Limit: 1 }))),
    );
    const item = out.Items?.[0];
    return item === undefined ? undefined : this.parseCheckpoint(item);
  }

  async listCheckpoints(set?: string): Promise<RecoveryCheckpoint[]> {
    const sets =
      set === undefined
        ? (await this.queryAll(keys.catalogSetPrefix())).map(
            (item) => parseItem(catalogSetItem, item, this.table, itemKey(item)).set,
          )
        : [set];
    const out: RecoveryCheckpoint[] = [];
    for (const s of sets) {
      for (const item of await this.queryAll(keys.checkpointPrefix(s))) out.push(this.parseCheckpoint(item));
    }
    return out;
  }

  // ---- replication sets, disks, jobs ---------------------------------------------------------

  /** Creates or replaces a replication set's record. */
  async putSet(record: ReplicationSetRecord): Promise<void> {
    await this.put(keys.set(record.set), withoutUndefined(record));
  }

  async getSet(set: string): Promise<ReplicationSetRecord | undefined> {
    return this.getParsed(keys.set(set), replicationSetItem);
  }

  /** Creates or replaces one disk of a set. */
  async putDisk(record: DiskRecord): Promise<void> {
    await this.put(keys.disk(record.set, record.disk), withoutUndefined(record));
  }

  async listDisks(set: string): Promise<DiskRecord[]> {
    return (await this.queryAll(keys.diskPrefix(set))).map((item) =>
      parseItem(diskItem, item, this.table, itemKey(item)),
    );
  }

  /** Records a new cycle; rejects when a job with this cycle id exists. */
  async createJob(record: JobRecord): Promise<void> {
    const key = keys.job(record.set, record.cycleId);
    await this.put(
      key,
      withoutUndefined(record),
      () => {
        throw new StateConflictError(`job ${record.cycleId} of set ${record.set} already exists`, {
          table: this.table,
          key: describeKey(key),
        });
      },
      { ConditionExpression: 'attribute_not_exists(pk)' },
    );
  }

  async getJob(set: string, cycleId: string): Promise<JobRecord | undefined> {
    return this.getParsed(keys.job(set, cycleId), jobItem);
  }

  /**
   * Moves a job from `from` to `to`, only if it is still in `from`: two Lambdas racing to
   * finish or fail the same cycle cannot both win.
   */
  async updateJobStatus(
    set: string,
    cycleId: string,
    from: JobStatus,
    to: JobStatus,
    updatedAt: string,
    extra: { checkpointId?: string; error?: string } = {},
  ): Promise<JobRecord> {
    const key = keys.job(set, cycleId);
    const names: Record<string, string> = { '#status': 'status', '#updatedAt': 'updatedAt' };
    const values: Record<string, unknown> = { ':from': from, ':to': to, ':updatedAt': updatedAt };
    const sets = ['#status = :to', '#updatedAt = :updatedAt'];
    for (const [name, value] of Object.entries(extra)) {
      if (value === undefined) continue;
      names[`#${name}`] = name;
      values[`:${name}`] = value;
      sets.push(`#${name} = :${name}`);
    }
    const where = { table: this.table, key: describeKey(key) };
    const out = await dynamoCall(
      'UpdateItem',
      where,
      () =>
        this.doc.send(
          new UpdateCommand({
            TableName: this.table,
            Key: key,
            UpdateExpression: `SET ${sets.join(', ')}`,
            ConditionExpression: '#status = :from',
            ExpressionAttributeNames: names,
            ExpressionAttributeValues: values,
            ReturnValues: 'ALL_NEW',
          }),
        ),
      () => {
        throw new StateConflictError(
          `job ${cycleId} of set ${set} is not ${from}: concurrent modification`,
          where,
        );
      },
    );
    return parseItem(jobItem, out.Attributes, this.table, key);
  }

  // ---- internals -----------------------------------------------------------------------------

  private async getProgressRecord(set: string, disk: string): Promise<ProgressRecord | undefined> {
    return this.getParsed(keys.progress(set, disk), progressItem, disk);
  }

  /**
   * Writes `appended` as the digests from seq `from` on. The page holding `from` keeps its first
   * `from % DIGEST_PAGE_SIZE` digests byte for byte, so the record that vouches for them stays true.
   */
  private async writeDigestPages(
    set: string,
    disk: string,
    epoch: string,
    from: number,
    appended: readonly string[],
  ): Promise<void> {
    if (appended.length === 0) return;
    const firstPage = Math.floor(from / DIGEST_PAGE_SIZE);
    const keep = from % DIGEST_PAGE_SIZE;
    let prefix = new Uint8Array(0);
    if (keep > 0) {
      const key = keys.digestPage(set, disk, epoch, firstPage);
      const page = await this.getParsed(key, digestPageItem, disk);
      if (page === undefined || page.count < keep || page.digests.length < keep * DIGEST_BYTES) {
        throw this.missingDigests(disk, key, from);
      }
      prefix = page.digests.subarray(0, keep * DIGEST_BYTES);
    }
    const all = Buffer.concat([prefix, ...appended.map((d) => Buffer.from(d, 'hex'))]);
    const pages: { page: number; bytes: Buffer }[] = [];
    const perPage = DIGEST_PAGE_SIZE * DIGEST_BYTES;
    for (let at = 0, page = firstPage; at < all.length; at += perPage, page++) {
      pages.push({ page, bytes: all.subarray(at, Math.min(all.length, at + perPage)) });
    }
    await forEachLimited(pages, PAGE_WRITE_CONCURRENCY, ({ page, bytes }) =>
      this.put(keys.digestPage(set, disk, epoch, page), {
        epoch,
        page,
        count: bytes.length / DIGEST_BYTES,
        digests: bytes,
      }),
    );
  }

  /** The raw digests the record vouches for, exactly `watermark * 32` bytes. */
  private async readDigests(set: string, disk: string, record: ProgressRecord): Promise<Uint8Array> {
    const out = new Uint8Array(record.watermark * DIGEST_BYTES);
    if (record.watermark === 0) return out;
    const pages = Math.ceil(record.watermark / DIGEST_PAGE_SIZE);
    const first = keys.digestPage(set, disk, record.epoch, 0);
    const last = keys.digestPage(set, disk, record.epoch, pages - 1);
    let expected = 0;
    let lastKey: Record<string, unknown> | undefined;
    do {
      const res = await dynamoCall('Query', { table: this.table, key: first.pk, disk }, () =>
        this.doc.send(
          new QueryCommand({
            TableName: this.table,
            KeyConditionExpression: 'pk = :pk AND sk BETWEEN :first AND :last',
            ExpressionAttributeValues: { ':pk': first.pk, ':first': first.sk, ':last': last.sk },
            ConsistentRead: true,
            ExclusiveStartKey: lastKey,
          }),
        ),
      );
      for (const item of res.Items ?? []) {
        const page = parseItem(digestPageItem, item, this.table, itemKey(item));
        const want = Math.min(DIGEST_PAGE_SIZE, record.watermark - expected * DIGEST_PAGE_SIZE);
        const usable =
          page.page === expected &&
          page.epoch === record.epoch &&
          page.count >= want &&
          page.digests.length >= want * DIGEST_BYTES;
        if (!usable) {
          throw this.missingDigests(
            disk,
            keys.digestPage(set, disk, record.epoch, expected),
            record.watermark,
          );
        }
        out.set(page.digests.subarray(0, want * DIGEST_BYTES), expected * DIGEST_PAGE_SIZE * DIGEST_BYTES);
        expected++;
      }
      lastKey = res.LastEvaluatedKey;
    } while (lastKey !== undefined && expected < pages);
    if (expected < pages) {
      throw this.missingDigests(disk, keys.digestPage(set, disk, record.epoch, expected), record.watermark);
    }
    return out;
  }

  private missingDigests(disk: string, key: Key, watermark: number): FerryError {
    return new FerryError(
      `progress of disk ${disk} vouches for ${watermark} digests but page ${describeKey(key)} in table ${this.table} is missing or short (damaged state)`,
      { disk, seq: watermark },
    );
  }

  private parseCheckpoint(item: Record<string, unknown>): RecoveryCheckpoint {
    const cp = parseItem(checkpointItem, item, this.table, itemKey(item));
    return { ...cp, parent: cp.parent };
  }

  private async getParsed<T>(key: Key, schema: z.ZodType<T>, disk?: string): Promise<T | undefined> {
    const out = await dynamoCall('GetItem', { table: this.table, key: describeKey(key), disk }, () =>
      this.doc.send(new GetCommand({ TableName: this.table, Key: key, ConsistentRead: true })),
    );
    return out.Item === undefined ? undefined : parseItem(schema, out.Item, this.table, key);
  }

  private async put(
    key: Key,
    attributes: Record<string, unknown>,
    onConditionFailed?: () => never,
    condition: Partial<
      Pick<
        ConstructorParameters<typeof PutCommand>[0],
        'ConditionExpression' | 'ExpressionAttributeNames' | 'ExpressionAttributeValues'
      >
    > = {},
  ): Promise<void> {
    await dynamoCall(
      'PutItem',
      { table: this.table, key: describeKey(key) },
      () =>
        this.doc.send(
          new PutCommand({ TableName: this.table, Item: { ...attributes, ...key }, ...condition }),
        ),
      onConditionFailed,
    );
  }

  private prefixQuery(prefix: Key, extra: Partial<QueryCommandInput> = {}): QueryCommandInput {
    return {
      TableName: this.table,
      KeyConditionExpression: 'pk = :pk AND begins_with(sk, :prefix)',
      ExpressionAttributeValues: { ':pk': prefix.pk, ':prefix': prefix.sk },
      ConsistentRead: true,
      ...extra,
    };
  }

  /** Every item under a key prefix, in key order, following LastEvaluatedKey. */
  private async queryAll(
    prefix: Key,
    extra: Partial<QueryCommandInput> = {},
  ): Promise<Record<string, unknown>[]> {
    const items: Record<string, unknown>[] = [];
    let lastKey: Record<string, unknown> | undefined;
    do {
      const res = await dynamoCall('Query', { table: this.table, key: describeKey(prefix) }, () =>
        this.doc.send(new QueryCommand({ ...this.prefixQuery(prefix, extra), ExclusiveStartKey: lastKey })),
      );
      items.push(...(res.Items ?? []));
      lastKey = res.LastEvaluatedKey;
    } while (lastKey !== undefined);
    return items;
  }

  /** Deletes every item under a key prefix (or exactly `key` when `exact`). Idempotent. */
  private async deleteAll(key: Key, exact = false): Promise<void> {
    const targets = exact
      ? [key]
      : (await this.queryAll(key, { ProjectionExpression: 'pk, sk' })).map(itemKey);
    for (let i = 0; i < targets.length; i += BATCH_WRITE_MAX) {
      let requests: NonNullable<BatchWriteCommandInput['RequestItems']>[string] = targets
        .slice(i, i + BATCH_WRITE_MAX)
        .map((k) => ({ DeleteRequest: { Key: k } }));
      for (let round = 0; requests.length > 0; round++) {
        if (round >= BATCH_RETRY_ROUNDS) {
          throw new TransferError(
            `DynamoDB BatchWriteItem on table ${this.table} left ${requests.length} deletes unprocessed (${describeKey(key)})`,
            { retryable: true, throttled: true },
          );
        }
        if (round > 0) await new Promise((r) => setTimeout(r, BATCH_RETRY_BASE_MS * 2 ** (round - 1)));
        const batch = requests;
        const res = await dynamoCall('BatchWriteItem', { table: this.table, key: describeKey(key) }, () =>
          this.doc.send(new BatchWriteCommand({ RequestItems: { [this.table]: batch } })),
        );
        requests = res.UnprocessedItems?.[this.table] ?? [];
      }
    }
  }
}

function itemKey(item: Record<string, unknown>): Key {
  return { pk: String(item.pk), sk: String(item.sk) };
}

/** The checkpoint as item attributes, with absent optionals left out (not written as NULL). */
function checkpointToItem(cp: RecoveryCheckpoint): Record<string, unknown> {
  return withoutUndefined({
    id: cp.id,
    set: cp.set,
    sequence: cp.sequence,
    createdAt: cp.createdAt,
    parent: cp.parent,
    disks: cp.disks.map((d) => withoutUndefined({ ...d })),
  });
}

function withoutUndefined<T extends object>(value: T): Record<string, unknown> {
  return Object.fromEntries(Object.entries(value).filter(([, v]) => v !== undefined));
}

/** Runs `fn` over `items` with at most `limit` in flight; rejects with the first failure. */
async function forEachLimited<T>(
  items: readonly T[],
  limit: number,
  fn: (item: T) => Promise<void>,
): Promise<void> {
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < items.length) {
      const item = items[next++] as T;
      await fn(item);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
}
