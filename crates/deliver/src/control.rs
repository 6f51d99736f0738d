//! The control database (`data_dir/control.sqlite`): destinations,
//! connections, `destination_qos` and replay requests. The config file seeds
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

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS sources (
    id       TEXT PRIMARY KEY,
    config   TEXT NOT NULL,               -- {"id","write_key","rate_limit","rate_burst"} as JSON
    disabled INTEGER NOT NULL DEFAULT 0,
    origin   TEXT NOT NULL DEFAULT 'config'
);
CREATE TABLE IF NOT EXISTS destinations (
    id     TEXT PRIMARY KEY,
    config TEXT NOT NULL,               -- the destination's settings as JSON (docs/CONFIG.md keys)
    origin TEXT NOT NULL DEFAULT 'config'
);
CREATE TABLE IF NOT EXISTS connections (
    source      TEXT NOT NULL,
    destination TEXT NOT NULL,
    origin      TEXT NOT NULL DEFAULT 'config',
    PRIMARY KEY (source, destination)
);
CREATE TABLE IF NOT EXISTS destination_qos (
    destination   TEXT PRIMARY KEY,
    paused        INTEGER NOT NULL DEFAULT 0,
    max_in_flight INTEGER,              -- NULL: the destination's configured value
    rate_per_sec  INTEGER,              -- NULL: the destination's configured value; 0 = unlimited
    priority      INTEGER NOT NULL DEFAULT 1   -- 1-100: requests per round-robin turn
);
CREATE TABLE IF NOT EXISTS api_deletions (   -- config rows the admin API deleted: not seeded again
    kind TEXT NOT NULL,                          -- 'destination' or 'connection'
    key  TEXT NOT NULL,                          -- destination id, or '<source>/<destination>'
    PRIMARY KEY (kind, key)
);
CREATE TABLE IF NOT EXISTS replays (
    id           INTEGER PRIMARY KEY,
    destination  TEXT NOT NULL,
    since_ms     INTEGER NOT NULL,
    requested_at INTEGER NOT NULL,
    state        TEXT NOT NULL DEFAULT 'pending',   -- pending, running, done, failed
    events       INTEGER NOT NULL DEFAULT 0,        -- output records read
    jobs         INTEGER NOT NULL DEFAULT 0,        -- jobs made
    error        TEXT,
    finished_at  INTEGER
);
"#;

pub fn control_path(data_dir: &Path) -> PathBuf {
    data_dir.join("control.sqlite")
}

fn err(path: &Path) -> impl Fn(rusqlite::Error) -> DeliverError + '_ {
    move |source| DeliverError::Sqlite { path: path.display().to_string(), source }
}

/// A connection to the control database.
pub struct ControlDb {
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

impl ControlDb {
    pub fn open(path: &Path) -> Result<ControlDb, DeliverError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| DeliverError::Io { path: dir.display().to_string(), source })?;
        }
        let e = err(path);
        let conn = Connection::open(path).map_err(&e)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(&e)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(&e)?;
        conn.execute_batch(SCHEMA).map_err(&e)?;
        Ok(ControlDb { path: path.to_owned(), conn })
    }

    /// Replace the config-seeded destinations and connections with `config`'s.
    pub fn seed(&mut self, config: &Config) -> Result<(), DeliverError> {
        let e = err(&self.path);
        let tx = self.conn.transaction().map_err(&e)?;
        tx.execute("DELETE FROM sources WHERE origin = 'config'", []).map_err(&e)?;
        tx.execute("DELETE FROM destinations WHERE origin = 'config'", []).map_err(&e)?;
        tx.execute("DELETE FROM connections WHERE origin = 'config'", []).map_err(&e)?;
        for src in &config.sources {
            let json = serde_json::to_string(src).expect("a source serializes");
            tx.execute("INSERT OR IGNORE INTO sources (id, config, origin) VALUES (?1, ?2, 'config')", params![src.id, json])
                .map_err(&e)?;
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
    pub fn read(&self) -> Result<CatalogSnapshot, DeliverError> {
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
        let mut stmt = self
            .conn
            .prepare_cached("SELECT destination, paused, max_in_flight, rate_per_sec, priority FROM destination_qos")
            .map_err(&e)?;
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
    pub fn insert_source(&self, src: &SourceConfig) -> Result<bool, DeliverError> {
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
    pub fn put_source(&self, src: &SourceConfig) -> Result<(), DeliverError> {
        self.put_api_row("sources", &src.id, src)
    }

    /// Enable or disable a source; false when there is no such source.
    pub fn set_source_disabled(&self, id: &str, disabled: bool) -> Result<bool, DeliverError> {
        self.conn
            .execute("UPDATE sources SET disabled = ?2, origin = 'api' WHERE id = ?1", params![id, disabled as i64])
            .map(|n| n == 1)
            .map_err(err(&self.path))
    }

    /// Create or replace a destination (and its QoS row if new).
    pub fn put_destination(&self, d: &DestinationConfig) -> Result<(), DeliverError> {
        let e = err(&self.path);
        self.put_api_row("destinations", &d.id, d)?;
        self.conn.execute("INSERT OR IGNORE INTO destination_qos (destination) VALUES (?1)", [&d.id]).map_err(&e)?;
        self.conn.execute("DELETE FROM api_deletions WHERE kind = 'destination' AND key = ?1", [&d.id]).map_err(&e)?;
        Ok(())
    }

    /// Delete a destination and its connections; false when there is none.
    pub fn delete_destination(&self, id: &str) -> Result<bool, DeliverError> {
        let e = err(&self.path);
        let n = self.conn.execute("DELETE FROM destinations WHERE id = ?1", [id]).map_err(&e)?;
        self.conn.execute("DELETE FROM connections WHERE destination = ?1", [id]).map_err(&e)?;
        if n == 1 {
            self.conn.execute("INSERT OR IGNORE INTO api_deletions (kind, key) VALUES ('destination', ?1)", [id]).map_err(&e)?;
        }
        Ok(n == 1)
    }

    pub fn put_connection(&self, source: &str, destination: &str) -> Result<(), DeliverError> {
        let e = err(&self.path);
        self.conn
            .execute(
                "INSERT INTO connections (source, destination, origin) VALUES (?1, ?2, 'api')
                 ON CONFLICT (source, destination) DO UPDATE SET origin = 'api'",
                params![source, destination],
            )
            .map_err(&e)?;
        self.conn
            .execute("DELETE FROM api_deletions WHERE kind = 'connection' AND key = ?1", [format!("{source}/{destination}")])
            .map_err(&e)?;
        Ok(())
    }

    /// Delete a connection; the config will not bring it back. False when there is none.
    pub fn delete_connection(&self, source: &str, destination: &str) -> Result<bool, DeliverError> {
        let e = err(&self.path);
        let n = self
            .conn
            .execute("DELETE FROM connections WHERE source = ?1 AND destination = ?2", params![source, destination])
            .map_err(&e)?;
        if n == 1 {
            self.conn
                .execute("INSERT OR IGNORE INTO api_deletions (kind, key) VALUES ('connection', ?1)", [format!("{source}/{destination}")])
                .map_err(&e)?;
        }
        Ok(n == 1)
    }

    /// Set the QoS of a destination (every column; `None` = the configured value).
    pub fn put_qos(&self, destination: &str, q: &Qos) -> Result<(), DeliverError> {
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

    pub fn request_replay(&self, destination: &str, since_ms: i64) -> Result<i64, DeliverError> {
        self.conn
            .execute(
                "INSERT INTO replays (destination, since_ms, requested_at) VALUES (?1, ?2, ?3)",
                params![destination, since_ms, crate::now_ms()],
            )
            .map_err(err(&self.path))?;
        Ok(self.conn.last_insert_rowid())
    }

    pub fn replay(&self, id: i64) -> Result<Option<Replay>, DeliverError> {
        self.conn
            .query_row(
                "SELECT id, destination, since_ms, state, events, jobs, error FROM replays WHERE id = ?1",
                [id],
                row_to_replay,
            )
            .optional()
            .map_err(err(&self.path))
    }

    /// Replays not finished (pending, or running when the process stopped).
    pub fn unfinished_replays(&self) -> Result<Vec<Replay>, DeliverError> {
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

    pub fn update_replay(&self, id: i64, state: &str, events: i64, jobs: i64, error: Option<&str>) -> Result<(), DeliverError> {
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

fn row_to_replay(r: &rusqlite::Row<'_>) -> rusqlite::Result<Replay> {
    Ok(Replay {
        id: r.get(0)?,
        destination: r.get(1)?,
        since_ms: r.get(2)?,
        state: r.get(3)?,
        events: r.get(4)?,
        jobs: r.get(5)?,
        error: r.get(6)?,
    })
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
        let mut control = ControlDb::open(&control_path(&config.server.data_dir))?;
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
                            self.defaults.circuit_failures,
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
            max_in_flight: d.max_in_flight.unwrap_or(self.defaults.max_in_flight),
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
