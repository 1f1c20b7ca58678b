import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    // Integration tests start real servers (nbdkit, emulators); give them room on a busy 2-core box.
    testTimeout: 60_000,
    hookTimeout: 60_000,
    pool: 'forks',
    // fast-check: a random seed per run unless FC_SEED is set (see the file for replaying a failure).
    setupFiles: ['test/support/fast-check.setup.ts'],
    reporters: process.env.CI ? ['default'] : ['default'],
  },
});
