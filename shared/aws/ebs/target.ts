// An EBS snapshot as a replication target: a thin DiskTarget over the stateless functions of
// writer.ts, with a block ledger so a crashed cycle resumes into the same snapshot.
//
// One cycle of one disk = one snapshot. open() starts it (ParentSnapshotId = the previous
// checkpoint's snapshot for an incremental; a ClientToken derived from set, disk, cycle and attempt,
// so a retried start never makes a second snapshot); writeChunk() writes the descriptor's changed
// 512 KiB blocks; commit() sends CompleteSnapshot with ChangedBlocksCount and the LINEAR aggregate
// from the ledger, waits for `completed`, and returns the snapshot id as the checkpoint's targetRef.
//
// Resume (the engine passes resume=true): the ledger names the attempt's snapshot and the blocks
// already in it, and writing continues there; if the crash came before the snapshot id was recorded,
// the same ClientToken makes StartSnapshot answer with it. A rerun that does not resume is a new
// attempt: a new token and a new snapshot (the abandoned one is left to its Timeout), because its
// blocks may belong to another plan.

import type { Descriptor } from '../../engine/descriptors.ts';
import { ConfigError, FerryError, IntegrityError } from '../../engine/errors.ts';
import { sha256Hex } from '../../engine/integrity.ts';
import type { CopyKind, DiskCommit, DiskTarget, RecoveryCheckpoint, StateStore } from '../../engine/ports.ts';
import { type EbsDeps, NO_RETRY, type ResolvedEbsDeps, resolveDeps } from './client.ts';
import { EBS_BLOCK_SIZE, EbsError, EbsSnapshotError } from './errors.ts';
import { type BlockLedger, type LedgerRecord, MemoryBlockLedger } from './ledger.ts';
import { EbsSource } from './source.ts';
import { listProbeStatusReader, type SnapshotStatusReader } from './status.ts';
import {
  checkSnapshotTimeout,
  completeSnapshot,
  DEFAULT_COMPLETION_WAIT_MS,
  DEFAULT_NOT_FOUND_GRACE_MS,
  putDescriptorBlocks,
  type StartSnapshotInput,
  snapshotClientToken,
  startSnapshot,
  volumeSizeGiB,
  waitForCompletion,
  type ZeroBlocks,
  zeroBlockPolicy,
} from './writer.ts';

// Two hours of inactivity before EBS cancels the pending snapshot: long enough for a crashed run to
// be restarted and resume into it, short enough that an abandoned attempt stops counting against
// the 100-pending-snapshots quota the same afternoon. (EBS's own default, 60, is tight for a resume.)
export const DEFAULT_TIMEOUT_MINUTES = 120;

export interface EbsTargetOptions extends EbsDeps {
  /** The replication set and disk id: with `cycle`, they name the snapshot and its ClientToken. */
  readonly set: string;
  readonly disk: string;
  /** This cycle's id (the engine's `${set}#${sequence}`; see `ebsCycleFor`). */
  readonly cycle: string;
  /** The previous checkpoint's snapshot of this disk: required for an incremental cycle. */
  readonly parentSnapshotId?: string | undefined;
  /** Encrypt a full snapshot (an incremental inherits its parent's encryption). */
  readonly encrypted?: boolean | undefined;
  readonly kmsKeyArn?: string | undefined;
  /** StartSnapshot Timeout in minutes (10–4320); DEFAULT_TIMEOUT_MINUTES. */
  readonly timeoutMinutes?: number | undefined;
  readonly description?: string | undefined;
  /** Extra snapshot tags; ferry:set, ferry:disk and ferry:cycle are always added. */
  readonly tags?: Readonly<Record<string, string>> | undefined;
  /** Where written blocks are remembered; a MemoryBlockLedger (no resume across processes) by default. */
  readonly ledger?: BlockLedger | undefined;
  /** How completion is observed; listProbeStatusReader by default (see status.ts). */
  readonly statusReader?: SnapshotStatusReader | undefined;
  /** How long commit waits for `completed`; DEFAULT_COMPLETION_WAIT_MS. */
  readonly completionTimeoutMs?: number | undefined;
  /** How long "snapshot does not exist" is waited out after the start; DEFAULT_NOT_FOUND_GRACE_MS. */
  readonly notFoundGraceMs?: number | undefined;
}

const SNAPSHOT_ID = /^snap-[0-9a-f]+$/;

export class EbsTarget implements DiskTarget {
  /** EBS writes whole 512 KiB blocks; the engine aligns descriptors to them. */
  readonly blockSize = EBS_BLOCK_SIZE;
  readonly disk: string;
  private readonly opts: EbsTargetOptions;
  private readonly deps: ResolvedEbsDeps;
  /** The engine retries writeChunk; a second layer underneath would multiply attempts. */
  private readonly writeDeps: ResolvedEbsDeps;
  private readonly ledger: BlockLedger;
  private readonly key: string;
  private readonly timeoutMinutes: number;
  private readonly statusReader: SnapshotStatusReader;
  private snapshot: string | undefined;
  private kind: CopyKind = 'full';
  private zeroBlocks: ZeroBlocks = 'write';
  private startedAt = 0;
  private lastWriteAt = 0;
  /** True once EBS accepted a call on the snapshot: "does not exist" is no longer a start-up delay. */
  private visible = false;
  private completed = false;
  private reader: EbsSource | undefined;

  constructor(opts: EbsTargetOptions) {
    for (const [setting, value] of [
      ['set', opts.set],
      ['disk', opts.disk],
      ['cycle', opts.cycle],
    ] as const) {
      if (typeof value !== 'string' || value === '') {
        throw new ConfigError(`EBS target: ${setting} is required`, { setting });
      }
    }
    if (opts.parentSnapshotId !== undefined && !SNAPSHOT_ID.test(opts.parentSnapshotId)) {
      throw new ConfigError(
        `EBS target for disk ${opts.disk}: parentSnapshotId "${opts.parentSnapshotId}" is not a snapshot id (snap-…)`,
        { disk: opts.disk, setting: 'parentSnapshotId' },
      );
    }
    this.opts = opts;
    this.disk = opts.disk;
    this.deps = resolveDeps(opts);
    this.writeDeps = { ...this.deps, retry: NO_RETRY };
    this.ledger = opts.ledger ?? new MemoryBlockLedger();
    this.key = `${opts.set}/${opts.disk}`;
    this.timeoutMinutes = opts.timeoutMinutes ?? DEFAULT_TIMEOUT_MINUTES;
    this.statusReader = opts.statusReader ?? listProbeStatusReader(this.deps);
  }

  /** `ebs://SNAPSHOT` once the snapshot is started; recorded in the checkpoint. */
  get name(): string {
    return this.snapshot === undefined ? `ebs:(new snapshot of disk ${this.disk})` : `ebs://${this.snapshot}`;
  }

  /** The snapshot this cycle writes, once open() has started it. */
  get snapshotId(): string | undefined {
    return this.snapshot;
  }

  async open(sizeBytes: number, kind: CopyKind, resume: boolean): Promise<void> {
    const { disk, cycle } = this.opts;
    const now = this.deps.clock.now();
    const sizeGiB = volumeSizeGiB(sizeBytes);
    const parent = kind === 'incremental' ? this.opts.parentSnapshotId : undefined;
    if (kind === 'incremental' && parent === undefined) {
      throw new ConfigError(
        `disk ${disk}: an incremental cycle needs the previous checkpoint's snapshot as its parent (parentSnapshotId); run a full copy first`,
        { disk, setting: 'parentSnapshotId' },
      );
    }
    this.kind = kind;
    this.snapshot = undefined;
    this.completed = false;
    this.visible = false;
    this.reader = undefined;

    let record = await this.ledger.load(this.key);
    if (record !== undefined && record.cycle !== cycle) record = undefined;
    if (resume) {
      if (record === undefined) {
        throw new EbsSnapshotError(
          `disk ${disk}: cannot resume cycle ${cycle}: the block ledger has no record of its snapshot, so its ChangedBlocksCount and checksum cannot be known (an in-memory ledger does not survive a restart: use a FileBlockLedger); clear the disk's progress to start the cycle over`,
          { disk },
        );
      }
    } else {
      const attempt = (record?.attempt ?? 0) + 1;
      const fresh: LedgerRecord = {
        cycle,
        attempt,
        clientToken: snapshotClientToken({ set: this.opts.set, disk, cycle, attempt }),
        startedAt: now,
        blocks: 0,
        lastWriteAt: now,
      };
      await this.ledger.begin(this.key, fresh);
      record = fresh;
    }
    this.startedAt = record.startedAt;
    this.lastWriteAt = record.lastWriteAt;

    if (record.snapshotId !== undefined) {
      this.snapshot = record.snapshotId;
      this.setZeroPolicy(record.encrypted === true);
      if (record.completed) {
        this.completed = true;
        return;
      }
      checkSnapshotTimeout({
        disk,
        snapshotId: record.snapshotId,
        lastWriteAt: this.lastWriteAt,
        timeoutMinutes: this.timeoutMinutes,
        now,
        op: 'resume',
      });
      return;
    }

    // No snapshot id recorded: never started, or started and the answer (or we) got lost. The same
    // ClientToken makes EBS answer with the snapshot it may already have started.
    const started = await startSnapshot(this.deps, this.startInput(sizeGiB, parent, record.clientToken));
    if (started.status === 'error') {
      throw new EbsSnapshotError(
        `disk ${disk}: snapshot ${started.snapshotId} is in error right after StartSnapshot`,
        { disk, snapshotId: started.snapshotId },
      );
    }
    await this.ledger.update(this.key, { snapshotId: started.snapshotId, encrypted: started.encrypted });
    this.snapshot = started.snapshotId;
    this.setZeroPolicy(started.encrypted);
  }

  async writeChunk(d: Descriptor, data: Uint8Array, sha256: string, signal?: AbortSignal): Promise<void> {
    const snapshotId = this.requireOpen();
    if (data.length !== d.bytes || sha256Hex(data) !== sha256) {
      throw new IntegrityError(
        `disk ${this.disk}: chunk ${d.seq} at offset ${d.offset} arrived corrupted (length or checksum mismatch) before snapshot ${snapshotId}`,
        { disk: this.disk, offset: d.offset, seq: d.seq },
      );
    }
    if (this.completed) {
      throw new EbsSnapshotError(
        `disk ${this.disk}: snapshot ${snapshotId} is already completed; chunk ${d.seq} cannot be written`,
        { disk: this.disk, snapshotId },
      );
    }
    this.checkTimeout(snapshotId, 'PutSnapshotBlock');
    await putDescriptorBlocks(this.writeDeps, {
      disk: this.disk,
      snapshotId,
      descriptor: d,
      data,
      zeroBlocks: this.zeroBlocks,
      snapshotStartedAt: this.visible ? undefined : this.startedAt,
      notFoundGraceMs: this.opts.notFoundGraceMs ?? DEFAULT_NOT_FOUND_GRACE_MS,
      recorded: (index) => this.ledger.digest(this.key, index),
      onWritten: async (block) => {
        const at = this.deps.clock.now();
        this.visible = true;
        this.lastWriteAt = Math.max(this.lastWriteAt, at);
        await this.ledger.record(this.key, [block], at);
      },
      signal,
    });
  }

  /** Reads the completed snapshot back (EBS reads only completed snapshots). */
  async read(offset: number, length: number, signal?: AbortSignal): Promise<Uint8Array> {
    const snapshotId = this.requireOpen();
    if (!this.completed) {
      throw new FerryError(
        `disk ${this.disk}: snapshot ${snapshotId} is still pending; EBS reads only completed snapshots`,
        { disk: this.disk, offset },
      );
    }
    this.reader ??= await EbsSource.open({ ...this.deps, snapshotId, disk: this.disk });
    return this.reader.read(offset, length, signal);
  }

  async commit(summary: DiskCommit): Promise<string> {
    const snapshotId = this.requireOpen();
    if (this.completed) return snapshotId;
    const { count, aggregate } = await this.ledger.summary(this.key);
    const most = Math.ceil(summary.bytes / EBS_BLOCK_SIZE);
    if (count > most) {
      throw new IntegrityError(
        `disk ${this.disk}: the ledger holds ${count} blocks for snapshot ${snapshotId}, but the cycle changed only ${summary.bytes} bytes (${most} blocks); refusing to complete it`,
        { disk: this.disk },
      );
    }
    this.checkTimeout(snapshotId, 'CompleteSnapshot');
    let status: Awaited<ReturnType<typeof completeSnapshot>>;
    try {
      status = await completeSnapshot(this.deps, {
        disk: this.disk,
        snapshotId,
        changedBlocksCount: count,
        aggregate,
        snapshotStartedAt: this.visible ? undefined : this.startedAt,
        notFoundGraceMs: this.opts.notFoundGraceMs ?? DEFAULT_NOT_FOUND_GRACE_MS,
      });
    } catch (err) {
      // A completion whose answer was lost may be refused when retried; the status tells.
      if (!(err instanceof EbsError) || err.retryable) throw err;
      const info = await this.statusReader.read(snapshotId).catch(() => undefined);
      if (info?.status !== 'completed') throw err;
      status = 'completed';
    }
    if (status === 'error') {
      throw new EbsSnapshotError(
        `disk ${this.disk}: snapshot ${snapshotId} went to error on CompleteSnapshot (ChangedBlocksCount ${count}); it is no checkpoint`,
        { disk: this.disk, snapshotId },
      );
    }
    await waitForCompletion(this.deps, {
      disk: this.disk,
      snapshotId,
      reader: this.statusReader,
      timeoutMs: this.opts.completionTimeoutMs ?? DEFAULT_COMPLETION_WAIT_MS,
    });
    await this.ledger.update(this.key, { completed: true });
    this.completed = true;
    return snapshotId;
  }

  /** The checkpoint now names the snapshot; the ledger's blocks are no longer needed. */
  async afterPublish(): Promise<void> {
    await this.ledger.clear(this.key);
  }

  async close(): Promise<void> {
    await this.reader?.close();
    await this.ledger.release?.(this.key);
  }

  private startInput(sizeGiB: number, parent: string | undefined, clientToken: string): StartSnapshotInput {
    const { set, disk, cycle } = this.opts;
    return {
      disk,
      volumeSizeGiB: sizeGiB,
      clientToken,
      timeoutMinutes: this.timeoutMinutes,
      parentSnapshotId: parent,
      encrypted: this.opts.encrypted,
      kmsKeyArn: this.opts.kmsKeyArn,
      description: this.opts.description ?? `Ferry ${set}/${disk} cycle ${cycle}`,
      tags: {
        ...this.opts.tags,
        'ferry:set': set.slice(0, 255),
        'ferry:disk': disk.slice(0, 255),
        'ferry:cycle': cycle.slice(0, 255),
      },
    };
  }

  private setZeroPolicy(encrypted: boolean): void {
    const requested = this.opts.encrypted === true || this.opts.kmsKeyArn !== undefined;
    this.zeroBlocks = zeroBlockPolicy({ kind: this.kind, encrypted: encrypted || requested });
  }

  private checkTimeout(snapshotId: string, op: 'PutSnapshotBlock' | 'CompleteSnapshot'): void {
    checkSnapshotTimeout({
      disk: this.disk,
      snapshotId,
      lastWriteAt: this.lastWriteAt,
      timeoutMinutes: this.timeoutMinutes,
      now: this.deps.clock.now(),
      op,
    });
  }

  private requireOpen(): string {
    if (this.snapshot === undefined) {
      throw new FerryError(`disk ${this.disk}: EBS target used before open()`, { disk: this.disk });
    }
    return this.snapshot;
  }
}

/**
 * The cycle id and parent snapshot an EbsTarget needs for the next cycle of `disk`, from the
 * checkpoint catalog: the engine names a cycle `${set}#${latest sequence + 1}`, and the previous
 * checkpoint's targetRef for the disk is its snapshot.
 */
export async function ebsCycleFor(
  state: Pick<StateStore, 'latestCheckpoint'>,
  set: string,
  disk: string,
): Promise<{
  cycle: string;
  parentSnapshotId: string | undefined;
  previous: RecoveryCheckpoint | undefined;
}> {
  const previous = await state.latestCheckpoint(set);
  const ref = previous?.disks.find((d) => d.disk === disk)?.targetRef;
  return {
    cycle: `${set}#${(previous?.sequence ?? 0) + 1}`,
    parentSnapshotId: ref !== undefined && SNAPSHOT_ID.test(ref) ? ref : undefined,
    previous,
  };
}
