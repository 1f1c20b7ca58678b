// health: is every launched machine up? An instance is healthy when it runs and both EC2 status
// checks (system: the host; instance: the guest's network answers) pass, which is as close to "it
// booted" as the cloud can tell without logging in; and, for a machine with a bootMessage, when its
// serial console output shows that text (the guest's own word that it finished booting). Volumes are
// healthy when available. The state
// machine polls this with a Wait in between; each poll is given the previous answer, so a machine's
// first healthy time survives across polls and the achieved RTO is measured to it.
import type { Clock } from '../ports.ts';
import type { InstanceObservation, RecoveryCompute, VolumeObservation } from './ports.ts';
import type { HealthResult, LaunchResult, MachineHealth } from './types.ts';

// An instance in one of these will not become healthy without an operator.
const GONE = new Set(['shutting-down', 'terminated', 'stopping', 'stopped']);

type Verdict = { health: MachineHealth; failed: boolean };

function instanceVerdict(
  m: LaunchResult,
  o: InstanceObservation | undefined,
  console: string | undefined,
): Verdict {
  const base = { name: m.name, instanceId: m.instanceId };
  if (o === undefined) {
    // Just launched: EC2's reads are eventually consistent, so a missing instance is not yet a failure.
    return {
      health: {
        ...base,
        state: 'unknown',
        systemStatus: 'unknown',
        instanceStatus: 'unknown',
        healthy: false,
      },
      failed: false,
    };
  }
  const health = {
    ...base,
    state: o.state,
    systemStatus: o.systemStatus,
    instanceStatus: o.instanceStatus,
  };
  if (GONE.has(o.state)) {
    return {
      health: {
        ...health,
        healthy: false,
        reason: `instance is ${o.state}${o.stateReason ? `: ${o.stateReason}` : ''}`,
      },
      failed: true,
    };
  }
  if (o.systemStatus === 'impaired' || o.instanceStatus === 'impaired') {
    const which = [
      o.systemStatus === 'impaired' ? 'system' : '',
      o.instanceStatus === 'impaired'
        ? 'instance (the guest did not boot or its network does not answer)'
        : '',
    ]
      .filter(Boolean)
      .join(' and ');
    return { health: { ...health, healthy: false, reason: `${which} status check failed` }, failed: true };
  }
  const checksPass = o.state === 'running' && o.systemStatus === 'ok' && o.instanceStatus === 'ok';
  if (checksPass && m.bootMessage !== undefined && !(console ?? '').includes(m.bootMessage)) {
    // Not failed: a console is written as the guest boots, and EC2 shows it some time later.
    const reason = `status checks pass, but its console ${console === undefined ? 'has no output yet' : `does not show ${JSON.stringify(m.bootMessage)} yet`}`;
    return { health: { ...health, healthy: false, reason }, failed: false };
  }
  return { health: { ...health, healthy: checksPass }, failed: false };
}

function volumeVerdict(m: LaunchResult, observed: ReadonlyMap<string, VolumeObservation>): Verdict {
  const states = m.volumeIds.map((id) => observed.get(id)?.state ?? 'unknown');
  const distinct = [...new Set(states)];
  const state = distinct.length === 1 ? distinct[0]! : distinct.join('/');
  const bad = m.volumeIds.filter((id) => {
    const s = observed.get(id)?.state;
    return s === 'error' || s === 'deleting' || s === 'deleted';
  });
  const health = { name: m.name, state, systemStatus: 'not-applicable', instanceStatus: 'not-applicable' };
  if (bad.length > 0) {
    return {
      health: { ...health, healthy: false, reason: `volume ${bad.join(', ')} is ${state}` },
      failed: true,
    };
  }
  const healthy = states.every((s) => s === 'available' || s === 'in-use');
  return { health: { ...health, healthy }, failed: false };
}

export interface HealthObservations {
  readonly instances: readonly InstanceObservation[];
  readonly volumes: readonly VolumeObservation[];
  /** Console output of instances whose machine has a bootMessage (asked once their checks pass). */
  readonly consoles?: ReadonlyMap<string, string | undefined>;
}

/** The health of the launched machines from what EC2 reports now (pure). */
export function assessHealth(
  launched: readonly LaunchResult[],
  observed: HealthObservations,
  opts: {
    startedAt: string;
    now: number;
    previous?: HealthResult | undefined;
    timeoutSeconds?: number | undefined;
  },
): HealthResult {
  const instances = new Map(observed.instances.map((o) => [o.instanceId, o]));
  const volumes = new Map(observed.volumes.map((o) => [o.volumeId, o]));
  const before = new Map((opts.previous?.machines ?? []).map((m) => [m.name, m]));
  const nowIso = new Date(opts.now).toISOString();
  const started = Date.parse(opts.startedAt);
  const timedOut = opts.timeoutSeconds !== undefined && opts.now - started > opts.timeoutSeconds * 1000;

  let anyFailed = false;
  const machines = launched.map((m): MachineHealth => {
    const v =
      m.kind === 'instance'
        ? instanceVerdict(m, instances.get(m.instanceId ?? ''), observed.consoles?.get(m.instanceId ?? ''))
        : volumeVerdict(m, volumes);
    anyFailed ||= v.failed;
    if (v.health.healthy) {
      return { ...v.health, healthyAt: before.get(m.name)?.healthyAt ?? nowIso };
    }
    if (timedOut && !v.failed) {
      const why = `not healthy ${opts.timeoutSeconds} s after the job started`;
      return { ...v.health, reason: v.health.reason ? `${why}: ${v.health.reason}` : why };
    }
    return v.health;
  });
  const healthy = machines.length > 0 && machines.every((m) => m.healthy);
  const done = healthy || anyFailed || timedOut;
  if (!healthy) return { done, healthy, machines };
  const last = Math.max(...machines.map((m) => Date.parse(m.healthyAt!)));
  return { done, healthy, machines, secondsToRunning: Math.max(0, Math.floor((last - started) / 1000)) };
}

export interface HealthDeps {
  readonly compute: Pick<RecoveryCompute, 'describeInstances' | 'describeVolumes' | 'consoleOutput'>;
  readonly clock: Pick<Clock, 'now'>;
}

/** One health poll: asks EC2 about the launched machines and assesses them. */
export async function checkHealth(
  deps: HealthDeps,
  launched: readonly LaunchResult[],
  opts: { startedAt: string; previous?: HealthResult | undefined; timeoutSeconds?: number | undefined },
): Promise<HealthResult> {
  const instanceIds = launched.flatMap((m) => (m.instanceId === undefined ? [] : [m.instanceId]));
  const volumeIds = launched.flatMap((m) => (m.kind === 'volumes' ? m.volumeIds : []));
  const [instances, volumes] = await Promise.all([
    instanceIds.length ? deps.compute.describeInstances(instanceIds) : [],
    volumeIds.length ? deps.compute.describeVolumes(volumeIds) : [],
  ]);
  // Consoles are read only where they decide something: a bootMessage, and both checks passing.
  const consoles = new Map<string, string | undefined>();
  const byId = new Map(instances.map((o) => [o.instanceId, o]));
  for (const m of launched) {
    const o = m.instanceId === undefined ? undefined : byId.get(m.instanceId);
    if (m.bootMessage === undefined || o === undefined) continue;
    if (o.state === 'running' && o.systemStatus === 'ok' && o.instanceStatus === 'ok') {
      consoles.set(o.instanceId, await deps.compute.consoleOutput(o.instanceId));
    }
  }
  return assessHealth(launched, { instances, volumes, consoles }, { ...opts, now: deps.clock.now() });
}
