// The recovery's error tree: a refusal before anything is created (permanent, names the field, machine,
// disk or checkpoint at fault) and a cloud request that failed (retryable or not).
import { type ErrorContext, FerryError } from '../errors.ts';

export interface RecoveryErrorContext extends ErrorContext {
  /** The event field at fault, as a path (`machines[0].instanceType`, `checkpoint`). */
  field?: string | undefined;
  machine?: string | undefined;
  checkpoint?: string | undefined;
}

/**
 * A recovery that cannot work as asked, found before anything was created: an unknown checkpoint, a
 * disk assigned twice, a machine that could not boot. Permanent: asking again cannot help.
 */
export class RecoveryRefusedError extends FerryError {
  readonly field: string | undefined;
  readonly machine: string | undefined;
  readonly checkpoint: string | undefined;
  constructor(message: string, ctx: RecoveryErrorContext = {}) {
    super(message, { ...ctx, setting: ctx.setting ?? ctx.field });
    this.name = 'RecoveryRefusedError';
    this.field = ctx.field;
    this.machine = ctx.machine;
    this.checkpoint = ctx.checkpoint;
  }
}

/**
 * A cloud request of the recovery failed. `retryable` (throttling, a 5xx, capacity that may come
 * back) is the name `CloudRetryableError`, so a state machine's Retry can match it by name.
 */
export class CloudRequestError extends FerryError {
  readonly retryable: boolean;
  /** The cloud's own error code (`InvalidSubnetID.NotFound`), for the operator. */
  readonly code: string | undefined;
  constructor(message: string, ctx: ErrorContext & { retryable: boolean; code?: string | undefined }) {
    super(message, ctx);
    this.name = ctx.retryable ? 'CloudRetryableError' : 'CloudRequestError';
    this.retryable = ctx.retryable;
    this.code = ctx.code;
  }
}
