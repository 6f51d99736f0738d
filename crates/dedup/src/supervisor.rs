//! Dedup's per-partition supervisor: one [`DedupWorker`] thread per owned
//! `input` partition (all of them with the embedded log; Kafka's `dedup`
//! group assigns them across processes).
//!
//! Invariants:
//! - A worker runs on a partition only while this process owns it: the
//!   supervisor starts one when a partition is assigned and stops it (batch
//!   finished, index flushed and closed) before the partition is given up.
//! - A worker that cannot open its index retries every 5 s until it can or
//!   is stopped, so no owned partition is left behind.
//! - Stopping ([`DedupSettings::stop`]) stops every worker, then leaves the
//!   group (dropping the membership) only once all of them have stopped, so
//!   no other owner starts on a partition a worker still writes.
//! - Each worker's backlog age is watched from the side
//!   ([`sluice_log::backlog::watch_backlog`]) while it owns its partition,
//!   and its series is dropped when it stops (another process may own the
//!   partition next).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use sluice_core::Shutdown;
use sluice_log::Log;
use tokio::runtime::Handle;

use crate::{DedupError, DedupMetrics, DedupSettings, DedupWorker, Progress, GROUP, INPUT_TOPIC};

/// How often the supervisor compares the partitions it owns with the workers it runs.
const SUPERVISE_EVERY: Duration = Duration::from_millis(100);
/// How long a worker that cannot open its index waits before trying again.
const OPEN_RETRY: Duration = Duration::from_secs(5);

/// Join `dedup` on `input` and start the supervisor thread ("dedup-supervisor");
/// it runs until `settings.stop` is triggered, and has stopped every worker
/// and left the group when it returns. `rt` runs the log's async calls.
pub fn spawn_supervisor(log: Arc<dyn Log>, settings: DedupSettings, metrics: DedupMetrics, rt: Handle) -> Result<JoinHandle<()>, DedupError> {
    let membership = log.join(GROUP, INPUT_TOPIC)?;
    let stop = settings.stop.clone();
    let supervisor = std::thread::Builder::new().name("dedup-supervisor".into()).spawn(move || {
        let mut owned = membership.watch();
        // Each worker has a stop signal of its own: a revoked partition stops one worker.
        let mut running: BTreeMap<u32, (Shutdown, JoinHandle<()>)> = BTreeMap::new();
        while !stop.is_triggered() {
            let now: BTreeSet<u32> = owned.borrow_and_update().clone();
            let revoked: Vec<u32> = running.keys().filter(|p| !now.contains(p)).copied().collect();
            for p in revoked {
                let (worker_stop, worker) = running.remove(&p).expect("running");
                worker_stop.trigger();
                let _ = worker.join();
                tracing::info!(partition = p, "dedup worker stopped: partition revoked");
            }
            for p in now {
                if running.contains_key(&p) {
                    continue;
                }
                let worker_stop = Shutdown::new();
                let settings = DedupSettings { stop: worker_stop.clone(), ..settings.clone() };
                match spawn_worker(p, log.clone(), settings, metrics.clone(), rt.clone()) {
                    Ok(worker) => {
                        running.insert(p, (worker_stop, worker));
                    }
                    Err(e) => tracing::error!(partition = p, error = %e, "cannot start a dedup worker thread; retrying"),
                }
            }
            stop.sleep_blocking(SUPERVISE_EVERY);
        }
        for (worker_stop, _) in running.values() {
            worker_stop.trigger();
        }
        for (_, (_, worker)) in running {
            let _ = worker.join();
        }
        drop(membership); // leave the group only once every worker has stopped
    });
    supervisor.map_err(DedupError::Thread)
}

/// One partition's thread ("dedup-<p>"): open the worker (retrying), run it
/// until `settings.stop`.
fn spawn_worker(partition: u32, log: Arc<dyn Log>, settings: DedupSettings, metrics: DedupMetrics, rt: Handle) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name(format!("dedup-{partition}")).spawn(move || {
        // Watches the partition from the side while this worker owns it, so a
        // worker that hangs or keeps failing still shows a growing age.
        let labels = metrics.partition(partition);
        let monitor = rt.spawn(sluice_log::backlog::watch_backlog(
            log.clone(),
            "dedup",
            INPUT_TOPIC,
            GROUP,
            partition,
            metrics.oldest_unprocessed.get_or_create(&labels).clone(),
        ));
        let _unwatch = Unwatch(monitor, metrics.clone(), labels);
        let mut progress = |p: Progress| {
            tracing::info!(partition = p.partition, done = p.done, total = p.total, "dedup index catch-up from output");
        };
        let stop = settings.stop.clone();
        while !stop.is_triggered() {
            match DedupWorker::open(log.clone(), partition, settings.clone(), metrics.clone(), &rt, &mut progress) {
                Ok(worker) => return worker.run(rt),
                Err(DedupError::Stopped) => return,
                Err(e) => {
                    tracing::error!(partition, error = %e, "dedup worker cannot start; retrying in 5 s");
                    if stop.sleep_blocking(OPEN_RETRY) {
                        return;
                    }
                }
            }
        }
    })
}

/// Stops a worker's backlog watch and drops its series when the worker ends
/// (another process may own the partition next).
struct Unwatch(tokio::task::JoinHandle<()>, DedupMetrics, Vec<(&'static str, String)>);

impl Drop for Unwatch {
    fn drop(&mut self) {
        self.0.abort();
        self.1.oldest_unprocessed.remove(&self.2);
    }
}
