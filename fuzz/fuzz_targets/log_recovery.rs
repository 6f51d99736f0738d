//! The embedded log's frame reader and tail recovery, against a model.
//!
//! The input becomes the segment files of a one-partition topic `t` (first
//! byte: the layout), and the log is opened read-only, then for writing
//! (which recovers the active segment's tail), appended to, and reopened.
//! What every step must do follows the module docs of
//! `sluice_log::embedded` (invariant 3), predicted by `sluice_fuzz::segment`:
//! - a bad header in front of records: `open` fails with `Corrupt` and the
//!   file is left as it was;
//! - otherwise the active segment is cut to its valid frames (exactly the
//!   model's prefix), every record read back is the model's record at that
//!   offset, byte for byte, and an append continues at the first cut offset;
//! - a sealed segment whose valid frames do not reach the next segment's
//!   base is reported as `Corrupt` when read, never skipped or misread;
//! - a reopened repaired log has nothing more to cut.

#![no_main]

use std::fs;
use std::time::Duration;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use sluice_fuzz::segment::{self, ModelRecord, ModelScan, HEADER_LEN};
use sluice_log::{EmbeddedLog, Log, LogError, LogMetrics, LogOptions, Record, StoredRecord};

const TOPIC: &str = "t";

/// A segment to write: its base and bytes.
struct Seg {
    base: u64,
    bytes: Vec<u8>,
}

/// The input as segments (oldest first; the last is the active one).
fn layout(data: &[u8]) -> Vec<Seg> {
    let Some((&mode, rest)) = data.split_first() else { return vec![] };
    let byte = |i: usize| rest.get(i).copied().unwrap_or(0);
    match mode % 4 {
        // The whole active segment, header included, from the input.
        0 => vec![Seg { base: 0, bytes: rest.to_vec() }],
        // A valid header, then fuzzed frames.
        1 => {
            let mut bytes = segment::header(0).to_vec();
            bytes.extend_from_slice(rest);
            vec![Seg { base: 0, bytes }]
        }
        // Valid records, then a fuzzed tail (a torn or corrupt last write).
        2 => {
            let mut bytes = segment::valid_segment(0, u64::from(byte(0) % 8), byte(1));
            bytes.extend_from_slice(rest.get(2..).unwrap_or(&[]));
            vec![Seg { base: 0, bytes }]
        }
        // A sealed segment (valid records + fuzzed tail) and an active one
        // (valid records from its base + fuzzed tail).
        _ => {
            let active_base = 1 + u64::from(byte(0) % 12);
            let tail = rest.get(4..).unwrap_or(&[]);
            let cut = (byte(3) as usize).min(tail.len());
            let mut sealed = segment::valid_segment(0, u64::from(byte(1) % 16), 7);
            sealed.extend_from_slice(&tail[..cut]);
            let mut active = segment::valid_segment(active_base, u64::from(byte(2) % 4), 9);
            active.extend_from_slice(&tail[cut..]);
            vec![Seg { base: 0, bytes: sealed }, Seg { base: active_base, bytes: active }]
        }
    }
}

/// What reading offset `o` must give: the model's record, or `Corrupt`.
#[derive(Debug)]
enum Expect {
    Record(ModelRecord),
    Corrupt,
}

/// Per offset from the first base to the end, what a read must return.
fn expectations(segs: &[Seg], scans: &[ModelScan]) -> Vec<Expect> {
    let mut out = Vec::new();
    for (i, (seg, scan)) in segs.iter().zip(scans).enumerate() {
        match segs.get(i + 1) {
            // Sealed: its offsets run to the next base. A segment whose scan
            // stopped at a bad frame short of that is corrupt as a whole (the
            // verifying scan that builds its index fails); one that simply
            // ends early is readable up to where it ends.
            Some(next) => {
                let want = (next.base - seg.base) as usize;
                let have = scan.records.len();
                for k in 0..want {
                    if have >= want || (scan.clean_end && k < have) {
                        out.push(Expect::Record(scan.records[k].clone()));
                    } else {
                        out.push(Expect::Corrupt);
                    }
                }
            }
            None => out.extend(scan.records.iter().cloned().map(Expect::Record)),
        }
    }
    out
}

fn same(got: &StoredRecord, want: &ModelRecord) -> bool {
    got.offset == want.offset && got.timestamp_ms == want.timestamp_ms && got.key[..] == want.key[..] && got.value[..] == want.value[..]
}

/// Read every offset alone, then all at once, and hold them to `expect`.
fn check_reads(log: &EmbeddedLog, start: u64, expect: &[Expect], what: &str) {
    let range = log.offsets_blocking(TOPIC, 0).unwrap_or_else(|e| panic!("{what}: offsets: {e}"));
    assert_eq!((range.start, range.end), (start, start + expect.len() as u64), "{what}: offsets");
    for (i, want) in expect.iter().enumerate() {
        let o = start + i as u64;
        match (log.read_blocking(TOPIC, 0, o, 1), want) {
            (Ok(got), Expect::Record(w)) => {
                assert!(got.len() == 1 && same(&got[0], w), "{what}: read at {o} gave {got:?}, the model says {w:?}")
            }
            (Ok(got), Expect::Corrupt) => panic!("{what}: read at {o} gave {got:?} where the segment is corrupt"),
            (Err(LogError::Corrupt { .. }), Expect::Corrupt) => {}
            (Err(e), w) => panic!("{what}: read at {o} failed ({e}); the model says {w:?}"),
        }
    }
    let all_ok = expect.iter().all(|e| matches!(e, Expect::Record(_)));
    match log.read_blocking(TOPIC, 0, start, usize::MAX) {
        Ok(got) => {
            assert!(all_ok, "{what}: a whole read succeeded over a corrupt segment");
            assert_eq!(got.len(), expect.len(), "{what}: whole read");
            for (g, w) in got.iter().zip(expect) {
                let Expect::Record(w) = w else { unreachable!() };
                assert!(same(g, w), "{what}: whole read gave {g:?}, the model says {w:?}");
            }
        }
        Err(LogError::Corrupt { .. }) => assert!(!all_ok, "{what}: a whole read failed as Corrupt over valid segments"),
        Err(e) => panic!("{what}: whole read failed: {e}"),
    }
    let end = start + expect.len() as u64;
    match log.read_blocking(TOPIC, 0, end, 10) {
        Ok(got) => assert!(got.is_empty(), "{what}: read at the end gave {got:?}"),
        Err(e) => panic!("{what}: read at the end failed: {e}"),
    }
}

fn options(metrics: &LogMetrics) -> LogOptions {
    LogOptions {
        topics: vec![(TOPIC.into(), 1)],
        segment_bytes: 1 << 30,
        retention: Duration::from_secs(365 * 86400),
        fsync: false,
        metrics: metrics.clone(),
        ..LogOptions::default()
    }
}

fn run(data: &[u8]) {
    let segs = layout(data);
    if segs.is_empty() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("log");
    let pdir = root.join(TOPIC).join("0");
    fs::create_dir_all(pdir.join("groups")).unwrap();
    fs::write(root.join(TOPIC).join("topic.meta"), "partitions=1\n").unwrap();
    let path = |base: u64| pdir.join(format!("{base:020}.seg"));
    for s in &segs {
        fs::write(path(s.base), &s.bytes).unwrap();
    }
    let scans: Vec<ModelScan> = segs.iter().map(|s| segment::scan(&s.bytes, s.base)).collect();
    let (active, active_scan) = (segs.last().unwrap(), scans.last().unwrap());
    let start = segs[0].base;
    let bad_header_before_records = !active_scan.header_ok && active.bytes.len() > HEADER_LEN;
    let expect = expectations(&segs, &scans);

    // Read-only: no recovery, a torn tail is where reading stops.
    match EmbeddedLog::open_read_only(&root) {
        Ok(log) => {
            assert!(!bad_header_before_records, "open_read_only accepted a bad header in front of records");
            check_reads(&log, start, &expect, "read-only");
        }
        Err(LogError::Corrupt { .. }) if bad_header_before_records => {}
        Err(e) => panic!("open_read_only failed: {e}"),
    }

    // Writable: recovery cuts the active segment to its valid frames.
    let metrics = LogMetrics::default();
    let log = match EmbeddedLog::open(&root, options(&metrics)) {
        Ok(log) => {
            assert!(!bad_header_before_records, "open accepted a bad header in front of records");
            log
        }
        Err(LogError::Corrupt { .. }) if bad_header_before_records => {
            assert_eq!(fs::read(path(active.base)).unwrap(), active.bytes, "a refused segment must be left untouched");
            return;
        }
        Err(e) => panic!("open failed: {e}"),
    };
    let expected_len = if active_scan.header_ok { active_scan.valid_len } else { HEADER_LEN };
    assert_eq!(fs::metadata(path(active.base)).unwrap().len() as usize, expected_len, "the active segment is cut to its valid frames");
    let cut = metrics.truncated_records.get();
    assert_eq!(cut > 0, active_scan.header_ok && !active_scan.clean_end, "truncated_records counts a cut tail (and nothing else)");
    check_reads(&log, start, &expect, "recovered");

    // An append continues at the first cut offset.
    let end = start + expect.len() as u64;
    let new = ModelRecord { offset: end, timestamp_ms: 0, key: b"fuzz".to_vec(), value: data.iter().take(64).copied().collect() };
    let rec = Record { key: Bytes::from(new.key.clone()), value: Bytes::from(new.value.clone()) };
    let at = sluice_fuzz::runtime().block_on(log.append(TOPIC, 0, vec![rec])).expect("append after recovery");
    assert_eq!(at, end, "appends continue where the valid records end");
    let got = log.read_blocking(TOPIC, 0, end, 10).expect("read the append");
    assert!(got.len() == 1 && got[0].key[..] == new.key[..] && got[0].value[..] == new.value[..], "append read back: {got:?}");
    log.close();

    // Reopened: nothing more to cut, the appended record is still there.
    let log = EmbeddedLog::open(&root, options(&metrics)).expect("reopen a repaired log");
    assert_eq!(metrics.truncated_records.get(), cut, "a repaired log has no tail to cut");
    let mut expect = expect;
    let appended = log.read_blocking(TOPIC, 0, end, 1).expect("read the append after reopening");
    assert_eq!(appended.len(), 1, "the append survives a reopen");
    expect.push(Expect::Record(ModelRecord { timestamp_ms: appended[0].timestamp_ms, ..new }));
    check_reads(&log, start, &expect, "reopened");
    log.close();
}

fuzz_target!(|data: &[u8]| run(data));
