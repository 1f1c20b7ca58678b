// The real clock and randomness, for whatever runs for real: local runs, Lambda handlers, adapters.
import { AbortedError } from '../engine/errors.ts';
import type { Clock, Random } from '../engine/ports.ts';

/**
 * Sleepers waiting on each signal, woken by one abort listener per signal: a run passes one signal
 * to every chunk, and a window of chunks backing off at once would otherwise add a listener each
 * and trip Node's leak warning.
 */
const sleepers = new WeakMap<AbortSignal, Set<() => void>>();

export const systemClock: Clock = {
  now: () => Date.now(),
  sleep(ms: number, signal?: AbortSignal): Promise<void> {
    if (signal?.aborted) return Promise.reject(new AbortedError());
    return new Promise<void>((resolve, reject) => {
      if (signal === undefined) {
        setTimeout(resolve, ms);
        return;
      }
      let waiting = sleepers.get(signal);
      if (waiting === undefined) {
        const set = new Set<() => void>();
        waiting = set;
        sleepers.set(signal, set);
        signal.addEventListener(
          'abort',
          () => {
            for (const cancel of set) cancel();
            set.clear();
          },
          { once: true },
        );
      }
      const registry = waiting;
      const cancel = () => {
        clearTimeout(timer);
        reject(new AbortedError());
      };
      const timer = setTimeout(() => {
        registry.delete(cancel);
        resolve();
      }, ms);
      registry.add(cancel);
    });
  },
};

export const systemRandom: Random = Math.random;
