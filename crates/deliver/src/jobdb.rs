//! One JobDB, on any engine: an SQLite file in WAL mode
//! ([`JobDb::open`]), or a table set in a MySQL/MariaDB or PostgreSQL
//! database ([`crate::sqljobdb::SqlJobDbs::open`]). One implementation of
//! [`JobStore`] over [`sluice_sql::conn::Connection`]; the engines differ only in
//! the statements [`Statements::new`] builds and in what the dialect says.
//!
//! Invariants (besides those of [`crate::store`]):
//! - `jobs` rows are immutable and `job_state_transitions` is append-only:
//!   the code only ever INSERTs, and triggers abort any UPDATE or DELETE of
//!   either table, so a bug cannot quietly rewrite history.
//! - A job's state is its latest transition (highest `seq`). A job without
//!   transitions is `awaiting_scheduling`: the `jobs` row itself records
//!   that first state (at `created_at`), which saves one row per delivery.
//! - `(message_id, destination, generation)` is unique: inserting the same
//!   event for the same destination twice is a no-op (route replays after a
//!   crash). A `sluice replay` uses a new generation. SQLite keeps a unique
//!   index on the three columns (`INSERT OR IGNORE`); the servers keep
//!   `idempotency_key` = SHA-256 of the length-prefixed three under a unique
//!   index ([`idempotency_key`]), exact for keys of any length and bytes.
//! - A transition whose (job_id, seq) exists fails the SQLite transaction;
//!   the servers skip it (a commit whose outcome was lost with the
//!   connection is sent again by the writer's caller).
//! - A JobDB is deleted whole (file, or its tables), never row by row.
//! - Every commit is durable when it returns: SQLite `synchronous = FULL`;
//!   the servers' settings (see [`crate::sqljobdb`]). Writers batch many
//!   rows per commit. SQLite writes row by row through cached prepared
//!   statements (no round trips); the servers get multi-row statements
//!   ([`JobStore::insert_jobs`]: one lookup of the batch's keys, then one
//!   INSERT of the new jobs, per 1,000 rows or 4 MiB), since a round trip
//!   per row peaked near 11K jobs/s on this machine's MariaDB and
//!   PostgreSQL, multi-row statements near 42K.
//! - A lost server connection is opened again at the next
//!   [`JobStore::begin`].

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use rusqlite::OpenFlags;
use sha2::{Digest, Sha256};

use crate::ksuid::Ksuid;
use crate::schema::{Dialect, JOBS};
use crate::sqljobdb::SqlJobDbs;
use crate::store::{JobState, JobStore, NewJob, StoredJob, Transition};
use crate::{now_ms, DeliverError};
use sluice_sql::conn::{Arg, Connection, SqlError, SqlRow};

/// One JobDB on its own connection.
pub struct JobDb {
    /// The file, or the server's URL (no password) and the jobs table: for logs and errors.
    name: String,
    conn: Connection,
    sql: Statements,
    home: Home,
    /// The server connection failed: open a new one at the next `begin`.
    broken: bool,
}

/// Where a JobDB lives.
enum Home {
    File,
    Server { dbs: Box<SqlJobDbs>, seq: u64 },
}

impl JobDb {
    /// Open the SQLite file at `path` (creating it if needed) for writing.
    pub fn open(path: &Path) -> Result<JobDb, DeliverError> {
        let e = |source| DeliverError::Sqlite { path: path.display().to_string(), source };
        let conn = rusqlite::Connection::open(path).map_err(e)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(e)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(e)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(e)?;
        conn.execute_batch(&crate::schema::sqlite_jobdb()).map_err(e)?;
        conn.set_prepared_statement_cache_capacity(64);
        Ok(JobDb::file(path, conn))
    }

    /// Open an existing SQLite JobDB read-only (CLI tools, while a director writes).
    pub fn open_read_only(path: &Path) -> Result<JobDb, DeliverError> {
        let e = |source| DeliverError::Sqlite { path: path.display().to_string(), source };
        let conn = rusqlite::Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX).map_err(e)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(e)?;
        Ok(JobDb::file(path, conn))
    }

    fn file(path: &Path, conn: rusqlite::Connection) -> JobDb {
        JobDb {
            name: path.display().to_string(),
            conn: Connection::Sqlite(conn),
            sql: Statements::new(Dialect::Sqlite, "jobs", "job_state_transitions"),
            home: Home::File,
            broken: false,
        }
    }

    /// JobDB `seq` of `dbs` on `session` (its tables exist or are not to be created).
    pub(crate) fn on_server(dbs: SqlJobDbs, seq: u64, conn: Connection) -> JobDb {
        let (jobs, transitions) = dbs.table_names(seq);
        let sql = Statements::new(conn.dialect(), &jobs, &transitions).with_registry(dbs.registry_table());
        JobDb { name: format!("{} ({jobs})", dbs.display()), conn, sql, home: Home::Server { dbs: Box::new(dbs), seq }, broken: false }
    }

    /// The SQLite connection of a file JobDB (tests, benchmarks: `None` on a server).
    pub fn sqlite_connection(&self) -> Option<&rusqlite::Connection> {
        match &self.conn {
            Connection::Sqlite(c) => Some(c),
            Connection::Server(_) => None,
        }
    }

    /// The error of `what`, after which a lost server connection is opened again.
    fn failed(&mut self, what: &str, e: SqlError) -> DeliverError {
        if e.is_connection_lost() {
            self.broken = true;
        }
        e.named(format!("{}: {what}", self.name)).into()
    }

    fn select_jobs(&mut self, sql: fn(&Statements) -> &str, args: &[Arg<'_>]) -> Result<Vec<StoredJob>, DeliverError> {
        let rows = self.conn.query(sql(&self.sql), args, job_row).map_err(|e| self.failed("selecting jobs", e))?;
        rows.into_iter()
            .map(|JobRow { id, job, state, seq, attempt, retry_at }| {
                let id = Ksuid::from_slice(&id).ok_or_else(|| DeliverError::Corrupt(format!("{}: a job id of {} bytes", self.name, id.len())))?;
                let state = state.as_deref().map_or(JobState::AwaitingScheduling, parse_state);
                Ok(StoredJob { id, job, state, seq, attempt, retry_at })
            })
            .collect()
    }

    fn count(&mut self, what: &str, sql: fn(&Statements) -> &str) -> Result<u64, DeliverError> {
        let n = self.conn.query_one(sql(&self.sql), &[], |r| r.int(0)).map_err(|e| self.failed(what, e))?;
        Ok(n.unwrap_or(0) as u64)
    }

    /// The servers' idempotency key of `job` (`None` on SQLite, which indexes the columns).
    fn key(&self, message_id: &str, destination: &str, generation: i64) -> Option<[u8; 32]> {
        (self.sql.dialect != Dialect::Sqlite).then(|| idempotency_key(message_id, destination, generation))
    }
}

/// A job row as the job selects read it, with its latest transition (none: awaiting_scheduling).
struct JobRow {
    id: Vec<u8>,
    job: NewJob,
    state: Option<String>,
    seq: i64,
    attempt: i64,
    retry_at: Option<i64>,
}

fn job_row(r: &dyn SqlRow) -> Result<JobRow, SqlError> {
    let job = NewJob {
        message_id: r.text(1)?,
        source: r.text(2)?,
        destination: r.text(3)?,
        generation: r.int(4)?,
        endpoint: r.text(5)?,
        payload: Bytes::from(r.bytes(6)?),
        created_at: r.int(7)?,
        expires_at: r.int(8)?,
        received_at: r.int(9)?,
    };
    Ok(JobRow {
        id: r.bytes(0)?,
        job,
        state: r.opt_text(10)?,
        seq: r.opt_int(11)?.unwrap_or(0),
        attempt: r.opt_int(12)?.unwrap_or(0),
        retry_at: r.opt_int(13)?,
    })
}

/// An unknown state string is read as `awaiting_retry`: it is retried, not lost.
fn parse_state(s: &str) -> JobState {
    JobState::parse(s).unwrap_or(JobState::AwaitingRetry)
}

/// SHA-256 of the length-prefixed idempotency key (the servers' `idempotency_key`).
pub fn idempotency_key(message_id: &str, destination: &str, generation: i64) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update((message_id.len() as u64).to_be_bytes());
    h.update(message_id.as_bytes());
    h.update((destination.len() as u64).to_be_bytes());
    h.update(destination.as_bytes());
    h.update(generation.to_be_bytes());
    h.finalize().into()
}

/// A job's column values, in [`JOBS`] order for the dialect (`key`: the servers' idempotency key).
fn job_args<'a>(id: &'a Ksuid, key: Option<&'a [u8; 32]>, job: &'a NewJob, out: &mut Vec<Arg<'a>>) {
    out.push(Arg::Bytes(&id.0));
    if let Some(key) = key {
        out.push(Arg::Bytes(key));
    }
    out.extend([
        Arg::Text(&job.message_id),
        Arg::Text(&job.source),
        Arg::Text(&job.destination),
        Arg::Int(job.generation),
        Arg::Text(&job.endpoint),
        Arg::Bytes(&job.payload),
        Arg::Int(job.created_at),
        Arg::Int(job.expires_at),
        Arg::Int(job.received_at),
    ]);
}

fn transition_args<'a>(t: &'a Transition, out: &mut Vec<Arg<'a>>) {
    out.extend([
        Arg::Bytes(&t.job_id.0),
        Arg::Int(t.seq),
        Arg::Text(t.state.as_str()),
        Arg::Int(t.at),
        Arg::Int(t.attempt),
        Arg::OptInt32(t.status.map(i32::from)),
        Arg::OptText(t.error.as_deref()),
        Arg::OptInt(t.retry_at),
    ]);
}

/// Most rows in one multi-row statement (both servers take at most 65,535 parameters).
const MAX_ROWS_PER_STATEMENT: usize = 1000;
/// Most bytes of values in one multi-row statement (MariaDB's `max_allowed_packet` defaults to 16 MiB).
const MAX_BYTES_PER_STATEMENT: usize = 4 << 20;

/// `n` rows of `columns` placeholders: `(?, ?), (?, ?)`.
fn value_rows(columns: usize, n: usize) -> String {
    let row = format!("({})", vec!["?"; columns].join(", "));
    vec![row.as_str(); n].join(", ")
}

/// Split `sizes` (bytes per row) into ranges of at most
/// [`MAX_ROWS_PER_STATEMENT`] rows and [`MAX_BYTES_PER_STATEMENT`] bytes (a
/// larger row goes alone).
fn statement_chunks(sizes: &[usize]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < sizes.len() {
        let (mut end, mut bytes) = (start, 0);
        while end < sizes.len() && end - start < MAX_ROWS_PER_STATEMENT && (end == start || bytes + sizes[end] <= MAX_BYTES_PER_STATEMENT) {
            bytes += sizes[end];
            end += 1;
        }
        out.push(start..end);
        start = end;
    }
    out
}

const TRANSITION_COLUMNS: &str = "job_id, seq, state, at, attempt, status, error, retry_at";

/// The statements of one JobDB, in its engine's dialect, built once.
struct Statements {
    dialect: Dialect,
    jobs: String,
    /// The `jobs` columns this engine has (the servers add `idempotency_key`).
    job_columns: Vec<&'static str>,
    insert_job: String,
    insert_transition: String,
    payload: String,
    exists: String,
    page: String,
    by_id: String,
    by_message_id: String,
    history: String,
    count_unfinished: String,
    job_count: String,
    max_id: String,
    stats: String,
    /// The servers' registry lookup of `created_at` (SQLite: `jobdb_meta`).
    created_at: String,
    transitions: String,
}

impl Statements {
    fn new(dialect: Dialect, jobs: &str, tr: &str) -> Statements {
        let job_columns: Vec<&'static str> = JOBS.columns.iter().filter(|c| c.only.is_none_or(|e| e.contains(&dialect))).map(|c| c.name).collect();
        let columns = job_columns.join(", ");
        let select_jobs = |condition: &str| {
            format!(
                "SELECT j.id, j.message_id, j.source, j.destination, j.generation, j.endpoint, j.payload,
                        j.created_at, j.expires_at, j.received_at, t.state, t.seq, t.attempt, t.retry_at
                 FROM {jobs} j LEFT JOIN {tr} t
                   ON t.job_id = j.id AND t.seq = (SELECT max(t2.seq) FROM {tr} t2 WHERE t2.job_id = j.id)
                 WHERE {condition}"
            )
        };
        let p = |sql: String| dialect.placeholders(&sql);
        let one_row = value_rows(job_columns.len(), 1);
        Statements {
            dialect,
            insert_job: p(match dialect {
                Dialect::Sqlite => format!("INSERT OR IGNORE INTO {jobs} ({columns}) VALUES {one_row}"),
                // A repeat's duplicate-key error rolls back only its statement.
                Dialect::MySql => format!("INSERT INTO {jobs} ({columns}) VALUES {one_row}"),
                Dialect::Postgres => format!("INSERT INTO {jobs} ({columns}) VALUES {one_row} ON CONFLICT (idempotency_key) DO NOTHING"),
            }),
            insert_transition: p(format!(
                "INSERT INTO {tr} ({TRANSITION_COLUMNS}) VALUES {}{}",
                value_rows(8, 1),
                if dialect == Dialect::Postgres { " ON CONFLICT (job_id, seq) DO NOTHING" } else { "" }
            )),
            payload: p(format!("SELECT payload FROM {jobs} WHERE id = ?")),
            exists: p(match dialect {
                Dialect::Sqlite => format!("SELECT 1 FROM {jobs} WHERE message_id = ? AND destination = ? AND generation = ?"),
                Dialect::MySql | Dialect::Postgres => format!("SELECT 1 FROM {jobs} WHERE idempotency_key = ?"),
            }),
            page: p(select_jobs("j.id > ? ORDER BY j.id LIMIT ?")),
            by_id: p(select_jobs("j.id = ?")),
            by_message_id: p(select_jobs("j.message_id = ? ORDER BY j.id")),
            history: p(format!("SELECT seq, state, at, attempt, status, error, retry_at FROM {tr} WHERE job_id = ? ORDER BY seq")),
            count_unfinished: format!(
                "SELECT count(*) FROM {jobs} j WHERE NOT EXISTS (
                    SELECT 1 FROM {tr} t WHERE t.job_id = j.id AND t.state IN ('succeeded', 'discarded', 'archived'))"
            ),
            job_count: format!("SELECT count(*) FROM {jobs}"),
            max_id: format!("SELECT id FROM {jobs} ORDER BY id DESC LIMIT 1"),
            stats: format!(
                "SELECT s.destination, s.state, count(*) FROM (
                    SELECT j.destination AS destination,
                           coalesce((SELECT t.state FROM {tr} t WHERE t.job_id = j.id ORDER BY t.seq DESC LIMIT 1),
                                    'awaiting_scheduling') AS state
                    FROM {jobs} j) s
                 GROUP BY s.destination, s.state ORDER BY s.destination, s.state"
            ),
            created_at: String::new(),
            jobs: jobs.to_owned(),
            transitions: tr.to_owned(),
            job_columns,
        }
    }

    /// Read `created_at` from the servers' registry table `registry`.
    fn with_registry(mut self, registry: String) -> Statements {
        self.created_at = self.dialect.placeholders(&format!("SELECT created_at FROM {registry} WHERE seq = ?"));
        self
    }

    /// Which of `n` idempotency keys exist (servers).
    fn existing_keys(&self, n: usize) -> String {
        self.dialect.placeholders(&format!("SELECT idempotency_key FROM {} WHERE idempotency_key IN ({})", self.jobs, vec!["?"; n].join(", ")))
    }

    /// Insert `n` jobs whose keys are known to be new (servers; no repeat clause needed in MySQL).
    fn insert_jobs(&self, n: usize) -> String {
        let conflict = if self.dialect == Dialect::Postgres { " ON CONFLICT (idempotency_key) DO NOTHING" } else { "" };
        self.dialect.placeholders(&format!(
            "INSERT INTO {} ({}) VALUES {}{conflict}",
            self.jobs,
            self.job_columns.join(", "),
            value_rows(self.job_columns.len(), n)
        ))
    }

    /// Append `n` transitions, skipping rows whose (job_id, seq) exists
    /// (servers; MySQL: IGNORE, which here can only be a duplicate key: the
    /// values fit their columns).
    fn insert_transitions(&self, n: usize) -> String {
        let (ignore, conflict) = match self.dialect {
            Dialect::Sqlite | Dialect::MySql => (" IGNORE", ""),
            Dialect::Postgres => ("", " ON CONFLICT (job_id, seq) DO NOTHING"),
        };
        self.dialect.placeholders(&format!("INSERT{ignore} INTO {} ({TRANSITION_COLUMNS}) VALUES {}{conflict}", self.transitions, value_rows(8, n)))
    }
}

impl JobStore for JobDb {
    fn name(&self) -> &str {
        &self.name
    }

    fn begin(&mut self) -> Result<(), DeliverError> {
        if self.broken {
            if let Home::Server { dbs, .. } = &self.home {
                tracing::warn!(jobdb = %self.name, "reconnecting after a lost connection");
                self.conn = Connection::Server(Box::new(dbs.connect()?));
            }
            self.broken = false;
        }
        // SQLite: take the write lock now, not at the first write.
        let begin = if self.sql.dialect == Dialect::Sqlite { "BEGIN IMMEDIATE" } else { "BEGIN" };
        self.conn.batch(begin).map_err(|e| self.failed("BEGIN", e))
    }

    fn commit(&mut self) -> Result<(), DeliverError> {
        self.conn.batch("COMMIT").map_err(|e| self.failed("COMMIT", e))
    }

    fn rollback(&mut self) {
        if self.broken {
            return; // the server rolled back when the connection ended
        }
        if let Err(e) = self.conn.batch("ROLLBACK") {
            if self.sql.dialect == Dialect::Sqlite {
                return; // no transaction open: nothing to undo
            }
            let e = self.failed("ROLLBACK", e);
            tracing::warn!(error = %e, "rollback failed");
            self.broken = true; // the transaction state is unknown: start over on a new connection
        }
    }

    fn insert_job(&mut self, id: Ksuid, job: &NewJob) -> Result<bool, DeliverError> {
        let key = self.key(&job.message_id, &job.destination, job.generation);
        let mut args = Vec::with_capacity(11);
        job_args(&id, key.as_ref(), job, &mut args);
        match self.conn.execute(&self.sql.insert_job, &args) {
            Ok(n) => Ok(n == 1),
            Err(e) if e.is_duplicate("idempotency") => Ok(false),
            Err(e) => Err(self.failed("inserting a job", e)),
        }
    }

    fn append_transition(&mut self, t: &Transition) -> Result<(), DeliverError> {
        let mut args = Vec::with_capacity(8);
        transition_args(t, &mut args);
        match self.conn.execute(&self.sql.insert_transition, &args) {
            Ok(_) => Ok(()),
            Err(e) if e.is_duplicate("PRIMARY") => Ok(()), // MySQL: the row exists (see the module docs)
            Err(e) => Err(self.failed("appending a transition", e)),
        }
    }

    /// SQLite: row by row (no round trips). Servers: two round trips per
    /// 1,000 jobs (or 4 MiB): which keys exist, then one multi-row INSERT of
    /// the new ones.
    fn insert_jobs(&mut self, jobs: &[(Ksuid, &NewJob)]) -> Result<Vec<bool>, DeliverError> {
        if self.sql.dialect == Dialect::Sqlite {
            return jobs.iter().map(|(id, job)| self.insert_job(*id, job)).collect();
        }
        let keys: Vec<[u8; 32]> = jobs.iter().map(|(_, j)| idempotency_key(&j.message_id, &j.destination, j.generation)).collect();
        let mut known: HashSet<[u8; 32]> = HashSet::with_capacity(keys.len());
        for chunk in keys.chunks(MAX_ROWS_PER_STATEMENT) {
            let sql = self.sql.existing_keys(chunk.len());
            let args: Vec<Arg<'_>> = chunk.iter().map(|k| Arg::Bytes(k)).collect();
            let found = self.conn.query(&sql, &args, |r| r.bytes(0)).map_err(|e| self.failed("looking up idempotency keys", e))?;
            known.extend(found.iter().filter_map(|k| <[u8; 32]>::try_from(k.as_slice()).ok()));
        }
        // New: not stored, and not earlier in this batch.
        let stored: Vec<bool> = keys.iter().map(|k| known.insert(*k)).collect();
        let new: Vec<usize> = (0..jobs.len()).filter(|&i| stored[i]).collect();
        let sizes: Vec<usize> = new
            .iter()
            .map(|&i| {
                let j = jobs[i].1;
                j.payload.len() + j.message_id.len() + j.source.len() + j.destination.len() + j.endpoint.len() + 120
            })
            .collect();
        for range in statement_chunks(&sizes) {
            let rows = &new[range];
            let mut args = Vec::with_capacity(rows.len() * self.sql.job_columns.len());
            for &i in rows {
                job_args(&jobs[i].0, Some(&keys[i]), jobs[i].1, &mut args);
            }
            let sql = self.sql.insert_jobs(rows.len());
            let inserted = self.conn.execute(&sql, &args).map_err(|e| self.failed("inserting jobs", e))?;
            if inserted != rows.len() as u64 {
                return Err(DeliverError::Corrupt(format!(
                    "{}: {inserted} of {} new jobs inserted (another writer on this JobDB?)",
                    self.name,
                    rows.len()
                )));
            }
        }
        Ok(stored)
    }

    /// SQLite: row by row. Servers: one multi-row INSERT per 1,000 rows (or 4 MiB).
    fn append_transitions(&mut self, rows: &[Transition]) -> Result<(), DeliverError> {
        if self.sql.dialect == Dialect::Sqlite {
            return rows.iter().try_for_each(|t| self.append_transition(t));
        }
        let sizes: Vec<usize> = rows.iter().map(|t| t.error.as_ref().map_or(0, String::len) + 80).collect();
        for range in statement_chunks(&sizes) {
            let chunk = &rows[range];
            let mut args = Vec::with_capacity(chunk.len() * 8);
            chunk.iter().for_each(|t| transition_args(t, &mut args));
            let sql = self.sql.insert_transitions(chunk.len());
            self.conn.execute(&sql, &args).map_err(|e| self.failed("appending transitions", e))?;
        }
        Ok(())
    }

    fn payload(&mut self, id: Ksuid) -> Result<Option<Bytes>, DeliverError> {
        let payload =
            self.conn.query_one(&self.sql.payload, &[Arg::Bytes(&id.0)], |r| r.bytes(0)).map_err(|e| self.failed("reading a payload", e))?;
        Ok(payload.map(Bytes::from))
    }

    fn job_exists(&mut self, message_id: &str, destination: &str, generation: i64) -> Result<bool, DeliverError> {
        let found = match self.key(message_id, destination, generation) {
            Some(key) => self.conn.query_one(&self.sql.exists, &[Arg::Bytes(&key)], |_| Ok(())),
            None => self.conn.query_one(&self.sql.exists, &[message_id.into(), destination.into(), generation.into()], |_| Ok(())),
        };
        found.map(|row| row.is_some()).map_err(|e| self.failed("looking up an idempotency key", e))
    }

    fn page(&mut self, after: Option<Ksuid>, limit: usize) -> Result<Vec<StoredJob>, DeliverError> {
        let after = after.map(|k| k.0).unwrap_or_default();
        self.select_jobs(|s| &s.page, &[Arg::Bytes(&after), Arg::Int(i64::try_from(limit).unwrap_or(i64::MAX))])
    }

    fn get(&mut self, id: Ksuid) -> Result<Option<StoredJob>, DeliverError> {
        Ok(self.select_jobs(|s| &s.by_id, &[Arg::Bytes(&id.0)])?.pop())
    }

    fn find(&mut self, key: &str) -> Result<Vec<StoredJob>, DeliverError> {
        match Ksuid::parse(key) {
            Some(k) => self.select_jobs(|s| &s.by_id, &[Arg::Bytes(&k.0)]),
            None => self.select_jobs(|s| &s.by_message_id, &[Arg::Text(key)]),
        }
    }

    fn history(&mut self, id: Ksuid) -> Result<Vec<Transition>, DeliverError> {
        let read = |r: &dyn SqlRow| {
            Ok(Transition {
                job_id: id,
                seq: r.int(0)?,
                state: parse_state(&r.text(1)?),
                at: r.int(2)?,
                attempt: r.int(3)?,
                status: r.opt_int(4)?.map(|s| s as u16),
                error: r.opt_text(5)?,
                retry_at: r.opt_int(6)?,
            })
        };
        self.conn.query(&self.sql.history, &[Arg::Bytes(&id.0)], read).map_err(|e| self.failed("reading a history", e))
    }

    fn count_unfinished(&mut self) -> Result<u64, DeliverError> {
        self.count("counting unfinished jobs", |s| &s.count_unfinished)
    }

    fn job_count(&mut self) -> Result<u64, DeliverError> {
        self.count("counting jobs", |s| &s.job_count)
    }

    fn max_id(&mut self) -> Result<Option<Ksuid>, DeliverError> {
        let id = self.conn.query_one(&self.sql.max_id, &[], |r| r.bytes(0)).map_err(|e| self.failed("reading the largest id", e))?;
        Ok(id.and_then(|b| Ksuid::from_slice(&b)))
    }

    fn stats(&mut self) -> Result<Vec<(String, JobState, u64)>, DeliverError> {
        let read = |r: &dyn SqlRow| Ok((r.text(0)?, parse_state(&r.text(1)?), r.int(2)? as u64));
        self.conn.query(&self.sql.stats, &[], read).map_err(|e| self.failed("counting states", e))
    }

    /// SQLite: recorded in `jobdb_meta` at the first call; servers: the registry row.
    fn created_at(&mut self) -> Result<i64, DeliverError> {
        match &self.home {
            Home::File => {
                let now = now_ms().to_string();
                let read = "SELECT value FROM jobdb_meta WHERE key = 'created_at'";
                let recorded = self
                    .conn
                    .execute("INSERT OR IGNORE INTO jobdb_meta (key, value) VALUES ('created_at', ?)", &[Arg::Text(&now)])
                    .and_then(|_| self.conn.query_one(read, &[], |r| r.text(0)))
                    .map_err(|e| self.failed("reading jobdb_meta", e))?;
                Ok(recorded.and_then(|v| v.parse().ok()).unwrap_or_else(now_ms))
            }
            Home::Server { seq, .. } => {
                let seq = *seq as i64;
                let found = self
                    .conn
                    .query_one(&self.sql.created_at, &[Arg::Int(seq)], |r| r.int(0))
                    .map_err(|e| self.failed("reading jobdb_registry", e))?;
                found.ok_or_else(|| DeliverError::Corrupt(format!("{}: no row in jobdb_registry", self.name)))
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_are_split_by_rows_and_bytes() {
        assert!(statement_chunks(&[]).is_empty());
        assert_eq!(statement_chunks(&[10; 2500]), [0..1000, 1000..2000, 2000..2500]);
        let mb = 1 << 20;
        assert_eq!(statement_chunks(&[mb, mb, mb, mb, mb, 10 * mb, 1]), [0..4, 4..5, 5..6, 6..7], "a large row goes alone");
        assert_eq!(value_rows(2, 2), "(?, ?), (?, ?)");
    }

    #[test]
    fn the_idempotency_key_is_length_prefixed() {
        assert_ne!(idempotency_key("ab", "c", 0), idempotency_key("a", "bc", 0));
        assert_ne!(idempotency_key("a", "b", 0), idempotency_key("a", "b", 1));
        assert_eq!(idempotency_key("a", "b", 7), idempotency_key("a", "b", 7));
    }

    #[test]
    fn each_engine_gets_its_insert_and_placeholders() {
        let sqlite = Statements::new(Dialect::Sqlite, "jobs", "job_state_transitions");
        assert!(sqlite.insert_job.starts_with("INSERT OR IGNORE INTO jobs (id, message_id,"), "{}", sqlite.insert_job);
        let pg = Statements::new(Dialect::Postgres, "jobs_000001", "job_state_transitions_000001");
        assert!(pg.insert_job.contains("(id, idempotency_key, message_id,") && pg.insert_job.contains("$11)"), "{}", pg.insert_job);
        assert!(pg.insert_jobs(2).contains("$22)"));
        let my = Statements::new(Dialect::MySql, "jobs_000001", "job_state_transitions_000001");
        assert!(my.insert_transitions(2).starts_with("INSERT IGNORE INTO job_state_transitions_000001"));
        assert!(!my.page.contains('$'));
    }
}
