// Names of replication sets and disks: one rule for every boundary (CLI, job files, ferry://
// disk names, state directories). Names become file and key names, so the rule keeps them inert.
import { ConfigError } from './errors.ts';

/**
 * A letter or digit, then up to 127 letters, digits, '.', '_' or '-'. No '/', no leading '.', so a
 * name can never climb out of the folder it names ('..') or hide as a dotfile; 128 characters keep
 * it a valid file name and DynamoDB key everywhere.
 */
export const NAME_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;

export const NAME_RULE = "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit";

export type NameKind = 'set' | 'disk';

export function isValidName(value: unknown): value is string {
  return typeof value === 'string' && NAME_PATTERN.test(value);
}

/** Returns `value` if it is a valid name, or throws a ConfigError naming the setting and the rule. */
export function checkName(kind: NameKind, value: unknown, where: string = kind): string {
  if (isValidName(value)) return value;
  const shown = typeof value === 'string' ? JSON.stringify(value) : String(value);
  throw new ConfigError(`${where}: ${kind} name ${shown} is not allowed (${NAME_RULE})`, {
    setting: kind,
    ...(kind === 'disk' && typeof value === 'string' ? { disk: value } : {}),
  });
}
