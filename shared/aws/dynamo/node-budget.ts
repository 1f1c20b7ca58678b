// The NodeBudget port on DynamoDB: one item per node holding every live reservation, so "the sum of
// live reservations never exceeds the limit" is a check on one item guarded by its version.
//
//   pk BUDGET#<node>   sk RESERVATIONS
//   v   version (N)    every write names the version it read
//   h   holders (M)    holder -> [bytes, until (epoch ms)]
//
// reserve = read + PutItem of the whole item conditioned on the version read; expired entries are
// left out of the write, so the item only holds the cycles running now (a few, well under 1 KB).
// A lost race retries with the item the failure returns (DynamoDB's ReturnValuesOnConditionCheckFailure),
// so contention costs one write per round, not a read and a write.

import type { NodeBudget } from '../../engine/cycle/ports.ts';
import { ConfigError } from '../../engine/errors.ts';
import { cycleKeys } from './cycle-items.ts';
import { MalformedStateError, StateConflictError } from './errors.ts';
import { type Client, TableItems } from './items.ts';
import { describeKey, type Key } from './schema.ts';

// Every losing round is someone else's winning one, so N reservations racing settle within N
// rounds. A node runs a few cycles, each reserving once per tick: 32 covers any real contention,
// and a bound turns a defect into an error instead of a loop.
const RESERVE_ATTEMPTS = 32;

type Holders = Record<string, [number, number]>;

const isCount = (n: unknown): n is number => typeof n === 'number' && Number.isSafeInteger(n) && n >= 0;

export class DynamoNodeBudget implements NodeBudget {
  private readonly items: TableItems;

  constructor(client: Client, opts: { table: string }) {
    this.items = new TableItems(client, opts.table);
  }

  async reserve(
    node: string,
    holder: string,
    bytes: number,
    until: number,
    now: number,
    limit: number,
  ): Promise<number> {
    for (const [what, n] of [
      ['bytes', bytes],
      ['until', until],
      ['now', now],
      ['limit', limit],
    ] as const) {
      if (!isCount(n)) {
        throw new ConfigError(
          `reservation of ${holder} on node ${node}: ${what} must be a whole number >= 0, got ${n}`,
        );
      }
    }
    if (holder === '') throw new ConfigError(`a reservation on node ${node} needs a holder`);
    const key = cycleKeys.nodeBudget(node);
    let current = await this.items.getRaw(key);
    for (let attempt = 0; attempt < RESERVE_ATTEMPTS; attempt++) {
      const { version, holders } = this.parse(key, current);
      const kept: Holders = {};
      let others = 0;
      for (const [name, entry] of Object.entries(holders)) {
        if (name === holder || entry[1] <= now) continue; // replaced, or expired: pruned
        kept[name] = entry;
        others += entry[0];
      }
      const granted = until > now ? Math.max(0, Math.min(bytes, limit - others)) : 0;
      if (granted > 0) kept[holder] = [granted, until];
      const out = await this.items.putOrCurrent(
        key,
        { v: version + 1, h: kept },
        current === undefined
          ? { ConditionExpression: 'attribute_not_exists(pk)' }
          : {
              ConditionExpression: '#v = :v',
              ExpressionAttributeNames: { '#v': 'v' },
              ExpressionAttributeValues: { ':v': version },
            },
      );
      if (out.ok) return granted;
      current = out.current;
    }
    throw new StateConflictError(
      `reservation of ${holder} on node ${node} lost ${RESERVE_ATTEMPTS} races in a row: concurrent modification`,
      this.items.where(key),
    );
  }

  /** One UpdateItem; bumps the version so a reserve computed with this holder's bytes loses its race. */
  async release(node: string, holder: string): Promise<void> {
    await this.items.update(cycleKeys.nodeBudget(node), {
      UpdateExpression: 'REMOVE #h.#holder ADD #v :one',
      ConditionExpression: 'attribute_exists(#h.#holder)',
      ExpressionAttributeNames: { '#h': 'h', '#holder': holder, '#v': 'v' },
      ExpressionAttributeValues: { ':one': 1 },
    });
  }

  private parse(key: Key, item: Record<string, unknown> | undefined): { version: number; holders: Holders } {
    if (item === undefined) return { version: 0, holders: {} };
    const bad = (why: string) =>
      new MalformedStateError(
        `DynamoDB item ${describeKey(key)} in table ${this.items.table} is malformed: ${why}`,
        {
          table: this.items.table,
          key: describeKey(key),
        },
      );
    if (!isCount(item.v)) throw bad('v is not a whole number >= 0');
    const h = item.h;
    if (typeof h !== 'object' || h === null || Array.isArray(h)) throw bad('h is not a map');
    const holders: Holders = {};
    for (const [name, entry] of Object.entries(h)) {
      if (!Array.isArray(entry) || entry.length !== 2 || !entry.every(isCount))
        throw bad(`holder ${name} is malformed`);
      holders[name] = [entry[0] as number, entry[1] as number];
    }
    return { version: item.v, holders };
  }
}
