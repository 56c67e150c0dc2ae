// The console's only way to the server: JSON calls and server-sent-event streams to `/v1`,
// with the key as `Authorization: Bearer`. The key lives in this module's memory; only when
// the person asks for it is it also kept in this tab's sessionStorage (never localStorage or a
// cookie), so it is gone when the tab closes.

const SESSION_KEY = 'prefix-rft-console';

let credentials = null;

/** An error body of the API (`{"error": {message, type, param, code}}`) with its status. */
export class ApiError extends Error {
  constructor(status, error) {
    super(error?.message || `HTTP ${status}`);
    this.status = status;
    this.type = error?.type || null;
    this.param = error?.param || null;
    this.code = error?.code || null;
  }
}

/** Uses `key` (and, for an admin key, `tenant`) for every later call. */
export function signIn(key, tenant, remember) {
  credentials = { key, tenant: tenant || null };
  if (remember) {
    sessionStorage.setItem(SESSION_KEY, JSON.stringify(credentials));
  } else {
    sessionStorage.removeItem(SESSION_KEY);
  }
}

/** Forgets the key, in memory and in sessionStorage. */
export function signOut() {
  credentials = null;
  sessionStorage.removeItem(SESSION_KEY);
}

/** The key kept in this tab's sessionStorage, if the person asked to keep it. */
export function remembered() {
  try {
    const saved = JSON.parse(sessionStorage.getItem(SESSION_KEY) || 'null');
    return saved && typeof saved.key === 'string' ? saved : null;
  } catch {
    return null;
  }
}

/** Who is signed in: `{tenant}` or null (the key itself is not handed out). */
export function session() {
  return credentials ? { tenant: credentials.tenant } : null;
}

function headers(extra = {}) {
  if (!credentials) throw new ApiError(401, { message: 'not signed in' });
  const h = { Authorization: `Bearer ${credentials.key}`, ...extra };
  if (credentials.tenant) h['X-Tenant'] = credentials.tenant;
  return h;
}

async function errorOf(response) {
  const text = await response.text();
  try {
    return new ApiError(response.status, JSON.parse(text).error);
  } catch {
    return new ApiError(response.status, { message: text || response.statusText });
  }
}

/** `method path` under `/v1` with an optional JSON body; resolves to the parsed JSON reply. */
export async function call(method, path, body) {
  const init = { method, headers: headers(body === undefined ? {} : { 'Content-Type': 'application/json' }) };
  if (body !== undefined) init.body = JSON.stringify(body);
  const response = await fetch(`/v1${path}`, init);
  if (!response.ok) throw await errorOf(response);
  if (response.status === 204) return null;
  return response.json();
}

/**
 * POSTs `body` to `path` as a stream and calls `onFrame` with every parsed `data:` frame
 * until `[DONE]`. An error frame inside the stream (API.md "Errors") is thrown as an
 * ApiError, as is an error status before the stream starts.
 */
export async function stream(path, body, onFrame, signal) {
  const response = await fetch(`/v1${path}`, {
    method: 'POST',
    headers: headers({ 'Content-Type': 'application/json', Accept: 'text/event-stream' }),
    body: JSON.stringify({ ...body, stream: true }),
    signal,
  });
  if (!response.ok) throw await errorOf(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, '');
      const data = event
        .split(/\r?\n/)
        .filter((line) => line.startsWith('data:'))
        .map((line) => line.slice(5).replace(/^ /, ''))
        .join('\n');
      if (!data) continue;
      if (data === '[DONE]') return;
      const frame = JSON.parse(data);
      if (frame.error) throw new ApiError(response.status, frame.error);
      onFrame(frame);
    }
  }
}

/** `GET /metrics` (no key needed): the Prometheus text. */
export async function metricsText() {
  const response = await fetch('/metrics', { cache: 'no-store' });
  if (!response.ok) throw await errorOf(response);
  return response.text();
}
