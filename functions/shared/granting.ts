// Granting: claims a disk's next descriptors, reserves them against its window and the node budget
// (a lease), and sends them as SQS grant messages. The planner's tick and every chunk-writer
// completion (ACK-clocked) top windows up through this same code.
import { randomBytes } from 'node:crypto';
import type { DynamoGrants, DynamoWindows } from '../../shared/aws/dynamo/budget.ts';
import type { GrantMessage } from '../../shared/aws/sqs/grant-message.ts';
import { type GrantQueue, GrantSendError } from '../../shared/aws/sqs/grant-queue.ts';
import { errorMessage } from '../../shared/engine/errors.ts';
import type { CycleDiskRecord, CycleStore } from './cycle-store.ts';
import type { PlannedDescriptor } from './descriptor-pages.ts';
import { CycleStateError } from './errors.ts';
import type { Log, Now } from './ports.ts';

// ---- lease ids ---------------------------------------------------------------------------------

/**
 * A grant's lease id (the lease's owner and the message's `leaseId`): `a<attempt>.<nonce>.<cycleId>`.
 * The grant lease item is keyed by disk and seq only, so the id carries the cycle: a lease left by an
 * earlier cycle is recognised and released, never mistaken for this cycle's. The nonce makes every
 * issue of a grant distinct, so completion and reclaim of one issue never touch another.
 */
export function makeLeaseId(cycleId: string, attempt: number): string {
  return `a${attempt}.${randomBytes(6).toString('hex')}.${cycleId}`;
}

const LEASE_ID = /^a(\d+)\.[0-9a-f]{12}\.(.+)$/s;

export function parseLeaseId(leaseId: string): { attempt: number; cycleId: string } | undefined {
  const m = LEASE_ID.exec(leaseId);
  return m === null ? undefined : { attempt: Number(m[1]), cycleId: m[2]! };
}

// ---- descriptor cache --------------------------------------------------------------------------

// Pages a warm writer container keeps: descriptors never change within a cycle, and a batch of ten
// grants of one disk mostly falls in one page. 64 pages of ~50 KB is ~3 MB.
const PAGE_CACHE_ENTRIES = 64;

/** Descriptor lookups by seq, page-cached (LRU): one GetItem serves a run of grants. */
export class DescriptorCache {
  private readonly pages = new Map<string, Promise<PlannedDescriptor[]>>();

  constructor(
    private readonly store: CycleStore,
    private readonly capacity = PAGE_CACHE_ENTRIES,
  ) {}

  async get(rec: Pick<CycleDiskRecord, 'set' | 'disk' | 'cycleId' | 'perPage'>, seq: number) {
    const page = Math.floor(seq / rec.perPage);
    const key = JSON.stringify([rec.set, rec.disk, rec.cycleId, page]);
    let entry = this.pages.get(key);
    if (entry === undefined) {
      entry = this.store.getDescriptorPage(rec.set, rec.disk, rec.cycleId, page).then((p) => {
        if (p === undefined) {
          throw new CycleStateError(
            `descriptor page ${page} of disk ${rec.disk} in cycle ${rec.cycleId} is missing (seq ${seq})`,
            { set: rec.set, cycleId: rec.cycleId, disk: rec.disk, seq },
          );
        }
        return p;
      });
      // A failed read is not cached.
      entry.catch(() => this.pages.delete(key));
      this.pages.set(key, entry);
      while (this.pages.size > this.capacity) this.pages.delete(this.pages.keys().next().value as string);
    } else {
      // Refresh its LRU position.
      this.pages.delete(key);
      this.pages.set(key, entry);
    }
    const descriptors = await entry;
    const d = descriptors[seq - page * rec.perPage];
    if (d === undefined || d.seq !== seq) {
      throw new CycleStateError(
        `descriptor page ${page} of disk ${rec.disk} in cycle ${rec.cycleId} does not hold seq ${seq}`,
        { set: rec.set, cycleId: rec.cycleId, disk: rec.disk, seq },
      );
    }
    return d;
  }
}

// ---- top-up --------------------------------------------------------------------------------------

export interface GrantingDeps {
  readonly store: CycleStore;
  readonly grants: DynamoGrants;
  readonly windows: DynamoWindows;
  readonly queue: Pick<GrantQueue, 'sendGrants'>;
  readonly pages: DescriptorCache;
  readonly now: Now;
  /** How long a grant's lease lasts from its issue (and from each renewal). */
  readonly leaseMs: number;
  readonly log: Log;
}

/** Why a top-up stopped. `window` and `budget` are the controller's window-limited and pressure signals. */
export type TopUpStop = 'max' | 'window' | 'budget' | 'exhausted' | 'inactive' | 'contended';

export interface PendingGrant {
  readonly message: GrantMessage;
}

export interface TopUpResult {
  readonly pending: PendingGrant[];
  readonly stop: TopUpStop;
  /** The disk's record as last seen. */
  readonly record: CycleDiskRecord;
}

// Lost claims in a row before a top-up gives way: many writers of one disk topping up at once race
// for the same cursor; the losers re-read, and after a few rounds leave the rest to the winners.
const MAX_CLAIM_LOSSES = 4;

/** The next seq to grant: re-grants first (lowest seq), then the cursor. */
function nextCandidate(
  rec: CycleDiskRecord,
): { seq: number; attempt: number; from: 'retry' | 'cursor' } | undefined {
  let best: { seq: number; attempt: number } | undefined;
  for (const [seq, attempt] of Object.entries(rec.retry)) {
    const n = Number(seq);
    if (best === undefined || n < best.seq) best = { seq: n, attempt };
  }
  if (best !== undefined) return { ...best, from: 'retry' };
  if (rec.descriptors !== undefined && rec.nextSeq < rec.descriptors) {
    return { seq: rec.nextSeq, attempt: 1, from: 'cursor' };
  }
  return undefined;
}

/**
 * Grants up to `max` descriptors of one disk: claim a seq (cursor or re-grant map, one conditional
 * write), take its lease (window + node budget + lease item), queue the message. Does not send:
 * callers collect grants (across disks) and call `sendPending`. A seq claimed but not leased (the
 * window or the budget is full) goes back to the re-grant map at once; a crash in between loses
 * nothing for good, the tick's repair finds it.
 */
export async function topUpDisk(
  deps: GrantingDeps,
  record: CycleDiskRecord,
  max: number,
): Promise<TopUpResult> {
  const { store, grants, windows } = deps;
  let rec = record;
  const pending: PendingGrant[] = [];
  let losses = 0;
  const { set, disk, cycleId } = rec;
  while (pending.length < max) {
    if (rec.state !== 'active' || !rec.diffDone) return { pending, stop: 'inactive', record: rec };
    const next = nextCandidate(rec);
    if (next === undefined) return { pending, stop: 'exhausted', record: rec };
    const descriptor = await deps.pages.get(rec, next.seq);
    // A read before the claim, so a full window costs one read and no claim-and-give-back.
    const window = await windows.getWindow(set, disk);
    if (window === undefined) {
      throw new CycleStateError(`disk ${disk} of set ${set} has no window state (was the cycle prepared?)`, {
        set,
        cycleId,
        disk,
      });
    }
    if (window.inflight + descriptor.bytes > window.windowBytes)
      return { pending, stop: 'window', record: rec };

    const claimed =
      next.from === 'cursor' ? await store.claimCursor(rec, next.seq) : await store.claimRetry(rec, next.seq);
    if (claimed === undefined) {
      if (++losses >= MAX_CLAIM_LOSSES) return { pending, stop: 'contended', record: rec };
      rec = await store.requireCycleDisk(set, disk, cycleId);
      continue;
    }
    rec = claimed;
    const leaseId = makeLeaseId(cycleId, next.attempt);
    const request = () => {
      const now = deps.now();
      return grants.grantLease({
        set,
        disk,
        seq: next.seq,
        bytes: descriptor.bytes,
        owner: leaseId,
        expiresAt: now + deps.leaseMs,
        now,
      });
    };
    let outcome = await request().catch(async (err: unknown) => {
      await store.addRetries(set, disk, cycleId, new Map([[next.seq, next.attempt]]));
      throw err;
    });
    if (!outcome.granted && outcome.reason === 'duplicate') {
      // The lease key has no cycle: a lease left by an earlier cycle of this disk (a stray re-grant,
      // a crashed writer) blocks the seq. That cycle is over (the plan lock says so): release it.
      const existing = await grants.getGrant(set, disk, next.seq);
      const holder = existing === undefined ? undefined : parseLeaseId(existing.owner);
      if (existing !== undefined && holder?.cycleId !== cycleId) {
        await grants.completeGrant(set, disk, next.seq, existing.owner);
        deps.log.info('released a stale lease of an earlier cycle', {
          disk,
          seq: next.seq,
          owner: existing.owner,
        });
        outcome = await request();
      }
    }
    if (!outcome.granted) {
      await store.addRetries(set, disk, cycleId, new Map([[next.seq, next.attempt]]));
      rec = { ...rec, retry: { ...rec.retry, [String(next.seq)]: next.attempt } };
      const stop = outcome.reason === 'duplicate' ? 'contended' : outcome.reason;
      return { pending, stop, record: rec };
    }
    pending.push({
      message: {
        set,
        cycleId,
        disk,
        descriptor: {
          seq: descriptor.seq,
          offset: descriptor.offset,
          length: descriptor.length,
          extents: descriptor.extents,
          bytes: descriptor.bytes,
        },
        leaseId,
        leaseExpiresAt: outcome.lease.leaseExpiresAt,
        attempt: next.attempt,
      },
    });
  }
  return { pending, stop: 'max', record: rec };
}

/**
 * Sends queued grants in SQS batches. A grant SQS did not take is put back for a re-grant and its
 * lease released at once (rather than after it expires); returns how many were sent.
 */
export async function sendPending(deps: GrantingDeps, pending: readonly PendingGrant[]): Promise<number> {
  if (pending.length === 0) return 0;
  try {
    await deps.queue.sendGrants(pending.map((p) => p.message));
    return pending.length;
  } catch (err) {
    if (!(err instanceof GrantSendError)) throw err;
    deps.log.warn('grants not sent; they will be granted again', {
      unsent: err.unsent.length,
      error: errorMessage(err),
    });
    for (const g of err.unsent) {
      await deps.store.addRetries(g.set, g.disk, g.cycleId, new Map([[g.descriptor.seq, g.attempt]]));
      await deps.grants.completeGrant(g.set, g.disk, g.descriptor.seq, g.leaseId);
    }
    return pending.length - err.unsent.length;
  }
}
