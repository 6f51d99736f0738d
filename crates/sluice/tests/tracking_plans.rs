//! Tracking plans against the real binary: a plan put through the admin
//! API flags, blocks (forwarding to a review destination) and allows
//! events as its actions say, edits take effect on the next events without
//! a restart, a Segment export imports, invalid plans are refused and
//! change nothing, and the metrics and the event debugger show the
//! violations.

mod util;

use std::time::Duration;

use serde_json::json;
use util::*;

#[test]
fn a_tracking_plan_flags_blocks_and_allows_live_and_imports_a_segment_export() {
    let sink = TestSink::start();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &hook_destination_toml(&sink.sink.url("/hook")));
    set_admin_token(&config, TOKEN);
    let server = Server::start(&config);
    let api = Api { http: reqwest::blocking::Client::new(), admin: server.admin.clone(), api: server.addr.clone() };
    let plan_path = format!("/api/sources/{SOURCE_ID}/tracking-plan");
    api.ok("PUT", "/api/destinations/review", Some(json!({"url": sink.sink.url("/review"), "allow_private_network": true})));

    // 1. Flag invalid events, allow unplanned ones.
    let order = json!({
        "$schema": "http://json-schema.org/draft-07/schema#",
        "type": "object",
        "properties": {"properties": {"type": "object", "required": ["total"], "properties": {"total": {"type": "number"}}}}
    });
    let put = api.ok("PUT", &plan_path, Some(json!({"name": "shop", "invalid": "flag", "unplanned": "allow", "track": {"Order Completed": order}})));
    assert_eq!((put["version"].as_i64(), put["track_events"].as_i64()), (Some(1), Some(1)), "{put}");
    api.send(&[
        ("v-1", "Order Completed", json!({"total": 5})),
        ("i-1", "Order Completed", json!({"total": "five"})),
        ("u-1", "Page Scrolled", json!({})),
    ]);
    assert!(delivered(&sink, "/hook", "v-1")["context"].get("violations").is_none(), "a valid event is unchanged");
    let flagged = delivered(&sink, "/hook", "i-1");
    assert_eq!(flagged["context"]["violations"][0]["type"], "Invalid Type", "{flagged}");
    assert_eq!(flagged["context"]["violations"][0]["field"], "properties.total");
    assert!(delivered(&sink, "/hook", "u-1")["context"].get("violations").is_none(), "allowed: unchanged");

    // 2. A live edit: block both kinds, blocked events go to the review destination.
    let put = api.ok(
        "PUT",
        &plan_path,
        Some(json!({"name": "shop", "invalid": "block", "unplanned": "block", "forward_blocked_to": "review", "track": {"Order Completed": order}})),
    );
    assert_eq!(put["version"], 2);
    api.send(&[("u-2", "Page Scrolled", json!({})), ("i-2", "Order Completed", json!({})), ("v-2", "Order Completed", json!({"total": 1}))]);
    assert_eq!(delivered(&sink, "/review", "u-2")["context"]["violations"][0]["type"], "Unplanned Event");
    assert_eq!(delivered(&sink, "/review", "i-2")["context"]["violations"][0]["type"], "Required");
    delivered(&sink, "/hook", "v-2");
    // 3. Flag unplanned events now; the plan's check endpoint says the same as the route.
    api.ok("PUT", &plan_path, Some(json!({"invalid": "block", "unplanned": "flag", "track": {"Order Completed": order}})));
    let check = api.ok("POST", &format!("{plan_path}/check"), Some(json!({"type": "track", "event": "Nope"})));
    assert_eq!(check["outcome"], "flagged", "{check}");
    api.send(&[("u-3", "Page Scrolled", json!({})), ("i-3", "Order Completed", json!({}))]);
    assert_eq!(delivered(&sink, "/hook", "u-3")["context"]["violations"][0]["type"], "Unplanned Event");

    // A review destination in use cannot be deleted.
    api.ok(
        "PUT",
        &plan_path,
        Some(json!({"invalid": "block", "unplanned": "flag", "forward_blocked_to": "review", "track": {"Order Completed": order}})),
    );
    let (status, v) = api.call("DELETE", "/api/destinations/review", None);
    assert_eq!((status, v["code"].as_str()), (409, Some("in_use")), "{v}");
    // A client can neither dodge a flag with a context that is not an object nor fake one.
    api.send_raw(&[
        json!({"type": "track", "messageId": "c-1", "userId": "u1", "event": "Page Scrolled", "context": "not an object"}),
        json!({"type": "track", "messageId": "c-2", "userId": "u1", "event": "Order Completed", "properties": {"total": 1},
               "context": {"violations": [{"type": "fake"}], "ip": "1.2.3.4"}}),
    ]);
    let dodged = delivered(&sink, "/hook", "c-1");
    assert_eq!(
        (dodged["context"]["violations"][0]["type"].as_str(), dodged["context"]["value"].as_str()),
        (Some("Unplanned Event"), Some("not an object"))
    );
    let faked = delivered(&sink, "/hook", "c-2");
    assert!(faked["context"].get("violations").is_none() && faked["context"]["ip"] == "1.2.3.4", "{faked}");

    // 4. Refused changes change nothing.
    for (body, why) in [
        (
            json!({"track": {"A": {"$defs": {"n": {"allOf": [{"items": {"$ref": "#/$defs/n"}}, {"items": {"$ref": "#/$defs/n"}}]}}, "$ref": "#/$defs/n"}}}),
            "a recursive $ref",
        ),
        (json!({"track": {"A": {"$ref": "https://example.com/s.json"}}}), "an external $ref"),
        (json!({"track": {"A": {"properties": {"x": {"pattern": "(a)\\1"}}}}}), "a back-reference"),
        (json!({"forward_blocked_to": "nowhere"}), "an unknown review destination"),
        (json!({"track": {}, "blocking": true}), "an unknown key"),
    ] {
        let (status, v) = api.call("PUT", &plan_path, Some(body));
        assert_eq!((status, v["code"].as_str()), (400, Some("invalid")), "{why}: {v}");
    }
    assert_eq!(api.call("PUT", "/api/sources/nope/tracking-plan", Some(json!({}))).0, 404);
    assert_eq!(api.ok("GET", &plan_path, None)["version"], 4, "refused changes stored nothing");

    // 5. Import a Segment Public API export: "Signed Up" is planned, "Order Completed" no longer is.
    let export = json!({"data": {"trackingPlan": {"name": "From Segment"}, "rules": [
        {"type": "TRACK", "key": "Signed Up", "version": 1, "jsonSchema": {"properties": {"properties": {"required": ["plan"]}}}},
        {"type": "IDENTIFY", "version": 1, "jsonSchema": {"properties": {"traits": {"required": ["email"]}}}}
    ]}});
    let imported = api.ok("POST", &format!("{plan_path}/import?unplanned=block&invalid=flag"), Some(export));
    assert_eq!((imported["imported"]["track"].as_u64(), imported["imported"]["identify"].as_bool()), (Some(1), Some(true)), "{imported}");
    assert_eq!(api.ok("GET", &plan_path, None)["plan"]["name"], "From Segment");
    api.send(&[("o-4", "Order Completed", json!({"total": 1})), ("s-4", "Signed Up", json!({"plan": "pro"})), ("s-5", "Signed Up", json!({}))]);
    delivered(&sink, "/hook", "s-4");
    assert_eq!(delivered(&sink, "/hook", "s-5")["context"]["violations"][0]["field"], "properties.plan");
    let (status, _) = api.call("POST", &format!("{plan_path}/import"), Some(json!({"not": "an export"})));
    assert_eq!(status, 400);

    // 6. Without a plan, events pass unchecked.
    assert_eq!(api.call("DELETE", &plan_path, None).0, 204);
    assert_eq!(api.call("GET", &plan_path, None).0, 404);
    api.send(&[("n-6", "Anything", json!({}))]);
    assert!(delivered(&sink, "/hook", "n-6")["context"].get("violations").is_none());

    // Blocked events reached no connected destination (checked after later events arrived).
    std::thread::sleep(Duration::from_millis(500));
    for id in ["u-2", "i-2", "i-3", "o-4"] {
        assert!(never_delivered(&sink, "/hook", id), "{id} was blocked");
    }
    assert!(never_delivered(&sink, "/review", "o-4"), "the imported plan forwards nowhere");

    // A planned name with a quote and a backslash is escaped in the metrics' labels.
    api.ok("PUT", &plan_path, Some(json!({"invalid": "allow", "track": {"Clicked \"Buy\" \\ now": {"required": ["properties"]}}})));
    api.send_raw(&[json!({"type": "track", "messageId": "q-1", "userId": "u1", "event": "Clicked \"Buy\" \\ now"})]);
    delivered(&sink, "/hook", "q-1");

    // Metrics per source, event and kind; outcomes.
    let metrics = api.metrics();
    assert!(
        metrics
            .contains(&format!(r#"sluice_tracking_plan_violations_total{{source="{SOURCE_ID}",event="Clicked \"Buy\" \\ now",kind="invalid"}} 1"#)),
        "escaped label missing:\n{}",
        metrics.lines().filter(|l| l.contains("tracking_plan_violations")).collect::<Vec<_>>().join("\n")
    );
    for line in [
        format!(r#"sluice_tracking_plan_violations_total{{source="{SOURCE_ID}",event="Order Completed",kind="invalid"}}"#),
        format!(r#"sluice_tracking_plan_violations_total{{source="{SOURCE_ID}",event="(unplanned)",kind="unplanned_event"}}"#),
        format!(r#"sluice_tracking_plan_events_total{{source="{SOURCE_ID}",outcome="blocked"}}"#),
        format!(r#"sluice_tracking_plan_events_total{{source="{SOURCE_ID}",outcome="flagged"}}"#),
    ] {
        assert!(metrics.contains(&line), "{line} missing from /metrics");
    }
    // The debugger checks the listed events against the source's plan as it is now.
    api.ok("PUT", &plan_path, Some(json!({"invalid": "flag", "track": {"Order Completed": order}})));
    let events = api.ok("GET", &format!("/api/events?source={SOURCE_ID}&limit=200"), None);
    let i1 = events.as_array().unwrap().iter().find(|e| e["event"]["messageId"] == "i-1").expect("i-1 listed");
    assert_eq!(i1["plan"]["outcome"], "flagged", "{i1}");
    assert_eq!(i1["plan"]["violations"][0]["field"], "properties.total");
    server.stop();
}
