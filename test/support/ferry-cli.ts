// Runs the `ferry` command (or any command) as a child process, as an operator would, and collects
// what it printed: one helper for every end-to-end test.
import { type ChildProcess, spawn } from 'node:child_process';
import { join } from 'node:path';

export const ROOT = join(import.meta.dirname, '../..');
export const BIN = join(ROOT, 'bin/ferry.mjs');

export interface Run {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

export interface RunOptions {
  readonly env?: NodeJS.ProcessEnv;
  /** Node options placed before the script (e.g. `--require PROBE`). */
  readonly nodeArgs?: readonly string[];
  readonly onSpawn?: (child: ChildProcess) => void;
}

/** `node bin/ferry.mjs ...args`, run in the repository root. */
export function ferry(args: readonly string[], opts: RunOptions = {}): Promise<Run> {
  return run(process.execPath, [...(opts.nodeArgs ?? []), BIN, ...args], opts);
}

/** Any command, run in the repository root; resolves when it exits, whatever its status. */
export function run(command: string, args: readonly string[], opts: RunOptions = {}): Promise<Run> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, {
      cwd: ROOT,
      stdio: ['ignore', 'pipe', 'pipe'],
      ...(opts.env ? { env: opts.env } : {}),
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (b) => {
      stdout += b;
    });
    child.stderr.on('data', (b) => {
      stderr += b;
    });
    child.on('error', reject);
    child.on('close', (code, signal) => resolve({ code, signal, stdout, stderr }));
    opts.onSpawn?.(child);
  });
}
