//! `sluice-admin`: the admin port of a Sluice process: `/metrics`,
//! `/healthz`, the admin API under `/api`, and the web console at `/`
//! (`console.html`, self-contained). The binary builds an [`AdminState`],
//! serves [`router`] on `admin.listen` and starts
//! [`spawn_catalog_refresher`]; nothing here parses arguments or reads the
//! config file.
//!
//! Invariants:
//! - Every `/api` route needs `Authorization: Bearer <admin.token>`; without
//!   a configured token the API answers 403 and changes nothing.
//! - `/metrics` is public unless `admin.metrics_token` is set; then it needs
//!   that token or `admin.token` (it names every source and destination).
//!   `/healthz` and the console page stay public (the console's API calls
//!   carry the token the operator types in).
//! - Tokens are compared through fixed-size digests (`token_matches`): the
//!   time taken shows neither the token's bytes nor its length.
//! - A change is written to the control database first, then the live
//!   catalog (and the Tracking API's source table) is refreshed from it
//!   before the answer: a 2xx means the change is in effect.
//! - Rows the API writes are marked `origin = 'api'`; the config file seeds
//!   the initial state but never overwrites them.
//! - The job inspector (`GET /api/jobs/{key}`) reads the JobDBs wherever
//!   they live (files or `deliver.jobdb_url`), through the same
//!   [`sluice_deliver::inspect::find_in`] as `sluice jobs inspect`.
//! - Every error answer is JSON `{"code","message"}` (see `harden`).

mod functions;
mod plans;
pub mod refresh;
pub mod views;

pub use refresh::{apply_sources, spawn_catalog_refresher};

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use sluice_core::config::{DestinationConfig, RetryPolicy, SourceConfig};
use sluice_core::metrics::{render, Registry};
use sluice_deliver::backend::JobDbs;
use sluice_deliver::control::ControlDb;
use sluice_deliver::gate::Qos;
use sluice_deliver::Catalog;
use sluice_ingest::tokens::{bearer, metrics_allowed, token_matches};
use sluice_ingest::Ingest;

/// What the admin API works on.
pub struct AdminState {
    pub registry: Arc<Registry>,
    pub log: Arc<dyn sluice_log::Log>,
    /// This process's JobDBs (`data_dir/jobs`, or `deliver.jobdb_url`), for the job inspector.
    pub jobdbs: JobDbs,
    pub catalog: Arc<Catalog>,
    /// The Tracking API of this process, if it runs the ingest role.
    pub ingest: Option<Arc<Ingest>>,
    pub token: Option<String>,
    /// `admin.metrics_token`: when set, `/metrics` needs it (or `token`).
    pub metrics_token: Option<String>,
    pub default_rate_limit: u32,
    pub retry_policy: RetryPolicy,
    /// `server.body_read_timeout`: an `/api` request body not received
    /// within it is answered 408.
    pub body_read_timeout: std::time::Duration,
}

/// Largest `/api` request body (axum's default limit for `Json`).
const API_BODY_LIMIT: usize = 2 << 20;

type Shared = Arc<AdminState>;

/// Every route of the admin port, behind the `/api` guard and the answer
/// hardening (the two middlewares below).
pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/", get(console))
        .route("/console", get(console))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { ([(header::CONTENT_TYPE, "application/json")], r#"{"status":"ok"}"#) }))
        .route("/api/sources", get(list_sources).post(create_source))
        .route("/api/sources/{id}/rotate-key", post(rotate_key))
        .route("/api/sources/{id}/disable", post(disable_source))
        .route("/api/sources/{id}/enable", post(enable_source))
        .route("/api/sources/{id}/tracking-plan", get(plans::get_plan).put(plans::put_plan).delete(plans::delete_plan))
        .route("/api/sources/{id}/tracking-plan/import", post(plans::import_plan))
        .route("/api/sources/{id}/tracking-plan/check", post(plans::check_event))
        .route("/api/sources/{id}/function", put(functions::attach_to_source).delete(functions::detach_from_source))
        .route("/api/functions", get(functions::list))
        .route("/api/functions/{id}", get(functions::get).put(functions::deploy).delete(functions::delete))
        .route("/api/functions/{id}/restore", post(functions::restore))
        .route("/api/functions/{id}/test", post(functions::test))
        .route("/api/destinations", get(list_destinations))
        .route("/api/destinations/{id}", put(put_destination).delete(delete_destination))
        .route("/api/connections", get(list_connections).post(create_connection))
        .route("/api/connections/{source}/{destination}", axum::routing::delete(delete_connection))
        .route("/api/qos", get(list_qos))
        .route("/api/qos/{destination}", put(put_qos))
        .route("/api/replays", post(create_replay))
        .route("/api/replays/{id}", get(get_replay))
        .route("/api/dead-letters", get(list_dead_letters))
        .route("/api/dead-letters/replay", post(replay_all_dead_letters))
        .route("/api/dead-letters/discard", post(discard_all_dead_letters))
        .route("/api/dead-letters/{id}", get(get_dead_letter))
        .route("/api/dead-letters/{id}/replay", post(replay_dead_letter))
        .route("/api/dead-letters/{id}/discard", post(discard_dead_letter))
        .route("/api/jobs/{key}", get(inspect_jobs))
        .route("/api/events", get(recent_events))
        .route("/api/events/{partition}/{offset}", get(get_event))
        .with_state(state.clone())
        .layer(axum::middleware::from_fn_with_state(state, guard_api))
        .layer(axum::middleware::from_fn(harden))
}

/// `/api` requests are authorized from their headers before any of the body
/// is read (a client without the token cannot make the port wait for, or
/// buffer, a body), and the body must arrive within `body_read_timeout`
/// (408) and fit [`API_BODY_LIMIT`] (413), as on the Tracking API.
async fn guard_api(State(s): State<Shared>, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    if !req.uri().path().starts_with("/api") {
        return next.run(req).await;
    }
    if let Err(e) = authorize(&s, req.headers()) {
        return e.into_response();
    }
    if matches!(*req.method(), axum::http::Method::GET | axum::http::Method::HEAD) {
        return next.run(req).await;
    }
    let announced = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > API_BODY_LIMIT as u64) {
        return ApiError(StatusCode::PAYLOAD_TOO_LARGE, "too_large", format!("request body over {API_BODY_LIMIT} bytes")).into_response();
    }
    let (parts, body) = req.into_parts();
    let bytes = match tokio::time::timeout(s.body_read_timeout, axum::body::to_bytes(body, API_BODY_LIMIT)).await {
        Err(_) => return ApiError(StatusCode::REQUEST_TIMEOUT, "body_timeout", "request body not received in time".into()).into_response(),
        Ok(Err(_)) => {
            return ApiError(StatusCode::PAYLOAD_TOO_LARGE, "too_large", format!("request body over {API_BODY_LIMIT} bytes, or cut off"))
                .into_response()
        }
        Ok(Ok(b)) => b,
    };
    next.run(axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes))).await
}

/// Every answer of the admin port: an error is JSON `{"code","message"}`
/// whoever produced it (an unknown path, a wrong method, an extractor's
/// rejection of a path or query parameter: axum answers those in plain
/// text or with no body); and the headers that keep the console out of
/// frames and stop browsers sniffing types. API answers (write keys,
/// events) are not cached.
async fn harden(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let api = req.uri().path().starts_with("/api");
    let mut resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|t| t.starts_with("application/json"));
    if (status.is_client_error() || status.is_server_error()) && !is_json {
        let allow = resp.headers().get(header::ALLOW).cloned();
        let retry_after = resp.headers().get(header::RETRY_AFTER).cloned();
        let text = axum::body::to_bytes(std::mem::take(resp.body_mut()), 4096).await.unwrap_or_default();
        let text = String::from_utf8_lossy(&text).trim().to_owned();
        let (code, default) = match status {
            StatusCode::NOT_FOUND => ("not_found", "no such path"),
            StatusCode::METHOD_NOT_ALLOWED => ("method_not_allowed", "method not allowed on this path"),
            StatusCode::PAYLOAD_TOO_LARGE => ("too_large", "request body too large"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => ("unsupported_media_type", "expected Content-Type: application/json"),
            s if s.is_client_error() => ("invalid", "invalid request"),
            _ => ("internal", "internal error"),
        };
        let message = if text.is_empty() { default.to_owned() } else { text };
        resp = ApiError(status, code, message).into_response();
        for (name, value) in [(header::ALLOW, allow), (header::RETRY_AFTER, retry_after)] {
            if let Some(v) = value {
                resp.headers_mut().insert(name, v);
            }
        }
    }
    let h = resp.headers_mut();
    h.insert(header::X_FRAME_OPTIONS, header::HeaderValue::from_static("DENY"));
    h.insert(header::CONTENT_SECURITY_POLICY, header::HeaderValue::from_static("frame-ancestors 'none'"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, header::HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, header::HeaderValue::from_static("no-referrer"));
    if api {
        h.insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    }
    resp
}

/// The web console: one self-contained page (no external assets); its API
/// calls carry the token the operator types in.
async fn console() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], include_str!("console.html")).into_response()
}

async fn metrics(State(s): State<Shared>, h: HeaderMap) -> Response {
    if !metrics_allowed(&h, s.metrics_token.as_deref(), s.token.as_deref()) {
        return ApiError(StatusCode::UNAUTHORIZED, "unauthorized", "send Authorization: Bearer <admin.metrics_token>".into()).into_response();
    }
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], render(&s.registry)).into_response()
}

/// An API error: status and a JSON body `{"code", "message"}`.
#[derive(Debug, thiserror::Error)]
#[error("{1}: {2}")]
struct ApiError(StatusCode, &'static str, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"code": self.1, "message": self.2}))).into_response()
    }
}

impl From<sluice_deliver::DeliverError> for ApiError {
    fn from(e: sluice_deliver::DeliverError) -> Self {
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, "control_database", e.to_string())
    }
}

type ApiResult = Result<Response, ApiError>;

fn authorize(s: &AdminState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(token) = &s.token else {
        return Err(ApiError(StatusCode::FORBIDDEN, "api_disabled", "the admin API is off: set admin.token".into()));
    };
    if bearer(headers).is_some_and(|g| token_matches(g, token)) {
        Ok(())
    } else {
        Err(ApiError(StatusCode::UNAUTHORIZED, "unauthorized", "send Authorization: Bearer <admin.token>".into()))
    }
}

/// Run `f` on the control database off the async threads, then make the change live.
async fn change<T: Send + 'static>(s: &Shared, f: impl FnOnce(&ControlDb) -> Result<T, ApiError> + Send + 'static) -> Result<T, ApiError> {
    let st = s.clone();
    tokio::task::spawn_blocking(move || {
        let out = st.catalog.with_control(|db| Ok(f(db)))??;
        st.catalog.refresh()?;
        apply_sources(&st);
        Ok(out)
    })
    .await
    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
}

fn new_write_key() -> String {
    format!("wk_{}", uuid_like())
}

fn uuid_like() -> String {
    let mut b = [0u8; 16];
    rand::Rng::fill(&mut rand::thread_rng(), &mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn bad_request(e: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, "invalid", e.to_string())
}

fn not_found(what: &str) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, "not_found", what.to_owned())
}

async fn list_sources(State(s): State<Shared>, h: HeaderMap) -> ApiResult {
    authorize(&s, &h)?;
    let snap = s.catalog.snapshot();
    let v = {
        snap.sources
            .iter()
            .map(|(src, disabled)| {
                json!({"id": src.id, "write_key": src.write_key, "rate_limit": src.rate_limit, "rate_burst": src.rate_burst, "disabled": disabled, "function": src.function})
            })
            .collect::<Vec<_>>()
    };
    Ok(Json(v).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewSource {
    id: String,
    write_key: Option<String>,
    rate_limit: Option<u32>,
    rate_burst: Option<u32>,
}

async fn create_source(State(s): State<Shared>, h: HeaderMap, body: Result<Json<NewSource>, axum::extract::rejection::JsonRejection>) -> ApiResult {
    authorize(&s, &h)?;
    let Json(n) = body.map_err(bad_request)?;
    let src = SourceConfig {
        id: n.id,
        write_key: n.write_key.unwrap_or_else(new_write_key),
        rate_limit: n.rate_limit,
        rate_burst: n.rate_burst,
        workspace: None,
        function: None,
    };
    src.validate("source").map_err(bad_request)?;
    let out = json!({"id": src.id, "write_key": src.write_key});
    // Checked and inserted under the control database's lock: two creates cannot both win.
    // A new source starts without a tracking plan, even one left by an earlier source of that id.
    let created = change(&s, move |db| {
        let created = db.insert_source(&src)?;
        if created {
            db.delete_plan(&src.id)?;
        }
        Ok(created)
    })
    .await?;
    if !created {
        return Err(ApiError(StatusCode::CONFLICT, "exists", "a source with that id or write key exists".into()));
    }
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

/// Change source `id` with `edit` (checked after it) and store it; the source as stored.
async fn edit_source(s: &Shared, id: &str, edit: impl FnOnce(&mut SourceConfig)) -> Result<SourceConfig, ApiError> {
    let Some((mut src, _)) = s.catalog.snapshot().sources.iter().find(|(o, _)| o.id == id).cloned() else {
        return Err(not_found(&format!("no source {id:?}")));
    };
    edit(&mut src);
    src.validate("source").map_err(bad_request)?;
    let stored = src.clone();
    change(s, move |db| Ok(db.put_source(&src)?)).await?;
    Ok(stored)
}

async fn rotate_key(State(s): State<Shared>, h: HeaderMap, Path(id): Path<String>) -> ApiResult {
    authorize(&s, &h)?;
    let src = edit_source(&s, &id, |src| src.write_key = new_write_key()).await?;
    Ok(Json(json!({"id": src.id, "write_key": src.write_key})).into_response())
}

async fn disable_source(state: State<Shared>, h: HeaderMap, id: Path<String>) -> ApiResult {
    set_disabled(state, h, id, true).await
}

async fn enable_source(state: State<Shared>, h: HeaderMap, id: Path<String>) -> ApiResult {
    set_disabled(state, h, id, false).await
}

async fn set_disabled(State(s): State<Shared>, h: HeaderMap, Path(id): Path<String>, disabled: bool) -> ApiResult {
    authorize(&s, &h)?;
    let found = change(&s, move |db| Ok(db.set_source_disabled(&id, disabled)?)).await?;
    if !found {
        return Err(not_found("no such source"));
    }
    Ok(Json(json!({"disabled": disabled})).into_response())
}

async fn list_destinations(State(s): State<Shared>, h: HeaderMap) -> ApiResult {
    authorize(&s, &h)?;
    let snap = s.catalog.snapshot();
    let v = {
        let mut d: Vec<_> = snap.destinations.values().map(redacted).collect();
        d.sort_by_key(|v| v["id"].as_str().unwrap_or("").to_owned());
        Value::Array(d)
    };
    Ok(Json(v).into_response())
}

/// A destination's write-only keys, each with the keys it is bound to.
/// Never shown (a GET says `<key>_set` instead); a PUT that leaves one out
/// keeps the stored value only while the destination's type and every
/// bound key stay as stored — a caller who cannot read a secret must not
/// be able to send it, or what it signs, somewhere else. A PUT that
/// changes a bound key must send the secret again (or `null`).
const WRITE_ONLY: [(&str, &[&str]); 3] = [
    ("secret", &["url"]),
    ("kafka_sasl_password", &["url", "kafka_security_protocol", "kafka_sasl_mechanism", "kafka_sasl_username", "kafka_tls_ca"]),
    ("s3_secret_access_key", &["url", "s3_endpoint", "s3_region", "s3_access_key_id"]),
];

/// A destination as the API shows it: write-only keys as `<key>_set`
/// (`secret_set` always; the others when set), the URL without its password.
fn redacted(d: &DestinationConfig) -> Value {
    let mut v = serde_json::to_value(d).expect("serializes");
    if let Some(o) = v.as_object_mut() {
        for (k, _) in WRITE_ONLY {
            let set = o.remove(k).is_some_and(|v| !v.is_null());
            if set || k == "secret" {
                o.insert(format!("{k}_set"), Value::Bool(set));
            }
        }
        o.insert("url".into(), Value::String(views::without_password(&d.url)));
    }
    v
}

async fn put_destination(
    State(s): State<Shared>,
    h: HeaderMap,
    Path(id): Path<String>,
    body: Result<Json<Value>, axum::extract::rejection::JsonRejection>,
) -> ApiResult {
    authorize(&s, &h)?;
    let Json(mut v) = body.map_err(bad_request)?;
    let existing = s.catalog.snapshot().destinations.get(&id).cloned();
    let stored = existing.as_ref().map(|d| serde_json::to_value(d).expect("serializes"));
    if let Some(obj) = v.as_object_mut() {
        obj.entry("id").or_insert_with(|| Value::String(id.clone()));
        // Answers show a URL's password as `***`: the same URL sent back keeps the stored one.
        if let (Some(Value::String(url)), Some(old)) = (obj.get("url"), &existing) {
            if *url != old.url && *url == views::without_password(&old.url) {
                obj.insert("url".into(), Value::String(old.url.clone()));
            }
        }
        // Any other URL holding `***` as its password is one changed around a password not sent.
        if let Some(Value::String(url)) = obj.get("url") {
            if url::Url::parse(url).is_ok_and(|u| u.password() == Some("***")) {
                return Err(bad_request(
                    "destination.url: its password is shown as *** and is kept only with the URL unchanged; send the password to change the URL",
                ));
            }
        }
        let same_type = stored.as_ref().is_some_and(|d| d.get("type") == Some(obj.get("type").unwrap_or(&Value::String("webhook".into()))));
        for (k, bound) in WRITE_ONLY {
            // What a GET shows but a destination does not hold: a listing sent back is accepted.
            obj.remove(&format!("{k}_set"));
            let Some(kept) = stored.as_ref().and_then(|d| d.get(k)).filter(|v| !v.is_null() && same_type) else { continue };
            if obj.contains_key(k) {
                continue;
            }
            let stored = stored.as_ref().expect("a kept value is stored");
            if let Some(changed) = bound.iter().find(|b| obj.get(**b).filter(|v| !v.is_null()) != stored.get(**b).filter(|v| !v.is_null())) {
                return Err(bad_request(format!(
                    "destination.{k}: the stored one is kept only while {} stay as they are, and this changes {changed}; send {k} again (or null to remove it)",
                    bound.join(", ")
                )));
            }
            obj.insert(k.into(), kept.clone());
        }
    }
    let d: DestinationConfig = serde_json::from_value(v).map_err(bad_request)?;
    if d.id != id {
        return Err(bad_request(format!("the body's id {:?} differs from the path's {id:?}", d.id)));
    }
    d.validate("destination", s.retry_policy).map_err(bad_request)?;
    // Before the URL is checked as it will be used (which reads its files).
    sluice_deliver::warehouse::check_no_server_files(&d).map_err(|e| bad_request(format!("destination.url: {e}")))?;
    sluice_deliver::warehouse::check_destination(&d).map_err(|e| bad_request(format!("destination.url: {e}")))?;
    functions::check_deployed(&s, d.function.as_ref())?;
    let snap = s.catalog.snapshot();
    if let Some(other) = snap.destinations.values().find(|o| o.id != d.id && o.integration_name() == d.integration_name()) {
        return Err(ApiError(StatusCode::CONFLICT, "exists", format!("integrations name {:?} is used by {:?}", d.integration_name(), other.id)));
    }
    let created = !snap.destinations.contains_key(&d.id);
    let out = redacted(&d);
    change(&s, move |db| Ok(db.put_destination(&d)?)).await?;
    Ok((if created { StatusCode::CREATED } else { StatusCode::OK }, Json(out)).into_response())
}

async fn delete_destination(State(s): State<Shared>, h: HeaderMap, Path(id): Path<String>) -> ApiResult {
    authorize(&s, &h)?;
    // A tracking plan's review destination stays while a plan forwards blocked events to it.
    if let Some((source, _)) =
        s.catalog.snapshot().plans.iter().find(|(_, p)| p.doc.get("forward_blocked_to").and_then(Value::as_str) == Some(id.as_str()))
    {
        return Err(ApiError(
            StatusCode::CONFLICT,
            "in_use",
            format!("source {source:?}'s tracking plan forwards blocked events to {id:?}: change the plan first"),
        ));
    }
    if !change(&s, move |db| Ok(db.delete_destination(&id)?)).await? {
        return Err(not_found("no such destination"));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn list_connections(State(s): State<Shared>, h: HeaderMap) -> ApiResult {
    authorize(&s, &h)?;
    let snap = s.catalog.snapshot();
    let v = {
        let mut out: Vec<_> =
            snap.connections.iter().flat_map(|(src, ds)| ds.iter().map(move |d| json!({"source": src, "destination": d}))).collect();
        out.sort_by_key(|v| v.to_string());
        out
    };
    Ok(Json(v).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewConnection {
    source: String,
    destination: String,
}

async fn create_connection(
    State(s): State<Shared>,
    h: HeaderMap,
    body: Result<Json<NewConnection>, axum::extract::rejection::JsonRejection>,
) -> ApiResult {
    authorize(&s, &h)?;
    let Json(c) = body.map_err(bad_request)?;
    let snap = s.catalog.snapshot();
    if !snap.sources.iter().any(|(o, _)| o.id == c.source) {
        return Err(bad_request(format!("no source {:?}", c.source)));
    }
    if !snap.destinations.contains_key(&c.destination) {
        return Err(bad_request(format!("no destination {:?}", c.destination)));
    }
    let out = json!({"source": c.source, "destination": c.destination});
    change(&s, move |db| Ok(db.put_connection(&c.source, &c.destination)?)).await?;
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

async fn delete_connection(State(s): State<Shared>, h: HeaderMap, Path((source, destination)): Path<(String, String)>) -> ApiResult {
    authorize(&s, &h)?;
    if !change(&s, move |db| Ok(db.delete_connection(&source, &destination)?)).await? {
        return Err(not_found("no such connection"));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn list_qos(State(s): State<Shared>, h: HeaderMap) -> ApiResult {
    authorize(&s, &h)?;
    let snap = s.catalog.snapshot();
    let v = {
        let mut out: Vec<_> = snap
            .destinations
            .keys()
            .map(|d| {
                let q = snap.qos.get(d).cloned().unwrap_or_default();
                json!({"destination": d, "paused": q.paused, "max_in_flight": q.max_in_flight, "rate_per_sec": q.rate_per_sec, "priority": q.priority})
            })
            .collect();
        out.sort_by_key(|v| v["destination"].as_str().unwrap_or("").to_owned());
        out
    };
    Ok(Json(v).into_response())
}

/// Change some QoS columns of a destination; the others keep their values.
async fn put_qos(
    State(s): State<Shared>,
    h: HeaderMap,
    Path(dest): Path<String>,
    body: Result<Json<Value>, axum::extract::rejection::JsonRejection>,
) -> ApiResult {
    authorize(&s, &h)?;
    let Json(patch) = body.map_err(bad_request)?;
    let Some(patch) = patch.as_object().cloned() else { return Err(bad_request("expected a JSON object")) };
    let current = s.catalog.snapshot().qos.get(&dest).cloned().unwrap_or_default();
    let mut merged = serde_json::to_value(&current).expect("serializes");
    merged.as_object_mut().expect("an object").extend(patch);
    let q: Qos = serde_json::from_value(merged).map_err(bad_request)?;
    if !(1..=100).contains(&q.priority) || q.max_in_flight == Some(0) {
        return Err(bad_request("priority is 1-100 and max_in_flight at least 1"));
    }
    if !s.catalog.snapshot().destinations.contains_key(&dest) {
        return Err(not_found("no such destination"));
    }
    let out = serde_json::to_value(&q).expect("serializes");
    change(&s, move |db| Ok(db.put_qos(&dest, &q)?)).await?;
    Ok(Json(out).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewReplay {
    destination: String,
    /// Unix ms.
    since_ms: i64,
}

async fn create_replay(State(s): State<Shared>, h: HeaderMap, body: Result<Json<NewReplay>, axum::extract::rejection::JsonRejection>) -> ApiResult {
    authorize(&s, &h)?;
    let Json(r) = body.map_err(bad_request)?;
    if !s.catalog.snapshot().destinations.contains_key(&r.destination) {
        return Err(not_found("no such destination"));
    }
    let id = change(&s, move |db| Ok(db.request_replay(&r.destination, r.since_ms)?)).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({"id": id, "state": "pending"}))).into_response())
}

async fn get_replay(State(s): State<Shared>, h: HeaderMap, Path(id): Path<i64>) -> ApiResult {
    authorize(&s, &h)?;
    let st = s.clone();
    let r = tokio::task::spawn_blocking(move || st.catalog.with_control(|db| db.replay(id)))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))??;
    let Some(r) = r else { return Err(not_found("no such replay")) };
    Ok(Json(json!({"id": r.id, "destination": r.destination, "since_ms": r.since_ms, "state": r.state, "events": r.events, "jobs": r.jobs, "error": r.error}))
        .into_response())
}

/// Run `f` on the control database off the async threads (reads, and
/// writes that change nothing the live catalog holds: dead letters).
async fn control<T: Send + 'static>(
    s: &Shared,
    f: impl FnOnce(&ControlDb) -> Result<T, sluice_deliver::DeliverError> + Send + 'static,
) -> Result<T, ApiError> {
    let st = s.clone();
    tokio::task::spawn_blocking(move || st.catalog.with_control(f))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
        .map_err(ApiError::from)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeadLettersQuery {
    limit: Option<usize>,
    /// Only ids below this one (the next page: the previous answer's `next_before`).
    before: Option<i64>,
}

/// Dead letters, newest first, with payload excerpts and the store's counts.
async fn list_dead_letters(
    State(s): State<Shared>,
    h: HeaderMap,
    q: Result<axum::extract::Query<DeadLettersQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    authorize(&s, &h)?;
    let axum::extract::Query(q) = q.map_err(bad_request)?;
    let limit = q.limit.unwrap_or(50).clamp(1, 1000);
    let (counts, letters) = control(&s, move |db| Ok((db.dead_letter_counts()?, db.dead_letters(q.before, limit)?))).await?;
    let next_before = (letters.len() == limit).then(|| letters.last().map(|d| d.id)).flatten();
    let list: Vec<Value> = letters.iter().map(|d| views::dead_letter_json(d, false)).collect();
    Ok(Json(json!({"counts": counts, "dead_letters": list, "next_before": next_before})).into_response())
}

/// One dead letter, whole (payload as text and base64).
async fn get_dead_letter(State(s): State<Shared>, h: HeaderMap, Path(id): Path<i64>) -> ApiResult {
    authorize(&s, &h)?;
    match control(&s, move |db| db.dead_letter(id)).await? {
        Some(d) => Ok(Json(views::dead_letter_json(&d, true)).into_response()),
        None => Err(not_found("no such dead letter")),
    }
}

/// Ask for a replay of dead letter `id` (`replay`), or discard it; 404 unknown, 409 finished.
async fn mark_dead_letter(s: &Shared, id: i64, replay: bool) -> ApiResult {
    let (found, marked) = control(s, move |db| {
        let found = db.dead_letter(id)?;
        let marked = match &found {
            Some(d) if d.is_open() => {
                if replay {
                    db.request_dead_letter_replay(Some(id))?
                } else {
                    db.discard_dead_letters(Some(id))?
                }
            }
            _ => 0,
        };
        Ok((found, marked))
    })
    .await?;
    let Some(d) = found else { return Err(not_found("no such dead letter")) };
    if marked == 0 {
        return Err(ApiError(StatusCode::CONFLICT, "finished", format!("dead letter {id} is {} already", d.state())));
    }
    Ok(if replay {
        (StatusCode::ACCEPTED, Json(json!({"id": id, "state": "replay_requested"}))).into_response()
    } else {
        Json(json!({"id": id, "state": "discarded"})).into_response()
    })
}

/// Ask the route to re-plan one dead letter (it runs within a second; see its `state`).
async fn replay_dead_letter(State(s): State<Shared>, h: HeaderMap, Path(id): Path<i64>) -> ApiResult {
    authorize(&s, &h)?;
    mark_dead_letter(&s, id, true).await
}

async fn discard_dead_letter(State(s): State<Shared>, h: HeaderMap, Path(id): Path<i64>) -> ApiResult {
    authorize(&s, &h)?;
    mark_dead_letter(&s, id, false).await
}

/// Ask for a replay of every open dead letter.
async fn replay_all_dead_letters(State(s): State<Shared>, h: HeaderMap) -> ApiResult {
    authorize(&s, &h)?;
    let n = control(&s, |db| db.request_dead_letter_replay(None)).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({"requested": n}))).into_response())
}

async fn discard_all_dead_letters(State(s): State<Shared>, h: HeaderMap) -> ApiResult {
    authorize(&s, &h)?;
    let n = control(&s, |db| db.discard_dead_letters(None)).await?;
    Ok(Json(json!({"discarded": n})).into_response())
}

/// The delivery inspector: every job of a messageId (or one job by KSUID), with every transition.
async fn inspect_jobs(State(s): State<Shared>, h: HeaderMap, Path(key): Path<String>) -> ApiResult {
    authorize(&s, &h)?;
    let jobdbs = s.jobdbs.clone();
    let found = tokio::task::spawn_blocking(move || sluice_deliver::inspect::find_in(&jobdbs, &key))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))??;
    Ok(Json(found.iter().map(views::job_json).collect::<Vec<_>>()).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    source: Option<String>,
    limit: Option<usize>,
}

/// The event debugger's bounds, so a request costs little memory however
/// large the events are (`limit=1000` on 8 partitions of 32 KB events read
/// and held ~250 MB per request, ~1 GB with 8 at once):
/// - at most this many events per answer (`limit` is clamped to it);
pub const EVENTS_MAX_LIMIT: usize = 200;
/// - the newest records of each partition looked at, read this many at a time;
const EVENTS_SCAN_PER_PARTITION: u64 = 1000;
const EVENTS_READ_BATCH: usize = 100;
/// - an event larger than this is listed as a summary (its identifying
///   fields), its size and an excerpt: `GET /api/events/{partition}/{offset}`
///   gives it whole;
pub const EVENT_INLINE_BYTES: usize = 4096;
const EVENT_EXCERPT_BYTES: usize = 512;
/// - and the listed events stop once their JSON reaches this size (the
///   header `x-sluice-events-omitted` counts those left out).
pub const EVENTS_MAX_RESPONSE_BYTES: usize = 1 << 20;

/// One record of `input` as the event debugger lists it (`whole`: never truncated).
/// With a tracking plan for its source, the entry has `plan`: what the plan
/// (as it is now) makes of the event, its outcome and violations.
fn event_entry(p: u32, r: &sluice_log::StoredRecord, whole: bool, plans: &HashMap<String, sluice_transform::TrackingPlan>) -> Value {
    let key = String::from_utf8_lossy(&r.key);
    let source = key.split_once('/').map(|(s, _)| s.to_owned()).unwrap_or_default();
    let parsed = serde_json::from_slice::<Value>(&r.value).unwrap_or(Value::Null);
    let mut entry = json!({"timestamp": r.timestamp_ms, "partition": p, "offset": r.offset, "source": source});
    if let Some(plan) = plans.get(&source) {
        entry["plan"] = plans::verdict_json(plan, &parsed);
    }
    if whole || r.value.len() <= EVENT_INLINE_BYTES {
        entry["event"] = parsed;
        return entry;
    }
    // The fields the console shows, each cut short.
    let mut summary = serde_json::Map::new();
    for field in ["type", "messageId", "event", "name", "userId", "anonymousId", "groupId", "previousId", "timestamp"] {
        if let Some(Value::String(v)) = parsed.get(field) {
            summary.insert(field.into(), Value::String(v.chars().take(200).collect()));
        }
    }
    entry["event"] = Value::Object(summary);
    entry["truncated"] = Value::Bool(true);
    entry["bytes"] = json!(r.value.len());
    entry["excerpt"] = Value::String(String::from_utf8_lossy(&r.value[..EVENT_EXCERPT_BYTES]).into_owned());
    entry
}

/// The event debugger: the latest events accepted (`input`), newest first,
/// optionally of one source. Looks at the last 1,000 records of each
/// partition; bounded as [`EVENTS_MAX_LIMIT`] and the constants after it say.
async fn recent_events(
    State(s): State<Shared>,
    h: HeaderMap,
    q: Result<axum::extract::Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    authorize(&s, &h)?;
    let axum::extract::Query(q) = q.map_err(bad_request)?;
    let limit = q.limit.unwrap_or(50).clamp(1, EVENTS_MAX_LIMIT);
    let prefix = q.source.map(|src| format!("{src}/"));
    let topic = sluice_ingest::INPUT_TOPIC;
    let log_err = |e: sluice_log::LogError| ApiError(StatusCode::INTERNAL_SERVER_ERROR, "log", e.to_string());
    let plans = plans::compiled(&s);
    // (timestamp, offset, entry, its JSON size): the newest `limit` of each partition.
    let mut out: Vec<(i64, u64, Value, usize)> = Vec::new();
    for p in 0..s.log.partitions(topic).map_err(log_err)? {
        let range = s.log.offsets(topic, p).await.map_err(log_err)?;
        let from = range.end.saturating_sub(EVENTS_SCAN_PER_PARTITION).max(range.start);
        let mut kept = std::collections::VecDeque::with_capacity(limit);
        let mut next = from;
        while next < range.end {
            let batch = s.log.read(topic, p, next, EVENTS_READ_BATCH).await.map_err(log_err)?;
            let Some(last) = batch.last() else { break };
            next = last.offset + 1;
            // Key records (a moving workspace's dedup keys) are not events.
            let shown = |r: &&sluice_log::StoredRecord| {
                prefix.as_ref().is_none_or(|pre| r.key.starts_with(pre.as_bytes())) && !sluice_core::topics::is_internal_record(&r.value)
            };
            for r in batch.iter().filter(shown) {
                let entry = event_entry(p, r, false, &plans);
                let size = serde_json::to_vec(&entry).map_or(0, |v| v.len());
                if kept.len() == limit {
                    kept.pop_front();
                }
                kept.push_back((r.timestamp_ms, r.offset, entry, size));
            }
        }
        out.extend(kept);
    }
    out.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)));
    out.truncate(limit);
    let mut total = 0;
    let mut events = Vec::with_capacity(out.len());
    let mut omitted = 0;
    for (_, _, entry, size) in out {
        if total + size > EVENTS_MAX_RESPONSE_BYTES {
            omitted += 1;
            continue;
        }
        total += size + 1;
        events.push(entry);
    }
    let mut resp = Json(events).into_response();
    if omitted > 0 {
        resp.headers_mut().insert("x-sluice-events-omitted", omitted.into());
    }
    Ok(resp)
}

/// One event of `input`, whole (the listing truncates large ones).
async fn get_event(State(s): State<Shared>, h: HeaderMap, Path((partition, offset)): Path<(u32, u64)>) -> ApiResult {
    authorize(&s, &h)?;
    let topic = sluice_ingest::INPUT_TOPIC;
    let log_err = |e: sluice_log::LogError| ApiError(StatusCode::INTERNAL_SERVER_ERROR, "log", e.to_string());
    if partition >= s.log.partitions(topic).map_err(log_err)? {
        return Err(not_found("no such partition"));
    }
    let range = s.log.offsets(topic, partition).await.map_err(log_err)?;
    if !(range.start..range.end).contains(&offset) {
        return Err(not_found("no event at that offset (it may have been deleted by retention)"));
    }
    let batch = s.log.read(topic, partition, offset, 1).await.map_err(log_err)?;
    match batch.first().filter(|r| r.offset == offset && !sluice_core::topics::is_internal_record(&r.value)) {
        Some(r) => Ok(Json(event_entry(partition, r, true, &plans::compiled(&s))).into_response()),
        None => Err(not_found("no event at that offset")),
    }
}
