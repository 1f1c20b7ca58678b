// The replication cycle over in-memory ports: correctness, resume, failures and flow control.
import { describe, expect, it } from 'vitest';
import { DEFAULT_PARAMS, type ReplicationParams } from '../../shared/engine/config.ts';
import { FerryError, TransferError } from '../../shared/engine/errors.ts';
import type { Extent } from '../../shared/engine/extents.ts';
import { linearAggregate, sha256Hex } from '../../shared/engine/integrity.ts';
import { type DiskJob, type ReplicationEvent, replicate } from '../../shared/engine/replicate.ts';
import { KiB, MiB } from '../../shared/engine/units.ts';
import { VirtualClock } from '../../shared/runtime/virtual-clock.ts';
import { MemorySource, MemoryStateStore, MemoryTarget, randomBytes } from '../support/memory.ts';

const params = (over: Partial<ReplicationParams> = {}): ReplicationParams => ({ ...DEFAULT_PARAMS, ...over });

function setup(opts: { clock?: VirtualClock } = {}) {
  const clock = opts.clock ?? new VirtualClock();
  const state = new MemoryStateStore();
  const events: ReplicationEvent[] = [];
  const ports = { clock, random: () => 0.5, state, onEvent: (e: ReplicationEvent) => events.push(e) };
  return { clock, state, events, ports };
}

/** Applies changes to a copy of `data` and returns the new data with the change map. */
function mutate(
  data: Uint8Array,
  count: number,
  size: number,
  seed: number,
): { next: Uint8Array; changed: Extent[] } {
  const next = data.slice();
  const noise = randomBytes(count * size, seed);
  const changed: Extent[] = [];
  let x = seed;
  for (let i = 0; i < count; i++) {
    x = (x * 1103515245 + 12345) % 2 ** 31;
    const offset = (x % Math.floor((data.length - size) / 512)) * 512;
    // Every fifth change writes zeros: an incremental must carry zeroed blocks too.
    next.set(i % 5 === 0 ? new Uint8Array(size) : noise.subarray(i * size, (i + 1) * size), offset);
    changed.push({ offset, length: size });
  }
  return { next, changed };
}

describe('replicate', () => {
  it('copies a disk in full and then incrementally from a fragmented change map, bit-exact', async () => {
    // Prepare
    const { ports, state } = setup();
    const v1 = randomBytes(24 * MiB, 7);
    const target = new MemoryTarget();
    // Act: base copy
    const full = await replicate(
      {
        set: 's',
        disks: [{ id: 'd', source: new MemorySource(v1), target, changed: undefined }],
        params: params(),
      },
      ports,
    );
    // Assess
    expect(Buffer.from(target.image!).equals(Buffer.from(v1))).toBe(true);
    expect(full.checkpoint.sequence).toBe(1);
    // Act: 3,000 scattered 4 KiB changes
    const { next: v2, changed } = mutate(v1, 3000, 4 * KiB, 3);
    const inc = await replicate(
      { set: 's', disks: [{ id: 'd', source: new MemorySource(v2), target, changed }], params: params() },
      ports,
    );
    // Assess
    expect(Buffer.from(target.image!).equals(Buffer.from(v2))).toBe(true);
    expect(inc.checkpoint.parent).toBe(full.checkpoint.id);
    expect(inc.disks[0]!.kind).toBe('incremental');
    expect(inc.disks[0]!.bytesSent).toBeLessThan(3000 * 4 * KiB + 1);
    // Sparse descriptors pack many small extents per chunk: far fewer chunks than extents.
    expect(inc.disks[0]!.chunks).toBeLessThan(1000);
    expect(await state.listCheckpoints('s')).toHaveLength(2);
  });

  it('records the LINEAR aggregate of the chunk digests in sequence order', async () => {
    const { ports } = setup();
    const data = randomBytes(5 * MiB + 8 * KiB, 9);
    const target = new MemoryTarget();
    const r = await replicate(
      {
        set: 's',
        disks: [{ id: 'd', source: new MemorySource(data), target, changed: undefined }],
        params: params(),
      },
      ports,
    );
    // Chunks of 1 MiB from offset 0; the last one is 8 KiB.
    const digests = [];
    for (let off = 0; off < data.length; off += MiB) digests.push(sha256Hex(data.subarray(off, off + MiB)));
    expect(r.disks[0]!.aggregate).toEqual({
      algorithm: 'ferry-chunk-sha256',
      value: Buffer.from(linearAggregate(digests)).toString('hex'),
    });
    expect(r.disks[0]!.chunks).toBe(6);
  });

  it('replicates several disks in one checkpoint, never holding more than the node budget', async () => {
    const { ports, clock } = setup();
    const disks: DiskJob[] = [];
    const targets: MemoryTarget[] = [];
    const shared = { latencyMs: 20, clock };
    let peak = 0;
    for (let i = 0; i < 4; i++) {
      const t: MemoryTarget = new MemoryTarget(
        {
          ...shared,
          beforeWrite: () => {
            peak = Math.max(
              peak,
              targets.reduce((s, x) => s + x.inflight, 0),
            );
          },
        },
        `mem:d${i}`,
      );
      targets.push(t);
      disks.push({
        id: `d${i}`,
        source: new MemorySource(randomBytes((8 + i * 8) * MiB, i + 1)),
        target: t,
        changed: undefined,
      });
    }
    const budget = 24 * MiB;
    const r = await replicate({ set: 's', disks, params: params({ nodeBudget: budget }) }, ports);
    expect(r.checkpoint.disks).toHaveLength(4);
    for (const [i, d] of disks.entries()) {
      expect(Buffer.from(targets[i]!.image!).equals(Buffer.from((d.source as MemorySource).data))).toBe(true);
    }
    expect(peak).toBeGreaterThan(0);
    expect(peak).toBeLessThanOrEqual(budget);
  });

  it('resumes after a crash from the last intermediate checkpoint, re-sending at most interval + window', async () => {
    // Prepare: a write that dies for good after 40 MiB have been written.
    const { ports, state, clock } = setup();
    const data = randomBytes(96 * MiB, 11);
    const interval = 8 * MiB;
    const window = 16 * MiB;
    const p = params({ checkpointInterval: interval, window, adaptive: false });
    let written = 0;
    const crashing = new MemoryTarget({
      latencyMs: 5,
      clock,
      beforeWrite: (d) => {
        if (written >= 40 * MiB)
          throw new TransferError(`node lost power at ${d.offset}`, { retryable: false });
        written += d.bytes;
      },
    });
    // Act
    await expect(
      replicate(
        {
          set: 's',
          disks: [{ id: 'd', source: new MemorySource(data), target: crashing, changed: undefined }],
          params: p,
        },
        ports,
      ),
    ).rejects.toThrow(/disk d: chunk \d+ at offset \d+ failed: node lost power/);
    // Assess: nothing published, progress durable.
    expect(await state.listCheckpoints()).toHaveLength(0);
    const saved = await state.loadProgress('s', 'd');
    expect(saved!.bytesDone).toBeGreaterThanOrEqual(40 * MiB - interval - window);

    // Act: rerun on a fresh target process that keeps the staged chunks (same target object).
    const sentBefore = crashing.bytesWritten;
    const healthy = crashing;
    (healthy as unknown as { opts: object }).opts = {};
    const r = await replicate(
      {
        set: 's',
        disks: [{ id: 'd', source: new MemorySource(data), target: healthy, changed: undefined }],
        params: p,
      },
      ports,
    );
    // Assess: bit-exact, and re-sent bytes (sent twice in total) bounded by interval + window.
    expect(Buffer.from(healthy.image!).equals(Buffer.from(data))).toBe(true);
    const resent = sentBefore + r.disks[0]!.bytesSent - data.length;
    expect(r.disks[0]!.resumedBytes).toBe(saved!.bytesDone);
    expect(resent).toBeLessThanOrEqual(interval + window);
    expect(r.checkpoint.disks[0]!.aggregate.value).toBe(
      Buffer.from(linearAggregate(chunksOf(data, MiB).map((c) => sha256Hex(c)))).toString('hex'),
    );
  });

  it('retries transient failures and throttles, steps the window down, and still completes', async () => {
    const { ports, events, clock } = setup();
    // A third of all writes throttled, on a 400 ms target: the storm spans many evaluations.
    const data = randomBytes(128 * MiB, 5);
    let n = 0;
    const target = new MemoryTarget({
      latencyMs: 400,
      clock,
      beforeWrite: (d) => {
        n++;
        if (n % 3 === 0)
          throw new TransferError(`throttled at ${d.offset}`, { retryable: true, throttled: true });
      },
    });
    const r = await replicate(
      {
        set: 's',
        disks: [{ id: 'd', source: new MemorySource(data), target, changed: undefined }],
        params: params(),
      },
      ports,
    );
    expect(Buffer.from(target.image!).equals(Buffer.from(data))).toBe(true);
    expect(events.filter((e) => e.type === 'retry').length).toBeGreaterThan(10);
    const windows = events.filter((e) => e.type === 'window');
    expect(windows.length).toBeGreaterThan(0);
    expect(Math.min(...windows.map((e) => (e.type === 'window' ? e.window : Infinity)))).toBe(16 * MiB);
    expect(r.checkpoint.sequence).toBe(1);
  });

  it('fails fast on a permanent error, names disk and offset, and keeps the last checkpoint current', async () => {
    const { ports, state } = setup();
    const v1 = randomBytes(8 * MiB, 1);
    const target = new MemoryTarget();
    await replicate(
      {
        set: 's',
        disks: [{ id: 'web', source: new MemorySource(v1), target, changed: undefined }],
        params: params(),
      },
      ports,
    );
    const before = target.image!.slice();
    const denied = new MemoryTarget({
      beforeWrite: (d) => {
        if (d.offset >= 2 * MiB) throw new TransferError('AccessDenied', { retryable: false });
      },
    });
    denied.image = before.slice();
    const { next, changed } = mutate(v1, 50, 64 * KiB, 2);
    const err = await replicate(
      {
        set: 's',
        disks: [{ id: 'web', source: new MemorySource(next), target: denied, changed }],
        params: params(),
      },
      ports,
    ).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(FerryError);
    expect((err as FerryError).disk).toBe('web');
    expect((err as Error).message).toMatch(/disk web: chunk \d+ at offset \d+ failed: AccessDenied/);
    expect(await state.listCheckpoints('s')).toHaveLength(1);
    expect(denied.commits).toBe(0);
    expect(Buffer.from(denied.image!).equals(Buffer.from(before))).toBe(true);
  });

  it('keeps a high-latency target busy: throughput follows window / latency (virtual time)', async () => {
    // 64 MiB at 100 ms per write. Stop-and-wait (window = 1 chunk) needs 64 round trips of 100 ms;
    // a 32 MiB window keeps 32 chunks in flight, so about 2 round trips plus ramp.
    const run = async (window: number) => {
      const { ports, clock } = setup();
      const target = new MemoryTarget({ latencyMs: 100, clock });
      const data = randomBytes(64 * MiB, 3);
      const r = await replicate(
        {
          set: 's',
          disks: [{ id: 'd', source: new MemorySource(data), target, changed: undefined }],
          params: params({ window, adaptive: false }),
        },
        ports,
      );
      return r.elapsedMs;
    };
    const stopAndWait = await run(MiB);
    const windowed = await run(32 * MiB);
    expect(stopAndWait).toBeGreaterThanOrEqual(64 * 100);
    expect(windowed).toBeLessThanOrEqual(3 * 100);
  });

  it('honours an abort: nothing is published and progress is kept', async () => {
    const { ports, state, clock } = setup();
    const abort = new AbortController();
    let writes = 0;
    const target = new MemoryTarget({
      latencyMs: 10,
      clock,
      beforeWrite: () => {
        if (++writes === 20) abort.abort();
      },
    });
    await expect(
      replicate(
        {
          set: 's',
          disks: [
            { id: 'd', source: new MemorySource(randomBytes(64 * MiB, 1)), target, changed: undefined },
          ],
          params: params({ checkpointInterval: MiB }),
        },
        { ...ports, signal: abort.signal },
      ),
    ).rejects.toThrow(/abort/);
    expect(await state.listCheckpoints()).toHaveLength(0);
    expect((await state.loadProgress('s', 'd'))?.bytesDone).toBeGreaterThan(0);
  });
});

function chunksOf(data: Uint8Array, size: number): Uint8Array[] {
  const out = [];
  for (let off = 0; off < data.length; off += size) out.push(data.subarray(off, off + size));
  return out;
}
