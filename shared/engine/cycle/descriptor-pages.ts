// Descriptors in pages: how many fit a page, which page holds a seq, and a descriptor's block indexes.
import type { Descriptor } from '../descriptors.ts';
import { EBS_BLOCK_SIZE } from './ports.ts';

// At most this many descriptors per page: 200 x 1 MiB chunks with two ~100-character tokens each
// are ~50 KB, so one read serves a writer's whole batch (10 grants, mostly of one page).
export const MAX_DESCRIPTORS_PER_PAGE = 200;
// What one page may hold: a DynamoDB item is at most 400 KB; the rest is keys and attribute names.
export const PAGE_BUDGET_BYTES = 320 * 1024;
// Longest block token stored. EBS does not document a bound; the tokens seen are ~100 characters.
// The differ refuses a longer one rather than store a page that might not fit.
export const MAX_BLOCK_TOKEN_CHARS = 256;
// Encoded size of one descriptor's fixed fields and one extent pair, generously (JSON digits).
const DESCRIPTOR_OVERHEAD_BYTES = 80;
const EXTENT_BYTES = 34;

/**
 * Descriptors per page for a chunk size: as many as fit PAGE_BUDGET_BYTES in the worst case (every
 * other block changed, every token the longest), at most `cap`. Fixed per disk and cycle, so the
 * page of descriptor `seq` is `floor(seq / perPage)` without an index.
 */
export function descriptorsPerPage(chunkSize: number, cap = MAX_DESCRIPTORS_PER_PAGE): number {
  const blocks = Math.ceil(chunkSize / EBS_BLOCK_SIZE);
  const worst =
    DESCRIPTOR_OVERHEAD_BYTES + Math.ceil(blocks / 2) * EXTENT_BYTES + blocks * (MAX_BLOCK_TOKEN_CHARS + 3);
  return Math.max(1, Math.min(cap, Math.floor(PAGE_BUDGET_BYTES / worst)));
}

/** The page holding `seq`. */
export const pageOf = (seq: number, perPage: number): number => Math.floor(seq / perPage);

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

/** Same seq, span and extents: a grant and the stored descriptor agree. */
export function sameDescriptor(a: Descriptor, b: Descriptor): boolean {
  if (a.seq !== b.seq || a.offset !== b.offset || a.length !== b.length || a.bytes !== b.bytes) return false;
  if (a.extents.length !== b.extents.length) return false;
  return a.extents.every((e, i) => e.offset === b.extents[i]!.offset && e.length === b.extents[i]!.length);
}
