//! JobDB writes that fail (a full disk: SQLite's "database or disk is
//! full"), injected with `writer::faults`: the director backs off instead of
//! retrying in a hot loop, counts the failures, sends nothing whose
//! `executing` row did not commit, and resumes by itself once writes work,
//! delivering every job exactly once.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_core::Config;
use sluice_deliver::inspect;
use sluice_deliver::sink::Sink;
use sluice_deliver::writer::faults;
use sluice_deliver::{Catalog, Centrifuge, CentrifugeOptions, DeliverMetrics, NewJob};

fn config(dir: &Path, toml: &str) -> Config {
    let text = format!("[server]\ndata_dir = \"{}\"\n[[sources]]\nid = \"s1\"\nwrite_key = \"k1\"\n{toml}", dir.join("data").display());
    Config::from_toml_with_env(&text, "", &HashMap::new()).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

fn job(message_id: &str) -> NewJob {
    common::job(message_id, "s1", "hook")
}

fn succeeded(jobs_dir: &Path) -> u64 {
    let (_, stats) = inspect::stats(jobs_dir).unwrap();
    stats.values().map(|m| m.get("succeeded").copied().unwrap_or(0)).sum()
}

async fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool, what: impl Fn() -> String) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "{}", what());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_jobdb_writes_back_off_are_counted_and_recover_by_themselves() {
    let sink = Sink::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let toml = format!("[[destinations]]\nid = \"hook\"\nurl = \"{}\"\nallow_private_network = true\n", sink.url("/hook"));
    let config = config(dir.path(), &toml);
    let catalog: Arc<Catalog> = Catalog::open(&config).unwrap();
    let metrics = DeliverMetrics::default();
    let centrifuge = Centrifuge::open(CentrifugeOptions::from_config(&config), catalog.clone(), metrics.clone()).await.unwrap();
    let jobs_dir = config.server.data_dir.join("jobs");
    let control = rusqlite::Connection::open(config.server.data_dir.join("control.sqlite")).unwrap();

    // Jobs stored while the destination is paused, so none is sent yet.
    control.execute("UPDATE destination_qos SET paused = 1 WHERE destination = 'hook'", []).unwrap();
    catalog.refresh().unwrap();
    let n = centrifuge.insert((0..20).map(|i| job(&format!("m-{i}"))).collect(), sluice_deliver::now_ms()).await.unwrap();
    assert_eq!(n, 20);

    // The disk "fills"; the destination is resumed: every `executing` row fails.
    let prefix = jobs_dir.display().to_string();
    faults::fail_commits(&prefix, true);
    control.execute("UPDATE destination_qos SET paused = 0 WHERE destination = 'hook'", []).unwrap();
    catalog.refresh().unwrap();
    wait_until(Duration::from_secs(10), || metrics.jobdb_write_failures.get() >= 1, || "no write failed".into()).await;
    let err = centrifuge.insert(vec![job("during")], sluice_deliver::now_ms()).await.expect_err("an insert fails while the disk is full");
    assert!(err.to_string().contains("disk is full"), "{err}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let failures = metrics.jobdb_write_failures.get();
    // With backoff (100 ms doubling) about 6 transactions fail in these 3 s;
    // without it, the director retried ~10,000 times a second.
    assert!(failures <= 40, "{failures} JobDB transactions failed in about 3 s: no backoff");
    assert_eq!(metrics.jobdbs_failing.get(), 1, "the failing JobDB is shown");
    assert_eq!(sink.received_on("/hook").len(), 0, "nothing is sent before its executing row commits");

    // Space returns: delivery resumes by itself.
    faults::fail_commits(&prefix, false);
    wait_until(Duration::from_secs(30), || succeeded(&jobs_dir) >= 20, || format!("{} of 20 delivered", succeeded(&jobs_dir))).await;
    wait_until(Duration::from_secs(10), || metrics.jobdbs_failing.get() == 0, || "still shown failing".into()).await;
    // The insert that failed is retried by its sender (the route) and goes through.
    assert_eq!(centrifuge.insert(vec![job("during")], sluice_deliver::now_ms()).await.unwrap(), 1);
    wait_until(Duration::from_secs(30), || succeeded(&jobs_dir) >= 21, || format!("{} of 21 delivered", succeeded(&jobs_dir))).await;

    let mut by_key: HashMap<String, usize> = HashMap::new();
    for r in sink.received_on("/hook") {
        *by_key.entry(r.header("idempotency-key").unwrap_or("").to_owned()).or_default() += 1;
    }
    assert_eq!(by_key.len(), 21, "every job delivered: {by_key:?}");
    assert!(by_key.values().all(|n| *n == 1), "none twice: {by_key:?}");
    assert!(metrics.jobdb_write_failures.get() >= 2);
    centrifuge.close().await;
}
