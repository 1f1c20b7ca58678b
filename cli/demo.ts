// `ferry demo`: a multi-disk workload with fragmented changes, a base copy and two incremental
// cycles through the real engine and local adapters, each target verified bit for bit.
import { mkdir, mkdtemp, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { ReplicationResult } from '../shared/engine/replicate.ts';
import { formatBytes, MiB } from '../shared/engine/units.ts';
import { verifyFileImage } from '../shared/local/file-target.ts';
import { createDiskImage, firstDifference, mutateDisk } from '../shared/local/workload.ts';
import { createReporter } from './progress.ts';
import { runLocalJob } from './run.ts';

// Three disks of different sizes so fairness shows: a small one finishes alongside the big one.
const DISKS = [
  { id: 'os', size: 192 * MiB, seed: 1 },
  { id: 'data', size: 320 * MiB, seed: 2 },
  { id: 'logs', size: 96 * MiB, seed: 3 },
];
const INCREMENTAL_CYCLES = 2;

export interface DemoOptions {
  dir?: string | undefined;
  json: boolean;
  scale: number;
  log: (line: string) => void;
}

interface CycleReport {
  cycle: number;
  checkpoint: string;
  kind: string;
  changedExtents: number;
  bytesSent: number;
  seconds: number;
  verified: boolean;
}

export async function runDemo(opts: DemoOptions): Promise<boolean> {
  const dir = opts.dir ?? (await mkdtemp(join(tmpdir(), 'ferry-demo-')));
  await mkdir(join(dir, 'source'), { recursive: true });
  await mkdir(join(dir, 'replica'), { recursive: true });
  const stateDir = join(dir, 'state');
  const log = opts.json ? () => {} : opts.log;
  const disks = DISKS.map((d) => ({
    ...d,
    size: Math.max(MiB, Math.round((d.size * opts.scale) / MiB) * MiB),
  }));

  log(`ferry demo in ${dir}`);
  log(
    `creating ${disks.length} thin source disks: ${disks.map((d) => `${d.id} ${formatBytes(d.size)}`).join(', ')}`,
  );
  for (const d of disks)
    await createDiskImage(join(dir, 'source', `${d.id}.img`), { size: d.size, seed: d.seed });

  const reports: CycleReport[] = [];
  for (let cycle = 0; cycle <= INCREMENTAL_CYCLES; cycle++) {
    const changes: (string | undefined)[] = [];
    let changedExtents = 0;
    if (cycle > 0) {
      log('');
      log(
        `cycle ${cycle}: the guests write — thousands of scattered 4 KiB blocks, a few 4 MiB runs, some zeroed blocks`,
      );
      for (const d of disks) {
        const extents = await mutateDisk(join(dir, 'source', `${d.id}.img`), {
          size: d.size,
          seed: d.seed * 100 + cycle,
        });
        const file = join(dir, `changes-${d.id}-${cycle}.json`);
        await writeFile(file, JSON.stringify(extents));
        changes.push(file);
        changedExtents += extents.length;
      }
    } else {
      log('');
      log('cycle 0: base copy of every disk (holes are skipped, data is hashed chunk by chunk)');
    }

    const reporter = createReporter(opts.json ? 'silent' : process.stderr.isTTY ? 'tty' : 'plain', log);
    let result: ReplicationResult;
    try {
      result = await runLocalJob(
        {
          set: 'demo',
          params: {},
          disks: disks.map((d, i) => ({
            id: d.id,
            source: `file:${join(dir, 'source', `${d.id}.img`)}`,
            target: `file:${join(dir, 'replica', `${d.id}.img`)}`,
            ...(changes[i] ? { changed: changes[i] } : {}),
          })),
        },
        { stateDir, onEvent: (e) => reporter.onEvent(e) },
      );
    } finally {
      reporter.stop();
    }

    // Independent proof: compare every replica with its source byte for byte, and re-hash it
    // against the manifest the checkpoint recorded.
    let verified = true;
    for (const d of disks) {
      const src = join(dir, 'source', `${d.id}.img`);
      const dst = join(dir, 'replica', `${d.id}.img`);
      const diff = await firstDifference(src, dst);
      const ref = result.checkpoint.disks.find((x) => x.disk === d.id)?.targetRef;
      const manifest = await verifyFileImage(dst, ref);
      if (diff !== undefined || !manifest.ok) {
        verified = false;
        log(
          `  disk ${d.id}: MISMATCH${diff !== undefined ? ` at offset ${diff}` : ' against the checkpoint manifest'}`,
        );
      }
    }
    const sent = result.disks.reduce((s, d) => s + d.bytesSent, 0);
    const seconds = result.elapsedMs / 1000;
    reports.push({
      cycle,
      checkpoint: result.checkpoint.id,
      kind: cycle === 0 ? 'full' : 'incremental',
      changedExtents,
      bytesSent: sent,
      seconds,
      verified,
    });
    log(
      `checkpoint ${result.checkpoint.id}: ${formatBytes(sent)} sent in ${seconds.toFixed(1)} s` +
        `${changedExtents ? ` for ${changedExtents} changed extents reported (overlapping ones merged before planning)` : ''} — replicas ${verified ? 'bit-identical to sources ✓' : 'DIFFER ✗'}`,
    );
    if (!verified) break;
  }

  const ok = reports.length === INCREMENTAL_CYCLES + 1 && reports.every((r) => r.verified);
  if (opts.json) opts.log(JSON.stringify({ dir, ok, cycles: reports }, null, 2));
  else {
    log('');
    log(ok ? `demo passed: ${reports.length} checkpoints published and verified.` : 'demo FAILED');
    log(`see them with: npx ferry checkpoints --state ${stateDir}`);
  }
  return ok;
}
