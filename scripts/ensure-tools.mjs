#!/usr/bin/env node
// Installs the system tools the test suite needs (nbdkit, nbdcopy) when they are missing, so a
// fresh machine runs `npm test` with nothing installed by hand. Debian only; elsewhere it says
// what to install and fails.
import { execFileSync, spawnSync } from 'node:child_process';

const needed = [
  { bin: 'nbdkit', pkg: 'nbdkit' },
  { bin: 'nbdcopy', pkg: 'libnbd-bin' },
];
const has = (bin) => spawnSync('sh', ['-c', `command -v ${bin}`], { stdio: 'ignore' }).status === 0;
const missing = needed.filter((t) => !has(t.bin));
if (missing.length === 0) process.exit(0);

const pkgs = missing.map((t) => t.pkg);
const canApt = has('apt-get') && process.getuid?.() === 0;
if (!canApt) {
  console.error(
    `ferry tests need: ${pkgs.join(' ')} (Debian packages). Install them, e.g. sudo apt-get install -y ${pkgs.join(' ')}`,
  );
  process.exit(1);
}
console.log(`installing ${pkgs.join(' ')} with apt-get ...`);
const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
execFileSync('apt-get', ['update', '-qq'], { stdio: 'inherit', env });
execFileSync('apt-get', ['install', '-y', '-qq', '--no-install-recommends', ...pkgs], {
  stdio: 'inherit',
  env,
});
