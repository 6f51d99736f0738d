//! The ingest spool in front of a log that fails, hangs and comes back.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use sluice_ingest::spool::{Spool, SpoolMetrics, SpoolSettings};
use sluice_log::{Checkpoint, EmbeddedLog, Log, LogError, LogOptions, OffsetRange, Record, StoredRecord};

const UP: u8 = 0;
const DOWN: u8 = 1;
const HANGING: u8 = 2;

/// An embedded log whose appends can be made to fail or hang.
struct Flaky {
    inner: EmbeddedLog,
    mode: AtomicU8,
}

#[async_trait]
impl Log for Flaky {
    fn partitions(&self, topic: &str) -> Result<u32, LogError> {
        self.inner.partitions(topic)
    }
    async fn append(&self, topic: &str, partition: u32, records: Vec<Record>) -> Result<u64, LogError> {
        match self.mode.load(Ordering::SeqCst) {
            DOWN => Err(LogError::Unavailable("broker down (test)".into())),
            HANGING => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                unreachable!()
            }
            _ => self.inner.append(topic, partition, records).await,
        }
    }
    async fn read(&self, topic: &str, partition: u32, from: u64, max: usize) -> Result<Vec<StoredRecord>, LogError> {
        self.inner.read(topic, partition, from, max).await
    }
    async fn offsets(&self, topic: &str, partition: u32) -> Result<OffsetRange, LogError> {
        self.inner.offsets(topic, partition).await
    }
    async fn commit(&self, at: Checkpoint<'_>) -> Result<(), LogError> {
        self.inner.commit(at).await
    }
    async fn committed(&self, group: &str, topic: &str, partition: u32) -> Result<Option<u64>, LogError> {
        self.inner.committed(group, topic, partition).await
    }
}

fn rec(i: usize) -> Record {
    Record { key: Bytes::from(format!("k{i}")), value: Bytes::from(format!("v{i}")) }
}

struct Setup {
    dir: tempfile::TempDir,
    flaky: Arc<Flaky>,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let options = LogOptions { topics: vec![("input".into(), 2)], ..LogOptions::default() };
    let inner = EmbeddedLog::open(&dir.path().join("log"), options).unwrap();
    Setup { flaky: Arc::new(Flaky { inner, mode: AtomicU8::new(UP) }), dir }
}

fn settings() -> SpoolSettings {
    SpoolSettings { spool_after: Duration::from_millis(300), max_events: 50, drain_batch: 7 }
}

async fn open(s: &Setup, metrics: SpoolMetrics) -> Arc<Spool> {
    Spool::open(s.flaky.clone(), "input", &s.dir.path().join("spool"), settings(), metrics).await.unwrap()
}

/// Keys of partition `p` in the real log, in order.
async fn keys(log: &Flaky, p: u32) -> Vec<String> {
    log.inner.read("input", p, 0, 10_000).await.unwrap().iter().map(|r| String::from_utf8(r.key.to_vec()).unwrap()).collect()
}

async fn wait_until(what: &str, f: impl AsyncFn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_down_log_is_spooled_then_drained_in_order() {
    let s = setup();
    let metrics = SpoolMetrics::default();
    let spool = open(&s, metrics.clone()).await;
    spool.append("input", 0, vec![rec(0), rec(1)]).await.unwrap();
    assert_eq!(keys(&s.flaky, 0).await, ["k0", "k1"], "direct while the log is up");

    s.flaky.mode.store(DOWN, Ordering::SeqCst);
    for i in 2..22 {
        spool.append("input", 0, vec![rec(i)]).await.expect("acknowledged into the spool while the log is down");
    }
    assert_eq!(keys(&s.flaky, 0).await.len(), 2, "nothing reached the log");
    assert_eq!(metrics.depth.get(), 20);
    assert_eq!(metrics.spooled.get(), 20);

    s.flaky.mode.store(UP, Ordering::SeqCst);
    // New appends keep their place behind the spooled ones.
    spool.append("input", 0, vec![rec(22)]).await.unwrap();
    wait_until("the spool to drain", async || keys(&s.flaky, 0).await.len() == 23).await;
    let expected: Vec<String> = (0..23).map(|i| format!("k{i}")).collect();
    assert_eq!(keys(&s.flaky, 0).await, expected, "in order, each once");
    wait_until("depth 0", async || metrics.depth.get() == 0).await;

    // Back to direct appends: visible at once, without the drainer.
    wait_until("direct mode", async || {
        let before = keys(&s.flaky, 0).await.len();
        spool.append("input", 0, vec![rec(100 + before)]).await.unwrap();
        keys(&s.flaky, 0).await.len() == before + 1
    })
    .await;
    assert_eq!(keys(&s.flaky, 1).await.len(), 0, "other partitions untouched");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hanging_log_is_spooled_after_the_timeout() {
    let s = setup();
    let spool = open(&s, SpoolMetrics::default()).await;
    s.flaky.mode.store(HANGING, Ordering::SeqCst);
    let started = Instant::now();
    spool.append("input", 1, vec![rec(0)]).await.expect("spooled after spool_after");
    assert!(started.elapsed() >= Duration::from_millis(300), "waited spool_after first");
    s.flaky.mode.store(UP, Ordering::SeqCst);
    wait_until("the drain", async || keys(&s.flaky, 1).await == ["k0"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_spool_refuses_and_loses_nothing_it_acknowledged() {
    let s = setup();
    let metrics = SpoolMetrics::default();
    let spool = open(&s, metrics.clone()).await;
    s.flaky.mode.store(DOWN, Ordering::SeqCst);
    let mut acked = Vec::new();
    let mut refused = 0;
    for i in 0..60 {
        match spool.append("input", (i % 2) as u32, vec![rec(i)]).await {
            Ok(_) => acked.push(format!("k{i}")),
            Err(LogError::Unavailable(m)) => {
                assert!(m.contains("spool is full"), "{m}");
                refused += 1;
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert_eq!(acked.len(), 50, "max_events = 50");
    assert_eq!(refused, 10);
    assert_eq!(metrics.refused.get(), 10);
    s.flaky.mode.store(UP, Ordering::SeqCst);
    wait_until("the drain", async || keys(&s.flaky, 0).await.len() + keys(&s.flaky, 1).await.len() == 50).await;
    let mut got = [keys(&s.flaky, 0).await, keys(&s.flaky, 1).await].concat();
    got.sort();
    acked.sort();
    assert_eq!(got, acked);
}

#[tokio::test(flavor = "multi_thread")]
async fn spooled_events_survive_a_restart() {
    let s = setup();
    {
        let spool = open(&s, SpoolMetrics::default()).await;
        s.flaky.mode.store(DOWN, Ordering::SeqCst);
        for i in 0..5 {
            spool.append("input", 0, vec![rec(i)]).await.unwrap();
        }
        spool.stop().await;
    }
    s.flaky.mode.store(UP, Ordering::SeqCst);
    let metrics = SpoolMetrics::default();
    let reopened = open(&s, metrics.clone()).await;
    assert_eq!(metrics.depth.get(), 5, "found on open");
    // A new event waits behind the recovered ones.
    reopened.append("input", 0, vec![rec(5)]).await.unwrap();
    wait_until("the drain", async || keys(&s.flaky, 0).await.len() == 6).await;
    assert_eq!(keys(&s.flaky, 0).await, ["k0", "k1", "k2", "k3", "k4", "k5"]);
}
