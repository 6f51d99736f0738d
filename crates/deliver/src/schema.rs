//! Every table family Sluice's delivery stage keeps in SQL — a JobDB
//! (`jobs`, `job_state_transitions`), the registry of a scope's JobDBs, the
//! control tables, the directory of directors — written here once, as data
//! ([`Table`]), and rendered for each engine by [`Dialect`] (`sluice-sql`).
//!
//! Invariants:
//! - Rendering is `CREATE … IF NOT EXISTS`: an existing table is never
//!   changed, so a rendering must stay compatible with the tables earlier
//!   versions made (the unit tests below pin the SQLite JobDB, whose files
//!   outlive an upgrade).
//! - PostgreSQL's triggers call `sluice_refuse_change()`: [`server_jobdb`]
//!   renders it before the tables, in the same schema transaction.

pub use sluice_sql::dialect::{col, null, with_default, AppendOnly, Column, Dialect, Engines, Index, Table, Type, SERVERS, SQLITE};

/// Bound of an id (a source, a destination) in a key.
const ID: Type = Type::Key(255);

/// A JobDB's jobs: immutable rows, one per (event, destination, generation).
/// SQLite enforces idempotency with a unique index over the three columns,
/// which also serves lookups by messageId; the servers cannot index text of
/// any length, so they keep a SHA-256 of the three (`idempotency_key`,
/// unique) and a lookup index on `message_id` (MySQL: its first 191
/// characters; PostgreSQL: a hash index).
pub const JOBS: Table = Table {
    columns: &[
        col("id", Type::FixedBytes(20)), // KSUID, time-ordered
        Column { only: Some(SERVERS), ..col("idempotency_key", Type::FixedBytes(32)) },
        col("message_id", Type::Text),
        col("source", Type::Text),
        col("destination", Type::Text),
        col("generation", Type::Int),  // 0, or the replay that made the job
        col("endpoint", Type::Text),   // the URL at the time the job was made
        col("payload", Type::Bytes),   // the JSON body sent
        col("created_at", Type::Int),  // unix ms; the awaiting_scheduling state
        col("expires_at", Type::Int),  // unix ms; archived after this
        col("received_at", Type::Int), // unix ms ingest accepted the event
    ],
    primary_key: &["id"],
    indexes: &[
        Index { suffix: "idempotency", columns: &["message_id", "destination", "generation"], unique: true, only: Some(SQLITE) },
        Index { suffix: "idempotency", columns: &["idempotency_key"], unique: true, only: Some(SERVERS) },
        Index { suffix: "by_message_id", columns: &["message_id"], unique: false, only: Some(SERVERS) },
    ],
    append_only: Some(AppendOnly {
        sqlite_trigger_stem: "jobs_immutable",
        on_update: "jobs rows are immutable",
        on_delete: "jobs rows are immutable; drop the JobDB instead",
    }),
    without_rowid: true,
};

/// A JobDB's state transitions: append-only; a job's state is its row with the highest `seq`.
pub const TRANSITIONS: Table = Table {
    columns: &[
        col("job_id", Type::FixedBytes(20)),
        col("seq", Type::Int), // 1, 2, ... per job
        col("state", Type::Key(32)),
        col("at", Type::Int),      // unix ms
        col("attempt", Type::Int), // HTTP attempts so far
        null("status", Type::Int32),
        null("error", Type::Text), // error or response body excerpt
        null("retry_at", Type::Int),
    ],
    primary_key: &["job_id", "seq"],
    indexes: &[],
    append_only: Some(AppendOnly {
        sqlite_trigger_stem: "transitions_append_only",
        on_update: "job_state_transitions is append-only",
        on_delete: "job_state_transitions is append-only",
    }),
    without_rowid: true,
};

/// An SQLite JobDB file's own facts (`created_at`): the servers keep them in the registry.
pub const JOBDB_META: Table = Table {
    columns: &[col("key", Type::Key(64)), col("value", Type::Text)],
    primary_key: &["key"],
    indexes: &[],
    append_only: None,
    without_rowid: false,
};

/// The registry of a scope's JobDBs in a database server: one row per live JobDB.
pub const JOBDB_REGISTRY: Table = Table {
    columns: &[col("seq", Type::Int), col("created_at", Type::Int)],
    primary_key: &["seq"],
    indexes: &[],
    append_only: None,
    without_rowid: false,
};

/// The control tables (`control/`), in creation order: `(name, table)`;
/// the servers' names carry the prefix `sluice_control_`.
pub const CONTROL: [(&str, Table); 10] = [
    (
        "sources",
        Table {
            columns: &[
                col("id", ID),
                col("config", Type::Text), // {"id","write_key","rate_limit","rate_burst"} as JSON
                with_default("disabled", Type::Int, "0"),
                with_default("origin", Type::Key(16), "'config'"), // 'config' or 'api'
            ],
            primary_key: &["id"],
            indexes: &[],
            append_only: None,
            without_rowid: false,
        },
    ),
    (
        "destinations",
        Table {
            columns: &[
                col("id", ID),
                col("config", Type::Text), // the destination's settings as JSON (docs/CONFIG.md keys)
                with_default("origin", Type::Key(16), "'config'"),
            ],
            primary_key: &["id"],
            indexes: &[],
            append_only: None,
            without_rowid: false,
        },
    ),
    (
        "connections",
        Table {
            columns: &[col("source", ID), col("destination", ID), with_default("origin", Type::Key(16), "'config'")],
            primary_key: &["source", "destination"],
            indexes: &[],
            append_only: None,
            without_rowid: false,
        },
    ),
    (
        "destination_qos",
        Table {
            columns: &[
                col("destination", ID),
                with_default("paused", Type::Int, "0"),
                null("max_in_flight", Type::Int),         // NULL: the destination's configured value
                null("rate_per_sec", Type::Int),          // NULL: the configured value; 0 = unlimited
                with_default("priority", Type::Int, "1"), // 1-100: requests per round-robin turn
            ],
            primary_key: &["destination"],
            indexes: &[],
            append_only: None,
            without_rowid: false,
        },
    ),
    (
        // A source's tracking plan (sluice-transform's `PlanDoc` as JSON); `version` counts its edits.
        "tracking_plans",
        Table {
            columns: &[col("source", ID), col("plan", Type::Text), col("version", Type::Int), col("updated_at", Type::Int)],
            primary_key: &["source"],
            indexes: &[],
            append_only: None,
            without_rowid: false,
        },
    ),
    (
        // Functions' code, one row per deployed version (rows are never changed:
        // a deploy adds a version; deleting a function deletes its rows).
        "functions",
        Table {
            columns: &[col("id", ID), col("version", Type::Int), col("code", Type::Text), col("created_at", Type::Int)],
            primary_key: &["id", "version"],
            indexes: &[],
            append_only: None,
            without_rowid: false,
        },
    ),
    (
        // The version of each function that runs (a deploy or a restore sets it).
        "function_live",
        Table {
            columns: &[col("id", ID), col("version", Type::Int), col("updated_at", Type::Int)],
            primary_key: &["id"],
            indexes: &[],
            append_only: None,
            without_rowid: false,
        },
    ),
    (
        // Config rows the admin API deleted: not seeded again.
        "api_deletions",
        Table {
            columns: &[
                col("kind", Type::Key(16)), // 'destination' or 'connection'
                col("key", Type::Key(520)), // a destination id, or '<source>/<destination>'
            ],
            primary_key: &["kind", "key"],
            indexes: &[],
            append_only: None,
            without_rowid: false,
        },
    ),
    (
        "replays",
        Table {
            columns: &[
                col("id", Type::AutoId),
                col("destination", ID),
                col("since_ms", Type::Int),
                col("requested_at", Type::Int),
                with_default("state", Type::Key(16), "'pending'"), // pending, running, done, failed
                with_default("events", Type::Int, "0"),            // output records read
                with_default("jobs", Type::Int, "0"),              // jobs made
                null("error", Type::Text),
                null("finished_at", Type::Int),
                // The process running it (several share a server's tables; SQLite has one).
                Column { only: Some(SERVERS), ..null("claimed_by", Type::Key(64)) },
            ],
            primary_key: &[],
            indexes: &[],
            append_only: None,
            without_rowid: false,
        },
    ),
    (
        // Records a stage could not handle (`DeadLetter`).
        "dead_letters",
        Table {
            columns: &[
                col("id", Type::AutoId), // never reused
                col("created_at_ms", Type::Int),
                col("stage", Type::Key(16)), // 'route' or 'replay'
                col("topic", ID),
                col("log_partition", Type::Int),
                col("log_offset", Type::Int),
                with_default("generation", Type::Int, "0"), // 0: the route; a replay's id
                null("destination", ID),                    // a replay's destination; NULL: every connected one
                col("record_ms", Type::Int),                // the record's log time
                col("record_key", Type::Bytes),
                col("payload", Type::Bytes),
                col("payload_size", Type::Int), // the record value's size (payload may be cut: truncated)
                with_default("truncated", Type::Int, "0"),
                col("stored_bytes", Type::Int), // key + payload as stored (the store's byte cap)
                col("reason", Type::Text),
                null("replay_requested_at_ms", Type::Int),
                null("replayed_at_ms", Type::Int),
                null("replayed_jobs", Type::Int),
                null("discarded_at_ms", Type::Int),
                with_default("attempts", Type::Int, "0"),
                null("last_error", Type::Text),
                null("claimed_by", Type::Key(64)),
            ],
            primary_key: &[],
            indexes: &[
                Index { suffix: "record", columns: &["topic", "log_partition", "log_offset", "generation"], unique: true, only: None },
                Index { suffix: "open", columns: &["replayed_at_ms", "discarded_at_ms"], unique: false, only: None },
            ],
            append_only: None,
            without_rowid: false,
        },
    ),
];

/// The directory of directors (`directory.rs`): one row per named director.
pub const DIRECTORS: Table = Table {
    columns: &[col("name", Type::Key(128)), col("rpc_url", Type::Key(512)), col("heartbeat_ms", Type::Int)],
    primary_key: &["name"],
    indexes: &[],
    append_only: None,
    without_rowid: false,
};

/// A JobDB file's statements (SQLite): its tables, index and triggers, one batch.
pub fn sqlite_jobdb() -> String {
    let d = Dialect::Sqlite;
    [d.create_table("jobs", &JOBS), d.create_table("job_state_transitions", &TRANSITIONS), d.create_table("jobdb_meta", &JOBDB_META)]
        .concat()
        .join(";\n")
}

/// A JobDB's tables `jobs` and `transitions` in a database server (run under
/// the schema lock: PostgreSQL's function and triggers are replaced).
pub fn server_jobdb(dialect: Dialect, jobs: &str, transitions: &str) -> Vec<String> {
    let mut ddl: Vec<String> = dialect.refuse_function().into_iter().collect();
    ddl.extend(dialect.create_table(jobs, &JOBS));
    ddl.extend(dialect.create_table(transitions, &TRANSITIONS));
    ddl
}

/// The control tables, their names prefixed with `prefix`.
pub fn control(dialect: Dialect, prefix: &str) -> Vec<String> {
    CONTROL.iter().flat_map(|(name, table)| dialect.create_table(&format!("{prefix}{name}"), table)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SQLite JobDB schema as written by hand up to 2026-12 (files made then are still read).
    const EARLIER_SQLITE_JOBDB: &str = r#"
CREATE TABLE IF NOT EXISTS jobs (
    id          BLOB    PRIMARY KEY,   -- KSUID (20 bytes), time-ordered
    message_id  TEXT    NOT NULL,
    source      TEXT    NOT NULL,
    destination TEXT    NOT NULL,
    generation  INTEGER NOT NULL,      -- 0, or the replay that made the job
    endpoint    TEXT    NOT NULL,      -- the URL at the time the job was made
    payload     BLOB    NOT NULL,      -- the JSON body sent
    created_at  INTEGER NOT NULL,      -- unix ms; the awaiting_scheduling state
    expires_at  INTEGER NOT NULL,      -- unix ms; archived after this
    received_at INTEGER NOT NULL       -- unix ms ingest accepted the event (end-to-end latency)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency ON jobs (message_id, destination, generation);
CREATE TABLE IF NOT EXISTS job_state_transitions (
    job_id   BLOB    NOT NULL,
    seq      INTEGER NOT NULL,         -- 1, 2, ... per job
    state    TEXT    NOT NULL,
    at       INTEGER NOT NULL,         -- unix ms
    attempt  INTEGER NOT NULL,         -- HTTP attempts so far
    status   INTEGER,                  -- HTTP status of the attempt, if any
    error    TEXT,                     -- error or response body excerpt
    retry_at INTEGER,                  -- unix ms, for awaiting_retry
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS jobdb_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TRIGGER IF NOT EXISTS jobs_immutable_update BEFORE UPDATE ON jobs
    BEGIN SELECT RAISE(ABORT, 'jobs rows are immutable'); END;
CREATE TRIGGER IF NOT EXISTS jobs_immutable_delete BEFORE DELETE ON jobs
    BEGIN SELECT RAISE(ABORT, 'jobs rows are immutable; drop the JobDB instead'); END;
CREATE TRIGGER IF NOT EXISTS transitions_append_only_update BEFORE UPDATE ON job_state_transitions
    BEGIN SELECT RAISE(ABORT, 'job_state_transitions is append-only'); END;
CREATE TRIGGER IF NOT EXISTS transitions_append_only_delete BEFORE DELETE ON job_state_transitions
    BEGIN SELECT RAISE(ABORT, 'job_state_transitions is append-only'); END;
"#;

    /// The SQLite JobDB as rendered is the JobDB of every earlier version:
    /// the same columns, keys, index and triggers (files outlive upgrades).
    #[test]
    fn the_sqlite_jobdb_rendering_matches_the_files_earlier_versions_made() {
        let rendered = rusqlite::Connection::open_in_memory().unwrap();
        rendered.execute_batch(&sqlite_jobdb()).unwrap();
        let earlier = rusqlite::Connection::open_in_memory().unwrap();
        earlier.execute_batch(EARLIER_SQLITE_JOBDB).unwrap();
        let shape = |c: &rusqlite::Connection| {
            let mut out = Vec::new();
            for table in ["jobs", "job_state_transitions", "jobdb_meta"] {
                let mut s = c.prepare(&format!("SELECT name, type, \"notnull\", pk FROM pragma_table_info('{table}') ORDER BY cid")).unwrap();
                let cols: Vec<String> = s
                    // (NOT NULL of a primary-key column is implied in a WITHOUT ROWID table, declared or not.)
                    .query_map([], |r| {
                        let pk = r.get::<_, i64>(3)?;
                        let not_null = r.get::<_, i64>(2)? == 1 || pk > 0;
                        Ok(format!("{}:{}:{not_null}:{pk}", r.get::<_, String>(0)?, r.get::<_, String>(1)?))
                    })
                    .unwrap()
                    .map(Result::unwrap)
                    .collect();
                out.push(format!("{table}: {}", cols.join(" ")));
                let mut s = c.prepare(&format!("SELECT \"unique\", (SELECT group_concat(name) FROM pragma_index_info(il.name)) FROM pragma_index_list('{table}') il WHERE origin = 'c'")).unwrap();
                let idx: Vec<String> =
                    s.query_map([], |r| Ok(format!("{}:{}", r.get::<_, i64>(0)?, r.get::<_, String>(1)?))).unwrap().map(Result::unwrap).collect();
                out.push(format!("{table} indexes: {idx:?}"));
            }
            let mut s = c.prepare("SELECT name, tbl_name FROM sqlite_master WHERE type = 'trigger' ORDER BY name").unwrap();
            let triggers: Vec<String> =
                s.query_map([], |r| Ok(format!("{}@{}", r.get::<_, String>(0)?, r.get::<_, String>(1)?))).unwrap().map(Result::unwrap).collect();
            out.push(format!("triggers: {triggers:?}"));
            let mut s = c.prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND sql LIKE '%WITHOUT ROWID%' ORDER BY name").unwrap();
            let without_rowid: Vec<String> = s.query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect();
            out.push(format!("without rowid: {without_rowid:?}"));
            out
        };
        assert_eq!(shape(&rendered), shape(&earlier));
    }

    #[test]
    fn every_family_renders_to_sqlite_that_sqlite_runs() {
        let c = rusqlite::Connection::open_in_memory().unwrap();
        let mut tables = vec![("jobs", JOBS), ("job_state_transitions", TRANSITIONS), ("jobdb_meta", JOBDB_META), ("sluice_directors", DIRECTORS)];
        tables.extend(CONTROL);
        for (name, table) in tables {
            for sql in Dialect::Sqlite.create_table(name, &table) {
                c.execute_batch(&sql).unwrap_or_else(|e| panic!("{e}: {sql}"));
                c.execute_batch(&sql).unwrap_or_else(|e| panic!("not idempotent: {e}: {sql}"));
            }
        }
    }

    #[test]
    fn append_only_tables_refuse_update_and_delete_in_sqlite() {
        let c = rusqlite::Connection::open_in_memory().unwrap();
        for sql in Dialect::Sqlite.create_table("job_state_transitions", &TRANSITIONS) {
            c.execute_batch(&sql).unwrap();
        }
        c.execute("INSERT INTO job_state_transitions (job_id, seq, state, at, attempt) VALUES (x'00', 1, 'executing', 0, 1)", []).unwrap();
        for change in ["UPDATE job_state_transitions SET at = 1", "DELETE FROM job_state_transitions"] {
            let e = c.execute(change, []).unwrap_err().to_string();
            assert!(e.contains("append-only"), "{change}: {e}");
        }
    }

    #[test]
    fn each_engine_gets_its_own_types_keys_and_triggers() {
        let my = Dialect::MySql.create_table("jobs_000001", &JOBS);
        assert!(my[0].contains("`idempotency_key` BINARY(32) NOT NULL"), "{}", my[0]);
        assert!(
            my[0].contains("UNIQUE KEY `idempotency` (`idempotency_key`)") && my[0].contains("KEY `by_message_id` (`message_id`(191))"),
            "{}",
            my[0]
        );
        assert!(my[0].ends_with("utf8mb4_bin"), "{}", my[0]);
        assert_eq!(my.iter().filter(|s| s.contains("SIGNAL SQLSTATE '45000'")).count(), 2);
        let pg = Dialect::Postgres.create_table("jobs_000001", &JOBS);
        assert!(pg[0].contains("\"payload\" BYTEA NOT NULL") && pg[0].contains("UNIQUE (\"idempotency_key\")"), "{}", pg[0]);
        assert!(pg.iter().any(|s| s.contains("USING hash (\"message_id\")")), "{pg:?}");
        assert!(pg.iter().any(|s| s.contains("BEFORE TRUNCATE")), "{pg:?}");
        let lite = Dialect::Sqlite.create_table("jobs", &JOBS);
        assert!(!lite[0].contains("idempotency_key") && lite[0].ends_with("WITHOUT ROWID"), "{}", lite[0]);
    }
}
