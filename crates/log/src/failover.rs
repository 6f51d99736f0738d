//! Two Kafka clusters for ingest: a primary, and a secondary that takes new
//! writes while the primary is unhealthy (`[log.kafka.primary]`,
//! `[log.kafka.secondary]`).
//!
//! Invariants:
//! - **Writes** to `input` go to the active cluster. A health monitor
//!   watches the primary's appends (errors, and appends not acknowledged
//!   within `slow_after`, which are abandoned); when three in a row or half
//!   of the last [`WINDOW`] were bad, new writes move to the secondary. While there, the primary is
//!   probed every second, and writes move back after [`PROBES_TO_RETURN`]
//!   probes in a row succeed. An append that fails on one cluster is tried
//!   on the other before the error reaches the caller (the ingest spool).
//! - **Reads.** Every topic is the primary's, except [`SECONDARY_INPUT`],
//!   which is the secondary's `input`: dedup reads both inputs of a
//!   partition into one index, so a messageId is deduplicated whichever
//!   cluster took it, and publishes to the primary's `output`.
//! - **Atomicity.** Publishing to the primary's `output` and committing the
//!   secondary's `input` offset cannot be one transaction across clusters;
//!   for that input dedup uses the embedded log's protocol (publish, index,
//!   commit), whose crash safety does not depend on atomicity.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use crate::{Checkpoint, KafkaLog, Log, LogError, Membership, OffsetRange, Publish, ReadBatch, Record, StoredRecord};

use sluice_core::topics::INPUT;
/// The secondary cluster's `input`, as dedup sees it.
pub use sluice_core::topics::SECONDARY_INPUT;
/// Appends the health monitor judges the primary by.
pub const WINDOW: usize = 20;
/// Consecutive good probes before writes return to the primary.
pub const PROBES_TO_RETURN: u32 = 3;

/// Where new writes go, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Active {
    Primary,
    Secondary,
}

struct Health {
    /// The primary's last appends: `true` = bad (failed or slower than `slow_after`).
    recent: VecDeque<bool>,
    good_probes: u32,
}

pub struct FailoverLog {
    primary: KafkaLog,
    secondary: KafkaLog,
    slow_after: Duration,
    on_secondary: AtomicBool,
    health: Mutex<Health>,
    /// Counts switches (for metrics and tests).
    pub switches: std::sync::atomic::AtomicU64,
}

impl FailoverLog {
    /// `secondary` must have the `input` topic with the primary's partition count.
    pub fn new(primary: KafkaLog, secondary: KafkaLog, slow_after: Duration) -> Result<Arc<FailoverLog>, LogError> {
        let (p, s) = (primary.partitions(INPUT)?, secondary.partitions(INPUT)?);
        if p != s {
            return Err(LogError::Config(format!("input has {p} partitions on the primary Kafka cluster but {s} on the secondary")));
        }
        let log = Arc::new(FailoverLog {
            primary,
            secondary,
            slow_after,
            on_secondary: AtomicBool::new(false),
            health: Mutex::new(Health { recent: VecDeque::with_capacity(WINDOW), good_probes: 0 }),
            switches: Default::default(),
        });
        tokio::spawn(probe_primary(Arc::downgrade(&log)));
        Ok(log)
    }

    pub fn active(&self) -> Active {
        if self.on_secondary.load(Ordering::SeqCst) {
            Active::Secondary
        } else {
            Active::Primary
        }
    }

    /// Record one primary append; move writes to the secondary when half of
    /// the window was bad.
    fn judge(&self, bad: bool) {
        let mut h = self.health.lock().expect("health lock");
        if h.recent.len() == WINDOW {
            h.recent.pop_front();
        }
        h.recent.push_back(bad);
        let bad_count = h.recent.iter().filter(|b| **b).count();
        // A burst of failures at the start counts too: 3 in a row suffice.
        let tripped = bad_count * 2 >= WINDOW || (h.recent.len() >= 3 && h.recent.iter().rev().take(3).all(|b| *b));
        if tripped && !self.on_secondary.swap(true, Ordering::SeqCst) {
            h.recent.clear();
            h.good_probes = 0;
            self.switches.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("Kafka primary unhealthy ({bad_count} of the last appends failed or were slow): new writes go to the secondary");
        }
    }

    fn probe_result(&self, ok: bool) {
        let mut h = self.health.lock().expect("health lock");
        h.good_probes = if ok { h.good_probes + 1 } else { 0 };
        if h.good_probes >= PROBES_TO_RETURN && self.on_secondary.swap(false, Ordering::SeqCst) {
            h.good_probes = 0;
            h.recent.clear();
            self.switches.fetch_add(1, Ordering::Relaxed);
            tracing::info!("Kafka primary healthy again: new writes go back to it");
        }
    }

    fn route<'a>(&'a self, topic: &'a str) -> (&'a KafkaLog, &'a str) {
        if topic == SECONDARY_INPUT {
            (&self.secondary, INPUT)
        } else {
            (&self.primary, topic)
        }
    }

    /// Append to the primary, giving up after `slow_after` (the append may
    /// still land: dedup drops the copy the caller then writes elsewhere).
    async fn append_primary(&self, partition: u32, records: Vec<Record>) -> Result<u64, LogError> {
        let result = match tokio::time::timeout(self.slow_after, self.primary.append(INPUT, partition, records)).await {
            Ok(r) => r,
            Err(_) => Err(LogError::Unavailable(format!("the primary Kafka cluster did not acknowledge within {:?}", self.slow_after))),
        };
        self.judge(result.is_err());
        result
    }
}

/// While writes are on the secondary, ask the primary for a partition's
/// offsets every second; enough answers in a row bring writes back.
async fn probe_primary(log: std::sync::Weak<FailoverLog>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(log) = log.upgrade() else { return };
        if log.active() == Active::Secondary {
            let ok = matches!(tokio::time::timeout(log.slow_after, log.primary.offsets(INPUT, 0)).await, Ok(Ok(_)));
            log.probe_result(ok);
        }
    }
}

#[async_trait]
impl Log for FailoverLog {
    fn partitions(&self, topic: &str) -> Result<u32, LogError> {
        let (log, topic) = self.route(topic);
        log.partitions(topic)
    }

    async fn append(&self, topic: &str, partition: u32, records: Vec<Record>) -> Result<u64, LogError> {
        if topic != INPUT {
            let (log, topic) = self.route(topic);
            return log.append(topic, partition, records).await;
        }
        match self.active() {
            Active::Primary => match self.append_primary(partition, records.clone()).await {
                Ok(o) => Ok(o),
                // Both copies may land (a timed-out append can still succeed): dedup drops the repeat.
                Err(e) => self
                    .secondary
                    .append(INPUT, partition, records)
                    .await
                    .map_err(|e2| LogError::Unavailable(format!("both Kafka clusters refused the append: primary: {e}; secondary: {e2}"))),
            },
            Active::Secondary => match self.secondary.append(INPUT, partition, records.clone()).await {
                Ok(o) => Ok(o),
                Err(e) => self
                    .append_primary(partition, records)
                    .await
                    .map_err(|e2| LogError::Unavailable(format!("both Kafka clusters refused the append: secondary: {e}; primary: {e2}"))),
            },
        }
    }

    async fn read(&self, topic: &str, partition: u32, from: u64, max: usize) -> Result<Vec<StoredRecord>, LogError> {
        let (log, topic) = self.route(topic);
        log.read(topic, partition, from, max).await
    }

    async fn read_batch(&self, topic: &str, partition: u32, from: u64, max: usize) -> Result<ReadBatch, LogError> {
        let (log, topic) = self.route(topic);
        log.read_batch(topic, partition, from, max).await
    }

    async fn offsets(&self, topic: &str, partition: u32) -> Result<OffsetRange, LogError> {
        let (log, topic) = self.route(topic);
        log.offsets(topic, partition).await
    }

    async fn commit(&self, at: Checkpoint<'_>) -> Result<(), LogError> {
        let (log, topic) = self.route(at.topic);
        log.commit(Checkpoint { topic, ..at }).await
    }

    async fn committed(&self, group: &str, topic: &str, partition: u32) -> Result<Option<u64>, LogError> {
        let (log, topic) = self.route(topic);
        log.committed(group, topic, partition).await
    }

    async fn resume_point(&self, group: &str, topic: &str, partition: u32) -> Result<Option<u64>, LogError> {
        let (log, topic) = self.route(topic);
        log.resume_point(group, topic, partition).await
    }

    fn atomic_publish_and_commit(&self, in_topic: &str) -> bool {
        in_topic == INPUT
    }

    async fn publish_and_commit(&self, p: Publish<'_>) -> Result<Option<u64>, LogError> {
        if self.atomic_publish_and_commit(p.commit.topic) {
            return self.primary.publish_and_commit(p).await;
        }
        crate::publish_then_commit(self, p).await
    }

    fn join(&self, group: &str, topic: &str) -> Result<Membership, LogError> {
        let (log, topic) = self.route(topic);
        log.join(group, topic)
    }

    fn extra_inputs(&self) -> Vec<String> {
        vec![SECONDARY_INPUT.to_owned()]
    }
}
