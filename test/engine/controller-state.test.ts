// The window controller's persisted state: a controller rebuilt from state() (through JSON) carries on
// exactly as one that never stopped.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import {
  type ChunkSample,
  type ControllerDecision,
  type ControllerOptions,
  type ControllerState,
  WindowController,
} from '../../shared/engine/controller.ts';
import { ConfigError } from '../../shared/engine/errors.ts';

// Short holds so that a few seconds of random signals climb, step down and press on the budget.
const OPTS: ControllerOptions = {
  levels: [1, 2, 4, 8, 16],
  initial: 4,
  tunables: {
    faultCooldownMs: 500,
    latencyHoldMs: 500,
    throughputReferenceMs: 2000,
    pressureHoldMs: 1000,
    stableMs: 1000,
    minClimbSamples: 2,
    climbHoldMs: 1000,
    maxClimbHoldMs: 8000,
    baselineHorizonMs: 6000,
  },
};

type Event =
  | { kind: 'sample'; dt: number; sample: Omit<ChunkSample, 'at'> }
  | { kind: 'evaluate'; dt: number }
  /** From here on latencies are `factor` times the sample's own (a queue builds or drains), and in a storm every attempt is throttled. */
  | { kind: 'regime'; dt: number; factor: number; storm: boolean };

const sampleArb = fc.record({
  bytes: fc.integer({ min: 0, max: 4 * 1024 * 1024 }),
  latencyMs: fc.integer({ min: 5, max: 8 }),
  // The odd throttle or error, one in a hundred attempts; storms come from regimes.
  throttled: fc.integer({ min: 0, max: 99 }).map((n) => n === 0),
  error: fc.integer({ min: 0, max: 99 }).map((n) => n === 0),
  windowLimited: fc.constantFrom(true, true, true, false),
  nodePressure: fc.constantFrom(false, false, true),
});

const eventArb: fc.Arbitrary<Event> = fc.oneof(
  {
    weight: 40,
    arbitrary: fc.record({ kind: fc.constant('sample' as const), dt: fc.nat(60), sample: sampleArb }),
  },
  { weight: 10, arbitrary: fc.record({ kind: fc.constant('evaluate' as const), dt: fc.nat(400) }) },
  {
    weight: 1,
    arbitrary: fc.record({
      kind: fc.constant('regime' as const),
      dt: fc.nat(60),
      factor: fc.constantFrom(1, 1, 4, 8),
      storm: fc.constantFrom(false, false, false, true),
    }),
  },
);

type Step = { readonly sample: ChunkSample } | { readonly evaluate: number };

/** The events on a timeline from 0: each sample at its instant with its regime's latency and storm. */
function timeline(events: readonly Event[]): Step[] {
  const steps: Step[] = [];
  let t = 0;
  let regime = { factor: 1, storm: false };
  for (const e of events) {
    t += e.dt;
    if (e.kind === 'evaluate') steps.push({ evaluate: t });
    else if (e.kind === 'regime') regime = e;
    else {
      const throttled = regime.storm || e.sample.throttled;
      steps.push({
        sample: { ...e.sample, throttled, latencyMs: e.sample.latencyMs * regime.factor, at: t },
      });
    }
  }
  return steps;
}

/** Records and evaluates as the steps say; returns the decisions. */
function play(c: WindowController, steps: readonly Step[]): ControllerDecision[] {
  const decisions: ControllerDecision[] = [];
  for (const step of steps) {
    if ('evaluate' in step) decisions.push(c.evaluate(step.evaluate));
    else c.record(step.sample);
  }
  return decisions;
}

describe('WindowController state', () => {
  it('restore(state()) continues exactly as an uninterrupted controller on the same samples', () => {
    let moves = 0;
    fc.assert(
      fc.property(fc.array(eventArb, { minLength: 100, maxLength: 800 }), fc.nat(), (events, cut) => {
        const steps = timeline(events);
        const at = cut % (steps.length + 1);
        // Prepare: one controller runs through; the other stops at `at`.
        const whole = new WindowController(OPTS);
        const reference = play(whole, steps);
        const first = new WindowController(OPTS);
        const before = play(first, steps.slice(0, at));
        // Act: persist as JSON, restore, record again the samples within the look-back, carry on.
        const state = JSON.parse(JSON.stringify(first.state())) as ControllerState;
        const second = WindowController.restore(OPTS, state);
        const since =
          state.evaluatedAt === undefined ? Number.NEGATIVE_INFINITY : state.evaluatedAt - second.historyMs;
        for (const step of steps.slice(0, at))
          if ('sample' in step && step.sample.at >= since) second.record(step.sample);
        const after = play(second, steps.slice(at));
        // Assess: the same decisions, and the same state at the end.
        expect([...before, ...after]).toEqual(reference);
        expect(second.state()).toEqual(whole.state());
        moves += reference.filter((d) => d.changed).length;
      }),
      { numRuns: 200 },
    );
    // The property ran through climbs and step-downs, not only holds.
    expect(moves).toBeGreaterThan(0);
  });

  it('is plain JSON data: no undefined, no infinities, equal to its own round trip', () => {
    // Prepare: a fresh controller, and one that has evaluated and stepped down.
    const fresh = new WindowController(OPTS);
    const used = new WindowController(OPTS);
    for (let t = 0; t < 200; t += 10)
      used.record({
        at: t,
        bytes: 0,
        latencyMs: 0,
        throttled: true,
        error: false,
        windowLimited: false,
        nodePressure: false,
      });
    // Act
    const decision = used.evaluate(200);
    // Assess
    expect(decision.changed).toBe(true);
    expect(fresh.state()).toEqual({ level: 2, climbHoldMs: 1000, baseline: [] });
    const state = used.state();
    expect(state).toStrictEqual(JSON.parse(JSON.stringify(state)));
    expect(state).toMatchObject({ level: 1, climbHoldMs: 2000, startedAt: 0, lastChangeAt: 200 });
    expect(state.lastDecreaseAt).toBe(200);
  });

  it('refuses a state whose level the levels do not have, and clamps the climb hold into the tunables', () => {
    expect(() => WindowController.restore(OPTS, { level: 5, climbHoldMs: 1000, baseline: [] })).toThrow(
      ConfigError,
    );
    expect(() =>
      WindowController.restore(OPTS, { level: 0, climbHoldMs: 1000, startedAt: Number.NaN, baseline: [] }),
    ).toThrow(/startedAt/);
    const c = WindowController.restore(OPTS, { level: 4, climbHoldMs: 60_000, baseline: [] });
    expect(c.window).toBe(16);
    expect(c.state().climbHoldMs).toBe(8000);
  });
});
