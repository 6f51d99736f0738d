//! This process as one cell of a deployment (`[cell]` with `control_url`):
//! the workspaces the control plane places here arrive as rows of origin
//! `global` in the control tables, ingest asks before refusing a write key
//! it does not know, and usage is reported (see `sluice_control::agent`).
//! Also the process metrics the control plane holds against thresholds.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use sluice_cells::CellFeed;
use sluice_control::agent::CellAgent;
use sluice_core::config::DestinationConfig;
use sluice_core::metrics::{Gauge, Registry};
use sluice_core::{Config, Shutdown};

/// The cell's link, running: stopped after delivery (its last report counts everything).
pub struct CellLink {
    stop: Shutdown,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The cell-to-cell endpoints of migrations, for the admin port.
    pub routes: Option<axum::Router>,
}

impl CellLink {
    /// Stop: the reporter writes and sends a last report (waited for a few seconds; it stays on disk otherwise).
    pub async fn stop(self) {
        self.stop.trigger();
        for t in self.tasks {
            if tokio::time::timeout(Duration::from_secs(5), t).await.is_err() {
                tracing::warn!("the last usage report waits on disk for the control plane");
            }
        }
    }
}

/// Start the link when `[cell]` names a control plane. `dedup_here`: this
/// process runs dedup (its indexes are under `data_dir/dedup`), so it can
/// hand a moving workspace's keys to another cell. `history`: this
/// process's replays (when it routes), told where moved workspaces' earlier events are.
pub async fn start(
    config: &Config,
    admin: &Arc<sluice_admin::AdminState>,
    dedup_here: bool,
    spool: Option<Arc<sluice_ingest::spool::Spool>>,
    history: Option<sluice_route::HistorySlot>,
) -> Result<Option<CellLink>> {
    let c = &config.cell;
    let (Some(id), Some(url), Some(token)) = (&c.id, &c.control_url, &c.token) else { return Ok(None) };
    let retry = config.deliver.retry_policy();
    let state = admin.clone();
    let apply: sluice_control::agent::ApplyFeed = Arc::new(move |feed: &CellFeed| apply_feed(&state, feed, retry));
    let agent = CellAgent::new(id.clone(), url.clone(), token.clone(), apply).map_err(anyhow::Error::msg).context("cannot start the cell's link")?;
    if let Some(ingest) = &admin.ingest {
        ingest.set_key_resolver(agent.clone());
    }
    if let Some(slot) = history {
        let _ = slot.set(Arc::new(sluice_control::history::CellHistory::new(agent.clone())));
    }
    let stop = Shutdown::new();
    let catalog = admin.catalog.clone();
    let workspace_of: sluice_control::agent::WorkspaceOf = Box::new(move |kind, id| catalog_workspace(&catalog, kind, id));
    let mut tasks = vec![
        agent.spawn_sync(c.poll_interval, stop.clone()),
        agent.spawn_reporter(admin.registry.clone(), workspace_of, config.server.data_dir.join("usage-outbox"), c.report_interval, stop.clone()),
    ];
    // Migrations: the gate this cell kept is set before ingest listens.
    let mut routes = None;
    if let Some(ingest) = &admin.ingest {
        let (registry, catalog) = (admin.registry.clone(), admin.catalog.clone());
        let (of_source, has, qos_of) = (admin.catalog.clone(), admin.catalog.clone(), admin.catalog.clone());
        let qos_to = admin.clone();
        let (jobdbs, of_jobs) = (crate::deliver::jobdbs_of(config)?, admin.catalog.clone());
        let parts = sluice_control::mover::CellParts {
            log: admin.log.clone(),
            ingest: ingest.clone(),
            index_dir: dedup_here.then(|| config.server.data_dir.join("dedup")),
            window: config.dedup.window,
            state_dir: config.server.data_dir.join("migrations"),
            spool,
            unfinished_jobs: Box::new(move |workspace| unfinished_jobs(&registry, &catalog, workspace)),
            unfinished_in_jobdbs: Arc::new(move |workspace| unfinished_in_jobdbs(&jobdbs, &of_jobs, workspace)),
            workspace_qos: Box::new(move |workspace| workspace_qos(&qos_of, workspace)),
            apply_qos: Arc::new(move |workspace, rows| apply_qos(&qos_to, workspace, rows)),
            workspace_of_source: Box::new(move |source| catalog_workspace(&of_source, "source", source)),
            has_workspace: Box::new(move |workspace| has.snapshot().sources.iter().any(|(s, _)| workspace_name(&s.workspace) == workspace)),
        };
        let mover = sluice_control::mover::Mover::new(agent.clone(), parts)
            .await
            .map_err(anyhow::Error::msg)
            .context("cannot start the cell's migrations")?;
        tasks.push(mover.spawn(stop.clone()));
        routes = Some(mover.routes());
    }
    tracing::info!(cell = %id, control = %url, "this is a cell: its workspaces come from the control plane");
    Ok(Some(CellLink { stop, tasks, routes }))
}

/// A source's or destination's workspace as its config names it (none: the default one).
fn workspace_name(workspace: &Option<String>) -> &str {
    workspace.as_deref().unwrap_or(sluice_core::config::DEFAULT_WORKSPACE)
}

/// The workspace of source (`kind` "source") or destination `id` in the catalog now.
fn catalog_workspace(catalog: &sluice_deliver::Catalog, kind: &str, id: &str) -> Option<String> {
    let snap = catalog.snapshot();
    let ws = match kind {
        "source" => snap.sources.iter().find(|(s, _)| s.id == id).map(|(s, _)| workspace_name(&s.workspace).to_owned()),
        _ => snap.destinations.get(id).map(|d| workspace_name(&d.workspace).to_owned()),
    };
    ws
}

/// Whether destination `id` is `workspace`'s in `snap`.
fn of_workspace(snap: &sluice_deliver::control::CatalogSnapshot, id: &str, workspace: &str) -> bool {
    snap.destinations.get(id).is_some_and(|d| workspace_name(&d.workspace) == workspace)
}

/// Unfinished jobs (in memory and spilled) of `workspace`'s destinations, from this process's metrics.
fn unfinished_jobs(registry: &Registry, catalog: &sluice_deliver::Catalog, workspace: &str) -> u64 {
    let snap = catalog.snapshot();
    let ours = |d: &str| of_workspace(&snap, d, workspace);
    sluice_core::metrics::parse_text(&sluice_core::metrics::render(registry))
        .iter()
        .filter(|s| matches!(s.name.as_str(), "sluice_deliver_pending" | "sluice_deliver_spilled"))
        .filter(|s| s.label("destination").is_some_and(ours))
        .map(|s| s.value.max(0.0) as u64)
        .sum()
}

/// Unfinished jobs (last state not terminal) of `workspace`'s destinations in the cell's JobDBs. Blocks: reads them all.
fn unfinished_in_jobdbs(jobdbs: &sluice_deliver::backend::JobDbs, catalog: &sluice_deliver::Catalog, workspace: &str) -> Result<u64, String> {
    if let sluice_deliver::backend::JobDbs::Files(dir) = jobdbs {
        if !dir.is_dir() {
            return Ok(0); // no job was ever made here
        }
    }
    let (_, counts) = sluice_deliver::inspect::stats_in(jobdbs).map_err(|e| e.to_string())?;
    let snap = catalog.snapshot();
    let ours = |d: &str| of_workspace(&snap, d, workspace);
    let unfinished = counts
        .iter()
        .filter(|(d, _)| ours(d))
        .flat_map(|(_, states)| states.iter())
        .filter(|(state, _)| sluice_deliver::store::JobState::parse(state).is_some_and(|s| !s.is_terminal()))
        .map(|(_, n)| *n)
        .sum();
    Ok(unfinished)
}

/// The QoS rows of `workspace`'s destinations (the default row for one that has none).
fn workspace_qos(catalog: &sluice_deliver::Catalog, workspace: &str) -> serde_json::Map<String, serde_json::Value> {
    let snap = catalog.snapshot();
    snap.destinations
        .iter()
        .filter(|(id, _)| of_workspace(&snap, id, workspace))
        .map(|(id, _)| (id.clone(), serde_json::to_value(snap.qos.get(id).cloned().unwrap_or_default()).expect("a QoS row serializes")))
        .collect()
}

/// Apply the QoS rows a migration's source sent for `workspace`'s destinations, then make them live. Blocks.
fn apply_qos(
    state: &sluice_admin::AdminState,
    workspace: &str,
    rows: serde_json::Map<String, serde_json::Value>,
) -> Result<(), sluice_control::mover::QosRefused> {
    use sluice_control::mover::QosRefused;
    let snap = state.catalog.snapshot();
    let mut parsed = Vec::new();
    for (id, row) in rows {
        let qos: sluice_deliver::gate::Qos = serde_json::from_value(row).map_err(|e| QosRefused::Invalid(format!("destination {id:?}: {e}")))?;
        if !(1..=100).contains(&qos.priority) || qos.max_in_flight == Some(0) {
            return Err(QosRefused::Invalid(format!("destination {id:?}: priority is 1-100 and max_in_flight at least 1")));
        }
        match snap.destinations.get(&id) {
            None => return Err(QosRefused::NotYet(format!("destination {id:?} is not known here yet; retry"))),
            Some(d) if workspace_name(&d.workspace) != workspace => {
                return Err(QosRefused::Invalid(format!("destination {id:?} is not workspace {workspace:?}'s")))
            }
            Some(_) => parsed.push((id, qos)),
        }
    }
    let unchanged = parsed.iter().all(|(id, q)| snap.qos.get(id).cloned().unwrap_or_default() == *q);
    if unchanged {
        return Ok(());
    }
    let write = state.catalog.with_control(|db| parsed.iter().try_for_each(|(id, q)| db.put_qos(id, q)));
    write.and_then(|()| state.catalog.refresh()).map_err(|e| QosRefused::NotYet(format!("cannot store the QoS rows: {e}")))
}

/// Write `feed` into the control tables (origin `global`), then make it live.
fn apply_feed(state: &sluice_admin::AdminState, feed: &CellFeed, retry: sluice_core::config::RetryPolicy) -> Result<Vec<String>, String> {
    let mut skipped = Vec::new();
    let mut destinations = Vec::new();
    for d in &feed.destinations {
        match serde_json::from_value::<DestinationConfig>(d.config.clone()) {
            Ok(mut dest) => match dest.validate("destination", retry) {
                Ok(()) => {
                    dest.workspace = Some(d.workspace.clone());
                    destinations.push(dest);
                }
                Err(e) => skipped.push(format!("destination of workspace {:?}: {e}", d.workspace)),
            },
            Err(e) => skipped.push(format!("destination of workspace {:?}: {e}", d.workspace)),
        }
    }
    let mut sources = Vec::new();
    for s in &feed.sources {
        match s.validate("source") {
            Ok(()) => sources.push(s.clone()),
            Err(e) => skipped.push(format!("source {:?}: {e}", s.id)),
        }
    }
    let connections: Vec<(String, String)> = feed.connections.iter().map(|c| (c.source.clone(), c.destination.clone())).collect();
    let more = state.catalog.with_control(|db| db.replace_global(&sources, &destinations, &connections)).map_err(|e| e.to_string())?;
    skipped.extend(more);
    state.catalog.refresh().map_err(|e| e.to_string())?;
    sluice_admin::apply_sources(state);
    Ok(skipped)
}

/// `sluice_process_cpu_seconds_total` and `sluice_process_cpus` (what the
/// control plane's `cpu` threshold is held against), and the resident
/// memory, every 2 s from /proc.
pub fn spawn_process_metrics(registry: &mut Registry) -> tokio::task::JoinHandle<()> {
    let cpu: Gauge<f64, std::sync::atomic::AtomicU64> = Gauge::default();
    let cpus: Gauge = Gauge::default();
    let rss: Gauge = Gauge::default();
    // A gauge named like a counter: its value is the process's whole CPU time, which only grows.
    registry.register("sluice_process_cpu_seconds_total", "CPU time (user + system) of this process since it started", cpu.clone());
    registry.register("sluice_process_cpus", "Cores this process may use", cpus.clone());
    registry.register("sluice_process_resident_memory_bytes", "Resident memory of this process", rss.clone());
    cpus.set(std::thread::available_parallelism().map_or(1, |n| n.get()) as i64);
    tokio::spawn(async move {
        // Clock ticks per second: 100 on Linux (USER_HZ); sysconf is not needed for /proc/self/stat's unit.
        const TICKS: f64 = 100.0;
        loop {
            if let Ok(stat) = tokio::fs::read_to_string("/proc/self/stat").await {
                if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) {
                    let f: Vec<&str> = rest.split_whitespace().collect();
                    if let (Some(u), Some(s)) = (f.get(11).and_then(|v| v.parse::<f64>().ok()), f.get(12).and_then(|v| v.parse::<f64>().ok())) {
                        cpu.set((u + s) / TICKS);
                    }
                    if let Some(pages) = f.get(21).and_then(|v| v.parse::<i64>().ok()) {
                        rss.set(pages * 4096);
                    }
                }
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    })
}

/// How often the JobDB server's connections are counted.
const DB_CONNECTIONS_EVERY: Duration = Duration::from_secs(10);

/// `sluice_db_connections_used_ratio`: the share of the JobDB server's
/// connections in use (what the control plane's `db_connections` threshold
/// is held against), every 10 s, for a process with `deliver.jobdb_url`.
/// On its own connection; a failed count leaves the last value and is
/// logged once per streak.
pub fn spawn_db_connections(config: &Config, registry: &mut Registry) -> Result<Option<tokio::task::JoinHandle<()>>> {
    use sluice_sql::conn::{Connector, SharedConnection};
    let Some(url) = &config.deliver.jobdb_url else { return Ok(None) };
    let link = sluice_sql::SqlLink::new(url.as_str())?;
    let engine = link.engine();
    let used: Gauge<f64, std::sync::atomic::AtomicU64> = Gauge::default();
    registry.register(
        "sluice_db_connections_used_ratio",
        "Share of the JobDB server's connections in use (connections / max_connections)",
        used.clone(),
    );
    let session = Arc::new(SharedConnection::new(Connector::Server(Box::new(link)), "connection count"));
    Ok(Some(tokio::spawn(async move {
        let mut failing = false;
        loop {
            let s = session.clone();
            let counted = tokio::task::spawn_blocking(move || s.run("counting connections", |c| sluice_sql::link::connection_use(c, engine))).await;
            match counted {
                Ok(Ok((n, max))) if max > 0 => {
                    used.set(n as f64 / max as f64);
                    failing = false;
                }
                Ok(Err(e)) if !failing => {
                    tracing::warn!(error = %e, "cannot count the JobDB server's connections (sluice_db_connections_used_ratio keeps its last value)");
                    failing = true;
                }
                _ => {}
            }
            tokio::time::sleep(DB_CONNECTIONS_EVERY).await;
        }
    })))
}
