//! CORS on the Tracking API (the headers a browser needs to send with
//! analytics.js from a page of another origin): preflights, the allowed
//! origin on successes and on every kind of error, no credentials.
//! Requests go through `sluice_ingest::router` with `oneshot`, as in api.rs.
//! That the admin port answers no CORS is checked in
//! crates/sluice/tests/admin_api.rs; the browser itself in
//! crates/sluice/tests/sdk_compat.rs (analytics.js in Chromium).

mod common;

use std::sync::Arc;

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use serde_json::json;
use sluice_ingest::{router, Ingest};
use sluice_log::{Checkpoint, Log, LogError, OffsetRange, Record, StoredRecord};

use common::*;

const ORIGIN: &str = "http://shop.example:8080";

fn preflight(path: &str, origin: &str, request_headers: Option<&str>) -> Request<Body> {
    let mut b =
        Request::builder().method(Method::OPTIONS).uri(path).header(header::ORIGIN, origin).header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST");
    if let Some(h) = request_headers {
        b = b.header(header::ACCESS_CONTROL_REQUEST_HEADERS, h);
    }
    b.body(Body::empty()).unwrap()
}

fn hdr(resp: &Resp, name: header::HeaderName) -> Option<&str> {
    resp.headers.get(name).map(|v| v.to_str().expect("ASCII header"))
}

/// `Access-Control-Allow-Origin` is the request's origin, no credentials are
/// allowed, and `Vary` names Origin.
fn assert_cors_answer(resp: &Resp, origin: &str, what: &str) {
    assert_eq!(hdr(resp, header::ACCESS_CONTROL_ALLOW_ORIGIN), Some(origin), "{what}: ACAO; headers {:?}", resp.headers);
    assert!(resp.headers.get(header::ACCESS_CONTROL_ALLOW_CREDENTIALS).is_none(), "{what}: no credentials");
    let vary: Vec<&str> = resp.headers.get_all(header::VARY).iter().map(|v| v.to_str().unwrap()).collect();
    assert!(vary.iter().any(|v| v.to_ascii_lowercase().contains("origin")), "{what}: Vary: Origin, got {vary:?}");
}

#[tokio::test]
async fn preflight_on_tracking_paths_allows_post_and_echoes_the_origin_and_requested_headers() {
    let h = Harness::new();
    // What Chromium sends for analytics.js (1.84): Authorization and
    // Content-Type text/plain, X-Retry-Count on retries.
    let asked = "authorization,content-type,x-retry-count";
    for path in ["/v1/batch", "/v1/b", "/v1/t", "/v1/i", "/v1/p", "/v1/s", "/v1/g", "/v1/a", "/v1/track", "/v1/batch/", "/v1/import"] {
        let resp = h.send(preflight(path, ORIGIN, Some(asked))).await;
        assert!(matches!(resp.status, StatusCode::OK | StatusCode::NO_CONTENT), "{path}: preflight answered {}", resp.status);
        assert_cors_answer(&resp, ORIGIN, path);
        let methods = hdr(&resp, header::ACCESS_CONTROL_ALLOW_METHODS).unwrap_or_else(|| panic!("{path}: no Allow-Methods"));
        let methods: Vec<String> = methods.split(',').map(|m| m.trim().to_ascii_uppercase()).collect();
        assert!(methods.iter().any(|m| m == "POST"), "{path}: {methods:?}");
        let allowed = hdr(&resp, header::ACCESS_CONTROL_ALLOW_HEADERS).unwrap_or_else(|| panic!("{path}: no Allow-Headers")).to_ascii_lowercase();
        for want in ["authorization", "content-type", "x-retry-count"] {
            assert!(allowed.contains(want), "{path}: Allow-Headers {allowed:?} lacks {want}");
        }
        let max_age: u64 = hdr(&resp, header::ACCESS_CONTROL_MAX_AGE).expect("Max-Age").parse().expect("Max-Age is seconds");
        assert!(max_age >= 600, "{path}: Max-Age {max_age}");
    }
    // Another origin gets its own origin back; a preflight naming no
    // headers still allows Content-Type.
    let other = "https://app.other.example";
    let resp = h.send(preflight("/v1/track", other, None)).await;
    assert!(resp.status.is_success());
    assert_cors_answer(&resp, other, "no requested headers");
    let allowed = hdr(&resp, header::ACCESS_CONTROL_ALLOW_HEADERS).unwrap_or("").to_ascii_lowercase();
    assert!(allowed.contains("content-type"), "{allowed:?}");
    assert!(h.records().is_empty(), "a preflight stores nothing");
}

#[tokio::test]
async fn a_browser_post_with_the_write_key_in_the_body_is_stored_and_carries_the_origin() {
    let h = Harness::new();
    for (path, body) in [
        ("/v1/t", json!({"type": "track", "event": "Clicked", "userId": "u", "messageId": "cors-t", "writeKey": WEB_KEY})),
        ("/v1/b", json!({"writeKey": WEB_KEY, "batch": [event("identify", "cors-b1"), event("page", "cors-b2")]})),
    ] {
        let req = post_raw(path, &[("content-type", "text/plain"), ("origin", ORIGIN)], body.to_string());
        let resp = h.send(req).await;
        resp.assert_success();
        assert_cors_answer(&resp, ORIGIN, path);
        let exposed = hdr(&resp, header::ACCESS_CONTROL_EXPOSE_HEADERS).unwrap_or("").to_ascii_lowercase();
        assert!(exposed.contains("retry-after"), "Retry-After is readable by the page: {exposed:?}");
    }
    // And with the key in Authorization, as analytics.js 1.84 also sends it.
    let req = Request::post("/v1/p")
        .header(header::CONTENT_TYPE, "text/plain")
        .header(header::ORIGIN, ORIGIN)
        .header(header::AUTHORIZATION, basic_key(WEB_KEY))
        .body(Body::from(event("page", "cors-p").to_string()))
        .unwrap();
    let resp = h.send(req).await;
    resp.assert_success();
    assert_cors_answer(&resp, ORIGIN, "/v1/p");
    for id in ["cors-t", "cors-b1", "cors-b2", "cors-p"] {
        h.by_message_id(id);
    }
    assert_eq!(h.records().len(), 4);
}

#[tokio::test]
async fn error_answers_carry_the_allowed_origin() {
    let with_origin = |path: &str, body: String| post_raw(path, &[("content-type", "text/plain"), ("origin", ORIGIN)], body);
    let h = Harness::with(settings(), &[source(WEB, WEB_KEY, Some(1), Some(1))]);

    // 401: unknown key, and no key.
    let resp = h.send(with_origin("/v1/t", json!({"type": "track", "event": "e", "userId": "u", "writeKey": "nope"}).to_string())).await;
    resp.assert_error(StatusCode::UNAUTHORIZED, "invalid_write_key");
    assert_cors_answer(&resp, ORIGIN, "401");
    // 400: not JSON.
    let resp = h.send(with_origin("/v1/t", "{not json".into())).await;
    resp.assert_error_shape(StatusCode::BAD_REQUEST);
    assert_cors_answer(&resp, ORIGIN, "400");
    // 404: unknown endpoint.
    let resp = h.send(with_origin("/v1/nope", "{}".into())).await;
    resp.assert_error_shape(StatusCode::NOT_FOUND);
    assert_cors_answer(&resp, ORIGIN, "404");
    // 405: a GET.
    let get = Request::get("/v1/track").header(header::ORIGIN, ORIGIN).body(Body::empty()).unwrap();
    let resp = h.send(get).await;
    resp.assert_error_shape(StatusCode::METHOD_NOT_ALLOWED);
    assert_cors_answer(&resp, ORIGIN, "405");
    // 429: the bucket of 1 is spent by the first event.
    let ok = json!({"type": "track", "event": "e", "userId": "u", "messageId": "rl-1", "writeKey": WEB_KEY});
    h.send(with_origin("/v1/t", ok.to_string())).await.assert_success();
    let resp = h.send(with_origin("/v1/t", ok.to_string())).await;
    resp.assert_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    assert_cors_answer(&resp, ORIGIN, "429");
    assert!(resp.retry_after().is_some());
    let exposed = hdr(&resp, header::ACCESS_CONTROL_EXPOSE_HEADERS).unwrap_or("").to_ascii_lowercase();
    assert!(exposed.contains("retry-after"), "the page can read a 429's Retry-After: {exposed:?}");

    // 503: the log refuses the append.
    let ingest = Arc::new(Ingest::new(Arc::new(FailingLog), settings(), &sources(), 0).unwrap());
    let app = router(ingest);
    let resp = send(&app, with_origin("/v1/t", ok.to_string())).await;
    resp.assert_error_shape(StatusCode::SERVICE_UNAVAILABLE);
    assert_cors_answer(&resp, ORIGIN, "503");
}

#[tokio::test]
async fn requests_without_origin_are_answered_as_before() {
    let h = Harness::new();
    let resp = h.send(post_json("/v1/track", Some(WEB_KEY), &event("track", "plain"))).await;
    resp.assert_success();
    assert!(resp.headers.get(header::ACCESS_CONTROL_ALLOW_ORIGIN).is_none(), "server-to-server answers are unchanged");
    h.by_message_id("plain");
}

/// A log whose appends always fail.
struct FailingLog;

#[async_trait]
impl Log for FailingLog {
    fn partitions(&self, _topic: &str) -> Result<u32, LogError> {
        Ok(4)
    }
    async fn append(&self, _topic: &str, _partition: u32, _records: Vec<Record>) -> Result<u64, LogError> {
        Err(LogError::Io { path: "/dev/full".into(), source: std::io::Error::other("no space left on device") })
    }
    async fn read(&self, _: &str, _: u32, _: u64, _: usize) -> Result<Vec<StoredRecord>, LogError> {
        Ok(Vec::new())
    }
    async fn offsets(&self, _: &str, _: u32) -> Result<OffsetRange, LogError> {
        Ok(OffsetRange { start: 0, end: 0 })
    }
    async fn commit(&self, _: Checkpoint<'_>) -> Result<(), LogError> {
        Ok(())
    }
    async fn committed(&self, _: &str, _: &str, _: u32) -> Result<Option<u64>, LogError> {
        Ok(None)
    }
}
