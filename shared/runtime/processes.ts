// Child processes and loopback ports, for whatever starts servers on this machine (drills, tests).
import type { ChildProcess } from 'node:child_process';
import { createServer } from 'node:net';

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
