// The chunk writer: for each grant of an SQS batch, check its lease, read the chunk from the source
// snapshot, write its blocks to the target snapshot, record the completion exactly once, release the
// lease's bytes and top the disk's window up again (ACK-clocked). Reports which grants to retry.
import { createHash } from 'node:crypto';
import { setMaxListeners } from 'node:events';
import { decodeGrant, type GrantMessage, GrantMessageError } from '../../shared/aws/sqs/grant-message.ts';
import type { GrantQueue } from '../../shared/aws/sqs/grant-queue.ts';
import {
  AbortedError,
  ChangeMapError,
  ConfigError,
  errorMessage,
  IntegrityError,
  TransferError,
} from '../../shared/engine/errors.ts';
import type { SignalDelta } from './cycle-store.ts';
import { blockIndexes, sameDescriptor } from './descriptor-pages.ts';
import { CycleStateError } from './errors.ts';
import { type GrantingDeps, sendPending, topUpDisk } from './granting.ts';
import { type BlockReader, EBS_BLOCK_SIZE, type Meter, type SnapshotWriter } from './ports.ts';

// Grants one completion may issue: a completion frees one chunk's room, more only when the window
// grew meanwhile; the planner's tick fills the rest.
const TOP_UP_PER_COMPLETION = 4;

export interface WriterDeps extends GrantingDeps {
  readonly reader: BlockReader;
  readonly writer: Pick<SnapshotWriter, 'putBlocks'>;
  readonly queue: Pick<GrantQueue, 'sendGrants' | 'release'>;
  /** Grants worked on at once within one batch. */
  readonly concurrency: number;
  /** Stop this long before the deadline and hand what is left back. */
  readonly marginMs: number;
  readonly meter: Meter;
}

/** One SQS record, as the event source mapping delivers it. */
export interface GrantRecord {
  readonly messageId: string;
  readonly receiptHandle: string;
  readonly body: string;
}

export type GrantOutcome =
  /** Written and recorded by this delivery. */
  | 'written'
  /** Already recorded (a duplicate delivery or a re-grant of a finished chunk): nothing written twice. */
  | 'duplicate'
  /** The lease is gone (reclaimed, completed, or its cycle is over): acknowledged, nothing done. */
  | 'stale'
  /** Failed for good: the cycle is marked failed, the lease released, the message acknowledged. */
  | 'failed'
  /** Failed for now: left to SQS to deliver again (a batch item failure). */
  | 'retry'
  /** Not started or interrupted before the deadline: visibility reset, delivered again at once. */
  | 'handed-back'
  /** Not a grant: left to reach the DLQ. */
  | 'malformed';

export interface BatchResult {
  readonly batchItemFailures: { itemIdentifier: string }[];
  readonly outcomes: Record<GrantOutcome, number>;
}

let zeroChecksum: string | undefined;
const zeroBlock = (): { data: Uint8Array; checksum: string } => {
  const data = new Uint8Array(EBS_BLOCK_SIZE);
  zeroChecksum ??= createHash('sha256').update(data).digest('base64');
  return { data, checksum: zeroChecksum };
};

/** Marks a failure of the target write (unwrapped again before it is judged). */
class TargetWriteError extends Error {
  readonly throttled: boolean;
  constructor(override readonly cause: unknown) {
    super('target write failed');
    this.name = 'TargetWriteError';
    this.throttled = cause instanceof TransferError && cause.throttled;
  }
}

/** Errors no retry can fix: the cycle cannot complete this descriptor. */
function isPermanent(err: unknown): boolean {
  if (err instanceof TransferError) return !err.retryable;
  return (
    err instanceof IntegrityError ||
    err instanceof ChangeMapError ||
    err instanceof ConfigError ||
    err instanceof CycleStateError
  );
}

/**
 * Processes one SQS batch. Never throws for one grant's failure: the answer lists the grants SQS must
 * deliver again (partial batch response). `remainingMs` is the Lambda context's clock.
 */
export async function writeGrants(
  deps: WriterDeps,
  records: readonly GrantRecord[],
  remainingMs: () => number,
): Promise<BatchResult> {
  const outcomes: Record<GrantOutcome, number> = {
    written: 0,
    duplicate: 0,
    stale: 0,
    failed: 0,
    retry: 0,
    'handed-back': 0,
    malformed: 0,
  };
  const failures: { itemIdentifier: string }[] = [];
  const deadline = new AbortController();
  // Every SDK call of the batch listens on it: as many as grants x blocks, by design.
  setMaxListeners(0, deadline.signal);
  const timer = setTimeout(() => deadline.abort(), Math.max(0, remainingMs() - deps.marginMs));
  timer.unref?.();

  const one = async (record: GrantRecord): Promise<void> => {
    const outcome = await handleRecord(deps, record, deadline.signal, remainingMs);
    outcomes[outcome]++;
    if (outcome === 'retry' || outcome === 'handed-back' || outcome === 'malformed') {
      failures.push({ itemIdentifier: record.messageId });
    }
  };
  try {
    let next = 0;
    const worker = async () => {
      while (next < records.length) await one(records[next++]!);
    };
    await Promise.all(Array.from({ length: Math.min(deps.concurrency, records.length) }, worker));
  } finally {
    clearTimeout(timer);
  }
  for (const [name, value] of Object.entries(outcomes)) {
    if (value > 0) deps.meter.add(`Grants_${name}`, 'Count', value);
  }
  return { batchItemFailures: failures, outcomes };
}

async function handleRecord(
  deps: WriterDeps,
  record: GrantRecord,
  signal: AbortSignal,
  remainingMs: () => number,
): Promise<GrantOutcome> {
  let grant: GrantMessage;
  try {
    grant = decodeGrant(record.body);
  } catch (err) {
    const why = err instanceof GrantMessageError ? err.message : errorMessage(err);
    deps.log.error('malformed grant message; leaving it for the DLQ', {
      messageId: record.messageId,
      error: why,
    });
    return 'malformed';
  }
  const where = {
    messageId: record.messageId,
    set: grant.set,
    cycleId: grant.cycleId,
    disk: grant.disk,
    seq: grant.descriptor.seq,
    attempt: grant.attempt,
  };
  if (signal.aborted || remainingMs() < deps.marginMs) return handBack(deps, record, where);

  const signals: SignalDelta = {
    attempts: 0,
    successes: 0,
    throttles: 0,
    errors: 0,
    bytes: 0,
    latencyMs: 0,
    windowLimited: 0,
    nodePressure: 0,
  };
  const onRetry = (info: { throttled: boolean }) => {
    signals.attempts++;
    if (info.throttled) signals.throttles++;
    else signals.errors++;
  };
  try {
    const outcome = await writeGrant(deps, grant, signal, onRetry, signals);
    if (outcome !== 'stale') await topUp(deps, grant, signals);
    await deps.store
      .recordSignals(grant.set, grant.disk, grant.cycleId, deps.now(), signals)
      .catch((err: unknown) => deps.log.warn('signals not recorded', { ...where, error: errorMessage(err) }));
    if (outcome === 'written') deps.log.debug('grant written', { ...where, bytes: grant.descriptor.bytes });
    else deps.log.info(`grant ${outcome}`, where);
    return outcome;
  } catch (caught) {
    // Only a failed target write is a signal for the window; a source or state hiccup is not.
    let err = caught;
    if (caught instanceof TargetWriteError) {
      signals.attempts++;
      if (caught.throttled) signals.throttles++;
      else signals.errors++;
      err = caught.cause;
    }
    await deps.store
      .recordSignals(grant.set, grant.disk, grant.cycleId, deps.now(), signals)
      .catch(() => undefined);
    if (signal.aborted || err instanceof AbortedError) return handBack(deps, record, where);
    if (isPermanent(err)) return failForGood(deps, grant, err, where);
    deps.log.warn('grant failed; SQS will deliver it again', { ...where, error: errorMessage(err) });
    return 'retry';
  }
}

/**
 * The grant itself. Order matters for crash safety: the completion is recorded before the lease is
 * released, so a crash in between costs a repeated write (idempotent), never a lost descriptor.
 */
async function writeGrant(
  deps: WriterDeps,
  grant: GrantMessage,
  signal: AbortSignal,
  onRetry: (info: { throttled: boolean }) => void,
  signals: SignalDelta,
): Promise<'written' | 'duplicate' | 'stale'> {
  const { store, grants } = deps;
  const { set, disk, cycleId, descriptor, leaseId } = grant;
  const onSourceRetry = (info: { throttled: boolean }) =>
    deps.meter.add(info.throttled ? 'SourceThrottles' : 'SourceRetries', 'Count', 1);
  const seq = descriptor.seq;
  const rec = await store.getCycleDisk(set, disk, cycleId);
  if (rec === undefined) {
    deps.log.warn('grant names a cycle that does not exist; acknowledging it', { set, disk, cycleId, seq });
    return 'stale';
  }
  if (rec.state !== 'active') {
    // The cycle is over (finalizing, published or aborted): give the bytes back, write nothing.
    await grants.completeGrant(set, disk, seq, leaseId);
    return 'stale';
  }
  // Checks the lease is live and restarts its clock for this writer: a grant that waited in the queue
  // is not reclaimed under a writer that just picked it up.
  if (!(await grants.renewGrant(set, disk, seq, leaseId, deps.now() + deps.leaseMs))) return 'stale';

  const stored = await deps.pages.get(rec, seq);
  if (!sameDescriptor(stored, descriptor)) {
    throw new IntegrityError(
      `grant for disk ${disk} seq ${seq} does not match the stored descriptor (offset ${descriptor.offset} vs ${stored.offset})`,
      { disk, seq, offset: descriptor.offset },
    );
  }
  if (await store.isCompleted(rec, seq)) {
    await grants.completeGrant(set, disk, seq, leaseId);
    return 'duplicate';
  }

  const indexes = blockIndexes(stored);
  const blocks = await Promise.all(
    indexes.map(async (index, i) => {
      const token = stored.tokens[i];
      if (token === undefined) return { index, ...zeroBlock() };
      // Source retries are not the target's signals: only target trouble steers the window.
      const read = await deps.reader.readBlock({
        disk,
        snapshotId: rec.sourceSnapshotId,
        index,
        token,
        signal,
        onRetry: onSourceRetry,
      });
      if (read.data.length !== EBS_BLOCK_SIZE) {
        throw new IntegrityError(
          `block ${index} of source snapshot ${rec.sourceSnapshotId} (disk ${disk}) is ${read.data.length} bytes, not ${EBS_BLOCK_SIZE}`,
          { disk, seq, offset: index * EBS_BLOCK_SIZE },
        );
      }
      return { index, data: read.data, checksum: read.checksum };
    }),
  );

  const skipZeroBlocks = rec.kind === 'full' && !rec.encrypted;
  const started = performance.now();
  const written = await deps.writer
    .putBlocks({
      disk,
      snapshotId: rec.targetSnapshotId,
      blocks: blocks.map((b) => ({ index: b.index, data: b.data })),
      skipZeroBlocks,
      seq,
      snapshotStartedAt: rec.targetStartedAt,
      signal,
      onRetry,
    })
    .catch((err: unknown) => {
      throw new TargetWriteError(err);
    });
  const latencyMs = performance.now() - started;

  // End to end: what the target accepted is what the source vouched for, block by block.
  const expected = new Map(blocks.map((b) => [b.index, b.checksum]));
  for (const w of written) {
    const want = expected.get(w.index);
    if (want !== w.checksum) {
      throw new IntegrityError(
        `block ${w.index} of disk ${disk} was written to ${rec.targetSnapshotId} with SHA-256 ${w.checksum}, but the source read ${want ?? '(no such block)'}`,
        { disk, seq, offset: w.index * EBS_BLOCK_SIZE },
      );
    }
  }
  if (!skipZeroBlocks && written.length !== blocks.length) {
    throw new IntegrityError(
      `${written.length} of ${blocks.length} blocks of disk ${disk} seq ${seq} were written to ${rec.targetSnapshotId}; an incremental or encrypted snapshot needs every one`,
      { disk, seq },
    );
  }

  const recorded = await store.recordCompletion(rec, seq, written, deps.now());
  if (recorded) await store.countCompletion(set, disk, cycleId, descriptor.bytes, written.length);
  await grants.completeGrant(set, disk, seq, leaseId);
  signals.attempts++;
  signals.successes++;
  signals.bytes += descriptor.bytes;
  signals.latencyMs += latencyMs;
  deps.meter.add('BytesWritten', 'Bytes', descriptor.bytes);
  return recorded ? 'written' : 'duplicate';
}

/** ACK-clocked top-up after a completion; a failure here only delays grants until the next tick. */
async function topUp(deps: WriterDeps, grant: GrantMessage, signals: SignalDelta): Promise<void> {
  try {
    const rec = await deps.store.getCycleDisk(grant.set, grant.disk, grant.cycleId);
    if (rec === undefined) return;
    const r = await topUpDisk(deps, rec, TOP_UP_PER_COMPLETION);
    await sendPending(deps, r.pending);
    // The controller's evidence: the window (not the source) was the limit, or the node budget was.
    if (r.stop === 'window') signals.windowLimited++;
    if (r.stop === 'budget') signals.nodePressure++;
  } catch (err) {
    deps.log.warn('top-up after completion failed; the next tick grants instead', {
      disk: grant.disk,
      error: errorMessage(err),
    });
  }
}

async function handBack(
  deps: WriterDeps,
  record: GrantRecord,
  where: Record<string, unknown>,
): Promise<GrantOutcome> {
  try {
    await deps.queue.release(record.receiptHandle);
  } catch (err) {
    deps.log.warn('could not reset the visibility of a handed-back grant', {
      ...where,
      error: errorMessage(err),
    });
  }
  deps.log.info('deadline near: grant handed back', where);
  return 'handed-back';
}

async function failForGood(
  deps: WriterDeps,
  grant: GrantMessage,
  err: unknown,
  where: Record<string, unknown>,
): Promise<GrantOutcome> {
  const reason = `disk ${grant.disk} seq ${grant.descriptor.seq} failed permanently: ${errorMessage(err)}`;
  deps.log.error('grant failed permanently; the cycle fails', { ...where, error: errorMessage(err) });
  try {
    await deps.store.recordFailure(grant.set, grant.cycleId, reason);
    await deps.grants.completeGrant(grant.set, grant.disk, grant.descriptor.seq, grant.leaseId);
  } catch (inner) {
    // Not recorded: let SQS deliver it again, so the failure is recorded next time.
    deps.log.warn('could not record the failure; leaving the grant to SQS', {
      ...where,
      error: errorMessage(inner),
    });
    return 'retry';
  }
  return 'failed';
}
