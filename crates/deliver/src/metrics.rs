//! The delivery stage's metrics (Prometheus, on the admin port).

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
    pub jobs_in_memory: Gauge,
    pub jobdbs: Gauge,
    pub jobdbs_dropped: Counter,
    pub reexecuted_after_restart: Counter,
}

impl Default for DeliverMetrics {
    fn default() -> Self {
        Self {
            jobs_inserted: Counter::default(),
            jobs_duplicate: Counter::default(),
            outcomes: Family::default(),
            attempt_seconds: Family::new_with_constructor(|| Histogram::new(latency_buckets())),
            job_latency_seconds: Histogram::new(latency_buckets()),
            jobs_in_memory: Gauge::default(),
            jobdbs: Gauge::default(),
            jobdbs_dropped: Counter::default(),
            reexecuted_after_restart: Counter::default(),
        }
    }
}

impl DeliverMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register("sluice_deliver_jobs_inserted", "Jobs stored (one per event and destination)", self.jobs_inserted.clone());
        r.register("sluice_deliver_jobs_duplicate", "Job inserts skipped: the (messageId, destination) job already existed", self.jobs_duplicate.clone());
        r.register("sluice_deliver_outcomes", "Delivery attempt outcomes per destination", self.outcomes.clone());
        r.register("sluice_deliver_attempt_seconds", "HTTP attempt latency per destination", self.attempt_seconds.clone());
        r.register("sluice_deliver_job_latency_seconds", "From job creation (route) to its successful delivery", self.job_latency_seconds.clone());
        r.register("sluice_deliver_jobs_in_memory", "Unfinished jobs held in directors' caches", self.jobs_in_memory.clone());
        r.register("sluice_deliver_jobdbs", "JobDB files open", self.jobdbs.clone());
        r.register("sluice_deliver_jobdbs_dropped", "JobDBs deleted whole once all their jobs finished", self.jobdbs_dropped.clone());
        r.register(
            "sluice_deliver_reexecuted_after_restart",
            "Jobs found `executing` after a restart and sent again (possible duplicates)",
            self.reexecuted_after_restart.clone(),
        );
    }

    pub fn outcome(&self, destination: &str, outcome: &str) {
        self.outcomes.get_or_create(&vec![("destination", destination.to_owned()), ("outcome", outcome.to_owned())]).inc();
    }

    pub fn attempt(&self, destination: &str, seconds: f64) {
        self.attempt_seconds.get_or_create(&vec![("destination", destination.to_owned())]).observe(seconds);
    }
}
