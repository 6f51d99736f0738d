//! Running the dedup stage inside `sluice serve`, and `sluice dedup rebuild`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use sluice_core::config::Flags;
use sluice_core::Config;
use sluice_dedup::index::IndexOptions;
use sluice_dedup::{rebuild_partition, DedupMetrics, DedupSettings, DedupWorker, Progress};
use sluice_log::{EmbeddedLog, Log, LogMetrics};

use crate::ConfigArgs;

#[derive(Subcommand)]
pub enum DedupCommand {
    /// Move a partition's index aside and rebuild it from `output`, with a
    /// progress bar. Run it while `sluice serve` is stopped.
    Rebuild {
        #[command(flatten)]
        config: ConfigArgs,
        /// Overrides `server.data_dir`.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Only this partition (all when absent).
        #[arg(long)]
        partition: Option<u32>,
    },
}

pub fn settings(config: &Config, stop: Arc<AtomicBool>) -> Result<DedupSettings> {
    let d = &config.dedup;
    Ok(DedupSettings {
        index_dir: config.server.data_dir.join("dedup"),
        index: IndexOptions::new(d.bloom_bits_per_key, d.window, d.block_cache_bytes)?,
        batch_size: d.batch_size.get(),
        poll_interval: Duration::from_millis(5),
        stop,
    })
}

/// One dedicated thread per owned `input` partition (all of them with the
/// embedded log; Kafka's `dedup` group assigns them across processes). A
/// supervisor thread starts a worker when a partition is assigned and stops
/// it, index closed, when the partition is revoked. A worker that cannot
/// open its index retries until it can or is stopped, so no owned partition
/// is left behind.
pub fn spawn_workers(config: &Config, log: Arc<dyn Log>, metrics: DedupMetrics, stop: Arc<AtomicBool>) -> Result<Vec<JoinHandle<()>>> {
    let settings = settings(config, stop.clone())?;
    let rt = tokio::runtime::Handle::current();
    let membership = log.join(sluice_dedup::GROUP, sluice_dedup::INPUT_TOPIC).context("dedup cannot join its consumer group")?;
    let supervisor = std::thread::Builder::new().name("dedup-supervisor".into()).spawn(move || {
        let mut owned = membership.watch();
        let mut running: BTreeMap<u32, (Arc<AtomicBool>, JoinHandle<()>)> = BTreeMap::new();
        while !stop.load(Ordering::Relaxed) {
            let now: BTreeSet<u32> = owned.borrow_and_update().clone();
            let revoked: Vec<u32> = running.keys().filter(|p| !now.contains(p)).copied().collect();
            for p in revoked {
                let (flag, worker) = running.remove(&p).expect("running");
                flag.store(true, Ordering::Relaxed);
                let _ = worker.join();
                tracing::info!(partition = p, "dedup worker stopped: partition revoked");
            }
            for p in now {
                if running.contains_key(&p) {
                    continue;
                }
                let flag = Arc::new(AtomicBool::new(false));
                let settings = DedupSettings { stop: flag.clone(), ..settings.clone() };
                match spawn_worker(p, log.clone(), settings, metrics.clone(), rt.clone()) {
                    Ok(worker) => {
                        running.insert(p, (flag, worker));
                    }
                    Err(e) => tracing::error!(partition = p, error = %e, "cannot start a dedup worker thread; retrying"),
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for (flag, _) in running.values() {
            flag.store(true, Ordering::Relaxed);
        }
        for (_, (_, worker)) in running {
            let _ = worker.join();
        }
        drop(membership); // leave the group only once every worker has stopped
    })?;
    Ok(vec![supervisor])
}

fn spawn_worker(
    partition: u32,
    log: Arc<dyn Log>,
    settings: DedupSettings,
    metrics: DedupMetrics,
    rt: tokio::runtime::Handle,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name(format!("dedup-{partition}")).spawn(move || {
        // Watches the partition from the side while this worker owns it, so a
        // worker that hangs or keeps failing still shows a growing age.
        let labels = metrics.partition(partition);
        let monitor = rt.spawn(sluice_route::watch_backlog(
            log.clone(),
            "dedup",
            sluice_dedup::INPUT_TOPIC,
            sluice_dedup::GROUP,
            partition,
            metrics.oldest_unprocessed.get_or_create(&labels).clone(),
        ));
        let _unwatch = Unwatch(monitor, metrics.clone(), labels);
        let mut progress = |p: Progress| {
            tracing::info!(partition = p.partition, done = p.done, total = p.total, "dedup index catch-up from output");
        };
        let stop = settings.stop.clone();
        while !stop.load(Ordering::Relaxed) {
            match DedupWorker::open(log.clone(), partition, settings.clone(), metrics.clone(), &rt, &mut progress) {
                Ok(worker) => return worker.run(rt),
                Err(sluice_dedup::DedupError::Stopped) => return,
                Err(e) => {
                    tracing::error!(partition, error = %e, "dedup worker cannot start; retrying in 5 s");
                    for _ in 0..50 {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(100));
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

pub fn run(cmd: DedupCommand) -> Result<()> {
    match cmd {
        DedupCommand::Rebuild { config, data_dir, partition } => {
            let config = Config::load_with(config.config.as_deref(), Flags { data_dir, ..Flags::default() })?;
            let partitions: Vec<u32> = match partition {
                Some(p) if p >= config.log.partitions => bail!("there is no partition {p} (log.partitions = {})", config.log.partitions),
                Some(p) => vec![p],
                None => (0..config.log.partitions).collect(),
            };
            let root = config.server.data_dir.join("log");
            // Opening the log for writing takes its lock: a running server is refused.
            let log = EmbeddedLog::open(&root, crate::log_options(&config, LogMetrics::default()))
                .with_context(|| format!("cannot open the log at {} (stop `sluice serve` first)", root.display()))?;
            let log: Arc<dyn Log> = Arc::new(log);
            let settings = settings(&config, Arc::new(AtomicBool::new(false)))?;
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            for p in partitions {
                let mut bar = ProgressBar::new(p);
                let stats = rebuild_partition(log.clone(), p, settings.clone(), rt.handle(), &mut |pr| bar.draw(pr))?;
                bar.finish();
                eprintln!("partition {p}: index rebuilt, ~{} ids", stats.estimated_keys);
            }
            Ok(())
        }
    }
}

/// A one-line progress bar on stderr.
struct ProgressBar {
    partition: u32,
    drawn: bool,
}

impl ProgressBar {
    fn new(partition: u32) -> Self {
        Self { partition, drawn: false }
    }

    fn draw(&mut self, p: Progress) {
        const WIDTH: usize = 30;
        let frac = if p.total == 0 { 1.0 } else { p.done as f64 / p.total as f64 };
        let filled = (frac * WIDTH as f64).round() as usize;
        let rate = p.done as f64 / p.elapsed.as_secs_f64().max(1e-3);
        eprint!(
            "\rpartition {} [{}{}] {:>5.1}% {}/{} ids {:.0} ids/s",
            self.partition,
            "#".repeat(filled),
            " ".repeat(WIDTH - filled),
            frac * 100.0,
            p.done,
            p.total,
            rate
        );
        let _ = std::io::stderr().flush();
        self.drawn = true;
    }

    fn finish(&self) {
        if self.drawn {
            eprintln!();
        }
    }
}
