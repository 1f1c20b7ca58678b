// Test helper: an in-process, in-memory DynamoDB (dynalite) on loopback, with Ferry's table from schema.ts.
import { createRequire } from 'node:module';
import type { AddressInfo, Server } from 'node:net';
import { CreateTableCommand, DescribeTableCommand, DynamoDBClient } from '@aws-sdk/client-dynamodb';
import { DynamoDBDocumentClient } from '@aws-sdk/lib-dynamodb';
import { tableDefinition } from '../../shared/aws/dynamo/schema.ts';

// dynalite ships no type declarations; this is the part of its API the tests use.
type DynaliteFactory = (opts: {
  createTableMs: number;
  deleteTableMs: number;
  updateTableMs: number;
}) => Server;
const dynalite = createRequire(import.meta.url)('dynalite') as DynaliteFactory;

export interface Dynalite {
  readonly endpoint: string;
  readonly client: DynamoDBClient;
  readonly doc: DynamoDBDocumentClient;
  /** A table created at start. */
  readonly table: string;
  /** Creates another empty table with Ferry's schema (a fresh store per test) and returns its name. */
  createTable(): Promise<string>;
  stop(): Promise<void>;
}

export async function startDynalite(): Promise<Dynalite> {
  const server = dynalite({ createTableMs: 0, deleteTableMs: 0, updateTableMs: 0 });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  const endpoint = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  const client = new DynamoDBClient({
    endpoint,
    region: 'us-east-1',
    // dynalite checks that a signature is present, not what it signs: static fakes.
    credentials: { accessKeyId: 'AKIDFERRYTEST', secretAccessKey: 'ferry-test-secret' },
  });
  const doc = DynamoDBDocumentClient.from(client);
  let tables = 0;

  const createTable = async (): Promise<string> => {
    const name = `ferry-state-${++tables}`;
    await client.send(new CreateTableCommand(tableDefinition(name)));
    // With createTableMs 0 the table turns ACTIVE on dynalite's next timer tick; item calls on a
    // CREATING table are refused, so wait for the status rather than for a time.
    for (;;) {
      const out = await client.send(new DescribeTableCommand({ TableName: name }));
      if (out.Table?.TableStatus === 'ACTIVE') return name;
      await new Promise((r) => setImmediate(r));
    }
  };

  const table = await createTable();
  let stopped = false;
  return {
    endpoint,
    client,
    doc,
    table,
    createTable,
    async stop() {
      if (stopped) return;
      stopped = true;
      client.destroy();
      await new Promise<void>((resolve, reject) => server.close((e) => (e ? reject(e) : resolve())));
    },
  };
}
