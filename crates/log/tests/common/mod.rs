//! Helpers shared by the embedded log's integration tests.
#![allow(dead_code)]

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use sluice_log::{EmbeddedLog, Log, LogMetrics, LogOptions, Record, StoredRecord};

/// Segment header length (`b"SLUICEL1"` + base offset), from the format docs.
pub const HEADER_LEN: u64 = 16;
/// Frame prefix (length + CRC) plus the fixed part of the body.
pub const FRAME_OVERHEAD: u64 = 8 + 20;

pub fn options(topics: &[(&str, u32)], segment_bytes: u64) -> LogOptions {
    LogOptions {
        topics: topics.iter().map(|(n, p)| (n.to_string(), *p)).collect(),
        segment_bytes,
        retention: Duration::from_secs(3600),
        fsync: true,
        metrics: LogMetrics::default(),
        ..LogOptions::default()
    }
}

pub fn open(root: &Path, opts: &LogOptions) -> EmbeddedLog {
    match EmbeddedLog::open(root, opts.clone()) {
        Ok(log) => log,
        Err(e) => panic!("open {}: {e}", root.display()),
    }
}

pub fn rec(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Record {
    Record { key: Bytes::from(key.into()), value: Bytes::from(value.into()) }
}

/// Deterministic, position-dependent bytes, so misplaced data shows.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng::new(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03);
    (0..len).map(|_| rng.next() as u8).collect()
}

/// The record a test stores at `offset` of a partition: its key names the
/// offset, its value is `value_len` pattern bytes.
pub fn numbered(partition: u32, offset: u64, value_len: usize) -> Record {
    rec(format!("p{partition}/o{offset}"), pattern(offset ^ ((partition as u64) << 40), value_len))
}

/// On-disk size of a record's frame.
pub fn frame_len(r: &Record) -> u64 {
    FRAME_OVERHEAD + r.key.len() as u64 + r.value.len() as u64
}

/// A small deterministic PRNG (xorshift64*).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

pub fn partition_dir(root: &Path, topic: &str, partition: u32) -> PathBuf {
    root.join(topic).join(partition.to_string())
}

/// The segment files of a partition as (base offset, path), by base.
pub fn segments(root: &Path, topic: &str, partition: u32) -> Vec<(u64, PathBuf)> {
    let dir = partition_dir(root, topic, partition);
    let mut out: Vec<(u64, PathBuf)> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?.to_owned();
            let base = name.strip_suffix(".seg")?.parse::<u64>().ok()?;
            Some((base, p))
        })
        .collect();
    out.sort();
    out
}

pub fn last_segment(root: &Path, topic: &str, partition: u32) -> (u64, PathBuf) {
    segments(root, topic, partition).pop().expect("a segment")
}

pub fn file_len(path: &Path) -> u64 {
    fs::metadata(path).unwrap().len()
}

pub fn append_bytes(path: &Path, bytes: &[u8]) {
    let mut f = OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(bytes).unwrap();
    f.sync_all().unwrap();
}

pub fn truncate(path: &Path, len: u64) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.set_len(len).unwrap();
    f.sync_all().unwrap();
}

pub fn flip_byte(path: &Path, position: u64) {
    let mut data = fs::read(path).unwrap();
    data[position as usize] ^= 0x5A;
    fs::write(path, data).unwrap();
}

/// Read every record from `from` to the end, in calls of at most `batch`.
pub async fn read_all(log: &EmbeddedLog, topic: &str, partition: u32, from: u64, batch: usize) -> Vec<StoredRecord> {
    let mut out = Vec::new();
    let mut next = from;
    loop {
        let got = log.read(topic, partition, next, batch).await.unwrap_or_else(|e| panic!("read {topic}/{partition}@{next}: {e}"));
        if got.is_empty() {
            return out;
        }
        assert!(got.len() <= batch, "read returned {} records, more than the {batch} asked for", got.len());
        next = got.last().unwrap().offset + 1;
        out.extend(got);
    }
}

/// `got` must be exactly `expected`, stored at offsets `first..`.
#[track_caller]
pub fn assert_records(got: &[StoredRecord], first: u64, expected: &[Record]) {
    assert_eq!(
        got.len(),
        expected.len(),
        "record count from offset {first}: got offsets {:?}",
        got.iter().map(|r| r.offset).take(20).collect::<Vec<_>>()
    );
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        let offset = first + i as u64;
        assert_eq!(g.offset, offset, "offset of record #{i} from {first}");
        assert_eq!(g.key, e.key, "key at offset {offset}");
        assert_eq!(g.value, e.value, "value at offset {offset} (len {} vs {})", g.value.len(), e.value.len());
    }
}

/// A partition's durable-through marker file (module docs, invariant 7).
pub fn marker_path(root: &Path, topic: &str, partition: u32) -> PathBuf {
    partition_dir(root, topic, partition).join("durable")
}

/// The marker line the log writes: segment `base` fsynced before offset
/// `end`, i.e. through byte `position`.
pub fn marker_line(base: u64, end: u64, position: u64) -> String {
    let body = format!("segment={base} end={end} position={position}");
    format!("{body} crc32c={:08x}\n", crc32c::crc32c(body.as_bytes()))
}

/// Replace a partition's marker, as a writer whose marker lagged would
/// have left it (e.g. a crash before the last group commit was marked).
pub fn set_marker(root: &Path, topic: &str, partition: u32, base: u64, end: u64, position: u64) {
    fs::write(marker_path(root, topic, partition), marker_line(base, end, position)).unwrap();
}

/// Make the marker lag just before the last record of the active segment,
/// which starts at byte `frame_start`: the state a crash during the last
/// (unacknowledged) write leaves.
pub fn marker_before_last_record(root: &Path, topic: &str, partition: u32, records: u64, frame_start: u64) {
    let (base, _) = last_segment(root, topic, partition);
    set_marker(root, topic, partition, base, records - 1, frame_start);
}
