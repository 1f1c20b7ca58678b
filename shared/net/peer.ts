// Who is on the other end of a node connection: the credential that authenticated it (a client
// certificate issued by the node's CA) and the disks that credential may write.
import type { X509Certificate } from 'node:crypto';
import { isIP } from 'node:net';
import { FerryError } from '../engine/errors.ts';

/** A source's identity as the node established it, before any frame was read. */
export interface PeerIdentity {
  /** Stable id of the credential (its certificate serial), or 'insecure' on a plain-TCP node. */
  readonly credential: string;
  /** Disk-name pattern the credential may write: names, with '*' matching any run of characters. */
  readonly disks: string;
}

/** The peer of a node started with --insecure (loopback only): no credential, every disk. */
export const INSECURE_PEER: PeerIdentity = { credential: 'insecure', disks: '*' };

/**
 * A credential's scope: a disk name in which '*' stands for any run of name characters ('*',
 * 'erp-*', '*-db'). The same characters as names (shared/engine/names.ts), so a pattern is inert
 * in a certificate, a file name or a message.
 */
export const DISK_PATTERN = /^[A-Za-z0-9*][A-Za-z0-9._*-]{0,127}$/;
export const DISK_PATTERN_RULE =
  "a disk name in which '*' matches any run of characters, e.g. 'erp-*' or '*' (1-128 letters, digits, '.', '_', '-' or '*')";

export function isValidDiskPattern(value: unknown): value is string {
  return typeof value === 'string' && DISK_PATTERN.test(value);
}

/** Whether `disk` matches the credential's pattern (`*` matches any run of name characters). */
export function diskInScope(pattern: string, disk: string): boolean {
  const re = new RegExp(`^${pattern.split('*').map(escapeRegExp).join('.*')}$`);
  return re.test(disk);
}

const escapeRegExp = (s: string): string => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

/**
 * A host that only this machine can reach: 127.0.0.0/8, ::1 (also as ::ffff:127.x.y.z) or the name
 * localhost. Plain TCP (--insecure) is allowed only there: nothing of it crosses a network. Any
 * other name is refused, whatever it resolves to today.
 */
export function isLoopbackHost(host: string): boolean {
  const h = host.replace(/^\[(.*)\]$/, '$1').toLowerCase();
  if (h === 'localhost') return true;
  if (isIP(h) === 4) return h.startsWith('127.');
  if (isIP(h) === 6) return h === '::1' || h === '0:0:0:0:0:0:0:1' || /^::ffff:127\./.test(h);
  return false;
}

/** What a node needs to speak TLS (pki.ts makes it from the node's state directory). */
export interface NodeTls {
  /** PEM: the node's CA. A source's certificate must chain to it; a source pins it. */
  readonly ca: string;
  /** PEM: the node's own certificate (issued by `ca`) and its private key. */
  readonly cert: string;
  readonly key: string;
  /**
   * The credential check: called once per connection, after the TLS handshake verified the peer's
   * certificate against `ca` and its dates, before any frame is read. Returns who the peer is, or
   * throws CredentialRefused saying why not (unknown to the node, revoked). Must consult the
   * current state: a credential revoked while the node runs is refused at its next connection.
   */
  admit(peer: X509Certificate): Promise<PeerIdentity>;
}

/** A credential the node will not take; the message is what the source is told. */
export class CredentialRefused extends FerryError {
  readonly retryable: boolean;

  constructor(message: string, opts: { retryable?: boolean; cause?: unknown } = {}) {
    super(message, opts.cause === undefined ? {} : { cause: opts.cause });
    this.name = 'CredentialRefused';
    this.retryable = opts.retryable ?? false;
  }
}
