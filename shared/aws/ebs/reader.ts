// Stateless EBS snapshot reading: the List calls as streams of pages, block runs as extents, and
// GetSnapshotBlock with its checksum verified. EbsSource is built on these; the differ and
// chunk-writer Lambdas call them directly.
//
// Exported API (deps: EbsDeps first, as in writer.ts):
//
//   listSnapshotBlockPages(deps, { snapshotId, disk?, startingBlockIndex?, maxResults?, signal? })
//       -> AsyncGenerator<BlockListPage>       ListSnapshotBlocks, page by page (NextToken),
//   listChangedBlockPages(deps, { secondSnapshotId, firstSnapshotId?, disk?, startingBlockIndex?,
//                                 maxResults?, signal? })
//       -> AsyncGenerator<ChangedBlockPage>    ListChangedBlocks, page by page.
//       Each page call is retried with deps.retry; empty pages that carry a NextToken are followed.
//       Memory is one page at a time: a 16 TiB disk's block list is never held.
//       A changed block without `secondToken` exists only in the first snapshot: it reads as zeros
//       in the second.
//   blockRuns(indexes: AsyncIterable<number>, { volumeBytes? }) -> AsyncGenerator<Extent>
//       Ascending block indexes coalesced into byte extents.
//   getSnapshotBlock(deps, { snapshotId, blockIndex, blockToken, disk?, signal? })
//       -> { data, checksumB64 }   Retried with deps.retry (EbsSource passes NO_RETRY: the engine
//       retries its reads). The length, algorithm and SHA-256 are verified; a mismatch is an
//       IntegrityError naming disk, snapshot and block (not retried: corruption must be loud).
import { createHash } from 'node:crypto';
import {
  GetSnapshotBlockCommand,
  ListChangedBlocksCommand,
  ListSnapshotBlocksCommand,
} from '@aws-sdk/client-ebs';
import { IntegrityError } from '../../engine/errors.ts';
import type { Extent } from '../../engine/extents.ts';
import { type EbsDeps, resolveDeps, retryEbs } from './client.ts';
import { describeCall, EBS_BLOCK_SIZE, type EbsCallSite, malformedReply } from './errors.ts';

// 10,000: the API's largest page. Fewer round trips against the 50/s List quota, and a page of
// tokens is a couple of MB at most.
export const DEFAULT_LIST_PAGE_SIZE = 10_000;

export interface ListedBlock {
  readonly index: number;
  readonly token: string;
}

export interface BlockListPage {
  readonly volumeSizeGiB: number;
  readonly blocks: readonly ListedBlock[];
  /** When the page's block tokens expire (epoch ms), if EBS said. */
  readonly expiresAt: number | undefined;
}

export interface ChangedBlockEntry {
  readonly index: number;
  /** Absent when the first snapshot does not have the block. */
  readonly firstToken: string | undefined;
  /** Absent when the second snapshot does not have the block: it reads as zeros there. */
  readonly secondToken: string | undefined;
}

export interface ChangedBlockPage {
  readonly volumeSizeGiB: number;
  readonly blocks: readonly ChangedBlockEntry[];
  readonly expiresAt: number | undefined;
}

interface ListInput {
  readonly disk?: string | undefined;
  readonly startingBlockIndex?: number | undefined;
  /** 100–10,000; DEFAULT_LIST_PAGE_SIZE. */
  readonly maxResults?: number | undefined;
  readonly signal?: AbortSignal | undefined;
}

/** Checks what every List page promises: the 512 KiB block size, a volume size, ascending indexes. */
function checkPage(
  site: EbsCallSite,
  out: { BlockSize?: number | undefined; VolumeSize?: number | undefined },
  indexes: readonly number[],
  after: number,
): number {
  if (out.BlockSize !== undefined && out.BlockSize !== EBS_BLOCK_SIZE) {
    throw malformedReply(site, `BlockSize ${out.BlockSize}, expected ${EBS_BLOCK_SIZE}`);
  }
  if (typeof out.VolumeSize !== 'number' || !(out.VolumeSize > 0))
    throw malformedReply(site, 'no VolumeSize');
  let last = after;
  for (const index of indexes) {
    if (!Number.isSafeInteger(index) || index <= last) {
      throw malformedReply(site, `block index ${index} is not above the previous ${last}`);
    }
    last = index;
  }
  return last;
}

const expiry = (t: Date | undefined): number | undefined => (t instanceof Date ? t.getTime() : undefined);

export async function* listSnapshotBlockPages(
  deps: EbsDeps,
  input: ListInput & { readonly snapshotId: string },
): AsyncGenerator<BlockListPage> {
  const d = resolveDeps(deps);
  const site: EbsCallSite = { op: 'ListSnapshotBlocks', disk: input.disk, snapshotId: input.snapshotId };
  let nextToken: string | undefined;
  let last = (input.startingBlockIndex ?? 0) - 1;
  do {
    const token = nextToken;
    const out = await retryEbs(
      d,
      site,
      (abortSignal) =>
        d.client.send(
          new ListSnapshotBlocksCommand({
            SnapshotId: input.snapshotId,
            MaxResults: input.maxResults ?? DEFAULT_LIST_PAGE_SIZE,
            // "If you specify NextToken, then StartingBlockIndex is ignored."
            ...(token === undefined
              ? { StartingBlockIndex: input.startingBlockIndex }
              : { NextToken: token }),
          }),
          { abortSignal },
        ),
      input.signal,
    );
    const blocks = (out.Blocks ?? []).map((b) => {
      if (typeof b.BlockIndex !== 'number' || typeof b.BlockToken !== 'string') {
        throw malformedReply(site, `a block without index or token (index ${b.BlockIndex})`);
      }
      return { index: b.BlockIndex, token: b.BlockToken };
    });
    last = checkPage(
      site,
      out,
      blocks.map((b) => b.index),
      last,
    );
    nextToken = out.NextToken;
    yield { volumeSizeGiB: out.VolumeSize!, blocks, expiresAt: expiry(out.ExpiryTime) };
  } while (nextToken !== undefined);
}

export async function* listChangedBlockPages(
  deps: EbsDeps,
  input: ListInput & { readonly secondSnapshotId: string; readonly firstSnapshotId?: string | undefined },
): AsyncGenerator<ChangedBlockPage> {
  const d = resolveDeps(deps);
  const site: EbsCallSite = { op: 'ListChangedBlocks', disk: input.disk, snapshotId: input.secondSnapshotId };
  let nextToken: string | undefined;
  let last = (input.startingBlockIndex ?? 0) - 1;
  do {
    const token = nextToken;
    const out = await retryEbs(
      d,
      site,
      (abortSignal) =>
        d.client.send(
          new ListChangedBlocksCommand({
            SecondSnapshotId: input.secondSnapshotId,
            ...(input.firstSnapshotId === undefined ? {} : { FirstSnapshotId: input.firstSnapshotId }),
            MaxResults: input.maxResults ?? DEFAULT_LIST_PAGE_SIZE,
            ...(token === undefined
              ? { StartingBlockIndex: input.startingBlockIndex }
              : { NextToken: token }),
          }),
          { abortSignal },
        ),
      input.signal,
    );
    const blocks = (out.ChangedBlocks ?? []).map((b) => {
      if (typeof b.BlockIndex !== 'number') throw malformedReply(site, 'a changed block without index');
      return { index: b.BlockIndex, firstToken: b.FirstBlockToken, secondToken: b.SecondBlockToken };
    });
    last = checkPage(
      site,
      out,
      blocks.map((b) => b.index),
      last,
    );
    nextToken = out.NextToken;
    yield { volumeSizeGiB: out.VolumeSize!, blocks, expiresAt: expiry(out.ExpiryTime) };
  } while (nextToken !== undefined);
}

/** Coalesces ascending block indexes into extents, clipped to `volumeBytes` when given. */
export async function* blockRuns(
  indexes: AsyncIterable<number>,
  opts: { volumeBytes?: number | undefined } = {},
): AsyncGenerator<Extent> {
  let start = -1;
  let end = -1;
  const extent = (): Extent => {
    const offset = start * EBS_BLOCK_SIZE;
    const stop = Math.min(end * EBS_BLOCK_SIZE, opts.volumeBytes ?? Number.POSITIVE_INFINITY);
    return { offset, length: stop - offset };
  };
  for await (const index of indexes) {
    if (index === end) {
      end++;
      continue;
    }
    if (end > start) yield extent();
    start = index;
    end = index + 1;
  }
  if (end > start) yield extent();
}

export interface ReadBlock {
  readonly data: Uint8Array;
  readonly checksumB64: string;
}

async function bodyBytes(body: unknown): Promise<Uint8Array> {
  if (body instanceof Uint8Array) return body;
  if (typeof body === 'string') return Buffer.from(body);
  const b = body as { transformToByteArray?: () => Promise<Uint8Array> } | undefined;
  if (typeof b?.transformToByteArray === 'function') return b.transformToByteArray();
  if (body !== null && typeof body === 'object' && Symbol.asyncIterator in body) {
    const chunks: Uint8Array[] = [];
    for await (const chunk of body as AsyncIterable<Uint8Array>) chunks.push(chunk);
    return Buffer.concat(chunks);
  }
  return new Uint8Array(0);
}

export async function getSnapshotBlock(
  deps: EbsDeps,
  input: {
    readonly snapshotId: string;
    readonly blockIndex: number;
    readonly blockToken: string;
    readonly disk?: string | undefined;
    readonly signal?: AbortSignal | undefined;
  },
): Promise<ReadBlock> {
  const d = resolveDeps(deps);
  const { disk, snapshotId, blockIndex } = input;
  const site: EbsCallSite = { op: 'GetSnapshotBlock', disk, snapshotId, blockIndex };
  // The body is read inside the call, so the attempt timeout and abort cover the transfer too.
  const { out, data } = await retryEbs(
    d,
    site,
    async (abortSignal) => {
      const out = await d.client.send(
        new GetSnapshotBlockCommand({
          SnapshotId: snapshotId,
          BlockIndex: blockIndex,
          BlockToken: input.blockToken,
        }),
        { abortSignal },
      );
      return { out, data: await bodyBytes(out.BlockData) };
    },
    input.signal,
  );
  const bad = (what: string) =>
    new IntegrityError(`${describeCall(site)}: ${what}`, {
      disk,
      offset: blockIndex * EBS_BLOCK_SIZE,
    });
  if (out.DataLength !== EBS_BLOCK_SIZE) {
    throw bad(`reply says DataLength ${out.DataLength ?? '(none)'}, expected ${EBS_BLOCK_SIZE}`);
  }
  if (data.length !== EBS_BLOCK_SIZE)
    throw bad(`reply carried ${data.length} bytes, expected ${EBS_BLOCK_SIZE}`);
  if (out.Checksum === undefined || out.Checksum === '') {
    throw bad('reply has no checksum, so the block cannot be verified');
  }
  if (out.ChecksumAlgorithm !== undefined && out.ChecksumAlgorithm !== 'SHA256') {
    throw bad(`reply uses checksum algorithm ${out.ChecksumAlgorithm}, not SHA256`);
  }
  const actual = createHash('sha256').update(data).digest('base64');
  if (actual !== out.Checksum) {
    throw bad(`data does not match its checksum (EBS ${out.Checksum}, data ${actual})`);
  }
  return { data, checksumB64: actual };
}

/** Bytes of a volume of `gib` GiB (EBS VolumeSize). */
export const volumeBytes = (gib: number): number => gib * 1024 ** 3;
