// The emulators a local cloud runs on, on loopback: dynalite (DynamoDB), fauxqs (SQS) and Ferry's EBS
// direct API emulator. They are development dependencies and test code, loaded only when asked for,
// so a missing one is reported by name instead of as a stack trace.
import { ConfigError } from '../shared/engine/errors.ts';
import type { SnapshotStore } from './ec2.ts';

/** What the local cloud needs to run on, plus the EBS emulator's handle for faults and counters. */
export interface LocalEmulators {
  readonly endpoints: { readonly dynamodb: string; readonly sqs: string; readonly ebs: string };
  readonly snapshots: SnapshotStore;
  readonly ebs: import('./emulators/ebs/server.ts').EbsEmulator;
  stop(): Promise<void>;
}

/** The packages (devDependencies) a local cloud needs besides the project's dependencies. */
export const LOCAL_CLOUD_PACKAGES = ['dynalite', 'fauxqs', 'aws-local-stepfunctions'] as const;

const notFound = (err: unknown): boolean => {
  const code = (err as { code?: string }).code;
  return code === 'ERR_MODULE_NOT_FOUND' || code === 'MODULE_NOT_FOUND';
};

/**
 * Refuses with a ConfigError naming what is missing: a package of LOCAL_CLOUD_PACKAGES (not
 * installed: `npm install` without `--omit=dev`) or the emulators under test/ (not in this copy).
 */
export async function checkLocalCloudPrerequisites(): Promise<void> {
  const missing: string[] = [];
  for (const name of LOCAL_CLOUD_PACKAGES) {
    try {
      await import(name);
    } catch (err) {
      if (!notFound(err)) throw err;
      missing.push(name);
    }
  }
  if (missing.length > 0) {
    throw new ConfigError(
      `the local cloud runs on emulators that are development dependencies, and ${missing.join(', ')} ${
        missing.length > 1 ? 'are' : 'is'
      } not installed: run \`npm install\` (without --omit=dev) in the Ferry checkout`,
      { setting: 'local-cloud' },
    );
  }
  try {
    await import('./emulators/ebs/server.ts');
  } catch (err) {
    if (!notFound(err)) throw err;
    throw new ConfigError(
      'the local cloud needs the EBS emulator (local-cloud/emulators/ebs), which this copy of Ferry does not have: run it from a git checkout',
      { setting: 'local-cloud' },
    );
  }
}

export interface StartEmulatorOptions {
  /** EBS emulator options (quotas, latency, completion delay); see local-cloud/emulators/ebs/server.ts. */
  readonly ebs?: import('./emulators/ebs/server.ts').EbsEmulatorOptions;
}

export async function startLocalEmulators(opts: StartEmulatorOptions = {}): Promise<LocalEmulators> {
  await checkLocalCloudPrerequisites();
  const [{ startDynalite }, { startSqsEmulator }, { startEbsEmulator }] = await Promise.all([
    import('./emulators/dynalite.ts'),
    import('./emulators/fauxqs.ts'),
    import('./emulators/ebs/server.ts'),
  ]);
  const [ddb, sqs, ebs] = await Promise.all([
    startDynalite(),
    startSqsEmulator(),
    startEbsEmulator({ completionDelayMs: { min: 0, max: 20 }, ...opts.ebs }),
  ]);
  return {
    endpoints: { dynamodb: ddb.endpoint, sqs: sqs.endpoint, ebs: ebs.endpoint },
    snapshots: ebs.state,
    ebs,
    async stop() {
      await Promise.all([ddb.stop(), sqs.stop(), ebs.stop()]);
    },
  };
}
