// `ferry local-cloud`: the serverless path, watched on one machine. The state machine `cdk synth`
// produces runs in aws-local-stepfunctions with the real Lambda handlers, on DynamoDB (dynalite),
// SQS (fauxqs) and EBS (Ferry's emulator); EC2 volumes are buffers in memory. A two-disk plan
// replicates a full cycle and incremental cycles, and every published checkpoint's snapshots are
// read back block by block and compared with the volumes as they were snapshotted. Each cycle's
// requests are counted and priced (local-cloud/usage.ts, cost.ts, prices.ts); the settings they were
// counted with (fast or real waits, the workload's size) are printed and recorded with them.
// `ferry local-cloud --recover MODE` runs the Recovery state machine instead (runLocalRecovery): EC2 and
// EventBridge Scheduler on moto_server, a drill to its report and a teardown counted by tag.
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
  /** Writer invocations at once; the local cloud's default for the wait mode when absent. */
  readonly writerConcurrency?: number | undefined;
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
      ...(opts.writerConcurrency === undefined ? {} : { writerConcurrency: opts.writerConcurrency }),
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
  const writers =
    s.writerConcurrency > 1
      ? `  ${s.writerConcurrency} writer invocations at once: they share this process's CPU, so each one's measured duration (Lambda GB-s) also holds the others' work; one at a time measures each alone (--writer-concurrency 1)`
      : "  writer invocations one at a time: each one's measured duration (Lambda GB-s) is its own work and the emulators' answers, as on Lambda, where each has its own CPU";
  return s.waits === 'fast'
    ? [
        `waits fast: every Wait state and retry pause cut to ${s.waitMs} ms (synthesized: ${loops}), lease ${s.leaseSeconds} s`,
        '  Step Functions transitions are counted on compressed waits: a cycle goes round its tick loop far more often than on AWS, so that figure is not comparable to AWS (--waits real is)',
        writers,
      ]
    : [
        `waits real: Wait states and retry pauses as synthesized (${loops}); lease ${s.leaseSeconds} s, stuck after ${s.stuckTicks} ticks, visibility ${s.visibilityTimeoutSeconds} s, long poll ${s.pollWaitSeconds} s, as deployed`,
        writers,
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

// ---- `ferry local-cloud --recover MODE`: the Recovery state machine, on emulators ------------------

export const LOCAL_RECOVERY_MODES = ['drill', 'failover', 'migration', 'failback'] as const;
export type LocalRecoveryMode = (typeof LOCAL_RECOVERY_MODES)[number];

export interface LocalRecoveryDemoOptions {
  readonly mode: LocalRecoveryMode;
  /** Print every state entered (Pass and Choice too), not only what an operator follows. */
  readonly verbose: boolean;
  /** 'fast' cuts every Wait state and retry pause (the drill's TTL too) to RECOVERY_FAST_WAIT_MS. */
  readonly waits: WaitMode;
  readonly json: boolean;
  readonly log: (line: string) => void;
}

// As the cycle's local cloud: a Wait loop still goes round, only faster; a drill takes seconds.
const RECOVERY_FAST_WAIT_MS = 200;

const HOW_THE_CHECKPOINT_WAS_MADE =
  "the checkpoint was published to the catalog by this command, not by a replication cycle: its target snapshots are moto snapshots of the plan's volumes (CreateSnapshot), since the local cloud's cycle writes its snapshots into Ferry's EBS emulator, which moto's EC2 cannot see";

interface LocalExecution {
  readonly name: string;
  readonly status: 'SUCCEEDED' | 'FAILED';
  readonly error?: string;
  readonly cause?: string;
  /** The recovery Lambda's actions, in order, retries included. */
  readonly actions: readonly string[];
  readonly report?: unknown;
  /** What still exists with the job's tag after this execution. */
  readonly leftByTag: import('../local-cloud/recovery.ts').LeftByTag;
}

/**
 * Runs one recovery of a prepared local account and prints it: the synthesized Recovery definition,
 * the real recovery handler, EC2 and Scheduler on moto_server, the catalog on dynalite. A failover or
 * migration is then cleaned up on command, as an operator would end it. True when the recovery
 * succeeded and nothing the job created is left (a drill by its own teardown).
 */
export async function runLocalRecovery(opts: LocalRecoveryDemoOptions): Promise<boolean> {
  const { checkLocalCloudPrerequisites } = await import('../local-cloud/start-emulators.ts');
  await checkLocalCloudPrerequisites();
  const [{ startDynalite }, { startMoto }, local, { EC2Client }, { SchedulerClient }, cloudCli] =
    await Promise.all([
      import('../local-cloud/emulators/dynalite.ts'),
      import('../local-cloud/emulators/moto.ts'),
      import('../local-cloud/recovery.ts'),
      import('@aws-sdk/client-ec2'),
      import('@aws-sdk/client-scheduler'),
      import('./recover-cloud.ts'),
    ]);
  const log = opts.json ? () => {} : opts.log;
  const waitMs = opts.waits === 'fast' ? RECOVERY_FAST_WAIT_MS : undefined;

  log('starting emulators: DynamoDB (dynalite), EC2 and EventBridge Scheduler (moto_server)');
  const started = await Promise.allSettled([
    startMoto({ why: 'ferry local-cloud --recover runs EC2 and EventBridge Scheduler on it' }),
    startDynalite(),
  ]);
  const [motoStart, ddbStart] = started;
  if (motoStart.status === 'rejected' || ddbStart.status === 'rejected') {
    await Promise.all(started.map((s) => (s.status === 'fulfilled' ? s.value.stop() : undefined)));
    throw motoStart.status === 'rejected' ? motoStart.reason : (ddbStart as PromiseRejectedResult).reason;
  }
  const moto = motoStart.value;
  const ddb = ddbStart.value;
  const ec2 = new EC2Client(moto.clientConfig);
  const scheduler = new SchedulerClient(moto.clientConfig);
  // moto_server is a child process: an interrupted run stops it rather than leave it behind.
  const interrupted = (signal: NodeJS.Signals) => {
    void moto.stop().finally(() => process.exit(signal === 'SIGINT' ? 130 : 143));
  };
  process.once('SIGINT', interrupted);
  process.once('SIGTERM', interrupted);
  let restoreEnv = () => {};
  try {
    log(
      'synthesizing the stack (as cdk synth); preparing the account: VPC, subnets, volumes, state table, schedule',
    );
    const account = await local.prepareRecoveryAccount({ ec2, scheduler, dynamo: ddb.client });
    const checkpoint = await account.publishCheckpoint();
    log(
      `plan ${account.plan}: volumes ${account.volumes.map((v) => `${v.disk} ${v.volumeId}`).join(', ')}; production subnet ${account.subnets.production}, drill subnet ${account.subnets.drill}; schedule ${account.plan} enabled`,
    );
    log(`checkpoint ${checkpoint.id}: ${checkpoint.disks.map((d) => `${d.disk} ${d.target}`).join(', ')}`);
    log(`  ${HOW_THE_CHECKPOINT_WAS_MADE}`);
    log(
      waitMs === undefined
        ? 'waits real: Wait states and retry pauses as synthesized (the drill waits its TTL of 5 minutes)'
        : `waits fast: every Wait state and retry pause cut to ${waitMs} ms (the drill's TTL of 5 minutes too); moto's instances pass their status checks at once`,
    );

    restoreEnv = local.setRecoveryEnvironment(account.environment, {
      dynamodb: ddb.endpoint,
      ec2: moto.endpoint,
      scheduler: moto.endpoint,
    });
    // Imported after the environment is set: the handler builds its clients from it on first use.
    const { handler } = await import('../functions/recovery/handler.ts');
    const cycles: string[] = [];
    const recovery = new local.LocalRecovery({
      definition: account.definition,
      stateMachineName: account.stateMachineName,
      bindings: {
        recovery: local.asLambdaTask((event) => handler(event)),
        // A migration's final cycle, or a failback's reverse cycle, stood in for as the checkpoint
        // above was made.
        runCycle: async (input) => {
          const set = String(input.set);
          const disks = (input.disks ?? []) as { disk: string; volumeId: string }[];
          const cp =
            set === account.plan
              ? await account.publishCheckpoint()
              : await account.publishSnapshots(set, disks);
          cycles.push(cp.id);
          if (set === account.plan) {
            log(`  final cycle (stand-in): ${cp.id} published from moto snapshots of the volumes`);
          } else {
            const base = (input.base as { checkpointId?: string } | undefined)?.checkpointId;
            log(
              `  reverse cycle (stand-in): ${cp.id} published from moto snapshots of the recovered volumes ${disks.map((d) => `${d.disk} ${d.volumeId}`).join(', ')}` +
                (base === undefined
                  ? ''
                  : `; its base is ${base} (a real cycle moves only the blocks written since: test/functions/failback-base.test.ts)`),
            );
          }
          return { status: 'published', checkpointId: cp.id, sequence: cp.sequence, disks: [] };
        },
      },
      ...(waitMs === undefined ? { waits: 'real' as const } : { waitMs }),
    });

    const execute = async (input: Record<string, unknown>, name: string): Promise<LocalExecution> => {
      const progress = new cloudCli.ProgressLines((line) => log(line));
      let id = 0;
      const outcome = await recovery.run(input, name, (step) => {
        if (opts.verbose) {
          log(`  ${step.type} ${step.state} (${step.stateType})${step.error ? `: ${step.error}` : ''}`);
          return;
        }
        // The history events Step Functions would show, through the lines `ferry recover --cloud` prints.
        const timestamp = new Date();
        if (step.type === 'StateEntered')
          progress.add({
            id: ++id,
            timestamp,
            type: `${step.stateType}StateEntered` as never,
            stateEnteredEventDetails: { name: step.state },
          });
        else if (step.type === 'StateFailed' && step.stateType === 'Task')
          progress.add({
            id: ++id,
            timestamp,
            type: 'TaskFailed',
            taskFailedEventDetails: {
              resourceType: 'lambda',
              resource: 'invoke',
              error: step.error,
              cause: step.cause,
            },
          });
        else if (step.type === 'StateRetried') log(`  ${step.state}: retried`);
      });
      if (outcome.status === 'FAILED')
        log(`  recovery failed: ${outcome.error}: ${cloudCli.shortCause(outcome.cause)}`);
      const jobId = String(input.jobId);
      return {
        name,
        status: outcome.status,
        ...(outcome.error === undefined ? {} : { error: outcome.error }),
        ...(outcome.cause === undefined ? {} : { cause: outcome.cause }),
        actions: outcome.actions,
        ...(outcome.output === undefined ? {} : { report: outcome.output }),
        leftByTag: await account.leftByTag(jobId),
      };
    };
    const leftLine = (jobId: string, left: LocalExecution['leftByTag']) =>
      `left with tag ferry:recovery-job=${jobId}: ${left.instances} instances (not terminated), ${left.volumes} volumes, ${left.images} images, ${left.snapshots} snapshots`;
    const isZero = (left: LocalExecution['leftByTag']) => Object.values(left).every((n) => n === 0);
    // A recovery's report says 'succeeded'; a cleanup's, 'cleaned-up'.
    const succeeded = (e: LocalExecution, outcome = 'succeeded') =>
      e.status === 'SUCCEEDED' && (e.report as { outcome?: string } | undefined)?.outcome === outcome;

    /** Ends a job's machines on command, as an operator would: the same teardown, verified by tag. */
    const cleanupOf = async (jobId: string): Promise<LocalExecution> => {
      const end = cloudCli.recoveryRequest({ mode: 'cleanup', plan: account.plan, job: jobId });
      log(`cleanup of job ${jobId} (as ferry recover --cloud --mode cleanup --job ${jobId})`);
      const done = await execute(end.request, end.executionName);
      if (done.report !== undefined) for (const line of cloudCli.describeReport(done.report)) log(line);
      log(leftLine(jobId, done.leftByTag));
      return done;
    };
    /** Runs one job of the given mode and prints its report and what is left with its tag. */
    const jobOf = async (mode: string, extra: Record<string, unknown> = {}) => {
      const { request, executionName } = cloudCli.recoveryRequest({ mode, plan: account.plan });
      const input = { ...request, ...extra };
      log(`${mode}${extra.cutover ? ' --cutover' : ''} of plan ${account.plan}: job ${executionName}`);
      const job = await execute(input, executionName);
      if (job.report !== undefined) for (const line of cloudCli.describeReport(job.report)) log(line);
      log(leftLine(executionName, job.leftByTag));
      return { job, executionName };
    };

    let ok: boolean;
    let job: LocalExecution;
    let schedule: string | undefined;
    const cleanups: LocalExecution[] = [];
    const failback: LocalExecution[] = [];
    if (opts.mode === 'drill') {
      ({ job } = await jobOf('drill'));
      const clean = (job.report as { cleanup?: { clean?: boolean } } | undefined)?.cleanup?.clean === true;
      ok = succeeded(job) && clean && isZero(job.leftByTag);
    } else {
      // What the operator states when the source was stopped first: the window is then zero.
      const first = await jobOf(
        opts.mode === 'failback' ? 'failover' : opts.mode,
        opts.mode === 'migration' ? { sourceQuiesced: true } : {},
      );
      job = first.job;
      schedule = await account.scheduleState();
      log(`schedule ${account.plan}: ${schedule}`);
      ok = succeeded(job) && schedule === 'DISABLED' && job.leftByTag.instances > 0;
      const ended = [first.executionName];
      if (opts.mode === 'failback') {
        // Replicate the recovered machines' volumes back while they run, then cut over to the plan's
        // own machines from the reverse checkpoint (the recovered machines stopped first).
        const back = await jobOf('failback');
        const cutover = await jobOf('failback', { cutover: true, sourceQuiesced: true });
        failback.push(back.job, cutover.job);
        const part = (e: LocalExecution) =>
          (e.report as { failback?: { fromBase?: boolean; reverseCheckpointId?: string } } | undefined)
            ?.failback;
        ok &&=
          succeeded(back.job) &&
          part(back.job)?.fromBase === true &&
          part(back.job)?.reverseCheckpointId !== undefined &&
          succeeded(cutover.job) &&
          cutover.job.leftByTag.instances > 0;
        ended.push(cutover.executionName);
      }
      for (const jobId of ended) {
        const done = await cleanupOf(jobId);
        cleanups.push(done);
        ok &&= succeeded(done, 'cleaned-up') && isZero(done.leftByTag);
      }
    }
    log(ok ? `local ${opts.mode} succeeded; nothing the job created is left` : `local ${opts.mode} FAILED`);
    if (opts.json) {
      opts.log(
        JSON.stringify(
          {
            ok,
            mode: opts.mode,
            settings: { waits: opts.waits, ...(waitMs === undefined ? {} : { waitMs }) },
            account: {
              stack: account.stack,
              plan: account.plan,
              volumes: account.volumes,
              subnets: account.subnets,
            },
            preparedCheckpoint: { id: checkpoint.id, sequence: checkpoint.sequence, disks: checkpoint.disks },
            checkpointSource: HOW_THE_CHECKPOINT_WAS_MADE,
            job,
            ...(cycles.length === 0 ? {} : { finalCycles: cycles }),
            ...(schedule === undefined ? {} : { schedule }),
            ...(failback.length === 0 ? {} : { failback }),
            ...(cleanups.length === 0 ? {} : { cleanup: cleanups[0], cleanups }),
          },
          null,
          2,
        ),
      );
    }
    return ok;
  } finally {
    restoreEnv();
    process.off('SIGINT', interrupted);
    process.off('SIGTERM', interrupted);
    ec2.destroy();
    scheduler.destroy();
    await Promise.all([moto.stop(), ddb.stop()]);
  }
}
