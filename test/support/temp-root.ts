// vitest globalSetup: every test run gets its own temporary directory as TMPDIR, removed when the
// run ends. Tests (and the ferry, nbdkit and emulator processes they start) make their scratch
// directories with os.tmpdir(); many keep them for a failure's post-mortem rather than removing them,
// and images of hundreds of MiB per file add up over repeated runs on a shared disk. FERRY_KEEP_TMP=1
// keeps the run's directory (its path is printed).
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export default async function setup(): Promise<() => Promise<void>> {
  const previous = process.env.TMPDIR;
  const root = await mkdtemp(join(tmpdir(), 'ferry-test-'));
  // Workers are forked after global setup and inherit this environment.
  process.env.TMPDIR = root;
  return async () => {
    if (previous === undefined) delete process.env.TMPDIR;
    else process.env.TMPDIR = previous;
    if (process.env.FERRY_KEEP_TMP === '1') {
      console.log(`test scratch directories kept in ${root}`);
      return;
    }
    await rm(root, { recursive: true, force: true });
  };
}
