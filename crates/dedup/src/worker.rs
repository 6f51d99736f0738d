//! The dedup worker of one partition: the protocol of the crate docs.
//!
//! A worker runs on a dedicated thread: RocksDB calls block, and the async
//! `Log` is driven with `Handle::block_on`, so no async executor thread ever
//! waits on storage.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_core::metrics::{Counter, Family, Gauge, Histogram, Registry};
use sluice_core::Shutdown;
use sluice_log::{Checkpoint, Log, LogError, Publish, Record, StoredRecord};
use tokio::runtime::Handle;

use crate::crash::crash_point;
use crate::index::{now_ms, DedupIndex, IndexOptions, IndexStats};
use crate::retry::{backoff, ErrorStreak, Report, INITIAL_BACKOFF, LOG_EVERY, MAX_BACKOFF};
use crate::{DedupError, GROUP, INPUT_TOPIC, OUTPUT_TOPIC};
use sluice_core::topics::FORGET_RECORD;

/// Settings of the dedup stage.
#[derive(Clone)]
pub struct DedupSettings {
    /// Indexes live in `<index_dir>/<partition>`.
    pub index_dir: PathBuf,
    pub index: IndexOptions,
    /// Records read from `input` per batch.
    pub batch_size: usize,
    /// Sleep when `input` has nothing new.
    pub poll_interval: Duration,
    /// Triggered to stop: workers finish their batch, and a catch-up or
    /// rebuild stops between reads (its checkpoint lets the next start resume).
    pub stop: Shutdown,
}

type Labels = Vec<(&'static str, String)>;

/// Records per read during catch-up: whole events are read (up to 32 KB
/// each) on every partition at once at startup, so keep the batch modest.
const CATCH_UP_BATCH: usize = 2_000;

/// Dedup's metrics, labelled by partition where it matters.
#[derive(Clone)]
pub struct DedupMetrics {
    pub messages_in: Counter,
    pub duplicates_dropped: Counter,
    /// The same, per source (the key's part before '/'): a cell's metering.
    pub duplicates_by_source: Family<Labels, Counter>,
    pub published: Counter,
    pub index_keys: Family<Labels, Gauge>,
    pub bloom_useful: Family<Labels, Gauge>,
    pub bloom_full_positive: Family<Labels, Gauge>,
    pub block_cache_data_miss: Family<Labels, Gauge>,
    /// `output` records still to read into the index (catch-up or rebuild).
    pub catchup_remaining: Family<Labels, Gauge>,
    pub rebuilds: Counter,
    /// Times the committed input offset was past input's end and was reset.
    pub input_offset_resets: Counter,
    /// One batch: read input, look up, publish, index, commit.
    pub batch_seconds: Histogram,
    /// Per owned partition: age of the oldest `input` record not deduplicated
    /// (committed) yet, set by the process that runs the workers; 0 when caught up.
    pub oldest_unprocessed: Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Per partition: failed attempts (batch, catch-up, index open or
    /// rebuild), each retried with backoff.
    pub errors: Family<Labels, Counter>,
    /// Per partition: 1 while its worker is failing and retrying, else 0.
    pub failing: Family<Labels, Gauge>,
}

impl Default for DedupMetrics {
    fn default() -> Self {
        Self {
            messages_in: Counter::default(),
            duplicates_dropped: Counter::default(),
            duplicates_by_source: Family::default(),
            published: Counter::default(),
            index_keys: Family::default(),
            bloom_useful: Family::default(),
            bloom_full_positive: Family::default(),
            block_cache_data_miss: Family::default(),
            catchup_remaining: Family::default(),
            rebuilds: Counter::default(),
            input_offset_resets: Counter::default(),
            batch_seconds: Histogram::new(sluice_core::metrics::latency_buckets()),
            oldest_unprocessed: Family::default(),
            errors: Family::default(),
            failing: Family::default(),
        }
    }
}

impl DedupMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("sluice_dedup");
        r.register("messages_in", "Messages read from input", self.messages_in.clone());
        r.register("duplicates_dropped", "Messages dropped as repeats within the window", self.duplicates_dropped.clone());
        r.register("source_duplicates_dropped", "Messages dropped as repeats within the window, per source", self.duplicates_by_source.clone());
        r.register("published", "New messages published to output", self.published.clone());
        r.register("index_keys", "Estimated ids in the index, per partition", self.index_keys.clone());
        r.register("rocksdb_bloom_useful", "RocksDB ticker: lookups the bloom filter answered", self.bloom_useful.clone());
        r.register("rocksdb_bloom_full_positive", "RocksDB ticker: lookups the bloom filter passed on to the data", self.bloom_full_positive.clone());
        r.register("rocksdb_block_cache_data_miss", "RocksDB ticker: data blocks read from disk", self.block_cache_data_miss.clone());
        r.register("catchup_remaining", "Output records still to read into the index", self.catchup_remaining.clone());
        r.register("batch_seconds", "One dedup batch: read, look up, publish, index, commit", self.batch_seconds.clone());
        r.register("rebuilds", "Indexes moved aside and rebuilt from output", self.rebuilds.clone());
        r.register("input_offset_resets", "Committed input offsets found past input's end and reset", self.input_offset_resets.clone());
        r.register(
            "oldest_unprocessed_age_seconds",
            "Per input partition this process owns: age of the oldest event dedup has not processed (committed) yet (0 when caught up)",
            self.oldest_unprocessed.clone(),
        );
        r.register(
            "errors",
            "Per partition: failed dedup attempts (batch, catch-up, index open or rebuild; e.g. a full disk), each retried with backoff",
            self.errors.clone(),
        );
        r.register("failing", "Per partition: 1 while its dedup worker is failing and retrying with backoff", self.failing.clone());
    }

    pub fn partition(&self, p: u32) -> Labels {
        vec![("partition", p.to_string())]
    }
}

/// Progress of a catch-up or rebuild, for log lines and progress bars.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub partition: u32,
    pub done: u64,
    pub total: u64,
    pub elapsed: Duration,
}

pub struct DedupWorker {
    log: Arc<dyn Log>,
    partition: u32,
    settings: DedupSettings,
    metrics: DedupMetrics,
    /// `None` only between closing a bad index and opening its replacement.
    index: Option<DedupIndex>,
    /// Next `input` offset to read; `None` = ask the log for the committed one.
    next_input: Option<u64>,
    /// Further input topics of the same partition (the secondary Kafka
    /// cluster's `input`): read into the same index, by turns.
    extra_inputs: Vec<(String, Option<u64>)>,
    /// An extra input that failed is skipped until then.
    extra_paused_until: Vec<Option<Instant>>,
    /// Which input the next batch reads: 0 = `input`, i = `extra_inputs[i-1]`.
    turn: usize,
    /// Kafka: published batches whose transaction is not yet known to have
    /// ended on `output` (see [`Unconfirmed`]).
    unconfirmed: Option<Unconfirmed>,
}

/// Most published batches held unconfirmed before the worker stops and
/// fences (normally one: each batch confirms the one before it).
const MAX_UNCONFIRMED_BATCHES: usize = 8;

/// With Kafka, published batches whose transaction is not yet known to have
/// *ended* on `output`. A transaction that commits is not always over there:
/// a broker that restarts while writing the markers can skip `output`'s
/// ("hanging" transaction, see sluice_log's kafka.rs), while the input offset
/// it committed stands. Its records then belong to whatever this producer's
/// next marker on that partition says, and if the next transaction aborts,
/// they are aborted with it: acknowledged events gone from `output` although
/// dedup had moved past them. So, until a batch is confirmed:
///
/// - its ids stay here, in memory, not in the index (the index holds only
///   what `output` is known to hold), and lookups check them too;
/// - every offset commit keeps the input offset the oldest of them started
///   at as its `replay_from`, so whoever reads the partition next after an
///   error or a restart reads their input again: `output`'s committed
///   records (caught up into the index first) make the repeats drop, and the
///   aborted ones are published again.
///
/// A batch is confirmed by the next batch that publishes: with `input` the
/// only writer of `output`'s partition, a gap before that batch's first
/// record is the marker that ended the earlier transaction, and no gap means
/// the two are one transaction now; with a secondary cluster's input also
/// writing there, by `output`'s last stable offset instead.
struct Unconfirmed {
    /// Where the oldest of the batches started reading `input`.
    replay_from: u64,
    /// `output` offset of the oldest batch's first record.
    output_first: u64,
    /// `output` offset just past the newest batch's last record.
    output_end: u64,
    /// Ids and publish times, in the order published.
    ids: Vec<(bytes::Bytes, u64)>,
    lookup: std::collections::HashSet<bytes::Bytes>,
    batches: usize,
}

fn index_path(settings: &DedupSettings, partition: u32) -> PathBuf {
    settings.index_dir.join(partition.to_string())
}

/// Move an index directory aside as `<dir>.<why>-<ms>`, for a post-mortem.
/// Only the newest copy is kept: older ones of the same partition are
/// deleted, so an index that keeps failing cannot fill the disk.
fn move_aside(path: &Path, why: &str) -> Result<PathBuf, DedupError> {
    if let (Some(parent), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) {
        let prefix = format!("{name}.");
        for entry in std::fs::read_dir(parent).into_iter().flatten().flatten() {
            let old = entry.file_name();
            let old = old.to_string_lossy();
            let is_copy = old.strip_prefix(&prefix).is_some_and(|rest| rest.starts_with("corrupt-") || rest.starts_with("old-"));
            if is_copy {
                if let Err(e) = std::fs::remove_dir_all(entry.path()) {
                    tracing::warn!(path = %entry.path().display(), error = %e, "could not delete an older moved-aside index");
                }
            }
        }
    }
    let aside = path.with_extension(format!("{why}-{}", now_ms()));
    std::fs::rename(path, &aside).map_err(|source| DedupError::Io { path: path.display().to_string(), source })?;
    Ok(aside)
}

impl DedupWorker {
    /// Open the partition's index (moving a corrupt one aside) and catch it
    /// up from `output`. `progress` is called as catch-up advances.
    pub fn open(
        log: Arc<dyn Log>,
        partition: u32,
        settings: DedupSettings,
        metrics: DedupMetrics,
        rt: &Handle,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Self, DedupError> {
        let path = index_path(&settings, partition);
        std::fs::create_dir_all(&settings.index_dir).map_err(|source| DedupError::Io { path: settings.index_dir.display().to_string(), source })?;
        let index = match DedupIndex::open(&path, &settings.index) {
            Ok(index) => index,
            Err(e) if e.needs_rebuild() => {
                let aside = move_aside(&path, "corrupt")?;
                tracing::error!(partition, error = %e, moved_to = %aside.display(), "dedup index corrupt: moved aside, rebuilding from output");
                metrics.rebuilds.inc();
                DedupIndex::open(&path, &settings.index)?
            }
            Err(e) => return Err(e),
        };
        // Fence any earlier owner first: what catch-up then reads is final.
        if log.atomic_publish_and_commit(INPUT_TOPIC) {
            rt.block_on(log.fence(GROUP, INPUT_TOPIC, partition))?;
        }
        let extra_inputs: Vec<(String, Option<u64>)> = log.extra_inputs().into_iter().map(|t| (t, None)).collect();
        let extra_paused_until = vec![None; extra_inputs.len()];
        let mut worker = Self {
            log,
            partition,
            settings,
            metrics,
            index: Some(index),
            next_input: None,
            extra_inputs,
            extra_paused_until,
            turn: 0,
            unconfirmed: None,
        };
        match worker.catch_up(rt, progress) {
            Err(e) if e.needs_rebuild() => worker.rebuild(rt, &e, progress)?,
            r => {
                r?;
            }
        }
        Ok(worker)
    }

    /// The open index, reopening it if a failed rebuild left none.
    pub fn index(&mut self) -> Result<&DedupIndex, DedupError> {
        if self.index.is_none() {
            self.index = Some(DedupIndex::open(&index_path(&self.settings, self.partition), &self.settings.index)?);
        }
        Ok(self.index.as_ref().expect("just opened"))
    }

    /// Replace the index with an empty one and fill it from `output`.
    fn rebuild(&mut self, rt: &Handle, cause: &DedupError, progress: &mut dyn FnMut(Progress)) -> Result<(), DedupError> {
        let path = index_path(&self.settings, self.partition);
        self.index = None; // close the database before moving its directory
        let aside = move_aside(&path, "corrupt")?;
        tracing::error!(partition = self.partition, error = %cause, moved_to = %aside.display(), "dedup index unusable: moved aside, rebuilding from output");
        self.metrics.rebuilds.inc();
        self.forget_input_positions();
        self.catch_up(rt, progress)
    }

    /// Read `output` from the index's checkpoint to its end into the index.
    /// Ids older than the window are skipped.
    pub fn catch_up(&mut self, rt: &Handle, progress: &mut dyn FnMut(Progress)) -> Result<(), DedupError> {
        let p = self.partition;
        let range = rt.block_on(self.log.offsets(OUTPUT_TOPIC, p))?;
        let index = self.index()?;
        let checkpoint = index.checkpoint()?;
        if let Some(c) = checkpoint.filter(|c| *c > range.end) {
            return Err(DedupError::AheadOfOutput { path: index.path().display().to_string(), checkpoint: c, end: range.end });
        }
        let index = self.index.as_ref().expect("opened above");
        let mut next = checkpoint.unwrap_or(range.start).max(range.start);
        let start = next;
        let total = range.end - start;
        tracing::debug!(partition = p, from = start, to = range.end, ?checkpoint, "dedup: catching up from output");
        let started = Instant::now();
        let gauge = self.metrics.catchup_remaining.get_or_create(&self.metrics.partition(p)).clone();
        let window_ms = self.settings.index.window.as_millis() as u64;
        let mut last_report = Instant::now();
        let mut empty_reads = 0;
        while next < range.end {
            if self.settings.stop.is_triggered() {
                return Err(DedupError::Stopped);
            }
            let batch = match rt.block_on(self.log.read_batch(OUTPUT_TOPIC, p, next, CATCH_UP_BATCH)) {
                Ok(b) => b,
                // Retention removed the start meanwhile: continue from the new start.
                Err(LogError::OffsetOutOfRange { start, .. }) => {
                    next = start;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            // An empty batch means the end (offsets past the last record hold
            // only transaction markers); `next` steps over them.
            let records = batch.records;
            let reached = batch.next;
            if records.is_empty() {
                if reached > next {
                    index.record(std::iter::empty(), reached)?;
                    next = reached;
                }
                // Short of the end: records not fetched yet, or a transaction
                // of the (fenced) previous owner still being aborted. Wait:
                // stopping early would leave ids out of the index.
                empty_reads += 1;
                if empty_reads > 300 {
                    return Err(DedupError::Log(LogError::Unavailable(format!(
                        "output partition {p} did not reach offset {} within 30 s during catch-up (at {next})",
                        range.end
                    ))));
                }
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            empty_reads = 0;
            let cutoff = now_ms().saturating_sub(window_ms);
            // Keys starting with NUL are the log's own records (the one that
            // ends a hanging Kafka transaction), not events.
            let ids =
                records.iter().filter(|r| r.timestamp_ms as u64 >= cutoff && r.key.first() != Some(&0)).map(|r| (&r.key[..], r.timestamp_ms as u64));
            index.record(ids, reached)?;
            next = reached;
            gauge.set(range.end.saturating_sub(next) as i64);
            if last_report.elapsed() >= Duration::from_secs(1) || next >= range.end {
                last_report = Instant::now();
                progress(Progress { partition: p, done: next - start, total, elapsed: started.elapsed() });
            }
        }
        gauge.set(0);
        if total > 0 {
            tracing::info!(partition = p, ids = total, seconds = started.elapsed().as_secs_f64(), "dedup index caught up from output");
        }
        Ok(())
    }

    /// Deduplicate one batch, from the first input (by turns) that has
    /// records. Returns the number of records read.
    pub fn process_batch(&mut self, rt: &Handle) -> Result<usize, DedupError> {
        let inputs = 1 + self.extra_inputs.len();
        for _ in 0..inputs {
            let turn = self.turn;
            self.turn = (self.turn + 1) % inputs;
            let (topic, next) = match turn {
                0 => (INPUT_TOPIC.to_owned(), self.next_input),
                i => self.extra_inputs[i - 1].clone(),
            };
            if turn > 0 && self.extra_paused_until.get(turn - 1).copied().flatten().is_some_and(|t| Instant::now() < t) {
                continue;
            }
            let (read, next) = match self.process_input(rt, &topic, next) {
                Ok(r) => r,
                // An extra input (the secondary cluster) failing must not
                // hold up the primary's: set it aside for a while.
                Err(e @ DedupError::Log(_)) if turn > 0 => {
                    tracing::warn!(partition = self.partition, input = %topic, error = %e, "cannot read this input; trying again in 10 s");
                    self.extra_paused_until[turn - 1] = Some(Instant::now() + Duration::from_secs(10));
                    self.extra_inputs[turn - 1].1 = None;
                    // A batch may have been published before the error: index it.
                    self.catch_up(rt, &mut |_| {})?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            match turn {
                0 => self.next_input = next,
                i => self.extra_inputs[i - 1].1 = next,
            }
            if read > 0 {
                return Ok(read);
            }
        }
        Ok(0)
    }

    /// After an error (or a rebuild): read every input again from where its
    /// owner resumes ([`Log::resume_point`]), and drop the unconfirmed ids:
    /// the catch-up that follows adds those `output` really holds.
    fn forget_input_positions(&mut self) {
        self.unconfirmed = None;
        self.next_input = None;
        self.extra_inputs.iter_mut().for_each(|(_, next)| *next = None);
    }

    /// Deduplicate one batch of input topic `topic` from `next` (`None` =
    /// its committed offset). Returns the records read and where to go on.
    fn process_input(&mut self, rt: &Handle, topic: &str, next: Option<u64>) -> Result<(usize, Option<u64>), DedupError> {
        let p = self.partition;
        let next = match next {
            Some(n) => n,
            None => {
                let resume = rt.block_on(self.log.resume_point(GROUP, topic, p))?;
                let from = resume.unwrap_or(rt.block_on(self.log.offsets(topic, p))?.start);
                tracing::debug!(partition = p, input = topic, ?resume, from, "dedup: reading input from where its owner resumes");
                from
            }
        };
        // Read first: a busy partition pays one read per batch (with Kafka an
        // offsets call is a network round trip); the end is asked only when
        // there was nothing to read.
        let batch = match rt.block_on(self.log.read_batch(topic, p, next, self.settings.batch_size)) {
            Ok(b) => b,
            Err(LogError::OffsetOutOfRange { start, .. }) => {
                tracing::warn!(partition = p, from = next, start, "input records expired before dedup read them; skipping ahead");
                return Ok((0, Some(start)));
            }
            Err(e) => return Err(e.into()),
        };
        let mut records = batch.records;
        if records.is_empty() {
            let end = rt.block_on(self.log.offsets(topic, p))?.end;
            if next > end {
                // The committed offset is past the log's end: input's tail was cut
                // (recovery after a power loss without fsync, or corruption). New
                // events will take those offsets again; read them, don't skip them.
                tracing::error!(
                    partition = p,
                    committed = next,
                    end,
                    "dedup's input offset is past the end of input (its tail was cut); resuming at the end"
                );
                self.metrics.input_offset_resets.inc();
                rt.block_on(self.log.commit(Checkpoint { group: GROUP, topic, partition: p, next_offset: end }))?;
                return Ok((0, Some(end)));
            }
            return Ok((0, Some(batch.next)));
        }
        if records.iter().any(|r| r.value.starts_with(FORGET_RECORD)) {
            // A moved workspace's cleanup: its sources' ids leave the index (idempotent: a replayed batch deletes nothing more).
            self.index()?;
            let index = self.index.as_ref().expect("opened above");
            for r in records.iter().filter(|r| r.value.starts_with(FORGET_RECORD)) {
                index.forget_prefix(&r.key)?;
                tracing::info!(partition = p, prefix = %String::from_utf8_lossy(&r.key), "dedup: a source's ids forgotten (its workspace moved to another cell)");
            }
            records.retain(|r| !r.value.starts_with(FORGET_RECORD));
        }
        let from = next;
        let next = batch.next;
        // Tests hold dedup here (records read, nothing looked up) to make an interleaving certain.
        sluice_core::crash::pause_point("dedup.batch");
        self.metrics.messages_in.inc_by(records.len() as u64);
        let started = Instant::now();
        let _span = tracing::debug_span!("dedup.batch", partition = p, records = records.len()).entered();

        // 1. Look up; repeats inside the batch count as duplicates too.
        let now = now_ms();
        let keys: Vec<&[u8]> = records.iter().map(|r| &r.key[..]).collect();
        self.index()?;
        let index = self.index.as_ref().expect("opened above");
        let unconfirmed = self.unconfirmed.as_ref().map(|u| &u.lookup);
        let fresh: Vec<&StoredRecord> =
            index.select_new(&keys, now)?.into_iter().map(|i| &records[i]).filter(|r| !unconfirmed.is_some_and(|u| u.contains(&r.key))).collect();
        self.metrics.duplicates_dropped.inc_by((records.len() - fresh.len()) as u64);
        if fresh.len() < records.len() {
            // Repeats are rare: counting them per source costs a set of the kept offsets, only then.
            let kept: std::collections::HashSet<u64> = fresh.iter().map(|r| r.offset).collect();
            let mut by_source: std::collections::HashMap<&[u8], u64> = std::collections::HashMap::new();
            // A key record already held (a key stream sent twice) is no client's duplicate.
            for r in records.iter().filter(|r| !kept.contains(&r.offset) && !sluice_core::topics::is_internal_record(&r.value)) {
                let source = r.key.split(|b| *b == b'/').next().unwrap_or_default();
                *by_source.entry(source).or_default() += 1;
            }
            for (source, n) in by_source {
                self.metrics.duplicates_by_source.get_or_create(&vec![("source", String::from_utf8_lossy(source).into_owned())]).inc_by(n);
            }
        }
        if tracing::enabled!(tracing::Level::DEBUG) && fresh.len() < records.len() {
            // Which ids were dropped, for tracing an event that went missing.
            let kept: std::collections::HashSet<u64> = fresh.iter().map(|r| r.offset).collect();
            let dropped: Vec<String> = records
                .iter()
                .filter(|r| !kept.contains(&r.offset))
                .take(20)
                .map(|r| format!("{}@{}", String::from_utf8_lossy(&r.key), r.offset))
                .collect();
            tracing::debug!(partition = p, input = topic, ?dropped, "dedup: repeats dropped");
        }

        let out: Vec<Record> = fresh.iter().map(|r| Record { key: r.key.clone(), value: r.value.clone() }).collect();
        if self.log.atomic_publish_and_commit(topic) {
            // Kafka: publish and commit input in one transaction; the ids
            // reach the index once the transaction is known to have ended.
            let replay_from = match &self.unconfirmed {
                Some(u) => Some(u.replay_from),
                None if !fresh.is_empty() => Some(from),
                None => None,
            };
            crash_point("dedup.before_publish");
            let first = rt.block_on(self.log.publish_and_commit(Publish {
                out_topic: OUTPUT_TOPIC,
                records: out,
                commit: Checkpoint { group: GROUP, topic, partition: p, next_offset: next },
                replay_from,
            }))?;
            self.metrics.published.inc_by(fresh.len() as u64);
            crash_point("dedup.after_publish");
            tracing::debug!(partition = p, input = topic, from, next, read = records.len(), published = fresh.len(), output_first = ?first, ?replay_from, "dedup: batch published and input committed");
            if let Some(first) = first {
                let ids: Vec<(bytes::Bytes, u64)> = fresh.iter().map(|r| (r.key.clone(), now)).collect();
                self.hold_unconfirmed(rt, from, first, ids)?;
            }
            crash_point("dedup.after_index_write");
        } else {
            if !fresh.is_empty() {
                crash_point("dedup.before_publish");
                // 2. Publish: the commit point.
                let first = rt.block_on(self.log.append(OUTPUT_TOPIC, p, out))?;
                self.metrics.published.inc_by(fresh.len() as u64);
                crash_point("dedup.after_publish");
                // 3. Index the ids with the output offset reached (not past
                // unconfirmed Kafka batches: catch-up must read those again).
                let reached = first + fresh.len() as u64;
                let checkpoint = self.unconfirmed.as_ref().map_or(reached, |u| reached.min(u.output_first));
                index.record(fresh.iter().map(|r| (&r.key[..], now)), checkpoint)?;
                crash_point("dedup.after_index_write");
            }
            // 4. Commit input.
            rt.block_on(self.log.commit(Checkpoint { group: GROUP, topic, partition: p, next_offset: next }))?;
            tracing::debug!(
                partition = p,
                input = topic,
                from,
                next,
                read = records.len(),
                published = fresh.len(),
                "dedup: batch published and input committed"
            );
        }
        crash_point("dedup.after_input_commit");
        self.metrics.batch_seconds.observe(started.elapsed().as_secs_f64());
        Ok((records.len(), Some(next)))
    }

    /// A batch just published `ids` from `output` offset `first` (its
    /// transaction committed, reading `input` from `from`): confirm the
    /// batches held before it if `output` shows their transaction ended,
    /// then hold this one. See [`Unconfirmed`].
    fn hold_unconfirmed(&mut self, rt: &Handle, from: u64, first: u64, ids: Vec<(bytes::Bytes, u64)>) -> Result<(), DedupError> {
        let p = self.partition;
        if let Some(u) = &self.unconfirmed {
            let ended = if self.extra_inputs.is_empty() {
                // A marker took the offset(s) between.
                first > u.output_end
            } else {
                rt.block_on(self.log.offsets(OUTPUT_TOPIC, p))?.end >= u.output_end
            };
            if ended {
                let u = self.unconfirmed.take().expect("checked");
                self.index()?.record(u.ids.iter().map(|(k, t)| (&k[..], *t)), u.output_end)?;
            }
        }
        let end = first + ids.len() as u64;
        let u = self.unconfirmed.get_or_insert_with(|| Unconfirmed {
            replay_from: from,
            output_first: first,
            output_end: end,
            ids: Vec::new(),
            lookup: Default::default(),
            batches: 0,
        });
        u.output_end = end;
        u.lookup.extend(ids.iter().map(|(k, _)| k.clone()));
        u.ids.extend(ids);
        u.batches += 1;
        if u.batches > 1 {
            tracing::warn!(
                partition = p,
                batches = u.batches,
                replay_from = u.replay_from,
                "dedup: an earlier Kafka transaction has not ended on output (a broker restart skipped its marker?); its ids wait"
            );
        }
        if u.batches >= MAX_UNCONFIRMED_BATCHES {
            return Err(DedupError::Log(LogError::Unavailable(format!(
                "output/{p}: {} transactions in a row did not end on output; fencing and reading input again from {}",
                u.batches, u.replay_from
            ))));
        }
        Ok(())
    }

    /// Flush the index and return its statistics and size on disk (bytes).
    pub fn flush_and_measure(&mut self) -> Result<(IndexStats, u64), DedupError> {
        let index = self.index()?;
        index.flush()?;
        Ok((index.stats(), index.size_on_disk()))
    }

    /// Refresh this partition's gauges from RocksDB's statistics.
    pub fn refresh_metrics(&self) -> IndexStats {
        let Some(index) = &self.index else { return IndexStats::default() };
        let s = index.stats();
        let l = self.metrics.partition(self.partition);
        self.metrics.index_keys.get_or_create(&l).set(s.estimated_keys as i64);
        self.metrics.bloom_useful.get_or_create(&l).set(s.bloom_useful as i64);
        self.metrics.bloom_full_positive.get_or_create(&l).set(s.bloom_full_positive as i64);
        self.metrics.block_cache_data_miss.get_or_create(&l).set(s.block_cache_data_miss as i64);
        s
    }

    /// Work until `stop` is triggered. Errors are retried with exponential
    /// backoff ([`crate::retry`]: 250 ms doubling to 5 s) and logged once per
    /// run of failures, then summarized once per 30 s (a full disk fails
    /// every attempt alike); `sluice_dedup_errors_total` counts them and
    /// `sluice_dedup_failing` is 1 meanwhile. A corrupt index is rebuilt;
    /// after any error the index is reopened if RocksDB failed (a database
    /// with a background error refuses writes until reopened) and catches up
    /// from `output` again, as after a restart, so a half-done batch cannot
    /// publish twice. The input offset is committed only after a batch is
    /// published and indexed, so nothing is skipped while failing.
    pub fn run(mut self, rt: Handle) {
        let stop = self.settings.stop.clone();
        let p = self.partition;
        let mut last_metrics = Instant::now();
        let mut log_progress = |pr: Progress| {
            tracing::info!(partition = pr.partition, done = pr.done, total = pr.total, "dedup catch-up progress");
        };
        let labels = self.metrics.partition(p);
        let errors = self.metrics.errors.get_or_create(&labels).clone();
        let failing_gauge = self.metrics.failing.get_or_create(&labels).clone();
        failing_gauge.set(0);
        let mut streak = ErrorStreak::new(LOG_EVERY);
        let mut failing = false;
        while !stop.is_triggered() {
            // After an error the next step only catches up: its success is not
            // a recovery yet (publishing may still fail, as on a full disk).
            let catching_up = failing;
            let result = if failing {
                self.forget_input_positions();
                // With Kafka, fence again first: a transaction this worker
                // could not finish is ended (or one a broker restart left
                // hanging is closed) before catch-up reads output's end.
                let fenced = if self.log.atomic_publish_and_commit(INPUT_TOPIC) {
                    rt.block_on(self.log.fence(GROUP, INPUT_TOPIC, p)).map_err(DedupError::from)
                } else {
                    Ok(())
                };
                match fenced.and_then(|_| self.catch_up(&rt, &mut log_progress)) {
                    Err(e) if e.needs_rebuild() => self.rebuild(&rt, &e, &mut log_progress).map(|_| 0),
                    r => r.map(|_| 0),
                }
            } else {
                match self.process_batch(&rt) {
                    Err(e) if e.needs_rebuild() => self.rebuild(&rt, &e, &mut log_progress).map(|_| 0),
                    r => r,
                }
            };
            match result {
                Err(DedupError::Stopped) => break,
                Ok(_) if catching_up => failing = false,
                Ok(n) => {
                    if let Some(r) = streak.success(Instant::now()) {
                        tracing::info!(
                            partition = p,
                            failures = r.failures,
                            failing_for_s = r.failing_for.as_secs_f64(),
                            "dedup partition recovered: working again"
                        );
                        failing_gauge.set(0);
                    }
                    failing = false;
                    if n == 0 {
                        std::thread::sleep(self.settings.poll_interval);
                    }
                }
                Err(e) => {
                    errors.inc();
                    failing_gauge.set(1);
                    let report = streak.failure(Instant::now());
                    let delay = backoff(INITIAL_BACKOFF, MAX_BACKOFF, streak.failures().min(u32::MAX as u64) as u32);
                    match report {
                        Report::First => tracing::error!(
                            partition = p,
                            error = %e,
                            retry_in_ms = delay.as_millis() as u64,
                            "dedup partition stopped making progress; retrying with backoff up to 5 s (input offset held; further errors summarized every 30 s)"
                        ),
                        Report::Summary { failures, failing_for } => tracing::error!(
                            partition = p,
                            failures,
                            failing_for_s = failing_for.as_secs_f64(),
                            error = %e,
                            "dedup partition still failing; retrying with backoff"
                        ),
                        Report::Quiet => tracing::debug!(partition = p, error = %e, "dedup attempt failed again"),
                    }
                    if matches!(e, DedupError::Rocks { .. }) {
                        self.index = None; // reopen it: RocksDB refuses writes after a write error until reopened
                    }
                    failing = true;
                    stop.sleep_blocking(delay);
                }
            }
            if last_metrics.elapsed() >= Duration::from_secs(5) {
                self.refresh_metrics();
                last_metrics = Instant::now();
            }
        }
        failing_gauge.set(0);
        self.refresh_metrics();
        if let Err(e) = self.index.as_ref().map_or(Ok(()), DedupIndex::flush) {
            tracing::warn!(partition = p, error = %e, "flushing the dedup index at shutdown failed (catch-up repairs it)");
        }
    }
}

/// `sluice dedup rebuild`: move the partition's index aside and rebuild it
/// from `output`. The log must not be written meanwhile (the server stopped).
pub fn rebuild_partition(
    log: Arc<dyn Log>,
    partition: u32,
    settings: DedupSettings,
    rt: &Handle,
    progress: &mut dyn FnMut(Progress),
) -> Result<IndexStats, DedupError> {
    let path = index_path(&settings, partition);
    if path.exists() {
        let aside = move_aside(&path, "old")?;
        tracing::info!(partition, moved_to = %aside.display(), "previous index moved aside");
    }
    let mut worker = DedupWorker::open(log, partition, settings, DedupMetrics::default(), rt, progress)?;
    let index = worker.index()?;
    index.flush()?;
    Ok(index.stats())
}
