// Vitest setup (vitest.config.ts `setupFiles`): how property tests (fast-check) pick their seed.
//
// - By default every `fc.assert` draws a fresh random seed, so each run explores new inputs. A
//   failure throws "Property failed after N tests { seed: S, path: "P", endOnFailure: true }" and the
//   counterexample; vitest prints that message whole. Nothing here or in the tests may set `seed`,
//   `path` or `verbose: 0`-style options that hide it.
// - `FC_SEED=S npx vitest run <file>` replays: every property of the run uses seed S, so the failing
//   one finds the same counterexample again (add `{ seed: S, path: 'P' }` to that one `fc.assert`
//   while debugging to jump straight to it; never commit it).
// - A counterexample, once understood, becomes a fixed regression case NEXT TO ITS PROPERTY: an entry
//   in that property's `examples` option (`fc.assert(prop, { examples: [[...args]] })`, run first on
//   every run whatever the seed), or a plain `it('regression: ...')` beside it when the case needs
//   its own assertions. Either names the seed it was found with in a comment.
import fc from 'fast-check';

const raw = process.env.FC_SEED?.trim();
if (raw !== undefined && raw !== '') {
  const seed = Number(raw);
  if (!Number.isSafeInteger(seed))
    throw new Error(`FC_SEED must be an integer (a fast-check seed), not "${raw}"`);
  fc.configureGlobal({ ...fc.readConfigureGlobal(), seed });
  // Printed in every test file's output, so a replayed failure shows the seed that was forced.
  console.info(`fast-check: every property runs with FC_SEED=${seed}`);
}
