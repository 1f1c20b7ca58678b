// The RecoveryCompute contract against the in-memory fake the engine tests use.
import { computeContract } from './compute-contract.ts';
import { FakeCompute } from './fake-compute.ts';

computeContract('in-memory fake', async () => {
  const compute = new FakeCompute();
  return {
    compute,
    snapshot: async (sizeGiB, tags) => compute.addSnapshot(sizeGiB, tags),
    network: async () => {
      const subnetId = compute.addSubnet('vpc-0000000000000000a', 'us-east-1a');
      return { subnetId, availabilityZone: 'us-east-1a', groupId: compute.addGroup('vpc-0000000000000000a') };
    },
    boot: async () => compute.boot(),
  };
});
