//! The durable-through marker (module docs of `sluice_log::embedded`,
//! invariants 3 and 7): damage to fsynced, acknowledged records of the
//! active segment is corruption, refused with the file left as it is, never
//! a torn tail to cut; a real torn tail (past the marker) is still cut; a
//! missing or corrupt marker falls back to the older recovery.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use sluice_log::{EmbeddedLog, Log, LogError, LogOptions, OffsetRange, Record};

const TOPIC: &str = "t";

/// Append `count` records to partition 0 of a fresh log (batches of 1-3,
/// fsync on), close it, and return them.
async fn populate(root: &Path, opts: &LogOptions, count: u64) -> Vec<Record> {
    let log = open(root, opts);
    let mut expected = Vec::new();
    let mut i = 0;
    while i < count {
        let n = (count - i).min(1 + i % 3);
        let batch: Vec<Record> = (i..i + n).map(|o| numbered(0, o, 60 + (o as usize * 37) % 150)).collect();
        assert_eq!(log.append(TOPIC, 0, batch.clone()).await.unwrap(), i);
        expected.extend(batch);
        i += n;
    }
    log.close();
    expected
}

/// Byte position of the frame of `offset` in the segment starting at
/// `base`, whose records are `all[base..]`.
fn frame_position(all: &[Record], base: u64, offset: u64) -> u64 {
    HEADER_LEN + all[base as usize..offset as usize].iter().map(frame_len).sum::<u64>()
}

fn flip_bit(path: &Path, position: u64, bit: u8) {
    let mut data = std::fs::read(path).unwrap();
    data[position as usize] ^= 1 << bit;
    std::fs::write(path, data).unwrap();
}

fn read_marker(root: &Path) -> String {
    std::fs::read_to_string(marker_path(root, TOPIC, 0)).unwrap()
}

/// Opening must fail with `Corrupt` naming `segment`, byte `position` and
/// `offset`; returns the problem text.
#[track_caller]
fn expect_refused(root: &Path, opts: &LogOptions, segment: &Path, position: u64, offset: u64) -> String {
    match EmbeddedLog::open(root, opts.clone()) {
        Err(LogError::Corrupt { path, position: at, problem }) => {
            assert_eq!(PathBuf::from(&path), segment, "the error names the damaged segment: {problem}");
            assert_eq!(at, position, "the error names the bad frame's byte position: {problem}");
            assert!(problem.contains(&format!("offset {offset}")), "the error names offset {offset}: {problem}");
            problem
        }
        Err(e) => panic!("expected Corrupt, got {e}"),
        Ok(_) => panic!("a log with damaged acknowledged records opened"),
    }
}

/// Reads from 0 to the end give exactly `expected`, and appends continue.
async fn check_intact(root: &Path, opts: &LogOptions, expected: &[Record]) {
    let log = open(root, opts);
    let n = expected.len() as u64;
    assert_eq!(log.offsets(TOPIC, 0).await.unwrap(), OffsetRange { start: 0, end: n });
    assert_records(&read_all(&log, TOPIC, 0, 0, 1000).await, 0, expected);
    assert_eq!(log.append(TOPIC, 0, vec![numbered(0, n, 20)]).await.unwrap(), n);
}

/// Append throughput with fsync on (not a pass/fail check: it prints).
/// `cargo test --release -p sluice-log --test durable_marker -- --ignored --nocapture append_throughput`
#[tokio::test(flavor = "multi_thread")]
#[ignore]
async fn append_throughput() {
    let seconds: u64 = std::env::var("SLUICE_BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let dir = tempfile::Builder::new()
        .prefix("sluice-bench-")
        .tempdir_in(std::env::var("SLUICE_BENCH_DIR").unwrap_or_else(|_| std::env::temp_dir().display().to_string()))
        .unwrap();
    let opts = options(&[("t", 8)], 16 << 20);
    let log = Arc::new(open(dir.path(), &opts));
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for w in 0..64u32 {
        let (log, done) = (log.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let batch: Vec<Record> = (0..10).map(|i| rec(format!("src/{w}-{i}"), vec![b'x'; 300])).collect();
            while Instant::now() < deadline {
                log.append("t", w % 8, batch.clone()).await.unwrap();
                done.fetch_add(batch.len() as u64, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let n = done.load(Ordering::Relaxed);
    println!(
        "append_throughput: {n} records in {seconds} s = {:.0} records/s, {} group commits",
        n as f64 / seconds as f64,
        opts.metrics.group_commits.get()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flipped_bit_in_the_middle_of_the_active_segment_keeps_every_acknowledged_record() {
    // One bit of a frame in the middle of the active segment, anywhere in
    // the frame: the length, the checksum, the stored offset, the key, the
    // value. One big segment, and small ones (sealed segments before it).
    for segment_bytes in [1u64 << 20, 4096] {
        for at in ["length", "length-high", "checksum", "offset", "key", "value"] {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path();
            let opts = options(&[(TOPIC, 1)], segment_bytes);
            let expected = populate(root, &opts, 120).await;
            let (base, seg) = last_segment(root, TOPIC, 0);
            let n = expected.len() as u64;
            assert!(n - base >= 10, "the active segment holds {} records; the test wants more", n - base);
            let k = base + (n - base) / 2;
            let frame = frame_position(&expected, base, k);
            let rec = &expected[k as usize];
            let (pos, bit) = match at {
                "length" => (frame, 0),
                "length-high" => (frame + 3, 7),
                "checksum" => (frame + 5, 3),
                "offset" => (frame + 8, 1),
                "key" => (frame + FRAME_OVERHEAD + 1, 2),
                _ => (frame + frame_len(rec) - rec.value.len() as u64 / 2, 5),
            };
            flip_bit(&seg, pos, bit);
            let damaged = std::fs::read(&seg).unwrap();
            let all_files = segments(root, TOPIC, 0);

            // Refused, twice (nothing was half-repaired), the file untouched.
            let problem = expect_refused(root, &opts, &seg, frame, k);
            assert!(problem.contains("not a torn tail"), "{problem}");
            expect_refused(root, &opts, &seg, frame, k);
            assert_eq!(std::fs::read(&seg).unwrap(), damaged, "{at}: the damaged segment must be left as it is");
            assert_eq!(segments(root, TOPIC, 0), all_files, "{at}: no segment added or removed");

            // Read-only: everything before the damage reads, a read that
            // reaches it fails as Corrupt (it does not end quietly), and the
            // partition's end is still the acknowledged end.
            let ro = EmbeddedLog::open_read_only(root).unwrap();
            assert_eq!(ro.offsets(TOPIC, 0).await.unwrap(), OffsetRange { start: 0, end: n }, "{at}");
            assert_records(&ro.read(TOPIC, 0, 0, k as usize).await.unwrap(), 0, &expected[..k as usize]);
            assert!(matches!(ro.read(TOPIC, 0, k, 10).await, Err(LogError::Corrupt { .. })), "{at}: read at the damage");
            assert!(matches!(ro.read(TOPIC, 0, k + 1, 10).await, Err(LogError::Corrupt { .. })), "{at}: read past the damage");
            drop(ro);
            assert_eq!(std::fs::read(&seg).unwrap(), damaged, "{at}: a read-only open must not write");
        }
    }
}

/// A read that reaches damage returns the good records it read before it;
/// the next read, starting at the damage, fails as `Corrupt` naming its
/// byte position (`sluice log tail --from N` just before the damage prints
/// those records, then the error).
#[tokio::test(flavor = "multi_thread")]
async fn a_read_reaching_damage_returns_the_records_before_it_then_the_next_read_fails() {
    // In the middle of one big active segment; and at the first record of an
    // active segment, read from the sealed segment before it.
    for (segment_bytes, middle) in [(1u64 << 20, true), (4096, false)] {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let opts = options(&[(TOPIC, 1)], segment_bytes);
        let expected = populate(root, &opts, 120).await;
        let (base, seg) = last_segment(root, TOPIC, 0);
        let n = expected.len() as u64;
        assert!(base >= 5 || middle, "a sealed segment precedes the active one");
        let k = if middle { base + (n - base) / 2 } else { base };
        let frame = frame_position(&expected, base, k);
        flip_bit(&seg, frame + 5, 3); // the checksum of offset k

        // The read-only view (what `sluice log tail` opens).
        let ro = EmbeddedLog::open_read_only(root).unwrap();
        for from in [k - 5, k - 1] {
            let got = ro.read(TOPIC, 0, from, 100).await.unwrap();
            assert_records(&got, from, &expected[from as usize..k as usize]);
        }
        assert_records(&ro.read(TOPIC, 0, k - 5, 3).await.unwrap(), k - 5, &expected[k as usize - 5..k as usize - 2]);
        for from in [k, k + 1] {
            match ro.read(TOPIC, 0, from, 100).await {
                Err(LogError::Corrupt { path, position, problem }) => {
                    assert_eq!(PathBuf::from(&path), seg, "{problem}");
                    assert_eq!(position, frame, "the bad frame's byte position: {problem}");
                    assert!(problem.contains(&format!("offset {k}")), "{problem}");
                }
                other => panic!("read from {from} (damage at {k}): expected Corrupt, got {other:?}"),
            }
        }
        drop(ro);

        // A running writer's log whose active segment is damaged under it.
        let dir2 = tempfile::tempdir().unwrap();
        let log = open(dir2.path(), &opts);
        for (i, r) in expected.iter().enumerate() {
            assert_eq!(log.append(TOPIC, 0, vec![r.clone()]).await.unwrap(), i as u64);
        }
        let (base, seg) = last_segment(dir2.path(), TOPIC, 0);
        assert!(base >= 5 || middle, "a sealed segment precedes the active one");
        let k = if middle { base + (n - base) / 2 } else { base };
        let frame = frame_position(&expected, base, k);
        flip_bit(&seg, frame + 5, 3);
        assert_records(&log.read(TOPIC, 0, k - 5, 100).await.unwrap(), k - 5, &expected[k as usize - 5..k as usize]);
        assert!(matches!(log.read(TOPIC, 0, k, 100).await, Err(LogError::Corrupt { position, .. }) if position == frame));
        drop(log);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_the_marker_is_the_operators_way_to_accept_the_loss() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let opts = options(&[(TOPIC, 1)], 1 << 20);
    let expected = populate(root, &opts, 60).await;
    let (_, seg) = last_segment(root, TOPIC, 0);
    let frame = frame_position(&expected, 0, 30);
    flip_bit(&seg, frame + FRAME_OVERHEAD + 2, 4);
    expect_refused(root, &opts, &seg, frame, 30);
    std::fs::remove_file(marker_path(root, TOPIC, 0)).unwrap();
    let before = opts.metrics.truncated_records.get();
    let log = open(root, &opts);
    assert_eq!(opts.metrics.truncated_records.get() - before, 30, "the cut is counted");
    assert_eq!(file_len(&seg), frame);
    assert_records(&read_all(&log, TOPIC, 0, 0, 1000).await, 0, &expected[..30]);
    assert_eq!(log.append(TOPIC, 0, vec![numbered(0, 30, 10)]).await.unwrap(), 30);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_segment_cut_short_before_the_durable_position_refuses_to_open() {
    // The file system lost the end of the active segment (at a frame
    // boundary, or inside a frame): those records were acknowledged.
    for inside in [0u64, 13] {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let opts = options(&[(TOPIC, 1)], 1 << 20);
        let expected = populate(root, &opts, 40).await;
        let (_, seg) = last_segment(root, TOPIC, 0);
        let frame = frame_position(&expected, 0, 25);
        truncate(&seg, frame + inside);
        expect_refused(root, &opts, &seg, frame, 25);
        assert_eq!(file_len(&seg), frame + inside, "nothing was cut");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_torn_tail_after_the_durable_position_is_still_cut() {
    // Garbage after the last frame (the marker covers every record), and a
    // last frame cut short or flipped (a crash during a write the marker
    // does not cover): cut, logged, counted; appends continue; the next
    // open has nothing to cut.
    for case in ["garbage", "short", "flipped"] {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let opts = options(&[(TOPIC, 1)], 4096);
        let expected = populate(root, &opts, 90).await;
        let n = expected.len() as u64;
        let (base, seg) = last_segment(root, TOPIC, 0);
        let full = file_len(&seg);
        assert_eq!(read_marker(root), marker_line(base, n, full), "close marks everything");
        let last_frame = frame_position(&expected, base, n - 1);
        let kept = match case {
            "garbage" => {
                append_bytes(&seg, &Rng::new(7).bytes(301));
                n
            }
            "short" => {
                marker_before_last_record(root, TOPIC, 0, n, last_frame);
                truncate(&seg, full - 5);
                n - 1
            }
            _ => {
                marker_before_last_record(root, TOPIC, 0, n, last_frame);
                flip_bit(&seg, full - 2, 0);
                n - 1
            }
        };
        let before = opts.metrics.truncated_records.get();
        let log = open(root, &opts);
        assert!(opts.metrics.truncated_records.get() > before, "{case}: the cut is counted");
        let valid = if kept == n { full } else { last_frame };
        assert_eq!(file_len(&seg), valid, "{case}: cut back to the last valid frame");
        assert_eq!(read_marker(root), marker_line(base, kept, valid), "{case}: what recovery kept is marked");
        assert_records(&read_all(&log, TOPIC, 0, 0, 1000).await, 0, &expected[..kept as usize]);
        assert_eq!(log.append(TOPIC, 0, vec![numbered(0, kept, 10)]).await.unwrap(), kept, "{case}");
        drop(log);
        let before = opts.metrics.truncated_records.get();
        let log = open(root, &opts);
        assert_eq!(opts.metrics.truncated_records.get(), before, "{case}: nothing more to cut");
        assert_eq!(log.offsets(TOPIC, 0).await.unwrap().end, kept + 1);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lagging_marker_protects_exactly_what_it_names() {
    // The marker covers offsets before 40 (a crash before a newer marker
    // write): damage to offset 39 is refused, damage to 40 is taken for a
    // torn tail (the documented residual window) and cut.
    for (bad, refused) in [(39u64, true), (40, false), (55, false)] {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let opts = options(&[(TOPIC, 1)], 1 << 20);
        let expected = populate(root, &opts, 60).await;
        let (_, seg) = last_segment(root, TOPIC, 0);
        set_marker(root, TOPIC, 0, 0, 40, frame_position(&expected, 0, 40));
        let frame = frame_position(&expected, 0, bad);
        flip_bit(&seg, frame + 6, 6);
        if refused {
            expect_refused(root, &opts, &seg, frame, bad);
        } else {
            let log = open(root, &opts);
            assert_eq!(file_len(&seg), frame, "cut at the bad frame past the marker");
            assert_records(&read_all(&log, TOPIC, 0, 0, 1000).await, 0, &expected[..bad as usize]);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_log_without_a_marker_opens_as_before_and_gets_one() {
    // A data directory from before the marker existed: clean, or with a
    // flip in the middle of its active segment (nothing says those records
    // were durable: the older recovery cuts there).
    for flip in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let opts = options(&[(TOPIC, 1)], 1 << 20);
        let expected = populate(root, &opts, 50).await;
        std::fs::remove_file(marker_path(root, TOPIC, 0)).unwrap();
        let (_, seg) = last_segment(root, TOPIC, 0);
        let kept = if flip {
            flip_bit(&seg, frame_position(&expected, 0, 20) + 9, 0);
            20
        } else {
            50
        };
        let log = open(root, &opts);
        assert_records(&read_all(&log, TOPIC, 0, 0, 1000).await, 0, &expected[..kept]);
        let end = frame_position(&expected, 0, kept as u64);
        assert_eq!(file_len(&seg), end);
        assert_eq!(read_marker(root), marker_line(0, kept as u64, end), "the reopened log is marked");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_marker_does_not_brick_the_log() {
    let bad_markers: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("garbage", Rng::new(3).bytes(64)),
        ("torn", marker_line(0, 50, 1000).as_bytes()[..20].to_vec()),
        ("no newline", marker_line(0, 50, 1000).trim_end().as_bytes().to_vec()),
        ("checksum", marker_line(0, 50, 1000).replace("end=50", "end=51").into_bytes()),
        ("inconsistent", marker_line(0, 50, 3).into_bytes()),
        ("not utf-8", vec![0xFF, 0xFE, b'\n']),
    ];
    for (case, bytes) in bad_markers {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let opts = options(&[(TOPIC, 1)], 1 << 20);
        let expected = populate(root, &opts, 50).await;
        let (_, seg) = last_segment(root, TOPIC, 0);
        let len = file_len(&seg);
        std::fs::write(marker_path(root, TOPIC, 0), &bytes).unwrap();
        // Intact records: opens, reads everything, marker rewritten.
        check_intact(root, &opts, &expected).await;
        assert!(read_marker(root).starts_with("segment=0 end=51 "), "{case}: a good marker replaces it: {}", read_marker(root));
        // With a torn tail as well: still opens, and the tail is cut.
        truncate(&seg, len);
        std::fs::write(marker_path(root, TOPIC, 0), &bytes).unwrap();
        append_bytes(&seg, &[0xAB; 17]);
        check_intact(root, &opts, &expected).await;
        assert_eq!(read_marker(root), marker_line(0, 51, len + frame_len(&numbered(0, 50, 20))), "{case}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_active_segment_named_by_the_marker_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let opts = options(&[(TOPIC, 1)], 4096);
    populate(root, &opts, 100).await;
    let segs = segments(root, TOPIC, 0);
    let (base, seg) = segs.last().unwrap().clone();
    let sealed = std::fs::read(&segs[segs.len() - 2].1).unwrap();
    std::fs::remove_file(&seg).unwrap();
    match EmbeddedLog::open(root, opts.clone()) {
        Err(LogError::Corrupt { path, problem, .. }) => {
            assert_eq!(PathBuf::from(path), seg, "{problem}");
            assert!(problem.contains("missing"), "{problem}");
        }
        Err(e) => panic!("expected Corrupt, got {e}"),
        Ok(_) => panic!("opened without the active segment, whose records were acknowledged"),
    }
    assert_eq!(segments(root, TOPIC, 0), segs[..segs.len() - 1].to_vec(), "nothing created or deleted");
    assert_eq!(std::fs::read(&segs[segs.len() - 2].1).unwrap(), sealed, "the segment before it was not touched");

    // A freshly rolled segment that held no records: nothing is lost.
    set_marker(root, TOPIC, 0, base, base, HEADER_LEN);
    let log = open(root, &opts);
    assert_eq!(log.offsets(TOPIC, 0).await.unwrap().end, base);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flip_in_a_sealed_segment_is_reported_and_the_file_kept() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let opts = options(&[(TOPIC, 1)], 4096);
    let expected = populate(root, &opts, 150).await;
    let segs = segments(root, TOPIC, 0);
    assert!(segs.len() >= 3);
    let (base, ref path) = segs[1];
    let next = segs[2].0;
    let k = base + (next - base) / 2;
    flip_bit(path, frame_position(&expected, base, k) + 1, 2);
    let damaged = std::fs::read(path).unwrap();
    let before = opts.metrics.truncated_records.get();
    let log = open(root, &opts);
    assert_eq!(opts.metrics.truncated_records.get(), before, "nothing cut");
    assert_eq!(log.offsets(TOPIC, 0).await.unwrap(), OffsetRange { start: 0, end: 150 });
    assert!(matches!(log.read(TOPIC, 0, k, 5).await, Err(LogError::Corrupt { .. })), "read at the damage");
    assert!(matches!(log.read(TOPIC, 0, base, 500).await, Err(LogError::Corrupt { .. })), "read through the damage");
    assert_records(&log.read(TOPIC, 0, 0, base as usize).await.unwrap(), 0, &expected[..base as usize]);
    assert_records(&read_all(&log, TOPIC, 0, next, 1000).await, next, &expected[next as usize..]);
    assert_eq!(log.append(TOPIC, 0, vec![numbered(0, 150, 10)]).await.unwrap(), 150);
    drop(log);
    assert_eq!(std::fs::read(path).unwrap(), damaged, "the sealed segment is left as it is");
    let log = open(root, &opts);
    assert_eq!(log.offsets(TOPIC, 0).await.unwrap().end, 151);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_writer_marks_what_it_fsynced() {
    // At close; after a roll the marker names the new segment; with fsync
    // off no marker is written (nothing is known durable).
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let opts = options(&[(TOPIC, 1)], 4096);
    let expected = populate(root, &opts, 70).await;
    let (base, seg) = last_segment(root, TOPIC, 0);
    assert!(base > 0, "the test wants a roll");
    assert_eq!(read_marker(root), marker_line(base, expected.len() as u64, file_len(&seg)));

    let dir = tempfile::tempdir().unwrap();
    let opts = LogOptions { fsync: false, ..options(&[(TOPIC, 1)], 4096) };
    populate(dir.path(), &opts, 20).await;
    assert!(!marker_path(dir.path(), TOPIC, 0).exists(), "no marker without fsync");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_writer_marks_what_it_fsynced_without_a_close() {
    // Appends that stop: the marker still catches up (within about
    // MARKER_INTERVAL; the deadline here is only against hanging), so a
    // crash while idle leaves every acknowledged record covered.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let opts = options(&[(TOPIC, 1)], 1 << 20);
    let log = open(root, &opts);
    let recs: Vec<Record> = (0..10).map(|o| numbered(0, o, 40)).collect();
    log.append(TOPIC, 0, recs.clone()).await.unwrap();
    let (_, seg) = last_segment(root, TOPIC, 0);
    let want = marker_line(0, 10, file_len(&seg));
    let deadline = Instant::now() + sluice_log::embedded::MARKER_INTERVAL * 30;
    while read_marker(root) != want {
        assert!(Instant::now() < deadline, "the marker never caught up: {:?}", read_marker(root));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::mem::forget(log); // no close: the marker above came from the idle writer
}
