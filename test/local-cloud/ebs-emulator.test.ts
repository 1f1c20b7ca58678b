// Drives the EBS direct API emulator with the real @aws-sdk/client-ebs, as the Ferry adapters will.
import { createHash } from 'node:crypto';
import {
  AccessDeniedException,
  CompleteSnapshotCommand,
  ConflictException,
  EBSClient,
  GetSnapshotBlockCommand,
  InternalServerException,
  ListChangedBlocksCommand,
  type ListChangedBlocksCommandOutput,
  ListSnapshotBlocksCommand,
  type ListSnapshotBlocksCommandOutput,
  PutSnapshotBlockCommand,
  paginateListChangedBlocks,
  paginateListSnapshotBlocks,
  RequestThrottledException,
  ResourceNotFoundException,
  ServiceQuotaExceededException,
  StartSnapshotCommand,
  type StartSnapshotCommandInput,
  ValidationException,
} from '@aws-sdk/client-ebs';
import { afterEach, describe, expect, it } from 'vitest';
import {
  type EbsEmulator,
  type EbsEmulatorOptions,
  startEbsEmulator,
} from '../../local-cloud/emulators/ebs/server.ts';
import { BLOCK_SIZE } from '../../local-cloud/emulators/ebs/state.ts';

// ---- helpers ----

const T0 = Date.UTC(2026, 0, 1);
const MINUTE = 60_000;

interface Harness {
  emu: EbsEmulator;
  ebs: EBSClient;
  /** The emulator's clock; tests move it instead of sleeping. */
  clock: { t: number };
}

const open: Harness[] = [];

afterEach(async () => {
  for (const h of open.splice(0)) {
    h.ebs.destroy();
    await h.emu.stop();
  }
});

async function setup(opts: EbsEmulatorOptions = {}): Promise<Harness> {
  const clock = { t: T0 };
  const emu = await startEbsEmulator({ now: () => clock.t, completionDelayMs: 0, ...opts });
  // maxAttempts 1: the SDK must not hide the emulator's errors by retrying them.
  const ebs = new EBSClient({
    endpoint: emu.endpoint,
    region: 'us-east-1',
    credentials: { accessKeyId: 'test', secretAccessKey: 'test' },
    maxAttempts: 1,
  });
  const h = { emu, ebs, clock };
  open.push(h);
  return h;
}

/** A block whose bytes depend on `seed`, so different blocks really differ. */
function blockOf(seed: number): Buffer {
  const b = Buffer.alloc(BLOCK_SIZE);
  for (let i = 0; i < BLOCK_SIZE; i += 4) b.writeUInt32LE((Math.imul(i + 1, 2654435761) ^ seed) >>> 0, i);
  return b;
}

const digestOf = (b: Buffer): Buffer => createHash('sha256').update(b).digest();
const checksumOf = (b: Buffer): string => digestOf(b).toString('base64');

/** LINEAR: SHA-256 over the raw 32-byte block digests in ascending block index order. */
function linear(blocks: Map<number, Buffer>): string {
  const hash = createHash('sha256');
  for (const index of [...blocks.keys()].sort((a, b) => a - b))
    hash.update(digestOf(blocks.get(index) as Buffer));
  return hash.digest('base64');
}

async function start(ebs: EBSClient, input: Partial<StartSnapshotCommandInput> = {}): Promise<string> {
  const out = await ebs.send(new StartSnapshotCommand({ VolumeSize: 1, ...input }));
  return out.SnapshotId as string;
}

function put(ebs: EBSClient, id: string, index: number, data: Buffer) {
  return ebs.send(
    new PutSnapshotBlockCommand({
      SnapshotId: id,
      BlockIndex: index,
      BlockData: data,
      DataLength: data.length,
      Checksum: checksumOf(data),
      ChecksumAlgorithm: 'SHA256',
    }),
  );
}

function complete(ebs: EBSClient, id: string, blocks: Map<number, Buffer>) {
  return ebs.send(
    new CompleteSnapshotCommand({
      SnapshotId: id,
      ChangedBlocksCount: blocks.size,
      Checksum: linear(blocks),
      ChecksumAlgorithm: 'SHA256',
      ChecksumAggregationMethod: 'LINEAR',
    }),
  );
}

/** Start, write `blocks`, complete (the harness completes with no delay). */
async function writeSnapshot(
  h: Harness,
  blocks: Map<number, Buffer>,
  input: Partial<StartSnapshotCommandInput> = {},
): Promise<string> {
  const id = await start(h.ebs, input);
  for (const [index, data] of blocks) await put(h.ebs, id, index, data);
  await complete(h.ebs, id, blocks);
  expect(h.emu.state.describeSnapshot(id)?.status).toBe('completed');
  return id;
}

async function read(ebs: EBSClient, id: string, index: number, token: string): Promise<Buffer> {
  const out = await ebs.send(
    new GetSnapshotBlockCommand({ SnapshotId: id, BlockIndex: index, BlockToken: token }),
  );
  return Buffer.from(
    await (out.BlockData as { transformToByteArray(): Promise<Uint8Array> }).transformToByteArray(),
  );
}

async function listAll(ebs: EBSClient, id: string): Promise<{ BlockIndex: number; BlockToken: string }[]> {
  const out: { BlockIndex: number; BlockToken: string }[] = [];
  for await (const page of paginateListSnapshotBlocks({ client: ebs }, { SnapshotId: id, MaxResults: 100 })) {
    for (const b of page.Blocks ?? [])
      out.push({ BlockIndex: b.BlockIndex as number, BlockToken: b.BlockToken as string });
  }
  return out;
}

/** The rejection of `p`, which must reject. */
async function failure(p: Promise<unknown>): Promise<Error & Record<string, unknown>> {
  try {
    await p;
  } catch (err) {
    return err as Error & Record<string, unknown>;
  }
  throw new Error('expected the call to fail');
}

const statusOf = (err: Record<string, unknown>): number | undefined =>
  (err.$metadata as { httpStatusCode?: number } | undefined)?.httpStatusCode;

// ---- tests ----

describe('EBS direct API emulator, driven by @aws-sdk/client-ebs', () => {
  it('writes a snapshot, completes it asynchronously with a LINEAR checksum, and reads every block back', async () => {
    const h = await setup({ completionDelayMs: 40 });
    const { ebs, emu, clock } = h;
    const started = await ebs.send(
      new StartSnapshotCommand({
        VolumeSize: 1,
        Description: 'disk-a',
        Tags: [{ Key: 'ferry', Value: '1' }],
      }),
    );
    expect(started.SnapshotId).toMatch(/^snap-[0-9a-f]{17}$/);
    expect(started).toMatchObject({
      Status: 'pending',
      VolumeSize: 1,
      BlockSize: BLOCK_SIZE,
      Description: 'disk-a',
    });
    expect(started.StartTime?.getTime()).toBe(T0);
    const id = started.SnapshotId as string;

    const blocks = new Map([
      [0, blockOf(1)],
      [7, blockOf(2)],
      [2047, blockOf(3)],
    ]);
    for (const [index, data] of blocks) {
      const out = await put(ebs, id, index, data);
      expect(out).toMatchObject({ Checksum: checksumOf(data), ChecksumAlgorithm: 'SHA256' });
    }
    const completed = await complete(ebs, id, blocks);
    expect(completed.Status).toBe('pending');
    expect(completed.$metadata.httpStatusCode).toBe(202);

    // Sealing is asynchronous: reads are refused until the status reaches completed.
    const early = await failure(ebs.send(new ListSnapshotBlocksCommand({ SnapshotId: id })));
    expect(early).toBeInstanceOf(ValidationException);
    clock.t += 39;
    expect(emu.state.describeSnapshot(id)?.status).toBe('pending');
    clock.t += 1;
    expect(emu.state.describeSnapshot(id)?.status).toBe('completed');

    const listed = await ebs.send(new ListSnapshotBlocksCommand({ SnapshotId: id }));
    expect(listed.Blocks?.map((b) => b.BlockIndex)).toEqual([0, 7, 2047]);
    expect(listed).toMatchObject({ VolumeSize: 1, BlockSize: BLOCK_SIZE });
    expect(listed.NextToken).toBeUndefined();
    expect(listed.ExpiryTime?.getTime()).toBe(clock.t + 7 * 24 * 60 * MINUTE);

    for (const b of listed.Blocks ?? []) {
      const index = b.BlockIndex as number;
      const out = await ebs.send(
        new GetSnapshotBlockCommand({ SnapshotId: id, BlockIndex: index, BlockToken: b.BlockToken }),
      );
      expect(out).toMatchObject({
        DataLength: BLOCK_SIZE,
        Checksum: checksumOf(blocks.get(index) as Buffer),
      });
      expect(out.ChecksumAlgorithm).toBe('SHA256');
      const data = Buffer.from(
        await (out.BlockData as { transformToByteArray(): Promise<Uint8Array> }).transformToByteArray(),
      );
      expect(data.equals(blocks.get(index) as Buffer)).toBe(true);
    }
    expect(emu.counters.calls).toMatchObject({ StartSnapshot: 1, PutSnapshotBlock: 3, CompleteSnapshot: 1 });
  });

  it('lists only the changed blocks of an incremental snapshot and reads unchanged ones through the parent', async () => {
    const h = await setup();
    const { ebs } = h;
    const a = new Map([
      [0, blockOf(10)],
      [1, blockOf(11)],
      [2, blockOf(12)],
    ]);
    const parent = await writeSnapshot(h, a);
    // The child carries only its own writes: the count and LINEAR checksum cover blocks 1 and 3.
    const b = new Map([
      [1, blockOf(21)],
      [3, blockOf(23)],
    ]);
    const child = await writeSnapshot(h, b, { ParentSnapshotId: parent, VolumeSize: 2 });
    const grandchild = await writeSnapshot(h, new Map([[2, blockOf(32)]]), {
      ParentSnapshotId: child,
      VolumeSize: 2,
    });

    const changed = await ebs.send(
      new ListChangedBlocksCommand({ FirstSnapshotId: parent, SecondSnapshotId: child }),
    );
    expect(changed.ChangedBlocks?.map((c) => c.BlockIndex)).toEqual([1, 3]);
    const [c1, c3] = changed.ChangedBlocks ?? [];
    expect(c1?.FirstBlockToken).toBeDefined();
    expect(c1?.SecondBlockToken).toBeDefined();
    // Block 3 is new in the child: "absent if the first snapshot does not have the changed block".
    expect(c3?.FirstBlockToken).toBeUndefined();
    expect(changed.VolumeSize).toBe(2);

    expect((await read(ebs, parent, 1, c1?.FirstBlockToken as string)).equals(a.get(1) as Buffer)).toBe(true);
    expect((await read(ebs, child, 1, c1?.SecondBlockToken as string)).equals(b.get(1) as Buffer)).toBe(true);

    // The child is a complete view of the volume: unchanged blocks come from the parent.
    const childBlocks = await listAll(ebs, child);
    expect(childBlocks.map((x) => x.BlockIndex)).toEqual([0, 1, 2, 3]);
    const expected = [a.get(0), b.get(1), a.get(2), b.get(3)];
    for (const [i, x] of childBlocks.entries()) {
      expect((await read(ebs, child, x.BlockIndex, x.BlockToken)).equals(expected[i] as Buffer)).toBe(true);
    }

    // Without FirstSnapshotId: every block of the second snapshot, with only its own token.
    const all = await ebs.send(new ListChangedBlocksCommand({ SecondSnapshotId: child }));
    expect(all.ChangedBlocks?.map((c) => c.BlockIndex)).toEqual([0, 1, 2, 3]);
    expect(all.ChangedBlocks?.every((c) => c.FirstBlockToken === undefined && c.SecondBlockToken)).toBe(true);

    // Across two generations: everything written below the first snapshot.
    const twoGen = await ebs.send(
      new ListChangedBlocksCommand({ FirstSnapshotId: parent, SecondSnapshotId: grandchild }),
    );
    expect(twoGen.ChangedBlocks?.map((c) => c.BlockIndex)).toEqual([1, 2, 3]);

    // Siblings share a lineage: what either side wrote since their common parent differs.
    const sibling = await writeSnapshot(h, new Map([[2, blockOf(42)]]), {
      ParentSnapshotId: parent,
      VolumeSize: 2,
    });
    const siblings = await ebs.send(
      new ListChangedBlocksCommand({ FirstSnapshotId: child, SecondSnapshotId: sibling }),
    );
    expect(
      siblings.ChangedBlocks?.map((c) => [
        c.BlockIndex,
        c.FirstBlockToken !== undefined,
        c.SecondBlockToken !== undefined,
      ]),
    ).toEqual([
      [1, true, true],
      [2, true, true],
      [3, true, false],
    ]);

    const other = await writeSnapshot(h, new Map([[0, blockOf(99)]]));
    const unrelated = await failure(
      ebs.send(new ListChangedBlocksCommand({ FirstSnapshotId: other, SecondSnapshotId: child })),
    );
    expect(unrelated).toBeInstanceOf(ValidationException);
    expect(unrelated.Reason).toBe('UNRELATED_SNAPSHOTS');

    // A token names one block: it does not open another index or another version.
    // Blocks 1 and 3 are both stored in the child: only the index tells their tokens apart.
    const wrongIndex = await failure(read(ebs, child, 3, childBlocks[1]?.BlockToken as string));
    expect(wrongIndex.Reason).toBe('INVALID_BLOCK_TOKEN');
    const staleVersion = await failure(read(ebs, child, 1, c1?.FirstBlockToken as string));
    expect(staleVersion).toBeInstanceOf(ValidationException);
    expect(staleVersion.Reason).toBe('INVALID_BLOCK_TOKEN');
  });

  it('refuses a parent that is missing or not completed, and a shrinking volume', async () => {
    const h = await setup();
    const missing = await failure(start(h.ebs, { ParentSnapshotId: 'snap-0123456789abcdef0' }));
    expect(missing).toBeInstanceOf(ResourceNotFoundException);
    const pending = await start(h.ebs, { VolumeSize: 2 });
    const notDone = await failure(start(h.ebs, { ParentSnapshotId: pending, VolumeSize: 2 }));
    expect(notDone).toBeInstanceOf(ValidationException);
    const parent = await writeSnapshot(h, new Map(), { VolumeSize: 2 });
    const shrink = await failure(start(h.ebs, { ParentSnapshotId: parent, VolumeSize: 1 }));
    expect(shrink.Reason).toBe('INVALID_VOLUME_SIZE');
    const both = await failure(start(h.ebs, { ParentSnapshotId: parent, VolumeSize: 2, Encrypted: true }));
    expect(both).toBeInstanceOf(ValidationException);
  });

  it('rejects a wrong checksum, length, algorithm or index with ValidationException and stores nothing', async () => {
    const { ebs, emu } = await setup();
    const id = await start(ebs);
    const data = blockOf(5);
    const send = (over: Partial<ConstructorParameters<typeof PutSnapshotBlockCommand>[0]>) =>
      failure(
        ebs.send(
          new PutSnapshotBlockCommand({
            SnapshotId: id,
            BlockIndex: 0,
            BlockData: data,
            DataLength: BLOCK_SIZE,
            Checksum: checksumOf(data),
            ChecksumAlgorithm: 'SHA256',
            ...over,
          }),
        ),
      );

    const badChecksum = await send({ Checksum: checksumOf(blockOf(6)) });
    expect(badChecksum).toBeInstanceOf(ValidationException);
    expect(statusOf(badChecksum)).toBe(400);
    expect(badChecksum.Reason).toBe('INVALID_PARAMETER_VALUE');

    const small = Buffer.alloc(4096, 1);
    const shortBlock = await send({ BlockData: small, DataLength: 4096, Checksum: checksumOf(small) });
    expect(shortBlock).toBeInstanceOf(ValidationException);
    // Declared 512 KiB, sent less: the body does not match x-amz-Data-Length.
    const truncated = await send({ BlockData: small, Checksum: checksumOf(small) });
    expect(truncated).toBeInstanceOf(ValidationException);
    expect(String(truncated.message)).toContain('Failed to read block data');

    const md5 = await send({ ChecksumAlgorithm: 'MD5' as 'SHA256' });
    expect(md5).toBeInstanceOf(ValidationException);
    const outside = await send({ BlockIndex: 2048 });
    expect(outside.Reason).toBe('INVALID_BLOCK');

    expect(emu.state.getSnapshot(id)?.blocks.size).toBe(0);
    expect(emu.counters.failed.PutSnapshotBlock).toBe(5);
  });

  it('refuses writes once the snapshot is completing, and answers a repeated CompleteSnapshot with its status', async () => {
    const { ebs, emu, clock } = await setup({ completionDelayMs: 10 });
    const id = await start(ebs);
    const blocks = new Map([[0, blockOf(1)]]);
    await put(ebs, id, 0, blockOf(1));
    await complete(ebs, id, blocks);
    const whileSealing = await failure(put(ebs, id, 1, blockOf(2)));
    expect(whileSealing).toBeInstanceOf(ValidationException);
    clock.t += 10;
    const afterwards = await failure(put(ebs, id, 1, blockOf(2)));
    expect(afterwards).toBeInstanceOf(ValidationException);
    expect(afterwards.Reason).toBe('INVALID_SNAPSHOT_ID');
    // An SDK retry of CompleteSnapshot after a lost answer must not fail.
    expect((await complete(ebs, id, blocks)).Status).toBe('completed');
    expect(emu.state.describeSnapshot(id)?.blocksWritten).toBe(1);
  });

  it('makes StartSnapshot idempotent by ClientToken, and a changed request a ConflictException', async () => {
    const { ebs, emu } = await setup();
    const first = await start(ebs, { ClientToken: 'token-1', VolumeSize: 8, Timeout: 30 });
    const again = await start(ebs, { ClientToken: 'token-1', VolumeSize: 8, Timeout: 30 });
    expect(again).toBe(first);
    expect(emu.state.stats().pending).toBe(1);

    const conflict = await failure(start(ebs, { ClientToken: 'token-1', VolumeSize: 16, Timeout: 30 }));
    expect(conflict).toBeInstanceOf(ConflictException);
    expect(statusOf(conflict)).toBe(409);

    // The call succeeded but its answer was lost: a retry with the same token finds that snapshot.
    emu.faults.failNext('StartSnapshot', 1, 500, { applied: true });
    const lost = await failure(start(ebs, { ClientToken: 'token-2', VolumeSize: 4 }));
    expect(lost).toBeInstanceOf(InternalServerException);
    const retried = await start(ebs, { ClientToken: 'token-2', VolumeSize: 4 });
    expect(emu.state.snapshotIds()).toEqual([first, retried]);
  });

  it('loses a pending snapshot to its Timeout, counted from the last write', async () => {
    const { ebs, emu, clock } = await setup();
    const idle = await start(ebs, { Timeout: 10 });
    const busy = await start(ebs, { Timeout: 10 });
    const defaulted = await start(ebs);
    clock.t += 9 * MINUTE;
    await put(ebs, busy, 0, blockOf(1));
    clock.t += MINUTE;
    expect(emu.state.describeSnapshot(idle)?.status).toBe('error');
    expect(emu.state.describeSnapshot(busy)?.status).toBe('pending');
    expect(emu.state.describeSnapshot(defaulted)?.status).toBe('pending');
    const late = await failure(put(ebs, idle, 0, blockOf(1)));
    expect(late).toBeInstanceOf(ValidationException);
    expect(late.Reason).toBe('WRITE_REQUEST_TIMEOUT');
    clock.t += 9 * MINUTE;
    expect(emu.state.describeSnapshot(busy)?.status).toBe('error');
    clock.t += 41 * MINUTE;
    expect(emu.state.describeSnapshot(defaulted)?.status).toBe('error');
    // The lost snapshot's data is gone, and it no longer counts as pending.
    expect(emu.state.stats()).toMatchObject({ pending: 0, storedBlocks: 0 });

    for (const timeout of [9, 4321]) {
      const bad = await failure(start(ebs, { Timeout: timeout }));
      expect(bad).toBeInstanceOf(ValidationException);
    }
  });

  it('throttles by quota with the documented reasons, and refills with the clock', async () => {
    const { ebs, emu, clock } = await setup({
      quotas: {
        putSnapshotBlockPerSnapshot: 3,
        putSnapshotBlockPerAccount: 5,
        pendingSnapshotsPerAccount: 3,
      },
    });
    const a = await start(ebs);
    const b = await start(ebs);
    const data = blockOf(1);
    for (let i = 0; i < 3; i += 1) await put(ebs, a, i, data);
    const resource = await failure(put(ebs, a, 3, data));
    expect(resource).toBeInstanceOf(RequestThrottledException);
    expect(resource.Reason).toBe('RESOURCE_LEVEL_THROTTLE');
    expect(statusOf(resource)).toBe(400);
    // Snapshot b has its own per-snapshot budget, but the account has 2 of its 5 left.
    await put(ebs, b, 0, data);
    await put(ebs, b, 1, data);
    const account = await failure(put(ebs, b, 2, data));
    expect(account).toBeInstanceOf(RequestThrottledException);
    expect(account.Reason).toBe('ACCOUNT_THROTTLED');

    clock.t += 1000;
    await put(ebs, a, 3, data);
    expect(emu.counters.throttled.PutSnapshotBlock).toBe(2);
    expect(emu.counters.throttledByReason).toMatchObject({
      RESOURCE_LEVEL_THROTTLE: 1,
      ACCOUNT_THROTTLED: 1,
    });

    await start(ebs);
    const quota = await failure(start(ebs));
    expect(quota).toBeInstanceOf(ServiceQuotaExceededException);
    expect(statusOf(quota)).toBe(402);
    expect(quota.Reason).toBe('DEPENDENCY_SERVICE_QUOTA_EXCEEDED');
  });

  it('throttles StartSnapshot at its default 10 per second', async () => {
    const { ebs, clock } = await setup({ quotas: { pendingSnapshotsPerAccount: 1000 } });
    for (let i = 0; i < 10; i += 1) await start(ebs);
    const throttled = await failure(start(ebs));
    expect(throttled).toBeInstanceOf(RequestThrottledException);
    expect(throttled.Reason).toBe('ACCOUNT_THROTTLED');
    clock.t += 100;
    await start(ebs);
  });

  it('surfaces each injected fault as the SDK exception a client would see', async () => {
    const { ebs, emu, clock } = await setup();
    const done = await writeSnapshot({ ebs, emu, clock }, new Map([[0, blockOf(1)]]));
    const [first] = await listAll(ebs, done);
    const token = first?.BlockToken as string;

    emu.faults.throttleNext('GetSnapshotBlock', 1, 'DEPENDENCY_REQUEST_THROTTLED');
    const throttled = await failure(read(ebs, done, 0, token));
    expect(throttled).toBeInstanceOf(RequestThrottledException);
    expect(throttled.Reason).toBe('DEPENDENCY_REQUEST_THROTTLED');

    emu.faults.failNext('GetSnapshotBlock', 1, 500);
    const internal = await failure(read(ebs, done, 0, token));
    expect(internal).toBeInstanceOf(InternalServerException);
    expect(internal.$fault).toBe('server');
    expect(statusOf(internal)).toBe(500);

    emu.faults.failNext('*', 1, 503);
    const unavailable = await failure(read(ebs, done, 0, token));
    expect(unavailable.name).toBe('ServiceUnavailableException');
    expect(statusOf(unavailable)).toBe(503);
    expect((await read(ebs, done, 0, token)).equals(blockOf(1))).toBe(true);

    emu.faults.accessDenied('ListSnapshotBlocks');
    const denied = await failure(ebs.send(new ListSnapshotBlocksCommand({ SnapshotId: done })));
    expect(denied).toBeInstanceOf(AccessDeniedException);
    expect(denied.Reason).toBe('UNAUTHORIZED_ACCOUNT');
    expect(statusOf(denied)).toBe(403);
    emu.faults.allowAccess('ListSnapshotBlocks');
    await ebs.send(new ListSnapshotBlocksCommand({ SnapshotId: done }));

    // A freshly started snapshot "does not exist" for a while; clients retry through it.
    emu.faults.notFoundAfterStart(2 * MINUTE);
    const fresh = await start(ebs);
    const notYet = await failure(put(ebs, fresh, 0, blockOf(2)));
    expect(notYet).toBeInstanceOf(ResourceNotFoundException);
    expect(notYet.Reason).toBe('SNAPSHOT_NOT_FOUND');
    expect(String(notYet.message)).toContain(`'${fresh}' does not exist`);
    expect(statusOf(notYet)).toBe(404);
    clock.t += 2 * MINUTE;
    await put(ebs, fresh, 0, blockOf(2));

    const unknown = await failure(put(ebs, 'snap-00000000000000000', 0, blockOf(2)));
    expect(unknown).toBeInstanceOf(ResourceNotFoundException);

    emu.faults.errorOnComplete(1);
    const blocks = new Map([[0, blockOf(2)]]);
    expect((await complete(ebs, fresh, blocks)).Status).toBe('error');
    expect(emu.state.describeSnapshot(fresh)?.statusMessage).toContain('Injected');

    expect(emu.counters.calls.GetSnapshotBlock).toBe(4);
    expect(emu.counters.failed.GetSnapshotBlock).toBe(2);
    expect(emu.counters.throttled.GetSnapshotBlock).toBe(1);
  });

  it('ends the seal in error when ChangedBlocksCount or the LINEAR checksum is wrong', async () => {
    const { ebs, emu } = await setup();
    const blocks = new Map([
      [0, blockOf(1)],
      [1, blockOf(2)],
    ]);
    const miscounted = await start(ebs);
    for (const [i, d] of blocks) await put(ebs, miscounted, i, d);
    const out = await ebs.send(
      new CompleteSnapshotCommand({ SnapshotId: miscounted, ChangedBlocksCount: 1 }),
    );
    expect(out.Status).toBe('error');

    const wrongSum = await start(ebs);
    for (const [i, d] of blocks) await put(ebs, wrongSum, i, d);
    // Base64 digests concatenated as text is not LINEAR: the raw 32-byte digests are.
    const textual = createHash('sha256')
      .update(checksumOf(blockOf(1)) + checksumOf(blockOf(2)))
      .digest('base64');
    await ebs.send(
      new CompleteSnapshotCommand({
        SnapshotId: wrongSum,
        ChangedBlocksCount: 2,
        Checksum: textual,
        ChecksumAlgorithm: 'SHA256',
        ChecksumAggregationMethod: 'LINEAR',
      }),
    );
    expect(emu.state.describeSnapshot(wrongSum)).toMatchObject({ status: 'error' });
    expect(emu.state.describeSnapshot(wrongSum)?.statusMessage).toContain('aggregate checksum');

    const strict = await setup({ completionMismatch: 'validation-exception' });
    const id = await start(strict.ebs);
    const refused = await failure(
      strict.ebs.send(new CompleteSnapshotCommand({ SnapshotId: id, ChangedBlocksCount: 3 })),
    );
    expect(refused).toBeInstanceOf(ValidationException);
    expect(strict.emu.state.describeSnapshot(id)?.status).toBe('pending');
  });

  it('pages through blocks with NextToken, including empty pages that still carry one', async () => {
    const h = await setup();
    const { ebs, emu } = h;
    const data = blockOf(7);
    const indexes = Array.from({ length: 210 }, (_, i) => i * 3);
    const id = await start(ebs);
    for (let i = 0; i < indexes.length; i += 10) {
      await Promise.all(indexes.slice(i, i + 10).map((index) => put(ebs, id, index, data)));
    }
    await complete(ebs, id, new Map(indexes.map((i) => [i, data])));

    const sizes: number[] = [];
    let token: string | undefined;
    const seen: number[] = [];
    do {
      const page: ListSnapshotBlocksCommandOutput = await ebs.send(
        new ListSnapshotBlocksCommand({ SnapshotId: id, MaxResults: 100, NextToken: token }),
      );
      sizes.push(page.Blocks?.length ?? 0);
      for (const b of page.Blocks ?? []) seen.push(b.BlockIndex as number);
      token = page.NextToken;
    } while (token);
    expect(sizes).toEqual([100, 100, 10]);
    expect(seen).toEqual(indexes);

    emu.faults.emptyPagesNext('ListSnapshotBlocks', 2);
    const empty = await ebs.send(new ListSnapshotBlocksCommand({ SnapshotId: id, MaxResults: 100 }));
    expect(empty.Blocks).toEqual([]);
    expect(empty.NextToken).toBeDefined();
    expect((await listAll(ebs, id)).map((b) => b.BlockIndex)).toEqual(indexes);

    // FAQ: a MaxResults under 100 still returns at least 100; above 10000 is out of range.
    const small = await ebs.send(new ListSnapshotBlocksCommand({ SnapshotId: id, MaxResults: 10 }));
    expect(small.Blocks).toHaveLength(100);
    expect(
      await failure(ebs.send(new ListSnapshotBlocksCommand({ SnapshotId: id, MaxResults: 10_001 }))),
    ).toBeInstanceOf(ValidationException);

    const from = await ebs.send(new ListSnapshotBlocksCommand({ SnapshotId: id, StartingBlockIndex: 601 }));
    expect(from.Blocks?.map((b) => b.BlockIndex)).toEqual(indexes.filter((i) => i >= 601));

    const forged = await failure(
      ebs.send(new ListSnapshotBlocksCommand({ SnapshotId: id, NextToken: 'AAAA' })),
    );
    expect(forged.Reason).toBe('INVALID_PAGE_TOKEN');
    const other = await writeSnapshot(h, new Map([[0, data]]));
    const foreign = await failure(
      ebs.send(new ListSnapshotBlocksCommand({ SnapshotId: other, NextToken: small.NextToken })),
    );
    expect(foreign.Reason).toBe('INVALID_PAGE_TOKEN');

    emu.faults.emptyPagesNext('ListChangedBlocks', 1);
    const changed: number[] = [];
    let pages = 0;
    for await (const page of paginateListChangedBlocks(
      { client: ebs },
      { SecondSnapshotId: id, MaxResults: 100 },
    )) {
      pages += 1;
      for (const c of (page as ListChangedBlocksCommandOutput).ChangedBlocks ?? [])
        changed.push(c.BlockIndex as number);
    }
    expect(pages).toBe(4);
    expect(changed).toEqual(indexes);
  });

  it('returns empty pages with a token across sparse regions when a page scans a bounded window', async () => {
    const h = await setup({ listScanWindowBlocks: 1000 });
    const id = await writeSnapshot(
      h,
      new Map([
        [0, blockOf(1)],
        [3500, blockOf(2)],
      ]),
      { VolumeSize: 2 },
    );
    const pages: number[][] = [];
    let token: string | undefined;
    do {
      const page: ListSnapshotBlocksCommandOutput = await h.ebs.send(
        new ListSnapshotBlocksCommand({ SnapshotId: id, MaxResults: 100, NextToken: token }),
      );
      pages.push((page.Blocks ?? []).map((b) => b.BlockIndex as number));
      token = page.NextToken;
    } while (token);
    expect(pages).toEqual([[0], [], [], [3500]]);
  });

  it('holds memory only for written blocks, even on a 64 TiB volume', async () => {
    const h = await setup();
    const { ebs, emu } = h;
    const id = await start(ebs, { VolumeSize: 65_536 });
    expect(emu.state.stats()).toMatchObject({ storedBlocks: 0, storedBytes: 0 });
    const last = 65_536 * 2048 - 1;
    const zero = Buffer.alloc(BLOCK_SIZE);
    await put(ebs, id, last, zero);
    // Identical content is stored once.
    await put(ebs, id, 12_345, zero);
    const beyond = await failure(put(ebs, id, last + 1, zero));
    expect(beyond.Reason).toBe('INVALID_BLOCK');
    await complete(
      ebs,
      id,
      new Map([
        [12_345, zero],
        [last, zero],
      ]),
    );
    const page = await ebs.send(
      new ListSnapshotBlocksCommand({ SnapshotId: id, StartingBlockIndex: last - 10 }),
    );
    expect(page.Blocks?.map((b) => b.BlockIndex)).toEqual([last]);
    expect(page.VolumeSize).toBe(65_536);
    expect(emu.state.stats()).toMatchObject({ storedBlocks: 2, uniqueBlobs: 1, storedBytes: BLOCK_SIZE });
  });

  it('works with the default clock, completion delay and a seeded latency', async () => {
    const emu = await startEbsEmulator({ latency: { fixedMs: 1, jitterMs: 3 }, seed: 42 });
    const ebs = new EBSClient({
      endpoint: emu.endpoint,
      region: 'us-east-1',
      credentials: { accessKeyId: 'test', secretAccessKey: 'test' },
      maxAttempts: 1,
    });
    open.push({ emu, ebs, clock: { t: 0 } });
    const id = await start(ebs);
    const blocks = new Map([[0, blockOf(3)]]);
    await put(ebs, id, 0, blockOf(3));
    await complete(ebs, id, blocks);
    // Completion takes up to 50 ms of real time here: poll as a client would.
    let status = emu.state.describeSnapshot(id)?.status;
    for (let i = 0; i < 200 && status === 'pending'; i += 1) {
      await new Promise((resolve) => setTimeout(resolve, 5));
      status = emu.state.describeSnapshot(id)?.status;
    }
    expect(status).toBe('completed');
    const [b] = await listAll(ebs, id);
    expect((await read(ebs, id, 0, b?.BlockToken as string)).equals(blockOf(3))).toBe(true);
  });

  it('refuses unknown options instead of running with defaults', async () => {
    await expect(
      startEbsEmulator({ quotas: { putPerSnapshot: 1 } } as unknown as EbsEmulatorOptions),
    ).rejects.toThrow(/unknown quota/);
    await expect(startEbsEmulator({ clock: () => 0 } as unknown as EbsEmulatorOptions)).rejects.toThrow(
      /unknown option/,
    );
  });
});
