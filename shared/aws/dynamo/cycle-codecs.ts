// How the cycle ledger stores descriptors and completions inside items: a descriptor page as compact
// JSON (the form functions/shared wrote), a writer batch's completions as one small binary value.
// Decoders validate everything and throw a plain Error on damage; the ledger names the item.
import { blockIndexes } from '../../engine/cycle/descriptor-pages.ts';
import type { CompletionEntry, PlannedDescriptor } from '../../engine/cycle/ports.ts';

// ---- descriptor pages ------------------------------------------------------------------------------

/** One descriptor on the page: `[seq, offset, length, bytes, [start, length, ...relative], [token or ""...]]`. */
type WireDescriptor = [number, number, number, number, number[], string[]];

export function encodePage(descriptors: readonly PlannedDescriptor[]): string {
  const wire: WireDescriptor[] = descriptors.map((d) => {
    const extents: number[] = [];
    for (const e of d.extents) extents.push(e.offset - d.offset, e.length);
    return [d.seq, d.offset, d.length, d.bytes, extents, d.tokens.map((t) => t ?? '')];
  });
  return JSON.stringify(wire);
}

const isCount = (n: unknown): n is number => typeof n === 'number' && Number.isSafeInteger(n) && n >= 0;

export function decodePage(body: string): PlannedDescriptor[] {
  const wire = JSON.parse(body) as unknown;
  if (!Array.isArray(wire)) throw new Error('descriptor page is not a list');
  return wire.map((w: unknown, i) => {
    if (!Array.isArray(w) || w.length !== 6) throw new Error(`descriptor ${i} of the page is malformed`);
    const [seq, offset, length, bytes, rel, tokens] = w as unknown[];
    if (!isCount(seq) || !isCount(offset) || !isCount(length) || !isCount(bytes)) {
      throw new Error(`descriptor ${i} of the page has a malformed seq, offset, length or bytes`);
    }
    if (!Array.isArray(rel) || rel.length % 2 !== 0 || !rel.every(isCount)) {
      throw new Error(`descriptor seq ${seq} has malformed extents`);
    }
    if (!Array.isArray(tokens) || !tokens.every((t) => typeof t === 'string')) {
      throw new Error(`descriptor seq ${seq} has malformed block tokens`);
    }
    const extents: { offset: number; length: number }[] = [];
    for (let k = 0; k < rel.length; k += 2) extents.push({ offset: offset + rel[k]!, length: rel[k + 1]! });
    const d: PlannedDescriptor = {
      seq,
      offset,
      length,
      bytes,
      extents,
      tokens: (tokens as string[]).map((t) => (t === '' ? undefined : t)),
    };
    const blocks = blockIndexes(d).length;
    if (blocks !== tokens.length) {
      throw new Error(`descriptor seq ${seq} has ${tokens.length} tokens for ${blocks} blocks`);
    }
    return d;
  });
}

// ---- completion batches ------------------------------------------------------------------------------
//
// Version byte, then per entry: seq (u32), block count (u16), then per block its index (u32) and raw
// SHA-256 (32 bytes). 1 MiB chunks: 78 bytes per entry, so a writer batch of 10 is one write unit.
// u32 covers 2 PiB of 512 KiB blocks; a descriptor spans at most 64 MiB (128 blocks) < u16.

const COMPLETIONS_FORMAT = 1;
const ENTRY_HEADER = 4 + 2;
const BLOCK_RECORD = 4 + 32;
const U32 = 2 ** 32;

export function encodeCompletions(entries: readonly CompletionEntry[]): Uint8Array {
  let size = 1;
  for (const e of entries) size += ENTRY_HEADER + e.blocks.length * BLOCK_RECORD;
  const out = Buffer.alloc(size);
  out.writeUInt8(COMPLETIONS_FORMAT, 0);
  let at = 1;
  for (const e of entries) {
    if (!Number.isSafeInteger(e.seq) || e.seq < 0 || e.seq >= U32)
      throw new Error(`seq ${e.seq} is out of range`);
    if (e.blocks.length > 0xffff) throw new Error(`seq ${e.seq} names ${e.blocks.length} blocks`);
    out.writeUInt32BE(e.seq, at);
    out.writeUInt16BE(e.blocks.length, at + 4);
    at += ENTRY_HEADER;
    for (const b of e.blocks) {
      if (!Number.isSafeInteger(b.index) || b.index < 0 || b.index >= U32) {
        throw new Error(`block index ${b.index} of seq ${e.seq} is out of range`);
      }
      const digest = Buffer.from(b.checksum, 'base64');
      if (digest.length !== 32 || digest.toString('base64') !== b.checksum) {
        throw new Error(`checksum of block ${b.index} (seq ${e.seq}) is not a base64 SHA-256`);
      }
      out.writeUInt32BE(b.index, at);
      digest.copy(out, at + 4);
      at += BLOCK_RECORD;
    }
  }
  return out;
}

export function decodeCompletions(packed: Uint8Array): CompletionEntry[] {
  const buf = Buffer.from(packed.buffer, packed.byteOffset, packed.length);
  if (buf.length < 1 || buf.readUInt8(0) !== COMPLETIONS_FORMAT) {
    throw new Error(`completion batch format ${buf.length < 1 ? '(empty)' : buf.readUInt8(0)} is unknown`);
  }
  const out: CompletionEntry[] = [];
  let at = 1;
  while (at < buf.length) {
    if (at + ENTRY_HEADER > buf.length) throw new Error(`completion batch is torn at byte ${at}`);
    const seq = buf.readUInt32BE(at);
    const n = buf.readUInt16BE(at + 4);
    at += ENTRY_HEADER;
    if (at + n * BLOCK_RECORD > buf.length) throw new Error(`completion of seq ${seq} is torn`);
    const blocks = [];
    for (let k = 0; k < n; k++, at += BLOCK_RECORD) {
      blocks.push({
        index: buf.readUInt32BE(at),
        checksum: buf.subarray(at + 4, at + BLOCK_RECORD).toString('base64'),
      });
    }
    out.push({ seq, blocks });
  }
  return out;
}
