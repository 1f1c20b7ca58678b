// Local commands load no AWS code: the SDK prints a NodeVersionSupportWarning on Node < 22 when a
// client is made, and an operator copying files between two local images should not see it. A
// preloaded probe counts the @aws-sdk modules each run loaded, so a static import that makes no
// client (and so prints nothing yet) is caught too.
import { spawn } from 'node:child_process';
import { mkdtemp, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { MiB } from '../../shared/engine/units.ts';
import { createDiskImage } from '../../shared/local/workload.ts';

const BIN = join(import.meta.dirname, '../../bin/ferry.mjs');
const NODE_MAJOR = Number(process.versions.node.split('.')[0]);

// Prints, at exit, how many modules of the AWS SDK the process loaded (CommonJS: all of @aws-sdk).
const PROBE = `
const Module = require('node:module');
process.on('exit', () => {
  const n = Object.keys(Module._cache).filter((p) => p.includes('/node_modules/@aws-sdk/')).length;
  process.stderr.write('aws-sdk modules loaded: ' + n + '\\n');
});
`;

interface Run {
  code: number | null;
  stdout: string;
  /** Standard error without the probe's line. */
  stderr: string;
  awsModules: number;
}

let dir: string;
let probe: string;

function ferry(args: string[], env: NodeJS.ProcessEnv = process.env): Promise<Run> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['--require', probe, BIN, ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env,
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (b) => {
      stdout += b;
    });
    child.stderr.on('data', (b) => {
      stderr += b;
    });
    child.on('error', reject);
    child.on('close', (code) => {
      const m = /^aws-sdk modules loaded: (\d+)\n/m.exec(stderr);
      resolve({
        code,
        stdout,
        stderr: stderr.replace(/^aws-sdk modules loaded: \d+\n/m, ''),
        awsModules: m ? Number(m[1]) : Number.NaN,
      });
    });
  });
}

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'ferry-no-aws-'));
  probe = join(dir, 'probe.cjs');
  await writeFile(probe, PROBE);
});

describe('local commands and the AWS SDK', () => {
  it('replicate file: -> file:, checkpoints and verify load no AWS code and print no SDK notice', async () => {
    // Prepare
    const src = join(dir, 'src.img');
    await createDiskImage(src, { size: 2 * MiB, seed: 8 });
    const state = join(dir, 'state');
    // Act
    const runs = {
      replicate: await ferry([
        'replicate',
        '--source',
        `file:${src}`,
        '--target',
        `file:${join(dir, 'dst.img')}`,
        '--state',
        state,
      ]),
      checkpoints: await ferry(['checkpoints', '--state', state]),
      verify: await ferry(['verify', '--state', state]),
    };
    // Assess
    for (const [command, r] of Object.entries(runs)) {
      expect(r.code, `${command}: ${r.stderr}`).toBe(0);
      expect(r.awsModules, command).toBe(0);
      expect(r.stderr, command).not.toMatch(/NodeVersionSupportWarning|AWS SDK/);
    }
    expect(runs.checkpoints.stdout).toMatch(/^default#1 /);
  });

  it('does load the SDK for an ebs:// source (the probe sees it), and only then may print its notice', async () => {
    // Prepare: no region anywhere, so the EBS client fails at once without touching the network.
    const env: NodeJS.ProcessEnv = {
      ...process.env,
      AWS_CONFIG_FILE: join(dir, 'none'),
      AWS_SHARED_CREDENTIALS_FILE: join(dir, 'none'),
    };
    delete env.AWS_REGION;
    delete env.AWS_DEFAULT_REGION;
    delete env.AWS_PROFILE;
    delete env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED;
    // Act
    const r = await ferry(
      [
        'replicate',
        '--source',
        'ebs://snap-0123456789abcdef0',
        '--target',
        `file:${join(dir, 'ebs.img')}`,
        '--state',
        join(dir, 'ebs-state'),
      ],
      env,
    );
    // Assess
    expect(r.code).not.toBe(0);
    expect(r.awsModules).toBeGreaterThan(0);
    if (NODE_MAJOR < 22) expect(r.stderr).toMatch(/NodeVersionSupportWarning/);
  });
});
