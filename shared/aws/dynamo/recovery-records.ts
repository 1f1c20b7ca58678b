// The RecoveryRecords port on the state table: one item per recovery job (its report) and one per plan
// that was failed over. Key layout (beside schema.ts's; '#' only separates key parts, ids are
// URI-encoded):
//
//   item                     pk                 sk
//   recovery report          RECOVERIES         JOB#<jobId>
//   plan failed over         PLAN#<plan>        FAILOVER
//
// Recoveries are rare (drills weekly, failovers never, one hopes), so one partition lists them all
// with a single Query; the failover mark sits in the plan's partition beside its lock.
import { z } from 'zod';
import type { RecoveryRecords } from '../../engine/recovery/ports.ts';
import type { RecoveryReport } from '../../engine/recovery/types.ts';
import { type Client, itemKey, TableItems, withoutUndefined } from './items.ts';
import { type Key, parseItem } from './schema.ts';

const enc = (id: string): string => encodeURIComponent(id);

export const recoveryKeys = {
  report: (jobId: string): Key => ({ pk: 'RECOVERIES', sk: `JOB#${enc(jobId)}` }),
  reports: (): Key => ({ pk: 'RECOVERIES', sk: 'JOB#' }),
  failover: (plan: string): Key => ({ pk: `PLAN#${enc(plan)}`, sk: 'FAILOVER' }),
};

// Read back loosely: the report's shape is the recovery contract's; these are the fields a listing needs.
const reportItem = z.looseObject({
  jobId: z.string(),
  mode: z.string(),
  plan: z.string(),
  startedAt: z.string(),
  finishedAt: z.string(),
  outcome: z.string(),
  machines: z.array(z.unknown()),
});

export const failoverItem = z.object({
  plan: z.string(),
  jobId: z.string(),
  mode: z.string(),
  checkpointId: z.string().optional(),
  at: z.string(),
});
export type FailoverRecord = z.infer<typeof failoverItem>;

const KEY_ATTRIBUTES = new Set(['pk', 'sk']);
const withoutKeys = (item: Record<string, unknown>) =>
  Object.fromEntries(Object.entries(item).filter(([k]) => !KEY_ATTRIBUTES.has(k)));

export class DynamoRecoveryRecords implements RecoveryRecords {
  private readonly items: TableItems;

  /** `client` is the caller's (created once per Lambda); `table` is the state table. */
  constructor(
    client: Client,
    readonly table: string,
  ) {
    this.items = new TableItems(client, table);
  }

  /** Replaces the job's report: a retried record writes the same item again. */
  async put(report: RecoveryReport): Promise<void> {
    await this.items.put(recoveryKeys.report(report.jobId), withoutUndefined(report));
  }

  async markFailedOver(report: RecoveryReport): Promise<void> {
    const record: FailoverRecord = {
      plan: report.plan,
      jobId: report.jobId,
      mode: report.mode,
      checkpointId: report.checkpoint?.id,
      at: report.finishedAt,
    };
    await this.items.put(recoveryKeys.failover(report.plan), withoutUndefined(record));
  }

  async clearFailedOver(plan: string, failoverJobId: string): Promise<void> {
    // A mark that is absent or a later failover's stays as it is (the delete's condition fails).
    await this.items.delete(recoveryKeys.failover(plan), {
      ConditionExpression: 'jobId = :job',
      ExpressionAttributeValues: { ':job': failoverJobId },
    });
  }

  async get(jobId: string): Promise<RecoveryReport | undefined> {
    const key = recoveryKeys.report(jobId);
    const item = await this.items.getRaw(key);
    if (item === undefined) return undefined;
    parseItem(reportItem, item, this.table, key);
    return withoutKeys(item) as unknown as RecoveryReport;
  }

  /** Every recorded recovery (of one plan when given), oldest first. */
  async list(plan?: string): Promise<RecoveryReport[]> {
    const out: RecoveryReport[] = [];
    for (const item of await this.items.queryAll(recoveryKeys.reports())) {
      const r = parseItem(reportItem, item, this.table, itemKey(item));
      if (plan === undefined || r.plan === plan) out.push(withoutKeys(item) as unknown as RecoveryReport);
    }
    return out.sort((a, b) => a.startedAt.localeCompare(b.startedAt));
  }

  /** The plan's failover mark, if it was failed over. */
  async failedOver(plan: string): Promise<FailoverRecord | undefined> {
    return this.items.get(recoveryKeys.failover(plan), failoverItem);
  }
}
