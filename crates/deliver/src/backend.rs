//! Where a Centrifuge's JobDBs live: SQLite files in a directory, or table
//! sets in a MySQL/MariaDB or PostgreSQL database (`deliver.jobdb_url`).
//! The Centrifuge and its directors list, open, lock and remove JobDBs only
//! through [`JobDbs`], so the rest of the delivery stage is the same for both.
//!
//! Invariants:
//! - A JobDB is locked before it is opened, and the lock is held by its
//!   director until the JobDB is closed or removed: a file lock (flock) on
//!   `jobdb-NNNNNN.sqlite.lock`, or a lock held by a database session of its
//!   own ([`crate::sqljobdb::SqlJobDbs::lock`]). A second process using the
//!   same directory or database is refused.
//! - Removing a JobDB deletes it whole: its files, or its tables and then
//!   its registry row.
//! - File and database work runs off the async threads (`spawn_blocking`);
//!   SQL locks are taken on the caller's runtime, since their connection
//!   must outlive the call.

use std::path::{Path, PathBuf};

use sluice_core::config::JobDbUrl;

use crate::centrifuge::blocking;
use crate::jobdb::{jobdb_path, list_jobdbs, remove_jobdb_files, JobDb};
use crate::ksuid::Ksuid;
use crate::sqljobdb::{DirectorLock, SqlJobDbs};
use crate::store::JobStore;
use crate::DeliverError;

/// The set of JobDBs of one Centrifuge.
#[allow(clippy::large_enum_variant)] // one per Centrifuge, cloned once per director
#[derive(Clone, Debug)]
pub enum JobDbs {
    /// `jobdb-NNNNNN.sqlite` files in this directory.
    Files(PathBuf),
    /// Table sets in this database.
    Sql(SqlJobDbs),
}

/// The lock a director holds on its JobDB (released when dropped).
#[derive(Debug)]
pub enum JobDbLock {
    File(std::fs::File),
    Sql(DirectorLock),
}

/// A JobDB locked and opened for its director.
pub struct OpenedJobDb {
    pub seq: u64,
    pub name: String,
    pub store: Box<dyn JobStore>,
    pub lock: JobDbLock,
    pub created_ms: i64,
    pub jobs: u64,
    /// The largest job id stored (the writer's ids continue above it).
    pub max_id: Option<Ksuid>,
}

/// Lock `path`'s lock file (held for the director's life).
fn lock_file(path: &Path) -> Result<std::fs::File, DeliverError> {
    let lock_path = PathBuf::from(format!("{}.lock", path.display()));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|source| DeliverError::Io { path: lock_path.display().to_string(), source })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(DeliverError::Locked(path.display().to_string())),
        Err(std::fs::TryLockError::Error(source)) => Err(DeliverError::Io { path: lock_path.display().to_string(), source }),
    }
}

impl JobDbs {
    /// Files in `dir`, or the database at `url` when it is given.
    pub fn new(dir: &Path, url: Option<&JobDbUrl>) -> Result<JobDbs, DeliverError> {
        Self::scoped(dir, url, "")
    }

    /// The JobDBs of director `scope` (`""`: the only director). Files: the
    /// `scope` subdirectory of `dir`; SQL: tables prefixed `<scope>_`.
    pub fn scoped(dir: &Path, url: Option<&JobDbUrl>, scope: &str) -> Result<JobDbs, DeliverError> {
        match url {
            None if scope.is_empty() => Ok(JobDbs::Files(dir.to_owned())),
            None => Ok(JobDbs::Files(dir.join(scope))),
            Some(url) => Ok(JobDbs::Sql(SqlJobDbs::new(url.as_str())?.scoped(scope))),
        }
    }

    /// The directory, or the database URL without its password.
    pub fn describe(&self) -> String {
        match self {
            JobDbs::Files(dir) => dir.display().to_string(),
            JobDbs::Sql(sql) => sql.display().to_owned(),
        }
    }

    /// JobDB `seq`'s name in logs and errors.
    pub fn name(&self, seq: u64) -> String {
        match self {
            JobDbs::Files(dir) => jobdb_path(dir, seq).display().to_string(),
            JobDbs::Sql(sql) => format!("{} ({})", sql.display(), sql.table_names(seq).0),
        }
    }

    /// The JobDBs that exist, oldest first (creating the directory or the registry if needed).
    pub async fn list(&self) -> Result<Vec<u64>, DeliverError> {
        let me = self.clone();
        blocking(PathBuf::from(self.describe()), move || {
            if let JobDbs::Files(dir) = &me {
                std::fs::create_dir_all(dir).map_err(|source| DeliverError::Io { path: dir.display().to_string(), source })?;
            }
            me.list_blocking()
        })
        .await
    }

    /// The JobDBs that exist, oldest first. Blocks.
    pub fn list_blocking(&self) -> Result<Vec<u64>, DeliverError> {
        match self {
            JobDbs::Files(dir) => Ok(list_jobdbs(dir)?.into_iter().map(|(seq, _)| seq).collect()),
            JobDbs::Sql(sql) => Ok(sql.list()?.into_iter().map(|(seq, _)| seq).collect()),
        }
    }

    /// Open JobDB `seq` to read it while a director may write it (the
    /// `sluice jobs` tools): no lock, nothing created. Blocks.
    pub fn open_read_only(&self, seq: u64) -> Result<Box<dyn JobStore>, DeliverError> {
        match self {
            JobDbs::Files(dir) => Ok(Box::new(JobDb::open_read_only(&jobdb_path(dir, seq))?)),
            JobDbs::Sql(sql) => Ok(Box::new(sql.open_existing(seq)?)),
        }
    }

    /// These JobDBs and, in a database server, every other scope's (each
    /// `sluice director`'s), for the read-only tools. Blocks.
    pub fn every_scope(&self) -> Result<Vec<JobDbs>, DeliverError> {
        match self {
            JobDbs::Files(_) => Ok(vec![self.clone()]),
            JobDbs::Sql(sql) => Ok(sql.every_scope()?.into_iter().map(JobDbs::Sql).collect()),
        }
    }

    /// Whether JobDB `seq` still exists (a reader that failed checks whether it was dropped meanwhile). Blocks.
    pub fn exists_blocking(&self, seq: u64) -> bool {
        match self {
            JobDbs::Files(dir) => jobdb_path(dir, seq).exists(),
            // (Unknown after an error: "exists", so the reader reports its own error.)
            JobDbs::Sql(sql) => sql.jobdb_exists(seq).unwrap_or(true),
        }
    }

    /// Lock JobDB `seq`, then open it (creating it if needed).
    pub async fn open(&self, seq: u64) -> Result<OpenedJobDb, DeliverError> {
        let name = self.name(seq);
        let (lock, mut store): (JobDbLock, Box<dyn JobStore>) = match self {
            JobDbs::Files(dir) => {
                let path = jobdb_path(dir, seq);
                blocking(path.clone(), move || {
                    let lock = lock_file(&path)?;
                    let db = JobDb::open(&path)?;
                    Ok((JobDbLock::File(lock), Box::new(db) as Box<dyn JobStore>))
                })
                .await?
            }
            JobDbs::Sql(sql) => {
                let lock = sql.lock_jobdb(seq).await?;
                let sql = sql.clone();
                let db = blocking(PathBuf::from(&name), move || sql.open(seq)).await?;
                (JobDbLock::Sql(lock), Box::new(db) as Box<dyn JobStore>)
            }
        };
        let (store, created_ms, jobs, max_id) = blocking(PathBuf::from(&name), move || {
            let created = store.created_at()?;
            let jobs = store.job_count()?;
            let max_id = store.max_id()?;
            Ok((store, created, jobs, max_id))
        })
        .await?;
        Ok(OpenedJobDb { seq, name, store, lock, created_ms, jobs, max_id })
    }

    /// Delete JobDB `seq` whole (its director has closed it).
    pub async fn remove(&self, seq: u64) -> Result<(), DeliverError> {
        let me = self.clone();
        blocking(PathBuf::from(self.name(seq)), move || match &me {
            JobDbs::Files(dir) => remove_jobdb_files(&jobdb_path(dir, seq)),
            JobDbs::Sql(sql) => sql.drop_jobdb(seq),
        })
        .await
    }
}
