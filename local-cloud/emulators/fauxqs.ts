// Test helper: an in-process fauxqs (SQS emulator) on loopback, and an SQSClient pointed at it.
import { SQSClient } from '@aws-sdk/client-sqs';
import { buildApp } from 'fauxqs';

export interface Fauxqs {
  /** http://127.0.0.1:PORT */
  readonly endpoint: string;
  readonly client: SQSClient;
  /**
   * Resolves when the next request for `action` (e.g. 'ReceiveMessage') reaches its handler: lets a
   * test act once a long poll is really waiting, instead of sleeping and hoping.
   */
  nextRequest(action: string): Promise<void>;
  /** Closes the client and the server. Safe to call twice. */
  stop(): Promise<void>;
}

export async function startSqsEmulator(): Promise<Fauxqs> {
  const app = buildApp({ logger: false });
  const waiters = new Map<string, (() => void)[]>();
  // preHandler runs after the body is parsed and just before fauxqs's handler, which dequeues
  // synchronously: once it fires, a ReceiveMessage has either taken what was there or is waiting.
  app.addHook('preHandler', async (request) => {
    const target = request.headers['x-amz-target'];
    if (typeof target !== 'string') return;
    const action = target.replace('AmazonSQS.', '');
    const list = waiters.get(action);
    if (list === undefined) return;
    waiters.delete(action);
    // After the handler starts, so the waiting test acts on a request that is already being served.
    setImmediate(() => {
      for (const resolve of list) resolve();
    });
  });
  // Loopback only: startFauxqs() would bind 0.0.0.0.
  const endpoint = await app.listen({ port: 0, host: '127.0.0.1' });
  const client = new SQSClient({
    endpoint,
    region: 'us-east-1',
    credentials: { accessKeyId: 'test', secretAccessKey: 'test' },
  });
  let stopped = false;
  return {
    endpoint,
    client,
    nextRequest(action: string): Promise<void> {
      return new Promise((resolve) => {
        const list = waiters.get(action) ?? [];
        list.push(resolve);
        waiters.set(action, list);
      });
    },
    async stop(): Promise<void> {
      if (stopped) return;
      stopped = true;
      client.destroy();
      await app.close();
    },
  };
}
