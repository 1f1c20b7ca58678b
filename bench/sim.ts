// Discrete-event simulation of the real engine (replicate()) under a virtual clock, for what one
// machine cannot hold: 100 and 1,000 disks over a 10 Gbit/s, 100 ms link into a target modelled on
// the EBS direct APIs. See bench/README.md.
//
//   node --import tsx bench/sim.ts    100 and 1,000 disks, plus the account-quota stress scenarios
//   node --import tsx bench/sim.ts --help
//
// What is real: the engine (planning, descriptors, scheduler with its node budget, rolling windows,
// adaptive controller, retry with backoff, SHA-256 of every chunk, progress and checkpoint) and, in
// the "paced" scenario, the EBS adapter's client-side rate limiter. What is modelled: the link, the
// EBS service (quotas, latency, throttling) and the source's bytes.
import { randomBytes } from 'node:crypto';
import { mkdir, writeFile } from 'node:fs/promises';
import os from 'node:os';
import { join, resolve } from 'node:path';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import { EbsRateLimiter } from '../shared/aws/ebs/limiter.ts';
import { resolveParams } from '../shared/engine/config.ts';
import type { Descriptor } from '../shared/engine/descriptors.ts';
import { errorMessage, TransferError } from '../shared/engine/errors.ts';
import type { Extent } from '../shared/engine/extents.ts';
import { MemoryStateStore } from '../shared/engine/memory-state-store.ts';
import type { CopyKind, DiskCommit, DiskSource, DiskTarget } from '../shared/engine/ports.ts';
import { seededRandom } from '../shared/engine/random.ts';
import { type DiskJob, type ReplicationEvent, replicate } from '../shared/engine/replicate.ts';
import { type Grant, Scheduler } from '../shared/engine/scheduler.ts';
import { GiB, KiB, MiB } from '../shared/engine/units.ts';
import { VirtualClock } from '../shared/runtime/virtual-clock.ts';
import { lineChart } from './lib/svg.ts';

const ROOT = resolve(import.meta.dirname, '..');

// ---- The model's constants (the README states them) ----

/** EBS snapshot block: every PutSnapshotBlock carries one. */
const EBS_BLOCK = 512 * KiB;
/** PutSnapshotBlock per snapshot per second (the published quota). */
const PER_SNAPSHOT_RPS = 1000;
/**
 * The service's token buckets hold this many seconds of their rate: a quota "per second" tolerates
 * a short burst, not a whole second's worth at once. AWS does not publish the burst; 0.2 s is the
 * harsher assumption than the adapter's own limiter, which paces with 0.1 s of burst.
 */
const BURST_SECONDS = 0.2;
/** A throttled call fails fast: the service answers without writing. */
const THROTTLE_RESPONSE_MS = 10;
/** Framing per chunk on the link (headers, digest, extents): small next to 512 KiB of data. */
const CHUNK_OVERHEAD_BYTES = 128;
/** How often the timeline (and the chart) is sampled: the engine's own progress tick. */
const TICK_MS = 250;

interface Scenario {
  readonly name: string;
  readonly disks: number;
  readonly linkGbit: number;
  readonly rttMs: number;
  /** PutSnapshotBlock per second per account (all snapshots together). */
  readonly accountRps: number;
  readonly writeMs: number;
  /** PutSnapshotBlock latency varies uniformly by ± this share of writeMs. */
  readonly writeJitter: number;
  readonly budgetMiB: number;
  /** Bytes to move over all disks together. */
  readonly totalGiB: number;
  /** Share of disks with a fragmented change map (random 512 KiB blocks) instead of a sequential one. */
  readonly fragmentedShare: number;
  /**
   * The target paces its PutSnapshotBlock calls with the EBS adapter's own limiter
   * (shared/aws/ebs/limiter.ts), set to the model's quotas, as the real EBS target does.
   */
  readonly paced: boolean;
  readonly seed: number;
}

const HELP = `usage: node --import tsx bench/sim.ts [flags]

  --disks LIST           disk counts, one scenario each (default 100,1000)
  --link-gbit N          link rate (default 10)
  --rtt-ms N             link round trip (default 100)
  --account-rps N        PutSnapshotBlock per second per account (default 5000)
  --write-ms N           PutSnapshotBlock latency (default 100, ±20% uniform)
  --budget-mib N         node in-flight budget (default 512)
  --total-gib N          bytes to move per scenario, all disks together (default 48)
  --stress-rps N         extra scenarios: 1,000 disks with this account quota, below the link, once
                         with the engine alone and once paced by the EBS adapter's limiter
                         (default 2000; 0: off)
  --out DIR              results directory (default bench/results)
  --help`;

// ---- Model: link, EBS quotas, source, target ----

/** A token bucket in virtual time, as the service keeps it. */
class Bucket {
  private tokens: number;
  private at = 0;
  constructor(
    private readonly rate: number,
    private readonly capacity: number,
  ) {
    this.tokens = capacity;
  }
  /** Whether a call now would be admitted; spends nothing. */
  has(now: number): boolean {
    this.tokens = Math.min(this.capacity, this.tokens + ((now - this.at) / 1000) * this.rate);
    this.at = now;
    return this.tokens >= 1;
  }
  spend(): void {
    this.tokens -= 1;
  }
}

/** The world the engine replicates into: one shared link and one EBS account. */
class World {
  linkFreeAt = 0;
  linkBusyMs = 0;
  linkBytes = 0;
  putRequests = 0;
  putThrottled = 0;
  /** Payload bytes of chunks the target acknowledged. */
  delivered = 0;
  /** Bytes inside writeChunk (crossing, queued at the limiter, being written, acknowledging). */
  targetInflight = 0;
  peakTargetInflight = 0;
  /** Per disk: completion times and cumulative bytes, for per-disk throughput over any interval. */
  readonly completions = new Map<string, { t: number[]; bytes: number[] }>();
  readonly account: Bucket;
  /** The EBS adapter's client-side limiter, when the scenario is paced. */
  readonly limiter: EbsRateLimiter | undefined;
  private readonly random: () => number;

  constructor(
    readonly clock: VirtualClock,
    readonly s: Scenario,
  ) {
    this.account = new Bucket(s.accountRps, s.accountRps * BURST_SECONDS);
    this.random = seededRandom(s.seed);
    this.limiter = s.paced
      ? new EbsRateLimiter(clock, {
          putSnapshotBlockPerSnapshot: PER_SNAPSHOT_RPS,
          putSnapshotBlockPerAccount: s.accountRps,
        })
      : undefined;
  }

  /** Serialises `bytes` on the link (FIFO, shared) and waits until they arrive at the far end. */
  async cross(bytes: number): Promise<void> {
    const now = this.clock.now();
    const start = Math.max(now, this.linkFreeAt);
    const ms = (bytes * 8) / (this.s.linkGbit * 1e6);
    this.linkFreeAt = start + ms;
    this.linkBusyMs += ms;
    this.linkBytes += bytes;
    await this.clock.sleep(this.linkFreeAt + this.s.rttMs / 2 - now);
  }

  /** One PutSnapshotBlock: throttled at once beyond a quota, else written after the service time. */
  async put(snapshot: Bucket): Promise<boolean> {
    this.putRequests++;
    const now = this.clock.now();
    // Both quotas must admit the call; a refused call spends no token of either.
    const ok = snapshot.has(now) && this.account.has(now);
    if (!ok) {
      this.putThrottled++;
      await this.clock.sleep(THROTTLE_RESPONSE_MS);
      return false;
    }
    snapshot.spend();
    this.account.spend();
    const jitter = 1 + (this.random() * 2 - 1) * this.s.writeJitter;
    await this.clock.sleep(this.s.writeMs * jitter);
    return true;
  }

  completed(disk: string, bytes: number): void {
    let c = this.completions.get(disk);
    if (!c) {
      c = { t: [], bytes: [] };
      this.completions.set(disk, c);
    }
    c.t.push(this.clock.now());
    c.bytes.push((c.bytes.at(-1) ?? 0) + bytes);
    this.delivered += bytes;
  }

  /** Bytes and chunks of `disk` completed at or before `t`. */
  doneAt(disk: string, t: number): { bytes: number; chunks: number } {
    const c = this.completions.get(disk);
    if (!c) return { bytes: 0, chunks: 0 };
    let lo = 0;
    let hi = c.t.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (c.t[mid]! <= t) lo = mid + 1;
      else hi = mid;
    }
    return { bytes: lo === 0 ? 0 : c.bytes[lo - 1]!, chunks: lo };
  }
}

/** A source whose every read returns the same random bytes: hashing is real, storage is not. */
class SimSource implements DiskSource {
  constructor(
    readonly name: string,
    readonly sizeBytes: number,
    private readonly pool: Uint8Array,
  ) {}
  async read(_offset: number, length: number): Promise<Uint8Array> {
    if (length <= this.pool.length) return this.pool.subarray(0, length);
    const out = new Uint8Array(length);
    for (let at = 0; at < length; at += this.pool.length)
      out.set(this.pool.subarray(0, Math.min(this.pool.length, length - at)), at);
    return out;
  }
  async close(): Promise<void> {}
}

/**
 * The far side of the link: a chunk crosses the link, becomes one PutSnapshotBlock per 512 KiB block
 * (in parallel), and its acknowledgement crosses back. Any throttled block fails the chunk with a
 * throttling TransferError, as the EBS target reports it; the engine retries the chunk, which crosses
 * the link again, and only its blocks not yet written are put again (the EBS target's block ledger).
 */
class SimTarget implements DiskTarget {
  readonly blockSize = EBS_BLOCK;
  private readonly snapshot = new Bucket(PER_SNAPSHOT_RPS, PER_SNAPSHOT_RPS * BURST_SECONDS);
  private readonly written = new Set<number>();
  constructor(
    readonly name: string,
    private readonly world: World,
  ) {}
  async open(_size: number, _kind: CopyKind, _resume: boolean): Promise<void> {}
  async writeChunk(d: Descriptor, _data: Uint8Array, _sha256: string, signal?: AbortSignal): Promise<void> {
    const w = this.world;
    w.targetInflight += d.bytes;
    w.peakTargetInflight = Math.max(w.peakTargetInflight, w.targetInflight);
    try {
      await w.cross(d.bytes + CHUNK_OVERHEAD_BYTES);
      const blocks: number[] = [];
      for (const e of d.extents) {
        for (let at = e.offset; at < e.offset + e.length; at += EBS_BLOCK) {
          const index = at / EBS_BLOCK;
          if (!this.written.has(index)) blocks.push(index);
        }
      }
      const results = await Promise.all(
        blocks.map(async (index) => {
          await w.limiter?.acquire('PutSnapshotBlock', this.name, signal);
          const ok = await w.put(this.snapshot);
          if (ok) this.written.add(index);
          return ok;
        }),
      );
      await w.clock.sleep(w.s.rttMs / 2);
      if (results.includes(false)) {
        throw new TransferError(`${this.name}: RequestThrottledException at offset ${d.offset}`, {
          offset: d.offset,
          retryable: true,
          throttled: true,
        });
      }
      w.completed(this.name, d.bytes);
    } finally {
      w.targetInflight -= d.bytes;
    }
  }
  async read(): Promise<Uint8Array> {
    return new Uint8Array(0);
  }
  async commit(_summary: DiskCommit): Promise<string> {
    return `snap-${this.name}`;
  }
  async close(): Promise<void> {}
}

// ---- The node budget, observed where it is enforced ----

/**
 * The scheduler's own in-flight count, read after every grant: the only place it grows, so its
 * maximum over grants is its maximum over the run. The engine is not changed; `next` is wrapped.
 */
const budgetProbe = { grants: 0, peak: 0, budget: 0, overBudgetGrants: 0 };
const schedulerNext = Scheduler.prototype.next;
Scheduler.prototype.next = function next(this: Scheduler): Grant | undefined {
  const grant = schedulerNext.call(this);
  if (grant !== undefined) {
    budgetProbe.grants++;
    budgetProbe.budget = this.budget;
    budgetProbe.peak = Math.max(budgetProbe.peak, this.inflight);
    if (this.inflight > this.budget) budgetProbe.overBudgetGrants++;
  }
  return grant;
};

// ---- One scenario ----

function jain(xs: readonly number[]): number {
  const sum = xs.reduce((s, x) => s + x, 0);
  const squares = xs.reduce((s, x) => s + x * x, 0);
  return squares > 0 ? (sum * sum) / (xs.length * squares) : 1;
}

const round = (n: number, digits = 3) => Number(n.toFixed(digits));
const mean = (xs: readonly number[]) => (xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : 0);

/** One sample per engine tick: [t ms, delivered bytes, put calls, throttled calls, in flight, mean window]. */
type TimelinePoint = [number, number, number, number, number, number];

async function runScenario(s: Scenario) {
  const clock = new VirtualClock();
  const world = new World(clock, s);
  const rnd = seededRandom(s.seed + 1);
  const pool = randomBytes(MiB);
  const meanBytes = (s.totalGiB * GiB) / s.disks;
  const disks: DiskJob[] = [];
  const sizes = new Map<string, number>();
  const fragmented = new Set<string>();
  for (let i = 0; i < s.disks; i++) {
    const id = `d${String(i).padStart(4, '0')}`;
    // Sizes spread ±25% around the mean, so disks finish at different times, as in a real fleet.
    const bytes = Math.max(EBS_BLOCK, Math.round((meanBytes * (0.75 + 0.5 * rnd())) / EBS_BLOCK) * EBS_BLOCK);
    let changed: Extent[] | undefined;
    let sizeBytes = bytes;
    if (i < s.disks * s.fragmentedShare) {
      // An incremental cycle: 30% of the disk's 512 KiB blocks changed, scattered at random.
      fragmented.add(id);
      const blocks = Math.ceil(bytes / EBS_BLOCK / 0.3);
      sizeBytes = blocks * EBS_BLOCK;
      changed = [];
      let moved = 0;
      for (let b = 0; b < blocks && moved < bytes; b++) {
        if (rnd() < 0.3) {
          changed.push({ offset: b * EBS_BLOCK, length: EBS_BLOCK });
          moved += EBS_BLOCK;
        }
      }
    }
    sizes.set(id, changed ? changed.length * EBS_BLOCK : bytes);
    disks.push({
      id,
      source: new SimSource(`sim:${id}`, sizeBytes, pool),
      target: new SimTarget(id, world),
      changed,
    });
  }
  const params = resolveParams({ nodeBudget: `${s.budgetMiB} MiB` }, { targetBlockSize: EBS_BLOCK });
  const totalBytes = [...sizes.values()].reduce((a, b) => a + b, 0);

  // The timeline: the engine emits one progress event per disk per tick; the first of a tick opens
  // a sample, the others add their in-flight bytes and window to it.
  const timeline: TimelinePoint[] = [];
  let retries = 0;
  let throttleRetries = 0;
  const windowMoves = { up: 0, down: 0 };
  const windowReasons = new Map<string, number>();
  const lastWindow = new Map<string, number>();
  const onEvent = (e: ReplicationEvent) => {
    if (e.type === 'progress') {
      const now = clock.now();
      let p = timeline.at(-1);
      if (p === undefined || p[0] !== now) {
        p = [now, world.delivered, world.putRequests, world.putThrottled, 0, 0];
        timeline.push(p);
      }
      p[4] += e.inflight;
      p[5] += e.window / s.disks;
      lastWindow.set(e.disk, e.window);
    } else if (e.type === 'window') {
      if (e.reason.startsWith('up')) windowMoves.up++;
      else windowMoves.down++;
      const key = e.reason.replace(/\d+(\.\d+)?/g, 'N').slice(0, 60);
      windowReasons.set(key, (windowReasons.get(key) ?? 0) + 1);
    } else if (e.type === 'retry') {
      retries++;
      if (/Throttled/.test(e.error)) throttleRetries++;
    }
  };

  Object.assign(budgetProbe, { grants: 0, peak: 0, budget: 0, overBudgetGrants: 0 });
  const real0 = performance.now();
  const cpu0 = process.cpuUsage();
  let error: string | undefined;
  try {
    await replicate(
      { set: s.name, disks, params },
      {
        clock,
        random: seededRandom(s.seed + 2),
        state: new MemoryStateStore(),
        onEvent,
        tickMs: TICK_MS,
      },
    );
  } catch (err) {
    error = errorMessage(err);
  }
  const realMs = performance.now() - real0;
  const cpu = process.cpuUsage(cpu0);
  const makespan = clock.now();

  // Fairness while every disk still had work: from 2 s (every disk granted at least once) to the
  // first disk's completion (or the failure), each disk's throughput; Jain's index over them.
  const finish = disks.map((d) => {
    const c = world.completions.get(d.id);
    return c && c.bytes.at(-1) === sizes.get(d.id) ? c.t.at(-1)! : Number.POSITIVE_INFINITY;
  });
  const firstFinish = Math.min(...finish, makespan);
  const from = Math.min(2000, firstFinish / 2);
  const backloggedMs = firstFinish - from;
  const done0 = disks.map((d) => world.doneAt(d.id, from));
  const done1 = disks.map((d) => world.doneAt(d.id, firstFinish));
  const rates = disks.map((_, i) => (done1[i]!.bytes - done0[i]!.bytes) / (backloggedMs / 1000));
  const chunkRates = disks.map((_, i) => (done1[i]!.chunks - done0[i]!.chunks) / (backloggedMs / 1000));
  const bytesWhileBacklogged = rates.reduce((a, r) => a + r, 0) * (backloggedMs / 1000);
  const fragRates = rates.filter((_, i) => fragmented.has(disks[i]!.id));
  const seqRates = rates.filter((_, i) => !fragmented.has(disks[i]!.id));

  // Capacities in payload bytes per second. Every PutSnapshotBlock carries a whole 512 KiB block.
  const linkBps = (s.linkGbit * 1e9) / 8;
  const accountBps = s.accountRps * EBS_BLOCK;
  const snapshotsBps = PER_SNAPSHOT_RPS * EBS_BLOCK * s.disks;
  const limits = [
    { name: 'link', bps: linkBps },
    { name: 'account PutSnapshotBlock quota', bps: accountBps },
    { name: 'per-snapshot quotas, all disks', bps: snapshotsBps },
  ];
  const binding = limits.reduce((a, b) => (b.bps < a.bps ? b : a));
  const util = (bytes: number, ms: number, bps: number) => round(bytes / (bps * (ms / 1000)));

  const levels = new Map<number, number>();
  for (const w of lastWindow.values()) levels.set(w / MiB, (levels.get(w / MiB) ?? 0) + 1);

  return {
    result: {
      scenario: s,
      ok: error === undefined,
      ...(error === undefined ? {} : { error }),
      disks: s.disks,
      fragmentedDisks: fragmented.size,
      totalBytes,
      deliveredBytes: world.delivered,
      virtualSeconds: round(makespan / 1000, 2),
      realSeconds: round(realMs / 1000, 1),
      cpuSeconds: round((cpu.user + cpu.system) / 1e6, 1),
      clockSteps: clock.steps,
      bdpMiB: round((linkBps * ((s.rttMs + s.writeMs) / 1000)) / MiB, 1),
      utilisation: {
        /** The smallest of the limits below: what 100% means for this scenario. */
        bindingLimit: binding.name,
        bindingGbit: round((binding.bps * 8) / 1e9, 2),
        linkGbit: s.linkGbit,
        accountQuotaGbit: round((accountBps * 8) / 1e9, 2),
        /** Delivered payload / (binding limit × run time), the tail where few disks remain included. */
        wholeRun: util(world.delivered, makespan, binding.bps),
        /** The same while every disk still had work (the fairness interval). */
        whileAllBacklogged: util(bytesWhileBacklogged, backloggedMs, binding.bps),
        /** Delivered payload / (link rate × run time): equal to wholeRun when the link binds. */
        linkWholeRun: util(world.delivered, makespan, linkBps),
        linkWhileAllBacklogged: util(bytesWhileBacklogged, backloggedMs, linkBps),
        /** Time the link spent serialising (payload, framing, and chunks re-sent after throttling). */
        linkBusy: round(world.linkBusyMs / makespan),
        linkBytes: world.linkBytes,
      },
      fairness: {
        intervalSeconds: [round(from / 1000, 2), round(firstFinish / 1000, 2)],
        /** Jain's index over per-disk throughput (bytes/s) in the interval. */
        jainIndex: round(jain(rates), 4),
        minOverMean: round(Math.min(...rates) / mean(rates), 3),
        maxOverMean: round(Math.max(...rates) / mean(rates), 3),
        /** Jain's index over per-disk chunk completions per second in the same interval. */
        jainIndexChunks: round(jain(chunkRates), 4),
        /** Mean throughput of fragmented disks over sequential ones in the interval. */
        fragmentedOverSequential:
          fragRates.length && seqRates.length ? round(mean(fragRates) / mean(seqRates), 3) : undefined,
        meanChunkBytesFragmented: fragRates.length
          ? Math.round(
              mean(
                disks
                  .filter((d) => fragmented.has(d.id))
                  .map((d) => sizes.get(d.id)! / Math.max(1, world.completions.get(d.id)?.t.length ?? 1)),
              ),
            )
          : undefined,
      },
      inflight: {
        budgetBytes: params.nodeBudget,
        /** The scheduler's in-flight bytes, read after every one of `grants` grants. */
        peakSchedulerBytes: budgetProbe.peak,
        grants: budgetProbe.grants,
        overBudgetGrants: budgetProbe.overBudgetGrants,
        /** Bytes inside writeChunk at the busiest instant (a subset of the scheduler's count). */
        peakTargetBytes: world.peakTargetInflight,
        budgetExceeded: budgetProbe.overBudgetGrants > 0 || world.peakTargetInflight > params.nodeBudget,
      },
      throttling: {
        putRequests: world.putRequests,
        throttled: world.putThrottled,
        /** Throttled PutSnapshotBlock calls / all PutSnapshotBlock calls. */
        share: round(world.putThrottled / Math.max(1, world.putRequests), 5),
        chunkRetries: retries,
        throttledChunkRetries: throttleRetries,
      },
      windows: {
        stepsUp: windowMoves.up,
        stepsDown: windowMoves.down,
        finalLevelsMiB: Object.fromEntries([...levels.entries()].sort((a, b) => a[0] - b[0])),
        reasons: Object.fromEntries([...windowReasons.entries()].sort((a, b) => b[1] - a[1]).slice(0, 8)),
      },
      /** Per engine tick: [t ms, delivered bytes, put calls, throttled calls, in flight bytes, mean window bytes]. */
      timeline: timeline.map((p) => [p[0], p[1], p[2], p[3], p[4], Math.round(p[5])]),
    },
    chartSvg: chart(s, timeline, {
      bindingGbit: (binding.bps * 8) / 1e9,
      accountGbit: (accountBps * 8) / 1e9,
      error,
    }),
  };
}

/** Throughput, mean window and throttled share over time, from the per-tick timeline. */
function chart(
  s: Scenario,
  timeline: readonly TimelinePoint[],
  o: { bindingGbit: number; accountGbit: number; error: string | undefined },
): string {
  // Over one second (four ticks), plotted at its middle: a tick's completions are lumpy.
  const perSecond: [number, number, number][] = [];
  for (let i = 4; i < timeline.length; i++) {
    const a = timeline[i - 4]!;
    const b = timeline[i]!;
    const sec = (b[0] - a[0]) / 1000;
    const calls = b[2] - a[2];
    perSecond.push([
      (a[0] + b[0]) / 2000,
      ((b[1] - a[1]) * 8) / 1e9 / sec,
      calls ? (100 * (b[3] - a[3])) / calls : 0,
    ]);
  }
  const marks = [{ y: s.linkGbit, label: `link ${s.linkGbit} Gbit/s` }];
  if (o.accountGbit < s.linkGbit * 1.5) {
    marks.push({
      y: o.accountGbit,
      label: `account quota ${s.accountRps}/s = ${o.accountGbit.toFixed(1)} Gbit/s`,
    });
  }
  return lineChart({
    title: `Simulation ${s.name}: ${s.disks} disks, ${s.linkGbit} Gbit/s, ${s.rttMs} ms RTT, EBS model`,
    subtitle:
      `account ${s.accountRps} PutSnapshotBlock/s${s.paced ? ', paced by the adapter limiter' : ''}, ` +
      `node budget ${s.budgetMiB} MiB; virtual time${o.error ? `; run FAILED: ${o.error.slice(0, 70)}` : ''}`,
    xLabel: 'virtual time (s)',
    leftLabel: 'delivered (Gbit/s)',
    rightLabel: 'mean window (MiB), throttled (%)',
    leftMarks: marks,
    series: [
      {
        name: 'delivered, 1 s',
        color: '#1f77b4',
        axis: 'left',
        points: perSecond.map((p) => [p[0], p[1]] as const),
      },
      {
        name: 'mean window',
        color: '#d62728',
        axis: 'right',
        step: true,
        points: timeline.map((p) => [p[0] / 1000, p[5] / MiB] as const),
      },
      {
        name: 'throttled calls, 1 s',
        color: '#ff7f0e',
        axis: 'right',
        dashed: true,
        points: perSecond.map((p) => [p[0], p[2]] as const),
      },
    ],
  });
}

// ---- Main ----

async function main(): Promise<void> {
  const { values } = parseArgs({
    args: process.argv.slice(2),
    strict: true,
    options: {
      disks: { type: 'string', default: '100,1000' },
      'link-gbit': { type: 'string', default: '10' },
      'rtt-ms': { type: 'string', default: '100' },
      'account-rps': { type: 'string', default: '5000' },
      'write-ms': { type: 'string', default: '100' },
      'budget-mib': { type: 'string', default: '512' },
      'total-gib': { type: 'string', default: '48' },
      'stress-rps': { type: 'string', default: '2000' },
      out: { type: 'string', default: join(ROOT, 'bench', 'results') },
      help: { type: 'boolean', default: false },
    },
  });
  if (values.help) {
    process.stdout.write(`${HELP}\n`);
    return;
  }
  const num = (flag: string, v: string) => {
    const n = Number(v);
    if (!(n > 0 && Number.isFinite(n))) throw new Error(`--${flag}: "${v}" is not a positive number`);
    return n;
  };
  const base = {
    linkGbit: num('link-gbit', values['link-gbit']),
    rttMs: num('rtt-ms', values['rtt-ms']),
    accountRps: num('account-rps', values['account-rps']),
    writeMs: num('write-ms', values['write-ms']),
    writeJitter: 0.2,
    budgetMiB: num('budget-mib', values['budget-mib']),
    totalGiB: num('total-gib', values['total-gib']),
    fragmentedShare: 0.25,
    paced: false,
    seed: 42,
  };
  const scenarios: Scenario[] = values.disks.split(',').map((d) => ({
    ...base,
    name: `${d}-disks`,
    disks: num('disks', d),
  }));
  const stress = Number(values['stress-rps']);
  if (!(stress >= 0 && Number.isFinite(stress))) throw new Error(`--stress-rps: "${values['stress-rps']}"`);
  if (stress > 0) {
    const name = `1000-disks-account-${stress}rps`;
    scenarios.push({ ...base, name, disks: 1000, accountRps: stress });
    scenarios.push({ ...base, name: `${name}-paced`, disks: 1000, accountRps: stress, paced: true });
  }

  const out = resolve(values.out);
  await mkdir(out, { recursive: true });
  const stem = `sim-${new Date().toISOString().slice(0, 10)}`;
  const results = [];
  const charts: string[] = [];
  for (const s of scenarios) {
    process.stderr.write(`simulating ${s.name}: ${JSON.stringify(s)}\n`);
    const { result, chartSvg } = await runScenario(s);
    process.stderr.write(`  ${JSON.stringify({ ...result, scenario: undefined, timeline: undefined })}\n`);
    results.push(result);
    const svgName = `${stem}-${s.name}.svg`;
    await writeFile(join(out, svgName), chartSvg);
    charts.push(svgName);
  }
  const path = join(out, `${stem}.json`);
  await writeFile(
    path,
    `${JSON.stringify(
      {
        benchmark: 'ferry-sim',
        at: new Date().toISOString(),
        command: `node --import tsx bench/sim.ts ${process.argv.slice(2).join(' ')}`.trim(),
        machine: { cpus: os.cpus().length, node: process.version },
        model: {
          ebsBlockBytes: EBS_BLOCK,
          perSnapshotRps: PER_SNAPSHOT_RPS,
          burstSeconds: BURST_SECONDS,
          throttleResponseMs: THROTTLE_RESPONSE_MS,
          chunkOverheadBytes: CHUNK_OVERHEAD_BYTES,
          tickMs: TICK_MS,
        },
        charts,
        results,
      },
      null,
      1,
    )}\n`,
  );
  process.stdout.write(`results: ${path}\n`);
  for (const c of charts) process.stdout.write(`chart: ${join(out, c)}\n`);
}

main().catch((err) => {
  process.stderr.write(`bench/sim: ${errorMessage(err)}\n`);
  if (process.env.FERRY_DEBUG) console.error(err);
  process.exitCode = 1;
});
