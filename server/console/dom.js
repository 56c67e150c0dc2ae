// Small DOM helpers shared by the console's panels: element building (text is always set as
// text, never parsed as HTML), formatting, and the page-wide events panels use to tell each
// other that adapters or feedback changed.

/** `el('button', {class: 'x', onclick: f}, 'Label', child)`: builds an element. */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith('on') && typeof value === 'function') {
      node.addEventListener(name.slice(2), value);
    } else if (name === 'dataset') {
      Object.assign(node.dataset, value);
    } else if (value === true) {
      node.setAttribute(name, '');
    } else {
      node.setAttribute(name, String(value));
    }
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** The element with id `id`; throws when the page lacks it (a bug, not a user error). */
export function byId(id) {
  const node = document.getElementById(id);
  if (!node) throw new Error(`#${id} is missing from the page`);
  return node;
}

/** Replaces the children of `node`. */
export function fill(node, ...children) {
  node.replaceChildren();
  for (const child of children.flat()) {
    if (child !== undefined && child !== null && child !== false) node.append(child);
  }
}

/** Shows `message` in a status or alert region (empty hides it). */
export function say(node, message, kind = 'info') {
  node.textContent = message || '';
  node.dataset.kind = kind;
  node.hidden = !message;
}

/** Unix seconds as a local date and time. */
export function when(unix) {
  if (!unix) return '—';
  return new Date(unix * 1000).toLocaleString(undefined, {
    month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit', second: '2-digit',
  });
}

/** A number with `digits` decimals, or a dash when it is missing. */
export function num(value, digits = 3) {
  return typeof value === 'number' && Number.isFinite(value) ? value.toFixed(digits) : '—';
}

/** A byte count in KiB or MiB. */
export function bytes(n) {
  if (typeof n !== 'number' || !Number.isFinite(n)) return '—';
  if (n >= 1 << 20) return `${(n / (1 << 20)).toFixed(1)} MiB`;
  if (n >= 1 << 10) return `${(n / (1 << 10)).toFixed(1)} KiB`;
  return `${n} B`;
}

/** Page-wide events: `adapters-changed`, `feedback-changed`, `signed-in`, `signed-out`. */
export function emit(name, detail) {
  document.dispatchEvent(new CustomEvent(name, { detail }));
}

/** Listens to a page-wide event. */
export function on(name, handler) {
  document.addEventListener(name, (e) => handler(e.detail));
}
