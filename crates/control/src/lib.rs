//! `sluice control`: the control plane of the cells (issue 14; DESIGN.md §5).
//!
//! It owns the global store's write side for operators (cells, workspaces,
//! their sources, destinations and connections, overrides), hands each
//! cell the configuration of the workspaces it serves, takes the cells'
//! usage reports, watches every cell's `/metrics` against its tier's
//! thresholds, and provisions a new cell when a tier runs out of room
//! ([`capacity`]).
//!
//! Invariants:
//! - Operators authenticate with `control.token`; a cell with its own
//!   token (kept hashed in the store), and only for its own id. `/healthz`
//!   is public; `/metrics` follows `admin.metrics_token`.
//! - A write key is shown once, when it is made (a source created or its
//!   key rotated); the store keeps its SHA-256 only.
//! - What the control plane decides (a cell full or active again, a cell
//!   provisioned, joined or failed) is logged, counted, and kept in a
//!   bounded list of recent decisions with the reason (`GET /api/decisions`).
//! - Cells do not need the control plane to serve: they keep the last
//!   configuration they fetched, and keep their usage until a report is
//!   taken. A usage report is counted once however often it is sent.
//! - Every call to the store runs on a blocking thread through a small
//!   pool ([`StorePool`]); no handler blocks the async workers.

pub mod agent;
pub mod capacity;
pub mod history;
pub mod migrate;
pub mod mover;

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sluice_cells::feed::{new_token, KeyPlace};
use sluice_cells::{Cell, CellState, CellsError, GlobalStore, PoolError, StorePool, Tier, UsageRow, Workspace};
use sluice_core::config::{HttpUrl, TierThresholds};
use sluice_core::metrics::{Counter, Family, Gauge, Registry};
use sluice_ingest::request::ApiError;
use sluice_ingest::tokens::{bearer, token_matches};

/// The control plane's settings (from `[control]`).
#[derive(Debug, Clone)]
pub struct ControlSettings {
    /// The operators' token.
    pub token: String,
    /// `admin.metrics_token`: when set, `/metrics` needs it (or `token`).
    pub metrics_token: Option<String>,
    /// Sent when reading cells' `/metrics`.
    pub cell_metrics_token: Option<String>,
    pub scrape_every: Duration,
    /// The provisioner's program and arguments; empty = none.
    pub provision_command: Vec<String>,
    pub provision_timeout: Duration,
    pub allow_private_network: bool,
    pub thresholds: TierThresholds,
    /// This control plane's URL as cells reach it (handed to provisioned cells).
    pub public_url: String,
}

/// One thing the control plane decided, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    pub at_ms: i64,
    pub kind: &'static str,
    pub cell: Option<String>,
    pub tier: Option<&'static str>,
    pub reason: String,
}

/// Recent decisions kept for the API.
const MAX_DECISIONS: usize = 500;

/// The control plane's metrics.
#[derive(Clone, Default)]
pub struct ControlMetrics {
    /// Decisions by kind (`full`, `active`, `provision`, `provisioned`, `joined`, `provision_failed`).
    pub decisions: Family<Vec<(&'static str, String)>, Counter>,
    /// Each cell's load against its tier's threshold, by metric (1 = at the threshold).
    pub load: Family<Vec<(&'static str, String)>, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Failed reads of a cell's `/metrics`.
    pub scrape_failures: Family<Vec<(&'static str, String)>, Counter>,
    /// Usage reports counted, and repeats (counted before) ignored.
    pub usage_reports: Family<Vec<(&'static str, String)>, Counter>,
}

impl ControlMetrics {
    pub fn register(&self, r: &mut Registry) {
        let r = r.sub_registry_with_prefix("sluice_control");
        r.register("decisions", "Decisions by kind (full, active, provision, provisioned, joined, provision_failed)", self.decisions.clone());
        r.register("cell_load", "Each cell's load against its tier's threshold, by metric (1 = at the threshold)", self.load.clone());
        r.register("scrape_failures", "Failed reads of a cell's /metrics", self.scrape_failures.clone());
        r.register("usage_reports", "Usage reports by outcome (counted, repeat)", self.usage_reports.clone());
    }
}

/// The control plane: its store, what it last saw of each cell, its decisions.
pub struct ControlPlane {
    stores: StorePool,
    pub settings: ControlSettings,
    http: reqwest::Client,
    /// The last scrape of each cell.
    loads: RwLock<BTreeMap<String, capacity::CellLoad>>,
    decisions: Mutex<VecDeque<Decision>>,
    /// Capacity bookkeeping between scrapes (cells marked full here, provisioning in flight).
    capacity: Mutex<capacity::Bookkeeping>,
    /// Usage reports written at once: one, so reports never take every
    /// store connection from the operators and the cells' other calls (red team).
    usage_writes: tokio::sync::Semaphore,
    pub metrics: ControlMetrics,
}

impl ControlPlane {
    pub fn new(stores: Vec<GlobalStore>, settings: ControlSettings) -> Result<Arc<ControlPlane>, CellsError> {
        if stores.is_empty() {
            return Err(CellsError::Invalid { what: "control plane", why: "no store connections".into() });
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| CellsError::Invalid { what: "HTTP client", why: e.to_string() })?;
        Ok(Arc::new(ControlPlane {
            stores: StorePool::new(stores),
            settings,
            http,
            loads: RwLock::default(),
            decisions: Mutex::default(),
            capacity: Mutex::default(),
            usage_writes: tokio::sync::Semaphore::new(1),
            metrics: ControlMetrics::default(),
        }))
    }

    /// Run `f` on the store, off the async workers; store errors become API errors.
    async fn store<T: Send + 'static>(&self, f: impl FnOnce(&GlobalStore) -> Result<T, CellsError> + Send + 'static) -> Result<T, ApiError> {
        match self.stores.run(f).await {
            Ok(r) => r.map_err(store_error),
            Err(PoolError::Closed) => Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "stopping", "the control plane is stopping")),
            Err(PoolError::Panicked) => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", "a store call failed")),
        }
    }

    /// Record a decision: logged, counted, kept.
    pub fn decide(&self, kind: &'static str, cell: Option<&str>, tier: Option<Tier>, reason: String) {
        tracing::info!(kind, cell = cell.unwrap_or("-"), tier = tier.map_or("-", |t| t.as_str()), %reason, "control plane decision");
        self.metrics.decisions.get_or_create(&vec![("kind", kind.to_owned())]).inc();
        let mut d = self.decisions.lock().expect("decisions lock");
        if d.len() == MAX_DECISIONS {
            d.pop_front();
        }
        d.push_back(Decision { at_ms: sluice_core::clock::now_ms(), kind, cell: cell.map(str::to_owned), tier: tier.map(|t| t.as_str()), reason });
    }

    /// What the last scrape saw of each cell.
    /// What the last scrape saw of `cell`.
    pub fn load(&self, cell: &str) -> Option<capacity::CellLoad> {
        self.loads.read().expect("loads lock").get(cell).cloned()
    }

    pub fn loads(&self) -> BTreeMap<String, capacity::CellLoad> {
        self.loads.read().expect("loads lock").clone()
    }

    /// The recent decisions, newest last.
    pub fn decisions(&self) -> Vec<Decision> {
        self.decisions.lock().expect("decisions lock").iter().cloned().collect()
    }
}

fn store_error(e: CellsError) -> ApiError {
    match e {
        CellsError::NoWorkspace(_) | CellsError::NoCell(_) => ApiError::new(StatusCode::NOT_FOUND, "not_found", e.to_string()),
        CellsError::Invalid { .. } => ApiError::bad_request("invalid", e.to_string()),
        CellsError::Unplaceable { .. } => ApiError::new(StatusCode::CONFLICT, "unplaceable", e.to_string()),
        CellsError::Sql(_) => {
            // The details (server, database, its message) go to the log, not to callers (red team).
            tracing::warn!(error = %e, "the global store failed");
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", "the global store is unavailable; retry").retry_after(5)
        }
    }
}

type Shared = Arc<ControlPlane>;
type ApiResult = Result<Response, ApiError>;

/// The control plane's HTTP API (see the module docs and docs/CELLS.md).
pub fn app(cp: Shared, registry: Arc<Registry>) -> Router {
    let operator = Router::new()
        .route("/api/cells", get(list_cells))
        .route("/api/cells/{id}", put(put_cell))
        .route("/api/cells/{id}/state", post(set_cell_state))
        .route("/api/cells/{id}/token", post(new_cell_token))
        .route("/api/workspaces", get(list_workspaces))
        .route("/api/workspaces/{id}", put(put_workspace).get(get_workspace))
        .route("/api/workspaces/{id}/place", post(place))
        .route("/api/workspaces/{id}/override", put(set_override).delete(clear_override))
        .route("/api/workspaces/{id}/sources", post(add_source))
        .route("/api/workspaces/{id}/sources/{source}", delete(remove_source))
        .route("/api/workspaces/{id}/sources/{source}/rotate-key", post(rotate_key))
        .route("/api/workspaces/{id}/destinations/{dest}", put(put_destination).delete(delete_destination))
        .route("/api/workspaces/{id}/connections/{source}/{dest}", put(put_connection).delete(delete_connection))
        .route("/api/usage", get(usage))
        .route("/api/migrations", get(migrate::list).post(migrate::start))
        .route("/api/migrations/{id}", get(migrate::get))
        .route("/api/migrations/{id}/{action}", post(migrate::act))
        .route("/api/decisions", get(|State(cp): State<Shared>| async move { Json(json!({ "decisions": cp.decisions() })) }))
        .route_layer(axum::middleware::from_fn_with_state(cp.clone(), operator_auth));
    let cells = Router::new()
        .route("/api/cells/{id}/config", get(cell_config))
        .route("/api/cells/{id}/keys/{hash}", get(cell_key))
        .route("/api/cells/{id}/usage", post(cell_usage))
        .route("/api/cells/{id}/migrations", get(migrate::cell_tasks))
        .route("/api/cells/{id}/migrations/{m}/report", post(migrate::cell_report))
        .route("/api/cells/{id}/history/{workspace}", get(migrate::cell_history));
    let metrics_token = cp.settings.metrics_token.clone();
    let token = cp.settings.token.clone();
    Router::new()
        .merge(operator)
        .merge(cells)
        .route(
            "/healthz",
            get(|State(cp): State<Shared>| async move {
                let (idle, all) = cp.stores.idle();
                Json(json!({"status": "ok", "store_connections_idle": idle, "store_connections": all}))
            }),
        )
        // The Cells page: one self-contained page; its API calls carry the token the operator types in.
        .route(
            "/",
            get(|| async {
                (
                    [
                        (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                        (header::X_FRAME_OPTIONS, "DENY"),
                        (header::CONTENT_SECURITY_POLICY, "frame-ancestors 'none'"),
                        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
                        (header::REFERRER_POLICY, "no-referrer"),
                    ],
                    include_str!("console.html"),
                )
            }),
        )
        .route(
            "/metrics",
            get(move |h: HeaderMap| async move {
                if !sluice_ingest::tokens::metrics_allowed(&h, metrics_token.as_deref(), Some(&token)) {
                    return ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "send Authorization: Bearer <admin.metrics_token>")
                        .into_response();
                }
                ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], sluice_core::metrics::render(&registry))
                    .into_response()
            }),
        )
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint (see docs/CELLS.md)") })
        .with_state(cp)
}

async fn operator_auth(State(cp): State<Shared>, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    if bearer(req.headers()).is_some_and(|t| token_matches(t, &cp.settings.token)) {
        next.run(req).await
    } else {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "send Authorization: Bearer <control.token>").into_response()
    }
}

/// A cell's own calls: its token, for its own id.
async fn cell_auth(cp: &Shared, cell: &str, headers: &HeaderMap) -> Result<(), ApiError> {
    let refused = || ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "send Authorization: Bearer <cell.token> of this cell");
    let Some(token) = bearer(headers).map(str::to_owned) else { return Err(refused()) };
    let cell = cell.to_owned();
    if cp.store(move |s| s.cell_token_matches(&cell, &token)).await? {
        Ok(())
    } else {
        Err(refused())
    }
}

fn body<T: serde::de::DeserializeOwned>(bytes: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| ApiError::bad_request("invalid_json", format!("the body is not the expected JSON: {e}")))
}

fn ok(v: Value) -> ApiResult {
    Ok(Json(v).into_response())
}

// ---- cells ----

async fn list_cells(State(cp): State<Shared>) -> ApiResult {
    let (cells, counts) = cp.store(|s| Ok((s.cells()?, s.workspace_counts()?))).await?;
    let loads = cp.loads.read().expect("loads lock").clone();
    let out: Vec<Value> = cells
        .into_iter()
        .map(|c| {
            let n = counts.get(&c.id).copied().unwrap_or(0);
            let load = loads.get(&c.id);
            json!({ "cell": c, "workspaces": n, "load": load })
        })
        .collect();
    ok(json!({ "cells": out, "thresholds": capacity::thresholds_json(&cp.settings.thresholds) }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CellBody {
    tier: String,
    ingest_url: String,
    #[serde(default)]
    admin_url: String,
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
}

async fn put_cell(State(cp): State<Shared>, Path(id): Path<String>, raw: Bytes) -> ApiResult {
    let b: CellBody = body(&raw)?;
    let bad = |e: String| ApiError::bad_request("invalid", e);
    let ingest_url = HttpUrl::parse(&b.ingest_url).map_err(|e| bad(format!("ingest_url: {e}")))?.as_str().trim_end_matches('/').to_owned();
    let cell = Cell {
        id,
        tier: Tier::parse(&b.tier).map_err(store_error)?,
        ingest_url,
        admin_url: b.admin_url.trim_end_matches('/').to_owned(),
        state: CellState::parse(b.state.as_deref().unwrap_or("active")).map_err(store_error)?,
        attributes: b.attributes,
    };
    let c = cell.clone();
    cp.store(move |s| s.put_cell(&c)).await?;
    ok(json!({ "cell": cell }))
}

async fn set_cell_state(State(cp): State<Shared>, Path(id): Path<String>, raw: Bytes) -> ApiResult {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct B {
        state: String,
    }
    let state = CellState::parse(&body::<B>(&raw)?.state).map_err(store_error)?;
    let cell = id.clone();
    cp.store(move |s| s.set_cell_state(&cell, state)).await?;
    // An operator's word: the control plane no longer puts this cell back by itself.
    cp.capacity.lock().expect("capacity lock").auto_full.remove(&id);
    ok(json!({ "cell": id, "state": state.as_str() }))
}

async fn new_cell_token(State(cp): State<Shared>, Path(id): Path<String>) -> ApiResult {
    let token = cp.store(move |s| s.new_cell_token(&id)).await?;
    ok(json!({ "token": token, "note": "shown once: give it to the cell as cell.token" }))
}

// ---- workspaces ----

async fn list_workspaces(State(cp): State<Shared>) -> ApiResult {
    // One statement, whatever the number of workspaces (the Cells page asks every few seconds).
    let rows = cp.store(|s| s.placements()).await?;
    let rows: Vec<Value> = rows.into_iter().map(|(w, at)| json!({ "workspace": w, "served_by": at })).collect();
    ok(json!({ "workspaces": rows }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkspaceBody {
    tier: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    constraints: BTreeMap<String, String>,
    #[serde(default)]
    disabled: bool,
}

async fn put_workspace(State(cp): State<Shared>, Path(id): Path<String>, raw: Bytes) -> ApiResult {
    let b: WorkspaceBody = body(&raw)?;
    if b.name.len() > 256 || b.constraints.len() > 32 || b.constraints.iter().any(|(k, v)| k.len() > 64 || v.len() > 256) {
        return Err(ApiError::bad_request("invalid", "name: at most 256 bytes; constraints: at most 32, keys of 64 bytes, values of 256"));
    }
    let ws = Workspace { id, name: b.name, tier: Tier::parse(&b.tier).map_err(store_error)?, constraints: b.constraints, disabled: b.disabled };
    let w = ws.clone();
    cp.store(move |s| s.put_workspace(&w)).await?;
    ok(json!({ "workspace": ws }))
}

async fn get_workspace(State(cp): State<Shared>, Path(id): Path<String>) -> ApiResult {
    let (ws, at, config) = cp
        .store(move |s| {
            let ws = s.workspace(&id)?.ok_or_else(|| CellsError::NoWorkspace(id.clone()))?;
            Ok((ws, s.resolve(&id)?, s.workspace_config(&id)?))
        })
        .await?;
    ok(json!({ "workspace": ws, "served_by": at, "config": config }))
}

async fn place(State(cp): State<Shared>, Path(id): Path<String>) -> ApiResult {
    let placed = cp.store(move |s| s.place(&id)).await?;
    ok(json!({ "placement": placed }))
}

async fn set_override(State(cp): State<Shared>, Path(id): Path<String>, raw: Bytes) -> ApiResult {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct B {
        cell: String,
        #[serde(default)]
        reason: String,
    }
    let b: B = body(&raw)?;
    let reason = if b.reason.is_empty() { "set by an operator".to_owned() } else { b.reason.chars().take(256).collect() };
    let (w, c, r) = (id.clone(), b.cell.clone(), reason.clone());
    cp.store(move |s| s.set_override(&w, &c, &r)).await?;
    ok(json!({ "workspace": id, "cell": b.cell, "reason": reason }))
}

async fn clear_override(State(cp): State<Shared>, Path(id): Path<String>) -> ApiResult {
    let had = cp.store(move |s| s.clear_override(&id)).await?;
    ok(json!({ "removed": had }))
}

async fn add_source(State(cp): State<Shared>, Path(workspace): Path<String>, raw: Bytes) -> ApiResult {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct B {
        id: String,
    }
    let b: B = body(&raw)?;
    let key = new_token("wk");
    let (w, source, k) = (workspace.clone(), b.id.clone(), key.clone());
    if !cp.store(move |s| s.add_write_key(&k, &w, &source)).await? {
        return Err(ApiError::new(StatusCode::CONFLICT, "conflict", "that write key exists already; try again"));
    }
    let resp = json!({ "workspace": workspace, "source": b.id, "write_key": key, "note": "shown once: the store keeps only its SHA-256" });
    Ok((StatusCode::CREATED, Json(resp)).into_response())
}

async fn remove_source(State(cp): State<Shared>, Path((workspace, source)): Path<(String, String)>) -> ApiResult {
    if !cp.store(move |s| s.remove_source(&workspace, &source)).await? {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", "the workspace has no such source"));
    }
    ok(json!({ "removed": true }))
}

async fn rotate_key(State(cp): State<Shared>, Path((workspace, source)): Path<(String, String)>) -> ApiResult {
    let key = new_token("wk");
    let k = key.clone();
    if !cp.store(move |s| s.rotate_write_key(&workspace, &source, &k)).await? {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", "the workspace has no such source"));
    }
    ok(json!({ "write_key": key, "note": "shown once; the old key stops working within seconds" }))
}

async fn put_destination(State(cp): State<Shared>, Path((workspace, dest)): Path<(String, String)>, raw: Bytes) -> ApiResult {
    let mut config: Value = body(&raw)?;
    let Some(obj) = config.as_object_mut() else { return Err(ApiError::bad_request("invalid", "a destination is a JSON object")) };
    obj.entry("id").or_insert_with(|| Value::String(dest.clone()));
    // The cell sets it from the workspace that owns the destination.
    obj.remove("workspace");
    if obj.get("allow_private_network") == Some(&Value::Bool(true)) && !cp.settings.allow_private_network {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "private_network_refused",
            "allow_private_network lets a workspace reach the cells' own network; the control plane refuses it \
             (control.allow_private_network_destinations)",
        ));
    }
    let c = config.clone();
    cp.store(move |s| s.put_destination(&workspace, &dest, &c)).await?;
    ok(json!({ "destination": config }))
}

async fn delete_destination(State(cp): State<Shared>, Path((workspace, dest)): Path<(String, String)>) -> ApiResult {
    if !cp.store(move |s| s.delete_destination(&workspace, &dest)).await? {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", "the workspace has no such destination"));
    }
    ok(json!({ "removed": true }))
}

async fn put_connection(State(cp): State<Shared>, Path((workspace, source, dest)): Path<(String, String, String)>) -> ApiResult {
    let (s2, d2) = (source.clone(), dest.clone());
    cp.store(move |s| s.put_connection(&workspace, &s2, &d2)).await?;
    ok(json!({ "source": source, "destination": dest }))
}

async fn delete_connection(State(cp): State<Shared>, Path((workspace, source, dest)): Path<(String, String, String)>) -> ApiResult {
    if !cp.store(move |s| s.delete_connection(&workspace, &source, &dest)).await? {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such connection"));
    }
    ok(json!({ "removed": true }))
}

// ---- usage ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UsageQuery {
    workspace: String,
    /// Unix seconds or RFC 3339; default: 24 hours ago.
    from: Option<String>,
    /// Unix seconds or RFC 3339 (exclusive); default: now.
    to: Option<String>,
}

/// The latest time a usage query may name (year 5138): far past any row, far from overflowing.
const MAX_TIME: i64 = 100_000_000_000;

/// A time as unix seconds: a number, or RFC 3339; from 0 to [`MAX_TIME`].
pub fn parse_time(text: &str) -> Result<i64, String> {
    let t = match text.trim().parse::<i64>() {
        Ok(n) => n,
        Err(_) => chrono::DateTime::parse_from_rfc3339(text.trim())
            .map(|t| t.timestamp())
            .map_err(|_| format!("{text:?}: unix seconds or an RFC 3339 time"))?,
    };
    if (0..=MAX_TIME).contains(&t) {
        Ok(t)
    } else {
        Err(format!("{text:?}: a time from 1970 on"))
    }
}

async fn usage(State(cp): State<Shared>, Query(q): Query<UsageQuery>) -> ApiResult {
    let now = sluice_core::clock::now_ms() / 1000;
    let from = q.from.as_deref().map(parse_time).transpose().map_err(|e| ApiError::bad_request("invalid", e))?.unwrap_or(now - 86_400);
    let to = q.to.as_deref().map(parse_time).transpose().map_err(|e| ApiError::bad_request("invalid", e))?.unwrap_or(now + 1);
    // Rows are per hour: the hour `from` falls in counts.
    let from = from - from.rem_euclid(3600);
    let workspace = q.workspace.clone();
    let rows = cp.store(move |s| s.usage(&workspace, from, to)).await?;
    ok(usage_json(&q.workspace, from, to, &rows))
}

/// Usage rows and their totals per metric (and per destination for deliveries).
pub fn usage_json(workspace: &str, from: i64, to: i64, rows: &[UsageRow]) -> Value {
    let mut totals: BTreeMap<String, i64> = BTreeMap::new();
    for r in rows {
        let key = if r.destination.is_empty() { r.metric.clone() } else { format!("{}/{}", r.metric, r.destination) };
        // Rows are bounded (`MAX_USAGE_VALUE`); saturating all the same, never wrapping.
        let total = totals.entry(key).or_default();
        *total = total.saturating_add(r.value);
    }
    json!({ "workspace": workspace, "from": from, "to": to, "totals": totals, "hours": rows })
}

// ---- the cells' own calls ----

async fn cell_config(State(cp): State<Shared>, Path(id): Path<String>, headers: HeaderMap) -> ApiResult {
    cell_auth(&cp, &id, &headers).await?;
    let feed = cp.store(move |s| s.cell_feed(&id)).await?;
    let (text, etag) = feed.body_and_etag();
    let etag = format!("\"{etag}\"");
    if headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) == Some(etag.as_str()) {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
    }
    Ok(([(header::CONTENT_TYPE, "application/json".to_owned()), (header::ETAG, etag)], text).into_response())
}

async fn cell_key(State(cp): State<Shared>, Path((id, hash)): Path<(String, String)>, headers: HeaderMap) -> ApiResult {
    cell_auth(&cp, &id, &headers).await?;
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(&hash, &mut bytes).map_err(|_| ApiError::bad_request("invalid", "a key hash is 64 hex digits"))?;
    // Another cell's key (a workspace moved away, a stale router) is said apart from an unknown one,
    // so the cell answers 421, not 401.
    match cp.store(move |s| s.key_place(&id, &bytes)).await? {
        KeyPlace::Here => ok(json!({ "served": true })),
        KeyPlace::Elsewhere => Err(ApiError::new(StatusCode::CONFLICT, "elsewhere", "another cell serves that key's workspace")),
        KeyPlace::Unknown => Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", "no workspace this cell serves has that key")),
    }
}

/// The most rows one usage report may carry.
const MAX_REPORT_ROWS: usize = 100_000;

async fn cell_usage(State(cp): State<Shared>, Path(id): Path<String>, headers: HeaderMap, raw: Bytes) -> ApiResult {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct B {
        report_id: String,
        rows: Vec<UsageRow>,
    }
    cell_auth(&cp, &id, &headers).await?;
    let b: B = body(&raw)?;
    if b.rows.len() > MAX_REPORT_ROWS {
        return Err(ApiError::bad_request("too_many_rows", format!("a report holds at most {MAX_REPORT_ROWS} rows")));
    }
    let cell = id.clone();
    let _turn =
        cp.usage_writes.acquire().await.map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "stopping", "the control plane is stopping"))?;
    let outcome = cp.store(move |s| s.record_usage(&id, &b.report_id, &b.rows)).await?;
    cp.metrics.usage_reports.get_or_create(&vec![("outcome", if outcome.counted { "counted" } else { "repeat" }.to_owned())]).inc();
    if outcome.counted && !outcome.refused.is_empty() {
        tracing::warn!(%cell, refused = ?outcome.refused, "a cell reported usage of workspaces it does not serve; those rows were left out");
    }
    ok(json!({ "counted": outcome.counted, "refused_workspaces": outcome.refused }))
}
