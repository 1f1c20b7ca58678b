// A raw disk image on the local filesystem as a replication source.
import { type FileHandle, open } from 'node:fs/promises';
import { TransferError } from '../engine/errors.ts';
import type { DiskSource } from '../engine/ports.ts';

export class FileSource implements DiskSource {
  private constructor(
    readonly name: string,
    readonly sizeBytes: number,
    private readonly fh: FileHandle,
  ) {}

  static async open(path: string): Promise<FileSource> {
    let fh: FileHandle;
    try {
      fh = await open(path, 'r');
    } catch (err) {
      throw new TransferError(`source file:${path} cannot be opened: ${(err as Error).message}`, {
        retryable: false,
        cause: err,
      });
    }
    const stat = await fh.stat();
    if (!stat.isFile() && !stat.isBlockDevice()) {
      await fh.close();
      throw new TransferError(`source file:${path} is not a file or block device`, { retryable: false });
    }
    return new FileSource(`file:${path}`, stat.size, fh);
  }

  async read(offset: number, length: number): Promise<Uint8Array> {
    const buf = Buffer.allocUnsafe(length);
    let done = 0;
    while (done < length) {
      const { bytesRead } = await this.fh.read(buf, done, length - done, offset + done);
      if (bytesRead === 0) {
        throw new TransferError(
          `${this.name}: short read at offset ${offset + done} (disk is ${this.sizeBytes} bytes)`,
          {
            offset: offset + done,
            retryable: false,
          },
        );
      }
      done += bytesRead;
    }
    return buf;
  }

  async close(): Promise<void> {
    await this.fh.close();
  }
}
