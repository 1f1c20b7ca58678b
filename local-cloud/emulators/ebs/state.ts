// In-memory model behind the EBS direct API emulator: snapshots, lineage, blocks, block and page tokens.
//
// Time is read from an injected clock and nothing here starts a timer: status changes that happen
// "later" in EBS (completion, timeout) are stored as deadlines and applied the next time the snapshot
// is looked at, so a test can move a fake clock instead of sleeping.
import { createHash, createHmac, randomBytes } from 'node:crypto';

/** The only block size EBS direct APIs use (512 KiB). */
export const BLOCK_SIZE = 524_288;
/** Blocks per GiB of volume: 1 GiB / 512 KiB. */
export const BLOCKS_PER_GIB = 2048;
/** VolumeSize bounds (GiB): the API reference gives min 1, max 65536 (64 TiB). */
export const MIN_VOLUME_SIZE_GIB = 1;
export const MAX_VOLUME_SIZE_GIB = 65_536;
/** StartSnapshot Timeout bounds and default, in minutes (API reference: 10–4320, default 60). */
export const MIN_TIMEOUT_MINUTES = 10;
export const MAX_TIMEOUT_MINUTES = 4320;
export const DEFAULT_TIMEOUT_MINUTES = 60;
/** EBS direct APIs FAQ: block tokens are valid for seven days, page (next) tokens for 60 minutes. */
export const BLOCK_TOKEN_TTL_MS = 7 * 24 * 60 * 60 * 1000;
export const PAGE_TOKEN_TTL_MS = 60 * 60 * 1000;
/** MaxResults range from the API reference. */
export const MIN_MAX_RESULTS = 100;
export const MAX_MAX_RESULTS = 10_000;
/**
 * MaxResults when the caller sends none. The reference gives no default; we use the maximum.
 * Decision, not documented by AWS.
 */
export const DEFAULT_MAX_RESULTS = MAX_MAX_RESULTS;
/** StartSnapshotResponse: "You can specify up to 50 tags per snapshot." */
export const MAX_TAGS = 50;

const SNAPSHOT_ID_PATTERN = /^snap-[0-9a-f]+$/;
const BASE64_PATTERN = /^[A-Za-z0-9+/=]+$/;
const KMS_KEY_ARN_PATTERN = /^arn:aws[a-z-]*:kms:.*:[0-9]{12}:key\/.*/;

export type SnapshotStatus = 'pending' | 'completed' | 'error';

/** Error shapes of the EBS direct APIs (service-2.json), with the HTTP status each is modelled with. */
export type EbsErrorType =
  | 'AccessDeniedException'
  | 'ConcurrentLimitExceededException'
  | 'ConflictException'
  | 'InternalServerException'
  | 'RequestThrottledException'
  | 'ResourceNotFoundException'
  | 'ServiceQuotaExceededException'
  | 'ValidationException';

export const ERROR_HTTP_STATUS: Record<EbsErrorType, number> = {
  AccessDeniedException: 403,
  ConcurrentLimitExceededException: 400,
  ConflictException: 409,
  InternalServerException: 500,
  RequestThrottledException: 400,
  ResourceNotFoundException: 404,
  ServiceQuotaExceededException: 402,
  ValidationException: 400,
};

export type ValidationReason =
  | 'INVALID_CUSTOMER_KEY'
  | 'INVALID_PAGE_TOKEN'
  | 'INVALID_BLOCK_TOKEN'
  | 'INVALID_GRANT_TOKEN'
  | 'INVALID_SNAPSHOT_ID'
  | 'UNRELATED_SNAPSHOTS'
  | 'INVALID_BLOCK'
  | 'INVALID_CONTENT_ENCODING'
  | 'INVALID_TAG'
  | 'INVALID_DEPENDENCY_REQUEST'
  | 'INVALID_PARAMETER_VALUE'
  | 'INVALID_VOLUME_SIZE'
  | 'CONFLICTING_BLOCK_UPDATE'
  | 'INVALID_IMAGE_ID'
  | 'WRITE_REQUEST_TIMEOUT';

export type ThrottleReason = 'ACCOUNT_THROTTLED' | 'DEPENDENCY_REQUEST_THROTTLED' | 'RESOURCE_LEVEL_THROTTLE';
export type AccessDeniedReason = 'UNAUTHORIZED_ACCOUNT' | 'DEPENDENCY_ACCESS_DENIED';

/**
 * An error the emulator answers with. `type` is the exception shape name the SDK maps to a class,
 * `status` its HTTP status, `reason` the `Reason` member where the shape has one.
 */
export class EbsApiError extends Error {
  readonly type: EbsErrorType;
  readonly status: number;
  readonly reason: string | undefined;

  constructor(type: EbsErrorType, message: string, reason?: string) {
    super(message);
    this.name = type;
    this.type = type;
    this.status = ERROR_HTTP_STATUS[type];
    this.reason = reason;
  }
}

export const validation = (reason: ValidationReason, message: string): EbsApiError =>
  new EbsApiError('ValidationException', message, reason);

/** The wording field reports quote for the "freshly started snapshot" failure (coldsnap issue #43). */
export const snapshotNotFound = (id: string): EbsApiError =>
  new EbsApiError('ResourceNotFoundException', `The snapshot '${id}' does not exist.`, 'SNAPSHOT_NOT_FOUND');

export interface Tag {
  Key?: string;
  Value?: string;
}

/** One written block. `data` may be shared with other blocks of identical content (see BlobStore). */
export interface StoredBlock {
  readonly data: Buffer;
  /** Base64 SHA-256 of `data`, as sent in x-amz-Checksum. */
  readonly checksum: string;
  /** The raw 32-byte SHA-256, what the LINEAR aggregate is computed over. */
  readonly digest: Buffer;
}

interface Completion {
  /** Emulator-clock time at which the asynchronous seal finishes. */
  readonly at: number;
  readonly outcome: 'completed' | 'error';
  readonly message: string | undefined;
  readonly changedBlocksCount: number;
}

export interface SnapshotRecord {
  readonly id: string;
  status: SnapshotStatus;
  /** Why a snapshot is in `error` (timeout, checksum mismatch, injected fault). */
  statusMessage: string | undefined;
  /** True when the snapshot was lost to its Timeout, which PutSnapshotBlock reports differently. */
  timedOut: boolean;
  readonly volumeSize: number;
  readonly blockSize: number;
  readonly parentId: string | undefined;
  readonly description: string | undefined;
  readonly tags: readonly Tag[];
  readonly clientToken: string | undefined;
  readonly timeoutMinutes: number;
  readonly encrypted: boolean;
  readonly kmsKeyArn: string | undefined;
  readonly ownerId: string;
  readonly createdAt: number;
  /** Start, or the last accepted PutSnapshotBlock: the Timeout counts from here. */
  lastActivityAt: number;
  progress: number | undefined;
  /** Blocks written in this snapshot only; unchanged blocks are read through the parent chain. */
  readonly blocks: Map<number, StoredBlock>;
  completion: Completion | undefined;
  /** Sorted block map of the whole chain, built on first read; completed snapshots never change. */
  resolved: ResolvedView | undefined;
}

/** A read-only summary for tests and for whatever stands in for EC2 DescribeSnapshots. */
export interface SnapshotView {
  readonly id: string;
  readonly status: SnapshotStatus;
  readonly statusMessage: string | undefined;
  readonly volumeSize: number;
  readonly parentId: string | undefined;
  readonly encrypted: boolean;
  readonly kmsKeyArn: string | undefined;
  readonly timeoutMinutes: number;
  readonly createdAt: number;
  readonly description: string | undefined;
  readonly tags: readonly Tag[];
  readonly progress: number | undefined;
  /** Distinct block indexes written in this snapshot (not counting the parent chain). */
  readonly blocksWritten: number;
}

interface ResolvedView {
  /** Every block index with data anywhere in the chain, ascending. */
  readonly indexes: number[];
  /** The snapshot that owns the visible version of `indexes[i]`. */
  readonly owners: SnapshotRecord[];
}

export interface StartSnapshotParams {
  volumeSize: number;
  parentSnapshotId?: string | undefined;
  description?: string | undefined;
  tags?: Tag[] | undefined;
  clientToken?: string | undefined;
  encrypted?: boolean | undefined;
  kmsKeyArn?: string | undefined;
  timeoutMinutes?: number | undefined;
}

export interface PutBlockParams {
  dataLength: number | undefined;
  checksum: string | undefined;
  checksumAlgorithm: string | undefined;
  progress?: number | undefined;
}

export interface CompleteParams {
  changedBlocksCount: number | undefined;
  checksum?: string | undefined;
  checksumAlgorithm?: string | undefined;
  checksumAggregationMethod?: string | undefined;
}

export interface ListParams {
  maxResults?: number | undefined;
  nextToken?: string | undefined;
  startingBlockIndex?: number | undefined;
}

/** How one List page is shaped, beyond MaxResults: test knobs for the "empty page" behaviour. */
export interface PageShaping {
  /** Block indexes examined per page; a sparse region yields an empty page that still has a token. */
  scanWindowBlocks?: number;
  /** Answer this page empty, with a token that resumes at the same place. */
  forceEmpty?: boolean;
}

export interface BlockPage {
  readonly blocks: { BlockIndex: number; BlockToken: string }[];
  readonly nextToken: string | undefined;
  readonly expiryTime: number;
  readonly volumeSize: number;
  readonly blockSize: number;
}

export interface ChangedBlockPage {
  readonly changedBlocks: { BlockIndex: number; FirstBlockToken?: string; SecondBlockToken?: string }[];
  readonly nextToken: string | undefined;
  readonly expiryTime: number;
  readonly volumeSize: number;
  readonly blockSize: number;
}

/**
 * What CompleteSnapshot does when ChangedBlocksCount or the LINEAR checksum disagree with what was
 * written. The reference does not say. `error-state` (default) accepts the call and lets the
 * asynchronous seal end in `error`, which a client only sees by polling the status; the stricter
 * choice for a client under test. `validation-exception` refuses the call instead.
 */
export type CompletionMismatchMode = 'error-state' | 'validation-exception';

export interface EbsStateOptions {
  now: () => number;
  /** Uniform [0, 1) source for snapshot ids; seeded by the server for reproducible runs. */
  random: () => number;
  accountId: string;
  region: string;
  /** Delay between an accepted CompleteSnapshot and the status leaving `pending`. */
  completionDelayMs: () => number;
  completionMismatch: CompletionMismatchMode;
}

interface TokenRecord {
  readonly paramsKey: string;
  readonly snapshotId: string;
}

interface DiffEntry {
  readonly index: number;
  readonly first: SnapshotRecord | undefined;
  readonly second: SnapshotRecord | undefined;
}

/** How many ListChangedBlocks diffs to keep; paging through one diff must not recompute it per page. */
const DIFF_CACHE_SIZE = 16;

/**
 * Blocks with identical content share one Buffer (keyed by SHA-256), so a benchmark that writes
 * repeated patterns or zero blocks to a large volume does not hold a copy per block.
 */
class BlobStore {
  private readonly blobs = new Map<string, { data: Buffer; refs: number }>();

  intern(checksum: string, data: Buffer): Buffer {
    const blob = this.blobs.get(checksum);
    if (blob) {
      blob.refs += 1;
      return blob.data;
    }
    this.blobs.set(checksum, { data, refs: 1 });
    return data;
  }

  release(checksum: string): void {
    const blob = this.blobs.get(checksum);
    if (!blob) return;
    blob.refs -= 1;
    if (blob.refs <= 0) this.blobs.delete(checksum);
  }

  stats(): { uniqueBlobs: number; storedBytes: number } {
    let storedBytes = 0;
    for (const blob of this.blobs.values()) storedBytes += blob.data.length;
    return { uniqueBlobs: this.blobs.size, storedBytes };
  }
}

export const sha256 = (data: Buffer): Buffer => createHash('sha256').update(data).digest();

/** The LINEAR aggregate: SHA-256 over the raw per-block digests concatenated in ascending index order. */
export function linearAggregate(digestsInIndexOrder: readonly Buffer[]): string {
  const hash = createHash('sha256');
  for (const digest of digestsInIndexOrder) hash.update(digest);
  return hash.digest('base64');
}

function lowerBound(sorted: readonly number[], value: number): number {
  let lo = 0;
  let hi = sorted.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if ((sorted[mid] as number) < value) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

const isNonNegativeInteger = (n: unknown): n is number =>
  typeof n === 'number' && Number.isSafeInteger(n) && n >= 0;

export class EbsState {
  private readonly snapshots = new Map<string, SnapshotRecord>();
  private readonly clientTokens = new Map<string, TokenRecord>();
  private readonly blobs = new BlobStore();
  private readonly diffCache = new Map<string, DiffEntry[]>();
  /** Signs block and page tokens so a client cannot forge or edit them; they stay opaque. */
  private readonly tokenKey = randomBytes(32);
  private readonly opts: EbsStateOptions;

  constructor(opts: EbsStateOptions) {
    this.opts = opts;
  }

  now(): number {
    return this.opts.now();
  }

  // ---- inspection (tests, benchmarks) ----

  /** The live record after applying due status changes; undefined when there is no such snapshot. */
  getSnapshot(id: string): SnapshotRecord | undefined {
    const s = this.snapshots.get(id);
    if (s) this.refresh(s);
    return s;
  }

  describeSnapshot(id: string): SnapshotView | undefined {
    const s = this.getSnapshot(id);
    if (!s) return undefined;
    return {
      id: s.id,
      status: s.status,
      statusMessage: s.statusMessage,
      volumeSize: s.volumeSize,
      parentId: s.parentId,
      encrypted: s.encrypted,
      kmsKeyArn: s.kmsKeyArn,
      timeoutMinutes: s.timeoutMinutes,
      createdAt: s.createdAt,
      description: s.description,
      tags: s.tags,
      progress: s.progress,
      blocksWritten: s.blocks.size,
    };
  }

  snapshotIds(): string[] {
    return [...this.snapshots.keys()];
  }

  pendingCount(): number {
    let n = 0;
    for (const s of this.snapshots.values()) {
      this.refresh(s);
      if (s.status === 'pending') n += 1;
    }
    return n;
  }

  /** Memory actually held: a 64 TiB snapshot with one written block holds one block. */
  stats(): {
    snapshots: number;
    pending: number;
    completed: number;
    error: number;
    storedBlocks: number;
    uniqueBlobs: number;
    storedBytes: number;
  } {
    let pending = 0;
    let completed = 0;
    let error = 0;
    let storedBlocks = 0;
    for (const s of this.snapshots.values()) {
      this.refresh(s);
      if (s.status === 'pending') pending += 1;
      else if (s.status === 'completed') completed += 1;
      else error += 1;
      storedBlocks += s.blocks.size;
    }
    return { snapshots: this.snapshots.size, pending, completed, error, storedBlocks, ...this.blobs.stats() };
  }

  // ---- StartSnapshot ----

  /**
   * Creates a pending snapshot, or returns the one an earlier call with the same ClientToken and the
   * same parameters created (`replayed`). Same token, other parameters: ConflictException.
   */
  startSnapshot(
    params: StartSnapshotParams,
    maxPending: number,
  ): { snapshot: SnapshotRecord; replayed: boolean } {
    const paramsKey = JSON.stringify([
      params.volumeSize,
      params.parentSnapshotId ?? null,
      params.description ?? null,
      params.tags ?? null,
      params.encrypted ?? null,
      params.kmsKeyArn ?? null,
      params.timeoutMinutes ?? null,
    ]);
    if (params.clientToken !== undefined) {
      const previous = this.clientTokens.get(params.clientToken);
      if (previous) {
        if (previous.paramsKey !== paramsKey) {
          throw new EbsApiError(
            'ConflictException',
            'The request uses the same client token as a previous, but non-identical request.',
          );
        }
        const snapshot = this.snapshots.get(previous.snapshotId);
        if (snapshot) {
          this.refresh(snapshot);
          return { snapshot, replayed: true };
        }
      }
    }

    const { volumeSize } = params;
    if (
      !Number.isSafeInteger(volumeSize) ||
      volumeSize < MIN_VOLUME_SIZE_GIB ||
      volumeSize > MAX_VOLUME_SIZE_GIB
    ) {
      throw validation(
        'INVALID_VOLUME_SIZE',
        `VolumeSize must be between ${MIN_VOLUME_SIZE_GIB} and ${MAX_VOLUME_SIZE_GIB} GiB.`,
      );
    }
    const timeoutMinutes = params.timeoutMinutes ?? DEFAULT_TIMEOUT_MINUTES;
    if (
      !Number.isSafeInteger(timeoutMinutes) ||
      timeoutMinutes < MIN_TIMEOUT_MINUTES ||
      timeoutMinutes > MAX_TIMEOUT_MINUTES
    ) {
      throw validation(
        'INVALID_PARAMETER_VALUE',
        `Timeout must be between ${MIN_TIMEOUT_MINUTES} and ${MAX_TIMEOUT_MINUTES} minutes.`,
      );
    }
    if (
      params.description !== undefined &&
      (params.description.length === 0 || params.description.length > 255)
    ) {
      throw validation('INVALID_PARAMETER_VALUE', 'Description must be 1 to 255 characters.');
    }
    const tags = params.tags ?? [];
    if (tags.length > MAX_TAGS) throw validation('INVALID_TAG', `At most ${MAX_TAGS} tags per snapshot.`);
    for (const tag of tags) {
      if (typeof tag.Key !== 'string' || tag.Key.length === 0 || tag.Key.length > 127) {
        throw validation('INVALID_TAG', 'Tag keys must be 1 to 127 characters.');
      }
      if (tag.Value !== undefined && (typeof tag.Value !== 'string' || tag.Value.length > 255)) {
        throw validation('INVALID_TAG', 'Tag values must be at most 255 characters.');
      }
    }
    // The reference: "You can't specify ParentSnapshotId and Encrypted in the same request." Taken
    // literally, so Encrypted: false next to a parent is refused too.
    if (params.parentSnapshotId !== undefined && params.encrypted !== undefined) {
      throw validation(
        'INVALID_PARAMETER_VALUE',
        "You can't specify ParentSnapshotId and Encrypted in the same request.",
      );
    }
    if (params.kmsKeyArn !== undefined && !KMS_KEY_ARN_PATTERN.test(params.kmsKeyArn)) {
      throw validation('INVALID_CUSTOMER_KEY', 'KmsKeyArn is not a valid KMS key ARN.');
    }

    let parent: SnapshotRecord | undefined;
    if (params.parentSnapshotId !== undefined) {
      this.checkSnapshotId(params.parentSnapshotId);
      parent = this.snapshots.get(params.parentSnapshotId);
      if (!parent) throw snapshotNotFound(params.parentSnapshotId);
      this.refresh(parent);
      if (parent.status !== 'completed') {
        throw validation(
          'INVALID_SNAPSHOT_ID',
          `The parent snapshot '${parent.id}' is not in the completed state (it is ${parent.status}).`,
        );
      }
      // A volume can grow between snapshots but not shrink. Decision: the reference is silent.
      if (volumeSize < parent.volumeSize) {
        throw validation(
          'INVALID_VOLUME_SIZE',
          `VolumeSize ${volumeSize} GiB is smaller than the parent snapshot's ${parent.volumeSize} GiB.`,
        );
      }
    }

    // The pending-snapshot limit is an EC2 quota, so the documented shape is ServiceQuotaExceededException
    // with its only Reason, DEPENDENCY_SERVICE_QUOTA_EXCEEDED.
    if (this.pendingCount() >= maxPending) {
      throw new EbsApiError(
        'ServiceQuotaExceededException',
        `The maximum number of pending snapshots (${maxPending}) has been reached.`,
        'DEPENDENCY_SERVICE_QUOTA_EXCEEDED',
      );
    }

    const encrypted =
      parent?.encrypted === true || params.encrypted === true || params.kmsKeyArn !== undefined;
    const kmsKeyArn =
      params.kmsKeyArn ??
      parent?.kmsKeyArn ??
      (encrypted ? `arn:aws:kms:${this.opts.region}:${this.opts.accountId}:key/aws-ebs-default` : undefined);
    const now = this.now();
    const snapshot: SnapshotRecord = {
      id: this.newSnapshotId(),
      status: 'pending',
      statusMessage: undefined,
      timedOut: false,
      volumeSize,
      blockSize: BLOCK_SIZE,
      parentId: parent?.id,
      description: params.description,
      tags,
      clientToken: params.clientToken,
      timeoutMinutes,
      encrypted,
      kmsKeyArn,
      ownerId: this.opts.accountId,
      createdAt: now,
      lastActivityAt: now,
      progress: undefined,
      blocks: new Map(),
      completion: undefined,
      resolved: undefined,
    };
    this.snapshots.set(snapshot.id, snapshot);
    if (params.clientToken !== undefined) {
      this.clientTokens.set(params.clientToken, { paramsKey, snapshotId: snapshot.id });
    }
    return { snapshot, replayed: false };
  }

  // ---- PutSnapshotBlock ----

  putBlock(id: string, blockIndex: number, params: PutBlockParams, body: Buffer): StoredBlock {
    const s = this.requireSnapshot(id);
    if (s.status !== 'pending' || s.completion) {
      if (s.timedOut) {
        throw validation(
          'WRITE_REQUEST_TIMEOUT',
          `The snapshot '${id}' timed out before this write and was cancelled.`,
        );
      }
      const state = s.completion && s.status === 'pending' ? 'being completed' : s.status;
      throw validation(
        'INVALID_SNAPSHOT_ID',
        `The snapshot '${id}' is not pending (it is ${state}); blocks can't be written.`,
      );
    }
    this.checkBlockIndex(s, blockIndex);
    if (params.checksumAlgorithm === undefined) {
      throw validation('INVALID_PARAMETER_VALUE', 'x-amz-Checksum-Algorithm is required.');
    }
    if (params.checksumAlgorithm !== 'SHA256') {
      throw validation(
        'INVALID_PARAMETER_VALUE',
        `Checksum algorithm '${params.checksumAlgorithm}' is not supported; use SHA256.`,
      );
    }
    if (params.checksum === undefined)
      throw validation('INVALID_PARAMETER_VALUE', 'x-amz-Checksum is required.');
    if (params.checksum.length > 64 || !BASE64_PATTERN.test(params.checksum)) {
      throw validation('INVALID_PARAMETER_VALUE', 'x-amz-Checksum is not a Base64-encoded SHA256 checksum.');
    }
    if (params.dataLength === undefined)
      throw validation('INVALID_PARAMETER_VALUE', 'x-amz-Data-Length is required.');
    if (params.dataLength !== BLOCK_SIZE) {
      throw validation(
        'INVALID_PARAMETER_VALUE',
        `DataLength must be ${BLOCK_SIZE}; got ${params.dataLength}.`,
      );
    }
    if (params.progress !== undefined && (!isNonNegativeInteger(params.progress) || params.progress > 100)) {
      throw validation('INVALID_PARAMETER_VALUE', 'x-amz-Progress must be between 0 and 100.');
    }
    // Field wording for a body that does not match its declared length (nanovms/ops#1268).
    if (body.length !== params.dataLength) {
      throw validation(
        'INVALID_PARAMETER_VALUE',
        `Failed to read block data: got ${body.length} bytes, x-amz-Data-Length says ${params.dataLength}.`,
      );
    }
    const digest = sha256(body);
    const checksum = digest.toString('base64');
    // The reference says only that the request "fails" on a mismatch; the Reason is our choice.
    if (checksum !== params.checksum) {
      throw validation(
        'INVALID_PARAMETER_VALUE',
        `The checksum of block ${blockIndex} does not match the data: x-amz-Checksum ${params.checksum}, data ${checksum}.`,
      );
    }

    const previous = s.blocks.get(blockIndex);
    const block: StoredBlock = { data: this.blobs.intern(checksum, body), checksum, digest };
    s.blocks.set(blockIndex, block);
    if (previous) this.blobs.release(previous.checksum);
    // The Timeout counts from the last write: "cancelled if ... not completed after writing the last block".
    s.lastActivityAt = this.now();
    if (params.progress !== undefined) s.progress = params.progress;
    return block;
  }

  // ---- CompleteSnapshot ----

  /**
   * Starts the asynchronous seal. The returned status is the one at the time of the answer; the
   * snapshot leaves `pending` after the completion delay, by the emulator's clock.
   *
   * ChangedBlocksCount is compared with the distinct block indexes written to this snapshot (a block
   * written twice counts once); the LINEAR checksum covers the same blocks. A second CompleteSnapshot
   * for a snapshot already completing or completed is answered with its current status, so an SDK
   * retry after a lost answer is harmless. Both are decisions: the reference does not say.
   */
  completeSnapshot(
    id: string,
    params: CompleteParams,
    opts: { forceError?: string | undefined } = {},
  ): SnapshotStatus {
    const s = this.requireSnapshot(id);
    if (s.completion) return s.status;
    if (s.status === 'error') {
      if (s.timedOut)
        throw validation('WRITE_REQUEST_TIMEOUT', `The snapshot '${id}' timed out and was cancelled.`);
      throw validation('INVALID_SNAPSHOT_ID', `The snapshot '${id}' is in the error state.`);
    }
    const count = params.changedBlocksCount;
    if (count === undefined)
      throw validation('INVALID_PARAMETER_VALUE', 'x-amz-ChangedBlocksCount is required.');
    if (!isNonNegativeInteger(count)) {
      throw validation('INVALID_PARAMETER_VALUE', 'x-amz-ChangedBlocksCount must be a non-negative integer.');
    }
    if (params.checksum !== undefined) {
      if (params.checksum.length > 64 || !BASE64_PATTERN.test(params.checksum)) {
        throw validation(
          'INVALID_PARAMETER_VALUE',
          'x-amz-Checksum is not a Base64-encoded SHA256 checksum.',
        );
      }
      if (params.checksumAlgorithm !== 'SHA256') {
        throw validation(
          'INVALID_PARAMETER_VALUE',
          'x-amz-Checksum-Algorithm must be SHA256 when a checksum is given.',
        );
      }
      if (params.checksumAggregationMethod !== 'LINEAR') {
        throw validation(
          'INVALID_PARAMETER_VALUE',
          'x-amz-Checksum-Aggregation-Method must be LINEAR when a checksum is given.',
        );
      }
    }

    let mismatch: string | undefined;
    if (count !== s.blocks.size) {
      mismatch = `ChangedBlocksCount is ${count} but ${s.blocks.size} blocks were written.`;
    } else if (params.checksum !== undefined) {
      const ordered = [...s.blocks.entries()].sort((a, b) => a[0] - b[0]).map(([, block]) => block.digest);
      const expected = linearAggregate(ordered);
      if (expected !== params.checksum) {
        mismatch = `The aggregate checksum ${params.checksum} does not match the written blocks (${expected}).`;
      }
    }
    if (mismatch !== undefined && this.opts.completionMismatch === 'validation-exception') {
      throw validation('INVALID_PARAMETER_VALUE', mismatch);
    }
    const message = mismatch ?? opts.forceError;
    s.completion = {
      at: this.now() + Math.max(0, this.opts.completionDelayMs()),
      outcome: message === undefined ? 'completed' : 'error',
      message,
      changedBlocksCount: count,
    };
    this.refresh(s);
    return s.status;
  }

  // ---- reads ----

  listSnapshotBlocks(id: string, params: ListParams, shaping: PageShaping = {}): BlockPage {
    const s = this.requireReadable(id);
    const view = this.resolvedView(s);
    const maxResults = this.normalizeMaxResults(params.maxResults);
    const now = this.now();
    const cursor = this.startCursor('blocks', s.id, '-', params);
    const page = this.page(view.indexes, cursor, maxResults, shaping);
    const blocks = page.positions.map((pos) => {
      const index = view.indexes[pos] as number;
      const owner = view.owners[pos] as SnapshotRecord;
      return { BlockIndex: index, BlockToken: this.blockToken(owner.id, index, now) };
    });
    return {
      blocks,
      nextToken: page.next === undefined ? undefined : this.pageToken('blocks', s.id, '-', page.next, now),
      expiryTime: now + BLOCK_TOKEN_TTL_MS,
      volumeSize: s.volumeSize,
      blockSize: s.blockSize,
    };
  }

  /**
   * Blocks whose visible version differs between the two snapshots: with a parent as the first and a
   * descendant as the second, the blocks written anywhere between them. Without FirstSnapshotId every
   * block of the second snapshot is listed (a diff against nothing). A block rewritten with the same
   * bytes still counts as changed: we compare versions, not content (EBS might dedupe; unknown).
   */
  listChangedBlocks(
    secondId: string,
    firstId: string | undefined,
    params: ListParams,
    shaping: PageShaping = {},
  ): ChangedBlockPage {
    const second = this.requireReadable(secondId);
    const first = firstId === undefined ? undefined : this.requireReadable(firstId);
    const diff = this.diff(first, second);
    const maxResults = this.normalizeMaxResults(params.maxResults);
    const now = this.now();
    const firstKey = first?.id ?? '-';
    const cursor = this.startCursor('changed', second.id, firstKey, params);
    const indexes = diff.map((entry) => entry.index);
    const page = this.page(indexes, cursor, maxResults, shaping);
    const changedBlocks = page.positions.map((pos) => {
      const entry = diff[pos] as DiffEntry;
      const block: { BlockIndex: number; FirstBlockToken?: string; SecondBlockToken?: string } = {
        BlockIndex: entry.index,
      };
      if (entry.first) block.FirstBlockToken = this.blockToken(entry.first.id, entry.index, now);
      if (entry.second) block.SecondBlockToken = this.blockToken(entry.second.id, entry.index, now);
      return block;
    });
    return {
      changedBlocks,
      nextToken:
        page.next === undefined ? undefined : this.pageToken('changed', second.id, firstKey, page.next, now),
      expiryTime: now + BLOCK_TOKEN_TTL_MS,
      volumeSize: second.volumeSize,
      blockSize: second.blockSize,
    };
  }

  /**
   * The block behind a token from ListSnapshotBlocks/ListChangedBlocks. A token names a stored block
   * version, so one listed on a parent also reads the same, unchanged block through a child. There is
   * no token for a block never written in the chain, so asking for one is INVALID_BLOCK_TOKEN.
   */
  getBlock(id: string, blockIndex: number, blockToken: string | undefined): StoredBlock {
    const s = this.requireReadable(id);
    this.checkBlockIndex(s, blockIndex);
    if (blockToken === undefined || blockToken === '') {
      throw validation('INVALID_BLOCK_TOKEN', 'blockToken is required.');
    }
    const token = this.parseBlockToken(blockToken);
    if (!token || token.index !== blockIndex) {
      throw validation('INVALID_BLOCK_TOKEN', `The block token is not valid for block ${blockIndex}.`);
    }
    if (this.now() - token.issuedAt > BLOCK_TOKEN_TTL_MS) {
      throw validation('INVALID_BLOCK_TOKEN', 'The block token has expired.');
    }
    const owner = this.ownerOf(s, blockIndex);
    if (!owner || owner.id !== token.ownerId) {
      throw validation(
        'INVALID_BLOCK_TOKEN',
        `The block token does not belong to block ${blockIndex} of '${id}'.`,
      );
    }
    return owner.blocks.get(blockIndex) as StoredBlock;
  }

  // ---- internals ----

  /** Applies a due completion or timeout. Called on every look at a snapshot; no timers. */
  private refresh(s: SnapshotRecord): void {
    if (s.status !== 'pending') return;
    const now = this.now();
    if (s.completion) {
      if (now >= s.completion.at) {
        s.status = s.completion.outcome;
        s.statusMessage = s.completion.message;
        if (s.status === 'error') this.dropBlocks(s);
      }
      return;
    }
    if (now >= s.lastActivityAt + s.timeoutMinutes * 60_000) {
      s.status = 'error';
      s.timedOut = true;
      s.statusMessage = `Timed out: no write or completion within ${s.timeoutMinutes} minutes.`;
      this.dropBlocks(s);
    }
  }

  /** A failed snapshot's data is gone, and nothing can be built on it. */
  private dropBlocks(s: SnapshotRecord): void {
    for (const block of s.blocks.values()) this.blobs.release(block.checksum);
    s.blocks.clear();
  }

  private newSnapshotId(): string {
    for (;;) {
      let hex = '';
      for (let i = 0; i < 17; i += 1) hex += Math.floor(this.opts.random() * 16).toString(16);
      const id = `snap-${hex}`;
      if (!this.snapshots.has(id)) return id;
    }
  }

  private checkSnapshotId(id: string): void {
    if (id.length > 64 || !SNAPSHOT_ID_PATTERN.test(id)) {
      throw validation('INVALID_SNAPSHOT_ID', `'${id}' is not a valid snapshot ID.`);
    }
  }

  private requireSnapshot(id: string): SnapshotRecord {
    this.checkSnapshotId(id);
    const s = this.snapshots.get(id);
    if (!s) throw snapshotNotFound(id);
    this.refresh(s);
    return s;
  }

  /** FAQ: "The snapshot can be accessed only if it has a completed status." */
  private requireReadable(id: string): SnapshotRecord {
    const s = this.requireSnapshot(id);
    if (s.status !== 'completed') {
      throw validation(
        'INVALID_SNAPSHOT_ID',
        `The snapshot '${id}' is ${s.status}; only completed snapshots can be read.`,
      );
    }
    return s;
  }

  private checkBlockIndex(s: SnapshotRecord, blockIndex: number): void {
    const blocks = s.volumeSize * BLOCKS_PER_GIB;
    if (!isNonNegativeInteger(blockIndex) || blockIndex >= blocks) {
      throw validation(
        'INVALID_BLOCK',
        `Block index ${blockIndex} is outside the ${s.volumeSize} GiB volume (0..${blocks - 1}).`,
      );
    }
  }

  /**
   * The FAQ says a MaxResults under 100 still returns at least 100 results, so it is raised to 100;
   * above 10000 is outside the documented range and refused.
   */
  private normalizeMaxResults(maxResults: number | undefined): number {
    if (maxResults === undefined) return DEFAULT_MAX_RESULTS;
    if (!Number.isSafeInteger(maxResults) || maxResults > MAX_MAX_RESULTS || maxResults < 0) {
      throw validation(
        'INVALID_PARAMETER_VALUE',
        `MaxResults must be between ${MIN_MAX_RESULTS} and ${MAX_MAX_RESULTS}.`,
      );
    }
    return Math.max(MIN_MAX_RESULTS, maxResults);
  }

  /** "If you specify NextToken, then StartingBlockIndex is ignored." */
  private startCursor(
    kind: 'blocks' | 'changed',
    secondId: string,
    firstKey: string,
    params: ListParams,
  ): number {
    if (params.nextToken !== undefined) {
      const token = this.parsePageToken(params.nextToken);
      if (!token || token.kind !== kind || token.secondId !== secondId || token.firstKey !== firstKey) {
        throw validation('INVALID_PAGE_TOKEN', 'The page token is not valid for this request.');
      }
      if (this.now() - token.issuedAt > PAGE_TOKEN_TTL_MS) {
        throw validation('INVALID_PAGE_TOKEN', 'The page token has expired.');
      }
      return token.cursor;
    }
    const start = params.startingBlockIndex ?? 0;
    if (!isNonNegativeInteger(start)) {
      throw validation('INVALID_PARAMETER_VALUE', 'StartingBlockIndex must be a non-negative integer.');
    }
    return start;
  }

  /**
   * Picks one page out of a sorted index list. A page ends when it is full or when it has examined
   * `scanWindowBlocks` indexes past the cursor; either way a token is returned while blocks remain,
   * which is how a real page can come back empty and still carry a NextToken.
   */
  private page(
    indexes: readonly number[],
    cursor: number,
    maxResults: number,
    shaping: PageShaping,
  ): { positions: number[]; next: number | undefined } {
    const remainingFrom = (from: number): boolean => lowerBound(indexes, from) < indexes.length;
    if (shaping.forceEmpty) return { positions: [], next: remainingFrom(cursor) ? cursor : undefined };
    const window = shaping.scanWindowBlocks ?? Number.POSITIVE_INFINITY;
    const limit = cursor + window;
    const positions: number[] = [];
    let pos = lowerBound(indexes, cursor);
    while (pos < indexes.length && positions.length < maxResults && (indexes[pos] as number) < limit) {
      positions.push(pos);
      pos += 1;
    }
    let next: number;
    if (positions.length === maxResults) next = (indexes[pos - 1] as number) + 1;
    else if (Number.isFinite(limit)) next = limit;
    else return { positions, next: undefined };
    return { positions, next: remainingFrom(next) ? next : undefined };
  }

  private ownerOf(s: SnapshotRecord, blockIndex: number): SnapshotRecord | undefined {
    for (let c: SnapshotRecord | undefined = s; c; c = this.parentOf(c)) {
      if (c.blocks.has(blockIndex)) return c;
    }
    return undefined;
  }

  private parentOf(s: SnapshotRecord): SnapshotRecord | undefined {
    return s.parentId === undefined ? undefined : this.snapshots.get(s.parentId);
  }

  private chain(s: SnapshotRecord): SnapshotRecord[] {
    const out: SnapshotRecord[] = [];
    for (let c: SnapshotRecord | undefined = s; c; c = this.parentOf(c)) out.push(c);
    return out;
  }

  /** Only called for completed snapshots, whose chain can no longer change, so it is cached. */
  private resolvedView(s: SnapshotRecord): ResolvedView {
    if (s.resolved) return s.resolved;
    const visible = new Map<number, SnapshotRecord>();
    const chain = this.chain(s);
    for (let i = chain.length - 1; i >= 0; i -= 1) {
      const snap = chain[i] as SnapshotRecord;
      for (const index of snap.blocks.keys()) visible.set(index, snap);
    }
    const indexes = [...visible.keys()].sort((a, b) => a - b);
    const owners = indexes.map((index) => visible.get(index) as SnapshotRecord);
    s.resolved = { indexes, owners };
    return s.resolved;
  }

  private diff(first: SnapshotRecord | undefined, second: SnapshotRecord): DiffEntry[] {
    const key = `${first?.id ?? '-'}>${second.id}`;
    const cached = this.diffCache.get(key);
    if (cached) return cached;
    let entries: DiffEntry[];
    if (!first) {
      const view = this.resolvedView(second);
      entries = view.indexes.map((index, i) => ({ index, first: undefined, second: view.owners[i] }));
    } else {
      const firstChain = this.chain(first);
      const secondChain = this.chain(second);
      const firstIds = new Set(firstChain.map((c) => c.id));
      const common = secondChain.find((c) => firstIds.has(c.id));
      if (!common) {
        throw validation(
          'UNRELATED_SNAPSHOTS',
          `The snapshots '${first.id}' and '${second.id}' are not of the same volume/snapshot lineage.`,
        );
      }
      // Only blocks written below the common ancestor, on either side, can differ.
      const candidates = new Set<number>();
      for (const chain of [firstChain, secondChain]) {
        for (const snap of chain) {
          if (snap.id === common.id) break;
          for (const index of snap.blocks.keys()) candidates.add(index);
        }
      }
      entries = [];
      for (const index of [...candidates].sort((a, b) => a - b)) {
        const a = this.ownerOf(first, index);
        const b = this.ownerOf(second, index);
        if (a !== b) entries.push({ index, first: a, second: b });
      }
    }
    if (this.diffCache.size >= DIFF_CACHE_SIZE) {
      const oldest = this.diffCache.keys().next().value;
      if (oldest !== undefined) this.diffCache.delete(oldest);
    }
    this.diffCache.set(key, entries);
    return entries;
  }

  private sign(payload: string): string {
    return createHmac('sha256', this.tokenKey).update(payload).digest('hex').slice(0, 24);
  }

  /** Opaque to clients: base64 (the documented alphabet) of a signed payload. */
  private seal(payload: string): string {
    return Buffer.from(`${payload}.${this.sign(payload)}`).toString('base64');
  }

  private unseal(token: string): string[] | undefined {
    if (token.length > 256 || !BASE64_PATTERN.test(token)) return undefined;
    const text = Buffer.from(token, 'base64').toString('utf8');
    const cut = text.lastIndexOf('.');
    if (cut < 0) return undefined;
    const payload = text.slice(0, cut);
    if (this.sign(payload) !== text.slice(cut + 1)) return undefined;
    return payload.split('.');
  }

  private blockToken(ownerId: string, index: number, issuedAt: number): string {
    return this.seal(`b.${ownerId}.${index}.${issuedAt}`);
  }

  private parseBlockToken(token: string): { ownerId: string; index: number; issuedAt: number } | undefined {
    const parts = this.unseal(token);
    if (parts?.length !== 4 || parts[0] !== 'b') return undefined;
    return { ownerId: parts[1] as string, index: Number(parts[2]), issuedAt: Number(parts[3]) };
  }

  private pageToken(
    kind: 'blocks' | 'changed',
    secondId: string,
    firstKey: string,
    cursor: number,
    issuedAt: number,
  ) {
    return this.seal(`p.${kind}.${secondId}.${firstKey}.${cursor}.${issuedAt}`);
  }

  private parsePageToken(
    token: string,
  ): { kind: string; secondId: string; firstKey: string; cursor: number; issuedAt: number } | undefined {
    const parts = this.unseal(token);
    if (parts?.length !== 6 || parts[0] !== 'p') return undefined;
    return {
      kind: parts[1] as string,
      secondId: parts[2] as string,
      firstKey: parts[3] as string,
      cursor: Number(parts[4]),
      issuedAt: Number(parts[5]),
    };
  }
}
