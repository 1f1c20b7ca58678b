// The engine's state port on a local directory: per-disk progress and the checkpoint catalog.
//
//   <dir>/progress/<set>/<disk>.json      watermark record, replaced atomically (write + rename)
//   <dir>/progress/<set>/<disk>.digests   32-byte chunk digests below the watermark, appended
//   <dir>/catalog/<set>/<sequence>.json   published checkpoints, created exactly once (link)
import { type FileHandle, link, mkdir, open, readdir, readFile, rename, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { FerryError } from '../engine/errors.ts';
import type { DiskProgress, RecoveryCheckpoint, StateStore } from '../engine/ports.ts';

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
    z.strictObject({
      disk: z.string(),
      source: z.string(),
      target: z.string(),
      sizeBytes: z.number().int().nonnegative(),
      kind: z.enum(['full', 'incremental']),
      chunks: z.number().int().nonnegative(),
      bytes: z.number().int().nonnegative(),
      aggregateSha256: z.string(),
      targetRef: z.string().optional(),
    }),
  ),
});

/** Path-safe form of a set or disk id (ids come from operators and may hold '/' or ':'). */
const safe = (id: string): string => encodeURIComponent(id);

export class LocalStateStore implements StateStore {
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
    await mkdir(join(this.dir, 'progress', safe(set)), { recursive: true });
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
    const dir = join(this.dir, 'catalog', safe(checkpoint.set));
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
      await rm(tmp, { force: true });
    }
  }

  async latestCheckpoint(set: string): Promise<RecoveryCheckpoint | undefined> {
    const all = await this.listCheckpoints(set);
    return all[all.length - 1];
  }

  async listCheckpoints(set?: string): Promise<RecoveryCheckpoint[]> {
    const root = join(this.dir, 'catalog');
    const sets = set === undefined ? ((await readdir(root).catch(notFound)) ?? []) : [safe(set)];
    const out: RecoveryCheckpoint[] = [];
    for (const s of sets.sort()) {
      const files = ((await readdir(join(root, s)).catch(notFound)) ?? [])
        .filter((f) => /^\d+\.json$/.test(f))
        .sort();
      for (const f of files) {
        const path = join(root, s, f);
        const cp = parseJson(checkpointSchema, await readFile(path, 'utf8'), path);
        out.push({ ...cp, parent: cp.parent });
      }
    }
    return out;
  }

  private progressBase(set: string, disk: string): string {
    return join(this.dir, 'progress', safe(set), safe(disk));
  }

  private async loadRecord(base: string): Promise<z.infer<typeof progressSchema> | undefined> {
    const text = await readFile(`${base}.json`, 'utf8').catch(notFound);
    return text === undefined ? undefined : parseJson(progressSchema, text, `${base}.json`);
  }
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

async function writeFileSynced(path: string, text: string): Promise<void> {
  const fh = await open(path, 'w');
  try {
    await fh.writeFile(text);
    await fh.sync();
  } finally {
    await fh.close();
  }
}

async function writeAtomic(path: string, text: string): Promise<void> {
  const tmp = `${path}.tmp`;
  await writeFileSynced(tmp, text);
  await rename(tmp, path);
}
