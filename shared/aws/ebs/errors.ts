// Translates EBS direct API failures into Ferry's domain errors, naming disk, snapshot and block.
import { AbortedError, type ErrorContext, FerryError, TransferError } from '../../engine/errors.ts';

/** The six EBS direct API operations, as the SDK names their commands. */
export type EbsOperation =
  | 'StartSnapshot'
  | 'PutSnapshotBlock'
  | 'CompleteSnapshot'
  | 'ListSnapshotBlocks'
  | 'ListChangedBlocks'
  | 'GetSnapshotBlock';

/** The 512 KiB EBS block: the only size PutSnapshotBlock accepts and GetSnapshotBlock returns. */
export const EBS_BLOCK_SIZE = 524_288;

/** Where an EBS call went: what an operator needs to find the disk, snapshot and block involved. */
export interface EbsCallSite {
  readonly op: EbsOperation;
  /** Ferry's disk id; every message names it when it is known. */
  readonly disk?: string | undefined;
  readonly snapshotId?: string | undefined;
  readonly blockIndex?: number | undefined;
  /** Descriptor sequence number, for errors raised while writing one chunk. */
  readonly seq?: number | undefined;
}

export interface EbsErrorContext extends Omit<ErrorContext, 'seq' | 'disk'>, EbsCallSite {
  retryable: boolean;
  throttled?: boolean;
  /** The SDK exception name (RequestThrottledException, ...), or a Ferry code for local checks. */
  code?: string | undefined;
  /** The `Reason` member of the EBS exception, where it has one. */
  reason?: string | undefined;
  httpStatus?: number | undefined;
}

/**
 * An EBS direct API call failed. `retryable`/`throttled` tell the retry layer and the adaptive
 * controller what to do; the message names the operation, disk, snapshot and block.
 */
export class EbsError extends TransferError {
  readonly op: EbsOperation;
  readonly snapshotId: string | undefined;
  readonly blockIndex: number | undefined;
  readonly code: string | undefined;
  readonly reason: string | undefined;
  readonly httpStatus: number | undefined;

  constructor(message: string, ctx: EbsErrorContext) {
    super(message, {
      ...ctx,
      offset: ctx.offset ?? (ctx.blockIndex === undefined ? undefined : ctx.blockIndex * EBS_BLOCK_SIZE),
    });
    this.name = 'EbsError';
    this.op = ctx.op;
    this.snapshotId = ctx.snapshotId;
    this.blockIndex = ctx.blockIndex;
    this.code = ctx.code;
    this.reason = ctx.reason;
    this.httpStatus = ctx.httpStatus;
  }

  /** A freshly started snapshot that EBS does not know yet (or any more). */
  get snapshotNotFound(): boolean {
    return (
      this.code === 'ResourceNotFoundException' &&
      (this.reason ?? 'SNAPSHOT_NOT_FOUND') === 'SNAPSHOT_NOT_FOUND'
    );
  }
}

/**
 * A target snapshot that can no longer become a checkpoint: it ended in `error`, timed out, did not
 * complete in time, or cannot be resumed. Never retryable: the cycle has to start a new snapshot.
 */
export class EbsSnapshotError extends FerryError {
  readonly snapshotId: string | undefined;

  constructor(message: string, ctx: ErrorContext & { snapshotId?: string | undefined }) {
    super(message, ctx);
    this.name = 'EbsSnapshotError';
    this.snapshotId = ctx.snapshotId;
  }
}

// Answers EBS asks clients to back off from; they also step the adaptive window down.
// ConcurrentLimitExceededException is the "too many requests in flight" limit: the same medicine.
const THROTTLED = new Set([
  'RequestThrottledException',
  'ThrottlingException',
  'Throttling',
  'TooManyRequestsException',
  'ConcurrentLimitExceededException',
  'SlowDown',
]);

// Service-side or transport trouble that usually clears: "always retry 5xx" says the API reference.
const TRANSIENT = new Set([
  'InternalServerException',
  'InternalServerError',
  'InternalFailure',
  'ServiceUnavailableException',
  'ServiceUnavailable',
  'RequestTimeout',
  'RequestTimeoutException',
  'TimeoutError',
]);
const TRANSIENT_CODES = new Set([
  'ECONNRESET',
  'ECONNREFUSED',
  'ECONNABORTED',
  'ETIMEDOUT',
  'EPIPE',
  'EAI_AGAIN',
  'ENOTFOUND',
  'ENETUNREACH',
  'EHOSTUNREACH',
  'UND_ERR_SOCKET',
]);

interface SdkErrorShape {
  name?: unknown;
  message?: unknown;
  code?: unknown;
  Reason?: unknown;
  $metadata?: { httpStatusCode?: unknown } | undefined;
  $retryable?: { throttling?: unknown } | undefined;
}

/** "disk d1: PutSnapshotBlock of block 12 in snapshot snap-0a1b" — the start of every message. */
export function describeCall(site: EbsCallSite): string {
  const disk = site.disk === undefined ? '' : `disk ${site.disk}: `;
  const block = site.blockIndex === undefined ? '' : ` of block ${site.blockIndex}`;
  // A StartSnapshot names no snapshot of its own yet; the one it names is the parent.
  const snapshot =
    site.snapshotId === undefined
      ? ''
      : site.op === 'StartSnapshot'
        ? ` (parent snapshot ${site.snapshotId})`
        : ` in snapshot ${site.snapshotId}`;
  return `${disk}EBS ${site.op}${block}${snapshot}`;
}

/** What an operator can do about a permanent failure, by exception. */
function advice(name: string, reason: string | undefined, site: EbsCallSite): string {
  switch (name) {
    case 'AccessDeniedException':
      return `check the role's ebs:${site.op} permission and, for encrypted snapshots, its use of the KMS key`;
    case 'ServiceQuotaExceededException':
      return 'the account has reached its limit of pending snapshots (100 by default): complete or let pending snapshots time out, or raise the quota';
    case 'ConflictException':
      return 'the ClientToken was used before for a StartSnapshot with other parameters (size, parent, encryption, timeout)';
    case 'ResourceNotFoundException':
      return 'the snapshot does not exist (deleted, another account or region, or never started)';
    case 'ValidationException':
      if (reason === 'WRITE_REQUEST_TIMEOUT')
        return 'the snapshot passed its Timeout and EBS cancelled it: start the cycle again';
      if (reason === 'UNRELATED_SNAPSHOTS') return 'the two snapshots are not of the same volume lineage';
      if (reason === 'INVALID_CUSTOMER_KEY') return 'the KMS key ARN is not usable';
      return 'the request is invalid; this is a defect or a misconfiguration, not a passing condition';
    default:
      return 'not retried: the failure is not one EBS documents as transient';
  }
}

/**
 * Maps an SDK failure of one EBS call to a FerryError. FerryErrors pass through unchanged. Throttling,
 * 5xx and transport failures become retryable EbsErrors (throttled for throttling); everything else
 * is permanent: AccessDenied, Validation, ResourceNotFound, Conflict, ServiceQuotaExceeded, unknown.
 */
export function translateEbsError(err: unknown, site: EbsCallSite): FerryError {
  if (err instanceof FerryError) return err;
  const e = (typeof err === 'object' && err !== null ? err : {}) as SdkErrorShape;
  const name = typeof e.name === 'string' && e.name !== '' ? e.name : 'Error';
  const reason = typeof e.Reason === 'string' ? e.Reason : undefined;
  const code = typeof e.code === 'string' ? e.code : undefined;
  const status = typeof e.$metadata?.httpStatusCode === 'number' ? e.$metadata.httpStatusCode : undefined;
  const text = typeof e.message === 'string' && e.message !== '' ? e.message : String(err);
  const detail = `${name}${reason ? ` ${reason}` : ''}${status ? `, HTTP ${status}` : ''}: ${text}`;
  const where = describeCall(site);
  const ctx = {
    ...site,
    cause: err,
    code: name,
    reason,
    httpStatus: status,
  };

  if (THROTTLED.has(name) || status === 429 || e.$retryable?.throttling === true) {
    return new EbsError(`${where} was throttled (${detail})`, { ...ctx, retryable: true, throttled: true });
  }
  if (
    TRANSIENT.has(name) ||
    (status !== undefined && status >= 500) ||
    (code !== undefined && TRANSIENT_CODES.has(code))
  ) {
    return new EbsError(`${where} failed (${detail}); may succeed on retry`, { ...ctx, retryable: true });
  }
  if (e.$metadata === undefined) {
    // No HTTP exchange behind it: a client-side bug, a misconfigured client, or a mocked SDK.
    return new EbsError(`${where} failed before EBS answered (${detail})`, { ...ctx, retryable: false });
  }
  return new EbsError(`${where} was refused (${detail}): ${advice(name, reason, site)}`, {
    ...ctx,
    retryable: false,
  });
}

/** The reply of an EBS call lacks a field the API promises (or has one out of range). */
export function malformedReply(site: EbsCallSite, what: string): EbsError {
  return new EbsError(`${describeCall(site)} returned a malformed reply: ${what}`, {
    ...site,
    code: 'MalformedReply',
    retryable: false,
  });
}

/** Our per-attempt timer fired before EBS answered. Retryable: the next attempt may be faster. */
export function attemptTimedOut(site: EbsCallSite, ms: number): EbsError {
  return new EbsError(`${describeCall(site)} timed out after ${ms} ms (no answer); may succeed on retry`, {
    ...site,
    code: 'TimeoutError',
    retryable: true,
  });
}

export function aborted(site: EbsCallSite): AbortedError {
  return new AbortedError(`${describeCall(site)} aborted`, {
    disk: site.disk,
    offset: site.blockIndex === undefined ? undefined : site.blockIndex * EBS_BLOCK_SIZE,
  });
}
