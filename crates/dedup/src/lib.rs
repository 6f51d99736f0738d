//! Deduplication: drop every repeat of a `<source id>/<messageId>` within
//! the window (default 28 days), surviving any crash without letting a
//! duplicate through.
//!
//! One [`DedupWorker`] per `input` partition, each with its own RocksDB
//! index ([`index::DedupIndex`]). The protocol for each batch read from
//! `input` (DESIGN.md §2, commit point 2):
//!
//! 1. look the batch's keys up in the index (and drop repeats inside the batch);
//! 2. publish the new messages to `output`, same partition number;
//! 3. write their ids and the `output` offset reached in one `WriteBatch`;
//! 4. commit the `input` offset (consumer group `dedup`).
//!
//! `output` is the truth; the index is derived from it. On start, and after
//! any error, the index first catches up from `output` since its checkpoint,
//! then `input` is read from the committed offset. So:
//!
//! - crash after 2, before 3: catch-up adds the published ids; `input` replays
//!   and finds them: nothing is published twice;
//! - crash after 3, before 4: `input` replays and finds the ids;
//! - index missing or corrupt: it is moved aside and rebuilt from `output`
//!   within the window (and within `output`'s retention), then work resumes.
//!
//! With Kafka, steps 2 and 4 are one transaction, and step 3 waits until the
//! transaction is known to have ended on `output` (the next published batch
//! shows its marker): until then its ids are held in memory, and the input
//! offset keeps a replay point before them, so a transaction that a broker
//! restart left open and a later abort took with it is published again
//! (`worker.rs`, `Unconfirmed`).
//!
//! Named crash points between the steps ([`crash`]) let tests abort the
//! process at each of them.
//!
//! [`spawn_supervisor`] runs one worker thread per owned partition and
//! follows the consumer group's assignment (`supervisor.rs`).

pub mod crash;
pub mod index;
pub mod retry;
mod supervisor;
mod worker;

pub use supervisor::spawn_supervisor;
pub use worker::{rebuild_partition, DedupMetrics, DedupSettings, DedupWorker, Progress};

/// Dedup's consumer group on `input`.
pub use sluice_core::topics::DEDUP_GROUP as GROUP;
/// The topic dedup reads.
pub use sluice_core::topics::INPUT as INPUT_TOPIC;
/// The topic dedup publishes to.
pub use sluice_core::topics::OUTPUT as OUTPUT_TOPIC;

#[derive(Debug, thiserror::Error)]
pub enum DedupError {
    #[error("dedup index {path} is corrupt: {cause}")]
    Corrupt { path: String, cause: String },
    #[error("RocksDB error while {doing}: {cause}")]
    Rocks { doing: String, cause: String },
    #[error("dedup index {path} covers output up to offset {checkpoint}, but output ends at {end}; the index is ahead of its source")]
    AheadOfOutput { path: String, checkpoint: u64, end: u64 },
    #[error("dedup is stopping")]
    Stopped,
    #[error("cannot start a dedup thread: {0}")]
    Thread(std::io::Error),
    #[error(transparent)]
    Log(#[from] sluice_log::LogError),
    #[error("I/O error on {path}: {source}")]
    Io { path: String, source: std::io::Error },
}

impl DedupError {
    fn rocks(doing: &'static str) -> impl FnOnce(rocksdb::Error) -> DedupError {
        move |e| DedupError::Rocks { doing: doing.to_owned(), cause: e.to_string() }
    }

    /// Errors repaired by moving the index aside and rebuilding it.
    pub fn needs_rebuild(&self) -> bool {
        matches!(self, DedupError::Corrupt { .. } | DedupError::AheadOfOutput { .. })
    }
}
