//! The global store's tables, defined once and rendered per engine by
//! `sluice_sql::Dialect`. Names carry the prefix [`PREFIX`] on every engine.

use sluice_sql::dialect::{col, with_default, Index, Table, Type};
use sluice_sql::Dialect;

/// Prefix of the global store's table names.
pub const PREFIX: &str = "sluice_global_";

/// A workspace or cell id (checked: 1–64 characters).
const ID: Type = Type::Key(64);
/// A source id (as in a cell's control tables).
const SOURCE: Type = Type::Key(255);

const WORKSPACES: Table = Table {
    columns: &[
        col("id", ID),
        with_default("name", Type::Text, "''"),
        col("tier", Type::Key(16)),
        col("constraints", Type::Text), // JSON object of string → string
        with_default("disabled", Type::Int, "0"),
        col("created_at", Type::Int),
    ],
    primary_key: &["id"],
    indexes: &[],
    append_only: None,
    without_rowid: false,
};

const WRITE_KEYS: Table = Table {
    columns: &[
        col("key_hash", Type::FixedBytes(32)), // SHA-256 of the write key; the key is never stored
        col("workspace", ID),
        col("source", SOURCE),
        col("created_at", Type::Int),
    ],
    primary_key: &["key_hash"],
    // One key per source (a rotation replaces it): a cell knows a source by one key.
    indexes: &[
        Index { suffix: "workspace", columns: &["workspace"], unique: false, only: None },
        Index { suffix: "source", columns: &["source"], unique: true, only: None },
    ],
    append_only: None,
    without_rowid: false,
};

const CELLS: Table = Table {
    columns: &[
        col("id", ID),
        col("tier", Type::Key(16)),
        col("ingest_url", Type::Text),
        with_default("admin_url", Type::Text, "''"),
        col("state", Type::Key(16)),
        col("attributes", Type::Text), // JSON object of string → string
        col("updated_at", Type::Int),
    ],
    primary_key: &["id"],
    indexes: &[],
    append_only: None,
    without_rowid: false,
};

const ASSIGNMENTS: Table = Table {
    columns: &[col("workspace", ID), col("cell", ID), col("assigned_at", Type::Int), col("reason", Type::Text)],
    primary_key: &["workspace"],
    indexes: &[Index { suffix: "cell", columns: &["cell"], unique: false, only: None }],
    append_only: None,
    without_rowid: false,
};

const OVERRIDES: Table = Table {
    columns: &[col("workspace", ID), col("cell", ID), col("reason", Type::Text), col("created_at", Type::Int)],
    primary_key: &["workspace"],
    indexes: &[],
    append_only: None,
    without_rowid: false,
};

const MAPPING_VERSION: Table = Table {
    columns: &[col("id", Type::Int), col("version", Type::Int)],
    primary_key: &["id"],
    indexes: &[],
    append_only: None,
    without_rowid: false,
};

const USAGE_REPORTS: Table = Table {
    columns: &[col("cell", ID), col("report_id", Type::Key(128)), col("received_at", Type::Int)],
    primary_key: &["cell", "report_id"],
    indexes: &[],
    append_only: None,
    without_rowid: false,
};

const USAGE_HOURLY: Table = Table {
    columns: &[
        col("workspace", ID),
        col("hour", Type::Int), // unix seconds of the hour's start
        with_default("destination", SOURCE, "''"),
        col("metric", Type::Key(32)),
        col("value", Type::Int),
    ],
    primary_key: &["workspace", "hour", "destination", "metric"],
    indexes: &[],
    append_only: None,
    without_rowid: false,
};

/// A workspace's destinations (docs/CONFIG.md's keys, as JSON), handed to
/// the cell that serves it. Ids are unique across workspaces: a cell may
/// serve several.
const DESTINATIONS: Table = Table {
    columns: &[col("id", ID), col("workspace", ID), col("config", Type::Text), col("updated_at", Type::Int)],
    primary_key: &["id"],
    indexes: &[Index { suffix: "workspace", columns: &["workspace"], unique: false, only: None }],
    append_only: None,
    without_rowid: false,
};

/// A workspace's connections (source → destination).
const CONNECTIONS: Table = Table {
    columns: &[col("source", SOURCE), col("destination", ID), col("workspace", ID)],
    primary_key: &["source", "destination"],
    indexes: &[Index { suffix: "workspace", columns: &["workspace"], unique: false, only: None }],
    append_only: None,
    without_rowid: false,
};

/// A cell's token for the control plane's cell API (its config, its usage
/// reports): SHA-256 only, as write keys.
const CELL_TOKENS: Table = Table {
    columns: &[col("cell", ID), col("token_hash", Type::FixedBytes(32)), col("created_at", Type::Int)],
    primary_key: &["cell"],
    indexes: &[],
    append_only: None,
    without_rowid: false,
};

/// Source ids that were removed, with the workspace that had them: an id is
/// never given to another workspace (its events stay in the cells' logs,
/// and a replay reads them by source id).
const REMOVED_SOURCES: Table = Table {
    columns: &[col("source", SOURCE), col("workspace", ID), col("removed_at", Type::Int)],
    primary_key: &["source"],
    indexes: &[],
    append_only: None,
    without_rowid: false,
};

/// Migrations of workspaces between cells, done or not (docs/plans/MIGRATION.md):
/// the state machine's row. Bucket sets are in `BucketSet`'s range form.
const MIGRATIONS: Table = Table {
    columns: &[
        col("id", ID),
        col("workspace", ID),
        col("source_cell", ID),
        col("target_cell", ID),
        col("steps", Type::Text), // JSON array of cumulative percentages, e.g. [10, 50, 100]
        col("step", Type::Int),   // index into steps of the next cutover
        col("phase", Type::Key(16)),
        col("moved", Type::Text),
        col("fenced", Type::Text),
        with_default("paused", Type::Int, "0"),
        col("token", Type::Text), // shared by the two cells' agents for the key stream
        with_default("progress", Type::Text, "'{}'"),
        with_default("error", Type::Text, "''"),
        col("created_at", Type::Int),
        col("updated_at", Type::Int),
    ],
    primary_key: &["id"],
    indexes: &[Index { suffix: "workspace", columns: &["workspace"], unique: false, only: None }],
    append_only: None,
    without_rowid: false,
};

/// The one migration in progress per workspace: inserted when it starts
/// (a conditional insert, so two starts cannot both win), deleted when it
/// ends.
const ACTIVE_MIGRATIONS: Table = Table {
    columns: &[col("workspace", ID), col("migration", ID)],
    primary_key: &["workspace"],
    indexes: &[],
    append_only: None,
    without_rowid: false,
};

const TABLES: [(&str, Table); 14] = [
    ("workspaces", WORKSPACES),
    ("write_keys", WRITE_KEYS),
    ("cells", CELLS),
    ("assignments", ASSIGNMENTS),
    ("overrides", OVERRIDES),
    ("mapping_version", MAPPING_VERSION),
    ("usage_reports", USAGE_REPORTS),
    ("usage_hourly", USAGE_HOURLY),
    ("destinations", DESTINATIONS),
    ("connections", CONNECTIONS),
    ("cell_tokens", CELL_TOKENS),
    ("migrations", MIGRATIONS),
    ("active_migrations", ACTIVE_MIGRATIONS),
    ("removed_sources", REMOVED_SOURCES),
];

/// The DDL of the global store (idempotent), then its one version row.
pub fn ddl(dialect: Dialect) -> Vec<String> {
    let mut out: Vec<String> = TABLES.iter().flat_map(|(name, table)| dialect.create_table(&format!("{PREFIX}{name}"), table)).collect();
    out.push(dialect.insert_missing(&format!("{PREFIX}mapping_version"), "id, version", "1, 0", "id"));
    out
}
