// The base Lambda construct with the house defaults: Node 22 on ARM64, esbuild bundling (ESM, source
// maps, the SDK bundled at the version the project tests), its own role with no managed policy, its
// own log group with retention, X-Ray tracing. Each function's environment is typed from the schema
// its handler validates (functions/contracts.ts).
import { fileURLToPath } from 'node:url';
import { type Duration, RemovalPolicy } from 'aws-cdk-lib';
import * as iam from 'aws-cdk-lib/aws-iam';
import * as lambda from 'aws-cdk-lib/aws-lambda';
import * as nodejs from 'aws-cdk-lib/aws-lambda-nodejs';
import * as logs from 'aws-cdk-lib/aws-logs';
import { Construct } from 'constructs';
import type {
  FunctionEnvironment as CycleFunctionEnvironment,
  FunctionName as CycleFunctionName,
} from '../functions/contracts.ts';
import type { RecoveryEnvironment } from '../functions/recovery/contracts.ts';

/** Every Ferry function: the cycle's four (functions/contracts.ts) and recovery's. */
export type FunctionName = CycleFunctionName | 'recovery';
/** What the stack must set for a function: the input of the schema its handler validates. */
export type FunctionEnvironment<F extends FunctionName> = F extends CycleFunctionName
  ? CycleFunctionEnvironment<F>
  : RecoveryEnvironment;

/** The repository root: entries, the lock file and tsconfig are found from here, whatever the cwd. */
export const PROJECT_ROOT = fileURLToPath(new URL('..', import.meta.url));

/** Settings every function gets besides its contract: Powertools' service, namespace and level. */
export interface HouseEnvironment {
  readonly POWERTOOLS_SERVICE_NAME: string;
  readonly POWERTOOLS_METRICS_NAMESPACE: string;
  readonly POWERTOOLS_LOG_LEVEL: string;
  readonly NODE_OPTIONS: string;
}

/** Powertools' service name of a function (the handlers pass the same name). */
export const serviceNameOf = (name: FunctionName): string => `ferry-${name}`;

export interface FerryFunctionProps<F extends FunctionName> {
  /** The folder under functions/ whose handler.ts is the entry. */
  readonly name: F;
  readonly description: string;
  /** What the handler validates (functions/contracts.ts); defaults may be left out. */
  readonly environment: FunctionEnvironment<F>;
  readonly house: Omit<HouseEnvironment, 'NODE_OPTIONS' | 'POWERTOOLS_SERVICE_NAME'>;
  readonly memorySize: number;
  readonly timeout: Duration;
  readonly logRetention: logs.RetentionDays;
}

/** One Ferry Lambda: a thin handler under functions/<name>/handler.ts. */
export class FerryFunction<F extends FunctionName> extends Construct {
  readonly fn: nodejs.NodejsFunction;
  readonly role: iam.Role;
  readonly logGroup: logs.LogGroup;

  constructor(scope: Construct, id: string, props: FerryFunctionProps<F>) {
    super(scope, id);
    this.logGroup = new logs.LogGroup(this, 'Logs', {
      retention: props.logRetention,
      // Logs outlive a stack deletion: they are the record of what replicated.
      removalPolicy: RemovalPolicy.RETAIN,
    });
    // An own role without AWSLambdaBasicExecutionRole: log writes are granted on this log group only.
    this.role = new iam.Role(this, 'Role', {
      assumedBy: new iam.ServicePrincipal('lambda.amazonaws.com'),
      description: `Ferry ${props.name} function`,
    });
    this.logGroup.grantWrite(this.role);

    const environment: Record<string, string> = {
      ...props.house,
      // The name the handler gives Powertools too: it is the `service` dimension of every metric.
      POWERTOOLS_SERVICE_NAME: serviceNameOf(props.name),
      // Stack traces point into the TypeScript sources.
      NODE_OPTIONS: '--enable-source-maps',
    };
    for (const [key, value] of Object.entries(props.environment)) {
      if (value !== undefined) environment[key] = String(value);
    }

    this.fn = new nodejs.NodejsFunction(this, 'Function', {
      description: props.description,
      entry: `${PROJECT_ROOT}functions/${props.name}/handler.ts`,
      handler: 'handler',
      projectRoot: PROJECT_ROOT,
      depsLockFilePath: `${PROJECT_ROOT}package-lock.json`,
      runtime: lambda.Runtime.NODEJS_22_X,
      architecture: lambda.Architecture.ARM_64,
      memorySize: props.memorySize,
      timeout: props.timeout,
      role: this.role,
      logGroup: this.logGroup,
      tracing: lambda.Tracing.ACTIVE,
      environment,
      bundling: {
        format: nodejs.OutputFormat.ESM,
        target: 'node22',
        mainFields: ['module', 'main'],
        // Some dependencies are CommonJS and call require(): give the ESM bundle one.
        banner:
          "import { createRequire as ferryCreateRequire } from 'node:module'; const require = ferryCreateRequire(import.meta.url);",
        sourceMap: true,
        sourcesContent: false,
        minify: true,
        // Bundle the AWS SDK too: the functions run the versions the project pins and tests, not
        // whatever the runtime ships.
        externalModules: [],
        tsconfig: `${PROJECT_ROOT}tsconfig.json`,
      },
    });
  }
}
