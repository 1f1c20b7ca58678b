// The Ferry wire protocol: codec round trips, bad frames refused, a raw client breaking rules at a node.
import { createHash, randomBytes } from 'node:crypto';
import { mkdtemp, readFile } from 'node:fs/promises';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterEach, describe, expect, it } from 'vitest';
import type { Extent } from '../../shared/engine/extents.ts';
import { MiB } from '../../shared/engine/units.ts';
import { ImageDirectory } from '../../shared/local/image-dir.ts';
import { type ReplicationNode, startNode } from '../../shared/net/node.ts';
import {
  CHUNK_FIXED_BYTES,
  diskNameProblem,
  encodeChunkHead,
  encodeFrame,
  FRAME_HEADER_BYTES,
  FRAME_TYPES,
  type Frame,
  FrameReader,
  type FrameType,
  MAX_EXTENTS_PER_FRAME,
  MAX_IMAGE_DATA_BYTES,
  MAX_TEXT_BYTES,
  maxPayload,
  NO_TOKEN,
  PROTOCOL_VERSION,
  ProtocolError,
  SENT_BY,
} from '../../shared/net/protocol.ts';

type Side = 'source' | 'node';

const cleanups: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (let c = cleanups.pop(); c; c = cleanups.pop()) await c();
});

// ---- Arbitraries ----

const u32 = fc.integer({ min: 0, max: 0xffffffff });
const safe = fc.maxSafeNat();
const hex = (n: number) =>
  fc.uint8Array({ minLength: n, maxLength: n }).map((b) => Buffer.from(b).toString('hex'));
const text = fc.string({ unit: 'grapheme', maxLength: 60 });
const diskName = fc
  .stringMatching(/^[A-Za-z0-9_-][A-Za-z0-9._-]{0,40}$/)
  .filter((name) => diskNameProblem(name) === undefined);

/** Sorted, disjoint, non-empty extents built from gaps and lengths. */
const extentsFrom = (start: number, parts: [number, number][]): Extent[] => {
  const out: Extent[] = [];
  let at = start;
  for (const [gap, length] of parts) {
    out.push({ offset: at + gap, length });
    at += gap + length;
  }
  return out;
};

const chunkFrame = fc
  .record({
    tag: u32,
    seq: safe,
    start: fc.integer({ min: 0, max: 2 ** 48 }),
    parts: fc.array(fc.tuple(fc.integer({ min: 0, max: 100_000 }), fc.integer({ min: 1, max: 3000 })), {
      minLength: 1,
      maxLength: 12,
    }),
    waited: fc.boolean(),
    seed: fc.integer(),
  })
  .map(({ tag, seq, start, parts, waited, seed }): Frame => {
    // The first extent starts the chunk: its gap is part of `start`.
    const extents = extentsFrom(start, [[0, parts[0]![1]], ...parts.slice(1)]);
    const bytes = extents.reduce((s, e) => s + e.length, 0);
    const data = Buffer.alloc(bytes);
    for (let i = 0; i < bytes; i++) data[i] = (seed + i * 31) & 0xff;
    const sha256 = createHash('sha256').update(data).digest('hex');
    return { type: 'chunk', tag, seq, offset: extents[0]!.offset, bytes, waited, sha256, extents, data };
  });

const commitExtents = fc
  .array(fc.tuple(fc.integer({ min: 0, max: 2 ** 40 }), fc.integer({ min: 1, max: 2 ** 40 })), {
    maxLength: 50,
  })
  .map((parts) => extentsFrom(0, parts));

const framesBySource: fc.Arbitrary<Frame>[] = [
  fc.record({
    type: fc.constant('hello' as const),
    version: fc.constant(PROTOCOL_VERSION),
    disk: diskName,
    sizeBytes: safe,
    kind: fc.constantFrom('full' as const, 'incremental' as const),
    resume: fc.boolean(),
    session: hex(16),
    token: hex(16),
    cycle: fc.string({ unit: 'grapheme', maxLength: 40 }),
  }),
  // A resume check: the claim rides in the HELLO.
  fc.record({
    type: fc.constant('hello' as const),
    version: fc.constant(PROTOCOL_VERSION),
    disk: diskName,
    sizeBytes: safe,
    kind: fc.constantFrom('full' as const, 'incremental' as const),
    resume: fc.boolean(),
    session: hex(16),
    token: fc.constant(NO_TOKEN),
    cycle: fc.string({ unit: 'grapheme', maxLength: 40 }),
    check: fc.record({ chunks: safe, aggregateSha256: hex(32), layoutSha256: hex(32) }),
  }),
  // A verify request: the checkpoint's reference rides in the HELLO.
  fc.record({
    type: fc.constant('hello' as const),
    version: fc.constant(PROTOCOL_VERSION),
    disk: diskName,
    sizeBytes: safe,
    kind: fc.constantFrom('full' as const, 'incremental' as const),
    resume: fc.constant(false),
    session: hex(16),
    token: fc.constant(NO_TOKEN),
    cycle: fc.constant(''),
    verify: text,
  }),
  chunkFrame,
  fc.record({ type: fc.constant('want' as const), bytes: safe, order: u32 }),
  fc.record({ type: fc.constant('release' as const), bytes: safe, order: u32 }),
  fc.record({ type: fc.constant('extents' as const), extents: commitExtents }),
  fc.record({
    type: fc.constant('commit' as const),
    chunks: safe,
    bytes: safe,
    aggregateSha256: hex(32),
    extentCount: safe,
  }),
  fc.oneof(
    fc.record({
      type: fc.constant('after-publish' as const),
      checkpoint: fc.string({ unit: 'grapheme', minLength: 1, maxLength: 40 }),
      sequence: fc.integer({ min: 1, max: Number.MAX_SAFE_INTEGER }),
    }),
    fc.constant({ type: 'after-publish' as const, checkpoint: '', sequence: 0 }),
  ),
  // A published question: prune up to keepFrom, at most the published sequence.
  fc
    .tuple(fc.integer({ min: 1, max: Number.MAX_SAFE_INTEGER }), fc.double({ min: 0, max: 1, noNaN: true }))
    .chain(([sequence, share]) =>
      fc.record({
        type: fc.constant('hello' as const),
        version: fc.constant(PROTOCOL_VERSION),
        disk: diskName,
        sizeBytes: safe,
        kind: fc.constantFrom('full' as const, 'incremental' as const),
        resume: fc.constant(false),
        session: hex(16),
        token: fc.constant(NO_TOKEN),
        cycle: fc.string({ unit: 'grapheme', minLength: 1, maxLength: 40 }),
        published: fc.constant({ sequence, keepFrom: Math.floor(sequence * share) }),
      }),
    ),
  // A recover question: the checkpoint and its successors, ascending.
  fc.record({
    type: fc.constant('hello' as const),
    version: fc.constant(PROTOCOL_VERSION),
    disk: diskName,
    sizeBytes: safe,
    kind: fc.constantFrom('full' as const, 'incremental' as const),
    resume: fc.constant(false),
    session: hex(16),
    token: fc.constant(NO_TOKEN),
    cycle: fc.string({ unit: 'grapheme', minLength: 1, maxLength: 40 }),
    recover: fc
      .tuple(
        fc.constantFrom('check' as const, 'plan' as const, 'stream' as const),
        fc.integer({ min: 1, max: 2 ** 40 }),
        text,
        fc.array(
          fc.tuple(
            fc.integer({ min: 1, max: 1000 }),
            fc.string({ unit: 'grapheme', minLength: 1, maxLength: 20 }),
          ),
          {
            maxLength: 20,
          },
        ),
      )
      .map(([mode, sequence, targetRef, steps]) => {
        let at = sequence;
        const later = steps.map(([gap, id]) => {
          at += gap;
          return { sequence: at, id };
        });
        return { mode, sequence, targetRef, later };
      }),
  }),
  fc.constant({ type: 'close' as const }),
  fc.constant({ type: 'flush' as const }),
  fc.record({ type: fc.constant('error' as const), retryable: fc.boolean(), reason: text }),
];

const framesByNode: fc.Arbitrary<Frame>[] = [
  fc.record({
    type: fc.constant('welcome' as const),
    version: fc.constant(PROTOCOL_VERSION),
    blockSize: u32,
    maxChunkBytes: u32,
    incarnation: hex(8),
    conn: u32,
    joined: fc.boolean(),
    granted: safe,
    window: safe,
    token: hex(16),
  }),
  fc.record({ type: fc.constant('ack' as const), tag: u32, seq: safe, granted: safe }),
  fc.record({
    type: fc.constant('nack' as const),
    tag: u32,
    seq: safe,
    code: fc.constantFrom(
      'checksum' as const,
      'write-retryable' as const,
      'write-failed' as const,
      'throttled' as const,
    ),
    granted: safe,
    reason: text,
  }),
  fc.record({ type: fc.constant('grant' as const), granted: safe, window: safe }),
  fc.record({ type: fc.constant('committed' as const), targetRef: text }),
  fc.constant({ type: 'done' as const }),
  fc.record({ type: fc.constant('conn-closed' as const), conn: u32, admitted: safe }),
  fc.constant({ type: 'flushed' as const }),
  fc.record({ type: fc.constant('checked' as const), held: fc.boolean(), token: hex(16), reason: text }),
  fc.record({
    type: fc.constant('verified' as const),
    ok: fc.boolean(),
    regions: safe,
    mismatches: fc.array(safe, { maxLength: 10 }),
    manifestRef: text,
    reason: text,
  }),
  fc.array(safe, { maxLength: 20 }).chain((sequences) =>
    fc.record({
      type: fc.constant('pruned' as const),
      ok: fc.boolean(),
      count: fc.integer({ min: sequences.length, max: 2 ** 32 - 1 }),
      sequences: fc.constant(sequences),
      reason: text,
    }),
  ),
  fc.record({
    type: fc.constant('recovery' as const),
    ok: fc.boolean(),
    sizeBytes: safe,
    reason: text,
    message: text,
  }),
  fc.uint8Array({ minLength: 1, maxLength: 300 }).chain((data) =>
    fc.record({
      type: fc.constant('image-data' as const),
      part: fc.constantFrom('manifest' as const, 'image' as const),
      offset: safe,
      sha256: fc.constant(createHash('sha256').update(data).digest('hex')),
      data: fc.constant(Buffer.from(data)),
    }),
  ),
  fc.record({ type: fc.constant('image-end' as const), frames: safe, bytes: safe }),
  fc.record({ type: fc.constant('error' as const), retryable: fc.boolean(), reason: text }),
];

const frameFrom = (side: Side) => fc.oneof(...(side === 'source' ? framesBySource : framesByNode));

/** Feeds buffers to a reader for frames sent by `side`; returns the frames it produced. */
function readAll(side: Side, pieces: Buffer[]): Frame[] {
  const frames: Frame[] = [];
  const reader = new FrameReader({ from: side, onFrame: (f) => frames.push(f) });
  for (const p of pieces) reader.push(p);
  expect(reader.truncation()).toBeUndefined();
  return frames;
}

function readError(side: Side, bytes: Buffer): ProtocolError {
  try {
    readAll(side, [bytes]);
  } catch (err) {
    expect(err).toBeInstanceOf(ProtocolError);
    return err as ProtocolError;
  }
  throw new Error('the reader accepted the bytes');
}

function frameBytes(type: FrameType, payload: Buffer, length = payload.length): Buffer {
  const head = Buffer.alloc(FRAME_HEADER_BYTES);
  head.writeUInt32BE(length, 0);
  head.writeUInt8(FRAME_TYPES[type], 4);
  return Buffer.concat([head, payload]);
}

const hello = (disk = 'disk0', sizeBytes = 8 * MiB): Frame => ({
  type: 'hello',
  version: PROTOCOL_VERSION,
  disk,
  sizeBytes,
  kind: 'full',
  resume: false,
  session: randomBytes(16).toString('hex'),
  token: NO_TOKEN,
  cycle: '',
});

/** A HELLO as a version 1 source sends it: magic, version, kind, flags, size, session, name. */
function v1Hello(disk: string): Buffer {
  const name = Buffer.from(disk);
  const payload = Buffer.alloc(5 + 2 + 1 + 1 + 8 + 16 + 2 + name.length);
  payload.write('FERRY', 0, 'latin1');
  payload.writeUInt16BE(1, 5);
  payload.writeBigUInt64BE(BigInt(MiB), 9);
  randomBytes(16).copy(payload, 17);
  payload.writeUInt16BE(name.length, 33);
  name.copy(payload, 35);
  return frameBytes('hello', payload);
}

describe('frame codec', () => {
  it('decodes every frame it encodes, from either side', () => {
    for (const side of ['source', 'node'] as const) {
      fc.assert(
        fc.property(frameFrom(side), (frame) => {
          expect(readAll(side, [encodeFrame(frame)])).toEqual([frame]);
        }),
        { numRuns: 300 },
      );
    }
  });

  it('yields the same frames however the stream is cut into reads', () => {
    for (const side of ['source', 'node'] as const) {
      fc.assert(
        fc.property(
          fc.array(frameFrom(side), { minLength: 1, maxLength: 8 }),
          fc.array(fc.nat(), { maxLength: 20 }),
          (frames, cuts) => {
            const stream = Buffer.concat(frames.map(encodeFrame));
            const points = [...new Set(cuts.map((c) => c % (stream.length + 1)))].sort((a, b) => a - b);
            const pieces: Buffer[] = [];
            let at = 0;
            for (const p of [...points, stream.length]) {
              pieces.push(stream.subarray(at, p));
              at = p;
            }
            expect(readAll(side, pieces)).toEqual(frames);
          },
        ),
        { numRuns: 200 },
      );
    }
  });

  it('streams a 100k-extent change map in a few compact EXTENTS frames', () => {
    const extents = extentsFrom(
      0,
      Array.from({ length: 100_000 }, (_, i): [number, number] => [
        4096 * (1 + (i % 7)),
        4096 * (1 + (i % 3)),
      ]),
    );
    const frames: Frame[] = [];
    for (let i = 0; i < extents.length; i += MAX_EXTENTS_PER_FRAME) {
      frames.push({ type: 'extents', extents: extents.slice(i, i + MAX_EXTENTS_PER_FRAME) });
    }
    const stream = Buffer.concat(frames.map(encodeFrame));
    // Prepare / Assess: 4 bytes per extent, not the 16 of two u64s.
    expect(stream.length).toBeLessThan(100_000 * 5);
    const decoded = readAll('source', [stream]).flatMap((f) => (f.type === 'extents' ? f.extents : []));
    expect(decoded).toEqual(extents);
  });
});

describe('bad frames', () => {
  it('refuses an unknown frame type, naming it', () => {
    const err = readError('source', Buffer.from([0, 0, 0, 0, 0x42]));
    expect(err.message).toMatch(/unknown frame type 0x42/);
  });

  it('refuses an oversized frame from its header alone, before buffering its body', () => {
    for (const type of ['hello', 'chunk', 'extents', 'commit'] as const) {
      const frames: Frame[] = [];
      const reader = new FrameReader({ from: 'source', onFrame: (f) => frames.push(f) });
      const head = frameBytes(type, Buffer.alloc(0), maxPayload(type) + 1);
      expect(() => reader.push(head)).toThrow(/exceeds the \d+-byte maximum/);
      expect(reader.buffered).toBe(0);
      expect(frames).toEqual([]);
    }
    const err = readError('source', frameBytes('chunk', Buffer.alloc(0), 0xffffffff));
    expect(err.message).toMatch(/CHUNK frame of 4294967295 bytes exceeds/);
  });

  it('refuses frames whose fields do not fit their length: truncated or with trailing bytes', () => {
    const good = encodeFrame({ type: 'ack', tag: 1, seq: 2, granted: 3 });
    const payload = good.subarray(FRAME_HEADER_BYTES);
    expect(readError('node', frameBytes('ack', payload.subarray(0, 10))).message).toMatch(
      /ACK frame truncated/,
    );
    // A fixed-size frame that is too long is oversized; a variable one has bytes left over.
    expect(readError('node', frameBytes('ack', Buffer.concat([payload, Buffer.alloc(1)]))).message).toMatch(
      /exceeds the 20-byte maximum/,
    );
    const nack = encodeFrame({ type: 'nack', tag: 1, seq: 2, code: 'checksum', granted: 3, reason: 'x' });
    const extra = Buffer.concat([nack.subarray(FRAME_HEADER_BYTES), Buffer.alloc(1)]);
    expect(readError('node', frameBytes('nack', extra)).message).toMatch(/NACK frame has 1 trailing bytes/);
  });

  it('refuses a stranger (bad magic), another version, and frames sent by the wrong side', () => {
    const bytes = encodeFrame(hello());
    const badMagic = Buffer.from(bytes);
    badMagic.write('HTTP/', FRAME_HEADER_BYTES, 'latin1');
    expect(readError('source', badMagic).message).toMatch(/bad magic "HTTP\/"/);
    const newer = Buffer.from(bytes);
    newer.writeUInt16BE(PROTOCOL_VERSION + 1, FRAME_HEADER_BYTES + 5);
    expect(readError('source', newer).message).toBe(
      `HELLO frame: the source speaks Ferry protocol version ${PROTOCOL_VERSION + 1}, this node speaks version ${PROTOCOL_VERSION}: upgrade ferry on the node`,
    );
    const welcome = encodeFrame({
      type: 'welcome',
      version: PROTOCOL_VERSION,
      blockSize: 4096,
      maxChunkBytes: MiB,
      incarnation: '00'.repeat(8),
      conn: 1,
      joined: false,
      granted: 0,
      window: 0,
      token: NO_TOKEN,
    });
    expect(readError('source', welcome).message).toMatch(/unexpected WELCOME frame from a source/);
    expect(SENT_BY.error).toBe('both');
  });

  it('refuses malformed history frames, naming the field: questions, sequences, counts, lengths', () => {
    const ask = (recover: object, more: object = {}) =>
      encodeFrame({ ...hello(), cycle: 'set#1', recover, ...more } as Frame);
    const base = { mode: 'stream', sequence: 5, targetRef: 'r', later: [{ sequence: 6, id: 'set#6' }] };
    // Encoder and decoder both refuse later checkpoints that do not ascend past the checkpoint.
    expect(() => ask({ ...base, later: [{ sequence: 5, id: 'set#5' }] })).toThrow(
      /sequences must ascend past 5/,
    );
    const good = ask(base);
    const descending = Buffer.from(good);
    // The later entry's sequence sits after fixed part, mode, sequence, reference and count.
    const at = FRAME_HEADER_BYTES + 5 + 2 + 1 + 1 + 8 + 16 + 16 + 1 + 8 + 2 + 1 + 2;
    expect(descending.readUInt32BE(at + 4)).toBe(6);
    descending.writeUInt32BE(4, at + 4);
    expect(readError('source', descending).message).toMatch(/later checkpoint 0 has sequence 4, not above 5/);
    const tooMany = Buffer.from(good);
    tooMany.writeUInt16BE(2000, at - 2);
    expect(readError('source', tooMany).message).toMatch(/2000 later checkpoints exceed 1024/);
    const badMode = Buffer.from(good);
    badMode.writeUInt8(7, FRAME_HEADER_BYTES + 5 + 2 + 1 + 1 + 8 + 16 + 16);
    expect(readError('source', badMode).message).toMatch(/unknown recovery mode 7/);
    // Two questions in one HELLO, and a question without its checkpoint.
    const two = Buffer.from(good);
    two.writeUInt8(0x10 | 0x04, FRAME_HEADER_BYTES + 5 + 2 + 1);
    expect(readError('source', two).message).toMatch(/ask more than one question/);
    expect(() => readAll('source', [ask(base, { cycle: '' })])).toThrow(
      /recover question names no checkpoint/,
    );
    expect(() =>
      encodeFrame({ ...hello(), cycle: 'x#2', published: { sequence: 2, keepFrom: 1 }, verify: '' } as Frame),
    ).toThrow(/one question at most/);
    const published = encodeFrame({
      ...hello(),
      cycle: 'x#2',
      published: { sequence: 2, keepFrom: 1 },
    } as Frame);
    const pastIt = Buffer.from(published);
    pastIt.writeUInt32BE(3, FRAME_HEADER_BYTES + 5 + 2 + 1 + 1 + 8 + 16 + 16 + 8 + 4);
    expect(readError('source', pastIt).message).toMatch(/kept from 3, past the published sequence 2/);
    // AFTER_PUBLISH names its checkpoint by id and sequence together.
    const after = encodeFrame({ type: 'after-publish', checkpoint: 'x#2', sequence: 2 });
    const noSeq = Buffer.from(after);
    noSeq.writeUInt32BE(0, FRAME_HEADER_BYTES + 4);
    expect(readError('source', noSeq).message).toMatch(/AFTER_PUBLISH frame: checkpoint id and sequence/);
    // Node answers: bounded lists, known values, data that is there and not oversized.
    const pruned = encodeFrame({ type: 'pruned', ok: true, count: 1, sequences: [3], reason: '' });
    const overListed = Buffer.from(pruned);
    overListed.writeUInt16BE(2, FRAME_HEADER_BYTES + 1 + 4);
    expect(readError('node', overListed).message).toMatch(/PRUNED frame lists 2 of 1 sequences/);
    const recovery = Buffer.from(
      encodeFrame({ type: 'recovery', ok: true, sizeBytes: 1, reason: '', message: '' }),
    );
    recovery.writeUInt8(2, FRAME_HEADER_BYTES);
    expect(readError('node', recovery).message).toMatch(/RECOVERY frame: unknown ok value 2/);
    const sha256 = createHash('sha256').update('').digest('hex');
    expect(readError('node', frameBytes('image-data', Buffer.alloc(41))).message).toMatch(
      /IMAGE_DATA frame carries no data/,
    );
    expect(
      readError('node', frameBytes('image-data', Buffer.alloc(0), 41 + MAX_IMAGE_DATA_BYTES + 1)).message,
    ).toMatch(/IMAGE_DATA frame of \d+ bytes exceeds the \d+-byte maximum/);
    expect(() =>
      encodeFrame({ type: 'image-data', part: 'image', offset: 0, sha256, data: Buffer.alloc(0) }),
    ).toThrow(/IMAGE_DATA of 0 bytes/);
  });

  it('reads a version 1 HELLO far enough to tell that source to upgrade', () => {
    expect(readError('source', v1Hello('disk0')).message).toBe(
      'HELLO frame: the source speaks Ferry protocol version 1, this node speaks version 3: upgrade ferry on the source',
    );
  });

  it('refuses a chunk whose length, extents or sizes contradict each other', () => {
    const data = Buffer.alloc(8192, 1);
    const meta = {
      tag: 1,
      seq: 7,
      offset: 4096,
      bytes: 8192,
      waited: false,
      sha256: createHash('sha256').update(data).digest('hex'),
      extents: [{ offset: 4096, length: 8192 }],
    };
    // One byte of data missing from the frame's length.
    const head = encodeChunkHead(meta);
    const short = Buffer.concat([head, data]);
    short.writeUInt32BE(short.readUInt32BE(0) - 1, 0);
    expect(readError('source', short).message).toMatch(/CHUNK seq 7: frame length .* does not match/);
    // Extents that do not add up to the bytes the chunk claims.
    const lying = Buffer.concat([head, data]);
    lying.writeUInt32BE(4096, FRAME_HEADER_BYTES + CHUNK_FIXED_BYTES + 8); // first extent's length
    expect(readError('source', lying).message).toMatch(/extents hold 4096 bytes but the chunk says 8192/);
  });

  it('asks for admission before buffering a chunk, and buffers nothing of one it refuses', () => {
    const data = Buffer.alloc(64 * 1024, 3);
    const meta = {
      tag: 1,
      seq: 0,
      offset: 0,
      bytes: data.length,
      waited: false,
      sha256: createHash('sha256').update(data).digest('hex'),
      extents: [{ offset: 0, length: data.length }],
    };
    const reader = new FrameReader({
      from: 'source',
      onFrame: () => {
        throw new Error('no frame should complete');
      },
      admitChunk: (m) => {
        throw new ProtocolError(`CHUNK seq ${m.seq} of ${m.bytes} bytes sent without credit`);
      },
    });
    expect(() => reader.push(encodeChunkHead(meta))).toThrow(/sent without credit/);
    reader.push(data); // ignored: the reader is dead
    expect(reader.buffered).toBe(0);
  });

  it('says where a stream was cut off', () => {
    const frames: Frame[] = [];
    const reader = new FrameReader({ from: 'node', onFrame: (f) => frames.push(f) });
    const bytes = encodeFrame({ type: 'grant', granted: 5, window: 6 });
    reader.push(bytes.subarray(0, 9));
    expect(reader.truncation()).toMatch(/stream ended inside a GRANT frame \(4 of 16 bytes\)/);
  });

  it('keeps error text within its limit, cut on a character boundary', () => {
    const long = 'é'.repeat(MAX_TEXT_BYTES);
    const [frame] = readAll('node', [encodeFrame({ type: 'error', retryable: true, reason: long })]);
    expect(frame).toMatchObject({ type: 'error', retryable: true });
    const reason = (frame as { reason: string }).reason;
    expect(Buffer.byteLength(reason)).toBeLessThanOrEqual(MAX_TEXT_BYTES);
    expect(reason).toBe('é'.repeat(reason.length));
  });
});

// ---- A raw client against a real node ----

/** A TCP client that speaks frames by hand. */
class RawClient {
  readonly frames: Frame[] = [];
  private waiter: (() => void) | undefined;
  readonly closed: Promise<void>;

  private constructor(readonly socket: net.Socket) {
    const reader = new FrameReader({
      from: 'node',
      onFrame: (f) => {
        this.frames.push(f);
        this.waiter?.();
      },
    });
    socket.on('data', (b: Buffer) => reader.push(b));
    socket.on('error', () => {});
    this.closed = new Promise((resolve) =>
      socket.once('close', () => {
        resolve();
        this.waiter?.();
      }),
    );
  }

  static async connect(port: number): Promise<RawClient> {
    const socket = net.connect({ host: '127.0.0.1', port });
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', resolve);
      socket.once('error', reject);
    });
    const client = new RawClient(socket);
    cleanups.push(async () => {
      socket.destroy();
    });
    return client;
  }

  send(frame: Frame | Buffer): void {
    this.socket.write(Buffer.isBuffer(frame) ? frame : encodeFrame(frame));
  }

  /** The next frame from the node; undefined once the connection is closed and nothing is left. */
  async next(): Promise<Frame | undefined> {
    for (;;) {
      const f = this.frames.shift();
      if (f) return f;
      if (this.socket.closed) return undefined;
      await new Promise<void>((resolve) => {
        this.waiter = resolve;
      });
      this.waiter = undefined;
    }
  }
}

async function startTestNode(log?: string[]): Promise<{ node: ReplicationNode; dir: string }> {
  const dir = await mkdtemp(join(tmpdir(), 'ferry-node-'));
  const node = await startNode({
    listen: '127.0.0.1:0',
    targets: await ImageDirectory.open(dir),
    sessionDir: dir,
    insecure: true, // raw frames on loopback
    levels: [MiB, 2 * MiB],
    initialWindow: 2 * MiB,
    nodeBudget: 4 * MiB,
    adaptive: false,
    ...(log ? { log: (line) => log.push(line) } : {}),
  });
  cleanups.push(() => node.close());
  return { node, dir };
}

function chunkOf(data: Buffer, offset: number, tag: number, sha256?: string): Frame {
  return {
    type: 'chunk',
    tag,
    seq: tag,
    offset,
    bytes: data.length,
    waited: false,
    sha256: sha256 ?? createHash('sha256').update(data).digest('hex'),
    extents: [{ offset, length: data.length }],
    data,
  };
}

const isZero = (b: Buffer) => b.every((x) => x === 0);

describe('a node facing a raw client', () => {
  it('NACKs a chunk with a wrong checksum and writes nothing of it', async () => {
    // Prepare
    const { node, dir } = await startTestNode();
    const client = await RawClient.connect(node.port);
    client.send(hello('disk0'));
    const welcome = await client.next();
    // One chunk of credit until data flows (the window is 2 MiB).
    expect(welcome).toMatchObject({ type: 'welcome', blockSize: 4096, granted: MiB, joined: false });
    const data = randomBytes(64 * 1024);
    // Act: the digest of other data.
    client.send(chunkOf(data, 0, 1, createHash('sha256').update('other').digest('hex')));
    const nack = await client.next();
    // Assess
    expect(nack).toMatchObject({ type: 'nack', tag: 1, code: 'checksum' });
    expect((nack as { reason: string }).reason).toMatch(/checksum mismatch/);
    expect(isZero(await readFile(join(dir, 'disk0')))).toBe(true);
    // The connection is still good: the right data is written and acknowledged.
    client.send(chunkOf(data, 0, 2));
    expect(await client.next()).toMatchObject({ type: 'ack', tag: 2 });
    expect((await readFile(join(dir, 'disk0'))).subarray(0, data.length).equals(data)).toBe(true);
    expect(node.stats()).toMatchObject({ nacks: 1, chunksWritten: 1, inflightBytes: 0 });
  });

  it('answers a chunk sent without credit with ERROR and closes; nothing is written', async () => {
    // Prepare: take the initial credit, then give it all back.
    const log: string[] = [];
    const { node, dir } = await startTestNode(log);
    const client = await RawClient.connect(node.port);
    client.send(hello('disk1'));
    const welcome = await client.next();
    const granted = (welcome as { granted: number }).granted;
    client.send({ type: 'release', bytes: granted, order: 1 });
    // Act
    client.send(chunkOf(randomBytes(4096), 4096, 1));
    // Assess
    const error = await client.next();
    expect(error).toMatchObject({ type: 'error', retryable: false });
    expect((error as { reason: string }).reason).toMatch(
      /CHUNK seq 1 of 4096 bytes sent without credit \(0 bytes/,
    );
    await client.closed;
    expect(await client.next()).toBeUndefined();
    expect(isZero(await readFile(join(dir, 'disk1')))).toBe(true);
    expect(log.join('\n')).toMatch(/peer 127\.0\.0\.1:\d+ \(disk disk1\): protocol violation: CHUNK seq 1/);
    expect(node.stats()).toMatchObject({ violations: 1, chunksWritten: 0, inflightBytes: 0 });
  });

  it('refuses a chunk larger than the credit granted', async () => {
    const { node, dir } = await startTestNode();
    const client = await RawClient.connect(node.port);
    client.send(hello('disk2'));
    const welcome = await client.next();
    const granted = (welcome as { granted: number }).granted;
    client.send(chunkOf(randomBytes(granted + 4096), 0, 1));
    const error = await client.next();
    expect((error as { reason: string }).reason).toMatch(/sent without credit/);
    await client.closed;
    expect(isZero(await readFile(join(dir, 'disk2')))).toBe(true);
  });

  it('closes on garbage with an error naming what was wrong, and refuses bad disk names', async () => {
    const log: string[] = [];
    const { node } = await startTestNode(log);
    const client = await RawClient.connect(node.port);
    client.send(hello('disk3'));
    await client.next();
    client.send(Buffer.from([0, 0, 0, 1, 0x42, 0]));
    expect(await client.next()).toMatchObject({
      type: 'error',
      reason: 'unknown frame type 0x42 (length 1)',
    });
    await client.closed;
    expect(log.join('\n')).toMatch(/\(disk disk3\): protocol violation: unknown frame type 0x42/);

    const other = await RawClient.connect(node.port);
    // The codec refuses to encode such a name, so the frame is built by hand.
    const good = encodeFrame(hello('abcdefgh'));
    const bad = Buffer.from(good);
    bad.write('../etc/x', good.length - 8, 'latin1');
    other.send(bad);
    expect(await other.next()).toMatchObject({
      type: 'error',
      reason: 'disk name "../etc/x" contains a path separator',
    });
    await other.closed;
  });

  it('refuses a second source on a disk that is being replicated', async () => {
    const { node } = await startTestNode();
    const first = await RawClient.connect(node.port);
    first.send(hello('shared'));
    expect(await first.next()).toMatchObject({ type: 'welcome' });
    const second = await RawClient.connect(node.port);
    second.send(hello('shared'));
    expect(await second.next()).toMatchObject({
      type: 'error',
      retryable: true,
      reason: 'disk shared is being replicated by another source session',
    });
  });
});
