//! The embedded log: Sluice's default [`Log`], on local disk, no services.
//!
//! # On-disk format
//!
//! ```text
//! <root>/LOCK                                  flock'ed by the one process that writes
//! <root>/<topic>/topic.meta                    "partitions=<N>\n", written once
//! <root>/<topic>/<partition>/<base:020>.seg    segments, named by their first offset
//! <root>/<topic>/<partition>/groups/<g>.offset "<next offset>\n", replaced atomically
//! <root>/<topic>/<partition>/durable           the durable-through marker, replaced atomically
//! ```
//!
//! A segment is a 16-byte header (`b"SLUICEL1"`, then the base offset as
//! u64 LE) followed by frames:
//!
//! ```text
//! u32 LE  body length (bytes after the checksum)
//! u32 LE  CRC-32C of the body
//! body:   u64 LE offset | i64 LE timestamp ms | u32 LE key length | key | value
//! ```
//!
//! # Invariants
//!
//! 1. Offsets in a partition are dense: frame *k* of the segment with base
//!    *b* holds offset *b + k*, and each segment's base is one past the last
//!    offset of the segment before it.
//! 2. One writer thread per partition owns the newest (active) segment. It
//!    takes every append waiting in its queue, writes them with one `write`,
//!    then one `fdatasync` (group commit), and only then publishes the new end
//!    offset and answers the callers. So an acknowledged record is durable,
//!    and readers never see a record that is not. A group whose write or
//!    fsync fails is cut back to the durable length and fails alone (its
//!    callers get the I/O error; the next group is tried again); only a
//!    failed cut-back or segment roll stops the partition's writes until
//!    a restart ([`LogError::Poisoned`]).
//! 3. Only the active segment can end in a torn or corrupt frame (a crash
//!    mid-write), and only *after its durable position* (invariant 7). On
//!    open it is scanned; a bad frame (or the end of the file) at or past
//!    the durable position is a torn tail: the segment is cut back to the
//!    last valid frame, and the cut is logged with the bytes and records
//!    dropped. Nothing cut was ever acknowledged (invariants 2 and 7).
//!    Everything after the first bad frame is cut, even frames that look
//!    valid: a power loss can persist a later page of the last write without
//!    an earlier one, and preallocated or reused space can hold stale frames,
//!    so what follows a bad frame says nothing either way. A bad frame, or
//!    the end of the file, *before* the durable position is damage to
//!    acknowledged records, not a torn tail: opening fails with
//!    [`LogError::Corrupt`] naming the segment, the byte position and offset
//!    of the bad frame and the durable offset, and the file is not touched.
//!    A full header that does not match, in front of records, is corruption
//!    too (headers are fsynced before any record): opening fails rather than
//!    wiping the segment. Older (sealed) segments were fsynced before the
//!    roll; a bad frame in one of them is reported as [`LogError::Corrupt`]
//!    when read, never silently skipped, and the segment is left as it is.
//! 4. A new segment is created with its header, fsynced, and the directory
//!    fsynced, before any record goes into it.
//! 5. Retention deletes whole sealed segments, oldest first, once the file's
//!    modification time (its last write) is older than the retention period.
//!    The active segment is never deleted.
//! 6. A consumer group offset file is written to a temporary file, fsynced,
//!    renamed over the old one, and the directory fsynced: a reader sees the
//!    old value or the new, never a mix.
//! 7. The durable-through marker (`durable`, one line
//!    `segment=<base> end=<offset> position=<byte> crc32c=<hex>`) says that
//!    the frames of segment `<base>` before offset `end` (byte `position`)
//!    were fdatasynced. It never runs ahead of the data: the writer thread
//!    writes it (invariant 6's temporary file + fsync + rename + directory
//!    fsync) only with `log.fsync` on, and only for a prefix it has already
//!    fsynced: after a group commit, at most once every [`MARKER_INTERVAL`],
//!    after its replies went out (so an append never waits on it; the next
//!    group waits for at most one small-file write and its fsyncs per
//!    interval); when appends stop, once the interval is up; when a segment
//!    is rolled; when the writer stops (clean close); and at open, after
//!    recovery has fsynced what it kept. It may lag: records acknowledged
//!    within about one interval before a crash may not be covered, and
//!    damage to them is still taken for a torn tail (the residual window).
//!    Sealed segments need no marker: they are never cut (invariant 3).
//!    A marker that names an older segment than the active one covers none
//!    of the active segment (the roll's marker write did not happen). A
//!    marker that names a segment newer than the newest file, with records
//!    in it, means the active segment file is gone: opening fails. A missing
//!    marker (a log from before the marker existed, or `log.fsync` off since
//!    the start) means durable through the header: exactly the older
//!    recovery. A marker that does not parse or fails its checksum (it is
//!    replaced by rename, so only outside damage makes one), is longer than
//!    512 bytes, or is not a regular file at all (a symlink, FIFO, device or
//!    directory: never followed, opened or shown) is reported with a warning
//!    and treated as missing, so it can never keep a log from
//!    opening; recovery then writes a good one.
//!
//! Damage before the durable position is refused, not skipped: the damaged
//! bytes may be a frame's length, so where the next frame starts is not
//! known, and finding it by searching forward for something that checks
//! out is the guess invariant 3 rules out; a wrong guess would misnumber
//! every later record (invariant 1), and the writer could not know where
//! the partition ends. Refusing keeps every byte for the operator, who can
//! read the records before the damage read-only (`open_read_only` opens; a
//! read that reaches the damage returns the records before it, and the next
//! read, starting at the damage, fails with [`LogError::Corrupt`]), copy
//! the segment, and, to accept the loss, delete the partition's `durable`
//! file: the next open then cuts the segment at the bad frame like a torn
//! tail (logged with the records cut), and later appends reuse those
//! offsets.
//!
//! Reads use a sparse in-memory index per segment (an entry every
//! [`INDEX_INTERVAL`] bytes) to start near the wanted offset. The active
//! segment's index is kept as it is written; an older segment's is built by
//! one verifying scan the first time it is read.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use sluice_core::metrics::{latency_buckets, Counter, Histogram, Registry};
use sluice_core::retry::{ErrorStreak, Report};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::{Checkpoint, Log, LogError, OffsetRange, Record, StoredRecord};

const MAGIC: &[u8; 8] = b"SLUICEL1";
const HEADER_LEN: u64 = 16;
const FRAME_PREFIX: usize = 8;
const BODY_FIXED: usize = 20;
/// Largest key + value of one record.
pub const MAX_RECORD_BYTES: usize = 16 << 20;
/// Bytes between two sparse index entries.
pub const INDEX_INTERVAL: u64 = 64 * 1024;
/// Most records one group commit takes from the queue.
const MAX_GROUP_RECORDS: usize = 64 * 1024;
/// Appends queued for (or being committed by) one partition's writer thread
/// at most. Appenders can outrun the disk (fdatasync): past this many, an
/// append waits asynchronously for a slot instead of growing the queue, so a
/// slow disk pushes back on ingest rather than on memory. Several full
/// groups' worth of typical appends (one per request and partition), so
/// group commit is never starved of work. No deadlock: the writer thread
/// never waits on an appender (it only answers on oneshots), and a slot is
/// freed as each append is answered.
const APPEND_QUEUE: usize = 4096;
/// Name of a partition's durable-through marker (invariant 7).
pub const MARKER_FILE: &str = "durable";
/// Longest a running writer lets its durable-through marker lag behind
/// what it has fsynced (invariant 7); the marker is written at most this
/// often under load.
pub const MARKER_INTERVAL: Duration = Duration::from_millis(1000);
/// A marker that cannot be written (a full disk) is retried every
/// [`MARKER_INTERVAL`]; its failures are logged once, then summarized at
/// most this often per partition, then once when it works again.
pub const MARKER_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Settings of an [`EmbeddedLog`].
#[derive(Clone)]
pub struct LogOptions {
    /// Topics and their partition counts; created when missing.
    pub topics: Vec<(String, u32)>,
    /// Roll the active segment once it reaches this size.
    pub segment_bytes: u64,
    /// Delete sealed segments last written longer ago than this.
    pub retention: Duration,
    /// Per-topic retention, overriding `retention` (e.g. `output` is kept
    /// for the whole dedup window, so the index can be rebuilt from it).
    pub retention_by_topic: HashMap<String, Duration>,
    /// Per topic, a consumer group whose unread records retention must keep
    /// (e.g. `input` → `dedup`: acknowledged events are never deleted unread).
    pub retention_guard: HashMap<String, String>,
    /// fdatasync each group commit (turn off only for throwaway data).
    pub fsync: bool,
    pub metrics: LogMetrics,
}

/// The configuration's defaults (`[log]`), with one topic `input`.
impl Default for LogOptions {
    fn default() -> Self {
        let c = sluice_core::config::LogConfig::default();
        Self {
            topics: vec![(sluice_core::topics::INPUT.into(), c.partitions)],
            segment_bytes: c.segment_bytes,
            retention: c.retention,
            retention_by_topic: HashMap::new(),
            retention_guard: HashMap::new(),
            fsync: c.fsync,
            metrics: LogMetrics::default(),
        }
    }
}

/// Counters of the embedded log; register them to export them.
#[derive(Clone)]
pub struct LogMetrics {
    pub appended_records: Counter,
    pub appended_bytes: Counter,
    pub group_commits: Counter,
    pub commit_seconds: Histogram,
    pub truncated_records: Counter,
    pub deleted_segments: Counter,
}

impl Default for LogMetrics {
    fn default() -> Self {
        Self {
            appended_records: Counter::default(),
            appended_bytes: Counter::default(),
            group_commits: Counter::default(),
            commit_seconds: Histogram::new(latency_buckets()),
            truncated_records: Counter::default(),
            deleted_segments: Counter::default(),
        }
    }
}

impl LogMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("sluice_log");
        r.register("appended_records", "Records appended", self.appended_records.clone());
        r.register("appended_bytes", "Bytes appended, framing included", self.appended_bytes.clone());
        r.register("group_commits", "Group commits (one write + fsync each)", self.group_commits.clone());
        r.register("group_commit_seconds", "Time of a group commit's write and fsync", self.commit_seconds.clone());
        r.register("truncated_records", "Torn or corrupt tail records cut on open", self.truncated_records.clone());
        r.register("deleted_segments", "Segments deleted by retention", self.deleted_segments.clone());
    }
}

/// See the module docs.
pub struct EmbeddedLog {
    topics: HashMap<String, Vec<PartitionHandle>>,
    retention: Duration,
    retention_by_topic: HashMap<String, Duration>,
    retention_guard: HashMap<String, String>,
    metrics: LogMetrics,
    writers: Mutex<Vec<JoinHandle<()>>>,
    lock: Option<File>,
}

struct PartitionHandle {
    part: Arc<Partition>,
    /// `None` when opened read-only. Bounded by `slots`.
    tx: Option<mpsc::Sender<AppendRequest>>,
    /// [`APPEND_QUEUE`] permits; an append holds one until it is answered.
    /// (A semaphore rather than a bounded channel: the sender is async, the
    /// receiver a thread that needs `recv_timeout`.)
    slots: Arc<Semaphore>,
}

struct Partition {
    topic: String,
    id: u32,
    dir: PathBuf,
    state: Mutex<PartitionState>,
    commit_lock: Mutex<()>,
    /// Whether group offsets are fsynced (follows `LogOptions::fsync`).
    fsync: bool,
}

struct PartitionState {
    segments: BTreeMap<u64, Segment>,
    /// One past the last durable offset.
    end: u64,
    poisoned: Option<String>,
}

struct Segment {
    path: PathBuf,
    /// (offset, byte position) pairs, ascending; always starts at (base, HEADER_LEN).
    index: Vec<(u64, u64)>,
    /// Whether `index` covers the whole segment (active and scanned segments).
    indexed: bool,
}

struct AppendRequest {
    records: Vec<Record>,
    reply: oneshot::Sender<Result<u64, LogError>>,
    /// The queue slot; freed when the request is answered (dropped).
    _slot: OwnedSemaphorePermit,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LogError + '_ {
    move |source| LogError::Io { path: path.display().to_string(), source }
}

fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.seg"))
}

fn fsync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

impl EmbeddedLog {
    /// Open (creating when missing) the log under `root` for writing. Takes
    /// an exclusive lock on `root`, recovers each partition's tail, starts a
    /// writer thread per partition and applies retention once.
    pub fn open(root: &Path, options: LogOptions) -> Result<Self, LogError> {
        fs::create_dir_all(root).map_err(io_err(root))?;
        let lock_path = root.join("LOCK");
        let lock = OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(io_err(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(LogError::Locked(root.display().to_string())),
            Err(fs::TryLockError::Error(e)) => return Err(io_err(&lock_path)(e)),
        }
        let mut log = Self::open_inner(root, &options, true)?;
        log.lock = Some(lock);
        log.enforce_retention(SystemTime::now())?;
        Ok(log)
    }

    /// Open an existing log for reading only, beside a writer that may be
    /// running: no lock, no recovery, no writes. A torn tail is simply where
    /// reading stops; damage before the durable-through marker (invariant 7)
    /// does not stop the open, but a read that reaches it fails with
    /// [`LogError::Corrupt`].
    pub fn open_read_only(root: &Path) -> Result<Self, LogError> {
        let mut topics = Vec::new();
        let entries = fs::read_dir(root).map_err(io_err(root))?;
        for entry in entries {
            let entry = entry.map_err(io_err(root))?;
            let meta = entry.path().join("topic.meta");
            if meta.exists() {
                let partitions = read_topic_meta(&meta)?;
                topics.push((entry.file_name().to_string_lossy().into_owned(), partitions));
            }
        }
        let options = LogOptions { topics, ..LogOptions::default() };
        Self::open_inner(root, &options, false)
    }

    fn open_inner(root: &Path, options: &LogOptions, writable: bool) -> Result<Self, LogError> {
        let mut topics = HashMap::new();
        let mut writers = Vec::new();
        let mut pending = Vec::new();
        for (name, partitions) in &options.topics {
            validate_name(name).map_err(|_| LogError::Config(format!("invalid topic name {name:?}")))?;
            let tdir = root.join(name);
            let meta = tdir.join("topic.meta");
            if meta.exists() {
                let on_disk = read_topic_meta(&meta)?;
                if on_disk != *partitions {
                    return Err(LogError::Config(format!(
                        "topic {name:?} at {} has {on_disk} partitions, but {partitions} were asked for; \
                         the partition count cannot change once a topic exists (it decides where each messageId goes)",
                        tdir.display()
                    )));
                }
            } else if writable {
                fs::create_dir_all(&tdir).map_err(io_err(&tdir))?;
                write_atomically(&meta, format!("partitions={partitions}\n").as_bytes())?;
            } else {
                return Err(LogError::UnknownTopic(name.clone()));
            }
            let mut handles = Vec::new();
            for id in 0..*partitions {
                let dir = tdir.join(id.to_string());
                let (part, active) = Partition::open(name, id, dir, writable, options.fsync, &options.metrics)?;
                let part = Arc::new(part);
                let tx = match active {
                    Some(active) => {
                        let (tx, rx) = mpsc::channel(); // bounded by the handle's `slots`
                        let writer = Writer {
                            part: part.clone(),
                            file: active.file,
                            path: active.path,
                            base: active.base,
                            len: active.len,
                            segment_bytes: options.segment_bytes,
                            fsync: options.fsync,
                            metrics: options.metrics.clone(),
                            marked: active.marked,
                            marked_at: Instant::now(),
                            unmarked: false,
                            marker_errors: ErrorStreak::new(MARKER_ERROR_LOG_INTERVAL),
                        };
                        pending.push((format!("log-{name}-{id}"), writer, rx));
                        Some(tx)
                    }
                    None => None,
                };
                handles.push(PartitionHandle { part, tx, slots: Arc::new(Semaphore::new(APPEND_QUEUE)) });
            }
            topics.insert(name.clone(), handles);
        }
        // Writer threads start once every partition opened, so a partition
        // that refuses to open leaves no thread behind.
        for (thread_name, writer, rx) in pending {
            let handle = std::thread::Builder::new().name(thread_name).spawn(move || writer.run(rx)).map_err(io_err(root))?;
            writers.push(handle);
        }
        Ok(Self {
            topics,
            retention: options.retention,
            retention_by_topic: options.retention_by_topic.clone(),
            retention_guard: options.retention_guard.clone(),
            metrics: options.metrics.clone(),
            writers: Mutex::new(writers),
            lock: None,
        })
    }

    /// Topic names, sorted.
    pub fn topics(&self) -> Vec<String> {
        let mut t: Vec<_> = self.topics.keys().cloned().collect();
        t.sort();
        t
    }

    fn handle(&self, topic: &str, partition: u32) -> Result<&PartitionHandle, LogError> {
        let parts = self.topics.get(topic).ok_or_else(|| LogError::UnknownTopic(topic.to_owned()))?;
        parts.get(partition as usize).ok_or_else(|| LogError::UnknownPartition { topic: topic.to_owned(), partition, partitions: parts.len() as u32 })
    }

    /// Delete sealed segments last written before `now - retention`. Returns
    /// how many were deleted. Runs at open and from [`Self::spawn_retention`].
    pub fn enforce_retention(&self, now: SystemTime) -> Result<usize, LogError> {
        if self.lock.is_none() {
            return Err(LogError::ReadOnly);
        }
        let mut deleted = 0;
        for (topic, parts) in &self.topics {
            let retention = self.retention_by_topic.get(topic).copied().unwrap_or(self.retention);
            let guard = self.retention_guard.get(topic);
            for h in parts {
                // A guarding group that never committed has read nothing: keep everything.
                let keep_from = guard.map(|g| h.part.committed(g)).transpose()?.map(|c| c.unwrap_or(0));
                deleted += h.part.enforce_retention(now, retention, keep_from)?;
            }
        }
        self.metrics.deleted_segments.inc_by(deleted as u64);
        Ok(deleted)
    }

    /// Run [`Self::enforce_retention`] every `every` on the blocking pool.
    pub fn spawn_retention(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let log = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(log) = log.upgrade() else { return };
                match tokio::task::spawn_blocking(move || log.enforce_retention(SystemTime::now())).await {
                    Ok(Ok(0)) => {}
                    Ok(Ok(n)) => tracing::info!(segments = n, "retention deleted old log segments"),
                    Ok(Err(e)) => tracing::error!(error = %e, "log retention failed"),
                    Err(e) => tracing::error!(error = %e, "log retention task panicked"),
                }
            }
        })
    }

    /// Blocking read; the async trait method runs it on the blocking pool.
    pub fn read_blocking(&self, topic: &str, partition: u32, from: u64, max: usize) -> Result<Vec<StoredRecord>, LogError> {
        self.handle(topic, partition)?.part.read(from, max)
    }

    pub fn offsets_blocking(&self, topic: &str, partition: u32) -> Result<OffsetRange, LogError> {
        Ok(self.handle(topic, partition)?.part.offsets())
    }

    /// Stop the writer threads after they finish what is queued.
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        for parts in self.topics.values_mut() {
            for h in parts.iter_mut() {
                h.tx.take();
            }
        }
        for w in self.writers.lock().expect("writers").drain(..) {
            let _ = w.join();
        }
    }
}

impl Drop for EmbeddedLog {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[async_trait]
impl Log for EmbeddedLog {
    fn partitions(&self, topic: &str) -> Result<u32, LogError> {
        self.topics.get(topic).map(|p| p.len() as u32).ok_or_else(|| LogError::UnknownTopic(topic.to_owned()))
    }

    async fn append(&self, topic: &str, partition: u32, records: Vec<Record>) -> Result<u64, LogError> {
        let h = self.handle(topic, partition)?;
        if let Some(r) = records.iter().find(|r| r.key.len() + r.value.len() > MAX_RECORD_BYTES) {
            return Err(LogError::RecordTooLarge(r.key.len() + r.value.len()));
        }
        let tx = h.tx.as_ref().ok_or(LogError::ReadOnly)?;
        let slot = h.slots.clone().acquire_owned().await.map_err(|_| LogError::Closed)?;
        let (reply, rx) = oneshot::channel();
        tx.send(AppendRequest { records, reply, _slot: slot }).map_err(|_| LogError::Closed)?;
        rx.await.map_err(|_| LogError::Closed)?
    }

    async fn read(&self, topic: &str, partition: u32, from: u64, max: usize) -> Result<Vec<StoredRecord>, LogError> {
        let part = self.handle(topic, partition)?.part.clone();
        tokio::task::spawn_blocking(move || part.read(from, max)).await.map_err(|_| LogError::Closed)?
    }

    async fn offsets(&self, topic: &str, partition: u32) -> Result<OffsetRange, LogError> {
        Ok(self.handle(topic, partition)?.part.offsets())
    }

    async fn commit(&self, at: Checkpoint<'_>) -> Result<(), LogError> {
        validate_name(at.group)?;
        let h = self.handle(at.topic, at.partition)?;
        if h.tx.is_none() {
            return Err(LogError::ReadOnly);
        }
        let part = h.part.clone();
        let (group, next_offset) = (at.group.to_owned(), at.next_offset);
        tokio::task::spawn_blocking(move || part.commit(&group, next_offset)).await.map_err(|_| LogError::Closed)?
    }

    async fn committed(&self, group: &str, topic: &str, partition: u32) -> Result<Option<u64>, LogError> {
        validate_name(group)?;
        let part = self.handle(topic, partition)?.part.clone();
        let group = group.to_owned();
        tokio::task::spawn_blocking(move || part.committed(&group)).await.map_err(|_| LogError::Closed)?
    }
}

fn validate_name(name: &str) -> Result<(), LogError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(LogError::InvalidGroup(name.to_owned()))
    }
}

fn read_topic_meta(path: &Path) -> Result<u32, LogError> {
    let text = fs::read_to_string(path).map_err(io_err(path))?;
    text.trim().strip_prefix("partitions=").and_then(|n| n.parse().ok()).ok_or_else(|| LogError::Corrupt {
        path: path.display().to_string(),
        position: 0,
        problem: format!("unreadable topic metadata {text:?}"),
    })
}

fn write_atomically(path: &Path, contents: &[u8]) -> Result<(), LogError> {
    write_file(path, contents, true)
}

/// Replace `path` by write-to-temporary + rename; with `sync`, fsync the
/// file before and the directory after the rename.
fn write_file(path: &Path, contents: &[u8], sync: bool) -> Result<(), LogError> {
    let dir = path.parent().expect("a file in a directory");
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(contents).and_then(|_| if sync { f.sync_all() } else { Ok(()) }).map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))?;
    if sync {
        fsync_dir(dir)?;
    }
    Ok(())
}

/// What reading one frame found.
enum Frame {
    Record(StoredRecord, u64),
    End,
    Bad(String),
}

/// Read `buf.len()` bytes unless EOF comes first; returns how many were read.
fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn read_frame(r: &mut impl Read, expected_offset: u64) -> io::Result<Frame> {
    let mut prefix = [0u8; FRAME_PREFIX];
    match read_up_to(r, &mut prefix)? {
        0 => return Ok(Frame::End),
        n if n < FRAME_PREFIX => return Ok(Frame::Bad(format!("incomplete frame header ({n} bytes)"))),
        _ => {}
    }
    let len = u32::from_le_bytes(prefix[0..4].try_into().unwrap()) as usize;
    let crc = u32::from_le_bytes(prefix[4..8].try_into().unwrap());
    if !(BODY_FIXED..=BODY_FIXED + MAX_RECORD_BYTES).contains(&len) {
        return Ok(Frame::Bad(format!("implausible frame length {len}")));
    }
    let mut body = vec![0u8; len];
    let got = read_up_to(r, &mut body)?;
    if got < len {
        return Ok(Frame::Bad(format!("incomplete record: {got} of {len} bytes")));
    }
    if crc32c::crc32c(&body) != crc {
        return Ok(Frame::Bad("checksum mismatch".into()));
    }
    let offset = u64::from_le_bytes(body[0..8].try_into().unwrap());
    let timestamp_ms = i64::from_le_bytes(body[8..16].try_into().unwrap());
    let key_len = u32::from_le_bytes(body[16..20].try_into().unwrap()) as usize;
    if key_len > len - BODY_FIXED {
        return Ok(Frame::Bad(format!("key length {key_len} exceeds the record")));
    }
    if offset != expected_offset {
        return Ok(Frame::Bad(format!("offset {offset} where {expected_offset} was expected")));
    }
    let body = Bytes::from(body);
    let key = body.slice(BODY_FIXED..BODY_FIXED + key_len);
    let value = body.slice(BODY_FIXED + key_len..);
    Ok(Frame::Record(StoredRecord { offset, timestamp_ms, key, value }, (FRAME_PREFIX + len) as u64))
}

fn encode_frame(buf: &mut Vec<u8>, offset: u64, timestamp_ms: i64, rec: &Record) {
    let body_len = BODY_FIXED + rec.key.len() + rec.value.len();
    let start = buf.len();
    buf.extend_from_slice(&(body_len as u32).to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&offset.to_le_bytes());
    buf.extend_from_slice(&timestamp_ms.to_le_bytes());
    buf.extend_from_slice(&(rec.key.len() as u32).to_le_bytes());
    buf.extend_from_slice(&rec.key);
    buf.extend_from_slice(&rec.value);
    let crc = crc32c::crc32c(&buf[start + FRAME_PREFIX..]);
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn segment_header(base: u64) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..].copy_from_slice(&base.to_le_bytes());
    h
}

/// A durable-through marker (invariant 7): the frames of the segment with
/// base `base` before offset `end`, i.e. its first `position` bytes, were
/// fsynced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DurableMark {
    base: u64,
    end: u64,
    position: u64,
}

impl DurableMark {
    fn encode(&self) -> String {
        let body = format!("segment={} end={} position={}", self.base, self.end, self.position);
        let crc = crc32c::crc32c(body.as_bytes());
        format!("{body} crc32c={crc:08x}\n")
    }

    fn decode(text: &str) -> Result<Self, String> {
        let line = text.strip_suffix('\n').ok_or("no end of line (a torn write?)")?;
        let (body, crc) = line.rsplit_once(" crc32c=").ok_or("no checksum")?;
        let crc = u32::from_str_radix(crc, 16).map_err(|_| format!("unreadable checksum {crc:?}"))?;
        if crc32c::crc32c(body.as_bytes()) != crc {
            return Err("checksum mismatch".into());
        }
        let mut fields = body.split(' ');
        let mut field = |name: &str| -> Result<u64, String> {
            fields
                .next()
                .and_then(|f| f.strip_prefix(name))
                .and_then(|f| f.strip_prefix('='))
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("no {name}"))
        };
        let mark = DurableMark { base: field("segment")?, end: field("end")?, position: field("position")? };
        if fields.next().is_some() {
            return Err("unexpected fields".into());
        }
        // Records take bytes: a marker with records needs a position past
        // the header, and one without sits right at it.
        let consistent = mark.end >= mark.base
            && if mark.end == mark.base {
                mark.position == HEADER_LEN
            } else {
                mark.position >= (mark.end - mark.base).saturating_mul((FRAME_PREFIX + BODY_FIXED) as u64).saturating_add(HEADER_LEN)
            };
        if !consistent {
            return Err(format!("inconsistent values {body:?}"));
        }
        Ok(mark)
    }
}

/// Longest marker file read; a marker line is about 110 bytes, so a longer
/// file is corrupt (and a huge or endless one is never read whole).
const MARKER_MAX_BYTES: u64 = 512;

/// Read a partition's marker. A missing one is `None`; one that does not
/// parse is reported and taken for missing (it must never keep a log from
/// opening, invariant 7). So is anything named `durable` that is not a
/// regular file (a symlink, a FIFO, a device, a directory): it is never
/// opened through a symlink, never read past [`MARKER_MAX_BYTES`], and only
/// a regular file with one link has its contents shown in the warning.
fn read_marker(dir: &Path) -> Result<Option<DurableMark>, LogError> {
    let path = dir.join(MARKER_FILE);
    let ignored = |problem: &str, shown: Option<String>| {
        tracing::warn!(
            marker = %path.display(),
            problem = %problem,
            contents = ?shown.unwrap_or_else(|| "(not shown)".into()),
            "unreadable durable-through marker ignored: the active segment's recovery falls back to cutting \
             at the first bad frame (opening for writing rewrites the marker)"
        );
        Ok(None)
    };
    let meta = match fs::symlink_metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&path)(e)),
    };
    if !meta.file_type().is_file() {
        return ignored(&format!("not a regular file ({})", file_kind(&meta.file_type())), None);
    }
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&path)(e)),
    };
    // The file opened must be the one inspected (not swapped since for a
    // symlink or a FIFO).
    let opened = file.metadata().map_err(io_err(&path))?;
    {
        use std::os::unix::fs::MetadataExt;
        if !opened.is_file() || (opened.dev(), opened.ino()) != (meta.dev(), meta.ino()) {
            return ignored("replaced while being opened", None);
        }
    }
    let mut bytes = Vec::new();
    file.take(MARKER_MAX_BYTES + 1).read_to_end(&mut bytes).map_err(io_err(&path))?;
    // A marker is only ever written by rename, so it has one link; a hard
    // link to some other file is not shown.
    let shown = {
        use std::os::unix::fs::MetadataExt;
        (opened.nlink() == 1).then(|| String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned())
    };
    if bytes.len() as u64 > MARKER_MAX_BYTES {
        return ignored(&format!("longer than {MARKER_MAX_BYTES} bytes"), shown);
    }
    match std::str::from_utf8(&bytes).map_err(|_| "not UTF-8".to_string()).and_then(DurableMark::decode) {
        Ok(mark) => Ok(Some(mark)),
        Err(problem) => ignored(&problem, shown),
    }
}

fn file_kind(t: &fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_symlink() {
        "a symbolic link"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_block_device() || t.is_char_device() {
        "a device"
    } else {
        "not a regular file"
    }
}

fn write_marker(dir: &Path, mark: &DurableMark) -> Result<(), LogError> {
    write_atomically(&dir.join(MARKER_FILE), mark.encode().as_bytes())
}

/// Result of scanning a segment from its header.
struct Scan {
    index: Vec<(u64, u64)>,
    /// One past the last valid offset.
    end: u64,
    /// Byte length of the valid prefix.
    valid_len: u64,
    /// Why the scan stopped before the end of the file, if it did.
    bad: Option<String>,
}

/// Scan a whole segment, verifying every frame.
fn scan_segment(path: &Path, base: u64) -> Result<Scan, LogError> {
    let file = File::open(path).map_err(io_err(path))?;
    let mut r = BufReader::with_capacity(256 * 1024, file);
    let mut header = [0u8; HEADER_LEN as usize];
    let n = read_up_to(&mut r, &mut header).map_err(io_err(path))?;
    let mut scan = Scan { index: vec![(base, HEADER_LEN)], end: base, valid_len: HEADER_LEN, bad: None };
    if n < HEADER_LEN as usize || header != segment_header(base) {
        scan.valid_len = 0;
        scan.bad = Some("missing or invalid segment header".into());
        return Ok(scan);
    }
    let mut last_indexed = HEADER_LEN;
    loop {
        match read_frame(&mut r, scan.end).map_err(io_err(path))? {
            Frame::Record(_, len) => {
                if scan.valid_len - last_indexed >= INDEX_INTERVAL {
                    scan.index.push((scan.end, scan.valid_len));
                    last_indexed = scan.valid_len;
                }
                scan.end += 1;
                scan.valid_len += len;
            }
            Frame::End => return Ok(scan),
            Frame::Bad(problem) => {
                scan.bad = Some(problem);
                return Ok(scan);
            }
        }
    }
}

/// Best-effort count of the frames in a cut tail, by their length fields.
fn count_frames(path: &Path, from: u64, file_len: u64) -> u64 {
    let Ok(mut f) = File::open(path) else { return 0 };
    let mut pos = from;
    let mut count = 0;
    while pos < file_len {
        count += 1;
        let mut prefix = [0u8; 4];
        if f.seek(SeekFrom::Start(pos)).is_err() || f.read_exact(&mut prefix).is_err() {
            break;
        }
        let len = u32::from_le_bytes(prefix) as u64;
        if len < BODY_FIXED as u64 || len > (BODY_FIXED + MAX_RECORD_BYTES) as u64 {
            break;
        }
        pos += FRAME_PREFIX as u64 + len;
    }
    count
}

/// The active segment, recovered and opened for appending.
struct ActiveSegment {
    file: File,
    path: PathBuf,
    base: u64,
    /// Durable length.
    len: u64,
    /// The partition's marker as it is on disk.
    marked: Option<DurableMark>,
}

impl Partition {
    /// Load a partition directory. When `writable`, recover the active
    /// segment's tail and return it opened for appending.
    fn open(
        topic: &str,
        id: u32,
        dir: PathBuf,
        writable: bool,
        fsync: bool,
        metrics: &LogMetrics,
    ) -> Result<(Self, Option<ActiveSegment>), LogError> {
        if writable {
            fs::create_dir_all(dir.join("groups")).map_err(io_err(&dir))?;
        }
        // The marker first, then the segments: beside a running writer (a
        // read-only view), a marker can only name a segment that is listed
        // and a prefix that the scan below will see (invariant 7).
        let marked = read_marker(&dir)?;
        let marker_path = dir.join(MARKER_FILE);
        let mut bases = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let name = entry.map_err(io_err(&dir))?.file_name();
            let name = name.to_string_lossy();
            if let Some(base) = name.strip_suffix(".seg").and_then(|b| b.parse::<u64>().ok()) {
                bases.push(base);
            }
        }
        bases.sort_unstable();
        let newest = bases.last().copied();
        if let Some(m) = marked.filter(|m| newest.is_none_or(|n| m.base > n)) {
            let path = segment_path(&dir, m.base);
            if m.end > m.base {
                return Err(LogError::Corrupt {
                    path: path.display().to_string(),
                    position: m.position,
                    problem: format!(
                        "the segment file is missing, but {} says offsets {}..={} were fsynced into it; \
                         refusing to open (those acknowledged records would be lost and their offsets reused)",
                        marker_path.display(),
                        m.base,
                        m.end - 1
                    ),
                });
            }
            tracing::warn!(
                segment = %path.display(),
                marker = %marker_path.display(),
                "the segment the durable-through marker names is missing; it held no records, so nothing is lost"
            );
        }
        if bases.is_empty() {
            if !writable {
                return Err(LogError::Config(format!("no segments in {}", dir.display())));
            }
            let path = segment_path(&dir, 0);
            create_segment(&path, 0)?;
            fsync_dir(&dir)?;
            bases.push(0);
        }
        let mut segments = BTreeMap::new();
        for &base in &bases {
            let path = segment_path(&dir, base);
            segments.insert(base, Segment { path, index: vec![(base, HEADER_LEN)], indexed: false });
        }
        let last = *bases.last().expect("at least one segment");
        let last_path = segment_path(&dir, last);
        let scan = scan_segment(&last_path, last)?;
        let file_len = fs::metadata(&last_path).map_err(io_err(&last_path))?.len();
        if scan.valid_len == 0 && file_len > HEADER_LEN {
            // The header is written and fsynced before any record, so a bad
            // header in front of records is corruption, not a torn write.
            return Err(LogError::Corrupt {
                path: last_path.display().to_string(),
                position: 0,
                problem: "invalid segment header in front of records; refusing to truncate them".into(),
            });
        }
        // How far the active segment is known to be durable (invariant 7).
        let durable = marked.filter(|m| m.base == last).unwrap_or(DurableMark { base: last, end: last, position: HEADER_LEN });
        let mut end = scan.end;
        if scan.end < durable.end {
            // Damage before the durable position: acknowledged records.
            let what = match &scan.bad {
                Some(problem) => format!("the frame of offset {} is bad ({problem})", scan.end),
                None => format!("the segment ends (file length {file_len}) before the frame of offset {}", scan.end),
            };
            let problem = format!(
                "{what}, but offsets {}..={} of this segment (its first {} bytes) were fsynced and acknowledged \
                 (marker {}): this is damage to durable records, not a torn tail",
                durable.base,
                durable.end - 1,
                durable.position,
                marker_path.display()
            );
            let position = scan.valid_len.max(HEADER_LEN);
            if writable {
                tracing::error!(segment = %last_path.display(), position, offset = scan.end, %problem, "log partition refused");
                return Err(LogError::Corrupt {
                    path: last_path.display().to_string(),
                    position,
                    problem: format!(
                        "{problem}. Refusing to open; the file is left as it is. Read what precedes the damage \
                         read-only and keep a copy of the segment; to accept losing offsets {} and later, delete \
                         {} and open again (the segment is then cut at the bad frame)",
                        scan.end,
                        marker_path.display()
                    ),
                });
            }
            // A read-only view opens, but claims the durable records, so a
            // read that reaches the damage fails as `Corrupt` instead of
            // ending quietly before it.
            tracing::error!(segment = %last_path.display(), position, offset = scan.end, %problem, "damaged log segment");
            end = durable.end;
        }
        let mut active = None;
        if writable {
            if let Some(problem) = &scan.bad {
                let cut_bytes = file_len - scan.valid_len;
                let cut_records = if scan.valid_len == 0 { 0 } else { count_frames(&last_path, scan.valid_len, file_len) };
                tracing::warn!(
                    segment = %last_path.display(),
                    problem = %problem,
                    cut_bytes,
                    cut_records,
                    kept_through_offset = scan.end as i64 - 1,
                    durable_through_offset = durable.end as i64 - 1,
                    "torn log tail truncated past the durable-through marker (never acknowledged while log.fsync is on)"
                );
                metrics.truncated_records.inc_by(cut_records);
            }
            let mut file = OpenOptions::new().read(true).append(true).open(&last_path).map_err(io_err(&last_path))?;
            if scan.valid_len == 0 {
                // A crash between creating the file and writing its header.
                file.set_len(0).map_err(io_err(&last_path))?;
                file.write_all(&segment_header(last)).map_err(io_err(&last_path))?;
            } else if scan.valid_len < file_len {
                file.set_len(scan.valid_len).map_err(io_err(&last_path))?;
            }
            file.sync_all().map_err(io_err(&last_path))?;
            let len = scan.valid_len.max(HEADER_LEN);
            // What is kept is now fsynced: mark it (invariant 7).
            let mut on_disk = marked;
            let mark = DurableMark { base: last, end: scan.end, position: len };
            if fsync && marked != Some(mark) {
                write_marker(&dir, &mark)?;
                on_disk = Some(mark);
            }
            active = Some(ActiveSegment { file, path: last_path.clone(), base: last, len, marked: on_disk });
        }
        let seg = segments.get_mut(&last).expect("last segment");
        seg.index = scan.index;
        seg.indexed = true;
        let part = Partition {
            topic: topic.to_owned(),
            id,
            dir,
            state: Mutex::new(PartitionState { segments, end, poisoned: None }),
            commit_lock: Mutex::new(()),
            fsync,
        };
        Ok((part, active))
    }

    fn offsets(&self) -> OffsetRange {
        let st = self.state.lock().expect("partition state");
        OffsetRange { start: *st.segments.keys().next().expect("a segment"), end: st.end }
    }

    fn read(&self, mut from: u64, max: usize) -> Result<Vec<StoredRecord>, LogError> {
        let mut out = Vec::new();
        while out.len() < max {
            // Find where to start, under the lock; read the file outside it.
            let (path, base, pos, stop, needs_index, active) = {
                let st = self.state.lock().expect("partition state");
                let start = *st.segments.keys().next().expect("a segment");
                if from < start {
                    if out.is_empty() {
                        return Err(LogError::OffsetOutOfRange { topic: self.topic.clone(), partition: self.id, requested: from, start });
                    }
                    return Ok(out);
                }
                if from >= st.end {
                    return Ok(out);
                }
                let (&base, seg) = st.segments.range(..=from).next_back().expect("from >= start");
                let next_base = st.segments.range(base + 1..).next().map(|(b, _)| *b).unwrap_or(u64::MAX);
                let i = seg.index.partition_point(|&(o, _)| o <= from) - 1;
                let (off, pos) = seg.index[i];
                (seg.path.clone(), base, (off, pos), st.end.min(next_base), !seg.indexed, next_base == u64::MAX)
            };
            if needs_index {
                let scan = match scan_segment(&path, base) {
                    Err(LogError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                        self.forget_vanished(base, &path)?;
                        continue;
                    }
                    r => r?,
                };
                if let Some(problem) = scan.bad.filter(|_| scan.end < stop) {
                    return Err(LogError::Corrupt { path: path.display().to_string(), position: scan.valid_len, problem });
                }
                let mut st = self.state.lock().expect("partition state");
                if let Some(seg) = st.segments.get_mut(&base) {
                    seg.index = scan.index;
                    seg.indexed = true;
                }
                continue;
            }
            let (reached, position, bad) = match read_range(&path, pos, from, stop, max - out.len(), &mut out) {
                Err(LogError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                    self.forget_vanished(base, &path)?;
                    continue;
                }
                r => r?,
            };
            if reached < stop && out.len() < max {
                // Damage (or the end of the file) in the active segment,
                // before the partition's end: return the good records read
                // before it; the next read, which starts at the damage,
                // reports it. (Damage in a sealed segment still fails the
                // whole read, as before.)
                if active && !out.is_empty() {
                    return Ok(out);
                }
                return Err(LogError::Corrupt {
                    path: path.display().to_string(),
                    position,
                    problem: match bad {
                        Some(problem) => format!("the frame of offset {reached} is bad ({problem})"),
                        None => format!("segment ends at offset {reached}, before {stop}"),
                    },
                });
            }
            from = reached;
        }
        Ok(out)
    }

    /// A segment file was not found. Retention (ours, or the writer's when
    /// this is a read-only view) deletes only the oldest segment: forget it
    /// so the read turns into `OffsetOutOfRange`. Anything else missing is an
    /// error, never a reason to loop.
    fn forget_vanished(&self, base: u64, path: &Path) -> Result<(), LogError> {
        let mut st = self.state.lock().expect("partition state");
        if !st.segments.contains_key(&base) {
            return Ok(()); // our own retention removed it meanwhile
        }
        if st.segments.len() > 1 && st.segments.keys().next() == Some(&base) {
            st.segments.remove(&base);
            return Ok(());
        }
        Err(LogError::Corrupt { path: path.display().to_string(), position: 0, problem: "segment file is missing".into() })
    }

    /// `keep_from`: never delete a segment holding offsets at or after it
    /// (a consumer group that must not lose unread records).
    fn enforce_retention(&self, now: SystemTime, retention: Duration, keep_from: Option<u64>) -> Result<usize, LogError> {
        // Take the expired segments out of the map under the lock; delete
        // the files and fsync the directory outside it, so appends and reads
        // never wait on that I/O. A reader still holding a removed path gets
        // NotFound and re-checks the map (`forget_vanished`).
        let doomed: Vec<PathBuf> = {
            let mut st = self.state.lock().expect("partition state");
            let mut doomed = Vec::new();
            while st.segments.len() > 1 {
                let mut bases = st.segments.keys();
                let (base, next_base) = (*bases.next().expect("len > 1"), *bases.next().expect("len > 1"));
                if keep_from.is_some_and(|k| next_base > k) {
                    break;
                }
                let path = &st.segments[&base].path;
                let modified = fs::metadata(path).and_then(|m| m.modified()).map_err(io_err(path))?;
                if now.duration_since(modified).unwrap_or_default() <= retention {
                    break;
                }
                doomed.push(st.segments.remove(&base).expect("present").path);
            }
            doomed
        };
        for path in &doomed {
            fs::remove_file(path).map_err(io_err(path))?;
            tracing::info!(segment = %path.display(), "retention deleted segment");
        }
        if !doomed.is_empty() {
            fsync_dir(&self.dir)?;
        }
        Ok(doomed.len())
    }

    fn commit(&self, group: &str, next_offset: u64) -> Result<(), LogError> {
        let _guard = self.commit_lock.lock().expect("commit lock");
        let path = self.dir.join("groups").join(format!("{group}.offset"));
        // An offset must never be more durable than the records it covers:
        // without fsync of the data, don't fsync the offset either.
        write_file(&path, format!("{next_offset}\n").as_bytes(), self.fsync)
    }

    fn committed(&self, group: &str) -> Result<Option<u64>, LogError> {
        let path = self.dir.join("groups").join(format!("{group}.offset"));
        match fs::read_to_string(&path) {
            Ok(text) => text.trim().parse().map(Some).map_err(|_| LogError::Corrupt {
                path: path.display().to_string(),
                position: 0,
                problem: format!("unreadable group offset {text:?}"),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
    }
}

/// Append the records of one segment with offsets in `from..stop` to `out`,
/// at most `max`, starting the scan at the index entry `(offset, pos)`.
/// Returns the offset after the last frame read, the byte position after
/// it, and, if a bad frame stopped the scan there, what is wrong with it
/// (the records before it are in `out`).
fn read_range(
    path: &Path,
    (mut offset, mut pos): (u64, u64),
    from: u64,
    stop: u64,
    max: usize,
    out: &mut Vec<StoredRecord>,
) -> Result<(u64, u64, Option<String>), LogError> {
    let mut file = File::open(path).map_err(io_err(path))?;
    file.seek(SeekFrom::Start(pos)).map_err(io_err(path))?;
    let mut r = BufReader::with_capacity(256 * 1024, file);
    let mut taken = 0;
    while offset < stop && taken < max {
        match read_frame(&mut r, offset).map_err(io_err(path))? {
            Frame::Record(rec, len) => {
                if rec.offset >= from {
                    out.push(rec);
                    taken += 1;
                }
                offset += 1;
                pos += len;
            }
            Frame::End => break,
            Frame::Bad(problem) => return Ok((offset, pos, Some(problem))),
        }
    }
    Ok((offset, pos, None))
}

fn create_segment(path: &Path, base: u64) -> Result<File, LogError> {
    let mut f = OpenOptions::new().create_new(true).read(true).append(true).open(path).map_err(io_err(path))?;
    f.write_all(&segment_header(base)).and_then(|_| f.sync_all()).map_err(io_err(path))?;
    Ok(f)
}

/// The one thread that writes a partition (invariant 2).
struct Writer {
    part: Arc<Partition>,
    file: File,
    path: PathBuf,
    /// Base offset of the active segment.
    base: u64,
    /// Durable length of the active segment.
    len: u64,
    segment_bytes: u64,
    fsync: bool,
    metrics: LogMetrics,
    /// The durable-through marker last written (or found at open).
    marked: Option<DurableMark>,
    /// When it was last written or tried (or the writer started).
    marked_at: Instant,
    /// Whether this writer fsynced more than `marked` says (only with fsync on).
    unmarked: bool,
    /// Failed marker writes, for rate-limited logging.
    marker_errors: ErrorStreak,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<AppendRequest>) {
        let mut buf = Vec::with_capacity(1 << 20);
        loop {
            // While something fsynced is not marked yet, wait for appends
            // only until the marker is due, so the marker catches up within
            // an interval even when appends stop.
            let first = if self.unmarked {
                match rx.recv_timeout(MARKER_INTERVAL.saturating_sub(self.marked_at.elapsed())) {
                    Ok(req) => req,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        self.mark_durable(true);
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match rx.recv() {
                    Ok(req) => req,
                    Err(_) => break,
                }
            };
            let mut n = first.records.len();
            let mut batch = vec![first];
            while n < MAX_GROUP_RECORDS {
                match rx.try_recv() {
                    Ok(req) => {
                        n += req.records.len();
                        batch.push(req);
                    }
                    Err(_) => break,
                }
            }
            match self.commit(&batch, &mut buf) {
                Ok(firsts) => {
                    for (req, first) in batch.into_iter().zip(firsts) {
                        let _ = req.reply.send(Ok(first));
                    }
                    // After the replies, so no append waits on it.
                    self.mark_durable(false);
                }
                Err(e) => {
                    // Only a poisoned partition (a failed cut-back or roll,
                    // see `commit`) refuses writes until a restart. A failed
                    // write or fsync that was cut back cleanly fails just
                    // this group: the next one is tried again (so writes
                    // resume by themselves once space is freed), and the
                    // callers get the I/O error itself.
                    let poisoned = self.part.state.lock().expect("partition state").poisoned.is_some();
                    let cause = e.to_string();
                    for req in batch {
                        let err = match &e {
                            _ if poisoned => LogError::Poisoned { topic: self.part.topic.clone(), partition: self.part.id, cause: cause.clone() },
                            LogError::Io { path, source } => {
                                LogError::Io { path: path.clone(), source: io::Error::new(source.kind(), source.to_string()) }
                            }
                            _ => LogError::Unavailable(cause.clone()),
                        };
                        let _ = req.reply.send(Err(err));
                    }
                }
            }
        }
        // The queue is closed (the log is shutting down): mark everything.
        self.mark_durable(true);
    }

    /// Write the durable-through marker for what this writer has fsynced,
    /// if it moved and (unless `now`) the last write is [`MARKER_INTERVAL`]
    /// old (invariant 7). Only with fsync on: without it nothing is known
    /// durable. A failure is logged and retried next interval; the marker
    /// then lags, which is safe.
    fn mark_durable(&mut self, now: bool) {
        if !self.unmarked || (!now && self.marked_at.elapsed() < MARKER_INTERVAL) {
            return;
        }
        self.unmarked = false;
        self.marked_at = Instant::now();
        let (end, poisoned) = {
            let st = self.part.state.lock().expect("partition state");
            (st.end, st.poisoned.is_some())
        };
        if poisoned {
            return;
        }
        let mark = DurableMark { base: self.base, end, position: self.len };
        if self.marked == Some(mark) {
            return;
        }
        match write_marker(&self.part.dir, &mark) {
            Ok(()) => {
                self.marked = Some(mark);
                if let Some(r) = self.marker_errors.success(Instant::now()) {
                    tracing::info!(
                        topic = %self.part.topic,
                        partition = self.part.id,
                        failures = r.failures,
                        failing_for = ?r.failing_for,
                        "the log's durable-through marker is written again"
                    );
                }
            }
            Err(e) => {
                self.unmarked = true;
                match self.marker_errors.failure(Instant::now()) {
                    Report::First => tracing::warn!(
                        topic = %self.part.topic,
                        partition = self.part.id,
                        error = %e,
                        "could not update the log's durable-through marker (it lags; retried every \
                         {MARKER_INTERVAL:?}, further failures summarized every {MARKER_ERROR_LOG_INTERVAL:?})"
                    ),
                    Report::Summary { failures, failing_for } => tracing::warn!(
                        topic = %self.part.topic,
                        partition = self.part.id,
                        error = %e,
                        failures,
                        failing_for = ?failing_for,
                        "still could not update the log's durable-through marker (it lags)"
                    ),
                    Report::Quiet => {}
                }
            }
        }
    }

    /// Write and fsync one group; returns each request's first offset.
    fn commit(&mut self, batch: &[AppendRequest], buf: &mut Vec<u8>) -> Result<Vec<u64>, LogError> {
        let (mut next, poisoned) = {
            let st = self.part.state.lock().expect("partition state");
            (st.end, st.poisoned.clone())
        };
        if let Some(cause) = poisoned {
            return Err(LogError::Config(cause));
        }
        if self.len >= self.segment_bytes {
            self.roll(next).map_err(|e| self.poison(e))?;
        }
        let started = Instant::now();
        let ts = sluice_core::clock::now_ms();
        buf.clear();
        let mut firsts = Vec::with_capacity(batch.len());
        let mut new_index = Vec::new();
        let mut last_indexed = {
            let st = self.part.state.lock().expect("partition state");
            st.segments.values().next_back().and_then(|s| s.index.last()).map(|e| e.1).unwrap_or(HEADER_LEN)
        };
        for req in batch {
            firsts.push(next);
            for rec in &req.records {
                let pos = self.len + buf.len() as u64;
                if pos - last_indexed >= INDEX_INTERVAL {
                    new_index.push((next, pos));
                    last_indexed = pos;
                }
                encode_frame(buf, next, ts, rec);
                next += 1;
            }
        }
        let path = self.path.clone();
        let written = self.file.write_all(buf).and_then(|_| if self.fsync { self.file.sync_data() } else { Ok(()) });
        if let Err(e) = written {
            // Cut the partial write so the file stays a valid prefix (what
            // is kept was fsynced by earlier groups; the failed group's
            // pages go with the cut), and fail only this group: the next
            // one is tried again. If even the cut fails, refuse further
            // writes until a restart recovers.
            let cut = self.file.set_len(self.len).and_then(|_| self.file.sync_data());
            let err = io_err(&path)(e);
            if let Err(cut_err) = cut {
                return Err(self.poison(io_err(&path)(cut_err)));
            }
            return Err(err);
        }
        self.len += buf.len() as u64;
        self.unmarked = self.fsync;
        {
            let mut st = self.part.state.lock().expect("partition state");
            st.end = next;
            if let Some(seg) = st.segments.values_mut().next_back() {
                seg.index.extend(new_index);
            }
        }
        self.metrics.appended_records.inc_by(next - firsts[0]);
        self.metrics.appended_bytes.inc_by(buf.len() as u64);
        self.metrics.group_commits.inc();
        self.metrics.commit_seconds.observe(started.elapsed().as_secs_f64());
        Ok(firsts)
    }

    fn roll(&mut self, base: u64) -> Result<(), LogError> {
        let path = segment_path(&self.part.dir, base);
        let file = create_segment(&path, base)?;
        fsync_dir(&self.part.dir)?;
        self.file = file;
        self.path = path.clone();
        self.base = base;
        self.len = HEADER_LEN;
        {
            let mut st = self.part.state.lock().expect("partition state");
            st.segments.insert(base, Segment { path, index: vec![(base, HEADER_LEN)], indexed: true });
        }
        // The new segment's header is durable: name it in the marker, so a
        // lost active segment file is noticed (invariant 7).
        self.unmarked = self.fsync;
        self.mark_durable(true);
        Ok(())
    }

    fn poison(&self, e: LogError) -> LogError {
        let mut st = self.part.state.lock().expect("partition state");
        st.poisoned = Some(e.to_string());
        tracing::error!(topic = %self.part.topic, partition = self.part.id, error = %e, "log partition stopped accepting writes");
        e
    }
}
