// Drills recorded in a state directory: a running drill's record (who serves what, which files it
// made), so `ferry recover --cleanup` can end it from another process, and each ended drill's
// report (checkpoint, time until ready, exports, what was cleaned up), kept.
//
//   <dir>/drills/<id>.json          a drill that is running (or whose owner died): removed once it is cleaned up
//   <dir>/drills/<id>.report.json   the report of an ended drill, created once
import { mkdir, readdir, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { errorMessage } from '../engine/errors.ts';
import { writeAtomic } from './durable.ts';

const exportSchema = z.strictObject({
  disk: z.string(),
  uri: z.string(),
  /** The nbdkit serving it. */
  pid: z.number().int(),
  image: z.string(),
});

const recordSchema = z.strictObject({
  id: z.string(),
  set: z.string(),
  checkpoint: z.string(),
  /** The ferry process that runs the drill. */
  owner: z.strictObject({ pid: z.number().int(), host: z.string() }),
  startedAt: z.string(),
  readyAt: z.string(),
  /** From the command's start until every export accepted connections (the drill's achieved RTO). */
  readyMs: z.number().nonnegative(),
  until: z.string(),
  dir: z.string(),
  createdDir: z.boolean(),
  exports: z.array(exportSchema),
  /** Every file and folder of the drill (images, overlay folder, pid files). */
  files: z.array(z.string()),
});

export type DrillRecord = z.infer<typeof recordSchema>;

export interface DrillReport {
  readonly id: string;
  readonly set: string;
  readonly checkpoint: string;
  readonly startedAt: string;
  readonly readyAfterMs: number;
  readonly exports: DrillRecord['exports'];
  readonly endedAt: string;
  /** Why it ended: its TTL, a signal, a server that exited, or `ferry recover --cleanup`. */
  readonly reason: string;
  /** Who tore it down: the drill's own process, or the clean-up (its owner was gone). */
  readonly cleanedBy: 'drill' | 'cleanup';
  readonly serversStopped: number;
  readonly removed: readonly string[];
  /** What the final check found still there (servers alive, files present): empty when clean. */
  readonly left: readonly string[];
  readonly clean: boolean;
  /** The health check (`--check`), when the drill ran one: whether the recovered set works. */
  readonly check?: DrillCheck | undefined;
}

/** A drill's health check: the operator's command run against the exports, and how it ended. */
export interface DrillCheck {
  readonly command: string;
  readonly healthy: boolean;
  /** The command's exit status; null when it was killed (a signal, or the TTL). */
  readonly exitCode: number | null;
  readonly durationMs: number;
  /** Why it is not healthy, in a phrase (`exit status 3`, `killed at the drill's TTL`). */
  readonly reason?: string | undefined;
}

const drillsDir = (stateDir: string): string => join(stateDir, 'drills');
export const drillRecordPath = (stateDir: string, id: string): string =>
  join(drillsDir(stateDir), `${id}.json`);
export const drillReportPath = (stateDir: string, id: string): string =>
  join(drillsDir(stateDir), `${id}.report.json`);

export async function writeDrillRecord(stateDir: string, record: DrillRecord): Promise<string> {
  await mkdir(drillsDir(stateDir), { recursive: true });
  const path = drillRecordPath(stateDir, record.id);
  await writeAtomic(path, `${JSON.stringify(record, null, 2)}\n`);
  return path;
}

export async function removeDrillRecord(stateDir: string, id: string): Promise<void> {
  await rm(drillRecordPath(stateDir, id), { force: true });
}

export async function writeDrillReport(stateDir: string, report: DrillReport): Promise<string> {
  await mkdir(drillsDir(stateDir), { recursive: true });
  const path = drillReportPath(stateDir, report.id);
  await writeAtomic(path, `${JSON.stringify(report, null, 2)}\n`);
  return path;
}

export async function readDrillReport(stateDir: string, id: string): Promise<DrillReport | undefined> {
  const text = await readFile(drillReportPath(stateDir, id), 'utf8').catch(() => undefined);
  return text === undefined ? undefined : (JSON.parse(text) as DrillReport);
}

/** The drills recorded as running (of one set, or all), with the records that cannot be read. */
export async function readDrillRecords(
  stateDir: string,
  set?: string,
): Promise<{ records: DrillRecord[]; unreadable: { path: string; reason: string }[] }> {
  const names = await readdir(drillsDir(stateDir)).catch(() => [] as string[]);
  const records: DrillRecord[] = [];
  const unreadable: { path: string; reason: string }[] = [];
  for (const name of names.filter((n) => n.endsWith('.json') && !n.endsWith('.report.json')).sort()) {
    const path = join(drillsDir(stateDir), name);
    try {
      const record = recordSchema.parse(JSON.parse(await readFile(path, 'utf8')));
      if (set === undefined || record.set === set) records.push(record);
    } catch (err) {
      // Removed meanwhile (its drill ended): not a problem.
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') continue;
      unreadable.push({ path, reason: errorMessage(err) });
    }
  }
  return { records, unreadable };
}
