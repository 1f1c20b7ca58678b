// Synthetic disks and change sets for the demo, tests and benchmarks: deterministic from a seed.
import { type FileHandle, open } from 'node:fs/promises';
import type { Extent } from '../engine/extents.ts';
import { seededRandom } from '../engine/random.ts';
import { KiB, MiB } from '../engine/units.ts';

function fillRandom(buf: Buffer, rnd: () => number): void {
  for (let i = 0; i + 4 <= buf.length; i += 4) buf.writeUInt32LE((rnd() * 4294967296) >>> 0, i);
}

/**
 * Creates a sparse disk image of `size` bytes where about `allocated` (0..1) of it, in runs of
 * `runLength`, holds random data; the rest are holes (reading as zeros), like a real thin disk.
 */
export async function createDiskImage(
  path: string,
  opts: { size: number; seed: number; allocated?: number; runLength?: number },
): Promise<void> {
  const rnd = seededRandom(opts.seed);
  const run = opts.runLength ?? MiB;
  const fh = await open(path, 'w');
  try {
    await fh.truncate(opts.size);
    const buf = Buffer.alloc(run);
    for (let off = 0; off < opts.size; off += run) {
      if (rnd() >= (opts.allocated ?? 0.6)) continue;
      const len = Math.min(run, opts.size - off);
      fillRandom(buf, rnd);
      await writeAll(fh, buf.subarray(0, len), off);
    }
  } finally {
    await fh.close();
  }
}

/**
 * Changes a disk the way a guest OS does between two cycles: many small scattered writes (the
 * fragmented case), a few larger sequential runs, and some blocks overwritten with zeros (which an
 * incremental must still carry). Returns the changed extents, as CBT would report them.
 */
export async function mutateDisk(
  path: string,
  opts: {
    size: number;
    seed: number;
    smallWrites?: number;
    smallSize?: number;
    largeWrites?: number;
    largeSize?: number;
  },
): Promise<Extent[]> {
  const rnd = seededRandom(opts.seed);
  const changes: Extent[] = [];
  const pick = (len: number, align: number) => {
    const slots = Math.floor((opts.size - len) / align);
    return Math.floor(rnd() * slots) * align;
  };
  const smallSize = opts.smallSize ?? 4 * KiB;
  for (let i = 0; i < (opts.smallWrites ?? 2000); i++)
    changes.push({ offset: pick(smallSize, 4 * KiB), length: smallSize });
  const largeSize = opts.largeSize ?? 4 * MiB;
  for (let i = 0; i < (opts.largeWrites ?? 4); i++)
    changes.push({ offset: pick(largeSize, 64 * KiB), length: largeSize });
  const fh = await open(path, 'r+');
  try {
    for (const [i, e] of changes.entries()) {
      const buf = Buffer.alloc(e.length);
      // One write in ten zeroes its blocks: the case where a zero block must still be replicated.
      if (i % 10 !== 0) fillRandom(buf, rnd);
      await writeAll(fh, buf, e.offset);
    }
  } finally {
    await fh.close();
  }
  return changes;
}

async function writeAll(fh: FileHandle, data: Uint8Array, offset: number): Promise<void> {
  let done = 0;
  while (done < data.length) {
    const { bytesWritten } = await fh.write(data, done, data.length - done, offset + done);
    done += bytesWritten;
  }
}

/** Compares two images byte for byte; returns the first differing offset, or undefined if equal. */
export async function firstDifference(a: string, b: string): Promise<number | undefined> {
  const fa = await open(a, 'r');
  const fb = await open(b, 'r');
  try {
    const [sa, sb] = [(await fa.stat()).size, (await fb.stat()).size];
    if (sa !== sb) return Math.min(sa, sb);
    const ba = Buffer.alloc(4 * MiB);
    const bb = Buffer.alloc(4 * MiB);
    for (let off = 0; off < sa; off += ba.length) {
      const len = Math.min(ba.length, sa - off);
      await fa.read(ba, 0, len, off);
      await fb.read(bb, 0, len, off);
      if (!ba.subarray(0, len).equals(bb.subarray(0, len))) {
        for (let i = 0; i < len; i++) if (ba[i] !== bb[i]) return off + i;
      }
    }
    return undefined;
  } finally {
    await fa.close();
    await fb.close();
  }
}
