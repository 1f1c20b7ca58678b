// Which checkpoint an operator means: `latest`, a number or id, or a time (the newest checkpoint
// created at or before it). The same rule wherever a checkpoint is recovered.
import { ConfigError } from './errors.ts';
import type { RecoveryCheckpoint } from './ports.ts';

export interface CheckpointChoice {
  /** `latest`, a sequence number (`3`) or a checkpoint id (`erp#3`). */
  readonly checkpoint?: string | undefined;
  /** A time as ISO 8601 (`2026-12-05T10:00:00Z`): the newest checkpoint created at or before it. */
  readonly at?: string | undefined;
}

/**
 * The checkpoint of `set` the choice names, from its readable catalog entries. Refuses, naming what
 * exists, a choice that matches none, and both a checkpoint and a time at once.
 */
export function selectCheckpoint(
  set: string,
  catalog: readonly RecoveryCheckpoint[],
  choice: CheckpointChoice,
): RecoveryCheckpoint {
  if (choice.checkpoint !== undefined && choice.at !== undefined) {
    throw new ConfigError('give --checkpoint or --at, not both', { setting: 'checkpoint' });
  }
  const sorted = [...catalog].sort((a, b) => a.sequence - b.sequence);
  const oldest = sorted[0];
  const latest = sorted[sorted.length - 1];
  if (oldest === undefined || latest === undefined) {
    throw new ConfigError(`set ${set} has no checkpoint`, { setting: 'set' });
  }
  const held = `set ${set} has checkpoints ${oldest.id} (${oldest.createdAt}) to ${latest.id} (${latest.createdAt})`;
  if (choice.at !== undefined) {
    const at = parseTime(choice.at);
    const found = sorted.filter((c) => Date.parse(c.createdAt) <= at).pop();
    if (found === undefined) {
      throw new ConfigError(`no checkpoint at or before ${choice.at}: ${held}`, { setting: 'at' });
    }
    return found;
  }
  const wanted = choice.checkpoint ?? 'latest';
  if (wanted === 'latest') return latest;
  const found = /^\d+$/.test(wanted)
    ? sorted.find((c) => c.sequence === Number(wanted))
    : sorted.find((c) => c.id === wanted);
  if (found === undefined) {
    throw new ConfigError(`checkpoint ${wanted} is not in the catalog: ${held}`, { setting: 'checkpoint' });
  }
  return found;
}

/** An ISO 8601 date and time; a bare date or a local time is refused (its zone would be a guess). */
function parseTime(text: string): number {
  const iso = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:\d{2})$/;
  const at = iso.test(text) ? Date.parse(text) : Number.NaN;
  if (Number.isNaN(at)) {
    throw new ConfigError(
      `--at ${JSON.stringify(text)}: give a time as ISO 8601 with its zone, e.g. 2026-12-05T10:00:00Z`,
      { setting: 'at' },
    );
  }
  return at;
}
