// What each Lambda does on the state table, as IAM actions: the stack grants exactly these (no Scan,
// no deletes, no batch calls, no index), and test/functions checks them against the requests the
// handlers make on the emulators.
import type { FunctionName } from '../functions/contracts.ts';

export const TABLE_ACTIONS = {
  // prepare: plan lock (UpdateItem), set, job, cycle, disk and flow records (GetItem, PutItem), the
  // latest checkpoint (Query); tick: cycle, disk and flow reads, lock renewal, flow control and
  // advance, node reservation (GetItem, PutItem, UpdateItem), writer signals and completions (Query).
  planner: ['dynamodb:GetItem', 'dynamodb:PutItem', 'dynamodb:UpdateItem', 'dynamodb:Query'],
  // The disk record (GetItem, UpdateItem for its resume point) and descriptor pages (PutItem).
  differ: ['dynamodb:GetItem', 'dynamodb:PutItem', 'dynamodb:UpdateItem'],
  // Disk record, descriptor pages and flow (GetItem), a batch's completions (PutItem), the flow's
  // complete/advance/control, signals and a failure (UpdateItem). It never lists anything.
  'chunk-writer': ['dynamodb:GetItem', 'dynamodb:PutItem', 'dynamodb:UpdateItem'],
  // Completions and the catalog (Query), records and pages (GetItem), state changes, flows, lock,
  // reservation and job (UpdateItem), the checkpoint (PutItem).
  finalizer: ['dynamodb:GetItem', 'dynamodb:PutItem', 'dynamodb:UpdateItem', 'dynamodb:Query'],
} as const satisfies Record<FunctionName, readonly `dynamodb:${string}`[]>;
