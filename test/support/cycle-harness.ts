// Runs the serverless cycle's logic on the memory fakes as the state machine and the queue's event
// source mapping would: prepare, the differ per disk until done, then ticks with writer batches in
// between (several batches at once, at-least-once delivery), then finalize, or abort on failure. A
// virtual clock, a seeded random, a budget monitor checked after every flow and budget write, and
// writers that can be killed at a chosen point (every later call of theirs hangs, nothing they did
// is acknowledged).
import { DescriptorCache } from '../../shared/engine/cycle/descriptor-cache.ts';
import { runDiffer } from '../../shared/engine/cycle/differ.ts';
import { abort, finalize } from '../../shared/engine/cycle/finalize.ts';
import { inflightOf } from '../../shared/engine/cycle/grant-plan.ts';
import { EBS_BLOCK_SIZE, type Log, type Meter } from '../../shared/engine/cycle/ports.ts';
import { prepare } from '../../shared/engine/cycle/prepare.ts';
import { tick } from '../../shared/engine/cycle/tick.ts';
import type { CycleInput, CycleRef, FinalizeResult, TickResult } from '../../shared/engine/cycle/types.ts';
import { type BatchResult, WriterCache, writeBatch } from '../../shared/engine/cycle/writer.ts';
import { seededRandom } from '../../shared/engine/random.ts';
import { VirtualClock } from '../../shared/runtime/virtual-clock.ts';
import {
  MemoryCatalog,
  MemoryCycleLedger,
  MemoryEvents,
  MemoryGrantFlow,
  MemoryGrantQueue,
  MemoryNodeBudget,
  MemoryPlanLocks,
  MemorySnapshots,
  type QueueOptions,
  type SnapshotsOptions,
} from './cycle-fakes.ts';

export const BLOCK = EBS_BLOCK_SIZE;
export const MiB = 1024 * 1024;
export const NODE = 'node-1';
// A fixed epoch (2026-01-01), so records carry plausible dates.
export const EPOCH = Date.UTC(2026, 0, 1);

/** A block whose bytes say which block and which version it is. */
export function blockOf(tag: number): Uint8Array {
  const b = new Uint8Array(BLOCK);
  const view = new DataView(b.buffer);
  for (let at = 0; at < BLOCK; at += 4096) view.setUint32(at, (tag * 2654435761) >>> 0);
  view.setUint32(8, tag);
  return b;
}

/** A log that keeps what it is told, for assertions. */
export class MemoryLog implements Log {
  readonly lines: { level: string; message: string; extra?: Record<string, unknown> }[] = [];
  debug(message: string, extra?: Record<string, unknown>): void {
    this.lines.push({ level: 'debug', message, ...(extra ? { extra } : {}) });
  }
  info(message: string, extra?: Record<string, unknown>): void {
    this.lines.push({ level: 'info', message, ...(extra ? { extra } : {}) });
  }
  warn(message: string, extra?: Record<string, unknown>): void {
    this.lines.push({ level: 'warn', message, ...(extra ? { extra } : {}) });
  }
  error(message: string, extra?: Record<string, unknown>): void {
    this.lines.push({ level: 'error', message, ...(extra ? { extra } : {}) });
  }
}

export interface WorldOptions {
  readonly seed?: number;
  readonly nodeBudget?: number;
  readonly leaseMs?: number;
  readonly queue?: QueueOptions;
  readonly snapshots?: SnapshotsOptions;
  readonly maxDescriptorsPerPage?: number;
  readonly maxGrantsPerTick?: number;
  readonly stuckTicks?: number;
  readonly concurrency?: number;
  /** The largest descriptor of the test's cycles (the span check allows one into an empty span). */
  readonly maxChunk?: number;
}

/** Everything a cycle runs on, shared by the cycles of a test (one node). */
export class World {
  readonly clock = new VirtualClock(EPOCH);
  readonly random: () => number;
  readonly ledger = new MemoryCycleLedger();
  readonly flow = new MemoryGrantFlow();
  readonly locks = new MemoryPlanLocks();
  readonly budget = new MemoryNodeBudget();
  readonly catalog = new MemoryCatalog();
  readonly events = new MemoryEvents();
  readonly log = new MemoryLog();
  /** Every metric the steps added, summed by name (the handlers emit the same names). */
  readonly metrics = new Map<string, number>();
  readonly meter: Meter = {
    add: (name, _unit, value) => {
      this.metrics.set(name, (this.metrics.get(name) ?? 0) + value);
    },
  };
  readonly queue: MemoryGrantQueue;
  readonly ebs: MemorySnapshots;
  readonly nodeBudget: number;
  readonly leaseMs: number;
  /** The planner's container: descriptor pages cached across ticks. */
  readonly plannerPages: DescriptorCache;
  /** Budget invariant violations seen after any write (a test asserts there are none). */
  readonly violations: string[] = [];
  /** Highest in-flight bytes seen across open flows. */
  peakInflight = 0;

  constructor(readonly opts: WorldOptions = {}) {
    this.random = seededRandom(opts.seed ?? 1);
    this.nodeBudget = opts.nodeBudget ?? 256 * MiB;
    this.leaseMs = opts.leaseMs ?? 300_000;
    this.queue = new MemoryGrantQueue(this.clock, { random: this.random, ...opts.queue });
    this.ebs = new MemorySnapshots(this.clock, opts.snapshots);
    this.plannerPages = new DescriptorCache(this.ledger);
    this.flow.onWrite = (key) => {
      this.checkGrants(key);
      this.check();
    };
    this.budget.onWrite = () => this.check();
  }

  private readonly granted = new Map<string, number>();

  /**
   * A write that granted (moved the cursor) kept the disk inside its window and its allowance: the
   * span at most the window (or one chunk into an empty span), in flight at most the allowance in
   * force. A write that only counted or set controls is not held to it (a window may shrink below
   * what is in flight; then nothing is granted until it drains).
   */
  private checkGrants(key: { set: string; disk: string; cycleId: string }): void {
    const state = this.flow.peek(key);
    if (state === undefined) return;
    const id = `${key.set}/${key.disk}/${key.cycleId}`;
    const before = this.granted.get(id) ?? 0;
    this.granted.set(id, state.grantedBytes);
    if (state.grantedBytes <= before) return;
    const span = state.grantedBytes - state.lowBytes;
    const chunk = this.opts.maxChunk ?? MiB;
    if (span > Math.max(state.window, chunk)) {
      this.violations.push(`disk ${key.disk}: granted to a span of ${span} past its window ${state.window}`);
    }
    const cap = this.clock.now() < state.allowanceUntil ? state.allowance : 0;
    if (inflightOf(state) > cap) {
      this.violations.push(
        `disk ${key.disk}: granted to ${inflightOf(state)} in flight past its allowance ${cap}`,
      );
    }
  }

  /**
   * The node budget holds at every step: live reservations sum to at most the budget; allowances in
   * force sum to at most the budget and, per cycle, to at most that cycle's reservation; the
   * in-flight bytes of a cycle's open flows are at most its live reservation. A cycle without one
   * (its planner died and the reservation expired) is not counted: its grants are the lost ones the
   * expiry gives back, and it can grant no more (its allowances lapsed with the reservation).
   */
  check(): void {
    const now = this.clock.now();
    const live = this.budget.live(NODE, now);
    const reserved = [...live.values()].reduce((a, b) => a + b, 0);
    if (reserved > this.nodeBudget)
      this.violations.push(`reservations ${reserved} > budget ${this.nodeBudget}`);
    let allowances = 0;
    let inflight = 0;
    const allowed = new Map<string, number>();
    const carried = new Map<string, number>();
    for (const { key, state } of this.flow.all()) {
      const inForce = now < state.allowanceUntil ? state.allowance : 0;
      allowances += inForce;
      const holder = `${key.set}/${key.cycleId}`;
      allowed.set(holder, (allowed.get(holder) ?? 0) + inForce);
      if (inflightOf(state) < 0) this.violations.push(`disk ${key.disk}: in flight ${inflightOf(state)} < 0`);
      if (state.low > state.next)
        this.violations.push(`disk ${key.disk}: low ${state.low} > next ${state.next}`);
      if (!state.open || !live.has(holder)) continue;
      inflight += inflightOf(state);
      carried.set(holder, (carried.get(holder) ?? 0) + inflightOf(state));
    }
    this.peakInflight = Math.max(this.peakInflight, inflight);
    if (allowances > this.nodeBudget)
      this.violations.push(`allowances ${allowances} > budget ${this.nodeBudget}`);
    if (inflight > this.nodeBudget) this.violations.push(`in flight ${inflight} > budget ${this.nodeBudget}`);
    for (const [holder, sum] of allowed) {
      if (sum > (live.get(holder) ?? 0)) {
        this.violations.push(`cycle ${holder}: allowances ${sum} > its reservation ${live.get(holder) ?? 0}`);
      }
    }
    for (const [holder, sum] of carried) {
      if (sum > (live.get(holder) ?? 0)) {
        this.violations.push(`cycle ${holder}: in flight ${sum} > its reservation ${live.get(holder) ?? 0}`);
      }
    }
  }

  prepareDeps() {
    return {
      ledger: this.ledger,
      flow: this.flow,
      locks: this.locks,
      catalog: this.catalog,
      writer: this.ebs,
      clock: this.clock,
      log: this.log,
      meter: this.meter,
      nodeBudget: this.nodeBudget,
      lockMs: 3_600_000,
      snapshotTimeoutMinutes: 1440,
      kmsKeyArn: undefined,
      snapshotTags: { 'ferry:stack': 'test' },
      maxDescriptorsPerPage: this.opts.maxDescriptorsPerPage,
    };
  }

  differDeps(remainingMs: () => number = () => 900_000) {
    return {
      ledger: this.ledger,
      lister: this.ebs,
      clock: this.clock,
      log: this.log,
      meter: this.meter,
      remainingMs,
      marginMs: 10_000,
    };
  }

  tickDeps() {
    return {
      ledger: this.ledger,
      flow: this.flow,
      locks: this.locks,
      budget: this.budget,
      channel: this.queue,
      pages: this.plannerPages,
      clock: this.clock,
      log: this.log,
      meter: this.meter,
      nodeId: NODE,
      nodeBudget: this.nodeBudget,
      lockMs: 3_600_000,
      leaseMs: this.leaseMs,
      stuckTicks: this.opts.stuckTicks ?? 60,
      maxGrantsPerTick: this.opts.maxGrantsPerTick ?? 2000,
    };
  }

  /** A writer container: its own caches, ports possibly wrapped by a crash. */
  writerDeps(cache: WriterCache, crash?: Crash) {
    const wrap = <T extends object>(port: T, name: string): T =>
      crash === undefined ? port : crash.wrap(port, name);
    return {
      ledger: wrap(this.ledger, 'ledger'),
      flow: wrap(this.flow, 'flow'),
      channel: wrap(this.queue, 'channel'),
      reader: wrap(this.ebs, 'reader'),
      writer: wrap(this.ebs, 'writer'),
      cache,
      clock: this.clock,
      random: this.random,
      log: this.log,
      meter: this.meter,
      concurrency: this.opts.concurrency ?? 4,
      marginMs: 10_000,
    };
  }

  finalizeDeps() {
    return {
      ledger: this.ledger,
      flow: this.flow,
      locks: this.locks,
      budget: this.budget,
      catalog: this.catalog,
      writer: this.ebs,
      events: this.events,
      clock: this.clock,
      log: this.log,
      meter: this.meter,
      nodeId: NODE,
      lockMs: 3_600_000,
      remainingMs: () => 900_000,
      marginMs: 10_000,
    };
  }

  /** A fresh writer container (cold caches), as a new Lambda instance has. */
  container(): WriterCache {
    return new WriterCache(this.ledger);
  }
}

// ---- crashes ---------------------------------------------------------------------------------------

const hang = <T>(): Promise<T> => new Promise<T>(() => undefined);

/**
 * A writer process that dies at a chosen point: `killAfter(port, method, nth)` kills it right after
 * the nth call of that method took effect (its reply never arrives). From then on every async call
 * through the wrapped ports hangs, so nothing the writer would do next happens, and the driver
 * abandons the batch without acknowledging anything.
 */
export class Crash {
  killed = false;
  private readonly seen = new Map<string, number>();
  private resolveKilled: () => void = () => undefined;
  readonly whenKilled = new Promise<void>((resolve) => {
    this.resolveKilled = resolve;
  });

  constructor(private readonly at?: { port: string; method: string; nth?: number }) {}

  kill(): void {
    if (this.killed) return;
    this.killed = true;
    this.resolveKilled();
  }

  wrap<T extends object>(port: T, name: string): T {
    return new Proxy(port, {
      get: (target, prop, receiver) => {
        const value = Reflect.get(target, prop, receiver) as unknown;
        if (typeof value !== 'function') return value;
        return (...args: unknown[]) => {
          if (this.killed) return hang();
          const out = (value as (...a: unknown[]) => unknown).apply(target, args);
          if (!(out instanceof Promise)) return out;
          return out.then((result) => {
            const id = `${name}.${String(prop)}`;
            const n = (this.seen.get(id) ?? 0) + 1;
            this.seen.set(id, n);
            if (
              this.at !== undefined &&
              `${this.at.port}.${this.at.method}` === id &&
              n === (this.at.nth ?? 1)
            ) {
              this.kill();
            }
            return this.killed ? hang() : result;
          });
        };
      },
    });
  }
}

// ---- the driver ------------------------------------------------------------------------------------

export interface DriveOptions {
  /** Grants per writer batch (SQS batch size). */
  readonly batchSize?: number;
  /** Writer batches run at once between ticks. */
  readonly parallel?: number;
  /** Virtual time between ticks (the state machine's wait). */
  readonly tickEveryMs?: number;
  readonly maxTicks?: number;
  /** Writers that die: asked once per batch, in order; a Crash (with a kill point) or undefined. */
  readonly crashes?: () => Crash | undefined;
  /** Called after each tick. */
  readonly afterTick?: (result: TickResult) => void;
  /** A fresh container per batch (cold caches) instead of one warm container. */
  readonly coldContainers?: boolean;
}

export interface DriveResult {
  readonly ref: CycleRef;
  readonly ticks: TickResult[];
  readonly finalized?: FinalizeResult | undefined;
  readonly aborted?: string | undefined;
  readonly batches: BatchResult[];
  readonly killed: number;
}

/** Diffs every disk of a prepared cycle to the end (resuming as the state machine's Map would). */
export async function diffAll(world: World, ref: CycleRef, remainingMs?: () => number): Promise<void> {
  for (const d of ref.disks) {
    for (let i = 0; i < 1000; i++) {
      const r = await runDiffer(world.differDeps(remainingMs), d);
      if (r.done) break;
    }
  }
}

/** Receives and writes batches until the next tick is due or the queue has nothing visible. */
export async function writeRound(
  world: World,
  opts: DriveOptions,
  warm: WriterCache,
): Promise<{ batches: BatchResult[]; killed: number }> {
  const batches: BatchResult[] = [];
  let killed = 0;
  // Writers run until the state machine's next tick is due (or nothing is left to receive).
  const until = world.clock.now() + (opts.tickEveryMs ?? 1000);
  for (let round = 0; round < 200 && world.queue.hasVisible() && world.clock.now() < until; round++) {
    const running: Promise<void>[] = [];
    for (let p = 0; p < (opts.parallel ?? 2); p++) {
      const records = world.queue.receive(opts.batchSize ?? 10);
      if (records.length === 0) break;
      const crash = opts.crashes?.();
      const cache = opts.coldContainers === true || crash !== undefined ? world.container() : warm;
      const deadlineAt = world.clock.now() + 900_000;
      const run = writeBatch(
        world.writerDeps(cache, crash),
        records,
        () => deadlineAt - world.clock.now(),
      ).then((r) => {
        batches.push(r);
        world.queue.settle(records, r.batchItemFailures);
      });
      // A killed writer never answers: nothing of its batch is acknowledged.
      running.push(
        crash === undefined ? run : Promise.race([run, crash.whenKilled.then(() => void killed++)]),
      );
    }
    await Promise.all(running);
  }
  return { batches, killed };
}

/** Runs a cycle from prepare to publication (or abort), as the state machine does. */
export async function driveCycle(
  world: World,
  input: CycleInput,
  opts: DriveOptions = {},
): Promise<DriveResult> {
  const ref = await prepare(world.prepareDeps(), input);
  await diffAll(world, ref);
  return driveFrom(world, ref, opts);
}

/** Ticks, writer rounds and finalize for a prepared and diffed cycle. */
export async function driveFrom(world: World, ref: CycleRef, opts: DriveOptions = {}): Promise<DriveResult> {
  return (await driveAll(world, [ref], opts))[0]!;
}

/**
 * Several prepared and diffed cycles at once on one node: each round ticks every cycle still
 * running (finalizing or aborting the ones that end), then writer batches drain the shared queue,
 * then virtual time moves on by `tickEveryMs`.
 */
export async function driveAll(
  world: World,
  refs: readonly CycleRef[],
  opts: DriveOptions = {},
): Promise<DriveResult[]> {
  const runs = refs.map((ref) => ({
    ref,
    ticks: [] as TickResult[],
    finalized: undefined as FinalizeResult | undefined,
    aborted: undefined as string | undefined,
    over: false,
  }));
  const batches: BatchResult[] = [];
  let killed = 0;
  const warm = world.container();
  for (let i = 0; i < (opts.maxTicks ?? 500); i++) {
    for (const run of runs) {
      if (run.over) continue;
      const t = await tick(world.tickDeps(), run.ref);
      run.ticks.push(t);
      opts.afterTick?.(t);
      if (t.status === 'done') {
        for (let w = 0; w < 20 && run.finalized?.status !== 'published'; w++) {
          run.finalized = await finalize(world.finalizeDeps(), run.ref);
          if (run.finalized.status !== 'published') await world.clock.sleep(30_000);
        }
        if (run.finalized?.status !== 'published') throw new Error('finalize never published');
        run.over = true;
      } else if (t.status === 'failed' || t.status === 'stuck') {
        run.aborted = t.reason ?? t.status;
        await abort(world.finalizeDeps(), run.ref, run.aborted);
        run.over = true;
      }
    }
    if (runs.every((r) => r.over)) {
      return runs.map((r) => ({
        ref: r.ref,
        ticks: r.ticks,
        finalized: r.finalized,
        aborted: r.aborted,
        batches,
        killed,
      }));
    }
    const next = world.clock.now() + (opts.tickEveryMs ?? 1000);
    const r = await writeRound(world, opts, warm);
    batches.push(...r.batches);
    killed += r.killed;
    await world.clock.sleep(Math.max(0, next - world.clock.now()));
  }
  throw new Error(`cycles did not finish in ${opts.maxTicks ?? 500} ticks`);
}

/** A disk's blocks for a cycle input: the source snapshot's id. */
export function input(
  world: World,
  cycleId: string,
  disks: Record<string, ReadonlyMap<number, Uint8Array>>,
  params: CycleInput['params'] = {
    chunkSize: '1 MiB',
    window: '4 MiB',
    windowLevels: ['2 MiB', '4 MiB', '8 MiB'],
  },
  names: { plan?: string; set?: string } = {},
): CycleInput {
  return {
    plan: names.plan ?? 'plan-a',
    set: names.set ?? 'set-a',
    cycleId,
    disks: Object.entries(disks).map(([disk, blocks]) => ({
      disk,
      sourceSnapshotId: world.ebs.source(blocks),
      volumeSizeGiB: 1,
    })),
    params,
  };
}
