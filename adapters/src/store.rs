//! The versioned adapter store on disk. Versions are immutable; publishing is atomic and
//! durable, so a crash at any moment leaves the previous or the new version current, never a
//! partial one.
//!
//! Layout under the root:
//! ```text
//! <tenant>/<adapter>/adapter.json      what was asked at creation (kind, rank, ...)
//! <tenant>/<adapter>/CURRENT           the current version number
//! <tenant>/<adapter>/v<N>/adapter_config.json
//! <tenant>/<adapter>/v<N>/adapter_model.safetensors
//! <tenant>/<adapter>/v<N>/manifest.json  parent, sha256 of the files, source, status, metrics
//! ```
//! Publishing writes a version into `.staging-*`, fsyncs every file and the directory, renames
//! it to `v<N>`, fsyncs the parent; then swaps `CURRENT` the same way (PostgreSQL's
//! `durable_rename`). A new adapter is staged whole and renamed into place, so it appears with
//! its first version or not at all. Leftover `.staging-*` and `.deleted-*` directories are
//! removed when the store is opened.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::AdapterError;
use crate::peft::{AdapterKind, PeftFiles, CONFIG_FILE, WEIGHTS_FILE};

/// A version's manifest file name.
pub const MANIFEST_FILE: &str = "manifest.json";
const CURRENT_FILE: &str = "CURRENT";
const ADAPTER_FILE: &str = "adapter.json";

/// Where a version came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Uploaded PEFT files, or the identity version made at creation.
    Upload,
    /// Produced by a training job.
    Training,
}

/// Whether a version may serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Published and activatable.
    Live,
    /// A training output not yet through the eval gate.
    Candidate,
    /// A training output the eval gate refused (kept for inspection, with the reason).
    Rejected,
}

/// What is known about one version; written once with it and never changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Version number, from 1.
    pub version: u32,
    /// Unix seconds of publication.
    pub created: u64,
    /// The version it was trained from.
    pub parent: Option<u32>,
    /// Upload or training.
    pub source: Source,
    /// Live, candidate or rejected.
    pub status: Status,
    /// What the files carry.
    pub kind: AdapterKind,
    /// sha256 (hex) of each PEFT file: the files' identity, shown by the API.
    pub sha256: BTreeMap<String, String>,
    /// xxh3-64 (hex) of each PEFT file: what every read checks, because it costs a tenth of
    /// sha256 on large weights and a cold load is on the serving path. Neither is a signature
    /// (the manifest sits next to the files), so both detect the same thing: corruption.
    /// Manifests written before this field are checked by sha256.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub xxh3: BTreeMap<String, String>,
    /// The training job that made it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// Training data counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    /// Eval metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<serde_json::Value>,
    /// Why it was rejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What a caller states about a version it publishes; the store fills in the rest.
#[derive(Debug, Clone, PartialEq)]
pub struct NewVersion {
    /// The version it was trained from.
    pub parent: Option<u32>,
    /// Upload or training.
    pub source: Source,
    /// Live, candidate or rejected.
    pub status: Status,
    /// What the files carry.
    pub kind: AdapterKind,
    /// The training job.
    pub job_id: Option<String>,
    /// Training data counts.
    pub data: Option<serde_json::Value>,
    /// Eval metrics.
    pub metrics: Option<serde_json::Value>,
    /// Why it was rejected.
    pub reason: Option<String>,
}

impl NewVersion {
    /// An uploaded (or initial) live version.
    pub fn upload(kind: AdapterKind, parent: Option<u32>) -> Self {
        NewVersion {
            parent,
            source: Source::Upload,
            status: Status::Live,
            kind,
            job_id: None,
            data: None,
            metrics: None,
            reason: None,
        }
    }
}

/// The description of an adapter, fixed at creation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterMeta {
    /// Adapter name (unique per tenant).
    pub name: String,
    /// What its versions carry.
    pub kind: AdapterKind,
    /// Unix seconds of creation.
    pub created: u64,
    /// Creation parameters as given (rank, alpha, target modules, virtual tokens).
    #[serde(default)]
    pub params: serde_json::Value,
}

/// An adapter with its versions, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AdapterListing {
    /// Its description.
    pub meta: AdapterMeta,
    /// The current version.
    pub current: u32,
    /// Every version on disk.
    pub versions: Vec<Manifest>,
}

/// Held while an adapter's versions or `CURRENT` change.
type AdapterLock = Arc<Mutex<()>>;

/// The store rooted at one directory. One process owns a store at a time.
#[derive(Debug)]
pub struct AdapterStore {
    root: PathBuf,
    /// Serialises writers per `(tenant, adapter)`: version numbering and `CURRENT` swaps.
    locks: Mutex<HashMap<(String, String), AdapterLock>>,
}

/// Unix seconds now.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Checks a tenant or adapter name: 1–64 of `[A-Za-z0-9_.-]`, not starting with `.`.
pub fn check_name(what: &str, name: &str) -> Result<(), AdapterError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(AdapterError::BadRequest(format!(
            "{what} {name:?} must be 1-64 characters of A-Z a-z 0-9 _ - . and not start with '.'"
        )))
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn xxh3_hex(bytes: &[u8]) -> String {
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(bytes))
}

/// Whether `bytes` are the `file` that `manifest` describes: by xxh3 where it has one.
fn matches_manifest(manifest: &Manifest, file: &str, bytes: &[u8]) -> bool {
    match manifest.xxh3.get(file) {
        Some(want) => *want == xxh3_hex(bytes),
        None => manifest.sha256.get(file).map(String::as_str) == Some(sha256_hex(bytes).as_str()),
    }
}

/// A PEFT file of the version in `dir`, refused as corrupt unless it matches `manifest`.
fn read_checked(dir: &Path, file: &str, manifest: &Manifest) -> Result<Vec<u8>, AdapterError> {
    let path = dir.join(file);
    let bytes = fs::read(&path).map_err(AdapterError::io(&path))?;
    if !matches_manifest(manifest, file, &bytes) {
        return Err(AdapterError::Corrupt(format!(
            "{} does not match its checksum in the manifest",
            path.display()
        )));
    }
    Ok(bytes)
}

fn write_durable(path: &Path, bytes: &[u8]) -> Result<(), AdapterError> {
    let mut f = File::create(path).map_err(AdapterError::io(path))?;
    f.write_all(bytes).map_err(AdapterError::io(path))?;
    f.sync_all().map_err(AdapterError::io(path))
}

fn fsync_dir(dir: &Path) -> Result<(), AdapterError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(AdapterError::io(dir))
}

fn unique_suffix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{}-{nanos}", std::process::id())
}

impl AdapterStore {
    /// Opens (creating if needed) the store at `root` and clears what a crash left behind.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, AdapterError> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(AdapterError::io(&root))?;
        let store = AdapterStore {
            root,
            locks: Mutex::new(HashMap::new()),
        };
        store.recover()?;
        Ok(store)
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn recover(&self) -> Result<(), AdapterError> {
        for tenant in read_dirs(&self.root)? {
            let tdir = self.root.join(&tenant);
            for name in read_dirs(&tdir)? {
                let path = tdir.join(&name);
                if name.starts_with(".staging-") || name.starts_with(".deleted-") {
                    tracing::warn!(path = %path.display(), "removing an interrupted write");
                    fs::remove_dir_all(&path).map_err(AdapterError::io(&path))?;
                    continue;
                }
                for entry in read_dirs(&path)? {
                    if entry.starts_with(".staging-") {
                        let p = path.join(&entry);
                        tracing::warn!(path = %p.display(), "removing an interrupted publish");
                        fs::remove_dir_all(&p).map_err(AdapterError::io(&p))?;
                    }
                }
                let tmp = path.join(format!("{CURRENT_FILE}.tmp"));
                if tmp.exists() {
                    fs::remove_file(&tmp).map_err(AdapterError::io(&tmp))?;
                }
            }
        }
        Ok(())
    }

    fn lock(&self, tenant: &str, name: &str) -> AdapterLock {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        locks
            .entry((tenant.to_string(), name.to_string()))
            .or_default()
            .clone()
    }

    fn adapter_dir(&self, tenant: &str, name: &str) -> Result<PathBuf, AdapterError> {
        check_name("tenant", tenant)?;
        check_name("adapter name", name)?;
        Ok(self.root.join(tenant).join(name))
    }

    fn existing_adapter_dir(&self, tenant: &str, name: &str) -> Result<PathBuf, AdapterError> {
        let dir = self.adapter_dir(tenant, name)?;
        if dir.join(ADAPTER_FILE).is_file() {
            Ok(dir)
        } else {
            Err(AdapterError::NotFound(format!(
                "adapter {name:?} not found"
            )))
        }
    }

    /// Creates an adapter with `files` as its current version 1. Fails with
    /// [`AdapterError::Exists`] if the name is taken.
    pub fn create(
        &self,
        tenant: &str,
        meta: &AdapterMeta,
        files: &PeftFiles,
        v1: NewVersion,
    ) -> Result<Manifest, AdapterError> {
        let dir = self.adapter_dir(tenant, &meta.name)?;
        let lock = self.lock(tenant, &meta.name);
        let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        if dir.exists() {
            return Err(AdapterError::Exists(meta.name.clone()));
        }
        let tdir = self.root.join(tenant);
        fs::create_dir_all(&tdir).map_err(AdapterError::io(&tdir))?;
        let staging = tdir.join(format!(".staging-{}-{}", meta.name, unique_suffix()));
        fs::create_dir(&staging).map_err(AdapterError::io(&staging))?;
        let result = (|| {
            let meta_bytes = serde_json::to_vec_pretty(meta)
                .map_err(|e| AdapterError::Corrupt(e.to_string()))?;
            write_durable(&staging.join(ADAPTER_FILE), &meta_bytes)?;
            let manifest = write_version(&staging.join("v1"), 1, files, v1)?;
            write_durable(&staging.join(CURRENT_FILE), b"1\n")?;
            fsync_dir(&staging)?;
            // rename(2) onto an existing non-empty directory fails, so a concurrent creator
            // in another process cannot be overwritten.
            fs::rename(&staging, &dir).map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists | std::io::ErrorKind::DirectoryNotEmpty => {
                    AdapterError::Exists(meta.name.clone())
                }
                _ => AdapterError::Io {
                    path: dir.clone(),
                    source: e,
                },
            })?;
            fsync_dir(&tdir)?;
            Ok(manifest)
        })();
        if result.is_err() {
            let _ = fs::remove_dir_all(&staging);
        }
        result
    }

    /// Publishes `files` as the next version. With `activate`, it also becomes current, and
    /// `expected_current` (if given) must be the current version at that moment (checked
    /// before anything is written, under the adapter's lock).
    pub fn publish(
        &self,
        tenant: &str,
        name: &str,
        files: &PeftFiles,
        new: NewVersion,
        activate: bool,
        expected_current: Option<u32>,
    ) -> Result<Manifest, AdapterError> {
        let dir = self.existing_adapter_dir(tenant, name)?;
        let lock = self.lock(tenant, name);
        let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        let current = read_current(&dir)?;
        if let Some(expected) = expected_current {
            if expected != current {
                return Err(AdapterError::Conflict { expected, current });
            }
        }
        let version = self.version_numbers_in(&dir)?.last().copied().unwrap_or(0) + 1;
        let staging = dir.join(format!(".staging-v{version}-{}", unique_suffix()));
        let result = (|| {
            let manifest = write_version(&staging, version, files, new)?;
            let target = dir.join(format!("v{version}"));
            fs::rename(&staging, &target).map_err(AdapterError::io(&target))?;
            fsync_dir(&dir)?;
            Ok(manifest)
        })();
        if result.is_err() {
            let _ = fs::remove_dir_all(&staging);
        }
        let manifest = result?;
        if activate {
            write_current(&dir, version)?;
        }
        Ok(manifest)
    }

    /// Makes `version` current (swap or rollback); returns the previous current version.
    pub fn activate(
        &self,
        tenant: &str,
        name: &str,
        version: u32,
        expected_current: Option<u32>,
    ) -> Result<u32, AdapterError> {
        let dir = self.existing_adapter_dir(tenant, name)?;
        let lock = self.lock(tenant, name);
        let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        let current = read_current(&dir)?;
        if let Some(expected) = expected_current {
            if expected != current {
                return Err(AdapterError::Conflict { expected, current });
            }
        }
        let manifest = read_manifest(&dir, version)?;
        if manifest.status == Status::Rejected {
            return Err(AdapterError::BadRequest(format!(
                "version {version} was rejected by the eval gate{}",
                manifest
                    .reason
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            )));
        }
        if version != current {
            write_current(&dir, version)?;
        }
        Ok(current)
    }

    /// The current version of an adapter.
    pub fn current(&self, tenant: &str, name: &str) -> Result<u32, AdapterError> {
        read_current(&self.existing_adapter_dir(tenant, name)?)
    }

    /// The manifest of one version.
    pub fn manifest(
        &self,
        tenant: &str,
        name: &str,
        version: u32,
    ) -> Result<Manifest, AdapterError> {
        read_manifest(&self.existing_adapter_dir(tenant, name)?, version)
    }

    /// The description of an adapter.
    pub fn meta(&self, tenant: &str, name: &str) -> Result<AdapterMeta, AdapterError> {
        let path = self.existing_adapter_dir(tenant, name)?.join(ADAPTER_FILE);
        let bytes = fs::read(&path).map_err(AdapterError::io(&path))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| AdapterError::Corrupt(format!("{}: {e}", path.display())))
    }

    /// The directory of a published version.
    pub fn version_dir(
        &self,
        tenant: &str,
        name: &str,
        version: u32,
    ) -> Result<PathBuf, AdapterError> {
        let dir = self
            .existing_adapter_dir(tenant, name)?
            .join(format!("v{version}"));
        if dir.join(MANIFEST_FILE).is_file() {
            Ok(dir)
        } else {
            Err(AdapterError::NotFound(format!(
                "adapter {name:?} has no version {version}"
            )))
        }
    }

    /// One file of a version (`adapter_config.json`, `adapter_model.safetensors` or
    /// `manifest.json`), checked against the manifest's checksum.
    pub fn read_file(
        &self,
        tenant: &str,
        name: &str,
        version: u32,
        file: &str,
    ) -> Result<Vec<u8>, AdapterError> {
        if ![CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE].contains(&file) {
            return Err(AdapterError::NotFound(format!(
                "no file {file:?} in a version"
            )));
        }
        let dir = self.version_dir(tenant, name, version)?;
        if file == MANIFEST_FILE {
            let path = dir.join(file);
            return fs::read(&path).map_err(AdapterError::io(&path));
        }
        read_checked(&dir, file, &read_manifest_at(&dir)?)
    }

    /// The PEFT files of a version, checked against the manifest (read once for both).
    pub fn read_files(
        &self,
        tenant: &str,
        name: &str,
        version: u32,
    ) -> Result<PeftFiles, AdapterError> {
        let dir = self.version_dir(tenant, name, version)?;
        let manifest = read_manifest_at(&dir)?;
        Ok(PeftFiles {
            config: read_checked(&dir, CONFIG_FILE, &manifest)?,
            weights: read_checked(&dir, WEIGHTS_FILE, &manifest)?,
        })
    }

    /// Version numbers of an adapter, ascending.
    pub fn versions(&self, tenant: &str, name: &str) -> Result<Vec<u32>, AdapterError> {
        self.version_numbers_in(&self.existing_adapter_dir(tenant, name)?)
    }

    fn version_numbers_in(&self, dir: &Path) -> Result<Vec<u32>, AdapterError> {
        let mut out: Vec<u32> = read_dirs(dir)?
            .iter()
            .filter_map(|n| n.strip_prefix('v')?.parse().ok())
            .collect();
        out.sort_unstable();
        Ok(out)
    }

    /// Adapter names of a tenant, sorted.
    pub fn names(&self, tenant: &str) -> Result<Vec<String>, AdapterError> {
        check_name("tenant", tenant)?;
        let tdir = self.root.join(tenant);
        if !tdir.exists() {
            return Ok(Vec::new());
        }
        let mut names: Vec<String> = read_dirs(&tdir)?
            .into_iter()
            .filter(|n| !n.starts_with('.') && tdir.join(n).join(ADAPTER_FILE).is_file())
            .collect();
        names.sort();
        Ok(names)
    }

    /// Every adapter of a tenant with its versions.
    pub fn list(&self, tenant: &str) -> Result<Vec<AdapterListing>, AdapterError> {
        self.names(tenant)?
            .into_iter()
            .map(|n| self.listing(tenant, &n))
            .collect()
    }

    /// One adapter with its versions.
    pub fn listing(&self, tenant: &str, name: &str) -> Result<AdapterListing, AdapterError> {
        let dir = self.existing_adapter_dir(tenant, name)?;
        let versions = self
            .version_numbers_in(&dir)?
            .into_iter()
            .map(|v| read_manifest(&dir, v))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(AdapterListing {
            meta: self.meta(tenant, name)?,
            current: read_current(&dir)?,
            versions,
        })
    }

    /// Removes an adapter and all its versions (renamed away first, so a crash leaves it
    /// either whole or gone).
    pub fn delete(&self, tenant: &str, name: &str) -> Result<(), AdapterError> {
        let dir = self.existing_adapter_dir(tenant, name)?;
        let lock = self.lock(tenant, name);
        let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        let tdir = self.root.join(tenant);
        let trash = tdir.join(format!(".deleted-{name}-{}", unique_suffix()));
        fs::rename(&dir, &trash).map_err(AdapterError::io(&dir))?;
        fsync_dir(&tdir)?;
        fs::remove_dir_all(&trash).map_err(AdapterError::io(&trash))
    }

    /// Deletes versions beyond the newest `keep`, never the current one nor any in
    /// `protected` (leased); returns the removed version numbers.
    pub fn retain(
        &self,
        tenant: &str,
        name: &str,
        keep: usize,
        protected: &BTreeSet<u32>,
    ) -> Result<Vec<u32>, AdapterError> {
        let dir = self.existing_adapter_dir(tenant, name)?;
        let lock = self.lock(tenant, name);
        let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        let current = read_current(&dir)?;
        let versions = self.version_numbers_in(&dir)?;
        let cut = versions.len().saturating_sub(keep.max(1));
        let mut removed = Vec::new();
        for &v in &versions[..cut] {
            if v == current || protected.contains(&v) {
                continue;
            }
            let vdir = dir.join(format!("v{v}"));
            let trash = dir.join(format!(".staging-gc-v{v}-{}", unique_suffix()));
            fs::rename(&vdir, &trash).map_err(AdapterError::io(&vdir))?;
            fs::remove_dir_all(&trash).map_err(AdapterError::io(&trash))?;
            removed.push(v);
        }
        if !removed.is_empty() {
            fsync_dir(&dir)?;
        }
        Ok(removed)
    }

    /// Resolves a client-given path (the vLLM `lora_path`) to a directory inside the store:
    /// relative paths are taken from the root; `..` components, absolute paths outside the
    /// root and symlinks that lead out of it are refused.
    pub fn confine(&self, path: &str) -> Result<PathBuf, AdapterError> {
        let p = Path::new(path);
        if p.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(AdapterError::BadRequest(format!(
                "path {path:?} contains '..'"
            )));
        }
        let root = self
            .root
            .canonicalize()
            .map_err(AdapterError::io(&self.root))?;
        let joined = if p.is_absolute() {
            p.to_path_buf()
        } else {
            root.join(p)
        };
        let real = joined.canonicalize().map_err(|_| {
            AdapterError::BadRequest(format!("path {path:?} does not exist in the adapter store"))
        })?;
        if !real.starts_with(&root) {
            return Err(AdapterError::BadRequest(format!(
                "path {path:?} is outside the adapter store"
            )));
        }
        Ok(real)
    }
}

/// Writes a complete version directory at `dir` (which must not exist) and fsyncs it.
fn write_version(
    dir: &Path,
    version: u32,
    files: &PeftFiles,
    new: NewVersion,
) -> Result<Manifest, AdapterError> {
    fs::create_dir(dir).map_err(AdapterError::io(dir))?;
    write_durable(&dir.join(CONFIG_FILE), &files.config)?;
    write_durable(&dir.join(WEIGHTS_FILE), &files.weights)?;
    let manifest = Manifest {
        version,
        created: now_secs(),
        parent: new.parent,
        source: new.source,
        status: new.status,
        kind: new.kind,
        sha256: BTreeMap::from([
            (CONFIG_FILE.to_string(), sha256_hex(&files.config)),
            (WEIGHTS_FILE.to_string(), sha256_hex(&files.weights)),
        ]),
        xxh3: BTreeMap::from([
            (CONFIG_FILE.to_string(), xxh3_hex(&files.config)),
            (WEIGHTS_FILE.to_string(), xxh3_hex(&files.weights)),
        ]),
        job_id: new.job_id,
        data: new.data,
        metrics: new.metrics,
        reason: new.reason,
    };
    let bytes =
        serde_json::to_vec_pretty(&manifest).map_err(|e| AdapterError::Corrupt(e.to_string()))?;
    write_durable(&dir.join(MANIFEST_FILE), &bytes)?;
    fsync_dir(dir)?;
    Ok(manifest)
}

fn write_current(dir: &Path, version: u32) -> Result<(), AdapterError> {
    let tmp = dir.join(format!("{CURRENT_FILE}.tmp"));
    write_durable(&tmp, format!("{version}\n").as_bytes())?;
    let path = dir.join(CURRENT_FILE);
    fs::rename(&tmp, &path).map_err(AdapterError::io(&path))?;
    fsync_dir(dir)
}

fn read_current(dir: &Path) -> Result<u32, AdapterError> {
    let path = dir.join(CURRENT_FILE);
    let text = fs::read_to_string(&path).map_err(AdapterError::io(&path))?;
    text.trim()
        .parse()
        .map_err(|_| AdapterError::Corrupt(format!("{}: {text:?}", path.display())))
}

fn read_manifest(dir: &Path, version: u32) -> Result<Manifest, AdapterError> {
    let vdir = dir.join(format!("v{version}"));
    if !vdir.is_dir() {
        return Err(AdapterError::NotFound(format!("no version {version}")));
    }
    read_manifest_at(&vdir)
}

fn read_manifest_at(vdir: &Path) -> Result<Manifest, AdapterError> {
    let path = vdir.join(MANIFEST_FILE);
    let bytes = fs::read(&path).map_err(AdapterError::io(&path))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| AdapterError::Corrupt(format!("{}: {e}", path.display())))
}

/// Names of the subdirectories of `dir` (empty if it does not exist).
fn read_dirs(dir: &Path) -> Result<Vec<String>, AdapterError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(AdapterError::Io {
                path: dir.into(),
                source: e,
            })
        }
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(AdapterError::io(dir))?;
        // Only real directories: a symlink planted in the store is never followed.
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            if let Some(name) = entry.file_name().to_str() {
                out.push(name.to_string());
            }
        }
    }
    Ok(out)
}
