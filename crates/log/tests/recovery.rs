//! Crash recovery: torn and corrupt tails of the active segment are cut on
//! open; damage to sealed segments is reported, never skipped. A torn last
//! record was never acknowledged, so the durable-through marker does not
//! cover it: tests that damage the last record first set the marker back
//! to before it (damage to marked records: `durable_marker.rs`).

mod common;

use std::path::Path;

use common::*;
use sluice_log::{EmbeddedLog, Log, LogError, LogOptions, OffsetRange, Record};

const TOPIC: &str = "t";

/// Fill partition 0 of a fresh log with `count` records (small segments so
/// there are sealed ones too), close it, and return what was written.
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

/// Reopen after damage to the last record (or past it) and check that the
/// log holds exactly `kept`, that the last segment was cut to `valid_len`,
/// that the cut was counted, and that appends continue where `kept` ends.
async fn check_recovered(root: &Path, opts: &LogOptions, kept: &[Record], last_seg: &Path, valid_len: u64) {
    let before = opts.metrics.truncated_records.get();
    let log = open(root, opts);
    let cut = opts.metrics.truncated_records.get() - before;
    assert!(cut >= 1, "truncated_records must count the cut tail");
    assert_eq!(file_len(last_seg), valid_len, "the damaged tail must be cut from {}", last_seg.display());
    let n = kept.len() as u64;
    assert_eq!(log.offsets(TOPIC, 0).await.unwrap(), OffsetRange { start: 0, end: n });
    assert_records(&read_all(&log, TOPIC, 0, 0, 1000).await, 0, kept);
    assert!(log.read(TOPIC, 0, n, 10).await.unwrap().is_empty());

    let new: Vec<Record> = (n..n + 3).map(|o| numbered(0, o, 500)).collect();
    assert_eq!(log.append(TOPIC, 0, new.clone()).await.unwrap(), n, "appends continue at the first cut offset");
    let mut all = kept.to_vec();
    all.extend(new);
    assert_records(&read_all(&log, TOPIC, 0, 0, 1000).await, 0, &all);
    drop(log);

    // The repaired log opens cleanly: nothing more to cut.
    let before = opts.metrics.truncated_records.get();
    let log = open(root, opts);
    assert_eq!(opts.metrics.truncated_records.get(), before, "a repaired log has no tail to cut");
    assert_records(&read_all(&log, TOPIC, 0, 0, 1000).await, 0, &all);
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_after_the_last_record_is_cut() {
    for (case, garbage_len) in [1usize, 3, 7, 8, 9, 27, 28, 100, 5000].into_iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let opts = options(&[(TOPIC, 1)], 4096);
        let expected = populate(dir.path(), &opts, 80).await;
        assert!(segments(dir.path(), TOPIC, 0).len() > 1, "the test wants sealed segments too");
        let (_, last) = last_segment(dir.path(), TOPIC, 0);
        let valid_len = file_len(&last);
        append_bytes(&last, &Rng::new(case as u64 + 1).bytes(garbage_len));
        check_recovered(dir.path(), &opts, &expected, &last, valid_len).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plausible_but_torn_frame_after_the_last_record_is_cut() {
    // Garbage that looks like the start of the next frame: a sane length
    // field, then too few bytes.
    let dir = tempfile::tempdir().unwrap();
    let opts = options(&[(TOPIC, 1)], 4096);
    let expected = populate(dir.path(), &opts, 50).await;
    let (_, last) = last_segment(dir.path(), TOPIC, 0);
    let valid_len = file_len(&last);
    let mut torn = Vec::new();
    torn.extend_from_slice(&(20u32 + 10 + 300).to_le_bytes());
    torn.extend_from_slice(&0xDEAD_BEEFu32.to_le_bytes());
    torn.extend_from_slice(&50u64.to_le_bytes());
    torn.extend_from_slice(&[0xAB; 40]);
    append_bytes(&last, &torn);
    check_recovered(dir.path(), &opts, &expected, &last, valid_len).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_copy_of_the_last_frame_after_it_is_cut() {
    // A complete, well-checksummed frame whose offset is wrong (a repeated
    // write) is not a record of the next offset.
    let dir = tempfile::tempdir().unwrap();
    let opts = options(&[(TOPIC, 1)], 4096);
    let expected = populate(dir.path(), &opts, 50).await;
    let (_, last) = last_segment(dir.path(), TOPIC, 0);
    let valid_len = file_len(&last);
    let data = std::fs::read(&last).unwrap();
    let frame = frame_len(expected.last().unwrap()) as usize;
    let copy = data[data.len() - frame..].to_vec();
    append_bytes(&last, &copy);
    check_recovered(dir.path(), &opts, &expected, &last, valid_len).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_last_record_cut_short_is_dropped() {
    let probe = options(&[(TOPIC, 1)], 4096);
    let probe_dir = tempfile::tempdir().unwrap();
    let expected = populate(probe_dir.path(), &probe, 80).await;
    let last_frame = frame_len(expected.last().unwrap());
    // Cut inside the length field, inside the checksum, inside the fixed
    // body, inside the key, inside the value, and one byte short.
    for keep in [1, 3, 4, 7, 8, 12, 27, 30, last_frame / 2, last_frame - 1] {
        let dir = tempfile::tempdir().unwrap();
        let opts = options(&[(TOPIC, 1)], 4096);
        let expected = populate(dir.path(), &opts, 80).await;
        let (_, last) = last_segment(dir.path(), TOPIC, 0);
        let full = file_len(&last);
        let frame_start = full - last_frame;
        // The torn write was never acknowledged, so never marked durable.
        marker_before_last_record(dir.path(), TOPIC, 0, 80, frame_start);
        truncate(&last, frame_start + keep);
        check_recovered(dir.path(), &opts, &expected[..expected.len() - 1], &last, frame_start).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_last_record_with_a_flipped_byte_is_dropped() {
    let probe = options(&[(TOPIC, 1)], 4096);
    let probe_dir = tempfile::tempdir().unwrap();
    let expected = populate(probe_dir.path(), &probe, 80).await;
    let last = expected.last().unwrap();
    let last_frame = frame_len(last);
    let value_start = last_frame - last.value.len() as u64;
    // In the value (first, middle, last byte), in the key, in the stored
    // offset and in the checksum.
    let key_start = FRAME_OVERHEAD;
    for at in [value_start, value_start + last.value.len() as u64 / 2, last_frame - 1, key_start, 8, 5] {
        let dir = tempfile::tempdir().unwrap();
        let opts = options(&[(TOPIC, 1)], 4096);
        let expected = populate(dir.path(), &opts, 80).await;
        let (_, seg) = last_segment(dir.path(), TOPIC, 0);
        let frame_start = file_len(&seg) - last_frame;
        marker_before_last_record(dir.path(), TOPIC, 0, 80, frame_start);
        flip_byte(&seg, frame_start + at);
        check_recovered(dir.path(), &opts, &expected[..expected.len() - 1], &seg, frame_start).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_torn_tail_in_a_single_segment_log_is_cut() {
    // The same with only one segment, and a partition beside it untouched.
    let dir = tempfile::tempdir().unwrap();
    let opts = options(&[(TOPIC, 2)], 1 << 20);
    let log = open(dir.path(), &opts);
    let expected: Vec<Record> = (0..20).map(|o| numbered(0, o, 100)).collect();
    let other: Vec<Record> = (0..5).map(|o| numbered(1, o, 10)).collect();
    assert_eq!(log.append(TOPIC, 0, expected.clone()).await.unwrap(), 0);
    assert_eq!(log.append(TOPIC, 1, other.clone()).await.unwrap(), 0);
    drop(log);
    let (_, seg) = last_segment(dir.path(), TOPIC, 0);
    let frame_start = file_len(&seg) - frame_len(&expected[19]);
    marker_before_last_record(dir.path(), TOPIC, 0, 20, frame_start);
    truncate(&seg, frame_start + 20);
    check_recovered(dir.path(), &opts, &expected[..19], &seg, frame_start).await;
    let log = open(dir.path(), &opts);
    assert_records(&read_all(&log, TOPIC, 1, 0, 100).await, 0, &other);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_only_view_stops_at_a_torn_tail_without_repairing_it() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(&[(TOPIC, 1)], 4096);
    let expected = populate(dir.path(), &opts, 60).await;
    let (_, last) = last_segment(dir.path(), TOPIC, 0);
    let len = file_len(&last);
    append_bytes(&last, &[0xFF; 33]);
    let ro = EmbeddedLog::open_read_only(dir.path()).unwrap();
    assert_eq!(ro.offsets(TOPIC, 0).await.unwrap(), OffsetRange { start: 0, end: 60 });
    assert_records(&read_all(&ro, TOPIC, 0, 0, 1000).await, 0, &expected);
    assert_eq!(file_len(&last), len + 33, "a read-only open must not write");
    drop(ro);
    check_recovered(dir.path(), &opts, &expected, &last, len).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_segment_with_a_partial_header_reopens_cleanly() {
    // The very first segment of a partition, cut at every length short of
    // a full header (crash right after creating the file).
    for keep in [0u64, 1, 5, 8, 15] {
        let dir = tempfile::tempdir().unwrap();
        let opts = options(&[(TOPIC, 1)], 4096);
        open(dir.path(), &opts).close();
        let segs = segments(dir.path(), TOPIC, 0);
        assert_eq!(segs.len(), 1);
        truncate(&segs[0].1, keep);

        let log = open(dir.path(), &opts);
        assert_eq!(log.offsets(TOPIC, 0).await.unwrap(), OffsetRange { start: 0, end: 0 });
        assert!(log.read(TOPIC, 0, 0, 10).await.unwrap().is_empty());
        assert_eq!(file_len(&segs[0].1), HEADER_LEN, "the header is rewritten");
        let recs: Vec<Record> = (0..4).map(|o| numbered(0, o, 30)).collect();
        assert_eq!(log.append(TOPIC, 0, recs.clone()).await.unwrap(), 0);
        drop(log);
        let log = open(dir.path(), &opts);
        assert_records(&read_all(&log, TOPIC, 0, 0, 100).await, 0, &recs);
    }

    // A freshly rolled segment (base = the old end) with a partial header,
    // after sealed segments full of records.
    for keep in [0u64, 9, 15] {
        let dir = tempfile::tempdir().unwrap();
        let opts = options(&[(TOPIC, 1)], 4096);
        let mut expected = populate(dir.path(), &opts, 90).await;
        let n = expected.len() as u64;
        let before = segments(dir.path(), TOPIC, 0);
        let new_seg = partition_dir(dir.path(), TOPIC, 0).join(format!("{n:020}.seg"));
        let mut header = b"SLUICEL1".to_vec();
        header.extend_from_slice(&n.to_le_bytes());
        std::fs::write(&new_seg, &header[..keep as usize]).unwrap();

        let log = open(dir.path(), &opts);
        assert_eq!(log.offsets(TOPIC, 0).await.unwrap(), OffsetRange { start: 0, end: n });
        assert_records(&read_all(&log, TOPIC, 0, 0, 1000).await, 0, &expected);
        assert_eq!(std::fs::read(&new_seg).unwrap(), header, "the header is rewritten");
        let more: Vec<Record> = (n..n + 5).map(|o| numbered(0, o, 40)).collect();
        assert_eq!(log.append(TOPIC, 0, more.clone()).await.unwrap(), n);
        expected.extend(more);
        assert_records(&read_all(&log, TOPIC, 0, 0, 7).await, 0, &expected);
        // The older segments were not touched.
        for (_, p) in &before {
            assert!(p.exists());
        }
        assert_eq!(file_len(&new_seg), HEADER_LEN + expected[n as usize..].iter().map(frame_len).sum::<u64>());
        drop(log);
        let log = open(dir.path(), &opts);
        assert_records(&read_all(&log, TOPIC, 0, 0, 1000).await, 0, &expected);
    }
}

/// Position of frame `k` (0-based) of a segment whose records are `recs`.
fn frame_position(recs: &[Record], k: usize) -> u64 {
    HEADER_LEN + recs[..k].iter().map(frame_len).sum::<u64>()
}

fn expect_corrupt(result: Result<Vec<sluice_log::StoredRecord>, LogError>, what: &str) {
    match result {
        Err(LogError::Corrupt { .. }) => {}
        Err(e) => panic!("{what}: expected Corrupt, got {e:?}"),
        Ok(recs) => {
            panic!("{what}: expected Corrupt, got {} records at offsets {:?}", recs.len(), recs.iter().map(|r| r.offset).take(20).collect::<Vec<_>>())
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn corruption_in_a_sealed_segment_is_reported_not_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(&[(TOPIC, 1)], 4096);
    let expected = populate(dir.path(), &opts, 150).await;
    let segs = segments(dir.path(), TOPIC, 0);
    assert!(segs.len() >= 4, "want several sealed segments, got {}", segs.len());
    // Damage the value of a record in the middle of the second segment.
    let (base, ref path) = segs[1];
    let next = segs[2].0;
    let k = ((next - base) / 2) as usize;
    let bad = base + k as u64;
    let recs = &expected[base as usize..next as usize];
    flip_byte(path, frame_position(recs, k) + frame_len(&recs[k]) - 3);

    let before = opts.metrics.truncated_records.get();
    let log = open(dir.path(), &opts);
    assert_eq!(opts.metrics.truncated_records.get(), before, "a sealed segment is not 'recovered'");
    assert_eq!(log.offsets(TOPIC, 0).await.unwrap(), OffsetRange { start: 0, end: 150 });
    // Reading into or through the damaged segment fails...
    expect_corrupt(log.read(TOPIC, 0, bad, 10).await, "read at the damaged offset");
    expect_corrupt(log.read(TOPIC, 0, bad, 10).await, "second read at the damaged offset");
    expect_corrupt(log.read(TOPIC, 0, base, 1000).await, "read across the damaged offset");
    expect_corrupt(log.read(TOPIC, 0, 0, 1000).await, "read of everything");
    // ...reads that stay clear of it work, and so do appends.
    assert_records(&log.read(TOPIC, 0, 0, base as usize).await.unwrap(), 0, &expected[..base as usize]);
    assert_records(&read_all(&log, TOPIC, 0, next, 1000).await, next, &expected[next as usize..]);
    assert_eq!(log.append(TOPIC, 0, vec![numbered(0, 150, 10)]).await.unwrap(), 150);
    // The segment was left as it is (evidence), not truncated.
    assert_eq!(file_len(path), frame_position(recs, recs.len()));
}

#[tokio::test(flavor = "multi_thread")]
async fn corruption_in_an_already_indexed_sealed_segment_is_reported() {
    // The segment was read (and indexed) before it went bad on disk.
    let dir = tempfile::tempdir().unwrap();
    let opts = options(&[(TOPIC, 1)], 4096);
    let log = open(dir.path(), &opts);
    let expected: Vec<Record> = (0..120).map(|o| numbered(0, o, 120)).collect();
    for r in &expected {
        log.append(TOPIC, 0, vec![r.clone()]).await.unwrap();
    }
    assert_records(&read_all(&log, TOPIC, 0, 0, 1000).await, 0, &expected);
    let segs = segments(dir.path(), TOPIC, 0);
    let (base, ref path) = segs[0];
    let next = segs[1].0;
    let recs = &expected[base as usize..next as usize];
    let k = recs.len() / 2;
    flip_byte(path, frame_position(recs, k) + FRAME_OVERHEAD + 2);
    expect_corrupt(log.read(TOPIC, 0, k as u64, 5).await, "read at the damaged offset");
    expect_corrupt(log.read(TOPIC, 0, 0, 1000).await, "read through the damaged offset");
    assert_records(&read_all(&log, TOPIC, 0, next, 1000).await, next, &expected[next as usize..]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sealed_segment_cut_short_is_reported() {
    for mid_frame in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let opts = options(&[(TOPIC, 1)], 4096);
        let expected = populate(dir.path(), &opts, 150).await;
        let segs = segments(dir.path(), TOPIC, 0);
        let (base, ref path) = segs[1];
        let next = segs[2].0;
        let recs = &expected[base as usize..next as usize];
        // Lose the last two records of the segment, at a frame boundary
        // or in the middle of a frame.
        let keep = frame_position(recs, recs.len() - 2) + if mid_frame { 11 } else { 0 };
        truncate(path, keep);

        let log = open(dir.path(), &opts);
        assert_eq!(log.offsets(TOPIC, 0).await.unwrap(), OffsetRange { start: 0, end: 150 });
        expect_corrupt(log.read(TOPIC, 0, next - 1, 10).await, "read of a lost offset");
        expect_corrupt(log.read(TOPIC, 0, base, 1000).await, "read across the lost offsets");
        expect_corrupt(log.read(TOPIC, 0, 0, 1000).await, "read of everything");
        assert_records(&read_all(&log, TOPIC, 0, next, 1000).await, next, &expected[next as usize..]);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_sealed_segment_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(&[(TOPIC, 1)], 4096);
    let expected = populate(dir.path(), &opts, 150).await;
    let segs = segments(dir.path(), TOPIC, 0);
    let (gone, ref path) = segs[2];
    let after = segs[3].0;
    std::fs::remove_file(path).unwrap();
    let log = open(dir.path(), &opts);
    expect_corrupt(log.read(TOPIC, 0, gone, 10).await, "read of an offset in the missing segment");
    expect_corrupt(log.read(TOPIC, 0, 0, 1000).await, "read across the missing segment");
    assert_records(&read_all(&log, TOPIC, 0, after, 1000).await, after, &expected[after as usize..]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_damaged_full_header_in_front_of_records_refuses_to_open() {
    // The header is fsynced before any record goes in, so a bad header with
    // records behind it is corruption: opening must fail, not wipe them.
    let dir = tempfile::tempdir().unwrap();
    let opts = options(&[(TOPIC, 1)], 1 << 20);
    let log = open(dir.path(), &opts);
    let recs: Vec<Record> = (0..3).map(|o| numbered(0, o, 50)).collect();
    log.append(TOPIC, 0, recs).await.unwrap();
    log.close();
    let (_, path) = last_segment(dir.path(), TOPIC, 0);
    let len = file_len(&path);
    flip_byte(&path, 2);
    match EmbeddedLog::open(dir.path(), opts.clone()) {
        Err(LogError::Corrupt { problem, .. }) => assert!(problem.contains("header"), "{problem}"),
        Err(other) => panic!("expected Corrupt, got {other}"),
        Ok(_) => panic!("a log with a damaged header in front of records opened"),
    }
    assert_eq!(file_len(&path), len, "nothing was truncated");
}
