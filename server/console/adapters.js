// The adapters panel: the tenant's adapters (`GET /v1/adapters`), creating one, an adapter's
// versions with their lineage, status and eval metrics, activating or rolling back a version
// (`POST /v1/adapters/{name}/activate` with compare-and-swap on the current version), and two
// versions answering the same prompt side by side.

import * as api from './api.js';
import { byId, el, emit, fill, num, on, say, when } from './dom.js';

let adapters = [];
let open = null;
let baseModel = null;

export function init() {
  byId('create-form').addEventListener('submit', (event) => {
    event.preventDefault();
    create();
  });
  byId('compare-form').addEventListener('submit', (event) => {
    event.preventDefault();
    compare();
  });
  on('signed-in', () => refresh());
  on('training-finished', () => refresh());
  on('signed-out', () => {
    adapters = [];
    open = null;
    fill(byId('adapter-rows'));
    fill(byId('adapter-detail'), el('p', { class: 'muted' }, 'Open an adapter to see its versions.'));
    byId('compare-form').hidden = true;
  });
}

export function show() {
  refresh();
}

/** Reloads the list (and the open adapter) and tells the other panels. */
export async function refresh() {
  try {
    const [list, models] = await Promise.all([api.call('GET', '/adapters'), api.call('GET', '/models')]);
    adapters = list.data;
    baseModel = models.data.find((m) => !m.parent)?.id ?? null;
  } catch (e) {
    say(byId('activate-status'), `Could not list adapters: ${e.message}`, 'error');
    return;
  }
  renderList();
  if (open && !adapters.some((a) => a.name === open)) open = null;
  if (!open && adapters.length) open = adapters[0].name;
  renderDetail();
  emit('adapters-changed', adapters);
}

function renderList() {
  byId('adapters-empty').hidden = adapters.length > 0;
  fill(byId('adapter-rows'), adapters.map((a) => el('tr', { 'aria-current': a.name === open ? 'true' : false },
    el('th', { scope: 'row' }, a.name),
    el('td', {}, a.kind),
    el('td', {}, `v${a.current}`),
    el('td', {}, String(a.versions.length)),
    el('td', {}, el('button', {
      type: 'button',
      class: 'secondary',
      'aria-label': `Open ${a.name}`,
      onclick: () => {
        open = a.name;
        renderList();
        renderDetail();
        byId('adapter-detail').querySelector('h3')?.focus();
      },
    }, 'Open')))));
}

/** `v3 ← v2 ← v1` for `version` of `adapter`. */
function lineage(adapter, version) {
  const byVersion = new Map(adapter.versions.map((v) => [v.version, v]));
  const chain = [];
  const seen = new Set();
  let v = byVersion.get(version);
  while (v && !seen.has(v.version)) {
    seen.add(v.version);
    chain.push(`v${v.version}`);
    v = v.parent ? byVersion.get(v.parent) : null;
  }
  return chain.join(' ← ');
}

function evalOf(metrics, when, key) {
  const e = metrics?.[when === 'before' ? 'eval_before' : 'eval_after'];
  return e ? e[key] : undefined;
}

function change(metrics, key, digits) {
  const before = evalOf(metrics, 'before', key);
  const after = evalOf(metrics, 'after', key);
  if (before === undefined && after === undefined) return '—';
  return `${num(before, digits)} → ${num(after, digits)}`;
}

function renderDetail() {
  const detail = byId('adapter-detail');
  const adapter = adapters.find((a) => a.name === open);
  if (!adapter) {
    fill(detail, el('p', { class: 'muted' }, 'Open an adapter to see its versions.'));
    byId('compare-form').hidden = true;
    return;
  }
  const rows = [...adapter.versions].reverse().map((v) => {
    const isCurrent = v.version === adapter.current;
    const action = isCurrent
      ? el('span', { class: 'badge current' }, 'current')
      : el('button', {
        type: 'button',
        onclick: () => activate(adapter, v.version),
      }, v.version < adapter.current ? `Roll back to v${v.version}` : `Activate v${v.version}`);
    return el('tr', { dataset: { version: v.version }, 'aria-current': isCurrent ? 'true' : false },
      el('th', { scope: 'row' }, `v${v.version}`),
      el('td', {}, lineage(adapter, v.version)),
      el('td', {}, v.source, v.job_id ? el('div', { class: 'muted small' }, v.job_id) : null),
      el('td', {}, el('span', { class: `badge ${v.status}` }, v.status),
        v.reason ? el('div', { class: 'muted small' }, v.reason) : null),
      el('td', {}, when(v.created)),
      el('td', {}, change(v.metrics, 'logp_accuracy', 2)),
      el('td', {}, change(v.metrics, 'logp_margin', 3)),
      el('td', {}, num(v.metrics?.kl_to_base, 4)),
      el('td', {}, action));
  });
  fill(detail,
    el('h3', { tabindex: '-1' }, `${adapter.name} `, el('span', { class: 'muted' }, `${adapter.kind} · current v${adapter.current}`)),
    el('table', { class: 'grid', 'aria-label': `Versions of ${adapter.name}` },
      el('thead', {}, el('tr', {},
        ['Version', 'Lineage', 'Source', 'Status', 'Created', 'Held-out accuracy', 'Margin', 'KL to base', 'Action']
          .map((h) => el('th', { scope: 'col' }, h)))),
      el('tbody', {}, rows)));
  fillCompare(adapter);
}

function fillCompare(adapter) {
  const form = byId('compare-form');
  form.hidden = false;
  const choices = [
    ...[...adapter.versions].reverse().map((v) => `${adapter.name}@${v.version}`),
    ...(baseModel ? [baseModel] : []),
  ];
  for (const [id, fallback] of [['compare-a', 1], ['compare-b', 0]]) {
    const select = byId(id);
    const previous = select.value;
    fill(select, choices.map((c) => el('option', { value: c }, c === baseModel ? `${c} (base)` : c)));
    select.value = choices.includes(previous) ? previous : choices[Math.min(fallback, choices.length - 1)];
  }
}

async function create() {
  const status = byId('create-status');
  const kind = byId('create-kind').value;
  const body = { name: byId('create-name').value.trim(), kind };
  if (kind !== 'prefix') body.rank = Number(byId('create-rank').value) || undefined;
  if (kind !== 'lora') body.num_virtual_tokens = Number(byId('create-tokens').value) || undefined;
  say(status, `Creating ${body.name}…`);
  try {
    const made = await api.call('POST', '/adapters', body);
    say(status, `Created ${made.name} (v${made.current}).`, 'ok');
    byId('create-name').value = '';
    open = made.name;
    await refresh();
  } catch (e) {
    say(status, `Could not create it: ${e.message}`, 'error');
  }
}

/** Makes `version` current, unless someone changed the adapter since it was shown (409). */
async function activate(adapter, version, undo = false) {
  const status = byId('activate-status');
  const previous = adapter.current;
  try {
    await api.call('POST', `/adapters/${encodeURIComponent(adapter.name)}/activate`, {
      version, expected_current: previous,
    });
  } catch (e) {
    say(status, e.status === 409
      ? `${adapter.name} changed meanwhile; the list is refreshed, try again.`
      : `Could not activate v${version}: ${e.message}`, 'error');
    await refresh();
    return;
  }
  await refresh();
  fill(status, `${adapter.name}: v${version} is current (was v${previous}). `, undo ? null : el('button', {
    type: 'button',
    class: 'secondary',
    onclick: () => {
      const now = adapters.find((a) => a.name === adapter.name);
      if (now) activate(now, previous, true);
    },
  }, `Undo (back to v${previous})`));
  status.dataset.kind = 'ok';
  status.hidden = false;
}

async function runOne(model, prompt, maxTokens, out) {
  out.textContent = '';
  const started = performance.now();
  let served = null;
  await api.stream('/chat/completions', {
    model,
    messages: [{ role: 'user', content: prompt }],
    max_tokens: maxTokens,
    temperature: 0,
  }, (chunk) => {
    served = chunk.system_fingerprint || served;
    const delta = chunk.choices?.[0]?.delta?.content;
    if (delta) out.textContent += delta;
  });
  return { served, seconds: (performance.now() - started) / 1000 };
}

async function compare() {
  const prompt = byId('compare-prompt').value.trim();
  if (!prompt) return;
  const maxTokens = Number(byId('compare-max-tokens').value) || 48;
  const status = byId('compare-status');
  const button = byId('compare-run');
  button.disabled = true;
  say(status, 'Running both…');
  const sides = ['a', 'b'].map((side) => ({
    model: byId(`compare-${side}`).value,
    out: byId(`compare-${side}-out`),
    title: byId(`compare-${side}-title`),
  }));
  for (const s of sides) {
    s.title.textContent = s.model;
    s.out.closest('section').dataset.state = 'streaming';
  }
  try {
    const results = await Promise.all(sides.map((s) => runOne(s.model, prompt, maxTokens, s.out)));
    results.forEach((r, i) => {
      sides[i].title.textContent = `${sides[i].model} · served by ${r.served} · ${num(r.seconds, 1)} s`;
      sides[i].out.closest('section').dataset.state = 'done';
    });
    say(status, 'Both answers are in.', 'ok');
  } catch (e) {
    say(status, `The comparison failed: ${e.message}`, 'error');
  } finally {
    button.disabled = false;
  }
}
