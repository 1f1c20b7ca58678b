// How a snapshot's status is read. The EBS direct APIs have no describe call: CompleteSnapshot is
// asynchronous and only EC2 DescribeSnapshots tells `pending` from `completed` from `error`.
import { ListSnapshotBlocksCommand } from '@aws-sdk/client-ebs';
import { TransferError } from '../../engine/errors.ts';
import { callEbs, type EbsDeps, resolveDeps } from './client.ts';
import { EbsError } from './errors.ts';

export type EbsSnapshotStatus = 'pending' | 'completed' | 'error';

export interface SnapshotStatusInfo {
  readonly status: EbsSnapshotStatus;
  /** Why a snapshot is in `error`, where the reader can tell. */
  readonly message?: string | undefined;
}

/** The port: the status of one snapshot, or undefined when no such snapshot is visible. */
export interface SnapshotStatusReader {
  read(snapshotId: string, signal?: AbortSignal): Promise<SnapshotStatusInfo | undefined>;
}

/** The slice of EC2 DescribeSnapshots a reader needs: `(input) => ec2.send(new DescribeSnapshotsCommand(input))`. */
export type DescribeSnapshots = (input: { SnapshotIds: string[] }) => Promise<{
  Snapshots?: {
    SnapshotId?: string | undefined;
    State?: string | undefined;
    StateMessage?: string | undefined;
  }[];
}>;

const EC2_THROTTLED = new Set(['RequestLimitExceeded', 'Throttling', 'ThrottlingException']);

/**
 * The status from EC2 DescribeSnapshots, the only API that reports `error` with a reason. Needs
 * ec2:DescribeSnapshots; the EC2 client stays with the caller (no EC2 SDK dependency here).
 * `recoverable`/`recovering` (Recycle Bin) count as `error`: such a snapshot is no checkpoint.
 */
export function describeSnapshotsStatusReader(describe: DescribeSnapshots): SnapshotStatusReader {
  return {
    async read(snapshotId) {
      let out: Awaited<ReturnType<DescribeSnapshots>>;
      try {
        out = await describe({ SnapshotIds: [snapshotId] });
      } catch (err) {
        const name = (err as { name?: string }).name ?? 'Error';
        if (name === 'InvalidSnapshot.NotFound') return undefined;
        const status = (err as { $metadata?: { httpStatusCode?: number } }).$metadata?.httpStatusCode ?? 0;
        const throttled = EC2_THROTTLED.has(name);
        throw new TransferError(`EC2 DescribeSnapshots for ${snapshotId} failed (${name}): ${String(err)}`, {
          cause: err,
          retryable: throttled || status >= 500,
          throttled,
        });
      }
      const s = out.Snapshots?.find((x) => x.SnapshotId === snapshotId);
      if (!s) return undefined;
      if (s.State === 'completed' || s.State === 'pending') return { status: s.State };
      return { status: 'error', message: s.StateMessage ?? `state ${s.State ?? 'unknown'}` };
    },
  };
}

/**
 * The status as the EBS direct APIs alone can tell it: ListSnapshotBlocks answers only for a
 * completed snapshot, and refuses a pending one with ValidationException (INVALID_SNAPSHOT_ID). It
 * cannot tell `error` from `pending`, so a snapshot that failed after CompleteSnapshot is seen only
 * when waiting times out; prefer DescribeSnapshots in production. Needs only ebs:ListSnapshotBlocks.
 */
export function listProbeStatusReader(deps: EbsDeps): SnapshotStatusReader {
  const d = resolveDeps(deps);
  return {
    async read(snapshotId, signal) {
      try {
        await callEbs(
          d,
          { op: 'ListSnapshotBlocks', snapshotId },
          (abortSignal) =>
            d.client.send(new ListSnapshotBlocksCommand({ SnapshotId: snapshotId, MaxResults: 100 }), {
              abortSignal,
            }),
          signal,
        );
        return { status: 'completed' };
      } catch (err) {
        if (
          err instanceof EbsError &&
          err.code === 'ValidationException' &&
          err.reason === 'INVALID_SNAPSHOT_ID'
        ) {
          return { status: 'pending' };
        }
        if (err instanceof EbsError && err.snapshotNotFound) return undefined;
        throw err;
      }
    },
  };
}
