// Bytes received from a socket and not yet parsed: a FIFO of the buffers as they arrived. Parsers
// take views when one buffer holds what they ask for and copy only across buffer boundaries, so a
// payload costs at most one copy. Used by the NBD client and Ferry's framed protocol.

export class ByteQueue {
  private readonly chunks: Buffer[] = [];
  /** Bytes of chunks[0] already consumed. */
  private head = 0;
  length = 0;

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.length += chunk.length;
  }

  /** The next four bytes as a big-endian integer, without consuming them (at least four are queued). */
  peekUInt32BE(): number {
    const first = this.chunks[0]!;
    if (first.length - this.head >= 4) return first.readUInt32BE(this.head);
    const bytes = Buffer.alloc(4);
    this.copyOut(bytes, 0, 4);
    return bytes.readUInt32BE(0);
  }

  /** Removes `size` bytes; a view into the received buffer when one buffer holds them all. */
  take(size: number): Buffer {
    const first = this.chunks[0];
    if (first !== undefined && first.length - this.head >= size) {
      const view = first.subarray(this.head, this.head + size);
      this.skip(size);
      return view;
    }
    const bytes = Buffer.allocUnsafe(size);
    this.copyTo(bytes, 0, size);
    return bytes;
  }

  /** Removes `size` bytes into `target` at `at`. */
  copyTo(target: Uint8Array, at: number, size: number): void {
    this.copyOut(target, at, size);
    this.skip(size);
  }

  /** Removes `size` bytes unread. */
  skip(size: number): void {
    this.length -= size;
    while (size > 0) {
      const available = this.chunks[0]!.length - this.head;
      if (size < available) {
        this.head += size;
        return;
      }
      size -= available;
      this.chunks.shift();
      this.head = 0;
    }
  }

  private copyOut(target: Uint8Array, at: number, size: number): void {
    let index = 0;
    let from = this.head;
    for (let done = 0; done < size; ) {
      const chunk = this.chunks[index]!;
      const n = Math.min(chunk.length - from, size - done);
      target.set(chunk.subarray(from, from + n), at + done);
      done += n;
      from += n;
      if (from === chunk.length) {
        index++;
        from = 0;
      }
    }
  }
}
