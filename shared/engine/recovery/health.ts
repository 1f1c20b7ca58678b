// health: is every launched machine up? An instance is healthy when it runs and both EC2 status
// checks (system: the host; instance: the guest's network answers) pass, which is as close to "it
// booted" as the cloud can tell without logging in. Volumes are healthy when available. The state
// machine polls this with a Wait in between; each poll is given the previous answer, so a machine's
// first healthy time survives across polls and the achieved RTO is measured to it.
import type { Clock } from '../ports.ts';
import type { InstanceObservation, RecoveryCompute, VolumeObservation } from './ports.ts';
import type { HealthResult, LaunchResult, MachineHealth } from './types.ts';

// An instance in one of these will not become healthy without an operator.
const GONE = new Set(['shutting-down', 'terminated', 'stopping', 'stopped']);

type Verdict = { health: MachineHealth; failed: boolean };

function instanceVerdict(m: LaunchResult, o: InstanceObservation | undefined): Verdict {
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
  const healthy = o.state === 'running' && o.systemStatus === 'ok' && o.instanceStatus === 'ok';
  return { health: { ...health, healthy }, failed: false };
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
        ? instanceVerdict(m, instances.get(m.instanceId ?? ''))
        : volumeVerdict(m, volumes);
    anyFailed ||= v.failed;
    if (v.health.healthy) {
      return { ...v.health, healthyAt: before.get(m.name)?.healthyAt ?? nowIso };
    }
    if (timedOut && !v.failed) {
      return { ...v.health, reason: `not healthy ${opts.timeoutSeconds} s after the job started` };
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
  readonly compute: Pick<RecoveryCompute, 'describeInstances' | 'describeVolumes'>;
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
  return assessHealth(launched, { instances, volumes }, { ...opts, now: deps.clock.now() });
}
