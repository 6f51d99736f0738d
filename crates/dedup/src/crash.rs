//! The dedup protocol's crash points (the mechanism is `sluice_core::crash`).

pub use sluice_core::crash::{crash_point, CRASH_ENV};

/// Every crash point of the dedup protocol, in protocol order.
pub const DEDUP_POINTS: [&str; 4] = ["dedup.before_publish", "dedup.after_publish", "dedup.after_index_write", "dedup.after_input_commit"];
