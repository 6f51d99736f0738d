//! The operations a JobDB backend provides, whatever stores it: an SQLite
//! file ([`JobDb`]) or a table set in MySQL/MariaDB or PostgreSQL
//! ([`crate::sqljobdb::SqlJobDb`]).
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

use crate::jobdb::{JobDb, JobState, StoredJob, Transition};
use crate::ksuid::Ksuid;
use crate::{now_ms, DeliverError, NewJob};

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

impl JobStore for JobDb {
    fn name(&self) -> &str {
        &self.name
    }
    fn begin(&mut self) -> Result<(), DeliverError> {
        JobDb::begin(self)
    }
    fn commit(&mut self) -> Result<(), DeliverError> {
        JobDb::commit(self)
    }
    fn rollback(&mut self) {
        JobDb::rollback(self)
    }
    fn insert_job(&mut self, id: Ksuid, job: &NewJob) -> Result<bool, DeliverError> {
        JobDb::insert_job(self, id, job)
    }
    fn append_transition(&mut self, t: &Transition) -> Result<(), DeliverError> {
        JobDb::append_transition(self, t)
    }
    fn payload(&mut self, id: Ksuid) -> Result<Option<Bytes>, DeliverError> {
        JobDb::payload(self, id)
    }
    fn job_exists(&mut self, message_id: &str, destination: &str, generation: i64) -> Result<bool, DeliverError> {
        JobDb::job_exists(self, message_id, destination, generation)
    }
    fn page(&mut self, after: Option<Ksuid>, limit: usize) -> Result<Vec<StoredJob>, DeliverError> {
        JobDb::page(self, after, limit)
    }
    fn get(&mut self, id: Ksuid) -> Result<Option<StoredJob>, DeliverError> {
        JobDb::get(self, id)
    }
    fn find(&mut self, key: &str) -> Result<Vec<StoredJob>, DeliverError> {
        JobDb::find(self, key)
    }
    fn history(&mut self, id: Ksuid) -> Result<Vec<Transition>, DeliverError> {
        JobDb::history(self, id)
    }
    fn count_unfinished(&mut self) -> Result<u64, DeliverError> {
        JobDb::count_unfinished(self)
    }
    fn job_count(&mut self) -> Result<u64, DeliverError> {
        JobDb::job_count(self)
    }
    fn max_id(&mut self) -> Result<Option<Ksuid>, DeliverError> {
        JobDb::max_id(self)
    }
    fn stats(&mut self) -> Result<Vec<(String, JobState, u64)>, DeliverError> {
        JobDb::stats(self)
    }
    fn created_at(&mut self) -> Result<i64, DeliverError> {
        self.set_meta_once("created_at", &now_ms().to_string())?;
        Ok(self.meta("created_at")?.and_then(|v| v.parse().ok()).unwrap_or_else(now_ms))
    }
}
