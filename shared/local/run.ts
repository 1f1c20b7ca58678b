// Local composition root: a job spec (URIs, change files, parameters) -> adapters -> one engine cycle.
import { z } from 'zod';
import { resolveParams } from '../engine/config.ts';
import { ConfigError } from '../engine/errors.ts';
import type { DiskSource, DiskTarget } from '../engine/ports.ts';
import {
  type DiskJob,
  type ReplicationEvent,
  type ReplicationResult,
  replicate,
} from '../engine/replicate.ts';
import { settleAll } from '../engine/settle.ts';
import { systemClock, systemRandom } from './clock.ts';
import { LocalStateStore } from './state-dir.ts';
import { openSource, openTarget, readChangeFile } from './uris.ts';

export const diskSpecSchema = z.strictObject({
  id: z.string().min(1).max(128),
  source: z.string().min(1),
  target: z.string().min(1),
  /** Path of a change map (JSON extents); absent means a full copy. */
  changed: z.string().min(1).optional(),
});

export const jobSpecSchema = z.strictObject({
  set: z.string().min(1).max(128).default('default'),
  disks: z.array(diskSpecSchema).min(1),
  params: z.record(z.string(), z.unknown()).default({}),
});

export type DiskSpec = z.infer<typeof diskSpecSchema>;
export type JobSpec = z.infer<typeof jobSpecSchema>;

export interface LocalRunOptions {
  readonly stateDir: string;
  readonly onEvent?: (event: ReplicationEvent) => void;
  readonly signal?: AbortSignal;
  /** Wraps each opened target (tests use it to count or break writes). */
  readonly wrapTarget?: (target: DiskTarget, disk: string) => DiskTarget;
  readonly wrapSource?: (source: DiskSource, disk: string) => DiskSource;
}

export function parseJobSpec(value: unknown, origin: string): JobSpec {
  const parsed = jobSpecSchema.safeParse(value);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    const where = issue?.path.length ? ` at ${issue.path.join('.')}` : '';
    throw new ConfigError(`${origin}${where}: ${issue?.message ?? 'invalid job'}`, { setting: origin });
  }
  const ids = new Set<string>();
  for (const d of parsed.data.disks) {
    if (ids.has(d.id)) throw new ConfigError(`${origin}: disk id "${d.id}" appears twice`, { disk: d.id });
    ids.add(d.id);
  }
  return parsed.data;
}

/** Runs one cycle of the job locally. Opens and always closes every adapter. */
export async function runLocalJob(spec: JobSpec, opts: LocalRunOptions): Promise<ReplicationResult> {
  const sources: DiskSource[] = [];
  const targets: DiskTarget[] = [];
  try {
    // Every disk's source opens at once: an NBD handshake is several round trips, and over a WAN
    // link four disks opened one after another would wait four times as long before the first byte.
    const opened = await settleAll(
      spec.disks.map(async (d) => {
        const changed = d.changed === undefined ? undefined : await readChangeFile(d.changed, d.id);
        const rawSource = await openSource(d.source);
        sources.push(rawSource);
        return { d, changed, rawSource };
      }),
    );
    const disks: DiskJob[] = [];
    let blockSize = 0;
    for (const { d, changed, rawSource } of opened) {
      const rawTarget = openTarget(d.target);
      targets.push(rawTarget);
      blockSize = Math.max(blockSize, rawTarget.blockSize);
      disks.push({
        id: d.id,
        source: opts.wrapSource ? opts.wrapSource(rawSource, d.id) : rawSource,
        target: opts.wrapTarget ? opts.wrapTarget(rawTarget, d.id) : rawTarget,
        changed,
      });
    }
    const params = resolveParams(sourceSideParams(spec, blockSize), { targetBlockSize: blockSize });
    return await replicate(
      { set: spec.set, disks, params },
      {
        clock: systemClock,
        random: systemRandom,
        state: new LocalStateStore(opts.stateDir),
        ...(opts.onEvent ? { onEvent: opts.onEvent } : {}),
        ...(opts.signal ? { signal: opts.signal } : {}),
      },
    );
  } finally {
    await Promise.allSettled([...sources.map((s) => s.close()), ...targets.map((t) => t.close())]);
  }
}

/**
 * Toward Ferry nodes the node is the flow control: it measures the link and grants credit from
 * its own adaptive controller. A second controller on this side would steer on latency that
 * includes waiting for credit, so unless the job says otherwise the source keeps a fixed window at
 * the top level and lets the node's credit be the limit.
 */
function sourceSideParams(spec: JobSpec, targetBlockSize: number): Record<string, unknown> {
  const remote = spec.disks.every((d) => d.target.startsWith('ferry://'));
  if (!remote || 'window' in spec.params || 'adaptive' in spec.params) return spec.params;
  const levels = resolveParams(spec.params, { targetBlockSize }).windowLevels;
  return { ...spec.params, window: levels[levels.length - 1], adaptive: false };
}
