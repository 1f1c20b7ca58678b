// A tiny line-chart writer for benchmark results: time on x, two y axes, step or straight lines. No
// dependencies; the output is a standalone SVG a browser or a Markdown viewer shows as is.

export interface Series {
  readonly name: string;
  readonly color: string;
  /** [x, y] points in x order. */
  readonly points: readonly (readonly [number, number])[];
  /** Which y axis the series is drawn against. */
  readonly axis: 'left' | 'right';
  /** Hold each value until the next point (a window level), instead of joining points. */
  readonly step?: boolean;
  readonly dashed?: boolean;
}

export interface ChartOptions {
  readonly title: string;
  readonly subtitle?: string;
  readonly xLabel: string;
  readonly leftLabel: string;
  readonly rightLabel: string;
  readonly series: readonly Series[];
  /** Horizontal reference lines on the left axis, e.g. the link rate. */
  readonly leftMarks?: readonly { readonly y: number; readonly label: string }[];
  readonly width?: number;
  readonly height?: number;
}

const esc = (s: string) => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');

/** A "nice" axis maximum and tick step (1, 2 or 5 times a power of ten) for values up to `max`. */
function niceScale(max: number, ticks = 5): { max: number; step: number } {
  if (!(max > 0)) return { max: 1, step: 0.2 };
  const raw = max / ticks;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) ?? 10 * mag;
  return { max: Math.ceil(max / step) * step, step };
}

const fmt = (v: number) => (Math.abs(v) >= 100 || Number.isInteger(v) ? v.toFixed(0) : v.toFixed(1));

export function lineChart(o: ChartOptions): string {
  const width = o.width ?? 900;
  const height = o.height ?? 420;
  const m = { top: o.subtitle ? 62 : 44, right: 78, bottom: 74, left: 72 };
  const w = width - m.left - m.right;
  const h = height - m.top - m.bottom;
  const all = o.series.flatMap((s) => s.points);
  const xMax = niceScale(Math.max(...all.map((p) => p[0]), 1), 10);
  const leftValues = [
    ...o.series.filter((s) => s.axis === 'left').flatMap((s) => s.points.map((p) => p[1])),
    ...(o.leftMarks ?? []).map((mk) => mk.y),
  ];
  const rightValues = o.series.filter((s) => s.axis === 'right').flatMap((s) => s.points.map((p) => p[1]));
  const left = niceScale(Math.max(...leftValues, 1) * 1.05);
  const right = niceScale(Math.max(...rightValues, 1) * 1.05);
  const x = (v: number) => m.left + (v / xMax.max) * w;
  const yL = (v: number) => m.top + h - (v / left.max) * h;
  const yR = (v: number) => m.top + h - (v / right.max) * h;

  const parts: string[] = [];
  parts.push(
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" font-family="sans-serif" font-size="12">`,
    `<title>${esc(o.title)}</title>`,
    `<rect width="${width}" height="${height}" fill="white"/>`,
    `<text x="${width / 2}" y="22" text-anchor="middle" font-size="15" font-weight="bold">${esc(o.title)}</text>`,
  );
  if (o.subtitle) {
    parts.push(
      `<text x="${width / 2}" y="42" text-anchor="middle" font-size="12" fill="#444">${esc(o.subtitle)}</text>`,
    );
  }
  // Grid and axes.
  for (let v = 0; v <= left.max + 1e-9; v += left.step) {
    parts.push(
      `<line x1="${m.left}" x2="${m.left + w}" y1="${yL(v)}" y2="${yL(v)}" stroke="#e4e4e4"/>`,
      `<text x="${m.left - 6}" y="${yL(v) + 4}" text-anchor="end">${fmt(v)}</text>`,
    );
  }
  for (let v = 0; v <= right.max + 1e-9; v += right.step) {
    parts.push(`<text x="${m.left + w + 6}" y="${yR(v) + 4}">${fmt(v)}</text>`);
  }
  for (let v = 0; v <= xMax.max + 1e-9; v += xMax.step) {
    parts.push(
      `<line x1="${x(v)}" x2="${x(v)}" y1="${m.top + h}" y2="${m.top + h + 4}" stroke="#333"/>`,
      `<text x="${x(v)}" y="${m.top + h + 18}" text-anchor="middle">${fmt(v)}</text>`,
    );
  }
  parts.push(
    `<rect x="${m.left}" y="${m.top}" width="${w}" height="${h}" fill="none" stroke="#333"/>`,
    `<text x="${m.left + w / 2}" y="${m.top + h + 36}" text-anchor="middle">${esc(o.xLabel)}</text>`,
    `<text transform="translate(18 ${m.top + h / 2}) rotate(-90)" text-anchor="middle">${esc(o.leftLabel)}</text>`,
    `<text transform="translate(${width - 16} ${m.top + h / 2}) rotate(90)" text-anchor="middle">${esc(o.rightLabel)}</text>`,
  );
  for (const mk of o.leftMarks ?? []) {
    parts.push(
      `<line x1="${m.left}" x2="${m.left + w}" y1="${yL(mk.y)}" y2="${yL(mk.y)}" stroke="#999" stroke-dasharray="6 4"/>`,
      `<text x="${m.left + 6}" y="${yL(mk.y) - 5}" fill="#666">${esc(mk.label)}</text>`,
    );
  }
  // Series.
  for (const s of o.series) {
    const y = s.axis === 'left' ? yL : yR;
    const pts: string[] = [];
    s.points.forEach(([px, py], i) => {
      if (s.step && i > 0) pts.push(`${x(px).toFixed(1)},${y(s.points[i - 1]![1]).toFixed(1)}`);
      pts.push(`${x(px).toFixed(1)},${y(py).toFixed(1)}`);
    });
    const dash = s.dashed ? ' stroke-dasharray="5 3"' : '';
    parts.push(
      `<polyline fill="none" stroke="${s.color}" stroke-width="1.8"${dash} points="${pts.join(' ')}"/>`,
    );
  }
  // Legend, below the x label.
  let lx = m.left;
  const ly = height - 14;
  for (const s of o.series) {
    const dash = s.dashed ? ' stroke-dasharray="5 3"' : '';
    parts.push(
      `<line x1="${lx}" x2="${lx + 22}" y1="${ly - 4}" y2="${ly - 4}" stroke="${s.color}" stroke-width="2.5"${dash}/>`,
      `<text x="${lx + 27}" y="${ly}">${esc(s.name)} (${s.axis} axis)</text>`,
    );
    lx += 36 + (s.name.length + 13) * 6.4;
  }
  parts.push('</svg>');
  return `${parts.join('\n')}\n`;
}
