// The cost measurement of the local cloud: `ferry local-cloud --json` counts every request a cycle
// makes and prices it. These tests check the JSON's shape and that the counts agree with each other
// and with the emulators' own counters; never that a target is met (the numbers move with the code).
import { beforeAll, describe, expect, it } from 'vitest';
import { type CycleWork, cycleCost, serviceCosts } from '../../local-cloud/cost.ts';
import { PRICES } from '../../local-cloud/prices.ts';
import { diffUsage, emptyUsage, sumUsage, type Usage } from '../../local-cloud/usage.ts';
import { replaceCostSection } from '../../scripts/cost-table.ts';
import { ferry } from '../support/ferry-cli.ts';

const GiB = 1024 ** 3;

/** A usage with one of everything, in round numbers. */
function sampleUsage(): Usage {
  const u = emptyUsage();
  u.requests = {
    dynamodb: { UpdateItem: 30, GetItem: 20, Query: 4, DescribeTable: 1 },
    sqs: { SendMessageBatch: 2, ReceiveMessage: 5, DeleteMessageBatch: 2 },
    ebs: { PutSnapshotBlock: 20, GetSnapshotBlock: 20, ListChangedBlocks: 1 },
  };
  u.dynamodb = { readUnits: 22, writeUnits: 40, failedConditionalWrites: 3 };
  u.sqs = { billedRequests: 9 };
  u.eventSource = { receives: 5, emptyReceives: 3, messagesReceived: 10, deleteBatches: 2 };
  u.ebs = { blocksWritten: 20, blocksRead: 20, listRequests: 1 };
  u.lambda = {
    planner: { invocations: 3, ms: 300, gbSeconds: 0.15, unanswered: 0 },
    'chunk-writer': { invocations: 2, ms: 1000, gbSeconds: 1, unanswered: 0 },
  };
  u.stepFunctions = { executions: 2, transitions: 40 };
  u.eventBridge = { events: 1 };
  return u;
}

describe('pricing a usage (pure)', () => {
  it('divides by chunks and GiB, and the overhead ratio is everything but EBS over EBS', () => {
    // Prepare
    const usage = sampleUsage();
    const work: CycleWork = { chunks: 10, blocks: 20, bytes: 20 * 512 * 1024, source: 'finalizer' };

    // Act
    const cost = cycleCost(usage, work);

    // Assess
    expect(cost.perChunk).toMatchObject({
      dynamodbWrites: 4,
      dynamodbReads: 2.2,
      dynamodbWriteRequests: 3,
      dynamodbReadRequests: 2.4,
      sqsRequests: 0.9,
      sqsEmptyReceives: 0.3,
      lambdaInvocations: 0.5,
      stepFunctionsTransitions: 4,
      ebsPutSnapshotBlock: 2,
    });
    const c = cost.costPerCycle;
    expect(c.ebsDirect).toBeCloseTo(
      20 * PRICES.ebs.putSnapshotBlock + 20 * PRICES.ebs.getSnapshotBlock + PRICES.ebs.listRequest,
      12,
    );
    expect(c.dynamodbWrites).toBeCloseTo(40 * PRICES.dynamodb.writeRequestUnit, 12);
    expect(c.lambdaDuration).toBeCloseTo(1.15 * PRICES.lambda.gbSecondArm64, 12);
    expect(c.total).toBeCloseTo(c.ebsDirect + c.overhead, 12);
    expect(cost.overheadRatio).toBeCloseTo(c.overhead / c.ebsDirect, 12);
    const gib = work.bytes / GiB;
    expect(cost.costPerGiB?.total).toBeCloseTo(c.total / gib, 12);
    expect(cost.perGiB?.dynamodbWrites).toBeCloseTo(40 / gib, 6);
  });

  it('reports no per-chunk figures for a cycle that replicated nothing', () => {
    const cost = cycleCost(emptyUsage(), { chunks: 0, blocks: 0, bytes: 0, source: 'none' });
    expect(cost.perChunk).toBeUndefined();
    expect(cost.costPerGiB).toBeUndefined();
    expect(cost.overheadRatio).toBeUndefined();
    expect(serviceCosts(emptyUsage()).total).toBe(0);
  });

  it('takes a cycle as the difference of two snapshots, and pools cycles as their sum', () => {
    const before = sampleUsage();
    const after = sumUsage([before, before]);
    const cycle = diffUsage(after, before);
    expect(cycle).toEqual(before);
    expect(sumUsage([before, cycle])).toEqual(after);
  });

  it('replaces only what lies between the markers of the README', () => {
    const readme = 'head\n<!-- cost-table:begin (generated) -->\nold\n<!-- cost-table:end -->\ntail\n';
    expect(replaceCostSection(readme, 'NEW')).toBe('head\nNEW\ntail\n');
    expect(() => replaceCostSection('no markers', 'NEW')).toThrow(/markers/);
  });
});

/** A cycle as `ferry local-cloud --json` prints it (the fields checked here). */
interface CycleJson extends ReturnType<typeof cycleCost> {
  kind: string;
  status: string;
  verified: boolean;
  childExecutions: number;
  writerInvocations: number;
  blocksWritten: number;
  usage: Usage;
}

describe('ferry local-cloud --json, counted and priced', () => {
  let cycles: CycleJson[];

  beforeAll(async () => {
    const r = await ferry(['local-cloud', '--incrementals', '1', '--json']);
    expect(r.code, r.stderr).toBe(0);
    const out = JSON.parse(r.stdout) as { ok: boolean; prices: typeof PRICES; cycles: CycleJson[] };
    expect(out.ok).toBe(true);
    expect(out.prices).toEqual(JSON.parse(JSON.stringify(PRICES)));
    cycles = out.cycles;
  }, 240_000);

  it('carries, per cycle, requests by service and operation and the figures per chunk and per GiB', () => {
    expect(cycles.map((c) => c.kind)).toEqual(['full', 'incremental']);
    for (const c of cycles) {
      expect(c).toMatchObject({
        status: 'SUCCEEDED',
        verified: true,
        workSource: 'finalizer',
        dynamodbUnits: 'request-units',
        lambdaDurationSource: 'measured-local',
      });
      for (const service of ['dynamodb', 'sqs', 'ebs', 'lambda', 'states'])
        expect(Object.keys(c.requests[service] ?? {}).length, service).toBeGreaterThan(0);
      expect(c.chunks).toBeGreaterThan(0);
      expect(c.chunks).toBeLessThanOrEqual(c.blocks);
      for (const [name, value] of Object.entries(c.perChunk ?? {})) {
        expect(Number.isFinite(value), name).toBe(true);
        expect(value, name).toBeGreaterThanOrEqual(0);
      }
      for (const name of ['dynamodbWrites', 'dynamodbReads', 'sqsRequests', 'lambdaInvocations'] as const)
        expect(c.perChunk?.[name], name).toBeGreaterThan(0);
      for (const value of Object.values(c.costPerGiB ?? {})) expect(Number.isFinite(value)).toBe(true);
      expect(c.overheadRatio).toBeGreaterThan(0);
      expect(Number.isFinite(c.overheadRatio)).toBe(true);
    }
  });

  it('counts at the SDK what the emulators saw: every block written, every invocation, every delete', () => {
    for (const c of cycles) {
      const u = c.usage;
      // The EBS emulator's own count of PutSnapshotBlock calls that wrote their block.
      expect(c.requests.ebs?.PutSnapshotBlock).toBe(c.blocksWritten);
      expect(u.ebs.blocksWritten).toBe(c.blocksWritten);
      expect(c.blocksWritten).toBeLessThanOrEqual(c.blocks);
      // The event source mapping's own count of chunk-writer invocations.
      expect(u.lambda['chunk-writer']?.invocations).toBe(c.writerInvocations);
      const invocations = Object.values(u.lambda).reduce((n, f) => n + f.invocations, 0);
      expect(c.requests.lambda?.Invoke).toBe(invocations);
      // Every grant a writer handled was received by the poller; all deletes are the poller's.
      expect(u.eventSource.messagesReceived).toBeGreaterThanOrEqual(c.chunks);
      expect(c.requests.sqs?.DeleteMessageBatch ?? 0).toBe(u.eventSource.deleteBatches);
      expect(c.requests.sqs?.ReceiveMessage).toBe(u.eventSource.receives);
      // The top execution and its children; a transition per state entered, at least one each.
      expect(u.stepFunctions.executions).toBe(c.childExecutions + 1);
      expect(u.stepFunctions.transitions).toBeGreaterThan(u.stepFunctions.executions);
      // Request units come from ConsumedCapacity: at least half a unit per read, one per write.
      expect(u.dynamodb.writeUnits).toBeGreaterThanOrEqual(
        (c.perChunk?.dynamodbWriteRequests ?? 0) * c.chunks,
      );
      expect(u.dynamodb.readUnits).toBeGreaterThanOrEqual(
        ((c.perChunk?.dynamodbReadRequests ?? 0) * c.chunks) / 2,
      );
      // The requests by sender add up to the requests by service.
      for (const service of ['dynamodb', 'sqs', 'ebs']) {
        const bySender = Object.values(u.byFunction).reduce(
          (n, f) => n + Object.values(f.requests[service] ?? {}).reduce((a, b) => a + b, 0),
          0,
        );
        const total = Object.values(c.requests[service] ?? {}).reduce((a, b) => a + b, 0);
        expect(bySender, service).toBe(total);
      }
    }
  });
});
