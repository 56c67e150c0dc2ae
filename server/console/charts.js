// Small charts on the vendored uPlot (server/console/vendor, MIT): a line chart for time
// series and curves, and a two-bar "before / after" chart. Each chart follows its container's
// width, so it draws correctly once a hidden panel is shown.

const INK = '#1f2933';
const GRID = '#e4e7eb';
const FONT = '12px system-ui, sans-serif';

/** Tick spacings of a step axis: whole steps only. */
const STEP_INCREMENTS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000];

/** Series colours, distinguishable for the common colour-vision deficiencies. */
export const COLORS = ['#0b6bcb', '#d55e00', '#009e73', '#cc79a7', '#6b4fbb'];

function uplot() {
  const u = globalThis.uPlot;
  if (!u) throw new Error('the charting library (vendor/uPlot.iife.min.js) did not load');
  return u;
}

function axis(format) {
  return {
    stroke: INK,
    font: FONT,
    grid: { stroke: GRID, width: 1 },
    ticks: { stroke: GRID, width: 1 },
    ...(format ? { values: (_u, splits) => splits.map(format) } : {}),
  };
}

function follow(chart, container, height) {
  const resize = () => {
    const width = Math.max(160, Math.floor(container.clientWidth));
    if (container.clientWidth > 0 && width !== chart.width) chart.setSize({ width, height });
  };
  new ResizeObserver(resize).observe(container);
  resize();
}

/**
 * A line chart in `container`. `series`: `[{label, color?, format?}]`; `time`: the x values
 * are unix seconds; `format`: y-axis labels; `yMin`: keep this value in view (e.g. 0).
 * Returns `{setData(xs, ...ys)}`; a null y is a gap.
 */
export function lineChart(container, { series, time = true, format, yMin, xLabel, height = 150 }) {
  const U = uplot();
  const opts = {
    width: Math.max(160, container.clientWidth || 320),
    height,
    scales: {
      x: { time },
      y: {
        range: (_u, min, max) => {
          if (min === null || max === null) return [0, 1];
          let lo = yMin !== undefined ? Math.min(yMin, min) : min;
          let hi = max;
          if (hi === lo) {
            hi += Math.abs(hi) * 0.1 || 1;
            lo -= yMin !== undefined && lo >= yMin ? 0 : Math.abs(lo) * 0.1 || 1;
          }
          const pad = (hi - lo) * 0.08;
          return [yMin !== undefined && lo >= yMin ? lo : lo - pad, hi + pad];
        },
      },
    },
    series: [
      { label: xLabel || (time ? 'time' : 'x') },
      ...series.map((s, i) => ({
        label: s.label,
        stroke: s.color || COLORS[i % COLORS.length],
        width: 2,
        spanGaps: false,
        points: { show: !time, size: 4 },
        value: (_u, v) => (v === null || v === undefined ? '—' : (s.format || format || String)(v)),
      })),
    ],
    axes: [
      time ? axis() : { ...axis((v) => String(v)), incrs: STEP_INCREMENTS },
      { ...axis(format), size: 56 },
    ],
    cursor: { drag: { x: false, y: false } },
    // One series is named by the figure's caption; several need the legend to tell them apart.
    legend: { show: series.length > 1, live: true },
  };
  const empty = [[], ...series.map(() => [])];
  const chart = new U(opts, empty, container);
  chart.root.querySelector('.u-wrap')?.setAttribute('aria-hidden', 'true');
  follow(chart, container, height);
  return {
    setData(xs, ...ys) {
      chart.setData([xs, ...ys]);
    },
  };
}

/**
 * A two-bar chart ("before", "after") in `container`; `range`: a fixed y range such as
 * [0, 1], else the bars' extent with 0 kept in view. Returns `{setData(before, after)}`.
 */
export function beforeAfterChart(container, { label, color = COLORS[0], format, range, height = 150 }) {
  const U = uplot();
  const names = ['before', 'after'];
  const opts = {
    width: Math.max(160, container.clientWidth || 240),
    height,
    scales: {
      x: { time: false, range: [-0.6, 1.6] },
      y: {
        range: range
          ? () => range
          : (_u, min, max) => {
            const lo = Math.min(0, min ?? 0);
            const hi = Math.max(0, max ?? 0);
            const pad = (hi - lo) * 0.15 || 1;
            return [lo < 0 ? lo - pad : 0, hi > 0 ? hi + pad : 0];
          },
      },
    },
    series: [
      { label: 'when', value: (_u, v) => names[v] ?? '' },
      {
        label,
        stroke: color,
        fill: `${color}cc`,
        width: 1,
        paths: U.paths.bars({ size: [0.5, 90] }),
        points: { show: false },
        value: (_u, v) => (v === null || v === undefined ? '—' : (format || String)(v)),
      },
    ],
    axes: [
      { ...axis((v) => names[v] ?? ''), splits: () => [0, 1] },
      { ...axis(format), size: 56 },
    ],
    cursor: { drag: { x: false, y: false } },
    legend: { show: false },
  };
  const chart = new U(opts, [[0, 1], [null, null]], container);
  chart.root.querySelector('.u-wrap')?.setAttribute('aria-hidden', 'true');
  follow(chart, container, height);
  return {
    setData(before, after) {
      chart.setData([[0, 1], [before ?? null, after ?? null]]);
    },
  };
}
