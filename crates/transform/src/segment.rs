//! Import of a Segment tracking plan export into a [`PlanDoc`].
//!
//! Two shapes are read, as Segment's two APIs give them:
//! - the Public API's rules (`GET /tracking-plans/{id}/rules`, optionally
//!   with the plan from `GET /tracking-plans/{id}`): `{"rules": [{"type":
//!   "TRACK" | "IDENTIFY" | "GROUP" | "PAGE" | "SCREEN" | "COMMON", "key":
//!   event name, "jsonSchema": {...}, "version": n}]}`, possibly under
//!   `data`, with the plan's `name` under `trackingPlan`;
//! - the Config API's plan (v1): `{"display_name", "rules": {"events":
//!   [{"name", "rules": {...}, "version"}], "global", "identify", "group"}}`,
//!   possibly under `tracking_plan`.
//!
//! Both describe whole events, as Sluice's plans do, so the schemas are
//! taken as they are. When a rule appears in several versions, the highest
//! wins.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{json, Value};

use crate::plan::{Action, PlanDoc, PlanError};

/// What an import took and left.
#[derive(Debug, Default, Serialize)]
pub struct ImportReport {
    pub format: &'static str,
    pub track: usize,
    pub identify: bool,
    pub group: bool,
    pub page: bool,
    pub screen: bool,
    pub common: bool,
    /// Rules not taken, each with why.
    pub skipped: Vec<String>,
}

/// A schema slot filled by the highest version seen.
fn keep_highest(slot: &mut Option<(i64, Value)>, version: i64, schema: Value) {
    if slot.as_ref().is_none_or(|(v, _)| version >= *v) {
        *slot = Some((version, schema));
    }
}

/// A rule's version: a number (or a string holding one); 0 when absent.
fn version_of(rule: &Value) -> i64 {
    match rule.get("version") {
        Some(Value::Number(n)) => n.as_i64().unwrap_or_else(|| n.as_f64().map_or(0, |f| f.clamp(i64::MIN as f64, i64::MAX as f64) as i64)),
        Some(Value::String(s)) => s.trim().parse::<f64>().map_or(0, |f| f.clamp(i64::MIN as f64, i64::MAX as f64) as i64),
        _ => 0,
    }
}

/// A rule's schema: absent or null allows anything (a planned event
/// without rules); anything else that is not a schema is an error.
fn schema_of(v: Option<&Value>) -> Result<Value, String> {
    match v {
        None | Some(Value::Null) => Ok(json!({})),
        Some(s) if s.is_object() || s.is_boolean() => Ok(s.clone()),
        Some(other) => Err(format!("its schema is {}, not a JSON object", kind_of(other))),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Array(_) => "an array",
        Value::String(_) => "a string",
        Value::Number(_) => "a number",
        Value::Bool(_) => "a boolean",
        Value::Null => "null",
        Value::Object(_) => "an object",
    }
}

/// Convert a Segment export; `unplanned`/`invalid` are the new plan's actions.
pub fn import_segment(export: &Value, unplanned: Action, invalid: Action) -> Result<(PlanDoc, ImportReport), PlanError> {
    let root = export.get("data").filter(|d| d.is_object()).unwrap_or(export);
    let plan = root.get("tracking_plan").or_else(|| root.get("trackingPlan")).unwrap_or(root);
    let name = ["display_name", "displayName", "name"]
        .iter()
        .find_map(|k| plan.get(*k).and_then(Value::as_str))
        .unwrap_or("imported from Segment")
        .to_owned();
    let rules = plan.get("rules").or_else(|| root.get("rules")).ok_or_else(|| PlanError::Import("no \"rules\" found".into()))?;
    let mut report = ImportReport::default();
    let mut track: BTreeMap<String, Option<(i64, Value)>> = BTreeMap::new();
    let (mut identify, mut group, mut page, mut screen, mut common) = (None, None, None, None, None);
    match rules {
        // The Public API: a list of typed rules.
        Value::Array(list) => {
            report.format = "segment public api";
            for (i, rule) in list.iter().enumerate() {
                let kind = rule.get("type").and_then(Value::as_str).unwrap_or("").to_ascii_uppercase();
                let version = version_of(rule);
                let schema = match schema_of(rule.get("jsonSchema")) {
                    Ok(s) => s,
                    Err(why) => {
                        report.skipped.push(format!("rule {i} ({kind}): {why}"));
                        continue;
                    }
                };
                match kind.as_str() {
                    "TRACK" => match rule.get("key").and_then(Value::as_str).filter(|k| !k.is_empty()) {
                        Some(key) => {
                            keep_highest(track.entry(key.to_owned()).or_default(), version, schema);
                        }
                        None => report.skipped.push(format!("rule {i}: a TRACK rule without a key")),
                    },
                    "IDENTIFY" => keep_highest(&mut identify, version, schema),
                    "GROUP" => keep_highest(&mut group, version, schema),
                    "PAGE" => keep_highest(&mut page, version, schema),
                    "SCREEN" => keep_highest(&mut screen, version, schema),
                    "COMMON" => keep_highest(&mut common, version, schema),
                    other => report.skipped.push(format!("rule {i}: type {other:?} is not one Sluice checks")),
                }
            }
        }
        // The Config API (v1): events plus the other calls' schemas.
        Value::Object(obj) => {
            report.format = "segment config api";
            for (i, rule) in obj.get("events").and_then(Value::as_array).into_iter().flatten().enumerate() {
                match rule.get("name").and_then(Value::as_str).filter(|k| !k.is_empty()) {
                    Some(name) => {
                        let version = version_of(rule);
                        let schema = match schema_of(rule.get("rules")) {
                            Ok(s) => s,
                            Err(why) => {
                                report.skipped.push(format!("events[{i}] ({name:?}): {why}"));
                                continue;
                            }
                        };
                        keep_highest(track.entry(name.to_owned()).or_default(), version, schema);
                    }
                    None => report.skipped.push(format!("events[{i}]: an event without a name")),
                }
            }
            for (key, slot) in [("identify", &mut identify), ("group", &mut group), ("global", &mut common)] {
                match obj.get(key).map(|s| schema_of(Some(s))) {
                    Some(Ok(s)) => *slot = Some((0, s)),
                    Some(Err(why)) => report.skipped.push(format!("rules.{key}: {why}")),
                    None => {}
                }
            }
            for key in obj.keys().filter(|k| !matches!(k.as_str(), "events" | "identify" | "group" | "global")) {
                report.skipped.push(format!("rules.{key}: not a section Sluice checks"));
            }
        }
        _ => return Err(PlanError::Import("\"rules\" is neither a list (Public API) nor an object (Config API)".into())),
    }
    report.track = track.len();
    report.identify = identify.is_some();
    report.group = group.is_some();
    report.page = page.is_some();
    report.screen = screen.is_some();
    report.common = common.is_some();
    let take = |s: Option<(i64, Value)>| s.map(|(_, v)| v);
    let doc = PlanDoc {
        name,
        unplanned,
        invalid,
        forward_blocked_to: None,
        common: take(common),
        track: track.into_iter().filter_map(|(k, slot)| Some((k, slot?.1))).collect(),
        identify: take(identify),
        group: take(group),
        page: take(page),
        screen: take(screen),
    };
    Ok((doc, report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Outcome, TrackingPlan};

    #[test]
    fn a_public_api_export_imports_with_the_highest_version_of_each_rule() {
        let export = json!({"data": {
            "trackingPlan": {"id": "tp_1", "name": "Acme"},
            "rules": [
                {"type": "TRACK", "key": "Order Completed", "version": 1, "jsonSchema": {"properties": {"properties": {"required": ["a"]}}}},
                {"type": "TRACK", "key": "Order Completed", "version": 2, "jsonSchema": {"properties": {"properties": {"required": ["order_id"]}}}},
                {"type": "IDENTIFY", "version": 1, "jsonSchema": {"properties": {"traits": {"required": ["email"]}}}},
                {"type": "COMMON", "version": 1, "jsonSchema": {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object"}},
                {"type": "TRACK", "key": "Signed Up", "version": 1, "jsonSchema": null},
                {"type": "ALIAS", "version": 1, "jsonSchema": {}}
            ]
        }});
        let (doc, report) = import_segment(&export, Action::Block, Action::Flag).unwrap();
        assert_eq!(doc.name, "Acme");
        assert_eq!(report.track, 2);
        assert!(report.identify && report.common && !report.group);
        assert_eq!(report.skipped.len(), 1, "{:?}", report.skipped);
        let plan = TrackingPlan::compile(doc).unwrap();
        let v = plan.check(&json!({"type": "track", "event": "Order Completed", "properties": {"a": 1}}));
        assert_eq!(v.violations[0].field, "properties.order_id", "version 2 is the one kept");
        assert_eq!(v.outcome, Outcome::Flagged);
        assert!(plan.check(&json!({"type": "track", "event": "Signed Up", "properties": {"x": 1}})).violations.is_empty());
        assert_eq!(plan.check(&json!({"type": "track", "event": "Other"})).outcome, Outcome::Blocked);
    }

    #[test]
    fn a_config_api_export_imports() {
        let export = json!({"tracking_plan": {
            "display_name": "Shop v1",
            "rules": {
                "events": [{"name": "Product Viewed", "version": 1, "rules": {"properties": {"properties": {"required": ["sku"]}}}}],
                "identify": {"properties": {"traits": {"required": ["email"]}}},
                "global": {"properties": {"context": {"type": "object"}}},
                "group": {"properties": {"traits": {"required": ["name"]}}}
            }
        }});
        let (doc, report) = import_segment(&export, Action::Allow, Action::Block).unwrap();
        assert_eq!((doc.name.as_str(), report.track, report.format), ("Shop v1", 1, "segment config api"));
        let plan = TrackingPlan::compile(doc).unwrap();
        assert_eq!(plan.check(&json!({"type": "track", "event": "Product Viewed", "properties": {}})).outcome, Outcome::Blocked);
        assert_eq!(plan.check(&json!({"type": "group", "groupId": "g", "traits": {}})).violations[0].field, "traits.name");
        assert_eq!(plan.check(&json!({"type": "page", "context": 5})).violations[0].field, "context");
    }

    #[test]
    fn odd_rules_are_reported_not_taken_silently() {
        let export = json!({"data": null, "rules": [
            {"type": "TRACK", "key": "A", "version": "5", "jsonSchema": {"required": ["x"]}},
            {"type": "TRACK", "key": "A", "version": 1, "jsonSchema": {}},
            {"type": "TRACK", "key": "B", "version": 1e30, "jsonSchema": [1, 2]},
            {"type": "IDENTIFY", "jsonSchema": "yes"}
        ]});
        let (doc, report) = import_segment(&export, Action::Allow, Action::Flag).unwrap();
        assert_eq!(doc.track["A"], json!({"required": ["x"]}), "version \"5\" beats 1");
        assert!(!doc.track.contains_key("B") && doc.identify.is_none());
        assert_eq!(report.skipped.len(), 2, "{:?}", report.skipped);
        assert!(report.skipped.iter().all(|s| s.contains("not a JSON object")), "{:?}", report.skipped);
        let v1 = json!({"rules": {"events": [], "identify": 5}});
        assert_eq!(
            import_segment(&v1, Action::Allow, Action::Allow).unwrap().1.skipped,
            ["rules.identify: its schema is a number, not a JSON object"]
        );
    }

    #[test]
    fn something_else_is_refused() {
        assert!(matches!(import_segment(&json!({"events": []}), Action::Allow, Action::Allow), Err(PlanError::Import(_))));
        assert!(matches!(import_segment(&json!({"rules": 5}), Action::Allow, Action::Allow), Err(PlanError::Import(_))));
    }
}
