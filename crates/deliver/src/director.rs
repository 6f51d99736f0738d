//! A director: the one scheduler of one JobDB.
//!
//! Invariants:
//! - The director holds its JobDB's lock (a lock file, or a lock held by a
//!   database session of its own: [`crate::backend::JobDbLock`]) for as
//!   long as it runs; no other director (in this or another process) drives
//!   the same JobDB. A lock held by a database session is checked every
//!   [`LOCK_CHECK_INTERVAL`]: if its session ended, the director takes the
//!   lock again; if another director has it, this one stops at once; if
//!   the database does not answer, it starts no request (it cannot know
//!   whether the lock is still its own) and asks again every interval,
//!   resuming once it holds the lock again (a database restart does not
//!   strand the JobDB).
//! - It learns of jobs only from its writer ([`FromWriter`]), in commit
//!   order, so it never schedules a job that is not durable. `loaded_upto`
//!   is the highest id it has seen; every unfinished job at or below it is
//!   in memory. When the in-memory cache is full it stops taking new jobs
//!   ("backlog") and pages them in from the JobDB as room frees.
//! - Before a request is sent, its `executing` transition is committed. So
//!   after a crash, a job whose latest state is `executing` may or may not
//!   have reached its endpoint: it is sent again (at-least-once; the
//!   `Idempotency-Key` header lets the endpoint drop the copy) and counted in
//!   `sluice_deliver_reexecuted_after_restart`.
//! - Fairness: two-level round-robin. Destinations with ready jobs take turns
//!   (a turn sends up to `priority` × [`TURN`] requests); inside a
//!   destination, its (source, destination) pairs take turns one job each.
//!   A destination that is paused, at its in-flight or rate limit, or whose
//!   circuit is open, is skipped without holding up any other.
//! - Memory: jobs in memory are bounded by `cache_jobs`, and one
//!   destination may hold at most a quarter of that. A new job beyond
//!   either bound is *spilled*: only its id (20 bytes) is kept, in a list per
//!   destination, and the job is read back from the JobDB when its
//!   destination has room again. So a dead destination's backlog neither
//!   grows memory without bound nor keeps other destinations' new jobs out
//!   of memory. Payloads are kept only for the first [`PAYLOAD_WINDOW`] ready
//!   jobs of each destination and fetched from the JobDB (in the same round
//!   trip as the `executing` rows) for the rest.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt as _;
use rand::Rng;
use sluice_core::config::NativeTarget;
use sluice_core::Shutdown;
use tokio::sync::mpsc::{channel, unbounded_channel, Receiver, Sender, UnboundedReceiver};

use crate::archive::{Archive, ArchivedJob};
use crate::backend::{JobDbLock, JobDbs, OpenedJobDb};
use crate::control::Catalog;
use crate::executor::{Attempt, Executor, Verdict};
use crate::gate::{Blocked, Destination, Permit};
use crate::ksuid::Ksuid;
use crate::metrics::DeliverMetrics;
use crate::now_ms;
use crate::store::{JobState, StoredJob, Transition};
use crate::writer::{FromWriter, WriterHandle};

/// Requests per destination turn, times its priority.
pub const TURN: u32 = 8;
/// Ready jobs per destination whose payload stays in memory.
pub const PAYLOAD_WINDOW: usize = 2048;
/// Most requests started per scheduling pass.
const MAX_DISPATCH: usize = 1024;
/// How often a director checks that its database session still holds its lock.
pub const LOCK_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// A failed archive write is tried again after this.
const ARCHIVE_RETRY: Duration = Duration::from_secs(30);

/// What every director of a process shares.
pub struct Shared {
    pub catalog: Arc<Catalog>,
    pub executor: Executor,
    pub archive: Archive,
    pub metrics: DeliverMetrics,
    pub cache_jobs: usize,
    /// Set when a director stopped because another session holds its lock
    /// (another process adopted the JobDB): [`crate::Centrifuge::lock_lost`].
    pub lock_lost: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Where {
    Ready,
    Delayed,
    InFlight,
    Archiving,
}

struct Job {
    message_id: String,
    source: String,
    generation: i64,
    dest: Arc<Destination>,
    payload: Option<Bytes>,
    created_at: i64,
    expires_at: i64,
    received_at: i64,
    seq: i64,
    attempt: i64,
    at: Where,
    /// The last attempt's outcome, recorded with `archived`.
    last: Option<(Option<u16>, Option<String>)>,
    /// Its archive write failed: when due again, archive (do not send).
    archive_due: bool,
}

/// A destination's ready jobs, by pair. It exists (in `queues`, and once in
/// `dest_ring`) exactly while it holds a ready job.
struct DestQueue {
    dest: Arc<Destination>,
    pairs: HashMap<String, VecDeque<Ksuid>>,
    ring: VecDeque<String>,
    ready: usize,
    /// When it got its first ready job: a batch destination's batch is due
    /// once it is full or this is `batch_max_age` old.
    since: Instant,
}

impl DestQueue {
    /// The job [`DestQueue::next_ready`] would give.
    fn front(&self) -> Option<Ksuid> {
        self.ring.front().and_then(|source| self.pairs.get(source)).and_then(|pair| pair.front().copied())
    }

    /// The next ready job, the pairs taking turns one job each.
    fn next_ready(&mut self) -> Option<Ksuid> {
        let source = self.ring.pop_front()?;
        let pair = self.pairs.get_mut(&source).expect("pair in ring");
        let id = pair.pop_front().expect("pairs in the ring are not empty");
        self.ready -= 1;
        if pair.is_empty() {
            self.pairs.remove(&source);
        } else {
            self.ring.push_back(source);
        }
        Some(id)
    }
}

/// One request to start: its jobs (one, or a batch destination's batch) and its permit.
type Request = (Vec<Ksuid>, Permit);

pub(crate) enum Msg {
    Done {
        id: Ksuid,
        attempt: Attempt,
    },
    /// The `executing` rows did not commit: these never left.
    Requeue(Vec<Ksuid>),
    Archived {
        id: Ksuid,
        result: Result<(), String>,
    },
    /// No more inserts will come; drop the JobDB once every job is finished.
    Seal,
}

/// Messages queued for a director at most. Its tasks (one per request in
/// flight or archive) each send one message when they end, and wait
/// asynchronously for room when the director is behind; the director never
/// waits on them, so a full inbox cannot deadlock it. Well above the
/// requests one director has in flight at a time.
const INBOX: usize = 4096;

/// A job on its way out.
struct Outgoing {
    id: Ksuid,
    idempotency_key: String,
    body: Bytes,
    /// For a `kafka` destination's message key and headers, a `postgres`
    /// one's row id and schema.
    message_id: Arc<str>,
    source: Arc<str>,
}

impl crate::batch::HasBody for Outgoing {
    fn body(&self) -> &Bytes {
        &self.body
    }
}

/// Send one request's jobs (each through the destination function, if it
/// has one): one request per job, or for a batch destination one request
/// per `batch_max_bytes` of them; every job's attempt.
async fn send_request(executor: &Executor, metrics: &DeliverMetrics, permit: &Permit, jobs: Vec<Outgoing>) -> Vec<(Ksuid, Attempt)> {
    sluice_core::crash::panic_point("deliver.send_request");
    let settings = permit.destination.settings();
    let mut ended = Vec::new();
    let mut out = Vec::with_capacity(jobs.len());
    for mut job in jobs {
        if let Some(f) = &settings.function {
            match f.apply(job.body).await {
                Ok(body) => job.body = body,
                Err(ended_by_function) => {
                    ended.push((job.id, ended_by_function));
                    continue;
                }
            }
        }
        out.push(job);
    }
    // `kafka`, `postgres` and `s3`: one outcome per job from one request.
    let (allow_private_network, timeout) = (settings.target.allow_private_network, settings.target.request_timeout);
    let grouped = match &settings.native {
        Some(NativeTarget::Kafka(target)) => {
            let messages: Vec<crate::kafka::Message> = out
                .iter()
                .map(|j| crate::kafka::Message { message_id: &j.message_id, idempotency_key: &j.idempotency_key, source: &j.source, body: &j.body })
                .collect();
            Some(executor.kafka.send(target, allow_private_network, timeout, &messages).await)
        }
        Some(NativeTarget::Postgres) => {
            let loads: Vec<crate::warehouse::Load> =
                out.iter().map(|j| crate::warehouse::Load { message_id: &j.message_id, source: &j.source, body: &j.body }).collect();
            Some(executor.warehouses.load(&settings.target.url, allow_private_network, timeout, &loads).await)
        }
        Some(NativeTarget::S3(target)) => {
            let entries: Vec<crate::lake::Entry> = out.iter().map(|j| crate::lake::Entry { id: j.id, source: &j.source, body: &j.body }).collect();
            Some(executor.lakes.write(target, allow_private_network, timeout, &entries).await)
        }
        None => None,
    };
    if let Some(attempts) = grouped {
        // One request for the circuit breaker, which judges the destination, not its jobs:
        // up if it took any job (a `postgres` event waiting for a schema change, one table an
        // operator broke, a message a `kafka` topic refused must not open it for the others);
        // failed if it took none and some must be retried.
        let verdict = if attempts.iter().any(|a| a.verdict == Verdict::Succeeded) {
            Verdict::Succeeded
        } else if attempts.iter().any(|a| a.verdict == Verdict::Retry) {
            Verdict::Retry
        } else {
            attempts.first().map_or(Verdict::Succeeded, |a| a.verdict)
        };
        if attempts.iter().any(|a| a.verdict == Verdict::Succeeded) {
            sluice_core::crash::crash_point("deliver.after_http_success");
        }
        permit.destination.record(verdict, permit.probe, Instant::now());
        if let Some(last) = attempts.last() {
            permit.destination.metrics(metrics).attempt_seconds.observe(last.elapsed.as_secs_f64());
        }
        ended.extend(out.iter().map(|j| j.id).zip(attempts));
        return ended;
    }
    let chunks: Vec<Vec<Outgoing>> = match settings.batch {
        None => out.into_iter().map(|j| vec![j]).collect(),
        Some(b) => crate::batch::chunks(out, b.max_bytes),
    };
    for chunk in chunks {
        let (key, body) = match (settings.batch, &chunk[..]) {
            (None, [one]) => (one.idempotency_key.clone(), one.body.clone()),
            _ => crate::batch::request(chunk.iter().map(|j| (j.idempotency_key.as_str(), &j.body))),
        };
        let attempt = executor.send(&settings.target, &key, body).await;
        if attempt.verdict == Verdict::Succeeded {
            // Between the endpoint's 2xx and the `succeeded` rows: the at-least-once window.
            sluice_core::crash::crash_point("deliver.after_http_success");
        }
        permit.destination.record(attempt.verdict, permit.probe, Instant::now());
        permit.destination.metrics(metrics).attempt_seconds.observe(attempt.elapsed.as_secs_f64());
        ended.extend(chunk.iter().map(|j| (j.id, attempt.clone())));
    }
    ended
}

/// The handle the Centrifuge keeps for a running director.
pub struct DirectorHandle {
    pub seq: u64,
    /// The JobDB's name in logs ([`JobDbs::name`]).
    pub name: String,
    pub writer: WriterHandle,
    pub(crate) inbox: Sender<Msg>,
    /// Stops the director: requests in flight get a few seconds, their
    /// outcomes are recorded, the JobDB is closed.
    stop: Shutdown,
    pub task: tokio::task::JoinHandle<DirectorExit>,
}

/// How a director ended.
#[derive(Debug, PartialEq, Eq)]
pub enum DirectorExit {
    /// Sealed and every job finished: the JobDB was deleted.
    Dropped,
    Stopped,
}

impl DirectorHandle {
    pub async fn seal(&self) {
        let _ = self.inbox.send(Msg::Seal).await;
    }

    pub fn stop(&self) {
        self.stop.trigger();
    }
}

pub(crate) struct Director {
    seq: u64,
    name: String,
    /// Where the JobDB lives (to remove it when finished).
    jobdbs: JobDbs,
    lock: Option<JobDbLock>,
    writer: Option<WriterHandle>,
    writer_thread: Option<std::thread::JoinHandle<()>>,
    shared: Arc<Shared>,
    inbox_tx: Sender<Msg>,
    stop: Shutdown,
    jobs: HashMap<Ksuid, Job>,
    queues: HashMap<String, DestQueue>,
    dest_ring: VecDeque<String>,
    delayed: BinaryHeap<Reverse<(i64, Ksuid)>>,
    loaded_upto: Option<Ksuid>,
    backlog: bool,
    page_pending: bool,
    sealed: bool,
    stopping: bool,
    rows: Vec<Transition>,
    reported_in_memory: i64,
    /// Jobs in memory per destination.
    per_dest: HashMap<String, usize>,
    /// Ids of jobs kept only in the JobDB, per destination, oldest first.
    spilled: HashMap<String, VecDeque<Ksuid>>,
    /// Destinations with a reload in flight.
    reloading: std::collections::HashSet<String>,
    last_report: Instant,
    last_lock_check: Instant,
    /// Since when the lock could not be confirmed (the database did not
    /// answer): no request is started until it is.
    lock_unconfirmed: Option<Instant>,
    /// JobDB transactions failed in a row (reset when the writer commits again).
    write_failures: u32,
    /// After a failed JobDB write, nothing is written (no request started, no
    /// transition flushed, no page read) until then: exponential backoff
    /// instead of a hot loop of failing transactions on a full disk.
    write_retry_at: Option<Instant>,
}

/// Start a director for an opened JobDB. It starts in backlog mode, so it
/// pages in every unfinished job (a pick-up after a crash, or a restart).
pub(crate) fn spawn(opened: OpenedJobDb, jobdbs: JobDbs, shared: Arc<Shared>) -> Result<DirectorHandle, crate::DeliverError> {
    let OpenedJobDb { seq, name, store, lock, max_id, .. } = opened;
    // Unbounded on purpose: the writer thread must never wait on the
    // director, which waits on the writer (`count_unfinished`, `close`); a
    // bounded channel here could close that cycle. What the writer sends is
    // the answer to the director's own requests (one page, one reload per
    // destination outstanding) and one message per committed group of
    // inserts, which the director drains on every turn of its loop.
    let (writer_tx, writer_rx) = unbounded_channel();
    let (writer, writer_thread) = WriterHandle::spawn(store, format!("jobdb-{seq:06}"), max_id, writer_tx)?;
    let (inbox_tx, inbox_rx) = channel(INBOX);
    let stop = Shutdown::new();
    let director = Director {
        seq,
        name: name.clone(),
        jobdbs,
        lock: Some(lock),
        writer: Some(writer.clone()),
        writer_thread: Some(writer_thread),
        shared,
        inbox_tx: inbox_tx.clone(),
        stop: stop.clone(),
        jobs: HashMap::new(),
        queues: HashMap::new(),
        dest_ring: VecDeque::new(),
        delayed: BinaryHeap::new(),
        loaded_upto: None,
        backlog: true,
        page_pending: false,
        sealed: false,
        stopping: false,
        rows: Vec::new(),
        reported_in_memory: 0,
        per_dest: HashMap::new(),
        spilled: HashMap::new(),
        reloading: Default::default(),
        last_report: Instant::now(),
        last_lock_check: Instant::now(),
        lock_unconfirmed: None,
        write_failures: 0,
        write_retry_at: None,
    };
    let task = tokio::spawn(director.run(inbox_rx, writer_rx));
    Ok(DirectorHandle { seq, name, writer, inbox: inbox_tx, stop, task })
}

impl Director {
    fn writer(&self) -> &WriterHandle {
        self.writer.as_ref().expect("writer open while running")
    }

    async fn run(mut self, mut inbox: Receiver<Msg>, mut from_writer: UnboundedReceiver<FromWriter>) -> DirectorExit {
        let wake = self.shared.catalog.wake.clone();
        let stop = self.stop.clone();
        loop {
            let notified = wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();

            while let Ok(m) = from_writer.try_recv() {
                self.on_writer(m);
            }
            while let Ok(m) = inbox.try_recv() {
                self.on_msg(m);
            }
            // After the messages already queued, as a stop message behind them was.
            if stop.is_triggered() {
                self.stopping = true;
            }
            if self.last_lock_check.elapsed() >= LOCK_CHECK_INTERVAL {
                self.last_lock_check = Instant::now();
                if !self.keep_lock().await {
                    self.shared.lock_lost.store(true, std::sync::atomic::Ordering::SeqCst);
                    self.stopping = true; // the shutdown sends nothing new: it records what is in flight
                }
            }
            if self.stopping {
                return self.shutdown(&mut inbox).await;
            }
            self.promote_due();
            // After a failed JobDB write, nothing goes to the writer until the backoff ends.
            let paused = self.writes_paused();
            if !paused {
                // Outcome rows go to the writer before any page or reload request, so a
                // page never shows a job as unfinished after the director has finished it.
                self.flush_rows();
                self.request_page();
                self.request_reloads();
            }
            let next_wake = if self.lock_unconfirmed.is_some() || paused { None } else { self.dispatch() };
            if !paused {
                self.flush_rows();
            }
            self.report_in_memory();
            if self.last_report.elapsed() >= Duration::from_secs(1) {
                self.report_pairs();
            }

            if !paused
                && self.sealed
                && self.jobs.is_empty()
                && !self.backlog
                && !self.page_pending
                && self.spilled.is_empty()
                && self.reloading.is_empty()
            {
                match self.writer().count_unfinished().await {
                    Ok(0) => return self.drop_jobdb().await,
                    Ok(n) => {
                        tracing::warn!(jobdb = %self.name, unfinished = n, "sealed JobDB has unfinished jobs not in memory; reloading");
                        self.backlog = true;
                        self.loaded_upto = None;
                        self.spilled.clear();
                    }
                    Err(e) => tracing::error!(jobdb = %self.name, error = %e, "cannot count unfinished jobs"),
                }
                continue;
            }

            let retry_writes = self.write_retry_at.filter(|_| paused);
            let deadline = [next_wake, self.next_delayed(), retry_writes].into_iter().flatten().min();
            let sleep = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(1))));
            tokio::select! {
                m = from_writer.recv() => if let Some(m) = m { self.on_writer(m) },
                m = inbox.recv() => match m {
                    Some(m) => self.on_msg(m),
                    None => {
                        self.forget_write_failures();
                        self.shared.metrics.forget_director(self.seq, now_ms());
                        return DirectorExit::Stopped;
                    }
                },
                _ = &mut notified => {}
                _ = stop.wait() => {}
                _ = sleep => {}
            }
        }
    }

    /// Per-pair queue depth and oldest age, and spilled jobs, for the metrics (O(jobs), once a second).
    fn report_pairs(&mut self) {
        self.last_report = Instant::now();
        let mut pairs: HashMap<(String, String), (i64, i64)> = HashMap::new();
        for j in self.jobs.values() {
            let e = pairs.entry((j.source.clone(), j.dest.id.clone())).or_insert((0, i64::MAX));
            e.0 += 1;
            e.1 = e.1.min(j.created_at);
        }
        let spilled = self.spilled.iter().map(|(d, q)| (d.clone(), q.len() as i64)).collect();
        self.shared.metrics.report_pairs(self.seq, pairs, spilled, now_ms());
    }

    /// Move the process-wide gauge by this director's change since last time.
    fn report_in_memory(&mut self) {
        let now = self.jobs.len() as i64;
        self.shared.metrics.jobs_in_memory.inc_by(now - self.reported_in_memory);
        self.reported_in_memory = now;
    }

    fn on_writer(&mut self, m: FromWriter) {
        match m {
            FromWriter::Inserted(jobs) => {
                if self.backlog {
                    return; // paged in later, in order
                }
                for j in jobs {
                    self.loaded_upto = Some(j.id);
                    self.admit_or_spill(j);
                }
            }
            FromWriter::Reloaded { destination, jobs } => {
                self.reloading.remove(&destination);
                for j in jobs {
                    if !j.state.is_terminal() && !self.jobs.contains_key(&j.id) {
                        self.admit(j);
                    }
                }
            }
            FromWriter::Loaded { jobs, complete } => {
                self.page_pending = false;
                for j in jobs {
                    self.loaded_upto = Some(j.id);
                    if !j.state.is_terminal() && !self.jobs.contains_key(&j.id) {
                        if j.state == JobState::Executing {
                            self.shared.metrics.reexecuted_after_restart.inc();
                        }
                        self.admit_or_spill(j);
                    }
                }
                if complete {
                    self.backlog = false;
                }
            }
            FromWriter::Recovered { failures, failing_for } => {
                if self.write_failures > 0 {
                    self.shared.metrics.jobdbs_failing.dec();
                    tracing::info!(jobdb = %self.name, failures, failing_for_s = failing_for.as_secs_f64(), "JobDB writes work again: dispatch resumes");
                }
                self.write_failures = 0;
                self.write_retry_at = None;
            }
            FromWriter::Failed { error, lost } => {
                // The writer logs the failure (rate-limited); pause writing with backoff.
                self.shared.metrics.jobdb_write_failures.inc();
                if self.write_failures == 0 {
                    self.shared.metrics.jobdbs_failing.inc();
                    tracing::warn!(jobdb = %self.name, %error, "JobDB writes failing: no request starts and outcomes wait in memory; retrying with backoff up to 5 s");
                }
                self.write_failures = self.write_failures.saturating_add(1);
                let wait = crate::retry::backoff(crate::retry::INITIAL_BACKOFF, crate::retry::MAX_BACKOFF, self.write_failures);
                self.write_retry_at = Some(Instant::now() + wait);
                tracing::debug!(jobdb = %self.name, %error, retry_in_ms = wait.as_millis() as u64, "a JobDB write failed; its fire-and-forget part is sent again after the backoff");
                // Requests with replies (inserts, `executing` rows) were answered with the error
                // and are retried by their senders; what was sent without waiting is redone here.
                if lost.page {
                    self.page_pending = false;
                }
                for (dest, ids) in lost.reloads {
                    self.reloading.remove(&dest);
                    let q = self.spilled.entry(dest).or_default();
                    for id in ids.into_iter().rev() {
                        q.push_front(id);
                    }
                }
                if !lost.rows.is_empty() {
                    let newer = std::mem::replace(&mut self.rows, lost.rows);
                    self.rows.extend(newer);
                }
            }
        }
    }

    /// Keep `j` in memory, or only its id when memory or its destination's share is full
    /// (or its destination already has spilled jobs, which go first).
    fn admit_or_spill(&mut self, j: StoredJob) {
        let spill = self.spilled.get(&j.job.destination).is_some_and(|s| !s.is_empty())
            || self.jobs.len() >= self.shared.cache_jobs
            || self.per_dest.get(&j.job.destination).copied().unwrap_or(0) >= self.dest_cap();
        if spill {
            self.spilled.entry(j.job.destination).or_default().push_back(j.id);
        } else {
            self.admit(j);
        }
    }

    /// Most jobs one destination may hold in memory.
    fn dest_cap(&self) -> usize {
        (self.shared.cache_jobs / 4).max(1)
    }

    /// Read spilled jobs back for destinations that have room.
    fn request_reloads(&mut self) {
        let cap = self.dest_cap();
        let free_total = self.shared.cache_jobs.saturating_sub(self.jobs.len());
        if self.spilled.is_empty() || free_total == 0 {
            return;
        }
        let mut budget = free_total;
        let dests: Vec<String> = self.spilled.keys().cloned().collect();
        for d in dests {
            if budget == 0 {
                break;
            }
            let held = self.per_dest.get(&d).copied().unwrap_or(0);
            if self.reloading.contains(&d) || held > cap / 2 {
                continue;
            }
            let queue = self.spilled.get_mut(&d).expect("listed");
            let n = (cap - held).min(budget).min(4096).min(queue.len());
            let ids: Vec<Ksuid> = queue.drain(..n).collect();
            if queue.is_empty() {
                self.spilled.remove(&d);
            }
            budget -= n;
            if self.writer().load_ids(d.clone(), ids).is_ok() {
                self.reloading.insert(d);
            }
        }
    }

    /// Forget a finished job.
    fn remove_job(&mut self, id: &Ksuid) -> Option<Job> {
        let job = self.jobs.remove(id)?;
        if let Some(n) = self.per_dest.get_mut(&job.dest.id) {
            *n = n.saturating_sub(1);
        }
        Some(job)
    }

    fn admit(&mut self, s: StoredJob) {
        if self.jobs.contains_key(&s.id) {
            return;
        }
        *self.per_dest.entry(s.job.destination.clone()).or_default() += 1;
        let dest = self.shared.catalog.destination(&s.job.destination);
        let id = s.id;
        let ready = !matches!(s.state, JobState::AwaitingRetry);
        let job = Job {
            message_id: s.job.message_id,
            source: s.job.source,
            generation: s.job.generation,
            dest,
            payload: Some(s.job.payload),
            created_at: s.job.created_at,
            expires_at: s.job.expires_at,
            received_at: s.job.received_at,
            seq: s.seq,
            attempt: s.attempt,
            at: Where::Delayed,
            last: None,
            archive_due: false,
        };
        self.jobs.insert(id, job);
        if ready {
            self.make_ready(id, false);
        } else {
            self.delay(id, s.retry_at.unwrap_or(0));
        }
    }

    fn delay(&mut self, id: Ksuid, at_ms: i64) {
        if let Some(j) = self.jobs.get_mut(&id) {
            j.at = Where::Delayed;
            j.payload = None; // fetched again when due
            self.delayed.push(Reverse((at_ms, id)));
        }
    }

    fn make_ready(&mut self, id: Ksuid, front: bool) {
        let Some(j) = self.jobs.get_mut(&id) else { return };
        j.at = Where::Ready;
        let dest_id = j.dest.id.clone();
        let q = self.queues.entry(dest_id.clone()).or_insert_with(|| {
            self.dest_ring.push_back(dest_id);
            DestQueue { dest: j.dest.clone(), pairs: HashMap::new(), ring: VecDeque::new(), ready: 0, since: Instant::now() }
        });
        if q.ready >= PAYLOAD_WINDOW {
            j.payload = None;
        }
        q.ready += 1;
        let pair = q.pairs.entry(j.source.clone()).or_default();
        if pair.is_empty() {
            q.ring.push_back(j.source.clone());
        }
        if front {
            pair.push_front(id);
        } else {
            pair.push_back(id);
        }
    }

    fn next_delayed(&self) -> Option<Instant> {
        self.delayed.peek().map(|Reverse((at, _))| {
            // Saturating, and at most an hour (then it looks again): a far
            // `retry_at` must neither overflow nor panic the `Instant` sum.
            let wait = at.saturating_sub(now_ms()).clamp(0, 3_600_000) as u64;
            Instant::now() + Duration::from_millis(wait)
        })
    }

    fn promote_due(&mut self) {
        let now = now_ms();
        while let Some(Reverse((at, id))) = self.delayed.peek().copied() {
            if at > now {
                break;
            }
            self.delayed.pop();
            match self.jobs.get(&id) {
                Some(j) if j.at == Where::Delayed && j.archive_due => self.start_archive(id),
                Some(j) if j.at == Where::Delayed => self.make_ready(id, false),
                _ => {}
            }
        }
    }

    fn request_page(&mut self) {
        let cap = self.shared.cache_jobs;
        if self.backlog && !self.page_pending && self.jobs.len() <= cap / 2 {
            let limit = (cap - self.jobs.len()).max(1);
            if self.writer().load_page(self.loaded_upto, limit).is_ok() {
                self.page_pending = true;
            }
        }
    }

    /// Start requests, fairly; returns when a rate-limited or open-circuit
    /// destination can go again, or a batch destination's batch is due.
    fn dispatch(&mut self) -> Option<Instant> {
        let now = Instant::now();
        let now_ms = now_ms();
        let mut requests: Vec<Request> = Vec::new();
        let mut dispatched = 0;
        let mut expired = Vec::new();
        let mut wake_at: Option<Instant> = None;
        let mut wake = |t: Instant| wake_at = Some(wake_at.map_or(t, |w: Instant| w.min(t)));
        let mut idle = 0;
        while idle < self.dest_ring.len() && dispatched < MAX_DISPATCH {
            let Some(dest_id) = self.dest_ring.pop_front() else { break };
            let q = self.queues.get_mut(&dest_id).expect("queued destination");
            let quantum = q.dest.priority() * TURN;
            let batch = q.dest.settings().batch;
            let mut sent = 0;
            let expired_before = expired.len();
            // A batch waits until it is full or its oldest job has waited `batch_max_age`.
            let due = batch.is_none_or(|b| q.ready >= b.max_events || now >= q.since + b.max_age);
            if !due {
                wake(q.since + batch.expect("a batch destination").max_age);
            }
            while due && sent < quantum && dispatched < MAX_DISPATCH && q.ready > 0 {
                // Expired jobs go to the archive whether or not the destination can take a request (paused, say).
                if let Some(id) = q.front().filter(|id| self.jobs.get(id).expect("queued job").expires_at <= now_ms) {
                    q.next_ready();
                    expired.push(id);
                    continue;
                }
                let permit = match q.dest.try_acquire(now) {
                    Ok(permit) => permit,
                    Err(Blocked::Until(t)) => {
                        wake(t);
                        break;
                    }
                    Err(Blocked::Wait) => break,
                };
                // A probe of a destination that failed is one job: a batch destination that is
                // still down must not cost thousands of `executing` and outcome rows per probe
                // in the JobDB the healthy destinations' jobs share.
                let size = if permit.probe { 1 } else { batch.map_or(1, |b| b.max_events) };
                let mut group = Vec::new();
                while group.len() < size {
                    let Some(id) = q.next_ready() else { break };
                    if self.jobs.get(&id).expect("queued job").expires_at <= now_ms {
                        expired.push(id);
                    } else {
                        group.push(id);
                    }
                }
                if group.is_empty() {
                    continue; // every one had expired; the permit goes back
                }
                dispatched += group.len();
                requests.push((group, permit));
                sent += 1;
            }
            if q.ready > 0 {
                if sent > 0 {
                    q.since = now; // the rest start a new batch
                }
                self.dest_ring.push_back(dest_id);
            } else {
                self.queues.remove(&dest_id);
            }
            if sent == 0 && expired.len() == expired_before {
                idle += 1;
            } else {
                idle = 0;
            }
        }
        for id in expired {
            self.start_archive(id);
        }
        if !requests.is_empty() {
            self.execute(requests);
        }
        wake_at
    }

    /// Commit `executing` for every job of the requests (and fetch missing payloads), then send.
    fn execute(&mut self, requests: Vec<Request>) {
        let at = now_ms();
        let mut rows = Vec::new();
        let mut missing = Vec::new();
        let mut work = Vec::with_capacity(requests.len());
        for (ids, permit) in requests {
            let mut items = Vec::with_capacity(ids.len());
            for id in ids {
                let job = self.jobs.get_mut(&id).expect("dispatched job");
                job.seq += 1;
                job.attempt += 1;
                job.at = Where::InFlight;
                rows.push(Transition {
                    job_id: id,
                    seq: job.seq,
                    state: JobState::Executing,
                    at,
                    attempt: job.attempt,
                    status: None,
                    error: None,
                    retry_at: None,
                });
                if job.payload.is_none() {
                    missing.push(id);
                }
                let names = (Arc::from(job.message_id.as_str()), Arc::from(job.source.as_str()));
                items.push((id, crate::executor::idempotency_key(&job.message_id, job.generation), job.payload.clone(), names));
            }
            work.push((items, permit));
        }
        // Rows queued before these (earlier outcomes) keep their order in the writer.
        self.flush_rows();
        let writer = self.writer().clone();
        let inbox = self.inbox_tx.clone();
        let executor = self.shared.executor.clone();
        let metrics = self.shared.metrics.clone();
        tokio::spawn(async move {
            let fetched = match writer.execute(rows, missing).await {
                Ok(p) => p,
                Err(e) => {
                    // The writer logged it (rate-limited) and told the director, which backs off.
                    tracing::debug!(error = %e, "cannot record executing transitions; jobs stay queued");
                    let ids = work.into_iter().flat_map(|(items, _)| items.into_iter().map(|i| i.0)).collect();
                    let _ = inbox.send(Msg::Requeue(ids)).await;
                    return;
                }
            };
            for (items, permit) in work {
                let mut ready = Vec::with_capacity(items.len());
                for (id, idempotency_key, payload, (message_id, source)) in items {
                    match payload.or_else(|| fetched.get(&id).cloned()) {
                        Some(body) => ready.push(Outgoing { id, idempotency_key, body, message_id, source }),
                        None => {
                            let _ = inbox.send(Msg::Requeue(vec![id])).await;
                        }
                    }
                }
                if ready.is_empty() {
                    continue;
                }
                let (executor, inbox, metrics) = (executor.clone(), inbox.clone(), metrics.clone());
                let span = tracing::debug_span!("deliver.attempt", destination = %permit.destination.id, jobs = ready.len());
                tokio::spawn(tracing::Instrument::instrument(
                    async move {
                        let ids: Vec<Ksuid> = ready.iter().map(|j| j.id).collect();
                        let started = Instant::now();
                        // A panic (a bug, or one in a client library) must not leave the jobs
                        // `executing` until a restart, which would only panic again: they are
                        // retried like any failure, the cause in their history, until the window ends.
                        let sent = std::panic::AssertUnwindSafe(send_request(&executor, &metrics, &permit, ready)).catch_unwind().await;
                        let ended = sent.unwrap_or_else(|panic| {
                            let why = panic
                                .downcast_ref::<String>()
                                .map(String::as_str)
                                .or_else(|| panic.downcast_ref::<&str>().copied())
                                .unwrap_or("no message");
                            tracing::error!(destination = %permit.destination.id, jobs = ids.len(), panic = why, "delivery panicked; the jobs are retried");
                            permit.destination.record(Verdict::Retry, permit.probe, Instant::now());
                            let attempt = Attempt {
                                verdict: Verdict::Retry,
                                status: None,
                                error: Some(format!("delivery failed inside Sluice (a bug, please report it): {why}")),
                                retry_after: None,
                                elapsed: started.elapsed(),
                            };
                            ids.into_iter().map(|id| (id, attempt.clone())).collect()
                        });
                        drop(permit);
                        for (id, attempt) in ended {
                            let _ = inbox.send(Msg::Done { id, attempt }).await;
                        }
                    },
                    span,
                ));
            }
        });
    }

    fn on_msg(&mut self, m: Msg) {
        match m {
            Msg::Done { id, attempt } => self.on_done(id, attempt),
            Msg::Requeue(ids) => {
                for id in ids {
                    if let Some(j) = self.jobs.get_mut(&id) {
                        j.seq -= 1;
                        j.attempt -= 1;
                        self.make_ready(id, true);
                    }
                }
            }
            Msg::Archived { id, result } => match result {
                Ok(()) => {
                    if let Some(j) = self.remove_job(&id) {
                        let (status, error) = j.last.unwrap_or((None, None));
                        self.push_row(id, j.seq + 1, JobState::Archived, j.attempt, status, error, None);
                        j.dest.metrics(&self.shared.metrics).archived.inc();
                    }
                }
                Err(e) => {
                    tracing::error!(job = %id, error = %e, "archive write failed; trying again in 30 s");
                    if let Some(j) = self.jobs.get_mut(&id) {
                        j.archive_due = true;
                    }
                    self.delay(id, now_ms() + ARCHIVE_RETRY.as_millis() as i64);
                }
            },
            Msg::Seal => self.sealed = true,
        }
    }

    fn on_done(&mut self, id: Ksuid, a: Attempt) {
        let Some(job) = self.jobs.get_mut(&id) else { return };
        let dest = job.dest.clone();
        let counts = dest.metrics(&self.shared.metrics);
        match a.verdict {
            Verdict::Succeeded => {
                let job = self.remove_job(&id).expect("present");
                self.push_row(id, job.seq + 1, JobState::Succeeded, job.attempt, a.status, None, None);
                counts.succeeded.inc();
                let now = now_ms();
                self.shared.metrics.job_latency_seconds.observe((now - job.created_at).max(0) as f64 / 1000.0);
                if job.generation == 0 {
                    self.shared.metrics.end_to_end_seconds.observe((now - job.received_at).max(0) as f64 / 1000.0);
                }
            }
            Verdict::Discard => {
                let job = self.remove_job(&id).expect("present");
                self.push_row(id, job.seq + 1, JobState::Discarded, job.attempt, a.status, a.error, None);
                counts.discarded.inc();
            }
            Verdict::Retry => {
                let policy = job.dest.settings().policy;
                let backoff = backoff(policy.initial_backoff, policy.max_backoff, job.attempt as u32);
                job.last = Some((a.status, a.error.clone()));
                if let Some(retry_at) = retry_at(now_ms(), backoff, a.retry_after, job.expires_at) {
                    job.seq += 1;
                    let (seq, attempt) = (job.seq, job.attempt);
                    self.push_row(id, seq, JobState::AwaitingRetry, attempt, a.status, a.error, Some(retry_at));
                    self.delay(id, retry_at);
                    counts.retry.inc();
                } else {
                    self.start_archive(id);
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn push_row(&mut self, id: Ksuid, seq: i64, state: JobState, attempt: i64, status: Option<u16>, error: Option<String>, retry_at: Option<i64>) {
        self.rows.push(Transition { job_id: id, seq, state, at: now_ms(), attempt, status, error, retry_at });
    }

    /// Whether a failed JobDB write's backoff is still running.
    fn writes_paused(&self) -> bool {
        self.write_retry_at.is_some_and(|t| Instant::now() < t)
    }

    fn flush_rows(&mut self) {
        if !self.rows.is_empty() {
            let rows = std::mem::take(&mut self.rows);
            if let Err(e) = self.writer().transitions_nowait(rows) {
                tracing::error!(error = %e, "JobDB writer is gone");
            }
        }
    }

    /// Write the job and its history to the archive, then (on success) `archived`.
    fn start_archive(&mut self, id: Ksuid) {
        if let Some(until) = self.write_retry_at.filter(|_| self.writes_paused()) {
            // Its history read must follow the rows held back meanwhile: archive after the backoff.
            let at = now_ms() + until.saturating_duration_since(Instant::now()).as_millis() as i64;
            if let Some(job) = self.jobs.get_mut(&id) {
                job.archive_due = true;
            }
            self.delay(id, at);
            return;
        }
        let Some(job) = self.jobs.get_mut(&id) else { return };
        job.at = Where::Archiving;
        // The history read must see every row queued so far.
        let message_id = job.message_id.clone();
        let source = job.source.clone();
        let destination = job.dest.id.clone();
        let (generation, created_at, expires_at) = (job.generation, job.created_at, job.expires_at);
        let payload = job.payload.clone();
        let last = job.last.clone();
        self.flush_rows();
        let writer = self.writer().clone();
        let archive = self.shared.archive.clone();
        let inbox = self.inbox_tx.clone();
        tokio::spawn(async move {
            let result = async {
                let mut history = writer.history(id).await.map_err(|e| e.to_string())?;
                let payload = match payload {
                    Some(p) => p,
                    None => writer.execute(Vec::new(), vec![id]).await.map_err(|e| e.to_string())?.remove(&id).unwrap_or_default(),
                };
                if let Some((status, error)) = last {
                    let seq = history.last().map_or(1, |t| t.seq + 1);
                    let attempt = history.last().map_or(0, |t| t.attempt);
                    history.push(Transition { job_id: id, seq, state: JobState::Archived, at: now_ms(), attempt, status, error, retry_at: None });
                }
                let doc = ArchivedJob {
                    id,
                    message_id: &message_id,
                    source: &source,
                    destination: &destination,
                    generation,
                    created_at,
                    expires_at,
                    payload: &payload,
                    history: &history,
                };
                archive.put(&doc).await.map(|_| ()).map_err(|e| e.to_string())
            }
            .await;
            let _ = inbox.send(Msg::Archived { id, result }).await;
        });
    }

    async fn shutdown(mut self, inbox: &mut Receiver<Msg>) -> DirectorExit {
        // Let requests in flight finish (bounded), recording their outcomes.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while self.jobs.values().any(|j| matches!(j.at, Where::InFlight | Where::Archiving)) {
            match tokio::time::timeout_at(deadline, inbox.recv()).await {
                Ok(Some(m)) => self.on_msg(m),
                _ => break,
            }
        }
        self.flush_rows();
        self.jobs.clear();
        self.per_dest.clear();
        self.report_in_memory();
        self.forget_write_failures();
        self.shared.metrics.forget_director(self.seq, now_ms());
        self.close_writer().await;
        DirectorExit::Stopped
    }

    /// Whether this director may go on: true while it holds its JobDB's
    /// lock (a file lock always; a database session's lock, taken again
    /// if the session ended) or cannot tell (the database does not answer:
    /// [`Self::lock_unconfirmed`] is set and nothing is dispatched); false
    /// once another director holds it.
    async fn keep_lock(&mut self) -> bool {
        let Some(JobDbLock::Sql(lock)) = &mut self.lock else { return true };
        if lock.is_held().await {
            self.lock_confirmed();
            return true;
        }
        let JobDbs::Sql(sql) = &self.jobdbs else { return true };
        let old_session = lock.session_id();
        match sql.lock_jobdb(self.seq).await {
            Ok(again) => {
                tracing::warn!(jobdb = %self.name, "the director lock's database session ended; lock taken again");
                self.lock = Some(JobDbLock::Sql(again));
                self.lock_confirmed();
                true
            }
            // Held: by our own session (its check did not answer in time) or another director's.
            Err(crate::DeliverError::SqlLocked { .. }) => match sql.jobdb_lock_holder(self.seq).await {
                Ok(Some(holder)) if holder == old_session => {
                    self.lock_confirmed();
                    true
                }
                Ok(holder) => {
                    tracing::error!(jobdb = %self.name, ?holder, "director lock lost to another session; this director stops");
                    false
                }
                Err(e) => self.lock_unanswered(&e),
            },
            Err(e) => self.lock_unanswered(&e),
        }
    }

    fn lock_confirmed(&mut self) {
        if let Some(since) = self.lock_unconfirmed.take() {
            tracing::warn!(jobdb = %self.name, after = ?since.elapsed(), "the director lock is confirmed again; dispatch resumes");
        }
    }

    /// The database did not answer the lock check: pause dispatch (true:
    /// the director goes on, and asks again next interval).
    fn lock_unanswered(&mut self, e: &crate::DeliverError) -> bool {
        if self.lock_unconfirmed.is_none() {
            tracing::error!(jobdb = %self.name, error = %e, "cannot confirm the director lock (database unreachable?); no request starts until it is confirmed");
            self.lock_unconfirmed = Some(Instant::now());
        }
        true
    }

    async fn close_writer(&mut self) {
        if let Some(w) = self.writer.take() {
            w.close();
        }
        if let Some(t) = self.writer_thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }

    /// This director no longer counts in `sluice_deliver_jobdbs_failing`.
    fn forget_write_failures(&mut self) {
        if self.write_failures > 0 {
            self.shared.metrics.jobdbs_failing.dec();
            self.write_failures = 0;
        }
    }

    async fn drop_jobdb(mut self) -> DirectorExit {
        self.forget_write_failures();
        self.shared.metrics.forget_director(self.seq, now_ms());
        self.close_writer().await;
        // Other handles (the Centrifuge's) may still exist, but nothing writes to a sealed JobDB.
        match self.jobdbs.remove(self.seq).await {
            Ok(()) => {
                self.shared.metrics.jobdbs_dropped.inc();
                tracing::info!(jobdb = %self.name, seq = self.seq, "every job finished: JobDB deleted");
            }
            Err(e) => tracing::error!(jobdb = %self.name, error = %e, "cannot delete a finished JobDB"),
        }
        drop(self.lock.take());
        DirectorExit::Dropped
    }
}

/// Exponential backoff with full jitter: uniform in [0, min(max, initial × 2^(attempt-1))].
/// When a job answered "retry" at `now` (unix ms) is tried again, or `None`
/// when its retry window (ending at `expires_at`) is over: the policy's
/// `backoff` alone would pass it. The endpoint's `Retry-After` can push the
/// retry later than the backoff, but never past `expires_at` (a huge or
/// far-future value means "at the end of the window", not an overflow that
/// lands in the past), and never earlier than the backoff. All arithmetic
/// saturates.
pub fn retry_at(now: i64, backoff: Duration, retry_after: Option<Duration>, expires_at: i64) -> Option<i64> {
    let after = |d: Duration| now.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let by_policy = after(backoff);
    if by_policy > expires_at {
        return None;
    }
    Some(retry_after.map_or(by_policy, |ra| after(ra).max(by_policy).min(expires_at)))
}

pub fn backoff(initial: Duration, max: Duration, attempt: u32) -> Duration {
    let exp = initial.saturating_mul(1u32 << attempt.saturating_sub(1).min(30));
    let cap = exp.min(max);
    let ms = cap.as_millis().max(1) as u64;
    Duration::from_millis(rand::thread_rng().gen_range(0..=ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded_by_the_exponential_and_the_maximum() {
        let (i, m) = (Duration::from_secs(1), Duration::from_secs(60));
        for attempt in 1..40 {
            for _ in 0..50 {
                let b = backoff(i, m, attempt);
                let cap = Duration::from_secs(1u64 << (attempt - 1).min(20)).min(m);
                assert!(b <= cap, "attempt {attempt}: {b:?} > {cap:?}");
            }
        }
        // Full jitter spreads: over many draws at attempt 7 (cap 60 s) some fall below 30 s and some above.
        let draws: Vec<_> = (0..200).map(|_| backoff(i, m, 7)).collect();
        assert!(draws.iter().any(|d| *d < Duration::from_secs(30)) && draws.iter().any(|d| *d > Duration::from_secs(30)));
    }

    #[test]
    fn retry_at_saturates_and_stays_in_the_window() {
        let now = 1_700_000_000_000;
        let end = now + 4 * 3_600_000;
        let b = Duration::from_secs(2);
        // No Retry-After, or a short one: the backoff decides.
        assert_eq!(retry_at(now, b, None, end), Some(now + 2_000));
        assert_eq!(retry_at(now, b, Some(Duration::from_secs(1)), end), Some(now + 2_000));
        assert_eq!(retry_at(now, b, Some(Duration::ZERO), end), Some(now + 2_000), "a past HTTP date");
        // A longer one is honoured.
        assert_eq!(retry_at(now, b, Some(Duration::from_secs(60)), end), Some(now + 60_000));
        // Issue 11 (7): huge values used to overflow into the past; now they mean the window's end.
        for secs in [9_223_372_036_854_775, u64::MAX, 10 * 3600] {
            assert_eq!(retry_at(now, b, Some(Duration::from_secs(secs)), end), Some(end), "{secs}");
        }
        assert_eq!(retry_at(now, b, Some(Duration::MAX), i64::MAX), Some(i64::MAX));
        // The backoff alone passes the window: archive.
        assert_eq!(retry_at(end - 1_000, b, Some(Duration::from_secs(u64::MAX)), end), None);
        assert_eq!(retry_at(i64::MAX - 10, b, None, end), None);
    }
}
