// Turns the synthesized cycle state machine into plain ASL (the Fn::Join of tokens CDK emits, with
// Ref / Fn::GetAtt resolved to fixed fake values), so aws-local-stepfunctions can validate and run it.
import type { Template } from 'aws-cdk-lib/assertions';
import type { StateMachineDefinition } from 'aws-local-stepfunctions';

export const FAKE = { partition: 'aws', region: 'us-east-1', account: '123456789012' } as const;

/** The ARN a resource's Fn::GetAtt Arn resolves to: a Lambda ARN named after the logical id. */
export const fakeArn = (logicalId: string): string =>
  `arn:aws:lambda:${FAKE.region}:${FAKE.account}:function:${logicalId}`;

function resolveToken(value: unknown): string {
  if (typeof value === 'string') return value;
  if (value !== null && typeof value === 'object') {
    const v = value as Record<string, unknown>;
    if (typeof v.Ref === 'string') {
      if (v.Ref === 'AWS::Partition') return FAKE.partition;
      if (v.Ref === 'AWS::Region') return FAKE.region;
      if (v.Ref === 'AWS::AccountId') return FAKE.account;
      if (v.Ref === 'AWS::URLSuffix') return 'amazonaws.com';
      return v.Ref;
    }
    const getAtt = v['Fn::GetAtt'];
    if (Array.isArray(getAtt) && typeof getAtt[0] === 'string') return fakeArn(getAtt[0]);
    const join = v['Fn::Join'];
    if (Array.isArray(join) && typeof join[0] === 'string' && Array.isArray(join[1])) {
      return join[1].map(resolveToken).join(join[0]);
    }
  }
  throw new Error(`cannot resolve CloudFormation token ${JSON.stringify(value)}`);
}

/** The state machine's definition as plain JSON (the template must hold exactly one state machine). */
export function plainDefinition(template: Template): StateMachineDefinition {
  const machines = Object.values(template.findResources('AWS::StepFunctions::StateMachine'));
  if (machines.length !== 1) throw new Error(`expected one state machine, found ${machines.length}`);
  const text = resolveToken(machines[0]!.Properties.DefinitionString);
  return JSON.parse(text) as StateMachineDefinition;
}

/** Every state of a definition by name, Map item processors included. */
export function allStates(def: StateMachineDefinition): Map<string, Record<string, unknown>> {
  const out = new Map<string, Record<string, unknown>>();
  const walk = (states: Record<string, unknown>) => {
    for (const [name, state] of Object.entries(states)) {
      const s = state as Record<string, unknown>;
      out.set(name, s);
      const processor = (s.ItemProcessor ?? s.Iterator) as { States?: Record<string, unknown> } | undefined;
      if (processor?.States) walk(processor.States);
    }
  };
  walk(def.States as Record<string, unknown>);
  return out;
}
