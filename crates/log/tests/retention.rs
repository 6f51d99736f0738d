//! Retention deletes whole sealed segments, oldest first; the active
//! segment stays and reads of deleted offsets are refused.

mod common;

use std::fs::File;
use std::path::Path;
use std::time::{Duration, SystemTime};

use common::*;
use sluice_log::{Checkpoint, Log, LogError, OffsetRange, Record};

const TOPIC: &str = "t";
const RETENTION: Duration = Duration::from_secs(3600);

fn set_mtime(path: &Path, t: SystemTime) {
    File::options().write(true).open(path).unwrap().set_modified(t).unwrap();
}

fn expect_out_of_range(result: Result<Vec<sluice_log::StoredRecord>, LogError>, requested: u64, start: u64) {
    match result {
        Err(LogError::OffsetOutOfRange { requested: r, start: s, partition: 0, .. }) => {
            assert_eq!((r, s), (requested, start));
        }
        Err(e) => panic!("reading {requested}: expected OffsetOutOfRange, got {e:?}"),
        Ok(recs) => panic!("reading {requested}: expected OffsetOutOfRange, got {} records", recs.len()),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_deletes_whole_sealed_segments_and_keeps_the_active_one() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(&[(TOPIC, 2)], 4096);
    assert_eq!(opts.retention, RETENTION);
    let log = open(dir.path(), &opts);
    let mut expected: Vec<Record> = Vec::new();
    for o in 0..200u64 {
        let r = numbered(0, o, 150);
        assert_eq!(log.append(TOPIC, 0, vec![r.clone()]).await.unwrap(), o);
        expected.push(r);
    }
    log.append(TOPIC, 1, vec![rec("only", "one")]).await.unwrap();
    let segs = segments(dir.path(), TOPIC, 0);
    assert!(segs.len() >= 5, "want several sealed segments, got {}", segs.len());
    let (active_base, active_path) = segs.last().unwrap().clone();
    let now = SystemTime::now();

    // Nothing is older than the retention yet.
    assert_eq!(log.enforce_retention(now).unwrap(), 0);
    assert_eq!(segments(dir.path(), TOPIC, 0), segs);
    assert_eq!(log.offsets(TOPIC, 0).await.unwrap(), OffsetRange { start: 0, end: 200 });
    assert_eq!(opts.metrics.deleted_segments.get(), 0);

    // Past the retention every sealed segment goes, the active one stays.
    let deleted = log.enforce_retention(now + RETENTION + Duration::from_secs(1)).unwrap();
    assert_eq!(deleted, segs.len() - 1);
    assert_eq!(opts.metrics.deleted_segments.get(), deleted as u64);
    assert_eq!(segments(dir.path(), TOPIC, 0), vec![(active_base, active_path.clone())]);
    // Partition 1 has only its active segment: untouched.
    assert_eq!(segments(dir.path(), TOPIC, 1).len(), 1);
    assert_eq!(log.offsets(TOPIC, 1).await.unwrap(), OffsetRange { start: 0, end: 1 });

    assert_eq!(log.offsets(TOPIC, 0).await.unwrap(), OffsetRange { start: active_base, end: 200 });
    expect_out_of_range(log.read(TOPIC, 0, 0, 10).await, 0, active_base);
    expect_out_of_range(log.read(TOPIC, 0, active_base - 1, 10).await, active_base - 1, active_base);
    assert_records(&read_all(&log, TOPIC, 0, active_base, 1000).await, active_base, &expected[active_base as usize..]);
    // Again: nothing left to delete.
    assert_eq!(log.enforce_retention(now + RETENTION * 10).unwrap(), 0);

    // Appends continue; the start stays where it is across a reopen.
    assert_eq!(log.append(TOPIC, 0, vec![numbered(0, 200, 10)]).await.unwrap(), 200);
    expected.push(numbered(0, 200, 10));
    drop(log);
    let log = open(dir.path(), &opts);
    assert_eq!(log.offsets(TOPIC, 0).await.unwrap(), OffsetRange { start: active_base, end: 201 });
    expect_out_of_range(log.read(TOPIC, 0, 3, 10).await, 3, active_base);
    assert_records(&read_all(&log, TOPIC, 0, active_base, 1000).await, active_base, &expected[active_base as usize..]);
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_deletes_oldest_first_and_stops_at_a_young_segment() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(&[(TOPIC, 1)], 4096);
    let log = open(dir.path(), &opts);
    let expected: Vec<Record> = (0..200).map(|o| numbered(0, o, 150)).collect();
    for chunk in expected.chunks(3) {
        log.append(TOPIC, 0, chunk.to_vec()).await.unwrap();
    }
    let segs = segments(dir.path(), TOPIC, 0);
    assert!(segs.len() >= 6, "want several sealed segments, got {}", segs.len());
    let now = SystemTime::now();
    let old = now - RETENTION - Duration::from_secs(60);
    // Segments 0 and 1 are old, 2 is young, 3 is old again: only 0 and 1
    // go (a prefix), since 3 is newer in offsets than the young 2.
    set_mtime(&segs[0].1, old);
    set_mtime(&segs[1].1, old);
    set_mtime(&segs[3].1, old);
    assert_eq!(log.enforce_retention(now).unwrap(), 2);
    assert_eq!(segments(dir.path(), TOPIC, 0), segs[2..].to_vec());
    let start = segs[2].0;
    assert_eq!(log.offsets(TOPIC, 0).await.unwrap(), OffsetRange { start, end: 200 });
    expect_out_of_range(log.read(TOPIC, 0, start - 1, 10).await, start - 1, start);
    assert_records(&read_all(&log, TOPIC, 0, start, 17).await, start, &expected[start as usize..]);
    drop(log);

    // Retention also runs at open.
    set_mtime(&segs[2].1, old);
    let log = open(dir.path(), &opts);
    assert_eq!(segments(dir.path(), TOPIC, 0), segs[4..].to_vec(), "segments 2 and 3 are deleted at open");
    let start = segs[4].0;
    assert_eq!(log.offsets(TOPIC, 0).await.unwrap(), OffsetRange { start, end: 200 });
    expect_out_of_range(log.read(TOPIC, 0, 0, 10).await, 0, start);
    assert_records(&read_all(&log, TOPIC, 0, start, 1000).await, start, &expected[start as usize..]);

    // The active segment is kept however old it is.
    for (_, p) in segments(dir.path(), TOPIC, 0) {
        set_mtime(&p, old);
    }
    let (active_base, active_path) = segs.last().unwrap().clone();
    log.enforce_retention(now).unwrap();
    assert_eq!(segments(dir.path(), TOPIC, 0), vec![(active_base, active_path)]);
    assert_eq!(log.offsets(TOPIC, 0).await.unwrap(), OffsetRange { start: active_base, end: 200 });
    assert_records(&read_all(&log, TOPIC, 0, active_base, 1000).await, active_base, &expected[active_base as usize..]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_guarding_group_keeps_the_segments_it_has_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(&[(TOPIC, 1)], 4096);
    opts.retention_guard = [(TOPIC.to_owned(), "reader".to_owned())].into();
    let log = open(dir.path(), &opts);
    for o in 0..200u64 {
        log.append(TOPIC, 0, vec![numbered(0, o, 150)]).await.unwrap();
    }
    let bases: Vec<u64> = segments(dir.path(), TOPIC, 0).iter().map(|(b, _)| *b).collect();
    assert!(bases.len() > 4, "several segments: {bases:?}");
    let far_future = SystemTime::now() + RETENTION * 10;

    // Never committed: the group has read nothing, so nothing goes.
    assert_eq!(log.enforce_retention(far_future).unwrap(), 0);

    // Committed into the middle of the third segment: the first two go.
    let commit = bases[2] + 1;
    log.commit(Checkpoint { group: "reader", topic: TOPIC, partition: 0, next_offset: commit }).await.unwrap();
    assert_eq!(log.enforce_retention(far_future).unwrap(), 2);
    assert_eq!(log.offsets(TOPIC, 0).await.unwrap().start, bases[2]);
    let unread = log.read(TOPIC, 0, commit, 1000).await.unwrap();
    assert_eq!(unread.first().map(|r| r.offset), Some(commit), "unread records are kept");
}

#[test]
fn a_read_only_view_whose_oldest_segment_vanishes_reports_out_of_range() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(&[(TOPIC, 1)], 4096);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let log = open(dir.path(), &opts);
    for o in 0..100u64 {
        rt.block_on(log.append(TOPIC, 0, vec![numbered(0, o, 150)])).unwrap();
    }
    let segs = segments(dir.path(), TOPIC, 0);
    let view = sluice_log::EmbeddedLog::open_read_only(dir.path()).unwrap();
    // The writer's retention deletes the oldest segment behind the view's back.
    std::fs::remove_file(&segs[0].1).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(view.read_blocking(TOPIC, 0, 0, 10).map(|r| r.len()));
    });
    match rx.recv_timeout(Duration::from_secs(30)).expect("the read returns instead of spinning") {
        Err(LogError::OffsetOutOfRange { start, .. }) => assert_eq!(start, segs[1].0),
        other => panic!("expected OffsetOutOfRange, got {other:?}"),
    }
    drop(log);
}
