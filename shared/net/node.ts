// The replication node (`ferry serve`): grants credit, verifies and writes chunks into file images.
import { createHash, randomBytes } from 'node:crypto';
import { mkdir, rename, stat, writeFile } from 'node:fs/promises';
import net from 'node:net';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { DEFAULT_PARAMS } from '../engine/config.ts';
import { type ControllerTunables, WindowController } from '../engine/controller.ts';
import type { Descriptor } from '../engine/descriptors.ts';
import { ConfigError, errorMessage, FerryError, IntegrityError, TransferError } from '../engine/errors.ts';
import type { Extent } from '../engine/extents.ts';
import { isValidName, NAME_RULE } from '../engine/names.ts';
import type { CopyKind } from '../engine/ports.ts';
import { formatBytes } from '../engine/units.ts';
import { FILE_TARGET_BLOCK_SIZE, FileTarget } from '../local/file-target.ts';
import { INSECURE_PEER, type PeerIdentity } from './peer.ts';
import {
  type ChunkMeta,
  diskNameProblem,
  encodeFrame,
  type Frame,
  type FrameOf,
  FrameReader,
  INCARNATION_BYTES,
  MAX_CHUNK_BYTES,
  PROTOCOL_BLOCK_SIZE,
  PROTOCOL_VERSION,
  ProtocolError,
} from './protocol.ts';

// A source that connects but says nothing within this is not a Ferry source, or is gone.
const DEFAULT_HANDSHAKE_TIMEOUT_MS = 30_000;
// The engine's evaluation period: the controller's signals are bucketed at this resolution anyway.
const DEFAULT_TICK_MS = 250;
// Grants go out in whole chunks so that credit split across disks never leaves each of them a
// fraction of a chunk (no disk could send, a deadlock). 1 MiB is the spec's chunk size; a source
// with larger chunks says so in its first WANT or CHUNK and the unit grows to it.
const INITIAL_GRANT_UNIT = 1024 * 1024;
// A change map longer than this is refused at commit: the node holds it in memory to apply the
// increment. Four million extents (about 200 MiB of records) is forty times the 100k-extent map of
// a badly fragmented cycle; beyond it, a cycle should be a full copy.
const MAX_COMMIT_EXTENTS = 4 * 1024 * 1024;
// Sixteen disks at sixteen connections each; beyond that a node is being flooded, not used. Each
// connection may hold one partial frame of its own, so this also bounds memory outside credit.
const MAX_CONNECTIONS = 256;
// TCP keepalive so a source host that vanished (no FIN, no RST) frees its disk's credit and lock.
const KEEPALIVE_MS = 15_000;
// After an ERROR frame the peer gets this long to read it and hang up before the socket is destroyed.
const ERROR_LINGER_MS = 2_000;
// Loss reports kept per session for connections that join later; a cycle losing more connections
// than this has bigger problems, and a missed report only makes the source more conservative.
const MAX_CLOSED_REPORTS = 10_000;
// Errno codes that writing again cannot fix; anything else (EIO, EAGAIN, ...) may pass on retry.
const PERMANENT_ERRNOS = new Set(['ENOSPC', 'EDQUOT', 'EROFS', 'EACCES', 'EPERM', 'EFBIG', 'ENAMETOOLONG']);

export interface NodeOptions {
  /** `host:port` or {host, port}; port 0 picks a free port (see `address`). */
  readonly listen: string | { readonly host: string; readonly port: number };
  /** Directory of the file images; a disk named D is written to `<targetDir>/D`. Must exist. */
  readonly targetDir: string;
  /** Where the node records each disk's last commit (for `ferry verify` on this host). Optional. */
  readonly stateDir?: string;
  /** Bytes the node holds for all disks at once: granted credit plus chunks being received or written. */
  readonly nodeBudget?: number;
  /** Window levels per disk (ascending, bytes); default the engine's levels. */
  readonly levels?: readonly number[];
  /** Starting window per disk; default the engine's. Must be one of `levels`. */
  readonly initialWindow?: number;
  /** Adapt windows between the levels (default true); false pins every disk at `initialWindow`. */
  readonly adaptive?: boolean;
  /** Overrides of the window controller's tunables (tests, diagnosis). */
  readonly controller?: Partial<ControllerTunables>;
  /** How often windows are re-evaluated (ms). */
  readonly tickMs?: number;
  readonly handshakeTimeoutMs?: number;
  /** Operator log lines (sessions, windows, errors); never block data. */
  readonly log?: (line: string) => void;
}

export interface NodeDiskStats {
  readonly disk: string;
  readonly connections: number;
  readonly window: number;
  readonly granted: number;
  /** Credit granted and not yet used, plus chunks being received or written. */
  readonly held: number;
  readonly inflight: number;
}

export interface NodeStats {
  readonly budget: number;
  readonly sessions: number;
  readonly connections: number;
  readonly heldBytes: number;
  readonly peakHeldBytes: number;
  /** Chunk bytes admitted and not yet written (the data buffers the node holds). */
  readonly inflightBytes: number;
  readonly peakInflightBytes: number;
  readonly chunksWritten: number;
  readonly bytesWritten: number;
  readonly nacks: number;
  readonly violations: number;
  readonly disks: readonly NodeDiskStats[];
}

export interface ReplicationNode {
  readonly host: string;
  readonly port: number;
  /** `host:port` actually listened on. */
  readonly address: string;
  stats(): NodeStats;
  /** Stops accepting, tells connected sources (retryable), lets writes finish, closes every image. */
  close(): Promise<void>;
}

/** One credit grant, kept until the source has used it: a chunk's latency starts when its credit was granted. */
interface GrantRecord {
  /** Cumulative granted bytes after this grant. */
  readonly end: number;
  readonly at: number;
}

/** One source's replication of one disk on this node: its image, credit and window. */
class Session {
  readonly conns = new Set<Conn>();
  readonly incarnation = randomBytes(INCARNATION_BYTES).toString('hex');
  readonly writes = new Set<Promise<void>>();
  window: number;
  /** Grant step: the largest chunk this source has sent or asked for. */
  unit = INITIAL_GRANT_UNIT;
  /** Cumulative credit granted (only grows) and consumed by CHUNK/RELEASE. */
  granted = 0;
  admitted = 0;
  /** Bytes of admitted chunks not yet written (being received, verified or written). */
  inflight = 0;
  /** Order of the source's last WANT and RELEASE: idle (no grants) while a RELEASE is the latest. */
  wantOrder = 0;
  releaseOrder = -1;
  /** COMMIT received: no more chunks, no more credit. */
  committed = false;
  tearingDown = false;
  budgetLimited = false;
  lastGrantTick = -1;
  /** What the source has been told, so a change is announced once. */
  announcedGranted = -1;
  announcedWindow = -1;
  /** Connections of this session that ended, and what each consumed: repeated to every joiner. */
  readonly closed: { readonly conn: number; readonly admitted: number }[] = [];
  retired: Promise<void> | undefined;
  private readonly grants: GrantRecord[] = [];
  private commitChain: Promise<unknown> = Promise.resolve();

  constructor(
    readonly disk: string,
    readonly id: string,
    readonly sizeBytes: number,
    readonly kind: CopyKind,
    readonly target: FileTarget,
    readonly controller: WindowController | undefined,
    initialWindow: number,
  ) {
    this.window = initialWindow;
  }

  get unused(): number {
    return this.granted - this.admitted;
  }

  /** What counts against window and budget; after COMMIT no chunk may follow, so unused credit is free. */
  get held(): number {
    return (this.committed ? 0 : this.unused) + this.inflight;
  }

  /** Takes part in credit allocation: has connections, is not idle, finished or going away. */
  get wantsCredit(): boolean {
    return this.conns.size > 0 && this.releaseOrder < this.wantOrder && !this.committed && !this.tearingDown;
  }

  grant(bytes: number, at: number): void {
    this.granted += bytes;
    this.grants.push({ end: this.granted, at });
  }

  /** Consumes `bytes` of credit; returns when the credit holding the last of them was granted. */
  consume(bytes: number, now: number): number {
    this.admitted += bytes;
    while (this.grants.length > 0 && this.grants[0]!.end < this.admitted) this.grants.shift();
    const at = this.grants[0]?.at ?? now;
    if (this.grants[0]?.end === this.admitted) this.grants.shift();
    return at;
  }

  /** Runs commit-phase operations one at a time (a retried COMMIT may arrive on another connection). */
  serially<T>(op: () => Promise<T>): Promise<T> {
    const run = this.commitChain.then(op, op);
    this.commitChain = run.catch(() => {});
    return run;
  }

  /** Resolves when no commit-phase operation is running. */
  async settled(): Promise<void> {
    await this.commitChain;
  }
}

/** One source connection. */
class Conn {
  session: Session | undefined;
  /** Credit this connection consumed (chunks admitted, releases): reported to the source when it ends. */
  admitted = 0;
  /** When the credit of the chunk being received was granted: the start of its latency. */
  grantAt = 0;
  commitExtents: Extent[] = [];
  commitBytes = 0;
  closing = false;
  handshaking = false;
  /** Ended by CLOSE or by the node itself, not lost: not a fault for the window controller. */
  clean = false;
  reader!: FrameReader;

  constructor(
    readonly id: number,
    readonly socket: net.Socket,
    readonly peer: string,
    /** The credential the connection authenticated with (TLS), or INSECURE_PEER. */
    readonly identity: PeerIdentity = INSECURE_PEER,
  ) {}

  get where(): string {
    return this.session ? `peer ${this.peer} (disk ${this.session.disk})` : `peer ${this.peer}`;
  }

  send(frame: Frame): boolean {
    if (this.closing || this.socket.destroyed || !this.socket.writable) return false;
    this.socket.write(encodeFrame(frame));
    return true;
  }
}

/** Starts a replication node listening on `listen`. */
export async function startNode(opts: NodeOptions): Promise<ReplicationNode> {
  const node = new Node(opts);
  await node.start();
  return node;
}

class Node implements ReplicationNode {
  host = '';
  port = 0;
  private readonly server: net.Server;
  private readonly sessions = new Map<string, Session>();
  private readonly conns = new Set<Conn>();
  private readonly diskLocks = new Map<string, Promise<void>>();
  private readonly budget: number;
  private readonly levels: readonly number[];
  private readonly initialWindow: number;
  private readonly adaptive: boolean;
  private readonly log: (line: string) => void;
  private timer: NodeJS.Timeout | undefined;
  private nextConnId = 1;
  private grantTick = 0;
  private closing: Promise<void> | undefined;
  private readonly counters = {
    peakHeld: 0,
    inflight: 0,
    peakInflight: 0,
    chunksWritten: 0,
    bytesWritten: 0,
    nacks: 0,
    violations: 0,
  };

  constructor(private readonly opts: NodeOptions) {
    this.budget = opts.nodeBudget ?? DEFAULT_PARAMS.nodeBudget;
    this.levels = opts.levels ?? DEFAULT_PARAMS.windowLevels;
    this.adaptive = opts.adaptive ?? true;
    this.initialWindow =
      opts.initialWindow ??
      (this.levels.includes(DEFAULT_PARAMS.window) ? DEFAULT_PARAMS.window : this.levels[0]!);
    this.log = opts.log ?? (() => {});
    if (!Number.isSafeInteger(this.budget) || this.budget < INITIAL_GRANT_UNIT) {
      throw new ConfigError(
        `node budget ${this.budget} bytes is below one ${formatBytes(INITIAL_GRANT_UNIT)} chunk`,
        {
          setting: 'nodeBudget',
        },
      );
    }
    // Builds one controller now so bad levels or tunables fail at start, not at the first HELLO.
    new WindowController({
      levels: this.levels,
      initial: this.initialWindow,
      ...(opts.controller ? { tunables: opts.controller } : {}),
    });
    this.server = net.createServer((socket) => this.accept(socket));
    this.server.maxConnections = MAX_CONNECTIONS;
  }

  get address(): string {
    return this.host.includes(':') ? `[${this.host}]:${this.port}` : `${this.host}:${this.port}`;
  }

  async start(): Promise<void> {
    const { host, port } = parseListen(this.opts.listen);
    const dir = await stat(this.opts.targetDir).catch(() => undefined);
    if (!dir?.isDirectory()) {
      throw new ConfigError(`target directory ${this.opts.targetDir} does not exist or is not a directory`, {
        setting: 'targetDir',
      });
    }
    if (this.opts.stateDir !== undefined)
      await mkdir(join(this.opts.stateDir, 'commits'), { recursive: true });
    await new Promise<void>((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(port, host, () => {
        this.server.off('error', reject);
        resolve();
      });
    });
    // After listening, an error is a failed accept (EMFILE): that source retries, the node goes on.
    this.server.on('error', (err) => this.log(`node: accept failed: ${errorMessage(err)}`));
    const addr = this.server.address() as net.AddressInfo;
    this.host = addr.address;
    this.port = addr.port;
    this.timer = setInterval(() => this.tick(), this.opts.tickMs ?? DEFAULT_TICK_MS);
    this.timer.unref();
  }

  stats(): NodeStats {
    const sessions = [...this.sessions.values()];
    return {
      budget: this.budget,
      sessions: sessions.length,
      connections: this.conns.size,
      heldBytes: this.totalHeld(),
      peakHeldBytes: this.counters.peakHeld,
      inflightBytes: this.counters.inflight,
      peakInflightBytes: this.counters.peakInflight,
      chunksWritten: this.counters.chunksWritten,
      bytesWritten: this.counters.bytesWritten,
      nacks: this.counters.nacks,
      violations: this.counters.violations,
      disks: sessions.map((s) => ({
        disk: s.disk,
        connections: s.conns.size,
        window: s.window,
        granted: s.granted,
        held: s.held,
        inflight: s.inflight,
      })),
    };
  }

  close(): Promise<void> {
    this.closing ??= this.shutdown();
    return this.closing;
  }

  private async shutdown(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    const stopped = new Promise<void>((resolve) => this.server.close(() => resolve()));
    const gone = [...this.conns].map((c) => {
      const closed = new Promise<void>((resolve) => c.socket.once('close', () => resolve()));
      if (c.closing) hangUp(c);
      else this.refuse(c, 'the node is shutting down', true);
      return closed;
    });
    await Promise.all([stopped, ...gone]);
    // Every session tears down as its last connection closes; wait for those to finish their writes.
    await Promise.all([...this.diskLocks.values()]);
  }

  // ---- Connections ----

  private accept(socket: net.Socket): void {
    const peer = `${socket.remoteAddress}:${socket.remotePort}`;
    if (this.closing) {
      socket.destroy();
      return;
    }
    const conn = new Conn(this.nextConnId++, socket, peer);
    conn.reader = new FrameReader({
      from: 'source',
      onFrame: (frame) => this.onFrame(conn, frame),
      admitChunk: (meta) => this.admitChunk(conn, meta),
    });
    this.conns.add(conn);
    socket.setNoDelay(true);
    socket.setKeepAlive(true, KEEPALIVE_MS);
    const timeoutMs = this.opts.handshakeTimeoutMs ?? DEFAULT_HANDSHAKE_TIMEOUT_MS;
    socket.setTimeout(timeoutMs, () => {
      if (conn.session === undefined) this.refuse(conn, `no HELLO within ${timeoutMs} ms`, false);
    });
    socket.on('data', (chunk: Buffer) => {
      if (conn.closing) return;
      try {
        conn.reader.push(chunk);
      } catch (err) {
        this.violation(conn, err);
      }
    });
    socket.on('error', () => {}); // 'close' follows; a reset source is handled there
    socket.on('close', () => this.onClose(conn));
  }

  private onClose(conn: Conn): void {
    this.conns.delete(conn);
    conn.closing = true;
    const s = conn.session;
    if (s === undefined) return;
    const partial = conn.reader.partialChunk;
    if (partial !== undefined) {
      // Admitted but never complete: nothing of it is written; its memory is free again.
      this.release(s, partial.bytes);
      this.log(`node: ${conn.where}: connection ended inside chunk ${partial.seq}; it was not written`);
    }
    s.conns.delete(conn);
    if (!conn.clean) s.controller?.record(this.faultSample(s));
    if (s.closed.length < MAX_CLOSED_REPORTS) s.closed.push({ conn: conn.id, admitted: conn.admitted });
    if (s.conns.size > 0) {
      // The source learns what of its writes to the lost connection arrived, so it can take back
      // the credit of what did not. Told on every survivor: any of them may be the next to go.
      for (const c of s.conns) c.send({ type: 'conn-closed', conn: conn.id, admitted: conn.admitted });
      s.announcedGranted = -1; // a GRANT or ACK sent on the lost connection may not have arrived
    } else {
      this.teardown(s);
    }
    this.allocate();
    this.flushGrants();
  }

  /** The session lost its last connection: finish its writes, close its image, free its credit. */
  private teardown(s: Session): void {
    s.tearingDown = true;
    void this.withDiskLock(s.disk, () => this.retire(s));
  }

  /** Idempotent: waits for the session's writes and commit, closes its image, forgets it. */
  private retire(s: Session): Promise<void> {
    s.retired ??= (async () => {
      await Promise.allSettled([...s.writes]);
      await s.settled();
      await s.target
        .close()
        .catch((err) => this.log(`node: disk ${s.disk}: closing the image failed: ${errorMessage(err)}`));
      if (this.sessions.get(s.disk) === s) this.sessions.delete(s.disk);
      this.log(`node: disk ${s.disk}: session ended`);
      this.allocate();
      this.flushGrants();
    })();
    return s.retired;
  }

  private withDiskLock(disk: string, op: () => Promise<void>): Promise<void> {
    const previous = this.diskLocks.get(disk) ?? Promise.resolve();
    const run = previous.then(op, op).catch((err) => this.log(`node: disk ${disk}: ${errorMessage(err)}`));
    this.diskLocks.set(disk, run);
    void run.then(() => {
      if (this.diskLocks.get(disk) === run) this.diskLocks.delete(disk);
    });
    return run;
  }

  /** A protocol violation: ERROR naming what was wrong, then close. Nothing of the bad frame is written. */
  private violation(conn: Conn, err: unknown): void {
    if (conn.closing) return;
    this.counters.violations++;
    const message = err instanceof ProtocolError ? err.message : `internal error: ${errorMessage(err)}`;
    this.log(`node: ${conn.where}: protocol violation: ${message}`);
    this.refuse(conn, message, false);
  }

  /** Sends ERROR and hangs up. */
  private refuse(conn: Conn, reason: string, retryable: boolean): void {
    if (conn.closing) return;
    conn.send({ type: 'error', retryable, reason });
    conn.clean = true;
    hangUp(conn);
  }

  // ---- Frames ----

  private onFrame(conn: Conn, frame: Frame): void {
    if (conn.closing) return;
    if (frame.type === 'hello') {
      if (conn.session !== undefined || conn.handshaking)
        throw new ProtocolError('second HELLO on one connection');
      conn.handshaking = true;
      // It spoke: opening the image may wait for a previous session to finish, which is not silence.
      conn.socket.setTimeout(0);
      void this.onHello(conn, frame);
      return;
    }
    if (frame.type === 'error') {
      this.log(`node: ${conn.where}: source reported an error: ${frame.reason}`);
      hangUp(conn);
      return;
    }
    const s = conn.session;
    if (s === undefined)
      throw new ProtocolError(`${frame.type.toUpperCase()} frame before the session was welcomed`);
    switch (frame.type) {
      case 'chunk':
        this.onChunk(conn, s, frame);
        return;
      case 'want':
        this.onWant(conn, s, frame.bytes, frame.order);
        return;
      case 'release': {
        if (frame.bytes > s.unused) {
          throw new ProtocolError(
            `RELEASE of ${frame.bytes} bytes exceeds the ${s.unused} bytes of unused credit`,
          );
        }
        s.consume(frame.bytes, performance.now());
        conn.admitted += frame.bytes;
        s.releaseOrder = Math.max(s.releaseOrder, frame.order);
        this.allocate();
        this.flushGrants();
        return;
      }
      case 'extents':
        this.onExtents(conn, s, frame.extents);
        return;
      case 'commit':
        this.onCommit(conn, s, frame);
        return;
      case 'after-publish':
        void this.control(conn, s, 'after publish', async () => {
          await s.target.afterPublish();
          conn.send({ type: 'done' });
        });
        return;
      case 'close':
        conn.clean = true;
        hangUp(conn);
        return;
    }
  }

  private async onHello(conn: Conn, hello: FrameOf<'hello'>): Promise<void> {
    const problem = diskNameProblem(hello.disk);
    if (problem !== undefined) {
      this.refuse(conn, `disk name "${hello.disk}" ${problem}`, false);
      return;
    }
    // The house rule for names (shared/engine/names.ts), on top of the protocol's own checks.
    if (!isValidName(hello.disk)) {
      this.refuse(conn, `disk name "${hello.disk}" is not allowed (${NAME_RULE})`, false);
      return;
    }
    if (this.closing) {
      this.refuse(conn, 'the node is shutting down', true);
      return;
    }
    await this.withDiskLock(hello.disk, async () => {
      if (conn.closing) return;
      let s = this.sessions.get(hello.disk);
      if (s?.tearingDown) {
        // Its connections are gone: finish it here (its queued teardown then finds nothing to do).
        await this.retire(s);
        s = undefined;
      }
      let joined = false;
      if (s !== undefined && s.id === hello.session) {
        if (s.sizeBytes !== hello.sizeBytes || s.kind !== hello.kind) {
          this.refuse(
            conn,
            `disk ${hello.disk}: this session is a ${s.kind} copy of ${s.sizeBytes} bytes, not a ${hello.kind} copy of ${hello.sizeBytes}`,
            false,
          );
          return;
        }
        joined = true;
      } else if (s !== undefined) {
        // Another source (or a stale connection of one the node has not seen go) is writing this image.
        this.refuse(conn, `disk ${hello.disk} is being replicated by another source session`, true);
        return;
      } else {
        try {
          s = await this.openSession(hello);
        } catch (err) {
          this.log(
            `node: peer ${conn.peer} (disk ${hello.disk}): cannot open the image: ${errorMessage(err)}`,
          );
          this.refuse(
            conn,
            `disk ${hello.disk}: ${errorMessage(err)}`,
            err instanceof TransferError && err.retryable,
          );
          return;
        }
        this.sessions.set(hello.disk, s);
        if (conn.closing) {
          // The source left while the image was being opened: nothing holds the session.
          s.tearingDown = true;
          await this.retire(s);
          return;
        }
      }
      conn.session = s;
      conn.handshaking = false;
      s.conns.add(conn);
      conn.socket.setTimeout(0);
      if (!joined) this.allocate();
      conn.send({
        type: 'welcome',
        version: PROTOCOL_VERSION,
        blockSize: PROTOCOL_BLOCK_SIZE,
        maxChunkBytes: MAX_CHUNK_BYTES,
        incarnation: s.incarnation,
        conn: conn.id,
        joined,
        granted: s.granted,
        window: s.window,
      });
      // A joiner may be all that is left of the source's connections: repeat every loss report.
      if (joined)
        for (const c of s.closed) conn.send({ type: 'conn-closed', conn: c.conn, admitted: c.admitted });
      if (!joined) {
        s.announcedGranted = s.granted;
        s.announcedWindow = s.window;
        this.log(
          `node: ${conn.where}: ${hello.kind} copy of ${formatBytes(hello.sizeBytes)}${hello.resume ? ', resuming' : ''}, ` +
            `window ${formatBytes(s.window)}, ${formatBytes(s.granted)} granted`,
        );
      }
      this.flushGrants();
    });
  }

  private async openSession(hello: FrameOf<'hello'>): Promise<Session> {
    if (FILE_TARGET_BLOCK_SIZE !== PROTOCOL_BLOCK_SIZE) {
      throw new FerryError(
        `file images use ${FILE_TARGET_BLOCK_SIZE}-byte blocks, the protocol ${PROTOCOL_BLOCK_SIZE}`,
      );
    }
    const target = new FileTarget(join(this.opts.targetDir, hello.disk), { finalOnCommit: true });
    await target.open(hello.sizeBytes, hello.kind, hello.resume);
    const controller = this.adaptive
      ? new WindowController({
          levels: this.levels,
          initial: this.initialWindow,
          ...(this.opts.controller ? { tunables: this.opts.controller } : {}),
        })
      : undefined;
    return new Session(
      hello.disk,
      hello.session,
      hello.sizeBytes,
      hello.kind,
      target,
      controller,
      this.initialWindow,
    );
  }

  /** Called by the reader before a chunk's data is buffered: the credit check. */
  private admitChunk(conn: Conn, meta: ChunkMeta): void {
    const s = conn.session;
    if (s === undefined) throw new ProtocolError('CHUNK frame before the session was welcomed');
    if (s.committed) throw new ProtocolError(`CHUNK seq ${meta.seq} after COMMIT`);
    if (meta.bytes > s.unused) {
      throw new ProtocolError(
        `CHUNK seq ${meta.seq} of ${meta.bytes} bytes sent without credit (${s.unused} bytes granted and unused)`,
      );
    }
    const last = meta.extents[meta.extents.length - 1]!;
    if (last.offset + last.length > s.sizeBytes) {
      throw new ProtocolError(
        `CHUNK seq ${meta.seq} reaches byte ${last.offset + last.length}, past the ${s.sizeBytes}-byte disk`,
      );
    }
    for (const e of meta.extents) {
      const end = e.offset + e.length;
      if (e.offset % PROTOCOL_BLOCK_SIZE !== 0 || (end % PROTOCOL_BLOCK_SIZE !== 0 && end !== s.sizeBytes)) {
        throw new ProtocolError(
          `CHUNK seq ${meta.seq}: extent at offset ${e.offset} is not aligned to ${PROTOCOL_BLOCK_SIZE}-byte blocks`,
        );
      }
    }
    conn.grantAt = s.consume(meta.bytes, performance.now());
    conn.admitted += meta.bytes;
    s.inflight += meta.bytes;
    s.unit = Math.max(s.unit, meta.bytes);
    this.counters.inflight += meta.bytes;
    this.counters.peakInflight = Math.max(this.counters.peakInflight, this.counters.inflight);
  }

  private onChunk(conn: Conn, s: Session, chunk: FrameOf<'chunk'>): void {
    const grantAt = conn.grantAt;
    // Checked before anything is written: a chunk that does not hash to its digest never lands.
    if (createHash('sha256').update(chunk.data).digest('hex') !== chunk.sha256) {
      this.finish(conn, s, chunk, grantAt, {
        code: 'checksum',
        reason: `chunk ${chunk.seq} at offset ${chunk.offset} arrived with a checksum mismatch`,
      });
      return;
    }
    const last = chunk.extents[chunk.extents.length - 1]!;
    const descriptor: Descriptor = {
      seq: chunk.seq,
      offset: chunk.offset,
      length: last.offset + last.length - chunk.offset,
      extents: chunk.extents,
      bytes: chunk.bytes,
    };
    const write: Promise<void> = s.target
      .writeChunk(descriptor, chunk.data, chunk.sha256)
      .then(
        () => {
          this.counters.chunksWritten++;
          this.counters.bytesWritten += chunk.bytes;
          this.finish(conn, s, chunk, grantAt, undefined);
        },
        (err) => {
          const code = classifyWriteError(err);
          this.log(
            `node: ${conn.where}: writing chunk ${chunk.seq} at offset ${chunk.offset} failed (${code}): ${errorMessage(err)}`,
          );
          this.finish(conn, s, chunk, grantAt, { code, reason: errorMessage(err) });
        },
      )
      .finally(() => s.writes.delete(write));
    s.writes.add(write);
  }

  /** A chunk is done (written, or refused): free its memory, feed the controller, re-grant, reply. */
  private finish(
    conn: Conn,
    s: Session,
    chunk: ChunkMeta,
    grantAt: number,
    failure:
      | { code: 'checksum' | 'write-retryable' | 'write-failed' | 'throttled'; reason: string }
      | undefined,
  ): void {
    this.release(s, chunk.bytes);
    const now = performance.now();
    s.controller?.record({
      at: now,
      bytes: failure ? 0 : chunk.bytes,
      latencyMs: now - grantAt,
      throttled: failure?.code === 'throttled',
      error: failure !== undefined && failure.code !== 'throttled',
      windowLimited: chunk.waited,
      nodePressure: s.budgetLimited,
    });
    this.allocate();
    const sent = failure
      ? conn.send({
          type: 'nack',
          tag: chunk.tag,
          seq: chunk.seq,
          code: failure.code,
          granted: s.granted,
          reason: failure.reason,
        })
      : conn.send({ type: 'ack', tag: chunk.tag, seq: chunk.seq, granted: s.granted });
    if (failure) this.counters.nacks++;
    if (sent) s.announcedGranted = Math.max(s.announcedGranted, s.granted);
    this.flushGrants();
  }

  private release(s: Session, bytes: number): void {
    s.inflight -= bytes;
    this.counters.inflight -= bytes;
  }

  private onWant(conn: Conn, s: Session, bytes: number, order: number): void {
    if (bytes === 0 || bytes > MAX_CHUNK_BYTES)
      throw new ProtocolError(`WANT of ${bytes} bytes (chunks are 1..${MAX_CHUNK_BYTES})`);
    if (bytes > this.budget) {
      this.refuse(
        conn,
        `a chunk of ${formatBytes(bytes)} can never fit this node's ${formatBytes(this.budget)} budget`,
        false,
      );
      return;
    }
    s.wantOrder = Math.max(s.wantOrder, order);
    s.unit = Math.max(s.unit, bytes);
    this.allocate();
    // Answered on the asking connection even when nothing changed: a GRANT sent on a connection
    // that has since died may be the one the source is waiting for.
    conn.send({ type: 'grant', granted: s.granted, window: s.window });
    s.announcedGranted = s.granted;
    s.announcedWindow = s.window;
    this.flushGrants();
  }

  private onExtents(conn: Conn, s: Session, extents: readonly Extent[]): void {
    if (conn.commitExtents.length + extents.length > MAX_COMMIT_EXTENTS) {
      throw new ProtocolError(`change map of more than ${MAX_COMMIT_EXTENTS} extents`);
    }
    const previous = conn.commitExtents[conn.commitExtents.length - 1];
    let end = previous ? previous.offset + previous.length : 0;
    for (const e of extents) {
      if (e.offset < end)
        throw new ProtocolError(`commit extent at offset ${e.offset} overlaps or precedes the previous one`);
      end = e.offset + e.length;
      if (end > s.sizeBytes)
        throw new ProtocolError(`commit extent at offset ${e.offset} ends past the ${s.sizeBytes}-byte disk`);
      conn.commitExtents.push(e);
      conn.commitBytes += e.length;
    }
  }

  private onCommit(conn: Conn, s: Session, commit: FrameOf<'commit'>): void {
    const extents = conn.commitExtents;
    const bytes = conn.commitBytes;
    conn.commitExtents = [];
    conn.commitBytes = 0;
    if (commit.extentCount !== extents.length) {
      throw new ProtocolError(
        `COMMIT announces ${commit.extentCount} extents but ${extents.length} were sent`,
      );
    }
    if (commit.bytes !== bytes) {
      throw new ProtocolError(`COMMIT says ${commit.bytes} bytes but its extents cover ${bytes}`);
    }
    // No chunk follows a commit: the source's unused credit goes back to the budget (a RELEASE of
    // it may still arrive on another connection, and stays valid).
    s.committed = true;
    this.allocate();
    this.flushGrants();
    void this.control(conn, s, 'commit', async () => {
      // Chunks of a lost connection may still be landing; the commit must come after them.
      await Promise.allSettled([...s.writes]);
      const targetRef = await s.target.commit({
        chunks: commit.chunks,
        bytes: commit.bytes,
        aggregateSha256: commit.aggregateSha256,
        extents,
      });
      await this.recordCommit(s, commit, targetRef);
      this.log(
        `node: ${conn.where}: committed ${commit.chunks} chunks, ${formatBytes(commit.bytes)} (${targetRef})`,
      );
      conn.send({ type: 'committed', targetRef });
    });
  }

  /** Runs a commit-phase operation; a failure is reported with ERROR (retryable as classified) and closes the connection. */
  private async control(conn: Conn, s: Session, what: string, op: () => Promise<void>): Promise<void> {
    try {
      await s.serially(op);
    } catch (err) {
      this.log(`node: ${conn.where}: ${what} failed: ${errorMessage(err)}`);
      const code = classifyWriteError(err);
      this.refuse(conn, `${what} of disk ${s.disk} failed: ${errorMessage(err)}`, code !== 'write-failed');
    }
  }

  /** The last commit of each disk, so an operator on this host can verify an image without the source. */
  private async recordCommit(s: Session, commit: FrameOf<'commit'>, targetRef: string): Promise<void> {
    const dir = this.opts.stateDir;
    if (dir === undefined) return;
    const path = join(dir, 'commits', `${s.disk}.json`);
    const record = {
      disk: s.disk,
      image: join(this.opts.targetDir, s.disk),
      kind: s.kind,
      sizeBytes: s.sizeBytes,
      chunks: commit.chunks,
      bytes: commit.bytes,
      aggregateSha256: commit.aggregateSha256,
      targetRef,
      committedAt: new Date().toISOString(),
    };
    try {
      await writeFile(`${path}.tmp`, `${JSON.stringify(record, null, 2)}\n`);
      await rename(`${path}.tmp`, path);
    } catch (err) {
      // The image is committed either way; the record is a convenience for `ferry verify` here.
      this.log(`node: disk ${s.disk}: could not record the commit in ${dir}: ${errorMessage(err)}`);
    }
  }

  // ---- Credit ----

  private totalHeld(): number {
    let sum = 0;
    for (const s of this.sessions.values()) sum += s.held;
    return sum;
  }

  /**
   * Grants credit in whole units, like the engine's scheduler grants descriptors: among sessions
   * with window room, the one holding the fewest bytes goes next (max-min fairness); if its unit does
   * not fit the budget, nothing is granted until completions free enough, so a busy disk cannot keep
   * taking budget a starved one is waiting for.
   */
  private allocate(): void {
    const now = performance.now();
    let total = this.totalHeld();
    for (;;) {
      let best: Session | undefined;
      for (const s of this.sessions.values()) {
        if (!s.wantsCredit) continue;
        // A window is never smaller than one chunk, or a chunk that large could never be sent.
        if (s.held + s.unit > Math.max(s.window, s.unit)) continue;
        if (
          best === undefined ||
          s.held < best.held ||
          (s.held === best.held && s.lastGrantTick < best.lastGrantTick)
        ) {
          best = s;
        }
      }
      if (best === undefined) return;
      if (total + best.unit > this.budget) {
        best.budgetLimited = true;
        return;
      }
      best.budgetLimited = false;
      best.grant(best.unit, now);
      best.lastGrantTick = this.grantTick++;
      total += best.unit;
      this.counters.peakHeld = Math.max(this.counters.peakHeld, total);
    }
  }

  /** Tells each source about credit or window changes it has not heard of yet. */
  private flushGrants(): void {
    for (const s of this.sessions.values()) {
      if (s.granted === s.announcedGranted && s.window === s.announcedWindow) continue;
      for (const c of s.conns) {
        if (c.send({ type: 'grant', granted: s.granted, window: s.window })) {
          s.announcedGranted = s.granted;
          s.announcedWindow = s.window;
          break;
        }
      }
    }
  }

  private tick(): void {
    const now = performance.now();
    for (const s of this.sessions.values()) {
      if (!s.controller || s.tearingDown) continue;
      const decision = s.controller.evaluate(now);
      if (decision.changed) {
        s.window = decision.window;
        this.log(`node: disk ${s.disk}: window -> ${formatBytes(decision.window)} (${decision.reason})`);
      }
    }
    this.allocate();
    this.flushGrants();
  }

  private faultSample(s: Session) {
    return {
      at: performance.now(),
      bytes: 0,
      latencyMs: 0,
      throttled: false,
      error: true,
      windowLimited: false,
      nodePressure: s.budgetLimited,
    };
  }
}

/** Ends our side; a peer that does not hang up in turn within ERROR_LINGER_MS is cut off. */
function hangUp(conn: Conn): void {
  conn.closing = true;
  conn.socket.end();
  const linger = setTimeout(() => conn.socket.destroy(), ERROR_LINGER_MS);
  linger.unref();
  conn.socket.once('close', () => clearTimeout(linger));
}

/** How a failed write or commit is reported to the source: retrying may help, or it cannot. */
function classifyWriteError(err: unknown): 'write-retryable' | 'write-failed' | 'throttled' {
  if (err instanceof TransferError)
    return err.throttled ? 'throttled' : err.retryable ? 'write-retryable' : 'write-failed';
  // A read-back mismatch: storage that did not keep what was written; writing it again may.
  if (err instanceof IntegrityError) return 'write-retryable';
  if (err instanceof FerryError) return 'write-failed';
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  return code !== undefined && PERMANENT_ERRNOS.has(code) ? 'write-failed' : 'write-retryable';
}

/** `host:port`, `[v6]:port` or {host, port}. */
export function parseListen(listen: NodeOptions['listen']): { host: string; port: number } {
  if (typeof listen !== 'string') return listen;
  const m = /^(?:\[([^\]]+)\]|([^:]+)):(\d{1,5})$/.exec(listen.trim());
  const port = m ? Number(m[3]) : Number.NaN;
  if (!m || !(port >= 0 && port <= 65535)) {
    throw new ConfigError(`listen address "${listen}" is not HOST:PORT (e.g. 127.0.0.1:7790)`, {
      setting: 'listen',
    });
  }
  return { host: (m[1] ?? m[2])!, port };
}
