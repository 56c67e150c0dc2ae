// Reads the Prometheus text exposition format (version 0.0.4) of `GET /metrics`: samples
// with their labels, sums over label sets, and quantiles of histogram bucket deltas the way
// PromQL's histogram_quantile interpolates them.

/** Parses `text` into a Map from metric name to its samples `[{labels, value}]`. */
export function parse(text) {
  const samples = new Map();
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (!line || line.startsWith('#')) continue;
    const sample = parseLine(line);
    if (!sample) continue;
    if (!samples.has(sample.name)) samples.set(sample.name, []);
    samples.get(sample.name).push({ labels: sample.labels, value: sample.value });
  }
  return samples;
}

function parseLine(line) {
  const nameEnd = line.search(/[{\s]/);
  if (nameEnd <= 0) return null;
  const name = line.slice(0, nameEnd);
  let rest = line.slice(nameEnd);
  const labels = {};
  if (rest.startsWith('{')) {
    let i = 1;
    while (i < rest.length && rest[i] !== '}') {
      const eq = rest.indexOf('=', i);
      if (eq < 0 || rest[eq + 1] !== '"') return null;
      const key = rest.slice(i, eq).trim();
      let value = '';
      let j = eq + 2;
      for (; j < rest.length && rest[j] !== '"'; j++) {
        if (rest[j] === '\\' && j + 1 < rest.length) {
          j++;
          value += rest[j] === 'n' ? '\n' : rest[j];
        } else {
          value += rest[j];
        }
      }
      labels[key] = value;
      i = j + 1;
      if (rest[i] === ',') i++;
    }
    rest = rest.slice(i + 1);
  }
  const [valueText] = rest.trim().split(/\s+/);
  const value = parseValue(valueText);
  return Number.isNaN(value) && valueText !== 'NaN' ? null : { name, labels, value };
}

function parseValue(text) {
  if (text === '+Inf') return Infinity;
  if (text === '-Inf') return -Infinity;
  return Number(text);
}

/** The sum of `name`'s samples whose labels match every entry of `where` (0 when absent). */
export function total(samples, name, where = {}) {
  let sum = 0;
  for (const s of samples.get(name) || []) {
    if (Object.entries(where).every(([k, v]) => s.labels[k] === v)) sum += s.value;
  }
  return sum;
}

/** Cumulative bucket counts of histogram `name`, sorted by upper bound: `[[le, count]]`. */
export function buckets(samples, name) {
  const out = new Map();
  for (const s of samples.get(`${name}_bucket`) || []) {
    const le = parseValue(s.labels.le);
    out.set(le, (out.get(le) || 0) + s.value);
  }
  return [...out.entries()].sort((a, b) => a[0] - b[0]);
}

/**
 * The `q` quantile of the observations that arrived between two bucket readings (`before`
 * may be null: since start), linearly interpolated inside its bucket; null when none arrived.
 */
export function quantile(q, now, before) {
  const prev = new Map(before || []);
  const counts = now.map(([le, c]) => [le, c - (prev.get(le) || 0)]);
  const count = counts.length ? counts[counts.length - 1][1] : 0;
  if (count <= 0) return null;
  const rank = q * count;
  let lower = 0;
  let below = 0;
  for (const [le, c] of counts) {
    if (c >= rank) {
      if (le === Infinity) return lower;
      const inBucket = c - below;
      return inBucket > 0 ? lower + (le - lower) * ((rank - below) / inBucket) : le;
    }
    lower = le;
    below = c;
  }
  return lower;
}
