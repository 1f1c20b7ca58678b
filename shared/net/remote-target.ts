// A disk target on a Ferry replication node (`ferry://host:port/disk`), streamed within the node's credit.
import { randomBytes } from 'node:crypto';
import type net from 'node:net';
import { performance } from 'node:perf_hooks';
import type { Descriptor } from '../engine/descriptors.ts';
import { AbortedError, errorMessage, FerryError, TransferError } from '../engine/errors.ts';
import { LinearAggregator } from '../engine/integrity.ts';
import type { CopyKind, DiskCommit, DiskTarget, PublishedCheckpoint, ResumeClaim } from '../engine/ports.ts';
import type { JoinCredential, SourceSecurity } from './join.ts';
import { NodeClient } from './node-client.ts';
import {
  type ChunkMeta,
  chunkLayoutSha256,
  encodeChunkHead,
  encodeFrame,
  extentBatches,
  type Frame,
  type FrameOf,
  FrameReader,
  MAX_CHUNK_BYTES,
  NO_TOKEN,
  PROTOCOL_BLOCK_SIZE,
  PROTOCOL_VERSION,
  type ResumeCheck,
  SESSION_ID_BYTES,
} from './protocol.ts';
import { NodeConnector } from './transport.ts';
import { type FerryUri, parseFerryUri } from './uri.ts';

export { DEFAULT_CONNECTIONS, type FerryUri, MAX_CONNECTIONS, parseFerryUri } from './uri.ts';

// Connect plus HELLO/WELCOME must finish within this; a node that accepts but never answers is down.
const DEFAULT_CONNECT_TIMEOUT_MS = 10_000;
// Credit left unused this long goes back to the node, so a disk that has finished (and waits for
// the other disks before its commit) does not hold budget that busy disks need. Far longer than
// the gap between two chunks of a running disk; the price of a wrong guess is one WANT round trip.
const DEFAULT_IDLE_RELEASE_MS = 500;
// Reconnect backoff: from 50 ms, doubling, at most 2 s: a dropped connection is back within a round
// trip or two, and a node that is down is probed every 2 s, well inside the engine's retry budget.
const RECONNECT_BASE_MS = 50;
const RECONNECT_MAX_MS = 2_000;
// Opening a disk and committing it are not retried by the engine: do it here, a few times. Six
// attempts span about 1.5 s of backoff: a node that has not yet seen a crashed source's connections
// close (disk "busy") or that is restarting gets that long.
const OPEN_ATTEMPTS = 6;
const CONTROL_ATTEMPTS = 6;
const KEEPALIVE_MS = 15_000;
// close() waits this long for the node to hang up after CLOSE before destroying the sockets.
const CLOSE_LINGER_MS = 2_000;
// Chunks waiting this long for credit from a node that grants none fail the disk: the node grants
// to every disk within a chunk's write time (max-min fairness), and keeps an idle session for its
// own idle timeout (120 s), so a longer silence is a node that is stuck or refusing in effect.
const DEFAULT_STALL_TIMEOUT_MS = 120_000;
// A node re-hashing an image for `ferry verify` reads it whole: one slower than this (bytes per
// second; a disk reads and hashes at hundreds of MiB/s) is stuck, and the verify gives up.
const VERIFY_MIN_RATE = 20 * 1024 * 1024;

export interface RemoteTargetOptions {
  readonly connections?: number;
  readonly connectTimeoutMs?: number;
  readonly idleReleaseMs?: number;
  /** How long chunks may wait for credit the node does not grant before the disk fails (ms). */
  readonly stallTimeoutMs?: number;
  /** The node's join file (join.ts readJoinFile): TLS 1.3, the node's CA pinned, this client certificate. */
  readonly join?: JoinCredential | undefined;
  /** Plain TCP instead, toward a node on this host started with --insecure. One of the two is required. */
  readonly insecure?: boolean | undefined;
}

/** A chunk handed to writeChunk, from queueing until the node answers for it. */
interface Chunk {
  readonly descriptor: Descriptor;
  readonly data: Uint8Array;
  readonly sha256: string;
  /** It had to wait for credit: the node's window, not the source, was the limit. */
  waited: boolean;
  /** A WANT was sent for it (sent again if the connection that carried it is lost). */
  wanted: boolean;
  settled: boolean;
  readonly settle: (err?: Error) => void;
}

/** What a HELLO may ask instead of opening a session. */
type Question = { readonly check: ResumeCheck } | { readonly verify: string };

/** The frames that answer a commit-phase request (FLUSH, COMMIT, AFTER_PUBLISH). */
type ControlAnswer = 'flushed' | 'committed' | 'done';

/** One TCP connection to the node. */
class Link {
  conn = 0;
  incarnation = '';
  alive = false;
  dead = false;
  /** Chunks sent and not answered, by tag. */
  readonly pending = new Map<number, Chunk>();
  /** Bytes of `pending` (the least loaded connection takes the next chunk). */
  outstanding = 0;
  /** Credit this connection consumed (chunks, releases): compared with the node's loss report. */
  consumed = 0;
  nextTag = 1;
  error: Error | undefined;
  /** Commit-phase requests waiting for their answers, in the order sent (the node answers in order). */
  readonly control: {
    expect: ControlAnswer;
    resolve: (f: Frame) => void;
    reject: (e: Error) => void;
  }[] = [];
  /** The node's answer to a check or verify HELLO on this connection. */
  answer: FrameOf<'checked'> | FrameOf<'verified'> | undefined;
  readonly closed: Promise<void>;
  reader!: FrameReader;

  constructor(readonly socket: net.Socket) {
    this.closed = new Promise((resolve) => socket.once('close', () => resolve()));
  }
}

export class RemoteTarget implements DiskTarget {
  readonly name: string;
  readonly blockSize = PROTOCOL_BLOCK_SIZE;
  private readonly uri: FerryUri;
  /** Opens connections: TLS with the join file, or plain TCP (insecure, loopback only). */
  private readonly connector: NodeConnector;
  private readonly security: SourceSecurity;
  private readonly desired: number;
  private readonly connectTimeoutMs: number;
  private readonly idleReleaseMs: number;
  private readonly stallTimeoutMs: number;
  /** The node's resume token for this disk's session (from WELCOME, or CHECKED before a resume). */
  private token = NO_TOKEN;
  /** The engine's cycle id, recorded by the node with the session. */
  private cycle = '';
  /** Runs while chunks wait for credit; fails the disk if the node grants none for stallTimeoutMs. */
  private stallTimer: NodeJS.Timeout | undefined;
  /** Identifies this source's session for the disk; every connection presents it. */
  private readonly session = randomBytes(SESSION_ID_BYTES).toString('hex');
  private sizeBytes = 0;
  private kind: CopyKind = 'full';
  private opened = false;
  private closed = false;
  /** A failure no retry can fix (refused by the node): every later call fails with it. */
  private fatal: Error | undefined;
  private incarnation: string | undefined;
  /** Credit: cumulative bytes granted by the node (as last heard) and consumed by this source. */
  private granted = 0;
  private consumed = 0;
  private nodeWindow = 0;
  private maxChunkBytes = MAX_CHUNK_BYTES;
  /** Counts WANTs and RELEASEs so the node can tell which came last. */
  private order = 0;
  private readonly links = new Set<Link>();
  private readonly connecting = new Set<Link>();
  /** Chunks waiting for credit or a connection, in arrival order. */
  private readonly queue: Chunk[] = [];
  /** Lost connections awaiting the node's report of what it admitted from them: conn -> consumed. */
  private readonly lost = new Map<number, number>();
  /** Reports of lost connections not yet known here as lost: conn -> admitted. */
  private readonly reports = new Map<number, number>();
  private readonly linkWaiters: { resolve: (link: Link) => void; reject: (err: Error) => void }[] = [];
  private maintaining = false;
  /** Backoff waits in progress (reconnect, open, commit): close() ends them at once. */
  private readonly pauses = new Set<() => void>();
  private idleTimer: NodeJS.Timeout | undefined;
  private lastActivity = 0;
  private readonly aborts = new WeakMap<AbortSignal, Set<Chunk>>();

  constructor(uri: FerryUri, opts: RemoteTargetOptions = {}) {
    this.uri = uri;
    this.name = uri.name;
    this.security = { join: opts.join, insecure: opts.insecure };
    this.connector = new NodeConnector(uri, opts);
    this.desired = opts.connections ?? uri.connections;
    this.connectTimeoutMs = opts.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS;
    this.idleReleaseMs = opts.idleReleaseMs ?? DEFAULT_IDLE_RELEASE_MS;
    this.stallTimeoutMs = opts.stallTimeoutMs ?? DEFAULT_STALL_TIMEOUT_MS;
  }

  static fromUri(uri: string, opts: RemoteTargetOptions = {}): RemoteTarget {
    return new RemoteTarget(parseFerryUri(uri), opts);
  }

  /** What the source knows of the node's flow control, for progress and tests. */
  stats(): {
    connections: number;
    granted: number;
    consumed: number;
    available: number;
    nodeWindow: number;
    queued: number;
  } {
    return {
      connections: this.links.size,
      granted: this.granted,
      consumed: this.consumed,
      available: this.granted - this.consumed,
      nodeWindow: this.nodeWindow,
      queued: this.queue.length,
    };
  }

  /**
   * Opens the disk's session on the node: a new one, or (`resume`) the one `checkResume` found,
   * presenting its token; the node refuses a resume of anything else.
   */
  async open(sizeBytes: number, kind: CopyKind, resume: boolean, cycleId = ''): Promise<void> {
    if (this.opened) return;
    if (this.closed) throw new FerryError(`${this.name}: target used after close()`);
    this.sizeBytes = sizeBytes;
    this.kind = kind;
    this.cycle = cycleId;
    if (!resume) this.token = NO_TOKEN;
    for (let attempt = 1; ; attempt++) {
      try {
        await this.connect(resume);
        break;
      } catch (err) {
        if (!isRetryable(err) || attempt >= OPEN_ATTEMPTS || this.closed) throw err;
        await this.pause(backoff(attempt));
      }
    }
    this.opened = true;
    // The other connections join the session; any that fail are retried in the background.
    await Promise.allSettled(Array.from({ length: this.desired - 1 }, () => this.connect(true)));
    void this.maintain();
  }

  writeChunk(descriptor: Descriptor, data: Uint8Array, sha256: string, signal?: AbortSignal): Promise<void> {
    if (this.fatal) return Promise.reject(this.fatal);
    if (!this.opened || this.closed) {
      return Promise.reject(new FerryError(`${this.name}: writeChunk() outside open()..close()`));
    }
    if (data.length !== descriptor.bytes || descriptor.bytes > this.maxChunkBytes) {
      return Promise.reject(
        new FerryError(
          `${this.name}: chunk ${descriptor.seq} has ${data.length} bytes of data for ${descriptor.bytes} ` +
            `(the node takes at most ${this.maxChunkBytes})`,
          { seq: descriptor.seq, offset: descriptor.offset },
        ),
      );
    }
    if (signal?.aborted) return Promise.reject(new AbortedError());
    this.lastActivity = performance.now();
    return new Promise<void>((resolve, reject) => {
      const chunk: Chunk = {
        descriptor,
        data,
        sha256,
        waited: false,
        wanted: false,
        settled: false,
        settle: (err) => {
          if (chunk.settled) return;
          chunk.settled = true;
          if (signal) this.unwatch(signal, chunk);
          if (err) reject(err);
          else resolve();
        },
      };
      if (signal) this.watch(signal, chunk);
      this.queue.push(chunk);
      this.pump();
    });
  }

  /**
   * One abort listener per signal, not per chunk: the engine passes the same signal to every chunk
   * of a run, and a window's worth of listeners on it trips Node's leak warning.
   */
  private watch(signal: AbortSignal, chunk: Chunk): void {
    let chunks = this.aborts.get(signal);
    if (chunks === undefined) {
      const watched = new Set<Chunk>();
      chunks = watched;
      this.aborts.set(signal, watched);
      signal.addEventListener(
        'abort',
        () => {
          for (const c of [...watched]) {
            const i = this.queue.indexOf(c);
            if (i >= 0) this.queue.splice(i, 1);
            // A chunk already sent stays pending: its ACK still has to be accounted for.
            c.settle(new AbortedError());
          }
        },
        { once: true },
      );
    }
    chunks.add(chunk);
  }

  private unwatch(signal: AbortSignal, chunk: Chunk): void {
    const chunks = this.aborts.get(signal);
    chunks?.delete(chunk);
    // The listener stays (it is once-only and holds nothing but this set); forget empty sets only
    // when the signal has fired, so a later chunk of the same run reuses the listener.
    if (chunks?.size === 0 && signal.aborted) this.aborts.delete(signal);
  }

  async read(): Promise<Uint8Array> {
    throw new FerryError(
      `${this.name}: a ferry:// target cannot be read from the source; run "ferry verify" on the node host`,
    );
  }

  async commit(summary: DiskCommit): Promise<string | undefined> {
    const reply = await this.control('commit', 'committed', async (link) => {
      for (const batch of extentBatches(summary.extents)) await this.write(link, encodeFrame(batch));
      await this.write(
        link,
        encodeFrame({
          type: 'commit',
          chunks: summary.chunks,
          bytes: summary.bytes,
          aggregateSha256: summary.aggregateSha256,
          extentCount: summary.extents.length,
        }),
      );
    });
    const ref = (reply as FrameOf<'committed'>).targetRef;
    return ref === '' ? undefined : ref;
  }

  /**
   * Asks the node whether it holds this cycle's session with the claimed chunks (their digests and
   * where they lie, checked against its own record); if it does, keeps the session's token for the
   * resuming `open`. Any other answer, or no answer, is a reason to start the cycle over.
   */
  async checkResume(claim: ResumeClaim): Promise<string | undefined> {
    const digests = new LinearAggregator();
    const layouts = new LinearAggregator();
    for (const { descriptor, sha256 } of claim.chunks) {
      digests.add(sha256);
      layouts.add(chunkLayoutSha256(descriptor.extents));
    }
    const check: ResumeCheck = {
      chunks: claim.chunks.length,
      aggregateSha256: digests.hex(),
      layoutSha256: layouts.hex(),
    };
    this.cycle = claim.cycleId;
    for (let attempt = 1; ; attempt++) {
      try {
        const answer = (await this.connect(false, { check })).answer;
        if (answer?.type !== 'checked') return 'the node did not answer the resume check';
        if (!answer.held) return `the node does not hold this cycle's chunks: ${answer.reason}`;
        this.token = answer.token;
        return undefined;
      } catch (err) {
        if (!isRetryable(err) || attempt >= OPEN_ATTEMPTS || this.closed) {
          return `could not ask the node whether it holds this cycle: ${errorMessage(err)}`;
        }
        await this.pause(backoff(attempt));
      }
    }
  }

  /**
   * Asks the node to re-hash the disk's image (`sizeBytes`, as the checkpoint says) against its
   * manifest and `targetRef` (the checkpoint's reference): `ferry verify` of a replica on a node.
   * Waits as long as reading the image at VERIFY_MIN_RATE takes; retried like opening a disk.
   */
  async verify(targetRef: string | undefined, sizeBytes: number): Promise<FrameOf<'verified'>> {
    const timeoutMs = this.connectTimeoutMs + Math.ceil((sizeBytes / VERIFY_MIN_RATE) * 1000);
    for (let attempt = 1; ; attempt++) {
      try {
        const answer = (await this.connect(false, { verify: targetRef ?? '' }, timeoutMs)).answer;
        if (answer?.type !== 'verified')
          throw this.transferError('the node did not answer the verify request', false);
        return answer;
      } catch (err) {
        if (!isRetryable(err) || attempt >= OPEN_ATTEMPTS || this.closed) throw err;
        await this.pause(backoff(attempt));
      }
    }
  }

  /** Returns once the node has made every chunk it acknowledged durable (FLUSH, FLUSHED). */
  async flush(): Promise<void> {
    if (!this.opened || this.closed) return;
    await this.control('flush', 'flushed', (link) => this.write(link, encodeFrame({ type: 'flush' })));
  }

  /**
   * The checkpoint is published: the node drops its staging and keeps the cycle's undo data as the
   * history of `published` (under its sequence, for point-in-time recovery from the node).
   */
  async afterPublish(published?: PublishedCheckpoint): Promise<void> {
    if (!this.opened) {
      // Never opened here: crash recovery of an earlier run's commit. The node is told which
      // checkpoint it became, so it keeps its history; if it cannot be told now, it settles the
      // commit at this source's next contact, without that history (see the node's settleCommit).
      if (published !== undefined && !this.closed) {
        await new NodeClient(this.uri, this.security).published(published, 0).catch(() => {});
      }
      return;
    }
    const frame = encodeFrame({
      type: 'after-publish',
      checkpoint: published?.id ?? '',
      sequence: published?.sequence ?? 0,
    });
    await this.control('after publish', 'done', (link) => this.write(link, frame));
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.idleTimer) clearTimeout(this.idleTimer);
    if (this.stallTimer) clearTimeout(this.stallTimer);
    for (const wake of [...this.pauses]) wake();
    const err = new FerryError(`${this.name}: target closed`);
    for (const chunk of this.queue.splice(0)) chunk.settle(err);
    for (const w of this.linkWaiters.splice(0)) w.reject(err);
    for (const link of this.connecting) link.socket.destroy();
    const links = [...this.links];
    for (const link of links) {
      if (!link.socket.destroyed) link.socket.end(encodeFrame({ type: 'close' }));
      const linger = setTimeout(() => link.socket.destroy(), CLOSE_LINGER_MS);
      linger.unref();
      void link.closed.then(() => clearTimeout(linger));
    }
    await Promise.all([...links, ...this.connecting].map((l) => l.closed));
  }

  // ---- Connections ----

  /**
   * Opens one connection and says HELLO; resolves once the node welcomed it into the session. With
   * a `question` (a resume check, or a verify request), the HELLO asks it instead: resolves with the
   * answer (`link.answer`) and the node hangs up.
   */
  private connect(resume: boolean, question?: Question, timeoutMs = this.connectTimeoutMs): Promise<Link> {
    const socket = this.connector.connect();
    socket.setNoDelay(true);
    socket.setKeepAlive(true, KEEPALIVE_MS);
    const link = new Link(socket);
    this.connecting.add(link);
    return new Promise<Link>((resolve, reject) => {
      let welcomed = false;
      const timer = setTimeout(
        () =>
          lost(
            this.transferError(
              `no ${question ? 'answer' : 'WELCOME'} from the node within ${timeoutMs} ms`,
              true,
            ),
          ),
        timeoutMs,
      );
      const lost = (err: Error) => {
        clearTimeout(timer);
        if (welcomed) {
          this.drop(link, err);
          return;
        }
        this.connecting.delete(link);
        socket.destroy();
        reject(err);
      };
      link.reader = new FrameReader({
        from: 'node',
        onFrame: (frame) => {
          if (welcomed) {
            this.onFrame(link, frame);
            return;
          }
          if (frame.type === 'error') {
            lost(this.transferError(`the node refused the connection: ${frame.reason}`, frame.retryable));
            return;
          }
          if ((frame.type === 'checked' || frame.type === 'verified') && question !== undefined) {
            clearTimeout(timer);
            this.connecting.delete(link);
            link.answer = frame;
            socket.end();
            resolve(link);
            return;
          }
          if (frame.type !== 'welcome') {
            lost(
              this.transferError(
                `the node answered HELLO with ${frame.type.toUpperCase()}, not WELCOME`,
                false,
              ),
            );
            return;
          }
          clearTimeout(timer);
          this.connecting.delete(link);
          if (this.closed) {
            socket.destroy();
            reject(new FerryError(`${this.name}: target closed`));
            return;
          }
          const refusal = this.adopt(link, frame);
          if (refusal) {
            lost(refusal);
            return;
          }
          welcomed = true;
          resolve(link);
        },
      });
      socket.on('connect', () => {
        socket.write(encodeFrame(this.hello(resume, question)));
      });
      socket.on('data', (buf: Buffer) => {
        try {
          link.reader.push(buf);
        } catch (err) {
          // A node that sends garbage is broken, not unlucky: tell it why and stop using it.
          const message = errorMessage(err);
          if (!socket.destroyed)
            socket.end(encodeFrame({ type: 'error', retryable: false, reason: message }));
          lost(this.transferError(`malformed frame from the node: ${message}`, false));
        }
      });
      socket.on('error', (err) => {
        link.error ??= this.connector.explain(err);
      });
      socket.on('close', () => {
        // A refusal the connector recognized (another node, TLS against plain TCP) is final as it is.
        if (link.error instanceof TransferError) {
          lost(link.error);
          return;
        }
        const why = link.error ? errorMessage(link.error) : 'the node closed the connection';
        lost(this.transferError(why, true, link.error));
      });
    });
  }

  private hello(resume: boolean, question: Question | undefined): FrameOf<'hello'> {
    return {
      type: 'hello',
      version: PROTOCOL_VERSION,
      disk: this.uri.disk,
      sizeBytes: this.sizeBytes,
      kind: this.kind,
      resume,
      session: this.session,
      token: resume ? this.token : NO_TOKEN,
      cycle: this.cycle,
      ...question,
    };
  }

  /** Takes a welcomed connection into the session; returns why it cannot be used, if it cannot. */
  private adopt(link: Link, welcome: FrameOf<'welcome'>): Error | undefined {
    if (welcome.blockSize !== this.blockSize) {
      return this.transferError(
        `the node writes ${welcome.blockSize}-byte blocks, this source cuts ${this.blockSize}`,
        false,
      );
    }
    this.maxChunkBytes = Math.min(MAX_CHUNK_BYTES, welcome.maxChunkBytes);
    // What every later connection (and a reconnect after the node restarted) presents to resume.
    this.token = welcome.token;
    link.conn = welcome.conn;
    link.incarnation = welcome.incarnation;
    if (welcome.incarnation !== this.incarnation) {
      // The node started the session afresh (it had lost every connection of it): the old credit,
      // and every connection still thought alive here, belong to a session that no longer exists.
      this.incarnation = welcome.incarnation;
      this.granted = welcome.granted;
      this.consumed = 0;
      this.lost.clear();
      this.reports.clear();
      for (const old of [...this.links])
        this.drop(old, this.transferError('the node restarted the session', true));
    } else {
      this.granted = Math.max(this.granted, welcome.granted);
    }
    this.nodeWindow = welcome.window;
    link.alive = true;
    this.links.add(link);
    for (const w of this.linkWaiters.splice(0)) w.resolve(link);
    this.pump();
    return undefined;
  }

  /** A connection is gone: fail what it carried (retryable), account for its credit, reconnect. */
  private drop(link: Link, err: Error): void {
    if (link.dead) return;
    link.dead = true;
    link.alive = false;
    this.links.delete(link);
    link.socket.destroy();
    for (const chunk of link.pending.values()) chunk.settle(err);
    link.pending.clear();
    link.outstanding = 0;
    for (const c of link.control.splice(0)) c.reject(err);
    if (link.incarnation === this.incarnation && link.consumed > 0) {
      const admitted = this.reports.get(link.conn);
      if (admitted !== undefined) {
        this.reports.delete(link.conn);
        this.consumed -= link.consumed - admitted;
      } else {
        this.lost.set(link.conn, link.consumed);
      }
    }
    // A WANT may have gone down with it.
    for (const chunk of this.queue) chunk.wanted = false;
    if (!isRetryable(err)) this.fatal ??= err;
    if (!this.closed) void this.maintain();
    this.pump();
  }

  /** Keeps `desired` connections open, reconnecting with bounded backoff while the target is open. */
  private async maintain(): Promise<void> {
    if (this.maintaining) return;
    this.maintaining = true;
    try {
      let failures = 0;
      while (!this.closed && !this.fatal && this.links.size < this.desired) {
        if (failures > 0) await this.pause(backoff(failures));
        if (this.closed || this.fatal) break;
        // Connections still being opened elsewhere (open()) are counted; open() calls this again after.
        const missing = this.desired - this.links.size - this.connecting.size;
        if (missing <= 0) break;
        const results = await Promise.allSettled(Array.from({ length: missing }, () => this.connect(true)));
        const failed = results.filter((r): r is PromiseRejectedResult => r.status === 'rejected');
        if (failed.length < results.length) {
          failures = 0;
          continue;
        }
        failures++;
        const err = failed[0]!.reason as Error;
        if (!isRetryable(err)) {
          this.fatal ??= err;
          break;
        }
        // Nothing to send on: let the waiting chunks fail now (retryably) so the engine's retry
        // policy, not an unbounded wait here, decides how long an outage may last.
        if (this.links.size === 0)
          this.failWaiting(this.transferError(`cannot reach the node: ${errorMessage(err)}`, true, err));
      }
    } finally {
      this.maintaining = false;
      if (this.fatal) this.failWaiting(this.fatal);
    }
  }

  private failWaiting(err: Error): void {
    for (const chunk of this.queue.splice(0)) chunk.settle(err);
    for (const w of this.linkWaiters.splice(0)) w.reject(err);
  }

  private pause(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const wake = () => {
        clearTimeout(timer);
        this.pauses.delete(wake);
        resolve();
      };
      const timer = setTimeout(wake, ms);
      this.pauses.add(wake);
    });
  }

  // ---- Frames from the node ----

  private onFrame(link: Link, frame: Frame): void {
    switch (frame.type) {
      case 'ack':
      case 'nack': {
        const chunk = link.pending.get(frame.tag);
        if (chunk === undefined)
          throw new FerryError(`${frame.type.toUpperCase()} for tag ${frame.tag}, which is not in flight`);
        link.pending.delete(frame.tag);
        link.outstanding -= chunk.descriptor.bytes;
        this.granted = Math.max(this.granted, frame.granted);
        chunk.settle(frame.type === 'ack' ? undefined : this.nackError(frame, chunk.descriptor));
        this.pump();
        return;
      }
      case 'grant':
        this.granted = Math.max(this.granted, frame.granted);
        this.nodeWindow = frame.window;
        this.pump();
        return;
      case 'conn-closed': {
        if (link.incarnation !== this.incarnation) return;
        const consumed = this.lost.get(frame.conn);
        if (consumed !== undefined) {
          this.lost.delete(frame.conn);
          this.consumed -= consumed - frame.admitted;
          this.pump();
        } else if (this.reports.size < 10_000) {
          // Reports repeat (to every connection, and to every joiner); only the first counts.
          this.reports.set(frame.conn, frame.admitted);
        }
        return;
      }
      case 'committed':
      case 'done':
      case 'flushed': {
        const control = link.control[0];
        if (control === undefined || control.expect !== frame.type) {
          throw new FerryError(`unexpected ${frame.type.toUpperCase()} frame`);
        }
        link.control.shift();
        control.resolve(frame);
        return;
      }
      case 'error':
        this.drop(link, this.transferError(`the node reported: ${frame.reason}`, frame.retryable));
        return;
      default:
        throw new FerryError(`unexpected ${frame.type.toUpperCase()} frame`);
    }
  }

  private nackError(frame: FrameOf<'nack'>, d: Descriptor): Error {
    const where = `chunk ${d.seq} at offset ${d.offset}`;
    const ctx = { seq: d.seq, offset: d.offset };
    switch (frame.code) {
      case 'checksum':
        return new TransferError(
          `${this.name}: the node received ${where} corrupted (checksum mismatch); not written`,
          {
            ...ctx,
            retryable: true,
          },
        );
      case 'throttled':
        return new TransferError(`${this.name}: the node is busy: ${frame.reason}`, {
          ...ctx,
          retryable: true,
          throttled: true,
        });
      case 'write-retryable':
      case 'write-failed':
        return new TransferError(`${this.name}: the node could not write ${where}: ${frame.reason}`, {
          ...ctx,
          retryable: frame.code === 'write-retryable',
        });
    }
  }

  // ---- Sending ----

  /** Sends queued chunks while the credit lasts, each on the least loaded connection. */
  private pump(): void {
    if (this.fatal) this.failWaiting(this.fatal);
    while (this.queue.length > 0 && this.links.size > 0) {
      const head = this.queue[0]!;
      if (this.granted - this.consumed < head.descriptor.bytes) {
        // Everything queued is held back by the node's credit: the node's window is the limit.
        for (const chunk of this.queue) chunk.waited = true;
        if (!head.wanted) {
          head.wanted = true;
          this.sendControl({ type: 'want', bytes: head.descriptor.bytes, order: ++this.order });
        }
        this.armStall();
        break;
      }
      this.queue.shift();
      this.send(this.leastLoaded(), head);
    }
    this.armIdleRelease();
  }

  private leastLoaded(): Link {
    let best: Link | undefined;
    for (const link of this.links) if (best === undefined || link.outstanding < best.outstanding) best = link;
    return best!;
  }

  private send(link: Link, chunk: Chunk): void {
    const d = chunk.descriptor;
    const tag = link.nextTag;
    link.nextTag = tag >= 0xffffffff ? 1 : tag + 1;
    const meta: ChunkMeta = {
      tag,
      seq: d.seq,
      offset: d.offset,
      bytes: d.bytes,
      waited: chunk.waited,
      sha256: chunk.sha256,
      extents: d.extents,
    };
    let head: Buffer;
    try {
      head = encodeChunkHead(meta, this.maxChunkBytes);
    } catch (err) {
      chunk.settle(
        new FerryError(`${this.name}: chunk ${d.seq} cannot be sent: ${errorMessage(err)}`, {
          seq: d.seq,
          cause: err,
        }),
      );
      return;
    }
    this.consumed += d.bytes;
    link.consumed += d.bytes;
    link.outstanding += d.bytes;
    link.pending.set(tag, chunk);
    // Credit bounds what sits in socket buffers: no more than the node granted is ever written.
    link.socket.cork();
    link.socket.write(head);
    link.socket.write(chunk.data);
    link.socket.uncork();
  }

  /** WANT and RELEASE go on any live connection; their `order` sorts them out at the node. */
  private sendControl(frame: FrameOf<'want'> | FrameOf<'release'>): Link | undefined {
    for (const link of this.links) {
      if (link.socket.destroyed) continue;
      link.socket.write(encodeFrame(frame));
      return link;
    }
    return undefined;
  }

  /**
   * Fails the disk when chunks have waited stallTimeoutMs for credit and the node granted nothing
   * meanwhile (any grant re-arms it; so does being without connections, which `maintain` handles).
   */
  private armStall(): void {
    if (this.stallTimer || this.closed) return;
    const granted = this.granted;
    this.stallTimer = setTimeout(() => {
      this.stallTimer = undefined;
      const head = this.queue[0];
      if (this.closed || head === undefined) return;
      if (
        this.granted !== granted ||
        this.links.size === 0 ||
        this.granted - this.consumed >= head.descriptor.bytes
      ) {
        this.pump();
        return;
      }
      this.fatal ??= this.transferError(
        `the node granted no credit for ${this.stallTimeoutMs / 1000} s (${this.queue.length} chunks waiting); ` +
          'it is stuck or overloaded: see its log',
        false,
      );
      this.failWaiting(this.fatal);
    }, this.stallTimeoutMs);
    this.stallTimer.unref();
  }

  private armIdleRelease(): void {
    if (this.idleTimer || this.closed || this.queue.length > 0 || this.granted <= this.consumed) return;
    const wait = Math.max(0, this.lastActivity + this.idleReleaseMs - performance.now());
    this.idleTimer = setTimeout(() => {
      this.idleTimer = undefined;
      if (this.queue.length > 0 || this.closed) return;
      if (performance.now() - this.lastActivity < this.idleReleaseMs) {
        this.armIdleRelease();
        return;
      }
      const unused = this.granted - this.consumed;
      if (unused <= 0) return;
      const link = this.sendControl({ type: 'release', bytes: unused, order: ++this.order });
      if (link === undefined) return;
      this.consumed += unused;
      link.consumed += unused;
    }, wait);
    // Giving credit back is a courtesy to other disks; it must not keep a finished process alive.
    this.idleTimer.unref();
  }

  /** Writes with backpressure: waits for the socket to drain (or fails if the connection is lost). */
  private async write(link: Link, buf: Buffer): Promise<void> {
    if (link.dead) throw link.error ?? this.transferError('the connection was lost', true);
    if (link.socket.write(buf)) return;
    await new Promise<void>((resolve, reject) => {
      const onDrain = () => {
        link.socket.off('close', onClose);
        resolve();
      };
      const onClose = () => {
        link.socket.off('drain', onDrain);
        reject(this.transferError('the connection was lost', true));
      };
      link.socket.once('drain', onDrain);
      link.socket.once('close', onClose);
    });
  }

  /** A commit-phase request: idempotent at the node, so retried on another connection if one is lost. */
  private async control(
    what: string,
    expect: ControlAnswer,
    send: (link: Link) => Promise<void>,
  ): Promise<Frame> {
    for (let attempt = 1; ; attempt++) {
      if (this.fatal) throw this.fatal;
      if (this.closed) throw new FerryError(`${this.name}: target closed`);
      try {
        const link = await this.anyLink();
        const reply = new Promise<Frame>((resolve, reject) => {
          link.control.push({ expect, resolve, reject });
        });
        reply.catch(() => {}); // observed below; a send failure must not leave it unhandled
        await send(link);
        return await reply;
      } catch (err) {
        if (!isRetryable(err) || attempt >= CONTROL_ATTEMPTS) {
          throw err instanceof FerryError
            ? err
            : this.transferError(`${what} failed: ${errorMessage(err)}`, false, err);
        }
        await this.pause(backoff(attempt));
      }
    }
  }

  private anyLink(): Promise<Link> {
    for (const link of this.links) return Promise.resolve(link);
    void this.maintain();
    return new Promise((resolve, reject) => this.linkWaiters.push({ resolve, reject }));
  }

  private transferError(message: string, retryable: boolean, cause?: unknown): TransferError {
    return new TransferError(`${this.name}: ${message}`, {
      retryable,
      ...(cause === undefined ? {} : { cause }),
    });
  }
}

function isRetryable(err: unknown): boolean {
  return err instanceof TransferError && err.retryable;
}

/** Full jitter over an exponential ceiling, like the engine's retry. */
function backoff(attempt: number): number {
  return Math.floor(Math.random() * Math.min(RECONNECT_MAX_MS, RECONNECT_BASE_MS * 2 ** attempt));
}
