// Join files: what a source needs to replicate to one Ferry node (the node's CA to pin, a client
// certificate and key that CA issued, the disks it may write), read and checked with Node's own
// X.509 parser. Issuing them is the node's business (pki.ts); this side only reads.
import { createHash, createPrivateKey, X509Certificate } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { z } from 'zod';
import { ConfigError, errorMessage } from '../engine/errors.ts';
import { DISK_PATTERN_RULE, isLoopbackHost, isValidDiskPattern } from './peer.ts';
import type { FerryUri } from './uri.ts';

export const JOIN_FORMAT = 'ferry-join/1';
/** SAN URI of a client certificate: the disks it may write, read back by the node from the verified certificate. */
export const DISKS_URI_PREFIX = 'urn:ferry:disks:';
/** SAN URI of a node's own certificate: a source's certificate (same CA) cannot pose as the node. */
export const NODE_URI = 'urn:ferry:node';

/** A source's credential for one node, as RemoteTarget uses it. */
export interface JoinCredential {
  /** Where it came from (the join file), for messages. */
  readonly origin: string;
  /** The node's fingerprint: SHA-256 of its CA certificate, `sha256:<hex>`. */
  readonly node: string;
  /** PEM: the node's CA, the only authority the source trusts for that node. */
  readonly ca: string;
  /** The client certificate's serial (lower-case hex): how the node and its operator name the credential. */
  readonly serial: string;
  /** Disk pattern the credential may write. */
  readonly disks: string;
  readonly notBefore: Date;
  readonly notAfter: Date;
  /** PEM: the client certificate and its private key (PKCS#8). */
  readonly cert: string;
  readonly key: string;
}

/** The JSON of a join file (written by the node, mode 0600). */
export const joinFileSchema = z.strictObject({
  format: z.literal(JOIN_FORMAT),
  node: z.string().regex(/^sha256:[0-9a-f]{64}$/, 'not a sha256:<64 hex digits> fingerprint'),
  ca: z.string().min(1),
  credential: z.strictObject({
    serial: z.string().regex(/^[0-9a-f]{2,40}$/, 'not a hexadecimal serial'),
    disks: z.string().refine(isValidDiskPattern, `not ${DISK_PATTERN_RULE}`),
    created: z.string(),
    notAfter: z.string(),
    cert: z.string().min(1),
    key: z.string().min(1),
  }),
});
export type JoinFile = z.infer<typeof joinFileSchema>;

/** `sha256:<hex>` of a certificate's DER: what `ferry serve` prints and a join file pins. */
export function certificateFingerprint(cert: X509Certificate): string {
  return `sha256:${createHash('sha256').update(cert.raw).digest('hex')}`;
}

/** The disk pattern of a client certificate's `urn:ferry:disks:` SAN URI, if it has exactly one. */
export function sanDiskPattern(cert: X509Certificate): string | undefined {
  // Node lists SAN entries as `URI:...`, separated by ', '; a pattern has no comma, space or quote.
  const found = (cert.subjectAltName ?? '')
    .split(', ')
    .filter((e) => e.startsWith(`URI:${DISKS_URI_PREFIX}`))
    .map((e) => e.slice(`URI:${DISKS_URI_PREFIX}`.length));
  return found.length === 1 && isValidDiskPattern(found[0]) ? found[0] : undefined;
}

/**
 * Checks a join file's content and that it holds together: the CA is a CA with the fingerprint
 * given, the certificate was issued and signed by it, the key is the certificate's, and serial and
 * scope are the certificate's own. Expiry is not checked here (see readJoinFile).
 */
export function parseJoinFile(value: unknown, origin: string): JoinCredential {
  const fail = (why: string, cause?: unknown): never => {
    throw new ConfigError(`join file ${origin} ${why}`, {
      setting: 'join',
      ...(cause === undefined ? {} : { cause }),
    });
  };
  const parsed = joinFileSchema.safeParse(value);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    const where = issue?.path.length ? ` at ${issue.path.join('.')}` : '';
    return fail(`is not a Ferry join file (${JOIN_FORMAT})${where}: ${issue?.message ?? 'invalid'}`);
  }
  const j = parsed.data;
  let ca: X509Certificate;
  let cert: X509Certificate;
  try {
    ca = new X509Certificate(j.ca);
    cert = new X509Certificate(j.credential.cert);
  } catch (err) {
    return fail(`holds a certificate that cannot be read: ${errorMessage(err)}`, err);
  }
  if (!ca.ca) fail('pins a certificate that is not a certificate authority');
  if (certificateFingerprint(ca) !== j.node) {
    fail(`pins a CA whose fingerprint is ${certificateFingerprint(ca)}, not the ${j.node} it names`);
  }
  if (!cert.checkIssued(ca) || !cert.verify(ca.publicKey)) {
    fail(`holds a client certificate that the node's CA (${j.node}) did not issue`);
  }
  try {
    if (!cert.checkPrivateKey(createPrivateKey(j.credential.key)))
      fail('holds a key that is not its certificate’s');
  } catch (err) {
    if (err instanceof ConfigError) throw err;
    return fail(`holds a private key that cannot be read: ${errorMessage(err)}`, err);
  }
  const serial = cert.serialNumber.toLowerCase();
  if (serial !== j.credential.serial) fail(`names serial ${j.credential.serial}, its certificate ${serial}`);
  const disks = sanDiskPattern(cert);
  if (disks !== j.credential.disks) {
    fail(
      `names scope '${j.credential.disks}', its certificate ${disks === undefined ? 'none' : `'${disks}'`}`,
    );
  }
  return {
    origin,
    node: j.node,
    ca: j.ca,
    serial,
    disks: j.credential.disks,
    notBefore: new Date(cert.validFrom),
    notAfter: new Date(cert.validTo),
    cert: j.credential.cert,
    key: j.credential.key,
  };
}

/**
 * Reads a join file for replication: also refuses one whose credential has expired or is not yet
 * valid, so the source says so itself instead of hearing it from the node.
 */
export function readJoinFile(path: string, now: Date = new Date()): JoinCredential {
  let value: unknown;
  try {
    value = JSON.parse(readFileSync(path, 'utf8'));
  } catch (err) {
    throw new ConfigError(`join file ${path} cannot be read: ${errorMessage(err)}`, {
      setting: 'join',
      cause: err,
    });
  }
  const join = parseJoinFile(value, path);
  if (now > join.notAfter) {
    throw new ConfigError(
      `join file ${path}: credential ${join.serial} expired on ${join.notAfter.toISOString()}; ask the node's operator for a new one (ferry serve issue-credential)`,
      { setting: 'join' },
    );
  }
  if (now < join.notBefore) {
    throw new ConfigError(
      `join file ${path}: credential ${join.serial} is not valid before ${join.notBefore.toISOString()} (is this host's clock right?)`,
      { setting: 'join' },
    );
  }
  return join;
}

/** How a source reaches a node: over TLS with a join file, or (loopback only) plain TCP. */
export interface SourceSecurity {
  readonly join?: JoinCredential | undefined;
  readonly insecure?: boolean | undefined;
}

/** Refuses a source without a way to authenticate, with both, or plain TCP that would cross a network. */
export function checkSourceSecurity(uri: FerryUri, security: SourceSecurity): void {
  if (security.join !== undefined && security.insecure) {
    throw new ConfigError(`target ${uri.name}: give a join file or --insecure, not both`, {
      setting: 'join',
    });
  }
  if (security.insecure) {
    if (!isLoopbackHost(uri.host)) {
      throw new ConfigError(
        `target ${uri.name}: --insecure (plain TCP, no authentication) is only for a node on this host (127.0.0.1, ::1, localhost); a node across a network needs its join file (--join FILE)`,
        { setting: 'insecure' },
      );
    }
    return;
  }
  if (security.join === undefined) {
    throw new ConfigError(
      `target ${uri.name}: a Ferry node accepts only TLS connections with a credential it issued; pass --join FILE (the node's STATE/join.json, or a file from "ferry serve issue-credential"), set FERRY_JOIN=FILE, or give "join" for this disk in the job file (--insecure only toward a node on this host started with --insecure)`,
      { setting: 'join' },
    );
  }
}
