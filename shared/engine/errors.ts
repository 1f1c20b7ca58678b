// The engine's error tree. Every error names the disk, offset or setting an operator needs to act.

export interface ErrorContext {
  disk?: string;
  offset?: number;
  seq?: number;
  setting?: string;
  cause?: unknown;
}

export class FerryError extends Error {
  readonly disk: string | undefined;
  readonly offset: number | undefined;
  readonly seq: number | undefined;
  readonly setting: string | undefined;

  constructor(message: string, ctx: ErrorContext = {}) {
    super(message, ctx.cause === undefined ? undefined : { cause: ctx.cause });
    this.name = 'FerryError';
    this.disk = ctx.disk;
    this.offset = ctx.offset;
    this.seq = ctx.seq;
    this.setting = ctx.setting;
  }
}

/** A setting or input that cannot work; fix the configuration and run again. */
export class ConfigError extends FerryError {
  constructor(message: string, ctx: ErrorContext = {}) {
    super(message, ctx);
    this.name = 'ConfigError';
  }
}

/** A change map (CBT, diff, extents file) that contradicts the disk it describes. */
export class ChangeMapError extends FerryError {
  constructor(message: string, ctx: ErrorContext = {}) {
    super(message, ctx);
    this.name = 'ChangeMapError';
  }
}

/** Data that did not arrive or land intact: a checksum or length mismatch. Never ignored. */
export class IntegrityError extends FerryError {
  constructor(message: string, ctx: ErrorContext = {}) {
    super(message, ctx);
    this.name = 'IntegrityError';
  }
}

/**
 * A source or target failure. `retryable` tells the retry layer whether trying again can help
 * (throttling, a dropped connection) or not (access denied, a disk that is gone).
 */
export class TransferError extends FerryError {
  readonly retryable: boolean;
  readonly throttled: boolean;

  constructor(message: string, ctx: ErrorContext & { retryable: boolean; throttled?: boolean }) {
    super(message, ctx);
    this.name = 'TransferError';
    this.retryable = ctx.retryable;
    this.throttled = ctx.throttled ?? false;
  }
}

/**
 * The checkpoint catalog cannot be trusted as it is: an entry is damaged. `path` names the entry,
 * `sequence` its checkpoint number (from its name), so a caller can tell whether it is the latest.
 */
export class CatalogError extends FerryError {
  readonly path: string;
  readonly sequence: number | undefined;

  constructor(message: string, ctx: ErrorContext & { path: string; sequence?: number }) {
    super(message, ctx);
    this.name = 'CatalogError';
    this.path = ctx.path;
    this.sequence = ctx.sequence;
  }
}

/** The run was cancelled (AbortSignal); nothing is published. */
export class AbortedError extends FerryError {
  constructor(message = 'replication aborted', ctx: ErrorContext = {}) {
    super(message, ctx);
    this.name = 'AbortedError';
  }
}

export function errorMessage(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
