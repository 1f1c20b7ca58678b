// Questions a source asks a replication node about one disk's history, each on a connection of its
// own, authenticated like replication: a publication (settle and prune), and point-in-time
// recovery (whether a checkpoint can be had, its manifest, its image as a paced stream).
import { createHash, randomBytes } from 'node:crypto';
import { errorMessage, FerryError, TransferError } from '../engine/errors.ts';
import type { PublishedCheckpoint } from '../engine/ports.ts';
import type { SourceSecurity } from './join.ts';
import {
  encodeFrame,
  type Frame,
  type FrameOf,
  FrameReader,
  MAX_IMAGE_DATA_BYTES,
  MAX_RECOVERY_LATER,
  NO_TOKEN,
  PROTOCOL_VERSION,
  type RecoveryAsk,
  SESSION_ID_BYTES,
} from './protocol.ts';
import { NodeConnector } from './transport.ts';
import type { FerryUri } from './uri.ts';

// Connect plus the node's first answer to a question that reads no data (prune, plan): as for a
// replication HELLO (remote-target.ts).
const DEFAULT_CONNECT_TIMEOUT_MS = 10_000;
// A node materialising a checkpoint reads the disk up to three times (copy, history, verify) before
// it answers: one slower than this (bytes per second) is stuck. The same floor as `ferry verify`.
const MATERIALISE_MIN_RATE = 20 * 1024 * 1024;
const MATERIALISE_PASSES = 3;
// Between two frames of a stream the node reads at most a MiB: a minute of silence is a stuck node.
const FRAME_IDLE_MS = 60_000;
// Frames received and not yet handled before the socket stops being read: with IMAGE_DATA frames of
// at most 256 KiB, about a MiB held here while the file is written.
const MAX_QUEUED_FRAMES = 4;
// Questions that read no data are retried like opening a disk: a node restarting, or busy settling.
const ASK_ATTEMPTS = 4;
const RETRY_BASE_MS = 100;

/** A checkpoint of one disk, and the later checkpoints of the catalog that wrote it (ascending). */
export interface NodeCheckpoint {
  readonly id: string;
  readonly sequence: number;
  readonly sizeBytes: number;
  readonly targetRef: string;
  readonly later: readonly { readonly id: string; readonly sequence: number }[];
}

/** A checkpoint the node will not give, with its reasons (see the RECOVERY frame). */
export class NodeRecoveryRefused extends FerryError {
  /** Why, naming the disk but not the checkpoint (for a listing). */
  readonly reason: string;

  constructor(message: string, reason: string, disk: string) {
    super(message, { disk });
    this.name = 'NodeRecoveryRefused';
    this.reason = reason;
  }
}

export class NodeClient {
  readonly name: string;
  private readonly connector: NodeConnector;
  private readonly connectTimeoutMs: number;

  constructor(
    private readonly uri: FerryUri,
    security: SourceSecurity,
    opts: { readonly connectTimeoutMs?: number } = {},
  ) {
    this.name = uri.name;
    this.connector = new NodeConnector(uri, security);
    this.connectTimeoutMs = opts.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS;
  }

  /**
   * Tells the node that the disk's cycle `published.id` became checkpoint `published.sequence` (a
   * commit of it the node never heard the fate of is settled, its history kept), and asks it to
   * prune the disk's history up to `keepFrom` (0: none). Resolves with the node's PRUNED answer.
   */
  async published(published: PublishedCheckpoint, keepFrom: number): Promise<FrameOf<'pruned'>> {
    return this.retried(async () => {
      let answer: FrameOf<'pruned'> | undefined;
      await this.ask(
        { ...this.hello(published.id, 0), published: { sequence: published.sequence, keepFrom } },
        this.connectTimeoutMs,
        async (frame) => {
          answer = this.expect(frame, 'pruned');
          return true;
        },
      );
      return answer!;
    });
  }

  /**
   * Whether the node can give the checkpoint's image of this disk (`plan`: and its manifest, which
   * the caller checks against the catalog before trusting it). Rejects with NodeRecoveryRefused
   * when the node says it cannot, with a TransferError when it cannot be asked. `maxManifestBytes`
   * bounds what is accepted as the manifest.
   */
  async plan(
    cp: NodeCheckpoint,
    mode: 'check' | 'plan',
    maxManifestBytes = 0,
  ): Promise<{ sizeBytes: number; manifest: Buffer | undefined }> {
    return this.retried(async () => {
      let sizeBytes = 0;
      let manifest: Buffer | undefined;
      let at = 0;
      await this.ask(this.recoverHello(cp, mode), this.connectTimeoutMs, async (frame) => {
        if (frame.type === 'recovery') {
          sizeBytes = this.accepted(frame, cp);
          if (mode === 'check') return true;
          manifest = Buffer.alloc(0);
          return false;
        }
        if (manifest === undefined) throw this.unexpected(frame, 'RECOVERY');
        if (frame.type === 'image-end') {
          this.checkEnd(frame, at);
          return true;
        }
        const piece = this.data(this.expect(frame, 'image-data'), 'manifest', at, maxManifestBytes);
        manifest = Buffer.concat([manifest, piece.data]);
        at = piece.offset + piece.data.length;
        return false;
      });
      return { sizeBytes, manifest };
    });
  }

  /**
   * Has the node materialise the checkpoint's image and stream its non-zero data: `write` is called
   * once per piece, in offset order, each checked (SHA-256, bounds, order) before it is handed over;
   * the next frames wait while it runs. `onReady` is told the disk's size before the first piece.
   * Not retried: the caller starts its file over. Rejects as `plan` does.
   */
  async stream(
    cp: NodeCheckpoint,
    onReady: (sizeBytes: number) => Promise<void>,
    write: (offset: number, data: Uint8Array) => Promise<void>,
  ): Promise<{ frames: number; bytes: number }> {
    let sizeBytes: number | undefined;
    let end = 0;
    let sent = { frames: 0, bytes: 0 };
    const firstMs =
      this.connectTimeoutMs + Math.ceil(((MATERIALISE_PASSES * cp.sizeBytes) / MATERIALISE_MIN_RATE) * 1000);
    await this.ask(this.recoverHello(cp, 'stream'), firstMs, async (frame) => {
      if (frame.type === 'recovery') {
        sizeBytes = this.accepted(frame, cp);
        await onReady(sizeBytes);
        return false;
      }
      if (sizeBytes === undefined) throw this.unexpected(frame, 'RECOVERY');
      if (frame.type === 'image-end') {
        this.checkEnd(frame, sent.bytes, sent.frames);
        return true;
      }
      const piece = this.data(this.expect(frame, 'image-data'), 'image', end, sizeBytes);
      await write(piece.offset, piece.data);
      end = piece.offset + piece.data.length;
      sent = { frames: sent.frames + 1, bytes: sent.bytes + piece.data.length };
      return false;
    });
    return sent;
  }

  // ---- One question ----

  private hello(cycle: string, sizeBytes: number): FrameOf<'hello'> {
    return {
      type: 'hello',
      version: PROTOCOL_VERSION,
      disk: this.uri.disk,
      sizeBytes,
      kind: 'full',
      resume: false,
      session: randomBytes(SESSION_ID_BYTES).toString('hex'),
      token: NO_TOKEN,
      cycle,
    };
  }

  private recoverHello(cp: NodeCheckpoint, mode: RecoveryAsk['mode']): FrameOf<'hello'> {
    if (cp.later.length > MAX_RECOVERY_LATER) {
      throw new NodeRecoveryRefused(
        `checkpoint ${cp.id}, disk ${this.uri.disk}: ${cp.later.length} later checkpoints wrote it, more than a node is asked about (${MAX_RECOVERY_LATER})`,
        `disk ${this.uri.disk}: more than ${MAX_RECOVERY_LATER} later checkpoints`,
        this.uri.disk,
      );
    }
    return {
      ...this.hello(cp.id, cp.sizeBytes),
      recover: { mode, sequence: cp.sequence, targetRef: cp.targetRef, later: cp.later },
    };
  }

  /** A RECOVERY answer: the disk's size when the node can give the checkpoint, else why not. */
  private accepted(frame: FrameOf<'recovery'>, cp: NodeCheckpoint): number {
    if (!frame.ok) throw new NodeRecoveryRefused(frame.message, frame.reason, this.uri.disk);
    if (frame.sizeBytes !== cp.sizeBytes) {
      throw this.transferError(
        `the node plans a ${frame.sizeBytes}-byte image of checkpoint ${cp.id}, whose disk is ${cp.sizeBytes} bytes`,
        false,
      );
    }
    return frame.sizeBytes;
  }

  /** An IMAGE_DATA frame of `part`, checked: its digest, that it starts at or after `from` and ends by `limit`. */
  private data(
    frame: FrameOf<'image-data'>,
    part: 'manifest' | 'image',
    from: number,
    limit: number,
  ): FrameOf<'image-data'> {
    const where = `${part} data at offset ${frame.offset}`;
    if (frame.part !== part) throw this.transferError(`the node sent ${frame.part} data, not ${part}`, false);
    if (frame.data.length > MAX_IMAGE_DATA_BYTES || frame.offset < from) {
      throw this.transferError(`${where} overlaps what came before it (at ${from})`, false);
    }
    if (part === 'manifest' && frame.offset !== from) {
      throw this.transferError(`${where} leaves a gap after offset ${from}`, false);
    }
    if (frame.offset + frame.data.length > limit) {
      throw this.transferError(`${where} (${frame.data.length} bytes) ends past ${limit} bytes`, false);
    }
    if (createHash('sha256').update(frame.data).digest('hex') !== frame.sha256) {
      throw this.transferError(`${where} arrived with a checksum mismatch`, true);
    }
    return frame;
  }

  private checkEnd(frame: FrameOf<'image-end'>, bytes: number, frames?: number): void {
    if (frame.bytes !== bytes || (frames !== undefined && frame.frames !== frames)) {
      throw this.transferError(
        `the node says it sent ${frame.frames} frames of ${frame.bytes} bytes; ${frames ?? '?'} of ${bytes} arrived`,
        true,
      );
    }
  }

  private expect<T extends Frame['type']>(frame: Frame, type: T): FrameOf<T> {
    if (frame.type !== type) throw this.unexpected(frame, type.toUpperCase().replace('-', '_'));
    return frame as FrameOf<T>;
  }

  private unexpected(frame: Frame, wanted: string): TransferError {
    return this.transferError(`the node answered with ${frame.type.toUpperCase()}, not ${wanted}`, false);
  }

  /**
   * Sends `hello` on a new connection and hands every frame of the answer to `handle`, one at a
   * time, until it returns true (the answer is complete): the socket is not read while frames wait
   * (memory stays bounded, and the node's sends are paced by it). Rejects on an ERROR, a malformed
   * frame, a connection lost first, or no frame within `firstMs` (then FRAME_IDLE_MS between frames).
   */
  private ask(
    hello: FrameOf<'hello'>,
    firstMs: number,
    handle: (frame: Frame) => Promise<boolean>,
  ): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const socket = this.connector.connect();
      socket.setNoDelay(true);
      let finished = false;
      let queued = 0;
      let chain = Promise.resolve();
      let lastError: Error | undefined;
      let timer: NodeJS.Timeout | undefined;
      const fail = (err: unknown) => {
        if (finished) return;
        finished = true;
        clearTimeout(timer);
        socket.destroy();
        reject(err);
      };
      const arm = (ms: number) => {
        clearTimeout(timer);
        timer = setTimeout(
          () => fail(this.transferError(`no answer from the node within ${ms} ms`, true)),
          ms,
        );
      };
      arm(firstMs);
      const reader = new FrameReader({
        from: 'node',
        onFrame: (frame) => {
          if (frame.type === 'error') {
            fail(this.transferError(`the node refused: ${frame.reason}`, frame.retryable));
            return;
          }
          if (++queued >= MAX_QUEUED_FRAMES) socket.pause();
          chain = chain
            .then(async () => {
              if (finished) return;
              const complete = await handle(frame);
              if (--queued < MAX_QUEUED_FRAMES && !socket.destroyed) socket.resume();
              arm(FRAME_IDLE_MS);
              if (complete && !finished) {
                finished = true;
                clearTimeout(timer);
                socket.end();
                resolve();
              }
            })
            .catch(fail);
        },
      });
      socket.on('connect', () => socket.write(encodeFrame(hello)));
      socket.on('data', (buf: Buffer) => {
        try {
          reader.push(buf);
        } catch (err) {
          if (!socket.destroyed)
            socket.end(encodeFrame({ type: 'error', retryable: false, reason: errorMessage(err) }));
          fail(this.transferError(`malformed frame from the node: ${errorMessage(err)}`, false));
        }
      });
      socket.on('error', (err) => {
        lastError ??= this.connector.explain(err);
      });
      socket.on('close', () => {
        // Frames still being handled may complete the answer; only then is an early close a failure.
        void chain.then(() => {
          if (lastError instanceof TransferError) fail(lastError);
          else
            fail(
              this.transferError(
                lastError ? errorMessage(lastError) : 'the node closed the connection before it answered',
                true,
                lastError,
              ),
            );
        });
      });
    });
  }

  /** Retries a question that reads no data while the failure is retryable. */
  private async retried<T>(op: () => Promise<T>): Promise<T> {
    for (let attempt = 1; ; attempt++) {
      try {
        return await op();
      } catch (err) {
        if (!(err instanceof TransferError && err.retryable) || attempt >= ASK_ATTEMPTS) throw err;
        await new Promise((r) => setTimeout(r, Math.floor(Math.random() * RETRY_BASE_MS * 2 ** attempt)));
      }
    }
  }

  private transferError(message: string, retryable: boolean, cause?: unknown): TransferError {
    return new TransferError(`${this.name}: ${message}`, {
      retryable,
      ...(cause === undefined ? {} : { cause }),
    });
  }
}
