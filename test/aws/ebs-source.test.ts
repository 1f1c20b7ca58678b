// EbsSource and the stateless List/Get functions against the EBS direct API emulator: paging
// (empty pages with tokens), change maps between snapshots, token caching, verified reads.
import { afterEach, describe, expect, it } from 'vitest';
import { openSource } from '../../cli/targets.ts';
import { type EbsEmulatorOptions, startEbsEmulator } from '../../local-cloud/emulators/ebs/server.ts';
import { createEbsClient } from '../../shared/aws/ebs/client.ts';
import { EBS_BLOCK_SIZE } from '../../shared/aws/ebs/errors.ts';
import { blockRuns, listChangedBlockPages } from '../../shared/aws/ebs/reader.ts';
import { collectExtents, EbsSource } from '../../shared/aws/ebs/source.ts';
import { ebsEndpointFromEnv, parseEbsSourceUri } from '../../shared/aws/ebs/uri.ts';
import { completeSnapshot, putSnapshotBlocks, startSnapshot } from '../../shared/aws/ebs/writer.ts';
import { ConfigError } from '../../shared/engine/errors.ts';
import type { Extent } from '../../shared/engine/extents.ts';
import { KiB } from '../../shared/engine/units.ts';
import { randomBytes } from '../support/memory.ts';

const B = EBS_BLOCK_SIZE;
const credentials = { accessKeyId: 'test', secretAccessKey: 'test' };
const cleanup: (() => Promise<void>)[] = [];

afterEach(async () => {
  for (const f of cleanup.splice(0).reverse()) await f();
});

async function setup(opts: EbsEmulatorOptions = {}) {
  const emu = await startEbsEmulator({ completionDelayMs: 0, ...opts });
  const client = createEbsClient({ endpoint: emu.endpoint, region: 'us-east-1', credentials });
  cleanup.push(async () => {
    client.destroy();
    await emu.stop();
  });
  const deps = { client, random: () => 0.5 };
  let n = 0;
  /** A completed snapshot holding `blocks` (index -> data), optionally a child of `parent`. */
  const snapshot = async (blocks: Map<number, Uint8Array>, parent?: string, sizeGiB = 1): Promise<string> => {
    const { snapshotId } = await startSnapshot(deps, {
      disk: 'fixture',
      volumeSizeGiB: sizeGiB,
      clientToken: `fixture-${n++}`,
      timeoutMinutes: 60,
      parentSnapshotId: parent,
    });
    const written = await putSnapshotBlocks(deps, {
      disk: 'fixture',
      snapshotId,
      blocks: [...blocks].map(([index, data]) => ({ index, data })),
      zeroBlocks: 'write',
    });
    await completeSnapshot(deps, {
      disk: 'fixture',
      snapshotId,
      changedBlocksCount: written.length,
      blockDigests: written.map((w) => w.digest),
    });
    expect(emu.state.describeSnapshot(snapshotId)?.status).toBe('completed');
    return snapshotId;
  };
  return { emu, client, deps, snapshot };
}

const asBlocks = (extents: Extent[]) => extents.map((e) => [e.offset / B, e.length / B]);

describe('EbsSource', () => {
  it("streams a snapshot's blocks page by page, through empty pages that still carry a token", async () => {
    // Prepare: three runs of blocks in a 4 GiB volume; pages scan 512 blocks, so most are empty.
    const { emu, deps, snapshot } = await setup({ listScanWindowBlocks: 512 });
    const data = randomBytes(B, 1);
    const blocks = new Map<number, Uint8Array>();
    for (const start of [0, 1000, 5000]) for (let i = start; i < start + 40; i++) blocks.set(i, data);
    const snap = await snapshot(blocks, undefined, 4);
    const source = await EbsSource.open({ ...deps, snapshotId: snap });
    emu.counters.reset();
    emu.faults.emptyPagesNext('ListSnapshotBlocks', 3);
    emu.faults.throttleNext('ListSnapshotBlocks', 2);

    // Act
    const extents = await collectExtents(source.allocatedExtents());

    // Assess: coalesced runs; pages of 512 blocks up to the last block (index 5039: 10 pages),
    // plus 3 forced empty ones and 2 throttled attempts that were retried.
    expect(source.sizeBytes).toBe(4 * 1024 ** 3);
    expect(asBlocks(extents)).toEqual([
      [0, 40],
      [1000, 40],
      [5000, 40],
    ]);
    expect(emu.counters.succeeded.ListSnapshotBlocks).toBe(10 + 3);
    expect(emu.counters.throttled.ListSnapshotBlocks).toBe(2);
  });

  it('lists the changes between two snapshots; a block only the first has reads as zeros in the second', async () => {
    // Prepare: A; B1 = A + block 7; B2 = A with block 3 rewritten. B1 -> B2 changes 3 and 7.
    const { emu, deps, snapshot } = await setup();
    const a = await snapshot(new Map([0, 3, 5].map((i) => [i, randomBytes(B, 10 + i)])));
    const b1 = await snapshot(new Map([[7, randomBytes(B, 7)]]), a);
    const new3 = randomBytes(B, 33);
    const b2 = await snapshot(new Map([[3, new3]]), a);

    // Act
    const pages = [];
    for await (const page of listChangedBlockPages(deps, { firstSnapshotId: b1, secondSnapshotId: b2 }))
      pages.push(page);
    const diff = await EbsSource.open({ ...deps, snapshotId: b2, baseSnapshotId: b1 });
    const changed = await collectExtents(diff.changedExtents());
    emu.counters.reset();
    const block3 = await diff.read(3 * B, B);
    const block7 = await diff.read(7 * B, B);

    // Assess
    const entries = pages.flatMap((p) => p.blocks);
    expect(entries.map((e) => [e.index, e.firstToken !== undefined, e.secondToken !== undefined])).toEqual([
      [3, true, true],
      [7, true, false],
    ]);
    expect(asBlocks(changed)).toEqual([
      [3, 1],
      [7, 1],
    ]);
    expect(Buffer.from(block3).equals(Buffer.from(new3))).toBe(true);
    expect(block7.every((x) => x === 0)).toBe(true);
    expect(emu.counters.calls.GetSnapshotBlock).toBe(1);
    expect(emu.counters.calls.ListSnapshotBlocks).toBe(0);
  });

  it('reads holes as zeros without a request, re-lists when its token cache is small, and reads each block once', async () => {
    // Prepare: blocks 2..5 and 9 of a 1 GiB volume; a token cache of one entry.
    const { emu, deps, snapshot } = await setup();
    const blocks = new Map([2, 3, 4, 5, 9].map((i) => [i, randomBytes(B, 50 + i)]));
    const snap = await snapshot(blocks);
    const source = await EbsSource.open({ ...deps, snapshotId: snap, tokenCacheSize: 1 });
    emu.counters.reset();

    // Act: 12 blocks in one read, then 4 KiB pieces of block 9.
    const whole = await source.read(0, 12 * B);
    const pieces = await Promise.all(
      [0, 1, 2, 3].map((k) => source.read(9 * B + k * 4 * KiB + 100, 4 * KiB)),
    );

    // Assess
    for (let i = 0; i < 12; i++) {
      const expected = blocks.get(i) ?? new Uint8Array(B);
      expect(Buffer.from(whole.subarray(i * B, (i + 1) * B)).equals(Buffer.from(expected))).toBe(true);
    }
    pieces.forEach((p, k) => {
      const from = k * 4 * KiB + 100;
      expect(Buffer.from(p).equals(Buffer.from(blocks.get(9)!.subarray(from, from + 4 * KiB)))).toBe(true);
    });
    expect(emu.counters.calls.GetSnapshotBlock).toBe(5);
    expect(emu.counters.calls.ListSnapshotBlocks).toBeGreaterThan(1);
  });

  it('coalesces block indexes into extents, clipped to the volume', async () => {
    async function* indexes() {
      yield* [0, 1, 2, 5, 7, 8];
    }
    const extents = [];
    for await (const e of blockRuns(indexes(), { volumeBytes: 8 * B + 100 })) extents.push(e);
    expect(extents).toEqual([
      { offset: 0, length: 3 * B },
      { offset: 5 * B, length: B },
      { offset: 7 * B, length: B + 100 },
    ]);
  });

  it('opens ebs:// through the local URI table, with the endpoint from FERRY_EBS_ENDPOINT', async () => {
    // Prepare
    const { emu, snapshot } = await setup();
    const data = randomBytes(B, 77);
    const snap = await snapshot(new Map([[3, data]]));
    const saved = { ...process.env };
    Object.assign(process.env, {
      FERRY_EBS_ENDPOINT: emu.endpoint,
      AWS_REGION: 'us-east-1',
      AWS_ACCESS_KEY_ID: 'test',
      AWS_SECRET_ACCESS_KEY: 'test',
    });
    try {
      // Act
      const source = await openSource(`ebs://${snap}`);
      const read = await source.read(3 * B, B);
      await source.close();

      // Assess
      expect(source.name).toBe(`ebs://${snap}`);
      expect(Buffer.from(read).equals(Buffer.from(data))).toBe(true);
    } finally {
      process.env = saved;
    }
    expect(parseEbsSourceUri('ebs-diff://snap-0a..snap-0b')).toEqual({
      snapshotId: 'snap-0b',
      baseSnapshotId: 'snap-0a',
    });
    expect(() => parseEbsSourceUri('ebs://vol-0a')).toThrow(/expected ebs:\/\/snap-/);
    expect(() => ebsEndpointFromEnv({ FERRY_EBS_ENDPOINT: 'localhost:4566' })).toThrow(
      /not an http\(s\) URL/,
    );
  });

  it('refuses reads past the end, ids that are not snapshots, and a change map without a base', async () => {
    const { deps, snapshot } = await setup();
    const snap = await snapshot(new Map([[0, randomBytes(B, 1)]]));
    const source = await EbsSource.open({ ...deps, snapshotId: snap });
    await expect(source.read(1024 ** 3 - B, 2 * B)).rejects.toThrow(
      /past the end of the 1073741824-byte volume/,
    );
    await expect(EbsSource.open({ ...deps, snapshotId: 'vol-0abc' })).rejects.toBeInstanceOf(ConfigError);
    await expect(collectExtents(source.changedExtents())).rejects.toThrow(/needs a base snapshot/);
    const missing = EbsSource.open({ ...deps, snapshotId: 'snap-0123456789abcdef0', disk: 'sdb' });
    await expect(missing).rejects.toThrow(
      /^disk sdb: EBS ListSnapshotBlocks in snapshot snap-0123456789abcdef0 was refused \(ResourceNotFoundException/,
    );
  });
});
