// Synthesizes FerryStack as `cdk synth` would (cdk.json's feature flags, bundling skipped) and reads
// back what a local run of the deployment needs: the cycle state machine as plain ASL, each Lambda's
// environment, timeout and handler, the grant queue's event source mapping and the queue's settings.
// The local run is configured from this template, so it runs what `cdk deploy` would deploy.
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { App } from 'aws-cdk-lib';
import type { StateMachineDefinition } from 'aws-local-stepfunctions';
import type { FunctionName } from '../functions/contracts.ts';
import { type FerryConfigInput, parseFerryConfig } from '../infra/config.ts';
import { PROJECT_ROOT } from '../infra/function.ts';
import { FerryStack } from '../infra/stack.ts';
import { FAKE, fakeArn, machineFromTemplate, type TemplateJson } from './asl.ts';

type Resource = TemplateJson['Resources'][string];

/** One Lambda of the template. */
export interface DeployedFunction {
  readonly logicalId: string;
  /** The folder under functions/ (from its POWERTOOLS_SERVICE_NAME, ferry-<name>). */
  readonly name: FunctionName;
  /** Its environment as deployed; values that are references name their resource (see resolveEnvironment). */
  readonly environment: Readonly<Record<string, unknown>>;
  readonly timeoutSeconds: number;
  readonly memoryMb: number;
}

/** The SQS event source mapping that feeds the chunk-writer. */
export interface DeployedEventSource {
  readonly functionLogicalId: string;
  readonly batchSize: number;
  readonly reportBatchItemFailures: boolean;
  /** The most concurrent invocations (ScalingConfig.MaximumConcurrency), if set. */
  readonly maximumConcurrency: number | undefined;
}

export interface DeployedStack {
  readonly stackName: string;
  readonly template: TemplateJson;
  readonly definition: StateMachineDefinition;
  readonly stateMachineName: string;
  readonly functions: readonly DeployedFunction[];
  readonly eventSource: DeployedEventSource;
  /** The grant queue's settings. */
  readonly queue: { readonly visibilityTimeoutSeconds: number; readonly maxReceiveCount: number };
  /** The state table's TTL attribute. */
  readonly ttlAttribute: string | undefined;
}

/** The configuration a local run synthesizes with when none is given: no schedules, defaults. */
export const LOCAL_CONFIG: FerryConfigInput = { plans: [] };

/** The feature flags `cdk synth` runs with (cdk.json), without its default configuration file. */
function cdkFlags(): Record<string, unknown> {
  const cdk = JSON.parse(readFileSync(join(PROJECT_ROOT, 'cdk.json'), 'utf8')) as {
    context?: Record<string, unknown>;
  };
  const { config: _ignored, ...flags } = cdk.context ?? {};
  return flags;
}

/**
 * Synthesizes the stack with bundling skipped (the handlers run in-process, from source) into a
 * temporary cloud assembly, removed again, and returns its template.
 */
export function synthesizeTemplate(
  config: FerryConfigInput = LOCAL_CONFIG,
  stackName = 'FerryLocal',
): TemplateJson {
  const outdir = mkdtempSync(join(tmpdir(), 'ferry-synth-'));
  try {
    const app = new App({ outdir, context: { ...cdkFlags(), 'aws:cdk:bundling-stacks': [] } });
    const stack = new FerryStack(app, stackName, { config: parseFerryConfig(config) });
    return app.synth().getStackArtifact(stack.artifactId).template as TemplateJson;
  } finally {
    rmSync(outdir, { recursive: true, force: true });
  }
}

const FUNCTION_NAMES: readonly FunctionName[] = ['planner', 'differ', 'chunk-writer', 'finalizer'];

/** The recovery function (functions/recovery): run by local-cloud/recovery.ts, not by the cycle's run. */
const RECOVERY_SERVICE = 'ferry-recovery';

function functionNameOf(logicalId: string, env: Record<string, unknown>): FunctionName {
  const service = env.POWERTOOLS_SERVICE_NAME;
  const name = typeof service === 'string' ? service.replace(/^ferry-/, '') : '';
  const known = FUNCTION_NAMES.find((n) => n === name);
  if (known === undefined) {
    throw new Error(`Lambda ${logicalId} has no known POWERTOOLS_SERVICE_NAME (${String(service)})`);
  }
  return known;
}

/** What a local run needs from a synthesized template. */
export function readDeployment(template: TemplateJson, stackName: string): DeployedStack {
  const entries = Object.entries(template.Resources);
  const ofType = (type: string) => entries.filter(([, r]) => r.Type === type);
  const props = (r: Resource) => r.Properties ?? {};

  const environmentOf = (r: Resource) =>
    ((props(r).Environment as { Variables?: Record<string, unknown> } | undefined)?.Variables ??
      {}) as Record<string, unknown>;
  const cycleFunctions = ofType('AWS::Lambda::Function').filter(
    ([, r]) => environmentOf(r).POWERTOOLS_SERVICE_NAME !== RECOVERY_SERVICE,
  );
  const functions = cycleFunctions.map(([logicalId, r]): DeployedFunction => {
    const environment = environmentOf(r);
    return {
      logicalId,
      name: functionNameOf(logicalId, environment),
      environment,
      timeoutSeconds: Number(props(r).Timeout ?? 3),
      memoryMb: Number(props(r).MemorySize ?? 128),
    };
  });

  const mappings = ofType('AWS::Lambda::EventSourceMapping');
  if (mappings.length !== 1) throw new Error(`expected one event source mapping, found ${mappings.length}`);
  const mapping = props(mappings[0]![1]);
  const target = (mapping.FunctionName as { Ref?: string } | undefined)?.Ref;
  if (target === undefined) throw new Error('the event source mapping names no function by Ref');
  const eventSource: DeployedEventSource = {
    functionLogicalId: target,
    batchSize: Number(mapping.BatchSize ?? 10),
    reportBatchItemFailures: ((mapping.FunctionResponseTypes as string[] | undefined) ?? []).includes(
      'ReportBatchItemFailures',
    ),
    maximumConcurrency: (mapping.ScalingConfig as { MaximumConcurrency?: number } | undefined)
      ?.MaximumConcurrency,
  };

  // The grant queue is the one the mapping reads (Fn::GetAtt [queue, Arn]).
  const sourceArn = mapping.EventSourceArn as { 'Fn::GetAtt'?: [string, string] } | undefined;
  const queueId = sourceArn?.['Fn::GetAtt']?.[0];
  const queue = queueId === undefined ? undefined : template.Resources[queueId];
  if (queue === undefined) throw new Error('the event source mapping reads no queue of this template');
  const redrive = props(queue).RedrivePolicy as { maxReceiveCount?: number } | undefined;

  // The cycle machine (the Recovery machine beside it is local-cloud/recovery.ts's).
  const cycle = machineFromTemplate(template, 'cycle');
  const [table] = ofType('AWS::DynamoDB::Table');
  const ttl = table === undefined ? undefined : props(table[1]).TimeToLiveSpecification;
  return {
    stackName,
    template,
    definition: cycle.definition,
    stateMachineName: cycle.stateMachineName,
    functions,
    eventSource,
    queue: {
      visibilityTimeoutSeconds: Number(props(queue).VisibilityTimeout ?? 30),
      maxReceiveCount: Number(redrive?.maxReceiveCount ?? 5),
    },
    ttlAttribute: (ttl as { AttributeName?: string; Enabled?: boolean } | undefined)?.Enabled
      ? (ttl as { AttributeName?: string }).AttributeName
      : undefined,
  };
}

/** Synthesizes and reads the deployment in one go (about two seconds). */
export function synthesizeDeployment(config: FerryConfigInput = LOCAL_CONFIG, stackName = 'FerryLocal') {
  return readDeployment(synthesizeTemplate(config, stackName), stackName);
}

/** Where the deployed stack's resources are in the local cloud. */
export interface LocalResources {
  readonly tableName: string;
  readonly queueUrl: string;
  readonly eventBusName: string;
}

/**
 * A function's deployed environment with every reference replaced by its local counterpart: the
 * table's and queue's Ref by the local table name and queue URL, the event bus by the local bus, a
 * KMS key's Arn by a well-formed key ARN named after the key. Anything else unresolved is refused.
 */
export function resolveEnvironment(
  deployment: DeployedStack,
  fn: DeployedFunction,
  local: LocalResources,
): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [key, value] of Object.entries(fn.environment)) {
    out[key] = resolveReference(deployment.template, value, local, `${fn.name} ${key}`);
  }
  return out;
}

function resolveReference(
  template: TemplateJson,
  value: unknown,
  local: LocalResources,
  what: string,
): string {
  if (typeof value === 'string' || typeof value === 'number') return String(value);
  const v = (value ?? {}) as Record<string, unknown>;
  const ref = typeof v.Ref === 'string' ? v.Ref : undefined;
  const getAtt = Array.isArray(v['Fn::GetAtt']) ? (v['Fn::GetAtt'] as string[]) : undefined;
  const id = ref ?? getAtt?.[0];
  const type = id === undefined ? undefined : template.Resources[id]?.Type;
  if (ref !== undefined && type === 'AWS::DynamoDB::Table') return local.tableName;
  if (ref !== undefined && type === 'AWS::SQS::Queue') return local.queueUrl;
  if (ref !== undefined && type === 'AWS::Events::EventBus') return local.eventBusName;
  if (getAtt?.[1] === 'Arn' && type === 'AWS::KMS::Key') {
    return `arn:${FAKE.partition}:kms:${FAKE.region}:${FAKE.account}:key/${id}`;
  }
  if (getAtt?.[1] === 'Arn' && type === 'AWS::Lambda::Function') return fakeArn(id!);
  throw new Error(`no local value for ${what}: ${JSON.stringify(value)}`);
}
