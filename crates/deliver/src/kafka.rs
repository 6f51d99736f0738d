//! `kafka` destinations (docs/DESTINATIONS.md): each job published as one
//! message to a topic of the user's own Kafka cluster.
//!
//! Invariants:
//! - One producer per (brokers, private-network setting, request
//!   timeout), shared by the destinations that agree on them, idempotent
//!   (`enable.idempotence`, `acks=all`); a producer unused for 10 minutes
//!   is dropped when another is made, and one that hit a fatal error is
//!   replaced on the next request.
//! - A job's message: value = the job's body (after the destination
//!   function), key = its messageId, or with `kafka_key = "user_id"` the
//!   event's userId (else anonymousId, else messageId: one user's events
//!   share a partition, in order); headers `sluice-source` and
//!   `sluice-message-id` (the job's idempotency key: a replay's carries
//!   `:replay-<n>`).
//! - A job succeeds only on its own delivery report (the broker has it on
//!   every in-sync replica); every job of a request gets its own outcome.
//! - Exactly once within a producer session: librdkafka's own resends
//!   (a broker restart, a leader change, a lost answer) are dropped by the
//!   broker by producer id and sequence. At least once across sessions: a
//!   job whose report did not come within the destination's
//!   `request_timeout` (`message.timeout.ms`), or that was `executing` at a
//!   crash, is sent again as a new message; consumers that must not see a
//!   repeat drop it by the `sluice-message-id` header.
//! - The link is the destination's own (`kafka_security_protocol`:
//!   plaintext, TLS checking the broker's certificate and host name
//!   against the system's CAs or `kafka_tls_ca`, SASL PLAIN or SCRAM);
//!   nothing falls back to plain text.
//! - The SSRF guard checks the bootstrap brokers' addresses when the
//!   producer is made (refused → the jobs are discarded with the reason,
//!   as a webhook's are). The brokers a cluster's metadata then names are
//!   librdkafka's to reach and are not checked: a `kafka` destination
//!   trusts the cluster it names.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use sluice_core::config::{KafkaKey, KafkaTarget};

use crate::clients::Clients;
use crate::executor::{check_public, Attempt, Verdict};

/// One message to publish.
pub struct Message<'a> {
    pub message_id: &'a str,
    /// Sent as `sluice-message-id`.
    pub idempotency_key: &'a str,
    pub source: &'a str,
    pub body: &'a Bytes,
}

/// librdkafka's reports about a cluster's producer: a cluster that is
/// away is its destinations' business (their jobs retry), logged as a
/// warning at most once a minute, not as a process error per reconnect;
/// the last report is kept to explain a timeout (`MessageTimedOut` alone
/// says nothing of a refused connection or an unknown host).
pub(crate) struct Reports {
    bootstrap: String,
    last_warned: Mutex<Option<Instant>>,
    last_report: Mutex<Option<(Instant, String)>>,
}

/// What librdkafka is given: the reports, shared with [`Cached`].
pub(crate) struct ClusterContext(Arc<Reports>);

impl Reports {
    fn report(&self, what: String) {
        let mut last = self.last_warned.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
            *last = Some(Instant::now());
            tracing::warn!(cluster = %self.bootstrap, "kafka destination: {what} (its jobs are retried; said at most once a minute)");
        } else {
            tracing::debug!(cluster = %self.bootstrap, "kafka destination: {what}");
        }
        *self.last_report.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), what));
    }

    /// What librdkafka last said, if within `recent`.
    fn last_report(&self, recent: Duration) -> Option<String> {
        let last = self.last_report.lock().unwrap_or_else(|p| p.into_inner());
        last.as_ref().filter(|(at, _)| at.elapsed() <= recent).map(|(_, what)| what.clone())
    }
}

impl ClientContext for ClusterContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error | RDKafkaLogLevel::Warning => {
                self.0.report(format!("librdkafka {fac}: {message}"))
            }
            _ => tracing::debug!(cluster = %self.0.bootstrap, "librdkafka {fac}: {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.0.report(format!("{error}: {reason}"));
    }
}

pub(crate) type ClusterProducer = FutureProducer<ClusterContext>;

/// What identifies a producer: destinations that agree on all of it share
/// one (librdkafka's threads and connections are per producer).
#[derive(Clone, PartialEq, Eq, Hash)]
struct ProducerKey {
    bootstrap: String,
    /// The link's `security.protocol`, `ssl.*` and `sasl.*` settings.
    link: Vec<(String, String)>,
    allow_private_network: bool,
    timeout: Duration,
}

/// A producer not used for this long is dropped when another is made.
const IDLE: Duration = Duration::from_secs(600);

/// The producers of every `kafka` destination of this process: one per cluster (and settings).
#[derive(Clone)]
pub struct Producers {
    by_key: Clients<ProducerKey, (Arc<ClusterProducer>, Arc<Reports>)>,
}

impl Default for Producers {
    fn default() -> Self {
        Producers { by_key: Clients::new(IDLE, None) }
    }
}

/// A producer could not be made: every job of the request gets this outcome.
struct Refused {
    verdict: Verdict,
    error: String,
}

impl Producers {
    /// Take out the producers of clusters and links no target in `live` uses.
    pub(crate) fn take_unused(&self, live: &[&KafkaTarget]) -> Vec<(Arc<ClusterProducer>, Arc<Reports>)> {
        self.by_key.take_unless(|k| live.iter().any(|t| t.bootstrap == k.bootstrap && t.link == k.link))
    }

    /// Publish `messages` to `target`; one [`Attempt`] per message, in
    /// order. Never fails.
    pub async fn send(&self, target: &KafkaTarget, allow_private_network: bool, timeout: Duration, messages: &[Message<'_>]) -> Vec<Attempt> {
        let started = Instant::now();
        let key = ProducerKey { bootstrap: target.bootstrap.clone(), link: target.link.clone(), allow_private_network, timeout };
        let (producer, reports) = match self.producer(&key).await {
            Ok(p) => p,
            Err(r) => {
                let attempt = Attempt { verdict: r.verdict, status: None, error: Some(r.error), retry_after: None, elapsed: started.elapsed() };
                return vec![attempt; messages.len()];
            }
        };
        let deadline = tokio::time::Instant::now() + timeout + Duration::from_secs(5);
        let all: Vec<&Message> = messages.iter().collect();
        let mut results = publish(&producer, target, &all, deadline, timeout).await;
        // A produce request the topic found too large (its `max.message.bytes` under librdkafka's
        // batch) fails every message in it: each is tried alone before it is called too large.
        if messages.len() > 1 {
            for (i, m) in messages.iter().enumerate() {
                if results[i].as_ref().is_err_and(|e| e.contains("Kafka: MessageSizeTooLarge:")) {
                    results[i] = publish(&producer, target, &[m], deadline, timeout).await.remove(0);
                }
            }
        }
        let mut out = Vec::with_capacity(messages.len());
        for result in results {
            // A timeout says why, when the cluster said something lately.
            let result = result.map_err(|error| match reports.last_report(timeout + Duration::from_secs(5)) {
                Some(why) if error.contains("MessageTimedOut") || error.starts_with("no delivery report") => {
                    format!("{error}; the cluster's last report: {why}")
                }
                _ => error,
            });
            let (verdict, error) = match result {
                Ok(()) => (Verdict::Succeeded, None),
                Err(error) => (verdict_of(&error), Some(error)),
            };
            out.push(Attempt { verdict, status: None, error, retry_after: None, elapsed: started.elapsed() });
        }
        // An idempotent producer that hit a fatal error takes no more messages: make a new one next time.
        if let Some((code, why)) = producer.client().fatal_error() {
            tracing::warn!(cluster = %key.bootstrap, "kafka destination: the producer failed for good ({code:?}: {why}); a new one is made");
            self.by_key.drop_if(&key, |(kept, _)| Arc::ptr_eq(kept, &producer));
        }
        out
    }

    async fn producer(&self, key: &ProducerKey) -> Result<(Arc<ClusterProducer>, Arc<Reports>), Refused> {
        if let Some(kept) = self.by_key.get(key) {
            return Ok(kept);
        }
        if !key.allow_private_network {
            check_brokers(&key.bootstrap).await?;
        }
        let config = producer_config(&key.bootstrap, &key.link, key.timeout);
        let reports = Arc::new(Reports { bootstrap: key.bootstrap.clone(), last_warned: Mutex::new(None), last_report: Mutex::new(None) });
        let context = ClusterContext(reports.clone());
        // Making a client starts librdkafka's threads: off the async workers.
        let made = tokio::task::spawn_blocking(move || config.create_with_context::<_, ClusterProducer>(context)).await;
        // A link librdkafka refuses (e.g. a CA OpenSSL cannot read): retried, not discarded —
        // an operator can mend the destination within the window and nothing is lost.
        let producer = match made.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string())) {
            Ok(p) => Arc::new(p),
            Err(e) => return Err(Refused { verdict: Verdict::Retry, error: format!("cannot make a Kafka producer: {e}") }),
        };
        Ok(self.by_key.keep(key.clone(), (producer, reports)))
    }
}

/// Enqueue `messages`, then wait for each one's report (librdkafka
/// batches them); one result per message, in order.
async fn publish(
    producer: &ClusterProducer,
    target: &KafkaTarget,
    messages: &[&Message<'_>],
    deadline: tokio::time::Instant,
    timeout: Duration,
) -> Vec<Result<(), String>> {
    let mut pending = Vec::with_capacity(messages.len());
    for m in messages {
        let headers = OwnedHeaders::new_with_capacity(2)
            .insert(Header { key: "sluice-source", value: Some(m.source.as_bytes()) })
            .insert(Header { key: "sluice-message-id", value: Some(m.idempotency_key.as_bytes()) });
        let key = match target.key {
            KafkaKey::MessageId => m.message_id.to_owned(),
            KafkaKey::UserId => user_key(m.body).unwrap_or_else(|| m.message_id.to_owned()),
        };
        let mut record = FutureRecord::to(&target.topic).key(key.as_bytes()).payload(&m.body[..]).headers(headers);
        let queued = loop {
            match producer.send_result(record) {
                Ok(f) => break Ok(f),
                // librdkafka's queue is full (the cluster is slow or away): wait, within the request's time.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) if tokio::time::Instant::now() < deadline => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => break Err(e),
            }
        };
        pending.push(queued);
    }
    let mut out = Vec::with_capacity(messages.len());
    for queued in pending {
        out.push(match queued {
            Err(e) => Err(describe(&e)),
            Ok(f) => match tokio::time::timeout_at(deadline, f).await {
                Err(_) => Err(format!("no delivery report within {timeout:?}")),
                Ok(Err(_)) => Err("the producer was closed".into()),
                Ok(Ok(Ok(_delivery))) => Ok(()),
                Ok(Ok(Err((e, _)))) => Err(describe(&e)),
            },
        });
    }
    out
}

/// librdkafka's settings for a destination's producer.
fn producer_config(bootstrap: &str, link: &[(String, String)], timeout: Duration) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set("client.id", format!("sluice/{}", env!("CARGO_PKG_VERSION")))
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        // A report (delivered or not) within the destination's request timeout.
        .set("message.timeout.ms", timeout.as_millis().clamp(1000, i32::MAX as u128).to_string())
        .set("reconnect.backoff.max.ms", "2000")
        .set("log_level", "3");
    for (k, v) in link {
        c.set(k, v);
    }
    c
}

/// Resolve each bootstrap broker and refuse a non-public address.
async fn check_brokers(bootstrap: &str) -> Result<(), Refused> {
    for broker in bootstrap.split(',') {
        // `host:port` or `[v6]:port`, checked when the config was loaded.
        let (host, port) = broker.rsplit_once(':').unwrap_or((broker, ""));
        check_public("Kafka broker", host, port.parse().unwrap_or(9092)).await.map_err(|(verdict, error)| Refused { verdict, error })?;
    }
    Ok(())
}

/// The event's userId, else its anonymousId (strings only).
fn user_key(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Ids {
        #[serde(rename = "userId")]
        user_id: Option<serde_json::Value>,
        #[serde(rename = "anonymousId")]
        anonymous_id: Option<serde_json::Value>,
    }
    let ids: Ids = serde_json::from_slice(body).ok()?;
    let text = |v: Option<serde_json::Value>| match v {
        Some(serde_json::Value::String(s)) if !s.is_empty() => Some(s),
        Some(serde_json::Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    text(ids.user_id).or_else(|| text(ids.anonymous_id))
}

fn describe(e: &KafkaError) -> String {
    match e.rdkafka_error_code() {
        Some(code) => format!("Kafka: {code:?}: {e}"),
        None => format!("Kafka: {e}"),
    }
}

/// A message the cluster will never take (refused by a topic's rules or
/// its ACLs) is discarded; anything else is retried. "Too large" is
/// retried too: the producer is shared, and librdkafka may have put a
/// message sent alone into one produce request with another request's
/// messages to the same partition, so the refusal does not prove the
/// message itself too large (one that is fails when its window ends).
fn verdict_of(error: &str) -> Verdict {
    const NEVER: &[&str] = &[
        "InvalidMessageSize",
        "InvalidRecord",
        "InvalidMessage",
        "TopicAuthorizationFailed",
        "ClusterAuthorizationFailed",
        "InvalidTopic",
        "TopicException",
        "InvalidRequiredAcks",
    ];
    if NEVER.iter().any(|code| error.contains(&format!("Kafka: {code}:"))) {
        Verdict::Discard
    } else {
        Verdict::Retry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_user_key_is_the_user_id_else_the_anonymous_id() {
        assert_eq!(user_key(br#"{"userId":"u1","anonymousId":"a1"}"#).as_deref(), Some("u1"));
        assert_eq!(user_key(br#"{"userId":null,"anonymousId":"a1"}"#).as_deref(), Some("a1"));
        assert_eq!(user_key(br#"{"userId":"","anonymousId":"a1"}"#).as_deref(), Some("a1"));
        assert_eq!(user_key(br#"{"userId":42}"#).as_deref(), Some("42"));
        assert_eq!(user_key(br#"{"userId":{"x":1}}"#), None);
        assert_eq!(user_key(b"not json"), None);
    }

    #[test]
    fn only_what_the_cluster_will_never_take_is_discarded() {
        let topic = KafkaError::MessageProduction(RDKafkaErrorCode::TopicAuthorizationFailed);
        assert_eq!(verdict_of(&describe(&topic)), Verdict::Discard);
        // Perhaps batched with other requests' messages: not proof the message is too large.
        let size = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        assert_eq!(verdict_of(&describe(&size)), Verdict::Retry);
        let timeout = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
        assert_eq!(verdict_of(&describe(&timeout)), Verdict::Retry);
        assert_eq!(verdict_of("no delivery report within 10s"), Verdict::Retry);
    }
}
