// One Lambda task of a state machine, the same way in both of them: the function's answer is the
// result (payloadResponseOnly), and its retries are permanent errors never, Lambda service errors a
// few times, and an unknown handler error a little (every handler is idempotent for its input).
import { Duration } from 'aws-cdk-lib';
import type * as lambda from 'aws-cdk-lib/aws-lambda';
import * as sfn from 'aws-cdk-lib/aws-stepfunctions';
import * as tasks from 'aws-cdk-lib/aws-stepfunctions-tasks';
import type { Construct } from 'constructs';
import { HANDLER_RETRIES, LAMBDA_SERVICE_RETRIES } from './history-budget.ts';

/** Errors of the Lambda service itself (not the handler's): the invocation may well work again. */
export const LAMBDA_SERVICE_ERRORS = [
  'Lambda.ServiceException',
  'Lambda.AWSLambdaException',
  'Lambda.SdkClientException',
  'Lambda.TooManyRequestsException',
  'Lambda.ClientExecutionTimeoutException',
];

export interface LambdaTaskProps {
  readonly fn: lambda.IFunction;
  /** The event: this object, or (with `inputPath`) the object at that path of the state's input. */
  readonly payload?: sfn.TaskInput;
  readonly inputPath?: string;
  /** Where the result goes; undefined: it replaces the input. */
  readonly resultPath: string | undefined;
  readonly resultSelector?: Record<string, unknown>;
  /** Error names (the handlers' error classes) that asking again cannot fix: never retried. */
  readonly permanentErrors: readonly string[];
}

export function lambdaTask(scope: Construct, id: string, p: LambdaTaskProps): tasks.LambdaInvoke {
  const task = new tasks.LambdaInvoke(scope, id, {
    lambdaFunction: p.fn,
    ...(p.inputPath === undefined ? { payload: p.payload } : { inputPath: p.inputPath }),
    payloadResponseOnly: true,
    retryOnServiceExceptions: false,
    resultSelector: p.resultSelector,
    resultPath: p.resultPath,
  });
  // Retriers are tried in order: permanent errors first, so States.TaskFailed cannot match them.
  task.addRetry({ errors: [...p.permanentErrors], maxAttempts: 0 });
  task.addRetry({
    errors: LAMBDA_SERVICE_ERRORS,
    interval: Duration.seconds(2),
    maxAttempts: LAMBDA_SERVICE_RETRIES,
    backoffRate: 2,
    jitterStrategy: sfn.JitterType.FULL,
  });
  task.addRetry({
    errors: ['States.TaskFailed'],
    interval: Duration.seconds(5),
    maxAttempts: HANDLER_RETRIES,
    backoffRate: 3,
    jitterStrategy: sfn.JitterType.FULL,
  });
  return task;
}

/**
 * A .sync child execution (a cycle started by a cycle or by a recovery): only the StartExecution call
 * is retried on Step Functions' own errors; a child that failed already used its own retries.
 */
export function retryStartExecution(task: tasks.StepFunctionsStartExecution, maxAttempts: number): void {
  task.addRetry({
    errors: [
      'StepFunctions.ExecutionLimitExceededException',
      'StepFunctions.AWSStepFunctionsException',
      'StepFunctions.SdkClientException',
    ],
    interval: Duration.seconds(5),
    maxAttempts,
    backoffRate: 2,
    jitterStrategy: sfn.JitterType.FULL,
  });
}
