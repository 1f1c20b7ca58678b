// Byte sizes as people write them ("1 MB", "32MiB", "512 KiB", "4096") and back.
import { ConfigError } from './errors.ts';

export const KiB = 1024;
export const MiB = 1024 * KiB;
export const GiB = 1024 * MiB;
export const TiB = 1024 * GiB;

// The product spec writes "1 MB" and means 1 MiB (a chunk is two 512 KiB EBS blocks), so decimal-looking
// units are binary here. Operators never mean 1,000,000-byte chunks when talking about block storage.
const UNITS: Record<string, number> = {
  '': 1,
  b: 1,
  k: KiB,
  kb: KiB,
  kib: KiB,
  m: MiB,
  mb: MiB,
  mib: MiB,
  g: GiB,
  gb: GiB,
  gib: GiB,
  t: TiB,
  tb: TiB,
  tib: TiB,
};

/** Parses a size; `setting` names the option in the error so the operator knows what to fix. */
export function parseSize(input: string | number, setting: string): number {
  if (typeof input === 'number') {
    if (!Number.isSafeInteger(input) || input < 0) {
      throw new ConfigError(`${setting}: ${input} is not a whole number of bytes`, { setting });
    }
    return input;
  }
  const m = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$/.exec(input);
  const unit = m ? UNITS[m[2]!.toLowerCase()] : undefined;
  if (!m || unit === undefined) {
    throw new ConfigError(`${setting}: cannot read "${input}" as a size (try "1 MiB", "32MB", "512KiB")`, {
      setting,
    });
  }
  const bytes = Number(m[1]) * unit;
  if (!Number.isSafeInteger(bytes)) {
    throw new ConfigError(`${setting}: "${input}" is not a whole number of bytes`, { setting });
  }
  return bytes;
}

/** Formats bytes for people: 1536 -> "1.5 KiB". */
export function formatBytes(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = bytes;
  let i = 0;
  while (Math.abs(value) >= 1024 && i < units.length - 1) {
    value /= 1024;
    i++;
  }
  const digits = i === 0 || value >= 100 ? 0 : value >= 10 ? 1 : 2;
  // "32 MiB", not "32.0 MiB": trailing zeros read as false precision.
  const text = value.toFixed(digits).replace(/\.0+$|(\.\d*?)0+$/, '$1');
  return `${text} ${units[i]}`;
}
