// Parses NBD source URIs (nbd://host:port/export, nbd+unix:///export?socket=PATH) into where to connect.
import { ConfigError } from '../../engine/errors.ts';
import { NBD_DEFAULT_PORT } from './protocol.ts';

/** Parallel connections to one export when the URI does not say: enough to keep a WAN link busy. */
export const DEFAULT_CONNECTIONS = 4;
/** More connections than this only adds server threads, not throughput. */
export const MAX_CONNECTIONS = 16;

export type NbdEndpoint =
  | { readonly kind: 'tcp'; readonly host: string; readonly port: number }
  | { readonly kind: 'unix'; readonly path: string };

export interface NbdUri {
  readonly endpoint: NbdEndpoint;
  readonly exportName: string;
  readonly connections: number;
  /** The URI for messages: no credentials, no client tuning. */
  readonly name: string;
}

const QUERY_KEYS = { tcp: ['connections'], unix: ['connections', 'socket'] } as const;

export function parseNbdUri(uri: string): NbdUri {
  const shown = redact(uri);
  const fail = (why: string): never => {
    throw new ConfigError(`NBD URI ${shown} ${why}`);
  };

  let url: URL;
  try {
    url = new URL(uri);
  } catch {
    return fail('is not a valid URI (expected nbd://host[:port]/export or nbd+unix:///export?socket=PATH)');
  }
  if (url.protocol === 'nbds:' || url.protocol === 'nbds+unix:') fail('asks for TLS, which is not supported');
  if (url.protocol !== 'nbd:' && url.protocol !== 'nbd+unix:') {
    fail('has an unsupported scheme (expected nbd:// or nbd+unix://)');
  }
  if (url.username !== '' || url.password !== '') fail('must not carry a user or password');
  if (url.hash !== '') fail('must not have a #fragment');

  const kind = url.protocol === 'nbd:' ? 'tcp' : 'unix';
  const query = parseQuery(url.search, fail);
  for (const key of query.keys()) {
    if (!(QUERY_KEYS[kind] as readonly string[]).includes(key)) {
      fail(`has an unknown parameter "${key}" (allowed: ${QUERY_KEYS[kind].join(', ')})`);
    }
  }

  let exportName: string;
  try {
    exportName = decodeURIComponent(url.pathname.replace(/^\//, ''));
  } catch {
    return fail('has a badly %-encoded export name');
  }
  if (Buffer.byteLength(exportName) > 4096) fail('has an export name longer than 4096 bytes');

  const connections = parseConnections(query.get('connections'), fail);
  const path = url.pathname === '' ? '/' : url.pathname;

  if (kind === 'tcp') {
    if (url.hostname === '') fail('has no host');
    const port = url.port === '' ? NBD_DEFAULT_PORT : Number(url.port);
    if (port === 0) fail('has port 0');
    // WHATWG URLs keep IPv6 literals in brackets; sockets want them bare.
    const host = url.hostname.replace(/^\[(.*)\]$/, '$1');
    const name = `nbd://${url.hostname}:${port}${path}`;
    return { endpoint: { kind, host, port }, exportName, connections, name };
  }

  if (url.host !== '') fail('must not name a host (nbd+unix:///export?socket=PATH)');
  const socket = query.get('socket');
  if (socket === undefined || socket === '') return fail('needs ?socket=PATH naming the server socket');
  return {
    endpoint: { kind, path: socket },
    exportName,
    connections,
    name: `nbd+unix://${path}?socket=${socket}`,
  };
}

/** Query strings are split by hand: URLSearchParams would turn '+' in a socket path into a space. */
function parseQuery(search: string, fail: (why: string) => never): Map<string, string> {
  const query = new Map<string, string>();
  if (search.length <= 1) return query;
  for (const part of search.slice(1).split('&')) {
    if (part === '') continue;
    const eq = part.indexOf('=');
    let key: string;
    let value: string;
    try {
      key = decodeURIComponent(eq < 0 ? part : part.slice(0, eq));
      value = eq < 0 ? '' : decodeURIComponent(part.slice(eq + 1));
    } catch {
      return fail('has a badly %-encoded query');
    }
    if (query.has(key)) fail(`repeats the parameter "${key}"`);
    query.set(key, value);
  }
  return query;
}

function parseConnections(value: string | undefined, fail: (why: string) => never): number {
  if (value === undefined) return DEFAULT_CONNECTIONS;
  const n = /^\d{1,3}$/.test(value) ? Number(value) : Number.NaN;
  if (!(n >= 1 && n <= MAX_CONNECTIONS)) fail(`has connections=${value}; expected 1..${MAX_CONNECTIONS}`);
  return n;
}

/** Never repeats a password in a message, even one that was put in a URI by mistake. */
function redact(uri: string): string {
  return uri.replace(/^([a-z+]+:\/\/)[^/?#]*@/i, '$1***@');
}
