// Fault matrix: replication toward a real `ferry serve` node, and the node or the network failing
// mid-transfer: the node killed with SIGKILL (then restarted on the same port), and every
// connection cut mid-chunk by a user-space proxy in between (then let through again).
import { mkdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect } from 'vitest';
import { startWanLink, type WanLink } from '../../shared/netem/wan-link.ts';
import {
  describeRun,
  exists,
  expectKilled,
  FaultSet,
  faultCase,
  NbdImage,
  type Run,
  reportTable,
  type Served,
  SLOW_PARAMS,
  startServe,
  workdir,
} from './support.ts';

// How long the node or the link stays down: long enough that the source sees its connections
// fail and has to reconnect, far inside the source's retry budget.
const DOWN_MS = 500;

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * Waits until `ready()` holds while `running` has not ended; fails the case if the run ended first
 * (the fault could not be injected mid-transfer).
 */
async function whileRunning(
  running: Promise<Run>,
  ready: () => Promise<boolean>,
  what: string,
): Promise<void> {
  let ended: Run | undefined;
  void running.then((r) => {
    ended = r;
  });
  while (ended === undefined) {
    if (await ready()) return;
    await sleep(10);
  }
  throw new Error(`the run ended before ${what}: ${describeRun(ended)}`);
}

describe('a ferry serve node failing mid-transfer', () => {
  reportTable('a ferry serve node failing mid-transfer');

  faultCase(
    'node killed mid-transfer',
    'ferry serve SIGKILLed at the first durable progress record, restarted on its port',
    async (row) => {
      const dir = await workdir('node-kill');
      const images = join(dir, 'images');
      const nodeState = join(dir, 'node-state');
      await mkdir(images, { recursive: true });
      let node: Served = await startServe({ images, state: nodeState });
      const set = await FaultSet.create('node-kill', {
        seed: 51,
        node: { address: node.address, images, joinFile: node.joinFile },
        params: SLOW_PARAMS,
      });
      const d = set.disks[0]!;
      const nbd = await NbdImage.start(d.source, join(set.dir, 'src.sock'), { rate: '4M' });
      try {
        await set.seed();
        await set.mutate(51);
        d.sourceUri = nbd.uri;
        const running = set.replicate();
        await whileRunning(running, set.progressSaved(), 'the node could be killed');
        await node.crash();
        await sleep(DOWN_MS);
        node = await startServe({ images, state: nodeState, port: node.port });
        const run = await running;
        row.note(run.code === 0 ? 'the source rode out the restart' : `the source failed: exit ${run.code}`);
        await nbd.restart();
        return await set.checkContract(run);
      } finally {
        await nbd.stop();
        await node.stop();
        await set.remove();
        await rm(dir, { recursive: true, force: true });
      }
    },
  );

  faultCase(
    'node killed mid-transfer, down until the source gives up',
    'ferry serve SIGKILLed at the first durable progress record, restarted after the run ended, rerun',
    async (row) => {
      const dir = await workdir('node-down');
      const images = join(dir, 'images');
      const nodeState = join(dir, 'node-state');
      let node: Served = await startServe({ images, state: nodeState });
      const set = await FaultSet.create('node-down', {
        seed: 53,
        node: { address: node.address, images, joinFile: node.joinFile },
        params: SLOW_PARAMS,
      });
      const d = set.disks[0]!;
      const nbd = await NbdImage.start(d.source, join(set.dir, 'src.sock'), { rate: '4M' });
      try {
        await set.seed();
        await set.mutate(53);
        d.sourceUri = nbd.uri;
        const running = set.replicate();
        await whileRunning(running, set.progressSaved(), 'the node could be killed');
        await node.crash();
        const run = await running;
        expect(run.code, `with its node gone the run cannot succeed: ${describeRun(run)}`).not.toBe(0);
        row.note(`source gave up: ${run.stderr.trim().split('\n').at(-1)?.slice(0, 80)}`);
        node = await startServe({ images, state: nodeState, port: node.port });
        await nbd.restart();
        return await set.checkContract(run);
      } finally {
        await nbd.stop();
        await node.stop();
        await set.remove();
        await rm(dir, { recursive: true, force: true });
      }
    },
    180_000,
  );

  // The source dies between the node's commit and its word on publication: the node settles the
  // commit at the next contact (same cycle: rolled back; later cycle: final).
  for (const [name, crashAt, tag, seed] of [
    ['source killed during commit of disk 1 of 2 on a node', 'commit:0', 'node-commit', 54],
    ['source killed after publishing, before the node heard of it', 'after-publish', 'node-published', 56],
  ] as const) {
    faultCase(
      name,
      `SIGKILL of ferry replicate at "${crashAt}", two disks on one ferry serve node`,
      async () => {
        const dir = await workdir(tag);
        const images = join(dir, 'images');
        const node = await startServe({ images, state: join(dir, 'node-state') });
        const set = await FaultSet.create(tag, {
          disks: ['os', 'data'],
          seed,
          node: { address: node.address, images, joinFile: node.joinFile },
        });
        try {
          await set.seed();
          await set.mutate(seed);
          const run = await set.replicate({ crashAt });
          expectKilled(run, crashAt);
          return await set.checkContract(run);
        } finally {
          await node.stop();
          await set.remove();
          await rm(dir, { recursive: true, force: true });
        }
      },
    );
  }

  faultCase(
    'two disks on one node disk',
    'job: disks alpha and beta both -> ferry://NODE/shared, no checkpoint yet',
    async (row) => {
      const dir = await workdir('node-one-target');
      const images = join(dir, 'images');
      const node = await startServe({ images, state: join(dir, 'node-state') });
      const set = await FaultSet.create('node-one-target', {
        disks: ['alpha', 'beta'],
        seed: 55,
        node: { address: node.address, images, joinFile: node.joinFile },
      });
      try {
        for (const d of set.disks) d.target = `ferry://${node.address}/shared`;
        const run = await set.replicate();
        expect(run.signal, describeRun(run)).toBeNull();
        expect(run.code, `must be refused: ${describeRun(run)}`).not.toBe(0);
        expect(run.stderr, 'the refusal names both disks').toMatch(
          /\balpha\b[^\n]*\bbeta\b|\bbeta\b[^\n]*\balpha\b/,
        );
        row.note(`exit ${run.code}: ${run.stderr.trim().split('\n').at(-1)?.slice(0, 90)}`);
        expect(await exists(join(images, 'shared')), 'the refused job must not create the image').toBe(false);
        expect((await set.checkpoints()).ids).toEqual([]);
        return 'refused naming both disks, nothing written or published';
      } finally {
        await node.stop();
        await set.remove();
        await rm(dir, { recursive: true, force: true });
      }
    },
  );

  faultCase(
    'connections dropped mid-chunk',
    'every source-node connection cut by the proxy mid-chunk (8 Mbit/s link), link back after 0.5 s',
    async (row) => {
      const dir = await workdir('link-cut');
      const images = join(dir, 'images');
      await mkdir(images, { recursive: true });
      const node = await startServe({ images, state: join(dir, 'node-state') });
      const target = { host: '127.0.0.1', port: node.port };
      let link: WanLink = await startWanLink({ target, rttMs: 2, rateBitsPerSec: 1e9 });
      const set = await FaultSet.create('link-cut', {
        seed: 52,
        node: { address: link.address, images, joinFile: node.joinFile },
        params: SLOW_PARAMS,
      });
      try {
        await set.seed();
        await set.mutate(52);
        link.setRate(8e6);
        // Cut once progress is durable and chunk bytes are in the link: some chunk is then part way
        // between source and node.
        const saved = set.progressSaved();
        let held = 0;
        const running = set.replicate();
        await whileRunning(
          running,
          async () => {
            held = link.stats().heldBytesUp;
            return held > 0 && (await saved());
          },
          'the link could be cut',
        );
        await link.close();
        await sleep(DOWN_MS);
        link = await startWanLink({
          target,
          rttMs: 2,
          rateBitsPerSec: 1e9,
          listen: { host: '127.0.0.1', port: link.port },
        });
        const run = await running;
        row.note(
          `${held} bytes were in the link when it was cut; ${run.code === 0 ? 'the source reconnected' : `the source failed: exit ${run.code}`}`,
        );
        return await set.checkContract(run);
      } finally {
        await link.close();
        await node.stop();
        await set.remove();
        await rm(dir, { recursive: true, force: true });
      }
    },
  );
});
