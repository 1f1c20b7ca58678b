// The NBD client against real nbdkit servers (file, pattern, sparse-random; error, delay, blocksize
// filters) and against scripted misbehaving servers, plus NBD URI parsing.
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { createServer, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { AbortedError, ConfigError, TransferError } from '../../shared/engine/errors.ts';
import type { Extent } from '../../shared/engine/extents.ts';
import { KiB, MiB } from '../../shared/engine/units.ts';
import * as nbd from '../../shared/local/nbd/protocol.ts';
import { NbdSource } from '../../shared/local/nbd/source.ts';
import { parseNbdUri } from '../../shared/local/nbd/uri.ts';
import { type Nbdkit, type NbdkitOptions, startNbdkit } from '../support/nbdkit.ts';

const IMAGE_SIZE = 8 * MiB + 12_345; // deliberately not a multiple of any block size

let dir: string;
let imagePath: string;
let image: Buffer;
const servers: Nbdkit[] = [];
const sources: NbdSource[] = [];

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'ferry-nbd-test-'));
  imagePath = join(dir, 'disk.img');
  image = randomBytes(IMAGE_SIZE);
  await writeFile(imagePath, image);
});

afterEach(async () => {
  await Promise.all(sources.splice(0).map((s) => s.close()));
  await Promise.all(servers.splice(0).map((s) => s.stop()));
});

afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

async function serve(opts: NbdkitOptions): Promise<Nbdkit> {
  const server = await startNbdkit(opts);
  servers.push(server);
  return server;
}

async function open(uri: string, opts?: Parameters<typeof NbdSource.open>[1]): Promise<NbdSource> {
  const source = await NbdSource.open(uri, opts);
  sources.push(source);
  return source;
}

/** Deterministic ranges: unaligned offsets and lengths from 1 byte to 300 KiB. */
function randomRanges(count: number, size: number, seed: number): Extent[] {
  let state = seed;
  const next = () => {
    state = (state * 1_103_515_245 + 12_345) % 2 ** 31;
    return state / 2 ** 31;
  };
  return Array.from({ length: count }, () => {
    const length = 1 + Math.floor(next() * 300 * KiB);
    const offset = Math.floor(next() * (size - length));
    return { offset, length };
  });
}

/** -1 when equal, else the first offset that differs (a readable failure for megabyte buffers). */
function firstDifference(got: Uint8Array, want: Uint8Array): number {
  if (Buffer.from(got.buffer, got.byteOffset, got.byteLength).equals(want)) return -1;
  const n = Math.min(got.length, want.length);
  for (let i = 0; i < n; i++) if (got[i] !== want[i]) return i;
  return n;
}

async function readConcurrently(source: NbdSource, ranges: Extent[]): Promise<void> {
  const results = await Promise.all(ranges.map((r) => source.read(r.offset, r.length)));
  results.forEach((got, i) => {
    const r = ranges[i]!;
    expect(
      firstDifference(got, image.subarray(r.offset, r.offset + r.length)),
      `range ${r.offset}+${r.length}`,
    ).toBe(-1);
  });
}

async function collect(source: NbdSource, opts?: { signal?: AbortSignal }): Promise<Extent[]> {
  const extents: Extent[] = [];
  for await (const e of source.allocatedExtents(opts?.signal)) extents.push(e);
  return extents;
}

describe('NbdSource against nbdkit', () => {
  it('reads many random unaligned ranges concurrently over a unix socket, byte for byte', async () => {
    const server = await serve({ plugin: 'file', args: [imagePath] });
    const source = await open(server.uri);

    expect(source.sizeBytes).toBe(IMAGE_SIZE);
    expect(source.name).toBe(`nbd+unix:///?socket=${server.socket}`);
    await readConcurrently(source, randomRanges(300, IMAGE_SIZE, 1));
    await readConcurrently(source, [
      { offset: 0, length: 1 },
      { offset: IMAGE_SIZE - 1, length: 1 },
      { offset: IMAGE_SIZE - 777, length: 777 },
      { offset: 0, length: IMAGE_SIZE },
    ]);
    expect((await source.read(5, 0)).length).toBe(0);
  });

  it('serves nbd:// over TCP on 127.0.0.1', async () => {
    const server = await serve({ plugin: 'file', args: [imagePath], socket: false });
    const source = await open(server.uri);

    expect(source.name).toMatch(/^nbd:\/\/127\.0\.0\.1:\d+\/$/);
    await readConcurrently(source, randomRanges(50, IMAGE_SIZE, 2));
  });

  it('opens several connections when the server allows multi-conn, one when it does not', async () => {
    const server = await serve({ plugin: 'file', args: [imagePath] });
    const many = await open(`${server.uri}&connections=6`);
    const single = await open(server.uri, { connections: 1 });
    const noMultiConn = await serve({
      plugin: 'file',
      args: [imagePath, 'multi-conn-mode=disable'],
      filters: ['multi-conn'],
    });
    const restricted = await open(noMultiConn.uri);

    expect(many.connectionCount).toBe(6);
    expect(single.connectionCount).toBe(1);
    expect(restricted.connectionCount).toBe(1);
    await Promise.all([
      readConcurrently(many, randomRanges(200, IMAGE_SIZE, 3)),
      readConcurrently(single, randomRanges(50, IMAGE_SIZE, 4)),
      readConcurrently(restricted, randomRanges(50, IMAGE_SIZE, 5)),
    ]);
  });

  it('splits reads larger than the server maximum block size and aligns to its minimum', async () => {
    // blocksize-error-policy=error makes the server fail, with EINVAL, any request above 64 KiB or not
    // aligned to 512 bytes: unaligned reads must be widened, large ones split. The truncate filter
    // rounds the disk down to whole 512-byte blocks, as a real disk is.
    const server = await serve({
      plugin: 'file',
      args: [
        imagePath,
        'round-down=512',
        'blocksize-minimum=512',
        'blocksize-maximum=64K',
        'blocksize-error-policy=error',
      ],
      filters: ['blocksize-policy', 'truncate'],
    });
    const source = await open(server.uri);
    const size = IMAGE_SIZE - (IMAGE_SIZE % 512);

    expect(source.sizeBytes).toBe(size);
    await readConcurrently(source, [
      { offset: 0, length: size },
      { offset: 3, length: 1 * MiB + 5 },
      { offset: size - 3, length: 3 },
      ...randomRanges(30, size, 6),
    ]);
  });

  it('splits reads larger than 32 MiB into several requests', async () => {
    // The pattern plugin serves each 8-byte word's own offset, big-endian: checkable without a file.
    const server = await serve({ plugin: 'pattern', args: ['size=80M'] });
    const source = await open(server.uri);
    const offset = 3;
    const length = 70 * MiB;

    const got = Buffer.from(await source.read(offset, length));

    const want = Buffer.alloc(length + 16);
    const base = offset - (offset % 8);
    for (let word = 0; word < want.length; word += 8) want.writeUInt32BE(base + word, word + 4);
    expect(firstDifference(got, want.subarray(offset - base, offset - base + length))).toBe(-1);
  });

  it('reads through simple replies when the server offers no structured replies', async () => {
    const server = await serve({ plugin: 'file', args: [imagePath], options: ['--no-sr'] });
    const source = await open(server.uri);

    await readConcurrently(source, randomRanges(100, IMAGE_SIZE, 7));
  });

  it('reports allocated extents of a sparse disk that cover every nonzero byte', async () => {
    const server = await serve({
      plugin: 'sparse-random',
      args: ['size=64M', 'runlength=65536', 'percent=10', 'seed=1'],
    });
    const source = await open(server.uri);
    const chunked = await open(server.uri, { extentQueryBytes: 4 * MiB + 512 });

    const extents = await collect(source);

    // Sorted, disjoint, not adjacent (adjacent runs are merged), inside the disk, a sparse fraction of it.
    let end = 0;
    for (const e of extents) {
      expect(e.length).toBeGreaterThan(0);
      expect(e.offset).toBeGreaterThan(end === 0 ? -1 : end);
      end = e.offset + e.length;
    }
    expect(end).toBeLessThanOrEqual(source.sizeBytes);
    const allocated = extents.reduce((sum, e) => sum + e.length, 0);
    expect(allocated).toBeGreaterThan(0);
    expect(allocated).toBeLessThan(source.sizeBytes / 2);
    // Querying in small pieces gives the same answer once pieces are merged.
    expect(await collect(chunked)).toEqual(extents);

    // Every byte outside the extents reads as zero, and the extents do hold data.
    const disk = Buffer.from(await source.read(0, source.sizeBytes));
    const zeros = Buffer.alloc(source.sizeBytes);
    let at = 0;
    for (const e of [...extents, { offset: source.sizeBytes, length: 0 }]) {
      expect(disk.subarray(at, e.offset).equals(zeros.subarray(at, e.offset)), `gap ${at}..${e.offset}`).toBe(
        true,
      );
      at = e.offset + e.length;
    }
    const nonzeroInside = extents.some(
      (e) => !disk.subarray(e.offset, e.offset + e.length).equals(zeros.subarray(0, e.length)),
    );
    expect(nonzeroInside).toBe(true);
  });

  it('reports the whole disk as allocated when the server has no block status', async () => {
    const server = await serve({
      plugin: 'sparse-random',
      args: ['size=16M', 'seed=2'],
      options: ['--no-sr'],
    });
    const source = await open(server.uri);

    expect(await collect(source)).toEqual([{ offset: 0, length: 16 * MiB }]);
  });

  it.each([
    ['structured replies', []],
    ['simple replies', ['--no-sr']],
  ])('turns a server EIO into a retryable TransferError naming the offset (%s)', async (_, options) => {
    const server = await serve({
      plugin: 'file',
      args: [imagePath, 'error-pread=EIO', 'error-pread-rate=100%'],
      filters: ['error'],
      options,
    });
    const source = await open(server.uri);

    const err = await source.read(4096, 512).catch((e: unknown) => e);

    expect(err).toBeInstanceOf(TransferError);
    expect((err as TransferError).retryable).toBe(true);
    expect((err as TransferError).offset).toBe(4096);
    expect((err as TransferError).message).toMatch(/EIO/);
    expect((err as TransferError).message).toMatch(/512 bytes at offset 4096/);
    expect((err as TransferError).message).toContain(source.name);
  });

  it('rejects an aborted read at once and discards its late reply', async () => {
    const server = await serve({ plugin: 'file', args: [imagePath] });
    const source = await open(server.uri, { connections: 1 });
    const controller = new AbortController();

    const aborted = source.read(MiB, 2 * MiB, controller.signal);
    controller.abort();

    await expect(aborted).rejects.toBeInstanceOf(AbortedError);
    await expect(source.read(0, 1, controller.signal)).rejects.toBeInstanceOf(AbortedError);
    // The same connection stays in step: the abandoned reply is skipped, later replies land correctly.
    await readConcurrently(source, randomRanges(20, IMAGE_SIZE, 8));
  });

  it('fails reads in flight with a retryable error when the server goes away, then reconnects', async () => {
    const socketDir = await mkdtemp(join(tmpdir(), 'ferry-nbd-sock-'));
    const socket = join(socketDir, 'restart.sock');
    try {
      const slow = await serve({
        plugin: 'file',
        args: [imagePath, 'delay-read=30'],
        filters: ['delay'],
        socket,
      });
      const source = await open(slow.uri, { connections: 2 });

      const inFlight = source.read(0, 4096).catch((e: unknown) => e);
      await slow.stop();
      const err = await inFlight;

      // nbdkit answers ESHUTDOWN while it stops; a server that just vanishes gives "connection was lost".
      expect(err).toBeInstanceOf(TransferError);
      expect((err as TransferError).retryable).toBe(true);
      expect((err as TransferError).message).toMatch(/ESHUTDOWN|connection was lost/);

      const restarted = await serve({ plugin: 'file', args: [imagePath], socket });
      expect(restarted.uri).toBe(slow.uri);
      await readConcurrently(source, randomRanges(20, IMAGE_SIZE, 9));
    } finally {
      await rm(socketDir, { recursive: true, force: true });
    }
  });

  it('names the socket when it does not exist', async () => {
    const missing = join(dir, 'no-such.sock');

    const err = await NbdSource.open(`nbd+unix:///disk?socket=${missing}`).catch((e: unknown) => e);

    expect(err).toBeInstanceOf(TransferError);
    expect((err as Error).message).toContain(missing);
    expect((err as Error).message).toMatch(/cannot connect.*ENOENT/);
  });

  it('says which export does not exist', async () => {
    const server = await serve({
      plugin: 'file',
      args: [imagePath, 'exportname=disk', 'exportname-strict=true'],
      filters: ['exportname'],
    });

    const good = await open(server.uri.replace('nbd+unix:///', 'nbd+unix:///disk'));
    const err = await NbdSource.open(server.uri.replace('nbd+unix:///', 'nbd+unix:///nope')).catch(
      (e: unknown) => e,
    );

    expect(good.sizeBytes).toBe(IMAGE_SIZE);
    expect(err).toBeInstanceOf(TransferError);
    expect((err as TransferError).retryable).toBe(false);
    expect((err as Error).message).toMatch(/export "nope" does not exist/);
  });
});

// ---- Scripted servers: a correct handshake, then whatever the test wants to send. ----

interface FakeRequest {
  readonly type: number;
  readonly cookie: bigint;
  readonly offset: number;
  readonly length: number;
}

interface FakeOptions {
  /** Replaces the whole greeting. */
  readonly greeting?: Buffer;
  readonly size?: number;
  readonly onRequest?: (request: FakeRequest, socket: Socket) => void;
}

const FAKE_SIZE = 1 * MiB;

async function fakeServer(opts: FakeOptions): Promise<{ uri: string }> {
  const path = join(dir, `fake-${Math.random().toString(36).slice(2)}.sock`);
  const sockets = new Set<Socket>();
  const server = createServer((socket) => {
    sockets.add(socket);
    socket.on('error', () => undefined);
    let buffered = Buffer.alloc(0);
    let phase: 'flags' | 'options' | 'transmission' = 'flags';
    const optionReply = (option: number, type: number, data: Buffer = Buffer.alloc(0)) => {
      const header = Buffer.alloc(20);
      header.writeBigUInt64BE(nbd.OPTION_REPLY_MAGIC, 0);
      header.writeUInt32BE(option, 8);
      header.writeUInt32BE(type, 12);
      header.writeUInt32BE(data.length, 16);
      socket.write(Buffer.concat([header, data]));
    };
    socket.on('data', (chunk: Buffer) => {
      buffered = Buffer.concat([buffered, chunk]);
      for (;;) {
        if (phase === 'flags') {
          if (buffered.length < 4) return;
          buffered = buffered.subarray(4);
          phase = 'options';
        } else if (phase === 'options') {
          if (buffered.length < 16) return;
          const length = buffered.readUInt32BE(12);
          if (buffered.length < 16 + length) return;
          const option = buffered.readUInt32BE(8);
          buffered = buffered.subarray(16 + length);
          if (option === nbd.NBD_OPT_STRUCTURED_REPLY) optionReply(option, nbd.NBD_REP_ACK);
          else if (option === nbd.NBD_OPT_SET_META_CONTEXT) {
            const context = Buffer.alloc(4 + nbd.BASE_ALLOCATION.length);
            context.writeUInt32BE(1, 0);
            context.write(nbd.BASE_ALLOCATION, 4);
            optionReply(option, nbd.NBD_REP_META_CONTEXT, context);
            optionReply(option, nbd.NBD_REP_ACK);
          } else if (option === nbd.NBD_OPT_GO) {
            const info = Buffer.alloc(12);
            info.writeUInt16BE(nbd.NBD_INFO_EXPORT, 0);
            info.writeBigUInt64BE(BigInt(opts.size ?? FAKE_SIZE), 2);
            info.writeUInt16BE(nbd.NBD_FLAG_HAS_FLAGS | nbd.NBD_FLAG_READ_ONLY, 10);
            optionReply(option, nbd.NBD_REP_INFO, info);
            optionReply(option, nbd.NBD_REP_ACK);
            phase = 'transmission';
          } else optionReply(option, nbd.NBD_REP_ERR_UNSUP);
        } else {
          if (buffered.length < nbd.REQUEST_SIZE) return;
          const request = {
            type: buffered.readUInt16BE(6),
            cookie: buffered.readBigUInt64BE(8),
            offset: Number(buffered.readBigUInt64BE(16)),
            length: buffered.readUInt32BE(24),
          };
          buffered = buffered.subarray(nbd.REQUEST_SIZE);
          if (request.type === nbd.NBD_CMD_DISC) socket.end();
          else opts.onRequest?.(request, socket);
        }
      }
    });
    if (opts.greeting !== undefined) {
      socket.write(opts.greeting);
      return;
    }
    const greeting = Buffer.alloc(nbd.GREETING_SIZE);
    greeting.writeBigUInt64BE(nbd.NBDMAGIC, 0);
    greeting.writeBigUInt64BE(nbd.IHAVEOPT, 8);
    greeting.writeUInt16BE(nbd.NBD_FLAG_FIXED_NEWSTYLE | nbd.NBD_FLAG_NO_ZEROES, 16);
    socket.write(greeting);
  });
  await new Promise<void>((resolve) => server.listen(path, resolve));
  fakes.push(async () => {
    for (const socket of sockets) socket.destroy();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  });
  return { uri: `nbd+unix:///?socket=${path}` };
}

const fakes: (() => Promise<void>)[] = [];

afterEach(async () => {
  await Promise.all(fakes.splice(0).map((stop) => stop()));
});

function chunk(
  request: FakeRequest,
  type: number,
  flags: number,
  payload: Buffer,
  length = payload.length,
): Buffer {
  const header = Buffer.alloc(nbd.STRUCTURED_REPLY_HEADER_SIZE);
  header.writeUInt32BE(nbd.STRUCTURED_REPLY_MAGIC, 0);
  header.writeUInt16BE(flags, 4);
  header.writeUInt16BE(type, 6);
  header.writeBigUInt64BE(request.cookie, 8);
  header.writeUInt32BE(length, 16);
  return Buffer.concat([header, payload]);
}

function dataChunk(
  request: FakeRequest,
  offset: number,
  length: number,
  flags = nbd.NBD_REPLY_FLAG_DONE,
): Buffer {
  const payload = Buffer.alloc(8 + length);
  payload.writeBigUInt64BE(BigInt(offset), 0);
  return chunk(request, nbd.NBD_REPLY_TYPE_OFFSET_DATA, flags, payload);
}

describe('NbdSource against misbehaving servers', () => {
  it('rejects a server that greets with the wrong magic', async () => {
    const fake = await fakeServer({ greeting: Buffer.from('HELLO, WORLD NOT NBD') });

    const err = await NbdSource.open(fake.uri).catch((e: unknown) => e);

    expect(err).toBeInstanceOf(TransferError);
    expect((err as TransferError).retryable).toBe(false);
    expect((err as Error).message).toMatch(/NBD protocol violation: bad greeting magic/);
    expect((err as Error).message).toContain(fake.uri);
  });

  const violations: [string, (r: FakeRequest) => Buffer, RegExp][] = [
    [
      'a reply for an unknown handle',
      (r) => dataChunk({ ...r, cookie: r.cookie + 1000n }, r.offset, r.length),
      /unknown handle/,
    ],
    [
      'data outside the requested range',
      (r) => dataChunk(r, r.offset + 512, r.length),
      /outside the request/,
    ],
    [
      'a reply longer than the request',
      (r) => chunk(r, nbd.NBD_REPLY_TYPE_OFFSET_DATA, 1, Buffer.alloc(0), 8 + r.length + 1),
      /longer than the \d+ bytes possible/,
    ],
    ['an unknown reply type', (r) => chunk(r, 42, 1, Buffer.alloc(0)), /unknown reply type 42/],
    ['a reply that covers too little', (r) => dataChunk(r, r.offset, r.length / 2), /reply ended after/],
    [
      'overlapping data chunks',
      (r) => Buffer.concat([dataChunk(r, r.offset, r.length, 0), dataChunk(r, r.offset, r.length)]),
      /overlaps/,
    ],
    [
      'a wrong reply magic',
      (r) => {
        const reply = dataChunk(r, r.offset, r.length);
        reply.writeUInt32BE(0xdeadbeef, 0);
        return reply;
      },
      /bad reply magic 0xdeadbeef/,
    ],
    [
      'an error chunk whose message overruns it',
      (r) => {
        const payload = Buffer.alloc(6);
        payload.writeUInt32BE(nbd.NBD_EIO, 0);
        payload.writeUInt16BE(100, 4);
        return chunk(r, nbd.NBD_REPLY_TYPE_ERROR, 1, payload);
      },
      /overruns/,
    ],
  ];

  it.each(violations)('fails the read with a protocol error on %s', async (_, reply, pattern) => {
    const fake = await fakeServer({ onRequest: (request, socket) => socket.write(reply(request)) });
    const source = await open(fake.uri);

    const err = await source.read(4096, 1024).catch((e: unknown) => e);

    expect(err).toBeInstanceOf(TransferError);
    expect((err as TransferError).retryable).toBe(false);
    expect((err as Error).message).toMatch(/NBD protocol violation/);
    expect((err as Error).message).toMatch(pattern);
    expect((err as Error).message).toContain(source.name);
  });

  it('names the offset of the read in a protocol error', async () => {
    const fake = await fakeServer({
      onRequest: (r, socket) => socket.write(dataChunk(r, r.offset + 1, r.length)),
    });
    const source = await open(fake.uri);

    const err = await source.read(8192, 100).catch((e: unknown) => e);

    expect((err as TransferError).offset).toBe(8192);
    expect((err as Error).message).toMatch(/100 bytes at offset 8192/);
  });

  it('fails every pending read with a retryable error when the server drops the connection', async () => {
    let seen = 0;
    const fake = await fakeServer({
      onRequest: (_, socket) => {
        if (++seen === 3) socket.destroy();
      },
    });
    const source = await open(fake.uri, { connections: 1 });

    const results = await Promise.allSettled([source.read(0, 10), source.read(10, 10), source.read(20, 10)]);

    for (const result of results) {
      expect(result.status).toBe('rejected');
      const err = (result as PromiseRejectedResult).reason as TransferError;
      expect(err).toBeInstanceOf(TransferError);
      expect(err.retryable).toBe(true);
    }
  });

  it('assembles a read from data and hole chunks sent out of order', async () => {
    const fake = await fakeServer({
      onRequest: (r, socket) => {
        const hole = Buffer.alloc(12);
        hole.writeBigUInt64BE(BigInt(r.offset + 100), 0);
        hole.writeUInt32BE(r.length - 200, 8);
        const tail = Buffer.alloc(8 + 100, 0xbb);
        tail.writeBigUInt64BE(BigInt(r.offset + r.length - 100), 0);
        const head = Buffer.alloc(8 + 100, 0xaa);
        head.writeBigUInt64BE(BigInt(r.offset), 0);
        // Split the bytes at awkward places so frames straddle socket chunks.
        const bytes = Buffer.concat([
          chunk(r, nbd.NBD_REPLY_TYPE_OFFSET_DATA, 0, tail),
          chunk(r, nbd.NBD_REPLY_TYPE_OFFSET_HOLE, 0, hole),
          chunk(r, nbd.NBD_REPLY_TYPE_OFFSET_DATA, 0, head),
          chunk(r, nbd.NBD_REPLY_TYPE_NONE, nbd.NBD_REPLY_FLAG_DONE, Buffer.alloc(0)),
        ]);
        for (let i = 0; i < bytes.length; i += 7) socket.write(bytes.subarray(i, i + 7));
      },
    });
    const source = await open(fake.uri);

    const got = Buffer.from(await source.read(1000, 1000));

    const want = Buffer.concat([Buffer.alloc(100, 0xaa), Buffer.alloc(800), Buffer.alloc(100, 0xbb)]);
    expect(firstDifference(got, want)).toBe(-1);
  });
});

describe('parseNbdUri', () => {
  it('parses nbd:// with and without a port, and nbd+unix:// with a socket', () => {
    expect(parseNbdUri('nbd://example.com/disk0')).toEqual({
      endpoint: { kind: 'tcp', host: 'example.com', port: 10809 },
      exportName: 'disk0',
      connections: 4,
      name: 'nbd://example.com:10809/disk0',
    });
    expect(parseNbdUri('nbd://[::1]:10900/a%20b?connections=2')).toEqual({
      endpoint: { kind: 'tcp', host: '::1', port: 10900 },
      exportName: 'a b',
      connections: 2,
      name: 'nbd://[::1]:10900/a%20b',
    });
    expect(parseNbdUri('nbd+unix:///vm-1?socket=/run/nbd+1.sock&connections=16')).toEqual({
      endpoint: { kind: 'unix', path: '/run/nbd+1.sock' },
      exportName: 'vm-1',
      connections: 16,
      name: 'nbd+unix:///vm-1?socket=/run/nbd+1.sock',
    });
    expect(parseNbdUri('nbd+unix:///?socket=/tmp/s').exportName).toBe('');
    expect(parseNbdUri('nbd://h').exportName).toBe('');
  });

  it.each([
    ['file:///disk.img', /unsupported scheme/],
    ['nbds://host/disk', /TLS/],
    ['nbd+unix:///disk', /needs \?socket=PATH/],
    ['nbd+unix://host/disk?socket=/s', /must not name a host/],
    ['nbd://host/disk?socket=/s', /unknown parameter "socket"/],
    ['nbd://host/disk?tls-psk-file=/k', /unknown parameter "tls-psk-file"/],
    ['nbd://host/disk?connections=0', /connections=0/],
    ['nbd://host/disk?connections=17', /connections=17/],
    ['nbd://host/disk?connections=two', /connections=two/],
    ['nbd://host/disk?connections=1&connections=2', /repeats/],
    ['not a uri', /not a valid URI/],
  ])('rejects %s', (uri, pattern) => {
    expect(() => parseNbdUri(uri)).toThrow(ConfigError);
    expect(() => parseNbdUri(uri)).toThrow(pattern);
  });

  it('never repeats a password in its message', () => {
    expect(() => parseNbdUri('nbd://admin:hunter2@host/disk')).toThrow(/nbd:\/\/\*\*\*@host\/disk/);
    expect(() => parseNbdUri('nbd://admin:hunter2@host/disk')).not.toThrow(/hunter2/);
  });
});
