// Reads a change map file (the extents a cycle copies, as CBT or a diff gives them) and refuses,
// naming the entry, anything that is not exactly a list of whole, finite, non-negative extents.
import { readFile } from 'node:fs/promises';
import { ChangeMapError } from '../shared/engine/errors.ts';
import type { Extent } from '../shared/engine/extents.ts';

/** Reads a change map: a JSON list of {offset, length} (or {"extents": [...]}), as CBT or a diff gives. */
export async function readChangeFile(path: string, disk: string): Promise<Extent[]> {
  const fail = (why: string, cause?: unknown): never => {
    throw new ChangeMapError(`disk ${disk}: change map ${path} ${why}`, {
      disk,
      ...(cause === undefined ? {} : { cause }),
    });
  };
  let value: unknown;
  try {
    value = JSON.parse(await readFile(path, 'utf8'));
  } catch (err) {
    return fail(`cannot be read as JSON: ${(err as Error).message}`, err);
  }
  let list: unknown = value;
  if (isRecord(value)) {
    const extra = Object.keys(value).filter((k) => k !== 'extents');
    if (extra.length > 0 || !Object.hasOwn(value, 'extents')) {
      fail(`${SHAPE}, not an object with ${describeKeys(Object.keys(value))}`);
    }
    list = value.extents;
  }
  if (!Array.isArray(list)) {
    return fail(
      list === value
        ? `${SHAPE}, not ${describeValue(list)}`
        : `has "extents" that are ${describeValue(list)}, not a list of {"offset": N, "length": N}`,
    );
  }
  return list.map((entry, i) => readExtent(entry, (why) => fail(`entry ${i}: ${why}`)));
}

const SHAPE = 'must be a JSON list of {"offset": N, "length": N} in bytes (or {"extents": [...]})';
const EXTENT_FIELDS = ['offset', 'length'] as const;

const isRecord = (v: unknown): v is Record<string, unknown> =>
  typeof v === 'object' && v !== null && !Array.isArray(v);

/** One change-map entry; `fail` says which entry in the operator's terms. */
function readExtent(entry: unknown, fail: (why: string) => never): Extent {
  if (!isRecord(entry)) return fail(`is ${describeValue(entry)}, not {"offset": N, "length": N}`);
  // Own keys, so a "__proto__" key (JSON.parse makes it an own property) is refused like any other.
  const unknown = Object.keys(entry).filter((k) => !(EXTENT_FIELDS as readonly string[]).includes(k));
  if (unknown.length > 0) {
    fail(
      `has unknown field${unknown.length > 1 ? 's' : ''} ${describeKeys(unknown)} (allowed: offset, length)`,
    );
  }
  const [offset, length] = EXTENT_FIELDS.map((field) => {
    if (!Object.hasOwn(entry, field)) return fail(`has no ${field}`);
    const v = entry[field];
    if (typeof v !== 'number') return fail(`${field} ${describeValue(v)} is not a number of bytes`);
    // JSON has no NaN or Infinity, but 1e999 parses as Infinity.
    if (!Number.isFinite(v)) return fail(`${field} ${v} is not a finite number`);
    if (!Number.isInteger(v)) return fail(`${field} ${v} is not a whole number of bytes`);
    if (v < 0) return fail(`${field} ${v} is negative`);
    if (!Number.isSafeInteger(v)) return fail(`${field} ${v} is beyond 2^53 bytes`);
    return v;
  }) as [number, number];
  if (!Number.isSafeInteger(offset + length)) {
    fail(`extent at offset ${offset} with length ${length} ends beyond 2^53 bytes`);
  }
  return { offset, length };
}

function describeKeys(keys: readonly string[]): string {
  return keys.length === 0 ? 'no fields' : keys.map((k) => JSON.stringify(k)).join(', ');
}

function describeValue(v: unknown): string {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'a list';
  if (typeof v === 'object') return 'an object';
  if (typeof v === 'string') return `the string ${JSON.stringify(v.length > 40 ? `${v.slice(0, 40)}…` : v)}`;
  return `${typeof v === 'boolean' ? 'the boolean ' : ''}${String(v)}`;
}
