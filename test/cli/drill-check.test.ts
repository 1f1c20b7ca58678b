// A drill's health check (`ferry recover --test --check CMD`): the command sees each export's URI,
// its exit status is the verdict, and the drill's TTL (or an interrupt) kills it with everything it
// started. The check against real exports: test/e2e/drill.test.ts.
import { readFileSync } from 'node:fs';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { describe, expect, it } from 'vitest';
import { drillUriVariable, runDrillCheck } from '../../cli/drill.ts';

const drill = {
  id: 'drill-1',
  exports: [
    { disk: 'root', uri: 'nbd://127.0.0.1:10809', pid: 1 },
    { disk: 'data-1', uri: 'nbd://127.0.0.1:10810', pid: 2 },
  ],
};

/** Whether `pid` runs: a zombie (killed, not yet reaped by whoever adopted it) does not. */
const alive = (pid: number) => {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return false;
  }
};

describe('runDrillCheck', () => {
  it('gives the command every export and passes its output through; exit 0 is healthy', async () => {
    const out: Buffer[] = [];
    const check = await runDrillCheck(
      drill,
      'echo "$FERRY_DRILL_ID $FERRY_DRILL_URI_ROOT $FERRY_DRILL_URI_DATA_1"; echo "$FERRY_DRILL_URIS" >&2',
      10_000,
      (c) => out.push(c),
    );
    expect(check).toMatchObject({ healthy: true, exitCode: 0 });
    expect(check).not.toHaveProperty('reason');
    expect(Buffer.concat(out).toString()).toContain('drill-1 nbd://127.0.0.1:10809 nbd://127.0.0.1:10810');
    expect(Buffer.concat(out).toString()).toContain(
      'root=nbd://127.0.0.1:10809 data-1=nbd://127.0.0.1:10810',
    );
    expect(drillUriVariable('data-1')).toBe('FERRY_DRILL_URI_DATA_1');
  });

  it('a failing command is unhealthy with its exit status', async () => {
    const check = await runDrillCheck(drill, 'exit 3', 10_000, () => {});
    expect(check).toMatchObject({ healthy: false, exitCode: 3, reason: 'exit status 3' });
  });

  it('the TTL kills the command and whatever it started; so does an interrupt', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'ferry-check-'));
    try {
      const pidFile = join(dir, 'child.pid');
      const check = await runDrillCheck(drill, `sleep 60 & echo $! > ${pidFile}; wait`, 300, () => {});
      expect(check).toMatchObject({ healthy: false, exitCode: null, reason: "killed at the drill's TTL" });
      const child = Number((await readFile(pidFile, 'utf8')).trim());
      for (let i = 0; i < 50 && alive(child); i++) await sleep(20);
      expect(alive(child)).toBe(false);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
    const abort = new AbortController();
    const running = runDrillCheck(drill, 'sleep 60', 60_000, () => {}, abort.signal);
    abort.abort();
    expect(await running).toMatchObject({ healthy: false, reason: 'killed: the drill was interrupted' });
  });
});
