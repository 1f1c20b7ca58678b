// The SQS grant queue under the cycle's channel: the grant message (version 2) and its bounds, the
// queue against fauxqs (batches, visibility, hand-back, DLQ) and an SDK mock (errors SQS rarely shows).
// The channel's sending (partial batches, retries, refusals) is tested in grant-channel.test.ts.
import {
  DeleteMessageBatchCommand,
  GetQueueAttributesCommand,
  QueueDoesNotExist,
  ReceiveMessageCommand,
  RequestThrottled,
  SendMessageCommand,
  SQSClient,
  SQSServiceException,
} from '@aws-sdk/client-sqs';
import { mockClient } from 'aws-sdk-client-mock';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type Fauxqs, startSqsEmulator } from '../../local-cloud/emulators/fauxqs.ts';
import {
  decodeCycleGrant,
  encodeCycleGrant,
  GrantMessageError,
  MAX_GRANT_EXTENTS,
  MAX_GRANT_MESSAGE_BYTES,
  MAX_GRANT_NAME_LENGTH,
  SQS_BATCH_LIMIT_BYTES,
  SQS_MAX_BATCH_ENTRIES,
} from '../../shared/aws/sqs/grant-message.ts';
import { createGrantQueue, GrantLeaseLostError, GrantQueue } from '../../shared/aws/sqs/grant-queue.ts';
import type { Grant } from '../../shared/engine/cycle/ports.ts';
import { cutDescriptors, type Descriptor } from '../../shared/engine/descriptors.ts';
import { TransferError } from '../../shared/engine/errors.ts';
import type { Extent } from '../../shared/engine/extents.ts';

const KiB = 1024;
const MiB = 1024 * KiB;

// ---- grant factories ----

/** A fragmented change map (4 KiB and 8 KiB extents with gaps) cut into 1 MiB descriptors, as the differ does. */
function descriptorsOf(count: number): Descriptor[] {
  const extents: Extent[] = [];
  for (let i = 0; extents.length < count * 100; i++) {
    extents.push({ offset: i * 24 * KiB + (i % 3) * 4 * KiB, length: (1 + (i % 2)) * 4 * KiB });
  }
  return [...cutDescriptors(extents, { chunkSize: MiB })].slice(0, count);
}

function grantOf(disk: string, descriptor: Descriptor, over: Partial<Grant> = {}): Grant {
  return { set: 'plan-finance', cycleId: 'cycle-2024-06-01T00:00Z', disk, descriptor, attempt: 1, ...over };
}

/** `perDisk` grants for each named disk. */
function grantsFor(disks: readonly string[], perDisk: number): Grant[] {
  const ds = descriptorsOf(perDisk);
  return disks.flatMap((disk) => ds.map((d) => grantOf(disk, d)));
}

const keyOf = (g: Grant): string => `${g.disk}/${g.descriptor.seq}`;

/** Evenly spread extents of `length` bytes, `count` of them, inside one span starting at `offset`. */
function sparseDescriptor(offset: number, span: number, count: number, length: number): Descriptor {
  const stride = Math.floor(span / count);
  const extents = Array.from({ length: count }, (_, i) => ({ offset: offset + i * stride, length }));
  const last = extents[extents.length - 1]!;
  return { seq: 0, offset, length: last.offset + length - offset, extents, bytes: count * length };
}

// ---- the message format ----

describe('grant message', () => {
  it('round-trips a descriptor exactly, extents in absolute offsets', () => {
    // Prepare
    const grant = grantOf('vm-db/scsi0:1', descriptorsOf(3)[2]!, { attempt: 3 });
    // Act
    const body = encodeCycleGrant(grant);
    // Assess
    expect(decodeCycleGrant(body)).toEqual(grant);
    expect(JSON.parse(body)).toMatchObject({ version: 2, disk: 'vm-db/scsi0:1', seq: 2 });
  });

  it('keeps the worst-case grants under the message limit, and ten of them under the batch limit', () => {
    // Prepare: a sparse case, Azure's every-other-page case, and the largest the schema allows
    // (1024 extents over a 64 MiB chunk, every name at its longest in 3-byte UTF-8 characters).
    const longName = '€'.repeat(MAX_GRANT_NAME_LENGTH);
    const cases: Grant[] = [
      grantOf('d', sparseDescriptor(7 * 1024 * MiB, MiB, 256, 4 * KiB)),
      grantOf('d', sparseDescriptor(2 ** 40, MiB, 512, 512)),
      {
        set: longName,
        cycleId: longName,
        disk: longName,
        descriptor: sparseDescriptor(2 ** 44, 64 * MiB, MAX_GRANT_EXTENTS, 32 * KiB + 512),
        attempt: 1_000_000,
        repair: true,
      },
    ];
    for (const grant of cases) {
      // Act
      const size = Buffer.byteLength(encodeCycleGrant(grant), 'utf8');
      // Assess
      expect(size).toBeLessThanOrEqual(MAX_GRANT_MESSAGE_BYTES);
      expect(size * SQS_MAX_BATCH_ENTRIES).toBeLessThanOrEqual(SQS_BATCH_LIMIT_BYTES);
    }
    expect(Buffer.byteLength(encodeCycleGrant(cases[0]!), 'utf8')).toBeLessThan(8 * KiB);
  });

  it('refuses to encode a grant with more extents than a reader accepts', () => {
    const grant = grantOf('vm-7', { ...sparseDescriptor(0, 4 * MiB, MAX_GRANT_EXTENTS + 1, 512), seq: 9 });
    expect(() => encodeCycleGrant(grant)).toThrow(/disk vm-7 seq 9: extents/);
  });

  const valid = JSON.parse(
    encodeCycleGrant(grantOf('vm-bad', { ...sparseDescriptor(MiB, MiB, 4, 4 * KiB), seq: 7 })),
  );
  it.each([
    ['extents past the span', { extents: [0, 4096, MiB - 4096, 8192] }, /runs past the descriptor span/],
    ['extents out of order', { extents: [8192, 4096, 0, 4096], bytes: 8192 }, /overlaps or precedes/],
    ['overlapping extents', { extents: [0, 8192, 4096, 4096], bytes: 12288 }, /overlaps or precedes/],
    ['an empty extent', { extents: [0, 0, 4096, 4096], bytes: 4096 }, /extent 0 is empty/],
    [
      'bytes that are not the sum',
      { bytes: 4 * 4096 + 1 },
      /bytes 16385 is not the sum of its extents \(16384\)/,
    ],
    ['an odd extents array', { extents: [0, 4096, 8192] }, /\[start, length\] pairs/],
    ['an unknown field', { priority: 'high' }, /priority/],
    ['a negative offset', { offset: -512 }, /offset/],
    ['a newer version', { version: 3 }, /version 3 is not supported/],
    ['the lease-based version 1', { version: 1 }, /version 1 is not supported/],
  ])('refuses a grant with %s, naming disk and seq', (_what, change, why) => {
    // Act
    const decode = () => decodeCycleGrant(JSON.stringify({ ...valid, ...change }));
    // Assess
    expect(decode).toThrow(GrantMessageError);
    expect(decode).toThrow(/grant for disk vm-bad seq 7: /);
    expect(decode).toThrow(why);
  });

  it('refuses a body that is not JSON, saying it cannot name the grant', () => {
    expect(() => decodeCycleGrant('{"disk": "vm-1", ')).toThrow(
      'grant for disk (unknown) seq (unknown): body is not JSON',
    );
  });
});

// ---- against fauxqs ----

describe('GrantQueue on fauxqs', () => {
  let sqs: Fauxqs;
  let queues = 0;

  beforeAll(async () => {
    sqs = await startSqsEmulator();
  });
  afterAll(async () => {
    await sqs.stop();
  });

  /** A fresh queue and DLQ per test, so tests cannot see each other's messages. */
  async function freshQueue(opts: { maxReceiveCount?: number; visibilitySeconds?: number } = {}) {
    const created = await createGrantQueue(sqs.client, { name: `grants-${++queues}`, ...opts });
    return {
      ...created,
      queue: new GrantQueue(sqs.client, created.queueUrl),
      dlq: new GrantQueue(sqs.client, created.dlqUrl),
    };
  }

  /** Sends grants through the queue, all of them or the test fails. */
  async function send(queue: GrantQueue, grants: readonly Grant[]): Promise<void> {
    const out = await queue.sendBodies(grants.map((grant) => ({ grant, body: encodeCycleGrant(grant) })));
    expect(out).toEqual({ unsent: [] });
  }

  interface Received {
    readonly grant: Grant;
    readonly receipt: string;
    readonly messageId: string;
    readonly receiveCount: number;
  }

  /** One ReceiveMessage as the event source mapping does it, each body decoded as the writer does. */
  async function receive(queueUrl: string, waitSeconds: number, visibilitySeconds?: number) {
    const out = await sqs.client.send(
      new ReceiveMessageCommand({
        QueueUrl: queueUrl,
        MaxNumberOfMessages: 10,
        WaitTimeSeconds: waitSeconds,
        VisibilityTimeout: visibilitySeconds,
        MessageSystemAttributeNames: ['ApproximateReceiveCount'],
      }),
    );
    const grants: Received[] = [];
    const malformed: { messageId: string; receipt: string; error: GrantMessageError }[] = [];
    for (const m of out.Messages ?? []) {
      const at = { receipt: m.ReceiptHandle!, messageId: m.MessageId! };
      try {
        const receiveCount = Number(m.Attributes?.ApproximateReceiveCount ?? 1);
        grants.push({ ...at, grant: decodeCycleGrant(m.Body ?? ''), receiveCount });
      } catch (err) {
        malformed.push({ ...at, error: err as GrantMessageError });
      }
    }
    return { grants, malformed };
  }

  /** Receives until `count` messages arrived (grants and malformed ones); bounded, never spins. */
  async function receiveAll(queueUrl: string, count: number) {
    const grants: Received[] = [];
    const malformed: Awaited<ReturnType<typeof receive>>['malformed'] = [];
    for (let polls = 0; grants.length + malformed.length < count && polls < 100; polls++) {
      const r = await receive(queueUrl, 2);
      grants.push(...r.grants);
      malformed.push(...r.malformed);
    }
    return { grants, malformed };
  }

  it('delivers 250 grants sent in batches of 10: exactly the same set, each once', async () => {
    // Prepare
    const { queue, queueUrl } = await freshQueue({ visibilitySeconds: 60 });
    const sent = grantsFor(['vm-a/disk0', 'vm-a/disk1', 'vm-b/disk0', 'vm-c/disk0', 'vm-c/disk1'], 50);
    expect(sent).toHaveLength(250);
    // Act
    await send(queue, sent);
    const { grants, malformed } = await receiveAll(queueUrl, 250);
    const failures = await queue.completeAll(grants.map((g) => g.receipt));
    // Assess
    expect(malformed).toEqual([]);
    expect(failures).toEqual([]);
    const byKey = new Map(grants.map((g) => [keyOf(g.grant), g.grant]));
    expect(byKey.size).toBe(250);
    expect(new Set(grants.map((g) => g.messageId)).size).toBe(250);
    for (const g of sent) expect(byKey.get(keyOf(g))).toEqual(g);
    expect((await receive(queueUrl, 0)).grants).toEqual([]);
    expect(await queue.depth()).toEqual({ visible: 0, inFlight: 0, delayed: 0 });
  });

  it('keeps an extended grant from redelivery while a slow writer holds it', async () => {
    // Prepare
    const { queue, queueUrl } = await freshQueue({ visibilitySeconds: 1 });
    await send(queue, grantsFor(['vm-slow'], 1));
    const held = (await receive(queueUrl, 5)).grants[0]!;
    // Act: extend well past the 1 s visibility, then let another writer poll beyond it.
    await queue.extendVisibility(held.receipt, 30);
    const other = await receive(queueUrl, 2);
    // Assess
    expect(other.grants).toEqual([]);
    expect(await queue.depth()).toMatchObject({ visible: 0, inFlight: 1 });
    await queue.complete(held.receipt);
    // A completed grant's receipt holds nothing any more: extending it says it is lost.
    await expect(queue.extendVisibility(held.receipt, 30)).rejects.toBeInstanceOf(GrantLeaseLostError);
  });

  it('redelivers a handed-back grant at once', async () => {
    // Prepare
    const { queue, queueUrl } = await freshQueue({ visibilitySeconds: 60 });
    const [grant] = grantsFor(['vm-rel'], 1);
    await send(queue, [grant!]);
    const first = (await receive(queueUrl, 5)).grants[0]!;
    // Act
    await queue.release(first.receipt);
    const again = (await receive(queueUrl, 5)).grants[0]!;
    // Assess: with a 60 s visibility, only the hand-back can have brought it back this soon.
    expect(again.grant).toEqual(grant);
    expect(again.receiveCount).toBe(2);
    expect(again.receipt).not.toBe(first.receipt);
    await queue.release(first.receipt); // a stale receipt: nothing to give back, and no error
    await queue.complete(again.receipt);
  });

  it("brings back a crashed writer's grant after its visibility lapses, then sends it to the DLQ", async () => {
    // Prepare
    const { queue, queueUrl, dlqUrl } = await freshQueue({ visibilitySeconds: 1, maxReceiveCount: 2 });
    const [grant] = grantsFor(['vm-crash'], 1);
    await send(queue, [grant!]);
    // Act: two writers receive it and die without acknowledging or handing it back.
    const first = (await receive(queueUrl, 5)).grants[0]!;
    const second = (await receiveAll(queueUrl, 1)).grants[0]!;
    // The third reception exceeds maxReceiveCount: SQS moves the grant to the DLQ instead of delivering it.
    const third = await receive(queueUrl, 5);
    const dead = (await receiveAll(dlqUrl, 1)).grants[0]!;
    // Assess
    expect(first.receiveCount).toBe(1);
    expect(second.grant).toEqual(grant);
    expect(second.receiveCount).toBe(2);
    expect(third.grants).toEqual([]);
    expect(dead.grant).toEqual(grant);
    expect(dead.messageId).toBe(first.messageId);
  });

  it('leaves malformed messages, decoded apart from the good grants of the same batch, to the DLQ', async () => {
    // Prepare
    const { queue, queueUrl, dlqUrl } = await freshQueue({ visibilitySeconds: 1, maxReceiveCount: 1 });
    const good = grantsFor(['vm-ok'], 2);
    const bad = JSON.parse(encodeCycleGrant(grantOf('vm-bad', { ...descriptorsOf(8)[7]!, seq: 7 })));
    bad.bytes += 4096;
    const bodies = [
      'not a grant',
      JSON.stringify(bad),
      encodeCycleGrant(good[0]!),
      '{}',
      encodeCycleGrant(good[1]!),
    ];
    for (const body of bodies)
      await sqs.client.send(new SendMessageCommand({ QueueUrl: queueUrl, MessageBody: body }));
    // Act
    const { grants, malformed } = await receiveAll(queueUrl, bodies.length);
    await queue.completeAll(grants.map((g) => g.receipt));
    // Assess
    expect(grants.map((g) => g.grant).sort((a, b) => keyOf(a).localeCompare(keyOf(b)))).toEqual(good);
    expect(malformed).toHaveLength(3);
    for (const m of malformed) expect(m.error).toBeInstanceOf(GrantMessageError);
    const reasons = malformed.map((m) => m.error.message).sort();
    expect(reasons).toEqual([
      'grant for disk (unknown) seq (unknown): body is not JSON',
      expect.stringMatching(/^grant for disk \(unknown\) seq \(unknown\): version: /),
      expect.stringMatching(/^grant for disk vm-bad seq 7: bytes \d+ is not the sum of its extents/),
    ]);
    expect(malformed.find((m) => m.error.disk === 'vm-bad')?.error.seq).toBe(7);
    // Not acknowledged, not handed back: after one reception they go to the DLQ, where an operator finds them.
    expect((await receive(queueUrl, 5)).grants).toEqual([]);
    const dead = await receiveAll(dlqUrl, 3);
    expect(dead.grants).toEqual([]);
    expect(dead.malformed.map((m) => m.messageId).sort()).toEqual(malformed.map((m) => m.messageId).sort());
  });

  it('carries ten worst-case grants in one batch', async () => {
    // Prepare
    const { queue, queueUrl } = await freshQueue({ visibilitySeconds: 60 });
    const sent = Array.from({ length: 10 }, (_, i) =>
      grantOf(`vm-sparse-${i}`, sparseDescriptor(i * 64 * MiB, MiB, 256, 4 * KiB)),
    );
    // Act
    await send(queue, sent);
    const { grants } = await receiveAll(queueUrl, 10);
    // Assess
    expect(grants.map((g) => g.grant).sort((a, b) => a.disk.localeCompare(b.disk))).toEqual(sent);
    expect(await queue.completeAll(grants.map((g) => g.receipt))).toEqual([]);
  });
});

// ---- against an SDK mock ----

describe('GrantQueue error handling (SDK mock)', () => {
  const queueUrl = 'https://sqs.eu-west-1.amazonaws.com/123456789012/ferry-grants';

  /** A queue on a mocked client; `sleeps` counts backoffs, which are instant here. */
  function mocked() {
    const client = new SQSClient({
      region: 'eu-west-1',
      credentials: { accessKeyId: 'test', secretAccessKey: 'test' },
    });
    const mock = mockClient(client);
    const sleeps: number[] = [];
    const queue = new GrantQueue(client, queueUrl, {
      sleep: async (ms) => {
        sleeps.push(ms);
      },
      entryAttempts: 3,
    });
    return { mock, queue, sleeps };
  }

  it('retries only the deletions that failed server-side, and reports the ones SQS refused', async () => {
    // Prepare
    const { mock, queue, sleeps } = mocked();
    const receipts = Array.from({ length: 12 }, (_, i) => `receipt-${i}`);
    mock
      .on(DeleteMessageBatchCommand)
      .resolvesOnce({
        Successful: [],
        Failed: [
          { Id: 'r3', SenderFault: false, Code: 'InternalError' },
          { Id: 'r7', SenderFault: true, Code: 'ReceiptHandleIsInvalid', Message: 'gone' },
        ],
      })
      .resolves({ Successful: [], Failed: [] });
    // Act
    const failures = await queue.completeAll(receipts);
    // Assess: batch of 10, retry of its one server-side failure, then the last 2.
    const calls = mock.commandCalls(DeleteMessageBatchCommand).map((c) => c.args[0].input.Entries ?? []);
    expect(calls.map((entries) => entries.map((e) => e.ReceiptHandle))).toEqual([
      receipts.slice(0, 10),
      ['receipt-3'],
      receipts.slice(10),
    ]);
    expect(failures).toEqual([{ receipt: 'receipt-7', code: 'ReceiptHandleIsInvalid', message: 'gone' }]);
    expect(sleeps).toHaveLength(1);
    mock.restore();
  });

  it('turns throttling and 5xx into retryable, throttled TransferErrors', async () => {
    // Prepare
    const { mock, queue } = mocked();
    mock
      .on(GetQueueAttributesCommand)
      .rejectsOnce(new RequestThrottled({ message: 'Rate exceeded', $metadata: { httpStatusCode: 403 } }))
      .rejectsOnce(
        new SQSServiceException({
          name: 'InternalError',
          $fault: 'server',
          message: 'We encountered an internal error',
          $metadata: { httpStatusCode: 500 },
        }),
      );
    // Act
    const throttled = await queue.depth().catch((e: unknown) => e);
    const serverError = await queue.depth().catch((e: unknown) => e);
    // Assess
    for (const err of [throttled, serverError]) {
      expect(err).toBeInstanceOf(TransferError);
      expect(err).toMatchObject({ retryable: true, throttled: true });
    }
    expect((throttled as Error).message).toMatch(/throttled \(RequestThrottled\)/);
    mock.restore();
  });

  it('turns a missing queue or denied access into a permanent error naming the queue', async () => {
    // Prepare
    const { mock, queue } = mocked();
    mock
      .on(GetQueueAttributesCommand)
      .rejectsOnce(new QueueDoesNotExist({ message: 'The specified queue does not exist.', $metadata: {} }))
      .rejectsOnce(
        new SQSServiceException({
          name: 'AccessDeniedException',
          $fault: 'client',
          message: 'not authorized to perform: sqs:getqueueattributes',
          $metadata: { httpStatusCode: 400 },
        }),
      );
    // Act
    const missing = await queue.depth().catch((e: unknown) => e);
    const denied = await queue.depth().catch((e: unknown) => e);
    // Assess
    for (const err of [missing, denied]) {
      expect(err).toBeInstanceOf(TransferError);
      expect(err).toMatchObject({ retryable: false, throttled: false });
      expect((err as Error).message).toContain(queueUrl);
    }
    expect((missing as Error).message).toMatch(/does not exist/);
    expect((denied as Error).message).toMatch(/access denied/);
    mock.restore();
  });
});
