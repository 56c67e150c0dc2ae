//! `prefix-rft adapters list|import|export`: the adapter store offline, with the same
//! validation and durable publish as the server (run it while the server is stopped).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use prefix_rft_adapters::peft::{self, CONFIG_FILE, WEIGHTS_FILE};
use prefix_rft_adapters::{AdapterError, AdapterRegistry, NewVersion, PeftFiles};
use prefix_rft_engine::gguf::GgufFile;
use prefix_rft_engine::model::ModelConfig;
use prefix_rft_server::config::Config;

#[derive(clap::Args)]
pub struct AdaptersArgs {
    /// Configuration file (default: the embedded config.toml).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Data directory (overrides `[server] data_dir`).
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: AdaptersCommand,
}

#[derive(clap::Subcommand)]
enum AdaptersCommand {
    /// Lists adapters and their versions.
    List {
        /// Only this tenant (default: every tenant of the config).
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Validates a PEFT directory and stores it: a new adapter, or its next version.
    Import {
        /// Tenant.
        #[arg(long)]
        tenant: String,
        /// Adapter name.
        #[arg(long)]
        name: String,
        /// Directory with adapter_config.json and adapter_model.safetensors.
        #[arg(long)]
        dir: PathBuf,
        /// Publish without making it current.
        #[arg(long)]
        no_activate: bool,
        /// Refuse unless this is the current version (compare-and-swap).
        #[arg(long)]
        expected_current: Option<u32>,
    },
    /// Writes a version's PEFT files to a directory (loadable by Python PEFT).
    Export {
        /// Tenant.
        #[arg(long)]
        tenant: String,
        /// Adapter name.
        #[arg(long)]
        name: String,
        /// Version (default: the current one).
        #[arg(long)]
        version: Option<u32>,
        /// Output directory (created).
        #[arg(long)]
        out: PathBuf,
    },
}

/// The model's shape without loading its weights.
fn model_config(path: &Path) -> anyhow::Result<ModelConfig> {
    if path.is_dir() {
        let text = std::fs::read_to_string(path.join("config.json"))
            .with_context(|| format!("reading {}/config.json", path.display()))?;
        Ok(ModelConfig::from_hf_json(&text)?)
    } else {
        let file = GgufFile::open(path).with_context(|| format!("opening {}", path.display()))?;
        Ok(ModelConfig::from_gguf(&file)?)
    }
}

pub fn run(args: AdaptersArgs) -> anyhow::Result<()> {
    let mut config = Config::load(args.config.as_deref())?;
    if let Some(d) = args.data_dir {
        config.server.data_dir = d;
    }
    let model = model_config(&config.model.path)?;
    // Offline: nothing is served, so no f32 copies are built.
    let registry: AdapterRegistry = prefix_rft_server::open_adapters(&config, model, false)?;
    match args.command {
        AdaptersCommand::List { tenant } => {
            let tenants: Vec<String> = match tenant {
                Some(t) => vec![t],
                None => config.tenants.iter().map(|t| t.id.clone()).collect(),
            };
            println!(
                "{:<12} {:<24} {:<12} {:>7}  versions",
                "tenant", "adapter", "kind", "current"
            );
            for t in tenants {
                for a in registry.list(&t)? {
                    let versions: Vec<String> = a
                        .versions
                        .iter()
                        .map(|v| format!("v{}({:?})", v.version, v.status).to_lowercase())
                        .collect();
                    let kind = serde_json::to_value(a.meta.kind)?;
                    println!(
                        "{:<12} {:<24} {:<12} {:>7}  {}",
                        t,
                        a.meta.name,
                        kind.as_str().unwrap_or("?"),
                        a.current,
                        versions.join(" ")
                    );
                }
            }
        }
        AdaptersCommand::Import {
            tenant,
            name,
            dir,
            no_activate,
            expected_current,
        } => {
            let limits = *registry.limits();
            let files = PeftFiles {
                config: peft::read_bounded(&dir.join(CONFIG_FILE), 1 << 20)?,
                weights: peft::read_bounded(&dir.join(WEIGHTS_FILE), limits.max_file_bytes)?,
            };
            let manifest = match registry.store().current(&tenant, &name) {
                Err(AdapterError::NotFound(_)) => {
                    if expected_current.is_some() {
                        bail!("adapter {name:?} does not exist; --expected-current needs one");
                    }
                    registry.create_from_files(&tenant, &name, &files)?
                }
                Err(e) => return Err(e.into()),
                Ok(current) => registry.publish(
                    &tenant,
                    &name,
                    &files,
                    NewVersion::upload(prefix_rft_adapters::AdapterKind::Lora, Some(current)),
                    !no_activate,
                    expected_current,
                )?,
            };
            println!("{tenant}/{name}: stored version {}", manifest.version);
        }
        AdaptersCommand::Export {
            tenant,
            name,
            version,
            out,
        } => {
            let version = match version {
                Some(v) => v,
                None => registry.store().current(&tenant, &name)?,
            };
            let files = registry.store().read_files(&tenant, &name, version)?;
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            std::fs::write(out.join(CONFIG_FILE), &files.config)?;
            std::fs::write(out.join(WEIGHTS_FILE), &files.weights)?;
            println!("{tenant}/{name}@{version} → {}", out.display());
        }
    }
    Ok(())
}
