// The adaptive window across Lambdas: writers add their chunks' signals to per-bucket counters in
// DynamoDB; each planner tick replays the buckets since its last evaluation into the engine's
// WindowController, evaluating at every bucket boundary as the in-process pipeline would, and
// persists the level it arrives at.
import {
  type ChunkSample,
  DEFAULT_CONTROLLER_TUNABLES,
  WindowController,
} from '../../shared/engine/controller.ts';
import type { SignalBucket } from './cycle-store.ts';
import { SIGNAL_BUCKET_MS } from './cycle-store.ts';

/**
 * History a controller needs behind the instant it evaluates: the longest look-back of the control
 * law (recent + throughput reference, the climb's stable period, the fault interval).
 */
export const CONTROLLER_HISTORY_MS = Math.max(
  DEFAULT_CONTROLLER_TUNABLES.recentMs + DEFAULT_CONTROLLER_TUNABLES.throughputReferenceMs,
  DEFAULT_CONTROLLER_TUNABLES.stableMs,
  DEFAULT_CONTROLLER_TUNABLES.faultIntervalMs,
);

export interface WindowEvaluation {
  readonly level: number;
  readonly changed: boolean;
  readonly climbHoldMs: number;
  readonly reason: string;
}

export interface EvaluateInput {
  readonly levels: readonly number[];
  readonly level: number;
  /** Epoch ms of the last level change: history before it belongs to another window. */
  readonly lastChangeAt: number;
  /** Epoch ms up to which earlier ticks already evaluated (their decisions are in `level`). */
  readonly evaluatedAt: number | undefined;
  /** The climb hold carried from earlier ticks (hysteresis); the engine default when absent. */
  readonly climbHoldMs: number | undefined;
  readonly now: number;
  /** Signal buckets from CONTROLLER_HISTORY_MS before `evaluatedAt` (or from `lastChangeAt`) to now. */
  readonly buckets: readonly SignalBucket[];
}

/** Turns one bucket's counters back into the samples the controller records. */
function* samplesOf(b: SignalBucket): Generator<ChunkSample> {
  const at = b.at;
  const latency = b.successes > 0 ? b.latencyMs / b.successes : 0;
  const bytes = b.successes > 0 ? Math.floor(b.bytes / b.successes) : 0;
  for (let i = 0; i < b.successes; i++) {
    yield {
      at,
      bytes,
      latencyMs: latency,
      throttled: false,
      error: false,
      windowLimited: i < b.windowLimited,
      nodePressure: i < b.nodePressure,
    };
  }
  const fault = { at, bytes: 0, latencyMs: 0, windowLimited: false, nodePressure: false };
  for (let i = 0; i < b.throttles; i++) yield { ...fault, throttled: true, error: false };
  for (let i = 0; i < b.errors; i++) yield { ...fault, throttled: false, error: true };
}

// Longest stretch one tick replays: ticks are seconds apart; after a long pause (a stalled state
// machine) older signals say nothing about the path now.
const MAX_REPLAY_MS = 10 * 60 * 1000;

/**
 * Replays signal buckets into a controller at the persisted level and returns where it ends up.
 * Time runs in SIGNAL_BUCKET_MS steps from the oldest bucket to `now`, recording each bucket as time
 * passes it and evaluating at every step after `evaluatedAt`, as the in-process pipeline evaluates
 * every 250 ms. Steps before `evaluatedAt` only rebuild the history the control law looks back on.
 * The climb hold is carried across ticks (a step-down doubles it, a climb halves it, as in-process);
 * the latency baseline is only as long as the replayed history, so latency-driven step-downs react to
 * queueing that builds up within it.
 */
export function evaluateWindow(input: EvaluateInput): WindowEvaluation {
  const base = DEFAULT_CONTROLLER_TUNABLES.climbHoldMs;
  const hold = Math.max(base, input.climbHoldMs ?? base);
  const controller = new WindowController({
    levels: input.levels,
    initial: input.levels[input.level]!,
    tunables: {
      climbHoldMs: hold,
      maxClimbHoldMs: Math.max(DEFAULT_CONTROLLER_TUNABLES.maxClimbHoldMs, hold),
    },
  });
  const startLevel = input.level;
  const evaluatedAt = input.evaluatedAt ?? Number.NEGATIVE_INFINITY;
  const floor = Math.max(input.lastChangeAt, input.now - MAX_REPLAY_MS);
  const buckets = input.buckets.filter((b) => b.at >= floor && b.at <= input.now).sort((a, b) => a.at - b.at);
  let reason = 'no signals';
  let i = 0;
  const first = buckets[0]?.at ?? input.now;
  for (let t = first + SIGNAL_BUCKET_MS; t <= input.now; t += SIGNAL_BUCKET_MS) {
    while (i < buckets.length && buckets[i]!.at < t)
      for (const s of samplesOf(buckets[i++]!)) controller.record(s);
    if (t > evaluatedAt) {
      const d = controller.evaluate(t);
      if (d.changed) reason = d.reason;
    }
  }
  while (i < buckets.length) for (const s of samplesOf(buckets[i++]!)) controller.record(s);
  if (input.now > evaluatedAt) {
    const final = controller.evaluate(input.now);
    if (final.changed || reason === 'no signals') reason = final.reason;
  }
  const snapshot = controller.snapshot();
  const level = snapshot.level;
  // The controller halves its hold on a climb but never below the hold it was built with; carry on
  // from the halved value ourselves so a recovered path climbs as fast as in-process.
  const climbHoldMs = level > startLevel ? Math.max(base, hold / 2) : snapshot.climbHoldMs;
  return { level, changed: level !== startLevel, climbHoldMs, reason };
}
