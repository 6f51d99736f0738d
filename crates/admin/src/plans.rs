//! Tracking plans through the admin API (docs/TRACKING_PLANS.md):
//!
//! - `GET    /api/sources/{id}/tracking-plan`: the plan, its version and when it changed;
//! - `PUT    /api/sources/{id}/tracking-plan`: replace it (compiled first: a plan
//!   that does not compile, names an unknown review destination or a source
//!   that does not exist is refused with 400/404 and nothing changes);
//! - `DELETE /api/sources/{id}/tracking-plan`;
//! - `POST   /api/sources/{id}/tracking-plan/import?unplanned=&invalid=`: a
//!   Segment export (Public API rules or Config API plan) becomes the plan;
//! - `POST   /api/sources/{id}/tracking-plan/check`: one event checked against
//!   the stored plan (nothing is sent anywhere).
//!
//! A change is live in this process when the answer comes (the catalog is
//! refreshed first), and in other processes at their next refresh (2 s).

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use sluice_transform::{import_segment, Action, PlanDoc, TrackingPlan};

use super::{authorize, bad_request, change, not_found, ApiError, ApiResult, Shared};

/// The current snapshot's plans, compiled (one copy shared with the route).
pub(crate) fn compiled(s: &Shared) -> Arc<HashMap<String, TrackingPlan>> {
    sluice_route::plan::compile_plans(&s.catalog.snapshot())
}

fn source_exists(s: &Shared, id: &str) -> Result<(), ApiError> {
    if s.catalog.snapshot().sources.iter().any(|(src, _)| src.id == id) {
        Ok(())
    } else {
        Err(not_found("no such source"))
    }
}

pub(crate) async fn get_plan(State(s): State<Shared>, h: HeaderMap, Path(id): Path<String>) -> ApiResult {
    authorize(&s, &h)?;
    // (A plan outlives a source removed from the config: it can still be read and deleted.)
    let snap = s.catalog.snapshot();
    let stored = snap.plans.get(&id).ok_or_else(|| not_found("this source has no tracking plan"))?;
    Ok(Json(json!({"source": id, "version": stored.version, "updated_at_ms": stored.updated_at_ms, "plan": stored.doc})).into_response())
}

/// Compile `doc`, check what it names exists, store it; the answer of a PUT or an import.
async fn store(s: &Shared, source: String, doc: PlanDoc, extra: Value) -> ApiResult {
    source_exists(s, &source)?;
    let snap = s.catalog.snapshot();
    if let Some(d) = &doc.forward_blocked_to {
        if !snap.destinations.contains_key(d) {
            return Err(bad_request(format!("forward_blocked_to: no destination {d:?}")));
        }
    }
    let json = serde_json::to_value(&doc).expect("a plan serializes");
    let created = !snap.plans.contains_key(&source);
    let (tracked, id) = (doc.track.len(), source.clone());
    // Compiled off the async threads, and before the control database's lock is taken.
    tokio::task::spawn_blocking(move || TrackingPlan::compile(doc).map(drop))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
        .map_err(bad_request)?;
    let version = change(s, move |db| Ok(db.put_plan(&id, &json)?)).await?;
    let mut out = json!({"source": source, "version": version, "track_events": tracked});
    if let (Some(out), Value::Object(extra)) = (out.as_object_mut(), extra) {
        out.extend(extra);
    }
    Ok((if created { StatusCode::CREATED } else { StatusCode::OK }, Json(out)).into_response())
}

pub(crate) async fn put_plan(
    State(s): State<Shared>,
    h: HeaderMap,
    Path(id): Path<String>,
    body: Result<Json<Value>, axum::extract::rejection::JsonRejection>,
) -> ApiResult {
    authorize(&s, &h)?;
    let Json(v) = body.map_err(bad_request)?;
    let doc: PlanDoc = serde_json::from_value(v).map_err(|e| bad_request(format!("not a tracking plan: {e}")))?;
    store(&s, id, doc, Value::Null).await
}

pub(crate) async fn delete_plan(State(s): State<Shared>, h: HeaderMap, Path(id): Path<String>) -> ApiResult {
    authorize(&s, &h)?;
    if !change(&s, move |db| Ok(db.delete_plan(&id)?)).await? {
        return Err(not_found("this source has no tracking plan"));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ImportQuery {
    #[serde(default)]
    unplanned: Action,
    #[serde(default)]
    invalid: Action,
    forward_blocked_to: Option<String>,
}

pub(crate) async fn import_plan(
    State(s): State<Shared>,
    h: HeaderMap,
    Path(id): Path<String>,
    q: Result<Query<ImportQuery>, axum::extract::rejection::QueryRejection>,
    body: Result<Json<Value>, axum::extract::rejection::JsonRejection>,
) -> ApiResult {
    authorize(&s, &h)?;
    let Query(q) = q.map_err(bad_request)?;
    let Json(export) = body.map_err(bad_request)?;
    let (mut doc, report) = import_segment(&export, q.unplanned, q.invalid).map_err(bad_request)?;
    doc.forward_blocked_to = q.forward_blocked_to;
    store(&s, id, doc, json!({"imported": report})).await
}

pub(crate) async fn check_event(
    State(s): State<Shared>,
    h: HeaderMap,
    Path(id): Path<String>,
    body: Result<Json<Value>, axum::extract::rejection::JsonRejection>,
) -> ApiResult {
    authorize(&s, &h)?;
    source_exists(&s, &id)?;
    let Json(event) = body.map_err(bad_request)?;
    let plans = compiled(&s);
    let plan = plans.get(&id).ok_or_else(|| not_found("this source has no tracking plan"))?;
    Ok(Json(verdict_json(plan, &event)).into_response())
}

/// What a plan makes of `event`: `{"outcome", "violations"}`.
pub(crate) fn verdict_json(plan: &TrackingPlan, event: &Value) -> Value {
    let v = plan.check(event);
    json!({"outcome": v.outcome.as_str(), "violations": v.violations})
}
