// The one grant rule: budget, max-min fairness and windows under random lanes, and the same decisions
// from its three callers (the engine's Scheduler, the node's credit allocation, planGrants).
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import type { Descriptor } from '../../shared/engine/descriptors.ts';
import {
  fitsWindow,
  type Lane,
  type LaneQueue,
  planGrants,
  shareBudget,
} from '../../shared/engine/grant-rule.ts';
import { type Grant, Scheduler } from '../../shared/engine/scheduler.ts';
import { allocateCredit, type CreditSession } from '../../shared/net/credit.ts';

const KiB = 1024;
const sum = (xs: readonly number[]) => xs.reduce((a, b) => a + b, 0);

/** `count` descriptors of `bytes` each, made as the scheduler pulls them. */
function* descriptors(bytes: number, count = Number.POSITIVE_INFINITY): Generator<Descriptor> {
  for (let seq = 0; seq < count; seq++) {
    const offset = seq * bytes;
    yield { seq, offset, length: bytes, bytes, extents: [{ offset, length: bytes }] };
  }
}

/** A lane as planGrants takes it: in-flight bytes within the span, re-grants at the front of its queue. */
const laneQueueArb: fc.Arbitrary<LaneQueue> = fc
  .record({
    window: fc.integer({ min: 1, max: 64 }).map((k) => k * 16 * KiB),
    inflight: fc.integer({ min: 0, max: 32 }).map((k) => k * 16 * KiB),
    finished: fc.integer({ min: 0, max: 32 }).map((k) => k * 16 * KiB),
    upcoming: fc.array(
      fc.integer({ min: 1, max: 16 }).map((k) => k * 16 * KiB),
      { maxLength: 40 },
    ),
    inSpan: fc.nat(3),
    lastGrant: fc.integer({ min: -1, max: 50 }),
    cap: fc.option(
      fc.integer({ min: 1, max: 64 }).map((k) => k * 16 * KiB),
      { nil: undefined },
    ),
  })
  .map(({ finished, inSpan, ...l }) => ({
    ...l,
    span: l.inflight + (l.inflight > 0 ? finished : 0),
    inSpan: Math.min(inSpan, l.upcoming.length),
  }));

describe('grant rule', () => {
  describe('(a) the node budget', () => {
    it('is never exceeded by planGrants', () => {
      fc.assert(
        fc.property(
          fc.array(laneQueueArb, { minLength: 1, maxLength: 6 }),
          fc.integer({ min: 1, max: 256 }).map((k) => k * 16 * KiB),
          fc.nat(),
          (lanes, limit, other) => {
            // Prepare: what the lanes hold is in flight, plus perhaps other disks' bytes.
            const inflight = Math.min(limit, sum(lanes.map((l) => l.inflight)) + (other % limit));
            // Act
            const plan = planGrants(lanes, { limit, inflight });
            // Assess: what was granted fits the budget left; each lane's in-flight bytes add up.
            const granted = lanes.map((l, i) => sum(l.upcoming.slice(0, plan.grants[i])));
            expect(inflight + sum(granted)).toBeLessThanOrEqual(limit);
            lanes.forEach((l, i) => {
              expect(plan.inflight[i]).toBe(l.inflight + granted[i]!);
              if (l.cap !== undefined && plan.grants[i]! > 0)
                expect(plan.inflight[i]).toBeLessThanOrEqual(l.cap);
            });
            expect(plan.order.length).toBe(sum(plan.grants));
          },
        ),
        { numRuns: 500 },
      );
    });

    it('is never exceeded by the scheduler under random grants, completions, releases, lags and resizes', () => {
      const action = fc.record({
        kind: fc.constantFrom('grant', 'grant', 'grant', 'complete', 'complete', 'release', 'lag', 'resize'),
        pick: fc.nat(),
        bytes: fc.integer({ min: 0, max: 512 }).map((k) => k * KiB),
      });
      fc.assert(
        fc.property(
          fc.array(
            fc.record({
              chunk: fc.integer({ min: 1, max: 64 }).map((k) => k * KiB),
              count: fc.integer({ min: 0, max: 50 }),
              window: fc.integer({ min: 16, max: 512 }).map((k) => k * KiB),
            }),
            { minLength: 1, maxLength: 5 },
          ),
          fc.integer({ min: 64, max: 1024 }).map((k) => k * KiB),
          fc.array(action, { maxLength: 400 }),
          (disks, budget, actions) => {
            // Prepare
            const s = new Scheduler(budget);
            disks.forEach((d, i) => {
              s.addDisk(`d${i}`, descriptors(d.chunk, d.count), d.window);
            });
            const outstanding: Grant[] = [];
            const check = () => {
              expect(s.inflight).toBe(sum(outstanding.map((g) => g.descriptor.bytes)));
              expect(s.inflight).toBeLessThanOrEqual(budget);
            };
            // Act: a random interleaving, checked after every step.
            for (const a of actions) {
              const disk = `d${a.pick % disks.length}`;
              if (a.kind === 'grant') {
                const g = s.next();
                if (g) outstanding.push(g);
              } else if (a.kind === 'lag') s.setLag(disk, a.bytes);
              else if (a.kind === 'resize') s.setWindow(disk, Math.max(KiB, a.bytes));
              else if (outstanding.length > 0) {
                const [g] = outstanding.splice(a.pick % outstanding.length, 1);
                if (a.kind === 'complete') s.complete(g!);
                else s.release(g!);
              }
              check();
            }
          },
        ),
        { numRuns: 300 },
      );
    });
  });

  describe('(b) no disk starves: max-min fairness', () => {
    it('every lane with work and an empty span gets a grant before any lane gets a second', () => {
      const maxChunk = 16 * 16 * KiB;
      fc.assert(
        fc.property(
          fc.array(laneQueueArb, { minLength: 1, maxLength: 6 }),
          fc.nat(4 * maxChunk),
          (queues, extra) => {
            // Prepare: every lane empty, with work; a budget of at least one chunk per lane.
            const lanes = queues.map((l) => ({
              ...l,
              span: 0,
              inflight: 0,
              inSpan: 0,
              cap: undefined,
              upcoming: l.upcoming.length > 0 ? l.upcoming : [maxChunk],
            }));
            const limit = lanes.length * maxChunk + extra;
            // Act
            const plan = planGrants(lanes, { limit, inflight: 0 });
            // Assess: the first round reaches every lane.
            expect(new Set(plan.order.slice(0, lanes.length)).size).toBe(lanes.length);
          },
        ),
        { numRuns: 500 },
      );
    });

    it('lanes limited by neither their window nor their work end within one grant of each other', () => {
      fc.assert(
        fc.property(
          fc.array(
            fc.record({
              window: fc.integer({ min: 1, max: 64 }).map((k) => k * 16 * KiB),
              count: fc.integer({ min: 1, max: 40 }),
              lastGrant: fc.integer({ min: -1, max: 50 }),
            }),
            { minLength: 1, maxLength: 6 },
          ),
          fc.integer({ min: 1, max: 16 }).map((k) => k * 16 * KiB),
          fc.integer({ min: 1, max: 128 }).map((k) => k * 16 * KiB),
          (specs, unit, limit) => {
            // Prepare: empty lanes, one grant size.
            const lanes: LaneQueue[] = specs.map((l) => ({
              window: l.window,
              span: 0,
              inflight: 0,
              lastGrant: l.lastGrant,
              upcoming: Array.from({ length: l.count }, () => unit),
            }));
            // Act
            const plan = planGrants(lanes, { limit, inflight: 0 });
            // Assess: among lanes that could still take a grant (the budget stopped them), in-flight
            // bytes differ by at most one grant.
            const open = lanes
              .map((l, i) => ({ l, i }))
              .filter(({ l, i }) => plan.grants[i]! < l.upcoming.length && plan.limits[i] !== 'window')
              .map(({ i }) => plan.inflight[i]!);
            if (open.length > 0) expect(Math.max(...open) - Math.min(...open)).toBeLessThanOrEqual(unit);
          },
        ),
        { numRuns: 500 },
      );
    });

    it('a lane granted in a plan ends at most its grant above any lane that could still take one', () => {
      fc.assert(
        fc.property(
          fc.array(
            fc.record({
              window: fc.integer({ min: 1, max: 64 }).map((k) => k * 16 * KiB),
              inflight: fc.integer({ min: 0, max: 32 }).map((k) => k * 16 * KiB),
              unit: fc.integer({ min: 1, max: 16 }).map((k) => k * 16 * KiB),
              count: fc.integer({ min: 0, max: 40 }),
              lastGrant: fc.integer({ min: -1, max: 50 }),
            }),
            { minLength: 1, maxLength: 6 },
          ),
          fc.integer({ min: 1, max: 256 }).map((k) => k * 16 * KiB),
          (specs, limit) => {
            // Prepare: lanes already holding bytes, each with its own grant size.
            const lanes: LaneQueue[] = specs.map((l) => ({
              window: l.window,
              span: l.inflight,
              inflight: l.inflight,
              lastGrant: l.lastGrant,
              upcoming: Array.from({ length: l.count }, () => l.unit),
            }));
            const inflight = Math.min(limit, sum(lanes.map((l) => l.inflight)));
            // Act
            const plan = planGrants(lanes, { limit, inflight });
            // Assess
            lanes.forEach((li, i) => {
              if (plan.grants[i] === 0) return;
              lanes.forEach((lj, j) => {
                const end: Lane = {
                  ...lj,
                  span: lj.span + plan.inflight[j]! - lj.inflight,
                  inflight: plan.inflight[j]!,
                  next: lj.upcoming[plan.grants[j]!],
                };
                if (fitsWindow(end))
                  expect(plan.inflight[i]! - li.upcoming[0]!).toBeLessThanOrEqual(end.inflight);
              });
            });
          },
        ),
        { numRuns: 500 },
      );
    });
  });

  it('(c) the scheduler, the node and planGrants make the same grants in the same order', () => {
    const action = fc.oneof(
      fc.constant({ kind: 'allocate' as const, lane: 0 }),
      fc.record({ kind: fc.constant('complete' as const), lane: fc.nat() }),
    );
    fc.assert(
      fc.property(
        fc.array(
          fc.record({
            unit: fc.integer({ min: 1, max: 16 }).map((k) => k * 64 * KiB),
            window: fc.integer({ min: 1, max: 64 }).map((k) => k * 64 * KiB),
          }),
          { minLength: 1, maxLength: 5 },
        ),
        fc.integer({ min: 1, max: 128 }).map((k) => k * 64 * KiB),
        fc.array(action, { minLength: 1, maxLength: 60 }),
        (specs, budget, actions) => {
          // Prepare: each disk sends chunks of its own size and always has more; the node's sessions
          // have proven themselves long ago, so only their windows cap them.
          const scheduler = new Scheduler(budget);
          specs.forEach((d, i) => {
            scheduler.addDisk(`d${i}`, descriptors(d.unit), d.window);
          });
          const outstanding: Grant[][] = specs.map(() => []);
          const sessions: CreditSession[] = specs.map((d) => ({
            wantsCredit: true,
            held: 0,
            unit: d.unit,
            cap: Math.max(d.window, d.unit),
            proven: true,
            lastGrantTick: -1,
          }));
          const queues = specs.map((d) => ({ window: d.window, span: 0, inflight: 0, lastGrant: -1 }));
          let nodeTick = 0;
          let planTick = 0;
          for (const a of actions) {
            if (a.kind === 'complete') {
              // The lane's oldest grant completes: span and in-flight bytes shrink alike for all three.
              const i = a.lane % specs.length;
              const g = outstanding[i]!.shift();
              if (g === undefined) continue;
              scheduler.complete(g);
              sessions[i] = { ...sessions[i]!, held: sessions[i]!.held - specs[i]!.unit };
              queues[i]!.span -= specs[i]!.unit;
              queues[i]!.inflight -= specs[i]!.unit;
              continue;
            }
            // Act: each caller grants until it stops.
            const bySchedulerOrder: number[] = [];
            for (let g = scheduler.next(); g; g = scheduler.next()) {
              const i = Number(g.disk.slice(1));
              outstanding[i]!.push(g);
              bySchedulerOrder.push(i);
            }
            const credit = allocateCredit(sessions, budget);
            for (const { session, bytes } of credit.grants) {
              const s = sessions[session]!;
              sessions[session] = { ...s, held: s.held + bytes, lastGrantTick: nodeTick++ };
            }
            const plan = planGrants(
              queues.map((q, i) => ({
                ...q,
                upcoming: Array.from(
                  { length: Math.ceil(q.window / specs[i]!.unit) + 1 },
                  () => specs[i]!.unit,
                ),
              })),
              { limit: budget, inflight: sum(queues.map((q) => q.inflight)) },
            );
            for (const i of plan.order) {
              queues[i]!.span += specs[i]!.unit;
              queues[i]!.inflight += specs[i]!.unit;
              queues[i]!.lastGrant = planTick++;
            }
            // Assess: the same order, and the same lane held back by the budget.
            expect(credit.grants.map((g) => g.session)).toEqual(bySchedulerOrder);
            expect(plan.order).toEqual(bySchedulerOrder);
            const planHeld = plan.limits.indexOf('budget');
            expect(credit.budgetHeld).toBe(planHeld < 0 ? undefined : planHeld);
            if (planHeld >= 0) expect(scheduler.stats(`d${planHeld}`).budgetLimited).toBe(true);
          }
        },
      ),
      { numRuns: 300 },
    );
  });

  it('(d) shareBudget: shares never sum past the budget, and every lane gets a unit when the budget holds one each', () => {
    fc.assert(
      fc.property(
        fc.array(
          fc.record({
            window: fc.integer({ min: 1, max: 64 }).map((k) => k * 64 * KiB),
            inflight: fc.integer({ min: 0, max: 16 }).map((k) => k * 64 * KiB),
            lastGrant: fc.integer({ min: -1, max: 50 }),
          }),
          { minLength: 1, maxLength: 8 },
        ),
        fc.integer({ min: 1, max: 16 }).map((k) => k * 64 * KiB),
        fc.integer({ min: 0, max: 256 }).map((k) => k * 64 * KiB),
        fc.boolean(),
        (specs, unit, extra, fresh) => {
          // Prepare: fresh lanes hold nothing yet; the budget is what they hold plus `extra` free.
          const lanes = specs.map((l) => ({
            ...l,
            span: fresh ? 0 : l.inflight,
            inflight: fresh ? 0 : l.inflight,
          }));
          const held = sum(lanes.map((l) => l.inflight));
          const limit = held + extra;
          // Act
          const shares = shareBudget(lanes, { limit, inflight: held }, unit);
          // Assess
          expect(sum(shares)).toBeLessThanOrEqual(limit);
          lanes.forEach((l, i) => {
            expect(shares[i]).toBeGreaterThanOrEqual(l.inflight);
            if (fresh && extra >= lanes.length * unit) expect(shares[i]).toBeGreaterThanOrEqual(unit);
          });
        },
      ),
      { numRuns: 500 },
    );
  });

  it('(e) fitsWindow: an empty span always takes one grant, whatever the window', () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 1, max: 1 << 30 }),
        fc.integer({ min: 0, max: 1 << 30 }),
        fc.option(fc.nat(), { nil: undefined }),
        fc.boolean(),
        fc.integer({ min: -1, max: 100 }),
        (next, window, capExtra, nextInSpan, lastGrant) => {
          // A cap, if any, is a share of the budget that holds at least this grant.
          const cap = capExtra === undefined ? undefined : next + capExtra;
          const lane: Lane = { window, span: 0, inflight: 0, next, nextInSpan, lastGrant, cap };
          expect(fitsWindow(lane)).toBe(true);
          expect(fitsWindow({ ...lane, next: undefined })).toBe(false);
        },
      ),
      { numRuns: 500 },
    );
  });
});
