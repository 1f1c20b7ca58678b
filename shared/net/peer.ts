// Who is on the other end of a node connection: the credential that authenticated it (a client
// certificate issued by the node's CA) and the disks that credential may write.

/** A source's identity as the node established it, before any frame was read. */
export interface PeerIdentity {
  /** Stable id of the credential (its certificate serial), or 'insecure' on a plain-TCP node. */
  readonly credential: string;
  /** Disk-name pattern the credential may write: names, with '*' matching any run of characters. */
  readonly disks: string;
}

/** The peer of a node started with --insecure (loopback only): no credential, every disk. */
export const INSECURE_PEER: PeerIdentity = { credential: 'insecure', disks: '*' };

/** Whether `disk` matches the credential's pattern (`*` matches any run of name characters). */
export function diskInScope(pattern: string, disk: string): boolean {
  const re = new RegExp(`^${pattern.split('*').map(escapeRegExp).join('.*')}$`);
  return re.test(disk);
}

const escapeRegExp = (s: string): string => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
