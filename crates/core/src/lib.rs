//! Sluice's shared pieces: the configuration model, the stable partitioner
//! every stage agrees on, the metrics registry each role exposes, and the
//! primitives every stage shares: the clock ([`clock`]), the log's topic and
//! group names ([`topics`]) and the stop signal ([`Shutdown`]).

pub mod bucket;
pub mod clock;
pub mod config;
pub mod crash;
pub mod filter;
pub mod metrics;
pub mod partition;
pub mod retry;
pub mod shutdown;
pub mod topics;

pub use bucket::{bucket_for, BucketSet};
pub use config::{Config, ConfigError};
pub use partition::partition_for;
pub use shutdown::Shutdown;
