// The EBS adapters through the real engine against the EBS direct API emulator: file -> EBS and
// EBS -> EBS, full then incremental, a throttling storm, a permanent failure, a crash and a resume.
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { type EbsEmulatorOptions, startEbsEmulator } from '../../local-cloud/emulators/ebs/server.ts';
import { createEbsClient } from '../../shared/aws/ebs/client.ts';
import { EBS_BLOCK_SIZE } from '../../shared/aws/ebs/errors.ts';
import { FileBlockLedger, type MemoryBlockLedger } from '../../shared/aws/ebs/ledger.ts';
import { collectExtents, EbsSource } from '../../shared/aws/ebs/source.ts';
import type { SnapshotStatusReader } from '../../shared/aws/ebs/status.ts';
import { EbsTarget, ebsCycleFor } from '../../shared/aws/ebs/target.ts';
import {
  completeSnapshot,
  putSnapshotBlocks,
  snapshotClientToken,
  startSnapshot,
} from '../../shared/aws/ebs/writer.ts';
import { DEFAULT_PARAMS, type ReplicationParams } from '../../shared/engine/config.ts';
import { AbortedError, FerryError } from '../../shared/engine/errors.ts';
import type { Extent } from '../../shared/engine/extents.ts';
import type { DiskSource, StateStore } from '../../shared/engine/ports.ts';
import { type ReplicationEvent, replicate } from '../../shared/engine/replicate.ts';
import { KiB, MiB } from '../../shared/engine/units.ts';
import { FileSource } from '../../shared/local/file-source.ts';
import { systemClock } from '../../shared/runtime/clock.ts';
import { MemoryStateStore, randomBytes } from '../support/memory.ts';

const B = EBS_BLOCK_SIZE;
const credentials = { accessKeyId: 'test', secretAccessKey: 'test' };

let dir: string;
const cleanup: (() => Promise<void>)[] = [];

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'ferry-ebs-e2e-'));
});
afterEach(async () => {
  for (const f of cleanup.splice(0).reverse()) await f();
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

async function setup(opts: EbsEmulatorOptions = {}) {
  const emu = await startEbsEmulator({ completionDelayMs: { min: 0, max: 20 }, ...opts });
  const client = createEbsClient({ endpoint: emu.endpoint, region: 'us-east-1', credentials });
  cleanup.push(async () => {
    client.destroy();
    await emu.stop();
  });
  // EBS has no status call; the emulator's state stands in for EC2 DescribeSnapshots.
  const statusReader: SnapshotStatusReader = {
    read: async (id) => {
      const view = emu.state.describeSnapshot(id);
      return view && { status: view.status, message: view.statusMessage };
    },
  };
  const deps = { client, random: () => 0.5 };
  return { emu, client, statusReader, deps };
}

type Harness = Awaited<ReturnType<typeof setup>>;

const params = (over: Partial<ReplicationParams> = {}): ReplicationParams => ({ ...DEFAULT_PARAMS, ...over });

/** One engine cycle of one disk into an EBS snapshot; the cycle and parent come from the catalog. */
async function cycle(
  h: Harness,
  opts: {
    state: StateStore;
    source: DiskSource;
    changed: Extent[] | undefined;
    set?: string;
    disk?: string;
    params?: ReplicationParams;
    ledger?: MemoryBlockLedger | FileBlockLedger;
    encrypted?: boolean;
    signal?: AbortSignal;
    onEvent?: (e: ReplicationEvent) => void;
  },
) {
  const set = opts.set ?? 'vm';
  const disk = opts.disk ?? 'sda';
  const { cycle: cycleId, parentSnapshotId } = await ebsCycleFor(opts.state, set, disk);
  const target = new EbsTarget({
    ...h.deps,
    set,
    disk,
    cycle: cycleId,
    parentSnapshotId,
    statusReader: h.statusReader,
    ledger: opts.ledger,
    encrypted: opts.encrypted,
  });
  try {
    const result = await replicate(
      {
        set,
        disks: [{ id: disk, source: opts.source, target, changed: opts.changed }],
        params: opts.params ?? params(),
      },
      {
        clock: systemClock,
        random: () => 0.5,
        state: opts.state,
        ...(opts.signal ? { signal: opts.signal } : {}),
        ...(opts.onEvent ? { onEvent: opts.onEvent } : {}),
      },
    );
    return { result, target, snapshotId: target.snapshotId! };
  } finally {
    await target.close();
  }
}

/** Reads a whole snapshot back through EbsSource (GetSnapshotBlock, checksums verified). */
async function readSnapshot(h: Harness, snapshotId: string, bytes: number): Promise<Buffer> {
  const source = await EbsSource.open({ ...h.deps, snapshotId });
  try {
    const data = await source.read(0, bytes);
    return Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  } finally {
    await source.close();
  }
}

/** Block indexes a snapshot holds data for (its whole chain). */
async function allocatedBlocks(h: Harness, snapshotId: string): Promise<number[]> {
  const source = await EbsSource.open({ ...h.deps, snapshotId });
  const out: number[] = [];
  for (const e of await collectExtents(source.allocatedExtents())) {
    for (let off = e.offset; off < e.offset + e.length; off += B) out.push(off / B);
  }
  return out;
}

/**
 * Whether two snapshots read the same, block by block over every block either one holds (a 1 GiB
 * volume is compared without allocating 1 GiB: untouched pages are slow to fault in here).
 */
async function sameContent(h: Harness, a: string, b: string): Promise<boolean> {
  const blocks = [...new Set([...(await allocatedBlocks(h, a)), ...(await allocatedBlocks(h, b))])];
  const [ra, rb] = [
    await EbsSource.open({ ...h.deps, snapshotId: a }),
    await EbsSource.open({ ...h.deps, snapshotId: b }),
  ];
  try {
    for (const index of blocks) {
      const [x, y] = [await ra.read(index * B, B), await rb.read(index * B, B)];
      if (!Buffer.from(x.buffer, x.byteOffset, x.length).equals(y)) return false;
    }
    return blocks.length > 0;
  } finally {
    await ra.close();
    await rb.close();
  }
}

function nonZeroBlocks(image: Uint8Array): number {
  let n = 0;
  for (let off = 0; off < image.length; off += B) {
    if (image.subarray(off, Math.min(off + B, image.length)).some((x) => x !== 0)) n++;
  }
  return n;
}

/** A sparse image: runs of data (some 4 KiB, some whole blocks) in an otherwise zero disk. */
function sparseImage(size: number, seed: number): Uint8Array {
  const image = new Uint8Array(size);
  const noise = randomBytes(size, seed);
  for (let off = 0; off < size; off += 3 * B) {
    const len = (off / B) % 2 === 0 ? B : 4 * KiB;
    image.set(noise.subarray(off, Math.min(off + len, size)), off);
  }
  return image;
}

/** Scattered small writes (every fourth zeroes a whole block that held data); returns the change map. */
function mutate(image: Uint8Array, count: number, seed: number): Extent[] {
  const changed: Extent[] = [];
  const noise = randomBytes(count * 16 * KiB, seed);
  let x = seed;
  for (let i = 0; i < count; i++) {
    x = (x * 1103515245 + 12345) % 2 ** 31;
    if (i % 4 === 0) {
      const block = (x % Math.floor(image.length / B / 3)) * 3; // a data-holding block of sparseImage
      image.fill(0, block * B, block * B + B);
      changed.push({ offset: block * B, length: B });
    } else {
      const offset = (x % Math.floor((image.length - 16 * KiB) / 512)) * 512;
      const length = 512 * (1 + (x % 32));
      image.set(noise.subarray(i * 16 * KiB, i * 16 * KiB + length), offset);
      changed.push({ offset, length });
    }
  }
  return changed;
}

async function writeImage(path: string, image: Uint8Array): Promise<void> {
  await writeFile(path, image);
}

/** Makes a completed snapshot in the emulator with the given blocks (an EBS source to copy from). */
async function makeSnapshot(
  h: Harness,
  blocks: Map<number, Uint8Array>,
  opts: { parent?: string; token: string; sizeGiB?: number },
): Promise<string> {
  const { snapshotId } = await startSnapshot(h.deps, {
    disk: 'fixture',
    volumeSizeGiB: opts.sizeGiB ?? 1,
    clientToken: opts.token,
    timeoutMinutes: 60,
    parentSnapshotId: opts.parent,
  });
  const written = await putSnapshotBlocks(h.deps, {
    disk: 'fixture',
    snapshotId,
    blocks: [...blocks].map(([index, data]) => ({ index, data })),
    zeroBlocks: 'write',
  });
  await completeSnapshot(h.deps, {
    disk: 'fixture',
    snapshotId,
    changedBlocksCount: written.length,
    blockDigests: written.map((w) => w.digest),
  });
  for (let i = 0; i < 100 && h.emu.state.describeSnapshot(snapshotId)?.status === 'pending'; i++) {
    await systemClock.sleep(5);
  }
  expect(h.emu.state.describeSnapshot(snapshotId)?.status).toBe('completed');
  return snapshotId;
}

describe('EBS target and source through the engine', () => {
  it('copies a sparse file in full (zero blocks skipped) and then a fragmented increment into a child snapshot', async () => {
    // Prepare: a 24 MiB + 100 KiB sparse disk (the last block is short).
    const h = await setup();
    const size = 24 * MiB + 100 * KiB;
    const image = sparseImage(size, 3);
    const path = join(dir, 'sparse.img');
    await writeImage(path, image);
    const state = new MemoryStateStore();

    // Act 1: full copy.
    const src1 = await FileSource.open(path);
    const full = await cycle(h, { state, source: src1, changed: undefined }).finally(() => src1.close());

    // Assess 1: only non-zero blocks were written, the snapshot completed (EBS checked count and
    // LINEAR aggregate), and it reads back byte for byte.
    const first = full.snapshotId;
    expect(full.result.checkpoint.disks[0]!.targetRef).toBe(first);
    expect(full.result.checkpoint.disks[0]!.target).toBe(`ebs://${first}`);
    const view1 = h.emu.state.describeSnapshot(first)!;
    expect(view1.status).toBe('completed');
    expect(view1.volumeSize).toBe(1);
    expect(view1.blocksWritten).toBe(nonZeroBlocks(image));
    expect(view1.blocksWritten).toBeLessThan(Math.ceil(size / B));
    expect((await readSnapshot(h, first, size)).equals(Buffer.from(image))).toBe(true);

    // Act 2: 60 scattered writes, every fourth zeroing a block that held data.
    const changed = mutate(image, 60, 11);
    await writeImage(path, image);
    const src2 = await FileSource.open(path);
    const incr = await cycle(h, { state, source: src2, changed }).finally(() => src2.close());

    // Assess 2: a child of the first snapshot; zeroed blocks were written (the parent's data must
    // not show through), and the child reads back as the new image.
    const second = incr.snapshotId;
    const view2 = h.emu.state.describeSnapshot(second)!;
    expect(view2).toMatchObject({ status: 'completed', parentId: first });
    expect(incr.result.checkpoint.disks[0]).toMatchObject({ kind: 'incremental', targetRef: second });
    const touched = new Set<number>();
    for (const e of changed) {
      for (let b = Math.floor(e.offset / B); b * B < e.offset + e.length; b++) touched.add(b);
    }
    expect(view2.blocksWritten).toBe(touched.size);
    expect((await readSnapshot(h, second, size)).equals(Buffer.from(image))).toBe(true);
    expect(Math.max(...(await allocatedBlocks(h, second)))).toBeLessThan(Math.ceil(size / B));
    expect(await state.listCheckpoints('vm')).toHaveLength(2);
  });

  it('copies EBS to EBS: a full copy of a snapshot, then the changes ListChangedBlocks reports', async () => {
    // Prepare: a source volume snapshot A; then siblings B1 (A + block 40) and B2 (A with blocks
    // 3 and 9 rewritten, block 5 zeroed). Diffing B1 -> B2 gives block 40 with no second token:
    // it reads as zeros in B2.
    const h = await setup();
    const a = new Map<number, Uint8Array>();
    for (const i of [0, 1, 2, 3, 5, 9, 10, 11, 300, 2047]) a.set(i, randomBytes(B, 100 + i));
    const snapA = await makeSnapshot(h, a, { token: 'src-a' });
    const snapB1 = await makeSnapshot(h, new Map([[40, randomBytes(B, 40)]]), {
      parent: snapA,
      token: 'src-b1',
    });
    const b2 = new Map<number, Uint8Array>([
      [3, randomBytes(B, 203)],
      [9, randomBytes(B, 209)],
      [5, new Uint8Array(B)],
      [1500, randomBytes(B, 1500)],
    ]);
    const snapB2 = await makeSnapshot(h, b2, { parent: snapA, token: 'src-b2' });
    const state = new MemoryStateStore();

    // Act 1: full copy of B1.
    const full1 = await EbsSource.open({ ...h.deps, snapshotId: snapB1 });
    const full = await cycle(h, { state, source: full1, changed: undefined }).finally(() => full1.close());

    // Assess 1: the target holds B1's blocks exactly.
    expect(await allocatedBlocks(h, full.snapshotId)).toEqual(await allocatedBlocks(h, snapB1));
    expect(await sameContent(h, full.snapshotId, snapB1)).toBe(true);

    // Act 2: the increment B1 -> B2, from ListChangedBlocks.
    const diff = await EbsSource.open({ ...h.deps, snapshotId: snapB2, baseSnapshotId: snapB1 });
    expect(diff.name).toBe(`ebs-diff://${snapB1}..${snapB2}`);
    const changed = await collectExtents(diff.changedExtents());
    const incr = await cycle(h, { state, source: diff, changed }).finally(() => diff.close());

    // Assess 2: changed = B2's writes and block 40 (only in B1); the child equals B2.
    expect(changed.map((e) => [e.offset / B, e.length / B])).toEqual([
      [3, 1],
      [5, 1],
      [9, 1],
      [40, 1],
      [1500, 1],
    ]);
    expect(h.emu.state.describeSnapshot(incr.snapshotId)).toMatchObject({
      status: 'completed',
      parentId: full.snapshotId,
      blocksWritten: 5,
    });
    expect(await sameContent(h, incr.snapshotId, snapB2)).toBe(true);
    const block40 = await readSnapshot(h, incr.snapshotId, 41 * B);
    expect(block40.subarray(40 * B).every((x) => x === 0)).toBe(true);
    expect(block40.subarray(0, B).equals(a.get(0)!)).toBe(true);
  });

  it('steps the window down under a throttling storm and still completes bit-exact', async () => {
    // Prepare: 32 MiB of data, and the next 60 PutSnapshotBlock calls throttled per snapshot.
    const h = await setup({ latency: { fixedMs: 2 } });
    const image = randomBytes(32 * MiB, 21);
    const path = join(dir, 'storm.img');
    await writeImage(path, image);
    h.emu.faults.throttleNext('PutSnapshotBlock', 60, 'RESOURCE_LEVEL_THROTTLE');
    const events: ReplicationEvent[] = [];
    const state = new MemoryStateStore();

    // Act
    const source = await FileSource.open(path);
    const run = await cycle(h, {
      state,
      source,
      changed: undefined,
      params: params({ adaptive: true }),
      onEvent: (e) => events.push(e),
    }).finally(() => source.close());

    // Assess: throttles were retried, the controller stepped the window down, the copy is exact.
    expect(h.emu.counters.throttledByReason.RESOURCE_LEVEL_THROTTLE).toBe(60);
    expect(events.filter((e) => e.type === 'retry').length).toBeGreaterThan(0);
    const windows = events.flatMap((e) => (e.type === 'window' ? [e.window] : []));
    expect(windows.length).toBeGreaterThan(0);
    expect(Math.min(...windows)).toBeLessThan(DEFAULT_PARAMS.window);
    expect((await readSnapshot(h, run.snapshotId, image.length)).equals(Buffer.from(image))).toBe(true);
  });

  it('fails fast on a permanent error, naming disk, block and snapshot, and publishes nothing', async () => {
    // Prepare
    const h = await setup();
    const image = randomBytes(16 * MiB, 5);
    const path = join(dir, 'denied.img');
    await writeImage(path, image);
    h.emu.faults.accessDenied('PutSnapshotBlock');
    const state = new MemoryStateStore();

    // Act
    const source = await FileSource.open(path);
    const err = await cycle(h, { state, source, changed: undefined })
      .finally(() => source.close())
      .catch((e: unknown) => e);

    // Assess: one attempt per block at most (no retries of a permanent error), a message an
    // operator can act on, and no checkpoint.
    expect(err).toBeInstanceOf(FerryError);
    const message = (err as Error).message;
    expect(message).toMatch(
      /^disk sda: EBS PutSnapshotBlock of block \d+ in snapshot snap-[0-9a-f]+ was refused/,
    );
    expect(message).toContain('AccessDeniedException');
    expect(message).toContain('ebs:PutSnapshotBlock');
    expect((err as FerryError).disk).toBe('sda');
    expect(h.emu.counters.calls.PutSnapshotBlock).toBeLessThanOrEqual(image.length / B);
    expect(h.emu.counters.calls.CompleteSnapshot).toBe(0);
    expect(await state.listCheckpoints('vm')).toHaveLength(0);
  });

  it('resumes a crashed cycle into the same snapshot, with the right block count and aggregate', async () => {
    // Prepare: 24 MiB, progress made durable every 2 MiB, a file ledger (it survives the "crash").
    const h = await setup();
    const image = sparseImage(24 * MiB, 9);
    image.set(randomBytes(8 * MiB, 10), 4 * MiB);
    const path = join(dir, 'resume.img');
    await writeImage(path, image);
    const state = new MemoryStateStore();
    const ledgerDir = join(dir, 'ledger');
    const p = params({ checkpointInterval: 2 * MiB, adaptive: false, window: 4 * MiB });

    // Act 1: abort after the second durable checkpoint of progress.
    const abort = new AbortController();
    let saves = 0;
    const src1 = await FileSource.open(path);
    const crashed = await cycle(h, {
      state,
      source: src1,
      changed: undefined,
      params: p,
      ledger: new FileBlockLedger(ledgerDir),
      signal: abort.signal,
      onEvent: (e) => {
        if (e.type === 'checkpoint-saved' && ++saves === 2) abort.abort();
      },
    })
      .finally(() => src1.close())
      .catch((e: unknown) => e);
    expect(crashed).toBeInstanceOf(AbortedError);
    const [started] = h.emu.state.snapshotIds();
    expect(h.emu.state.describeSnapshot(started!)?.status).toBe('pending');
    const writtenBefore = h.emu.counters.succeeded.PutSnapshotBlock;

    // Act 2: a new process: new target, new ledger object over the same directory.
    const src2 = await FileSource.open(path);
    const resumed = await cycle(h, {
      state,
      source: src2,
      changed: undefined,
      params: p,
      ledger: new FileBlockLedger(ledgerDir),
    }).finally(() => src2.close());

    // Assess: same snapshot, completed (EBS accepted count and LINEAR aggregate), resumed rather
    // than restarted, and bit-exact.
    expect(resumed.snapshotId).toBe(started);
    expect(h.emu.state.snapshotIds()).toEqual([started]);
    expect(resumed.result.disks[0]!.resumedBytes).toBeGreaterThan(0);
    expect(h.emu.state.describeSnapshot(started!)).toMatchObject({
      status: 'completed',
      blocksWritten: nonZeroBlocks(image),
    });
    expect(h.emu.counters.succeeded.PutSnapshotBlock - writtenBefore).toBeLessThan(nonZeroBlocks(image));
    expect((await readSnapshot(h, started!, image.length)).equals(Buffer.from(image))).toBe(true);
    // Published: the ledger is cleared.
    expect(await new FileBlockLedger(ledgerDir).load('vm/sda')).toBeUndefined();
  });
});

// Keeps the token helper honest: one cycle of one disk, one token; another attempt, another.
describe('snapshotClientToken', () => {
  it('is deterministic per set, disk, cycle and attempt', () => {
    const t = snapshotClientToken({ set: 'vm', disk: 'sda', cycle: 'vm#3' });
    expect(t).toBe(snapshotClientToken({ set: 'vm', disk: 'sda', cycle: 'vm#3', attempt: 1 }));
    expect(t).not.toBe(snapshotClientToken({ set: 'vm', disk: 'sdb', cycle: 'vm#3' }));
    expect(t).not.toBe(snapshotClientToken({ set: 'vm', disk: 'sda', cycle: 'vm#4' }));
    expect(t).not.toBe(snapshotClientToken({ set: 'vm', disk: 'sda', cycle: 'vm#3', attempt: 2 }));
    expect(t.length).toBeLessThanOrEqual(64);
  });
});
