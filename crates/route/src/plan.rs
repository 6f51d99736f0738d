//! Planning one event: which destinations get a job, with which payload.
//!
//! Order per connected destination: `integrations` (the destination's name,
//! case-sensitive, overrides `All`; `false` disables, `true` or an object
//! enables), then the destination's filters in config order. A `drop` or a
//! `sample` miss ends the destination's plan; `allow_fields` and
//! `block_fields` rewrite the payload sent to that destination only.
//!
//! Before any of that, the source's tracking plan (if it has one) checks
//! the event once ([`sluice_transform`]): a flagged event goes to every
//! destination with its violations at `context.violations`; a blocked one
//! goes to none of them, only to the plan's `forward_blocked_to`
//! destination if it names one (connected or not, filters not applied).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde_json::{Map, Value};
use sluice_core::config::{DestinationConfig, FilterConfig};
use sluice_core::filter::{lookup, Condition};
use sluice_deliver::control::CatalogSnapshot;
use sluice_deliver::{Catalog, NewJob};
use sluice_transform::{Outcome, TrackingPlan, Verdict};

/// Top-level fields an `allow_fields` filter always keeps: without them the
/// event is not an event.
const ALWAYS_KEPT: &[&str] = &[
    "type",
    "messageId",
    "userId",
    "anonymousId",
    "event",
    "name",
    "groupId",
    "previousId",
    "timestamp",
    "originalTimestamp",
    "receivedAt",
    "sentAt",
];

#[derive(Debug)]
enum Action {
    Drop,
    Sample(f64),
    Allow(Vec<Vec<String>>),
    Block(Vec<Vec<String>>),
}

#[derive(Debug)]
struct Filter {
    when: Option<Condition>,
    action: Action,
}

fn compile(f: &FilterConfig) -> Result<Filter, String> {
    let when = f.condition.as_deref().map(Condition::parse).transpose()?;
    let paths = || f.fields.iter().map(|p| p.split('.').map(str::to_owned).collect()).collect();
    let action = match f.action.as_str() {
        "drop" => Action::Drop,
        "sample" => Action::Sample(f.rate.unwrap_or(1.0)),
        "allow_fields" => Action::Allow(paths()),
        "block_fields" => Action::Block(paths()),
        other => return Err(format!("unknown filter action {other:?}")),
    };
    Ok(Filter { when, action })
}

struct Compiled {
    snapshot: Arc<CatalogSnapshot>,
    filters: HashMap<String, Arc<Vec<Filter>>>,
    plans: Arc<HashMap<String, TrackingPlan>>,
}

/// Turns events into jobs using the catalog's current connections and destinations.
pub struct Planner {
    catalog: Arc<Catalog>,
    compiled: Mutex<Option<Compiled>>,
}

/// The plan for one event.
#[derive(Debug, Default)]
pub struct RouteDecision {
    pub jobs: Vec<NewJob>,
    /// Connected destinations left out by integrations or filters.
    pub filtered: u64,
    /// The source's tracking plan's check, if it has a plan.
    pub verdict: Option<Verdict>,
    /// The source's function dropped the event (no jobs).
    pub dropped_by_function: bool,
}

impl Planner {
    pub fn new(catalog: Arc<Catalog>) -> Self {
        Planner { catalog, compiled: Mutex::new(None) }
    }

    /// The catalog it plans with (its control database also holds the dead letters).
    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    /// The snapshot, compiled filters and tracking plans, recompiled when the catalog changed.
    fn current(&self) -> (Arc<CatalogSnapshot>, HashMap<String, Arc<Vec<Filter>>>, Arc<HashMap<String, TrackingPlan>>) {
        let snap = self.catalog.snapshot();
        let mut guard = self.compiled.lock().expect("planner lock");
        if guard.as_ref().is_none_or(|c| !Arc::ptr_eq(&c.snapshot, &snap)) {
            let mut filters = HashMap::new();
            for (id, d) in &snap.destinations {
                let compiled: Result<Vec<_>, _> = d.filters.iter().map(compile).collect();
                match compiled {
                    Ok(f) => {
                        filters.insert(id.clone(), Arc::new(f));
                    }
                    Err(e) => tracing::error!(destination = %id, error = %e, "invalid filter: the destination gets no events until it is fixed"),
                }
            }
            let plans = compile_plans(&snap);
            *guard = Some(Compiled { snapshot: snap.clone(), filters, plans });
        }
        let c = guard.as_ref().expect("set above");
        (c.snapshot.clone(), c.filters.clone(), c.plans.clone())
    }

    /// Plan one `output` record. `only` restricts to one destination (replay).
    pub fn plan(&self, key: &[u8], value: &Bytes, generation: i64, only: Option<&str>) -> Result<RouteDecision, String> {
        let key = std::str::from_utf8(key).map_err(|_| "record key is not UTF-8".to_owned())?;
        let (source, message_id) = key.split_once('/').ok_or_else(|| format!("record key {key:?} is not <source>/<messageId>"))?;
        let (snap, filters, plans) = self.current();
        let mut decision = RouteDecision::default();
        let plan = plans.get(source);
        let Some(connected) = snap.connections.get(source).or(plan.map(|_| &NO_CONNECTIONS)) else { return Ok(decision) };
        let mut event: Value = serde_json::from_slice(value).map_err(|e| format!("event is not JSON: {e}"))?;
        let mut flagged = None;
        let mut forward = None;
        if let Some(plan) = plan {
            // Only a plan's flag may put violations in an event of a source with a plan.
            let stripped = Verdict::strip_client_violations(&mut event);
            let verdict = plan.check(&event);
            if verdict.outcome != Outcome::Allowed {
                verdict.flag(&mut event);
            }
            if verdict.outcome != Outcome::Allowed || stripped {
                flagged = Some(Bytes::from(serde_json::to_vec(&event).expect("JSON serializes")));
            }
            if verdict.outcome == Outcome::Blocked {
                forward = plan.doc.forward_blocked_to.clone();
            }
            decision.verdict = Some(verdict);
        }
        let value = flagged.as_ref().unwrap_or(value);
        let blocked = decision.verdict.as_ref().is_some_and(|v| v.outcome == Outcome::Blocked);
        let now = sluice_deliver::now_ms();
        // When ingest accepted it (for the end-to-end latency); absent or odd: now.
        let received_at = event
            .get("receivedAt")
            .and_then(Value::as_str)
            .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
            .map_or(now, |t| t.timestamp_millis());
        let make_job = |dest_id: &String, dest: &DestinationConfig, payload: Bytes| {
            let window = dest.retry_window.unwrap_or(self.catalog.retry_policy().retry_window);
            NewJob {
                message_id: message_id.to_owned(),
                source: source.to_owned(),
                destination: dest_id.clone(),
                generation,
                endpoint: dest.url.clone(),
                payload,
                created_at: now,
                expires_at: now.saturating_add(i64::try_from(window.as_millis()).unwrap_or(i64::MAX)),
                received_at,
            }
        };
        if blocked {
            // Only the review destination, with the event and its violations as they are.
            if let Some(dest_id) = forward.filter(|d| only.is_none_or(|o| o == d)) {
                match snap.destinations.get(&dest_id) {
                    Some(dest) => decision.jobs.push(make_job(&dest_id, dest, value.clone())),
                    None => {
                        tracing::warn!(source, destination = %dest_id, "a blocked event's review destination does not exist: the event is dropped")
                    }
                }
            }
            decision.filtered = connected.len() as u64;
            return Ok(decision);
        }
        for dest_id in connected {
            if only.is_some_and(|o| o != dest_id) {
                continue;
            }
            let Some(dest) = snap.destinations.get(dest_id) else { continue };
            // A destination whose filters do not compile gets nothing (logged when compiled).
            let Some(dest_filters) = filters.get(dest_id) else {
                decision.filtered += 1;
                continue;
            };
            match apply(dest, dest_filters, &event, message_id) {
                None => decision.filtered += 1,
                Some(rewritten) => {
                    let payload = match rewritten {
                        Some(v) => Bytes::from(serde_json::to_vec(&v).expect("JSON serializes")),
                        None => value.clone(),
                    };
                    decision.jobs.push(make_job(dest_id, dest, payload));
                }
            }
        }
        Ok(decision)
    }
}

/// No connected destination (a source with a plan still has its events checked).
static NO_CONNECTIONS: Vec<String> = Vec::new();

/// The compiled plans of the last snapshot compiled: the route and the
/// admin API's debugger share one copy (a plan's patterns take memory).
static COMPILED_PLANS: Mutex<Option<(Arc<CatalogSnapshot>, Arc<HashMap<String, TrackingPlan>>)>> = Mutex::new(None);

/// Every source's tracking plan, compiled (once per catalog snapshot); a
/// plan that does not compile is left out (the admin API compiles before it
/// stores, so only a hand edit of the control database gets here) and logged.
pub fn compile_plans(snap: &Arc<CatalogSnapshot>) -> Arc<HashMap<String, TrackingPlan>> {
    let mut cache = COMPILED_PLANS.lock().expect("compiled plans lock");
    if let Some((at, plans)) = &*cache {
        if Arc::ptr_eq(at, snap) || at.plans == snap.plans {
            let plans = plans.clone();
            *cache = Some((snap.clone(), plans.clone()));
            return plans;
        }
    }
    let plans = compile_all(snap);
    *cache = Some((snap.clone(), plans.clone()));
    plans
}

fn compile_all(snap: &CatalogSnapshot) -> Arc<HashMap<String, TrackingPlan>> {
    let mut plans = HashMap::new();
    for (source, stored) in &snap.plans {
        match TrackingPlan::from_json(&stored.doc) {
            Ok(p) => {
                plans.insert(source.clone(), p);
            }
            Err(e) => {
                tracing::error!(%source, version = stored.version, error = %e, "a tracking plan that does not compile: the source's events go unchecked")
            }
        }
    }
    Arc::new(plans)
}

/// Whether `dest` gets `event`: `None` = no; `Some(None)` = yes, unchanged;
/// `Some(Some(v))` = yes, with the rewritten payload `v`.
fn apply(dest: &DestinationConfig, filters: &[Filter], event: &Value, message_id: &str) -> Option<Option<Value>> {
    if !integration_enabled(event, dest.integration_name()) {
        return None;
    }
    let mut out: Option<Value> = None;
    for f in filters {
        let current = out.as_ref().unwrap_or(event);
        if !f.when.as_ref().is_none_or(|c| c.matches(current)) {
            continue;
        }
        match &f.action {
            Action::Drop => return None,
            Action::Sample(rate) => {
                if !sampled(message_id, *rate) {
                    return None;
                }
            }
            Action::Allow(paths) => out = Some(allow(current, paths)),
            Action::Block(paths) => {
                let mut v = current.clone();
                for p in paths {
                    remove_path(&mut v, p);
                }
                out = Some(v);
            }
        }
    }
    Some(out)
}

/// `integrations[name]` if present, else `integrations.All`, else enabled.
pub fn integration_enabled(event: &Value, name: &str) -> bool {
    let Some(integrations) = event.get("integrations").and_then(Value::as_object) else { return true };
    let on = |v: &Value| !matches!(v, Value::Bool(false));
    match integrations.get(name) {
        Some(v) => on(v),
        None => integrations.get("All").is_none_or(on),
    }
}

/// Deterministic sampling by messageId (FNV-1a), so replays decide the same.
pub fn sampled(message_id: &str, rate: f64) -> bool {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in message_id.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    (h as f64 / u64::MAX as f64) < rate
}

fn allow(event: &Value, paths: &[Vec<String>]) -> Value {
    let mut out = Map::new();
    if let Some(obj) = event.as_object() {
        for k in ALWAYS_KEPT {
            if let Some(v) = obj.get(*k) {
                out.insert((*k).to_owned(), v.clone());
            }
        }
    }
    let mut out = Value::Object(out);
    for p in paths {
        if let Some(v) = lookup(event, p) {
            set_path(&mut out, p, v.clone());
        }
    }
    out
}

fn set_path(v: &mut Value, path: &[String], value: Value) {
    let mut cur = v;
    for (i, k) in path.iter().enumerate() {
        let obj = match cur {
            Value::Object(o) => o,
            _ => return,
        };
        if i + 1 == path.len() {
            obj.insert(k.clone(), value);
            return;
        }
        cur = obj.entry(k.clone()).or_insert_with(|| Value::Object(Map::new()));
    }
}

fn remove_path(v: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else { return };
    let mut cur = v;
    for k in parents {
        match cur.get_mut(k) {
            Some(next) => cur = next,
            None => return,
        }
    }
    if let Some(o) = cur.as_object_mut() {
        o.remove(last);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A planner over a real control database (SQLite in a temp dir) holding `plan` for source s1.
    fn planner_with(plan: Value) -> (tempfile::TempDir, Planner) {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "[server]\ndata_dir = \"{}\"\n[[sources]]\nid = \"s1\"\nwrite_key = \"k1\"\n\
             [[destinations]]\nid = \"d1\"\nurl = \"http://127.0.0.1:9/d1\"\n\
             [[destinations]]\nid = \"review\"\nurl = \"http://127.0.0.1:9/review\"\n\
             [[connections]]\nsource = \"s1\"\ndestinations = [\"d1\"]\n",
            dir.path().display()
        );
        let config = sluice_core::Config::from_toml_with_env(&text, "", &HashMap::new()).unwrap();
        let catalog = Catalog::open(&config).unwrap();
        catalog.with_control(|c| c.put_plan("s1", &plan)).unwrap();
        catalog.refresh().unwrap();
        (dir, Planner::new(catalog))
    }

    #[test]
    fn a_tracking_plan_flags_blocks_and_forwards_before_the_filters() {
        let plan = json!({
            "unplanned": "block", "invalid": "flag", "forward_blocked_to": "review",
            "track": {"Order Completed": {"properties": {"properties": {"required": ["total"]}}}}
        });
        let (_dir, planner) = planner_with(plan);
        let plan_of = |event: Value, only: Option<&str>| {
            let bytes = Bytes::from(serde_json::to_vec(&event).unwrap());
            planner.plan(b"s1/m1", &bytes, 0, only).unwrap()
        };
        let payload = |d: &RouteDecision, i: usize| serde_json::from_slice::<Value>(&d.jobs[i].payload).unwrap();

        let valid = json!({"type": "track", "event": "Order Completed", "properties": {"total": 3}});
        let d = plan_of(valid.clone(), None);
        assert_eq!(d.jobs.len(), 1);
        assert_eq!((d.jobs[0].destination.as_str(), payload(&d, 0)), ("d1", valid), "a valid event goes unchanged");
        assert_eq!(d.verdict.as_ref().unwrap().outcome, Outcome::Allowed);

        let d = plan_of(json!({"type": "track", "event": "Order Completed", "properties": {}}), None);
        assert_eq!(d.jobs.len(), 1);
        assert_eq!(payload(&d, 0)["context"]["violations"][0]["field"], "properties.total", "flagged for every destination");

        let d = plan_of(json!({"type": "track", "event": "Unplanned Thing"}), None);
        assert_eq!(d.jobs.len(), 1, "blocked: only the review destination");
        assert_eq!(d.jobs[0].destination, "review");
        assert_eq!(payload(&d, 0)["context"]["violations"][0]["type"], "Unplanned Event");
        assert_eq!(d.filtered, 1);

        // A replay of d1 leaves blocked events out; one of the review destination takes them.
        assert!(plan_of(json!({"type": "track", "event": "Unplanned Thing"}), Some("d1")).jobs.is_empty());
        assert_eq!(plan_of(json!({"type": "track", "event": "Unplanned Thing"}), Some("review")).jobs.len(), 1);
    }

    #[test]
    fn a_plan_edit_takes_effect_at_the_next_refresh() {
        let (_dir, planner) = planner_with(json!({"unplanned": "block"}));
        let event = Bytes::from_static(br#"{"type":"track","event":"Anything"}"#);
        assert!(planner.plan(b"s1/m1", &event, 0, None).unwrap().jobs.is_empty());
        planner.catalog().with_control(|c| c.put_plan("s1", &json!({"unplanned": "allow"}))).unwrap();
        planner.catalog().refresh().unwrap();
        assert_eq!(planner.plan(b"s1/m1", &event, 0, None).unwrap().jobs.len(), 1);
        planner.catalog().with_control(|c| c.delete_plan("s1")).unwrap();
        planner.catalog().refresh().unwrap();
        let d = planner.plan(b"s1/m1", &event, 0, None).unwrap();
        assert!(d.verdict.is_none(), "no plan, no check");
        assert_eq!(d.jobs.len(), 1);
    }

    #[test]
    fn integrations_all_and_per_destination_keys() {
        let e = |i: Value| json!({"type": "track", "integrations": i});
        assert!(integration_enabled(&json!({"type": "track"}), "Hook"));
        assert!(!integration_enabled(&e(json!({"All": false})), "Hook"));
        assert!(integration_enabled(&e(json!({"All": false, "Hook": true})), "Hook"), "own key overrides All");
        assert!(!integration_enabled(&e(json!({"All": true, "Hook": false})), "Hook"));
        assert!(integration_enabled(&e(json!({"All": false, "Hook": {"apiKey": "x"}})), "Hook"), "an object enables");
        assert!(!integration_enabled(&e(json!({"All": false, "hook": true})), "Hook"), "case-sensitive");
        assert!(integration_enabled(&e(json!({"Other": false})), "Hook"));
    }

    #[test]
    fn sampling_is_deterministic_and_close_to_the_rate() {
        let kept = (0..20_000).filter(|i| sampled(&format!("msg-{i}"), 0.25)).count();
        assert!((4_000..6_000).contains(&kept), "kept {kept} of 20000 at 0.25");
        assert_eq!(sampled("abc", 0.5), sampled("abc", 0.5));
        assert!(!sampled("abc", 0.0));
        assert!(sampled("abc", 1.0));
    }

    fn dest(filters: Vec<FilterConfig>) -> DestinationConfig {
        toml::from_str::<DestinationConfig>("id = \"d\"\nurl = \"http://x\"")
            .map(|mut d| {
                d.filters = filters;
                d
            })
            .unwrap()
    }

    fn filter(cond: Option<&str>, action: &str, rate: Option<f64>, fields: &[&str]) -> FilterConfig {
        FilterConfig { condition: cond.map(str::to_owned), action: action.into(), rate, fields: fields.iter().map(|s| s.to_string()).collect() }
    }

    fn run(filters: Vec<FilterConfig>, event: &Value) -> Option<Option<Value>> {
        let d = dest(filters);
        let compiled: Vec<_> = d.filters.iter().map(|f| compile(f).unwrap()).collect();
        apply(&d, &compiled, event, "m-1")
    }

    #[test]
    fn drop_allow_and_block_filters() {
        let e = json!({"type": "track", "event": "Signed Up", "messageId": "m-1",
                       "properties": {"email": "a@b.c", "plan": "pro"}, "context": {"ip": "1.2.3.4"}});
        assert_eq!(run(vec![filter(Some(r#"event = "Signed Up""#), "drop", None, &[])], &e), None);
        assert_eq!(run(vec![filter(Some(r#"event = "Other""#), "drop", None, &[])], &e), Some(None), "no match: unchanged");
        let blocked = run(vec![filter(None, "block_fields", None, &["properties.email", "context.ip"])], &e).unwrap().unwrap();
        assert_eq!(blocked["properties"], json!({"plan": "pro"}));
        assert_eq!(blocked["context"], json!({}));
        let allowed = run(vec![filter(None, "allow_fields", None, &["properties.plan"])], &e).unwrap().unwrap();
        assert_eq!(allowed, json!({"type": "track", "event": "Signed Up", "messageId": "m-1", "properties": {"plan": "pro"}}));
        assert_eq!(run(vec![filter(None, "sample", Some(0.0), &[])], &e), None);
        assert_eq!(run(vec![filter(None, "sample", Some(1.0), &[])], &e), Some(None));
    }
}
