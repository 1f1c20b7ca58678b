// The PlanSchedules port on EventBridge Scheduler: a failover or migration pauses its plan's cycle
// schedule (State DISABLED), so no cycle starts against a source that failed or was cut over.
import {
  GetScheduleCommand,
  type GetScheduleCommandOutput,
  type SchedulerClient,
  UpdateScheduleCommand,
} from '@aws-sdk/client-scheduler';
import { CloudRequestError } from '../../engine/recovery/errors.ts';
import { planScheduleName } from '../../engine/recovery/names.ts';
import type { PlanSchedules } from '../../engine/recovery/ports.ts';
import type { PauseResult } from '../../engine/recovery/types.ts';

// Asking again can help: throttling, the service itself, and a concurrent update of the schedule.
const RETRYABLE = new Set(['ThrottlingException', 'InternalServerException', 'ConflictException']);

function schedulerError(what: string, err: unknown): CloudRequestError {
  const e = err as { name?: string; message?: string; $metadata?: { httpStatusCode?: number } };
  const status = e?.$metadata?.httpStatusCode;
  const retryable = RETRYABLE.has(e?.name ?? '') || status === undefined || status >= 500;
  return new CloudRequestError(
    `EventBridge Scheduler ${what} failed: ${e?.name ?? 'error'}: ${e?.message ?? err}`,
    {
      retryable,
      code: e?.name,
      cause: err,
    },
  );
}

export class SchedulerPlanSchedules implements PlanSchedules {
  /** `client` is the caller's; `group` is the stack's plans schedule group (SCHEDULE_GROUP). */
  constructor(
    private readonly client: SchedulerClient,
    readonly group: string,
  ) {}

  /**
   * Disables the plan's schedule; idempotent (a disabled schedule is left as it is). UpdateSchedule
   * replaces the whole schedule, so every setting GetSchedule returned is sent back unchanged.
   * A plan without a schedule answers `found: false`: nothing can start its cycles.
   */
  async pause(plan: string): Promise<PauseResult> {
    const name = planScheduleName(plan);
    const where = `schedule ${name} in group ${this.group}`;
    let current: GetScheduleCommandOutput;
    try {
      current = await this.client.send(new GetScheduleCommand({ Name: name, GroupName: this.group }));
    } catch (err) {
      if ((err as { name?: string })?.name === 'ResourceNotFoundException') {
        return { schedule: name, group: this.group, found: false, wasEnabled: false };
      }
      throw schedulerError(`GetSchedule (${where})`, err);
    }
    if (current.State === 'DISABLED')
      return { schedule: name, group: this.group, found: true, wasEnabled: false };
    try {
      await this.client.send(
        new UpdateScheduleCommand({
          Name: name,
          GroupName: this.group,
          ScheduleExpression: current.ScheduleExpression,
          ScheduleExpressionTimezone: current.ScheduleExpressionTimezone,
          StartDate: current.StartDate,
          EndDate: current.EndDate,
          Description: current.Description,
          KmsKeyArn: current.KmsKeyArn,
          Target: current.Target,
          FlexibleTimeWindow: current.FlexibleTimeWindow,
          ActionAfterCompletion: current.ActionAfterCompletion,
          State: 'DISABLED',
        }),
      );
    } catch (err) {
      throw schedulerError(`UpdateSchedule (${where})`, err);
    }
    return { schedule: name, group: this.group, found: true, wasEnabled: true };
  }
}
