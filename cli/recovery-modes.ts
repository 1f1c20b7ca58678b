// Failover, migration and failback of local sets (issue #11): the recovery modes beside `ferry
// recover` and its drills. A failover materialises a checkpoint and marks the set failed over (its
// cycles are refused, as a paused schedule); a migration runs one last cycle and fails over to
// exactly that checkpoint, then proves or measures its data-loss window; a failback moves back only
// the regions that differ, publishes them as a checkpoint of a reverse set, and re-protects the set.
import { mkdir, mkdtemp, rm, stat, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { ConfigError, errorMessage, FerryError } from '../shared/engine/errors.ts';
import {
  type ChangedOn,
  differingRegions,
  type FailbackDiskPlan,
  planFailbackDisk,
  regionExtents,
} from '../shared/engine/failback.ts';
import { checkName } from '../shared/engine/names.ts';
import type { DiskSource, RecoveryCheckpoint } from '../shared/engine/ports.ts';
import type { ReplicationEvent, ReplicationResult } from '../shared/engine/replicate.ts';
import { writeAtomic } from '../shared/local/durable.ts';
import { FileSource } from '../shared/local/file-source.ts';
import { MANIFEST_REGION, manifestDigest, readManifest } from '../shared/local/file-target.ts';
import { planDiskRecovery, RecoveryError } from '../shared/local/materialise.ts';
import { regionDigests } from '../shared/local/region-digests.ts';
import {
  type CatalogView,
  type FailoverMark,
  failedOverRefusal,
  LocalStateStore,
  type RecoveryEvent,
} from '../shared/local/state-dir.ts';
import {
  nodeManifest,
  nodeNotReached,
  type RecoverOptions,
  type RecoverResult,
  recoveredPath,
  recoverSet,
} from './recover.ts';
import { type HistoryEvent, type JobSpec, recoverLocked, runLocalJob, withSetLocked } from './run.ts';
import { filePath, openSource, type RemoteAccess } from './targets.ts';

/** Progress of the hashing a migration or failback does (one disk, one pass over it). */
export interface HashProgress {
  readonly disk: string;
  /** What is hashed: a source for its change map, a side of a failback, or the final check. */
  readonly what: string;
  readonly bytesDone: number;
  readonly bytesTotal: number;
}

// ---------------------------------------------------------------------------------------- failover

export interface FailoverOptions extends Omit<RecoverOptions, 'beforeWrite' | 'afterWrite'> {
  /** 'migration' when a migration fails over (it records its own event, with the data-loss check). */
  readonly mode?: FailoverMark['mode'];
}

export interface FailoverResult {
  readonly recovered: RecoverResult;
  readonly mark: FailoverMark;
  /** The failover event recorded in the catalog (a migration records its own). */
  readonly event: RecoveryEvent | undefined;
}

/**
 * Fails the set over to the chosen checkpoint: its disks are materialised into `to` and verified
 * (as by ferry recover), then, still under the set's lock, the set is marked failed over and the
 * event recorded, so no cycle commits between the checkpoint chosen and the mark. A set that is
 * failed over already is refused before anything is written.
 */
export async function failoverSet(opts: FailoverOptions): Promise<FailoverResult> {
  const mode = opts.mode ?? 'failover';
  let mark: FailoverMark | undefined;
  let event: RecoveryEvent | undefined;
  const recovered = await recoverSet({
    ...opts,
    beforeWrite: async (state) => {
      const held = await state.readFailover(opts.set);
      if (held !== undefined) {
        throw new ConfigError(
          `set ${opts.set} is already failed over (${held.mode} to checkpoint ${held.checkpoint}, into ${held.to}, at ${held.at}): fail it back (ferry failback) or clear it (ferry recover --clear-failover) first`,
          { setting: 'set' },
        );
      }
    },
    afterWrite: async (state, result) => {
      const { checkpoint } = result;
      mark = {
        set: opts.set,
        mode,
        checkpoint: checkpoint.id,
        sequence: checkpoint.sequence,
        at: new Date().toISOString(),
        to: resolve(opts.to),
        disks: result.disks.map((d) => ({
          disk: d.disk,
          recovered: d.path,
          original: checkpoint.disks.find((c) => c.disk === d.disk)?.source ?? '',
          sizeBytes: d.sizeBytes,
        })),
      };
      await state.markFailedOver(mark);
      if (mode === 'failover') {
        event = await state.recordEvent({
          set: opts.set,
          type: 'failover',
          at: mark.at,
          checkpoint: checkpoint.id,
          summary: `failed over to ${checkpoint.id} (${checkpoint.createdAt}): ${result.disks.length} disk(s) in ${mark.to}; replication paused`,
          details: { to: mark.to, disks: mark.disks },
        });
      }
    },
  });
  if (mark === undefined) throw new FerryError(`set ${opts.set}: failed over without a mark`);
  return { recovered, mark, event };
}

/**
 * Clears a set's failover mark without failing back (its original disks are live again by other
 * means): replication into it is allowed again. Recorded as an event.
 */
export async function clearFailover(
  set: string,
  stateDir: string,
): Promise<{ mark: FailoverMark; event: RecoveryEvent }> {
  return withSetLocked(set, stateDir, async (state) => {
    const mark = await state.readFailover(set);
    if (mark === undefined) throw new ConfigError(`set ${set} is not failed over`, { setting: 'set' });
    await state.clearFailover(set);
    const event = await state.recordEvent({
      set,
      type: 'failover-cleared',
      at: new Date().toISOString(),
      checkpoint: mark.checkpoint,
      summary: `failover mark cleared without a failback (was: ${mark.mode} to ${mark.checkpoint} into ${mark.to}); replication resumed`,
    });
    return { mark, event };
  });
}

// --------------------------------------------------------------------------------------- migration

export interface MigrateOptions {
  readonly stateDir: string;
  readonly to: string;
  readonly insecure?: boolean;
  readonly signal?: AbortSignal;
  readonly onEvent?: (e: ReplicationEvent) => void;
  readonly onHistory?: (e: HistoryEvent) => void;
  readonly onHash?: (p: HashProgress) => void;
  /** Told, before the cycle, where each disk's change map comes from. */
  readonly onChangeMaps?: (maps: readonly ChangeMapSource[]) => void;
}

/** Where a migration's final cycle took a disk's changes from. */
export interface ChangeMapSource {
  readonly disk: string;
  readonly how: 'given' | 'derived' | 'full';
  /** For `derived`: regions (MANIFEST_REGION each) that differ from the latest checkpoint. */
  readonly regions?: number;
  readonly why: string;
}

/** Whether a disk's source still matched the migrated checkpoint at the end. */
export interface DataLossDisk {
  readonly disk: string;
  readonly source: string;
  readonly regions: number;
  /** Regions whose bytes differ from the checkpoint's manifest: written after the cycle read them. */
  readonly changedRegions: number;
  readonly changedBytes: number;
  readonly firstChangedOffset?: number;
}

export interface DataLossReport {
  /** True when no source region differs from the checkpoint: the data-loss window is zero. */
  readonly zero: boolean;
  /** The window's bounds: when the final cycle started reading, and when the sources were checked. */
  readonly from: string;
  readonly checkedAt: string;
  readonly checked: string;
  readonly disks: readonly DataLossDisk[];
}

export interface MigrationResult {
  readonly cycle: ReplicationResult;
  readonly changeMaps: readonly ChangeMapSource[];
  readonly failover: FailoverResult;
  readonly dataLoss: DataLossReport;
  readonly event: RecoveryEvent;
}

/**
 * A planned cutover: one last cycle of the job (incremental: a disk without a change map gets one
 * by hashing its source against the latest checkpoint's manifest), a failover to exactly the
 * checkpoint it published, then every source re-read and compared with that checkpoint's manifest:
 * any region that differs was written after the cycle read it and is not in the checkpoint.
 */
export async function migrateSet(spec: JobSpec, opts: MigrateOptions): Promise<MigrationResult> {
  const set = spec.set;
  const work = await mkdtemp(join(await ensureDir(opts.stateDir), '.migrate-'));
  try {
    const { disks, maps } = await withSetLocked(set, opts.stateDir, async (state) => {
      const held = await state.readFailover(set);
      if (held !== undefined) throw failedOverRefusal(held);
      await recoverLocked(state, set, opts.onEvent, accessOf(spec, opts));
      return changeMapsFor(spec, await state.readCatalog(set), work, opts);
    });
    opts.onChangeMaps?.(maps);
    const from = new Date().toISOString();
    const cycle = await runLocalJob(
      { ...spec, disks },
      {
        stateDir: opts.stateDir,
        ...(opts.onEvent ? { onEvent: opts.onEvent } : {}),
        ...(opts.onHistory ? { onHistory: opts.onHistory } : {}),
        ...(opts.signal ? { signal: opts.signal } : {}),
        ...(opts.insecure ? { insecure: true } : {}),
      },
    );
    const checkpoint = cycle.checkpoint;
    const failover = await failoverSet({
      set,
      stateDir: opts.stateDir,
      choice: { checkpoint: String(checkpoint.sequence) },
      to: opts.to,
      mode: 'migration',
      access: accessOf(spec, opts),
      ...(opts.signal ? { signal: opts.signal } : {}),
    });
    const dataLoss = await checkDataLoss(spec, checkpoint, opts, from);
    const lost = dataLoss.disks.filter((d) => d.changedRegions > 0);
    const event = await new LocalStateStore(opts.stateDir).recordEvent({
      set,
      type: 'migration',
      at: failover.mark.at,
      checkpoint: checkpoint.id,
      summary:
        `migrated: final cycle ${checkpoint.id}, failed over into ${failover.mark.to}; data-loss window ` +
        (dataLoss.zero
          ? 'zero (every source region matched the checkpoint at the end)'
          : `NOT zero: ${lost.map((d) => `disk ${d.disk} ${d.changedRegions} region(s)`).join(', ')} changed after the final cycle read them`),
      details: { dataLoss, changeMaps: maps },
    });
    return { cycle, changeMaps: maps, failover, dataLoss, event };
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

/**
 * Each disk's change map for the final cycle: the job's own, else one derived by hashing the
 * source against the latest checkpoint's manifest (a file target whose manifest the catalog
 * vouches for, of the same size), else none (a full copy), each with the reason.
 */
async function changeMapsFor(
  spec: JobSpec,
  catalog: CatalogView,
  work: string,
  opts: MigrateOptions,
): Promise<{ disks: JobSpec['disks']; maps: ChangeMapSource[] }> {
  const latest = catalog.checkpoints.at(-1);
  const disks: JobSpec['disks'][number][] = [];
  const maps: ChangeMapSource[] = [];
  for (const d of spec.disks) {
    if (d.changed !== undefined) {
      disks.push(d);
      maps.push({ disk: d.id, how: 'given', why: `the job's change map ${d.changed}` });
      continue;
    }
    const previous = latest?.disks.find((p) => p.disk === d.id && p.target === d.target);
    const full = (why: string) => {
      disks.push(d);
      maps.push({ disk: d.id, how: 'full', why });
    };
    if (latest === undefined || previous === undefined) {
      full(`no earlier checkpoint of set ${spec.set} replicated disk ${d.id} to ${d.target}`);
      continue;
    }
    const remote = d.target.startsWith('ferry://');
    if ((!remote && !d.target.startsWith('file:')) || previous.targetRef === undefined) {
      full(`its target ${d.target} keeps no manifest here to compare the source with`);
      continue;
    }
    // The replica's manifest as of the latest checkpoint: its node's (checked against the catalog),
    // or the file's own.
    const asked = remote
      ? await checkpointManifest(catalog, latest, d.id, { join: d.join, insecure: opts.insecure })
      : undefined;
    if (typeof asked === 'string') {
      full(`its node cannot give ${latest.id}'s manifest: ${asked}`);
      continue;
    }
    const manifestPath = remote ? d.target : `${filePath(d.target, 'target')}.ferry-manifest`;
    const manifest = asked ?? (await readManifest(manifestPath).catch(() => undefined));
    if (manifest === undefined || manifestDigest(manifest) !== previous.targetRef) {
      full(
        `${remote ? `the manifest of ${manifestPath}` : manifestPath} is missing or is not the manifest of ${latest.id}`,
      );
      continue;
    }
    const source = await openSource(d.source);
    try {
      if (source.sizeBytes !== previous.sizeBytes) {
        full(`the source is ${source.sizeBytes} bytes, ${latest.id} recorded ${previous.sizeBytes}`);
        continue;
      }
      const digests = await hashWithProgress(
        source,
        d.id,
        'hashing the source against the latest checkpoint',
        opts,
      );
      const changed = differingRegions(d.id, source.sizeBytes, MANIFEST_REGION, manifest, digests);
      const path = join(work, `${d.id}.changed.json`);
      await writeFile(path, JSON.stringify(regionExtents(changed, source.sizeBytes, MANIFEST_REGION)));
      disks.push({ ...d, changed: path });
      maps.push({
        disk: d.id,
        how: 'derived',
        regions: changed.length,
        why: `${changed.length} region(s) of the source differ from ${latest.id}'s manifest`,
      });
    } finally {
      await source.close();
    }
  }
  return { disks, maps };
}

/** How a migration reaches a set's node: the first ferry:// disk's join file (one node per set), or --insecure. */
function accessOf(spec: JobSpec, opts: MigrateOptions): RemoteAccess | undefined {
  const join = spec.disks.find((d) => d.target.startsWith('ferry://'))?.join;
  if (opts.insecure) return { insecure: true };
  return join === undefined ? undefined : { join };
}

/** Every source re-read and compared, region by region, with the checkpoint's manifest. */
async function checkDataLoss(
  spec: JobSpec,
  checkpoint: RecoveryCheckpoint,
  opts: MigrateOptions,
  from: string,
): Promise<DataLossReport> {
  const catalog = await new LocalStateStore(opts.stateDir).readCatalog(spec.set);
  const disks: DataLossDisk[] = [];
  for (const cd of checkpoint.disks) {
    const d = spec.disks.find((x) => x.id === cd.disk);
    const uri = d?.source ?? '';
    const plan = { disk: cd.disk, size: cd.sizeBytes };
    const manifest = await checkpointManifest(catalog, checkpoint, cd.disk, {
      join: d?.join,
      insecure: opts.insecure,
    });
    if (typeof manifest === 'string') {
      throw new FerryError(
        `disk ${cd.disk}: the data-loss check cannot read ${checkpoint.id}'s manifest: ${manifest}`,
        {
          disk: cd.disk,
        },
      );
    }
    const source = await openSource(uri);
    try {
      const digests = await hashWithProgress(
        source,
        plan.disk,
        'checking the source against the checkpoint',
        opts,
      );
      const changed =
        source.sizeBytes === plan.size
          ? differingRegions(plan.disk, plan.size, MANIFEST_REGION, manifest, digests)
          : Array.from({ length: Math.ceil(source.sizeBytes / MANIFEST_REGION) }, (_, i) => i);
      const extents = regionExtents(changed, source.sizeBytes, MANIFEST_REGION);
      disks.push({
        disk: plan.disk,
        source: uri,
        regions: Math.ceil(source.sizeBytes / MANIFEST_REGION),
        changedRegions: changed.length,
        changedBytes: extents.reduce((s, e) => s + e.length, 0),
        ...(changed[0] !== undefined ? { firstChangedOffset: changed[0] * MANIFEST_REGION } : {}),
      });
    } finally {
      await source.close();
    }
  }
  return {
    zero: disks.every((d) => d.changedRegions === 0),
    from,
    checkedAt: new Date().toISOString(),
    checked: `every ${MANIFEST_REGION / 1024 / 1024} MiB region of each source disk, read after the failover, hashed (SHA-256) and compared with ${checkpoint.id}'s manifest`,
    disks,
  };
}

// ---------------------------------------------------------------------------------------- failback

export interface FailbackOptions {
  readonly set: string;
  readonly stateDir: string;
  /** Where the recovered images are (DISK.img each); default: where the failover wrote them. */
  readonly from?: string;
  /** The set the failback publishes its checkpoint in (recovered images -> original disks). */
  readonly reverseSet?: string;
  /** Re-protect the set afterwards: one cycle from the original disks to its replicas (default true). */
  readonly resync?: boolean;
  readonly signal?: AbortSignal;
  readonly onEvent?: (e: ReplicationEvent) => void;
  readonly onHash?: (p: HashProgress) => void;
  /** Told each disk's plan (what moves and why) before anything is written. */
  readonly onPlanned?: (disks: readonly FailbackDisk[]) => void;
  /** How a set replicated to a ferry node reaches it (its manifests, the re-protecting cycle). */
  readonly access?: RemoteAccess;
}

/** What a failback does with one disk. */
export interface FailbackDisk {
  readonly disk: string;
  readonly recovered: string;
  readonly original: string;
  /** `incremental`: only the regions in `plan` move; `full`: no shared checkpoint for this disk. */
  readonly kind: 'incremental' | 'full';
  /** Why a full copy (no shared checkpoint for this disk). */
  readonly why?: string;
  readonly plan?: FailbackDiskPlan;
  readonly sizeBytes: number;
}

export interface FailbackResult {
  readonly set: string;
  readonly shared: string;
  readonly reverse: ReplicationResult;
  readonly disks: readonly FailbackDisk[];
  /** Regions compared, recovered image against original disk, after the move: all equal. */
  readonly verifiedRegions: number;
  /** The set's re-protecting cycle (original disks -> its replicas), unless skipped. */
  readonly resync: ReplicationResult | undefined;
  readonly resyncSkipped?: string;
  readonly event: RecoveryEvent;
}

export const defaultReverseSet = (set: string): string => `${set}-failback`;

/**
 * Fails a failed-over set back to its original disks. Both sides are hashed region by region
 * against the checkpoint they share (the one failed over to): a region moves when the recovered
 * image and the original disk differ there, whichever side changed it; none moves otherwise. The
 * moves run as an incremental cycle of the reverse set (recovered images -> original disks), so the
 * engine's windows, per-chunk verification, commit and history apply, and its checkpoint is
 * published; what the original disks held in those regions is kept in their history. Then both
 * sides are hashed again and must be equal everywhere; then the set is re-protected (a cycle from
 * the original disks to its replicas, moving the regions its latest checkpoint lacks) and its
 * failover mark cleared. A disk whose shared checkpoint cannot be read (history pruned, sizes
 * changed, original missing) is copied in full, and said so.
 */
export async function failbackSet(opts: FailbackOptions): Promise<FailbackResult> {
  const set = opts.set;
  const reverseSet = checkName('set', opts.reverseSet ?? defaultReverseSet(set), '--reverse-set');
  if (reverseSet === set) {
    throw new ConfigError(`--reverse-set must name another set than ${set}`, { setting: 'reverse-set' });
  }
  const work = await mkdtemp(join(await ensureDir(opts.stateDir), '.failback-'));
  try {
    const prepared = await withSetLocked(set, opts.stateDir, async (state) => {
      const mark = await state.readFailover(set);
      if (mark === undefined) {
        throw new ConfigError(
          `set ${set} is not failed over: nothing to fail back (ferry recover --failover fails it over)`,
          { setting: 'set' },
        );
      }
      const catalog = await state.readCatalog(set);
      const shared = catalog.checkpoints.find((c) => c.id === mark.checkpoint);
      if (shared === undefined) {
        throw new FerryError(
          `set ${set} was failed over to ${mark.checkpoint}, which is no longer in the catalog`,
          { setting: 'set' },
        );
      }
      // A replica on a ferry node: the shared checkpoint's manifest is asked of the node, and the
      // re-protecting cycle replicates to it; both need to reach it.
      const remote = shared.disks.filter((d) => d.target.startsWith('ferry://'));
      const access = opts.access;
      if (remote.length > 0 && (access === undefined || (access.join === undefined && !access.insecure))) {
        throw new ConfigError(
          `set ${set} is replicated to a ferry node (${remote.map((d) => `${d.disk} -> ${d.target}`).join(', ')}): give --join FILE (or FERRY_JOIN, or --insecure for a node on this host) to fail it back`,
          { setting: 'join' },
        );
      }
      const disks: PreparedDisk[] = [];
      for (const d of mark.disks) {
        disks.push(await prepareDisk(d, await checkpointManifest(catalog, shared, d.disk, access), opts));
      }
      return { mark, shared, disks, latest: catalog.checkpoints.at(-1), catalog };
    });
    const { mark, shared } = prepared;
    const disks = prepared.disks.map((p) => p.disk);
    opts.onPlanned?.(disks);

    // The moves, as a cycle of the reverse set.
    for (const { disk: d, manifest } of prepared.disks) {
      if (d.plan === undefined || manifest === undefined) continue;
      await writeFile(changeFile(work, d.disk), JSON.stringify(d.plan.extents));
      // The original disk becomes a file target whose manifest is its digests as just hashed, so
      // the cycle is an increment over it, its commit re-hashes only the regions it writes, and
      // its history keeps what the original held there (verifiable against that manifest).
      await writeAtomic(`${d.original}.ferry-manifest`, manifest);
    }
    const reverse = await runLocalJob(
      {
        set: reverseSet,
        disks: disks.map((d) => ({
          id: d.disk,
          source: `file:${d.recovered}`,
          target: `file:${d.original}`,
          ...(d.plan !== undefined ? { changed: changeFile(work, d.disk) } : {}),
        })),
        params: {},
      },
      {
        stateDir: opts.stateDir,
        ...(opts.onEvent ? { onEvent: opts.onEvent } : {}),
        ...(opts.signal ? { signal: opts.signal } : {}),
      },
    );

    // Bit-exact: both sides hashed again, every region equal.
    let verifiedRegions = 0;
    const finalDigests = new Map<string, Buffer>();
    for (const d of disks) {
      const recovered = await hashFile(d.recovered, d.disk, 'verifying the recovered image', opts);
      const original = await hashFile(d.original, d.disk, 'verifying the original disk', opts);
      const differ = recovered.equals(original)
        ? []
        : recovered.length === original.length
          ? differingRegions(d.disk, d.sizeBytes, MANIFEST_REGION, recovered, original)
          : [0];
      if (differ.length > 0) {
        throw new FerryError(
          `disk ${d.disk}: after the failback the original ${d.original} differs from the recovered image at offset ${differ[0]! * MANIFEST_REGION}` +
            `${differ.length > 1 ? ` (and ${differ.length - 1} more regions)` : ''}: was the recovered image still in use? ` +
            `Stop what uses it and run ferry failback again; set ${set} stays failed over`,
          { disk: d.disk },
        );
      }
      verifiedRegions += recovered.length / 32;
      finalDigests.set(d.disk, recovered);
    }

    // Re-protect: the set's replicas catch up with the original disks.
    const { resync, resyncSkipped } =
      opts.resync === false
        ? { resync: undefined, resyncSkipped: 'not asked for (--no-resync)' }
        : await resyncSet(set, prepared.catalog, prepared.latest, disks, finalDigests, work, opts);

    const event = await withSetLocked(set, opts.stateDir, async (state) => {
      await state.clearFailover(set);
      const moved = disks.reduce((s, d) => s + (d.plan?.moves.length ?? 0), 0);
      const full = disks.filter((d) => d.kind === 'full').length;
      return state.recordEvent({
        set,
        type: 'failback',
        at: new Date().toISOString(),
        checkpoint: shared.id,
        summary:
          `failed back from ${mark.to} (shared checkpoint ${shared.id}) as ${reverse.checkpoint.id}: ` +
          `${moved} region(s) moved${full > 0 ? `, ${full} disk(s) copied in full` : ''}, bit-exact; ` +
          `${resync ? `re-protected as ${resync.checkpoint.id}` : `not re-protected (${resyncSkipped})`}; replication resumed`,
        details: {
          reverse: reverse.checkpoint.id,
          resync: resync?.checkpoint.id,
          disks: disks.map(describeDisk),
        },
      });
    });
    return {
      set,
      shared: shared.id,
      reverse,
      disks,
      verifiedRegions,
      resync,
      ...(resyncSkipped ? { resyncSkipped } : {}),
      event,
    };
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

interface PreparedDisk {
  readonly disk: FailbackDisk;
  /**
   * For an incremental failback, the original disk's digests as hashed: its manifest as a file
   * target before the reverse cycle (the cycle re-hashes the regions it writes).
   */
  readonly manifest?: Buffer;
}

const changeFile = (work: string, disk: string): string => join(work, `${disk}.changed.json`);

/**
 * A checkpoint's manifest of one disk (per-MiB digests), or why it cannot be had: from the file
 * replica's history, or asked of its node (checked against the catalog either way). A node that
 * cannot be reached is an error, never a reason: the caller would copy in full what it could not
 * compare.
 */
async function checkpointManifest(
  catalog: CatalogView,
  checkpoint: RecoveryCheckpoint,
  disk: string,
  access: RemoteAccess | undefined,
): Promise<Buffer | string> {
  const cd = checkpoint.disks.find((d) => d.disk === disk);
  if (cd === undefined) return `${checkpoint.id} has no disk ${disk}`;
  try {
    if (cd.target.startsWith('ferry://')) return await nodeManifest(catalog, checkpoint, cd, access);
    const plan = await planDiskRecovery(
      catalog.checkpoints,
      catalog.damaged.map((d) => d.sequence),
      checkpoint,
      cd,
    );
    return await readManifest(plan.manifest);
  } catch (err) {
    if (nodeNotReached(err)) throw err;
    return err instanceof RecoveryError ? err.reason : errorMessage(err);
  }
}

/** One disk's failback: where from, where to, and (hashing both sides) what moves, or why in full. */
async function prepareDisk(
  d: FailoverMark['disks'][number],
  manifest: Buffer | string,
  opts: FailbackOptions,
): Promise<PreparedDisk> {
  const recovered = opts.from === undefined ? d.recovered : resolve(recoveredPath(opts.from, d.disk));
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(d.original) && !d.original.startsWith('file://')) {
    throw new ConfigError(
      `disk ${d.disk}: its original disk ${d.original} is not a file; ferry failback writes back to file: disks only`,
      { disk: d.disk, setting: 'set' },
    );
  }
  const original = resolve(filePath(d.original, 'source'));
  const recoveredSize = (await stat(recovered).catch(() => undefined))?.size;
  if (recoveredSize === undefined) {
    throw new FerryError(
      `disk ${d.disk}: the recovered image ${recovered} is missing${opts.from === undefined ? ' (give --from DIR if it moved)' : ''}`,
      { disk: d.disk },
    );
  }
  const originalSize = (await stat(original).catch(() => undefined))?.size;
  const base = { disk: d.disk, recovered, original, sizeBytes: recoveredSize };
  const full = (why: string): PreparedDisk => ({ disk: { ...base, kind: 'full', why } });
  if (typeof manifest === 'string') return full(`no shared checkpoint: ${manifest}`);
  if (originalSize === undefined) return full(`the original disk ${original} is missing`);
  if (recoveredSize !== d.sizeBytes)
    return full(`the recovered image is ${recoveredSize} bytes now, the checkpoint's disk ${d.sizeBytes}`);
  if (originalSize !== d.sizeBytes)
    return full(`the original disk is ${originalSize} bytes now, the checkpoint's disk ${d.sizeBytes}`);
  const originalDigests = await hashFile(original, d.disk, 'hashing the original disk', opts);
  const plan = planFailbackDisk({
    disk: d.disk,
    size: d.sizeBytes,
    regionSize: MANIFEST_REGION,
    shared: manifest,
    recovered: await hashFile(recovered, d.disk, 'hashing the recovered image', opts),
    original: originalDigests,
  });
  return { disk: { ...base, kind: 'incremental', plan }, manifest: originalDigests };
}

/**
 * One cycle of the set from its original disks (equal to the recovered images now) to its
 * replicas: each disk's change map is the regions whose digests differ from the latest checkpoint's
 * manifest, so the replicas move only what the failover period changed. It keeps every checkpoint
 * (the set's own retention applies from its next run). Skipped, with the reason, when the latest
 * checkpoint's replicas are not file images with a manifest the catalog vouches for.
 */
async function resyncSet(
  set: string,
  catalog: CatalogView,
  latest: RecoveryCheckpoint | undefined,
  disks: readonly FailbackDisk[],
  digests: ReadonlyMap<string, Buffer>,
  work: string,
  opts: FailbackOptions,
): Promise<{ resync?: ReplicationResult; resyncSkipped?: string }> {
  if (latest === undefined) return { resyncSkipped: `set ${set} has no checkpoint` };
  const job: JobSpec['disks'][number][] = [];
  for (const cd of latest.disks) {
    const fb = disks.find((d) => d.disk === cd.disk);
    const d = digests.get(cd.disk);
    if (fb === undefined || d === undefined) return { resyncSkipped: `disk ${cd.disk} was not failed back` };
    const remote = cd.target.startsWith('ferry://');
    if ((!remote && !cd.target.startsWith('file:')) || cd.targetRef === undefined) {
      return { resyncSkipped: `disk ${cd.disk}'s replica ${cd.target} is not a file image with a manifest` };
    }
    // The replica's manifest as of the latest checkpoint: its node's (checked against the catalog),
    // or the file's own.
    const asked = remote ? await checkpointManifest(catalog, latest, cd.disk, opts.access) : undefined;
    const manifest = remote
      ? typeof asked === 'string'
        ? undefined
        : asked
      : await readManifest(`${filePath(cd.target, 'target')}.ferry-manifest`).catch(() => undefined);
    if (manifest === undefined || manifestDigest(manifest) !== cd.targetRef) {
      return { resyncSkipped: `disk ${cd.disk}'s replica has no manifest matching ${latest.id}` };
    }
    const entry = {
      id: cd.disk,
      source: `file:${fb.original}`,
      target: cd.target,
      ...(remote && opts.access?.join !== undefined ? { join: opts.access.join } : {}),
    };
    if (cd.sizeBytes !== fb.sizeBytes) {
      job.push(entry); // resized while failed over: the replica is re-seeded
      continue;
    }
    const changed = differingRegions(cd.disk, fb.sizeBytes, MANIFEST_REGION, manifest, d);
    const path = join(work, `${cd.disk}.resync.json`);
    await writeFile(path, JSON.stringify(regionExtents(changed, fb.sizeBytes, MANIFEST_REGION)));
    job.push({ ...entry, changed: path });
  }
  const count = (await new LocalStateStore(opts.stateDir).listCheckpoints(set)).length + 1;
  const resync = await runLocalJob(
    { set, disks: job, params: {}, retain: { count } },
    {
      stateDir: opts.stateDir,
      ignoreFailover: true,
      ...(opts.access?.insecure ? { insecure: true } : {}),
      ...(opts.onEvent ? { onEvent: opts.onEvent } : {}),
      ...(opts.signal ? { signal: opts.signal } : {}),
    },
  );
  return { resync };
}

/** A failback disk as the event and --json show it: what moved, why, in regions and bytes. */
export function describeDisk(d: FailbackDisk): Record<string, unknown> {
  return {
    disk: d.disk,
    kind: d.kind,
    from: d.recovered,
    to: d.original,
    ...(d.why ? { why: d.why } : {}),
    ...(d.plan
      ? {
          regions: d.plan.regions,
          moved: { regions: d.plan.moves.length, bytes: d.plan.moves.reduce((s, m) => s + m.length, 0) },
          changedOn: d.plan.counts,
          alreadyEqual: d.plan.alreadyEqual,
        }
      : {}),
  };
}

/** Which side changed a region, as an operator reads it. */
export const CHANGED_ON: Record<ChangedOn, string> = {
  recovered: 'changed on the recovered side',
  original: 'changed on the original side',
  both: 'changed on both sides',
};

// ------------------------------------------------------------------------------------------ shared

async function hashWithProgress(
  source: DiskSource,
  disk: string,
  what: string,
  opts: { readonly onHash?: (p: HashProgress) => void; readonly signal?: AbortSignal },
): Promise<Buffer> {
  let done = 0;
  const total = source.sizeBytes;
  opts.onHash?.({ disk, what, bytesDone: 0, bytesTotal: total });
  return regionDigests(source, {
    onBytes: (n) => {
      done += n;
      opts.onHash?.({ disk, what, bytesDone: done, bytesTotal: total });
    },
    ...(opts.signal ? { signal: opts.signal } : {}),
  });
}

async function hashFile(
  path: string,
  disk: string,
  what: string,
  opts: { readonly onHash?: (p: HashProgress) => void; readonly signal?: AbortSignal },
): Promise<Buffer> {
  const source = await FileSource.open(path);
  try {
    return await hashWithProgress(source, disk, what, opts);
  } finally {
    await source.close();
  }
}

async function ensureDir(dir: string): Promise<string> {
  await mkdir(dir, { recursive: true });
  return dir;
}

// Hashing progress is printed as lines (on a terminal too: the engine's bars come after it), one
// when a pass starts and then at most this often per disk.
const HASH_LINE_INTERVAL_MS = 2000;

/** Prints hashing progress as lines: when each pass starts, every 2 s, and when it ends. */
export function hashProgressPrinter(log: (line: string) => void): (p: HashProgress) => void {
  const last = new Map<string, { what: string; at: number }>();
  return (p) => {
    const now = Date.now();
    const seen = last.get(p.disk);
    const end = p.bytesDone >= p.bytesTotal;
    if (seen?.what === p.what && !end && now - seen.at < HASH_LINE_INTERVAL_MS) return;
    last.set(p.disk, { what: p.what, at: now });
    const pct = p.bytesTotal === 0 ? 100 : Math.floor((100 * p.bytesDone) / p.bytesTotal);
    log(`disk ${p.disk}: ${p.what} (${pct}%)`);
  };
}
