// The replication node (`ferry serve`): grants credit, verifies chunks and writes them into the disk
// targets its composition root gives it (NodeTargets; the CLI's are file images in a directory).
import { createHash, randomBytes } from 'node:crypto';
import { mkdir, rename, writeFile } from 'node:fs/promises';
import type net from 'node:net';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { chunkAggregate } from '../engine/aggregate.ts';
import { DEFAULT_PARAMS } from '../engine/config.ts';
import { type ControllerTunables, WindowController } from '../engine/controller.ts';
import type { Descriptor } from '../engine/descriptors.ts';
import { ConfigError, errorMessage, FerryError, IntegrityError, TransferError } from '../engine/errors.ts';
import type { Extent } from '../engine/extents.ts';
import { isValidName, NAME_RULE } from '../engine/names.ts';
import type { Clock, CopyKind, DiskTarget, PublishedCheckpoint } from '../engine/ports.ts';
import { formatBytes } from '../engine/units.ts';
import { systemClock } from '../runtime/clock.ts';
import { allocateCredit, creditStep, INITIAL_GRANT_UNIT } from './credit.ts';
import {
  ConnectionCounts,
  DEFAULT_LIMITS,
  maxExtentsFor,
  maxSeqsFor,
  type NodeLimits,
  overLimit,
  resolveLimits,
} from './limits.ts';
import type { MaterialisedReplica, NodeTargets, RecoveryQuery } from './node-targets.ts';
import { diskInScope, INSECURE_PEER, type NodeTls, type PeerIdentity } from './peer.ts';
import {
  type ChunkMeta,
  chunkLayoutSha256,
  diskNameProblem,
  encodeFrame,
  type Frame,
  type FrameOf,
  FrameReader,
  INCARNATION_BYTES,
  MAX_CHUNK_BYTES,
  MAX_IMAGE_DATA_BYTES,
  MAX_PRUNED_LISTED,
  NO_TOKEN,
  PROTOCOL_BLOCK_SIZE,
  PROTOCOL_VERSION,
  ProtocolError,
  type PublishedNote,
  type RecoveryAsk,
  type ResumeCheck,
} from './protocol.ts';
import {
  checkProblem,
  commitProblem,
  type DigestLog,
  ExtentBuffer,
  type SessionRecord,
  SessionStore,
  tokensEqual,
} from './session-store.ts';
import { createNodeListener } from './transport.ts';

// A source that connects but says nothing within this is not a Ferry source, or is gone (limits.ts).
const DEFAULT_HANDSHAKE_TIMEOUT_MS = DEFAULT_LIMITS.handshakeTimeoutMs;
// The engine's evaluation period: the controller's signals are bucketed at this resolution anyway.
const DEFAULT_TICK_MS = 250;
// The node's default clock: real time, monotonic (performance.now, as the Clock port asks; the
// system clock's Date.now may step), since chunk latencies and the window controller are measured on it.
const NODE_CLOCK: Clock = { now: () => performance.now(), sleep: systemClock.sleep };
// Connections accepted past maxConnections only to be told, in an ERROR frame, which limit they
// hit; beyond this headroom the OS refuses them silently (file descriptors are finite).
const REFUSAL_HEADROOM = 64;
// Extents held for COMMITs node-wide: this many sessions' worth of maxCommitExtents.
const COMMIT_EXTENTS_SESSIONS = 4;
// TCP keepalive so a source host that vanished (no FIN, no RST) frees its disk's credit and lock.
const KEEPALIVE_MS = 15_000;
// After an ERROR frame the peer gets this long to read it and hang up before the socket is destroyed.
const ERROR_LINGER_MS = 2_000;
// Loss reports kept per session for connections that join later; a cycle losing more connections
// than this has bigger problems, and a missed report only makes the source more conservative.
const MAX_CLOSED_REPORTS = 10_000;
// Errno codes that writing again cannot fix; anything else (EIO, EAGAIN, ...) may pass on retry.
const PERMANENT_ERRNOS = new Set(['ENOSPC', 'EDQUOT', 'EROFS', 'EACCES', 'EPERM', 'EFBIG', 'ENAMETOOLONG']);

/** How to run a node; the limits (limits.ts, NodeLimits) are settings of it too, each with a default. */
export interface NodeOptions extends Partial<NodeLimits> {
  /** `host:port` or {host, port}; port 0 picks a free port (see `address`). */
  readonly listen: string | { readonly host: string; readonly port: number };
  /** What the node writes each disk into: made by whoever starts the node (the CLI: file images). */
  readonly targets: NodeTargets;
  /**
   * Where the node records each disk's session (resume token, the digest of every chunk it
   * verified) under `sessions/`, and its last commit (for `ferry verify` on this host) under
   * `commits/`. Without it the session records go to `sessionDir`.
   */
  readonly stateDir?: string;
  /**
   * Where the session records go when there is no `stateDir` (`ferry serve --insecure` without
   * --state keeps them beside its images). One of the two is required.
   */
  readonly sessionDir?: string;
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
  /** Operator log lines (sessions, windows, errors); never block data. */
  readonly log?: (line: string) => void;
  /** TLS 1.3 with client certificates of the node's CA (pki.ts `openNodePki(...).tls`). */
  readonly tls?: NodeTls;
  /** Plain TCP without authentication instead of TLS: refused unless `listen` is a loopback address. */
  readonly insecure?: boolean;
  /**
   * Time of credit grants, chunk latencies and window evaluations (ms, monotonic); default real time.
   * Handshake and idle timeouts still run on real time.
   */
  readonly clock?: Clock;
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
  /** Connections and requests refused or closed by a limit, by the limit's name (NodeLimits). */
  readonly refusals: Readonly<Record<string, number>>;
  /** Connections the node stopped reading from because they do not read their replies. */
  readonly pausedConnections: number;
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

/** How a session comes to be: new (over an existing image or not), or resumed from the node's record. */
type SessionStart =
  | { readonly kind: 'new'; readonly overImage: boolean }
  | { readonly kind: 'resume'; readonly record: SessionRecord };

/** The node will not commit what a COMMIT claims; nothing was written. */
class CommitRefused extends FerryError {
  constructor(message: string) {
    super(message);
    this.name = 'CommitRefused';
  }
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
  /** Chunk bytes admitted in this incarnation: credit grows with the data that flowed (see `cap`). */
  dataAdmitted = 0;
  /** When the session last moved on, or the node last owed it something (see Node.sweep). */
  idleSince = performance.now();
  /** Commit-phase operations under way (FLUSH, COMMIT, AFTER_PUBLISH): the node owes an answer. */
  controlOps = 0;
  /** Extents received for COMMIT on its connections and not yet committed. */
  extentsHeld = 0;
  private readonly grants: GrantRecord[] = [];
  private commitChain: Promise<unknown> = Promise.resolve();

  constructor(
    readonly disk: string,
    readonly id: string,
    readonly sizeBytes: number,
    readonly kind: CopyKind,
    readonly target: DiskTarget,
    readonly controller: WindowController | undefined,
    initialWindow: number,
    /** The node's durable record of the session (its token; committed or not). */
    public record: SessionRecord,
    /** What the node verified of each chunk, by seq: what COMMIT and resume checks are held to. */
    readonly digests: DigestLog,
  ) {
    this.window = initialWindow;
    this.committed = record.state === 'committed';
  }

  /** It has sent a chunk in this incarnation: a source moving data, not an idle HELLO. */
  get proven(): boolean {
    return this.dataAdmitted > 0;
  }

  /**
   * The most it may hold (credit plus chunks in flight): its window, but never more than two chunks
   * past the data it has sent, so credit is granted only as data flows. Two, not one: grants come
   * in whole chunks while an increment's chunks are often smaller, so up to a chunk of credit may sit
   * unused below the one the next chunk needs.
   */
  get cap(): number {
    return Math.min(Math.max(this.window, this.unit), 2 * this.unit + this.dataAdmitted);
  }

  /**
   * Credit it may be granted next, 0 for none: a whole chunk while that keeps it within its cap;
   * before its first chunk, what tops it up to one chunk (it may hold a smaller WELCOME grant).
   */
  get step(): number {
    return creditStep(this);
  }

  /** The node owes the source something: a write, a commit-phase answer, or credit it may have. */
  get owed(): boolean {
    return (
      this.writes.size > 0 ||
      this.controlOps > 0 ||
      (this.wantsCredit && this.unused < this.unit && this.step > 0)
    );
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
  /** EXTENTS received for the next COMMIT on this connection. */
  commitExtents = new ExtentBuffer();
  /** Accepted: the handshake timeout runs from here until its HELLO is complete. */
  readonly acceptedAt = performance.now();
  /** Since when the frame now arriving has been arriving (set at each complete frame). */
  frameSince = performance.now();
  /** Reading stopped until the peer reads the replies queued for it. */
  paused = false;
  /** Counted against the connection limits (until it closes or the node gives up on it). */
  counted = false;
  /** No longer part of its session (closed, or refused by the node and lingering). */
  detached = false;
  /** Replies queued past `soft` stop reading from the peer; past `hard` the connection is dropped. */
  replyLimits = { soft: DEFAULT_LIMITS.replyQueueBytes, hard: DEFAULT_LIMITS.maxReplyQueueBytes };
  onOverflow: (queued: number) => void = () => {};
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
    this.throttleReads();
    return true;
  }

  /**
   * Replies pile up only when the peer does not read them: stop reading from it (so it gets no more
   * answers) until they drain, and drop it past the hard cap. Memory per peer stays bounded.
   */
  private throttleReads(): void {
    const queued = this.socket.writableLength;
    if (queued > this.replyLimits.hard) {
      this.onOverflow(queued);
      this.socket.destroy();
      return;
    }
    if (queued <= this.replyLimits.soft || this.paused) return;
    this.paused = true;
    this.socket.pause();
    this.socket.once('drain', () => {
      this.paused = false;
      if (!this.socket.destroyed) this.socket.resume();
    });
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
  private readonly limits: NodeLimits;
  private readonly counts: ConnectionCounts;
  private readonly store: SessionStore;
  /** Extents held for COMMITs, all sessions together. */
  private extentsHeld = 0;
  private readonly refusals: Record<string, number> = {};

  constructor(private readonly opts: NodeOptions) {
    this.limits = resolveLimits(opts);
    this.counts = new ConnectionCounts(this.limits);
    this.budget = opts.nodeBudget ?? DEFAULT_PARAMS.nodeBudget;
    this.levels = opts.levels ?? DEFAULT_PARAMS.windowLevels;
    this.adaptive = opts.adaptive ?? true;
    this.initialWindow =
      opts.initialWindow ??
      (this.levels.includes(DEFAULT_PARAMS.window) ? DEFAULT_PARAMS.window : this.levels[0]!);
    this.log = opts.log ?? (() => {});
    const sessions = opts.stateDir !== undefined ? join(opts.stateDir, 'sessions') : opts.sessionDir;
    if (sessions === undefined) {
      throw new ConfigError('a node needs a state directory (or a directory for its session records)', {
        setting: 'stateDir',
      });
    }
    this.store = new SessionStore(sessions, this.log);
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
    // TLS, or plain TCP on loopback when told: refused here, before listening, otherwise.
    this.server = createNodeListener(
      {
        host: parseListen(opts.listen).host,
        tls: opts.tls,
        insecure: opts.insecure,
        handshakeTimeoutMs: opts.handshakeTimeoutMs ?? DEFAULT_HANDSHAKE_TIMEOUT_MS,
        log: this.log,
      },
      (socket, identity) => this.accept(socket, identity),
    );
    this.server.maxConnections = this.limits.maxConnections + REFUSAL_HEADROOM;
  }

  get address(): string {
    return this.host.includes(':') ? `[${this.host}]:${this.port}` : `${this.host}:${this.port}`;
  }

  async start(): Promise<void> {
    const { host, port } = parseListen(this.opts.listen);
    if (this.opts.stateDir !== undefined)
      await mkdir(join(this.opts.stateDir, 'commits'), { recursive: true });
    await this.store.init();
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
      refusals: { ...this.refusals },
      pausedConnections: [...this.conns].filter((c) => c.paused).length,
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

  /** A connection whose credential was admitted (or any, on an insecure node); nothing of it is read yet. */
  private accept(socket: net.Socket, identity: PeerIdentity): void {
    const peer = `${socket.remoteAddress}:${socket.remotePort}`;
    if (this.closing) {
      socket.destroy();
      return;
    }
    const conn = new Conn(this.nextConnId++, socket, peer, identity);
    conn.reader = new FrameReader({
      from: 'source',
      onFrame: (frame) => this.onFrame(conn, frame),
      admitChunk: (meta) => this.admitChunk(conn, meta),
    });
    this.conns.add(conn);
    socket.setNoDelay(true);
    socket.setKeepAlive(true, KEEPALIVE_MS);
    // The handshake and idle timeouts are the sweep's (tick): they count frames, not bytes.
    conn.replyLimits = { soft: this.limits.replyQueueBytes, hard: this.limits.maxReplyQueueBytes };
    conn.onOverflow = (queued) => {
      this.refusals.maxReplyQueueBytes = (this.refusals.maxReplyQueueBytes ?? 0) + 1;
      this.log(
        `node: ${conn.where}: ${overLimit('maxReplyQueueBytes', this.limits.maxReplyQueueBytes, `${formatBytes(queued)} of replies unread; connection dropped`)}`,
      );
    };
    socket.on('data', (chunk: Buffer) => {
      if (conn.closing) return;
      // A frame starts arriving: the idle timeout measures from here to its end.
      if (conn.reader.buffered === 0) conn.frameSince = performance.now();
      try {
        conn.reader.push(chunk);
      } catch (err) {
        this.violation(conn, err);
      }
    });
    socket.on('error', () => {}); // 'close' follows; a reset source is handled there
    socket.on('close', () => this.onClose(conn));
    this.admitConnection(conn);
  }

  /**
   * Counts a new connection against maxConnections and maxConnectionsPerCredential. At a limit the
   * node first drops the connection (of that credential, for the per-credential limit) that has
   * waited longest without a complete HELLO, so sockets that say nothing cannot keep a source out;
   * otherwise the newcomer is refused with an ERROR naming the limit.
   */
  private admitConnection(conn: Conn): void {
    const credential = conn.identity.credential;
    let over = this.counts.over(credential);
    if (over !== undefined) {
      const silent = this.oldestSilent(over === 'maxConnectionsPerCredential' ? credential : undefined);
      if (silent !== undefined) {
        this.refuseLimit(silent, over, 'this connection sent no HELLO and makes room for one that may', true);
        over = this.counts.over(credential);
      }
    }
    if (over === undefined) {
      this.counts.add(credential);
      conn.counted = true;
      return;
    }
    const what =
      over === 'maxConnections'
        ? `the node has ${this.limits.maxConnections} connections`
        : `credential ${credential} already has ${this.limits.maxConnectionsPerCredential} connections to this node`;
    this.refuseLimit(conn, over, what, true);
  }

  /** The counted connection (of `credential`, if given) waiting longest without a complete HELLO. */
  private oldestSilent(credential?: string): Conn | undefined {
    let oldest: Conn | undefined;
    for (const c of this.conns) {
      if (!c.counted || c.closing || c.session !== undefined || c.handshaking) continue;
      if (credential !== undefined && c.identity.credential !== credential) continue;
      if (oldest === undefined || c.acceptedAt < oldest.acceptedAt) oldest = c;
    }
    return oldest;
  }

  private uncount(conn: Conn): void {
    if (!conn.counted) return;
    conn.counted = false;
    this.counts.remove(conn.identity.credential);
  }

  private onClose(conn: Conn): void {
    this.conns.delete(conn);
    conn.closing = true;
    this.uncount(conn);
    this.detach(conn);
  }

  /**
   * Takes a connection out of its session: it closed, or the node gave up on it (it may linger
   * while its ERROR is read, but holds nothing of the session: no credit, no lock). Idempotent.
   */
  private detach(conn: Conn): void {
    if (conn.detached) return;
    conn.detached = true;
    this.dropExtents(conn);
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
      await s.digests
        .close()
        .catch((err) =>
          this.log(`node: disk ${s.disk}: closing its digest record failed: ${errorMessage(err)}`),
        );
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

  /** Sends ERROR and hangs up; the connection stops counting and leaves its session at once. */
  private refuse(conn: Conn, reason: string, retryable: boolean): void {
    if (conn.closing) return;
    conn.send({ type: 'error', retryable, reason });
    conn.clean = true;
    hangUp(conn);
    this.uncount(conn);
    this.detach(conn);
  }

  /** Refuses with an ERROR naming the limit that was hit (NodeLimits), and counts it. */
  private refuseLimit(conn: Conn, limit: keyof NodeLimits, what: string, retryable: boolean): void {
    if (conn.closing) return;
    this.refusals[limit] = (this.refusals[limit] ?? 0) + 1;
    const reason = overLimit(limit, this.limits[limit], what);
    this.log(`node: ${conn.where}: ${reason}`);
    this.refuse(conn, reason, retryable);
  }

  /** Forgets the EXTENTS a connection held for a COMMIT. */
  private dropExtents(conn: Conn): void {
    const n = conn.commitExtents.length;
    if (n === 0) return;
    if (conn.session !== undefined) conn.session.extentsHeld -= n;
    this.extentsHeld -= n;
    conn.commitExtents = new ExtentBuffer();
  }

  // ---- Frames ----

  private onFrame(conn: Conn, frame: Frame): void {
    if (conn.closing) return;
    conn.frameSince = performance.now();
    if (frame.type === 'hello') {
      if (conn.session !== undefined || conn.handshaking)
        throw new ProtocolError('second HELLO on one connection');
      // It spoke: opening the image may wait for a previous session to finish, which is not silence.
      conn.handshaking = true;
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
    // Frames that move the session on restart its idle clock; WANT and RELEASE do not (a peer
    // could send them forever without replicating anything).
    if (frame.type !== 'want' && frame.type !== 'release') s.idleSince = performance.now();
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
        s.consume(frame.bytes, this.clock.now());
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
          await this.publish(s.disk, s.target, s.record, this.publishedAs(s.disk, s.record, frame));
          await this.store.markPublished(s.disk);
          conn.send({ type: 'done' });
        });
        return;
      case 'flush':
        // Every chunk ACKed so far is written; make it and its digest slot durable, then say so.
        void this.control(conn, s, 'flush', async () => {
          await s.target.flush?.();
          await s.digests.sync();
          conn.send({ type: 'flushed' });
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
    // The credential's scope, from its certificate: checked before the disk's image is touched.
    if (!diskInScope(conn.identity.disks, hello.disk)) {
      this.log(`node: ${conn.where}: credential ${conn.identity.credential} refused for disk ${hello.disk}`);
      this.refuse(
        conn,
        `credential ${conn.identity.credential} may not write disk ${hello.disk} (scope '${conn.identity.disks}')`,
        false,
      );
      return;
    }
    if (this.closing) {
      this.refuse(conn, 'the node is shutting down', true);
      return;
    }
    const check = hello.check;
    if (check !== undefined) {
      await this.withDiskLock(hello.disk, async () => {
        // A source asking about its cycle again did not publish it (see settleCommit).
        await this.settleCommit(hello.disk, (r) => r.cycle !== hello.cycle);
        await this.answerCheck(conn, hello, check);
      });
      return;
    }
    const verify = hello.verify;
    if (verify !== undefined) {
      await this.withDiskLock(hello.disk, async () => {
        await this.settleCommit(hello.disk, (r) => r.commit?.targetRef === verify);
        await this.answerVerify(conn, hello.disk, verify);
      });
      return;
    }
    const published = hello.published;
    if (published !== undefined) {
      await this.withDiskLock(hello.disk, () => this.answerPublished(conn, hello, published));
      return;
    }
    const recover = hello.recover;
    if (recover !== undefined) {
      await this.answerRecover(conn, hello, recover);
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
        if (hello.resume && !tokensEqual(hello.token, s.record.token)) {
          this.refuse(conn, `disk ${hello.disk}: the resume token is not this session's`, false);
          return;
        }
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
        if (!hello.resume) await this.settleCommit(hello.disk, (r) => r.cycle !== hello.cycle);
        const start = hello.resume ? this.resumable(conn, hello) : await this.admitSession(conn, hello);
        if (start === undefined) return;
        try {
          s = await this.openSession(conn, hello, start);
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
      s.idleSince = performance.now();
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
        token: s.record.token,
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

  /**
   * A new session of a disk: the size it declares must fit maxDiskBytes, and the images its
   * credential started (this one counted twice while it stages beside an existing image) must fit
   * maxImageBytesPerCredential. Refuses and returns undefined when it does not fit.
   */
  private async admitSession(conn: Conn, hello: FrameOf<'hello'>): Promise<SessionStart | undefined> {
    if (hello.sizeBytes > this.limits.maxDiskBytes) {
      this.refuseLimit(
        conn,
        'maxDiskBytes',
        `disk ${hello.disk} declares ${formatBytes(hello.sizeBytes)}, more than this node takes`,
        false,
      );
      return undefined;
    }
    const credential = conn.identity.credential;
    const overImage = await this.opts.targets.exists(hello.disk);
    const total = this.store.usage(credential, hello.disk) + hello.sizeBytes * (overImage ? 2 : 1);
    if (total > this.limits.maxImageBytesPerCredential) {
      this.refuseLimit(
        conn,
        'maxImageBytesPerCredential',
        `disk ${hello.disk} of ${formatBytes(hello.sizeBytes)} would bring the images of credential ${credential} to ${formatBytes(total)}`,
        false,
      );
      return undefined;
    }
    return { kind: 'new', overImage };
  }

  /**
   * A resume: only of a session this node recorded, with its token, by the credential that started
   * it, of the same size and kind. Refuses and returns undefined otherwise: nobody resumes straight
   * into an image.
   */
  private resumable(conn: Conn, hello: FrameOf<'hello'>): SessionStart | undefined {
    const record = this.store.get(hello.disk);
    const problem =
      record === undefined
        ? 'the node has no session of it to resume'
        : !tokensEqual(hello.token, record.token)
          ? "the resume token is not that of the node's session of this disk"
          : record.credential !== conn.identity.credential
            ? `its session was started by another credential than ${conn.identity.credential}`
            : record.kind !== hello.kind || record.sizeBytes !== hello.sizeBytes
              ? `its session is a ${record.kind} copy of ${record.sizeBytes} bytes, not a ${hello.kind} copy of ${hello.sizeBytes}`
              : undefined;
    if (problem !== undefined || record === undefined) {
      this.log(`node: ${conn.where}: resume of disk ${hello.disk} refused: ${problem}`);
      this.refuse(conn, `disk ${hello.disk}: resume refused: ${problem}`, false);
      return undefined;
    }
    return { kind: 'resume', record };
  }

  /**
   * Settles a commit the node applied but never heard the fate of (the source went away between its
   * COMMIT and AFTER_PUBLISH): `published(record)` says, from what a new contact tells, whether the
   * source's catalog holds it. A source that starts or checks the SAME cycle again did not publish it
   * (its next cycle would have the next id); `ferry verify` names the checkpoint's reference. Then
   * the image is either made final (manifest installed, undo dropped) or rolled back to the last
   * checkpoint with its staging kept, so the cycle can still resume. Called under the disk's lock,
   * never while a session of the disk is live.
   */
  private async settleCommit(
    disk: string,
    published: (record: SessionRecord) => boolean | PublishedCheckpoint,
  ): Promise<void> {
    const record = this.store.get(disk);
    const live = this.sessions.get(disk);
    if (record?.state !== 'committed' || record.published || (live !== undefined && !live.tearingDown))
      return;
    if (live !== undefined) await this.retire(live);
    const target = this.opts.targets.target(disk);
    try {
      const as = published(record);
      if (as !== false) {
        // Told which checkpoint it became (a published or recover question), its undo data is kept
        // as that checkpoint's history; a new cycle's HELLO says only that it was published, and
        // then none is kept: recovering the checkpoints before it from here is refused (no history
        // of that cycle), never done wrong.
        await this.publish(disk, target, record, as === true ? undefined : as);
        await this.store.markPublished(disk);
        this.log(
          `node: disk ${disk}: the commit of cycle ${record.cycle} was published` +
            (as === true
              ? '; it is final, without history (which checkpoint it became was not said): checkpoints before it cannot be recovered from this node'
              : ` as checkpoint #${as.sequence}; it is final, its history kept`),
        );
      } else {
        // A target without rollback never changed the last checkpoint's data in place (ports.ts).
        await target.rollback?.();
        await this.store.reopen(disk);
        this.log(`node: disk ${disk}: the commit of cycle ${record.cycle} was never published; rolled back`);
      }
    } finally {
      await target
        .close()
        .catch((err) => this.log(`node: disk ${disk}: closing the image failed: ${errorMessage(err)}`));
    }
  }

  /**
   * Answers a check HELLO: whether the node holds the source's session of this cycle with these
   * chunks (their digests and layout, from its own record) and the file target still holds the
   * cycle's file. Then hangs up; nothing is opened or written.
   */
  private async answerCheck(conn: Conn, hello: FrameOf<'hello'>, check: ResumeCheck): Promise<void> {
    if (conn.closing) return;
    const record = this.store.get(hello.disk);
    let reason: string | undefined;
    if (record === undefined) reason = 'the node has no session of this disk';
    else if (record.credential !== conn.identity.credential)
      reason = 'its session was started by another credential';
    else if (record.state === 'committed') reason = 'its session is already committed';
    else if (record.cycle !== hello.cycle)
      reason = `the node's session is of cycle ${record.cycle}, not ${hello.cycle}`;
    else {
      const live = this.sessions.get(hello.disk);
      const digests = live?.record.id === record.id ? live.digests : await this.store.openDigests(hello.disk);
      let target: DiskTarget | undefined;
      try {
        target = this.opts.targets.target(hello.disk);
        reason =
          (await checkProblem(digests, check)) ??
          (await target.checkResume?.({ cycleId: record.id, chunks: [] }));
      } catch (err) {
        reason = `the node could not read its record: ${errorMessage(err)}`;
      } finally {
        await target?.close().catch(() => {});
        if (digests !== live?.digests) await digests.close().catch(() => {});
      }
    }
    conn.send({
      type: 'checked',
      held: reason === undefined,
      token: reason === undefined && record !== undefined ? record.token : NO_TOKEN,
      reason: reason ?? '',
    });
    this.log(`node: ${conn.where}: resume check of disk ${hello.disk}: ${reason ?? 'held'}`);
    conn.clean = true;
    hangUp(conn);
    this.uncount(conn);
  }

  /**
   * Answers a verify HELLO (`ferry verify` of a checkpoint whose replica is here): re-hashes the
   * disk's image region by region against its manifest and the checkpoint's reference, unless a
   * session is writing it. Then hangs up; nothing is opened for writing.
   */
  private async answerVerify(conn: Conn, disk: string, expectedRef: string): Promise<void> {
    if (conn.closing) return;
    const live = this.sessions.get(disk);
    let answer: FrameOf<'verified'>;
    const verify = this.opts.targets.verify?.bind(this.opts.targets);
    if (live !== undefined && !live.tearingDown) {
      answer = verifiedFailure('a source is replicating it now; verify once that run has ended');
    } else if (verify === undefined) {
      answer = verifiedFailure(`this node's targets (${this.opts.targets.name}) cannot be re-hashed here`);
    } else {
      try {
        const report = await verify(disk, expectedRef || undefined);
        answer = {
          type: 'verified',
          ok: report.ok,
          regions: report.regions,
          mismatches: report.mismatches,
          manifestRef: report.manifestRef,
          reason:
            report.ok || report.mismatches.length > 0
              ? ''
              : `its manifest is ${report.manifestRef}, not the checkpoint's ${expectedRef}`,
        };
      } catch (err) {
        answer = verifiedFailure(`the node cannot re-hash its image: ${errorMessage(err)}`);
      }
    }
    conn.send(answer);
    this.log(
      `node: ${conn.where}: verify of disk ${disk}: ${answer.ok ? `OK (${answer.regions} regions)` : answer.reason || `mismatch at ${answer.mismatches.join(', ')}`}`,
    );
    conn.clean = true;
    hangUp(conn);
    this.uncount(conn);
  }

  /**
   * The session's commit is published (as `as`, when known): its target installs it and keeps its
   * undo data as history, recorded under the session's id (what the target was opened with) and
   * then named after the checkpoint. A history that cannot be named is logged, not fatal: the
   * commit is final either way, and recovering the checkpoints before it from here is refused.
   */
  private async publish(
    disk: string,
    target: DiskTarget,
    record: SessionRecord,
    as: PublishedCheckpoint | undefined,
  ): Promise<void> {
    const naming = this.opts.targets.nameHistory?.bind(this.opts.targets);
    const keep = as !== undefined && naming !== undefined;
    await target.afterPublish?.(keep ? { id: record.id, sequence: as.sequence } : undefined);
    if (!keep) return;
    await naming(disk, as.sequence, record.id, as.id).catch((err) =>
      this.log(
        `node: disk ${disk}: the history of checkpoint ${as.id} could not be named: ${errorMessage(err)}`,
      ),
    );
  }

  /**
   * What an AFTER_PUBLISH says the session's cycle was published as, for its history; undefined
   * (no history kept, and logged) when it names no checkpoint or another cycle than the session's.
   */
  private publishedAs(
    disk: string,
    record: SessionRecord,
    frame: FrameOf<'after-publish'>,
  ): PublishedCheckpoint | undefined {
    if (frame.sequence === 0) return undefined;
    if (record.cycle !== '' && frame.checkpoint !== record.cycle) {
      this.log(
        `node: disk ${disk}: AFTER_PUBLISH names checkpoint ${frame.checkpoint}, but the session is of cycle ${record.cycle}; no history kept`,
      );
      return undefined;
    }
    return { id: frame.checkpoint, sequence: frame.sequence };
  }

  /**
   * Answers a published question (after a publication, or a crashed run's clean-up): a commit of
   * that cycle the node never heard the fate of is settled as published, keeping its history under
   * the checkpoint's sequence; then the disk's history is pruned up to `keepFrom`. A failed prune
   * leaves more history, never less. Then hangs up.
   */
  private async answerPublished(conn: Conn, hello: FrameOf<'hello'>, note: PublishedNote): Promise<void> {
    if (conn.closing) return;
    const disk = hello.disk;
    let answer: FrameOf<'pruned'> = { type: 'pruned', ok: true, count: 0, sequences: [], reason: '' };
    try {
      const live = this.sessions.get(disk);
      const record = this.store.get(disk);
      // A session whose commit is published and whose connections are still closing writes nothing
      // more; any other live session may be recording history, which a prune must not race.
      const finished = record?.state === 'committed' && record.published && live?.controlOps === 0;
      if (live !== undefined && !live.tearingDown && !finished) {
        answer = {
          ...answer,
          ok: false,
          reason: 'a source is replicating it now; its history is pruned after that run',
        };
      } else {
        await this.settleCommit(disk, (r) =>
          r.cycle === hello.cycle ? { id: hello.cycle, sequence: note.sequence } : false,
        );
        const prune = this.opts.targets.pruneHistory?.bind(this.opts.targets);
        if (note.keepFrom === 0) {
          // Nothing to prune: the question only settled the commit.
        } else if (prune === undefined) {
          answer = {
            ...answer,
            ok: false,
            reason: `this node's targets (${this.opts.targets.name}) keep no history`,
          };
        } else {
          const pruned = await prune(disk, note.keepFrom);
          answer = { ...answer, count: pruned.length, sequences: pruned.slice(0, MAX_PRUNED_LISTED) };
        }
      }
    } catch (err) {
      answer = { ...answer, ok: false, reason: `the node could not prune its history: ${errorMessage(err)}` };
    }
    conn.send(answer);
    this.log(
      `node: ${conn.where}: checkpoint #${note.sequence} of disk ${disk} published` +
        (answer.ok
          ? `; ${answer.count} history entr${answer.count === 1 ? 'y' : 'ies'} pruned`
          : `; ${answer.reason}`),
    );
    conn.clean = true;
    hangUp(conn);
    this.uncount(conn);
  }

  /**
   * Answers a recover question: plans the checkpoint's image from the replica and its history
   * (under the disk's lock, after settling a commit the question shows was published), answers
   * RECOVERY, then sends the manifest (plan) or the materialised image's non-zero data (stream),
   * paced by the socket, and IMAGE_END. A refusal is a RECOVERY with the reason. Then hangs up.
   */
  private async answerRecover(conn: Conn, hello: FrameOf<'hello'>, ask: RecoveryAsk): Promise<void> {
    const disk = hello.disk;
    const query: RecoveryQuery = {
      checkpoint: {
        id: hello.cycle,
        sequence: ask.sequence,
        sizeBytes: hello.sizeBytes,
        targetRef: ask.targetRef,
      },
      later: ask.later,
    };
    const targets = this.opts.targets;
    let planned: { sizeBytes: number; manifest: Buffer | undefined } | undefined;
    let replica: MaterialisedReplica | undefined;
    let refusal: { reason: string; message: string } | undefined;
    const refuse = (why: string) => ({
      reason: `disk ${disk}: ${why}`,
      message: `checkpoint ${hello.cycle}, disk ${disk}: ${why}`,
    });
    await this.withDiskLock(disk, async () => {
      if (conn.closing) return;
      const live = this.sessions.get(disk);
      if (live !== undefined && !live.tearingDown) {
        refusal = refuse('a source is replicating it now; recover once that run has ended');
        return;
      }
      if (targets.planRecovery === undefined || targets.materialise === undefined) {
        refusal = refuse(`this node's targets (${targets.name}) keep no history to recover from`);
        return;
      }
      // The question names the checkpoint and every later one that wrote the disk: a commit of one
      // of them the node never heard the fate of was published, as that checkpoint.
      const named = [{ id: hello.cycle, sequence: ask.sequence }, ...ask.later];
      await this.settleCommit(disk, (r) => named.find((c) => c.id === r.cycle) ?? false);
      const record = this.store.get(disk);
      if (record?.state === 'committed' && !record.published) {
        refusal = refuse(
          `the node holds a commit of cycle ${record.cycle}, which the catalog does not name; replicate the set again (or ferry verify it) to settle it first`,
        );
        return;
      }
      try {
        if (ask.mode === 'stream') replica = await targets.materialise(disk, query);
        else planned = await targets.planRecovery(disk, query, ask.mode === 'plan');
      } catch (err) {
        const reason = (err as { reason?: unknown }).reason;
        refusal = {
          reason: typeof reason === 'string' ? reason : errorMessage(err),
          message: errorMessage(err),
        };
      }
    });
    try {
      if (conn.closing) return;
      const sizeBytes = replica?.sizeBytes ?? planned?.sizeBytes ?? 0;
      conn.send({
        type: 'recovery',
        ok: refusal === undefined,
        sizeBytes,
        reason: refusal?.reason ?? '',
        message: refusal?.message ?? '',
      });
      this.log(
        `node: ${conn.where}: recover ${ask.mode} of checkpoint ${hello.cycle}, disk ${disk}: ${refusal?.message ?? 'OK'}`,
      );
      if (refusal === undefined && ask.mode !== 'check') {
        const sent = replica
          ? await this.sendData(conn, 'image', replica.runs(MAX_IMAGE_DATA_BYTES))
          : await this.sendData(conn, 'manifest', pieces(planned?.manifest ?? Buffer.alloc(0)));
        if (sent !== undefined) conn.send({ type: 'image-end', ...sent });
      }
    } catch (err) {
      this.log(
        `node: ${conn.where}: sending checkpoint ${hello.cycle} of disk ${disk} failed: ${errorMessage(err)}`,
      );
      this.refuse(
        conn,
        `sending checkpoint ${hello.cycle} of disk ${disk} failed: ${errorMessage(err)}`,
        true,
      );
      return;
    } finally {
      await replica
        ?.remove()
        .catch((err) =>
          this.log(`node: disk ${disk}: removing a materialised checkpoint failed: ${errorMessage(err)}`),
        );
    }
    conn.clean = true;
    hangUp(conn);
    this.uncount(conn);
  }

  /**
   * Sends data as IMAGE_DATA frames, each written only once the socket has drained the one before
   * (the peer's reading paces it: the node holds one frame of it at a time). Returns what was sent,
   * or undefined if the connection ended first.
   */
  private async sendData(
    conn: Conn,
    part: 'manifest' | 'image',
    runs: AsyncIterable<{ readonly offset: number; readonly data: Uint8Array }>,
  ): Promise<{ frames: number; bytes: number } | undefined> {
    let frames = 0;
    let bytes = 0;
    for await (const { offset, data } of runs) {
      if (conn.closing || conn.socket.destroyed) return undefined;
      const sha256 = createHash('sha256').update(data).digest('hex');
      if (!conn.socket.write(encodeFrame({ type: 'image-data', part, offset, sha256, data }))) {
        // A peer that stops reading what it asked for is dropped after the idle timeout, so it
        // cannot hold the connection (and the materialised image) for ever.
        const drained = await new Promise<boolean>((resolve) => {
          const done = (ok: boolean) => () => {
            clearTimeout(timer);
            conn.socket.off('drain', onDrain);
            conn.socket.off('close', onClose);
            resolve(ok);
          };
          const onDrain = done(true);
          const onClose = done(false);
          const timer = setTimeout(done(false), this.limits.idleTimeoutMs);
          conn.socket.once('drain', onDrain);
          conn.socket.once('close', onClose);
        });
        if (!drained) {
          this.refuseLimit(conn, 'idleTimeoutMs', `the peer stopped reading the ${part} it asked for`, true);
          return undefined;
        }
      }
      frames++;
      bytes += data.length;
    }
    return conn.closing || conn.socket.destroyed ? undefined : { frames, bytes };
  }

  private async openSession(conn: Conn, hello: FrameOf<'hello'>, start: SessionStart): Promise<Session> {
    // Sources cut extents at protocol blocks: a target must be able to write any one of them.
    const target = this.opts.targets.target(hello.disk);
    if (PROTOCOL_BLOCK_SIZE % target.blockSize !== 0) {
      throw new FerryError(
        `${target.name} writes ${target.blockSize}-byte blocks, which do not divide the protocol's ${PROTOCOL_BLOCK_SIZE}`,
      );
    }
    // A new session is recorded (and its token durable) before its image is touched or welcomed.
    const record =
      start.kind === 'resume'
        ? start.record
        : await this.store.begin({
            credential: conn.identity.credential,
            disk: hello.disk,
            kind: hello.kind,
            sizeBytes: hello.sizeBytes,
            cycle: hello.cycle,
            overImage: start.overImage,
          });
    // Undo data stays until the source says the checkpoint is published (AFTER_PUBLISH) or the node
    // settles it (settleCommit): a set whose source dies mid-commit can still be rolled back.
    // A committed session is resumed only to answer a retried COMMIT or AFTER_PUBLISH: its image
    // is not opened for writing at all.
    if (record.state === 'open')
      await target.open(record.sizeBytes, record.kind, start.kind === 'resume', record.id);
    const digests = await this.store.openDigests(hello.disk);
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
      record.sizeBytes,
      record.kind,
      target,
      controller,
      this.initialWindow,
      record,
      digests,
    );
  }

  /** Called by the reader before a chunk's data is buffered: the credit check. */
  private admitChunk(conn: Conn, meta: ChunkMeta): void {
    const s = conn.session;
    if (s === undefined) throw new ProtocolError('CHUNK frame before the session was welcomed');
    if (s.committed) throw new ProtocolError(`CHUNK seq ${meta.seq} after COMMIT`);
    // Seqs are dense from 0 and each chunk has a block of its own: this also bounds the digest record.
    const seqs = maxSeqsFor(s.sizeBytes);
    if (meta.seq >= seqs) {
      throw new ProtocolError(
        `CHUNK seq ${meta.seq} is past the ${seqs} chunks a ${s.sizeBytes}-byte disk can have`,
      );
    }
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
    conn.grantAt = s.consume(meta.bytes, this.clock.now());
    conn.admitted += meta.bytes;
    s.dataAdmitted += meta.bytes;
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
      // What COMMIT and a resume check are held to: recorded before the chunk is acknowledged.
      .then(() =>
        s.digests.record(chunk.seq, {
          sha256: chunk.sha256,
          layoutSha256: chunkLayoutSha256(chunk.extents),
          offset: chunk.offset,
          bytes: chunk.bytes,
        }),
      )
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
    const now = this.clock.now();
    // The node has answered: the source's next move starts the idle clock again.
    s.idleSince = performance.now();
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

  /**
   * Holds EXTENTS for the COMMIT that follows: at most as many as the disk can have (one per two
   * blocks) and maxCommitExtents per session, and COMMIT_EXTENTS_SESSIONS times that node-wide.
   */
  private onExtents(conn: Conn, s: Session, extents: readonly Extent[]): void {
    if (extents.length === 0) throw new ProtocolError('EXTENTS frame with no extents');
    const most = maxExtentsFor(s.sizeBytes, this.limits);
    if (s.extentsHeld + extents.length > most) {
      this.refuseLimit(
        conn,
        'maxCommitExtents',
        `disk ${s.disk}: more than ${most} extents before COMMIT (a ${formatBytes(s.sizeBytes)} disk has at most ${maxExtentsFor(s.sizeBytes, { ...this.limits, maxCommitExtents: Number.MAX_SAFE_INTEGER })})`,
        false,
      );
      return;
    }
    if (this.extentsHeld + extents.length > COMMIT_EXTENTS_SESSIONS * this.limits.maxCommitExtents) {
      this.refuseLimit(
        conn,
        'maxCommitExtents',
        `the node holds ${this.extentsHeld} extents for commits, ${COMMIT_EXTENTS_SESSIONS} sessions' worth`,
        true,
      );
      return;
    }
    const previous = conn.commitExtents.last();
    let end = previous ? previous.offset + previous.length : 0;
    for (const e of extents) {
      if (e.offset < end)
        throw new ProtocolError(`commit extent at offset ${e.offset} overlaps or precedes the previous one`);
      end = e.offset + e.length;
      if (end > s.sizeBytes)
        throw new ProtocolError(`commit extent at offset ${e.offset} ends past the ${s.sizeBytes}-byte disk`);
      conn.commitExtents.push(e);
    }
    s.extentsHeld += extents.length;
    this.extentsHeld += extents.length;
  }

  private onCommit(conn: Conn, s: Session, commit: FrameOf<'commit'>): void {
    const extents = conn.commitExtents.toArray();
    const bytes = conn.commitExtents.bytes;
    this.dropExtents(conn);
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
      const claim = { chunks: commit.chunks, bytes: commit.bytes, aggregateSha256: commit.aggregateSha256 };
      const done = s.record.commit;
      if (done !== undefined) {
        // A retried COMMIT (its answer was lost): the same claim gets the same answer, nothing is redone.
        if (
          done.chunks !== claim.chunks ||
          done.bytes !== claim.bytes ||
          done.aggregateSha256 !== claim.aggregateSha256
        ) {
          throw new CommitRefused(
            `this session is already committed, with aggregate ${done.aggregateSha256}`,
          );
        }
        conn.send({ type: 'committed', targetRef: done.targetRef });
        return;
      }
      // The node commits only its own finding: what it verified, chunk by chunk, in its record.
      const problem = await commitProblem(s.digests, claim, extents);
      if (problem !== undefined) throw new CommitRefused(`refused: ${problem}; the image is unchanged`);
      const targetRef = (await s.target.commit({ ...claim, extents })) ?? '';
      s.record = await this.store.commit(s.disk, claim, targetRef);
      await this.recordCommit(s, commit, targetRef);
      this.log(
        `node: ${conn.where}: committed ${commit.chunks} chunks, ${formatBytes(commit.bytes)} (${targetRef})`,
      );
      conn.send({ type: 'committed', targetRef });
    });
  }

  /** Runs a commit-phase operation; a failure is reported with ERROR (retryable as classified) and closes the connection. */
  private async control(conn: Conn, s: Session, what: string, op: () => Promise<void>): Promise<void> {
    s.controlOps++;
    try {
      await s.serially(op);
    } catch (err) {
      this.log(`node: ${conn.where}: ${what} failed: ${errorMessage(err)}`);
      const code = classifyWriteError(err);
      this.refuse(conn, `${what} of disk ${s.disk} failed: ${errorMessage(err)}`, code !== 'write-failed');
    } finally {
      s.controlOps--;
      s.idleSince = performance.now();
    }
  }

  /** The last commit of each disk, so an operator on this host can verify an image without the source. */
  private async recordCommit(s: Session, commit: FrameOf<'commit'>, targetRef: string): Promise<void> {
    const dir = this.opts.stateDir;
    if (dir === undefined) return;
    const path = join(dir, 'commits', `${s.disk}.json`);
    const record = {
      disk: s.disk,
      image: s.target.name,
      kind: s.kind,
      sizeBytes: s.sizeBytes,
      chunks: commit.chunks,
      bytes: commit.bytes,
      // Named as a checkpoint names it: what the node checked the COMMIT against is this aggregate.
      aggregate: chunkAggregate(commit.aggregateSha256),
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

  /** Grant times, chunk latencies and window evaluations are measured on it. */
  private get clock(): Clock {
    return this.opts.clock ?? NODE_CLOCK;
  }

  /**
   * Grants credit in whole units by the engine's grant rule (credit.ts `allocateCredit`, grant-rule.ts
   * `pickNext`): among sessions with window room, the one holding the fewest bytes goes next (max-min
   * fairness); if its unit does not fit the budget, nothing is granted until completions free enough,
   * so a busy disk cannot keep taking budget a starved one is waiting for.
   */
  private allocate(): void {
    const sessions = [...this.sessions.values()];
    const plan = allocateCredit(sessions, this.budget);
    const now = this.clock.now();
    for (const { session, bytes } of plan.grants) {
      const s = sessions[session]!;
      s.budgetLimited = false;
      s.grant(bytes, now);
      s.lastGrantTick = this.grantTick++;
    }
    if (plan.budgetHeld !== undefined) sessions[plan.budgetHeld]!.budgetLimited = true;
    // Held bytes grow only by grants, so the peak is where the last grant left them.
    if (plan.grants.length > 0) this.counters.peakHeld = Math.max(this.counters.peakHeld, this.totalHeld());
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
    this.sweep(performance.now());
    const now = this.clock.now();
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

  /**
   * The handshake and idle timeouts, which count complete frames, never bytes: a connection without
   * a complete HELLO within handshakeTimeoutMs, a frame arriving for longer than idleTimeoutMs, and a
   * session that moved on for idleTimeoutMs while the node owed it nothing are closed with an ERROR
   * naming the limit. A closed session's lock and credit are free at once.
   */
  private sweep(now: number): void {
    const { handshakeTimeoutMs, idleTimeoutMs } = this.limits;
    for (const c of [...this.conns]) {
      if (c.closing) continue;
      if (c.session === undefined) {
        if (!c.handshaking && now - c.acceptedAt > handshakeTimeoutMs) {
          this.refuseLimit(c, 'handshakeTimeoutMs', 'no complete HELLO since the connection opened', true);
        }
      } else if (c.reader.buffered > 0 && now - c.frameSince > idleTimeoutMs) {
        this.refuseLimit(c, 'idleTimeoutMs', 'a frame has been arriving for longer than this', true);
      }
    }
    for (const s of [...this.sessions.values()]) {
      if (s.tearingDown || s.conns.size === 0) continue;
      if (s.owed) {
        s.idleSince = now;
        continue;
      }
      if (now - s.idleSince <= idleTimeoutMs) continue;
      for (const c of [...s.conns]) {
        this.refuseLimit(
          c,
          'idleTimeoutMs',
          `disk ${s.disk} made no progress; its lock and credit are released`,
          true,
        );
      }
    }
  }

  private faultSample(s: Session) {
    return {
      at: this.clock.now(),
      bytes: 0,
      latencyMs: 0,
      throttled: false,
      error: true,
      windowLimited: false,
      nodePressure: s.budgetLimited,
    };
  }
}

/** A buffer (a manifest) as IMAGE_DATA-sized pieces at their offsets. */
async function* pieces(buf: Buffer): AsyncGenerator<{ offset: number; data: Uint8Array }> {
  for (let offset = 0; offset < buf.length; offset += MAX_IMAGE_DATA_BYTES) {
    yield { offset, data: buf.subarray(offset, offset + MAX_IMAGE_DATA_BYTES) };
  }
}

/** A VERIFIED answer for an image that could not be re-hashed. */
function verifiedFailure(reason: string): FrameOf<'verified'> {
  return { type: 'verified', ok: false, regions: 0, mismatches: [], manifestRef: '', reason };
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
