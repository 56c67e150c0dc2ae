//! The prefix-rft server library: configuration today; the HTTP router, tenants, feedback and
//! training orchestration live here as they are built. The binary only parses arguments.

pub mod config;
