//! Capacity: each cell's load against its tier's thresholds, and new cells
//! when a tier runs out of room (the seed's "Cell capacity thresholds" and
//! "New cell provisioning").
//!
//! Every `scrape_interval` the control plane reads each active or full
//! cell's `/metrics` (its `admin_url`) and the store's workspace counts:
//! - `workspaces`: workspaces assigned to the cell (the store);
//! - `cpu`: the cell's process CPU over the interval, as a share of its
//!   cores (`sluice_process_cpu_seconds_total`, `sluice_process_cpus`);
//! - `consumer_lag`: how far behind its consumers are, in seconds
//!   (`sluice_consumer_lag_seconds`, the largest group);
//! - `db_connections`: the share of its JobDB server's connections in use
//!   (`sluice_db_connections_used_ratio`, counted every 10 s by a cell with
//!   `deliver.jobdb_url`; absent on an embedded cell);
//! - `ingest_p99`: its Tracking API's p99 over the interval
//!   (`sluice_ingest_ack_seconds`).
//!
//! Rules:
//! - An active cell at or over any threshold is marked `full` (it takes no
//!   new workspaces; existing ones stay), with the metrics that crossed.
//! - A cell the control plane marked full goes back to `active` once every
//!   metric is under 80% of its threshold (an operator's `full` stays).
//! - When no active cell of a tier is under 70% of every threshold (the
//!   seed's "cell at 70% capacity"), a new cell of that tier is
//!   provisioned through the provisioner, one at a time per tier. It is
//!   registered `provisioning`, joins (`active`) once its `/healthz`
//!   answers, and new workspaces go to it as the least loaded; existing
//!   workspaces stay where they are.
//! - A cell that cannot be read keeps its state (a scrape failure is not
//!   load); the failure is counted and shown.
//!
//! Moving a workspace (`migrate.rs`) reads the same loads: a move starts
//! only into a cell under 70% of every threshold, and a gradual move holds
//! before its next step while the target is over a threshold or answers
//! more than 1% of its Tracking API requests with a server error
//! (`error_share`: `sluice_ingest_requests_total` with a 5xx status, over
//! the interval).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};
use sluice_cells::{Cell, CellState, Tier};
use sluice_core::config::{Thresholds, TierThresholds};
use sluice_core::metrics::{parse_text, Buckets, Sample};
use sluice_core::Shutdown;

use crate::ControlPlane;

/// Under this share of every threshold, a cell has room (provisioning
/// starts when no active cell has; a workspace may move into it).
pub const ROOM: f64 = 0.7;
/// Under this share of every threshold, a cell marked full here is active again.
const RECOVERED: f64 = 0.8;
/// After a failed provisioning, the next attempt for that tier waits this long.
const PROVISION_BACKOFF: Duration = Duration::from_secs(300);

/// What the last scrape saw of one cell.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CellLoad {
    pub scraped_at_ms: i64,
    /// Why the last read failed (the values are from the one before).
    pub error: Option<String>,
    /// Metric → (value, threshold, value / threshold). Units: count, share, seconds.
    pub metrics: BTreeMap<&'static str, Measure>,
    /// The share of the Tracking API's requests answered with a 5xx over the
    /// interval (none: no request, or no scrape before).
    pub error_share: Option<f64>,
    #[serde(skip)]
    previous: Option<Previous>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Measure {
    pub value: f64,
    pub threshold: f64,
    pub ratio: f64,
}

/// What a rate or a window needs from the scrape before.
#[derive(Debug, Clone)]
struct Previous {
    at: Instant,
    cpu_seconds: Option<f64>,
    ack: Buckets,
    /// Tracking API requests so far: (all, answered 5xx).
    requests: (f64, f64),
}

impl CellLoad {
    /// The highest ratio, and the metrics at or over `share` of their threshold.
    pub fn over(&self, share: f64) -> (f64, Vec<String>) {
        let max = self.metrics.values().map(|m| m.ratio).fold(0.0, f64::max);
        let names = self
            .metrics
            .iter()
            .filter(|(_, m)| m.ratio >= share)
            .map(|(k, m)| format!("{k} {} (threshold {})", show(k, m.value), show(k, m.threshold)))
            .collect();
        (max, names)
    }
}

fn show(metric: &str, v: f64) -> String {
    match metric {
        "workspaces" => format!("{v:.0}"),
        "cpu" | "db_connections" => format!("{:.0}%", v * 100.0),
        _ => format!("{:.3}s", v),
    }
}

/// Bookkeeping between scrapes.
#[derive(Debug, Default)]
pub struct Bookkeeping {
    /// Cells this control plane marked full (it may put them back).
    pub auto_full: HashSet<String>,
    /// Tiers with a provisioning in flight.
    provisioning: HashSet<Tier>,
    /// Tiers whose last provisioning failed, and when.
    failed: HashMap<Tier, Instant>,
}

fn thresholds(t: &TierThresholds, tier: Tier) -> &Thresholds {
    match tier {
        Tier::Enterprise => &t.enterprise,
        Tier::Mid => &t.mid,
        Tier::Smb => &t.smb,
    }
}

/// The thresholds as the API shows them.
pub fn thresholds_json(t: &TierThresholds) -> Value {
    json!({ "enterprise": t.enterprise, "mid": t.mid, "smb": t.smb })
}

/// Watch the cells until `stop`.
pub fn spawn(cp: Arc<ControlPlane>, stop: Shutdown) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(cp.settings.scrape_every) => {}
                _ = stop.wait() => return,
            }
            if let Err(e) = round(&cp).await {
                tracing::warn!(error = %e.message(), "capacity round skipped: the global store cannot be read");
            }
        }
    })
}

/// One round: read every cell, apply the rules.
pub async fn round(cp: &Arc<ControlPlane>) -> Result<(), sluice_ingest::request::ApiError> {
    let (cells, counts) = cp.store(|s| Ok((s.cells()?, s.workspace_counts()?))).await?;
    let watched: Vec<&Cell> = cells.iter().filter(|c| matches!(c.state, CellState::Active | CellState::Full)).collect();
    for cell in &watched {
        let workspaces = counts.get(&cell.id).copied().unwrap_or(0);
        scrape(cp, cell, workspaces).await;
    }
    let loads = cp.loads.read().expect("loads lock").clone();
    for cell in &watched {
        let Some(load) = loads.get(&cell.id) else { continue };
        if load.metrics.is_empty() {
            continue;
        }
        let (max, crossed) = load.over(1.0);
        let auto = cp.capacity.lock().expect("capacity lock").auto_full.contains(&cell.id);
        if cell.state == CellState::Active && !crossed.is_empty() {
            set_state(cp, cell, CellState::Full, format!("over its {} thresholds: {}", cell.tier.as_str(), crossed.join(", "))).await;
            cp.capacity.lock().expect("capacity lock").auto_full.insert(cell.id.clone());
        } else if cell.state == CellState::Full && auto && max < RECOVERED {
            set_state(cp, cell, CellState::Active, format!("every metric under {:.0}% of its threshold again", RECOVERED * 100.0)).await;
            cp.capacity.lock().expect("capacity lock").auto_full.remove(&cell.id);
        }
    }
    // Provisioning: a tier none of whose active cells has room.
    if cp.settings.provision_command.is_empty() {
        return Ok(());
    }
    let tiers: HashSet<Tier> = cells.iter().filter(|c| c.state != CellState::Retired).map(|c| c.tier).collect();
    for tier in tiers {
        let roomy = cells
            .iter()
            .filter(|c| c.tier == tier)
            .any(|c| c.state == CellState::Active && loads.get(&c.id).is_some_and(|l| !l.metrics.is_empty() && l.over(ROOM).0 < ROOM));
        let provisioning = cells.iter().any(|c| c.tier == tier && c.state == CellState::Provisioning);
        if roomy || provisioning {
            continue;
        }
        {
            let mut book = cp.capacity.lock().expect("capacity lock");
            if book.provisioning.contains(&tier) || book.failed.get(&tier).is_some_and(|t| t.elapsed() < PROVISION_BACKOFF) {
                continue;
            }
            book.provisioning.insert(tier);
        }
        let why = format!("no active {} cell is under {:.0}% of every threshold", tier.as_str(), ROOM * 100.0);
        cp.decide("provision", None, Some(tier), why);
        let cp = cp.clone();
        tokio::spawn(async move {
            let result = provision(&cp, tier).await;
            let mut book = cp.capacity.lock().expect("capacity lock");
            book.provisioning.remove(&tier);
            if let Err(e) = result {
                book.failed.insert(tier, Instant::now());
                drop(book);
                cp.decide("provision_failed", None, Some(tier), e);
            }
        });
    }
    Ok(())
}

async fn set_state(cp: &Arc<ControlPlane>, cell: &Cell, state: CellState, reason: String) {
    let id = cell.id.clone();
    match cp.store(move |s| s.set_cell_state(&id, state)).await {
        Ok(()) => cp.decide(state.as_str(), Some(&cell.id), Some(cell.tier), reason),
        Err(e) => tracing::warn!(cell = %cell.id, error = %e.message(), "could not change a cell's state"),
    }
}

/// Read `cell`'s `/metrics` and record its load.
async fn scrape(cp: &Arc<ControlPlane>, cell: &Cell, workspaces: u64) {
    let t = thresholds(&cp.settings.thresholds, cell.tier).clone();
    let previous = cp.loads.read().expect("loads lock").get(&cell.id).cloned().unwrap_or_default();
    let mut load = CellLoad { scraped_at_ms: sluice_core::clock::now_ms(), ..previous.clone() };
    let mut measured: Vec<(&'static str, f64, f64)> = Vec::new();
    let mut measure = |name: &'static str, value: f64, threshold: f64| measured.push((name, value, threshold));
    measure("workspaces", workspaces as f64, t.workspaces as f64);
    let samples = if cell.admin_url.is_empty() { Err("the cell has no admin_url".to_owned()) } else { read_metrics(cp, &cell.admin_url).await };
    match samples {
        Ok(samples) => {
            load.error = None;
            let now = Instant::now();
            let cpu_seconds = value(&samples, "sluice_process_cpu_seconds_total");
            let cpus = value(&samples, "sluice_process_cpus").unwrap_or(1.0).max(1.0);
            let ack = Buckets::of(&samples, "sluice_ingest_ack_seconds", &[]);
            let requests = samples.iter().filter(|s| s.name == "sluice_ingest_requests_total").fold((0.0, 0.0), |(all, bad), s| {
                let failed = s.label("status").is_some_and(|c| c.starts_with('5'));
                (all + s.value, bad + if failed { s.value } else { 0.0 })
            });
            load.error_share = None;
            if let Some(prev) = &previous.previous {
                let (all, bad) = (requests.0 - prev.requests.0, requests.1 - prev.requests.1);
                if all > 0.0 {
                    load.error_share = Some((bad / all).clamp(0.0, 1.0));
                }
                let dt = now.duration_since(prev.at).as_secs_f64();
                if let (Some(now_cpu), Some(then), true) = (cpu_seconds, prev.cpu_seconds, dt > 0.0) {
                    measure("cpu", ((now_cpu - then).max(0.0) / dt / cpus).min(1.0), t.cpu);
                }
                // No request in the window: no latency to hold against the threshold.
                if let Some(p99) = ack.minus(&prev.ack).quantile(0.99).filter(|q| q.is_finite()) {
                    measure("ingest_p99", p99, t.ingest_p99.as_secs_f64());
                } else {
                    load.metrics.remove("ingest_p99");
                    cp.metrics.load.remove(&vec![("cell", cell.id.clone()), ("metric", "ingest_p99".to_owned())]);
                }
            }
            let lag = samples.iter().filter(|s| s.name == "sluice_consumer_lag_seconds").map(|s| s.value).fold(0.0, f64::max);
            measure("consumer_lag", lag, t.consumer_lag.as_secs_f64());
            if let Some(db) = value(&samples, "sluice_db_connections_used_ratio") {
                measure("db_connections", db, t.db_connections);
            }
            load.previous = Some(Previous { at: now, cpu_seconds, ack, requests });
        }
        Err(e) => {
            cp.metrics.scrape_failures.get_or_create(&vec![("cell", cell.id.clone())]).inc();
            tracing::debug!(cell = %cell.id, error = %e, "cannot read a cell's metrics");
            load.error = Some(e);
        }
    }
    for (name, value, threshold) in measured {
        let ratio = if threshold > 0.0 { value / threshold } else { 0.0 };
        load.metrics.insert(name, Measure { value, threshold, ratio });
        cp.metrics.load.get_or_create(&vec![("cell", cell.id.clone()), ("metric", name.to_owned())]).set(ratio);
    }
    cp.loads.write().expect("loads lock").insert(cell.id.clone(), load);
}

fn value(samples: &[Sample], name: &str) -> Option<f64> {
    samples.iter().find(|s| s.name == name).map(|s| s.value)
}

/// The most of a cell's `/metrics` page read.
const MAX_METRICS_BYTES: usize = 16 << 20;

async fn read_metrics(cp: &ControlPlane, admin_url: &str) -> Result<Vec<Sample>, String> {
    let mut req = cp.http.get(format!("{admin_url}/metrics"));
    if let Some(t) = &cp.settings.cell_metrics_token {
        req = req.bearer_auth(t);
    }
    let mut resp = req.send().await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("/metrics answered {}", resp.status()));
    }
    let mut text = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        if text.len() + chunk.len() > MAX_METRICS_BYTES {
            return Err(format!("/metrics is larger than {MAX_METRICS_BYTES} bytes"));
        }
        text.extend_from_slice(&chunk);
    }
    Ok(parse_text(&String::from_utf8_lossy(&text)))
}

/// What the provisioner answers on stdout.
#[derive(Debug, serde::Deserialize)]
struct Provisioned {
    ingest_url: String,
    admin_url: String,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
}

/// The most of the provisioner's output kept (the rest is read and dropped, so it never blocks on a full pipe).
const MAX_PROVISIONER_OUTPUT: usize = 64 * 1024;

/// All of `r`, keeping the first [`MAX_PROVISIONER_OUTPUT`] bytes; whether more came.
async fn read_capped(mut r: impl tokio::io::AsyncRead + Unpin) -> (Vec<u8>, bool) {
    use tokio::io::AsyncReadExt;
    let (mut kept, mut buf, mut cut) = (Vec::new(), [0u8; 8192], false);
    while let Ok(n) = r.read(&mut buf).await {
        if n == 0 {
            break;
        }
        let room = MAX_PROVISIONER_OUTPUT - kept.len();
        kept.extend_from_slice(&buf[..n.min(room)]);
        cut |= n > room;
    }
    (kept, cut)
}

/// Provision a new cell of `tier`: run the provisioner, register the cell
/// `provisioning`, wait for its `/healthz`, make it `active`. The error is
/// the reason, for the decision list.
pub async fn provision(cp: &Arc<ControlPlane>, tier: Tier) -> Result<(), String> {
    use tokio::io::AsyncWriteExt;
    let deadline = Instant::now() + cp.settings.provision_timeout;
    let existing = cp.store(|s| s.cells()).await.map_err(|e| e.message().to_owned())?;
    let id = (1..).map(|n| format!("{}-{n}", tier.as_str())).find(|id| !existing.iter().any(|c| &c.id == id)).expect("an unused id");
    let token = sluice_cells::feed::new_token("ct");
    let request = json!({ "cell": id, "tier": tier.as_str(), "control_url": cp.settings.public_url, "cell_token": token });
    let (program, args) = cp.settings.provision_command.split_first().ok_or("no provisioner")?;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        // A group of its own: on a timeout the whole group is killed, its children too.
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot run the provisioner {program:?}: {e}"))?;
    let group = child.id();
    let mut stdin = child.stdin.take().expect("piped");
    match stdin.write_all(request.to_string().as_bytes()).await {
        // A provisioner that does not read its request (it may need none) may be gone already: its answer decides.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        other => other.map_err(|e| format!("provisioner stdin: {e}"))?,
    }
    drop(stdin);
    let (out, err) = (child.stdout.take().expect("piped"), child.stderr.take().expect("piped"));
    let read = async {
        let ((o, o_cut), (e, _)) = tokio::join!(read_capped(out), read_capped(err));
        let status = child.wait().await;
        (status, o, o_cut, e)
    };
    let Ok((status, stdout, stdout_cut, stderr)) = tokio::time::timeout_at(deadline.into(), read).await else {
        if let Some(pid) = group {
            let _ = std::process::Command::new("kill").args(["-KILL", "--", &format!("-{pid}")]).status();
        }
        return Err(format!(
            "the provisioner took longer than {:?} (killed with its process group; a provisioner must not leave a process holding its stdout)",
            cp.settings.provision_timeout
        ));
    };
    let status = status.map_err(|e| format!("the provisioner: {e}"))?;
    if stdout_cut {
        return Err(format!("the provisioner printed more than {MAX_PROVISIONER_OUTPUT} bytes; it prints one JSON object"));
    }
    if !status.success() {
        return Err(format!("the provisioner failed ({status}): {}", String::from_utf8_lossy(&stderr).trim().chars().take(500).collect::<String>()));
    }
    let answer: Provisioned = serde_json::from_slice(&stdout).map_err(|e| {
        format!(
            "the provisioner's output is not {{\"ingest_url\", \"admin_url\"}} JSON: {e}: {}",
            String::from_utf8_lossy(&stdout).chars().take(200).collect::<String>()
        )
    })?;
    let url = |u: &str, what: &str| {
        sluice_core::config::HttpUrl::parse(u)
            .map(|u| u.as_str().trim_end_matches('/').to_owned())
            .map_err(|e| format!("the provisioner's {what}: {e}"))
    };
    let cell = Cell {
        id: id.clone(),
        tier,
        ingest_url: url(&answer.ingest_url, "ingest_url")?,
        admin_url: url(&answer.admin_url, "admin_url")?,
        state: CellState::Provisioning,
        attributes: answer.attributes,
    };
    let (c, t) = (cell.clone(), token.clone());
    cp.store(move |s| {
        s.put_cell(&c)?;
        s.set_cell_token(&c.id, &t)
    })
    .await
    .map_err(|e| e.message().to_owned())?;
    cp.decide("provisioned", Some(&id), Some(tier), format!("the provisioner made it at {} (admin {})", cell.ingest_url, cell.admin_url));
    // Health checks: the new cell's admin port answers /healthz.
    loop {
        let healthy = cp.http.get(format!("{}/healthz", cell.admin_url)).send().await.is_ok_and(|r| r.status().is_success());
        if healthy {
            break;
        }
        if Instant::now() > deadline {
            // Retired, not left provisioning: a tier with a provisioning cell waits for it, and this one will not come.
            let cid = id.clone();
            let _ = cp.store(move |s| s.set_cell_state(&cid, CellState::Retired)).await;
            return Err(format!(
                "cell {id} did not answer {}/healthz within {:?}: retired it (a new cell is tried after {:?})",
                cell.admin_url, cp.settings.provision_timeout, PROVISION_BACKOFF
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let cid = id.clone();
    cp.store(move |s| s.set_cell_state(&cid, CellState::Active)).await.map_err(|e| e.message().to_owned())?;
    cp.decide("joined", Some(&id), Some(tier), "its health checks passed: new workspaces can be placed on it".into());
    Ok(())
}
