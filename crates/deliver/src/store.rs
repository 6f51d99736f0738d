//! The operations a JobDB provides, whatever stores it: an SQLite file or a
//! table set in MySQL/MariaDB or PostgreSQL (one implementation for the
//! three: [`crate::jobdb::JobDb`]; a trait so tests and tools can wrap it).
//!
//! Invariants every implementation keeps (the suite in
//! `tests/jobstore_suite.rs` checks them against each engine):
//! - `jobs` rows are immutable and `job_state_transitions` is append-only:
//!   the backend only INSERTs, and the database itself (triggers) refuses an
//!   UPDATE or DELETE of either, from anyone.
//! - `(message_id, destination, generation)` is unique within a JobDB:
//!   [`JobStore::insert_job`] of a key that exists stores nothing and
//!   returns false, without failing the transaction.
//! - A job's state is its transition with the highest `seq`; a job without
//!   one is `awaiting_scheduling`. A transition whose (job_id, seq) exists
//!   is refused by SQLite (the transaction fails) and skipped by the SQL
//!   servers' backends, whose commits can be lost with their connection and
//!   are then sent again (see [`crate::sqljobdb`]).
//! - Writes happen between [`JobStore::begin`] and [`JobStore::commit`]
//!   (one transaction per group of writer commands); a commit is durable
//!   when it returns. After a failed operation the caller calls
//!   [`JobStore::rollback`], and nothing of the transaction remains.
//! - A JobDB is removed whole (file or tables), never row by row.
//!
//! The methods block: they run on the JobDB's writer thread or in
//! `spawn_blocking`, never on an async executor thread.

use bytes::Bytes;

use crate::ksuid::Ksuid;
use crate::DeliverError;

/// A job's states (DESIGN §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobState {
    AwaitingScheduling,
    Executing,
    Succeeded,
    AwaitingRetry,
    Discarded,
    Archived,
}

impl JobState {
    pub const ALL: [JobState; 6] =
        [JobState::AwaitingScheduling, JobState::Executing, JobState::Succeeded, JobState::AwaitingRetry, JobState::Discarded, JobState::Archived];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::AwaitingScheduling => "awaiting_scheduling",
            JobState::Executing => "executing",
            JobState::Succeeded => "succeeded",
            JobState::AwaitingRetry => "awaiting_retry",
            JobState::Discarded => "discarded",
            JobState::Archived => "archived",
        }
    }

    pub fn parse(s: &str) -> Option<JobState> {
        JobState::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Discarded | JobState::Archived)
    }
}

/// A job as the route asks for it; the JobDB's writer gives it its id.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub message_id: String,
    pub source: String,
    pub destination: String,
    pub generation: i64,
    pub endpoint: String,
    pub payload: Bytes,
    pub created_at: i64,
    pub expires_at: i64,
    /// When ingest accepted the event (unix ms), for the end-to-end latency.
    pub received_at: i64,
}

/// A stored job with its latest state.
#[derive(Debug, Clone)]
pub struct StoredJob {
    pub id: Ksuid,
    pub job: NewJob,
    pub state: JobState,
    /// Transitions so far (the next one gets `seq + 1`).
    pub seq: i64,
    pub attempt: i64,
    pub retry_at: Option<i64>,
}

/// One row of `job_state_transitions`.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub job_id: Ksuid,
    pub seq: i64,
    pub state: JobState,
    pub at: i64,
    pub attempt: i64,
    pub status: Option<u16>,
    pub error: Option<String>,
    pub retry_at: Option<i64>,
}

/// One JobDB, as the writer thread and the read-only tools use it.
pub trait JobStore: Send {
    /// Names the JobDB in logs and errors: its file, or its server, database
    /// and tables (never a password).
    fn name(&self) -> &str;
    /// Start the transaction that the next operations belong to.
    fn begin(&mut self) -> Result<(), DeliverError>;
    /// Make the transaction durable.
    fn commit(&mut self) -> Result<(), DeliverError>;
    /// Abandon the transaction (after a failed operation); errors are logged, not returned.
    fn rollback(&mut self);
    /// Insert `job` with `id` unless its idempotency key exists; true when inserted.
    fn insert_job(&mut self, id: Ksuid, job: &NewJob) -> Result<bool, DeliverError>;
    fn append_transition(&mut self, t: &Transition) -> Result<(), DeliverError>;
    /// [`JobStore::insert_job`] for many jobs (a repeat of a key earlier in
    /// `jobs` is skipped too); which were inserted, in order. Backends with
    /// a round trip per statement override it with multi-row statements.
    fn insert_jobs(&mut self, jobs: &[(Ksuid, &NewJob)]) -> Result<Vec<bool>, DeliverError> {
        jobs.iter().map(|(id, job)| self.insert_job(*id, job)).collect()
    }
    /// [`JobStore::append_transition`] for many rows, in order.
    fn append_transitions(&mut self, rows: &[Transition]) -> Result<(), DeliverError> {
        rows.iter().try_for_each(|t| self.append_transition(t))
    }
    fn payload(&mut self, id: Ksuid) -> Result<Option<Bytes>, DeliverError>;
    /// Whether a job with this idempotency key exists.
    fn job_exists(&mut self, message_id: &str, destination: &str, generation: i64) -> Result<bool, DeliverError>;
    /// Up to `limit` jobs with id > `after`, in id order, with their latest
    /// state; terminal ones included so the caller can move its cursor.
    fn page(&mut self, after: Option<Ksuid>, limit: usize) -> Result<Vec<StoredJob>, DeliverError>;
    /// One job by id, with its latest state.
    fn get(&mut self, id: Ksuid) -> Result<Option<StoredJob>, DeliverError>;
    /// Jobs whose id or messageId is `key`.
    fn find(&mut self, key: &str) -> Result<Vec<StoredJob>, DeliverError>;
    /// Every transition of `id`, oldest first.
    fn history(&mut self, id: Ksuid) -> Result<Vec<Transition>, DeliverError>;
    /// Jobs not in a terminal state.
    fn count_unfinished(&mut self) -> Result<u64, DeliverError>;
    fn job_count(&mut self) -> Result<u64, DeliverError>;
    /// The largest job id stored (ids continue above it after a restart).
    fn max_id(&mut self) -> Result<Option<Ksuid>, DeliverError>;
    /// (destination, state) → count.
    fn stats(&mut self) -> Result<Vec<(String, JobState, u64)>, DeliverError>;
    /// When the JobDB was created (unix ms), recorded once, at creation.
    fn created_at(&mut self) -> Result<i64, DeliverError>;
}
