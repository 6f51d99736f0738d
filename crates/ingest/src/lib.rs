//! The Tracking API: Segment's HTTP ingestion endpoints, answered only once
//! the events are durable in the log.
//!
//! Invariants:
//! - `200 {"success":true}` is sent only after every accepted event of the
//!   request is durable in the `input` topic (the first commit point). Any
//!   failure to append answers 503, and the client's retry (same
//!   `messageId`) is removed later by dedup.
//! - Every response, error or not, is JSON; errors carry both `code` and
//!   `message`.
//! - An invalid item in a batch is dropped and counted; the rest is kept.
//! - Events go to partition `murmur2(messageId) % partitions`, with record
//!   key `<source id>/<messageId>` (source ids cannot contain `/`).

pub mod budget;
pub mod cors;
pub mod event;
pub mod gate;
pub mod ratelimit;
pub mod request;
pub mod server;
pub mod spool;
pub mod tls;
pub mod tokens;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use chrono::Utc;
use serde_json::value::RawValue;
use sluice_core::config::{is_hashed_write_key, Config, SourceConfig, UnknownWriteKey, HASHED_WRITE_KEY};
use sluice_core::metrics::{latency_buckets, Counter, Family, Histogram, Registry};
use sluice_core::{partition_for, BucketSet};
use sluice_log::{Log, Record};

use crate::event::{BatchContext, EventError, EventLimits, RawObject};
use crate::ratelimit::TokenBucket;
pub use crate::request::ApiError;
use crate::request::{
    basic_auth_key, call_for_path, collect_body, decode_body, encoding, method_not_allowed, not_found, success, too_large, unknown_write_key, Call,
    Encoding,
};

/// The topic ingest writes to.
pub use sluice_core::topics::INPUT as INPUT_TOPIC;

/// A source as ingest sees it.
pub struct Source {
    pub id: String,
    /// Its workspace (`default` for a single-tenant config).
    pub workspace: String,
    limiter: Option<TokenBucket>,
    /// (rate, burst) the limiter was made with, to keep it across updates.
    limits: (u32, u32),
}

/// Ingest settings taken from [`Config`].
#[derive(Debug, Clone)]
pub struct IngestSettings {
    pub unknown_write_key: UnknownWriteKey,
    pub max_request_bytes: usize,
    pub max_event_bytes: usize,
    pub max_batch_events: usize,
    pub body_read_timeout: Duration,
    /// `cell.id`: a request a router meant for another cell (`X-Sluice-Cell`) gets `421`.
    pub cell: Option<String>,
}

impl IngestSettings {
    /// The most one request may write to the log, all its events as stored:
    /// twice the body limit (normalization adds ~150 bytes per event; a
    /// batch `context` merged into every item must not multiply a request).
    pub fn max_stored_bytes(&self) -> usize {
        self.max_request_bytes.saturating_mul(2)
    }

    pub fn from_config(c: &Config) -> Self {
        Self {
            unknown_write_key: c.ingest.unknown_write_key,
            max_request_bytes: c.ingest.max_request_bytes,
            max_event_bytes: c.ingest.max_event_bytes,
            max_batch_events: c.ingest.max_batch_events.get(),
            body_read_timeout: c.server.body_read_timeout,
            cell: c.cell.id.clone(),
        }
    }
}

type Labels = Vec<(&'static str, String)>;

/// Ingest's metrics.
#[derive(Clone)]
pub struct IngestMetrics {
    /// Requests by call and HTTP status.
    pub requests: Family<Labels, Counter>,
    /// Events made durable, by source.
    pub events_accepted: Family<Labels, Counter>,
    /// Events refused (dropped from a batch or refused alone), by reason code.
    pub events_rejected: Family<Labels, Counter>,
    /// Events answered 200 and dropped because their write key is unknown.
    pub events_unknown_key_dropped: Counter,
    /// Time from the request's arrival to its 200.
    pub ack_seconds: Histogram,
}

impl Default for IngestMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            events_accepted: Family::default(),
            events_rejected: Family::default(),
            events_unknown_key_dropped: Counter::default(),
            ack_seconds: Histogram::new(latency_buckets()),
        }
    }
}

impl IngestMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("sluice_ingest");
        r.register("requests", "Tracking API requests by call and status", self.requests.clone());
        r.register("events_accepted", "Events durable in the input log, by source", self.events_accepted.clone());
        r.register("events_rejected", "Invalid events refused or dropped from a batch, by reason", self.events_rejected.clone());
        r.register("events_unknown_key_dropped", "Events answered 200 and dropped for an unknown write key", self.events_unknown_key_dropped.clone());
        r.register("ack_seconds", "Time from request arrival to a durable 200", self.ack_seconds.clone());
        r.register(
            "client_error_budget_held",
            "Requests held and answered 429 because their client spent its error budget (server.client_error_budget)",
            budget::held_total().clone(),
        );
    }

    /// Count of rejected events with reason `code` (for tests and the console).
    pub fn rejected(&self, code: &str) -> u64 {
        self.events_rejected.get_or_create(&vec![("reason", code.to_owned())]).get()
    }

    pub fn accepted(&self, source: &str) -> u64 {
        self.events_accepted.get_or_create(&vec![("source", source.to_owned())]).get()
    }
}

/// Asked about a write key ingest does not know before the request is
/// refused: a cell whose control plane may have placed the key's workspace
/// here a moment ago (the router forwards its first request at once).
#[async_trait::async_trait]
pub trait KeyResolver: Send + Sync {
    /// Whether the sources may now hold `key`. Bounded in time; a key asked
    /// about recently may be answered from memory.
    async fn resolve(&self, key: &str) -> Resolution;
}

/// A [`KeyResolver`]'s answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// The key is this cell's, and the sources now hold it: look again.
    Known,
    /// Nobody knows the key: refuse it (`401`, or dropped under `accept_and_drop`).
    Unknown,
    /// Whether the key is this cell's cannot be told now (the control plane
    /// does not answer, or too many questions wait): `503`, and the SDK
    /// retries. A `401` would make it drop a valid workspace's events.
    Unavailable,
    /// The key is another cell's (its workspace moved there): `421`, so a
    /// router with a stale mapping routes again instead of the client
    /// dropping the events on a `401`.
    Elsewhere,
}

/// Everything a request handler needs.
pub struct Ingest {
    log: Arc<dyn Log>,
    partitions: u32,
    settings: IngestSettings,
    /// Write key → source. Behind a lock so sources can change at run time.
    sources: RwLock<Sources>,
    /// Bodies over [`PARSE_INLINE_MAX_BYTES`] parsed at once: half the cores.
    large_bodies: tokio::sync::Semaphore,
    pub metrics: IngestMetrics,
    resolver: std::sync::OnceLock<Arc<dyn KeyResolver>>,
    /// Which events of moving workspaces this cell accepts.
    pub gate: gate::BucketGate,
}

impl Ingest {
    pub fn new(log: Arc<dyn Log>, settings: IngestSettings, sources: &[SourceConfig], default_rate_limit: u32) -> Result<Self, sluice_log::LogError> {
        let partitions = log.partitions(INPUT_TOPIC)?;
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let large_bodies = tokio::sync::Semaphore::new((cores / 2).max(1));
        let ingest = Self {
            log,
            partitions,
            settings,
            sources: RwLock::new(Sources::default()),
            large_bodies,
            metrics: IngestMetrics::default(),
            resolver: std::sync::OnceLock::new(),
            gate: gate::BucketGate::default(),
        };
        ingest.set_sources(sources, default_rate_limit);
        Ok(ingest)
    }

    /// Replace the set of sources (write keys and rate limits). A source
    /// whose key, id and limits are unchanged keeps its token bucket, so an
    /// update never refills anyone's rate limit.
    pub fn set_sources(&self, sources: &[SourceConfig], default_rate_limit: u32) {
        let mut current = self.sources.write().expect("sources lock");
        let default_ws = sluice_core::config::DEFAULT_WORKSPACE.to_owned();
        let map: HashMap<String, Arc<Source>> = sources
            .iter()
            .map(|s| {
                let rate = s.rate_limit.unwrap_or(default_rate_limit);
                let limits = (rate, s.rate_burst.unwrap_or(rate));
                let source = match current.by_key.get(&s.write_key) {
                    Some(old) if old.id == s.id && old.limits == limits && Some(&old.workspace) == s.workspace.as_ref().or(Some(&default_ws)) => {
                        old.clone()
                    }
                    _ => {
                        let limiter = (rate > 0).then(|| TokenBucket::new(limits.0, limits.1));
                        let workspace = s.workspace.clone().unwrap_or_else(|| default_ws.clone());
                        Arc::new(Source { id: s.id.clone(), workspace, limiter, limits })
                    }
                };
                (s.write_key.clone(), source)
            })
            .collect();
        let hashed = map.keys().any(|k| is_hashed_write_key(k));
        *current = Sources { by_key: map, hashed };
    }

    /// Ask `resolver` about unknown write keys before refusing them (once; later calls change nothing).
    pub fn set_key_resolver(&self, resolver: Arc<dyn KeyResolver>) {
        let _ = self.resolver.set(resolver);
    }

    /// The source `write_key` names, asking the resolver (if any) when it
    /// is unknown; `503` when the resolver cannot tell.
    async fn source_or_resolve(&self, write_key: &str) -> Result<Option<Arc<Source>>, ApiError> {
        if let Some(s) = self.source(write_key) {
            return Ok(Some(s));
        }
        let Some(r) = self.resolver.get().filter(|_| !write_key.contains(':')) else { return Ok(None) };
        match r.resolve(write_key).await {
            Resolution::Known => Ok(self.source(write_key)),
            Resolution::Unknown => Ok(None),
            Resolution::Unavailable => {
                Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "this cell cannot check the write key right now; retry")
                    .retry_after(5))
            }
            Resolution::Elsewhere => {
                Err(ApiError::new(StatusCode::MISDIRECTED_REQUEST, "wrong_cell", "this write key's workspace is served by another cell; route again"))
            }
        }
    }

    /// The source `write_key` names: the key itself, else (when some source
    /// is given as `sha256:<hex>`) its SHA-256.
    fn source(&self, write_key: &str) -> Option<Arc<Source>> {
        // No real key holds a ':' (a body's writeKey could): a presented
        // "sha256:…" must not match a hashed source without the key itself.
        if write_key.contains(':') {
            return None;
        }
        let sources = self.sources.read().expect("sources lock");
        if let Some(s) = sources.by_key.get(write_key) {
            return Some(s.clone());
        }
        if !sources.hashed {
            return None;
        }
        sources.by_key.get(&hashed_write_key(write_key)).cloned()
    }
}

/// The sources by write key (as configured: the key, or `sha256:<hex>`).
#[derive(Default)]
struct Sources {
    by_key: HashMap<String, Arc<Source>>,
    /// Some key is given as its SHA-256: a key not found as itself is hashed and looked up again.
    hashed: bool,
}

/// `sha256:<hex>` of `key`: how a source can name its key without holding it.
pub fn hashed_write_key(key: &str) -> String {
    use sha2::Digest;
    format!("{HASHED_WRITE_KEY}{:x}", sha2::Sha256::digest(key.as_bytes()))
}

/// The Tracking API router (axum's `fn app() -> Router` pattern).
pub fn router(ingest: Arc<Ingest>) -> Router {
    Router::new()
        .route("/v1/{call}", post(handle))
        .route("/v1/{call}/", post(handle))
        .route("/v1/m", post(client_telemetry))
        .fallback(|| async { not_found(None) })
        .method_not_allowed_fallback(|| async { method_not_allowed() })
        .with_state(ingest)
        .layer(axum::middleware::from_fn(cors::middleware))
}

/// `POST /v1/m`: analytics.js reports its own telemetry (error and
/// delivery counters) here, as to Segment's API. Read within the body
/// limits and answered 200; nothing is stored.
async fn client_telemetry(State(ingest): State<Arc<Ingest>>, headers: HeaderMap, body: Body) -> Response {
    match collect_body(&ingest.settings, &headers, body).await {
        Ok(Some(_)) => success(),
        Ok(None) => too_large(&ingest.settings).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn handle(State(ingest): State<Arc<Ingest>>, call: Result<Path<String>, PathRejection>, headers: HeaderMap, body: Body) -> Response {
    // A segment that is not UTF-8 once percent-decoded names no endpoint;
    // answer it in JSON rather than with axum's plain-text rejection.
    let Ok(Path(call)) = call else {
        return not_found(None).into_response();
    };
    let started = Instant::now();
    if let Some(cell) = &ingest.settings.cell {
        if let Some(meant) = headers.get("x-sluice-cell").filter(|v| v.as_bytes() != cell.as_bytes()) {
            // A router's mapping names another cell: accepting would put the workspace's events
            // in two cells (deduplication is per cell). The router answers the client 503 and retries.
            tracing::warn!(this_cell = %cell, meant = %String::from_utf8_lossy(meant.as_bytes()), "a request meant for another cell; refused with 421");
            let resp = ApiError::new(StatusCode::MISDIRECTED_REQUEST, "wrong_cell", format!("this is cell {cell:?}, not the one the router meant"))
                .into_response();
            ingest.metrics.requests.get_or_create(&vec![("call", "unknown".to_owned()), ("status", "421".to_owned())]).inc();
            return resp;
        }
    }
    // Only known calls become label values: a client must not be able to
    // create metric series at will.
    let parsed = call_for_path(&call);
    let label = if parsed.is_some() { call.clone() } else { "unknown".to_owned() };
    let resp = match parsed {
        Some(call) => {
            // A trace span per request (exported only when built with the `otel` feature and enabled).
            let span = tracing::debug_span!("ingest.request", call = %label);
            match tracing::Instrument::instrument(accept(&ingest, call, &headers, body), span).await {
                Ok(()) => {
                    ingest.metrics.ack_seconds.observe(started.elapsed().as_secs_f64());
                    success()
                }
                Err(e) => e.into_response(),
            }
        }
        None => not_found(Some(&call)).into_response(),
    };
    ingest.metrics.requests.get_or_create(&vec![("call", label), ("status", resp.status().as_u16().to_string())]).inc();
    confirm_cell(&ingest.settings, &headers, resp)
}

/// A request from a cell router (`X-Sluice-Cell`) to a cell with a
/// `cell.id` gets that id back on every answer of ingest's own: the router
/// takes an answer without its cell's id as not from that cell (a URL
/// pointing at another server, or at a Sluice that is not a cell) and
/// answers 503, so no other server's 200 or 400 reaches the client as the
/// cell's. A Sluice without `cell.id` confirms nothing (red team: it
/// echoed the router's header, so any Sluice passed for any cell).
fn confirm_cell(settings: &IngestSettings, headers: &HeaderMap, mut resp: Response) -> Response {
    if let (Some(_), Some(id)) = (headers.get("x-sluice-cell"), &settings.cell) {
        if let Ok(value) = http::HeaderValue::from_str(id) {
            resp.headers_mut().insert("x-sluice-cell", value);
        }
    }
    resp
}

/// Bodies larger than this are parsed and normalized on the blocking pool,
/// so a large request never holds an async worker for long.
const PARSE_INLINE_MAX_BYTES: usize = 64 * 1024;

/// Where the request's write key came from.
enum Auth {
    /// HTTP Basic: already looked up (`None`: unknown key).
    Header(Option<Arc<Source>>),
    /// Not in a header: `writeKey` in the body, if any.
    Body,
    /// The body's key, looked up again after the resolver was asked (`None`: still unknown).
    Resolved(Option<Arc<Source>>),
}

/// What a request turned into, before the log appends.
enum Prepared {
    /// The body names a key ingest does not know and a resolver may: ask it, then prepare again.
    Unresolved(String),
    /// Unknown write key under `accept_and_drop`: answer 200, store nothing.
    Dropped,
    Records {
        source: Arc<Source>,
        by_partition: HashMap<u32, Vec<Record>>,
        accepted: usize,
        /// The buckets of its events, for the gate.
        buckets: gate::RequestBuckets,
    },
}

/// Parse and normalize `raw` (inline, or on the blocking pool when large or
/// compressed). `unresolved`: a body key ingest does not know comes back as
/// [`Prepared::Unresolved`] instead of being refused.
async fn prepare_body(ingest: &Arc<Ingest>, call: Call, auth: Auth, raw: Bytes, encoding: Encoding, unresolved: bool) -> Result<Prepared, ApiError> {
    if raw.len() > PARSE_INLINE_MAX_BYTES || encoding == Encoding::Gzip {
        // Large or compressed bodies queue for a bounded number of blocking
        // threads: a flood of them takes at most those cores, never every one.
        let _permit = ingest.large_bodies.acquire().await.map_err(|_| internal_error())?;
        let ingest = ingest.clone();
        tokio::task::spawn_blocking(move || guarded(|| prepare(&ingest, call, auth, &decode_body(&ingest.settings, encoding, raw)?, unresolved)))
            .await
            .unwrap_or_else(|_| Err(internal_error()))
    } else {
        guarded(|| prepare(ingest, call, auth, &raw, unresolved))
    }
}

fn internal_error() -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", "the request could not be processed; nothing was stored")
}

/// Run `work`, turning a panic into a 500: one bad request never takes the
/// connection, or any other request, with it.
fn guarded<T>(work: impl FnOnce() -> Result<T, ApiError>) -> Result<T, ApiError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).unwrap_or_else(|_| {
        tracing::error!("panic while reading a request; answered 500 (a bug: please report it)");
        Err(internal_error())
    })
}

async fn accept(ingest: &Arc<Ingest>, call: Call, headers: &HeaderMap, body: Body) -> Result<(), ApiError> {
    let settings = &ingest.settings;
    // With the key in a header, authenticate before any JSON work: an
    // unknown key costs reading (and discarding) a bounded body, no parse.
    let auth = match basic_auth_key(headers) {
        Some(key) => Auth::Header(ingest.source_or_resolve(&key).await?),
        None => Auth::Body,
    };
    if matches!(auth, Auth::Header(None)) && settings.unknown_write_key == UnknownWriteKey::Reject {
        let _ = collect_body(settings, headers, body).await;
        return Err(unknown_write_key(true));
    }
    let encoding = encoding(headers);
    let raw = collect_body(settings, headers, body).await?.ok_or_else(|| too_large(settings))?;
    let encoding = encoding?;
    let body_key = matches!(auth, Auth::Body);
    let mut prepared = prepare_body(ingest, call, auth, raw.clone(), encoding, body_key && ingest.resolver.get().is_some()).await?;
    if let Prepared::Unresolved(key) = &prepared {
        // A body's key ingest does not know: asked about, then the body is read again.
        let found = ingest.source_or_resolve(key).await?;
        prepared = prepare_body(ingest, call, Auth::Resolved(found), raw, encoding, false).await?;
    }
    let Prepared::Records { source, by_partition, accepted, buckets } = prepared else { return Ok(()) };
    // Held until the appends are durable: closing a bucket waits for this request (the fence).
    let _admitted = ingest.gate.admit(&source.workspace, buckets).await.map_err(|refused| {
        ApiError::new(
            StatusCode::MISDIRECTED_REQUEST,
            "moved",
            if refused.is_empty() {
                format!(
                    "workspace {:?} is moving between cells and its events without a messageId are not this cell's now; route again",
                    source.workspace
                )
            } else {
                format!("workspace {:?} is moving between cells and buckets {refused} are not this cell's now; route again", source.workspace)
            },
        )
    })?;
    let appends = by_partition.into_iter().map(|(p, recs)| ingest.log.append(INPUT_TOPIC, p, recs));
    for result in futures_util::future::join_all(appends).await {
        if let Err(e) = result {
            append_errors::failed(&e);
            return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "events could not be stored; retry").retry_after(5));
        }
    }
    append_errors::succeeded();
    ingest.metrics.events_accepted.get_or_create(&vec![("source", source.id.clone())]).inc_by(accepted as u64);
    Ok(())
}

/// Failed log appends, logged without flooding: under load on a full disk
/// or a lost log every request fails the same way, so the first failure of
/// a run is logged in full, later ones summarized every [`LOG_EVERY`].
mod append_errors {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Mutex, OnceLock};
    use std::time::{Duration, Instant};

    use sluice_core::retry::{ErrorStreak, Report};

    const LOG_EVERY: Duration = Duration::from_secs(10);
    /// A run ends at a success at least this long after its last failure
    /// (one broken partition among working ones is one run, not a run per
    /// request).
    const QUIET_TO_END: Duration = Duration::from_secs(1);
    static FAILING: AtomicBool = AtomicBool::new(false);

    /// The run, and the time of its last failure.
    fn streak() -> &'static Mutex<(ErrorStreak, Option<Instant>)> {
        static STREAK: OnceLock<Mutex<(ErrorStreak, Option<Instant>)>> = OnceLock::new();
        STREAK.get_or_init(|| Mutex::new((ErrorStreak::new(LOG_EVERY), None)))
    }

    pub(super) fn failed(e: &sluice_log::LogError) {
        FAILING.store(true, Ordering::Relaxed);
        let now = Instant::now();
        let mut st = streak().lock().expect("append errors");
        st.1 = Some(now);
        match st.0.failure(now) {
            Report::First => tracing::error!(error = %e, "log append failed; answering 503 (further failures summarized every 10 s)"),
            Report::Summary { failures, failing_for } => {
                tracing::error!(error = %e, failures, failing_for = ?failing_for, "log appends still failing; answering 503")
            }
            Report::Quiet => {}
        }
    }

    pub(super) fn succeeded() {
        if !FAILING.load(Ordering::Relaxed) {
            return;
        }
        let now = Instant::now();
        let mut st = streak().lock().expect("append errors");
        if st.1.is_some_and(|t| now.saturating_duration_since(t) >= QUIET_TO_END) {
            FAILING.store(false, Ordering::Relaxed);
            st.1 = None;
            if let Some(r) = st.0.success(now) {
                tracing::info!(failures = r.failures, failing_for = ?r.failing_for, "log appends work again");
            }
        }
    }
}

/// Parse, authenticate (body key), rate-limit and normalize a request into
/// records by partition. Synchronous and linear in the body's size.
fn prepare(ingest: &Ingest, call: Call, auth: Auth, bytes: &[u8], unresolved: bool) -> Result<Prepared, ApiError> {
    let settings = &ingest.settings;
    let text = std::str::from_utf8(bytes).map_err(|e| ApiError::bad_request("invalid_json", format!("body is not UTF-8: {e}")))?;
    let invalid_json = |e: serde_json::Error| ApiError::bad_request("invalid_json", format!("body is not a JSON object: {e}"));
    // One pass over the body: a batch is split into raw items here and each
    // item parsed once below.
    let (body, batch_items) = match call {
        Call::Batch => {
            let parsed = event::BatchBody::parse(text).map_err(invalid_json)?;
            (parsed.fields, Some(parsed.batch))
        }
        Call::Single(_) => {
            // The body is the event: past the event limit, no need to parse.
            if text.len() > settings.max_event_bytes {
                let e = EventError::TooLarge { size: text.len(), limit: settings.max_event_bytes };
                ingest.metrics.events_rejected.get_or_create(&vec![("reason", e.code().to_owned())]).inc();
                return Err(ApiError::bad_request(e.code(), e.to_string()));
            }
            (RawObject::parse(text).map_err(invalid_json)?, None)
        }
    };

    // Authenticate before looking at events.
    let (source, key_present) = match auth {
        Auth::Header(found) | Auth::Resolved(found) => (found, true),
        Auth::Body => match body.get_str("writeKey") {
            Some(key) => match ingest.source(&key) {
                None if unresolved => return Ok(Prepared::Unresolved(key.into_owned())),
                found => (found, true),
            },
            None => (None, false),
        },
    };
    let Some(source) = source else {
        if settings.unknown_write_key == UnknownWriteKey::AcceptAndDrop {
            let n = match &batch_items {
                None => 1,
                Some(Some(Ok(items))) => items.len(),
                Some(_) => 0,
            };
            ingest.metrics.events_unknown_key_dropped.inc_by(n as u64);
            return Ok(Prepared::Dropped);
        }
        return Err(unknown_write_key(key_present));
    };

    let (items, batch_ctx): (Vec<&RawValue>, BatchContext) = match batch_items {
        Some(batch) => {
            let items = match batch {
                None => return Err(ApiError::bad_request("invalid_batch", "`batch` is missing")),
                Some(Err(())) => return Err(ApiError::bad_request("invalid_batch", "`batch` must be an array of events")),
                Some(Ok(items)) => items,
            };
            if items.len() > settings.max_batch_events {
                return Err(ApiError::bad_request(
                    "batch_too_large",
                    format!("batch holds {} events; the limit is {}", items.len(), settings.max_batch_events),
                ));
            }
            (items, BatchContext::from_body(&body))
        }
        None => (Vec::new(), BatchContext::default()),
    };
    let n_items = if call == Call::Batch { items.len() } else { 1 };
    if let Some(limiter) = &source.limiter {
        if let Err(wait) = limiter.try_take(n_items as u32) {
            let e =
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", format!("source {:?} is over its rate limit; retry later", source.id));
            return Err(e.retry_after(wait.as_secs_f64().ceil().max(1.0) as u64));
        }
    }

    let received_at = Utc::now();
    let limits = EventLimits { max_event_bytes: settings.max_event_bytes };
    let max_stored = settings.max_stored_bytes();
    let mut stored = 0usize;
    let mut by_partition: HashMap<u32, Vec<Record>> = HashMap::new();
    let mut buckets = gate::RequestBuckets::default();
    let mut push = |ev: event::NormalizedEvent| -> Result<(), ApiError> {
        // What one request may store is bounded, whatever the batch-level
        // context multiplies: the answer is all or nothing.
        stored += ev.json.len();
        if stored > max_stored {
            return Err(ApiError::bad_request(
                "request_too_large",
                format!("the events as stored (batch context merged into each) exceed {max_stored} bytes"),
            ));
        }
        let partition = partition_for(&ev.message_id, ingest.partitions);
        if ev.client_id {
            buckets.buckets = buckets.buckets.union(BucketSet::of(sluice_core::bucket_for(&ev.message_id)));
        } else {
            buckets.free = true;
        }
        let key = Bytes::from(format!("{}/{}", source.id, ev.message_id));
        by_partition.entry(partition).or_default().push(Record { key, value: Bytes::from(ev.json) });
        Ok(())
    };
    let reject = |e: &EventError| ingest.metrics.events_rejected.get_or_create(&vec![("reason", e.code().to_owned())]).inc();
    match call {
        Call::Single(path_type) => {
            let ev = event::normalize(&body, bytes.len(), Some(path_type), &batch_ctx, received_at, limits).map_err(|e| {
                reject(&e);
                ApiError::bad_request(e.code(), e.to_string())
            })?;
            push(ev)?;
        }
        Call::Batch => {
            let mut first_error = None;
            // Refusals counted per reason once per request, not per item (a
            // batch of 2,500 bad items costs one metric update per reason).
            let mut rejected: Vec<(&'static str, u64)> = Vec::new();
            for (i, raw) in items.iter().enumerate() {
                // A panic on one item (a bug) refuses that item only.
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    if raw.get().len() > limits.max_event_bytes {
                        return Err(EventError::TooLarge { size: raw.get().len(), limit: limits.max_event_bytes });
                    }
                    RawObject::parse(raw.get())
                        .map_err(|_| EventError::NotAnObject)
                        .and_then(|item| event::normalize(&item, raw.get().len(), None, &batch_ctx, received_at, limits))
                }))
                .unwrap_or_else(|_| {
                    tracing::error!(source = %source.id, item = i, "panic while normalizing a batch item; item refused (a bug: please report it)");
                    Err(EventError::Internal)
                });
                match result {
                    Ok(ev) => push(ev)?,
                    Err(e) => {
                        match rejected.iter_mut().find(|(code, _)| *code == e.code()) {
                            Some((_, n)) => *n += 1,
                            None => rejected.push((e.code(), 1)),
                        }
                        tracing::debug!(source = %source.id, item = i, error = %e, "dropped invalid batch item");
                        first_error.get_or_insert((i, e));
                    }
                }
            }
            for (code, n) in rejected {
                ingest.metrics.events_rejected.get_or_create(&vec![("reason", code.to_owned())]).inc_by(n);
            }
            if by_partition.is_empty() {
                if let Some((i, e)) = first_error {
                    return Err(ApiError::bad_request(e.code(), format!("no valid event in the batch; item {i}: {e}")));
                }
            }
        }
    }
    let accepted = by_partition.values().map(Vec::len).sum();
    Ok(Prepared::Records { source, by_partition, accepted, buckets })
}
