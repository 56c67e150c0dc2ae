//! Per-sequence key/value cache, written in place as tokens are appended.

use super::config::ModelConfig;
use super::hooks::AdapterHook;

/// Keys and values of one sequence for every layer, `len × kv_dim` each, token-major.
///
/// A prefix adapter's virtual tokens are the first `prefix_len` entries: they are attended to
/// like any other position but are never returned as output.
#[derive(Debug, Clone)]
pub struct KvCache {
    kv_dim: usize,
    len: usize,
    prefix_len: usize,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
}

impl KvCache {
    /// An empty cache for `cfg`.
    pub fn new(cfg: &ModelConfig) -> Self {
        KvCache {
            kv_dim: cfg.kv_dim(),
            len: 0,
            prefix_len: 0,
            keys: vec![Vec::new(); cfg.num_layers],
            values: vec![Vec::new(); cfg.num_layers],
        }
    }

    /// A cache that starts with an adapter's prefix key/values (empty if it has none).
    pub fn with_adapter(cfg: &ModelConfig, adapter: Option<&dyn AdapterHook>) -> Self {
        let mut cache = Self::new(cfg);
        let Some(adapter) = adapter else { return cache };
        let mut prefix_len = None;
        for layer in 0..cfg.num_layers {
            if let Some((k, v)) = adapter.prefix_kv(layer) {
                let n = k.len() / cache.kv_dim.max(1);
                if k.len() != v.len()
                    || k.len() % cache.kv_dim.max(1) != 0
                    || prefix_len.is_some_and(|p| p != n)
                {
                    // The adapter validator guarantees consistent shapes; an inconsistent hook
                    // is ignored rather than corrupting the cache.
                    return Self::new(cfg);
                }
                prefix_len = Some(n);
                cache.keys[layer].extend_from_slice(k);
                cache.values[layer].extend_from_slice(v);
            }
        }
        let n = prefix_len.unwrap_or(0);
        cache.len = n;
        cache.prefix_len = n;
        cache
    }

    /// Positions held, including a prefix.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Virtual prefix positions at the start.
    pub fn prefix_len(&self) -> usize {
        self.prefix_len
    }

    /// Drops everything after the first `len` positions (never the prefix), e.g. to reuse a
    /// shared prompt.
    pub fn truncate(&mut self, len: usize) {
        let len = len.max(self.prefix_len).min(self.len);
        for (k, v) in self.keys.iter_mut().zip(self.values.iter_mut()) {
            k.truncate(len * self.kv_dim);
            v.truncate(len * self.kv_dim);
        }
        self.len = len;
    }

    /// Bytes held.
    pub fn size_in_bytes(&self) -> usize {
        self.keys
            .iter()
            .chain(self.values.iter())
            .map(|b| b.capacity() * 4)
            .sum()
    }

    /// Keys and values of `layer`, `len × kv_dim` once the current step's rows are appended.
    pub fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        (&self.keys[layer], &self.values[layer])
    }

    /// Appends one step's rows for `layer`.
    pub(crate) fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        self.keys[layer].extend_from_slice(k);
        self.values[layer].extend_from_slice(v);
    }

    /// Commits `n` new positions once every layer has appended them.
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// Reserves room for `additional` positions so appends do not reallocate mid-generation.
    pub fn reserve(&mut self, additional: usize) {
        for (k, v) in self.keys.iter_mut().zip(self.values.iter_mut()) {
            k.reserve(additional * self.kv_dim);
            v.reserve(additional * self.kv_dim);
        }
    }
}
