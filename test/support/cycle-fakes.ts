// In-memory fakes of the serverless cycle's ports (shared/engine/cycle/ports.ts), each following the
// port's stated contract to the letter: the cycle logic's tests run on them, and the contract suites
// run against them as against the DynamoDB/SQS adapters. Plus the EBS side (`MemorySnapshots`: source
// snapshots with blocks and tokens, target snapshots with checksums, injectable throttles and
// failures) and a grant queue with at-least-once delivery. Every fake counts its calls by kind (read
// or write), so tests can hold the cycle to its request budget.
import { createHash } from 'node:crypto';
import type {
  CatalogDiskRecord,
  ChangeLister,
  ChangePage,
  CompletionEntry,
  CycleCatalog,
  CycleDiskRecord,
  CycleLedger,
  CyclePatch,
  CycleRecord,
  CycleState,
  DiskPatch,
  EventPublisher,
  FlowAdvance,
  FlowControl,
  FlowKey,
  FlowState,
  Grant,
  GrantChannel,
  GrantFlow,
  GrantMark,
  GrantRecord,
  JobRecord,
  JobStatus,
  NodeBudget,
  PlanLock,
  PlanLocks,
  PlannedDescriptor,
  ReadBlock,
  Regrant,
  ReplicationSetRecord,
  SignalBucket,
  SignalDelta,
  SnapshotStatus,
  SnapshotWriter,
  TargetBlock,
  WrittenBlock,
} from '../../shared/engine/cycle/ports.ts';
import { EBS_BLOCK_SIZE, SIGNAL_BUCKET_MS } from '../../shared/engine/cycle/ports.ts';
import { TransferError } from '../../shared/engine/errors.ts';
import type { Clock, RecoveryCheckpoint } from '../../shared/engine/ports.ts';

// ---- call counting ---------------------------------------------------------------------------------

/** Calls of a fake by method, and in total by kind (a DynamoDB read or write in the real adapter). */
export class CallCounts {
  readonly byMethod = new Map<string, number>();
  reads = 0;
  writes = 0;
  count(method: string, kind: 'read' | 'write'): void {
    this.byMethod.set(method, (this.byMethod.get(method) ?? 0) + 1);
    if (kind === 'read') this.reads++;
    else this.writes++;
  }
  reset(): void {
    this.byMethod.clear();
    this.reads = 0;
    this.writes = 0;
  }
}

const keyOf = (...parts: readonly (string | number)[]): string => JSON.stringify(parts);
const clone = <T>(value: T): T => structuredClone(value);

// ---- CycleLedger -----------------------------------------------------------------------------------

/** The ledger in maps. Conditional methods answer false/undefined when the condition fails. */
export class MemoryCycleLedger implements CycleLedger {
  readonly calls = new CallCounts();
  readonly cycles = new Map<string, CycleRecord>();
  readonly disks = new Map<string, CycleDiskRecord>();
  readonly pages = new Map<string, PlannedDescriptor[]>();
  /** Per disk: batch id -> entries. */
  readonly completions = new Map<string, Map<string, CompletionEntry[]>>();
  readonly signals = new Map<string, Map<number, SignalDelta>>();

  async createCycle(record: CycleRecord): Promise<boolean> {
    this.calls.count('createCycle', 'write');
    const k = keyOf(record.set, record.cycleId);
    if (this.cycles.has(k)) return false;
    this.cycles.set(k, clone(record));
    return true;
  }

  async getCycle(set: string, cycleId: string): Promise<CycleRecord | undefined> {
    this.calls.count('getCycle', 'read');
    return clone(this.cycles.get(keyOf(set, cycleId)));
  }

  async updateCycle(
    set: string,
    cycleId: string,
    patch: CyclePatch,
    from?: readonly CycleState[],
  ): Promise<CycleRecord | undefined> {
    this.calls.count('updateCycle', 'write');
    const k = keyOf(set, cycleId);
    const c = this.cycles.get(k);
    if (c === undefined || (from !== undefined && !from.includes(c.state))) return undefined;
    const next = { ...c, ...definedOnly(patch) };
    this.cycles.set(k, next);
    return clone(next);
  }

  async recordFailure(set: string, cycleId: string, failure: string): Promise<boolean> {
    this.calls.count('recordFailure', 'write');
    const k = keyOf(set, cycleId);
    const c = this.cycles.get(k);
    if (c === undefined || c.failure !== undefined) return false;
    this.cycles.set(k, { ...c, failure });
    return true;
  }

  async createDisk(record: CycleDiskRecord): Promise<boolean> {
    this.calls.count('createDisk', 'write');
    const k = keyOf(record.set, record.disk, record.cycleId);
    if (this.disks.has(k)) return false;
    this.disks.set(k, clone(record));
    return true;
  }

  async getDisk(set: string, disk: string, cycleId: string): Promise<CycleDiskRecord | undefined> {
    this.calls.count('getDisk', 'read');
    return clone(this.disks.get(keyOf(set, disk, cycleId)));
  }

  async updateDisk(
    set: string,
    disk: string,
    cycleId: string,
    patch: DiskPatch,
    expect?: Partial<Pick<CycleDiskRecord, 'state' | 'diffSeq' | 'diffDone'>>,
  ): Promise<CycleDiskRecord | undefined> {
    this.calls.count('updateDisk', 'write');
    const k = keyOf(set, disk, cycleId);
    const d = this.disks.get(k);
    if (d === undefined) return undefined;
    for (const [field, value] of Object.entries(expect ?? {})) {
      if (value !== undefined && d[field as keyof CycleDiskRecord] !== value) return undefined;
    }
    const next = { ...d, ...definedOnly(clone(patch)) };
    this.disks.set(k, next);
    return clone(next);
  }

  async putDescriptorPage(
    set: string,
    disk: string,
    cycleId: string,
    page: number,
    descriptors: readonly PlannedDescriptor[],
  ): Promise<void> {
    this.calls.count('putDescriptorPage', 'write');
    this.pages.set(keyOf(set, disk, cycleId, page), clone([...descriptors]));
  }

  async getDescriptorPage(
    set: string,
    disk: string,
    cycleId: string,
    page: number,
  ): Promise<PlannedDescriptor[] | undefined> {
    this.calls.count('getDescriptorPage', 'read');
    return clone(this.pages.get(keyOf(set, disk, cycleId, page)));
  }

  async recordCompletions(
    set: string,
    disk: string,
    cycleId: string,
    batchId: string,
    entries: readonly CompletionEntry[],
  ): Promise<void> {
    this.calls.count('recordCompletions', 'write');
    const k = keyOf(set, disk, cycleId);
    let batches = this.completions.get(k);
    if (batches === undefined) {
      batches = new Map();
      this.completions.set(k, batches);
    }
    batches.set(batchId, clone([...entries]));
  }

  async *listCompletions(set: string, disk: string, cycleId: string): AsyncIterable<CompletionEntry> {
    // One query; a real one pages every 1 MB, which a test's disks never reach.
    this.calls.count('listCompletions', 'read');
    const batches = [...(this.completions.get(keyOf(set, disk, cycleId))?.values() ?? [])];
    for (const entries of batches) for (const e of entries) yield clone(e);
  }

  async addSignals(
    set: string,
    disk: string,
    cycleId: string,
    at: number,
    delta: SignalDelta,
  ): Promise<void> {
    this.calls.count('addSignals', 'write');
    const k = keyOf(set, disk, cycleId);
    let buckets = this.signals.get(k);
    if (buckets === undefined) {
      buckets = new Map();
      this.signals.set(k, buckets);
    }
    const bucket = Math.floor(at / SIGNAL_BUCKET_MS) * SIGNAL_BUCKET_MS;
    const b = buckets.get(bucket) ?? emptyDelta();
    buckets.set(bucket, {
      attempts: b.attempts + delta.attempts,
      successes: b.successes + delta.successes,
      throttles: b.throttles + delta.throttles,
      errors: b.errors + delta.errors,
      bytes: b.bytes + delta.bytes,
      latencyMs: b.latencyMs + delta.latencyMs,
      windowLimited: b.windowLimited + delta.windowLimited,
      nodePressure: b.nodePressure + delta.nodePressure,
    });
  }

  async readSignals(
    set: string,
    disk: string,
    cycleId: string,
    from: number,
    to: number,
  ): Promise<SignalBucket[]> {
    this.calls.count('readSignals', 'read');
    const buckets = this.signals.get(keyOf(set, disk, cycleId)) ?? new Map<number, SignalDelta>();
    return [...buckets.entries()]
      .filter(([at]) => at >= from && at < to)
      .sort(([a], [b]) => a - b)
      .map(([at, d]) => ({ at, ...d }));
  }

  /** Test access: the cycle as stored. */
  cycle(set: string, cycleId: string): CycleRecord | undefined {
    return this.cycles.get(keyOf(set, cycleId));
  }
}

const emptyDelta = (): SignalDelta => ({
  attempts: 0,
  successes: 0,
  throttles: 0,
  errors: 0,
  bytes: 0,
  latencyMs: 0,
  windowLimited: 0,
  nodePressure: 0,
});

function definedOnly<T extends object>(patch: T): Partial<T> {
  return Object.fromEntries(Object.entries(patch).filter(([, v]) => v !== undefined)) as Partial<T>;
}

// ---- GrantFlow -------------------------------------------------------------------------------------

interface StoredFlow {
  version: number;
  open: boolean;
  next: number;
  low: number;
  grantedBytes: number;
  lowBytes: number;
  done: Map<number, number>;
  completedCount: number;
  completedBytes: number;
  writtenBlocks: number;
  regrants: Map<number, Regrant>;
  window: number;
  allowance: number;
  allowanceUntil: number;
  marks: GrantMark[];
}

const flowView = (f: StoredFlow): FlowState => ({
  ...f,
  done: new Map(f.done),
  regrants: new Map([...f.regrants].map(([seq, r]) => [seq, { ...r }])),
  marks: f.marks.map((m) => ({ ...m })),
});

/**
 * The per-disk grant record. Every method is atomic (it runs to completion before any other, as a
 * single conditional DynamoDB update does). `onWrite` runs after each change, with the flow's key:
 * tests check their invariants there.
 */
export class MemoryGrantFlow implements GrantFlow {
  readonly calls = new CallCounts();
  readonly flows = new Map<string, StoredFlow>();
  onWrite: ((key: FlowKey) => void) | undefined;

  async create(key: FlowKey, initial: { window: number; allowance: number }): Promise<FlowState> {
    this.calls.count('create', 'write');
    const k = keyOf(key.set, key.disk, key.cycleId);
    let f = this.flows.get(k);
    if (f === undefined) {
      f = {
        version: 0,
        open: true,
        next: 0,
        low: 0,
        grantedBytes: 0,
        lowBytes: 0,
        done: new Map(),
        completedCount: 0,
        completedBytes: 0,
        writtenBlocks: 0,
        regrants: new Map(),
        window: initial.window,
        allowance: initial.allowance,
        allowanceUntil: 0,
        marks: [],
      };
      this.flows.set(k, f);
      this.onWrite?.(key);
    }
    return flowView(f);
  }

  async get(key: FlowKey): Promise<FlowState | undefined> {
    this.calls.count('get', 'read');
    const f = this.flows.get(keyOf(key.set, key.disk, key.cycleId));
    return f === undefined ? undefined : flowView(f);
  }

  async complete(
    key: FlowKey,
    entries: readonly { seq: number; bytes: number; blocks: number }[],
  ): Promise<{ state: FlowState; counted: number[] }> {
    this.calls.count('complete', 'write');
    const f = this.require(key);
    const counted: number[] = [];
    for (const e of entries) {
      if (e.seq < f.low || f.done.has(e.seq)) continue;
      f.done.set(e.seq, e.bytes);
      f.completedCount++;
      f.completedBytes += e.bytes;
      f.writtenBlocks += e.blocks;
      counted.push(e.seq);
    }
    this.onWrite?.(key);
    return { state: flowView(f), counted };
  }

  async advance(key: FlowKey, expectVersion: number, change: FlowAdvance): Promise<FlowState | undefined> {
    this.calls.count('advance', 'write');
    const f = this.flows.get(keyOf(key.set, key.disk, key.cycleId));
    if (f === undefined || f.version !== expectVersion || !f.open) return undefined;
    f.low = change.low;
    f.lowBytes = change.lowBytes;
    for (const seq of change.dropDone) f.done.delete(seq);
    f.next = change.next;
    f.grantedBytes = change.grantedBytes;
    for (const [seq, r] of change.regrants) f.regrants.set(seq, { ...r });
    for (const seq of change.dropRegrants) f.regrants.delete(seq);
    f.version++;
    this.onWrite?.(key);
    return flowView(f);
  }

  async control(key: FlowKey, change: FlowControl): Promise<FlowState> {
    this.calls.count('control', 'write');
    const f = this.require(key);
    if (change.window !== undefined) f.window = change.window;
    if (change.allowance !== undefined) f.allowance = change.allowance;
    if (change.allowanceUntil !== undefined) f.allowanceUntil = change.allowanceUntil;
    if (change.marks !== undefined) f.marks = change.marks.map((m) => ({ ...m }));
    if (change.open !== undefined) f.open = change.open;
    for (const [seq, r] of change.addRegrants ?? []) f.regrants.set(seq, { ...r });
    f.version++;
    this.onWrite?.(key);
    return flowView(f);
  }

  /** Test access: the flow as stored (not a copy). */
  peek(key: FlowKey): FlowState | undefined {
    const f = this.flows.get(keyOf(key.set, key.disk, key.cycleId));
    return f === undefined ? undefined : flowView(f);
  }

  all(): { key: FlowKey; state: FlowState }[] {
    return [...this.flows.entries()].map(([k, f]) => {
      const [set, disk, cycleId] = JSON.parse(k) as [string, string, string];
      return { key: { set, disk, cycleId }, state: flowView(f) };
    });
  }

  private require(key: FlowKey): StoredFlow {
    const f = this.flows.get(keyOf(key.set, key.disk, key.cycleId));
    if (f === undefined) throw new Error(`no flow for disk ${key.disk} of cycle ${key.cycleId}`);
    return f;
  }
}

// ---- PlanLocks, NodeBudget -------------------------------------------------------------------------

export class MemoryPlanLocks implements PlanLocks {
  readonly calls = new CallCounts();
  readonly locks = new Map<string, PlanLock>();

  async acquire(plan: string, owner: string, ttlMs: number, now: number): Promise<PlanLock | undefined> {
    this.calls.count('acquire', 'write');
    const held = this.locks.get(plan);
    if (held !== undefined && held.owner !== owner && held.lockExpiresAt > now) return undefined;
    const lock = { plan, owner, lockExpiresAt: now + ttlMs };
    this.locks.set(plan, lock);
    return { ...lock };
  }

  async renew(plan: string, owner: string, ttlMs: number, now: number): Promise<PlanLock | undefined> {
    this.calls.count('renew', 'write');
    const held = this.locks.get(plan);
    if (held?.owner !== owner) return undefined;
    const lock = { plan, owner, lockExpiresAt: now + ttlMs };
    this.locks.set(plan, lock);
    return { ...lock };
  }

  async release(plan: string, owner: string): Promise<boolean> {
    this.calls.count('release', 'write');
    if (this.locks.get(plan)?.owner !== owner) return false;
    this.locks.delete(plan);
    return true;
  }

  async get(plan: string): Promise<PlanLock | undefined> {
    this.calls.count('get', 'read');
    const held = this.locks.get(plan);
    return held === undefined ? undefined : { ...held };
  }
}

export class MemoryNodeBudget implements NodeBudget {
  readonly calls = new CallCounts();
  readonly reservations = new Map<string, Map<string, { bytes: number; until: number }>>();
  onWrite: (() => void) | undefined;

  async reserve(
    node: string,
    holder: string,
    bytes: number,
    until: number,
    now: number,
    limit: number,
  ): Promise<number> {
    this.calls.count('reserve', 'write');
    let held = this.reservations.get(node);
    if (held === undefined) {
      held = new Map();
      this.reservations.set(node, held);
    }
    let others = 0;
    for (const [h, r] of held) if (h !== holder && r.until > now) others += r.bytes;
    const granted = Math.max(0, Math.min(bytes, limit - others));
    held.set(holder, { bytes: granted, until });
    this.onWrite?.();
    return granted;
  }

  async release(node: string, holder: string): Promise<void> {
    this.calls.count('release', 'write');
    this.reservations.get(node)?.delete(holder);
    this.onWrite?.();
  }

  /** Live reservations of a node at `now`, by holder. */
  live(node: string, now: number): Map<string, number> {
    const out = new Map<string, number>();
    for (const [h, r] of this.reservations.get(node) ?? []) if (r.until > now) out.set(h, r.bytes);
    return out;
  }
}

// ---- CycleCatalog ----------------------------------------------------------------------------------

/** The recovery catalog: rejects an existing job, a job not in `from`, an existing checkpoint. */
export class MemoryCatalog implements CycleCatalog {
  readonly calls = new CallCounts();
  readonly sets = new Map<string, ReplicationSetRecord>();
  readonly disks = new Map<string, CatalogDiskRecord>();
  readonly jobs = new Map<string, JobRecord>();
  readonly checkpoints: RecoveryCheckpoint[] = [];

  async getSet(set: string): Promise<ReplicationSetRecord | undefined> {
    this.calls.count('getSet', 'read');
    return clone(this.sets.get(set));
  }
  async putSet(record: ReplicationSetRecord): Promise<void> {
    this.calls.count('putSet', 'write');
    this.sets.set(record.set, clone(record));
  }
  async putDisk(record: CatalogDiskRecord): Promise<void> {
    this.calls.count('putDisk', 'write');
    this.disks.set(keyOf(record.set, record.disk), clone(record));
  }
  async createJob(record: JobRecord): Promise<void> {
    this.calls.count('createJob', 'write');
    const k = keyOf(record.set, record.cycleId);
    if (this.jobs.has(k)) throw new Error(`job ${record.cycleId} of set ${record.set} already exists`);
    this.jobs.set(k, clone(record));
  }
  async getJob(set: string, cycleId: string): Promise<JobRecord | undefined> {
    this.calls.count('getJob', 'read');
    return clone(this.jobs.get(keyOf(set, cycleId)));
  }
  async updateJobStatus(
    set: string,
    cycleId: string,
    from: JobStatus,
    to: JobStatus,
    updatedAt: string,
    extra: { checkpointId?: string; error?: string } = {},
  ): Promise<JobRecord> {
    this.calls.count('updateJobStatus', 'write');
    const k = keyOf(set, cycleId);
    const job = this.jobs.get(k);
    if (job?.status !== from)
      throw new Error(`job ${cycleId} of set ${set} is not ${from}: concurrent modification`);
    const next = { ...job, ...definedOnly(extra), status: to, updatedAt };
    this.jobs.set(k, next);
    return clone(next);
  }
  async latestCheckpoint(set: string): Promise<RecoveryCheckpoint | undefined> {
    this.calls.count('latestCheckpoint', 'read');
    return clone(
      this.checkpoints
        .filter((c) => c.set === set)
        .sort((a, b) => a.sequence - b.sequence)
        .at(-1),
    );
  }
  async listCheckpoints(set?: string): Promise<RecoveryCheckpoint[]> {
    this.calls.count('listCheckpoints', 'read');
    return clone(this.checkpoints.filter((c) => set === undefined || c.set === set));
  }
  async publishCheckpoint(checkpoint: RecoveryCheckpoint): Promise<void> {
    this.calls.count('publishCheckpoint', 'write');
    if (
      this.checkpoints.some(
        (c) => c.id === checkpoint.id || (c.set === checkpoint.set && c.sequence === checkpoint.sequence),
      )
    ) {
      throw new Error(`checkpoint ${checkpoint.id} is already published`);
    }
    this.checkpoints.push(clone(checkpoint));
  }
}

// ---- GrantChannel: an in-memory queue with at-least-once delivery ----------------------------------

interface QueuedMessage {
  readonly messageId: string;
  readonly body: string;
  receipt: string | undefined;
  visibleAt: number;
  receives: number;
}

export interface QueueOptions {
  /** How long a received message stays invisible (SQS visibility timeout). */
  readonly visibilityMs?: number;
  /** Receives after which a message moves to the DLQ instead (SQS maxReceiveCount). */
  readonly maxReceives?: number;
  /** Chance that a sent grant is enqueued twice (at-least-once delivery), from `random`. */
  readonly duplicateRate?: number;
  readonly random?: () => number;
}

/**
 * The grant queue. `send` enqueues (possibly twice, `duplicateRate`); the test driver `receive`s
 * batches and `settle`s them as the SQS event source mapping does with a partial batch response:
 * acknowledged messages are deleted, failed ones come back after the visibility timeout.
 */
export class MemoryGrantQueue implements GrantChannel {
  readonly messages: QueuedMessage[] = [];
  readonly dlq: QueuedMessage[] = [];
  sent = 0;
  /** Grants the next `send` calls report unsent, one per grant, until it is 0. */
  failNextSends = 0;
  private ids = 0;
  private receipts = 0;

  constructor(
    private readonly clock: Clock,
    private readonly opts: QueueOptions = {},
  ) {}

  async send(grants: readonly Grant[]): Promise<{ unsent: Grant[] }> {
    const unsent: Grant[] = [];
    for (const g of grants) {
      if (this.failNextSends > 0) {
        this.failNextSends--;
        unsent.push(g);
        continue;
      }
      this.enqueue(JSON.stringify(g));
      if (
        this.opts.duplicateRate !== undefined &&
        (this.opts.random ?? Math.random)() < this.opts.duplicateRate
      ) {
        this.enqueue(JSON.stringify(g));
      }
      this.sent++;
    }
    return { unsent };
  }

  decode(body: string): Grant {
    const g = JSON.parse(body) as Grant;
    const d = g?.descriptor;
    if (
      typeof g?.set !== 'string' ||
      typeof g.cycleId !== 'string' ||
      typeof g.disk !== 'string' ||
      !Number.isSafeInteger(g.attempt) ||
      !Number.isSafeInteger(d?.seq) ||
      !Array.isArray(d?.extents)
    ) {
      throw new Error('not a grant');
    }
    return g;
  }

  async handBack(receiptHandle: string): Promise<void> {
    const m = this.messages.find((x) => x.receipt === receiptHandle);
    if (m !== undefined) m.visibleAt = this.clock.now();
  }

  /** Puts a raw body on the queue (a malformed message, for tests). */
  enqueue(body: string): void {
    this.messages.push({ messageId: `m${++this.ids}`, body, receipt: undefined, visibleAt: 0, receives: 0 });
  }

  /** Up to `max` visible messages, oldest first; each becomes invisible for the visibility timeout. */
  receive(max: number): GrantRecord[] {
    const now = this.clock.now();
    const out: GrantRecord[] = [];
    for (const m of [...this.messages]) {
      if (out.length >= max) break;
      if (m.visibleAt > now) continue;
      if (m.receives >= (this.opts.maxReceives ?? Number.POSITIVE_INFINITY)) {
        this.messages.splice(this.messages.indexOf(m), 1);
        this.dlq.push(m);
        continue;
      }
      m.receives++;
      m.receipt = `r${++this.receipts}`;
      m.visibleAt = now + (this.opts.visibilityMs ?? 30_000);
      out.push({ messageId: m.messageId, receiptHandle: m.receipt, body: m.body });
    }
    return out;
  }

  /** A partial batch response: everything not listed is deleted (if this receipt is still current). */
  settle(batch: readonly GrantRecord[], failures: readonly { itemIdentifier: string }[]): void {
    const failed = new Set(failures.map((f) => f.itemIdentifier));
    for (const r of batch) {
      if (failed.has(r.messageId)) continue;
      const i = this.messages.findIndex((m) => m.messageId === r.messageId && m.receipt === r.receiptHandle);
      if (i >= 0) this.messages.splice(i, 1);
    }
  }

  /** Messages waiting or in flight. */
  get depth(): number {
    return this.messages.length;
  }

  /** When the next invisible message becomes visible, if any. */
  nextVisibleAt(): number | undefined {
    const at = this.messages.map((m) => m.visibleAt).filter((v) => v > this.clock.now());
    return at.length === 0 ? undefined : Math.min(...at);
  }

  hasVisible(): boolean {
    const now = this.clock.now();
    return this.messages.some((m) => m.visibleAt <= now);
  }
}

// ---- EBS: source and target snapshots --------------------------------------------------------------

const b64sha = (data: Uint8Array): string => createHash('sha256').update(data).digest('base64');
const isZero = (data: Uint8Array): boolean => data.every((b) => b === 0);

interface SourceSnapshot {
  readonly id: string;
  readonly volumeSizeGiB: number;
  /** Block index -> data (512 KiB); a block absent reads as zeros. */
  readonly blocks: ReadonlyMap<number, Uint8Array>;
}

interface TargetSnapshot {
  readonly id: string;
  readonly disk: string;
  readonly volumeSizeGiB: number;
  readonly parent: string | undefined;
  readonly encrypted: boolean;
  readonly clientToken: string;
  readonly tags: Readonly<Record<string, string>>;
  /** Blocks written to this snapshot (index -> data). */
  readonly written: Map<number, Uint8Array>;
  status: SnapshotStatus;
  completedWith?: { changedBlocksCount: number; aggregateChecksum: string };
}

/** What a putBlocks call goes through, chosen per call by the test. */
export interface WriteFault {
  /** Retries the adapter's retry layer went through before this call succeeded (throttled ones). */
  readonly throttledRetries?: number;
  /** The call fails: retryable (the writer leaves the grant to the queue) or not (the cycle fails). */
  readonly fail?: { readonly retryable: boolean; readonly throttled?: boolean } | undefined;
}

export interface SnapshotsOptions {
  /** Blocks per List page (small pages exercise the differ's paging and resume). */
  readonly listPageBlocks?: number;
  /** Virtual latency of each putBlocks call, ms of the clock. */
  readonly writeLatencyMs?: number;
  /** New target snapshots are encrypted (zero blocks then always written). */
  readonly encrypted?: boolean;
}

/**
 * EBS in memory: source snapshots made by the test, target snapshots made by StartSnapshot (with
 * their parent's blocks underneath), the block reader and writer and the two List calls. Checks what
 * EBS checks at CompleteSnapshot (the changed-block count and the LINEAR aggregate over the blocks
 * written) and ends the snapshot in `error` when they do not match.
 */
export class MemorySnapshots implements ChangeLister, SnapshotWriter {
  readonly sources = new Map<string, SourceSnapshot>();
  readonly targets = new Map<string, TargetSnapshot>();
  readonly reads = { count: 0 };
  puts = 0;
  /** Decides each putBlocks call's fate (default: clean). */
  writeFault: ((req: { disk: string; seq: number | undefined; indexes: number[] }) => WriteFault) | undefined;
  /** Calls of waitForCompletion that answer `pending` before `completed`. */
  pendingWaits = 0;
  private ids = 0;

  constructor(
    private readonly clock: Clock,
    private readonly opts: SnapshotsOptions = {},
  ) {}

  /** A source snapshot holding `blocks` (index -> data, each EBS_BLOCK_SIZE long). */
  source(blocks: ReadonlyMap<number, Uint8Array>, volumeSizeGiB = 1): string {
    const id = `snap-${(++this.ids).toString(16).padStart(8, '0')}`;
    for (const [index, data] of blocks) {
      if (data.length !== EBS_BLOCK_SIZE) throw new Error(`block ${index} is ${data.length} bytes`);
    }
    this.sources.set(id, { id, volumeSizeGiB, blocks: new Map(blocks) });
    return id;
  }

  // ChangeLister
  async *listBlocks(req: {
    disk: string;
    snapshotId: string;
    previousSnapshotId: string | undefined;
    startingBlockIndex: number;
    signal?: AbortSignal | undefined;
  }): AsyncIterable<ChangePage> {
    const snap = this.requireSource(req.snapshotId);
    let indexes: number[];
    if (req.previousSnapshotId === undefined) {
      indexes = [...snap.blocks.keys()];
    } else {
      const prev = this.requireSource(req.previousSnapshotId);
      const all = new Set([...snap.blocks.keys(), ...prev.blocks.keys()]);
      indexes = [...all].filter((i) => {
        const a = snap.blocks.get(i);
        const b = prev.blocks.get(i);
        return a === undefined || b === undefined || Buffer.compare(a, b) !== 0;
      });
    }
    indexes = indexes.filter((i) => i >= req.startingBlockIndex).sort((a, b) => a - b);
    const size = this.opts.listPageBlocks ?? 100;
    for (let at = 0; at < indexes.length || at === 0; at += size) {
      if (req.signal?.aborted) return;
      const page = indexes.slice(at, at + size);
      yield {
        volumeSizeGiB: snap.volumeSizeGiB,
        blocks: page.map((index) => ({
          index,
          token: snap.blocks.has(index) ? `${snap.id}#${index}` : undefined,
        })),
      };
      if (indexes.length === 0) return;
    }
  }

  // BlockReader
  async readBlock(req: {
    disk: string;
    snapshotId: string;
    index: number;
    token: string;
  }): Promise<ReadBlock> {
    this.reads.count++;
    const snap = this.requireSource(req.snapshotId);
    if (req.token !== `${snap.id}#${req.index}`) {
      throw new TransferError(`token ${req.token} does not name block ${req.index} of ${snap.id}`, {
        retryable: false,
        disk: req.disk,
      });
    }
    const data = snap.blocks.get(req.index) ?? new Uint8Array(EBS_BLOCK_SIZE);
    return { data: new Uint8Array(data), checksum: b64sha(data) };
  }

  // SnapshotWriter
  async startSnapshot(req: {
    disk: string;
    volumeSizeGiB: number;
    parentSnapshotId: string | undefined;
    clientToken: string;
    tags?: Readonly<Record<string, string>> | undefined;
  }): Promise<{ snapshotId: string; encrypted: boolean }> {
    const existing = [...this.targets.values()].find((t) => t.clientToken === req.clientToken);
    if (existing !== undefined) return { snapshotId: existing.id, encrypted: existing.encrypted };
    if (req.parentSnapshotId !== undefined) this.requireTarget(req.parentSnapshotId);
    const id = `snap-${(++this.ids).toString(16).padStart(8, '0')}`;
    const encrypted = this.opts.encrypted ?? false;
    this.targets.set(id, {
      id,
      disk: req.disk,
      volumeSizeGiB: req.volumeSizeGiB,
      parent: req.parentSnapshotId,
      encrypted,
      clientToken: req.clientToken,
      tags: { ...req.tags },
      written: new Map(),
      status: 'pending',
    });
    return { snapshotId: id, encrypted };
  }

  async putBlocks(req: {
    disk: string;
    snapshotId: string;
    blocks: readonly TargetBlock[];
    skipZeroBlocks: boolean;
    seq?: number | undefined;
    onRetry?: ((info: { throttled: boolean }) => void) | undefined;
    signal?: AbortSignal | undefined;
  }): Promise<WrittenBlock[]> {
    this.puts++;
    const t = this.requireTarget(req.snapshotId);
    if (t.status !== 'pending') {
      throw new TransferError(`snapshot ${t.id} is ${t.status}: no more blocks`, {
        retryable: false,
        disk: req.disk,
      });
    }
    const fault =
      this.writeFault?.({ disk: req.disk, seq: req.seq, indexes: req.blocks.map((b) => b.index) }) ?? {};
    for (let i = 0; i < (fault.throttledRetries ?? 0); i++) req.onRetry?.({ throttled: true });
    if (this.opts.writeLatencyMs !== undefined) await this.clock.sleep(this.opts.writeLatencyMs, req.signal);
    if (fault.fail !== undefined) {
      throw new TransferError(`PutSnapshotBlock failed for disk ${req.disk} seq ${req.seq}`, {
        retryable: fault.fail.retryable,
        throttled: fault.fail.throttled ?? false,
        disk: req.disk,
        seq: req.seq,
      });
    }
    const out: WrittenBlock[] = [];
    for (const b of [...req.blocks].sort((x, y) => x.index - y.index)) {
      if (b.data.length !== EBS_BLOCK_SIZE) throw new Error(`block ${b.index} is ${b.data.length} bytes`);
      if (req.skipZeroBlocks && isZero(b.data)) continue;
      t.written.set(b.index, new Uint8Array(b.data));
      out.push({ index: b.index, checksum: b64sha(b.data) });
    }
    return out;
  }

  async completeSnapshot(req: {
    disk: string;
    snapshotId: string;
    changedBlocksCount: number;
    aggregateChecksum: string;
  }): Promise<void> {
    const t = this.requireTarget(req.snapshotId);
    if (t.completedWith !== undefined) return;
    t.completedWith = {
      changedBlocksCount: req.changedBlocksCount,
      aggregateChecksum: req.aggregateChecksum,
    };
    const hash = createHash('sha256');
    for (const index of [...t.written.keys()].sort((a, b) => a - b)) {
      hash.update(createHash('sha256').update(t.written.get(index)!).digest());
    }
    const ok = req.changedBlocksCount === t.written.size && hash.digest('base64') === req.aggregateChecksum;
    t.status = ok ? 'completed' : 'error';
  }

  async waitForCompletion(req: {
    disk: string;
    snapshotId: string;
    signal: AbortSignal;
  }): Promise<SnapshotStatus> {
    const t = this.requireTarget(req.snapshotId);
    if (t.status === 'pending' || this.pendingWaits <= 0) return t.status;
    this.pendingWaits--;
    return 'pending';
  }

  /** What a volume restored from the target snapshot reads: its blocks over its parent's. */
  image(snapshotId: string): Map<number, Uint8Array> {
    const t = this.requireTarget(snapshotId);
    const base = t.parent === undefined ? new Map<number, Uint8Array>() : this.image(t.parent);
    for (const [i, data] of t.written) base.set(i, data);
    return base;
  }

  target(snapshotId: string): TargetSnapshot {
    return this.requireTarget(snapshotId);
  }

  private requireSource(id: string): SourceSnapshot {
    const s = this.sources.get(id);
    if (s === undefined) throw new TransferError(`no source snapshot ${id}`, { retryable: false });
    return s;
  }

  private requireTarget(id: string): TargetSnapshot {
    const t = this.targets.get(id);
    if (t === undefined) throw new TransferError(`no target snapshot ${id}`, { retryable: false });
    return t;
  }
}

/** Whether two block maps read the same (absent blocks read as zeros). */
export function sameImage(
  a: ReadonlyMap<number, Uint8Array>,
  b: ReadonlyMap<number, Uint8Array>,
): string | undefined {
  const zero = new Uint8Array(EBS_BLOCK_SIZE);
  for (const i of new Set([...a.keys(), ...b.keys()])) {
    const x = a.get(i) ?? zero;
    const y = b.get(i) ?? zero;
    if (Buffer.compare(x, y) !== 0) return `block ${i} differs`;
  }
  return undefined;
}

// ---- events ----------------------------------------------------------------------------------------

export class MemoryEvents implements EventPublisher {
  readonly events: { source: string; detailType: string; detail: Record<string, unknown> }[] = [];
  async publish(event: {
    source: string;
    detailType: string;
    detail: Record<string, unknown>;
  }): Promise<void> {
    this.events.push(structuredClone(event));
  }
}
