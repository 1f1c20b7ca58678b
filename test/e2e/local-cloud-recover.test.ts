// `ferry local-cloud --recover drill --json` as someone watching a recovery runs it: the synthesized
// Recovery state machine with the real recovery handler on moto_server and dynalite, a drill from a
// checkpoint of moto snapshots to its report, torn down and counted by tag: zero left. (Every mode and
// its faults are tested in depth in test/local-cloud/recovery-moto.test.ts.) And a failback: a failover,
// the reverse cycle from the shared checkpoint, the cutover onto the plan's machines, all cleaned up.
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

it('fails a failover back: the reverse cycle from the shared checkpoint, then the cutover; nothing left', async () => {
  const { code, stdout, stderr } = await ferry(['local-cloud', '--recover', 'failback', '--json']);
  expect(code, stderr).toBe(0);
  const result = JSON.parse(stdout);
  const failover = result.job.report;
  expect(result).toMatchObject({ ok: true, mode: 'failback', schedule: 'DISABLED' });
  expect(failover).toMatchObject({ mode: 'failover', outcome: 'succeeded' });
  const [back, cutover] = result.failback;
  expect(back.actions).toEqual(['prepare-failback', 'record']);
  expect(back.report).toMatchObject({
    mode: 'failback',
    outcome: 'succeeded',
    failback: {
      failoverJobId: failover.jobId,
      sharedCheckpointId: result.preparedCheckpoint.id,
      fromBase: true,
      cutover: false,
    },
  });
  const reverseSet = back.report.failback.reverseSet;
  expect(cutover.report).toMatchObject({
    outcome: 'succeeded',
    checkpoint: { id: `${reverseSet}/cycle-2` },
    dataLossWindowSeconds: 0,
    failback: { cutover: true, fromBase: false },
    machines: [{ name: 'web-1', healthy: true }],
  });
  expect(result.finalCycles).toEqual([`${reverseSet}/cycle-1`, `${reverseSet}/cycle-2`]);
  // The failover's machines and the cutover's, ended on command and counted by tag: zero left.
  expect(result.cleanups).toHaveLength(2);
  for (const c of result.cleanups)
    expect(c.leftByTag).toEqual({ instances: 0, volumes: 0, images: 0, snapshots: 0 });
}, 180_000);
