// The GrantChannel contract (shared/engine/cycle/ports.ts): the memory queue and the SQS adapter must
// both pass it. The harness receives what the queue would deliver to writers right now.
import { describe, expect, it } from 'vitest';
import type { Grant, GrantChannel, GrantRecord } from '../../shared/engine/cycle/ports.ts';

const KiB = 1024;
const BLOCK = 512 * KiB;

export interface GrantChannelHarness {
  readonly channel: GrantChannel;
  /**
   * Every message visible now (each then stays invisible until handed back or its visibility lapses,
   * which no test waits for).
   */
  receiveAll(): Promise<GrantRecord[]>;
}

let cycles = 0;

/** `count` grants of two disks of one cycle (a cycle of its own per call). */
export function grantsOf(count: number): Grant[] {
  const cycleId = `cycle-${++cycles}`;
  return Array.from({ length: count }, (_, i) => {
    const seq = Math.floor(i / 2);
    const offset = seq * 4 * BLOCK;
    return {
      set: 'finance',
      cycleId,
      disk: i % 2 === 0 ? 'vol-os' : 'vol-data',
      descriptor: {
        seq,
        offset,
        length: 3 * BLOCK,
        extents: [
          { offset, length: BLOCK },
          { offset: offset + 2 * BLOCK, length: BLOCK },
        ],
        bytes: 2 * BLOCK,
      },
      attempt: 1 + (i % 3),
      ...(i % 5 === 4 ? { repair: true } : {}),
    };
  });
}

const keyOf = (g: Grant): string => `${g.cycleId}/${g.disk}/${g.descriptor.seq}`;

export function grantChannelContract(name: string, create: () => Promise<GrantChannelHarness>): void {
  describe(`GrantChannel contract: ${name}`, () => {
    it('sends nothing for no grants', async () => {
      const { channel, receiveAll } = await create();
      expect(await channel.send([])).toEqual({ unsent: [] });
      expect(await receiveAll()).toEqual([]);
    });

    it('delivers every grant sent, in batches, decoded exactly as sent', async () => {
      const { channel, receiveAll } = await create();
      const grants = grantsOf(25);

      const { unsent } = await channel.send(grants);
      const records = await receiveAll();

      expect(unsent).toEqual([]);
      const decoded = new Map(records.map((r) => channel.decode(r.body)).map((g) => [keyOf(g), g]));
      // At-least-once: a duplicate delivery is the same grant again.
      expect(records.length).toBeGreaterThanOrEqual(grants.length);
      expect(decoded).toEqual(new Map(grants.map((g) => [keyOf(g), g])));
      expect(new Set(records.map((r) => r.messageId)).size).toBe(records.length);
    });

    it('refuses a body that is not a grant', async () => {
      const { channel } = await create();
      expect(() => channel.decode('not json')).toThrow();
      expect(() => channel.decode('{}')).toThrow();
      expect(() => channel.decode(JSON.stringify({ set: 'finance', disk: 'vol-os' }))).toThrow();
    });

    it('makes a handed-back grant deliverable again at once', async () => {
      const { channel, receiveAll } = await create();
      const [grant] = grantsOf(1);
      await channel.send([grant!]);
      const [first] = await receiveAll();

      const whileHeld = await receiveAll();
      await channel.handBack(first!.receiptHandle);
      const again = await receiveAll();

      expect(whileHeld).toEqual([]);
      expect(again.map((r) => r.messageId)).toEqual([first!.messageId]);
      expect(channel.decode(again[0]!.body)).toEqual(grant);
    });
  });
}
