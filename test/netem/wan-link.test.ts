// Accuracy and behaviour of the WAN link emulator: rate, delay, sharing, integrity, close, backpressure.
import { createHash, randomBytes } from 'node:crypto';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterEach, describe, expect, it, vi } from 'vitest';
import {
  MAX_READ_CHUNK_BYTES,
  startWanLink,
  type WanLink,
  WanLinkConfigError,
  type WanLinkOptions,
} from '../../shared/netem/wan-link.ts';

const cleanups: (() => Promise<void>)[] = [];

/**
 * How late a timer may fire here: the suite runs two files at once on a shared 2-core machine, and a
 * busy event loop delays a timer by several milliseconds. Lower bounds on delay are exact (the link
 * never delivers early); upper bounds add this slack, so they catch a gross error (a Nagle-sized
 * 40 ms stall, a delay applied twice) and not the machine's load.
 */
const TIMER_SLACK_MS = 10;

afterEach(async () => {
  for (let c = cleanups.pop(); c; c = cleanups.pop()) await c();
});

/** A loopback server whose sockets are destroyed at cleanup; the handler sees every connection. */
async function serve(handler: (s: net.Socket) => void, allowHalfOpen = false): Promise<number> {
  const sockets = new Set<net.Socket>();
  const server = net.createServer({ allowHalfOpen }, (s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
    s.on('error', () => {});
    handler(s);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  cleanups.push(async () => {
    for (const s of sockets) s.destroy();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  });
  return (server.address() as net.AddressInfo).port;
}

async function link(port: number, opts: Omit<WanLinkOptions, 'target'>): Promise<WanLink> {
  const l = await startWanLink({ target: { host: '127.0.0.1', port }, ...opts });
  cleanups.push(() => l.close());
  return l;
}

async function connect(l: WanLink, allowHalfOpen = false): Promise<net.Socket> {
  const s = net.connect({ host: l.host, port: l.port, allowHalfOpen });
  s.on('error', () => {});
  cleanups.push(async () => {
    s.destroy();
  });
  await new Promise<void>((resolve, reject) => {
    s.once('connect', resolve);
    s.once('error', reject);
  });
  return s;
}

const closed = (s: net.Socket) =>
  s.closed ? Promise.resolve() : new Promise<void>((resolve) => s.once('close', () => resolve()));

interface Arrival {
  bytes: number;
  firstAt: number;
  firstBytes: number;
  lastAt: number;
}

/** Times a stream's arrivals; the rate is measured after the first chunk so the delay is excluded. */
function timeArrivals(s: net.Socket): Promise<Arrival> {
  const a: Arrival = { bytes: 0, firstAt: 0, firstBytes: 0, lastAt: 0 };
  s.on('data', (chunk: Buffer) => {
    const now = performance.now();
    if (a.bytes === 0) {
      a.firstAt = now;
      a.firstBytes = chunk.length;
    }
    a.bytes += chunk.length;
    a.lastAt = now;
  });
  return new Promise((resolve) => s.once('end', () => resolve(a)));
}

const bitsPerSec = (a: Arrival) => ((a.bytes - a.firstBytes) * 8) / ((a.lastAt - a.firstAt) / 1000);

const median = (xs: number[]) => {
  const sorted = [...xs].sort((x, y) => x - y);
  return sorted[Math.floor(sorted.length / 2)] ?? Number.NaN;
};

/** Reads a socket in exact amounts (an async iterator would destroy the socket when left early). */
function reader(s: net.Socket): (n: number) => Promise<Buffer> {
  let chunks: Buffer[] = [];
  let have = 0;
  let waiter: { n: number; resolve: (b: Buffer) => void } | null = null;
  const settle = () => {
    if (!waiter || have < waiter.n) return;
    const { n, resolve } = waiter;
    waiter = null;
    const all = Buffer.concat(chunks, have);
    chunks = [all.subarray(n)];
    have -= n;
    resolve(all.subarray(0, n));
  };
  s.on('data', (chunk: Buffer) => {
    chunks.push(chunk);
    have += chunk.length;
    settle();
  });
  return (n) =>
    new Promise((resolve) => {
      waiter = { n, resolve };
      settle();
    });
}

/** Tracks the timers made through the global setTimeout until restored: the live ones are in the set. */
function trackTimers(): { live: Set<unknown>; restore: () => void } {
  const live = new Set<unknown>();
  const realSet = globalThis.setTimeout;
  const realClear = globalThis.clearTimeout;
  const set = vi.spyOn(globalThis, 'setTimeout').mockImplementation(((
    fn: (...args: unknown[]) => void,
    ms?: number,
    ...args: unknown[]
  ) => {
    const t = realSet(() => {
      live.delete(t);
      fn(...args);
    }, ms);
    live.add(t);
    return t;
  }) as never);
  const clear = vi.spyOn(globalThis, 'clearTimeout').mockImplementation((t) => {
    live.delete(t);
    realClear(t);
  });
  return {
    live,
    restore: () => {
      set.mockRestore();
      clear.mockRestore();
    },
  };
}

/** Counts of this process's live TCP sockets and servers. */
const handles = () => {
  const counts: Record<string, number> = { TCPSocketWrap: 0, TCPServerWrap: 0 };
  for (const kind of process.getActiveResourcesInfo())
    if (kind in counts) counts[kind] = (counts[kind] ?? 0) + 1;
  return counts;
};

const sha256 = (b: Buffer) => createHash('sha256').update(b).digest('hex');

describe('WAN link emulator', () => {
  it('carries a bulk transfer at the link rate', async () => {
    // Prepare
    const rate = 50e6;
    let arrival!: Promise<Arrival>;
    const port = await serve((s) => {
      arrival = timeArrivals(s);
    });
    const l = await link(port, { rttMs: 40, rateBitsPerSec: rate });
    const client = await connect(l);
    // Act
    client.end(Buffer.alloc(4 * 1024 * 1024, 0xa5));
    await closed(client);
    const a = await arrival;
    // Assess
    const achieved = bitsPerSec(a) / rate;
    expect(a.bytes).toBe(4 * 1024 * 1024);
    expect(achieved, `achieved ${(achieved * 100).toFixed(1)}% of the rate`).toBeGreaterThanOrEqual(0.95);
    expect(achieved, `achieved ${(achieved * 100).toFixed(1)}% of the rate`).toBeLessThanOrEqual(1.05);
  });

  it('adds the round-trip time to a ping-pong', async () => {
    // Prepare
    const rtt = 40;
    const port = await serve((s) => s.pipe(s));
    const l = await link(port, { rttMs: rtt, rateBitsPerSec: 50e6 });
    const client = await connect(l);
    const message = Buffer.alloc(64, 1);
    const read = reader(client);
    client.write(message); // the first round trip also waits for the modelled handshake
    await read(message.length);
    // Act
    const samples: number[] = [];
    for (let i = 0; i < 15; i++) {
      const t0 = performance.now();
      client.write(message);
      await read(message.length);
      samples.push(performance.now() - t0);
    }
    // Assess: never below the rtt (the link delivers nothing early); above it by timer lateness only.
    const m = median(samples);
    expect(m, `median rtt ${m.toFixed(2)} ms`).toBeGreaterThanOrEqual(rtt * 0.95);
    expect(m, `median rtt ${m.toFixed(2)} ms`).toBeLessThanOrEqual(rtt * 1.05 + TIMER_SLACK_MS);
  });

  it('shares the rate between connections', async () => {
    // Prepare
    const rate = 40e6;
    const size = 2 * 1024 * 1024;
    const arrivals: Promise<Arrival>[] = [];
    const received: number[] = [];
    let othersShareAtFirstEnd: number | undefined;
    const port = await serve((s) => {
      const i = received.push(0) - 1;
      s.on('data', (chunk: Buffer) => {
        received[i] = (received[i] ?? 0) + chunk.length;
      });
      s.once('end', () => {
        othersShareAtFirstEnd ??= Math.min(...received) / size;
      });
      arrivals.push(timeArrivals(s));
    });
    const l = await link(port, { rttMs: 20, rateBitsPerSec: rate });
    const clients = await Promise.all([connect(l), connect(l)]);
    // Act
    for (const c of clients) c.end(Buffer.alloc(size, 0x5a));
    await Promise.all(clients.map(closed));
    const [a, b] = await Promise.all(arrivals);
    // Assess
    if (!a || !b) throw new Error('expected two connections at the target');
    const firstAt = Math.min(a.firstAt, b.firstAt);
    const lastAt = Math.max(a.lastAt, b.lastAt);
    const sum = ((2 * size - a.firstBytes - b.firstBytes) * 8) / ((lastAt - firstAt) / 1000) / rate;
    expect(sum, `both together got ${(sum * 100).toFixed(1)}% of the rate`).toBeLessThanOrEqual(1.05);
    expect(sum, `both together got ${(sum * 100).toFixed(1)}% of the rate`).toBeGreaterThanOrEqual(0.85);
    // Fair-ish: sharing the link evenly, the second finishes soon after the first; a link that
    // served the connections one after the other would leave the second with nothing at that point.
    expect(
      othersShareAtFirstEnd,
      'part of the other connection received when the first ended',
    ).toBeGreaterThanOrEqual(0.7);
  });

  it('varies the delay within the jitter bound', async () => {
    // Prepare
    const rtt = 40;
    const jitterMs = 10;
    const port = await serve((s) => s.pipe(s));
    const l = await link(port, { rttMs: rtt, rateBitsPerSec: 50e6, jitterMs, seed: 3 });
    const client = await connect(l);
    const read = reader(client);
    client.write('?'); // the first round trip also waits for the modelled handshake
    await read(1);
    // Act
    const samples: number[] = [];
    for (let i = 0; i < 15; i++) {
      const t0 = performance.now();
      client.write('?');
      await read(1);
      samples.push(performance.now() - t0);
    }
    // Assess: each way adds ±jitterMs, so a round trip stays within ±2 jitterMs (+ timer slack).
    const [lo, hi] = [Math.min(...samples), Math.max(...samples)];
    expect(lo).toBeGreaterThanOrEqual(rtt - 2 * jitterMs);
    expect(hi).toBeLessThanOrEqual(rtt + 2 * jitterMs + TIMER_SLACK_MS);
    expect(hi - lo, 'spread of the round trips').toBeGreaterThanOrEqual(jitterMs / 2);
  });

  it('delivers bytes intact and in order in both directions, with jitter', async () => {
    // Prepare
    const upload = randomBytes(2 * 1024 * 1024);
    const serverSaw = createHash('sha256');
    const port = await serve((s) => {
      s.on('data', (chunk: Buffer) => serverSaw.update(chunk));
      s.pipe(s);
    });
    const l = await link(port, { rttMs: 20, rateBitsPerSec: 100e6, jitterMs: 8, seed: 7 });
    const client = await connect(l);
    const echoed = reader(client)(upload.length);
    // Act: writes of random sizes, so segments and read chunks fall at arbitrary offsets.
    for (let off = 0; off < upload.length; ) {
      const n = 1 + Math.floor(Math.random() * 100_000);
      client.write(upload.subarray(off, off + n));
      off += n;
    }
    const back = await echoed;
    // Assess
    expect(serverSaw.digest('hex')).toBe(sha256(upload));
    expect(back.length).toBe(upload.length);
    expect(sha256(back)).toBe(sha256(upload));
  });

  it('moves nothing during stalls', async () => {
    // Prepare: the link is down half of every 100 ms, so it carries about half the rate.
    const rate = 20e6;
    let arrival!: Promise<Arrival>;
    const port = await serve((s) => {
      arrival = timeArrivals(s);
    });
    const l = await link(port, { rttMs: 10, rateBitsPerSec: rate, stall: { everyMs: 100, forMs: 50 } });
    const client = await connect(l);
    // Act
    client.end(Buffer.alloc(1024 * 1024, 3));
    await closed(client);
    const a = await arrival;
    // Assess
    const achieved = bitsPerSec(a) / rate;
    expect(achieved, `achieved ${(achieved * 100).toFixed(1)}% of the rate`).toBeGreaterThanOrEqual(0.4);
    expect(achieved, `achieved ${(achieved * 100).toFixed(1)}% of the rate`).toBeLessThanOrEqual(0.6);
  });

  it('applies setRtt and setRate to bytes not yet on the link', async () => {
    // Prepare
    const port = await serve((s) => s.pipe(s));
    const l = await link(port, { rttMs: 10, rateBitsPerSec: 10e6 });
    const client = await connect(l);
    const read = reader(client);
    const pingMs = async () => {
      const t0 = performance.now();
      client.write('?');
      await read(1);
      return performance.now() - t0;
    };
    await pingMs();
    // Act
    l.setRtt(60);
    const slow = median([await pingMs(), await pingMs(), await pingMs()]);
    l.setRate(80e6);
    const t0 = performance.now();
    client.write(Buffer.alloc(2 * 1024 * 1024));
    await read(2 * 1024 * 1024);
    const elapsedS = (performance.now() - t0) / 1000;
    // Assess: 2 MiB at 80 Mbit/s each way (the directions overlap) plus the rtt; loose, as the echo
    // path adds its own delays, but far above the 10 Mbit/s the link had before.
    expect(slow).toBeGreaterThanOrEqual(60);
    expect(slow).toBeLessThanOrEqual(60 * 1.05 + TIMER_SLACK_MS);
    const rate = (2 * 1024 * 1024 * 8) / (elapsedS - 0.06);
    expect(rate / 80e6, `echoed at ${(rate / 1e6).toFixed(1)} Mbit/s`).toBeGreaterThanOrEqual(0.6);
    expect(rate / 80e6, `echoed at ${(rate / 1e6).toFixed(1)} Mbit/s`).toBeLessThanOrEqual(1.05);
  });

  it('models the handshake: the first bytes reach the target 1.5 rtt after connect', async () => {
    // Prepare
    const rtt = 40;
    const arrivals: number[] = [];
    const port = await serve((s) => s.once('data', () => arrivals.push(performance.now())));
    const withHandshake = await link(port, { rttMs: rtt, rateBitsPerSec: 10e6 });
    const without = await link(port, { rttMs: rtt, rateBitsPerSec: 10e6, handshake: false });
    // Act
    const sentAt: number[] = [];
    for (const l of [withHandshake, without]) {
      const client = await connect(l);
      sentAt.push(performance.now());
      client.write('hello');
      await expect.poll(() => arrivals.length).toBe(sentAt.length);
    }
    // Assess
    const [a0, a1] = arrivals;
    const [s0, s1] = sentAt;
    if (a0 === undefined || a1 === undefined || s0 === undefined || s1 === undefined)
      throw new Error('no arrival');
    expect(a0 - s0).toBeGreaterThanOrEqual(1.5 * rtt - 1);
    expect(a1 - s1).toBeGreaterThanOrEqual(rtt / 2 - 1);
    expect(a1 - s1).toBeLessThan(1.5 * rtt - 1);
  });

  it('forwards to a unix socket', async () => {
    // Prepare
    const path = join(tmpdir(), `wan-link-${process.pid}-${Date.now()}.sock`);
    const server = net.createServer((s) => s.end('from unix'));
    await new Promise<void>((resolve) => server.listen(path, resolve));
    cleanups.push(() => new Promise<void>((resolve) => server.close(() => resolve())));
    const l = await startWanLink({ target: { path }, rttMs: 10, rateBitsPerSec: 10e6 });
    cleanups.push(() => l.close());
    const client = await connect(l);
    let got = '';
    client.on('data', (d: Buffer) => {
      got += d.toString();
    });
    // Act
    await closed(client);
    // Assess
    expect(got).toBe('from unix');
  });

  it('rejects unknown and invalid options', async () => {
    const target = { host: '127.0.0.1', port: 1 };
    await expect(startWanLink({ target, rttMs: 10, rateBitsPerSec: 0 })).rejects.toThrow(WanLinkConfigError);
    await expect(startWanLink({ target, rttMs: -1, rateBitsPerSec: 1e6 })).rejects.toThrow(
      WanLinkConfigError,
    );
    await expect(
      startWanLink({ target, rttMs: 10, rateBitsPerSec: 1e6, stall: { everyMs: 10, forMs: 10 } }),
    ).rejects.toThrow(WanLinkConfigError);
    const typo = { target, rttMs: 10, rateBitsPerSec: 1e6, rateBps: 5 } as WanLinkOptions;
    await expect(startWanLink(typo)).rejects.toThrow(/unknown option 'rateBps'/);
  });

  describe('close', () => {
    it('propagates half-close in both directions, one way-delay later', async () => {
      // Prepare
      const rtt = 30;
      let serverGotEndAt = 0;
      let serverGot = '';
      const port = await serve((s) => {
        s.setEncoding('utf8');
        s.on('data', (d: string) => {
          serverGot += d;
        });
        s.on('end', () => {
          serverGotEndAt = performance.now();
          s.end('pong'); // the server's side was still open after the client's FIN
        });
      }, true);
      const l = await link(port, { rttMs: rtt, rateBitsPerSec: 10e6 });
      const client = await connect(l, true);
      let clientGot = '';
      client.setEncoding('utf8');
      client.on('data', (d: string) => {
        clientGot += d;
      });
      const clientEnded = new Promise<number>((resolve) =>
        client.once('end', () => resolve(performance.now())),
      );
      // Act
      client.end('ping');
      const endedAt = performance.now();
      const clientGotEndAt = await clientEnded;
      await closed(client);
      // Assess
      expect(serverGot).toBe('ping');
      expect(clientGot).toBe('pong');
      expect(serverGotEndAt - endedAt).toBeGreaterThanOrEqual(rtt / 2 - 1);
      expect(clientGotEndAt - endedAt).toBeGreaterThanOrEqual(rtt - 1);
      await expect.poll(() => l.stats().activeConnections).toBe(0);
    });

    it("delivers a peer's last bytes before its reset, and resets the other side", async () => {
      // Prepare
      const port = await serve((s) => {
        s.write('bye');
        s.destroy();
      });
      const l = await link(port, { rttMs: 20, rateBitsPerSec: 10e6 });
      const client = await connect(l);
      let got = '';
      client.on('data', (d: Buffer) => {
        got += d.toString();
      });
      // Act
      await closed(client);
      // Assess
      expect(got).toBe('bye');
      await expect.poll(() => l.stats().activeConnections).toBe(0);
    });

    it('closes the target side when the client is destroyed', async () => {
      // Prepare
      const rtt = 20;
      let accepted!: (s: net.Socket) => void;
      const serverSide = new Promise<net.Socket>((resolve) => {
        accepted = resolve;
      });
      const port = await serve((s) => accepted(s));
      const l = await link(port, { rttMs: rtt, rateBitsPerSec: 10e6 });
      const client = await connect(l);
      const target = await serverSide;
      // Act
      const destroyedAt = performance.now();
      client.destroy();
      await closed(target);
      // Assess
      expect(performance.now() - destroyedAt).toBeGreaterThanOrEqual(rtt / 2 - 1);
      await expect.poll(() => l.stats().activeConnections).toBe(0);
    });

    it('resets the client when the target refuses the connection', async () => {
      // Prepare: a port with nothing listening on it.
      const port = await serve(() => {});
      await cleanups.pop()?.();
      const l = await link(port, { rttMs: 20, rateBitsPerSec: 10e6 });
      const client = await connect(l);
      // Act / Assess
      await closed(client);
      expect(l.stats().connections).toBe(1);
    });

    it('close() ends every connection and returns once they are gone', async () => {
      // Prepare
      const port = await serve((s) => s.pipe(s));
      await sleep(20); // let handles closed by earlier tests finish closing
      const before = handles();
      const timers = trackTimers();
      cleanups.push(async () => timers.restore());
      // A long rtt, so the link's timers are still pending when it closes.
      const l = await startWanLink({ target: { host: '127.0.0.1', port }, rttMs: 400, rateBitsPerSec: 1e6 });
      const clients = await Promise.all([connect(l), connect(l)]);
      // One connection mid-transfer, one idle, one mid-handshake.
      clients[0]?.write(Buffer.alloc(100_000));
      await sleep(450);
      clients.push(await connect(l));
      const during = handles();
      const timersDuring = timers.live.size;
      // Act
      await l.close();
      // Assess: no socket, server or timer of the link outlives close().
      expect(timers.live.size).toBe(0);
      expect(timersDuring).toBeGreaterThan(0);
      await Promise.all(clients.map(closed));
      expect(l.stats().activeConnections).toBe(0);
      expect(during).not.toEqual(before);
      await expect.poll(handles).toEqual(before); // the target's sockets close a moment later
    });
  });

  describe('backpressure', () => {
    it('stops reading from the sender when its buffer is full', async () => {
      // Prepare
      const rate = 8e6;
      const bufferBytes = 128 * 1024;
      const port = await serve((s) => s.resume());
      const l = await link(port, { rttMs: 20, rateBitsPerSec: rate, bufferBytes });
      const client = await connect(l);
      // Act: offer far more than the link can carry in the time we watch it.
      const started = performance.now();
      client.write(Buffer.alloc(8 * 1024 * 1024));
      await sleep(400);
      const elapsed = (performance.now() - started) / 1000;
      const s = l.stats();
      // Assess: the proxy held at most its buffer and one read, and the rest waited in the sender.
      expect(s.backpressurePausesUp).toBeGreaterThanOrEqual(1);
      expect(s.peakHeldBytesUp).toBeGreaterThanOrEqual(bufferBytes);
      expect(s.peakHeldBytesUp).toBeLessThanOrEqual(bufferBytes + MAX_READ_CHUNK_BYTES);
      expect(s.bytesUp).toBeLessThanOrEqual((rate / 8) * elapsed + bufferBytes);
      expect(client.writableLength).toBeGreaterThan(0);
    });

    it('stops reading from the sender while the receiver does not read', async () => {
      // Prepare: a target that reads nothing until told to.
      const size = 32 * 1024 * 1024;
      let target!: net.Socket;
      const port = await serve((s) => {
        target = s;
        s.pause();
      });
      const l = await link(port, { rttMs: 10, rateBitsPerSec: 400e6 });
      const client = await connect(l);
      // Act: the link could carry all of it in 0.7 s if the receiver's backpressure were ignored.
      client.end(Buffer.alloc(size, 9));
      let last = -1;
      for (let stable = 0; stable < 3; await sleep(100)) {
        const now = l.stats().bytesUp;
        stable = now === last ? stable + 1 : 0;
        last = now;
      }
      const plateau = l.stats();
      const arrival = timeArrivals(target);
      target.resume();
      const a = await arrival;
      // Assess
      expect(plateau.bytesUp).toBeLessThan(size / 2);
      expect(plateau.peakHeldBytesUp).toBeLessThanOrEqual(plateau.bufferBytes + MAX_READ_CHUNK_BYTES);
      expect(a.bytes).toBe(size);
      expect(l.stats().bytesUp).toBe(size);
    });
  });
});
