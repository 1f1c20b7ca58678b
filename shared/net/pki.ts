// The node's certificate authority (`ferry serve --state DIR`): creates the CA and the node's own
// certificate on first start, issues the client credentials (join files) sources replicate with,
// revokes them, and checks each connection's credential against its registry. Keys are ECDSA P-256
// from Node's WebCrypto, certificates are built by @peculiar/x509: nothing here encodes ASN.1 or
// does cryptography by hand.
//
// STATE/pki/            (0700)
//   ca.key, node.key    PKCS#8 PEM (0600)
//   ca.crt, node.crt    PEM
//   credentials/SERIAL.json   the registry: one record per issued credential; `revoked` once revoked
// STATE/join.json       (0600) the first credential, scope '*', for the node's owner
//
// The registry doubles as the revocation list: the node reads a credential's record at every
// connection, so a revocation (written by another process, `ferry serve revoke-credential`) holds
// from the next connection on, without a restart or a reload.
import 'reflect-metadata'; // @peculiar/x509 resolves its parts through tsyringe, which needs the Reflect polyfill loaded first
import { createPrivateKey, KeyObject, randomBytes, webcrypto, X509Certificate } from 'node:crypto';
import { chmod, mkdir, open, readdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import * as x509 from '@peculiar/x509';
import { z } from 'zod';
import { ConfigError, errorMessage, FerryError } from '../engine/errors.ts';
import {
  certificateFingerprint,
  DISKS_URI_PREFIX,
  JOIN_FORMAT,
  type JoinFile,
  NODE_URI,
  parseJoinFile,
} from './join.ts';
import {
  CredentialRefused,
  DISK_PATTERN_RULE,
  isValidDiskPattern,
  type NodeTls,
  type PeerIdentity,
} from './peer.ts';

x509.cryptoProvider.set(webcrypto as unknown as Parameters<typeof x509.cryptoProvider.set>[0]);

const DAY_MS = 86_400_000;
// A node's CA outlives many rounds of credentials: replacing it means a new join file for every
// source, so it is made for ten years.
export const CA_VALIDITY_DAYS = 3650;
// A credential lasts a year: a join file that leaked unnoticed stops working on its own, and a
// yearly re-issue is a small chore for an operator.
export const CREDENTIAL_VALIDITY_DAYS = 365;
// The node's own certificate lives as long as its CA (sources pin the CA, not this certificate);
// at start it is re-issued when less than this is left, so a node never outlives it by surprise.
const NODE_CERT_RENEW_DAYS = 30;
// Certificates are valid from a little before they were made: a source whose clock is a few
// minutes behind the node's can use a fresh credential at once.
const CLOCK_SKEW_MS = 5 * 60_000;

const KEY_ALGORITHM = { name: 'ECDSA', namedCurve: 'P-256' } as const;
const SIGNING_ALGORITHM = { name: 'ECDSA', hash: 'SHA-256' } as const;

export const PKI_DIR = 'pki';
export const JOIN_FILE = 'join.json';
const CREDENTIALS_DIR = 'credentials';

/** One issued credential, as the registry keeps it. */
/** A serial as the registry spells it: lower-case hex. */
const SERIAL = /^[0-9a-f]{2,40}$/;

export const credentialRecordSchema = z.strictObject({
  serial: z.string().regex(SERIAL),
  disks: z.string().refine(isValidDiskPattern),
  created: z.string(),
  notAfter: z.string(),
  /** SHA-256 of the client certificate: a certificate with this serial and another body is not this credential. */
  fingerprint: z.string(),
  /** When it was revoked; absent while it is valid. */
  revoked: z.string().optional(),
});
export type CredentialRecord = z.infer<typeof credentialRecordSchema>;

/** A node's PKI, loaded (or created) from its state directory. */
export interface NodePki {
  readonly stateDir: string;
  /** SHA-256 of the CA certificate, `sha256:<hex>`: what sources pin. */
  readonly fingerprint: string;
  /** Made by this call (first start): the owner's join file was written. */
  readonly created: boolean;
  /** STATE/join.json. */
  readonly joinFile: string;
  /** For startNode: the node's certificate, its CA, and the per-connection credential check. */
  readonly tls: NodeTls;
}

interface Authority {
  readonly cert: x509.X509Certificate;
  readonly certPem: string;
  readonly signingKey: webcrypto.CryptoKey;
}

export interface IssueOptions {
  /** Disk pattern the credential may write ('*' for every disk). */
  readonly disks: string;
  /** Defaults: from a few minutes ago, for CREDENTIAL_VALIDITY_DAYS. A past notAfter makes an expired credential (tests). */
  readonly notBefore?: Date;
  readonly notAfter?: Date;
}

/**
 * Loads the node's PKI from `stateDir`, creating it on first use: CA, node certificate, and the
 * owner's join file (scope '*'). Safe against a concurrent first start (one of them creates it)
 * and against a crash midway (everything is made in a private folder, then renamed into place).
 */
export async function openNodePki(stateDir: string): Promise<NodePki> {
  await mkdir(stateDir, { recursive: true });
  const dir = join(stateDir, PKI_DIR);
  let created = false;
  if (!(await exists(join(dir, 'ca.crt')))) created = await createPki(stateDir);
  // The owner's join file is made inside pki/ and moved out last: finish a move a crash interrupted.
  const pending = join(dir, JOIN_FILE);
  if (await exists(pending)) {
    if (await exists(join(stateDir, JOIN_FILE))) await rm(pending, { force: true });
    else await rename(pending, join(stateDir, JOIN_FILE));
  }
  const ca = await loadAuthority(dir);
  const node = await loadNodeCertificate(dir, ca);
  return {
    stateDir,
    fingerprint: fingerprintOf(ca.cert),
    created,
    joinFile: join(stateDir, JOIN_FILE),
    tls: {
      ca: ca.certPem,
      cert: node.cert,
      key: node.key,
      admit: (peer) => admitCredential(dir, peer),
    },
  };
}

/** Issues a credential and writes its join file to `out` (mode 0600; an existing file is not replaced). */
export async function issueCredential(
  stateDir: string,
  out: string,
  opts: IssueOptions,
): Promise<{ record: CredentialRecord; pki: NodePki }> {
  if (!isValidDiskPattern(opts.disks)) {
    throw new ConfigError(`--disks '${opts.disks}' is not ${DISK_PATTERN_RULE}`, { setting: 'disks' });
  }
  const pki = await openNodePki(stateDir);
  const ca = await loadAuthority(join(stateDir, PKI_DIR));
  // Claimed first, so an existing file is never overwritten and a failure leaves no credential behind.
  const file = await open(out, 'wx', 0o600).catch((err: NodeJS.ErrnoException) => {
    throw new ConfigError(
      err.code === 'EEXIST'
        ? `${out} exists; a join file is never overwritten (remove it or choose another --out)`
        : `cannot create ${out}: ${errorMessage(err)}`,
      { setting: 'out', cause: err },
    );
  });
  try {
    const { record, joinFile } = await issue(join(stateDir, PKI_DIR), ca, opts);
    await file.writeFile(`${JSON.stringify(joinFile, null, 2)}\n`);
    await file.sync();
    await file.close();
    await chmod(out, 0o600);
    return { record, pki };
  } catch (err) {
    await file.close().catch(() => {});
    await rm(out, { force: true });
    throw err;
  }
}

/** Revokes a credential by serial; the node refuses it from its next connection on. Idempotent. */
export async function revokeCredential(
  stateDir: string,
  serial: string,
  now: Date = new Date(),
): Promise<{ record: CredentialRecord; already: boolean }> {
  const dir = join(stateDir, PKI_DIR);
  if (!(await exists(join(dir, 'ca.crt')))) {
    throw new ConfigError(`no node CA in ${dir}: nothing was issued from this state directory`, {
      setting: 'state',
    });
  }
  const wanted = normalizeSerial(serial);
  if (!SERIAL.test(wanted)) {
    throw new ConfigError(
      `"${serial}" is not a credential serial (hexadecimal, as list-credentials prints it)`,
      {
        setting: 'serial',
      },
    );
  }
  const record = await readRecord(dir, wanted);
  if (record === undefined) {
    throw new ConfigError(
      `no credential with serial ${wanted} in ${join(dir, CREDENTIALS_DIR)} (ferry serve list-credentials shows them)`,
      { setting: 'serial' },
    );
  }
  if (record.revoked !== undefined) return { record, already: true };
  const revoked: CredentialRecord = { ...record, revoked: now.toISOString() };
  await writeRecord(dir, revoked, 'replace');
  return { record: revoked, already: false };
}

/** The serial of the credential in a join file of this node (for revoke-credential --credential FILE). */
export async function joinFileSerial(stateDir: string, path: string): Promise<string> {
  let value: unknown;
  try {
    value = JSON.parse(await readFile(path, 'utf8'));
  } catch (err) {
    throw new ConfigError(`join file ${path} cannot be read: ${errorMessage(err)}`, {
      setting: 'credential',
    });
  }
  // Expired or not, a credential of this node can be revoked.
  const joinFile = parseJoinFile(value, path);
  const ca = await loadAuthority(join(stateDir, PKI_DIR));
  if (joinFile.node !== fingerprintOf(ca.cert)) {
    throw new ConfigError(
      `join file ${path} belongs to node ${joinFile.node}, not to the node of ${stateDir} (${fingerprintOf(ca.cert)})`,
      { setting: 'credential' },
    );
  }
  return joinFile.serial;
}

/** Every credential in the registry, oldest first. */
export async function listCredentials(stateDir: string): Promise<CredentialRecord[]> {
  const dir = join(stateDir, PKI_DIR, CREDENTIALS_DIR);
  const names = await readdir(dir).catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'ENOENT') return [];
    throw err;
  });
  const records: CredentialRecord[] = [];
  for (const name of names) {
    if (!name.endsWith('.json')) continue;
    const record = await readRecord(join(stateDir, PKI_DIR), name.slice(0, -'.json'.length));
    if (record) records.push(record);
  }
  return records.sort((a, b) => a.created.localeCompare(b.created));
}

// ---- The per-connection check ----

/**
 * Who a verified peer certificate is, from the certificate itself (its serial and its
 * urn:ferry:disks: scope, which only the CA could have written) and the registry's record of it.
 */
async function admitCredential(dir: string, peer: X509Certificate): Promise<PeerIdentity> {
  const serial = normalizeSerial(peer.serialNumber);
  const disks = scopeOf(peer);
  if (disks === undefined) {
    throw new CredentialRefused(`certificate ${serial} carries no disk scope: it is not a Ferry credential`);
  }
  let record: CredentialRecord | undefined;
  try {
    record = await readRecord(dir, serial);
  } catch (err) {
    // Refused, not retried: a record that cannot be read is the operator's to repair.
    throw new CredentialRefused(
      `the node cannot read its record of credential ${serial}: ${errorMessage(err)}`,
      {
        cause: err,
      },
    );
  }
  if (record === undefined) {
    throw new CredentialRefused(`credential ${serial} is not in this node's registry of issued credentials`);
  }
  if (record.revoked !== undefined) {
    throw new CredentialRefused(
      `credential ${serial} (scope '${record.disks}') was revoked on ${record.revoked}`,
    );
  }
  if (record.fingerprint !== certificateFingerprint(peer) || record.disks !== disks) {
    throw new CredentialRefused(
      `credential ${serial} is not the certificate this node issued under that serial`,
    );
  }
  return { credential: serial, disks };
}

/** The disk pattern in a certificate's `urn:ferry:disks:` SAN URI, read with the X.509 library. */
function scopeOf(peer: X509Certificate): string | undefined {
  const san = new x509.X509Certificate(peer.raw).getExtension(x509.SubjectAlternativeNameExtension);
  const uris = (san?.names.toJSON() ?? [])
    .filter((n) => n.type === 'url' && n.value.startsWith(DISKS_URI_PREFIX))
    .map((n) => n.value.slice(DISKS_URI_PREFIX.length));
  return uris.length === 1 && isValidDiskPattern(uris[0]) ? uris[0] : undefined;
}

// ---- Making certificates ----

async function createPki(stateDir: string): Promise<boolean> {
  const dir = join(stateDir, PKI_DIR);
  const scratch = join(stateDir, `.${PKI_DIR}-${randomBytes(6).toString('hex')}`);
  await mkdir(join(scratch, CREDENTIALS_DIR), { recursive: true, mode: 0o700 });
  try {
    const now = new Date();
    const keys = await generateKeys();
    const caCert = await x509.X509CertificateGenerator.createSelfSigned({
      serialNumber: newSerial(),
      name: `CN=Ferry node CA ${randomBytes(4).toString('hex')}, O=Ferry`,
      notBefore: new Date(now.getTime() - CLOCK_SKEW_MS),
      notAfter: new Date(now.getTime() + CA_VALIDITY_DAYS * DAY_MS),
      keys,
      signingAlgorithm: SIGNING_ALGORITHM,
      extensions: [
        new x509.BasicConstraintsExtension(true, 0, true),
        new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign, true),
        await x509.SubjectKeyIdentifierExtension.create(keys.publicKey),
      ],
    });
    await writeSecret(join(scratch, 'ca.key'), await privateKeyPem(keys.privateKey));
    await writeFile(join(scratch, 'ca.crt'), caCert.toString('pem'));
    const ca: Authority = { cert: caCert, certPem: caCert.toString('pem'), signingKey: keys.privateKey };
    await writeNodeCertificate(scratch, ca);
    const { joinFile } = await issue(scratch, ca, { disks: '*' });
    await writeSecret(join(scratch, JOIN_FILE), `${JSON.stringify(joinFile, null, 2)}\n`);
    await chmod(scratch, 0o700);
    await rename(scratch, dir);
    return true;
  } catch (err) {
    await rm(scratch, { recursive: true, force: true });
    // Another `ferry serve` made it first: use theirs.
    const code = (err as NodeJS.ErrnoException).code;
    if ((code === 'ENOTEMPTY' || code === 'EEXIST') && (await exists(join(dir, 'ca.crt')))) return false;
    throw new FerryError(`cannot create the node's CA in ${dir}: ${errorMessage(err)}`, { cause: err });
  }
}

/** Issues one client credential under `ca`, records it in the registry, and returns its join file. */
async function issue(
  dir: string,
  ca: Authority,
  opts: IssueOptions,
): Promise<{ record: CredentialRecord; joinFile: JoinFile }> {
  const now = new Date();
  const notBefore = opts.notBefore ?? new Date(now.getTime() - CLOCK_SKEW_MS);
  const notAfter = opts.notAfter ?? new Date(now.getTime() + CREDENTIAL_VALIDITY_DAYS * DAY_MS);
  if (!(notAfter > notBefore))
    throw new ConfigError('a credential must end after it begins', { setting: 'validity' });
  const keys = await generateKeys();
  const serial = newSerial();
  const cert = await x509.X509CertificateGenerator.create({
    serialNumber: serial,
    subject: `CN=Ferry source ${serial.slice(0, 8)}, O=Ferry`,
    issuer: ca.cert.subject,
    notBefore,
    notAfter,
    publicKey: keys.publicKey,
    signingKey: ca.signingKey,
    signingAlgorithm: SIGNING_ALGORITHM,
    extensions: [
      new x509.BasicConstraintsExtension(false, undefined, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature, true),
      // clientAuth only: TLS refuses this certificate as a server's, so a source cannot pose as its node.
      new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.clientAuth], false),
      new x509.SubjectAlternativeNameExtension(
        [{ type: 'url', value: `${DISKS_URI_PREFIX}${opts.disks}` }],
        false,
      ),
      await x509.AuthorityKeyIdentifierExtension.create(ca.cert, false),
    ],
  });
  const certPem = cert.toString('pem');
  const record: CredentialRecord = {
    serial,
    disks: opts.disks,
    created: now.toISOString(),
    // As the certificate holds it (whole seconds).
    notAfter: cert.notAfter.toISOString(),
    fingerprint: certificateFingerprint(new X509Certificate(certPem)),
  };
  await writeRecord(dir, record, 'create');
  const joinFile: JoinFile = {
    format: JOIN_FORMAT,
    node: fingerprintOf(ca.cert),
    ca: ca.certPem,
    credential: {
      serial,
      disks: opts.disks,
      created: record.created,
      notAfter: record.notAfter,
      cert: certPem,
      key: await privateKeyPem(keys.privateKey),
    },
  };
  return { record, joinFile };
}

async function writeNodeCertificate(dir: string, ca: Authority): Promise<{ cert: string; key: string }> {
  const now = new Date();
  const keys = await generateKeys();
  const cert = await x509.X509CertificateGenerator.create({
    serialNumber: newSerial(),
    subject: 'CN=Ferry node, O=Ferry',
    issuer: ca.cert.subject,
    notBefore: new Date(now.getTime() - CLOCK_SKEW_MS),
    notAfter: ca.cert.notAfter,
    publicKey: keys.publicKey,
    signingKey: ca.signingKey,
    signingAlgorithm: SIGNING_ALGORITHM,
    extensions: [
      new x509.BasicConstraintsExtension(false, undefined, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature, true),
      new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.serverAuth], false),
      // Sources pin the CA and check this URI instead of a host name: a node is reached by many names.
      new x509.SubjectAlternativeNameExtension([{ type: 'url', value: NODE_URI }], false),
      await x509.AuthorityKeyIdentifierExtension.create(ca.cert, false),
    ],
  });
  const pair = { cert: cert.toString('pem'), key: await privateKeyPem(keys.privateKey) };
  await writeSecret(join(dir, 'node.key'), pair.key, 'replace');
  await replaceFile(join(dir, 'node.crt'), pair.cert);
  return pair;
}

async function loadAuthority(dir: string): Promise<Authority> {
  try {
    const certPem = await readFile(join(dir, 'ca.crt'), 'utf8');
    const der = createPrivateKey(await readFile(join(dir, 'ca.key'), 'utf8')).export({
      type: 'pkcs8',
      format: 'der',
    });
    const signingKey = await webcrypto.subtle.importKey('pkcs8', der, KEY_ALGORITHM, false, ['sign']);
    return { cert: new x509.X509Certificate(certPem), certPem, signingKey };
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    throw new ConfigError(
      code === 'ENOENT'
        ? `no node CA in ${dir}: start "ferry serve --state ${join(dir, '..')}" once to create it`
        : `the node CA in ${dir} cannot be read: ${errorMessage(err)}`,
      { setting: 'state', cause: err },
    );
  }
}

async function loadNodeCertificate(dir: string, ca: Authority): Promise<{ cert: string; key: string }> {
  const pair = {
    cert: await readFile(join(dir, 'node.crt'), 'utf8').catch(() => ''),
    key: await readFile(join(dir, 'node.key'), 'utf8').catch(() => ''),
  };
  let renew = pair.cert === '' || pair.key === '';
  if (!renew) {
    const cert = new X509Certificate(pair.cert);
    renew =
      new Date(cert.validTo).getTime() - Date.now() < NODE_CERT_RENEW_DAYS * DAY_MS &&
      ca.cert.notAfter.getTime() - Date.now() > NODE_CERT_RENEW_DAYS * DAY_MS;
  }
  return renew ? writeNodeCertificate(dir, ca) : pair;
}

// ---- Files ----

async function readRecord(dir: string, serial: string): Promise<CredentialRecord | undefined> {
  let text: string;
  try {
    text = await readFile(recordPath(dir, serial), 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw err;
  }
  const parsed = credentialRecordSchema.safeParse(JSON.parse(text));
  if (!parsed.success || parsed.data.serial !== serial) {
    throw new FerryError(`credential record ${recordPath(dir, serial)} is damaged`);
  }
  return parsed.data;
}

async function writeRecord(dir: string, record: CredentialRecord, how: 'create' | 'replace'): Promise<void> {
  const path = recordPath(dir, record.serial);
  const text = `${JSON.stringify(record, null, 2)}\n`;
  if (how === 'create') await writeFile(path, text, { flag: 'wx' });
  else await replaceFile(path, text);
}

function recordPath(dir: string, serial: string): string {
  // The serial is hexadecimal (checked by every caller): it cannot name another file.
  if (!SERIAL.test(serial)) throw new FerryError(`"${serial}" is not a credential serial`);
  return join(dir, CREDENTIALS_DIR, `${serial}.json`);
}

/**
 * Written whole or not at all, and durably (a revocation must survive a power loss): to a
 * temporary name, synced, renamed over the old one, the folder synced.
 */
async function replaceFile(path: string, text: string, mode = 0o644): Promise<void> {
  const tmp = `${path}.tmp-${randomBytes(4).toString('hex')}`;
  const file = await open(tmp, 'wx', mode);
  try {
    await file.writeFile(text);
    await file.sync();
  } finally {
    await file.close();
  }
  await rename(tmp, path);
  const dir = await open(dirname(path), 'r');
  try {
    await dir.sync();
  } finally {
    await dir.close();
  }
}

async function writeSecret(path: string, text: string, how: 'create' | 'replace' = 'create'): Promise<void> {
  if (how === 'replace') return replaceFile(path, text, 0o600);
  await writeFile(path, text, { flag: 'wx', mode: 0o600 });
  await chmod(path, 0o600); // whatever the umask
}

async function exists(path: string): Promise<boolean> {
  return (await stat(path).catch(() => undefined)) !== undefined;
}

// ---- Keys and names ----

async function generateKeys(): Promise<webcrypto.CryptoKeyPair> {
  return (await webcrypto.subtle.generateKey(KEY_ALGORITHM, true, [
    'sign',
    'verify',
  ])) as webcrypto.CryptoKeyPair;
}

async function privateKeyPem(key: webcrypto.CryptoKey): Promise<string> {
  return KeyObject.from(key).export({ type: 'pkcs8', format: 'pem' }) as string;
}

/** 126 random bits; the first byte in 0x40..0x7f keeps it positive and 16 bytes long, so its hex is canonical. */
function newSerial(): string {
  const bytes = randomBytes(16);
  bytes[0] = (bytes[0]! & 0x3f) | 0x40;
  return bytes.toString('hex');
}

/** Serials as the registry spells them: lower-case hex (openssl prints them with colons). */
function normalizeSerial(serial: string): string {
  return serial.replace(/:/g, '').toLowerCase();
}

function fingerprintOf(cert: x509.X509Certificate): string {
  return certificateFingerprint(new X509Certificate(Buffer.from(cert.rawData)));
}
