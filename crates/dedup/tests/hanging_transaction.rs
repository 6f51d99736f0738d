//! Dedup over a transactional log whose transactions do not always end where
//! they committed: a Kafka broker that restarts while writing a committed
//! transaction's markers can skip `output`'s marker while the input offset
//! the transaction committed stands ("hanging" transaction). The records
//! then share the fate of the producer's next marker on that partition: if
//! the next transaction aborts, they are aborted with it. The chaos soak lost
//! acknowledged events exactly so (in `input`, not in `output`, dedup's
//! offset past them).
//!
//! [`TxnLog`] is a one-partition, in-memory model of that part of Kafka: the
//! records of the one producer's ongoing transaction are unreadable (the last
//! stable offset stops before them) until a marker ends them, each marker
//! takes an offset, committed offsets keep their replay point, and a fence
//! ends a hanging transaction by committing it, as `KafkaLog::fence` does.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use sluice_dedup::index::IndexOptions;
use sluice_dedup::{DedupMetrics, DedupSettings, DedupWorker, INPUT_TOPIC};
use sluice_log::{Checkpoint, Log, LogError, OffsetRange, Publish, ReadBatch, Record, StoredRecord};

#[derive(Clone, Copy, PartialEq, Debug)]
enum Status {
    Ongoing,
    Committed,
    Aborted,
}

enum Entry {
    Record(Record, Status),
    Marker,
}

/// What happens to the next transaction that publishes records.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Commits (offset and all), but `output`'s marker is skipped.
    SkipMarker,
    /// Fails after producing: aborted, with whatever was hanging.
    Abort,
}

#[derive(Default)]
struct State {
    input: Vec<Record>,
    output: Vec<Entry>,
    /// Committed input offset and its replay point.
    committed: Option<(u64, Option<u64>)>,
    /// Output offsets of the producer's transaction not ended yet.
    ongoing: Vec<usize>,
    faults: VecDeque<Fault>,
    publishing_transactions: usize,
}

impl State {
    fn end_ongoing(&mut self, status: Status) {
        for i in std::mem::take(&mut self.ongoing) {
            if let Entry::Record(_, s) = &mut self.output[i] {
                *s = status;
            }
        }
        self.output.push(Entry::Marker);
    }

    /// The last stable offset: the first record of a transaction not ended.
    fn stable_end(&self) -> usize {
        self.ongoing.first().copied().unwrap_or(self.output.len())
    }

    fn committed_output(&self) -> Vec<String> {
        self.output
            .iter()
            .filter_map(|e| match e {
                Entry::Record(r, Status::Committed) => Some(String::from_utf8_lossy(&r.key).into_owned()),
                _ => None,
            })
            .collect()
    }
}

#[derive(Default)]
struct TxnLog {
    state: Mutex<State>,
}

fn stored(offset: usize, r: &Record) -> StoredRecord {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    StoredRecord { offset: offset as u64, timestamp_ms: now, key: r.key.clone(), value: r.value.clone() }
}

#[async_trait]
impl Log for TxnLog {
    fn partitions(&self, _topic: &str) -> Result<u32, LogError> {
        Ok(1)
    }

    async fn append(&self, topic: &str, _partition: u32, records: Vec<Record>) -> Result<u64, LogError> {
        let mut s = self.state.lock().unwrap();
        assert_eq!(topic, INPUT_TOPIC, "dedup publishes through publish_and_commit");
        let first = s.input.len() as u64;
        s.input.extend(records);
        Ok(first)
    }

    async fn read(&self, topic: &str, partition: u32, from: u64, max: usize) -> Result<Vec<StoredRecord>, LogError> {
        Ok(self.read_batch(topic, partition, from, max).await?.records)
    }

    async fn read_batch(&self, topic: &str, _partition: u32, from: u64, max: usize) -> Result<ReadBatch, LogError> {
        let s = self.state.lock().unwrap();
        let from = from as usize;
        if topic == INPUT_TOPIC {
            let records: Vec<StoredRecord> = s.input.iter().enumerate().skip(from).take(max).map(|(i, r)| stored(i, r)).collect();
            let next = records.last().map_or(from as u64, |r| r.offset + 1);
            return Ok(ReadBatch { records, next });
        }
        // read_committed: stop at the last stable offset, skip markers and aborted records.
        let mut records = Vec::new();
        let mut next = from;
        while next < s.stable_end() && records.len() < max {
            if let Entry::Record(r, Status::Committed) = &s.output[next] {
                records.push(stored(next, r));
            }
            next += 1;
        }
        Ok(ReadBatch { records, next: next as u64 })
    }

    async fn offsets(&self, topic: &str, _partition: u32) -> Result<OffsetRange, LogError> {
        let s = self.state.lock().unwrap();
        let end = if topic == INPUT_TOPIC { s.input.len() } else { s.stable_end() };
        Ok(OffsetRange { start: 0, end: end as u64 })
    }

    async fn commit(&self, at: Checkpoint<'_>) -> Result<(), LogError> {
        self.state.lock().unwrap().committed = Some((at.next_offset, None));
        Ok(())
    }

    async fn committed(&self, _group: &str, _topic: &str, _partition: u32) -> Result<Option<u64>, LogError> {
        Ok(self.state.lock().unwrap().committed.map(|(c, _)| c))
    }

    async fn resume_point(&self, _group: &str, _topic: &str, _partition: u32) -> Result<Option<u64>, LogError> {
        Ok(self.state.lock().unwrap().committed.map(|(c, replay)| replay.map_or(c, |r| r.min(c))))
    }

    fn atomic_publish_and_commit(&self, _in_topic: &str) -> bool {
        true
    }

    /// As `KafkaLog::fence`: a hanging transaction is ended by committing it.
    async fn fence(&self, _group: &str, _in_topic: &str, _partition: u32) -> Result<(), LogError> {
        let mut s = self.state.lock().unwrap();
        if !s.ongoing.is_empty() {
            s.end_ongoing(Status::Committed);
        }
        Ok(())
    }

    async fn publish_and_commit(&self, p: Publish<'_>) -> Result<Option<u64>, LogError> {
        let Publish { records, commit: Checkpoint { next_offset, .. }, replay_from, .. } = p;
        let mut s = self.state.lock().unwrap();
        if records.is_empty() {
            // Offsets only: no record, no marker on output.
            s.committed = Some((next_offset, replay_from));
            return Ok(None);
        }
        s.publishing_transactions += 1;
        let first = s.output.len();
        for r in records {
            let at = s.output.len();
            s.output.push(Entry::Record(r, Status::Ongoing));
            s.ongoing.push(at);
        }
        match s.faults.pop_front() {
            Some(Fault::Abort) => {
                s.end_ongoing(Status::Aborted);
                Err(LogError::Unavailable("injected: the transaction timed out and was aborted".into()))
            }
            Some(Fault::SkipMarker) => {
                s.committed = Some((next_offset, replay_from));
                Ok(Some(first as u64))
            }
            None => {
                s.committed = Some((next_offset, replay_from));
                s.end_ongoing(Status::Committed);
                Ok(Some(first as u64))
            }
        }
    }
}

fn rec(id: &str) -> Record {
    Record { key: Bytes::from(format!("web/{id}")), value: Bytes::from(format!("{{\"messageId\":\"{id}\"}}")) }
}

fn settings(dir: &std::path::Path) -> DedupSettings {
    DedupSettings {
        index_dir: dir.join("dedup"),
        index: IndexOptions::new(10.0, Duration::from_secs(3600), 8 << 20).unwrap(),
        batch_size: 100,
        poll_interval: Duration::from_millis(1),
        stop: Default::default(),
    }
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Each id once in `output`'s committed records.
fn assert_each_once(log: &TxnLog, ids: &[String]) {
    let out = log.state.lock().unwrap().committed_output();
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for k in &out {
        *counts.entry(k.as_str()).or_default() += 1;
    }
    for id in ids {
        assert_eq!(counts.get(format!("web/{id}").as_str()), Some(&1), "{id} in output once; output holds {out:?}");
    }
    assert_eq!(out.len(), ids.len(), "nothing else in output: {out:?}");
}

#[test]
fn a_hanging_transaction_aborted_by_the_next_one_is_published_again() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let log = Arc::new(TxnLog::default());
    // Batch a: committed, its marker skipped. Batch b: aborted, taking a's records with it.
    log.state.lock().unwrap().faults = VecDeque::from([Fault::SkipMarker, Fault::Abort]);
    let a: Vec<String> = (0..5).map(|i| format!("a{i}")).collect();
    let b: Vec<String> = (0..5).map(|i| format!("b{i}")).collect();
    rt.block_on(log.append(INPUT_TOPIC, 0, a.iter().map(|id| rec(id)).collect())).unwrap();

    let settings = settings(dir.path());
    let stop = settings.stop.clone();
    let metrics = DedupMetrics::default();
    let worker = DedupWorker::open(log.clone(), 0, settings, metrics.clone(), rt.handle(), &mut |_| {}).unwrap();
    let handle = rt.handle().clone();
    let thread = std::thread::spawn(move || worker.run(handle));

    wait_until("batch a is published", || log.state.lock().unwrap().publishing_transactions >= 1);
    assert_eq!(log.state.lock().unwrap().committed.map(|c| c.0), Some(5), "a's input offset is committed");
    rt.block_on(log.append(INPUT_TOPIC, 0, b.iter().map(|id| rec(id)).collect())).unwrap();
    let all: Vec<String> = a.iter().chain(&b).cloned().collect();
    let published = |log: &TxnLog| {
        let out = log.state.lock().unwrap().committed_output();
        all.iter().all(|id| out.contains(&format!("web/{id}")))
    };
    wait_until("a and b are in output", || published(&log));
    stop.trigger();
    thread.join().unwrap();

    assert!(metrics.errors.get_or_create(&metrics.partition(0)).get() >= 1, "the aborted transaction was an error");
    assert_each_once(&log, &all);
    // A resend of anything published now is dropped.
    let worker_settings = self::settings(dir.path());
    let mut worker = DedupWorker::open(log.clone(), 0, worker_settings, DedupMetrics::default(), rt.handle(), &mut |_| {}).unwrap();
    rt.block_on(log.append(INPUT_TOPIC, 0, vec![rec("a0"), rec("b4")])).unwrap();
    while worker.process_batch(rt.handle()).unwrap() > 0 {}
    assert_each_once(&log, &all);
}

#[test]
fn each_published_batch_confirms_the_one_before() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let log = Arc::new(TxnLog::default());
    let metrics = DedupMetrics::default();
    let mut worker = DedupWorker::open(log.clone(), 0, settings(dir.path()), metrics.clone(), rt.handle(), &mut |_| {}).unwrap();
    let mut ids = Vec::new();
    for batch in 0..20 {
        let batch_ids: Vec<String> = (0..3).map(|i| format!("c{batch}-{i}")).collect();
        rt.block_on(log.append(INPUT_TOPIC, 0, batch_ids.iter().map(|id| rec(id)).collect())).unwrap();
        assert_eq!(worker.process_batch(rt.handle()).unwrap(), 3, "batch {batch} processed without error");
        ids.extend(batch_ids);
    }
    assert_each_once(&log, &ids);
    // The index holds every batch but the last, which waits for the next to
    // confirm it. Each batch takes 4 offsets (3 records, a marker): the
    // 19th's records end before offset 19 * 4 - 1, its marker's.
    assert_eq!(worker.index().unwrap().checkpoint().unwrap(), Some(19 * 4 - 1));
    // A repeat of the last, unconfirmed batch is still dropped.
    rt.block_on(log.append(INPUT_TOPIC, 0, vec![rec("c19-0"), rec("c0-0")])).unwrap();
    assert_eq!(worker.process_batch(rt.handle()).unwrap(), 2);
    assert_each_once(&log, &ids);
    assert_eq!(metrics.duplicates_dropped.get(), 2);
}
