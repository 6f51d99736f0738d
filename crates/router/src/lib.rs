//! `sluice router`: the edge of a cell deployment (issue 14; DESIGN.md §5).
//! It speaks the Tracking API, finds the workspace a request's write key
//! belongs to and the one cell that serves that workspace, forwards the
//! request there unchanged, and returns the cell's answer.
//!
//! Per request:
//! 1. The body is read whole, within ingest's limits (a request may be sent
//!    again after a cell's `421`, or split between two cells while its
//!    workspace moves). The write key: HTTP Basic auth (as the SDKs send
//!    it), else `writeKey` in the body (analytics.js), read from a decoded
//!    copy (gzip inflated); the body forwarded is the original bytes.
//! 2. Key → workspace → cell through (a) the in-process cache, (b) the
//!    global store on a miss, (c) placement for a workspace with no cell
//!    yet (a conditional insert: racing routers agree).
//! 3. Forward to the cell's Tracking API over pooled keep-alive
//!    connections, with `X-Sluice-Cell`. A workspace moving between cells
//!    is routed per event by its messageId's bucket (`split.rs`).
//!
//! Invariants:
//! - A workspace is only ever sent to the cell the store names. A cell
//!   that does not answer gets its workspaces a `503` with `Retry-After`
//!   (the SDKs retry), never another cell: deduplication is per cell.
//! - The cache never outlives a mapping change by more than one poll
//!   (`mapping_version`, every [`RouterSettings::poll_every`]): a change
//!   empties it, and a lookup that started before the change does not
//!   write its (possibly stale) answer into the emptied cache.
//! - Unknown keys are answered exactly as ingest answers them (`401`,
//!   `invalid_write_key`), and cached as unknown, within a bounded cache.
//! - Errors are JSON with `code` and `message`, as ingest's are.
//! - A cell's `421` never reaches the client (the SDKs drop events on a
//!   4xx): the router routes again from the store until
//!   `router.cutover_wait`, then answers `503` (the SDKs retry).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use prometheus_client::metrics::histogram::exponential_buckets;
use sluice_cells::store::key_hash;
use sluice_cells::{CellsError, GlobalStore, PoolError, StorePool};
use sluice_core::config::UnknownWriteKey;
use sluice_core::metrics::{Counter, Family, Gauge, Histogram, Registry};
use sluice_core::Shutdown;
use sluice_ingest::request::{
    basic_auth_key, call_for_path, collect_body, decode_body, encoding, method_not_allowed, not_found, too_large, unknown_write_key, ApiError, Call,
};
use sluice_ingest::IngestSettings;

pub mod split;
use split::{Side, SplitPlan};

/// The header that tells a cell which cell the router meant it to be.
pub const CELL_HEADER: &str = "x-sluice-cell";

/// The router's settings.
#[derive(Debug, Clone)]
pub struct RouterSettings {
    /// Body limits and read timeout: ingest's, so the router refuses what a cell would.
    pub ingest: IngestSettings,
    /// How often the mapping version is read (the cache follows within this).
    pub poll_every: Duration,
    /// How long a cell may take to answer a forwarded request.
    pub forward_timeout: Duration,
    /// `Retry-After` (s) when a cell or the store cannot be reached.
    pub retry_after: u64,
    /// Cache entries (known and unknown keys) before the cache is emptied.
    pub max_cache_entries: usize,
    /// Cache misses waiting for the store at once; more are answered 503.
    pub max_waiting_lookups: usize,
    /// How long a request of a moving workspace may wait out a cutover before it is answered 503.
    pub cutover_wait: Duration,
}

impl RouterSettings {
    /// `[router]`, `[ingest]` and `[server]` of `config`.
    pub fn from_config(config: &sluice_core::Config) -> RouterSettings {
        let r = &config.router;
        RouterSettings {
            ingest: IngestSettings::from_config(config),
            poll_every: r.poll_interval,
            forward_timeout: r.forward_timeout,
            retry_after: r.retry_after.as_secs().max(1),
            max_cache_entries: r.cache_entries.get(),
            max_waiting_lookups: r.max_waiting_lookups.get(),
            cutover_wait: r.cutover_wait,
        }
    }
}

type Labels = Vec<(&'static str, String)>;

/// The router's metrics.
#[derive(Clone)]
pub struct RouterMetrics {
    /// Routing decisions by path: `hit` (cache), `miss` (store), `new` (placed now), `unknown` (no such key),
    /// `busy` (too many lookups waiting: answered 503).
    pub decisions: Family<Labels, Counter>,
    /// Time to decide where a request goes, by path.
    pub decision_seconds: Family<Labels, Histogram>,
    /// Requests forwarded, by cell and the cell's status (`unreachable`: no answer).
    pub forwarded: Family<Labels, Counter>,
    /// Entries in the cache.
    pub cache_entries: Gauge,
    /// Mapping changes seen (each empties the cache).
    pub mapping_changes: Counter,
    /// Requests with an unknown or missing write key answered 200 and
    /// dropped (`ingest.unknown_write_key = "accept_and_drop"`).
    pub unknown_key_dropped: Counter,
    /// Times a request of a moving workspace waited for a cutover (or routed again after a cell's 421).
    pub cutover_waits: Counter,
    /// Batches of a moving workspace split between its two cells.
    pub split_batches: Counter,
}

impl Default for RouterMetrics {
    fn default() -> Self {
        RouterMetrics {
            decisions: Family::default(),
            // 1 µs to ~40 s in steps of 25%: a cache hit is microseconds, a
            // new placement milliseconds, and a p99 read from the buckets
            // is within a quarter of the truth (`sluice bench router`).
            decision_seconds: Family::new_with_constructor(|| Histogram::new(exponential_buckets(1e-6, 1.25, 80))),
            forwarded: Family::default(),
            cache_entries: Gauge::default(),
            mapping_changes: Counter::default(),
            unknown_key_dropped: Counter::default(),
            cutover_waits: Counter::default(),
            split_batches: Counter::default(),
        }
    }
}

impl RouterMetrics {
    pub fn register(&self, r: &mut Registry) {
        let r = r.sub_registry_with_prefix("sluice_router");
        r.register("decisions", "Routing decisions by path: hit, miss, new, unknown", self.decisions.clone());
        r.register("decision_seconds", "Time to decide where a request goes, by path", self.decision_seconds.clone());
        r.register("forwarded", "Requests forwarded, by cell and the cell's status (unreachable: no answer)", self.forwarded.clone());
        r.register("cache_entries", "Write keys in the routing cache", self.cache_entries.clone());
        r.register("mapping_changes", "Mapping changes seen (each empties the cache)", self.mapping_changes.clone());
        r.register(
            "unknown_key_dropped_requests",
            "Requests with an unknown or missing write key answered 200 and dropped (ingest.unknown_write_key = accept_and_drop)",
            self.unknown_key_dropped.clone(),
        );
        r.register(
            "cutover_waits",
            "Times a request of a moving workspace waited for a cutover, or was routed again after a cell's 421",
            self.cutover_waits.clone(),
        );
        r.register("split_batches", "Batches of a moving workspace split between its two cells", self.split_batches.clone());
    }

    /// Decisions so far on `path`.
    pub fn decided(&self, path: &str) -> u64 {
        self.decisions.get_or_create(&vec![("path", path.to_owned())]).get()
    }
}

/// Where a write key goes.
#[derive(Debug, Clone)]
enum Route {
    /// No such key.
    Unknown,
    /// The key's workspace is disabled.
    Disabled { workspace: String },
    Cell {
        workspace: String,
        cell: String,
        ingest_url: String,
        /// While the workspace moves: where its moved buckets go.
        split: Option<Arc<Split>>,
    },
}

/// A moving workspace's split (docs/plans/MIGRATION.md).
#[derive(Debug)]
struct Split {
    target_cell: String,
    /// `None`: the target is not listed or is retired (its buckets are answered 503).
    target_url: Option<String>,
    moved: sluice_core::BucketSet,
    fenced: sluice_core::BucketSet,
}

#[derive(Default)]
struct Cache {
    routes: HashMap<[u8; 32], Route>,
    /// Bumped when the cache is emptied: a lookup that began under an older
    /// generation does not store its answer.
    generation: u64,
}

/// The router: its store, cache, HTTP client and metrics.
pub struct CellRouter {
    /// Connections to the store for lookups, taken one per lookup: one slow
    /// placement holds one of them, not every lookup (red team).
    stores: StorePool,
    /// The mapping version is read on a connection of its own: lookups
    /// queued on the other (a flood of unknown keys) cannot delay it.
    version_store: Arc<GlobalStore>,
    /// Lookups waiting for the store; past [`RouterSettings::max_waiting_lookups`]
    /// a miss is answered 503 at once instead of queueing without bound.
    lookups: tokio::sync::Semaphore,
    /// Gzip bodies being inflated at once (to find a body's write key).
    decodes: Arc<tokio::sync::Semaphore>,
    cache: RwLock<Cache>,
    client: reqwest::Client,
    settings: RouterSettings,
    pub metrics: RouterMetrics,
    /// The mapping version the cache is valid for.
    version: AtomicU64,
    /// Whether the last mapping-version read succeeded (`/healthz`).
    store_reachable: AtomicBool,
}

impl CellRouter {
    /// A router over `stores` (handles on one store, each its own
    /// connection, used by lookups one at a time) and `version_store`
    /// (another, for the mapping-version poll).
    pub fn new(stores: Vec<GlobalStore>, version_store: GlobalStore, settings: RouterSettings) -> Result<Arc<CellRouter>, CellsError> {
        if stores.is_empty() {
            return Err(CellsError::Invalid { what: "router", why: "no store connections".into() });
        }
        let client = reqwest::Client::builder()
            .pool_idle_timeout(Duration::from_secs(60))
            .connect_timeout(Duration::from_secs(5))
            .timeout(settings.forward_timeout)
            // A cell's redirect is its answer to the client, not the router's to follow.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| CellsError::Invalid { what: "HTTP client", why: e.to_string() })?;
        let version = version_store.mapping_version()?;
        Ok(Arc::new(CellRouter {
            stores: StorePool::new(stores),
            decodes: Arc::new(tokio::sync::Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get()) * 2)),
            version_store: Arc::new(version_store),
            lookups: tokio::sync::Semaphore::new(settings.max_waiting_lookups),
            cache: RwLock::new(Cache::default()),
            client,
            settings,
            metrics: RouterMetrics::default(),
            version: AtomicU64::new(version as u64),
            store_reachable: AtomicBool::new(true),
        }))
    }

    /// Follow the mapping version until `stop`: a change empties the cache.
    pub fn spawn_mapping_watch(self: &Arc<Self>, stop: Shutdown) -> tokio::task::JoinHandle<()> {
        let router = self.clone();
        tokio::spawn(async move {
            let mut failing = false;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(router.settings.poll_every) => {}
                    _ = stop.wait() => return,
                }
                let store = router.version_store.clone();
                let read = tokio::task::spawn_blocking(move || store.mapping_version()).await;
                router.store_reachable.store(matches!(read, Ok(Ok(_))), Ordering::Relaxed);
                match read {
                    Ok(Ok(v)) => {
                        if failing {
                            tracing::info!("the global store answers again");
                            failing = false;
                        }
                        if v as u64 != router.version.load(Ordering::SeqCst) {
                            router.invalidate(v as u64);
                        }
                    }
                    Ok(Err(e)) if !failing => {
                        // The cache keeps serving what it knows; misses fail until the store is back.
                        tracing::warn!(error = %e, "cannot read the mapping version; the cache keeps its entries");
                        failing = true;
                    }
                    _ => {}
                }
            }
        })
    }

    /// Empty the cache: the mapping is now at `version`.
    fn invalidate(&self, version: u64) {
        let mut cache = self.cache.write().expect("cache lock");
        cache.routes.clear();
        cache.generation += 1;
        self.version.store(version, Ordering::SeqCst);
        self.metrics.cache_entries.set(0);
        self.metrics.mapping_changes.inc();
    }

    /// Where `key` goes: the cache, else the store (placing the workspace if needed).
    async fn route(&self, key: &str) -> Result<Route, ApiError> {
        let started = Instant::now();
        let hash = key_hash(key);
        let (cached, generation) = {
            let cache = self.cache.read().expect("cache lock");
            (cache.routes.get(&hash).cloned(), cache.generation)
        };
        if let Some(route) = cached {
            self.decided(if matches!(route, Route::Unknown) { "unknown" } else { "hit" }, started);
            return Ok(route);
        }
        let Ok(_waiting) = self.lookups.try_acquire() else {
            self.decided("busy", started);
            return Err(unavailable("routing is busy; retry", 1));
        };
        let (key, retry_after) = (key.to_owned(), self.settings.retry_after);
        let (route, path) = match self.stores.run(move |store| lookup(store, &key, retry_after)).await {
            Ok(found) => found?,
            Err(PoolError::Closed) => return Err(unavailable("the router is stopping", 1)),
            Err(PoolError::Panicked) => return Err(unavailable("the routing lookup failed", self.settings.retry_after)),
        };
        {
            let mut cache = self.cache.write().expect("cache lock");
            if cache.generation == generation {
                if cache.routes.len() >= self.settings.max_cache_entries {
                    // Bounded: a flood of made-up keys empties it rather than growing it.
                    cache.routes.clear();
                }
                cache.routes.insert(hash, route.clone());
                self.metrics.cache_entries.set(cache.routes.len() as i64);
            }
        }
        self.decided(path, started);
        Ok(route)
    }

    /// Drop `key`'s cached route: a cell said it is stale (421), or a cutover is being waited out.
    fn forget(&self, key: &str) {
        let mut cache = self.cache.write().expect("cache lock");
        if cache.routes.remove(&key_hash(key)).is_some() {
            self.metrics.cache_entries.set(cache.routes.len() as i64);
        }
    }

    fn decided(&self, path: &str, started: Instant) {
        let labels = vec![("path", path.to_owned())];
        self.metrics.decisions.get_or_create(&labels).inc();
        self.metrics.decision_seconds.get_or_create(&labels).observe(started.elapsed().as_secs_f64());
    }
}

fn unavailable(message: &str, retry_after: u64) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message).retry_after(retry_after)
}

/// The store's answer for `key`, and the decision path (`miss`, `new`, `unknown`). Blocks.
/// `retry_after`: the wait a store outage asks for (a workspace no cell
/// can take asks for a minute: that needs an operator).
fn lookup(store: &GlobalStore, key: &str, retry_after: u64) -> Result<(Route, &'static str), ApiError> {
    let store_down = |e: CellsError| {
        tracing::warn!(error = %e, "the global store cannot be read; answering 503");
        unavailable("routing is unavailable; retry", retry_after)
    };
    // One statement for a known key of a placed workspace; three more to place one.
    let Some(found) = store.route_key(key).map_err(store_down)? else { return Ok((Route::Unknown, "unknown")) };
    let workspace = match found.workspace {
        Some(ws) if !ws.disabled => ws,
        // Disabled, or the key names a workspace that is gone.
        _ => return Ok((Route::Disabled { workspace: found.workspace_id }, "miss")),
    };
    let (placed, cell) = match found.served {
        Some(served) => served,
        None => match store.place_new(&workspace) {
            Ok(p) => p,
            Err(CellsError::Unplaceable { workspace, reason }) => {
                tracing::error!(%workspace, %reason, "a workspace cannot be placed on any cell; its requests are answered 503");
                return Err(unavailable("no cell can serve this workspace yet; retry later", 60));
            }
            Err(e) => return Err(store_down(e)),
        },
    };
    let Some(cell) = cell else {
        tracing::error!(workspace = %workspace.id, cell = %placed.cell, "a workspace is assigned to a cell the store does not list");
        return Err(unavailable("this workspace's cell is unknown; retry later", 60));
    };
    if cell.state == sluice_cells::CellState::Retired {
        // Red team: a retired cell got its workspaces' traffic on; it may be gone, or answer as nobody's.
        tracing::error!(workspace = %workspace.id, cell = %cell.id, "a workspace is served by a retired cell; its requests are answered 503 until it is moved");
        return Err(unavailable("this workspace's cell is retired; retry later", 60));
    }
    let path = if placed.new { "new" } else { "miss" };
    let split = found.split.map(|s| {
        let target_url = s.target.filter(|t| t.state != sluice_cells::CellState::Retired).map(|t| t.ingest_url);
        Arc::new(Split { target_cell: s.target_cell, target_url, moved: s.moved, fenced: s.fenced })
    });
    Ok((Route::Cell { workspace: workspace.id, cell: cell.id, ingest_url: cell.ingest_url, split }, path))
}

/// The router's HTTP front: the Tracking API's paths.
pub fn app(router: Arc<CellRouter>) -> Router {
    Router::new()
        .route("/v1/{call}", post(handle))
        .route("/v1/{call}/", post(handle))
        .fallback(|| async { not_found(None) })
        .method_not_allowed_fallback(|| async { method_not_allowed() })
        .with_state(router)
        .layer(axum::middleware::from_fn(sluice_ingest::cors::middleware))
}

/// The router's admin port: `/metrics` (behind `admin.metrics_token` when
/// set) and `/healthz`. `/healthz` answers 200 while the process serves,
/// and says whether the store answers: a router serves its cached
/// workspaces through a store outage, so an outage is not unhealthy.
pub fn admin_app(router: Arc<CellRouter>, registry: Arc<Registry>, metrics_token: Option<String>, token: Option<String>) -> Router {
    let tokens = Arc::new((metrics_token, token));
    Router::new()
        .route(
            "/metrics",
            axum::routing::get(move |h: HeaderMap| async move {
                if !sluice_ingest::tokens::metrics_allowed(&h, tokens.0.as_deref(), tokens.1.as_deref()) {
                    return ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "send Authorization: Bearer <admin.metrics_token>")
                        .into_response();
                }
                ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], sluice_core::metrics::render(&registry))
                    .into_response()
            }),
        )
        .route(
            "/healthz",
            axum::routing::get(move || async move {
                let store = if router.store_reachable.load(Ordering::Relaxed) { "ok" } else { "unreachable" };
                let (idle, all) = router.stores.idle();
                let body = serde_json::json!({
                    "status": "ok",
                    "store": store,
                    "store_connections_idle": idle,
                    "store_connections": all,
                    "mapping_version": router.version.load(Ordering::SeqCst),
                    "cache_entries": router.metrics.cache_entries.get(),
                });
                axum::Json(body)
            }),
        )
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "the router's admin port serves /metrics and /healthz").into_response()
        })
}

/// Request headers a cell needs; the rest (hop-by-hop, `Host`) are the router's.
const FORWARDED_HEADERS: [HeaderName; 6] =
    [header::AUTHORIZATION, header::CONTENT_TYPE, header::CONTENT_ENCODING, header::CONTENT_LENGTH, header::USER_AGENT, header::ORIGIN];

async fn handle(State(router): State<Arc<CellRouter>>, call: Result<Path<String>, PathRejection>, headers: HeaderMap, body: Body) -> Response {
    let Ok(Path(call)) = call else {
        return not_found(None).into_response();
    };
    // analytics.js's own telemetry: read within the limits and answered
    // here, as ingest does (nothing is stored, no key is needed).
    if call == "m" {
        return match collect_body(&router.settings.ingest, &headers, body).await {
            Ok(Some(_)) => sluice_ingest::request::success(),
            Ok(None) => too_large(&router.settings.ingest).into_response(),
            Err(e) => e.into_response(),
        };
    }
    let Some(kind) = call_for_path(&call) else {
        return not_found(Some(&call)).into_response();
    };
    match forward(&router, &call, kind, headers, body).await {
        Ok(resp) => resp,
        Err(e) => e.into_response(),
    }
}

/// How long a request waits for a cutover between polls of the store.
const CUTOVER_POLL: Duration = Duration::from_millis(25);

async fn forward(router: &CellRouter, call: &str, kind: Call, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let settings = &router.settings.ingest;
    // The body is read whole (within ingest's limits): a request may have to be sent
    // again (a cell's 421 after a mapping change) or split between two cells.
    let (raw, decoded) = read_body(router, &headers, body).await?;
    // The key: Basic auth, else the body's `writeKey`.
    let key = match basic_auth_key(&headers) {
        Some(key) => Some(key),
        None => body_write_key(kind, &decoded)?,
    };
    // An unknown key is answered as ingest answers it: 401, or under
    // `accept_and_drop` 200 with nothing stored (as Segment does).
    let unknown = |present: bool| {
        if settings.unknown_write_key == UnknownWriteKey::AcceptAndDrop {
            router.metrics.unknown_key_dropped.inc();
            Ok(sluice_ingest::request::success())
        } else {
            Err(unknown_write_key(present))
        }
    };
    let Some(key) = key else { return unknown(false) };
    // A cutover is waited out, and a cell's 421 (its gate or its mapping is
    // ahead of this router's) routed again, within `router.cutover_wait`:
    // requests in a cutover wait, they do not fail.
    let deadline = Instant::now() + router.settings.cutover_wait;
    loop {
        let version = router.version.load(Ordering::SeqCst);
        let route = router.route(&key).await?;
        let (workspace, cell, ingest_url, split) = match route {
            Route::Unknown => return unknown(true),
            Route::Disabled { workspace } => {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "workspace_disabled",
                    format!("workspace {workspace:?} is disabled; its events are not accepted"),
                ))
            }
            Route::Cell { workspace, cell, ingest_url, split } => (workspace, cell, ingest_url, split),
        };
        let answer = match &split {
            None => Some(send(router, &workspace, &cell, &ingest_url, call, &headers, reqwest::Body::from(raw.clone()), true).await?),
            Some(split) => {
                let target = || {
                    split.target_url.clone().ok_or_else(|| {
                        tracing::error!(%workspace, target = %split.target_cell, "a workspace is moving to a cell that is not listed or is retired; its moved buckets are answered 503");
                        unavailable("this workspace's cell is unavailable; retry later", router.settings.retry_after)
                    })
                };
                match split::plan(kind, &decoded, split.moved, split.fenced)? {
                    SplitPlan::Wait => None,
                    SplitPlan::Whole(Side::Source) => {
                        Some(send(router, &workspace, &cell, &ingest_url, call, &headers, reqwest::Body::from(raw.clone()), true).await?)
                    }
                    SplitPlan::Whole(Side::Target) => {
                        let url = target()?;
                        Some(send(router, &workspace, &split.target_cell, &url, call, &headers, reqwest::Body::from(raw.clone()), true).await?)
                    }
                    SplitPlan::Parts { source, target: to_target } => {
                        let url = target()?;
                        router.metrics.split_batches.inc();
                        // The target's part first: while the target is down the source's part is not
                        // stored again with every retry of the client (red team: events without a
                        // messageId were stored once per retry).
                        let b = send(router, &workspace, &split.target_cell, &url, call, &headers, reqwest::Body::from(to_target), false).await?;
                        if !b.status().is_success() && b.status() != StatusCode::BAD_REQUEST {
                            Some(b)
                        } else {
                            let a = send(router, &workspace, &cell, &ingest_url, call, &headers, reqwest::Body::from(source), false).await?;
                            Some(combine(a, b))
                        }
                    }
                }
            }
        };
        if answer.as_ref().is_some_and(|a| a.status() != StatusCode::MISDIRECTED_REQUEST) {
            return Ok(answer.expect("checked"));
        }
        if Instant::now() >= deadline {
            // Never a 421 to the client: the SDKs drop events on a 4xx. A 503 makes them retry.
            return Err(unavailable("this workspace is moving between cells; retry", 1));
        }
        router.metrics.cutover_waits.inc();
        if answer.is_some() {
            // A cell's 421: this router's answer for the key is stale; ask the store again.
            tokio::time::sleep(CUTOVER_POLL).await;
            router.forget(&key);
        } else {
            // Fenced: wait for the mapping to change (the cache is emptied then), not the store
            // once per waiting request (review: a busy workspace's fence exhausted the lookups).
            while router.version.load(Ordering::SeqCst) == version && Instant::now() < deadline {
                tokio::time::sleep(CUTOVER_POLL).await;
            }
        }
    }
}

/// The answer to a batch split in two: acknowledged only when both parts
/// are. A part the client must send again (5xx, 429, a 421 to route again)
/// wins: the client resends the whole batch, and the part that was stored
/// is dropped by its cell as a repeat (events with a messageId; one
/// without has no identity to recognise it by, here as after any timeout).
/// Otherwise a `400` of one part (none of its events valid) gives way to
/// the other's `200`, as ingest answers a batch with some valid events.
fn combine(a: Response, b: Response) -> Response {
    let retry = |r: &Response| !r.status().is_success() && r.status() != StatusCode::BAD_REQUEST;
    match (a.status().is_success(), b.status().is_success()) {
        _ if retry(&a) => a,
        _ if retry(&b) => b,
        (true, _) => a,
        (false, true) => b,
        (false, false) => a,
    }
}

/// Read a body within ingest's limits, and inflate it if it is compressed.
async fn read_body(router: &CellRouter, headers: &HeaderMap, body: Body) -> Result<(Bytes, Bytes), ApiError> {
    let settings = &router.settings.ingest;
    let enc = encoding(headers)?;
    let raw = collect_body(settings, headers, body).await?.ok_or_else(|| too_large(settings))?;
    let decoded = if enc == sluice_ingest::request::Encoding::Identity {
        raw.clone()
    } else {
        // Bounded like ingest's: a flood of gzip bodies takes a few cores, never every one.
        let _permit = router.decodes.acquire().await.map_err(|_| unavailable("the router is stopping", 1))?;
        let (s, raw) = (settings.clone(), raw.clone());
        tokio::task::spawn_blocking(move || decode_body(&s, enc, raw)).await.map_err(|_| unavailable("the request could not be read; retry", 1))??
    };
    Ok((raw, decoded))
}

/// Forward one body to `cell` and relay its answer. `as_sent`: the body is
/// the client's own bytes (its `Content-Encoding` and `Content-Length` go
/// with it); else a part the router built (plain JSON).
#[allow(clippy::too_many_arguments)]
async fn send(
    router: &CellRouter,
    workspace: &str,
    cell: &str,
    ingest_url: &str,
    call: &str,
    headers: &HeaderMap,
    body: reqwest::Body,
    as_sent: bool,
) -> Result<Response, ApiError> {
    let url = format!("{}/v1/{call}", ingest_url.trim_end_matches('/'));
    let mut request = router.client.post(&url).body(body);
    for name in FORWARDED_HEADERS {
        if !as_sent && (name == header::CONTENT_ENCODING || name == header::CONTENT_LENGTH) {
            continue;
        }
        for value in headers.get_all(&name) {
            request = request.header(&name, value);
        }
    }
    request = request.header(CELL_HEADER, cell);
    let count = |status: &str| router.metrics.forwarded.get_or_create(&vec![("cell", cell.to_owned()), ("status", status.to_owned())]).inc();
    let answer = match request.send().await {
        Ok(a) => a,
        Err(e) => {
            count("unreachable");
            tracing::warn!(%cell, %workspace, error = %e, "a cell did not answer; its workspace's request is answered 503");
            return Err(unavailable(&format!("cell {cell} is unavailable; retry"), router.settings.retry_after));
        }
    };
    let status = answer.status();
    // A Sluice cell confirms with the header (ingest's `confirm_cell`); anything else is not one.
    if answer.headers().get(CELL_HEADER).map(HeaderValue::as_bytes) != Some(cell.as_bytes()) {
        count("not_a_cell");
        tracing::warn!(%cell, %status, "a cell's ingest_url answered, but not as that Sluice cell (no X-Sluice-Cell confirming it); answered 503");
        return Err(unavailable(&format!("cell {cell} is unavailable; retry"), router.settings.retry_after));
    }
    let mut out = Response::builder().status(status.as_u16());
    for name in [header::CONTENT_TYPE, header::RETRY_AFTER, header::LOCATION] {
        if let Some(v) = answer.headers().get(&name) {
            out = out.header(name, v);
        }
    }
    let bytes = match read_answer(answer).await {
        Ok(b) => b,
        Err(why) => {
            count("unreachable");
            tracing::warn!(%cell, error = %why, "a cell's answer could not be relayed; answered 503");
            return Err(unavailable(&format!("cell {cell} is unavailable; retry"), router.settings.retry_after));
        }
    };
    count(status.as_str());
    let mut resp = out.body(Body::from(bytes)).unwrap_or_else(|_| StatusCode::BAD_GATEWAY.into_response());
    resp.headers_mut().insert(HeaderName::from_static(CELL_HEADER), HeaderValue::from_str(cell).unwrap_or(HeaderValue::from_static("?")));
    Ok(resp)
}

/// The most of a cell's answer the router relays: ingest's answers are a
/// few hundred bytes; more means the URL points at something else.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// A cell's answer body, read to its end within [`MAX_ANSWER_BYTES`].
async fn read_answer(mut answer: reqwest::Response) -> Result<Bytes, String> {
    if let Some(n) = answer.content_length().filter(|n| *n > MAX_ANSWER_BYTES as u64) {
        return Err(format!("an answer of {n} bytes (more than {MAX_ANSWER_BYTES}): is the cell's ingest_url a Sluice Tracking API?"));
    }
    let mut out = bytes::BytesMut::new();
    while let Some(chunk) = answer.chunk().await.map_err(|e| e.to_string())? {
        if out.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(format!("an answer of more than {MAX_ANSWER_BYTES} bytes: is the cell's ingest_url a Sluice Tracking API?"));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out.freeze())
}

/// `writeKey` at the top of a JSON body, read as ingest reads it (the
/// last one when it repeats; a batch body through the batch parser), if it
/// is a string; a body ingest could not parse gets ingest's answer.
fn body_write_key(kind: Call, body: &Bytes) -> Result<Option<String>, ApiError> {
    let text = std::str::from_utf8(body).map_err(|e| ApiError::bad_request("invalid_json", format!("body is not UTF-8: {e}")))?;
    let invalid_json = |e: serde_json::Error| ApiError::bad_request("invalid_json", format!("body is not a JSON object: {e}"));
    let fields = match kind {
        Call::Batch => sluice_ingest::event::BatchBody::parse(text).map_err(invalid_json)?.fields,
        Call::Single(_) => sluice_ingest::event::RawObject::parse(text).map_err(invalid_json)?,
    };
    Ok(fields.get_str("writeKey").map(|k| k.into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_split_batch_is_acknowledged_only_when_both_parts_are() {
        let r = |code: u16| Response::builder().status(code).body(Body::empty()).unwrap();
        let combined = |a: u16, b: u16| combine(r(a), r(b)).status().as_u16();
        assert_eq!(combined(200, 200), 200);
        assert_eq!(combined(200, 503), 503, "the client resends the whole batch");
        assert_eq!(combined(429, 200), 429);
        assert_eq!(combined(421, 200), 421, "routed again by the caller");
        assert_eq!(combined(200, 400), 200, "a part with no valid event does not fail the batch (as ingest)");
        assert_eq!(combined(400, 200), 200);
        assert_eq!(combined(400, 503), 503);
        assert_eq!(combined(400, 400), 400);
    }

    #[test]
    fn the_body_write_key_is_read_as_ingest_reads_it() {
        let key = |body: &'static [u8]| body_write_key(Call::Batch, &Bytes::from_static(body)).map_err(|e| e.status().as_u16());
        assert_eq!(key(br#"{"writeKey":"wk","batch":[]}"#), Ok(Some("wk".to_owned())));
        assert_eq!(key(br#"{"writeKey":"a","batch":[],"writeKey":"b"}"#), Ok(Some("b".to_owned())), "the last, as ingest");
        assert_eq!(key(br#"{"batch":[{"writeKey":"inner"}]}"#), Ok(None));
        assert_eq!(key(br#"{"writeKey":5}"#), Ok(None));
        assert_eq!(key(br#"{"writeKey":""}"#), Ok(Some(String::new())), "present: ingest says unknown, not missing");
        assert_eq!(key(b"not json"), Err(400));
        assert_eq!(key(b"{\"writeKey\":\"\xff\"}"), Err(400), "not UTF-8");
    }
}
