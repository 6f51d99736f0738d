//! The basic `Log` contract of the embedded log, consumer group offsets,
//! configuration checks and the single-writer lock.

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use common::*;
use sluice_log::embedded::INDEX_INTERVAL;
use sluice_log::{Checkpoint, EmbeddedLog, Log, LogError, OffsetRange, Record};

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

#[tokio::test(flavor = "multi_thread")]
async fn append_returns_consecutive_offsets_and_reads_back_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), &options(&[("t", 2)], 128 << 20));

    assert_eq!(log.partitions("t").unwrap(), 2);
    assert_eq!(log.offsets("t", 0).await.unwrap(), OffsetRange { start: 0, end: 0 });
    assert!(log.read("t", 0, 0, 10).await.unwrap().is_empty());

    let before = now_ms();
    let mut expected: Vec<Record> = Vec::new();
    for (i, n) in [1usize, 3, 5, 2, 7, 1].into_iter().enumerate() {
        let batch: Vec<Record> = (0..n).map(|j| rec(format!("k{i}-{j}"), format!("value {i}/{j}").repeat(j + 1))).collect();
        let first = log.append("t", 0, batch.clone()).await.unwrap();
        assert_eq!(first, expected.len() as u64, "append #{i} must start right after the previous one");
        expected.extend(batch);
    }
    // A record with an empty key and an empty value is still a record.
    let first = log.append("t", 0, vec![rec("", "")]).await.unwrap();
    assert_eq!(first, expected.len() as u64);
    expected.push(rec("", ""));
    let after = now_ms();
    let n = expected.len() as u64;

    assert_eq!(log.offsets("t", 0).await.unwrap(), OffsetRange { start: 0, end: n });
    // The other partition is untouched.
    assert_eq!(log.offsets("t", 1).await.unwrap(), OffsetRange { start: 0, end: 0 });
    assert!(log.read("t", 1, 0, 100).await.unwrap().is_empty());

    for from in 0..n {
        let got = log.read("t", 0, from, 1000).await.unwrap();
        assert_records(&got, from, &expected[from as usize..]);
        for r in &got {
            assert!(r.timestamp_ms >= before && r.timestamp_ms <= after, "timestamp {} outside [{before}, {after}]", r.timestamp_ms);
        }
        // `max_records` limits the answer.
        for max in [1usize, 2, 3] {
            let got = log.read("t", 0, from, max).await.unwrap();
            let want = (n - from).min(max as u64) as usize;
            assert_records(&got, from, &expected[from as usize..from as usize + want]);
        }
    }
    assert!(log.read("t", 0, 0, 0).await.unwrap().is_empty(), "max_records 0 reads nothing");
    assert!(log.read("t", 0, n, 10).await.unwrap().is_empty(), "read at the end");
    assert!(log.read("t", 0, n + 1, 10).await.unwrap().is_empty(), "read past the end");
    assert!(log.read("t", 0, u64::MAX, 10).await.unwrap().is_empty(), "read far past the end");

    // Unknown topics and partitions are errors, not empty answers.
    assert!(matches!(log.partitions("nope"), Err(LogError::UnknownTopic(_))));
    assert!(matches!(log.read("nope", 0, 0, 1).await, Err(LogError::UnknownTopic(_))));
    assert!(matches!(log.append("t", 2, vec![rec("k", "v")]).await, Err(LogError::UnknownPartition { partition: 2, partitions: 2, .. })));
    assert!(matches!(log.offsets("t", 9).await, Err(LogError::UnknownPartition { .. })));
}

#[tokio::test(flavor = "multi_thread")]
async fn reads_span_many_small_segments() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(&[("t", 1)], 4096);
    let log = open(dir.path(), &opts);
    let mut expected = Vec::new();
    // Batches of varied sizes, so rolls land at different places.
    let mut rng = Rng::new(7);
    while expected.len() < 400 {
        let n = 1 + (rng.next() % 6) as usize;
        let batch: Vec<Record> = (0..n).map(|i| numbered(0, (expected.len() + i) as u64, (rng.next() % 700) as usize)).collect();
        let first = log.append("t", 0, batch.clone()).await.unwrap();
        assert_eq!(first, expected.len() as u64);
        expected.extend(batch);
    }
    let n = expected.len() as u64;
    let segs = segments(dir.path(), "t", 0);
    assert!(segs.len() >= 10, "4 KiB segments must have rolled many times, got {}", segs.len());
    check_segment_bases(&segs, &expected);

    async fn check(log: &EmbeddedLog, expected: &[Record]) {
        let n = expected.len() as u64;
        assert_records(&read_all(log, "t", 0, 0, usize::MAX).await, 0, expected);
        assert_records(&read_all(log, "t", 0, 0, 7).await, 0, expected);
        for from in (0..n).step_by(3) {
            let got = log.read("t", 0, from, 25).await.unwrap();
            let want = (n - from).min(25) as usize;
            assert_records(&got, from, &expected[from as usize..from as usize + want]);
        }
    }
    check(&log, &expected).await;
    assert_eq!(log.offsets("t", 0).await.unwrap(), OffsetRange { start: 0, end: n });

    // Reopen: every sealed segment is read again from disk (lazily indexed).
    drop(log);
    let log = open(dir.path(), &opts);
    assert_eq!(log.offsets("t", 0).await.unwrap(), OffsetRange { start: 0, end: n });
    check(&log, &expected).await;
    let first = log.append("t", 0, vec![numbered(0, n, 10)]).await.unwrap();
    assert_eq!(first, n, "appends continue after a reopen");
    assert_records(&log.read("t", 0, n, 10).await.unwrap(), n, &[numbered(0, n, 10)]);
}

/// Each segment file's name must be the offset of its first frame, and the
/// bases must be consistent with the frame sizes (invariant 1).
fn check_segment_bases(segs: &[(u64, std::path::PathBuf)], expected: &[Record]) {
    assert_eq!(segs[0].0, 0);
    for w in segs.windows(2) {
        let (base, path) = (&w[0].0, &w[0].1);
        let next = w[1].0;
        assert!(next > *base, "segment bases ascend");
        let size: u64 = HEADER_LEN + expected[*base as usize..next as usize].iter().map(frame_len).sum::<u64>();
        assert_eq!(file_len(path), size, "segment {} holds exactly offsets {base}..{next}", path.display());
        let data = std::fs::read(path).unwrap();
        assert_eq!(&data[..8], b"SLUICEL1");
        assert_eq!(u64::from_le_bytes(data[8..16].try_into().unwrap()), *base);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn reads_from_the_middle_of_large_segments_use_the_sparse_index() {
    let dir = tempfile::tempdir().unwrap();
    // Segments of ~1 MiB hold ~16 index intervals each.
    let opts = options(&[("t", 1)], 1 << 20);
    let log = open(dir.path(), &opts);
    let mut expected = Vec::new();
    let mut rng = Rng::new(99);
    while (expected.len() as u64) < 3500 {
        let n = 1 + (rng.next() % 40) as usize;
        let batch: Vec<Record> = (0..n).map(|i| numbered(0, (expected.len() + i) as u64, 200 + (rng.next() % 1800) as usize)).collect();
        assert_eq!(log.append("t", 0, batch.clone()).await.unwrap(), expected.len() as u64);
        expected.extend(batch);
    }
    let n = expected.len() as u64;
    let segs = segments(dir.path(), "t", 0);
    assert!(segs.len() >= 3, "expected several 1 MiB segments, got {}", segs.len());
    let biggest = segs.iter().map(|(_, p)| file_len(p)).max().unwrap();
    assert!(biggest > 4 * INDEX_INTERVAL, "segments must span several index intervals");
    check_segment_bases(&segs, &expected);

    async fn check(log: &EmbeddedLog, expected: &[Record]) {
        let n = expected.len() as u64;
        // Offsets all over every segment, including just around the bases.
        let mut froms: Vec<u64> = (0..n).step_by(61).collect();
        froms.extend([1, n - 1, n / 2, n / 2 + 1]);
        for from in froms {
            for max in [1usize, 13] {
                let got = log.read("t", 0, from, max).await.unwrap();
                let want = (n - from).min(max as u64) as usize;
                assert_records(&got, from, &expected[from as usize..from as usize + want]);
            }
        }
        assert_records(&read_all(log, "t", 0, 0, 997).await, 0, expected);
    }
    check(&log, &expected).await;
    for &(base, _) in &segs[1..] {
        for from in [base - 2, base - 1, base, base + 1] {
            let got = log.read("t", 0, from, 5).await.unwrap();
            assert_records(&got, from, &expected[from as usize..from as usize + 5]);
        }
    }

    // After a reopen the sealed segments are indexed by their first read
    // (from the middle), the active one by recovery.
    drop(log);
    let log = open(dir.path(), &opts);
    assert_eq!(log.offsets("t", 0).await.unwrap(), OffsetRange { start: 0, end: n });
    check(&log, &expected).await;
    // And appends into the recovered active segment keep its index right.
    let mut more = Vec::new();
    for i in 0..300u64 {
        let r = numbered(0, n + i, 1500);
        assert_eq!(log.append("t", 0, vec![r.clone()]).await.unwrap(), n + i);
        more.push(r);
    }
    expected.extend(more);
    check(&log, &expected).await;
    drop(log);
    let log = open(dir.path(), &opts);
    check(&log, &expected).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_records_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), &options(&[("t", 1)], 1 << 20));
    let big = rec("k", vec![0u8; sluice_log::embedded::MAX_RECORD_BYTES]);
    assert!(matches!(log.append("t", 0, vec![rec("a", "b"), big]).await, Err(LogError::RecordTooLarge(_))));
    // Nothing of the refused batch was written.
    assert_eq!(log.offsets("t", 0).await.unwrap().end, 0);
    assert_eq!(log.append("t", 0, vec![rec("a", "b")]).await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn consumer_group_offsets_roundtrip_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(&[("t", 2), ("u", 1)], 1 << 20);
    let log = open(dir.path(), &opts);

    assert_eq!(log.committed("g", "t", 0).await.unwrap(), None, "never committed");
    log.commit(Checkpoint { group: "g", topic: "t", partition: 0, next_offset: 5 }).await.unwrap();
    assert_eq!(log.committed("g", "t", 0).await.unwrap(), Some(5));
    log.commit(Checkpoint { group: "g", topic: "t", partition: 0, next_offset: 42 }).await.unwrap();
    assert_eq!(log.committed("g", "t", 0).await.unwrap(), Some(42), "the last commit wins");
    log.commit(Checkpoint { group: "g", topic: "t", partition: 0, next_offset: 7 }).await.unwrap();
    assert_eq!(log.committed("g", "t", 0).await.unwrap(), Some(7), "a commit may move back (replay)");

    // Groups, partitions and topics are independent.
    assert_eq!(log.committed("g", "t", 1).await.unwrap(), None);
    assert_eq!(log.committed("g", "u", 0).await.unwrap(), None);
    assert_eq!(log.committed("other", "t", 0).await.unwrap(), None);
    log.commit(Checkpoint { group: "other.group_1-x", topic: "t", partition: 1, next_offset: u64::MAX }).await.unwrap();
    log.commit(Checkpoint { group: "g", topic: "u", partition: 0, next_offset: 0 }).await.unwrap();
    assert_eq!(log.committed("other.group_1-x", "t", 1).await.unwrap(), Some(u64::MAX));
    assert_eq!(log.committed("g", "u", 0).await.unwrap(), Some(0));
    assert_eq!(log.committed("g", "t", 0).await.unwrap(), Some(7));

    // Invalid group names are refused by both calls.
    let long = "a".repeat(129);
    for bad in ["", "../x", "..", ".", "a/b", "a b", "ü", "x\0", "a\\b", long.as_str()] {
        assert!(
            matches!(log.commit(Checkpoint { group: bad, topic: "t", partition: 0, next_offset: 1 }).await, Err(LogError::InvalidGroup(_))),
            "commit with group {bad:?} must fail"
        );
        assert!(matches!(log.committed(bad, "t", 0).await, Err(LogError::InvalidGroup(_))), "committed with group {bad:?} must fail");
    }
    // Nothing escaped the partition directory.
    assert!(!dir.path().join("t").join("0").join("x.offset").exists());
    assert!(!dir.path().join("t").join("x.offset").exists());
    let ok128 = "b".repeat(128);
    log.commit(Checkpoint { group: &ok128, topic: "t", partition: 0, next_offset: 3 }).await.unwrap();
    assert!(matches!(log.commit(Checkpoint { group: "g", topic: "t", partition: 2, next_offset: 1 }).await, Err(LogError::UnknownPartition { .. })));
    assert!(matches!(log.commit(Checkpoint { group: "g", topic: "nope", partition: 0, next_offset: 1 }).await, Err(LogError::UnknownTopic(_))));

    drop(log);
    let log = open(dir.path(), &opts);
    assert_eq!(log.committed("g", "t", 0).await.unwrap(), Some(7));
    assert_eq!(log.committed("g", "t", 1).await.unwrap(), None);
    assert_eq!(log.committed("g", "u", 0).await.unwrap(), Some(0));
    assert_eq!(log.committed("other.group_1-x", "t", 1).await.unwrap(), Some(u64::MAX));
    assert_eq!(log.committed(&ok128, "t", 0).await.unwrap(), Some(3));
    assert_eq!(log.committed("other", "t", 0).await.unwrap(), None);
    drop(log);

    // A read-only view sees the committed offsets too.
    let ro = EmbeddedLog::open_read_only(dir.path()).unwrap();
    assert_eq!(ro.committed("g", "t", 0).await.unwrap(), Some(7));
    assert_eq!(ro.committed("other", "t", 0).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn partition_count_cannot_change() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), &options(&[("events", 7)], 1 << 20));
    log.append("events", 3, vec![rec("k", "v")]).await.unwrap();
    drop(log);

    for asked in [13u32, 6, 1] {
        match EmbeddedLog::open(dir.path(), options(&[("events", asked)], 1 << 20)) {
            Err(LogError::Config(msg)) => {
                // Ignore the path (a temp dir name may hold digits).
                let msg = msg.replace(&dir.path().display().to_string(), "<root>");
                let numbers: Vec<u32> = msg.split(|c: char| !c.is_ascii_digit()).filter_map(|w| w.parse().ok()).collect();
                assert!(numbers.contains(&7), "message must name the count on disk (7): {msg}");
                assert!(numbers.contains(&asked), "message must name the count asked for ({asked}): {msg}");
            }
            Err(e) => panic!("expected a Config error, got {e:?}"),
            Ok(_) => panic!("opening with {asked} partitions instead of 7 must fail"),
        }
    }
    // The failed opens changed nothing and released the lock.
    let log = open(dir.path(), &options(&[("events", 7)], 1 << 20));
    assert_eq!(log.partitions("events").unwrap(), 7);
    assert_eq!(log.offsets("events", 3).await.unwrap(), OffsetRange { start: 0, end: 1 });
    let meta = std::fs::read_to_string(dir.path().join("events").join("topic.meta")).unwrap();
    assert_eq!(meta, "partitions=7\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_topic_names_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for bad in ["", "..", "a/b", "../escape"] {
        assert!(matches!(EmbeddedLog::open(dir.path(), options(&[(bad, 1)], 1 << 20)), Err(LogError::Config(_))), "topic {bad:?} must be refused");
    }
    assert!(!dir.path().parent().unwrap().join("escape").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_writer_is_locked_out_but_readers_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(&[("t", 2)], 4096);
    let log = open(dir.path(), &opts);
    let mut expected = Vec::new();
    for i in 0..100u64 {
        let r = numbered(1, i, 100);
        log.append("t", 1, vec![r.clone()]).await.unwrap();
        expected.push(r);
    }
    log.commit(Checkpoint { group: "g", topic: "t", partition: 1, next_offset: 40 }).await.unwrap();

    match EmbeddedLog::open(dir.path(), opts.clone()) {
        Err(LogError::Locked(path)) => assert!(path.contains(&dir.path().display().to_string()), "{path}"),
        Err(e) => panic!("expected Locked, got {e:?}"),
        Ok(_) => panic!("a second writer must not open the log"),
    }
    // The failed open did not disturb the writer.
    assert_eq!(log.append("t", 1, vec![numbered(1, 100, 100)]).await.unwrap(), 100);
    expected.push(numbered(1, 100, 100));

    let ro = EmbeddedLog::open_read_only(dir.path()).unwrap();
    assert_eq!(ro.topics(), vec!["t".to_string()]);
    assert_eq!(ro.partitions("t").unwrap(), 2);
    assert_eq!(ro.offsets("t", 1).await.unwrap(), OffsetRange { start: 0, end: 101 });
    assert_records(&read_all(&ro, "t", 1, 0, 33).await, 0, &expected);
    assert_records(&ro.read("t", 1, 57, 3).await.unwrap(), 57, &expected[57..60]);
    assert_eq!(ro.committed("g", "t", 1).await.unwrap(), Some(40));
    assert!(ro.append("t", 1, vec![rec("k", "v")]).await.is_err(), "a read-only log refuses appends");
    // A second read-only view is fine too.
    let ro2 = EmbeddedLog::open_read_only(dir.path()).unwrap();
    assert_eq!(ro2.offsets("t", 1).await.unwrap().end, 101);
    drop((ro, ro2));

    // Once the writer is gone, another may open.
    log.close();
    let log = open(dir.path(), &opts);
    assert_eq!(log.offsets("t", 1).await.unwrap(), OffsetRange { start: 0, end: 101 });
    assert!(matches!(EmbeddedLog::open(dir.path(), opts.clone()), Err(LogError::Locked(_))));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_only_view_never_writes() {
    // `open_read_only` promises "no lock, no recovery, no writes": it runs
    // beside the writer, so it must not touch group offsets or segments.
    let dir = tempfile::tempdir().unwrap();
    let opts = options(&[("t", 1)], 4096);
    let log = open(dir.path(), &opts);
    for o in 0..100u64 {
        log.append("t", 0, vec![numbered(0, o, 150)]).await.unwrap();
    }
    log.commit(Checkpoint { group: "g", topic: "t", partition: 0, next_offset: 10 }).await.unwrap();
    let segs = segments(dir.path(), "t", 0);
    assert!(segs.len() > 2);

    let ro = EmbeddedLog::open_read_only(dir.path()).unwrap();
    assert!(ro.append("t", 0, vec![rec("k", "v")]).await.is_err(), "append through a read-only view");
    assert!(ro.commit(Checkpoint { group: "g", topic: "t", partition: 0, next_offset: 99 }).await.is_err(), "commit through a read-only view");
    assert!(
        ro.commit(Checkpoint { group: "new", topic: "t", partition: 0, next_offset: 1 }).await.is_err(),
        "commit of a new group through a read-only view"
    );
    let far_future = SystemTime::now() + std::time::Duration::from_secs(365 * 86400);
    assert!(ro.enforce_retention(far_future).is_err(), "retention through a read-only view");

    assert_eq!(segments(dir.path(), "t", 0), segs, "no segment may be deleted by a read-only view");
    assert_eq!(log.committed("g", "t", 0).await.unwrap(), Some(10));
    assert_eq!(log.committed("new", "t", 0).await.unwrap(), None);
    assert_eq!(ro.offsets("t", 0).await.unwrap(), OffsetRange { start: 0, end: 100 });
    assert_eq!(log.offsets("t", 0).await.unwrap(), OffsetRange { start: 0, end: 100 });
    let groups: Vec<_> = std::fs::read_dir(partition_dir(dir.path(), "t", 0).join("groups"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(groups, vec!["g.offset".to_string()]);
}
