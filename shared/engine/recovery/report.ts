// record: the job's report from what the state machine collected (no arithmetic happens in the state
// machine): the outcome, the achieved RTO, health per machine, what the clean-up removed and left,
// and a migration's data-loss window. Written to the catalog; a failover or migration also marks
// its plan as failed over.
import type { Clock } from '../ports.ts';
import type { RecoveryRecords } from './ports.ts';
import type { RecoveryOutcome, RecoveryReport, RecoveryReportInput, ReportedMachine } from './types.ts';

// A Catch's Cause can be a whole stack trace or an SDK dump: the report keeps its start.
const MAX_ERROR_CHARS = 1000;

function outcomeOf(input: RecoveryReportInput): RecoveryOutcome {
  const cleanupFailed = input.verify !== undefined && !input.verify.clean;
  if (input.mode === 'cleanup') return input.verify?.clean === true ? 'cleaned-up' : 'cleanup-failed';
  // A drill that leaves resources behind costs money: that is what the operator must see first.
  if (input.mode === 'drill' && cleanupFailed) return 'cleanup-failed';
  if (input.error !== undefined) return 'failed';
  // A failback without its cutover launches nothing: it succeeded when its reverse cycle published.
  if (input.mode === 'failback' && input.failback?.cutover === false) {
    return input.failback.reverseCheckpointId === undefined ? 'failed' : 'succeeded';
  }
  if (input.health === undefined) return 'failed';
  if (!input.health.healthy) return 'unhealthy';
  if (input.mode === 'drill' && input.verify === undefined) return 'cleanup-failed';
  return 'succeeded';
}

function machinesOf(input: RecoveryReportInput): ReportedMachine[] {
  const names = [
    ...new Set([
      ...(input.machines ?? []).map((m) => m.name),
      ...(input.launched ?? []).map((m) => m.name),
      ...(input.health?.machines ?? []).map((m) => m.name),
    ]),
  ];
  return names.map((name) => {
    const resolved = input.machines?.find((m) => m.name === name);
    const launched = input.launched?.find((m) => m.name === name);
    const health = input.health?.machines.find((m) => m.name === name);
    return {
      name,
      kind: launched?.kind ?? resolved?.kind,
      instanceId: launched?.instanceId,
      volumeIds: [...(launched?.volumeIds ?? [])],
      healthy: health?.healthy,
      state: health?.state ?? (launched === undefined ? 'not launched' : undefined),
      reason: health?.reason,
      disks: resolved?.disks.map((d) => ({ disk: d.disk, deviceName: d.deviceName })),
    };
  });
}

/**
 * Writes a cutover may have lost: zero when the operator quiesced the source (or, for a failback's
 * cutover, the recovered machines) before the last cycle; otherwise at least the time from that
 * cycle's checkpoint being published to the first machine launched from it, since the source went on
 * taking writes the checkpoint does not hold (its data is older still: as of the cycle's snapshot).
 * Undefined when nothing was launched (the source is still the primary) or the mode is not a cutover.
 */
function dataLossWindow(input: RecoveryReportInput): number | undefined {
  const cutover =
    input.mode === 'migration' || (input.mode === 'failback' && input.failback?.cutover === true);
  if (!cutover) return undefined;
  const quiesced = input.mode === 'migration' ? input.sourceQuiesced : input.failback?.sourceQuiesced;
  if (quiesced === true) return 0;
  const launches = (input.launched ?? []).map((l) => Date.parse(l.launchedAt)).filter(Number.isFinite);
  if (input.checkpoint === undefined || launches.length === 0) return undefined;
  const gap = Math.min(...launches) - Date.parse(input.checkpoint.publishedAt);
  return Number.isFinite(gap) ? Math.max(0, Math.floor(gap / 1000)) : undefined;
}

/** The report of a job (pure). */
export function buildReport(jobId: string, input: RecoveryReportInput, finishedAt: string): RecoveryReport {
  const error =
    input.error === undefined
      ? undefined
      : [input.error.Error, input.error.Cause].filter(Boolean).join(': ').slice(0, MAX_ERROR_CHARS) ||
        'unknown error';
  const dataLossWindowSeconds = dataLossWindow(input);
  const cleanup =
    input.teardown === undefined && input.verify === undefined
      ? undefined
      : {
          terminated: input.teardown?.terminated.length ?? 0,
          deregistered: input.teardown?.deregistered.length ?? 0,
          deletedVolumes: input.teardown?.deletedVolumes.length ?? 0,
          deletedSnapshots: input.teardown?.deletedSnapshots.length ?? 0,
          clean: input.verify?.clean,
          remaining: input.verify?.remaining,
        };
  return {
    jobId,
    mode: input.mode,
    plan: input.plan,
    set: input.set,
    checkpoint: input.checkpoint,
    startedAt: input.startedAt,
    finishedAt,
    outcome: outcomeOf(input),
    secondsToRunning: input.health?.healthy ? input.health.secondsToRunning : undefined,
    machines: machinesOf(input),
    schedulePaused: input.pause === undefined ? undefined : input.pause.found,
    cleanup,
    dataLossWindowSeconds,
    failback: input.failback,
    error,
  };
}

export interface RecordDeps {
  readonly records: RecoveryRecords;
  readonly clock: Pick<Clock, 'now'>;
}

/**
 * Writes the job's report (a retry rewrites the same item). A failover or migration that launched
 * machines marks its plan as failed over, healthy or not: its source is no longer the primary. A
 * failback's cutover that launched the plan's machines again clears that mark (if it is still the
 * failed-back job's): the original side is the primary again.
 */
export async function recordRecovery(
  deps: RecordDeps,
  jobId: string,
  input: RecoveryReportInput,
): Promise<RecoveryReport> {
  const report = buildReport(jobId, input, new Date(deps.clock.now()).toISOString());
  await deps.records.put(report);
  const launched = (input.launched ?? []).length > 0;
  if ((input.mode === 'failover' || input.mode === 'migration') && launched) {
    await deps.records.markFailedOver(report);
  }
  if (input.mode === 'failback' && input.failback?.cutover === true && launched) {
    await deps.records.clearFailedOver(input.plan, input.failback.failoverJobId);
  }
  return report;
}
