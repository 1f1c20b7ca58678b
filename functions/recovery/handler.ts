// Recovery Lambda: every action of the Recovery state machine (resolve, prepare-failback, launch, health, pause,
// teardown, verify-teardown, record), dispatched on `action`. A composition root only: parse the
// event, build adapters once per container, call the recovery core (shared/engine/recovery).
import { EC2Client } from '@aws-sdk/client-ec2';
import { SchedulerClient } from '@aws-sdk/client-scheduler';
import type { Context } from 'aws-lambda';
import { prepareFailback } from '../../shared/engine/recovery/failback.ts';
import { checkHealth } from '../../shared/engine/recovery/health.ts';
import { launchMachine } from '../../shared/engine/recovery/launch.ts';
import { recordRecovery } from '../../shared/engine/recovery/report.ts';
import { resolveRecovery } from '../../shared/engine/recovery/resolve.ts';
import { teardownJob, verifyTeardown } from '../../shared/engine/recovery/teardown.ts';
import type {
  HealthResult,
  LaunchResult,
  PauseResult,
  PrepareFailbackResult,
  RecoveryReport,
  ResolveResult,
  TeardownResult,
  VerifyTeardownResult,
} from '../../shared/engine/recovery/types.ts';
import { clients, invoke, type Observability, powertools } from '../shared/runtime.ts';
import { parseContract, parseRecoveryEnvironment, recoveryEventSchema } from './contracts.ts';
import { type RecoveryDeps, recoveryDeps } from './wiring.ts';

export interface RecoveryRuntime {
  readonly deps: RecoveryDeps;
  readonly obs: Observability;
}

export type RecoveryOutput =
  | ResolveResult
  | PrepareFailbackResult
  | LaunchResult
  | HealthResult
  | PauseResult
  | TeardownResult
  | VerifyTeardownResult
  | RecoveryReport;

/** The handler over given dependencies (the Lambda entry below, tests and the local run). */
export function createRecoveryHandler(runtime: () => RecoveryRuntime) {
  return async (event: unknown, context?: Context): Promise<RecoveryOutput> => {
    const { deps, obs } = runtime();
    return invoke(obs, context, async (annotate) => {
      const e = parseContract(recoveryEventSchema, event, 'recovery event');
      annotate({ action: e.action, jobId: e.jobId, plan: 'plan' in e ? e.plan : undefined });
      switch (e.action) {
        case 'resolve': {
          const { action: _, ...request } = e;
          return resolveRecovery(deps, request, deps.defaultsOf(e.plan));
        }
        case 'prepare-failback':
          return prepareFailback(
            deps,
            {
              jobId: e.jobId,
              plan: e.plan,
              cutover: e.cutover,
              reverseSet: e.reverseSet,
              sourceQuiesced: e.sourceQuiesced,
              machines: e.machines,
            },
            deps.defaultsOf(e.plan),
          );
        case 'launch':
          return launchMachine(
            deps,
            { jobId: e.jobId, mode: e.mode, plan: e.plan, kmsKeyArn: deps.kmsKeyArn },
            e.machine,
          );
        case 'health':
          return checkHealth(deps, e.launched, {
            startedAt: e.startedAt,
            previous: e.previous,
            timeoutSeconds: e.timeoutSeconds,
          });
        case 'pause':
          return deps.schedules.pause(e.plan);
        case 'teardown':
          return teardownJob(deps, e.jobId, e.previous?.teardown);
        case 'verify-teardown':
          return verifyTeardown(deps, e.jobId);
        case 'record':
          return recordRecovery(deps, e.jobId, e.report);
      }
    });
  };
}

let container: RecoveryRuntime | undefined;

function fromEnvironment(): RecoveryRuntime {
  const env = parseRecoveryEnvironment(process.env);
  const obs = powertools('ferry-recovery');
  // Region and credentials from the Lambda environment; AWS_ENDPOINT_URL_EC2 and
  // AWS_ENDPOINT_URL_SCHEDULER (the SDK's own variables) point them at emulators for the local run.
  const deps = recoveryDeps(
    { dynamo: clients.dynamo(), ec2: new EC2Client({}), scheduler: new SchedulerClient({}), log: obs.log },
    env,
  );
  return { deps, obs };
}

/** Lambda entry: `{ action, jobId, ... }` as functions/recovery/contracts.ts describes each action. */
export const handler = createRecoveryHandler(() => {
  container ??= fromEnvironment();
  return container;
});
