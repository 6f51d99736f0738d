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

/// The value of a *key record*: a messageId a workspace moving into this
/// cell brought from its old cell's dedup index (docs/plans/MIGRATION.md).
/// Key records ride `input` and `output` like events, so dedup indexes
/// them (and recovers them from `output` after a crash) with no path of
/// its own; every reader of `output` skips them. An event's value is JSON
/// and starts with `{`, never with a NUL byte.
pub const KEY_RECORD: &[u8] = b"\0k:";

/// The value of a *forget record*, keyed `<source id>/`: dedup deletes every
/// id of that source from its index when it reads one in `input` (the
/// cleanup of a workspace that moved to another cell), and publishes
/// nothing.
pub const FORGET_RECORD: &[u8] = b"\0f:";

/// Is `value` Sluice's own (a key or forget record), not an event? Events
/// are JSON objects; Sluice's records start with a NUL byte.
pub fn is_internal_record(value: &[u8]) -> bool {
    value.first() == Some(&0)
}
