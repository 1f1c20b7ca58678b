// The EC2 adapter (shared/aws/ec2) against a real moto_server: the RecoveryCompute contract suite,
// run over @aws-sdk/client-ec2. moto gaps, covered by test/aws/ec2-requests.test.ts instead: it
// ignores RegisterImage's block-device mappings and TagSpecifications, and RunInstances' and
// CreateVolume's ClientToken (the engine's tag lookup is what makes a retried launch idempotent here).
import {
  CreateSnapshotCommand,
  CreateVolumeCommand,
  DescribeSecurityGroupsCommand,
  DescribeSubnetsCommand,
  EC2Client,
} from '@aws-sdk/client-ec2';
import { afterAll, beforeAll } from 'vitest';
import { Ec2RecoveryCompute } from '../../shared/aws/ec2/compute.ts';
import { computeContract } from '../engine/recovery/compute-contract.ts';
import { type Moto, startMoto } from '../support/moto.ts';

let moto: Moto;
let ec2: EC2Client;

beforeAll(async () => {
  moto = await startMoto();
  ec2 = new EC2Client(moto.clientConfig);
});
afterAll(async () => {
  ec2?.destroy();
  await moto?.stop();
});

computeContract('EC2 on moto_server', async () => {
  await moto.reset();
  return {
    compute: new Ec2RecoveryCompute(ec2),
    snapshot: async (sizeGiB, tags = {}) => {
      const vol = await ec2.send(new CreateVolumeCommand({ AvailabilityZone: 'us-east-1a', Size: sizeGiB }));
      const snap = await ec2.send(
        new CreateSnapshotCommand({
          VolumeId: vol.VolumeId!,
          TagSpecifications: [
            { ResourceType: 'snapshot', Tags: Object.entries(tags).map(([Key, Value]) => ({ Key, Value })) },
          ],
        }),
      );
      return snap.SnapshotId!;
    },
    network: async () => {
      const subnets = await ec2.send(new DescribeSubnetsCommand({}));
      const subnet = subnets.Subnets!.find((s) => s.AvailabilityZone === 'us-east-1a')!;
      const groups = await ec2.send(
        new DescribeSecurityGroupsCommand({ Filters: [{ Name: 'vpc-id', Values: [subnet.VpcId!] }] }),
      );
      return {
        subnetId: subnet.SubnetId!,
        availabilityZone: 'us-east-1a',
        groupId: groups.SecurityGroups![0]!.GroupId!,
      };
    },
    // moto's instances run with passing status checks as soon as they are launched.
    boot: async () => undefined,
  };
});
