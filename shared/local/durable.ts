// Writing files so that a crash or power loss leaves them whole or absent: the local adapters'
// one set of durability helpers (state directory, file target).
import { open, rename } from 'node:fs/promises';
import { dirname } from 'node:path';

/** Writes `data` to `path` (flag 'w' creates or truncates, 'wx' fails if it exists) and fsyncs it. */
export async function writeFileSynced(path: string, data: string | Uint8Array, flag = 'w'): Promise<void> {
  const fh = await open(path, flag);
  try {
    await fh.writeFile(data);
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** Replaces `path` whole or not at all: a synced temporary file, renamed over it, the folder synced. */
export async function writeAtomic(path: string, data: string | Uint8Array): Promise<void> {
  const tmp = `${path}.tmp`;
  await writeFileSynced(tmp, data);
  await rename(tmp, path);
  await syncDir(dirname(path));
}

/** Makes a directory's entries (a created or renamed file) durable. */
export async function syncDir(path: string): Promise<void> {
  const fh = await open(path, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}
