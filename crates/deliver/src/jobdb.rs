//! One JobDB: an SQLite file in WAL mode with two tables.
//!
//! Invariants:
//! - `jobs` rows are immutable and `job_state_transitions` is append-only:
//!   the code only ever INSERTs, and triggers abort any UPDATE or DELETE of
//!   either table, so a bug cannot quietly rewrite history.
//! - A job's state is its latest transition (highest `seq`). A job without
//!   transitions is `awaiting_scheduling`: the `jobs` row itself records
//!   that first state (at `created_at`), which saves one row per delivery.
//! - `(message_id, destination, generation)` is unique: inserting the same
//!   event for the same destination twice is a no-op (route replays after a
//!   crash). A `sluice replay` uses a new generation.
//! - A JobDB is deleted whole (file, WAL, lock) once every job in it is in a
//!   terminal state; nothing is ever deleted row by row.
//! - Every commit is `synchronous = FULL`: a job the route was told is
//!   stored survives power loss. Writers batch many rows per commit.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use crate::ksuid::Ksuid;
use crate::store::{JobState, JobStore, NewJob, StoredJob, Transition};
use crate::{now_ms, DeliverError};

fn sql_err(path: &Path) -> impl Fn(rusqlite::Error) -> DeliverError + '_ {
    move |source| DeliverError::Sqlite { path: path.display().to_string(), source }
}

/// A connection to one JobDB file.
pub struct JobDb {
    pub path: PathBuf,
    /// `path` as text, for logs ([`crate::store::JobStore::name`]).
    pub(crate) name: String,
    conn: Connection,
}

impl JobDb {
    /// Open (creating if needed) for writing.
    pub fn open(path: &Path) -> Result<JobDb, DeliverError> {
        let e = sql_err(path);
        let conn = Connection::open(path).map_err(&e)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(&e)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(&e)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(&e)?;
        conn.execute_batch(&crate::schema::sqlite_jobdb()).map_err(&e)?;
        conn.set_prepared_statement_cache_capacity(64);
        Ok(JobDb { path: path.to_owned(), name: path.display().to_string(), conn })
    }

    /// Open an existing JobDB read-only (CLI tools, while a director writes).
    pub fn open_read_only(path: &Path) -> Result<JobDb, DeliverError> {
        let e = sql_err(path);
        let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX).map_err(&e)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(&e)?;
        Ok(JobDb { path: path.to_owned(), name: path.display().to_string(), conn })
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> DeliverError + '_ {
        sql_err(&self.path)
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    pub fn meta(&self, key: &str) -> Result<Option<String>, DeliverError> {
        self.conn.query_row("SELECT value FROM jobdb_meta WHERE key = ?1", [key], |r| r.get(0)).optional().map_err(self.err())
    }

    pub fn set_meta_once(&self, key: &str, value: &str) -> Result<(), DeliverError> {
        self.conn.execute("INSERT OR IGNORE INTO jobdb_meta (key, value) VALUES (?1, ?2)", params![key, value]).map(|_| ()).map_err(self.err())
    }

    /// The latest transition of `id`: (state, seq, attempt, retry_at); `None` = awaiting_scheduling.
    fn latest(&self, id: &[u8]) -> Result<Option<(JobState, i64, i64, Option<i64>)>, DeliverError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT state, seq, attempt, retry_at FROM job_state_transitions WHERE job_id = ?1 ORDER BY seq DESC LIMIT 1")
            .map_err(self.err())?;
        let row = stmt.query_row([id], |r| Ok((r.get::<_, String>(0)?, r.get(1)?, r.get(2)?, r.get(3)?))).optional().map_err(self.err())?;
        Ok(row.map(|(s, seq, attempt, retry_at)| (JobState::parse(&s).unwrap_or(JobState::AwaitingRetry), seq, attempt, retry_at)))
    }

    fn select_jobs(&self, condition: &str, args: impl rusqlite::Params) -> Result<Vec<StoredJob>, DeliverError> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT id, message_id, source, destination, generation, endpoint, payload, created_at, expires_at, received_at
                 FROM jobs WHERE {condition}"
            ))
            .map_err(self.err())?;
        let rows = stmt
            .query_map(args, |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    NewJob {
                        message_id: r.get(1)?,
                        source: r.get(2)?,
                        destination: r.get(3)?,
                        generation: r.get(4)?,
                        endpoint: r.get(5)?,
                        payload: Bytes::from(r.get::<_, Vec<u8>>(6)?),
                        created_at: r.get(7)?,
                        expires_at: r.get(8)?,
                        received_at: r.get(9)?,
                    },
                ))
            })
            .map_err(self.err())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.err())?;
        let mut out = Vec::with_capacity(rows.len());
        for (id, job) in rows {
            let (state, seq, attempt, retry_at) = self.latest(&id)?.unwrap_or((JobState::AwaitingScheduling, 0, 0, None));
            let id =
                Ksuid::from_slice(&id).ok_or_else(|| DeliverError::Corrupt(format!("{}: a job id of {} bytes", self.path.display(), id.len())))?;
            out.push(StoredJob { id, job, state, seq, attempt, retry_at });
        }
        Ok(out)
    }
}

impl JobStore for JobDb {
    fn name(&self) -> &str {
        &self.name
    }
    fn begin(&mut self) -> Result<(), DeliverError> {
        self.conn.execute_batch("BEGIN IMMEDIATE").map_err(self.err())
    }

    fn commit(&mut self) -> Result<(), DeliverError> {
        self.conn.execute_batch("COMMIT").map_err(self.err())
    }

    fn rollback(&mut self) {
        let _ = self.conn.execute_batch("ROLLBACK");
    }

    /// Insert `job` with `id` unless its idempotency key exists; true when inserted.
    fn insert_job(&mut self, id: Ksuid, job: &NewJob) -> Result<bool, DeliverError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "INSERT OR IGNORE INTO jobs (id, message_id, source, destination, generation, endpoint, payload, created_at, expires_at, received_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )
            .map_err(self.err())?;
        let n = stmt
            .execute(params![
                &id.0[..],
                job.message_id,
                job.source,
                job.destination,
                job.generation,
                job.endpoint,
                &job.payload[..],
                job.created_at,
                job.expires_at,
                job.received_at
            ])
            .map_err(self.err())?;
        Ok(n == 1)
    }

    fn payload(&mut self, id: Ksuid) -> Result<Option<Bytes>, DeliverError> {
        let mut stmt = self.conn.prepare_cached("SELECT payload FROM jobs WHERE id = ?1").map_err(self.err())?;
        stmt.query_row([&id.0[..]], |r| r.get::<_, Vec<u8>>(0)).optional().map(|o| o.map(Bytes::from)).map_err(self.err())
    }

    /// Whether a job with this idempotency key exists.
    fn job_exists(&mut self, message_id: &str, destination: &str, generation: i64) -> Result<bool, DeliverError> {
        let mut stmt =
            self.conn.prepare_cached("SELECT 1 FROM jobs WHERE message_id = ?1 AND destination = ?2 AND generation = ?3").map_err(self.err())?;
        stmt.exists(params![message_id, destination, generation]).map_err(self.err())
    }

    fn append_transition(&mut self, t: &Transition) -> Result<(), DeliverError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "INSERT INTO job_state_transitions (job_id, seq, state, at, attempt, status, error, retry_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )
            .map_err(self.err())?;
        stmt.execute(params![&t.job_id.0[..], t.seq, t.state.as_str(), t.at, t.attempt, t.status, t.error, t.retry_at]).map_err(self.err())?;
        Ok(())
    }

    /// The largest job id stored (ids continue above it after a restart).
    fn max_id(&mut self) -> Result<Option<Ksuid>, DeliverError> {
        let v: Option<Vec<u8>> = self.conn.query_row("SELECT max(id) FROM jobs", [], |r| r.get(0)).map_err(self.err())?;
        Ok(v.and_then(|b| Ksuid::from_slice(&b)))
    }

    fn job_count(&mut self) -> Result<u64, DeliverError> {
        self.conn.query_row("SELECT count(*) FROM jobs", [], |r| r.get::<_, i64>(0)).map(|n| n as u64).map_err(self.err())
    }

    /// Up to `limit` jobs with id > `after`, in id order, with their latest
    /// state; terminal ones included so the caller can move its cursor.
    fn page(&mut self, after: Option<Ksuid>, limit: usize) -> Result<Vec<StoredJob>, DeliverError> {
        let after = after.map(|k| k.0.to_vec()).unwrap_or_default();
        self.select_jobs("id > ?1 ORDER BY id LIMIT ?2", params![after, limit as i64])
    }

    /// Jobs not in a terminal state.
    fn count_unfinished(&mut self) -> Result<u64, DeliverError> {
        self.conn
            .query_row(
                "SELECT count(*) FROM jobs j WHERE NOT EXISTS (
                    SELECT 1 FROM job_state_transitions t WHERE t.job_id = j.id
                    AND t.state IN ('succeeded', 'discarded', 'archived'))",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
            .map_err(self.err())
    }

    /// Every transition of `id`, oldest first.
    fn history(&mut self, id: Ksuid) -> Result<Vec<Transition>, DeliverError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT seq, state, at, attempt, status, error, retry_at FROM job_state_transitions WHERE job_id = ?1 ORDER BY seq")
            .map_err(self.err())?;
        let rows = stmt
            .query_map([&id.0[..]], |r| {
                Ok(Transition {
                    job_id: id,
                    seq: r.get(0)?,
                    state: JobState::parse(&r.get::<_, String>(1)?).unwrap_or(JobState::AwaitingRetry),
                    at: r.get(2)?,
                    attempt: r.get(3)?,
                    status: r.get::<_, Option<i64>>(4)?.map(|s| s as u16),
                    error: r.get(5)?,
                    retry_at: r.get(6)?,
                })
            })
            .map_err(self.err())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.err())?;
        Ok(rows)
    }

    /// One job by id, with its latest state.
    fn get(&mut self, id: Ksuid) -> Result<Option<StoredJob>, DeliverError> {
        Ok(self.select_jobs("id = ?1", [&id.0[..]])?.pop())
    }

    /// Jobs whose id or messageId is `key` (a messageId has one job per destination and generation).
    fn find(&mut self, key: &str) -> Result<Vec<StoredJob>, DeliverError> {
        match Ksuid::parse(key) {
            Some(k) => self.select_jobs("id = ?1", [&k.0[..]]),
            None => self.select_jobs("message_id = ?1 ORDER BY id", [key]),
        }
    }

    /// (destination, state) → count, for `sluice jobs stats`.
    fn stats(&mut self) -> Result<Vec<(String, JobState, u64)>, DeliverError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT j.destination,
                        coalesce((SELECT state FROM job_state_transitions t WHERE t.job_id = j.id ORDER BY seq DESC LIMIT 1),
                                 'awaiting_scheduling') AS state,
                        count(*)
                 FROM jobs j GROUP BY 1, 2 ORDER BY 1, 2",
            )
            .map_err(self.err())?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?)))
            .map_err(self.err())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.err())?;
        Ok(rows.into_iter().map(|(d, s, n)| (d, JobState::parse(&s).unwrap_or(JobState::AwaitingRetry), n as u64)).collect())
    }

    fn created_at(&mut self) -> Result<i64, DeliverError> {
        self.set_meta_once("created_at", &now_ms().to_string())?;
        Ok(self.meta("created_at")?.and_then(|v| v.parse().ok()).unwrap_or_else(now_ms))
    }
}

/// `jobdb-<seq:06>.sqlite` files in `dir`, oldest first.
pub fn list_jobdbs(dir: &Path) -> Result<Vec<(u64, PathBuf)>, DeliverError> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(source) => return Err(DeliverError::Io { path: dir.display().to_string(), source }),
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if let Some(seq) = name.strip_prefix("jobdb-").and_then(|s| s.strip_suffix(".sqlite")).and_then(|s| s.parse().ok()) {
            out.push((seq, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

pub fn jobdb_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("jobdb-{seq:06}.sqlite"))
}

/// Delete a JobDB's files: the database, its WAL and shared memory, its lock.
pub fn remove_jobdb_files(path: &Path) -> Result<(), DeliverError> {
    for suffix in ["", "-wal", "-shm", ".lock"] {
        let p = PathBuf::from(format!("{}{suffix}", path.display()));
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(DeliverError::Io { path: p.display().to_string(), source }),
        }
    }
    Ok(())
}
