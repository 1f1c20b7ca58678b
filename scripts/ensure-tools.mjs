#!/usr/bin/env node
// Installs the system tools the test suite needs (nbdkit, nbdcopy) when they are missing, so a
// fresh machine runs `npm test` with nothing installed by hand. Debian only; elsewhere it says
// what to install and fails. moto_server (the EC2 and Scheduler emulator of the recovery tests) is a
// Python package, not a Debian one: it is only checked for, with the command that installs it.
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { homedir } from 'node:os';
import { join } from 'node:path';

const needed = [
  { bin: 'nbdkit', pkg: 'nbdkit' },
  { bin: 'nbdcopy', pkg: 'libnbd-bin' },
];
const has = (bin) => spawnSync('sh', ['-c', `command -v ${bin}`], { stdio: 'ignore' }).status === 0;

// The same places test/support/moto.ts looks: MOTO_SERVER, PATH, pyenv's shims.
const motoServer = process.env.MOTO_SERVER
  ? existsSync(process.env.MOTO_SERVER)
  : has('moto_server') || existsSync(join(homedir(), '.pyenv', 'shims', 'moto_server'));
if (!motoServer) {
  console.error(
    "ferry tests need moto_server (the EC2 and EventBridge Scheduler emulator): pip install 'moto[server]' (moto 5.2.1 is known to work), or set MOTO_SERVER to its path",
  );
  process.exit(1);
}
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
