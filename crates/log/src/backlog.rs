//! How far behind a stage is on one partition, without reading a record:
//! [`BacklogAge`] estimates the age of the oldest record the stage has not
//! processed from samples of the partition's end and the stage's committed
//! offset; [`watch_backlog`] samples them beside a worker (route's and
//! dedup's), so a worker that hangs or keeps failing still shows a growing
//! age.

use std::sync::Arc;
use std::time::Duration;

use sluice_core::metrics::Gauge;

use crate::Log;

/// Age of the oldest record of one partition a stage has not processed
/// yet, estimated without reading a record: every few seconds the
/// partition's end and the stage's committed offset are sampled. A sample
/// (end `e`, time `t`) says the records below `e` existed at `t`; the oldest
/// unprocessed record (the committed offset `c`) is therefore at least as
/// old as the first sample with `e > c`. The estimate is low by at most one
/// sampling interval, and starts at 0 for a backlog older than the first
/// sample. When a sample cannot be taken (Kafka down, a call hanging) the
/// age keeps growing from the last ones.
#[derive(Debug, Default)]
pub struct BacklogAge {
    /// (end, first seen), ends increasing.
    seen: std::collections::VecDeque<(u64, std::time::Instant)>,
    committed: Option<u64>,
    warned: Option<std::time::Instant>,
}

impl BacklogAge {
    const MAX_SAMPLES: usize = 256;

    /// Record what could be sampled; the age of the oldest unprocessed record.
    pub fn observe(&mut self, end: Option<u64>, committed: Option<u64>, now: std::time::Instant) -> Duration {
        if let Some(c) = committed {
            self.committed = Some(c);
        }
        if let Some(e) = end {
            if self.seen.back().is_none_or(|(last, _)| e > *last) {
                if self.seen.len() >= Self::MAX_SAMPLES {
                    // Thin out (every other sample) rather than lose the oldest.
                    let mut i = 0;
                    self.seen.retain(|_| {
                        i += 1;
                        i % 2 == 1
                    });
                }
                self.seen.push_back((e, now));
            }
        }
        let c = self.committed.unwrap_or(0);
        // Samples at or below the committed offset are processed; keep the
        // newest so the next end is compared with it.
        while self.seen.len() > 1 && self.seen[0].0 <= c {
            self.seen.pop_front();
        }
        match self.seen.front() {
            Some((e, t)) if *e > c => now.saturating_duration_since(*t),
            _ => Duration::ZERO,
        }
    }

    /// Whether to log that the stage is behind (an age past `after`, at most once a minute).
    pub fn should_warn(&mut self, age: Duration, after: Duration, now: std::time::Instant) -> bool {
        if age < after || self.warned.is_some_and(|w| now.saturating_duration_since(w) < Duration::from_secs(60)) {
            return false;
        }
        self.warned = Some(now);
        true
    }
}

/// Every 2 s, set `gauge` to the [`BacklogAge`] of `stage` (consumer group
/// `group`) on `topic`'s `partition`, and log a warning while it is past a
/// minute: the stage is not progressing, or not keeping up, while its input
/// grows. Runs until aborted. Shared by the route and dedup's supervisor.
pub async fn watch_backlog(
    log: Arc<dyn Log>,
    stage: &'static str,
    topic: &'static str,
    group: &'static str,
    partition: u32,
    gauge: Gauge<f64, std::sync::atomic::AtomicU64>,
) {
    let mut age = BacklogAge::default();
    loop {
        let bounded = Duration::from_secs(2);
        let range = tokio::time::timeout(bounded, log.offsets(topic, partition)).await.ok().and_then(Result::ok);
        let committed = tokio::time::timeout(bounded, log.committed(group, topic, partition)).await.ok().and_then(Result::ok);
        // Never committed: the stage starts at the oldest record held.
        let committed = match (committed, range) {
            (Some(Some(c)), _) => Some(c),
            (Some(None), Some(r)) => Some(r.start),
            _ => None,
        };
        let now = std::time::Instant::now();
        let a = age.observe(range.map(|r| r.end), committed, now);
        gauge.set(a.as_secs_f64());
        if age.should_warn(a, Duration::from_secs(60), now) {
            tracing::warn!(
                stage, topic, partition, oldest_unprocessed_seconds = a.as_secs(), end = ?range.map(|r| r.end), committed = ?committed,
                "{stage} is not keeping up with {topic}/{partition}: its oldest unprocessed record is {}s old", a.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

#[cfg(test)]
mod backlog_age_tests {
    use super::BacklogAge;
    use std::time::{Duration, Instant};

    #[test]
    fn age_is_that_of_the_first_sample_past_the_committed_offset() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let mut a = BacklogAge::default();
        assert_eq!(a.observe(Some(10), Some(10), s(0)), Duration::ZERO, "caught up");
        assert_eq!(a.observe(Some(15), Some(10), s(2)), Duration::ZERO, "records 10..15 first seen now");
        assert_eq!(a.observe(Some(20), Some(10), s(4)), Duration::from_secs(2));
        // Progress past the first sample: the next one (seen at 4 s) is the oldest.
        assert_eq!(a.observe(Some(25), Some(16), s(6)), Duration::from_secs(2));
        // Stuck, and nothing can be sampled (Kafka down): the age keeps growing.
        assert_eq!(a.observe(None, None, s(30)), Duration::from_secs(26));
        // Caught up again.
        assert_eq!(a.observe(Some(25), Some(25), s(32)), Duration::ZERO);
        assert_eq!(a.observe(Some(26), Some(25), s(34)), Duration::ZERO);
        assert_eq!(a.observe(Some(26), Some(25), s(40)), Duration::from_secs(6));
    }

    #[test]
    fn samples_stay_bounded_and_keep_the_oldest() {
        let t0 = Instant::now();
        let mut a = BacklogAge::default();
        a.observe(Some(1), Some(0), t0);
        for i in 2..10_000u64 {
            a.observe(Some(i), Some(0), t0 + Duration::from_secs(i));
        }
        assert!(a.seen.len() <= BacklogAge::MAX_SAMPLES);
        let age = a.observe(None, Some(0), t0 + Duration::from_secs(10_000));
        assert_eq!(age, Duration::from_secs(10_000), "the first sample is never thinned out");
    }

    #[test]
    fn warns_past_the_threshold_at_most_once_a_minute() {
        let t0 = Instant::now();
        let mut a = BacklogAge::default();
        let min = Duration::from_secs(60);
        assert!(!a.should_warn(Duration::from_secs(59), min, t0));
        assert!(a.should_warn(Duration::from_secs(61), min, t0));
        assert!(!a.should_warn(Duration::from_secs(90), min, t0 + Duration::from_secs(30)));
        assert!(a.should_warn(Duration::from_secs(125), min, t0 + Duration::from_secs(61)));
    }
}

#[cfg(test)]
mod watch_backlog_tests {
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;
    use sluice_core::metrics::Gauge;

    use crate::{Checkpoint, EmbeddedLog, Log, LogOptions, Record};

    /// A partition whose records nobody commits: the gauge rises with the
    /// wall clock; once the stage commits the end, it drops back to 0.
    #[tokio::test(flavor = "multi_thread")]
    async fn the_age_rises_while_nothing_is_committed_and_falls_once_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let options = LogOptions { topics: vec![("output".into(), 1)], ..LogOptions::default() };
        let log = Arc::new(EmbeddedLog::open(dir.path(), options).unwrap());
        let gauge: Gauge<f64, std::sync::atomic::AtomicU64> = Gauge::default();
        let watch = tokio::spawn(super::watch_backlog(log.clone(), "route", "output", "route", 0, gauge.clone()));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rec = || Record { key: Bytes::from_static(b"web/m"), value: Bytes::from_static(b"{}") };
        log.append("output", 0, vec![rec()]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(6500)).await;
        assert!(gauge.get() >= 3.0, "stuck for ~6 s, the age says {}", gauge.get());
        let end = log.offsets("output", 0).await.unwrap().end;
        log.commit(Checkpoint { group: "route", topic: "output", partition: 0, next_offset: end }).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(gauge.get(), 0.0);
        watch.abort();
    }
}
