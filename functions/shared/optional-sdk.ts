// AWS SDK clients this project does not depend on, loaded at run time: EventBridge (the
// EventPublisher port) and EC2 DescribeSnapshots (the snapshot status reader). The Lambda Node.js
// runtime ships the AWS SDK v3 and the CDK bundling keeps @aws-sdk/* external, so both are there in
// the cloud; where one is missing, the caller gets a clear error or the documented fallback.
import {
  type DescribeSnapshots,
  describeSnapshotsStatusReader,
  type SnapshotStatusReader,
} from '../../shared/aws/ebs/status.ts';
import type { EventPublisher } from '../../shared/engine/cycle/ports.ts';
import { TransferError } from '../../shared/engine/errors.ts';

// Variables, so neither tsc nor esbuild tries to resolve the packages at build time.
export const EVENTBRIDGE_MODULE = '@aws-sdk/client-eventbridge';
export const EC2_MODULE = '@aws-sdk/client-ec2';
export type OptionalSdkModule = typeof EVENTBRIDGE_MODULE | typeof EC2_MODULE;

type Client = { send(command: unknown): Promise<unknown> };
type ClientClass = new (config: Record<string, unknown>) => Client;
type CommandClass = new (input: Record<string, unknown>) => unknown;

// Modules a host other than the Lambda runtime provides in place of the SDK packages (the local run
// of the state machine: EventBridge and EC2 bound to its local cloud). Never set in Lambda.
const provided = new Map<OptionalSdkModule, Record<string, unknown>>();

/**
 * Provides `name` in place of the SDK package, with the same shape (`EventBridgeClient` +
 * `PutEventsCommand`, `EC2Client` + `DescribeSnapshotsCommand`). For hosts that are not the Lambda
 * runtime: call it before the first invocation (a container loads each module once).
 */
export function provideRuntimeModule(name: OptionalSdkModule, module: Record<string, unknown>): void {
  provided.set(name, module);
}

/** Imports an optional SDK package once; undefined when it is not installed. */
async function load(name: OptionalSdkModule): Promise<Record<string, unknown> | undefined> {
  const given = provided.get(name);
  if (given !== undefined) return given;
  try {
    return (await import(name)) as Record<string, unknown>;
  } catch {
    return undefined;
  }
}

/** Publishes to `busName` through PutEvents; the SDK client is created once, on first use. */
export function eventBridgePublisher(busName: string): EventPublisher {
  let ready: Promise<{ client: Client; PutEventsCommand: CommandClass }> | undefined;
  const init = async () => {
    const mod = await load(EVENTBRIDGE_MODULE);
    if (mod === undefined) {
      ready = undefined;
      throw new TransferError(
        `cannot publish to EventBridge bus ${busName}: ${EVENTBRIDGE_MODULE} is not available in this runtime`,
        { retryable: false },
      );
    }
    const client = new (mod.EventBridgeClient as ClientClass)({});
    return { client, PutEventsCommand: mod.PutEventsCommand as CommandClass };
  };
  return {
    async publish(event) {
      ready ??= init();
      const { client, PutEventsCommand } = await ready;
      const out = (await client.send(
        new PutEventsCommand({
          Entries: [
            {
              EventBusName: busName,
              Source: event.source,
              DetailType: event.detailType,
              Detail: JSON.stringify(event.detail),
            },
          ],
        }),
      )) as { FailedEntryCount?: number; Entries?: { ErrorCode?: string; ErrorMessage?: string }[] };
      if ((out.FailedEntryCount ?? 0) > 0) {
        const e = out.Entries?.find((x) => x.ErrorCode !== undefined);
        throw new TransferError(
          `EventBridge refused "${event.detailType}" on bus ${busName}: ${e?.ErrorCode} ${e?.ErrorMessage ?? ''}`,
          { retryable: true },
        );
      }
    },
  };
}

/**
 * EC2 DescribeSnapshots for the adapter's `describeSnapshotsStatusReader`, or undefined when the
 * EC2 client is not available (then the EBS-only ListSnapshotBlocks probe is the fallback).
 */
export async function ec2DescribeSnapshots(): Promise<DescribeSnapshots | undefined> {
  const mod = await load(EC2_MODULE);
  if (mod === undefined) return undefined;
  const client = new (mod.EC2Client as ClientClass)({});
  const Command = mod.DescribeSnapshotsCommand as CommandClass;
  return (input) => client.send(new Command(input)) as ReturnType<DescribeSnapshots>;
}

/**
 * The cloud's snapshot status reader: EC2 DescribeSnapshots when the EC2 client loads (it alone
 * reports `error`), else `fallback` (the EBS-only probe). Decided on first use.
 */
export function cloudStatusReader(fallback: SnapshotStatusReader): SnapshotStatusReader {
  let reader: Promise<SnapshotStatusReader> | undefined;
  return {
    async read(snapshotId, signal) {
      reader ??= ec2DescribeSnapshots().then((d) =>
        d === undefined ? fallback : describeSnapshotsStatusReader(d),
      );
      return (await reader).read(snapshotId, signal);
    },
  };
}
