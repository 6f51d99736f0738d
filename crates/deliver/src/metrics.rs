//! The delivery stage's metrics (Prometheus, on the admin port).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use sluice_core::metrics::{latency_buckets, Counter, Family, Gauge, Histogram, Registry};

/// `destination`, and `outcome` (succeeded, retry, discarded, archived).
type Labels = Vec<(&'static str, String)>;

#[derive(Clone)]
pub struct DeliverMetrics {
    pub jobs_inserted: Counter,
    pub jobs_duplicate: Counter,
    pub outcomes: Family<Labels, Counter>,
    pub attempt_seconds: Family<Labels, Histogram>,
    pub job_latency_seconds: Histogram,
    /// From ingest's acceptance (`receivedAt`) to a successful delivery (first deliveries only).
    pub end_to_end_seconds: Histogram,
    pub jobs_in_memory: Gauge,
    pub jobdbs: Gauge,
    pub jobdbs_dropped: Counter,
    pub reexecuted_after_restart: Counter,
    /// Unfinished jobs in directors' memory per (source, destination) pair.
    pub pending: Family<Labels, Gauge>,
    /// Age of the oldest unfinished job per pair (seconds since it was made).
    pub oldest_pending_seconds: Family<Labels, Gauge>,
    /// Jobs kept only in the JobDB (spilled) per destination.
    pub spilled: Family<Labels, Gauge>,
    /// Age of the oldest live JobDB.
    pub oldest_jobdb_age_seconds: Gauge,
    /// JobDB transactions that failed and were rolled back (a full disk, a
    /// database that went away); their work is retried with backoff.
    pub jobdb_write_failures: Counter,
    /// JobDBs whose writes are failing now (retried with backoff).
    pub jobdbs_failing: Gauge,
    reports: Arc<Mutex<PairReports>>,
}

/// What each director last reported, summed into the pair gauges.
#[derive(Default)]
struct PairReports {
    pairs: HashMap<u64, HashMap<(String, String), (i64, i64)>>,
    spilled: HashMap<u64, HashMap<String, i64>>,
    shown_pairs: HashSet<(String, String)>,
    shown_spilled: HashSet<String>,
}

impl Default for DeliverMetrics {
    fn default() -> Self {
        Self {
            jobs_inserted: Counter::default(),
            jobs_duplicate: Counter::default(),
            outcomes: Family::default(),
            attempt_seconds: Family::new_with_constructor(|| Histogram::new(latency_buckets())),
            job_latency_seconds: Histogram::new(latency_buckets()),
            end_to_end_seconds: Histogram::new(latency_buckets()),
            jobs_in_memory: Gauge::default(),
            jobdbs: Gauge::default(),
            jobdbs_dropped: Counter::default(),
            reexecuted_after_restart: Counter::default(),
            pending: Family::default(),
            oldest_pending_seconds: Family::default(),
            spilled: Family::default(),
            oldest_jobdb_age_seconds: Gauge::default(),
            jobdb_write_failures: Counter::default(),
            jobdbs_failing: Gauge::default(),
            reports: Arc::default(),
        }
    }
}

impl DeliverMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register("sluice_deliver_jobs_inserted", "Jobs stored (one per event and destination)", self.jobs_inserted.clone());
        r.register(
            "sluice_deliver_jobs_duplicate",
            "Job inserts skipped: the (messageId, destination) job already existed",
            self.jobs_duplicate.clone(),
        );
        r.register("sluice_deliver_outcomes", "Delivery attempt outcomes per destination", self.outcomes.clone());
        r.register("sluice_deliver_attempt_seconds", "HTTP attempt latency per destination", self.attempt_seconds.clone());
        r.register("sluice_deliver_job_latency_seconds", "From job creation (route) to its successful delivery", self.job_latency_seconds.clone());
        r.register(
            "sluice_deliver_end_to_end_seconds",
            "From ingest accepting the event (receivedAt) to its successful delivery, per job (replays excluded)",
            self.end_to_end_seconds.clone(),
        );
        r.register("sluice_deliver_pending", "Unfinished jobs in memory per (source, destination) pair: the retry queue", self.pending.clone());
        r.register(
            "sluice_deliver_oldest_pending_seconds",
            "Age of the oldest unfinished job per (source, destination) pair",
            self.oldest_pending_seconds.clone(),
        );
        r.register("sluice_deliver_spilled", "Unfinished jobs kept only in the JobDB, per destination", self.spilled.clone());
        r.register("sluice_deliver_oldest_jobdb_age_seconds", "Age of the oldest live JobDB", self.oldest_jobdb_age_seconds.clone());
        r.register("sluice_deliver_jobs_in_memory", "Unfinished jobs held in directors' caches", self.jobs_in_memory.clone());
        r.register("sluice_deliver_jobdbs", "JobDB files open", self.jobdbs.clone());
        r.register("sluice_deliver_jobdbs_dropped", "JobDBs deleted whole once all their jobs finished", self.jobdbs_dropped.clone());
        r.register(
            "sluice_deliver_reexecuted_after_restart",
            "Jobs found `executing` after a restart and sent again (possible duplicates)",
            self.reexecuted_after_restart.clone(),
        );
        r.register(
            "sluice_deliver_jobdb_write_failures",
            "JobDB transactions that failed and were rolled back (e.g. a full disk); retried with backoff up to 5 s",
            self.jobdb_write_failures.clone(),
        );
        r.register("sluice_deliver_jobdbs_failing", "JobDBs whose writes are failing now (retried with backoff)", self.jobdbs_failing.clone());
    }

    /// Director `director`'s current view: per pair (unfinished jobs, oldest
    /// `created_at` ms) and spilled jobs per destination. Pairs are summed
    /// over directors; a pair no director reports any more shows 0.
    pub fn report_pairs(&self, director: u64, pairs: HashMap<(String, String), (i64, i64)>, spilled: HashMap<String, i64>, now_ms: i64) {
        let mut r = self.reports.lock().expect("reports lock");
        r.pairs.insert(director, pairs);
        r.spilled.insert(director, spilled);
        let mut total: HashMap<(String, String), (i64, i64)> = HashMap::new();
        for m in r.pairs.values() {
            for (k, (n, oldest)) in m {
                let e = total.entry(k.clone()).or_insert((0, i64::MAX));
                e.0 += n;
                e.1 = e.1.min(*oldest);
            }
        }
        let mut spilled_total: HashMap<String, i64> = HashMap::new();
        for m in r.spilled.values() {
            for (d, n) in m {
                *spilled_total.entry(d.clone()).or_default() += n;
            }
        }
        let pair_labels = |(s, d): &(String, String)| vec![("source", s.clone()), ("destination", d.clone())];
        for k in r.shown_pairs.iter().filter(|k| !total.contains_key(*k)) {
            self.pending.get_or_create(&pair_labels(k)).set(0);
            self.oldest_pending_seconds.get_or_create(&pair_labels(k)).set(0);
        }
        for (k, (n, oldest)) in &total {
            self.pending.get_or_create(&pair_labels(k)).set(*n);
            self.oldest_pending_seconds.get_or_create(&pair_labels(k)).set(((now_ms - oldest) / 1000).max(0));
        }
        for d in r.shown_spilled.iter().filter(|d| !spilled_total.contains_key(*d)) {
            self.spilled.get_or_create(&vec![("destination", d.clone())]).set(0);
        }
        for (d, n) in &spilled_total {
            self.spilled.get_or_create(&vec![("destination", d.clone())]).set(*n);
        }
        r.shown_pairs.extend(total.into_keys());
        r.shown_spilled.extend(spilled_total.into_keys());
    }

    /// A director ended: its pairs no longer count.
    pub fn forget_director(&self, director: u64, now_ms: i64) {
        self.report_pairs(director, HashMap::new(), HashMap::new(), now_ms);
        let mut r = self.reports.lock().expect("reports lock");
        r.pairs.remove(&director);
        r.spilled.remove(&director);
    }

    /// The series of one destination, made once and kept by its gate, so a
    /// delivery records its outcome without building label sets.
    pub fn for_destination(&self, destination: &str) -> DestMetrics {
        let outcome = |o: &str| self.outcomes.get_or_create(&vec![("destination", destination.to_owned()), ("outcome", o.to_owned())]).clone();
        DestMetrics {
            succeeded: outcome("succeeded"),
            retry: outcome("retry"),
            discarded: outcome("discarded"),
            archived: outcome("archived"),
            attempt_seconds: self.attempt_seconds.get_or_create(&vec![("destination", destination.to_owned())]).clone(),
        }
    }
}

/// One destination's delivery series (handles into [`DeliverMetrics`]' families).
#[derive(Clone, Debug)]
pub struct DestMetrics {
    pub succeeded: Counter,
    pub retry: Counter,
    pub discarded: Counter,
    pub archived: Counter,
    pub attempt_seconds: Histogram,
}
