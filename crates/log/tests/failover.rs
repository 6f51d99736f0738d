//! Two Kafka clusters (rdkafka's in-process MockCluster): new writes move to
//! the secondary while the primary is down and come back when it recovers;
//! dedup's view reads the secondary's `input` as `input.secondary`.

use std::time::{Duration, Instant};

use bytes::Bytes;
use rdkafka::mocking::MockCluster;
use sluice_log::failover::{Active, SECONDARY_INPUT};
use sluice_log::{FailoverLog, KafkaLog, KafkaOptions, Log, Record};

fn rec(key: &str) -> Record {
    Record { key: Bytes::from(key.to_owned()), value: Bytes::from_static(b"{}") }
}

fn cluster(topics: &[&str]) -> MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
    let c = MockCluster::new(1).unwrap();
    for t in topics {
        c.create_topic(t, 2, 1).unwrap();
    }
    c
}

async fn connect(bootstrap: String, topics: &[&str]) -> KafkaLog {
    let mut o = KafkaOptions::new(bootstrap, topics.iter().map(|t| (t.to_string(), 2)).collect());
    o.produce_timeout = Duration::from_millis(1500);
    o.request_timeout = Duration::from_secs(5);
    tokio::task::spawn_blocking(move || KafkaLog::connect(o)).await.unwrap().unwrap()
}

async fn keys(log: &dyn Log, topic: &str, p: u32) -> Vec<String> {
    let mut out = Vec::new();
    let mut next = 0;
    loop {
        let b = log.read_batch(topic, p, next, 100).await.unwrap();
        if b.records.is_empty() {
            return out;
        }
        next = b.next;
        out.extend(b.records.iter().map(|r| String::from_utf8(r.key.to_vec()).unwrap()));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn writes_move_to_the_secondary_and_back() {
    let primary = cluster(&["input", "output"]);
    let secondary = cluster(&["input"]);
    let log = FailoverLog::new(
        connect(primary.bootstrap_servers(), &["input", "output"]).await,
        connect(secondary.bootstrap_servers(), &["input"]).await,
        Duration::from_secs(1),
    )
    .unwrap();
    assert_eq!(log.partitions(SECONDARY_INPUT).unwrap(), 2);
    assert_eq!(log.extra_inputs(), vec![SECONDARY_INPUT.to_owned()]);
    assert!(log.atomic_publish_and_commit("input") && !log.atomic_publish_and_commit(SECONDARY_INPUT));

    log.append("input", 0, vec![rec("p1")]).await.unwrap();
    assert_eq!(log.active(), Active::Primary);

    primary.broker_down(1).unwrap();
    for i in 0..4 {
        log.append("input", 0, vec![rec(&format!("s{i}"))]).await.expect("an append survives the primary's outage");
    }
    assert_eq!(log.active(), Active::Secondary, "three failed appends in a row move writes");
    // On the secondary now: no more waiting on the primary.
    let started = Instant::now();
    log.append("input", 0, vec![rec("s4")]).await.unwrap();
    assert!(started.elapsed() < Duration::from_millis(1500), "went straight to the secondary");
    assert_eq!(keys(&*log, SECONDARY_INPUT, 0).await, ["s0", "s1", "s2", "s3", "s4"]);

    primary.broker_up(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while log.active() != Active::Primary {
        assert!(Instant::now() < deadline, "writes never returned to the primary");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The next append is acknowledged, by the primary unless it is still
    // slow right after its return (then the secondary takes it): never lost.
    log.append("input", 0, vec![rec("p2")]).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let primary_keys = keys(&*log, "input", 0).await;
        let secondary_keys = keys(&*log, SECONDARY_INPUT, 0).await;
        assert_eq!(primary_keys.first().map(String::as_str), Some("p1"), "the primary keeps what it had");
        if primary_keys.iter().chain(&secondary_keys).any(|k| k == "p2") {
            break;
        }
        assert!(Instant::now() < deadline, "p2 is on neither cluster: {primary_keys:?} {secondary_keys:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(log.switches.load(std::sync::atomic::Ordering::Relaxed) >= 2, "away and back");
}
