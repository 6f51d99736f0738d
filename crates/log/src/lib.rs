//! The log: named topics split into partitions, each an ordered sequence of
//! records addressed by offset, with consumer groups that remember how far
//! they have read.
//!
//! [`Log`] is the contract every stage programs against. The embedded
//! implementation ([`EmbeddedLog`], in [`embedded`]) keeps it on local disk;
//! a Kafka implementation satisfies the same trait for the scaled-out mode.
//!
//! Contract (what every implementation guarantees):
//! - `append` returns only once the records are durable; their offsets are
//!   consecutive, starting at the returned offset.
//! - `read` returns only durable records, in offset order, starting at the
//!   first offset `>= from`.
//! - Offsets of a partition only grow; retention removes whole prefixes, so
//!   `start_offset` only grows too.
//! - A committed group offset is the next offset the group will read.

use async_trait::async_trait;
use bytes::Bytes;

pub mod embedded;

pub use embedded::{EmbeddedLog, LogMetrics, LogOptions};

/// A record to append: `key` identifies it (Sluice uses `<source>/<messageId>`),
/// `value` is the event JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub key: Bytes,
    pub value: Bytes,
}

/// A record as read back, with its place in the partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    pub offset: u64,
    /// Append time, milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
    pub key: Bytes,
    pub value: Bytes,
}

/// The readable range of a partition: `start..end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffsetRange {
    /// Oldest offset still held (retention moves it forward).
    pub start: u64,
    /// One past the newest durable record.
    pub end: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("unknown topic {0:?}")]
    UnknownTopic(String),
    #[error("topic {topic:?} has {partitions} partitions; there is no partition {partition}")]
    UnknownPartition { topic: String, partition: u32, partitions: u32 },
    #[error("offset {requested} of {topic}/{partition} is no longer held (retention); the oldest is {start}")]
    OffsetOutOfRange { topic: String, partition: u32, requested: u64, start: u64 },
    #[error("invalid consumer group name {0:?}: use 1-128 characters of A-Z, a-z, 0-9, '.', '_' or '-'")]
    InvalidGroup(String),
    #[error("record of {0} bytes is larger than the log's limit")]
    RecordTooLarge(usize),
    #[error("corrupt record in {path} at byte {position}: {problem}")]
    Corrupt { path: String, position: u64, problem: String },
    #[error("the log is misconfigured: {0}")]
    Config(String),
    #[error("the log at {0} is already open in another process")]
    Locked(String),
    #[error("partition {topic}/{partition} stopped accepting writes after an I/O error; restart to recover: {cause}")]
    Poisoned { topic: String, partition: u32, cause: String },
    #[error("the log was opened read-only")]
    ReadOnly,
    #[error("the log is shut down")]
    Closed,
    #[error("log I/O error on {path}: {source}")]
    Io { path: String, source: std::io::Error },
}

/// A durable, partitioned log. See the crate docs for the contract.
#[async_trait]
pub trait Log: Send + Sync + 'static {
    /// Number of partitions of `topic`.
    fn partitions(&self, topic: &str) -> Result<u32, LogError>;

    /// Append `records` to one partition; returns the offset of the first
    /// once all are durable.
    async fn append(&self, topic: &str, partition: u32, records: Vec<Record>) -> Result<u64, LogError>;

    /// Up to `max_records` durable records with offsets `>= from`, in order.
    /// Empty when `from` is at or past the end.
    async fn read(&self, topic: &str, partition: u32, from: u64, max_records: usize)
        -> Result<Vec<StoredRecord>, LogError>;

    /// The readable range of a partition.
    async fn offsets(&self, topic: &str, partition: u32) -> Result<OffsetRange, LogError>;

    /// Durably record that `group` will next read `next_offset`.
    async fn commit(&self, group: &str, topic: &str, partition: u32, next_offset: u64) -> Result<(), LogError>;

    /// The offset `group` committed last, if any.
    async fn committed(&self, group: &str, topic: &str, partition: u32) -> Result<Option<u64>, LogError>;
}
