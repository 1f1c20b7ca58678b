// The real clock and randomness for local runs (the engine gets them through its ports).
import { setTimeout as delay } from 'node:timers/promises';
import { AbortedError } from '../engine/errors.ts';
import type { Clock, Random } from '../engine/ports.ts';

export const systemClock: Clock = {
  now: () => Date.now(),
  async sleep(ms: number, signal?: AbortSignal): Promise<void> {
    try {
      await delay(ms, undefined, signal ? { signal } : undefined);
    } catch (err) {
      if (signal?.aborted) throw new AbortedError();
      throw err;
    }
  },
};

export const systemRandom: Random = Math.random;
