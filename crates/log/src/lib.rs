//! The log: named topics split into partitions, each an ordered sequence of
//! records addressed by offset, with consumer groups that remember how far
//! they have read.
//!
//! [`Log`] is the contract every stage programs against. The embedded
//! implementation ([`EmbeddedLog`], in [`embedded`]) keeps it on local disk;
//! [`KafkaLog`] (in [`kafka`]) puts it on Apache Kafka for the scaled-out
//! mode. Both pass the same test suite (`tests/suite.rs`).
//!
//! Contract (what every implementation guarantees):
//! - `append` returns only once the records are durable; their offsets
//!   increase, starting at the returned offset (consecutive in the embedded
//!   log; Kafka may interleave other producers' records).
//! - `read` returns only durable records, in offset order, starting at the
//!   first offset `>= from`.
//! - Offsets of a partition only grow; retention removes whole prefixes, so
//!   `start_offset` only grows too.
//! - A committed group offset is the next offset the group will read.
//! - Offsets may have gaps (Kafka's transaction markers); a reader resumes
//!   from [`ReadBatch::next`], which skips them.

use std::collections::BTreeSet;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::watch;

pub mod backlog;
pub mod embedded;
pub mod failover;
pub mod kafka;

pub use embedded::{EmbeddedLog, LogMetrics, LogOptions};
pub use failover::FailoverLog;
pub use kafka::{KafkaLink, KafkaLog, KafkaOptions};

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

/// What one read returned, and where the next read starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadBatch {
    pub records: Vec<StoredRecord>,
    /// The offset to read from next: past the last record and past any
    /// offsets that hold no record (Kafka's transaction markers).
    pub next: u64,
}

/// Where a consumer group stands on one partition of a topic: the next
/// offset it will read. What [`Log::commit`] records, and the commit half of
/// [`Log::publish_and_commit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint<'a> {
    pub group: &'a str,
    pub topic: &'a str,
    pub partition: u32,
    /// The next offset the group reads (one past what it has processed).
    pub next_offset: u64,
}

/// One step of a stage that reads a topic and writes another (dedup): append
/// `records` to `out_topic`'s partition of the same number as
/// `commit.partition`, and commit `commit`. See [`Log::publish_and_commit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish<'a> {
    pub out_topic: &'a str,
    pub records: Vec<Record>,
    pub commit: Checkpoint<'a>,
    /// The input offset a later owner reads from again while this or an
    /// earlier transaction is not known to have ended on `out_topic`
    /// ([`Log::resume_point`]); only Kafka keeps it.
    pub replay_from: Option<u64>,
}

/// The partitions of a topic this process owns in a consumer group.
/// Kafka moves partitions between members as they come and go; the embedded
/// log has one process, which owns them all. Dropping it leaves the group.
pub struct Membership {
    owned: watch::Receiver<BTreeSet<u32>>,
    _guard: Box<dyn Send + Sync>,
}

impl Membership {
    pub fn new(owned: watch::Receiver<BTreeSet<u32>>, guard: Box<dyn Send + Sync>) -> Self {
        Self { owned, _guard: guard }
    }

    /// Owns `0..partitions` for good.
    pub fn all(partitions: u32) -> Self {
        let (tx, rx) = watch::channel((0..partitions).collect());
        Self::new(rx, Box::new(tx))
    }

    /// The partitions owned now.
    pub fn owned(&self) -> BTreeSet<u32> {
        self.owned.borrow().clone()
    }

    /// A receiver that sees every change of ownership.
    pub fn watch(&self) -> watch::Receiver<BTreeSet<u32>> {
        self.owned.clone()
    }
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
    #[error("Kafka {op} failed: {cause}")]
    Kafka { op: &'static str, cause: String },
    #[error("the log is unavailable: {0}")]
    Unavailable(String),
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
    async fn read(&self, topic: &str, partition: u32, from: u64, max_records: usize) -> Result<Vec<StoredRecord>, LogError>;

    /// The readable range of a partition.
    async fn offsets(&self, topic: &str, partition: u32) -> Result<OffsetRange, LogError>;

    /// Durably record that `at.group` will next read `at.next_offset` of
    /// `at.topic`'s `at.partition`.
    async fn commit(&self, at: Checkpoint<'_>) -> Result<(), LogError>;

    /// The offset `group` committed last, if any.
    async fn committed(&self, group: &str, topic: &str, partition: u32) -> Result<Option<u64>, LogError>;

    /// Like [`Log::read`], and also says where the next read starts.
    async fn read_batch(&self, topic: &str, partition: u32, from: u64, max_records: usize) -> Result<ReadBatch, LogError> {
        let records = self.read(topic, partition, from, max_records).await?;
        let next = records.last().map_or(from, |r| r.offset + 1);
        Ok(ReadBatch { records, next })
    }

    /// Where a new owner of `group`'s `partition` of `topic` starts reading:
    /// the committed offset, or the `replay_from` a
    /// [`Log::publish_and_commit`] kept with it when that is earlier.
    async fn resume_point(&self, group: &str, topic: &str, partition: u32) -> Result<Option<u64>, LogError> {
        self.committed(group, topic, partition).await
    }

    /// Whether [`Log::publish_and_commit`] from `in_topic` is atomic (Kafka
    /// transactions, when input and output are on one cluster).
    fn atomic_publish_and_commit(&self, _in_topic: &str) -> bool {
        false
    }

    /// Take over `in_topic`'s `partition` for publish-and-commit in `group`:
    /// with Kafka, fence any earlier owner (its open transaction is aborted,
    /// its later commits fail), so that what this owner then reads of
    /// `output` and of the committed offset is final. No-op by default.
    async fn fence(&self, _group: &str, _in_topic: &str, _partition: u32) -> Result<(), LogError> {
        Ok(())
    }

    /// Input topics dedup reads besides `input`, partition for partition,
    /// into the same index: the secondary Kafka cluster's `input`.
    fn extra_inputs(&self) -> Vec<String> {
        Vec::new()
    }

    /// Append `p.records` to `p.out_topic`'s partition and commit
    /// `p.commit` (the same-numbered partition of the input topic); returns
    /// the first record's offset (`None` when there were none).
    ///
    /// Kafka does both in one transaction, and keeps `p.replay_from` with the
    /// offset: the input offset a later owner reads from again
    /// ([`Log::resume_point`]) while this or an earlier transaction is not
    /// known to have ended on `out_topic` (see `kafka.rs`, "hanging
    /// transactions"). The default appends, then commits
    /// ([`publish_then_commit`]): not atomic, which dedup's index protocol
    /// covers (a crash between the two replays input, and the index finds
    /// the ids); it ignores `replay_from`.
    async fn publish_and_commit(&self, p: Publish<'_>) -> Result<Option<u64>, LogError> {
        publish_then_commit(self, p).await
    }

    /// Join `group` on `topic`: which of its partitions this process owns,
    /// now and as that changes. The default owns every partition.
    fn join(&self, _group: &str, topic: &str) -> Result<Membership, LogError> {
        Ok(Membership::all(self.partitions(topic)?))
    }
}

/// The non-atomic [`Log::publish_and_commit`]: append, then commit.
pub async fn publish_then_commit<L: Log + ?Sized>(log: &L, p: Publish<'_>) -> Result<Option<u64>, LogError> {
    let first = if p.records.is_empty() { None } else { Some(log.append(p.out_topic, p.commit.partition, p.records).await?) };
    log.commit(p.commit).await?;
    Ok(first)
}
