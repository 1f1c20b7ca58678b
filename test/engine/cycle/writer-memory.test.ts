// The chunk writer's memory bound: large chunks go fewer at a time, never none.
import { describe, expect, it } from 'vitest';
import { batchConcurrency, WRITER_BUFFER_BYTES } from '../../../shared/engine/cycle/writer.ts';

const MiB = 1024 * 1024;

describe('batchConcurrency', () => {
  it('keeps the configured concurrency for 1 MiB chunks', () => {
    expect(batchConcurrency({ concurrency: 10 }, MiB)).toBe(10);
  });

  it('bounds the bytes held at once by the buffer for large chunks', () => {
    // 64 MiB chunks under the default 256 MiB buffer: four at a time.
    expect(batchConcurrency({ concurrency: 10 }, 64 * MiB)).toBe(4);
    expect(4 * 64 * MiB).toBeLessThanOrEqual(WRITER_BUFFER_BYTES);
    expect(batchConcurrency({ concurrency: 10, bufferBytes: 96 * MiB }, 32 * MiB)).toBe(3);
  });

  it('always writes at least one chunk, even one larger than the buffer', () => {
    expect(batchConcurrency({ concurrency: 10, bufferBytes: 8 * MiB }, 64 * MiB)).toBe(1);
  });

  it('an empty batch keeps the configured value', () => {
    expect(batchConcurrency({ concurrency: 7 }, 0)).toBe(7);
  });
});
