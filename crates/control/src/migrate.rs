//! The control plane's side of moving a workspace between cells
//! (docs/plans/MIGRATION.md): the operators' API, the cells' task list and
//! reports, and the driver that advances each migration's state machine.
//!
//! Invariants:
//! - The state lives in the global store only (`sluice_cells::migration`);
//!   the driver keeps nothing a restart would lose. Each of its steps is a
//!   conditional transition, so two control planes (or one restarted mid-
//!   step) cannot make one twice.
//! - The driver never opens a bucket: it fences one (cutover) and marks it
//!   moved once the source reports that the target opened it. What moves
//!   keys and opens gates is the cells' work (`mover.rs`), told by the
//!   task list they poll, authenticated by their own tokens.
//! - A report is the reporting cell's role only: a cell that is neither
//!   side of a migration cannot report on it.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::{json, Value};
use sluice_cells::{Migration, Phase};
use sluice_core::Shutdown;
use sluice_ingest::request::ApiError;

use crate::capacity::{CellLoad, ROOM};
use crate::{body, cell_auth, ok, ApiResult, Shared};

/// How often the driver looks at the migrations in progress.
pub const DRIVE_EVERY: Duration = Duration::from_millis(100);
/// How old a source's report may be for the driver to start a cutover on it.
pub const REPORT_FRESH_MS: i64 = 3_000;
/// How long an ended migration stays in its cells' task lists (a cell that
/// lost the workspace keeps it closed until its configuration drops it).
pub const ENDED_SHOWN: Duration = Duration::from_secs(600);
/// Keys the source may still have to send for a cutover to start (its
/// delta lag): the fence then waits for these only.
pub const CUTOVER_LAG: u64 = 20_000;
/// The share of the target's requests that may fail for a gradual move to take its next step.
pub const MAX_ERROR_SHARE: f64 = 0.01;
/// How old the target's load reading may be for a gradual move to take its next step.
const LOAD_FRESH_MS: i64 = 10_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StartMigration {
    workspace: String,
    to: String,
    #[serde(default)]
    steps: Option<Vec<u8>>,
    /// Copy keys, but cut nothing over until resumed.
    #[serde(default)]
    paused: bool,
    /// Move even into a cell over 70% of a threshold (or not read yet).
    #[serde(default)]
    force: bool,
    /// The most keys per second the snapshot sends (none: as fast as the cells go).
    #[serde(default)]
    copy_rate: Option<u64>,
}

/// Why `cell` should not take a workspace now (`None`: it has room): over
/// [`ROOM`] of a threshold, or its load not read yet.
fn no_room(cell: &str, load: Option<&CellLoad>) -> Option<String> {
    let Some(load) = load.filter(|l| full_reading(l)) else {
        return Some(format!("cell {cell:?}'s load has not been read yet (every scrape_interval); try again in a moment, or pass force"));
    };
    let (_, over) = load.over(ROOM);
    (!over.is_empty())
        .then(|| format!("cell {cell:?} is at or over {:.0}% of its thresholds: {}; pass force to move anyway", ROOM * 100.0, over.join(", ")))
}

/// A reading with the measures that take two scrapes (CPU over the interval), not only the first one's.
fn full_reading(load: &CellLoad) -> bool {
    load.metrics.contains_key("cpu")
}

/// Why a gradual move should not take its next step into `cell` now: over a
/// threshold, or more than [`MAX_ERROR_SHARE`] of its requests failing.
fn unhealthy(load: &CellLoad) -> Option<String> {
    let (_, over) = load.over(1.0);
    let mut why = over;
    if let Some(share) = load.error_share.filter(|s| *s > MAX_ERROR_SHARE) {
        why.push(format!("{:.1}% of its Tracking API requests answered with a server error", share * 100.0));
    }
    (!why.is_empty()).then(|| why.join(", "))
}

/// `POST /api/migrations`.
pub(crate) async fn start(State(cp): State<Shared>, raw: Bytes) -> ApiResult {
    let req: StartMigration = body(&raw)?;
    let steps = req.steps.unwrap_or_else(|| vec![100]);
    let room = no_room(&req.to, cp.load(&req.to).as_ref());
    let m = cp
        .store(move |s| {
            // Keys go cell to cell over the cells' admin ports: both must have one.
            let placed = s.resolve(&req.workspace)?;
            for cell in placed.map(|p| p.cell).into_iter().chain([req.to.clone()]) {
                if let Some(c) = s.cell(&cell)? {
                    if c.admin_url.is_empty() {
                        return Err(sluice_cells::CellsError::Invalid {
                            what: "migration",
                            why: format!("cell {cell:?} has no admin_url: the workspace's dedup keys travel between the cells' admin ports"),
                        });
                    }
                }
            }
            // The target's room (an unknown cell is the store's 404 below).
            if let (Some(why), false, Some(_)) = (room, req.force, s.cell(&req.to)?) {
                return Err(sluice_cells::CellsError::Invalid { what: "migration", why });
            }
            if req.copy_rate == Some(0) {
                return Err(sluice_cells::CellsError::Invalid { what: "migration", why: "copy_rate must be at least 1 key per second".into() });
            }
            let m = s.start_migration(&req.workspace, &req.to, &steps, req.paused)?;
            if let Some(rate) = req.copy_rate {
                s.report_migration(&m.id, "settings", &json!({ "copy_rate": rate }))?;
            }
            Ok(m)
        })
        .await?;
    cp.decide(
        "migration_started",
        Some(&m.target_cell),
        None,
        format!("workspace {} from {} to {} in steps {:?} ({})", m.workspace, m.source_cell, m.target_cell, m.steps, m.id),
    );
    Ok((StatusCode::CREATED, axum::Json(view(&m))).into_response())
}

/// What operators see of a migration (never its token).
pub fn view(m: &Migration) -> Value {
    let source = &m.progress["source"];
    let target = &m.progress["target"];
    json!({
        "id": m.id,
        "workspace": m.workspace,
        "from": m.source_cell,
        "to": m.target_cell,
        "phase": m.phase,
        "paused": m.paused,
        "steps": m.steps,
        "step": m.step,
        "buckets_moved": m.moved.len(),
        "moved": m.moved,
        "fenced": m.fenced,
        "keys_copied": source["keys_sent"],
        "keys_imported": target["keys_imported"],
        "delta_lag": source["tail_lag"],
        "source_jobs_draining": source["pending_jobs"],
        "cleanup": source["cleanup"],
        "progress": m.progress,
        "error": m.error,
        "created_at_ms": m.created_at,
        "updated_at_ms": m.updated_at,
    })
}

/// `GET /api/migrations`: the newest 200.
pub(crate) async fn list(State(cp): State<Shared>) -> ApiResult {
    let all = cp.store(|s| s.migrations(200)).await?;
    ok(json!({ "migrations": all.iter().map(view).collect::<Vec<_>>() }))
}

async fn find(cp: &Shared, id: String) -> Result<Migration, ApiError> {
    cp.store(move |s| s.migration(&id)).await?.ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such migration"))
}

/// `GET /api/migrations/{id}`.
pub(crate) async fn get(State(cp): State<Shared>, Path(id): Path<String>) -> ApiResult {
    ok(view(&find(&cp, id).await?))
}

/// `POST /api/migrations/{id}/{pause|resume|abort}`.
pub(crate) async fn act(State(cp): State<Shared>, Path((id, action)): Path<(String, String)>) -> ApiResult {
    let m = find(&cp, id.clone()).await?;
    match action.as_str() {
        "pause" | "resume" => {
            let paused = action == "pause";
            let id2 = id.clone();
            let changed = cp
                .store(move |s| {
                    let changed = s.set_migration_paused(&id2, paused)?;
                    // Resuming answers a hold (the driver's reason in `error`).
                    if changed && !paused {
                        s.set_migration_error(&id2, "")?;
                    }
                    Ok(changed)
                })
                .await?;
            if !changed {
                return Err(ApiError::bad_request("invalid", format!("the migration is {}: it cannot be paused or resumed", m.phase.as_str())));
            }
        }
        "abort" => {
            let id2 = id.clone();
            cp.store(move |s| s.abort_migration(&id2)).await?;
            cp.decide("migration_aborted", Some(&m.target_cell), None, format!("workspace {} stays in {} ({id})", m.workspace, m.source_cell));
        }
        _ => return Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", "the actions are pause, resume and abort")),
    }
    ok(view(&find(&cp, id).await?))
}

/// One migration as a cell's task: its role, and what the cell needs to play it.
fn task(m: &Migration, cell: &str, peer_admin_url: &str, sources: &[String]) -> Value {
    let role = if m.source_cell == cell { "source" } else { "target" };
    json!({
        "id": m.id,
        "workspace": m.workspace,
        "role": role,
        "phase": m.phase,
        "step": m.step,
        "moved": m.moved,
        "fenced": m.fenced,
        "token": m.token,
        "peer": if role == "source" { &m.target_cell } else { &m.source_cell },
        "peer_admin_url": peer_admin_url,
        "sources": sources,
        "copy_rate": m.progress["settings"]["copy_rate"].as_u64(),
    })
}

/// `GET /api/cells/{id}/migrations`: the migrations in progress this cell takes part in.
pub(crate) async fn cell_tasks(State(cp): State<Shared>, Path(id): Path<String>, headers: HeaderMap) -> ApiResult {
    cell_auth(&cp, &id, &headers).await?;
    let tasks = cp
        .store(move |s| {
            let mut out = Vec::new();
            for m in s.migrations_of_cell(&id, ENDED_SHOWN.as_millis() as i64)? {
                let peer = if m.source_cell == id { &m.target_cell } else { &m.source_cell };
                let peer_url = s.cell(peer)?.map(|c| c.admin_url).unwrap_or_default();
                let sources = s.workspace_sources(&m.workspace)?;
                out.push(task(&m, &id, &peer_url, &sources));
            }
            Ok(out)
        })
        .await?;
    ok(json!({ "migrations": tasks }))
}

/// `GET /api/cells/{id}/history/{workspace}`: the cells the workspace was
/// moved out of (their buckets cut over: past copying), one migration per
/// cell, each with a read-only history token only that cell can check
/// (`history::history_token`, keyed by its own token's hash), for a replay
/// on the cell that serves it now. Refused while the workspace moves (a
/// replay then would miss what the other side holds); retired cells are
/// listed apart (their logs are gone with them).
pub(crate) async fn cell_history(State(cp): State<Shared>, Path((id, workspace)): Path<(String, String)>, headers: HeaderMap) -> ApiResult {
    cell_auth(&cp, &id, &headers).await?;
    let answer = cp
        .store(move |s| {
            if s.resolve(&workspace)?.is_none_or(|p| p.cell != id) {
                return Ok(Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", "this cell does not serve that workspace")));
            }
            let moves = s.migrations_of_workspace(&workspace)?;
            if let Some(m) = moves.iter().find(|m| m.phase.active()) {
                return Ok(Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "moving",
                    format!("workspace {workspace:?} is moving ({}, {}): replay once the move has ended", m.id, m.phase.as_str()),
                )));
            }
            let sources = s.workspace_sources(&workspace)?;
            let (mut earlier, mut retired) = (std::collections::BTreeMap::new(), Vec::new());
            for m in moves.iter().filter(|m| m.source_cell != id && m.phase == Phase::Done) {
                let Some(cell) = s.cell(&m.source_cell)? else { continue };
                if cell.state == sluice_cells::CellState::Retired {
                    retired.push(cell.id);
                    continue;
                }
                let Some(key) = s.cell_token_hash(&cell.id)? else { continue };
                let token = crate::history::history_token(&key, &m.id, &workspace, &sources);
                // The latest move out of each cell stands for all: the cell's log holds every stay's events.
                earlier.insert(cell.id.clone(), json!({"migration": m.id, "cell": cell.id, "admin_url": cell.admin_url, "token": token}));
            }
            retired.sort();
            retired.dedup();
            Ok(Ok(json!({ "sources": sources, "earlier": earlier.into_values().collect::<Vec<_>>(), "retired": retired })))
        })
        .await?;
    ok(answer?)
}

/// `POST /api/cells/{id}/migrations/{m}/report`: the cell's progress in its role.
pub(crate) async fn cell_report(State(cp): State<Shared>, Path((id, mid)): Path<(String, String)>, headers: HeaderMap, raw: Bytes) -> ApiResult {
    cell_auth(&cp, &id, &headers).await?;
    let report: Value = body(&raw)?;
    let m = find(&cp, mid.clone()).await?;
    let role = match () {
        _ if m.source_cell == id => "source",
        _ if m.target_cell == id => "target",
        _ => return Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", "this cell takes no part in that migration")),
    };
    cp.store(move |s| s.report_migration(&mid, role, &report)).await?;
    ok(json!({ "ok": true }))
}

/// Advance every migration in progress, every [`DRIVE_EVERY`], until `stop`.
pub fn spawn_driver(cp: Shared, step_interval: Duration, stop: Shutdown) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(DRIVE_EVERY) => {}
                _ = stop.wait() => return,
            }
            if let Err(e) = drive(&cp, step_interval).await {
                tracing::debug!(error = %e.message(), "the migration driver could not read the store; trying again");
            }
        }
    })
}

/// One look at every migration in progress.
async fn drive(cp: &Shared, step_interval: Duration) -> Result<(), ApiError> {
    let active = cp.store(|s| s.active_migrations()).await?;
    for m in active {
        let (source, target) = (&m.progress["source"], &m.progress["target"]);
        let id = m.id.clone();
        match m.phase {
            Phase::Copying => {
                let last = m.progress["driver"]["last_cutover_ms"].as_i64().unwrap_or(0);
                let rested = m.step == 0 || sluice_core::clock::now_ms() - last >= step_interval.as_millis() as i64;
                // Reports from before a restart of the source say nothing of its new run: fresh ones only.
                let fresh = source["at_ms"].as_i64().is_some_and(|at| sluice_core::clock::now_ms() - at < REPORT_FRESH_MS);
                let ready = fresh
                    && source["snapshot_done"].as_bool() == Some(true)
                    && source["tail_lag"].as_u64().is_some_and(|lag| lag <= CUTOVER_LAG)
                    && target["ready"].as_bool() == Some(true);
                if ready && rested && !m.paused {
                    // A later step of a gradual move: only while the target copes with what it took.
                    if m.step > 0 {
                        let fresh_ms = LOAD_FRESH_MS.max(3 * cp.settings.scrape_every.as_millis() as i64);
                        let load = cp.load(&m.target_cell);
                        let Some(load) =
                            load.filter(|l| l.error.is_none() && full_reading(l) && sluice_core::clock::now_ms() - l.scraped_at_ms < fresh_ms)
                        else {
                            // No fresh reading of the target (it may be restarting): wait for one.
                            continue;
                        };
                        if let Some(why) = unhealthy(&load) {
                            let reason = format!(
                                "held before step {} of {}: cell {} is {why}; resume once it recovers",
                                m.step + 1,
                                m.steps.len(),
                                m.target_cell
                            );
                            let (id, r) = (id.clone(), reason.clone());
                            // The reason first: whoever sees the migration paused sees why.
                            cp.store(move |s| {
                                s.set_migration_error(&id, &r)?;
                                s.set_migration_paused(&id, true).map(drop)
                            })
                            .await?;
                            tracing::warn!(migration = %m.id, workspace = %m.workspace, "{reason}");
                            cp.decide("migration_held", Some(&m.target_cell), None, format!("workspace {} ({}): {reason}", m.workspace, m.id));
                            continue;
                        }
                    }
                    let step = m.step;
                    if cp.store(move |s| s.begin_cutover(&id, step)).await? {
                        tracing::info!(migration = %m.id, workspace = %m.workspace, step, "cutover: the step's buckets are fenced");
                    }
                }
            }
            Phase::Cutover => {
                if source["cutover_done_step"].as_u64() == Some(m.step as u64) {
                    let step = m.step;
                    let now = sluice_core::clock::now_ms();
                    let done = cp
                        .store(move |s| {
                            let done = s.finish_cutover(&id, step)?;
                            if done {
                                s.report_migration(&id, "driver", &json!({ "last_cutover_ms": now, "steps_done": step + 1 }))?;
                            }
                            Ok(done)
                        })
                        .await?;
                    if done {
                        cp.decide(
                            "migration_step",
                            Some(&m.target_cell),
                            None,
                            format!("workspace {}: step {} of {} moved ({})", m.workspace, step + 1, m.steps.len(), m.id),
                        );
                    }
                }
            }
            Phase::Draining => {
                if source["drained"].as_bool() == Some(true) {
                    cp.store(move |s| s.begin_cleanup(&id)).await?;
                }
            }
            Phase::Cleanup => {
                if source["cleanup"]["done"].as_bool() == Some(true) && cp.store(move |s| s.finish_migration(&id)).await? {
                    cp.decide("migration_done", Some(&m.target_cell), None, format!("workspace {} now in {} ({})", m.workspace, m.target_cell, m.id));
                }
            }
            Phase::Done | Phase::Aborted => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capacity::Measure;

    fn load(measures: &[(&'static str, f64)], error_share: Option<f64>) -> CellLoad {
        let mut l = CellLoad::default();
        l.error_share = error_share;
        for (name, ratio) in measures {
            l.metrics.insert(name, Measure { value: *ratio, threshold: 1.0, ratio: *ratio });
        }
        l
    }

    #[test]
    fn a_move_starts_only_into_a_cell_read_in_full_and_under_seventy_percent() {
        assert!(no_room("b", None).unwrap().contains("not been read yet"));
        // One scrape only: no CPU over an interval yet.
        assert!(no_room("b", Some(&load(&[("workspaces", 0.1)], None))).unwrap().contains("not been read yet"));
        assert_eq!(no_room("b", Some(&load(&[("workspaces", 0.1), ("cpu", 0.69)], None))), None);
        let why = no_room("b", Some(&load(&[("workspaces", 0.1), ("cpu", 0.7)], None))).unwrap();
        assert!(why.contains("cpu 70%") && why.contains("force"), "{why}");
    }

    #[test]
    fn a_gradual_move_holds_while_its_target_is_over_a_threshold_or_failing_requests() {
        assert_eq!(unhealthy(&load(&[("cpu", 0.99), ("ingest_p99", 0.5)], Some(0.01))), None);
        assert!(unhealthy(&load(&[("cpu", 0.5), ("ingest_p99", 1.2)], None)).unwrap().contains("ingest_p99"));
        let why = unhealthy(&load(&[("cpu", 0.5)], Some(0.25))).unwrap();
        assert!(why.contains("25.0%") && why.contains("server error"), "{why}");
    }
}
