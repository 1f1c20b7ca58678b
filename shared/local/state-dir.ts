// The engine's state port on a local directory: per-disk progress and the checkpoint catalog.
//
//   <dir>/progress/<set>/<disk>.json      watermark record, replaced atomically (write + rename)
//   <dir>/progress/<set>/<disk>.digests   32-byte chunk digests below the watermark, appended
//   <dir>/catalog/<set>/<sequence>.json   published checkpoints, created exactly once (link)
//   <dir>/commit/<set>.json               a commit under way (CommitJournal), until published or undone
//   <dir>/locks/<set>.lock                the process that owns the set (replicate, verify) while it runs
//   <dir>/failover/<set>.json             the set is failed over (FailoverMark): replication into it is refused
//   <dir>/events/<set>/<sequence>.json    recovery events (failover, migration, failback), created once each
import { type FileHandle, link, mkdir, open, readdir, readFile, rename, rm } from 'node:fs/promises';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { z } from 'zod';
import { diskAggregateSchema, withNamedAggregate } from '../engine/aggregate.ts';
import { CatalogError, ConfigError, errorMessage, FerryError } from '../engine/errors.ts';
import { checkName } from '../engine/names.ts';
import type {
  CommitIntent,
  CommitJournal,
  DiskProgress,
  RecoveryCheckpoint,
  StateStore,
} from '../engine/ports.ts';
import { syncDir, writeAtomic, writeFileSynced } from './durable.ts';

const progressSchema = z.strictObject({
  cycleId: z.string(),
  fingerprint: z.string(),
  watermark: z.number().int().nonnegative(),
  bytesDone: z.number().int().nonnegative(),
});

const checkpointSchema = z.strictObject({
  id: z.string(),
  set: z.string(),
  sequence: z.number().int().positive(),
  createdAt: z.string(),
  parent: z.string().optional(),
  disks: z.array(
    // Entries written before the aggregate named its algorithm hold `aggregateSha256`: only the
    // engine's replicate publishes into a state directory, so that was the ferry-chunk-sha256 one.
    z.preprocess(
      (disk) => withNamedAggregate(disk, 'ferry-chunk-sha256'),
      z.strictObject({
        disk: z.string(),
        source: z.string(),
        target: z.string(),
        sizeBytes: z.number().int().nonnegative(),
        kind: z.enum(['full', 'incremental']),
        chunks: z.number().int().nonnegative(),
        bytes: z.number().int().nonnegative(),
        aggregate: diskAggregateSchema,
        targetRef: z.string().optional(),
      }),
    ),
  ),
});

const failoverMarkSchema = z.strictObject({
  set: z.string(),
  /** How the set came to be failed over. */
  mode: z.enum(['failover', 'migration']),
  /** The checkpoint the recovered images hold: the last one both sides share, for failback. */
  checkpoint: z.string(),
  sequence: z.number().int().positive(),
  at: z.string(),
  /** The directory the disks were recovered into. */
  to: z.string(),
  disks: z.array(
    z.strictObject({
      disk: z.string(),
      /** The recovered image (absolute path). */
      recovered: z.string(),
      /** The disk's source as the checkpoint records it: where failback writes back to. */
      original: z.string(),
      sizeBytes: z.number().int().nonnegative(),
    }),
  ),
});

/** A set that is failed over: its recovered images are the live disks now, not its sources. */
export type FailoverMark = z.infer<typeof failoverMarkSchema>;

const recoveryEventSchema = z.strictObject({
  set: z.string(),
  sequence: z.number().int().positive(),
  type: z.enum(['failover', 'migration', 'failback', 'failover-cleared']),
  at: z.string(),
  /** The checkpoint the event is about (failed over to, or shared by a failback). */
  checkpoint: z.string(),
  /** One line an operator reads in `ferry checkpoints`. */
  summary: z.string(),
  /** What the command reported, as it printed it with --json. */
  details: z.unknown().optional(),
});

/** A recovery event of a set, as recorded in its catalog. */
export type RecoveryEvent = z.infer<typeof recoveryEventSchema>;

const intentSchema = z.strictObject({
  set: z.string(),
  cycleId: z.string(),
  disks: z.array(z.strictObject({ disk: z.string(), target: z.string() })),
});

/** A catalog entry that could not be read, with the reason and what to do about it. */
export interface DamagedEntry {
  readonly path: string;
  readonly set: string;
  readonly sequence: number;
  readonly reason: string;
}

/** A set's catalog as read: the entries that parse, and those that do not. */
export interface CatalogView {
  readonly checkpoints: RecoveryCheckpoint[];
  readonly damaged: DamagedEntry[];
}

/**
 * Set and disk names become folder and file names here, so they are checked again at this
 * boundary whatever the caller checked: no name climbs out of its folder.
 */
const setName = (set: string): string => checkName('set', set, 'state directory');
const diskName = (disk: string): string => checkName('disk', disk, 'state directory');

export class LocalStateStore implements StateStore, CommitJournal {
  constructor(readonly dir: string) {}

  async loadProgress(set: string, disk: string): Promise<DiskProgress | undefined> {
    const base = this.progressBase(set, disk);
    const text = await readFile(`${base}.json`, 'utf8').catch(notFound);
    if (text === undefined) return undefined;
    const record = parseJson(progressSchema, text, `${base}.json`);
    const raw = (await readFile(`${base}.digests`).catch(notFound)) ?? Buffer.alloc(0);
    const needed = record.watermark * 32;
    if (raw.length < needed) {
      throw new FerryError(
        `state ${base}.digests holds ${raw.length / 32} digests, record needs ${record.watermark}`,
        {
          disk,
        },
      );
    }
    const digests: string[] = [];
    for (let i = 0; i < needed; i += 32) digests.push(raw.subarray(i, i + 32).toString('hex'));
    return { ...record, digests };
  }

  async saveProgress(
    set: string,
    disk: string,
    progress: Omit<DiskProgress, 'digests'>,
    appended: readonly string[],
  ): Promise<void> {
    const base = this.progressBase(set, disk);
    await mkdir(join(this.dir, 'progress', setName(set)), { recursive: true });
    const previous = await this.loadRecord(base);
    const sameCycle = previous?.cycleId === progress.cycleId && previous.fingerprint === progress.fingerprint;
    const keep = sameCycle ? previous.watermark * 32 : 0;
    // Digests first, then the record that vouches for them: a crash in between leaves extra digests
    // that the old record does not count, and the next save truncates them away.
    // Not 'a': with O_APPEND, Linux ignores the write position we need after truncating.
    const fh: FileHandle = await open(`${base}.digests`, 'r+').catch(async (err) => {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
      return open(`${base}.digests`, 'w+');
    });
    try {
      await fh.truncate(keep);
      await fh.write(Buffer.concat(appended.map((d) => Buffer.from(d, 'hex'))), 0, undefined, keep);
      await fh.sync();
    } finally {
      await fh.close();
    }
    const record = {
      cycleId: progress.cycleId,
      fingerprint: progress.fingerprint,
      watermark: progress.watermark,
      bytesDone: progress.bytesDone,
    };
    await writeAtomic(`${base}.json`, JSON.stringify(record));
  }

  async clearProgress(set: string, disk: string): Promise<void> {
    const base = this.progressBase(set, disk);
    await rm(`${base}.json`, { force: true });
    await rm(`${base}.digests`, { force: true });
  }

  async publishCheckpoint(checkpoint: RecoveryCheckpoint): Promise<void> {
    const dir = join(this.dir, 'catalog', setName(checkpoint.set));
    await mkdir(dir, { recursive: true });
    const final = join(dir, `${String(checkpoint.sequence).padStart(8, '0')}.json`);
    const tmp = `${final}.${process.pid}.tmp`;
    await writeFileSynced(tmp, `${JSON.stringify(checkpoint, null, 2)}\n`);
    try {
      // link() fails if the name exists: two publishers of one sequence cannot both succeed.
      await link(tmp, final);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'EEXIST') {
        throw new FerryError(`checkpoint ${checkpoint.id} is already published`, { cause: err });
      }
      throw err;
    } finally {
      await rm(tmp, { force: true }).catch(() => {}); // the entry is published; a stray tmp is harmless
    }
    await syncDir(dir);
  }

  /**
   * The latest entry of the set. Throws a CatalogError if the entry with the highest sequence is
   * damaged: an older intact one is not the real last checkpoint, and must not be taken for it.
   */
  async latestCheckpoint(set: string): Promise<RecoveryCheckpoint | undefined> {
    const { checkpoints, damaged } = await this.readCatalog(set);
    const latest = checkpoints[checkpoints.length - 1];
    const worst = damaged[damaged.length - 1];
    if (worst !== undefined && worst.sequence > (latest?.sequence ?? 0)) {
      throw new CatalogError(
        `catalog entry ${worst.path} (checkpoint #${worst.sequence}) is damaged: ${worst.reason}`,
        {
          path: worst.path,
          sequence: worst.sequence,
        },
      );
    }
    return latest;
  }

  /** Every readable checkpoint; damaged entries are left out (see `readCatalog` to list them). */
  async listCheckpoints(set?: string): Promise<RecoveryCheckpoint[]> {
    return (await this.readCatalog(set)).checkpoints;
  }

  /**
   * Reads the catalog of one set (or all), tolerating damaged entries: each is reported with its
   * path and reason instead of making the whole catalog unreadable.
   */
  async readCatalog(set?: string): Promise<CatalogView> {
    const root = join(this.dir, 'catalog');
    const sets = set === undefined ? ((await readdir(root).catch(notFound)) ?? []) : [setName(set)];
    const checkpoints: RecoveryCheckpoint[] = [];
    const damaged: DamagedEntry[] = [];
    for (const s of sets.sort()) {
      const files = ((await readdir(join(root, s)).catch(notFound)) ?? [])
        .filter((f) => /^\d+\.json$/.test(f))
        .sort();
      for (const f of files) {
        const path = join(root, s, f);
        const sequence = Number(f.slice(0, -'.json'.length));
        try {
          const cp = parseJson(checkpointSchema, await readFile(path, 'utf8'), path);
          if (cp.sequence !== sequence || cp.set !== decodeURIComponent(s)) {
            throw new FerryError(
              `holds checkpoint #${cp.sequence} of set ${cp.set}, not #${sequence} of ${s}`,
            );
          }
          checkpoints.push({ ...cp, parent: cp.parent });
        } catch (err) {
          damaged.push({ path, set: s, sequence, reason: errorMessage(err) });
        }
      }
    }
    return { checkpoints, damaged };
  }

  /** The set's failover mark, if it is failed over. */
  async readFailover(set: string): Promise<FailoverMark | undefined> {
    const path = this.failoverPath(set);
    const text = await readFile(path, 'utf8').catch(notFound);
    return text === undefined ? undefined : parseJson(failoverMarkSchema, text, path);
  }

  /**
   * Marks the set failed over. Refuses if it is already (a second failover would lose the first
   * one's record of which checkpoint the live disks came from).
   */
  async markFailedOver(mark: FailoverMark): Promise<void> {
    const dir = join(this.dir, 'failover');
    await mkdir(dir, { recursive: true });
    const path = this.failoverPath(mark.set);
    try {
      await writeFileSynced(path, `${JSON.stringify(mark, null, 2)}\n`, 'wx');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
      const held = await this.readFailover(mark.set).catch(() => undefined);
      throw new FerryError(
        `set ${mark.set} is already failed over${held ? ` (to checkpoint ${held.checkpoint}, into ${held.to}, at ${held.at})` : ''}: fail it back (ferry failback) or clear it (ferry recover --clear-failover) first`,
        { setting: 'set' },
      );
    }
    await syncDir(dir);
  }

  /** Removes the set's failover mark (idempotent). */
  async clearFailover(set: string): Promise<void> {
    await rm(this.failoverPath(set), { force: true });
    await syncDir(join(this.dir, 'failover')).catch(notFound);
  }

  /** Appends a recovery event to the set's catalog, numbered after the last one; returns it. */
  async recordEvent(event: Omit<RecoveryEvent, 'sequence'>): Promise<RecoveryEvent> {
    const dir = join(this.dir, 'events', setName(event.set));
    await mkdir(dir, { recursive: true });
    for (let attempt = 0; ; attempt++) {
      const names = (await readdir(dir)).filter((f) => /^\d+\.json$/.test(f)).sort();
      const sequence = Number(names.at(-1)?.slice(0, -'.json'.length) ?? 0) + 1;
      const recorded: RecoveryEvent = { ...event, sequence };
      const final = join(dir, `${String(sequence).padStart(8, '0')}.json`);
      const tmp = `${final}.${process.pid}.tmp`;
      await writeFileSynced(tmp, `${JSON.stringify(recorded, null, 2)}\n`);
      try {
        // link() fails if the name exists: another process took this number, so take the next.
        await link(tmp, final);
        await syncDir(dir);
        return recorded;
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EEXIST' || attempt >= 5) throw err;
      } finally {
        await rm(tmp, { force: true }).catch(() => {});
      }
    }
  }

  /** The recovery events of one set (or all), oldest first per set; unreadable ones are skipped. */
  async readEvents(set?: string): Promise<RecoveryEvent[]> {
    const root = join(this.dir, 'events');
    const sets = set === undefined ? ((await readdir(root).catch(notFound)) ?? []) : [setName(set)];
    const events: RecoveryEvent[] = [];
    for (const s of sets.sort()) {
      const files = ((await readdir(join(root, s)).catch(notFound)) ?? [])
        .filter((f) => /^\d+\.json$/.test(f))
        .sort();
      for (const f of files) {
        const path = join(root, s, f);
        const parsed = await readFile(path, 'utf8')
          .then((text) => parseJson(recoveryEventSchema, text, path))
          .catch(() => undefined);
        if (parsed !== undefined) events.push(parsed);
      }
    }
    return events;
  }

  async begin(intent: CommitIntent): Promise<void> {
    const path = this.intentPath(intent.set);
    await mkdir(join(this.dir, 'commit'), { recursive: true });
    await writeAtomic(path, JSON.stringify(intent));
    await syncDir(join(this.dir, 'commit'));
  }

  async load(set: string): Promise<CommitIntent | undefined> {
    const path = this.intentPath(set);
    const text = await readFile(path, 'utf8').catch(notFound);
    return text === undefined ? undefined : parseJson(intentSchema, text, path);
  }

  async clear(set: string): Promise<void> {
    await rm(this.intentPath(set), { force: true });
    await syncDir(join(this.dir, 'commit')).catch(notFound);
  }

  /**
   * Fails early, with the real cause, if progress and the catalog could not be written here: an
   * unwritable state directory must not be discovered after the whole copy.
   */
  async checkWritable(): Promise<void> {
    const probe = join(this.dir, `.write-probe-${process.pid}`);
    try {
      await mkdir(this.dir, { recursive: true });
      await writeFileSynced(probe, 'ferry');
      await rm(probe, { force: true });
    } catch (err) {
      throw new FerryError(`state directory ${this.dir} is not writable: ${errorMessage(err)}`, {
        setting: 'state',
        cause: err,
      });
    }
  }

  /**
   * Takes the set for this process until the returned release is called: one cycle, recovery or
   * verify at a time, so recovery never rolls back a commit that a live run is still making. The
   * lock is a file naming its owner (pid, host); one left by a process that died on this host is
   * taken over, since a crashed run must not block the next one.
   */
  async lockSet(set: string): Promise<() => Promise<void>> {
    const dir = join(this.dir, 'locks');
    const path = join(dir, `${setName(set)}.lock`);
    await mkdir(dir, { recursive: true });
    const mine = JSON.stringify({ pid: process.pid, host: hostname(), since: new Date().toISOString() });
    for (let attempt = 0; ; attempt++) {
      try {
        await writeFileSynced(path, mine, 'wx');
        return async () => {
          if ((await readFile(path, 'utf8').catch(notFound)) === mine) await rm(path, { force: true });
        };
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EEXIST' || attempt >= 5) throw err;
      }
      const held = await readFile(path, 'utf8').catch(notFound);
      if (held === undefined) continue; // released meanwhile
      const owner = parseOwner(held);
      if (owner !== undefined && (owner.host !== hostname() || isAlive(owner.pid))) {
        throw inUse(set, owner, path);
      }
      // A dead owner's lock (or an unreadable one): move it aside, and take over only if what was
      // moved is the stale lock just read (another process may have broken it and locked first).
      const aside = `${path}.stale-${process.pid}`;
      await rename(path, aside).catch(notFound);
      const moved = await readFile(aside, 'utf8').catch(notFound);
      if (moved !== undefined && moved !== held) await link(aside, path).catch(() => {});
      await rm(aside, { force: true });
    }
  }

  /** Throws, as lockSet would, if a live process holds the set; takes nothing. */
  async checkUnlocked(set: string): Promise<void> {
    const path = join(this.dir, 'locks', `${setName(set)}.lock`);
    const held = await readFile(path, 'utf8').catch(notFound);
    const owner = held === undefined ? undefined : parseOwner(held);
    if (owner !== undefined && (owner.host !== hostname() || isAlive(owner.pid)))
      throw inUse(set, owner, path);
  }

  private failoverPath(set: string): string {
    return join(this.dir, 'failover', `${setName(set)}.json`);
  }

  private intentPath(set: string): string {
    return join(this.dir, 'commit', `${setName(set)}.json`);
  }

  private progressBase(set: string, disk: string): string {
    return join(this.dir, 'progress', setName(set), diskName(disk));
  }

  private async loadRecord(base: string): Promise<z.infer<typeof progressSchema> | undefined> {
    const text = await readFile(`${base}.json`, 'utf8').catch(notFound);
    return text === undefined ? undefined : parseJson(progressSchema, text, `${base}.json`);
  }
}

/**
 * Why a cycle of a failed-over set is refused (the local equivalent of a paused schedule): its
 * disks run from the recovered images now, and a cycle would replicate the stale sources over the
 * checkpoint they came from.
 */
export function failedOverRefusal(mark: FailoverMark): ConfigError {
  return new ConfigError(
    `set ${mark.set} is failed over (${mark.mode} to checkpoint ${mark.checkpoint} at ${mark.at}; its disks run from ${mark.to}): ` +
      `replication into it is paused. Fail it back with "ferry failback --set ${mark.set}", or, if its original disks are live again, ` +
      `clear the mark with "ferry recover --clear-failover --set ${mark.set}"`,
    { setting: 'set' },
  );
}

function notFound(err: unknown): undefined {
  if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
  throw err;
}

function parseJson<T>(schema: z.ZodType<T>, text: string, path: string): T {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (err) {
    throw new FerryError(`state file ${path} is not valid JSON (damaged?)`, { cause: err });
  }
  const parsed = schema.safeParse(value);
  if (!parsed.success) {
    throw new FerryError(`state file ${path} is malformed: ${parsed.error.issues[0]?.message ?? 'invalid'}`);
  }
  return parsed.data;
}

interface LockOwner {
  readonly pid: number;
  readonly host: string;
  readonly since: string;
}

function parseOwner(text: string): LockOwner | undefined {
  try {
    const o = JSON.parse(text) as Partial<LockOwner>;
    if (typeof o.pid === 'number' && typeof o.host === 'string') return { since: '?', ...o } as LockOwner;
  } catch {
    // unreadable: treated as stale (a lock is written whole with fsync, so only damage makes it so)
  }
  return undefined;
}

function inUse(set: string, owner: LockOwner, path: string): FerryError {
  return new FerryError(
    `set ${set} is in use by process ${owner.pid} on ${owner.host} since ${owner.since} ` +
      `(a replicate or verify of it is running); wait for it to finish. If no ferry process is ` +
      `running there, remove ${path}`,
    { setting: 'set' },
  );
}

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM'; // alive, owned by another user
  }
}
