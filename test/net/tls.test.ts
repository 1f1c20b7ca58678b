// A node only its own sources can write to: TLS 1.3 with the node's CA pinned and client
// certificates it issued, scoped to disk patterns and revocable. Every refusal says why, and a
// refused source leaves the node's images exactly as they were.
import { createHash, randomBytes, X509Certificate } from 'node:crypto';
import { mkdtemp, readdir, readFile, rm, stat, unlink, writeFile } from 'node:fs/promises';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import tls from 'node:tls';
import { afterEach, describe, expect, it } from 'vitest';
import { type JobSpec, runLocalJob } from '../../cli/run.ts';
import { ConfigError, TransferError } from '../../shared/engine/errors.ts';
import { MiB } from '../../shared/engine/units.ts';
import { ImageDirectory } from '../../shared/local/image-dir.ts';
import { createDiskImage, mutateDisk } from '../../shared/local/workload.ts';
import { type JoinCredential, parseJoinFile, readJoinFile } from '../../shared/net/join.ts';
import { type NodeOptions, startNode } from '../../shared/net/node.ts';
import { issueCredential, openNodePki, revokeCredential } from '../../shared/net/pki.ts';
import {
  encodeFrame,
  type Frame,
  FrameReader,
  NO_TOKEN,
  PROTOCOL_VERSION,
} from '../../shared/net/protocol.ts';
import { RemoteTarget } from '../../shared/net/remote-target.ts';
import { parseFerryUri } from '../../shared/net/uri.ts';
import { startWanLink } from '../../shared/netem/wan-link.ts';

const cleanups: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (let c = cleanups.pop(); c; c = cleanups.pop()) await c();
});

const SOURCE_PARAMS = { chunkSize: '1 MiB', window: '64 MiB', adaptive: false };
const DAY_MS = 86_400_000;

async function workdir(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'ferry-tls-'));
  cleanups.push(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

/** A TLS node on loopback with its PKI in a fresh state directory. */
async function startTlsNode(opts: Partial<NodeOptions> = {}) {
  const images = await workdir();
  const state = await workdir();
  const pki = await openNodePki(state);
  const log: string[] = [];
  const waiters: { re: RegExp; resolve: (line: string) => void }[] = [];
  const node = await startNode({
    listen: '127.0.0.1:0',
    targets: await ImageDirectory.open(images),
    stateDir: state,
    tls: pki.tls,
    log: (line) => {
      log.push(line);
      for (const w of waiters.filter((x) => x.re.test(line))) {
        waiters.splice(waiters.indexOf(w), 1);
        w.resolve(line);
      }
    },
    ...opts,
  });
  cleanups.push(() => node.close());
  /** The first line matching `re`, once the node has logged it (what the node notices after the source has left). */
  const logged = (re: RegExp): Promise<string> => {
    const line = log.find((l) => re.test(l));
    return line !== undefined
      ? Promise.resolve(line)
      : new Promise((resolve) => waiters.push({ re, resolve }));
  };
  return { node, images, state, pki, log, logged };
}

/** A plain-TCP node on loopback (--insecure). */
async function startInsecureNode() {
  const images = await workdir();
  const log: string[] = [];
  const node = await startNode({
    listen: '127.0.0.1:0',
    targets: await ImageDirectory.open(images),
    sessionDir: images,
    insecure: true,
    log: (line) => log.push(line),
  });
  cleanups.push(() => node.close());
  return { node, images, log };
}

/** One cycle of one disk through the engine, its target's join file named per disk as in a job file. */
async function replicate(
  port: number,
  disk: string,
  source: string,
  joinFile: string,
  changed?: readonly { offset: number; length: number }[],
) {
  const dir = await workdir();
  const changedPath = join(dir, 'changes.json');
  if (changed) await writeFile(changedPath, JSON.stringify(changed));
  const spec: JobSpec = {
    set: `tls-${disk}`,
    disks: [
      {
        id: disk,
        source: `file:${source}`,
        target: `ferry://127.0.0.1:${port}/${disk}`,
        join: joinFile,
        ...(changed ? { changed: changedPath } : {}),
      },
    ],
    params: SOURCE_PARAMS,
  };
  return runLocalJob(spec, { stateDir: join(dir, 'state') });
}

/** Opens a disk on the node with the credential as given (no local expiry check): the refusal. */
async function openRefused(
  port: number,
  disk: string,
  security: { join?: JoinCredential; insecure?: boolean },
  kind: 'full' | 'incremental' = 'full',
): Promise<TransferError> {
  const target = new RemoteTarget(parseFerryUri(`ferry://127.0.0.1:${port}/${disk}?connections=2`), security);
  try {
    const err = await target.open(4 * MiB, kind, false).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err, 'the node must refuse the connection').toBeInstanceOf(TransferError);
    return err as TransferError;
  } finally {
    await target.close();
  }
}

/** A join file read without the source's own expiry check, as a source with a wrong clock would. */
async function joinAsIs(path: string): Promise<JoinCredential> {
  return parseJoinFile(JSON.parse(await readFile(path, 'utf8')), path);
}

/** Every file of a folder and its bytes' SHA-256: what "the node wrote nothing" is checked against. */
async function snapshot(dir: string): Promise<Record<string, string>> {
  const files: Record<string, string> = {};
  for (const name of (await readdir(dir)).sort()) {
    files[name] = createHash('sha256')
      .update(await readFile(join(dir, name)))
      .digest('hex');
  }
  return files;
}

async function sourceImage(seed: number, size = 8 * MiB): Promise<string> {
  const path = join(await workdir(), `src-${seed}.img`);
  await createDiskImage(path, { size, seed });
  return path;
}

describe('the node PKI', () => {
  it('creates a CA, a node certificate and a 0600 join file on first start, and keeps them after', async () => {
    // Prepare
    const state = await workdir();

    // Act
    const first = await openNodePki(state);
    const second = await openNodePki(state);

    // Assess
    expect(first.created).toBe(true);
    expect(second.created).toBe(false);
    expect(second.fingerprint).toBe(first.fingerprint);
    expect(first.fingerprint).toMatch(/^sha256:[0-9a-f]{64}$/);
    expect((await stat(first.joinFile)).mode & 0o777).toBe(0o600);
    for (const key of ['ca.key', 'node.key']) {
      expect((await stat(join(state, 'pki', key))).mode & 0o777, key).toBe(0o600);
    }
    const owner = readJoinFile(first.joinFile);
    expect(owner).toMatchObject({ node: first.fingerprint, disks: '*' });
    // The fingerprint is the SHA-256 of the CA certificate that the join file pins.
    const caSha = new X509Certificate(owner.ca).fingerprint256.replace(/:/g, '').toLowerCase();
    expect(first.fingerprint).toBe(`sha256:${caSha}`);
  });

  it('issues scoped credentials as 0600 join files whose scope is in the certificate', async () => {
    const state = await workdir();
    const out = join(state, 'erp.json');

    const { record } = await issueCredential(state, out, { disks: 'erp-*' });

    expect((await stat(out)).mode & 0o777).toBe(0o600);
    const joinFile = readJoinFile(out);
    expect(joinFile).toMatchObject({ serial: record.serial, disks: 'erp-*' });
    expect(new X509Certificate(joinFile.cert).subjectAltName).toBe('URI:urn:ferry:disks:erp-*');
    await expect(issueCredential(state, out, { disks: 'x' })).rejects.toThrow(
      /exists; a join file is never overwritten/,
    );
    await expect(issueCredential(state, join(state, 'bad.json'), { disks: '../x' })).rejects.toThrow(
      ConfigError,
    );
  });
});

describe('replication over TLS', () => {
  it('is bit-exact with a valid join file: a full copy, then an increment', async () => {
    // Prepare
    const { node, images, pki, log } = await startTlsNode();
    const src = await sourceImage(301, 12 * MiB);

    // Act
    await replicate(node.port, 'd0', src, pki.joinFile);
    const changes = await mutateDisk(src, { size: 12 * MiB, seed: 302, smallWrites: 300, largeWrites: 2 });
    await replicate(node.port, 'd0', src, pki.joinFile, changes);

    // Assess: byte for byte.
    expect((await readFile(join(images, 'd0'))).equals(await readFile(src))).toBe(true);
    expect(node.stats().violations).toBe(0);
    expect(log.filter((l) => l.includes('refused'))).toEqual([]);
  });

  it('is bit-exact through a WAN link (TLS end to end through a TCP proxy)', async () => {
    const { node, images, pki } = await startTlsNode();
    const link = await startWanLink({
      target: { host: '127.0.0.1', port: node.port },
      rttMs: 20,
      rateBitsPerSec: 400e6,
    });
    cleanups.push(() => link.close());
    const src = await sourceImage(303);

    await replicate(link.port, 'w0', src, pki.joinFile);

    expect((await readFile(join(images, 'w0'))).equals(await readFile(src))).toBe(true);
    expect(link.stats().connections).toBeGreaterThanOrEqual(4);
  });

  it('writes the disks a scoped credential covers', async () => {
    const { node, images, state } = await startTlsNode();
    const erp = join(await workdir(), 'erp.json');
    await issueCredential(state, erp, { disks: 'erp-*' });
    const src = await sourceImage(304);

    await replicate(node.port, 'erp-1', src, erp);

    expect((await readFile(join(images, 'erp-1'))).equals(await readFile(src))).toBe(true);
  });
});

describe('refusals: the source says which, the node writes nothing', () => {
  it('a join file of another node (wrong CA pinned)', async () => {
    // Prepare
    const { node, images, logged } = await startTlsNode();
    const other = await openNodePki(await workdir());

    // Act
    const err = await openRefused(node.port, 'd1', { join: readJoinFile(other.joinFile) });

    // Assess
    expect(err.retryable).toBe(false);
    expect(err.message).toContain(
      `is not the node of join file ${other.joinFile}: its certificate was not issued by the CA pinned there (${other.fingerprint})`,
    );
    expect(await readdir(images)).toEqual([]);
    // The node learns of it when the source hangs up, which may be after the source has reported.
    expect(await logged(/TLS handshake failed/)).toMatch(/it does not trust this node's certificate/);
  });

  it("a client certificate of another node's CA, with this node's CA pinned", async () => {
    const { node, images, pki } = await startTlsNode();
    const other = readJoinFile((await openNodePki(await workdir())).joinFile);
    const mixed: JoinCredential = { ...other, ca: pki.tls.ca, node: pki.fingerprint };

    const err = await openRefused(node.port, 'd1', { join: mixed });

    expect(err.retryable).toBe(false);
    expect(err.message).toMatch(
      new RegExp(`credential ${other.serial} was not issued by this node's CA \\(${pki.fingerprint}\\)`),
    );
    expect(await readdir(images)).toEqual([]);
  });

  it('an expired credential: refused by the source itself, and by the node', async () => {
    // Prepare: a credential whose validity ended yesterday.
    const { node, images, state } = await startTlsNode();
    const old = join(await workdir(), 'old.json');
    const { record } = await issueCredential(state, old, {
      disks: '*',
      notBefore: new Date(Date.now() - 3 * DAY_MS),
      notAfter: new Date(Date.now() - DAY_MS),
    });
    const src = await sourceImage(305);

    // Act + Assess: the source refuses to use it (configuration: a new join file is needed)...
    const local = await replicate(node.port, 'd2', src, old).catch((e: unknown) => e);
    expect(local).toBeInstanceOf(ConfigError);
    expect((local as Error).message).toMatch(
      new RegExp(`credential ${record.serial} expired on .*ferry serve issue-credential`),
    );
    // ...and a source that does not check (a wrong clock) is refused by the node, which says why.
    const err = await openRefused(node.port, 'd2', { join: await joinAsIs(old) });
    expect(err.retryable).toBe(false);
    expect(err.message).toMatch(
      new RegExp(`the node refused the connection: credential ${record.serial} expired on `),
    );
    expect(await readdir(images)).toEqual([]);
  });

  it('a credential revoked while the node runs: its next connection is refused, the replica stays as it was', async () => {
    // Prepare: a scoped credential replicates once.
    const { node, images, state, log } = await startTlsNode();
    const erp = join(await workdir(), 'erp.json');
    const { record } = await issueCredential(state, erp, { disks: 'erp-*' });
    const src = await sourceImage(306);
    await replicate(node.port, 'erp-1', src, erp);
    const before = await snapshot(images);
    const changes = await mutateDisk(src, { size: 8 * MiB, seed: 307, smallWrites: 50, largeWrites: 1 });

    // Act: revoked (as `ferry serve revoke-credential` does, beside the running node), then used.
    await revokeCredential(state, record.serial);
    const err = await replicate(node.port, 'erp-1', src, erp, changes).catch((e: unknown) => e);

    // Assess
    expect((err as Error).message).toMatch(
      new RegExp(
        `the node refused the connection: credential ${record.serial} \\(scope 'erp-\\*'\\) was revoked on `,
      ),
    );
    expect(await snapshot(images)).toEqual(before);
    expect(log.join('\n')).toMatch(/refused: credential .* was revoked/);
  });

  it('a credential for a disk outside its scope', async () => {
    const { node, images, state } = await startTlsNode();
    const erp = join(await workdir(), 'erp.json');
    const { record } = await issueCredential(state, erp, { disks: 'erp-*' });

    const err = await openRefused(node.port, 'hr-db', { join: readJoinFile(erp) });

    expect(err.retryable).toBe(false);
    expect(err.message).toContain(
      `the node refused the connection: credential ${record.serial} may not write disk hr-db (scope 'erp-*')`,
    );
    expect(await readdir(images)).toEqual([]);
  });

  it('a credential the node has no record of', async () => {
    const { node, images, state } = await startTlsNode();
    const lost = join(await workdir(), 'lost.json');
    const { record } = await issueCredential(state, lost, { disks: '*' });
    await unlink(join(state, 'pki', 'credentials', `${record.serial}.json`));

    const err = await openRefused(node.port, 'd3', { join: readJoinFile(lost) });

    expect(err.message).toContain(`credential ${record.serial} is not in this node's registry`);
    expect(await readdir(images)).toEqual([]);
  });

  it('a plain-TCP source against a TLS node', async () => {
    const { node, images, log } = await startTlsNode();

    const err = await openRefused(node.port, 'd4', { insecure: true });

    expect(err.retryable).toBe(false);
    expect(err.message).toMatch(
      /the node refused the connection: this node accepts only TLS 1\.3 connections with a credential it issued: replicate with the node's join file \(--join FILE\)/,
    );
    expect(await readdir(images)).toEqual([]);
    expect(log.join('\n')).toMatch(/refused: this node accepts only TLS/);
  });

  it('a TLS source against an --insecure node', async () => {
    const { node, images, log } = await startInsecureNode();
    const { pki } = await startTlsNode();

    const err = await openRefused(node.port, 'd5', { join: readJoinFile(pki.joinFile) });

    expect(err.retryable).toBe(false);
    expect(err.message).toMatch(
      /does not speak TLS: it runs with --insecure .*replicate to it with --insecure/,
    );
    expect(await readdir(images)).toEqual([]);
    expect(log.join('\n')).toMatch(/refused: this node runs with --insecure/);
  });

  it("a node's own certificate's place taken by a source credential of the same CA", async () => {
    // Prepare: a server presenting a client certificate this CA issued (a source posing as its node).
    const { pki } = await startTlsNode();
    const owner = readJoinFile(pki.joinFile);
    const impostor = tls.createServer({ minVersion: 'TLSv1.3', cert: owner.cert, key: owner.key }, (s) =>
      s.end(),
    );
    await new Promise<void>((resolve) => impostor.listen(0, '127.0.0.1', resolve));
    cleanups.push(() => new Promise<void>((resolve) => impostor.close(() => resolve())));
    const port = (impostor.address() as net.AddressInfo).port;

    const err = await openRefused(port, 'd6', { join: owner });

    expect(err.message).toContain(`is not the node of join file ${pki.joinFile}`);
  });
});

describe('what a node and a source accept to start with', () => {
  it('a node without TLS and without insecure, or insecure on a non-loopback address, is refused', async () => {
    const dir = await workdir();
    const images = { targets: await ImageDirectory.open(dir), sessionDir: dir };
    await expect(startNode({ listen: '127.0.0.1:0', ...images })).rejects.toThrow(
      /a node needs its TLS credentials .* or, on loopback only, --insecure/,
    );
    for (const listen of ['0.0.0.0:0', '[::]:0', 'example.com:0']) {
      const err = await startNode({ listen, ...images, insecure: true }).catch((e: unknown) => e);
      expect(err, listen).toBeInstanceOf(ConfigError);
      expect((err as Error).message, listen).toMatch(
        /--insecure \(plain TCP: no encryption, no authentication\) is refused on/,
      );
    }
    for (const listen of ['127.0.0.1:0', 'localhost:0']) {
      const node = await startNode({ listen, ...images, insecure: true });
      await node.close();
    }
  });

  it('a source without a join file, or insecure toward another host, is refused with what to pass', () => {
    const uri = parseFerryUri('ferry://127.0.0.1:7790/d');
    expect(() => new RemoteTarget(uri)).toThrow(/pass --join FILE .* set FERRY_JOIN=FILE/);
    expect(() => new RemoteTarget(parseFerryUri('ferry://10.1.2.3:7790/d'), { insecure: true })).toThrow(
      /--insecure .* is only for a node on this host/,
    );
  });

  it('a connection that says nothing is answered and closed; close() does not wait for it', async () => {
    // Prepare: a short handshake timeout.
    const { node } = await startTlsNode({ handshakeTimeoutMs: 200 });
    const silent = net.connect({ host: '127.0.0.1', port: node.port });
    silent.on('error', () => {});
    const frames: Frame[] = [];
    const reader = new FrameReader({ from: 'node', onFrame: (f) => frames.push(f) });
    silent.on('data', (b: Buffer) => reader.push(b));

    // Act
    await new Promise<void>((resolve) => silent.once('close', () => resolve()));

    // Assess
    expect(frames).toEqual([{ type: 'error', retryable: false, reason: 'no HELLO within 200 ms' }]);
    const lingering = net.connect({ host: '127.0.0.1', port: node.port });
    lingering.on('error', () => {});
    await new Promise<void>((resolve) => lingering.once('connect', () => resolve()));
    await node.close(); // returns although `lingering` never spoke
    lingering.destroy();
  });

  it('an admitted TLS connection is told when the node shuts down, not cut off', async () => {
    // Prepare: a TLS client the node welcomed into a session.
    const { node, pki } = await startTlsNode();
    const owner = readJoinFile(pki.joinFile);
    const socket = tls.connect({
      host: '127.0.0.1',
      port: node.port,
      minVersion: 'TLSv1.3',
      ca: owner.ca,
      cert: owner.cert,
      key: owner.key,
      checkServerIdentity: () => undefined,
    });
    socket.on('error', () => {});
    const closed = new Promise<void>((resolve) => socket.once('close', () => resolve()));
    const frames: Frame[] = [];
    const welcomed = new Promise<void>((resolve) => {
      const reader = new FrameReader({
        from: 'node',
        onFrame: (f) => {
          frames.push(f);
          if (f.type === 'welcome') resolve();
        },
      });
      socket.on('data', (b: Buffer) => reader.push(b));
    });
    socket.write(
      encodeFrame({
        type: 'hello',
        version: PROTOCOL_VERSION,
        disk: 'd7',
        sizeBytes: MiB,
        kind: 'full',
        resume: false,
        session: randomBytes(16).toString('hex'),
        token: NO_TOKEN,
        cycle: '',
      }),
    );
    await welcomed;

    // Act
    await node.close();
    await closed;

    // Assess: the node's own goodbye arrived (retryable), so the connection was not dropped under it.
    expect(frames.find((f) => f.type === 'error')).toEqual({
      type: 'error',
      retryable: true,
      reason: 'the node is shutting down',
    });
  });
});
