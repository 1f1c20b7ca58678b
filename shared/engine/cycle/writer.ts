// The chunk writer, one queue batch at a time, ACK-clocked: write, record, count, top up, send.
import { setMaxListeners } from 'node:events';
import {
  AbortedError,
  ChangeMapError,
  ConfigError,
  errorMessage,
  IntegrityError,
  TransferError,
} from '../errors.ts';
import type { Limit } from '../grant-rule.ts';
import { sha256, toBase64 } from '../integrity.ts';
import type { Clock, Random } from '../ports.ts';
import { DescriptorCache } from './descriptor-cache.ts';
import { blockIndexes, sameDescriptor } from './descriptor-pages.ts';
import { CycleStateError } from './errors.ts';
import { lookahead, planAdvance } from './grant-plan.ts';
import { sendGrants } from './grant-send.ts';
import {
  type BlockReader,
  type CompletionEntry,
  type CycleDiskRecord,
  type CycleLedger,
  EBS_BLOCK_SIZE,
  type FlowKey,
  type FlowState,
  type Grant,
  type GrantChannel,
  type GrantFlow,
  type GrantRecord,
  type Log,
  type Meter,
  type SignalDelta,
  type SnapshotWriter,
  type WrittenBlock,
} from './ports.ts';

// Grants one counted completion may issue: a completion frees one chunk's room, more only when the
// window grew meanwhile; the tick fills the rest.
export const TOP_UP_PER_COMPLETION = 4;
// Chunk bytes one batch holds at once by default: ten 1 MiB chunks fit many times over, while ten
// 64 MiB chunks (the largest chunk size) would not fit a 1024 MB function; those go four at a time.
export const WRITER_BUFFER_BYTES = 256 * 1024 * 1024;
// Most grants one disk's top-up issues per batch, whatever the batch counted: bounds the descriptor
// lookahead (at most two pages) and the size of the advance.
export const MAX_TOP_UP = 64;

/** What a writer container keeps across batches: disk records once diffed, descriptor pages (LRU). */
export class WriterCache {
  private readonly disks = new Map<string, CycleDiskRecord>();
  readonly pages: DescriptorCache;

  constructor(
    private readonly ledger: Pick<CycleLedger, 'getDisk' | 'getDescriptorPage'>,
    pageCapacity?: number,
  ) {
    this.pages = new DescriptorCache(ledger, pageCapacity);
  }

  /**
   * The disk's record. Cached only once the differ is done: from then on it changes only in
   * `state`, the controller and `completeRequested`, none of which a writer reads (the flow's `open`
   * is what stops writers).
   */
  async disk(key: FlowKey): Promise<CycleDiskRecord | undefined> {
    const id = JSON.stringify([key.set, key.disk, key.cycleId]);
    const cached = this.disks.get(id);
    if (cached !== undefined) return cached;
    const rec = await this.ledger.getDisk(key.set, key.disk, key.cycleId);
    if (rec?.diffDone === true) {
      // Bounded: a container serves a handful of cycles' disks; forget the oldest past a few hundred.
      if (this.disks.size >= 512) this.disks.delete(this.disks.keys().next().value as string);
      this.disks.set(id, rec);
    }
    return rec;
  }
}

export interface WriterDeps {
  readonly ledger: Pick<CycleLedger, 'recordCompletions' | 'recordFailure' | 'addSignals'>;
  readonly flow: Pick<GrantFlow, 'get' | 'complete' | 'advance' | 'control'>;
  readonly channel: GrantChannel;
  readonly reader: BlockReader;
  readonly writer: Pick<SnapshotWriter, 'putBlocks'>;
  /** Per container (module scope in a handler). */
  readonly cache: WriterCache;
  readonly clock: Clock;
  /** Batch ids. */
  readonly random: Random;
  readonly log: Log;
  readonly meter: Meter;
  /** Grants written at once within one batch (all disks). */
  readonly concurrency: number;
  /**
   * Descriptor bytes a batch may hold in memory at once (source blocks read, target blocks written):
   * fewer grants go at once when chunks are large. Default WRITER_BUFFER_BYTES.
   */
  readonly bufferBytes?: number | undefined;
  /** Stop this long before the deadline and hand what is left back. */
  readonly marginMs: number;
}

export type GrantOutcome =
  /** Written, recorded and counted by this delivery. */
  | 'written'
  /** Already complete (a duplicate delivery or a re-grant of a finished chunk): acknowledged. */
  | 'duplicate'
  /** Its cycle is over or unknown (the flow is closed or gone): acknowledged, nothing written. */
  | 'stale'
  /** Failed for good: the cycle's failure is recorded, the message acknowledged. */
  | 'failed'
  /** Failed for now: left to the queue to deliver again (a batch item failure). */
  | 'retry'
  /** Not started or interrupted before the deadline: handed back, delivered again at once. */
  | 'handed-back'
  /** Not a grant: left to reach the DLQ. */
  | 'malformed';

export interface BatchResult {
  readonly batchItemFailures: { itemIdentifier: string }[];
  readonly outcomes: Record<GrantOutcome, number>;
}

/** A failure of the target write, kept apart from source trouble (only target trouble steers windows). */
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

let zero: { data: Uint8Array; checksum: string } | undefined;
const zeroBlock = (): { data: Uint8Array; checksum: string } => {
  zero ??= {
    data: new Uint8Array(EBS_BLOCK_SIZE),
    checksum: toBase64(sha256(new Uint8Array(EBS_BLOCK_SIZE))),
  };
  return zero;
};

/** At most `n` tasks at once; the rest wait in order. */
class Limiter {
  private active = 0;
  private readonly waiting: (() => void)[] = [];
  constructor(private readonly n: number) {}
  async run<T>(task: () => Promise<T>): Promise<T> {
    if (this.active >= this.n) await new Promise<void>((resolve) => this.waiting.push(resolve));
    this.active++;
    try {
      return await task();
    } finally {
      this.active--;
      this.waiting.shift()?.();
    }
  }
}

const emptySignals = (): { -readonly [K in keyof SignalDelta]: number } => ({
  attempts: 0,
  successes: 0,
  throttles: 0,
  errors: 0,
  bytes: 0,
  latencyMs: 0,
  windowLimited: 0,
  nodePressure: 0,
});
type Signals = ReturnType<typeof emptySignals>;

interface Item {
  readonly record: GrantRecord;
  readonly grant: Grant;
}

interface Batch {
  readonly deps: WriterDeps;
  readonly signal: AbortSignal;
  readonly remainingMs: () => number;
  readonly limiter: Limiter;
  settle(record: GrantRecord, outcome: GrantOutcome): void;
}

/**
 * Processes one queue batch. Never throws for a grant's failure: the answer lists the grants the
 * queue must deliver again (partial batch response). `remainingMs` is the invocation's clock.
 *
 * Crash safety is by order, per disk: blocks written -> completions recorded -> counted -> advance ->
 * send. A crash between any two loses nothing: an unacknowledged grant is delivered again; a
 * completion recorded but not counted is counted by that redelivery (`complete` is exactly-once per
 * seq); a grant advanced but never sent is found by the tick's reclaim.
 */
export async function writeBatch(
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
  const settle = (record: GrantRecord, outcome: GrantOutcome) => {
    outcomes[outcome]++;
    if (outcome === 'retry' || outcome === 'handed-back' || outcome === 'malformed') {
      failures.push({ itemIdentifier: record.messageId });
    }
  };

  const groups = new Map<string, { key: FlowKey; items: Item[] }>();
  for (const record of records) {
    let grant: Grant;
    try {
      grant = deps.channel.decode(record.body);
    } catch (err) {
      deps.log.error('malformed grant message; leaving it for the DLQ', {
        messageId: record.messageId,
        error: errorMessage(err),
      });
      settle(record, 'malformed');
      continue;
    }
    const id = JSON.stringify([grant.set, grant.cycleId, grant.disk]);
    let group = groups.get(id);
    if (group === undefined) {
      group = { key: { set: grant.set, disk: grant.disk, cycleId: grant.cycleId }, items: [] };
      groups.set(id, group);
    }
    group.items.push({ record, grant });
  }

  // The deadline: every source and target call of the batch listens on it (as many as grants x
  // blocks, by design). Timed on the injected clock, cancelled when the batch is done.
  const deadline = new AbortController();
  setMaxListeners(0, deadline.signal);
  const done = new AbortController();
  deps.clock.sleep(Math.max(0, remainingMs() - deps.marginMs), done.signal).then(
    () => deadline.abort(),
    () => undefined,
  );
  const batch: Batch = {
    deps,
    signal: deadline.signal,
    remainingMs,
    limiter: new Limiter(
      batchConcurrency(
        deps,
        Math.max(0, ...[...groups.values()].flatMap((g) => g.items.map((i) => i.grant.descriptor.length))),
      ),
    ),
    settle,
  };
  try {
    await Promise.all([...groups.values()].map((g) => writeGroup(batch, g.key, g.items)));
  } finally {
    done.abort();
  }
  for (const [name, value] of Object.entries(outcomes)) {
    if (value > 0) deps.meter.add(`Grants_${name}`, 'Count', value);
  }
  return { batchItemFailures: failures, outcomes };
}

/** Grants at once: the configured concurrency, fewer when chunks of `largest` bytes would not fit the buffer. */
export function batchConcurrency(
  deps: Pick<WriterDeps, 'concurrency' | 'bufferBytes'>,
  largest: number,
): number {
  const byMemory =
    largest > 0 ? Math.floor((deps.bufferBytes ?? WRITER_BUFFER_BYTES) / largest) : deps.concurrency;
  return Math.max(1, Math.min(deps.concurrency, byMemory));
}

/** A batch id: unique per batch (the ledger keys completions by it), from the injected randomness. */
function batchId(deps: Pick<WriterDeps, 'clock' | 'random'>): string {
  const word = () =>
    Math.floor(deps.random() * 0x1_0000_0000)
      .toString(16)
      .padStart(8, '0');
  return `b${deps.clock.now().toString(36)}-${word()}${word()}${word()}`;
}

const nearDeadline = (b: Batch) => b.signal.aborted || b.remainingMs() < b.deps.marginMs;

async function handBack(b: Batch, item: Item): Promise<void> {
  try {
    await b.deps.channel.handBack(item.record.receiptHandle);
  } catch (err) {
    b.deps.log.warn('could not hand a grant back; the queue delivers it after its visibility timeout', {
      messageId: item.record.messageId,
      error: errorMessage(err),
    });
  }
  b.settle(item.record, 'handed-back');
}

/** One disk's grants of the batch. */
async function writeGroup(b: Batch, key: FlowKey, items: readonly Item[]): Promise<void> {
  const { deps } = b;
  const where = { set: key.set, cycleId: key.cycleId, disk: key.disk };
  if (nearDeadline(b)) {
    for (const item of items) await handBack(b, item);
    return;
  }
  let rec: CycleDiskRecord | undefined;
  let state: FlowState | undefined;
  try {
    rec = await deps.cache.disk(key);
    state = rec === undefined ? undefined : await deps.flow.get(key);
  } catch (err) {
    deps.log.warn('disk or flow not readable; the queue delivers the grants again', {
      ...where,
      error: errorMessage(err),
    });
    for (const item of items) b.settle(item.record, 'retry');
    return;
  }
  if (rec === undefined || state === undefined || !state.open) {
    // The cycle is over (finalizing, published, aborted) or unknown: write nothing, acknowledge.
    for (const item of items) b.settle(item.record, 'stale');
    deps.log.info('grants of a closed or unknown flow acknowledged', { ...where, count: items.length });
    return;
  }
  const disk = rec;
  if (!disk.diffDone || disk.descriptors === undefined) {
    deps.log.warn('grants for a disk not diffed yet; the queue delivers them again', where);
    for (const item of items) b.settle(item.record, 'retry');
    return;
  }

  // Skip what the flow already counts; write each remaining seq once.
  const toWrite: Item[] = [];
  const taken = new Set<number>();
  for (const item of items) {
    const seq = item.grant.descriptor.seq;
    const complete = seq < state.low || state.done.has(seq);
    if ((complete && item.grant.repair !== true) || taken.has(seq)) {
      b.settle(item.record, 'duplicate');
      continue;
    }
    taken.add(seq);
    toWrite.push(item);
  }

  const signals = emptySignals();
  const written: { item: Item; entry: CompletionEntry; bytes: number }[] = [];
  let poisoned = false;
  await Promise.all(
    toWrite.map(async (item) => {
      const at = {
        ...where,
        messageId: item.record.messageId,
        seq: item.grant.descriptor.seq,
        attempt: item.grant.attempt,
      };
      try {
        const out = await b.limiter.run(async () => {
          if (nearDeadline(b)) throw new AbortedError('deadline near');
          return writeChunk(b, disk, item.grant, signals);
        });
        written.push({ item, entry: { seq: out.seq, blocks: out.blocks }, bytes: out.bytes });
      } catch (caught) {
        let err = caught;
        if (caught instanceof TargetWriteError) {
          signals.attempts++;
          if (caught.throttled) signals.throttles++;
          else signals.errors++;
          err = caught.cause;
        }
        if (b.signal.aborted || err instanceof AbortedError) return handBack(b, item);
        if (isPermanent(err)) {
          poisoned = true;
          return failForGood(b, item, err, at);
        }
        deps.log.warn('grant failed; the queue delivers it again', { ...at, error: errorMessage(err) });
        b.settle(item.record, 'retry');
      }
    }),
  );

  let counted = 0;
  if (written.length > 0) {
    const entries = written.map((w) => w.entry).sort((x, y) => x.seq - y.seq);
    try {
      // 1. Durable record of what was written, 2. counted exactly once per seq.
      await deps.ledger.recordCompletions(key.set, key.disk, key.cycleId, batchId(deps), entries);
      const after = await deps.flow.complete(
        key,
        written.map((w) => ({ seq: w.entry.seq, bytes: w.bytes, blocks: w.entry.blocks.length })),
      );
      state = after.state;
      const mine = new Set(after.counted);
      counted = mine.size;
      for (const w of written) b.settle(w.item.record, mine.has(w.entry.seq) ? 'written' : 'duplicate');
      deps.meter.add(
        'BytesWritten',
        'Bytes',
        written.reduce((sum, w) => sum + w.bytes, 0),
      );
    } catch (err) {
      // Written but not recorded or not counted: a redelivery writes again (idempotent) and counts.
      deps.log.warn('completions not recorded; the queue delivers the grants again', {
        ...where,
        error: errorMessage(err),
      });
      for (const w of written) b.settle(w.item.record, 'retry');
    }
  }

  // 3. Top the window up: the ACK clock. A failure here only delays grants until the next tick. A
  //    cycle this batch just failed gets no more grants.
  let limit: Limit = 'none';
  if (!poisoned) {
    try {
      const max = Math.min(MAX_TOP_UP, TOP_UP_PER_COMPLETION * Math.max(1, counted));
      limit = await topUp(deps, key, disk, state, max);
    } catch (err) {
      deps.log.warn('top-up after completions failed; the next tick grants instead', {
        ...where,
        error: errorMessage(err),
      });
    }
  }
  if (signals.attempts > 0) {
    // The controller's evidence: the window (not the source) was the limit, or the node budget was.
    if (limit === 'window') signals.windowLimited += signals.successes;
    if (limit === 'budget') signals.nodePressure += signals.successes;
    await deps.ledger
      .addSignals(key.set, key.disk, key.cycleId, deps.clock.now(), signals)
      .catch((err: unknown) => deps.log.warn('signals not recorded', { ...where, error: errorMessage(err) }));
  }
}

/** Reads, writes and checks one grant's chunk; returns what the target accepted. */
async function writeChunk(
  b: Batch,
  rec: CycleDiskRecord,
  grant: Grant,
  signals: Signals,
): Promise<{ seq: number; blocks: WrittenBlock[]; bytes: number }> {
  const { deps, signal } = b;
  const { disk, descriptor } = grant;
  const seq = descriptor.seq;
  const stored = await deps.cache.pages.get(rec, seq);
  if (!sameDescriptor(stored, descriptor)) {
    throw new IntegrityError(
      `grant for disk ${disk} seq ${seq} does not match the stored descriptor (offset ${descriptor.offset} vs ${stored.offset})`,
      { disk, seq, offset: descriptor.offset },
    );
  }
  // Source retries are metrics, not the target's signals: only target trouble steers the window.
  const onSourceRetry = (info: { throttled: boolean }) =>
    deps.meter.add(info.throttled ? 'SourceThrottles' : 'SourceRetries', 'Count', 1);
  const indexes = blockIndexes(stored);
  const blocks = await Promise.all(
    indexes.map(async (index, i) => {
      const token = stored.tokens[i];
      if (token === undefined) return { index, ...zeroBlock() };
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
  const started = deps.clock.now();
  const written = await deps.writer
    .putBlocks({
      disk,
      snapshotId: rec.targetSnapshotId,
      blocks: blocks.map((x) => ({ index: x.index, data: x.data })),
      skipZeroBlocks,
      seq,
      snapshotStartedAt: rec.targetStartedAt,
      signal,
      onRetry: (info) => {
        signals.attempts++;
        if (info.throttled) signals.throttles++;
        else signals.errors++;
      },
    })
    .catch((err: unknown) => {
      throw new TargetWriteError(err);
    });
  const latencyMs = deps.clock.now() - started;

  // End to end: what the target accepted is what the source vouched for, block by block.
  const expected = new Map(blocks.map((x) => [x.index, x.checksum]));
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
  signals.attempts++;
  signals.successes++;
  signals.bytes += stored.bytes;
  signals.latencyMs += latencyMs;
  return { seq, blocks: written, bytes: stored.bytes };
}

/**
 * The ACK-clocked top-up: one conditional advance planned from the state `complete` returned (no
 * read), then the new grants sent. A lost race re-reads once; after that the tick grants instead.
 * Grants the channel did not take are marked to grant again. Returns what limited the disk.
 */
async function topUp(
  deps: WriterDeps,
  key: FlowKey,
  rec: CycleDiskRecord,
  start: FlowState,
  max: number,
): Promise<Limit> {
  const total = rec.descriptors ?? 0;
  let state: FlowState | undefined = start;
  for (let round = 0; round < 2 && state?.open === true; round++) {
    const now = deps.clock.now();
    const descriptors = await deps.cache.pages.many(rec, lookahead(state, total, now, max));
    const plan = planAdvance(state, total, (seq) => descriptors.get(seq)?.bytes, now, max);
    if (plan.change === undefined) return plan.limit;
    const after = await deps.flow.advance(key, state.version, plan.change);
    if (after === undefined) {
      state = await deps.flow.get(key);
      continue;
    }
    if (plan.grants.length > 0) await sendGrants(deps, key, plan.grants, descriptors);
    return plan.limit;
  }
  return 'none';
}

async function failForGood(
  b: Batch,
  item: Item,
  err: unknown,
  where: Record<string, unknown>,
): Promise<void> {
  const { grant } = item;
  const reason = `disk ${grant.disk} seq ${grant.descriptor.seq} failed permanently: ${errorMessage(err)}`;
  b.deps.log.error('grant failed permanently; the cycle fails', { ...where, error: errorMessage(err) });
  try {
    await b.deps.ledger.recordFailure(grant.set, grant.cycleId, reason);
  } catch (inner) {
    // Not recorded: let the queue deliver it again, so the failure is recorded next time.
    b.deps.log.warn('could not record the failure; leaving the grant to the queue', {
      ...where,
      error: errorMessage(inner),
    });
    b.settle(item.record, 'retry');
    return;
  }
  b.settle(item.record, 'failed');
}
