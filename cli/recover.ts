// `ferry recover` for local sets: every disk of a set as of a chosen checkpoint, materialised into a
// directory from the file targets' history, verified, under the set's lock.
import { lstat, mkdir, rm, rmdir } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { ConfigError, errorMessage } from '../shared/engine/errors.ts';
import { type CheckpointChoice, selectCheckpoint } from '../shared/engine/point-in-time.ts';
import type { RecoveryCheckpoint } from '../shared/engine/ports.ts';
import type { ReplicationEvent } from '../shared/engine/replicate.ts';
import {
  type DiskRecoveryPlan,
  type MaterialiseProgress,
  materialiseDisk,
  planDiskRecovery,
  RecoveryError,
} from '../shared/local/materialise.ts';
import type { CatalogView, LocalStateStore } from '../shared/local/state-dir.ts';
import { recoverLocked, withSetLocked } from './run.ts';

export interface RecoverOptions {
  readonly set: string;
  readonly stateDir: string;
  readonly choice: CheckpointChoice;
  /** The directory the disks are written into, one file per disk: `<disk>.img`. */
  readonly to: string;
  readonly onProgress?: (p: MaterialiseProgress) => void;
  /** Told what recovering an interrupted commit did, before anything is read. */
  readonly onEvent?: (e: ReplicationEvent) => void;
  /** Told each disk's plan once every disk is planned, before any data is written. */
  readonly onPlanned?: (plans: readonly DiskRecoveryPlan[]) => void;
  readonly signal?: AbortSignal;
  /**
   * Run under the set's lock once the checkpoint is chosen and every disk planned, before any data
   * is written (failover refuses a set that is failed over already here).
   */
  readonly beforeWrite?: (state: LocalStateStore, checkpoint: RecoveryCheckpoint) => Promise<void>;
  /**
   * Run under the set's lock once every disk is written and verified (failover marks the set here,
   * so no cycle can commit in between). If it throws, the recovery fails and its files are removed.
   */
  readonly afterWrite?: (state: LocalStateStore, result: RecoverResult) => Promise<void>;
}

export interface RecoveredDisk {
  readonly disk: string;
  readonly path: string;
  readonly sizeBytes: number;
  readonly regions: number;
}

export interface RecoverResult {
  readonly checkpoint: RecoveryCheckpoint;
  readonly disks: readonly RecoveredDisk[];
  /** Whether the directory was made by this recovery (a drill removes it again at its end). */
  readonly createdDir: boolean;
}

/** Where disk `disk` of a recovery into `dir` is written. */
export const recoveredPath = (dir: string, disk: string): string => join(dir, `${disk}.img`);

/**
 * Writes every disk of the chosen checkpoint into `to`. Everything that would refuse is checked
 * before the first byte is written (the checkpoint, every disk's history, the output names), and
 * on any failure every file this call wrote is removed again, with the directory if it made it.
 * Holds the set's lock throughout, so no cycle commits while the images and history are read.
 */
export async function recoverSet(opts: RecoverOptions): Promise<RecoverResult> {
  return withSetLocked(opts.set, opts.stateDir, async (state) => {
    // The images hold the latest checkpoint only once a commit a crash interrupted is finished or undone.
    await recoverLocked(state, opts.set, opts.onEvent);
    const catalog = await state.readCatalog(opts.set);
    const checkpoint = selectCheckpoint(opts.set, catalog.checkpoints, opts.choice);
    const plans = await planCheckpoint(catalog, checkpoint);
    const outputs = plans.map((p) => recoveredPath(opts.to, p.disk));
    for (const out of outputs) {
      if (await lstat(out).catch(() => undefined)) {
        throw new ConfigError(`${out} exists: ferry recover writes new files only; give an empty --to`, {
          setting: 'to',
        });
      }
    }
    await opts.beforeWrite?.(state, checkpoint);
    opts.onPlanned?.(plans);
    const made = !(await lstat(opts.to).catch(() => undefined));
    await mkdir(opts.to, { recursive: true });
    const written: string[] = [];
    try {
      const disks: RecoveredDisk[] = [];
      for (const [i, plan] of plans.entries()) {
        const path = outputs[i]!;
        written.push(path);
        const { regions } = await materialiseDisk(plan, path, {
          ...(opts.onProgress ? { onProgress: opts.onProgress } : {}),
          ...(opts.signal ? { signal: opts.signal } : {}),
        });
        disks.push({ disk: plan.disk, path: resolve(path), sizeBytes: plan.size, regions });
      }
      const result = { checkpoint, disks, createdDir: made };
      await opts.afterWrite?.(state, result);
      return result;
    } catch (err) {
      for (const path of written) await rm(path, { force: true });
      if (made) await rmdir(opts.to).catch(() => {});
      throw err;
    }
  });
}

/** Every disk's plan, or the first disk's reason why the checkpoint cannot be recovered. */
export async function planCheckpoint(
  catalog: CatalogView,
  checkpoint: RecoveryCheckpoint,
  opts: { readonly readManifest: boolean } = { readManifest: true },
): Promise<DiskRecoveryPlan[]> {
  const damaged = catalog.damaged.map((d) => d.sequence);
  const plans: DiskRecoveryPlan[] = [];
  for (const d of checkpoint.disks) {
    plans.push(await planDiskRecovery(catalog.checkpoints, damaged, checkpoint, d, opts));
  }
  return plans;
}

/**
 * Whether each checkpoint can still be recovered from here, with the reason when not (for
 * `ferry checkpoints`): its history is there, belongs to the catalog's cycles, and recorded the
 * checkpoint's manifest reference. Reads history metadata only: a manifest altered since is found
 * when the checkpoint is recovered.
 */
export async function recoverability(
  catalog: CatalogView,
): Promise<Map<string, { recoverable: boolean; reason?: string }>> {
  const result = new Map<string, { recoverable: boolean; reason?: string }>();
  for (const cp of catalog.checkpoints) {
    const bySet = {
      checkpoints: catalog.checkpoints.filter((c) => c.set === cp.set),
      damaged: catalog.damaged.filter((d) => d.set === cp.set),
    };
    try {
      await planCheckpoint(bySet, cp, { readManifest: false });
      result.set(cp.id, { recoverable: true });
    } catch (err) {
      result.set(cp.id, {
        recoverable: false,
        reason: err instanceof RecoveryError ? err.reason : errorMessage(err),
      });
    }
  }
  return result;
}
