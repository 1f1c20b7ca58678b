// Byte ranges of a disk. Half-open: [offset, offset + length).

export interface Extent {
  readonly offset: number;
  readonly length: number;
}

export const extentEnd = (e: Extent): number => e.offset + e.length;
