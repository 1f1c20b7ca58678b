// NBD wire format (fixed newstyle handshake, transmission, structured replies): constants and frame codecs.
// Reference: the NBD protocol document, NetworkBlockDevice/nbd doc/proto.md. All integers are big-endian.

export const NBD_DEFAULT_PORT = 10809;

// Handshake magics.
export const NBDMAGIC = 0x4e42444d41474943n; // "NBDMAGIC"
export const IHAVEOPT = 0x49484156454f5054n; // "IHAVEOPT"
export const OPTION_REPLY_MAGIC = 0x3e889045565a9n;

// Transmission magics.
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

// Handshake flags (server) and client flags.
export const NBD_FLAG_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_NO_ZEROES = 1 << 1;
export const NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_C_NO_ZEROES = 1 << 1;

// Transmission flags (NBD_INFO_EXPORT).
export const NBD_FLAG_HAS_FLAGS = 1 << 0;
export const NBD_FLAG_READ_ONLY = 1 << 1;
export const NBD_FLAG_CAN_MULTI_CONN = 1 << 8;

// Options.
export const NBD_OPT_ABORT = 2;
export const NBD_OPT_GO = 7;
export const NBD_OPT_STRUCTURED_REPLY = 8;
export const NBD_OPT_SET_META_CONTEXT = 10;

// Option reply types; errors have bit 31 set.
export const NBD_REP_ACK = 1;
export const NBD_REP_INFO = 3;
export const NBD_REP_META_CONTEXT = 4;
export const NBD_REP_FLAG_ERROR = 2 ** 31;
export const NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR + 1;
export const NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR + 2;
export const NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR + 3;
export const NBD_REP_ERR_PLATFORM = NBD_REP_FLAG_ERROR + 4;
export const NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR + 5;
export const NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR + 6;
export const NBD_REP_ERR_SHUTDOWN = NBD_REP_FLAG_ERROR + 7;
export const NBD_REP_ERR_BLOCK_SIZE_REQD = NBD_REP_FLAG_ERROR + 8;
export const NBD_REP_ERR_TOO_BIG = NBD_REP_FLAG_ERROR + 9;

const OPTION_ERROR_NAMES: Record<number, string> = {
  [NBD_REP_ERR_UNSUP]: 'NBD_REP_ERR_UNSUP',
  [NBD_REP_ERR_POLICY]: 'NBD_REP_ERR_POLICY',
  [NBD_REP_ERR_INVALID]: 'NBD_REP_ERR_INVALID',
  [NBD_REP_ERR_PLATFORM]: 'NBD_REP_ERR_PLATFORM',
  [NBD_REP_ERR_TLS_REQD]: 'NBD_REP_ERR_TLS_REQD',
  [NBD_REP_ERR_UNKNOWN]: 'NBD_REP_ERR_UNKNOWN',
  [NBD_REP_ERR_SHUTDOWN]: 'NBD_REP_ERR_SHUTDOWN',
  [NBD_REP_ERR_BLOCK_SIZE_REQD]: 'NBD_REP_ERR_BLOCK_SIZE_REQD',
  [NBD_REP_ERR_TOO_BIG]: 'NBD_REP_ERR_TOO_BIG',
};

export const optionErrorName = (type: number): string =>
  OPTION_ERROR_NAMES[type] ?? `option error 0x${type.toString(16)}`;

// NBD_OPT_GO information types.
export const NBD_INFO_EXPORT = 0;
export const NBD_INFO_BLOCK_SIZE = 3;

// Commands, command flags, structured reply flags and types.
export const NBD_CMD_READ = 0;
export const NBD_CMD_DISC = 2;
export const NBD_CMD_BLOCK_STATUS = 7;
export const NBD_REPLY_FLAG_DONE = 1 << 0;
export const NBD_REPLY_TYPE_NONE = 0;
export const NBD_REPLY_TYPE_OFFSET_DATA = 1;
export const NBD_REPLY_TYPE_OFFSET_HOLE = 2;
export const NBD_REPLY_TYPE_BLOCK_STATUS = 5;
export const NBD_REPLY_TYPE_ERROR_BIT = 1 << 15;
export const NBD_REPLY_TYPE_ERROR = NBD_REPLY_TYPE_ERROR_BIT + 1;
export const NBD_REPLY_TYPE_ERROR_OFFSET = NBD_REPLY_TYPE_ERROR_BIT + 2;

// The base:allocation metadata context and its status flags.
export const BASE_ALLOCATION = 'base:allocation';
export const NBD_STATE_HOLE = 1 << 0;
export const NBD_STATE_ZERO = 1 << 1;

// Error values a server may send (the protocol fixes these numbers, whatever the server's OS uses).
export const NBD_EPERM = 1;
export const NBD_EIO = 5;
export const NBD_ENOMEM = 12;
export const NBD_EINVAL = 22;
export const NBD_ENOSPC = 28;
export const NBD_EOVERFLOW = 75;
export const NBD_ENOTSUP = 95;
export const NBD_ESHUTDOWN = 108;

const ERRNO_NAMES: Record<number, string> = {
  [NBD_EPERM]: 'EPERM',
  [NBD_EIO]: 'EIO',
  [NBD_ENOMEM]: 'ENOMEM',
  [NBD_EINVAL]: 'EINVAL',
  [NBD_ENOSPC]: 'ENOSPC',
  [NBD_EOVERFLOW]: 'EOVERFLOW',
  [NBD_ENOTSUP]: 'ENOTSUP',
  [NBD_ESHUTDOWN]: 'ESHUTDOWN',
};

export const errnoName = (errno: number): string => ERRNO_NAMES[errno] ?? `errno ${errno}`;

// Frame sizes.
export const GREETING_SIZE = 18; // NBDMAGIC, IHAVEOPT, 16-bit handshake flags
export const OPTION_REPLY_HEADER_SIZE = 20;
export const REQUEST_SIZE = 28;
export const SIMPLE_REPLY_HEADER_SIZE = 16;
export const STRUCTURED_REPLY_HEADER_SIZE = 20;
export const OFFSET_DATA_PREFIX_SIZE = 8; // the 64-bit offset before the data
export const OFFSET_HOLE_SIZE = 12;

/** Strings (export names, error messages, context names) are at most this long, per the protocol. */
export const MAX_STRING_BYTES = 4096;
/** Largest read payload a client may assume without NBD_INFO_BLOCK_SIZE; also our cap on one request. */
export const DEFAULT_MAX_BLOCK = 32 * 1024 * 1024;

/** A frame that breaks the protocol. The connection adds which export and request it was about. */
export class ProtocolViolation extends Error {
  constructor(
    message: string,
    readonly offset?: number,
  ) {
    super(message);
    this.name = 'ProtocolViolation';
  }
}

/** Reads a 64-bit field that must fit a JavaScript number (disk offsets and sizes do, below 8 PiB). */
export function readUint64(buf: Buffer, at: number, what: string): number {
  const value = buf.readBigUInt64BE(at);
  if (value > BigInt(Number.MAX_SAFE_INTEGER))
    throw new ProtocolViolation(`${what} ${value} is out of range`);
  return Number(value);
}

// ---- Handshake ----

export function decodeGreeting(buf: Buffer): { handshakeFlags: number } {
  if (buf.readBigUInt64BE(0) !== NBDMAGIC) {
    throw new ProtocolViolation(
      `bad greeting magic 0x${buf.subarray(0, 8).toString('hex')} (not an NBD server?)`,
    );
  }
  const second = buf.readBigUInt64BE(8);
  if (second !== IHAVEOPT) {
    throw new ProtocolViolation(
      `bad greeting magic 0x${second.toString(16)} after NBDMAGIC: only fixed newstyle servers are supported`,
    );
  }
  return { handshakeFlags: buf.readUInt16BE(16) };
}

export function encodeClientFlags(flags: number): Buffer {
  const buf = Buffer.alloc(4);
  buf.writeUInt32BE(flags, 0);
  return buf;
}

export function encodeOption(option: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const buf = Buffer.alloc(16 + data.length);
  buf.writeBigUInt64BE(IHAVEOPT, 0);
  buf.writeUInt32BE(option, 8);
  buf.writeUInt32BE(data.length, 12);
  data.copy(buf, 16);
  return buf;
}

function encodeString(value: string): Buffer {
  const bytes = Buffer.from(value, 'utf8');
  if (bytes.length > MAX_STRING_BYTES)
    throw new RangeError(`NBD string longer than ${MAX_STRING_BYTES} bytes`);
  const buf = Buffer.alloc(4 + bytes.length);
  buf.writeUInt32BE(bytes.length, 0);
  bytes.copy(buf, 4);
  return buf;
}

/** NBD_OPT_GO data: the export name, then the information types requested. */
export function encodeGoData(exportName: string, infos: readonly number[]): Buffer {
  const list = Buffer.alloc(2 + 2 * infos.length);
  list.writeUInt16BE(infos.length, 0);
  infos.forEach((info, i) => {
    list.writeUInt16BE(info, 2 + 2 * i);
  });
  return Buffer.concat([encodeString(exportName), list]);
}

/** NBD_OPT_SET_META_CONTEXT data: the export name, then the context queries. */
export function encodeSetMetaContextData(exportName: string, queries: readonly string[]): Buffer {
  const count = Buffer.alloc(4);
  count.writeUInt32BE(queries.length, 0);
  return Buffer.concat([encodeString(exportName), count, ...queries.map(encodeString)]);
}

export interface OptionReplyHeader {
  readonly option: number;
  readonly type: number;
  readonly length: number;
}

export function decodeOptionReplyHeader(buf: Buffer): OptionReplyHeader {
  const magic = buf.readBigUInt64BE(0);
  if (magic !== OPTION_REPLY_MAGIC)
    throw new ProtocolViolation(`bad option reply magic 0x${magic.toString(16)}`);
  return { option: buf.readUInt32BE(8), type: buf.readUInt32BE(12), length: buf.readUInt32BE(16) };
}

export type Info =
  | { readonly type: typeof NBD_INFO_EXPORT; readonly sizeBytes: number; readonly transmissionFlags: number }
  | {
      readonly type: typeof NBD_INFO_BLOCK_SIZE;
      readonly minimum: number;
      readonly preferred: number;
      readonly maximum: number;
    }
  | { readonly type: 'other'; readonly infoType: number };

/** Payload of an NBD_REP_INFO reply. */
export function decodeInfo(payload: Buffer): Info {
  if (payload.length < 2) throw new ProtocolViolation(`NBD_REP_INFO of ${payload.length} bytes`);
  const type = payload.readUInt16BE(0);
  if (type === NBD_INFO_EXPORT) {
    if (payload.length !== 12)
      throw new ProtocolViolation(`NBD_INFO_EXPORT of ${payload.length} bytes, expected 12`);
    return {
      type,
      sizeBytes: readUint64(payload, 2, 'export size'),
      transmissionFlags: payload.readUInt16BE(10),
    };
  }
  if (type === NBD_INFO_BLOCK_SIZE) {
    if (payload.length !== 14) {
      throw new ProtocolViolation(`NBD_INFO_BLOCK_SIZE of ${payload.length} bytes, expected 14`);
    }
    return {
      type,
      minimum: payload.readUInt32BE(2),
      preferred: payload.readUInt32BE(6),
      maximum: payload.readUInt32BE(10),
    };
  }
  return { type: 'other', infoType: type };
}

/** Payload of an NBD_REP_META_CONTEXT reply. */
export function decodeMetaContext(payload: Buffer): { id: number; name: string } {
  if (payload.length < 4 || payload.length > 4 + MAX_STRING_BYTES) {
    throw new ProtocolViolation(`NBD_REP_META_CONTEXT of ${payload.length} bytes`);
  }
  return { id: payload.readUInt32BE(0), name: payload.toString('utf8', 4) };
}

// ---- Transmission ----

export interface Request {
  readonly flags: number;
  readonly type: number;
  readonly cookie: bigint;
  readonly offset: number;
  readonly length: number;
}

export function encodeRequest(req: Request): Buffer {
  const buf = Buffer.alloc(REQUEST_SIZE);
  buf.writeUInt32BE(REQUEST_MAGIC, 0);
  buf.writeUInt16BE(req.flags, 4);
  buf.writeUInt16BE(req.type, 6);
  buf.writeBigUInt64BE(req.cookie, 8);
  buf.writeBigUInt64BE(BigInt(req.offset), 16);
  buf.writeUInt32BE(req.length, 24);
  return buf;
}

export interface SimpleReplyHeader {
  readonly error: number;
  readonly cookie: bigint;
}

export function decodeSimpleReplyHeader(buf: Buffer): SimpleReplyHeader {
  return { error: buf.readUInt32BE(4), cookie: buf.readBigUInt64BE(8) };
}

export interface StructuredReplyHeader {
  readonly flags: number;
  readonly type: number;
  readonly cookie: bigint;
  readonly length: number;
}

export function decodeStructuredReplyHeader(buf: Buffer): StructuredReplyHeader {
  return {
    flags: buf.readUInt16BE(4),
    type: buf.readUInt16BE(6),
    cookie: buf.readBigUInt64BE(8),
    length: buf.readUInt32BE(16),
  };
}

export function decodeOffsetHole(payload: Buffer): { offset: number; length: number } {
  if (payload.length !== OFFSET_HOLE_SIZE) {
    throw new ProtocolViolation(`NBD_REPLY_TYPE_OFFSET_HOLE of ${payload.length} bytes, expected 12`);
  }
  const length = payload.readUInt32BE(8);
  const offset = readUint64(payload, 0, 'hole offset');
  if (length === 0) throw new ProtocolViolation('empty NBD_REPLY_TYPE_OFFSET_HOLE', offset);
  return { offset, length };
}

export interface BlockDescriptor {
  readonly length: number;
  readonly flags: number;
}

export function decodeBlockStatus(payload: Buffer): { contextId: number; descriptors: BlockDescriptor[] } {
  if (payload.length < 12 || (payload.length - 4) % 8 !== 0) {
    throw new ProtocolViolation(
      `NBD_REPLY_TYPE_BLOCK_STATUS of ${payload.length} bytes is not 4 + 8n (n > 0)`,
    );
  }
  const descriptors: BlockDescriptor[] = [];
  for (let at = 4; at < payload.length; at += 8) {
    const length = payload.readUInt32BE(at);
    if (length === 0) throw new ProtocolViolation('block status descriptor of length 0');
    descriptors.push({ length, flags: payload.readUInt32BE(at + 4) });
  }
  return { contextId: payload.readUInt32BE(0), descriptors };
}

export interface ErrorChunk {
  readonly errno: number;
  readonly message: string;
  /** Where the error happened (NBD_REPLY_TYPE_ERROR_OFFSET only). */
  readonly offset: number | undefined;
}

/** Any chunk type with bit 15 set: errno, message, and for ERROR_OFFSET a trailing offset. */
export function decodeErrorChunk(type: number, payload: Buffer): ErrorChunk {
  if (payload.length < 6) throw new ProtocolViolation(`error chunk of ${payload.length} bytes`);
  const errno = payload.readUInt32BE(0);
  const messageLength = payload.readUInt16BE(4);
  if (errno === 0) throw new ProtocolViolation('error chunk with error value 0');
  const trailer = type === NBD_REPLY_TYPE_ERROR_OFFSET ? 8 : 0;
  if (6 + messageLength + trailer > payload.length) {
    throw new ProtocolViolation(
      `error chunk message of ${messageLength} bytes overruns its ${payload.length}-byte chunk`,
    );
  }
  if (type === NBD_REPLY_TYPE_ERROR_OFFSET && payload.length !== 6 + messageLength + 8) {
    throw new ProtocolViolation(`NBD_REPLY_TYPE_ERROR_OFFSET of ${payload.length} bytes does not add up`);
  }
  return {
    errno,
    message: payload.toString('utf8', 6, 6 + messageLength),
    offset: trailer === 0 ? undefined : readUint64(payload, 6 + messageLength, 'error offset'),
  };
}
