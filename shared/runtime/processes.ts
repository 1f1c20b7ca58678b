// Child processes and loopback ports, for whatever starts servers on this machine (drills, tests).
import { type ChildProcess, spawn } from 'node:child_process';
import { watch } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import { dirname } from 'node:path';

/**
 * Stops a child: SIGTERM, then SIGKILL after `graceMs` if it has not exited (nbdkit waits for its
 * connected clients before it exits on SIGTERM). Resolves once `exited` does.
 */
export async function stopChild(child: ChildProcess, exited: Promise<void>, graceMs: number): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  child.kill('SIGTERM');
  const escalate = setTimeout(() => child.kill('SIGKILL'), graceMs);
  await exited;
  clearTimeout(escalate);
}

/** A port nothing listens on right now on 127.0.0.1 (for servers that need an explicit one). */
export async function freeLoopbackPort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', resolve);
  });
  const address = server.address();
  await new Promise<void>((resolve) => server.close(() => resolve()));
  if (address === null || typeof address === 'string') throw new Error('no TCP address on 127.0.0.1');
  return address.port;
}

export interface StartedServer {
  readonly child: ChildProcess;
  /** Resolves when the child has exited (or could not be spawned). */
  readonly exited: Promise<void>;
}

/**
 * Spawns a server that writes `pidFile` (newline-terminated) once it accepts connections, as
 * nbdkit's -P does, and resolves when it has. Rejects, with the child stopped, when it fails to
 * spawn or exits first (the message carries its exit code and stderr).
 */
export async function startWhenReady(
  command: string,
  argv: readonly string[],
  opts: { pidFile: string; env?: NodeJS.ProcessEnv; graceMs: number },
): Promise<StartedServer> {
  // Watch before spawning: the pid file may appear before a later watcher would see it.
  const watcher = watch(dirname(opts.pidFile));
  const child = spawn(command, argv, {
    stdio: ['ignore', 'ignore', 'pipe'],
    ...(opts.env === undefined ? {} : { env: opts.env }),
  });
  let stderr = '';
  child.stderr?.setEncoding('utf8').on('data', (s: string) => {
    stderr += s;
  });
  const exited = new Promise<void>((resolve) => {
    child.once('exit', () => resolve());
    child.once('error', () => resolve());
  });
  try {
    await new Promise<void>((resolve, reject) => {
      const check = () => {
        readFile(opts.pidFile, 'utf8').then(
          (text) => {
            if (text.endsWith('\n')) resolve();
          },
          () => undefined,
        );
      };
      watcher.on('change', check);
      child.once('error', reject);
      child.once('exit', (code, signal) =>
        reject(new Error(`${command} exited (${code ?? signal}) before it was ready: ${stderr.trim()}`)),
      );
      check();
    });
  } catch (err) {
    await stopChild(child, exited, opts.graceMs);
    throw err;
  } finally {
    watcher.close();
  }
  return { child, exited };
}
