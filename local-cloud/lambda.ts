// The Lambda runtime of the local cloud: invokes a function's real `handler` export in-process with a
// Lambda context (its deadline from the deployed timeout), and can freeze an invocation the way a
// killed or timed-out Lambda stops: every AWS call it makes from then on never returns, so it writes
// nothing more to DynamoDB, SQS or EBS, and its caller never gets an answer.
import { AsyncLocalStorage } from 'node:async_hooks';
import { randomUUID } from 'node:crypto';
import type { Context } from 'aws-lambda';
import { fakeArn } from './asl.ts';
import type { DeployedFunction } from './synth.ts';

/** A Lambda handler as the functions export it. */
export type Handler = (event: unknown, context?: Context) => Promise<unknown>;

/** How an invocation is cut short (a fault of the local run). */
export interface KillSwitch {
  /** Freeze the invocation when it is about to send its (n+1)-th PutSnapshotBlock: n blocks written. */
  readonly afterPutBlocks: number;
}

interface Invocation {
  readonly requestId: string;
  /** The function invoked (its folder under functions/). */
  readonly fn: string;
  readonly kill: KillSwitch | undefined;
  puts: number;
  frozen: boolean;
  freeze(why: 'killed' | 'timeout'): void;
}

const invocations = new AsyncLocalStorage<Invocation>();

/** The function whose invocation the caller runs in, if any: to attribute the requests it sends. */
export function currentFunction(): string | undefined {
  return invocations.getStore()?.fn;
}
const never = <T>(): Promise<T> => new Promise<T>(() => {});

/** An SDK v3 client's middleware stack, as far as freezing needs it. */
interface SdkClient {
  middlewareStack: {
    add(
      mw: (
        next: (args: unknown) => Promise<unknown>,
        context: { commandName?: string },
      ) => (args: unknown) => Promise<unknown>,
      opts: { step: 'initialize'; name: string },
    ): void;
  };
}

const instrumented = new WeakSet<object>();

/**
 * Adds the freeze to the clients the handlers use (once per client): inside a frozen invocation a
 * call never returns; a kill switch trips on the PutSnapshotBlock it names, before sending it.
 */
export function instrumentClients(clients: readonly unknown[]): void {
  for (const client of clients as SdkClient[]) {
    if (instrumented.has(client)) continue;
    instrumented.add(client);
    client.middlewareStack.add(
      (next, context) => async (args) => {
        const inv = invocations.getStore();
        if (inv === undefined) return next(args);
        if (inv.frozen) return never();
        if (inv.kill !== undefined && context.commandName === 'PutSnapshotBlockCommand') {
          if (inv.puts >= inv.kill.afterPutBlocks) {
            inv.freeze('killed');
            return never();
          }
          inv.puts++;
        }
        return next(args);
      },
      { step: 'initialize', name: 'ferryLocalFreeze' },
    );
  }
}

export type InvocationResult =
  | { readonly status: 'ok'; readonly result: unknown; readonly ms: number }
  | { readonly status: 'error'; readonly error: unknown; readonly ms: number }
  /** Frozen by its kill switch or its timeout: no answer, like a Lambda that died. */
  | { readonly status: 'killed' | 'timeout'; readonly ms: number };

/** The context Lambda passes: names from the deployment, the deadline from its timeout. */
export function lambdaContext(fn: DeployedFunction, stackName: string, requestId: string): Context {
  const deadline = Date.now() + fn.timeoutSeconds * 1000;
  const functionName = `${stackName}-${fn.logicalId}`;
  return {
    callbackWaitsForEmptyEventLoop: true,
    functionName,
    functionVersion: '$LATEST',
    invokedFunctionArn: fakeArn(fn.logicalId),
    memoryLimitInMB: String(fn.memoryMb),
    awsRequestId: requestId,
    logGroupName: `/aws/lambda/${functionName}`,
    logStreamName: `local/${requestId}`,
    getRemainingTimeInMillis: () => Math.max(0, deadline - Date.now()),
    done() {},
    fail() {},
    succeed() {},
  };
}

/**
 * Invokes `handler` as Lambda would run `fn`: with its context, within its timeout, inside its own
 * invocation scope (so a kill switch or the timeout freezes this invocation only).
 */
export async function invokeLambda(
  fn: DeployedFunction,
  stackName: string,
  handler: Handler,
  event: unknown,
  kill?: KillSwitch,
): Promise<InvocationResult> {
  const started = performance.now();
  const ms = () => Math.round(performance.now() - started);
  const requestId = randomUUID();
  let stopped: (why: 'killed' | 'timeout') => void = () => {};
  const stop = new Promise<'killed' | 'timeout'>((resolve) => {
    stopped = resolve;
  });
  const inv: Invocation = {
    requestId,
    fn: fn.name,
    kill,
    puts: 0,
    frozen: false,
    freeze(why) {
      if (this.frozen) return;
      this.frozen = true;
      stopped(why);
    },
  };
  const timer = setTimeout(() => inv.freeze('timeout'), fn.timeoutSeconds * 1000);
  timer.unref();
  const run = invocations.run(inv, () => handler(event, lambdaContext(fn, stackName, requestId)));
  // A frozen invocation's promise never settles; one that fails after it was abandoned is ignored.
  run.catch(() => undefined);
  try {
    const outcome = await Promise.race([
      run.then(
        (result) => ({ status: 'ok' as const, result }),
        (error: unknown) => ({ status: 'error' as const, error }),
      ),
      stop.then((why) => ({ status: why })),
    ]);
    return { ...outcome, ms: ms() };
  } finally {
    clearTimeout(timer);
  }
}
