// A directory of file images, one per disk and named after it: what a `ferry serve` node writes
// into when the CLI gives it `--target file:DIR` (it fits the node's NodeTargets port). Its images
// keep history (history.ts), so a checkpoint can be recovered from the node (materialise.ts).
import { randomBytes } from 'node:crypto';
import { mkdir, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { ConfigError } from '../engine/errors.ts';
import type { MaterialisedReplica, RecoveryQuery } from '../engine/replica-recovery.ts';
import { FileTarget, readManifest, type VerifyReport, verifyFileImage } from './file-target.ts';
import { pruneHistory, relabelHistory } from './history.ts';
import { type DiskRecoveryPlan, materialiseDisk, nonZeroRuns, planDiskRecovery } from './materialise.ts';

/**
 * Where checkpoints are materialised before they are sent: a dot name, which no disk can have
 * (names start with a letter or digit), emptied when the node starts.
 */
const SCRATCH = '.ferry-recovery';

export class ImageDirectory {
  readonly name: string;

  private constructor(
    readonly dir: string,
    private readonly keepHistory: boolean,
  ) {
    this.name = `file:${dir}`;
  }

  /**
   * The directory must exist: a node refuses to start rather than fail at its first session. Its
   * images keep each published cycle's history unless `keepHistory` is false.
   */
  static async open(dir: string, opts: { readonly keepHistory?: boolean } = {}): Promise<ImageDirectory> {
    const st = await stat(dir).catch(() => undefined);
    if (!st?.isDirectory()) {
      throw new ConfigError(`target directory ${dir} does not exist or is not a directory`, {
        setting: 'target',
      });
    }
    // What a node stopped while sending a recovery left behind.
    await rm(join(dir, SCRATCH), { recursive: true, force: true });
    return new ImageDirectory(dir, opts.keepHistory ?? true);
  }

  /** The image of disk `disk` is `<dir>/<disk>`; the node checks disk names before it asks. */
  target(disk: string): FileTarget {
    return new FileTarget(this.image(disk), { keepHistory: this.keepHistory });
  }

  async exists(disk: string): Promise<boolean> {
    return (await stat(this.image(disk)).catch(() => undefined)) !== undefined;
  }

  verify(disk: string, expectedRef: string | undefined): Promise<VerifyReport> {
    return verifyFileImage(this.image(disk), expectedRef);
  }

  /** The history entry the image recorded under the node's session id, named after the checkpoint. */
  nameHistory(disk: string, sequence: number, recordedAs: string, checkpoint: string): Promise<void> {
    return relabelHistory(this.image(disk), sequence, recordedAs, checkpoint);
  }

  pruneHistory(disk: string, keepFrom: number): Promise<number[]> {
    return pruneHistory(this.image(disk), keepFrom);
  }

  /** Plans the checkpoint's image from the replica and its history, as `ferry recover` does for files. */
  async planRecovery(
    disk: string,
    query: RecoveryQuery,
    readManifestToo: boolean,
  ): Promise<{ sizeBytes: number; manifest: Buffer | undefined }> {
    const plan = await this.plan(disk, query, readManifestToo);
    return {
      sizeBytes: plan.size,
      manifest: readManifestToo ? await readManifest(plan.manifest) : undefined,
    };
  }

  /** Materialises the checkpoint's image into the scratch folder (verified), for sending. */
  async materialise(disk: string, query: RecoveryQuery, signal?: AbortSignal): Promise<MaterialisedReplica> {
    const plan = await this.plan(disk, query, true);
    const scratch = join(this.dir, SCRATCH);
    await mkdir(scratch, { recursive: true });
    const path = join(scratch, `${disk}.${randomBytes(8).toString('hex')}`);
    await materialiseDisk(plan, path, signal ? { signal } : {});
    return {
      sizeBytes: plan.size,
      runs: (maxRun) => nonZeroRuns(path, plan.size, { maxRun }),
      remove: () => rm(path, { force: true }),
    };
  }

  private image(disk: string): string {
    return join(this.dir, disk);
  }

  /** The catalog as the question told it, with this directory's image as every checkpoint's replica. */
  private plan(disk: string, query: RecoveryQuery, withManifest: boolean): Promise<DiskRecoveryPlan> {
    const target = `file:${this.image(disk)}`;
    const { checkpoint } = query;
    const catalog = [checkpoint, ...query.later].map((c) => ({
      id: c.id,
      sequence: c.sequence,
      disks: [{ target }],
    }));
    return planDiskRecovery(
      catalog,
      [],
      catalog[0]!,
      { disk, target, sizeBytes: checkpoint.sizeBytes, targetRef: checkpoint.targetRef },
      { readManifest: withManifest },
    );
  }
}
