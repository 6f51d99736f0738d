//! One way to run statements on the three SQL engines: an SQLite file
//! (rusqlite) or a MySQL/MariaDB or PostgreSQL server (sqlx, one connection
//! on its own current-thread runtime: [`crate::link::Session`]).
//!
//! Sluice's SQL stores (the JobDBs, the control tables, the directory of
//! directors) are written once against this module; what differs per
//! engine lives in [`crate::Dialect`] (DDL, upserts, triggers) and here
//! (binding, decoding, errors).
//!
//! Invariants:
//! - Statements are written with `?` placeholders and identifiers that
//!   need no quoting; [`Dialect::placeholders`] numbers them for PostgreSQL
//!   once, where the statement is built (callers keep built statements).
//! - Methods block: they run on a JobDB's writer thread or in
//!   `spawn_blocking`, never on an async executor thread.
//! - SQLite statements go through the connection's prepared-statement cache,
//!   so a statement text built once costs one parse per connection.
//! - PostgreSQL `TEXT` cannot hold NUL: a NUL in a text argument is sent as
//!   U+FFFD (SQLite and MySQL store it as given). Keys derived from text
//!   (the servers' idempotency key) are computed from the original.
//! - Reads go through [`SqlRow`], whose getters read a column the same way
//!   on every engine (MySQL's binary-collated text as checked UTF-8,
//!   PostgreSQL's 32-bit integers widened).

use std::borrow::Cow;

use rusqlite::types::{ToSqlOutput, ValueRef};
use sqlx::mysql::MySqlRow;
use sqlx::postgres::PgRow;
use sqlx::Row;

use crate::dialect::Dialect;
use crate::link::{Conn, Session, SqlLink};
use crate::Error;

/// What a statement failed with, on either stack.
#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error(transparent)]
    Server(#[from] sqlx::Error),
    /// A column that cannot be read as its type (e.g. NULL where a value belongs).
    #[error("column {index}: {problem}")]
    Decode { index: usize, problem: String },
    /// The caller refused what it read (its transaction is rolled back): not a database error.
    #[error("{0}")]
    Refused(String),
}

impl SqlError {
    /// A unique-index violation on the index whose name contains `index`
    /// (servers: SQLite statements skip duplicates with `OR IGNORE`).
    pub fn is_duplicate(&self, index: &str) -> bool {
        match self {
            SqlError::Server(sqlx::Error::Database(d)) => d.is_unique_violation() && d.message().contains(index),
            _ => false,
        }
    }

    /// A deadlock, a serialization failure or (SQLite) a busy database:
    /// the transaction can simply run again.
    pub fn is_retryable(&self) -> bool {
        match self {
            SqlError::Server(sqlx::Error::Database(d)) => {
                matches!(d.code().as_deref(), Some("40001" | "40P01")) || d.message().contains("Deadlock found")
            }
            SqlError::Sqlite(rusqlite::Error::SqliteFailure(f, _)) => f.code == rusqlite::ErrorCode::DatabaseBusy,
            _ => false,
        }
    }

    /// The connection to a server is gone (open a new one before the next transaction).
    pub fn is_connection_lost(&self) -> bool {
        matches!(self, SqlError::Server(sqlx::Error::Io(_) | sqlx::Error::Protocol(_) | sqlx::Error::Tls(_) | sqlx::Error::WorkerCrashed))
    }

    /// The crate's error, naming the database (`name`: a file or a server's
    /// URL without password, plus what was done).
    pub fn named(self, name: impl Into<String>) -> Error {
        match self {
            SqlError::Sqlite(source) => Error::Sqlite { path: name.into(), source },
            SqlError::Server(source) => Error::Server { what: name.into(), source },
            SqlError::Decode { index, problem } => Error::Corrupt(format!("{}: column {index}: {problem}", name.into())),
            SqlError::Refused(why) => Error::Refused(why),
        }
    }
}

/// One statement argument.
#[derive(Debug, Clone, Copy)]
pub enum Arg<'a> {
    Int(i64),
    OptInt(Option<i64>),
    /// A 32-bit column (PostgreSQL checks the width of what it is sent).
    OptInt32(Option<i32>),
    Text(&'a str),
    OptText(Option<&'a str>),
    Bytes(&'a [u8]),
}

impl From<i64> for Arg<'_> {
    fn from(v: i64) -> Self {
        Arg::Int(v)
    }
}
impl From<Option<i64>> for Arg<'_> {
    fn from(v: Option<i64>) -> Self {
        Arg::OptInt(v)
    }
}
impl<'a> From<&'a str> for Arg<'a> {
    fn from(v: &'a str) -> Self {
        Arg::Text(v)
    }
}
impl<'a> From<&'a String> for Arg<'a> {
    fn from(v: &'a String) -> Self {
        Arg::Text(v)
    }
}
impl<'a> From<Option<&'a str>> for Arg<'a> {
    fn from(v: Option<&'a str>) -> Self {
        Arg::OptText(v)
    }
}
impl<'a> From<&'a [u8]> for Arg<'a> {
    fn from(v: &'a [u8]) -> Self {
        Arg::Bytes(v)
    }
}

impl rusqlite::ToSql for Arg<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match *self {
            Arg::Int(v) | Arg::OptInt(Some(v)) => ValueRef::Integer(v),
            Arg::OptInt32(Some(v)) => ValueRef::Integer(v.into()),
            Arg::Text(v) | Arg::OptText(Some(v)) => ValueRef::Text(v.as_bytes()),
            Arg::Bytes(v) => ValueRef::Blob(v),
            Arg::OptInt(None) | Arg::OptInt32(None) | Arg::OptText(None) => ValueRef::Null,
        }))
    }
}

/// PostgreSQL text without NUL (see the module docs).
fn pg_text(s: &str) -> Cow<'_, str> {
    if s.contains('\0') {
        Cow::Owned(s.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(s)
    }
}

/// Bind `args` to a sqlx query, for whichever engine `$q` is of.
macro_rules! bind_args {
    ($q:expr, $args:expr, $text:expr) => {{
        let mut q = $q;
        for arg in $args {
            q = match *arg {
                Arg::Int(v) => q.bind(v),
                Arg::OptInt(v) => q.bind(v),
                Arg::OptInt32(v) => q.bind(v),
                Arg::Text(v) => q.bind($text(v)),
                Arg::OptText(v) => q.bind(v.map($text)),
                Arg::Bytes(v) => q.bind(v),
            };
        }
        q
    }};
}

/// Reading a row's columns the same way from every engine.
pub trait SqlRow {
    fn bytes(&self, i: usize) -> Result<Vec<u8>, SqlError>;
    fn opt_int(&self, i: usize) -> Result<Option<i64>, SqlError>;
    fn opt_text(&self, i: usize) -> Result<Option<String>, SqlError>;
    fn int(&self, i: usize) -> Result<i64, SqlError> {
        self.opt_int(i)?.ok_or(SqlError::Decode { index: i, problem: "unexpected NULL".into() })
    }
    fn text(&self, i: usize) -> Result<String, SqlError> {
        self.opt_text(i)?.ok_or(SqlError::Decode { index: i, problem: "unexpected NULL".into() })
    }
}

impl SqlRow for rusqlite::Row<'_> {
    fn bytes(&self, i: usize) -> Result<Vec<u8>, SqlError> {
        Ok(self.get(i)?)
    }
    fn opt_int(&self, i: usize) -> Result<Option<i64>, SqlError> {
        Ok(self.get(i)?)
    }
    fn opt_text(&self, i: usize) -> Result<Option<String>, SqlError> {
        Ok(self.get(i)?)
    }
}

impl SqlRow for MySqlRow {
    fn bytes(&self, i: usize) -> Result<Vec<u8>, SqlError> {
        Ok(self.try_get(i)?)
    }
    fn opt_int(&self, i: usize) -> Result<Option<i64>, SqlError> {
        Ok(self.try_get(i)?)
    }
    /// Columns with a binary collation (ours: `utf8mb4_bin`, so comparisons
    /// are exact) carry MySQL's BINARY flag, which sqlx will not decode as a
    /// `String`: read the bytes and check they are UTF-8.
    fn opt_text(&self, i: usize) -> Result<Option<String>, SqlError> {
        let raw: Option<Vec<u8>> = self.try_get(i)?;
        raw.map(|b| String::from_utf8(b).map_err(|e| SqlError::Decode { index: i, problem: e.to_string() })).transpose()
    }
}

impl SqlRow for PgRow {
    fn bytes(&self, i: usize) -> Result<Vec<u8>, SqlError> {
        Ok(self.try_get(i)?)
    }
    /// `BIGINT` or `INTEGER` (sqlx decodes PostgreSQL integers only at their own width).
    fn opt_int(&self, i: usize) -> Result<Option<i64>, SqlError> {
        match self.try_get::<Option<i64>, _>(i) {
            Ok(v) => Ok(v),
            Err(wide) => self.try_get::<Option<i32>, _>(i).map(|v| v.map(i64::from)).map_err(|_| SqlError::Server(wide)),
        }
    }
    fn opt_text(&self, i: usize) -> Result<Option<String>, SqlError> {
        Ok(self.try_get(i)?)
    }
}

/// `sql` from `c`'s statement cache, with `args` bound.
fn sqlite_statement<'c>(c: &'c rusqlite::Connection, sql: &str, args: &[Arg<'_>]) -> Result<rusqlite::CachedStatement<'c>, SqlError> {
    let mut stmt = c.prepare_cached(sql)?;
    for (i, arg) in args.iter().enumerate() {
        stmt.raw_bind_parameter(i + 1, arg)?;
    }
    Ok(stmt)
}

/// A connection to one engine.
pub enum Connection {
    Sqlite(rusqlite::Connection),
    Server(Box<Session>),
}

impl Connection {
    pub fn dialect(&self) -> Dialect {
        match self {
            Connection::Sqlite(_) => Dialect::Sqlite,
            Connection::Server(s) => match s.conn {
                Conn::MySql(_) => Dialect::MySql,
                Conn::Postgres(_) => Dialect::Postgres,
            },
        }
    }

    /// Run statements without arguments or results (`BEGIN`, DDL), one by one.
    pub fn batch(&mut self, sql: &str) -> Result<(), SqlError> {
        match self {
            Connection::Sqlite(c) => Ok(c.execute_batch(sql)?),
            Connection::Server(s) => {
                match &mut s.conn {
                    Conn::MySql(c) => _ = s.rt.block_on(sqlx::raw_sql(sql).execute(&mut *c))?,
                    Conn::Postgres(c) => _ = s.rt.block_on(sqlx::raw_sql(sql).execute(&mut *c))?,
                }
                Ok(())
            }
        }
    }

    /// Run `sql` (a statement of this connection's dialect) with `args`; the rows it changed.
    pub fn execute(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<u64, SqlError> {
        match self {
            Connection::Sqlite(c) => {
                let mut stmt = sqlite_statement(c, sql, args)?;
                Ok(stmt.raw_execute()? as u64)
            }
            Connection::Server(s) => Ok(match &mut s.conn {
                Conn::MySql(c) => s.rt.block_on(bind_args!(sqlx::query(sql), args, Cow::Borrowed).execute(&mut *c))?.rows_affected(),
                Conn::Postgres(c) => s.rt.block_on(bind_args!(sqlx::query(sql), args, pg_text).execute(&mut *c))?.rows_affected(),
            }),
        }
    }

    /// Run the query `sql` with `args`, reading each row with `read`.
    pub fn query<T>(&mut self, sql: &str, args: &[Arg<'_>], mut read: impl FnMut(&dyn SqlRow) -> Result<T, SqlError>) -> Result<Vec<T>, SqlError> {
        match self {
            Connection::Sqlite(c) => {
                let mut stmt = sqlite_statement(c, sql, args)?;
                let mut rows = stmt.raw_query();
                let mut out = Vec::new();
                while let Some(row) = rows.next()? {
                    out.push(read(row)?);
                }
                Ok(out)
            }
            Connection::Server(s) => match &mut s.conn {
                Conn::MySql(c) => {
                    let rows = s.rt.block_on(bind_args!(sqlx::query(sql), args, Cow::Borrowed).fetch_all(&mut *c))?;
                    rows.iter().map(|r| read(r)).collect()
                }
                Conn::Postgres(c) => {
                    let rows = s.rt.block_on(bind_args!(sqlx::query(sql), args, pg_text).fetch_all(&mut *c))?;
                    rows.iter().map(|r| read(r)).collect()
                }
            },
        }
    }

    /// Run `body` in one transaction (SQLite: `BEGIN IMMEDIATE`, taking the
    /// write lock first, so two writers queue instead of failing at their
    /// first write). On an error the transaction is left open: drop the
    /// connection (a [`SharedConnection`] does), which rolls it back.
    pub fn transaction<T>(&mut self, body: impl FnOnce(&mut Connection) -> Result<T, SqlError>) -> Result<T, SqlError> {
        self.batch(if self.dialect() == Dialect::Sqlite { "BEGIN IMMEDIATE" } else { "BEGIN" })?;
        let out = body(self)?;
        self.batch("COMMIT")?;
        Ok(out)
    }

    /// The first row of [`Connection::query`], if any.
    pub fn query_one<T>(&mut self, sql: &str, args: &[Arg<'_>], read: impl FnMut(&dyn SqlRow) -> Result<T, SqlError>) -> Result<Option<T>, SqlError> {
        Ok(self.query(sql, args, read)?.into_iter().next())
    }
}

impl Dialect {
    /// `sql` with its `?` placeholders as this engine wants them
    /// (PostgreSQL: `$1, $2, …`; our statements have no `?` in literals).
    pub fn placeholders(self, sql: &str) -> String {
        match self {
            Dialect::Sqlite | Dialect::MySql => sql.to_owned(),
            Dialect::Postgres => crate::link::numbered(sql),
        }
    }
}

impl Connection {
    /// Insert one row (`sql`: an `INSERT` into a table whose key is an
    /// auto-assigned `id`) and return that id.
    pub fn insert_returning_id(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<i64, SqlError> {
        if self.dialect() == Dialect::Postgres {
            let id = self.query_one(&format!("{sql} RETURNING id"), args, |r| r.int(0))?;
            return id.ok_or(SqlError::Decode { index: 0, problem: "INSERT … RETURNING id returned no row".into() });
        }
        match self {
            Connection::Sqlite(c) => {
                let mut stmt = sqlite_statement(c, sql, args)?;
                stmt.raw_execute()?;
                Ok(c.last_insert_rowid())
            }
            Connection::Server(s) => match &mut s.conn {
                // MySQL has no RETURNING (MariaDB's differs): the session's last id.
                Conn::MySql(c) => {
                    let done = s.rt.block_on(bind_args!(sqlx::query(sql), args, Cow::Borrowed).execute(&mut *c))?;
                    Ok(done.last_insert_id() as i64)
                }
                Conn::Postgres(_) => unreachable!("answered above"),
            },
        }
    }

    /// Create tables with `ddl` (idempotent): SQLite in one batch; the
    /// servers under the schema lock ([`crate::link::CreateSchema`]).
    pub fn create_schema(&mut self, ddl: &[String]) -> Result<(), SqlError> {
        use crate::link::CreateSchema;
        match self {
            Connection::Sqlite(c) => Ok(c.execute_batch(&ddl.join(";\n"))?),
            Connection::Server(s) => {
                match &mut s.conn {
                    Conn::MySql(c) => s.rt.block_on(c.create_schema(ddl))?,
                    Conn::Postgres(c) => s.rt.block_on(c.create_schema(ddl))?,
                }
                Ok(())
            }
        }
    }
}

/// How a [`SharedConnection`] connects.
pub enum Connector {
    /// An SQLite file (WAL, 5 s busy timeout), created if missing.
    SqliteFile(std::path::PathBuf),
    Server(Box<SqlLink>),
}

/// Which file a path names now (device and inode), to notice a file
/// replaced or removed under an open connection; `None` when it is missing.
fn file_identity(path: &std::path::Path) -> Option<(u64, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        Some((meta.dev(), meta.ino()))
    }
    #[cfg(not(unix))]
    {
        let _ = meta;
        Some((0, 0))
    }
}

impl Connector {
    /// Connect; an SQLite file is created only with `create`.
    fn connect(&self, create: bool) -> Result<Connection, Error> {
        match self {
            Connector::SqliteFile(path) => {
                let e = |source| Error::Sqlite { path: path.display().to_string(), source };
                if !create && !path.exists() {
                    return Err(Error::Io {
                        path: path.display().to_string(),
                        source: std::io::Error::new(std::io::ErrorKind::NotFound, "the file was removed while in use (not created again)"),
                    });
                }
                let conn = rusqlite::Connection::open(path).map_err(e)?;
                conn.pragma_update(None, "journal_mode", "WAL").map_err(e)?;
                conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(e)?;
                Ok(Connection::Sqlite(conn))
            }
            Connector::Server(link) => Ok(Connection::Server(Box::new(link.connect()?))),
        }
    }

    /// The file, or the server's URL without password.
    pub fn describe(&self) -> String {
        match self {
            Connector::SqliteFile(path) => path.display().to_string(),
            Connector::Server(link) => link.display().to_owned(),
        }
    }

    pub fn dialect(&self) -> Dialect {
        match self {
            Connector::SqliteFile(_) => Dialect::Sqlite,
            Connector::Server(link) => link.engine().into(),
        }
    }
}

/// A connection shared by the callers of one component (the control
/// tables): connected on first use, used by one caller at a time, and
/// dropped after any error — with any transaction open on it — so that
/// the next call connects again. Its methods block; a server's session
/// runs on a scoped thread when called from async code
/// ([`crate::link::off_runtime`]: its own runtime cannot block there).
pub struct SharedConnection {
    connector: Connector,
    /// Names the component in errors ("control database").
    component: &'static str,
    slot: std::sync::Mutex<Slot>,
}

#[derive(Default)]
struct Slot {
    conn: Option<Connection>,
    /// SQLite: the file the connection has open ([`file_identity`]).
    file: Option<(u64, u64)>,
    /// Connected once: an SQLite file missing later is not created again.
    connected_once: bool,
}

impl SharedConnection {
    pub fn new(connector: Connector, component: &'static str) -> SharedConnection {
        SharedConnection { connector, component, slot: std::sync::Mutex::new(Slot::default()) }
    }

    pub fn connector(&self) -> &Connector {
        &self.connector
    }

    /// Run `f` on the connection (connecting first if there is none); after
    /// an error the connection is dropped. `what` says what `f` does, for the error.
    ///
    /// An SQLite file replaced or removed under the connection (a backup
    /// restored by `mv`, a file deleted) is noticed before each call: the
    /// connection is dropped and the file at the path opened again — never
    /// created again once it was open, so a removed store is an error, not
    /// a new empty one (red team: a router kept reading a deleted file).
    pub fn run<T: Send>(&self, what: &str, f: impl FnOnce(&mut Connection) -> Result<T, SqlError> + Send) -> Result<T, Error> {
        // A panic in another caller leaves the slot as it was: at worst a
        // connection in an unknown state, which the next error drops.
        let mut guard = self.slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let slot = &mut *guard;
        let body = move || {
            if let (Connector::SqliteFile(path), Some(_)) = (&self.connector, &slot.conn) {
                if file_identity(path) != slot.file {
                    tracing::warn!(file = %path.display(), component = self.component, "the SQLite file was replaced or removed while open; opening the path again");
                    // The `-wal` next to the path is still the old file's: empty it into
                    // the old file first, or opening the path would replay it onto the new one.
                    if let Some(Connection::Sqlite(c)) = &slot.conn {
                        if let Err(e) = c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)") {
                            tracing::warn!(file = %path.display(), error = %e, "cannot empty the replaced file's WAL");
                        }
                    }
                    slot.conn = None;
                }
            }
            if slot.conn.is_none() {
                slot.conn = Some(self.connector.connect(!slot.connected_once)?);
                slot.connected_once = true;
                if let Connector::SqliteFile(path) = &self.connector {
                    slot.file = file_identity(path);
                }
            }
            let conn = slot.conn.as_mut().expect("connected above");
            f(conn).map_err(|e| {
                slot.conn = None;
                e.named(format!("{} ({}: {what})", self.connector.describe(), self.component))
            })
        };
        match self.connector {
            Connector::SqliteFile(_) => body(),
            Connector::Server(_) => crate::link::off_runtime(body),
        }
    }
}
