// What the emulator cannot produce, with aws-sdk-client-mock: malformed replies, odd SDK errors,
// hung calls; plus the pure parts (error translation, rate limiter, status readers, LINEAR aggregate).
import { createHash } from 'node:crypto';
import {
  AccessDeniedException,
  CompleteSnapshotCommand,
  ConcurrentLimitExceededException,
  ConflictException,
  EBSClient,
  EBSServiceException,
  GetSnapshotBlockCommand,
  InternalServerException,
  ListSnapshotBlocksCommand,
  PutSnapshotBlockCommand,
  RequestThrottledException,
  ResourceNotFoundException,
  ServiceQuotaExceededException,
  StartSnapshotCommand,
  ValidationException,
} from '@aws-sdk/client-ebs';
import { mockClient } from 'aws-sdk-client-mock';
import fc from 'fast-check';
import { afterEach, describe, expect, it } from 'vitest';
import { linearAggregate as emulatorLinear } from '../../local-cloud/emulators/ebs/state.ts';
import { type EbsDeps, NO_RETRY } from '../../shared/aws/ebs/client.ts';
import {
  EBS_BLOCK_SIZE,
  EbsError,
  EbsSnapshotError,
  translateEbsError,
} from '../../shared/aws/ebs/errors.ts';
import { DigestMap } from '../../shared/aws/ebs/ledger.ts';
import { EbsRateLimiter, TokenBucket } from '../../shared/aws/ebs/limiter.ts';
import { getSnapshotBlock, listSnapshotBlockPages } from '../../shared/aws/ebs/reader.ts';
import { describeSnapshotsStatusReader, listProbeStatusReader } from '../../shared/aws/ebs/status.ts';
import {
  completeSnapshot,
  linearAggregateBase64,
  putSnapshotBlocks,
  startSnapshot,
  waitForCompletion,
} from '../../shared/aws/ebs/writer.ts';
import { AbortedError, IntegrityError, TransferError } from '../../shared/engine/errors.ts';
import { VirtualClock } from '../../shared/runtime/virtual-clock.ts';

const B = EBS_BLOCK_SIZE;
const client = new EBSClient({
  region: 'us-east-1',
  credentials: { accessKeyId: 'test', secretAccessKey: 'test' },
  maxAttempts: 1,
});
const ebs = mockClient(client);
const fast = { maxAttempts: 3, baseDelayMs: 1, maxDelayMs: 2 };
const deps: EbsDeps = { client, random: () => 0.5, retry: fast };

afterEach(() => {
  ebs.reset();
});

const block = (seed: number): Buffer => {
  const b = Buffer.alloc(B);
  for (let i = 0; i < B; i += 4) b.writeUInt32LE((Math.imul(i + 1, 2654435761) ^ seed) >>> 0, i);
  return b;
};
const b64 = (data: Uint8Array) => createHash('sha256').update(data).digest('base64');
const meta = (httpStatusCode: number) => ({ httpStatusCode });

async function failure(p: Promise<unknown>): Promise<Error> {
  try {
    await p;
  } catch (err) {
    return err as Error;
  }
  throw new Error('expected a failure');
}

const get = () =>
  getSnapshotBlock(deps, { disk: 'sdc', snapshotId: 'snap-0abc', blockIndex: 7, blockToken: 'token' });

describe('malformed replies', () => {
  it('refuses a GetSnapshotBlock reply without a checksum, with the wrong length, or with other data', async () => {
    const data = block(1);
    const cases: [Record<string, unknown>, string][] = [
      [{ BlockData: data, DataLength: B, ChecksumAlgorithm: 'SHA256' }, 'reply has no checksum'],
      [
        { BlockData: data.subarray(0, 4096), DataLength: 4096, Checksum: b64(data) },
        'DataLength 4096, expected 524288',
      ],
      [{ BlockData: data.subarray(0, 4096), DataLength: B, Checksum: b64(data) }, 'reply carried 4096 bytes'],
      [{ BlockData: data, DataLength: B, Checksum: b64(block(2)) }, 'data does not match its checksum'],
      [
        { BlockData: data, DataLength: B, Checksum: b64(data), ChecksumAlgorithm: 'CRC32' },
        'algorithm CRC32',
      ],
    ];
    for (const [reply, why] of cases) {
      ebs.on(GetSnapshotBlockCommand).resolves(reply as never);
      const err = await failure(get());
      expect(err).toBeInstanceOf(IntegrityError);
      expect(err.message).toContain('disk sdc: EBS GetSnapshotBlock of block 7 in snapshot snap-0abc: ');
      expect(err.message).toContain(why);
      expect((err as IntegrityError).offset).toBe(7 * B);
    }
    ebs
      .on(GetSnapshotBlockCommand)
      .resolves({ BlockData: data, DataLength: B, Checksum: b64(data) } as never);
    expect(Buffer.from((await get()).data).equals(data)).toBe(true);
  });

  it('refuses a StartSnapshot reply without SnapshotId and a CompleteSnapshot reply without Status', async () => {
    ebs.on(StartSnapshotCommand).resolves({ Status: 'pending' });
    const start = await failure(
      startSnapshot(deps, { disk: 'sdc', volumeSizeGiB: 8, clientToken: 't', timeoutMinutes: 60 }),
    );
    expect(start).toBeInstanceOf(EbsError);
    expect(start.message).toBe('disk sdc: EBS StartSnapshot returned a malformed reply: no SnapshotId');
    expect(ebs.commandCalls(StartSnapshotCommand)).toHaveLength(1);

    ebs.on(CompleteSnapshotCommand).resolves({});
    const complete = await failure(
      completeSnapshot(deps, { disk: 'sdc', snapshotId: 'snap-0abc', changedBlocksCount: 0 }),
    );
    expect(complete.message).toBe(
      'disk sdc: EBS CompleteSnapshot in snapshot snap-0abc returned a malformed reply: no Status',
    );
  });

  it('refuses List pages with a foreign block size, no volume size, or indexes out of order', async () => {
    const pages = async () => {
      for await (const _ of listSnapshotBlockPages(deps, { disk: 'sdc', snapshotId: 'snap-0abc' })) {
      }
    };
    ebs.on(ListSnapshotBlocksCommand).resolves({ VolumeSize: 1, BlockSize: 4096, Blocks: [] });
    expect((await failure(pages())).message).toContain('BlockSize 4096, expected 524288');
    ebs.on(ListSnapshotBlocksCommand).resolves({ BlockSize: B, Blocks: [] });
    expect((await failure(pages())).message).toContain('no VolumeSize');
    ebs.on(ListSnapshotBlocksCommand).resolves({
      VolumeSize: 1,
      BlockSize: B,
      Blocks: [
        { BlockIndex: 5, BlockToken: 'a' },
        { BlockIndex: 3, BlockToken: 'b' },
      ],
    });
    expect((await failure(pages())).message).toContain('block index 3 is not above the previous 5');
    ebs.on(ListSnapshotBlocksCommand).resolves({ VolumeSize: 1, BlockSize: B, Blocks: [{ BlockIndex: 5 }] });
    expect((await failure(pages())).message).toContain('a block without index or token');
  });

  it("refuses a PutSnapshotBlock whose echoed checksum differs from the block's", async () => {
    ebs.on(PutSnapshotBlockCommand).resolves({ Checksum: b64(block(9)), ChecksumAlgorithm: 'SHA256' });
    const err = await failure(
      putSnapshotBlocks(deps, {
        disk: 'sdc',
        snapshotId: 'snap-0abc',
        blocks: [{ index: 2, data: block(1) }],
        zeroBlocks: 'write',
      }),
    );
    expect(err).toBeInstanceOf(IntegrityError);
    expect(err.message).toContain(
      'disk sdc: EBS PutSnapshotBlock of block 2 in snapshot snap-0abc: EBS stored checksum',
    );
  });
});

describe('odd SDK failures', () => {
  it('names an error without $metadata as a failure before EBS answered, and does not retry it', async () => {
    ebs.on(StartSnapshotCommand).callsFake(() => Promise.reject(new Error('endpoint resolution exploded')));
    const err = await failure(
      startSnapshot(deps, { disk: 'sdc', volumeSizeGiB: 8, clientToken: 't', timeoutMinutes: 60 }),
    );
    expect(err).toBeInstanceOf(EbsError);
    expect(err.message).toBe(
      'disk sdc: EBS StartSnapshot failed before EBS answered (Error: endpoint resolution exploded)',
    );
    expect((err as EbsError).retryable).toBe(false);
    expect(ebs.commandCalls(StartSnapshotCommand)).toHaveLength(1);
  });

  it('retries a dropped connection and an SDK TimeoutError, then succeeds', async () => {
    const reset = Object.assign(new Error('socket hang up'), { code: 'ECONNRESET' });
    const timeout = Object.assign(new Error('Connection timed out after 5000 ms'), { name: 'TimeoutError' });
    ebs
      .on(StartSnapshotCommand)
      .callsFakeOnce(() => Promise.reject(reset))
      .callsFakeOnce(() => Promise.reject(timeout))
      .resolves({ SnapshotId: 'snap-0abc', Status: 'pending' });
    const retried: string[] = [];
    const out = await startSnapshot(
      { ...deps, onRetry: (err) => retried.push((err as Error).message) },
      { disk: 'sdc', volumeSizeGiB: 8, clientToken: 't', timeoutMinutes: 60 },
    );
    expect(out.snapshotId).toBe('snap-0abc');
    expect(retried).toEqual([
      'disk sdc: EBS StartSnapshot failed (Error: socket hang up); may succeed on retry',
      'disk sdc: EBS StartSnapshot failed (TimeoutError: Connection timed out after 5000 ms); may succeed on retry',
    ]);
  });

  it('times out a call that never answers, even when the client ignores its abort signal', async () => {
    ebs.on(CompleteSnapshotCommand).callsFake(() => new Promise(() => {}));
    const err = await failure(
      completeSnapshot(
        { ...deps, timeouts: { controlMs: 20 } },
        { disk: 'sdc', snapshotId: 'snap-0abc', changedBlocksCount: 1, aggregate: new Uint8Array(32) },
      ),
    );
    expect(err).toBeInstanceOf(EbsError);
    expect(err.message).toBe(
      'disk sdc: EBS CompleteSnapshot in snapshot snap-0abc timed out after 20 ms (no answer); may succeed on retry',
    );
    expect(ebs.commandCalls(CompleteSnapshotCommand)).toHaveLength(3);
  });

  it("turns the caller's abort into an AbortedError, not an EBS failure", async () => {
    ebs.on(PutSnapshotBlockCommand).callsFake(() => new Promise(() => {}));
    const abort = new AbortController();
    const p = putSnapshotBlocks(
      { ...deps, retry: NO_RETRY },
      {
        disk: 'sdc',
        snapshotId: 'snap-0abc',
        blocks: [{ index: 0, data: block(1) }],
        zeroBlocks: 'write',
        signal: abort.signal,
      },
    );
    abort.abort();
    const err = await failure(p);
    expect(err).toBeInstanceOf(AbortedError);
    expect(err.message).toBe('disk sdc: EBS PutSnapshotBlock of block 0 in snapshot snap-0abc aborted');
  });

  it('classifies every EBS exception: throttles and 5xx retry, the rest fail at once with advice', () => {
    const site = { op: 'PutSnapshotBlock' as const, disk: 'sdc', snapshotId: 'snap-0abc', blockIndex: 4 };
    const cases: [unknown, boolean, boolean, string][] = [
      [
        new RequestThrottledException({
          message: 'slow down',
          $metadata: meta(400),
          Reason: 'RESOURCE_LEVEL_THROTTLE',
        }),
        true,
        true,
        'throttled (RequestThrottledException RESOURCE_LEVEL_THROTTLE, HTTP 400',
      ],
      [
        new ConcurrentLimitExceededException({ message: 'too many', $metadata: meta(400) }),
        true,
        true,
        'throttled',
      ],
      [
        new EBSServiceException({
          name: 'ThrottlingException',
          $fault: 'client',
          message: 'x',
          $metadata: meta(400),
        }),
        true,
        true,
        'throttled',
      ],
      [
        new EBSServiceException({
          name: 'TooManyRequests',
          $fault: 'client',
          message: 'x',
          $metadata: meta(429),
        }),
        true,
        true,
        'HTTP 429',
      ],
      [
        new InternalServerException({ message: 'oops', $metadata: meta(500) }),
        true,
        false,
        'may succeed on retry',
      ],
      [
        new EBSServiceException({
          name: 'ServiceUnavailableException',
          $fault: 'server',
          message: 'x',
          $metadata: meta(503),
        }),
        true,
        false,
        'may succeed on retry',
      ],
      [
        new EBSServiceException({ name: 'Weird', $fault: 'server', message: 'x', $metadata: meta(502) }),
        true,
        false,
        'HTTP 502',
      ],
      [
        new AccessDeniedException({ message: 'no', $metadata: meta(403), Reason: 'UNAUTHORIZED_ACCOUNT' }),
        false,
        false,
        "check the role's ebs:PutSnapshotBlock permission",
      ],
      [
        new ValidationException({ message: 'bad', $metadata: meta(400), Reason: 'INVALID_PARAMETER_VALUE' }),
        false,
        false,
        'not a passing condition',
      ],
      [
        new ValidationException({ message: 'late', $metadata: meta(400), Reason: 'WRITE_REQUEST_TIMEOUT' }),
        false,
        false,
        'passed its Timeout and EBS cancelled it',
      ],
      [
        new ResourceNotFoundException({
          message: 'gone',
          $metadata: meta(404),
          Reason: 'SNAPSHOT_NOT_FOUND',
        }),
        false,
        false,
        'does not exist',
      ],
      [
        new ConflictException({ message: 'token', $metadata: meta(409) }),
        false,
        false,
        'ClientToken was used before',
      ],
      [
        new ServiceQuotaExceededException({
          message: 'quota',
          $metadata: meta(402),
          Reason: 'DEPENDENCY_SERVICE_QUOTA_EXCEEDED',
        }),
        false,
        false,
        'limit of pending snapshots',
      ],
    ];
    for (const [raw, retryable, throttled, text] of cases) {
      const err = translateEbsError(raw, site);
      expect(err).toBeInstanceOf(EbsError);
      expect(err).toMatchObject({
        retryable,
        throttled,
        disk: 'sdc',
        blockIndex: 4,
        snapshotId: 'snap-0abc',
        offset: 4 * B,
      });
      expect(err.message).toMatch(/^disk sdc: EBS PutSnapshotBlock of block 4 in snapshot snap-0abc /);
      expect(err.message).toContain(text);
    }
    const notFound = translateEbsError(cases[10]![0], site) as EbsError;
    expect(notFound.snapshotNotFound).toBe(true);
  });
});

describe('status readers and waiting', () => {
  it('reads EC2 DescribeSnapshots states, missing snapshots and throttles', async () => {
    const answers: Record<string, unknown> = {
      'snap-1': { Snapshots: [{ SnapshotId: 'snap-1', State: 'completed' }] },
      'snap-2': { Snapshots: [{ SnapshotId: 'snap-2', State: 'error', StateMessage: 'KMS key disabled' }] },
      'snap-3': { Snapshots: [{ SnapshotId: 'snap-3', State: 'recoverable' }] },
    };
    const reader = describeSnapshotsStatusReader(async ({ SnapshotIds: [id] }) => {
      if (id === 'snap-4') throw Object.assign(new Error('not found'), { name: 'InvalidSnapshot.NotFound' });
      if (id === 'snap-5') throw Object.assign(new Error('slow'), { name: 'RequestLimitExceeded' });
      return answers[id!] as never;
    });
    expect(await reader.read('snap-1')).toEqual({ status: 'completed' });
    expect(await reader.read('snap-2')).toEqual({ status: 'error', message: 'KMS key disabled' });
    expect(await reader.read('snap-3')).toEqual({ status: 'error', message: 'state recoverable' });
    expect(await reader.read('snap-4')).toBeUndefined();
    const throttled = await failure(reader.read('snap-5'));
    expect(throttled).toBeInstanceOf(TransferError);
    expect(throttled).toMatchObject({ retryable: true, throttled: true });
  });

  it('probes completion with ListSnapshotBlocks: readable is completed, INVALID_SNAPSHOT_ID is pending', async () => {
    const reader = listProbeStatusReader(deps);
    ebs
      .on(ListSnapshotBlocksCommand)
      .rejectsOnce(
        new ValidationException({ message: 'pending', $metadata: meta(400), Reason: 'INVALID_SNAPSHOT_ID' }),
      )
      .rejectsOnce(
        new ResourceNotFoundException({
          message: 'gone',
          $metadata: meta(404),
          Reason: 'SNAPSHOT_NOT_FOUND',
        }),
      )
      .resolves({ VolumeSize: 1, BlockSize: B, Blocks: [] });
    expect(await reader.read('snap-0abc')).toEqual({ status: 'pending' });
    expect(await reader.read('snap-0abc')).toBeUndefined();
    expect(await reader.read('snap-0abc')).toEqual({ status: 'completed' });
  });

  it('gives up waiting at its deadline, naming the snapshot, and tolerates throttled status reads', async () => {
    const clock = new VirtualClock(0);
    let reads = 0;
    const reader = {
      read: async () => {
        reads++;
        if (reads === 2) throw new TransferError('throttled', { retryable: true, throttled: true });
        return { status: 'pending' as const };
      },
    };
    const err = await failure(
      waitForCompletion(
        { client, clock },
        { disk: 'sdc', snapshotId: 'snap-0abc', reader, timeoutMs: 60_000 },
      ),
    );
    expect(err).toBeInstanceOf(EbsSnapshotError);
    expect(err.message).toBe('disk sdc: snapshot snap-0abc is still pending 60 s after CompleteSnapshot');
    expect(clock.now()).toBe(60_000);
    expect(reads).toBeGreaterThan(10);
  });
});

describe('rate limiter', () => {
  it("paces a burst to the rate after one second's worth, on the injected clock", async () => {
    const clock = new VirtualClock(0);
    const bucket = new TokenBucket(clock, 10);
    const at: number[] = [];
    await Promise.all(Array.from({ length: 25 }, () => bucket.take().then(() => at.push(clock.now()))));
    expect(at.filter((t) => t === 0)).toHaveLength(10);
    expect(Math.max(...at)).toBe(1500);
  });

  it('limits PutSnapshotBlock per snapshot and per account, and refuses unknown limits', async () => {
    const clock = new VirtualClock(0);
    // Buckets hold BURST_SECONDS (0.1 s) of their rate: bursts of 2 per snapshot, 3 per account.
    const limiter = new EbsRateLimiter(clock, {
      putSnapshotBlockPerSnapshot: 20,
      putSnapshotBlockPerAccount: 30,
    });
    const done: [string, number][] = [];
    await Promise.all(
      ['snap-a', 'snap-a', 'snap-a', 'snap-b', 'snap-b'].map((id) =>
        limiter.acquire('PutSnapshotBlock', id).then(() => done.push([id, clock.now()])),
      ),
    );
    // snap-a's third request waits for its own bucket; snap-b's second for the account's.
    expect(done.filter(([, t]) => t === 0)).toHaveLength(3);
    expect(Math.max(...done.map(([, t]) => t))).toBeGreaterThanOrEqual(34);
    expect(() => new EbsRateLimiter(clock, { putPerSecond: 5 } as never)).toThrow(
      /unknown EBS rate limit putPerSecond/,
    );
  });
});

describe('LINEAR aggregate', () => {
  it("matches the emulator's independent implementation, from a DigestMap in any write order", () => {
    fc.assert(
      fc.property(
        fc.uniqueArray(fc.integer({ min: 0, max: 200_000 }), { minLength: 0, maxLength: 60 }),
        fc.integer(),
        (indexes, seed) => {
          const map = new DigestMap();
          const byIndex = new Map<number, Buffer>();
          for (const index of indexes) {
            const digest = createHash('sha256').update(`${seed}:${index}`).digest();
            map.set(index, digest);
            byIndex.set(index, digest);
          }
          const ordered = [...byIndex.keys()].sort((a, b) => a - b).map((i) => byIndex.get(i)!);
          expect(map.size).toBe(ordered.length);
          expect(linearAggregateBase64(map.ordered())).toBe(emulatorLinear(ordered));
        },
      ),
    );
  });
});
