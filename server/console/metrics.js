// The metrics panel: reads `GET /metrics` every few seconds while signed in, and charts what
// changed between two readings: tokens per second, time to first token (mean and p90 of the
// requests in the interval, from the histogram), requests running and queued, and resident
// adapters. The last five minutes are kept; nothing is stored.

import * as api from './api.js';
import { byId, bytes, el, fill, num, on } from './dom.js';
import { lineChart } from './charts.js';
import { buckets, parse, quantile, total } from './prometheus.js';

const POLL_MS = 2000;
const KEEP = 150;
const P = 'prefix_rft_';

let timer = null;
let previous = null;
let series = null;
let charts = null;

function empty() {
  return {
    t: [], generated: [], prompt: [], ttftMean: [], ttftP90: [], running: [], waiting: [], resident: [],
  };
}

export function init() {
  byId('metrics-interval').textContent = String(POLL_MS / 1000);
  on('signed-in', () => {
    series = empty();
    previous = null;
    poll();
    timer = setInterval(poll, POLL_MS);
  });
  on('signed-out', () => clearInterval(timer));
}

export function show() {
  ensureCharts();
  draw();
}

function ensureCharts() {
  if (charts) return;
  charts = {
    throughput: lineChart(byId('chart-throughput'), {
      series: [{ label: 'generated' }, { label: 'prompt' }], format: (v) => num(v, 1), yMin: 0,
    }),
    ttft: lineChart(byId('chart-ttft'), {
      series: [{ label: 'mean' }, { label: 'p90' }], format: (v) => num(v, 0), yMin: 0,
    }),
    queue: lineChart(byId('chart-queue'), {
      series: [{ label: 'running' }, { label: 'waiting' }], format: (v) => num(v, 0), yMin: 0,
    }),
    adapters: lineChart(byId('chart-adapters'), {
      series: [{ label: 'resident' }], format: (v) => num(v, 0), yMin: 0,
    }),
  };
}

function draw() {
  if (!charts || !series) return;
  const s = series;
  charts.throughput.setData(s.t, s.generated, s.prompt);
  charts.ttft.setData(s.t, s.ttftMean, s.ttftP90);
  charts.queue.setData(s.t, s.running, s.waiting);
  charts.adapters.setData(s.t, s.resident);
}

function push(name, value) {
  series[name].push(value);
  if (series[name].length > KEEP) series[name].shift();
}

async function poll() {
  let samples;
  try {
    samples = parse(await api.metricsText());
  } catch (e) {
    byId('metrics-updated').textContent = `last read failed: ${e.message}`;
    return;
  }
  const now = {
    t: Date.now() / 1000,
    generated: total(samples, `${P}generation_tokens_total`),
    prompt: total(samples, `${P}prompt_tokens_total`),
    ttftSum: total(samples, `${P}time_to_first_token_seconds_sum`),
    ttftCount: total(samples, `${P}time_to_first_token_seconds_count`),
    ttftBuckets: buckets(samples, `${P}time_to_first_token_seconds`),
    running: total(samples, `${P}requests_running`),
    waiting: total(samples, `${P}requests_waiting`),
    resident: total(samples, `${P}adapters_resident`),
    residentBytes: total(samples, `${P}adapters_resident_bytes`),
    requests: total(samples, `${P}requests_total`),
    up: total(samples, `${P}feedback_total`, { rating: 'up' }),
    down: total(samples, `${P}feedback_total`, { rating: 'down' }),
    jobsRunning: total(samples, `${P}training_jobs`, { status: 'running' }),
    jobsSucceeded: total(samples, `${P}training_jobs`, { status: 'succeeded' }),
    lastLoss: samples.has(`${P}training_last_loss`) ? total(samples, `${P}training_last_loss`) : null,
  };
  if (previous) {
    const dt = Math.max(1e-3, now.t - previous.t);
    const n = now.ttftCount - previous.ttftCount;
    push('t', now.t);
    push('generated', Math.max(0, now.generated - previous.generated) / dt);
    push('prompt', Math.max(0, now.prompt - previous.prompt) / dt);
    push('ttftMean', n > 0 ? ((now.ttftSum - previous.ttftSum) / n) * 1000 : null);
    const p90 = quantile(0.9, now.ttftBuckets, previous.ttftBuckets);
    push('ttftP90', p90 === null ? null : p90 * 1000);
    push('running', now.running);
    push('waiting', now.waiting);
    push('resident', now.resident);
    if (charts && !byId('panel-metrics').hidden) draw();
  }
  summarise(now);
  previous = now;
  byId('metrics-updated').textContent = `last read ${new Date().toLocaleTimeString()}`;
}

function summarise(now) {
  const last = (name) => series[name].length ? series[name][series[name].length - 1] : null;
  const allTimeTtft = now.ttftCount > 0 ? (now.ttftSum / now.ttftCount) * 1000 : null;
  const rows = [
    ['Generated tokens/s', num(last('generated'), 1), 'generated'],
    ['TTFT, all requests (mean)', allTimeTtft === null ? '—' : `${num(allTimeTtft, 0)} ms`, 'ttft'],
    ['Running', String(now.running), 'running'],
    ['Queued', String(now.waiting), 'waiting'],
    ['Resident adapters', `${now.resident} (${bytes(now.residentBytes)})`, 'resident'],
    ['Requests served', String(now.requests), 'requests'],
    ['Feedback submitted up / down', `${now.up} / ${now.down}`, 'feedback'],
    ['Training jobs running / succeeded', `${now.jobsRunning} / ${now.jobsSucceeded}`, 'jobs'],
    ['Last training loss', now.lastLoss === null || now.jobsSucceeded + now.jobsRunning === 0 ? '—' : num(now.lastLoss, 4), 'loss'],
  ];
  fill(byId('metrics-now'), rows.flatMap(([label, value, key]) => [
    el('dt', {}, label), el('dd', { dataset: { metric: key } }, value),
  ]));
}
