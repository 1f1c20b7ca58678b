// The SQS grant channel against fauxqs (delivery, leases, DLQ) and an SDK mock (failures SQS rarely shows).
import {
  QueueDoesNotExist,
  ReceiveMessageCommand,
  RequestThrottled,
  SendMessageBatchCommand,
  SendMessageCommand,
  SQSClient,
  SQSServiceException,
} from '@aws-sdk/client-sqs';
import { mockClient } from 'aws-sdk-client-mock';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type Fauxqs, startSqsEmulator } from '../../local-cloud/emulators/fauxqs.ts';
import {
  decodeGrant,
  encodeGrant,
  type GrantMessage,
  GrantMessageError,
  MAX_GRANT_EXTENTS,
  MAX_GRANT_MESSAGE_BYTES,
  MAX_GRANT_NAME_LENGTH,
  SQS_BATCH_LIMIT_BYTES,
  SQS_MAX_BATCH_ENTRIES,
} from '../../shared/aws/sqs/grant-message.ts';
import {
  createGrantQueue,
  GrantLeaseLostError,
  GrantQueue,
  GrantSendError,
  type ReceivedGrant,
} from '../../shared/aws/sqs/grant-queue.ts';
import { cutDescriptors, type Descriptor } from '../../shared/engine/descriptors.ts';
import { AbortedError, TransferError } from '../../shared/engine/errors.ts';
import type { Extent } from '../../shared/engine/extents.ts';

const KiB = 1024;
const MiB = 1024 * KiB;

// ---- grant factories ----

/** A fragmented change map (4 KiB and 8 KiB extents with gaps) cut into 1 MiB descriptors, as the planner does. */
function descriptorsOf(count: number): Descriptor[] {
  const extents: Extent[] = [];
  for (let i = 0; extents.length < count * 100; i++) {
    extents.push({ offset: i * 24 * KiB + (i % 3) * 4 * KiB, length: (1 + (i % 2)) * 4 * KiB });
  }
  return [...cutDescriptors(extents, { chunkSize: MiB })].slice(0, count);
}

function grantOf(disk: string, descriptor: Descriptor, over: Partial<GrantMessage> = {}): GrantMessage {
  return {
    set: 'plan-finance',
    cycleId: 'cycle-2024-06-01T00:00Z',
    disk,
    descriptor,
    leaseId: `lease-${disk}-${descriptor.seq}`,
    leaseExpiresAt: 1_717_200_000_000 + descriptor.seq,
    attempt: 1,
    ...over,
  };
}

/** `perDisk` grants for each named disk. */
function grantsFor(disks: readonly string[], perDisk: number): GrantMessage[] {
  const ds = descriptorsOf(perDisk);
  return disks.flatMap((disk) => ds.map((d) => grantOf(disk, d)));
}

const keyOf = (g: GrantMessage): string => `${g.disk}/${g.descriptor.seq}`;

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
    const body = encodeGrant(grant);
    // Assess
    expect(decodeGrant(body)).toEqual(grant);
    expect(JSON.parse(body)).toMatchObject({ version: 1, disk: 'vm-db/scsi0:1', seq: 2 });
  });

  it('keeps the worst-case grants under the message limit, and ten of them under the batch limit', () => {
    // Prepare: the brief's sparse case, Azure's every-other-page case, and the largest the schema allows
    // (1024 extents over a 64 MiB chunk, every name at its longest in 3-byte UTF-8 characters).
    const longName = '€'.repeat(MAX_GRANT_NAME_LENGTH);
    const cases: GrantMessage[] = [
      grantOf('d', sparseDescriptor(7 * 1024 * MiB, MiB, 256, 4 * KiB)),
      grantOf('d', sparseDescriptor(2 ** 40, MiB, 512, 512)),
      {
        set: longName,
        cycleId: longName,
        disk: longName,
        leaseId: longName,
        descriptor: sparseDescriptor(2 ** 44, 64 * MiB, MAX_GRANT_EXTENTS, 32 * KiB + 512),
        leaseExpiresAt: Number.MAX_SAFE_INTEGER,
        attempt: 1_000_000,
      },
    ];
    for (const grant of cases) {
      // Act
      const size = Buffer.byteLength(encodeGrant(grant), 'utf8');
      // Assess
      expect(size).toBeLessThanOrEqual(MAX_GRANT_MESSAGE_BYTES);
      expect(size * SQS_MAX_BATCH_ENTRIES).toBeLessThanOrEqual(SQS_BATCH_LIMIT_BYTES);
    }
    expect(Buffer.byteLength(encodeGrant(cases[0]!), 'utf8')).toBeLessThan(8 * KiB);
  });

  it('refuses to encode a grant with more extents than a reader accepts', () => {
    const grant = grantOf('vm-7', { ...sparseDescriptor(0, 4 * MiB, MAX_GRANT_EXTENTS + 1, 512), seq: 9 });
    expect(() => encodeGrant(grant)).toThrow(/disk vm-7 seq 9: extents/);
  });

  const valid = JSON.parse(
    encodeGrant(grantOf('vm-bad', { ...sparseDescriptor(MiB, MiB, 4, 4 * KiB), seq: 7 })),
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
    ['a newer version', { version: 2 }, /version 2 is not supported/],
  ])('refuses a grant with %s, naming disk and seq', (_what, change, why) => {
    // Act
    const decode = () => decodeGrant(JSON.stringify({ ...valid, ...change }));
    // Assess
    expect(decode).toThrow(GrantMessageError);
    expect(decode).toThrow(/grant for disk vm-bad seq 7: /);
    expect(decode).toThrow(why);
  });

  it('refuses a body that is not JSON, saying it cannot name the grant', () => {
    expect(() => decodeGrant('{"disk": "vm-1", ')).toThrow(
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

  /** Receives until `count` grants arrived (or malformed messages, counted too); bounded, never spins. */
  async function receiveAll(queue: GrantQueue, count: number, visibilitySeconds?: number) {
    const grants: ReceivedGrant[] = [];
    const malformed: Awaited<ReturnType<GrantQueue['receive']>>['malformed'] = [];
    for (let polls = 0; grants.length + malformed.length < count && polls < 100; polls++) {
      const r = await queue.receive({ max: 10, waitSeconds: 2, visibilitySeconds });
      grants.push(...r.grants);
      malformed.push(...r.malformed);
    }
    return { grants, malformed };
  }

  it('delivers 250 grants sent in batches of 10: exactly the same set, each once', async () => {
    // Prepare
    const { queue } = await freshQueue({ visibilitySeconds: 60 });
    const sent = grantsFor(['vm-a/disk0', 'vm-a/disk1', 'vm-b/disk0', 'vm-c/disk0', 'vm-c/disk1'], 50);
    expect(sent).toHaveLength(250);
    // Act
    await queue.sendGrants(sent);
    const { grants, malformed } = await receiveAll(queue, 250);
    const failures = await queue.completeAll(grants.map((g) => g.receipt));
    // Assess
    expect(malformed).toEqual([]);
    expect(failures).toEqual([]);
    const byKey = new Map(grants.map((g) => [keyOf(g.grant), g.grant]));
    expect(byKey.size).toBe(250);
    expect(new Set(grants.map((g) => g.messageId)).size).toBe(250);
    for (const g of sent) expect(byKey.get(keyOf(g))).toEqual(g);
    expect((await queue.receive({ waitSeconds: 0 })).grants).toEqual([]);
    expect(await queue.depth()).toEqual({ visible: 0, inFlight: 0, delayed: 0 });
  });

  it('returns a waiting long poll as soon as a grant arrives', async () => {
    // Prepare
    const { queue } = await freshQueue();
    const grant = grantsFor(['vm-lp'], 1)[0]!;
    const polling = sqs.nextRequest('ReceiveMessage');
    // Act: the poll is on the server and the queue is empty when the grant is sent.
    const received = queue.receive({ waitSeconds: 20 });
    await polling;
    await queue.sendGrants([grant]);
    const { grants } = await received;
    // Assess
    expect(grants.map((g) => g.grant)).toEqual([grant]);
    expect(grants[0]!.receiveCount).toBe(1);
    await queue.complete(grants[0]!.receipt);
  });

  it('keeps an extended grant from redelivery while a slow writer holds it', async () => {
    // Prepare
    const { queue } = await freshQueue({ visibilitySeconds: 1 });
    await queue.sendGrants(grantsFor(['vm-slow'], 1));
    const held = (await queue.receive({ waitSeconds: 5 })).grants[0]!;
    // Act: extend well past the 1 s lease, then let another worker poll beyond it.
    await queue.extendVisibility(held.receipt, 30);
    const other = await queue.receive({ waitSeconds: 2 });
    // Assess
    expect(other.grants).toEqual([]);
    expect(await queue.depth()).toMatchObject({ visible: 0, inFlight: 1 });
    await queue.complete(held.receipt);
    // A completed grant's receipt holds nothing any more: extending it says the lease is lost.
    await expect(queue.extendVisibility(held.receipt, 30)).rejects.toBeInstanceOf(GrantLeaseLostError);
  });

  it('redelivers a released grant at once', async () => {
    // Prepare
    const { queue } = await freshQueue({ visibilitySeconds: 60 });
    const [grant] = grantsFor(['vm-rel'], 1);
    await queue.sendGrants([grant!]);
    const first = (await queue.receive({ waitSeconds: 5 })).grants[0]!;
    // Act
    await queue.release(first.receipt);
    const again = (await queue.receive({ waitSeconds: 5 })).grants[0]!;
    // Assess: with a 60 s lease, only the release can have brought it back this soon.
    expect(again.grant).toEqual(grant);
    expect(again.receiveCount).toBe(2);
    expect(again.receipt).not.toBe(first.receipt);
    await queue.release(first.receipt); // a stale receipt: nothing to give back, and no error
    await queue.complete(again.receipt);
  });

  it("brings back a crashed worker's grant after its visibility lapses, then sends it to the DLQ", async () => {
    // Prepare
    const { queue, dlq } = await freshQueue({ visibilitySeconds: 1, maxReceiveCount: 2 });
    const [grant] = grantsFor(['vm-crash'], 1);
    await queue.sendGrants([grant!]);
    // Act: two workers receive it and die without completing or releasing.
    const first = (await queue.receive({ waitSeconds: 5 })).grants[0]!;
    const second = (await receiveAll(queue, 1)).grants[0]!;
    // The third reception exceeds maxReceiveCount: SQS moves the grant to the DLQ instead of delivering it.
    const third = await queue.receive({ waitSeconds: 5 });
    const dead = (await receiveAll(dlq, 1)).grants[0]!;
    // Assess
    expect(first.receiveCount).toBe(1);
    expect(second.grant).toEqual(grant);
    expect(second.receiveCount).toBe(2);
    expect(third.grants).toEqual([]);
    expect(dead.grant).toEqual(grant);
    expect(dead.messageId).toBe(first.messageId);
    await dlq.complete(dead.receipt);
  });

  it('reports malformed messages apart from the good grants of the same batch, and leaves them to the DLQ', async () => {
    // Prepare
    const { queue, dlq, queueUrl } = await freshQueue({ visibilitySeconds: 1, maxReceiveCount: 1 });
    const good = grantsFor(['vm-ok'], 2);
    const bad = JSON.parse(encodeGrant(grantOf('vm-bad', { ...descriptorsOf(8)[7]!, seq: 7 })));
    bad.bytes += 4096;
    const bodies = ['not a grant', JSON.stringify(bad), encodeGrant(good[0]!), '{}', encodeGrant(good[1]!)];
    for (const body of bodies)
      await sqs.client.send(new SendMessageCommand({ QueueUrl: queueUrl, MessageBody: body }));
    // Act
    const { grants, malformed } = await receiveAll(queue, bodies.length);
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
    // Not completed, not released: after one reception they go to the DLQ, where an operator finds them.
    expect((await queue.receive({ waitSeconds: 5 })).grants).toEqual([]);
    const dead = await receiveAll(dlq, 3);
    expect(dead.grants).toEqual([]);
    expect(dead.malformed.map((m) => m.messageId).sort()).toEqual(malformed.map((m) => m.messageId).sort());
  });

  it('carries ten worst-case grants in one batch', async () => {
    // Prepare
    const { queue } = await freshQueue({ visibilitySeconds: 60 });
    const sent = Array.from({ length: 10 }, (_, i) =>
      grantOf(`vm-sparse-${i}`, sparseDescriptor(i * 64 * MiB, MiB, 256, 4 * KiB)),
    );
    // Act
    await queue.sendGrants(sent);
    const { grants } = await receiveAll(queue, 10);
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

  const ok = (entries: { Id?: string | undefined }[] | undefined) => ({
    Successful: (entries ?? []).map((e) => ({ Id: e.Id, MessageId: `m-${e.Id}`, MD5OfMessageBody: 'x' })),
    Failed: [],
  });

  it('retries only the entries of a partially failed batch', async () => {
    // Prepare
    const { mock, queue, sleeps } = mocked();
    const grants = grantsFor(['vm-p'], 12);
    mock
      .on(SendMessageBatchCommand)
      .resolvesOnce({
        Successful: [],
        Failed: [
          { Id: 'g3', SenderFault: false, Code: 'InternalError' },
          { Id: 'g7', SenderFault: false, Code: 'ServiceUnavailable' },
        ],
      })
      .callsFake((input) => ok(input.Entries));
    // Act
    await queue.sendGrants(grants);
    // Assess: batch of 10, retry of its 2 failures, then the last 2.
    const calls = mock.commandCalls(SendMessageBatchCommand).map((c) => c.args[0].input.Entries ?? []);
    expect(calls.map((entries) => entries.length)).toEqual([10, 2, 2]);
    expect(calls[1]!.map((e) => e.MessageBody)).toEqual([encodeGrant(grants[3]!), encodeGrant(grants[7]!)]);
    expect(calls[2]!.map((e) => e.MessageBody)).toEqual([encodeGrant(grants[10]!), encodeGrant(grants[11]!)]);
    expect(sleeps).toHaveLength(1);
    mock.restore();
  });

  it('does not retry an entry SQS refused as the sender’s fault, and lists what was not sent', async () => {
    // Prepare
    const { mock, queue, sleeps } = mocked();
    const grants = grantsFor(['vm-s'], 12);
    mock.on(SendMessageBatchCommand).resolvesOnce({
      Successful: [],
      Failed: [{ Id: 'g4', SenderFault: true, Code: 'InvalidMessageContents' }],
    });
    // Act
    const err = await queue.sendGrants(grants).catch((e: unknown) => e);
    // Assess
    expect(err).toBeInstanceOf(GrantSendError);
    const e = err as GrantSendError;
    expect(e.retryable).toBe(false);
    expect(e.message).toMatch(/refused by SQS \(InvalidMessageContents\), first disk vm-s seq 4/);
    expect(e.unsent.map(keyOf)).toEqual([grants[4]!, grants[10]!, grants[11]!].map(keyOf));
    expect(mock.commandCalls(SendMessageBatchCommand)).toHaveLength(1);
    expect(sleeps).toEqual([]);
    mock.restore();
  });

  it('gives up on an entry that keeps failing server-side with a retryable error', async () => {
    const { mock, queue } = mocked();
    const grants = grantsFor(['vm-r'], 3);
    mock.on(SendMessageBatchCommand).resolves({
      Successful: [],
      Failed: [{ Id: 'g1', SenderFault: false, Code: 'InternalError' }],
    });
    const err = (await queue.sendGrants(grants).catch((e: unknown) => e)) as GrantSendError;
    expect(err).toBeInstanceOf(GrantSendError);
    expect(err.retryable).toBe(true);
    expect(err.unsent.map(keyOf)).toEqual([keyOf(grants[1]!)]);
    expect(mock.commandCalls(SendMessageBatchCommand)).toHaveLength(3);
    mock.restore();
  });

  it('turns throttling and 5xx into retryable, throttled TransferErrors', async () => {
    // Prepare
    const { mock, queue } = mocked();
    const grants = grantsFor(['vm-t'], 2);
    mock
      .on(ReceiveMessageCommand)
      .rejectsOnce(new RequestThrottled({ message: 'Rate exceeded', $metadata: { httpStatusCode: 403 } }))
      .rejectsOnce(
        new SQSServiceException({
          name: 'InternalError',
          $fault: 'server',
          message: 'We encountered an internal error',
          $metadata: { httpStatusCode: 500 },
        }),
      );
    mock
      .on(SendMessageBatchCommand)
      .rejects(new RequestThrottled({ message: 'Rate exceeded', $metadata: { httpStatusCode: 403 } }));
    // Act
    const throttled = await queue.receive().catch((e: unknown) => e);
    const serverError = await queue.receive().catch((e: unknown) => e);
    const sendThrottled = await queue.sendGrants(grants).catch((e: unknown) => e);
    // Assess
    for (const err of [throttled, serverError, sendThrottled]) {
      expect(err).toBeInstanceOf(TransferError);
      expect(err).toMatchObject({ retryable: true, throttled: true });
    }
    expect((throttled as Error).message).toMatch(/throttled \(RequestThrottled\)/);
    expect((sendThrottled as GrantSendError).unsent).toEqual(grants);
    mock.restore();
  });

  it('turns a missing queue or denied access into a permanent error naming the queue', async () => {
    // Prepare
    const { mock, queue } = mocked();
    mock
      .on(ReceiveMessageCommand)
      .rejectsOnce(new QueueDoesNotExist({ message: 'The specified queue does not exist.', $metadata: {} }))
      .rejectsOnce(
        new SQSServiceException({
          name: 'AccessDeniedException',
          $fault: 'client',
          message: 'not authorized to perform: sqs:receivemessage',
          $metadata: { httpStatusCode: 400 },
        }),
      );
    // Act
    const missing = await queue.receive().catch((e: unknown) => e);
    const denied = await queue.receive().catch((e: unknown) => e);
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

  it('stops at an aborted signal before calling SQS', async () => {
    const { mock, queue } = mocked();
    const abort = new AbortController();
    abort.abort();
    await expect(queue.receive({ signal: abort.signal })).rejects.toBeInstanceOf(AbortedError);
    expect(mock.commandCalls(ReceiveMessageCommand)).toHaveLength(0);
    mock.restore();
  });
});
