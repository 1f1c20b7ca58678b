// Moved to shared/runtime/clock.ts (an adapter folder is no home for what every runtime uses). Kept
// only for functions/shared/ebs-binding.ts, whose owner is rewriting functions/shared: delete this
// file once it imports shared/runtime/clock.ts.
export { systemClock, systemRandom } from '../runtime/clock.ts';
