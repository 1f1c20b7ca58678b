// A replication node applies the house rule for disk names (shared/engine/names.ts) to every HELLO,
// not only the protocol's path checks: a source that skips its own checks gets the protocol's error
// frame, and nothing is created in the node's folder.
import { randomBytes } from 'node:crypto';
import { mkdtemp, readdir } from 'node:fs/promises';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { MiB } from '../../shared/engine/units.ts';
import { ImageDirectory } from '../../shared/local/image-dir.ts';
import { startNode } from '../../shared/net/node.ts';
import {
  encodeFrame,
  type Frame,
  FrameReader,
  NO_TOKEN,
  PROTOCOL_VERSION,
} from '../../shared/net/protocol.ts';

const cleanups: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (let c = cleanups.pop(); c; c = cleanups.pop()) await c();
});

/** Sends one HELLO for `disk` and returns the node's first answer. */
async function hello(port: number, disk: string): Promise<Frame | undefined> {
  const socket = net.connect({ host: '127.0.0.1', port });
  cleanups.push(async () => {
    socket.destroy();
  });
  return new Promise((resolve, reject) => {
    const reader = new FrameReader({ from: 'node', onFrame: (f) => resolve(f) });
    socket.on('data', (b: Buffer) => reader.push(b));
    socket.once('error', reject);
    socket.once('close', () => resolve(undefined));
    socket.write(
      encodeFrame({
        type: 'hello',
        version: PROTOCOL_VERSION,
        disk,
        sizeBytes: MiB,
        kind: 'full',
        resume: false,
        session: randomBytes(16).toString('hex'),
        token: NO_TOKEN,
        cycle: '',
      }),
    );
  });
}

describe('ferry serve and disk names', () => {
  it('refuses a HELLO whose disk name breaks the name rule, and welcomes one that keeps it', async () => {
    // Prepare
    const dir = await mkdtemp(join(tmpdir(), 'ferry-node-names-'));
    const node = await startNode({
      listen: '127.0.0.1:0',
      targets: await ImageDirectory.open(dir),
      sessionDir: dir,
      insecure: true,
      log: () => {},
    });
    cleanups.push(() => node.close());
    // Names the protocol's own checks let through (no separator, no "..") but the rule does not.
    const bad = ['.hidden', '-rf', 'a b', 'disk\u00e9', 'x'.repeat(129)];
    for (const disk of bad) {
      // Act
      const answer = await hello(node.port, disk);
      // Assess: the protocol's error frame, not retryable, naming the disk and the rule.
      expect(answer, disk).toEqual({
        type: 'error',
        retryable: false,
        reason: `disk name ${JSON.stringify(disk)} is not allowed (1-128 letters, digits, '.', '_' or '-', starting with a letter or digit)`,
      });
    }
    expect(await readdir(dir)).toEqual([]);

    const ok = await hello(node.port, 'disk-1.img_2');
    expect(ok).toMatchObject({ type: 'welcome' });
  });
});
