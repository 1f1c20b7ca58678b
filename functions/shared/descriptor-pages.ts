// A cycle's descriptors as stored in DynamoDB pages: the wire form, the page arithmetic and the
// per-block view (block indexes and GetSnapshotBlock tokens) writers work from.
import type { Descriptor } from '../../shared/engine/descriptors.ts';
import { EBS_BLOCK_SIZE } from './ports.ts';

/** A descriptor with the source's block token for each of its blocks (ascending; undefined = zeros). */
export interface PlannedDescriptor extends Descriptor {
  readonly tokens: readonly (string | undefined)[];
}

// At most this many descriptors per page item: 200 x 1 MiB chunks with two ~100-character tokens each
// are ~50 KB, so one GetItem serves a writer's whole SQS batch (10 grants, mostly of one page).
export const MAX_DESCRIPTORS_PER_PAGE = 200;
// What one page item may hold: DynamoDB items are at most 400 KB; the rest is keys and attribute names.
export const PAGE_BUDGET_BYTES = 320 * 1024;
// Longest block token we store. EBS does not document a bound; the tokens seen are ~100 characters.
// The differ refuses a longer one rather than writing an item that might not fit.
export const MAX_BLOCK_TOKEN_CHARS = 256;
// Encoded size of one descriptor's fixed fields and one extent pair, generously (JSON digits).
const DESCRIPTOR_OVERHEAD_BYTES = 80;
const EXTENT_BYTES = 34;

/**
 * Descriptors per page for a chunk size: as many as fit PAGE_BUDGET_BYTES in the worst case (every
 * other block changed, every token the longest), at most MAX_DESCRIPTORS_PER_PAGE. Fixed per disk
 * and cycle, so the page of descriptor `seq` is `floor(seq / perPage)` without an index.
 */
export function descriptorsPerPage(chunkSize: number, cap = MAX_DESCRIPTORS_PER_PAGE): number {
  const blocks = Math.ceil(chunkSize / EBS_BLOCK_SIZE);
  const worst =
    DESCRIPTOR_OVERHEAD_BYTES + Math.ceil(blocks / 2) * EXTENT_BYTES + blocks * (MAX_BLOCK_TOKEN_CHARS + 3);
  return Math.max(1, Math.min(cap, Math.floor(PAGE_BUDGET_BYTES / worst)));
}

/** Block indexes a descriptor covers, ascending (its extents are block-aligned). */
export function blockIndexes(d: Descriptor): number[] {
  const out: number[] = [];
  for (const e of d.extents) {
    const first = Math.floor(e.offset / EBS_BLOCK_SIZE);
    const count = Math.ceil(e.length / EBS_BLOCK_SIZE);
    for (let i = 0; i < count; i++) out.push(first + i);
  }
  return out;
}

/** One page as stored: `[seq, offset, length, bytes, [start, length, ...relative], [token or ""...]]`. */
type WireDescriptor = [number, number, number, number, number[], string[]];

export function encodePage(descriptors: readonly PlannedDescriptor[]): string {
  const wire: WireDescriptor[] = descriptors.map((d) => {
    const extents: number[] = [];
    for (const e of d.extents) extents.push(e.offset - d.offset, e.length);
    return [d.seq, d.offset, d.length, d.bytes, extents, d.tokens.map((t) => t ?? '')];
  });
  return JSON.stringify(wire);
}

/** Decodes a page; throws a plain Error on damage (the store wraps it with the item's key). */
export function decodePage(body: string): PlannedDescriptor[] {
  const wire = JSON.parse(body) as unknown;
  if (!Array.isArray(wire)) throw new Error('descriptor page is not a list');
  return wire.map((w: unknown, i) => {
    if (!Array.isArray(w) || w.length !== 6) throw new Error(`descriptor ${i} of the page is malformed`);
    const [seq, offset, length, bytes, rel, tokens] = w as WireDescriptor;
    const extents = [];
    for (let k = 0; k + 1 < rel.length; k += 2)
      extents.push({ offset: offset + rel[k]!, length: rel[k + 1]! });
    const d: PlannedDescriptor = {
      seq,
      offset,
      length,
      bytes,
      extents,
      tokens: tokens.map((t) => (t === '' ? undefined : t)),
    };
    if (blockIndexes(d).length !== d.tokens.length) {
      throw new Error(
        `descriptor seq ${seq} has ${d.tokens.length} tokens for ${blockIndexes(d).length} blocks`,
      );
    }
    return d;
  });
}

/** Same seq, span and extents: a grant message and the stored descriptor agree. */
export function sameDescriptor(a: Descriptor, b: Descriptor): boolean {
  if (a.seq !== b.seq || a.offset !== b.offset || a.length !== b.length || a.bytes !== b.bytes) return false;
  if (a.extents.length !== b.extents.length) return false;
  return a.extents.every((e, i) => e.offset === b.extents[i]!.offset && e.length === b.extents[i]!.length);
}

// ---- per-block completion records ---------------------------------------------------------------

/** Raw SHA-256 length and the u32 block index in front of it. */
const RECORD_BYTES = 4 + 32;

/** Packs written blocks (index + raw digest) into the binary attribute a completion stores. */
export function packBlocks(blocks: readonly { index: number; checksum: string }[]): Uint8Array {
  const out = Buffer.alloc(blocks.length * RECORD_BYTES);
  blocks.forEach((b, i) => {
    out.writeUInt32BE(b.index, i * RECORD_BYTES);
    const digest = Buffer.from(b.checksum, 'base64');
    if (digest.length !== 32) throw new Error(`checksum of block ${b.index} is not a base64 SHA-256`);
    digest.copy(out, i * RECORD_BYTES + 4);
  });
  return out;
}

export function unpackBlocks(packed: Uint8Array): { index: number; digest: Uint8Array }[] {
  if (packed.length % RECORD_BYTES !== 0)
    throw new Error(`completion record of ${packed.length} bytes is torn`);
  const buf = Buffer.from(packed.buffer, packed.byteOffset, packed.length);
  const out: { index: number; digest: Uint8Array }[] = [];
  for (let at = 0; at < buf.length; at += RECORD_BYTES) {
    out.push({ index: buf.readUInt32BE(at), digest: buf.subarray(at + 4, at + RECORD_BYTES) });
  }
  return out;
}
