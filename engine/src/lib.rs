//! placeholder

pub mod quant;
