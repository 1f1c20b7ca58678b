// The file target: verified chunk writes, staged increments that leave the last image intact until
// commit, idempotent commit, and manifest verification that locates corruption.
import { mkdtemp, open, readFile, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import type { Descriptor } from '../../shared/engine/descriptors.ts';
import { IntegrityError } from '../../shared/engine/errors.ts';
import type { Extent } from '../../shared/engine/extents.ts';
import { sha256Hex } from '../../shared/engine/integrity.ts';
import { MiB } from '../../shared/engine/units.ts';
import { FileTarget, verifyFileImage } from '../../shared/local/file-target.ts';
import { randomBytes } from '../support/memory.ts';

const SIZE = 4 * MiB;

function descriptor(seq: number, extents: Extent[]): Descriptor {
  const first = extents[0]!;
  const last = extents[extents.length - 1]!;
  return {
    seq,
    offset: first.offset,
    length: last.offset + last.length - first.offset,
    extents,
    bytes: extents.reduce((s, e) => s + e.length, 0),
  };
}

const commitOf = (extents: Extent[]) => ({ chunks: 1, bytes: 0, aggregateSha256: '', extents });

async function fullImage(path: string, data: Uint8Array): Promise<string> {
  const t = new FileTarget(path);
  await t.open(data.length, 'full', false);
  for (let off = 0, seq = 0; off < data.length; off += MiB, seq++) {
    const chunk = data.subarray(off, off + MiB);
    await t.writeChunk(descriptor(seq, [{ offset: off, length: chunk.length }]), chunk, sha256Hex(chunk));
  }
  const ref = await t.commit(commitOf([{ offset: 0, length: data.length }]));
  await t.afterPublish();
  return ref;
}

describe('FileTarget', () => {
  it('writes a full copy that verifies against its manifest', async () => {
    const path = join(await mkdtemp(join(tmpdir(), 'ferry-ft-')), 'disk.img');
    const data = randomBytes(SIZE, 4);
    const ref = await fullImage(path, data);
    expect(Buffer.from(await readFile(path)).equals(Buffer.from(data))).toBe(true);
    const report = await verifyFileImage(path, ref);
    expect(report).toMatchObject({ ok: true, regions: 4, mismatches: [] });
  });

  it('gives a sparse full copy the same manifest as hashing its image region by region', async () => {
    // A region covered whole by one chunk, regions one chunk touched in part (hashed as written, the
    // rest zeros), a region shared by two chunks (read at commit), holes no chunk touched (zeros, not
    // read), and a short last region: a disk of 5.5 MiB.
    const size = 5 * MiB + MiB / 2;
    const image = new Uint8Array(size);
    const written: Extent[][] = [
      [{ offset: 0, length: MiB }],
      [
        { offset: MiB + 4096, length: 8192 },
        { offset: 2 * MiB - 4096, length: 4096 },
      ],
      [{ offset: 2 * MiB, length: 4096 }],
      [{ offset: 3 * MiB + 4096, length: 4096 }],
      [{ offset: 3 * MiB + MiB / 2, length: 8192 }],
      [{ offset: 5 * MiB, length: MiB / 2 }],
    ];
    const path = join(await mkdtemp(join(tmpdir(), 'ferry-ft-')), 'disk.img');
    const t = new FileTarget(path);
    await t.open(size, 'full', false);
    for (const [seq, extents] of written.entries()) {
      const d = descriptor(seq, extents);
      const data = randomBytes(d.bytes, seq + 10);
      let at = 0;
      for (const e of extents) {
        image.set(data.subarray(at, at + e.length), e.offset);
        at += e.length;
      }
      await t.writeChunk(d, data, sha256Hex(data));
    }
    const ref = await t.commit(commitOf(written.flat()));
    await t.afterPublish();

    expect(Buffer.from(await readFile(path)).equals(Buffer.from(image))).toBe(true);
    expect(await verifyFileImage(path, ref)).toMatchObject({ ok: true, regions: 6, mismatches: [] });
    const manifest = await readFile(`${path}.ferry-manifest`);
    for (let r = 0; r < 6; r++) {
      const region = image.subarray(r * MiB, Math.min((r + 1) * MiB, size));
      expect(manifest.subarray(r * 32, r * 32 + 32).toString('hex'), `region ${r}`).toBe(sha256Hex(region));
    }
  });

  it('re-hashes at commit a region that a chunk written before a resume shares with one written after', async () => {
    const path = join(await mkdtemp(join(tmpdir(), 'ferry-ft-')), 'disk.img');
    const image = new Uint8Array(SIZE);
    const chunks = [
      descriptor(0, [{ offset: MiB, length: 8192 }]),
      descriptor(1, [{ offset: MiB + MiB / 2, length: 4096 }]),
    ];
    const write = async (t: FileTarget, d: Descriptor) => {
      const data = randomBytes(d.bytes, d.seq + 20);
      image.set(data, d.offset);
      await t.writeChunk(d, data, sha256Hex(data));
    };
    const first = new FileTarget(path);
    await first.open(SIZE, 'full', false);
    await write(first, chunks[0]!);
    await first.close(); // the run dies here

    const resumed = new FileTarget(path);
    await resumed.open(SIZE, 'full', true);
    await write(resumed, chunks[1]!);
    const ref = await resumed.commit(commitOf(chunks.flatMap((d) => d.extents)));
    await resumed.afterPublish();

    expect(await verifyFileImage(path, ref)).toMatchObject({ ok: true, mismatches: [] });
    const manifest = await readFile(`${path}.ferry-manifest`);
    expect(manifest.subarray(32, 64).toString('hex')).toBe(sha256Hex(image.subarray(MiB, 2 * MiB)));
  });

  it('rejects a chunk whose checksum does not match, naming the offset', async () => {
    const path = join(await mkdtemp(join(tmpdir(), 'ferry-ft-')), 'disk.img');
    const t = new FileTarget(path);
    await t.open(SIZE, 'full', false);
    const chunk = randomBytes(8192, 1);
    const err = await t
      .writeChunk(descriptor(0, [{ offset: 8192, length: 8192 }]), chunk, sha256Hex(new Uint8Array(8192)))
      .catch((e) => e);
    expect(err).toBeInstanceOf(IntegrityError);
    expect(err.message).toMatch(/offset 8192/);
    await t.close();
  });

  it('stages an increment: the last image is untouched until commit, and commit is idempotent', async () => {
    const path = join(await mkdtemp(join(tmpdir(), 'ferry-ft-')), 'disk.img');
    const base = randomBytes(SIZE, 5);
    await fullImage(path, base);
    const changed: Extent[] = [
      { offset: 4096, length: 4096 },
      { offset: 2 * MiB, length: 8192 },
    ];
    const payload = Buffer.concat([Buffer.from(randomBytes(4096, 6)), Buffer.alloc(8192)]); // second extent zeroed
    const d = descriptor(0, changed);

    // Act 1: write, then "crash" (close without commit).
    const t1 = new FileTarget(path);
    await t1.open(SIZE, 'incremental', false);
    await t1.writeChunk(d, payload, sha256Hex(payload));
    await t1.close();
    expect(Buffer.from(await readFile(path)).equals(Buffer.from(base))).toBe(true);

    // Act 2: resume keeps the staged chunk; commit twice (a crash between commit and publish).
    const t2 = new FileTarget(path);
    await t2.open(SIZE, 'incremental', true);
    const ref1 = await t2.commit(commitOf(changed));
    const ref2 = await t2.commit(commitOf(changed));
    await t2.afterPublish();

    // Assess
    const expected = Buffer.from(base);
    Buffer.from(payload.subarray(0, 4096)).copy(expected, 4096);
    expected.fill(0, 2 * MiB, 2 * MiB + 8192);
    expect(Buffer.from(await readFile(path)).equals(expected)).toBe(true);
    expect(ref2).toBe(ref1);
    expect((await verifyFileImage(path, ref1)).ok).toBe(true);
    await expect(stat(`${path}.ferry-staging`)).rejects.toThrow();
  });

  it('locates corruption of a published image to its region', async () => {
    const path = join(await mkdtemp(join(tmpdir(), 'ferry-ft-')), 'disk.img');
    const ref = await fullImage(path, randomBytes(SIZE, 8));
    const fh = await open(path, 'r+');
    await fh.write(Buffer.from([1, 2, 3]), 0, 3, 3 * MiB + 17);
    await fh.close();
    const report = await verifyFileImage(path, ref);
    expect(report.ok).toBe(false);
    expect(report.mismatches).toEqual([3 * MiB]);
  });

  it('refuses an incremental without a base image, or with one of another size', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'ferry-ft-'));
    await expect(new FileTarget(join(dir, 'none.img')).open(SIZE, 'incremental', false)).rejects.toThrow(
      /run a full copy first/,
    );
    await writeFile(join(dir, 'small.img'), Buffer.alloc(1024));
    await expect(new FileTarget(join(dir, 'small.img')).open(SIZE, 'incremental', false)).rejects.toThrow(
      /1024 bytes but the source disk is 4194304/,
    );
  });
});
