// `ferry local-cloud` as someone watching the serverless path runs it: the synthesized state machine
// with the real handlers on emulators, a full cycle, verified against its volumes, JSON at the end.
// (The cycles and their faults are tested in depth in test/functions/local-cloud.test.ts.)
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { expect, it } from 'vitest';
import { ferry } from '../support/ferry-cli.ts';

const BIN = join(import.meta.dirname, '../../bin/ferry.mjs');

it('runs a full cycle of the deployed definition locally and verifies it bit-exact', async () => {
  const { code, stdout, stderr } = await new Promise<{ code: number | null; stdout: string; stderr: string }>(
    (resolve, reject) => {
      const child = spawn(process.execPath, [BIN, 'local-cloud', '--incrementals', '0', '--json'], {
        stdio: ['ignore', 'pipe', 'pipe'],
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
      child.on('close', (c) => resolve({ code: c, stdout, stderr }));
    },
  );
  expect(code, stderr).toBe(0);
  const result = JSON.parse(stdout) as { ok: boolean; cycles: { status: string; verified: boolean }[] };
  expect(result.ok).toBe(true);
  expect(result.cycles).toHaveLength(1);
  expect(result.cycles[0]).toMatchObject({ status: 'SUCCEEDED', verified: true });
}, 180_000);

it('refuses a writer concurrency it cannot run, before starting anything', async () => {
  const bad = await ferry(['local-cloud', '--writer-concurrency', '0']);
  expect(bad.code).toBe(2);
  expect(bad.stderr).toMatch(/--writer-concurrency must be a whole number from 1 to 20/);
  const notForRecovery = await ferry(['local-cloud', '--recover', 'drill', '--writer-concurrency', '2']);
  expect(notForRecovery.code).toBe(2);
  expect(notForRecovery.stderr).toMatch(/--writer-concurrency does not apply to it/);
}, 60_000);
