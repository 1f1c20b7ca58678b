// The PlanLocks port on DynamoDB: one lock item per protection plan, taken and renewed by conditional
// updates, so two cycles of a plan never overlap and a dead holder's lock expires by itself.
//
//   item        pk              sk      attributes
//   plan lock   PLAN#<plan>     LOCK    plan, owner, lockExpiresAt (epoch ms; 0 = released), fence

import type { PlanLocks } from '../../engine/cycle/ports.ts';
import { ConfigError } from '../../engine/errors.ts';
import { type Client, TableItems } from './items.ts';
import { keys, type PlanLock, parseItem, planLockItem } from './schema.ts';

export type { PlanLock } from './schema.ts';

// A released lock keeps its item (and its fence) with this expiry: free for anyone at any time.
const RELEASED = 0;

function positiveMs(ms: number, what: string): void {
  if (!Number.isSafeInteger(ms) || ms <= 0) {
    throw new ConfigError(`${what} must be a positive whole number of milliseconds, got ${ms}`);
  }
}

/**
 * One lock per protection plan. A lock is a lease: if its holder dies, it expires and the next cycle
 * takes it over. `fence` grows with every acquisition; a holder can compare it to detect that it
 * was taken over. Every method is one request.
 */
export class DynamoPlanLocks implements PlanLocks {
  private readonly items: TableItems;

  constructor(client: Client, opts: { table: string }) {
    this.items = new TableItems(client, opts.table);
  }

  /** Takes the lock if it is free, expired (at or before `now`) or already this owner's. */
  async acquire(plan: string, owner: string, ttlMs: number, now: number): Promise<PlanLock | undefined> {
    positiveMs(ttlMs, `lock lifetime of plan ${plan}`);
    if (owner === '') throw new ConfigError(`lock owner of plan ${plan} must not be empty`);
    const key = keys.planLock(plan);
    const out = await this.items.update(key, {
      UpdateExpression: 'SET #plan = :plan, #owner = :owner, #expires = :expires ADD #fence :one',
      ConditionExpression: 'attribute_not_exists(pk) OR #expires <= :now OR #owner = :owner',
      ExpressionAttributeNames: {
        '#plan': 'plan',
        '#owner': 'owner',
        '#expires': 'lockExpiresAt',
        '#fence': 'fence',
      },
      ExpressionAttributeValues: {
        ':plan': plan,
        ':owner': owner,
        ':expires': now + ttlMs,
        ':now': now,
        ':one': 1,
      },
      ReturnValues: 'ALL_NEW',
    });
    return out === undefined ? undefined : parseItem(planLockItem, out, this.items.table, key);
  }

  /** Extends the owner's lock; undefined when it is no longer this owner's (or was released). */
  async renew(plan: string, owner: string, ttlMs: number, now: number): Promise<PlanLock | undefined> {
    positiveMs(ttlMs, `lock lifetime of plan ${plan}`);
    const key = keys.planLock(plan);
    const out = await this.items.update(key, {
      UpdateExpression: 'SET #expires = :expires',
      // An expired lock nobody took over may be renewed (no one else ran); a released one may not.
      ConditionExpression: '#owner = :owner AND #expires > :released',
      ExpressionAttributeNames: { '#owner': 'owner', '#expires': 'lockExpiresAt' },
      ExpressionAttributeValues: { ':owner': owner, ':expires': now + ttlMs, ':released': RELEASED },
      ReturnValues: 'ALL_NEW',
    });
    return out === undefined ? undefined : parseItem(planLockItem, out, this.items.table, key);
  }

  /**
   * Releases the owner's lock; false when it was not this owner's (expired and taken over). The
   * item stays, marked released, so the next holder's fence is still larger than every earlier one.
   */
  async release(plan: string, owner: string): Promise<boolean> {
    const out = await this.items.update(keys.planLock(plan), {
      UpdateExpression: 'SET #expires = :released',
      ConditionExpression: '#owner = :owner AND #expires > :released',
      ExpressionAttributeNames: { '#owner': 'owner', '#expires': 'lockExpiresAt' },
      ExpressionAttributeValues: { ':owner': owner, ':released': RELEASED },
    });
    return out !== undefined;
  }

  /** The lock as stored (expired or not), or undefined when nobody has taken it or it was released. */
  async get(plan: string): Promise<PlanLock | undefined> {
    const lock = await this.items.get(keys.planLock(plan), planLockItem);
    return lock?.lockExpiresAt === RELEASED ? undefined : lock;
  }
}
