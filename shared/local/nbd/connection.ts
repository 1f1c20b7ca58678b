// One NBD connection: the fixed-newstyle handshake, then many reads and block-status queries in flight.
import { connect as netConnect, type Socket } from 'node:net';
import { AbortedError, errorMessage, TransferError } from '../../engine/errors.ts';
import type { Extent } from '../../engine/extents.ts';
import { ByteQueue } from '../../runtime/byte-queue.ts';
import * as nbd from './protocol.ts';
import type { NbdEndpoint } from './uri.ts';

/** Connect and handshake must finish within this: a server that accepts but never greets is a dead link. */
export const DEFAULT_HANDSHAKE_TIMEOUT_MS = 30_000;
/** One block-status query covers at most this: fits the 32-bit length field, aligned to any block size. */
export const MAX_BLOCK_STATUS_LENGTH = 2 ** 31;
/** A block-status reply with more extents is refused, so a hostile server cannot make us buffer gigabytes. */
const MAX_EXTENTS_PER_REPLY = 2 ** 20;
/** Handshake replies (export info, context names, error text) are small; anything bigger is not NBD. */
const MAX_OPTION_REPLY_BYTES = 64 * 1024;
/** errno, message length, message, offset. */
const MAX_ERROR_CHUNK_BYTES = 6 + nbd.MAX_STRING_BYTES + 8;
/** Server errors that the same request would hit again; anything else (EIO, ENOMEM, ...) may pass on retry. */
const PERMANENT_ERRNOS = new Set([nbd.NBD_EPERM, nbd.NBD_EINVAL, nbd.NBD_EOVERFLOW, nbd.NBD_ENOTSUP]);
const EMPTY = Buffer.alloc(0);

export interface NbdConnectOptions {
  /** Export name sent with NBD_OPT_GO ('' is the server's default export). */
  readonly exportName: string;
  /** Names the export in messages: the URI without secrets. */
  readonly label: string;
  readonly handshakeTimeoutMs?: number;
}

/** What the handshake agreed on. */
export interface ExportInfo {
  readonly sizeBytes: number;
  readonly transmissionFlags: number;
  /** Requests are aligned to this (NBD_INFO_BLOCK_SIZE minimum; 1 when the server did not say). */
  readonly minimumBlock: number;
  /** Largest single NBD_CMD_READ sent: the server's maximum block size, capped at 32 MiB. */
  readonly maximumRead: number;
  readonly structuredReplies: boolean;
  /** The base:allocation context id, when the server agreed to report allocation. */
  readonly allocationContext: number | undefined;
}

/** One run of base:allocation status. */
export interface BlockStatusExtent extends Extent {
  readonly hole: boolean;
  readonly zero: boolean;
}

/** A request on the wire, waiting for its reply. */
interface Pending {
  readonly cookie: bigint;
  readonly command: number;
  readonly offset: number;
  readonly length: number;
  /** Reads: where the reply's data lands, exactly `length` bytes. */
  readonly data: Buffer | undefined;
  /** Reads: the ranges the reply has described so far, to catch overlaps and gaps. */
  readonly covered: Extent[];
  coveredBytes: number;
  extents: BlockStatusExtent[] | undefined;
  error: TransferError | undefined;
  /** The caller gave up (AbortSignal): the reply is still parsed to stay in step, but its data is dropped. */
  abandoned: boolean;
  errno: number;
  readonly resolve: () => void;
  readonly reject: (err: Error) => void;
}

interface Submitted {
  readonly pending: Pending;
  readonly done: Promise<void>;
}

/** The reply being received: a structured chunk whose payload has not fully arrived, or read data. */
type Frame =
  | { readonly kind: 'chunk'; readonly header: nbd.StructuredReplyHeader; readonly pending: Pending }
  | {
      readonly kind: 'data';
      readonly pending: Pending;
      at: number;
      remaining: number;
      readonly last: boolean;
    };

export class NbdConnection {
  private readonly queue = new ByteQueue();
  private readonly pending = new Map<bigint, Pending>();
  private readonly watchers = new Map<AbortSignal, { callbacks: Set<() => void>; listener: () => void }>();
  private nextCookie = 1n;
  private exportInfo: ExportInfo | undefined;
  private frame: Frame | undefined;
  /** The handshake waits for a fixed number of bytes; transmission parses whatever arrives. */
  private waiter: { size: number; resolve: (buf: Buffer) => void; reject: (err: Error) => void } | undefined;
  /** Set once the connection cannot carry more requests; every later request fails with it. */
  private failure: TransferError | undefined;
  private socketError: Error | undefined;
  private closing = false;
  /** The server is shutting down (ESHUTDOWN here or on a sibling): finish what is in flight, then disconnect. */
  private draining = false;
  private disconnecting = false;
  private readonly closed: Promise<void>;
  /** Called once when the server answers ESHUTDOWN: its other connections should let go too. */
  onServerShutdown: (() => void) | undefined;

  private constructor(
    private readonly socket: Socket,
    private readonly label: string,
    private readonly timeoutMs: number,
  ) {
    let onClosed!: () => void;
    this.closed = new Promise((resolve) => {
      onClosed = resolve;
    });
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('error', (err) => {
      this.socketError ??= err;
    });
    socket.on('close', () => {
      this.onClose();
      onClosed();
    });
  }

  static async connect(endpoint: NbdEndpoint, opts: NbdConnectOptions): Promise<NbdConnection> {
    const socket =
      endpoint.kind === 'unix'
        ? netConnect({ path: endpoint.path })
        : netConnect({ host: endpoint.host, port: endpoint.port });
    const timeoutMs = opts.handshakeTimeoutMs ?? DEFAULT_HANDSHAKE_TIMEOUT_MS;
    const conn = new NbdConnection(socket, opts.label, timeoutMs);
    socket.setNoDelay(true);
    socket.setTimeout(timeoutMs, () => socket.destroy(new Error(`no answer within ${timeoutMs} ms`)));
    try {
      conn.exportInfo = await conn.handshake(opts.exportName);
    } catch (err) {
      const failure = conn.toTransferError(err);
      conn.failure ??= failure;
      socket.destroy();
      throw failure;
    }
    socket.setTimeout(0);
    return conn;
  }

  get info(): ExportInfo {
    return this.exportInfo!;
  }

  /** Requests sent and not yet answered (including abandoned ones: the server is still working on them). */
  get inFlight(): number {
    return this.pending.size;
  }

  /** Whether new requests can be sent. */
  get open(): boolean {
    return this.failure === undefined && !this.closing && !this.draining;
  }

  /**
   * Reads exactly `length` bytes at `offset`, split into requests the server accepts. With `into`
   * (exactly `length` bytes long) the replies land there, without a buffer of their own, when the
   * range is aligned to the server's minimum block.
   */
  async read(offset: number, length: number, signal?: AbortSignal, into?: Uint8Array): Promise<Buffer> {
    this.checkRange('read', offset, length);
    if (signal?.aborted) throw this.aborted('read', offset, length);
    if (length === 0) return Buffer.alloc(0);
    const { minimumBlock, maximumRead, sizeBytes } = this.info;
    // Servers may refuse requests not aligned to their minimum block: read the aligned range, return the middle.
    const start = offset - (offset % minimumBlock);
    const end = Math.min(Math.ceil((offset + length) / minimumBlock) * minimumBlock, sizeBytes);
    const direct =
      into !== undefined && into.length === length && start === offset && end === offset + length;
    const data = direct
      ? Buffer.from(into.buffer, into.byteOffset, into.length)
      : Buffer.allocUnsafe(end - start);
    const requests: Submitted[] = [];
    for (let at = start; at < end; at += maximumRead) {
      const size = Math.min(maximumRead, end - at);
      requests.push(this.submit(nbd.NBD_CMD_READ, at, size, data.subarray(at - start, at - start + size)));
    }
    await this.settle(requests, signal, 'read', offset, length);
    const out =
      start === offset && end === offset + length
        ? data
        : data.subarray(offset - start, offset - start + length);
    if (into !== undefined && !direct) into.set(out);
    return out;
  }

  /**
   * base:allocation status from `offset`: consecutive extents, starting at `offset`, that may cover less than
   * `length` (the server decides how much to describe at once); never empty for a non-empty range.
   */
  async blockStatus(offset: number, length: number, signal?: AbortSignal): Promise<BlockStatusExtent[]> {
    if (this.info.allocationContext === undefined) {
      throw new TransferError(`${this.label}: the server does not report base:allocation`, {
        disk: this.label,
        retryable: false,
      });
    }
    this.checkRange('block status', offset, length);
    if (signal?.aborted) throw this.aborted('block status', offset, length);
    if (length === 0) return [];
    const request = this.submit(nbd.NBD_CMD_BLOCK_STATUS, offset, Math.min(length, MAX_BLOCK_STATUS_LENGTH));
    await this.settle([request], signal, 'block status', offset, length);
    return request.pending.extents!;
  }

  /** Stops taking requests and disconnects once those in flight are answered. */
  drain(): void {
    this.draining = true;
    if (this.pending.size === 0) this.disconnect();
  }

  /** Sends NBD_CMD_DISC and waits for the socket to close. Requests in flight are answered first. */
  async close(): Promise<void> {
    this.closing = true;
    this.disconnect();
    await this.closed;
  }

  // ---- Handshake ----

  private async handshake(exportName: string): Promise<ExportInfo> {
    const { handshakeFlags } = nbd.decodeGreeting(await this.receive(nbd.GREETING_SIZE));
    if ((handshakeFlags & nbd.NBD_FLAG_FIXED_NEWSTYLE) === 0) {
      throw new nbd.ProtocolViolation('the server does not offer fixed newstyle negotiation');
    }
    const noZeroes = handshakeFlags & nbd.NBD_FLAG_NO_ZEROES ? nbd.NBD_FLAG_C_NO_ZEROES : 0;
    this.socket.write(nbd.encodeClientFlags(nbd.NBD_FLAG_C_FIXED_NEWSTYLE | noZeroes));

    const unexpected = (option: string) => (type: number) => {
      throw new nbd.ProtocolViolation(`unexpected reply type ${type} to ${option}`);
    };
    // Without structured replies reads still work (simple replies); only block status is lost.
    const structuredReplies =
      (await this.option(nbd.NBD_OPT_STRUCTURED_REPLY, EMPTY, unexpected('NBD_OPT_STRUCTURED_REPLY'))) ===
      undefined;

    let allocationContext: number | undefined;
    if (structuredReplies) {
      const query = nbd.encodeSetMetaContextData(exportName, [nbd.BASE_ALLOCATION]);
      const refusal = await this.option(nbd.NBD_OPT_SET_META_CONTEXT, query, (type, payload) => {
        if (type !== nbd.NBD_REP_META_CONTEXT) unexpected('NBD_OPT_SET_META_CONTEXT')(type);
        const context = nbd.decodeMetaContext(payload);
        if (context.name !== nbd.BASE_ALLOCATION) {
          throw new nbd.ProtocolViolation(
            `the server selected metadata context "${context.name}", not asked for`,
          );
        }
        allocationContext = context.id;
      });
      if (refusal !== undefined) allocationContext = undefined;
    }

    let exported: Extract<nbd.Info, { type: typeof nbd.NBD_INFO_EXPORT }> | undefined;
    let blockSize: Extract<nbd.Info, { type: typeof nbd.NBD_INFO_BLOCK_SIZE }> | undefined;
    const go = nbd.encodeGoData(exportName, [nbd.NBD_INFO_EXPORT, nbd.NBD_INFO_BLOCK_SIZE]);
    const refusal = await this.option(nbd.NBD_OPT_GO, go, (type, payload) => {
      if (type !== nbd.NBD_REP_INFO) unexpected('NBD_OPT_GO')(type);
      const info = nbd.decodeInfo(payload);
      if (info.type === nbd.NBD_INFO_EXPORT) exported = info;
      else if (info.type === nbd.NBD_INFO_BLOCK_SIZE) blockSize = info;
    });
    if (refusal !== undefined) throw this.goRefused(exportName, refusal);
    if (exported === undefined)
      throw new nbd.ProtocolViolation('NBD_OPT_GO succeeded without NBD_INFO_EXPORT');

    const minimumBlock = blockSize?.minimum ?? 1;
    const maximumBlock = blockSize?.maximum ?? nbd.DEFAULT_MAX_BLOCK;
    if (!isPowerOfTwo(minimumBlock) || minimumBlock > 65536 || maximumBlock < minimumBlock) {
      throw new nbd.ProtocolViolation(
        `invalid block sizes: minimum ${minimumBlock}, maximum ${maximumBlock}`,
      );
    }
    const maximumRead = Math.min(maximumBlock, nbd.DEFAULT_MAX_BLOCK);
    return {
      sizeBytes: exported.sizeBytes,
      transmissionFlags: exported.transmissionFlags,
      minimumBlock,
      maximumRead: maximumRead - (maximumRead % minimumBlock),
      structuredReplies,
      allocationContext,
    };
  }

  /** Sends one option and takes its replies up to the final ACK. Returns the server's refusal, if it refused. */
  private async option(
    option: number,
    data: Buffer,
    onReply: (type: number, payload: Buffer) => void,
  ): Promise<{ type: number; message: string } | undefined> {
    this.socket.write(nbd.encodeOption(option, data));
    for (;;) {
      const header = nbd.decodeOptionReplyHeader(await this.receive(nbd.OPTION_REPLY_HEADER_SIZE));
      if (header.option !== option) {
        throw new nbd.ProtocolViolation(
          `reply to option ${header.option} while negotiating option ${option}`,
        );
      }
      if (header.length > MAX_OPTION_REPLY_BYTES) {
        throw new nbd.ProtocolViolation(
          `option reply of ${header.length} bytes is longer than any valid reply`,
        );
      }
      const payload = await this.receive(header.length);
      if (header.type === nbd.NBD_REP_ACK) {
        if (header.length !== 0) throw new nbd.ProtocolViolation(`NBD_REP_ACK with ${header.length} bytes`);
        return undefined;
      }
      if (header.type >= nbd.NBD_REP_FLAG_ERROR)
        return { type: header.type, message: payload.toString('utf8') };
      onReply(header.type, payload);
    }
  }

  private goRefused(exportName: string, refusal: { type: number; message: string }): TransferError {
    const reasons: Record<number, [string, boolean]> = {
      [nbd.NBD_REP_ERR_UNKNOWN]: [`the export "${exportName}" does not exist`, false],
      [nbd.NBD_REP_ERR_TLS_REQD]: ['the server requires TLS, which is not supported', false],
      [nbd.NBD_REP_ERR_POLICY]: ['the server refused access (policy)', false],
      [nbd.NBD_REP_ERR_SHUTDOWN]: ['the server is shutting down', true],
      [nbd.NBD_REP_ERR_UNSUP]: ['the server does not support NBD_OPT_GO (too old)', false],
    };
    const [reason, retryable] = reasons[refusal.type] ?? [nbd.optionErrorName(refusal.type), false];
    const detail = refusal.message === '' ? '' : `: ${refusal.message}`;
    return new TransferError(`${this.label}: cannot open the export: ${reason}${detail}`, {
      disk: this.label,
      retryable,
    });
  }

  private receive(size: number): Promise<Buffer> {
    if (this.queue.length >= size) return Promise.resolve(this.queue.take(size));
    if (this.failure !== undefined) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => {
      this.waiter = { size, resolve, reject };
    });
  }

  // ---- Transmission ----

  private submit(command: number, offset: number, length: number, data?: Buffer): Submitted {
    if (!this.open) {
      throw (
        this.failure ??
        new TransferError(`${this.label}: the connection is closing`, {
          disk: this.label,
          offset,
          retryable: true,
        })
      );
    }
    const cookie = this.nextCookie++;
    let resolve!: () => void;
    let reject!: (err: Error) => void;
    const done = new Promise<void>((res, rej) => {
      resolve = res;
      reject = rej;
    });
    const pending: Pending = {
      cookie,
      command,
      offset,
      length,
      data,
      covered: [],
      coveredBytes: 0,
      extents: undefined,
      error: undefined,
      abandoned: false,
      errno: 0,
      resolve,
      reject,
    };
    this.pending.set(cookie, pending);
    this.socket.write(nbd.encodeRequest({ flags: 0, type: command, cookie, offset, length }));
    return { pending, done };
  }

  /**
   * Waits for all `requests`; on abort rejects them at once and leaves their replies to be discarded.
   * Kept lean: a fragmented chunk is one request per 4 KiB extent, thousands of them in flight.
   */
  private async settle(
    requests: readonly Submitted[],
    signal: AbortSignal | undefined,
    what: string,
    offset: number,
    length: number,
  ): Promise<void> {
    const done = requests.length === 1 ? requests[0]!.done : Promise.all(requests.map((r) => r.done));
    if (signal === undefined) {
      await done;
      return;
    }
    const unwatch = this.watch(signal, () => {
      const err = this.aborted(what, offset, length);
      for (const r of requests) {
        r.pending.abandoned = true;
        r.pending.reject(err);
      }
    });
    try {
      await done;
    } finally {
      unwatch();
    }
  }

  /**
   * One abort listener per signal, not per request: the engine passes one signal to every chunk of
   * a run, and a window's worth of listeners on it trips Node's leak warning.
   */
  private watch(signal: AbortSignal, onAbort: () => void): () => void {
    let watcher = this.watchers.get(signal);
    if (watcher === undefined) {
      const callbacks = new Set<() => void>();
      const listener = () => {
        this.watchers.delete(signal);
        for (const fn of callbacks) fn();
      };
      watcher = { callbacks, listener };
      this.watchers.set(signal, watcher);
      signal.addEventListener('abort', listener, { once: true });
    }
    const { callbacks, listener } = watcher;
    callbacks.add(onAbort);
    return () => {
      callbacks.delete(onAbort);
      if (callbacks.size === 0 && this.watchers.get(signal) === watcher) {
        this.watchers.delete(signal);
        signal.removeEventListener('abort', listener);
      }
    };
  }

  private onData(chunk: Buffer): void {
    if (this.failure !== undefined) return;
    this.queue.push(chunk);
    const waiter = this.waiter;
    if (waiter !== undefined) {
      if (this.queue.length >= waiter.size) {
        this.waiter = undefined;
        waiter.resolve(this.queue.take(waiter.size));
      }
      return;
    }
    if (this.exportInfo === undefined) return;
    try {
      while (this.step()) {}
    } catch (err) {
      this.fail(err);
    }
  }

  /** Parses one reply header, chunk or run of data; false when it needs more bytes. */
  private step(): boolean {
    const frame = this.frame;
    if (frame === undefined) return this.readHeader();
    if (frame.kind === 'data') return this.readData(frame);
    return this.readChunk(frame.header, frame.pending);
  }

  private readHeader(): boolean {
    if (this.queue.length < 4) return false;
    const magic = this.queue.peekUInt32BE();
    if (magic === nbd.SIMPLE_REPLY_MAGIC) {
      if (this.queue.length < nbd.SIMPLE_REPLY_HEADER_SIZE) return false;
      const header = nbd.decodeSimpleReplyHeader(this.queue.take(nbd.SIMPLE_REPLY_HEADER_SIZE));
      this.onSimpleReply(header.error, this.lookup(header.cookie));
      return true;
    }
    if (magic === nbd.STRUCTURED_REPLY_MAGIC) {
      if (this.queue.length < nbd.STRUCTURED_REPLY_HEADER_SIZE) return false;
      const header = nbd.decodeStructuredReplyHeader(this.queue.take(nbd.STRUCTURED_REPLY_HEADER_SIZE));
      const pending = this.lookup(header.cookie);
      if (!this.info.structuredReplies) this.violation('structured reply, which was not negotiated', pending);
      this.checkChunkHeader(header, pending);
      this.frame = { kind: 'chunk', header, pending };
      return true;
    }
    return this.violation(`bad reply magic 0x${magic.toString(16).padStart(8, '0')}`);
  }

  private lookup(cookie: bigint): Pending {
    const pending = this.pending.get(cookie);
    if (pending === undefined) return this.violation(`reply for unknown handle ${cookie}`);
    return pending;
  }

  private onSimpleReply(error: number, pending: Pending): void {
    if (error !== 0) {
      this.setError(pending, error, '', undefined);
      this.finish(pending);
      return;
    }
    if (pending.command !== nbd.NBD_CMD_READ)
      this.violation('simple reply to a block status request', pending);
    if (this.info.structuredReplies)
      this.violation('simple reply to a read after structured replies', pending);
    // Without structured replies, a successful read's data follows the header: exactly the length asked for.
    this.claim(pending, pending.offset, pending.length);
    this.frame = { kind: 'data', pending, at: pending.offset, remaining: pending.length, last: true };
  }

  /** Rejects chunks that cannot belong to their request before buffering their payload. */
  private checkChunkHeader(header: nbd.StructuredReplyHeader, pending: Pending): void {
    const isRead = pending.command === nbd.NBD_CMD_READ;
    let maximum: number;
    switch (header.type) {
      case nbd.NBD_REPLY_TYPE_NONE:
        if (header.length !== 0 || (header.flags & nbd.NBD_REPLY_FLAG_DONE) === 0) {
          this.violation('NBD_REPLY_TYPE_NONE must be empty and final', pending);
        }
        return;
      case nbd.NBD_REPLY_TYPE_OFFSET_DATA:
        if (!isRead) this.violation('data chunk in reply to a block status request', pending);
        if (header.length <= nbd.OFFSET_DATA_PREFIX_SIZE)
          this.violation(`data chunk of ${header.length} bytes`, pending);
        maximum = nbd.OFFSET_DATA_PREFIX_SIZE + pending.length;
        break;
      case nbd.NBD_REPLY_TYPE_OFFSET_HOLE:
        if (!isRead) this.violation('hole chunk in reply to a block status request', pending);
        maximum = nbd.OFFSET_HOLE_SIZE;
        break;
      case nbd.NBD_REPLY_TYPE_BLOCK_STATUS:
        if (isRead) this.violation('block status chunk in reply to a read', pending);
        maximum = 4 + 8 * MAX_EXTENTS_PER_REPLY;
        break;
      default:
        if ((header.type & nbd.NBD_REPLY_TYPE_ERROR_BIT) === 0) {
          this.violation(`unknown reply type ${header.type}`, pending);
        }
        maximum = MAX_ERROR_CHUNK_BYTES;
    }
    if (header.length > maximum) {
      this.violation(
        `reply chunk of ${header.length} bytes is longer than the ${maximum} bytes possible`,
        pending,
      );
    }
  }

  private readChunk(header: nbd.StructuredReplyHeader, pending: Pending): boolean {
    const last = (header.flags & nbd.NBD_REPLY_FLAG_DONE) !== 0;
    if (header.type === nbd.NBD_REPLY_TYPE_OFFSET_DATA) {
      if (this.queue.length < nbd.OFFSET_DATA_PREFIX_SIZE) return false;
      const at = nbd.readUint64(this.queue.take(nbd.OFFSET_DATA_PREFIX_SIZE), 0, 'data offset');
      const remaining = header.length - nbd.OFFSET_DATA_PREFIX_SIZE;
      this.claim(pending, at, remaining);
      this.frame = { kind: 'data', pending, at, remaining, last };
      return true;
    }
    if (this.queue.length < header.length) return false;
    const payload = this.queue.take(header.length);
    this.frame = undefined;
    if (header.type === nbd.NBD_REPLY_TYPE_OFFSET_HOLE) {
      const hole = nbd.decodeOffsetHole(payload);
      this.claim(pending, hole.offset, hole.length);
      const from = hole.offset - pending.offset;
      if (!pending.abandoned) pending.data!.fill(0, from, from + hole.length);
    } else if (header.type === nbd.NBD_REPLY_TYPE_BLOCK_STATUS) {
      this.onBlockStatus(pending, payload);
    } else if (header.type !== nbd.NBD_REPLY_TYPE_NONE) {
      const error = nbd.decodeErrorChunk(header.type, payload);
      if (error.offset !== undefined && !within(pending, error.offset)) {
        this.violation(`error at offset ${error.offset}, outside the request`, pending);
      }
      this.setError(pending, error.errno, error.message, error.offset);
    }
    if (last) this.finish(pending);
    return true;
  }

  /** Moves read data straight from the socket's chunks into the request's buffer as it arrives. */
  private readData(frame: Extract<Frame, { kind: 'data' }>): boolean {
    const size = Math.min(this.queue.length, frame.remaining);
    if (size === 0) return false;
    const { pending } = frame;
    if (pending.abandoned) this.queue.skip(size);
    else this.queue.copyTo(pending.data!, frame.at - pending.offset, size);
    frame.at += size;
    frame.remaining -= size;
    if (frame.remaining > 0) return false;
    this.frame = undefined;
    if (frame.last) this.finish(pending);
    return true;
  }

  private onBlockStatus(pending: Pending, payload: Buffer): void {
    const status = nbd.decodeBlockStatus(payload);
    if (status.contextId !== this.info.allocationContext) {
      this.violation(`block status for unknown metadata context ${status.contextId}`, pending);
    }
    if (pending.extents !== undefined) this.violation('two block status chunks for one context', pending);
    // Descriptors run on from the request's offset. The last may reach past the request; it is clipped.
    const end = pending.offset + pending.length;
    const extents: BlockStatusExtent[] = [];
    let at = pending.offset;
    for (const d of status.descriptors) {
      if (at >= end) break;
      const length = Math.min(d.length, end - at);
      extents.push({
        offset: at,
        length,
        hole: (d.flags & nbd.NBD_STATE_HOLE) !== 0,
        zero: (d.flags & nbd.NBD_STATE_ZERO) !== 0,
      });
      at += length;
    }
    pending.extents = extents;
  }

  /** Records that a read's reply describes [offset, offset + length): inside the request, overlapping nothing. */
  private claim(pending: Pending, offset: number, length: number): void {
    const end = offset + length;
    if (!within(pending, offset) || end > pending.offset + pending.length) {
      this.violation(`data for bytes ${offset}..${end}, outside the request`, pending);
    }
    for (const c of pending.covered) {
      if (offset < c.offset + c.length && c.offset < end) {
        this.violation(`data for bytes ${offset}..${end} overlaps earlier data`, pending);
      }
    }
    pending.covered.push({ offset, length });
    pending.coveredBytes += length;
  }

  private setError(pending: Pending, errno: number, message: string, at: number | undefined): void {
    if (pending.error !== undefined) return;
    const where = at === undefined ? '' : ` (failed at offset ${at})`;
    const detail = message === '' ? '' : `: ${message}`;
    pending.errno = errno;
    pending.error = new TransferError(
      `${this.label}: server error ${nbd.errnoName(errno)} on ${describe(pending)}${where}${detail}`,
      { disk: this.label, offset: at ?? pending.offset, retryable: !PERMANENT_ERRNOS.has(errno) },
    );
  }

  private finish(pending: Pending): void {
    if (pending.error === undefined) {
      if (pending.command === nbd.NBD_CMD_READ && pending.coveredBytes !== pending.length) {
        this.violation(`reply ended after ${pending.coveredBytes} of ${pending.length} bytes`, pending);
      }
      if (pending.command === nbd.NBD_CMD_BLOCK_STATUS && pending.extents === undefined) {
        this.violation('block status reply without block status', pending);
      }
    }
    this.pending.delete(pending.cookie);
    if (pending.error === undefined) pending.resolve();
    else pending.reject(pending.error);
    if (pending.errno === nbd.NBD_ESHUTDOWN && !this.draining) {
      this.draining = true;
      this.onServerShutdown?.();
    }
    if (this.draining && this.pending.size === 0) this.disconnect();
  }

  // ---- Failure and shutdown ----

  private violation(message: string, pending?: Pending): never {
    const about = pending === undefined ? '' : ` (in reply to ${describe(pending)})`;
    throw new nbd.ProtocolViolation(`${message}${about}`, pending?.offset);
  }

  private toTransferError(err: unknown): TransferError {
    if (err instanceof TransferError) return err;
    if (err instanceof nbd.ProtocolViolation) {
      return new TransferError(`${this.label}: NBD protocol violation: ${err.message}`, {
        disk: this.label,
        offset: err.offset,
        retryable: false,
        cause: err,
      });
    }
    return new TransferError(`${this.label}: ${errorMessage(err)}`, {
      disk: this.label,
      retryable: true,
      cause: err,
    });
  }

  /** A protocol violation: the byte stream can no longer be trusted, so the connection is dropped. */
  private fail(err: unknown): void {
    this.failure ??= this.toTransferError(err);
    this.socket.destroy();
  }

  private onClose(): void {
    this.failure ??= this.closeError();
    const waiter = this.waiter;
    this.waiter = undefined;
    waiter?.reject(this.failure);
    for (const pending of this.pending.values()) pending.reject(this.failure);
    this.pending.clear();
  }

  private closeError(): TransferError {
    const cause = this.socketError;
    const why = cause === undefined ? '' : `: ${cause.message}`;
    let message: string;
    if (this.exportInfo === undefined) {
      message = `cannot connect${why || ': the server closed the connection during the handshake'}`;
    } else if (this.closing) {
      message = 'the connection was closed';
    } else {
      message = `the connection was lost${why}`;
    }
    return new TransferError(`${this.label}: ${message}`, {
      disk: this.label,
      retryable: !this.closing,
      cause,
    });
  }

  private disconnect(): void {
    if (this.disconnecting) return;
    this.disconnecting = true;
    if (this.socket.writable && this.exportInfo !== undefined) {
      const cookie = this.nextCookie++;
      this.socket.end(nbd.encodeRequest({ flags: 0, type: nbd.NBD_CMD_DISC, cookie, offset: 0, length: 0 }));
      // A server that never closes its side must not hang close().
      this.socket.setTimeout(this.timeoutMs, () => this.socket.destroy());
    } else {
      this.socket.destroy();
    }
  }

  private checkRange(what: string, offset: number, length: number): void {
    const size = this.info.sizeBytes;
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
      throw new TransferError(`${this.label}: invalid ${what} of ${length} bytes at offset ${offset}`, {
        disk: this.label,
        retryable: false,
      });
    }
    if (offset + length > size) {
      throw new TransferError(
        `${this.label}: ${what} of ${length} bytes at offset ${offset} is past the end of the ${size}-byte disk`,
        { disk: this.label, offset, retryable: false },
      );
    }
  }

  private aborted(what: string, offset: number, length: number): AbortedError {
    return new AbortedError(`${this.label}: ${what} of ${length} bytes at offset ${offset} aborted`, {
      disk: this.label,
      offset,
    });
  }
}

const within = (pending: Pending, offset: number): boolean =>
  offset >= pending.offset && offset < pending.offset + pending.length;

const describe = (pending: Pending): string =>
  `${pending.command === nbd.NBD_CMD_READ ? 'read' : 'block status'} of ${pending.length} bytes at offset ${pending.offset}`;

const isPowerOfTwo = (n: number): boolean => n > 0 && (n & (n - 1)) === 0;
