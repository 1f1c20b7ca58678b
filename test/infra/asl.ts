// The synthesized state machine as plain ASL for the synth tests: a thin wrapper over
// local-cloud/asl.ts (which the local run of the state machine uses too) taking an assertions Template.
import type { Template } from 'aws-cdk-lib/assertions';
import type { StateMachineDefinition } from 'aws-local-stepfunctions';
import { definitionFromTemplate, type TemplateJson } from '../../local-cloud/asl.ts';

export { allStates, FAKE, fakeArn } from '../../local-cloud/asl.ts';

/** The cycle state machine's definition as plain JSON. */
export function plainDefinition(template: Template): StateMachineDefinition {
  return definitionFromTemplate(template.toJSON() as TemplateJson, 'cycle');
}
