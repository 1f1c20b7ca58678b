// Prints the Markdown tables of bench/README.md from result files: the WAN benchmark's and the
// simulation's, told apart by their `benchmark` field, in the order given.
// Usage: node --import tsx bench/report.ts bench/results/wan-DATE.json [bench/results/sim-DATE.json]
import { readFile } from 'node:fs/promises';

interface Case {
  id: string;
  tool: string;
  rttMs: number;
  rateMbit: number;
  workload: string;
  disks: number;
  supplementary: boolean;
  ok: boolean;
  error?: string;
  capped: boolean;
  capS?: number;
  payloadBytes: number;
  bytesMoved: number;
  timeMs: number;
  goodputMbit: number;
  link: {
    dataBytes: number;
    utilisation: number;
    dataPhaseUtilisation?: number;
  };
  peakRssMiB: { tool: number; node?: number };
  cpu: { toolCores: number; nodeCores?: number; otherCores: number };
  quiet?: { busyCores: number; waitedS: number };
  verified?: boolean;
  ferry?: {
    startupMs?: number;
    plannedAtMs?: number;
    transferEndMs?: number;
    windowMaxMiB: number;
    windowChanges: number;
  };
  otherRun?: { goodputMbit: number; otherCores: number };
}

interface Ratio {
  rttMs: number;
  rateMbit: number;
  workload: string;
  disks: number;
  ferryOverStopAndWait?: number;
  ferryOverNbdcopy?: number;
  remoteOverNbdcopy?: number;
}

interface WanFile {
  benchmark: 'ferry-wan';
  startedAt: string;
  finishedAt: string;
  command: string;
  options: {
    rtts: number[];
    rateMbit: number;
    workloads: string[];
    disks: number[];
    tools: string[];
    payloadMiB: number;
    extraRateMbit: number;
    supplements: boolean;
    swCapS: number;
  };
  machine: {
    cpus: number;
    cpuModel: string;
    memoryGiB: number;
    kernel: string;
    node: string;
    nbdkit: string;
    nbdcopy: string;
    loadAvgAtStart: number[];
  };
  ceiling?: {
    configuredMbit: number;
    achievedMbit: number;
    linkCores: number;
    directMbit: number;
    quiet?: { busyCores: number };
  };
  baseline?: { ferryRssMiB: number; nodeRssMiB: number };
  cases: Case[];
  ratios: Ratio[];
  charts?: string[];
}

interface SimResult {
  scenario: { name: string; accountRps: number; paced: boolean; budgetMiB: number; linkGbit: number };
  ok: boolean;
  error?: string;
  disks: number;
  totalBytes: number;
  deliveredBytes: number;
  virtualSeconds: number;
  realSeconds: number;
  utilisation: {
    bindingLimit: string;
    bindingGbit: number;
    wholeRun: number;
    whileAllBacklogged: number;
    linkWholeRun: number;
    linkWhileAllBacklogged: number;
    linkBusy: number;
    linkBytes: number;
  };
  fairness: {
    intervalSeconds: [number, number];
    jainIndex: number;
    minOverMean: number;
    jainIndexChunks: number;
    fragmentedOverSequential?: number;
  };
  inflight: {
    budgetBytes: number;
    peakSchedulerBytes: number;
    grants: number;
    overBudgetGrants: number;
    peakTargetBytes: number;
    budgetExceeded: boolean;
  };
  throttling: { putRequests: number; throttled: number; share: number; chunkRetries: number };
  windows: { stepsUp: number; stepsDown: number; finalLevelsMiB: Record<string, number> };
}

interface SimFile {
  benchmark: 'ferry-sim';
  at: string;
  command: string;
  charts?: string[];
  results: SimResult[];
}

const MiB = 1024 * 1024;
const pct = (x: number | undefined, d = 1) => (x === undefined ? '–' : `${(x * 100).toFixed(d)}%`);
const num = (x: number | undefined, d = 2) => (x === undefined ? '–' : x.toFixed(d));
const yes = (ok: boolean) => (ok ? 'yes' : '**no**');

function caseTable(cases: readonly Case[], baseRate: number): string {
  if (cases.length === 0) return '(none in this file)';
  const rows = [
    '| RTT ms | workload | disks | tool | moved MiB (on link) | time s | goodput Mbit/s | link util | data-phase util | peak RSS MiB | CPU cores (tool + node) | other load (cores) | notes |',
    '|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|',
  ];
  for (const c of cases) {
    const notes: string[] = [];
    if (!c.ok) notes.push(`FAILED: ${c.error ?? ''}`);
    if (c.capped) notes.push(`capped at ${c.capS} s`);
    if (c.verified === false) notes.push('replica differs');
    if (c.otherRun)
      notes.push(`other run ${c.otherRun.goodputMbit} Mbit/s at ${c.otherRun.otherCores} other cores`);
    if (c.ferry?.plannedAtMs !== undefined && c.ferry.transferEndMs !== undefined) {
      notes.push(
        `setup ${(c.ferry.plannedAtMs / 1000).toFixed(1)} s, commit ${((c.timeMs - c.ferry.transferEndMs) / 1000).toFixed(1)} s`,
      );
    }
    if (c.ferry && c.ferry.windowChanges > 0) notes.push(`window up to ${c.ferry.windowMaxMiB} MiB`);
    const rss =
      c.peakRssMiB.node === undefined
        ? `${c.peakRssMiB.tool}`
        : `${c.peakRssMiB.tool} + ${c.peakRssMiB.node}`;
    const cpu =
      c.cpu.nodeCores === undefined ? `${c.cpu.toolCores}` : `${c.cpu.toolCores} + ${c.cpu.nodeCores}`;
    rows.push(
      `| ${c.rttMs} | ${c.workload} | ${c.disks} | ${c.tool}${c.rateMbit !== baseRate ? ` @${c.rateMbit} Mbit/s` : ''} | ` +
        `${(c.bytesMoved / MiB).toFixed(0)} (${(c.link.dataBytes / MiB).toFixed(0)}) | ${(c.timeMs / 1000).toFixed(1)} | ` +
        `${c.goodputMbit} | ${pct(c.link.utilisation)} | ${pct(c.link.dataPhaseUtilisation)} | ${rss} | ${cpu} | ${c.cpu.otherCores} | ${notes.join('; ')} |`,
    );
  }
  return rows.join('\n');
}

function ratioTable(ratios: readonly Ratio[]): string {
  if (ratios.length === 0) return '(none in this file)';
  const rows = [
    '| RTT ms | rate Mbit/s | workload | disks | Ferry / stop-and-wait | Ferry / nbdcopy | Ferry→node / nbdcopy |',
    '|---:|---:|---|---:|---:|---:|---:|',
  ];
  for (const r of ratios) {
    rows.push(
      `| ${r.rttMs} | ${r.rateMbit} | ${r.workload} | ${r.disks} | ${num(r.ferryOverStopAndWait)} | ${num(r.ferryOverNbdcopy)} | ${num(r.remoteOverNbdcopy)} |`,
    );
  }
  return rows.join('\n');
}

function wanReport(path: string, wan: WanFile): string[] {
  const o = wan.options;
  const m = wan.machine;
  const main = wan.cases.filter((c) => !c.supplementary);
  const supplements = wan.cases.filter((c) => c.supplementary);
  const mainTools = o.tools.filter((t) => t !== 'nbdcopy-default');
  const plannedMain = o.rtts.length * o.workloads.length * o.disks.length * mainTools.length;
  let plannedSupplements = 0;
  if (o.supplements && o.disks.includes(1)) {
    if (o.extraRateMbit > 0 && o.workloads.includes('seq')) {
      plannedSupplements += ['ferry', 'stop-and-wait', 'nbdcopy'].filter((t) => o.tools.includes(t)).length;
    }
    plannedSupplements += o.workloads.filter((w) => w !== 'seq').length;
  }
  const out: string[] = [];
  out.push(`## WAN benchmark: ${path}`, '');
  out.push(`- command: \`${wan.command}\`, ${wan.startedAt} to ${wan.finishedAt}`);
  out.push(
    `- cases: ${main.length} of ${plannedMain} planned in the main matrix, ` +
      `${supplements.length} of ${plannedSupplements} supplements` +
      (main.length < plannedMain || supplements.length < plannedSupplements
        ? ' — **an incomplete run**'
        : ''),
  );
  out.push(
    `- machine: ${m.cpus} × ${m.cpuModel}, ${m.memoryGiB} GiB, Linux ${m.kernel}, Node ${m.node}, ${m.nbdkit}, ` +
      `${m.nbdcopy}; load average at start ${m.loadAvgAtStart.join(' / ')}`,
  );
  if (wan.ceiling) {
    const c = wan.ceiling;
    out.push(
      `- link emulator ceiling: configured ${c.configuredMbit} Mbit/s at 2 ms, achieved ${c.achievedMbit} Mbit/s ` +
        `(the proxy used ${c.linkCores} cores); the same copy without the link ${c.directMbit} Mbit/s; ` +
        `cases run at ${o.rateMbit} Mbit/s`,
    );
  }
  if (wan.baseline) {
    out.push(
      `- baseline peak RSS: an idle Ferry process ${wan.baseline.ferryRssMiB} MiB, an idle \`ferry serve\` ${wan.baseline.nodeRssMiB} MiB`,
    );
  }
  const failed = wan.cases.filter((c) => !c.ok);
  if (failed.length) out.push(`- failed cases: ${failed.map((c) => c.id).join(', ')}`);
  const noisy = wan.cases.filter((c) => c.cpu.otherCores > 0.4);
  if (noisy.length) {
    out.push(
      `- cases with more than 0.4 cores of other load while they ran: ${noisy.length} of ${wan.cases.length}`,
    );
  }
  for (const chart of wan.charts ?? []) out.push(`- chart: ${chart}`);
  out.push('', '### Main matrix', '', caseTable(main, o.rateMbit));
  out.push('', '### Supplements', '', caseTable(supplements, o.rateMbit));
  out.push('', '### Goodput ratios', '', ratioTable(wan.ratios));
  return out;
}

function simReport(path: string, sim: SimFile): string[] {
  const out: string[] = [];
  out.push(`## Simulation: ${path}`, '');
  out.push(`- command: \`${sim.command}\`, ${sim.at}`);
  for (const chart of sim.charts ?? []) out.push(`- chart: ${chart}`);
  out.push('', '### Against the targets', '');
  out.push(
    '| scenario | disks | account quota /s | binding limit | utilisation of it, whole run (all disks busy) | of the link, whole run | Jain (bytes/s) | peak in flight / budget | throttled calls | completed |',
    '|---|---:|---:|---|---:|---:|---:|---:|---:|---|',
  );
  for (const r of sim.results) {
    const u = r.utilisation;
    const f = r.inflight;
    out.push(
      `| ${r.scenario.name} | ${r.disks} | ${r.scenario.accountRps}${r.scenario.paced ? ', paced' : ''} | ` +
        `${u.bindingLimit} (${u.bindingGbit} Gbit/s) | ${pct(u.wholeRun)} (${pct(u.whileAllBacklogged)}) | ${pct(u.linkWholeRun)} | ` +
        `${r.fairness.jainIndex} | ${(f.peakSchedulerBytes / MiB).toFixed(0)} / ${(f.budgetBytes / MiB).toFixed(0)} MiB` +
        `${f.budgetExceeded ? ' **EXCEEDED**' : ''} | ${pct(r.throttling.share, 2)} (${r.throttling.throttled} of ${r.throttling.putRequests}) | ` +
        `${r.ok ? 'yes' : `**no**: ${r.error ?? ''}`} |`,
    );
  }
  out.push('', '### Detail', '');
  out.push(
    '| scenario | payload GiB | virtual s | real s | link busy | link GiB (incl. re-sent) | Jain (chunks/s) | min / mean | fragmented / sequential | fairness interval s | grants (over budget) | window steps up / down | final windows MiB: disks | chunk retries |',
    '|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|---:|',
  );
  for (const r of sim.results) {
    const levels = Object.entries(r.windows.finalLevelsMiB)
      .map(([l, n]) => `${l}: ${n}`)
      .join(', ');
    out.push(
      `| ${r.scenario.name} | ${(r.deliveredBytes / 2 ** 30).toFixed(1)} of ${(r.totalBytes / 2 ** 30).toFixed(1)} | ${r.virtualSeconds} | ${r.realSeconds} | ` +
        `${pct(r.utilisation.linkBusy)} | ${(r.utilisation.linkBytes / 2 ** 30).toFixed(1)} | ${r.fairness.jainIndexChunks} | ` +
        `${r.fairness.minOverMean} | ${r.fairness.fragmentedOverSequential ?? '–'} | ${r.fairness.intervalSeconds.join('–')} | ` +
        `${r.inflight.grants} (${r.inflight.overBudgetGrants}) | ${r.windows.stepsUp} / ${r.windows.stepsDown} | ${levels} | ${r.throttling.chunkRetries} |`,
    );
  }
  out.push('', '### Targets met', '');
  out.push(
    '| scenario | utilisation ≥ 90% of the binding limit | Jain ≥ 0.9 | budget never exceeded | throttled < 1% |',
    '|---|---|---|---|---|',
  );
  for (const r of sim.results) {
    out.push(
      `| ${r.scenario.name} | ${yes(r.ok && r.utilisation.wholeRun >= 0.9)} | ${yes(r.fairness.jainIndex >= 0.9)} | ` +
        `${yes(!r.inflight.budgetExceeded)} | ${yes(r.throttling.share < 0.01)} |`,
    );
  }
  return out;
}

async function main(): Promise<void> {
  const paths = process.argv.slice(2);
  if (paths.length === 0)
    throw new Error('usage: report.ts RESULT.json [RESULT.json ...] (WAN or simulation)');
  const out: string[] = [];
  for (const path of paths) {
    const data = JSON.parse(await readFile(path, 'utf8')) as WanFile | SimFile;
    if (out.length) out.push('');
    if (data.benchmark === 'ferry-wan') out.push(...wanReport(path, data));
    else if (data.benchmark === 'ferry-sim') out.push(...simReport(path, data));
    else throw new Error(`${path}: not a result file of bench/wan.ts or bench/sim.ts`);
  }
  process.stdout.write(`${out.join('\n')}\n`);
}

main().catch((err) => {
  process.stderr.write(`bench/report: ${err instanceof Error ? err.message : String(err)}\n`);
  process.exitCode = 1;
});
