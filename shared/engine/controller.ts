// Adaptive window controller: moves one disk's in-flight window between levels from its chunks' signals.
import { ConfigError } from './errors.ts';

/**
 * The control law, evaluated once per `evaluate` and moving at most ONE level per call:
 *
 * 1. Faults (fast, multiplicative-decrease feel). If at least `minFaults` attempts and at least
 *    `faultRate` of all attempts in the last `faultIntervalMs` were throttled or failed, step down
 *    one level. Faults that arrive within `faultCooldownMs` of a step-down belong to the burst it
 *    answered and are not counted, so one burst costs one level, but a storm that outlasts the
 *    cool-down keeps stepping down: 64 MiB reaches 16 MiB in about four seconds. Even a severe
 *    storm moves one level per call: the levels are geometric, so one step is already a
 *    multiplicative decrease, and the cool-down, not a bigger jump, sets how fast it falls.
 * 2. Queueing (slower). Baseline latency is the minimum of the 1 s mean latency over a long
 *    horizon (BBR's min-RTT / LEDBAT's base delay). If the recent latency stays at
 *    `latencyStepDownRatio` x baseline or more for `latencyHoldMs` while throughput is not growing,
 *    the extra latency is a queue we are feeding, not a long link: step down one level.
 * 3. Node pressure. When the node budget, not the window, holds this disk back, climbing is
 *    pointless; if that lasts `pressureHoldMs`, step down so other disks get their share.
 * 4. Climb one level only when, for `stableMs`, there were no throttles or errors, the window was
 *    the limit for most chunks, the budget was not, and latency is near baseline; and at least
 *    `climbHoldMs` have passed since the last change. Every step-down doubles that hold (up to
 *    `maxClimbHoldMs`) and every climb halves it again: hysteresis, so a disk that keeps getting
 *    pushed back probes upwards less and less often instead of oscillating.
 *
 * Memory is a fixed ring of `bucketMs` buckets plus a few slots for the baseline; time is the
 * caller's monotonic clock in ms, so the controller runs the same under a simulated clock.
 */
export interface ControllerTunables {
  /** Resolution of the signal ring; every interval below is rounded to whole buckets. */
  readonly bucketMs: number;
  /** How far back the throttle/error rate is measured. */
  readonly faultIntervalMs: number;
  /** Share of attempts throttled or failed that triggers a fast step-down. */
  readonly faultRate: number;
  /** Fewest faults that can trigger a step-down, whatever the rate. */
  readonly minFaults: number;
  /** Least time between two fault-driven step-downs. */
  readonly faultCooldownMs: number;
  /** Interval over which the "current" latency, throughput and node pressure are measured. */
  readonly recentMs: number;
  /** Fewest successful chunks in `recentMs` for their mean latency to count. */
  readonly minLatencySamples: number;
  /** How long the baseline (minimum) latency is remembered. */
  readonly baselineHorizonMs: number;
  /** Recent latency / baseline at or above which latency counts as queueing. */
  readonly latencyStepDownRatio: number;
  /** Recent latency / baseline at or above which climbing stops. */
  readonly climbMaxLatencyRatio: number;
  /** How long queueing must last before it steps the window down. */
  readonly latencyHoldMs: number;
  /** Earlier period that recent throughput is compared with. */
  readonly throughputReferenceMs: number;
  /** Recent throughput above reference x (1 + this) counts as growing. */
  readonly throughputGrowth: number;
  /** Share of chunks held back by the node budget that counts as node pressure. */
  readonly pressureShare: number;
  /** How long node pressure must last before it steps the window down. */
  readonly pressureHoldMs: number;
  /** Fault-free period that must precede a climb. */
  readonly stableMs: number;
  /** Share of chunks that must have been window-limited for a climb; more than this, strictly. */
  readonly windowLimitedShare: number;
  /** Fewest successful chunks in `stableMs` on which a climb may be decided. */
  readonly minClimbSamples: number;
  /** Least time between a change and the next climb, when nothing has pushed the window down. */
  readonly climbHoldMs: number;
  /** Ceiling of the climb hold after repeated step-downs. */
  readonly maxClimbHoldMs: number;
}

export const DEFAULT_CONTROLLER_TUNABLES: ControllerTunables = Object.freeze({
  // The pipeline evaluates every 250 ms; finer buckets would not be looked at more often.
  bucketMs: 250,
  // A throttling storm shows up within a second at any useful chunk rate; a longer look-back would
  // keep counting a burst the previous step-down already answered.
  faultIntervalMs: 1000,
  // 5%: EBS throttles in bursts, so a real storm is well above this, while the odd retry in a
  // hundred chunks stays below it.
  faultRate: 0.05,
  // One isolated throttle is noise, never a reason to shrink the window.
  minFaults: 2,
  // A second covers several target round trips, so chunks granted under the old, larger window have
  // drained and the faults that follow are a reply to the smaller one.
  faultCooldownMs: 1000,
  // One second of chunks averages out per-chunk jitter (±30% latency noise shrinks to a few percent).
  recentMs: 1000,
  // A mean of fewer chunks is one or two sparse, fast chunks, which would drag the baseline down.
  minLatencySamples: 4,
  // Five minutes (LEDBAT keeps ten). Nothing here drains the queue to re-measure the floor (BBR's
  // PROBE_RTT), so once the floor expires a saturated path's queueing looks like baseline and the
  // window may climb one level; a long horizon makes that rare. The price: after a change to a
  // genuinely slower path the window stays low for up to this long before it trusts the new latency.
  baselineHorizonMs: 300_000,
  // 2.5x: well clear of jitter (a few percent after averaging) and of the 1.5x a single climb can
  // add on a saturated path, so only real queueing, usually someone else's, triggers it.
  latencyStepDownRatio: 2.5,
  // 1.5x: latency already half again its floor means the path is full; a larger window only queues.
  // The gap up to 2.5x is the hysteresis band where the window neither climbs nor drops.
  climbMaxLatencyRatio: 1.5,
  // Two seconds: slower than faults on purpose (latency is a softer signal) but still a handful of
  // evaluations, so a persistent queue is drained within about ten seconds from the top level.
  latencyHoldMs: 2000,
  // Eight seconds before the recent second: long enough to span the previous level (a climb happens
  // every 5 s at most), so the growth a climb bought is visible.
  throughputReferenceMs: 8000,
  // 10%: below that, the difference is measurement noise, not a pipe that got wider.
  throughputGrowth: 0.1,
  // Most chunks held back by the budget: the budget, not this window, is the limit.
  pressureShare: 0.5,
  // Ten seconds: the budget is shared, so pressure comes and goes as other disks finish chunks;
  // only sustained pressure should make this disk give ground.
  pressureHoldMs: 10_000,
  // "Several seconds" of clean running: longer than a throttling burst plus its retries.
  stableMs: 5000,
  // A majority of chunks found the window full; otherwise the source or the budget is the limit.
  windowLimitedShare: 0.5,
  // Enough chunks that "most were window-limited" means something; a window-limited disk has at
  // least 16 chunks in flight, so even a slow link produces this many in five seconds.
  minClimbSamples: 8,
  // At least `stableMs`, so a climb is judged on chunks that ran at the current window.
  climbHoldMs: 5000,
  // Three step-downs in a row (5 -> 10 -> 20 -> 40 s): a path that keeps pushing back is probed at
  // most every 40 s, yet a recovered one is back at the top within about two minutes.
  maxClimbHoldMs: 40_000,
});

/** One completed chunk or one failed attempt, as the pipeline saw it. */
export interface ChunkSample {
  /** ms, monotonic, when the chunk finished (or the attempt failed). */
  readonly at: number;
  /** Payload bytes of the chunk (0 for a failed attempt). */
  readonly bytes: number;
  /** Target write latency of this chunk (time from send to ack). */
  readonly latencyMs: number;
  /** The target throttled this attempt (EBS RequestThrottledException, NBD/server busy). */
  readonly throttled: boolean;
  /** The attempt failed for another retryable reason. */
  readonly error: boolean;
  /** When this chunk was granted, the disk had more work waiting and its window was full. */
  readonly windowLimited: boolean;
  /** The node budget, not the window, held this disk back. */
  readonly nodePressure: boolean;
}

export interface ControllerDecision {
  /** The window in bytes after this evaluation. */
  readonly window: number;
  /** Index into the levels, 0 = smallest. */
  readonly level: number;
  readonly changed: boolean;
  /** Why the window moved or held, for logs and progress. */
  readonly reason: string;
}

/** What the controller knows, for progress lines and logs. Counters run since construction. */
export interface ControllerSnapshot {
  readonly window: number;
  readonly level: number;
  /** How many levels there are. */
  readonly levels: number;
  readonly baselineLatencyMs: number | undefined;
  /** Mean latency over the recent interval, as of the last evaluation. */
  readonly recentLatencyMs: number | undefined;
  readonly throughputBytesPerSec: number;
  /** How long the next climb must wait after a change; grows with step-downs. */
  readonly climbHoldMs: number;
  /** The last decision's reason. */
  readonly reason: string;
  readonly samples: number;
  readonly bytes: number;
  readonly throttles: number;
  readonly errors: number;
  readonly stepsUp: number;
  readonly stepsDown: number;
}

/**
 * What a controller carries from one evaluation to the next, as plain JSON data: a controller can
 * stop and be rebuilt elsewhere with `WindowController.restore` (the serverless planner keeps it in
 * its cycle record between ticks), under the same levels and tunables.
 *
 * Carried: the level; the climb hold (hysteresis); the instants the control law measures from (its
 * start, the last change, the last step-down, since when latency has been inflated and the budget
 * pressing, the last evaluation); and the latency baseline's slots, which evaluations feed, not
 * samples, so no replay of samples could rebuild them.
 * Not carried: the signal ring, the last few seconds of samples (`historyMs` before `evaluatedAt`,
 * about ten seconds by default). Whoever restores holds those samples already (the serverless
 * planner's signal buckets) and records them again after `restore`; recorded in the same order they
 * rebuild the same ring, so decisions continue as if never interrupted. Nor the counters
 * and last reason, which only progress lines show: a restored controller counts from its restore.
 * An instant that has not happened yet is absent (JSON has no -Infinity).
 */
export interface ControllerState {
  /** Index into the levels, 0 = smallest. */
  readonly level: number;
  /** How long the next climb must wait after a change. */
  readonly climbHoldMs: number;
  /** The first sample or evaluation: intervals never reach before it. */
  readonly startedAt?: number;
  /** The last evaluation: a clock that steps back stands still at it. */
  readonly evaluatedAt?: number;
  /** The last change of level (or the start): the next climb waits the climb hold from it. */
  readonly lastChangeAt?: number;
  /** The last step-down: faults within the cool-down after it are not counted. */
  readonly lastDecreaseAt?: number;
  /** Since when latency has looked like queueing. */
  readonly inflatedSince?: number;
  /** Since when the node budget has held this disk back. */
  readonly pressureSince?: number;
  /** The latency baseline's filled slots: slot number (time / slot length) and the least mean latency in it. */
  readonly baseline: readonly { readonly slot: number; readonly minMs: number }[];
}

export interface ControllerOptions {
  /** Window sizes in bytes, strictly ascending. */
  readonly levels: readonly number[];
  /** Starting window in bytes; must be one of `levels`. */
  readonly initial: number;
  readonly tunables?: Partial<ControllerTunables>;
}

export class WindowController {
  private readonly levels: readonly number[];
  private readonly tunables: ControllerTunables;
  private readonly ring: SignalRing;
  private readonly baseline: WindowedMin;
  private level: number;
  private startedAt: number | undefined;
  private lastNow = Number.NEGATIVE_INFINITY;
  private lastChangeAt = Number.NEGATIVE_INFINITY;
  private lastDecreaseAt = Number.NEGATIVE_INFINITY;
  private climbHoldMs: number;
  private inflatedSince: number | undefined;
  private pressureSince: number | undefined;
  private lastLatency: { recentMs: number | undefined; baselineMs: number | undefined } = {
    recentMs: undefined,
    baselineMs: undefined,
  };
  private lastReason = 'starting';
  private readonly counters = { samples: 0, bytes: 0, throttles: 0, errors: 0, stepsUp: 0, stepsDown: 0 };

  constructor(opts: ControllerOptions) {
    this.levels = validateLevels(opts.levels);
    const level = this.levels.indexOf(opts.initial);
    if (level < 0) {
      throw new ConfigError(
        `window: ${opts.initial} bytes is not one of the window levels (${this.levels.join(', ')})`,
        { setting: 'window' },
      );
    }
    this.level = level;
    this.tunables = validateTunables(opts.tunables ?? {});
    const t = this.tunables;
    const span = Math.max(t.faultIntervalMs, t.stableMs, t.recentMs + t.throughputReferenceMs);
    this.ring = new SignalRing(t.bucketMs, span);
    this.baseline = new WindowedMin(t.baselineHorizonMs);
    this.climbHoldMs = t.climbHoldMs;
  }

  /**
   * A controller that continues from `state` (taken by `state()` under the same levels and tunables)
   * as if never stopped, once the samples of the last look-back are recorded again. A climb hold
   * outside the tunables' range is clamped into it.
   */
  static restore(opts: Omit<ControllerOptions, 'initial'>, state: ControllerState): WindowController {
    const levels = validateLevels(opts.levels);
    const bad = (why: string) => new ConfigError(`controller state: ${why}`, { setting: 'controller state' });
    if (!Number.isSafeInteger(state.level) || state.level < 0 || state.level >= levels.length) {
      throw bad(`level ${state.level} is not one of the ${levels.length} window levels`);
    }
    const c = new WindowController({ ...opts, initial: levels[state.level]! });
    const t = c.tunables;
    const instant = (name: string, v: number | undefined) => {
      if (v !== undefined && !Number.isFinite(v)) throw bad(`${name} ${v} is not a time in ms`);
      return v;
    };
    if (!Number.isFinite(state.climbHoldMs)) throw bad(`climbHoldMs ${state.climbHoldMs} is not a duration`);
    c.climbHoldMs = Math.min(t.maxClimbHoldMs, Math.max(t.climbHoldMs, state.climbHoldMs));
    c.startedAt = instant('startedAt', state.startedAt);
    c.lastNow = instant('evaluatedAt', state.evaluatedAt) ?? Number.NEGATIVE_INFINITY;
    c.lastChangeAt = instant('lastChangeAt', state.lastChangeAt) ?? Number.NEGATIVE_INFINITY;
    c.lastDecreaseAt = instant('lastDecreaseAt', state.lastDecreaseAt) ?? Number.NEGATIVE_INFINITY;
    c.inflatedSince = instant('inflatedSince', state.inflatedSince);
    c.pressureSince = instant('pressureSince', state.pressureSince);
    for (const { slot, minMs } of state.baseline) {
      if (!Number.isSafeInteger(slot) || !Number.isFinite(minMs))
        throw bad(`baseline slot ${slot} (${minMs} ms) is not a slot number and a latency`);
      c.baseline.restore(slot, minMs);
    }
    return c;
  }

  /** What the controller carries across evaluations, as plain JSON data (see ControllerState). */
  state(): ControllerState {
    const instants = {
      startedAt: this.startedAt,
      evaluatedAt: this.lastNow,
      lastChangeAt: this.lastChangeAt,
      lastDecreaseAt: this.lastDecreaseAt,
      inflatedSince: this.inflatedSince,
      pressureSince: this.pressureSince,
    };
    const state: Record<string, unknown> = {
      level: this.level,
      climbHoldMs: this.climbHoldMs,
      baseline: this.baseline.filled(),
    };
    // Absent, not undefined or -Infinity: the state is JSON data and equals its own round trip.
    for (const [name, at] of Object.entries(instants))
      if (at !== undefined && Number.isFinite(at)) state[name] = at;
    return state as unknown as ControllerState;
  }

  /**
   * How far back a restored controller needs its samples again: those recorded less than this before
   * the state's `evaluatedAt` (all of them when it never evaluated). The signal ring holds no more.
   */
  get historyMs(): number {
    return this.ring.historyMs;
  }

  /** Current window in bytes. */
  get window(): number {
    return this.levels[this.level]!;
  }

  /** Called once per completed chunk or failed attempt. */
  record(sample: ChunkSample): void {
    if (!Number.isFinite(sample.at)) return;
    this.start(sample.at);
    this.ring.add(sample);
    this.counters.samples++;
    this.counters.bytes += sample.bytes;
    if (sample.throttled) this.counters.throttles++;
    else if (sample.error) this.counters.errors++;
  }

  /** Called periodically (every tick of the run's clock) and after throttles; moves at most one level. */
  evaluate(now: number): ControllerDecision {
    // A clock that steps back would reopen intervals already judged; treat it as standing still.
    now = Math.max(now, this.lastNow);
    this.lastNow = now;
    this.start(now);
    const t = this.tunables;

    const recent = this.ring.sum(now - t.recentMs, now);
    const recentLatency =
      recent.successes > 0 && recent.successes >= t.minLatencySamples
        ? recent.latencySum / recent.successes
        : undefined;
    // Fed before it is read, so once there is any latency there is a baseline to compare with.
    if (recentLatency !== undefined) this.baseline.add(now, recentLatency);
    const baseline = this.baseline.min(now);
    this.lastLatency = { recentMs: recentLatency, baselineMs: baseline };
    const ratio =
      recentLatency !== undefined && baseline !== undefined && baseline > 0
        ? recentLatency / baseline
        : undefined;

    const queueing =
      ratio !== undefined && ratio >= t.latencyStepDownRatio && !this.throughputGrowing(now, recent);
    this.inflatedSince = queueing ? (this.inflatedSince ?? now) : undefined;
    // An idle disk says nothing about the budget either way; keep what we knew.
    if (recent.attempts > 0) {
      const pressured = recent.nodePressure >= t.pressureShare * recent.attempts;
      this.pressureSince = pressured ? (this.pressureSince ?? now) : undefined;
    }

    const down =
      this.faultReason(now) ??
      this.queueingReason(now, ratio, recentLatency, baseline) ??
      this.pressureReason(now);
    if (down !== undefined) {
      if (this.level === 0) return this.hold(`${down}; already at the lowest level`);
      return this.move(now, -1, down);
    }
    const climb = this.climbVerdict(now, ratio);
    return climb.climb ? this.move(now, +1, climb.reason) : this.hold(climb.reason);
  }

  /** State for progress and logging. */
  snapshot(): ControllerSnapshot {
    const now = this.lastNow;
    const recent = Number.isFinite(now) ? this.ring.sum(now - this.tunables.recentMs, now) : undefined;
    return {
      window: this.window,
      level: this.level,
      levels: this.levels.length,
      baselineLatencyMs: this.lastLatency.baselineMs,
      recentLatencyMs: this.lastLatency.recentMs,
      throughputBytesPerSec: recent ? this.rate(recent.bytes, recent.fromMs, now) : 0,
      climbHoldMs: this.climbHoldMs,
      reason: this.lastReason,
      ...this.counters,
    };
  }

  private start(at: number): void {
    if (this.startedAt !== undefined) return;
    this.startedAt = at;
    // The first climb waits a full hold from the start, like any other.
    this.lastChangeAt = at;
  }

  private faultReason(now: number): string | undefined {
    const t = this.tunables;
    // Faults up to the end of the cool-down are the tail of the burst the last step-down answered:
    // chunks granted under the old window, still failing. Not counting them is the cool-down.
    const s = this.ring.sum(Math.max(now - t.faultIntervalMs, this.lastDecreaseAt + t.faultCooldownMs), now);
    const faults = s.throttles + s.errors;
    if (faults < t.minFaults || faults < t.faultRate * s.attempts) return undefined;
    const what =
      s.throttles > 0 && s.errors > 0 ? 'throttled or failed' : s.throttles > 0 ? 'throttled' : 'failed';
    return `${faults} of ${s.attempts} attempts ${what} in the last ${seconds(t.faultIntervalMs)}`;
  }

  private queueingReason(
    now: number,
    ratio: number | undefined,
    latency: number | undefined,
    baseline: number | undefined,
  ): string | undefined {
    if (this.inflatedSince === undefined || now - this.inflatedSince < this.tunables.latencyHoldMs) {
      return undefined;
    }
    return (
      `latency ${Math.round(latency ?? 0)} ms is ${ratio?.toFixed(1)}x the ${Math.round(baseline ?? 0)} ms ` +
      `baseline for ${seconds(now - this.inflatedSince)} and throughput is not growing`
    );
  }

  private pressureReason(now: number): string | undefined {
    if (this.pressureSince === undefined || now - this.pressureSince < this.tunables.pressureHoldMs) {
      return undefined;
    }
    return `node budget held this disk back for ${seconds(now - this.pressureSince)}`;
  }

  private climbVerdict(now: number, ratio: number | undefined): { climb: boolean; reason: string } {
    const t = this.tunables;
    const no = (reason: string) => ({ climb: false, reason });
    if (this.level === this.levels.length - 1) return no('at the top level');
    const waited = now - this.lastChangeAt;
    if (waited < this.climbHoldMs)
      return no(`${seconds(waited)} of ${seconds(this.climbHoldMs)} since the last change`);
    const s = this.ring.sum(now - t.stableMs, now);
    const faults = s.throttles + s.errors;
    if (faults > 0) return no(`${faults} throttles or errors in the last ${seconds(t.stableMs)}`);
    if (s.successes < t.minClimbSamples)
      return no(`only ${s.successes} chunks in the last ${seconds(t.stableMs)}`);
    if (this.pressureSince !== undefined || s.nodePressure >= t.pressureShare * s.attempts) {
      return no('the node budget, not the window, is the limit');
    }
    if (s.windowLimited <= t.windowLimitedShare * s.attempts) {
      return no(`window was the limit for only ${s.windowLimited} of ${s.attempts} chunks`);
    }
    if (ratio !== undefined && ratio >= t.climbMaxLatencyRatio) {
      return no(`latency is ${ratio.toFixed(1)}x baseline; a larger window would only queue`);
    }
    const evidence = `window-limited for ${s.windowLimited} of ${s.attempts} chunks`;
    return { climb: true, reason: `no faults for ${seconds(t.stableMs)} and ${evidence}` };
  }

  private move(now: number, step: 1 | -1, reason: string): ControllerDecision {
    const t = this.tunables;
    this.level += step;
    this.lastChangeAt = now;
    if (step < 0) {
      this.lastDecreaseAt = now;
      this.climbHoldMs = Math.min(t.maxClimbHoldMs, this.climbHoldMs * 2);
      this.counters.stepsDown++;
    } else {
      this.climbHoldMs = Math.max(t.climbHoldMs, this.climbHoldMs / 2);
      this.counters.stepsUp++;
    }
    // Sustained signals must be sustained at the new window before they count again.
    this.inflatedSince = undefined;
    this.pressureSince = undefined;
    this.lastReason = `${step < 0 ? 'down' : 'up'}: ${reason}`;
    return { window: this.window, level: this.level, changed: true, reason: this.lastReason };
  }

  private hold(reason: string): ControllerDecision {
    this.lastReason = `hold: ${reason}`;
    return { window: this.window, level: this.level, changed: false, reason: this.lastReason };
  }

  /** Recent throughput against the period before it; unknown (too little history) counts as not growing. */
  private throughputGrowing(now: number, recent: IntervalTotals): boolean {
    const t = this.tunables;
    // The buckets just before the recent interval, not overlapping it.
    const reference = this.ring.sum(recent.fromMs - t.throughputReferenceMs, recent.fromMs - t.bucketMs);
    const refFrom = Math.max(reference.fromMs, this.startedAt ?? reference.fromMs);
    if (recent.fromMs - refFrom < t.recentMs) return false;
    const before = this.rate(reference.bytes, refFrom, recent.fromMs);
    return this.rate(recent.bytes, recent.fromMs, now) > before * (1 + t.throughputGrowth);
  }

  private rate(bytes: number, fromMs: number, toMs: number): number {
    const from = Math.max(fromMs, this.startedAt ?? fromMs);
    return toMs > from ? (bytes * 1000) / (toMs - from) : 0;
  }
}

interface IntervalTotals {
  /** Start of the first bucket summed; the interval runs from here to the `to` asked for. */
  fromMs: number;
  attempts: number;
  successes: number;
  throttles: number;
  errors: number;
  bytes: number;
  latencySum: number;
  windowLimited: number;
  nodePressure: number;
}

interface Bucket extends Omit<IntervalTotals, 'fromMs'> {
  /** floor(at / bucketMs) of the samples it holds; a slot whose id is stale is empty. */
  id: number;
}

/** Per-bucket sums over a fixed span of recent time: O(span / bucketMs) memory, whatever the chunk rate. */
class SignalRing {
  private readonly buckets: Bucket[];

  constructor(
    private readonly bucketMs: number,
    spanMs: number,
  ) {
    // One spare bucket: the current one is partly filled while the oldest must still be whole.
    const count = Math.ceil(spanMs / bucketMs) + 1;
    this.buckets = Array.from({ length: count }, () => emptyBucket(Number.NEGATIVE_INFINITY));
  }

  /** Time the ring covers: a sample older than this behind the newest bucket is forgotten. */
  get historyMs(): number {
    return this.buckets.length * this.bucketMs;
  }

  add(s: ChunkSample): void {
    const id = Math.floor(s.at / this.bucketMs);
    const slot = this.slot(id);
    let b = this.buckets[slot]!;
    if (b.id > id) return; // older than the ring remembers
    if (b.id < id) {
      b = emptyBucket(id);
      this.buckets[slot] = b;
    }
    b.attempts++;
    if (s.throttled) b.throttles++;
    else if (s.error) b.errors++;
    else {
      b.successes++;
      b.bytes += s.bytes;
      b.latencySum += Number.isFinite(s.latencyMs) && s.latencyMs > 0 ? s.latencyMs : 0;
    }
    if (s.windowLimited) b.windowLimited++;
    if (s.nodePressure) b.nodePressure++;
  }

  /** Sums the buckets that start at or after `fromMs`, up to and including the one holding `toMs`. */
  sum(fromMs: number, toMs: number): IntervalTotals {
    const first = Math.ceil(fromMs / this.bucketMs);
    const last = Math.floor(toMs / this.bucketMs);
    const { id: _, ...zero } = emptyBucket(0);
    const total: IntervalTotals = { ...zero, fromMs: first * this.bucketMs };
    // Never more than the ring holds, whatever interval is asked for.
    for (let id = Math.max(first, last - this.buckets.length + 1); id <= last; id++) {
      const b = this.buckets[this.slot(id)]!;
      if (b.id !== id) continue;
      total.attempts += b.attempts;
      total.successes += b.successes;
      total.throttles += b.throttles;
      total.errors += b.errors;
      total.bytes += b.bytes;
      total.latencySum += b.latencySum;
      total.windowLimited += b.windowLimited;
      total.nodePressure += b.nodePressure;
    }
    return total;
  }

  private slot(id: number): number {
    const n = this.buckets.length;
    return ((id % n) + n) % n;
  }
}

function emptyBucket(id: number): Bucket {
  return {
    id,
    attempts: 0,
    successes: 0,
    throttles: 0,
    errors: 0,
    bytes: 0,
    latencySum: 0,
    windowLimited: 0,
    nodePressure: 0,
  };
}

/**
 * Minimum over a sliding horizon, kept as the minimum of each of a few slots (BBR's windowed
 * min-filter): the estimate forgets an old floor within one slot of the horizon, in O(1) memory.
 */
class WindowedMin {
  private static readonly SLOTS = 6;
  private readonly slotMs: number;
  private readonly slots: { id: number; min: number }[];

  constructor(horizonMs: number) {
    this.slotMs = horizonMs / WindowedMin.SLOTS;
    this.slots = Array.from({ length: WindowedMin.SLOTS }, () => ({
      id: Number.NEGATIVE_INFINITY,
      min: Number.POSITIVE_INFINITY,
    }));
  }

  add(at: number, value: number): void {
    this.put(Math.floor(at / this.slotMs), value);
  }

  private put(id: number, value: number): void {
    const slot = this.slots[((id % WindowedMin.SLOTS) + WindowedMin.SLOTS) % WindowedMin.SLOTS]!;
    if (slot.id > id) return;
    if (slot.id < id) {
      slot.id = id;
      slot.min = value;
    } else slot.min = Math.min(slot.min, value);
  }

  /** The filled slots, for ControllerState. */
  filled(): { slot: number; minMs: number }[] {
    return this.slots.filter((s) => Number.isFinite(s.id)).map((s) => ({ slot: s.id, minMs: s.min }));
  }

  /** Puts back a slot `filled()` returned. */
  restore(slot: number, minMs: number): void {
    this.put(slot, minMs);
  }

  min(now: number): number | undefined {
    const current = Math.floor(now / this.slotMs);
    let min = Number.POSITIVE_INFINITY;
    for (const s of this.slots)
      if (s.id > current - WindowedMin.SLOTS && s.id <= current) min = Math.min(min, s.min);
    return Number.isFinite(min) ? min : undefined;
  }
}

function validateLevels(levels: readonly number[]): readonly number[] {
  if (levels.length === 0)
    throw new ConfigError('window levels: at least one level is needed', { setting: 'window levels' });
  levels.forEach((level, i) => {
    if (!Number.isSafeInteger(level) || level <= 0) {
      throw new ConfigError(`window levels: ${level} is not a positive whole number of bytes`, {
        setting: 'window levels',
      });
    }
    const previous = levels[i - 1];
    if (previous !== undefined && level <= previous) {
      throw new ConfigError(`window levels: must be strictly ascending, but ${level} follows ${previous}`, {
        setting: 'window levels',
      });
    }
  });
  return Object.freeze([...levels]);
}

function validateTunables(overrides: Partial<ControllerTunables>): ControllerTunables {
  const bad = (key: string, why: string) =>
    new ConfigError(`controller.${key}: ${why}`, { setting: `controller.${key}` });
  for (const [key, value] of Object.entries(overrides)) {
    if (!(key in DEFAULT_CONTROLLER_TUNABLES)) throw bad(key, 'unknown tunable');
    if (typeof value !== 'number' || !Number.isFinite(value) || value <= 0) {
      throw bad(key, `${String(value)} is not a positive number`);
    }
  }
  const t: ControllerTunables = { ...DEFAULT_CONTROLLER_TUNABLES, ...overrides };
  for (const key of ['faultRate', 'pressureShare', 'windowLimitedShare'] as const) {
    if (t[key] > 1) throw bad(key, `${t[key]} is a share and cannot exceed 1`);
  }
  if (t.climbMaxLatencyRatio < 1)
    throw bad('climbMaxLatencyRatio', 'latency cannot be below its own minimum');
  if (t.latencyStepDownRatio <= t.climbMaxLatencyRatio) {
    throw bad(
      'latencyStepDownRatio',
      'must exceed climbMaxLatencyRatio, or the window climbs into its own step-down',
    );
  }
  if (t.climbHoldMs < t.stableMs) throw bad('climbHoldMs', 'must be at least stableMs');
  if (t.maxClimbHoldMs < t.climbHoldMs) throw bad('maxClimbHoldMs', 'must be at least climbHoldMs');
  return Object.freeze(t);
}

function seconds(ms: number): string {
  return `${(ms / 1000).toFixed(1)} s`;
}
