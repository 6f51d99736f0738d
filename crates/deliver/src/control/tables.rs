//! The control tables, on any engine: `data_dir/control.sqlite`, or the
//! tables `sluice_control_*` of the `deliver.jobdb_url` database
//! (MySQL/MariaDB or PostgreSQL), shared by every process that uses that
//! database, with the same columns ([`crate::schema::CONTROL`]). One
//! implementation over `sluice_sql::conn`; the engines differ in the statement
//! forms [`Tables::q`], [`Tables::insert_missing`] and [`Tables::upsert`]
//! write, and in the write lock.
//!
//! Invariants:
//! - The DDL is idempotent (`CREATE TABLE IF NOT EXISTS`); on a server it
//!   runs under the schema lock, as the JobDBs' does (`CreateSchema`:
//!   PostgreSQL advisory lock, MySQL `GET_LOCK`; retried if a race is lost
//!   anyway), so processes that start at once all succeed.
//! - Seeding, creating a source through the API (id and write key checked,
//!   then inserted) and storing dead letters (the cap checked, then rows
//!   added) run in one transaction holding the control write lock, which
//!   serializes them between processes: SQLite `BEGIN IMMEDIATE`, MySQL
//!   `GET_LOCK('sluice_control.<database>')`, PostgreSQL
//!   `pg_advisory_xact_lock`. The seed's inserts only add missing rows, so
//!   a second seed changes nothing and duplicates nothing. With different
//!   config files the last process to start wins.
//! - Replays on a server: a pending replay is claimed (`claimed_by`) by the
//!   first process whose route asks for unfinished replays, so one process
//!   runs it. The claimant is `data_dir/control.owner` (a random id made
//!   once): a process restarted on the same data_dir resumes its running
//!   replays; one whose data_dir is lost leaves them `running` (file it
//!   again). An SQLite file has one process (`sluice serve`'s lock on
//!   data_dir): nothing is claimed.
//! - One connection ([`SharedConnection`]); methods block. After any error
//!   the connection is dropped (an open transaction with it) and the next
//!   call connects again.

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
use crate::schema::Dialect;
use crate::DeliverError;
use sluice_sql::conn::{Arg, Connection, Connector, SharedConnection, SqlError, SqlRow};
use sluice_sql::SqlLink;

/// Prefix of the control tables in a database server.
pub const TABLE_PREFIX: &str = "sluice_control_";
/// Attempts of a seed (a deadlock or lost connection is retried).
const SEED_ATTEMPTS: usize = 5;
/// How long a process waits for another's seed (MySQL `GET_LOCK` timeout, s).
const LOCK_WAIT_SECS: i64 = 60;
/// The PostgreSQL advisory lock key of control writes ("sluicectl").
const PG_CONTROL_LOCK: i64 = 0x736C_7569_6365_6374;

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

/// The control tables of one database.
pub(super) struct Tables {
    session: SharedConnection,
    dialect: Dialect,
    /// `""` (SQLite) or [`TABLE_PREFIX`].
    prefix: &'static str,
    /// The replay claimant (servers; SQLite: `None`, one process).
    owner: Option<String>,
    /// MySQL: the name of the control write lock.
    mysql_lock: String,
}

fn row_to_replay(r: &dyn SqlRow) -> Result<Replay, SqlError> {
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

fn dead_letter(r: &dyn SqlRow) -> Result<DeadLetter, SqlError> {
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

impl Tables {
    /// The SQLite file at `path` (created with its tables if missing).
    pub(super) fn open_file(path: &Path) -> Result<Tables, DeliverError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| DeliverError::Io { path: dir.display().to_string(), source })?;
        }
        Tables::open(Connector::SqliteFile(path.to_owned()), None)
    }

    /// The database at `url` (the control tables created if missing);
    /// `data_dir` keeps this process's replay claimant id.
    pub(super) fn open_server(url: &str, data_dir: &Path) -> Result<Tables, DeliverError> {
        let link = SqlLink::new(url)?;
        let owner = owner(data_dir)?;
        Tables::open(Connector::Server(Box::new(link)), Some(owner))
    }

    fn open(connector: Connector, owner: Option<String>) -> Result<Tables, DeliverError> {
        let dialect = connector.dialect();
        let prefix = if dialect == Dialect::Sqlite { "" } else { TABLE_PREFIX };
        let database = match &connector {
            Connector::Server(dbs) => dbs.database().to_owned(),
            Connector::SqliteFile(_) => String::new(),
        };
        // GET_LOCK is server-wide: the name carries the database (64 characters at most).
        let mysql_lock = format!("sluice_control.{database}").chars().take(64).collect::<String>().replace('\'', "");
        let db = Tables { session: SharedConnection::new(connector, "control database"), dialect, prefix, owner, mysql_lock };
        let ddl = crate::schema::control(dialect, prefix);
        db.session.run("creating the control tables", |c| c.create_schema(&ddl))?;
        Ok(db)
    }

    /// The file, or the database URL without password and the tables.
    pub(super) fn location(&self) -> String {
        match self.session.connector() {
            Connector::SqliteFile(path) => path.display().to_string(),
            server => format!("{} (tables {TABLE_PREFIX}*)", server.describe()),
        }
    }

    /// `sql` (`?` placeholders, backquoted names, `{p}` the table prefix) in this engine's dialect.
    fn q(&self, sql: &str) -> String {
        let sql = sql.replace("{p}", self.prefix);
        match self.dialect {
            Dialect::MySql => sql,
            Dialect::Sqlite | Dialect::Postgres => self.dialect.placeholders(&sql.replace('`', "\"")),
        }
    }

    /// [`Tables::q`] with `{int}` the engine's 64-bit integer type for CAST.
    fn q_int(&self, sql: &str) -> String {
        let int = match self.dialect {
            Dialect::Sqlite => "INTEGER",
            Dialect::MySql => "SIGNED",
            Dialect::Postgres => "BIGINT",
        };
        self.q(&sql.replace("{int}", int))
    }

    /// An insert of a row that does nothing when its key (`conflict`: the key columns) exists.
    fn insert_missing(&self, table: &str, columns: &str, values: &str, conflict: &str) -> String {
        self.q(&self.dialect.insert_missing(&format!("{{p}}{table}"), columns, values, conflict))
    }

    /// [`Tables::insert_missing`] whose rows changed say whether it inserted (1) or found the key (0), on MySQL too.
    fn insert_new(&self, table: &str, columns: &str, values: &str, conflict: &str) -> String {
        self.q(&self.dialect.insert_new(&format!("{{p}}{table}"), columns, values, conflict))
    }

    /// An insert that replaces the `update` columns (and sets `extra`) when the key (`conflict`) exists.
    fn upsert(&self, table: &str, columns: &str, values: &str, conflict: &str, update: &[&str], extra: &str) -> String {
        let head = format!("INSERT INTO {{p}}{table} ({columns}) VALUES ({values})");
        let mut sets: Vec<String> = match self.dialect {
            Dialect::MySql => update.iter().map(|c| format!("{c} = VALUES({c})")).collect(),
            Dialect::Sqlite | Dialect::Postgres => update.iter().map(|c| format!("{c} = excluded.{c}")).collect(),
        };
        if !extra.is_empty() {
            sets.push(extra.to_owned());
        }
        self.q(&match self.dialect {
            Dialect::MySql => format!("{head} ON DUPLICATE KEY UPDATE {}", sets.join(", ")),
            Dialect::Sqlite | Dialect::Postgres => format!("{head} ON CONFLICT ({conflict}) DO UPDATE SET {}", sets.join(", ")),
        })
    }

    /// Run `f` on the connection; after an error it is dropped.
    fn run<T: Send>(&self, what: &str, f: impl FnOnce(&mut Connection) -> Result<T, SqlError> + Send) -> Result<T, DeliverError> {
        Ok(self.session.run(what, f)?)
    }

    /// Run `body` in a transaction holding the control write lock (see the module docs).
    fn locked<T: Send>(&self, what: &str, body: impl FnOnce(&mut Connection) -> Result<T, SqlError> + Send) -> Result<T, DeliverError> {
        let (dialect, lock) = (self.dialect, &self.mysql_lock);
        self.run(what, move |c| {
            match dialect {
                Dialect::Sqlite => c.batch("BEGIN IMMEDIATE")?,
                Dialect::MySql => {
                    let got = c.query_one(&format!("SELECT GET_LOCK('{lock}', {LOCK_WAIT_SECS})"), &[], |r| r.opt_int(0))?.flatten();
                    if got != Some(1) {
                        let why = format!("the control write lock was not granted within {LOCK_WAIT_SECS} s");
                        return Err(SqlError::Server(sqlx::Error::Protocol(why)));
                    }
                    c.batch("BEGIN")?;
                }
                Dialect::Postgres => c.batch(&format!("BEGIN; SELECT pg_advisory_xact_lock({PG_CONTROL_LOCK})"))?,
            }
            // An error drops the connection, which ends the transaction and releases the locks.
            let out = body(c)?;
            c.batch("COMMIT")?;
            if dialect == Dialect::MySql {
                c.batch(&format!("SELECT RELEASE_LOCK('{lock}')"))?;
            }
            Ok(out)
        })
    }

    /// Replace the config-seeded sources, destinations and connections with
    /// `config`'s (API rows and API deletions win; QoS rows only created).
    pub(super) fn seed(&mut self, config: &Config) -> Result<(), DeliverError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.locked("seeding from the config", |c| self.seed_in(c, config)) {
                Ok(()) => return Ok(()),
                Err(e @ DeliverError::SeedConflict(_)) => return Err(e),
                Err(e) if attempt < SEED_ATTEMPTS => {
                    tracing::warn!(error = %e, attempt, "seeding the control database failed; trying again");
                    std::thread::sleep(std::time::Duration::from_millis(200 * attempt as u64));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn seed_in(&self, c: &mut Connection, config: &Config) -> Result<(), SqlError> {
        for t in ["sources", "destinations", "connections"] {
            c.execute(&self.q(&format!("DELETE FROM {{p}}{t} WHERE origin = 'config'")), &[])?;
        }
        let deleted: HashSet<(String, String)> =
            c.query(&self.q("SELECT kind, `key` FROM {p}api_deletions"), &[], |r| Ok((r.text(0)?, r.text(1)?)))?.into_iter().collect();
        let is_deleted = |kind: &str, key: &str| deleted.contains(&(kind.to_owned(), key.to_owned()));
        let insert_source = self.insert_missing("sources", "id, config, origin", "?, ?, 'config'", "id");
        let insert_destination = self.insert_missing("destinations", "id, config, origin", "?, ?, 'config'", "id");
        let insert_qos = self.insert_missing("destination_qos", "destination", "?", "destination");
        let insert_connection = self.insert_missing("connections", "source, destination, origin", "?, ?, 'config'", "source, destination");
        // The config file is this cell's own word: a row a control plane handed over under the
        // same id gives way (the next feed skips it, and says so), rather than the file's row
        // losing without a word (red team).
        for (table, ids) in [
            ("sources", config.sources.iter().map(|s| s.id.as_str()).collect::<Vec<_>>()),
            ("destinations", config.destinations.iter().map(|d| d.id.as_str()).collect()),
        ] {
            let delete = self.q(&format!("DELETE FROM {{p}}{table} WHERE origin = 'global' AND id = ?"));
            for id in ids {
                if c.execute(&delete, &[Arg::Text(id)])? > 0 {
                    tracing::warn!(table, id, "the config file's row replaces one the control plane handed this cell under the same id");
                }
            }
        }
        for src in &config.sources {
            let json = serde_json::to_string(src).expect("a source serializes");
            c.execute(&insert_source, &[Arg::Text(&src.id), Arg::Text(&json)])?;
        }
        for d in &config.destinations {
            if !is_deleted("destination", &d.id) {
                let json = serde_json::to_string(d).expect("a destination serializes");
                c.execute(&insert_destination, &[Arg::Text(&d.id), Arg::Text(&json)])?;
            }
            c.execute(&insert_qos, &[Arg::Text(&d.id)])?;
        }
        for conn in &config.connections {
            for d in &conn.destinations {
                if is_deleted("connection", &format!("{}/{d}", conn.source)) || is_deleted("destination", d) {
                    continue;
                }
                c.execute(&insert_connection, &[Arg::Text(&conn.source), Arg::Text(d)])?;
            }
        }
        // A write key names one source: the config's and the admin API's sources
        // together must not share one (ingest would pick either, silently).
        let rows = c.query(&self.q("SELECT id, config, origin FROM {p}sources ORDER BY id"), &[], |r| Ok((r.text(0)?, r.text(1)?, r.text(2)?)))?;
        let mut owners: std::collections::HashMap<String, (String, String)> = std::collections::HashMap::new();
        for (id, json, origin) in rows {
            let Ok(src) = serde_json::from_str::<SourceConfig>(&json) else { continue };
            if let Some((other, other_origin)) = owners.insert(src.write_key.clone(), (id.clone(), origin.clone())) {
                let made = |o: &str| if o == "api" { "made through the admin API" } else { "from the config" };
                return Err(SqlError::Refused(format!(
                    "sources {other:?} ({}) and {id:?} ({}) have the same write key: give the config's source another key, \
                     or rotate the other's (POST /api/sources/{{id}}/rotate-key)",
                    made(&other_origin),
                    made(&origin)
                )));
            }
        }
        Ok(())
    }

    /// Replace the rows of origin `global` (the workspaces a control plane
    /// hands this cell) by `sources`, `destinations` and `connections`, in
    /// one transaction under the control write lock. A row whose id the
    /// config or the admin API holds already is skipped (theirs stays) and
    /// named in the answer; so is a connection whose ends are not there.
    pub(super) fn replace_global(
        &self,
        sources: &[SourceConfig],
        destinations: &[DestinationConfig],
        connections: &[(String, String)],
    ) -> Result<Vec<String>, DeliverError> {
        self.locked("applying the control plane's configuration", |c| {
            for t in ["connections", "sources", "destinations"] {
                c.execute(&self.q(&format!("DELETE FROM {{p}}{t} WHERE origin = 'global'")), &[])?;
            }
            // Which rows went in decides what is skipped: `insert_new` (MySQL counts a no-op `insert_missing` as a change).
            let insert_source = self.insert_new("sources", "id, config, origin", "?, ?, 'global'", "id");
            let insert_destination = self.insert_new("destinations", "id, config, origin", "?, ?, 'global'", "id");
            let insert_qos = self.insert_missing("destination_qos", "destination", "?", "destination");
            let insert_connection = self.insert_missing("connections", "source, destination, origin", "?, ?, 'global'", "source, destination");
            let mut skipped = Vec::new();
            let mut sources_here = HashSet::new();
            for src in sources {
                let json = serde_json::to_string(src).expect("a source serializes");
                if c.execute(&insert_source, &[Arg::Text(&src.id), Arg::Text(&json)])? == 1 {
                    sources_here.insert(src.id.as_str());
                } else {
                    skipped.push(format!("source {:?} (its id is taken here)", src.id));
                }
            }
            let mut destinations_here = HashSet::new();
            for d in destinations {
                let json = serde_json::to_string(d).expect("a destination serializes");
                if c.execute(&insert_destination, &[Arg::Text(&d.id), Arg::Text(&json)])? == 1 {
                    destinations_here.insert(d.id.as_str());
                    c.execute(&insert_qos, &[Arg::Text(&d.id)])?;
                } else {
                    skipped.push(format!("destination {:?} (its id is taken here)", d.id));
                }
            }
            for (s, d) in connections {
                if sources_here.contains(s.as_str()) && destinations_here.contains(d.as_str()) {
                    c.execute(&insert_connection, &[Arg::Text(s), Arg::Text(d)])?;
                } else {
                    skipped.push(format!("connection {s:?} → {d:?} (an end was skipped)"));
                }
            }
            Ok(skipped)
        })
    }

    /// The current sources, destinations, connections and QoS.
    pub(super) fn read(&self) -> Result<CatalogSnapshot, DeliverError> {
        let sources_sql = self.q("SELECT id, config, disabled FROM {p}sources ORDER BY id");
        let destinations_sql = self.q("SELECT id, config FROM {p}destinations");
        let connections_sql = self.q("SELECT source, destination FROM {p}connections ORDER BY source, destination");
        let qos_sql = self.q("SELECT destination, paused, max_in_flight, rate_per_sec, priority FROM {p}destination_qos");
        let plans_sql = self.q("SELECT source, plan, version, updated_at FROM {p}tracking_plans");
        let functions_sql =
            self.q("SELECT l.id, l.version, f.code FROM {p}function_live l JOIN {p}functions f ON f.id = l.id AND f.version = l.version");
        let (sources, destinations, connections, qos, plans, functions) = self.run("reading", |c| {
            let sources = c.query(&sources_sql, &[], |r| Ok((r.text(0)?, r.text(1)?, r.int(2)? != 0)))?;
            let destinations = c.query(&destinations_sql, &[], |r| Ok((r.text(0)?, r.text(1)?)))?;
            let connections = c.query(&connections_sql, &[], |r| Ok((r.text(0)?, r.text(1)?)))?;
            let qos = c.query(&qos_sql, &[], |r| {
                Ok((
                    r.text(0)?,
                    Qos {
                        paused: r.int(1)? != 0,
                        max_in_flight: r.opt_int(2)?.map(|v| v.max(1) as usize),
                        rate_per_sec: r.opt_int(3)?.map(|v| v.max(0) as u32),
                        priority: r.int(4)?.clamp(1, 100) as u32,
                    },
                ))
            })?;
            let plans = c.query(&plans_sql, &[], |r| Ok((r.text(0)?, r.text(1)?, r.int(2)?, r.int(3)?)))?;
            let functions = c.query(&functions_sql, &[], |r| Ok((r.text(0)?, r.int(1)?, r.text(2)?)))?;
            Ok((sources, destinations, connections, qos, plans, functions))
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
        for (source, json, version, updated_at_ms) in plans {
            match serde_json::from_str(&json) {
                Ok(doc) => {
                    snap.plans.insert(source, super::StoredPlan { doc, version, updated_at_ms });
                }
                Err(problem) => tracing::error!(%source, %problem, "ignoring a tracking plan that is not JSON in the control database"),
            }
        }
        for (id, version, code) in functions {
            snap.functions.insert(id, super::LiveFunction { version, code: code.into() });
        }
        Ok(snap)
    }

    pub(super) fn deploy_function(&self, id: &str, code: &str) -> Result<i64, DeliverError> {
        let now = chrono::Utc::now().timestamp_millis();
        let next = self.q("SELECT COALESCE(MAX(version), 0) + 1 FROM {p}functions WHERE id = ?");
        let insert = self.q("INSERT INTO {p}functions (id, version, code, created_at) VALUES (?, ?, ?, ?)");
        let live = self.upsert("function_live", "id, version, updated_at", "?, ?, ?", "id", &["version", "updated_at"], "");
        // Under the control lock: two deploys of one function get two numbers.
        self.locked("deploying a function", |c| {
            let version = c.query_one(&next, &[Arg::Text(id)], |r| r.int(0))?.unwrap_or(1);
            c.execute(&insert, &[Arg::Text(id), Arg::Int(version), Arg::Text(code), Arg::Int(now)])?;
            c.execute(&live, &[Arg::Text(id), Arg::Int(version), Arg::Int(now)])?;
            Ok(version)
        })
    }

    pub(super) fn restore_function(&self, id: &str, version: i64) -> Result<bool, DeliverError> {
        let now = chrono::Utc::now().timestamp_millis();
        let exists = self.q("SELECT COUNT(*) FROM {p}functions WHERE id = ? AND version = ?");
        let live = self.upsert("function_live", "id, version, updated_at", "?, ?, ?", "id", &["version", "updated_at"], "");
        self.locked("restoring a function version", |c| {
            if c.query_one(&exists, &[Arg::Text(id), Arg::Int(version)], |r| r.int(0))?.unwrap_or(0) == 0 {
                return Ok(false);
            }
            c.execute(&live, &[Arg::Text(id), Arg::Int(version), Arg::Int(now)])?;
            Ok(true)
        })
    }

    pub(super) fn function_versions(&self, id: &str) -> Result<Vec<super::FunctionVersion>, DeliverError> {
        let sql = self.q("SELECT version, created_at, code FROM {p}functions WHERE id = ? ORDER BY version");
        self.run("reading a function's versions", |c| {
            c.query(&sql, &[Arg::Text(id)], |r| Ok(super::FunctionVersion { version: r.int(0)?, created_at_ms: r.int(1)?, code: r.text(2)? }))
        })
    }

    pub(super) fn delete_function(&self, id: &str) -> Result<bool, DeliverError> {
        let live = self.q("DELETE FROM {p}function_live WHERE id = ?");
        let versions = self.q("DELETE FROM {p}functions WHERE id = ?");
        let deleted = self.exec("deleting a function", &[(live, vec![id]), (versions, vec![id])])?;
        Ok(deleted[1] > 0)
    }

    pub(super) fn put_plan(&self, source: &str, doc: &serde_json::Value) -> Result<i64, DeliverError> {
        let json = serde_json::to_string(doc).expect("JSON serializes");
        let now = chrono::Utc::now().timestamp_millis();
        let upsert = self.upsert(
            "tracking_plans",
            "source, plan, version, updated_at",
            "?, ?, 1, ?",
            "source",
            &["plan", "updated_at"],
            &format!("version = {}tracking_plans.version + 1", self.prefix),
        );
        let version = self.q("SELECT version FROM {p}tracking_plans WHERE source = ?");
        self.run("writing a tracking plan", |c| {
            c.execute(&upsert, &[Arg::Text(source), Arg::Text(&json), Arg::Int(now)])?;
            Ok(c.query(&version, &[Arg::Text(source)], |r| r.int(0))?.first().copied().unwrap_or(1))
        })
    }

    pub(super) fn delete_plan(&self, source: &str) -> Result<bool, DeliverError> {
        let delete = self.q("DELETE FROM {p}tracking_plans WHERE source = ?");
        Ok(self.exec("deleting a tracking plan", &[(delete, vec![source])])?[0] > 0)
    }

    /// Create a source; false when its id or write key is taken.
    pub(super) fn insert_source(&self, src: &SourceConfig) -> Result<bool, DeliverError> {
        let taken_sql = self.q("SELECT config FROM {p}sources");
        let insert = self.q("INSERT INTO {p}sources (id, config, origin) VALUES (?, ?, 'api')");
        let json = serde_json::to_string(src).expect("settings serialize");
        self.locked("creating a source", |c| {
            for config in c.query(&taken_sql, &[], |r| r.text(0))? {
                if let Ok(other) = serde_json::from_str::<SourceConfig>(&config) {
                    if other.id == src.id || other.write_key == src.write_key {
                        return Ok(false);
                    }
                }
            }
            c.execute(&insert, &[Arg::Text(&src.id), Arg::Text(&json)])?;
            Ok(true)
        })
    }

    /// Run `statements` (each with its text arguments) one after the other; the rows each changed.
    fn exec(&self, what: &str, statements: &[(String, Vec<&str>)]) -> Result<Vec<u64>, DeliverError> {
        self.run(what, |c| {
            statements
                .iter()
                .map(|(sql, args)| {
                    let args: Vec<Arg<'_>> = args.iter().map(|a| Arg::Text(a)).collect();
                    c.execute(sql, &args)
                })
                .collect()
        })
    }

    /// Create or replace row `id` of `table` (sources, destinations) as the
    /// admin API's: the config will not overwrite it.
    fn put_api_row(&self, table: &str, id: &str, config: &impl serde::Serialize) -> Result<(), DeliverError> {
        let json = serde_json::to_string(config).expect("settings serialize");
        let sql = self.upsert(table, "id, config, origin", "?, ?, 'api'", "id", &["config"], "origin = 'api'");
        self.exec("writing", &[(sql, vec![id, &json])]).map(drop)
    }

    /// Create or replace a source (as the admin API's: the config will not overwrite it).
    pub(super) fn put_source(&self, src: &SourceConfig) -> Result<(), DeliverError> {
        self.put_api_row("sources", &src.id, src)
    }

    /// Enable or disable a source; false when there is no such source.
    pub(super) fn set_source_disabled(&self, id: &str, disabled: bool) -> Result<bool, DeliverError> {
        // (MySQL counts matched rows, not changed ones: sqlx sets CLIENT_FOUND_ROWS.)
        let sql = self.q(&format!("UPDATE {{p}}sources SET disabled = {}, origin = 'api' WHERE id = ?", disabled as i64));
        Ok(self.exec("writing", &[(sql, vec![id])])?[0] == 1)
    }

    /// Create or replace a destination (and its QoS row if new).
    pub(super) fn put_destination(&self, d: &DestinationConfig) -> Result<(), DeliverError> {
        self.put_api_row("destinations", &d.id, d)?;
        let qos = self.insert_missing("destination_qos", "destination", "?", "destination");
        let undelete = self.q("DELETE FROM {p}api_deletions WHERE kind = 'destination' AND `key` = ?");
        self.exec("writing", &[(qos, vec![&d.id]), (undelete, vec![&d.id])]).map(drop)
    }

    /// Delete a destination and its connections; false when there is none.
    pub(super) fn delete_destination(&self, id: &str) -> Result<bool, DeliverError> {
        let delete = self.q("DELETE FROM {p}destinations WHERE id = ?");
        let connections = self.q("DELETE FROM {p}connections WHERE destination = ?");
        let n = self.exec("writing", &[(delete, vec![id]), (connections, vec![id])])?[0];
        if n == 1 {
            let remember = self.insert_missing("api_deletions", "kind, `key`", "'destination', ?", "kind, `key`");
            self.exec("writing", &[(remember, vec![id])])?;
        }
        Ok(n == 1)
    }

    pub(super) fn put_connection(&self, source: &str, destination: &str) -> Result<(), DeliverError> {
        let sql = self.upsert("connections", "source, destination, origin", "?, ?, 'api'", "source, destination", &[], "origin = 'api'");
        let undelete = self.q("DELETE FROM {p}api_deletions WHERE kind = 'connection' AND `key` = ?");
        let key = format!("{source}/{destination}");
        self.exec("writing", &[(sql, vec![source, destination]), (undelete, vec![&key])]).map(drop)
    }

    /// Delete a connection; the config will not bring it back. False when there is none.
    pub(super) fn delete_connection(&self, source: &str, destination: &str) -> Result<bool, DeliverError> {
        let delete = self.q("DELETE FROM {p}connections WHERE source = ? AND destination = ?");
        let n = self.exec("writing", &[(delete, vec![source, destination])])?[0];
        if n == 1 {
            let remember = self.insert_missing("api_deletions", "kind, `key`", "'connection', ?", "kind, `key`");
            self.exec("writing", &[(remember, vec![&format!("{source}/{destination}")])])?;
        }
        Ok(n == 1)
    }

    /// Set the QoS of a destination (every column; `None` = the configured value).
    pub(super) fn put_qos(&self, destination: &str, q: &Qos) -> Result<(), DeliverError> {
        let sql = self.upsert(
            "destination_qos",
            "destination, paused, max_in_flight, rate_per_sec, priority",
            "?, ?, ?, ?, ?",
            "destination",
            &["paused", "max_in_flight", "rate_per_sec", "priority"],
            "",
        );
        let args = [
            Arg::Text(destination),
            Arg::Int(q.paused as i64),
            // (usize::MAX would wrap to -1 and read back as 1: the largest value stands for "no limit" here.)
            Arg::OptInt(q.max_in_flight.map(|v| i64::try_from(v).unwrap_or(i64::MAX))),
            Arg::OptInt(q.rate_per_sec.map(i64::from)),
            Arg::Int(q.priority.into()),
        ];
        self.run("writing QoS", |c| c.execute(&sql, &args).map(drop))
    }

    /// File a replay request; its id.
    pub(super) fn request_replay(&self, destination: &str, since_ms: i64) -> Result<i64, DeliverError> {
        let now = crate::now_ms();
        let sql = self.q("INSERT INTO {p}replays (destination, since_ms, requested_at) VALUES (?, ?, ?)");
        self.run("filing a replay", |c| c.insert_returning_id(&sql, &[Arg::Text(destination), Arg::Int(since_ms), Arg::Int(now)]))
    }

    pub(super) fn replay(&self, id: i64) -> Result<Option<Replay>, DeliverError> {
        let sql = self.q(&format!("SELECT {REPLAY_COLUMNS} FROM {{p}}replays WHERE id = ?"));
        self.run("reading a replay", |c| c.query_one(&sql, &[Arg::Int(id)], row_to_replay))
    }

    /// Replays for this process: unfinished ones (on a server, claimed by it first).
    pub(super) fn unfinished_replays(&self) -> Result<Vec<Replay>, DeliverError> {
        let unfinished = "state IN ('pending', 'running')";
        let Some(owner) = &self.owner else {
            let select = self.q(&format!("SELECT {REPLAY_COLUMNS} FROM {{p}}replays WHERE {unfinished} ORDER BY id"));
            return self.run("reading replays", |c| c.query(&select, &[], row_to_replay));
        };
        let claim = self.q("UPDATE {p}replays SET claimed_by = ? WHERE state = 'pending' AND claimed_by IS NULL");
        let select = self.q(&format!("SELECT {REPLAY_COLUMNS} FROM {{p}}replays WHERE {unfinished} AND claimed_by = ? ORDER BY id"));
        self.run("reading replays", |c| {
            c.execute(&claim, &[Arg::Text(owner)])?;
            c.query(&select, &[Arg::Text(owner)], row_to_replay)
        })
    }

    pub(super) fn update_replay(&self, id: i64, state: &str, events: i64, jobs: i64, error: Option<&str>) -> Result<(), DeliverError> {
        let finished = matches!(state, "done" | "failed").then(crate::now_ms);
        let sql = self.q("UPDATE {p}replays SET state = ?, events = ?, jobs = ?, error = ?, finished_at = ? WHERE id = ?");
        let args = [Arg::Text(state), Arg::Int(events), Arg::Int(jobs), Arg::OptText(error), Arg::OptInt(finished), Arg::Int(id)];
        self.run("updating a replay", |c| c.execute(&sql, &args).map(drop))
    }
}

/// The dead-letter store (see [`DeadLetter`]). Inserts hold the control
/// write lock, so the cap is checked and rows added by one process at a
/// time; on a server a requested replay is claimed (`claimed_by`) by the
/// first route to ask, as replays are.
impl Tables {
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
        self.locked("storing dead letters", |c| {
            let mut fresh: Vec<&BoundedDeadLetter<'_>> = Vec::new();
            let mut existing = 0u64;
            for l in letters {
                let n = l.new;
                let args = [Arg::Text(&n.topic), Arg::Int(n.partition.into()), Arg::Int(n.offset as i64), Arg::Int(n.generation)];
                let found = c.query_one(&exists_sql, &args, |_| Ok(()))?.is_some();
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
            let usage = |c: &mut Connection| -> Result<(u64, u64), SqlError> {
                Ok(c.query_one(&usage_sql, &[], |r| Ok((r.int(0)? as u64, r.int(1)? as u64)))?.unwrap_or_default())
            };
            let mut used = usage(c)?;
            if !fits(used) {
                // Finished rows make room first.
                c.execute(&prune_sql, &[])?;
                used = usage(c)?;
                if !fits(used) {
                    return Ok(DeadLetterInsert::Full { rows: used.0, bytes: used.1 });
                }
            }
            let now = crate::now_ms();
            for l in &fresh {
                let n = l.new;
                let args = [
                    Arg::Int(now),
                    Arg::Text(n.stage),
                    Arg::Text(&n.topic),
                    Arg::Int(n.partition.into()),
                    Arg::Int(n.offset as i64),
                    Arg::Int(n.generation),
                    Arg::OptText(n.destination.as_deref()),
                    Arg::Int(n.record_ms),
                    Arg::Bytes(l.key),
                    Arg::Bytes(l.payload),
                    Arg::Int(n.payload.len() as i64),
                    Arg::Int(l.truncated as i64),
                    Arg::Int(l.bytes() as i64),
                    Arg::Text(&l.reason),
                ];
                c.execute(&insert_sql, &args)?;
            }
            Ok(DeadLetterInsert::Stored { new: add_rows, existing })
        })
    }

    pub(super) fn dead_letters(&self, before: i64, limit: usize) -> Result<Vec<DeadLetter>, DeliverError> {
        let sql = self.q(&format!("SELECT {} FROM {{p}}dead_letters WHERE id < ? ORDER BY id DESC LIMIT {limit}", dead_letter_columns(true)));
        self.run("reading dead letters", |c| c.query(&sql, &[Arg::Int(before)], dead_letter))
    }

    pub(super) fn dead_letter(&self, id: i64) -> Result<Option<DeadLetter>, DeliverError> {
        let sql = self.q(&format!("SELECT {} FROM {{p}}dead_letters WHERE id = ?", dead_letter_columns(false)));
        self.run("reading a dead letter", |c| c.query_one(&sql, &[Arg::Int(id)], dead_letter))
    }

    pub(super) fn dead_letter_counts(&self) -> Result<DeadLetterCounts, DeliverError> {
        let sql = self.q_int(DEAD_LETTER_COUNTS);
        let counts = self.run("counting dead letters", |c| {
            c.query_one(&sql, &[], |r| {
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
        })?;
        Ok(counts.unwrap_or_default())
    }

    /// `UPDATE … SET <set>` (one `?`: now) on open row `id`, or every open row.
    pub(super) fn mark_dead_letters(&self, set: &str, id: Option<i64>) -> Result<u64, DeliverError> {
        let open = "replayed_at_ms IS NULL AND discarded_at_ms IS NULL";
        let now = crate::now_ms();
        let (sql, args) = match id {
            Some(id) => (self.q(&format!("UPDATE {{p}}dead_letters SET {set} WHERE {open} AND id = ?")), vec![Arg::Int(now), Arg::Int(id)]),
            None => (self.q(&format!("UPDATE {{p}}dead_letters SET {set} WHERE {open}")), vec![Arg::Int(now)]),
        };
        self.run("marking dead letters", |c| c.execute(&sql, &args))
    }

    /// Requested dead-letter replays for this process (on a server, claimed by it first).
    pub(super) fn claim_dead_letter_replays(&self, limit: usize) -> Result<Vec<DeadLetter>, DeliverError> {
        let requested = "replay_requested_at_ms IS NOT NULL AND replayed_at_ms IS NULL AND discarded_at_ms IS NULL";
        let Some(owner) = &self.owner else {
            let select = self.q(&format!("SELECT {} FROM {{p}}dead_letters WHERE {requested} ORDER BY id LIMIT {limit}", dead_letter_columns(false)));
            return self.run("reading dead-letter replays", |c| c.query(&select, &[], dead_letter));
        };
        let claim = self.q(&format!("UPDATE {{p}}dead_letters SET claimed_by = ? WHERE {requested} AND claimed_by IS NULL"));
        let select = self.q(&format!(
            "SELECT {} FROM {{p}}dead_letters WHERE {requested} AND claimed_by = ? ORDER BY id LIMIT {limit}",
            dead_letter_columns(false)
        ));
        self.run("claiming dead-letter replays", |c| {
            c.execute(&claim, &[Arg::Text(owner)])?;
            c.query(&select, &[Arg::Text(owner)], dead_letter)
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
        let args = [Arg::OptInt(replayed), Arg::OptInt(jobs), Arg::OptText(error), Arg::Int(id)];
        self.run("recording a dead-letter replay", |c| c.execute(&sql, &args).map(drop))
    }
}
