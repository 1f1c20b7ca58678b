// The NodeBudget contract (shared/engine/cycle/ports.ts): the memory fake and the DynamoDB adapter must
// both pass it. The sum of live reservations never exceeds the limit, whatever races.
import { describe, expect, it } from 'vitest';
import type { NodeBudget } from '../../shared/engine/cycle/ports.ts';

const MiB = 1 << 20;
const LIMIT = 256 * MiB;
const T0 = 1_717_200_000_000;
const LEASE = 60_000;

let nodes = 0;
const nodeName = () => `node-${++nodes}`;

export function nodeBudgetContract(name: string, create: () => Promise<NodeBudget>): void {
  describe(`NodeBudget contract: ${name}`, () => {
    it('reserves what is asked while it fits, then what is left, then nothing', async () => {
      const budget = await create();
      const node = nodeName();

      const a = await budget.reserve(node, 'cycle-a', 200 * MiB, T0 + LEASE, T0, LIMIT);
      const b = await budget.reserve(node, 'cycle-b', 100 * MiB, T0 + LEASE, T0, LIMIT);
      const c = await budget.reserve(node, 'cycle-c', 1 * MiB, T0 + LEASE, T0, LIMIT);

      expect([a, b, c]).toEqual([200 * MiB, 56 * MiB, 0]);
    });

    it("replaces a holder's reservation on renewal instead of adding to it", async () => {
      const budget = await create();
      const node = nodeName();
      await budget.reserve(node, 'cycle-a', 200 * MiB, T0 + LEASE, T0, LIMIT);

      const renewed = await budget.reserve(node, 'cycle-a', 250 * MiB, T0 + 2 * LEASE, T0 + 1000, LIMIT);
      const shrunk = await budget.reserve(node, 'cycle-a', 10 * MiB, T0 + 2 * LEASE, T0 + 2000, LIMIT);
      const other = await budget.reserve(node, 'cycle-b', LIMIT, T0 + 2 * LEASE, T0 + 3000, LIMIT);

      expect([renewed, shrunk, other]).toEqual([250 * MiB, 10 * MiB, LIMIT - 10 * MiB]);
    });

    it('ignores reservations whose time has passed', async () => {
      const budget = await create();
      const node = nodeName();
      await budget.reserve(node, 'crashed-cycle', LIMIT, T0 + LEASE, T0, LIMIT);

      const during = await budget.reserve(node, 'cycle-b', 64 * MiB, T0 + 2 * LEASE, T0 + LEASE - 1, LIMIT);
      const after = await budget.reserve(node, 'cycle-b', 64 * MiB, T0 + 2 * LEASE, T0 + LEASE, LIMIT);
      const full = await budget.reserve(node, 'cycle-c', LIMIT, T0 + 2 * LEASE, T0 + LEASE, LIMIT);

      expect([during, after, full]).toEqual([0, 64 * MiB, LIMIT - 64 * MiB]);
    });

    it('gives the bytes back on release (idempotent)', async () => {
      const budget = await create();
      const node = nodeName();
      await budget.reserve(node, 'cycle-a', LIMIT, T0 + LEASE, T0, LIMIT);

      await budget.release(node, 'cycle-a');
      await budget.release(node, 'cycle-a');
      await budget.release(node, 'never-reserved');
      await budget.release(nodeName(), 'cycle-a');

      expect(await budget.reserve(node, 'cycle-b', LIMIT, T0 + LEASE, T0, LIMIT)).toBe(LIMIT);
    });

    it('never lets concurrent reservations exceed the limit', async () => {
      const budget = await create();
      const node = nodeName();
      // 16 cycles' ticks at once, each asking for 40 MiB of 256 MiB.
      const asks = Array.from({ length: 16 }, (_, i) =>
        budget.reserve(node, `cycle-${i}`, 40 * MiB, T0 + LEASE, T0, LIMIT),
      );

      const got = await Promise.all(asks);

      const total = got.reduce((s, n) => s + n, 0);
      expect(total).toBe(LIMIT); // demand exceeds the limit: all of it is reserved, no more
      expect(got.every((n) => n >= 0 && n <= 40 * MiB)).toBe(true);
      expect(await budget.reserve(node, 'late', 1, T0 + LEASE, T0, LIMIT)).toBe(0);
    });

    it('keeps nodes apart and reserves nothing under a smaller limit already used up', async () => {
      const budget = await create();
      const [n1, n2] = [nodeName(), nodeName()];
      await budget.reserve(n1, 'cycle-a', 128 * MiB, T0 + LEASE, T0, LIMIT);

      expect(await budget.reserve(n2, 'cycle-a', LIMIT, T0 + LEASE, T0, LIMIT)).toBe(LIMIT);
      expect(await budget.reserve(n1, 'cycle-b', 64 * MiB, T0 + LEASE, T0, 100 * MiB)).toBe(0);
    });
  });
}
