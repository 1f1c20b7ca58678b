// Change maps -> descriptors: normalise changed extents, align them to the target's block size,
// coalesce, and cut them into descriptors of at most chunk_size that carry their sub-extents.
import type { Extent } from './extents.ts';

/** One unit of work: a span of at most chunk_size bytes and the changed extents inside it. */
export interface Descriptor {
  /** Dense, 0-based, in offset order within one disk's cycle. */
  readonly seq: number;
  /** Start of the first changed extent (block-aligned). */
  readonly offset: number;
  /** Span from `offset` to the end of the last extent; never more than chunk_size. */
  readonly length: number;
  /** Changed extents in absolute disk offsets: sorted, disjoint, block-aligned, inside the span. */
  readonly extents: readonly Extent[];
  /** Sum of the extents' lengths: the bytes that move and count against windows and budgets. */
  readonly bytes: number;
}
