//! The Centrifuge: the set of JobDBs in `data_dir/jobs`, one director each.
//!
//! Invariants:
//! - New jobs go to the newest JobDB only. Older ones are *sealed*: they
//!   take no inserts, drain their retries, and are deleted whole by their
//!   director once every job in them is finished.
//! - Rotation (a new newest) happens every `jobdb_rotate_after` or
//!   `jobdb_max_jobs` jobs, under the write lock, so no insert is in flight
//!   into a JobDB when it is sealed.
//! - A job insert is idempotent on (messageId, destination, generation)
//!   across every live JobDB: the newest enforces it with a unique index;
//!   events logged before the newest JobDB was created are first looked up
//!   in the sealed ones (a route replay after a crash that straddles a
//!   rotation).
//! - On start every JobDB found (files in `data_dir/jobs`, or the registry
//!   of the `deliver.jobdb_url` database: [`JobDbs`]) is locked and picked
//!   up by a director, which reloads its unfinished jobs.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sluice_core::config::{ArchiveTarget, JobDbUrl};
use tokio::sync::RwLock;

use crate::archive::Archive;
use crate::backend::JobDbs;
use crate::control::Catalog;
use crate::director::{self, DirectorExit, DirectorHandle, Shared};
use crate::executor::Executor;
use crate::metrics::DeliverMetrics;
use crate::store::NewJob;
use crate::{now_ms, DeliverError};

#[derive(Debug, Clone)]
pub struct CentrifugeOptions {
    /// Where the JobDB files live (`data_dir/jobs`).
    pub dir: PathBuf,
    /// The database that holds the JobDBs instead (`deliver.jobdb_url`); `None` = files in `dir`.
    pub jobdb_url: Option<JobDbUrl>,
    pub rotate_after: Duration,
    pub max_jobs: u64,
    pub cache_jobs: usize,
    pub connect_timeout: Duration,
    /// Where jobs past their retry window are archived (a local directory or S3).
    pub archive: ArchiveTarget,
    /// Whose JobDBs: `""` for the one director of `sluice serve`, or a
    /// `sluice director`'s name when several share `jobdb_url`.
    pub scope: String,
}

impl CentrifugeOptions {
    pub fn from_config(config: &sluice_core::Config) -> Self {
        let d = &config.deliver;
        CentrifugeOptions {
            dir: config.server.data_dir.join("jobs"),
            jobdb_url: d.jobdb_url.clone(),
            rotate_after: d.jobdb_rotate_after,
            max_jobs: d.jobdb_max_jobs.get(),
            cache_jobs: d.cache_jobs,
            connect_timeout: d.connect_timeout,
            archive: config.archive_target(),
            scope: String::new(),
        }
    }
}

struct Live {
    handle: DirectorHandle,
    created_ms: i64,
    jobs: AtomicU64,
}

struct State {
    newest: Live,
    sealed: Vec<Live>,
    next_seq: u64,
    /// [`Centrifuge::close`] ran (the newest director's task is consumed).
    closed: bool,
}

pub struct Centrifuge {
    shared: Arc<Shared>,
    options: CentrifugeOptions,
    jobdbs: JobDbs,
    state: RwLock<State>,
}

/// Run file and SQLite work off the async threads; `path` names it in errors.
pub(crate) async fn blocking<T: Send + 'static>(
    path: PathBuf,
    f: impl FnOnce() -> Result<T, DeliverError> + Send + 'static,
) -> Result<T, DeliverError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| DeliverError::Io { path: path.display().to_string(), source: std::io::Error::other(e) })?
}

/// JobDB files left in `dir` from before `deliver.jobdb_url` was set are
/// not read while it is: their unfinished jobs wait, undelivered. Say so
/// at start (a switch of backend moves nothing).
fn warn_of_left_files(dir: &std::path::Path) {
    match crate::jobdb::list_jobdbs(dir) {
        Ok(files) if !files.is_empty() => tracing::warn!(
            dir = %dir.display(),
            files = files.len(),
            "JobDB files from before deliver.jobdb_url was set are not read while it is: any unfinished jobs in them are not \
             delivered (`sluice jobs stats` without jobdb_url shows them; unset jobdb_url until they finish, or remove the files \
             once they hold nothing unfinished)"
        ),
        _ => {}
    }
}

impl Centrifuge {
    /// Pick up every JobDB in `options.dir` or the `options.jobdb_url` database (creating the first if none) and start their directors.
    pub async fn open(options: CentrifugeOptions, catalog: Arc<Catalog>, metrics: DeliverMetrics) -> Result<Arc<Centrifuge>, DeliverError> {
        let executor = Executor::new(options.connect_timeout).map_err(|e| DeliverError::Http(e.to_string()))?;
        let dir = options.dir.clone();
        let archive = blocking(dir.clone(), {
            let target = options.archive.clone();
            move || Archive::open(&target)
        })
        .await?;
        tracing::info!(archive = %archive.location, "archive opened");
        let shared = Arc::new(Shared { catalog, executor, archive, metrics, cache_jobs: options.cache_jobs, lock_lost: Default::default() });
        // Clients of destinations deleted or changed are dropped (ends with the centrifuge).
        let weak = Arc::downgrade(&shared);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(crate::executor::SWEEP_EVERY).await;
                let Some(shared) = weak.upgrade() else { return };
                let snapshot = shared.catalog.snapshot();
                shared.executor.drop_unused_clients(snapshot.destinations.values()).await;
            }
        });
        let jobdbs = JobDbs::scoped(&dir, options.jobdb_url.as_ref(), &options.scope)?;
        if options.jobdb_url.is_some() {
            let dir = dir.clone();
            blocking(dir.clone(), move || {
                warn_of_left_files(&dir);
                Ok(())
            })
            .await?;
        }
        let found = jobdbs.list().await?;
        let mut lives = Vec::new();
        for seq in &found {
            match Self::start(*seq, &jobdbs, &shared).await {
                Ok(live) => lives.push(live),
                Err(e) => {
                    // Stop the directors already started: they hold JobDB locks.
                    Self::stop_all(lives).await;
                    return Err(e);
                }
            }
        }
        let next_seq = found.last().map_or(1, |s| s + 1);
        let reusable = lives
            .last()
            .is_some_and(|l| now_ms() - l.created_ms < options.rotate_after.as_millis() as i64 && l.jobs.load(Ordering::Relaxed) < options.max_jobs);
        let (newest, next_seq) = if reusable {
            (lives.pop().expect("checked"), next_seq)
        } else {
            match Self::start(next_seq, &jobdbs, &shared).await {
                Ok(live) => (live, next_seq + 1),
                Err(e) => {
                    Self::stop_all(lives).await;
                    return Err(e);
                }
            }
        };
        for l in &lives {
            l.handle.seal().await;
        }
        if !found.is_empty() {
            tracing::info!(jobdbs = found.len(), location = %jobdbs.describe(), "picked up JobDBs; directors reload their unfinished jobs");
        }
        shared.metrics.jobdbs.set(lives.len() as i64 + 1);
        Ok(Arc::new(Centrifuge { shared, options, jobdbs, state: RwLock::new(State { newest, sealed: lives, next_seq, closed: false }) }))
    }

    /// Lock and open JobDB `seq` (creating it if needed) and start its director.
    /// Stop directors and wait for them (their JobDB locks are released).
    async fn stop_all(lives: Vec<Live>) {
        for l in &lives {
            l.handle.stop();
        }
        for l in lives {
            let _ = l.handle.task.await;
        }
    }

    async fn start(seq: u64, jobdbs: &JobDbs, shared: &Arc<Shared>) -> Result<Live, DeliverError> {
        let opened = jobdbs.open(seq).await?;
        let (created_ms, jobs) = (opened.created_ms, opened.jobs);
        let handle = director::spawn(opened, jobdbs.clone(), shared.clone())?;
        Ok(Live { handle, created_ms, jobs: AtomicU64::new(jobs) })
    }

    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.shared.catalog
    }

    /// Whether one of its directors stopped because another session took
    /// its JobDB's lock (a director of another process adopted the JobDB
    /// while this one could not reach the database). Such a Centrifuge no
    /// longer serves that JobDB; its owner closes it and opens the scope
    /// again once the adopter hands it back.
    pub fn lock_lost(&self) -> bool {
        self.shared.lock_lost.load(Ordering::SeqCst)
    }

    /// Store `jobs` durably (skipping ones that exist); returns how many
    /// were new. `oldest_event_ms` is the log time of the oldest event in
    /// the batch (decides whether sealed JobDBs must be checked).
    pub async fn insert(&self, mut jobs: Vec<NewJob>, oldest_event_ms: i64) -> Result<u64, DeliverError> {
        if jobs.is_empty() {
            return Ok(0);
        }
        self.maybe_rotate().await?;
        let st = self.state.read().await;
        let offered = jobs.len() as u64;
        if oldest_event_ms <= st.newest.created_ms && !st.sealed.is_empty() {
            let keys: Vec<_> = jobs.iter().map(|j| (j.message_id.clone(), j.destination.clone(), j.generation)).collect();
            let mut seen = vec![false; keys.len()];
            for l in &st.sealed {
                match l.handle.writer.exists(keys.clone()).await {
                    Ok(found) => seen.iter_mut().zip(found).for_each(|(s, f)| *s |= f),
                    Err(DeliverError::Closed) => {} // dropped meanwhile: all its jobs finished
                    Err(e) => return Err(e),
                }
            }
            let mut it = seen.into_iter();
            jobs.retain(|_| !it.next().expect("same length"));
        }
        let n = st.newest.handle.writer.insert(jobs).await?;
        st.newest.jobs.fetch_add(n, Ordering::Relaxed);
        self.shared.metrics.jobs_inserted.inc_by(n);
        self.shared.metrics.jobs_duplicate.inc_by(offered - n);
        Ok(n)
    }

    /// Start a new newest JobDB when the current one is old or full; forget finished sealed ones.
    pub async fn maybe_rotate(&self) -> Result<(), DeliverError> {
        let due = |l: &Live| {
            now_ms() - l.created_ms >= self.options.rotate_after.as_millis() as i64 || l.jobs.load(Ordering::Relaxed) >= self.options.max_jobs
        };
        let reap = {
            let st = self.state.read().await;
            let oldest = st.sealed.iter().map(|l| l.created_ms).chain([st.newest.created_ms]).min().unwrap_or_else(now_ms);
            self.shared.metrics.oldest_jobdb_age_seconds.set((now_ms() - oldest) / 1000);
            st.sealed.iter().any(|l| l.handle.task.is_finished())
        };
        if !due(&self.state.read().await.newest) && !reap {
            return Ok(());
        }
        let mut st = self.state.write().await;
        st.sealed.retain(|l| !l.handle.task.is_finished());
        if due(&st.newest) && st.newest.jobs.load(Ordering::Relaxed) > 0 {
            let seq = st.next_seq;
            let fresh = Self::start(seq, &self.jobdbs, &self.shared).await?;
            st.next_seq += 1;
            let old = std::mem::replace(&mut st.newest, fresh);
            tracing::info!(sealed = %old.handle.name, jobs = old.jobs.load(Ordering::Relaxed), newest = seq, "JobDB rotated");
            old.handle.seal().await;
            st.sealed.push(old);
        }
        self.shared.metrics.jobdbs.set(st.sealed.len() as i64 + 1);
        Ok(())
    }

    /// Rotate and reap on a timer (so an idle JobDB is still sealed and dropped).
    pub fn spawn_housekeeping(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if let Err(e) = me.maybe_rotate().await {
                    tracing::error!(error = %e, "JobDB rotation failed");
                }
            }
        })
    }

    /// Stop every director (requests in flight get a few seconds) and close
    /// the JobDBs. Closing again does nothing.
    pub async fn close(&self) {
        let mut st = self.state.write().await;
        if std::mem::replace(&mut st.closed, true) {
            return;
        }
        let sealed: Vec<Live> = st.sealed.drain(..).collect();
        for l in sealed.iter().chain(std::iter::once(&st.newest)) {
            l.handle.stop();
        }
        for l in sealed {
            let _ = l.handle.task.await;
        }
        let exit = (&mut st.newest.handle.task).await;
        if !matches!(exit, Ok(DirectorExit::Stopped) | Ok(DirectorExit::Dropped)) {
            tracing::warn!("a director ended abnormally: {exit:?}");
        }
    }
}
