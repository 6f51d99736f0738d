//! Apache Kafka as the [`Log`]: the scaled-out mode (DESIGN.md §1).
//!
//! Invariants, on top of the crate's contract:
//! - **Partitioning is ours.** Every record is produced to an explicit
//!   partition chosen by Sluice (`messageId` hash, `sluice_core::partition`),
//!   never by librdkafka's partitioner, so the embedded and Kafka modes put
//!   an event in the same partition.
//! - **Appends are acknowledged by all in-sync replicas** (`acks=all`) by an
//!   idempotent producer (`enable.idempotence=true`): a retried produce
//!   never duplicates or reorders records within a partition.
//! - **Readers see committed data only** (`isolation.level=read_committed`),
//!   so records of an aborted or still-open transaction are never read.
//!   Offsets therefore have gaps (transaction markers take one); callers
//!   advance with [`ReadBatch::next`], never with `last.offset + 1`
//!   arithmetic beyond one batch.
//! - **Publish-and-commit is one transaction** ([`Log::publish_and_commit`]):
//!   the records on the output partition and the consumer group's offset on
//!   the input partition become visible together or not at all. Each input
//!   partition has its own `transactional.id` (`<prefix>-<group>-<topic>-<p>`),
//!   so a second worker that takes the partition over fences the first:
//!   the zombie's next commit fails, and its open transaction is aborted.
//! - **A committed transaction may not have ended on `output`.** A broker
//!   restarting while it writes the markers can skip a partition's
//!   ("hanging" transaction): the input offset is committed, the records are
//!   not readable, and the next marker this producer writes there decides
//!   them — an abort of the next transaction aborts them too. So the input
//!   offset carries a replay point in its commit metadata
//!   (`sluice:replay_from=<offset>`, [`Log::resume_point`]): the input
//!   offset whose records a new owner reads again, until the caller knows
//!   the transactions since have ended. [`Log::fence`] ends a hanging
//!   transaction by committing it, and keeps the replay point.
//! - **Group membership** ([`Log::join`]) uses Kafka's consumer groups with
//!   cooperative-sticky assignment. The member consumer only tracks the
//!   assignment (its partitions are paused); records are read by separate
//!   per-partition readers, so the pull-based `read` of the trait works the
//!   same for both backends. Offsets of a group with a live member in this
//!   process are committed through that member (generation-checked).
//!
//! Every librdkafka call that can wait on the network runs on tokio's
//! blocking pool; the async executor threads never wait on Kafka.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientConfig, ClientContext, Message, Offset, TopicPartitionList};
use tokio::sync::watch;

use crate::{Checkpoint, Log, LogError, Membership, OffsetRange, Publish, ReadBatch, Record, StoredRecord};

/// How to reach and use a Kafka cluster.
#[derive(Debug, Clone)]
pub struct KafkaOptions {
    /// `host:port[,host:port…]`.
    pub bootstrap_servers: String,
    /// Topics and their partition counts; created when missing. An existing
    /// topic with another partition count is refused (partitioning is ours).
    pub topics: Vec<(String, u32)>,
    /// Replication factor of topics this log creates. They are created with
    /// `min.insync.replicas` = [`min_insync_replicas`] of it, and an existing
    /// topic with less is refused (see [`KafkaLog::connect`]).
    pub replication_factor: i32,
    /// `retention.ms` of topics this log creates, per topic (others: the
    /// broker's default). Existing topics are left as they are.
    pub retention: Vec<(String, Duration)>,
    /// An append not acknowledged within this time fails (`message.timeout.ms`).
    pub produce_timeout: Duration,
    /// Metadata, offset and commit requests fail after this long.
    pub request_timeout: Duration,
    /// A read with nothing to return waits up to this long for new records.
    pub read_wait: Duration,
    /// `client.id`, and the prefix of transactional ids.
    pub client_id: String,
    /// Extra librdkafka settings applied to every client (producers,
    /// consumers, admin), e.g. `socket.keepalive.enable`.
    pub settings: Vec<(String, String)>,
    /// How the link to the brokers is protected (TLS, SASL), and its name in errors.
    pub link: KafkaLink,
    /// Put before every topic and consumer group name on the cluster
    /// (`input` → `<prefix>input`), so several Sluice deployments (cells)
    /// share one cluster without meeting. Callers name topics and groups
    /// without it; `topics` and `retention` too.
    pub topic_prefix: String,
}

/// The protection of one Kafka link: librdkafka's `security.protocol`,
/// `ssl.*` and `sasl.*` settings, and the link's name in errors
/// (`kafka primary`). `Debug` never shows a password.
#[derive(Clone)]
pub struct KafkaLink {
    pub name: String,
    pub settings: Vec<(String, String)>,
}

impl Default for KafkaLink {
    fn default() -> Self {
        Self { name: "kafka".into(), settings: Vec::new() }
    }
}

impl std::fmt::Debug for KafkaLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown: Vec<(&str, &str)> =
            self.settings.iter().map(|(k, v)| (k.as_str(), if k.contains("password") { "***" } else { v.as_str() })).collect();
        f.debug_struct("KafkaLink").field("name", &self.name).field("settings", &shown).finish()
    }
}

impl KafkaOptions {
    pub fn new(bootstrap_servers: impl Into<String>, topics: Vec<(String, u32)>) -> Self {
        Self {
            bootstrap_servers: bootstrap_servers.into(),
            topics,
            replication_factor: 1,
            retention: Vec::new(),
            produce_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(10),
            read_wait: Duration::from_millis(50),
            client_id: "sluice".into(),
            settings: Vec::new(),
            link: KafkaLink::default(),
            topic_prefix: String::new(),
        }
    }

    fn base(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap_servers)
            .set("client.id", &self.client_id)
            // Fail fast and loudly on a misspelt host rather than retrying DNS forever.
            .set("socket.timeout.ms", self.request_timeout.as_millis().to_string())
            // Notice a restarted or moved partition leader within seconds.
            .set("topic.metadata.refresh.interval.ms", "10000")
            // Reconnect to a broker that came back within 2 s (default: up to 10 s).
            .set("reconnect.backoff.max.ms", "2000")
            .set("log_level", "3");
        for (k, v) in self.settings.iter().chain(&self.link.settings) {
            c.set(k, v);
        }
        c
    }

    /// How long an append waits for its delivery reports: librdkafka's
    /// own timeout, and then some.
    fn delivery_bound(&self) -> Duration {
        self.produce_timeout + self.request_timeout
    }

    fn producer(&self) -> ClientConfig {
        let mut c = self.base();
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "2")
            .set("message.timeout.ms", self.produce_timeout.as_millis().to_string());
        c
    }

    fn consumer(&self, group: &str) -> ClientConfig {
        let mut c = self.base();
        c.set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("isolation.level", "read_committed")
            .set("auto.offset.reset", "error")
            .set("enable.partition.eof", "true")
            // Prefetch modestly: one reader exists per partition read.
            .set("queued.max.messages.kbytes", "8192")
            .set("fetch.wait.max.ms", "100");
        c
    }
}

fn kafka(op: &'static str) -> impl Fn(KafkaError) -> LogError {
    move |e| LogError::Kafka { op, cause: e.to_string() }
}

/// The first client of a log: it remembers the last connection-level error
/// librdkafka reported (a failed TLS handshake, SASL authentication), which
/// a metadata timeout alone would not say.
struct ProbeContext {
    last: Mutex<Option<(RDKafkaErrorCode, String)>>,
}

impl ClientContext for ProbeContext {
    fn error(&self, error: KafkaError, reason: &str) {
        let code = error.rdkafka_error_code().unwrap_or(RDKafkaErrorCode::Fail);
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        // A TLS or authentication failure explains more than the transport
        // failure that follows it: keep it.
        let specific = |c: RDKafkaErrorCode| matches!(c, RDKafkaErrorCode::SSL | RDKafkaErrorCode::Authentication);
        if specific(code) || !last.as_ref().is_some_and(|(c, _)| specific(*c)) {
            *last = Some((code, reason.to_owned()));
        }
    }
}

impl ConsumerContext for ProbeContext {}

/// Check that the brokers answer, before any other client is made: a link
/// that fails (wrong CA, expired certificate, wrong password, a plain-text
/// client on a TLS port) is named with librdkafka's reason, e.g. `kafka
/// primary: TLS handshake failed: ssl://…: SSL handshake failed: …`.
fn probe(options: &KafkaOptions) -> Result<(), LogError> {
    let context = ProbeContext { last: Mutex::new(None) };
    let client: BaseConsumer<ProbeContext> = options.consumer("sluice-probe").create_with_context(context).map_err(kafka("create consumer"))?;
    let deadline = Instant::now() + options.request_timeout;
    loop {
        let wait = deadline.saturating_duration_since(Instant::now()).min(Duration::from_secs(1)).max(Duration::from_millis(100));
        let failed = match client.fetch_metadata(None, wait) {
            Ok(meta) if !meta.brokers().is_empty() => return Ok(()),
            Ok(_) => "no broker listed".to_owned(),
            Err(e) => e.to_string(),
        };
        // Connection errors reach the context only through the client's queue.
        let _ = client.poll(Duration::from_millis(100));
        let seen = client.context().last.lock().unwrap_or_else(|p| p.into_inner()).clone();
        // Authentication is not retried into the timeout: it will not heal.
        let hopeless = seen.as_ref().is_some_and(|(c, _)| matches!(c, RDKafkaErrorCode::SSL | RDKafkaErrorCode::Authentication));
        if hopeless || Instant::now() >= deadline {
            let link = &options.link.name;
            let servers = &options.bootstrap_servers;
            return Err(LogError::Unavailable(match seen {
                Some((RDKafkaErrorCode::Authentication, reason)) => format!("{link} ({servers}): SASL authentication failed: {reason}"),
                Some((code, reason)) if code == RDKafkaErrorCode::SSL || reason.contains("SSL") => {
                    format!("{link} ({servers}): TLS failed: {reason}")
                }
                Some((_, reason)) => format!("{link} ({servers}): no answer within {:?}: {reason}", options.request_timeout),
                None => format!("{link} ({servers}): no answer within {:?}: {failed}", options.request_timeout),
            }));
        }
    }
}

/// A reader's client context: end-of-partition is how a read learns it is
/// at the end, not an error worth logging.
struct ReaderContext;

impl ClientContext for ReaderContext {
    fn error(&self, error: KafkaError, reason: &str) {
        let eof = matches!(error, KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF));
        if !eof {
            tracing::warn!(%error, reason, "Kafka reader");
        }
    }
}

impl ConsumerContext for ReaderContext {}

/// Give `client` the bootstrap servers again (`rd_kafka_brokers_add`).
///
/// librdkafka 2.12 drops every broker a Metadata response does not list.
/// A broker in controlled shutdown answers Metadata with no broker at all
/// (KRaft has fenced it already), and a client that refreshes its metadata
/// in that instant is left with no broker: every later refresh is skipped
/// ("no usable brokers"), and its re-bootstrap timer, stopped by that last
/// (successful) answer, never starts again (confluentinc/librdkafka#5301).
/// A producer in that state times out every message for good, a consumer
/// fetches nothing, although the broker is back and serves everyone else.
/// Adding the bootstrap servers makes it connect and refresh again; when it
/// still knows a broker, the extra entry is dropped at its next metadata
/// refresh (as at startup).
#[allow(unsafe_code)] // one FFI call, SAFETY below
fn add_bootstrap<C: ClientContext>(client: &rdkafka::client::Client<C>, servers: &str) -> i32 {
    let Ok(list) = std::ffi::CString::new(servers) else { return 0 };
    // SAFETY: `native_ptr` is the live handle of `client`, borrowed for the
    // call; rd_kafka_brokers_add copies the string and takes the handle's
    // own lock (it may be called from any thread).
    unsafe { rdkafka::bindings::rd_kafka_brokers_add(client.native_ptr(), list.as_ptr()) }
}

/// Every 5 s, ask the long-lived clients (the producer, the group members)
/// for metadata; one that cannot get any twice in a row is given the
/// bootstrap servers again ([`add_bootstrap`]). Readers, committers and the
/// offsets client are replaced on failure instead; transactional producers
/// after any failed transaction. The thread ends with the log.
fn spawn_watchdog(inner: &Arc<Inner>) {
    let weak = Arc::downgrade(inner);
    let spawned = std::thread::Builder::new().name("kafka-watchdog".into()).spawn(move || {
        let mut failed: HashMap<String, u32> = HashMap::new();
        let mut check = |name: String, ok: bool, revive: &dyn Fn() -> i32| {
            let n = failed.entry(name.clone()).or_default();
            if ok {
                if *n >= 2 {
                    tracing::info!(client = %name, "Kafka client reaches the cluster again");
                }
                *n = 0;
                return;
            }
            *n += 1;
            // Every 6th failure (30 s) after the 2nd: an outage must not add entries forever.
            if *n == 2 || (*n > 2 && *n % 6 == 2) {
                let added = revive();
                tracing::warn!(
                    client = %name, failures = *n, added,
                    "Kafka client gets no metadata: bootstrap servers added to it again (librdkafka drops its brokers on a broker's controlled shutdown)"
                );
            }
        };
        loop {
            std::thread::sleep(Duration::from_secs(5));
            let Some(inner) = weak.upgrade() else { return };
            let topic = inner.partitions.keys().min().cloned().unwrap_or_default();
            let servers = inner.options.bootstrap_servers.clone();
            let probe = Duration::from_secs(2);
            let client = inner.producer.client();
            let ok = client.fetch_metadata(Some(&topic), probe).is_ok();
            check("producer".into(), ok, &|| add_bootstrap(client, &servers));
            let members: Vec<(String, Arc<Member>)> = inner
                .members
                .lock()
                .expect("members lock")
                .iter()
                .filter_map(|(g, m)| m.upgrade().map(|m| (g.clone(), m)))
                .collect();
            for (group, member) in members {
                let client = member.consumer.client();
                let ok = client.fetch_metadata(Some(&topic), probe).is_ok();
                check(format!("group member {group}"), ok, &|| add_bootstrap(client, &servers));
            }
        }
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the Kafka client watchdog thread");
    }
}

/// One partition's reader: a consumer assigned to just that partition, and
/// where the last read left it.
struct Reader {
    consumer: BaseConsumer<ReaderContext>,
    /// The offset the next read is expected to start at; a read from
    /// anywhere else re-assigns (seeks) first.
    next: Option<u64>,
    /// The consumer reported end-of-partition and has delivered nothing since.
    at_end: bool,
    /// Since when reads have found the broker's last stable offset past our
    /// position yet fetched nothing: a consumer that lost its fetch state
    /// (seen after broker restarts). Past [`STUCK_AFTER`] the read fails and
    /// the reader is replaced.
    stuck: Option<Instant>,
    /// Reads in a row that failed. Past a few, the reader is replaced: a
    /// consumer whose fetch state never recovered from a broker restart
    /// keeps failing (or keeps finding nothing) however often it re-assigns.
    failures: u32,
}

/// Errors a consumer reports while a broker is unreachable or coming back
/// (librdkafka queues one per failed connection attempt, and a reader that
/// is not polled meanwhile finds them all at its next read). They say
/// nothing about the partition being read: the consumer reconnects by
/// itself, so a read skips them and goes on waiting for records until its
/// deadline.
fn transient(e: &KafkaError) -> bool {
    use RDKafkaErrorCode::*;
    let code = match e {
        KafkaError::MessageConsumption(c) | KafkaError::Global(c) => *c,
        _ => return false,
    };
    matches!(
        code,
        BrokerTransportFailure
            | AllBrokersDown
            | Resolve
            | OperationTimedOut
            | RequestTimedOut
            | NetworkException
            | LeaderNotAvailable
            | NotLeaderForPartition
            | NotCoordinator
            | CoordinatorNotAvailable
    )
}

/// A reader needing a fresh consumer after this many failed reads in a row.
const READER_REPLACE_AFTER: u32 = 3;

/// How long a reader may find committed records past its position and
/// fetch none of them before the read fails and the reader is replaced.
const STUCK_AFTER: Duration = Duration::from_secs(5);

struct Inner {
    options: KafkaOptions,
    partitions: HashMap<String, u32>,
    producer: FutureProducer,
    /// For watermarks and the offsets of groups with no member here.
    /// Replaced after a failure: an idle client can stay "all brokers down"
    /// after its broker restarted (seen under load).
    offsets_client: Mutex<Arc<BaseConsumer>>,
    readers: Mutex<HashMap<(String, u32), Arc<Mutex<Reader>>>>,
    /// Non-member committers, per group (generation -1 commits).
    committers: Mutex<HashMap<String, Arc<BaseConsumer>>>,
    /// Live group members of this process, per group.
    members: Mutex<HashMap<String, Weak<Member>>>,
    /// Transactional producers, per `transactional.id`.
    transactional: Mutex<HashMap<String, Arc<FutureProducer>>>,
}

/// Apache Kafka as a [`Log`]. Cheap to clone.
#[derive(Clone)]
pub struct KafkaLog {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for KafkaLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaLog").field("bootstrap_servers", &self.inner.options.bootstrap_servers).finish()
    }
}

impl KafkaLog {
    /// Connect, create the missing topics, and check the existing ones'
    /// partition counts and `min.insync.replicas` (at least
    /// [`min_insync_replicas`] of the larger of the topic's replication and
    /// `replication_factor`; less is refused: with `acks=all` an append would
    /// rest on too few brokers). Blocks (call from a blocking context or at
    /// startup).
    pub fn connect(mut options: KafkaOptions) -> Result<KafkaLog, LogError> {
        // From here on the names are the cluster's: the prefix is put on at the `Log` methods.
        if !options.topic_prefix.is_empty() {
            let prefix = options.topic_prefix.clone();
            for (t, _) in options.topics.iter_mut() {
                *t = format!("{prefix}{t}");
            }
            for (t, _) in options.retention.iter_mut() {
                *t = format!("{prefix}{t}");
            }
        }
        probe(&options)?;
        let producer: FutureProducer = options.producer().create().map_err(kafka("create producer"))?;
        let offsets_client: BaseConsumer = options.consumer("sluice-offsets").create().map_err(kafka("create consumer"))?;
        let partitions = ensure_topics(&options, &offsets_client)?;
        let inner = Inner {
            options,
            partitions,
            producer,
            offsets_client: Mutex::new(Arc::new(offsets_client)),
            readers: Mutex::default(),
            committers: Mutex::default(),
            members: Mutex::default(),
            transactional: Mutex::default(),
        };
        let inner = Arc::new(inner);
        spawn_watchdog(&inner);
        Ok(KafkaLog { inner })
    }

    pub fn bootstrap_servers(&self) -> &str {
        &self.inner.options.bootstrap_servers
    }

    /// `name` (a topic or a group) as the cluster knows it: with the prefix.
    fn on_cluster<'a>(&self, name: &'a str) -> std::borrow::Cow<'a, str> {
        match self.inner.options.topic_prefix.as_str() {
            "" => std::borrow::Cow::Borrowed(name),
            prefix => std::borrow::Cow::Owned(format!("{prefix}{name}")),
        }
    }

    /// The readable range of the cluster's `topic` (a name with the prefix).
    async fn watermarks(&self, topic: &str, partition: u32) -> Result<OffsetRange, LogError> {
        self.inner.check(topic, partition)?;
        let topic = topic.to_owned();
        self.blocking(move |inner| inner.watermarks(&topic, partition)).await
    }

    /// One `transactional.id` per (group, input partition): its owner's fence.
    fn transactional_id(&self, group: &str, in_topic: &str, partition: u32) -> String {
        format!("{}-{group}-{in_topic}-{partition}", self.inner.options.client_id)
    }

    /// End the hanging transaction [`Inner::find_hanging`] found, with a
    /// transaction of the same id (so of the same producer id, at a newer
    /// epoch): one [`CLOSE_HANGING_KEY`] record on each partition it holds,
    /// and `group`'s offset as committed outside of any transaction. Its
    /// commit marker ends the hanging records' transaction too (a broker
    /// tracks one open transaction per producer id and partition), so they
    /// become readable; the offset it commits replaces the pending one, so
    /// dedup reads that batch of input again (its index, or the route's
    /// idempotent inserts, drop the repeats). Committing never loses what
    /// the hanging transaction held; aborting could.
    async fn close_hanging(
        &self,
        producer: &Arc<FutureProducer>,
        id: &str,
        group: &str,
        in_topic: &str,
        partition: u32,
        hanging: &Hanging,
    ) -> Result<(), LogError> {
        let result = async {
            producer.begin_transaction().map_err(kafka("begin transaction"))?;
            let marker = [Record { key: Bytes::from_static(CLOSE_HANGING_KEY), value: Bytes::new() }];
            for (topic, _, _) in &hanging.topics {
                produce(producer, topic, partition, &marker, self.inner.options.delivery_bound()).await?;
            }
            // The replay point kept with the materialized offset stays: if
            // this transaction fails, aborting it aborts the hanging records
            // too, and the next owner must read their input again.
            let offsets = offset_with_replay(in_topic, partition, hanging.resume, &hanging.resume_metadata)?;
            let (producer2, group) = (producer.clone(), group.to_owned());
            self.blocking(move |inner| {
                let metadata = inner.group_metadata(&group)?;
                let timeout = inner.options.request_timeout;
                producer2.send_offsets_to_transaction(&offsets, &metadata, timeout).map_err(kafka("send offsets to transaction"))?;
                producer2.commit_transaction(timeout).map_err(kafka("commit transaction"))
            })
            .await
        }
        .await;
        if result.is_err() {
            let (producer, id) = (producer.clone(), id.to_owned());
            let _ = self
                .blocking(move |inner| {
                    let _ = producer.abort_transaction(inner.options.request_timeout);
                    inner.forget_transactional(&id);
                    Ok(())
                })
                .await;
        }
        result
    }

    /// Run `f` on the blocking pool with this log's state.
    async fn blocking<T: Send + 'static>(&self, f: impl FnOnce(&Inner) -> Result<T, LogError> + Send + 'static) -> Result<T, LogError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner)).await.map_err(|e| LogError::Kafka { op: "blocking task", cause: e.to_string() })?
    }
}

/// `min.insync.replicas` for a topic replicated `replication_factor` times:
/// replication − 1, at least 1 (1 → 1, 2 → 1, 3 → 2, 5 → 4), so with
/// `acks=all` an acknowledged append is on at least two brokers as soon as
/// the topic is replicated three times, while one replica may be down.
pub fn min_insync_replicas(replication_factor: i32) -> i32 {
    (replication_factor - 1).max(1)
}

/// Create missing topics; return every configured topic's partition count.
fn ensure_topics(options: &KafkaOptions, client: &BaseConsumer) -> Result<HashMap<String, u32>, LogError> {
    let exists = |name: &str| -> Result<bool, LogError> {
        let meta = client.fetch_metadata(Some(name), options.request_timeout).map_err(kafka("fetch metadata"))?;
        Ok(meta.topics().first().is_some_and(|t| t.error().is_none() && !t.partitions().is_empty()))
    };
    let retention: HashMap<&str, String> = options.retention.iter().map(|(t, d)| (t.as_str(), d.as_millis().to_string())).collect();
    let min_insync = min_insync_replicas(options.replication_factor).to_string();
    let mut new = Vec::new();
    // Topics this process did not create: their min.insync.replicas is checked.
    let mut existing = Vec::new();
    for (name, n) in &options.topics {
        if exists(name)? {
            existing.push(name.clone());
        } else {
            let mut topic =
                NewTopic::new(name, *n as i32, TopicReplication::Fixed(options.replication_factor)).set("min.insync.replicas", &min_insync);
            if let Some(ms) = retention.get(name.as_str()) {
                topic = topic.set("retention.ms", ms);
            }
            new.push(topic);
        }
    }
    if !new.is_empty() {
        // A topic another process created meanwhile is checked like an old one.
        existing.extend(create_topics(options, &new)?);
    }
    let mut replication = HashMap::new();
    let mut broker = None;
    let mut partitions = HashMap::new();
    for (name, wanted) in &options.topics {
        // A new topic's metadata can take a moment to reach every broker.
        let deadline = Instant::now() + options.request_timeout;
        let actual = loop {
            let meta = client.fetch_metadata(Some(name), options.request_timeout).map_err(kafka("fetch metadata"))?;
            let topic = meta.topics().first().filter(|t| t.error().is_none());
            let n = topic.map_or(0, |t| t.partitions().len() as u32);
            if n > 0 || Instant::now() >= deadline {
                let rf = topic.and_then(|t| t.partitions().iter().map(|p| p.replicas().len() as i32).min());
                replication.insert(name.clone(), rf.unwrap_or(0));
                broker = broker.or_else(|| meta.brokers().first().map(|b| b.id()));
                break n;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        if actual != *wanted {
            return Err(LogError::Config(format!(
                "Kafka topic {name:?} has {actual} partitions but log.partitions is {wanted}; \
                 Sluice partitions by messageId itself, so the counts must agree"
            )));
        }
        partitions.insert(name.clone(), actual);
    }
    let existing: Vec<(String, i32)> = existing
        .into_iter()
        .map(|t| {
            let rf = replication.get(&t).copied().unwrap_or(0);
            (t, rf)
        })
        .collect();
    check_min_insync_replicas(options, &existing, broker)?;
    Ok(partitions)
}

fn admin_client(options: &KafkaOptions) -> Result<(AdminClient<DefaultClientContext>, AdminOptions), LogError> {
    let admin = options.base().create().map_err(kafka("create admin client"))?;
    Ok((admin, AdminOptions::new().operation_timeout(Some(options.request_timeout))))
}

/// Wait for an admin request on a private current-thread runtime (the
/// caller is a blocking context), bounded by `request_timeout`.
fn admin_wait<T>(
    options: &KafkaOptions,
    request: impl std::future::Future<Output = rdkafka::error::KafkaResult<T>>,
) -> Result<rdkafka::error::KafkaResult<T>, LogError> {
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| LogError::Io { path: "tokio runtime".into(), source: e })?;
    runtime
        .block_on(async { tokio::time::timeout(options.request_timeout, request).await })
        .map_err(|_| LogError::Unavailable(format!("no answer from Kafka at {} within {:?}", options.bootstrap_servers, options.request_timeout)))
}

/// Create `new`; return the topics that turned out to exist already.
fn create_topics(options: &KafkaOptions, new: &[NewTopic<'_>]) -> Result<Vec<String>, LogError> {
    let (admin, o) = admin_client(options)?;
    let results = admin_wait(options, admin.create_topics(new, &o))?.map_err(kafka("create topics"))?;
    let mut already = Vec::new();
    for result in results {
        match result {
            Ok(topic) => tracing::info!(topic, "created Kafka topic"),
            Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => already.push(topic),
            Err((topic, code)) => return Err(LogError::Kafka { op: "create topic", cause: format!("{topic}: {code}") }),
        }
    }
    Ok(already)
}

/// Refuse an existing topic whose `min.insync.replicas` is below
/// [`min_insync_replicas`] of the larger of its replication factor and
/// `options.replication_factor`. `topics` are (name, replication factor).
/// A cluster that cannot answer DescribeConfigs (rdkafka's MockCluster; a
/// principal without DescribeConfigs rights) is logged as an error, not
/// refused: the value cannot be known.
///
/// The request goes to `broker` (any broker answers for topics); sent to the
/// controller, as librdkafka would, it waits out the timeout on a MockCluster.
fn check_min_insync_replicas(options: &KafkaOptions, topics: &[(String, i32)], broker: Option<i32>) -> Result<(), LogError> {
    if topics.is_empty() {
        return Ok(());
    }
    let specs: Vec<ResourceSpecifier<'_>> = topics.iter().map(|(t, _)| ResourceSpecifier::Topic(t)).collect();
    let cannot_check = |cause: String| {
        tracing::error!(
            bootstrap_servers = %options.bootstrap_servers, error = %cause,
            "cannot read the topics' min.insync.replicas (DescribeConfigs): their durability under acks=all is not checked"
        );
    };
    let (admin, o) = admin_client(options)?;
    let o = o.broker_id(broker);
    // Codes that mean "this cluster or principal cannot tell us", not "try again".
    let unanswerable = |code: RDKafkaErrorCode| {
        matches!(
            code,
            RDKafkaErrorCode::UnsupportedFeature
                | RDKafkaErrorCode::UnsupportedVersion
                | RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed
        )
    };
    let results = match admin_wait(options, admin.describe_configs(&specs, &o))? {
        Ok(r) => r,
        Err(KafkaError::AdminOp(code)) if unanswerable(code) => {
            cannot_check(code.to_string());
            return Ok(());
        }
        Err(e) => return Err(kafka("describe topic configs")(e)),
    };
    // librdkafka returns the results in the order of the request.
    for ((topic, rf), result) in topics.iter().zip(results) {
        let resource = match result {
            Ok(r) => r,
            Err(code) if unanswerable(code) => {
                cannot_check(format!("{topic}: {code}"));
                continue;
            }
            Err(code) => return Err(LogError::Kafka { op: "describe topic configs", cause: format!("{topic}: {code}") }),
        };
        let Some(value) = resource.get("min.insync.replicas").and_then(|e| e.value.as_deref()) else {
            cannot_check(format!("{topic}: no min.insync.replicas in its configuration"));
            continue;
        };
        let actual: i32 = value
            .trim()
            .parse()
            .map_err(|_| LogError::Config(format!("Kafka topic {topic:?} has min.insync.replicas = {value:?}, which is not a number")))?;
        if let Some(problem) = min_insync_problem(topic, actual, *rf, options.replication_factor, &options.bootstrap_servers) {
            return Err(LogError::Config(problem));
        }
    }
    Ok(())
}

/// What is wrong with topic `topic`'s `min.insync.replicas` = `actual` when it
/// is replicated `topic_rf` times and `log.kafka.replication_factor` is
/// `configured_rf`, as an error message that says how to fix it; `None` when
/// it is enough.
pub fn min_insync_problem(topic: &str, actual: i32, topic_rf: i32, configured_rf: i32, bootstrap: &str) -> Option<String> {
    let rf = topic_rf.max(configured_rf);
    let needed = min_insync_replicas(rf);
    if actual >= needed {
        return None;
    }
    let alter = format!(
        "kafka-configs.sh --bootstrap-server {bootstrap} --alter --entity-type topics --entity-name {topic} \
         --add-config min.insync.replicas={needed}"
    );
    let mut msg = format!(
        "Kafka topic {topic:?} has min.insync.replicas = {actual}, below the {needed} its replication of {rf} needs \
         (replication - 1, at least 1): with acks=all an acknowledged append could rest on {actual} broker(s). "
    );
    if topic_rf < needed {
        msg += &format!(
            "Its replication factor is {topic_rf}, below log.kafka.replication_factor = {configured_rf}: raise it first \
             (kafka-reassign-partitions.sh), then run: {alter}"
        );
    } else {
        msg += &format!("Fix it with: {alter}");
    }
    Some(msg)
}

impl Inner {
    fn check(&self, topic: &str, partition: u32) -> Result<(), LogError> {
        let n = *self.partitions.get(topic).ok_or_else(|| LogError::UnknownTopic(topic.to_owned()))?;
        if partition >= n {
            return Err(LogError::UnknownPartition { topic: topic.to_owned(), partition, partitions: n });
        }
        Ok(())
    }

    fn watermarks(&self, topic: &str, partition: u32) -> Result<OffsetRange, LogError> {
        let timeout = self.options.request_timeout;
        let client = self.offsets_client.lock().expect("offsets client lock").clone();
        let query = || client.fetch_watermarks(topic, partition as i32, timeout);
        let (lo, hi) = match query() {
            Ok(w) => w,
            // After a broker restart the cached metadata can lack the
            // partition: refresh it once and ask again; if that fails too,
            // the next call gets a fresh client.
            Err(_) => {
                let _ = client.fetch_metadata(Some(topic), timeout);
                match query() {
                    Ok(w) => w,
                    Err(e) => {
                        if let Ok(fresh) = self.options.consumer("sluice-offsets").create::<BaseConsumer>() {
                            *self.offsets_client.lock().expect("offsets client lock") = Arc::new(fresh);
                        }
                        // Readers and committers may be stuck the same way.
                        self.readers.lock().expect("readers lock").remove(&(topic.to_owned(), partition));
                        self.committers.lock().expect("committers lock").clear();
                        return Err(kafka("fetch watermarks")(e));
                    }
                }
            }
        };
        Ok(OffsetRange { start: lo.max(0) as u64, end: hi.max(0) as u64 })
    }

    fn reader(&self, topic: &str, partition: u32) -> Result<Arc<Mutex<Reader>>, LogError> {
        let mut readers = self.readers.lock().expect("readers lock");
        if let Some(r) = readers.get(&(topic.to_owned(), partition)) {
            return Ok(r.clone());
        }
        let consumer: BaseConsumer<ReaderContext> =
            self.options.consumer("sluice-reader").create_with_context(ReaderContext).map_err(kafka("create consumer"))?;
        let reader = Arc::new(Mutex::new(Reader { consumer, next: None, at_end: false, stuck: None, failures: 0 }));
        readers.insert((topic.to_owned(), partition), reader.clone());
        Ok(reader)
    }

    /// Drop the reader of `topic`/`partition` (if it is still `reader`):
    /// the next read creates a fresh consumer.
    fn replace_reader(&self, topic: &str, partition: u32, reader: &Arc<Mutex<Reader>>, why: &str) {
        let mut readers = self.readers.lock().expect("readers lock");
        if readers.get(&(topic.to_owned(), partition)).is_some_and(|r| Arc::ptr_eq(r, reader)) {
            readers.remove(&(topic.to_owned(), partition));
            tracing::warn!(topic, partition, why, "Kafka reader replaced by a fresh consumer");
        }
    }

    fn read(&self, topic: &str, partition: u32, from: u64, max: usize) -> Result<ReadBatch, LogError> {
        self.check(topic, partition)?;
        let reader = self.reader(topic, partition)?;
        let mut guard = reader.lock().expect("reader lock");
        let result = self.read_with(&mut guard, topic, partition, from, max);
        match &result {
            Ok(_) => guard.failures = 0,
            Err(LogError::OffsetOutOfRange { .. }) => {}
            Err(e) => {
                guard.failures += 1;
                if guard.failures >= READER_REPLACE_AFTER {
                    let why = format!("{} reads in a row failed, the last with: {e}", guard.failures);
                    drop(guard);
                    self.replace_reader(topic, partition, &reader, &why);
                }
            }
        }
        result
    }

    fn read_with(&self, r: &mut Reader, topic: &str, partition: u32, from: u64, max: usize) -> Result<ReadBatch, LogError> {
        if r.next != Some(from) {
            let range = self.watermarks(topic, partition)?;
            if from < range.start {
                return Err(LogError::OffsetOutOfRange { topic: topic.to_owned(), partition, requested: from, start: range.start });
            }
            if from >= range.end {
                return Ok(ReadBatch { records: Vec::new(), next: from });
            }
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(topic, partition as i32, Offset::Offset(from as i64)).map_err(kafka("assign"))?;
            r.consumer.assign(&tpl).map_err(kafka("assign"))?;
            r.next = Some(from);
            r.at_end = false;
        }
        // Wait for records up to `request_timeout`. A reader at the end waits
        // `read_wait` (a long poll), then asks the broker whether the end has
        // moved: an empty batch means "at the end", never "not fetched yet".
        let deadline = Instant::now() + self.options.request_timeout;
        let mut records = Vec::new();
        // Rounds at the end where the broker's end was past our position.
        let mut end_moved = 0;
        while records.len() < max {
            let left = deadline.saturating_duration_since(Instant::now());
            let wait = if !records.is_empty() {
                Duration::ZERO
            } else if r.at_end {
                self.options.read_wait.min(left)
            } else {
                // A fresh reader's first fetch: normally milliseconds. If
                // nothing comes, ask the broker where the end is (below).
                Duration::from_secs(1).min(left)
            };
            let polled = r.consumer.poll(wait);
            match polled {
                None if !records.is_empty() => break,
                None => {
                    if r.at_end {
                        let end = self.watermarks(topic, partition)?.end;
                        // Past our position: committed records not fetched yet,
                        // or an open transaction (not readable until it ends).
                        // After two more waits, report the end either way.
                        if end <= r.next.unwrap_or(from) {
                            r.stuck = None;
                            break;
                        }
                        if end_moved >= 2 {
                            let since = *r.stuck.get_or_insert_with(Instant::now);
                            if since.elapsed() >= STUCK_AFTER {
                                // Committed records the consumer does not fetch:
                                // say so, and read with a fresh consumer next time.
                                let at = r.next.unwrap_or(from);
                                r.stuck = None;
                                r.next = None;
                                r.failures = READER_REPLACE_AFTER;
                                return Err(LogError::Unavailable(format!(
                                    "{topic}/{partition}: the broker's end is {end} but the reader fetched nothing past {at} for {:?}",
                                    STUCK_AFTER
                                )));
                            }
                            break;
                        }
                        end_moved += 1;
                        continue;
                    }
                    if !r.at_end && Instant::now() < deadline {
                        // No end-of-partition event yet: judge by the broker's end.
                        r.at_end = true;
                        continue;
                    }
                    if Instant::now() >= deadline {
                        r.next = None; // re-assign on the next read
                        return Err(LogError::Unavailable(format!(
                            "no answer from Kafka within {:?} reading {topic}/{partition} at offset {from}",
                            self.options.request_timeout
                        )));
                    }
                }
                Some(Ok(m)) => {
                    let offset = m.offset() as u64;
                    r.at_end = false;
                    r.stuck = None;
                    r.next = Some(offset + 1);
                    records.push(StoredRecord {
                        offset,
                        timestamp_ms: m.timestamp().to_millis().unwrap_or(0),
                        key: Bytes::copy_from_slice(m.key().unwrap_or_default()),
                        value: Bytes::copy_from_slice(m.payload().unwrap_or_default()),
                    });
                }
                Some(Err(KafkaError::PartitionEOF(_))) => {
                    r.at_end = true;
                    // The position is past any transaction markers at the end.
                    if let Some(p) = position(&r.consumer, topic, partition) {
                        if p > r.next.unwrap_or(0) {
                            r.next = Some(p);
                        }
                    }
                    if !records.is_empty() {
                        break;
                    }
                }
                Some(Err(KafkaError::MessageConsumption(RDKafkaErrorCode::OffsetOutOfRange))) => {
                    r.next = None;
                    let start = self.watermarks(topic, partition)?.start;
                    return Err(LogError::OffsetOutOfRange { topic: topic.to_owned(), partition, requested: from, start });
                }
                // Stale or passing connection trouble: keep waiting for
                // records (bounded by the deadline and the end check).
                Some(Err(e)) if transient(&e) => {
                    tracing::debug!(topic, partition, error = %e, "Kafka reader: transient error skipped");
                    if Instant::now() >= deadline {
                        r.next = None;
                        return Err(kafka("read")(e));
                    }
                }
                Some(Err(e)) => {
                    r.next = None; // re-assign on the next read
                    return Err(kafka("read")(e));
                }
            }
        }
        Ok(ReadBatch { next: r.next.unwrap_or(from), records })
    }

    fn member(&self, group: &str) -> Option<Arc<Member>> {
        self.members.lock().expect("members lock").get(group).and_then(Weak::upgrade)
    }

    fn committer(&self, group: &str) -> Result<Arc<BaseConsumer>, LogError> {
        let mut committers = self.committers.lock().expect("committers lock");
        if let Some(c) = committers.get(group) {
            return Ok(c.clone());
        }
        let c: Arc<BaseConsumer> = Arc::new(self.options.consumer(group).create().map_err(kafka("create consumer"))?);
        committers.insert(group.to_owned(), c.clone());
        Ok(c)
    }

    /// Forget `group`'s committer after a failure: the next call gets a
    /// fresh client (one that lost every broker would keep failing).
    fn forget_committer(&self, group: &str, used: &Arc<BaseConsumer>) {
        let mut committers = self.committers.lock().expect("committers lock");
        if committers.get(group).is_some_and(|c| Arc::ptr_eq(c, used)) {
            committers.remove(group);
        }
    }

    fn commit(&self, group: &str, topic: &str, partition: u32, next_offset: u64) -> Result<(), LogError> {
        self.check(topic, partition)?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition as i32, Offset::Offset(next_offset as i64)).map_err(kafka("commit"))?;
        match self.member(group) {
            Some(m) => m.consumer.commit(&tpl, CommitMode::Sync),
            None => {
                let committer = self.committer(group)?;
                let result = committer.commit(&tpl, CommitMode::Sync);
                if result.is_err() {
                    self.forget_committer(group, &committer);
                }
                result
            }
        }
        .map_err(kafka("commit offset"))
    }

    /// `group`'s committed offset on `topic`/`partition` and the metadata
    /// committed with it.
    fn committed(&self, group: &str, topic: &str, partition: u32) -> Result<(Option<u64>, String), LogError> {
        self.check(topic, partition)?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, partition as i32);
        let committer = self.committer(group)?;
        let got = committer.committed_offsets(tpl, self.options.request_timeout);
        if got.is_err() {
            self.forget_committer(group, &committer);
        }
        let got = got.map_err(kafka("fetch committed offset"))?;
        Ok(committed_of(&got, topic, partition))
    }

    fn transactional_producer(&self, id: &str) -> Result<Arc<FutureProducer>, LogError> {
        if let Some(p) = self.transactional.lock().expect("txn lock").get(id) {
            return Ok(p.clone());
        }
        let mut config = self.options.producer();
        config.set("transactional.id", id).set("transaction.timeout.ms", "60000");
        let producer: FutureProducer = config.create().map_err(kafka("create transactional producer"))?;
        // Fences any older producer with the same id and aborts its open transaction.
        producer.init_transactions(self.options.request_timeout).map_err(kafka("init transactions"))?;
        let producer = Arc::new(producer);
        self.transactional.lock().expect("txn lock").insert(id.to_owned(), producer.clone());
        Ok(producer)
    }

    fn forget_transactional(&self, id: &str) {
        self.transactional.lock().expect("txn lock").remove(id);
    }

    /// The group metadata a transaction commits offsets with: the live
    /// member's (the broker also checks its generation), else the committer's.
    fn group_metadata(&self, group: &str) -> Result<rdkafka::consumer::ConsumerGroupMetadata, LogError> {
        match self.member(group) {
            Some(m) => m.consumer.group_metadata(),
            None => self.committer(group)?.group_metadata(),
        }
        .ok_or_else(|| LogError::Kafka { op: "group metadata", cause: format!("none for group {group}") })
    }

    /// What a transaction of `(group, in_topic, partition)`'s transactional
    /// id left unresolved although the id was just fenced (its earlier
    /// transactions are complete as far as the coordinator knows): the other
    /// topics whose `partition` has records past its last stable offset, and
    /// whether `group`'s offset on `in_topic` has a pending transactional
    /// commit. Such a "hanging" transaction is left by a broker that restarts
    /// while committing one: coming back, its coordinator finds no leader
    /// for the partitions yet, skips their markers ("likely deleted") and
    /// completes the transaction anyway. Nothing then ends it: `output`'s
    /// last stable offset stays before its records (the route reads
    /// nothing new) and fetching the committed offset with `require_stable`
    /// times out (dedup cannot start). Checked twice, a second apart.
    fn find_hanging(&self, group: &str, in_topic: &str, partition: u32) -> Result<Hanging, LogError> {
        let timeout = self.options.request_timeout;
        // Sees records (and committed offsets) whatever their transaction's state.
        let uncommitted: BaseConsumer = {
            let mut c = self.options.consumer(group);
            c.set("isolation.level", "read_uncommitted");
            c.create().map_err(kafka("create consumer"))?
        };
        let mut hanging = Hanging::default();
        for attempt in 0..2 {
            if attempt > 0 {
                std::thread::sleep(Duration::from_secs(1));
            }
            hanging = Hanging::default();
            for (topic, &n) in &self.partitions {
                if topic == in_topic || partition >= n {
                    continue;
                }
                let stable = self.watermarks(topic, partition)?.end;
                let (_, high) = uncommitted.fetch_watermarks(topic, partition as i32, timeout).map_err(kafka("fetch watermarks"))?;
                if high.max(0) as u64 > stable {
                    hanging.topics.push((topic.clone(), stable, high.max(0) as u64));
                }
            }
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(in_topic, partition as i32);
            let got = uncommitted.committed_offsets(tpl.clone(), timeout).map_err(kafka("fetch committed offset"))?;
            let (materialized, metadata) = committed_of(&got, in_topic, partition);
            // require_stable (read_committed): retried by librdkafka while a
            // transactional commit of the offset is pending, until the timeout.
            let stable = self.committer(group)?.committed_offsets(tpl, timeout.min(Duration::from_secs(3)));
            hanging.offsets = stable.is_err();
            hanging.resume = match materialized {
                Some(o) => o,
                None => self.watermarks(in_topic, partition)?.start,
            };
            hanging.resume_metadata = metadata;
            if hanging.topics.is_empty() && !hanging.offsets {
                break;
            }
        }
        Ok(hanging)
    }
}

/// What [`Inner::find_hanging`] found.
#[derive(Debug, Default)]
struct Hanging {
    /// (topic, last stable offset, high watermark) of partitions an
    /// unfinished transaction holds.
    topics: Vec<(String, u64, u64)>,
    /// The group's offset on the input partition has a pending transactional commit.
    offsets: bool,
    /// The offset committed outside of any transaction (the input's start if none).
    resume: u64,
    /// The metadata committed with `resume` (its replay point, if any).
    resume_metadata: String,
}

impl Hanging {
    fn any(&self) -> bool {
        !self.topics.is_empty() || self.offsets
    }
}

/// The key of the record [`KafkaLog::fence`] writes to a partition a hanging
/// transaction holds, to end that transaction (its value is empty). It is no
/// `<source>/<messageId>` of a real source (source ids never hold a NUL), so
/// the route makes no job of it, and dedup's catch-up skips it.
pub const CLOSE_HANGING_KEY: &[u8] = b"\0sluice/close-hanging-transaction";

fn position(consumer: &BaseConsumer<ReaderContext>, topic: &str, partition: u32) -> Option<u64> {
    let tpl = consumer.position().ok()?;
    match tpl.find_partition(topic, partition as i32)?.offset() {
        Offset::Offset(o) if o >= 0 => Some(o as u64),
        _ => None,
    }
}

/// What a committed offset's metadata starts with when it carries a replay
/// point ([`Log::publish_and_commit`]'s `replay_from`).
const REPLAY_METADATA_PREFIX: &str = "sluice:replay_from=";

fn replay_metadata(replay_from: Option<u64>) -> String {
    replay_from.map(|r| format!("{REPLAY_METADATA_PREFIX}{r}")).unwrap_or_default()
}

fn parse_replay_metadata(metadata: &str) -> Option<u64> {
    metadata.strip_prefix(REPLAY_METADATA_PREFIX)?.parse().ok()
}

/// One partition's offset to commit, with `metadata`.
fn offset_with_replay(topic: &str, partition: u32, offset: u64, metadata: &str) -> Result<TopicPartitionList, LogError> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition as i32, Offset::Offset(offset as i64)).map_err(kafka("commit offset"))?;
    if let Some(mut e) = tpl.find_partition(topic, partition as i32) {
        e.set_metadata(metadata);
    }
    Ok(tpl)
}

/// The committed offset (none if never committed) and its metadata, from an offset fetch.
fn committed_of(got: &TopicPartitionList, topic: &str, partition: u32) -> (Option<u64>, String) {
    match got.find_partition(topic, partition as i32) {
        Some(e) => match e.offset() {
            Offset::Offset(o) if o >= 0 => (Some(o as u64), e.metadata().to_owned()),
            _ => (None, String::new()),
        },
        None => (None, String::new()),
    }
}

/// Produce `records` to one partition; the offsets of the first and last.
/// Fails if a delivery report has not come within `within` (librdkafka's
/// `message.timeout.ms` does not always end the wait: a transactional
/// producer's messages stayed undelivered and unreported for as long as the
/// broker was down, over 10 minutes, holding a dedup worker).
async fn produce(producer: &FutureProducer, topic: &str, partition: u32, records: &[Record], within: Duration) -> Result<(u64, u64), LogError> {
    let deadline = tokio::time::Instant::now() + within;
    let mut pending = Vec::with_capacity(records.len());
    for r in records {
        let mut record = FutureRecord::to(topic).partition(partition as i32).key(&r.key[..]).payload(&r.value[..]);
        // Wait while librdkafka's queue is full; delivery is awaited below.
        let future = loop {
            match producer.send_result(record) {
                Ok(f) => break f,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => return Err(kafka("produce")(e)),
            }
        };
        pending.push(future);
    }
    let mut first = None;
    let mut last = 0;
    for f in pending {
        let delivery = tokio::time::timeout_at(deadline, f)
            .await
            .map_err(|_| LogError::Unavailable(format!("no delivery report from Kafka within {within:?} for {topic}/{partition}")))?
            .map_err(|_| LogError::Kafka { op: "produce", cause: "producer dropped".into() })?
            .map_err(|(e, _)| kafka("produce")(e))?;
        let offset = delivery.offset as u64;
        first.get_or_insert(offset);
        last = offset;
    }
    Ok((first.unwrap_or(0), last))
}

#[async_trait]
/// The `Log` methods take the names callers use; each puts
/// [`KafkaOptions::topic_prefix`] on them (`self.on_cluster`) first, and
/// works with the cluster's names from there.
impl Log for KafkaLog {
    fn partitions(&self, topic: &str) -> Result<u32, LogError> {
        let topic = self.on_cluster(topic);
        self.inner.partitions.get(topic.as_ref()).copied().ok_or_else(|| LogError::UnknownTopic(topic.into_owned()))
    }

    async fn append(&self, topic: &str, partition: u32, records: Vec<Record>) -> Result<u64, LogError> {
        let topic = self.on_cluster(topic);
        self.inner.check(&topic, partition)?;
        if records.is_empty() {
            return Ok(self.watermarks(&topic, partition).await?.end);
        }
        Ok(produce(&self.inner.producer, &topic, partition, &records, self.inner.options.delivery_bound()).await?.0)
    }

    async fn read(&self, topic: &str, partition: u32, from: u64, max_records: usize) -> Result<Vec<StoredRecord>, LogError> {
        Ok(self.read_batch(topic, partition, from, max_records).await?.records)
    }

    async fn read_batch(&self, topic: &str, partition: u32, from: u64, max_records: usize) -> Result<ReadBatch, LogError> {
        let topic = self.on_cluster(topic).into_owned();
        self.blocking(move |inner| inner.read(&topic, partition, from, max_records)).await
    }

    async fn offsets(&self, topic: &str, partition: u32) -> Result<OffsetRange, LogError> {
        self.watermarks(&self.on_cluster(topic), partition).await
    }

    async fn commit(&self, at: Checkpoint<'_>) -> Result<(), LogError> {
        let (group, topic, partition, next_offset) =
            (self.on_cluster(at.group).into_owned(), self.on_cluster(at.topic).into_owned(), at.partition, at.next_offset);
        self.blocking(move |inner| inner.commit(&group, &topic, partition, next_offset)).await
    }

    async fn committed(&self, group: &str, topic: &str, partition: u32) -> Result<Option<u64>, LogError> {
        let (group, topic) = (self.on_cluster(group).into_owned(), self.on_cluster(topic).into_owned());
        Ok(self.blocking(move |inner| inner.committed(&group, &topic, partition)).await?.0)
    }

    async fn resume_point(&self, group: &str, topic: &str, partition: u32) -> Result<Option<u64>, LogError> {
        let (group, topic) = (self.on_cluster(group).into_owned(), self.on_cluster(topic).into_owned());
        let (committed, metadata) = self.blocking(move |inner| inner.committed(&group, &topic, partition)).await?;
        Ok(match (committed, parse_replay_metadata(&metadata)) {
            (Some(c), Some(r)) => Some(c.min(r)),
            (c, _) => c,
        })
    }

    fn atomic_publish_and_commit(&self, _in_topic: &str) -> bool {
        true
    }

    async fn fence(&self, group: &str, in_topic: &str, partition: u32) -> Result<(), LogError> {
        let (group, in_topic) = (&*self.on_cluster(group), &*self.on_cluster(in_topic));
        self.inner.check(in_topic, partition)?;
        let id = self.transactional_id(group, in_topic, partition);
        // A new producer's init_transactions is what fences the old one.
        let producer = {
            let id = id.clone();
            self.blocking(move |inner| {
                inner.forget_transactional(&id);
                inner.transactional_producer(&id)
            })
            .await?
        };
        // The id's earlier transactions are over, unless a broker restart left one hanging.
        let (g, t) = (group.to_owned(), in_topic.to_owned());
        let hanging = self.blocking(move |inner| inner.find_hanging(&g, &t, partition)).await?;
        tracing::debug!(transactional_id = %id, ?hanging, "fenced earlier owners of the transactional id");
        if !hanging.any() {
            return Ok(());
        }
        tracing::warn!(
            transactional_id = %id, ?hanging,
            "a Kafka transaction was left hanging (a broker restarted while committing it): ending it with one of ours"
        );
        self.close_hanging(&producer, &id, group, in_topic, partition, &hanging).await?;
        let (g, t) = (group.to_owned(), in_topic.to_owned());
        let left = self.blocking(move |inner| inner.find_hanging(&g, &t, partition)).await?;
        if left.any() {
            return Err(LogError::Unavailable(format!(
                "{in_topic}/{partition}: a transaction left hanging by a broker restart is still open after {id} committed one \
                 ({left:?}); end it with kafka-transactions.sh find-hanging / abort"
            )));
        }
        tracing::info!(transactional_id = %id, "the hanging Kafka transaction is ended");
        Ok(())
    }

    async fn publish_and_commit(&self, p: Publish<'_>) -> Result<Option<u64>, LogError> {
        let Publish { out_topic, records, commit: Checkpoint { group, topic: in_topic, partition, next_offset }, replay_from } = p;
        let (out_topic, group, in_topic) = (&*self.on_cluster(out_topic), &*self.on_cluster(group), &*self.on_cluster(in_topic));
        self.inner.check(out_topic, partition)?;
        self.inner.check(in_topic, partition)?;
        let id = self.transactional_id(group, in_topic, partition);
        let producer = {
            let id = id.clone();
            self.blocking(move |inner| inner.transactional_producer(&id)).await?
        };
        let result = async {
            producer.begin_transaction().map_err(kafka("begin transaction"))?;
            let within = self.inner.options.delivery_bound();
            let first = if records.is_empty() { None } else { Some(produce(&producer, out_topic, partition, &records, within).await?.0) };
            let offsets = offset_with_replay(in_topic, partition, next_offset, &replay_metadata(replay_from))?;
            let (producer2, group) = (producer.clone(), group.to_owned());
            self.blocking(move |inner| {
                let metadata = inner.group_metadata(&group)?;
                let timeout = inner.options.request_timeout;
                producer2.send_offsets_to_transaction(&offsets, &metadata, timeout).map_err(kafka("send offsets to transaction"))?;
                producer2.commit_transaction(timeout).map_err(kafka("commit transaction"))
            })
            .await?;
            Ok(first)
        }
        .await;
        if result.is_err() {
            // Abort what can be aborted; a fenced or broken producer is
            // dropped so the next attempt starts (and fences) afresh.
            let (producer, id2) = (producer.clone(), id.clone());
            let _ = self
                .blocking(move |inner| {
                    let timeout = inner.options.request_timeout;
                    if let Err(e) = producer.abort_transaction(timeout) {
                        tracing::warn!(transactional_id = %id2, error = %e, "aborting the Kafka transaction failed");
                    }
                    inner.forget_transactional(&id2);
                    Ok(())
                })
                .await;
        }
        result
    }

    fn join(&self, group: &str, topic: &str) -> Result<Membership, LogError> {
        let (group, topic) = (&*self.on_cluster(group), &*self.on_cluster(topic));
        self.inner.check(topic, 0)?;
        let (tx, rx) = watch::channel(BTreeSet::new());
        let context = MemberContext { topic: topic.to_owned(), owned: tx };
        let mut config = self.inner.options.consumer(group);
        // It never consumes (its partitions are paused): no offset reset to report.
        config.set("partition.assignment.strategy", "cooperative-sticky").set("enable.partition.eof", "false").set("auto.offset.reset", "latest");
        let consumer: BaseConsumer<MemberContext> = config.create_with_context(context).map_err(kafka("create group member"))?;
        consumer.subscribe(&[topic]).map_err(kafka("subscribe"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let member = Arc::new(Member { consumer, stop: stop.clone() });
        self.inner.members.lock().expect("members lock").insert(group.to_owned(), Arc::downgrade(&member));
        let polled = member.clone();
        let thread = std::thread::Builder::new()
            .name(format!("kafka-member-{group}"))
            .spawn(move || {
                // Polling serves rebalances and heartbeats; paused partitions
                // deliver no records here.
                while !polled.stop.load(Ordering::Relaxed) {
                    if let Some(Err(e)) = polled.consumer.poll(Duration::from_millis(100)) {
                        tracing::warn!(error = %e, "Kafka group member");
                    }
                }
                // Leaving the group hands the partitions over at once.
                polled.consumer.unsubscribe();
                let deadline = Instant::now() + Duration::from_secs(5);
                while Instant::now() < deadline && !polled.consumer.assignment().map(|a| a.count() == 0).unwrap_or(true) {
                    polled.consumer.poll(Duration::from_millis(50));
                }
            })
            .map_err(|source| LogError::Io { path: "member thread".into(), source })?;
        Ok(Membership::new(rx, Box::new(MemberGuard { member, thread: Some(thread) })))
    }
}

/// A consumer-group member: tracks which partitions this process owns.
struct Member {
    consumer: BaseConsumer<MemberContext>,
    stop: Arc<AtomicBool>,
}

struct MemberGuard {
    member: Arc<Member>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for MemberGuard {
    fn drop(&mut self) {
        self.member.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct MemberContext {
    topic: String,
    owned: watch::Sender<BTreeSet<u32>>,
}

impl MemberContext {
    fn partitions(&self, tpl: &TopicPartitionList) -> Vec<u32> {
        tpl.elements_for_topic(&self.topic).iter().map(|e| e.partition() as u32).collect()
    }
}

impl ClientContext for MemberContext {}

impl ConsumerContext for MemberContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let gone = self.partitions(tpl);
            tracing::info!(topic = %self.topic, partitions = ?gone, "Kafka group: partitions revoked");
            self.owned.send_modify(|owned| {
                gone.iter().for_each(|p| {
                    owned.remove(p);
                })
            });
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                // Records are read by per-partition readers, not here.
                if let Err(e) = consumer.pause(tpl) {
                    tracing::warn!(error = %e, "pausing newly assigned partitions failed");
                }
                let new = self.partitions(tpl);
                tracing::info!(topic = %self.topic, partitions = ?new, "Kafka group: partitions assigned");
                self.owned.send_modify(|owned| owned.extend(new));
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => {
                // The default handler dropped the assignment: own what is left.
                tracing::error!(error = %e, "Kafka group rebalance failed");
                let left: BTreeSet<u32> = consumer.assignment().map(|a| self.partitions(&a).into_iter().collect()).unwrap_or_default();
                self.owned.send_replace(left);
            }
        }
    }
}
