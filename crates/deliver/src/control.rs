//! The control database (`data_dir/control.sqlite`, or with
//! `deliver.jobdb_url` the tables `sluice_control_*` of that database,
//! shared by every process using it: [`sql`]): sources, destinations,
//! connections, `destination_qos`, replay requests and dead letters
//! (records a stage could not handle: [`DeadLetter`]). The config file seeds
//! it at start; the running process re-reads it every
//! [`REFRESH_INTERVAL`], so one SQL statement changes behaviour without a
//! restart, e.g.
//!
//! ```sql
//! UPDATE destination_qos SET paused = 1 WHERE destination = 'crm-hook';
//! ```
//!
//! Invariants:
//! - Rows seeded from the config carry `origin = 'config'` and are replaced
//!   on every start; rows the admin API made or changed carry `origin =
//!   'api'` and are kept (the config never overwrites them).
//! - `destination_qos` rows are created once per destination and never
//!   overwritten by the config: an operator's pause survives restarts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};
use sluice_core::config::{DeliverConfig, DestinationConfig, SourceConfig};
use sluice_core::Config;
use tokio::sync::Notify;

use crate::executor::Target;
use crate::gate::{Destination, DestinationSettings, Qos};
use crate::DeliverError;

/// How often directors and the route re-read the control database.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(2);

pub fn control_path(data_dir: &Path) -> PathBuf {
    data_dir.join("control.sqlite")
}

fn err(path: &Path) -> impl Fn(rusqlite::Error) -> DeliverError + '_ {
    move |source| DeliverError::Sqlite { path: path.display().to_string(), source }
}

/// A connection to the control database: the SQLite file, or the tables
/// `sluice_control_*` of the `deliver.jobdb_url` database ([`sql`]).
pub struct ControlDb {
    backend: Backend,
    /// The dead-letter store's bounds (see [`DeadLetterLimits`]).
    dead_letter_limits: Mutex<DeadLetterLimits>,
}

enum Backend {
    Sqlite(SqliteControl),
    Sql(Box<sql::SqlControl>),
}

/// The control database in `data_dir/control.sqlite`.
struct SqliteControl {
    path: PathBuf,
    conn: Connection,
}

/// A replay request.
#[derive(Debug, Clone, PartialEq)]
pub struct Replay {
    pub id: i64,
    pub destination: String,
    pub since_ms: i64,
    pub state: String,
    pub events: i64,
    pub jobs: i64,
    pub error: Option<String>,
}

/// Dead letters: records a stage could not handle (the route: an `output`
/// record it cannot plan — key not `<source>/<messageId>` or not UTF-8,
/// value not JSON), kept in the control database (`dead_letters`, or
/// `sluice_control_dead_letters`) for an operator to inspect, replay or
/// discard (`sluice dead-letters`, `/api/dead-letters`, the console).
///
/// Invariants:
/// - One row per (topic, partition, offset, generation): storing the same
///   record again (a batch replayed after a crash, a replay run again)
///   adds nothing. Generation 0 is the route; a replay's rows carry its id.
/// - The store is bounded ([`DeadLetterLimits`]): at its cap, rows that are
///   finished (replayed or discarded) are deleted; if that is not enough
///   [`ControlDb::insert_dead_letters`] stores nothing and says
///   [`DeadLetterInsert::Full`] — the caller must not go on as if stored
///   (the route stalls the partition; nothing is dropped).
/// - Replaying re-plans the stored record with the current planner (same
///   generation and destination as the stage that failed); success sets
///   `replayed_at_ms`, failure sets `last_error` and leaves the row open.
///   In a shared SQL database one process claims each requested replay.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub id: i64,
    pub created_at_ms: i64,
    /// `route` or `replay`.
    pub stage: String,
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
    /// 0: the route's; a replay's id.
    pub generation: i64,
    /// A replay's destination; `None`: every connected destination.
    pub destination: Option<String>,
    /// The record's log time (ms).
    pub record_ms: i64,
    pub key: Vec<u8>,
    /// The record's value; in lists ([`ControlDb::dead_letters`]) only its
    /// first [`DEAD_LETTER_EXCERPT_BYTES`] bytes.
    pub payload: Vec<u8>,
    /// The value's size in the log.
    pub payload_size: i64,
    /// Key or value were longer than the store keeps: it cannot be replayed
    /// from here (the record is at topic/partition/offset while retention keeps it).
    pub truncated: bool,
    pub reason: String,
    pub replay_requested_at_ms: Option<i64>,
    pub replayed_at_ms: Option<i64>,
    /// Jobs the successful replay made.
    pub replayed_jobs: Option<i64>,
    pub discarded_at_ms: Option<i64>,
    /// Replays tried.
    pub attempts: i64,
    /// Why the last replay failed.
    pub last_error: Option<String>,
}

impl DeadLetter {
    /// `discarded`, `replayed`, `replay_requested`, `replay_failed` or `new`.
    pub fn state(&self) -> &'static str {
        if self.discarded_at_ms.is_some() {
            "discarded"
        } else if self.replayed_at_ms.is_some() {
            "replayed"
        } else if self.replay_requested_at_ms.is_some() {
            "replay_requested"
        } else if self.last_error.is_some() {
            "replay_failed"
        } else {
            "new"
        }
    }

    /// Neither replayed nor discarded.
    pub fn is_open(&self) -> bool {
        self.replayed_at_ms.is_none() && self.discarded_at_ms.is_none()
    }
}

/// A record to store as a dead letter.
#[derive(Debug, Clone)]
pub struct NewDeadLetter {
    pub stage: &'static str,
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
    pub generation: i64,
    pub destination: Option<String>,
    pub record_ms: i64,
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
    pub reason: String,
}

/// What [`ControlDb::insert_dead_letters`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterInsert {
    /// Every record is stored: `new` now, `existing` before (the same
    /// topic, partition, offset and generation).
    Stored { new: u64, existing: u64 },
    /// Nothing stored: the store holds `rows` rows / `bytes` bytes of open
    /// dead letters and the new ones do not fit.
    Full { rows: u64, bytes: u64 },
}

/// Counts of the dead-letter store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct DeadLetterCounts {
    /// Neither replayed nor discarded (`sluice_route_dead_letters`).
    pub open: i64,
    /// Open, with a replay requested.
    pub replay_requested: i64,
    /// Open, whose last replay failed.
    pub replay_failed: i64,
    pub replayed: i64,
    pub discarded: i64,
    /// Every row, and their key + payload bytes (what the caps bound).
    pub rows: i64,
    pub bytes: i64,
}

/// Rows the dead-letter store holds at most.
pub const DEAD_LETTER_MAX_ROWS: u64 = 100_000;
/// Key + payload bytes the dead-letter store holds at most.
pub const DEAD_LETTER_MAX_BYTES: u64 = 1 << 30;
/// The longest record key kept (ingest's keys are `<source>/<messageId>`).
pub const DEAD_LETTER_MAX_KEY_BYTES: usize = 4096;
/// Characters of a reason or replay error kept.
pub const DEAD_LETTER_MAX_REASON_CHARS: usize = 1000;
/// Bytes of payload in lists.
pub const DEAD_LETTER_EXCERPT_BYTES: usize = 256;

/// The bounds of the dead-letter store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadLetterLimits {
    /// Rows, finished ones included (deleted first when the cap is reached).
    pub max_rows: u64,
    /// Key + payload bytes of every row.
    pub max_bytes: u64,
    /// The longest payload kept whole: `ingest.max_event_bytes` (what ingest
    /// accepts); a longer value is cut and marked truncated.
    pub max_payload: usize,
}

impl Default for DeadLetterLimits {
    fn default() -> Self {
        DeadLetterLimits {
            max_rows: DEAD_LETTER_MAX_ROWS,
            max_bytes: DEAD_LETTER_MAX_BYTES,
            max_payload: sluice_core::config::IngestConfig::default().max_event_bytes,
        }
    }
}

/// At most `max` characters of `text`, without NUL (PostgreSQL's text refuses it).
fn clip(text: &str, max: usize) -> String {
    let mut out: String = text.chars().take(max).map(|c| if c == '\0' { '\u{fffd}' } else { c }).collect();
    if text.chars().nth(max).is_some() {
        out.push('…');
    }
    out
}

/// A dead letter as stored: bounded key, payload and reason.
struct BoundedDeadLetter<'a> {
    new: &'a NewDeadLetter,
    key: &'a [u8],
    payload: &'a [u8],
    truncated: bool,
    reason: String,
}

impl<'a> BoundedDeadLetter<'a> {
    fn of(new: &'a NewDeadLetter, limits: &DeadLetterLimits) -> Self {
        let key = &new.key[..new.key.len().min(DEAD_LETTER_MAX_KEY_BYTES)];
        let payload = &new.payload[..new.payload.len().min(limits.max_payload)];
        let truncated = key.len() < new.key.len() || payload.len() < new.payload.len();
        BoundedDeadLetter { new, key, payload, truncated, reason: clip(&new.reason, DEAD_LETTER_MAX_REASON_CHARS) }
    }

    fn bytes(&self) -> u64 {
        (self.key.len() + self.payload.len()) as u64
    }
}

/// Call the same method on whichever backend.
macro_rules! delegate {
    ($self:ident, $db:ident => $call:expr) => {
        match &$self.backend {
            Backend::Sqlite($db) => $call,
            Backend::Sql($db) => $call,
        }
    };
}

impl ControlDb {
    /// Open the SQLite control database at `path` (creating it).
    pub fn open(path: &Path) -> Result<ControlDb, DeliverError> {
        Ok(ControlDb { backend: Backend::Sqlite(SqliteControl::open(path)?), dead_letter_limits: Mutex::new(DeadLetterLimits::default()) })
    }

    /// Open `config`'s control database: the tables `sluice_control_*` of
    /// the `deliver.jobdb_url` database when it is set (created if missing;
    /// shared by every process using that database), else
    /// `data_dir/control.sqlite`. Blocks.
    pub fn open_for(config: &Config) -> Result<ControlDb, DeliverError> {
        let db = match &config.deliver.jobdb_url {
            Some(url) => ControlDb {
                backend: Backend::Sql(Box::new(sql::SqlControl::open(url.as_str(), &config.server.data_dir)?)),
                dead_letter_limits: Mutex::new(DeadLetterLimits::default()),
            },
            None => ControlDb::open(&control_path(&config.server.data_dir))?,
        };
        // A dead letter keeps what ingest can accept; more is cut (and marked truncated).
        db.dead_letter_limits.lock().expect("limits lock").max_payload = config.ingest.max_event_bytes;
        Ok(db)
    }

    /// Where the control database is (a path, or the URL without password).
    pub fn location(&self) -> String {
        match &self.backend {
            Backend::Sqlite(db) => db.path.display().to_string(),
            Backend::Sql(db) => db.location(),
        }
    }

    /// Replace the config-seeded sources, destinations and connections with
    /// `config`'s (API rows and API deletions win; QoS rows only created).
    pub fn seed(&mut self, config: &Config) -> Result<(), DeliverError> {
        match &mut self.backend {
            Backend::Sqlite(db) => db.seed(config),
            Backend::Sql(db) => db.seed(config),
        }
    }

    /// The current sources, destinations, connections and QoS.
    pub fn read(&self) -> Result<CatalogSnapshot, DeliverError> {
        delegate!(self, db => db.read())
    }

    /// Create a source; false when its id or write key is taken.
    pub fn insert_source(&self, src: &SourceConfig) -> Result<bool, DeliverError> {
        delegate!(self, db => db.insert_source(src))
    }

    /// Create or replace a source (as the admin API's: the config will not overwrite it).
    pub fn put_source(&self, src: &SourceConfig) -> Result<(), DeliverError> {
        delegate!(self, db => db.put_source(src))
    }

    /// Enable or disable a source; false when there is no such source.
    pub fn set_source_disabled(&self, id: &str, disabled: bool) -> Result<bool, DeliverError> {
        delegate!(self, db => db.set_source_disabled(id, disabled))
    }

    /// Create or replace a destination (and its QoS row if new).
    pub fn put_destination(&self, d: &DestinationConfig) -> Result<(), DeliverError> {
        delegate!(self, db => db.put_destination(d))
    }

    /// Delete a destination and its connections; false when there is none.
    pub fn delete_destination(&self, id: &str) -> Result<bool, DeliverError> {
        delegate!(self, db => db.delete_destination(id))
    }

    pub fn put_connection(&self, source: &str, destination: &str) -> Result<(), DeliverError> {
        delegate!(self, db => db.put_connection(source, destination))
    }

    /// Delete a connection; the config will not bring it back. False when there is none.
    pub fn delete_connection(&self, source: &str, destination: &str) -> Result<bool, DeliverError> {
        delegate!(self, db => db.delete_connection(source, destination))
    }

    /// Set the QoS of a destination (every column; `None` = the configured value).
    pub fn put_qos(&self, destination: &str, q: &Qos) -> Result<(), DeliverError> {
        delegate!(self, db => db.put_qos(destination, q))
    }

    /// File a replay request; its id.
    pub fn request_replay(&self, destination: &str, since_ms: i64) -> Result<i64, DeliverError> {
        delegate!(self, db => db.request_replay(destination, since_ms))
    }

    pub fn replay(&self, id: i64) -> Result<Option<Replay>, DeliverError> {
        delegate!(self, db => db.replay(id))
    }

    /// Replays for this process to run: not finished (pending, or running
    /// when the process stopped). In a shared SQL database each pending
    /// replay is first claimed by one process (the first to ask), and only
    /// that process's replays are returned (see [`sql`]).
    pub fn unfinished_replays(&self) -> Result<Vec<Replay>, DeliverError> {
        delegate!(self, db => db.unfinished_replays())
    }

    pub fn update_replay(&self, id: i64, state: &str, events: i64, jobs: i64, error: Option<&str>) -> Result<(), DeliverError> {
        delegate!(self, db => db.update_replay(id, state, events, jobs, error))
    }

    /// The dead-letter store's bounds.
    pub fn dead_letter_limits(&self) -> DeadLetterLimits {
        *self.dead_letter_limits.lock().expect("limits lock")
    }

    /// Change the dead-letter store's bounds (tests; the defaults are
    /// [`DEAD_LETTER_MAX_ROWS`], [`DEAD_LETTER_MAX_BYTES`], `ingest.max_event_bytes`).
    pub fn set_dead_letter_limits(&self, limits: DeadLetterLimits) {
        *self.dead_letter_limits.lock().expect("limits lock") = limits;
    }

    /// Store `letters` durably (committed before this returns), all or
    /// none: each is new or already there (same topic, partition, offset,
    /// generation), or — the store being at its cap even after deleting
    /// finished rows — none is stored ([`DeadLetterInsert::Full`]).
    pub fn insert_dead_letters(&self, letters: &[NewDeadLetter]) -> Result<DeadLetterInsert, DeliverError> {
        if letters.is_empty() {
            return Ok(DeadLetterInsert::Stored { new: 0, existing: 0 });
        }
        let limits = self.dead_letter_limits();
        let bounded: Vec<BoundedDeadLetter<'_>> = letters.iter().map(|l| BoundedDeadLetter::of(l, &limits)).collect();
        delegate!(self, db => db.insert_dead_letters(&bounded, &limits))
    }

    /// Up to `limit` dead letters with ids below `before` (all: `None`),
    /// newest first, each with a payload excerpt.
    pub fn dead_letters(&self, before: Option<i64>, limit: usize) -> Result<Vec<DeadLetter>, DeliverError> {
        delegate!(self, db => db.dead_letters(before.unwrap_or(i64::MAX), limit.clamp(1, 1000)))
    }

    /// One dead letter, whole.
    pub fn dead_letter(&self, id: i64) -> Result<Option<DeadLetter>, DeliverError> {
        delegate!(self, db => db.dead_letter(id))
    }

    pub fn dead_letter_counts(&self) -> Result<DeadLetterCounts, DeliverError> {
        delegate!(self, db => db.dead_letter_counts())
    }

    /// Ask for dead letter `id` (or every open one: `None`) to be replayed
    /// by the route; the number of rows marked (0: no such open row).
    pub fn request_dead_letter_replay(&self, id: Option<i64>) -> Result<u64, DeliverError> {
        delegate!(self, db => db.mark_dead_letters("replay_requested_at_ms = ?, claimed_by = NULL", id))
    }

    /// Give up on dead letter `id` (or every open one): it stays listed as
    /// discarded until the cap makes room. The number of rows marked.
    pub fn discard_dead_letters(&self, id: Option<i64>) -> Result<u64, DeliverError> {
        delegate!(self, db => db.mark_dead_letters("discarded_at_ms = ?, replay_requested_at_ms = NULL", id))
    }

    /// Dead letters whose replay was requested, for this process to run (up
    /// to `limit`, oldest first, whole). In a shared SQL database each is
    /// first claimed by one process, as replays are.
    pub fn claim_dead_letter_replays(&self, limit: usize) -> Result<Vec<DeadLetter>, DeliverError> {
        delegate!(self, db => db.claim_dead_letter_replays(limit.clamp(1, 1000)))
    }

    /// Record a replay's outcome: `Ok(jobs made)` marks it replayed;
    /// `Err(why)` keeps it open with `last_error`.
    pub fn finish_dead_letter_replay(&self, id: i64, outcome: Result<i64, &str>) -> Result<(), DeliverError> {
        let (replayed, jobs, error) = match outcome {
            Ok(jobs) => (Some(crate::now_ms()), Some(jobs), None),
            Err(e) => (None, None, Some(clip(e, DEAD_LETTER_MAX_REASON_CHARS))),
        };
        delegate!(self, db => db.finish_dead_letter_replay(id, replayed, jobs, error.as_deref()))
    }
}

impl SqliteControl {
    fn open(path: &Path) -> Result<SqliteControl, DeliverError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| DeliverError::Io { path: dir.display().to_string(), source })?;
        }
        let e = err(path);
        let conn = Connection::open(path).map_err(&e)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(&e)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(&e)?;
        conn.execute_batch(&crate::schema::control(crate::schema::Dialect::Sqlite, "").join(";\n")).map_err(&e)?;
        Ok(SqliteControl { path: path.to_owned(), conn })
    }

    /// Replace the config-seeded destinations and connections with `config`'s.
    fn seed(&mut self, config: &Config) -> Result<(), DeliverError> {
        let e = err(&self.path);
        let tx = self.conn.transaction().map_err(&e)?;
        tx.execute("DELETE FROM sources WHERE origin = 'config'", []).map_err(&e)?;
        tx.execute("DELETE FROM destinations WHERE origin = 'config'", []).map_err(&e)?;
        tx.execute("DELETE FROM connections WHERE origin = 'config'", []).map_err(&e)?;
        for src in &config.sources {
            let json = serde_json::to_string(src).expect("a source serializes");
            tx.execute("INSERT OR IGNORE INTO sources (id, config, origin) VALUES (?1, ?2, 'config')", params![src.id, json]).map_err(&e)?;
        }
        for d in &config.destinations {
            let json = serde_json::to_string(d).expect("a destination serializes");
            tx.execute(
                "INSERT OR IGNORE INTO destinations (id, config, origin)
                 SELECT ?1, ?2, 'config' WHERE NOT EXISTS (SELECT 1 FROM api_deletions WHERE kind = 'destination' AND key = ?1)",
                params![d.id, json],
            )
            .map_err(&e)?;
            tx.execute("INSERT OR IGNORE INTO destination_qos (destination) VALUES (?1)", [&d.id]).map_err(&e)?;
        }
        for c in &config.connections {
            for d in &c.destinations {
                tx.execute(
                    "INSERT OR IGNORE INTO connections (source, destination, origin)
                     SELECT ?1, ?2, 'config' WHERE NOT EXISTS (
                         SELECT 1 FROM api_deletions WHERE (kind = 'connection' AND key = ?1 || '/' || ?2)
                                                        OR (kind = 'destination' AND key = ?2))",
                    params![c.source, d],
                )
                .map_err(&e)?;
            }
        }
        tx.commit().map_err(&e)
    }

    /// The current sources, destinations, connections and QoS.
    fn read(&self) -> Result<CatalogSnapshot, DeliverError> {
        let e = err(&self.path);
        let mut sources = Vec::new();
        let mut stmt = self.conn.prepare_cached("SELECT id, config, disabled FROM sources ORDER BY id").map_err(&e)?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)? != 0))).map_err(&e)?;
        for row in rows {
            let (id, json, disabled) = row.map_err(&e)?;
            match serde_json::from_str::<SourceConfig>(&json) {
                Ok(src) => sources.push((src, disabled)),
                Err(problem) => tracing::error!(source = %id, %problem, "ignoring a source with invalid settings in the control database"),
            }
        }
        let mut destinations = HashMap::new();
        let mut stmt = self.conn.prepare_cached("SELECT id, config FROM destinations").map_err(&e)?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))).map_err(&e)?;
        for row in rows {
            let (id, json) = row.map_err(&e)?;
            match serde_json::from_str::<DestinationConfig>(&json) {
                Ok(d) => {
                    destinations.insert(id, d);
                }
                Err(problem) => tracing::error!(destination = %id, %problem, "ignoring a destination with invalid settings in the control database"),
            }
        }
        let mut connections: HashMap<String, Vec<String>> = HashMap::new();
        let mut stmt = self.conn.prepare_cached("SELECT source, destination FROM connections ORDER BY source, destination").map_err(&e)?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))).map_err(&e)?;
        for row in rows {
            let (s, d) = row.map_err(&e)?;
            connections.entry(s).or_default().push(d);
        }
        let mut qos = HashMap::new();
        let mut stmt =
            self.conn.prepare_cached("SELECT destination, paused, max_in_flight, rate_per_sec, priority FROM destination_qos").map_err(&e)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    Qos {
                        paused: r.get::<_, i64>(1)? != 0,
                        max_in_flight: r.get::<_, Option<i64>>(2)?.map(|v| v.max(1) as usize),
                        rate_per_sec: r.get::<_, Option<i64>>(3)?.map(|v| v.max(0) as u32),
                        priority: r.get::<_, i64>(4)?.clamp(1, 100) as u32,
                    },
                ))
            })
            .map_err(&e)?;
        for row in rows {
            let (d, q) = row.map_err(&e)?;
            qos.insert(d, q);
        }
        Ok(CatalogSnapshot { sources, destinations, connections, qos })
    }

    /// Create a source; false when its id or write key is taken.
    fn insert_source(&self, src: &SourceConfig) -> Result<bool, DeliverError> {
        let taken = self.read()?.sources.iter().any(|(o, _)| o.id == src.id || o.write_key == src.write_key);
        if taken {
            return Ok(false);
        }
        self.put_source(src)?;
        Ok(true)
    }

    /// Create or replace row `id` of `table` (sources, destinations) as the
    /// admin API's: the config will not overwrite it.
    fn put_api_row(&self, table: &'static str, id: &str, config: &impl serde::Serialize) -> Result<(), DeliverError> {
        let json = serde_json::to_string(config).expect("settings serialize");
        self.conn
            .execute(
                &format!(
                    "INSERT INTO {table} (id, config, origin) VALUES (?1, ?2, 'api')
                     ON CONFLICT (id) DO UPDATE SET config = excluded.config, origin = 'api'"
                ),
                params![id, json],
            )
            .map(|_| ())
            .map_err(err(&self.path))
    }

    /// Create or replace a source (as the admin API's: the config will not overwrite it).
    fn put_source(&self, src: &SourceConfig) -> Result<(), DeliverError> {
        self.put_api_row("sources", &src.id, src)
    }

    /// Enable or disable a source; false when there is no such source.
    fn set_source_disabled(&self, id: &str, disabled: bool) -> Result<bool, DeliverError> {
        self.conn
            .execute("UPDATE sources SET disabled = ?2, origin = 'api' WHERE id = ?1", params![id, disabled as i64])
            .map(|n| n == 1)
            .map_err(err(&self.path))
    }

    /// Create or replace a destination (and its QoS row if new).
    fn put_destination(&self, d: &DestinationConfig) -> Result<(), DeliverError> {
        let e = err(&self.path);
        self.put_api_row("destinations", &d.id, d)?;
        self.conn.execute("INSERT OR IGNORE INTO destination_qos (destination) VALUES (?1)", [&d.id]).map_err(&e)?;
        self.conn.execute("DELETE FROM api_deletions WHERE kind = 'destination' AND key = ?1", [&d.id]).map_err(&e)?;
        Ok(())
    }

    /// Delete a destination and its connections; false when there is none.
    fn delete_destination(&self, id: &str) -> Result<bool, DeliverError> {
        let e = err(&self.path);
        let n = self.conn.execute("DELETE FROM destinations WHERE id = ?1", [id]).map_err(&e)?;
        self.conn.execute("DELETE FROM connections WHERE destination = ?1", [id]).map_err(&e)?;
        if n == 1 {
            self.conn.execute("INSERT OR IGNORE INTO api_deletions (kind, key) VALUES ('destination', ?1)", [id]).map_err(&e)?;
        }
        Ok(n == 1)
    }

    fn put_connection(&self, source: &str, destination: &str) -> Result<(), DeliverError> {
        let e = err(&self.path);
        self.conn
            .execute(
                "INSERT INTO connections (source, destination, origin) VALUES (?1, ?2, 'api')
                 ON CONFLICT (source, destination) DO UPDATE SET origin = 'api'",
                params![source, destination],
            )
            .map_err(&e)?;
        self.conn.execute("DELETE FROM api_deletions WHERE kind = 'connection' AND key = ?1", [format!("{source}/{destination}")]).map_err(&e)?;
        Ok(())
    }

    /// Delete a connection; the config will not bring it back. False when there is none.
    fn delete_connection(&self, source: &str, destination: &str) -> Result<bool, DeliverError> {
        let e = err(&self.path);
        let n = self.conn.execute("DELETE FROM connections WHERE source = ?1 AND destination = ?2", params![source, destination]).map_err(&e)?;
        if n == 1 {
            self.conn
                .execute("INSERT OR IGNORE INTO api_deletions (kind, key) VALUES ('connection', ?1)", [format!("{source}/{destination}")])
                .map_err(&e)?;
        }
        Ok(n == 1)
    }

    /// Set the QoS of a destination (every column; `None` = the configured value).
    fn put_qos(&self, destination: &str, q: &Qos) -> Result<(), DeliverError> {
        self.conn
            .execute(
                "INSERT INTO destination_qos (destination, paused, max_in_flight, rate_per_sec, priority) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (destination) DO UPDATE SET paused = excluded.paused, max_in_flight = excluded.max_in_flight,
                     rate_per_sec = excluded.rate_per_sec, priority = excluded.priority",
                params![destination, q.paused as i64, q.max_in_flight.map(|v| v as i64), q.rate_per_sec.map(|v| v as i64), q.priority as i64],
            )
            .map(|_| ())
            .map_err(err(&self.path))
    }

    fn request_replay(&self, destination: &str, since_ms: i64) -> Result<i64, DeliverError> {
        self.conn
            .execute("INSERT INTO replays (destination, since_ms, requested_at) VALUES (?1, ?2, ?3)", params![destination, since_ms, crate::now_ms()])
            .map_err(err(&self.path))?;
        Ok(self.conn.last_insert_rowid())
    }

    fn replay(&self, id: i64) -> Result<Option<Replay>, DeliverError> {
        self.conn
            .query_row("SELECT id, destination, since_ms, state, events, jobs, error FROM replays WHERE id = ?1", [id], row_to_replay)
            .optional()
            .map_err(err(&self.path))
    }

    /// Replays not finished (pending, or running when the process stopped).
    fn unfinished_replays(&self) -> Result<Vec<Replay>, DeliverError> {
        let e = err(&self.path);
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id, destination, since_ms, state, events, jobs, error FROM replays WHERE state IN ('pending', 'running') ORDER BY id",
            )
            .map_err(&e)?;
        let rows = stmt.query_map([], row_to_replay).map_err(&e)?.collect::<Result<Vec<_>, _>>().map_err(&e)?;
        Ok(rows)
    }

    fn update_replay(&self, id: i64, state: &str, events: i64, jobs: i64, error: Option<&str>) -> Result<(), DeliverError> {
        let finished = matches!(state, "done" | "failed").then(crate::now_ms);
        self.conn
            .execute(
                "UPDATE replays SET state = ?2, events = ?3, jobs = ?4, error = ?5, finished_at = ?6 WHERE id = ?1",
                params![id, state, events, jobs, error, finished],
            )
            .map(|_| ())
            .map_err(err(&self.path))
    }
}

/// The columns of a dead letter, in [`DeadLetter`]'s order; `{payload}` is
/// the payload or an excerpt of it.
const DEAD_LETTER_COLUMNS: &str = "id, created_at_ms, stage, topic, log_partition, log_offset, generation, destination, record_ms, \
     record_key, {payload}, payload_size, truncated, reason, replay_requested_at_ms, replayed_at_ms, replayed_jobs, \
     discarded_at_ms, attempts, last_error";

/// [`DEAD_LETTER_COLUMNS`] with the whole payload, or its first [`DEAD_LETTER_EXCERPT_BYTES`].
fn dead_letter_columns(excerpt: bool) -> String {
    let payload = if excerpt { format!("substr(payload, 1, {DEAD_LETTER_EXCERPT_BYTES})") } else { "payload".to_owned() };
    DEAD_LETTER_COLUMNS.replace("{payload}", &payload)
}

/// The dead-letter store in `control.sqlite` (see [`DeadLetter`]). One
/// process writes `data_dir` at a time (`sluice serve`'s lock), so replays
/// are not claimed here.
impl SqliteControl {
    fn insert_dead_letters(&self, letters: &[BoundedDeadLetter<'_>], limits: &DeadLetterLimits) -> Result<DeadLetterInsert, DeliverError> {
        let e = err(&self.path);
        let tx = rusqlite::Transaction::new_unchecked(&self.conn, rusqlite::TransactionBehavior::Immediate).map_err(&e)?;
        let mut fresh = Vec::new();
        let mut existing = 0u64;
        {
            let mut exists = tx
                .prepare_cached("SELECT 1 FROM dead_letters WHERE topic = ?1 AND log_partition = ?2 AND log_offset = ?3 AND generation = ?4")
                .map_err(&e)?;
            for l in letters {
                let n = &l.new;
                let found = exists.exists(params![n.topic, n.partition, n.offset as i64, n.generation]).map_err(&e)?;
                let repeated = fresh.iter().any(|f: &&BoundedDeadLetter<'_>| {
                    (f.new.topic.as_str(), f.new.partition, f.new.offset, f.new.generation) == (n.topic.as_str(), n.partition, n.offset, n.generation)
                });
                if found || repeated {
                    existing += 1;
                } else {
                    fresh.push(l);
                }
            }
        }
        if fresh.is_empty() {
            tx.commit().map_err(&e)?;
            return Ok(DeadLetterInsert::Stored { new: 0, existing });
        }
        let (add_rows, add_bytes) = (fresh.len() as u64, fresh.iter().map(|l| l.bytes()).sum::<u64>());
        let usage = |tx: &rusqlite::Transaction<'_>| -> Result<(u64, u64), DeliverError> {
            tx.query_row(&DEAD_LETTER_USAGE.replace("{p}", "").replace("{int}", "INTEGER"), [], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
            })
            .map_err(&e)
        };
        let fits = |(rows, bytes): (u64, u64)| rows + add_rows <= limits.max_rows && bytes + add_bytes <= limits.max_bytes;
        let mut used = usage(&tx)?;
        if !fits(used) {
            // Finished rows make room first.
            tx.execute(&DEAD_LETTER_PRUNE.replace("{p}", ""), []).map_err(&e)?;
            used = usage(&tx)?;
            if !fits(used) {
                tx.commit().map_err(&e)?;
                return Ok(DeadLetterInsert::Full { rows: used.0, bytes: used.1 });
            }
        }
        {
            let now = crate::now_ms();
            let mut insert = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO dead_letters (created_at_ms, stage, topic, log_partition, log_offset, generation, destination,
                         record_ms, record_key, payload, payload_size, truncated, stored_bytes, reason)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
                )
                .map_err(&e)?;
            for l in &fresh {
                let n = &l.new;
                insert
                    .execute(params![
                        now,
                        n.stage,
                        n.topic,
                        n.partition,
                        n.offset as i64,
                        n.generation,
                        n.destination,
                        n.record_ms,
                        l.key,
                        l.payload,
                        n.payload.len() as i64,
                        l.truncated as i64,
                        l.bytes() as i64,
                        l.reason
                    ])
                    .map_err(&e)?;
            }
        }
        tx.commit().map_err(&e)?;
        Ok(DeadLetterInsert::Stored { new: add_rows, existing })
    }

    fn dead_letters(&self, before: i64, limit: usize) -> Result<Vec<DeadLetter>, DeliverError> {
        let e = err(&self.path);
        let sql = format!("SELECT {} FROM dead_letters WHERE id < ?1 ORDER BY id DESC LIMIT {limit}", dead_letter_columns(true));
        let mut stmt = self.conn.prepare_cached(&sql).map_err(&e)?;
        let rows = stmt.query_map([before], sqlite_dead_letter).map_err(&e)?.collect::<Result<Vec<_>, _>>().map_err(&e)?;
        Ok(rows)
    }

    fn dead_letter(&self, id: i64) -> Result<Option<DeadLetter>, DeliverError> {
        let sql = format!("SELECT {} FROM dead_letters WHERE id = ?1", dead_letter_columns(false));
        self.conn.query_row(&sql, [id], sqlite_dead_letter).optional().map_err(err(&self.path))
    }

    fn dead_letter_counts(&self) -> Result<DeadLetterCounts, DeliverError> {
        self.conn
            .query_row(&DEAD_LETTER_COUNTS.replace("{p}", "").replace("{int}", "INTEGER"), [], |r| {
                Ok(DeadLetterCounts {
                    open: r.get(0)?,
                    replay_requested: r.get(1)?,
                    replay_failed: r.get(2)?,
                    replayed: r.get(3)?,
                    discarded: r.get(4)?,
                    rows: r.get(5)?,
                    bytes: r.get(6)?,
                })
            })
            .map_err(err(&self.path))
    }

    /// `UPDATE … SET <set>` (one `?`: now) on open row `id`, or every open row.
    fn mark_dead_letters(&self, set: &str, id: Option<i64>) -> Result<u64, DeliverError> {
        let open = "replayed_at_ms IS NULL AND discarded_at_ms IS NULL";
        let now = crate::now_ms();
        let n = match id {
            Some(id) => self.conn.execute(&format!("UPDATE dead_letters SET {set} WHERE {open} AND id = ?"), params![now, id]),
            None => self.conn.execute(&format!("UPDATE dead_letters SET {set} WHERE {open}"), params![now]),
        };
        n.map(|n| n as u64).map_err(err(&self.path))
    }

    fn claim_dead_letter_replays(&self, limit: usize) -> Result<Vec<DeadLetter>, DeliverError> {
        let e = err(&self.path);
        let sql = format!(
            "SELECT {} FROM dead_letters WHERE replay_requested_at_ms IS NOT NULL AND replayed_at_ms IS NULL
                 AND discarded_at_ms IS NULL ORDER BY id LIMIT {limit}",
            dead_letter_columns(false)
        );
        let mut stmt = self.conn.prepare_cached(&sql).map_err(&e)?;
        let rows = stmt.query_map([], sqlite_dead_letter).map_err(&e)?.collect::<Result<Vec<_>, _>>().map_err(&e)?;
        Ok(rows)
    }

    fn finish_dead_letter_replay(&self, id: i64, replayed: Option<i64>, jobs: Option<i64>, error: Option<&str>) -> Result<(), DeliverError> {
        self.conn.execute(&DEAD_LETTER_FINISH.replace("{p}", ""), params![replayed, jobs, error, id]).map(drop).map_err(err(&self.path))
    }
}

/// Counts of the dead-letter store, as [`DeadLetterCounts`] (both
/// backends: `{p}` is the table prefix, `{int}` the engine's 64-bit integer
/// type for CAST — MySQL's and PostgreSQL's SUM of a BIGINT is a decimal).
const DEAD_LETTER_COUNTS: &str = "SELECT
    CAST(COALESCE(SUM(CASE WHEN replayed_at_ms IS NULL AND discarded_at_ms IS NULL THEN 1 ELSE 0 END), 0) AS {int}),
    CAST(COALESCE(SUM(CASE WHEN replayed_at_ms IS NULL AND discarded_at_ms IS NULL
                            AND replay_requested_at_ms IS NOT NULL THEN 1 ELSE 0 END), 0) AS {int}),
    CAST(COALESCE(SUM(CASE WHEN replayed_at_ms IS NULL AND discarded_at_ms IS NULL AND replay_requested_at_ms IS NULL
                            AND last_error IS NOT NULL THEN 1 ELSE 0 END), 0) AS {int}),
    CAST(COALESCE(SUM(CASE WHEN replayed_at_ms IS NOT NULL AND discarded_at_ms IS NULL THEN 1 ELSE 0 END), 0) AS {int}),
    CAST(COALESCE(SUM(CASE WHEN discarded_at_ms IS NOT NULL THEN 1 ELSE 0 END), 0) AS {int}),
    CAST(COUNT(*) AS {int}),
    CAST(COALESCE(SUM(stored_bytes), 0) AS {int})
    FROM {p}dead_letters";

/// Rows and stored bytes of the dead-letter store (see [`DEAD_LETTER_COUNTS`]).
const DEAD_LETTER_USAGE: &str = "SELECT CAST(COUNT(*) AS {int}), CAST(COALESCE(SUM(stored_bytes), 0) AS {int}) FROM {p}dead_letters";

/// Finished rows, deleted when the store is at its cap.
const DEAD_LETTER_PRUNE: &str = "DELETE FROM {p}dead_letters WHERE replayed_at_ms IS NOT NULL OR discarded_at_ms IS NOT NULL";

/// A replay's outcome: replayed_at_ms, replayed_jobs, last_error, id.
const DEAD_LETTER_FINISH: &str = "UPDATE {p}dead_letters SET replayed_at_ms = ?, replayed_jobs = ?, last_error = ?,
    attempts = attempts + 1, replay_requested_at_ms = NULL, claimed_by = NULL WHERE id = ?";

fn sqlite_dead_letter(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeadLetter> {
    Ok(DeadLetter {
        id: r.get(0)?,
        created_at_ms: r.get(1)?,
        stage: r.get(2)?,
        topic: r.get(3)?,
        partition: r.get::<_, i64>(4)? as u32,
        offset: r.get::<_, i64>(5)? as u64,
        generation: r.get(6)?,
        destination: r.get(7)?,
        record_ms: r.get(8)?,
        key: r.get(9)?,
        payload: r.get(10)?,
        payload_size: r.get(11)?,
        truncated: r.get::<_, i64>(12)? != 0,
        reason: r.get(13)?,
        replay_requested_at_ms: r.get(14)?,
        replayed_at_ms: r.get(15)?,
        replayed_jobs: r.get(16)?,
        discarded_at_ms: r.get(17)?,
        attempts: r.get(18)?,
        last_error: r.get(19)?,
    })
}

fn row_to_replay(r: &rusqlite::Row<'_>) -> rusqlite::Result<Replay> {
    Ok(Replay { id: r.get(0)?, destination: r.get(1)?, since_ms: r.get(2)?, state: r.get(3)?, events: r.get(4)?, jobs: r.get(5)?, error: r.get(6)? })
}

/// What the control database says, at one moment.
#[derive(Debug, Clone, Default)]
pub struct CatalogSnapshot {
    /// Every source, with whether it is disabled.
    pub sources: Vec<(SourceConfig, bool)>,
    pub destinations: HashMap<String, DestinationConfig>,
    /// source id → destination ids.
    pub connections: HashMap<String, Vec<String>>,
    pub qos: HashMap<String, Qos>,
}

/// The live view of the control database shared by route and directors,
/// and the per-destination gates.
pub struct Catalog {
    control: Mutex<ControlDb>,
    snapshot: RwLock<Arc<CatalogSnapshot>>,
    gates: Mutex<HashMap<String, Arc<Destination>>>,
    defaults: DeliverConfig,
    /// Woken on every permit release and settings change (directors wait on it).
    pub wake: Arc<Notify>,
}

impl Catalog {
    /// Open the control database, seed it from `config`, read it.
    pub fn open(config: &Config) -> Result<Arc<Catalog>, DeliverError> {
        let mut control = ControlDb::open_for(config)?;
        control.seed(config)?;
        let catalog = Arc::new(Catalog {
            control: Mutex::new(control),
            snapshot: RwLock::new(Arc::new(CatalogSnapshot::default())),
            gates: Mutex::new(HashMap::new()),
            defaults: config.deliver.clone(),
            wake: Arc::new(Notify::new()),
        });
        catalog.refresh()?;
        Ok(catalog)
    }

    pub fn snapshot(&self) -> Arc<CatalogSnapshot> {
        self.snapshot.read().expect("snapshot lock").clone()
    }

    pub fn with_control<T>(&self, f: impl FnOnce(&ControlDb) -> Result<T, DeliverError>) -> Result<T, DeliverError> {
        f(&self.control.lock().expect("control lock"))
    }

    /// Re-read the control database (blocking: call from a blocking thread).
    pub fn refresh(&self) -> Result<(), DeliverError> {
        // Held until the snapshot is installed: two refreshes (the timer, an
        // admin change) cannot interleave and install an older view last.
        let control = self.control.lock().expect("control lock");
        let snap = control.read()?;
        {
            let mut gates = self.gates.lock().expect("gates lock");
            for (id, d) in &snap.destinations {
                let settings = self.settings_for(d);
                let qos = snap.qos.get(id).cloned().unwrap_or_default();
                match gates.get(id) {
                    Some(g) => g.update(settings, &qos),
                    None => {
                        let g = Destination::new(
                            id.clone(),
                            settings.clone(),
                            self.defaults.circuit_failures.get(),
                            self.defaults.circuit_cooldown,
                            self.wake.clone(),
                        );
                        g.update(settings, &qos);
                        gates.insert(id.clone(), g);
                    }
                }
            }
            // A destination removed from the control database: its jobs wait (paused) until it returns or they expire.
            for (id, g) in gates.iter() {
                if !snap.destinations.contains_key(id) {
                    g.update((*g.settings()).clone(), &Qos { paused: true, ..Qos::default() });
                }
            }
        }
        *self.snapshot.write().expect("snapshot lock") = Arc::new(snap);
        Ok(())
    }

    fn settings_for(&self, d: &DestinationConfig) -> DestinationSettings {
        let policy = d.retry_policy(self.defaults.retry_policy());
        DestinationSettings {
            target: Target {
                url: d.url.clone(),
                secret: d.secret.clone(),
                allow_private_network: d.allow_private_network || self.defaults.allow_private_network,
                request_timeout: policy.request_timeout,
            },
            policy,
            max_in_flight: d.max_in_flight.unwrap_or(self.defaults.max_in_flight.get()),
            rate_limit: d.rate_limit.unwrap_or(self.defaults.rate_limit),
        }
    }

    /// The gate of destination `id`; an unknown id gets a paused placeholder.
    pub fn destination(&self, id: &str) -> Arc<Destination> {
        let mut gates = self.gates.lock().expect("gates lock");
        gates
            .entry(id.to_owned())
            .or_insert_with(|| {
                tracing::warn!(destination = %id, "jobs for a destination that is not configured wait, paused");
                let settings = DestinationSettings {
                    target: Target { url: String::new(), secret: None, allow_private_network: false, request_timeout: Duration::from_secs(10) },
                    policy: self.defaults.retry_policy(),
                    max_in_flight: 1,
                    rate_limit: 0,
                };
                let g = Destination::new(id.to_owned(), settings.clone(), 1, Duration::from_secs(1), self.wake.clone());
                g.update(settings, &Qos { paused: true, ..Qos::default() });
                g
            })
            .clone()
    }

    /// The global retry policy (`[deliver]`).
    pub fn retry_policy(&self) -> sluice_core::config::RetryPolicy {
        self.defaults.retry_policy()
    }
}

/// The control database in the `deliver.jobdb_url` database (MySQL/MariaDB
/// or PostgreSQL), shared by every process that uses that database: the
/// tables of the SQLite file, named `sluice_control_<table>`
/// (`sluice_control_destination_qos`, …), with the same columns.
///
/// Invariants:
/// - The DDL is idempotent (`CREATE TABLE IF NOT EXISTS`) and runs under the
///   schema lock, as the JobDBs' does (`CreateSchema`: PostgreSQL advisory
///   lock, MySQL `GET_LOCK`; retried if a race is lost anyway), so processes
///   that start at once all succeed.
/// - Seeding, and creating a source through the API (id and write key
///   checked, then inserted), hold a lock that serializes them between
///   processes (MySQL `GET_LOCK('sluice_control.<database>')`, PostgreSQL
///   `pg_advisory_xact_lock`), inside one transaction; the inserts only add
///   missing rows (`ON DUPLICATE KEY UPDATE id = id` / `ON CONFLICT DO
///   NOTHING`), so a second seed changes nothing and duplicates nothing.
///   With different config files the last process to start wins.
/// - Replays: a pending replay is claimed (`claimed_by`) by the first
///   process whose route asks for unfinished replays, so one process runs
///   it. The claimant is `data_dir/control.owner` (a random id made once):
///   a process restarted on the same data_dir resumes its running replays;
///   one whose data_dir is lost leaves them `running` (file it again).
/// - One connection on a current-thread runtime of its own (as a JobDB's);
///   methods block. After any error the connection is dropped (an open
///   transaction with it) and the next call connects again.
pub mod sql {
    use std::collections::HashSet;
    use std::path::Path;
    use std::sync::Mutex;

    use rand::Rng;
    use sluice_core::config::{DestinationConfig, SourceConfig};
    use sluice_core::Config;

    use super::{
        dead_letter_columns, BoundedDeadLetter, CatalogSnapshot, DeadLetter, DeadLetterCounts, DeadLetterInsert, DeadLetterLimits, Replay,
        DEAD_LETTER_COUNTS, DEAD_LETTER_FINISH, DEAD_LETTER_PRUNE, DEAD_LETTER_USAGE,
    };
    use crate::gate::Qos;
    use crate::sqljobdb::{numbered, on_conn, Conn, CreateSchema, Session, SqlEngine, SqlJobDbs, SqlRow};
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
        ["sources", "destinations", "connections", "destination_qos", "api_deletions", "replays", "dead_letters"]
            .map(|t| format!("{TABLE_PREFIX}{t}"))
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
        session: Mutex<Option<Session>>,
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
            let db = SqlControl { dbs, session: Mutex::new(None), owner };
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
                    &format!("INSERT INTO {TABLE_PREFIX}{table} ({columns}) VALUES ({values}) ON CONFLICT ({conflict}) DO NOTHING")
                        .replace('`', "\""),
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
            let mut guard = self.session.lock().expect("control session lock");
            let guard = &mut *guard;
            off_runtime(move || {
                if guard.is_none() {
                    *guard = Some(self.dbs.connect()?);
                }
                let session = guard.as_mut().expect("a session");
                match f(session) {
                    Ok(v) => Ok(v),
                    Err(source) => {
                        *guard = None;
                        Err(DeliverError::Sql { jobdb: format!("{} (control database: {what})", self.dbs.display()), source })
                    }
                }
            })
        }

        /// Run `body` in a transaction holding the control write lock.
        fn locked<T: Send>(
            &self,
            what: &str,
            body: impl FnOnce(&SqlControl, &mut Session) -> Result<T, sqlx::Error> + Send,
        ) -> Result<T, DeliverError> {
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

        pub(super) fn insert_dead_letters(
            &self,
            letters: &[BoundedDeadLetter<'_>],
            limits: &DeadLetterLimits,
        ) -> Result<DeadLetterInsert, DeliverError> {
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

    /// Run `f` here, or on a scoped thread when this thread is inside a
    /// tokio runtime (the session's own runtime cannot block there: tests
    /// and benchmarks open the Catalog from async code).
    fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
        if tokio::runtime::Handle::try_current().is_err() {
            return f();
        }
        std::thread::scope(|scope| match scope.spawn(f).join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        })
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
}
