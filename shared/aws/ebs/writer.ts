// Stateless EBS snapshot writing: StartSnapshot, PutSnapshotBlock per 512 KiB block, CompleteSnapshot
// and the wait for `completed`. EbsTarget is a thin DiskTarget over these; Lambdas call them directly.
//
// Exported API (every function takes `deps: EbsDeps` first: the EBSClient, optional clock, random,
// retry policy, rate limiter, per-attempt timeouts, onRetry hook):
//
//   snapshotClientToken({ set, disk, cycle, attempt? }) -> string
//       Deterministic StartSnapshot ClientToken: the same cycle of the same disk never starts twice
//       (the engine's, shared/engine/cycle/prepare.ts, re-exported).
//   volumeSizeGiB(sizeBytes) -> number                  bytes rounded up to whole GiB (EBS VolumeSize)
//   zeroBlockPolicy({ kind, encrypted }) -> 'skip' | 'write'
//       Zero blocks may be skipped only in a full, unencrypted snapshot.
//   startSnapshot(deps, { disk, volumeSizeGiB, clientToken, timeoutMinutes, parentSnapshotId?,
//                         encrypted?, kmsKeyArn?, description?, tags?, signal? })
//       -> { snapshotId, status, encrypted, kmsKeyArn?, volumeSizeGiB, parentSnapshotId? }
//       Retried with deps.retry (idempotent through the ClientToken).
//   descriptorBlocks(descriptor, data, disk?) -> TargetBlock[]        a chunk cut into 512 KiB blocks
//   putSnapshotBlocks(deps, { disk, snapshotId, blocks, zeroBlocks, seq?, snapshotStartedAt?,
//                             notFoundGraceMs?, recorded?, onWritten?, signal? }) -> WrittenBlock[]
//   putDescriptorBlocks(deps, { disk, snapshotId, descriptor, data, zeroBlocks, ...same }) -> WrittenBlock[]
//       Writes the blocks in parallel, each with its base64 SHA-256. Each block is retried with
//       deps.retry (pass NO_RETRY when a caller above retries, as EbsTarget does under the engine).
//       "Snapshot does not exist" within notFoundGraceMs of snapshotStartedAt is waited out. Returns
//       the blocks now in the snapshot ({ index, checksumB64, digest }), ascending; skipped zero
//       blocks are not in it. All blocks settle before it returns or throws (no write lands later).
//   linearAggregateBase64(digestsInBlockOrder) -> string           EBS LINEAR checksum
//   completeSnapshot(deps, { disk, snapshotId, changedBlocksCount, aggregate? | blockDigests?,
//                            snapshotStartedAt?, signal? }) -> 'pending' | 'completed' | 'error'
//       Retried with deps.retry. `aggregate` is the raw or base64 LINEAR digest; or pass the raw
//       block digests in ascending block order and it is computed here.
//   waitForCompletion(deps, { disk, snapshotId, reader, timeoutMs?, signal? }) -> void
//       Polls a SnapshotStatusReader until `completed`; `error` and the deadline throw EbsSnapshotError.
//   checkSnapshotTimeout({ disk, snapshotId, lastWriteAt, timeoutMinutes, now, op }) -> void
//       Throws before a write or completion that EBS's Timeout would already have cancelled.
import { createHash } from 'node:crypto';
import { CompleteSnapshotCommand, PutSnapshotBlockCommand, StartSnapshotCommand } from '@aws-sdk/client-ebs';
import type { Descriptor } from '../../engine/descriptors.ts';
import { AbortedError, ConfigError, FerryError, IntegrityError } from '../../engine/errors.ts';
import { linearAggregate } from '../../engine/integrity.ts';
import type { CopyKind } from '../../engine/ports.ts';
import { type EbsDeps, pause, type ResolvedEbsDeps, resolveDeps, retryEbs } from './client.ts';
import {
  aborted,
  describeCall,
  EBS_BLOCK_SIZE,
  type EbsCallSite,
  EbsError,
  EbsSnapshotError,
  malformedReply,
} from './errors.ts';
import type { EbsSnapshotStatus, SnapshotStatusReader } from './status.ts';

export const GiB = 1024 ** 3;
/** StartSnapshot VolumeSize bounds (GiB), from the API reference. */
export const MAX_VOLUME_SIZE_GIB = 65_536;
/** StartSnapshot Timeout bounds (minutes), from the API reference. */
export const MIN_TIMEOUT_MINUTES = 10;
export const MAX_TIMEOUT_MINUTES = 4320;

// Field reports (coldsnap) show a freshly started snapshot answering "does not exist" to its first
// writes for up to about two minutes; past that, "does not exist" is the truth.
export const DEFAULT_NOT_FOUND_GRACE_MS = 120_000;
// Completion is asynchronous; a large snapshot can take a while to seal. An hour covers the largest
// increments we expect, and a Lambda finalizer passes its own (shorter) deadline instead.
export const DEFAULT_COMPLETION_WAIT_MS = 60 * 60_000;
// Polling starts fast (small snapshots seal in well under a second) and backs off to this, so a long
// seal costs a few calls per minute.
const MAX_POLL_INTERVAL_MS = 5_000;
// A write or completion sent this close to the Timeout may arrive after EBS has cancelled the
// snapshot: refuse it here, with a message, instead of finding out from a lost snapshot.
export const TIMEOUT_SAFETY_MS = 60_000;

export type ZeroBlocks = 'skip' | 'write';

/** One block to write: `data` is 512 KiB, or shorter only at the end of a disk (padded with zeros). */
export interface TargetBlock {
  readonly index: number;
  readonly data: Uint8Array;
}

/** A block that is in the snapshot: written now or, per `recorded`, earlier in the same attempt. */
export interface WrittenBlock {
  readonly index: number;
  /** Base64 SHA-256, as sent in x-amz-Checksum. */
  readonly checksumB64: string;
  /** The raw 32-byte SHA-256: what the LINEAR aggregate is computed over. */
  readonly digest: Uint8Array;
}

// One token rule for every StartSnapshot Ferry sends (the cycle's prepare and EbsTarget): the engine's.
export { snapshotClientToken } from '../../engine/cycle/prepare.ts';

export function volumeSizeGiB(sizeBytes: number): number {
  if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0) {
    throw new ConfigError(`disk size ${sizeBytes} is not a positive whole number of bytes`, {
      setting: 'sizeBytes',
    });
  }
  const gib = Math.ceil(sizeBytes / GiB);
  if (gib > MAX_VOLUME_SIZE_GIB) {
    throw new ConfigError(`a ${gib} GiB disk is larger than the largest EBS snapshot (64 TiB)`, {
      setting: 'sizeBytes',
    });
  }
  return gib;
}

/**
 * In an incremental snapshot an unwritten block shows the parent's data, so a block changed to zeros
 * must be written; in an encrypted one, EBS gives no guarantee that unwritten blocks read as zeros.
 * Only a full, unencrypted snapshot reads zeros where nothing was written.
 */
export function zeroBlockPolicy(opts: { kind: CopyKind; encrypted: boolean }): ZeroBlocks {
  return opts.kind === 'full' && !opts.encrypted ? 'skip' : 'write';
}

export interface StartSnapshotInput {
  readonly disk: string;
  readonly volumeSizeGiB: number;
  readonly clientToken: string;
  readonly timeoutMinutes: number;
  /** The previous checkpoint's snapshot, for an incremental snapshot. */
  readonly parentSnapshotId?: string | undefined;
  /** Ignored with a parent: EBS refuses both, and a child inherits the parent's encryption. */
  readonly encrypted?: boolean | undefined;
  readonly kmsKeyArn?: string | undefined;
  readonly description?: string | undefined;
  readonly tags?: Readonly<Record<string, string>> | undefined;
  readonly signal?: AbortSignal | undefined;
}

export interface StartedSnapshot {
  readonly snapshotId: string;
  readonly status: EbsSnapshotStatus;
  /** Whether EBS made it encrypted (asked for, inherited from the parent, or the account default). */
  readonly encrypted: boolean;
  readonly kmsKeyArn: string | undefined;
  readonly volumeSizeGiB: number;
  readonly parentSnapshotId: string | undefined;
}

export async function startSnapshot(deps: EbsDeps, input: StartSnapshotInput): Promise<StartedSnapshot> {
  const d = resolveDeps(deps);
  const { disk } = input;
  const where = `disk ${disk}: StartSnapshot`;
  if (!Number.isSafeInteger(input.volumeSizeGiB) || input.volumeSizeGiB < 1) {
    throw new ConfigError(`${where}: volume size ${input.volumeSizeGiB} GiB is not a positive whole number`, {
      disk,
      setting: 'volumeSizeGiB',
    });
  }
  if (
    !Number.isSafeInteger(input.timeoutMinutes) ||
    input.timeoutMinutes < MIN_TIMEOUT_MINUTES ||
    input.timeoutMinutes > MAX_TIMEOUT_MINUTES
  ) {
    throw new ConfigError(
      `${where}: timeoutMinutes ${input.timeoutMinutes} is outside ${MIN_TIMEOUT_MINUTES}–${MAX_TIMEOUT_MINUTES}`,
      { disk, setting: 'timeoutMinutes' },
    );
  }
  const parent = input.parentSnapshotId;
  const encrypt = parent === undefined && (input.encrypted === true || input.kmsKeyArn !== undefined);
  const tags = Object.entries(input.tags ?? {}).map(([Key, Value]) => ({ Key, Value }));
  // The parent is the snapshot a refusal is usually about (missing, not completed, smaller volume).
  const site: EbsCallSite = { op: 'StartSnapshot', disk, snapshotId: parent };
  const out = await retryEbs(
    d,
    site,
    (abortSignal) =>
      d.client.send(
        new StartSnapshotCommand({
          VolumeSize: input.volumeSizeGiB,
          ClientToken: input.clientToken,
          Timeout: input.timeoutMinutes,
          ...(parent === undefined ? {} : { ParentSnapshotId: parent }),
          ...(encrypt ? { Encrypted: true } : {}),
          ...(input.kmsKeyArn === undefined ? {} : { KmsKeyArn: input.kmsKeyArn }),
          ...(input.description === undefined ? {} : { Description: input.description.slice(0, 255) }),
          ...(tags.length === 0 ? {} : { Tags: tags }),
        }),
        { abortSignal },
      ),
    input.signal,
  );
  if (typeof out.SnapshotId !== 'string' || out.SnapshotId === '') {
    throw malformedReply({ op: 'StartSnapshot', disk }, 'no SnapshotId');
  }
  const status = out.Status ?? 'pending';
  if (status !== 'pending' && status !== 'completed' && status !== 'error') {
    throw malformedReply(
      { op: 'StartSnapshot', disk, snapshotId: out.SnapshotId },
      `unknown Status ${status}`,
    );
  }
  return {
    snapshotId: out.SnapshotId,
    status,
    encrypted:
      encrypt || out.KmsKeyArn !== undefined || (out.SseType !== undefined && out.SseType !== 'none'),
    kmsKeyArn: out.KmsKeyArn,
    volumeSizeGiB: out.VolumeSize ?? input.volumeSizeGiB,
    parentSnapshotId: out.ParentSnapshotId ?? parent,
  };
}

/**
 * Cuts a chunk (`data` = the descriptor's changed extents concatenated) into blocks. The engine
 * aligns extents to the target's 512 KiB block, so only a disk's last block can be short.
 */
export function descriptorBlocks(descriptor: Descriptor, data: Uint8Array, disk?: string): TargetBlock[] {
  if (data.length !== descriptor.bytes) {
    throw new IntegrityError(
      `disk ${disk ?? '?'}: chunk ${descriptor.seq} has ${data.length} bytes of data for ${descriptor.bytes} changed bytes`,
      { disk, offset: descriptor.offset, seq: descriptor.seq },
    );
  }
  const blocks: TargetBlock[] = [];
  let at = 0;
  for (const e of descriptor.extents) {
    if (e.offset % EBS_BLOCK_SIZE !== 0) {
      throw new FerryError(
        `disk ${disk ?? '?'}: chunk ${descriptor.seq} has an extent at offset ${e.offset} that is not 512 KiB aligned (the EBS target's block size)`,
        { disk, offset: e.offset, seq: descriptor.seq },
      );
    }
    for (let off = 0; off < e.length; off += EBS_BLOCK_SIZE) {
      const len = Math.min(EBS_BLOCK_SIZE, e.length - off);
      blocks.push({
        index: (e.offset + off) / EBS_BLOCK_SIZE,
        data: data.subarray(at + off, at + off + len),
      });
    }
    at += e.length;
  }
  return blocks;
}

export interface PutBlocksInput {
  readonly disk: string;
  readonly snapshotId: string;
  readonly blocks: readonly TargetBlock[];
  readonly zeroBlocks: ZeroBlocks;
  /** The descriptor these blocks belong to, for messages. */
  readonly seq?: number | undefined;
  /**
   * When the snapshot was started (deps.clock ms). While within `notFoundGraceMs` of it, "snapshot
   * does not exist" is waited out; leave undefined once the snapshot is known to exist.
   */
  readonly snapshotStartedAt?: number | undefined;
  readonly notFoundGraceMs?: number | undefined;
  /** The digest already recorded for a block in this snapshot attempt (a ledger lookup), if any. */
  readonly recorded?: ((index: number) => Promise<Uint8Array | undefined>) | undefined;
  /** Called once per block EBS accepted, before it is reported written; must make it durable. */
  readonly onWritten?: ((block: WrittenBlock) => Promise<void>) | undefined;
  readonly signal?: AbortSignal | undefined;
}

const sha256 = (data: Uint8Array): Uint8Array => createHash('sha256').update(data).digest();
const b64 = (digest: Uint8Array): string => Buffer.from(digest).toString('base64');

function isZero(data: Uint8Array): boolean {
  // 8 bytes at a time where alignment allows; blocks are large and mostly non-zero.
  const words = data.byteOffset % 8 === 0 ? Math.floor(data.length / 8) : 0;
  const view = new BigUint64Array(data.buffer, data.byteOffset, words);
  for (let i = 0; i < words; i++) if (view[i] !== 0n) return false;
  for (let i = words * 8; i < data.length; i++) if (data[i] !== 0) return false;
  return true;
}

function sameDigest(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && Buffer.from(a.buffer, a.byteOffset, a.length).equals(b);
}

/** The most useful of several failures: permanent before retryable, anything before an abort. */
function worst(errors: unknown[]): unknown {
  const rank = (e: unknown) =>
    e instanceof AbortedError ? 0 : e instanceof EbsError && e.retryable ? 1 : e instanceof EbsError ? 3 : 2;
  return errors.reduce((a, b) => (rank(b) > rank(a) ? b : a));
}

/** Waits out "snapshot does not exist" while within the grace period after StartSnapshot. */
async function withNotFoundGrace<T>(
  d: ResolvedEbsDeps,
  site: EbsCallSite,
  startedAt: number | undefined,
  graceMs: number,
  signal: AbortSignal | undefined,
  op: () => Promise<T>,
): Promise<T> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await op();
    } catch (err) {
      const inGrace =
        err instanceof EbsError &&
        err.snapshotNotFound &&
        startedAt !== undefined &&
        d.clock.now() - startedAt < graceMs;
      if (!inGrace) throw err;
      // Backoff with jitter, capped at 2 s: the snapshot usually appears within seconds.
      const ceiling = Math.min(2000, 100 * 2 ** Math.min(attempt - 1, 10));
      await pause(d, Math.floor(ceiling / 2 + (d.random() * ceiling) / 2), site, signal);
    }
  }
}

async function putOne(
  d: ResolvedEbsDeps,
  input: PutBlocksInput,
  block: TargetBlock,
): Promise<WrittenBlock | undefined> {
  const { disk, snapshotId, signal } = input;
  const site: EbsCallSite = {
    op: 'PutSnapshotBlock',
    disk,
    snapshotId,
    blockIndex: block.index,
    seq: input.seq,
  };
  if (!Number.isSafeInteger(block.index) || block.index < 0) {
    throw new EbsError(`${describeCall(site)}: invalid block index`, {
      ...site,
      code: 'InvalidBlock',
      retryable: false,
    });
  }
  if (block.data.length > EBS_BLOCK_SIZE || block.data.length === 0) {
    throw new EbsError(
      `${describeCall(site)}: block data is ${block.data.length} bytes, not 1..${EBS_BLOCK_SIZE}`,
      {
        ...site,
        code: 'InvalidBlock',
        retryable: false,
      },
    );
  }
  let data = block.data;
  if (data.length < EBS_BLOCK_SIZE) {
    // The disk's last block, when its size is not a multiple of 512 KiB: EBS takes whole blocks only.
    const padded = new Uint8Array(EBS_BLOCK_SIZE);
    padded.set(data);
    data = padded;
  }
  const digest = sha256(data);
  const checksumB64 = b64(digest);
  const written: WrittenBlock = { index: block.index, checksumB64, digest };
  const previous = await input.recorded?.(block.index);
  if (previous !== undefined && sameDigest(previous, digest)) return written;
  // A zero block may be skipped only if nothing else was written there in this snapshot.
  if (input.zeroBlocks === 'skip' && previous === undefined && isZero(data)) return undefined;

  const body = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  const out = await withNotFoundGrace(
    d,
    site,
    input.snapshotStartedAt,
    input.notFoundGraceMs ?? DEFAULT_NOT_FOUND_GRACE_MS,
    signal,
    () =>
      retryEbs(
        d,
        site,
        (abortSignal) =>
          d.client.send(
            new PutSnapshotBlockCommand({
              SnapshotId: snapshotId,
              BlockIndex: block.index,
              BlockData: body,
              DataLength: EBS_BLOCK_SIZE,
              Checksum: checksumB64,
              ChecksumAlgorithm: 'SHA256',
            }),
            { abortSignal },
          ),
        signal,
      ),
  );
  // EBS echoes the checksum it computed; a different one means the block landed differently.
  if (out.Checksum !== undefined && out.Checksum !== checksumB64) {
    throw new IntegrityError(
      `${describeCall(site)}: EBS stored checksum ${out.Checksum}, but the block's is ${checksumB64}`,
      { disk, offset: block.index * EBS_BLOCK_SIZE, seq: input.seq },
    );
  }
  await input.onWritten?.(written);
  return written;
}

/** Writes blocks in parallel; see the file header. */
export async function putSnapshotBlocks(deps: EbsDeps, input: PutBlocksInput): Promise<WrittenBlock[]> {
  const d = resolveDeps(deps);
  if (input.signal?.aborted)
    throw aborted({ op: 'PutSnapshotBlock', disk: input.disk, snapshotId: input.snapshotId });
  const settled = await Promise.allSettled(input.blocks.map((b) => putOne(d, input, b)));
  const failures = settled.flatMap((s) => (s.status === 'rejected' ? [s.reason as unknown] : []));
  if (failures.length > 0) throw worst(failures);
  return settled
    .flatMap((s) => (s.status === 'fulfilled' && s.value !== undefined ? [s.value] : []))
    .sort((a, b) => a.index - b.index);
}

export interface PutDescriptorInput extends Omit<PutBlocksInput, 'blocks' | 'seq'> {
  readonly descriptor: Descriptor;
  /** The descriptor's changed extents concatenated (`descriptor.bytes` long). */
  readonly data: Uint8Array;
}

/** Writes one descriptor's changed blocks; see the file header. */
export function putDescriptorBlocks(deps: EbsDeps, input: PutDescriptorInput): Promise<WrittenBlock[]> {
  const { descriptor, data, ...rest } = input;
  return putSnapshotBlocks(deps, {
    ...rest,
    seq: descriptor.seq,
    blocks: descriptorBlocks(descriptor, data, input.disk),
  });
}

/** EBS `ChecksumAggregationMethod: LINEAR`: SHA-256 over the raw block digests in block order, base64. */
export function linearAggregateBase64(digestsInBlockOrder: Iterable<Uint8Array | string>): string {
  return b64(linearAggregate(digestsInBlockOrder));
}

export interface CompleteSnapshotInput {
  readonly disk: string;
  readonly snapshotId: string;
  readonly changedBlocksCount: number;
  /** The LINEAR aggregate, raw (32 bytes) or base64. */
  readonly aggregate?: Uint8Array | string | undefined;
  /** Or the raw block digests in ascending block order, aggregated here. */
  readonly blockDigests?: Iterable<Uint8Array> | undefined;
  readonly snapshotStartedAt?: number | undefined;
  readonly notFoundGraceMs?: number | undefined;
  readonly signal?: AbortSignal | undefined;
}

export async function completeSnapshot(
  deps: EbsDeps,
  input: CompleteSnapshotInput,
): Promise<EbsSnapshotStatus> {
  const d = resolveDeps(deps);
  const { disk, snapshotId, changedBlocksCount: count } = input;
  const site: EbsCallSite = { op: 'CompleteSnapshot', disk, snapshotId };
  if (!Number.isSafeInteger(count) || count < 0) {
    throw new EbsError(`${describeCall(site)}: ChangedBlocksCount ${count} is not a whole number`, {
      ...site,
      code: 'InvalidParameter',
      retryable: false,
    });
  }
  let checksum: string | undefined;
  if (typeof input.aggregate === 'string') checksum = input.aggregate;
  else if (input.aggregate !== undefined) checksum = b64(input.aggregate);
  else if (input.blockDigests !== undefined) checksum = linearAggregateBase64(input.blockDigests);
  const out = await withNotFoundGrace(
    d,
    site,
    input.snapshotStartedAt,
    input.notFoundGraceMs ?? DEFAULT_NOT_FOUND_GRACE_MS,
    input.signal,
    () =>
      retryEbs(
        d,
        site,
        (abortSignal) =>
          d.client.send(
            new CompleteSnapshotCommand({
              SnapshotId: snapshotId,
              ChangedBlocksCount: count,
              // An aggregate over no blocks proves nothing, and EBS documents none for that case.
              ...(checksum === undefined || count === 0
                ? {}
                : { Checksum: checksum, ChecksumAlgorithm: 'SHA256', ChecksumAggregationMethod: 'LINEAR' }),
            }),
            { abortSignal },
          ),
        input.signal,
      ),
  );
  const status = out.Status;
  if (status !== 'pending' && status !== 'completed' && status !== 'error') {
    throw malformedReply(site, status === undefined ? 'no Status' : `unknown Status ${status}`);
  }
  return status;
}

export interface WaitInput {
  readonly disk: string;
  readonly snapshotId: string;
  readonly reader: SnapshotStatusReader;
  /** How long to wait for `completed` (deps.clock ms); DEFAULT_COMPLETION_WAIT_MS. */
  readonly timeoutMs?: number | undefined;
  readonly signal?: AbortSignal | undefined;
}

export async function waitForCompletion(deps: EbsDeps, input: WaitInput): Promise<void> {
  const d = resolveDeps(deps);
  const { disk, snapshotId, signal } = input;
  const waitMs = input.timeoutMs ?? DEFAULT_COMPLETION_WAIT_MS;
  const deadline = d.clock.now() + waitMs;
  let last: string = 'not visible';
  for (let delay = 100; ; delay = Math.min(delay * 2, MAX_POLL_INTERVAL_MS)) {
    if (signal?.aborted)
      throw new AbortedError(`disk ${disk}: waiting for snapshot ${snapshotId} aborted`, { disk });
    let info: Awaited<ReturnType<SnapshotStatusReader['read']>>;
    try {
      info = await input.reader.read(snapshotId, signal);
    } catch (err) {
      // A throttled or failed status read is no verdict on the snapshot: read again later.
      if (!(err instanceof FerryError && 'retryable' in err && err.retryable === true)) throw err;
      info = undefined;
    }
    if (info?.status === 'completed') return;
    if (info?.status === 'error') {
      throw new EbsSnapshotError(
        `disk ${disk}: snapshot ${snapshotId} ended in error after CompleteSnapshot${info.message ? `: ${info.message}` : ''}; it is no checkpoint, start the cycle again`,
        { disk, snapshotId },
      );
    }
    if (info) last = info.status;
    const left = deadline - d.clock.now();
    if (left <= 0) {
      throw new EbsSnapshotError(
        `disk ${disk}: snapshot ${snapshotId} is still ${last} ${Math.round(waitMs / 1000)} s after CompleteSnapshot`,
        { disk, snapshotId },
      );
    }
    await pause(d, Math.min(delay, left), { op: 'CompleteSnapshot', disk, snapshotId }, signal);
  }
}

/**
 * EBS cancels a pending snapshot when its Timeout passes with no block written and no completion
 * (StartSnapshot reference: "no blocks are written", "not completed after writing the last block").
 */
export function checkSnapshotTimeout(opts: {
  disk: string;
  snapshotId: string;
  /** Clock ms of the start or the last accepted write. */
  lastWriteAt: number;
  timeoutMinutes: number;
  now: number;
  op: 'PutSnapshotBlock' | 'CompleteSnapshot' | 'resume';
}): void {
  const limit = opts.timeoutMinutes * 60_000;
  const idle = opts.now - opts.lastWriteAt;
  if (idle <= limit - Math.min(TIMEOUT_SAFETY_MS, limit / 10)) return;
  const minutes = (idle / 60_000).toFixed(1);
  const what = opts.op === 'resume' ? 'resuming it' : `${opts.op} now`;
  const lost = idle >= limit ? 'EBS has cancelled it' : 'EBS is about to cancel it';
  throw new EbsSnapshotError(
    `disk ${opts.disk}: snapshot ${opts.snapshotId} has had no write for ${minutes} min and its Timeout is ${opts.timeoutMinutes} min: ${lost}, so ${what} would be too late. Start the cycle again (a new snapshot), and raise timeoutMinutes (up to ${MAX_TIMEOUT_MINUTES}) if runs stall this long`,
    { disk: opts.disk, snapshotId: opts.snapshotId },
  );
}
