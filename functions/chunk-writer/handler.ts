// Chunk-writer Lambda: SQS-triggered (ReportBatchItemFailures), one grant per record, a batch at once.
import { SqsSchema } from '@aws-lambda-powertools/parser/schemas';
import type { Context, SQSBatchResponse } from 'aws-lambda';
import { type WriterDeps, writeBatch } from '../../shared/engine/cycle/writer.ts';
import { describeIssues, EventValidationError, parseEnvironment } from '../contracts.ts';
import { ebsPorts } from '../shared/ebs-binding.ts';
import { clients, invoke, type Observability, powertools, remainingTime } from '../shared/runtime.ts';
import { writerDeps } from '../shared/wiring.ts';

export interface WriterRuntime {
  /** Built once per container: its WriterCache keeps disk records and descriptor pages warm. */
  readonly deps: WriterDeps;
  readonly obs: Observability;
}

/** The SQS event envelope (Powertools' schema); each body is then decoded, and refused, on its own. */
function parseSqsEvent(event: unknown) {
  const parsed = SqsSchema.safeParse(event);
  if (parsed.success) return parsed.data;
  throw new EventValidationError(`chunk-writer event is not an SQS event: ${describeIssues(parsed.error)}`, {
    field: parsed.error.issues[0]?.path.join('.'),
  });
}

export function createChunkWriterHandler(runtime: () => WriterRuntime) {
  return async (event: unknown, context?: Context): Promise<SQSBatchResponse> => {
    const { deps, obs } = runtime();
    return invoke(obs, context, async (annotate) => {
      const sqsEvent = parseSqsEvent(event);
      annotate({ records: sqsEvent.Records.length });
      const result = await writeBatch(
        deps,
        sqsEvent.Records.map((r) => ({
          messageId: r.messageId,
          receiptHandle: r.receiptHandle,
          body: r.body,
        })),
        remainingTime(context),
      );
      obs.log.info('batch processed', result.outcomes);
      return { batchItemFailures: result.batchItemFailures };
    });
  };
}

let container: WriterRuntime | undefined;

function fromEnvironment(): WriterRuntime {
  const env = parseEnvironment('chunk-writer', process.env);
  const obs = powertools('ferry-chunk-writer');
  const deps = writerDeps(
    {
      dynamo: clients.dynamo(),
      sqs: clients.sqs(),
      ebs: ebsPorts(clients.ebs()),
      log: obs.log,
      meter: obs.meter,
    },
    env,
  );
  return { deps, obs };
}

/** Lambda entry: an SQS event of grant messages; answers a partial batch response. */
export const handler = createChunkWriterHandler(() => {
  container ??= fromEnvironment();
  return container;
});
