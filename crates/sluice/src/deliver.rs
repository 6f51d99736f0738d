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
use sluice_deliver::control::ControlDb;
use sluice_deliver::directory::Directory;
use sluice_deliver::{Catalog, Centrifuge, CentrifugeOptions, DeliverMetrics};
use sluice_log::Log;
use sluice_route::{RouteMetrics, RouteSettings};
use tokio::task::JoinHandle;

use crate::ConfigArgs;

/// The running route and/or director stages.
pub struct Running {
    /// The JobDBs of `sluice serve` (route and director in one process).
    pub centrifuge: Option<Arc<Centrifuge>>,
    /// A separate director's RPC server, which holds its current JobDBs.
    director_rpc: Option<Arc<sluice_route::rpc::RpcServer>>,
    tasks: Vec<JoinHandle<()>>,
    housekeeping: Vec<JoinHandle<()>>,
    stop: Shutdown,
    /// A separate director's entry in the directory, removed at stop.
    registered: Option<(Directory, String)>,
}

/// Start the route (one task per owned `output` partition, and the replay
/// runner) and/or the director (JobDBs, directors). In one process the route
/// hands jobs to the local Centrifuge; a separate `sluice route` sends them
/// to the live directors over RPC, and a separate `sluice director` serves
/// that RPC and registers itself in the directory (`deliver.jobdb_url`).
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
    let mut registered = None;
    let mut director_rpc = None;
    let centrifuge = if director && route {
        // One process: one unscoped set of JobDBs, no RPC.
        let metrics = DeliverMetrics::default();
        metrics.register(registry);
        let centrifuge =
            Centrifuge::open(CentrifugeOptions::from_config(config), catalog.clone(), metrics).await.context("cannot open the JobDBs")?;
        housekeeping.push(centrifuge.spawn_housekeeping());
        Some(centrifuge)
    } else if director {
        let secret = rpc_secret(config)?;
        let metrics = DeliverMetrics::default();
        metrics.register(registry);
        let directory = Directory::connect(jobdb_url(config)?).await.context("cannot reach the directory of directors")?;
        let name = config.director.name.clone();
        let centrifuge = open_own_jobdbs(config, &catalog, &metrics, &directory, Some(Duration::from_secs(300))).await?;
        let rpc = sluice_route::rpc::RpcServer::new(centrifuge.clone(), secret);
        tasks.push(serve_director_rpc(config, rpc.clone(), catalog.clone(), metrics.clone(), directory.clone(), stop.clone()).await?);
        tasks.push(tokio::spawn(adopt_dead_directors(config.clone(), catalog.clone(), metrics, directory.clone(), stop.clone())));
        registered = Some((directory, name));
        director_rpc = Some(rpc);
        None
    } else {
        None
    };
    if route {
        let route_metrics = RouteMetrics::default();
        route_metrics.register(registry);
        let jobs: Arc<dyn sluice_route::JobSink> = match &centrifuge {
            Some(c) => c.clone(),
            None => {
                let secret = rpc_secret(config)?;
                let url = jobdb_url(config)?;
                let directory = Directory::connect(url).await.context("cannot reach the directory of directors")?;
                sluice_route::rpc::DirectorClient::new(directory, secret, director_client_tls(config)?)?
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
        tasks.push(tokio::spawn(sluice_route::run_replays(log, catalog.clone(), jobs, stop.clone())));
    }
    let snap = catalog.snapshot();
    tracing::info!(
        destinations = snap.destinations.len(),
        connections = snap.connections.values().map(Vec::len).sum::<usize>(),
        route,
        director,
        "delivery running"
    );
    Ok(Running { centrifuge, director_rpc, tasks, housekeeping, stop, registered })
}

/// `deliver.jobdb_url`, required when route and directors are separate processes.
fn jobdb_url(config: &Config) -> Result<&str> {
    match &config.deliver.jobdb_url {
        Some(u) => Ok(u.as_str()),
        None => bail!("separate route and director processes share a SQL database: set deliver.jobdb_url (mysql://… or postgres://…)"),
    }
}

/// `director.rpc_secret`, required when route and directors are separate
/// processes (`sluice route`, `sluice director`).
pub fn rpc_secret(config: &Config) -> Result<sluice_route::rpc::RpcSecret> {
    match config.director.rpc_secret.as_deref() {
        Some(s) if !s.is_empty() => Ok(sluice_route::rpc::RpcSecret::new(s)),
        _ => bail!(
            "separate route and director processes authenticate each other with a shared secret: set director.rpc_secret \
             (or SLUICE_DIRECTOR__RPC_SECRET), the same on every route and director, at least {} characters (e.g. `openssl rand -hex 32`)",
            sluice_core::config::MIN_RPC_SECRET_LEN
        ),
    }
}

/// The route's TLS to directors (`director.tls_ca_file`, and its client
/// certificate when set); `None` keeps the RPC in plain text.
fn director_client_tls(config: &Config) -> Result<Option<sluice_route::rpc::ClientTls>> {
    let d = &config.director;
    let Some(ca) = &d.tls_ca_file else {
        if d.tls_cert_file.is_some() {
            tracing::warn!(
                "director.tls_cert_file is set but director.tls_ca_file is not: this route talks to directors in plain text \
                 (set tls_ca_file to the CA of the directors' certificates to turn its TLS on)"
            );
        }
        return Ok(None);
    };
    let read = |p: &std::path::Path| sluice_ingest::tls::read_pem(p).map_err(|e| anyhow::anyhow!("director rpc: cannot read {}: {e}", p.display()));
    let identity = match (&d.tls_cert_file, &d.tls_key_file) {
        (Some(cert), Some(key)) => {
            let mut pem = read(cert)?;
            pem.push(b'\n');
            pem.extend(read(key)?);
            Some(pem)
        }
        _ => None,
    };
    Ok(Some(sluice_route::rpc::ClientTls { ca_pem: read(ca)?, identity_pem: identity }))
}

/// Serve `POST /rpc/v1/jobs` on `director.rpc_listen` (HTTP/2 and HTTP/1)
/// and keep this director's heartbeat in the directory. Requests are
/// checked by [`sluice_route::rpc::RpcServer`]: signature, size, destinations.
///
/// The heartbeat loop also watches this director's JobDBs: when another
/// director took their locks (it adopted them while this one could not
/// reach the database, whose restart ended this one's lock sessions), they
/// are closed, this director announces itself without an RPC address (so
/// routes skip it and the adopter hands them back), opens them again, and
/// serves again. Without that it would answer `503 the JobDB is closed`
/// until restarted.
async fn serve_director_rpc(
    config: &Config,
    rpc: Arc<sluice_route::rpc::RpcServer>,
    catalog: Arc<Catalog>,
    metrics: DeliverMetrics,
    directory: Directory,
    stop: Shutdown,
) -> Result<JoinHandle<()>> {
    let d = &config.director;
    let listener =
        tokio::net::TcpListener::bind(&d.rpc_listen).await.with_context(|| format!("cannot listen on {} (director.rpc_listen)", d.rpc_listen))?;
    let addr = listener.local_addr()?;
    let tls = match (&d.tls_cert_file, &d.tls_key_file) {
        (Some(cert), Some(key)) => {
            let client_ca = d.tls_client_auth.then_some(d.tls_ca_file.as_deref()).flatten();
            Some(sluice_ingest::tls::ServerTls::new("director rpc", cert, key, client_ca, &[b"h2", b"http/1.1"])?)
        }
        _ => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let rpc_url = d.rpc_url.as_ref().map_or_else(|| format!("{scheme}://{addr}"), |u| u.as_str().to_owned());
    directory.heartbeat(&d.name, &rpc_url).await?;
    tracing::info!(name = %d.name, rpc = %rpc_url, "director registered; serving route RPC");
    let app = axum::Router::new().route(sluice_route::rpc::INSERT_PATH, axum::routing::post(insert_jobs)).with_state(rpc.clone());
    let (name, dir2, config) = (d.name.clone(), directory.clone(), config.clone());
    let task = tokio::spawn(async move {
        let stopped = {
            let stop = stop.clone();
            async move { stop.wait().await }
        };
        let server: std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<()>> + Send>> = match tls {
            Some(tls) => {
                let reloader = tls.spawn_reloader(sluice_ingest::tls::RELOAD_EVERY);
                let listener = match sluice_ingest::tls::TlsListener::new(listener, tls) {
                    Ok(l) => l,
                    Err(e) => return tracing::error!(error = %e, "director RPC listener failed"),
                };
                Box::pin(async move {
                    let served = axum::serve(listener, app).with_graceful_shutdown(stopped).await;
                    reloader.abort();
                    served
                })
            }
            None => Box::pin(std::future::IntoFuture::into_future(axum::serve(listener, app).with_graceful_shutdown(stopped))),
        };
        let heartbeat = async {
            let mut housekeeping = rpc.centrifuge().spawn_housekeeping();
            let mut reopening = false;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = stop.wait() => break,
                }
                if !reopening && rpc.centrifuge().lock_lost() {
                    tracing::error!(
                        director = %name,
                        "another director took this director's JobDB locks (it adopted them while this one could not reach \
                         the database); closing them, and opening them again once they are handed back"
                    );
                    housekeeping.abort();
                    rpc.centrifuge().close().await;
                    reopening = true;
                }
                if reopening {
                    let reopened = tokio::select! {
                        r = open_own_jobdbs(&config, &catalog, &metrics, &dir2, None) => r,
                        _ = stop.wait() => break,
                    };
                    match reopened {
                        Ok(c) => {
                            housekeeping = c.spawn_housekeeping();
                            rpc.replace(c);
                            reopening = false;
                            tracing::warn!(director = %name, "this director's JobDBs are open again; serving route RPC");
                        }
                        Err(e) => {
                            // The next round tries again (the old, closed JobDBs still answer 503).
                            tracing::error!(director = %name, error = %e, "cannot open this director's JobDBs again");
                            continue;
                        }
                    }
                }
                if let Err(e) = dir2.heartbeat(&name, &rpc_url).await {
                    tracing::warn!(error = %e, "director heartbeat failed");
                }
            }
            housekeeping.abort();
        };
        let (served, ()) = tokio::join!(server, heartbeat);
        if let Err(e) = served {
            tracing::error!(error = %e, "director RPC server failed");
        }
    });
    Ok(task)
}

/// This director's scope of `deliver.jobdb_url`. While another director
/// holds it (it adopted our JobDBs while we were down), keep announcing
/// ourselves without an RPC address, so it hands them back, and retry, for
/// `give_up_after` at most (`None`: until it works). At startup (a bound
/// is given) a live director of the same name is refused.
async fn open_own_jobdbs(
    config: &Config,
    catalog: &Arc<Catalog>,
    metrics: &DeliverMetrics,
    directory: &Directory,
    give_up_after: Option<Duration>,
) -> Result<Arc<Centrifuge>> {
    let name = &config.director.name;
    if give_up_after.is_some() {
        if let Some(other) = directory.live(sluice_route::rpc::LIVE_AFTER).await?.into_iter().find(|d| &d.name == name && !d.rpc_url.is_empty()) {
            bail!("a director named {name:?} is already running at {} (director.name must be unique)", other.rpc_url);
        }
    }
    let mut options = CentrifugeOptions::from_config(config);
    options.scope = name.clone();
    let mut waited = Duration::ZERO;
    loop {
        let announced = directory.heartbeat(name, "").await;
        if give_up_after.is_some() {
            announced?;
        }
        match Centrifuge::open(options.clone(), catalog.clone(), metrics.clone()).await {
            Ok(c) => return Ok(c),
            Err(sluice_deliver::DeliverError::SqlLocked { .. }) if give_up_after.is_none_or(|bound| waited < bound) => {
                if waited.is_zero() || waited.as_secs() % 60 == 0 {
                    tracing::warn!(director = %name, "this director's JobDBs are held by another director (adopted while we were down); waiting for it to hand them back");
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
                waited += Duration::from_secs(2);
            }
            Err(e) => return Err(e).context("cannot open this director's JobDBs"),
        }
    }
}

/// Serve the JobDBs of directors that died: when a director's heartbeat is
/// older than [`sluice_route::rpc::LIVE_AFTER`] and its JobDB locks can be
/// taken (its database sessions are gone), open its scope here; its
/// directors reload the unfinished jobs and send them (jobs that were
/// `executing` at its death are sent again: the crash window). When its
/// owner announces itself again, close the scope, which releases the locks.
async fn adopt_dead_directors(config: Config, catalog: Arc<Catalog>, metrics: DeliverMetrics, directory: Directory, stop: Shutdown) {
    let me = config.director.name.clone();
    let mut adopted: std::collections::BTreeMap<String, (Arc<Centrifuge>, JoinHandle<()>)> = Default::default();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = stop.wait() => break,
        }
        let entries = match directory.all().await {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the directory of directors");
                continue;
            }
        };
        let now = chrono::Utc::now().timestamp_millis();
        for entry in entries.into_iter().filter(|e| e.name != me) {
            let alive = now - entry.heartbeat_ms < sluice_route::rpc::LIVE_AFTER.as_millis() as i64;
            match (alive, adopted.contains_key(&entry.name)) {
                (false, false) => {
                    let mut options = CentrifugeOptions::from_config(&config);
                    options.scope = entry.name.clone();
                    match Centrifuge::open(options, catalog.clone(), metrics.clone()).await {
                        Ok(c) => {
                            tracing::warn!(director = %entry.name, "director is gone: serving its JobDBs here");
                            let housekeeping = c.spawn_housekeeping();
                            adopted.insert(entry.name.clone(), (c, housekeeping));
                        }
                        Err(e) => tracing::debug!(director = %entry.name, error = %e, "cannot adopt (yet)"),
                    }
                }
                (true, true) => {
                    if let Some((c, housekeeping)) = adopted.remove(&entry.name) {
                        housekeeping.abort();
                        c.close().await;
                        tracing::info!(director = %entry.name, "director is back: handed its JobDBs back");
                    }
                }
                _ => {}
            }
        }
    }
    for (_, (c, housekeeping)) in adopted {
        housekeeping.abort();
        c.close().await;
    }
}

/// `POST /rpc/v1/jobs`: the headers are checked before the body is read,
/// and the body is read up to [`sluice_route::rpc::MAX_REQUEST_BYTES`].
/// How long a route has to send one RPC request's body (32 MiB at most).
const RPC_BODY_TIMEOUT: Duration = Duration::from_secs(30);

async fn insert_jobs(
    axum::extract::State(server): axum::extract::State<Arc<sluice_route::rpc::RpcServer>>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    use sluice_route::rpc::{Rejection, MAX_REQUEST_BYTES};
    let refuse = |r: Rejection| (r.status, [(axum::http::header::CONTENT_TYPE, "application/json")], r.body()).into_response();
    if let Err(r) = server.admit(&headers) {
        return refuse(r);
    }
    let limited = http_body_util::Limited::new(body, MAX_REQUEST_BYTES);
    // A sender that stalls mid-body does not hold the connection for ever.
    let body = match tokio::time::timeout(RPC_BODY_TIMEOUT, http_body_util::BodyExt::collect(limited)).await {
        Err(_) => return refuse(Rejection::bad_request(format!("body not received within {RPC_BODY_TIMEOUT:?}"))),
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => return refuse(Rejection::too_large()),
        Ok(Err(e)) => return refuse(Rejection::bad_request(format!("cannot read the body: {e}"))),
    };
    match server.insert(&headers, body).await {
        Ok(reply) => axum::Json(reply).into_response(),
        Err(r) => refuse(r),
    }
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
        if let Some(rpc) = &self.director_rpc {
            rpc.centrifuge().close().await;
        }
        // Stay in the directory without an address: routes stop sending at
        // once, and once the heartbeat is stale another director adopts the
        // unfinished jobs (a director that is not coming back leaves none behind).
        if let Some((directory, name)) = &self.registered {
            if let Err(e) = directory.heartbeat_stopped(name).await {
                tracing::warn!(error = %e, "could not mark this director stopped in the directory");
            }
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
        Ok(Config::load_with(self.config.config.as_deref(), Flags { data_dir: self.data_dir.clone(), ..Flags::default() })?)
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
