// The local SQS event source mapping: what Lambda's poller does for the chunk-writer in the cloud.
// Pollers long-poll the grant queue, hand each batch to the function as an SQS event, and delete
// what succeeded: with ReportBatchItemFailures everything but the reported items, without it all or
// nothing. An invocation that failed, died or timed out deletes nothing: its messages come back
// after the queue's visibility timeout. Faults (duplicate deliveries, killed invocations) are
// injected here, at the seam where they happen in the cloud.
import { createHash } from 'node:crypto';
import {
  DeleteMessageBatchCommand,
  type Message,
  ReceiveMessageCommand,
  SendMessageCommand,
  type SQSClient,
} from '@aws-sdk/client-sqs';
import type { SQSBatchResponse, SQSEvent, SQSRecord } from 'aws-lambda';
import { FAKE } from './asl.ts';
import type { InvocationResult, KillSwitch } from './lambda.ts';

/** Faults of the writer path, for tests and for watching recovery. */
export interface WriterFaults {
  /**
   * Kill these invocations (1-based, in the order the pollers start them) after `afterPutBlocks`
   * PutSnapshotBlock calls: they freeze mid-batch, answer nothing, and their leases expire.
   */
  readonly kill?: { readonly invocations: readonly number[]; readonly afterPutBlocks: number };
  /** Deliver every grant twice: the first time a message body is received, a copy is sent. */
  readonly duplicateDeliveries?: boolean;
  /** Called before each invocation (n is 1-based): e.g. to queue throttling in the EBS emulator. */
  readonly beforeInvoke?: (n: number) => void;
}

export interface WriterBatchReport {
  /** 1-based invocation number. */
  readonly n: number;
  readonly records: number;
  /** Records left to SQS: reported failures, or the whole batch of a failed or dead invocation. */
  readonly notDeleted: number;
  readonly outcome: InvocationResult['status'];
  readonly ms: number;
  /** The error of a failed invocation. */
  readonly error?: string;
}

export interface EventSourceOptions {
  /** The mapping's own client (not the function's). */
  readonly sqs: SQSClient;
  readonly queueUrl: string;
  readonly batchSize: number;
  readonly reportBatchItemFailures: boolean;
  /** Pollers, each running one invocation at a time (the mapping's maximum concurrency). */
  readonly concurrency: number;
  /** Long-poll wait per ReceiveMessage; short, so a stop is noticed quickly. */
  readonly waitTimeSeconds?: number;
  readonly invoke: (event: SQSEvent, kill: KillSwitch | undefined) => Promise<InvocationResult>;
  readonly faults?: WriterFaults;
  readonly onBatch?: (report: WriterBatchReport) => void;
}

export interface EventSourceStats {
  invocations: number;
  records: number;
  notDeleted: number;
  killed: number;
  failed: number;
  duplicatesSent: number;
}

function sqsRecord(m: Message, queueUrl: string): SQSRecord {
  const now = String(Date.now());
  return {
    messageId: m.MessageId!,
    receiptHandle: m.ReceiptHandle!,
    body: m.Body!,
    attributes: {
      ApproximateReceiveCount: m.Attributes?.ApproximateReceiveCount ?? '1',
      SentTimestamp: m.Attributes?.SentTimestamp ?? now,
      SenderId: m.Attributes?.SenderId ?? 'AROALOCALFERRY',
      ApproximateFirstReceiveTimestamp: m.Attributes?.ApproximateFirstReceiveTimestamp ?? now,
    },
    messageAttributes: {},
    md5OfBody: m.MD5OfBody ?? createHash('md5').update(m.Body!).digest('hex'),
    eventSource: 'aws:sqs',
    eventSourceARN: `arn:aws:sqs:${FAKE.region}:${FAKE.account}:${queueUrl.split('/').at(-1)}`,
    awsRegion: FAKE.region,
  };
}

/** Which records to delete after an invocation, as the mapping decides it. */
function toDelete(event: SQSEvent, result: InvocationResult, reportBatchItemFailures: boolean): SQSRecord[] {
  if (result.status !== 'ok') return [];
  if (!reportBatchItemFailures) return event.Records;
  const answer = result.result as Partial<SQSBatchResponse> | null | undefined;
  const failures = answer?.batchItemFailures ?? [];
  const ids = new Set(event.Records.map((r) => r.messageId));
  // A failure naming no record of the batch makes Lambda treat the whole batch as failed.
  if (failures.some((f) => !ids.has(f.itemIdentifier))) return [];
  const failed = new Set(failures.map((f) => f.itemIdentifier));
  return event.Records.filter((r) => !failed.has(r.messageId));
}

export class LocalEventSource {
  readonly stats: EventSourceStats = {
    invocations: 0,
    records: 0,
    notDeleted: 0,
    killed: 0,
    failed: 0,
    duplicatesSent: 0,
  };
  private stopping = false;
  private pollers: Promise<void>[] = [];
  private readonly duplicated = new Set<string>();

  constructor(private readonly opts: EventSourceOptions) {}

  start(): void {
    if (this.pollers.length > 0) throw new Error('the event source is already polling');
    this.stopping = false;
    this.pollers = Array.from({ length: this.opts.concurrency }, () => this.poll());
  }

  /** Stops polling; resolves when every poller's current receive and invocation have ended. */
  async stop(): Promise<void> {
    this.stopping = true;
    await Promise.all(this.pollers);
    this.pollers = [];
  }

  private async poll(): Promise<void> {
    const { sqs, queueUrl } = this.opts;
    while (!this.stopping) {
      let messages: Message[];
      try {
        const out = await sqs.send(
          new ReceiveMessageCommand({
            QueueUrl: queueUrl,
            MaxNumberOfMessages: this.opts.batchSize,
            WaitTimeSeconds: this.opts.waitTimeSeconds ?? 1,
            MessageSystemAttributeNames: ['All'],
          }),
        );
        messages = out.Messages ?? [];
      } catch {
        // The mapping backs off and polls again; a stopped emulator ends the run anyway.
        if (!this.stopping) await new Promise((r) => setTimeout(r, 200));
        continue;
      }
      if (messages.length === 0) continue;
      // Received after a stop: left for the next run (their visibility timeout returns them).
      if (this.stopping) break;
      await this.deliver({ Records: messages.map((m) => sqsRecord(m, queueUrl)) });
    }
  }

  private async deliver(event: SQSEvent): Promise<void> {
    const { faults } = this.opts;
    const n = ++this.stats.invocations;
    this.stats.records += event.Records.length;
    if (faults?.duplicateDeliveries) await this.sendDuplicates(event);
    faults?.beforeInvoke?.(n);
    const kill = faults?.kill?.invocations.includes(n)
      ? { afterPutBlocks: faults.kill.afterPutBlocks }
      : undefined;
    const result = await this.opts.invoke(event, kill);
    const done = toDelete(event, result, this.opts.reportBatchItemFailures);
    await this.deleteMessages(done);
    const notDeleted = event.Records.length - done.length;
    this.stats.notDeleted += notDeleted;
    if (result.status === 'killed' || result.status === 'timeout') this.stats.killed++;
    if (result.status === 'error') this.stats.failed++;
    this.opts.onBatch?.({
      n,
      records: event.Records.length,
      notDeleted,
      outcome: result.status,
      ms: result.ms,
      ...(result.status === 'error'
        ? { error: String((result.error as Error)?.message ?? result.error) }
        : {}),
    });
  }

  private async sendDuplicates(event: SQSEvent): Promise<void> {
    for (const r of event.Records) {
      if (this.duplicated.has(r.body)) continue;
      this.duplicated.add(r.body);
      await this.opts.sqs.send(new SendMessageCommand({ QueueUrl: this.opts.queueUrl, MessageBody: r.body }));
      this.stats.duplicatesSent++;
    }
  }

  private async deleteMessages(records: readonly SQSRecord[]): Promise<void> {
    for (let i = 0; i < records.length; i += 10) {
      await this.opts.sqs.send(
        new DeleteMessageBatchCommand({
          QueueUrl: this.opts.queueUrl,
          Entries: records.slice(i, i + 10).map((r, k) => ({ Id: `m${k}`, ReceiptHandle: r.receiptHandle })),
        }),
      );
    }
  }
}
