//! The names of the log's topics and of the consumer groups that read them,
//! written once: every stage, the binary's wiring and the tools use these.
//!
//! ```text
//! ingest ──▶ INPUT ──(group DEDUP_GROUP)──▶ dedup ──▶ OUTPUT ──(group ROUTE_GROUP)──▶ route
//! ```
//!
//! With a secondary Kafka cluster, dedup also reads that cluster's `input`
//! under the name [`SECONDARY_INPUT`] (`FailoverLog` maps it).

/// Where ingest appends accepted events; dedup reads it.
pub const INPUT: &str = "input";
/// The secondary Kafka cluster's `input`, as dedup reads it through `FailoverLog`.
pub const SECONDARY_INPUT: &str = "input.secondary";
/// Where dedup publishes first copies; the route reads it.
pub const OUTPUT: &str = "output";
/// Dedup's consumer group on [`INPUT`] (and [`SECONDARY_INPUT`]).
pub const DEDUP_GROUP: &str = "dedup";
/// The route's consumer group on [`OUTPUT`].
pub const ROUTE_GROUP: &str = "route";
