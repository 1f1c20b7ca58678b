// Turns the URIs operators type (file:PATH, nbd://, nbd+unix://) into source and target adapters.
import { readFile } from 'node:fs/promises';
import { ChangeMapError, ConfigError } from '../engine/errors.ts';
import type { Extent } from '../engine/extents.ts';
import type { DiskSource, DiskTarget } from '../engine/ports.ts';
import { checkSourceSecurity, readJoinFile } from '../net/join.ts';
import { parseFerryUri } from '../net/uri.ts';
import { FileSource } from './file-source.ts';
import { FILE_TARGET_BLOCK_SIZE, FileTarget } from './file-target.ts';

export async function openSource(uri: string): Promise<DiskSource> {
  if (uri.startsWith('nbd://') || uri.startsWith('nbd+unix://')) {
    const { NbdSource } = await import('./nbd/source.ts');
    return NbdSource.open(uri);
  }
  if (uri.startsWith('ebs://')) {
    const { openEbsSourceUri } = await import('../aws/ebs/uri.ts');
    return openEbsSourceUri(uri);
  }
  return FileSource.open(filePath(uri, 'source'));
}

/** How a `ferry://` target is reached: the node's join file (TLS), or plain TCP toward a loopback node. */
export interface RemoteAccess {
  /** Path of the node's join file. */
  readonly join?: string | undefined;
  readonly insecure?: boolean | undefined;
}

export function openTarget(uri: string, access: RemoteAccess = {}): DiskTarget {
  if (uri.startsWith('ferry://')) return remoteTarget(uri, access);
  if (access.join !== undefined) {
    throw new ConfigError(`target ${uri}: a join file is for ferry:// targets only`, { setting: 'join' });
  }
  if (uri.startsWith('nbd')) {
    throw new ConfigError(
      `target ${uri}: NBD exports are sources; targets are file: images (or ferry:// nodes)`,
      {
        setting: 'target',
      },
    );
  }
  return new FileTarget(filePath(uri, 'target'));
}

/**
 * A `ferry://HOST:PORT/DISK` replication node. The network code is loaded on first use, like the
 * NBD source's; until then the target answers with its name (the URI without its query) and the
 * node's block size, which the node confirms when it welcomes the connection.
 */
function remoteTarget(uri: string, access: RemoteAccess): DiskTarget {
  // Checked now (host, port, disk name, join file), so a bad URI or a missing, foreign or expired
  // credential is refused as configuration before any disk is read.
  const parsed = parseFerryUri(uri);
  if (access.join !== undefined && access.insecure) {
    throw new ConfigError(`target ${parsed.name}: give a join file or --insecure, not both`, {
      setting: 'join',
    });
  }
  const security = {
    join: access.join === undefined ? undefined : readJoinFile(access.join),
    insecure: access.insecure,
  };
  checkSourceSecurity(parsed, security);
  let loaded: Promise<DiskTarget> | undefined;
  const load = () => {
    loaded ??= import('../net/remote-target.ts').then(
      ({ RemoteTarget }) => new RemoteTarget(parsed, security),
    );
    return loaded;
  };
  return {
    name: parsed.name,
    blockSize: FILE_TARGET_BLOCK_SIZE,
    // Every optional method passes through too: the engine asks the node to prove a resume
    // (checkResume) and to make progress durable (flush) before it records progress.
    open: async (sizeBytes, kind, resume, cycleId) => (await load()).open(sizeBytes, kind, resume, cycleId),
    checkResume: async (claim, signal) => (await load()).checkResume?.(claim, signal),
    flush: async () => (await load()).flush?.(),
    writeChunk: async (d, data, sha256, signal) => (await load()).writeChunk(d, data, sha256, signal),
    read: async (offset, length, signal) => (await load()).read(offset, length, signal),
    commit: async (summary) => (await load()).commit(summary),
    afterPublish: async () => (await load()).afterPublish?.(),
    close: async () => {
      if (loaded) await (await loaded).close();
    },
  };
}

/** `file:/abs`, `file:rel`, `file:///abs`, or a bare path. */
export function filePath(uri: string, setting: string): string {
  if (uri.startsWith('file://')) return decodeURIComponent(new URL(uri).pathname);
  if (uri.startsWith('file:')) return uri.slice('file:'.length);
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(uri)) {
    throw new ConfigError(
      `${setting} ${uri}: unsupported scheme (use file:PATH, nbd://HOST:PORT/EXPORT or nbd+unix:///EXPORT?socket=PATH)`,
      {
        setting,
      },
    );
  }
  if (uri === '') throw new ConfigError(`${setting}: empty path`, { setting });
  return uri;
}

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
