// `ferry serve` secure by default, end to end as an operator runs it: the node makes its CA and
// join file, sources replicate with a join file (flag, FERRY_JOIN or job file), credentials are
// issued scoped and revoked while the node runs, and --insecure stays on loopback.
import { type ChildProcess, spawn } from 'node:child_process';
import { mkdir, mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { MiB } from '../../shared/engine/units.ts';
import { createDiskImage, mutateDisk } from '../../shared/local/workload.ts';
import { issueCredential } from '../../shared/net/pki.ts';
import { BIN, ferry, type Run } from '../support/ferry-cli.ts';

const cleanups: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (let c = cleanups.pop(); c; c = cleanups.pop()) await c();
});

async function workdir(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'ferry-serve-tls-'));
  cleanups.push(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

/** `ferry serve ...` as a child: resolves once it prints its address (or rejects if it exits first). */
async function serve(
  args: string[],
): Promise<{ address: string; stdout: () => string; stop: () => Promise<Run> }> {
  const child: ChildProcess = spawn(process.execPath, [BIN, 'serve', ...args], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  child.stderr!.on('data', (b) => {
    stderr += b;
  });
  const exited = new Promise<Run>((resolve) =>
    child.on('close', (code, signal) => resolve({ code, signal, stdout, stderr })),
  );
  cleanups.push(async () => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    await exited;
  });
  const address = await new Promise<string>((resolve, reject) => {
    child.stdout!.on('data', (b) => {
      stdout += b;
      const m = /ferry node listening on (\S+)/.exec(stdout);
      if (m) resolve(m[1]!);
    });
    void exited.then((r) => reject(new Error(`ferry serve exited ${r.code} before listening: ${r.stderr}`)));
  });
  return {
    address,
    stdout: () => stdout,
    stop: async () => {
      child.kill('SIGTERM');
      return exited;
    },
  };
}

const replicateArgs = (src: string, target: string, state: string, ...more: string[]) => [
  'replicate',
  '--source',
  `file:${src}`,
  '--target',
  target,
  '--state',
  state,
  '--window',
  '64MiB',
  '--no-adaptive',
  ...more,
];

const describeRun = (r: Run) => `exit ${r.code}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`;

describe('ferry serve over TLS', () => {
  it('creates its CA and a 0600 join file, prints its fingerprint, and replicates bit-exact with it', async () => {
    // Prepare
    const dir = await workdir();
    const images = join(dir, 'images');
    const state = join(dir, 'node-state');
    await mkdir(images);
    const src = join(dir, 'cli0.img');
    await createDiskImage(src, { size: 8 * MiB, seed: 401 });
    const node = await serve(['--listen', '127.0.0.1:0', '--target', `file:${images}`, '--state', state]);

    // Act: --join, then FERRY_JOIN for the next cycle.
    const joinFile = join(state, 'join.json');
    const full = await ferry(
      replicateArgs(src, `ferry://${node.address}/cli0`, join(dir, 'state'), '--join', joinFile, '--json'),
    );
    const changes = await mutateDisk(src, { size: 8 * MiB, seed: 402, smallWrites: 100, largeWrites: 1 });
    await writeFile(join(dir, 'changes.json'), JSON.stringify(changes));
    const inc = await ferry(
      replicateArgs(
        src,
        `ferry://${node.address}/cli0`,
        join(dir, 'state'),
        '--changed',
        join(dir, 'changes.json'),
      ),
      { env: { ...process.env, FERRY_JOIN: joinFile } },
    );
    const stopped = await node.stop();

    // Assess
    expect(full.code, describeRun(full)).toBe(0);
    expect(inc.code, describeRun(inc)).toBe(0);
    expect((await readFile(join(images, 'cli0'))).equals(await readFile(src))).toBe(true);
    expect((await stat(joinFile)).mode & 0o777).toBe(0o600);
    const fingerprint = /ferry node fingerprint (sha256:[0-9a-f]{64})/.exec(stopped.stdout)?.[1];
    expect(fingerprint).toBe(JSON.parse(await readFile(joinFile, 'utf8')).node);
    expect(stopped.stdout).toMatch(/created the node CA in .*join file for sources \(all disks\)/);
    expect(stopped.code).toBe(0);
  });

  it('issues a scoped credential, refuses it outside its scope, and revokes it while the node runs', async () => {
    // Prepare
    const dir = await workdir();
    const images = join(dir, 'images');
    const state = join(dir, 'node-state');
    await mkdir(images);
    const node = await serve(['--listen', '127.0.0.1:0', '--target', `file:${images}`, '--state', state]);
    const erp = join(dir, 'erp.json');
    const src = join(dir, 'erp.img');
    await createDiskImage(src, { size: 4 * MiB, seed: 403 });

    // Act 1: issue, use in scope and out of it.
    const issued = await ferry([
      'serve',
      'issue-credential',
      '--state',
      state,
      '--disks',
      'erp-*',
      '--out',
      erp,
    ]);
    expect(issued.code, describeRun(issued)).toBe(0);
    const serial = /issued credential ([0-9a-f]+) for disks 'erp-\*'/.exec(issued.stdout)?.[1];
    const inScope = await ferry(
      replicateArgs(src, `ferry://${node.address}/erp-1`, join(dir, 's1'), '--join', erp),
    );
    const outOfScope = await ferry(
      replicateArgs(src, `ferry://${node.address}/hr-db`, join(dir, 's2'), '--join', erp),
    );

    // Assess 1
    expect(serial).toBeDefined();
    expect((await stat(erp)).mode & 0o777).toBe(0o600);
    expect(inScope.code, describeRun(inScope)).toBe(0);
    expect(outOfScope.code, describeRun(outOfScope)).toBe(1);
    expect(outOfScope.stderr).toContain(`credential ${serial} may not write disk hr-db (scope 'erp-*')`);
    expect((await readdir(images)).filter((f) => f.startsWith('hr-db'))).toEqual([]);

    // Act 2: revoke (by its join file) while the node runs; the same source tries again.
    const before = await readFile(join(images, 'erp-1'));
    const revoked = await ferry(['serve', 'revoke-credential', '--state', state, '--credential', erp]);
    const listed = await ferry(['serve', 'list-credentials', '--state', state]);
    await mutateDisk(src, { size: 4 * MiB, seed: 404, smallWrites: 20, largeWrites: 1, largeSize: MiB });
    const again = await ferry(
      replicateArgs(src, `ferry://${node.address}/erp-1`, join(dir, 's3'), '--join', erp),
    );

    // Assess 2
    expect(revoked.code, describeRun(revoked)).toBe(0);
    expect(revoked.stdout).toContain(`revoked credential ${serial} (disks 'erp-*')`);
    expect(listed.stdout).toMatch(new RegExp(`${serial}  disks 'erp-\\*'  issued \\S+  revoked `));
    expect(again.code, describeRun(again)).toBe(1);
    expect(again.stderr).toMatch(new RegExp(`credential ${serial} \\(scope 'erp-\\*'\\) was revoked on `));
    expect((await readFile(join(images, 'erp-1'))).equals(before)).toBe(true);
  });

  it('refuses, naming what to do: no join file, an expired one, a join file and --insecure together', async () => {
    const dir = await workdir();
    const images = join(dir, 'images');
    const state = join(dir, 'node-state');
    await mkdir(images);
    const node = await serve(['--listen', '127.0.0.1:0', '--target', `file:${images}`, '--state', state]);
    const src = join(dir, 'd.img');
    await createDiskImage(src, { size: MiB, seed: 405 });
    const old = join(dir, 'old.json');
    await issueCredential(state, old, {
      disks: '*',
      notBefore: new Date(Date.now() - 2 * 86_400_000),
      notAfter: new Date(Date.now() - 86_400_000),
    });
    const target = `ferry://${node.address}/d`;
    const env = { ...process.env };
    delete env.FERRY_JOIN;

    const none = await ferry(replicateArgs(src, target, join(dir, 's1')), { env });
    const expired = await ferry(replicateArgs(src, target, join(dir, 's2'), '--join', old), { env });
    const both = await ferry(
      replicateArgs(src, target, join(dir, 's3'), '--join', join(state, 'join.json'), '--insecure'),
      { env },
    );
    const plain = await ferry(replicateArgs(src, target, join(dir, 's4'), '--insecure'), { env });

    expect(none.code, describeRun(none)).toBe(2);
    expect(none.stderr).toMatch(/pass --join FILE .*FERRY_JOIN=FILE/);
    expect(expired.code, describeRun(expired)).toBe(2);
    expect(expired.stderr).toMatch(/credential [0-9a-f]+ expired on .*ferry serve issue-credential/);
    expect(both.code, describeRun(both)).toBe(2);
    expect(both.stderr).toContain('give --join FILE or --insecure, not both');
    expect(plain.code, describeRun(plain)).toBe(1);
    expect(plain.stderr).toContain('this node accepts only TLS 1.3 connections with a credential it issued');
    expect(await readdir(images)).toEqual([]);
  });
});

describe('ferry serve --insecure', () => {
  it('is refused on a non-loopback address, and without --state a node must be told --insecure', async () => {
    const images = await workdir();

    const wildcard = await ferry([
      'serve',
      '--listen',
      '0.0.0.0:0',
      '--target',
      `file:${images}`,
      '--insecure',
    ]);
    const noState = await ferry(['serve', '--listen', '127.0.0.1:0', '--target', `file:${images}`]);

    expect(wildcard.code, describeRun(wildcard)).toBe(2);
    expect(wildcard.stderr).toMatch(
      /--insecure \(plain TCP: no encryption, no authentication\) is refused on 0\.0\.0\.0/,
    );
    expect(wildcard.stdout).not.toMatch(/listening/);
    expect(noState.code, describeRun(noState)).toBe(2);
    expect(noState.stderr).toMatch(/give --state \(or, on loopback only, --insecure\)/);
  });

  it('on loopback warns, serves plain TCP to --insecure sources, and refuses a TLS source', async () => {
    const dir = await workdir();
    const images = join(dir, 'images');
    await mkdir(images);
    const other = join(dir, 'other-state');
    await issueCredential(other, join(dir, 'tls.json'), { disks: '*' });
    const src = join(dir, 'p.img');
    await createDiskImage(src, { size: 2 * MiB, seed: 406 });
    const node = await serve(['--listen', '127.0.0.1:0', '--target', `file:${images}`, '--insecure']);

    const tlsSource = await ferry(
      replicateArgs(src, `ferry://${node.address}/p`, join(dir, 's1'), '--join', join(dir, 'tls.json')),
    );
    const plainSource = await ferry(
      replicateArgs(src, `ferry://${node.address}/p`, join(dir, 's2'), '--insecure'),
    );
    const stopped = await node.stop();

    expect(tlsSource.code, describeRun(tlsSource)).toBe(1);
    expect(tlsSource.stderr).toMatch(/does not speak TLS: it runs with --insecure/);
    expect(plainSource.code, describeRun(plainSource)).toBe(0);
    expect((await readFile(join(images, 'p'))).equals(await readFile(src))).toBe(true);
    expect(stopped.stderr).toMatch(
      /warning: --insecure: plain TCP on 127\.0\.0\.1:\d+, no encryption and no authentication/,
    );
  });
});
