//! The dedup worker against a real embedded log.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sluice_dedup::index::IndexOptions;
use sluice_dedup::{DedupMetrics, DedupSettings, DedupWorker, GROUP, INPUT_TOPIC, OUTPUT_TOPIC};
use sluice_log::{Checkpoint, EmbeddedLog, Log, LogOptions, Record};

fn rec(id: &str) -> Record {
    Record { key: Bytes::from(format!("web/{id}")), value: Bytes::from(format!("{{\"messageId\":\"{id}\"}}")) }
}

/// A log with one-partition `input` and `output`, and dedup settings over it.
fn setup() -> (tempfile::TempDir, tokio::runtime::Runtime, Arc<dyn Log>, DedupSettings) {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let options = LogOptions { topics: vec![(INPUT_TOPIC.into(), 1), (OUTPUT_TOPIC.into(), 1)], ..LogOptions::default() };
    let log: Arc<dyn Log> = Arc::new(EmbeddedLog::open(&dir.path().join("log"), options).unwrap());
    let settings = DedupSettings {
        index_dir: dir.path().join("dedup"),
        index: IndexOptions::new(10.0, Duration::from_secs(3600), 8 << 20).unwrap(),
        batch_size: 100,
        poll_interval: Duration::from_millis(1),
        stop: Default::default(),
    };
    (dir, rt, log, settings)
}

#[test]
fn a_committed_offset_past_the_end_of_input_is_reset_not_skipped() {
    let (_dir, rt, log, settings) = setup();
    rt.block_on(log.append(INPUT_TOPIC, 0, (0..5).map(|i| rec(&format!("a{i}"))).collect())).unwrap();
    // As after input's tail was cut at recovery: dedup had committed 10.
    rt.block_on(log.commit(Checkpoint { group: GROUP, topic: INPUT_TOPIC, partition: 0, next_offset: 10 })).unwrap();
    let metrics = DedupMetrics::default();
    let mut worker = DedupWorker::open(log.clone(), 0, settings, metrics.clone(), rt.handle(), &mut |_| {}).unwrap();
    assert_eq!(worker.process_batch(rt.handle()).unwrap(), 0);
    assert_eq!(metrics.input_offset_resets.get(), 1);
    assert_eq!(rt.block_on(log.committed(GROUP, INPUT_TOPIC, 0)).unwrap(), Some(5));

    // New events take offsets 5.. and are deduplicated and published.
    rt.block_on(log.append(INPUT_TOPIC, 0, vec![rec("b0"), rec("b1"), rec("b0")])).unwrap();
    assert_eq!(worker.process_batch(rt.handle()).unwrap(), 3);
    let out = rt.block_on(log.read(OUTPUT_TOPIC, 0, 0, 100)).unwrap();
    let keys: Vec<&[u8]> = out.iter().map(|r| &r.key[..]).collect();
    assert_eq!(keys, [&b"web/b0"[..], &b"web/b1"[..]]);
}

#[test]
fn rebuilding_keeps_only_the_newest_moved_aside_copy() {
    let (dir, rt, log, settings) = setup();
    rt.block_on(log.append(OUTPUT_TOPIC, 0, vec![rec("x"), rec("y")])).unwrap();
    for _ in 0..3 {
        let stats = sluice_dedup::rebuild_partition(log.clone(), 0, settings.clone(), rt.handle(), &mut |_| {}).unwrap();
        assert_eq!(stats.estimated_keys, 2);
        std::thread::sleep(Duration::from_millis(2)); // distinct names
    }
    let copies: Vec<String> = std::fs::read_dir(dir.path().join("dedup"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("0."))
        .collect();
    assert_eq!(copies.len(), 1, "one moved-aside copy: {copies:?}");
}

#[test]
fn a_catch_up_stops_when_asked() {
    let (_dir, rt, log, settings) = setup();
    rt.block_on(log.append(OUTPUT_TOPIC, 0, vec![rec("x")])).unwrap();
    settings.stop.trigger();
    match DedupWorker::open(log, 0, settings, DedupMetrics::default(), rt.handle(), &mut |_| {}) {
        Err(sluice_dedup::DedupError::Stopped) => {}
        Err(e) => panic!("expected Stopped, got {e}"),
        Ok(_) => panic!("the catch-up ran to the end although stop was set"),
    }
}
