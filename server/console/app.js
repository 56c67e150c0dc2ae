// The console's entry point: sign-in, the section tabs (WAI-ARIA tabs: arrow keys, Home and
// End move between them), the readiness banner, and starting each panel.

import * as api from './api.js';
import { byId, emit, say } from './dom.js';
import * as chat from './chat.js';
import * as adapters from './adapters.js';
import * as training from './training.js';
import * as metrics from './metrics.js';

const PANELS = { chat, adapters, training, metrics };
const READY_POLL_MS = 3000;

const tabs = [...document.querySelectorAll('[role="tab"]')];

function panelOf(tab) {
  return byId(tab.getAttribute('aria-controls'));
}

function select(tab, focus = false) {
  for (const t of tabs) {
    const selected = t === tab;
    t.setAttribute('aria-selected', String(selected));
    t.tabIndex = selected ? 0 : -1;
    panelOf(t).hidden = !selected;
  }
  if (focus) tab.focus();
  PANELS[tab.id.replace('tab-', '')].show?.();
}

function onTabKey(event) {
  const i = tabs.indexOf(event.target);
  if (i < 0) return;
  const moves = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 };
  if (!(event.key in moves)) return;
  event.preventDefault();
  select(tabs[(moves[event.key] + tabs.length) % tabs.length], true);
}

async function enter(key, tenant, remember) {
  api.signIn(key, tenant, remember);
  try {
    // Checks the key (401) and, for an admin key, that it names a tenant (400).
    await api.call('GET', '/adapters');
  } catch (e) {
    api.signOut();
    throw e;
  }
  // The key now lives only in api.js (and sessionStorage if asked): not in the form.
  byId('key').value = '';
  byId('sign-in').hidden = true;
  byId('tabs').hidden = false;
  byId('who').hidden = false;
  byId('who-label').textContent = tenant ? `Signed in · tenant ${tenant}` : 'Signed in';
  emit('signed-in');
  select(tabs[0]);
  byId('chat-input').focus();
}

function leave() {
  api.signOut();
  emit('signed-out');
  for (const t of tabs) panelOf(t).hidden = true;
  byId('tabs').hidden = true;
  byId('who').hidden = true;
  byId('sign-in').hidden = false;
  byId('key').focus();
}

async function watchReadiness() {
  const banner = byId('server-state');
  try {
    const r = await fetch('/ready', { cache: 'no-store' });
    if (r.ok) {
      say(banner, '');
      return;
    }
    const body = await r.json().catch(() => ({}));
    say(banner, `The server is ${body.status || 'not ready'}: chat waits until the model is loaded.`, 'warn');
  } catch {
    say(banner, 'The server does not answer.', 'error');
  }
  setTimeout(watchReadiness, READY_POLL_MS);
}

function start() {
  for (const panel of Object.values(PANELS)) panel.init();
  byId('tabs').addEventListener('keydown', onTabKey);
  for (const t of tabs) t.addEventListener('click', () => select(t));
  byId('sign-out').addEventListener('click', leave);
  byId('sign-in-form').addEventListener('submit', async (event) => {
    event.preventDefault();
    const error = byId('sign-in-error');
    const keyInput = byId('key');
    const key = keyInput.value.trim();
    const tenant = byId('tenant').value.trim();
    say(error, '');
    try {
      await enter(key, tenant, byId('remember').checked);
    } catch (e) {
      say(error, e.status === 401 ? 'That key is not valid for this server.' : e.message, 'error');
      keyInput.focus();
    }
  });
  watchReadiness();
  const saved = api.remembered();
  if (saved) {
    enter(saved.key, saved.tenant, true).catch(() => byId('key').focus());
  } else {
    byId('key').focus();
  }
}

start();
