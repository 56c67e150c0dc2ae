// The training panel: an adapter's feedback counts and what waits to be trained
// (`GET /v1/feedback/stats`), starting a job (`POST /v1/training/jobs`), the jobs list, and one
// job watched live (`GET /v1/training/jobs/{id}`): progress, the loss curve, and held-out
// preference accuracy and margin before and after, with the outcome of the eval gate.

import * as api from './api.js';
import { byId, el, emit, fill, num, on, say, when } from './dom.js';
import { beforeAfterChart, COLORS, lineChart } from './charts.js';

const POLL_MS = 1500;
const TERMINAL = ['succeeded', 'failed', 'cancelled'];

let watched = null;
let lastJob = null;
let charts = null;
let timer = null;

const visible = () => !byId('panel-training').hidden;

export function init() {
  byId('train-adapter').addEventListener('change', () => refreshStats());
  byId('train-form').addEventListener('submit', (event) => {
    event.preventDefault();
    start();
  });
  byId('job-cancel').addEventListener('click', cancel);
  on('adapters-changed', (list) => fillAdapters(list));
  on('feedback-changed', () => refreshStats());
  on('signed-in', () => {
    timer = setInterval(tick, POLL_MS);
  });
  on('signed-out', () => {
    clearInterval(timer);
    watched = null;
    lastJob = null;
    fill(byId('job-rows'));
    fill(byId('train-stats'));
    byId('job-body').hidden = true;
  });
}

export function show() {
  refreshStats();
  refreshJobs();
  if (lastJob) renderJob(lastJob);
}

function fillAdapters(list) {
  const select = byId('train-adapter');
  const previous = select.value;
  fill(select, list.map((a) => el('option', { value: a.name }, a.name)));
  if (list.some((a) => a.name === previous)) select.value = previous;
  byId('train-start').disabled = list.length === 0;
  refreshStats();
}

async function refreshStats() {
  const adapter = byId('train-adapter').value;
  if (!adapter || !api.session()) {
    fill(byId('train-stats'), el('dt', {}, 'No adapter'), el('dd', {}, 'create one in Adapters'));
    return;
  }
  try {
    const s = await api.call('GET', `/feedback/stats?adapter=${encodeURIComponent(adapter)}`);
    const rows = [
      ['Thumbs up', s.up, 'up'], ['Thumbs down', s.down, 'down'], ['Corrections', s.corrections, 'corrections'],
      ['Preference pairs', s.pairs, 'pairs'], ['Demonstrations', s.demonstrations, 'demonstrations'],
      ['Unpaired thumbs-down', s.unpaired_negatives, 'unpaired_negatives'],
      ['Waiting to be trained', s.untrained, 'untrained'],
    ];
    fill(byId('train-stats'), rows.flatMap(([label, value, key]) => [
      el('dt', {}, label), el('dd', { dataset: { stat: key } }, String(value)),
    ]));
  } catch (e) {
    say(byId('train-status'), `Could not read feedback counts: ${e.message}`, 'error');
  }
}

async function refreshJobs() {
  let jobs;
  try {
    jobs = (await api.call('GET', '/training/jobs')).data;
  } catch (e) {
    say(byId('train-status'), `Could not list jobs: ${e.message}`, 'error');
    return;
  }
  byId('jobs-empty').hidden = jobs.length > 0;
  fill(byId('job-rows'), jobs.map((j) => el('tr', { 'aria-current': j.id === watched ? 'true' : false },
    el('th', { scope: 'row' }, el('button', {
      type: 'button',
      class: 'link job-id',
      'aria-label': `Watch ${j.id}`,
      title: j.id,
      onclick: () => watch(j.id),
    }, j.id.length > 14 ? `${j.id.slice(0, 12)}…` : j.id)),
    el('td', {}, j.adapter),
    el('td', {}, el('span', { class: `badge ${j.status}` }, j.status)),
    el('td', {}, `${Math.round(j.progress * 100)}%`),
    el('td', {}, j.version ? `v${j.version}${j.promoted ? ' (promoted)' : ''}` : '—'))));
}

async function tick() {
  if (!api.session()) return;
  const active = watched && !(lastJob && TERMINAL.includes(lastJob.status));
  if (active) await loadJob(watched);
  if (visible()) await refreshJobs();
}

async function start() {
  const status = byId('train-status');
  const adapter = byId('train-adapter').value;
  const body = { adapter };
  for (const [id, field] of [['train-steps', 'steps'], ['train-batch', 'batch_size'], ['train-lr', 'lr']]) {
    const raw = byId(id).value;
    if (raw !== '') body[field] = Number(raw);
  }
  say(status, `Starting a job for ${adapter}…`);
  try {
    const job = await api.call('POST', '/training/jobs', body);
    say(status, `Started ${job.id}.`, 'ok');
    await watch(job.id);
    refreshJobs();
  } catch (e) {
    say(status, `Could not start it: ${e.message}`, 'error');
  }
}

async function cancel() {
  if (!watched) return;
  try {
    renderJob(await api.call('DELETE', `/training/jobs/${encodeURIComponent(watched)}`));
  } catch (e) {
    say(byId('train-status'), `Could not cancel: ${e.message}`, 'error');
  }
}

async function watch(id) {
  watched = id;
  lastJob = null;
  await loadJob(id);
}

async function loadJob(id) {
  let job;
  try {
    job = await api.call('GET', `/training/jobs/${encodeURIComponent(id)}`);
  } catch (e) {
    say(byId('train-status'), `Could not read ${id}: ${e.message}`, 'error');
    return;
  }
  if (id !== watched) return;
  const finishedNow = TERMINAL.includes(job.status) && lastJob && !TERMINAL.includes(lastJob.status);
  lastJob = job;
  renderJob(job);
  if (finishedNow) {
    // A published version changes the adapter list and which feedback is trained.
    emit('training-finished', job);
    refreshStats();
  }
}

function ensureCharts() {
  if (charts) return charts;
  charts = {
    loss: lineChart(byId('chart-loss'), {
      series: [{ label: 'loss', color: COLORS[0] }], time: false, xLabel: 'step', format: (v) => num(v, 3),
    }),
    accuracy: beforeAfterChart(byId('chart-accuracy'), {
      label: 'accuracy', color: COLORS[2], range: [0, 1], format: (v) => num(v, 2),
    }),
    margin: beforeAfterChart(byId('chart-margin'), {
      label: 'margin', color: COLORS[1], format: (v) => num(v, 2),
    }),
  };
  return charts;
}

/** `n thing` or `n things`. */
function count(n, thing) {
  return `${n} ${thing}${n === 1 ? '' : 's'}`;
}

/** A measure as shown: counts as integers, the rest to four decimals. */
function value(v) {
  return Number.isInteger(v) ? String(v) : num(v, 4);
}

function outcome(job) {
  switch (job.status) {
    case 'succeeded':
      return job.promoted
        ? [`Published v${job.version} and made it current: it passed the eval gate.`, 'ok']
        : [`Published v${job.version} as rejected, v${job.parent_version} stays current: ${job.reason}`, 'warn'];
    case 'failed':
      return [`Failed: ${job.reason}`, 'error'];
    case 'cancelled':
      return [`Cancelled: ${job.reason}`, 'warn'];
    default:
      return [null, 'info'];
  }
}

function renderJob(job) {
  lastJob = job;
  byId('job-title').textContent = `${job.id} · ${job.adapter}`;
  const summary = byId('job-summary');
  summary.className = '';
  fill(summary,
    el('span', { class: `badge ${job.status}`, id: 'job-status' }, job.status), ' ',
    `${job.trigger} job, created ${when(job.created)}; trains v${job.parent_version ?? '?'}`,
    job.metrics?.data ? ` on ${count(job.metrics.data.pairs, 'pair')}, `
      + `${count(job.metrics.data.demonstrations, 'demonstration')}, ${job.metrics.data.unpaired} unpaired; `
      + `${count(job.metrics.data.held_out_pairs, 'pair')} held out for the gate` : '',
    '.');
  byId('job-body').hidden = false;
  const progress = byId('job-progress');
  progress.value = job.progress;
  const steps = job.total_steps ? `step ${job.step} of ${job.total_steps}` : 'preparing';
  byId('job-progress-label').textContent = `${Math.round(job.progress * 100)}% · ${steps}`;
  byId('job-cancel').hidden = TERMINAL.includes(job.status);

  const c = ensureCharts();
  const loss = job.metrics?.loss || [];
  c.loss.setData(loss.map((_, i) => i + 1), loss);
  const before = job.metrics?.eval_before || {};
  const after = job.metrics?.eval_after || {};
  c.accuracy.setData(before.logp_accuracy, after.logp_accuracy);
  c.margin.setData(before.logp_margin, after.logp_margin);

  const keys = [...new Set([...Object.keys(before), ...Object.keys(after)])]
    .filter((k) => typeof (before[k] ?? after[k]) === 'number');
  const rows = keys.map((k) => el('tr', { dataset: { measure: k } },
    el('th', { scope: 'row' }, k), el('td', {}, value(before[k])), el('td', {}, value(after[k]))));
  if (typeof job.metrics?.kl_to_base === 'number') {
    rows.push(el('tr', { dataset: { measure: 'kl_to_base' } },
      el('th', { scope: 'row' }, 'KL to base (nats/token)'), el('td', {}, '—'), el('td', {}, num(job.metrics.kl_to_base, 4))));
  }
  if (job.metrics?.eval_held_out === false) {
    rows.push(el('tr', {}, el('th', { scope: 'row' }, 'note'),
      el('td', { colspan: 2 }, 'too few pairs to hold out: evaluated on training pairs')));
  }
  fill(byId('eval-rows'), rows.length ? rows
    : [el('tr', {}, el('td', { colspan: 3, class: 'muted' }, 'Evaluated after training.'))]);

  const [text, kind] = outcome(job);
  const out = byId('job-outcome');
  out.dataset.kind = kind;
  out.textContent = text || '';
  out.hidden = !text;
}
