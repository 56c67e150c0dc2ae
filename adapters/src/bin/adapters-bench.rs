//! Adapter serving benchmark: decode throughput of 16 concurrent streams with (a) the base
//! model, (b) one LoRA r=16 on all seven projections, (c) 16 different such LoRAs, (d) 16
//! different prefix adapters of 16 virtual tokens; the time to cold-load one adapter from the
//! store; and throughput with 1,000 registered adapters, a 64-adapter resident budget and
//! Zipf-like popularity (every new request leases its adapter through the registry, loading
//! it from disk when it was evicted). Prints one JSON object; `scripts/bench-adapters` writes
//! it to bench/results/adapters.json.
//!
//! Every stream runs requests of a 16-token prompt and 32 greedy tokens back to back; the
//! figure is generated tokens per second over the whole run, so prefill and adapter loads are
//! paid for. The cases take turns in rounds (a, b, c, d, e, a, b, ...), each round a slice of
//! the case's time, so a machine that slows down for a while slows all of them alike and the
//! ratios stay comparable. Each slice starts its streams on new requests (so shorter slices
//! pay more prefill); the 1,000-adapter registry keeps its state across rounds.
//! Usage: `adapters-bench <model.gguf> [threads] [seconds per case] [rounds]`

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prefix_rft_adapters::peft::{self, Limits};
use prefix_rft_adapters::registry::{AdapterRegistry, RegistryConfig};
use prefix_rft_adapters::testing::{random_lora, random_prefix};
use prefix_rft_adapters::{AdapterStore, Lease};
use prefix_rft_engine::gguf::GgufFile;
use prefix_rft_engine::model::{
    AdapterHook, AdapterWeights, KvCache, Llama, LoadOptions, LogitsWanted, ModelConfig, Proj,
    SeqStep,
};
use rand::{Rng, SeedableRng};

const STREAMS: usize = 16;
/// Time spent resolving adapters (leases and cold loads), for the report.
static LEASE_NANOS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
const PROMPT: usize = 16;
const NEW_TOKENS: usize = 32;
const RANK: usize = 16;
const VIRTUAL_TOKENS: usize = 16;
const REGISTERED: usize = 1000;
const RESIDENT: usize = 64;
/// Distinct weight files behind the 1,000 adapters (hard-linked; each adapter is still parsed,
/// validated and held separately).
const DISTINCT: usize = 8;

fn lora(cfg: &ModelConfig, seed: u64) -> AdapterWeights {
    AdapterWeights::new(
        cfg,
        random_lora(cfg, seed, RANK, &Proj::ALL, 0.05, 2.0),
        None,
    )
    .expect("lora")
}

fn prefix(cfg: &ModelConfig, seed: u64) -> AdapterWeights {
    let p = random_prefix(cfg, seed, VIRTUAL_TOKENS, 1.0, 1.0);
    AdapterWeights::new(cfg, BTreeMap::new(), Some(p)).expect("prefix")
}

/// Where a stream's next adapter comes from.
enum Source<'a> {
    Fixed(Vec<Option<Arc<dyn AdapterHook>>>),
    Registry {
        registry: &'a AdapterRegistry,
        zipf: Vec<f64>,
        rng: Box<rand::rngs::StdRng>,
    },
}

impl Source<'_> {
    fn next(&mut self, stream: usize) -> Option<Arc<dyn AdapterHook>> {
        match self {
            Source::Fixed(v) => v[stream % v.len()].clone(),
            Source::Registry {
                registry,
                zipf,
                rng,
            } => {
                let u: f64 = rng.gen();
                let i = zipf.partition_point(|&c| c < u).min(REGISTERED - 1);
                let lease: Lease = registry
                    .acquire("bench", &format!("a{i}"))
                    .expect("lease")
                    .expect("adapter");
                Some(Arc::new(lease))
            }
        }
    }
}

struct Stream {
    adapter: Option<Arc<dyn AdapterHook>>,
    cache: KvCache,
    pending: Vec<u32>,
    generated: usize,
}

/// Generated tokens and seconds taken by `STREAMS` streams running requests back to back.
fn run(model: &Llama, source: &mut Source<'_>, duration: Duration) -> (usize, f64) {
    let cfg = model.config();
    let vocab = cfg.vocab_size as u32;
    let prompt = |s: usize, r: usize| -> Vec<u32> {
        (0..PROMPT)
            .map(|i| (((s * 977 + r * 131 + i) as u64 * 2654435761 % vocab as u64) as u32).max(3))
            .collect()
    };
    let mut requests = 0usize;
    let mut start = |s: usize, source: &mut Source<'_>| {
        requests += 1;
        let t = Instant::now();
        let adapter = source.next(s);
        LEASE_NANOS.fetch_add(
            t.elapsed().as_nanos() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        let cache = KvCache::with_adapter(cfg, adapter.as_deref());
        Stream {
            adapter,
            cache,
            pending: prompt(s, requests),
            generated: 0,
        }
    };
    let mut streams: Vec<Stream> = (0..STREAMS).map(|s| start(s, source)).collect();
    let t0 = Instant::now();
    let mut tokens = 0usize;
    while t0.elapsed() < duration {
        let logits = {
            let mut steps: Vec<SeqStep<'_>> = streams
                .iter_mut()
                .map(|s| SeqStep {
                    tokens: &s.pending,
                    cache: &mut s.cache,
                    adapter: s.adapter.as_deref(),
                    logits: LogitsWanted::Last,
                })
                .collect();
            model.forward(&mut steps).expect("forward")
        };
        for (i, s) in streams.iter_mut().enumerate() {
            let row = logits.last_of(i).expect("logits");
            let next = row
                .iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |b, (j, &v)| if v > b.1 { (j, v) } else { b },
                )
                .0 as u32;
            s.generated += 1;
            tokens += 1;
            s.pending = vec![next];
            if s.generated == NEW_TOKENS {
                *s = start(i, source);
            }
        }
    }
    (tokens, t0.elapsed().as_secs_f64())
}

/// Tokens and seconds summed over the rounds of one case.
#[derive(Default, Clone, Copy)]
struct Total {
    tokens: usize,
    secs: f64,
}

impl Total {
    fn add(&mut self, (tokens, secs): (usize, f64)) {
        self.tokens += tokens;
        self.secs += secs;
    }

    fn tok_s(self) -> f64 {
        self.tokens as f64 / self.secs
    }
}

/// A registry over the bench's store with a resident budget of `budget` bytes.
fn open_registry(
    dir: &std::path::Path,
    cfg: &ModelConfig,
    budget: usize,
) -> Result<AdapterRegistry, prefix_rft_adapters::AdapterError> {
    Ok(AdapterRegistry::new(
        AdapterStore::open(dir)?,
        cfg.clone(),
        RegistryConfig {
            base_id: "base".into(),
            limits: Limits::default(),
            resident_budget_bytes: budget,
            retain_versions: 10,
            // The bench's model runs int8 activations (`LoadOptions::default()`).
            lora_f32: false,
        },
    ))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or("usage: adapters-bench <model.gguf> [threads] [seconds] [rounds]")?;
    let threads: usize = args.next().map(|t| t.parse()).transpose()?.unwrap_or(2);
    let secs: f64 = args.next().map(|t| t.parse()).transpose()?.unwrap_or(20.0);
    let rounds: usize = args
        .next()
        .map(|t| t.parse())
        .transpose()?
        .unwrap_or(4)
        .max(1);
    let slice = Duration::from_secs_f64(secs / rounds as f64);
    prefix_rft_engine::quant::set_num_threads(threads);
    let file = GgufFile::open(std::path::Path::new(&path))?;
    let model = Llama::from_gguf(&file, LoadOptions::default())?;
    let cfg = model.config().clone();

    let one: Arc<dyn AdapterHook> = Arc::new(lora(&cfg, 1));
    let loras: Vec<Option<Arc<dyn AdapterHook>>> = (0..STREAMS)
        .map(|i| Some(Arc::new(lora(&cfg, 100 + i as u64)) as Arc<dyn AdapterHook>))
        .collect();
    let prefixes: Vec<Option<Arc<dyn AdapterHook>>> = (0..STREAMS)
        .map(|i| Some(Arc::new(prefix(&cfg, 200 + i as u64)) as Arc<dyn AdapterHook>))
        .collect();

    // The store: 1,000 adapters over a few distinct files.
    let dir = std::env::temp_dir().join(format!("adapters-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let registry = open_registry(&dir, &cfg, usize::MAX)?;
    for i in 0..DISTINCT {
        registry.create(
            "bench",
            &format!("a{i}"),
            &lora(&cfg, 300 + i as u64),
            serde_json::json!({}),
        )?;
    }
    for i in DISTINCT..REGISTERED {
        let src = dir.join(format!("bench/a{}", i % DISTINCT));
        let dst = dir.join(format!("bench/a{i}"));
        std::fs::create_dir_all(dst.join("v1"))?;
        for f in ["adapter.json", "CURRENT"] {
            std::fs::copy(src.join(f), dst.join(f))?;
        }
        for f in [peft::CONFIG_FILE, peft::WEIGHTS_FILE, "manifest.json"] {
            std::fs::hard_link(src.join("v1").join(f), dst.join("v1").join(f))?;
        }
    }
    let one_bytes = lora(&cfg, 0).resident_bytes();
    // Cold load: a fresh registry each time, so nothing is resident (the file is in the page
    // cache, as it is for a server that has touched it once).
    let mut cold = Vec::new();
    for i in 0..5 {
        let fresh = open_registry(&dir, &cfg, usize::MAX)?;
        let t = Instant::now();
        fresh.acquire("bench", &format!("a{i}"))?;
        cold.push(t.elapsed().as_secs_f64() * 1e3);
    }
    cold.sort_by(f64::total_cmp);
    let zipf_registry = open_registry(&dir, &cfg, RESIDENT * one_bytes)?;
    // Zipf(s = 1) over the 1,000 adapters, as a cumulative table.
    let weights: Vec<f64> = (1..=REGISTERED).map(|k| 1.0 / k as f64).collect();
    let total: f64 = weights.iter().sum();
    let mut acc = 0.0;
    let zipf: Vec<f64> = weights
        .iter()
        .map(|w| {
            acc += w / total;
            acc
        })
        .collect();
    let mut source = Source::Registry {
        registry: &zipf_registry,
        zipf,
        rng: Box::new(rand::rngs::StdRng::seed_from_u64(7)),
    };
    LEASE_NANOS.store(0, std::sync::atomic::Ordering::Relaxed);
    let mut fixed = [
        Source::Fixed(vec![None]),
        Source::Fixed(vec![Some(one)]),
        Source::Fixed(loras),
        Source::Fixed(prefixes),
    ];
    let mut totals = [Total::default(); 5];
    for _ in 0..rounds {
        for (total, source) in totals.iter_mut().zip(fixed.iter_mut()) {
            total.add(run(&model, source, slice));
        }
        totals[4].add(run(&model, &mut source, slice));
    }
    let [base, one_lora, many_lora, many_prefix, thousand] = totals.map(Total::tok_s);
    let lease_secs = LEASE_NANOS.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e9;
    let stats = zipf_registry.stats();
    let _ = std::fs::remove_dir_all(&dir);

    let out = serde_json::json!({
        "streams": STREAMS, "prompt_tokens": PROMPT, "new_tokens_per_request": NEW_TOKENS,
        "lora_rank": RANK, "lora_modules": 7, "prefix_virtual_tokens": VIRTUAL_TOKENS,
        "threads": threads, "seconds_per_case": secs, "rounds": rounds,
        "decode_tok_s": {
            "a_base": base, "b_one_lora": one_lora, "c_16_loras": many_lora,
            "d_16_prefixes": many_prefix, "e_1000_registered_64_resident_zipf": thousand,
        },
        "ratios": {
            "c_over_a": many_lora / base, "d_over_a": many_prefix / base,
            "b_over_a": one_lora / base, "e_over_c": thousand / many_lora,
        },
        "cold_load_ms": {"median": cold[cold.len() / 2], "min": cold[0], "max": cold[cold.len() - 1],
                          "adapter_mib": one_bytes as f64 / (1 << 20) as f64},
        "zipf_run": {"loads": stats.loads, "evictions": stats.evictions, "resident": stats.resident,
                     "seconds_resolving_adapters": lease_secs},
    });
    println!("{out}");
    Ok(())
}
