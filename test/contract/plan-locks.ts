// The PlanLocks contract (shared/engine/cycle/ports.ts): the memory fake and the DynamoDB adapter must
// both pass it. Times are the caller's clock, passed in: no test waits.
import { describe, expect, it } from 'vitest';
import type { PlanLocks } from '../../shared/engine/cycle/ports.ts';

const T0 = 1_717_200_000_000;
const TTL = 60_000;

let plans = 0;
const planName = () => `plan-${++plans}`;

export function planLocksContract(name: string, create: () => Promise<PlanLocks>): void {
  describe(`PlanLocks contract: ${name}`, () => {
    it('gives a free lock to one owner and refuses another while it lives', async () => {
      const locks = await create();
      const plan = planName();

      const taken = await locks.acquire(plan, 'exec-1', TTL, T0);
      const refused = await locks.acquire(plan, 'exec-2', TTL, T0 + TTL - 1);

      expect(taken).toMatchObject({ plan, owner: 'exec-1', lockExpiresAt: T0 + TTL });
      expect(refused).toBeUndefined();
      expect(await locks.get(plan)).toMatchObject({ plan, owner: 'exec-1', lockExpiresAt: T0 + TTL });
      expect(await locks.get(planName())).toBeUndefined();
    });

    it('lets exactly one of several concurrent owners take a free lock', async () => {
      const locks = await create();
      const plan = planName();
      const results = await Promise.all(
        Array.from({ length: 8 }, (_, i) => locks.acquire(plan, `exec-${i}`, TTL, T0)),
      );
      const winners = results.filter((l) => l !== undefined);
      expect(winners).toHaveLength(1);
      expect((await locks.get(plan))?.owner).toBe(winners[0]?.owner);
    });

    it('lets the owner take it again (a retried prepare) and extend it', async () => {
      const locks = await create();
      const plan = planName();
      await locks.acquire(plan, 'exec-1', TTL, T0);

      const again = await locks.acquire(plan, 'exec-1', TTL, T0 + 1000);
      const renewed = await locks.renew(plan, 'exec-1', TTL, T0 + 2000);

      expect(again).toMatchObject({ owner: 'exec-1', lockExpiresAt: T0 + 1000 + TTL });
      expect(renewed).toMatchObject({ owner: 'exec-1', lockExpiresAt: T0 + 2000 + TTL });
      expect(await locks.renew(plan, 'exec-2', TTL, T0 + 2000)).toBeUndefined();
    });

    it('is taken over once expired; the old owner can then neither renew nor release it', async () => {
      const locks = await create();
      const plan = planName();
      await locks.acquire(plan, 'exec-1', TTL, T0);

      const takeover = await locks.acquire(plan, 'exec-2', TTL, T0 + TTL);

      expect(takeover).toMatchObject({ owner: 'exec-2', lockExpiresAt: T0 + 2 * TTL });
      expect(await locks.renew(plan, 'exec-1', TTL, T0 + TTL + 1)).toBeUndefined();
      expect(await locks.release(plan, 'exec-1')).toBe(false);
      expect((await locks.get(plan))?.owner).toBe('exec-2');
    });

    it('frees the lock on release, for anyone at once', async () => {
      const locks = await create();
      const plan = planName();
      await locks.acquire(plan, 'exec-1', TTL, T0);

      expect(await locks.release(plan, 'exec-2')).toBe(false);
      expect(await locks.release(plan, 'exec-1')).toBe(true);
      expect(await locks.get(plan)).toBeUndefined();
      expect(await locks.renew(plan, 'exec-1', TTL, T0 + 1)).toBeUndefined();
      expect(await locks.release(plan, 'exec-1')).toBe(false);
      expect(await locks.acquire(plan, 'exec-3', TTL, T0 + 1)).toMatchObject({ owner: 'exec-3' });
      expect(await locks.release(planName(), 'exec-1')).toBe(false);
    });
  });
}
