// The one set of DynamoDB item helpers every adapter in shared/aws/dynamo uses: typed reads, conditional
// writes that answer instead of throwing, prefix queries with paging, batched deletes, and the item
// size DynamoDB bills by. SDK exceptions are translated (errors.ts), naming the table and the key.
import type { AttributeValue, DynamoDBClient } from '@aws-sdk/client-dynamodb';
import {
  BatchWriteCommand,
  type BatchWriteCommandInput,
  DeleteCommand,
  type DeleteCommandInput,
  type DynamoDBDocumentClient,
  GetCommand,
  PutCommand,
  type PutCommandInput,
  QueryCommand,
  type QueryCommandInput,
  UpdateCommand,
  type UpdateCommandInput,
} from '@aws-sdk/lib-dynamodb';
import { marshall, unmarshall } from '@aws-sdk/util-dynamodb';
import type { z } from 'zod';
import { TransferError } from '../../engine/errors.ts';
import {
  type DynamoErrorContext,
  dynamoCall,
  isConditionalCheckFailed,
  translateDynamoError,
} from './errors.ts';
import { describeKey, documentClient, type Key, parseItem } from './schema.ts';

export type Client = DynamoDBDocumentClient | DynamoDBClient;

// BatchWriteItem takes at most 25 requests.
const BATCH_WRITE_MAX = 25;
// Unprocessed batch items are DynamoDB shedding load; 5 rounds of 50 ms doubling is 1.5 s of
// patience before the clean-up reports itself throttled and lets the caller's retry take over.
const BATCH_RETRY_ROUNDS = 5;
const BATCH_RETRY_BASE_MS = 50;

type Condition = Pick<
  PutCommandInput,
  'ConditionExpression' | 'ExpressionAttributeNames' | 'ExpressionAttributeValues'
>;

/** A conditional write's answer: the item after, or (when the condition failed) the item as it was. */
export type Outcome =
  | { readonly ok: true; readonly item: Record<string, unknown> }
  | { readonly ok: false; readonly current: Record<string, unknown> | undefined };

export const itemKey = (item: Record<string, unknown>): Key => ({ pk: String(item.pk), sk: String(item.sk) });

/** The attributes without those that are undefined (DynamoDB has no undefined; NULL is not absent). */
export function withoutUndefined<T extends object>(value: T): Record<string, unknown> {
  return Object.fromEntries(Object.entries(value).filter(([, v]) => v !== undefined));
}

/** One table's items. Every method is one request unless it says otherwise. */
export class TableItems {
  readonly doc: DynamoDBDocumentClient;

  /** `client` is the caller's (created once per Lambda at module scope). */
  constructor(
    client: Client,
    readonly table: string,
  ) {
    this.doc = documentClient(client);
  }

  where(key: Key, disk?: string): DynamoErrorContext {
    return { table: this.table, key: describeKey(key), disk };
  }

  /** The raw item; strongly consistent unless `consistent` is false (half the read units). */
  async getRaw(
    key: Key,
    opts: { consistent?: boolean; disk?: string } = {},
  ): Promise<Record<string, unknown> | undefined> {
    const out = await dynamoCall('GetItem', this.where(key, opts.disk), () =>
      this.doc.send(
        new GetCommand({ TableName: this.table, Key: key, ConsistentRead: opts.consistent ?? true }),
      ),
    );
    return out.Item;
  }

  /** The item validated by `schema` (a malformed item is a MalformedStateError naming it). */
  async get<T>(
    key: Key,
    schema: z.ZodType<T>,
    opts: { consistent?: boolean; disk?: string } = {},
  ): Promise<T | undefined> {
    const item = await this.getRaw(key, opts);
    return item === undefined ? undefined : parseItem(schema, item, this.table, key);
  }

  /**
   * Puts the item (keys added). Unconditional unless `condition` is given; a failed condition calls
   * `onConditionFailed` (which throws the caller's own error), or is translated when there is none.
   */
  async put(
    key: Key,
    attributes: Record<string, unknown>,
    condition: Condition = {},
    onConditionFailed?: () => never,
  ): Promise<void> {
    await dynamoCall(
      'PutItem',
      this.where(key),
      () =>
        this.doc.send(
          new PutCommand({ TableName: this.table, Item: { ...attributes, ...key }, ...condition }),
        ),
      onConditionFailed,
    );
  }

  /** Creates the item; false when one with this key exists (nothing changes then). */
  async create(key: Key, attributes: Record<string, unknown>): Promise<boolean> {
    const out = await dynamoCall(
      'PutItem',
      this.where(key),
      () =>
        this.doc.send(
          new PutCommand({
            TableName: this.table,
            Item: { ...attributes, ...key },
            ConditionExpression: 'attribute_not_exists(pk)',
          }),
        ),
      () => false as const,
    );
    return out !== false;
  }

  /**
   * Puts the item if `condition` holds (creation when it is `attribute_not_exists(pk)`). On a failed
   * condition, answers the item as it is: DynamoDB returns it with the failure
   * (ReturnValuesOnConditionCheckFailure), so that costs no extra request; where the reply lacks it
   * (emulators), one consistent read fetches it.
   */
  async putOrCurrent(
    key: Key,
    attributes: Record<string, unknown>,
    condition: Condition & { ConditionExpression: string },
  ): Promise<Outcome> {
    const item = { ...attributes, ...key };
    return this.orCurrent('PutItem', key, item, () =>
      this.doc.send(
        new PutCommand({
          TableName: this.table,
          Item: item,
          ...condition,
          ReturnValuesOnConditionCheckFailure: 'ALL_OLD',
        }),
      ),
    );
  }

  /** Conditional update (ReturnValues as given); `undefined` when the condition failed. */
  async update(
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

  /**
   * Conditional update returning the item after (ALL_NEW), or the item as it is when the condition
   * failed (as `putOrCurrent`: free on DynamoDB, one consistent read on an emulator).
   */
  async updateOrCurrent(
    key: Key,
    input: Omit<UpdateCommandInput, 'TableName' | 'Key' | 'ReturnValues'>,
  ): Promise<Outcome> {
    return this.orCurrent('UpdateItem', key, undefined, async () => {
      const out = await this.doc.send(
        new UpdateCommand({
          TableName: this.table,
          Key: key,
          ...input,
          ReturnValues: 'ALL_NEW',
          ReturnValuesOnConditionCheckFailure: 'ALL_OLD',
        }),
      );
      return { Attributes: out.Attributes };
    });
  }

  /** Conditional delete; the deleted item (ALL_OLD), or `undefined` when the condition failed. */
  async delete(
    key: Key,
    input: Omit<DeleteCommandInput, 'TableName' | 'Key'> = {},
  ): Promise<Record<string, unknown> | undefined> {
    const out = await dynamoCall(
      'DeleteItem',
      this.where(key),
      () =>
        this.doc.send(
          new DeleteCommand({ TableName: this.table, Key: key, ReturnValues: 'ALL_OLD', ...input }),
        ),
      () => undefined,
    );
    return out === undefined ? undefined : (out.Attributes ?? {});
  }

  /** Items of one partition, following LastEvaluatedKey; strongly consistent unless `input` says. */
  async *query(
    input: Omit<QueryCommandInput, 'TableName' | 'ExclusiveStartKey'>,
  ): AsyncGenerator<Record<string, unknown>> {
    const where = { table: this.table, key: String(input.ExpressionAttributeValues?.[':pk'] ?? '') };
    let lastKey: Record<string, unknown> | undefined;
    do {
      const res = await dynamoCall('Query', where, () =>
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

  /** Items whose sort key starts with `prefix.sk`, in key order. */
  queryPrefix(
    prefix: Key,
    extra: Omit<QueryCommandInput, 'TableName' | 'ExclusiveStartKey' | 'KeyConditionExpression'> = {},
  ): AsyncGenerator<Record<string, unknown>> {
    return this.query({
      KeyConditionExpression: 'pk = :pk AND begins_with(sk, :prefix)',
      ...extra,
      ExpressionAttributeValues: {
        ...extra.ExpressionAttributeValues,
        ':pk': prefix.pk,
        ':prefix': prefix.sk,
      },
    });
  }

  /** Items whose sort key is in [first.sk, last.sk] (one partition), in key order. */
  queryBetween(first: Key, last: Key): AsyncGenerator<Record<string, unknown>> {
    return this.query({
      KeyConditionExpression: 'pk = :pk AND sk BETWEEN :first AND :last',
      ExpressionAttributeValues: { ':pk': first.pk, ':first': first.sk, ':last': last.sk },
    });
  }

  async queryAll(
    prefix: Key,
    extra: Omit<QueryCommandInput, 'TableName' | 'ExclusiveStartKey' | 'KeyConditionExpression'> = {},
  ): Promise<Record<string, unknown>[]> {
    const items: Record<string, unknown>[] = [];
    for await (const item of this.queryPrefix(prefix, extra)) items.push(item);
    return items;
  }

  /** Deletes every item under a key prefix (or exactly `key` when `exact`). Idempotent. */
  async deleteAll(key: Key, exact = false): Promise<void> {
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
        const res = await dynamoCall('BatchWriteItem', this.where(key), () =>
          this.doc.send(new BatchWriteCommand({ RequestItems: { [this.table]: batch } })),
        );
        requests = res.UnprocessedItems?.[this.table] ?? [];
      }
    }
  }

  private async orCurrent(
    op: string,
    key: Key,
    written: Record<string, unknown> | undefined,
    call: () => Promise<{ Attributes?: Record<string, unknown> | undefined }>,
  ): Promise<Outcome> {
    try {
      const out = await call();
      return { ok: true, item: written ?? out.Attributes ?? {} };
    } catch (err) {
      if (!isConditionalCheckFailed(err)) throw translateDynamoError(err, op, this.where(key));
      // The document client does not unmarshall an exception's item: it is in wire form.
      const old = (err as { Item?: Record<string, AttributeValue> }).Item;
      if (old !== undefined) return { ok: false, current: unmarshall(old) };
      return { ok: false, current: await this.getRaw(key) };
    }
  }
}

// ---- item size --------------------------------------------------------------------------------
//
// What DynamoDB bills by: attribute names plus values, where a string or binary is its length, a
// number is about one byte per two significant digits plus one, and a map or list is 3 bytes plus
// one per element plus its elements (names included for a map). One write unit per started KB, one
// strongly consistent read unit per started 4 KB.

/** Size in bytes of an item in document form (as the document client writes it). */
export function itemSize(item: Record<string, unknown>): number {
  return attributesSize(marshall(item, { removeUndefinedValues: true, convertClassInstanceToMap: true }));
}

/** Write units one write of an item of `bytes` costs (the larger of old and new for an update). */
export const writeUnits = (bytes: number): number => Math.max(1, Math.ceil(bytes / 1024));

/** Read units a strongly consistent read of an item of `bytes` costs (half that when eventual). */
export const readUnits = (bytes: number): number => Math.max(1, Math.ceil(bytes / 4096));

function attributesSize(attrs: Record<string, AttributeValue>): number {
  let size = 0;
  for (const [name, value] of Object.entries(attrs))
    size += Buffer.byteLength(name, 'utf8') + valueSize(value);
  return size;
}

function valueSize(v: AttributeValue): number {
  if (v.S !== undefined) return Buffer.byteLength(v.S, 'utf8');
  if (v.N !== undefined) return numberSize(v.N);
  if (v.B !== undefined) return v.B.length;
  if (v.BOOL !== undefined || v.NULL !== undefined) return 1;
  if (v.SS !== undefined) return v.SS.reduce((s, x) => s + Buffer.byteLength(x, 'utf8'), 0);
  if (v.NS !== undefined) return v.NS.reduce((s, x) => s + numberSize(x), 0);
  if (v.BS !== undefined) return v.BS.reduce((s, x) => s + x.length, 0);
  if (v.L !== undefined) return 3 + v.L.reduce((s, x) => s + 1 + valueSize(x), 0);
  if (v.M !== undefined) return 3 + Object.keys(v.M).length + attributesSize(v.M);
  return 0;
}

function numberSize(n: string): number {
  const digits = n.replace(/^-/, '').replace('.', '').replace(/^0+/, '').replace(/0+$/, '');
  return digits.length === 0 ? 1 : 1 + Math.ceil(digits.length / 2);
}
