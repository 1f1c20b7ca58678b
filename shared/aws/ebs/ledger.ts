// The block ledger: which blocks of a target snapshot were written, with their digests, so that
// CompleteSnapshot's ChangedBlocksCount and LINEAR aggregate are right after a crash and a resume.
//
// EBS has no call that lists the blocks of a pending snapshot, so whoever writes them must remember.
// A ledger is keyed by disk (one pending snapshot per disk per cycle): the in-memory one serves a
// single process (tests, one Lambda), the file one a local run that may crash and resume; a
// DynamoDB one for the serverless form fits the same port.
import { createHash } from 'node:crypto';
import { type FileHandle, mkdir, open, readFile, rename, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { FerryError } from '../../engine/errors.ts';
import { linearAggregate } from '../../engine/integrity.ts';

/** One attempt at one disk's snapshot in one cycle. */
export interface SnapshotAttempt {
  /** The replication cycle the snapshot belongs to (e.g. `set#7`). */
  readonly cycle: string;
  /** 1 for a cycle's first attempt; a rerun that does not resume is the next one (new token, new snapshot). */
  readonly attempt: number;
  /** StartSnapshot's ClientToken: a retried or resumed start returns the same snapshot. */
  readonly clientToken: string;
  /** Clock ms when the attempt began, before StartSnapshot was sent. */
  readonly startedAt: number;
  readonly snapshotId?: string | undefined;
  /** Whether EBS made the snapshot encrypted (decides whether zero blocks may be skipped). */
  readonly encrypted?: boolean | undefined;
  /** CompleteSnapshot was accepted and the snapshot reached `completed`. */
  readonly completed?: boolean | undefined;
}

/** What a ledger holds for a disk: the attempt, and a summary of its blocks. */
export interface LedgerRecord extends SnapshotAttempt {
  /** Distinct block indexes recorded. */
  readonly blocks: number;
  /** Clock ms of the last recorded write (or the start): EBS counts its Timeout from here. */
  readonly lastWriteAt: number;
}

export interface BlockRecord {
  readonly index: number;
  /** Raw 32-byte SHA-256 of the block as written. */
  readonly digest: Uint8Array;
}

/**
 * The port. `record` must be durable when it resolves: a block is counted as written only after it
 * is, and the engine may count its chunk done right after. Writing a block again replaces its digest.
 */
export interface BlockLedger {
  load(key: string): Promise<LedgerRecord | undefined>;
  /** Starts a new attempt for `key`, dropping every block recorded for an earlier one. */
  begin(key: string, attempt: SnapshotAttempt): Promise<void>;
  update(key: string, patch: Pick<SnapshotAttempt, 'snapshotId' | 'encrypted' | 'completed'>): Promise<void>;
  record(key: string, blocks: readonly BlockRecord[], at: number): Promise<void>;
  /** The digest recorded for one block, if any. */
  digest(key: string, index: number): Promise<Uint8Array | undefined>;
  /** ChangedBlocksCount and the LINEAR aggregate (raw digest) over the blocks in index order. */
  summary(key: string): Promise<{ count: number; aggregate: Uint8Array }>;
  clear(key: string): Promise<void>;
  /** Releases what is held open for `key` (file handles); the record stays. */
  release?(key: string): Promise<void>;
}

const attemptSchema = z.strictObject({
  cycle: z.string(),
  attempt: z.number().int().positive(),
  clientToken: z.string(),
  startedAt: z.number(),
  snapshotId: z.string().optional(),
  encrypted: z.boolean().optional(),
  completed: z.boolean().optional(),
});

/** Only the attempt's own fields: a LedgerRecord passed in carries derived ones too. */
function attemptOf(a: SnapshotAttempt): SnapshotAttempt {
  return attemptSchema.parse({
    cycle: a.cycle,
    attempt: a.attempt,
    clientToken: a.clientToken,
    startedAt: a.startedAt,
    ...(a.snapshotId === undefined ? {} : { snapshotId: a.snapshotId }),
    ...(a.encrypted === undefined ? {} : { encrypted: a.encrypted }),
    ...(a.completed === undefined ? {} : { completed: a.completed }),
  });
}

export class LedgerError extends FerryError {
  constructor(message: string, cause?: unknown) {
    super(message, cause === undefined ? {} : { cause });
    this.name = 'LedgerError';
  }
}

// 1,024 blocks (512 MiB of disk) per page: a page is 32 KiB of digests plus a 128-byte bitmap, so a
// sparse change map costs little and a 16 TiB full copy stays at 32 bytes per written block.
const PAGE_BLOCKS = 1024;
const DIGEST_BYTES = 32;

/** Block digests by index, 32 bytes per written block, iterated in index order. */
export class DigestMap {
  private readonly pages = new Map<number, { bits: Uint8Array; digests: Uint8Array }>();
  private count = 0;

  get size(): number {
    return this.count;
  }

  set(index: number, digest: Uint8Array): void {
    if (!Number.isSafeInteger(index) || index < 0) throw new LedgerError(`block index ${index} is invalid`);
    if (digest.length !== DIGEST_BYTES) throw new LedgerError(`digest of block ${index} is not 32 bytes`);
    const pageNo = Math.floor(index / PAGE_BLOCKS);
    let page = this.pages.get(pageNo);
    if (!page) {
      page = { bits: new Uint8Array(PAGE_BLOCKS / 8), digests: new Uint8Array(PAGE_BLOCKS * DIGEST_BYTES) };
      this.pages.set(pageNo, page);
    }
    const slot = index % PAGE_BLOCKS;
    const mask = 1 << (slot % 8);
    if ((page.bits[slot >> 3]! & mask) === 0) {
      page.bits[slot >> 3] = page.bits[slot >> 3]! | mask;
      this.count++;
    }
    page.digests.set(digest, slot * DIGEST_BYTES);
  }

  get(index: number): Uint8Array | undefined {
    const page = this.pages.get(Math.floor(index / PAGE_BLOCKS));
    const slot = index % PAGE_BLOCKS;
    if (!page || (page.bits[slot >> 3]! & (1 << (slot % 8))) === 0) return undefined;
    return page.digests.slice(slot * DIGEST_BYTES, (slot + 1) * DIGEST_BYTES);
  }

  /** Digests in ascending block index order (views into the map: hash them, do not keep them). */
  *ordered(): Generator<Uint8Array> {
    for (const pageNo of [...this.pages.keys()].sort((a, b) => a - b)) {
      const page = this.pages.get(pageNo)!;
      for (let slot = 0; slot < PAGE_BLOCKS; slot++) {
        if ((page.bits[slot >> 3]! & (1 << (slot % 8))) !== 0) {
          yield page.digests.subarray(slot * DIGEST_BYTES, (slot + 1) * DIGEST_BYTES);
        }
      }
    }
  }

  clear(): void {
    this.pages.clear();
    this.count = 0;
  }
}

interface MemoryEntry {
  attempt: SnapshotAttempt;
  digests: DigestMap;
  lastWriteAt: number;
}

/** A ledger in process memory: survives a target being re-created, not the process. */
export class MemoryBlockLedger implements BlockLedger {
  private readonly entries = new Map<string, MemoryEntry>();

  async load(key: string): Promise<LedgerRecord | undefined> {
    const e = this.entries.get(key);
    return e && { ...e.attempt, blocks: e.digests.size, lastWriteAt: e.lastWriteAt };
  }

  async begin(key: string, attempt: SnapshotAttempt): Promise<void> {
    this.entries.set(key, {
      attempt: attemptOf(attempt),
      digests: new DigestMap(),
      lastWriteAt: attempt.startedAt,
    });
  }

  async update(
    key: string,
    patch: Pick<SnapshotAttempt, 'snapshotId' | 'encrypted' | 'completed'>,
  ): Promise<void> {
    const e = this.require(key);
    e.attempt = { ...e.attempt, ...patch };
  }

  async record(key: string, blocks: readonly BlockRecord[], at: number): Promise<void> {
    const e = this.require(key);
    for (const b of blocks) e.digests.set(b.index, b.digest);
    e.lastWriteAt = Math.max(e.lastWriteAt, at);
  }

  async digest(key: string, index: number): Promise<Uint8Array | undefined> {
    return this.entries.get(key)?.digests.get(index);
  }

  async summary(key: string): Promise<{ count: number; aggregate: Uint8Array }> {
    const digests = this.entries.get(key)?.digests ?? new DigestMap();
    return { count: digests.size, aggregate: linearAggregate(digests.ordered()) };
  }

  async clear(key: string): Promise<void> {
    this.entries.delete(key);
  }

  private require(key: string): MemoryEntry {
    const e = this.entries.get(key);
    if (!e) throw new LedgerError(`block ledger: no attempt recorded for ${key}`);
    return e;
  }
}

// Log record: u32 block index, u32 attempt, f64 time (ms), 32-byte digest.
const RECORD_BYTES = 48;

interface FileEntry extends MemoryEntry {
  readonly logPath: string;
  readonly metaPath: string;
  fh: FileHandle | undefined;
  /** Bytes of whole records in the log; appends go here (a torn tail is overwritten). */
  end: number;
  pending: { buf: Uint8Array; blocks: readonly BlockRecord[]; at: number; done: (err?: unknown) => void }[];
  /** The running group commit, if any. */
  flushing: Promise<void> | undefined;
}

/**
 * A ledger in a local directory: per key, a JSON attempt record (replaced atomically) and an
 * append-only log of block records. Concurrent `record` calls share one write and one fdatasync
 * (group commit), so durability costs one sync per batch, not per block. Log records carry their
 * attempt number, so records of an abandoned attempt are ignored even if a crash kept them.
 */
export class FileBlockLedger implements BlockLedger {
  private readonly entries = new Map<string, Promise<FileEntry | undefined>>();

  constructor(readonly dir: string) {}

  async load(key: string): Promise<LedgerRecord | undefined> {
    const e = await this.entry(key);
    return e && { ...e.attempt, blocks: e.digests.size, lastWriteAt: e.lastWriteAt };
  }

  async begin(key: string, attempt: SnapshotAttempt): Promise<void> {
    const previous = await this.entry(key);
    await previous?.fh?.close();
    const paths = this.paths(key);
    await mkdir(this.dir, { recursive: true });
    const own = attemptOf(attempt);
    await writeAtomically(paths.metaPath, JSON.stringify(own));
    // The new attempt's records start a fresh log; stale records would be ignored anyway.
    const fh = await open(paths.logPath, 'w');
    const entry: FileEntry = {
      ...paths,
      attempt: own,
      digests: new DigestMap(),
      lastWriteAt: attempt.startedAt,
      fh,
      end: 0,
      pending: [],
      flushing: undefined,
    };
    this.entries.set(key, Promise.resolve(entry));
  }

  async update(
    key: string,
    patch: Pick<SnapshotAttempt, 'snapshotId' | 'encrypted' | 'completed'>,
  ): Promise<void> {
    const e = await this.require(key);
    const next = { ...e.attempt, ...patch };
    await writeAtomically(e.metaPath, JSON.stringify(next));
    e.attempt = next;
  }

  async record(key: string, blocks: readonly BlockRecord[], at: number): Promise<void> {
    if (blocks.length === 0) return;
    const e = await this.require(key);
    const buf = new Uint8Array(blocks.length * RECORD_BYTES);
    const view = new DataView(buf.buffer);
    blocks.forEach((b, i) => {
      const o = i * RECORD_BYTES;
      view.setUint32(o, b.index, true);
      view.setUint32(o + 4, e.attempt.attempt, true);
      view.setFloat64(o + 8, at, true);
      buf.set(b.digest, o + 16);
    });
    await new Promise<void>((resolve, reject) => {
      e.pending.push({ buf, blocks, at, done: (err) => (err === undefined ? resolve() : reject(err)) });
      this.kick(e);
    });
  }

  async digest(key: string, index: number): Promise<Uint8Array | undefined> {
    return (await this.entry(key))?.digests.get(index);
  }

  async summary(key: string): Promise<{ count: number; aggregate: Uint8Array }> {
    const digests = (await this.entry(key))?.digests ?? new DigestMap();
    return { count: digests.size, aggregate: linearAggregate(digests.ordered()) };
  }

  async clear(key: string): Promise<void> {
    const e = await this.entry(key);
    await e?.fh?.close();
    this.entries.delete(key);
    const paths = this.paths(key);
    await rm(paths.metaPath, { force: true });
    await rm(paths.logPath, { force: true });
  }

  async release(key: string): Promise<void> {
    const e = await this.entry(key);
    if (!e) return;
    while (e.flushing) await e.flushing;
    await e.fh?.close();
    e.fh = undefined;
    this.entries.delete(key);
  }

  private kick(e: FileEntry): void {
    if (e.flushing) return;
    e.flushing = this.flush(e).finally(() => {
      e.flushing = undefined;
      // Records pushed after the loop's last check but before this callback.
      if (e.pending.length > 0) this.kick(e);
    });
  }

  /** Writes and syncs pending records in batches until none are left. Never rejects. */
  private async flush(e: FileEntry): Promise<void> {
    while (e.pending.length > 0) {
      const batch = e.pending.splice(0);
      try {
        e.fh ??= await open(e.logPath, 'r+');
        const size = batch.reduce((n, p) => n + p.buf.length, 0);
        const all = new Uint8Array(size);
        let at = 0;
        for (const p of batch) {
          all.set(p.buf, at);
          at += p.buf.length;
        }
        let written = 0;
        while (written < size) {
          const { bytesWritten } = await e.fh.write(all, written, size - written, e.end + written);
          written += bytesWritten;
        }
        await e.fh.datasync();
        e.end += size;
        for (const p of batch) {
          for (const b of p.blocks) e.digests.set(b.index, b.digest);
          e.lastWriteAt = Math.max(e.lastWriteAt, p.at);
        }
        for (const p of batch) p.done();
      } catch (err) {
        const failure = new LedgerError(
          `block ledger ${e.logPath}: cannot record blocks: ${String(err)}`,
          err,
        );
        for (const p of batch) p.done(failure);
      }
    }
  }

  private paths(key: string): { metaPath: string; logPath: string } {
    const readable = key.replace(/[^A-Za-z0-9._-]/g, '_').slice(0, 80);
    const hash = createHash('sha256').update(key).digest('hex').slice(0, 12);
    const base = join(this.dir, `${readable}-${hash}`);
    return { metaPath: `${base}.json`, logPath: `${base}.blocks` };
  }

  private async require(key: string): Promise<FileEntry> {
    const e = await this.entry(key);
    if (!e) throw new LedgerError(`block ledger ${this.dir}: no attempt recorded for ${key}`);
    return e;
  }

  private entry(key: string): Promise<FileEntry | undefined> {
    let entry = this.entries.get(key);
    if (!entry) {
      entry = this.read(key);
      this.entries.set(key, entry);
      // A failed read is not cached: the next call tries again.
      entry.catch(() => this.entries.delete(key));
    }
    return entry;
  }

  private async read(key: string): Promise<FileEntry | undefined> {
    const paths = this.paths(key);
    let attempt: SnapshotAttempt;
    try {
      attempt = attemptSchema.parse(JSON.parse(await readFile(paths.metaPath, 'utf8')));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw new LedgerError(`block ledger ${paths.metaPath} cannot be read: ${String(err)}`, err);
    }
    const digests = new DigestMap();
    let lastWriteAt = attempt.startedAt;
    let log: Buffer;
    try {
      log = await readFile(paths.logPath);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
      log = Buffer.alloc(0);
    }
    // A crash can leave a torn last record: only whole records count, and appends overwrite the rest.
    const whole = log.length - (log.length % RECORD_BYTES);
    for (let o = 0; o < whole; o += RECORD_BYTES) {
      if (log.readUInt32LE(o + 4) !== attempt.attempt) continue;
      digests.set(log.readUInt32LE(o), log.subarray(o + 16, o + RECORD_BYTES));
      lastWriteAt = Math.max(lastWriteAt, log.readDoubleLE(o + 8));
    }
    return {
      ...paths,
      attempt,
      digests,
      lastWriteAt,
      fh: undefined,
      end: whole,
      pending: [],
      flushing: undefined,
    };
  }
}

async function writeAtomically(path: string, text: string): Promise<void> {
  const tmp = `${path}.tmp`;
  const fh = await open(tmp, 'w');
  try {
    await fh.writeFile(text);
    await fh.sync();
  } finally {
    await fh.close();
  }
  await rename(tmp, path);
}
