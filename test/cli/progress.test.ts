// The progress display of `ferry replicate` and `ferry demo`: what a disk's bar says, and how the live
// bars render on a terminal (a fake one, so the exact text cli-progress writes can be read).
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { barFields, createReporter, type DiskView, formatEta } from '../../cli/progress.ts';
import type { ReplicationEvent } from '../../shared/engine/replicate.ts';
import { MiB } from '../../shared/engine/units.ts';

const view = (v: Partial<DiskView>): DiskView => ({
  bytesDone: 0,
  bytesTotal: 48 * MiB,
  rate: 0,
  window: 32 * MiB,
  ...v,
});

describe('formatEta', () => {
  it('is blank until there is a rate, then counts down in s, m and h', () => {
    expect(formatEta(view({ rate: 0 }))).toBe('');
    expect(formatEta(view({ rate: Number.NaN }))).toBe('');
    expect(formatEta(view({ rate: Number.POSITIVE_INFINITY }))).toBe('');
    expect(formatEta(view({ bytesDone: 0, rate: 16 * MiB }))).toBe('3s');
    expect(formatEta(view({ bytesDone: 0, rate: MiB / 4 }))).toBe('3m12s');
    expect(formatEta(view({ bytesTotal: 10_000 * MiB, rate: MiB }))).toBe('2h46m');
    expect(formatEta(view({ bytesDone: 48 * MiB }))).toBe('done');
  });
});

describe('barFields', () => {
  it('gives both sizes in units for people and leaves the ETA out without a rate', () => {
    expect(barFields('os', view({ bytesDone: 0, bytesTotal: 50_331_648 }))).toEqual({
      disk: 'os      ',
      done: '0 B',
      size: '48 MiB',
      rate: '0 B',
      window: '32 MiB',
      timeLeft: '',
    });
    expect(barFields('os', view({ bytesDone: 16 * MiB, rate: 16 * MiB })).timeLeft).toBe(' | ETA 2s');
    expect(barFields('os', view({ bytesDone: 48 * MiB })).timeLeft).toBe(' | done');
    // Before the first tick the window is not known yet: not "0 B".
    expect(barFields('os', view({ window: 0 })).window).toBe('-');
  });

  it('uses no field name that cli-progress fills in itself', () => {
    // The formatter puts its own {total}, {value}, {eta}, ... over payload fields of those names.
    const builtIn = [
      'bar',
      'percentage',
      'total',
      'value',
      'eta',
      'eta_formatted',
      'duration',
      'duration_formatted',
    ];
    for (const key of Object.keys(barFields('os', view({})))) expect(builtIn).not.toContain(key);
  });
});

/** A terminal as cli-progress sees one: a TTY stream that keeps everything written to it. */
function fakeTerminal() {
  let text = '';
  const stream = {
    isTTY: true,
    columns: 160,
    write(chunk: string | Uint8Array) {
      text += typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString();
      return true;
    },
  };
  // readline's cursor helpers write escape sequences; strip them to read what a person would.
  // biome-ignore lint/suspicious/noControlCharactersInRegex: matching terminal escape sequences
  const plain = () => text.replace(/\x1b\[[0-9;?]*[A-Za-z]|\x1b[78]/g, '');
  return { stream: stream as unknown as NodeJS.WritableStream, plain };
}

const planned = (disk: string, bytesTotal: number): ReplicationEvent => ({
  type: 'planned',
  disk,
  kind: 'full',
  bytesTotal,
  extents: 1,
  resumedBytes: 0,
});

const progress = (disk: string, bytesDone: number, bytesTotal: number, rate: number): ReplicationEvent => ({
  type: 'progress',
  disk,
  bytesDone,
  bytesTotal,
  inflight: 0,
  window: 32 * MiB,
  rate,
});

describe('the live bars on a terminal', () => {
  beforeEach(() => {
    vi.useFakeTimers();
  });
  afterEach(() => {
    vi.useRealTimers();
  });

  it('show sizes for people on both sides and no ETA until there is a rate', () => {
    // Prepare
    const term = fakeTerminal();
    const reporter = createReporter('tty', () => {}, term.stream);
    // Act: planned, then a tick that has moved nothing yet.
    reporter.onEvent(planned('os', 48 * MiB));
    reporter.onEvent(progress('os', 0, 48 * MiB, 0));
    vi.advanceTimersByTime(1000);
    const before = term.plain();
    reporter.onEvent(progress('os', 16 * MiB, 48 * MiB, 16 * MiB));
    vi.advanceTimersByTime(1000);
    reporter.stop();
    // Assess
    expect(before).toMatch(/os +\[.*\] +0% \| 0 B \/ 48 MiB \| 0 B\/s \| window 32 MiB\s*$/);
    expect(before).not.toMatch(/50331648|INF|ETA/);
    expect(term.plain()).toMatch(/33% \| 16 MiB \/ 48 MiB \| 16 MiB\/s \| window 32 MiB \| ETA 2s/);
    expect(term.plain()).not.toMatch(/50331648|INF/);
  });

  it('keeps every bar when a line is logged above them, and prints lines logged just before the end', () => {
    // Prepare: two bars drawn once.
    const term = fakeTerminal();
    const reporter = createReporter('tty', () => {}, term.stream);
    reporter.onEvent(planned('os', 8 * MiB));
    reporter.onEvent(planned('data', 8 * MiB));
    reporter.onEvent(progress('os', 8 * MiB, 8 * MiB, 8 * MiB));
    reporter.onEvent(progress('data', 8 * MiB, 8 * MiB, 8 * MiB));
    vi.advanceTimersByTime(1000);
    // Act: a line logged while the bars stand still, then the run ends before the next redraw.
    reporter.onEvent({ type: 'window', disk: 'os', window: 48 * MiB, reason: 'stable' });
    vi.advanceTimersByTime(1000);
    reporter.onEvent({
      type: 'published',
      checkpoint: { id: 'web#1', disks: [] },
    } as unknown as ReplicationEvent);
    reporter.stop();
    // Assess: both logged lines were written, and both bars were drawn again below the last one.
    const text = term.plain();
    expect(text).toMatch(/disk os: window -> 48 MiB \(stable\)/);
    const last = text.lastIndexOf('checkpoint web#1 published');
    expect(last).toBeGreaterThan(-1);
    expect(text.slice(last)).toMatch(/ os +\[/);
    expect(text.slice(last)).toMatch(/ data +\[/);
  });

  it('writes nothing when no disk was planned', () => {
    const term = fakeTerminal();
    const reporter = createReporter('tty', () => {}, term.stream);
    reporter.stop();
    expect(term.plain()).toBe('');
  });
});

describe('the plain progress lines', () => {
  it('leave the ETA out until there is a rate', () => {
    const lines: string[] = [];
    const reporter = createReporter('plain', (l) => lines.push(l));
    reporter.onEvent(progress('os', 0, 48 * MiB, 0));
    expect(lines).toEqual(['disk os: 0 B / 48 MiB (0%) 0 B/s window 32 MiB']);
  });
});
