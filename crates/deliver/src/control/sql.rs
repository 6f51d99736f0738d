//! The control database in the `deliver.jobdb_url` database (MySQL/MariaDB
//! or PostgreSQL), shared by every process that uses that database: the
//! tables of the SQLite file, named `sluice_control_<table>`
//! (`sluice_control_destination_qos`, …), with the same columns.
//!
//! Invariants:
//! - The DDL is idempotent (`CREATE TABLE IF NOT EXISTS`) and runs under the
//!   schema lock, as the JobDBs' does (`CreateSchema`: PostgreSQL advisory
//!   lock, MySQL `GET_LOCK`; retried if a race is lost anyway), so processes
//!   that start at once all succeed.
//! - Seeding, and creating a source through the API (id and write key
//!   checked, then inserted), hold a lock that serializes them between
//!   processes (MySQL `GET_LOCK('sluice_control.<database>')`, PostgreSQL
//!   `pg_advisory_xact_lock`), inside one transaction; the inserts only add
//!   missing rows (`ON DUPLICATE KEY UPDATE id = id` / `ON CONFLICT DO
//!   NOTHING`), so a second seed changes nothing and duplicates nothing.
//!   With different config files the last process to start wins.
//! - Replays: a pending replay is claimed (`claimed_by`) by the first
//!   process whose route asks for unfinished replays, so one process runs
//!   it. The claimant is `data_dir/control.owner` (a random id made once):
//!   a process restarted on the same data_dir resumes its running replays;
//!   one whose data_dir is lost leaves them `running` (file it again).
//! - One connection on a current-thread runtime of its own (as a JobDB's);
//!   methods block. After any error the connection is dropped (an open
//!   transaction with it) and the next call connects again.

use std::collections::HashSet;
use std::path::Path;

use rand::Rng;
use sluice_core::config::{DestinationConfig, SourceConfig};
use sluice_core::Config;

use super::{
    dead_letter_columns, BoundedDeadLetter, CatalogSnapshot, DeadLetter, DeadLetterCounts, DeadLetterInsert, DeadLetterLimits, Replay,
    DEAD_LETTER_COUNTS, DEAD_LETTER_FINISH, DEAD_LETTER_PRUNE, DEAD_LETTER_USAGE,
};
use crate::gate::Qos;
use crate::sqljobdb::{numbered, on_conn, Conn, CreateSchema, Session, SharedSession, SqlEngine, SqlJobDbs, SqlRow};
use crate::DeliverError;

/// Prefix of the control tables.
pub const TABLE_PREFIX: &str = "sluice_control_";
/// Attempts of a seed (a deadlock or lost connection is retried).
const SEED_ATTEMPTS: usize = 5;
/// How long a process waits for another's seed (MySQL `GET_LOCK` timeout, s).
const LOCK_WAIT_SECS: i64 = 60;
/// The PostgreSQL advisory lock key of control writes ("sluicectl").
const PG_CONTROL_LOCK: i64 = 0x736C_7569_6365_6374;

/// The table names, in creation order.
pub fn table_names() -> [String; 7] {
    ["sources", "destinations", "connections", "destination_qos", "api_deletions", "replays", "dead_letters"].map(|t| format!("{TABLE_PREFIX}{t}"))
}

fn ddl(engine: SqlEngine) -> Vec<String> {
    crate::schema::control(engine.into(), TABLE_PREFIX)
}

/// This process's claimant id for replays: `data_dir/control.owner`, made once.
fn owner(data_dir: &Path) -> Result<String, DeliverError> {
    let path = data_dir.join("control.owner");
    let io = |source| DeliverError::Io { path: path.display().to_string(), source };
    if let Ok(text) = std::fs::read_to_string(&path) {
        let id = text.trim();
        if !id.is_empty() && id.len() <= 64 {
            return Ok(id.to_owned());
        }
    }
    std::fs::create_dir_all(data_dir).map_err(|source| DeliverError::Io { path: data_dir.display().to_string(), source })?;
    let id = hex::encode(rand::thread_rng().gen::<[u8; 16]>());
    let tmp = data_dir.join("control.owner.tmp");
    std::fs::write(&tmp, format!("{id}\n")).map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)?;
    Ok(id)
}

/// The control tables of a MySQL/MariaDB or PostgreSQL database.
pub struct SqlControl {
    dbs: SqlJobDbs,
    session: SharedSession,
    owner: String,
}

/// A text column of a row read by the statements below.
fn text(r: &impl SqlRow, i: usize) -> Result<String, sqlx::Error> {
    r.text(i)
}

fn row_to_replay(r: &impl SqlRow) -> Result<Replay, sqlx::Error> {
    Ok(Replay {
        id: r.int(0)?,
        destination: r.text(1)?,
        since_ms: r.int(2)?,
        state: r.text(3)?,
        events: r.int(4)?,
        jobs: r.int(5)?,
        error: r.opt_text(6)?,
    })
}

const REPLAY_COLUMNS: &str = "id, destination, since_ms, state, events, jobs, error";

impl SqlControl {
    /// Connect to the database at `url` and create the control tables if missing.
    pub fn open(url: &str, data_dir: &Path) -> Result<SqlControl, DeliverError> {
        let dbs = SqlJobDbs::new(url)?;
        let owner = owner(data_dir)?;
        let db = SqlControl { session: SharedSession::new(dbs.clone(), "control database"), dbs, owner };
        let ddl = ddl(db.dbs.engine());
        // Under the schema lock (concurrent CREATE TABLE IF NOT EXISTS can fail on PostgreSQL).
        db.run("creating the control tables", |s| on_conn!(*s, c => c.create_schema(&ddl)))?;
        Ok(db)
    }

    /// The database URL without password.
    pub fn location(&self) -> String {
        format!("{} (tables {TABLE_PREFIX}*)", self.dbs.display())
    }

    fn engine(&self) -> SqlEngine {
        self.dbs.engine()
    }

    /// `sql` (MySQL dialect: `?` placeholders, backquoted names) in this engine's dialect; `{p}` is the table prefix.
    fn q(&self, sql: &str) -> String {
        let sql = sql.replace("{p}", TABLE_PREFIX);
        match self.engine() {
            SqlEngine::MySql => sql,
            SqlEngine::Postgres => numbered(&sql.replace('`', "\"")),
        }
    }

    /// An insert of a row that does nothing when its key exists (`conflict`: the key columns).
    fn insert_missing(&self, table: &str, columns: &str, values: &str, conflict: &str) -> String {
        let first = conflict.split(',').next().unwrap_or(conflict).trim();
        match self.engine() {
            SqlEngine::MySql => {
                format!("INSERT INTO {TABLE_PREFIX}{table} ({columns}) VALUES ({values}) ON DUPLICATE KEY UPDATE {first} = {first}")
            }
            SqlEngine::Postgres => numbered(
                &format!("INSERT INTO {TABLE_PREFIX}{table} ({columns}) VALUES ({values}) ON CONFLICT ({conflict}) DO NOTHING").replace('`', "\""),
            ),
        }
    }

    /// An insert that replaces `update` columns when the key (`conflict`) exists.
    fn upsert(&self, table: &str, columns: &str, values: &str, conflict: &str, update: &[&str], extra: &str) -> String {
        match self.engine() {
            SqlEngine::MySql => {
                let mut sets: Vec<String> = update.iter().map(|c| format!("{c} = VALUES({c})")).collect();
                if !extra.is_empty() {
                    sets.push(extra.to_owned());
                }
                format!("INSERT INTO {TABLE_PREFIX}{table} ({columns}) VALUES ({values}) ON DUPLICATE KEY UPDATE {}", sets.join(", "))
            }
            SqlEngine::Postgres => {
                let mut sets: Vec<String> = update.iter().map(|c| format!("{c} = excluded.{c}")).collect();
                if !extra.is_empty() {
                    sets.push(extra.to_owned());
                }
                numbered(&format!(
                    "INSERT INTO {TABLE_PREFIX}{table} ({columns}) VALUES ({values}) ON CONFLICT ({conflict}) DO UPDATE SET {}",
                    sets.join(", ")
                ))
            }
        }
    }

    /// The statements that take and release the control write lock
    /// (PostgreSQL: released by the transaction's end).
    fn lock_statements(&self) -> (String, Option<String>) {
        match self.engine() {
            SqlEngine::MySql => {
                let name = format!("sluice_control.{}", self.dbs.database());
                let name: String = name.chars().take(64).collect::<String>().replace('\'', "");
                (format!("SELECT GET_LOCK('{name}', {LOCK_WAIT_SECS})"), Some(format!("SELECT RELEASE_LOCK('{name}')")))
            }
            SqlEngine::Postgres => (format!("SELECT pg_advisory_xact_lock({PG_CONTROL_LOCK})"), None),
        }
    }

    /// Run `f` on the session (connecting first if there is none); after an error the session is dropped.
    fn run<T: Send>(&self, what: &str, f: impl FnOnce(&mut Session) -> Result<T, sqlx::Error> + Send) -> Result<T, DeliverError> {
        self.session.run(what, f)
    }

    /// Run `body` in a transaction holding the control write lock.
    fn locked<T: Send>(&self, what: &str, body: impl FnOnce(&SqlControl, &mut Session) -> Result<T, sqlx::Error> + Send) -> Result<T, DeliverError> {
        let (lock, unlock) = self.lock_statements();
        self.run(what, |s| {
            on_conn!(*s, c => async {
                if matches!(s_engine(&*c), SqlEngine::MySql) {
                    let got: Option<i64> = sqlx::Row::try_get(&sqlx::query(&lock).fetch_one(&mut *c).await?, 0)?;
                    if got != Some(1) {
                        return Err(sqlx::Error::Protocol(format!("the control write lock was not granted within {LOCK_WAIT_SECS} s")));
                    }
                }
                sqlx::raw_sql("BEGIN").execute(&mut *c).await?;
                if matches!(s_engine(&*c), SqlEngine::Postgres) {
                    sqlx::raw_sql(&lock).execute(&mut *c).await?;
                }
                Ok(())
            })?;
            let out = body(self, s)?;
            on_conn!(*s, c => async {
                sqlx::raw_sql("COMMIT").execute(&mut *c).await?;
                if let Some(unlock) = &unlock {
                    sqlx::raw_sql(unlock).execute(&mut *c).await?;
                }
                Ok(out)
            })
        })
    }

    pub fn seed(&mut self, config: &Config) -> Result<(), DeliverError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.locked("seeding from the config", |db, s| db.seed_in(s, config)) {
                Ok(()) => return Ok(()),
                Err(e) if attempt < SEED_ATTEMPTS => {
                    tracing::warn!(error = %e, attempt, "seeding the control database failed; trying again");
                    std::thread::sleep(std::time::Duration::from_millis(200 * attempt as u64));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn seed_in(&self, s: &mut Session, config: &Config) -> Result<(), sqlx::Error> {
        let deletes: Vec<String> =
            ["sources", "destinations", "connections"].iter().map(|t| self.q(&format!("DELETE FROM {{p}}{t} WHERE origin = 'config'"))).collect();
        let deletions_sql = self.q("SELECT kind, `key` FROM {p}api_deletions");
        let insert_source = self.insert_missing("sources", "id, config, origin", "?, ?, 'config'", "id");
        let insert_destination = self.insert_missing("destinations", "id, config, origin", "?, ?, 'config'", "id");
        let insert_qos = self.insert_missing("destination_qos", "destination", "?", "destination");
        let insert_connection = self.insert_missing("connections", "source, destination, origin", "?, ?, 'config'", "source, destination");
        on_conn!(*s, c => async {
            for d in &deletes {
                sqlx::query(d).execute(&mut *c).await?;
            }
            let mut deleted = HashSet::new();
            for r in sqlx::query(&deletions_sql).fetch_all(&mut *c).await? {
                deleted.insert((text(&r, 0)?, text(&r, 1)?));
            }
            let is_deleted = |kind: &str, key: &str| deleted.contains(&(kind.to_owned(), key.to_owned()));
            for src in &config.sources {
                let json = serde_json::to_string(src).expect("a source serializes");
                sqlx::query(&insert_source).bind(src.id.as_str()).bind(json).execute(&mut *c).await?;
            }
            for d in &config.destinations {
                if !is_deleted("destination", &d.id) {
                    let json = serde_json::to_string(d).expect("a destination serializes");
                    sqlx::query(&insert_destination).bind(d.id.as_str()).bind(json).execute(&mut *c).await?;
                }
                sqlx::query(&insert_qos).bind(d.id.as_str()).execute(&mut *c).await?;
            }
            for conn in &config.connections {
                for d in &conn.destinations {
                    if is_deleted("connection", &format!("{}/{d}", conn.source)) || is_deleted("destination", d) {
                        continue;
                    }
                    sqlx::query(&insert_connection).bind(conn.source.as_str()).bind(d.as_str()).execute(&mut *c).await?;
                }
            }
            Ok(())
        })
    }

    pub fn read(&self) -> Result<CatalogSnapshot, DeliverError> {
        let sources_sql = self.q("SELECT id, config, disabled FROM {p}sources ORDER BY id");
        let destinations_sql = self.q("SELECT id, config FROM {p}destinations");
        let connections_sql = self.q("SELECT source, destination FROM {p}connections ORDER BY source, destination");
        let qos_sql = self.q("SELECT destination, paused, max_in_flight, rate_per_sec, priority FROM {p}destination_qos");
        #[allow(clippy::type_complexity)]
        let (sources, destinations, connections, qos): (
            Vec<(String, String, bool)>,
            Vec<(String, String)>,
            Vec<(String, String)>,
            Vec<(String, Qos)>,
        ) = self.run("reading", |s| {
            on_conn!(*s, c => async {
                let mut sources = Vec::new();
                for r in sqlx::query(&sources_sql).fetch_all(&mut *c).await? {
                    sources.push((r.text(0)?, r.text(1)?, r.int(2)? != 0));
                }
                let mut destinations = Vec::new();
                for r in sqlx::query(&destinations_sql).fetch_all(&mut *c).await? {
                    destinations.push((r.text(0)?, r.text(1)?));
                }
                let mut connections = Vec::new();
                for r in sqlx::query(&connections_sql).fetch_all(&mut *c).await? {
                    connections.push((r.text(0)?, r.text(1)?));
                }
                let mut qos = Vec::new();
                for r in sqlx::query(&qos_sql).fetch_all(&mut *c).await? {
                    qos.push((
                        r.text(0)?,
                        Qos {
                            paused: r.int(1)? != 0,
                            max_in_flight: r.opt_int(2)?.map(|v| v.max(1) as usize),
                            rate_per_sec: r.opt_int(3)?.map(|v| v.max(0) as u32),
                            priority: r.int(4)?.clamp(1, 100) as u32,
                        },
                    ));
                }
                Ok((sources, destinations, connections, qos))
            })
        })?;
        let mut snap = CatalogSnapshot::default();
        for (id, json, disabled) in sources {
            match serde_json::from_str::<SourceConfig>(&json) {
                Ok(src) => snap.sources.push((src, disabled)),
                Err(problem) => tracing::error!(source = %id, %problem, "ignoring a source with invalid settings in the control database"),
            }
        }
        for (id, json) in destinations {
            match serde_json::from_str::<DestinationConfig>(&json) {
                Ok(d) => {
                    snap.destinations.insert(id, d);
                }
                Err(problem) => {
                    tracing::error!(destination = %id, %problem, "ignoring a destination with invalid settings in the control database")
                }
            }
        }
        for (s, d) in connections {
            snap.connections.entry(s).or_default().push(d);
        }
        snap.qos = qos.into_iter().collect();
        Ok(snap)
    }

    /// Run statements each with its text binds; the rows each changed.
    fn exec(&self, what: &str, statements: Vec<(String, Vec<Option<String>>)>) -> Result<Vec<u64>, DeliverError> {
        self.run(what, |s| {
            on_conn!(*s, c => async {
                let mut counts = Vec::with_capacity(statements.len());
                for (sql, binds) in &statements {
                    let mut q = sqlx::query(sql);
                    for b in binds {
                        q = q.bind(b.clone());
                    }
                    counts.push(q.execute(&mut *c).await?.rows_affected());
                }
                Ok(counts)
            })
        })
    }

    pub fn insert_source(&self, src: &SourceConfig) -> Result<bool, DeliverError> {
        let taken_sql = self.q("SELECT config FROM {p}sources");
        let insert = self.q("INSERT INTO {p}sources (id, config, origin) VALUES (?, ?, 'api')");
        let json = serde_json::to_string(src).expect("settings serialize");
        self.locked("creating a source", |_, s| {
            on_conn!(*s, c => async {
                for r in sqlx::query(&taken_sql).fetch_all(&mut *c).await? {
                    if let Ok(other) = serde_json::from_str::<SourceConfig>(&r.text(0)?) {
                        if other.id == src.id || other.write_key == src.write_key {
                            return Ok(false);
                        }
                    }
                }
                sqlx::query(&insert).bind(src.id.as_str()).bind(json.as_str()).execute(&mut *c).await?;
                Ok(true)
            })
        })
    }

    fn put_api_row(&self, table: &str, id: &str, config: &impl serde::Serialize) -> Result<(), DeliverError> {
        let json = serde_json::to_string(config).expect("settings serialize");
        let sql = self.upsert(table, "id, config, origin", "?, ?, 'api'", "id", &["config"], "origin = 'api'");
        self.exec("writing", vec![(sql, vec![Some(id.to_owned()), Some(json)])]).map(drop)
    }

    pub fn put_source(&self, src: &SourceConfig) -> Result<(), DeliverError> {
        self.put_api_row("sources", &src.id, src)
    }

    pub fn set_source_disabled(&self, id: &str, disabled: bool) -> Result<bool, DeliverError> {
        // (MySQL counts matched rows, not changed ones: sqlx sets CLIENT_FOUND_ROWS.)
        let sql = self.q(&format!("UPDATE {{p}}sources SET disabled = {}, origin = 'api' WHERE id = ?", disabled as i64));
        Ok(self.exec("writing", vec![(sql, vec![Some(id.to_owned())])])?[0] == 1)
    }

    pub fn put_destination(&self, d: &DestinationConfig) -> Result<(), DeliverError> {
        self.put_api_row("destinations", &d.id, d)?;
        let qos = self.insert_missing("destination_qos", "destination", "?", "destination");
        let undelete = self.q("DELETE FROM {p}api_deletions WHERE kind = 'destination' AND `key` = ?");
        self.exec("writing", vec![(qos, vec![Some(d.id.clone())]), (undelete, vec![Some(d.id.clone())])]).map(drop)
    }

    pub fn delete_destination(&self, id: &str) -> Result<bool, DeliverError> {
        let delete = self.q("DELETE FROM {p}destinations WHERE id = ?");
        let connections = self.q("DELETE FROM {p}connections WHERE destination = ?");
        let n = self.exec("writing", vec![(delete, vec![Some(id.to_owned())]), (connections, vec![Some(id.to_owned())])])?[0];
        if n == 1 {
            let remember = self.insert_missing("api_deletions", "kind, `key`", "'destination', ?", "kind, `key`");
            self.exec("writing", vec![(remember, vec![Some(id.to_owned())])])?;
        }
        Ok(n == 1)
    }

    pub fn put_connection(&self, source: &str, destination: &str) -> Result<(), DeliverError> {
        let sql = self.upsert("connections", "source, destination, origin", "?, ?, 'api'", "source, destination", &[], "origin = 'api'");
        let undelete = self.q("DELETE FROM {p}api_deletions WHERE kind = 'connection' AND `key` = ?");
        self.exec(
            "writing",
            vec![(sql, vec![Some(source.to_owned()), Some(destination.to_owned())]), (undelete, vec![Some(format!("{source}/{destination}"))])],
        )
        .map(drop)
    }

    pub fn delete_connection(&self, source: &str, destination: &str) -> Result<bool, DeliverError> {
        let delete = self.q("DELETE FROM {p}connections WHERE source = ? AND destination = ?");
        let n = self.exec("writing", vec![(delete, vec![Some(source.to_owned()), Some(destination.to_owned())])])?[0];
        if n == 1 {
            let remember = self.insert_missing("api_deletions", "kind, `key`", "'connection', ?", "kind, `key`");
            self.exec("writing", vec![(remember, vec![Some(format!("{source}/{destination}"))])])?;
        }
        Ok(n == 1)
    }

    pub fn put_qos(&self, destination: &str, q: &Qos) -> Result<(), DeliverError> {
        let sql = self.upsert(
            "destination_qos",
            "destination, paused, max_in_flight, rate_per_sec, priority",
            "?, ?, ?, ?, ?",
            "destination",
            &["paused", "max_in_flight", "rate_per_sec", "priority"],
            "",
        );
        let (paused, max_in_flight, rate, priority) =
            (q.paused as i64, q.max_in_flight.map(|v| v as i64), q.rate_per_sec.map(|v| v as i64), q.priority as i64);
        self.run("writing QoS", |s| {
            on_conn!(*s, c => async {
                sqlx::query(&sql).bind(destination).bind(paused).bind(max_in_flight).bind(rate).bind(priority).execute(&mut *c).await?;
                Ok(())
            })
        })
    }

    pub fn request_replay(&self, destination: &str, since_ms: i64) -> Result<i64, DeliverError> {
        let now = crate::now_ms();
        let sql = self.q("INSERT INTO {p}replays (destination, since_ms, requested_at) VALUES (?, ?, ?)");
        self.run("filing a replay", |s| {
            let session: &mut Session = s;
            match &mut session.conn {
                Conn::MySql(c) => session.rt.block_on(async {
                    let r = sqlx::query(&sql).bind(destination).bind(since_ms).bind(now).execute(&mut *c).await?;
                    Ok(r.last_insert_id() as i64)
                }),
                Conn::Postgres(c) => session.rt.block_on(async {
                    let row = sqlx::query(&format!("{sql} RETURNING id")).bind(destination).bind(since_ms).bind(now).fetch_one(&mut *c).await?;
                    row.int(0)
                }),
            }
        })
    }

    pub fn replay(&self, id: i64) -> Result<Option<Replay>, DeliverError> {
        let sql = self.q(&format!("SELECT {REPLAY_COLUMNS} FROM {{p}}replays WHERE id = ?"));
        self.run("reading a replay", |s| {
            on_conn!(*s, c => async {
                match sqlx::query(&sql).bind(id).fetch_optional(&mut *c).await? {
                    Some(r) => Ok(Some(row_to_replay(&r)?)),
                    None => Ok(None),
                }
            })
        })
    }

    pub fn unfinished_replays(&self) -> Result<Vec<Replay>, DeliverError> {
        let claim = self.q("UPDATE {p}replays SET claimed_by = ? WHERE state = 'pending' AND claimed_by IS NULL");
        let select =
            self.q(&format!("SELECT {REPLAY_COLUMNS} FROM {{p}}replays WHERE state IN ('pending', 'running') AND claimed_by = ? ORDER BY id"));
        let owner = self.owner.as_str();
        self.run("reading replays", |s| {
            on_conn!(*s, c => async {
                sqlx::query(&claim).bind(owner).execute(&mut *c).await?;
                let mut out = Vec::new();
                for r in sqlx::query(&select).bind(owner).fetch_all(&mut *c).await? {
                    out.push(row_to_replay(&r)?);
                }
                Ok(out)
            })
        })
    }

    pub fn update_replay(&self, id: i64, state: &str, events: i64, jobs: i64, error: Option<&str>) -> Result<(), DeliverError> {
        let finished = matches!(state, "done" | "failed").then(crate::now_ms);
        let sql = self.q("UPDATE {p}replays SET state = ?, events = ?, jobs = ?, error = ?, finished_at = ? WHERE id = ?");
        self.run("updating a replay", |s| {
            on_conn!(*s, c => async {
                sqlx::query(&sql).bind(state).bind(events).bind(jobs).bind(error).bind(finished).bind(id).execute(&mut *c).await?;
                Ok(())
            })
        })
    }
}

fn sql_dead_letter(r: &impl SqlRow) -> Result<DeadLetter, sqlx::Error> {
    Ok(DeadLetter {
        id: r.int(0)?,
        created_at_ms: r.int(1)?,
        stage: r.text(2)?,
        topic: r.text(3)?,
        partition: r.int(4)? as u32,
        offset: r.int(5)? as u64,
        generation: r.int(6)?,
        destination: r.opt_text(7)?,
        record_ms: r.int(8)?,
        key: r.bytes(9)?,
        payload: r.bytes(10)?,
        payload_size: r.int(11)?,
        truncated: r.int(12)? != 0,
        reason: r.text(13)?,
        replay_requested_at_ms: r.opt_int(14)?,
        replayed_at_ms: r.opt_int(15)?,
        replayed_jobs: r.opt_int(16)?,
        discarded_at_ms: r.opt_int(17)?,
        attempts: r.int(18)?,
        last_error: r.opt_text(19)?,
    })
}

/// The dead-letter store in `sluice_control_dead_letters` (see
/// [`DeadLetter`]). Inserts hold the control write lock, so the cap is
/// checked and rows added by one process at a time; a requested replay
/// is claimed (`claimed_by`) by the first route to ask, as replays are.
impl SqlControl {
    /// `sql` in this engine's dialect, with `{int}` its 64-bit integer type for CAST.
    fn q_int(&self, sql: &str) -> String {
        let int = match self.engine() {
            SqlEngine::MySql => "SIGNED",
            SqlEngine::Postgres => "BIGINT",
        };
        self.q(&sql.replace("{int}", int))
    }

    pub(super) fn insert_dead_letters(&self, letters: &[BoundedDeadLetter<'_>], limits: &DeadLetterLimits) -> Result<DeadLetterInsert, DeliverError> {
        let exists_sql = self.q("SELECT 1 FROM {p}dead_letters WHERE topic = ? AND log_partition = ? AND log_offset = ? AND generation = ?");
        let usage_sql = self.q_int(DEAD_LETTER_USAGE);
        let prune_sql = self.q(DEAD_LETTER_PRUNE);
        let insert_sql = self.insert_missing(
            "dead_letters",
            "created_at_ms, stage, topic, log_partition, log_offset, generation, destination, record_ms, record_key, payload, \
             payload_size, truncated, stored_bytes, reason",
            "?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?",
            "topic, log_partition, log_offset, generation",
        );
        let limits = *limits;
        self.locked("storing dead letters", |_, s| {
            on_conn!(*s, c => async {
                let mut fresh: Vec<&BoundedDeadLetter<'_>> = Vec::new();
                let mut existing = 0u64;
                for l in letters {
                    let n = l.new;
                    let found = sqlx::query(&exists_sql)
                        .bind(n.topic.as_str())
                        .bind(n.partition as i64)
                        .bind(n.offset as i64)
                        .bind(n.generation)
                        .fetch_optional(&mut *c)
                        .await?
                        .is_some();
                    let repeated = fresh.iter().any(|f| {
                        (f.new.topic.as_str(), f.new.partition, f.new.offset, f.new.generation) == (n.topic.as_str(), n.partition, n.offset, n.generation)
                    });
                    if found || repeated {
                        existing += 1;
                    } else {
                        fresh.push(l);
                    }
                }
                if fresh.is_empty() {
                    return Ok(DeadLetterInsert::Stored { new: 0, existing });
                }
                let (add_rows, add_bytes) = (fresh.len() as u64, fresh.iter().map(|l| l.bytes()).sum::<u64>());
                let fits = |(rows, bytes): (u64, u64)| rows + add_rows <= limits.max_rows && bytes + add_bytes <= limits.max_bytes;
                let row = sqlx::query(&usage_sql).fetch_one(&mut *c).await?;
                let mut used = (row.int(0)? as u64, row.int(1)? as u64);
                if !fits(used) {
                    // Finished rows make room first.
                    sqlx::query(&prune_sql).execute(&mut *c).await?;
                    let row = sqlx::query(&usage_sql).fetch_one(&mut *c).await?;
                    used = (row.int(0)? as u64, row.int(1)? as u64);
                    if !fits(used) {
                        return Ok(DeadLetterInsert::Full { rows: used.0, bytes: used.1 });
                    }
                }
                let now = crate::now_ms();
                for l in &fresh {
                    let n = l.new;
                    sqlx::query(&insert_sql)
                        .bind(now)
                        .bind(n.stage)
                        .bind(n.topic.as_str())
                        .bind(n.partition as i64)
                        .bind(n.offset as i64)
                        .bind(n.generation)
                        .bind(n.destination.as_deref())
                        .bind(n.record_ms)
                        .bind(l.key)
                        .bind(l.payload)
                        .bind(n.payload.len() as i64)
                        .bind(l.truncated as i64)
                        .bind(l.bytes() as i64)
                        .bind(l.reason.as_str())
                        .execute(&mut *c)
                        .await?;
                }
                Ok(DeadLetterInsert::Stored { new: add_rows, existing })
            })
        })
    }

    pub(super) fn dead_letters(&self, before: i64, limit: usize) -> Result<Vec<DeadLetter>, DeliverError> {
        let sql = self.q(&format!("SELECT {} FROM {{p}}dead_letters WHERE id < ? ORDER BY id DESC LIMIT {limit}", dead_letter_columns(true)));
        self.run("reading dead letters", |s| {
            on_conn!(*s, c => async {
                let mut out = Vec::new();
                for r in sqlx::query(&sql).bind(before).fetch_all(&mut *c).await? {
                    out.push(sql_dead_letter(&r)?);
                }
                Ok(out)
            })
        })
    }

    pub(super) fn dead_letter(&self, id: i64) -> Result<Option<DeadLetter>, DeliverError> {
        let sql = self.q(&format!("SELECT {} FROM {{p}}dead_letters WHERE id = ?", dead_letter_columns(false)));
        self.run("reading a dead letter", |s| {
            on_conn!(*s, c => async {
                match sqlx::query(&sql).bind(id).fetch_optional(&mut *c).await? {
                    Some(r) => Ok(Some(sql_dead_letter(&r)?)),
                    None => Ok(None),
                }
            })
        })
    }

    pub(super) fn dead_letter_counts(&self) -> Result<DeadLetterCounts, DeliverError> {
        let sql = self.q_int(DEAD_LETTER_COUNTS);
        self.run("counting dead letters", |s| {
            on_conn!(*s, c => async {
                let r = sqlx::query(&sql).fetch_one(&mut *c).await?;
                Ok(DeadLetterCounts {
                    open: r.int(0)?,
                    replay_requested: r.int(1)?,
                    replay_failed: r.int(2)?,
                    replayed: r.int(3)?,
                    discarded: r.int(4)?,
                    rows: r.int(5)?,
                    bytes: r.int(6)?,
                })
            })
        })
    }

    /// `UPDATE … SET <set>` (one `?`: now) on open row `id`, or every open row.
    pub(super) fn mark_dead_letters(&self, set: &str, id: Option<i64>) -> Result<u64, DeliverError> {
        let open = "replayed_at_ms IS NULL AND discarded_at_ms IS NULL";
        let now = crate::now_ms();
        let sql = match id {
            Some(_) => self.q(&format!("UPDATE {{p}}dead_letters SET {set} WHERE {open} AND id = ?")),
            None => self.q(&format!("UPDATE {{p}}dead_letters SET {set} WHERE {open}")),
        };
        self.run("marking dead letters", |s| {
            on_conn!(*s, c => async {
                let mut q = sqlx::query(&sql).bind(now);
                if let Some(id) = id {
                    q = q.bind(id);
                }
                Ok(q.execute(&mut *c).await?.rows_affected())
            })
        })
    }

    pub(super) fn claim_dead_letter_replays(&self, limit: usize) -> Result<Vec<DeadLetter>, DeliverError> {
        let requested = "replay_requested_at_ms IS NOT NULL AND replayed_at_ms IS NULL AND discarded_at_ms IS NULL";
        let claim = self.q(&format!("UPDATE {{p}}dead_letters SET claimed_by = ? WHERE {requested} AND claimed_by IS NULL"));
        let select = self.q(&format!(
            "SELECT {} FROM {{p}}dead_letters WHERE {requested} AND claimed_by = ? ORDER BY id LIMIT {limit}",
            dead_letter_columns(false)
        ));
        let owner = self.owner.as_str();
        self.run("claiming dead-letter replays", |s| {
            on_conn!(*s, c => async {
                sqlx::query(&claim).bind(owner).execute(&mut *c).await?;
                let mut out = Vec::new();
                for r in sqlx::query(&select).bind(owner).fetch_all(&mut *c).await? {
                    out.push(sql_dead_letter(&r)?);
                }
                Ok(out)
            })
        })
    }

    pub(super) fn finish_dead_letter_replay(
        &self,
        id: i64,
        replayed: Option<i64>,
        jobs: Option<i64>,
        error: Option<&str>,
    ) -> Result<(), DeliverError> {
        let sql = self.q(DEAD_LETTER_FINISH);
        self.run("recording a dead-letter replay", |s| {
            on_conn!(*s, c => async {
                sqlx::query(&sql).bind(replayed).bind(jobs).bind(error).bind(id).execute(&mut *c).await?;
                Ok(())
            })
        })
    }
}

/// The engine of a connection (inside `on_conn!` bodies, written once for both).
fn s_engine<C: EngineOf + ?Sized>(c: &C) -> SqlEngine {
    c.engine_of()
}

trait EngineOf {
    fn engine_of(&self) -> SqlEngine;
}
impl EngineOf for sqlx::MySqlConnection {
    fn engine_of(&self) -> SqlEngine {
        SqlEngine::MySql
    }
}
impl EngineOf for sqlx::PgConnection {
    fn engine_of(&self) -> SqlEngine {
        SqlEngine::Postgres
    }
}
