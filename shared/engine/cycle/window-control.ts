// The adaptive window across invocations: writer signals replayed into a restored WindowController.
import { type ChunkSample, type ControllerState, WindowController } from '../controller.ts';
import { SIGNAL_BUCKET_MS, type SignalBucket } from './ports.ts';

/**
 * How far back a restored controller needs its samples recorded again (`historyMs`: its signal
 * ring, the one thing ControllerState does not carry); the cycle's controllers use the default
 * tunables, so one value serves every disk.
 */
export const CONTROLLER_HISTORY_MS = new WindowController({ levels: [1], initial: 1 }).historyMs;

// Longest stretch one tick evaluates: ticks are seconds apart; after a long pause (a stalled state
// machine) older signals say nothing about the path now.
export const MAX_REPLAY_MS = 10 * 60 * 1000;

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

/** JSON with sorted keys and without `evaluatedAt`: what "the state changed" compares. */
function essence(state: ControllerState): string {
  const { evaluatedAt: _, ...rest } = state;
  return JSON.stringify(rest, (_key, value: unknown) =>
    value !== null && typeof value === 'object' && !Array.isArray(value)
      ? Object.fromEntries(
          Object.entries(value as Record<string, unknown>).sort(([a], [b]) => a.localeCompare(b)),
        )
      : value,
  );
}

export interface EvaluateInput {
  readonly levels: readonly number[];
  /** The level a disk starts at when it has no state yet. */
  readonly initialLevel: number;
  /** The kept state (`CycleDiskRecord.controller`); undefined or damaged: start afresh. */
  readonly state: Readonly<Record<string, unknown>> | undefined;
  /**
   * Up to when earlier evaluations ran without changing anything else (the cycle's last tick):
   * the evaluation resumes after the later of this and the state's own `evaluatedAt`.
   */
  readonly evaluatedUntil: number | undefined;
  readonly now: number;
  /** Signal buckets from `replayFrom(...)` to now, ascending or not. */
  readonly buckets: readonly SignalBucket[];
}

export interface WindowEvaluation {
  readonly level: number;
  readonly window: number;
  /** The level moved. */
  readonly changed: boolean;
  /** The state to keep, when anything but the evaluation instant changed; undefined otherwise. */
  readonly persist: ControllerState | undefined;
  readonly reason: string;
}

/** Where evaluation resumes: after the last one, at most MAX_REPLAY_MS back. */
function resumeAt(input: Pick<EvaluateInput, 'state' | 'evaluatedUntil' | 'now'>): number | undefined {
  const kept = input.state?.evaluatedAt;
  const from = Math.max(
    typeof kept === 'number' ? kept : Number.NEGATIVE_INFINITY,
    input.evaluatedUntil ?? Number.NEGATIVE_INFINITY,
  );
  if (!Number.isFinite(from)) return undefined;
  return Math.max(from, input.now - MAX_REPLAY_MS);
}

/** The first bucket instant a tick must read: the controller's look-back before where it resumes. */
export function replayFrom(input: Pick<EvaluateInput, 'state' | 'evaluatedUntil' | 'now'>): number {
  return (resumeAt(input) ?? input.now - MAX_REPLAY_MS) - CONTROLLER_HISTORY_MS;
}

function restoreOrStart(input: EvaluateInput): { controller: WindowController; restored: boolean } {
  const levels = input.levels;
  if (input.state !== undefined) {
    try {
      return {
        controller: WindowController.restore({ levels }, input.state as unknown as ControllerState),
        restored: true,
      };
    } catch {
      // Damaged or from other levels: start afresh, as a disk with no state would.
    }
  }
  const initial = levels[Math.min(Math.max(0, input.initialLevel), levels.length - 1)]!;
  return { controller: new WindowController({ levels, initial }), restored: false };
}

/**
 * Replays signal buckets into the disk's controller. Buckets before the resume point only rebuild
 * the signal ring; from there, time runs in SIGNAL_BUCKET_MS steps to `now`, recording each bucket as
 * time passes it and evaluating at every step, then once at `now`.
 */
export function evaluateWindow(input: EvaluateInput): WindowEvaluation {
  const { controller, restored } = restoreOrStart(input);
  const before = restored ? essence(controller.state()) : undefined;
  const startLevel = controller.snapshot().level;
  const resume = resumeAt(input);
  const floor = (resume ?? input.now - MAX_REPLAY_MS) - CONTROLLER_HISTORY_MS;
  const buckets = input.buckets.filter((b) => b.at >= floor && b.at <= input.now).sort((a, b) => a.at - b.at);
  let reason = 'no signals';
  let i = 0;
  const evalFrom = resume ?? buckets[0]?.at ?? input.now;
  const first = Math.floor((buckets[0]?.at ?? input.now) / SIGNAL_BUCKET_MS) * SIGNAL_BUCKET_MS;
  for (let t = first + SIGNAL_BUCKET_MS; t <= input.now; t += SIGNAL_BUCKET_MS) {
    while (i < buckets.length && buckets[i]!.at < t)
      for (const s of samplesOf(buckets[i++]!)) controller.record(s);
    if (t > evalFrom) {
      const d = controller.evaluate(t);
      if (d.changed) reason = d.reason;
    }
  }
  while (i < buckets.length) for (const s of samplesOf(buckets[i++]!)) controller.record(s);
  if (input.now > evalFrom || resume === undefined) {
    const d = controller.evaluate(input.now);
    if (d.changed || reason === 'no signals') reason = d.reason;
  }
  const state = controller.state();
  const level = state.level;
  return {
    level,
    window: input.levels[level]!,
    changed: level !== startLevel,
    persist: before === essence(state) ? undefined : state,
    reason,
  };
}
