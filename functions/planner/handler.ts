// Planner Lambda: `prepare` opens a cycle, `tick` keeps it moving. A composition root only: parse the
// event, build adapters once per container, call the cycle core.
import type { Context } from 'aws-lambda';
import { prepare } from '../../shared/engine/cycle/prepare.ts';
import { tick } from '../../shared/engine/cycle/tick.ts';
import {
  type PrepareResult,
  parseContract,
  parseEnvironment,
  plannerEventSchema,
  type TickResult,
} from '../contracts.ts';
import { ebsPorts } from '../shared/ebs-binding.ts';
import { clients, invoke, type Observability, powertools, remainingTime } from '../shared/runtime.ts';
import { type PlannerDeps, plannerDeps } from '../shared/wiring.ts';

export interface PlannerRuntime {
  readonly deps: PlannerDeps;
  readonly obs: Observability;
}

/** The handler over given dependencies (the Lambda entry below, tests and the local run). */
export function createPlannerHandler(runtime: () => PlannerRuntime) {
  return async (event: unknown, context?: Context): Promise<PrepareResult | TickResult> => {
    const { deps, obs } = runtime();
    return invoke(obs, context, async (annotate) => {
      const e = parseContract(plannerEventSchema, event, 'planner event');
      annotate({ action: e.action, plan: e.cycle.plan, set: e.cycle.set, cycleId: e.cycle.cycleId });
      if (e.action === 'prepare') return prepare(deps.prepare, e.cycle);
      return tick({ ...deps.tick, remainingMs: remainingTime(context) }, e.cycle, e.round);
    });
  };
}

let container: PlannerRuntime | undefined;

function fromEnvironment(): PlannerRuntime {
  const env = parseEnvironment('planner', process.env);
  const obs = powertools('ferry-planner');
  const deps = plannerDeps(
    {
      dynamo: clients.dynamo(),
      sqs: clients.sqs(),
      ebs: ebsPorts(clients.ebs()),
      log: obs.log,
      meter: obs.meter,
    },
    env,
  );
  return { deps, obs };
}

/** Lambda entry: `{ action: 'prepare', cycle: CycleInput }` or `{ action: 'tick', cycle: CycleRef, round? }`. */
export const handler = createPlannerHandler(() => {
  container ??= fromEnvironment();
  return container;
});
