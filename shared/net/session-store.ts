// A node's durable record of each disk's latest session: who started it, its resume token, and what
// the node verified of every chunk, so that what it commits and what it resumes is its own finding.
import { randomBytes, timingSafeEqual } from 'node:crypto';
import { type FileHandle, mkdir, open, readdir, readFile, rename, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { errorMessage, FerryError } from '../engine/errors.ts';
import type { Extent } from '../engine/extents.ts';
import { LinearAggregator } from '../engine/integrity.ts';
import { LayoutHash, type ResumeCheck, TOKEN_BYTES } from './protocol.ts';

// One slot per chunk seq, at offset seq * SLOT_BYTES of the disk's digest file: the chunk's SHA-256
// (32), the SHA-256 of its layout (32), its first offset (8) and its bytes (8). A chunk carries at
// least one byte, so a slot whose byte count is zero was never written (the file is sparse).
export const SLOT_BYTES = 80;
// Slots read per read() when a commit or a resume check walks the record: 1 MiB at a time.
const SLOTS_PER_READ = Math.floor((1024 * 1024) / SLOT_BYTES);

const RECORD_SUFFIX = '.ferry-session.json';
const DIGESTS_SUFFIX = '.ferry-digests';

const recordSchema = z.strictObject({
  /** The node's id of the session: the cycle id its file target is opened with. */
  id: z.string().regex(/^[0-9a-f]{32}$/),
  token: z.string().regex(/^[0-9a-f]{32}$/),
  credential: z.string(),
  disk: z.string(),
  kind: z.enum(['full', 'incremental']),
  sizeBytes: z.number().int().nonnegative(),
  /** The source's cycle id, as its HELLO said. */
  cycle: z.string(),
  /** An image already existed when the session started: it stages beside it (counted twice). */
  overImage: z.boolean(),
  state: z.enum(['open', 'committed']),
  /**
   * The source said its checkpoint is published (AFTER_PUBLISH), or the node settled that it was.
   * Until then a committed session's image can still be rolled back to the last checkpoint.
   */
  published: z.boolean().optional(),
  commit: z
    .strictObject({
      chunks: z.number().int().nonnegative(),
      bytes: z.number().int().nonnegative(),
      aggregateSha256: z.string(),
      targetRef: z.string(),
    })
    .optional(),
  startedAt: z.string(),
});

export type SessionRecord = z.infer<typeof recordSchema>;

/** What a commit is checked against and then recorded as. */
export interface CommitClaim {
  readonly chunks: number;
  readonly bytes: number;
  readonly aggregateSha256: string;
}

/** One chunk as the node verified and wrote it. */
export interface ChunkSlot {
  readonly sha256: string;
  readonly layoutSha256: string;
  readonly offset: number;
  readonly bytes: number;
}

/** The session records of every disk on a node, kept in `dir` and mirrored in memory. */
export class SessionStore {
  private readonly records = new Map<string, SessionRecord>();

  constructor(
    readonly dir: string,
    private readonly log: (line: string) => void = () => {},
  ) {}

  /** Creates the directory and reads every record (a damaged one is reported and ignored). */
  async init(): Promise<void> {
    await mkdir(this.dir, { recursive: true });
    for (const name of await readdir(this.dir)) {
      if (!name.endsWith(RECORD_SUFFIX)) continue;
      const path = join(this.dir, name);
      try {
        const record = recordSchema.parse(JSON.parse(await readFile(path, 'utf8')));
        this.records.set(record.disk, record);
      } catch (err) {
        this.log(
          `node: session record ${path} is damaged and ignored (no resume of it): ${errorMessage(err)}`,
        );
      }
    }
  }

  get(disk: string): SessionRecord | undefined {
    return this.records.get(disk);
  }

  /**
   * Apparent bytes of the images whose latest session `credential` started, except `disk`'s: each
   * disk's size, twice while a session stages beside an existing image.
   */
  usage(credential: string, exceptDisk: string): number {
    let sum = 0;
    for (const r of this.records.values()) {
      if (r.credential !== credential || r.disk === exceptDisk) continue;
      sum += r.sizeBytes * (r.state === 'open' && r.overImage ? 2 : 1);
    }
    return sum;
  }

  /**
   * Starts a new session of `disk`, durably, before anything of it is written or welcomed: the old
   * record's chunk digests go first, so a crash in between can never pair them with the new token.
   */
  async begin(
    fields: Omit<SessionRecord, 'id' | 'token' | 'state' | 'commit' | 'startedAt'>,
  ): Promise<SessionRecord> {
    const record: SessionRecord = {
      id: randomBytes(16).toString('hex'),
      token: randomBytes(TOKEN_BYTES).toString('hex'),
      ...fields,
      state: 'open',
      startedAt: new Date().toISOString(),
    };
    await rm(this.digestsPath(fields.disk), { force: true });
    await this.write(record);
    return record;
  }

  /** Records a verified commit; the session can then be resumed only to repeat its answers. */
  async commit(disk: string, claim: CommitClaim, targetRef: string): Promise<SessionRecord> {
    const current = this.records.get(disk);
    if (current === undefined) throw new FerryError(`disk ${disk}: no session record to commit`);
    const record: SessionRecord = { ...current, state: 'committed', commit: { ...claim, targetRef } };
    await this.write(record);
    return record;
  }

  /** The committed session's checkpoint is published: its commit is final. */
  async markPublished(disk: string): Promise<void> {
    const current = this.records.get(disk);
    if (current?.state !== 'committed' || current.published) return;
    await this.write({ ...current, published: true });
  }

  /** The committed session was rolled back: it is open again, and its chunks may be resumed. */
  async reopen(disk: string): Promise<void> {
    const current = this.records.get(disk);
    if (current?.state !== 'committed') return;
    const { commit: _commit, published: _published, ...rest } = current;
    await this.write({ ...rest, state: 'open' });
  }

  /** Opens the disk's digest record for writing slots (created if missing). */
  async openDigests(disk: string): Promise<DigestLog> {
    const path = this.digestsPath(disk);
    const fh = await open(path, 'a+').then(async (created) => {
      // 'a+' creates without truncating; positional writes need a handle not in append mode.
      await created.close();
      return open(path, 'r+');
    });
    return new DigestLog(fh, path);
  }

  private digestsPath(disk: string): string {
    return join(this.dir, `${disk}${DIGESTS_SUFFIX}`);
  }

  private async write(record: SessionRecord): Promise<void> {
    const path = join(this.dir, `${record.disk}${RECORD_SUFFIX}`);
    const tmp = `${path}.tmp`;
    const out = await open(tmp, 'w');
    try {
      await out.writeFile(`${JSON.stringify(record, null, 2)}\n`);
      await out.sync();
    } finally {
      await out.close();
    }
    await rename(tmp, path);
    const dir = await open(this.dir, 'r');
    try {
      await dir.sync();
    } finally {
      await dir.close();
    }
    this.records.set(record.disk, record);
  }
}

/** Constant-time comparison of two hex tokens of the same length. */
export function tokensEqual(a: string, b: string): boolean {
  const x = Buffer.from(a, 'hex');
  const y = Buffer.from(b, 'hex');
  return x.length === TOKEN_BYTES && y.length === TOKEN_BYTES && timingSafeEqual(x, y);
}

/** A disk's per-seq chunk record (see SLOT_BYTES). */
export class DigestLog {
  constructor(
    private readonly fh: FileHandle,
    readonly path: string,
  ) {}

  /** Records a chunk written and verified; called before the chunk is acknowledged. */
  async record(seq: number, slot: ChunkSlot): Promise<void> {
    const buf = Buffer.alloc(SLOT_BYTES);
    buf.write(slot.sha256, 0, 'hex');
    buf.write(slot.layoutSha256, 32, 'hex');
    buf.writeBigUInt64BE(BigInt(slot.offset), 64);
    buf.writeBigUInt64BE(BigInt(slot.bytes), 72);
    let done = 0;
    while (done < SLOT_BYTES) {
      const { bytesWritten } = await this.fh.write(buf, done, SLOT_BYTES - done, seq * SLOT_BYTES + done);
      done += bytesWritten;
    }
  }

  /** Every slot recorded so far is on stable storage when this resolves. */
  async sync(): Promise<void> {
    await this.fh.datasync();
  }

  async close(): Promise<void> {
    await this.fh.close();
  }

  /** Slots of seqs [0, count) in order; undefined for a seq never recorded. */
  async *slots(count: number): AsyncGenerator<ChunkSlot | undefined> {
    const buf = Buffer.alloc(SLOTS_PER_READ * SLOT_BYTES);
    for (let first = 0; first < count; first += SLOTS_PER_READ) {
      const n = Math.min(SLOTS_PER_READ, count - first);
      const want = n * SLOT_BYTES;
      buf.fill(0, 0, want);
      let got = 0;
      while (got < want) {
        const { bytesRead } = await this.fh.read(buf, got, want - got, first * SLOT_BYTES + got);
        if (bytesRead === 0) break; // past the end: never recorded, left as zeros
        got += bytesRead;
      }
      for (let i = 0; i < n; i++) {
        const at = i * SLOT_BYTES;
        const bytes = Number(buf.readBigUInt64BE(at + 72));
        yield bytes === 0
          ? undefined
          : {
              sha256: buf.toString('hex', at, at + 32),
              layoutSha256: buf.toString('hex', at + 32, at + 64),
              offset: Number(buf.readBigUInt64BE(at + 64)),
              bytes,
            };
      }
    }
  }

  /** Seqs the file has room for: anything recorded is below this. */
  async extent(): Promise<number> {
    return Math.ceil((await this.fh.stat()).size / SLOT_BYTES);
  }
}

/**
 * Why the node must not commit: a chunk missing, one past the commit's count, an aggregate that
 * differs from the node's own over what it verified, or EXTENTS that are not exactly the chunks'
 * extents. Undefined when the commit is the node's own finding.
 */
export async function commitProblem(
  log: DigestLog,
  claim: CommitClaim,
  extents: readonly Extent[],
): Promise<string | undefined> {
  // The file only grows by a slot being written: longer than the count means a chunk past it.
  const recorded = await log.extent();
  if (recorded > claim.chunks) {
    return `the node holds chunk seq ${recorded - 1}, past the ${claim.chunks} chunks the COMMIT counts`;
  }
  const aggregate = new LinearAggregator();
  const layout = new ExtentCursor(extents);
  let seq = 0;
  for await (const slot of log.slots(claim.chunks)) {
    if (slot === undefined) return `chunk seq ${seq} never arrived at the node`;
    aggregate.add(slot.sha256);
    const problem = layout.take(slot);
    if (problem !== undefined) return `chunk seq ${seq}: ${problem}`;
    seq++;
  }
  const mine = aggregate.hex();
  if (mine !== claim.aggregateSha256) {
    return `aggregate SHA-256 ${claim.aggregateSha256} is not the node's ${mine} over the ${claim.chunks} chunks it verified`;
  }
  if (!layout.done) return `the EXTENTS hold ${layout.rest()} bytes no chunk carried`;
  return undefined;
}

/** Why the node does not hold the claimed chunks (seqs 0..chunks-1), or undefined if it does. */
export async function checkProblem(log: DigestLog, check: ResumeCheck): Promise<string | undefined> {
  const digests = new LinearAggregator();
  const layouts = new LinearAggregator();
  let seq = 0;
  for await (const slot of log.slots(check.chunks)) {
    if (slot === undefined) return `the node has no chunk seq ${seq}`;
    digests.add(slot.sha256);
    layouts.add(slot.layoutSha256);
    seq++;
  }
  if (digests.hex() !== check.aggregateSha256) return 'the chunks the node holds have other digests';
  if (layouts.hex() !== check.layoutSha256) return 'the chunks the node holds lie elsewhere on the disk';
  return undefined;
}

/**
 * Walks the commit's extents as the engine cut them into chunks: seq after seq, each taking its
 * byte count from where the previous stopped, so each chunk's pieces must hash to its layout.
 */
class ExtentCursor {
  private i = 0;
  /** Bytes of extents[i] already taken. */
  private into = 0;

  constructor(private readonly extents: readonly Extent[]) {}

  get done(): boolean {
    return this.i >= this.extents.length;
  }

  rest(): number {
    let sum = 0;
    for (let k = this.i; k < this.extents.length; k++) sum += this.extents[k]!.length;
    return sum - this.into;
  }

  take(slot: ChunkSlot): string | undefined {
    const first = this.extents[this.i];
    if (first === undefined)
      return `it carries ${slot.bytes} bytes at offset ${slot.offset} outside the EXTENTS`;
    if (first.offset + this.into !== slot.offset) {
      return `it starts at offset ${slot.offset}, but the EXTENTS continue at ${first.offset + this.into}`;
    }
    const hash = new LayoutHash();
    let left = slot.bytes;
    while (left > 0) {
      const e = this.extents[this.i];
      if (e === undefined) return `it carries ${left} bytes past the end of the EXTENTS`;
      const n = Math.min(left, e.length - this.into);
      hash.piece(e.offset + this.into, n);
      left -= n;
      this.into += n;
      if (this.into === e.length) {
        this.i++;
        this.into = 0;
      }
    }
    if (hash.hex() !== slot.layoutSha256) return 'its extents are not the EXTENTS at its place';
    return undefined;
  }
}

/** Extents received for a COMMIT, packed 16 bytes each (a million is 16 MiB, not 60 MiB of objects). */
export class ExtentBuffer {
  private data = new Float64Array(2 * 1024);
  length = 0;
  /** Sum of the extents' lengths. */
  bytes = 0;

  push(e: Extent): void {
    if (2 * this.length === this.data.length) {
      const grown = new Float64Array(this.data.length * 2);
      grown.set(this.data);
      this.data = grown;
    }
    this.data[2 * this.length] = e.offset;
    this.data[2 * this.length + 1] = e.length;
    this.length++;
    this.bytes += e.length;
  }

  last(): Extent | undefined {
    if (this.length === 0) return undefined;
    return { offset: this.data[2 * this.length - 2]!, length: this.data[2 * this.length - 1]! };
  }

  toArray(): Extent[] {
    const out: Extent[] = new Array(this.length);
    for (let i = 0; i < this.length; i++)
      out[i] = { offset: this.data[2 * i]!, length: this.data[2 * i + 1]! };
    return out;
  }
}
