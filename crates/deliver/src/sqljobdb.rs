//! JobDBs in a MySQL/MariaDB or PostgreSQL database (sqlx): the database side.
//!
//! Layout: one database (named by the URL; for PostgreSQL its default
//! schema) holds every JobDB of a deployment, each as its own table set:
//! JobDB number `N` is `jobs_<N:06>` and `job_state_transitions_<N:06>`. The
//! registry table `jobdb_registry (seq, created_at)` lists the live ones.
//! Several directors can share one database: each has its own scope, whose
//! tables and registry are prefixed with `<director name>_`.
//!
//! Invariants (besides those of [`crate::store`]):
//! - Immutability is the database's: triggers refuse every UPDATE and DELETE
//!   of both tables (MySQL: `SIGNAL SQLSTATE '45000'`; PostgreSQL: a
//!   trigger function that raises, and TRUNCATE is refused too). Only DROP
//!   TABLE removes rows, and only a whole JobDB at a time.
//! - Rotation drops tables, then the registry row: a crash in between leaves
//!   a registry row whose JobDB is recreated empty and dropped again.
//! - Durability is the server's (see `sluice_sql::link`).
//! - A JobDB's rows are read and written by [`crate::jobdb::JobDb`] (the
//!   same implementation as an SQLite file's) on one connection of its own
//!   ([`Session`]: a current-thread tokio runtime drives it, its methods
//!   block). This module keeps the registry, creates and drops table sets,
//!   and takes the director locks; the URL, its TLS mode, connecting and the
//!   schema lock are [`SqlLink`]'s (`sluice-sql`).
//! - Schema is created under the database's schema lock
//!   (`sluice_sql::link::CreateSchema`), taken by every creator of Sluice
//!   tables (JobDBs and their registry, the control tables, the directory).
//! - PostgreSQL `TEXT` cannot hold NUL: a NUL in a text column (a messageId,
//!   an error excerpt) is stored as U+FFFD. The idempotency key is computed
//!   from the original text, so uniqueness is unaffected.

use sluice_sql::conn::{Arg, Connection, SqlError};
use sluice_sql::link::Session;
use sluice_sql::Dialect;

use crate::jobdb::JobDb;
use crate::{now_ms, DeliverError};

pub use sluice_sql::link::{redact, SqlEngine, SqlLink, CONNECT_TIMEOUT};
/// A director lock: a [`sluice_sql::SessionLock`] named
/// `sluice-director-<database>.<name>`.
pub use sluice_sql::SessionLock as DirectorLock;

/// The kind in the names of director locks (`sluice-director-…`).
const LOCK_KIND: &str = "director";

/// The database that holds a deployment's JobDBs: its link, and the scope
/// whose JobDBs these are.
#[derive(Clone)]
pub struct SqlJobDbs {
    link: SqlLink,
    /// Prefix of this scope's table names: `""`, or `<director name>_`.
    prefix: String,
}

impl std::fmt::Debug for SqlJobDbs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlJobDbs").field("link", &self.link).field("prefix", &self.prefix).finish()
    }
}

/// Table names of JobDB `seq` (unscoped: `sluice serve`'s own JobDBs).
pub fn table_names(seq: u64) -> (String, String) {
    scoped_table_names("", seq)
}

/// Table names of JobDB `seq` of the scope whose table prefix is `prefix`
/// (`""`, or `<director name>_` for a `sluice director`).
pub fn scoped_table_names(prefix: &str, seq: u64) -> (String, String) {
    (format!("{prefix}jobs_{seq:06}"), format!("{prefix}job_state_transitions_{seq:06}"))
}

/// The registry table of a scope.
pub(crate) fn registry_table(prefix: &str) -> String {
    format!("{prefix}jobdb_registry")
}

/// The DDL that creates JobDB `seq` (idempotent), in order.
fn schema(engine: SqlEngine, prefix: &str, seq: u64) -> Vec<String> {
    let (jobs, tr) = scoped_table_names(prefix, seq);
    // Run through [`CreateSchema`], under the schema lock (CREATE OR
    // REPLACE FUNCTION and CREATE TABLE IF NOT EXISTS race otherwise).
    let mut ddl = registry_ddl(engine, prefix);
    ddl.extend(crate::schema::server_jobdb(engine.into(), &jobs, &tr));
    ddl
}

/// The registry of a scope's JobDBs: one row per JobDB, tables
/// `<prefix>jobs_<seq:06>` and `<prefix>job_state_transitions_<seq:06>`.
fn registry_ddl(engine: SqlEngine, prefix: &str) -> Vec<String> {
    Dialect::from(engine).create_table(&registry_table(prefix), &crate::schema::JOBDB_REGISTRY)
}

impl SqlJobDbs {
    /// The JobDBs in the database at `url` (`mysql://`, `mariadb://`,
    /// `postgres://` or `postgresql://`; see [`SqlLink::new`] for its TLS
    /// mode). Nothing is connected yet.
    pub fn new(url: &str) -> Result<SqlJobDbs, DeliverError> {
        Ok(SqlJobDbs { link: SqlLink::new(url)?, prefix: String::new() })
    }

    /// The database's link.
    pub fn link(&self) -> &SqlLink {
        &self.link
    }

    /// Whether the link is encrypted with TLS.
    pub fn tls(&self) -> bool {
        self.link.tls()
    }

    pub fn engine(&self) -> SqlEngine {
        self.link.engine()
    }

    /// The URL without password or query.
    pub fn display(&self) -> &str {
        self.link.display()
    }

    /// The database's name as the server sees it (see [`SqlLink::database`]).
    pub fn database(&self) -> &str {
        self.link.database()
    }

    /// A new connection on a new current-thread runtime.
    pub(crate) fn connect(&self) -> Result<Session, DeliverError> {
        Ok(self.link.connect()?)
    }

    /// A statement layer error of `what`, naming this database.
    fn failed(&self, what: &str) -> impl FnOnce(SqlError) -> DeliverError {
        let failed = self.link.failed(what);
        move |e| failed(e).into()
    }

    /// Every table in the database's (PostgreSQL: current schema's) namespace.
    fn all_tables(&self) -> Result<Vec<String>, DeliverError> {
        Ok(self.link.all_tables()?)
    }

    /// The JobDBs of one director of several sharing the database: tables
    /// and registry prefixed `<scope>_`. `scope` is checked by the config
    /// (`director.name`: letters, digits and `_`).
    pub fn scoped(mut self, scope: &str) -> SqlJobDbs {
        self.prefix = if scope.is_empty() { String::new() } else { format!("{scope}_") };
        self
    }

    /// This scope's registry table.
    pub(crate) fn registry_table(&self) -> String {
        registry_table(&self.prefix)
    }

    /// Table names of JobDB `seq` in this scope.
    pub fn table_names(&self, seq: u64) -> (String, String) {
        scoped_table_names(&self.prefix, seq)
    }

    /// Open JobDB `seq`, creating its tables, triggers and registry row if
    /// they do not exist. Blocks.
    pub fn open(&self, seq: u64) -> Result<JobDb, DeliverError> {
        let session = self.connect()?;
        let mut ddl = schema(self.engine(), &self.prefix, seq);
        let registry = registry_table(&self.prefix);
        // Integers only: written into the statement, so the registration is
        // part of the DDL (PostgreSQL: the same transaction).
        let now = now_ms();
        let seq_i = seq as i64;
        ddl.push(match self.engine() {
            SqlEngine::MySql => format!("INSERT IGNORE INTO {registry} (seq, created_at) VALUES ({seq_i}, {now})"),
            SqlEngine::Postgres => {
                format!("INSERT INTO {registry} (seq, created_at) VALUES ({seq_i}, {now}) ON CONFLICT (seq) DO NOTHING")
            }
        });
        let (jobs, _) = self.table_names(seq);
        let mut conn = Connection::Server(Box::new(session));
        conn.create_schema(&ddl).map_err(self.failed(&format!("creating {jobs}")))?;
        Ok(JobDb::on_server(self.clone(), seq, conn))
    }

    /// Connect to JobDB `seq` as it is, without creating anything (readers:
    /// its tables may be dropped meanwhile, and must not come back). Blocks.
    pub fn open_existing(&self, seq: u64) -> Result<JobDb, DeliverError> {
        Ok(JobDb::on_server(self.clone(), seq, Connection::Server(Box::new(self.connect()?))))
    }

    /// The registered JobDBs, oldest first: (seq, created_at ms); none when
    /// the scope has no registry yet (nothing is created: readers use this
    /// too, and [`SqlJobDbs::open`] creates the registry with the first JobDB). Blocks.
    pub fn list(&self) -> Result<Vec<(u64, i64)>, DeliverError> {
        let registry = registry_table(&self.prefix);
        let select = format!("SELECT seq, created_at FROM {registry} ORDER BY seq");
        let mut c = Connection::Server(Box::new(self.connect()?));
        self.link
            .present(&mut c, &[&registry])
            .and_then(|present| if present == 1 { c.query(&select, &[], |r| Ok((r.int(0)? as u64, r.int(1)?))) } else { Ok(Vec::new()) })
            .map_err(self.failed(&registry))
    }

    /// Every scope with JobDBs in the database (the unscoped one of `sluice
    /// serve`, each `sluice director`'s `<name>_`), for the read-only tools. Blocks.
    pub fn every_scope(&self) -> Result<Vec<SqlJobDbs>, DeliverError> {
        let names = self.all_tables()?;
        let mut scopes: Vec<String> = names
            .iter()
            .filter_map(|n| n.strip_suffix("jobdb_registry"))
            // `jobdb_registry` is the unscoped registry; `<name>_jobdb_registry` a
            // director's. (`_jobdb_registry` is neither: another application's.)
            .filter_map(
                |prefix| if prefix.is_empty() { Some(String::new()) } else { prefix.strip_suffix('_').filter(|n| !n.is_empty()).map(str::to_owned) },
            )
            .collect();
        scopes.sort();
        Ok(scopes.into_iter().map(|scope| self.clone().scoped(&scope)).collect())
    }

    /// Delete JobDB `seq` whole: DROP its tables, then its registry row. Blocks.
    pub fn drop_jobdb(&self, seq: u64) -> Result<(), DeliverError> {
        let session = self.connect()?;
        let (jobs, tr) = self.table_names(seq);
        let drop = format!("DROP TABLE IF EXISTS {tr}, {jobs}");
        let registry = registry_table(&self.prefix);
        let unregister = Dialect::from(self.engine()).placeholders(&format!("DELETE FROM {registry} WHERE seq = ?"));
        let mut c = Connection::Server(Box::new(session));
        c.batch(&drop).and_then(|()| c.execute(&unregister, &[Arg::Int(seq as i64)])).map(|_| ()).map_err(self.failed(&format!("dropping {jobs}")))
    }

    /// The JobDB tables in the database (`jobs_*`, `job_state_transitions_*`), sorted. Blocks.
    pub fn tables(&self) -> Result<Vec<String>, DeliverError> {
        let mut names = self.all_tables()?;
        names.retain(|n| n.starts_with("jobs_") || n.starts_with("job_state_transitions_"));
        names.sort();
        Ok(names)
    }

    /// Whether JobDB `seq` of this scope is registered and its tables are
    /// there: rotation drops the tables before the registry row, so a reader
    /// that failed in between learns the JobDB is gone. Blocks.
    pub fn jobdb_exists(&self, seq: u64) -> Result<bool, DeliverError> {
        let (jobs, transitions) = self.table_names(seq);
        let dialect = Dialect::from(self.engine());
        let registered = dialect.placeholders(&format!("SELECT 1 FROM {} WHERE seq = ?", self.registry_table()));
        let mut c = Connection::Server(Box::new(self.connect()?));
        let found = c.query_one(&registered, &[Arg::Int(seq as i64)], |_| Ok(())).and_then(|registered| {
            let present = self.link.present(&mut c, &[&jobs, &transitions])?;
            Ok(registered.is_some() && present == 2)
        });
        found.map_err(self.failed(&format!("looking up {jobs}")))
    }
}

impl SqlJobDbs {
    /// Take the director lock named `sluice-director-<database>.<name>` (see
    /// [`SqlLink::lock`]): refused at once ([`DeliverError::SqlLocked`])
    /// while any other connection holds it; released when the returned lock
    /// is released or dropped, or when its connection dies.
    pub async fn lock(&self, name: &str) -> Result<DirectorLock, DeliverError> {
        Ok(self.link.lock(&self.link.lock_name(LOCK_KIND, name)).await?)
    }

    /// The MySQL lock name of [`SqlJobDbs::lock`]`(name)` (64 characters at most).
    pub fn mysql_lock_name(&self, name: &str) -> String {
        sluice_sql::link::mysql_lock_name(&self.link.lock_name(LOCK_KIND, name))
    }

    /// The PostgreSQL advisory lock key of [`SqlJobDbs::lock`]`(name)`.
    pub fn postgres_lock_key(&self, name: &str) -> i64 {
        sluice_sql::link::postgres_lock_key(&self.link.lock_name(LOCK_KIND, name))
    }

    /// [`SqlJobDbs::lock`] for the director of JobDB `seq`.
    pub async fn lock_jobdb(&self, seq: u64) -> Result<DirectorLock, DeliverError> {
        self.lock(&self.table_names(seq).0).await
    }

    /// The server's id of the session holding JobDB `seq`'s director lock
    /// (see [`DirectorLock::session_id`]), asked on a connection of its own;
    /// `None` when nobody holds it.
    pub async fn jobdb_lock_holder(&self, seq: u64) -> Result<Option<i64>, DeliverError> {
        self.lock_holder(&self.table_names(seq).0).await
    }

    /// The server's id of the session holding [`SqlJobDbs::lock`]`(name)`;
    /// `None` when nobody holds it.
    pub async fn lock_holder(&self, name: &str) -> Result<Option<i64>, DeliverError> {
        Ok(self.link.lock_holder(&self.link.lock_name(LOCK_KIND, name)).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    /// Lock names are what running processes of earlier versions take: a
    /// rename would let an old and a new process hold "the same" lock.
    #[test]
    fn director_lock_names_are_stable() {
        let dbs = SqlJobDbs::new("mysql://u@h/sluice").unwrap();
        assert_eq!(dbs.mysql_lock_name("serve"), "sluice-director-sluice.serve");
        let long = "director-scope.a_director_name_long_enough_to_need_hashing";
        let full = format!("sluice-director-sluice.{long}");
        assert_eq!(dbs.mysql_lock_name(long), format!("sluice-director-{}", hex::encode(&Sha256::digest(full.as_bytes())[..16])));
        let pg = SqlJobDbs::new("postgres://u@h/sluice").unwrap();
        let digest = Sha256::digest(b"sluice-director-sluice.jobs_000001");
        assert_eq!(pg.postgres_lock_key("jobs_000001"), i64::from_be_bytes(digest[..8].try_into().unwrap()));
        assert_eq!(pg.scoped("d1").table_names(7), ("d1_jobs_000007".to_owned(), "d1_job_state_transitions_000007".to_owned()));
    }
}
