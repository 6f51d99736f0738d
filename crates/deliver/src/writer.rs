//! The one thread that owns a JobDB's connection (a [`JobStore`]: an SQLite
//! file, or a table set in MySQL/MariaDB or PostgreSQL driven through a
//! small runtime of its own on this thread).
//!
//! Invariants:
//! - Every write to a JobDB goes through its writer thread, one transaction
//!   per drained group of commands (group commit): many route batches and
//!   many state changes share one durable commit (SQLite `synchronous =
//!   FULL`; the SQL servers' durable commit).
//! - Job ids are assigned here, in commit order, by a monotonic KSUID
//!   generator; the writer tells the director about new jobs and loaded
//!   pages through the same ordered channel, *after* the commit. So the
//!   director sees inserts and pages in id order, and never learns of a job
//!   that is not durable.
//! - A reply is sent only after the commit it depends on.
//! - The command queue is bounded where a producer can outrun the thread:
//!   commands that wait for a reply (inserts from the route, the director's
//!   `executing` rows, reads) hold one of [`ASK_QUEUE`] slots, taken
//!   asynchronously, until answered. The director's fire-and-forget commands
//!   (outcome rows, page and reload requests) take none: the director
//!   sends them from synchronous code and must never wait on the writer,
//!   which itself reports to the director (a wait either way could close a
//!   cycle); they are bounded by the director's own state (rows of jobs in
//!   memory, one page and one reload per destination outstanding).

use std::collections::HashMap;

use bytes::Bytes;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::{mpsc::UnboundedSender, oneshot, Semaphore};

use crate::ksuid::{Ksuid, KsuidGenerator};
use crate::retry::{ErrorStreak, Report, LOG_EVERY};
use crate::store::JobStore;
use crate::store::{NewJob, StoredJob, Transition};
use crate::DeliverError;

/// What the writer tells its director, in commit order.
#[derive(Debug)]
pub enum FromWriter {
    /// Jobs just committed.
    Inserted(Vec<StoredJob>),
    /// A page requested with [`WriterHandle::load_page`]; `complete` when it
    /// reached the end of the table.
    Loaded { jobs: Vec<StoredJob>, complete: bool },
    /// Jobs asked for by id with [`WriterHandle::load_ids`] (spilled jobs coming back).
    Reloaded { destination: String, jobs: Vec<StoredJob> },
    /// A group failed and was rolled back; `lost` is what the director sent
    /// without waiting for an answer, so it can send it again.
    Failed { error: String, lost: Lost },
    /// The first group committed after failed ones: writes work again.
    Recovered { failures: u64, failing_for: std::time::Duration },
}

/// Fault injection for tests: make the transactions of JobDBs whose name
/// (an SQLite JobDB's path) starts with a prefix fail as a full disk makes
/// them fail, without a full disk. Off by default; a relaxed load is all it
/// costs when nothing is armed.
pub mod faults {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;

    static ARMED: AtomicBool = AtomicBool::new(false);
    static PREFIXES: Mutex<Vec<String>> = Mutex::new(Vec::new());

    /// Fail (`on`) or stop failing the commits of JobDBs named `prefix…`.
    pub fn fail_commits(prefix: &str, on: bool) {
        let mut p = PREFIXES.lock().expect("faults");
        p.retain(|x| x != prefix);
        if on {
            p.push(prefix.to_owned());
        }
        ARMED.store(!p.is_empty(), Ordering::SeqCst);
    }

    pub(crate) fn check(name: &str) -> Result<(), crate::DeliverError> {
        if ARMED.load(Ordering::Relaxed) && PREFIXES.lock().expect("faults").iter().any(|p| name.starts_with(p.as_str())) {
            return Err(crate::DeliverError::WriteFailed(format!("database or disk is full (injected) on {name}")));
        }
        Ok(())
    }
}

/// Fire-and-forget work of a failed group.
#[derive(Debug, Default)]
pub struct Lost {
    /// A page request (ask again).
    pub page: bool,
    /// Reload requests: destination and ids (spill them again).
    pub reloads: Vec<(String, Vec<Ksuid>)>,
    /// Transitions sent without waiting (append them again).
    pub rows: Vec<Transition>,
}

type Reply<T> = oneshot::Sender<Result<T, DeliverError>>;

enum Cmd {
    Insert {
        jobs: Vec<NewJob>,
        reply: Reply<u64>,
    },
    Exists {
        keys: Vec<(String, String, i64)>,
        reply: Reply<Vec<bool>>,
    },
    /// Fire-and-forget: a failure comes back as [`FromWriter::Failed`].
    Transitions {
        rows: Vec<Transition>,
    },
    LoadPage {
        after: Option<Ksuid>,
        limit: usize,
    },
    LoadIds {
        destination: String,
        ids: Vec<Ksuid>,
    },
    Execute {
        rows: Vec<Transition>,
        fetch: Vec<Ksuid>,
        reply: Reply<HashMap<Ksuid, Bytes>>,
    },
    History {
        id: Ksuid,
        reply: Reply<Vec<Transition>>,
    },
    CountUnfinished {
        reply: Reply<u64>,
    },
    /// Finish what was sent before, then end the thread (closing the connection).
    Close,
}

/// Commands waiting for a reply, queued or in the current group, at most:
/// beyond, [`WriterHandle`]'s async calls wait for a slot, so route inserts
/// that outrun the JobDB push back on the route (which then commits its
/// offset later) instead of queueing without bound. Well above one group's
/// worth of concurrent callers (route partitions, request batches).
pub const ASK_QUEUE: usize = 1024;

/// A cheap handle to a JobDB's writer thread.
#[derive(Clone)]
pub struct WriterHandle {
    tx: mpsc::Sender<Cmd>,
    /// [`ASK_QUEUE`] slots shared by every clone (see the module docs).
    asks: Arc<Semaphore>,
    /// The JobDB's name ([`JobStore::name`]).
    pub name: String,
}

/// Most commands folded into one transaction.
const MAX_GROUP: usize = 4096;

impl WriterHandle {
    /// Start the writer thread for `db`; it reports to `director`.
    /// `thread_name` names the thread (e.g. `jobdb-000001`); `max_id` is
    /// the largest job id in `db` ([`JobStore::max_id`], read by the caller
    /// off the async threads): new ids continue above it.
    pub fn spawn(
        db: Box<dyn JobStore>,
        thread_name: String,
        max_id: Option<Ksuid>,
        director: UnboundedSender<FromWriter>,
    ) -> Result<(WriterHandle, JoinHandle<()>), DeliverError> {
        // Unbounded in itself: asks are bounded by `asks`, the rest by the director (module docs).
        let (tx, rx) = mpsc::channel();
        let name = db.name().to_owned();
        let ids = KsuidGenerator::above(max_id);
        let thread = std::thread::Builder::new()
            .name(thread_name)
            .spawn(move || run(db, rx, director, ids))
            .map_err(|source| DeliverError::Io { path: name.clone(), source })?;
        Ok((WriterHandle { tx, asks: Arc::new(Semaphore::new(ASK_QUEUE)), name }, thread))
    }

    fn send(&self, cmd: Cmd) -> Result<(), DeliverError> {
        self.tx.send(cmd).map_err(|_| DeliverError::Closed)
    }

    /// Send the command `make` builds and wait for its reply (sent after the commit).
    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Cmd) -> Result<T, DeliverError> {
        let _slot = self.asks.acquire().await.map_err(|_| DeliverError::Closed)?;
        let (reply, rx) = oneshot::channel();
        self.send(make(reply))?;
        rx.await.map_err(|_| DeliverError::Closed)?
    }

    /// Insert jobs (skipping idempotency-key repeats); returns how many were new.
    pub async fn insert(&self, jobs: Vec<NewJob>) -> Result<u64, DeliverError> {
        self.ask(|reply| Cmd::Insert { jobs, reply }).await
    }

    pub async fn exists(&self, keys: Vec<(String, String, i64)>) -> Result<Vec<bool>, DeliverError> {
        self.ask(|reply| Cmd::Exists { keys, reply }).await
    }

    /// Append transitions without waiting (a failure is reported as [`FromWriter::Failed`]).
    pub fn transitions_nowait(&self, rows: Vec<Transition>) -> Result<(), DeliverError> {
        self.send(Cmd::Transitions { rows })
    }

    /// Ask for these jobs by id; they arrive as [`FromWriter::Reloaded`].
    pub fn load_ids(&self, destination: String, ids: Vec<Ksuid>) -> Result<(), DeliverError> {
        self.send(Cmd::LoadIds { destination, ids })
    }

    /// Append `rows` (the `executing` transitions) and read the payloads of
    /// `fetch`, in one commit.
    pub async fn execute(&self, rows: Vec<Transition>, fetch: Vec<Ksuid>) -> Result<HashMap<Ksuid, Bytes>, DeliverError> {
        self.ask(|reply| Cmd::Execute { rows, fetch, reply }).await
    }

    /// Ask for a page of jobs after `after`; it arrives as [`FromWriter::Loaded`].
    pub fn load_page(&self, after: Option<Ksuid>, limit: usize) -> Result<(), DeliverError> {
        self.send(Cmd::LoadPage { after, limit })
    }

    pub async fn history(&self, id: Ksuid) -> Result<Vec<Transition>, DeliverError> {
        self.ask(|reply| Cmd::History { id, reply }).await
    }

    /// Ask the thread to end once everything sent before is done; other
    /// handles then get [`DeliverError::Closed`].
    pub fn close(&self) {
        let _ = self.tx.send(Cmd::Close);
    }

    pub async fn count_unfinished(&self) -> Result<u64, DeliverError> {
        self.ask(|reply| Cmd::CountUnfinished { reply }).await
    }
}

/// What to do once the group's transaction has ended: a reply to send, or
/// (for fire-and-forget work) what to hand back to the director if it failed.
enum Pending {
    Insert(Reply<u64>, u64),
    Exists(Reply<Vec<bool>>, Vec<bool>),
    Rows(Vec<Transition>),
    Page,
    Reload(String, Vec<Ksuid>),
    History(Reply<Vec<Transition>>, Vec<Transition>),
    Payloads(Reply<HashMap<Ksuid, Bytes>>, HashMap<Ksuid, Bytes>),
    Count(Reply<u64>, u64),
}

impl Pending {
    /// Answer after the commit (`failed` = None) or the rollback.
    fn finish(self, failed: Option<&str>, lost: &mut Lost) {
        fn answer<T>(r: Reply<T>, v: T, failed: Option<&str>) {
            let _ = r.send(match failed {
                None => Ok(v),
                Some(msg) => Err(DeliverError::WriteFailed(msg.to_owned())),
            });
        }
        match self {
            Pending::Insert(r, n) => answer(r, n, failed),
            Pending::Exists(r, v) => answer(r, v, failed),
            Pending::History(r, v) => answer(r, v, failed),
            Pending::Payloads(r, v) => answer(r, v, failed),
            Pending::Count(r, n) => answer(r, n, failed),
            Pending::Rows(rows) if failed.is_some() => lost.rows.extend(rows),
            Pending::Page if failed.is_some() => lost.page = true,
            Pending::Reload(d, ids) if failed.is_some() => lost.reloads.push((d, ids)),
            Pending::Rows(_) | Pending::Page | Pending::Reload(..) => {}
        }
    }
}

fn run(mut db: Box<dyn JobStore>, rx: mpsc::Receiver<Cmd>, director: UnboundedSender<FromWriter>, mut ids: KsuidGenerator) {
    let mut closing = false;
    // Failed transactions are logged once per run, then summarized (a full
    // disk fails every one of them alike).
    let mut streak = ErrorStreak::new(LOG_EVERY);
    while !closing {
        let Ok(first) = rx.recv() else { break };
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(c) => group.push(c),
                Err(_) => break,
            }
        }
        if let Some(i) = group.iter().position(|c| matches!(c, Cmd::Close)) {
            closing = true;
            let mut lost = Lost::default();
            for late in group.drain(i..).skip(1) {
                fail_cmd(late, || DeliverError::Closed, &mut lost);
            }
        }
        let mut pending = Vec::with_capacity(group.len());
        let mut to_director = Vec::new();
        let result = db.begin().and_then(|()| {
            for cmd in group.drain(..) {
                apply(db.as_mut(), cmd, &mut ids, &mut pending, &mut to_director)?;
            }
            faults::check(db.name())?;
            db.commit()
        });
        match result {
            Ok(()) => {
                if let Some(r) = streak.success(Instant::now()) {
                    tracing::info!(jobdb = %db.name(), failures = r.failures, failing_for_s = r.failing_for.as_secs_f64(), "JobDB writes work again");
                    let _ = director.send(FromWriter::Recovered { failures: r.failures, failing_for: r.failing_for });
                }
                for msg in to_director {
                    let _ = director.send(msg);
                }
                let mut unused = Lost::default();
                for p in pending {
                    p.finish(None, &mut unused);
                }
            }
            Err(e) => {
                db.rollback();
                match streak.failure(Instant::now()) {
                    Report::First => tracing::error!(
                        jobdb = %db.name(),
                        error = %e,
                        "JobDB transaction failed; rolled back. Its work is retried with backoff up to 5 s; further failures are summarized every 10 s"
                    ),
                    Report::Summary { failures, failing_for } => tracing::error!(
                        jobdb = %db.name(),
                        error = %e,
                        failures,
                        failing_for_s = failing_for.as_secs_f64(),
                        "JobDB transactions still failing; rolled back, retried with backoff"
                    ),
                    Report::Quiet => tracing::debug!(jobdb = %db.name(), error = %e, "JobDB transaction failed again"),
                }
                let msg = e.to_string();
                let mut lost = Lost::default();
                // Commands after the failing one in this group were never applied: fail them too.
                for cmd in group {
                    fail_cmd(cmd, || DeliverError::WriteFailed(msg.clone()), &mut lost);
                }
                for p in pending {
                    p.finish(Some(&msg), &mut lost);
                }
                let _ = director.send(FromWriter::Failed { error: msg, lost });
            }
        }
    }
}

fn fail_cmd(cmd: Cmd, err: impl Fn() -> DeliverError, lost: &mut Lost) {
    match cmd {
        Cmd::Insert { reply, .. } => drop(reply.send(Err(err()))),
        Cmd::Exists { reply, .. } => drop(reply.send(Err(err()))),
        Cmd::Transitions { rows } => lost.rows.extend(rows),
        Cmd::LoadPage { .. } => lost.page = true,
        Cmd::LoadIds { destination, ids } => lost.reloads.push((destination, ids)),
        Cmd::Execute { reply, .. } => drop(reply.send(Err(err()))),
        Cmd::History { reply, .. } => drop(reply.send(Err(err()))),
        Cmd::CountUnfinished { reply } => drop(reply.send(Err(err()))),
        Cmd::Close => {}
    }
}

fn apply(
    db: &mut dyn JobStore,
    cmd: Cmd,
    ids: &mut KsuidGenerator,
    pending: &mut Vec<Pending>,
    to_director: &mut Vec<FromWriter>,
) -> Result<(), DeliverError> {
    match cmd {
        Cmd::Insert { jobs, reply } => {
            let now_s = (crate::now_ms() / 1000) as u64;
            let with_ids: Vec<(Ksuid, &NewJob)> = jobs.iter().map(|job| (ids.next(now_s), job)).collect();
            let stored = db.insert_jobs(&with_ids)?;
            let ids: Vec<Ksuid> = with_ids.into_iter().map(|(id, _)| id).collect();
            let inserted: Vec<StoredJob> = jobs
                .into_iter()
                .zip(ids)
                .zip(stored)
                .filter(|(_, stored)| *stored)
                .map(|((job, id), _)| StoredJob { id, job, state: crate::store::JobState::AwaitingScheduling, seq: 0, attempt: 0, retry_at: None })
                .collect();
            pending.push(Pending::Insert(reply, inserted.len() as u64));
            if !inserted.is_empty() {
                to_director.push(FromWriter::Inserted(inserted));
            }
        }
        Cmd::Exists { keys, reply } => {
            let mut found = Vec::with_capacity(keys.len());
            for (m, d, g) in &keys {
                found.push(db.job_exists(m, d, *g)?);
            }
            pending.push(Pending::Exists(reply, found));
        }
        Cmd::Transitions { rows } => {
            db.append_transitions(&rows)?;
            pending.push(Pending::Rows(rows));
        }
        Cmd::LoadPage { after, limit } => {
            pending.push(Pending::Page);
            let jobs = db.page(after, limit)?;
            let complete = jobs.len() < limit;
            to_director.push(FromWriter::Loaded { jobs, complete });
        }
        Cmd::LoadIds { destination, ids } => {
            let mut jobs = Vec::with_capacity(ids.len());
            for id in &ids {
                jobs.extend(db.get(*id)?);
            }
            pending.push(Pending::Reload(destination.clone(), ids));
            to_director.push(FromWriter::Reloaded { destination, jobs });
        }
        Cmd::Execute { rows, fetch, reply } => {
            db.append_transitions(&rows)?;
            let mut payloads = HashMap::with_capacity(fetch.len());
            for id in fetch {
                if let Some(p) = db.payload(id)? {
                    payloads.insert(id, p);
                }
            }
            pending.push(Pending::Payloads(reply, payloads));
        }
        Cmd::History { id, reply } => {
            let h = db.history(id)?;
            pending.push(Pending::History(reply, h));
        }
        Cmd::CountUnfinished { reply } => {
            let n = db.count_unfinished()?;
            pending.push(Pending::Count(reply, n));
        }
        Cmd::Close => {}
    }
    Ok(())
}
