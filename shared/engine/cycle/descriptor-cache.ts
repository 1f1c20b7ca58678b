// Descriptor lookups by seq, page-cached (LRU) per container: one page read serves many grants.
import { pageOf } from './descriptor-pages.ts';
import { CycleStateError } from './errors.ts';
import type { CycleDiskRecord, CycleLedger, PlannedDescriptor } from './ports.ts';

// Pages a warm container keeps: 64 pages of ~50 KB (200 descriptors with their block tokens) is ~3 MB.
export const PAGE_CACHE_ENTRIES = 64;

type DiskRef = Pick<CycleDiskRecord, 'set' | 'disk' | 'cycleId' | 'perPage'>;

export class DescriptorCache {
  private readonly pages = new Map<string, Promise<PlannedDescriptor[]>>();

  constructor(
    private readonly ledger: Pick<CycleLedger, 'getDescriptorPage'>,
    private readonly capacity = PAGE_CACHE_ENTRIES,
  ) {}

  /** The stored descriptor `seq` of the disk; CycleStateError when its page is missing or wrong. */
  async get(rec: DiskRef, seq: number): Promise<PlannedDescriptor> {
    const page = pageOf(seq, rec.perPage);
    const descriptors = await this.page(rec, page, seq);
    const d = descriptors[seq - page * rec.perPage];
    if (d === undefined || d.seq !== seq) {
      throw new CycleStateError(
        `descriptor page ${page} of disk ${rec.disk} in cycle ${rec.cycleId} does not hold seq ${seq}`,
        { set: rec.set, cycleId: rec.cycleId, disk: rec.disk, seq },
      );
    }
    return d;
  }

  /** Several descriptors by seq (each page read once). */
  async many(rec: DiskRef, seqs: readonly number[]): Promise<Map<number, PlannedDescriptor>> {
    const out = new Map<number, PlannedDescriptor>();
    for (const seq of seqs) out.set(seq, await this.get(rec, seq));
    return out;
  }

  private page(rec: DiskRef, page: number, seq: number): Promise<PlannedDescriptor[]> {
    const key = JSON.stringify([rec.set, rec.disk, rec.cycleId, page]);
    let entry = this.pages.get(key);
    if (entry === undefined) {
      entry = this.ledger.getDescriptorPage(rec.set, rec.disk, rec.cycleId, page).then((p) => {
        if (p === undefined) {
          throw new CycleStateError(
            `descriptor page ${page} of disk ${rec.disk} in cycle ${rec.cycleId} is missing (seq ${seq})`,
            { set: rec.set, cycleId: rec.cycleId, disk: rec.disk, seq },
          );
        }
        return p;
      });
      // A failed read is not cached.
      entry.catch(() => this.pages.delete(key));
      this.pages.set(key, entry);
      while (this.pages.size > this.capacity) this.pages.delete(this.pages.keys().next().value as string);
    } else {
      // Refresh its LRU position.
      this.pages.delete(key);
      this.pages.set(key, entry);
    }
    return entry;
  }
}
