// The Ferry replication protocol over TCP: frames, their codec and validation, an incremental reader.
//
// Framing. Every frame is `[u32 length][u8 type][payload]`, big-endian, `length` counting the payload
// only. The reader checks `length` against the largest payload the type can have BEFORE it buffers
// anything, so a peer cannot make either side allocate more than one bounded frame.
//
// Session. A source opens a disk with HELLO (magic "FERRY", version 2, disk name, size, copy kind,
// resume flag, a 16-byte session id it chose, the resume token, the engine's cycle id). The node
// answers WELCOME (block size, largest chunk, the node's incarnation of the session, this
// connection's id, the credit granted so far, the session's resume token) or ERROR.
// Resume tokens. A HELLO without the resume flag starts a new session: the node records it durably
// (who started it, a fresh random resume token, the cycle id) before it sends WELCOME with the
// token. A HELLO with the resume flag must present that token: it is accepted only for a session
// the node itself recorded and that is not committed, so nobody resumes straight into an image.
// A HELLO with the check flag asks a question instead of opening anything: does the node hold the
// session of this cycle with these chunks (count, aggregate of their SHA-256s, aggregate of their
// extents)? The node answers CHECKED (held, and then the token) and hangs up; this is how a source
// that restarted proves a resume before skipping chunks (DiskTarget.checkResume).
// A HELLO with the verify flag asks the node to re-hash the disk's image against its manifest and
// the reference a checkpoint recorded; the node answers VERIFIED and hangs up (`ferry verify`).
// A HELLO with the published flag tells the node that cycle `cycle` was published as checkpoint
// `sequence` (so a commit it never heard the fate of is settled, its history kept under that
// sequence) and asks it to prune the disk's history up to `keepFrom` (0: none); the node answers
// PRUNED and hangs up. A HELLO with the recover flag asks for the image of checkpoint `cycle`
// (`sequence`, `sizeBytes`, `targetRef`) given the later checkpoints of the disk (sequence and id,
// so the node checks its history belongs to them): `check` answers RECOVERY only (a listing),
// `plan` RECOVERY then the checkpoint's manifest as IMAGE_DATA frames and IMAGE_END, `stream`
// RECOVERY then the image's non-zero data as IMAGE_DATA frames (each with its SHA-256) and
// IMAGE_END; then the node hangs up. The stream is paced by TCP: the node writes the next frame only
// once the socket has drained, and the source stops reading while it writes what it has, so each
// side holds a bounded number of frames. Every question is asked of one disk and refused, like a
// session, for a credential without that disk.
// More connections of the same source join the session with the same session id; a HELLO with a
// new session id for a disk that has live connections is refused (two sources must not write one
// image). When a connection is lost the source reconnects with the same session id and `resume`
// set, so the node keeps what was staged. A session whose last connection is gone is retired (its
// writes finish, its image is closed, its credit freed); the next HELLO starts a new incarnation
// with fresh credit, and a source that sees a new incarnation in WELCOME resets its own counters.
//
// Flow control (worker-driven pull). Credit is per disk session, shared by its connections, and
// counted cumulatively: the node's `granted` only grows, and every ACK, NACK and GRANT carries its
// current value, so a lost reply never loses credit (the next frame on any connection carries it).
// The source tracks the bytes it consumed (CHUNK data, RELEASE); it may send a chunk only when
// `granted - consumed >= bytes`. A CHUNK beyond the credit is a protocol violation: ERROR and close,
// nothing written. The node grants whenever its window for the disk (an adaptive WindowController
// fed with grant-to-written latency), its node budget and max-min fairness across disks allow; it
// shrinks a window by not re-granting what completes. Grants come in whole chunk-sized units, so
// credit spread over many disks never leaves each with a fraction of a chunk. The node's `held`
// bytes per disk (credit granted but unused, plus chunks being received or written) never exceed
// the window, and their sum never exceeds the budget: that is the node's memory bound. After COMMIT
// no chunk may follow, so a committed session's unused credit stops counting.
// The node's credit is the real window: the source's engine window only bounds how far the source
// reads ahead, and should not be below the node's top level (run it fixed at the top level).
// - WANT (bytes): the source is blocked on a chunk of that size; the node grows its grant unit to
//   it (a window is never smaller than one chunk) and resumes granting to an idle session.
// - RELEASE (bytes): the source gives back credit it has no use for (it went idle); the node stops
//   granting to it until a later WANT, so an idle disk does not starve busy ones. Both carry an
//   `order` counter: sent on different connections they may arrive out of order, and a stale
//   RELEASE must not silence the WANT that followed it.
// - CONN_CLOSED (conn, admitted): when a connection of a live session ends, the node tells the
//   source, on another connection, how many bytes it admitted from it; the source gives itself back
//   the credit of whatever it wrote to that connection that never arrived.
//
// Data. CHUNK carries a per-connection tag (echoed by ACK/NACK), the descriptor (seq, offset,
// extents, bytes), the SHA-256 of the data, whether the source had to wait for credit (the node's
// controller counts it as window-limited), and the data. The node checks length and SHA-256 before
// it counts or writes anything, writes through its target (which reads back and verifies), then
// ACKs, or NACKs with a code: checksum (retryable), write failed (retryable or not), throttled.
//
// Durability. FLUSH asks the node to make every chunk it has ACKed durable (the image or staging
// file and its record of chunk digests, fsynced); FLUSHED answers once they are. The source's
// engine flushes before each progress save, so its progress never outruns the node's disk.
//
// Commit. EXTENTS frames stream the cycle's changed extents (LEB128 gap/length pairs, so a
// fragmented map of 100k extents is a few hundred KiB), then COMMIT (chunks, bytes, aggregate
// SHA-256, extent count) makes the node commit its target and answer COMMITTED (the target's
// reference). The node commits only what it checked itself: the aggregate over the digests it
// verified, in seq order, must equal the COMMIT's, every seq below `chunks` must have arrived and
// none above, and the chunks' extents must be exactly the EXTENTS. AFTER_PUBLISH (answered DONE)
// (with the checkpoint's id and sequence, under which the node keeps the cycle's history) drops the
// node's staging; CLOSE ends a connection.
//
// Versions. Frame headers and the ERROR frame are the same in every version, and HELLO starts with
// magic and version in every version, so a node reads any source's HELLO far enough to answer a
// peer of another version with an ERROR that says which side to upgrade.
import { createHash } from 'node:crypto';
import { FerryError } from '../engine/errors.ts';
import type { Extent } from '../engine/extents.ts';
import type { CopyKind } from '../engine/ports.ts';
import { MiB } from '../engine/units.ts';
import { ByteQueue } from '../runtime/byte-queue.ts';

export const MAGIC = 'FERRY';
// 3: AFTER_PUBLISH names the checkpoint; the published and recover questions (node history).
export const PROTOCOL_VERSION = 3;
/** `[u32 length][u8 type]`. */
export const FRAME_HEADER_BYTES = 5;
// The engine's own chunk limit (a chunk is buffered whole at both ends): above it, one chunk fills a
// disk's top window and every retry re-sends tens of MiB.
export const MAX_CHUNK_BYTES = 64 * MiB;
// The node writes file images in 4 KiB blocks; descriptors are aligned to this.
export const PROTOCOL_BLOCK_SIZE = 4096;
// Extents in one chunk are block-aligned, non-empty and not touching (normalised change maps are
// merged), so a span of MAX_CHUNK_BYTES holds at most one extent per two blocks.
export const MAX_CHUNK_EXTENTS = MAX_CHUNK_BYTES / (2 * PROTOCOL_BLOCK_SIZE);
// 16k extents per EXTENTS frame: at most 256 KiB even with the longest varints, and few frames for
// a 100k-extent change map.
export const MAX_EXTENTS_PER_FRAME = 16 * 1024;
// Disk names become file names on the node; 255 bytes is the common file-name limit.
export const MAX_DISK_NAME_BYTES = 255;
// Error text and target references are for operators and catalogs, never data: 1 KiB is plenty.
export const MAX_TEXT_BYTES = 1024;
export const SESSION_ID_BYTES = 16;
export const INCARNATION_BYTES = 8;
// 128 random bits: guessing a resume token is out of reach.
export const TOKEN_BYTES = 16;
/** The token of a HELLO that opens a new session (it has none). */
export const NO_TOKEN = '00'.repeat(TOKEN_BYTES);
// The engine's cycle ids are "<set>#<sequence>"; set names are at most 128 characters.
export const MAX_CYCLE_BYTES = 255;
// Later checkpoints a recover question may name: six weeks of hourly checkpoints, far past the
// default retention (24), and a HELLO of at most ~270 KiB.
export const MAX_RECOVERY_LATER = 1024;
// Bytes of data in one IMAGE_DATA frame: four 64 KiB sparse runs, so a frame is hashed and written
// in one go and a paced stream holds little more than one of them at either end.
export const MAX_IMAGE_DATA_BYTES = 256 * 1024;
// Pruned sequences listed in PRUNED (the rest only counted): a prune after each publication removes
// one entry, a prune that catches up after failures a few.
export const MAX_PRUNED_LISTED = 1024;

export const FRAME_TYPES = {
  hello: 0x01,
  welcome: 0x02,
  chunk: 0x03,
  ack: 0x04,
  nack: 0x05,
  want: 0x06,
  grant: 0x07,
  release: 0x08,
  extents: 0x09,
  commit: 0x0a,
  committed: 0x0b,
  'after-publish': 0x0c,
  done: 0x0d,
  close: 0x0e,
  'conn-closed': 0x0f,
  flush: 0x10,
  flushed: 0x11,
  checked: 0x12,
  verified: 0x13,
  pruned: 0x14,
  recovery: 0x15,
  'image-data': 0x16,
  'image-end': 0x17,
  error: 0x7f,
} as const;

export type FrameType = keyof typeof FRAME_TYPES;

const TYPE_BY_CODE = new Map<number, FrameType>(
  Object.entries(FRAME_TYPES).map(([name, code]) => [code, name as FrameType]),
);

/** Who may send which frame; ERROR goes both ways (a source explains why it hangs up too). */
export const SENT_BY: Readonly<Record<FrameType, 'source' | 'node' | 'both'>> = {
  hello: 'source',
  welcome: 'node',
  chunk: 'source',
  ack: 'node',
  nack: 'node',
  want: 'source',
  grant: 'node',
  release: 'source',
  extents: 'source',
  commit: 'source',
  committed: 'node',
  'after-publish': 'source',
  done: 'node',
  close: 'source',
  'conn-closed': 'node',
  flush: 'source',
  flushed: 'node',
  checked: 'node',
  verified: 'node',
  pruned: 'node',
  recovery: 'node',
  'image-data': 'node',
  'image-end': 'node',
  error: 'both',
};

/** Why a node refused a chunk; decides what the source's retry layer does with it. */
export type NackCode = 'checksum' | 'write-retryable' | 'write-failed' | 'throttled';
const NACK_CODES: readonly NackCode[] = ['checksum', 'write-retryable', 'write-failed', 'throttled'];

/**
 * What a source claims before a resume: the chunks of seqs 0..chunks-1 with the linear aggregate
 * of their SHA-256s (as the engine's LinearAggregator) and of their layouts (`chunkLayoutSha256`).
 */
export interface ResumeCheck {
  readonly chunks: number;
  readonly aggregateSha256: string;
  readonly layoutSha256: string;
}

/** A published question: the HELLO's `cycle` was published as `sequence`; prune up to `keepFrom`. */
export interface PublishedNote {
  readonly sequence: number;
  /** Oldest checkpoint the source's retention keeps: history of cycles up to it goes (0: none). */
  readonly keepFrom: number;
}

/** What a recover question asks for: a listing's answer, the plan and manifest, or the image. */
export type RecoveryMode = 'check' | 'plan' | 'stream';
const RECOVERY_MODES: readonly RecoveryMode[] = ['check', 'plan', 'stream'];

/** A recover question: checkpoint `cycle` of the HELLO (`sizeBytes` its disk's size), and its successors. */
export interface RecoveryAsk {
  readonly mode: RecoveryMode;
  readonly sequence: number;
  /** The catalog's reference of the disk's manifest at the checkpoint. */
  readonly targetRef: string;
  /** The later checkpoints that wrote this disk, ascending by sequence. */
  readonly later: readonly { readonly sequence: number; readonly id: string }[];
}

/** A chunk's description, without its data: what the reader hands to admission before buffering. */
export interface ChunkMeta {
  /** Per-connection request id, echoed by ACK/NACK (a seq may be retried on another connection). */
  readonly tag: number;
  readonly seq: number;
  readonly offset: number;
  readonly bytes: number;
  /** The source had to wait for credit before sending this chunk (the window was the limit). */
  readonly waited: boolean;
  /** Hex SHA-256 of the data. */
  readonly sha256: string;
  readonly extents: readonly Extent[];
}

export type Frame =
  | {
      readonly type: 'hello';
      readonly version: number;
      readonly disk: string;
      readonly sizeBytes: number;
      readonly kind: CopyKind;
      readonly resume: boolean;
      /** Hex, SESSION_ID_BYTES long: chosen by the source, shared by all its connections for a disk. */
      readonly session: string;
      /** Hex, TOKEN_BYTES long: the resume token from the session's WELCOME; NO_TOKEN when opening. */
      readonly token: string;
      /** The engine's cycle id, recorded with the session ('' when the caller has none). */
      readonly cycle: string;
      /** Present: not a session but the question CHECKED answers (`sizeBytes`, `kind` unused). */
      readonly check?: ResumeCheck;
      /**
       * Present: not a session but a request to re-hash the disk's image against its manifest and
       * this reference (a checkpoint's targetRef; '' for the manifest alone), answered by VERIFIED.
       */
      readonly verify?: string;
      /** Present: not a session but the published question, answered by PRUNED. */
      readonly published?: PublishedNote;
      /** Present: not a session but the recover question, answered by RECOVERY (and data). */
      readonly recover?: RecoveryAsk;
    }
  | {
      readonly type: 'welcome';
      readonly version: number;
      readonly blockSize: number;
      readonly maxChunkBytes: number;
      /** Hex, INCARNATION_BYTES long: changes when the node starts the session afresh. */
      readonly incarnation: string;
      readonly conn: number;
      /** This connection joined a session that already had connections. */
      readonly joined: boolean;
      /** Cumulative credit granted in this incarnation of the session. */
      readonly granted: number;
      /** The node's current window for the disk (informational). */
      readonly window: number;
      /** Hex, TOKEN_BYTES long: what a resuming HELLO of this session must present. */
      readonly token: string;
    }
  | ({ readonly type: 'chunk'; readonly data: Uint8Array } & ChunkMeta)
  | { readonly type: 'ack'; readonly tag: number; readonly seq: number; readonly granted: number }
  | {
      readonly type: 'nack';
      readonly tag: number;
      readonly seq: number;
      readonly code: NackCode;
      readonly granted: number;
      readonly reason: string;
    }
  /** `order` counts the source's WANTs and RELEASEs: on two connections they may arrive out of order. */
  | { readonly type: 'want'; readonly bytes: number; readonly order: number }
  | { readonly type: 'grant'; readonly granted: number; readonly window: number }
  | { readonly type: 'release'; readonly bytes: number; readonly order: number }
  | { readonly type: 'extents'; readonly extents: readonly Extent[] }
  | {
      readonly type: 'commit';
      readonly chunks: number;
      readonly bytes: number;
      readonly aggregateSha256: string;
      readonly extentCount: number;
    }
  | { readonly type: 'committed'; readonly targetRef: string }
  /** `sequence` 0 and `checkpoint` '': the source was not told which checkpoint (no history kept). */
  | { readonly type: 'after-publish'; readonly checkpoint: string; readonly sequence: number }
  | { readonly type: 'done' }
  | { readonly type: 'close' }
  | { readonly type: 'conn-closed'; readonly conn: number; readonly admitted: number }
  | { readonly type: 'flush' }
  | { readonly type: 'flushed' }
  /** The answer to a check HELLO: `held` with the session's token, or why not (then NO_TOKEN). */
  | { readonly type: 'checked'; readonly held: boolean; readonly token: string; readonly reason: string }
  /** The answer to a verify HELLO: the image re-hashed region by region (`reason` when it could not be). */
  | {
      readonly type: 'verified';
      readonly ok: boolean;
      readonly regions: number;
      /** Offsets of the first regions that differ (at most MAX_VERIFY_MISMATCHES). */
      readonly mismatches: readonly number[];
      readonly manifestRef: string;
      readonly reason: string;
    }
  /** The answer to a published question: what the prune removed (`reason` when it could not). */
  | {
      readonly type: 'pruned';
      readonly ok: boolean;
      /** Entries pruned; the first MAX_PRUNED_LISTED of them are listed. */
      readonly count: number;
      readonly sequences: readonly number[];
      readonly reason: string;
    }
  /** The answer to a recover question: the plan, or why the checkpoint cannot be recovered here. */
  | {
      readonly type: 'recovery';
      readonly ok: boolean;
      readonly sizeBytes: number;
      /** Why not, naming the disk but not the checkpoint (for a listing); '' when ok. */
      readonly reason: string;
      /** Why not, in full (for a refused recovery); '' when ok. */
      readonly message: string;
    }
  /** Part of the manifest or of the image, at `offset` of it, with the SHA-256 of `data`. */
  | {
      readonly type: 'image-data';
      readonly part: 'manifest' | 'image';
      readonly offset: number;
      readonly sha256: string;
      readonly data: Uint8Array;
    }
  /** The end of a plan's manifest or of an image: how many IMAGE_DATA frames and bytes were sent. */
  | { readonly type: 'image-end'; readonly frames: number; readonly bytes: number }
  | { readonly type: 'error'; readonly retryable: boolean; readonly reason: string };

export type FrameOf<T extends FrameType> = Extract<Frame, { type: T }>;

/** A peer broke the protocol: a malformed, truncated, oversized or unexpected frame. */
export class ProtocolError extends FerryError {
  constructor(message: string) {
    super(message);
    this.name = 'ProtocolError';
  }
}

const fail = (message: string): never => {
  throw new ProtocolError(message);
};

const label = (type: FrameType): string => type.toUpperCase().replace('-', '_');

// ---- Sizes ----

/** magic, version, kind, flags, size, session, token, cycle length, name length. */
const HELLO_FIXED = MAGIC.length + 2 + 1 + 1 + 8 + SESSION_ID_BYTES + TOKEN_BYTES + 2 + 2;
/** A check HELLO's claim: chunks, aggregate, layout. */
const HELLO_CHECK_BYTES = 8 + 32 + 32;
const HELLO_RESUME = 0x01;
const HELLO_CHECK = 0x02;
const HELLO_VERIFY = 0x04;
const HELLO_PUBLISHED = 0x08;
const HELLO_RECOVER = 0x10;
/** The flags that ask a question instead of opening a session: at most one of them. */
const HELLO_QUESTIONS = [HELLO_CHECK, HELLO_VERIFY, HELLO_PUBLISHED, HELLO_RECOVER];
/** A published question: sequence, keepFrom. */
const HELLO_PUBLISHED_BYTES = 8 + 8;
/** A recover question at most: mode, sequence, reference, count, and each later checkpoint. */
const HELLO_RECOVER_MAX = 1 + 8 + 2 + MAX_TEXT_BYTES + 2 + MAX_RECOVERY_LATER * (8 + 2 + MAX_CYCLE_BYTES);
const WELCOME_BYTES = 2 + 4 + 4 + INCARNATION_BYTES + 4 + 1 + 8 + 8 + TOKEN_BYTES;
const CHECKED_FIXED = 1 + TOKEN_BYTES + 2;
// A region that differs is located to within a MiB; ten of them say enough about a damaged image.
export const MAX_VERIFY_MISMATCHES = 10;
const VERIFIED_MAX = 1 + 8 + 1 + 8 * MAX_VERIFY_MISMATCHES + 2 + MAX_TEXT_BYTES + 2 + MAX_TEXT_BYTES;
const PRUNED_MAX = 1 + 4 + 2 + 8 * MAX_PRUNED_LISTED + 2 + MAX_TEXT_BYTES;
const RECOVERY_MAX = 1 + 8 + 2 + MAX_TEXT_BYTES + 2 + MAX_TEXT_BYTES;
/** part, offset, sha256. */
const IMAGE_DATA_FIXED = 1 + 8 + 32;
const AFTER_PUBLISH_MAX = 8 + 2 + MAX_CYCLE_BYTES;
/** tag, seq, offset, bytes, flags, sha256, extent count. */
export const CHUNK_FIXED_BYTES = 4 + 8 + 8 + 4 + 1 + 32 + 4;
const CHUNK_EXTENT_BYTES = 12;
const NACK_FIXED = 4 + 8 + 1 + 8 + 2;
const COMMIT_BYTES = 8 + 8 + 32 + 8;
// LEB128 of a safe integer (< 2^53) takes at most 8 bytes.
const MAX_VARINT_BYTES = 8;

/** Largest payload a frame of this type may have; checked before anything of it is buffered. */
export function maxPayload(type: FrameType, maxChunkBytes = MAX_CHUNK_BYTES): number {
  switch (type) {
    case 'hello':
      // One question at most (the decoder refuses two): the largest is the recover question.
      return (
        HELLO_FIXED +
        Math.max(HELLO_CHECK_BYTES, 2 + MAX_TEXT_BYTES, HELLO_PUBLISHED_BYTES, HELLO_RECOVER_MAX) +
        MAX_CYCLE_BYTES +
        MAX_DISK_NAME_BYTES
      );
    case 'welcome':
      return WELCOME_BYTES;
    case 'chunk':
      return CHUNK_FIXED_BYTES + CHUNK_EXTENT_BYTES * MAX_CHUNK_EXTENTS + maxChunkBytes;
    case 'ack':
      return 4 + 8 + 8;
    case 'nack':
      return NACK_FIXED + MAX_TEXT_BYTES;
    case 'want':
    case 'release':
      return 12;
    case 'grant':
      return 16;
    case 'extents':
      return 4 + 2 * MAX_VARINT_BYTES * MAX_EXTENTS_PER_FRAME;
    case 'commit':
      return COMMIT_BYTES;
    case 'committed':
      return 2 + MAX_TEXT_BYTES;
    case 'after-publish':
      return AFTER_PUBLISH_MAX;
    case 'pruned':
      return PRUNED_MAX;
    case 'recovery':
      return RECOVERY_MAX;
    case 'image-data':
      return IMAGE_DATA_FIXED + MAX_IMAGE_DATA_BYTES;
    case 'image-end':
      return 16;
    case 'done':
    case 'close':
    case 'flush':
    case 'flushed':
      return 0;
    case 'conn-closed':
      return 4 + 8;
    case 'checked':
      return CHECKED_FIXED + MAX_TEXT_BYTES;
    case 'verified':
      return VERIFIED_MAX;
    case 'error':
      return 1 + 2 + MAX_TEXT_BYTES;
  }
}

// ---- Field helpers ----

class Writer {
  private at = FRAME_HEADER_BYTES;
  private readonly buf: Buffer;

  /** A frame whose header says `length` payload bytes; `written` of them go into this buffer. */
  constructor(type: FrameType, length: number, written = length) {
    this.buf = Buffer.allocUnsafe(FRAME_HEADER_BYTES + written);
    this.buf.writeUInt32BE(length, 0);
    this.buf.writeUInt8(FRAME_TYPES[type], 4);
  }

  u8(n: number): void {
    this.buf.writeUInt8(n, this.at);
    this.at += 1;
  }
  u16(n: number): void {
    this.buf.writeUInt16BE(n, this.at);
    this.at += 2;
  }
  u32(n: number): void {
    this.buf.writeUInt32BE(n, this.at);
    this.at += 4;
  }
  u64(n: number, what: string): void {
    if (!Number.isSafeInteger(n) || n < 0) fail(`${what} ${n} is not a whole number of bytes below 2^53`);
    this.buf.writeUInt32BE(Math.floor(n / 2 ** 32), this.at);
    this.buf.writeUInt32BE(n % 2 ** 32, this.at + 4);
    this.at += 8;
  }
  bytes(b: Uint8Array): void {
    this.buf.set(b, this.at);
    this.at += b.length;
  }
  varint(n: number): void {
    // Arithmetic, not bit operators: those truncate to 32 bits.
    while (n >= 0x80) {
      this.buf[this.at++] = (n % 0x80) | 0x80;
      n = Math.floor(n / 0x80);
    }
    this.buf[this.at++] = n;
  }
  done(): Buffer {
    if (this.at !== this.buf.length) {
      // The payload sizes are computed from the same fields: a mismatch is a bug here, not the peer's.
      throw new Error(`frame encoder wrote ${this.at} of ${this.buf.length} bytes`);
    }
    return this.buf;
  }
}

class Reader {
  at = 0;
  constructor(
    private readonly buf: Buffer,
    private readonly what: string,
  ) {}
  need(n: number, field: string): void {
    if (this.at + n > this.buf.length) {
      fail(
        `${this.what} frame truncated: ${field} needs ${n} bytes at ${this.at}, payload has ${this.buf.length}`,
      );
    }
  }
  u8(field: string): number {
    this.need(1, field);
    return this.buf.readUInt8(this.at++);
  }
  u16(field: string): number {
    this.need(2, field);
    const v = this.buf.readUInt16BE(this.at);
    this.at += 2;
    return v;
  }
  u32(field: string): number {
    this.need(4, field);
    const v = this.buf.readUInt32BE(this.at);
    this.at += 4;
    return v;
  }
  u64(field: string): number {
    this.need(8, field);
    const hi = this.buf.readUInt32BE(this.at);
    const lo = this.buf.readUInt32BE(this.at + 4);
    this.at += 8;
    if (hi >= 2 ** 21) fail(`${this.what} frame: ${field} does not fit in 53 bits`);
    return hi * 2 ** 32 + lo;
  }
  bytes(n: number, field: string): Buffer {
    this.need(n, field);
    const v = this.buf.subarray(this.at, this.at + n);
    this.at += n;
    return v;
  }
  text(field: string, max: number): string {
    const n = this.u16(`${field} length`);
    if (n > max) fail(`${this.what} frame: ${field} of ${n} bytes exceeds ${max}`);
    const raw = this.bytes(n, field);
    const s = raw.toString('utf8');
    // Names become file names and messages; a lossy decode would make them lie.
    if (!Buffer.from(s, 'utf8').equals(raw)) fail(`${this.what} frame: ${field} is not valid UTF-8`);
    return s;
  }
  varint(field: string): number {
    let value = 0;
    let scale = 1;
    for (let i = 0; i < MAX_VARINT_BYTES; i++) {
      this.need(1, field);
      const b = this.buf[this.at++]!;
      value += (b & 0x7f) * scale;
      if ((b & 0x80) === 0) {
        if (!Number.isSafeInteger(value)) fail(`${this.what} frame: ${field} does not fit in 53 bits`);
        return value;
      }
      scale *= 0x80;
    }
    return fail(`${this.what} frame: ${field} varint is longer than ${MAX_VARINT_BYTES} bytes`);
  }
  end(): void {
    if (this.at !== this.buf.length) {
      fail(`${this.what} frame has ${this.buf.length - this.at} trailing bytes after its last field`);
    }
  }
}

const textBytes = (s: string, max: number): Buffer => {
  let b = Buffer.from(s, 'utf8');
  if (b.length <= max) return b;
  // Cut on a character boundary so the receiver's UTF-8 check passes.
  let cut = s.slice(0, max);
  for (b = Buffer.from(cut, 'utf8'); b.length > max; b = Buffer.from(cut, 'utf8')) cut = cut.slice(0, -1);
  return b;
};

const HEX_RE = /^[0-9a-f]*$/;
function hexBytes(hex: string, n: number, what: string): Buffer {
  if (hex.length !== 2 * n || !HEX_RE.test(hex)) fail(`${what} must be ${n} bytes of lowercase hex`);
  return Buffer.from(hex, 'hex');
}

/**
 * The ERROR text for a peer of another protocol version, read by `reader` ('node' reads HELLOs,
 * 'source' reads WELCOMEs): which version each side speaks and which side to upgrade.
 */
function versionMismatch(reader: 'node' | 'source', version: number): string {
  const frame = reader === 'node' ? 'HELLO' : 'WELCOME';
  const peer = reader === 'node' ? 'source' : 'node';
  const older = version < PROTOCOL_VERSION ? peer : reader;
  return (
    `${frame} frame: the ${peer} speaks Ferry protocol version ${version}, this ${reader} speaks version ` +
    `${PROTOCOL_VERSION}: upgrade ferry on the ${older}`
  );
}

/**
 * SHA-256 (hex) of a chunk's layout: its extents as big-endian u64 offset and length pairs. The node
 * records it per chunk, so it can check at COMMIT that the chunks cover exactly the EXTENTS, and a
 * resume check covers where the chunks lie as well as what they hold.
 */
export function chunkLayoutSha256(extents: readonly Extent[]): string {
  const hash = new LayoutHash();
  for (const e of extents) hash.piece(e.offset, e.length);
  return hash.hex();
}

/** `chunkLayoutSha256` fed one extent at a time. */
export class LayoutHash {
  private readonly hash = createHash('sha256');
  private readonly pair = Buffer.alloc(16);

  piece(offset: number, length: number): void {
    this.pair.writeUInt32BE(Math.floor(offset / 2 ** 32), 0);
    this.pair.writeUInt32BE(offset % 2 ** 32, 4);
    this.pair.writeUInt32BE(Math.floor(length / 2 ** 32), 8);
    this.pair.writeUInt32BE(length % 2 ** 32, 12);
    this.hash.update(this.pair);
  }

  hex(): string {
    return this.hash.digest('hex');
  }
}

/** Why a disk name cannot name an image in the node's target directory, or undefined if it can. */
export function diskNameProblem(name: string): string | undefined {
  if (name === '') return 'is empty';
  if (Buffer.byteLength(name, 'utf8') > MAX_DISK_NAME_BYTES)
    return `is longer than ${MAX_DISK_NAME_BYTES} bytes`;
  if (name.includes('/') || name.includes('\\')) return 'contains a path separator';
  if (name.includes('..')) return 'contains ".."';
  if (name === '.') return 'is "."';
  // Control characters make file names that operators cannot type and logs that lie.
  for (const ch of name)
    if (ch.charCodeAt(0) < 0x20 || ch.charCodeAt(0) === 0x7f) return 'contains a control character';
  // The file target keeps `<image>.ferry-staging` and `<image>.ferry-manifest` beside each image.
  if (name.includes('.ferry-')) return 'contains ".ferry-", which names the node\'s own staging files';
  return undefined;
}

/** Checks a chunk's extents against its own fields: sorted, disjoint, non-empty, summing to `bytes`. */
function checkChunkExtents(meta: ChunkMeta, maxChunkBytes: number): void {
  const what = `CHUNK seq ${meta.seq}`;
  if (meta.bytes === 0) fail(`${what} carries no data`);
  if (meta.bytes > maxChunkBytes)
    fail(`${what} of ${meta.bytes} bytes exceeds the ${maxChunkBytes}-byte chunk limit`);
  const first = meta.extents[0];
  if (first === undefined) fail(`${what} has no extents`);
  if (first!.offset !== meta.offset)
    fail(`${what}: offset ${meta.offset} is not its first extent's ${first!.offset}`);
  let end = -1;
  let sum = 0;
  for (const e of meta.extents) {
    if (e.length === 0) fail(`${what}: empty extent at offset ${e.offset}`);
    if (e.offset < end) fail(`${what}: extent at offset ${e.offset} overlaps or precedes the previous one`);
    end = e.offset + e.length;
    if (!Number.isSafeInteger(end)) fail(`${what}: extent at offset ${e.offset} ends beyond 2^53`);
    sum += e.length;
  }
  if (sum !== meta.bytes) fail(`${what}: extents hold ${sum} bytes but the chunk says ${meta.bytes}`);
  if (end - meta.offset > maxChunkBytes)
    fail(`${what} spans ${end - meta.offset} bytes, over the chunk limit`);
}

// ---- Encoding ----

/** The frame header and metadata of a CHUNK; its data follows on the wire (written separately, no copy). */
export function encodeChunkHead(meta: ChunkMeta, maxChunkBytes = MAX_CHUNK_BYTES): Buffer {
  checkChunkExtents(meta, maxChunkBytes);
  if (meta.extents.length > MAX_CHUNK_EXTENTS) {
    fail(`CHUNK seq ${meta.seq} has ${meta.extents.length} extents, over the ${MAX_CHUNK_EXTENTS} limit`);
  }
  const metaBytes = CHUNK_FIXED_BYTES + CHUNK_EXTENT_BYTES * meta.extents.length;
  const w = new Writer('chunk', metaBytes + meta.bytes, metaBytes);
  w.u32(meta.tag);
  w.u64(meta.seq, 'seq');
  w.u64(meta.offset, 'offset');
  w.u32(meta.bytes);
  w.u8(meta.waited ? 1 : 0);
  w.bytes(hexBytes(meta.sha256, 32, 'sha256'));
  w.u32(meta.extents.length);
  for (const e of meta.extents) {
    w.u64(e.offset, 'extent offset');
    w.u32(e.length);
  }
  return w.done();
}

/** Encodes one frame as the bytes that go on the wire. */
export function encodeFrame(frame: Frame): Buffer {
  switch (frame.type) {
    case 'hello': {
      const name = Buffer.from(frame.disk, 'utf8');
      const problem = diskNameProblem(frame.disk);
      if (problem) fail(`disk name "${frame.disk}" ${problem}`);
      const cycle = Buffer.from(frame.cycle, 'utf8');
      if (cycle.length > MAX_CYCLE_BYTES)
        fail(`cycle id of ${cycle.length} bytes exceeds ${MAX_CYCLE_BYTES}`);
      const check = frame.check;
      const verify = frame.verify === undefined ? undefined : Buffer.from(frame.verify, 'utf8');
      if (verify !== undefined && verify.length > MAX_TEXT_BYTES) {
        fail(`verified reference of ${verify.length} bytes exceeds ${MAX_TEXT_BYTES}`);
      }
      const published = frame.published;
      const recover = frame.recover === undefined ? undefined : recoverBytes(frame.recover);
      const questions = [check, verify, published, recover].filter((q) => q !== undefined).length;
      if (questions > 1) fail('a HELLO asks one question at most (check, verify, published or recover)');
      const w = new Writer(
        'hello',
        HELLO_FIXED +
          (check ? HELLO_CHECK_BYTES : 0) +
          (verify ? 2 + verify.length : 0) +
          (published ? HELLO_PUBLISHED_BYTES : 0) +
          (recover?.length ?? 0) +
          cycle.length +
          name.length,
      );
      w.bytes(Buffer.from(MAGIC, 'ascii'));
      w.u16(frame.version);
      w.u8(frame.kind === 'full' ? 0 : 1);
      w.u8(
        (frame.resume ? HELLO_RESUME : 0) |
          (check ? HELLO_CHECK : 0) |
          (verify ? HELLO_VERIFY : 0) |
          (published ? HELLO_PUBLISHED : 0) |
          (recover ? HELLO_RECOVER : 0),
      );
      w.u64(frame.sizeBytes, 'disk size');
      w.bytes(hexBytes(frame.session, SESSION_ID_BYTES, 'session'));
      w.bytes(hexBytes(frame.token, TOKEN_BYTES, 'resume token'));
      if (check) {
        w.u64(check.chunks, 'checked chunks');
        w.bytes(hexBytes(check.aggregateSha256, 32, 'checked aggregate'));
        w.bytes(hexBytes(check.layoutSha256, 32, 'checked layout'));
      }
      if (verify) {
        w.u16(verify.length);
        w.bytes(verify);
      }
      if (published) {
        w.u64(published.sequence, 'published sequence');
        w.u64(published.keepFrom, 'kept from');
      }
      if (recover) w.bytes(recover);
      w.u16(cycle.length);
      w.bytes(cycle);
      w.u16(name.length);
      w.bytes(name);
      return w.done();
    }
    case 'welcome': {
      const w = new Writer('welcome', WELCOME_BYTES);
      w.u16(frame.version);
      w.u32(frame.blockSize);
      w.u32(frame.maxChunkBytes);
      w.bytes(hexBytes(frame.incarnation, INCARNATION_BYTES, 'incarnation'));
      w.u32(frame.conn);
      w.u8(frame.joined ? 1 : 0);
      w.u64(frame.granted, 'granted');
      w.u64(frame.window, 'window');
      w.bytes(hexBytes(frame.token, TOKEN_BYTES, 'resume token'));
      return w.done();
    }
    case 'chunk': {
      if (frame.data.length !== frame.bytes) {
        fail(`CHUNK seq ${frame.seq} carries ${frame.data.length} bytes of data but says ${frame.bytes}`);
      }
      return Buffer.concat([encodeChunkHead(frame), frame.data]);
    }
    case 'ack': {
      const w = new Writer('ack', 20);
      w.u32(frame.tag);
      w.u64(frame.seq, 'seq');
      w.u64(frame.granted, 'granted');
      return w.done();
    }
    case 'nack': {
      const reason = textBytes(frame.reason, MAX_TEXT_BYTES);
      const w = new Writer('nack', NACK_FIXED + reason.length);
      w.u32(frame.tag);
      w.u64(frame.seq, 'seq');
      w.u8(NACK_CODES.indexOf(frame.code) + 1);
      w.u64(frame.granted, 'granted');
      w.u16(reason.length);
      w.bytes(reason);
      return w.done();
    }
    case 'want':
    case 'release': {
      const w = new Writer(frame.type, 12);
      w.u64(frame.bytes, 'bytes');
      w.u32(frame.order);
      return w.done();
    }
    case 'grant': {
      const w = new Writer('grant', 16);
      w.u64(frame.granted, 'granted');
      w.u64(frame.window, 'window');
      return w.done();
    }
    case 'extents': {
      if (frame.extents.length > MAX_EXTENTS_PER_FRAME) {
        fail(`EXTENTS frame of ${frame.extents.length} extents exceeds ${MAX_EXTENTS_PER_FRAME}`);
      }
      // Gap from the previous extent's end (the first from 0), then length: small numbers, short varints.
      let size = 4;
      let end = 0;
      for (const e of frame.extents) {
        if (e.offset < end || e.length <= 0)
          fail(`EXTENTS must be sorted, disjoint and non-empty (offset ${e.offset})`);
        size += varintSize(e.offset - end) + varintSize(e.length);
        end = e.offset + e.length;
      }
      const w = new Writer('extents', size);
      w.u32(frame.extents.length);
      end = 0;
      for (const e of frame.extents) {
        w.varint(e.offset - end);
        w.varint(e.length);
        end = e.offset + e.length;
      }
      return w.done();
    }
    case 'commit': {
      const w = new Writer('commit', COMMIT_BYTES);
      w.u64(frame.chunks, 'chunks');
      w.u64(frame.bytes, 'bytes');
      w.bytes(hexBytes(frame.aggregateSha256, 32, 'aggregate sha256'));
      w.u64(frame.extentCount, 'extent count');
      return w.done();
    }
    case 'committed': {
      const ref = Buffer.from(frame.targetRef, 'utf8');
      if (ref.length > MAX_TEXT_BYTES)
        fail(`target reference of ${ref.length} bytes exceeds ${MAX_TEXT_BYTES}`);
      const w = new Writer('committed', 2 + ref.length);
      w.u16(ref.length);
      w.bytes(ref);
      return w.done();
    }
    case 'after-publish': {
      const id = Buffer.from(frame.checkpoint, 'utf8');
      if (id.length > MAX_CYCLE_BYTES) fail(`checkpoint id of ${id.length} bytes exceeds ${MAX_CYCLE_BYTES}`);
      if ((frame.sequence === 0) !== (id.length === 0))
        fail('AFTER_PUBLISH names a checkpoint by both its id and its sequence, or neither');
      const w = new Writer('after-publish', 8 + 2 + id.length);
      w.u64(frame.sequence, 'sequence');
      w.u16(id.length);
      w.bytes(id);
      return w.done();
    }
    case 'pruned': {
      if (frame.sequences.length > MAX_PRUNED_LISTED || frame.sequences.length > frame.count) {
        fail(
          `PRUNED lists ${frame.sequences.length} of ${frame.count} sequences (at most ${MAX_PRUNED_LISTED})`,
        );
      }
      const reason = textBytes(frame.reason, MAX_TEXT_BYTES);
      const w = new Writer('pruned', 1 + 4 + 2 + 8 * frame.sequences.length + 2 + reason.length);
      w.u8(frame.ok ? 1 : 0);
      w.u32(frame.count);
      w.u16(frame.sequences.length);
      for (const seq of frame.sequences) w.u64(seq, 'pruned sequence');
      w.u16(reason.length);
      w.bytes(reason);
      return w.done();
    }
    case 'recovery': {
      const reason = textBytes(frame.reason, MAX_TEXT_BYTES);
      const message = textBytes(frame.message, MAX_TEXT_BYTES);
      const w = new Writer('recovery', 1 + 8 + 2 + reason.length + 2 + message.length);
      w.u8(frame.ok ? 1 : 0);
      w.u64(frame.sizeBytes, 'disk size');
      w.u16(reason.length);
      w.bytes(reason);
      w.u16(message.length);
      w.bytes(message);
      return w.done();
    }
    case 'image-data': {
      if (frame.data.length === 0 || frame.data.length > MAX_IMAGE_DATA_BYTES) {
        fail(`IMAGE_DATA of ${frame.data.length} bytes (1..${MAX_IMAGE_DATA_BYTES})`);
      }
      const w = new Writer('image-data', IMAGE_DATA_FIXED + frame.data.length);
      w.u8(frame.part === 'manifest' ? 0 : 1);
      w.u64(frame.offset, 'data offset');
      w.bytes(hexBytes(frame.sha256, 32, 'data sha256'));
      w.bytes(frame.data);
      return w.done();
    }
    case 'image-end': {
      const w = new Writer('image-end', 16);
      w.u64(frame.frames, 'frames');
      w.u64(frame.bytes, 'bytes');
      return w.done();
    }
    case 'done':
    case 'close':
    case 'flush':
    case 'flushed':
      return new Writer(frame.type, 0).done();
    case 'verified': {
      if (frame.mismatches.length > MAX_VERIFY_MISMATCHES) {
        fail(`VERIFIED frame of ${frame.mismatches.length} mismatches exceeds ${MAX_VERIFY_MISMATCHES}`);
      }
      const ref = textBytes(frame.manifestRef, MAX_TEXT_BYTES);
      const reason = textBytes(frame.reason, MAX_TEXT_BYTES);
      const w = new Writer(
        'verified',
        1 + 8 + 1 + 8 * frame.mismatches.length + 2 + ref.length + 2 + reason.length,
      );
      w.u8(frame.ok ? 1 : 0);
      w.u64(frame.regions, 'regions');
      w.u8(frame.mismatches.length);
      for (const m of frame.mismatches) w.u64(m, 'mismatch offset');
      w.u16(ref.length);
      w.bytes(ref);
      w.u16(reason.length);
      w.bytes(reason);
      return w.done();
    }
    case 'checked': {
      const reason = textBytes(frame.reason, MAX_TEXT_BYTES);
      const w = new Writer('checked', CHECKED_FIXED + reason.length);
      w.u8(frame.held ? 1 : 0);
      w.bytes(hexBytes(frame.token, TOKEN_BYTES, 'resume token'));
      w.u16(reason.length);
      w.bytes(reason);
      return w.done();
    }
    case 'conn-closed': {
      const w = new Writer('conn-closed', 12);
      w.u32(frame.conn);
      w.u64(frame.admitted, 'admitted');
      return w.done();
    }
    case 'error': {
      const reason = textBytes(frame.reason, MAX_TEXT_BYTES);
      const w = new Writer('error', 3 + reason.length);
      w.u8(frame.retryable ? 1 : 0);
      w.u16(reason.length);
      w.bytes(reason);
      return w.done();
    }
  }
}

/** A recover question's bytes (after the HELLO's fixed part); refuses what a node would refuse. */
function recoverBytes(ask: RecoveryAsk): Buffer {
  const ref = Buffer.from(ask.targetRef, 'utf8');
  if (ref.length > MAX_TEXT_BYTES)
    fail(`recovered reference of ${ref.length} bytes exceeds ${MAX_TEXT_BYTES}`);
  if (ask.later.length > MAX_RECOVERY_LATER) {
    fail(`a recover question names ${ask.later.length} later checkpoints, more than ${MAX_RECOVERY_LATER}`);
  }
  const ids = ask.later.map((c) => Buffer.from(c.id, 'utf8'));
  const size = 1 + 8 + 2 + ref.length + 2 + ids.reduce((n, id) => n + 8 + 2 + id.length, 0);
  const w = new Writer('hello', size);
  w.u8(RECOVERY_MODES.indexOf(ask.mode));
  w.u64(ask.sequence, 'recovered sequence');
  w.u16(ref.length);
  w.bytes(ref);
  w.u16(ask.later.length);
  let previous = ask.sequence;
  for (const [i, c] of ask.later.entries()) {
    if (c.sequence <= previous) fail(`later checkpoint ${c.id}: sequences must ascend past ${previous}`);
    previous = c.sequence;
    const id = ids[i]!;
    if (id.length === 0 || id.length > MAX_CYCLE_BYTES) fail(`later checkpoint id of ${id.length} bytes`);
    w.u64(c.sequence, 'later sequence');
    w.u16(id.length);
    w.bytes(id);
  }
  return w.done().subarray(FRAME_HEADER_BYTES);
}

function varintSize(n: number): number {
  let size = 1;
  while (n >= 0x80) {
    n = Math.floor(n / 0x80);
    size++;
  }
  return size;
}

/** Splits a change map into EXTENTS frames of at most MAX_EXTENTS_PER_FRAME extents each. */
export function* extentBatches(extents: readonly Extent[]): Generator<FrameOf<'extents'>> {
  for (let i = 0; i < extents.length; i += MAX_EXTENTS_PER_FRAME) {
    yield { type: 'extents', extents: extents.slice(i, i + MAX_EXTENTS_PER_FRAME) };
  }
}

// ---- Decoding ----

/** Decodes the payload of a non-CHUNK frame (CHUNKs are decoded in two steps by the reader). */
export function decodePayload(type: Exclude<FrameType, 'chunk'>, payload: Buffer): Frame {
  const r = new Reader(payload, label(type));
  let frame: Frame;
  switch (type) {
    case 'hello': {
      const magic = r.bytes(MAGIC.length, 'magic').toString('latin1');
      if (magic !== MAGIC) fail(`HELLO frame: bad magic "${magic}" (not a Ferry source)`);
      // Nothing after the version is read from another version's HELLO: its layout may differ.
      const version = r.u16('version');
      if (version !== PROTOCOL_VERSION) fail(versionMismatch('node', version));
      const kindCode = r.u8('kind');
      if (kindCode > 1) fail(`HELLO frame: unknown copy kind ${kindCode}`);
      const flags = r.u8('flags');
      if (flags > (HELLO_RESUME | HELLO_CHECK | HELLO_VERIFY | HELLO_PUBLISHED | HELLO_RECOVER))
        fail(`HELLO frame: unknown flags 0x${flags.toString(16)}`);
      const questions = HELLO_QUESTIONS.filter((q) => flags & q).length;
      if (questions > 1) fail(`HELLO frame: flags 0x${flags.toString(16)} ask more than one question`);
      const sizeBytes = r.u64('disk size');
      const session = r.bytes(SESSION_ID_BYTES, 'session').toString('hex');
      const token = r.bytes(TOKEN_BYTES, 'resume token').toString('hex');
      const check: ResumeCheck | undefined =
        flags & HELLO_CHECK
          ? {
              chunks: r.u64('checked chunks'),
              aggregateSha256: r.bytes(32, 'checked aggregate').toString('hex'),
              layoutSha256: r.bytes(32, 'checked layout').toString('hex'),
            }
          : undefined;
      const verify = flags & HELLO_VERIFY ? r.text('verified reference', MAX_TEXT_BYTES) : undefined;
      const published: PublishedNote | undefined =
        flags & HELLO_PUBLISHED
          ? { sequence: r.u64('published sequence'), keepFrom: r.u64('kept from') }
          : undefined;
      if (published !== undefined && published.sequence === 0)
        fail('HELLO frame: published sequence 0 (checkpoints count from 1)');
      if (published !== undefined && published.keepFrom > published.sequence)
        fail(
          `HELLO frame: kept from ${published.keepFrom}, past the published sequence ${published.sequence}`,
        );
      const recover = flags & HELLO_RECOVER ? readRecoverAsk(r) : undefined;
      const cycle = r.text('cycle id', MAX_CYCLE_BYTES);
      const disk = r.text('disk name', MAX_DISK_NAME_BYTES);
      frame = {
        type,
        version,
        disk,
        sizeBytes,
        kind: kindCode === 0 ? 'full' : 'incremental',
        resume: (flags & HELLO_RESUME) !== 0,
        session,
        token,
        cycle,
        ...(check ? { check } : {}),
        ...(verify === undefined ? {} : { verify }),
        ...(published ? { published } : {}),
        ...(recover ? { recover } : {}),
      };
      if ((published || recover) && cycle === '')
        fail(`HELLO frame: a ${published ? 'published' : 'recover'} question names no checkpoint (cycle id)`);
      break;
    }
    case 'welcome': {
      const version = r.u16('version');
      if (version !== PROTOCOL_VERSION) fail(versionMismatch('source', version));
      const blockSize = r.u32('block size');
      const maxChunkBytes = r.u32('max chunk');
      const incarnation = r.bytes(INCARNATION_BYTES, 'incarnation').toString('hex');
      const conn = r.u32('connection id');
      const flags = r.u8('flags');
      if (flags > 1) fail(`WELCOME frame: unknown flags 0x${flags.toString(16)}`);
      frame = {
        type,
        version,
        blockSize,
        maxChunkBytes,
        incarnation,
        conn,
        joined: flags === 1,
        granted: r.u64('granted'),
        window: r.u64('window'),
        token: r.bytes(TOKEN_BYTES, 'resume token').toString('hex'),
      };
      break;
    }
    case 'ack':
      frame = { type, tag: r.u32('tag'), seq: r.u64('seq'), granted: r.u64('granted') };
      break;
    case 'nack': {
      const tag = r.u32('tag');
      const seq = r.u64('seq');
      const codeByte = r.u8('code');
      const code = NACK_CODES[codeByte - 1];
      if (code === undefined) fail(`NACK frame: unknown code ${codeByte}`);
      frame = {
        type,
        tag,
        seq,
        code: code!,
        granted: r.u64('granted'),
        reason: r.text('reason', MAX_TEXT_BYTES),
      };
      break;
    }
    case 'want':
    case 'release':
      frame = { type, bytes: r.u64('bytes'), order: r.u32('order') };
      break;
    case 'grant':
      frame = { type, granted: r.u64('granted'), window: r.u64('window') };
      break;
    case 'extents': {
      const count = r.u32('count');
      if (count > MAX_EXTENTS_PER_FRAME)
        fail(`EXTENTS frame of ${count} extents exceeds ${MAX_EXTENTS_PER_FRAME}`);
      const extents: Extent[] = [];
      let end = 0;
      for (let i = 0; i < count; i++) {
        const offset = end + r.varint('extent gap');
        const length = r.varint('extent length');
        if (length === 0) fail(`EXTENTS frame: empty extent at offset ${offset}`);
        end = offset + length;
        if (!Number.isSafeInteger(end)) fail(`EXTENTS frame: extent at offset ${offset} ends beyond 2^53`);
        extents.push({ offset, length });
      }
      frame = { type, extents };
      break;
    }
    case 'commit':
      frame = {
        type,
        chunks: r.u64('chunks'),
        bytes: r.u64('bytes'),
        aggregateSha256: r.bytes(32, 'aggregate sha256').toString('hex'),
        extentCount: r.u64('extent count'),
      };
      break;
    case 'committed':
      frame = { type, targetRef: r.text('target reference', MAX_TEXT_BYTES) };
      break;
    case 'after-publish': {
      const sequence = r.u64('sequence');
      const checkpoint = r.text('checkpoint id', MAX_CYCLE_BYTES);
      if ((sequence === 0) !== (checkpoint === '')) {
        fail('AFTER_PUBLISH frame: checkpoint id and sequence must be given together (or neither)');
      }
      frame = { type, checkpoint, sequence };
      break;
    }
    case 'pruned': {
      const ok = r.u8('ok');
      if (ok > 1) fail(`PRUNED frame: unknown ok value ${ok}`);
      const count = r.u32('count');
      const listed = r.u16('listed count');
      if (listed > MAX_PRUNED_LISTED || listed > count)
        fail(`PRUNED frame lists ${listed} of ${count} sequences (at most ${MAX_PRUNED_LISTED})`);
      const sequences: number[] = [];
      for (let i = 0; i < listed; i++) sequences.push(r.u64('pruned sequence'));
      frame = { type, ok: ok === 1, count, sequences, reason: r.text('reason', MAX_TEXT_BYTES) };
      break;
    }
    case 'recovery': {
      const ok = r.u8('ok');
      if (ok > 1) fail(`RECOVERY frame: unknown ok value ${ok}`);
      frame = {
        type,
        ok: ok === 1,
        sizeBytes: r.u64('disk size'),
        reason: r.text('reason', MAX_TEXT_BYTES),
        message: r.text('message', MAX_TEXT_BYTES),
      };
      break;
    }
    case 'image-data': {
      const part = r.u8('part');
      if (part > 1) fail(`IMAGE_DATA frame: unknown part ${part}`);
      const offset = r.u64('data offset');
      const sha256 = r.bytes(32, 'data sha256').toString('hex');
      const data = r.bytes(payload.length - r.at, 'data');
      if (data.length === 0) fail('IMAGE_DATA frame carries no data');
      frame = { type, part: part === 0 ? 'manifest' : 'image', offset, sha256, data };
      break;
    }
    case 'image-end':
      frame = { type, frames: r.u64('frames'), bytes: r.u64('bytes') };
      break;
    case 'done':
    case 'close':
    case 'flush':
    case 'flushed':
      frame = { type };
      break;
    case 'verified': {
      const ok = r.u8('ok');
      if (ok > 1) fail(`VERIFIED frame: unknown ok value ${ok}`);
      const regions = r.u64('regions');
      const count = r.u8('mismatch count');
      if (count > MAX_VERIFY_MISMATCHES)
        fail(`VERIFIED frame of ${count} mismatches exceeds ${MAX_VERIFY_MISMATCHES}`);
      const mismatches: number[] = [];
      for (let i = 0; i < count; i++) mismatches.push(r.u64('mismatch offset'));
      frame = {
        type,
        ok: ok === 1,
        regions,
        mismatches,
        manifestRef: r.text('manifest reference', MAX_TEXT_BYTES),
        reason: r.text('reason', MAX_TEXT_BYTES),
      };
      break;
    }
    case 'checked': {
      const held = r.u8('held');
      if (held > 1) fail(`CHECKED frame: unknown held value ${held}`);
      frame = {
        type,
        held: held === 1,
        token: r.bytes(TOKEN_BYTES, 'resume token').toString('hex'),
        reason: r.text('reason', MAX_TEXT_BYTES),
      };
      break;
    }
    case 'conn-closed':
      frame = { type, conn: r.u32('connection id'), admitted: r.u64('admitted') };
      break;
    case 'error': {
      const flags = r.u8('flags');
      if (flags > 1) fail(`ERROR frame: unknown flags 0x${flags.toString(16)}`);
      frame = { type, retryable: flags === 1, reason: r.text('reason', MAX_TEXT_BYTES) };
      break;
    }
  }
  r.end();
  return frame;
}

/** A recover question, after the HELLO's fixed part: mode, checkpoint, and its successors. */
function readRecoverAsk(r: Reader): RecoveryAsk {
  const code = r.u8('recovery mode');
  const mode = RECOVERY_MODES[code];
  if (mode === undefined) fail(`HELLO frame: unknown recovery mode ${code}`);
  const sequence = r.u64('recovered sequence');
  if (sequence === 0) fail('HELLO frame: recovered sequence 0 (checkpoints count from 1)');
  const targetRef = r.text('recovered reference', MAX_TEXT_BYTES);
  const count = r.u16('later count');
  if (count > MAX_RECOVERY_LATER)
    fail(`HELLO frame: ${count} later checkpoints exceed ${MAX_RECOVERY_LATER}`);
  const later: { sequence: number; id: string }[] = [];
  let previous = sequence;
  for (let i = 0; i < count; i++) {
    const seq = r.u64('later sequence');
    if (seq <= previous)
      fail(`HELLO frame: later checkpoint ${i} has sequence ${seq}, not above ${previous}`);
    previous = seq;
    const id = r.text('later checkpoint id', MAX_CYCLE_BYTES);
    if (id === '') fail(`HELLO frame: later checkpoint ${i} has an empty id`);
    later.push({ sequence: seq, id });
  }
  return { mode: mode!, sequence, targetRef, later };
}

/** Reads the fixed part of a CHUNK's metadata; returns the extent count that follows. */
function decodeChunkFixed(r: Reader): Omit<ChunkMeta, 'extents'> & { count: number } {
  const tag = r.u32('tag');
  const seq = r.u64('seq');
  const offset = r.u64('offset');
  const bytes = r.u32('bytes');
  const flags = r.u8('flags');
  if (flags > 1) fail(`CHUNK frame: unknown flags 0x${flags.toString(16)}`);
  const sha256 = r.bytes(32, 'sha256').toString('hex');
  const count = r.u32('extent count');
  return { tag, seq, offset, bytes, waited: flags === 1, sha256, count };
}

// ---- Incremental reading ----

export interface FrameReaderOptions {
  /** Who sends the bytes: frames that only the other side may send are refused. */
  readonly from: 'source' | 'node';
  /** Called for every complete, valid frame, in order. Throwing stops the reader (and propagates). */
  readonly onFrame: (frame: Frame) => void;
  /**
   * Called with a CHUNK's metadata as soon as it has arrived, before any of the chunk's data is
   * buffered: where a node checks and reserves credit. Throwing refuses the chunk.
   */
  readonly admitChunk?: (meta: ChunkMeta) => void;
  /** Chunk size limit of this peer (default MAX_CHUNK_BYTES). */
  readonly maxChunkBytes?: number;
}

type ReadState =
  | { readonly kind: 'header' }
  | { readonly kind: 'body'; readonly type: Exclude<FrameType, 'chunk'>; readonly length: number }
  | { readonly kind: 'chunk-fixed'; readonly length: number }
  | {
      readonly kind: 'chunk-extents';
      readonly length: number;
      readonly fixed: Omit<ChunkMeta, 'extents'> & { count: number };
    }
  | { readonly kind: 'chunk-data'; readonly meta: ChunkMeta; readonly data: Buffer; at: number };

/**
 * Turns a stream of received buffers into frames. Memory: the bytes of one incomplete frame, never
 * more than `maxPayload` of its type, and a CHUNK's data only after `admitChunk` accepted it.
 * After any error the reader is dead: later bytes are ignored (the connection is being closed).
 */
export class FrameReader {
  private readonly queue = new ByteQueue();
  private state: ReadState = { kind: 'header' };
  private failure: Error | undefined;
  private readonly maxChunkBytes: number;

  constructor(private readonly opts: FrameReaderOptions) {
    this.maxChunkBytes = opts.maxChunkBytes ?? MAX_CHUNK_BYTES;
  }

  /** Feeds received bytes; calls `onFrame` for each frame they complete. Throws ProtocolError on bad input. */
  push(buf: Buffer): void {
    if (this.failure !== undefined) return;
    this.queue.push(buf);
    try {
      while (this.step()) {}
    } catch (err) {
      this.failure = err instanceof Error ? err : new Error(String(err));
      throw err;
    }
  }

  /** Bytes held for the frame being received (including an admitted chunk's data buffer). */
  get buffered(): number {
    return this.queue.length + (this.state.kind === 'chunk-data' ? this.state.data.length : 0);
  }

  /** The admitted chunk whose data is still arriving, if any (freed if the stream ends first). */
  get partialChunk(): ChunkMeta | undefined {
    return this.state.kind === 'chunk-data' ? this.state.meta : undefined;
  }

  /** Describes a frame cut off by the end of the stream, or undefined if the stream ended between frames. */
  truncation(): string | undefined {
    const s = this.state;
    if (this.failure !== undefined) return undefined;
    if (s.kind === 'header') {
      return this.queue.length === 0
        ? undefined
        : `stream ended inside a frame header (${this.queue.length} of 5 bytes)`;
    }
    if (s.kind === 'chunk-data') {
      return `stream ended inside CHUNK seq ${s.meta.seq} (${s.at} of ${s.meta.bytes} data bytes)`;
    }
    const type = s.kind === 'body' ? label(s.type) : 'CHUNK';
    return `stream ended inside a ${type} frame (${this.queue.length} of ${s.length} bytes)`;
  }

  private step(): boolean {
    const s = this.state;
    switch (s.kind) {
      case 'header':
        return this.readHeader();
      case 'body': {
        if (this.queue.length < s.length) return false;
        const payload = this.queue.take(s.length);
        this.state = { kind: 'header' };
        this.opts.onFrame(decodePayload(s.type, payload));
        return true;
      }
      case 'chunk-fixed': {
        if (this.queue.length < CHUNK_FIXED_BYTES) return false;
        const fixed = decodeChunkFixed(new Reader(this.queue.take(CHUNK_FIXED_BYTES), 'CHUNK'));
        if (fixed.count > MAX_CHUNK_EXTENTS) {
          fail(`CHUNK seq ${fixed.seq} has ${fixed.count} extents, over the ${MAX_CHUNK_EXTENTS} limit`);
        }
        const expected = CHUNK_FIXED_BYTES + CHUNK_EXTENT_BYTES * fixed.count + fixed.bytes;
        if (expected !== s.length) {
          fail(
            `CHUNK seq ${fixed.seq}: frame length ${s.length} does not match its ${fixed.count} extents and ` +
              `${fixed.bytes} data bytes (${expected})`,
          );
        }
        this.state = { kind: 'chunk-extents', length: s.length, fixed };
        return true;
      }
      case 'chunk-extents': {
        const size = CHUNK_EXTENT_BYTES * s.fixed.count;
        if (this.queue.length < size) return false;
        const r = new Reader(this.queue.take(size), 'CHUNK');
        const extents: Extent[] = [];
        for (let i = 0; i < s.fixed.count; i++)
          extents.push({ offset: r.u64('extent offset'), length: r.u32('extent length') });
        const { count: _, ...fixed } = s.fixed;
        const meta: ChunkMeta = { ...fixed, extents };
        checkChunkExtents(meta, this.maxChunkBytes);
        this.opts.admitChunk?.(meta);
        // Allocated only now: the peer was granted these bytes.
        this.state = { kind: 'chunk-data', meta, data: Buffer.allocUnsafe(meta.bytes), at: 0 };
        return true;
      }
      case 'chunk-data': {
        const n = Math.min(this.queue.length, s.meta.bytes - s.at);
        if (n > 0) {
          this.queue.copyTo(s.data, s.at, n);
          s.at += n;
        }
        if (s.at < s.meta.bytes) return false;
        this.state = { kind: 'header' };
        this.opts.onFrame({ type: 'chunk', ...s.meta, data: s.data });
        return true;
      }
    }
  }

  private readHeader(): boolean {
    if (this.queue.length < FRAME_HEADER_BYTES) return false;
    const head = this.queue.take(FRAME_HEADER_BYTES);
    const length = head.readUInt32BE(0);
    const code = head.readUInt8(4);
    const type = TYPE_BY_CODE.get(code);
    if (type === undefined)
      fail(`unknown frame type 0x${code.toString(16).padStart(2, '0')} (length ${length})`);
    const t = type!;
    const sender = SENT_BY[t];
    if (sender !== 'both' && sender !== this.opts.from) {
      fail(`unexpected ${label(t)} frame from a ${this.opts.from} (only a ${sender} sends it)`);
    }
    const max = maxPayload(t, this.maxChunkBytes);
    if (length > max) fail(`${label(t)} frame of ${length} bytes exceeds the ${max}-byte maximum`);
    if (t === 'chunk') {
      if (length < CHUNK_FIXED_BYTES) fail(`CHUNK frame of ${length} bytes is shorter than its fixed fields`);
      this.state = { kind: 'chunk-fixed', length };
    } else {
      this.state = { kind: 'body', type: t, length };
    }
    return true;
  }
}
