// The cycle ports' contract suites against the memory fakes the cycle logic is tested with
// (test/support/cycle-fakes.ts): a fake that passes them behaves as the DynamoDB and SQS adapters do.
import {
  MemoryCycleLedger,
  MemoryGrantFlow,
  MemoryGrantQueue,
  MemoryNodeBudget,
  MemoryPlanLocks,
} from '../support/cycle-fakes.ts';
import { cycleLedgerContract } from './cycle-ledger.ts';
import { grantChannelContract } from './grant-channel.ts';
import { grantFlowContract } from './grant-flow.ts';
import { nodeBudgetContract } from './node-budget.ts';
import { planLocksContract } from './plan-locks.ts';

// The queue's visibility runs on this clock; no contract test lets time pass.
const frozen = { now: () => 1_717_200_000_000, sleep: async () => {} };

cycleLedgerContract('memory', async () => new MemoryCycleLedger());
grantFlowContract('memory', async () => new MemoryGrantFlow());
planLocksContract('memory', async () => new MemoryPlanLocks());
nodeBudgetContract('memory', async () => new MemoryNodeBudget());
grantChannelContract('memory', async () => {
  const queue = new MemoryGrantQueue(frozen);
  return { channel: queue, receiveAll: async () => queue.receive(Number.MAX_SAFE_INTEGER) };
});
