// The progress display of `ferry recover`: a bar per disk on a terminal (a fake one, so the text
// cli-progress writes can be read) and a line per disk and phase in logs.
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { createRecoveryReporter } from '../../cli/progress.ts';
import { MiB } from '../../shared/engine/units.ts';

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
  // biome-ignore lint/suspicious/noControlCharactersInRegex: matching terminal escape sequences
  const plain = () => text.replace(/\x1b\[[0-9;?]*[A-Za-z]|\x1b[78]/g, '');
  return { stream: stream as unknown as NodeJS.WritableStream, plain };
}

describe('the recovery bars on a terminal', () => {
  beforeEach(() => {
    vi.useFakeTimers();
  });
  afterEach(() => {
    vi.useRealTimers();
  });

  it('show each disk with its share of the work and its phase, and keep lines logged above them', () => {
    // Prepare
    const term = fakeTerminal();
    const reporter = createRecoveryReporter('tty', () => {}, term.stream);
    reporter.planned([
      { disk: 'os', bytes: 40 * MiB },
      { disk: 'data', bytes: 80 * MiB },
    ]);
    // Act
    reporter.progress({ disk: 'os', phase: 'copy', bytesDone: 10 * MiB, bytesTotal: 40 * MiB });
    vi.advanceTimersByTime(1000);
    reporter.progress({ disk: 'os', phase: 'verify', bytesDone: 40 * MiB, bytesTotal: 40 * MiB });
    reporter.log('ferry: finished the clean-up of erp#3');
    vi.advanceTimersByTime(1000);
    reporter.stop();
    reporter.stop(); // the command stops it twice: once before its closing lines, once on the way out
    // Assess
    const text = term.plain();
    expect(text).toMatch(/ os +\[.*\] +25% \| copying the image/);
    expect(text).toMatch(/ os +\[.*\] +100% \| verifying/);
    expect(text).toMatch(/ data +\[.*\] +0% \| waiting/);
    expect(text).toMatch(/ferry: finished the clean-up of erp#3/);
  });
});

describe('the plain recovery lines', () => {
  it('print a line per disk when its phase changes, then at most every two seconds', () => {
    vi.useFakeTimers({ now: 0 });
    try {
      const lines: string[] = [];
      const reporter = createRecoveryReporter('plain', (l) => lines.push(l));
      reporter.progress({ disk: 'os', phase: 'copy', bytesDone: MiB, bytesTotal: 4 * MiB });
      reporter.progress({ disk: 'os', phase: 'copy', bytesDone: 2 * MiB, bytesTotal: 4 * MiB });
      reporter.progress({ disk: 'os', phase: 'verify', bytesDone: 3 * MiB, bytesTotal: 4 * MiB });
      vi.setSystemTime(2500);
      reporter.progress({ disk: 'os', phase: 'verify', bytesDone: 4 * MiB, bytesTotal: 4 * MiB });
      expect(lines).toEqual([
        'disk os: copying the image (25%)',
        'disk os: verifying (75%)',
        'disk os: verifying (100%)',
      ]);
    } finally {
      vi.useRealTimers();
    }
  });
});
