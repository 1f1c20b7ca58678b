// `ferry local-cloud --recover drill --json` as someone watching a recovery runs it: the synthesized
// Recovery state machine with the real recovery handler on moto_server and dynalite, a drill from a
// checkpoint of moto snapshots to its report, torn down and counted by tag: zero left. (Every mode and
// its faults are tested in depth in test/local-cloud/recovery-moto.test.ts.)
import { expect, it } from 'vitest';
import { ferry } from '../support/ferry-cli.ts';

it('runs a drill of the deployed Recovery definition to its report, with nothing left by tag', async () => {
  // Act
  const { code, stdout, stderr } = await ferry(['local-cloud', '--recover', 'drill', '--json']);
  // Assess
  expect(code, stderr).toBe(0);
  const result = JSON.parse(stdout);
  expect(result).toMatchObject({
    ok: true,
    mode: 'drill',
    settings: { waits: 'fast' },
    job: {
      status: 'SUCCEEDED',
      report: {
        mode: 'drill',
        outcome: 'succeeded',
        checkpoint: { id: result.preparedCheckpoint.id },
        machines: [{ name: 'web-1', healthy: true }],
        cleanup: { clean: true, remaining: { instances: 0, volumes: 0, images: 0, snapshots: 0 } },
      },
      // Counted by this command after the run, apart from the machine's own verification.
      leftByTag: { instances: 0, volumes: 0, images: 0, snapshots: 0 },
    },
  });
  expect(result.job.report.secondsToRunning).toEqual(expect.any(Number));
  expect(result.job.actions).toEqual(
    expect.arrayContaining(['resolve', 'launch', 'health', 'teardown', 'verify-teardown', 'record']),
  );
  expect(result.checkpointSource).toContain('moto snapshots');
}, 180_000);
