// `ferry://HOST:PORT/DISK[?connections=N]`, the address of a disk on a replication node. Kept apart
// from the network code so a target can be checked when a job is read, before anything connects.
import { ConfigError } from '../engine/errors.ts';
import { isValidName, NAME_RULE } from '../engine/names.ts';
import { diskNameProblem } from './protocol.ts';

/** Connections per disk when the URI does not say: enough to keep a long, fat link busy. */
export const DEFAULT_CONNECTIONS = 4;
/** More connections than this only adds sockets, not throughput. */
export const MAX_CONNECTIONS = 16;

export interface FerryUri {
  readonly host: string;
  readonly port: number;
  readonly disk: string;
  readonly connections: number;
  /** The URI for messages and checkpoints: no client tuning. */
  readonly name: string;
}

/** Parses `ferry://host:port/disk[?connections=N]`. */
export function parseFerryUri(uri: string): FerryUri {
  const fail = (why: string): never => {
    throw new ConfigError(`target ${uri} ${why}`, { setting: 'target' });
  };
  let url: URL;
  try {
    url = new URL(uri);
  } catch {
    return fail('is not a valid URI (expected ferry://HOST:PORT/DISK)');
  }
  if (url.protocol !== 'ferry:') fail('is not a ferry:// URI');
  if (url.username !== '' || url.password !== '') fail('must not carry a user or password');
  if (url.hash !== '') fail('must not have a #fragment');
  if (url.hostname === '') fail('has no host');
  if (url.port === '') fail('has no port (ferry://HOST:PORT/DISK)');
  const port = Number(url.port);
  if (!(port >= 1 && port <= 65535)) fail(`has port ${url.port}`);
  // The disk name as typed: the URL parser would resolve "/../x" to "/x" and "/.." to "/", so a
  // name that climbs out of the node's folder would be quietly changed instead of refused.
  const typed = /^ferry:\/\/[^/?#]*\/?([^?#]*)/i.exec(uri)?.[1] ?? '';
  let disk: string;
  try {
    disk = decodeURIComponent(typed);
  } catch {
    return fail('has a badly %-encoded disk name');
  }
  if (!isValidName(disk)) fail(`names disk "${disk}", which is not allowed (${NAME_RULE})`);
  // The protocol's own limits on top ("..", ".ferry-"), which the node checks again.
  const problem = diskNameProblem(disk);
  if (problem !== undefined) fail(`names disk "${disk}", which ${problem}`);
  let connections = DEFAULT_CONNECTIONS;
  for (const [key, value] of url.searchParams) {
    if (key !== 'connections') fail(`has an unknown parameter "${key}" (allowed: connections)`);
    const n = /^\d{1,2}$/.test(value) ? Number(value) : Number.NaN;
    if (!(n >= 1 && n <= MAX_CONNECTIONS)) fail(`has connections=${value}; expected 1..${MAX_CONNECTIONS}`);
    connections = n;
  }
  // WHATWG URLs keep IPv6 literals in brackets; sockets want them bare.
  const host = url.hostname.replace(/^\[(.*)\]$/, '$1');
  return { host, port, disk, connections, name: `ferry://${url.hostname}:${port}/${disk}` };
}
