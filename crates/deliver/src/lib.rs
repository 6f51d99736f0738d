//! Sluice's delivery stage, after Segment's Centrifuge (DESIGN §4).
//!
//! Every (event, destination) is a *job*. Jobs live in JobDBs — SQLite files
//! in WAL mode with an immutable `jobs` table and an append-only
//! `job_state_transitions` table, or table sets in a MySQL/MariaDB or
//! PostgreSQL database ([`sqljobdb`]); one implementation ([`jobdb`]) of one
//! trait ([`store`]) over one statement layer (`sql`) and one schema
//! definition ([`schema`]). Each JobDB has one writer
//! thread ([`writer`]) and one *director* ([`director`]) that keeps its
//! unfinished jobs in memory and runs them through the HTTP [`executor`],
//! fairly across (source, destination) pairs, within each destination's
//! limits ([`gate`]). The [`centrifuge`] rotates JobDBs and deletes finished
//! ones whole. Destinations, connections and `destination_qos` live in the
//! control database ([`control`]), seeded from the config. With separate
//! route and director processes, the [`cluster`] module is the RPC between
//! them, the directory of directors, and the adoption of a dead director's
//! JobDBs.
//!
//! Commit points (ARCHITECTURE.md): a job exists once its insert commits
//! (the route commits its `output` offset only after); a request is sent only
//! after its `executing` row commits; every outcome is a new row.

pub mod archive;
pub mod backend;
pub mod batch;
pub mod centrifuge;
mod clients;
pub mod cluster;
pub mod control;
pub mod director;
pub mod executor;
pub mod function;
pub mod gate;
pub mod inspect;
pub mod jobdb;
pub mod kafka;
pub mod ksuid;
pub mod lake;
pub mod metrics;
pub mod retry;
pub mod schema;
pub mod sink;
pub mod sqljobdb;
pub mod store;
pub mod warehouse;
pub mod writer;

pub use centrifuge::{Centrifuge, CentrifugeOptions};
pub use control::{Catalog, ControlDb};
pub use ksuid::Ksuid;
pub use metrics::DeliverMetrics;
pub use store::{JobState, NewJob};

#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    #[error("directory of directors: {0}")]
    Directory(String),
    #[error("SQLite error on {path}: {source}")]
    Sqlite { path: String, source: rusqlite::Error },
    #[error("SQL error on {jobdb}: {source}")]
    Sql { jobdb: String, source: sqlx::Error },
    #[error("bad JobDB database URL {0}")]
    SqlUrl(String),
    /// The config cannot be seeded into the control tables as they are (nothing was changed).
    #[error("the config conflicts with the control database: {0}")]
    SeedConflict(String),
    #[error("the director lock {lock} in {database} is held by another director (is another `sluice serve` using this database?)")]
    SqlLocked { lock: String, database: String },
    #[error("I/O error on {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("the JobDB {0} is locked by another director (is another `sluice serve` running on this data_dir?)")]
    Locked(String),
    #[error("JobDB write failed: {0}")]
    WriteFailed(String),
    #[error("corrupt JobDB: {0}")]
    Corrupt(String),
    #[error("archive write failed: {0}")]
    Archive(String),
    #[error("cannot build the HTTP client: {0}")]
    Http(String),
    #[error("the JobDB is closed")]
    Closed,
    /// The director cluster's refusals: a missing `deliver.jobdb_url` or
    /// `director.rpc_secret`, an unreadable `director.tls_*` file, a
    /// `director.name` already running.
    #[error("{0}")]
    Cluster(String),
    /// Handing jobs to a director over RPC failed (the route's batch is retried).
    #[error("handing jobs to a director failed: {0}")]
    Rpc(String),
    #[error("cannot listen on {addr} (director.rpc_listen)")]
    Listen { addr: String, source: std::io::Error },
    #[error("cannot open this director's JobDBs")]
    OwnJobDbs(#[source] Box<DeliverError>),
    #[error(transparent)]
    Tls(#[from] sluice_ingest::tls::TlsError),
}

impl From<sluice_sql::Error> for DeliverError {
    fn from(e: sluice_sql::Error) -> DeliverError {
        use sluice_sql::Error as E;
        match e {
            E::Sqlite { path, source } => DeliverError::Sqlite { path, source },
            E::Server { what, source } => DeliverError::Sql { jobdb: what, source },
            E::Url(why) => DeliverError::SqlUrl(why),
            E::Locked { lock, database } => DeliverError::SqlLocked { lock, database },
            E::Io { path, source } => DeliverError::Io { path, source },
            E::Corrupt(why) => DeliverError::Corrupt(why),
            E::Refused(why) => DeliverError::SeedConflict(why),
        }
    }
}

pub use sluice_core::clock::now_ms;
