// Finalizer Lambda: `finalize` publishes the cycle's recovery checkpoint, `abort` ends a failed cycle.
import type { Context } from 'aws-lambda';
import { listProbeStatusReader } from '../../shared/aws/ebs/status.ts';
import { abort, finalize } from '../../shared/engine/cycle/finalize.ts';
import {
  type AbortResult,
  type FinalizeResult,
  finalizerEventSchema,
  parseContract,
  parseEnvironment,
} from '../contracts.ts';
import { ebsPorts } from '../shared/ebs-binding.ts';
import { cloudStatusReader, eventBridgePublisher } from '../shared/optional-sdk.ts';
import { clients, invoke, type Observability, powertools, remainingTime } from '../shared/runtime.ts';
import { type FinalizerDeps, finalizerDeps } from '../shared/wiring.ts';

export interface FinalizerRuntime {
  readonly deps: FinalizerDeps;
  readonly obs: Observability;
}

/** Why a cycle is aborted, from the event: the caller's reason, else the caught state error. */
function abortReason(e: {
  reason?: string | undefined;
  error?: { Error?: string; Cause?: string } | undefined;
}) {
  if (e.reason !== undefined) return e.reason;
  if (e.error !== undefined)
    return [e.error.Error, e.error.Cause].filter(Boolean).join(': ') || 'unknown error';
  return 'aborted without a reason';
}

export function createFinalizerHandler(runtime: () => FinalizerRuntime) {
  return async (event: unknown, context?: Context): Promise<FinalizeResult | AbortResult> => {
    const { deps, obs } = runtime();
    return invoke(obs, context, async (annotate) => {
      const e = parseContract(finalizerEventSchema, event, 'finalizer event');
      annotate({ action: e.action, plan: e.cycle.plan, set: e.cycle.set, cycleId: e.cycle.cycleId });
      const d = { ...deps, remainingMs: remainingTime(context) };
      return e.action === 'finalize' ? finalize(d, e.cycle) : abort(d, e.cycle, abortReason(e));
    });
  };
}

let container: FinalizerRuntime | undefined;

function fromEnvironment(): FinalizerRuntime {
  const env = parseEnvironment('finalizer', process.env);
  const obs = powertools('ferry-finalizer');
  const deps = finalizerDeps(
    {
      dynamo: clients.dynamo(),
      ebs: ebsPorts(clients.ebs(), {
        statusReader: cloudStatusReader(listProbeStatusReader({ client: clients.ebs() })),
      }),
      events: eventBridgePublisher(env.EVENT_BUS_NAME),
      log: obs.log,
      meter: obs.meter,
    },
    env,
  );
  return { deps, obs };
}

/** Lambda entry: `{ action: 'finalize', cycle }` or `{ action: 'abort', cycle, reason?, error? }`. */
export const handler = createFinalizerHandler(() => {
  container ??= fromEnvironment();
  return container;
});
