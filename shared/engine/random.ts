// The one seeded pseudo-random generator: simulations, emulators, test data and delay noise that
// must come out the same on every run with the same seed.
import type { Random } from './ports.ts';

/**
 * mulberry32: a 32-bit state, a few multiplications per draw, and a full 2^32 period. Good enough
 * for jitter, workloads and noise; not for secrets or anything an attacker may predict.
 */
export function seededRandom(seed: number): Random {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
