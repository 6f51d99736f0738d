//! The route and delivery stages inside `sluice serve`, and their tools:
//! `sluice jobs inspect|stats`, `sluice replay` (`sluice sink`: `sink.rs`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use sluice_admin::views::{job_json, without_password};
use sluice_core::config::Flags;
use sluice_core::metrics::Registry;
use sluice_core::{Config, Shutdown};
use sluice_deliver::cluster::{self, DirectorClient, DirectorNode, Directory};
use sluice_deliver::control::ControlDb;
use sluice_deliver::{Catalog, Centrifuge, CentrifugeOptions, DeliverError, DeliverMetrics};
use sluice_log::Log;
use sluice_route::{RouteMetrics, RouteSettings};
use tokio::task::JoinHandle;

use crate::ConfigArgs;

/// The running route and/or director stages.
pub struct Running {
    /// The JobDBs of `sluice serve` (route and director in one process).
    pub centrifuge: Option<Arc<Centrifuge>>,
    /// A separate director: its RPC server (which holds its current JobDBs)
    /// and its entry in the directory, marked stopped at stop.
    director_node: Option<DirectorNode>,
    tasks: Vec<JoinHandle<()>>,
    housekeeping: Vec<JoinHandle<()>>,
    stop: Shutdown,
    /// Where replays find the events of workspaces moved here (set by the cell's link, `cell::start`).
    pub history: sluice_route::HistorySlot,
}

/// How often a process checks that it still holds its scope lock.
const SCOPE_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// A process's claim on its JobDB scope (see [`claim_scope`]).
pub struct ScopeClaim {
    lock: sluice_deliver::sqljobdb::DirectorLock,
    dbs: sluice_deliver::sqljobdb::SqlJobDbs,
    name: String,
    /// Who else would hold it, for the error.
    who: String,
}

/// With `deliver.jobdb_url`, a process that keeps JobDBs (`sluice serve`,
/// a `sluice director`) takes the lock of its JobDB scope before it touches
/// anything shared: a second process on the same scope is refused here,
/// before it seeds the control tables with its own config (which the
/// running one would pick up within a refresh). Whatever `deliver.enabled`
/// says: a `serve` with delivery off seeds the control tables too.
///
/// `sluice serve` also refuses while any of its JobDBs' director locks is
/// held by another session: a running serve whose scope session ended
/// (the database restarted it, an operator killed it) still holds those,
/// and a second one must not seed before it learns that. (A director's
/// JobDBs may be held by the director that adopted them while it was
/// away, and are handed back: not a refusal.)
///
/// Held until the claim is dropped; kept by [`watch_scope`]. `None` when
/// there is nothing to claim.
pub async fn claim_scope(config: &Config, route: bool, director: bool) -> Result<Option<ScopeClaim>> {
    let Some(url) = config.deliver.jobdb_url.as_ref().filter(|_| director) else { return Ok(None) };
    let dbs = sluice_deliver::sqljobdb::SqlJobDbs::new(url.as_str())?;
    let (name, who) = if route {
        ("serve".to_owned(), "another `sluice serve` is using this database (each needs its own deliver.jobdb_url database)".to_owned())
    } else {
        let name = &config.director.name;
        (format!("director-scope.{name}"), format!("a director named {name:?} is already running (director.name must be unique)"))
    };
    // Serve checks the JobDB locks before it takes the scope lock too: a
    // refused serve restarted in a loop must not hold the scope lock, even
    // for a moment, while the running one takes it again (red team).
    if route {
        refuse_held_jobdbs(&dbs, &who).await?;
    }
    let lock = take_scope_lock(&dbs, &name, &who).await?;
    if route {
        refuse_held_jobdbs(&dbs, &who).await?;
    }
    Ok(Some(ScopeClaim { lock, dbs, name, who }))
}

/// Refuse while another session holds the director lock of any JobDB of
/// `dbs`' scope.
async fn refuse_held_jobdbs(dbs: &sluice_deliver::sqljobdb::SqlJobDbs, who: &str) -> Result<()> {
    let listed = dbs.clone();
    let jobdbs = tokio::task::spawn_blocking(move || listed.list()).await?.context("cannot list the JobDBs (deliver.jobdb_url)")?;
    for (seq, _) in jobdbs {
        if let Some(session) = dbs.jobdb_lock_holder(seq).await.context("cannot reach the JobDB database (deliver.jobdb_url)")? {
            bail!("{who}: database session {session} holds the director lock of JobDB {}; stop that process first", dbs.table_names(seq).0);
        }
    }
    Ok(())
}

async fn take_scope_lock(dbs: &sluice_deliver::sqljobdb::SqlJobDbs, name: &str, who: &str) -> Result<sluice_deliver::sqljobdb::DirectorLock> {
    match dbs.lock(name).await {
        Ok(lock) => Ok(lock),
        Err(e @ DeliverError::SqlLocked { .. }) => Err(anyhow::Error::new(e).context(who.to_owned())),
        Err(e) => Err(anyhow::Error::new(e).context("cannot reach the JobDB database (deliver.jobdb_url)")),
    }
}

/// How many checks in a row may find another session holding the scope
/// lock before the process stops: a refused process restarted in a loop
/// holds it for moments, and must not make the running one stop.
const SCOPE_TAKEN_STRIKES: u32 = 10;
/// The wait between checks while another session holds the scope lock.
const SCOPE_RETRY: Duration = Duration::from_secs(1);

/// Keep `claim` for the life of the process. Its lock lives as long as its
/// database session. When a check does not find it held:
/// - if the lock's own session still holds it (the check failed: a
///   cancelled query, a slow network), nothing changed;
/// - if nobody holds it (the session ended: the database restarted, an
///   operator ended it), it is taken again and the control tables seeded
///   again from `config` (another process may have seeded its own in
///   between);
/// - if another session holds it for [`SCOPE_TAKEN_STRIKES`] checks in a
///   row, another process took the scope, and two would deliver from the
///   same JobDBs: this one stops, with the error sent to `fatal`.
///
/// Aborting the task releases the lock.
pub fn watch_scope(
    mut claim: ScopeClaim,
    config: Config,
    catalog: Arc<Catalog>,
    fatal: tokio::sync::mpsc::UnboundedSender<anyhow::Error>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        // Set when the lock was taken again, until the control tables are seeded again.
        let mut reseed = false;
        let mut strikes = 0;
        loop {
            tokio::time::sleep(if strikes > 0 { SCOPE_RETRY } else { SCOPE_CHECK_INTERVAL }).await;
            if !claim.lock.is_held().await {
                match take_scope_lock(&claim.dbs, &claim.name, &claim.who).await {
                    Ok(lock) => {
                        tracing::warn!(lock = %lock.name(), "the database session holding this process's scope lock had ended; took the lock again");
                        claim.lock = lock;
                        reseed = true;
                        strikes = 0;
                    }
                    Err(e) if e.downcast_ref::<DeliverError>().is_some_and(|d| matches!(d, DeliverError::SqlLocked { .. })) => {
                        let holder = claim.dbs.lock_holder(&claim.name).await.ok().flatten();
                        if holder == Some(claim.lock.session_id()) {
                            tracing::warn!(lock = %claim.lock.name(), "a scope lock check failed, but this process's session still holds the lock");
                            strikes = 0;
                        } else {
                            strikes += 1;
                            tracing::warn!(lock = %claim.lock.name(), ?holder, strikes, "another database session holds this process's scope lock");
                            if strikes >= SCOPE_TAKEN_STRIKES {
                                let _ = fatal.send(e.context(format!(
                                    "another process (database session {}) took this process's JobDB scope while its own session was lost; \
                                     stopping, so that one process delivers from these JobDBs",
                                    holder.map_or("?".to_owned(), |h| h.to_string())
                                )));
                                return;
                            }
                        }
                    }
                    // The database is unreachable: nobody can take the lock now; try again.
                    Err(e) => tracing::warn!(error = format!("{e:#}"), "cannot take the scope lock again yet"),
                }
            } else {
                strikes = 0;
            }
            if reseed {
                let (config, catalog) = (config.clone(), catalog.clone());
                match tokio::task::spawn_blocking(move || catalog.reseed(&config)).await {
                    Ok(Ok(())) => {
                        reseed = false;
                        tracing::warn!(lock = %claim.lock.name(), "scope lock taken again; the control tables are seeded from this config again");
                    }
                    Ok(Err(e)) => tracing::error!(error = %e, "cannot seed the control tables again yet"),
                    Err(e) => tracing::error!(error = %e, "seeding the control tables again failed"),
                }
            }
        }
    })
}

/// Start the route (one task per owned `output` partition, and the replay
/// runner) and/or the director (JobDBs, directors). In one process the route
/// hands jobs to the local Centrifuge; a separate `sluice route` sends them
/// to the live directors over RPC, and a separate `sluice director` serves
/// that RPC and registers itself in the directory (`deliver.jobdb_url`):
/// both are `sluice_deliver::cluster`, wired here.
pub async fn start(
    config: &Config,
    log: Arc<dyn Log>,
    catalog: Arc<Catalog>,
    registry: &mut Registry,
    route: bool,
    director: bool,
) -> Result<Running> {
    let stop = Shutdown::new();
    // Tasks that watch `stop` and wind down by themselves, and housekeeping
    // loops that are simply aborted.
    let mut tasks = Vec::new();
    let mut housekeeping = Vec::new();
    let mut director_node = None;
    let centrifuge = if director && route {
        // One process: one unscoped set of JobDBs, no RPC.
        let metrics = DeliverMetrics::default();
        metrics.register(registry);
        let centrifuge =
            Centrifuge::open(CentrifugeOptions::from_config(config), catalog.clone(), metrics).await.context("cannot open the JobDBs")?;
        housekeeping.push(centrifuge.spawn_housekeeping());
        Some(centrifuge)
    } else if director {
        // The director cluster's side of this process (sluice_deliver::cluster).
        let secret = cluster::rpc_secret(config)?;
        let metrics = DeliverMetrics::default();
        metrics.register(registry);
        let directory = Directory::connect(cluster::jobdb_url(config)?).await.context("cannot reach the directory of directors")?;
        let (node, node_tasks) = DirectorNode::start(config, catalog.clone(), metrics, directory, secret, stop.clone()).await?;
        tasks.extend(node_tasks);
        director_node = Some(node);
        None
    } else {
        None
    };
    let history = sluice_route::HistorySlot::default();
    if route {
        let route_metrics = RouteMetrics::default();
        route_metrics.register(registry);
        let jobs: Arc<dyn sluice_route::JobSink> = match &centrifuge {
            Some(c) => c.clone(),
            None => {
                let secret = cluster::rpc_secret(config)?;
                let url = cluster::jobdb_url(config)?;
                let directory = Directory::connect(url).await.context("cannot reach the directory of directors")?;
                DirectorClient::new(directory, secret, cluster::client_tls(config)?)?
            }
        };
        tasks.push(tokio::spawn(sluice_route::run_owned_partitions(
            log.clone(),
            catalog.clone(),
            jobs.clone(),
            RouteSettings::default(),
            route_metrics.clone(),
            stop.clone(),
        )));
        tasks.push(tokio::spawn(sluice_route::run_replays(log, catalog.clone(), jobs, history.clone(), stop.clone())));
    }
    let snap = catalog.snapshot();
    tracing::info!(
        destinations = snap.destinations.len(),
        connections = snap.connections.values().map(Vec::len).sum::<usize>(),
        route,
        director,
        "delivery running"
    );
    Ok(Running { centrifuge, director_node, tasks, housekeeping, stop, history })
}

impl Running {
    /// Stop routing, then let directors finish requests in flight.
    pub async fn stop(self) {
        self.stop.trigger();
        for t in self.housekeeping {
            t.abort();
            let _ = t.await;
        }
        // Tasks finish their batch and stop their children; stragglers are aborted.
        for mut t in self.tasks {
            if tokio::time::timeout(Duration::from_secs(10), &mut t).await.is_err() {
                t.abort();
                let _ = t.await;
            }
        }
        if let Some(c) = self.centrifuge {
            c.close().await;
        }
        // Close its JobDBs and stay in the directory without an address
        // (routes stop sending; the unfinished jobs are adopted).
        if let Some(node) = &self.director_node {
            node.stop().await;
        }
    }
}

#[derive(Args)]
pub struct DataDirArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Overrides `server.data_dir`.
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

impl DataDirArgs {
    fn load(&self) -> Result<Config> {
        let config = Config::load_with(self.config.config.as_deref(), Flags { data_dir: self.data_dir.clone(), ..Flags::default() })?;
        crate::check_destination_urls(&config)?;
        Ok(config)
    }
}

#[derive(Subcommand)]
pub enum JobsCommand {
    /// Every job of a messageId (one per destination) or one job by KSUID, with every transition.
    Inspect {
        /// A messageId or a job's KSUID.
        key: String,
        #[command(flatten)]
        dir: DataDirArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Job counts per destination and state, across the live JobDBs.
    Stats {
        #[command(flatten)]
        dir: DataDirArgs,
        #[arg(long)]
        json: bool,
    },
}

fn fmt_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map(|d| d.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()).unwrap_or_else(|| ms.to_string())
}

/// Where `config`'s JobDBs live: files in `data_dir/jobs`, or the
/// `deliver.jobdb_url` database. The admin API's job inspector and
/// `sluice jobs` read the same ones.
pub fn jobdbs_of(config: &Config) -> Result<sluice_deliver::backend::JobDbs> {
    Ok(sluice_deliver::backend::JobDbs::new(&config.server.data_dir.join("jobs"), config.deliver.jobdb_url.as_ref())?)
}

/// [`jobdbs_of`] for the `sluice jobs` tools, which name a missing data directory.
fn existing_jobdbs_of(config: &Config) -> Result<sluice_deliver::backend::JobDbs> {
    if config.deliver.jobdb_url.is_none() && !config.server.data_dir.is_dir() {
        bail!("there is no data directory at {} (check server.data_dir or --data-dir)", config.server.data_dir.display());
    }
    jobdbs_of(config)
}

pub fn jobs(cmd: JobsCommand) -> Result<()> {
    match cmd {
        JobsCommand::Inspect { key, dir, json } => {
            let config = dir.load()?;
            let jobdbs = existing_jobdbs_of(&config)?;
            let found = sluice_deliver::inspect::find_in(&jobdbs, &key)?;
            if found.is_empty() {
                bail!(
                    "no job with messageId or id {key:?} in {} (finished JobDBs are deleted; archived jobs are in {})",
                    jobdbs.describe(),
                    config.archive_target()
                );
            }
            if json {
                let out: Vec<_> = found.iter().map(job_json).collect();
                println!("{}", serde_json::to_string_pretty(&out)?);
                return Ok(());
            }
            for f in found {
                let j = &f.job;
                println!(
                    "job {}  messageId {}  {} → {}  generation {}  state {}\n  endpoint {}\n  JobDB {}",
                    j.id,
                    j.job.message_id,
                    j.job.source,
                    j.job.destination,
                    j.job.generation,
                    j.state.as_str(),
                    without_password(&j.job.endpoint),
                    f.jobdb
                );
                println!("  {:>3}  {:<24}  {:<20}  {:>7}  {:>6}  detail", "seq", "at", "state", "attempt", "status");
                println!("  {:>3}  {:<24}  {:<20}  {:>7}  {:>6}  created", 0, fmt_ms(j.job.created_at), "awaiting_scheduling", 0, "");
                for t in &f.history {
                    let mut detail = t.error.clone().unwrap_or_default().replace('\n', " ");
                    if let Some(r) = t.retry_at {
                        detail = format!("retry at {} {detail}", fmt_ms(r));
                    }
                    println!(
                        "  {:>3}  {:<24}  {:<20}  {:>7}  {:>6}  {}",
                        t.seq,
                        fmt_ms(t.at),
                        t.state.as_str(),
                        t.attempt,
                        t.status.map(|s| s.to_string()).unwrap_or_default(),
                        detail.trim()
                    );
                }
                println!();
            }
            Ok(())
        }
        JobsCommand::Stats { dir, json } => {
            let config = dir.load()?;
            let (jobdbs, stats) = sluice_deliver::inspect::stats_in(&existing_jobdbs_of(&config)?)?;
            if json {
                println!("{}", serde_json::json!({"jobdbs": jobdbs, "destinations": stats}));
                return Ok(());
            }
            let states: Vec<&str> = sluice_deliver::inspect::state_names().collect();
            println!("{jobdbs} JobDB(s)");
            print!("{:<24}", "destination");
            for s in &states {
                print!(" {s:>19}");
            }
            println!();
            let mut totals = vec![0u64; states.len()];
            for (dest, counts) in &stats {
                print!("{dest:<24}");
                for (i, s) in states.iter().enumerate() {
                    let n = counts.get(s).copied().unwrap_or(0);
                    totals[i] += n;
                    print!(" {n:>19}");
                }
                println!();
            }
            print!("{:<24}", "total");
            for n in totals {
                print!(" {n:>19}");
            }
            println!();
            Ok(())
        }
    }
}

#[derive(Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    dir: DataDirArgs,
    /// The destination to re-deliver to.
    #[arg(long)]
    destination: String,
    /// Events logged at or after this time: RFC 3339 (2026-11-26T09:00:00Z) or a duration ago (2h, 30m).
    #[arg(long)]
    since: String,
    /// Return once the request is filed instead of waiting for the server to run it.
    #[arg(long)]
    no_wait: bool,
}

fn parse_since(s: &str) -> Result<i64> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.timestamp_millis());
    }
    let ago = humantime::parse_duration(s).with_context(|| format!("--since {s:?}: use RFC 3339 (2026-11-26T09:00:00Z) or a duration ago (2h)"))?;
    // Saturating: a window longer than the clock's past means "everything".
    Ok(sluice_deliver::now_ms().saturating_sub(i64::try_from(ago.as_millis()).unwrap_or(i64::MAX)).max(0))
}

/// File a replay request in the control database; the server runs it (within a second).
pub fn replay(args: ReplayArgs) -> Result<()> {
    let config = args.dir.load()?;
    let since = parse_since(&args.since)?;
    // control.sqlite in data_dir, or the control tables of deliver.jobdb_url (shared by every process).
    let db = ControlDb::open_for(&config)?;
    let known = db.read()?.destinations.contains_key(&args.destination);
    if !known {
        bail!("no destination {:?} in the control database (it is seeded from the config when `sluice serve` starts)", args.destination);
    }
    let id = db.request_replay(&args.destination, since)?;
    eprintln!("replay {id} filed: destination {} since {}", args.destination, fmt_ms(since));
    if args.no_wait {
        return Ok(());
    }
    eprintln!("waiting for `sluice serve` to run it (Ctrl-C leaves it filed; it runs when the server next starts)…");
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let r = db.replay(id)?.context("replay request vanished")?;
        match r.state.as_str() {
            "done" => {
                println!("replay {id} done: {} events read, {} jobs made for {}", r.events, r.jobs, r.destination);
                return Ok(());
            }
            "failed" => bail!("replay {id} failed: {}", r.error.unwrap_or_default()),
            _ => {}
        }
    }
}
