//! The versioned store and the live registry on a tiny model: publish, compare-and-swap,
//! retention, crash leftovers, path confinement, leases and the resident budget.

use std::collections::{BTreeMap, BTreeSet};

use prefix_rft_adapters::peft::{self, Limits};
use prefix_rft_adapters::registry::{AdapterRegistry, RegistryConfig};
use prefix_rft_adapters::{AdapterError, AdapterKind, AdapterStore, NewVersion, PeftFiles, Status};
use prefix_rft_engine::model::adapter::proj_dims;
use prefix_rft_engine::model::{AdapterWeights, LoraWeights, ModelConfig, Proj};
use prefix_rft_engine::testing::TinySpec;

fn lora(cfg: &ModelConfig, value: f32) -> AdapterWeights {
    let (i, o) = proj_dims(cfg, Proj::Q);
    let pair = LoraWeights {
        a: vec![value; 2 * i],
        b: vec![value; o * 2],
        rank: 2,
        in_dim: i,
        out_dim: o,
        scale: 1.0,
    };
    AdapterWeights::new(cfg, BTreeMap::from([((0, Proj::Q), pair)]), None).expect("adapter")
}

fn files(cfg: &ModelConfig, value: f32) -> PeftFiles {
    peft::to_files(&lora(cfg, value), cfg, "tiny").expect("files")
}

fn registry(root: &std::path::Path, budget: usize, retain: usize) -> AdapterRegistry {
    registry_for(root, budget, retain, false)
}

fn registry_for(
    root: &std::path::Path,
    budget: usize,
    retain: usize,
    lora_f32: bool,
) -> AdapterRegistry {
    AdapterRegistry::new(
        AdapterStore::open(root).expect("store"),
        TinySpec::default().config(),
        RegistryConfig {
            base_id: "tiny".into(),
            limits: Limits::default(),
            resident_budget_bytes: budget,
            retain_versions: retain,
            lora_f32,
        },
    )
}

fn first_a(lease: &prefix_rft_adapters::Lease) -> f32 {
    lease.weights().lora().next().expect("pair").1.a[0]
}

#[test]
fn versions_publish_activate_and_roll_back() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = TinySpec::default().config();
    let r = registry(dir.path(), usize::MAX, 10);
    let v1 = r
        .create("acme", "support", &lora(&cfg, 0.1), serde_json::json!({}))
        .unwrap();
    assert_eq!(
        (v1.version, v1.status, v1.kind),
        (1, Status::Live, AdapterKind::Lora)
    );
    let v2 = r
        .publish(
            "acme",
            "support",
            &files(&cfg, 0.2),
            NewVersion::upload(AdapterKind::Lora, Some(1)),
            true,
            Some(1),
        )
        .unwrap();
    assert_eq!((v2.version, v2.parent), (2, Some(1)));
    assert_eq!(r.store().current("acme", "support").unwrap(), 2);
    let lease2 = r.acquire("acme", "support").unwrap().expect("an adapter");
    assert_eq!((lease2.version(), first_a(&lease2)), (2, 0.2));
    assert_eq!(lease2.label(), "support@2");
    // Roll back; a request admitted before keeps version 2.
    assert_eq!(r.activate("acme", "support", 1, Some(2)).unwrap(), 2);
    let lease1 = r.acquire("acme", "support").unwrap().unwrap();
    assert_eq!((lease1.version(), first_a(&lease1)), (1, 0.1));
    assert_eq!(first_a(&lease2), 0.2);
    // Pinned versions by name.
    assert_eq!(
        r.acquire("acme", "support@2").unwrap().unwrap().version(),
        2
    );
    // Compare-and-swap.
    match r.activate("acme", "support", 2, Some(2)) {
        Err(AdapterError::Conflict {
            expected: 2,
            current: 1,
        }) => {}
        other => panic!("expected a conflict, got {other:?}"),
    }
    match r.publish(
        "acme",
        "support",
        &files(&cfg, 0.3),
        NewVersion::upload(AdapterKind::Lora, None),
        true,
        Some(7),
    ) {
        Err(AdapterError::Conflict { .. }) => {}
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(
        r.store().versions("acme", "support").unwrap(),
        vec![1, 2],
        "nothing published on conflict"
    );
    // The base id and unknown names.
    assert!(r.acquire("acme", "tiny").unwrap().is_none());
    for missing in ["nope", "support@9", "support@x", "../acme", ""] {
        assert!(
            matches!(r.acquire("acme", missing), Err(AdapterError::NotFound(_))),
            "{missing}"
        );
    }
    // Tenants are separate.
    assert!(matches!(
        r.acquire("globex", "support"),
        Err(AdapterError::NotFound(_))
    ));
    assert!(matches!(
        r.create("acme", "support", &lora(&cfg, 0.5), serde_json::json!({})),
        Err(AdapterError::Exists(_))
    ));
    // Files read back are the ones published, checked against the manifest.
    let f2 = r.store().read_files("acme", "support", 2).unwrap();
    assert_eq!(f2.weights, files(&cfg, 0.2).weights);
}

#[test]
fn invalid_uploads_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = TinySpec::default().config();
    let r = registry(dir.path(), usize::MAX, 10);
    r.create("acme", "a", &lora(&cfg, 0.1), serde_json::json!({}))
        .unwrap();
    let mut bad = files(&cfg, 0.2);
    bad.weights.truncate(bad.weights.len() - 3);
    assert!(matches!(
        r.publish(
            "acme",
            "a",
            &bad,
            NewVersion::upload(AdapterKind::Lora, None),
            true,
            None
        ),
        Err(AdapterError::Invalid(_))
    ));
    assert_eq!(r.store().versions("acme", "a").unwrap(), vec![1]);
    assert_eq!(r.store().current("acme", "a").unwrap(), 1);
}

#[test]
fn retention_keeps_current_and_leased_versions() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = TinySpec::default().config();
    let r = registry(dir.path(), usize::MAX, 2);
    r.create("acme", "a", &lora(&cfg, 0.1), serde_json::json!({}))
        .unwrap();
    let held = r.acquire("acme", "a@1").unwrap().unwrap();
    for v in 2..=5 {
        let active = v != 5; // v5 is published but not activated, so v4 stays current
        r.publish(
            "acme",
            "a",
            &files(&cfg, v as f32 / 10.0),
            NewVersion::upload(AdapterKind::Lora, None),
            active,
            None,
        )
        .unwrap();
    }
    // Keep the newest 2 (4, 5), the current one (4) and the leased one (1).
    assert_eq!(r.store().versions("acme", "a").unwrap(), vec![1, 4, 5]);
    drop(held);
    r.publish(
        "acme",
        "a",
        &files(&cfg, 0.6),
        NewVersion::upload(AdapterKind::Lora, None),
        false,
        None,
    )
    .unwrap();
    assert_eq!(r.store().versions("acme", "a").unwrap(), vec![4, 5, 6]);
    assert_eq!(r.store().current("acme", "a").unwrap(), 4);
    assert_eq!(
        r.store().retain("acme", "a", 1, &BTreeSet::new()).unwrap(),
        vec![5]
    );
}

#[test]
fn leases_count_and_the_budget_evicts_least_recently_used() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = TinySpec::default().config();
    let one = lora(&cfg, 0.1).resident_bytes();
    let r = registry(dir.path(), 2 * one, 10);
    for name in ["a", "b", "c"] {
        r.create("acme", name, &lora(&cfg, 0.1), serde_json::json!({}))
            .unwrap();
    }
    let key = |n: &str| ("acme".to_string(), n.to_string(), 1u32);
    let la = r.acquire("acme", "a").unwrap().unwrap();
    let la2 = la.clone();
    assert_eq!(r.lease_count(&key("a")), 1, "clones share one lease");
    let _lb = r.acquire("acme", "b").unwrap().unwrap();
    assert_eq!(r.stats().resident, 2);
    let _lc = r.acquire("acme", "c").unwrap().unwrap();
    let s = r.stats();
    assert_eq!(
        (s.resident, s.evictions, s.loads),
        (2, 1, 3),
        "a was least recently used"
    );
    // The evicted version still serves its lease; the next request loads it again.
    assert_eq!(first_a(&la2), 0.1);
    drop(la);
    drop(la2);
    assert_eq!(r.lease_count(&key("a")), 0);
    r.acquire("acme", "a").unwrap().unwrap();
    assert_eq!(r.stats().loads, 4);
    // Pinned adapters are never evicted.
    r.set_pinned("acme", "a", true);
    r.acquire("acme", "b").unwrap().unwrap();
    r.acquire("acme", "c").unwrap().unwrap();
    r.acquire("acme", "b").unwrap().unwrap();
    let loads = r.stats().loads;
    r.acquire("acme", "a").unwrap().unwrap();
    assert_eq!(r.stats().loads, loads, "a stayed resident");
}

#[test]
fn a_model_applying_lora_in_f32_counts_the_f32_copy_in_the_budget() {
    let cfg = TinySpec::default().config();
    let int8_bytes = lora(&cfg, 0.1).resident_bytes();
    let (_, o) = proj_dims(&cfg, Proj::Q);
    for (lora_f32, want) in [(false, int8_bytes), (true, int8_bytes + o * 2 * 4)] {
        let dir = tempfile::tempdir().unwrap();
        let r = registry_for(dir.path(), usize::MAX, 10, lora_f32);
        r.create("acme", "a", &lora(&cfg, 0.1), serde_json::json!({}))
            .unwrap();
        let lease = r.acquire("acme", "a").unwrap().unwrap();
        assert_eq!(r.stats().resident_bytes, want, "lora_f32 {lora_f32}");
        assert_eq!(lease.weights().resident_bytes(), want);
    }
}

#[test]
fn leftovers_of_a_crash_are_cleared_and_the_store_loads() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = TinySpec::default().config();
    {
        let r = registry(dir.path(), usize::MAX, 10);
        r.create("acme", "a", &lora(&cfg, 0.1), serde_json::json!({}))
            .unwrap();
    }
    let adir = dir.path().join("acme/a");
    std::fs::create_dir_all(adir.join(".staging-v2-1-2")).unwrap();
    std::fs::write(adir.join(".staging-v2-1-2/adapter_config.json"), b"{").unwrap();
    std::fs::write(adir.join("CURRENT.tmp"), b"2").unwrap();
    std::fs::create_dir_all(dir.path().join("acme/.staging-b-1-2/v1")).unwrap();
    let r = registry(dir.path(), usize::MAX, 10);
    assert!(!adir.join(".staging-v2-1-2").exists());
    assert!(!adir.join("CURRENT.tmp").exists());
    assert!(!dir.path().join("acme/.staging-b-1-2").exists());
    assert_eq!(r.store().names("acme").unwrap(), vec!["a"]);
    assert_eq!(r.acquire("acme", "a").unwrap().unwrap().version(), 1);
    // A published file that was altered on disk is detected, not served.
    std::fs::write(adir.join("v1/adapter_model.safetensors"), b"tampered").unwrap();
    let fresh = registry(dir.path(), usize::MAX, 10);
    assert!(matches!(
        fresh.acquire("acme", "a"),
        Err(AdapterError::Corrupt(_))
    ));
}

/// Every read checks the manifest's xxh3; a manifest written before xxh3 existed is checked by
/// its sha256. Either way one flipped byte in the weights is caught before parsing.
#[test]
fn a_flipped_byte_is_caught_with_and_without_xxh3_in_the_manifest() {
    let cfg = TinySpec::default().config();
    for legacy in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        registry(dir.path(), usize::MAX, 10)
            .create("acme", "a", &lora(&cfg, 0.1), serde_json::json!({}))
            .unwrap();
        let vdir = dir.path().join("acme/a/v1");
        let manifest_path = vdir.join("manifest.json");
        let mut manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
        assert_eq!(manifest["xxh3"].as_object().unwrap().len(), 2);
        if legacy {
            manifest.as_object_mut().unwrap().remove("xxh3");
            std::fs::write(&manifest_path, serde_json::to_vec(&manifest).unwrap()).unwrap();
        }
        let fresh = registry(dir.path(), usize::MAX, 10);
        assert_eq!(fresh.acquire("acme", "a").unwrap().unwrap().version(), 1);
        let weights = vdir.join("adapter_model.safetensors");
        let mut bytes = std::fs::read(&weights).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x01;
        std::fs::write(&weights, &bytes).unwrap();
        let fresh = registry(dir.path(), usize::MAX, 10);
        match fresh.acquire("acme", "a").err() {
            Some(AdapterError::Corrupt(m)) => assert!(m.contains("checksum"), "{m}"),
            other => panic!("legacy={legacy}: expected Corrupt, got {other:?}"),
        }
    }
}

#[test]
fn paths_are_confined_to_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let store = AdapterStore::open(dir.path()).unwrap();
    std::fs::create_dir_all(dir.path().join("uploads/good")).unwrap();
    std::os::unix::fs::symlink(outside.path(), dir.path().join("uploads/escape")).unwrap();
    assert!(store.confine("uploads/good").is_ok());
    let abs_inside = dir.path().join("uploads/good");
    assert!(store.confine(abs_inside.to_str().unwrap()).is_ok());
    for bad in [
        "../etc",
        "uploads/../../etc",
        "/etc",
        outside.path().to_str().unwrap(),
        "uploads/escape",
        "uploads/missing",
    ] {
        assert!(
            matches!(store.confine(bad), Err(AdapterError::BadRequest(_))),
            "{bad} must be refused"
        );
    }
    for bad in ["..", ".hidden", "a/b", "", "x@1", &"n".repeat(65)] {
        assert!(
            prefix_rft_adapters::store::check_name("adapter", bad).is_err(),
            "{bad:?}"
        );
    }
}
