//! The `Log` contract, one suite run against every backend: the embedded
//! log, rdkafka's in-process `MockCluster`, and a real Apache Kafka broker.
//!
//! The real broker's address comes from `SLUICE_TEST_KAFKA_BOOTSTRAP`
//! (`scripts/test.sh` starts one with `scripts/kafka.sh`). Without it the
//! real-broker tests are skipped with a message, unless
//! `SLUICE_REQUIRE_KAFKA=1`, when they fail.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rdkafka::mocking::MockCluster;
use sluice_log::{Checkpoint, EmbeddedLog, KafkaLog, KafkaOptions, Log, LogError, LogOptions, Publish, Record};

fn rec(key: &str, value: &str) -> Record {
    Record { key: Bytes::from(key.to_owned()), value: Bytes::from(value.to_owned()) }
}

/// Topic names unique to one test, so tests can share a broker.
fn unique(name: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{name}-{}-{}-{n}", std::process::id(), std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis())
}

/// A log under test plus whatever keeps it alive.
struct Backend {
    log: Arc<dyn Log>,
    /// For Kafka backends: how to connect a second, independent client.
    kafka: Option<KafkaOptions>,
    _keep: Box<dyn std::any::Any + Send + Sync>,
}

const PARTITIONS: u32 = 3;

fn kafka_options(bootstrap: &str, topics: &[String]) -> KafkaOptions {
    let mut o = KafkaOptions::new(bootstrap, topics.iter().map(|t| (t.clone(), PARTITIONS)).collect());
    o.request_timeout = Duration::from_secs(20);
    o.produce_timeout = Duration::from_secs(10);
    // Shorter group timings so rebalances settle quickly in tests.
    o.settings = vec![("session.timeout.ms".into(), "6000".into()), ("heartbeat.interval.ms".into(), "500".into())];
    o
}

fn kafka_backend(bootstrap: String, topics: &[String], keep: Box<dyn std::any::Any + Send + Sync>) -> Backend {
    let options = kafka_options(&bootstrap, topics);
    let log: Arc<dyn Log> = Arc::new(KafkaLog::connect(options.clone()).expect("connect to Kafka"));
    Backend { log, kafka: Some(options), _keep: keep }
}

impl Backend {
    /// A second client of the same Kafka cluster.
    async fn connect_again(&self) -> Arc<dyn Log> {
        let options = self.kafka.clone().expect("a Kafka backend");
        Arc::new(tokio::task::spawn_blocking(move || KafkaLog::connect(options)).await.unwrap().expect("connect to Kafka"))
    }
}

fn embedded(topics: &[String]) -> Option<Backend> {
    let dir = tempfile::tempdir().unwrap();
    let options = LogOptions { topics: topics.iter().map(|t| (t.clone(), PARTITIONS)).collect(), ..LogOptions::default() };
    let log: Arc<dyn Log> = Arc::new(EmbeddedLog::open(dir.path(), options).unwrap());
    Some(Backend { log, kafka: None, _keep: Box::new(dir) })
}

struct Mock(#[allow(dead_code)] MockCluster<'static, rdkafka::producer::DefaultProducerContext>);
// The mock cluster is only created and dropped, never shared across threads.
#[allow(unsafe_code)]
unsafe impl Send for Mock {}
#[allow(unsafe_code)]
unsafe impl Sync for Mock {}

/// A fresh in-process mock cluster. It has no CreateTopics, so the topics
/// are made through its own API first (`KafkaLog` then finds them).
fn mock_cluster(topics: &[String]) -> MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
    let cluster = MockCluster::new(1).expect("start MockCluster");
    for t in topics {
        cluster.create_topic(t, PARTITIONS as i32, 1).expect("create mock topic");
    }
    cluster
}

fn mock(topics: &[String]) -> Option<Backend> {
    let cluster = mock_cluster(topics);
    let bootstrap = cluster.bootstrap_servers();
    Some(kafka_backend(bootstrap, topics, Box::new(Mock(cluster))))
}

/// The prefix of [`mock_prefixed`]'s log.
const PREFIX: &str = "cell-7.";

/// A mock cluster whose topics carry a prefix, and a log given that prefix:
/// the whole contract holds with the callers' names, and the names on the
/// cluster are the prefixed ones (its topics exist only under them).
fn mock_prefixed(topics: &[String]) -> Option<Backend> {
    let on_cluster: Vec<String> = topics.iter().map(|t| format!("{PREFIX}{t}")).collect();
    let cluster = mock_cluster(&on_cluster);
    let mut options = kafka_options(&cluster.bootstrap_servers(), topics);
    options.topic_prefix = PREFIX.into();
    let log: Arc<dyn Log> = Arc::new(KafkaLog::connect(options.clone()).expect("connect to Kafka"));
    Some(Backend { log, kafka: Some(options), _keep: Box::new(Mock(cluster)) })
}

fn real(topics: &[String]) -> Option<Backend> {
    match std::env::var("SLUICE_TEST_KAFKA_BOOTSTRAP") {
        Ok(b) if !b.is_empty() => Some(kafka_backend(b, topics, Box::new(()))),
        _ if std::env::var("SLUICE_REQUIRE_KAFKA").as_deref() == Ok("1") => {
            panic!("SLUICE_REQUIRE_KAFKA=1 but SLUICE_TEST_KAFKA_BOOTSTRAP is not set (scripts/kafka.sh start prints it)")
        }
        _ => {
            eprintln!("skipped: set SLUICE_TEST_KAFKA_BOOTSTRAP to run the suite against a real Kafka broker");
            None
        }
    }
}

/// Build the backend on a blocking thread (connecting waits on the network).
async fn make(factory: fn(&[String]) -> Option<Backend>, topics: &[String]) -> Option<Backend> {
    let topics = topics.to_vec();
    tokio::task::spawn_blocking(move || factory(&topics)).await.unwrap()
}

async fn wait_for<F: Fn() -> bool>(what: &str, limit: Duration, f: F) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---- the contract -------------------------------------------------------

async fn append_and_read_back(factory: fn(&[String]) -> Option<Backend>) {
    let t = unique("input");
    let Some(b) = make(factory, std::slice::from_ref(&t)).await else { return };
    let log = &b.log;
    assert_eq!(log.partitions(&t).unwrap(), PARTITIONS);
    let first = log.append(&t, 1, (0..10).map(|i| rec(&format!("k{i}"), &format!("v{i}"))).collect()).await.unwrap();
    let second = log.append(&t, 1, vec![rec("k10", "v10")]).await.unwrap();
    assert!(second > first, "offsets grow: {first} then {second}");

    let mut got = Vec::new();
    let mut next = 0;
    while got.len() < 11 {
        let batch = log.read_batch(&t, 1, next, 4).await.unwrap();
        assert!(batch.records.len() <= 4, "at most max_records");
        assert!(!batch.records.is_empty(), "records remain, so a read returns some");
        assert!(batch.next > batch.records.last().unwrap().offset);
        next = batch.next;
        got.extend(batch.records);
    }
    let keys: Vec<_> = got.iter().map(|r| String::from_utf8(r.key.to_vec()).unwrap()).collect();
    assert_eq!(keys, (0..11).map(|i| format!("k{i}")).collect::<Vec<_>>());
    assert_eq!(got[3].value, Bytes::from("v3"));
    assert!(got.windows(2).all(|w| w[0].offset < w[1].offset));
    assert!(got[0].timestamp_ms > 1_600_000_000_000, "append time in ms: {}", got[0].timestamp_ms);

    // From the middle, and at the end.
    let mid = log.read(&t, 1, got[5].offset, 100).await.unwrap();
    assert_eq!(mid.first().unwrap().key, got[5].key);
    assert!(mid.len() <= 6 && mid.iter().zip(&got[5..]).all(|(a, b)| a == b));
    let end = log.offsets(&t, 1).await.unwrap().end;
    assert!(end > got[10].offset);
    let at_end = log.read_batch(&t, 1, end, 100).await.unwrap();
    assert!(at_end.records.is_empty());
    // Other partitions are untouched.
    assert!(log.read(&t, 0, 0, 10).await.unwrap().is_empty());
    assert_eq!(log.offsets(&t, 0).await.unwrap().end, 0);
}

async fn group_offsets(factory: fn(&[String]) -> Option<Backend>) {
    let t = unique("input");
    let Some(b) = make(factory, std::slice::from_ref(&t)).await else { return };
    let log = &b.log;
    let group = unique("g");
    assert_eq!(log.committed(&group, &t, 0).await.unwrap(), None);
    log.append(&t, 0, (0..5).map(|i| rec(&i.to_string(), "x")).collect()).await.unwrap();
    log.commit(Checkpoint { group: &group, topic: &t, partition: 0, next_offset: 3 }).await.unwrap();
    assert_eq!(log.committed(&group, &t, 0).await.unwrap(), Some(3));
    assert_eq!(log.committed(&group, &t, 1).await.unwrap(), None, "per partition");
    assert_eq!(log.committed(&unique("other"), &t, 0).await.unwrap(), None, "per group");
    log.commit(Checkpoint { group: &group, topic: &t, partition: 0, next_offset: 5 }).await.unwrap();
    assert_eq!(log.committed(&group, &t, 0).await.unwrap(), Some(5));
    if b.kafka.is_some() {
        let other = b.connect_again().await;
        assert_eq!(other.committed(&group, &t, 0).await.unwrap(), Some(5), "kept by the cluster, not the client");
    }
}

async fn unknown_topics_and_partitions(factory: fn(&[String]) -> Option<Backend>) {
    let t = unique("input");
    let Some(b) = make(factory, std::slice::from_ref(&t)).await else { return };
    let log = &b.log;
    assert!(matches!(log.partitions("nope"), Err(LogError::UnknownTopic(_))));
    assert!(matches!(log.append("nope", 0, vec![rec("a", "b")]).await, Err(LogError::UnknownTopic(_))));
    assert!(matches!(log.append(&t, PARTITIONS, vec![rec("a", "b")]).await, Err(LogError::UnknownPartition { .. })));
    assert!(matches!(log.read(&t, PARTITIONS, 0, 1).await, Err(LogError::UnknownPartition { .. })));
}

async fn publish_and_commit(factory: fn(&[String]) -> Option<Backend>) {
    let (input, output) = (unique("input"), unique("output"));
    let Some(b) = make(factory, &[input.clone(), output.clone()]).await else { return };
    let log = &b.log;
    let group = unique("dedup");
    log.append(&input, 2, (0..4).map(|i| rec(&i.to_string(), "in")).collect()).await.unwrap();
    let first = log
        .publish_and_commit(Publish {
            out_topic: &output,
            records: vec![rec("a", "1"), rec("b", "2")],
            commit: Checkpoint { group: &group, topic: &input, partition: 2, next_offset: 4 },
            replay_from: Some(1),
        })
        .await
        .unwrap();
    assert!(first.is_some());
    assert_eq!(log.committed(&group, &input, 2).await.unwrap(), Some(4));
    // Kafka keeps the replay point with the offset; the embedded log has none.
    let replay = if log.atomic_publish_and_commit(&input) { Some(1) } else { Some(4) };
    assert_eq!(log.resume_point(&group, &input, 2).await.unwrap(), replay);
    let batch = log.read_batch(&output, 2, 0, 10).await.unwrap();
    let keys: Vec<_> = batch.records.iter().map(|r| r.key.clone()).collect();
    assert_eq!(keys, vec![Bytes::from("a"), Bytes::from("b")]);
    assert_eq!(batch.records[0].offset, first.unwrap());
    // Nothing to publish: only the offset moves.
    assert_eq!(
        log.publish_and_commit(Publish {
            out_topic: &output,
            records: vec![],
            commit: Checkpoint { group: &group, topic: &input, partition: 2, next_offset: 9 },
            replay_from: None
        })
        .await
        .unwrap(),
        None
    );
    assert_eq!(log.committed(&group, &input, 2).await.unwrap(), Some(9));
    assert_eq!(log.resume_point(&group, &input, 2).await.unwrap(), Some(9), "a commit without a replay point drops it");
    // A second transaction follows the first, and a reader resuming from
    // `next` finds exactly the new records (transaction markers skipped).
    log.publish_and_commit(Publish {
        out_topic: &output,
        records: vec![rec("c", "3")],
        commit: Checkpoint { group: &group, topic: &input, partition: 2, next_offset: 10 },
        replay_from: None,
    })
    .await
    .unwrap();
    let more = log.read_batch(&output, 2, batch.next, 10).await.unwrap();
    assert_eq!(more.records.iter().map(|r| r.key.clone()).collect::<Vec<_>>(), vec![Bytes::from("c")]);
    let end = log.offsets(&output, 2).await.unwrap().end;
    let tail = log.read_batch(&output, 2, more.next, 10).await.unwrap();
    assert!(tail.records.is_empty());
    assert_eq!(tail.next.max(more.next), end, "resuming from next reaches the end (lag 0)");
}

async fn concurrent_appends(factory: fn(&[String]) -> Option<Backend>) {
    let t = unique("input");
    let Some(b) = make(factory, std::slice::from_ref(&t)).await else { return };
    let mut tasks = Vec::new();
    for task in 0..6 {
        let (log, t) = (b.log.clone(), t.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..5 {
                log.append(&t, 0, (0..10).map(|j| rec(&format!("{task}-{i}-{j}"), "v")).collect()).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let mut keys = Vec::new();
    let mut next = 0;
    loop {
        let batch = b.log.read_batch(&t, 0, next, 50).await.unwrap();
        if batch.records.is_empty() {
            break;
        }
        next = batch.next;
        keys.extend(batch.records.into_iter().map(|r| String::from_utf8(r.key.to_vec()).unwrap()));
    }
    assert_eq!(keys.len(), 300, "every record exactly once");
    assert_eq!(keys.iter().collect::<BTreeSet<_>>().len(), 300);
    // Each appender's records keep their order.
    for task in 0..6 {
        let mine: Vec<_> = keys.iter().filter(|k| k.starts_with(&format!("{task}-"))).cloned().collect();
        let expected: Vec<_> = (0..5).flat_map(|i| (0..10).map(move |j| format!("{task}-{i}-{j}"))).collect();
        assert_eq!(mine, expected);
    }
}

async fn single_member_owns_everything(factory: fn(&[String]) -> Option<Backend>) {
    let t = unique("input");
    let Some(b) = make(factory, std::slice::from_ref(&t)).await else { return };
    let membership = b.log.join(&unique("g"), &t).unwrap();
    let all: BTreeSet<u32> = (0..PARTITIONS).collect();
    wait_for("the assignment", Duration::from_secs(30), || membership.owned() == all).await;
}

macro_rules! suite {
    ($backend:ident) => {
        mod $backend {
            #[tokio::test(flavor = "multi_thread")]
            async fn append_and_read_back() {
                super::append_and_read_back(super::$backend).await
            }
            #[tokio::test(flavor = "multi_thread")]
            async fn group_offsets() {
                super::group_offsets(super::$backend).await
            }
            #[tokio::test(flavor = "multi_thread")]
            async fn unknown_topics_and_partitions() {
                super::unknown_topics_and_partitions(super::$backend).await
            }
            #[tokio::test(flavor = "multi_thread")]
            async fn concurrent_appends() {
                super::concurrent_appends(super::$backend).await
            }
            #[tokio::test(flavor = "multi_thread")]
            async fn single_member_owns_everything() {
                super::single_member_owns_everything(super::$backend).await
            }
        }
    };
}

suite!(embedded);
suite!(mock);
suite!(mock_prefixed);
suite!(real);

// rdkafka's MockCluster accepts transactions but keeps no transactional
// offset commits and fences nobody, so these run on the other two only.
macro_rules! transactions {
    ($name:ident, $backend:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread")]
            async fn publish_and_commit() {
                super::publish_and_commit(super::$backend).await
            }
        }
    };
}

transactions!(embedded_transactions, embedded);
transactions!(real_transactions, real);

// ---- Kafka only ---------------------------------------------------------

/// Two members split the partitions between them; when one leaves, the
/// other takes its partitions over (cooperative-sticky rebalancing).
async fn members_split_and_take_over(factory: fn(&[String]) -> Option<Backend>) {
    let t = unique("input");
    let Some(b) = make(factory, std::slice::from_ref(&t)).await else { return };
    let log2 = b.connect_again().await;
    let group = unique("g");
    let all: BTreeSet<u32> = (0..PARTITIONS).collect();
    let m1 = b.log.join(&group, &t).unwrap();
    wait_for("the first member's assignment", Duration::from_secs(30), || m1.owned() == all).await;
    let m2 = log2.join(&group, &t).unwrap();
    wait_for("a split between two members", Duration::from_secs(60), || {
        let (a, c) = (m1.owned(), m2.owned());
        !a.is_empty() && !c.is_empty() && a.is_disjoint(&c) && a.union(&c).copied().collect::<BTreeSet<_>>() == all
    })
    .await;
    drop(m2); // leaves the group
    wait_for("the survivor to own everything", Duration::from_secs(60), || m1.owned() == all).await;
}

/// A second publisher of the same input partition fences the first: the
/// first's next transaction fails, and none of its records become visible.
async fn a_second_publisher_fences_the_first(factory: fn(&[String]) -> Option<Backend>) {
    let (input, output) = (unique("input"), unique("output"));
    let Some(b) = make(factory, &[input.clone(), output.clone()]).await else { return };
    let zombie = &b.log;
    let group = unique("dedup");
    zombie
        .publish_and_commit(Publish {
            out_topic: &output,
            records: vec![rec("z1", "")],
            commit: Checkpoint { group: &group, topic: &input, partition: 0, next_offset: 1 },
            replay_from: None,
        })
        .await
        .unwrap();
    let successor = b.connect_again().await;
    successor
        .publish_and_commit(Publish {
            out_topic: &output,
            records: vec![rec("s1", "")],
            commit: Checkpoint { group: &group, topic: &input, partition: 0, next_offset: 2 },
            replay_from: None,
        })
        .await
        .unwrap();
    let fenced = zombie
        .publish_and_commit(Publish {
            out_topic: &output,
            records: vec![rec("z2", "")],
            commit: Checkpoint { group: &group, topic: &input, partition: 0, next_offset: 3 },
            replay_from: None,
        })
        .await;
    assert!(fenced.is_err(), "the zombie must be fenced, got {fenced:?}");
    let keys: Vec<_> = successor.read(&output, 0, 0, 10).await.unwrap().into_iter().map(|r| r.key).collect();
    assert_eq!(keys, vec![Bytes::from("z1"), Bytes::from("s1")], "the fenced record is never visible");
    assert_eq!(successor.committed(&group, &input, 0).await.unwrap(), Some(2));
}

/// An existing topic whose partition count differs is refused: Sluice
/// partitions by messageId itself.
async fn a_topic_with_another_partition_count_is_refused(factory: fn(&[String]) -> Option<Backend>) {
    let t = unique("input");
    let Some(b) = make(factory, std::slice::from_ref(&t)).await else { return };
    let mut options = b.kafka.clone().unwrap();
    options.topics = vec![(t.clone(), PARTITIONS + 1)];
    let err = tokio::task::spawn_blocking(move || KafkaLog::connect(options)).await.unwrap().unwrap_err();
    assert!(matches!(err, LogError::Config(ref m) if m.contains("partitions")), "{err}");
}

macro_rules! kafka_suite {
    ($name:ident, $backend:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread")]
            async fn members_split_and_take_over() {
                super::members_split_and_take_over(super::$backend).await
            }
            #[tokio::test(flavor = "multi_thread")]
            async fn a_topic_with_another_partition_count_is_refused() {
                super::a_topic_with_another_partition_count_is_refused(super::$backend).await
            }
        }
    };
}

kafka_suite!(mock_kafka, mock);
kafka_suite!(mock_prefixed_kafka, mock_prefixed);
kafka_suite!(real_kafka, real);

#[tokio::test(flavor = "multi_thread")]
async fn real_kafka_a_second_publisher_fences_the_first() {
    a_second_publisher_fences_the_first(real).await
}

/// With its broker down, an append fails within the produce timeout rather
/// than hanging, and says why.
#[tokio::test(flavor = "multi_thread")]
async fn mock_broker_down_fails_appends() {
    let t = unique("input");
    let cluster = mock_cluster(std::slice::from_ref(&t));
    let bootstrap = cluster.bootstrap_servers();
    let mut options = kafka_options(&bootstrap, std::slice::from_ref(&t));
    options.produce_timeout = Duration::from_secs(2);
    let log = tokio::task::spawn_blocking(move || KafkaLog::connect(options)).await.unwrap().unwrap();
    log.append(&t, 0, vec![rec("a", "1")]).await.unwrap();
    cluster.broker_down(1).unwrap();
    let started = Instant::now();
    let err = log.append(&t, 0, vec![rec("b", "2")]).await.unwrap_err();
    assert!(matches!(err, LogError::Kafka { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30), "bounded by the produce timeout");
    cluster.broker_up(1).unwrap();
    // Once the broker is back, appends succeed again (after reconnecting).
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Err(e) = log.append(&t, 0, vec![rec("c", "3")]).await {
        assert!(Instant::now() < deadline, "appends never recovered: {e}");
    }
}

/// Two logs with different topic prefixes on one real broker (two cells
/// sharing a Kafka cluster): the same names (`input`, group `dedup`) are
/// different topics and groups, and neither sees the other's records or offsets.
#[tokio::test(flavor = "multi_thread")]
async fn real_kafka_prefixes_keep_cells_apart() {
    let Ok(bootstrap) = std::env::var("SLUICE_TEST_KAFKA_BOOTSTRAP") else {
        if std::env::var("SLUICE_REQUIRE_KAFKA").as_deref() == Ok("1") {
            panic!("SLUICE_REQUIRE_KAFKA=1 but SLUICE_TEST_KAFKA_BOOTSTRAP is not set");
        }
        return;
    };
    let run = unique("cells");
    let logs: Vec<Arc<dyn Log>> = futures_for(&bootstrap, &[format!("{run}.a."), format!("{run}.b.")]).await;
    let (a, b) = (&logs[0], &logs[1]);
    a.append("input", 0, vec![rec("k", "from a")]).await.unwrap();
    b.append("input", 0, vec![rec("k", "from b"), rec("k2", "from b")]).await.unwrap();
    let read = |log: &Arc<dyn Log>| {
        let log = log.clone();
        async move { log.read("input", 0, 0, 10).await.unwrap().into_iter().map(|r| String::from_utf8(r.value.to_vec()).unwrap()).collect::<Vec<_>>() }
    };
    assert_eq!(read(a).await, ["from a"]);
    assert_eq!(read(b).await, ["from b", "from b"]);
    a.commit(Checkpoint { group: "dedup", topic: "input", partition: 0, next_offset: 1 }).await.unwrap();
    assert_eq!(a.committed("dedup", "input", 0).await.unwrap(), Some(1));
    assert_eq!(b.committed("dedup", "input", 0).await.unwrap(), None, "b's group dedup is another group");
}

async fn futures_for(bootstrap: &str, prefixes: &[String]) -> Vec<Arc<dyn Log>> {
    let mut out = Vec::new();
    for p in prefixes {
        let mut options = kafka_options(bootstrap, &["input".to_owned()]);
        options.topic_prefix = p.clone();
        out.push(Arc::new(tokio::task::spawn_blocking(move || KafkaLog::connect(options)).await.unwrap().expect("connect")) as Arc<dyn Log>);
    }
    out
}
