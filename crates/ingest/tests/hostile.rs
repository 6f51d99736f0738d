//! Regression tests for the hostile inputs of the hardening issue: each
//! one was reproduced against the release binary before its fix.
//!
//! - amplification through the batch-level `context` (the stored event is
//!   bounded, and so is what one request stores);
//! - a skew correction that overflowed and panicked (and took the batch);
//! - values ingest skimmed but route could not read (deep nesting, `1e400`,
//!   lone surrogates);
//! - authentication before any JSON work; linear object handling;
//! - per-client connection limits;
//! - an oversize request answered `400`, never a reset.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use axum::http::StatusCode;
use common::*;
use serde_json::{json, Value};
use sluice_ingest::server::ServeOptions;
use tokio::io::AsyncWriteExt;

fn batch(items: Vec<Value>) -> Value {
    json!({ "batch": items })
}

/// Every stored record parses as route parses it (`serde_json::Value`):
/// `records()` parses each one that way and fails the test otherwise.
fn assert_route_can_read_everything(h: &Harness) {
    assert!(!h.records().is_empty());
}

// ---------------------------------------------------------------------------
// 1. Amplification

#[tokio::test]
async fn a_small_gzip_request_with_a_huge_batch_context_stores_nothing() {
    let h = Harness::new();
    // 2,500 tiny items and a ~410 KB batch context: a few KB gzipped. Before
    // the fix each item got the context merged in after the size check:
    // 1 GB to store, 400 KB events delivered.
    let items: Vec<Value> = (0..2500).map(|_| json!({"type":"identify","userId":"u"})).collect();
    let mut body = batch(items);
    body["context"] = json!({ "pad": "c".repeat(410 * 1024) });
    let raw = body.to_string();
    assert!(raw.len() < 500 * 1024);
    let zipped = gzip(raw.as_bytes());
    assert!(zipped.len() < 16 * 1024, "{}", zipped.len());
    let resp = h.send(post_raw("/v1/batch", &[("authorization", &basic_key(WEB_KEY)), ("content-encoding", "gzip")], zipped)).await;
    resp.assert_error(StatusCode::BAD_REQUEST, "event_too_large");
    assert!(h.records().is_empty());
}

#[tokio::test]
async fn what_one_request_stores_is_bounded_even_when_each_event_fits() {
    let h = Harness::new();
    // A 20 KB batch context makes every item ~20 KB as stored (under the
    // 32 KB event limit), 2,500 of them ~50 MB: refused whole.
    let items: Vec<Value> = (0..2500).map(|i| json!({"type":"track","userId":"u","event":"E","messageId":format!("m-{i}")})).collect();
    let mut body = batch(items);
    body["context"] = json!({ "pad": "c".repeat(20 * 1024) });
    let resp = h.send(post_json("/v1/batch", Some(WEB_KEY), &body)).await;
    let msg = resp.assert_error(StatusCode::BAD_REQUEST, "request_too_large");
    assert!(msg.contains("as stored"), "{msg}");
    assert!(h.records().is_empty());

    // The same context on 20 items is fine: ~400 KB stored.
    let items: Vec<Value> = (0..20).map(|i| json!({"type":"track","userId":"u","event":"E","messageId":format!("ok-{i}")})).collect();
    let mut body = batch(items);
    body["context"] = json!({ "pad": "c".repeat(20 * 1024) });
    h.send(post_json("/v1/batch", Some(WEB_KEY), &body)).await.assert_success();
    assert_eq!(h.records().len(), 20);
    for r in h.records() {
        assert!(r.size <= 32 * 1024, "{}", r.size);
        assert_eq!(r.event["context"]["pad"].as_str().unwrap().len(), 20 * 1024);
    }
}

#[tokio::test]
async fn the_32_kb_limit_holds_for_the_event_as_stored() {
    let h = Harness::new();
    // 31 KB of its own plus a 2 KB batch context: 33 KB as stored.
    let mut item = event("track", "merged-big");
    item["properties"] = json!({ "pad": "p".repeat(31 * 1024) });
    let mut body = batch(vec![item, event("track", "small")]);
    body["context"] = json!({ "pad": "c".repeat(2 * 1024) });
    h.send(post_json("/v1/batch", Some(WEB_KEY), &body)).await.assert_success();
    let stored = h.records();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].event["messageId"], "small");
    assert_eq!(h.ingest.metrics.rejected("event_too_large"), 1);
}

// ---------------------------------------------------------------------------
// 3. No input reaches a panic

#[tokio::test]
async fn far_apart_timestamp_and_sent_at_do_not_panic_or_lose_the_batch() {
    let h = Harness::new();
    let mut poison = event("track", "poison");
    poison["timestamp"] = json!("-260000-01-01T00:00:00");
    poison["sentAt"] = json!("+260000-01-01T00:00:00");
    let resp = h.send(post_json("/v1/batch", Some(WEB_KEY), &batch(vec![poison.clone(), event("identify", "neighbour")]))).await;
    resp.assert_success();
    let p = h.by_message_id("poison");
    // The correction is meaningless: the server's time stands, the client's is kept.
    assert_eq!(p.event["timestamp"], p.event["receivedAt"]);
    assert_eq!(p.event["originalTimestamp"], "-260000-01-01T00:00:00");
    h.by_message_id("neighbour");

    // The same pair split between the batch's sentAt and the item.
    let mut item = event("track", "poison-2");
    item["timestamp"] = json!("+260000-12-31T23:59:59");
    let mut body = batch(vec![item]);
    body["sentAt"] = json!("-260000-01-01T00:00:00");
    h.send(post_json("/v1/batch", Some(WEB_KEY), &body)).await.assert_success();
    h.by_message_id("poison-2");
    let mut single = event("track", "poison-3");
    single["timestamp"] = json!("-262143-01-01T00:00:00");
    single["sentAt"] = json!("+262142-12-31T23:59:59");
    h.send(post_json("/v1/track", Some(WEB_KEY), &single)).await.assert_success();
    assert_route_can_read_everything(&h);
}

// ---------------------------------------------------------------------------
// 4. Whatever ingest accepts, route can read

fn nested(depth: usize) -> Value {
    let mut v = json!("leaf");
    for _ in 0..depth {
        v = json!({ "a": v });
    }
    v
}

#[tokio::test]
async fn values_route_cannot_read_are_refused_with_a_clear_code() {
    let h = Harness::new();
    let deep = {
        let mut e = event("track", "deep");
        e["properties"] = nested(200);
        e.to_string()
    };
    let huge_number = r#"{"type":"track","userId":"u","event":"E","messageId":"num","properties":{"n":1e400}}"#;
    let lone_surrogate = r#"{"type":"track","userId":"u","event":"E","messageId":"sur","properties":{"s":"\ud800"}}"#;
    let lone_in_key = r#"{"type":"track","userId":"u","event":"E","messageId":"key","properties":{"\udfff":1}}"#;
    let deep_array =
        format!(r#"{{"type":"track","userId":"u","event":"E","messageId":"arr","properties":{{"x":{}1{}}}}}"#, "[".repeat(100), "]".repeat(100));
    for (body, code) in [
        (deep.as_str(), "too_deep"),
        (huge_number, "invalid_value"),
        (lone_surrogate, "invalid_value"),
        (lone_in_key, "invalid_value"),
        (deep_array.as_str(), "too_deep"),
    ] {
        let resp =
            h.send(post_raw("/v1/track", &[("authorization", &basic_key(WEB_KEY)), ("content-type", "application/json")], body.to_owned())).await;
        resp.assert_error(StatusCode::BAD_REQUEST, code);
    }
    assert!(h.records().is_empty());

    // In a batch, the bad items are dropped and their neighbours kept.
    let body = format!(r#"{{"batch":[{huge_number},{lone_surrogate},{deep},{{"type":"identify","userId":"u","messageId":"good"}}]}}"#);
    h.send(post_raw("/v1/batch", &[("authorization", &basic_key(WEB_KEY))], body)).await.assert_success();
    assert_eq!(h.records().len(), 1);
    h.by_message_id("good");
    // The batch-level context is checked too (it is part of what is stored).
    let body = r#"{"context":{"n":-1e999},"batch":[{"type":"identify","userId":"u","messageId":"ctx"}]}"#;
    h.send(post_raw("/v1/batch", &[("authorization", &basic_key(WEB_KEY))], body.to_owned()))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_value");
    assert_eq!(h.records().len(), 1);
}

#[tokio::test]
async fn what_route_can_read_is_accepted_unchanged() {
    let h = Harness::new();
    let mut e = event("track", "fine");
    // 60 levels under `properties`: within the limit of 64 for the whole event.
    e["properties"] = json!({ "deep": nested(60), "pair": "\u{1F600}", "big": 1.7976931348623157e308, "neg": -0.0, "int": u64::MAX });
    h.send(post_json("/v1/track", Some(WEB_KEY), &e)).await.assert_success();
    let stored = h.by_message_id("fine");
    assert_eq!(stored.event["properties"]["pair"], "\u{1F600}");
    assert_eq!(stored.event["properties"]["int"], json!(u64::MAX));
    // An escaped surrogate pair is a valid character.
    let body = r#"{"type":"track","userId":"u","event":"E","messageId":"esc","properties":{"s":"\ud83d\ude00"}}"#;
    h.send(post_raw("/v1/track", &[("authorization", &basic_key(WEB_KEY))], body.to_owned())).await.assert_success();
    assert_eq!(h.by_message_id("esc").event["properties"]["s"], "\u{1F600}");
    assert_route_can_read_everything(&h);
}

// ---------------------------------------------------------------------------
// 5. Authentication before JSON work; linear objects

#[tokio::test]
async fn an_unknown_header_key_is_refused_before_the_body_is_parsed() {
    let h = Harness::new();
    // Not JSON at all: with the key checked first the answer is 401, not 400.
    let resp = h.send(post_raw("/v1/batch", &[("authorization", &basic_key("wk_nobody"))], "{not json".to_owned())).await;
    resp.assert_error(StatusCode::UNAUTHORIZED, "invalid_write_key");
    // 40,000 keys: refused as fast as any other request with that key.
    let mut body = String::from("{");
    for i in 0..40_000 {
        body.push_str(&format!("\"k{i}\":1,"));
    }
    body.push_str("\"type\":\"track\"}");
    let resp = h.send(post_raw("/v1/track", &[("authorization", &basic_key("wk_nobody"))], body)).await;
    resp.assert_error(StatusCode::UNAUTHORIZED, "invalid_write_key");
    assert!(h.records().is_empty());
}

#[tokio::test]
async fn an_event_with_40000_top_level_keys_keeps_every_key_and_the_last_duplicate() {
    let mut body = String::from(r#"{"type":"track","userId":"u","event":"first","messageId":"wide","#);
    for i in 0..40_000 {
        body.push_str(&format!("\"k{i}\":1,"));
    }
    body.push_str(r#""event":"last","k0":"again"}"#);
    assert!(body.len() < 500 * 1024, "{}", body.len());
    let mut s = settings();
    s.max_event_bytes = s.max_request_bytes;
    let h2 = Harness::with(s, &sources());
    h2.send(post_raw("/v1/track", &[("authorization", &basic_key(WEB_KEY))], body)).await.assert_success();
    let stored = h2.by_message_id("wide");
    let obj = stored.event.as_object().unwrap();
    assert_eq!(obj["event"], "last");
    assert_eq!(obj["k0"], "again");
    assert_eq!(obj["k39999"], 1);
    assert_eq!(obj.len(), 40_000 + 6); // k0..k39999 + type, userId, event, messageId, timestamp, receivedAt
}

// ---------------------------------------------------------------------------
// 9. One client cannot hold every connection slot

async fn connect_from(ip: &str, server: &Server) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{ip}:0").parse().unwrap()).unwrap();
    socket.connect(server.addr).await.expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_cannot_hold_every_connection_slot() {
    let options =
        ServeOptions { max_connections: 4, max_connections_per_client: 2, header_read_timeout: Duration::from_secs(60), ..ServeOptions::default() };
    let server = Server::start(Harness::new(), options).await;
    // Client A (127.0.0.1) holds two silent connections (a slow loris) ...
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = connect_from("127.0.0.1", &server).await;
        c.write_all(b"POST /v1/track HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        held.push(c);
    }
    // ... a third from A is answered 429 at once, and closed ...
    let mut third = connect_from("127.0.0.1", &server).await;
    let resp = tokio::time::timeout(Duration::from_secs(10), read_response(&mut third)).await.expect("answered").expect("response");
    assert_eq!(resp.status, 429);
    assert_eq!(resp.json()["code"], "too_many_connections");
    // ... and client B (127.0.0.2) is served meanwhile.
    let mut b = connect_from("127.0.0.2", &server).await;
    let resp = roundtrip(&mut b, &raw_post("/v1/track", WEB_KEY, &event("track", "from-b").to_string())).await;
    assert_eq!(resp.status, 200);
    // When A lets go of one, A may connect again.
    drop(held.pop());
    let mut again = None;
    for _ in 0..100 {
        let mut c = connect_from("127.0.0.1", &server).await;
        c.write_all(&raw_post("/v1/track", WEB_KEY, &event("track", "from-a").to_string())).await.unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(10), read_response(&mut c)).await.expect("answered").expect("response");
        if resp.status == 200 {
            again = Some(c);
            break;
        }
        assert_eq!(resp.status, 429);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(again.is_some(), "client A never got its slot back");
    let mut keys: Vec<String> = server.harness.records().into_iter().map(|r| r.key).collect();
    keys.sort();
    assert_eq!(keys, ["web/from-a", "web/from-b"]);
    drop((held, again, b));
    server.stop().await;
}

/// A client that keeps sending requests the server refuses spends its error
/// budget: then its requests are held and answered 429 unread, while other
/// clients, and the same client's valid requests before that, are served
/// as usual. Hostile clients cannot spend the server's CPU on refusals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_past_its_error_budget_is_slowed_and_others_are_not() {
    let options = ServeOptions { client_error_budget: 2, ..ServeOptions::default() }; // bursts of 10
    let server = Server::start(Harness::new(), options).await;
    let bad = raw_post("/v1/track", WEB_KEY, "{not json");
    let mut a = connect_from("127.0.0.1", &server).await;
    // Valid requests cost nothing, however many.
    for i in 0..50 {
        let resp = roundtrip(&mut a, &raw_post("/v1/track", WEB_KEY, &event("track", &format!("ok-{i}")).to_string())).await;
        assert_eq!(resp.status, 200);
    }
    // Ten refusals are the burst; the eleventh request is over the budget.
    for _ in 0..10 {
        assert_eq!(roundtrip(&mut a, &bad).await.status, 400);
    }
    let held = std::time::Instant::now();
    let resp = roundtrip(&mut a, &raw_post("/v1/track", WEB_KEY, &event("track", "while-over").to_string())).await;
    assert_eq!(resp.status, 429);
    assert_eq!(resp.json()["code"], "client_error_budget");
    assert_eq!(resp.header("retry-after"), Some("1"));
    assert!(held.elapsed() >= sluice_ingest::budget::PENALTY, "answered without being held");
    assert!(wait_closed(&mut a, Duration::from_secs(5)).await.is_ok(), "the connection is closed after the 429");
    // Another client is served at once meanwhile.
    let mut b = connect_from("127.0.0.2", &server).await;
    assert_eq!(roundtrip(&mut b, &raw_post("/v1/track", WEB_KEY, &event("track", "from-b").to_string())).await.status, 200);
    assert_eq!(roundtrip(&mut b, &bad).await.status, 400, "b's own budget is untouched");
    // The budget refills at its rate: A is served again.
    let mut served = false;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut a = connect_from("127.0.0.1", &server).await;
        if roundtrip(&mut a, &raw_post("/v1/track", WEB_KEY, &event("track", "after").to_string())).await.status == 200 {
            served = true;
            break;
        }
    }
    assert!(served, "client A was never served again");
    let mut keys: Vec<String> = server.harness.records().into_iter().map(|r| r.key).filter(|k| !k.starts_with("web/ok-")).collect();
    keys.sort();
    assert_eq!(keys, ["web/after", "web/from-b"], "the held request was not stored");
    drop(b);
    server.stop().await;
}

/// A trusted proxy (`server.trusted_proxies`: a cell router) carries many
/// clients' requests from one address: it holds more connections than the
/// per-client limit and its refused requests spend no budget (red team of
/// the cell router: one client's bad requests through the router got every
/// workspace of the cell refused). Other addresses are limited as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_proxy_is_not_held_to_one_clients_limits() {
    let options = ServeOptions {
        client_error_budget: 2,
        max_connections_per_client: 2,
        trusted: vec!["127.0.0.5".parse().unwrap()],
        header_read_timeout: Duration::from_secs(60),
        ..ServeOptions::default()
    };
    let server = Server::start(Harness::new(), options).await;
    let bad = raw_post("/v1/track", WEB_KEY, "{not json");
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut c = connect_from("127.0.0.5", &server).await;
        c.write_all(b"POST /v1/track HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        held.push(c);
    }
    let mut proxy = connect_from("127.0.0.5", &server).await;
    for _ in 0..30 {
        assert_eq!(roundtrip(&mut proxy, &bad).await.status, 400, "never 429");
    }
    assert_eq!(roundtrip(&mut proxy, &raw_post("/v1/track", WEB_KEY, &event("track", "via-proxy").to_string())).await.status, 200);
    // An untrusted address is still limited.
    let mut other = connect_from("127.0.0.6", &server).await;
    let mut statuses = Vec::new();
    for _ in 0..12 {
        statuses.push(roundtrip(&mut other, &bad).await.status);
        if statuses.last() == Some(&429) {
            break;
        }
    }
    assert_eq!(statuses.last(), Some(&429), "{statuses:?}");
    drop((held, proxy));
    server.stop().await;
}

/// Requests hyper refuses itself, before the service sees them (a malformed
/// request line: 400; a head over 64 KiB: 431), spend the budget too; a
/// client over its budget is then refused at accept, before anything is
/// read (found by a red-team run: 40,000 431s in 5 s from one address went
/// uncounted). Health probes and metric scrapes are never held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_heads_spend_the_budget_and_a_spent_client_is_refused_at_accept() {
    let options = ServeOptions { client_error_budget: 2, ..ServeOptions::default() }; // bursts of 10
    let server = Server::start(Harness::new(), options).await;
    let huge_head = format!("GET /v1/track HTTP/1.1\r\nHost: x\r\nX-A: {}\r\n\r\n", "a".repeat(70_000));
    for i in 0..10 {
        let mut c = connect_from("127.0.0.3", &server).await;
        let request: Vec<u8> = if i % 2 == 0 { b"GARBAGE\r\n\r\n".to_vec() } else { huge_head.clone().into_bytes() };
        c.write_all(&request).await.unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(10), read_response(&mut c)).await.expect("answered").expect("response");
        assert!(resp.status == 400 || resp.status == 431, "hyper's own refusal: {}", resp.status);
    }
    // Spent: the next connection gets its 429 before it sends anything.
    let mut c = connect_from("127.0.0.3", &server).await;
    let resp = tokio::time::timeout(Duration::from_secs(10), read_response(&mut c)).await.expect("answered").expect("response");
    assert_eq!(resp.status, 429);
    assert_eq!(resp.json()["code"], "client_error_budget");
    assert_eq!(resp.header("access-control-allow-origin"), Some("*"), "browsers can read it on the Tracking API");
    // Another address is served.
    let mut b = connect_from("127.0.0.4", &server).await;
    assert_eq!(roundtrip(&mut b, &raw_post("/v1/track", WEB_KEY, &event("track", "b").to_string())).await.status, 200);
    drop(b);
    server.stop().await;
}

// ---------------------------------------------------------------------------
// 13. An oversize request gets its 400, never a reset

/// A blocking client, as curl or a Python SDK is: write the whole request
/// (in `chunk`-byte writes, `pause` apart), then read the answer.
fn send_whole_then_read(addr: std::net::SocketAddr, head: &str, body: &[u8], chunk: usize, pause: Duration) -> Result<RawStatus, String> {
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(head.as_bytes()).map_err(|e| format!("writing the head: {e}"))?;
    for part in body.chunks(chunk) {
        s.write_all(part).map_err(|e| format!("writing the body: {e}"))?;
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
    }
    let mut answer = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                answer.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&answer);
                if let Some(end) = text.find("\r\n\r\n") {
                    let len: usize = text[..end]
                        .lines()
                        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
                        .unwrap_or(0);
                    if answer.len() >= end + 4 + len {
                        break;
                    }
                }
            }
            Err(e) => return Err(format!("reading the answer: {e}")),
        }
    }
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| format!("no answer: {text:?}"))?;
    Ok(RawStatus { status, text })
}

#[derive(Debug)]
struct RawStatus {
    status: u16,
    text: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_request_is_answered_400_not_reset_fast_or_slow_client() {
    let server = Server::start(Harness::new(), ServeOptions::default()).await;
    let addr = server.addr;
    let body = format!(r#"{{"batch":[{{"type":"track","userId":"u","event":"E","properties":{{"pad":"{}"}}}}]}}"#, "x".repeat(540 * 1024));
    let head = |len: usize| {
        format!(
            "POST /v1/batch HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n",
            basic_key(WEB_KEY)
        )
    };
    let outcomes = tokio::task::spawn_blocking(move || {
        let mut outcomes = Vec::new();
        for _ in 0..20 {
            outcomes.push(send_whole_then_read(addr, &head(body.len()), body.as_bytes(), 64 * 1024, Duration::ZERO));
        }
        for _ in 0..2 {
            outcomes.push(send_whole_then_read(addr, &head(body.len()), body.as_bytes(), 16 * 1024, Duration::from_millis(5)));
        }
        // Chunked, no Content-Length: the limit is found mid-stream.
        let chunked_head =
            format!("POST /v1/batch HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\nTransfer-Encoding: chunked\r\n\r\n", basic_key(WEB_KEY));
        let mut chunked = Vec::new();
        for part in body.as_bytes().chunks(32 * 1024) {
            chunked.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
            chunked.extend_from_slice(part);
            chunked.extend_from_slice(b"\r\n");
        }
        chunked.extend_from_slice(b"0\r\n\r\n");
        for _ in 0..5 {
            outcomes.push(send_whole_then_read(addr, &chunked_head, &chunked, 64 * 1024, Duration::ZERO));
        }
        outcomes
    })
    .await
    .unwrap();
    for (i, outcome) in outcomes.iter().enumerate() {
        match outcome {
            Ok(r) => {
                assert_eq!(r.status, 400, "request {i}: {}", r.text);
                assert!(r.text.contains("request_too_large"), "request {i}: {}", r.text);
            }
            Err(e) => panic!("request {i}: the client could not read its answer: {e}"),
        }
    }
    assert!(server.harness.records().is_empty());
    server.stop().await;
}
