//! The admin port against hostile or careless callers: every error is JSON
//! `{"code","message"}` with the right status (unknown path, wrong method,
//! bad JSON, bad path or query parameter), every answer carries the
//! anti-framing and no-sniff headers, and the event debugger's answer is
//! bounded however large the events and the `limit` asked.

mod util;

use serde_json::{json, Value};
use util::*;

const TOKEN: &str = "test-admin-token-0123456789";

struct Admin {
    rt: tokio::runtime::Runtime,
    http: reqwest::Client,
    admin: String,
    api: String,
}

struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
    }
}

impl Admin {
    fn start() -> (tempfile::TempDir, Server, Admin) {
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(dir.path(), "");
        set_admin_token(&config, TOKEN);
        let server = Server::start(&config);
        let admin = Admin {
            rt: tokio::runtime::Runtime::new().unwrap(),
            http: reqwest::Client::new(),
            admin: server.admin.clone(),
            api: server.addr.clone(),
        };
        (dir, server, admin)
    }

    fn call(&self, method: &str, path: &str, content_type: Option<&str>, body: Option<&str>) -> Answer {
        self.rt.block_on(async {
            let mut req = self.http.request(method.parse().unwrap(), format!("http://{}{path}", self.admin)).bearer_auth(TOKEN);
            if let Some(t) = content_type {
                req = req.header("content-type", t);
            }
            if let Some(b) = body {
                req = req.body(b.to_owned());
            }
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            let body = resp.bytes().await.unwrap().to_vec();
            Answer { status, headers, body }
        })
    }

    fn get(&self, path: &str) -> Answer {
        self.call("GET", path, None, None)
    }

    fn batch(&self, events: Vec<Value>) {
        let status = self.rt.block_on(async {
            self.http
                .post(format!("http://{}/v1/batch", self.api))
                .basic_auth(WRITE_KEY, Some(""))
                .json(&json!({ "batch": events }))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        });
        assert_eq!(status, 200);
    }
}

#[test]
fn every_admin_error_is_json_with_the_right_status() {
    let (_dir, server, admin) = Admin::start();
    let cases: Vec<(&str, &str, Option<&str>, Option<&str>, u16, &str)> = vec![
        ("GET", "/api/no-such-thing", None, None, 404, "not_found"),
        ("GET", "/no-such-page", None, None, 404, "not_found"),
        ("GET", "/api/sources/web/rotate-key", None, None, 405, "method_not_allowed"),
        ("DELETE", "/api/sources", None, None, 405, "method_not_allowed"),
        ("POST", "/api/sources", Some("application/json"), Some("{\"id\": "), 400, "invalid"),
        ("POST", "/api/sources", Some("text/plain"), Some("{\"id\":\"x\"}"), 400, "invalid"),
        ("POST", "/api/sources", Some("application/json"), Some("{\"id\":\"x\",\"nope\":1}"), 400, "invalid"),
        ("GET", "/api/replays/not-a-number", None, None, 400, "invalid"),
        ("GET", "/api/dead-letters/99999999999999999999999", None, None, 400, "invalid"),
        ("GET", "/api/dead-letters?limit=abc", None, None, 400, "invalid"),
        ("GET", "/api/events?limit=-1", None, None, 400, "invalid"),
        ("GET", "/api/events?bogus=1", None, None, 400, "invalid"),
        ("GET", "/api/events/0/not-an-offset", None, None, 400, "invalid"),
        ("GET", "/api/events/999/0", None, None, 404, "not_found"),
        ("GET", "/api/events/0/123456789", None, None, 404, "not_found"),
    ];
    let mut failures = Vec::new();
    for (method, path, content_type, body, status, code) in cases {
        let a = admin.call(method, path, content_type, body);
        let v = a.json();
        let ok = a.status == status
            && a.header("content-type").starts_with("application/json")
            && v["code"] == code
            && v["message"].as_str().is_some_and(|m| !m.is_empty());
        if !ok {
            failures.push(format!("{method} {path}: {} {:?} {}", a.status, a.header("content-type"), String::from_utf8_lossy(&a.body)));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // A 405 still says which methods are allowed.
    assert!(admin.call("DELETE", "/api/sources", None, None).header("allow").contains("GET"));
    server.stop();
}

#[test]
fn admin_answers_carry_security_headers() {
    let (_dir, server, admin) = Admin::start();
    for path in ["/", "/console", "/healthz", "/metrics", "/api/sources", "/api/no-such-thing"] {
        let a = admin.get(path);
        assert_eq!(a.header("x-frame-options"), "DENY", "{path}");
        assert_eq!(a.header("content-security-policy"), "frame-ancestors 'none'", "{path}");
        assert_eq!(a.header("x-content-type-options"), "nosniff", "{path}");
        if path.starts_with("/api") {
            assert_eq!(a.header("cache-control"), "no-store", "{path}");
        }
    }
    server.stop();
}

#[test]
fn the_event_debugger_answer_is_bounded() {
    let (_dir, server, admin) = Admin::start();
    // 250 small events: more than the most one answer lists.
    admin.batch((0..250).map(|i| json!({"type": "track", "userId": "u", "event": "Small", "messageId": format!("s-{i}")})).collect());
    let a = admin.get("/api/events?limit=1000");
    assert_eq!(a.status, 200);
    assert_eq!(a.json().as_array().unwrap().len(), 200, "limit clamped to 200");

    // 60 events of 30 KB: listed as summaries with an excerpt, the answer under 1 MiB.
    let blob = "x".repeat(30_000);
    for chunk in 0..6 {
        admin.batch(
            (0..10)
                .map(|i| json!({"type": "track", "userId": "u", "event": "Big", "messageId": format!("b-{chunk}-{i}"), "properties": {"blob": blob}}))
                .collect(),
        );
    }
    let a = admin.get("/api/events?limit=1000");
    assert_eq!(a.status, 200);
    assert!(a.body.len() <= (1 << 20) + 4096, "answer of {} bytes", a.body.len());
    let events = a.json();
    let events = events.as_array().unwrap();
    let big: Vec<&Value> = events.iter().filter(|e| e["event"]["event"] == "Big").collect();
    assert_eq!(big.len(), 60, "every big event listed (as a summary)");
    for e in &big {
        assert_eq!(e["truncated"], true, "{e}");
        assert!(e["bytes"].as_u64().unwrap() > 30_000);
        assert!(e["excerpt"].as_str().unwrap().len() <= 600);
        assert!(e["event"]["messageId"].as_str().unwrap().starts_with("b-"));
        assert!(e["event"].get("properties").is_none());
    }
    // The whole event, by partition and offset.
    let e = big[0];
    let whole = admin.get(&format!("/api/events/{}/{}", e["partition"], e["offset"]));
    assert_eq!(whole.status, 200);
    let whole = whole.json();
    assert_eq!(whole["event"]["messageId"], e["event"]["messageId"]);
    assert_eq!(whole["event"]["properties"]["blob"].as_str().map(str::len), Some(30_000));
    assert!(whole.get("truncated").is_none());
    server.stop();
}

/// The admin port has an error budget of its own (token guessing is slowed),
/// but a health probe or a metrics scrape from the same address is never
/// held, and its 429 keeps the admin port's security headers and stays
/// same-origin (found by a red-team run: 40 threads of 404s from one
/// address made `/healthz` answer 429, with `Access-Control-Allow-Origin: *`).
#[test]
fn the_admin_error_budget_spares_health_and_metrics_and_keeps_its_headers() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    set_admin_token(&config, TOKEN);
    let server = Server::start_with_env(&config, &[("SLUICE_SERVER__CLIENT_ERROR_BUDGET", "1")]); // bursts of 5
    let admin =
        Admin { rt: tokio::runtime::Runtime::new().unwrap(), http: reqwest::Client::new(), admin: server.admin.clone(), api: server.addr.clone() };
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(admin.get("/api/no-such-thing").status);
    }
    assert_eq!(statuses, [404, 404, 404, 404, 404, 429], "five refusals are the burst");
    // The held second gave back about one token: spend it, so the bucket is empty again.
    admin.get("/api/no-such-thing");
    assert_eq!(admin.get("/healthz").status, 200, "health probes are never held");
    assert_eq!(admin.get("/metrics").status, 200, "metric scrapes are never held");
    let held = admin.get("/api/sources");
    assert_eq!(held.status, 429);
    assert_eq!(held.json()["code"], "client_error_budget");
    assert_eq!(held.header("x-frame-options"), "DENY");
    assert_eq!(held.header("x-content-type-options"), "nosniff");
    assert_eq!(held.header("access-control-allow-origin"), "", "the admin port stays same-origin");
    server.stop();
}

/// The admin port authorizes an `/api` request from its headers before it
/// reads any body, and a body that does not arrive in time is answered 408:
/// before, a caller without the token could announce a 1.9 MB body and hold
/// the connection (and the buffered bytes) for as long as it liked.
#[test]
fn the_admin_api_checks_the_token_before_the_body_and_bounds_its_wait() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    set_admin_token(&config, TOKEN);
    let text = std::fs::read_to_string(&config).unwrap().replacen("[server]\n", "[server]\nbody_read_timeout = \"1s\"\n", 1);
    std::fs::write(&config, text).unwrap();
    let server = Server::start(&config);
    let wait = std::time::Duration::from_secs(20);

    // No token, a large body announced, none sent: 401 at once.
    let head = "POST /api/sources HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1900000\r\n\r\n";
    let status = raw_status_line(&server.admin, head, wait).unwrap();
    assert!(status.contains(" 401 "), "{status}");

    // With the token, half a body and then nothing: 408 after body_read_timeout.
    let head = format!(
        "PUT /api/qos/hook HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"rate"
    );
    let status = raw_status_line(&server.admin, &head, wait).unwrap();
    assert!(status.contains(" 408 "), "{status}");

    // A body over the limit is refused without being kept.
    let head = format!(
        "POST /api/sources HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        3 << 20
    );
    let status = raw_status_line(&server.admin, &head, wait).unwrap();
    assert!(status.contains(" 413 "), "{status}");
    server.stop();
}
