// EBS URIs for the local CLI: `ebs://SNAPSHOT` (a snapshot to copy in full) and
// `ebs-diff://BASE..NEW` (the change from BASE to NEW). The EBS endpoint comes from FERRY_EBS_ENDPOINT
// (the emulator, a VPC endpoint) or the SDK's regional default; credentials and region from the
// SDK's usual chain (AWS_PROFILE, AWS_REGION, ...).
import { ConfigError } from '../../engine/errors.ts';
import { createEbsClient } from './client.ts';
import { EbsSource } from './source.ts';

const ID = 'snap-[0-9a-f]+';
const FULL = new RegExp(`^ebs://(${ID})$`);
const DIFF = new RegExp(`^ebs-diff://(${ID})\\.\\.(${ID})$`);

export interface EbsSourceUri {
  readonly snapshotId: string;
  readonly baseSnapshotId: string | undefined;
}

export function isEbsUri(uri: string): boolean {
  return uri.startsWith('ebs://') || uri.startsWith('ebs-diff://');
}

export function parseEbsSourceUri(uri: string): EbsSourceUri {
  const full = FULL.exec(uri);
  if (full) return { snapshotId: full[1]!, baseSnapshotId: undefined };
  const diff = DIFF.exec(uri);
  if (diff) return { snapshotId: diff[2]!, baseSnapshotId: diff[1]! };
  throw new ConfigError(`source ${uri}: expected ebs://snap-… or ebs-diff://snap-BASE..snap-NEW`, {
    setting: 'source',
  });
}

/** The endpoint override for EBS calls, if any (FERRY_EBS_ENDPOINT). */
export function ebsEndpointFromEnv(env: NodeJS.ProcessEnv = process.env): string | undefined {
  const endpoint = env.FERRY_EBS_ENDPOINT;
  if (endpoint === undefined || endpoint === '') return undefined;
  if (!/^https?:\/\/[^/\s]+/.test(endpoint)) {
    throw new ConfigError(`FERRY_EBS_ENDPOINT ${endpoint} is not an http(s) URL`, {
      setting: 'FERRY_EBS_ENDPOINT',
    });
  }
  return endpoint;
}

/**
 * Opens an `ebs://` or `ebs-diff://` source. A diff source's change map is its `changedExtents()`
 * (collect it with `collectExtents` into the DiskJob's `changed`); without it the engine copies the
 * new snapshot in full.
 */
export async function openEbsSourceUri(
  uri: string,
  env: NodeJS.ProcessEnv = process.env,
): Promise<EbsSource> {
  const parsed = parseEbsSourceUri(uri);
  const endpoint = ebsEndpointFromEnv(env);
  const client = createEbsClient(endpoint === undefined ? {} : { endpoint });
  return EbsSource.open({ client, ownsClient: true, ...parsed }).catch((err: unknown) => {
    client.destroy();
    throw err;
  });
}
