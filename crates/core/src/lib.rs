//! Sluice's shared pieces: the configuration model, the stable partitioner
//! every stage agrees on, and the metrics registry each role exposes.

pub mod config;
pub mod crash;
pub mod filter;
pub mod metrics;
pub mod partition;
pub mod retry;

pub use config::{Config, ConfigError};
pub use partition::partition_for;
