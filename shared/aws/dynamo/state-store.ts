// The engine's StateStore port on DynamoDB (progress, digests, checkpoint catalog), plus set, disk and job records.
import { FerryError } from '../../engine/errors.ts';
import type { DiskProgress, RecoveryCheckpoint, StateStore } from '../../engine/ports.ts';
import { StateConflictError } from './errors.ts';
import { type Client, itemKey, TableItems, withoutUndefined } from './items.ts';
import {
  catalogSetItem,
  checkpointItem,
  DIGEST_BYTES,
  DIGEST_PAGE_SIZE,
  type DiskRecord,
  describeKey,
  digestPageItem,
  diskItem,
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

const HEX_DIGEST = /^[0-9a-f]{64}$/i;

export class DynamoStateStore implements StateStore {
  private readonly items: TableItems;

  /** `client` is the caller's (created once per Lambda at module scope); `table` holds every item. */
  constructor(
    client: Client,
    readonly table: string,
  ) {
    this.items = new TableItems(client, table);
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
    await this.items.put(
      key,
      record,
      previous === undefined
        ? { ConditionExpression: 'attribute_not_exists(pk)' }
        : {
            ConditionExpression: '#version = :version',
            ExpressionAttributeNames: { '#version': 'version' },
            ExpressionAttributeValues: { ':version': previous.version },
          },
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
      await this.items.deleteAll(keys.digestPrefix(set, disk, previous.epoch)).catch(() => undefined);
    }
  }

  async clearProgress(set: string, disk: string): Promise<void> {
    // The record first: once it is gone nothing vouches for the pages, whatever happens next.
    await this.items.deleteAll(keys.progress(set, disk), true);
    await this.items.deleteAll(keys.digestPrefix(set, disk));
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
    await this.items.put(
      idKey,
      { set: cp.set, sequence: cp.sequence, id: cp.id },
      {
        ConditionExpression: 'attribute_not_exists(pk) OR (#set = :set AND #sequence = :sequence)',
        ExpressionAttributeNames: { '#set': 'set', '#sequence': 'sequence' },
        ExpressionAttributeValues: { ':set': cp.set, ':sequence': cp.sequence },
      },
      already(idKey),
    );
    // 2. Register the set before its first checkpoint exists, so a catalog listing finds it.
    await this.items.put(keys.catalogSet(cp.set), { set: cp.set });
    // 3. The checkpoint itself, exactly once per (set, sequence).
    const cpKey = keys.checkpoint(cp.set, cp.sequence);
    await this.items.put(
      cpKey,
      checkpointToItem(checkpoint),
      { ConditionExpression: 'attribute_not_exists(pk)' },
      already(cpKey),
    );
  }

  async latestCheckpoint(set: string): Promise<RecoveryCheckpoint | undefined> {
    const prefix = keys.checkpointPrefix(set);
    // Sort keys are zero-padded sequences: the newest checkpoint is the first item backwards.
    for await (const item of this.items.queryPrefix(prefix, { ScanIndexForward: false, Limit: 1 })) {
      return this.parseCheckpoint(item);
    }
    return undefined;
  }

  async listCheckpoints(set?: string): Promise<RecoveryCheckpoint[]> {
    const sets =
      set === undefined
        ? (await this.items.queryAll(keys.catalogSetPrefix())).map(
            (item) => parseItem(catalogSetItem, item, this.table, itemKey(item)).set,
          )
        : [set];
    const out: RecoveryCheckpoint[] = [];
    for (const s of sets) {
      for (const item of await this.items.queryAll(keys.checkpointPrefix(s)))
        out.push(this.parseCheckpoint(item));
    }
    return out;
  }

  // ---- replication sets, disks, jobs ---------------------------------------------------------

  /** Creates or replaces a replication set's record. */
  async putSet(record: ReplicationSetRecord): Promise<void> {
    await this.items.put(keys.set(record.set), withoutUndefined(record));
  }

  async getSet(set: string): Promise<ReplicationSetRecord | undefined> {
    return this.items.get(keys.set(set), replicationSetItem);
  }

  /** Creates or replaces one disk of a set. */
  async putDisk(record: DiskRecord): Promise<void> {
    await this.items.put(keys.disk(record.set, record.disk), withoutUndefined(record));
  }

  async listDisks(set: string): Promise<DiskRecord[]> {
    return (await this.items.queryAll(keys.diskPrefix(set))).map((item) =>
      parseItem(diskItem, item, this.table, itemKey(item)),
    );
  }

  /** Records a new cycle; rejects when a job with this cycle id exists. */
  async createJob(record: JobRecord): Promise<void> {
    const key = keys.job(record.set, record.cycleId);
    await this.items.put(
      key,
      withoutUndefined(record),
      { ConditionExpression: 'attribute_not_exists(pk)' },
      () => {
        throw new StateConflictError(`job ${record.cycleId} of set ${record.set} already exists`, {
          table: this.table,
          key: describeKey(key),
        });
      },
    );
  }

  async getJob(set: string, cycleId: string): Promise<JobRecord | undefined> {
    return this.items.get(keys.job(set, cycleId), jobItem);
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
    const out = await this.items.update(key, {
      UpdateExpression: `SET ${sets.join(', ')}`,
      ConditionExpression: '#status = :from',
      ExpressionAttributeNames: names,
      ExpressionAttributeValues: values,
      ReturnValues: 'ALL_NEW',
    });
    if (out === undefined) {
      throw new StateConflictError(
        `job ${cycleId} of set ${set} is not ${from}: concurrent modification`,
        this.items.where(key),
      );
    }
    return parseItem(jobItem, out, this.table, key);
  }

  // ---- internals -----------------------------------------------------------------------------

  private async getProgressRecord(set: string, disk: string): Promise<ProgressRecord | undefined> {
    return this.items.get(keys.progress(set, disk), progressItem, { disk });
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
      const page = await this.items.get(key, digestPageItem, { disk });
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
      this.items.put(keys.digestPage(set, disk, epoch, page), {
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
    for await (const item of this.items.queryBetween(first, last)) {
      const page = parseItem(digestPageItem, item, this.table, itemKey(item));
      const want = Math.min(DIGEST_PAGE_SIZE, record.watermark - expected * DIGEST_PAGE_SIZE);
      const usable =
        page.page === expected &&
        page.epoch === record.epoch &&
        page.count >= want &&
        page.digests.length >= want * DIGEST_BYTES;
      if (!usable) {
        throw this.missingDigests(disk, keys.digestPage(set, disk, record.epoch, expected), record.watermark);
      }
      out.set(page.digests.subarray(0, want * DIGEST_BYTES), expected * DIGEST_PAGE_SIZE * DIGEST_BYTES);
      expected++;
      if (expected >= pages) break;
    }
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
