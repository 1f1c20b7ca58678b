// A disk hashed the way a file target's manifest is: SHA-256 per MANIFEST_REGION (1 MiB, the last
// region short), so any disk can be compared with a checkpoint's recorded hashes region by region.
import { createHash } from 'node:crypto';
import type { DiskSource } from '../engine/ports.ts';
import { MANIFEST_REGION } from './file-target.ts';

/**
 * The digests of every region of `source`, concatenated in order (32 bytes each). Reads one region
 * at a time, so memory stays at a region whatever the disk's size; `onBytes` is told each region's
 * length as it is hashed.
 */
export async function regionDigests(
  source: DiskSource,
  opts: { readonly onBytes?: (bytes: number) => void; readonly signal?: AbortSignal } = {},
): Promise<Buffer> {
  const size = source.sizeBytes;
  const regions = Math.ceil(size / MANIFEST_REGION);
  const out = Buffer.alloc(regions * 32);
  for (let i = 0; i < regions; i++) {
    opts.signal?.throwIfAborted();
    const offset = i * MANIFEST_REGION;
    const length = Math.min(MANIFEST_REGION, size - offset);
    createHash('sha256')
      .update(await source.read(offset, length, opts.signal))
      .digest()
      .copy(out, i * 32);
    opts.onBytes?.(length);
  }
  return out;
}
