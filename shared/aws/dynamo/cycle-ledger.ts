// The CycleLedger port on DynamoDB: cycle and disk records, descriptor pages, completion batches and
// writer signals, each port call one request (listCompletions and readSignals: one Query per 1 MB).
// Item layout and retention: cycle-items.ts; value encodings: cycle-codecs.ts.

import type {
  CompletionEntry,
  CycleDiskRecord,
  CycleLedger,
  CyclePatch,
  CycleRecord,
  CycleState,
  DiskPatch,
  PlannedDescriptor,
  SignalBucket,
  SignalDelta,
} from '../../engine/cycle/ports.ts';
import { SIGNAL_BUCKET_MS } from '../../engine/cycle/ports.ts';
import { FerryError } from '../../engine/errors.ts';
import { decodeCompletions, decodePage, encodeCompletions, encodePage } from './cycle-codecs.ts';
import {
  completionBatchItem,
  cycleDiskItem,
  cycleItem,
  cycleKeys,
  descriptorPageItem,
  expiresAt,
  PAGE_RETENTION_SECONDS,
  SIGNAL_RETENTION_SECONDS,
  signalsItem,
  TTL_ATTRIBUTE,
} from './cycle-items.ts';
import { MalformedStateError } from './errors.ts';
import { type Client, itemKey, TableItems, withoutUndefined } from './items.ts';
import { describeKey, type Key, parseItem } from './schema.ts';

// A descriptor page must stay well inside DynamoDB's 400 KB item limit with its keys and names;
// the differ sizes pages for 320 KB (descriptorsPerPage), so this only catches a defect.
const MAX_PAGE_BODY_BYTES = 390 * 1024;
// A failure message is for an operator; the first 2,000 characters say what happened.
const MAX_FAILURE_CHARS = 2000;

export interface DynamoCycleLedgerOptions {
  readonly table: string;
  /** Epoch ms, for the TTL of pages, completions and signals. */
  readonly now?: () => number;
}

export class DynamoCycleLedger implements CycleLedger {
  private readonly items: TableItems;
  private readonly now: () => number;

  constructor(client: Client, opts: DynamoCycleLedgerOptions) {
    this.items = new TableItems(client, opts.table);
    this.now = opts.now ?? Date.now;
  }

  // ---- cycle ---------------------------------------------------------------------------------------

  async createCycle(record: CycleRecord): Promise<boolean> {
    return this.items.create(cycleKeys.cycle(record.set, record.cycleId), withoutUndefined(record));
  }

  async getCycle(set: string, cycleId: string): Promise<CycleRecord | undefined> {
    return this.items.get(cycleKeys.cycle(set, cycleId), cycleItem);
  }

  async updateCycle(
    set: string,
    cycleId: string,
    patch: CyclePatch,
    from?: readonly CycleState[],
  ): Promise<CycleRecord | undefined> {
    if (from !== undefined && from.length === 0) return undefined; // no state satisfies it
    const key = cycleKeys.cycle(set, cycleId);
    const u = new Expression();
    const conditions = ['attribute_exists(pk)'];
    if (from !== undefined)
      conditions.push(`${u.name('state')} IN (${from.map((s) => u.value(s)).join(', ')})`);
    const out = await this.items.update(key, {
      ...u.update(patch),
      ConditionExpression: conditions.join(' AND '),
      ...u.attributes(),
      ReturnValues: 'ALL_NEW',
    });
    return out === undefined ? undefined : parseItem(cycleItem, out, this.items.table, key);
  }

  async recordFailure(set: string, cycleId: string, failure: string): Promise<boolean> {
    const out = await this.items.update(cycleKeys.cycle(set, cycleId), {
      UpdateExpression: 'SET #failure = :failure',
      ConditionExpression: 'attribute_exists(pk) AND attribute_not_exists(#failure)',
      ExpressionAttributeNames: { '#failure': 'failure' },
      ExpressionAttributeValues: { ':failure': failure.slice(0, MAX_FAILURE_CHARS) },
    });
    return out !== undefined;
  }

  // ---- disk of a cycle -------------------------------------------------------------------------------

  async createDisk(record: CycleDiskRecord): Promise<boolean> {
    return this.items.create(
      cycleKeys.disk(record.set, record.disk, record.cycleId),
      withoutUndefined(record),
    );
  }

  async getDisk(set: string, disk: string, cycleId: string): Promise<CycleDiskRecord | undefined> {
    return this.items.get(cycleKeys.disk(set, disk, cycleId), cycleDiskItem, { disk });
  }

  async updateDisk(
    set: string,
    disk: string,
    cycleId: string,
    patch: DiskPatch,
    expect: Partial<Pick<CycleDiskRecord, 'state' | 'diffSeq' | 'diffDone'>> = {},
  ): Promise<CycleDiskRecord | undefined> {
    const key = cycleKeys.disk(set, disk, cycleId);
    const u = new Expression();
    const conditions = ['attribute_exists(pk)'];
    for (const [field, value] of Object.entries(expect)) {
      if (value !== undefined) conditions.push(`${u.name(field)} = ${u.value(value)}`);
    }
    const out = await this.items.update(key, {
      ...u.update(patch),
      ConditionExpression: conditions.join(' AND '),
      ...u.attributes(),
      ReturnValues: 'ALL_NEW',
    });
    return out === undefined ? undefined : parseItem(cycleDiskItem, out, this.items.table, key);
  }

  // ---- descriptor pages ----------------------------------------------------------------------------

  async putDescriptorPage(
    set: string,
    disk: string,
    cycleId: string,
    page: number,
    descriptors: readonly PlannedDescriptor[],
  ): Promise<void> {
    const key = cycleKeys.descriptorPage(set, disk, cycleId, page);
    const body = encodePage(descriptors);
    const size = Buffer.byteLength(body, 'utf8');
    if (size > MAX_PAGE_BODY_BYTES) {
      throw new FerryError(
        `descriptor page ${page} of disk ${disk} encodes to ${size} bytes, over the ${MAX_PAGE_BODY_BYTES}-byte page limit`,
        { disk },
      );
    }
    // Unconditional: a resumed differ rewrites the same content.
    await this.items.put(key, {
      cycleId,
      page,
      count: descriptors.length,
      body,
      [TTL_ATTRIBUTE]: expiresAt(this.now(), PAGE_RETENTION_SECONDS),
    });
  }

  /**
   * An eventually consistent read first (half the read units of a page that is tens of KB): a page
   * never changes once written, so a read can only be stale by missing it, and then one strongly
   * consistent read settles whether it exists.
   */
  async getDescriptorPage(
    set: string,
    disk: string,
    cycleId: string,
    page: number,
  ): Promise<PlannedDescriptor[] | undefined> {
    const key = cycleKeys.descriptorPage(set, disk, cycleId, page);
    const item =
      (await this.items.get(key, descriptorPageItem, { consistent: false, disk })) ??
      (await this.items.get(key, descriptorPageItem, { disk }));
    if (item === undefined) return undefined;
    try {
      const descriptors = decodePage(item.body);
      if (descriptors.length !== item.count) {
        throw new Error(`it counts ${item.count} descriptors but holds ${descriptors.length}`);
      }
      return descriptors;
    } catch (err) {
      throw this.damaged(key, disk, err);
    }
  }

  // ---- completions -----------------------------------------------------------------------------------

  /** One PutItem: a retry with the same batch id rewrites the same item (listed once). */
  async recordCompletions(
    set: string,
    disk: string,
    cycleId: string,
    batchId: string,
    entries: readonly CompletionEntry[],
  ): Promise<void> {
    if (entries.length === 0) return;
    let packed: Uint8Array;
    try {
      packed = encodeCompletions(entries);
    } catch (err) {
      throw new FerryError(
        `completions of disk ${disk} (batch ${batchId}) cannot be recorded: ${(err as Error).message}`,
        {
          disk,
          cause: err,
        },
      );
    }
    await this.items.put(cycleKeys.completionBatch(set, disk, cycleId, batchId), {
      e: packed,
      [TTL_ATTRIBUTE]: expiresAt(this.now(), PAGE_RETENTION_SECONDS),
    });
  }

  async *listCompletions(set: string, disk: string, cycleId: string): AsyncIterable<CompletionEntry> {
    for await (const item of this.items.queryPrefix(cycleKeys.completionPrefix(set, disk, cycleId))) {
      const key = itemKey(item);
      const batch = parseItem(completionBatchItem, item, this.items.table, key);
      let entries: CompletionEntry[];
      try {
        entries = decodeCompletions(batch.e);
      } catch (err) {
        throw this.damaged(key, disk, err);
      }
      yield* entries;
    }
  }

  // ---- signals -----------------------------------------------------------------------------------------

  /** One UpdateItem with ADD (atomic across writers); nothing when every field is 0. */
  async addSignals(
    set: string,
    disk: string,
    cycleId: string,
    at: number,
    delta: SignalDelta,
  ): Promise<void> {
    const bucket = Math.floor(at / SIGNAL_BUCKET_MS);
    const u = new Expression();
    const adds: string[] = [];
    for (const [field, value] of Object.entries(delta)) {
      if (value !== 0) adds.push(`${u.name(field)} ${u.value(value)}`);
    }
    if (adds.length === 0) return;
    const sets = `${u.name('at')} = ${u.value(bucket * SIGNAL_BUCKET_MS)}, ${u.name(TTL_ATTRIBUTE)} = ${u.value(
      expiresAt(at, SIGNAL_RETENTION_SECONDS),
    )}`;
    await this.items.update(cycleKeys.signals(set, disk, cycleId, bucket), {
      UpdateExpression: `SET ${sets} ADD ${adds.join(', ')}`,
      ...u.attributes(),
    });
  }

  async readSignals(
    set: string,
    disk: string,
    cycleId: string,
    from: number,
    to: number,
  ): Promise<SignalBucket[]> {
    // Buckets start at multiples of SIGNAL_BUCKET_MS: the first at or after `from`, the last before `to`.
    const first = Math.max(0, Math.ceil(from / SIGNAL_BUCKET_MS));
    const last = Math.ceil(to / SIGNAL_BUCKET_MS) - 1;
    if (last < first) return [];
    const out: SignalBucket[] = [];
    const query = this.items.queryBetween(
      cycleKeys.signals(set, disk, cycleId, first),
      cycleKeys.signals(set, disk, cycleId, last),
    );
    for await (const item of query) {
      const { at, attempts, successes, throttles, errors, bytes, latencyMs, windowLimited, nodePressure } =
        parseItem(signalsItem, item, this.items.table, itemKey(item));
      out.push({ at, attempts, successes, throttles, errors, bytes, latencyMs, windowLimited, nodePressure });
    }
    return out;
  }

  private damaged(key: Key, disk: string, err: unknown): MalformedStateError {
    return new MalformedStateError(
      `DynamoDB item ${describeKey(key)} in table ${this.items.table} is damaged: ${(err as Error).message}`,
      { table: this.items.table, key: describeKey(key), disk, cause: err },
    );
  }
}

/** Builds an expression's placeholders: `#n<i>` for names, `:v<i>` for values. */
class Expression {
  private readonly names: Record<string, string> = {};
  private readonly values: Record<string, unknown> = {};
  private n = 0;
  private v = 0;

  name(attribute: string): string {
    for (const [placeholder, name] of Object.entries(this.names)) if (name === attribute) return placeholder;
    const placeholder = `#n${this.n++}`;
    this.names[placeholder] = attribute;
    return placeholder;
  }

  value(value: unknown): string {
    const placeholder = `:v${this.v++}`;
    this.values[placeholder] = value;
    return placeholder;
  }

  /**
   * `SET` for every defined field of `patch`. An empty patch changes nothing: `SET state = state`
   * (both records have a state) keeps the request valid, so the condition is still checked and the
   * record returned.
   */
  update(patch: object): { UpdateExpression: string } {
    const sets: string[] = [];
    for (const [field, value] of Object.entries(patch)) {
      if (value !== undefined) sets.push(`${this.name(field)} = ${this.value(value)}`);
    }
    if (sets.length === 0) sets.push(`${this.name('state')} = ${this.name('state')}`);
    return { UpdateExpression: `SET ${sets.join(', ')}` };
  }

  attributes(): {
    ExpressionAttributeNames: Record<string, string>;
    ExpressionAttributeValues?: Record<string, unknown>;
  } {
    return {
      ExpressionAttributeNames: this.names,
      ...(Object.keys(this.values).length > 0 ? { ExpressionAttributeValues: this.values } : {}),
    };
  }
}
