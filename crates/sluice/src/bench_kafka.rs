//! `sluice bench e2e --destination-type kafka`: the destinations' topics,
//! made fresh for the run, and a reader that counts what lands in them into
//! the bench's sink (as if each message were a webhook request's event), so
//! the bench's pacing, counts and latencies work as for webhooks.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use sluice_deliver::sink::{Sink, SinkState};

/// Partitions of each destination's topic.
const PARTITIONS: i32 = 4;

/// The run's topics and the thread reading them (stopped on drop).
pub struct TopicReader {
    bootstrap: String,
    prefix: String,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TopicReader {
    /// Make one topic per destination id (`<prefix>-<id>`) and start reading
    /// them from the start; each message counts on the sink's path `/<id>`
    /// with its `sluice-message-id` header as the arrival key.
    pub fn start(rt: &tokio::runtime::Runtime, bootstrap: &str, destinations: &[String], sink: &Sink) -> Result<TopicReader> {
        let prefix =
            format!("sluice-bench-{}-{}", std::process::id(), std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis());
        let topics: Vec<String> = destinations.iter().map(|d| format!("{prefix}-{d}")).collect();
        let admin: AdminClient<DefaultClientContext> =
            ClientConfig::new().set("bootstrap.servers", bootstrap).set("log_level", "3").create().context("a Kafka admin client")?;
        let new: Vec<NewTopic> = topics.iter().map(|t| NewTopic::new(t, PARTITIONS, TopicReplication::Fixed(1))).collect();
        let made = rt
            .block_on(admin.create_topics(&new, &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)))))
            .with_context(|| format!("create the bench's topics on {bootstrap}"))?;
        for result in made {
            if let Err((topic, code)) = result {
                bail!("cannot create topic {topic}: {code:?}");
            }
        }
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", format!("{prefix}-reader"))
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "10")
            .set("log_level", "3")
            .create()
            .context("a Kafka consumer")?;
        let mut assignment = TopicPartitionList::new();
        for t in &topics {
            for p in 0..PARTITIONS {
                assignment.add_partition_offset(t, p, Offset::Beginning)?;
            }
        }
        consumer.assign(&assignment)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (state, stopped, topic_prefix) = (sink.state.clone(), stop.clone(), format!("{prefix}-"));
        let thread = std::thread::Builder::new().name("bench-kafka-reader".into()).spawn(move || read(&consumer, &state, &topic_prefix, &stopped))?;
        Ok(TopicReader { bootstrap: bootstrap.to_owned(), prefix, stop, thread: Some(thread) })
    }

    /// The `url` of destination `id`.
    pub fn url(&self, id: &str) -> String {
        format!("kafka://{}/{}-{id}", self.bootstrap, self.prefix)
    }
}

/// Poll until `stop`, counting each poll's messages per destination.
fn read(consumer: &BaseConsumer, state: &SinkState, topic_prefix: &str, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let Some(first) = consumer.poll(Duration::from_millis(100)) else { continue };
        let at = Instant::now();
        let mut by_path: std::collections::HashMap<String, Vec<String>> = std::collections::HashMap::new();
        let mut take = |m: &rdkafka::message::BorrowedMessage| {
            let path = format!("/{}", m.topic().strip_prefix(topic_prefix).unwrap_or(m.topic()));
            let key = m
                .headers()
                .and_then(|h| h.iter().find(|h| h.key == "sluice-message-id").and_then(|h| h.value).map(|v| String::from_utf8_lossy(v).into_owned()))
                .unwrap_or_default();
            by_path.entry(path).or_default().push(key);
        };
        match first {
            Ok(m) => take(&m),
            Err(e) => eprintln!("bench kafka reader: {e}"),
        }
        // Drain what is already fetched before counting.
        while let Some(Ok(m)) = consumer.poll(Duration::ZERO) {
            take(&m);
        }
        for (path, keys) in by_path {
            state.record_delivered(&path, keys, at);
        }
    }
}

impl Drop for TopicReader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
