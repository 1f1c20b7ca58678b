// Differ Lambda: lists one EBS source disk's changed blocks and stores the cycle's descriptors.
import type { Context } from 'aws-lambda';
import { runDiffer } from '../../shared/engine/cycle/differ.ts';
import { type DifferResult, differEventSchema, parseContract, parseEnvironment } from '../contracts.ts';
import { ebsPorts } from '../shared/ebs-binding.ts';
import { clients, invoke, type Observability, powertools, remainingTime } from '../shared/runtime.ts';
import { type DifferContainerDeps, differDeps } from '../shared/wiring.ts';

export interface DifferRuntime {
  readonly deps: DifferContainerDeps;
  readonly obs: Observability;
}

export function createDifferHandler(runtime: () => DifferRuntime) {
  return async (event: unknown, context?: Context): Promise<DifferResult> => {
    const { deps, obs } = runtime();
    return invoke(obs, context, async (annotate) => {
      const task = parseContract(differEventSchema, event, 'differ event');
      annotate({ set: task.set, cycleId: task.cycleId, disk: task.disk });
      return runDiffer({ ...deps, remainingMs: remainingTime(context) }, task);
    });
  };
}

let container: DifferRuntime | undefined;

function fromEnvironment(): DifferRuntime {
  const env = parseEnvironment('differ', process.env);
  const obs = powertools('ferry-differ');
  const deps = differDeps(
    { dynamo: clients.dynamo(), ebs: ebsPorts(clients.ebs()), log: obs.log, meter: obs.meter },
    env,
  );
  return { deps, obs };
}

/** Lambda entry: `{ set, cycleId, disk }` (one item of prepare's `disks`). */
export const handler = createDifferHandler(() => {
  container ??= fromEnvironment();
  return container;
});
