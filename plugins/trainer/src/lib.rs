//! The Prefix-RFT trainer: the objective ([`objective`]), the training loop ([`train`]) and,
//! as a cdylib, the trainer plugin the server loads.

pub mod error;
pub mod objective;
pub mod train;

pub use error::TrainerError;
