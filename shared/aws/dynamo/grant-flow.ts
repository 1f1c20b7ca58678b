// The GrantFlow port on DynamoDB: a disk's whole grant state in ONE item per cycle, changed only by
// single-item conditional updates that return the state after (no read first, no transactions).
//
//   pk DISK#<set>#<disk>   sk FLOW#<cycle>
//   v   version (N)          bumped by advance and control, never by complete: advance's optimistic lock
//   o   open (BOOL)          advance requires it
//   n l next, low (N)        seqs [0, l) complete, [l, n) granted
//   g b grantedBytes, lowBytes (N)
//   d   done (M)             seq -> descriptor bytes, for completed seqs >= l; always present (maybe {})
//   c cb wb                  completedCount, completedBytes, writtenBlocks (N), counted once per seq
//   r   regrants (M)         seq -> [attempt] or [attempt, at]; always present (maybe {})
//   w a u                    window, allowance, allowanceUntil (N)
//   m   marks (L)            flat [at, next, at, next, ...], oldest first
//
// Map keys are seqs in base 36 (a seq of 10 million is 5 characters): with a full 64-entry done map
// the item stays under 1 KB, so each update is one write unit. `d` and `r` are created with the item
// and never removed, so the nested SET/REMOVE paths below are always valid.

import type {
  FlowAdvance,
  FlowControl,
  FlowKey,
  FlowState,
  GrantFlow,
  GrantMark,
  Regrant,
} from '../../engine/cycle/ports.ts';
import { ConfigError, FerryError } from '../../engine/errors.ts';
import { cycleKeys } from './cycle-items.ts';
import { MalformedStateError, StateConflictError } from './errors.ts';
import { type Client, TableItems } from './items.ts';
import { describeKey, type Key } from './schema.ts';

type Entry = { readonly seq: number; readonly bytes: number; readonly blocks: number };

/** The map key of a seq in `d` and `r`. */
export const seqKey = (seq: number): string => seq.toString(36);

function seqOf(key: string): number {
  const seq = Number.parseInt(key, 36);
  return seqKey(seq) === key ? seq : Number.NaN;
}

const isCount = (n: unknown): n is number => typeof n === 'number' && Number.isSafeInteger(n) && n >= 0;

function checkCount(n: number, what: string, key: FlowKey): void {
  if (!isCount(n)) {
    throw new ConfigError(
      `${what} of disk ${key.disk} in cycle ${key.cycleId} must be a whole number >= 0, got ${n}`,
    );
  }
}

/** The flow item does not exist: the cycle's prepare did not create it (or it is another cycle's). */
export class FlowMissingError extends FerryError {
  constructor(key: FlowKey, table: string) {
    super(
      `grant flow of disk ${key.disk} in cycle ${key.cycleId} of set ${key.set} does not exist in table ${table}`,
      {
        disk: key.disk,
      },
    );
    this.name = 'FlowMissingError';
  }
}

export class DynamoGrantFlow implements GrantFlow {
  private readonly items: TableItems;

  constructor(client: Client, opts: { table: string }) {
    this.items = new TableItems(client, opts.table);
  }

  /** One conditional PutItem; on an existing flow, that flow (returned with the failure: no read). */
  async create(key: FlowKey, initial: { window: number; allowance: number }): Promise<FlowState> {
    checkCount(initial.window, 'window', key);
    checkCount(initial.allowance, 'allowance', key);
    const k = cycleKeys.flow(key.set, key.disk, key.cycleId);
    const item = {
      v: 0,
      o: true,
      n: 0,
      l: 0,
      g: 0,
      b: 0,
      d: {},
      c: 0,
      cb: 0,
      wb: 0,
      r: {},
      w: initial.window,
      a: initial.allowance,
      u: 0,
      m: [],
    };
    const out = await this.items.putOrCurrent(k, item, { ConditionExpression: 'attribute_not_exists(pk)' });
    if (out.ok) return this.parse(k, key, out.item);
    if (out.current === undefined) throw new FlowMissingError(key, this.items.table); // deleted meanwhile
    return this.parse(k, key, out.current);
  }

  async get(key: FlowKey): Promise<FlowState | undefined> {
    const k = cycleKeys.flow(key.set, key.disk, key.cycleId);
    const item = await this.items.getRaw(k, { disk: key.disk });
    return item === undefined ? undefined : this.parse(k, key, item);
  }

  /**
   * One UpdateItem: `SET d.<seq> = bytes` for every entry and one `ADD` of the counters, on condition
   * that every seq is at or above `l` and not in `d`. When that fails (a duplicate delivery: some seq
   * was counted already), the failure carries the item, the entries still to count are picked from
   * it and the update is sent again for those only, so each seq is counted exactly once and a batch
   * with duplicates costs two requests. An emptied batch costs no more requests.
   */
  async complete(key: FlowKey, entries: readonly Entry[]): Promise<{ state: FlowState; counted: number[] }> {
    const k = cycleKeys.flow(key.set, key.disk, key.cycleId);
    // The same seq twice in one call counts once (two SETs of one path are refused by DynamoDB).
    const bySeq = new Map<number, Entry>();
    for (const e of entries) {
      checkCount(e.seq, 'seq', key);
      checkCount(e.bytes, `bytes of seq ${e.seq}`, key);
      checkCount(e.blocks, `blocks of seq ${e.seq}`, key);
      if (!bySeq.has(e.seq)) bySeq.set(e.seq, e);
    }
    let pending = [...bySeq.values()];
    if (pending.length === 0) {
      const state = await this.get(key);
      if (state === undefined) throw new FlowMissingError(key, this.items.table);
      return { state, counted: [] };
    }
    // Each failed round drops at least one entry (counted meanwhile, or now below low: low only rises
    // over counted seqs), so this ends within entries + 1 rounds; the bound only guards a defect.
    for (let round = 0; ; round++) {
      if (round > bySeq.size + 1) {
        throw new StateConflictError(
          `completions of disk ${key.disk} in cycle ${key.cycleId} kept failing their condition`,
          this.items.where(k, key.disk),
        );
      }
      const names: Record<string, string> = { '#d': 'd', '#l': 'l', '#c': 'c', '#cb': 'cb', '#wb': 'wb' };
      const values: Record<string, unknown> = {};
      const sets: string[] = [];
      const conditions = ['attribute_exists(pk)', '#l <= :lowest'];
      let bytes = 0;
      let blocks = 0;
      pending.forEach((e, i) => {
        names[`#s${i}`] = seqKey(e.seq);
        values[`:b${i}`] = e.bytes;
        sets.push(`#d.#s${i} = :b${i}`);
        conditions.push(`attribute_not_exists(#d.#s${i})`);
        bytes += e.bytes;
        blocks += e.blocks;
      });
      values[':lowest'] = Math.min(...pending.map((e) => e.seq));
      values[':n'] = pending.length;
      values[':bytes'] = bytes;
      values[':blocks'] = blocks;
      const out = await this.items.updateOrCurrent(k, {
        UpdateExpression: `SET ${sets.join(', ')} ADD #c :n, #cb :bytes, #wb :blocks`,
        ConditionExpression: conditions.join(' AND '),
        ExpressionAttributeNames: names,
        ExpressionAttributeValues: values,
      });
      if (out.ok) return { state: this.parse(k, key, out.item), counted: pending.map((e) => e.seq) };
      if (out.current === undefined) throw new FlowMissingError(key, this.items.table);
      const state = this.parse(k, key, out.current);
      const still = pending.filter((e) => e.seq >= state.low && !state.done.has(e.seq));
      if (still.length === 0) return { state, counted: [] };
      pending = still;
    }
  }

  /**
   * One UpdateItem conditioned on `v = expectVersion AND o = true`: SET low, cursor and re-grants,
   * REMOVE the done and re-grant entries now below low, ADD 1 to the version. Completions that
   * landed meanwhile stay (they only touch `d` and the counters).
   */
  async advance(key: FlowKey, expectVersion: number, change: FlowAdvance): Promise<FlowState | undefined> {
    for (const [field, n] of [
      ['low', change.low],
      ['lowBytes', change.lowBytes],
      ['next', change.next],
      ['grantedBytes', change.grantedBytes],
    ] as const) {
      checkCount(n, field, key);
    }
    const set = new Set(change.regrants.keys());
    const overlap = change.dropRegrants.find((seq) => set.has(seq));
    if (overlap !== undefined) {
      throw new FerryError(
        `advance of disk ${key.disk} both issues and drops the re-grant of seq ${overlap}`,
        {
          disk: key.disk,
          seq: overlap,
        },
      );
    }
    const k = cycleKeys.flow(key.set, key.disk, key.cycleId);
    const names: Record<string, string> = {
      '#v': 'v',
      '#o': 'o',
      '#l': 'l',
      '#b': 'b',
      '#n': 'n',
      '#g': 'g',
    };
    const values: Record<string, unknown> = {
      ':v': expectVersion,
      ':open': true,
      ':one': 1,
      ':l': change.low,
      ':b': change.lowBytes,
      ':n': change.next,
      ':g': change.grantedBytes,
    };
    const sets = ['#l = :l', '#b = :b', '#n = :n', '#g = :g'];
    const removes: string[] = [];
    let i = 0;
    for (const [seq, regrant] of change.regrants) {
      names[`#k${i}`] = seqKey(seq);
      values[`:r${i}`] = regrantValue(seq, regrant, key);
      sets.push(`#r.#k${i} = :r${i}`);
      i++;
    }
    for (const seq of new Set(change.dropRegrants)) {
      names[`#k${i}`] = seqKey(seq);
      removes.push(`#r.#k${i}`);
      i++;
    }
    for (const seq of new Set(change.dropDone)) {
      names[`#k${i}`] = seqKey(seq);
      removes.push(`#d.#k${i}`);
      i++;
    }
    // DynamoDB refuses a placeholder the expressions do not use.
    if (change.regrants.size > 0 || change.dropRegrants.length > 0) names['#r'] = 'r';
    if (change.dropDone.length > 0) names['#d'] = 'd';
    const out = await this.items.updateOrCurrent(k, {
      UpdateExpression: `SET ${sets.join(', ')}${removes.length > 0 ? ` REMOVE ${removes.join(', ')}` : ''} ADD #v :one`,
      ConditionExpression: '#v = :v AND #o = :open',
      ExpressionAttributeNames: names,
      ExpressionAttributeValues: values,
    });
    if (out.ok) return this.parse(k, key, out.item);
    if (out.current === undefined) throw new FlowMissingError(key, this.items.table);
    return undefined;
  }

  /** One UpdateItem (bumps the version, so an advance computed before it loses). */
  async control(key: FlowKey, change: FlowControl): Promise<FlowState> {
    const k = cycleKeys.flow(key.set, key.disk, key.cycleId);
    const names: Record<string, string> = { '#v': 'v' };
    const values: Record<string, unknown> = { ':one': 1 };
    const sets: string[] = [];
    const put = (attribute: string, value: unknown) => {
      names[`#${attribute}`] = attribute;
      values[`:${attribute}`] = value;
      sets.push(`#${attribute} = :${attribute}`);
    };
    if (change.window !== undefined) {
      checkCount(change.window, 'window', key);
      put('w', change.window);
    }
    if (change.allowance !== undefined) {
      checkCount(change.allowance, 'allowance', key);
      put('a', change.allowance);
    }
    if (change.allowanceUntil !== undefined) {
      checkCount(change.allowanceUntil, 'allowanceUntil', key);
      put('u', change.allowanceUntil);
    }
    if (change.marks !== undefined)
      put(
        'm',
        change.marks.flatMap((mark) => markValue(mark, key)),
      );
    if (change.open !== undefined) put('o', change.open);
    if (change.addRegrants !== undefined && change.addRegrants.size > 0) {
      names['#r'] = 'r';
      let i = 0;
      for (const [seq, regrant] of change.addRegrants) {
        names[`#k${i}`] = seqKey(seq);
        values[`:r${i}`] = regrantValue(seq, regrant, key);
        sets.push(`#r.#k${i} = :r${i}`);
        i++;
      }
    }
    const out = await this.items.update(k, {
      UpdateExpression: `${sets.length > 0 ? `SET ${sets.join(', ')} ` : ''}ADD #v :one`,
      ConditionExpression: 'attribute_exists(pk)',
      ExpressionAttributeNames: names,
      ExpressionAttributeValues: values,
      ReturnValues: 'ALL_NEW',
    });
    if (out === undefined) throw new FlowMissingError(key, this.items.table);
    return this.parse(k, key, out);
  }

  /** Reads the item into a FlowState, refusing anything this adapter did not write. */
  private parse(k: Key, key: FlowKey, item: Record<string, unknown>): FlowState {
    const bad = (why: string) =>
      new MalformedStateError(
        `DynamoDB item ${describeKey(k)} in table ${this.items.table} is malformed: ${why}`,
        {
          table: this.items.table,
          key: describeKey(k),
          disk: key.disk,
        },
      );
    const num = (name: string): number => {
      const v = item[name];
      if (!isCount(v)) throw bad(`${name} is not a whole number >= 0`);
      return v;
    };
    const map = (name: string): Record<string, unknown> => {
      const v = item[name];
      if (typeof v !== 'object' || v === null || Array.isArray(v) || v instanceof Uint8Array) {
        throw bad(`${name} is not a map`);
      }
      return v as Record<string, unknown>;
    };
    if (typeof item.o !== 'boolean') throw bad('o is not a boolean');
    const done = new Map<number, number>();
    for (const [name, bytes] of Object.entries(map('d'))) {
      const seq = seqOf(name);
      if (!isCount(seq) || !isCount(bytes)) throw bad(`done entry ${name} is malformed`);
      done.set(seq, bytes);
    }
    const regrants = new Map<number, Regrant>();
    for (const [name, value] of Object.entries(map('r'))) {
      const seq = seqOf(name);
      const [attempt, at, ...rest] = Array.isArray(value) ? (value as unknown[]) : [];
      if (
        !isCount(seq) ||
        !isCount(attempt) ||
        attempt < 1 ||
        !(at === undefined || isCount(at)) ||
        rest.length > 0
      ) {
        throw bad(`re-grant entry ${name} is malformed`);
      }
      regrants.set(seq, at === undefined ? { attempt } : { attempt, at });
    }
    const flat = item.m;
    if (!Array.isArray(flat) || flat.length % 2 !== 0 || !flat.every(isCount))
      throw bad('m is not a list of marks');
    const marks: GrantMark[] = [];
    for (let i = 0; i + 1 < flat.length; i += 2)
      marks.push({ at: flat[i] as number, next: flat[i + 1] as number });
    return {
      version: num('v'),
      open: item.o,
      next: num('n'),
      low: num('l'),
      grantedBytes: num('g'),
      lowBytes: num('b'),
      done,
      completedCount: num('c'),
      completedBytes: num('cb'),
      writtenBlocks: num('wb'),
      regrants,
      window: num('w'),
      allowance: num('a'),
      allowanceUntil: num('u'),
      marks,
    };
  }
}

function regrantValue(seq: number, regrant: Regrant, key: FlowKey): number[] {
  checkCount(seq, 're-granted seq', key);
  if (!Number.isSafeInteger(regrant.attempt) || regrant.attempt < 1) {
    throw new ConfigError(
      `re-grant of seq ${seq} of disk ${key.disk} has attempt ${regrant.attempt}, not >= 1`,
    );
  }
  if (regrant.at === undefined) return [regrant.attempt];
  checkCount(regrant.at, `re-grant time of seq ${seq}`, key);
  return [regrant.attempt, regrant.at];
}

function markValue(mark: GrantMark, key: FlowKey): number[] {
  checkCount(mark.at, 'mark time', key);
  checkCount(mark.next, 'mark cursor', key);
  return [mark.at, mark.next];
}
