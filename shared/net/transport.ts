// How sources reach a node: TLS 1.3 with mutual authentication, or (loopback only, --insecure)
// plain TCP. The node's side lets a connection reach the protocol only once its credential is
// admitted; either side, when refused, says why in words an operator can act on.
import { X509Certificate } from 'node:crypto';
import net from 'node:net';
import tls from 'node:tls';
import { ConfigError, errorMessage, TransferError } from '../engine/errors.ts';
import {
  certificateFingerprint,
  checkSourceSecurity,
  type JoinCredential,
  NODE_URI,
  type SourceSecurity,
} from './join.ts';
import { CredentialRefused, INSECURE_PEER, isLoopbackHost, type NodeTls, type PeerIdentity } from './peer.ts';
import { encodeFrame } from './protocol.ts';
import type { FerryUri } from './uri.ts';

// A TLS connection opens with a handshake record (content type 22). No Ferry frame starts with that
// byte: it is the top byte of the frame's u32 length, and 0x16 would announce a frame over 350 MiB.
const TLS_HANDSHAKE_RECORD = 0x16;
// A refused peer gets this long to read why and hang up before its socket is destroyed.
const REFUSAL_LINGER_MS = 2_000;

// ---- The node's side ----

export interface NodeTransportOptions {
  /** The host the node listens on (checked for --insecure). */
  readonly host: string;
  readonly tls?: NodeTls | undefined;
  /** Plain TCP, no authentication: only on a loopback address. */
  readonly insecure?: boolean | undefined;
  /** How long a connection may take to show what it speaks and finish its TLS handshake. */
  readonly handshakeTimeoutMs: number;
  readonly log: (line: string) => void;
}

/** A node speaks TLS, or (when told, on loopback only) plain TCP; never plain TCP by default. */
export function checkNodeSecurity(opts: Pick<NodeTransportOptions, 'host' | 'tls' | 'insecure'>): void {
  if (opts.tls !== undefined && opts.insecure) {
    throw new ConfigError('a node takes TLS credentials or --insecure, not both', { setting: 'insecure' });
  }
  if (opts.insecure) {
    if (!isLoopbackHost(opts.host)) {
      throw new ConfigError(
        `--insecure (plain TCP: no encryption, no authentication) is refused on ${opts.host}: only on a loopback address (127.0.0.1, ::1, localhost), which no other machine can reach; across a network run the node with --state DIR and give sources its join file`,
        { setting: 'insecure' },
      );
    }
    return;
  }
  if (opts.tls === undefined) {
    throw new ConfigError(
      'a node needs its TLS credentials (ferry serve --state DIR creates them) or, on loopback only, --insecure',
      { setting: 'state' },
    );
  }
}

/** The node's listening socket; `close()` also drops connections that have not been admitted yet. */
class NodeListener extends net.Server {
  /** Connections not yet handed to the node (first byte, TLS handshake, admission). */
  readonly unadmitted = new Set<net.Socket>();
  /**
   * TCP sockets in their TLS handshake, by peer address (unique among live connections): how the
   * TLS socket that completes it finds the socket it runs on.
   */
  readonly handshaking = new Map<string, net.Socket>();

  override close(callback?: (err?: Error) => void): this {
    for (const socket of this.unadmitted) socket.destroy();
    return super.close(callback);
  }
}

/**
 * The node's listening socket. A connection's first byte says what it speaks. On a TLS node a
 * peer must finish a TLS 1.3 handshake with a certificate of the node's CA, valid now, and be
 * admitted by `tls.admit` (known, not revoked) before `onPeer` gets it with its identity; nothing
 * it sent is read before that. A peer that speaks the other transport, or is not admitted, gets
 * an ERROR frame saying why (over TLS when it speaks TLS) and is hung up on.
 */
export function createNodeListener(
  opts: NodeTransportOptions,
  onPeer: (socket: net.Socket, identity: PeerIdentity) => void,
): net.Server {
  checkNodeSecurity(opts);
  const listener = new NodeListener();
  const secure = opts.tls === undefined ? undefined : tlsServer(opts.tls, opts, listener, onPeer);
  listener.on('connection', (socket) => {
    const peer = `${socket.remoteAddress}:${socket.remotePort}`;
    listener.unadmitted.add(socket);
    socket.once('close', () => {
      listener.unadmitted.delete(socket);
      if (listener.handshaking.get(peer) === socket) listener.handshaking.delete(peer);
    });
    socket.on('error', () => {}); // 'close' follows
    const silent = () =>
      refuse(socket, peer, `no HELLO within ${opts.handshakeTimeoutMs} ms`, false, opts.log);
    socket.setTimeout(opts.handshakeTimeoutMs);
    socket.once('timeout', silent);
    socket.once('data', (first: Buffer) => {
      socket.pause();
      socket.unshift(first);
      socket.setTimeout(0);
      socket.off('timeout', silent);
      const speaksTls = first[0] === TLS_HANDSHAKE_RECORD;
      if (secure !== undefined) {
        if (!speaksTls) {
          refuse(
            socket,
            peer,
            "this node accepts only TLS 1.3 connections with a credential it issued: replicate with the node's join file (--join FILE), not --insecure",
            false,
            opts.log,
          );
          return;
        }
        // The TLS server's own handshake timeout takes over.
        listener.handshaking.set(peer, socket);
        secure.emit('connection', socket);
        return;
      }
      if (speaksTls) {
        refuse(
          socket,
          peer,
          'this node runs with --insecure (plain TCP, loopback only): replicate to it with --insecure, not a join file',
          false,
          opts.log,
        );
        return;
      }
      listener.unadmitted.delete(socket);
      onPeer(socket, INSECURE_PEER);
      socket.resume();
    });
  });
  return listener;
}

function tlsServer(
  creds: NodeTls,
  opts: NodeTransportOptions,
  listener: NodeListener,
  onPeer: (socket: net.Socket, identity: PeerIdentity) => void,
): tls.Server {
  const fingerprint = certificateFingerprint(new X509Certificate(creds.ca));
  const server = tls.createServer({
    minVersion: 'TLSv1.3',
    ca: creds.ca,
    cert: creds.cert,
    key: creds.key,
    requestCert: true,
    // The peer's certificate IS verified against `ca` (and its dates); the verdict is acted on in
    // admit() below instead of by Node, which would cut the connection without a word: the source
    // could not tell an expired credential from a foreign one. Nothing is read from a peer that
    // was not admitted.
    rejectUnauthorized: false,
    handshakeTimeout: opts.handshakeTimeoutMs,
  });
  server.on('secureConnection', (socket: tls.TLSSocket) => {
    const peer = `${socket.remoteAddress}:${socket.remotePort}`;
    // From here the TLS socket stands for the connection: once admitted, it is the node's to close.
    const tcp = listener.handshaking.get(peer);
    listener.handshaking.delete(peer);
    if (tcp !== undefined) listener.unadmitted.delete(tcp);
    listener.unadmitted.add(socket);
    socket.once('close', () => listener.unadmitted.delete(socket));
    socket.on('error', () => {});
    void admit(socket, creds, fingerprint).then(
      (identity) => {
        if (socket.destroyed) return;
        listener.unadmitted.delete(socket);
        onPeer(socket, identity);
      },
      (err: unknown) => {
        const retryable = err instanceof CredentialRefused && err.retryable;
        refuse(socket, peer, errorMessage(err), retryable, opts.log);
      },
    );
  });
  server.on('tlsClientError', (err, socket) => {
    // A peer that hung up is gone, and its address with it.
    const who =
      socket.remoteAddress === undefined ? 'a peer' : `peer ${socket.remoteAddress}:${socket.remotePort}`;
    opts.log(`node: ${who}: TLS handshake failed: ${handshakeFailure(err)}`);
  });
  return server;
}

/** The peer's identity once its certificate is verified and its credential admitted. */
async function admit(socket: tls.TLSSocket, creds: NodeTls, fingerprint: string): Promise<PeerIdentity> {
  const cert = socket.getPeerX509Certificate();
  if (cert === undefined) {
    throw new CredentialRefused(
      'no client certificate: replicate with the join file of this node (--join FILE)',
    );
  }
  const serial = cert.serialNumber.toLowerCase();
  if (!socket.authorized) {
    const code = String(socket.authorizationError ?? 'unknown');
    switch (code) {
      case 'CERT_HAS_EXPIRED':
        throw new CredentialRefused(
          `credential ${serial} expired on ${new Date(cert.validTo).toISOString()}; ask the node's operator for a new join file (ferry serve issue-credential)`,
        );
      case 'CERT_NOT_YET_VALID':
        throw new CredentialRefused(
          `credential ${serial} is not valid before ${new Date(cert.validFrom).toISOString()} (is the source's or the node's clock wrong?)`,
        );
      case 'INVALID_PURPOSE':
        throw new CredentialRefused(`certificate ${serial} is not a source credential`);
      default:
        throw new CredentialRefused(
          `credential ${serial} was not issued by this node's CA (${fingerprint}): its join file belongs to another node (${code})`,
        );
    }
  }
  return creds.admit(cert);
}

/** Sends ERROR (on whatever the peer speaks) and hangs up; a peer that lingers is cut off. */
function refuse(
  socket: net.Socket,
  peer: string,
  reason: string,
  retryable: boolean,
  log: (line: string) => void,
): void {
  if (socket.destroyed) return;
  log(`node: peer ${peer}: refused: ${reason}`);
  socket.setTimeout(0);
  socket.end(encodeFrame({ type: 'error', retryable, reason }));
  const linger = setTimeout(() => socket.destroy(), REFUSAL_LINGER_MS);
  linger.unref();
  socket.once('close', () => clearTimeout(linger));
}

/** What a failed TLS handshake means for the node's operator. */
function handshakeFailure(err: Error): string {
  const message = errorMessage(err);
  // A source hangs up, without a TLS alert, when the node's certificate is not from the CA it pins.
  const hungUp = (err as NodeJS.ErrnoException).code === 'ECONNRESET';
  if (hungUp || /alert (bad certificate|unknown ca|certificate unknown)/i.test(message)) {
    return `${message} (a source does that when it does not trust this node's certificate: its join file is another node's)`;
  }
  return message;
}

// ---- The source's side ----

/** Client certificate checks that fail when the node's certificate is not from the pinned CA. */
const FOREIGN_NODE_CODES = new Set([
  'SELF_SIGNED_CERT_IN_CHAIN',
  'DEPTH_ZERO_SELF_SIGNED_CERT',
  'UNABLE_TO_VERIFY_LEAF_SIGNATURE',
  'UNABLE_TO_GET_ISSUER_CERT',
  'UNABLE_TO_GET_ISSUER_CERT_LOCALLY',
  'CERT_SIGNATURE_FAILURE',
  'CERT_UNTRUSTED',
  'CERT_REJECTED',
  'INVALID_PURPOSE',
]);

/** Raised by the source when a certificate of the right CA is not a node's. */
class NotANodeCertificate extends Error {
  constructor() {
    super(`the certificate is not a Ferry node's (no ${NODE_URI})`);
    this.name = 'NotANodeCertificate';
  }
}

/** Opens the source's connections to one node, over TLS with its join file or (loopback) plain TCP. */
export class NodeConnector {
  private readonly join: JoinCredential | undefined;

  constructor(
    private readonly uri: FerryUri,
    security: SourceSecurity,
  ) {
    checkSourceSecurity(uri, security);
    this.join = security.insecure ? undefined : security.join;
  }

  /** A connecting socket; writes before the TLS handshake completes are sent after it, encrypted. */
  connect(): net.Socket {
    const { host, port } = this.uri;
    if (this.join === undefined) return net.connect({ host, port });
    return tls.connect({
      host,
      port,
      minVersion: 'TLSv1.3',
      ca: this.join.ca,
      cert: this.join.cert,
      key: this.join.key,
      // The node's CA is pinned: it is the only authority trusted here and it belongs to one node,
      // so the host name is not checked (a node is reached by many names and addresses). What is
      // checked is that the certificate is that node's own, not a source credential of the same CA.
      checkServerIdentity: (_host, cert) =>
        (cert.subjectaltname ?? '').split(', ').includes(`URI:${NODE_URI}`)
          ? undefined
          : new NotANodeCertificate(),
    });
  }

  /**
   * A socket error in the source's terms: a refusal no retry can fix (another node, plain TCP
   * against TLS) becomes a permanent TransferError saying what to do; anything else is returned as is.
   */
  explain(err: Error): Error {
    const code = (err as NodeJS.ErrnoException).code ?? '';
    const message = errorMessage(err);
    const at = `${this.uri.host}:${this.uri.port}`;
    const permanent = (why: string) =>
      new TransferError(`${this.uri.name}: ${why}`, { retryable: false, cause: err });
    if (this.join === undefined) return err;
    if (FOREIGN_NODE_CODES.has(code) || err instanceof NotANodeCertificate) {
      return permanent(
        `the node at ${at} is not the node of join file ${this.join.origin}: its certificate was not issued by the CA pinned there (${this.join.node})`,
      );
    }
    if (code === 'CERT_HAS_EXPIRED') {
      return permanent(`the node's certificate has expired; restarting ferry serve renews it`);
    }
    if (
      /wrong version number|packet length too long|unknown protocol|record layer failure|http request/i.test(
        message,
      )
    ) {
      return permanent(
        `the node at ${at} does not speak TLS: it runs with --insecure (plain TCP, loopback only); replicate to it with --insecure, or restart it without --insecure and use its join file`,
      );
    }
    if (/alert protocol version|unsupported protocol/i.test(message)) {
      return permanent(`the node at ${at} does not speak TLS 1.3`);
    }
    return err;
  }
}
