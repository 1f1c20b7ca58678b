// moto_server (the EC2 and EventBridge Scheduler emulator, Python) as a child process on 127.0.0.1 with
// a free port: found, started, waited for until it answers, reset, stopped. Used by the local Recovery
// run (`ferry local-cloud --recover`) and by the tests (test/support/moto.ts).
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { ConfigError } from '../../shared/engine/errors.ts';
import { freeLoopbackPort, stopChild } from '../../shared/runtime/processes.ts';

export const MOTO_INSTALL_HINT = "pip install 'moto[server]' (moto 5.2.1 is known to work)";

// moto answers its first request after Flask and its backends load: a few seconds on a busy box.
const READY_TIMEOUT_MS = 60_000;
const POLL_MS = 100;
// moto exits at once on SIGTERM; a wedged one gets SIGKILL after this.
const KILL_AFTER_MS = 5_000;

/** Credentials moto accepts (any); never real ones. */
export const MOTO_CREDENTIALS = { accessKeyId: 'testing', secretAccessKey: 'testing' } as const;
export const MOTO_REGION = 'us-east-1';

export interface Moto {
  /** http://127.0.0.1:PORT */
  readonly endpoint: string;
  /** Client settings for any SDK v3 client pointed at this server. */
  readonly clientConfig: {
    endpoint: string;
    region: string;
    credentials: typeof MOTO_CREDENTIALS;
  };
  /** Forgets every resource of every service (POST /moto-api/reset). */
  reset(): Promise<void>;
  /** Stops the server and waits for it to exit. Safe to call twice. */
  stop(): Promise<void>;
}

export interface StartMotoOptions {
  /** Why it is needed, for the message when moto_server is missing ("the EC2 and Scheduler tests need it"). */
  readonly why?: string;
}

/** The moto_server command: MOTO_SERVER, else on PATH, else pyenv's shim; undefined when none. */
export function findMotoServer(): string | undefined {
  const given = process.env.MOTO_SERVER;
  if (given !== undefined && given !== '') return existsSync(given) ? given : undefined;
  const onPath = spawnSync('sh', ['-c', 'command -v moto_server'], { encoding: 'utf8' });
  if (onPath.status === 0 && onPath.stdout.trim() !== '') return onPath.stdout.trim();
  const shim = join(homedir(), '.pyenv', 'shims', 'moto_server');
  return existsSync(shim) ? shim : undefined;
}

/**
 * Starts moto_server and resolves once it answers. Not installed: a ConfigError with the install
 * command (and MOTO_SERVER, to point at one elsewhere).
 */
export async function startMoto(opts: StartMotoOptions = {}): Promise<Moto> {
  const command = findMotoServer();
  if (command === undefined) {
    throw new ConfigError(
      `moto_server is not installed (${opts.why ?? 'the local EC2 and EventBridge Scheduler run on it'}): ${MOTO_INSTALL_HINT}, or set MOTO_SERVER to its path`,
      { setting: 'moto_server' },
    );
  }
  const port = await freeLoopbackPort();
  const endpoint = `http://127.0.0.1:${port}`;
  const child: ChildProcess = spawn(command, ['-H', '127.0.0.1', '-p', String(port)], {
    stdio: ['ignore', 'ignore', 'pipe'],
    env: { ...process.env, PYTHONUNBUFFERED: '1' },
  });
  // moto has no --exit-with-parent: a process that exits (or throws its way out) takes it along.
  const killOnExit = () => child.kill('SIGKILL');
  process.once('exit', killOnExit);
  let stderr = '';
  child.stderr?.setEncoding('utf8').on('data', (s: string) => {
    // moto logs every request on stderr: keep only the start, for a failure message.
    if (stderr.length < 4000) stderr += s;
  });
  const exited = new Promise<void>((resolve) => {
    child.once('exit', () => {
      process.off('exit', killOnExit);
      resolve();
    });
    child.once('error', () => resolve());
  });
  let gone: string | undefined;
  child.once('exit', (code, signal) => {
    gone = `moto_server exited (${code ?? signal})`;
  });
  child.once('error', (err) => {
    gone = `moto_server could not start: ${err.message}`;
  });

  const deadline = Date.now() + READY_TIMEOUT_MS;
  for (;;) {
    if (gone !== undefined) throw new Error(`${gone} before it was ready: ${stderr.trim().slice(0, 2000)}`);
    try {
      const res = await fetch(`${endpoint}/moto-api/`, { signal: AbortSignal.timeout(2000) });
      await res.arrayBuffer();
      if (res.ok) break;
    } catch {
      // not listening yet
    }
    if (Date.now() > deadline) {
      await stopChild(child, exited, KILL_AFTER_MS);
      throw new Error(`moto_server did not answer on ${endpoint} within ${READY_TIMEOUT_MS / 1000} s`);
    }
    await new Promise((r) => setTimeout(r, POLL_MS));
  }

  let stopped: Promise<void> | undefined;
  return {
    endpoint,
    clientConfig: { endpoint, region: MOTO_REGION, credentials: MOTO_CREDENTIALS },
    async reset() {
      const res = await fetch(`${endpoint}/moto-api/reset`, { method: 'POST' });
      await res.arrayBuffer();
      if (!res.ok) throw new Error(`moto reset answered ${res.status}`);
    },
    stop: () => {
      stopped ??= stopChild(child, exited, KILL_AFTER_MS);
      return stopped;
    },
  };
}
