//! The dedup index of one partition: a RocksDB database holding every
//! `<source id>/<messageId>` published to `output` within the window.
//!
//! Invariants:
//! - The index is derived from `output`, never the other way round: it holds
//!   ids and a checkpoint (the `output` offset it covers up to, exclusive),
//!   written together in one `WriteBatch` into one column family, so ids and
//!   checkpoint reach the memtable and the write-ahead log together, and
//!   every flush persists them together. Writes are not fsynced: a process
//!   crash keeps them (the WAL is in the OS page cache), and whatever a power
//!   loss takes, it takes ids and checkpoint alike, and catching up from
//!   `output` restores them. (Skipping the WAL altogether was measured: +6% on
//!   the raw index, nothing on the pipeline, and every process crash would
//!   then fall back to catch-up; not worth it.)
//! - A key seen within the window reads as present; an older one reads as
//!   absent, whether or not compaction has removed it yet.
//!
//! Expiry: each value is the time (ms) the id was published. A read checks
//! it against the window, and a compaction filter drops expired entries
//! while RocksDB compacts anyway, so expiry costs no scans and no deletes.
//! We chose this over time-bucketed column families because one column
//! family keeps a lookup at one bloom probe per key (buckets would need one
//! per bucket, 28 for a day-sized bucket), and the window can change without
//! re-bucketing.
//!
//! Lookups of new ids (the 99.4% case) are answered by bloom filters: one on
//! the memtable, one per SST file.
//! Filters are whole-key, partitioned (4 KB partitions with a two-level
//! index), held in the shared block cache with the top level pinned, so
//! every filter partition fits one cache shard and stays resident while the
//! filters and indexes of all partitions fit the block cache: a new id then
//! costs no filter or index read (a bloom false positive, ~1% per SST probed
//! at 10 bits/key, still reads one data block).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rocksdb::compaction_filter::Decision;
use rocksdb::{BlockBasedIndexType, BlockBasedOptions, Cache, ColumnFamilyDescriptor, Options, WriteBatch, WriteOptions, DB};

use crate::DedupError;

const CF_IDS: &str = "ids";
/// Lives beside the ids, in the same column family, so one memtable holds
/// both and every flush persists them together. Record keys start with a
/// source id (`[A-Za-z0-9_-]`), never with a NUL byte.
const CHECKPOINT_KEY: &[u8] = b"\0sluice:output_checkpoint";

/// Fault injection for tests: make the writes of indexes under a path fail
/// as a full disk makes them fail, without a full disk.
///
/// [`fail_writes`]`(prefix, true)` makes [`DedupIndex::open`],
/// [`DedupIndex::record`] and [`DedupIndex::flush`] of every index whose
/// path starts with `prefix` return the error RocksDB returns on ENOSPC,
/// until `fail_writes(prefix, false)`. Off by default; a relaxed load is all
/// it costs when nothing is armed.
pub mod faults {
    use super::*;

    static ARMED: AtomicBool = AtomicBool::new(false);
    static PREFIXES: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

    pub fn fail_writes(prefix: &Path, on: bool) {
        let mut p = PREFIXES.lock().expect("faults");
        p.retain(|x| x != prefix);
        if on {
            p.push(prefix.to_owned());
        }
        ARMED.store(!p.is_empty(), Ordering::SeqCst);
    }

    pub(crate) fn check(path: &Path, doing: &str) -> Result<(), DedupError> {
        if !ARMED.load(Ordering::Relaxed) {
            return Ok(());
        }
        if PREFIXES.lock().expect("faults").iter().any(|p| path.starts_with(p)) {
            return Err(DedupError::Rocks {
                doing: format!("{doing} {}", path.display()),
                cause: "IO error: No space left on device (injected)".into(),
            });
        }
        Ok(())
    }
}

/// Settings shared by the indexes of every partition.
#[derive(Clone)]
pub struct IndexOptions {
    pub bloom_bits_per_key: f64,
    pub window: Duration,
    /// One LRU block cache shared by all partitions' indexes.
    pub block_cache: Cache,
}

impl IndexOptions {
    pub fn new(bloom_bits_per_key: f64, window: Duration, block_cache_bytes: usize) -> Result<Self, DedupError> {
        let block_cache = Cache::new_lru_cache(block_cache_bytes).map_err(DedupError::rocks("creating the block cache"))?;
        Ok(Self { bloom_bits_per_key, window, block_cache })
    }
}

/// The wall clock in the index's unit (milliseconds, unsigned).
pub fn now_ms() -> u64 {
    sluice_core::clock::now_ms().max(0) as u64
}

/// RocksDB statistics of one index that the metrics and the benchmark read.
#[derive(Debug, Default, Clone, Copy)]
pub struct IndexStats {
    pub bloom_useful: u64,
    pub bloom_full_positive: u64,
    pub bloom_full_true_positive: u64,
    pub block_cache_miss: u64,
    pub block_cache_data_miss: u64,
    pub block_cache_filter_miss: u64,
    pub block_cache_index_miss: u64,
    pub estimated_keys: u64,
}

impl IndexStats {
    /// Apply `op` to every ticker; `estimated_keys` (a level, not a count)
    /// is combined with `keys`.
    fn zip(self, o: IndexStats, op: fn(u64, u64) -> u64, keys: fn(u64, u64) -> u64) -> IndexStats {
        IndexStats {
            bloom_useful: op(self.bloom_useful, o.bloom_useful),
            bloom_full_positive: op(self.bloom_full_positive, o.bloom_full_positive),
            bloom_full_true_positive: op(self.bloom_full_true_positive, o.bloom_full_true_positive),
            block_cache_miss: op(self.block_cache_miss, o.block_cache_miss),
            block_cache_data_miss: op(self.block_cache_data_miss, o.block_cache_data_miss),
            block_cache_filter_miss: op(self.block_cache_filter_miss, o.block_cache_filter_miss),
            block_cache_index_miss: op(self.block_cache_index_miss, o.block_cache_index_miss),
            estimated_keys: keys(self.estimated_keys, o.estimated_keys),
        }
    }
}

/// Tickers since an earlier reading (`after - before`).
impl std::ops::Sub for IndexStats {
    type Output = IndexStats;
    fn sub(self, o: IndexStats) -> IndexStats {
        self.zip(o, u64::saturating_sub, |a, _| a)
    }
}

/// Tickers of several indexes together.
impl std::ops::Add for IndexStats {
    type Output = IndexStats;
    fn add(self, o: IndexStats) -> IndexStats {
        self.zip(o, u64::saturating_add, u64::saturating_add)
    }
}

pub struct DedupIndex {
    db: DB,
    db_options: Options,
    path: PathBuf,
    window_ms: u64,
    /// Entries published before this time (ms) are dropped by compaction.
    cutoff_ms: Arc<AtomicU64>,
}

impl DedupIndex {
    /// Open (creating when missing) the index at `path`. A corrupt index is
    /// reported as [`DedupError::Corrupt`].
    pub fn open(path: &Path, options: &IndexOptions) -> Result<Self, DedupError> {
        faults::check(path, "opening")?;
        let window_ms = options.window.as_millis() as u64;
        let cutoff_ms = Arc::new(AtomicU64::new(now_ms().saturating_sub(window_ms)));
        let mut table = BlockBasedOptions::default();
        table.set_bloom_filter(options.bloom_bits_per_key, false);
        table.set_whole_key_filtering(true);
        table.set_cache_index_and_filter_blocks(true);
        table.set_pin_l0_filter_and_index_blocks_in_cache(true);
        table.set_partition_filters(true);
        table.set_index_type(BlockBasedIndexType::TwoLevelIndexSearch);
        table.set_metadata_block_size(4096);
        table.set_pin_top_level_index_and_filter(true);
        table.set_block_cache(&options.block_cache);
        table.set_format_version(5);
        let mut ids = Options::default();
        ids.set_block_based_table_factory(&table);
        ids.set_write_buffer_size(16 << 20);
        // A bloom filter on the memtable too: most lookups are of new ids,
        // and without it each would search the memtable's skip list.
        ids.set_memtable_prefix_bloom_ratio(0.05);
        ids.set_memtable_whole_key_filtering(true);
        ids.set_compression_type(rocksdb::DBCompressionType::Lz4);
        let cutoff = cutoff_ms.clone();
        ids.set_compaction_filter("sluice_dedup_window", move |_level: u32, key: &[u8], value: &[u8]| match decode_ts(value) {
            Some(ts) if key != CHECKPOINT_KEY && ts < cutoff.load(Ordering::Relaxed) => Decision::Remove,
            _ => Decision::Keep,
        });
        let mut db_options = Options::default();
        db_options.create_if_missing(true);
        db_options.create_missing_column_families(true);
        db_options.enable_statistics();
        db_options.set_max_background_jobs(2);
        // Write back the WAL and new tables 1 MiB at a time, not at the end: on ext4
        // (data=ordered) every other fsync on the disk, such as ingest's group
        // commit, would otherwise wait for whatever dirty pages had piled up.
        db_options.set_bytes_per_sync(1 << 20);
        db_options.set_wal_bytes_per_sync(1 << 20);
        db_options.set_keep_log_file_num(3);
        // RocksDB's own LOG file keeps only the header written at open (see
        // `quiet_info_log`): on a full disk a LOG write fails, and the next
        // line RocksDB logs (its error handler reporting that very failure)
        // hits an assertion in Debian's librocksdb 7.8 and aborts the process.
        quiet_info_log(&mut db_options);
        db_options.set_paranoid_checks(true);
        let cfs = vec![ColumnFamilyDescriptor::new(CF_IDS, ids)];
        let db = DB::open_cf_descriptors(&db_options, path, cfs).map_err(|e| classify(path, "opening", e))?;
        Ok(Self { db, db_options, path: path.to_owned(), window_ms, cutoff_ms })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `output` offset this index covers up to (exclusive), if any.
    pub fn checkpoint(&self) -> Result<Option<u64>, DedupError> {
        let ids = self.db.cf_handle(CF_IDS).expect("ids column family");
        let value = self.db.get_cf(&ids, CHECKPOINT_KEY).map_err(|e| classify(&self.path, "reading the checkpoint", e))?;
        Ok(value.and_then(|v| decode_ts(&v)))
    }

    /// For each key, whether it was published within the window before `now_ms`.
    pub fn contains(&self, keys: &[&[u8]], now_ms: u64) -> Result<Vec<bool>, DedupError> {
        let cutoff = now_ms.saturating_sub(self.window_ms);
        // Compaction drops by the wall clock only, and never moves back: a
        // caller's `now` (tests, a clock step) must not purge live ids.
        self.cutoff_ms.fetch_max(self::now_ms().saturating_sub(self.window_ms), Ordering::Relaxed);
        let cf = self.db.cf_handle(CF_IDS).expect("ids column family");
        let mut sorted: Vec<(usize, &[u8])> = keys.iter().copied().enumerate().collect();
        sorted.sort_unstable_by(|a, b| a.1.cmp(b.1));
        let results = self.db.batched_multi_get_cf(&cf, sorted.iter().map(|(_, k)| *k), true);
        let mut out = vec![false; keys.len()];
        for ((i, _), r) in sorted.iter().zip(results) {
            let value = r.map_err(|e| classify(&self.path, "looking up ids", e))?;
            out[*i] = matches!(value.as_deref().and_then(decode_ts), Some(ts) if ts >= cutoff);
        }
        Ok(out)
    }

    /// Positions of the keys that are new: not seen within the window, and
    /// not a repeat of an earlier key of the same batch.
    pub fn select_new(&self, keys: &[&[u8]], now_ms: u64) -> Result<Vec<usize>, DedupError> {
        let seen = self.contains(keys, now_ms)?;
        let mut in_batch = HashSet::with_capacity(keys.len());
        Ok((0..keys.len()).filter(|&i| !seen[i] && in_batch.insert(keys[i])).collect())
    }

    /// Record `keys` as published at their times, and the new checkpoint, in
    /// one atomic write.
    pub fn record<'a>(&self, keys: impl IntoIterator<Item = (&'a [u8], u64)>, checkpoint: u64) -> Result<(), DedupError> {
        faults::check(&self.path, "writing ids")?;
        let ids = self.db.cf_handle(CF_IDS).expect("ids column family");
        // Sorted, consecutive inserts reuse the memtable skip list's search
        // path (its "splice"); random order pays a full search per key.
        let mut keys: Vec<(&[u8], u64)> = keys.into_iter().collect();
        keys.sort_unstable();
        let mut batch = WriteBatch::default();
        for (key, ts) in keys {
            batch.put_cf(&ids, key, ts.to_be_bytes());
        }
        batch.put_cf(&ids, CHECKPOINT_KEY, checkpoint.to_be_bytes());
        let mut write = WriteOptions::default();
        write.set_sync(false); // see the module docs: output is the truth
        self.db.write_opt(batch, &write).map_err(|e| classify(&self.path, "writing ids", e))
    }

    /// Flush memtables to disk (used on clean shutdown and by the benchmark).
    /// Delete every id starting with `prefix` (`"<source id>/"`): one range
    /// delete, whatever the number of ids. A prefix that is not a source's
    /// (empty, or without the trailing '/') is refused: it could take other
    /// sources' ids with it.
    pub fn forget_prefix(&self, prefix: &[u8]) -> Result<(), DedupError> {
        faults::check(&self.path, "forgetting ids")?;
        if prefix.len() < 2 || prefix.last() != Some(&b'/') || prefix[..prefix.len() - 1].contains(&b'/') || prefix[0] == 0 {
            tracing::warn!(prefix = %String::from_utf8_lossy(prefix), "a forget record without a source's prefix; ignored");
            return Ok(());
        }
        let ids = self.db.cf_handle(CF_IDS).expect("ids column family");
        // '/' + 1 = '0': the range is exactly the keys under the prefix.
        let mut end = prefix.to_vec();
        *end.last_mut().expect("not empty") += 1;
        self.db.delete_range_cf(&ids, prefix, &end).map_err(|e| classify(&self.path, "forgetting ids", e))
    }

    pub fn flush(&self) -> Result<(), DedupError> {
        faults::check(&self.path, "flushing")?;
        let ids = self.db.cf_handle(CF_IDS).expect("ids column family");
        self.db.flush_cf(&ids).map_err(|e| classify(&self.path, "flushing", e))
    }

    pub fn stats(&self) -> IndexStats {
        let mut s = IndexStats::default();
        if let Some(text) = self.db_options.get_statistics() {
            for line in text.lines() {
                let mut parts = line.split_whitespace();
                let (Some(name), Some("COUNT"), Some(":"), Some(v)) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
                    continue;
                };
                let Ok(v) = v.parse::<u64>() else { continue };
                match name {
                    "rocksdb.bloom.filter.useful" => s.bloom_useful = v,
                    "rocksdb.bloom.filter.full.positive" => s.bloom_full_positive = v,
                    "rocksdb.bloom.filter.full.true.positive" => s.bloom_full_true_positive = v,
                    "rocksdb.block.cache.miss" => s.block_cache_miss = v,
                    "rocksdb.block.cache.data.miss" => s.block_cache_data_miss = v,
                    "rocksdb.block.cache.filter.miss" => s.block_cache_filter_miss = v,
                    "rocksdb.block.cache.index.miss" => s.block_cache_index_miss = v,
                    _ => {}
                }
            }
        }
        let cf = self.db.cf_handle(CF_IDS).expect("ids column family");
        let keys = self.db.property_int_value_cf(&cf, "rocksdb.estimate-num-keys").ok().flatten().unwrap_or(0);
        // The checkpoint shares the column family; it is not an id.
        let checkpoint = u64::from(matches!(self.checkpoint(), Ok(Some(_))));
        s.estimated_keys = keys.saturating_sub(checkpoint);
        s
    }

    /// Bytes of the index's files on disk.
    pub fn size_on_disk(&self) -> u64 {
        dir_size(&self.path)
    }
}

fn dir_size(path: &Path) -> u64 {
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_size(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// Keep RocksDB's info log (`<index>/LOG`) to the lines written at open.
///
/// RocksDB writes its LOG through a `WritableFileWriter`; once one of its
/// writes failed (ENOSPC), the next append to it reaches
/// `AssertFalseAndGetStatusForPrevError`, an `assert` that Debian's build of
/// librocksdb 7.8 keeps: SIGABRT. The first line logged after a full disk is
/// the error handler's report of the failed write, so any level below
/// `Header` turns "disk full" into "process aborted". Header lines are only
/// written when the database opens (they fit the writer's buffer); errors
/// reach Sluice's log through the `Err` every failed call returns.
fn quiet_info_log(options: &mut Options) {
    options.set_log_level(rocksdb::LogLevel::Header);
}

/// Every id under one of `prefixes` (`"<source id>/"`) still within
/// `window` in the index at `path`, with the time it was published: what a
/// workspace moving to another cell takes with it
/// (docs/plans/MIGRATION.md). Read through a RocksDB *secondary* instance
/// (its own files under `scratch`): read-only, no coordination with the
/// worker that owns the index, which keeps writing. `visit` gets each id;
/// returning `false` stops. Returns the ids visited. Blocks. An index that
/// does not exist (a partition that never held anything) has none.
pub fn export_ids(
    path: &Path,
    scratch: &Path,
    prefixes: &[Vec<u8>],
    window: Duration,
    mut visit: impl FnMut(&[u8], u64) -> bool,
) -> Result<u64, DedupError> {
    if !path.join("CURRENT").exists() {
        return Ok(0);
    }
    std::fs::create_dir_all(scratch).map_err(|source| DedupError::Io { path: scratch.display().to_string(), source })?;
    let mut options = Options::default();
    options.set_max_open_files(-1);
    quiet_info_log(&mut options);
    let db = DB::open_cf_as_secondary(&options, path, scratch, [rocksdb::DEFAULT_COLUMN_FAMILY_NAME, CF_IDS])
        .map_err(|e| classify(path, "opening as a secondary", e))?;
    db.try_catch_up_with_primary().map_err(|e| classify(path, "catching up as a secondary", e))?;
    let cf = db.cf_handle(CF_IDS).expect("ids column family");
    let cutoff = now_ms().saturating_sub(window.as_millis() as u64);
    let mut visited = 0;
    for prefix in prefixes {
        for item in db.iterator_cf(&cf, rocksdb::IteratorMode::From(prefix, rocksdb::Direction::Forward)) {
            let (key, value) = item.map_err(|e| classify(path, "reading ids as a secondary", e))?;
            if !key.starts_with(prefix) {
                break;
            }
            let Some(ts) = decode_ts(&value).filter(|ts| *ts >= cutoff) else { continue };
            visited += 1;
            if !visit(&key, ts) {
                return Ok(visited);
            }
        }
    }
    Ok(visited)
}

fn decode_ts(value: &[u8]) -> Option<u64> {
    value.get(..8).map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
}

/// Corruption (checksum failures, unreadable metadata) is told apart from
/// other errors: it is repaired by moving the index aside and rebuilding.
fn classify(path: &Path, doing: &str, e: rocksdb::Error) -> DedupError {
    let corrupt = matches!(e.kind(), rocksdb::ErrorKind::Corruption) || e.to_string().to_ascii_lowercase().contains("checksum");
    if corrupt {
        DedupError::Corrupt { path: path.display().to_string(), cause: e.to_string() }
    } else {
        DedupError::Rocks { doing: format!("{doing} {}", path.display()), cause: e.to_string() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(window: Duration) -> IndexOptions {
        IndexOptions::new(10.0, window, 8 << 20).unwrap()
    }

    #[test]
    fn a_sources_ids_are_exported_while_the_index_is_open() {
        let dir = tempfile::tempdir().unwrap();
        let opts = IndexOptions::new(10.0, Duration::from_secs(3600), 8 << 20).unwrap();
        let index = DedupIndex::open(&dir.path().join("idx"), &opts).unwrap();
        let now = now_ms();
        let old = now - 2 * 3600 * 1000;
        let keys: Vec<(&[u8], u64)> = vec![(b"a/1", now), (b"a/2", now), (b"ab/3", now), (b"b/4", now), (b"a/5", old)];
        index.record(keys, 7).unwrap();
        let mut got = Vec::new();
        let n = export_ids(
            &dir.path().join("idx"),
            &dir.path().join("scratch"),
            &[b"a/".to_vec(), b"b/".to_vec()],
            Duration::from_secs(3600),
            |k, ts| {
                got.push((String::from_utf8_lossy(k).into_owned(), ts));
                true
            },
        )
        .unwrap();
        // "ab/3" is another source's; "a/5" is past the window; the checkpoint is no id.
        assert_eq!(n, 3);
        assert_eq!(got, vec![("a/1".to_owned(), now), ("a/2".to_owned(), now), ("b/4".to_owned(), now)]);
        // Writes after the export are seen by the next one (the owner keeps writing meanwhile).
        index.record(vec![(&b"a/9"[..], now)], 8).unwrap();
        let n = export_ids(&dir.path().join("idx"), &dir.path().join("scratch2"), &[b"a/".to_vec()], Duration::from_secs(3600), |_, _| true).unwrap();
        assert_eq!(n, 3);
        assert_eq!(
            export_ids(&dir.path().join("none"), &dir.path().join("s3"), &[b"a/".to_vec()], Duration::from_secs(3600), |_, _| true).unwrap(),
            0
        );
    }

    #[test]
    fn records_and_finds_ids_with_their_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let idx = DedupIndex::open(dir.path(), &options(Duration::from_secs(3600))).unwrap();
        assert_eq!(idx.checkpoint().unwrap(), None);
        let now = now_ms();
        idx.record([(&b"web/a"[..], now), (&b"web/b"[..], now)], 2).unwrap();
        assert_eq!(idx.contains(&[b"web/a", b"web/c", b"web/b", b"app/a"], now).unwrap(), [true, false, true, false]);
        assert_eq!(idx.checkpoint().unwrap(), Some(2));
        drop(idx);
        let idx = DedupIndex::open(dir.path(), &options(Duration::from_secs(3600))).unwrap();
        assert_eq!(idx.contains(&[b"web/a"], now).unwrap(), [true]);
        assert_eq!(idx.checkpoint().unwrap(), Some(2));
    }

    #[test]
    fn ids_older_than_the_window_read_as_absent_and_compaction_drops_them() {
        let dir = tempfile::tempdir().unwrap();
        let idx = DedupIndex::open(dir.path(), &options(Duration::from_secs(60))).unwrap();
        let now = now_ms();
        idx.record([(&b"old"[..], now - 61_000), (&b"new"[..], now - 59_000)], 2).unwrap();
        assert_eq!(idx.contains(&[b"old", b"new"], now).unwrap(), [false, true]);
        idx.flush().unwrap();
        let cf = idx.db.cf_handle(CF_IDS).unwrap();
        idx.db.compact_range_cf(&cf, None::<&[u8]>, None::<&[u8]>);
        assert!(idx.db.get_cf(&cf, b"old").unwrap().is_none(), "compaction removed the expired id");
        assert!(idx.db.get_cf(&cf, b"new").unwrap().is_some());
    }

    #[test]
    fn a_corrupt_index_is_reported_as_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        {
            let idx = DedupIndex::open(dir.path(), &options(Duration::from_secs(60))).unwrap();
            idx.record([(&b"k"[..], now_ms())], 1).unwrap();
        }
        let current = std::fs::read_to_string(dir.path().join("CURRENT")).unwrap();
        std::fs::write(dir.path().join(current.trim()), vec![0xAB; 4096]).unwrap();
        match DedupIndex::open(dir.path(), &options(Duration::from_secs(60))) {
            Err(DedupError::Corrupt { .. }) => {}
            Err(e) => panic!("expected Corrupt, got {e}"),
            Ok(_) => panic!("a corrupt index opened"),
        }
    }
}
