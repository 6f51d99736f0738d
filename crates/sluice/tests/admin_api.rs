//! The admin API against the real binary: every route refuses a missing or
//! wrong token, and every change takes effect without a restart.

mod util;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice_deliver::sink::Sink;
use util::*;

const TOKEN: &str = "test-admin-token-0123456789";

struct Api {
    rt: tokio::runtime::Runtime,
    http: reqwest::Client,
    admin: String,
    api: String,
}

impl Api {
    fn call(&self, method: &str, path: &str, token: Option<&str>, body: Option<Value>) -> (u16, Value) {
        self.rt.block_on(async {
            let url = format!("http://{}{path}", self.admin);
            let mut req = self.http.request(method.parse().unwrap(), url);
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            if let Some(b) = body {
                req = req.json(&b);
            }
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            let text = resp.text().await.unwrap();
            (status, serde_json::from_str(&text).unwrap_or(Value::Null))
        })
    }

    fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, v) = self.call(method, path, Some(TOKEN), body);
        assert!((200..300).contains(&status), "{method} {path}: {status} {v}");
        v
    }

    /// Send one event with `write_key`; the status.
    fn track(&self, write_key: &str, message_id: &str) -> u16 {
        self.rt.block_on(async {
            self.http
                .post(format!("http://{}/v1/track", self.api))
                .basic_auth(write_key, Some(""))
                .json(&json!({"userId": "u", "event": "E", "messageId": message_id}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    }
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every route with the method and a body it accepts.
fn routes() -> Vec<(&'static str, &'static str, Option<Value>)> {
    vec![
        ("GET", "/api/sources", None),
        ("POST", "/api/sources", Some(json!({"id": "new-src"}))),
        ("POST", "/api/sources/web/rotate-key", None),
        ("POST", "/api/sources/web/disable", None),
        ("POST", "/api/sources/web/enable", None),
        ("GET", "/api/destinations", None),
        ("PUT", "/api/destinations/d2", Some(json!({"url": "http://127.0.0.1:9/x", "allow_private_network": true}))),
        ("DELETE", "/api/destinations/d2", None),
        ("GET", "/api/connections", None),
        ("POST", "/api/connections", Some(json!({"source": "web", "destination": "hook"}))),
        ("DELETE", "/api/connections/web/hook", None),
        ("GET", "/api/qos", None),
        ("PUT", "/api/qos/hook", Some(json!({"paused": false}))),
        ("POST", "/api/replays", Some(json!({"destination": "hook", "since_ms": 0}))),
        ("GET", "/api/replays/1", None),
        ("GET", "/api/jobs/some-message-id", None),
        ("GET", "/api/events?source=web&limit=5", None),
        ("PUT", "/api/sources/web/tracking-plan", Some(json!({"invalid": "flag", "track": {"E": {}}}))),
        ("GET", "/api/sources/web/tracking-plan", None),
        ("POST", "/api/sources/web/tracking-plan/check", Some(json!({"type": "track", "event": "E"}))),
        ("POST", "/api/sources/web/tracking-plan/import", Some(json!({"rules": [{"type": "TRACK", "key": "E", "jsonSchema": {}}]}))),
        ("DELETE", "/api/sources/web/tracking-plan", None),
    ]
}

fn start(token: bool) -> (tempfile::TempDir, Server, Api, Sink) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sink = rt.block_on(Sink::start()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let extra = hook_destination_toml(&sink.url("/hook"));
    let config = write_config(dir.path(), &extra);
    if token {
        set_admin_token(&config, TOKEN);
    }
    let server = Server::start(&config);
    let api = Api { rt, http: reqwest::Client::new(), admin: server.admin.clone(), api: server.addr.clone() };
    (dir, server, api, sink)
}

#[test]
fn every_route_refuses_a_missing_or_wrong_token_and_accepts_the_right_one() {
    let (_dir, server, api, _sink) = start(true);
    for (method, path, body) in routes() {
        let (s, v) = api.call(method, path, None, body.clone());
        assert_eq!(s, 401, "{method} {path} without a token: {v}");
        assert_eq!(v["code"], "unauthorized");
        let (s, _) = api.call(method, path, Some("wrong-token-wrong-token"), body.clone());
        assert_eq!(s, 401, "{method} {path} with a wrong token");
        let (s, v) = api.call(method, path, Some(TOKEN), body);
        assert!((200..300).contains(&s), "{method} {path} with the token: {s} {v}");
    }
    // /metrics and /healthz stay open.
    assert_eq!(api.call("GET", "/healthz", None, None).0, 200);
    server.stop();
}

#[test]
fn without_a_configured_token_the_api_is_off() {
    let (_dir, server, api, _sink) = start(false);
    for (method, path, body) in routes() {
        let (s, v) = api.call(method, path, Some(TOKEN), body);
        assert_eq!(s, 403, "{method} {path}: {v}");
        assert_eq!(v["code"], "api_disabled");
    }
    server.stop();
}

#[test]
fn changes_take_effect_without_a_restart() {
    let (_dir, server, api, sink) = start(true);
    // Sources: create → its key works; rotate → old key refused, new works; disable → refused.
    let created = api.ok("POST", "/api/sources", Some(json!({"id": "mobile"})));
    let key1 = created["write_key"].as_str().unwrap().to_owned();
    assert_eq!(api.track(&key1, "a-1"), 200, "a new source's key works at once");
    let rotated = api.ok("POST", "/api/sources/mobile/rotate-key", None);
    let key2 = rotated["write_key"].as_str().unwrap().to_owned();
    assert_ne!(key1, key2);
    assert_eq!(api.track(&key1, "a-2"), 401, "the old key is refused after rotation");
    assert_eq!(api.track(&key2, "a-3"), 200);
    api.ok("POST", "/api/sources/mobile/disable", None);
    assert_eq!(api.track(&key2, "a-4"), 401, "a disabled source is refused");
    api.ok("POST", "/api/sources/mobile/enable", None);
    assert_eq!(api.track(&key2, "a-5"), 200);
    let (s, v) = api.call("POST", "/api/sources", Some(TOKEN), Some(json!({"id": "mobile"})));
    assert_eq!((s, v["code"].as_str()), (409, Some("exists")), "{v}");

    // Destinations and connections: a new destination connected to the new source gets its events.
    api.ok("PUT", "/api/destinations/second", Some(json!({"url": sink.url("/second"), "allow_private_network": true})));
    api.ok("POST", "/api/connections", Some(json!({"source": "mobile", "destination": "second"})));
    assert_eq!(api.track(&key2, "b-1"), 200);
    wait_until("b-1 at /second", || sink.received_on("/second").iter().any(|r| r.header("idempotency-key") == Some("b-1")));
    let conns = api.ok("GET", "/api/connections", None);
    assert!(conns.as_array().unwrap().contains(&json!({"source": "mobile", "destination": "second"})), "{conns}");
    // Invalid input is refused with a reason, and changes nothing.
    let (s, v) = api.call("PUT", "/api/destinations/bad", Some(TOKEN), Some(json!({"url": "ftp://x"})));
    assert_eq!((s, v["code"].as_str()), (400, Some("invalid")), "{v}");
    let (s, _) = api.call("POST", "/api/connections", Some(TOKEN), Some(json!({"source": "nope", "destination": "second"})));
    assert_eq!(s, 400);

    // QoS: pause holds deliveries; resume releases them.
    api.ok("PUT", "/api/qos/hook", Some(json!({"paused": true})));
    assert_eq!(api.track(WRITE_KEY, "c-1"), 200);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(sink.received_on("/hook").iter().all(|r| r.header("idempotency-key") != Some("c-1")), "paused: nothing delivered");
    let qos = api.ok("GET", "/api/qos", None);
    assert!(qos.as_array().unwrap().iter().any(|q| q["destination"] == "hook" && q["paused"] == true), "{qos}");
    api.ok("PUT", "/api/qos/hook", Some(json!({"paused": false})));
    wait_until("c-1 after resume", || sink.received_on("/hook").iter().any(|r| r.header("idempotency-key") == Some("c-1")));

    // Replay through the API.
    let r = api.ok("POST", "/api/replays", Some(json!({"destination": "hook", "since_ms": 0})));
    let id = r["id"].as_i64().unwrap();
    wait_until("replay done", || api.ok("GET", &format!("/api/replays/{id}"), None)["state"] == "done");
    wait_until("c-1 replayed", || sink.received_on("/hook").iter().any(|r| r.header("idempotency-key") == Some(format!("c-1:replay-{id}").as_str())));

    // Deleting the connection stops deliveries to it.
    api.ok("DELETE", "/api/connections/mobile/second", None);
    assert_eq!(api.track(&key2, "b-2"), 200);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(sink.received_on("/second").iter().all(|r| r.header("idempotency-key") != Some("b-2")));
    server.stop();
}

#[test]
fn the_event_debugger_and_delivery_inspector_show_what_happened() {
    let (_dir, server, api, sink) = start(true);
    let other = api.ok("POST", "/api/sources", Some(json!({"id": "other"})))["write_key"].as_str().unwrap().to_owned();
    for i in 0..5 {
        assert_eq!(api.track(WRITE_KEY, &format!("w-{i}")), 200);
        // Newest-first ordering across partitions is by log time, in milliseconds.
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(api.track(&other, "o-1"), 200);
    let events = api.ok("GET", "/api/events?source=web&limit=3", None);
    let ids: Vec<&str> = events.as_array().unwrap().iter().map(|e| e["event"]["messageId"].as_str().unwrap()).collect();
    assert_eq!(ids, vec!["w-4", "w-3", "w-2"], "the latest of source web, newest first: {events}");
    assert!(events.as_array().unwrap().iter().all(|e| e["source"] == "web"));
    let all = api.ok("GET", "/api/events", None);
    assert_eq!(all.as_array().unwrap().len(), 6, "{all}");
    let (s, _) = api.call("GET", "/api/events?limit=abc", Some(TOKEN), None);
    assert_eq!(s, 400);

    wait_until("w-0 delivered", || sink.received_on("/hook").iter().any(|r| r.header("idempotency-key") == Some("w-0")));
    wait_until("w-0 succeeded", || api.ok("GET", "/api/jobs/w-0", None)[0]["state"] == "succeeded");
    let jobs = api.ok("GET", "/api/jobs/w-0", None);
    let states: Vec<&str> = jobs[0]["transitions"].as_array().unwrap().iter().map(|t| t["state"].as_str().unwrap()).collect();
    assert_eq!(states, vec!["awaiting_scheduling", "executing", "succeeded"], "{jobs}");
    assert_eq!(jobs[0]["destination"], "hook");
    assert_eq!(jobs[0]["transitions"][2]["status"], 200);
    assert_eq!(api.ok("GET", "/api/jobs/no-such-message", None), json!([]));
    server.stop();
}

#[test]
fn api_changes_survive_a_restart_and_secrets_stay_write_only() {
    let (dir, server, api, sink) = start(true);
    // A secret is write-only; a PUT without it keeps it while the URL stays, and one
    // changing the URL must send it again (it would sign for another server).
    api.ok("PUT", "/api/destinations/signed", Some(json!({"url": sink.url("/signed"), "secret": "s3cret-value", "allow_private_network": true})));
    api.ok("PUT", "/api/destinations/signed", Some(json!({"url": sink.url("/signed"), "allow_private_network": true, "max_in_flight": 4})));
    let (status, refused) =
        api.call("PUT", "/api/destinations/signed", Some(TOKEN), Some(json!({"url": sink.url("/signed2"), "allow_private_network": true})));
    assert_eq!(status, 400, "{refused}");
    let dests = api.ok("GET", "/api/destinations", None);
    let signed = dests.as_array().unwrap().iter().find(|d| d["id"] == "signed").unwrap().clone();
    assert!(signed.get("secret").is_none() && signed["secret_set"] == true, "{signed}");
    assert!(!dests.to_string().contains("s3cret-value"), "no secret in any answer");
    // A password in a URL is not shown back either; the shown URL sent back keeps it.
    let with_password = sink.url("/creds").replacen("http://", "http://user:hunter2@", 1);
    let shown = api.ok("PUT", "/api/destinations/creds", Some(json!({"url": with_password, "allow_private_network": true})))["url"].clone();
    assert_eq!(shown, json!(sink.url("/creds").replacen("http://", "http://user:***@", 1)));
    api.ok("PUT", "/api/destinations/creds", Some(json!({"url": shown, "allow_private_network": true, "name": "renamed"})));
    assert!(!api.ok("GET", "/api/destinations", None).to_string().contains("hunter2"), "no URL password in any answer");
    let stored: String = rusqlite::Connection::open(dir.path().join("data/control.sqlite"))
        .unwrap()
        .query_row("SELECT config FROM destinations WHERE id = 'creds'", [], |r| r.get(0))
        .unwrap();
    assert!(stored.contains("user:hunter2@") && stored.contains("renamed"), "the stored URL keeps its password: {stored}");
    // QoS changes are partial: other columns keep their values.
    api.ok("PUT", "/api/qos/hook", Some(json!({"max_in_flight": 3, "priority": 5})));
    api.ok("PUT", "/api/qos/hook", Some(json!({"paused": true})));
    let qos = api.ok("GET", "/api/qos", None);
    let hook = qos.as_array().unwrap().iter().find(|q| q["destination"] == "hook").unwrap().clone();
    assert_eq!((hook["paused"].clone(), hook["max_in_flight"].clone(), hook["priority"].clone()), (json!(true), json!(3), json!(5)), "{hook}");
    // Changes to config-seeded rows: a rotated key, a deleted connection.
    let new_key = api.ok("POST", "/api/sources/web/rotate-key", None)["write_key"].as_str().unwrap().to_owned();
    api.ok("DELETE", "/api/connections/web/hook", None);
    let config = server.config.clone();
    server.stop();

    let server = Server::start(&config);
    let api =
        Api { rt: tokio::runtime::Runtime::new().unwrap(), http: reqwest::Client::new(), admin: server.admin.clone(), api: server.addr.clone() };
    assert_eq!(api.track(WRITE_KEY, "r-1"), 401, "the config's old key stays rotated away after a restart");
    assert_eq!(api.track(&new_key, "r-2"), 200);
    let conns = api.ok("GET", "/api/connections", None);
    assert!(
        !conns.as_array().unwrap().contains(&json!({"source": "web", "destination": "hook"})),
        "a deleted config connection stays deleted: {conns}"
    );
    let qos = api.ok("GET", "/api/qos", None);
    assert!(qos.as_array().unwrap().iter().any(|q| q["destination"] == "hook" && q["paused"] == true), "{qos}");
    assert!(api.ok("GET", "/api/destinations", None).as_array().unwrap().iter().any(|d| d["id"] == "signed"), "API destinations survive");
    server.stop();
    drop(dir);
}

#[test]
fn the_admin_port_answers_no_cors_while_the_tracking_api_does() {
    let (_dir, server, api, _sink) = start(true);
    let origin = "http://evil.example";
    let (preflight, request) = api.rt.block_on(async {
        let preflight = |url: String| {
            api.http
                .request(reqwest::Method::OPTIONS, url)
                .header("Origin", origin)
                .header("Access-Control-Request-Method", "POST")
                .header("Access-Control-Request-Headers", "authorization,content-type")
                .send()
        };
        let tracking = preflight(format!("http://{}/v1/batch", api.api)).await.unwrap();
        let mut admin = Vec::new();
        for path in ["/api/sources", "/api/qos/hook", "/v1/batch", "/metrics"] {
            admin.push((path, preflight(format!("http://{}{path}", api.admin)).await.unwrap()));
        }
        for path in ["/api/sources", "/metrics", "/healthz", "/console"] {
            let resp = api.http.get(format!("http://{}{path}", api.admin)).bearer_auth(TOKEN).header("Origin", origin).send().await.unwrap();
            admin.push((path, resp));
        }
        (tracking, admin)
    });
    // The Tracking API on the same server allows the browser (positive control).
    assert!(preflight.status().is_success(), "{}", preflight.status());
    assert_eq!(preflight.headers().get("access-control-allow-origin").and_then(|v| v.to_str().ok()), Some(origin));
    for (path, resp) in &request {
        let cors: Vec<_> = resp.headers().keys().filter(|k| k.as_str().starts_with("access-control-")).collect();
        assert!(cors.is_empty(), "admin {path} answered CORS headers {cors:?} (status {})", resp.status());
    }
    // The authenticated GET itself still works: the port is same-origin, not closed.
    assert!(request.iter().any(|(p, r)| *p == "/api/sources" && r.status() == 200), "GET /api/sources with the token");
    server.stop();
}

#[test]
fn a_wrong_token_of_any_length_is_refused_and_the_right_one_accepted() {
    let (_dir, server, api, _sink) = start(true);
    let reversed: String = TOKEN.chars().rev().collect();
    let last_changed = format!("{}X", &TOKEN[..TOKEN.len() - 1]);
    let longer = format!("{TOKEN}0");
    let wrong = [
        reversed.as_str(),         // same length, other bytes
        last_changed.as_str(),     // same length, differs in the last byte only
        &TOKEN[..TOKEN.len() - 1], // a prefix: shorter
        longer.as_str(),           // an extension: longer
        "",                        // empty
    ];
    for token in wrong {
        let (s, v) = api.call("GET", "/api/sources", Some(token), None);
        assert_eq!((s, v["code"].as_str()), (401, Some("unauthorized")), "token {token:?}: {v}");
    }
    let (s, v) = api.call("GET", "/api/sources", Some(TOKEN), None);
    assert_eq!(s, 200, "{v}");
    server.stop();
}
