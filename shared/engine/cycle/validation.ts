// A disk's completions read back against its descriptors: the done check, validation, LINEAR aggregate.
import { IntegrityError } from '../errors.ts';
import { LinearAggregator } from '../integrity.ts';
import { blockIndexes } from './descriptor-pages.ts';
import { CycleFailedError, CycleStateError } from './errors.ts';
import { type CycleDiskRecord, type CycleLedger, EBS_BLOCK_SIZE, type WrittenBlock } from './ports.ts';

/** Raw SHA-256 length and the u32 block index in front of it. */
const RECORD_BYTES = 4 + 32;

function pack(blocks: readonly WrittenBlock[], where: () => string): Uint8Array {
  const out = new Uint8Array(blocks.length * RECORD_BYTES);
  const view = new DataView(out.buffer);
  blocks.forEach((b, i) => {
    const digest = Buffer.from(b.checksum, 'base64');
    if (digest.length !== 32 || !Number.isSafeInteger(b.index) || b.index < 0 || b.index > 0xffffffff) {
      throw new IntegrityError(`${where()}: block ${b.index} has no valid SHA-256 (${b.checksum})`);
    }
    view.setUint32(i * RECORD_BYTES, b.index);
    out.set(digest, i * RECORD_BYTES + 4);
  });
  return out;
}

function unpack(packed: Uint8Array): { index: number; digest: Uint8Array }[] {
  const view = new DataView(packed.buffer, packed.byteOffset, packed.length);
  const out: { index: number; digest: Uint8Array }[] = [];
  for (let at = 0; at < packed.length; at += RECORD_BYTES) {
    out.push({ index: view.getUint32(at), digest: packed.subarray(at + 4, at + RECORD_BYTES) });
  }
  return out;
}

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

/** The first block where two copies of a seq's completion differ (for the message). */
function firstDifference(a: Uint8Array, b: Uint8Array): string {
  const x = unpack(a);
  const y = unpack(b);
  for (let i = 0; i < Math.max(x.length, y.length); i++) {
    const p = x[i];
    const q = y[i];
    if (p === undefined || q === undefined) return `block ${(p ?? q)!.index} is in one copy only`;
    if (p.index !== q.index) return `block ${p.index} in one copy is block ${q.index} in the other`;
    if (!sameBytes(p.digest, q.digest)) {
      const hex = (d: Uint8Array) => Buffer.from(d).toString('hex');
      return `block ${p.index} has SHA-256 ${hex(p.digest)} in one copy and ${hex(q.digest)} in the other`;
    }
  }
  return 'no difference';
}

/**
 * Every recorded completion of a disk, one per seq, packed compactly (a full copy of a large disk
 * has millions of blocks). Seqs at or past `total` are ignored (they cannot be this cycle's).
 * Throws IntegrityError naming disk, seq and block when two copies of a seq disagree.
 */
export async function collectCompletions(
  ledger: Pick<CycleLedger, 'listCompletions'>,
  rec: Pick<CycleDiskRecord, 'set' | 'disk' | 'cycleId'>,
  total: number,
): Promise<(Uint8Array | undefined)[]> {
  const bySeq: (Uint8Array | undefined)[] = new Array(total);
  for await (const c of ledger.listCompletions(rec.set, rec.disk, rec.cycleId)) {
    if (!Number.isSafeInteger(c.seq) || c.seq < 0 || c.seq >= total) continue;
    const where = () => `completion of disk ${rec.disk} seq ${c.seq}`;
    const packed = pack(c.blocks, where);
    const seen = bySeq[c.seq];
    if (seen === undefined) bySeq[c.seq] = packed;
    else if (!sameBytes(seen, packed)) {
      const first = unpack(packed)[0]?.index;
      throw new IntegrityError(
        `disk ${rec.disk} seq ${c.seq} was recorded twice with different blocks: ${firstDifference(seen, packed)}`,
        { disk: rec.disk, seq: c.seq, offset: first === undefined ? undefined : first * EBS_BLOCK_SIZE },
      );
    }
  }
  return bySeq;
}

/** Seqs in [0, total) without a recorded completion, ascending, at most `limit`. */
export async function missingCompletions(
  ledger: Pick<CycleLedger, 'listCompletions'>,
  rec: Pick<CycleDiskRecord, 'set' | 'disk' | 'cycleId'>,
  total: number,
  limit: number,
): Promise<number[]> {
  const seen = new Uint8Array(total);
  for await (const c of ledger.listCompletions(rec.set, rec.disk, rec.cycleId)) {
    if (Number.isSafeInteger(c.seq) && c.seq >= 0 && c.seq < total) seen[c.seq] = 1;
  }
  const missing: number[] = [];
  for (let seq = 0; seq < total && missing.length < limit; seq++) if (seen[seq] === 0) missing.push(seq);
  return missing;
}

export interface DiskValidation {
  readonly descriptors: number;
  readonly blocks: number;
  readonly bytes: number;
  /** LINEAR aggregate: SHA-256 over the written blocks' raw SHA-256s in ascending block order. */
  readonly aggregate: Uint8Array;
}

/**
 * Validates a disk before its snapshot is completed: every seq 0..descriptors-1 has a completion
 * (duplicates identical); each names only blocks of its descriptor, and all of them unless zero
 * blocks could be skipped (a full copy to an unencrypted snapshot); block indexes ascend across the
 * whole disk. Computes the LINEAR aggregate from the recorded checksums on the way, reading the
 * descriptor pages one at a time. Throws CycleFailedError naming the disk, seq and block (an
 * IntegrityError when two copies of a seq's completion disagree).
 */
export async function validateDisk(
  ledger: Pick<CycleLedger, 'listCompletions' | 'getDescriptorPage'>,
  rec: CycleDiskRecord,
): Promise<DiskValidation> {
  const where = { set: rec.set, cycleId: rec.cycleId, disk: rec.disk };
  if (!rec.diffDone || rec.descriptors === undefined) {
    throw new CycleStateError(`disk ${rec.disk} of cycle ${rec.cycleId} has not been diffed`, where);
  }
  const total = rec.descriptors;
  const skipAllowed = rec.kind === 'full' && !rec.encrypted;
  const fail = (why: string, seq?: number) =>
    new CycleFailedError(`disk ${rec.disk} of cycle ${rec.cycleId} failed validation: ${why}`, {
      ...where,
      seq,
    });
  // Two copies of one seq that disagree are an IntegrityError (naming disk, seq and block).
  const bySeq = await collectCompletions(ledger, rec, total);
  const aggregate = new LinearAggregator();
  let blocks = 0;
  let bytes = 0;
  let lastIndex = -1;
  const pages = Math.ceil(total / rec.perPage);
  for (let page = 0; page < pages; page++) {
    const descriptors = await ledger.getDescriptorPage(rec.set, rec.disk, rec.cycleId, page);
    const first = page * rec.perPage;
    const count = Math.min(rec.perPage, total - first);
    if (descriptors === undefined || descriptors.length !== count) {
      throw fail(`descriptor page ${page} holds ${descriptors?.length ?? 0} descriptors, expected ${count}`);
    }
    for (const [i, d] of descriptors.entries()) {
      if (d.seq !== first + i)
        throw fail(`descriptor page ${page} holds seq ${d.seq} at ${first + i}`, d.seq);
      const packed = bySeq[d.seq];
      if (packed === undefined)
        throw fail(`descriptor seq ${d.seq} (offset ${d.offset}) has no completion`, d.seq);
      const expected = blockIndexes(d);
      const allowed = new Set(expected);
      const recorded = unpack(packed);
      for (const b of recorded) {
        if (!allowed.has(b.index))
          throw fail(`completion of seq ${d.seq} names block ${b.index} outside it`, d.seq);
        if (b.index <= lastIndex) {
          throw fail(`block ${b.index} (seq ${d.seq}) does not ascend after block ${lastIndex}`, d.seq);
        }
        lastIndex = b.index;
        aggregate.add(b.digest);
      }
      if (!skipAllowed && recorded.length !== expected.length) {
        throw fail(`seq ${d.seq} recorded ${recorded.length} of its ${expected.length} blocks`, d.seq);
      }
      blocks += recorded.length;
      bytes += d.bytes;
    }
  }
  return { descriptors: total, blocks, bytes, aggregate: Buffer.from(aggregate.hex(), 'hex') };
}
