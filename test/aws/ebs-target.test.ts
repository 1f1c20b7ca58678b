// EbsTarget against the EBS direct API emulator: zero-block policy, idempotent starts, the
// "does not exist yet" window, quotas, the snapshot Timeout, completion errors, single-attempt writes.
import { createHash } from 'node:crypto';
import { appendFile, mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { type EbsEmulatorOptions, startEbsEmulator } from '../../local-cloud/emulators/ebs/server.ts';
import { createEbsClient } from '../../shared/aws/ebs/client.ts';
import { EBS_BLOCK_SIZE, EbsError, EbsSnapshotError } from '../../shared/aws/ebs/errors.ts';
import { FileBlockLedger, MemoryBlockLedger } from '../../shared/aws/ebs/ledger.ts';
import type { SnapshotStatusReader } from '../../shared/aws/ebs/status.ts';
import { EbsTarget, type EbsTargetOptions } from '../../shared/aws/ebs/target.ts';
import { startSnapshot } from '../../shared/aws/ebs/writer.ts';
import { DEFAULT_PARAMS } from '../../shared/engine/config.ts';
import { type Descriptor, planDescriptors } from '../../shared/engine/descriptors.ts';
import { ConfigError } from '../../shared/engine/errors.ts';
import type { Extent } from '../../shared/engine/extents.ts';
import { sha256Hex } from '../../shared/engine/integrity.ts';
import type { Clock } from '../../shared/engine/ports.ts';
import { replicate } from '../../shared/engine/replicate.ts';
import { MiB } from '../../shared/engine/units.ts';
import { systemClock } from '../../shared/runtime/clock.ts';
import { MemorySource, MemoryStateStore, randomBytes } from '../support/memory.ts';

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
  const statusReader: SnapshotStatusReader = {
    read: async (id) => {
      const view = emu.state.describeSnapshot(id);
      return view && { status: view.status, message: view.statusMessage };
    },
  };
  const target = (over: Partial<EbsTargetOptions> = {}) => {
    const t = new EbsTarget({
      client,
      random: () => 0.5,
      set: 'vm',
      disk: 'sda',
      cycle: 'vm#1',
      statusReader,
      ...over,
    });
    cleanup.push(() => t.close());
    return t;
  };
  return { emu, client, statusReader, target };
}

/** The descriptors of `extents` over `image`, with the data the engine would hand the target. */
function chunks(image: Uint8Array, extents: Extent[]): { d: Descriptor; data: Uint8Array; sha: string }[] {
  return [...planDescriptors(extents, { diskSize: image.length, blockSize: B, chunkSize: MiB })].map((d) => {
    const data = new Uint8Array(d.bytes);
    let at = 0;
    for (const e of d.extents) {
      data.set(image.subarray(e.offset, e.offset + e.length), at);
      at += e.length;
    }
    return { d, data, sha: sha256Hex(data) };
  });
}

async function failure(p: Promise<unknown>): Promise<Error> {
  try {
    await p;
  } catch (err) {
    return err as Error;
  }
  throw new Error('expected a failure');
}

/** Waits (without asserting on time) until `cond` holds. */
async function until(cond: () => boolean): Promise<void> {
  while (!cond()) await systemClock.sleep(5);
}

/** 8 MiB with zero blocks between data blocks: 16 blocks, 8 of them zero. */
function halfZero(): Uint8Array {
  const image = randomBytes(8 * MiB, 4);
  for (let i = 1; i < 16; i += 2) image.fill(0, i * B, (i + 1) * B);
  return image;
}

describe('EbsTarget', () => {
  it('skips zero blocks only in a full unencrypted snapshot; encrypted and incremental snapshots write them', async () => {
    // Prepare
    const { emu, target } = await setup();
    const image = halfZero();
    const whole = [{ offset: 0, length: image.length }];
    const run = async (
      disk: string,
      t: EbsTarget,
      changed: Extent[] | undefined,
      state = new MemoryStateStore(),
    ) => {
      await replicate(
        {
          set: 'vm',
          disks: [{ id: disk, source: new MemorySource(image, 'mem', whole), target: t, changed }],
          params: DEFAULT_PARAMS,
        },
        { clock: systemClock, random: () => 0.5, state },
      );
      return emu.state.describeSnapshot(t.snapshotId!)!;
    };

    // Act
    const plain = await run('plain', target({ disk: 'plain' }), undefined);
    const encrypted = await run('secret', target({ disk: 'secret', encrypted: true }), undefined);
    const child = await run('plain', target({ disk: 'plain', cycle: 'vm#2', parentSnapshotId: plain.id }), [
      { offset: 2 * MiB, length: 2 * MiB },
    ]);

    // Assess
    expect(plain).toMatchObject({ status: 'completed', encrypted: false, blocksWritten: 8 });
    expect(encrypted).toMatchObject({ status: 'completed', encrypted: true, blocksWritten: 16 });
    expect(child).toMatchObject({ status: 'completed', parentId: plain.id, blocksWritten: 4 });
  });

  it("pads a disk's short last block to 512 KiB", async () => {
    const { emu, target } = await setup();
    const image = randomBytes(B + 1000, 2);
    const t = target();
    await t.open(image.length, 'full', false);
    for (const c of chunks(image, [{ offset: 0, length: image.length }]))
      await t.writeChunk(c.d, c.data, c.sha);
    await t.commit({ chunks: 1, bytes: image.length, aggregateSha256: '', extents: [] });
    expect(emu.state.describeSnapshot(t.snapshotId!)).toMatchObject({
      status: 'completed',
      blocksWritten: 2,
    });
    const back = await t.read(0, 2 * B);
    expect(Buffer.from(back.subarray(0, image.length)).equals(Buffer.from(image))).toBe(true);
    expect(back.subarray(image.length).every((x) => x === 0)).toBe(true);
  });

  it('gets the same snapshot back when a StartSnapshot answer is lost, and a new one for a new attempt', async () => {
    // Prepare: the first StartSnapshot is carried out, but its answer is a 500.
    const { emu, target } = await setup();
    emu.faults.failNext('StartSnapshot', 1, 500, { applied: true });

    // Act
    const first = target();
    await first.open(4 * MiB, 'full', false);

    // Assess: retried with the same ClientToken, so one snapshot.
    expect(emu.counters.calls.StartSnapshot).toBe(2);
    expect(emu.state.snapshotIds()).toEqual([first.snapshotId]);

    // A rerun of the same cycle that does not resume is a new attempt: a new token and snapshot.
    const ledger = new MemoryBlockLedger();
    const a = target({ ledger });
    await a.open(4 * MiB, 'full', false);
    const b = target({ ledger });
    await b.open(4 * MiB, 'full', false);
    expect(b.snapshotId).not.toBe(a.snapshotId);
    // ... while a resume reuses the attempt's snapshot without starting anything.
    const c = target({ ledger });
    const starts = emu.counters.calls.StartSnapshot;
    await c.open(4 * MiB, 'full', true);
    expect(c.snapshotId).toBe(b.snapshotId);
    expect(emu.counters.calls.StartSnapshot).toBe(starts);
  });

  it('resumes into the snapshot that a start started when the ledger never heard of it', async () => {
    // Prepare: the ledger "crashes" while recording the new snapshot id.
    const { emu, target } = await setup();
    const ledger = new MemoryBlockLedger();
    let crash = true;
    const flaky = Object.assign(Object.create(ledger) as MemoryBlockLedger, {
      update: async (key: string, patch: Parameters<MemoryBlockLedger['update']>[1]) => {
        if (crash) throw new Error('power cut');
        return ledger.update(key, patch);
      },
    });
    await expect(target({ ledger: flaky }).open(4 * MiB, 'full', false)).rejects.toThrow('power cut');
    crash = false;

    // Act: the rerun resumes; only the ClientToken can find the snapshot.
    const t = target({ ledger: flaky });
    await t.open(4 * MiB, 'full', true);

    // Assess
    expect(emu.counters.calls.StartSnapshot).toBe(2);
    expect(emu.state.snapshotIds()).toEqual([t.snapshotId]);
    expect((await ledger.load('vm/sda'))?.snapshotId).toBe(t.snapshotId);
  });

  it('refuses a reused ClientToken with other parameters, naming the cause', async () => {
    const { target } = await setup();
    await target({ ledger: new MemoryBlockLedger(), timeoutMinutes: 60 }).open(4 * MiB, 'full', false);
    const err = await failure(
      target({ ledger: new MemoryBlockLedger(), timeoutMinutes: 90 }).open(4 * MiB, 'full', false),
    );
    expect(err).toBeInstanceOf(EbsError);
    expect(err.message).toMatch(/^disk sda: EBS StartSnapshot was refused \(ConflictException/);
    expect(err.message).toContain('ClientToken');
  });

  it('waits out "snapshot does not exist" right after the start, within a bounded grace', async () => {
    // Prepare: the emulator's clock stands still, so the snapshot stays invisible until moved.
    const clock = { t: Date.UTC(2026, 0, 1) };
    const { emu, target } = await setup({ now: () => clock.t });
    emu.faults.notFoundAfterStart(60_000);
    const image = randomBytes(2 * MiB, 8);
    const t = target();
    await t.open(image.length, 'full', false);

    // Act: writes meet "does not exist" until the emulator's minute has passed.
    const writes = Promise.all(
      chunks(image, [{ offset: 0, length: image.length }]).map((c) => t.writeChunk(c.d, c.data, c.sha)),
    );
    await until(() => emu.counters.failed.PutSnapshotBlock >= 4);
    clock.t += 60_000;
    await writes;
    const ref = await t.commit({ chunks: 2, bytes: image.length, aggregateSha256: '', extents: [] });

    // Assess
    expect(emu.state.describeSnapshot(ref)).toMatchObject({ status: 'completed', blocksWritten: 4 });

    // And bounded: past the grace, "does not exist" is an error that names the snapshot.
    const late = target({ cycle: 'vm#2', notFoundGraceMs: 50 });
    await late.open(image.length, 'full', false);
    const [c] = chunks(image, [{ offset: 0, length: B }]);
    const err = await failure(late.writeChunk(c!.d, c!.data, c!.sha));
    expect(err).toBeInstanceOf(EbsError);
    expect(err.message).toContain(
      `disk sda: EBS PutSnapshotBlock of block 0 in snapshot ${late.snapshotId} was refused (ResourceNotFoundException`,
    );
  });

  it("refuses clearly when the account's pending-snapshot limit is reached", async () => {
    const { client, target } = await setup({ quotas: { pendingSnapshotsPerAccount: 1 } });
    await startSnapshot(
      { client },
      { disk: 'other', volumeSizeGiB: 1, clientToken: 'x', timeoutMinutes: 60 },
    );
    const err = await failure(target().open(4 * MiB, 'full', false));
    expect(err).toBeInstanceOf(EbsError);
    expect((err as EbsError).retryable).toBe(false);
    expect(err.message).toContain('disk sda: EBS StartSnapshot was refused (ServiceQuotaExceededException');
    expect(err.message).toContain('pending snapshots');
  });

  it("refuses writes, completion and resumption that the snapshot's Timeout would come too late for", async () => {
    // Prepare: the target's clock can jump ahead.
    const { target } = await setup();
    let skew = 0;
    const clock: Clock = { now: () => Date.now() + skew, sleep: (ms, s) => systemClock.sleep(ms, s) };
    const ledger = new MemoryBlockLedger();
    const image = randomBytes(2 * MiB, 3);
    const [c1, c2] = chunks(image, [{ offset: 0, length: image.length }]);
    const t = target({ clock, ledger, timeoutMinutes: 30 });
    await t.open(image.length, 'full', false);
    await t.writeChunk(c1!.d, c1!.data, c1!.sha);

    // Act: 29.5 minutes without a write (the safety margin is a minute).
    skew += 29.5 * 60_000;
    const write = await failure(t.writeChunk(c2!.d, c2!.data, c2!.sha));
    const complete = await failure(
      t.commit({ chunks: 2, bytes: image.length, aggregateSha256: '', extents: [] }),
    );
    const resume = await failure(
      target({ clock, ledger, timeoutMinutes: 30 }).open(image.length, 'full', true),
    );

    // Assess
    for (const err of [write, complete, resume]) {
      expect(err).toBeInstanceOf(EbsSnapshotError);
      expect(err.message).toContain(
        `disk sda: snapshot ${t.snapshotId} has had no write for 29.5 min and its Timeout is 30 min`,
      );
    }
    expect(resume.message).toContain('resuming it would be too late');
  });

  it('names the snapshot when it ends in error after CompleteSnapshot', async () => {
    const { emu, target } = await setup({ completionDelayMs: 10 });
    emu.faults.errorOnComplete(1, 'Injected: the seal failed.');
    const image = randomBytes(B, 1);
    const t = target();
    await t.open(image.length, 'full', false);
    const [c] = chunks(image, [{ offset: 0, length: B }]);
    await t.writeChunk(c!.d, c!.data, c!.sha);
    const err = await failure(t.commit({ chunks: 1, bytes: B, aggregateSha256: '', extents: [] }));
    expect(err).toBeInstanceOf(EbsSnapshotError);
    expect(err.message).toBe(
      `disk sda: snapshot ${t.snapshotId} ended in error after CompleteSnapshot: Injected: the seal failed.; it is no checkpoint, start the cycle again`,
    );
  });

  it('needs a parent for an incremental, and a ledger record to resume', async () => {
    const { target } = await setup();
    const noParent = await failure(target().open(4 * MiB, 'incremental', false));
    expect(noParent).toBeInstanceOf(ConfigError);
    expect(noParent.message).toContain(
      "disk sda: an incremental cycle needs the previous checkpoint's snapshot",
    );
    const lost = await failure(target().open(4 * MiB, 'full', true));
    expect(lost).toBeInstanceOf(EbsSnapshotError);
    expect(lost.message).toContain('disk sda: cannot resume cycle vm#1: the block ledger has no record');
    expect(() => target({ parentSnapshotId: 'vol-123' })).toThrow(/not a snapshot id/);
  });

  it('makes one attempt per write: a throttle goes to the engine, and a retried chunk skips blocks already written', async () => {
    // Prepare: a two-block chunk; the first PutSnapshotBlock to arrive is throttled.
    const { emu, target } = await setup();
    const image = randomBytes(MiB, 6);
    const t = target();
    await t.open(image.length, 'full', false);
    const [c] = chunks(image, [{ offset: 0, length: MiB }]);
    emu.faults.throttleNext('PutSnapshotBlock', 1, 'ACCOUNT_THROTTLED');

    // Act
    const err = await failure(t.writeChunk(c!.d, c!.data, c!.sha));
    await t.writeChunk(c!.d, c!.data, c!.sha);

    // Assess: retryable and throttled for the engine's controller; the retry sent only the block
    // that had not landed.
    expect(err).toBeInstanceOf(EbsError);
    expect(err).toMatchObject({ retryable: true, throttled: true, disk: 'sda', seq: 0 });
    expect(err.message).toContain('was throttled (RequestThrottledException ACCOUNT_THROTTLED');
    expect(emu.counters.calls.PutSnapshotBlock).toBe(3);
    expect(emu.counters.succeeded.PutSnapshotBlock).toBe(2);
  });

  it('commits once, reads back the completed snapshot, and observes completion without a status reader', async () => {
    const { emu, target } = await setup({ completionDelayMs: 30 });
    const image = randomBytes(MiB, 9);
    const t = target({ statusReader: undefined });
    await t.open(image.length, 'full', false);
    const [c] = chunks(image, [{ offset: 0, length: MiB }]);
    await expect(t.read(0, B)).rejects.toThrow(/still pending/);
    await t.writeChunk(c!.d, c!.data, c!.sha);
    const summary = { chunks: 1, bytes: MiB, aggregateSha256: '', extents: [] };
    const ref = await t.commit(summary);
    expect(await t.commit(summary)).toBe(ref);
    expect(emu.counters.calls.CompleteSnapshot).toBe(1);
    expect(emu.state.describeSnapshot(ref)?.status).toBe('completed');
    expect(Buffer.from(await t.read(0, MiB)).equals(Buffer.from(image))).toBe(true);
    await t.afterPublish();
  });

  it('refuses a chunk whose data does not match its checksum', async () => {
    const { emu, target } = await setup();
    const t = target();
    await t.open(MiB, 'full', false);
    const [c] = chunks(randomBytes(MiB, 1), [{ offset: 0, length: MiB }]);
    const err = await failure(t.writeChunk(c!.d, c!.data, sha256Hex(new Uint8Array(1))));
    expect(err.name).toBe('IntegrityError');
    expect(err.message).toContain('disk sda: chunk 0 at offset 0 arrived corrupted');
    expect(emu.counters.calls.PutSnapshotBlock).toBe(0);
  });
});

describe('block ledgers', () => {
  const digest = (i: number) => createHash('sha256').update(`block ${i}`).digest();
  const attempt = (n: number) => ({ cycle: 'vm#1', attempt: n, clientToken: `t${n}`, startedAt: 1000 });

  it('keeps a file ledger across instances: torn tails ignored, records of an older attempt dropped', async () => {
    // Prepare
    const dir = await mkdtemp(join(tmpdir(), 'ferry-ledger-'));
    cleanup.push(() => rm(dir, { recursive: true, force: true }));
    const memory = new MemoryBlockLedger();
    const first = new FileBlockLedger(dir);
    for (const l of [first, memory]) {
      await l.begin('vm/sda', attempt(1));
      await Promise.all([
        l.record('vm/sda', [{ index: 9, digest: digest(9) }], 2000),
        l.record('vm/sda', [{ index: 2, digest: digest(2) }], 2500),
        l.record('vm/sda', [{ index: 9, digest: digest(99) }], 3000),
      ]);
      await l.update('vm/sda', { snapshotId: 'snap-0a', encrypted: false });
    }
    await first.release('vm/sda');
    const [log] = (await readdir(dir)).filter((f) => f.endsWith('.blocks'));
    await appendFile(join(dir, log!), Buffer.alloc(20, 7)); // a crash mid-record

    // Act: a new process reads it back and goes on writing.
    const second = new FileBlockLedger(dir);
    const loaded = await second.load('vm/sda');
    await second.record('vm/sda', [{ index: 5, digest: digest(5) }], 4000);
    await memory.record('vm/sda', [{ index: 5, digest: digest(5) }], 4000);
    const third = new FileBlockLedger(dir);

    // Assess
    expect(loaded).toMatchObject({ ...attempt(1), snapshotId: 'snap-0a', blocks: 2, lastWriteAt: 3000 });
    expect(await third.summary('vm/sda')).toEqual(await memory.summary('vm/sda'));
    expect((await third.summary('vm/sda')).count).toBe(3);
    expect(Buffer.from((await third.digest('vm/sda', 9))!).equals(digest(99))).toBe(true);

    // A crash after a new attempt's record was written but before its log was truncated: the
    // old attempt's block records no longer count.
    const [meta] = (await readdir(dir)).filter((f) => f.endsWith('.json'));
    await writeFile(join(dir, meta!), JSON.stringify(attempt(2)));
    expect(await new FileBlockLedger(dir).load('vm/sda')).toMatchObject({ attempt: 2, blocks: 0 });
    await third.begin('vm/sda', attempt(2));
    expect(await new FileBlockLedger(dir).load('vm/sda')).toMatchObject({ attempt: 2, blocks: 0 });
    await third.clear('vm/sda');
    expect(await new FileBlockLedger(dir).load('vm/sda')).toBeUndefined();
  });
});
