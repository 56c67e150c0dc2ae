//! The one error type of the trainer.

use prefix_rft_engine::train::TrainError;

/// Why a training run could not start or finish.
#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    /// The training forward failed (shapes, context length, token range).
    #[error("forward: {0}")]
    Forward(#[from] TrainError),
    /// A tensor operation of the objective or optimiser failed.
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
    /// The training data cannot be used (empty, an empty completion, ...).
    #[error("invalid data: {0}")]
    Data(String),
    /// A hyper-parameter is out of range.
    #[error("invalid parameter: {0}")]
    Params(String),
    /// The parent adapter does not fit the adapter being trained.
    #[error("parent adapter: {0}")]
    Parent(String),
    /// The loss or a gradient became NaN or infinite.
    #[error("training diverged at step {step}: loss {loss}")]
    Diverged { step: usize, loss: f64 },
    /// The base model could not be loaded.
    #[error("base model {0}")]
    Model(String),
    /// The parent's PEFT files are unusable, or the result cannot be written as PEFT files.
    #[error("adapter files: {0}")]
    Adapter(#[from] prefix_rft_adapters::AdapterError),
    /// Writing the output failed.
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// The reward plugin failed or answered something unusable.
    #[error("reward: {0}")]
    Reward(String),
    /// The caller asked to stop.
    #[error("cancelled at step {step} of {total}")]
    Cancelled { step: usize, total: usize },
}
