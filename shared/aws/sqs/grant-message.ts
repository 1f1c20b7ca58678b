// The SQS grant message: one descriptor of one disk for a writer, its wire schema and codec.
//
// Version 2 carries the cycle port's Grant (shared/engine/cycle/ports.ts): `{set, cycleId, disk,
// descriptor, attempt, repair?}`, nothing leased. Version 1 (a grant with a lease id and expiry, sent
// by the lease-based functions before the cycle core) is refused like any other version: a writer
// leaves such a message for the DLQ.
import { z } from 'zod';
import type { Grant } from '../../engine/cycle/ports.ts';
import type { Descriptor } from '../../engine/descriptors.ts';
import { type ErrorContext, FerryError } from '../../engine/errors.ts';
import type { Extent } from '../../engine/extents.ts';

/** Wire format version of the cycle's Grant; a reader refuses any other rather than guess. */
export const CYCLE_GRANT_VERSION = 2;

// A 1 MiB descriptor of Azure 512 B pages, every other page changed, holds 512 extents; 1024 leaves
// room for twice that and still keeps the worst-case body near 20 KiB. A denser change map must be
// cut into smaller chunks: the encoder refuses rather than sending a grant a reader would refuse.
export const MAX_GRANT_EXTENTS = 1024;

// The same limit as the config's largest chunk (64 MiB): a grant never spans more than one chunk.
export const MAX_GRANT_SPAN = 64 * 1024 * 1024;

// Names (set, cycle, disk) are identifiers, not prose; 256 characters hold an Azure disk
// resource id. Bounding them is what makes the worst-case body size computable.
export const MAX_GRANT_NAME_LENGTH = 256;

// SendMessageBatch limits the sum of its entries' bodies to SQS's classic 256 KiB message limit, and
// batches hold up to 10 entries: 24 KiB per grant means any 10 grants fit one batch with room to
// spare. The worst case (1024 extents spread over 64 MiB, three 256-character names of 3-byte UTF-8
// characters) encodes to about 18 KiB; the encoder asserts the limit on every grant anyway.
export const MAX_GRANT_MESSAGE_BYTES = 24 * 1024;
export const SQS_BATCH_LIMIT_BYTES = 256 * 1024;
export const SQS_MAX_BATCH_ENTRIES = 10;
if (MAX_GRANT_MESSAGE_BYTES * SQS_MAX_BATCH_ENTRIES > SQS_BATCH_LIMIT_BYTES) {
  throw new Error('grant message limit does not let a full batch fit the SQS batch limit');
}

/** A grant message that cannot be trusted: it is refused whole, never half-used. */
export class GrantMessageError extends FerryError {
  constructor(message: string, ctx: ErrorContext = {}) {
    super(message, ctx);
    this.name = 'GrantMessageError';
  }
}

const name = z
  .string()
  .min(1)
  .max(MAX_GRANT_NAME_LENGTH)
  // Control characters would be escaped to six bytes each and make the size bound a lie; no real
  // identifier has them.
  .refine((s) => !/\p{Cc}/u.test(s), 'must not contain control characters');
const count = z.number().int().nonnegative();

/**
 * A descriptor on the wire. `extents` is flat pairs `[start, length, start, length, ...]` with
 * `start` relative to `offset`: two short numbers per extent instead of an object with two absolute
 * offsets.
 */
const wireDescriptor = {
  set: name,
  cycleId: name,
  disk: name,
  seq: count,
  offset: count,
  length: z.number().int().positive().max(MAX_GRANT_SPAN),
  extents: z
    .array(count)
    .min(2)
    .max(2 * MAX_GRANT_EXTENTS)
    .refine((a) => a.length % 2 === 0, 'must hold [start, length] pairs'),
  bytes: z.number().int().positive(),
  attempt: z.number().int().positive(),
};

/** Version 2: the cycle's Grant. `repair` is sent only when true. */
const cycleWireSchema = z.strictObject({
  version: z.literal(CYCLE_GRANT_VERSION),
  ...wireDescriptor,
  repair: z.literal(true).optional(),
});

type WireDescriptor = Pick<
  z.infer<typeof cycleWireSchema>,
  'disk' | 'seq' | 'offset' | 'length' | 'extents' | 'bytes'
>;

function where(disk: unknown, seq: unknown): string {
  const d = typeof disk === 'string' && disk.length > 0 ? disk.slice(0, MAX_GRANT_NAME_LENGTH) : '(unknown)';
  const s = typeof seq === 'number' && Number.isSafeInteger(seq) ? String(seq) : '(unknown)';
  return `grant for disk ${d} seq ${s}`;
}

function refuse(disk: unknown, seq: unknown, why: string, cause?: unknown): GrantMessageError {
  return new GrantMessageError(`${where(disk, seq)}: ${why}`, {
    disk: typeof disk === 'string' ? disk : undefined,
    seq: typeof seq === 'number' ? seq : undefined,
    cause,
  });
}

/** The span and extent checks zod cannot express; shared by encode and decode so both refuse alike. */
function checkExtents(w: WireDescriptor): Extent[] {
  const spanEnd = w.offset + w.length;
  if (!Number.isSafeInteger(spanEnd)) throw refuse(w.disk, w.seq, `span ends beyond 2^53`);
  const extents: Extent[] = [];
  let previousEnd = 0;
  let sum = 0;
  for (let i = 0; i < w.extents.length; i += 2) {
    const start = w.extents[i]!;
    const length = w.extents[i + 1]!;
    const k = i / 2;
    if (length === 0) throw refuse(w.disk, w.seq, `extent ${k} is empty`);
    if (k > 0 && start < previousEnd) {
      throw refuse(w.disk, w.seq, `extent ${k} at +${start} overlaps or precedes the one before it`);
    }
    const end = start + length;
    if (end > w.length) {
      throw refuse(
        w.disk,
        w.seq,
        `extent ${k} [+${start}, +${end}) runs past the descriptor span of ${w.length} bytes`,
      );
    }
    extents.push({ offset: w.offset + start, length });
    previousEnd = end;
    sum += length;
  }
  if (sum !== w.bytes) {
    throw refuse(w.disk, w.seq, `bytes ${w.bytes} is not the sum of its extents (${sum})`);
  }
  return extents;
}

function describeIssues(error: z.ZodError): string {
  const shown = error.issues.slice(0, 3).map((i) => `${i.path.join('.') || '(message)'}: ${i.message}`);
  const more = error.issues.length > 3 ? ` (and ${error.issues.length - 3} more)` : '';
  return shown.join('; ') + more;
}

function wireExtents(d: Descriptor): number[] {
  const extents: number[] = [];
  for (const e of d.extents) extents.push(e.offset - d.offset, e.length);
  return extents;
}

/** Validates the wire form and bounds its size. */
function encodeWire<T extends WireDescriptor>(
  schema: z.ZodType<T>,
  wire: unknown,
  disk: string,
  seq: number,
): string {
  const parsed = schema.safeParse(wire);
  if (!parsed.success) throw refuse(disk, seq, describeIssues(parsed.error), parsed.error);
  checkExtents(parsed.data);
  const body = JSON.stringify(parsed.data);
  const size = Buffer.byteLength(body, 'utf8');
  if (size > MAX_GRANT_MESSAGE_BYTES) {
    throw refuse(
      disk,
      seq,
      `encodes to ${size} bytes, over the ${MAX_GRANT_MESSAGE_BYTES}-byte grant message limit`,
    );
  }
  return body;
}

/** Parses and fully validates a body of `version`; any defect is a GrantMessageError naming disk and seq. */
function decodeWire<T extends WireDescriptor>(
  schema: z.ZodType<T>,
  version: number,
  body: string,
): { wire: T; descriptor: Descriptor } {
  if (Buffer.byteLength(body, 'utf8') > MAX_GRANT_MESSAGE_BYTES) {
    throw refuse(
      undefined,
      undefined,
      `body is over the ${MAX_GRANT_MESSAGE_BYTES}-byte grant message limit`,
    );
  }
  let raw: unknown;
  try {
    raw = JSON.parse(body);
  } catch (err) {
    throw refuse(undefined, undefined, 'body is not JSON', err);
  }
  // Best effort, only to name the grant in the error: nothing read here is trusted.
  const loose = typeof raw === 'object' && raw !== null ? (raw as Record<string, unknown>) : {};
  if (loose.version !== undefined && loose.version !== version) {
    throw refuse(
      loose.disk,
      loose.seq,
      `message version ${String(loose.version)} is not supported (this reader knows ${version})`,
    );
  }
  const parsed = schema.safeParse(raw);
  if (!parsed.success) throw refuse(loose.disk, loose.seq, describeIssues(parsed.error), parsed.error);
  const w = parsed.data;
  const extents = checkExtents(w);
  return { wire: w, descriptor: { seq: w.seq, offset: w.offset, length: w.length, extents, bytes: w.bytes } };
}

/**
 * Encodes the cycle's grant (version 2). Refuses (GrantMessageError) anything a reader would refuse,
 * and any body over MAX_GRANT_MESSAGE_BYTES, so a bad grant fails at the sender, not in a writer.
 */
export function encodeCycleGrant(grant: Grant): string {
  const d = grant.descriptor;
  const wire = {
    version: CYCLE_GRANT_VERSION,
    set: grant.set,
    cycleId: grant.cycleId,
    disk: grant.disk,
    seq: d.seq,
    offset: d.offset,
    length: d.length,
    extents: wireExtents(d),
    bytes: d.bytes,
    attempt: grant.attempt,
    ...(grant.repair === true ? { repair: true } : {}),
  };
  return encodeWire(cycleWireSchema, wire, grant.disk, d.seq);
}

/** Decodes and strictly validates a version 2 body: an unknown field or another version is refused. */
export function decodeCycleGrant(body: string): Grant {
  const { wire: w, descriptor } = decodeWire(cycleWireSchema, CYCLE_GRANT_VERSION, body);
  return {
    set: w.set,
    cycleId: w.cycleId,
    disk: w.disk,
    descriptor,
    attempt: w.attempt,
    ...(w.repair === true ? { repair: true } : {}),
  };
}
