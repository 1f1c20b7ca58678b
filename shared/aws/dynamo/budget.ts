// Flow control shared by concurrent Lambdas, on DynamoDB: node budget counter, disk windows, grant
// leases. The lease design of functions/shared; the cycle ports replace it (grant-flow.ts,
// node-budget.ts, plan-locks.ts) and this module goes when functions/shared does.
//
// Every operation is a single-item conditional write (no transactions: see schema.ts). Where one
// step spans items (a grant touches the disk's window, the node budget and its lease item), the
// steps are ordered so that a crash between two of them can only LEAK bytes (hold them until an
// operator resets the counter), never over-commit: reserve before the lease exists, delete the
// lease before releasing. A worker that merely dies holding a lease leaks nothing: the lease
// expires and `reclaimExpired` returns its bytes exactly once.
import { QueryCommand } from '@aws-sdk/lib-dynamodb';
import { ConfigError, FerryError } from '../../engine/errors.ts';
import { dynamoCall, StateConflictError } from './errors.ts';
import { type Client, TableItems } from './items.ts';
import {
  budgetItem,
  type GrantLease,
  grantItem,
  type Key,
  keys,
  LEASE_INDEX,
  leaseScope,
  parseItem,
  type WindowState,
  windowItem,
} from './schema.ts';

// The plan locks lived here; functions/shared still imports them from this module.
export { DynamoPlanLocks, type PlanLock } from './plan-locks.ts';
export type { GrantLease, WindowState } from './schema.ts';

// A window reservation that loses its conditional write re-reads and tries again this often
// before answering "full": enough to ride out a burst of concurrent top-ups on one disk, few
// enough that a contended disk costs a bounded number of requests per attempt.
const WINDOW_RESERVE_ATTEMPTS = 4;

function positiveBytes(bytes: number, what: string): void {
  if (!Number.isSafeInteger(bytes) || bytes <= 0) {
    throw new ConfigError(`${what} must be a positive whole number of bytes, got ${bytes}`);
  }
}

// ---- node budget --------------------------------------------------------------------------------

export interface BudgetOptions {
  table: string;
  /** The node whose aggregate in-flight bytes this counter bounds (one per deployment by default). */
  node: string;
  capacityBytes: number;
}

/**
 * The node's in-flight budget as one counter item. `ADD` with a condition is atomic, so the
 * counter can never pass `capacityBytes` or fall below zero, whatever number of Lambdas race.
 */
export class DynamoBudget {
  readonly node: string;
  readonly capacityBytes: number;
  private readonly items: TableItems;
  private readonly key: Key;

  constructor(client: Client, opts: BudgetOptions) {
    positiveBytes(opts.capacityBytes, 'node budget');
    this.items = new TableItems(client, opts.table);
    this.node = opts.node;
    this.capacityBytes = opts.capacityBytes;
    this.key = keys.budget(opts.node);
  }

  /**
   * Reserves `bytes`; returns the in-flight total including them, or false when they do not fit
   * (budget exhausted is an answer, not an error: the caller waits for completions).
   */
  async acquire(bytes: number): Promise<{ inflight: number } | false> {
    positiveBytes(bytes, 'budget acquisition');
    if (bytes > this.capacityBytes) {
      throw new ConfigError(
        `a grant of ${bytes} bytes can never fit node ${this.node}'s budget of ${this.capacityBytes} bytes`,
        { setting: 'node budget' },
      );
    }
    // `inflight + :n <= :cap` is not valid in a condition (no arithmetic there): compare against cap - n.
    const out = await this.items.update(this.key, {
      UpdateExpression: 'SET #capacity = :cap ADD #inflight :n',
      ConditionExpression: 'attribute_not_exists(#inflight) OR #inflight <= :capMinusN',
      ExpressionAttributeNames: { '#inflight': 'inflight', '#capacity': 'capacityBytes' },
      ExpressionAttributeValues: {
        ':n': bytes,
        ':cap': this.capacityBytes,
        ':capMinusN': this.capacityBytes - bytes,
      },
      ReturnValues: 'ALL_NEW',
    });
    if (out === undefined) return false;
    return { inflight: parseItem(budgetItem, out, this.items.table, this.key).inflight };
  }

  /** Returns `bytes` to the budget; the in-flight total after. Never drives the counter negative. */
  async release(bytes: number): Promise<number> {
    positiveBytes(bytes, 'budget release');
    const out = await this.items.update(this.key, {
      UpdateExpression: 'ADD #inflight :minusN',
      ConditionExpression: '#inflight >= :n',
      ExpressionAttributeNames: { '#inflight': 'inflight' },
      ExpressionAttributeValues: { ':n': bytes, ':minusN': -bytes },
      ReturnValues: 'ALL_NEW',
    });
    if (out === undefined) {
      throw new StateConflictError(
        `release of ${bytes} bytes exceeds node ${this.node}'s in-flight budget (released twice?)`,
        this.items.where(this.key),
      );
    }
    return parseItem(budgetItem, out, this.items.table, this.key).inflight;
  }

  /** The bytes currently reserved (consistent read). */
  async inflight(): Promise<number> {
    return (await this.items.get(this.key, budgetItem))?.inflight ?? 0;
  }
}

// ---- per-disk windows -------------------------------------------------------------------------

export interface WindowUpdate {
  level: number;
  windowBytes: number;
  /** Epoch milliseconds of the change (the caller's clock). */
  updatedAt: number;
}

/**
 * Each disk's adaptive window and the bytes granted against it. The controller's level changes
 * are optimistic (`version`); reservations are conditional ADDs against the window they read.
 */
export class DynamoWindows {
  private readonly items: TableItems;

  constructor(client: Client, opts: { table: string }) {
    this.items = new TableItems(client, opts.table);
  }

  async getWindow(set: string, disk: string): Promise<WindowState | undefined> {
    return this.items.get(keys.window(set, disk), windowItem);
  }

  /**
   * Sets a disk's window level. `expectedVersion` is the version read (undefined: the window must
   * not exist yet); a stale version is a StateConflictError. In-flight bytes are kept.
   */
  async putWindow(
    set: string,
    disk: string,
    update: WindowUpdate,
    expectedVersion: number | undefined,
  ): Promise<WindowState> {
    positiveBytes(update.windowBytes, `window of disk ${disk}`);
    if (!Number.isSafeInteger(update.level) || update.level < 0) {
      throw new ConfigError(`window level of disk ${disk} must be a whole number >= 0, got ${update.level}`);
    }
    const key = keys.window(set, disk);
    const out = await this.items.update(key, {
      UpdateExpression:
        'SET #level = :level, #windowBytes = :windowBytes, #updatedAt = :updatedAt, #inflight = if_not_exists(#inflight, :zero) ADD #version :one',
      ConditionExpression:
        expectedVersion === undefined ? 'attribute_not_exists(pk)' : '#version = :expected',
      ExpressionAttributeNames: {
        '#level': 'level',
        '#windowBytes': 'windowBytes',
        '#updatedAt': 'updatedAt',
        '#inflight': 'inflight',
        '#version': 'version',
      },
      ExpressionAttributeValues: {
        ':level': update.level,
        ':windowBytes': update.windowBytes,
        ':updatedAt': update.updatedAt,
        ':zero': 0,
        ':one': 1,
        ...(expectedVersion === undefined ? {} : { ':expected': expectedVersion }),
      },
      ReturnValues: 'ALL_NEW',
    });
    if (out === undefined) {
      throw new StateConflictError(
        expectedVersion === undefined
          ? `window of disk ${disk} in set ${set} already exists: concurrent modification`
          : `window of disk ${disk} in set ${set} is no longer version ${expectedVersion}: concurrent modification`,
        this.items.where(key, disk),
      );
    }
    return parseItem(windowItem, out, this.items.table, key);
  }

  /** Reserves `bytes` of the disk's window; false when the window is full. */
  async reserve(set: string, disk: string, bytes: number): Promise<boolean> {
    positiveBytes(bytes, `window reservation of disk ${disk}`);
    const key = keys.window(set, disk);
    for (let attempt = 0; attempt < WINDOW_RESERVE_ATTEMPTS; attempt++) {
      const window = await this.items.get(key, windowItem);
      if (window === undefined) {
        throw new FerryError(
          `disk ${disk} of set ${set} has no window state: put its window before granting`,
          {
            disk,
          },
        );
      }
      if (window.inflight + bytes > window.windowBytes) return false;
      // Conditional on the window size read, so a concurrent step-down is never overrun.
      const out = await this.items.update(key, {
        UpdateExpression: 'ADD #inflight :n',
        ConditionExpression: '#windowBytes = :windowBytes AND #inflight <= :roomForN',
        ExpressionAttributeNames: { '#inflight': 'inflight', '#windowBytes': 'windowBytes' },
        ExpressionAttributeValues: {
          ':n': bytes,
          ':windowBytes': window.windowBytes,
          ':roomForN': window.windowBytes - bytes,
        },
      });
      if (out !== undefined) return true;
    }
    return false;
  }

  /** Returns `bytes` to the disk's window; the window's in-flight bytes after. */
  async release(set: string, disk: string, bytes: number): Promise<number> {
    positiveBytes(bytes, `window release of disk ${disk}`);
    const key = keys.window(set, disk);
    const out = await this.items.update(key, {
      UpdateExpression: 'ADD #inflight :minusN',
      ConditionExpression: '#inflight >= :n',
      ExpressionAttributeNames: { '#inflight': 'inflight' },
      ExpressionAttributeValues: { ':n': bytes, ':minusN': -bytes },
      ReturnValues: 'ALL_NEW',
    });
    if (out === undefined) {
      throw new StateConflictError(
        `release of ${bytes} bytes exceeds the in-flight bytes of disk ${disk}'s window (released twice?)`,
        this.items.where(key, disk),
      );
    }
    return parseItem(windowItem, out, this.items.table, key).inflight;
  }
}

// ---- grant leases -----------------------------------------------------------------------------

export interface GrantRequest {
  set: string;
  disk: string;
  seq: number;
  bytes: number;
  /** Who holds the grant (a Lambda request id, an agent id). */
  owner: string;
  /** Epoch ms after which the grant may be reclaimed unless renewed. */
  expiresAt: number;
  /** Epoch ms now (the caller's clock). */
  now: number;
}

export type GrantOutcome =
  | { granted: true; lease: GrantLease; budgetInflight: number }
  | { granted: false; reason: 'window' | 'budget' | 'duplicate' };

/**
 * A grant reserves its bytes against the disk's window and the node budget, then records a lease.
 * Completion by the owner, or reclamation after expiry, deletes the lease conditionally: exactly
 * one of them wins, and only the winner returns the bytes.
 */
export class DynamoGrants {
  private readonly items: TableItems;
  private readonly windows: DynamoWindows;

  constructor(
    client: Client,
    opts: { table: string },
    private readonly budget: DynamoBudget,
  ) {
    this.items = new TableItems(client, opts.table);
    this.windows = new DynamoWindows(client, opts);
  }

  async grantLease(req: GrantRequest): Promise<GrantOutcome> {
    positiveBytes(req.bytes, `grant of disk ${req.disk}`);
    if (!(req.expiresAt > req.now)) {
      throw new ConfigError(`grant lease of disk ${req.disk} seq ${req.seq} would expire before it starts`);
    }
    if (!(await this.windows.reserve(req.set, req.disk, req.bytes)))
      return { granted: false, reason: 'window' };
    const acquired = await this.budget.acquire(req.bytes).catch(async (err: unknown) => {
      await this.windows.release(req.set, req.disk, req.bytes);
      throw err;
    });
    if (acquired === false) {
      await this.windows.release(req.set, req.disk, req.bytes);
      return { granted: false, reason: 'budget' };
    }
    const lease: GrantLease = {
      set: req.set,
      disk: req.disk,
      seq: req.seq,
      bytes: req.bytes,
      owner: req.owner,
      node: this.budget.node,
      leaseExpiresAt: req.expiresAt,
      grantedAt: req.now,
    };
    const created = await this.items
      .create(keys.grant(req.set, req.disk, req.seq), { ...lease, leaseScope: leaseScope(req.set) })
      .catch(async (err: unknown) => {
        await this.returnBytes(lease);
        throw err;
      });
    if (!created) {
      // This seq is already granted (a duplicate planner message): give back what we reserved.
      await this.returnBytes(lease);
      return { granted: false, reason: 'duplicate' };
    }
    return { granted: true, lease, budgetInflight: acquired.inflight };
  }

  /**
   * The owner finished the chunk: deletes the lease and returns its bytes. Undefined when the
   * lease is no longer this owner's (it expired and was reclaimed): the bytes were returned then.
   */
  async completeGrant(
    set: string,
    disk: string,
    seq: number,
    owner: string,
  ): Promise<GrantLease | undefined> {
    const key = keys.grant(set, disk, seq);
    const old = await this.items.delete(key, {
      ConditionExpression: '#owner = :owner',
      ExpressionAttributeNames: { '#owner': 'owner' },
      ExpressionAttributeValues: { ':owner': owner },
    });
    if (old === undefined) return undefined;
    const lease = parseItem(grantItem, old, this.items.table, key);
    await this.returnBytes(lease);
    return lease;
  }

  /** Extends the owner's lease; false when it is no longer this owner's. */
  async renewGrant(
    set: string,
    disk: string,
    seq: number,
    owner: string,
    expiresAt: number,
  ): Promise<boolean> {
    const out = await this.items.update(keys.grant(set, disk, seq), {
      UpdateExpression: 'SET #expires = :expires',
      ConditionExpression: '#owner = :owner',
      ExpressionAttributeNames: { '#owner': 'owner', '#expires': 'leaseExpiresAt' },
      ExpressionAttributeValues: { ':owner': owner, ':expires': expiresAt },
    });
    return out !== undefined;
  }

  async getGrant(set: string, disk: string, seq: number): Promise<GrantLease | undefined> {
    return this.items.get(keys.grant(set, disk, seq), grantItem);
  }

  /**
   * Reclaims the set's leases on this node that expired at or before `now`; returns those this
   * caller won, whose descriptors must be granted again. Safe to run from many places at once:
   * the delete is conditional on the exact expiry and owner seen, so a lease renewed, completed
   * or reclaimed meanwhile is left alone and each expired lease is released exactly once.
   */
  async reclaimExpired(set: string, now: number): Promise<GrantLease[]> {
    const won: GrantLease[] = [];
    let lastKey: Record<string, unknown> | undefined;
    do {
      const res = await dynamoCall(
        'Query',
        { table: this.items.table, key: `${LEASE_INDEX} ${leaseScope(set)}` },
        () =>
          this.items.doc.send(
            new QueryCommand({
              TableName: this.items.table,
              IndexName: LEASE_INDEX,
              KeyConditionExpression: '#scope = :scope AND #expires <= :now',
              FilterExpression: '#node = :node',
              ExpressionAttributeNames: {
                '#scope': 'leaseScope',
                '#expires': 'leaseExpiresAt',
                '#node': 'node',
              },
              ExpressionAttributeValues: {
                ':scope': leaseScope(set),
                ':now': now,
                ':node': this.budget.node,
              },
              ExclusiveStartKey: lastKey,
            }),
          ),
      );
      for (const item of res.Items ?? []) {
        const seen = parseItem(grantItem, item, this.items.table, {
          pk: String(item.pk),
          sk: String(item.sk),
        });
        const old = await this.items.delete(keys.grant(seen.set, seen.disk, seen.seq), {
          ConditionExpression: '#expires = :seen AND #owner = :owner',
          ExpressionAttributeNames: { '#expires': 'leaseExpiresAt', '#owner': 'owner' },
          ExpressionAttributeValues: { ':seen': seen.leaseExpiresAt, ':owner': seen.owner },
        });
        if (old === undefined) continue; // someone else completed, renewed or reclaimed it
        await this.returnBytes(seen);
        won.push(seen);
      }
      lastKey = res.LastEvaluatedKey;
    } while (lastKey !== undefined);
    return won;
  }

  /** Node budget first: it is shared by every disk, so it matters most that it comes back. */
  private async returnBytes(lease: GrantLease): Promise<void> {
    await this.budget.release(lease.bytes);
    await this.windows.release(lease.set, lease.disk, lease.bytes);
  }
}
