// The chat panel: a conversation with the base model or one of the tenant's adapters (its
// current version or a pinned `name@N`), streamed from `POST /v1/chat/completions`; every
// answer can be rated up or down and corrected (`POST /v1/feedback` with the completion id of
// the stream), and the side bar shows the feedback counts of the adapter in use.

import * as api from './api.js';
import { byId, el, emit, fill, num, on, say } from './dom.js';

/** The conversation so far, as sent to the API: `{role, content}`. */
let history = [];
let baseModel = null;
let running = null;

const input = () => byId('chat-input');

/** The adapter name feedback stats are kept under for `model` (`base` for the base model). */
function adapterOf(model) {
  if (!model || model === baseModel) return 'base';
  return model.split('@')[0];
}

export function init() {
  byId('chat-form').addEventListener('submit', (event) => {
    event.preventDefault();
    send();
  });
  input().addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  byId('chat-stop').addEventListener('click', () => running?.abort());
  byId('chat-new').addEventListener('click', () => {
    running?.abort();
    history = [];
    fill(byId('messages'));
    say(byId('chat-status'), 'New conversation.');
    input().focus();
  });
  byId('chat-model').addEventListener('change', () => refreshStats());
  on('adapters-changed', (list) => loadModels(list));
  on('feedback-changed', () => refreshStats());
  on('signed-out', () => {
    running?.abort();
    history = [];
    fill(byId('messages'));
    fill(byId('chat-model'));
    fill(byId('chat-stats'));
  });
}

export function show() {
  refreshStats();
}

/** Fills the model menu from `GET /v1/models` and the adapters' versions. */
async function loadModels(adapters) {
  const select = byId('chat-model');
  const previous = select.value;
  let models;
  try {
    models = (await api.call('GET', '/models')).data;
  } catch (e) {
    say(byId('chat-status'), `Could not list models: ${e.message}`, 'error');
    return;
  }
  baseModel = models.find((m) => !m.parent)?.id ?? null;
  const current = models.filter((m) => m.parent);
  const groups = [
    el('optgroup', { label: 'Base' }, el('option', { value: baseModel }, `${baseModel} (base)`)),
  ];
  if (current.length) {
    groups.push(el('optgroup', { label: 'Adapters (current version)' },
      current.map((m) => el('option', { value: m.id }, `${m.id} (v${m.version})`))));
  }
  const pinned = (adapters || []).flatMap((a) => a.versions.map((v) => `${a.name}@${v.version}`));
  if (pinned.length) {
    groups.push(el('optgroup', { label: 'Pinned versions' },
      pinned.map((id) => el('option', { value: id }, id))));
  }
  fill(select, groups);
  const values = [...select.options].map((o) => o.value);
  select.value = values.includes(previous) ? previous : baseModel;
  refreshStats();
}

/** Shows the feedback counts of the selected model's adapter. */
export async function refreshStats() {
  const model = byId('chat-model').value;
  if (!model || !api.session()) return;
  const adapter = adapterOf(model);
  const label = byId('chat-stats-adapter');
  if (label.textContent !== adapter) {
    // Another adapter's counts must not stand under this name while these load.
    fill(byId('chat-stats'));
    label.textContent = adapter;
  }
  try {
    const s = await api.call('GET', `/feedback/stats?adapter=${encodeURIComponent(adapter)}`);
    if (adapterOf(byId('chat-model').value) !== adapter) return;
    const rows = [
      ['Thumbs up', s.up, 'up'], ['Thumbs down', s.down, 'down'],
      ['Corrections', s.corrections, 'corrections'], ['Not yet trained on', s.untrained, 'untrained'],
    ];
    fill(byId('chat-stats'), rows.flatMap(([label, value, key]) => [
      el('dt', {}, label), el('dd', { dataset: { stat: key } }, String(value)),
    ]));
  } catch (e) {
    say(byId('chat-status'), `Could not read feedback counts: ${e.message}`, 'error');
  }
}

function bubble(role, text) {
  return el('li', { class: `msg ${role}` },
    el('div', { class: 'who' }, role === 'user' ? 'You' : 'Assistant'),
    el('div', { class: 'text' }, text));
}

async function send() {
  const text = input().value.trim();
  if (!text || running) return;
  const model = byId('chat-model').value;
  const maxTokens = Number(byId('chat-max-tokens').value) || undefined;
  const temperature = Number(byId('chat-temperature').value);
  const system = byId('chat-system').value.trim();
  const list = byId('messages');
  history.push({ role: 'user', content: text });
  list.append(bubble('user', text));
  input().value = '';

  const answer = answerView(model);
  list.append(answer.node);
  answer.node.scrollIntoView({ block: 'end' });
  running = new AbortController();
  byId('chat-stop').disabled = false;
  byId('chat-send').disabled = true;
  say(byId('chat-status'), `Asking ${model}…`);
  const messages = system ? [{ role: 'system', content: system }, ...history] : [...history];
  const started = performance.now();
  let firstToken = null;
  let content = '';
  let id = null;
  let served = null;
  let usage = null;
  let finish = null;
  try {
    await api.stream('/chat/completions', {
      model, messages, max_tokens: maxTokens, temperature, stream_options: { include_usage: true },
    }, (chunk) => {
      id = chunk.id || id;
      served = chunk.system_fingerprint || served;
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices?.[0];
      if (choice?.delta?.content) {
        firstToken ??= performance.now() - started;
        content += choice.delta.content;
        answer.setText(content);
        answer.node.scrollIntoView({ block: 'end' });
      }
      if (choice?.finish_reason) finish = choice.finish_reason;
    }, running.signal);
    history.push({ role: 'assistant', content });
    const seconds = (performance.now() - started) / 1000;
    answer.done({
      id, served, usage, finish, seconds, firstToken,
    });
    say(byId('chat-status'), `Answer complete (${served}). Rate it below.`);
  } catch (e) {
    const stopped = e.name === 'AbortError';
    history.pop();
    answer.failed(stopped ? 'Stopped.' : e.message);
    say(byId('chat-status'), stopped ? 'Stopped.' : `The request failed: ${e.message}`, stopped ? 'info' : 'error');
  } finally {
    running = null;
    byId('chat-stop').disabled = true;
    byId('chat-send').disabled = false;
    input().focus();
  }
}

/** An assistant message that fills while it streams, then offers rating and correction. */
function answerView(model) {
  const text = el('div', { class: 'text', 'aria-busy': 'true' });
  const meta = el('div', { class: 'meta' }, `${model} · streaming…`);
  const node = el('li', { class: 'msg assistant', dataset: { state: 'streaming' } },
    el('div', { class: 'who' }, 'Assistant'), text, meta);
  return {
    node,
    setText(t) {
      text.textContent = t;
    },
    failed(message) {
      node.dataset.state = 'error';
      text.removeAttribute('aria-busy');
      meta.textContent = message;
    },
    done(r) {
      node.dataset.state = 'done';
      node.dataset.completionId = r.id;
      text.removeAttribute('aria-busy');
      if (!text.textContent) text.textContent = '(empty answer)';
      const tokens = r.usage ? `${r.usage.completion_tokens} tokens` : null;
      const ttft = r.firstToken !== null ? `first token ${Math.round(r.firstToken)} ms` : null;
      meta.textContent = [`served by ${r.served}`, tokens, ttft, `${num(r.seconds, 1)} s`,
        r.finish === 'length' ? 'cut at max tokens' : null].filter(Boolean).join(' · ');
      node.append(feedbackControls(r.id, text.textContent));
    },
  };
}

function feedbackControls(completionId, answerText) {
  let rating = null;
  const status = el('p', { class: 'status small', role: 'status', hidden: true });
  const up = el('button', { type: 'button', class: 'rate', 'aria-pressed': 'false', dataset: { rating: 'up' } }, 'Thumbs up');
  const down = el('button', { type: 'button', class: 'rate', 'aria-pressed': 'false', dataset: { rating: 'down' } }, 'Thumbs down');
  const toggle = el('button', { type: 'button', class: 'secondary', 'aria-expanded': 'false' }, 'Write a correction');
  const correction = el('textarea', { rows: 3 });
  correction.value = answerText;
  const correctionId = `correction-${completionId}`;
  correction.id = correctionId;
  const form = el('form', { class: 'correction', hidden: true },
    el('label', { for: correctionId }, 'A better answer (sent as a correction; the rating stays, or becomes thumbs-down if none)'),
    correction,
    el('button', { type: 'submit' }, 'Send correction'));

  async function submit(body) {
    say(status, 'Saving…');
    try {
      const fb = await api.call('POST', '/feedback', { completion_id: completionId, choice_index: 0, ...body });
      rating = fb.rating;
      up.setAttribute('aria-pressed', String(rating === 'up'));
      down.setAttribute('aria-pressed', String(rating === 'down'));
      say(status, body.correction
        ? `Correction saved (${fb.id}, rated ${fb.rating}).`
        : `Rated ${fb.rating} (${fb.id}).`, 'ok');
      emit('feedback-changed');
    } catch (e) {
      say(status, `Could not save the feedback: ${e.message}`, 'error');
    }
  }

  up.addEventListener('click', () => submit({ rating: 'up' }));
  down.addEventListener('click', () => submit({ rating: 'down' }));
  toggle.addEventListener('click', () => {
    form.hidden = !form.hidden;
    toggle.setAttribute('aria-expanded', String(!form.hidden));
    if (!form.hidden) correction.focus();
  });
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    const better = correction.value.trim();
    if (!better) {
      say(status, 'Write the better answer first.', 'error');
      return;
    }
    submit({ rating: rating || 'down', correction: better });
  });
  return el('div', { class: 'feedback' },
    el('div', { class: 'buttons', role: 'group', 'aria-label': 'Rate this answer' }, up, down, toggle),
    form, status);
}
