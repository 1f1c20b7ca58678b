// Child processes for the benchmark: spawn, watch peak RSS and CPU time through /proc, wait, kill.
import { type ChildProcess, spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { performance } from 'node:perf_hooks';

/** What a watched process used, as far as /proc showed it while it ran. */
export interface ProcUsage {
  readonly pid: number;
  readonly command: string;
  readonly exitCode: number | null;
  readonly signal: string | null;
  /** Spawn to exit, as the parent saw it. */
  readonly wallMs: number;
  /** VmHWM (peak resident set) from the last successful poll, KiB. */
  readonly peakRssKiB: number;
  /** utime + stime from the last successful poll, ms (undercounts by at most one poll interval). */
  readonly cpuMs: number;
  readonly stdout: string;
  readonly stderr: string;
}

export interface Watched {
  readonly child: ChildProcess;
  readonly pid: number;
  /** Resolves when the process has exited and its pipes are drained. */
  readonly done: Promise<ProcUsage>;
  /** Calls `onLine` for each line the process writes to stdout / stderr, with ms since spawn. */
  onLine(stream: 'stdout' | 'stderr', fn: (line: string, atMs: number) => void): void;
  kill(signal?: NodeJS.Signals): void;
}

// 50 ms: VmHWM only grows, so a missed poll loses at most the growth of the process's last 50 ms;
// cheap enough (two small /proc reads) not to disturb a 2-core machine.
const POLL_MS = 50;
const CLK_TCK = 100;

/** Reads VmHWM (KiB) and utime+stime (ms) of a live process; undefined once it is gone. */
export function readProcUsage(pid: number): { hwmKiB: number; cpuMs: number } | undefined {
  try {
    const status = readFileSync(`/proc/${pid}/status`, 'utf8');
    const hwm = /VmHWM:\s+(\d+)\s+kB/.exec(status);
    if (!hwm) return undefined; // a zombie has no memory map left
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // Fields after the command name (which may hold spaces) start after the last ')'.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    const utime = Number(fields[11]);
    const stime = Number(fields[12]);
    return { hwmKiB: Number(hwm[1]), cpuMs: ((utime + stime) * 1000) / CLK_TCK };
  } catch {
    return undefined;
  }
}

export function watch(command: string, args: readonly string[], opts: { cwd?: string } = {}): Watched {
  const started = performance.now();
  const child = spawn(command, args, { stdio: ['ignore', 'pipe', 'pipe'], cwd: opts.cwd });
  const pid = child.pid ?? -1;
  let peakRssKiB = 0;
  let cpuMs = 0;
  const poll = () => {
    const u = readProcUsage(pid);
    if (!u) return;
    peakRssKiB = Math.max(peakRssKiB, u.hwmKiB);
    cpuMs = Math.max(cpuMs, u.cpuMs);
  };
  poll();
  const timer = setInterval(poll, POLL_MS);
  const out = { stdout: '', stderr: '' };
  const listeners: Record<'stdout' | 'stderr', ((line: string, atMs: number) => void)[]> = {
    stdout: [],
    stderr: [],
  };
  for (const stream of ['stdout', 'stderr'] as const) {
    let partial = '';
    child[stream]?.setEncoding('utf8').on('data', (s: string) => {
      const at = performance.now() - started;
      // Keep the tail only: a chatty child must not grow the parent without bound.
      out[stream] = (out[stream] + s).slice(-200_000);
      partial += s;
      const lines = partial.split('\n');
      partial = lines.pop() ?? '';
      for (const line of lines) for (const fn of listeners[stream]) fn(line, at);
    });
  }
  const done = new Promise<ProcUsage>((resolve) => {
    let settled = false;
    const finish = (exitCode: number | null, signal: string | null) => {
      if (settled) return;
      settled = true;
      clearInterval(timer);
      resolve({
        pid,
        command: [command, ...args].join(' '),
        exitCode,
        signal,
        wallMs: performance.now() - started,
        peakRssKiB,
        cpuMs,
        stdout: out.stdout,
        stderr: out.stderr,
      });
    };
    child.once('error', (err) => {
      out.stderr += String(err);
      finish(null, null);
    });
    child.once('close', (code, signal) => finish(code, signal));
  });
  return {
    child,
    pid,
    done,
    onLine: (stream, fn) => listeners[stream].push(fn),
    kill: (signal = 'SIGTERM') => {
      if (child.exitCode === null && child.signalCode === null) child.kill(signal);
    },
  };
}

/** Runs a command to completion; rejects with its stderr if it fails. For setup steps, not measurements. */
export async function run(command: string, args: readonly string[]): Promise<string> {
  const w = watch(command, args);
  const u = await w.done;
  if (u.exitCode !== 0) {
    throw new Error(`${u.command} failed (${u.exitCode ?? u.signal}): ${u.stderr.trim().slice(-2000)}`);
  }
  return u.stdout;
}

/** Jiffies the whole machine spent busy and in total, from the aggregate line of /proc/stat. */
export function machineCpu(): { busy: number; total: number } {
  const line = readFileSync('/proc/stat', 'utf8').split('\n')[0]!;
  // cpu  user nice system idle iowait irq softirq steal guest guest_nice
  const f = line.trim().split(/\s+/).slice(1, 9).map(Number);
  const total = f.reduce((s, x) => s + x, 0);
  const idle = f[3]! + f[4]!;
  return { busy: total - idle, total };
}

/** Cores' worth of CPU the machine was busy between two machineCpu() readings. */
export function busyCores(
  a: { busy: number; total: number },
  b: { busy: number; total: number },
  cpus: number,
): number {
  const dt = b.total - a.total;
  return dt > 0 ? ((b.busy - a.busy) / dt) * cpus : 0;
}
