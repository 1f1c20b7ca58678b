// The operational parameters: their defaults, and how an operator's settings are read and checked.
import { z } from 'zod';
import { ConfigError } from './errors.ts';
import { formatBytes, GiB, KiB, MiB, parseSize, TiB } from './units.ts';

/** Resolved parameters, all sizes in bytes. */
export interface ReplicationParams {
  /** Largest descriptor / chunk. */
  readonly chunkSize: number;
  /** In-flight bytes per disk: the starting level when adaptive, the fixed window otherwise. */
  readonly window: number;
  /** The steps the adaptive controller moves a disk's window between, ascending. */
  readonly windowLevels: readonly number[];
  /** Progress is made durable at least this often. */
  readonly checkpointInterval: number;
  /** Aggregate in-flight bytes across all disks of a node; never exceeded. */
  readonly nodeBudget: number;
  /** Whether the controller adapts each disk's window; false pins it at `window`. */
  readonly adaptive: boolean;
}

/** The product spec's defaults; the only place they are written down. */
export const DEFAULT_PARAMS: ReplicationParams = Object.freeze({
  // Two 512 KiB EBS blocks per chunk, so one request pair; small enough that a retry re-sends little.
  chunkSize: 1 * MiB,
  // The spec's starting per-disk window: 32 chunks in flight hide WAN latency without hogging the node.
  window: 32 * MiB,
  // The adaptive controller's steps: half to double the start, in steps fine enough (x1.5 at most) that
  // one step down on throttling does not throw away most of the throughput.
  windowLevels: Object.freeze([16 * MiB, 24 * MiB, 32 * MiB, 48 * MiB, 64 * MiB]),
  // A crash re-sends at most this plus the window; durable writes more often would cost more than they save.
  checkpointInterval: 500 * MiB,
  // Four disks at the top window level; bounds the memory a node buffers whatever the change volume.
  nodeBudget: 256 * MiB,
  // Throttling and latency vary by hour and by target; a fixed window is for tests and diagnosis.
  adaptive: true,
});

// A chunk is buffered whole, hashed and retried as one unit; above the top window level a single
// chunk would fill a disk's whole window (no pipelining) and every retry would re-send tens of MiB.
const MAX_CHUNK_SIZE = 64 * MiB;

const size = z.union([z.number(), z.string()], {
  error: 'expected a size such as "32 MiB" or a whole number of bytes',
});

const schema = z.strictObject({
  chunkSize: size.optional(),
  window: size.optional(),
  windowLevels: z.array(size).min(1).optional(),
  checkpointInterval: size.optional(),
  nodeBudget: size.optional(),
  adaptive: z.boolean().optional(),
});

/** A size exactly as the operator can type it back: "768 KiB", "1 MiB", "1536 B". */
function exact(bytes: number): string {
  for (const [unit, name] of [
    [TiB, 'TiB'],
    [GiB, 'GiB'],
    [MiB, 'MiB'],
    [KiB, 'KiB'],
  ] as const) {
    if (bytes >= unit && bytes % unit === 0) return `${bytes / unit} ${name}`;
  }
  return `${bytes} B`;
}

/**
 * The error for settings nobody reads, listing the ones that exist. `origin` says where they came
 * from ("job file erp.json") when the caller knows. Also used by readers that must refuse a key
 * before a schema would drop it (`"__proto__"`).
 */
export function unknownSettings(keys: readonly string[], origin?: string): ConfigError {
  const known = Object.keys(schema.shape).join(', ');
  return new ConfigError(
    `${origin ? `${origin}: ` : ''}unknown setting${keys.length > 1 ? 's' : ''} ${keys.join(', ')} (known: ${known})`,
    { setting: keys[0] },
  );
}

/** Every message names its setting, so it reads on its own in a log line. */
function refuse(setting: string, message: string): never {
  throw new ConfigError(message, { setting });
}

/**
 * Reads replication parameters from configuration (a file, CLI flags, an event), fills in the defaults
 * and refuses contradictions with a ConfigError naming the setting. `targetBlockSize` is the write unit
 * of the disk targets the parameters will be used with (EBS 512 KiB, Azure 512 B).
 */
export function resolveParams(input: unknown, opts: { targetBlockSize: number }): ReplicationParams {
  const { targetBlockSize } = opts;
  if (!Number.isSafeInteger(targetBlockSize) || targetBlockSize <= 0) {
    refuse('targetBlockSize', `targetBlockSize ${targetBlockSize} is not a positive whole number of bytes`);
  }
  const parsed = schema.safeParse(input ?? {});
  if (!parsed.success) {
    const issue = parsed.error.issues[0]!;
    if (issue.code === 'unrecognized_keys') throw unknownSettings(issue.keys);
    // Same spelling as parseSize's messages for list items: windowLevels[2].
    const setting = issue.path
      .map((k, i) => (typeof k === 'number' ? `[${k}]` : `${i ? '.' : ''}${String(k)}`))
      .join('');
    if (setting === '') refuse('parameters', `replication parameters: ${issue.message}`);
    refuse(setting, `${setting}: ${issue.message}`);
  }
  const raw = parsed.data;
  const read = (key: 'chunkSize' | 'window' | 'checkpointInterval' | 'nodeBudget'): number => {
    const value = raw[key];
    return value === undefined ? DEFAULT_PARAMS[key] : parseSize(value, key);
  };

  const chunkSize = read('chunkSize');
  const window = read('window');
  const windowLevels =
    raw.windowLevels === undefined
      ? DEFAULT_PARAMS.windowLevels
      : raw.windowLevels.map((level, i) => parseSize(level, `windowLevels[${i}]`));
  const checkpointInterval = read('checkpointInterval');
  const nodeBudget = read('nodeBudget');
  const adaptive = raw.adaptive ?? DEFAULT_PARAMS.adaptive;

  if (chunkSize === 0) {
    refuse(
      'chunkSize',
      `chunkSize 0 B must hold at least one of the target's ${exact(targetBlockSize)} blocks`,
    );
  }
  if (chunkSize % targetBlockSize !== 0) {
    refuse(
      'chunkSize',
      `chunkSize ${exact(chunkSize)} is not a multiple of the target's ${exact(targetBlockSize)} block size`,
    );
  }
  if (chunkSize > MAX_CHUNK_SIZE) {
    refuse('chunkSize', `chunkSize ${exact(chunkSize)} is above the ${exact(MAX_CHUNK_SIZE)} limit`);
  }
  if (window < chunkSize) {
    refuse('window', `window ${exact(window)} is smaller than one chunk (chunkSize ${exact(chunkSize)})`);
  }
  // Levels are only used when adaptive; defaults that go unused are not held against a fixed window,
  // but levels the operator wrote are always checked.
  if (adaptive || raw.windowLevels !== undefined) {
    windowLevels.forEach((level, i) => {
      const previous = windowLevels[i - 1];
      if (previous !== undefined && level <= previous) {
        refuse(
          'windowLevels',
          `windowLevels must be strictly ascending, but ${exact(level)} follows ${exact(previous)}`,
        );
      }
      if (level < chunkSize) {
        refuse(
          'windowLevels',
          `windowLevels: level ${exact(level)} is smaller than one chunk (chunkSize ${exact(chunkSize)})`,
        );
      }
    });
  }
  if (adaptive && !windowLevels.includes(window)) {
    refuse(
      'window',
      `window ${exact(window)} is not one of the adaptive levels (${windowLevels.map(exact).join(', ')}); ` +
        'pick one of them or set adaptive: false to pin a fixed window',
    );
  }
  if (checkpointInterval < chunkSize) {
    refuse(
      'checkpointInterval',
      `checkpointInterval ${exact(checkpointInterval)} is smaller than one chunk (chunkSize ${exact(chunkSize)})`,
    );
  }
  if (nodeBudget < chunkSize) {
    refuse(
      'nodeBudget',
      `nodeBudget ${exact(nodeBudget)} is smaller than one chunk (chunkSize ${exact(chunkSize)}): nothing could move`,
    );
  }

  return Object.freeze({
    chunkSize,
    window,
    windowLevels: Object.freeze([...windowLevels]),
    checkpointInterval,
    nodeBudget,
    adaptive,
  });
}

/** One line for logs and `ferry` output: "chunk 1.00 MiB, window 32.0 MiB adaptive (16.0 MiB … 64.0 MiB), …". */
export function describeParams(p: ReplicationParams): string {
  const levels = p.windowLevels.map(formatBytes).join(' / ');
  const window = p.adaptive
    ? `window ${formatBytes(p.window)} adaptive over ${levels}`
    : `window ${formatBytes(p.window)} fixed`;
  return (
    `chunk ${formatBytes(p.chunkSize)}, ${window}, checkpoint every ${formatBytes(p.checkpointInterval)}, ` +
    `node budget ${formatBytes(p.nodeBudget)}`
  );
}
