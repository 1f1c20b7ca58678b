// HTTP emulator of the EBS direct APIs that the real @aws-sdk/client-ebs talks to through `endpoint`.
//
// It speaks the restJson1 wire format the SDK's schemas describe (paths, x-amz-* headers, query
// names, x-amzn-ErrorType + JSON error bodies), adds the account and snapshot quotas as token buckets
// on the emulator's clock, seeded per-call latency, and a fault handle for tests and benchmarks.
// Requests are not signature-checked: any SigV4 credentials are accepted.
import { randomUUID } from 'node:crypto';
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { seededRandom } from '../../../shared/engine/random.ts';
import {
  type AccessDeniedReason,
  BLOCK_SIZE,
  type CompletionMismatchMode,
  EbsApiError,
  EbsState,
  type PageShaping,
  type SnapshotRecord,
  snapshotNotFound,
  type Tag,
  type ThrottleReason,
  validation,
} from './state.ts';

export const EBS_OPERATIONS = [
  'StartSnapshot',
  'PutSnapshotBlock',
  'CompleteSnapshot',
  'ListSnapshotBlocks',
  'ListChangedBlocks',
  'GetSnapshotBlock',
] as const;
export type EbsOperation = (typeof EBS_OPERATIONS)[number];
type OperationSelector = EbsOperation | '*';
type ListOperation = 'ListSnapshotBlocks' | 'ListChangedBlocks';

/**
 * Requests per second (token buckets holding one second of burst) and the pending-snapshot count.
 * Defaults are the EBS direct API quotas: 1,000 Put/Get per snapshot and per account, 10/s for
 * StartSnapshot and CompleteSnapshot, 50/s for each List call, 100 pending snapshots per account.
 * Use Infinity to switch one off.
 */
export interface EbsQuotas {
  putSnapshotBlockPerSnapshot: number;
  getSnapshotBlockPerSnapshot: number;
  putSnapshotBlockPerAccount: number;
  getSnapshotBlockPerAccount: number;
  startSnapshotPerAccount: number;
  completeSnapshotPerAccount: number;
  listSnapshotBlocksPerAccount: number;
  listChangedBlocksPerAccount: number;
  pendingSnapshotsPerAccount: number;
}

export const DEFAULT_QUOTAS: Readonly<EbsQuotas> = {
  putSnapshotBlockPerSnapshot: 1000,
  getSnapshotBlockPerSnapshot: 1000,
  putSnapshotBlockPerAccount: 1000,
  getSnapshotBlockPerAccount: 1000,
  startSnapshotPerAccount: 10,
  completeSnapshotPerAccount: 10,
  listSnapshotBlocksPerAccount: 50,
  listChangedBlocksPerAccount: 50,
  pendingSnapshotsPerAccount: 100,
};

export interface LatencySpec {
  /** Added to every call, in real milliseconds (latency is real time even with an injected clock). */
  fixedMs?: number;
  /** Uniform extra delay in [0, jitterMs), drawn from the seeded generator. */
  jitterMs?: number;
}

export interface EbsEmulatorOptions {
  /** The emulator's clock (ms since epoch) for quotas, timeouts, completion and token expiry. */
  now?: () => number;
  /** Seed for snapshot ids, completion delays and latency jitter. */
  seed?: number;
  /** OwnerId in StartSnapshot answers and the account in default KMS key ARNs. */
  accountId?: string;
  region?: string;
  quotas?: Partial<EbsQuotas>;
  latency?: LatencySpec & { perOperation?: Partial<Record<EbsOperation, LatencySpec>> };
  /** Time from an accepted CompleteSnapshot to `completed`/`error`; default uniform 0–50 ms. */
  completionDelayMs?: number | { min: number; max: number };
  completionMismatch?: CompletionMismatchMode;
  /** Block indexes a List page examines before it stops (see PageShaping); default: no limit. */
  listScanWindowBlocks?: number;
}

export interface FailOptions {
  /**
   * Carry the operation out, then answer with the error anyway: the "it worked but the answer was
   * lost" case, which is what makes ClientToken idempotency matter.
   */
  applied?: boolean;
}

/** Fault injection. Queued faults (`...Next`) are used up one call at a time, oldest first. */
export interface EbsFaults {
  /** The next `n` calls of `op` answer RequestThrottledException with `reason`. */
  throttleNext(op: OperationSelector, n: number, reason?: ThrottleReason): void;
  /** The next `n` calls answer 500 InternalServerException or a 503 ServiceUnavailableException. */
  failNext(op: OperationSelector, n: number, status?: 500 | 503, opts?: FailOptions): void;
  /**
   * For `ms` after each StartSnapshot (emulator clock), PutSnapshotBlock and CompleteSnapshot on that
   * snapshot answer "does not exist", as freshly started snapshots sometimes do in the field. 0 = off.
   */
  notFoundAfterStart(ms: number): void;
  /** Every call of `op` answers AccessDeniedException until `allowAccess` or `reset`. */
  accessDenied(op: OperationSelector, reason?: AccessDeniedReason): void;
  allowAccess(op: OperationSelector): void;
  /** The next `n` pages of a List call come back empty, with a NextToken that resumes in place. */
  emptyPagesNext(op: ListOperation | '*', n: number): void;
  /** The next `n` accepted CompleteSnapshot calls end in `error` instead of `completed`. */
  errorOnComplete(n: number, message?: string): void;
  reset(): void;
}

/** Per-operation call accounting, live; benchmarks read it, tests assert on it. */
export class EbsCounters {
  readonly calls = zeroPerOperation();
  readonly succeeded = zeroPerOperation();
  /** Answered RequestThrottledException, by quota or injected. */
  readonly throttled = zeroPerOperation();
  /** Any other error answer. */
  readonly failed = zeroPerOperation();
  readonly throttledByReason: Record<ThrottleReason, number> = {
    ACCOUNT_THROTTLED: 0,
    DEPENDENCY_REQUEST_THROTTLED: 0,
    RESOURCE_LEVEL_THROTTLE: 0,
  };

  reset(): void {
    for (const op of EBS_OPERATIONS) {
      this.calls[op] = 0;
      this.succeeded[op] = 0;
      this.throttled[op] = 0;
      this.failed[op] = 0;
    }
    for (const reason of Object.keys(this.throttledByReason) as ThrottleReason[])
      this.throttledByReason[reason] = 0;
  }
}

export interface EbsEmulator {
  /** http://127.0.0.1:<port>, for the EBSClient `endpoint` option. */
  readonly endpoint: string;
  readonly state: EbsState;
  readonly faults: EbsFaults;
  readonly counters: EbsCounters;
  stop(): Promise<void>;
}

function zeroPerOperation(): Record<EbsOperation, number> {
  return {
    StartSnapshot: 0,
    PutSnapshotBlock: 0,
    CompleteSnapshot: 0,
    ListSnapshotBlocks: 0,
    ListChangedBlocks: 0,
    GetSnapshotBlock: 0,
  };
}

/** Capacity is one second of the rate (at least one request): the burst a fresh bucket allows. */
class TokenBucket {
  private tokens: number;
  private last: number;
  private readonly capacity: number;

  constructor(
    private readonly ratePerSecond: number,
    now: number,
  ) {
    this.capacity = Math.max(1, ratePerSecond);
    this.tokens = this.capacity;
    this.last = now;
  }

  available(now: number): boolean {
    if (this.ratePerSecond === Number.POSITIVE_INFINITY) return true;
    if (now > this.last) {
      this.tokens = Math.min(this.capacity, this.tokens + ((now - this.last) / 1000) * this.ratePerSecond);
      this.last = now;
    }
    return this.tokens >= 1;
  }

  take(): void {
    if (this.ratePerSecond !== Number.POSITIVE_INFINITY) this.tokens -= 1;
  }
}

const OPTION_KEYS = new Set([
  'now',
  'seed',
  'accountId',
  'region',
  'quotas',
  'latency',
  'completionDelayMs',
  'completionMismatch',
  'listScanWindowBlocks',
]);

/** Unknown keys are refused: a misspelt quota would otherwise silently run with the default. */
function checkOptions(opts: EbsEmulatorOptions): void {
  for (const key of Object.keys(opts)) {
    if (!OPTION_KEYS.has(key)) throw new Error(`startEbsEmulator: unknown option '${key}'`);
  }
  for (const [key, value] of Object.entries(opts.quotas ?? {})) {
    if (!(key in DEFAULT_QUOTAS)) throw new Error(`startEbsEmulator: unknown quota '${key}'`);
    if (typeof value !== 'number' || !(value > 0)) {
      throw new Error(`startEbsEmulator: quota '${key}' must be a positive number (Infinity to disable)`);
    }
  }
  const latencyKeys = new Set(['fixedMs', 'jitterMs', 'perOperation']);
  for (const key of Object.keys(opts.latency ?? {})) {
    if (!latencyKeys.has(key)) throw new Error(`startEbsEmulator: unknown latency option '${key}'`);
  }
  for (const op of Object.keys(opts.latency?.perOperation ?? {})) {
    if (!(EBS_OPERATIONS as readonly string[]).includes(op)) {
      throw new Error(`startEbsEmulator: unknown operation '${op}' in latency.perOperation`);
    }
  }
}

interface Route {
  op: EbsOperation;
  snapshotId?: string;
  blockIndex?: number;
}

/** Paths exactly as the SDK's operation schemas build them. */
function route(method: string, path: string): Route | undefined {
  const parts = path.split('/').filter((p) => p !== '');
  if (parts[0] !== 'snapshots') return undefined;
  const decode = (s: string | undefined): string => decodeURIComponent(s ?? '');
  const index = (s: string | undefined): number =>
    s !== undefined && /^\d+$/.test(s) ? Number(s) : Number.NaN;
  if (method === 'POST' && parts.length === 1) return { op: 'StartSnapshot' };
  if (method === 'POST' && parts.length === 3 && parts[1] === 'completion') {
    return { op: 'CompleteSnapshot', snapshotId: decode(parts[2]) };
  }
  if (parts.length === 3 && parts[2] === 'blocks' && method === 'GET') {
    return { op: 'ListSnapshotBlocks', snapshotId: decode(parts[1]) };
  }
  if (parts.length === 3 && parts[2] === 'changedblocks' && method === 'GET') {
    return { op: 'ListChangedBlocks', snapshotId: decode(parts[1]) };
  }
  if (parts.length === 4 && parts[2] === 'blocks') {
    if (method === 'PUT')
      return { op: 'PutSnapshotBlock', snapshotId: decode(parts[1]), blockIndex: index(parts[3]) };
    if (method === 'GET')
      return { op: 'GetSnapshotBlock', snapshotId: decode(parts[1]), blockIndex: index(parts[3]) };
  }
  return undefined;
}

/** Manual parsing: URLSearchParams would turn a raw '+' of a base64 token into a space. */
function parseQuery(search: string): Map<string, string> {
  const out = new Map<string, string>();
  for (const pair of search.split('&')) {
    if (pair === '') continue;
    const eq = pair.indexOf('=');
    const key = decodeURIComponent(eq < 0 ? pair : pair.slice(0, eq));
    const value = eq < 0 ? '' : decodeURIComponent(pair.slice(eq + 1));
    out.set(key, value);
  }
  return out;
}

const intOrNaN = (value: string): number => (/^-?\d+$/.test(value) ? Number(value) : Number.NaN);

function header(req: IncomingMessage, name: string): string | undefined {
  const value = req.headers[name.toLowerCase()];
  return Array.isArray(value) ? value[0] : value;
}

function intHeader(req: IncomingMessage, name: string): number | undefined {
  const value = header(req, name);
  return value === undefined ? undefined : intOrNaN(value.trim());
}

function intQuery(query: Map<string, string>, name: string): number | undefined {
  const value = query.get(name);
  return value === undefined ? undefined : intOrNaN(value);
}

/**
 * Reads the whole body even when it is larger than `cap`: answering before the client has sent its
 * body would surface as a reset connection instead of the intended error.
 */
async function readBody(req: IncomingMessage, cap: number): Promise<{ body: Buffer; length: number }> {
  const chunks: Buffer[] = [];
  let kept = 0;
  let length = 0;
  for await (const chunk of req as AsyncIterable<Buffer>) {
    length += chunk.length;
    if (kept < cap) {
      const part = chunk.subarray(0, cap - kept);
      chunks.push(part);
      kept += part.length;
    }
  }
  return { body: Buffer.concat(chunks, kept), length };
}

function parseStartSnapshotBody(body: Buffer): {
  volumeSize: number;
  parentSnapshotId?: string;
  description?: string;
  tags?: Tag[];
  clientToken?: string;
  encrypted?: boolean;
  kmsKeyArn?: string;
  timeoutMinutes?: number;
} {
  let json: unknown;
  try {
    json = body.length === 0 ? {} : JSON.parse(body.toString('utf8'));
  } catch {
    throw validation('INVALID_PARAMETER_VALUE', 'The request body is not valid JSON.');
  }
  if (typeof json !== 'object' || json === null || Array.isArray(json)) {
    throw validation('INVALID_PARAMETER_VALUE', 'The request body must be a JSON object.');
  }
  const o = json as Record<string, unknown>;
  const str = (key: string): string | undefined => {
    const v = o[key];
    if (v === undefined || v === null) return undefined;
    if (typeof v !== 'string') throw validation('INVALID_PARAMETER_VALUE', `${key} must be a string.`);
    return v;
  };
  const num = (key: string): number | undefined => {
    const v = o[key];
    if (v === undefined || v === null) return undefined;
    if (typeof v !== 'number') throw validation('INVALID_PARAMETER_VALUE', `${key} must be a number.`);
    return v;
  };
  const volumeSize = num('VolumeSize');
  if (volumeSize === undefined) throw validation('INVALID_VOLUME_SIZE', 'VolumeSize is required.');
  const encrypted = o.Encrypted;
  if (encrypted !== undefined && encrypted !== null && typeof encrypted !== 'boolean') {
    throw validation('INVALID_PARAMETER_VALUE', 'Encrypted must be a boolean.');
  }
  const tags = o.Tags;
  if (tags !== undefined && tags !== null && !Array.isArray(tags)) {
    throw validation('INVALID_TAG', 'Tags must be a list.');
  }
  const out: ReturnType<typeof parseStartSnapshotBody> = { volumeSize };
  const parentSnapshotId = str('ParentSnapshotId');
  if (parentSnapshotId !== undefined) out.parentSnapshotId = parentSnapshotId;
  const description = str('Description');
  if (description !== undefined) out.description = description;
  if (Array.isArray(tags)) out.tags = tags as Tag[];
  const clientToken = str('ClientToken');
  if (clientToken !== undefined) out.clientToken = clientToken;
  if (typeof encrypted === 'boolean') out.encrypted = encrypted;
  const kmsKeyArn = str('KmsKeyArn');
  if (kmsKeyArn !== undefined) out.kmsKeyArn = kmsKeyArn;
  const timeout = num('Timeout');
  if (timeout !== undefined) out.timeoutMinutes = timeout;
  return out;
}

/** Timestamps in restJson1 bodies are epoch seconds. */
const epochSeconds = (ms: number): number => ms / 1000;

function startSnapshotResponse(s: SnapshotRecord): Record<string, unknown> {
  const out: Record<string, unknown> = {
    SnapshotId: s.id,
    OwnerId: s.ownerId,
    Status: s.status,
    StartTime: epochSeconds(s.createdAt),
    VolumeSize: s.volumeSize,
    BlockSize: s.blockSize,
  };
  if (s.description !== undefined) out.Description = s.description;
  if (s.tags.length > 0) out.Tags = s.tags;
  if (s.parentId !== undefined) out.ParentSnapshotId = s.parentId;
  if (s.kmsKeyArn !== undefined) out.KmsKeyArn = s.kmsKeyArn;
  return out;
}

interface Reply {
  status: number;
  headers: Record<string, string>;
  body: Buffer | string;
}

const json = (status: number, body: unknown): Reply => ({
  status,
  headers: { 'content-type': 'application/json' },
  body: JSON.stringify(body),
});

/**
 * The error wire shape the SDK's restJson1 protocol reads: the type from x-amzn-ErrorType, members
 * (Message, Reason) from the JSON body by their model names.
 */
function errorReply(type: string, status: number, message: string, reason?: string): Reply {
  const body: Record<string, string> = { Message: message };
  if (reason !== undefined) body.Reason = reason;
  return {
    status,
    headers: { 'content-type': 'application/json', 'x-amzn-ErrorType': type },
    body: JSON.stringify(body),
  };
}

const apiErrorReply = (err: EbsApiError): Reply => errorReply(err.type, err.status, err.message, err.reason);

interface QueuedFault<T> {
  op: OperationSelector;
  remaining: number;
  value: T;
}

function takeFault<T>(queue: QueuedFault<T>[], op: EbsOperation): T | undefined {
  const index = queue.findIndex((f) => f.op === '*' || f.op === op);
  if (index < 0) return undefined;
  const fault = queue[index] as QueuedFault<T>;
  fault.remaining -= 1;
  if (fault.remaining <= 0) queue.splice(index, 1);
  return fault.value;
}

function checkCount(n: number): void {
  if (!Number.isSafeInteger(n) || n < 1) throw new Error(`fault count must be a positive integer, got ${n}`);
}

export async function startEbsEmulator(opts: EbsEmulatorOptions = {}): Promise<EbsEmulator> {
  checkOptions(opts);
  const now = opts.now ?? Date.now;
  const random = seededRandom(opts.seed ?? 0x5eed);
  const quotas: EbsQuotas = { ...DEFAULT_QUOTAS, ...opts.quotas };
  const accountId = opts.accountId ?? '123456789012';
  const delaySpec = opts.completionDelayMs ?? { min: 0, max: 50 };
  const completionDelayMs =
    typeof delaySpec === 'number'
      ? () => delaySpec
      : () => delaySpec.min + random() * (delaySpec.max - delaySpec.min);
  const state = new EbsState({
    now,
    random,
    accountId,
    region: opts.region ?? 'us-east-1',
    completionDelayMs,
    completionMismatch: opts.completionMismatch ?? 'error-state',
  });
  const counters = new EbsCounters();

  // ---- faults ----
  const throttleQueue: QueuedFault<ThrottleReason>[] = [];
  const failQueue: QueuedFault<{ status: 500 | 503; applied: boolean }>[] = [];
  const emptyPageQueue: QueuedFault<true>[] = [];
  const denied = new Map<OperationSelector, AccessDeniedReason>();
  const completeErrors: { remaining: number; message: string }[] = [];
  let notFoundWindowMs = 0;

  const faults: EbsFaults = {
    throttleNext(op, n, reason = 'ACCOUNT_THROTTLED') {
      checkCount(n);
      throttleQueue.push({ op, remaining: n, value: reason });
    },
    failNext(op, n, status = 500, failOpts = {}) {
      checkCount(n);
      failQueue.push({ op, remaining: n, value: { status, applied: failOpts.applied === true } });
    },
    notFoundAfterStart(ms) {
      if (!(ms >= 0)) throw new Error(`notFoundAfterStart: ms must be >= 0, got ${ms}`);
      notFoundWindowMs = ms;
    },
    accessDenied(op, reason = 'UNAUTHORIZED_ACCOUNT') {
      denied.set(op, reason);
    },
    allowAccess(op) {
      denied.delete(op);
    },
    emptyPagesNext(op, n) {
      checkCount(n);
      emptyPageQueue.push({ op, remaining: n, value: true });
    },
    errorOnComplete(n, message = 'Injected fault: the snapshot could not be completed.') {
      checkCount(n);
      completeErrors.push({ remaining: n, message });
    },
    reset() {
      throttleQueue.length = 0;
      failQueue.length = 0;
      emptyPageQueue.length = 0;
      completeErrors.length = 0;
      denied.clear();
      notFoundWindowMs = 0;
    },
  };

  // ---- quotas ----
  const t0 = now();
  const accountBuckets: Record<EbsOperation, TokenBucket> = {
    StartSnapshot: new TokenBucket(quotas.startSnapshotPerAccount, t0),
    PutSnapshotBlock: new TokenBucket(quotas.putSnapshotBlockPerAccount, t0),
    CompleteSnapshot: new TokenBucket(quotas.completeSnapshotPerAccount, t0),
    ListSnapshotBlocks: new TokenBucket(quotas.listSnapshotBlocksPerAccount, t0),
    ListChangedBlocks: new TokenBucket(quotas.listChangedBlocksPerAccount, t0),
    GetSnapshotBlock: new TokenBucket(quotas.getSnapshotBlockPerAccount, t0),
  };
  const snapshotBuckets = new Map<string, { put: TokenBucket; get: TokenBucket }>();

  /** Throttles answer before any validation, like a front door. Returns the Reason when throttled. */
  function admit(r: Route): ThrottleReason | undefined {
    const t = now();
    let resource: TokenBucket | undefined;
    if ((r.op === 'PutSnapshotBlock' || r.op === 'GetSnapshotBlock') && r.snapshotId !== undefined) {
      // Buckets only for snapshots that exist, so junk ids cannot grow the map.
      if (state.getSnapshot(r.snapshotId)) {
        let buckets = snapshotBuckets.get(r.snapshotId);
        if (!buckets) {
          buckets = {
            put: new TokenBucket(quotas.putSnapshotBlockPerSnapshot, t),
            get: new TokenBucket(quotas.getSnapshotBlockPerSnapshot, t),
          };
          snapshotBuckets.set(r.snapshotId, buckets);
        }
        resource = r.op === 'PutSnapshotBlock' ? buckets.put : buckets.get;
      }
    }
    const account = accountBuckets[r.op];
    if (resource && !resource.available(t)) return 'RESOURCE_LEVEL_THROTTLE';
    if (!account.available(t)) return 'ACCOUNT_THROTTLED';
    resource?.take();
    account.take();
    return undefined;
  }

  function latencyFor(op: EbsOperation): number {
    const spec = { ...opts.latency, ...opts.latency?.perOperation?.[op] };
    const fixed = spec.fixedMs ?? 0;
    const jitter = spec.jitterMs ?? 0;
    return fixed + (jitter > 0 ? random() * jitter : 0);
  }

  function inNotFoundWindow(snapshotId: string | undefined): boolean {
    if (notFoundWindowMs <= 0 || snapshotId === undefined) return false;
    const s = state.getSnapshot(snapshotId);
    return s !== undefined && now() < s.createdAt + notFoundWindowMs;
  }

  function shaping(op: EbsOperation): PageShaping {
    const out: PageShaping = {};
    if (opts.listScanWindowBlocks !== undefined) out.scanWindowBlocks = opts.listScanWindowBlocks;
    if (takeFault(emptyPageQueue, op)) out.forceEmpty = true;
    return out;
  }

  /** Runs one operation against the state. Throws EbsApiError for API errors. */
  function execute(
    r: Route,
    req: IncomingMessage,
    query: Map<string, string>,
    body: Buffer,
    bodyLength: number,
  ): Reply {
    const id = r.snapshotId ?? '';
    switch (r.op) {
      case 'StartSnapshot': {
        const params = parseStartSnapshotBody(body);
        const { snapshot } = state.startSnapshot(params, quotas.pendingSnapshotsPerAccount);
        return json(201, startSnapshotResponse(snapshot));
      }
      case 'PutSnapshotBlock': {
        if (inNotFoundWindow(id)) throw snapshotNotFound(id);
        // A body longer than the cap was truncated while reading; report its real length.
        if (bodyLength !== body.length) {
          throw validation(
            'INVALID_PARAMETER_VALUE',
            `Failed to read block data: the body is ${bodyLength} bytes.`,
          );
        }
        const block = state.putBlock(
          id,
          r.blockIndex ?? Number.NaN,
          {
            dataLength: intHeader(req, 'x-amz-Data-Length'),
            checksum: header(req, 'x-amz-Checksum'),
            checksumAlgorithm: header(req, 'x-amz-Checksum-Algorithm'),
            progress: intHeader(req, 'x-amz-Progress'),
          },
          body,
        );
        return {
          status: 201,
          headers: { 'x-amz-Checksum': block.checksum, 'x-amz-Checksum-Algorithm': 'SHA256' },
          body: '',
        };
      }
      case 'CompleteSnapshot': {
        if (inNotFoundWindow(id)) throw snapshotNotFound(id);
        const forced = completeErrors[0];
        const snapshot = state.getSnapshot(id);
        const willAccept = snapshot?.status === 'pending' && snapshot.completion === undefined;
        const status = state.completeSnapshot(
          id,
          {
            changedBlocksCount: intHeader(req, 'x-amz-ChangedBlocksCount'),
            checksum: header(req, 'x-amz-Checksum'),
            checksumAlgorithm: header(req, 'x-amz-Checksum-Algorithm'),
            checksumAggregationMethod: header(req, 'x-amz-Checksum-Aggregation-Method'),
          },
          { forceError: willAccept ? forced?.message : undefined },
        );
        if (forced && willAccept) {
          forced.remaining -= 1;
          if (forced.remaining <= 0) completeErrors.shift();
        }
        return json(202, { Status: status });
      }
      case 'ListSnapshotBlocks': {
        const page = state.listSnapshotBlocks(
          id,
          {
            maxResults: intQuery(query, 'maxResults'),
            nextToken: query.get('pageToken'),
            startingBlockIndex: intQuery(query, 'startingBlockIndex'),
          },
          shaping(r.op),
        );
        const out: Record<string, unknown> = {
          Blocks: page.blocks,
          ExpiryTime: epochSeconds(page.expiryTime),
          VolumeSize: page.volumeSize,
          BlockSize: page.blockSize,
        };
        if (page.nextToken !== undefined) out.NextToken = page.nextToken;
        return json(200, out);
      }
      case 'ListChangedBlocks': {
        const page = state.listChangedBlocks(
          id,
          query.get('firstSnapshotId'),
          {
            maxResults: intQuery(query, 'maxResults'),
            nextToken: query.get('pageToken'),
            startingBlockIndex: intQuery(query, 'startingBlockIndex'),
          },
          shaping(r.op),
        );
        const out: Record<string, unknown> = {
          ChangedBlocks: page.changedBlocks,
          ExpiryTime: epochSeconds(page.expiryTime),
          VolumeSize: page.volumeSize,
          BlockSize: page.blockSize,
        };
        if (page.nextToken !== undefined) out.NextToken = page.nextToken;
        return json(200, out);
      }
      case 'GetSnapshotBlock': {
        const block = state.getBlock(id, r.blockIndex ?? Number.NaN, query.get('blockToken'));
        return {
          status: 200,
          headers: {
            'content-type': 'application/octet-stream',
            'x-amz-Data-Length': String(block.data.length),
            'x-amz-Checksum': block.checksum,
            'x-amz-Checksum-Algorithm': 'SHA256',
          },
          body: block.data,
        };
      }
    }
  }

  async function handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const url = req.url ?? '/';
    const q = url.indexOf('?');
    const path = q < 0 ? url : url.slice(0, q);
    const query = parseQuery(q < 0 ? '' : url.slice(q + 1));
    const r = route(req.method ?? 'GET', path);
    // Two blocks' worth is enough to tell "too long" from "right"; JSON bodies are small.
    const { body, length } = await readBody(req, r?.op === 'PutSnapshotBlock' ? BLOCK_SIZE * 2 : 1024 * 1024);
    if (!r) {
      send(
        res,
        errorReply('UnknownOperationException', 404, `No EBS direct API operation at ${req.method} ${path}.`),
      );
      return;
    }
    counters.calls[r.op] += 1;
    const delayMs = latencyFor(r.op);
    if (delayMs > 0) await sleep(delayMs);

    let reply: Reply;
    const deniedReason = denied.get(r.op) ?? denied.get('*');
    const failure = deniedReason === undefined ? takeFault(failQueue, r.op) : undefined;
    const injectedThrottle =
      deniedReason === undefined && failure === undefined ? takeFault(throttleQueue, r.op) : undefined;
    if (deniedReason !== undefined) {
      reply = errorReply(
        'AccessDeniedException',
        403,
        'You do not have sufficient access to perform this action.',
        deniedReason,
      );
    } else if (failure && !failure.applied) {
      reply = failureReply(failure.status);
    } else if (injectedThrottle !== undefined) {
      reply = throttleReply(injectedThrottle);
    } else {
      const quotaThrottle = admit(r);
      if (quotaThrottle !== undefined) {
        reply = throttleReply(quotaThrottle);
      } else {
        try {
          reply = execute(r, req, query, body, length);
        } catch (err) {
          reply =
            err instanceof EbsApiError
              ? apiErrorReply(err)
              : errorReply('InternalServerException', 500, `Emulator bug: ${String(err)}`);
        }
        // The operation happened; only the answer is lost.
        if (failure?.applied) reply = failureReply(failure.status);
      }
    }

    if (reply.status < 300) counters.succeeded[r.op] += 1;
    else if (reply.headers['x-amzn-ErrorType'] === 'RequestThrottledException') counters.throttled[r.op] += 1;
    else counters.failed[r.op] += 1;
    send(res, reply);
  }

  function throttleReply(reason: ThrottleReason): Reply {
    counters.throttledByReason[reason] += 1;
    return errorReply(
      'RequestThrottledException',
      400,
      'The number of API requests has exceeded the maximum allowed API request throttling limit.',
      reason,
    );
  }

  const server = createServer((req, res) => {
    handle(req, res).catch((err: unknown) => {
      send(res, errorReply('InternalServerException', 500, `Emulator bug: ${String(err)}`));
    });
  });
  // Keep-alive sockets from SDK clients would otherwise hold stop() open.
  server.keepAliveTimeout = 5_000;
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      server.off('error', reject);
      resolve();
    });
  });
  const { port } = server.address() as AddressInfo;

  return {
    endpoint: `http://127.0.0.1:${port}`,
    state,
    faults,
    counters,
    stop: () =>
      new Promise<void>((resolve, reject) => {
        server.close((err) => (err ? reject(err) : resolve()));
        server.closeAllConnections();
      }),
  };
}

/** 503 is not in the EBS model; the SDK turns it into a generic service exception it retries. */
function failureReply(status: 500 | 503): Reply {
  return status === 500
    ? errorReply('InternalServerException', 500, 'An internal error has occurred.')
    : errorReply('ServiceUnavailableException', 503, 'Service Unavailable.');
}

function send(res: ServerResponse, reply: Reply): void {
  if (res.headersSent || res.destroyed) return;
  const body = typeof reply.body === 'string' ? Buffer.from(reply.body) : reply.body;
  res.writeHead(reply.status, {
    ...reply.headers,
    'content-length': String(body.length),
    'x-amzn-RequestId': randomUUID(),
  });
  res.end(body);
}
