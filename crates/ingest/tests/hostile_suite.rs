//! The hostile-input suite of the Tracking API: one table of cases, each
//! with the answer it must get and how many events it may store. Every case
//! name is listed in docs/SECURITY.md (checked below), beside the threat
//! model.
//!
//! Two runs: `router_cases` through the axum router (`oneshot`), and
//! `wire_cases`, raw bytes on a socket to the real server loop (header and
//! framing abuse that only hyper sees). After every case the stored events
//! are checked to be readable as route reads them.

mod common;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use common::*;
use serde_json::{json, Value};
use sluice_ingest::server::ServeOptions;
use tokio::io::AsyncWriteExt;

/// What a case must get back.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// `200 {"success":true}` and this many events stored.
    Stored(usize),
    /// This status and `code`, nothing stored.
    Error(u16, &'static str),
    /// This status (answered before the handler: hyper/axum), nothing stored.
    Status(u16),
}

struct Case {
    name: &'static str,
    request: Request<Body>,
    expect: Expect,
}

fn req(method: Method, path: &str, headers: &[(&str, &str)], body: impl Into<Body>) -> Request<Body> {
    let mut b = Request::builder().method(method).uri(path);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(body.into()).expect("request")
}

fn post(path: &str, headers: &[(&str, &str)], body: impl Into<Body>) -> Request<Body> {
    req(Method::POST, path, headers, body)
}

fn authed(path: &str, body: impl Into<Body>) -> Request<Body> {
    post(path, &[("authorization", &basic_key(WEB_KEY)), ("content-type", "application/json")], body)
}

fn track_with(props: &str) -> String {
    format!(r#"{{"type":"track","userId":"u","event":"E","properties":{props}}}"#)
}

fn nested_arrays(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

fn zeros_gzipped(n: usize) -> Vec<u8> {
    gzip(&vec![b' '; n])
}

fn router_cases() -> Vec<Case> {
    use Expect::*;
    let ok_track = event("track", "m").to_string();
    let big_batch: Vec<Value> = (0..2501).map(|i| event("identify", &format!("b{i}"))).collect();
    let mut gzip_two_members = gzip(br#"{"type":"track","userId":"u","#);
    gzip_two_members.extend(gzip(br#""event":"E"}"#));
    let mut truncated_gzip = gzip(ok_track.as_bytes());
    truncated_gzip.truncate(truncated_gzip.len() / 2);
    let forty_k_keys = {
        let mut s = String::from(r#"{"type":"track","userId":"u","event":"E","#);
        for i in 0..30_000 {
            s.push_str(&format!("\"k{i}\":1,"));
        }
        s.push_str(r#""z":1}"#);
        s
    };
    let long_auth = format!("Basic {}", "A".repeat(8 * 1024));
    let not_utf8_user = format!("Basic {}", base64_of(&[0xff, 0xfe, b':']));
    vec![
        // --- sizes
        Case { name: "empty-body", request: authed("/v1/track", ""), expect: Error(400, "invalid_json") },
        Case { name: "empty-object", request: authed("/v1/track", "{}"), expect: Error(400, "missing_user_id") },
        Case {
            name: "content-length-huge",
            request: post("/v1/track", &[("authorization", &basic_key(WEB_KEY)), ("content-length", "1000000000000")], ""),
            expect: Error(400, "request_too_large"),
        },
        Case {
            name: "batch-2501-events",
            request: authed("/v1/batch", json!({ "batch": big_batch }).to_string()),
            expect: Error(400, "batch_too_large"),
        },
        Case { name: "batch-empty", request: authed("/v1/batch", r#"{"batch":[]}"#), expect: Stored(0) },
        Case {
            name: "message-id-101-chars",
            request: authed("/v1/track", json!({"type":"track","userId":"u","event":"E","messageId":"m".repeat(101)}).to_string()),
            expect: Error(400, "invalid_message_id"),
        },
        Case {
            name: "event-33kb",
            request: authed("/v1/track", track_with(&json!({"p": "x".repeat(33 * 1024)}).to_string())),
            expect: Error(400, "event_too_large"),
        },
        Case {
            name: "body-600kb",
            request: authed("/v1/track", track_with(&json!({"p": "x".repeat(600 * 1024)}).to_string())),
            expect: Error(400, "request_too_large"),
        },
        Case {
            name: "batch-context-amplification",
            request: authed(
                "/v1/batch",
                format!(
                    r#"{{"context":{{"p":"{}"}},"batch":[{}]}}"#,
                    "c".repeat(400 * 1024),
                    vec![r#"{"type":"identify","userId":"u"}"#; 2000].join(",")
                ),
            ),
            expect: Error(400, "event_too_large"),
        },
        Case {
            name: "batch-context-stored-total",
            request: authed(
                "/v1/batch",
                format!(
                    r#"{{"context":{{"p":"{}"}},"batch":[{}]}}"#,
                    "c".repeat(10 * 1024),
                    vec![r#"{"type":"identify","userId":"u"}"#; 2000].join(",")
                ),
            ),
            expect: Error(400, "request_too_large"),
        },
        Case { name: "30k-top-level-keys", request: authed("/v1/track", forty_k_keys), expect: Error(400, "event_too_large") },
        // --- encodings
        Case {
            name: "gzip-bomb",
            request: post("/v1/track", &[("authorization", &basic_key(WEB_KEY)), ("content-encoding", "gzip")], zeros_gzipped(50 * 1024 * 1024)),
            expect: Error(400, "request_too_large"),
        },
        Case {
            name: "gzip-two-members",
            request: post("/v1/track", &[("authorization", &basic_key(WEB_KEY)), ("content-encoding", "gzip")], gzip_two_members),
            expect: Stored(1),
        },
        Case {
            name: "gzip-truncated",
            request: post("/v1/track", &[("authorization", &basic_key(WEB_KEY)), ("content-encoding", "gzip")], truncated_gzip),
            expect: Error(400, "invalid_gzip"),
        },
        Case {
            name: "gzip-claimed-plain-body",
            request: post("/v1/track", &[("authorization", &basic_key(WEB_KEY)), ("content-encoding", "gzip")], ok_track.clone()),
            expect: Error(400, "invalid_gzip"),
        },
        Case {
            name: "encoding-br",
            request: post("/v1/track", &[("authorization", &basic_key(WEB_KEY)), ("content-encoding", "br")], ok_track.clone()),
            expect: Error(415, "unsupported_encoding"),
        },
        Case {
            name: "encoding-gzip-twice",
            request: post(
                "/v1/track",
                &[("authorization", &basic_key(WEB_KEY)), ("content-encoding", "gzip, gzip")],
                gzip(&gzip(ok_track.as_bytes())),
            ),
            expect: Error(415, "unsupported_encoding"),
        },
        Case {
            name: "encoding-not-ascii",
            request: post("/v1/track", &[("authorization", &basic_key(WEB_KEY))], ok_track.clone()).tap_header("content-encoding", &[0xe9]),
            expect: Error(415, "unsupported_encoding"),
        },
        Case {
            name: "body-invalid-utf8",
            request: authed("/v1/track", b"{\"type\":\"track\",\"userId\":\"\xff\",\"event\":\"E\"}".to_vec()),
            expect: Error(400, "invalid_json"),
        },
        Case {
            name: "body-utf8-bom",
            request: authed("/v1/track", [&[0xef, 0xbb, 0xbf][..], ok_track.as_bytes()].concat()),
            expect: Error(400, "invalid_json"),
        },
        Case {
            name: "body-utf16",
            request: authed("/v1/track", ok_track.encode_utf16().flat_map(u16::to_le_bytes).collect::<Vec<u8>>()),
            expect: Error(400, "invalid_json"),
        },
        Case {
            name: "content-type-text-plain",
            request: post("/v1/track", &[("authorization", &basic_key(WEB_KEY)), ("content-type", "text/plain")], ok_track.clone()),
            expect: Stored(1),
        },
        Case {
            name: "content-type-missing",
            request: post("/v1/track", &[("authorization", &basic_key(WEB_KEY))], ok_track.clone()),
            expect: Stored(1),
        },
        Case { name: "escaped-nul-in-string", request: authed("/v1/track", track_with(r#"{"s":"a\u0000b"}"#)), expect: Stored(1) },
        Case {
            name: "raw-nul-byte",
            request: authed("/v1/track", b"{\"type\":\"track\",\"userId\":\"u\0\",\"event\":\"E\"}".to_vec()),
            expect: Error(400, "invalid_json"),
        },
        Case {
            name: "overlong-utf8",
            request: authed("/v1/track", b"{\"type\":\"track\",\"userId\":\"\xc0\xaf\",\"event\":\"E\"}".to_vec()),
            expect: Error(400, "invalid_json"),
        },
        Case { name: "trailing-garbage", request: authed("/v1/track", format!("{ok_track} x")), expect: Error(400, "invalid_json") },
        Case { name: "two-json-objects", request: authed("/v1/track", format!("{ok_track}{ok_track}")), expect: Error(400, "invalid_json") },
        // --- nesting and shapes
        Case {
            name: "nested-200-objects",
            request: authed("/v1/track", track_with(&format!("{}1{}", r#"{"a":"#.repeat(200), "}".repeat(200)))),
            expect: Error(400, "too_deep"),
        },
        Case {
            name: "nested-15k-arrays",
            request: authed("/v1/track", track_with(&format!(r#"{{"a":{}}}"#, nested_arrays(15_000)))),
            expect: Error(400, "too_deep"),
        },
        Case {
            name: "nested-60-arrays-ok",
            request: authed("/v1/track", track_with(&format!(r#"{{"a":{}}}"#, nested_arrays(60)))),
            expect: Stored(1),
        },
        Case {
            name: "nested-63-in-batch-item",
            request: authed("/v1/batch", format!(r#"{{"batch":[{}]}}"#, track_with(&format!(r#"{{"a":{}}}"#, nested_arrays(63))))),
            expect: Error(400, "too_deep"),
        },
        Case { name: "batch-item-not-object", request: authed("/v1/batch", format!(r#"{{"batch":["x",7,null,[],{ok_track}]}}"#)), expect: Stored(1) },
        Case { name: "batch-is-object", request: authed("/v1/batch", r#"{"batch":{"0":{}}}"#), expect: Error(400, "invalid_batch") },
        Case { name: "batch-missing", request: authed("/v1/batch", r#"{"events":[]}"#), expect: Error(400, "invalid_batch") },
        Case { name: "body-is-array", request: authed("/v1/track", format!("[{ok_track}]")), expect: Error(400, "invalid_json") },
        Case { name: "body-is-string", request: authed("/v1/batch", r#""batch""#), expect: Error(400, "invalid_json") },
        Case {
            name: "context-not-object",
            request: authed("/v1/batch", format!(r#"{{"context":"x","integrations":[1],"batch":[{ok_track}]}}"#)),
            expect: Stored(1),
        },
        Case { name: "duplicate-keys", request: authed("/v1/track", r#"{"type":"track","userId":"u","event":"A","event":"B"}"#), expect: Stored(1) },
        // --- numbers
        Case { name: "number-1e400", request: authed("/v1/track", track_with(r#"{"n":1e400}"#)), expect: Error(400, "invalid_value") },
        Case { name: "number-minus-1e400", request: authed("/v1/track", track_with(r#"{"n":-1e400}"#)), expect: Error(400, "invalid_value") },
        Case {
            name: "number-400-digits",
            request: authed("/v1/track", track_with(&format!(r#"{{"n":1{}}}"#, "0".repeat(400)))),
            expect: Error(400, "invalid_value"),
        },
        Case { name: "number-1e-400", request: authed("/v1/track", track_with(r#"{"n":1e-400}"#)), expect: Stored(1) },
        Case { name: "number-1e30-integer", request: authed("/v1/track", track_with(r#"{"n":1000000000000000000000000000000}"#)), expect: Stored(1) },
        Case { name: "number-nan-literal", request: authed("/v1/track", track_with(r#"{"n":NaN}"#)), expect: Error(400, "invalid_json") },
        Case { name: "number-leading-zero", request: authed("/v1/track", track_with(r#"{"n":0123}"#)), expect: Error(400, "invalid_json") },
        Case {
            name: "number-as-user-id",
            request: authed("/v1/track", r#"{"type":"track","userId":12345678901234567890,"event":"E"}"#),
            expect: Stored(1),
        },
        // --- unicode
        Case { name: "lone-high-surrogate", request: authed("/v1/track", track_with(r#"{"s":"\ud800"}"#)), expect: Error(400, "invalid_value") },
        Case { name: "lone-low-surrogate", request: authed("/v1/track", track_with(r#"{"s":"\udc00"}"#)), expect: Error(400, "invalid_value") },
        Case { name: "lone-surrogate-in-key", request: authed("/v1/track", track_with(r#"{"\ud800":1}"#)), expect: Error(400, "invalid_value") },
        Case {
            name: "lone-surrogate-in-event-name",
            request: authed("/v1/track", r#"{"type":"track","userId":"u","event":"\ud800"}"#),
            expect: Error(400, "invalid_value"),
        },
        Case { name: "surrogate-pair-escaped", request: authed("/v1/track", track_with(r#"{"s":"\ud83d\ude00"}"#)), expect: Stored(1) },
        Case { name: "emoji-raw", request: authed("/v1/track", track_with(r#"{"s":"😀 ünïcødé"}"#)), expect: Stored(1) },
        Case { name: "noncharacter-uffff", request: authed("/v1/track", track_with("{\"s\":\"\u{ffff}\"}")), expect: Stored(1) },
        Case {
            name: "rtl-override-event-name",
            request: authed("/v1/track", "{\"type\":\"track\",\"userId\":\"u\",\"event\":\"\u{202e}gnp.exe\"}"),
            expect: Stored(1),
        },
        Case {
            name: "message-id-100-multibyte",
            request: authed("/v1/track", json!({"type":"track","userId":"u","event":"E","messageId":"é".repeat(100)}).to_string()),
            expect: Stored(1),
        },
        Case {
            name: "message-id-newline",
            request: authed("/v1/track", r#"{"type":"track","userId":"u","event":"E","messageId":"ctl\nnewline"}"#),
            expect: Error(400, "invalid_message_id"),
        },
        Case {
            name: "message-id-nul-and-del",
            request: authed(
                "/v1/batch",
                r#"{"batch":[{"type":"track","userId":"u","event":"E","messageId":"a\u0000"},{"type":"track","userId":"u","event":"E","messageId":"b\u007f"}]}"#,
            ),
            expect: Error(400, "invalid_message_id"),
        },
        Case {
            name: "message-id-with-slash",
            request: authed("/v1/track", r#"{"type":"track","userId":"u","event":"E","messageId":"a/b/c"}"#),
            expect: Stored(1),
        },
        // --- auth forms
        Case {
            name: "basic-key-colon",
            request: post("/v1/track", &[("authorization", &basic(&format!("{WEB_KEY}:")))], ok_track.clone()),
            expect: Stored(1),
        },
        Case { name: "basic-key-no-colon", request: post("/v1/track", &[("authorization", &basic(WEB_KEY))], ok_track.clone()), expect: Stored(1) },
        Case {
            name: "basic-key-with-password",
            request: post("/v1/track", &[("authorization", &basic(&format!("{WEB_KEY}:secret")))], ok_track.clone()),
            expect: Stored(1),
        },
        Case {
            name: "basic-lowercase-scheme",
            request: post("/v1/track", &[("authorization", &format!("basic {}", base64_of(format!("{WEB_KEY}:").as_bytes())))], ok_track.clone()),
            expect: Stored(1),
        },
        Case {
            name: "bearer-scheme",
            request: post("/v1/track", &[("authorization", &format!("Bearer {WEB_KEY}"))], ok_track.clone()),
            expect: Error(401, "invalid_write_key"),
        },
        Case {
            name: "basic-bad-base64",
            request: post("/v1/track", &[("authorization", "Basic !!!not-base64")], ok_track.clone()),
            expect: Error(401, "invalid_write_key"),
        },
        Case {
            name: "basic-not-utf8",
            request: post("/v1/track", &[("authorization", &not_utf8_user)], ok_track.clone()),
            expect: Error(401, "invalid_write_key"),
        },
        Case {
            name: "basic-empty-user",
            request: post("/v1/track", &[("authorization", &basic(":"))], ok_track.clone()),
            expect: Error(401, "invalid_write_key"),
        },
        Case {
            name: "basic-unknown-key",
            request: post("/v1/track", &[("authorization", &basic_key("wk_guess"))], ok_track.clone()),
            expect: Error(401, "invalid_write_key"),
        },
        Case {
            name: "basic-key-wrong-case",
            request: post("/v1/track", &[("authorization", &basic_key(&WEB_KEY.to_uppercase()))], ok_track.clone()),
            expect: Error(401, "invalid_write_key"),
        },
        Case {
            name: "authorization-8kb",
            request: post("/v1/track", &[("authorization", &long_auth)], ok_track.clone()),
            expect: Error(401, "invalid_write_key"),
        },
        Case {
            name: "unknown-header-key-beats-body-key",
            request: post(
                "/v1/track",
                &[("authorization", &basic_key("wk_guess"))],
                json!({"type":"track","userId":"u","event":"E","writeKey":WEB_KEY}).to_string(),
            ),
            expect: Error(401, "invalid_write_key"),
        },
        Case {
            name: "unknown-header-key-invalid-json",
            request: post("/v1/batch", &[("authorization", &basic_key("wk_guess"))], "{{{{"),
            expect: Error(401, "invalid_write_key"),
        },
        Case {
            name: "body-write-key",
            request: post("/v1/track", &[], json!({"type":"track","userId":"u","event":"E","writeKey":WEB_KEY}).to_string()),
            expect: Stored(1),
        },
        Case {
            name: "body-write-key-number",
            request: post("/v1/track", &[], r#"{"type":"track","userId":"u","event":"E","writeKey":7}"#),
            expect: Error(401, "invalid_write_key"),
        },
        Case {
            name: "write-key-only-in-batch-item",
            request: post("/v1/batch", &[], json!({"batch":[{"type":"track","userId":"u","event":"E","writeKey":WEB_KEY}]}).to_string()),
            expect: Error(401, "invalid_write_key"),
        },
        Case { name: "no-key-at-all", request: post("/v1/track", &[], ok_track.clone()), expect: Error(401, "invalid_write_key") },
        // --- paths and methods
        Case { name: "path-traversal", request: authed("/v1/../api/sources", ok_track.clone()), expect: Error(404, "not_found") },
        Case { name: "path-encoded-nul", request: authed("/v1/track%00", ok_track.clone()), expect: Error(404, "not_found") },
        Case { name: "path-invalid-percent-utf8", request: authed("/v1/%ff%fe", ok_track.clone()), expect: Error(404, "not_found") },
        Case {
            name: "analytics-js-telemetry-path",
            request: post("/v1/m", &[("content-type", "text/plain")], r#"{"series":[{"type":"Counter","metric":"analytics_js.invoke","value":1}]}"#),
            expect: Stored(0),
        },
        Case { name: "path-unknown-call", request: authed("/v1/purchase", ok_track.clone()), expect: Error(404, "not_found") },
        Case { name: "method-get", request: req(Method::GET, "/v1/track", &[], ""), expect: Error(405, "method_not_allowed") },
        Case {
            name: "method-put",
            request: req(Method::PUT, "/v1/batch", &[("authorization", &basic_key(WEB_KEY))], ok_track.clone()),
            expect: Error(405, "method_not_allowed"),
        },
        // --- event semantics
        Case { name: "type-mismatch-path", request: authed("/v1/identify", ok_track.clone()), expect: Error(400, "invalid_type") },
        Case {
            name: "type-unknown",
            request: authed("/v1/batch", r#"{"batch":[{"type":"purchase","userId":"u"}]}"#),
            expect: Error(400, "invalid_type"),
        },
        Case {
            name: "type-not-string",
            request: authed("/v1/batch", r#"{"batch":[{"type":["track"],"userId":"u","event":"E"}]}"#),
            expect: Error(400, "invalid_type"),
        },
        Case {
            name: "timestamps-far-apart",
            request: authed(
                "/v1/track",
                r#"{"type":"track","userId":"u","event":"E","timestamp":"-260000-01-01T00:00:00","sentAt":"+260000-01-01T00:00:00"}"#,
            ),
            expect: Stored(1),
        },
        Case {
            name: "timestamp-garbage",
            request: authed("/v1/track", r#"{"type":"track","userId":"u","event":"E","timestamp":"yesterday","sentAt":{"a":1}}"#),
            expect: Stored(1),
        },
        Case {
            name: "timestamp-not-string",
            request: authed("/v1/track", r#"{"type":"track","userId":"u","event":"E","timestamp":1e300}"#),
            expect: Stored(1),
        },
        Case {
            name: "identity-empty-and-null",
            request: authed("/v1/track", r#"{"type":"track","userId":"","anonymousId":null,"event":"E"}"#),
            expect: Error(400, "missing_user_id"),
        },
        Case {
            name: "identity-object",
            request: authed("/v1/track", r#"{"type":"track","userId":{"id":1},"event":"E"}"#),
            expect: Error(400, "missing_user_id"),
        },
        Case { name: "alias-without-previous-id", request: authed("/v1/alias", r#"{"userId":"u"}"#), expect: Error(400, "missing_field") },
        Case { name: "track-empty-event", request: authed("/v1/track", r#"{"userId":"u","event":""}"#), expect: Error(400, "missing_field") },
        Case {
            name: "message-id-number",
            request: authed("/v1/track", r#"{"type":"track","userId":"u","event":"E","messageId":1}"#),
            expect: Error(400, "invalid_message_id"),
        },
    ]
}

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Setting a header whose value is not valid UTF-8 (the builder takes bytes).
trait TapHeader {
    fn tap_header(self, name: &str, value: &[u8]) -> Self;
}

impl TapHeader for Request<Body> {
    fn tap_header(mut self, name: &str, value: &[u8]) -> Self {
        let name = http::HeaderName::from_bytes(name.as_bytes()).unwrap();
        self.headers_mut().insert(name, http::HeaderValue::from_bytes(value).unwrap());
        self
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_router_case_gets_its_answer_and_stores_only_what_it_should() {
    let mut failures = Vec::new();
    let cases = router_cases();
    assert!(cases.len() >= 80, "{} cases", cases.len());
    for case in cases {
        let h = Harness::new();
        let resp = h.send(case.request).await;
        let stored = h.records().len(); // parses every record as route does
        let got = format!("{} {} (stored {stored})", resp.status.as_u16(), resp.text());
        let ok = match case.expect {
            Expect::Stored(n) => resp.status == StatusCode::OK && resp.json() == json!({"success": true}) && stored == n,
            Expect::Error(status, code) => {
                resp.status.as_u16() == status
                    && stored == 0
                    && serde_json::from_slice::<Value>(&resp.body)
                        .is_ok_and(|v| v["code"] == code && v["message"].as_str().is_some_and(|m| !m.is_empty()))
            }
            Expect::Status(status) => resp.status.as_u16() == status && stored == 0,
        };
        if !ok {
            failures.push(format!("{}: expected {:?}, got {}", case.name, case.expect, truncate(&got)));
        }
    }
    assert!(failures.is_empty(), "{} case(s) failed:\n{}", failures.len(), failures.join("\n"));
}

fn truncate(s: &str) -> String {
    s.chars().take(300).collect()
}

/// Raw bytes on a socket to the real server: framing and header abuse.
fn wire_cases() -> Vec<(&'static str, Vec<u8>, Expect)> {
    use Expect::*;
    let body = event("track", "w").to_string();
    let auth = basic_key(WEB_KEY);
    let with_headers = |extra: &str, body: &str| {
        format!("POST /v1/track HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n{extra}Content-Length: {}\r\n\r\n{body}", body.len()).into_bytes()
    };
    let many_headers: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
    vec![
        ("wire-valid-request", with_headers("", &body), Stored(1)),
        ("wire-header-100kb", with_headers(&format!("X-Big: {}\r\n", "a".repeat(100 * 1024)), &body), Status(431)),
        ("wire-200-headers", with_headers(&many_headers, &body), Status(431)),
        (
            "wire-cl-and-te-smuggling",
            format!(
                "POST /v1/track HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            )
            .into_bytes(),
            Status(400),
        ),
        ("wire-two-content-lengths", with_headers("Content-Length: 3\r\n", &body), Status(400)),
        (
            "wire-negative-content-length",
            format!("POST /v1/track HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Length: -1\r\n\r\n").into_bytes(),
            Status(400),
        ),
        ("wire-uri-70kb", format!("POST /v1/{} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", "a".repeat(70 * 1024)).into_bytes(), Status(431)),
        (
            "wire-uri-40kb",
            format!("POST /v1/{} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", "a".repeat(40 * 1024)).into_bytes(),
            Error(404, "not_found"),
        ),
        (
            "wire-http10-no-host",
            format!("POST /v1/track HTTP/1.0\r\nAuthorization: {auth}\r\nContent-Length: {}\r\n\r\n{body}", body.len()).into_bytes(),
            Stored(1),
        ),
        ("wire-garbage-request-line", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 hello\r\n\r\n".to_vec(), Status(400)),
        (
            "wire-bare-lf-lines",
            format!("POST /v1/track HTTP/1.1\nHost: x\nAuthorization: {auth}\nContent-Length: {}\n\n{body}", body.len()).into_bytes(),
            Stored(1),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_wire_case_gets_its_answer() {
    let mut failures = Vec::new();
    for (name, bytes, expect) in wire_cases() {
        let server = Server::start(Harness::new(), ServeOptions::default()).await;
        let mut conn = server.connect().await;
        let _ = conn.write_all(&bytes).await;
        let resp = tokio::time::timeout(Duration::from_secs(10), read_response(&mut conn)).await;
        let stored = server.harness.records().len();
        let outcome = match resp {
            Ok(Ok(r)) => {
                let ok = match expect {
                    Expect::Stored(n) => r.status == 200 && stored == n,
                    Expect::Error(status, code) => r.status == status && stored == 0 && r.json()["code"] == code,
                    Expect::Status(status) => r.status == status && stored == 0,
                };
                (!ok).then(|| format!("got {} {:?} (stored {stored})", r.status, truncate(&String::from_utf8_lossy(&r.body))))
            }
            // A close without an answer is acceptable only for an error case
            // the client cannot be talking HTTP in (none so far).
            Ok(Err(e)) => Some(format!("no answer: {e}")),
            Err(_) => Some("no answer in 10 s".to_owned()),
        };
        if let Some(got) = outcome {
            failures.push(format!("{name}: expected {expect:?}, {got}"));
        }
        drop(conn);
        server.stop().await;
    }
    assert!(failures.is_empty(), "{} case(s) failed:\n{}", failures.len(), failures.join("\n"));
}

/// Every case is listed in docs/SECURITY.md, so the document and the suite
/// cannot drift apart.
#[test]
fn every_case_is_listed_in_security_md() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/SECURITY.md")).expect("docs/SECURITY.md");
    let names: Vec<&str> = router_cases().iter().map(|c| c.name).chain(wire_cases().iter().map(|c| c.0)).collect();
    let missing: Vec<&str> = names.iter().copied().filter(|n| !doc.contains(&format!("`{n}`"))).collect();
    assert!(missing.is_empty(), "cases missing from docs/SECURITY.md: {missing:?}");
}
