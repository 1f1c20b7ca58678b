// Replication through the real engine to a Ferry node over TCP: bit-exact under budgets, cuts, WAN.
import { type ChildProcess, spawn } from 'node:child_process';
import { mkdtemp, readFile, writeFile } from 'node:fs/promises';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { type JobSpec, runLocalJob } from '../../cli/run.ts';
import { ConfigError, type FerryError, TransferError } from '../../shared/engine/errors.ts';
import type { Extent } from '../../shared/engine/extents.ts';
import type { ReplicationEvent } from '../../shared/engine/replicate.ts';
import { MiB } from '../../shared/engine/units.ts';
import { verifyFileImage } from '../../shared/local/file-target.ts';
import { ImageDirectory } from '../../shared/local/image-dir.ts';
import { LocalStateStore } from '../../shared/local/state-dir.ts';
import { createDiskImage, firstDifference, mutateDisk } from '../../shared/local/workload.ts';
import { type NodeOptions, type ReplicationNode, startNode } from '../../shared/net/node.ts';
import { FRAME_TYPES } from '../../shared/net/protocol.ts';
import { parseFerryUri, RemoteTarget } from '../../shared/net/remote-target.ts';
import { startWanLink } from '../../shared/netem/wan-link.ts';

const cleanups: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (let c = cleanups.pop(); c; c = cleanups.pop()) await c();
});

// The node's credit is the real window, so the source runs at the top level with a fixed window:
// it never holds back a chunk the node would take.
const SOURCE_PARAMS = { chunkSize: '1 MiB', window: '64 MiB', adaptive: false };

async function workdir(): Promise<string> {
  return mkdtemp(join(tmpdir(), 'ferry-remote-'));
}

async function startTestNode(
  opts: Partial<NodeOptions> = {},
): Promise<{ node: ReplicationNode; images: string; nodeState: string; log: string[] }> {
  const images = await workdir();
  const nodeState = await workdir();
  const log: string[] = [];
  // Plain TCP on loopback: the proxies below cut connections by what the frames say (TLS is
  // test/net/tls.test.ts's).
  const node = await startNode({
    listen: '127.0.0.1:0',
    targets: await ImageDirectory.open(images),
    stateDir: nodeState,
    insecure: true,
    log: (line) => log.push(line),
    ...opts,
  });
  cleanups.push(() => node.close());
  return { node, images, nodeState, log };
}

interface DiskCase {
  id: string;
  source: string;
  changed?: string;
}

async function replicateTo(
  port: number,
  stateDir: string,
  disks: DiskCase[],
  events: ReplicationEvent[] = [],
  query = '',
) {
  const spec: JobSpec = {
    set: 'remote',
    disks: disks.map((d) => ({
      id: d.id,
      source: `file:${d.source}`,
      target: `ferry://127.0.0.1:${port}/${d.id}${query}`,
      ...(d.changed ? { changed: d.changed } : {}),
    })),
    params: SOURCE_PARAMS,
  };
  return runLocalJob(spec, { stateDir, onEvent: (e) => events.push(e), insecure: true });
}

async function changeFile(dir: string, name: string, extents: Extent[]): Promise<string> {
  const path = join(dir, `${name}.changes.json`);
  await writeFile(path, JSON.stringify(extents));
  return path;
}

/**
 * A TCP proxy that cuts connections after each `everyBytes` sent upstream: every connection
 * (`all`), or (`one`) only the next one to start a CHUNK frame, whose first read it swallows, so
 * the node never learns of that chunk.
 */
async function startCuttingProxy(
  port: number,
  everyBytes: number,
  maxCuts: number,
  mode: 'all' | 'one' = 'all',
) {
  const sockets = new Set<net.Socket>();
  let upBytes = 0;
  let nextCut = everyBytes;
  let cuts = 0;
  const server = net.createServer((client) => {
    const upstream = net.connect({ host: '127.0.0.1', port });
    for (const s of [client, upstream]) {
      sockets.add(s);
      s.on('error', () => {});
      s.on('close', () => {
        sockets.delete(s);
        client.destroy();
        upstream.destroy();
      });
    }
    upstream.pipe(client);
    client.on('data', (b: Buffer) => {
      upBytes += b.length;
      const chunkStart = b.length >= 5 && b[4] === FRAME_TYPES.chunk;
      if (cuts < maxCuts && upBytes >= nextCut && (mode === 'all' || chunkStart)) {
        nextCut = upBytes + everyBytes;
        cuts++;
        for (const s of mode === 'all' ? [...sockets] : [client, upstream]) s.destroy();
        if (mode === 'one') return;
      }
      if (!upstream.write(b)) {
        client.pause();
        upstream.once('drain', () => client.resume());
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  cleanups.push(async () => {
    for (const s of sockets) s.destroy();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  });
  return { port: (server.address() as net.AddressInfo).port, cuts: () => cuts };
}

describe('replication to a Ferry node', () => {
  it('replicates a full copy, then a fragmented increment; the image is bit-identical each time', async () => {
    // Prepare
    const { node, images, nodeState } = await startTestNode();
    const dir = await workdir();
    const src = join(dir, 'd0.img');
    const state = join(dir, 'state');
    await createDiskImage(src, { size: 24 * MiB, seed: 11 });

    // Act 1: full copy.
    const full = await replicateTo(node.port, state, [{ id: 'd0', source: src }]);

    // Assess 1
    expect(await firstDifference(src, join(images, 'd0'))).toBeUndefined();
    const disk = full.checkpoint.disks[0]!;
    expect(disk).toMatchObject({ kind: 'full', target: `ferry://127.0.0.1:${node.port}/d0` });
    expect(disk.targetRef).toMatch(/^manifest-sha256:/);
    expect((await verifyFileImage(join(images, 'd0'), disk.targetRef)).ok).toBe(true);
    const record = JSON.parse(await readFile(join(nodeState, 'commits', 'd0.json'), 'utf8'));
    expect(record).toMatchObject({ disk: 'd0', kind: 'full', targetRef: disk.targetRef });

    // Act 2: thousands of small scattered writes, a few large runs, some zeroed blocks.
    const changes = await mutateDisk(src, { size: 24 * MiB, seed: 12, smallWrites: 3000, largeWrites: 3 });
    const events: ReplicationEvent[] = [];
    const inc = await replicateTo(
      node.port,
      state,
      [{ id: 'd0', source: src, changed: await changeFile(dir, 'd0', changes) }],
      events,
    );

    // Assess 2
    const planned = events.find((e) => e.type === 'planned');
    expect(planned).toMatchObject({ kind: 'incremental' });
    expect((planned as { extents: number }).extents).toBeGreaterThan(1000);
    expect(inc.checkpoint.parent).toBe(full.checkpoint.id);
    expect(await firstDifference(src, join(images, 'd0'))).toBeUndefined();
    expect((await verifyFileImage(join(images, 'd0'), inc.checkpoint.disks[0]!.targetRef)).ok).toBe(true);
    const stats = node.stats();
    expect(stats.peakHeldBytes).toBeLessThanOrEqual(stats.budget);
    expect(stats).toMatchObject({ inflightBytes: 0, violations: 0 });
  });

  it('replicates several disks at once, never holding more than the node budget', async () => {
    // Prepare: three disks whose windows (4 MiB each) add up to more than the 5 MiB budget.
    const budget = 5 * MiB;
    const { node, images } = await startTestNode({
      nodeBudget: budget,
      levels: [2 * MiB, 4 * MiB],
      initialWindow: 4 * MiB,
    });
    const dir = await workdir();
    const disks: DiskCase[] = [];
    for (const [i, size] of [12 * MiB, 8 * MiB, 16 * MiB].entries()) {
      const source = join(dir, `m${i}.img`);
      await createDiskImage(source, { size, seed: 20 + i });
      disks.push({ id: `m${i}`, source });
    }

    // Act
    const result = await replicateTo(node.port, join(dir, 'state'), disks, [], '?connections=3');

    // Assess
    expect(result.checkpoint.disks.map((d) => d.disk)).toEqual(['m0', 'm1', 'm2']);
    for (const d of disks) expect(await firstDifference(d.source, join(images, d.id))).toBeUndefined();
    const stats = node.stats();
    // The budget was reached (the disks wanted more) and never exceeded.
    expect(stats.peakHeldBytes).toBe(budget);
    expect(stats.peakInflightBytes).toBeLessThanOrEqual(budget);
    expect(stats.bytesWritten).toBeGreaterThanOrEqual(36 * MiB);
    expect(stats.violations).toBe(0);
  });

  it('shares a budget of a single chunk between two disks without starving either', async () => {
    // Prepare: only one disk can hold credit at a time; a disk that has finished must give back
    // what it holds, or the other waits forever.
    const { node, images } = await startTestNode({ nodeBudget: MiB, levels: [MiB], initialWindow: MiB });
    const dir = await workdir();
    const disks: DiskCase[] = [];
    for (const [i, size] of [3 * MiB, 6 * MiB].entries()) {
      const source = join(dir, `s${i}.img`);
      await createDiskImage(source, { size, seed: 60 + i, allocated: 1 });
      disks.push({ id: `s${i}`, source });
    }

    await replicateTo(node.port, join(dir, 'state'), disks);

    for (const d of disks) expect(await firstDifference(d.source, join(images, d.id))).toBeUndefined();
    expect(node.stats().peakHeldBytes).toBe(MiB);
  });

  it('rides out connections cut mid-run: bit-exact replica, checkpoint published', async () => {
    // Prepare: every connection is cut after each 5 MiB sent, three times over.
    const { node, images, log } = await startTestNode();
    const proxy = await startCuttingProxy(node.port, 5 * MiB, 3);
    const dir = await workdir();
    const src = join(dir, 'c0.img');
    const state = join(dir, 'state');
    await createDiskImage(src, { size: 32 * MiB, seed: 31, allocated: 0.9 });
    const events: ReplicationEvent[] = [];

    // Act
    const result = await replicateTo(proxy.port, state, [{ id: 'c0', source: src }], events);

    // Assess
    expect(proxy.cuts()).toBe(3);
    expect(events.some((e) => e.type === 'retry')).toBe(true);
    expect(await firstDifference(src, join(images, 'c0'))).toBeUndefined();
    const latest = await new LocalStateStore(state).latestCheckpoint('remote');
    expect(latest?.id).toBe(result.checkpoint.id);
    expect((await verifyFileImage(join(images, 'c0'), latest!.disks[0]!.targetRef)).ok).toBe(true);
    // The node restarted the session after each cut and kept what was already written.
    expect(log.filter((l) => l.includes('resuming')).length).toBeGreaterThanOrEqual(1);
    expect(node.stats().peakHeldBytes).toBeLessThanOrEqual(node.stats().budget);
  });

  it('rides out single lost connections while the others carry on, getting back the lost credit', async () => {
    // Prepare: a window of two chunks, so credit that went down with a connection and never came
    // back would stall the disk for good.
    const { node, images, log } = await startTestNode({
      nodeBudget: 2 * MiB,
      levels: [2 * MiB],
      initialWindow: 2 * MiB,
    });
    const proxy = await startCuttingProxy(node.port, MiB + 12345, 6, 'one');
    const dir = await workdir();
    const src = join(dir, 'o0.img');
    await createDiskImage(src, { size: 12 * MiB, seed: 71, allocated: 1 });

    await replicateTo(proxy.port, join(dir, 'state'), [{ id: 'o0', source: src }]);

    expect(proxy.cuts()).toBe(6);
    expect(await firstDifference(src, join(images, 'o0'))).toBeUndefined();
    // The session lived through every cut: the node never had to start it afresh.
    expect(log.filter((l) => l.includes('resuming'))).toEqual([]);
  });

  it('rides out cuts during a fragmented increment, staged until commit', async () => {
    const { node, images } = await startTestNode();
    const dir = await workdir();
    const src = join(dir, 'c1.img');
    const state = join(dir, 'state');
    await createDiskImage(src, { size: 16 * MiB, seed: 41 });
    await replicateTo(node.port, state, [{ id: 'c1', source: src }]);
    const changes = await mutateDisk(src, { size: 16 * MiB, seed: 42, smallWrites: 2000, largeWrites: 2 });
    const proxy = await startCuttingProxy(node.port, 2 * MiB, 2);

    await replicateTo(proxy.port, state, [
      { id: 'c1', source: src, changed: await changeFile(dir, 'c1', changes) },
    ]);

    expect(proxy.cuts()).toBe(2);
    expect(await firstDifference(src, join(images, 'c1'))).toBeUndefined();
  });

  it('replicates through a WAN link with 20 ms RTT', async () => {
    // Prepare
    const { node, images } = await startTestNode();
    const link = await startWanLink({
      target: { host: '127.0.0.1', port: node.port },
      rttMs: 20,
      rateBitsPerSec: 400e6,
    });
    cleanups.push(() => link.close());
    const dir = await workdir();
    const src = join(dir, 'w0.img');
    await createDiskImage(src, { size: 16 * MiB, seed: 51 });

    // Act
    await replicateTo(link.port, join(dir, 'state'), [{ id: 'w0', source: src }]);

    // Assess
    expect(await firstDifference(src, join(images, 'w0'))).toBeUndefined();
    expect(link.stats().connections).toBeGreaterThanOrEqual(4);
    expect(link.stats().bytesUp).toBeGreaterThan(16 * MiB * 0.6);
  });
});

describe('ferry serve', () => {
  const BIN = join(import.meta.dirname, '../../bin/ferry.mjs');

  /** Runs the CLI; `output(re)` resolves once its stdout matches `re`. */
  function ferry(args: string[]) {
    const child: ChildProcess = spawn(process.execPath, [BIN, ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    cleanups.push(async () => {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    });
    let stdout = '';
    let stderr = '';
    const waiters: { re: RegExp; resolve: (m: RegExpMatchArray) => void }[] = [];
    child.stdout!.on('data', (b) => {
      stdout += b;
      for (const w of [...waiters]) {
        const m = stdout.match(w.re);
        if (m) {
          waiters.splice(waiters.indexOf(w), 1);
          w.resolve(m);
        }
      }
    });
    child.stderr!.on('data', (b) => {
      stderr += b;
    });
    const exited = new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) =>
      child.on('close', (code) => resolve({ code, stdout, stderr })),
    );
    const output = (re: RegExp) =>
      new Promise<RegExpMatchArray>((resolve, reject) => {
        waiters.push({ re, resolve });
        void exited.then((r) => reject(new Error(`exited ${r.code} before printing ${re}: ${r.stderr}`)));
      });
    return { child, exited, output };
  }

  it('serves a replication from the command line and stops cleanly on SIGTERM', async () => {
    // Prepare
    const images = await workdir();
    const dir = await workdir();
    const src = join(dir, 'cli0.img');
    await createDiskImage(src, { size: 8 * MiB, seed: 81 });
    const serve = ferry([
      'serve',
      '--listen',
      '127.0.0.1:0',
      '--target',
      `file:${images}`,
      '--node-budget',
      '64MiB',
      '--insecure',
    ]);
    const [, address] = await serve.output(/ferry node listening on (127\.0\.0\.1:\d+)/);

    // Act
    const run = ferry([
      'replicate',
      '--source',
      `file:${src}`,
      '--target',
      `ferry://${address}/cli0`,
      '--state',
      join(dir, 'state'),
      '--window',
      '64MiB',
      '--no-adaptive',
      '--insecure',
      '--json',
    ]);
    const replicated = await run.exited;
    serve.child.kill('SIGTERM');
    const stopped = await serve.exited;

    // Assess
    expect(replicated.code).toBe(0);
    expect(JSON.parse(replicated.stdout).checkpoint.disks[0].target).toBe(`ferry://${address}/cli0`);
    expect(await firstDifference(src, join(images, 'cli0'))).toBeUndefined();
    expect(stopped.code).toBe(0);
    expect(stopped.stdout).toMatch(/ferry node stopped/);
    expect(stopped.stderr).toMatch(/committed 8 chunks/);
  });
});

describe('RemoteTarget', () => {
  it('parses ferry:// URIs and refuses bad ones clearly', () => {
    expect(parseFerryUri('ferry://127.0.0.1:7790/disk-1?connections=2')).toEqual({
      host: '127.0.0.1',
      port: 7790,
      disk: 'disk-1',
      connections: 2,
      name: 'ferry://127.0.0.1:7790/disk-1',
    });
    expect(parseFerryUri('ferry://[::1]:7790/d').host).toBe('::1');
    expect(() => parseFerryUri('ferry://host/d')).toThrow(/has no port/);
    expect(() => parseFerryUri('ferry://host:1/a%2F..%2Fb')).toThrow(ConfigError);
    expect(() => parseFerryUri('ferry://host:1/x..y')).toThrow(/contains "\.\."/);
    expect(() => parseFerryUri('ferry://host:1/d?connections=99')).toThrow(
      /connections=99; expected 1\.\.16/,
    );
    expect(() => parseFerryUri('ferry://host:1/d?window=1')).toThrow(/unknown parameter "window"/);
  });

  it('cannot be read from the source, and says where to verify instead', async () => {
    const t = RemoteTarget.fromUri('ferry://127.0.0.1:1/d', { insecure: true });
    await expect(t.read()).rejects.toThrow(/run "ferry verify" on the node host/);
  });

  it('fails to open against a port nobody listens on, naming the node', async () => {
    // A port that was just free: bound and released.
    const probe = net.createServer();
    await new Promise<void>((resolve) => probe.listen(0, '127.0.0.1', resolve));
    const port = (probe.address() as net.AddressInfo).port;
    await new Promise<void>((resolve) => probe.close(() => resolve()));
    const t = RemoteTarget.fromUri(`ferry://127.0.0.1:${port}/d`, { insecure: true });
    const err = await t.open(MiB, 'full', false).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(TransferError);
    expect((err as FerryError).message).toMatch(new RegExp(`ferry://127.0.0.1:${port}/d: .*ECONNREFUSED`));
    await t.close();
  });
});
