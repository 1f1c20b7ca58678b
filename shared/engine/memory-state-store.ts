// An in-memory StateStore: progress and the checkpoint catalog in maps, gone with the process. For
// the engine's tests and the fleet simulation (bench/sim.ts); it keeps the port's contract (an atomic
// save, a checkpoint published exactly once) so what runs on it runs on a durable store too.
import { FerryError } from './errors.ts';
import type { DiskProgress, RecoveryCheckpoint, StateStore } from './ports.ts';

export class MemoryStateStore implements StateStore {
  private readonly progress = new Map<string, DiskProgress>();
  private readonly catalog: RecoveryCheckpoint[] = [];
  saves = 0;

  async loadProgress(set: string, disk: string): Promise<DiskProgress | undefined> {
    return this.progress.get(`${set}/${disk}`);
  }
  async saveProgress(
    set: string,
    disk: string,
    p: Omit<DiskProgress, 'digests'>,
    appended: readonly string[],
  ): Promise<void> {
    const prev = this.progress.get(`${set}/${disk}`);
    const same = prev?.cycleId === p.cycleId && prev.fingerprint === p.fingerprint;
    const digests = [...(same ? prev.digests.slice(0, prev.watermark) : []), ...appended];
    if (digests.length !== p.watermark)
      throw new FerryError(`digest count ${digests.length} != watermark ${p.watermark}`);
    this.progress.set(`${set}/${disk}`, { ...p, digests });
    this.saves++;
  }
  async clearProgress(set: string, disk: string): Promise<void> {
    this.progress.delete(`${set}/${disk}`);
  }
  async publishCheckpoint(cp: RecoveryCheckpoint): Promise<void> {
    if (this.catalog.some((c) => c.id === cp.id || (c.set === cp.set && c.sequence === cp.sequence))) {
      throw new FerryError(`checkpoint ${cp.id} is already published`);
    }
    this.catalog.push(cp);
  }
  async latestCheckpoint(set: string): Promise<RecoveryCheckpoint | undefined> {
    return this.catalog.filter((c) => c.set === set).at(-1);
  }
  async listCheckpoints(set?: string): Promise<RecoveryCheckpoint[]> {
    return this.catalog.filter((c) => set === undefined || c.set === set);
  }
}
