//! Functions through the admin API (docs/FUNCTIONS.md):
//!
//! - `GET    /api/functions`: every function, its live version and who uses it;
//! - `PUT    /api/functions/{id}` `{"code": "…"}`: deploy a new version
//!   (loaded first: code that does not load, or defines no handler, is
//!   refused with 400 and nothing changes); it is live when the answer comes;
//! - `GET    /api/functions/{id}[?version=N]`: its versions, and the code of
//!   the live one (or of version N);
//! - `POST   /api/functions/{id}/restore` `{"version": N}`: make an earlier
//!   version live again;
//! - `POST   /api/functions/{id}/test` `{"event": {…}, "settings": {…}}`: run
//!   the live version on one event (nothing is sent anywhere);
//! - `DELETE /api/functions/{id}`: every version (409 while a source or a
//!   destination uses it);
//! - `PUT    /api/sources/{id}/function` `{"id": "…", "settings": {…}}` and
//!   `DELETE`: a source function (a destination's is a key of its config,
//!   `PUT /api/destinations/{id}`).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use sluice_core::config::{valid_id, FunctionRef};
use sluice_deliver::control::CatalogSnapshot;
use sluice_transform::fetch::NoNetwork;
use sluice_transform::function::{FunctionOutcome, JsFunction};
use sluice_transform::pool::{FunctionCode, FunctionPool, Stage};

use super::{authorize, bad_request, change, not_found, ApiError, ApiResult, Shared};

/// Largest function code (bytes).
pub(crate) const MAX_CODE: usize = 256 << 10;

type Body<T> = Result<Json<T>, axum::extract::rejection::JsonRejection>;

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
}

/// Who uses function `id`: (sources, destinations), sorted.
fn users(snap: &CatalogSnapshot, id: &str) -> (Vec<String>, Vec<String>) {
    let mut sources: Vec<String> =
        snap.sources.iter().filter(|(s, _)| s.function.as_ref().is_some_and(|f| f.id == id)).map(|(s, _)| s.id.clone()).collect();
    let mut destinations: Vec<String> =
        snap.destinations.values().filter(|d| d.function.as_ref().is_some_and(|f| f.id == id)).map(|d| d.id.clone()).collect();
    sources.sort();
    destinations.sort();
    (sources, destinations)
}

/// Refuse a reference to a function that is not deployed (400).
pub(crate) fn check_deployed(s: &Shared, f: Option<&FunctionRef>) -> Result<(), ApiError> {
    match f {
        Some(f) if !s.catalog.snapshot().functions.contains_key(&f.id) => {
            Err(bad_request(format!("function: no function {:?} is deployed (PUT /api/functions/{} first)", f.id, f.id)))
        }
        _ => Ok(()),
    }
}

pub(crate) async fn list(State(s): State<Shared>, h: HeaderMap) -> ApiResult {
    authorize(&s, &h)?;
    let snap = s.catalog.snapshot();
    let mut ids: Vec<&String> = snap.functions.keys().collect();
    ids.sort();
    let v: Vec<Value> = ids
        .into_iter()
        .map(|id| {
            let (sources, destinations) = users(&snap, id);
            json!({"id": id, "version": snap.functions[id].version, "sources": sources, "destinations": destinations})
        })
        .collect();
    Ok(Json(v).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Deploy {
    code: String,
}

pub(crate) async fn deploy(State(s): State<Shared>, h: HeaderMap, Path(id): Path<String>, body: Body<Deploy>) -> ApiResult {
    authorize(&s, &h)?;
    if !valid_id(&id) {
        return Err(bad_request(format!("{id:?} is not a function id: 1-64 characters of A-Z, a-z, 0-9, '_' or '-'")));
    }
    let Json(d) = body.map_err(bad_request)?;
    if d.code.len() > MAX_CODE {
        return Err(bad_request(format!("code: {} bytes; at most {MAX_CODE}", d.code.len())));
    }
    // Loaded off the async threads, with the limits and globals calls get (a `fetch` that
    // refuses every request): code that cannot load is never stored.
    let (code, limits) = (d.code, FunctionPool::global().limits());
    let code = tokio::task::spawn_blocking(move || JsFunction::load_with_fetch(&code, limits, Some(Arc::new(NoNetwork))).map(|_| code))
        .await
        .map_err(internal)?
        .map_err(|e| bad_request(format!("code: {e}")))?;
    let created = !s.catalog.snapshot().functions.contains_key(&id);
    let name = id.clone();
    let version = change(&s, move |db| Ok(db.deploy_function(&name, &code)?)).await?;
    Ok((if created { StatusCode::CREATED } else { StatusCode::OK }, Json(json!({"id": id, "version": version}))).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct VersionQuery {
    version: Option<i64>,
}

pub(crate) async fn get(
    State(s): State<Shared>,
    h: HeaderMap,
    Path(id): Path<String>,
    q: Result<Query<VersionQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    authorize(&s, &h)?;
    let Query(q) = q.map_err(bad_request)?;
    let st = s.clone();
    let name = id.clone();
    let versions = tokio::task::spawn_blocking(move || st.catalog.with_control(|db| db.function_versions(&name))).await.map_err(internal)??;
    if versions.is_empty() {
        return Err(not_found("no such function"));
    }
    let snap = s.catalog.snapshot();
    let live = snap.functions.get(&id).map(|f| f.version);
    let shown = q.version.or(live).unwrap_or(versions.last().map_or(0, |v| v.version));
    let Some(code) = versions.iter().find(|v| v.version == shown).map(|v| v.code.clone()) else {
        return Err(not_found(&format!("function {id:?} has no version {shown}")));
    };
    let (sources, destinations) = users(&snap, &id);
    let list: Vec<Value> = versions
        .iter()
        .map(|v| json!({"version": v.version, "created_at_ms": v.created_at_ms, "bytes": v.code.len(), "live": Some(v.version) == live}))
        .collect();
    Ok(Json(json!({
        "id": id, "version": live, "versions": list, "code_version": shown, "code": code,
        "sources": sources, "destinations": destinations,
    }))
    .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Restore {
    version: i64,
}

pub(crate) async fn restore(State(s): State<Shared>, h: HeaderMap, Path(id): Path<String>, body: Body<Restore>) -> ApiResult {
    authorize(&s, &h)?;
    let Json(r) = body.map_err(bad_request)?;
    let name = id.clone();
    if !change(&s, move |db| Ok(db.restore_function(&name, r.version)?)).await? {
        return Err(not_found(&format!("function {id:?} has no version {}", r.version)));
    }
    Ok(Json(json!({"id": id, "version": r.version})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TestCall {
    event: Value,
    #[serde(default)]
    settings: serde_json::Map<String, Value>,
}

pub(crate) async fn test(State(s): State<Shared>, h: HeaderMap, Path(id): Path<String>, body: Body<TestCall>) -> ApiResult {
    authorize(&s, &h)?;
    let Json(t) = body.map_err(bad_request)?;
    if !t.event.is_object() {
        return Err(bad_request("event: must be a JSON object"));
    }
    let live = s.catalog.snapshot().functions.get(&id).cloned().ok_or_else(|| not_found("no such function"))?;
    let code = FunctionCode { id: id.clone(), version: live.version, code: live.code };
    let out = FunctionPool::global().call(Stage::Test, &code, vec![t.event], Arc::new(Value::Object(t.settings))).await;
    let mut answer = out.first().map(FunctionOutcome::to_json).unwrap_or(Value::Null);
    answer["version"] = json!(live.version);
    Ok(Json(answer).into_response())
}

pub(crate) async fn delete(State(s): State<Shared>, h: HeaderMap, Path(id): Path<String>) -> ApiResult {
    authorize(&s, &h)?;
    let (sources, destinations) = users(&s.catalog.snapshot(), &id);
    if !sources.is_empty() || !destinations.is_empty() {
        return Err(ApiError(
            StatusCode::CONFLICT,
            "in_use",
            format!("function {id:?} is used by sources {sources:?} and destinations {destinations:?}: detach it first"),
        ));
    }
    if !change(&s, move |db| Ok(db.delete_function(&id)?)).await? {
        return Err(not_found("no such function"));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Attach (`Some`) or detach (`None`) source `id`'s function.
async fn set_source_function(s: &Shared, id: String, f: Option<FunctionRef>) -> ApiResult {
    check_deployed(s, f.as_ref())?;
    let src = super::edit_source(s, &id, |src| src.function = f).await?;
    Ok(Json(json!({"source": src.id, "function": src.function})).into_response())
}

pub(crate) async fn attach_to_source(State(s): State<Shared>, h: HeaderMap, Path(id): Path<String>, body: Body<FunctionRef>) -> ApiResult {
    authorize(&s, &h)?;
    let Json(f) = body.map_err(bad_request)?;
    set_source_function(&s, id, Some(f)).await
}

pub(crate) async fn detach_from_source(State(s): State<Shared>, h: HeaderMap, Path(id): Path<String>) -> ApiResult {
    authorize(&s, &h)?;
    set_source_function(&s, id, None).await
}
