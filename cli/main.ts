// The `ferry` command line: replicate, checkpoints, recover, verify, demo, local-cloud, serve.
import { readFile } from 'node:fs/promises';
import { Command, Option } from 'commander';
import { uncheckableAggregate } from '../shared/engine/aggregate.ts';
import { unknownSettings } from '../shared/engine/config.ts';
import { ChangeMapError, ConfigError, errorMessage } from '../shared/engine/errors.ts';
import { checkName } from '../shared/engine/names.ts';
import type { AggregateAlgorithm } from '../shared/engine/ports.ts';
import type { ReplicationEvent, ReplicationResult } from '../shared/engine/replicate.ts';
import { parseRetainCount } from '../shared/engine/retention.ts';
import { formatBytes, parseSize } from '../shared/engine/units.ts';
import { verifyFileImage } from '../shared/local/file-target.ts';
import { ImageDirectory } from '../shared/local/image-dir.ts';
import type { MaterialiseProgress } from '../shared/local/materialise.ts';
import { type DamagedEntry, type FailoverMark, LocalStateStore } from '../shared/local/state-dir.ts';
import { DEFAULT_LIMITS, type NodeLimits } from '../shared/net/limits.ts';
import type { NodeTls } from '../shared/net/peer.ts';
import { runDemo } from './demo.ts';
import { createRecoveryReporter, createReporter, describeRecovery } from './progress.ts';
import { type RecoverResult, type RecoveryPlan, recoverability, recoverSet } from './recover.ts';
import {
  type HistoryEvent,
  type JobSpec,
  parseJobSpec,
  recoverLocked,
  runLocalJob,
  withSetLocked,
} from './run.ts';
import { filePath } from './targets.ts';

const DEFAULT_STATE_DIR = '.ferry';

const collect = (value: string, previous: string[]): string[] => [...previous, value];
const out = (line: string) => process.stdout.write(`${line}\n`);
const err = (line: string) => process.stderr.write(`${line}\n`);

const program = new Command()
  .name('ferry')
  .description('Block-level incremental replication for disaster recovery and migration')
  .showHelpAfterError()
  // Options after a subcommand are the subcommand's: `ferry serve issue-credential --state DIR` is
  // issue-credential's --state, not serve's.
  .enablePositionalOptions()
  .configureOutput({ writeErr: (s) => process.stderr.write(s) });

program
  .command('replicate')
  .description('replicate one or more disks (one cycle) and publish a recovery checkpoint')
  .option(
    '--source <uri>',
    'source disk: file:PATH, nbd://HOST:PORT/EXPORT, nbd+unix:///EXPORT?socket=PATH (repeatable)',
    collect,
    [],
  )
  .option(
    '--target <uri>',
    'target: file:PATH image or ferry://HOST:PORT/DISK node (repeatable, one per --source)',
    collect,
    [],
  )
  .option(
    '--changed <file>',
    'changed extents (JSON [{offset,length}]) per --source; omit for a full copy',
    collect,
    [],
  )
  .option('--disk <id>', 'disk id per --source (default disk0, disk1, ...)', collect, [])
  .option(
    '--job <file>',
    'a job file: {"set", "disks": [{"id","source","target","changed","join"}], "params"}',
  )
  .option(
    '--join <file>',
    "the node's join file, for ferry:// targets (default $FERRY_JOIN; a job file may name one per disk)",
  )
  .option(
    '--insecure',
    'ferry:// over plain TCP, no authentication: only to a node on this host started with --insecure',
  )
  .option('--set <name>', 'replication set the checkpoint belongs to', 'default')
  .option('--state <dir>', 'state directory (progress, checkpoint catalog)', DEFAULT_STATE_DIR)
  .option('--chunk-size <size>', 'largest chunk, e.g. "1 MiB"')
  .option('--window <size>', 'starting per-disk window, e.g. "32MB"')
  .option('--node-budget <size>', 'in-flight bytes across all disks, e.g. "256MiB"')
  .option('--checkpoint-interval <size>', 'make progress durable at least this often, e.g. "500MB"')
  .option('--no-adaptive', 'keep the window fixed instead of adapting it')
  .option(
    '--retain <n>',
    `how many checkpoints stay recoverable from file targets' history (default 24; a job file may say "retain": {"count", "maxAgeDays"})`,
  )
  .option('--json', 'print the result as JSON (no progress display)')
  .action(async (o) => {
    const spec = withJoinFile(o.job ? await jobFromFile(o.job, o) : jobFromFlags(o), o);
    // An older damaged entry does not stop a cycle, but the operator hears of it on every run.
    const catalog = await new LocalStateStore(o.state).readCatalog(spec.set).catch(() => undefined);
    for (const d of catalog?.damaged ?? []) err(damagedEntryWarning(d));
    const result = await runWithProgress(spec, o.state, Boolean(o.json), Boolean(o.insecure));
    if (o.json) out(JSON.stringify(result, null, 2));
    else printSummary(result);
  });

program
  .command('cycle')
  .description(
    "start a deployed stack's replication cycle: ferry cycle start --cloud --stack NAME --plan PLAN (ferry cycle start --cloud --help)",
  )
  .argument('[action]')
  .allowUnknownOption()
  .allowExcessArguments()
  .action(() => {
    // With --cloud the command line never reaches here (cli/recover-cloud.ts runs it).
    throw new ConfigError(
      'ferry cycle start runs a cycle on a deployed stack: add --cloud --stack NAME --plan PLAN (here, ferry replicate runs one)',
      { setting: 'cloud' },
    );
  });

program
  .command('checkpoints')
  .description('list published recovery checkpoints')
  .option('--set <name>', 'only this replication set')
  .option('--state <dir>', 'state directory', DEFAULT_STATE_DIR)
  .option('--json', 'print as JSON')
  .option('--cloud', "a deployed stack's catalog instead (ferry checkpoints --cloud --help)")
  .option(
    '--join <file>',
    "the node's join file, to ask ferry:// replicas' nodes what they can recover (default $FERRY_JOIN)",
  )
  .option('--insecure', 'ferry:// over plain TCP: only to a node on this host started with --insecure')
  .action(async (o) => {
    const set = o.set === undefined ? undefined : checkName('set', o.set, '--set');
    if (o.join !== undefined && o.insecure) {
      throw new ConfigError('checkpoints: give --join FILE or --insecure, not both', { setting: 'join' });
    }
    const catalog = await new LocalStateStore(o.state).readCatalog(set);
    const { checkpoints: list, damaged } = catalog;
    // A damaged entry is reported, never fatal: the intact ones are still the operator's to use.
    for (const d of damaged) err(damagedEntryWarning(d));
    // Whether `ferry recover` could still write each one (its history is there and matches; for a
    // replica on a node, as its node says).
    const recovery = await recoverability(catalog, remoteAccess(o));
    // Failovers, migrations and failbacks: each shown with the checkpoint it is about.
    const store = new LocalStateStore(o.state);
    const events = await store.readEvents(set);
    if (o.json) {
      out(
        JSON.stringify(
          list.map((cp) => ({
            ...cp,
            recovery: recovery.get(cp.id),
            events: events.filter((e) => e.set === cp.set && e.checkpoint === cp.id),
          })),
          null,
          2,
        ),
      );
      return;
    }
    if (list.length === 0) {
      out(`no checkpoints in ${o.state}`);
      return;
    }
    const failedOver = [];
    for (const s of new Set(list.map((cp) => cp.set))) {
      const mark = await store.readFailover(s);
      if (mark) failedOver.push(mark);
    }
    for (const cp of list) {
      const bytes = cp.disks.reduce((s, d) => s + d.bytes, 0);
      const r = recovery.get(cp.id);
      // Marked only when it cannot be recovered, so the listing of recoverable ones stays as it was.
      const marker = r === undefined || r.recoverable ? '' : `  [not recoverable: ${r.reason}]`;
      out(`${cp.id}  ${cp.createdAt}  ${cp.disks.length} disk(s)  ${formatBytes(bytes)} replicated${marker}`);
      for (const d of cp.disks)
        out(`    ${d.disk}: ${d.kind} ${formatBytes(d.bytes)} ${d.source} -> ${d.target}`);
      for (const e of events.filter((x) => x.set === cp.set && x.checkpoint === cp.id))
        out(`    event ${e.type} ${e.at}: ${e.summary}`);
    }
    for (const m of failedOver) {
      out(
        `set ${m.set} is FAILED OVER (${m.mode} to ${m.checkpoint} at ${m.at}, disks in ${m.to}): replication into it is paused until ferry failback --set ${m.set}`,
      );
    }
  });

program
  .command('recover')
  .description(
    'write every disk of a set as of a checkpoint into a directory (one DISK.img each), verified against that checkpoint',
  )
  .option(
    '--cloud',
    'recover on a deployed stack: drill, failover, migration, cleanup (ferry recover --cloud --help)',
  )
  .option('--set <name>', 'replication set', 'default')
  .option('--state <dir>', 'state directory', DEFAULT_STATE_DIR)
  .option('--checkpoint <n>', 'latest (default), a checkpoint number, or its id (SET#N)')
  .option(
    '--at <time>',
    'the newest checkpoint created at or before this time (ISO 8601 with its zone, e.g. 2026-12-05T10:00:00Z)',
  )
  .option(
    '--to <dir>',
    'directory to write into (created if missing); an existing file there is never replaced',
  )
  .option('--json', 'print the result as JSON (no progress display)')
  .option(
    '--test',
    'a drill: serve the recovered disks as NBD exports on 127.0.0.1 through a copy-on-write overlay (nbdkit), so nothing a test machine writes is kept, until --ttl or Ctrl-C; then remove them',
  )
  .option(
    '--ttl <duration>',
    'with --test: how long the drill lasts, e.g. 30m or 2h (default 1h, at most 7d)',
  )
  .option(
    '--check <command>',
    "with --test: a health check run by /bin/sh once the exports are up, each disk's URI in FERRY_DRILL_URI_<DISK> (e.g. boot them in a VM and wait for a login prompt, or fsck a filesystem); exit 0 is healthy; the drill then ends (at the latest at --ttl) and exits 1 if it was not",
  )
  .option(
    '--failover',
    'fail the set over: recover the checkpoint (latest by default) into --to, record the failover in the catalog and pause replication into the set until ferry failback (or --clear-failover)',
  )
  .option(
    '--clear-failover',
    "clear the set's failover mark without failing back (its original disks are live again): replication into it resumes",
  )
  .option(
    '--cleanup',
    'end the drills recorded in --state (of --set, if given): stop their NBD servers, remove their files, check nothing is left, and report',
  )
  .option(
    '--join <file>',
    "the node's join file, to recover ferry:// replicas from their node (default $FERRY_JOIN)",
  )
  .option('--insecure', 'ferry:// over plain TCP: only to a node on this host started with --insecure')
  .action(async (o, command: Command) => {
    if (o.join !== undefined && o.insecure) {
      throw new ConfigError('recover: give --join FILE or --insecure, not both', { setting: 'join' });
    }
    const modes = ['test', 'failover', 'clearFailover', 'cleanup'].filter((k) => o[k]);
    if (modes.length > 1) {
      throw new ConfigError('recover: give one of --test, --failover, --clear-failover and --cleanup', {
        setting: 'recover',
      });
    }
    if (o.clearFailover || o.cleanup) {
      for (const flag of ['to', 'checkpoint', 'at', 'ttl'] as const) {
        if (o[flag] !== undefined) {
          throw new ConfigError(`--${flag} is not for ${o.cleanup ? '--cleanup' : '--clear-failover'}`, {
            setting: flag,
          });
        }
      }
    }
    if (o.cleanup) {
      // --set defaults to "default": only an explicit one narrows the clean-up.
      const only =
        command.getOptionValueSource('set') === 'cli' ? checkName('set', o.set, '--set') : undefined;
      const { cleanupDrills, describeDrillReport } = await import('./drill.ts');
      const reports = await cleanupDrills(o.state, only);
      if (o.json) out(JSON.stringify(reports, null, 2));
      else if (reports.length === 0)
        out(`no drill is recorded in ${o.state}${only ? ` for set ${only}` : ''}`);
      else for (const r of reports) for (const line of describeDrillReport(r, o.state)) out(line);
      if (reports.some((r) => !r.clean)) process.exitCode = 1;
      return;
    }
    const set = checkName('set', o.set, '--set');
    if (o.clearFailover) {
      const { clearFailover } = await import('./recovery-modes.ts');
      const { mark } = await clearFailover(set, o.state);
      out(
        `set ${set}: failover mark cleared (it was failed over to ${mark.checkpoint} into ${mark.to} at ${mark.at}); replication into it resumes`,
      );
      return;
    }
    if (o.to === undefined) throw new ConfigError('recover: give --to DIR', { setting: 'to' });
    if (o.ttl !== undefined && !o.test)
      throw new ConfigError('--ttl is for drills (--test)', { setting: 'ttl' });
    if (o.check !== undefined && !o.test)
      throw new ConfigError('--check is for drills (--test)', { setting: 'check' });
    if (o.check !== undefined && String(o.check).trim() === '')
      throw new ConfigError("--check: give the command to run against the drill's exports", {
        setting: 'check',
      });
    if (o.test && o.json) throw new ConfigError('--json is not for drills (--test)', { setting: 'json' });
    const { parseTtl } = await import('./drill.ts');
    const ttlMs = o.test ? parseTtl(o.ttl ?? '1h') : 0;
    const started = Date.now();
    const reporter = createRecoveryReporter(o.json ? 'silent' : process.stderr.isTTY ? 'tty' : 'plain', err);
    const interrupt = interruptible();
    let recovered: RecoverResult;
    let failedOver: FailoverMark | undefined;
    try {
      const request = {
        set,
        stateDir: o.state,
        choice: { checkpoint: o.checkpoint, at: o.at },
        to: o.to,
        signal: interrupt.signal,
        onEvent: (e: ReplicationEvent) => {
          if (e.type === 'recovered') reporter.log(`ferry: ${describeRecovery(e)}`);
        },
        onPlanned: (plans: readonly RecoveryPlan[]) => reporter.planned(plans),
        onProgress: (p: MaterialiseProgress) => reporter.progress(p),
        access: remoteAccess(o),
      };
      if (o.failover) {
        const { failoverSet } = await import('./recovery-modes.ts');
        const result = await failoverSet(request);
        recovered = result.recovered;
        failedOver = result.mark;
      } else recovered = await recoverSet(request);
      reporter.stop();
      const { checkpoint, disks } = recovered;
      if (o.json) {
        out(
          JSON.stringify(
            { checkpoint: checkpoint.id, disks, ...(failedOver ? { failover: failedOver } : {}) },
            null,
            2,
          ),
        );
      } else {
        for (const d of disks) {
          out(
            `disk ${d.disk}: ${d.path} (${formatBytes(d.sizeBytes)}) verified against checkpoint ${checkpoint.id} (${d.regions} regions)`,
          );
        }
        if (failedOver) {
          out(
            `set ${set} failed over to ${checkpoint.id} (${checkpoint.createdAt}): its disks run from ${failedOver.to} now; ` +
              `ferry replicate refuses the set until "ferry failback --set ${set}" (or "ferry recover --clear-failover --set ${set}")`,
          );
        }
      }
    } finally {
      reporter.stop();
      interrupt.release();
    }
    if (o.test) await runDrill(recovered, o.to, ttlMs, started, { set, stateDir: o.state }, o.check);
  });

program
  .command('migrate')
  .description(
    'a planned cutover: one last cycle of the job (incremental), then a failover to exactly the checkpoint it published, with the data-loss window checked by re-reading the sources',
  )
  .option('--source <uri>', 'source disk, as for replicate (repeatable)', collect, [])
  .option('--target <uri>', 'target, as for replicate (repeatable, one per --source)', collect, [])
  .option(
    '--changed <file>',
    "changed extents per --source; omit to derive them by hashing each source against the latest checkpoint's manifest",
    collect,
    [],
  )
  .option('--disk <id>', 'disk id per --source (default disk0, disk1, ...)', collect, [])
  .option('--job <file>', 'a job file, as for replicate')
  .option('--join <file>', "the node's join file, for ferry:// targets (default $FERRY_JOIN)")
  .option('--insecure', 'ferry:// over plain TCP: only to a node on this host started with --insecure')
  .option('--set <name>', 'replication set', 'default')
  .option('--state <dir>', 'state directory', DEFAULT_STATE_DIR)
  .option('--chunk-size <size>', 'largest chunk, e.g. "1 MiB"')
  .option('--window <size>', 'starting per-disk window, e.g. "32MB"')
  .option('--node-budget <size>', 'in-flight bytes across all disks, e.g. "256MiB"')
  .option('--checkpoint-interval <size>', 'make progress durable at least this often, e.g. "500MB"')
  .option('--no-adaptive', 'keep the window fixed instead of adapting it')
  .option('--retain <n>', 'as for replicate')
  .requiredOption(
    '--to <dir>',
    'directory the migrated disks are written into (DISK.img each; created if missing, existing files never replaced)',
  )
  .option('--json', 'print the result as JSON (no progress display)')
  .action(async (o) => {
    const spec = withJoinFile(o.job ? await jobFromFile(o.job, o) : jobFromFlags(o), o);
    const { migrateSet, hashProgressPrinter } = await import('./recovery-modes.ts');
    const json = Boolean(o.json);
    const reporter = createReporter(json ? 'silent' : process.stderr.isTTY ? 'tty' : 'plain', err);
    const interrupt = interruptible();
    let result: Awaited<ReturnType<typeof migrateSet>>;
    try {
      result = await migrateSet(spec, {
        stateDir: o.state,
        to: o.to,
        insecure: Boolean(o.insecure),
        signal: interrupt.signal,
        onEvent: (e) => reporter.onEvent(e),
        onHistory: (e) => {
          if (e.type === 'prune-failed' || !json) err(describeHistory(e));
        },
        ...(json ? {} : { onHash: hashProgressPrinter(err) }),
        onChangeMaps: (maps) => {
          if (json) return;
          for (const m of maps) err(`disk ${m.disk}: change map ${m.how}: ${m.why}`);
        },
      });
    } finally {
      reporter.stop();
      interrupt.release();
    }
    const { cycle, failover, dataLoss } = result;
    if (json) {
      out(
        JSON.stringify(
          {
            checkpoint: cycle.checkpoint.id,
            cycle: cycle.disks,
            changeMaps: result.changeMaps,
            failover: failover.mark,
            dataLoss,
          },
          null,
          2,
        ),
      );
      return;
    }
    printSummary(cycle);
    for (const d of failover.recovered.disks)
      out(`disk ${d.disk}: ${d.path} (${formatBytes(d.sizeBytes)}) verified`);
    out(
      `set ${spec.set} migrated to ${cycle.checkpoint.id}: its disks run from ${failover.mark.to} now; ferry replicate refuses the set until "ferry failback --set ${spec.set}"`,
    );
    if (dataLoss.zero) {
      out(`data-loss window: zero (checked: ${dataLoss.checked}, at ${dataLoss.checkedAt}: all equal)`);
    } else {
      out(
        `data-loss window: NOT zero: writes made between ${dataLoss.from} and ${dataLoss.checkedAt} are not in ${cycle.checkpoint.id} (checked: ${dataLoss.checked})`,
      );
      for (const d of dataLoss.disks.filter((x) => x.changedRegions > 0)) {
        out(
          `  disk ${d.disk}: ${d.changedRegions} of ${d.regions} regions (${formatBytes(d.changedBytes)}) differ, the first at offset ${d.firstChangedOffset}; quiesce ${d.source} before migrating`,
        );
      }
    }
  });

program
  .command('failback')
  .description(
    'fail a failed-over set back: move to the original disks only the regions where they and the recovered images differ (hashed against the checkpoint both share), publish that as a checkpoint of the reverse set, verify bit-exact, re-protect the set and resume its replication',
  )
  .option('--set <name>', 'the failed-over replication set', 'default')
  .option('--state <dir>', 'state directory', DEFAULT_STATE_DIR)
  .option(
    '--from <dir>',
    'where the recovered images are (DISK.img each); default: where the failover wrote them',
  )
  .option('--reverse-set <name>', 'the set the failback publishes its checkpoint in (default SET-failback)')
  .option(
    '--join <file>',
    "the node's join file, for a set replicated to ferry:// (its shared checkpoint's manifests, the re-protecting cycle; default $FERRY_JOIN)",
  )
  .option('--insecure', 'ferry:// over plain TCP: only to a node on this host started with --insecure')
  .option(
    '--no-resync',
    'do not re-protect the set (one cycle from the original disks to its replicas) before resuming it',
  )
  .option('--json', 'print the result as JSON (no progress display)')
  .action(async (o) => {
    const set = checkName('set', o.set, '--set');
    const access = remoteAccess(o);
    const { failbackSet, hashProgressPrinter, describeDisk, CHANGED_ON } = await import(
      './recovery-modes.ts'
    );
    const json = Boolean(o.json);
    const reporter = createReporter(json ? 'silent' : process.stderr.isTTY ? 'tty' : 'plain', err);
    const interrupt = interruptible();
    let result: Awaited<ReturnType<typeof failbackSet>>;
    try {
      result = await failbackSet({
        set,
        stateDir: o.state,
        ...(o.from !== undefined ? { from: o.from } : {}),
        ...(o.reverseSet !== undefined ? { reverseSet: o.reverseSet } : {}),
        ...(access === undefined ? {} : { access }),
        resync: o.resync !== false,
        signal: interrupt.signal,
        onEvent: (e) => reporter.onEvent(e),
        ...(json ? {} : { onHash: hashProgressPrinter(err) }),
        onPlanned: (disks) => {
          if (json) return;
          for (const d of disks) {
            if (d.plan === undefined) {
              err(`disk ${d.disk}: full copy from ${d.recovered} to ${d.original}: ${d.why}`);
              continue;
            }
            const moved = d.plan.moves.reduce((s, m) => s + m.length, 0);
            const why = (['recovered', 'original', 'both'] as const)
              .filter((k) => d.plan!.counts[k].regions > 0)
              .map(
                (k) =>
                  `${d.plan!.counts[k].regions} ${CHANGED_ON[k]} (${formatBytes(d.plan!.counts[k].bytes)})`,
              );
            err(
              `disk ${d.disk}: ${d.plan.moves.length} of ${d.plan.regions} chunks to move (${formatBytes(moved)})${why.length ? `: ${why.join(', ')}` : ''}` +
                `${d.plan.alreadyEqual > 0 ? `; ${d.plan.alreadyEqual} changed on both sides to the same bytes (not moved)` : ''}`,
            );
          }
        },
      });
    } finally {
      reporter.stop();
      interrupt.release();
    }
    if (json) {
      out(
        JSON.stringify(
          {
            set,
            shared: result.shared,
            reverse: result.reverse.checkpoint.id,
            disks: result.disks.map(describeDisk),
            verifiedRegions: result.verifiedRegions,
            resync: result.resync?.checkpoint.id ?? null,
            ...(result.resyncSkipped ? { resyncSkipped: result.resyncSkipped } : {}),
          },
          null,
          2,
        ),
      );
      return;
    }
    for (const d of result.disks) {
      if (d.plan === undefined) {
        out(`disk ${d.disk}: copied in full (${formatBytes(d.sizeBytes)}): ${d.why}`);
        continue;
      }
      const c = d.plan.counts;
      const moved = d.plan.moves.reduce((s, m) => s + m.length, 0);
      out(
        `disk ${d.disk}: ${d.plan.moves.length} of ${d.plan.regions} chunks moved (${formatBytes(moved)}) to ${d.original}: ` +
          `${c.recovered.regions} ${CHANGED_ON.recovered}, ${c.original.regions} ${CHANGED_ON.original}, ${c.both.regions} ${CHANGED_ON.both}` +
          `${d.plan.alreadyEqual > 0 ? `; ${d.plan.alreadyEqual} equal on both sides (not moved)` : ''}`,
      );
    }
    out(
      `set ${set} failed back (shared checkpoint ${result.shared}): published as ${result.reverse.checkpoint.id}; ` +
        `original disks equal the recovered images (${result.verifiedRegions} regions compared)`,
    );
    out(
      result.resync
        ? `set ${set} re-protected as ${result.resync.checkpoint.id} (${formatBytes(result.resync.disks.reduce((s, d) => s + d.bytesTotal, 0))} moved to its replicas); replication resumed`
        : `set ${set}: replication resumed, not re-protected (${result.resyncSkipped}): its next cycle must copy what changed while it was failed over`,
    );
  });

program
  .command('verify')
  .description("re-hash each target image of the latest checkpoint against the checkpoint's manifest")
  .option('--set <name>', 'replication set', 'default')
  .option('--state <dir>', 'state directory', DEFAULT_STATE_DIR)
  .option('--json', 'print as JSON')
  .option(
    '--join <file>',
    "the node's join file, to verify ferry:// replicas on their node (default $FERRY_JOIN)",
  )
  .option('--insecure', 'ferry:// over plain TCP: only to a node on this host started with --insecure')
  .action(async (o) => {
    const set = checkName('set', o.set, '--set');
    const access = remoteAccess(o);
    // Held throughout: no run of the set may commit while its images are being checked.
    const { cp, reports } = await withSetLocked(set, o.state, async (store) => {
      // The images are the latest checkpoint's only once a commit a crash interrupted is undone.
      // With access to a ferry:// target's node, the node is told which checkpoint a finished commit
      // became, so it keeps that cycle's history (without, older checkpoints become unrecoverable).
      await recoverLocked(
        store,
        set,
        (e) => {
          if (e.type === 'recovered') err(`ferry: ${describeRecovery(e)}`);
        },
        access,
      );
      for (const d of (await store.readCatalog(set)).damaged) err(damagedEntryWarning(d));
      const cp = await store.latestCheckpoint(set);
      if (!cp) throw new ConfigError(`no checkpoint for set "${set}" in ${o.state}`, { setting: 'set' });
      const reports = [];
      for (const d of cp.disks) {
        const named = { disk: d.disk, target: d.target, aggregate: d.aggregate };
        if (!VERIFY_CHECKS.includes(d.aggregate.algorithm)) {
          const check = { checkpoint: cp.id, disk: d.disk, verifier: 'ferry verify' };
          reports.push({
            ...named,
            ok: false,
            regions: 0,
            mismatches: [],
            unchecked: true,
            reason: uncheckableAggregate(check, d.aggregate, VERIFY_CHECKS),
          });
          continue;
        }
        if (d.target.startsWith('ferry://') && access !== undefined) {
          // The node re-hashes its image against its manifest and the checkpoint's reference.
          const remote = await verifyOnNode(d.target, d.targetRef, d.sizeBytes, access);
          reports.push({ ...named, ...remote });
          continue;
        }
        if (!d.target.startsWith('file:')) {
          reports.push({
            ...named,
            ok: false,
            regions: 0,
            mismatches: [],
            unchecked: true,
            reason: `${d.target} is a ferry node's replica: give --join FILE (or FERRY_JOIN, or --insecure for a node on this host) to verify it on its node`,
          });
          continue;
        }
        const report = await verifyFileImage(filePath(d.target, 'target'), d.targetRef);
        reports.push({ ...named, ...report, unchecked: false, reason: '' });
      }
      return { cp, reports };
    });
    if (o.json) out(JSON.stringify({ checkpoint: cp.id, disks: reports }, null, 2));
    else {
      for (const r of reports) {
        out(
          r.unchecked
            ? `disk ${r.disk}: NOT CHECKED (${r.reason})`
            : r.ok
              ? `disk ${r.disk}: OK (${r.regions} regions match checkpoint ${cp.id})`
              : `disk ${r.disk}: MISMATCH at offsets ${r.mismatches.join(', ') || '(manifest differs from checkpoint)'}`,
        );
      }
    }
    if (reports.some((r) => !r.ok)) process.exitCode = 1;
  });

program
  .command('demo')
  .description('build a small multi-disk workload, replicate a base copy and two incremental cycles, verify')
  .option('--dir <dir>', 'work directory (default: a fresh temporary directory)')
  .option('--json', 'print the results as JSON')
  // Commander hands a default to the action as is, without argParser: it must be a number already.
  .addOption(new Option('--scale <n>', 'disk size multiplier').default(1).argParser(Number))
  .action(async (o) => {
    if (!Number.isFinite(o.scale) || o.scale <= 0 || o.scale > 64) {
      throw new ConfigError(`--scale must be a number above 0 and at most 64, not ${o.scale}`, {
        setting: 'scale',
      });
    }
    const ok = await runDemo({ dir: o.dir, json: Boolean(o.json), scale: o.scale, log: out });
    if (!ok) process.exitCode = 1;
  });

program
  .command('local-cloud')
  .description(
    'run the deployed serverless path on this machine: the synthesized state machine with the real Lambda handlers on DynamoDB, SQS and EBS emulators; a full and incremental cycles, verified',
  )
  .addOption(
    new Option('--incrementals <n>', 'incremental cycles after the full one').default(2).argParser(Number),
  )
  .option(
    '--faults',
    'inject faults into the first incremental: a killed writer, duplicate deliveries, throttling',
  )
  .option('--verbose', 'print every state the executions enter')
  .addOption(
    new Option(
      '--waits <mode>',
      'fast: every Wait state and retry pause cut to 200 ms (Step Functions counts not comparable to AWS); real: as synthesized (10 s between ticks, 60 s between snapshot polls), with the deployed lease and timeouts',
    )
      .choices(['fast', 'real'])
      .default('fast'),
  )
  .addOption(
    new Option(
      '--size <preset>',
      'the workload: small (disks of 48 and 96 MiB, about 90 MiB changed in the full cycle, 100 MiB per incremental) or large (576 MiB and 1.1 GiB disks, about 1 GiB full, 250 MiB per incremental; the process peaks near 16 GB of memory)',
    )
      .choices(['small', 'large'])
      .default('small'),
  )
  .addOption(
    new Option(
      '--full-scale <x>',
      "the full cycle's changes and the disks as a multiple of the small workload's",
    ).argParser(Number),
  )
  .addOption(
    new Option(
      '--incremental-scale <x>',
      "each incremental's changes as a multiple of the small workload's",
    ).argParser(Number),
  )
  .addOption(
    new Option(
      '--writer-concurrency <n>',
      "chunk-writer invocations at once (default 4 with fast waits, 1 with real: invocations in this one process share its CPU, so with several each one's measured duration holds the others' work)",
    ).argParser(Number),
  )
  .addOption(
    new Option(
      '--recover <mode>',
      'instead of cycles, run the Recovery state machine with the real recovery handler on moto_server (EC2, Scheduler) and dynalite, from a checkpoint of moto snapshots: a drill torn down and verified by tag, a failover/migration then cleaned up, or a failover failed back (reverse cycle, then cutover); prints its reports',
    ).choices(['drill', 'failover', 'migration', 'failback']),
  )
  .option('--json', 'print the results as JSON')
  .action(async (o, command: Command) => {
    if (o.recover !== undefined) {
      const cycleOnly = [
        'incrementals',
        'faults',
        'size',
        'fullScale',
        'incrementalScale',
        'writerConcurrency',
      ].filter((k) => command.getOptionValueSource(k) === 'cli');
      if (cycleOnly.length > 0)
        throw new ConfigError(
          `--recover runs no cycles: ${cycleOnly.map((k) => `--${k.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)}`).join(', ')} does not apply to it`,
          { setting: 'recover' },
        );
      const { runLocalRecovery } = await import('./local-cloud.ts');
      const ok = await runLocalRecovery({
        mode: o.recover,
        verbose: Boolean(o.verbose),
        waits: o.waits,
        json: Boolean(o.json),
        log: out,
      });
      process.exit(ok ? 0 : 1);
    }
    if (!Number.isSafeInteger(o.incrementals) || o.incrementals < 0 || o.incrementals > 20)
      throw new ConfigError('--incrementals must be a whole number from 0 to 20', {
        setting: 'incrementals',
      });
    for (const [flag, value] of [
      ['full-scale', o.fullScale],
      ['incremental-scale', o.incrementalScale],
    ] as const) {
      // Up to 24: the volumes (1.7 GiB at 12) live in memory, several copies of them.
      if (value !== undefined && !(Number.isFinite(value) && value > 0 && value <= 24))
        throw new ConfigError(`--${flag} must be a number above 0, at most 24`, { setting: flag });
    }
    const writers = o.writerConcurrency as number | undefined;
    // At most the deployment's event source maximum (20 by default): the local cloud clamps to it.
    if (writers !== undefined && !(Number.isSafeInteger(writers) && writers >= 1 && writers <= 20))
      throw new ConfigError('--writer-concurrency must be a whole number from 1 to 20', {
        setting: 'writer-concurrency',
      });
    const { runLocalCloud } = await import('./local-cloud.ts');
    const { WORKLOAD_SIZES } = await import('../local-cloud/workload.ts');
    const preset = WORKLOAD_SIZES[o.size as keyof typeof WORKLOAD_SIZES];
    const custom = o.fullScale !== undefined || o.incrementalScale !== undefined;
    const ok = await runLocalCloud({
      incrementals: o.incrementals,
      faults: Boolean(o.faults),
      verbose: Boolean(o.verbose),
      waits: o.waits,
      size: {
        name: custom ? `${preset.name}, rescaled` : preset.name,
        fullScale: o.fullScale ?? preset.fullScale,
        incrementalScale: o.incrementalScale ?? preset.incrementalScale,
      },
      writerConcurrency: writers,
      json: Boolean(o.json),
      log: out,
    });
    // A writer "killed" by --faults is frozen, not gone (its handler's own deadline timer still
    // runs, minutes long): leave now rather than wait for a Lambda that would no longer exist.
    process.exit(ok ? 0 : 1);
  });

const serve = program
  .command('serve')
  .description(
    'run a replication node: sources replicate to it with --target ferry://HOST:PORT/DISK --join FILE. It speaks TLS 1.3 with client certificates only; on first start it creates its CA in --state and STATE/join.json, the credential (all disks) a source needs',
  )
  .enablePositionalOptions()
  // --listen and --target are checked in the action: as required options commander would demand
  // them of issue-credential and revoke-credential too.
  .option('--listen <host:port>', 'address to listen on, e.g. 0.0.0.0:7790 (port 0 picks a free one)')
  .option(
    '--target <uri>',
    'where the node writes: file:DIR, a directory holding one image per disk, named after the disk',
  )
  .option(
    '--state <dir>',
    "the node's CA, credentials and each disk's last commit (required unless --insecure)",
  )
  .option(
    '--node-budget <size>',
    'bytes held for all disks at once (credit plus chunks in flight), e.g. "256MiB"',
  )
  .option(
    '--insecure',
    'plain TCP: no encryption, no authentication; refused unless --listen is a loopback address',
  )
  .action(async (o) => {
    if (o.listen === undefined)
      throw new ConfigError('serve: give --listen HOST:PORT', { setting: 'listen' });
    if (o.target === undefined) throw new ConfigError('serve: give --target file:DIR', { setting: 'target' });
    // The node writes whatever targets it is given; from the command line, file images in a directory.
    const targets = await ImageDirectory.open(nodeTargetDir(o.target));
    let tls: NodeTls | undefined;
    if (!o.insecure) {
      if (o.state === undefined) {
        throw new ConfigError(
          'serve: a node keeps its CA and the credentials it issued in --state DIR; give --state (or, on loopback only, --insecure)',
          { setting: 'state' },
        );
      }
      const { openNodePki } = await import('../shared/net/pki.ts');
      const pki = await openNodePki(o.state);
      if (pki.created) {
        out(
          `ferry node: created the node CA in ${o.state}; join file for sources (all disks): ${pki.joinFile} — hand it over as a secret, or issue scoped ones with "ferry serve issue-credential"`,
        );
      }
      out(`ferry node fingerprint ${pki.fingerprint}`);
      tls = pki.tls;
    }
    const { startNode } = await import('../shared/net/node.ts');
    const node = await startNode({
      listen: o.listen,
      targets,
      // Without --state (loopback --insecure only) the session records lie beside the images.
      ...(o.state !== undefined ? { stateDir: o.state } : { sessionDir: targets.dir }),
      ...(o.nodeBudget !== undefined ? { nodeBudget: parseSize(o.nodeBudget, 'nodeBudget') } : {}),
      ...limitsFromFlags(o),
      ...(tls !== undefined ? { tls } : { insecure: true }),
      log: err,
    });
    if (tls === undefined) {
      err(
        `ferry: warning: --insecure: plain TCP on ${node.address}, no encryption and no authentication; any process on this host can write images to ${targets.dir}`,
      );
    }
    out(`ferry node listening on ${node.address}`);
    const signal = await new Promise<NodeJS.Signals>((resolve) => {
      const stop = (s: NodeJS.Signals) => {
        process.off('SIGINT', stop);
        process.off('SIGTERM', stop);
        resolve(s);
      };
      process.on('SIGINT', stop);
      process.on('SIGTERM', stop);
    });
    err(`ferry node: ${signal}, stopping (sources are told to retry; writes in flight finish)`);
    await node.close();
    out('ferry node stopped');
  });

serve
  .command('issue-credential')
  .description('issue a credential for a source: a join file that may write the disks matching --disks')
  .requiredOption('--state <dir>', "the node's state directory (its CA)")
  .requiredOption(
    '--disks <pattern>',
    "disks it may write: a disk name where '*' matches anything, e.g. 'erp-*' ('*' for every disk)",
  )
  .requiredOption(
    '--out <file>',
    'where to write the join file (mode 0600; an existing file is not replaced)',
  )
  .addOption(
    new Option('--valid-days <n>', 'how long the credential is valid').default(365).argParser(Number),
  )
  .action(async (o) => {
    if (!Number.isSafeInteger(o.validDays) || o.validDays < 1 || o.validDays > 3650) {
      throw new ConfigError('--valid-days must be a whole number from 1 to 3650', { setting: 'valid-days' });
    }
    const { issueCredential } = await import('../shared/net/pki.ts');
    const { record, pki } = await issueCredential(o.state, o.out, {
      disks: o.disks,
      notAfter: new Date(Date.now() + o.validDays * 86_400_000),
    });
    if (pki.created)
      out(`ferry: created the node CA in ${o.state} (and its owner's join file ${pki.joinFile})`);
    out(
      `issued credential ${record.serial} for disks '${record.disks}', valid until ${record.notAfter}: ${o.out} (node ${pki.fingerprint})`,
    );
  });

serve
  .command('revoke-credential')
  .description('revoke a credential: the node refuses it from its next connection on, without a restart')
  .requiredOption('--state <dir>', "the node's state directory")
  .option('--serial <serial>', "the credential's serial (ferry serve list-credentials)")
  .option('--credential <file>', 'or the join file that holds it')
  .action(async (o) => {
    if ((o.serial === undefined) === (o.credential === undefined)) {
      throw new ConfigError('revoke-credential: give --serial SERIAL or --credential FILE', {
        setting: 'serial',
      });
    }
    const { joinFileSerial, revokeCredential } = await import('../shared/net/pki.ts');
    const serial = o.serial ?? (await joinFileSerial(o.state, o.credential));
    const { record, already } = await revokeCredential(o.state, serial);
    out(
      already
        ? `credential ${record.serial} (disks '${record.disks}') was already revoked on ${record.revoked}`
        : `revoked credential ${record.serial} (disks '${record.disks}'): the node refuses it from its next connection`,
    );
  });

serve
  .command('list-credentials')
  .description('list the credentials this node issued, with their scope and whether they are revoked')
  .requiredOption('--state <dir>', "the node's state directory")
  .option('--json', 'print as JSON')
  .action(async (o) => {
    const { listCredentials } = await import('../shared/net/pki.ts');
    const records = await listCredentials(o.state);
    if (o.json) {
      out(JSON.stringify(records, null, 2));
      return;
    }
    if (records.length === 0) out(`no credentials in ${o.state}`);
    for (const r of records) {
      const status = r.revoked !== undefined ? `revoked ${r.revoked}` : `valid until ${r.notAfter}`;
      out(`${r.serial}  disks '${r.disks}'  issued ${r.created}  ${status}`);
    }
  });

/** One line for a catalog entry that cannot be read: which file, why, and what to do. */
function damagedEntryWarning(d: DamagedEntry): string {
  return `ferry: warning: catalog entry ${d.path} (checkpoint #${d.sequence} of set ${d.set}) is damaged (${d.reason}); restore it from a backup, or move it aside if that checkpoint is not needed`;
}

// ---- ferry serve: the node's limits as flags (their defaults and reasons: shared/net/limits.ts) ----

interface LimitFlag {
  readonly flag: string;
  readonly limit: keyof NodeLimits;
  readonly unit: 'n' | 'ms' | 'size';
  readonly help: string;
}

const LIMIT_FLAGS: readonly LimitFlag[] = [
  {
    flag: 'max-connections',
    limit: 'maxConnections',
    unit: 'n',
    help: 'connections at once, all sources together',
  },
  {
    flag: 'max-connections-per-credential',
    limit: 'maxConnectionsPerCredential',
    unit: 'n',
    help: 'connections at once of one credential',
  },
  {
    flag: 'handshake-timeout',
    limit: 'handshakeTimeoutMs',
    unit: 'ms',
    help: 'from connecting to a complete HELLO (bytes of an unfinished one do not count)',
  },
  {
    flag: 'idle-timeout',
    limit: 'idleTimeoutMs',
    unit: 'ms',
    help: "longest a session may go without a complete frame that moves it on; then its disk's lock and credit are released",
  },
  { flag: 'max-disk-size', limit: 'maxDiskBytes', unit: 'size', help: 'largest disk a source may declare' },
  {
    flag: 'max-image-bytes-per-credential',
    limit: 'maxImageBytesPerCredential',
    unit: 'size',
    help: 'apparent size of the images one credential may create, together',
  },
  {
    flag: 'max-commit-extents',
    limit: 'maxCommitExtents',
    unit: 'n',
    help: 'extents a session may send before its COMMIT (never more than its disk can have)',
  },
];

function limitOption(f: LimitFlag): Option {
  const def = DEFAULT_LIMITS[f.limit];
  const shown = f.unit === 'size' ? formatBytes(def).replace(' ', '') : String(def);
  return new Option(`--${f.flag} <${f.unit}>`, `${f.help} (default ${shown})`).argParser((value: string) => {
    const n = f.unit === 'size' ? parseSize(value, f.limit) : Number(value);
    if (!Number.isSafeInteger(n) || n <= 0) {
      throw new ConfigError(`serve: --${f.flag} ${value} is not a whole number above 0`, {
        setting: f.limit,
      });
    }
    return n;
  });
}

for (const f of LIMIT_FLAGS) serve.addOption(limitOption(f));

/** The limits given as `ferry serve` flags (commander's camelCase keys), for startNode. */
function limitsFromFlags(o: Record<string, unknown>): Partial<NodeLimits> {
  const limits: Partial<Record<keyof NodeLimits, number>> = {};
  for (const f of LIMIT_FLAGS) {
    const value = o[f.flag.replace(/-([a-z])/g, (_, c: string) => c.toUpperCase())];
    if (typeof value === 'number') limits[f.limit] = value;
  }
  return limits;
}

/**
 * The aggregates `ferry verify` stands behind. It re-hashes a Ferry target's image against the
 * reference the target made when the engine committed the disk, a commit the engine (and a node,
 * on its own) made only for chunks matching the ferry-chunk-sha256 aggregate. An aggregate of
 * another algorithm was computed by another publisher over what this check never sees: it is
 * reported as not checked, never compared.
 */
const VERIFY_CHECKS: readonly AggregateAlgorithm[] = ['ferry-chunk-sha256'];

/** How a command reaches ferry:// replicas: --join, $FERRY_JOIN, or --insecure; undefined for none. */
function remoteAccess(o: Record<string, unknown>): { join?: string; insecure?: boolean } | undefined {
  if (o.join !== undefined && o.insecure) {
    throw new ConfigError('give --join FILE or --insecure, not both', { setting: 'join' });
  }
  if (o.insecure) return { insecure: true };
  const join = (o.join as string | undefined) ?? (process.env.FERRY_JOIN || undefined);
  return join === undefined ? undefined : { join };
}

/** `ferry verify` of a replica on a node: the node re-hashes it (authenticated like replication). */
async function verifyOnNode(
  target: string,
  targetRef: string | undefined,
  sizeBytes: number,
  access: { join?: string; insecure?: boolean },
): Promise<{ ok: boolean; regions: number; mismatches: number[]; unchecked: boolean; reason: string }> {
  const { checkSourceSecurity, readJoinFile } = await import('../shared/net/join.ts');
  const { parseFerryUri, RemoteTarget } = await import('../shared/net/remote-target.ts');
  const uri = parseFerryUri(target);
  const security = {
    join: access.join === undefined ? undefined : readJoinFile(access.join),
    insecure: access.insecure,
  };
  checkSourceSecurity(uri, security);
  const remote = new RemoteTarget(uri, security);
  try {
    const answer = await remote.verify(targetRef, sizeBytes);
    const checked = answer.ok || answer.mismatches.length > 0 || answer.manifestRef !== '';
    return {
      ok: answer.ok,
      regions: answer.regions,
      mismatches: [...answer.mismatches],
      unchecked: !checked,
      reason: answer.reason,
    };
  } catch (e) {
    return { ok: false, regions: 0, mismatches: [], unchecked: true, reason: errorMessage(e) };
  } finally {
    await remote.close();
  }
}

/** `ferry serve --target`: a node writes file images, so a `file:` directory (or a bare path). */
function nodeTargetDir(uri: string): string {
  if (/^(ferry|nbd|nbd\+unix|ebs|azure):/i.test(uri)) {
    throw new ConfigError(
      `target ${uri}: a ferry serve node writes file images into a directory; give it as file:DIR`,
      { setting: 'target' },
    );
  }
  return filePath(uri, 'target');
}

function jobFromFlags(o: Record<string, unknown>): JobSpec {
  const sources = o.source as string[];
  const targets = o.target as string[];
  const changed = o.changed as string[];
  const ids = o.disk as string[];
  if (sources.length === 0)
    throw new ConfigError('replicate: give --source and --target, or --job FILE', { setting: 'source' });
  if (targets.length !== sources.length) {
    throw new ConfigError(
      `replicate: ${sources.length} --source but ${targets.length} --target; give one target per source`,
      {
        setting: 'target',
      },
    );
  }
  if (changed.length !== 0 && changed.length !== sources.length) {
    throw new ConfigError(
      `replicate: ${changed.length} --changed for ${sources.length} --source; give one per source or none`,
      {
        setting: 'changed',
      },
    );
  }
  if (ids.length !== 0 && ids.length !== sources.length) {
    throw new ConfigError(`replicate: ${ids.length} --disk for ${sources.length} --source`, {
      setting: 'disk',
    });
  }
  // Checked here as well as in the job schema so the message names the flag the operator typed.
  checkName('set', o.set, '--set');
  for (const id of ids) checkName('disk', id, '--disk');
  return parseJobSpec(
    {
      set: o.set,
      disks: sources.map((source, i) => ({
        id: ids[i] ?? `disk${i}`,
        source,
        target: targets[i],
        ...(changed[i] !== undefined ? { changed: changed[i] } : {}),
      })),
      params: paramsFromFlags(o),
      ...(o.retain !== undefined ? { retain: { count: parseRetainCount(o.retain as string) } } : {}),
    },
    'command line',
  );
}

/**
 * The join file of each ferry:// target without its own ("join" in the job file): --join, else
 * $FERRY_JOIN. --insecure takes none (and an explicit --join with it is refused).
 */
function withJoinFile(spec: JobSpec, o: Record<string, unknown>): JobSpec {
  if (o.join !== undefined && o.insecure) {
    throw new ConfigError('replicate: give --join FILE or --insecure, not both', { setting: 'join' });
  }
  const join = o.insecure
    ? undefined
    : ((o.join as string | undefined) ?? (process.env.FERRY_JOIN || undefined));
  if (join === undefined) return spec;
  return {
    ...spec,
    disks: spec.disks.map((d) =>
      d.target.startsWith('ferry://') && d.join === undefined ? { ...d, join } : d,
    ),
  };
}

async function jobFromFile(path: string, o: Record<string, unknown>): Promise<JobSpec> {
  let value: unknown;
  try {
    value = JSON.parse(await readFile(path, 'utf8'));
  } catch (e) {
    throw new ConfigError(`job file ${path}: ${errorMessage(e)}`, { setting: 'job' });
  }
  refuseProtoKeys(value, `job file ${path}`);
  const spec = parseJobSpec(value, `job file ${path}`);
  // --retain on the command line overrides the job file's count (its age limit stays).
  const retain =
    o.retain === undefined ? spec.retain : { ...spec.retain, count: parseRetainCount(o.retain as string) };
  return { ...spec, params: { ...spec.params, ...paramsFromFlags(o) }, ...(retain ? { retain } : {}) };
}

/**
 * JSON.parse keeps a `"__proto__"` key as an own property, but schemas that copy an object (zod's
 * records and objects) drop it without a word, so a setting spelt that way would vanish where every
 * other unknown key is refused. Refuse it before any schema sees the file.
 */
function refuseProtoKeys(value: unknown, origin: string, path = ''): void {
  if (typeof value !== 'object' || value === null) return;
  if (Object.hasOwn(value, '__proto__')) {
    if (path === 'params') throw unknownSettings(['__proto__'], origin);
    throw new ConfigError(`${origin}: unknown key "__proto__"${path ? ` in ${path}` : ''}`, {
      setting: path || 'job',
    });
  }
  for (const [key, child] of Object.entries(value)) {
    refuseProtoKeys(child, origin, Array.isArray(value) ? `${path}[${key}]` : path ? `${path}.${key}` : key);
  }
}

function paramsFromFlags(o: Record<string, unknown>): Record<string, unknown> {
  const p: Record<string, unknown> = {};
  if (o.chunkSize !== undefined) p.chunkSize = o.chunkSize;
  if (o.window !== undefined) p.window = o.window;
  if (o.nodeBudget !== undefined) p.nodeBudget = o.nodeBudget;
  if (o.checkpointInterval !== undefined) p.checkpointInterval = o.checkpointInterval;
  if (o.adaptive === false) p.adaptive = false;
  return p;
}

/**
 * A signal that Ctrl-C (SIGINT) or SIGTERM aborts, so a long command stops cleanly (removing what it
 * had not finished); `release` removes the handlers again.
 */
function interruptible(): { signal: AbortSignal; release: () => void } {
  const abort = new AbortController();
  const onSignal = () => abort.abort();
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  return {
    signal: abort.signal,
    release: () => {
      process.off('SIGINT', onSignal);
      process.off('SIGTERM', onSignal);
    },
  };
}

async function runWithProgress(
  spec: JobSpec,
  stateDir: string,
  json: boolean,
  insecure: boolean,
): Promise<ReplicationResult> {
  const reporter = createReporter(json ? 'silent' : process.stderr.isTTY ? 'tty' : 'plain', err);
  const interrupt = interruptible();
  try {
    return await runLocalJob(spec, {
      stateDir,
      onEvent: (e) => reporter.onEvent(e),
      onHistory: (e) => {
        const line = describeHistory(e);
        if (e.type === 'prune-failed' || !json) err(line);
      },
      signal: interrupt.signal,
      insecure,
    });
  } finally {
    reporter.stop();
    interrupt.release();
  }
}

/**
 * `ferry recover --test`: serves the recovered disks until the TTL, Ctrl-C (SIGINT) or SIGTERM,
 * then removes every server and file of the drill and says what it checked. A server that exits
 * on its own ends the drill too, with exit status 1.
 */
async function runDrill(
  recovered: RecoverResult,
  dir: string,
  ttlMs: number,
  started: number,
  where: { set: string; stateDir: string },
  check?: string,
): Promise<void> {
  const { startDrill, describeDrillReport, runDrillCheck, drillUriVariable } = await import('./drill.ts');
  const drill = await startDrill(recovered, dir, { ...where, startedMs: started, ttlMs });
  const until = new Date(Date.now() + ttlMs).toISOString();
  out(
    `drill ${drill.id} of checkpoint ${recovered.checkpoint.id}: serving ${drill.exports.length} disk(s) ${(drill.readyMs / 1000).toFixed(1)} s after the command started, until ${check === undefined ? until : `its health check ends (at the latest ${until})`} (Ctrl-C or "ferry recover --cleanup --state ${where.stateDir}" ends it sooner); what is written to them goes to a throwaway overlay`,
  );
  for (const e of drill.exports) out(`disk ${e.disk}: ${e.uri} (nbdkit pid ${e.pid})`);
  let timer: NodeJS.Timeout | undefined;
  let onSignal: ((s: NodeJS.Signals) => void) | undefined;
  const interrupted = new AbortController();
  let health: Awaited<ReturnType<typeof runDrillCheck>> | undefined;
  const reason = await new Promise<string>((resolve) => {
    timer = setTimeout(() => resolve('its TTL passed'), ttlMs);
    onSignal = (s) => {
      interrupted.abort();
      resolve(s);
    };
    process.on('SIGINT', onSignal);
    process.on('SIGTERM', onSignal);
    void drill.lost.then((disk) => {
      interrupted.abort();
      resolve(`the server of disk ${disk} exited on its own`);
    });
    if (check !== undefined) {
      err(
        `ferry: drill health check (${drill.exports.map((e) => drillUriVariable(e.disk)).join(', ')}): ${check}`,
      );
      // The check's output is the operator's: passed through to stderr, never into the report.
      void runDrillCheck(
        drill,
        check,
        ttlMs,
        (chunk) => process.stderr.write(chunk),
        interrupted.signal,
      ).then((result) => {
        health = result;
        resolve(result.healthy ? 'its health check passed' : `its health check failed (${result.reason})`);
      });
    }
  });
  clearTimeout(timer);
  // A check still running when the drill ends (TTL, signal) is killed and its verdict awaited.
  if (check !== undefined && health === undefined) {
    interrupted.abort(
      reason === 'its TTL passed' ? "killed at the drill's TTL" : `killed: the drill ended (${reason})`,
    );
    while (health === undefined) await new Promise((r) => setTimeout(r, 50));
  }
  // Signals during the teardown are ignored: it must finish, or the drill would leave things behind.
  const teardown = await drill.stop(reason, health).finally(() => {
    if (onSignal) {
      process.off('SIGINT', onSignal);
      process.off('SIGTERM', onSignal);
    }
  });
  out(
    `drill ended (${reason}): ${teardown.servers} NBD server(s) stopped and gone, ${teardown.removed.length} file(s) and folder(s) removed; nothing of the drill remains`,
  );
  for (const line of describeDrillReport(teardown.report, where.stateDir)) out(line);
  if (reason.includes('exited on its own') || (health !== undefined && !health.healthy)) process.exitCode = 1;
}

/** What pruning a disk's history after the publication did. */
function describeHistory(e: HistoryEvent): string {
  if (e.type === 'prune-failed') {
    return `ferry: warning: disk ${e.disk}: pruning its history failed (${e.error}); more checkpoints than the retention setting stay recoverable until the next run prunes again`;
  }
  const list = e.sequences.map((s) => `#${s}`).join(', ');
  return `disk ${e.disk}: history of cycle(s) ${list} pruned (retention)`;
}

function printSummary(r: ReplicationResult): void {
  const seconds = r.elapsedMs / 1000;
  const sent = r.disks.reduce((s, d) => s + d.bytesSent, 0);
  out(
    `checkpoint ${r.checkpoint.id} published: ${r.disks.length} disk(s), ${formatBytes(sent)} sent in ${seconds.toFixed(1)} s`,
  );
  for (const d of r.disks) {
    const resumed = d.resumedBytes > 0 ? `, ${formatBytes(d.resumedBytes)} resumed from progress` : '';
    out(
      `  ${d.disk}: ${d.kind}, ${formatBytes(d.bytesTotal)} in ${d.chunks} chunks${resumed}, ${d.aggregate.algorithm} ${d.aggregate.value.slice(0, 16)}…`,
    );
  }
}

try {
  // `recover --cloud` and `checkpoints --cloud` work on a deployed stack (cli/recover-cloud.ts).
  if (process.argv.includes('--cloud'))
    await (await import('./recover-cloud.ts')).runCloudCommand(process.argv.slice(2), { out, err });
  else await program.parseAsync(process.argv);
} catch (e) {
  // One clear line naming what is at fault; the stack only when asked for.
  err(`ferry: ${errorMessage(e)}`);
  if (process.env.FERRY_DEBUG) console.error(e);
  // Exit 2: the input is wrong (a setting, a name, a change map) and running again will not help
  // until it is fixed; 1: anything else.
  process.exitCode = e instanceof ConfigError || e instanceof ChangeMapError ? 2 : 1;
}
