// `ferry recover` for local sets: every disk of a set as of a chosen checkpoint, materialised into a
// directory from the file targets' history, or streamed from the node that holds a ferry://
// replica and its history, verified, under the set's lock.
import { lstat, mkdir, open, rm, rmdir } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { ConfigError, errorMessage, TransferError } from '../shared/engine/errors.ts';
import { type CheckpointChoice, selectCheckpoint } from '../shared/engine/point-in-time.ts';
import type { CheckpointDisk, RecoveryCheckpoint } from '../shared/engine/ports.ts';
import type { ReplicationEvent } from '../shared/engine/replicate.ts';
import { syncDir } from '../shared/local/durable.ts';
import { MANIFEST_REGION, manifestDigest, writeAll } from '../shared/local/file-target.ts';
import {
  type DiskRecoveryPlan,
  laterCheckpoints,
  type MaterialiseProgress,
  materialiseDisk,
  planDiskRecovery,
  RecoveryError,
  refusal,
  verifyRecovered,
} from '../shared/local/materialise.ts';
import type { CatalogView, LocalStateStore } from '../shared/local/state-dir.ts';
import { recoverLocked, withSetLocked } from './run.ts';
import { openNodeClient, type RemoteAccess } from './targets.ts';

export interface RecoverOptions {
  readonly set: string;
  readonly stateDir: string;
  readonly choice: CheckpointChoice;
  /** The directory the disks are written into, one file per disk: `<disk>.img`. */
  readonly to: string;
  readonly onProgress?: (p: MaterialiseProgress) => void;
  /** Told what recovering an interrupted commit did, before anything is read. */
  readonly onEvent?: (e: ReplicationEvent) => void;
  /** Told each disk's plan (its bytes of work) once every disk is planned, before any data is written. */
  readonly onPlanned?: (plans: readonly RecoveryPlan[]) => void;
  /** How ferry:// replicas' nodes are reached (--join, $FERRY_JOIN, --insecure). */
  readonly access?: RemoteAccess | undefined;
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
    await recoverLocked(state, opts.set, opts.onEvent, opts.access);
    const catalog = await state.readCatalog(opts.set);
    const checkpoint = selectCheckpoint(opts.set, catalog.checkpoints, opts.choice);
    const plans = await planRecovery(catalog, checkpoint, opts.access);
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
        const { regions } = await plan.write(path, {
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

/** One disk of a recovery, planned: its size, its bytes of work, and how it is written. */
export interface RecoveryPlan {
  readonly disk: string;
  readonly size: number;
  readonly bytes: number;
  /** Writes the disk into `out` (a new file), verified against the checkpoint; removes it on failure. */
  write(out: string, opts: WriteOptions): Promise<{ regions: number }>;
}

type WriteOptions = { onProgress?: (p: MaterialiseProgress) => void; signal?: AbortSignal };

/**
 * Every disk's plan (from its file history, or asked of its node), or the first disk's reason why
 * the checkpoint cannot be recovered. Nothing is written.
 */
async function planRecovery(
  catalog: CatalogView,
  checkpoint: RecoveryCheckpoint,
  access: RemoteAccess | undefined,
): Promise<RecoveryPlan[]> {
  const damaged = catalog.damaged.map((d) => d.sequence);
  const plans: RecoveryPlan[] = [];
  for (const d of checkpoint.disks) {
    if (d.target.startsWith('ferry://')) {
      plans.push(await planNodeDisk(catalog, damaged, checkpoint, d, access));
      continue;
    }
    const plan = await planDiskRecovery(catalog.checkpoints, damaged, checkpoint, d);
    plans.push({ ...plan, write: (out, o) => materialiseDisk(plan, out, o) });
  }
  return plans;
}

/** The node holding a ferry:// replica, or why it cannot be asked (a refusal for this disk). */
async function nodeOf(
  checkpoint: RecoveryCheckpoint,
  d: CheckpointDisk,
  access: RemoteAccess | undefined,
): Promise<import('../shared/net/node-client.ts').NodeClient> {
  if (access === undefined || (access.join === undefined && !access.insecure)) {
    throw refusal(
      checkpoint,
      d,
    )(
      `its replica ${d.target} is on a ferry node: give --join FILE (or FERRY_JOIN, or --insecure for a node on this host) to recover it from there`,
    );
  }
  return openNodeClient(d.target, access);
}

/** A node's answer in recovery's terms: a refusal keeps its reasons; a node not reached says so. */
function fromNode(checkpoint: RecoveryCheckpoint, d: CheckpointDisk, err: unknown): unknown {
  const refuse = refusal(checkpoint, d);
  if (err instanceof RecoveryError) return err;
  const reason = (err as { reason?: unknown }).reason;
  if (err instanceof Error && err.name === 'NodeRecoveryRefused' && typeof reason === 'string') {
    return new RecoveryError(err.message, { disk: d.disk, checkpoint: checkpoint.id, reason, cause: err });
  }
  if (err instanceof TransferError) {
    const e = refuse(`the node could not be asked: ${errorMessage(err)}`);
    e.cause = err;
    return e;
  }
  return err;
}

/** Whether a recovery failed because the node was not reached (not because it said no). */
export const nodeNotReached = (err: unknown): boolean =>
  err instanceof RecoveryError && err.cause instanceof TransferError;

/**
 * Asks the node holding disk `d`'s replica whether it can give the checkpoint (its history of every
 * later checkpoint that wrote the disk is there and theirs), and for the checkpoint's manifest,
 * trusted only if its digest is the catalog's reference. Writing then streams the image the node
 * materialises into a sparse file, which is hashed against that manifest before it is kept.
 */
async function planNodeDisk(
  catalog: CatalogView,
  damaged: readonly number[],
  checkpoint: RecoveryCheckpoint,
  d: CheckpointDisk,
  access: RemoteAccess | undefined,
): Promise<RecoveryPlan> {
  const { node, cp, manifest } = await askNode(catalog, damaged, checkpoint, d, access);
  const size = d.sizeBytes;
  return {
    disk: d.disk,
    size,
    // Received, then hashed.
    bytes: 2 * size,
    write: async (out, opts) => {
      let done = 0;
      const progress = (phase: MaterialiseProgress['phase'], to: number) => {
        opts.signal?.throwIfAborted();
        done = to;
        opts.onProgress?.({ disk: d.disk, phase, bytesDone: done, bytesTotal: 2 * size });
      };
      const fh = await open(out, 'wx');
      let kept = false;
      try {
        try {
          await node.stream(
            cp,
            (sizeBytes) => fh.truncate(sizeBytes),
            async (offset, data) => {
              await writeAll(fh, data, offset);
              progress('copy', offset + data.length);
            },
          );
          await fh.sync();
        } finally {
          await fh.close();
        }
        progress('copy', size);
        const verified = await verifyRecovered(
          out,
          { disk: d.disk, checkpoint: checkpoint.id, size, manifest },
          (n) => progress('verify', done + n),
          'the image the node sent differs from the checkpoint',
        );
        await syncDir(dirname(out));
        kept = true;
        return verified;
      } catch (err) {
        const e = fromNode(checkpoint, d, err);
        if (e instanceof RecoveryError || opts.signal?.aborted) throw e;
        throw new RecoveryError(`checkpoint ${checkpoint.id}, disk ${d.disk}: ${errorMessage(err)}`, {
          disk: d.disk,
          checkpoint: checkpoint.id,
          cause: err,
        });
      } finally {
        if (!kept) await rm(out, { force: true });
      }
    },
  };
}

/** The node of disk `d`'s replica, what it is told of the checkpoint, and the manifest it sent (trusted). */
async function askNode(
  catalog: CatalogView,
  damaged: readonly number[],
  checkpoint: RecoveryCheckpoint,
  d: CheckpointDisk,
  access: RemoteAccess | undefined,
) {
  const refuse = refusal(checkpoint, d);
  const cp = nodeCheckpoint(catalog, damaged, checkpoint, d);
  const node = await nodeOf(checkpoint, d, access);
  const regions = Math.ceil(d.sizeBytes / MANIFEST_REGION);
  const planned = await node.plan(cp, 'plan', regions * 32).catch((err: unknown) => {
    throw fromNode(checkpoint, d, err);
  });
  const manifest = planned.manifest ?? Buffer.alloc(0);
  const ref = manifestDigest(manifest);
  if (ref !== cp.targetRef) {
    throw refuse(
      `the manifest the node sent does not match the catalog (${ref}, recorded ${cp.targetRef}): not trusted`,
    );
  }
  return { node, cp, manifest };
}

/**
 * Disk `d`'s manifest as of `checkpoint` (per-MiB digests), from the node holding its replica:
 * trusted only if its digest is the catalog's reference. Rejects with a RecoveryError when the node
 * cannot give it (history pruned, not its replica, not reached).
 */
export async function nodeManifest(
  catalog: CatalogView,
  checkpoint: RecoveryCheckpoint,
  d: CheckpointDisk,
  access: RemoteAccess | undefined,
): Promise<Buffer> {
  const damaged = catalog.damaged.map((x) => x.sequence);
  return (await askNode(catalog, damaged, checkpoint, d, access)).manifest;
}

/** What a node is told of disk `d`'s checkpoint: it and the later checkpoints that wrote the disk. */
function nodeCheckpoint(
  catalog: CatalogView,
  damaged: readonly number[],
  checkpoint: RecoveryCheckpoint,
  d: CheckpointDisk,
): import('../shared/net/node-client.ts').NodeCheckpoint {
  const { later, targetRef } = laterCheckpoints(catalog.checkpoints, damaged, checkpoint, d);
  return {
    id: checkpoint.id,
    sequence: checkpoint.sequence,
    sizeBytes: d.sizeBytes,
    targetRef,
    later: later.map((c) => ({ id: c.id, sequence: c.sequence })),
  };
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
 * when the checkpoint is recovered. A ferry:// replica's node is asked (with `access`; metadata
 * only); a node that cannot be reached is said so for each checkpoint, asked once per listing.
 */
export async function recoverability(
  catalog: CatalogView,
  access?: RemoteAccess,
): Promise<Map<string, { recoverable: boolean; reason?: string }>> {
  const result = new Map<string, { recoverable: boolean; reason?: string }>();
  const unreachable = new Map<string, string>();
  for (const cp of catalog.checkpoints) {
    const bySet = {
      checkpoints: catalog.checkpoints.filter((c) => c.set === cp.set),
      damaged: catalog.damaged.filter((d) => d.set === cp.set),
    };
    const damaged = bySet.damaged.map((d) => d.sequence);
    try {
      for (const d of cp.disks) {
        if (!d.target.startsWith('ferry://')) {
          await planDiskRecovery(bySet.checkpoints, damaged, cp, d, { readManifest: false });
          continue;
        }
        const where = new URL(d.target).host;
        const down = unreachable.get(where);
        if (down !== undefined) throw refusal(cp, d)(down);
        const asked = nodeCheckpoint(bySet, damaged, cp, d);
        const node = await nodeOf(cp, d, access);
        await node.plan(asked, 'check').catch((err: unknown) => {
          if (err instanceof TransferError) {
            const why = `its node ${where} could not be reached (${errorMessage(err)})`;
            unreachable.set(where, why);
            throw refusal(cp, d)(why);
          }
          throw fromNode(cp, d, err);
        });
      }
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
