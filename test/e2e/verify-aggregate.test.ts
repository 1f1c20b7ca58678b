// `ferry verify` checks a checkpoint disk by the aggregate algorithm it names: a freshly published
// one (ferry-chunk-sha256) and one from before the name are checked; an aggregate another publisher
// computed (ebs-linear-sha256) is reported NOT CHECKED, naming the disk, checkpoint and algorithm.
import { mkdtemp, readFile, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import type { RecoveryCheckpoint } from '../../shared/engine/ports.ts';
import type { ReplicationResult } from '../../shared/engine/replicate.ts';
import { MiB } from '../../shared/engine/units.ts';
import { createDiskImage } from '../../shared/local/workload.ts';
import { ferry } from '../support/ferry-cli.ts';

interface VerifyJson {
  checkpoint: string;
  disks: { disk: string; aggregate: unknown; ok: boolean; unchecked: boolean; reason: string }[];
}

describe('ferry verify and the aggregate a checkpoint names', () => {
  it('checks a fresh and a legacy entry by name, and reports an algorithm it cannot check', async () => {
    // Prepare: one disk replicated into a file image; its catalog entry.
    const dir = await mkdtemp(join(tmpdir(), 'ferry-verify-aggregate-'));
    const src = join(dir, 'os.img');
    const state = join(dir, 'state');
    await createDiskImage(src, { size: 4 * MiB, seed: 31 });
    const replicated = await ferry([
      'replicate',
      '--source',
      `file:${src}`,
      '--target',
      `file:${join(dir, 'os.dr')}`,
      '--state',
      state,
      '--set',
      'web',
      '--disk',
      'os',
      '--json',
    ]);
    expect(replicated.code, replicated.stderr).toBe(0);
    const published = (JSON.parse(replicated.stdout) as ReplicationResult).checkpoint.disks[0]!.aggregate;
    const entry = join(state, 'catalog', 'web', '00000001.json');
    const cp = JSON.parse(await readFile(entry, 'utf8')) as RecoveryCheckpoint;
    const verify = async () => {
      const r = await ferry(['verify', '--state', state, '--set', 'web', '--json']);
      return { code: r.code, report: JSON.parse(r.stdout) as VerifyJson };
    };

    // Act / Assess: as published, the entry names the engine's algorithm and verify checks it.
    expect(cp.disks[0]!.aggregate).toEqual(published);
    expect(published.algorithm).toBe('ferry-chunk-sha256');
    const fresh = await verify();
    expect(fresh.code).toBe(0);
    expect(fresh.report.disks).toEqual([
      expect.objectContaining({ disk: 'os', aggregate: published, ok: true, unchecked: false }),
    ]);

    // Act / Assess: the same entry as written before aggregates were named reads and checks the same.
    const { aggregate, ...disk } = cp.disks[0]!;
    await writeFile(entry, JSON.stringify({ ...cp, disks: [{ ...disk, aggregateSha256: aggregate.value }] }));
    const legacy = await verify();
    expect(legacy.code).toBe(0);
    expect(legacy.report.disks).toEqual([
      expect.objectContaining({ aggregate: published, ok: true, unchecked: false }),
    ]);

    // Act / Assess: the same value under EBS's LINEAR name is not compared, and said so.
    const linear = { ...aggregate, algorithm: 'ebs-linear-sha256' };
    await writeFile(entry, JSON.stringify({ ...cp, disks: [{ ...disk, aggregate: linear }] }));
    const other = await ferry(['verify', '--state', state, '--set', 'web']);
    expect(other.stdout).toBe(
      'disk os: NOT CHECKED (disk os of checkpoint web#1 records an aggregate of algorithm ' +
        'ebs-linear-sha256, which ferry verify cannot check (it checks ferry-chunk-sha256 only))\n',
    );
    expect(other.code).toBe(1);
    expect((await verify()).report.disks).toEqual([
      expect.objectContaining({ aggregate: linear, ok: false, unchecked: true }),
    ]);
  });
});
