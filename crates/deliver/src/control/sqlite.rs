//! The control database in `data_dir/control.sqlite` (see [`super`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};
use sluice_core::config::{DestinationConfig, SourceConfig};
use sluice_core::Config;

use super::{
    dead_letter_columns, BoundedDeadLetter, CatalogSnapshot, DeadLetter, DeadLetterCounts, DeadLetterInsert, DeadLetterLimits, Replay,
    DEAD_LETTER_COUNTS, DEAD_LETTER_FINISH, DEAD_LETTER_PRUNE, DEAD_LETTER_USAGE,
};
use crate::gate::Qos;
use crate::DeliverError;

/// The control database in `data_dir/control.sqlite`.
pub(super) struct SqliteControl {
    pub(super) path: PathBuf,
    conn: Connection,
}

fn err(path: &Path) -> impl Fn(rusqlite::Error) -> DeliverError + '_ {
    move |source| DeliverError::Sqlite { path: path.display().to_string(), source }
}

impl SqliteControl {
    pub(super) fn open(path: &Path) -> Result<SqliteControl, DeliverError> {
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
    pub(super) fn seed(&mut self, config: &Config) -> Result<(), DeliverError> {
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
    pub(super) fn read(&self) -> Result<CatalogSnapshot, DeliverError> {
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
    pub(super) fn insert_source(&self, src: &SourceConfig) -> Result<bool, DeliverError> {
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
    pub(super) fn put_source(&self, src: &SourceConfig) -> Result<(), DeliverError> {
        self.put_api_row("sources", &src.id, src)
    }

    /// Enable or disable a source; false when there is no such source.
    pub(super) fn set_source_disabled(&self, id: &str, disabled: bool) -> Result<bool, DeliverError> {
        self.conn
            .execute("UPDATE sources SET disabled = ?2, origin = 'api' WHERE id = ?1", params![id, disabled as i64])
            .map(|n| n == 1)
            .map_err(err(&self.path))
    }

    /// Create or replace a destination (and its QoS row if new).
    pub(super) fn put_destination(&self, d: &DestinationConfig) -> Result<(), DeliverError> {
        let e = err(&self.path);
        self.put_api_row("destinations", &d.id, d)?;
        self.conn.execute("INSERT OR IGNORE INTO destination_qos (destination) VALUES (?1)", [&d.id]).map_err(&e)?;
        self.conn.execute("DELETE FROM api_deletions WHERE kind = 'destination' AND key = ?1", [&d.id]).map_err(&e)?;
        Ok(())
    }

    /// Delete a destination and its connections; false when there is none.
    pub(super) fn delete_destination(&self, id: &str) -> Result<bool, DeliverError> {
        let e = err(&self.path);
        let n = self.conn.execute("DELETE FROM destinations WHERE id = ?1", [id]).map_err(&e)?;
        self.conn.execute("DELETE FROM connections WHERE destination = ?1", [id]).map_err(&e)?;
        if n == 1 {
            self.conn.execute("INSERT OR IGNORE INTO api_deletions (kind, key) VALUES ('destination', ?1)", [id]).map_err(&e)?;
        }
        Ok(n == 1)
    }

    pub(super) fn put_connection(&self, source: &str, destination: &str) -> Result<(), DeliverError> {
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
    pub(super) fn delete_connection(&self, source: &str, destination: &str) -> Result<bool, DeliverError> {
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
    pub(super) fn put_qos(&self, destination: &str, q: &Qos) -> Result<(), DeliverError> {
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

    pub(super) fn request_replay(&self, destination: &str, since_ms: i64) -> Result<i64, DeliverError> {
        self.conn
            .execute("INSERT INTO replays (destination, since_ms, requested_at) VALUES (?1, ?2, ?3)", params![destination, since_ms, crate::now_ms()])
            .map_err(err(&self.path))?;
        Ok(self.conn.last_insert_rowid())
    }

    pub(super) fn replay(&self, id: i64) -> Result<Option<Replay>, DeliverError> {
        self.conn
            .query_row("SELECT id, destination, since_ms, state, events, jobs, error FROM replays WHERE id = ?1", [id], row_to_replay)
            .optional()
            .map_err(err(&self.path))
    }

    /// Replays not finished (pending, or running when the process stopped).
    pub(super) fn unfinished_replays(&self) -> Result<Vec<Replay>, DeliverError> {
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

    pub(super) fn update_replay(&self, id: i64, state: &str, events: i64, jobs: i64, error: Option<&str>) -> Result<(), DeliverError> {
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

/// The dead-letter store in `control.sqlite` (see [`DeadLetter`]). One
/// process writes `data_dir` at a time (`sluice serve`'s lock), so replays
/// are not claimed here.
impl SqliteControl {
    pub(super) fn insert_dead_letters(&self, letters: &[BoundedDeadLetter<'_>], limits: &DeadLetterLimits) -> Result<DeadLetterInsert, DeliverError> {
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

    pub(super) fn dead_letters(&self, before: i64, limit: usize) -> Result<Vec<DeadLetter>, DeliverError> {
        let e = err(&self.path);
        let sql = format!("SELECT {} FROM dead_letters WHERE id < ?1 ORDER BY id DESC LIMIT {limit}", dead_letter_columns(true));
        let mut stmt = self.conn.prepare_cached(&sql).map_err(&e)?;
        let rows = stmt.query_map([before], sqlite_dead_letter).map_err(&e)?.collect::<Result<Vec<_>, _>>().map_err(&e)?;
        Ok(rows)
    }

    pub(super) fn dead_letter(&self, id: i64) -> Result<Option<DeadLetter>, DeliverError> {
        let sql = format!("SELECT {} FROM dead_letters WHERE id = ?1", dead_letter_columns(false));
        self.conn.query_row(&sql, [id], sqlite_dead_letter).optional().map_err(err(&self.path))
    }

    pub(super) fn dead_letter_counts(&self) -> Result<DeadLetterCounts, DeliverError> {
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
    pub(super) fn mark_dead_letters(&self, set: &str, id: Option<i64>) -> Result<u64, DeliverError> {
        let open = "replayed_at_ms IS NULL AND discarded_at_ms IS NULL";
        let now = crate::now_ms();
        let n = match id {
            Some(id) => self.conn.execute(&format!("UPDATE dead_letters SET {set} WHERE {open} AND id = ?"), params![now, id]),
            None => self.conn.execute(&format!("UPDATE dead_letters SET {set} WHERE {open}"), params![now]),
        };
        n.map(|n| n as u64).map_err(err(&self.path))
    }

    pub(super) fn claim_dead_letter_replays(&self, limit: usize) -> Result<Vec<DeadLetter>, DeliverError> {
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

    pub(super) fn finish_dead_letter_replay(
        &self,
        id: i64,
        replayed: Option<i64>,
        jobs: Option<i64>,
        error: Option<&str>,
    ) -> Result<(), DeliverError> {
        self.conn.execute(&DEAD_LETTER_FINISH.replace("{p}", ""), params![replayed, jobs, error, id]).map(drop).map_err(err(&self.path))
    }
}

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
