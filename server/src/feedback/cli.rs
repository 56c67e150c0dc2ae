//! `prefix-rft feedback export|import`: TRL JSON Lines out of, and datasets into, a feedback
//! database, without a running server (SQLite lets both share the file safely).

use std::io::Write;
use std::path::PathBuf;

use super::sqlite::{SqliteFeedbackStore, StoreOptions};
use super::{trl, FeedbackError, FeedbackStore};
use crate::config::Config;

/// `prefix-rft feedback …`
#[derive(Debug, clap::Subcommand)]
pub enum FeedbackCommand {
    /// Writes an adapter's preference pairs as TRL JSON Lines.
    Export(ExportArgs),
    /// Seeds an adapter from TRL preference or SFT JSON Lines.
    Import(ImportArgs),
}

/// Which database and whose data.
#[derive(Debug, clap::Args)]
pub struct Target {
    /// The feedback database (default: `[feedback] path` of the configuration).
    #[arg(long)]
    pub db: Option<PathBuf>,
    /// Configuration file used to find the database when `--db` is not given.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Tenant id.
    #[arg(long)]
    pub tenant: String,
    /// Adapter name (`base` for the base model).
    #[arg(long)]
    pub adapter: String,
}

/// `feedback export`
#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub target: Target,
    /// Output file (default: standard output).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// `feedback import`
#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    #[command(flatten)]
    pub target: Target,
    /// JSON Lines: preference rows (prompt/chosen/rejected) or SFT rows (messages, or
    /// prompt/completion), as message lists or plain strings.
    #[arg(long)]
    pub file: PathBuf,
}

/// Why a CLI command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Feedback(#[from] FeedbackError),
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
}

fn open(target: &Target) -> Result<SqliteFeedbackStore, CliError> {
    let path = match &target.db {
        Some(p) => p.clone(),
        None => Config::load(target.config.as_deref())?.feedback_path(),
    };
    Ok(SqliteFeedbackStore::open(StoreOptions {
        path,
        retention: None,
    })?)
}

/// Runs a `feedback` subcommand; progress goes to standard error.
pub fn run(cmd: FeedbackCommand) -> Result<(), CliError> {
    match cmd {
        FeedbackCommand::Export(args) => {
            let t = &args.target;
            let store = open(t)?;
            let ex = store.training_examples_blocking(&t.tenant, &t.adapter)?;
            let (text, skipped) = trl::export_lines(&ex.pairs);
            let io = |path: PathBuf| move |error| CliError::Io { path, error };
            match &args.out {
                Some(p) => std::fs::write(p, &text).map_err(io(p.clone()))?,
                None => std::io::stdout()
                    .lock()
                    .write_all(text.as_bytes())
                    .map_err(io("<stdout>".into()))?,
            }
            eprintln!(
                "exported {} pair(s) of {}/{} from {}{}",
                ex.pairs.len() - skipped,
                t.tenant,
                t.adapter,
                store.path().display(),
                if skipped > 0 {
                    format!(" ({skipped} on token-id prompts skipped)")
                } else {
                    String::new()
                }
            );
            store.close();
        }
        FeedbackCommand::Import(args) => {
            let t = &args.target;
            let text = std::fs::read_to_string(&args.file).map_err(|error| CliError::Io {
                path: args.file.clone(),
                error,
            })?;
            let rows = trl::parse_lines(&text)?;
            let store = open(t)?;
            let n = SqliteFeedbackStore::blocking(store.import(&t.tenant, &t.adapter, rows))?;
            let stats = store.stats_blocking(&t.tenant, &t.adapter)?;
            eprintln!(
                "imported {n} row(s) into {}/{} ({} pairs, {} demonstrations, {} unpaired negatives now)",
                t.tenant, t.adapter, stats.pairs, stats.demonstrations, stats.unpaired_negatives
            );
            store.close();
        }
    }
    Ok(())
}
