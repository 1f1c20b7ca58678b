// Harness of the fault-matrix suite: runs the real `ferry` CLI, a real `ferry serve` node and nbdkit
// as separate processes, injects one fault at a time, and checks the recovery contract after it.
//
// The contract (issue 9), after EVERY fault:
//   (a) the new checkpoint is published and every replica is bit-exact against its source, or
//   (b) nothing new is published, the previous checkpoint still verifies (`ferry verify` may first
//       roll back an interrupted commit), the replicas still hold exactly what the previous
//       checkpoint recorded, and a rerun of the same command publishes a bit-exact checkpoint.
// A run that exits 0 must have published; a published checkpoint must never differ from the source.
//
// The oracle does not trust Ferry: "bit-exact" is a byte comparison against the source image (and,
// for (b), against a copy of the source taken when the previous checkpoint was published).
//
// Every fault is injected into a real process, and what an operator runs next to see the damage
// (`ferry checkpoints`, `ferry verify`) runs as one too. Clean cycles with nothing to observe (the
// set-up cycles, the rerun after the fault, the listing after it) run the CLI's runLocalJob in this
// process: the same job, without a second of process start-up each.
import { type ChildProcess, spawn } from 'node:child_process';
import { copyFile, mkdir, mkdtemp, open, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, expect, it, type TestContext } from 'vitest';
import { parseJobSpec, runLocalJob } from '../../cli/run.ts';
import { ChangeMapError, ConfigError, errorMessage } from '../../shared/engine/errors.ts';
import { KiB, MiB } from '../../shared/engine/units.ts';
import { verifyFileImage } from '../../shared/local/file-target.ts';
import { LocalStateStore } from '../../shared/local/state-dir.ts';
import { createDiskImage, mutateDisk } from '../../shared/local/workload.ts';
import { type Nbdkit, startNbdkit } from '../support/nbdkit.ts';

export { KiB, MiB };

export const BIN = join(import.meta.dirname, '../../bin/ferry.mjs');

/** The engine's crash hook: the process SIGKILLs itself at the named point. */
export const CRASH_ENV = 'FERRY_TEST_CRASH_AT';

// Safety nets only, never assertions on speed: a run this long is hung on a 2-core CI box.
const RUN_TIMEOUT_MS = 60_000;
const SERVE_READY_TIMEOUT_MS = 20_000;
// How often a kill trigger looks at the file it waits for; a transfer it interrupts lasts seconds.
const POLL_MS = 10;

// ---------------------------------------------------------------------------------------------
// Processes

export interface Run {
  readonly args: readonly string[];
  readonly code: number | null;
  readonly signal: NodeJS.Signals | null;
  readonly stdout: string;
  readonly stderr: string;
  /** The safety timeout killed it: the run hung. */
  readonly hung: boolean;
}

export interface RunOptions {
  /** Sets FERRY_TEST_CRASH_AT so the process kills itself at that point. */
  readonly crashAt?: string;
  /** Sees the child once it is spawned (to kill it on a trigger). */
  readonly onSpawn?: (child: ChildProcess) => void;
}

const live = new Set<ChildProcess>();

function childEnv(crashAt?: string): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env };
  delete env[CRASH_ENV];
  delete env.FERRY_DEBUG;
  if (crashAt !== undefined) env[CRASH_ENV] = crashAt;
  return env;
}

/** Runs `ferry ARGS` to its end (exit or signal). */
export function ferry(args: readonly string[], opts: RunOptions = {}): Promise<Run> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [BIN, ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: childEnv(opts.crashAt),
    });
    live.add(child);
    let stdout = '';
    let stderr = '';
    let hung = false;
    child.stdout.on('data', (b) => {
      stdout += b;
    });
    child.stderr.on('data', (b) => {
      stderr += b;
    });
    const safety = setTimeout(() => {
      hung = true;
      child.kill('SIGKILL');
    }, RUN_TIMEOUT_MS);
    child.on('error', (err) => {
      clearTimeout(safety);
      live.delete(child);
      reject(err);
    });
    const t0 = performance.now();
    child.on('close', (code, signal) => {
      clearTimeout(safety);
      live.delete(child);
      if (process.env.FERRY_FAULT_TRACE) {
        console.log(
          `${(performance.now() - t0).toFixed(0)} ms: ferry ${args.slice(0, 2).join(' ')} -> ${code ?? signal}`,
        );
      }
      resolve({ args, code, signal, stdout, stderr, hung });
    });
    opts.onSpawn?.(child);
  });
}

/** The engine settings the replicate flags of these tests name, for a run in this process. */
const FLAG_SETTINGS: Record<string, string> = {
  '--chunk-size': 'chunkSize',
  '--window': 'window',
  '--node-budget': 'nodeBudget',
  '--checkpoint-interval': 'checkpointInterval',
};

function paramsFromFlags(flags: readonly string[]): Record<string, unknown> {
  const params: Record<string, unknown> = {};
  for (let i = 0; i < flags.length; i++) {
    const flag = flags[i]!;
    if (flag === '--no-adaptive') params.adaptive = false;
    else if (FLAG_SETTINGS[flag] !== undefined && flags[i + 1] !== undefined)
      params[FLAG_SETTINGS[flag]] = flags[++i];
    // A flag this cannot map would be dropped without a word: refuse it instead.
    else throw new Error(`faults/support: no in-process equivalent for replicate flag ${flag}`);
  }
  return params;
}

/**
 * `ferry replicate --job JOB --state STATE FLAGS` as runLocalJob in this process, reported as the
 * command would (exit 2 for a refused setting or change map, 1 for any other failure).
 */
async function replicateInProcess(job: string, state: string, flags: readonly string[]): Promise<Run> {
  const args = ['(in process) replicate', '--job', job, '--state', state, ...flags];
  try {
    const spec = parseJobSpec(JSON.parse(await readFile(job, 'utf8')), `job file ${job}`);
    const result = await runLocalJob(
      { ...spec, params: { ...spec.params, ...paramsFromFlags(flags) } },
      { stateDir: state },
    );
    return { args, code: 0, signal: null, stdout: JSON.stringify(result), stderr: '', hung: false };
  } catch (err) {
    const code = err instanceof ConfigError || err instanceof ChangeMapError ? 2 : 1;
    return { args, code, signal: null, stdout: '', stderr: `ferry: ${errorMessage(err)}\n`, hung: false };
  }
}

/** One line about a run for assertion messages: how it ended and the tail of its output. */
export function describeRun(r: Run): string {
  const end = r.hung
    ? 'HUNG (killed by the safety timeout)'
    : r.signal
      ? `signal ${r.signal}`
      : `exit ${r.code}`;
  const tail = (s: string) => s.trim().split('\n').slice(-6).join(' | ');
  return `ferry ${r.args.join(' ')} -> ${end}; stderr: ${tail(r.stderr)}; stdout: ${tail(r.stdout).slice(0, 400)}`;
}

export interface KillTrigger {
  /** The trigger fired (the child was SIGKILLed by it). */
  readonly fired: boolean;
}

/**
 * SIGKILLs the child as soon as `ready()` holds, polled every few ms. Use it with a source slowed
 * down by nbdkit so the point it waits for lasts seconds: the kill then lands inside it.
 */
export function killWhen(child: ChildProcess, ready: () => Promise<boolean>): KillTrigger {
  const state = { fired: false };
  let busy = false;
  const poll = setInterval(async () => {
    if (busy || state.fired) return;
    busy = true;
    try {
      if (child.exitCode === null && child.signalCode === null && (await ready())) {
        state.fired = true;
        clearInterval(poll);
        child.kill('SIGKILL');
      }
    } finally {
      busy = false;
    }
  }, POLL_MS);
  child.once('close', () => clearInterval(poll));
  return state;
}

export async function exists(path: string): Promise<boolean> {
  return stat(path).then(
    () => true,
    () => false,
  );
}

export async function fileHas(path: string, text: string): Promise<boolean> {
  return (await readFile(path, 'utf8').catch(() => '')).includes(text);
}

/** `ferry serve` as a separate process on loopback. */
export interface Served {
  readonly address: string;
  readonly port: number;
  /** The node's join file (STATE/join.json, made at its first start): sources replicate with it over TLS. */
  readonly joinFile: string;
  readonly child: ChildProcess;
  /** Output so far (the node logs sessions and errors on stderr). */
  output(): { stdout: string; stderr: string };
  /** SIGKILL (the node crashes) and wait for it to be gone. */
  crash(): Promise<void>;
  /** SIGTERM and wait; safe after crash(). */
  stop(): Promise<void>;
}

export async function startServe(opts: { images: string; state: string; port?: number }): Promise<Served> {
  await mkdir(opts.images, { recursive: true });
  const args = [
    BIN,
    'serve',
    '--listen',
    `127.0.0.1:${opts.port ?? 0}`,
    '--target',
    `file:${opts.images}`,
    '--state',
    opts.state,
  ];
  const child = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'pipe'], env: childEnv() });
  live.add(child);
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (b) => {
    stdout += b;
  });
  child.stderr.on('data', (b) => {
    stderr += b;
  });
  const closed = new Promise<void>((resolve) =>
    child.once('close', () => {
      live.delete(child);
      resolve();
    }),
  );
  const address = await new Promise<string>((resolve, reject) => {
    const safety = setTimeout(
      () => reject(new Error(`ferry serve not ready: ${stderr}`)),
      SERVE_READY_TIMEOUT_MS,
    );
    const look = () => {
      const m = /ferry node listening on (\S+)/.exec(stdout);
      if (m) {
        clearTimeout(safety);
        child.stdout.off('data', look);
        resolve(m[1]!);
      }
    };
    child.stdout.on('data', look);
    child.once('close', (code, signal) => {
      clearTimeout(safety);
      reject(new Error(`ferry serve exited (${code ?? signal}) before listening: ${stderr}`));
    });
  });
  const end = async (signal: NodeJS.Signals) => {
    if (child.exitCode === null && child.signalCode === null) child.kill(signal);
    await closed;
  };
  return {
    address,
    port: Number(address.slice(address.lastIndexOf(':') + 1)),
    joinFile: join(opts.state, 'join.json'),
    child,
    output: () => ({ stdout, stderr }),
    crash: () => end('SIGKILL'),
    stop: () => end('SIGTERM'),
  };
}

/** nbdkit filters for a source: the log first (outermost), so it sees requests as they arrive. */
export interface SourceFaults {
  /** nbdkit rate filter, bits per second for the whole server, e.g. '4M'. */
  readonly rate?: string;
  /** nbdkit delay filter on block status (planning of a full copy), e.g. '3' seconds. */
  readonly delayExtents?: string;
  /** nbdkit error filter: this share of reads fail with EIO, e.g. '1%'. */
  readonly readErrorRate?: string;
  /** nbdkit log filter into this file. */
  readonly log?: string;
}

/**
 * A file image served by nbdkit on a fixed unix socket, so its URI (and with it the replicate
 * command) stays the same when it is restarted with other faults, e.g. unthrottled for the rerun.
 */
export class NbdImage {
  private server: Nbdkit | undefined;

  private constructor(
    readonly image: string,
    readonly socket: string,
  ) {}

  get uri(): string {
    return `nbd+unix:///?socket=${this.socket}`;
  }

  static async start(image: string, socket: string, faults: SourceFaults = {}): Promise<NbdImage> {
    const served = new NbdImage(image, socket);
    await served.restart(faults);
    return served;
  }

  async restart(faults: SourceFaults = {}): Promise<void> {
    await this.stop();
    const filters: string[] = [];
    const args = [`file=${this.image}`];
    if (faults.log !== undefined) {
      filters.push('log');
      args.push(`logfile=${faults.log}`);
    }
    if (faults.readErrorRate !== undefined) {
      filters.push('error');
      args.push('error-pread=EIO', `error-pread-rate=${faults.readErrorRate}`);
    }
    if (faults.delayExtents !== undefined) {
      filters.push('delay');
      args.push(`delay-extents=${faults.delayExtents}`);
    }
    if (faults.rate !== undefined) {
      filters.push('rate');
      args.push(`rate=${faults.rate}`);
    }
    this.server = await startNbdkit({ plugin: 'file', args, filters, socket: this.socket });
  }

  async stop(): Promise<void> {
    await this.server?.stop();
    this.server = undefined;
  }
}

// ---------------------------------------------------------------------------------------------
// Images

/** Undefined when the files hold the same bytes; otherwise where and how much they differ. */
export async function difference(a: string, b: string): Promise<string | undefined> {
  const fa = await open(a, 'r');
  const fb = await open(b, 'r');
  try {
    const [sa, sb] = [(await fa.stat()).size, (await fb.stat()).size];
    const ba = Buffer.alloc(4 * MiB);
    const bb = Buffer.alloc(4 * MiB);
    let first: number | undefined;
    let differing = 0;
    const common = Math.min(sa, sb);
    for (let off = 0; off < common; off += ba.length) {
      const len = Math.min(ba.length, common - off);
      await readFully(fa, ba, len, off);
      await readFully(fb, bb, len, off);
      if (ba.subarray(0, len).equals(bb.subarray(0, len))) continue;
      for (let i = 0; i < len; i++) {
        if (ba[i] === bb[i]) continue;
        first ??= off + i;
        differing++;
      }
    }
    if (sa === sb && first === undefined) return undefined;
    const sizes = sa === sb ? '' : `sizes ${sa} and ${sb}; `;
    return `${sizes}${differing} bytes differ${first === undefined ? '' : `, the first at offset ${first}`}`;
  } finally {
    await fa.close();
    await fb.close();
  }
}

async function readFully(fh: Awaited<ReturnType<typeof open>>, buf: Buffer, len: number, pos: number) {
  let done = 0;
  while (done < len) {
    const { bytesRead } = await fh.read(buf, done, len - done, pos + done);
    if (bytesRead === 0) throw new Error(`short read at ${pos + done}`);
    done += bytesRead;
  }
}

export async function workdir(name: string): Promise<string> {
  return mkdtemp(join(tmpdir(), `ferry-fault-${name}-`));
}

// ---------------------------------------------------------------------------------------------
// A replication set under test

export interface FaultDisk {
  readonly id: string;
  /** The source image: the truth every replica is compared with. */
  readonly source: string;
  /** How ferry reads it: file:PATH by default, or an NBD URI (nbdkit with faults). */
  sourceUri: string;
  /** The target as given to ferry: file:PATH, or ferry://HOST:PORT/ID. */
  target: string;
  /** The image the target writes (for ferry:// the node's file). */
  readonly replica: string;
  /** Change map of the current cycle; undefined means a full copy. */
  changed: string | undefined;
  /** The node's join file, for a ferry:// target (the job file's "join"). */
  readonly joinFile?: string | undefined;
  /** Copy of the source as of the latest published checkpoint (absent before the first). */
  readonly shadow: string;
}

export interface CheckpointEntry {
  readonly id: string;
  readonly disks: readonly { disk: string; target: string; targetRef?: string }[];
}

export interface Listing {
  readonly run: Run;
  readonly checkpoints: readonly CheckpointEntry[];
  readonly ids: readonly string[];
}

export interface FaultSetOptions {
  /** Disk ids (default one disk, "d0"). */
  readonly disks?: readonly string[];
  /** Bytes per disk. */
  readonly size?: number;
  readonly seed?: number;
  /** Share of the disk holding data (the rest are holes). */
  readonly allocated?: number;
  /** The state directory (default <dir>/state); a mount point for ENOSPC. */
  readonly stateDir?: string;
  /** Where the replicas live (default <dir>/replica); a mount point for ENOSPC. */
  readonly replicaDir?: string;
  /** Replicate to a `ferry serve` node: its address and its image directory. */
  readonly node?: { readonly address: string; readonly images: string; readonly joinFile?: string };
  /** Extra replicate parameters (flags). */
  readonly params?: readonly string[];
}

/**
 * Progress is made durable every MiB (the default is 500 MiB), so on these small disks a kill
 * mid-transfer finds a resume point, as it would on a real disk.
 */
export const DEFAULT_PARAMS = ['--checkpoint-interval', '1MiB'] as const;

/**
 * Slow enough for a source limited to a few Mbit/s to take seconds, so a kill lands mid-transfer:
 * small chunks, a fixed window of a few chunks, progress made durable every chunk.
 */
export const SLOW_PARAMS = [
  '--chunk-size',
  '256KiB',
  '--window',
  '1MiB',
  '--no-adaptive',
  '--checkpoint-interval',
  '256KiB',
] as const;

/** A change shape small enough to transfer in a few seconds through a 4 Mbit/s source. */
export const SMALL_CHANGE = { smallWrites: 200, largeWrites: 2, largeSize: MiB } as const;

/**
 * One replication set in its own directory: sources, replicas, state, job file, and a shadow copy
 * of each source at the latest published checkpoint (what the previous checkpoint must still hold).
 */
export class FaultSet {
  readonly state: string;
  readonly job: string;
  readonly disks: FaultDisk[];
  params: string[];
  /** Checkpoint ids known to be published, in order. */
  published: string[] = [];

  private constructor(
    readonly dir: string,
    readonly set: string,
    readonly size: number,
    disks: FaultDisk[],
    params: string[],
    state: string | undefined,
  ) {
    this.state = state ?? join(dir, 'state');
    this.job = join(dir, 'job.json');
    this.disks = disks;
    this.params = params;
  }

  static async create(name: string, opts: FaultSetOptions = {}): Promise<FaultSet> {
    const dir = await workdir(name);
    const size = opts.size ?? 16 * MiB;
    const replicaDir = opts.replicaDir ?? join(dir, 'replica');
    await mkdir(replicaDir, { recursive: true });
    await mkdir(join(dir, 'source'), { recursive: true });
    await mkdir(join(dir, 'shadow'), { recursive: true });
    const disks: FaultDisk[] = [];
    for (const [i, id] of (opts.disks ?? ['d0']).entries()) {
      const source = join(dir, 'source', `${id}.img`);
      await createDiskImage(source, {
        size,
        seed: (opts.seed ?? 1) * 100 + i,
        allocated: opts.allocated ?? 0.6,
      });
      const remote = opts.node;
      disks.push({
        id,
        source,
        sourceUri: `file:${source}`,
        target: remote ? `ferry://${remote.address}/${id}` : `file:${join(replicaDir, `${id}.img`)}`,
        replica: remote ? join(remote.images, id) : join(replicaDir, `${id}.img`),
        joinFile: remote?.joinFile,
        changed: undefined,
        shadow: join(dir, 'shadow', `${id}.img`),
      });
    }
    return new FaultSet(dir, name, size, disks, [...(opts.params ?? DEFAULT_PARAMS)], opts.stateDir);
  }

  disk(id: string): FaultDisk {
    const d = this.disks.find((x) => x.id === id);
    if (!d) throw new Error(`no disk ${id}`);
    return d;
  }

  get remote(): boolean {
    return this.disks.some((d) => d.target.startsWith('ferry://'));
  }

  /** The replicate command of the current cycle (job file written by replicate()). */
  replicateArgs(): string[] {
    return ['replicate', '--job', this.job, '--state', this.state, ...this.params];
  }

  async writeJob(): Promise<void> {
    const job = {
      set: this.set,
      disks: this.disks.map((d) => ({
        id: d.id,
        source: d.sourceUri,
        target: d.target,
        ...(d.changed === undefined ? {} : { changed: d.changed }),
        ...(d.joinFile === undefined ? {} : { join: d.joinFile }),
      })),
    };
    await writeFile(this.job, `${JSON.stringify(job, null, 2)}\n`);
  }

  /**
   * Runs the current cycle and SIGKILLs it once `ready()` holds; the trigger must have fired (a run
   * that ended first could not be interrupted, and the case would test nothing).
   */
  async replicateKilledWhen(ready: () => Promise<boolean>, what: string): Promise<Run> {
    let trigger: KillTrigger = { fired: false };
    const run = await this.replicate({ onSpawn: (child) => (trigger = killWhen(child, ready)) });
    expect(trigger.fired, `${what}: the run ended before the fault was injected: ${describeRun(run)}`).toBe(
      true,
    );
    return run;
  }

  /** Runs the current cycle's command (rewriting the job file from the disks first). */
  async replicate(opts: RunOptions = {}): Promise<Run> {
    await this.writeJob();
    return ferry(this.replicateArgs(), opts);
  }

  /** The current cycle without a fault, in this process (see replicateInProcess). */
  async replicateHere(): Promise<Run> {
    await this.writeJob();
    return replicateInProcess(this.job, this.state, this.params);
  }

  /** The set's checkpoints read from the state directory in this process (after a clean run). */
  async checkpointsHere(): Promise<Omit<Listing, 'run'>> {
    const checkpoints = await new LocalStateStore(this.state).listCheckpoints(this.set);
    return { checkpoints, ids: checkpoints.map((c) => c.id) };
  }

  async checkpoints(): Promise<Listing> {
    const run = await ferry(['checkpoints', '--json', '--state', this.state, '--set', this.set]);
    expect(run.code, `checkpoints must keep working: ${describeRun(run)}`).toBe(0);
    const value = JSON.parse(run.stdout) as unknown;
    const list = (Array.isArray(value) ? value : (value as { checkpoints: unknown }).checkpoints) as
      | CheckpointEntry[]
      | undefined;
    expect(Array.isArray(list), `checkpoints --json printed ${run.stdout.slice(0, 200)}`).toBe(true);
    return { run, checkpoints: list!, ids: list!.map((c) => c.id) };
  }

  /**
   * The checkpoint verifies. After a fault, through `ferry verify` (the command an operator runs,
   * which may first finish or roll back an interrupted commit); after a clean rerun, the images are
   * re-hashed in this process (the same check, without the cost of a process). A node's images are
   * checked both ways: `ferry verify --join` through the node, then re-hashed here.
   */
  async assertVerifies(what: string, entry: CheckpointEntry, how: 'command' | 'direct'): Promise<void> {
    if (how === 'command') {
      // Toward a node, verify goes through it with the join file (the node settles a commit whose
      // publication it never heard of, then re-hashes); the images are also re-hashed here below.
      const join = this.disks.find((d) => d.joinFile !== undefined)?.joinFile;
      const run = await ferry([
        'verify',
        '--set',
        this.set,
        '--state',
        this.state,
        ...(join ? ['--join', join] : []),
      ]);
      expect(run.code, `${what}: ferry verify of ${entry.id} must pass: ${describeRun(run)}`).toBe(0);
      if (!this.remote) return;
    }
    for (const cd of entry.disks) {
      const report = await verifyFileImage(this.disk(cd.disk).replica, cd.targetRef);
      expect(
        report.ok,
        `${what}: image of disk ${cd.disk} must verify against ${entry.id}: ${JSON.stringify(report)}`,
      ).toBe(true);
    }
  }

  /** Every replica holds exactly its source's bytes. */
  async assertBitExact(what: string): Promise<void> {
    for (const d of this.disks) {
      const diff = await difference(d.source, d.replica);
      expect(diff === undefined, `${what}: replica of disk ${d.id} differs from its source: ${diff}`).toBe(
        true,
      );
    }
  }

  /** Every replica still holds exactly what the previous checkpoint recorded. */
  async assertHoldsPrevious(what: string): Promise<void> {
    for (const d of this.disks) {
      if (!(await exists(d.shadow))) continue;
      const diff = await difference(d.shadow, d.replica);
      expect(
        diff === undefined,
        `${what}: replica of disk ${d.id} no longer holds the previous checkpoint: ${diff}`,
      ).toBe(true);
    }
  }

  /** Records a publication: the shadows become copies of the sources as they are now. */
  private async accept(id: string): Promise<void> {
    this.published.push(id);
    for (const d of this.disks) await copyFile(d.source, d.shadow);
  }

  /** A full copy that must publish bit-exact: the baseline most faults start from. */
  async seed(): Promise<void> {
    for (const d of this.disks) d.changed = undefined;
    await this.cycle('seed');
  }

  /**
   * Runs the current cycle without a fault and requires it to publish a bit-exact checkpoint (a set
   * up step: the published id is read from the result, not from a second process listing it).
   */
  async cycle(what: string): Promise<Run> {
    const run = await this.replicateHere();
    expect(run.code, `${what}: ${describeRun(run)}`).toBe(0);
    const id = (JSON.parse(run.stdout) as { checkpoint: { id: string } }).checkpoint.id;
    expect(this.published, `${what}: a new checkpoint`).not.toContain(id);
    await this.assertBitExact(`${what} (${id})`);
    await this.accept(id);
    return run;
  }

  /** Changes every source the way a guest does and writes each disk's change map. */
  async mutate(seed: number, shape: Parameters<typeof mutateDisk>[1] | object = SMALL_CHANGE): Promise<void> {
    for (const [i, d] of this.disks.entries()) {
      const extents = await mutateDisk(d.source, { size: this.size, ...shape, seed: seed * 10 + i });
      d.changed = join(this.dir, `changes-${seed}-${d.id}.json`);
      await writeFile(d.changed, JSON.stringify(extents));
    }
  }

  /** Path of a disk's durable progress record. */
  progressFile(disk: string): string {
    return join(this.state, 'progress', encodeURIComponent(this.set), `${encodeURIComponent(disk)}.json`);
  }

  catalogFile(sequence: number): string {
    return join(
      this.state,
      'catalog',
      encodeURIComponent(this.set),
      `${String(sequence).padStart(8, '0')}.json`,
    );
  }

  /** Trigger: some disk has made progress durable (bytes are moving and a resume point exists). */
  progressSaved(): () => Promise<boolean> {
    return async () => {
      for (const d of this.disks) if (await exists(this.progressFile(d.id))) return true;
      return false;
    };
  }

  /**
   * Checks the contract after `run` (the faulted one) and returns the outcome for the table.
   * If nothing was published, the previous checkpoint must verify and hold the previous bytes, and
   * `rerun` (default: the same job, no fault, in this process) must publish bit-exact.
   */
  async checkContract(run: Run, opts: { rerun?: () => Promise<Run>; what?: string } = {}): Promise<string> {
    const what = opts.what ?? 'after the fault';
    expect(run.hung, `${what}: the faulted run hung: ${describeRun(run)}`).toBe(false);
    const before = [...this.published];
    const listing = await this.checkpoints();
    const fresh = listing.ids.filter((id) => !before.includes(id));
    expect(
      before.every((id) => listing.ids.includes(id)),
      `${what}: a published checkpoint disappeared`,
    ).toBe(true);
    expect(fresh.length, `${what}: at most one new checkpoint, got ${fresh.join(', ')}`).toBeLessThanOrEqual(
      1,
    );
    if (run.code === 0) {
      expect(fresh, `${what}: the run exited 0, so it must have published: ${describeRun(run)}`).toHaveLength(
        1,
      );
    }
    if (fresh.length === 1) {
      // (a) published: bit-exact against the source, and it verifies.
      await this.assertBitExact(`${what}: published ${fresh[0]}`);
      // After a crash the clean-up may be pending: `ferry verify` is what finishes it, as an operator would.
      await this.assertVerifies(what, listing.checkpoints.find((c) => c.id === fresh[0])!, 'command');
      await this.accept(fresh[0]!);
      return 'published bit-exact';
    }
    // (b) nothing published.
    // Exit 2 is a refused configuration; any other failure (or a signal) stopped a run under way.
    const how = run.signal !== null ? 'killed' : run.code === 2 ? 'refused' : 'failed';
    if (run.signal === null) {
      // A failure is one clear line, never a stack trace.
      expect(run.stderr, `${what}: a failed run says why: ${describeRun(run)}`).toMatch(/^ferry: \S/m);
      expect(run.stderr, `${what}: no stack trace: ${describeRun(run)}`).not.toMatch(/\n\s+at \S+ \(/);
    }
    const previous = listing.checkpoints.find((c) => c.id === before[before.length - 1]);
    if (previous !== undefined) {
      await this.assertVerifies(`${what}: previous checkpoint`, previous, 'command');
      await this.assertHoldsPrevious(`${what}: previous checkpoint ${previous.id}`);
    }
    const again = await (opts.rerun ?? (() => this.replicateHere()))();
    expect(again.code, `${what}: the rerun must complete: ${describeRun(again)}`).toBe(0);
    const after = await this.checkpointsHere();
    const rerunFresh = after.ids.filter((id) => !before.includes(id));
    expect(rerunFresh, `${what}: the rerun publishes exactly one checkpoint`).toHaveLength(1);
    await this.assertBitExact(`${what}: rerun's ${rerunFresh[0]}`);
    await this.assertVerifies(
      `${what}: rerun`,
      after.checkpoints.find((c) => c.id === rerunFresh[0])!,
      'direct',
    );
    await this.accept(rerunFresh[0]!);
    return `${how}, ${previous ? 'previous verifies' : 'nothing published'}, rerun bit-exact`;
  }

  async remove(): Promise<void> {
    await rm(this.dir, { recursive: true, force: true });
  }
}

/** Asserts the run was stopped by SIGKILL: the crash hook (or the trigger) actually fired. */
export function expectKilled(run: Run, point: string): void {
  expect(
    run.signal,
    `${point}: the run was not killed there (crash hook ${CRASH_ENV}=${point} not implemented?): ${describeRun(run)}`,
  ).toBe('SIGKILL');
}

// ---------------------------------------------------------------------------------------------
// Mounts (ENOSPC)

export interface SmallMount {
  readonly dir: string;
  readonly kind: string;
  /** Grow (or shrink) the filesystem in place. */
  resize(bytes: number): Promise<void>;
  unmount(): Promise<void>;
}

function sh(cmd: string, args: string[]): Promise<{ code: number | null; out: string }> {
  return new Promise((resolve) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.on('data', (b) => {
      out += b;
    });
    child.stderr.on('data', (b) => {
      out += b;
    });
    child.on('error', (err) => resolve({ code: -1, out: String(err) }));
    child.on('close', (code) => resolve({ code, out: out.trim() }));
  });
}

/**
 * A small filesystem at `dir`: a tmpfs, or else a loop-mounted ext4 image. Returns the reason when
 * neither can be mounted here (not root, no mount permission in a container, ...).
 */
export async function mountSmall(dir: string, bytes: number): Promise<SmallMount | { reason: string }> {
  await mkdir(dir, { recursive: true });
  const tmpfs = await sh('mount', ['-t', 'tmpfs', '-o', `size=${bytes}`, 'tmpfs', dir]);
  if (tmpfs.code === 0) {
    return {
      dir,
      kind: 'tmpfs',
      resize: async (size) => {
        const r = await sh('mount', ['-o', `remount,size=${size}`, dir]);
        if (r.code !== 0) throw new Error(`remount ${dir}: ${r.out}`);
      },
      unmount: async () => {
        await sh('umount', [dir]);
      },
    };
  }
  const image = `${dir}.ext4`;
  const fh = await open(image, 'w');
  await fh.truncate(bytes);
  await fh.close();
  const mkfs = await sh('mkfs.ext4', ['-q', '-F', '-m', '0', image]);
  const loop = mkfs.code === 0 ? await sh('mount', ['-o', 'loop', image, dir]) : mkfs;
  if (loop.code === 0) {
    return {
      dir,
      kind: 'ext4 on a loop device',
      resize: async (size) => {
        const t = await open(image, 'r+');
        await t.truncate(size);
        await t.close();
        const dev = (await sh('findmnt', ['-n', '-o', 'SOURCE', dir])).out;
        const a = await sh('losetup', ['-c', dev]);
        const b = a.code === 0 ? await sh('resize2fs', [dev]) : a;
        if (b.code !== 0) throw new Error(`grow ${dir}: ${b.out}`);
      },
      unmount: async () => {
        await sh('umount', [dir]);
        await rm(image, { force: true });
      },
    };
  }
  await rm(image, { force: true });
  return { reason: `tmpfs: ${tmpfs.out}; loop-mounted ext4: ${loop.out}` };
}

// ---------------------------------------------------------------------------------------------
// Cases and the outcome table

interface Row {
  readonly name: string;
  readonly fault: string;
  outcome: string;
  result: 'pass' | 'FAIL' | 'not runnable';
  ms: number;
}

const rows: Row[] = [];

/** What a case can tell its row in the table. */
export interface CaseRow {
  /** Adds a detail to the outcome (what happened, counts). */
  note(detail: string): void;
  /** The case cannot run on this machine: say why, and skip it (never fake it). */
  notRunnable(reason: string): never;
}

/**
 * One case of the matrix: `act` injects the fault, checks the contract and returns the outcome;
 * the row goes into the table whatever happens (a failure shows its first line). Cases of a file
 * run concurrently (each has its own directories, sockets and processes): they mostly wait on
 * child processes, so this keeps the suite's wall time small on a 2-core machine.
 */
export function faultCase(
  name: string,
  fault: string,
  act: (row: CaseRow) => Promise<string>,
  timeoutMs = 150_000,
): void {
  it.concurrent(
    name,
    async (ctx: TestContext) => {
      const row: Row = { name, fault, outcome: '', result: 'pass', ms: 0 };
      rows.push(row);
      const notes: string[] = [];
      const started = performance.now();
      try {
        row.outcome = await act({
          note: (detail) => notes.push(detail),
          notRunnable: (reason) => {
            row.result = 'not runnable';
            row.outcome = `NOT RUNNABLE HERE: ${reason}`.slice(0, 200);
            ctx.skip(reason);
            throw new Error('unreachable: skipped');
          },
        });
        if (notes.length) row.outcome += ` (${notes.join('; ')})`;
      } catch (err) {
        if (row.result !== 'not runnable') {
          row.result = 'FAIL';
          row.outcome = String((err as Error).message ?? err)
            .split('\n')[0]!
            .replace(/\/tmp\/ferry-fault-[^/\s]+/g, '…')
            .slice(0, 240);
        }
        throw err;
      } finally {
        row.ms = performance.now() - started;
      }
    },
    timeoutMs,
  );
}

/** Prints this file's table of cases after its last case, and kills anything a case leaked. */
export function reportTable(title: string): void {
  afterAll(() => {
    for (const child of live) child.kill('SIGKILL');
    const head = ['case', 'fault', 'result', 'outcome', 'duration'];
    const body = rows.map((r) => [r.name, r.fault, r.result, r.outcome, `${(r.ms / 1000).toFixed(1)} s`]);
    const widths = head.map((h, i) => Math.max(h.length, ...body.map((b) => b[i]!.length)));
    const line = (cells: string[]) => `| ${cells.map((c, i) => c.padEnd(widths[i]!)).join(' | ')} |`;
    const rule = `|${widths.map((w) => '-'.repeat(w + 2)).join('|')}|`;
    console.log([`fault matrix: ${title}`, line(head), rule, ...body.map(line)].join('\n'));
  });
}
