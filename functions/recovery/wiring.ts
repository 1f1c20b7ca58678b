// Builds the recovery function's dependencies from its parsed environment and the clients given: the
// handler calls this once per container with the container's SDK clients, the tests with clients
// pointed at emulators. Nothing here holds a rule; it only connects adapters to the recovery's ports.
import type { DynamoDBClient } from '@aws-sdk/client-dynamodb';
import type { EC2Client } from '@aws-sdk/client-ec2';
import type { SchedulerClient } from '@aws-sdk/client-scheduler';
import type { DynamoDBDocumentClient } from '@aws-sdk/lib-dynamodb';
import { DynamoRecoveryRecords } from '../../shared/aws/dynamo/recovery-records.ts';
import { DynamoStateStore } from '../../shared/aws/dynamo/state-store.ts';
import { Ec2RecoveryCompute } from '../../shared/aws/ec2/compute.ts';
import { SchedulerPlanSchedules } from '../../shared/aws/scheduler/plan-schedules.ts';
import type { Log } from '../../shared/engine/cycle/ports.ts';
import type { Clock } from '../../shared/engine/ports.ts';
import type {
  FailoverRecords,
  PlanSchedules,
  RecoveryCompute,
  RecoveryRecords,
} from '../../shared/engine/recovery/ports.ts';
import type { PlanRecoveryDefaults } from '../../shared/engine/recovery/types.ts';
import { systemClock } from '../../shared/runtime/clock.ts';
import type { RecoveryEnv } from './contracts.ts';

export interface RecoveryWiring {
  readonly dynamo: DynamoDBClient | DynamoDBDocumentClient;
  readonly ec2: EC2Client;
  readonly scheduler: SchedulerClient;
  readonly clock?: Pick<Clock, 'now'>;
  readonly log: Log;
}

export interface RecoveryDeps {
  readonly catalog: Pick<DynamoStateStore, 'listCheckpoints'>;
  readonly compute: RecoveryCompute;
  readonly schedules: PlanSchedules;
  readonly records: RecoveryRecords & FailoverRecords;
  readonly clock: Pick<Clock, 'now'>;
  readonly log: Log;
  /** The plan's recovery defaults (RECOVERY_DEFAULTS), if it has any. */
  defaultsOf(plan: string): PlanRecoveryDefaults | undefined;
  readonly kmsKeyArn: string | undefined;
}

export function recoveryDeps(w: RecoveryWiring, env: RecoveryEnv): RecoveryDeps {
  const defaults = env.RECOVERY_DEFAULTS;
  return {
    catalog: new DynamoStateStore(w.dynamo, env.TABLE_NAME),
    compute: new Ec2RecoveryCompute(w.ec2),
    schedules: new SchedulerPlanSchedules(w.scheduler, env.SCHEDULE_GROUP),
    records: new DynamoRecoveryRecords(w.dynamo, env.TABLE_NAME),
    clock: w.clock ?? systemClock,
    log: w.log,
    defaultsOf: (plan) => (Object.hasOwn(defaults, plan) ? defaults[plan] : undefined),
    kmsKeyArn: env.RECOVERY_KMS_KEY_ARN,
  };
}
