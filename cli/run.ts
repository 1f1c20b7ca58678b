// The CLI's composition root for a local run: a job spec (URIs, change files, parameters) -> adapters -> one engine cycle.
import { constants } from 'node:fs';
import { access, realpath, stat } from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';
import { z } from 'zod';
import { resolveParams } from '../shared/engine/config.ts';
import { ConfigError, errorMessage, FerryError } from '../shared/engine/errors.ts';
import { isValidName, NAME_RULE } from '../shared/engine/names.ts';
import type { DiskSource, DiskTarget } from '../shared/engine/ports.ts';
import {
  type CycleStep,
  type DiskJob,
  type ReplicationEvent,
  type ReplicationResult,
  recoverCommit,
  replicate,
} from '../shared/engine/replicate.ts';
import { oldestKept, resolveRetention, retentionSchema } from '../shared/engine/retention.ts';
import { settleAll } from '../shared/engine/settle.ts';
import { FileTarget } from '../shared/local/file-target.ts';
import { type PruneStep, pruneHistory } from '../shared/local/history.ts';
import { failedOverRefusal, LocalStateStore } from '../shared/local/state-dir.ts';
import { systemClock, systemRandom } from '../shared/runtime/clock.ts';
import { readChangeFile } from './change-map.ts';
import { filePath, openNodeClient, openSource, openTarget, type RemoteAccess } from './targets.ts';

const nameSchema = z.string().refine(isValidName, { message: `not a valid name (${NAME_RULE})` });

export const diskSpecSchema = z.strictObject({
  id: nameSchema,
  source: z.string().min(1),
  target: z.string().min(1),
  /** Path of a change map (JSON extents); absent means a full copy. */
  changed: z.string().min(1).optional(),
  /** Path of the node's join file, for a ferry:// target (else the run's default: --join, FERRY_JOIN). */
  join: z.string().min(1).optional(),
});

export const jobSpecSchema = z.strictObject({
  set: nameSchema.default('default'),
  disks: z.array(diskSpecSchema).min(1),
  params: z.record(z.string(), z.unknown()).default({}),
  /** How many checkpoints stay recoverable from file targets' history (default: the last 24). */
  retain: retentionSchema.optional(),
});

export type DiskSpec = z.infer<typeof diskSpecSchema>;
export type JobSpec = z.infer<typeof jobSpecSchema>;

export interface LocalRunOptions {
  readonly stateDir: string;
  readonly onEvent?: (event: ReplicationEvent) => void;
  readonly signal?: AbortSignal;
  /** Wraps each opened target (tests use it to count or break writes). */
  readonly wrapTarget?: (target: DiskTarget, disk: string) => DiskTarget;
  readonly wrapSource?: (source: DiskSource, disk: string) => DiskSource;
  /** Told each named point of the cycle (tests); FERRY_TEST_CRASH_AT is used when absent. */
  readonly step?: (step: CycleStep) => void | Promise<void>;
  /** ferry:// targets over plain TCP (--insecure): only toward a node on this host started that way. */
  readonly insecure?: boolean;
  /** Told each named point of the history's pruning (tests); FERRY_TEST_CRASH_AT is used when absent. */
  readonly pruneStep?: (step: PruneStep) => void | Promise<void>;
  /** Told what the retention setting pruned after the checkpoint was published. */
  readonly onHistory?: (event: HistoryEvent) => void;
  /** Run even though the set is failed over: only failback's own re-protecting cycle does. */
  readonly ignoreFailover?: boolean;
}

/** What pruning a file target's history did after a publication. */
export type HistoryEvent =
  | { readonly type: 'pruned'; readonly disk: string; readonly sequences: readonly number[] }
  | { readonly type: 'prune-failed'; readonly disk: string; readonly error: string };

export function parseJobSpec(value: unknown, origin: string): JobSpec {
  const parsed = jobSpecSchema.safeParse(value);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    const where = issue?.path.length ? ` at ${issue.path.join('.')}` : '';
    const shown =
      issue?.code === 'custom' && issue.input !== undefined ? ` ${JSON.stringify(issue.input)}` : '';
    throw new ConfigError(`${origin}${where}:${shown} ${issue?.message ?? 'invalid job'}`, {
      setting: origin,
    });
  }
  const ids = new Set<string>();
  for (const d of parsed.data.disks) {
    if (ids.has(d.id)) throw new ConfigError(`${origin}: disk id "${d.id}" appears twice`, { disk: d.id });
    ids.add(d.id);
  }
  return parsed.data;
}

/** Runs one cycle of the job locally. Opens and always closes every adapter. */
export async function runLocalJob(spec: JobSpec, opts: LocalRunOptions): Promise<ReplicationResult> {
  const sources: DiskSource[] = [];
  const targets: DiskTarget[] = [];
  // Everything that would only fail at the end is checked before a byte moves.
  const state = new LocalStateStore(opts.stateDir);
  await state.checkWritable();
  await checkFiles(spec);
  // One run of a set at a time, from recovering an interrupted commit to cleaning up after publishing.
  const unlock = await state.lockSet(spec.set);
  try {
    // A failed-over set's schedule is paused: its live disks are the recovered images now.
    const failedOver = await state.readFailover(spec.set);
    if (failedOver !== undefined && !opts.ignoreFailover) throw failedOverRefusal(failedOver);
    // Every disk's source opens at once: an NBD handshake is several round trips, and over a WAN
    // link four disks opened one after another would wait four times as long before the first byte.
    const opened = await settleAll(
      spec.disks.map(async (d) => {
        const changed = d.changed === undefined ? undefined : await readChangeFile(d.changed, d.id);
        const rawSource = await openSource(d.source);
        sources.push(rawSource);
        return { d, changed, rawSource };
      }),
    );
    const disks: DiskJob[] = [];
    let blockSize = 0;
    for (const { d, changed, rawSource } of opened) {
      const rawTarget = openTarget(d.target, { join: d.join, insecure: opts.insecure, keepHistory: true });
      targets.push(rawTarget);
      blockSize = Math.max(blockSize, rawTarget.blockSize);
      disks.push({
        id: d.id,
        source: opts.wrapSource ? opts.wrapSource(rawSource, d.id) : rawSource,
        target: opts.wrapTarget ? opts.wrapTarget(rawTarget, d.id) : rawTarget,
        changed,
      });
    }
    const params = resolveParams(sourceSideParams(spec, blockSize), { targetBlockSize: blockSize });
    const result = await replicate(
      { set: spec.set, disks, params },
      {
        clock: systemClock,
        random: systemRandom,
        state,
        journal: state,
        reopenTarget: reopenTargetFor((target) => ({
          join: spec.disks.find((d) => d.target === target)?.join,
          insecure: opts.insecure,
        })),
        ...(opts.step ? { step: opts.step } : crashHook()),
        ...(opts.onEvent ? { onEvent: opts.onEvent } : {}),
        ...(opts.signal ? { signal: opts.signal } : {}),
      },
    );
    await pruneSetHistory(spec, state, opts);
    return result;
  } finally {
    await Promise.allSettled([...sources.map((s) => s.close()), ...targets.map((t) => t.close())]);
    await unlock();
  }
}

/**
 * After a publication, under the set's lock: each file target's history keeps what the set's
 * retention setting keeps, and no more; a ferry:// target's node is told the checkpoint and prunes
 * its replica's history by the same rule (for disks the credential may write: the node refuses
 * others). A prune that fails leaves more history than the setting, never less, so it is reported
 * and the run (whose checkpoint is published) still succeeds; the next publication prunes again.
 */
async function pruneSetHistory(spec: JobSpec, state: LocalStateStore, opts: LocalRunOptions): Promise<void> {
  const checkpoints = await state.listCheckpoints(spec.set);
  const keepFrom = oldestKept(checkpoints, resolveRetention(spec.retain), systemClock.now());
  const latest = checkpoints.reduce<(typeof checkpoints)[number] | undefined>(
    (a, c) => (a === undefined || c.sequence > a.sequence ? c : a),
    undefined,
  );
  if (keepFrom === undefined || latest === undefined) return;
  const step = opts.pruneStep ?? pruneCrashHook();
  for (const d of spec.disks) {
    try {
      let sequences: readonly number[];
      if (isFileUri(d.target)) sequences = await pruneHistory(filePath(d.target, 'target'), keepFrom, step);
      else if (d.target.startsWith('ferry://')) {
        const node = await openNodeClient(d.target, { join: d.join, insecure: opts.insecure });
        const answer = await node.published(latest, keepFrom);
        if (!answer.ok) throw new FerryError(`the node did not prune: ${answer.reason}`, { disk: d.id });
        sequences = answer.sequences;
      } else continue;
      if (sequences.length > 0) opts.onHistory?.({ type: 'pruned', disk: d.id, sequences });
    } catch (err) {
      opts.onHistory?.({ type: 'prune-failed', disk: d.id, error: errorMessage(err) });
    }
  }
}

/**
 * Toward Ferry nodes the node is the flow control: it measures the link and grants credit from
 * its own adaptive controller. A second controller on this side would steer on latency that
 * includes waiting for credit, so unless the job says otherwise the source keeps a fixed window at
 * the top level and lets the node's credit be the limit.
 */
function sourceSideParams(spec: JobSpec, targetBlockSize: number): Record<string, unknown> {
  const remote = spec.disks.every((d) => d.target.startsWith('ferry://'));
  if (!remote || 'window' in spec.params || 'adaptive' in spec.params) return spec.params;
  const levels = resolveParams(spec.params, { targetBlockSize }).windowLevels;
  return { ...spec.params, window: levels[levels.length - 1], adaptive: false };
}

/**
 * Finishes or rolls back a commit of the set that a crashed run left half done, so the images are
 * those of the latest published checkpoint (`ferry verify` runs it before it checks them).
 */
export async function recoverLocalSet(
  set: string,
  stateDir: string,
  onEvent?: (event: ReplicationEvent) => void,
): Promise<void> {
  await withSetLocked(set, stateDir, (state) => recoverLocked(state, set, onEvent));
}

/**
 * recoverLocalSet for a caller that holds the set's lock already (see withSetLocked). With `access`,
 * a ferry:// target's node is told which checkpoint a finished commit became (its history kept).
 */
export async function recoverLocked(
  state: LocalStateStore,
  set: string,
  onEvent?: (event: ReplicationEvent) => void,
  access?: RemoteAccess,
): Promise<void> {
  await recoverCommit(set, {
    state,
    journal: state,
    reopenTarget: reopenTargetFor(() => access),
    ...(onEvent ? { onEvent } : {}),
  });
}

const NO_ROOM = new Set(['ENOSPC', 'EDQUOT', 'EROFS', 'EACCES', 'EPERM']);

/** Runs `op` holding the set's lock (see LocalStateStore.lockSet): `ferry verify` uses it. */
export async function withSetLocked<T>(
  set: string,
  stateDir: string,
  op: (state: LocalStateStore) => Promise<T>,
): Promise<T> {
  const state = new LocalStateStore(stateDir);
  // Nothing to lock in a state directory that does not exist (and verify must not create one).
  if (!(await stat(stateDir).catch(() => undefined))) return op(state);
  const unlock = await state.lockSet(set).catch(async (err: unknown) => {
    // A full or read-only state directory cannot take a lock file, and then no run can be writing
    // to it either: go on without one, unless a live process holds the set.
    if (!NO_ROOM.has((err as NodeJS.ErrnoException).code ?? '')) throw err;
    await state.checkUnlocked(set);
    return async () => {};
  });
  try {
    return await op(state);
  } finally {
    await unlock();
  }
}

/**
 * A target named in a commit intent, for recovery. File images are reopened from their path. The
 * other kinds commit without touching the previous checkpoint's data in this process (a ferry node
 * commits on its side, an EBS commit is a new snapshot), so there is nothing to undo here. A ferry
 * node reachable with `access(name)` is told, when the commit was published, which checkpoint it
 * became, so it keeps the cycle's history; unreachable, it settles the commit at the next cycle's
 * contact without that history (recovering the checkpoints before it from the node is then refused).
 */
function reopenTargetFor(
  access: (target: string) => RemoteAccess | undefined,
): (disk: string, name: string) => DiskTarget | undefined {
  return (_disk, name) => {
    // With its history kept, as the run that committed it would have: finishing a published commit
    // keeps its undo data as the checkpoint's history.
    if (name.startsWith('file:')) return new FileTarget(filePath(name, 'target'), { keepHistory: true });
    const refuse = async (): Promise<never> => {
      throw new FerryError(`${name}: opened for commit recovery only`);
    };
    const reach = name.startsWith('ferry://') ? access(name) : undefined;
    const reachable = reach !== undefined && (reach.join !== undefined || reach.insecure === true);
    return {
      name,
      blockSize: 1,
      open: refuse,
      writeChunk: refuse,
      read: refuse,
      commit: refuse,
      close: async () => {},
      ...(reachable
        ? {
            afterPublish: async (published) => {
              if (published === undefined) return;
              await (await openNodeClient(name, reach)).published(published, 0).catch(() => {
                // Unreachable now: the node settles it at the next contact, without history.
              });
            },
          }
        : {}),
    };
  };
}

/**
 * Refuses, before anything is read or written, a job whose disks share a target file or whose
 * source is a target file (through any path or link), and target folders that cannot be written.
 */
async function checkFiles(spec: JobSpec): Promise<void> {
  const targetOwner = new Map<string, string>();
  for (const d of spec.disks) {
    if (!isFileUri(d.target)) continue;
    const path = filePath(d.target, 'target');
    const key = await fileKey(path);
    const other = targetOwner.get(key);
    if (other !== undefined) {
      throw new ConfigError(`disks ${other} and ${d.id} have the same target file (${d.target})`, {
        disk: d.id,
        setting: 'target',
      });
    }
    targetOwner.set(key, d.id);
    try {
      await access(dirname(resolve(path)), constants.W_OK);
      await access(path, constants.W_OK).catch((err) => {
        if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
      });
    } catch (err) {
      throw new FerryError(`disk ${d.id}: target ${d.target} cannot be written: ${errorMessage(err)}`, {
        disk: d.id,
        setting: 'target',
        cause: err,
      });
    }
  }
  for (const d of spec.disks) {
    if (!isFileUri(d.source)) continue;
    const owner = targetOwner.get(await fileKey(filePath(d.source, 'source')));
    if (owner !== undefined) {
      throw new ConfigError(
        owner === d.id
          ? `disk ${d.id}: source and target are the same file (${d.source})`
          : `disk ${d.id}: its source ${d.source} is the target of disk ${owner}`,
        { disk: d.id, setting: 'source' },
      );
    }
  }
}

const isFileUri = (uri: string): boolean =>
  !/^[a-z][a-z0-9+.-]*:\/\//i.test(uri) || uri.startsWith('file://');

/** One key per file, whatever path or link names it: device and inode if it exists, else its real path. */
async function fileKey(path: string): Promise<string> {
  try {
    const st = await stat(path);
    return `inode:${st.dev}:${st.ino}`;
  } catch {
    const dir = await realpath(dirname(resolve(path))).catch(() => dirname(resolve(path)));
    return `path:${join(dir, basename(path))}`;
  }
}

/**
 * Fault injection for the crash tests: FERRY_TEST_CRASH_AT=<step> (planned, mid-transfer,
 * commit:<disk index>, before-publish, after-publish; mid-prune: see pruneCrashHook) kills this
 * process with SIGKILL there.
 */
function crashHook(): { step?: (step: CycleStep) => void } {
  const at = process.env.FERRY_TEST_CRASH_AT;
  if (at === undefined || at === '') return {};
  return {
    step: (step) => {
      if (step === at) process.kill(process.pid, 'SIGKILL');
    },
  };
}

/** FERRY_TEST_CRASH_AT=mid-prune: SIGKILL once the first history entry is moved aside for deletion. */
function pruneCrashHook(): ((step: PruneStep) => void) | undefined {
  const at = process.env.FERRY_TEST_CRASH_AT;
  if (at !== 'mid-prune') return undefined;
  return (step) => {
    if (step === at) process.kill(process.pid, 'SIGKILL');
  };
}
