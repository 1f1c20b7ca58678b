// Tests of the adaptive window controller against scripted signal traces on a simulated clock.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import {
  type ChunkSample,
  type ControllerDecision,
  DEFAULT_CONTROLLER_TUNABLES,
  WindowController,
} from '../../shared/engine/controller.ts';
import { ConfigError } from '../../shared/engine/errors.ts';
import { seededRandom } from '../../shared/engine/random.ts';
import { MiB } from '../../shared/engine/units.ts';

const LEVELS = [16, 24, 32, 48, 64].map((n) => n * MiB);
const BOTTOM = 16 * MiB;
const START = 32 * MiB;
const TOP = 64 * MiB;
const STABLE_MS = DEFAULT_CONTROLLER_TUNABLES.stableMs;
const CLIMB_HOLD_MS = DEFAULT_CONTROLLER_TUNABLES.climbHoldMs;

/** What a chunk finishing at time `t` looked like; unset flags are false. */
interface Signal {
  latencyMs: number;
  throttled?: boolean;
  error?: boolean;
  windowLimited?: boolean;
  nodePressure?: boolean;
  bytes?: number;
}

/** `t`: ms since the trace began; `window`: the controller's window now, for traces that react to it. */
type Trace = (t: number, window: number) => Signal;

interface Step extends ControllerDecision {
  at: number;
}

/**
 * Replays a trace: `chunksPerSecond` samples a second, evaluating every `tickMs` after the samples
 * that finished by then, as the pipeline's tick does. Returns every decision.
 */
function replay(
  controller: WindowController,
  trace: Trace,
  opts: { durationMs: number; startMs?: number; chunksPerSecond?: number; tickMs?: number },
): Step[] {
  const { durationMs, startMs = 0, chunksPerSecond = 100, tickMs = 250 } = opts;
  const gap = 1000 / chunksPerSecond;
  const steps: Step[] = [];
  let next = gap;
  for (let tick = tickMs; tick <= durationMs; tick += tickMs) {
    for (; next <= tick; next += gap)
      controller.record(sample(startMs + next, trace(next, controller.window)));
    steps.push({ at: startMs + tick, ...controller.evaluate(startMs + tick) });
  }
  return steps;
}

function sample(at: number, s: Signal): ChunkSample {
  const failed = (s.throttled ?? false) || (s.error ?? false);
  return {
    at,
    // Failed attempts carry no payload or latency, as the pipeline reports them.
    bytes: failed ? 0 : (s.bytes ?? MiB),
    latencyMs: failed ? 0 : s.latencyMs,
    throttled: s.throttled ?? false,
    error: s.error ?? false,
    windowLimited: s.windowLimited ?? false,
    nodePressure: s.nodePressure ?? false,
  };
}

/** Latency `ms` with uniform relative jitter of ±`jitter`. */
function jittered(ms: number, jitter: number, random: () => number): number {
  return ms * (1 + jitter * (2 * random() - 1));
}

const changes = (steps: Step[]) => steps.filter((s) => s.changed);
const climbs = (steps: Step[]) => steps.filter((s) => s.changed && s.reason.startsWith('up'));
const drops = (steps: Step[]) => steps.filter((s) => s.changed && s.reason.startsWith('down'));

function controller(initial = START): WindowController {
  return new WindowController({ levels: LEVELS, initial });
}

describe('WindowController', () => {
  it('steps down to the bottom in a throttling storm and stays there while it lasts', () => {
    // Prepare: 30% of attempts throttled for 10 s, the rest healthy and window-limited.
    const random = seededRandom(1);
    const c = controller(START);
    const storm: Trace = () => ({ latencyMs: 50, throttled: random() < 0.3, windowLimited: true });

    // Act
    const steps = replay(c, storm, { durationMs: 10_000 });

    // Assess: at the bottom within a few evaluations, never climbing while the storm rages.
    const reached = steps.find((s) => s.window === BOTTOM);
    expect(reached?.at).toBeLessThanOrEqual(2000);
    expect(steps.filter((s) => s.at >= reached!.at).every((s) => s.window === BOTTOM)).toBe(true);
    expect(climbs(steps)).toHaveLength(0);
    expect(drops(steps)[0]?.reason).toMatch(/throttled/);
  });

  it('climbs to the top level on a clean high-latency link and stays', () => {
    // Prepare: 200 ms ± 5%, constant in the mean, so it is a long link, not a queue.
    const random = seededRandom(2);
    const c = controller(START);
    const longLink: Trace = () => ({ latencyMs: jittered(200, 0.05, random), windowLimited: true });

    // Act
    const steps = replay(c, longLink, { durationMs: 60_000 });

    // Assess: one level at a time (32 -> 48 -> 64), then nothing more.
    expect(changes(steps).map((s) => s.window)).toEqual([48 * MiB, TOP]);
    expect(changes(steps)[1]!.at).toBeLessThanOrEqual(15_000);
    expect(c.window).toBe(TOP);
  });

  it.each([100, 10])('does not oscillate on a noisy but healthy trace at %i chunks/s', (chunksPerSecond) => {
    // Prepare: ±30% latency jitter, mostly window-limited, one isolated throttle every 20 s, 5 minutes.
    // At 10 chunks/s one throttle is 10% of a second's attempts: only its isolation keeps it harmless.
    const random = seededRandom(3);
    const c = controller(START);
    let chunk = 0;
    const noisy: Trace = () => {
      chunk++;
      return {
        latencyMs: jittered(100, 0.3, random),
        windowLimited: random() < 0.8,
        throttled: chunk % (20 * chunksPerSecond) === 10 * chunksPerSecond,
      };
    };

    // Act
    const steps = replay(c, noisy, { durationMs: 300_000, chunksPerSecond });

    // Assess
    expect(c.snapshot().throttles).toBe(15);
    expect(changes(steps).length).toBeLessThanOrEqual(4);
    expect(drops(steps)).toHaveLength(0);
    expect(steps.every((s) => s.window > BOTTOM)).toBe(true);
    expect(c.window).toBe(TOP);
  });

  it('pays for one short burst of throttles with one level', () => {
    // Prepare: 40% throttled for 600 ms, clean before and after.
    const random = seededRandom(8);
    const c = controller(START);
    const burst: Trace = (t) => ({ latencyMs: 50, throttled: t > 100 && t <= 700 && random() < 0.4 });

    // Act
    const steps = replay(c, burst, { durationMs: 5000 });

    // Assess
    expect(drops(steps).map((s) => s.window)).toEqual([24 * MiB]);
  });

  it('counts a burst once even when the fault interval outlasts the cool-down', () => {
    // Prepare: faults are remembered for 3 s but the cool-down is 1 s; one 500 ms burst.
    const random = seededRandom(9);
    const c = new WindowController({ levels: LEVELS, initial: START, tunables: { faultIntervalMs: 3000 } });
    const burst: Trace = (t) => ({ latencyMs: 50, throttled: t > 100 && t <= 600 && random() < 0.4 });

    // Act
    const steps = replay(c, burst, { durationMs: 5000 });

    // Assess: still in memory after the cool-down, but already answered.
    expect(drops(steps)).toHaveLength(1);
  });

  it('recovers gradually after a storm, waiting longer before the first climb', () => {
    // Prepare: a 10 s storm, then a clean window-limited link for two minutes.
    const random = seededRandom(4);
    const c = controller(START);
    const trace: Trace = (t) => ({
      latencyMs: 80,
      throttled: t <= 10_000 && random() < 0.3,
      windowLimited: true,
    });

    // Act
    const steps = replay(c, trace, { durationMs: 130_000 });

    // Assess: back at the top, one level at a time, never two climbs closer than the base hold, and
    // the first climb held back longer than the base hold (hysteresis after two step-downs).
    const up = climbs(steps);
    const lastDrop = drops(steps).at(-1)!;
    expect(c.window).toBe(TOP);
    expect(up.map((s) => s.window)).toEqual([24, 32, 48, 64].map((n) => n * MiB));
    expect(up[0]!.at).toBeGreaterThanOrEqual(10_000 + STABLE_MS);
    expect(up[0]!.at - lastDrop.at).toBeGreaterThanOrEqual(4 * CLIMB_HOLD_MS);
    for (let i = 1; i < up.length; i++) {
      expect(up[i]!.at - up[i - 1]!.at).toBeGreaterThanOrEqual(CLIMB_HOLD_MS);
    }
    expect(up[1]!.at - up[0]!.at).toBeGreaterThan(CLIMB_HOLD_MS);
  });

  it('settles on a saturated path instead of climbing into its own queue', () => {
    // Prepare: the target is the bottleneck, so latency grows with the window (queueing) and
    // throughput stays flat. Starts at the bottom, where latency is the unloaded 50 ms.
    const c = controller(BOTTOM);
    const saturated: Trace = (_, window) => ({ latencyMs: 50 * (window / BOTTOM), windowLimited: true });

    // Act
    const steps = replay(c, saturated, { durationMs: 180_000 });

    // Assess: one climb to 24 MiB (1.5x latency), then it holds: no climb, no step-down.
    expect(changes(steps).map((s) => s.window)).toEqual([24 * MiB]);
    expect(steps.at(-1)?.reason).toMatch(/1\.5x baseline/);
  });

  it('does not climb while isolated throttles keep coming', () => {
    // Prepare: one throttle every 3 s, too sparse to step down, too frequent to call the link stable.
    const c = controller(START);
    let chunk = 0;
    const trickle: Trace = () => ({ latencyMs: 50, windowLimited: true, throttled: ++chunk % 300 === 0 });

    // Act
    const steps = replay(c, trickle, { durationMs: 60_000 });

    // Assess
    expect(changes(steps)).toHaveLength(0);
    expect(c.snapshot().throttles).toBe(20);
  });

  it('never climbs when the window is not the limit', () => {
    // Prepare: a clean, fast link, but the source (not the window) limits the disk.
    const random = seededRandom(5);
    const c = controller(START);
    const sourceBound: Trace = () => ({ latencyMs: jittered(50, 0.1, random), windowLimited: false });

    // Act
    const steps = replay(c, sourceBound, { durationMs: 60_000 });

    // Assess
    expect(changes(steps)).toHaveLength(0);
    expect(steps.at(-1)?.reason).toMatch(/window was the limit for only 0/);
  });

  it('does not climb on too few chunks to judge', () => {
    // Prepare: a clean, window-limited disk finishing one chunk a second.
    const c = controller(START);

    // Act
    const steps = replay(c, () => ({ latencyMs: 50, windowLimited: true }), {
      durationMs: 60_000,
      chunksPerSecond: 1,
    });

    // Assess
    expect(changes(steps)).toHaveLength(0);
    expect(steps.at(-1)?.reason).toMatch(/only \d chunks/);
  });

  it('does not climb under sustained node pressure and eventually gives ground', () => {
    // Prepare: every chunk held back by the node budget. windowLimited is set too, so the test
    // fails unless node pressure on its own stops the climb.
    const c = controller(START);
    const pressured: Trace = () => ({ latencyMs: 50, windowLimited: true, nodePressure: true });

    // Act
    const steps = replay(c, pressured, { durationMs: 30_000 });

    // Assess: no climb; the first step-down only after pressure lasted pressureHoldMs.
    expect(climbs(steps)).toHaveLength(0);
    const first = drops(steps)[0];
    expect(first?.reason).toMatch(/node budget/);
    expect(first!.at).toBeGreaterThanOrEqual(DEFAULT_CONTROLLER_TUNABLES.pressureHoldMs);
    expect(c.window).toBeLessThan(START);
  });

  it('steps down when latency rises 5x over baseline with flat throughput', () => {
    // Prepare: 20 s at 50 ms (the baseline), then 250 ms, at the same chunk rate (flat throughput).
    const random = seededRandom(7);
    const c = controller(START);
    const queueing: Trace = (t) => ({ latencyMs: jittered(t < 20_000 ? 50 : 250, 0.1, random) });

    // Act
    const steps = replay(c, queueing, { durationMs: 40_000 });

    // Assess: steady before the rise, down within a few seconds of it, slower than faults would.
    expect(steps.filter((s) => s.at < 20_000 && s.changed)).toHaveLength(0);
    const first = drops(steps)[0];
    expect(first?.reason).toMatch(/latency .* baseline/);
    expect(first!.at).toBeGreaterThanOrEqual(20_000 + DEFAULT_CONTROLLER_TUNABLES.latencyHoldMs);
    expect(first!.at).toBeLessThanOrEqual(24_000);
    expect(c.window).toBe(BOTTOM);
  });

  it('holds when latency rises but throughput grows with it', () => {
    // Prepare: latency and delivered bytes both rise 5x: a wider pipe being filled, not a queue.
    const c = controller(START);
    const growing: Trace = (t) => {
      const f = t < 20_000 ? 1 : Math.min(5, 1 + (t - 20_000) / 2000);
      return { latencyMs: 50 * f, bytes: MiB * f ** 2 };
    };

    // Act
    const steps = replay(c, growing, { durationMs: 26_000 });

    // Assess: the ramp reaches 5x at 28 s; until then throughput grows and nothing drops.
    expect(drops(steps)).toHaveLength(0);
  });

  it.each([
    ['no levels', { levels: [], initial: START }],
    ['levels not ascending', { levels: [32 * MiB, 16 * MiB], initial: START }],
    ['a repeated level', { levels: [16 * MiB, 16 * MiB, 32 * MiB], initial: START }],
    ['a level that is not a whole number of bytes', { levels: [0.5, 16 * MiB], initial: 16 * MiB }],
    ['a zero level', { levels: [0, 16 * MiB], initial: 16 * MiB }],
    ['an initial window that is not a level', { levels: LEVELS, initial: 40 * MiB }],
    ['an unknown tunable', { levels: LEVELS, initial: START, tunables: { stableMS: 5000 } }],
    ['a negative tunable', { levels: LEVELS, initial: START, tunables: { faultRate: -1 } }],
    ['a share above 1', { levels: LEVELS, initial: START, tunables: { windowLimitedShare: 2 } }],
    [
      'step-down ratio under the climb ceiling',
      { levels: LEVELS, initial: START, tunables: { latencyStepDownRatio: 1.2 } },
    ],
  ])('rejects %s with a ConfigError', (_, opts) => {
    expect(() => new WindowController(opts as ConstructorParameters<typeof WindowController>[0])).toThrow(
      ConfigError,
    );
  });

  it('reports its state in a snapshot', () => {
    const c = controller(START);
    replay(c, () => ({ latencyMs: 100, windowLimited: true }), { durationMs: 2000 });

    const s = c.snapshot();

    expect(s).toMatchObject({ window: START, level: 2, levels: 5, samples: 200, throttles: 0, stepsUp: 0 });
    expect(s.baselineLatencyMs).toBe(100);
    expect(s.throughputBytesPerSec).toBeGreaterThan(90 * MiB);
    expect(s.throughputBytesPerSec).toBeLessThan(110 * MiB);
  });

  it('keeps the window on a level and moves at most one level per evaluation, deterministically', () => {
    // Decision: even a severe storm moves one level per evaluate; the fault cool-down, not a bigger
    // jump, decides how fast it reaches the bottom.
    // Flags are rare enough (a few percent of faults) that random traces do climb as well as drop.
    const chance = (percent: number) => fc.integer({ min: 0, max: 99 }).map((n) => n < percent);
    const event = fc.oneof(
      {
        weight: 10,
        arbitrary: fc.record({
          kind: fc.constant('sample' as const),
          dt: fc.integer({ min: 0, max: 200 }),
          bytes: fc.integer({ min: 0, max: 2 * MiB }),
          latencyMs: fc.oneof(fc.double({ min: 0, max: 5000, noNaN: true }), fc.constant(0)),
          throttled: chance(3),
          error: chance(2),
          windowLimited: chance(80),
          nodePressure: chance(10),
        }),
      },
      {
        weight: 1,
        arbitrary: fc.record({
          kind: fc.constant('evaluate' as const),
          dt: fc.integer({ min: 0, max: 3000 }),
        }),
      },
    );
    fc.assert(
      fc.property(
        fc.constantFrom(...LEVELS),
        fc.array(event, { minLength: 100, maxLength: 1500, size: 'max' }),
        fc.integer({ min: -10_000, max: 10_000_000 }),
        (initial, events, origin) => {
          const run = () => {
            const c = new WindowController({ levels: LEVELS, initial });
            const decisions: ControllerDecision[] = [];
            let now = origin;
            let level = LEVELS.indexOf(initial);
            for (const e of events) {
              now += e.dt;
              if (e.kind === 'sample') {
                c.record({ ...e, at: now });
                continue;
              }
              const d = c.evaluate(now);
              expect(LEVELS).toContain(d.window);
              expect(d.window).toBe(LEVELS[d.level]);
              expect(c.window).toBe(d.window);
              expect(Math.abs(d.level - level)).toBeLessThanOrEqual(1);
              expect(d.changed).toBe(d.level !== level);
              level = d.level;
              decisions.push(d);
            }
            return decisions;
          };
          expect(run()).toEqual(run());
        },
      ),
    );
  });
});
