// The node's credit allocation without sockets: the grant rule over session views, and the node's own
// filter for sessions that have not sent a chunk yet.
import { describe, expect, it } from 'vitest';
import { MiB } from '../../shared/engine/units.ts';
import {
  allocateCredit,
  type CreditSession,
  creditStep,
  INITIAL_GRANT_UNIT,
  UNPROVEN_LARGE_SHARE,
} from '../../shared/net/credit.ts';

/** A session moving data, with room for `cap` bytes; fields as given. */
function session(over: Partial<CreditSession> = {}): CreditSession {
  return { wantsCredit: true, held: 0, unit: MiB, cap: 8 * MiB, proven: true, lastGrantTick: -1, ...over };
}

describe('allocateCredit', () => {
  it('grants whole units, fewest held first, until the budget holds back the fairest session', () => {
    // Prepare: two sessions with room for eight units each, a budget of three units.
    const sessions = [session(), session()];
    // Act
    const plan = allocateCredit(sessions, 3 * MiB);
    // Assess: a, b, a; then b, now holding the least, does not fit the budget.
    expect(plan.grants).toEqual([
      { session: 0, bytes: MiB },
      { session: 1, bytes: MiB },
      { session: 0, bytes: MiB },
    ]);
    expect(plan.budgetHeld).toBe(1);
  });

  it("counts every session's held bytes against the budget, and grants none to one that wants no credit", () => {
    // Prepare: a committed session still writing 3 MiB; a session released its credit (idle).
    const sessions = [
      session({ wantsCredit: false, held: 3 * MiB }),
      session({ wantsCredit: false }),
      session(),
    ];
    // Act
    const plan = allocateCredit(sessions, 4 * MiB);
    // Assess
    expect(plan.grants).toEqual([{ session: 2, bytes: MiB }]);
    expect(plan.budgetHeld).toBe(2);
  });

  it('stops at the window and cap: a session holding its cap gets nothing, with no budget hold', () => {
    const plan = allocateCredit([session({ held: 2 * MiB, cap: 2 * MiB })], 64 * MiB);
    expect(plan).toEqual({ grants: [], budgetHeld: undefined });
    expect(creditStep(session({ held: MiB, cap: 2 * MiB }))).toBe(MiB);
    expect(creditStep(session({ held: 2 * MiB, cap: 2 * MiB }))).toBe(0);
  });

  it('tops a session that has sent nothing up to one unit, and no further', () => {
    const plan = allocateCredit([session({ proven: false, held: MiB / 4 })], 64 * MiB);
    expect(plan.grants).toEqual([{ session: 0, bytes: (3 * MiB) / 4 }]);
  });

  it('lets idle sessions asking for large chunks hold only their share of the budget; a 1 MiB source still goes', () => {
    // Prepare: four HELLOs asking for 16 MiB chunks, none sent yet, and a source of 1 MiB chunks.
    const budget = 64 * MiB;
    const large = Array.from({ length: 4 }, () => session({ proven: false, unit: 16 * MiB, cap: 16 * MiB }));
    const sessions = [...large, session({ proven: false })];
    // Act
    const plan = allocateCredit(sessions, budget);
    // Assess: beyond their first INITIAL_GRANT_UNIT each, the large ones hold at most the share.
    const granted = sessions.map((_, i) =>
      plan.grants.filter((g) => g.session === i).reduce((a, g) => a + g.bytes, 0),
    );
    const beyondFirst = granted.slice(0, 4).reduce((a, b) => a + Math.max(0, b - INITIAL_GRANT_UNIT), 0);
    expect(beyondFirst).toBeLessThanOrEqual(budget * UNPROVEN_LARGE_SHARE);
    expect(granted.slice(0, 4).filter((b) => b > 0).length).toBe(2);
    expect(granted[4]).toBe(MiB);
    expect(plan.budgetHeld).toBeUndefined();
  });
});
