// A virtual clock: sleeps resolve in deadline order as soon as nothing else can run, so an engine
// over in-memory adapters runs hours of simulated time in milliseconds, deterministically (the
// engine's tests, the fleet simulation). Pending sleeps sit in a binary heap: O(log n) each, so
// thousands of disks backing off at once stay cheap.
import { AbortedError } from '../engine/errors.ts';
import type { Clock } from '../engine/ports.ts';

interface Timer {
  readonly at: number;
  readonly seq: number;
  resolve: () => void;
  cancelled: boolean;
}

export class VirtualClock implements Clock {
  private time: number;
  private seq = 0;
  private readonly heap: Timer[] = [];
  private scheduled = false;
  private readonly waiting = new WeakMap<AbortSignal, Map<Timer, () => void>>();
  /** How many instants the clock has jumped to: the simulation's event count. */
  steps = 0;

  constructor(start = 0) {
    this.time = start;
  }

  now(): number {
    return this.time;
  }

  sleep(ms: number, signal?: AbortSignal): Promise<void> {
    if (signal?.aborted) return Promise.reject(new AbortedError());
    return new Promise((resolve, reject) => {
      const timer: Timer = { at: this.time + Math.max(0, ms), seq: this.seq++, resolve, cancelled: false };
      this.push(timer);
      if (signal) {
        // One listener per signal, not per sleep: the engine passes one signal to every retry.
        let waiting = this.waiting.get(signal);
        if (!waiting) {
          const set = new Map<Timer, () => void>();
          waiting = set;
          this.waiting.set(signal, set);
          signal.addEventListener(
            'abort',
            () => {
              for (const [t, fail] of set) {
                t.cancelled = true;
                fail();
              }
              set.clear();
            },
            { once: true },
          );
        }
        const set = waiting;
        set.set(timer, () => reject(new AbortedError()));
        timer.resolve = () => {
          set.delete(timer);
          resolve();
        };
      }
      this.schedule();
    });
  }

  /** setImmediate runs after every pending promise reaction: only then may time move on. */
  private schedule(): void {
    if (this.scheduled) return;
    this.scheduled = true;
    setImmediate(() => {
      this.scheduled = false;
      while (this.heap.length > 0 && this.heap[0]!.cancelled) this.pop();
      const first = this.heap[0];
      if (first === undefined) return;
      this.time = Math.max(this.time, first.at);
      this.steps++;
      // Every timer due at this instant fires together, in the order they were set.
      while (this.heap.length > 0 && this.heap[0]!.at <= this.time) {
        const t = this.pop()!;
        if (!t.cancelled) t.resolve();
      }
      if (this.heap.length > 0) this.schedule();
    });
  }

  private less(a: Timer, b: Timer): boolean {
    return a.at < b.at || (a.at === b.at && a.seq < b.seq);
  }

  private push(t: Timer): void {
    const h = this.heap;
    h.push(t);
    let i = h.length - 1;
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (!this.less(h[i]!, h[p]!)) break;
      [h[i], h[p]] = [h[p]!, h[i]!];
      i = p;
    }
  }

  private pop(): Timer | undefined {
    const h = this.heap;
    const top = h[0];
    const last = h.pop();
    if (h.length > 0 && last !== undefined) {
      h[0] = last;
      let i = 0;
      for (;;) {
        const l = 2 * i + 1;
        const r = l + 1;
        let m = i;
        if (l < h.length && this.less(h[l]!, h[m]!)) m = l;
        if (r < h.length && this.less(h[r]!, h[m]!)) m = r;
        if (m === i) break;
        [h[i], h[m]] = [h[m]!, h[i]!];
        i = m;
      }
    }
    return top;
  }
}
