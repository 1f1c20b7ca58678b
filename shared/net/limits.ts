// What one peer, one credential and all of them together may hold of a replication node: named
// settings with their defaults and reasons, and the counting behind the connection limits.
import { ConfigError } from '../engine/errors.ts';
import { formatBytes, KiB, MiB, TiB } from '../engine/units.ts';
import { PROTOCOL_BLOCK_SIZE } from './protocol.ts';

export interface NodeLimits {
  /** Connections at once, every credential together. */
  readonly maxConnections: number;
  /** Connections at once of one credential. */
  readonly maxConnectionsPerCredential: number;
  /** From accepting a connection to its complete HELLO (ms); bytes of an unfinished HELLO do not count. */
  readonly handshakeTimeoutMs: number;
  /**
   * Longest a session may go without a complete frame that moves it on (HELLO, CHUNK, EXTENTS,
   * COMMIT, FLUSH, AFTER_PUBLISH) while the node owes it nothing (ms); also the longest one frame
   * may take to arrive. Then its connections are closed and its disk, lock and credit are free.
   */
  readonly idleTimeoutMs: number;
  /** Largest disk a HELLO may declare (bytes). */
  readonly maxDiskBytes: number;
  /** Apparent bytes of the images whose latest session one credential started, together. */
  readonly maxImageBytesPerCredential: number;
  /** Extents one session's EXTENTS may hold before COMMIT (and never more than its disk can have). */
  readonly maxCommitExtents: number;
  /** Replies queued to a peer that does not read them before the node stops reading from it (bytes). */
  readonly replyQueueBytes: number;
  /** Replies queued to such a peer before the node drops the connection (bytes). */
  readonly maxReplyQueueBytes: number;
}

export const DEFAULT_LIMITS: Readonly<NodeLimits> = Object.freeze({
  // Sixteen disks at sixteen connections each; beyond that a node is being flooded, not used. Each
  // connection may hold one partial frame of its own, so this also bounds memory outside credit.
  maxConnections: 256,
  // Half the node: one source, or one stolen credential, never takes every connection.
  maxConnectionsPerCredential: 128,
  // A source sends HELLO as soon as it is connected: 10 s is many round trips even at 200 ms RTT.
  handshakeTimeoutMs: 10_000,
  // The largest chunk (64 MiB) arrives in 107 s at 5 Mbit/s: a source slower than that is not
  // replicating; an idle peer holding a disk's lock is released within two minutes.
  idleTimeoutMs: 120_000,
  // The largest EBS volume (io2 Block Express); a larger claim is a probe, not a disk.
  maxDiskBytes: 64 * TiB,
  // Four disks of the largest size per credential: room for real sets, a bound for probes that leave
  // sparse images of whatever size they claim.
  maxImageBytesPerCredential: 256 * TiB,
  // Ten times a badly fragmented cycle's 100k extents; held as 16 bytes each (16 MiB) until COMMIT.
  maxCommitExtents: 1024 * 1024,
  // Thousands of ACKs: a source that reads its replies never has this much queued.
  replyQueueBytes: 256 * KiB,
  // Far past anything a reading source queues; a peer this far behind is gone or hostile.
  maxReplyQueueBytes: 4 * MiB,
});

/**
 * The limits among `options` (other keys are ignored), defaults for the rest; refuses values that
 * are not positive whole numbers.
 */
export function resolveLimits(options: Partial<NodeLimits> = {}): NodeLimits {
  const limits = { ...DEFAULT_LIMITS };
  for (const name of Object.keys(DEFAULT_LIMITS) as (keyof NodeLimits)[]) {
    const value = options[name];
    if (value !== undefined) limits[name] = value;
  }
  for (const [name, value] of Object.entries(limits)) {
    if (!Number.isSafeInteger(value) || value <= 0) {
      throw new ConfigError(`node limit ${name} is ${value}; it must be a whole number above 0`, {
        setting: name,
      });
    }
  }
  if (limits.maxConnectionsPerCredential > limits.maxConnections) {
    throw new ConfigError(
      `maxConnectionsPerCredential ${limits.maxConnectionsPerCredential} is above maxConnections ${limits.maxConnections}`,
      { setting: 'maxConnectionsPerCredential' },
    );
  }
  if (limits.replyQueueBytes > limits.maxReplyQueueBytes) {
    throw new ConfigError(
      `replyQueueBytes ${limits.replyQueueBytes} is above maxReplyQueueBytes ${limits.maxReplyQueueBytes}`,
      { setting: 'replyQueueBytes' },
    );
  }
  return limits;
}

/** The ERROR text for a request over a limit: the setting's name, its value, and what hit it. */
export function overLimit(limit: keyof NodeLimits, value: number, what: string): string {
  const shown = limit.endsWith('Ms')
    ? `${value} ms`
    : limit.includes('Bytes')
      ? formatBytes(value)
      : String(value);
  return `limit ${limit} (${shown}): ${what}`;
}

/**
 * Most extents a change map of a disk this size can have: normalised extents are block-aligned and
 * never touch, so at most one per two blocks (plus one for a short last block).
 */
export function maxExtentsFor(sizeBytes: number, limits: NodeLimits): number {
  return Math.min(limits.maxCommitExtents, Math.floor(Math.ceil(sizeBytes / PROTOCOL_BLOCK_SIZE) / 2) + 1);
}

/** Seqs a cycle of a disk this size can have: every chunk holds a block of its own chunk cell. */
export function maxSeqsFor(sizeBytes: number): number {
  return Math.max(1, Math.ceil(sizeBytes / PROTOCOL_BLOCK_SIZE));
}

/** Connections counted in total and per credential. */
export class ConnectionCounts {
  private total = 0;
  private readonly byCredential = new Map<string, number>();

  constructor(private readonly limits: NodeLimits) {}

  /** The limit a new connection of `credential` would break, if any. */
  over(credential: string): 'maxConnections' | 'maxConnectionsPerCredential' | undefined {
    if ((this.byCredential.get(credential) ?? 0) >= this.limits.maxConnectionsPerCredential) {
      return 'maxConnectionsPerCredential';
    }
    return this.total >= this.limits.maxConnections ? 'maxConnections' : undefined;
  }

  add(credential: string): void {
    this.total++;
    this.byCredential.set(credential, (this.byCredential.get(credential) ?? 0) + 1);
  }

  remove(credential: string): void {
    this.total--;
    const left = (this.byCredential.get(credential) ?? 1) - 1;
    if (left === 0) this.byCredential.delete(credential);
    else this.byCredential.set(credential, left);
  }
}
