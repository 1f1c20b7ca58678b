// `ferry local-cloud`: the serverless path, watched on one machine. The state machine `cdk synth`
// produces runs in aws-local-stepfunctions with the real Lambda handlers, on DynamoDB (dynalite),
// SQS (fauxqs) and EBS (Ferry's emulator); EC2 volumes are buffers in memory. A two-disk plan
// replicates a full cycle and incremental cycles, and every published checkpoint's snapshots are
// read back block by block and compared with the volumes as they were snapshotted. Each cycle's
// requests are counted and priced (local-cloud/usage.ts, cost.ts, prices.ts); the settings they were
// counted with (fast or real waits, the workload's size) are printed and recorded with them.
import type {
  ExecutionOutcome,
  LocalCloudEvent,
  LocalCloudSettings,
  WaitMode,
} from '../local-cloud/cloud.ts';
import type { CycleCost, TransitionBreakdown } from '../local-cloud/cost.ts';
import type { Usage } from '../local-cloud/usage.ts';
import type { WorkloadSize } from '../local-cloud/workload.ts';
import { formatBytes } from '../shared/engine/units.ts';

export interface LocalCloudDemoOptions {
  /** Incremental cycles after the full one. */
  readonly incrementals: number;
  /** Inject faults into the first incremental: a killed writer, duplicate deliveries, throttling. */
  readonly faults: boolean;
  /** Print every state the executions enter, not only the milestones. */
  readonly verbose: boolean;
  /** 'fast' cuts every Wait to 200 ms (its Step Functions counts are not AWS's); 'real' does not. */
  readonly waits: WaitMode;
  /** The workload: its disks and how much each cycle changes (local-cloud/workload.ts). */
  readonly size: WorkloadSize;
  readonly json: boolean;
  readonly log: (line: string) => void;
}

const PLAN = 'local-plan';

interface CycleSummary extends Omit<CycleCost, 'costPerCycle'> {
  readonly cycle: string;
  /** 'full' or 'incremental'. */
  readonly kind: 'full' | 'incremental';
  readonly status: ExecutionOutcome['status'];
  readonly checkpointId?: string;
  readonly error?: string;
  readonly childExecutions: number;
  readonly writerInvocations: number;
  readonly writersKilled: number;
  readonly blocksWritten: number;
  readonly throttled: number;
  readonly seconds: number;
  readonly verified: boolean;
  readonly costPerCycle: CycleCost['costPerCycle'];
  /** The Step Functions transitions: passes around each Wait loop, and the cycle's fixed path. */
  readonly stepFunctions: TransitionBreakdown;
  /** Every counter the cost is computed from (local-cloud/usage.ts). */
  readonly usage: Usage;
}

/** Runs the demo; true when every cycle published a checkpoint equal to its volumes. */
export async function runLocalCloud(opts: LocalCloudDemoOptions): Promise<boolean> {
  // Development dependencies and test emulators: loaded only here, each missing one named.
  const { checkLocalCloudPrerequisites, startLocalEmulators } = await import(
    '../local-cloud/start-emulators.ts'
  );
  await checkLocalCloudPrerequisites();
  const [{ LocalCloud }, { changeVolumes, workloadDisks }, { cycleCost, transitionBreakdown }, { PRICES }] =
    await Promise.all([
      import('../local-cloud/cloud.ts'),
      import('../local-cloud/workload.ts'),
      import('../local-cloud/cost.ts'),
      import('../local-cloud/prices.ts'),
    ]);
  const log = opts.json ? () => {} : opts.log;

  log('starting emulators: DynamoDB (dynalite), SQS (fauxqs), EBS direct APIs (Ferry emulator)');
  const emulators = await startLocalEmulators();
  const summaries: CycleSummary[] = [];
  let settings: LocalCloudSettings | undefined;
  try {
    log('synthesizing the stack (as cdk synth) and resolving the cycle state machine to plain ASL');
    const cloud = await LocalCloud.start({
      endpoints: emulators.endpoints,
      snapshots: emulators.snapshots,
      waits: opts.waits,
    });
    settings = cloud.settings;
    try {
      for (const line of describeSettings(cloud.settings)) log(line);
      const volumes = workloadDisks(opts.size).map((v) => ({
        ...v,
        volumeId: cloud.ec2.createVolume(v.size),
      }));
      const volume = (disk: string) => cloud.ec2.volume(volumes.find((v) => v.disk === disk)?.volumeId ?? '');
      log(
        `workload ${opts.size.name} (full ×${opts.size.fullScale}, incremental ×${opts.size.incrementalScale}): volumes ${volumes.map((v) => `${v.disk} ${v.volumeId} ${formatBytes(v.size)}`).join(', ')}`,
      );

      for (let n = 0; n <= opts.incrementals; n++) {
        // A fragmented change map: data regions and scattered writes, a region rewritten, a block zeroed.
        changeVolumes(volume, opts.size, n);
        const name = `${PLAN}-${n === 0 ? 'full' : `incr-${n}`}-${Date.now()}`;
        const expected = new Map(volumes.map((v) => [v.disk, Buffer.from(volume(v.disk))]));
        const withFaults = opts.faults && n === 1;
        if (withFaults)
          log('faults: writer #1 killed after 2 blocks, every grant delivered twice, throttling');
        const puts0 = emulators.ebs.counters.succeeded.PutSnapshotBlock;
        const throttled0 = emulators.ebs.counters.throttled.PutSnapshotBlock;
        log(`cycle ${name}: ${n === 0 ? 'full' : 'incremental'}`);
        const outcome = await cloud.runExecution(
          { plan: PLAN, set: PLAN, disks: volumes.map(({ disk, volumeId }) => ({ disk, volumeId })) },
          {
            name,
            onEvent: (e) => report(e, opts.verbose, log),
            ...(withFaults
              ? {
                  faults: {
                    kill: { invocations: [1], afterPutBlocks: 2 },
                    duplicateDeliveries: true,
                    beforeInvoke: (k: number) => {
                      if (k % 3 === 2) emulators.ebs.faults.throttleNext('PutSnapshotBlock', 4);
                    },
                  },
                }
              : {}),
          },
        );
        let verified = false;
        const output = outcome.output as { status?: string; checkpointId?: string } | undefined;
        if (outcome.status === 'SUCCEEDED' && output?.status === 'published') {
          const checkpoint = await cloud.latestCheckpoint(PLAN);
          verified = checkpoint?.id === output.checkpointId;
          for (const d of checkpoint?.disks ?? []) {
            const want = expected.get(d.disk);
            const compared = want === undefined ? undefined : await cloud.compareSnapshot(d.target, want);
            const same = compared !== undefined && compared.differing.length === 0;
            verified &&= same;
            log(
              `  verify ${d.disk}: snapshot ${d.target} read back (${compared?.blocksRead ?? 0} blocks) ${
                same ? 'equals' : 'DIFFERS FROM'
              } volume ${volumes.find((v) => v.disk === d.disk)?.volumeId}`,
            );
          }
        }
        const summary: CycleSummary = {
          cycle: name,
          kind: n === 0 ? 'full' : 'incremental',
          status: outcome.status,
          ...(output?.checkpointId === undefined ? {} : { checkpointId: output.checkpointId }),
          ...(outcome.error === undefined ? {} : { error: `${outcome.error}: ${outcome.cause}` }),
          childExecutions: outcome.children,
          writerInvocations: outcome.writers.invocations,
          writersKilled: outcome.writers.killed,
          blocksWritten: emulators.ebs.counters.succeeded.PutSnapshotBlock - puts0,
          throttled: emulators.ebs.counters.throttled.PutSnapshotBlock - throttled0,
          seconds: Math.round(outcome.ms / 100) / 10,
          verified,
          ...cycleCost(outcome.usage, outcome.work),
          stepFunctions: transitionBreakdown(outcome.usage, cloud.settings.waitLoops),
          usage: outcome.usage,
        };
        summaries.push(summary);
        log(
          `  ${summary.status === 'SUCCEEDED' ? 'published' : 'FAILED'} ${summary.checkpointId ?? summary.error ?? ''} in ${summary.seconds} s: ${summary.blocksWritten} blocks written, ${summary.writerInvocations} writer invocations (${summary.writersKilled} killed), ${summary.throttled} throttled, ${summary.childExecutions} child executions; ${verified ? 'bit-exact' : 'NOT VERIFIED'}`,
        );
        log(`  ${costLine(summary, cloud.settings)}`);
        log(`  ${transitionsLine(summary.stepFunctions, cloud.settings)}`);
        if (!verified) break;
      }
    } finally {
      await cloud.stop();
    }
  } finally {
    await emulators.stop();
  }
  const ok = summaries.length === opts.incrementals + 1 && summaries.every((s) => s.verified);
  if (opts.json) {
    const workload = {
      ...opts.size,
      disks: workloadDisks(opts.size).map((d) => ({ disk: d.disk, sizeBytes: d.size })),
    };
    opts.log(
      JSON.stringify({ ok, prices: PRICES, settings: { ...settings, workload }, cycles: summaries }, null, 2),
    );
  } else log(ok ? 'every checkpoint verified bit-exact against its volumes' : 'local cloud run FAILED');
  return ok;
}

/** One line: the cycle's requests per chunk and what everything but the EBS direct APIs adds. */
function costLine(s: CycleSummary, settings: LocalCloudSettings): string {
  const p = s.perChunk;
  if (p === undefined) return `cost: no chunks replicated; ${requestTotal(s.usage)} requests`;
  const f = (x: number) => (x >= 10 ? x.toFixed(0) : x.toFixed(1));
  const ratio = s.overheadRatio === undefined ? 'n/a' : `${(s.overheadRatio * 100).toFixed(0)}%`;
  return `per chunk (${s.chunks} chunks): DynamoDB ${f(p.dynamodbWrites)} WRU / ${f(p.dynamodbReads)} RRU (${f(p.dynamodbWriteRequests)} writes, ${f(p.dynamodbReadRequests)} reads), SQS ${f(p.sqsRequests)}, Lambda ${f(p.lambdaInvocations)} invocations, ${f(p.stepFunctionsTransitions)} transitions${settings.waits === 'fast' ? ' (on compressed waits)' : ''}; overhead ${ratio} of the EBS direct API fees`;
}

/** What the run's timing makes of its counts: said before any cycle, so nobody misreads them. */
export function describeSettings(s: LocalCloudSettings): string[] {
  const loops = s.waitLoops.map((l) => `${l.wait} ${l.seconds ?? '?'} s`).join(', ');
  return s.waits === 'fast'
    ? [
        `waits fast: every Wait state and retry pause cut to ${s.waitMs} ms (synthesized: ${loops}), lease ${s.leaseSeconds} s`,
        '  Step Functions transitions are counted on compressed waits: a cycle goes round its tick loop far more often than on AWS, so that figure is not comparable to AWS (--waits real is)',
      ]
    : [
        `waits real: Wait states and retry pauses as synthesized (${loops}); lease ${s.leaseSeconds} s, stuck after ${s.stuckTicks} ticks, visibility ${s.visibilityTimeoutSeconds} s, long poll ${s.pollWaitSeconds} s, as deployed`,
      ];
}

/** Transitions per cycle: passes around each Wait loop, and the fixed path; flagged with fast waits. */
export function transitionsLine(t: TransitionBreakdown, s: LocalCloudSettings): string {
  const loops = t.waitLoops
    .filter((l) => l.passes > 0)
    .map((l) => `${l.passes} × "${l.wait}" (${l.statesPerPass} states) = ${l.transitions}`);
  const caveat = s.waits === 'fast' ? ` [waits cut to ${s.waitMs} ms: not comparable to AWS]` : '';
  return `Step Functions: ${t.transitions} transitions in ${t.executions} executions: ${[...loops, `${t.outsideWaitLoops} outside the Wait loops`].join(', ')}${caveat}`;
}

function requestTotal(u: Usage): number {
  return Object.values(u.requests).reduce((n, ops) => n + Object.values(ops).reduce((a, b) => a + b, 0), 0);
}

/** Milestones: executions, Task states of the top-level execution, failures; all states if verbose. */
function report(e: LocalCloudEvent, verbose: boolean, log: (line: string) => void): void {
  const indent = '  '.repeat(1 + (e.kind === 'execution' || e.kind === 'state' ? e.depth : 0));
  switch (e.kind) {
    case 'execution':
      if (e.type === 'ExecutionFailed')
        log(`${indent}execution ${e.execution} failed: ${e.error}: ${e.cause}`);
      else if (verbose || e.depth === 0) log(`${indent}execution ${e.execution}: ${e.type}`);
      return;
    case 'state':
      if (e.type === 'StateFailed') log(`${indent}${e.state}: ${e.error}`);
      else if (e.type === 'StateEntered' && (verbose || (e.depth === 0 && e.stateType === 'Task')))
        log(`${indent}${e.state}`);
      return;
    case 'writer':
      if (verbose || e.outcome !== 'ok')
        log(
          `${indent}chunk-writer #${e.n}: ${e.records} grants, ${e.outcome}${e.error ? ` (${e.error})` : ''}`,
        );
      return;
    case 'announcement':
      log(`${indent}EventBridge ${e.detailType}: ${String(e.detail.checkpointId ?? '')}`);
      return;
  }
}
