// The EC2 adapter's requests where moto cannot show them, with aws-sdk-client-mock: RegisterImage's
// block-device mappings and tags (moto ignores both), the client tokens and encryption of RunInstances
// and CreateVolume (moto ignores the tokens), a duplicate image name raced by a retry, and the
// translation of EC2's errors (retryable, permanent, already gone) and impaired status checks.
import {
  CreateTagsCommand,
  CreateVolumeCommand,
  DeleteSnapshotCommand,
  DeleteVolumeCommand,
  DeregisterImageCommand,
  DescribeImagesCommand,
  DescribeInstanceStatusCommand,
  DescribeInstancesCommand,
  EC2Client,
  EC2ServiceException,
  GetConsoleOutputCommand,
  RegisterImageCommand,
  RunInstancesCommand,
  TerminateInstancesCommand,
} from '@aws-sdk/client-ec2';
import { mockClient } from 'aws-sdk-client-mock';
import { afterEach, describe, expect, it } from 'vitest';
import { Ec2RecoveryCompute } from '../../shared/aws/ec2/compute.ts';
import { CloudRequestError } from '../../shared/engine/recovery/errors.ts';
import { planInstanceLaunch, planVolumeLaunch } from '../../shared/engine/recovery/launch.ts';
import type { ResolvedMachine } from '../../shared/engine/recovery/types.ts';
import { startMoto } from '../support/moto.ts';

const ec2 = mockClient(EC2Client);
afterEach(() => ec2.reset());

const KMS = 'arn:aws:kms:us-east-1:123456789012:key/11111111-2222-3333-4444-555555555555';
const app: ResolvedMachine = {
  name: 'app',
  kind: 'instance',
  bootDisk: 'root',
  dataDisks: ['data'],
  instanceType: 'm5.large',
  subnetId: 'subnet-0000000000000000a',
  securityGroupIds: ['sg-0000000000000000a'],
  architecture: 'x86_64',
  bootMode: 'uefi',
  ena: true,
  platform: 'linux',
  disks: [
    { disk: 'root', snapshotId: 'snap-0000000000000000a', sizeGiB: 8, deviceName: '/dev/xvda' },
    { disk: 'data', snapshotId: 'snap-0000000000000000b', sizeGiB: 100, deviceName: '/dev/sdf' },
  ],
};

const ec2Error = (code: string, status: number) =>
  new EC2ServiceException({
    name: code,
    $fault: status >= 500 ? 'server' : 'client',
    $metadata: { httpStatusCode: status },
    message: `${code} happened`,
  });

describe('EC2 requests', () => {
  it('RegisterImage: HVM from the boot snapshot with data disks as mappings, tags on the image only', async () => {
    // Prepare
    ec2.on(DescribeImagesCommand).resolves({ Images: [] });
    ec2.on(RegisterImageCommand).resolves({ ImageId: 'ami-0000000000000000a' });
    ec2.on(CreateTagsCommand).resolves({});
    const plan = planInstanceLaunch({ jobId: 'drill-1', mode: 'drill', plan: 'erp' }, app);
    // Act
    const id = await new Ec2RecoveryCompute(new EC2Client({})).registerImage(plan.image);
    // Assess
    expect(id).toBe('ami-0000000000000000a');
    const input = ec2.commandCalls(RegisterImageCommand)[0]!.args[0].input;
    expect(input).toMatchObject({
      Name: 'ferry drill-1/app',
      Architecture: 'x86_64',
      BootMode: 'uefi',
      EnaSupport: true,
      VirtualizationType: 'hvm',
      RootDeviceName: '/dev/xvda',
      BlockDeviceMappings: [
        {
          DeviceName: '/dev/xvda',
          Ebs: {
            SnapshotId: 'snap-0000000000000000a',
            VolumeSize: 8,
            VolumeType: 'gp3',
            DeleteOnTermination: true,
          },
        },
        {
          DeviceName: '/dev/sdf',
          Ebs: {
            SnapshotId: 'snap-0000000000000000b',
            VolumeSize: 100,
            VolumeType: 'gp3',
            DeleteOnTermination: true,
          },
        },
      ],
    });
    // EC2 refuses encryption settings on a mapping from a snapshot.
    for (const m of input.BlockDeviceMappings!) {
      expect(m.Ebs).not.toHaveProperty('Encrypted');
      expect(m.Ebs).not.toHaveProperty('KmsKeyId');
    }
    expect(input.TagSpecifications!.map((t) => t.ResourceType)).toEqual(['image']);
    expect(input.TagSpecifications![0]!.Tags).toContainEqual({ Key: 'ferry:recovery-job', Value: 'drill-1' });
    expect(ec2.commandCalls(CreateTagsCommand)[0]!.args[0].input.Resources).toEqual([
      'ami-0000000000000000a',
    ]);
  });

  it('RegisterImage raced by a retry: the duplicate name answers the image registered first', async () => {
    ec2
      .on(DescribeImagesCommand)
      .resolvesOnce({ Images: [] })
      .resolves({ Images: [{ ImageId: 'ami-0000000000000000c', State: 'available' }] });
    ec2.on(RegisterImageCommand).rejects(ec2Error('InvalidAMIName.Duplicate', 400));
    const plan = planInstanceLaunch({ jobId: 'drill-1', mode: 'drill' }, app);
    expect(await new Ec2RecoveryCompute(new EC2Client({})).registerImage(plan.image)).toBe(
      'ami-0000000000000000c',
    );
  });

  it('RunInstances: the client token, every volume encrypted with the key, IMDSv2, tags on instance and volumes', async () => {
    ec2.on(RunInstancesCommand).resolves({ Instances: [{ InstanceId: 'i-0000000000000000a' }] });
    const plan = planInstanceLaunch({ jobId: 'fo-1', mode: 'failover', kmsKeyArn: KMS }, app);
    const id = await new Ec2RecoveryCompute(new EC2Client({})).runInstance({
      ...plan.instance,
      imageId: 'ami-0000000000000000a',
    });
    expect(id).toBe('i-0000000000000000a');
    const input = ec2.commandCalls(RunInstancesCommand)[0]!.args[0].input;
    expect(input).toMatchObject({
      ImageId: 'ami-0000000000000000a',
      InstanceType: 'm5.large',
      MinCount: 1,
      MaxCount: 1,
      SubnetId: 'subnet-0000000000000000a',
      SecurityGroupIds: ['sg-0000000000000000a'],
      ClientToken: plan.instance.clientToken,
      MetadataOptions: { HttpTokens: 'required' },
    });
    expect(input.BlockDeviceMappings).toEqual([
      {
        DeviceName: '/dev/xvda',
        Ebs: { VolumeSize: 8, VolumeType: 'gp3', DeleteOnTermination: false, Encrypted: true, KmsKeyId: KMS },
      },
      {
        DeviceName: '/dev/sdf',
        Ebs: {
          VolumeSize: 100,
          VolumeType: 'gp3',
          DeleteOnTermination: false,
          Encrypted: true,
          KmsKeyId: KMS,
        },
      },
    ]);
    expect(input.TagSpecifications!.map((t) => t.ResourceType)).toEqual(['instance', 'volume']);
  });

  it('CreateVolume: from the snapshot, encrypted, with its client token', async () => {
    ec2.on(CreateVolumeCommand).resolves({ VolumeId: 'vol-0000000000000000a' });
    const files: ResolvedMachine = {
      name: 'files',
      kind: 'volumes',
      availabilityZone: 'us-east-1a',
      architecture: 'x86_64',
      ena: false,
      platform: 'linux',
      disks: [{ disk: 'logs', snapshotId: 'snap-0000000000000000c', sizeGiB: 4, deviceName: '/dev/sdf' }],
    };
    const [spec] = planVolumeLaunch({ jobId: 'fo-1', mode: 'failover', kmsKeyArn: KMS }, files);
    await new Ec2RecoveryCompute(new EC2Client({})).createVolume(spec!);
    expect(ec2.commandCalls(CreateVolumeCommand)[0]!.args[0].input).toMatchObject({
      AvailabilityZone: 'us-east-1a',
      SnapshotId: 'snap-0000000000000000c',
      Size: 4,
      Encrypted: true,
      KmsKeyId: KMS,
      ClientToken: spec!.clientToken,
    });
  });
});

describe('EC2 console output', () => {
  it('asks for the latest output, falls back to the buffered one where EC2 has no latest, and decodes it', async () => {
    const compute = new Ec2RecoveryCompute(new EC2Client({ maxAttempts: 1 }));
    const text = 'web-1 login: ';
    ec2
      .on(GetConsoleOutputCommand, { InstanceId: 'i-0000000000000000a', Latest: true })
      .resolves({ Output: Buffer.from(text).toString('base64') });
    expect(await compute.consoleOutput('i-0000000000000000a')).toBe(text);
    ec2
      .on(GetConsoleOutputCommand, { InstanceId: 'i-0000000000000000b', Latest: true })
      .rejects(ec2Error('UnsupportedOperation', 400))
      .on(GetConsoleOutputCommand, { InstanceId: 'i-0000000000000000b', Latest: false })
      .resolves({ Output: Buffer.from('buffered').toString('base64') });
    expect(await compute.consoleOutput('i-0000000000000000b')).toBe('buffered');
    // Nothing yet, or an instance EC2 does not know: no output.
    ec2.on(GetConsoleOutputCommand, { InstanceId: 'i-0000000000000000c' }).resolves({});
    expect(await compute.consoleOutput('i-0000000000000000c')).toBeUndefined();
    ec2
      .on(GetConsoleOutputCommand, { InstanceId: 'i-0000000000000000d' })
      .rejects(ec2Error('InvalidInstanceID.NotFound', 400));
    expect(await compute.consoleOutput('i-0000000000000000d')).toBeUndefined();
  });
});

describe('EC2 errors', () => {
  it('throttling and capacity are retryable, a permission is not; both name the request and the code', async () => {
    const compute = new Ec2RecoveryCompute(new EC2Client({ maxAttempts: 1 }));
    const plan = planInstanceLaunch({ jobId: 'j', mode: 'drill' }, app);
    const spec = { ...plan.instance, imageId: 'ami-0000000000000000a' };
    for (const [code, status, name] of [
      ['RequestLimitExceeded', 503, 'CloudRetryableError'],
      ['InsufficientInstanceCapacity', 500, 'CloudRetryableError'],
      ['UnauthorizedOperation', 403, 'CloudRequestError'],
      ['InvalidParameterCombination', 400, 'CloudRequestError'],
    ] as const) {
      ec2.on(RunInstancesCommand).rejects(ec2Error(code, status));
      const err = await compute.runInstance(spec).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(CloudRequestError);
      expect((err as CloudRequestError).name, code).toBe(name);
      expect((err as CloudRequestError).code).toBe(code);
      expect((err as Error).message).toBe(
        `EC2 RunInstances for machine app failed: ${code}: ${code} happened`,
      );
      ec2.reset();
    }
  });

  it('teardown treats "already gone" as done', async () => {
    ec2.on(TerminateInstancesCommand).rejects(ec2Error('InvalidInstanceID.NotFound', 400));
    ec2.on(DeregisterImageCommand).rejects(ec2Error('InvalidAMIID.NotFound', 400));
    ec2.on(DeleteVolumeCommand).rejects(ec2Error('InvalidVolume.NotFound', 400));
    ec2.on(DeleteSnapshotCommand).rejects(ec2Error('InvalidSnapshot.NotFound', 400));
    const compute = new Ec2RecoveryCompute(new EC2Client({}));
    await compute.terminateInstances(['i-0000000000000000a']);
    await compute.deregisterImage('ami-0000000000000000a');
    await compute.deleteVolume('vol-0000000000000000a');
    await compute.deleteSnapshot('snap-0000000000000000a');
    ec2.on(DeleteSnapshotCommand).rejects(ec2Error('InvalidSnapshot.InUse', 400));
    await expect(compute.deleteSnapshot('snap-0000000000000000a')).rejects.toMatchObject({
      name: 'CloudRetryableError',
    });
  });

  it('an impaired status check and a state reason reach the observation', async () => {
    ec2.on(DescribeInstancesCommand).resolves({
      Reservations: [
        {
          Instances: [
            {
              InstanceId: 'i-0000000000000000a',
              State: { Name: 'running' },
              BlockDeviceMappings: [
                { DeviceName: '/dev/xvda', Ebs: { VolumeId: 'vol-0000000000000000a' } },
                { DeviceName: '/dev/sdf', Ebs: { VolumeId: 'vol-0000000000000000b' } },
                // Not yet attached: no volume to name.
                { DeviceName: '/dev/sdg' },
              ],
            },
            {
              InstanceId: 'i-0000000000000000b',
              State: { Name: 'terminated' },
              StateReason: { Message: 'Server.InternalError: Internal error on launch' },
            },
          ],
        },
      ],
    });
    ec2.on(DescribeInstanceStatusCommand).resolves({
      InstanceStatuses: [
        {
          InstanceId: 'i-0000000000000000a',
          SystemStatus: { Status: 'ok' },
          InstanceStatus: { Status: 'impaired' },
        },
      ],
    });
    const seen = await new Ec2RecoveryCompute(new EC2Client({})).describeInstances([
      'i-0000000000000000a',
      'i-0000000000000000b',
    ]);
    expect(seen).toEqual([
      {
        instanceId: 'i-0000000000000000a',
        state: 'running',
        systemStatus: 'ok',
        instanceStatus: 'impaired',
        stateReason: undefined,
        volumes: [
          { deviceName: '/dev/xvda', volumeId: 'vol-0000000000000000a' },
          { deviceName: '/dev/sdf', volumeId: 'vol-0000000000000000b' },
        ],
      },
      {
        instanceId: 'i-0000000000000000b',
        state: 'terminated',
        systemStatus: 'unknown',
        instanceStatus: 'unknown',
        stateReason: 'Server.InternalError: Internal error on launch',
        volumes: [],
      },
    ]);
  });
});

describe('moto_server missing', () => {
  it('the EC2 tests fail with the command that installs it', async () => {
    const saved = process.env.MOTO_SERVER;
    process.env.MOTO_SERVER = '/nonexistent/moto_server';
    try {
      await expect(startMoto()).rejects.toThrow(
        "moto_server is not installed (the EC2 and Scheduler tests need it): pip install 'moto[server]'",
      );
    } finally {
      if (saved === undefined) delete process.env.MOTO_SERVER;
      else process.env.MOTO_SERVER = saved;
    }
  });
});
