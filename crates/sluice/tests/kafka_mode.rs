//! `sluice serve` with `log.backend = "kafka"` against a real Apache Kafka
//! broker (a private one per test, from `scripts/kafka.sh`, so stopping it
//! disturbs no other test): events are deduplicated and delivered, and
//! while the broker is down for 30 s ingest keeps acknowledging into its
//! spool, which drains, in order and losing nothing, once Kafka is back.
//!
//! Needs the Kafka jars (`scripts/kafka.sh fetch`, done by `scripts/test.sh`)
//! and Java. Without them the test is skipped with a message, unless
//! `SLUICE_REQUIRE_KAFKA=1`, when it fails.

mod util;

use std::time::Duration;

use util::*;

fn scrape(sink: &TestSink, server: &Server) -> String {
    sink.block_on(async { reqwest::get(format!("http://{}/metrics", server.admin)).await.unwrap().text().await.unwrap() })
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines().filter(|l| l.starts_with(name) && !l.starts_with('#')).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

/// One test at a time: each runs brokers of its own and stops them.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn kafka_mode_delivers_and_spools_through_a_broker_outage() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let Some(mut broker) = Broker::start(&dir.path().join("kafka"), "sluice-test-kafka-mode") else { return };
    let sink = TestSink::start();
    let config = write_kafka_config(dir.path(), &broker, &hook_destination_toml(&sink.sink.url("/hook")));
    // Short: the test spends its time in the outage, not in waiting to spool.
    let server = Server::start_with_env(&config, &[("SLUICE_INGEST__SPOOL_AFTER", "1s")]);

    // 1. Normal operation, with a client resending some events.
    let first: Vec<_> = (0..200).map(|i| track_event(&format!("a-{i}"), i)).collect();
    for chunk in first.chunks(50) {
        sink.post_batch(&server.addr, chunk).unwrap();
    }
    sink.post_batch(&server.addr, &first[10..13]).unwrap(); // resent
    wait_for(
        Duration::from_secs(60),
        || (sink.by_message_id("/hook").len() >= 200).then_some(()),
        || format!("200 deliveries; got {}; server:\n{}", sink.by_message_id("/hook").len(), server.stderr_tail(30)),
    );

    // 2. The broker goes away for 30 s: ingest keeps answering 200.
    broker.stop();
    let second: Vec<_> = (0..100).map(|i| track_event(&format!("b-{i}"), i)).collect();
    for chunk in second.chunks(10) {
        sink.post_batch(&server.addr, chunk).expect("acknowledged into the spool while Kafka is down");
    }
    let text = scrape(&sink, &server);
    let depth = metric(&text, "sluice_ingest_spool_depth");
    assert!(depth >= 90.0, "the spool holds the events sent during the outage: depth {depth}");
    std::thread::sleep(Duration::from_secs(30));
    broker.restart().expect("restart the broker on its data");

    // 3. Back: the spool drains and every unique event arrives exactly once.
    wait_for(
        Duration::from_secs(180),
        || (sink.by_message_id("/hook").len() >= 300).then_some(()),
        || format!("300 deliveries; got {}; server:\n{}", sink.by_message_id("/hook").len(), server.stderr_tail(30)),
    );
    std::thread::sleep(Duration::from_secs(2));
    let got = sink.by_message_id("/hook");
    let expected: std::collections::BTreeSet<String> = (0..200).map(|i| format!("a-{i}")).chain((0..100).map(|i| format!("b-{i}"))).collect();
    assert_eq!(got.keys().cloned().collect::<std::collections::BTreeSet<_>>(), expected);
    let repeated: Vec<_> = got.iter().filter(|(_, v)| v.len() > 1).map(|(k, _)| k.clone()).collect();
    assert!(repeated.is_empty(), "delivered more than once: {repeated:?}");
    wait_for(
        Duration::from_secs(30),
        || (metric(&scrape(&sink, &server), "sluice_ingest_spool_depth") == 0.0).then_some(()),
        || "the spool to empty".into(),
    );
    let text = scrape(&sink, &server);
    assert!(metric(&text, "sluice_ingest_spool_drained_total") >= 90.0);
    assert_eq!(metric(&text, "sluice_dedup_published_total"), 300.0, "dedup published each unique event once");
    server.stop();
}

/// Two clusters: while the primary broker is down, new events go to the
/// secondary (acknowledged at once), dedup reads both, and once the primary
/// is back every event is delivered exactly once.
#[test]
fn kafka_failover_to_a_secondary_cluster_and_back() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let Some(mut primary) = Broker::start(&dir.path().join("primary"), "sluice-test-failover-primary") else { return };
    let Some(secondary) = Broker::start(&dir.path().join("secondary"), "sluice-test-failover-secondary") else { return };
    let sink = TestSink::start();
    let extra = format!("{}[log.kafka.secondary]\nbootstrap_servers = \"{}\"\n", hook_destination_toml(&sink.sink.url("/hook")), secondary.bootstrap);
    let config = write_kafka_config(dir.path(), &primary, &extra);
    let server = Server::start_with_env(&config, &[("SLUICE_INGEST__SPOOL_AFTER", "20s")]);

    let first: Vec<_> = (0..100).map(|i| track_event(&format!("f-{i}"), i)).collect();
    sink.post_batch(&server.addr, &first).unwrap();
    wait_for(Duration::from_secs(60), || (sink.by_message_id("/hook").len() >= 100).then_some(()), || server.stderr_tail(20));

    primary.stop();
    let second: Vec<_> = (0..100).map(|i| track_event(&format!("g-{i}"), i)).collect();
    for chunk in second.chunks(10) {
        sink.post_batch(&server.addr, chunk).expect("acknowledged while the primary is down");
    }
    // A client resend of an event the primary already has lands on the secondary.
    sink.post_batch(&server.addr, &first[..5]).unwrap();
    assert!(server.stderr_text().contains("new writes go to the secondary"), "writes moved to the secondary:\n{}", server.stderr_tail(20));
    let text = scrape(&sink, &server);
    assert_eq!(metric(&text, "sluice_ingest_spooled_total"), 0.0, "the secondary took them, not the spool");

    primary.restart().expect("restart the primary");
    wait_for(Duration::from_secs(120), || (sink.by_message_id("/hook").len() >= 200).then_some(()), || server.stderr_tail(30));
    std::thread::sleep(Duration::from_secs(3));
    let got = sink.by_message_id("/hook");
    assert_eq!(got.len(), 200);
    assert!(got.values().all(|v| v.len() == 1), "each event delivered once, the resends dropped by dedup");
    wait_for(Duration::from_secs(30), || server.stderr_text().contains("new writes go back to it").then_some(()), || server.stderr_tail(20));
    server.stop();
}
