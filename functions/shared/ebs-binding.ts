// Binds the cycle's EBS ports (ChangeLister, BlockReader, SnapshotWriter) to the EBS adapter's
// stateless functions (shared/aws/ebs): one retry layer with backoff and jitter, client-side quota
// pacing, per-attempt timeouts, errors naming disk, snapshot and block. The glue here only maps
// shapes and reports each retried attempt to the caller's signals.
import type { EBSClient } from '@aws-sdk/client-ebs';
import type { EbsDeps } from '../../shared/aws/ebs/client.ts';
import { EbsSnapshotError } from '../../shared/aws/ebs/errors.ts';
import {
  getSnapshotBlock,
  listChangedBlockPages,
  listSnapshotBlockPages,
} from '../../shared/aws/ebs/reader.ts';
import { listProbeStatusReader, type SnapshotStatusReader } from '../../shared/aws/ebs/status.ts';
import { completeSnapshot, putSnapshotBlocks, startSnapshot } from '../../shared/aws/ebs/writer.ts';
import type {
  BlockReader,
  CallSignals,
  ChangeLister,
  ChangePage,
  SnapshotWriter,
} from '../../shared/engine/cycle/ports.ts';
import { AbortedError, TransferError } from '../../shared/engine/errors.ts';
import type { Clock, Random } from '../../shared/engine/ports.ts';
import { DEFAULT_RETRY_POLICY, type RetryPolicy, withRetry } from '../../shared/engine/retry.ts';
import { systemClock } from '../../shared/runtime/clock.ts';

// Status polling starts fast (small snapshots seal in well under a second) and backs off to this.
const MAX_POLL_MS = 5_000;

export interface EbsBindingOptions {
  readonly clock?: Clock;
  readonly random?: Random;
  readonly retry?: RetryPolicy;
  /**
   * How a snapshot's status is read: EC2 DescribeSnapshots where available (it alone reports
   * `error`); otherwise the EBS-only ListSnapshotBlocks probe, which cannot tell `error` from
   * `pending` (a failed seal is then seen only as a finalizer that keeps answering `completing`).
   */
  readonly statusReader?: SnapshotStatusReader;
}

export interface EbsPorts {
  readonly lister: ChangeLister;
  readonly reader: BlockReader;
  readonly writer: SnapshotWriter;
}

const throttledOf = (err: unknown): boolean => err instanceof TransferError && err.throttled;

/** A snapshot that can no longer become a checkpoint is a permanent failure of the chunk that met it. */
function permanentSnapshotError(err: unknown): unknown {
  if (err instanceof EbsSnapshotError) {
    return new TransferError(err.message, { disk: err.disk, cause: err, retryable: false });
  }
  return err;
}

export function ebsPorts(client: EBSClient, opts: EbsBindingOptions = {}): EbsPorts {
  const clock = opts.clock ?? systemClock;
  const base: EbsDeps = {
    client,
    clock,
    ...(opts.random === undefined ? {} : { random: opts.random }),
    retry: opts.retry ?? DEFAULT_RETRY_POLICY,
  };
  /** The adapter's deps with this call's retry observer. */
  const withSignals = (s: CallSignals): EbsDeps =>
    s.onRetry === undefined
      ? base
      : { ...base, onRetry: (err) => s.onRetry?.({ throttled: throttledOf(err) }) };
  const statusReader = opts.statusReader ?? listProbeStatusReader(base);

  const lister: ChangeLister = {
    async *listBlocks(req): AsyncGenerator<ChangePage> {
      const common = { disk: req.disk, startingBlockIndex: req.startingBlockIndex, signal: req.signal };
      if (req.previousSnapshotId === undefined) {
        for await (const page of listSnapshotBlockPages(base, { ...common, snapshotId: req.snapshotId })) {
          yield { volumeSizeGiB: page.volumeSizeGiB, blocks: page.blocks };
        }
        return;
      }
      const pages = listChangedBlockPages(base, {
        ...common,
        firstSnapshotId: req.previousSnapshotId,
        secondSnapshotId: req.snapshotId,
      });
      for await (const page of pages) {
        // A block without a token in the new snapshot reads as zeros there.
        yield {
          volumeSizeGiB: page.volumeSizeGiB,
          blocks: page.blocks.map((b) => ({ index: b.index, token: b.secondToken })),
        };
      }
    },
  };

  const reader: BlockReader = {
    async readBlock(req) {
      // getSnapshotBlock is one attempt with its checksum verified; the retry layer is ours.
      const read = await withRetry(
        () =>
          getSnapshotBlock(base, {
            snapshotId: req.snapshotId,
            blockIndex: req.index,
            blockToken: req.token,
            disk: req.disk,
            signal: req.signal,
          }),
        { clock, random: opts.random ?? Math.random, policy: base.retry!, signal: req.signal },
        (err) => req.onRetry?.({ throttled: throttledOf(err) }),
      );
      return { data: read.data, checksum: read.checksumB64 };
    },
  };

  const writer: SnapshotWriter = {
    async startSnapshot(req) {
      const started = await startSnapshot(base, {
        disk: req.disk,
        volumeSizeGiB: req.volumeSizeGiB,
        clientToken: req.clientToken,
        timeoutMinutes: req.timeoutMinutes,
        parentSnapshotId: req.parentSnapshotId,
        kmsKeyArn: req.kmsKeyArn,
        description: req.description,
        tags: req.tags,
      });
      return { snapshotId: started.snapshotId, encrypted: started.encrypted };
    },

    async putBlocks(req) {
      try {
        const written = await putSnapshotBlocks(withSignals(req), {
          disk: req.disk,
          snapshotId: req.snapshotId,
          blocks: req.blocks,
          zeroBlocks: req.skipZeroBlocks ? 'skip' : 'write',
          seq: req.seq,
          snapshotStartedAt: req.snapshotStartedAt,
          signal: req.signal,
        });
        return written.map((w) => ({ index: w.index, checksum: w.checksumB64 }));
      } catch (err) {
        throw permanentSnapshotError(err);
      }
    },

    async completeSnapshot(req) {
      const status = await completeSnapshot(base, {
        disk: req.disk,
        snapshotId: req.snapshotId,
        changedBlocksCount: req.changedBlocksCount,
        aggregate: req.aggregateChecksum,
      });
      if (status === 'error') {
        throw new TransferError(
          `disk ${req.disk}: snapshot ${req.snapshotId} refused its completion (error)`,
          {
            disk: req.disk,
            retryable: false,
          },
        );
      }
    },

    async waitForCompletion(req) {
      for (let wait = 100; ; wait = Math.min(wait * 2, MAX_POLL_MS)) {
        let status: Awaited<ReturnType<SnapshotStatusReader['read']>>;
        try {
          status = await statusReader.read(req.snapshotId, req.signal);
        } catch (err) {
          if (req.signal.aborted || err instanceof AbortedError) return 'pending';
          // A throttled or failed status read is no verdict on the snapshot.
          if (!(err instanceof TransferError && err.retryable)) throw err;
          status = undefined;
        }
        if (status?.status === 'completed' || status?.status === 'error') return status.status;
        try {
          await clock.sleep(wait, req.signal);
        } catch {
          return 'pending';
        }
      }
    },
  };

  return { lister, reader, writer };
}
