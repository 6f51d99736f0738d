//! Many concurrent appenders: group commit hands out distinct, dense offset
//! ranges and each record lands at the offset its caller was given.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::*;
use sluice_log::{Checkpoint, EmbeddedLog, Log, OffsetRange, Record, StoredRecord};

const TOPIC: &str = "t";

/// What task `task` appends as its `i`-th call.
fn batch_of(task: usize, i: usize) -> Vec<Record> {
    let n = 1 + (task + i) % 3;
    (0..n).map(|j| rec(format!("w{task}/{i}/{j}"), pattern((task * 100_000 + i * 10 + j) as u64, (task * 31 + i * 7 + j) % 300))).collect()
}

/// Keep reading a partition while it is written, until `done` and caught up.
/// Every answer must continue exactly where the last one ended.
async fn follow(log: Arc<EmbeddedLog>, partition: u32, done: Arc<AtomicBool>) -> Vec<StoredRecord> {
    let mut seen: Vec<StoredRecord> = Vec::new();
    let mut last_end = 0;
    loop {
        let finished = done.load(Ordering::SeqCst);
        let range = log.offsets(TOPIC, partition).await.unwrap();
        assert!(range.end >= last_end, "the end offset went back from {last_end} to {}", range.end);
        last_end = range.end;
        let next = seen.len() as u64;
        let got = log.read(TOPIC, partition, next, 97).await.unwrap();
        for (k, r) in got.iter().enumerate() {
            assert_eq!(r.offset, next + k as u64, "a concurrent read skipped or repeated an offset");
        }
        if got.is_empty() {
            if finished && next >= log.offsets(TOPIC, partition).await.unwrap().end {
                return seen;
            }
            // Caught up: back off a little instead of spinning (on a small
            // machine a spinning reader starves the writer threads).
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        seen.extend(got);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn concurrent_appenders_get_dense_distinct_offsets() {
    const TASKS: usize = 16;
    const APPENDS: usize = 200;
    let dir = tempfile::tempdir().unwrap();
    let opts = options(&[(TOPIC, 1)], 4096);
    let log = Arc::new(open(dir.path(), &opts));
    let done = Arc::new(AtomicBool::new(false));
    let reader = tokio::spawn(follow(log.clone(), 0, done.clone()));

    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::with_capacity(APPENDS);
            for i in 0..APPENDS {
                let batch = batch_of(task, i);
                let n = batch.len() as u64;
                let first = log.append(TOPIC, 0, batch).await.unwrap();
                got.push((first, n, task, i));
            }
            got
        }));
    }
    let mut ranges = Vec::new();
    for t in tasks {
        let got = t.await.unwrap();
        // One task's appends are sequential, so its offsets ascend.
        for w in got.windows(2) {
            assert!(w[1].0 >= w[0].0 + w[0].1, "task {} got offsets out of order: {:?} then {:?}", w[0].2, w[0], w[1]);
        }
        ranges.extend(got);
    }
    done.store(true, Ordering::SeqCst);

    // The ranges tile 0..N exactly: no overlap, no gap.
    ranges.sort();
    let mut next = 0;
    let mut at: HashMap<u64, Record> = HashMap::new();
    for &(first, n, task, i) in &ranges {
        assert_eq!(first, next, "offset range of task {task} call {i} leaves a gap or overlaps");
        for (j, r) in batch_of(task, i).into_iter().enumerate() {
            at.insert(first + j as u64, r);
        }
        next = first + n;
    }
    let total = next;
    let expected: Vec<Record> = (0..total).map(|o| at.remove(&o).unwrap()).collect();
    assert_eq!(log.offsets(TOPIC, 0).await.unwrap(), OffsetRange { start: 0, end: total });

    // Each record reads back at the offset its caller was given.
    assert_records(&read_all(&log, TOPIC, 0, 0, 500).await, 0, &expected);
    // The concurrent reader saw the same records, in the same order.
    let followed = reader.await.unwrap();
    assert_records(&followed, 0, &expected);

    let appends = (TASKS * APPENDS) as u64;
    let commits = opts.metrics.group_commits.get();
    assert!(commits >= 1 && commits <= appends, "group_commits {commits} for {appends} appends");
    assert_eq!(opts.metrics.appended_records.get(), total);
    assert_eq!(opts.metrics.appended_bytes.get(), expected.iter().map(frame_len).sum::<u64>());
    assert!(segments(dir.path(), TOPIC, 0).len() > 10, "small segments must have rolled under load");

    // And the same after a reopen.
    drop(Arc::try_unwrap(log).ok().expect("no other handle"));
    let log = open(dir.path(), &opts);
    assert_records(&read_all(&log, TOPIC, 0, 0, 333).await, 0, &expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn concurrent_appenders_across_partitions_and_groups() {
    const PARTITIONS: u32 = 4;
    const TASKS: usize = 12;
    const APPENDS: usize = 150;
    let dir = tempfile::tempdir().unwrap();
    let opts = options(&[(TOPIC, PARTITIONS)], 8192);
    let log = Arc::new(open(dir.path(), &opts));
    let done = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..PARTITIONS).map(|p| tokio::spawn(follow(log.clone(), p, done.clone()))).collect();

    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for i in 0..APPENDS {
                let p = ((task * 7 + i * 3) % PARTITIONS as usize) as u32;
                let batch = batch_of(task, i);
                let n = batch.len() as u64;
                let first = log.append(TOPIC, p, batch).await.unwrap();
                // Commits race with appends and with each other's groups.
                log.commit(Checkpoint { group: &format!("g{}", task % 3), topic: TOPIC, partition: p, next_offset: first + n }).await.unwrap();
                got.push((p, first, n, task, i));
            }
            got
        }));
    }
    let mut ranges = Vec::new();
    for t in tasks {
        ranges.extend(t.await.unwrap());
    }
    done.store(true, Ordering::SeqCst);
    ranges.sort();
    for p in 0..PARTITIONS {
        let mut next = 0;
        let mut expected = Vec::new();
        for &(_, first, n, task, i) in ranges.iter().filter(|r| r.0 == p) {
            assert_eq!(first, next, "partition {p}: range of task {task} call {i} leaves a gap or overlaps");
            expected.extend(batch_of(task, i));
            next = first + n;
        }
        assert_eq!(log.offsets(TOPIC, p).await.unwrap(), OffsetRange { start: 0, end: next });
        assert_records(&read_all(&log, TOPIC, p, 0, 1000).await, 0, &expected);
        // Each group's committed offset is one of the values it committed.
        for g in 0..3 {
            let committed = log.committed(&format!("g{g}"), TOPIC, p).await.unwrap();
            let candidates: Vec<u64> = ranges.iter().filter(|r| r.0 == p && r.3 % 3 == g).map(|r| r.1 + r.2).collect();
            match committed {
                Some(c) => assert!(candidates.contains(&c), "partition {p} group g{g}: {c} was never committed"),
                None => assert!(candidates.is_empty()),
            }
        }
    }
    for (p, r) in readers.into_iter().enumerate() {
        let followed = r.await.unwrap();
        let p = p as u32;
        let all = read_all(&log, TOPIC, p, 0, 1000).await;
        assert_eq!(followed, all, "the follower of partition {p} saw what is stored");
    }
    assert!(opts.metrics.group_commits.get() <= (TASKS * APPENDS) as u64);
}
