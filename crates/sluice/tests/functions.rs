//! Functions against the real binary (docs/FUNCTIONS.md): deployed through
//! the admin API, a destination function changes what the destination
//! receives, every handler runs, every error class ends its job as
//! documented (a drop or a `ValidationError` discards it with the reason, a
//! `RetryError` retries it, a loop and a memory hog are cut off without
//! harming the events around them), a new version is live on the next
//! attempt and an old one can be restored; a source function runs before
//! routing, and what it fails becomes a dead letter that replays once the
//! function is fixed.

mod util;

use std::time::Duration;

use serde_json::{json, Value};
use util::*;

/// Marks the event with its handler and the version; `properties.mode` picks a misbehaviour.
fn destination_function(version: u32, retry_fixed: bool) -> String {
    format!(
        r#"
function mark(e, handler, settings) {{
  e.context = e.context || {{}};
  e.context.handler = handler;
  e.context.fn_version = {version};
  e.context.tag = settings.tag;
  return e;
}}
async function onTrack(event, settings) {{
  const p = event.properties || {{}};
  switch (p.mode) {{
    case "drop": throw new DropEvent("not wanted");
    case "null": return null;
    case "invalid": throw new ValidationError("missing sku");
    case "bug": return event.no.such.field;
    case "retry": if (!{retry_fixed}) throw new RetryError("upstream busy"); break;
    case "loop": if (!{retry_fixed}) while (true) {{}} break;
    case "hog": {{ const a = []; while (true) a.push(new ArrayBuffer(4 << 20)); }}
  }}
  // Rename two properties.
  if ("a" in p) {{ p.alpha = p.a; delete p.a; }}
  if ("b" in p) {{ p.beta = p.b; delete p.b; }}
  return mark(event, "onTrack", settings);
}}
async function onIdentify(e, s) {{ return mark(e, "onIdentify", s); }}
async function onPage(e, s) {{ return mark(e, "onPage", s); }}
async function onScreen(e, s) {{ return mark(e, "onScreen", s); }}
async function onGroup(e, s) {{ return mark(e, "onGroup", s); }}
async function onAlias(e, s) {{ return mark(e, "onAlias", s); }}
"#
    )
}

/// The job of `id` at the `hook` destination, once it reached `state` (20 s at most).
fn job_in(api: &Api, id: &str, state: &str) -> Value {
    wait_for(
        Duration::from_secs(20),
        || {
            let jobs = api.ok("GET", &format!("/api/jobs/{id}"), None);
            jobs.as_array().and_then(|a| a.iter().find(|j| j["destination"] == "hook" && j["state"] == state).cloned())
        },
        || format!("{id}'s job {state}"),
    )
}

fn last_error(job: &Value) -> String {
    job["transitions"].as_array().unwrap().iter().rev().find_map(|t| t["error"].as_str()).unwrap_or("").to_owned()
}

#[test]
fn functions_transform_deliveries_and_their_errors_stay_with_their_events() {
    let sink = TestSink::start();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &hook_destination_toml(&sink.sink.url("/hook")));
    set_admin_token(&config, TOKEN);
    // A short call budget keeps the loop's retries quick.
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replacen("[log]\n", "[functions]\ntime_per_call = \"50ms\"\nmemory_bytes = 16777216\n\n[log]\n", 1)).unwrap();
    let server = Server::start(&config);
    let api = Api { http: reqwest::blocking::Client::new(), admin: server.admin.clone(), api: server.addr.clone() };

    // Refusals change nothing.
    for (code, why) in [("function onTrack(", "a syntax error"), ("const x = 1;", "no handler")] {
        let (status, v) = api.call("PUT", "/api/functions/rename", Some(json!({"code": code})));
        assert_eq!((status, v["code"].as_str()), (400, Some("invalid")), "{why}: {v}");
    }
    let hook = |function: Value| json!({"url": sink.sink.url("/hook"), "allow_private_network": true, "initial_backoff": "100ms", "max_backoff": "300ms", "function": function});
    let (status, v) = api.call("PUT", "/api/destinations/hook", Some(hook(json!({"id": "rename"}))));
    assert_eq!(status, 400, "a function not deployed cannot be attached: {v}");

    // Deploy version 1 and attach it to `hook`.
    let v1 = api.ok("PUT", "/api/functions/rename", Some(json!({"code": destination_function(1, false)})));
    assert_eq!(v1["version"], 1);
    api.ok("PUT", "/api/destinations/hook", Some(hook(json!({"id": "rename", "settings": {"tag": "t1"}}))));

    // Every handler, and the renamed properties at the destination.
    let base = |kind: &str, id: &str| json!({"type": kind, "messageId": id, "userId": "u1"});
    let mut calls = vec![
        json!({"type": "track", "messageId": "t-1", "userId": "u1", "event": "Order", "properties": {"a": 1, "b": "two", "c": true}}),
        json!({"type": "identify", "messageId": "i-1", "userId": "u1", "traits": {"email": "a@b.c"}}),
        json!({"type": "group", "messageId": "g-1", "userId": "u1", "groupId": "g"}),
        json!({"type": "alias", "messageId": "a-1", "userId": "u1", "previousId": "old"}),
    ];
    calls.push(base("page", "p-1"));
    calls.push(base("screen", "s-1"));
    api.send_raw(&calls);
    let t1 = delivered(&sink, "/hook", "t-1");
    assert_eq!(t1["properties"], json!({"alpha": 1, "beta": "two", "c": true}), "{t1}");
    assert_eq!((t1["context"]["fn_version"].as_i64(), t1["context"]["tag"].as_str()), (Some(1), Some("t1")));
    for (id, handler) in [("t-1", "onTrack"), ("i-1", "onIdentify"), ("g-1", "onGroup"), ("a-1", "onAlias"), ("p-1", "onPage"), ("s-1", "onScreen")] {
        assert_eq!(delivered(&sink, "/hook", id)["context"]["handler"], handler, "{id}");
    }

    // Every error class, a loop and a memory hog, between ordinary events.
    let track = |id: &str, mode: &str| json!({"type": "track", "messageId": id, "userId": "u1", "event": "E", "properties": {"mode": mode, "a": 0}});
    api.send_raw(&[
        track("n-1", "none"),
        track("d-1", "drop"),
        track("z-1", "null"),
        track("v-1", "invalid"),
        track("b-1", "bug"),
        track("r-1", "retry"),
        track("l-1", "loop"),
        track("h-1", "hog"),
        track("n-2", "none"),
    ]);
    for id in ["n-1", "n-2"] {
        assert_eq!(delivered(&sink, "/hook", id)["properties"]["alpha"], 0, "{id}: the events around the bad ones are fine");
    }
    for (id, expect) in [
        ("d-1", "dropped by function \"rename\" version 1: not wanted"),
        ("z-1", "dropped by function \"rename\" version 1: the handler returned null"),
        ("v-1", "ValidationError: missing sku"),
        ("b-1", "Error: "),
        ("h-1", "OutOfMemory"),
    ] {
        let job = job_in(&api, id, "discarded");
        assert!(last_error(&job).contains(expect), "{id}: {}", last_error(&job));
    }
    for (id, class) in [("r-1", "RetryError: upstream busy"), ("l-1", "Timeout")] {
        let job = job_in(&api, id, "awaiting_retry");
        assert!(last_error(&job).contains(class), "{id}: {}", last_error(&job));
    }

    // Version 2 no longer asks for retries: the waiting jobs go out through it.
    let v2 = api.ok("PUT", "/api/functions/rename", Some(json!({"code": destination_function(2, true)})));
    assert_eq!(v2["version"], 2);
    for id in ["r-1", "l-1"] {
        assert_eq!(delivered(&sink, "/hook", id)["context"]["fn_version"], 2, "{id}");
    }
    // Roll back to version 1.
    api.ok("POST", "/api/functions/rename/restore", Some(json!({"version": 1})));
    api.send_raw(&[track("n-3", "none")]);
    assert_eq!(delivered(&sink, "/hook", "n-3")["context"]["fn_version"], 1);
    assert_eq!(api.call("POST", "/api/functions/rename/restore", Some(json!({"version": 9}))).0, 404);
    let listed = api.ok("GET", "/api/functions/rename", None);
    assert_eq!((listed["version"].as_i64(), listed["versions"].as_array().unwrap().len()), (Some(1), 2), "{listed}");
    assert_eq!(listed["destinations"], json!(["hook"]));
    assert!(listed["code"].as_str().unwrap().contains("fn_version = 1"));
    let tested = api.ok("POST", "/api/functions/rename/test", Some(json!({"event": track("x", "invalid")})));
    assert_eq!((tested["outcome"].as_str(), tested["class"].as_str()), (Some("error"), Some("ValidationError")), "{tested}");
    let (status, v) = api.call("DELETE", "/api/functions/rename", None);
    assert_eq!((status, v["code"].as_str()), (409, Some("in_use")), "{v}");

    // A source function: runs before routing (the destination function after it).
    let source_fn = r#"
async function onTrack(e) {
  if (e.event === "Spam") return null;
  if (e.event === "Bad") throw new ValidationError("no bad events here");
  e.properties.enriched = true;
  return e;
}"#;
    api.ok("PUT", "/api/functions/enrich", Some(json!({"code": source_fn})));
    assert_eq!(api.call("PUT", "/api/sources/nope/function", Some(json!({"id": "enrich"}))).0, 404);
    api.ok("PUT", &format!("/api/sources/{SOURCE_ID}/function"), Some(json!({"id": "enrich"})));
    api.send(&[("e-1", "Good", json!({"a": 5})), ("e-2", "Spam", json!({})), ("e-3", "Bad", json!({}))]);
    let e1 = delivered(&sink, "/hook", "e-1");
    assert_eq!(e1["properties"], json!({"alpha": 5, "enriched": true}), "both functions ran: {e1}");
    let letter = wait_for(
        Duration::from_secs(20),
        || {
            let page = api.ok("GET", "/api/dead-letters", None);
            page["dead_letters"].as_array().unwrap().iter().find(|d| d["key"].as_str() == Some(&format!("{SOURCE_ID}/e-3"))).cloned()
        },
        || "e-3's dead letter".into(),
    );
    assert!(letter["reason"].as_str().unwrap().contains("ValidationError: no bad events here"), "{letter}");
    // Fixed: the replay runs the new version.
    api.ok(
        "PUT",
        "/api/functions/enrich",
        Some(json!({"code": source_fn.replace("throw new ValidationError(\"no bad events here\")", "e.properties.fixed = true")})),
    );
    api.ok("POST", &format!("/api/dead-letters/{}/replay", letter["id"]), None);
    assert_eq!(delivered(&sink, "/hook", "e-3")["properties"]["fixed"], true);

    // Detached: events pass through the destination function only.
    assert_eq!(api.call("DELETE", &format!("/api/sources/{SOURCE_ID}/function"), None).0, 200);
    api.send(&[("e-4", "Spam", json!({}))]);
    assert!(delivered(&sink, "/hook", "e-4")["properties"].get("enriched").is_none());

    std::thread::sleep(Duration::from_millis(300));
    for id in ["d-1", "z-1", "v-1", "b-1", "h-1", "e-2"] {
        assert!(never_delivered(&sink, "/hook", id), "{id} must not be delivered");
    }
    let metrics = api.metrics();
    for line in [
        r#"sluice_function_calls_total{function="rename",stage="destination",outcome="event"}"#,
        r#"sluice_function_calls_total{function="rename",stage="destination",outcome="OutOfMemory"}"#,
        r#"sluice_function_calls_total{function="enrich",stage="source",outcome="dropped"}"#,
    ] {
        assert!(metrics.contains(line), "{line} missing from /metrics");
    }
    server.stop();
}

/// Open dead letters whose reason starts `parked: `, by key.
fn parked_letters(api: &Api) -> std::collections::HashMap<String, Value> {
    let page = api.ok("GET", "/api/dead-letters", None);
    page["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["reason"].as_str().is_some_and(|r| r.starts_with("parked: ")) && d["replayed_at_ms"].is_null())
        .map(|d| (d["key"].as_str().unwrap().to_owned(), d.clone()))
        .collect()
}

#[test]
fn a_slow_source_function_parks_its_events_and_the_other_sources_flow() {
    let sink = TestSink::start();
    let dir = tempfile::tempdir().unwrap();
    // Two sources to one webhook; `fetch` may reach the test's upstream (on 127.0.0.1).
    let extra = format!(
        "[[sources]]\nid = \"other\"\nwrite_key = \"wk-other\"\n[deliver]\nallow_private_network = true\n\
         [[destinations]]\nid = \"hook\"\nurl = \"{}\"\n[[connections]]\nsource = \"{SOURCE_ID}\"\ndestinations = [\"hook\"]\n\
         [[connections]]\nsource = \"other\"\ndestinations = [\"hook\"]\n",
        sink.sink.url("/hook")
    );
    let config = write_config(dir.path(), &extra);
    set_admin_token(&config, TOKEN);
    let server = Server::start(&config);
    let api = Api { http: reqwest::blocking::Client::new(), admin: server.admin.clone(), api: server.addr.clone() };
    // The upstream the function asks does not answer in time.
    sink.sink.set("/upstream", sluice_deliver::sink::Behaviour { delay: Duration::from_secs(60), ..Default::default() });
    let code = "async function onTrack(e, s) { const r = await fetch(s.upstream); e.properties.looked_up = r.status; return e; }";
    api.ok("PUT", "/api/functions/lookup", Some(json!({"code": code})));
    api.ok("PUT", &format!("/api/sources/{SOURCE_ID}/function"), Some(json!({"id": "lookup", "settings": {"upstream": sink.sink.url("/upstream")}})));
    let slow_ids: Vec<String> = (0..10).map(|i| format!("slow-{i}")).collect();
    let send_slow = |ids: &[String]| api.send(&ids.iter().map(|id| (id.as_str(), "Looked Up", json!({}))).collect::<Vec<_>>());
    let send_other = |ids: &[String]| {
        let batch: Vec<Value> =
            ids.iter().map(|id| json!({"type": "track", "messageId": id, "userId": "u2", "event": "Other", "properties": {}})).collect();
        let resp =
            api.http.post(format!("http://{}/v1/batch", api.api)).basic_auth("wk-other", Some("")).json(&json!({"batch": batch})).send().unwrap();
        assert_eq!(resp.status(), 200);
    };

    // The first request runs into the upstream's silence: its events are parked, the circuit opens.
    send_slow(&slow_ids[..5]);
    wait_for(Duration::from_secs(60), || (parked_letters(&api).len() >= 5).then_some(()), || format!("{:?}", parked_letters(&api).keys()));
    // While it is open, the slow source's events are parked at once and the other source's are delivered.
    let other_ids: Vec<String> = (0..20).map(|i| format!("other-{i}")).collect();
    send_slow(&slow_ids[5..]);
    send_other(&other_ids);
    for id in &other_ids {
        assert_eq!(delivered(&sink, "/hook", id)["event"], "Other");
    }
    let parked =
        wait_for(Duration::from_secs(30), || Some(parked_letters(&api)).filter(|p| p.len() >= 10), || format!("{:?}", parked_letters(&api).keys()));
    for id in &slow_ids {
        assert!(parked.contains_key(&format!("{SOURCE_ID}/{id}")), "{id} parked: {:?}", parked.keys());
        assert!(never_delivered(&sink, "/hook", id), "{id} is not delivered while its function cannot answer");
    }
    assert!(parked.values().all(|d| d["reason"].as_str().unwrap().contains("\"lookup\"")));

    // The upstream answers again: the parked events are replayed by themselves (a probe, then the rest), each once.
    sink.sink.set("/upstream", sluice_deliver::sink::Behaviour::default());
    wait_for(
        Duration::from_secs(90),
        || slow_ids.iter().all(|id| !never_delivered(&sink, "/hook", id)).then_some(()),
        || format!("{} of 10 parked events delivered", slow_ids.iter().filter(|id| !never_delivered(&sink, "/hook", id)).count()),
    );
    std::thread::sleep(Duration::from_millis(500));
    let by_id = sink.by_message_id("/hook");
    for id in slow_ids.iter().chain(&other_ids) {
        assert_eq!(by_id[id.as_str()].len(), 1, "{id} delivered once");
    }
    assert_eq!(delivered(&sink, "/hook", "slow-0")["properties"]["looked_up"], 200, "the replay ran the function");
    assert!(parked_letters(&api).is_empty(), "no parked letter left open");
    server.stop();
}
