// Test helper: a DynamoDB client that counts the requests it sends (every attempt, by operation) and
// the capacity units the server reports for them, so tests can hold adapters to their request budget.
import { DynamoDBClient } from '@aws-sdk/client-dynamodb';

export interface DynamoMeter {
  readonly client: DynamoDBClient;
  /** Requests sent since the last reset, by operation (`UpdateItem`, `GetItem`, ...). */
  readonly requests: Map<string, number>;
  /** Conditional writes the server refused (DynamoDB bills them as writes of the item's size). */
  conditionFailures: number;
  /** Capacity units the server reported (ReturnConsumedCapacity TOTAL). */
  writeUnits: number;
  readUnits: number;
  /** All requests since the last reset. */
  total(): number;
  /** `{UpdateItem: 1}`-style snapshot, for toEqual. */
  counts(): Record<string, number>;
  reset(): void;
}

const WRITES = new Set(['PutItem', 'UpdateItem', 'DeleteItem', 'BatchWriteItem']);

export function meteredClient(endpoint: string): DynamoMeter {
  const client = new DynamoDBClient({
    endpoint,
    region: 'us-east-1',
    credentials: { accessKeyId: 'AKIDFERRYTEST', secretAccessKey: 'ferry-test-secret' },
  });
  const meter: DynamoMeter = {
    client,
    requests: new Map(),
    conditionFailures: 0,
    writeUnits: 0,
    readUnits: 0,
    total: () => [...meter.requests.values()].reduce((s, n) => s + n, 0),
    counts: () => Object.fromEntries(meter.requests),
    reset() {
      meter.requests.clear();
      meter.conditionFailures = 0;
      meter.writeUnits = 0;
      meter.readUnits = 0;
    },
  };
  // Ask for the consumed capacity on every request (the adapters do not: it is for the meter only).
  client.middlewareStack.add(
    (next) => async (args) => {
      (args.input as { ReturnConsumedCapacity?: string }).ReturnConsumedCapacity = 'TOTAL';
      return next(args);
    },
    { step: 'initialize', name: 'ferryMeterCapacity' },
  );
  // Inside the retry loop: one count per attempt actually sent.
  client.middlewareStack.add(
    (next, context) => async (args) => {
      const op = (context.commandName ?? 'Unknown').replace(/Command$/, '');
      meter.requests.set(op, (meter.requests.get(op) ?? 0) + 1);
      try {
        const out = await next(args);
        const consumed = (out.output as { ConsumedCapacity?: { CapacityUnits?: number } } | undefined)
          ?.ConsumedCapacity;
        const units = consumed?.CapacityUnits ?? 0;
        if (WRITES.has(op)) meter.writeUnits += units;
        else meter.readUnits += units;
        return out;
      } catch (err) {
        if ((err as Error).name === 'ConditionalCheckFailedException') meter.conditionFailures++;
        throw err;
      }
    },
    // High priority: around the deserializer, so the parsed output (and its capacity) comes back.
    { step: 'deserialize', name: 'ferryMeterRequests', priority: 'high' },
  );
  return meter;
}
