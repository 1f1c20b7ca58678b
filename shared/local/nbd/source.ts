// An NBD export (nbdkit, qemu-nbd) as a replication source: pipelined reads over several connections.
import { AbortedError, ConfigError, errorMessage, TransferError } from '../../engine/errors.ts';
import type { Extent } from '../../engine/extents.ts';
import type { DiskSource } from '../../engine/ports.ts';
import { MiB } from '../../engine/units.ts';
import { type BlockStatusExtent, NbdConnection } from './connection.ts';
import { NBD_FLAG_CAN_MULTI_CONN } from './protocol.ts';
import { MAX_CONNECTIONS, type NbdUri, parseNbdUri } from './uri.ts';

/**
 * Block status is asked for this much of the disk at a time, EXTENT_QUERIES_IN_FLIGHT queries at once:
 * replies stay small, and the server (which may take most of a second to describe a fragmented GiB)
 * works on several parts of the disk in parallel instead of one after another, one round trip each.
 */
export const EXTENT_QUERY_BYTES = 128 * MiB;
export const EXTENT_QUERIES_IN_FLIGHT = 8;

export interface NbdSourceOptions {
  /** Connections to open; overrides the URI's `connections=N`. */
  readonly connections?: number;
  readonly handshakeTimeoutMs?: number;
  /** How much of the disk one block-status query covers. */
  readonly extentQueryBytes?: number;
}

export class NbdSource implements DiskSource {
  readonly name: string;
  private reconnecting: Promise<void> | undefined;
  private closed = false;

  private constructor(
    private readonly uri: NbdUri,
    private readonly opts: NbdSourceOptions,
    private readonly connections: NbdConnection[],
    readonly sizeBytes: number,
    /** Whether the server reports base:allocation; otherwise the whole disk counts as allocated. */
    private readonly reportsAllocation: boolean,
  ) {
    this.name = uri.name;
    for (const c of connections) this.watch(c);
  }

  /**
   * Connects to the export. Opens the URI's (or `opts`') number of connections when the server advertises
   * NBD_FLAG_CAN_MULTI_CONN, and only one otherwise, as the protocol asks. All are opened at once, since
   * a handshake is several round trips: when the first reports that the server does not allow more,
   * the others are closed before they carry a single command.
   */
  static async open(uri: string, opts: NbdSourceOptions = {}): Promise<NbdSource> {
    const parsed = parseNbdUri(uri);
    const wanted = opts.connections ?? parsed.connections;
    if (!Number.isInteger(wanted) || wanted < 1 || wanted > MAX_CONNECTIONS) {
      throw new ConfigError(`${parsed.name}: connections must be 1..${MAX_CONNECTIONS}, not ${wanted}`);
    }
    const [firstAttempt, ...extraAttempts] = Array.from({ length: wanted }, () => connect(parsed, opts));
    // Their failures are read below, or do not matter once the first has failed: never unhandled.
    for (const attempt of extraAttempts) attempt.catch(() => undefined);
    const dismiss = () => {
      for (const attempt of extraAttempts) attempt.then((c) => c.close()).catch(() => undefined);
    };
    let first: NbdConnection;
    try {
      first = await firstAttempt!;
    } catch (err) {
      dismiss();
      throw err;
    }
    if ((first.info.transmissionFlags & NBD_FLAG_CAN_MULTI_CONN) === 0) {
      dismiss();
      return new NbdSource(
        parsed,
        opts,
        [first],
        first.info.sizeBytes,
        first.info.allocationContext !== undefined,
      );
    }
    const others = await Promise.allSettled(extraAttempts);
    const connections = [first];
    let failure: unknown;
    for (const result of others) {
      if (result.status === 'fulfilled') connections.push(result.value);
      else failure ??= result.reason;
    }
    if (failure !== undefined) {
      await Promise.all(connections.map((c) => c.close()));
      throw new TransferError(
        `${parsed.name}: opened ${connections.length} of ${wanted} connections: ${errorMessage(failure)} ` +
          '(the server may limit clients, e.g. qemu-nbd --shared; ?connections=1 asks for fewer)',
        {
          disk: parsed.name,
          retryable: failure instanceof TransferError && failure.retryable,
          cause: failure,
        },
      );
    }
    return new NbdSource(
      parsed,
      opts,
      connections,
      first.info.sizeBytes,
      first.info.allocationContext !== undefined,
    );
  }

  /** Connections in use (one when the server does not allow more). */
  get connectionCount(): number {
    return this.connections.length;
  }

  async read(offset: number, length: number, signal?: AbortSignal): Promise<Uint8Array> {
    if (signal?.aborted) {
      throw new AbortedError(`${this.name}: read of ${length} bytes at offset ${offset} aborted`, {
        disk: this.name,
        offset,
      });
    }
    const connection = this.pick() ?? (await this.reconnect());
    return connection.read(offset, length, signal);
  }

  /** As `read`, into `dest` (its length is the length read): no buffer per read. */
  async readInto(offset: number, dest: Uint8Array, signal?: AbortSignal): Promise<void> {
    if (signal?.aborted) {
      throw new AbortedError(`${this.name}: read of ${dest.length} bytes at offset ${offset} aborted`, {
        disk: this.name,
        offset,
      });
    }
    const connection = this.pick() ?? (await this.reconnect());
    await connection.read(offset, dest.length, signal, dest);
  }

  /** Allocated (not hole) extents from base:allocation, sorted, disjoint, adjacent ones merged. */
  async *allocatedExtents(signal?: AbortSignal): AsyncIterable<Extent> {
    if (!this.reportsAllocation) {
      if (this.sizeBytes > 0) yield { offset: 0, length: this.sizeBytes };
      return;
    }
    const step = this.opts.extentQueryBytes ?? EXTENT_QUERY_BYTES;
    // Parts of the disk queried ahead, consumed in order; each promise is caught at once so that one
    // failing while an earlier one is awaited is not an unhandled rejection (it is rethrown in turn).
    const ahead: Promise<BlockStatusExtent[]>[] = [];
    let next = 0;
    const queryAhead = () => {
      while (ahead.length < EXTENT_QUERIES_IN_FLIGHT && next < this.sizeBytes) {
        const part = this.describe(next, Math.min(next + step, this.sizeBytes), signal);
        part.catch(() => undefined);
        ahead.push(part);
        next += step;
      }
    };
    let run: Extent | undefined;
    queryAhead();
    while (ahead.length > 0) {
      const extents = await ahead.shift()!;
      queryAhead();
      for (const extent of extents) {
        if (!extent.hole) {
          // Extents come back consecutive, so an allocated one extends the current run.
          run = { offset: run?.offset ?? extent.offset, length: (run?.length ?? 0) + extent.length };
        } else if (run !== undefined) {
          yield run;
          run = undefined;
        }
      }
    }
    if (run !== undefined) yield run;
  }

  /** base:allocation of [from, to), in as many queries as the server needs, clipped to `to`. */
  private async describe(from: number, to: number, signal?: AbortSignal): Promise<BlockStatusExtent[]> {
    const out: BlockStatusExtent[] = [];
    for (let at = from; at < to; ) {
      const connection = this.pick() ?? (await this.reconnect());
      const before = at;
      for (const extent of await connection.blockStatus(at, to - at, signal)) {
        const end = Math.min(extent.offset + extent.length, to);
        if (end <= at) continue;
        out.push(end === extent.offset + extent.length ? extent : { ...extent, length: end - extent.offset });
        at = end;
      }
      if (at === before) {
        throw new TransferError(`${this.name}: block status at offset ${at} described nothing`, {
          disk: this.name,
          offset: at,
          retryable: false,
        });
      }
    }
    return out;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    // A reconnect under way closes what it opens once it sees `closed`.
    await this.reconnecting?.catch(() => undefined);
    await Promise.all(this.connections.map((c) => c.close()));
  }

  /**
   * A server that is shutting down (ESHUTDOWN on one connection) waits for its clients to leave: let go of
   * every connection, and reconnect when the next read comes.
   */
  private watch(connection: NbdConnection): void {
    connection.onServerShutdown = () => {
      for (const c of this.connections) c.drain();
    };
  }

  /** The least busy open connection; starts replacing dropped ones in the background. */
  private pick(): NbdConnection | undefined {
    if (this.closed) {
      throw new TransferError(`${this.name}: the source is closed`, { disk: this.name, retryable: false });
    }
    const best = this.leastBusy();
    if (best !== undefined && this.connections.some((c) => !c.open)) {
      this.replaceDropped().catch(() => undefined);
    }
    return best;
  }

  /** For when every connection has dropped: waits for them to be reopened. */
  private async reconnect(): Promise<NbdConnection> {
    await this.replaceDropped();
    const best = this.pick();
    if (best !== undefined) return best;
    throw new TransferError(`${this.name}: the connections dropped again while reconnecting`, {
      disk: this.name,
      retryable: true,
    });
  }

  private leastBusy(): NbdConnection | undefined {
    let best: NbdConnection | undefined;
    for (const c of this.connections) {
      if (c.open && (best === undefined || c.inFlight < best.inFlight)) best = c;
    }
    return best;
  }

  /** Reopens dropped connections, one attempt at a time; rejects when none is left open. */
  private replaceDropped(): Promise<void> {
    this.reconnecting ??= this.reopen().finally(() => {
      this.reconnecting = undefined;
    });
    return this.reconnecting;
  }

  private async reopen(): Promise<void> {
    const dropped = this.connections.flatMap((c, i) => (c.open ? [] : [i]));
    const results = await Promise.allSettled(dropped.map(() => connect(this.uri, this.opts)));
    let failure: unknown;
    results.forEach((result, k) => {
      if (result.status === 'rejected') {
        failure ??= result.reason;
        return;
      }
      const fresh = result.value;
      if (this.closed || fresh.info.sizeBytes !== this.sizeBytes) {
        if (!this.closed) {
          failure ??= new TransferError(
            `${this.name}: the export is now ${fresh.info.sizeBytes} bytes, not ${this.sizeBytes}`,
            { disk: this.name, retryable: false },
          );
        }
        void fresh.close();
        return;
      }
      this.watch(fresh);
      const i = dropped[k]!;
      void this.connections[i]!.close();
      this.connections[i] = fresh;
    });
    if (this.closed || this.leastBusy() !== undefined) return;
    throw failure instanceof TransferError
      ? failure
      : new TransferError(`${this.name}: cannot reconnect: ${errorMessage(failure)}`, {
          disk: this.name,
          retryable: true,
          cause: failure,
        });
  }
}

function connect(uri: NbdUri, opts: NbdSourceOptions): Promise<NbdConnection> {
  return NbdConnection.connect(uri.endpoint, {
    exportName: uri.exportName,
    label: uri.name,
    handshakeTimeoutMs: opts.handshakeTimeoutMs,
  });
}
