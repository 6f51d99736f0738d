//! The control database (`data_dir/control.sqlite`, or with
//! `deliver.jobdb_url` the tables `sluice_control_*` of that database,
//! shared by every process using it: `tables.rs`): sources, destinations,
//! connections, `destination_qos`, sources' tracking plans, replay requests and dead letters
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
//!
//! [`ControlDb`] is the front; `tables.rs` holds its one implementation for
//! the three engines (the SQLite file; MySQL/MariaDB, PostgreSQL);
//! [`Catalog`] (`catalog.rs`) is the in-memory view the rest of the
//! process reads.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use sluice_core::config::{DestinationConfig, SourceConfig};
use sluice_core::Config;

use crate::gate::Qos;
use crate::DeliverError;

mod catalog;
mod tables;

pub use catalog::{Catalog, CatalogSnapshot, FunctionVersion, LiveFunction, StoredPlan};
use tables::Tables;
pub use tables::TABLE_PREFIX;

/// How often directors and the route re-read the control database.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(2);

pub fn control_path(data_dir: &Path) -> PathBuf {
    data_dir.join("control.sqlite")
}

/// A connection to the control database: the SQLite file, or the tables
/// `sluice_control_*` of the `deliver.jobdb_url` database.
pub struct ControlDb {
    tables: Tables,
    /// The dead-letter store's bounds (see [`DeadLetterLimits`]).
    dead_letter_limits: Mutex<DeadLetterLimits>,
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

impl ControlDb {
    /// Open the SQLite control database at `path` (creating it).
    pub fn open(path: &Path) -> Result<ControlDb, DeliverError> {
        Ok(ControlDb { tables: Tables::open_file(path)?, dead_letter_limits: Mutex::new(DeadLetterLimits::default()) })
    }

    /// Open the control tables `sluice_control_*` of the database at `url`
    /// (created if missing); `data_dir` keeps this process's replay claimant
    /// id (`control.owner`). Blocks.
    pub fn open_url(url: &str, data_dir: &Path) -> Result<ControlDb, DeliverError> {
        Ok(ControlDb { tables: Tables::open_server(url, data_dir)?, dead_letter_limits: Mutex::new(DeadLetterLimits::default()) })
    }

    /// Open `config`'s control database: the tables `sluice_control_*` of
    /// the `deliver.jobdb_url` database when it is set (created if missing;
    /// shared by every process using that database), else
    /// `data_dir/control.sqlite`. Blocks.
    pub fn open_for(config: &Config) -> Result<ControlDb, DeliverError> {
        let db = match &config.deliver.jobdb_url {
            Some(url) => ControlDb::open_url(url.as_str(), &config.server.data_dir)?,
            None => ControlDb::open(&control_path(&config.server.data_dir))?,
        };
        // A dead letter keeps what ingest can accept; more is cut (and marked truncated).
        db.dead_letter_limits.lock().expect("limits lock").max_payload = config.ingest.max_event_bytes;
        Ok(db)
    }

    /// Where the control database is (a path, or the URL without password).
    pub fn location(&self) -> String {
        self.tables.location()
    }

    /// Replace the config-seeded sources, destinations and connections with
    /// `config`'s (API rows and API deletions win; QoS rows only created).
    pub fn seed(&mut self, config: &Config) -> Result<(), DeliverError> {
        self.tables.seed(config)
    }

    /// The current sources, destinations, connections and QoS.
    pub fn read(&self) -> Result<CatalogSnapshot, DeliverError> {
        self.tables.read()
    }

    /// Store `source`'s tracking plan (a document the caller has compiled);
    /// its new version.
    pub fn put_plan(&self, source: &str, doc: &serde_json::Value) -> Result<i64, DeliverError> {
        self.tables.put_plan(source, doc)
    }

    /// Remove `source`'s tracking plan; false when it had none.
    pub fn delete_plan(&self, source: &str) -> Result<bool, DeliverError> {
        self.tables.delete_plan(source)
    }

    /// Store `code` as function `id`'s next version and make it the live one; its number.
    pub fn deploy_function(&self, id: &str, code: &str) -> Result<i64, DeliverError> {
        self.tables.deploy_function(id, code)
    }

    /// Make an existing `version` of `id` the live one; false when there is no such version.
    pub fn restore_function(&self, id: &str, version: i64) -> Result<bool, DeliverError> {
        self.tables.restore_function(id, version)
    }

    /// Every version of `id`, oldest first (empty: no such function).
    pub fn function_versions(&self, id: &str) -> Result<Vec<FunctionVersion>, DeliverError> {
        self.tables.function_versions(id)
    }

    /// Delete function `id`, every version; false when there was none.
    pub fn delete_function(&self, id: &str) -> Result<bool, DeliverError> {
        self.tables.delete_function(id)
    }

    /// Create a source; false when its id or write key is taken.
    pub fn insert_source(&self, src: &SourceConfig) -> Result<bool, DeliverError> {
        self.tables.insert_source(src)
    }

    /// Create or replace a source (as the admin API's: the config will not overwrite it).
    pub fn put_source(&self, src: &SourceConfig) -> Result<(), DeliverError> {
        self.tables.put_source(src)
    }

    /// Enable or disable a source; false when there is no such source.
    pub fn set_source_disabled(&self, id: &str, disabled: bool) -> Result<bool, DeliverError> {
        self.tables.set_source_disabled(id, disabled)
    }

    /// Replace the rows a control plane handed this cell (origin `global`);
    /// the rows skipped because the config or the API holds their id, named.
    pub fn replace_global(
        &self,
        sources: &[SourceConfig],
        destinations: &[DestinationConfig],
        connections: &[(String, String)],
    ) -> Result<Vec<String>, DeliverError> {
        self.tables.replace_global(sources, destinations, connections)
    }

    /// Create or replace a destination (and its QoS row if new).
    pub fn put_destination(&self, d: &DestinationConfig) -> Result<(), DeliverError> {
        self.tables.put_destination(d)
    }

    /// Delete a destination and its connections; false when there is none.
    pub fn delete_destination(&self, id: &str) -> Result<bool, DeliverError> {
        self.tables.delete_destination(id)
    }

    pub fn put_connection(&self, source: &str, destination: &str) -> Result<(), DeliverError> {
        self.tables.put_connection(source, destination)
    }

    /// Delete a connection; the config will not bring it back. False when there is none.
    pub fn delete_connection(&self, source: &str, destination: &str) -> Result<bool, DeliverError> {
        self.tables.delete_connection(source, destination)
    }

    /// Set the QoS of a destination (every column; `None` = the configured value).
    pub fn put_qos(&self, destination: &str, q: &Qos) -> Result<(), DeliverError> {
        self.tables.put_qos(destination, q)
    }

    /// File a replay request; its id.
    pub fn request_replay(&self, destination: &str, since_ms: i64) -> Result<i64, DeliverError> {
        self.tables.request_replay(destination, since_ms)
    }

    pub fn replay(&self, id: i64) -> Result<Option<Replay>, DeliverError> {
        self.tables.replay(id)
    }

    /// Replays for this process to run: not finished (pending, or running
    /// when the process stopped). In a shared SQL database each pending
    /// replay is first claimed by one process (the first to ask), and only
    /// that process's replays are returned (see `tables.rs`).
    pub fn unfinished_replays(&self) -> Result<Vec<Replay>, DeliverError> {
        self.tables.unfinished_replays()
    }

    pub fn update_replay(&self, id: i64, state: &str, events: i64, jobs: i64, error: Option<&str>) -> Result<(), DeliverError> {
        self.tables.update_replay(id, state, events, jobs, error)
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
        self.tables.insert_dead_letters(&bounded, &limits)
    }

    /// Up to `limit` dead letters with ids below `before` (all: `None`),
    /// newest first, each with a payload excerpt.
    pub fn dead_letters(&self, before: Option<i64>, limit: usize) -> Result<Vec<DeadLetter>, DeliverError> {
        self.tables.dead_letters(before.unwrap_or(i64::MAX), limit.clamp(1, 1000))
    }

    /// One dead letter, whole.
    pub fn dead_letter(&self, id: i64) -> Result<Option<DeadLetter>, DeliverError> {
        self.tables.dead_letter(id)
    }

    pub fn dead_letter_counts(&self) -> Result<DeadLetterCounts, DeliverError> {
        self.tables.dead_letter_counts()
    }

    /// Ask for dead letter `id` (or every open one: `None`) to be replayed
    /// by the route; the number of rows marked (0: no such open row).
    pub fn request_dead_letter_replay(&self, id: Option<i64>) -> Result<u64, DeliverError> {
        self.tables.mark_dead_letters("replay_requested_at_ms = ?, claimed_by = NULL", id)
    }

    /// Give up on dead letter `id` (or every open one): it stays listed as
    /// discarded until the cap makes room. The number of rows marked.
    pub fn discard_dead_letters(&self, id: Option<i64>) -> Result<u64, DeliverError> {
        self.tables.mark_dead_letters("discarded_at_ms = ?, replay_requested_at_ms = NULL", id)
    }

    /// Dead letters whose replay was requested, for this process to run (up
    /// to `limit`, oldest first, whole). In a shared SQL database each is
    /// first claimed by one process, as replays are.
    pub fn claim_dead_letter_replays(&self, limit: usize) -> Result<Vec<DeadLetter>, DeliverError> {
        self.tables.claim_dead_letter_replays(limit.clamp(1, 1000))
    }

    /// Record a replay's outcome: `Ok(jobs made)` marks it replayed;
    /// `Err(why)` keeps it open with `last_error`.
    pub fn finish_dead_letter_replay(&self, id: i64, outcome: Result<i64, &str>) -> Result<(), DeliverError> {
        let (replayed, jobs, error) = match outcome {
            Ok(jobs) => (Some(crate::now_ms()), Some(jobs), None),
            Err(e) => (None, None, Some(clip(e, DEAD_LETTER_MAX_REASON_CHARS))),
        };
        self.tables.finish_dead_letter_replay(id, replayed, jobs, error.as_deref())
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
