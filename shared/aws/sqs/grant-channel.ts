// The GrantChannel port on SQS: the cycle's grants (wire version 2, grant-message.ts) sent in batches
// of 10 on the grant queue; a writer decodes what its event source mapping delivers and hands back
// what it will not finish (visibility 0).
import type { SQSClient } from '@aws-sdk/client-sqs';
import type { Grant, GrantChannel } from '../../engine/cycle/ports.ts';
import { decodeCycleGrant, encodeCycleGrant } from './grant-message.ts';
import { GrantQueue, type GrantQueueOptions, GrantSendError } from './grant-queue.ts';

export class SqsGrantChannel implements GrantChannel {
  private readonly queue: GrantQueue;

  /** `client` is the caller's (created once per Lambda at module scope). */
  constructor(client: SQSClient, queueUrl: string, opts: GrantQueueOptions = {}) {
    this.queue = new GrantQueue(client, queueUrl, opts);
  }

  get queueUrl(): string {
    return this.queue.queueUrl;
  }

  /**
   * One SendMessageBatch per 10 grants; entries failing server-side are retried on their own a few
   * times. What SQS did not confirm after a retryable failure (throttling, 5xx, a dropped connection)
   * is returned as `unsent`, for the caller to grant again. A permanent failure (the queue is missing,
   * access is denied, SQS refuses an entry as the sender's fault) rejects with a GrantSendError listing
   * the unsent grants: granting them again cannot help, an operator must. A grant that cannot be
   * encoded rejects (GrantMessageError) before anything is sent.
   */
  async send(grants: readonly Grant[]): Promise<{ unsent: Grant[] }> {
    const bodies = grants.map((grant) => ({ grant, body: encodeCycleGrant(grant) }));
    const out = await this.queue.sendBodies(bodies);
    if (out.failure !== undefined && !out.failure.retryable) {
      throw new GrantSendError<Grant>(out.failure.message, { ...out.failure, unsent: out.unsent });
    }
    return { unsent: out.unsent };
  }

  /** Strict: another version, an unknown field or inconsistent extents throw a GrantMessageError. */
  decode(body: string): Grant {
    return decodeCycleGrant(body);
  }

  /** ChangeMessageVisibility 0; a receipt that no longer holds the message is fine (it is back anyway). */
  async handBack(receiptHandle: string): Promise<void> {
    await this.queue.release(receiptHandle);
  }
}
