//! The live registry: which version of each adapter is current, which versions are resident
//! in memory, and leases that pin a request to the version it was admitted with.
//!
//! A request resolves its `model` once, at admission, to a [`Lease`]; it keeps serving that
//! version to its end even if another version is activated meanwhile. Resident weights are
//! bounded by a byte budget with least-recently-used eviction; pinned adapters are never
//! evicted; an evicted version is loaded again from the store on its next use. Eviction only
//! drops the registry's reference: a version still leased stays alive until its last lease
//! ends, and the store never deletes a leased or current version.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use prefix_rft_engine::model::{AdapterHook, AdapterWeights, ModelConfig, ProjRows};

use crate::error::AdapterError;
use crate::peft::{self, AdapterKind, Limits, PeftAdapter, PeftFiles};
use crate::store::{AdapterListing, AdapterMeta, AdapterStore, Manifest, NewVersion, Status};

/// `(tenant, adapter, version)`.
pub type VersionKey = (String, String, u32);

/// A request's hold on one adapter version: the weights it runs with, for as long as it lives.
#[derive(Clone)]
pub struct Lease {
    key: VersionKey,
    weights: Arc<AdapterWeights>,
    _count: Arc<LeaseCount>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lease({})", self.label())
    }
}

impl Lease {
    /// Tenant.
    pub fn tenant(&self) -> &str {
        &self.key.0
    }

    /// Adapter name.
    pub fn name(&self) -> &str {
        &self.key.1
    }

    /// Version number.
    pub fn version(&self) -> u32 {
        self.key.2
    }

    /// `(tenant, adapter, version)`.
    pub fn key(&self) -> &VersionKey {
        &self.key
    }

    /// `name@version`, the `x-adapter-version` header.
    pub fn label(&self) -> String {
        format!("{}@{}", self.key.1, self.key.2)
    }

    /// The weights.
    pub fn weights(&self) -> &Arc<AdapterWeights> {
        &self.weights
    }
}

impl AdapterHook for Lease {
    fn add_delta(&self, rows: ProjRows<'_>) {
        self.weights.add_delta(rows)
    }

    fn prefix_kv(&self, layer: usize) -> Option<(&[f32], &[f32])> {
        self.weights.prefix_kv(layer)
    }

    fn weights_key(&self) -> Option<usize> {
        self.weights.weights_key()
    }
}

/// Counts live leases of one version; decrements on drop.
struct LeaseCount {
    key: VersionKey,
    leases: Arc<Mutex<HashMap<VersionKey, usize>>>,
}

impl Drop for LeaseCount {
    fn drop(&mut self) {
        let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = leases.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                leases.remove(&self.key);
            }
        }
    }
}

struct Resident {
    weights: Arc<AdapterWeights>,
    bytes: usize,
    last_used: u64,
}

#[derive(Default)]
struct Inner {
    resident: HashMap<VersionKey, Resident>,
    resident_bytes: usize,
    clock: u64,
    pinned: HashSet<(String, String)>,
    loads: u64,
    evictions: u64,
}

/// What the registry is configured with.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// The base model's id; `model` equal to it means no adapter.
    pub base_id: String,
    /// File and shape limits.
    pub limits: Limits,
    /// Resident weights budget in bytes.
    pub resident_budget_bytes: usize,
    /// Versions kept per adapter (older ones are deleted unless current or leased).
    pub retain_versions: usize,
    /// The model applies LoRA in f32 (f32 activations or dequantized weights): each load
    /// builds the f32 `Bᵀ` that forward reads ([`AdapterWeights::prepare_f32`]), so the budget
    /// counts it. The int8 forward reads only the 8-bit copies.
    pub lora_f32: bool,
}

/// Counters for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistryStats {
    /// Versions resident in memory.
    pub resident: usize,
    /// Their bytes.
    pub resident_bytes: usize,
    /// Loads from disk so far.
    pub loads: u64,
    /// Evictions so far.
    pub evictions: u64,
}

/// The live registry over a store.
pub struct AdapterRegistry {
    store: AdapterStore,
    model: ModelConfig,
    config: RegistryConfig,
    inner: Mutex<Inner>,
    leases: Arc<Mutex<HashMap<VersionKey, usize>>>,
}

/// `name` or `name@N`.
pub fn parse_model(model: &str) -> (&str, Option<Result<u32, ()>>) {
    match model.rsplit_once('@') {
        Some((name, v)) => (name, Some(v.parse().map_err(|_| ()))),
        None => (model, None),
    }
}

impl AdapterRegistry {
    /// A registry over `store` for a base model of shape `model`.
    pub fn new(store: AdapterStore, model: ModelConfig, config: RegistryConfig) -> Self {
        AdapterRegistry {
            store,
            model,
            config,
            inner: Mutex::new(Inner::default()),
            leases: Arc::default(),
        }
    }

    /// The store.
    pub fn store(&self) -> &AdapterStore {
        &self.store
    }

    /// The limits.
    pub fn limits(&self) -> &Limits {
        &self.config.limits
    }

    /// The base model's shape.
    pub fn model(&self) -> &ModelConfig {
        &self.model
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Resolves a request's `model` for `tenant`: `None` for the base model, otherwise a lease
    /// on `name@N` or on the current version of `name`. Unknown names and versions are
    /// [`AdapterError::NotFound`].
    pub fn acquire(&self, tenant: &str, model: &str) -> Result<Option<Lease>, AdapterError> {
        if model == self.config.base_id {
            return Ok(None);
        }
        let not_found = || AdapterError::NotFound(format!("model {model:?} not found"));
        let (name, version) = parse_model(model);
        if crate::store::check_name("adapter", name).is_err() {
            return Err(not_found());
        }
        let version = match version {
            Some(Ok(v)) => v,
            Some(Err(())) => return Err(not_found()),
            None => self.store.current(tenant, name).map_err(|e| match e {
                AdapterError::NotFound(_) => not_found(),
                other => other,
            })?,
        };
        self.lease((tenant.to_string(), name.to_string(), version))
            .map(Some)
            .map_err(|e| match e {
                AdapterError::NotFound(_) => not_found(),
                other => other,
            })
    }

    /// A lease on one version, loading it from the store if it is not resident.
    pub fn lease(&self, key: VersionKey) -> Result<Lease, AdapterError> {
        if let Some(lease) = self.lease_resident(&key) {
            return Ok(lease);
        }
        // Load outside the lock: parsing a large adapter must not stall other requests.
        let files = self.store.read_files(&key.0, &key.1, key.2)?;
        let adapter = peft::parse(
            &files.config,
            &files.weights,
            &self.model,
            &self.config.limits,
        )
        .map_err(|e| AdapterError::Corrupt(format!("{}@{}: {e}", key.1, key.2)))?;
        let weights = Arc::new(adapter.weights);
        if self.config.lora_f32 {
            weights.prepare_f32();
        }
        let mut inner = self.inner();
        inner.loads += 1;
        if !inner.resident.contains_key(&key) {
            let bytes = weights.resident_bytes();
            inner.resident_bytes += bytes;
            inner.resident.insert(
                key.clone(),
                Resident {
                    weights,
                    bytes,
                    last_used: 0,
                },
            );
        }
        let lease = self.lease_locked(&mut inner, &key);
        self.evict_locked(&mut inner, &key);
        lease.ok_or_else(|| AdapterError::Corrupt("a loaded version vanished".into()))
    }

    fn lease_resident(&self, key: &VersionKey) -> Option<Lease> {
        let mut inner = self.inner();
        self.lease_locked(&mut inner, key)
    }

    fn lease_locked(&self, inner: &mut Inner, key: &VersionKey) -> Option<Lease> {
        inner.clock += 1;
        let clock = inner.clock;
        let r = inner.resident.get_mut(key)?;
        r.last_used = clock;
        *self
            .leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.clone())
            .or_default() += 1;
        // Clones of a lease share this handle: the count drops once, when the last clone goes.
        let own = Arc::new(LeaseCount {
            key: key.clone(),
            leases: self.leases.clone(),
        });
        Some(Lease {
            key: key.clone(),
            weights: r.weights.clone(),
            _count: own,
        })
    }

    fn evict_locked(&self, inner: &mut Inner, keep: &VersionKey) {
        while inner.resident_bytes > self.config.resident_budget_bytes {
            let victim = inner
                .resident
                .iter()
                .filter(|(k, _)| *k != keep && !inner.pinned.contains(&(k.0.clone(), k.1.clone())))
                .min_by_key(|(_, r)| r.last_used)
                .map(|(k, _)| k.clone());
            let Some(victim) = victim else { break };
            if let Some(r) = inner.resident.remove(&victim) {
                inner.resident_bytes -= r.bytes;
                inner.evictions += 1;
            }
        }
    }

    /// Keeps an adapter's versions resident regardless of the budget (or stops doing so).
    pub fn set_pinned(&self, tenant: &str, name: &str, pinned: bool) {
        let key = (tenant.to_string(), name.to_string());
        let mut inner = self.inner();
        if pinned {
            inner.pinned.insert(key);
        } else {
            inner.pinned.remove(&key);
        }
    }

    /// Number of live leases on a version.
    pub fn lease_count(&self, key: &VersionKey) -> usize {
        self.leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .copied()
            .unwrap_or(0)
    }

    /// Resident and load counters.
    pub fn stats(&self) -> RegistryStats {
        let inner = self.inner();
        RegistryStats {
            resident: inner.resident.len(),
            resident_bytes: inner.resident_bytes,
            loads: inner.loads,
            evictions: inner.evictions,
        }
    }

    /// Validates PEFT files against the base model and the limits.
    pub fn validate(&self, files: &PeftFiles) -> Result<PeftAdapter, AdapterError> {
        peft::parse(
            &files.config,
            &files.weights,
            &self.model,
            &self.config.limits,
        )
    }

    /// Creates an adapter whose version 1 is `weights`.
    pub fn create(
        &self,
        tenant: &str,
        name: &str,
        weights: &AdapterWeights,
        params: serde_json::Value,
    ) -> Result<Manifest, AdapterError> {
        let files = peft::to_files(weights, &self.model, &self.config.base_id)?;
        self.create_with(tenant, name, &files, AdapterKind::of(weights), params)
    }

    /// Creates an adapter whose version 1 is the given PEFT files, kept byte for byte.
    pub fn create_from_files(
        &self,
        tenant: &str,
        name: &str,
        files: &PeftFiles,
    ) -> Result<Manifest, AdapterError> {
        let adapter = self.validate(files)?;
        let params = serde_json::json!({
            "rank": adapter.lora.as_ref().map(|l| l.rank),
            "alpha": adapter.lora.as_ref().map(|l| l.alpha),
            "use_rslora": adapter.lora.as_ref().map(|l| l.rslora),
            "target_modules": adapter.lora.as_ref().map(|l| l.targets.clone()),
            "num_virtual_tokens": adapter.num_virtual_tokens,
        });
        self.create_with(tenant, name, files, adapter.kind(), params)
    }

    fn create_with(
        &self,
        tenant: &str,
        name: &str,
        files: &PeftFiles,
        kind: AdapterKind,
        params: serde_json::Value,
    ) -> Result<Manifest, AdapterError> {
        if name == self.config.base_id || name.contains('@') {
            return Err(AdapterError::BadRequest(format!(
                "adapter name {name:?} is reserved"
            )));
        }
        let meta = AdapterMeta {
            name: name.to_string(),
            kind,
            created: crate::store::now_secs(),
            params,
        };
        self.store
            .create(tenant, &meta, files, NewVersion::upload(kind, None))
    }

    /// Validates and publishes PEFT files as a new version; `activate` makes it current
    /// (compare-and-swap on `expected_current` when given). Nothing changes on failure.
    pub fn publish(
        &self,
        tenant: &str,
        name: &str,
        files: &PeftFiles,
        mut new: NewVersion,
        activate: bool,
        expected_current: Option<u32>,
    ) -> Result<Manifest, AdapterError> {
        let adapter = self.validate(files)?;
        let meta = self.store.meta(tenant, name)?;
        if adapter.kind() != meta.kind {
            return Err(AdapterError::Invalid(format!(
                "adapter {name:?} is a {:?} adapter; these files are {:?}",
                meta.kind,
                adapter.kind()
            )));
        }
        new.kind = adapter.kind();
        let manifest = self
            .store
            .publish(tenant, name, files, new, activate, expected_current)?;
        self.retain(tenant, name);
        Ok(manifest)
    }

    /// Makes `version` current; returns the previous current version.
    pub fn activate(
        &self,
        tenant: &str,
        name: &str,
        version: u32,
        expected_current: Option<u32>,
    ) -> Result<u32, AdapterError> {
        let manifest = self.store.manifest(tenant, name, version)?;
        if manifest.status == Status::Candidate {
            return Err(AdapterError::BadRequest(format!(
                "version {version} is a candidate still under evaluation"
            )));
        }
        self.store.activate(tenant, name, version, expected_current)
    }

    /// Deletes an adapter; running requests keep their leases to the end.
    pub fn delete(&self, tenant: &str, name: &str) -> Result<(), AdapterError> {
        self.store.delete(tenant, name)?;
        let mut inner = self.inner();
        let gone: Vec<VersionKey> = inner
            .resident
            .keys()
            .filter(|k| k.0 == tenant && k.1 == name)
            .cloned()
            .collect();
        for k in gone {
            if let Some(r) = inner.resident.remove(&k) {
                inner.resident_bytes -= r.bytes;
            }
        }
        inner.pinned.remove(&(tenant.to_string(), name.to_string()));
        Ok(())
    }

    /// Applies the retention policy to one adapter, keeping leased versions.
    fn retain(&self, tenant: &str, name: &str) {
        let protected: BTreeSet<u32> = self
            .leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .filter(|k| k.0 == tenant && k.1 == name)
            .map(|k| k.2)
            .collect();
        match self
            .store
            .retain(tenant, name, self.config.retain_versions, &protected)
        {
            Ok(removed) => {
                if !removed.is_empty() {
                    let mut inner = self.inner();
                    for v in removed {
                        let key = (tenant.to_string(), name.to_string(), v);
                        if let Some(r) = inner.resident.remove(&key) {
                            inner.resident_bytes -= r.bytes;
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(tenant, adapter = name, error = %e, "retention failed"),
        }
    }

    /// A tenant's adapters with their versions.
    pub fn list(&self, tenant: &str) -> Result<Vec<AdapterListing>, AdapterError> {
        self.store.list(tenant)
    }
}
