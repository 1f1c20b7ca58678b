// A virtual clock: sleeps resolve in deadline order as soon as nothing else can run, so an engine
// over in-memory adapters runs hours of simulated time in milliseconds, deterministically.
import { AbortedError } from '../../shared/engine/errors.ts';
import type { Clock } from '../../shared/engine/ports.ts';

interface Timer {
  at: number;
  seq: number;
  resolve: () => void;
  reject: (err: Error) => void;
  waiting: Set<Timer> | undefined;
}

export class VirtualClock implements Clock {
  private time: number;
  private seq = 0;
  private readonly timers: Timer[] = [];
  private scheduled = false;
  /** One abort listener per signal (a run shares one signal across all its chunks). */
  private readonly bySignal = new WeakMap<AbortSignal, Set<Timer>>();

  constructor(start = 0) {
    this.time = start;
  }

  now(): number {
    return this.time;
  }

  sleep(ms: number, signal?: AbortSignal): Promise<void> {
    if (signal?.aborted) return Promise.reject(new AbortedError());
    return new Promise((resolve, reject) => {
      const waiting = signal ? this.waiting(signal) : undefined;
      const timer: Timer = { at: this.time + Math.max(0, ms), seq: this.seq++, resolve, reject, waiting };
      waiting?.add(timer);
      this.timers.push(timer);
      this.schedule();
    });
  }

  private waiting(signal: AbortSignal): Set<Timer> {
    let set = this.bySignal.get(signal);
    if (set === undefined) {
      const timers = new Set<Timer>();
      set = timers;
      this.bySignal.set(signal, timers);
      signal.addEventListener(
        'abort',
        () => {
          for (const timer of timers) {
            const i = this.timers.indexOf(timer);
            if (i >= 0) this.timers.splice(i, 1);
            timer.reject(new AbortedError());
          }
          timers.clear();
        },
        { once: true },
      );
    }
    return set;
  }

  /** setImmediate runs after every pending promise reaction: then only timers can move the run on. */
  private schedule(): void {
    if (this.scheduled) return;
    this.scheduled = true;
    setImmediate(() => {
      this.scheduled = false;
      if (this.timers.length === 0) return;
      this.timers.sort((a, b) => a.at - b.at || a.seq - b.seq);
      const first = this.timers[0]!;
      this.time = Math.max(this.time, first.at);
      // Fire every timer due at this instant together, in order.
      while (this.timers.length > 0 && this.timers[0]!.at <= this.time) {
        const timer = this.timers.shift()!;
        timer.waiting?.delete(timer);
        timer.resolve();
      }
      if (this.timers.length > 0) this.schedule();
    });
  }
}
