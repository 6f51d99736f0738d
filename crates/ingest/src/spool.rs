//! The ingest spool: the role NSQ plays in front of Kafka at Segment. When
//! the log (Kafka) is slow or down, ingest keeps acknowledging events by
//! writing them to a bounded on-disk spool, and a drainer moves them to the
//! log, in order, once it is back.
//!
//! Invariants:
//! - **Never ack then lose.** An append is acknowledged only once its records
//!   are durable in the log or fsynced in the spool (an [`EmbeddedLog`]
//!   under `data_dir/spool`, one partition per `input` partition).
//! - **Order per partition.** While a partition has spooled records not yet
//!   drained, every new append to it goes to the spool too, behind them. It
//!   returns to direct appends only when the drainer has emptied it, under a
//!   write lock that no spool append holds.
//! - **Bounded.** Past `max_events` undrained events, appends fail
//!   ([`LogError::Unavailable`]); ingest answers 503 with `Retry-After`.
//! - **At least once into the log.** A direct append that timed out may still
//!   land later, and its records are spooled too; a crash between a drained
//!   batch's append and its commit re-drains it. Dedup removes both repeats.
//! - **Survives restarts.** Undrained records are found on open, and the
//!   partition starts in spooling mode.
//!
//! Only `append` to `input` is spooled; every other call goes to the log.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sluice_core::metrics::{Counter, Gauge, Registry};
use sluice_log::{Checkpoint, EmbeddedLog, Log, LogError, LogMetrics, LogOptions, Membership, OffsetRange, ReadBatch, Record, StoredRecord};
use tokio::sync::RwLock;

const SPOOL_TOPIC: &str = "spool";
const DRAIN_GROUP: &str = "drain";

/// Settings of the spool.
#[derive(Debug, Clone)]
pub struct SpoolSettings {
    /// A direct append not done within this time is spooled instead.
    pub spool_after: Duration,
    /// Undrained events allowed in the spool; past it appends are refused.
    pub max_events: u64,
    /// Events moved to the log per drained batch.
    pub drain_batch: usize,
}

impl Default for SpoolSettings {
    fn default() -> Self {
        Self { spool_after: Duration::from_secs(2), max_events: 5_000_000, drain_batch: 1_000 }
    }
}

/// The spool's metrics.
#[derive(Clone, Default)]
pub struct SpoolMetrics {
    /// Events in the spool not yet moved to the log.
    pub depth: Gauge,
    pub spooled: Counter,
    pub drained: Counter,
    /// Appends refused because the spool was full.
    pub refused: Counter,
    /// Age (seconds) of the oldest event in the spool not yet moved to the
    /// log, over all partitions; 0 when the spool is empty.
    pub oldest_age: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl SpoolMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("sluice_ingest");
        r.register("spool_depth", "Events in the ingest spool not yet moved to the log", self.depth.clone());
        r.register("spooled", "Events written to the spool because the log was slow or down", self.spooled.clone());
        r.register("spool_drained", "Spooled events moved to the log", self.drained.clone());
        r.register("spool_refused", "Events refused (503) because the spool was full", self.refused.clone());
        r.register(
            "spool_oldest_age_seconds",
            "Age of the oldest event in the ingest spool not yet moved to the log (0 when empty)",
            self.oldest_age.clone(),
        );
    }
}

struct PartitionState {
    /// Set while the partition has (or may have) undrained spooled records.
    spooling: AtomicBool,
    /// Spool appends hold it shared; the switch back to direct holds it alone.
    gate: RwLock<()>,
}

/// A [`Log`] whose `input` appends fall back to the spool.
pub struct Spool {
    log: Arc<dyn Log>,
    spool: Arc<EmbeddedLog>,
    input: String,
    partitions: Vec<PartitionState>,
    settings: SpoolSettings,
    metrics: SpoolMetrics,
    stop: AtomicBool,
    drainers: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Spool {
    /// Open (or recover) the spool in `dir` in front of `log`'s `input`
    /// topic, and start one drainer task per partition.
    pub async fn open(log: Arc<dyn Log>, input: &str, dir: &Path, settings: SpoolSettings, metrics: SpoolMetrics) -> Result<Arc<Spool>, LogError> {
        let n = log.partitions(input)?;
        let options = LogOptions {
            topics: vec![(SPOOL_TOPIC.into(), n)],
            segment_bytes: 16 * 1024 * 1024,
            // Drained segments go soon; undrained ones are kept however old.
            retention: Duration::from_secs(60),
            retention_guard: [(SPOOL_TOPIC.to_owned(), DRAIN_GROUP.to_owned())].into(),
            fsync: true,
            metrics: LogMetrics::default(),
            ..LogOptions::default()
        };
        let dir = dir.to_owned();
        let spool = tokio::task::spawn_blocking(move || EmbeddedLog::open(&dir, options))
            .await
            .map_err(|e| LogError::Unavailable(format!("opening the spool: {e}")))??;
        let spool = Arc::new(spool);
        let mut partitions = Vec::new();
        let mut depth = 0;
        for p in 0..n {
            let range = spool.offsets(SPOOL_TOPIC, p).await?;
            let drained = spool.committed(DRAIN_GROUP, SPOOL_TOPIC, p).await?.unwrap_or(range.start).max(range.start);
            let left = range.end.saturating_sub(drained);
            depth += left;
            if left > 0 {
                tracing::warn!(partition = p, events = left, "ingest spool holds undrained events; draining them before new ones");
            }
            partitions.push(PartitionState { spooling: AtomicBool::new(left > 0), gate: RwLock::new(()) });
        }
        metrics.depth.set(depth as i64);
        let this = Arc::new(Spool {
            log,
            spool,
            input: input.to_owned(),
            partitions,
            settings,
            metrics,
            stop: AtomicBool::new(false),
            drainers: Default::default(),
        });
        let drainers = (0..n).map(|p| tokio::spawn(this.clone().drain(p))).collect();
        *this.drainers.lock().expect("drainers lock") = drainers;
        // The age of the oldest undrained event, every second; ends with the spool.
        let weak = Arc::downgrade(&this);
        tokio::spawn(async move {
            let mut warned: Option<std::time::Instant> = None;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let Some(spool) = weak.upgrade().filter(|s| !s.stop.load(Ordering::Relaxed)) else { return };
                let age = spool.oldest_age().await;
                spool.metrics.oldest_age.set(age.as_secs_f64());
                // Acknowledged events waiting on this node's disk: say so, once a minute.
                if age >= Duration::from_secs(60) && warned.is_none_or(|w| w.elapsed() >= Duration::from_secs(60)) {
                    warned = Some(std::time::Instant::now());
                    let events = spool.total_depth().await;
                    tracing::warn!(
                        oldest_seconds = age.as_secs(),
                        events,
                        "the ingest spool is not draining: its oldest event was acknowledged {}s ago",
                        age.as_secs()
                    );
                }
            }
        });
        // Delete drained segments; ends with the spool.
        let weak = Arc::downgrade(&this);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(30)).await;
                let Some(spool) = weak.upgrade().filter(|s| !s.stop.load(Ordering::Relaxed)) else { return };
                let log = spool.spool.clone();
                drop(spool);
                let _ = tokio::task::spawn_blocking(move || log.enforce_retention(std::time::SystemTime::now())).await;
            }
        });
        Ok(this)
    }

    /// Stop the drainers and wait for them; spooled events stay on disk for
    /// the next start. Interrupting a drained batch is safe: it is drained
    /// again (at least once).
    pub async fn stop(&self) {
        // Ingest has stopped taking requests: give the drainers a moment to
        // empty the spool, so nothing waits on this node's disk needlessly.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::time::Instant::now() < deadline && self.total_depth().await > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let left = self.total_depth().await;
        if left > 0 {
            tracing::warn!(events = left, "stopping with events in the ingest spool: they go to Kafka when this data_dir starts again");
        }
        self.stop.store(true, Ordering::Relaxed);
        let drainers = std::mem::take(&mut *self.drainers.lock().expect("drainers lock"));
        for d in drainers {
            d.abort();
            let _ = d.await;
        }
    }

    /// Undrained events of one partition.
    async fn depth_of(&self, p: u32) -> Result<u64, LogError> {
        let range = self.spool.offsets(SPOOL_TOPIC, p).await?;
        let drained = self.spool.committed(DRAIN_GROUP, SPOOL_TOPIC, p).await?.unwrap_or(range.start).max(range.start);
        Ok(range.end.saturating_sub(drained))
    }

    /// How long ago the oldest undrained event was spooled (the spool's
    /// append time), over all partitions; zero when none waits.
    async fn oldest_age(&self) -> Duration {
        let now_ms = sluice_core::clock::now_ms();
        let mut oldest = Duration::ZERO;
        for p in 0..self.partitions.len() as u32 {
            let Ok(range) = self.spool.offsets(SPOOL_TOPIC, p).await else { continue };
            let drained = match self.spool.committed(DRAIN_GROUP, SPOOL_TOPIC, p).await {
                Ok(c) => c.unwrap_or(range.start).max(range.start),
                Err(_) => continue,
            };
            if drained >= range.end {
                continue;
            }
            if let Ok(first) = self.spool.read(SPOOL_TOPIC, p, drained, 1).await {
                if let Some(r) = first.first() {
                    oldest = oldest.max(Duration::from_millis(now_ms.saturating_sub(r.timestamp_ms).max(0) as u64));
                }
            }
        }
        oldest
    }

    async fn total_depth(&self) -> u64 {
        self.try_total_depth().await.unwrap_or(0)
    }

    /// Where each partition of the spool ends now: what has been spooled so far.
    pub async fn ends(&self) -> Result<Vec<u64>, LogError> {
        let mut out = Vec::with_capacity(self.partitions.len());
        for p in 0..self.partitions.len() as u32 {
            out.push(self.spool.offsets(SPOOL_TOPIC, p).await?.end);
        }
        Ok(out)
    }

    /// Whether everything spooled before `ends` ([`Spool::ends`]) has been moved to the log.
    pub async fn drained_past(&self, ends: &[u64]) -> Result<bool, LogError> {
        for (p, end) in ends.iter().enumerate() {
            let range = self.spool.offsets(SPOOL_TOPIC, p as u32).await?;
            let drained = self.spool.committed(DRAIN_GROUP, SPOOL_TOPIC, p as u32).await?.unwrap_or(range.start).max(range.start);
            if drained < *end {
                return Ok(false);
            }
        }
        Ok(true)
    }

    async fn try_total_depth(&self) -> Result<u64, LogError> {
        let mut total = 0;
        for p in 0..self.partitions.len() as u32 {
            total += self.depth_of(p).await?;
        }
        Ok(total)
    }

    async fn append_to_spool(&self, p: u32, records: Vec<Record>) -> Result<u64, LogError> {
        let state = &self.partitions[p as usize];
        let _shared = state.gate.read().await;
        state.spooling.store(true, Ordering::SeqCst);
        // Unknown depth counts as full: the bound must hold.
        let depth = self.try_total_depth().await?;
        if depth + records.len() as u64 > self.settings.max_events {
            self.metrics.refused.inc_by(records.len() as u64);
            return Err(LogError::Unavailable(format!(
                "the ingest spool is full ({depth} events waiting for the log; ingest.spool_max_events = {})",
                self.settings.max_events
            )));
        }
        let n = records.len() as u64;
        let offset = self.spool.append(SPOOL_TOPIC, p, records).await?;
        self.metrics.spooled.inc_by(n);
        self.metrics.depth.set((depth + n) as i64);
        Ok(offset)
    }

    /// Move partition `p`'s spooled events to the log, oldest first, and
    /// switch it back to direct appends once empty.
    async fn drain(self: Arc<Self>, p: u32) {
        let state = &self.partitions[p as usize];
        let mut failures = 0u32;
        while !self.stop.load(Ordering::Relaxed) {
            if !state.spooling.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            match self.drain_batch(p).await {
                Ok(0) => {
                    // Empty: go direct, unless a spool append slipped in.
                    let _alone = state.gate.write().await;
                    if matches!(self.depth_of(p).await, Ok(0)) {
                        state.spooling.store(false, Ordering::SeqCst);
                        tracing::info!(partition = p, "ingest spool drained: appending to the log directly again");
                    }
                }
                Ok(_) => failures = 0,
                Err(e) => {
                    failures += 1;
                    let wait = Duration::from_millis(100u64 << failures.min(5));
                    tracing::warn!(partition = p, error = %e, ?wait, "cannot drain the ingest spool yet (is the log down?)");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    async fn drain_batch(&self, p: u32) -> Result<usize, LogError> {
        let range = self.spool.offsets(SPOOL_TOPIC, p).await?;
        let from = self.spool.committed(DRAIN_GROUP, SPOOL_TOPIC, p).await?.unwrap_or(range.start).max(range.start);
        let batch = self.spool.read_batch(SPOOL_TOPIC, p, from, self.settings.drain_batch).await?;
        if batch.records.is_empty() {
            return Ok(0);
        }
        let n = batch.records.len();
        let records = batch.records.into_iter().map(|r| Record { key: r.key, value: r.value }).collect();
        self.log.append(&self.input, p, records).await?;
        // A crash here re-drains this batch: dedup drops the repeats.
        self.spool.commit(Checkpoint { group: DRAIN_GROUP, topic: SPOOL_TOPIC, partition: p, next_offset: batch.next }).await?;
        self.metrics.drained.inc_by(n as u64);
        self.metrics.depth.set(self.total_depth().await as i64);
        Ok(n)
    }
}

#[async_trait]
impl Log for Spool {
    fn partitions(&self, topic: &str) -> Result<u32, LogError> {
        self.log.partitions(topic)
    }

    async fn append(&self, topic: &str, partition: u32, records: Vec<Record>) -> Result<u64, LogError> {
        if topic != self.input {
            return self.log.append(topic, partition, records).await;
        }
        let state = self.partitions.get(partition as usize).ok_or_else(|| LogError::UnknownPartition {
            topic: topic.to_owned(),
            partition,
            partitions: self.partitions.len() as u32,
        })?;
        if !state.spooling.load(Ordering::SeqCst) {
            match tokio::time::timeout(self.settings.spool_after, self.log.append(topic, partition, records.clone())).await {
                Ok(Ok(offset)) => return Ok(offset),
                Ok(Err(e)) => tracing::warn!(partition, error = %e, "log append failed; spooling"),
                Err(_) => tracing::warn!(partition, after = ?self.settings.spool_after, "log append too slow; spooling"),
            }
        }
        self.append_to_spool(partition, records).await
    }

    async fn read(&self, topic: &str, partition: u32, from: u64, max: usize) -> Result<Vec<StoredRecord>, LogError> {
        self.log.read(topic, partition, from, max).await
    }

    async fn read_batch(&self, topic: &str, partition: u32, from: u64, max: usize) -> Result<ReadBatch, LogError> {
        self.log.read_batch(topic, partition, from, max).await
    }

    async fn offsets(&self, topic: &str, partition: u32) -> Result<OffsetRange, LogError> {
        self.log.offsets(topic, partition).await
    }

    async fn commit(&self, at: Checkpoint<'_>) -> Result<(), LogError> {
        self.log.commit(at).await
    }

    async fn committed(&self, group: &str, topic: &str, partition: u32) -> Result<Option<u64>, LogError> {
        self.log.committed(group, topic, partition).await
    }

    fn join(&self, group: &str, topic: &str) -> Result<Membership, LogError> {
        self.log.join(group, topic)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use async_trait::async_trait;
    use bytes::Bytes;
    use sluice_log::{Checkpoint, EmbeddedLog, Log, LogError, LogOptions, OffsetRange, Record, StoredRecord};

    use super::{Spool, SpoolMetrics, SpoolSettings};

    /// An embedded log whose appends fail while `down`.
    struct Switch {
        inner: EmbeddedLog,
        down: AtomicBool,
    }

    #[async_trait]
    impl Log for Switch {
        fn partitions(&self, topic: &str) -> Result<u32, LogError> {
            self.inner.partitions(topic)
        }
        async fn append(&self, topic: &str, partition: u32, records: Vec<Record>) -> Result<u64, LogError> {
            if self.down.load(Ordering::SeqCst) {
                return Err(LogError::Unavailable("down (test)".into()));
            }
            self.inner.append(topic, partition, records).await
        }
        async fn read(&self, topic: &str, partition: u32, from: u64, max: usize) -> Result<Vec<StoredRecord>, LogError> {
            self.inner.read(topic, partition, from, max).await
        }
        async fn offsets(&self, topic: &str, partition: u32) -> Result<OffsetRange, LogError> {
            self.inner.offsets(topic, partition).await
        }
        async fn commit(&self, at: Checkpoint<'_>) -> Result<(), LogError> {
            self.inner.commit(at).await
        }
        async fn committed(&self, group: &str, topic: &str, partition: u32) -> Result<Option<u64>, LogError> {
            self.inner.committed(group, topic, partition).await
        }
    }

    /// While the log refuses appends, the spool's oldest event ages and
    /// the gauge says so; once drained, the gauge is back to 0.
    #[tokio::test(flavor = "multi_thread")]
    async fn the_oldest_undrained_event_age_grows_while_the_log_is_down() {
        let dir = tempfile::tempdir().unwrap();
        let options = LogOptions { topics: vec![("input".into(), 2)], ..LogOptions::default() };
        let inner = EmbeddedLog::open(&dir.path().join("log"), options).unwrap();
        let log = Arc::new(Switch { inner, down: AtomicBool::new(true) });
        let metrics = SpoolMetrics::default();
        let settings = SpoolSettings { spool_after: Duration::from_millis(200), max_events: 100, drain_batch: 10 };
        let spool = Spool::open(log.clone(), "input", &dir.path().join("spool"), settings, metrics.clone()).await.unwrap();
        assert_eq!(metrics.oldest_age.get(), 0.0, "empty spool");
        let rec = Record { key: Bytes::from_static(b"k"), value: Bytes::from_static(b"v") };
        spool.append("input", 1, vec![rec]).await.expect("acknowledged into the spool");
        let waited = Instant::now();
        while metrics.oldest_age.get() < 2.0 {
            assert!(waited.elapsed() < Duration::from_secs(10), "age stuck at {}", metrics.oldest_age.get());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(metrics.oldest_age.get() <= waited.elapsed().as_secs_f64() + 1.0);
        log.down.store(false, Ordering::SeqCst);
        let waited = Instant::now();
        while metrics.oldest_age.get() != 0.0 || metrics.depth.get() != 0 {
            assert!(waited.elapsed() < Duration::from_secs(20), "not drained");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(log.inner.read("input", 1, 0, 10).await.unwrap().len(), 1);
        spool.stop().await;
    }
}
