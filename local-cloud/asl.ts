// Turns the synthesized cycle state machine into plain ASL that aws-local-stepfunctions can validate
// and run: CDK emits the definition as an Fn::Join of tokens; Ref / Fn::GetAtt are resolved here to
// fixed fake values (a Lambda's ARN is named after its logical id, so a task state leads back to its
// function in the template). Its Wait loops are found here too, to tell a cycle's ticks and polls from
// its fixed path.
import type { StateMachineDefinition } from 'aws-local-stepfunctions';

export const FAKE = { partition: 'aws', region: 'us-east-1', account: '123456789012' } as const;

/** The ARN a resource's Fn::GetAtt Arn resolves to: a Lambda ARN named after the logical id. */
export const fakeArn = (logicalId: string): string =>
  `arn:aws:lambda:${FAKE.region}:${FAKE.account}:function:${logicalId}`;

/** The logical id a fakeArn names, or undefined for any other resource string. */
export function logicalIdOfFakeArn(arn: string): string | undefined {
  const prefix = `arn:aws:lambda:${FAKE.region}:${FAKE.account}:function:`;
  return arn.startsWith(prefix) ? arn.slice(prefix.length) : undefined;
}

/** A CloudFormation template as JSON (what `Template.toJSON()` or a cloud assembly gives). */
export interface TemplateJson {
  readonly Resources: Record<string, { Type: string; Properties?: Record<string, unknown> }>;
}

/** A string, Ref, Fn::GetAtt or Fn::Join resolved to its plain (fake) value. */
export function resolveToken(value: unknown): string {
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

/** The stack's two state machines, told apart by the end of their names (`<stack>-cycle`, `<stack>-recovery`). */
export type MachineKind = 'cycle' | 'recovery';

/** One state machine of a synthesized template, its definition as plain JSON. */
export function machineFromTemplate(
  template: TemplateJson,
  kind: MachineKind,
): { definition: StateMachineDefinition; stateMachineName: string } {
  const machines = Object.values(template.Resources).filter(
    (r) =>
      r.Type === 'AWS::StepFunctions::StateMachine' &&
      String(r.Properties?.StateMachineName ?? '').endsWith(`-${kind}`),
  );
  if (machines.length !== 1) throw new Error(`expected one ${kind} state machine, found ${machines.length}`);
  const props = machines[0]!.Properties ?? {};
  return {
    definition: JSON.parse(resolveToken(props.DefinitionString)) as StateMachineDefinition,
    stateMachineName: String(props.StateMachineName),
  };
}

/** The definition of one of the template's state machines (the cycle machine by default). */
export function definitionFromTemplate(
  template: TemplateJson,
  kind: MachineKind = 'cycle',
): StateMachineDefinition {
  return machineFromTemplate(template, kind).definition;
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

/** A Wait state that the definition loops through, and one pass around its loop. */
export interface WaitLoop {
  readonly wait: string;
  /** The Wait's duration as synthesized (Seconds); undefined when it is read from the input. */
  readonly seconds: number | undefined;
  /** The states one pass enters, the Wait first: the shortest way from the Wait back to it. */
  readonly states: readonly string[];
}

/** The states a state may go to next (Next, a Choice's rules and Default; not Catch). */
function successors(state: Record<string, unknown>): string[] {
  const choices = (state.Choices ?? []) as { Next?: unknown }[];
  return [state.Next, ...choices.map((c) => c.Next), state.Default].filter(
    (n): n is string => typeof n === 'string',
  );
}

/**
 * Every Wait state that lies on a loop, with the states one pass around it enters. Each pass is
 * billed as that many state transitions, so a cycle's transitions split into passes (as many as the
 * cycle waited: they grow with its duration) and the rest (its fixed path).
 */
export function waitLoops(def: StateMachineDefinition): WaitLoop[] {
  const states = allStates(def);
  const loops: WaitLoop[] = [];
  for (const [wait, state] of states) {
    if (state.Type !== 'Wait') continue;
    // Breadth first from the Wait's successors back to the Wait: the shortest pass.
    // `from` maps each state reached to the state it was reached from.
    const from = new Map<string, string>();
    const queue = [...new Set(successors(state))];
    for (const n of queue) from.set(n, wait);
    for (let i = 0; i < queue.length && queue[i] !== wait; i++) {
      for (const next of successors(states.get(queue[i] as string) ?? {})) {
        if (from.has(next)) continue;
        from.set(next, queue[i] as string);
        queue.push(next);
      }
    }
    if (!from.has(wait)) continue;
    const pass: string[] = [];
    for (let at = from.get(wait); at !== undefined && at !== wait; at = from.get(at)) pass.unshift(at);
    loops.push({
      wait,
      seconds: typeof state.Seconds === 'number' ? state.Seconds : undefined,
      states: [wait, ...pass],
    });
  }
  return loops;
}

/**
 * aws-local-stepfunctions 3 calls Promise.withResolvers, which Node 22 has and Node 20 does not.
 * Installs the standard's behaviour where it is missing; a no-op elsewhere.
 */
export function ensurePromiseWithResolvers(): void {
  const P = Promise as unknown as { withResolvers?: () => unknown };
  P.withResolvers ??= () => {
    let resolve: unknown;
    let reject: unknown;
    const promise = new Promise((a, b) => {
      resolve = a;
      reject = b;
    });
    return { promise, resolve, reject };
  };
}
