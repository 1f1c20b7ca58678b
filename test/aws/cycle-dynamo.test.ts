// The cycle's DynamoDB adapters (ledger, grant flow, plan locks, node budget): their contract suites on
// dynalite, what each port call costs in requests and write units, the item layout, and the
// condition-failure path DynamoDB answers with the item (an SDK mock: dynalite does not return it).
import { ConditionalCheckFailedException, DynamoDBClient } from '@aws-sdk/client-dynamodb';
import { DynamoDBDocumentClient, GetCommand, QueryCommand, UpdateCommand } from '@aws-sdk/lib-dynamodb';
import { marshall } from '@aws-sdk/util-dynamodb';
import { mockClient } from 'aws-sdk-client-mock';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type Dynalite, startDynalite } from '../../local-cloud/emulators/dynalite.ts';
import { cycleKeys, TTL_ATTRIBUTE } from '../../shared/aws/dynamo/cycle-items.ts';
import { DynamoCycleLedger } from '../../shared/aws/dynamo/cycle-ledger.ts';
import { MalformedStateError } from '../../shared/aws/dynamo/errors.ts';
import { DynamoGrantFlow, FlowMissingError, seqKey } from '../../shared/aws/dynamo/grant-flow.ts';
import { itemSize, writeUnits } from '../../shared/aws/dynamo/items.ts';
import { DynamoNodeBudget } from '../../shared/aws/dynamo/node-budget.ts';
import { DynamoPlanLocks } from '../../shared/aws/dynamo/plan-locks.ts';
import { DynamoStateStore } from '../../shared/aws/dynamo/state-store.ts';
import type { CycleCatalog, FlowKey } from '../../shared/engine/cycle/ports.ts';
import {
  completion,
  cycleLedgerContract,
  cycleRecord,
  plannedDescriptors,
} from '../contract/cycle-ledger.ts';
import { flowKey, grantFlowContract } from '../contract/grant-flow.ts';
import { nodeBudgetContract } from '../contract/node-budget.ts';
import { planLocksContract } from '../contract/plan-locks.ts';
import { type DynamoMeter, meteredClient } from '../support/dynamo-meter.ts';

const MiB = 1 << 20;
const NOW = 1_717_200_000_000;

let db: Dynalite;
let meter: DynamoMeter;
beforeAll(async () => {
  db = await startDynalite();
  meter = meteredClient(db.endpoint);
});
afterAll(async () => {
  meter?.client.destroy();
  await db?.stop();
});

// The catalog port is DynamoStateStore as it is (structurally): this stops compiling if they drift.
const asCatalog = (store: DynamoStateStore): CycleCatalog => store;

cycleLedgerContract(
  'dynamodb (dynalite)',
  async () => new DynamoCycleLedger(db.doc, { table: await db.createTable() }),
);
grantFlowContract(
  'dynamodb (dynalite)',
  async () => new DynamoGrantFlow(db.doc, { table: await db.createTable() }),
);
planLocksContract(
  'dynamodb (dynalite)',
  async () => new DynamoPlanLocks(db.doc, { table: await db.createTable() }),
);
nodeBudgetContract(
  'dynamodb (dynalite)',
  async () => new DynamoNodeBudget(db.doc, { table: await db.createTable() }),
);

/** Adapters on a fresh table through the metered client, and a raw reader of their items. */
async function metered() {
  const table = await db.createTable();
  const raw = async (key: { pk: string; sk: string }) =>
    (await db.doc.send(new GetCommand({ TableName: table, Key: key }))).Item;
  return {
    table,
    raw,
    flow: new DynamoGrantFlow(meter.client, { table }),
    ledger: new DynamoCycleLedger(meter.client, { table, now: () => NOW }),
    budget: new DynamoNodeBudget(meter.client, { table }),
    locks: new DynamoPlanLocks(meter.client, { table }),
  };
}

/** A cycle-sized key: real ids (a plan's set name, an EBS volume id, a timestamped cycle). */
const realKey = (): FlowKey =>
  flowKey({ set: 'plan-finance-prod', cycleId: 'finance-prod#2024-06-01T00:00:00Z' });

/** What one call cost: requests by operation and the write units the server reported. */
async function cost<T>(
  act: () => Promise<T>,
): Promise<{ result: T; requests: Record<string, number>; wcu: number }> {
  meter.reset();
  const result = await act();
  return { result, requests: meter.counts(), wcu: meter.writeUnits };
}

describe('DynamoGrantFlow costs and layout', () => {
  it('keeps a flow with a full 64-entry done map, marks and re-grants under 1 KB (one write unit)', async () => {
    // Prepare: seqs around 10 million (a 10 TiB disk in 1 MiB chunks), 64 of them done above low.
    const { flow, raw } = await metered();
    const key = realKey();
    const s0 = await flow.create(key, { window: 64 * MiB, allowance: 256 * MiB });
    const low = 10_000_000;
    const s1 = (await flow.advance(key, s0.version, {
      low,
      lowBytes: low * MiB,
      dropDone: [],
      next: low + 70,
      grantedBytes: (low + 70) * MiB,
      regrants: new Map([[low + 3, { attempt: 2, at: NOW }]]),
      dropRegrants: [],
    }))!;
    await flow.control(key, {
      window: 64 * MiB,
      allowance: 64 * MiB,
      allowanceUntil: NOW + 60_000,
      marks: [0, 1, 2, 3].map((i) => ({ at: NOW + i * 5000, next: low + 60 + i })),
    });
    const done = Array.from({ length: 64 }, (_, i) => ({
      seq: low + 1 + i,
      bytes: MiB - 512 * i,
      blocks: 2,
    }));
    for (let i = 0; i < 64; i += 8) await flow.complete(key, done.slice(i, i + 8));

    // Act
    const item = await raw(cycleKeys.flow(key.set, key.disk, key.cycleId));
    const { result: advanced, wcu } = await cost(() =>
      flow.advance(key, s1.version + 1, {
        low,
        lowBytes: low * MiB,
        dropDone: [],
        next: low + 71,
        grantedBytes: (low + 71) * MiB,
        regrants: new Map(),
        dropRegrants: [],
      }),
    );

    // Assess
    const size = itemSize(item!);
    expect((item!.d as Record<string, number>)[seqKey(low + 64)]).toBe(MiB - 512 * 63);
    expect(Object.keys(item!.d as object)).toHaveLength(64);
    expect(size).toBeLessThan(1024);
    expect(writeUnits(size)).toBe(1);
    expect(wcu).toBe(1); // as the server bills it
    expect(advanced?.done.size).toBe(64);
  });

  it('costs one request per create, get, advance, control, and complete without duplicates', async () => {
    const { flow } = await metered();
    const key = realKey();

    const create = await cost(() => flow.create(key, { window: 64 * MiB, allowance: 64 * MiB }));
    const again = await cost(() => flow.create(key, { window: 1, allowance: 1 }));
    const advance = await cost(() =>
      flow.advance(key, create.result.version, {
        low: 0,
        lowBytes: 0,
        dropDone: [],
        next: 10,
        grantedBytes: 10 * MiB,
        regrants: new Map(),
        dropRegrants: [],
      }),
    );
    const complete = await cost(() =>
      flow.complete(
        key,
        Array.from({ length: 10 }, (_, seq) => ({ seq, bytes: MiB, blocks: 2 })),
      ),
    );
    const control = await cost(() => flow.control(key, { window: 32 * MiB, allowance: 32 * MiB }));
    const get = await cost(() => flow.get(key));

    expect(create.requests).toEqual({ PutItem: 1 });
    // DynamoDB returns the existing item with the failed condition; dynalite does not, so one read.
    expect(again.requests).toEqual({ PutItem: 1, GetItem: 1 });
    expect(advance.requests).toEqual({ UpdateItem: 1 });
    expect(complete.requests).toEqual({ UpdateItem: 1 });
    expect(complete.result.counted).toHaveLength(10);
    expect(control.requests).toEqual({ UpdateItem: 1 });
    expect(get.requests).toEqual({ GetItem: 1 });
    for (const c of [create, advance, complete, control]) expect(c.wcu).toBe(1);
  });

  it('counts a batch holding a duplicate with one more update (plus the read dynalite needs)', async () => {
    const { flow } = await metered();
    const key = realKey();
    const s0 = await flow.create(key, { window: 64 * MiB, allowance: 64 * MiB });
    await flow.advance(key, s0.version, {
      low: 0,
      lowBytes: 0,
      dropDone: [],
      next: 10,
      grantedBytes: 10 * MiB,
      regrants: new Map(),
      dropRegrants: [],
    });
    await flow.complete(key, [{ seq: 3, bytes: MiB, blocks: 2 }]);

    const dup = await cost(() =>
      flow.complete(key, [
        { seq: 2, bytes: MiB, blocks: 2 },
        { seq: 3, bytes: MiB, blocks: 2 },
        { seq: 4, bytes: MiB, blocks: 2 },
      ]),
    );
    const allDup = await cost(() => flow.complete(key, [{ seq: 3, bytes: MiB, blocks: 2 }]));

    expect(dup.result.counted).toEqual([2, 4]);
    expect(dup.requests).toEqual({ UpdateItem: 2, GetItem: 1 });
    expect(dup.result.state.completedCount).toBe(3);
    expect(allDup.result.counted).toEqual([]);
    expect(allDup.requests).toEqual({ UpdateItem: 1, GetItem: 1 });
  });

  it('names a missing flow instead of creating one', async () => {
    const { flow, raw } = await metered();
    const key = realKey();
    await expect(flow.complete(key, [{ seq: 0, bytes: 1, blocks: 1 }])).rejects.toBeInstanceOf(
      FlowMissingError,
    );
    await expect(flow.control(key, { window: 1 })).rejects.toBeInstanceOf(FlowMissingError);
    await expect(
      flow.advance(key, 0, {
        low: 0,
        lowBytes: 0,
        dropDone: [],
        next: 1,
        grantedBytes: 1,
        regrants: new Map(),
        dropRegrants: [],
      }),
    ).rejects.toBeInstanceOf(FlowMissingError);
    expect(await raw(cycleKeys.flow(key.set, key.disk, key.cycleId))).toBeUndefined();
  });

  it('refuses a flow item it did not write', async () => {
    const { flow, table } = await metered();
    const key = realKey();
    await flow.create(key, { window: MiB, allowance: MiB });
    await db.doc.send(
      new UpdateCommand({
        TableName: table,
        Key: cycleKeys.flow(key.set, key.disk, key.cycleId),
        UpdateExpression: 'SET d.#k = :bad',
        ExpressionAttributeNames: { '#k': 'not-a-seq!' },
        ExpressionAttributeValues: { ':bad': 1 },
      }),
    );
    await expect(flow.get(key)).rejects.toBeInstanceOf(MalformedStateError);
  });
});

describe('DynamoGrantFlow against DynamoDB replies (SDK mock)', () => {
  const key: FlowKey = { set: 's', disk: 'd', cycleId: 'c' };
  const stored = (over: Record<string, unknown> = {}) => ({
    pk: 'x',
    sk: 'y',
    v: 3,
    o: true,
    n: 10,
    l: 2,
    g: 10 * MiB,
    b: 2 * MiB,
    d: { [seqKey(5)]: MiB },
    c: 3,
    cb: 3 * MiB,
    wb: 6,
    r: {},
    w: 64 * MiB,
    a: 64 * MiB,
    u: 0,
    m: [],
    ...over,
  });

  it('retries only the entries still to count, with the item the failed condition returned, and reads nothing', async () => {
    // Prepare: the first update fails (seq 5 is done, seq 1 is below low) and DynamoDB returns the item.
    const doc = DynamoDBDocumentClient.from(new DynamoDBClient({ region: 'us-east-1' }));
    const mock = mockClient(doc);
    const failed = new ConditionalCheckFailedException({
      message: 'The conditional request failed',
      $metadata: {},
    });
    (failed as { Item?: unknown }).Item = marshall(stored());
    mock
      .on(UpdateCommand)
      .rejectsOnce(failed)
      .resolvesOnce({
        Attributes: stored({ d: { [seqKey(5)]: MiB, [seqKey(6)]: MiB }, c: 4, cb: 4 * MiB, wb: 8 }),
      });
    const flow = new DynamoGrantFlow(doc, { table: 't' });

    // Act
    const out = await flow.complete(key, [
      { seq: 1, bytes: MiB, blocks: 2 },
      { seq: 5, bytes: MiB, blocks: 2 },
      { seq: 6, bytes: MiB, blocks: 2 },
    ]);

    // Assess
    expect(out.counted).toEqual([6]);
    expect(out.state.completedCount).toBe(4);
    expect(mock.commandCalls(GetCommand)).toHaveLength(0);
    const calls = mock.commandCalls(UpdateCommand);
    expect(calls).toHaveLength(2);
    const first = calls[0]!.args[0].input;
    const second = calls[1]!.args[0].input;
    expect(first.ReturnValuesOnConditionCheckFailure).toBe('ALL_OLD');
    expect(first.ExpressionAttributeValues).toMatchObject({
      ':n': 3,
      ':bytes': 3 * MiB,
      ':blocks': 6,
      ':lowest': 1,
    });
    expect(second.ExpressionAttributeValues).toMatchObject({
      ':n': 1,
      ':bytes': MiB,
      ':blocks': 2,
      ':lowest': 6,
    });
    expect(Object.values(second.ExpressionAttributeNames ?? {})).toContain(seqKey(6));
    mock.restore();
  });

  it('answers a lost advance as undefined from the returned item, without a read', async () => {
    const doc = DynamoDBDocumentClient.from(new DynamoDBClient({ region: 'us-east-1' }));
    const mock = mockClient(doc);
    const failed = new ConditionalCheckFailedException({
      message: 'The conditional request failed',
      $metadata: {},
    });
    (failed as { Item?: unknown }).Item = marshall(stored({ v: 4 }));
    mock.on(UpdateCommand).rejects(failed);
    const flow = new DynamoGrantFlow(doc, { table: 't' });

    const out = await flow.advance(key, 3, {
      low: 2,
      lowBytes: 2 * MiB,
      dropDone: [],
      next: 11,
      grantedBytes: 11 * MiB,
      regrants: new Map(),
      dropRegrants: [],
    });

    expect(out).toBeUndefined();
    expect(mock.commandCalls(GetCommand)).toHaveLength(0);
    mock.restore();
  });
});

describe('DynamoCycleLedger costs and layout', () => {
  it('records a writer batch of ten 1 MiB chunks as one item under 1 KB, read back by one query', async () => {
    const { ledger, raw } = await metered();
    const entries = Array.from({ length: 10 }, (_, i) => completion(1_000_000 + i));

    const record = await cost(() =>
      ledger.recordCompletions(
        'plan-finance-prod',
        'vol-0123456789abcdef0',
        'finance-prod#2024-06-01T00:00:00Z',
        'a1b2c3d4-0000-4000-8000-123456789abc',
        entries,
      ),
    );
    const list = await cost(async () => {
      const out = [];
      for await (const e of ledger.listCompletions(
        'plan-finance-prod',
        'vol-0123456789abcdef0',
        'finance-prod#2024-06-01T00:00:00Z',
      ))
        out.push(e);
      return out;
    });

    const item = await raw(
      cycleKeys.completionBatch(
        'plan-finance-prod',
        'vol-0123456789abcdef0',
        'finance-prod#2024-06-01T00:00:00Z',
        'a1b2c3d4-0000-4000-8000-123456789abc',
      ),
    );
    expect(record.requests).toEqual({ PutItem: 1 });
    expect(record.wcu).toBe(1);
    expect(itemSize(item!)).toBeLessThan(1024);
    expect(item![TTL_ATTRIBUTE]).toBe(Math.floor(NOW / 1000) + 30 * 24 * 3600);
    expect(list.requests).toEqual({ Query: 1 });
    expect(list.result).toEqual(entries);
  });

  it('costs one request per cycle, disk, page and signal call, and half-price page reads', async () => {
    const { ledger, raw } = await metered();
    const page = plannedDescriptors(0, 200);

    const create = await cost(() => ledger.createCycle(cycleRecord()));
    const update = await cost(() => ledger.updateCycle('finance', 'c1', { ticks: 1 }, ['active']));
    const put = await cost(() => ledger.putDescriptorPage('finance', 'vol-os', 'c1', 0, page));
    meter.reset();
    await ledger.getDescriptorPage('finance', 'vol-os', 'c1', 0);
    const pageRead = { requests: meter.counts(), rcu: meter.readUnits };
    const missing = await cost(() => ledger.getDescriptorPage('finance', 'vol-os', 'c1', 9));
    const signals = await cost(() =>
      ledger.addSignals('finance', 'vol-os', 'c1', NOW, {
        attempts: 10,
        successes: 10,
        throttles: 0,
        errors: 0,
        bytes: 10 * MiB,
        latencyMs: 900,
        windowLimited: 0,
        nodePressure: 0,
      }),
    );
    const read = await cost(() => ledger.readSignals('finance', 'vol-os', 'c1', NOW - 10_000, NOW + 250));

    expect(create.requests).toEqual({ PutItem: 1 });
    expect(update.requests).toEqual({ UpdateItem: 1 });
    expect(put.requests).toEqual({ PutItem: 1 });
    expect(pageRead.requests).toEqual({ GetItem: 1 });
    // An eventually consistent read of a page: half the units of a strongly consistent one.
    expect(pageRead.rcu).toBe(
      Math.ceil(itemSize((await raw(cycleKeys.descriptorPage('finance', 'vol-os', 'c1', 0)))!) / 4096) / 2,
    );
    expect(missing.requests).toEqual({ GetItem: 2 }); // eventual miss, then a consistent one
    expect(signals.requests).toEqual({ UpdateItem: 1 });
    expect(read.requests).toEqual({ Query: 1 });
    expect(read.result).toHaveLength(1);
    const sig = await raw(cycleKeys.signals('finance', 'vol-os', 'c1', NOW / 250));
    expect(sig![TTL_ATTRIBUTE]).toBe(Math.floor(NOW / 1000) + 24 * 3600);
    const pageItem = await raw(cycleKeys.descriptorPage('finance', 'vol-os', 'c1', 0));
    expect(pageItem![TTL_ATTRIBUTE]).toBe(Math.floor(NOW / 1000) + 30 * 24 * 3600);
    expect(await raw(cycleKeys.cycle('finance', 'c1'))).not.toHaveProperty(TTL_ATTRIBUTE);
  });

  it('refuses a damaged completion batch, naming its item', async () => {
    const { ledger, table } = await metered();
    await ledger.recordCompletions('s', 'd', 'c', 'b1', [completion(1)]);
    const key = cycleKeys.completionBatch('s', 'd', 'c', 'b1');
    await db.doc.send(
      new UpdateCommand({
        TableName: table,
        Key: key,
        UpdateExpression: 'SET e = :torn',
        ExpressionAttributeValues: { ':torn': new Uint8Array([1, 0, 0, 0, 1, 0, 2, 9]) },
      }),
    );
    const read = async () => {
      for await (const _ of ledger.listCompletions('s', 'd', 'c')) {
        // drain
      }
    };
    await expect(read()).rejects.toThrow(/DONE#c#b1 .* is damaged: completion of seq 1 is torn/);
  });

  it('keeps the items of one disk in its own partition, keys URI-encoded', async () => {
    const { ledger, flow, table } = await metered();
    await ledger.createDisk({
      set: 'a#b',
      disk: 'vm/scsi0:1',
      cycleId: 'c#1',
      kind: 'full',
      state: 'active',
      volumeSizeGiB: 1,
      sourceSnapshotId: 'snap-1',
      targetSnapshotId: 'snap-2',
      targetStartedAt: NOW,
      chunkSize: MiB,
      perPage: 200,
      encrypted: false,
      diffDone: false,
      diffSeq: 0,
      diffStartBlock: 0,
      diffBlocks: 0,
      diffBytes: 0,
    });
    await flow.create({ set: 'a#b', disk: 'vm/scsi0:1', cycleId: 'c#1' }, { window: MiB, allowance: MiB });
    await ledger.recordCompletions('a#b', 'vm/scsi0:1', 'c#1', 'batch#1', [completion(0)]);

    const out = await db.doc.send(
      new QueryCommand({
        TableName: table,
        KeyConditionExpression: 'pk = :pk',
        ExpressionAttributeValues: { ':pk': 'DISK#a%23b#vm%2Fscsi0%3A1' },
      }),
    );
    expect(out.Items?.map((i) => i.sk)).toEqual(['CYCLE#c%231', 'DONE#c%231#batch%231', 'FLOW#c%231']);
  });
});

describe('DynamoStateStore as the CycleCatalog port', () => {
  it('creates a job once and moves it only from the status it is in', async () => {
    const catalog = asCatalog(new DynamoStateStore(db.doc, await db.createTable()));
    const job = {
      set: 'finance',
      cycleId: 'c1',
      plan: 'plan-finance',
      status: 'replicating' as const,
      startedAt: '2024-06-01T00:00:00.000Z',
      updatedAt: '2024-06-01T00:00:00.000Z',
    };
    await catalog.createJob(job);
    await expect(catalog.createJob(job)).rejects.toThrow(/already exists/);
    await catalog.updateJobStatus('finance', 'c1', 'replicating', 'finalizing', '2024-06-01T01:00:00.000Z');
    await expect(
      catalog.updateJobStatus('finance', 'c1', 'replicating', 'failed', '2024-06-01T02:00:00.000Z'),
    ).rejects.toThrow(/not replicating/);
    expect((await catalog.getJob('finance', 'c1'))?.status).toBe('finalizing');
  });
});

describe('DynamoNodeBudget and DynamoPlanLocks costs', () => {
  it('reserves with one read and one write, releases with one write', async () => {
    const { budget, locks, raw } = await metered();

    const first = await cost(() =>
      budget.reserve('node-a', 'cycle-1', 64 * MiB, NOW + 60_000, NOW, 256 * MiB),
    );
    const renew = await cost(() =>
      budget.reserve('node-a', 'cycle-1', 64 * MiB, NOW + 90_000, NOW + 30_000, 256 * MiB),
    );
    const release = await cost(() => budget.release('node-a', 'cycle-1'));
    const lock = await cost(() => locks.acquire('plan', 'exec-1', 60_000, NOW));

    expect(first.requests).toEqual({ GetItem: 1, PutItem: 1 });
    expect(renew.requests).toEqual({ GetItem: 1, PutItem: 1 });
    expect(release.requests).toEqual({ UpdateItem: 1 });
    expect(lock.requests).toEqual({ UpdateItem: 1 });
    expect(await raw(cycleKeys.nodeBudget('node-a'))).toMatchObject({ v: 3, h: {} });
  });

  it('prunes expired reservations from the item when it writes', async () => {
    const { budget, raw } = await metered();
    await budget.reserve('node-a', 'crashed', 100, NOW + 1000, NOW, 1000);
    await budget.reserve('node-a', 'live', 100, NOW + 5000, NOW, 1000);

    const got = await budget.reserve('node-a', 'new', 1000, NOW + 5000, NOW + 1000, 1000);

    expect(got).toBe(900);
    expect((await raw(cycleKeys.nodeBudget('node-a')))?.h).toEqual({
      live: [100, NOW + 5000],
      new: [900, NOW + 5000],
    });
  });
});
