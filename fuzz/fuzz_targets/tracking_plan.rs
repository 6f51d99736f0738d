//! Tracking plans (`sluice_transform`): a plan document from any JSON,
//! compiled (the admin API's save), then an event checked against it; the
//! same bytes read as a Segment export and imported.
//!
//! Input: the plan's JSON, a NUL byte, then the event's JSON. Checked: no
//! panic; a compiled plan's check lists at most `MAX_VIOLATIONS`
//! violations, each description at most `MAX_DESCRIPTION` characters (and
//! an ellipsis); the check is deterministic (the route's crash replay
//! relies on it); flagging leaves `context` an object holding the
//! violations.

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};
use sluice_transform::{import_segment, Action, Outcome, TrackingPlan, MAX_DESCRIPTION, MAX_VIOLATIONS};

fn check_with(plan: &TrackingPlan, event: &Value) {
    let v = plan.check(event);
    assert!(v.violations.len() <= MAX_VIOLATIONS, "{} violations", v.violations.len());
    for x in &v.violations {
        assert!(x.description.chars().count() <= MAX_DESCRIPTION + 1, "description of {} chars", x.description.chars().count());
    }
    let again = plan.check(event);
    assert_eq!(again.violations, v.violations, "a check is deterministic");
    assert_eq!(again.outcome, v.outcome);
    if v.outcome != Outcome::Allowed && event.is_object() {
        let mut flagged = event.clone();
        v.flag(&mut flagged);
        assert!(flagged["context"]["violations"].is_array(), "flagged: {flagged}");
    }
}

fuzz_target!(|data: &[u8]| {
    let (plan_bytes, event_bytes) = sluice_fuzz::split(data, 0);
    let Ok(doc) = serde_json::from_slice::<Value>(plan_bytes) else { return };
    let event = serde_json::from_slice::<Value>(event_bytes)
        .unwrap_or_else(|_| json!({"type": "track", "event": "Order Completed", "properties": {"total": 1, "sku": "a"}}));
    if let Ok(plan) = TrackingPlan::from_json(&doc) {
        check_with(&plan, &event);
    }
    if let Ok((imported, _report)) = import_segment(&doc, Action::Flag, Action::Block) {
        if let Ok(plan) = TrackingPlan::compile(imported) {
            check_with(&plan, &event);
        }
    }
});
