//! Wiring the dedup stage into `sluice serve` (settings from the config;
//! the supervisor itself is `sluice_dedup::spawn_supervisor`), and
//! `sluice dedup rebuild`.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use sluice_core::config::Flags;
use sluice_core::{Config, Shutdown};
use sluice_dedup::index::IndexOptions;
use sluice_dedup::{rebuild_partition, DedupMetrics, DedupSettings, Progress};
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

pub fn settings(config: &Config, stop: Shutdown) -> Result<DedupSettings> {
    let d = &config.dedup;
    Ok(DedupSettings {
        index_dir: config.server.data_dir.join("dedup"),
        index: IndexOptions::new(d.bloom_bits_per_key, d.window, d.block_cache_bytes)?,
        batch_size: d.batch_size.get(),
        poll_interval: Duration::from_millis(5),
        stop,
    })
}

/// Start dedup's supervisor (`sluice_dedup::spawn_supervisor`: one worker
/// thread per owned `input` partition) until `stop` is triggered.
pub fn spawn_workers(config: &Config, log: Arc<dyn Log>, metrics: DedupMetrics, stop: Shutdown) -> Result<Vec<JoinHandle<()>>> {
    let settings = settings(config, stop)?;
    let supervisor = sluice_dedup::spawn_supervisor(log, settings, metrics, tokio::runtime::Handle::current())
        .context("dedup cannot start (joining its consumer group, or its supervisor thread)")?;
    Ok(vec![supervisor])
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
            let settings = settings(&config, Shutdown::new())?;
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
