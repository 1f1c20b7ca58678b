// The cycle's SQS grant channel: its contract suite on fauxqs, the version 2 message (strict; the
// lease-based version 1 is refused), and send failures an SDK mock can stage (partial batches,
// throttling, refusals).
import {
  ChangeMessageVisibilityCommand,
  ReceiptHandleIsInvalid,
  ReceiveMessageCommand,
  RequestThrottled,
  SendMessageBatchCommand,
  SQSClient,
} from '@aws-sdk/client-sqs';
import { mockClient } from 'aws-sdk-client-mock';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type Fauxqs, startSqsEmulator } from '../../local-cloud/emulators/fauxqs.ts';
import { SqsGrantChannel } from '../../shared/aws/sqs/grant-channel.ts';
import {
  decodeCycleGrant,
  encodeCycleGrant,
  GrantMessageError,
  MAX_GRANT_EXTENTS,
} from '../../shared/aws/sqs/grant-message.ts';
import { createGrantQueue, GrantSendError } from '../../shared/aws/sqs/grant-queue.ts';
import type { Grant, GrantRecord } from '../../shared/engine/cycle/ports.ts';
import { grantChannelContract, grantsOf } from '../contract/grant-channel.ts';

let sqs: Fauxqs;
let queues = 0;
beforeAll(async () => {
  sqs = await startSqsEmulator();
});
afterAll(async () => {
  await sqs?.stop();
});

grantChannelContract('sqs (fauxqs)', async () => {
  const { queueUrl } = await createGrantQueue(sqs.client, { name: `cycle-grants-${++queues}` });
  const channel = new SqsGrantChannel(sqs.client, queueUrl);
  return {
    channel,
    async receiveAll() {
      // A short poll may answer fewer than are waiting: poll until one comes back empty.
      const out: GrantRecord[] = [];
      for (;;) {
        const got = await sqs.client.send(
          new ReceiveMessageCommand({ QueueUrl: queueUrl, MaxNumberOfMessages: 10, WaitTimeSeconds: 0 }),
        );
        const messages = got.Messages ?? [];
        if (messages.length === 0) return out;
        for (const m of messages) {
          out.push({ messageId: m.MessageId!, receiptHandle: m.ReceiptHandle!, body: m.Body! });
        }
      }
    },
  };
});

const keyOf = (g: Grant): string => `${g.disk}/${g.descriptor.seq}`;

describe('cycle grant message (version 2)', () => {
  it('round-trips a grant, re-grant attempt and repair flag included, without lease fields', () => {
    const [plain, , , , repair] = grantsOf(5);
    for (const grant of [plain!, repair!]) {
      const body = encodeCycleGrant(grant);
      expect(decodeCycleGrant(body)).toEqual(grant);
      expect(JSON.parse(body)).not.toHaveProperty('leaseId');
    }
    expect(JSON.parse(encodeCycleGrant(repair!))).toMatchObject({ version: 2, repair: true });
    expect(JSON.parse(encodeCycleGrant(plain!))).not.toHaveProperty('repair');
    expect(decodeCycleGrant(encodeCycleGrant({ ...plain!, repair: false }))).toEqual(plain);
  });

  const valid = JSON.parse(encodeCycleGrant(grantsOf(1)[0]!)) as Record<string, unknown>;
  it.each([
    ['an unknown field', { priority: 'high' }, /priority/],
    ['a lease field of version 1', { leaseId: 'lease-1' }, /leaseId/],
    ['repair false (only true is sent)', { repair: false }, /repair/],
    ['attempt 0', { attempt: 0 }, /attempt/],
    ['a missing disk', { disk: undefined }, /disk/],
    [
      'extents past the span',
      { extents: [0, 524288, 2 * 524288, 2 * 524288] },
      /runs past the descriptor span/,
    ],
    ['version 1', { version: 1 }, /version 1 is not supported \(this reader knows 2\)/],
  ])('refuses %s', (_what, patch, message) => {
    const body = JSON.stringify({ ...valid, ...patch });
    expect(() => decodeCycleGrant(body)).toThrow(GrantMessageError);
    expect(() => decodeCycleGrant(body)).toThrow(message);
  });

  it('refuses to encode what a reader would refuse', () => {
    const [g] = grantsOf(1);
    const extents = Array.from({ length: MAX_GRANT_EXTENTS + 1 }, (_, i) => ({
      offset: i * 1024,
      length: 512,
    }));
    const dense = {
      ...g!,
      descriptor: { seq: 3, offset: 0, length: extents.length * 1024, extents, bytes: extents.length * 512 },
    };
    expect(() => encodeCycleGrant(dense)).toThrow(/seq 3: extents/);
    expect(() => encodeCycleGrant({ ...g!, attempt: 0 })).toThrow(GrantMessageError);
  });
});

describe('SqsGrantChannel failures (SDK mock)', () => {
  const queueUrl = 'https://sqs.eu-west-1.amazonaws.com/123456789012/ferry-cycle-grants';

  function mocked() {
    const client = new SQSClient({
      region: 'eu-west-1',
      credentials: { accessKeyId: 'test', secretAccessKey: 'test' },
    });
    const mock = mockClient(client);
    const channel = new SqsGrantChannel(client, queueUrl, { sleep: async () => {}, entryAttempts: 3 });
    return { mock, channel };
  }
  const ok = (entries: { Id?: string | undefined }[] | undefined) => ({
    Successful: (entries ?? []).map((e) => ({ Id: e.Id, MessageId: `m-${e.Id}`, MD5OfMessageBody: 'x' })),
    Failed: [],
  });

  it('sends 25 grants in three batches and retries only the entries that failed server-side', async () => {
    const { mock, channel } = mocked();
    const grants = grantsOf(25);
    mock
      .on(SendMessageBatchCommand)
      .resolvesOnce({ Successful: [], Failed: [{ Id: 'g2', SenderFault: false, Code: 'InternalError' }] })
      .callsFake((input) => ok(input.Entries));

    const out = await channel.send(grants);

    expect(out.unsent).toEqual([]);
    const calls = mock.commandCalls(SendMessageBatchCommand).map((c) => c.args[0].input.Entries ?? []);
    expect(calls.map((e) => e.length)).toEqual([10, 1, 10, 5]);
    expect(calls[1]![0]!.MessageBody).toBe(encodeCycleGrant(grants[2]!));
    mock.restore();
  });

  it('reports what a throttled SQS did not take as unsent, without throwing', async () => {
    const { mock, channel } = mocked();
    const grants = grantsOf(25);
    mock
      .on(SendMessageBatchCommand)
      .callsFakeOnce((input) => ok(input.Entries))
      .rejects(new RequestThrottled({ message: 'Rate exceeded', $metadata: {} }));

    const out = await channel.send(grants);

    expect(out.unsent.map(keyOf)).toEqual(grants.slice(10).map(keyOf));
  });

  it('reports entries still failing after the retries as unsent', async () => {
    const { mock, channel } = mocked();
    const grants = grantsOf(3);
    mock.on(SendMessageBatchCommand).resolves({
      Successful: [],
      Failed: [{ Id: 'g1', SenderFault: false, Code: 'InternalError' }],
    });

    const out = await channel.send(grants);

    expect(out.unsent.map(keyOf)).toEqual([keyOf(grants[1]!)]);
    expect(mock.commandCalls(SendMessageBatchCommand)).toHaveLength(3);
  });

  it('rejects a refusal no re-grant can cure, listing what was not sent', async () => {
    const { mock, channel } = mocked();
    const grants = grantsOf(12);
    mock.on(SendMessageBatchCommand).resolvesOnce({
      Successful: [],
      Failed: [{ Id: 'g4', SenderFault: true, Code: 'InvalidMessageContents' }],
    });

    const err = (await channel.send(grants).catch((e: unknown) => e)) as GrantSendError<Grant>;

    expect(err).toBeInstanceOf(GrantSendError);
    expect(err.retryable).toBe(false);
    expect(err.unsent.map(keyOf)).toEqual([grants[4]!, grants[10]!, grants[11]!].map(keyOf));
  });

  it('hands back with visibility 0 and accepts a receipt that no longer holds the message', async () => {
    const { mock, channel } = mocked();
    mock
      .on(ChangeMessageVisibilityCommand)
      .resolvesOnce({})
      .rejects(new ReceiptHandleIsInvalid({ message: 'gone', $metadata: {} }));

    await channel.handBack('receipt-1');
    await channel.handBack('receipt-2');

    const calls = mock.commandCalls(ChangeMessageVisibilityCommand).map((c) => c.args[0].input);
    expect(calls).toEqual([
      { QueueUrl: queueUrl, ReceiptHandle: 'receipt-1', VisibilityTimeout: 0 },
      { QueueUrl: queueUrl, ReceiptHandle: 'receipt-2', VisibilityTimeout: 0 },
    ]);
  });
});
