//! `type = "kafka"` against the real binary and a real broker: every event
//! lands in the topic once (exactly once within the producer's session,
//! through a broker stop and restart under traffic), keyed by messageId or
//! by userId, with the `sluice-source` and `sluice-message-id` headers; a
//! destination whose brokers the SSRF guard refuses discards its jobs with
//! the reason; a URL that is not `kafka://host:port/topic` is refused at load.

mod util;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;
use util::*;

/// One message as read back.
#[derive(Debug, Clone)]
struct Read {
    key: String,
    headers: HashMap<String, String>,
    message_id: String,
}

/// Read `topic` (partition 0, from the start) until `want` distinct
/// messageIds are there, then a further second for late repeats; every message.
fn read_topic_until(bootstrap: &str, topic: &str, want: usize, timeout: Duration) -> Vec<Read> {
    read_topic_with(bootstrap, &[], topic, want, timeout)
}

/// [`read_topic_until`] with extra client settings (a secure link's).
fn read_topic_with(bootstrap: &str, settings: &[(&str, &str)], topic: &str, want: usize, timeout: Duration) -> Vec<Read> {
    let mut config = ClientConfig::new();
    for (k, v) in settings {
        config.set(*k, *v);
    }
    let consumer: BaseConsumer = config
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("test-reader-{topic}-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("log_level", "3")
        .create()
        .expect("a consumer");
    let mut partitions = TopicPartitionList::new();
    partitions.add_partition_offset(topic, 0, Offset::Beginning).unwrap();
    consumer.assign(&partitions).unwrap();
    let mut out: Vec<Read> = Vec::new();
    let deadline = Instant::now() + timeout;
    let mut full_at: Option<Instant> = None;
    while Instant::now() < deadline && full_at.is_none_or(|t| t.elapsed() < Duration::from_secs(1)) {
        // An error: the topic may not exist yet (it is made by the first message).
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            let headers = m
                .headers()
                .map(|h| h.iter().map(|h| (h.key.to_owned(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned())).collect())
                .unwrap_or_default();
            let body: Value = serde_json::from_slice(m.payload().unwrap_or_default()).expect("a JSON event");
            out.push(Read {
                key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                headers,
                message_id: body["messageId"].as_str().expect("a messageId").to_owned(),
            });
        }
        let distinct: std::collections::HashSet<&str> = out.iter().map(|r| r.message_id.as_str()).collect();
        if full_at.is_none() && distinct.len() >= want {
            full_at = Some(Instant::now());
        }
    }
    out
}

fn kafka_dest(id: &str, bootstrap: &str, topic: &str, extra: &str) -> String {
    format!(
        "[[destinations]]\nid = \"{id}\"\ntype = \"kafka\"\nurl = \"kafka://{bootstrap}/{topic}\"\n\
         request_timeout = \"60s\"\ninitial_backoff = \"200ms\"\nmax_backoff = \"1s\"\n{extra}\n"
    )
}

#[test]
fn kafka_destinations_publish_each_event_once_through_a_broker_restart() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut broker) = Broker::start(&dir.path().join("kafka"), "sluice-kafka-dest") else { return };
    let bootstrap = broker.bootstrap.clone();
    let sink = TestSink::start();
    // A topic whose `max.message.bytes` is under librdkafka's batch: a produce request of many
    // small messages is refused as too large, and each is then sent alone (none discarded).
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", &bootstrap).create().unwrap();
    let small = rdkafka::admin::NewTopic::new("small", 1, rdkafka::admin::TopicReplication::Fixed(1)).set("max.message.bytes", "2000");
    let made = sink.block_on(admin.create_topics([&small], &rdkafka::admin::AdminOptions::new())).unwrap();
    assert!(made.iter().all(Result::is_ok), "{made:?}");
    let extra = format!(
        "{}{}{}{}[[connections]]\nsource = \"{SOURCE_ID}\"\ndestinations = [\"lake\", \"users\", \"guarded\", \"small\"]\n",
        kafka_dest("small", &bootstrap, "small", "allow_private_network = true"),
        kafka_dest("lake", &bootstrap, "events", "allow_private_network = true"),
        kafka_dest("users", &bootstrap, "by-user", "allow_private_network = true\nkafka_key = \"user_id\"\nbatch_max_events = 7"),
        // 127.0.0.1 without allow_private_network: the guard refuses it.
        kafka_dest("guarded", &bootstrap, "never", ""),
    );
    let config = write_config(dir.path(), &extra);
    let server = Server::start(&config);
    let events: Vec<Value> = (0..300).map(|i| track_event(&format!("k-{i}"), i)).collect();
    let post = |range: std::ops::Range<usize>| {
        for chunk in events[range].chunks(25) {
            sink.post_batch(&server.addr, chunk).unwrap();
        }
    };

    post(0..100);
    let first = read_topic_until(&bootstrap, "events", 100, Duration::from_secs(60));
    assert!(first.len() >= 100, "{} of 100 before the stop", first.len());
    // The broker goes away under traffic and comes back on the same data and ports.
    broker.stop();
    post(100..200);
    std::thread::sleep(Duration::from_secs(3));
    broker.restart().expect("restart the broker");
    assert_eq!(broker.bootstrap, bootstrap);
    post(200..300);

    let lake = read_topic_until(&bootstrap, "events", 300, Duration::from_secs(90));
    let mut times: HashMap<&str, usize> = HashMap::new();
    for r in &lake {
        *times.entry(r.message_id.as_str()).or_default() += 1;
        assert_eq!(r.key, r.message_id, "keyed by messageId");
        assert_eq!(r.headers.get("sluice-source").map(String::as_str), Some(SOURCE_ID), "{r:?}");
        assert_eq!(r.headers.get("sluice-message-id"), Some(&r.message_id), "{r:?}");
    }
    assert_eq!(times.len(), 300, "every event in the topic");
    let repeated: Vec<_> = times.iter().filter(|(_, &n)| n > 1).collect();
    assert!(repeated.is_empty(), "exactly once within the producer's session: {repeated:?}");

    let users = read_topic_until(&bootstrap, "by-user", 300, Duration::from_secs(60));
    let by_id: HashMap<&str, &Read> = users.iter().map(|r| (r.message_id.as_str(), r)).collect();
    assert_eq!((by_id.len(), users.len()), (300, 300), "every event once");
    for (i, e) in events.iter().enumerate() {
        let r = by_id[e["messageId"].as_str().unwrap()];
        assert_eq!(r.key, format!("user-{i}"), "keyed by userId");
    }

    // The topic whose `max.message.bytes` is under librdkafka's batch: each event went alone.
    let counts = wait_for(
        Duration::from_secs(60),
        || {
            let c = stats_for(&jobs_stats(&config), "small");
            (c.get("succeeded").copied().unwrap_or(0) + c.get("discarded").copied().unwrap_or(0) == 300).then_some(c)
        },
        || format!("{:?}", stats_for(&jobs_stats(&config), "small")),
    );
    assert_eq!(counts.get("succeeded"), Some(&300), "each event fits the topic alone: {counts:?}");

    // The refused destination: discarded, the reason recorded, nothing published.
    let counts = wait_for(
        Duration::from_secs(30),
        || {
            let c = stats_for(&jobs_stats(&config), "guarded");
            (c.get("discarded").copied() == Some(300)).then_some(c)
        },
        || format!("{:?}", stats_for(&jobs_stats(&config), "guarded")),
    );
    assert_eq!(counts.get("succeeded"), None, "{counts:?}");
    let inspected = jobs_inspect_json(&config, "k-0").unwrap().to_string();
    assert!(inspected.contains("SSRF guard"), "{inspected}");
    server.stop();

    // A kafka URL is checked at load, naming the key.
    let (ok, stderr) = config_check(dir.path(), "[[destinations]]\nid = \"k\"\ntype = \"kafka\"\nurl = \"kafka://127.0.0.1:9092\"\n");
    assert!(!ok && stderr.contains("destinations[0].url") && stderr.contains("topic"), "{stderr}");
}

/// Commit point 4 for `kafka`: a crash between the broker's acknowledgement
/// and the `succeeded` rows (the crash point `deliver.after_http_success`)
/// makes the restarted director publish those jobs again — every event is
/// in the topic, and only events whose job was `executing` at the crash may
/// be there twice (at least once across producer sessions, as documented).
#[test]
fn a_crash_after_publishing_loses_nothing_and_repeats_only_executing_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let Some(broker) = Broker::start(&dir.path().join("kafka"), "sluice-kafka-crash") else { return };
    let sink = TestSink::start();
    let data = dir.path().join("data");
    let extra = format!(
        "{}[[connections]]\nsource = \"{SOURCE_ID}\"\ndestinations = [\"lake\"]\n",
        kafka_dest("lake", &broker.bootstrap, "crash", "allow_private_network = true\nbatch_max_events = 10\nmax_in_flight = 2")
    );
    let config = write_config(dir.path(), &extra);
    let executing = crash_after_delivery(&sink, &config, &[]);
    let before: std::collections::HashSet<String> =
        read_topic_until(&broker.bootstrap, "crash", usize::MAX, Duration::from_secs(3)).into_iter().map(|r| r.message_id).collect();
    assert!(!before.is_empty() && before.len() < 200, "the crash came mid-delivery ({} published)", before.len());

    let acked = read_input(&data).len();
    let server = Server::start(&config);
    let after = read_topic_until(&broker.bootstrap, "crash", acked, Duration::from_secs(90));
    let mut times: HashMap<&str, usize> = HashMap::new();
    for r in &after {
        *times.entry(r.message_id.as_str()).or_default() += 1;
    }
    assert_eq!(times.len(), acked, "every acknowledged event is in the topic");
    for (id, n) in &times {
        assert!(*n == 1 || executing.contains(*id), "{id} is there {n} times but was not executing at the crash");
    }
    eprintln!(
        "{} published before the crash; {} executing then; {} repeated",
        before.len(),
        executing.len(),
        times.values().filter(|&&n| n > 1).count()
    );
    server.stop();
}

/// A destination's own secure link: SCRAM-SHA-512 over TLS, the broker's
/// certificate checked against `kafka_tls_ca` (PEM text in the config);
/// every event lands once. With a wrong password nothing is published and
/// the job says why (librdkafka's authentication report).
#[test]
fn kafka_destinations_publish_over_sasl_ssl_with_their_own_credentials() {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let (Some(sasl_ssl), Some(certs)) = (var("SLUICE_TEST_KAFKA_SASL_SSL_BOOTSTRAP"), var("SLUICE_TEST_CERT_DIR")) else {
        assert!(var("SLUICE_REQUIRE_KAFKA").is_none(), "SLUICE_REQUIRE_KAFKA is set but the secure broker is not (scripts/test.sh)");
        eprintln!("skipped: no secure Kafka broker (scripts/test.sh starts one)");
        return;
    };
    let user = var("SLUICE_TEST_KAFKA_SCRAM_USER").unwrap_or_else(|| "sluice".into());
    let password = var("SLUICE_TEST_KAFKA_SCRAM_PASSWORD").unwrap_or_else(|| "sluice-secret".into());
    let ca_path = std::path::Path::new(&certs).join("ca.pem");
    let ca = std::fs::read_to_string(&ca_path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sink = TestSink::start();
    let topic = format!("secure-{}", std::process::id());
    let link = |pw: &str| {
        format!(
            "allow_private_network = true\nkafka_security_protocol = \"sasl_ssl\"\nkafka_sasl_mechanism = \"SCRAM-SHA-512\"\n\
             kafka_sasl_username = \"{user}\"\nkafka_sasl_password = \"{pw}\"\nkafka_tls_ca = {}\n",
            serde_json::to_string(&ca).unwrap()
        )
    };
    let extra = format!(
        "{}{}[[connections]]\nsource = \"{SOURCE_ID}\"\ndestinations = [\"secure\", \"wrong\"]\n",
        kafka_dest("secure", &sasl_ssl, &topic, &link(&password)),
        kafka_dest("wrong", &sasl_ssl, "never", &link("not-the-password")).replace("request_timeout = \"60s\"", "request_timeout = \"5s\"")
    );
    let config = write_config(dir.path(), &extra);
    let server = Server::start(&config);
    let events: Vec<Value> = (0..50).map(|i| track_event(&format!("t-{i}"), i)).collect();
    for chunk in events.chunks(25) {
        sink.post_batch(&server.addr, chunk).unwrap();
    }
    let ca_file = ca_path.to_str().unwrap();
    let settings = [
        ("security.protocol", "sasl_ssl"),
        ("ssl.ca.location", ca_file),
        ("sasl.mechanisms", "SCRAM-SHA-512"),
        ("sasl.username", user.as_str()),
        ("sasl.password", password.as_str()),
    ];
    let read = read_topic_with(&sasl_ssl, &settings, &topic, 50, Duration::from_secs(60));
    let ids: std::collections::HashSet<&str> = read.iter().map(|r| r.message_id.as_str()).collect();
    assert_eq!((ids.len(), read.len()), (50, 50), "every event once over the secure link");

    // The wrong password: retried, and the job says why.
    let why = wait_for(
        Duration::from_secs(60),
        || {
            let inspected = jobs_inspect_json(&config, "t-0").ok()?.to_string();
            (inspected.contains("uthentication")).then_some(inspected)
        },
        || jobs_inspect_json(&config, "t-0").map(|v| v.to_string()).unwrap_or_else(|e| e),
    );
    assert!(!why.contains("not-the-password"), "the password is not shown: {why}");
    server.stop();

    // Keys that do not fit the link are refused at load, naming the key.
    let (ok, stderr) =
        config_check(dir.path(), "[[destinations]]\nid = \"k\"\ntype = \"kafka\"\nurl = \"kafka://h:1/t\"\nkafka_security_protocol = \"sasl_ssl\"\n");
    assert!(!ok && stderr.contains("kafka_sasl_mechanism"), "{stderr}");
}
