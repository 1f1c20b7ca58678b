// Type-level checks (they fail `tsc`, not the test run): the plain result types of the cycle core
// and the zod contracts the handlers parse stay assignable both ways, and DynamoStateStore
// implements the CycleCatalog port structurally.
import { describe, expect, expectTypeOf, it } from 'vitest';
import type * as contracts from '../../../functions/contracts.ts';
import type { DynamoStateStore } from '../../../shared/aws/dynamo/state-store.ts';
import type { CycleCatalog } from '../../../shared/engine/cycle/ports.ts';
import type * as core from '../../../shared/engine/cycle/types.ts';
import { TICK_STATUSES } from '../../../shared/engine/cycle/types.ts';

describe('the cycle core types and the handlers contracts', () => {
  it('are assignable both ways', () => {
    // What a handler parses goes into the core as it is.
    expectTypeOf<contracts.CycleInput>().toExtend<core.CycleInput>();
    expectTypeOf<contracts.CycleRef>().toExtend<core.CycleRef>();
    expectTypeOf<contracts.DiffTask>().toExtend<core.DiffTask>();
    // What the core answers is what a handler returns.
    expectTypeOf<core.CycleRef>().toExtend<contracts.CycleRef>();
    expectTypeOf<core.TickResult>().toExtend<contracts.TickResult>();
    expectTypeOf<core.DifferResult>().toExtend<contracts.DifferResult>();
    expectTypeOf<core.FinalizeResult>().toExtend<contracts.FinalizeResult>();
    expectTypeOf<core.AbortResult>().toExtend<contracts.AbortResult>();
    // And back, so neither side grows a field the other lacks unnoticed.
    expectTypeOf<contracts.TickResult>().toExtend<core.TickResult>();
    expectTypeOf<contracts.DifferResult>().toExtend<core.DifferResult>();
    expectTypeOf<contracts.FinalizeResult>().toExtend<core.FinalizeResult>();
    expectTypeOf<contracts.AbortResult>().toExtend<core.AbortResult>();
    expect(TICK_STATUSES).toEqual(['running', 'done', 'stuck', 'failed']);
  });

  it('has DynamoStateStore implement the CycleCatalog port', () => {
    expectTypeOf<DynamoStateStore>().toExtend<CycleCatalog>();
  });
});
