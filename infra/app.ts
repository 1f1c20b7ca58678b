// The CDK app: reads the Ferry configuration (-c config=<file.json> or -c ferry=<json>), builds one
// FerryStack and runs cdk-nag's AwsSolutions checks on it, so `cdk synth` refuses an unsafe template.
import { App, Aspects } from 'aws-cdk-lib';
import { AwsSolutionsChecks } from 'cdk-nag';
import { ConfigError } from '../shared/engine/errors.ts';
import { configFromContext } from './config.ts';
import { FerryStack } from './stack.ts';

const app = new App();
try {
  const config = configFromContext((key) => app.node.tryGetContext(key));
  const stackName = (app.node.tryGetContext('stackName') as string | undefined) ?? 'Ferry';
  const stack = new FerryStack(app, stackName, {
    config,
    description: 'Ferry: block-level replication of EBS volumes into recovery checkpoints',
    env: { account: process.env.CDK_DEFAULT_ACCOUNT, region: process.env.CDK_DEFAULT_REGION },
  });
  Aspects.of(stack).add(new AwsSolutionsChecks({ verbose: true }));
  app.synth();
} catch (err) {
  if (err instanceof ConfigError) {
    // A configuration mistake is the operator's to fix: one clear line, no stack trace.
    console.error(`ferry: ${err.message}`);
    process.exit(1);
  }
  throw err;
}
