// The cost measurement of the local cloud: `ferry local-cloud --json` counts every request a cycle
// makes and prices it. These tests check the JSON's shape and that the counts agree with each other
// and with the emulators' own counters; never that a target is met (the numbers move with the code).
import type { StateMachineDefinition } from 'aws-local-stepfunctions';
import { beforeAll, describe, expect, it } from 'vitest';
import { describeSettings, transitionsLine } from '../../cli/local-cloud.ts';
import { type WaitLoop, waitLoops } from '../../local-cloud/asl.ts';
import { type LocalCloudSettings, localSettings } from '../../local-cloud/cloud.ts';
import {
  type CycleWork,
  cycleCost,
  serviceCosts,
  type TransitionBreakdown,
  transitionBreakdown,
} from '../../local-cloud/cost.ts';
import { PRICES } from '../../local-cloud/prices.ts';
import { synthesizeDeployment } from '../../local-cloud/synth.ts';
import { diffUsage, emptyUsage, sumUsage, type Usage } from '../../local-cloud/usage.ts';
import { changeVolumes, WORKLOAD_SIZES, workloadDisks } from '../../local-cloud/workload.ts';
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
  // Five passes around a three-state tick loop (15) and 25 transitions on the fixed path.
  u.stepFunctions = {
    executions: 2,
    transitions: 40,
    byState: { 'Wait for writers': 5, Tick: 6, 'Tick status?': 6, Prepare: 2, Finalize: 21 },
  };
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

/** A tick loop (Wait, Tick, a Choice back to the Wait) and a poll loop behind a counter. */
const LOOPING: StateMachineDefinition = {
  StartAt: 'Prepare',
  States: {
    Prepare: { Type: 'Pass', Next: 'Tick' },
    Tick: { Type: 'Pass', Next: 'Tick status?' },
    'Tick status?': {
      Type: 'Choice',
      Choices: [{ Variable: '$.done', BooleanEquals: true, Next: 'Finalize' }],
      Default: 'Wait for writers',
    },
    'Wait for writers': { Type: 'Wait', Seconds: 10, Next: 'Tick' },
    Finalize: { Type: 'Pass', Next: 'Published?' },
    'Published?': {
      Type: 'Choice',
      Choices: [{ Variable: '$.published', BooleanEquals: true, Next: 'Done' }],
      Default: 'Count poll',
    },
    'Count poll': { Type: 'Pass', Next: 'Wait for snapshots' },
    'Wait for snapshots': { Type: 'Wait', SecondsPath: '$.poll', Next: 'Finalize' },
    'Wait once': { Type: 'Wait', Seconds: 5, Next: 'Done' },
    Done: { Type: 'Succeed' },
  },
} as unknown as StateMachineDefinition;

describe('Step Functions transitions split by Wait loop (pure)', () => {
  it('finds each Wait that loops, with the states one pass enters; a Wait on no loop is left out', () => {
    // Act
    const loops = waitLoops(LOOPING);

    // Assess
    expect(loops).toEqual([
      { wait: 'Wait for writers', seconds: 10, states: ['Wait for writers', 'Tick', 'Tick status?'] },
      {
        wait: 'Wait for snapshots',
        seconds: undefined,
        states: ['Wait for snapshots', 'Finalize', 'Published?', 'Count poll'],
      },
    ]);
  });

  it('charges each pass its states, and leaves the rest to the fixed path', () => {
    // Prepare
    const loops: WaitLoop[] = [
      { wait: 'Wait for writers', seconds: 10, states: ['Wait for writers', 'Tick', 'Tick status?'] },
      { wait: 'Wait for snapshots', seconds: 60, states: ['Wait for snapshots', 'Finalize'] },
    ];

    // Act
    const t = transitionBreakdown(sampleUsage(), loops);

    // Assess
    expect(t).toEqual({
      transitions: 40,
      executions: 2,
      waitLoops: [
        { wait: 'Wait for writers', seconds: 10, passes: 5, statesPerPass: 3, transitions: 15 },
        { wait: 'Wait for snapshots', seconds: 60, passes: 0, statesPerPass: 2, transitions: 0 },
      ],
      outsideWaitLoops: 25,
    });
  });

  it('says, in the human output, when the transitions were counted on compressed waits', () => {
    // Prepare
    const loops = waitLoops(LOOPING);
    const common = { leaseSeconds: 300, stuckTicks: 60, writerConcurrency: 4, waitLoops: loops };
    const fast: LocalCloudSettings = {
      ...common,
      waits: 'fast',
      waitMs: 200,
      visibilityTimeoutSeconds: 20,
      pollWaitSeconds: 1,
    };
    const real: LocalCloudSettings = {
      ...common,
      waits: 'real',
      visibilityTimeoutSeconds: 1800,
      pollWaitSeconds: 20,
    };
    const t: TransitionBreakdown = transitionBreakdown(sampleUsage(), loops);

    // Act, Assess
    expect(describeSettings(fast).join('\n')).toMatch(/cut to 200 ms[\s\S]*not comparable to AWS/);
    expect(transitionsLine(t, fast)).toMatch(
      /5 × "Wait for writers" \(3 states\) = 15, 25 outside .*not comparable to AWS/,
    );
    expect(describeSettings(real).join('\n')).not.toMatch(/not comparable/);
    expect(describeSettings(real).join('\n')).toMatch(
      /as synthesized \(Wait for writers 10 s, Wait for snapshots \? s\)/,
    );
    expect(transitionsLine(t, real)).not.toMatch(/not comparable/);
    expect(describeSettings(fast).join('\n')).toMatch(
      /4 writer invocations at once: .* holds the others' work/,
    );
    expect(describeSettings({ ...real, writerConcurrency: 1 }).join('\n')).toMatch(/one at a time/);
  });
});

describe('the local cloud settings', () => {
  it("runs fast on local timing, and real on the deployment's", () => {
    // Prepare
    const deployment = synthesizeDeployment();

    // Act
    const fast = localSettings({}, deployment);
    const real = localSettings({ waits: 'real' }, deployment);

    // Assess
    expect(fast).toMatchObject({ waits: 'fast', waitMs: 200, leaseSeconds: 10, pollWaitSeconds: 1 });
    expect(real).toMatchObject({
      waits: 'real',
      leaseSeconds: 300,
      stuckTicks: 60,
      visibilityTimeoutSeconds: deployment.queue.visibilityTimeoutSeconds,
      pollWaitSeconds: 20,
    });
    expect(real.waitMs).toBeUndefined();
    // Real waits measure: one writer invocation at a time, so none's duration holds another's work.
    expect(fast.writerConcurrency).toBe(4);
    expect(real.writerConcurrency).toBe(1);
    expect(localSettings({ waits: 'real', writerConcurrency: 4 }, deployment).writerConcurrency).toBe(4);
    // Both record the synthesized Wait loops: the tick loop waits 10 s.
    expect(real.waitLoops.find((l) => l.wait === 'Wait for writers')?.seconds).toBe(10);
  }, 30_000);
});

describe('the local cloud workload at a size', () => {
  /** The volumes of `size` after cycles 0..n, as buffers. */
  function changed(size: (typeof WORKLOAD_SIZES)[keyof typeof WORKLOAD_SIZES], n: number) {
    const volumes = new Map(workloadDisks(size).map((d) => [d.disk, Buffer.alloc(d.size)]));
    const volume = (disk: string) => volumes.get(disk) ?? Buffer.alloc(0);
    for (let k = 0; k <= n; k++) changeVolumes(volume, size, k);
    return volumes;
  }
  const changedBlocks = (a: Buffer, b: Buffer) => {
    const blocks: number[] = [];
    for (let i = 0; i * 512 * 1024 < a.length; i++) {
      const at = (x: Buffer) => x.subarray(i * 512 * 1024, (i + 1) * 512 * 1024);
      if (!at(a).equals(at(b))) blocks.push(i);
    }
    return blocks;
  };

  it('is two disks of 48 and 96 MiB when small, 576 MiB and 1.1 GiB when large', () => {
    expect(workloadDisks(WORKLOAD_SIZES.small)).toEqual([
      { disk: 'root', size: 48 * 2 ** 20 },
      { disk: 'data', size: 96 * 2 ** 20 },
    ]);
    expect(workloadDisks(WORKLOAD_SIZES.large)).toEqual([
      { disk: 'root', size: 576 * 2 ** 20 },
      { disk: 'data', size: 1152 * 2 ** 20 },
    ]);
  });

  it('changes about 88 MiB, then 100 MiB per incremental, when small', () => {
    // Prepare
    const full = changed(WORKLOAD_SIZES.small, 0);
    const incremental = changed(WORKLOAD_SIZES.small, 1);

    // Act
    const fullBlocks = [...full.values()].reduce(
      (n, v) => n + changedBlocks(v, Buffer.alloc(v.length)).length,
      0,
    );
    const incrementalBlocks = [...full.keys()].reduce(
      (n, disk) => n + changedBlocks(full.get(disk) as Buffer, incremental.get(disk) as Buffer).length,
      0,
    );

    // Assess: the blocks the workload has always changed (seeded, so exact; 87.5 and 102.5 MiB
    // replicated in bench/results/cost/before-fast-waits-2026-12-05.json).
    expect(fullBlocks).toBe(175);
    expect(incrementalBlocks).toBe(205);
  });

  it('keeps incremental changes in the hot areas, as dense as the small ones, on larger disks', () => {
    // Prepare: disks twice the small ones, incrementals as small.
    const size = { name: 'test', fullScale: 2, incrementalScale: 1 };
    const full = changed(size, 0);

    // Act
    const incremental = changed(size, 1);

    // Assess: root's hot area is its first 48 MiB (96 blocks), data's its first 96 MiB (192 blocks).
    const root = changedBlocks(full.get('root') as Buffer, incremental.get('root') as Buffer);
    const data = changedBlocks(full.get('data') as Buffer, incremental.get('data') as Buffer);
    expect(root.length).toBeGreaterThan(0);
    expect(Math.max(...root)).toBeLessThan(96);
    expect(Math.max(...data)).toBeLessThan(192);
    expect(root.length + data.length).toBe(205);
  });
});

/** A cycle as `ferry local-cloud --json` prints it (the fields checked here). */
interface CycleJson extends ReturnType<typeof cycleCost> {
  kind: string;
  stepFunctions: TransitionBreakdown;
  status: string;
  verified: boolean;
  childExecutions: number;
  writerInvocations: number;
  blocksWritten: number;
  usage: Usage;
}

describe('ferry local-cloud --json, counted and priced', () => {
  let cycles: CycleJson[];
  let settings: LocalCloudSettings & {
    workload: { name: string; disks: { disk: string; sizeBytes: number }[] };
  };

  beforeAll(async () => {
    const r = await ferry(['local-cloud', '--incrementals', '1', '--json']);
    expect(r.code, r.stderr).toBe(0);
    const out = JSON.parse(r.stdout) as {
      ok: boolean;
      prices: typeof PRICES;
      settings: typeof settings;
      cycles: CycleJson[];
    };
    expect(out.ok).toBe(true);
    expect(out.prices).toEqual(JSON.parse(JSON.stringify(PRICES)));
    cycles = out.cycles;
    settings = out.settings;
  }, 240_000);

  it('records the settings it counted with: fast waits and the small workload by default', () => {
    expect(settings).toMatchObject({ waits: 'fast', waitMs: 200, leaseSeconds: 10 });
    expect(settings.workload).toMatchObject({ name: 'small', fullScale: 1, incrementalScale: 1 });
    expect(settings.workload.disks.map((d) => d.sizeBytes)).toEqual([48 * 2 ** 20, 96 * 2 ** 20]);
    // The synthesized tick loop is among the Wait loops, with its duration as deployed.
    expect(settings.waitLoops.find((l) => l.wait === 'Wait for writers')?.seconds).toBe(10);
  });

  it("splits each cycle's transitions into passes around the Wait loops and the fixed path", () => {
    for (const c of cycles) {
      const t = c.stepFunctions;
      expect(t.transitions).toBe(c.usage.stepFunctions.transitions);
      const inLoops = t.waitLoops.reduce((n, l) => n + l.transitions, 0);
      expect(inLoops + t.outsideWaitLoops).toBe(t.transitions);
      for (const l of t.waitLoops) expect(l.passes).toBe(c.usage.stepFunctions.byState[l.wait] ?? 0);
      // The writers took longer than one tick: the tick loop went round at least once.
      expect(t.waitLoops.find((l) => l.wait === 'Wait for writers')?.passes).toBeGreaterThan(0);
      const byState = Object.values(c.usage.stepFunctions.byState).reduce((a, b) => a + b, 0);
      expect(byState).toBe(t.transitions);
    }
  });

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
