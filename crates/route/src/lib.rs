//! The route stage: `output` events → delivery jobs.
//!
//! For each event on `output` (key `<sourceId>/<messageId>`), the route
//! finds the destinations its source is connected to, honours the event's
//! `integrations` object, applies each destination's filters, and makes one
//! job per remaining destination.
//!
//! Invariants:
//! - One route task per `output` partition, consumer group `route`. It
//!   commits its `output` offset only after [`Centrifuge::insert`] returned,
//!   i.e. after the jobs are committed in a JobDB. A crash in between
//!   replays the batch; job inserts are idempotent on (messageId,
//!   destination), so the replay makes no second job.
//! - Routing is deterministic for a given event and catalog: sampling is
//!   decided by a hash of the messageId, so a replay decides the same.
//! - A replay (`sluice replay`) routes old `output` events for one
//!   destination with generation = the replay's id, so its jobs are new
//!   jobs (delivered again) and re-running the same replay is idempotent.
//! - In a cell that a workspace moved into, a replay also routes the
//!   workspace's events from the `output` of the cells it came from
//!   ([`History`]). Dedup made every event of the workspace land in exactly
//!   one cell's `output`, so the cells' parts do not overlap.

mod dead_letter;
mod function;

pub mod plan;

use std::sync::Arc;
use std::time::Duration;

use sluice_core::metrics::{latency_buckets, Counter, Family, Gauge, Histogram, Registry};
use sluice_core::Shutdown;
use sluice_deliver::cluster::DirectorClient;
use sluice_deliver::{Catalog, Centrifuge, NewJob};
use sluice_log::{Checkpoint, Log, LogError};

pub use plan::{Planner, RouteDecision};
/// Moved to `sluice-log` (dedup uses them too); kept here for the route's callers.
pub use sluice_log::backlog::{watch_backlog, BacklogAge};

/// The topic the route reads (dedup's output).
pub use sluice_core::topics::OUTPUT as OUTPUT_TOPIC;
/// The consumer group of the route stage on `output`.
pub use sluice_core::topics::ROUTE_GROUP as GROUP;

/// A batch of another cell's `output` records of one workspace (a replay's earlier part).
pub struct EarlierBatch {
    /// The cell whose log held them.
    pub cell: String,
    pub partition: u32,
    pub records: Vec<sluice_log::StoredRecord>,
}

/// Where a workspace's events are that this cell's own log does not hold:
/// the cells it was moved out of (`sluice_control::history`).
pub trait History: Send + Sync {
    /// Batches of `workspace`'s events at or after `since_ms` from the
    /// cells it left; an `Err` ends the stream (that cell cannot be read).
    fn earlier(&self, workspace: &str, since_ms: i64) -> tokio::sync::mpsc::Receiver<Result<EarlierBatch, String>>;
}

/// The history a replay reads, set once the cell's link to its control plane exists (empty: a single cell).
pub type HistorySlot = Arc<std::sync::OnceLock<Arc<dyn History>>>;

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Deliver(#[from] sluice_deliver::DeliverError),
    #[error("handing jobs to a director failed: {0}")]
    Director(String),
    #[error("{0}")]
    DeadLetters(String),
    #[error("{0}")]
    History(String),
}

/// Where the route hands jobs over: the local Centrifuge (`sluice serve`)
/// or remote directors over RPC (`sluice route`,
/// [`sluice_deliver::cluster::DirectorClient`]). `insert` returns only once
/// the jobs are committed to a JobDB; the route commits its `output` offset
/// after that.
#[async_trait::async_trait]
pub trait JobSink: Send + Sync + 'static {
    async fn insert_jobs(&self, jobs: Vec<NewJob>, oldest_event_ms: i64) -> Result<(), RouteError>;
}

#[async_trait::async_trait]
impl JobSink for Centrifuge {
    async fn insert_jobs(&self, jobs: Vec<NewJob>, oldest_event_ms: i64) -> Result<(), RouteError> {
        self.insert(jobs, oldest_event_ms).await?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl JobSink for DirectorClient {
    async fn insert_jobs(&self, jobs: Vec<NewJob>, oldest_event_ms: i64) -> Result<(), RouteError> {
        self.insert(jobs, oldest_event_ms).await.map_err(|e| match e {
            sluice_deliver::DeliverError::Rpc(message) => RouteError::Director(message),
            other => RouteError::Deliver(other),
        })
    }
}

#[derive(Clone)]
pub struct RouteMetrics {
    pub events: Counter,
    pub jobs: Counter,
    pub filtered: Counter,
    pub unroutable: Counter,
    /// `output` offsets that retention removed before the route read them
    /// (events never routed).
    pub expired_unrouted: Counter,
    /// One batch: read output, plan, insert jobs, commit.
    pub batch_seconds: Histogram,
    /// Per owned partition: age of the oldest `output` record the route has
    /// not committed yet ([`BacklogAge`]); 0 when caught up.
    pub oldest_unprocessed: AgeGauges,
    /// Tracking plan violations, labelled `source`, `event` (its planned
    /// name, `(unplanned)` or its call type) and `kind`.
    pub plan_violations: Family<Vec<(&'static str, String)>, Counter>,
    /// Events a tracking plan checked, labelled `source` and `outcome` (allowed, flagged, blocked).
    pub plan_events: Family<Vec<(&'static str, String)>, Counter>,
}

/// Per-partition age gauges (seconds), labelled `partition`.
pub type AgeGauges = Family<Vec<(&'static str, String)>, Gauge<f64, std::sync::atomic::AtomicU64>>;

/// A label value as the Prometheus text format writes it (`\`, `"` and
/// newlines escaped): the encoder writes values as they are, and a planned
/// event name may hold any of them (`Clicked "Buy"`).
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

impl RouteMetrics {
    /// Count a tracking plan's check of one event (the route's own pass; replays are not counted again).
    fn record_verdict(&self, key: &[u8], v: &sluice_transform::Verdict) {
        let source = String::from_utf8_lossy(key.split(|b| *b == b'/').next().unwrap_or_default()).into_owned();
        self.plan_events.get_or_create(&vec![("source", source.clone()), ("outcome", v.outcome.as_str().to_owned())]).inc();
        for kind in [sluice_transform::ViolationKind::UnplannedEvent, sluice_transform::ViolationKind::Invalid] {
            let n = v.violations.iter().filter(|x| x.kind == kind).count() as u64;
            if n > 0 {
                let labels = vec![("source", source.clone()), ("event", escape_label(&v.label)), ("kind", kind.as_str().to_owned())];
                self.plan_violations.get_or_create(&labels).inc_by(n);
            }
        }
    }
}

impl Default for RouteMetrics {
    fn default() -> Self {
        Self {
            events: Counter::default(),
            jobs: Counter::default(),
            filtered: Counter::default(),
            unroutable: Counter::default(),
            expired_unrouted: Counter::default(),
            batch_seconds: Histogram::new(latency_buckets()),
            oldest_unprocessed: AgeGauges::default(),
            plan_violations: Family::default(),
            plan_events: Family::default(),
        }
    }
}

impl RouteMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register("sluice_route_events", "Events read from output by the route", self.events.clone());
        r.register("sluice_route_jobs", "Jobs made by the route (before idempotency checks)", self.jobs.clone());
        r.register("sluice_route_filtered", "Event-destination pairs dropped by integrations or filters", self.filtered.clone());
        r.register("sluice_route_batch_seconds", "One route batch: read output, plan, insert jobs (durable), commit", self.batch_seconds.clone());
        r.register(
            "sluice_route_unroutable",
            "Output records that are not valid events, or that their source function failed (stored as dead letters)",
            self.unroutable.clone(),
        );
        r.register(
            "sluice_route_expired_unrouted",
            "Output offsets retention removed before the route read them: events never routed (log.output_retention shorter than the route's lag)",
            self.expired_unrouted.clone(),
        );
        r.register(
            "sluice_tracking_plan_violations",
            "Tracking plan violations found by the route, per source, event (planned name, (unplanned) or call type) and kind",
            self.plan_violations.clone(),
        );
        r.register("sluice_tracking_plan_events", "Events checked by a tracking plan, per source and outcome", self.plan_events.clone());
        dead_letter::register(r);
        r.register(
            "sluice_route_oldest_unprocessed_age_seconds",
            "Per output partition this route owns: age of the oldest record it has not routed and committed yet (0 when caught up)",
            self.oldest_unprocessed.clone(),
        );
    }
}

/// Settings of the route tasks.
#[derive(Clone)]
pub struct RouteSettings {
    pub batch_size: usize,
    pub poll_interval: Duration,
}

impl Default for RouteSettings {
    fn default() -> Self {
        RouteSettings { batch_size: 1000, poll_interval: Duration::from_millis(5) }
    }
}

/// Route one `output` partition until `stop` is triggered.
pub async fn run_partition(
    log: Arc<dyn Log>,
    partition: u32,
    catalog: Arc<Catalog>,
    jobs: Arc<dyn JobSink>,
    settings: RouteSettings,
    metrics: RouteMetrics,
    stop: Shutdown,
) {
    let planner = Planner::new(catalog);
    let mut next: Option<u64> = None;
    let mut failures = 0u32;
    // Watches this partition from the side, so a batch that hangs or fails
    // for good still shows (and logs) a growing age.
    let labels = vec![("partition", partition.to_string())];
    let monitor =
        tokio::spawn(watch_backlog(log.clone(), "route", OUTPUT_TOPIC, GROUP, partition, metrics.oldest_unprocessed.get_or_create(&labels).clone()));
    while !stop.is_triggered() {
        match route_batch(&*log, partition, &*jobs, &planner, &settings, &metrics, &mut next).await {
            Ok(0) => {
                failures = 0;
                tokio::select! {
                    _ = tokio::time::sleep(settings.poll_interval) => {}
                    _ = stop.wait() => {}
                }
            }
            Ok(_) => failures = 0,
            Err(e) => {
                failures += 1;
                // At most 3.2 s: the route resumes within seconds of Kafka's return.
                let wait = Duration::from_millis(100u64 << failures.min(5));
                tracing::error!(partition, error = %e, ?wait, "route batch failed; retrying from the last committed offset");
                next = None;
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.wait() => {}
                }
            }
        }
    }
    // Another process may own the partition now: its series is its own.
    monitor.abort();
    metrics.oldest_unprocessed.remove(&labels);
}

/// Route every `output` partition this process owns in the `route` group:
/// one [`run_partition`] task each, started when Kafka assigns a partition
/// and stopped when it is revoked (the embedded log owns them all).
pub async fn run_owned_partitions(
    log: Arc<dyn Log>,
    catalog: Arc<Catalog>,
    jobs: Arc<dyn JobSink>,
    settings: RouteSettings,
    metrics: RouteMetrics,
    stop: Shutdown,
) {
    let membership = match log.join(GROUP, OUTPUT_TOPIC) {
        Ok(m) => m,
        Err(e) => {
            tracing::error!(error = %e, "route cannot join its consumer group; nothing is routed");
            return;
        }
    };
    let mut owned = membership.watch();
    let mut running = Children::default();
    let running = &mut running.0;
    while !stop.is_triggered() {
        let now: std::collections::BTreeSet<u32> = owned.borrow_and_update().clone();
        let revoked: Vec<u32> = running.keys().filter(|p| !now.contains(p)).copied().collect();
        for p in revoked {
            if let Some((child, task)) = running.remove(&p) {
                child.trigger();
                let _ = task.await;
                tracing::info!(partition = p, "route stopped on a revoked partition");
            }
        }
        for p in now {
            running.entry(p).or_insert_with(|| {
                // A signal of its own: a revoked partition stops one task.
                let child = Shutdown::new();
                let task =
                    tokio::spawn(run_partition(log.clone(), p, catalog.clone(), jobs.clone(), settings.clone(), metrics.clone(), child.clone()));
                (child, task)
            });
        }
        tokio::select! {
            changed = owned.changed() => if changed.is_err() { break },
            _ = stop.wait() => {}
        }
    }
    for (_, (child, task)) in std::mem::take(running) {
        child.trigger();
        let _ = task.await;
    }
    // Leaving a Kafka group waits on the network: not on an async thread.
    let _ = tokio::task::spawn_blocking(move || drop(membership)).await;
}

/// The per-partition route tasks of [`run_owned_partitions`]; aborted if
/// the supervisor itself is aborted, so none outlives it.
#[derive(Default)]
struct Children(std::collections::BTreeMap<u32, (Shutdown, tokio::task::JoinHandle<()>)>);

impl Drop for Children {
    fn drop(&mut self) {
        for (_, task) in self.0.values() {
            task.abort();
        }
    }
}

/// One batch: read, plan, insert, commit. Returns the records read.
async fn route_batch(
    log: &dyn Log,
    partition: u32,
    jobs: &dyn JobSink,
    planner: &Planner,
    settings: &RouteSettings,
    metrics: &RouteMetrics,
    next: &mut Option<u64>,
) -> Result<usize, RouteError> {
    let from = match *next {
        Some(n) => n,
        None => match log.committed(GROUP, OUTPUT_TOPIC, partition).await? {
            Some(n) => n,
            None => {
                // Never routed: the route starts at the oldest record held.
                // If retention already removed some, they were never routed.
                let start = log.offsets(OUTPUT_TOPIC, partition).await?.start;
                if start > 0 {
                    tracing::error!(
                        partition,
                        start,
                        "the route runs for the first time on this log, and output's retention already removed the records before {start}: \
                         those events were never routed (sluice_route_expired_unrouted_total)"
                    );
                    metrics.expired_unrouted.inc_by(start);
                }
                start
            }
        },
    };
    let batch = match log.read_batch(OUTPUT_TOPIC, partition, from, settings.batch_size).await {
        Ok(b) => b,
        Err(LogError::OffsetOutOfRange { start, .. }) => {
            tracing::error!(
                partition,
                from,
                start,
                "route fell behind output's retention: events before {start} were never routed (sluice_route_expired_unrouted_total)"
            );
            metrics.expired_unrouted.inc_by(start.saturating_sub(from));
            *next = Some(start);
            return Ok(1);
        }
        Err(e) => return Err(e.into()),
    };
    let (records, end) = (batch.records, batch.next);
    if records.is_empty() {
        // Offsets without records (Kafka's transaction markers) are stepped over.
        if end > from {
            log.commit(Checkpoint { group: GROUP, topic: OUTPUT_TOPIC, partition, next_offset: end }).await?;
        }
        *next = Some(end);
        return Ok(0);
    }
    let started = std::time::Instant::now();
    // A trace span only for batches with records (empty polls run every few ms).
    let span = tracing::debug_span!("route.batch", partition, records = records.len());
    tracing::Instrument::instrument(route_records(log, partition, jobs, planner, metrics, &records, end), span).await?;
    metrics.batch_seconds.observe(started.elapsed().as_secs_f64());
    *next = Some(end);
    Ok(records.len())
}

/// Plan and insert the jobs of `records`, then commit `end`.
async fn route_records(
    log: &dyn Log,
    partition: u32,
    sink: &dyn JobSink,
    planner: &Planner,
    metrics: &RouteMetrics,
    records: &[sluice_log::StoredRecord],
    end: u64,
) -> Result<(), RouteError> {
    let oldest = records.iter().map(|r| r.timestamp_ms).min().unwrap_or(0);
    let mut jobs: Vec<NewJob> = Vec::new();
    let mut dead = Vec::new();
    // Key records (a workspace's dedup keys from its old cell) are dedup's, not events.
    let events: Vec<&sluice_log::StoredRecord> = records.iter().filter(|r| !sluice_core::topics::is_internal_record(&r.value)).collect();
    let planned = planner.plan_batch(&events.iter().map(|r| (&r.key[..], &r.value)).collect::<Vec<_>>(), 0, None).await;
    for (rec, decision) in events.into_iter().zip(planned) {
        metrics.events.inc();
        match decision {
            Ok(d) => {
                metrics.filtered.inc_by(d.filtered);
                if let Some(v) = &d.verdict {
                    metrics.record_verdict(&rec.key, v);
                }
                jobs.extend(d.jobs);
            }
            Err(problem) => {
                metrics.unroutable.inc();
                if problem.starts_with(function::PARKED) {
                    // Parked by a slow function: said once when its circuit opened, not per event.
                    tracing::debug!(partition, offset = rec.offset, %problem, "an event parked as a dead letter");
                } else {
                    tracing::warn!(partition, offset = rec.offset, %problem, "an output record that is not a routable event, or that its source function failed, goes to the dead-letter store");
                }
                dead.push(dead_letter::letter("route", OUTPUT_TOPIC, partition, rec, 0, None, problem));
            }
        }
    }
    // Durable in the control database before the offset passes them (a
    // replayed batch stores nothing twice); a full store fails the batch.
    dead_letter::store(planner.catalog(), dead).await?;
    metrics.jobs.inc_by(jobs.len() as u64);
    sink.insert_jobs(jobs, oldest).await?;
    // Jobs are durable, the offset is not committed yet: a crash here replays the batch.
    sluice_core::crash::crash_point("route.after_insert");
    log.commit(Checkpoint { group: GROUP, topic: OUTPUT_TOPIC, partition, next_offset: end }).await?;
    Ok(())
}

/// Run replay requests from the control database (`sluice replay` files
/// them; they run here, inside `sluice serve`), and the dead-letter replays
/// operators ask for (`sluice dead-letters replay`, the admin API); keep
/// `sluice_route_dead_letters` current.
pub async fn run_replays(log: Arc<dyn Log>, catalog: Arc<Catalog>, jobs: Arc<dyn JobSink>, history: HistorySlot, stop: Shutdown) {
    let planner = Planner::new(catalog.clone());
    let mut counted: Option<std::time::Instant> = None;
    let mut last_sweep: Option<std::time::Instant> = None;
    while !stop.is_triggered() {
        let pending = {
            let c = catalog.clone();
            tokio::task::spawn_blocking(move || c.with_control(|db| db.unfinished_replays())).await
        };
        match pending {
            Ok(Ok(replays)) => {
                for r in replays {
                    // What a failed replay did before it failed is counted too (its jobs were made).
                    let mut counts = (0, 0);
                    let outcome = replay_one(&*log, &*jobs, &catalog, history.get(), &r, &mut counts).await;
                    let (state, error) = match &outcome {
                        Ok(()) => ("done", None),
                        Err(e) => ("failed", Some(e.to_string())),
                    };
                    let (events, jobs) = counts;
                    tracing::info!(replay = r.id, destination = %r.destination, events, jobs, state, "replay finished");
                    let c = catalog.clone();
                    let _ =
                        tokio::task::spawn_blocking(move || c.with_control(|db| db.update_replay(r.id, state, events, jobs, error.as_deref()))).await;
                }
            }
            Ok(Err(e)) => tracing::error!(error = %e, "cannot read replay requests"),
            Err(e) => tracing::error!(error = %e, "replay poll task failed"),
        }
        if last_sweep.is_none_or(|t| t.elapsed() >= PARKED_SWEEP_EVERY) {
            dead_letter::sweep_parked(&catalog).await;
            last_sweep = Some(std::time::Instant::now());
        }
        let replayed = dead_letter::replay_requested(&*jobs, &catalog, &planner).await;
        if replayed > 0 || counted.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
            dead_letter::refresh_gauge(&catalog).await;
            counted = Some(std::time::Instant::now());
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.wait() => {}
        }
    }
}

/// How often parked dead letters (slow source functions' events) are looked for.
const PARKED_SWEEP_EVERY: Duration = Duration::from_secs(5);

async fn replay_one(
    log: &dyn Log,
    sink: &dyn JobSink,
    catalog: &Arc<Catalog>,
    history: Option<&Arc<dyn History>>,
    r: &sluice_deliver::control::Replay,
    counts: &mut (i64, i64),
) -> Result<(), RouteError> {
    {
        let c = catalog.clone();
        let id = r.id;
        let _ = tokio::task::spawn_blocking(move || c.with_control(|db| db.update_replay(id, "running", 0, 0, None))).await;
    }
    tracing::info!(replay = r.id, destination = %r.destination, since_ms = r.since_ms, "replay started");
    let planner = Planner::new(catalog.clone());
    // The earlier cells' part is asked for first: a replay the control plane refuses (the
    // workspace is moving) or whose first earlier cell cannot be read fails before it routes anything.
    let workspace = catalog
        .snapshot()
        .destinations
        .get(&r.destination)
        .map(|d| d.workspace.clone().unwrap_or_else(|| sluice_core::config::DEFAULT_WORKSPACE.to_owned()));
    let mut earlier = match (history, workspace) {
        (Some(history), Some(workspace)) => Some(history.earlier(&workspace, r.since_ms)),
        _ => None,
    };
    let first = match earlier.as_mut() {
        Some(rx) => rx.recv().await,
        None => None,
    };
    if let Some(Err(e)) = &first {
        return Err(RouteError::History(format!("nothing replayed: {e}")));
    }
    for p in 0..log.partitions(OUTPUT_TOPIC)? {
        let range = log.offsets(OUTPUT_TOPIC, p).await?;
        let mut next = range.start;
        while next < range.end {
            let batch = log.read_batch(OUTPUT_TOPIC, p, next, 1000).await?;
            if batch.records.is_empty() {
                break;
            }
            next = batch.next;
            let records: Vec<_> = batch.records.into_iter().filter(|rec| rec.offset < range.end).collect();
            replay_records(sink, catalog, &planner, r, OUTPUT_TOPIC, p, &records, counts).await?;
        }
    }
    // The workspace's events in the cells it was moved out of.
    let Some(mut earlier) = earlier else { return Ok(()) };
    let mut next = first;
    while let Some(batch) = next {
        let batch =
            batch.map_err(|e| RouteError::History(format!("this cell's part of the replay was done, an earlier cell's only in part: {e}")))?;
        let topic = format!("{OUTPUT_TOPIC}@{}", batch.cell);
        replay_records(sink, catalog, &planner, r, &topic, batch.partition, &batch.records, counts).await?;
        next = earlier.recv().await;
    }
    Ok(())
}

/// Route `records` (of `topic`, partition `p`) for replay `r`: jobs for its
/// destination, dead letters for what cannot be routed. Adds to `counts`
/// (events replayed, jobs made).
#[allow(clippy::too_many_arguments)]
async fn replay_records(
    sink: &dyn JobSink,
    catalog: &Arc<Catalog>,
    planner: &Planner,
    r: &sluice_deliver::control::Replay,
    topic: &str,
    p: u32,
    records: &[sluice_log::StoredRecord],
    counts: &mut (i64, i64),
) -> Result<(), RouteError> {
    let oldest = records.iter().map(|r| r.timestamp_ms).min().unwrap_or(0);
    let mut jobs = Vec::new();
    let mut dead = Vec::new();
    let replayed = |rec: &&sluice_log::StoredRecord| rec.timestamp_ms >= r.since_ms && !sluice_core::topics::is_internal_record(&rec.value);
    let events: Vec<&sluice_log::StoredRecord> = records.iter().filter(replayed).collect();
    let planned = planner.plan_batch(&events.iter().map(|r| (&r.key[..], &r.value)).collect::<Vec<_>>(), r.id, Some(&r.destination)).await;
    for (rec, decision) in events.into_iter().zip(planned) {
        counts.0 += 1;
        match decision {
            Ok(d) => jobs.extend(d.jobs),
            // Under the replay's generation and destination: replaying it re-delivers as this replay would have.
            Err(problem) => {
                if problem.starts_with(function::PARKED) {
                    tracing::debug!(replay = r.id, topic, partition = p, offset = rec.offset, %problem, "a replayed event parked as a dead letter");
                } else {
                    tracing::warn!(replay = r.id, topic, partition = p, offset = rec.offset, %problem, "a replayed output record that is not a routable event, or that its source function failed, goes to the dead-letter store");
                }
                dead.push(dead_letter::letter("replay", topic, p, rec, r.id, Some(&r.destination), problem));
            }
        }
    }
    dead_letter::store(catalog, dead).await?;
    counts.1 += jobs.len() as i64;
    if !jobs.is_empty() {
        sink.insert_jobs(jobs, oldest).await?;
    }
    Ok(())
}
