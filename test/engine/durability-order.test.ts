// Data before the record that vouches for it: every durable progress save comes after a flush of the
// target that covers every chunk below the saved watermark.
import { describe, expect, it } from 'vitest';
import { DEFAULT_PARAMS } from '../../shared/engine/config.ts';
import type { Descriptor } from '../../shared/engine/descriptors.ts';
import type { DiskProgress } from '../../shared/engine/ports.ts';
import { replicate } from '../../shared/engine/replicate.ts';
import { KiB, MiB } from '../../shared/engine/units.ts';
import { VirtualClock } from '../../shared/runtime/virtual-clock.ts';
import { MemorySource, MemoryStateStore, MemoryTarget, randomBytes } from '../support/memory.ts';

/** A memory target whose writes become durable only at `flush`, with chunk latencies that vary. */
class VolatileTarget extends MemoryTarget {
  /** Seqs written (resolved) but not yet flushed, and those made durable by a flush. */
  readonly written = new Set<number>();
  readonly durable = new Set<number>();
  flushes = 0;

  constructor(private readonly vclock: VirtualClock) {
    super({ clock: vclock });
  }

  override async writeChunk(d: Descriptor, data: Uint8Array, sha256: string): Promise<void> {
    // Every third chunk is slow, so chunks complete out of order around the saves.
    await this.vclock.sleep(d.seq % 3 === 0 ? 40 : 5);
    await super.writeChunk(d, data, sha256);
    this.written.add(d.seq);
  }

  async flush(): Promise<void> {
    this.flushes++;
    for (const seq of this.written) this.durable.add(seq);
    this.written.clear();
  }
}

describe('durability order', () => {
  it('flushes the target before every progress save, covering every chunk below its watermark', async () => {
    // Prepare
    const clock = new VirtualClock();
    const target = new VolatileTarget(clock);
    const state = new MemoryStateStore();
    const checks: { watermark: number; missing: number[] }[] = [];
    const save = state.saveProgress.bind(state);
    state.saveProgress = async (set, disk, progress: Omit<DiskProgress, 'digests'>, appended) => {
      const missing: number[] = [];
      for (let seq = 0; seq < progress.watermark; seq++) if (!target.durable.has(seq)) missing.push(seq);
      checks.push({ watermark: progress.watermark, missing });
      return save(set, disk, progress, appended);
    };
    const source = new MemorySource(randomBytes(12 * MiB, 7));
    // Act
    await replicate(
      {
        set: 's',
        disks: [{ id: 'd', source, target, changed: undefined }],
        params: {
          ...DEFAULT_PARAMS,
          chunkSize: 256 * KiB,
          checkpointInterval: MiB,
          window: 2 * MiB,
          windowLevels: [MiB, 2 * MiB],
        },
      },
      { clock, random: () => 0.5, state },
    );
    // Assess: several saves happened, none vouched for a chunk that was not yet flushed.
    expect(checks.length).toBeGreaterThan(5);
    expect(checks.filter((c) => c.missing.length > 0)).toEqual([]);
    expect(target.flushes).toBeGreaterThanOrEqual(checks.length);
  });
});
