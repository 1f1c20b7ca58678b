// The one price table Ferry's cost figures use: AWS list prices in us-east-1 (USD) for the requests
// a replication cycle makes, checked on 2026-12-05.
// - EBS direct APIs, from the EBS user guide's "Pricing for EBS direct APIs"
//   (https://docs.aws.amazon.com/ebs/latest/userguide/ebsapi-pricing.html, which points to
//   https://aws.amazon.com/ebs/pricing/): PutSnapshotBlock per block written, GetSnapshotBlock per
//   block returned, ListChangedBlocks and ListSnapshotBlocks per request. StartSnapshot and
//   CompleteSnapshot are not priced there, so they cost nothing here.
// - Step Functions standard, from https://aws.amazon.com/step-functions/pricing/ (retries count as
//   transitions).
// - DynamoDB on-demand (https://aws.amazon.com/dynamodb/pricing/on-demand/, the November 2024 rates),
//   SQS standard (https://aws.amazon.com/sqs/pricing/), Lambda arm64 first tier
//   (https://aws.amazon.com/lambda/pricing/) and EventBridge custom events
//   (https://aws.amazon.com/eventbridge/pricing/): those pages render their rates client-side, so
//   they were checked against independent restatements of them, which agree on every value below.
// Free tiers are left out: they are per account and month and say nothing about one cycle.

export const PRICES = Object.freeze({
  region: 'us-east-1',
  checked: '2026-12-05',
  ebs: {
    /** Per PutSnapshotBlock block written (one SnapshotAPIUnit is one 512 KiB block). */
    putSnapshotBlock: 0.006 / 1000,
    /** Per GetSnapshotBlock block returned. */
    getSnapshotBlock: 0.003 / 1000,
    /** Per ListChangedBlocks or ListSnapshotBlocks request. */
    listRequest: 0.0006 / 1000,
  },
  dynamodb: {
    /** Per write request unit (a write of up to 1 KB). */
    writeRequestUnit: 0.625 / 1e6,
    /** Per read request unit (a strongly consistent read of up to 4 KB; eventually consistent: half). */
    readRequestUnit: 0.125 / 1e6,
  },
  sqs: {
    /** Per standard-queue request; a request is each 64 KB chunk of its payload. */
    request: 0.4 / 1e6,
    payloadChunkBytes: 64 * 1024,
  },
  lambda: {
    request: 0.2 / 1e6,
    /** Per GB-second on arm64 (the functions' architecture); duration is billed per 1 ms. */
    gbSecondArm64: 0.0000133334,
  },
  stepFunctions: {
    /** Per state transition of a standard workflow (the cycle state machine is one). */
    stateTransition: 0.025 / 1000,
  },
  eventBridge: {
    /** Per custom event published to a bus (each 64 KB chunk is one event). */
    customEvent: 1.0 / 1e6,
  },
});

export type Prices = typeof PRICES;
