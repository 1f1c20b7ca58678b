// WAN link emulator for tests and benchmarks (a tool, not product code): delay, shared rate cap, stalls.
//
// Why user space: the test machines' kernel has no netem (see TESTING.md). The proxy terminates TCP
// on both sides, so it models what an application sees of a WAN path — propagation delay, a
// bottleneck of fixed rate shared by every connection, a bounded router buffer, jitter, outages —
// but not loss or the sender's congestion window (loopback TCP on either side never loses).
//
// Model, per direction: every byte read from a sender joins one FIFO shared by all connections (the
// bottleneck queue). The serializer takes segments off it one at a time; a segment of n bytes holds
// the link for n*8/rate seconds and is written to the receiver one-way-delay (rtt/2, ± jitter)
// after its last bit left. Time is virtual and absolute (performance.now()), so a late timer makes
// the proxy catch up instead of drifting: the achieved rate and delay do not depend on how punctual
// Node's timers are, only deliveries are late by the timer's lateness (typically < 1 ms).
import net from 'node:net';
import { performance } from 'node:perf_hooks';
import { seededRandom } from '../engine/random.ts';

export type WanTarget = { host: string; port: number } | { path: string };

export interface WanLinkOptions {
  /** Where the proxy forwards each accepted connection: a TCP address or a unix socket. */
  readonly target: WanTarget;
  /** Round-trip propagation delay; each direction adds half of it. */
  readonly rttMs: number;
  /** Bottleneck rate per direction, shared by all connections, counted on payload bytes. */
  readonly rateBitsPerSec: number;
  /**
   * Bound of the one-way delay's deviation: each segment's delay is drawn uniformly from
   * rtt/2 ± jitterMs (never below 0), then raised if needed so a connection's bytes never overtake
   * each other. Under a bulk transfer that clamp pushes the delay toward rtt/2 + jitterMs.
   */
  readonly jitterMs?: number;
  /** Outages: the link moves nothing for `forMs` at the start of every `everyMs` period after the first. */
  readonly stall?: { readonly everyMs: number; readonly forMs: number };
  /** Seed of the jitter's generator, so a failing run can be replayed. */
  readonly seed?: number;
  /**
   * Bytes one direction may hold (queued for the link plus propagating) before the proxy stops
   * reading from the senders. Default: see defaultBufferBytes.
   */
  readonly bufferBytes?: number;
  /**
   * Model TCP's handshake: the target sees the connection rtt/2 after the client connected and the
   * proxy reads the client's first bytes only rtt after it connected, as on a real path where data
   * follows the SYN/SYN-ACK round trip. Default true.
   */
  readonly handshake?: boolean;
  readonly listen?: { readonly host?: '127.0.0.1'; readonly port?: number };
}

export interface WanLinkStats {
  /** Connections accepted since start. */
  readonly connections: number;
  readonly activeConnections: number;
  /** Payload bytes delivered client → target and target → client. */
  readonly bytesUp: number;
  readonly bytesDown: number;
  /** Bytes each direction holds now (not yet written to the receiver) and the most it ever held. */
  readonly heldBytesUp: number;
  readonly heldBytesDown: number;
  readonly peakHeldBytesUp: number;
  readonly peakHeldBytesDown: number;
  /** How often a full buffer made the proxy stop reading from the senders. */
  readonly backpressurePausesUp: number;
  readonly backpressurePausesDown: number;
  /**
   * Time the link spent serializing, per direction: divided by the elapsed time it is the link's
   * utilization, which says whether the sender kept the link full.
   */
  readonly linkBusyMsUp: number;
  readonly linkBusyMsDown: number;
  readonly bufferBytes: number;
}

export interface WanLink {
  readonly host: string;
  readonly port: number;
  /** `host:port`, for clients that take an address string. */
  readonly address: string;
  stats(): WanLinkStats;
  /** Change the rate for bytes not yet on the link (a default buffer size follows it). */
  setRate(rateBitsPerSec: number): void;
  /** Change the delay for bytes not yet on the link; a connection's bytes still never reorder. */
  setRtt(rttMs: number): void;
  /** Stops listening, destroys every connection, clears every timer. */
  close(): Promise<void>;
}

/** Bytes one Node socket read can deliver at most: libuv reads into 64 KiB buffers. */
export const MAX_READ_CHUNK_BYTES = 64 * 1024;

// Node's writable high-water mark (16 KiB) is less than one tick's delivery at high rates, so
// write() returning false would pause the sender after nearly every tick; a receiver counts as
// not keeping up only once this much waits in its socket.
const RECEIVER_BACKLOG_BYTES = 256 * 1024;

// The bytes propagating in one direction are rate × rtt/2; a whole rate × rtt covers them twice
// over, and the rest is queue. The queue must keep the link busy while the proxy resumes a sender
// and its data comes back (an event-loop turn or two, and tens of ms on a loaded 2-core machine), so
// it holds at least 20 ms at the link rate, and at least one read chunk so a slow link still moves.
export function defaultBufferBytes(rateBitsPerSec: number, rttMs: number): number {
  const bdp = (rateBitsPerSec / 8) * (rttMs / 1000);
  const queueFloor = Math.max(MAX_READ_CHUNK_BYTES, (rateBitsPerSec / 8) * 0.02);
  return Math.ceil(bdp + queueFloor);
}

// A segment holds the link for about 1 ms — the timer resolution, so finer slicing would add
// events without adding fidelity — but is at least one Ethernet MSS and at most one read chunk.
function segmentBytesFor(rateBitsPerSec: number): number {
  return Math.min(MAX_READ_CHUNK_BYTES, Math.max(1460, Math.floor(rateBitsPerSec / 8 / 1000)));
}

const OPTION_KEYS = new Set([
  'target',
  'rttMs',
  'rateBitsPerSec',
  'jitterMs',
  'stall',
  'seed',
  'bufferBytes',
  'handshake',
  'listen',
]);

export class WanLinkConfigError extends Error {
  override readonly name = 'WanLinkConfigError';
}

function validate(opts: WanLinkOptions): void {
  for (const key of Object.keys(opts)) {
    if (!OPTION_KEYS.has(key)) throw new WanLinkConfigError(`unknown option '${key}'`);
  }
  checkRate(opts.rateBitsPerSec);
  checkRtt(opts.rttMs);
  const jitter = opts.jitterMs ?? 0;
  if (!Number.isFinite(jitter) || jitter < 0)
    throw new WanLinkConfigError(`jitterMs must be ≥ 0, got ${jitter}`);
  if (opts.stall) {
    const { everyMs, forMs } = opts.stall;
    if (!(everyMs > 0 && forMs >= 0 && forMs < everyMs) || !Number.isFinite(everyMs)) {
      throw new WanLinkConfigError(`stall needs 0 ≤ forMs < everyMs, got ${forMs} / ${everyMs}`);
    }
  }
  if (opts.bufferBytes !== undefined && !(opts.bufferBytes >= 1 && Number.isFinite(opts.bufferBytes))) {
    throw new WanLinkConfigError(`bufferBytes must be ≥ 1, got ${opts.bufferBytes}`);
  }
  if (opts.listen?.host !== undefined && opts.listen.host !== '127.0.0.1') {
    throw new WanLinkConfigError('the emulator listens on loopback only');
  }
}

function checkRate(rate: number): void {
  if (!(rate > 0 && Number.isFinite(rate)))
    throw new WanLinkConfigError(`rateBitsPerSec must be > 0, got ${rate}`);
}

function checkRtt(rtt: number): void {
  if (!(rtt >= 0 && Number.isFinite(rtt))) throw new WanLinkConfigError(`rttMs must be ≥ 0, got ${rtt}`);
}

/** Array-backed FIFO: shift() on a long array is O(n), and the link queue can hold thousands of segments. */
class Fifo<T> {
  private items: T[] = [];
  private head = 0;
  get length(): number {
    return this.items.length - this.head;
  }
  push(item: T): void {
    this.items.push(item);
  }
  peek(): T | undefined {
    return this.items[this.head];
  }
  shift(): T | undefined {
    const item = this.items[this.head];
    if (item === undefined) return undefined;
    this.head++;
    if (this.head > 1024 && this.head * 2 > this.items.length) {
      this.items = this.items.slice(this.head);
      this.head = 0;
    }
    return item;
  }
  clear(): void {
    this.items = [];
    this.head = 0;
  }
}

/** What travels: payload, or a FIN / RST that must arrive after the payload sent before it. */
type Kind = 'data' | 'eof' | 'rst';

interface Queued {
  readonly flow: Flow;
  readonly kind: Kind;
  readonly buf: Buffer | null;
  readonly arrivedAt: number;
}

interface Propagating {
  readonly kind: Kind;
  readonly buf: Buffer | null;
  readonly at: number;
}

/** One connection in one direction: bytes from `src` to `dst` through a Direction. */
class Flow {
  src: net.Socket | null = null;
  dst: net.Socket | null = null;
  readonly propagating = new Fifo<Propagating>();
  /** Delivery time of the flow's last segment: later segments never arrive before it. */
  lastAt = Number.NEGATIVE_INFINITY;
  /** This flow's bytes in the link (queued or propagating), for fair resumption. */
  heldBytes = 0;
  writeBlocked = false;
  /** Held back until the modelled handshake completes. */
  handshaking = false;
  srcEnded = false;
  dstEnded = false;
  /** The receiver will never exist (the client left before the target side was connected). */
  abandoned = false;

  constructor(readonly dir: Direction) {}

  /** Reads from the sender only while the link has room, the receiver keeps up and the handshake is done. */
  updateReading(): void {
    const src = this.src;
    if (!src || src.destroyed) return;
    const hold = this.dir.full || this.writeBlocked || this.handshaking;
    if (hold) {
      if (!src.isPaused()) src.pause();
    } else if (src.isPaused()) {
      src.resume();
    }
  }
}

interface LinkClock {
  readonly epoch: number;
  readonly stall: { readonly everyMs: number; readonly forMs: number } | undefined;
  readonly random: () => number;
}

/** One direction of the link: the shared bottleneck queue, its serializer and the propagation stage. */
class Direction {
  rateBitsPerSec: number;
  delayMs: number;
  bufferBytes: number;
  private segmentBytes: number;
  private readonly queue = new Fifo<Queued>();
  private linkFreeAt = 0;
  /** Flows with segments propagating: the only ones a tick has to look at. */
  private readonly delivering = new Set<Flow>();
  private senders: Flow[] = [];
  private timer: NodeJS.Timeout | null = null;
  private timerAt = Number.POSITIVE_INFINITY;
  private closed = false;
  full = false;
  heldBytes = 0;
  peakHeldBytes = 0;
  deliveredBytes = 0;
  pauses = 0;
  busyMs = 0;

  constructor(
    private readonly clock: LinkClock,
    private readonly jitterMs: number,
    rateBitsPerSec: number,
    delayMs: number,
    bufferBytes: number,
  ) {
    this.rateBitsPerSec = rateBitsPerSec;
    this.delayMs = delayMs;
    this.bufferBytes = bufferBytes;
    this.segmentBytes = segmentBytesFor(rateBitsPerSec);
  }

  setRate(rateBitsPerSec: number): void {
    this.rateBitsPerSec = rateBitsPerSec;
    this.segmentBytes = segmentBytesFor(rateBitsPerSec);
  }

  addSender(flow: Flow): void {
    this.senders.push(flow);
  }

  removeSender(flow: Flow): void {
    this.senders = this.senders.filter((f) => f !== flow);
  }

  /** Called once per chunk read from a sender. The chunk is always taken: it is already read. */
  accept(flow: Flow, chunk: Buffer): void {
    const now = performance.now();
    for (let off = 0; off < chunk.length; off += this.segmentBytes) {
      const buf = chunk.subarray(off, Math.min(chunk.length, off + this.segmentBytes));
      this.queue.push({ flow, kind: 'data', buf, arrivedAt: now });
    }
    this.heldBytes += chunk.length;
    flow.heldBytes += chunk.length;
    if (this.heldBytes > this.peakHeldBytes) this.peakHeldBytes = this.heldBytes;
    if (!this.full && this.heldBytes >= this.bufferBytes) {
      // Stop every sender, not just this one: the overshoot is then one read chunk in all.
      this.full = true;
      this.pauses++;
      for (const f of this.senders) f.updateReading();
    }
    this.tick();
  }

  /** FIN and RST take no link time but queue behind the flow's bytes, as on the wire. */
  signal(flow: Flow, kind: 'eof' | 'rst'): void {
    if (this.closed) return;
    this.queue.push({ flow, kind, buf: null, arrivedAt: performance.now() });
    this.tick();
  }

  tick(): void {
    if (this.closed) return;
    const now = performance.now();
    const nextStart = this.serialize(now);
    this.deliver(now);
    if (this.full && this.heldBytes < this.bufferBytes) {
      this.full = false;
      this.resumeSenders();
    }
    let next = nextStart;
    for (const flow of this.delivering) {
      if (!flow.dst) continue; // woken by the target side's connect instead
      const head = flow.propagating.peek();
      if (head && head.at < next) next = head.at;
    }
    this.arm(next);
  }

  close(): void {
    this.closed = true;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    this.queue.clear();
    for (const flow of this.delivering) flow.propagating.clear();
    this.delivering.clear();
    this.senders = [];
  }

  /** Moves every segment whose serialization has started by `now` onto the wire; returns when the next one starts. */
  private serialize(now: number): number {
    for (let head = this.queue.peek(); head; head = this.queue.peek()) {
      const start = this.afterStall(Math.max(this.linkFreeAt, head.arrivedAt));
      if (start > now) return start;
      this.queue.shift();
      const bytes = head.buf?.length ?? 0;
      const finish = start + (bytes * 8000) / this.rateBitsPerSec;
      this.busyMs += finish - start;
      this.linkFreeAt = finish;
      const flow = head.flow;
      const jitter = this.jitterMs > 0 ? (this.clock.random() * 2 - 1) * this.jitterMs : 0;
      let at = this.afterStall(finish + Math.max(0, this.delayMs + jitter));
      if (at < flow.lastAt) at = flow.lastAt;
      flow.lastAt = at;
      flow.propagating.push({ kind: head.kind, buf: head.buf, at });
      this.delivering.add(flow);
    }
    return Number.POSITIVE_INFINITY;
  }

  private deliver(now: number): void {
    for (const flow of this.delivering) {
      const dst = flow.dst;
      const q = flow.propagating;
      // No receiver yet: the target side is still connecting (possible only after setRtt shortened the delay).
      if (!dst && !flow.abandoned) continue;
      if (!dst || dst.destroyed) {
        for (let p = q.shift(); p; p = q.shift()) this.release(flow, p.buf?.length ?? 0);
        this.delivering.delete(flow);
        continue;
      }
      let head = q.peek();
      if (!head || head.at > now) continue;
      // Cork so the segments due in this tick reach the socket as one write.
      dst.cork();
      for (; head && head.at <= now; head = q.peek()) {
        q.shift();
        if (head.kind === 'data' && head.buf) {
          this.release(flow, head.buf.length);
          this.deliveredBytes += head.buf.length;
          dst.write(head.buf);
        } else if (head.kind === 'eof') {
          flow.dstEnded = true;
          dst.end();
        } else {
          dst.destroy();
          break;
        }
      }
      dst.uncork();
      // uncork() hands the batch to the kernel at once; what it did not take is the receiver's backlog.
      if (!flow.writeBlocked && dst.writableNeedDrain && dst.writableLength > RECEIVER_BACKLOG_BYTES) {
        // The receiver is not keeping up: stop reading this connection's sender until it drains.
        flow.writeBlocked = true;
        flow.updateReading();
        dst.once('drain', () => {
          flow.writeBlocked = false;
          flow.updateReading();
        });
      }
      if (q.length === 0) this.delivering.delete(flow);
    }
  }

  private release(flow: Flow, bytes: number): void {
    this.heldBytes -= bytes;
    flow.heldBytes -= bytes;
  }

  private resumeSenders(): void {
    // Resumed sockets read in resume order (next tick) and the first to overfill the buffer pauses
    // the rest, so the connection with the fewest bytes in the link goes first: that shares the
    // link evenly in bytes, whatever the sizes of the reads (a plain rotation locked into giving
    // one connection the short reads and 60/40 splits).
    this.senders.sort((a, b) => a.heldBytes - b.heldBytes);
    for (const f of this.senders) f.updateReading();
  }

  /** The link is down during a stall: nothing starts serializing and nothing arrives. */
  private afterStall(t: number): number {
    const stall = this.clock.stall;
    if (!stall) return t;
    const sinceEpoch = t - this.clock.epoch;
    const period = Math.floor(sinceEpoch / stall.everyMs);
    if (period < 1) return t;
    const stallEnd = this.clock.epoch + period * stall.everyMs + stall.forMs;
    return Math.max(t, stallEnd);
  }

  private arm(at: number): void {
    if (at === Number.POSITIVE_INFINITY) {
      if (this.timer) clearTimeout(this.timer);
      this.timer = null;
      this.timerAt = at;
      return;
    }
    if (this.timer && this.timerAt <= at) return;
    if (this.timer) clearTimeout(this.timer);
    this.timerAt = at;
    // Node may fire a timer up to ~1 ms early (it rounds to its loop clock): tick() then finds
    // nothing due and re-arms, so early wake-ups cost an event, never accuracy.
    this.timer = setTimeout(
      () => {
        this.timer = null;
        this.timerAt = Number.POSITIVE_INFINITY;
        this.tick();
      },
      Math.max(0, at - performance.now()),
    );
  }
}

interface Connection {
  readonly client: net.Socket;
  upstream: net.Socket | null;
  readonly up: Flow;
  readonly down: Flow;
  setupTimers: NodeJS.Timeout[];
  /** Sockets of this connection not yet closed. */
  open: number;
}

export async function startWanLink(opts: WanLinkOptions): Promise<WanLink> {
  validate(opts);
  const clock: LinkClock = {
    epoch: performance.now(),
    stall: opts.stall,
    random: seededRandom(opts.seed ?? 1),
  };
  let rate = opts.rateBitsPerSec;
  let rtt = opts.rttMs;
  const explicitBuffer = opts.bufferBytes;
  const buffer = () => explicitBuffer ?? defaultBufferBytes(rate, rtt);
  const jitterMs = opts.jitterMs ?? 0;
  const handshake = opts.handshake ?? true;
  const upDir = new Direction(clock, jitterMs, rate, rtt / 2, buffer());
  const downDir = new Direction(clock, jitterMs, rate, rtt / 2, buffer());
  const connections = new Set<Connection>();
  const liveSockets = new Set<net.Socket>();
  let accepted = 0;
  let closing = false;

  const track = (sock: net.Socket, conn: Connection) => {
    liveSockets.add(sock);
    sock.once('close', () => liveSockets.delete(sock));
    conn.open++;
  };

  // Wires one socket as the sender of `out` and the receiver of `back`.
  const wire = (sock: net.Socket, conn: Connection, out: Flow, back: Flow) => {
    out.src = sock;
    back.dst = sock;
    out.dir.addSender(out);
    sock.on('data', (chunk: Buffer) => out.dir.accept(out, chunk));
    sock.on('end', () => {
      out.srcEnded = true;
      out.dir.signal(out, 'eof');
    });
    sock.on('error', () => {}); // 'close' follows with hadError; the reset is handled there
    sock.on('close', (hadError) => {
      out.dir.removeSender(out);
      if (sock === conn.client) {
        // The handshake's timers have nothing left to do; without a target side yet, nothing will
        // ever be delivered to it.
        for (const t of conn.setupTimers) clearTimeout(t);
        if (!conn.upstream) out.abandoned = true;
      }
      // A socket that closed before both of its halves finished cleanly was reset or failed: the
      // peer learns it one way-delay later, after the bytes this side had already sent.
      const clean = !hadError && out.srcEnded && back.dstEnded;
      if (!clean && !closing) out.dir.signal(out, 'rst');
      if (--conn.open === 0) connections.delete(conn);
      // Wake the direction that delivers to this socket so it drops what is left for it.
      back.dir.tick();
    });
    out.updateReading();
  };

  const connectUpstream = (conn: Connection) => {
    if (closing || conn.client.destroyed) return;
    const target = opts.target;
    const sock =
      'path' in target
        ? net.connect({ path: target.path, allowHalfOpen: true })
        : net.connect({ host: target.host, port: target.port, allowHalfOpen: true });
    sock.setNoDelay(true);
    conn.upstream = sock;
    track(sock, conn);
    wire(sock, conn, conn.down, conn.up);
    upDir.tick(); // deliver anything that was waiting for the target side to exist
  };

  const server = net.createServer({ allowHalfOpen: true }, (client) => {
    if (closing) {
      client.destroy();
      return;
    }
    accepted++;
    client.setNoDelay(true);
    const conn: Connection = {
      client,
      upstream: null,
      up: new Flow(upDir),
      down: new Flow(downDir),
      setupTimers: [],
      open: 0,
    };
    connections.add(conn);
    track(client, conn);
    conn.up.handshaking = handshake && rtt > 0;
    wire(client, conn, conn.up, conn.down);
    if (conn.up.handshaking) {
      conn.setupTimers.push(
        setTimeout(() => connectUpstream(conn), rtt / 2),
        setTimeout(() => {
          conn.up.handshaking = false;
          conn.up.updateReading();
        }, rtt),
      );
    } else {
      connectUpstream(conn);
    }
  });

  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(opts.listen?.port ?? 0, '127.0.0.1', () => {
      server.off('error', reject);
      resolve();
    });
  });
  // After listening, a server error is a failed accept (EMFILE and the like): that client is lost,
  // the link goes on, as a real path would for the other connections.
  server.on('error', () => {});
  const port = (server.address() as net.AddressInfo).port;
  const host = '127.0.0.1';

  return {
    host,
    port,
    address: `${host}:${port}`,
    stats: () => ({
      connections: accepted,
      activeConnections: connections.size,
      bytesUp: upDir.deliveredBytes,
      bytesDown: downDir.deliveredBytes,
      heldBytesUp: upDir.heldBytes,
      heldBytesDown: downDir.heldBytes,
      peakHeldBytesUp: upDir.peakHeldBytes,
      peakHeldBytesDown: downDir.peakHeldBytes,
      backpressurePausesUp: upDir.pauses,
      backpressurePausesDown: downDir.pauses,
      linkBusyMsUp: upDir.busyMs,
      linkBusyMsDown: downDir.busyMs,
      bufferBytes: upDir.bufferBytes,
    }),
    setRate(rateBitsPerSec: number) {
      checkRate(rateBitsPerSec);
      rate = rateBitsPerSec;
      for (const dir of [upDir, downDir]) {
        dir.setRate(rate);
        dir.bufferBytes = buffer();
        dir.tick();
      }
    },
    setRtt(rttMs: number) {
      checkRtt(rttMs);
      rtt = rttMs;
      for (const dir of [upDir, downDir]) {
        dir.delayMs = rtt / 2;
        dir.bufferBytes = buffer();
        dir.tick();
      }
    },
    async close() {
      if (closing) return;
      closing = true;
      upDir.close();
      downDir.close();
      const serverClosed = new Promise<void>((resolve) => server.close(() => resolve()));
      for (const conn of connections) for (const t of conn.setupTimers) clearTimeout(t);
      const socketsClosed = [...liveSockets].map((sock) => {
        const gone = new Promise<void>((resolve) => sock.once('close', () => resolve()));
        sock.destroy();
        return gone;
      });
      await Promise.all([serverClosed, ...socketsClosed]);
      connections.clear();
    },
  };
}
