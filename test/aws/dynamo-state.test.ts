// The DynamoDB state adapter against dynalite (contract suite, paging, catalog, plan locks) and SDK mocks (throttling, denial).
// The cycle's adapters (ledger, flow, node budget) have their own: test/aws/cycle-dynamo.test.ts.
import {
  DynamoDBClient,
  InternalServerError,
  ProvisionedThroughputExceededException,
  ThrottlingException,
} from '@aws-sdk/client-dynamodb';
import {
  DeleteCommand,
  DynamoDBDocumentClient,
  GetCommand,
  PutCommand,
  QueryCommand,
  UpdateCommand,
} from '@aws-sdk/lib-dynamodb';
import { mockClient } from 'aws-sdk-client-mock';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type Dynalite, startDynalite } from '../../local-cloud/emulators/dynalite.ts';
import { StateConflictError } from '../../shared/aws/dynamo/errors.ts';
import { DynamoPlanLocks } from '../../shared/aws/dynamo/plan-locks.ts';
import { DIGEST_PAGE_SIZE, keys, progressEpoch } from '../../shared/aws/dynamo/schema.ts';
import { DynamoStateStore } from '../../shared/aws/dynamo/state-store.ts';
import { FerryError, TransferError } from '../../shared/engine/errors.ts';
import { checkpoint, stateStoreContract } from '../contract/state-store.ts';

const digest = (i: number) => i.toString(16).padStart(64, '0');
const digests = (from: number, to: number) => Array.from({ length: to - from }, (_, i) => digest(from + i));

let db: Dynalite;
beforeAll(async () => {
  db = await startDynalite();
});
afterAll(async () => {
  await db?.stop();
});

/** Each test gets its own table, so catalog listings and counters start empty. */
async function fresh() {
  const table = await db.createTable();
  return { table, store: new DynamoStateStore(db.doc, table) };
}

stateStoreContract('dynamodb (dynalite)', async () => (await fresh()).store);

describe('DynamoStateStore progress', () => {
  it('round-trips 2,500 digests saved in uneven steps across several pages, in order', async () => {
    const { store, table } = await fresh();
    const ids = { cycleId: 'web#7', fingerprint: 'plan-a' };
    // 700 leaves page 0 partial; 1,950 crosses into page 1 partially; 2,500 fills into page 2.
    await store.saveProgress('web', 'os', { ...ids, watermark: 700, bytesDone: 700 }, digests(0, 700));
    await store.saveProgress('web', 'os', { ...ids, watermark: 1950, bytesDone: 1950 }, digests(700, 1950));
    await store.saveProgress('web', 'os', { ...ids, watermark: 2500, bytesDone: 2500 }, digests(1950, 2500));

    const p = await store.loadProgress('web', 'os');
    expect(p).toEqual({ ...ids, watermark: 2500, bytesDone: 2500, digests: digests(0, 2500) });
    const epoch = progressEpoch(ids.cycleId, ids.fingerprint);
    const pages = await db.doc.send(
      new QueryCommand({
        TableName: table,
        KeyConditionExpression: 'pk = :pk AND begins_with(sk, :p)',
        ExpressionAttributeValues: { ':pk': keys.progress('web', 'os').pk, ':p': `DIGESTS#${epoch}#` },
      }),
    );
    expect(pages.Items?.map((i) => i.count)).toEqual([DIGEST_PAGE_SIZE, DIGEST_PAGE_SIZE, 500]);
  });

  it('removes the previous cycle pages once a new cycle is recorded, and everything on clear', async () => {
    const { store, table } = await fresh();
    await store.saveProgress(
      's',
      'd',
      { cycleId: 's#1', fingerprint: 'f', watermark: 1200, bytesDone: 1 },
      digests(0, 1200),
    );
    await store.saveProgress(
      's',
      'd',
      { cycleId: 's#2', fingerprint: 'f', watermark: 3, bytesDone: 3 },
      digests(5, 8),
    );
    const countItems = async () =>
      (
        await db.doc.send(
          new QueryCommand({
            TableName: table,
            KeyConditionExpression: 'pk = :pk',
            ExpressionAttributeValues: { ':pk': keys.progress('s', 'd').pk },
          }),
        )
      ).Items?.length;
    expect(await countItems()).toBe(2); // the record and one page of the new cycle
    expect((await store.loadProgress('s', 'd'))?.digests).toEqual(digests(5, 8));
    await store.clearProgress('s', 'd');
    expect(await countItems()).toBe(0);
    expect(await store.loadProgress('s', 'd')).toBeUndefined();
  });

  it('ignores pages left by a save that crashed before its record, and overwrites them next time', async () => {
    const { store, table } = await fresh();
    const ids = { cycleId: 's#1', fingerprint: 'f' };
    await store.saveProgress('s', 'd', { ...ids, watermark: 1500, bytesDone: 1 }, digests(0, 1500));
    // The crashed save had rewritten page 1 (same first 500 digests, then others) and added page 2.
    const epoch = progressEpoch(ids.cycleId, ids.fingerprint);
    const crashedPage1 = Buffer.concat([
      ...digests(1000, 1500).map((d) => Buffer.from(d, 'hex')),
      Buffer.alloc(500 * 32, 0xee),
    ]);
    await db.doc.send(
      new PutCommand({
        TableName: table,
        Item: { ...keys.digestPage('s', 'd', epoch, 1), epoch, page: 1, count: 1000, digests: crashedPage1 },
      }),
    );
    await db.doc.send(
      new PutCommand({
        TableName: table,
        Item: {
          ...keys.digestPage('s', 'd', epoch, 2),
          epoch,
          page: 2,
          count: 10,
          digests: Buffer.alloc(320, 0xee),
        },
      }),
    );
    expect((await store.loadProgress('s', 'd'))?.digests).toEqual(digests(0, 1500));
    await store.saveProgress('s', 'd', { ...ids, watermark: 2100, bytesDone: 2 }, digests(1500, 2100));
    expect((await store.loadProgress('s', 'd'))?.digests).toEqual(digests(0, 2100));
  });

  it('names the key when a digest page the record vouches for is missing', async () => {
    const { store, table } = await fresh();
    const ids = { cycleId: 's#1', fingerprint: 'f' };
    await store.saveProgress('s', 'd', { ...ids, watermark: 1200, bytesDone: 1 }, digests(0, 1200));
    const epoch = progressEpoch(ids.cycleId, ids.fingerprint);
    await db.doc.send(new DeleteCommand({ TableName: table, Key: keys.digestPage('s', 'd', epoch, 1) }));
    await expect(store.loadProgress('s', 'd')).rejects.toThrow(
      new RegExp(`vouches for 1200 digests but page .*DIGESTS#${epoch}#00000001`),
    );
  });

  it('rejects a malformed record with an error naming its key', async () => {
    const { store, table } = await fresh();
    await db.doc.send(
      new PutCommand({
        TableName: table,
        Item: { ...keys.progress('s', 'd'), cycleId: 's#1', fingerprint: 'f', epoch: 'x', watermark: 'lots' },
      }),
    );
    const err = await store.loadProgress('s', 'd').catch((e: unknown) => e);
    expect(err).toBeInstanceOf(FerryError);
    expect((err as Error).message).toMatch(
      /DISK#s#d \/ PROGRESS in table ferry-state-\d+ is malformed at watermark/,
    );
  });

  it('lets one of several concurrent saves from the same state win; the others fail and change nothing', async () => {
    const { store } = await fresh();
    const ids = { cycleId: 's#1', fingerprint: 'f' };
    await store.saveProgress('s', 'd', { ...ids, watermark: 2, bytesDone: 2 }, digests(0, 2));
    const results = await Promise.allSettled(
      Array.from({ length: 6 }, () =>
        store.saveProgress('s', 'd', { ...ids, watermark: 4, bytesDone: 4 }, digests(2, 4)),
      ),
    );
    expect(results.filter((r) => r.status === 'fulfilled')).toHaveLength(1);
    for (const r of results) if (r.status === 'rejected') expect(r.reason).toBeInstanceOf(FerryError);
    expect(await store.loadProgress('s', 'd')).toEqual({
      ...ids,
      watermark: 4,
      bytesDone: 4,
      digests: digests(0, 4),
    });
  });

  it('refuses a save whose digests do not add up to its watermark', async () => {
    const { store } = await fresh();
    const ids = { cycleId: 's#1', fingerprint: 'f' };
    await store.saveProgress('s', 'd', { ...ids, watermark: 2, bytesDone: 2 }, digests(0, 2));
    await expect(
      store.saveProgress('s', 'd', { ...ids, watermark: 5, bytesDone: 5 }, digests(2, 4)),
    ).rejects.toThrow(/2 stored \+ 2 appended digests != watermark 5/);
    expect((await store.loadProgress('s', 'd'))?.watermark).toBe(2);
  });
});

describe('DynamoStateStore catalog and jobs', () => {
  it('publishes a checkpoint exactly once under 8 concurrent publishers, keeping the winner intact', async () => {
    const { store } = await fresh();
    const attempts = Array.from({ length: 8 }, (_, i) => ({
      ...checkpoint('race', 1),
      createdAt: new Date(1_700_000_000_000 + i).toISOString(),
    }));
    const results = await Promise.allSettled(attempts.map((cp) => store.publishCheckpoint(cp)));
    const won = results.flatMap((r, i) => (r.status === 'fulfilled' ? [attempts[i]] : []));
    expect(won).toHaveLength(1);
    for (const r of results) {
      if (r.status === 'rejected') {
        expect(r.reason).toBeInstanceOf(StateConflictError);
        expect(String(r.reason.message)).toMatch(/race#1 is already published/);
      }
    }
    expect(await store.listCheckpoints('race')).toEqual(won);
  });

  it('refuses a checkpoint id already used by another sequence, and pages long catalogs', async () => {
    const { store } = await fresh();
    await store.publishCheckpoint(checkpoint('web', 1));
    await expect(store.publishCheckpoint({ ...checkpoint('web', 2), id: 'web#1' })).rejects.toThrow(
      /web#1 is already published/,
    );
    for (let seq = 2; seq <= 12; seq++)
      await store.publishCheckpoint(checkpoint('web', seq, `web#${seq - 1}`));
    expect((await store.listCheckpoints('web')).map((c) => c.sequence)).toEqual(
      Array.from({ length: 12 }, (_, i) => i + 1),
    );
    expect((await store.latestCheckpoint('web'))?.id).toBe('web#12');
  });

  it('reads a checkpoint item from before aggregates were named as the ebs-linear-sha256 one', async () => {
    // Prepare: an item as this table's writer (the serverless finalizer) recorded it before issue
    // #12: EBS's LINEAR checksum, hex, under `aggregateSha256`.
    const { store, table } = await fresh();
    const cp = checkpoint('web', 2, 'web#1');
    const { aggregate, ...disk } = cp.disks[0]!;
    const legacy = { ...cp, disks: [{ ...disk, aggregateSha256: aggregate.value }] };
    await db.doc.send(
      new PutCommand({ TableName: table, Item: { ...keys.checkpoint('web', 2), ...legacy } }),
    );
    await db.doc.send(new PutCommand({ TableName: table, Item: { ...keys.catalogSet('web'), set: 'web' } }));

    // Act
    const latest = await store.latestCheckpoint('web');
    const listed = await store.listCheckpoints();

    // Assess: the value, named by the algorithm that computed it, through both ways of reading.
    const named = { algorithm: 'ebs-linear-sha256', value: aggregate.value };
    expect(latest?.disks[0]?.aggregate).toEqual(named);
    expect(latest).toEqual({ ...cp, disks: [{ ...disk, aggregate: named }] });
    expect(listed.map((c) => c.disks[0]?.aggregate)).toEqual([named]);
  });

  it('moves a job between states only from the state it is in', async () => {
    const { store } = await fresh();
    const job = {
      set: 'web',
      cycleId: 'web#3',
      plan: 'gold',
      status: 'replicating' as const,
      startedAt: '2026-01-01T00:00:00Z',
      updatedAt: '2026-01-01T00:00:00Z',
    };
    await store.createJob(job);
    await expect(store.createJob(job)).rejects.toBeInstanceOf(StateConflictError);
    const results = await Promise.allSettled(
      Array.from({ length: 8 }, () =>
        store.updateJobStatus('web', 'web#3', 'replicating', 'finalizing', '2026-01-01T00:05:00Z'),
      ),
    );
    expect(results.filter((r) => r.status === 'fulfilled')).toHaveLength(1);
    const done = await store.updateJobStatus(
      'web',
      'web#3',
      'finalizing',
      'published',
      '2026-01-01T00:06:00Z',
      {
        checkpointId: 'web#3',
      },
    );
    expect(done).toMatchObject({ status: 'published', checkpointId: 'web#3' });
    expect(await store.getJob('web', 'web#3')).toEqual(done);
  });

  it('stores replication sets and their disks (through a bare DynamoDBClient)', async () => {
    const store = new DynamoStateStore(db.client, await db.createTable());
    await store.putSet({ set: 'web', plan: 'gold', createdAt: '2026-01-01T00:00:00Z' });
    await store.putDisk({
      set: 'web',
      disk: 'os',
      source: 'ebs:snap-1',
      target: 'ebs',
      sizeBytes: 8 << 30,
      blockSize: 524288,
    });
    await store.putDisk({
      set: 'web',
      disk: 'data',
      source: 'ebs:snap-2',
      target: 'ebs',
      sizeBytes: 1 << 30,
      blockSize: 524288,
    });
    expect(await store.getSet('web')).toEqual({
      set: 'web',
      plan: 'gold',
      createdAt: '2026-01-01T00:00:00Z',
    });
    expect((await store.listDisks('web')).map((d) => d.disk)).toEqual(['data', 'os']);
  });
});

describe('DynamoPlanLocks', () => {
  it('excludes a second owner until expiry, then allows takeover with a larger fence', async () => {
    const locks = new DynamoPlanLocks(db.doc, { table: await db.createTable() });
    const a = await locks.acquire('gold', 'cycle-a', 1000, 0);
    expect(a).toMatchObject({ owner: 'cycle-a', lockExpiresAt: 1000, fence: 1 });
    expect(await locks.acquire('gold', 'cycle-b', 1000, 500)).toBeUndefined();
    expect((await locks.renew('gold', 'cycle-a', 1000, 500))?.lockExpiresAt).toBe(1500);
    expect(await locks.acquire('gold', 'cycle-b', 1000, 1499)).toBeUndefined();

    const b = await locks.acquire('gold', 'cycle-b', 1000, 1500);
    expect(b).toMatchObject({ owner: 'cycle-b', fence: 2 });
    expect(await locks.renew('gold', 'cycle-a', 1000, 1600)).toBeUndefined();
    expect(await locks.release('gold', 'cycle-a')).toBe(false);
    expect(await locks.release('gold', 'cycle-b')).toBe(true);
    expect(await locks.get('gold')).toBeUndefined();
    expect(await locks.renew('gold', 'cycle-b', 1000, 1700)).toBeUndefined();

    const c = await locks.acquire('gold', 'cycle-c', 1000, 1700);
    expect(c?.fence).toBe(3);
  });

  it('lets exactly one of 8 concurrent cycles take a free lock', async () => {
    const locks = new DynamoPlanLocks(db.doc, { table: await db.createTable() });
    const results = await Promise.all(
      Array.from({ length: 8 }, (_, i) => locks.acquire('gold', `cycle-${i}`, 60_000, 0)),
    );
    const won = results.filter((r) => r !== undefined);
    expect(won).toHaveLength(1);
    expect((await locks.get('gold'))?.owner).toBe(won[0]?.owner);
  });
});

describe('DynamoDB errors (SDK mock)', () => {
  const mocked = () => {
    const doc = DynamoDBDocumentClient.from(
      new DynamoDBClient({ region: 'us-east-1', credentials: { accessKeyId: 'x', secretAccessKey: 'y' } }),
    );
    return { doc, mock: mockClient(doc) };
  };

  it('turns throttling into a retryable, throttled TransferError', async () => {
    const { doc, mock } = mocked();
    mock
      .on(GetCommand)
      .rejects(new ThrottlingException({ message: 'Rate exceeded', $metadata: {} }))
      .on(UpdateCommand)
      .rejects(new ProvisionedThroughputExceededException({ message: 'slow down', $metadata: {} }));
    const store = new DynamoStateStore(doc, 'ferry-prod');
    const locks = new DynamoPlanLocks(doc, { table: 'ferry-prod' });

    for (const call of [store.loadProgress('s', 'd'), locks.acquire('gold', 'cycle-a', 60_000, 0)]) {
      const err = await call.catch((e: unknown) => e);
      expect(err).toBeInstanceOf(TransferError);
      expect(err).toMatchObject({ retryable: true, throttled: true });
      expect((err as Error).message).toMatch(/table ferry-prod.*throttled/);
    }
  });

  it('turns access denied into a permanent error naming the table, and a server error into a retryable one', async () => {
    const { doc, mock } = mocked();
    const denied = Object.assign(new Error('User is not authorized to perform: dynamodb:PutItem'), {
      name: 'AccessDeniedException',
      $metadata: {},
    });
    mock
      .on(PutCommand)
      .rejects(denied)
      .on(GetCommand)
      .rejects(new InternalServerError({ message: 'oops', $metadata: {} }));
    const store = new DynamoStateStore(doc, 'ferry-prod');

    const err = await store.publishCheckpoint(checkpoint('web', 1)).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(TransferError);
    expect(err).toMatchObject({ retryable: false, throttled: false });
    expect((err as Error).message).toMatch(/PutItem on table ferry-prod .*AccessDeniedException/);
    expect((err as Error).cause).toBe(denied);

    const transient = await store.loadProgress('s', 'd').catch((e: unknown) => e);
    expect(transient).toMatchObject({ name: 'TransferError', retryable: true, throttled: false });
  });
});
