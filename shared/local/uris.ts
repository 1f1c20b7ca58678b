// Turns the URIs operators type (file:PATH, nbd://, nbd+unix://) into source and target adapters.
import { readFile } from 'node:fs/promises';
import { z } from 'zod';
import { ChangeMapError, ConfigError } from '../engine/errors.ts';
import type { Extent } from '../engine/extents.ts';
import type { DiskSource, DiskTarget } from '../engine/ports.ts';
import { FileSource } from './file-source.ts';
import { FILE_TARGET_BLOCK_SIZE, FileTarget } from './file-target.ts';

export async function openSource(uri: string): Promise<DiskSource> {
  if (uri.startsWith('nbd://') || uri.startsWith('nbd+unix://')) {
    const { NbdSource } = await import('./nbd/source.ts');
    return NbdSource.open(uri);
  }
  if (uri.startsWith('ebs://')) {
    const { openEbsSourceUri } = await import('../aws/ebs/uri.ts');
    return openEbsSourceUri(uri);
  }
  return FileSource.open(filePath(uri, 'source'));
}

export function openTarget(uri: string): DiskTarget {
  if (uri.startsWith('ferry://')) return remoteTarget(uri);
  if (uri.startsWith('nbd')) {
    throw new ConfigError(
      `target ${uri}: NBD exports are sources; targets are file: images (or ferry:// nodes)`,
      {
        setting: 'target',
      },
    );
  }
  return new FileTarget(filePath(uri, 'target'));
}

/**
 * A `ferry://HOST:PORT/DISK` replication node. The network code is loaded on first use, like the
 * NBD source's; until then the target answers with the URI (without its query) and the node's
 * block size, which the node confirms when it welcomes the connection.
 */
function remoteTarget(uri: string): DiskTarget {
  let loaded: Promise<DiskTarget> | undefined;
  let target: DiskTarget | undefined;
  const load = () => {
    loaded ??= import('../net/remote-target.ts').then(({ RemoteTarget }) => {
      target = RemoteTarget.fromUri(uri);
      return target;
    });
    return loaded;
  };
  return {
    get name() {
      return target?.name ?? uri.replace(/\?.*$/, '');
    },
    blockSize: FILE_TARGET_BLOCK_SIZE,
    open: async (sizeBytes, kind, resume) => (await load()).open(sizeBytes, kind, resume),
    writeChunk: async (d, data, sha256, signal) => (await load()).writeChunk(d, data, sha256, signal),
    read: async (offset, length, signal) => (await load()).read(offset, length, signal),
    commit: async (summary) => (await load()).commit(summary),
    afterPublish: async () => (await load()).afterPublish?.(),
    close: async () => {
      if (loaded) await (await loaded).close();
    },
  };
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

const extentSchema = z.strictObject({
  offset: z.number().int().nonnegative(),
  length: z.number().int().nonnegative(),
});
const changeFileSchema = z.union([z.array(extentSchema), z.strictObject({ extents: z.array(extentSchema) })]);

/** Reads a change map: a JSON list of {offset, length} (or {"extents": [...]}), as CBT or a diff gives. */
export async function readChangeFile(path: string, disk: string): Promise<Extent[]> {
  let value: unknown;
  try {
    value = JSON.parse(await readFile(path, 'utf8'));
  } catch (err) {
    throw new ChangeMapError(
      `disk ${disk}: change map ${path} cannot be read as JSON: ${(err as Error).message}`,
      {
        disk,
        cause: err,
      },
    );
  }
  const parsed = changeFileSchema.safeParse(value);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    const where = issue?.path.length ? ` at ${issue.path.join('.')}` : '';
    throw new ChangeMapError(
      `disk ${disk}: change map ${path} is invalid${where}: ${issue?.message ?? 'bad shape'}`,
      {
        disk,
      },
    );
  }
  return Array.isArray(parsed.data) ? parsed.data : parsed.data.extents;
}
