// Event and environment validation at the functions' boundary: a malformed event is refused with a
// message naming the field, before anything is touched.
import type { SQSEvent } from 'aws-lambda';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  type CycleInput,
  ENV_DEFAULTS,
  parseEnvironment,
  plannerEventSchema,
} from '../../functions/contracts.ts';
import { encodeCycleGrant } from '../../shared/aws/sqs/grant-message.ts';
import {
  acknowledge,
  type Deployment,
  deploy,
  type Emulators,
  receiveEvent,
  resend,
  startEmulators,
} from './support/harness.ts';

let e: Emulators;
let d: Deployment;

beforeAll(async () => {
  e = await startEmulators();
  d = await deploy(e);
});
afterAll(async () => {
  await e?.stop();
});

const cycle: CycleInput = {
  plan: 'plan-a',
  set: 'set-a',
  cycleId: 'c1',
  disks: [{ disk: 'vol-1', sourceSnapshotId: 'snap-0123456789abcdef0', volumeSizeGiB: 8 }],
};
const ref = {
  plan: 'plan-a',
  set: 'set-a',
  cycleId: 'c1',
  lockOwner: 'cycle:c1',
  sequence: 1,
  disks: [{ set: 'set-a', cycleId: 'c1', disk: 'vol-1' }],
};

async function refusal(p: Promise<unknown>): Promise<Error & { field?: string }> {
  const err = await p.then(
    () => undefined,
    (x: unknown) => x,
  );
  expect(err).toBeInstanceOf(Error);
  return err as Error & { field?: string };
}

describe('planner events', () => {
  it('accepts a well-formed prepare event', () => {
    expect(plannerEventSchema.parse({ action: 'prepare', cycle }).action).toBe('prepare');
  });

  it("accepts a base for a set's first cycle only with disks of the cycle, naming the stray one", () => {
    const base = {
      checkpointId: 'web/c7',
      disks: [
        {
          disk: 'vol-1',
          previousSourceSnapshotId: 'snap-0aaaaaaaaaaaaaaaa',
          parentTargetSnapshotId: 'snap-0cccccccccccccccc',
        },
      ],
    };
    const ok = plannerEventSchema.parse({ action: 'prepare', cycle: { ...cycle, base } });
    expect(ok.action === 'prepare' && ok.cycle.base).toEqual(base);

    const stray = plannerEventSchema.safeParse({
      action: 'prepare',
      cycle: { ...cycle, base: { ...base, disks: [{ ...base.disks[0], disk: 'vol-9' }] } },
    });
    expect(stray.success).toBe(false);
    expect(stray.error?.issues[0]).toMatchObject({
      path: ['cycle', 'base', 'disks', 0, 'disk'],
      message: 'the base names disk vol-9, which is not a disk of this cycle (vol-1)',
    });
    const notASnapshot = plannerEventSchema.safeParse({
      action: 'prepare',
      cycle: { ...cycle, base: { ...base, disks: [{ ...base.disks[0], parentTargetSnapshotId: 'vol-1' }] } },
    });
    expect(notASnapshot.success).toBe(false);
  });

  // EC2 CreateSnapshot's answer as the state machine passes it on: it does not name the disk.
  const created = {
    volumeId: 'vol-0123456789abcdef0',
    sourceSnapshotId: 'snap-0bbbbbbbbbbbbbbbb',
    volumeSizeGiB: 8,
  };

  it('names a snapshot the state machine created by the requested disk of its index', () => {
    const parsed = plannerEventSchema.parse({
      action: 'prepare',
      cycle: {
        ...cycle,
        requested: [{ disk: 'os', volumeId: 'vol-0123456789abcdef0' }, cycle.disks[0]],
        disks: [created, cycle.disks[0]],
      },
    });
    expect(parsed.cycle).toEqual({
      ...cycle,
      disks: [{ disk: 'os', sourceSnapshotId: 'snap-0bbbbbbbbbbbbbbbb', volumeSizeGiB: 8 }, cycle.disks[0]],
    });
  });

  it.each([
    [{ action: 'prepare' }, 'cycle', /planner event is invalid: cycle: /],
    [{ action: 'launch', cycle }, 'action', /action: expected action "prepare" or "tick"/],
    [
      { action: 'prepare', cycle: { ...cycle, disks: [{ ...cycle.disks[0], sourceSnapshotId: 'vol-123' }] } },
      'cycle.disks[0].sourceSnapshotId',
      /cycle\.disks\[0\]\.sourceSnapshotId: is not an EBS snapshot id/,
    ],
    [
      { action: 'prepare', cycle: { ...cycle, disks: [{ ...cycle.disks[0], volumeSizeGiB: 0 }] } },
      'cycle.disks[0].volumeSizeGiB',
      /cycle\.disks\[0\]\.volumeSizeGiB: /,
    ],
    [
      { action: 'prepare', cycle: { ...cycle, disks: [cycle.disks[0], cycle.disks[0]] } },
      'cycle.disks[1].disk',
      /cycle\.disks\[1\]\.disk: disk vol-1 appears twice/,
    ],
    [
      { action: 'prepare', cycle: { ...cycle, disks: [created] } },
      'cycle.disks[0]',
      /cycle\.disks\[0\]: snapshot snap-0bbbbbbbbbbbbbbbb of volume vol-0123456789abcdef0 has no requested disk of that volume at index 0 \(requested: nothing\)/,
    ],
    [
      {
        action: 'prepare',
        cycle: { ...cycle, requested: [{ disk: 'os', volumeId: 'vol-0fffffffffffffff0' }], disks: [created] },
      },
      'cycle.disks[0]',
      /requested: os vol-0fffffffffffffff0/,
    ],
    [{ action: 'prepare', cycle: { ...cycle, priority: 'high' } }, 'cycle', /cycle: unknown field priority/],
    [
      { action: 'prepare', cycle: { ...cycle, cycleId: 'has space' } },
      'cycle.cycleId',
      /cycle\.cycleId: must be/,
    ],
    [{ action: 'tick', cycle: { ...ref, sequence: 'one' } }, 'cycle.sequence', /cycle\.sequence: /],
    [{ action: 'tick', cycle: ref, round: 0 }, 'round', /round: /],
  ])('refuses %j naming %s', async (event, field, message) => {
    const err = await refusal(d.planner(event));
    expect(err.name).toBe('EventValidationError');
    expect(err.field).toBe(field);
    expect(err.message).toMatch(message);
  });

  it('refuses cycle parameters that cannot work, naming the setting', async () => {
    const err = await refusal(
      d.planner({
        action: 'prepare',
        cycle: { ...cycle, params: { chunkSize: '1 MiB', window: '512 KiB' } },
      }),
    );
    expect(err.message).toMatch(/window 512 KiB is smaller than one chunk/);
  });
});

describe('differ and finalizer events', () => {
  it('refuses a differ event without its disk', async () => {
    const err = await refusal(d.differ({ set: 'set-a', cycleId: 'c1' }));
    expect(err.message).toMatch(/differ event is invalid: disk: /);
  });

  it('refuses an abort whose reason is not text, and an unknown finalizer action', async () => {
    expect((await refusal(d.finalizer({ action: 'abort', cycle: ref, reason: 42 }))).message).toMatch(
      /finalizer event is invalid: reason: /,
    );
    expect((await refusal(d.finalizer({ action: 'publish', cycle: ref }))).message).toMatch(/action: /);
  });

  it('refuses to differ or finalize a cycle that was never prepared', async () => {
    expect((await refusal(d.differ({ set: 'set-a', cycleId: 'nope', disk: 'vol-1' }))).message).toMatch(
      /disk vol-1 of cycle nope in set set-a was never prepared/,
    );
    expect(
      (await refusal(d.finalizer({ action: 'finalize', cycle: { ...ref, cycleId: 'nope' } }))).message,
    ).toMatch(/cycle nope of set set-a does not exist/);
  });
});

describe('chunk-writer events', () => {
  it('refuses an event that is not an SQS event, naming the field', async () => {
    const err = await refusal(d.writer({ Records: [{ body: 'x' }] } as unknown as SQSEvent));
    expect(err.name).toBe('EventValidationError');
    expect(err.message).toMatch(/chunk-writer event is not an SQS event: Records\[0\]\.messageId: /);
  });

  it('reports a malformed grant as a batch item failure (towards the DLQ) and processes the rest', async () => {
    // Prepare: one garbage body, one well-formed grant of a cycle that does not exist.
    await resend(e, d, '{"version":1,"set":"s"}');
    await resend(
      e,
      d,
      encodeCycleGrant({
        set: 'set-a',
        cycleId: 'gone',
        disk: 'vol-1',
        descriptor: {
          seq: 0,
          offset: 0,
          length: 524288,
          extents: [{ offset: 0, length: 524288 }],
          bytes: 524288,
        },
        attempt: 1,
      }),
    );
    const event = (await receiveEvent(e, d))!;
    expect(event.Records).toHaveLength(2);
    const garbage = event.Records.find((r) => r.body.startsWith('{"version":1,"set":"s"}'))!;

    // Act
    const out = await d.writer(event);
    await acknowledge(
      e,
      d,
      event,
      out.batchItemFailures.map((f) => f.itemIdentifier),
    );

    // Assess
    expect(out.batchItemFailures).toEqual([{ itemIdentifier: garbage.messageId }]);
    expect(d.metric('Grants_malformed')).toBe(1);
    expect(d.metric('Grants_stale')).toBe(1);
  });
});

describe('environments', () => {
  it('names every missing variable', () => {
    expect(() => parseEnvironment('planner', {})).toThrow(
      /environment of the planner function is invalid: TABLE_NAME: .*QUEUE_URL: /,
    );
    expect(() => parseEnvironment('finalizer', { TABLE_NAME: 'ferry' })).toThrow(/EVENT_BUS_NAME/);
  });

  it('reads sizes as people write them and refuses nonsense', () => {
    const env = {
      TABLE_NAME: 'ferry',
      QUEUE_URL: 'https://sqs.eu-west-1.amazonaws.com/1/q',
      SNAPSHOT_TAG_KEY: 'ferry:deployment',
      SNAPSHOT_TAG_VALUE: 'Ferry',
    };
    expect(parseEnvironment('planner', { ...env, NODE_BUDGET: '512 MiB' }).NODE_BUDGET).toBe(
      512 * 1024 * 1024,
    );
    expect(parseEnvironment('planner', env).LEASE_SECONDS).toBe(ENV_DEFAULTS.LEASE_SECONDS);
    expect(() => parseEnvironment('planner', { ...env, NODE_BUDGET: 'lots' })).toThrow(
      /NODE_BUDGET: NODE_BUDGET: cannot read "lots" as a size/,
    );
  });

  it('lets a writer work on its whole batch at once by default, and on no more than a batch', () => {
    const env = { TABLE_NAME: 'ferry', QUEUE_URL: 'https://sqs.eu-west-1.amazonaws.com/1/q' };
    const parsed = parseEnvironment('chunk-writer', { ...env, NODE_BUDGET: '1 GiB', LEASE_SECONDS: '60' });
    // The SQS batch size the stack configures: a batch's chunks are written at once.
    expect(parsed.WRITER_CONCURRENCY).toBe(10);
    // The writer grants within the allowance the tick set on the flow: no budget or lease of its own.
    expect(parsed).not.toHaveProperty('NODE_BUDGET');
    expect(parsed).not.toHaveProperty('LEASE_SECONDS');
    expect(() => parseEnvironment('chunk-writer', { ...env, WRITER_CONCURRENCY: '50' })).toThrow(
      /WRITER_CONCURRENCY/,
    );
  });

  it('requires the planner to know the deployment tag its target snapshots must carry', () => {
    const env = { TABLE_NAME: 'ferry', QUEUE_URL: 'https://sqs.eu-west-1.amazonaws.com/1/q' };
    expect(() => parseEnvironment('planner', env)).toThrow(/SNAPSHOT_TAG_KEY: .*SNAPSHOT_TAG_VALUE: /);
    expect(() =>
      parseEnvironment('planner', { ...env, SNAPSHOT_TAG_KEY: 'aws:stack', SNAPSHOT_TAG_VALUE: 'x' }),
    ).toThrow(/the aws: prefix is reserved/);
    const parsed = parseEnvironment('planner', {
      ...env,
      SNAPSHOT_TAG_KEY: 'ferry:deployment',
      SNAPSHOT_TAG_VALUE: 'Ferry',
    });
    expect(parsed).toMatchObject({ SNAPSHOT_TAG_KEY: 'ferry:deployment', SNAPSHOT_TAG_VALUE: 'Ferry' });
  });
});
