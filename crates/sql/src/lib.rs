//! Sluice's SQL layer, shared by every stage that keeps state in SQL (the
//! delivery stage's JobDBs, control tables and directory of directors; the
//! cells' global store):
//!
//! - [`dialect`]: tables defined once, as data, and rendered for SQLite,
//!   MySQL/MariaDB and PostgreSQL.
//! - [`conn`]: one statement interface over the three engines
//!   ([`Connection`], [`Arg`], [`SqlRow`]) and a shared, reconnecting
//!   connection ([`SharedConnection`]).
//! - [`link`]: a server database named by its URL ([`SqlLink`]): explicit
//!   TLS, redaction, connecting, the schema lock ([`link::CreateSchema`]) and
//!   locks held by a session ([`SessionLock`]).
//!
//! Methods that run statements block; call them from a dedicated thread or
//! `spawn_blocking` (a server session drives its connection on a
//! current-thread runtime of its own).

pub mod conn;
pub mod dialect;
pub mod link;

pub use conn::{Arg, Connection, Connector, SharedConnection, SqlError, SqlRow};
pub use dialect::Dialect;
pub use link::{redact, SessionLock, SqlEngine, SqlLink, CONNECT_TIMEOUT};

/// What the SQL layer fails with, naming the database (a file, or a
/// server's URL without password) and what was being done.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("SQLite error on {path}: {source}")]
    Sqlite { path: String, source: rusqlite::Error },
    #[error("SQL error on {what}: {source}")]
    Server { what: String, source: sqlx::Error },
    #[error("bad database URL {0}")]
    Url(String),
    #[error("the lock {lock} in {database} is held by another session")]
    Locked { lock: String, database: String },
    #[error("I/O error on {path}: {source}")]
    Io { path: String, source: std::io::Error },
    /// A column that cannot be read as its type.
    #[error("{0}")]
    Corrupt(String),
    /// The caller refused what it read (its transaction was rolled back).
    #[error("{0}")]
    Refused(String),
}
