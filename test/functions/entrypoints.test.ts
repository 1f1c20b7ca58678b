// The Lambda entry points (`handler` of each function) wire themselves from their environment, as
// they will in the cloud and in the local run of the state machine: here the SDK's own
// AWS_ENDPOINT_URL_<SERVICE> variables point them at the emulators.
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import type { CycleRef, DifferResult } from '../../functions/contracts.ts';
import {
  blockOf,
  type Deployment,
  deploy,
  type Emulators,
  sourceSnapshot,
  startEmulators,
} from './support/harness.ts';

let e: Emulators;
let d: Deployment;

beforeAll(async () => {
  e = await startEmulators();
  d = await deploy(e);
  vi.stubEnv('AWS_REGION', 'us-east-1');
  vi.stubEnv('AWS_ACCESS_KEY_ID', 'test');
  vi.stubEnv('AWS_SECRET_ACCESS_KEY', 'test');
  vi.stubEnv('AWS_ENDPOINT_URL_DYNAMODB', e.ddb.endpoint);
  vi.stubEnv('AWS_ENDPOINT_URL_SQS', e.sqs.endpoint);
  vi.stubEnv('AWS_ENDPOINT_URL_EBS', e.emu.endpoint);
  vi.stubEnv('POWERTOOLS_LOG_LEVEL', 'SILENT');
  vi.stubEnv('POWERTOOLS_METRICS_DISABLED', 'true');
  vi.stubEnv('TABLE_NAME', d.table);
  vi.stubEnv('QUEUE_URL', d.queueUrl);
  vi.stubEnv('NODE_BUDGET', '8 MiB');
  vi.stubEnv('SNAPSHOT_TAG_KEY', 'ferry:deployment');
  vi.stubEnv('SNAPSHOT_TAG_VALUE', 'FerryEnv');
});
afterAll(async () => {
  vi.unstubAllEnvs();
  await e?.stop();
});

describe('Lambda entry points', () => {
  it('prepare and diff a cycle through the handlers built from the environment', async () => {
    // Prepare
    const { handler: planner } = await import('../../functions/planner/handler.ts');
    const { handler: differ } = await import('../../functions/differ/handler.ts');
    const source = await sourceSnapshot(
      e,
      new Map([
        [0, blockOf(1)],
        [1, blockOf(2)],
        [9, blockOf(3)],
      ]),
    );

    // Act
    const ref = (await planner({
      action: 'prepare',
      cycle: {
        plan: 'plan-env',
        set: 'env',
        cycleId: 'e1',
        disks: [{ disk: 'vol-1', sourceSnapshotId: source, volumeSizeGiB: 1 }],
      },
    })) as CycleRef;
    const diffed = (await differ(ref.disks[0])) as DifferResult;

    // Assess: a target snapshot was started in the emulator, tagged with the deployment's tag from
    // the environment (IAM allows StartSnapshot only with it), and the differ cut two descriptors.
    const rec = await d.disk('env', 'vol-1', 'e1');
    const target = e.emu.state.describeSnapshot(rec.targetSnapshotId);
    expect(target?.status).toBe('pending');
    expect(target?.tags).toEqual(
      expect.arrayContaining([
        { Key: 'ferry:deployment', Value: 'FerryEnv' },
        { Key: 'ferry:role', Value: 'target' },
        { Key: 'ferry:disk', Value: 'vol-1' },
        { Key: 'ferry:cycle', Value: 'e1' },
      ]),
    );
    expect(diffed).toMatchObject({ done: true, descriptors: 2, blocks: 3, kind: 'full' });
  });

  it('refuses a malformed event through the entry point, naming the field', async () => {
    const { handler: finalizer } = await import('../../functions/finalizer/handler.ts');
    vi.stubEnv('EVENT_BUS_NAME', 'ferry');
    await expect(finalizer({ action: 'finalize' })).rejects.toThrow(/finalizer event is invalid: cycle: /);
  });

  it('refuses to start without its environment, naming what is missing', async () => {
    vi.resetModules();
    vi.stubEnv('QUEUE_URL', '');
    const { handler: writer } = await import('../../functions/chunk-writer/handler.ts');
    await expect(writer({ Records: [] })).rejects.toThrow(
      /environment of the chunk-writer function is invalid: QUEUE_URL/,
    );
  });
});
