// A directory of file images, one per disk and named after it: what a `ferry serve` node writes
// into when the CLI gives it `--target file:DIR` (it fits the node's NodeTargets port).
import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import { ConfigError } from '../engine/errors.ts';
import { FileTarget, type VerifyReport, verifyFileImage } from './file-target.ts';

export class ImageDirectory {
  readonly name: string;

  private constructor(readonly dir: string) {
    this.name = `file:${dir}`;
  }

  /** The directory must exist: a node refuses to start rather than fail at its first session. */
  static async open(dir: string): Promise<ImageDirectory> {
    const st = await stat(dir).catch(() => undefined);
    if (!st?.isDirectory()) {
      throw new ConfigError(`target directory ${dir} does not exist or is not a directory`, {
        setting: 'target',
      });
    }
    return new ImageDirectory(dir);
  }

  /** The image of disk `disk` is `<dir>/<disk>`; the node checks disk names before it asks. */
  target(disk: string): FileTarget {
    return new FileTarget(join(this.dir, disk));
  }

  async exists(disk: string): Promise<boolean> {
    return (await stat(join(this.dir, disk)).catch(() => undefined)) !== undefined;
  }

  verify(disk: string, expectedRef: string | undefined): Promise<VerifyReport> {
    return verifyFileImage(join(this.dir, disk), expectedRef);
  }
}
