// The cycle's error tree; `name` is what a Step Functions Catch matches on, so each class sets one.
import { type ErrorContext, FerryError } from '../errors.ts';

export interface CycleErrorContext extends ErrorContext {
  plan?: string | undefined;
  set?: string | undefined;
  cycleId?: string | undefined;
}

/** Base of the cycle's errors: carries the cycle it is about. */
export class CycleError extends FerryError {
  readonly plan: string | undefined;
  readonly set: string | undefined;
  readonly cycleId: string | undefined;
  constructor(message: string, ctx: CycleErrorContext = {}) {
    super(message, ctx);
    this.name = 'CycleError';
    this.plan = ctx.plan;
    this.set = ctx.set;
    this.cycleId = ctx.cycleId;
  }
}

/** Another cycle of the plan holds its lock: this cycle must not start (cycles never overlap). */
export class PlanBusyError extends CycleError {
  readonly holder: string | undefined;
  readonly lockExpiresAt: number | undefined;
  constructor(
    message: string,
    ctx: CycleErrorContext & { holder?: string | undefined; lockExpiresAt?: number | undefined },
  ) {
    super(message, ctx);
    this.name = 'PlanBusyError';
    this.holder = ctx.holder;
    this.lockExpiresAt = ctx.lockExpiresAt;
  }
}

/** The cycle's lock was taken over (it expired): everything this cycle does from now on is void. */
export class PlanLockLostError extends CycleError {
  constructor(message: string, ctx: CycleErrorContext) {
    super(message, ctx);
    this.name = 'PlanLockLostError';
  }
}

/** The stored state of a cycle does not allow the request (unknown cycle, aborted, published). */
export class CycleStateError extends CycleError {
  constructor(message: string, ctx: CycleErrorContext) {
    super(message, ctx);
    this.name = 'CycleStateError';
  }
}

/**
 * The cycle cannot produce a valid checkpoint: a disk failed validation, a target snapshot ended in
 * `error`, a descriptor failed permanently. The state machine aborts the cycle on this.
 */
export class CycleFailedError extends CycleError {
  constructor(message: string, ctx: CycleErrorContext) {
    super(message, ctx);
    this.name = 'CycleFailedError';
  }
}
