//! Tables defined once, as data ([`Table`]), and rendered for each engine:
//! SQLite (rusqlite), MySQL/MariaDB and PostgreSQL (sqlx).
//!
//! Invariants:
//! - What differs between the engines (column types, key lengths, auto ids,
//!   table options, identifier quoting, immutability triggers) is decided in
//!   [`Dialect`]'s methods and nowhere else. A column, key or index that
//!   only some engines have says so in its `only` field.
//! - Rendering is `CREATE … IF NOT EXISTS`: an existing table is never
//!   changed, so a rendering must stay compatible with the tables earlier
//!   versions made.
//! - An append-only table ([`Table::append_only`]) gets triggers that
//!   refuse UPDATE and DELETE of its rows from anyone (and TRUNCATE on
//!   PostgreSQL): immutability is the database's, not only the caller's.
//! - PostgreSQL's triggers call `sluice_refuse_change()`, which
//!   [`Dialect::refuse_function`] creates: render it before the tables, in
//!   the same schema transaction ([`crate::link::CreateSchema`]).

/// An SQL engine Sluice stores in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    MySql,
    Postgres,
}

/// Engines a column, key or index exists on.
pub type Engines = &'static [Dialect];
/// The two database servers.
pub const SERVERS: Engines = &[Dialect::MySql, Dialect::Postgres];
/// SQLite only.
pub const SQLITE: Engines = &[Dialect::Sqlite];

/// A column's kind; [`Dialect::column_type`] names it per engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    /// A 64-bit integer.
    Int,
    /// A 32-bit integer (an HTTP status).
    Int32,
    /// The table's primary key, assigned by the database, never reused.
    AutoId,
    /// Text that is part of a key or index, at most this many characters
    /// (MySQL cannot index unbounded text; the others ignore the bound).
    Key(u16),
    /// Text of any length (MySQL: up to 16 MiB).
    Text,
    /// Bytes of exactly this length (a KSUID, a SHA-256).
    FixedBytes(u16),
    /// Bytes of any length.
    Bytes,
}

/// One column.
#[derive(Debug, Clone, Copy)]
pub struct Column {
    pub name: &'static str,
    pub ty: Type,
    pub nullable: bool,
    /// An SQL literal, the same on every engine (`0`, `'config'`).
    pub default: Option<&'static str>,
    /// `None`: every engine.
    pub only: Option<Engines>,
}

/// A secondary index, or a unique constraint.
#[derive(Debug, Clone, Copy)]
pub struct Index {
    /// Appended to the table's name: `<table>_<suffix>`.
    pub suffix: &'static str,
    pub columns: &'static [&'static str],
    pub unique: bool,
    /// `None`: every engine.
    pub only: Option<Engines>,
}

/// A table of a family; its name is given at rendering (JobDBs and control
/// tables carry a sequence number or a prefix).
#[derive(Debug, Clone, Copy)]
pub struct Table {
    pub columns: &'static [Column],
    /// Empty when an [`Type::AutoId`] column is the key.
    pub primary_key: &'static [&'static str],
    pub indexes: &'static [Index],
    /// The message with which UPDATE and DELETE of a row are refused.
    pub append_only: Option<AppendOnly>,
    /// SQLite: store the rows in the primary key's B-tree (`WITHOUT ROWID`).
    pub without_rowid: bool,
}

/// How an append-only table refuses changes.
#[derive(Debug, Clone, Copy)]
pub struct AppendOnly {
    /// The SQLite trigger names' stem (`<stem>_update`, `<stem>_delete`),
    /// kept from the first SQLite JobDBs.
    pub sqlite_trigger_stem: &'static str,
    pub on_update: &'static str,
    pub on_delete: &'static str,
}

pub const fn col(name: &'static str, ty: Type) -> Column {
    Column { name, ty, nullable: false, default: None, only: None }
}

pub const fn null(name: &'static str, ty: Type) -> Column {
    Column { name, ty, nullable: true, default: None, only: None }
}

pub const fn with_default(name: &'static str, ty: Type, default: &'static str) -> Column {
    Column { name, ty, nullable: false, default: Some(default), only: None }
}

impl From<crate::link::SqlEngine> for Dialect {
    fn from(engine: crate::link::SqlEngine) -> Dialect {
        match engine {
            crate::link::SqlEngine::MySql => Dialect::MySql,
            crate::link::SqlEngine::Postgres => Dialect::Postgres,
        }
    }
}

impl Dialect {
    /// `name` quoted as an identifier.
    pub fn quote(self, name: &str) -> String {
        match self {
            Dialect::MySql => format!("`{name}`"),
            Dialect::Sqlite | Dialect::Postgres => format!("\"{name}\""),
        }
    }

    fn has(self, only: Option<Engines>) -> bool {
        only.is_none_or(|engines| engines.contains(&self))
    }

    /// The column type of `ty` on this engine.
    pub fn column_type(self, ty: Type) -> String {
        match (self, ty) {
            (Dialect::Sqlite, Type::Int | Type::Int32) => "INTEGER".into(),
            (Dialect::Sqlite, Type::AutoId) => "INTEGER PRIMARY KEY AUTOINCREMENT".into(),
            (Dialect::Sqlite, Type::Key(_) | Type::Text) => "TEXT".into(),
            (Dialect::Sqlite, Type::FixedBytes(_) | Type::Bytes) => "BLOB".into(),
            (Dialect::MySql, Type::Int) => "BIGINT".into(),
            (Dialect::MySql, Type::Int32) => "INT".into(),
            (Dialect::MySql, Type::AutoId) => "BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY".into(),
            (Dialect::MySql, Type::Key(n)) => format!("VARCHAR({n})"),
            (Dialect::MySql, Type::Text) => "MEDIUMTEXT".into(),
            (Dialect::MySql, Type::FixedBytes(n)) => format!("BINARY({n})"),
            (Dialect::MySql, Type::Bytes) => "LONGBLOB".into(),
            (Dialect::Postgres, Type::Int) => "BIGINT".into(),
            (Dialect::Postgres, Type::Int32) => "INTEGER".into(),
            (Dialect::Postgres, Type::AutoId) => "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY".into(),
            (Dialect::Postgres, Type::Key(_) | Type::Text) => "TEXT".into(),
            (Dialect::Postgres, Type::FixedBytes(_) | Type::Bytes) => "BYTEA".into(),
        }
    }

    /// An index's column list: MySQL indexes unbounded text by a prefix.
    fn index_column(self, table: &Table, name: &str) -> String {
        let ty = table.columns.iter().find(|c| c.name == name).map(|c| c.ty);
        match (self, ty) {
            // 191 characters of utf8mb4 fit the 767-byte key prefix of older InnoDB row formats.
            (Dialect::MySql, Some(Type::Text)) => format!("{}(191)", self.quote(name)),
            _ => self.quote(name),
        }
    }

    /// `CREATE TABLE` (and its indexes and triggers) for `table` named `name`, idempotent.
    pub fn create_table(self, name: &str, table: &Table) -> Vec<String> {
        let mut lines: Vec<String> = table
            .columns
            .iter()
            .filter(|c| self.has(c.only))
            .map(|c| {
                let mut line = format!("{} {}", self.quote(c.name), self.column_type(c.ty));
                if !c.nullable && c.ty != Type::AutoId {
                    line.push_str(" NOT NULL");
                }
                if let Some(d) = c.default {
                    line.push_str(&format!(" DEFAULT {d}"));
                }
                line
            })
            .collect();
        if !table.primary_key.is_empty() {
            lines.push(format!("PRIMARY KEY ({})", self.list(table.primary_key, |c| self.quote(c))));
        }
        let indexes = table.indexes.iter().filter(|i| self.has(i.only));
        let mut after = Vec::new();
        for index in indexes {
            let index_name = format!("{name}_{}", index.suffix);
            match (self, index.unique) {
                // MySQL declares keys in the table (no CREATE INDEX IF NOT EXISTS before 8.0.29/MariaDB 10.1.4 quirks).
                (Dialect::MySql, unique) => lines.push(format!(
                    "{}KEY {} ({})",
                    if unique { "UNIQUE " } else { "" },
                    self.quote(index.suffix),
                    self.list(index.columns, |c| self.index_column(table, c))
                )),
                (_, true) if self == Dialect::Postgres => {
                    lines.push(format!("CONSTRAINT {} UNIQUE ({})", self.quote(&index_name), self.list(index.columns, |c| self.quote(c))))
                }
                (_, unique) => {
                    // PostgreSQL: a hash index takes text of any length (a btree entry is limited to ~2.7 KB).
                    let unbounded = |c: &str| table.columns.iter().any(|col| col.name == c && col.ty == Type::Text);
                    let hash = self == Dialect::Postgres && !unique && index.columns.len() == 1 && unbounded(index.columns[0]);
                    let using = if hash { " USING hash" } else { "" };
                    after.push(format!(
                        "CREATE {}INDEX IF NOT EXISTS {} ON {}{using} ({})",
                        if unique { "UNIQUE " } else { "" },
                        self.quote(&index_name),
                        self.quote(name),
                        self.list(index.columns, |c| self.quote(c))
                    ))
                }
            }
        }
        let options = match self {
            Dialect::Sqlite if table.without_rowid && !table.primary_key.is_empty() => " WITHOUT ROWID",
            Dialect::MySql => " ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
            _ => "",
        };
        let mut ddl = vec![format!("CREATE TABLE IF NOT EXISTS {} (\n    {}\n){options}", self.quote(name), lines.join(",\n    "))];
        ddl.extend(after);
        if let Some(rule) = table.append_only {
            ddl.extend(self.refuse_changes(name, &rule));
        }
        ddl
    }

    fn list(self, names: &[&str], render: impl Fn(&str) -> String) -> String {
        names.iter().map(|n| render(n)).collect::<Vec<_>>().join(", ")
    }

    /// `INSERT INTO table (columns) VALUES (values)` that inserts nothing
    /// when the row's key exists, and whose rows changed say which
    /// happened: 1 inserted, 0 the key existed. Unlike
    /// [`Dialect::insert_missing`] on MySQL, whose no-op update sqlx counts
    /// as a changed row (it connects with `CLIENT_FOUND_ROWS`), this is
    /// `INSERT IGNORE` there — which also turns other errors (a value too
    /// long for its column) into warnings: callers check lengths first.
    pub fn insert_new(self, table: &str, columns: &str, values: &str, conflict: &str) -> String {
        match self {
            Dialect::MySql => format!("INSERT IGNORE INTO {table} ({columns}) VALUES ({values})"),
            Dialect::Sqlite | Dialect::Postgres => format!("INSERT INTO {table} ({columns}) VALUES ({values}) ON CONFLICT ({conflict}) DO NOTHING"),
        }
    }

    /// `INSERT INTO table (columns) VALUES (values)` that does nothing when
    /// a row with the same key (`conflict`: its columns) exists (MySQL:
    /// `ON DUPLICATE KEY UPDATE` of a key column to itself). Its rows
    /// changed do not tell which happened on MySQL: see
    /// [`Dialect::insert_new`].
    pub fn insert_missing(self, table: &str, columns: &str, values: &str, conflict: &str) -> String {
        let head = format!("INSERT INTO {table} ({columns}) VALUES ({values})");
        match self {
            Dialect::MySql => {
                let first = conflict.split(',').next().unwrap_or(conflict).trim();
                format!("{head} ON DUPLICATE KEY UPDATE {first} = {first}")
            }
            Dialect::Sqlite | Dialect::Postgres => format!("{head} ON CONFLICT ({conflict}) DO NOTHING"),
        }
    }

    /// `INSERT` of `columns` into `table` that replaces the other columns of
    /// the row whose `key` columns match, with `?` placeholders (PostgreSQL:
    /// number them, `sqljobdb::numbered`).
    pub fn upsert(self, table: &str, columns: &[&str], key: &[&str]) -> String {
        let values = vec!["?"; columns.len()].join(", ");
        let rest: Vec<&str> = columns.iter().copied().filter(|c| !key.contains(c)).collect();
        let head = format!("INSERT INTO {table} ({}) VALUES ({values})", columns.join(", "));
        match self {
            Dialect::MySql => {
                format!("{head} ON DUPLICATE KEY UPDATE {}", rest.iter().map(|c| format!("{c} = VALUES({c})")).collect::<Vec<_>>().join(", "))
            }
            Dialect::Sqlite | Dialect::Postgres => format!(
                "{head} ON CONFLICT ({}) DO UPDATE SET {}",
                key.join(", "),
                rest.iter().map(|c| format!("{c} = excluded.{c}")).collect::<Vec<_>>().join(", ")
            ),
        }
    }

    /// PostgreSQL: the trigger function the append-only tables' triggers call.
    pub fn refuse_function(self) -> Option<String> {
        (self == Dialect::Postgres).then(|| {
            "CREATE OR REPLACE FUNCTION sluice_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN RAISE EXCEPTION '% (%)', TG_ARGV[0], TG_OP USING ERRCODE = 'restrict_violation'; END $$"
                .to_owned()
        })
    }

    /// Triggers refusing UPDATE and DELETE (and TRUNCATE) of `table`'s rows.
    fn refuse_changes(self, table: &str, rule: &AppendOnly) -> Vec<String> {
        let quoted = self.quote(table);
        match self {
            Dialect::Sqlite => [("UPDATE", "update", rule.on_update), ("DELETE", "delete", rule.on_delete)]
                .map(|(op, suffix, message)| {
                    format!(
                        "CREATE TRIGGER IF NOT EXISTS {}_{suffix} BEFORE {op} ON {quoted}\n    BEGIN SELECT RAISE(ABORT, '{message}'); END",
                        rule.sqlite_trigger_stem
                    )
                })
                .to_vec(),
            Dialect::MySql => [("UPDATE", "no_update", rule.on_update), ("DELETE", "no_delete", rule.on_delete)]
                .map(|(op, suffix, message)| {
                    format!(
                        "CREATE TRIGGER IF NOT EXISTS {} BEFORE {op} ON {quoted} FOR EACH ROW\n    SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = '{message}'",
                        self.quote(&format!("{table}_{suffix}"))
                    )
                })
                .to_vec(),
            // One message for both (the function adds the operation).
            Dialect::Postgres => vec![
                format!(
                    "CREATE OR REPLACE TRIGGER {} BEFORE UPDATE OR DELETE ON {quoted}\n    FOR EACH ROW EXECUTE FUNCTION sluice_refuse_change('{}')",
                    self.quote(&format!("{table}_immutable")),
                    rule.on_delete
                ),
                format!(
                    "CREATE OR REPLACE TRIGGER {} BEFORE TRUNCATE ON {quoted}\n    FOR EACH STATEMENT EXECUTE FUNCTION sluice_refuse_change('{}')",
                    self.quote(&format!("{table}_no_truncate")),
                    rule.on_delete
                ),
            ],
        }
    }
}
