// Turns the URIs operators type (file:PATH, nbd://, nbd+unix://, ebs://, ferry://) into source and
// target adapters. This is composition, so it lives with the CLI: adapter folders never build
// their siblings. NBD, EBS and the network code load on first use (a file copy never loads an SDK).
import { ConfigError } from '../shared/engine/errors.ts';
import type { DiskSource, DiskTarget } from '../shared/engine/ports.ts';
import { FileSource } from '../shared/local/file-source.ts';
import { FILE_TARGET_BLOCK_SIZE, FileTarget } from '../shared/local/file-target.ts';
import { checkSourceSecurity, readJoinFile, type SourceSecurity } from '../shared/net/join.ts';
import { type FerryUri, parseFerryUri } from '../shared/net/uri.ts';

export async function openSource(uri: string): Promise<DiskSource> {
  if (uri.startsWith('nbd://') || uri.startsWith('nbd+unix://')) {
    const { NbdSource } = await import('../shared/local/nbd/source.ts');
    return NbdSource.open(uri);
  }
  if (uri.startsWith('ebs://')) {
    const { openEbsSourceUri } = await import('../shared/aws/ebs/uri.ts');
    return openEbsSourceUri(uri);
  }
  return FileSource.open(filePath(uri, 'source'));
}

/** How a `ferry://` target is reached: the node's join file (TLS), or plain TCP toward a loopback node. */
export interface RemoteAccess {
  /** Path of the node's join file. */
  readonly join?: string | undefined;
  readonly insecure?: boolean | undefined;
}

export interface TargetOptions extends RemoteAccess {
  /** File targets keep each published cycle's undo data as history (point-in-time recovery). */
  readonly keepHistory?: boolean;
}

export function openTarget(uri: string, access: TargetOptions = {}): DiskTarget {
  if (uri.startsWith('ferry://')) return remoteTarget(uri, access);
  if (access.join !== undefined) {
    throw new ConfigError(`target ${uri}: a join file is for ferry:// targets only`, { setting: 'join' });
  }
  if (uri.startsWith('nbd')) {
    throw new ConfigError(
      `target ${uri}: NBD exports are sources; targets are file: images (or ferry:// nodes)`,
      {
        setting: 'target',
      },
    );
  }
  return new FileTarget(filePath(uri, 'target'), { keepHistory: access.keepHistory ?? false });
}

/**
 * A `ferry://HOST:PORT/DISK` replication node. The network code is loaded on first use, like the
 * NBD source's; until then the target answers with its name (the URI without its query) and the
 * node's block size, which the node confirms when it welcomes the connection.
 */
function remoteTarget(uri: string, access: RemoteAccess): DiskTarget {
  // Checked now (host, port, disk name, join file), so a bad URI or a missing, foreign or expired
  // credential is refused as configuration before any disk is read.
  const { parsed, security } = reachNode(uri, access);
  let loaded: Promise<DiskTarget> | undefined;
  const load = () => {
    loaded ??= import('../shared/net/remote-target.ts').then(
      ({ RemoteTarget }) => new RemoteTarget(parsed, security),
    );
    return loaded;
  };
  return {
    name: parsed.name,
    blockSize: FILE_TARGET_BLOCK_SIZE,
    // Every optional method passes through too: the engine asks the node to prove a resume
    // (checkResume) and to make progress durable (flush) before it records progress.
    open: async (sizeBytes, kind, resume, cycleId) => (await load()).open(sizeBytes, kind, resume, cycleId),
    checkResume: async (claim, signal) => (await load()).checkResume?.(claim, signal),
    flush: async () => (await load()).flush?.(),
    writeChunk: async (d, data, sha256, signal) => (await load()).writeChunk(d, data, sha256, signal),
    read: async (offset, length, signal) => (await load()).read(offset, length, signal),
    commit: async (summary) => (await load()).commit(summary),
    afterPublish: async (published) => (await load()).afterPublish?.(published),
    close: async () => {
      if (loaded) await (await loaded).close();
    },
  };
}

/**
 * A client for the questions a `ferry://` target's node answers about the disk's history (prune,
 * point-in-time recovery), reached as replication reaches it. Checked like a target (URI, join
 * file, --insecure only on loopback) before the network code loads.
 */
export async function openNodeClient(
  uri: string,
  access: RemoteAccess,
): Promise<import('../shared/net/node-client.ts').NodeClient> {
  const { parsed, security } = reachNode(uri, access);
  const { NodeClient } = await import('../shared/net/node-client.ts');
  return new NodeClient(parsed, security);
}

/** A ferry:// URI and how its node is reached, checked: one join file or --insecure (loopback only). */
function reachNode(uri: string, access: RemoteAccess): { parsed: FerryUri; security: SourceSecurity } {
  const parsed = parseFerryUri(uri);
  if (access.join !== undefined && access.insecure) {
    throw new ConfigError(`target ${parsed.name}: give a join file or --insecure, not both`, {
      setting: 'join',
    });
  }
  const security = {
    join: access.join === undefined ? undefined : readJoinFile(access.join),
    insecure: access.insecure,
  };
  checkSourceSecurity(parsed, security);
  return { parsed, security };
}

/** `file:/abs`, `file:rel`, `file:///abs`, or a bare path. */
export function filePath(uri: string, setting: string): string {
  if (uri.startsWith('file://')) return decodeURIComponent(new URL(uri).pathname);
  if (uri.startsWith('file:')) return uri.slice('file:'.length);
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(uri)) {
    throw new ConfigError(
      `${setting} ${uri}: unsupported scheme (use file:PATH, nbd://HOST:PORT/EXPORT or nbd+unix:///EXPORT?socket=PATH)`,
      {
        setting,
      },
    );
  }
  if (uri === '') throw new ConfigError(`${setting}: empty path`, { setting });
  return uri;
}
