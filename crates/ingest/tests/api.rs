//! Spec tests of the Tracking API (issue 2, section 3): one test (or a few)
//! per rule. Requests go through `sluice_ingest::router` with
//! `tower::ServiceExt::oneshot` over a real `EmbeddedLog` in a tempdir, and
//! every 200 is checked by reading the `input` topic back. Timeouts and
//! connection bounds are checked on the real server loop (`server::serve`)
//! with raw TCP clients.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use sluice_core::config::UnknownWriteKey;
use sluice_core::partition_for;
use sluice_ingest::server::ServeOptions;
use sluice_ingest::{router, Ingest, INPUT_TOPIC};
use sluice_log::{Checkpoint, EmbeddedLog, Log, LogError, OffsetRange, Record, StoredRecord};
use tokio::io::AsyncWriteExt;

use common::*;

fn ts(v: &Value) -> DateTime<Utc> {
    let s = v.as_str().unwrap_or_else(|| panic!("timestamp is not a string: {v}"));
    DateTime::parse_from_rfc3339(s).unwrap_or_else(|e| panic!("{s:?} is not RFC 3339: {e}")).with_timezone(&Utc)
}

fn batch(items: Vec<Value>) -> Value {
    json!({ "batch": items })
}

// ---------------------------------------------------------------------------
// Endpoints

#[tokio::test]
async fn every_single_call_endpoint_stores_its_type_with_and_without_trailing_slash() {
    let h = Harness::new();
    for ty in TYPES {
        for slash in ["", "/"] {
            let path = format!("/v1/{ty}{slash}");
            let id = format!("m-{ty}{}", if slash.is_empty() { "" } else { "-slash" });
            let resp = h.send(post_json(&path, Some(WEB_KEY), &event(ty, &id))).await;
            assert!(!resp.status.is_redirection(), "{path} answered a redirect: {:?}", resp.headers.get(header::LOCATION));
            assert!(resp.headers.get(header::LOCATION).is_none(), "{path}: no Location header");
            resp.assert_success();
            let stored = h.by_message_id(&id);
            assert_eq!(stored.event["type"], ty, "{path}");
        }
    }
    assert_eq!(h.records().len(), 12);
}

#[tokio::test]
async fn batch_and_import_endpoints_store_each_items_type_with_and_without_trailing_slash() {
    let h = Harness::new();
    for path in ["/v1/batch", "/v1/batch/", "/v1/import", "/v1/import/"] {
        let items = TYPES.iter().map(|ty| event(ty, &format!("{path}-{ty}"))).collect();
        let resp = h.send(post_json(path, Some(WEB_KEY), &batch(items))).await;
        assert!(!resp.status.is_redirection(), "{path}");
        resp.assert_success();
        for ty in TYPES {
            assert_eq!(h.by_message_id(&format!("{path}-{ty}")).event["type"], ty, "{path}");
        }
    }
    assert_eq!(h.records().len(), 4 * 6);
}

#[tokio::test]
async fn analytics_js_short_paths_take_text_plain_with_the_write_key_in_the_body() {
    let h = Harness::new();
    let shorts = [("t", "track"), ("i", "identify"), ("p", "page"), ("s", "screen"), ("g", "group"), ("a", "alias")];
    for (short, ty) in shorts {
        // analytics.js sends the type in the body; also check without it.
        for with_type in [true, false] {
            let id = format!("short-{short}-{with_type}");
            let mut body = event(ty, &id);
            if !with_type {
                body.as_object_mut().unwrap().remove("type");
            }
            body["writeKey"] = WEB_KEY.into();
            let req = post_raw(&format!("/v1/{short}"), &[("content-type", "text/plain")], body.to_string());
            h.send(req).await.assert_success();
            let stored = h.by_message_id(&id);
            assert_eq!(stored.event["type"], ty, "/v1/{short}");
            assert_eq!(stored.key, format!("{WEB}/{id}"));
        }
    }
    // /v1/b: a batch.
    let body = json!({
        "writeKey": WEB_KEY,
        "batch": [event("track", "short-b-1"), event("identify", "short-b-2")],
    });
    let req = post_raw("/v1/b", &[("content-type", "text/plain;charset=UTF-8")], body.to_string());
    h.send(req).await.assert_success();
    assert_eq!(h.by_message_id("short-b-1").event["type"], "track");
    assert_eq!(h.by_message_id("short-b-2").event["type"], "identify");
    assert_eq!(h.records().len(), 6 * 2 + 2);
}

// ---------------------------------------------------------------------------
// Auth

#[tokio::test]
async fn basic_auth_with_the_write_key_as_user_name_with_or_without_the_colon() {
    let h = Harness::new();
    for (auth, id) in [(basic(&format!("{WEB_KEY}:")), "with-colon"), (basic(WEB_KEY), "without-colon")] {
        let req = post_raw("/v1/track", &[("content-type", "application/json"), ("authorization", &auth)], event("track", id).to_string());
        h.send(req).await.assert_success();
        assert_eq!(h.by_message_id(id).key, format!("{WEB}/{id}"));
    }
    // The write key picks the source.
    h.send(post_json("/v1/track", Some(APP_KEY), &event("track", "app-1"))).await.assert_success();
    assert_eq!(h.by_message_id("app-1").key, format!("{APP}/app-1"));
    assert_eq!(h.ingest.metrics.accepted(WEB), 2);
    assert_eq!(h.ingest.metrics.accepted(APP), 1);
}

#[tokio::test]
async fn write_key_in_the_body_authenticates_and_is_not_stored() {
    let h = Harness::new();
    let mut single = event("identify", "body-key-1");
    single["writeKey"] = APP_KEY.into();
    h.send(post_json("/v1/identify", None, &single)).await.assert_success();

    let mut item = event("track", "body-key-3");
    item["writeKey"] = "stray item key".into();
    let b = json!({"writeKey": APP_KEY, "batch": [event("track", "body-key-2"), item]});
    h.send(post_json("/v1/batch", None, &b)).await.assert_success();

    let recs = h.records();
    assert_eq!(recs.len(), 3);
    for r in &recs {
        assert_eq!(r.key, format!("{APP}/{}", r.event["messageId"].as_str().unwrap()));
        assert!(r.event.get("writeKey").is_none(), "writeKey stored in {}", r.event);
        let raw = r.event.to_string();
        assert!(!raw.contains(APP_KEY), "the write key leaked into the stored event: {raw}");
    }
}

#[tokio::test]
async fn a_missing_write_key_is_401_json() {
    let h = Harness::new();
    for (path, body) in [("/v1/track", event("track", "m1")), ("/v1/batch", batch(vec![event("track", "m2")]))] {
        let resp = h.send(post_json(path, None, &body)).await;
        resp.assert_error_shape(StatusCode::UNAUTHORIZED);
    }
    // An Authorization header that is not Basic does not count as a key.
    let req = post_raw("/v1/track", &[("content-type", "application/json"), ("authorization", "Bearer something")], event("track", "m3").to_string());
    h.send(req).await.assert_error_shape(StatusCode::UNAUTHORIZED);
    assert!(h.records().is_empty());
}

#[tokio::test]
async fn an_unknown_write_key_is_401_json_with_code_and_message() {
    let h = Harness::new();
    let resp = h.send(post_json("/v1/track", Some("wk_nobody"), &event("track", "m1"))).await;
    let code = resp.assert_error_shape(StatusCode::UNAUTHORIZED);
    let message = resp.json()["message"].as_str().unwrap().to_lowercase();
    assert!(message.contains("write key") || message.contains("writekey"), "message should name the problem: {message:?}");

    let mut body = batch(vec![event("track", "m2")]);
    body["writeKey"] = "wk_nobody".into();
    let resp = h.send(post_json("/v1/batch", None, &body)).await;
    assert_eq!(resp.assert_error_shape(StatusCode::UNAUTHORIZED), code);
    assert!(h.records().is_empty());
    assert_eq!(h.ingest.metrics.events_unknown_key_dropped.get(), 0);
}

/// A source given as `sha256:<hex>` of its key (as a control plane hands
/// sources to cells) accepts the key itself, in either place; the hash
/// itself presented as a key is refused (it is not a secret, the key is).
#[tokio::test]
async fn a_source_given_as_its_keys_hash_accepts_the_key_and_not_the_hash() {
    let hashed = sluice_ingest::hashed_write_key("wk_hidden_key");
    assert!(hashed.starts_with("sha256:") && hashed.len() == 7 + 64, "{hashed}");
    let h = Harness::with(settings(), &[source(WEB, WEB_KEY, None, None), source("hidden", &hashed, None, None)]);
    h.send(post_json("/v1/track", Some("wk_hidden_key"), &event("track", "h1"))).await.assert_success();
    let mut body = event("track", "h2");
    body["writeKey"] = "wk_hidden_key".into();
    h.send(post_json("/v1/track", None, &body)).await.assert_success();
    // A plain key still works alongside.
    h.send(post_json("/v1/track", Some(WEB_KEY), &event("track", "w1"))).await.assert_success();
    for key in [hashed.as_str(), "wk_hidden_kez", ""] {
        let mut body = event("track", "bad");
        body["writeKey"] = key.into();
        h.send(post_json("/v1/track", None, &body)).await.assert_error_shape(StatusCode::UNAUTHORIZED);
    }
    let mut keys: Vec<String> = h.records().into_iter().map(|r| r.key).collect();
    keys.sort();
    assert_eq!(keys, ["hidden/h1", "hidden/h2", "web/w1"]);
}

/// A cell confirms its id to a router (`X-Sluice-Cell`) on its answers, and
/// refuses a request meant for another cell; a Sluice that is not a cell
/// confirms nothing (red team: it echoed the header, so it passed for any cell).
#[tokio::test]
async fn a_cell_confirms_its_id_to_routers_and_a_plain_sluice_does_not() {
    let cell = |id: Option<&str>| {
        let mut s = settings();
        s.cell = id.map(str::to_owned);
        Harness::with(s, &sources())
    };
    let routed = |to: &str| {
        let mut req = post_json("/v1/track", Some(WEB_KEY), &event("track", "c1"));
        req.headers_mut().insert("x-sluice-cell", to.parse().unwrap());
        req
    };
    let h = cell(Some("c1"));
    let resp = h.send(routed("c1")).await;
    resp.assert_success();
    assert_eq!(resp.headers.get("x-sluice-cell").map(|v| v.to_str().unwrap()), Some("c1"));
    let resp = h.send(routed("c2")).await;
    assert_eq!(resp.status, StatusCode::MISDIRECTED_REQUEST);
    assert!(!resp.headers.contains_key("x-sluice-cell"), "a refusal confirms nothing");
    let plain = cell(None);
    let resp = plain.send(routed("c1")).await;
    resp.assert_success();
    assert!(!resp.headers.contains_key("x-sluice-cell"), "not a cell: no confirmation");
    assert_eq!(h.records().len() + plain.records().len(), 2, "the refused request stored nothing");
}

#[tokio::test]
async fn an_unknown_write_key_with_accept_and_drop_answers_200_and_stores_nothing() {
    let mut s = settings();
    s.unknown_write_key = UnknownWriteKey::AcceptAndDrop;
    let h = Harness::with(s, &sources());
    h.send(post_json("/v1/track", Some("wk_nobody"), &event("track", "m1"))).await.assert_success();
    let items = (0..3).map(|i| event("track", &format!("b{i}"))).collect();
    h.send(post_json("/v1/batch", Some("wk_nobody"), &batch(items))).await.assert_success();
    assert!(h.records().is_empty(), "events of an unknown key must be dropped");
    assert_eq!(h.ingest.metrics.events_unknown_key_dropped.get(), 4);
    // A known key is still stored.
    h.send(post_json("/v1/track", Some(WEB_KEY), &event("track", "known"))).await.assert_success();
    assert_eq!(h.single_event().key, format!("{WEB}/known"));
}

// ---------------------------------------------------------------------------
// Validation

#[tokio::test]
async fn each_type_is_validated_over_http() {
    let h = Harness::new();
    let cases: Vec<(&str, Value, &str, Option<&str>)> = vec![
        ("/v1/identify", json!({"type":"identify","traits":{"a":1}}), "missing_user_id", None),
        ("/v1/identify", json!({"type":"identify","userId":null,"anonymousId":null}), "missing_user_id", None),
        ("/v1/page", json!({"type":"page","name":"Home"}), "missing_user_id", None),
        ("/v1/screen", json!({"type":"screen","name":"Home"}), "missing_user_id", None),
        ("/v1/track", json!({"type":"track","event":"E"}), "missing_user_id", None),
        ("/v1/track", json!({"type":"track","userId":"u"}), "missing_field", Some("event")),
        ("/v1/group", json!({"type":"group","userId":"u"}), "missing_field", Some("groupId")),
        ("/v1/group", json!({"type":"group","groupId":"g"}), "missing_user_id", None),
        ("/v1/alias", json!({"type":"alias","userId":"u"}), "missing_field", Some("previousId")),
        ("/v1/alias", json!({"type":"alias","anonymousId":"a","previousId":"p"}), "missing_field", Some("userId")),
        ("/v1/batch", json!({"batch":[{"userId":"u","event":"E"}]}), "invalid_type", None),
        ("/v1/batch", json!({"batch":[{"type":"purchase","userId":"u"}]}), "invalid_type", None),
    ];
    for (path, body, code, field) in cases {
        let resp = h.send(post_json(path, Some(WEB_KEY), &body)).await;
        let message = resp.assert_error(StatusCode::BAD_REQUEST, code);
        if let Some(field) = field {
            assert!(message.contains(field), "{path} {body}: message {message:?} should name `{field}`");
        }
    }
    assert!(h.records().is_empty());
    assert_eq!(h.ingest.metrics.rejected("missing_user_id"), 6);
    assert_eq!(h.ingest.metrics.rejected("missing_field"), 4);
    assert_eq!(h.ingest.metrics.rejected("invalid_type"), 2);
}

#[tokio::test]
async fn every_type_with_its_required_fields_is_accepted_over_http() {
    let h = Harness::new();
    let cases = [
        ("identify", json!({"anonymousId":"a"})),
        ("track", json!({"anonymousId":"a","event":"E"})),
        ("page", json!({"userId":"u"})),
        ("screen", json!({"anonymousId":"a"})),
        ("group", json!({"anonymousId":"a","groupId":"g"})),
        ("alias", json!({"userId":"u","previousId":"p"})),
    ];
    for (ty, mut body) in cases {
        body["type"] = ty.into();
        body["messageId"] = format!("ok-{ty}").into();
        h.send(post_json(&format!("/v1/{ty}"), Some(WEB_KEY), &body)).await.assert_success();
        assert_eq!(h.by_message_id(&format!("ok-{ty}")).event["type"], ty);
    }
}

#[tokio::test]
async fn an_explicit_null_beside_the_other_identity_is_fine() {
    let h = Harness::new();
    let a = json!({"type":"track","event":"E","userId":null,"anonymousId":"anon-1","messageId":"null-user"});
    h.send(post_json("/v1/track", Some(WEB_KEY), &a)).await.assert_success();
    let b = json!({"type":"identify","userId":"user-1","anonymousId":null,"messageId":"null-anon"});
    h.send(post_json("/v1/identify", Some(WEB_KEY), &b)).await.assert_success();
    let c = json!({"batch":[{"type":"page","userId":null,"anonymousId":"anon-2","messageId":"null-in-batch"}]});
    h.send(post_json("/v1/batch", Some(WEB_KEY), &c)).await.assert_success();

    let a = h.by_message_id("null-user").event;
    assert_eq!(a["anonymousId"], "anon-1");
    assert!(a.get("userId").is_some_and(Value::is_null), "the explicit null is kept: {a}");
    assert_eq!(h.by_message_id("null-anon").event["userId"], "user-1");
    assert_eq!(h.by_message_id("null-in-batch").event["anonymousId"], "anon-2");
}

#[tokio::test]
async fn a_single_call_without_type_takes_it_from_the_path() {
    let h = Harness::new();
    for ty in TYPES {
        for slash in ["", "/"] {
            let id = format!("untyped-{ty}{slash}");
            let mut body = event(ty, &id);
            body.as_object_mut().unwrap().remove("type");
            h.send(post_json(&format!("/v1/{ty}{slash}"), Some(WEB_KEY), &body)).await.assert_success();
            assert_eq!(h.by_message_id(&id).event["type"], ty);
        }
    }
}

// ---------------------------------------------------------------------------
// Limits

fn padded_track(id: &str, pad: usize) -> Value {
    let mut v = event("track", id);
    v["properties"] = json!({ "pad": "x".repeat(pad) });
    v
}

#[tokio::test]
async fn a_single_event_over_32_kb_is_400_event_too_large() {
    let h = Harness::new();
    let big = padded_track("big", 33 * 1024);
    let resp = h.send(post_json("/v1/track", Some(WEB_KEY), &big)).await;
    resp.assert_error(StatusCode::BAD_REQUEST, "event_too_large");
    assert!(h.records().is_empty());
    assert_eq!(h.ingest.metrics.rejected("event_too_large"), 1);

    // Just under the limit is accepted.
    let fits = padded_track("fits", 31 * 1024);
    assert!(fits.to_string().len() < 32 * 1024);
    h.send(post_json("/v1/track", Some(WEB_KEY), &fits)).await.assert_success();
    assert_eq!(h.single_event().event["messageId"], "fits");
}

#[tokio::test]
async fn an_event_over_32_kb_inside_a_batch_is_dropped_and_counted() {
    let h = Harness::new();
    let items = vec![event("track", "small-1"), padded_track("big", 33 * 1024), event("identify", "small-2")];
    h.send(post_json("/v1/batch", Some(WEB_KEY), &batch(items))).await.assert_success();
    let mut ids: Vec<String> = h.events().iter().map(|e| e["messageId"].as_str().unwrap().to_owned()).collect();
    ids.sort();
    assert_eq!(ids, ["small-1", "small-2"]);
    assert_eq!(h.ingest.metrics.rejected("event_too_large"), 1);
    assert_eq!(h.ingest.metrics.accepted(WEB), 2);
}

#[tokio::test]
async fn a_request_over_500_kb_is_400_request_too_large() {
    let h = Harness::new();
    // 20 events of ~25 KB: ~500 KB of valid events, just over the limit.
    let items: Vec<Value> = (0..21).map(|i| padded_track(&format!("big-{i}"), 25 * 1024)).collect();
    let body = batch(items).to_string();
    assert!(body.len() > 500 * 1024);
    let resp = h.send(post_raw("/v1/batch", &[("authorization", &basic_key(WEB_KEY))], body.clone())).await;
    resp.assert_error(StatusCode::BAD_REQUEST, "request_too_large");
    // The same with a Content-Length header.
    let resp = h.send(post_raw("/v1/batch", &[("authorization", &basic_key(WEB_KEY)), ("content-length", &body.len().to_string())], body)).await;
    resp.assert_error(StatusCode::BAD_REQUEST, "request_too_large");
    assert!(h.records().is_empty());

    // Just under the limit is accepted in full.
    let items: Vec<Value> = (0..19).map(|i| padded_track(&format!("ok-{i}"), 25 * 1024)).collect();
    let body = batch(items).to_string();
    assert!(body.len() < 500 * 1024 && body.len() > 450 * 1024);
    h.send(post_raw("/v1/batch", &[("authorization", &basic_key(WEB_KEY))], body)).await.assert_success();
    assert_eq!(h.records().len(), 19);
}

/// `max_request_bytes` above 4 MiB holds for a body sent with a
/// Content-Length too (it was cut at 4 MiB, the most an oversize body is
/// drained, with an error naming the configured limit).
#[tokio::test]
async fn a_request_limit_above_4_mib_holds_with_a_content_length() {
    let mut s = settings();
    s.max_request_bytes = 8 << 20;
    let h = Harness::with(s, &sources());
    let items: Vec<Value> = (0..200).map(|i| padded_track(&format!("large-{i}"), 25 * 1024)).collect();
    let body = batch(items).to_string();
    assert!(body.len() > 4 << 20 && body.len() < 8 << 20, "{}", body.len());
    let headers = [("authorization", basic_key(WEB_KEY)), ("content-length", body.len().to_string())];
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    h.send(post_raw("/v1/batch", &headers, body)).await.assert_success();
    assert_eq!(h.records().len(), 200);
}

#[tokio::test]
async fn a_gzip_request_over_500_kb_decoded_is_400_even_when_the_compressed_body_is_small() {
    let h = Harness::new();
    let mut body = batch(vec![event("track", "zip-big")]);
    body["padding"] = "y".repeat(600 * 1024).into();
    let raw = body.to_string();
    let zipped = gzip(raw.as_bytes());
    assert!(zipped.len() < 50 * 1024, "compressed body is small ({} bytes)", zipped.len());
    let req =
        post_raw("/v1/batch", &[("authorization", &basic_key(WEB_KEY)), ("content-encoding", "gzip"), ("content-type", "application/json")], zipped);
    h.send(req).await.assert_error(StatusCode::BAD_REQUEST, "request_too_large");
    assert!(h.records().is_empty());

    // Under the limit once decoded: accepted.
    let mut body = batch(vec![event("track", "zip-ok")]);
    body["padding"] = "y".repeat(400 * 1024).into();
    let req = post_raw("/v1/batch", &[("authorization", &basic_key(WEB_KEY)), ("content-encoding", "gzip")], gzip(body.to_string().as_bytes()));
    h.send(req).await.assert_success();
    assert_eq!(h.single_event().event["messageId"], "zip-ok");
}

#[tokio::test]
async fn a_batch_of_2501_events_is_400_and_2500_are_accepted() {
    let h = Harness::new();
    let items: Vec<Value> = (0..2501).map(|i| event("track", &format!("n-{i}"))).collect();
    let body = batch(items);
    assert!(body.to_string().len() < 500 * 1024);
    h.send(post_json("/v1/batch", Some(WEB_KEY), &body)).await.assert_error(StatusCode::BAD_REQUEST, "batch_too_large");
    assert!(h.records().is_empty());

    let items: Vec<Value> = (0..2500).map(|i| event("track", &format!("n-{i}"))).collect();
    h.send(post_json("/v1/batch", Some(WEB_KEY), &batch(items))).await.assert_success();
    let recs = h.records();
    assert_eq!(recs.len(), 2500);
    let mut ids: Vec<&str> = recs.iter().map(|r| r.event["messageId"].as_str().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 2500);
}

// ---------------------------------------------------------------------------
// Content-Encoding

#[tokio::test]
async fn gzip_bodies_are_accepted() {
    let h = Harness::new();
    for (path, body, enc) in [
        ("/v1/track", event("track", "gz-single"), "gzip"),
        ("/v1/batch", batch(vec![event("page", "gz-b1"), event("group", "gz-b2")]), "gzip"),
        ("/v1/identify", event("identify", "gz-upper"), "GZIP"),
    ] {
        let req = post_raw(
            path,
            &[("authorization", &basic_key(WEB_KEY)), ("content-encoding", enc), ("content-type", "application/json")],
            gzip(body.to_string().as_bytes()),
        );
        h.send(req).await.assert_success();
    }
    assert_eq!(h.by_message_id("gz-single").event["type"], "track");
    assert_eq!(h.by_message_id("gz-b1").event["type"], "page");
    assert_eq!(h.by_message_id("gz-b2").event["groupId"], "group-1");
    assert_eq!(h.by_message_id("gz-upper").event["type"], "identify");
}

#[tokio::test]
async fn an_invalid_gzip_body_is_400_json() {
    let h = Harness::new();
    // Plain JSON labelled gzip, and a truncated gzip stream.
    let plain = event("track", "m1").to_string().into_bytes();
    let zipped = gzip(event("track", "m2").to_string().as_bytes());
    let truncated = zipped[..zipped.len() / 2].to_vec();
    for body in [plain, truncated] {
        let req = post_raw("/v1/track", &[("authorization", &basic_key(WEB_KEY)), ("content-encoding", "gzip")], body);
        h.send(req).await.assert_error_shape(StatusCode::BAD_REQUEST);
    }
    assert!(h.records().is_empty());
}

#[tokio::test]
async fn an_unsupported_content_encoding_is_415_json() {
    let h = Harness::new();
    for enc in ["br", "deflate", "zstd"] {
        let req = post_raw("/v1/track", &[("authorization", &basic_key(WEB_KEY)), ("content-encoding", enc)], event("track", "m1").to_string());
        h.send(req).await.assert_error_shape(StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }
    assert!(h.records().is_empty());
}

// ---------------------------------------------------------------------------
// Batch-level context and integrations

#[tokio::test]
async fn batch_context_and_integrations_are_merged_into_each_item_the_items_keys_winning() {
    let h = Harness::new();
    let mut own = event("track", "own");
    own["context"] = json!({"ip": "5.6.7.8", "locale": "fr-FR", "library": {"name": "item-lib"}});
    own["integrations"] = json!({"All": true, "Amplitude": false});
    let bare = event("identify", "bare");
    let body = json!({
        "batch": [own, bare],
        "context": {"ip": "1.2.3.4", "library": {"name": "batch-lib", "version": "1.0"}, "app": {"build": 7}},
        "integrations": {"All": false, "Mixpanel": true},
    });
    h.send(post_json("/v1/batch", Some(WEB_KEY), &body)).await.assert_success();

    let own = h.by_message_id("own").event;
    assert_eq!(own["context"], json!({"ip": "5.6.7.8", "locale": "fr-FR", "library": {"name": "item-lib"}, "app": {"build": 7}}));
    assert_eq!(own["integrations"], json!({"All": true, "Amplitude": false, "Mixpanel": true}));

    let bare = h.by_message_id("bare").event;
    assert_eq!(bare["context"], json!({"ip": "1.2.3.4", "library": {"name": "batch-lib", "version": "1.0"}, "app": {"build": 7}}));
    assert_eq!(bare["integrations"], json!({"All": false, "Mixpanel": true}));
}

// ---------------------------------------------------------------------------
// messageId

#[tokio::test]
async fn a_message_id_is_assigned_when_missing() {
    let h = Harness::new();
    let mut single = event("track", "x");
    single.as_object_mut().unwrap().remove("messageId");
    h.send(post_json("/v1/track", Some(WEB_KEY), &single)).await.assert_success();
    let mut nulled = event("identify", "x");
    nulled["messageId"] = Value::Null;
    let mut no_id = event("page", "x");
    no_id.as_object_mut().unwrap().remove("messageId");
    h.send(post_json("/v1/batch", Some(WEB_KEY), &batch(vec![nulled, no_id.clone(), no_id]))).await.assert_success();

    let recs = h.records();
    assert_eq!(recs.len(), 4);
    let mut ids = Vec::new();
    for r in &recs {
        let id = r.event["messageId"].as_str().unwrap_or_else(|| panic!("no messageId in {}", r.event));
        assert!(!id.is_empty() && id.chars().count() <= 100, "assigned messageId {id:?}");
        assert_eq!(r.key, format!("{WEB}/{id}"));
        ids.push(id.to_owned());
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 4, "assigned ids are distinct");
}

#[tokio::test]
async fn a_given_message_id_is_kept_and_100_characters_is_the_limit() {
    let h = Harness::new();
    let hundred = "m".repeat(90) + "é€😀ü012345"; // 100 characters, more bytes
    assert_eq!(hundred.chars().count(), 100);
    let mut ev = event("track", &hundred);
    h.send(post_json("/v1/track", Some(WEB_KEY), &ev)).await.assert_success();
    assert_eq!(h.single_event().key, format!("{WEB}/{hundred}"));

    let long = "z".repeat(101);
    ev["messageId"] = long.clone().into();
    let resp = h.send(post_json("/v1/track", Some(WEB_KEY), &ev)).await;
    resp.assert_error(StatusCode::BAD_REQUEST, "invalid_message_id");

    // In a batch the long one is dropped and counted, the rest kept.
    let items = vec![event("track", &long), event("track", "short-one")];
    h.send(post_json("/v1/batch", Some(WEB_KEY), &batch(items))).await.assert_success();
    assert_eq!(h.records().len(), 2);
    h.by_message_id("short-one");
    assert_eq!(h.ingest.metrics.rejected("invalid_message_id"), 2);
}

// ---------------------------------------------------------------------------
// receivedAt, timestamp, originalTimestamp

#[tokio::test]
async fn received_at_is_set_by_the_server() {
    let h = Harness::new();
    let mut ev = event("track", "recv");
    ev["receivedAt"] = "1999-01-01T00:00:00.000Z".into();
    let before = Utc::now() - chrono::Duration::milliseconds(1);
    h.send(post_json("/v1/track", Some(WEB_KEY), &ev)).await.assert_success();
    let after = Utc::now();
    let stored = h.single_event().event;
    let received = ts(&stored["receivedAt"]);
    assert!(before <= received && received <= after, "receivedAt {received} not within [{before}, {after}]");
    // Without a client timestamp the event's time is its arrival.
    assert!(stored.get("originalTimestamp").is_none(), "{stored}");
    assert_eq!(ts(&stored["timestamp"]), received);
}

#[tokio::test]
async fn timestamp_is_corrected_for_clock_skew_and_original_timestamp_kept() {
    let h = Harness::new();
    // The client's clock is far off (2020); it sent 10 s after the event.
    let mut a = event("track", "skew-a");
    a["timestamp"] = "2020-01-01T00:00:00.000Z".into();
    let mut b = event("track", "skew-b");
    b["timestamp"] = "2020-01-01T00:00:07.500Z".into();
    let body = json!({"batch": [a, b], "sentAt": "2020-01-01T00:00:10.000Z"});
    h.send(post_json("/v1/batch", Some(WEB_KEY), &body)).await.assert_success();

    for (id, original, age_ms) in [("skew-a", "2020-01-01T00:00:00.000Z", 10_000), ("skew-b", "2020-01-01T00:00:07.500Z", 2_500)] {
        let e = h.by_message_id(id).event;
        assert_eq!(e["originalTimestamp"], original, "{e}");
        let received = ts(&e["receivedAt"]);
        assert_eq!(ts(&e["timestamp"]), received - chrono::Duration::milliseconds(age_ms), "{e}");
    }

    // A single call carries its own sentAt.
    let mut single = event("identify", "skew-single");
    single["timestamp"] = "2031-06-01T12:00:00.000Z".into();
    single["sentAt"] = "2031-06-01T12:01:00.000Z".into();
    h.send(post_json("/v1/identify", Some(WEB_KEY), &single)).await.assert_success();
    let e = h.by_message_id("skew-single").event;
    assert_eq!(e["originalTimestamp"], "2031-06-01T12:00:00.000Z");
    assert_eq!(ts(&e["timestamp"]), ts(&e["receivedAt"]) - chrono::Duration::seconds(60), "{e}");
}

#[tokio::test]
async fn timestamps_with_offsets_and_microseconds_parse() {
    let h = Harness::new();
    // timestamp 00:00:00.250000Z and sentAt 02:00:10.500000+02:00 are
    // 10.25 s apart; dropping the offset or the fraction would change that.
    let mut ev = event("track", "precise");
    ev["timestamp"] = "2024-03-10T00:00:00.250000Z".into();
    let body = json!({"batch": [ev], "sentAt": "2024-03-10T02:00:10.500000+02:00"});
    h.send(post_json("/v1/batch", Some(WEB_KEY), &body)).await.assert_success();
    let e = h.by_message_id("precise").event;
    assert_eq!(e["originalTimestamp"], "2024-03-10T00:00:00.250000Z");
    assert_eq!(ts(&e["timestamp"]), ts(&e["receivedAt"]) - chrono::Duration::milliseconds(10_250), "{e}");

    // Offsets on the timestamp itself, microseconds on both.
    let mut ev = event("page", "offset");
    ev["timestamp"] = "2024-03-10T05:30:00.000001+05:30".into();
    ev["sentAt"] = "2024-03-10T00:00:05.000001Z".into();
    h.send(post_json("/v1/page", Some(WEB_KEY), &ev)).await.assert_success();
    let e = h.by_message_id("offset").event;
    assert_eq!(e["originalTimestamp"], "2024-03-10T05:30:00.000001+05:30");
    assert_eq!(ts(&e["timestamp"]), ts(&e["receivedAt"]) - chrono::Duration::seconds(5), "{e}");
}

// ---------------------------------------------------------------------------
// Unknown fields

#[tokio::test]
async fn unknown_fields_are_preserved() {
    let h = Harness::new();
    let extra = json!({
        "properties": {
            "price": 19.99, "qty": -3, "big": 9007199254740991i64, "flag": false, "none": null,
            "nested": {"deep": {"deeper": [1, "two", {"three": [3.5e-7]}]}}, "emptyObj": {}, "emptyArr": []
        },
        "traits": {"名前": "山田", "emoji": "🎉✨", "quote\"key": "line\nbreak\ttab \\ back"},
        "customTopLevel": {"any": ["thing", 1, true]},
        "ünïcödé_kéy": "välüe",
        "version": 2,
    });
    let mut single = event("track", "fields-single");
    let mut item = event("identify", "fields-item");
    for (k, v) in extra.as_object().unwrap() {
        single[k] = v.clone();
        item[k] = v.clone();
    }
    h.send(post_json("/v1/track", Some(WEB_KEY), &single)).await.assert_success();
    h.send(post_json("/v1/batch", Some(WEB_KEY), &json!({"batch": [item], "someBatchField": 1}))).await.assert_success();

    for id in ["fields-single", "fields-item"] {
        let e = h.by_message_id(id).event;
        for (k, v) in extra.as_object().unwrap() {
            assert_eq!(&e[k], v, "{id}: field {k:?} changed: {e}");
        }
        assert_eq!(e["userId"], "user-1");
    }
    // Unicode written raw (not re-escaped into something else) in the log.
    let raw = serde_json::to_string(&h.by_message_id("fields-single").event).unwrap();
    assert!(raw.contains("山田") && raw.contains("🎉✨"));
}

// ---------------------------------------------------------------------------
// Responses

#[tokio::test]
async fn a_200_body_is_exactly_success_true_json() {
    let h = Harness::new();
    for (path, body) in [("/v1/track", event("track", "a")), ("/v1/batch", batch(vec![event("track", "b")]))] {
        let resp = h.send(post_json(path, Some(WEB_KEY), &body)).await;
        assert_eq!(resp.status, StatusCode::OK);
        assert_eq!(&resp.body[..], br#"{"success":true}"#);
        let ct = resp.headers.get(header::CONTENT_TYPE).unwrap().to_str().unwrap();
        assert!(ct.starts_with("application/json"), "{ct}");
    }
}

#[tokio::test]
async fn unknown_paths_are_404_json_with_code_and_message() {
    let h = Harness::new();
    for path in ["/v1/purchase", "/v1/tracks", "/v2/track", "/track", "/", "/v1", "/v1/track/extra", "/v1/x/"] {
        let resp = h.send(post_json(path, Some(WEB_KEY), &event("track", "m"))).await;
        resp.assert_error_shape(StatusCode::NOT_FOUND);
        let resp = h.send(Request::get(path).body(Body::empty()).unwrap()).await;
        assert!(resp.status == StatusCode::NOT_FOUND || resp.status == StatusCode::METHOD_NOT_ALLOWED, "GET {path}: {}", resp.status);
        resp.assert_error_shape(resp.status);
    }
    // A path segment that is not UTF-8 once percent-decoded is no endpoint
    // either, and is answered in JSON like any other.
    for path in ["/v1/%FF", "/v1/%C3%28/"] {
        let resp = h.send(post_json(path, Some(WEB_KEY), &event("track", "m"))).await;
        resp.assert_error_shape(StatusCode::NOT_FOUND);
    }
    assert!(h.records().is_empty());
}

#[tokio::test]
async fn other_methods_are_405_json_with_code_and_message() {
    let h = Harness::new();
    for path in ["/v1/track", "/v1/batch/", "/v1/t"] {
        for method in ["GET", "PUT", "DELETE"] {
            let req = Request::builder().method(method).uri(path).body(Body::empty()).unwrap();
            h.send(req).await.assert_error_shape(StatusCode::METHOD_NOT_ALLOWED);
        }
    }
}

#[tokio::test]
async fn malformed_json_is_400_json() {
    let h = Harness::new();
    let bodies: Vec<Vec<u8>> = vec![
        b"{\"type\":\"track\",\"userId\":\"u\",".to_vec(),
        b"not json at all".to_vec(),
        b"".to_vec(),
        b"[{\"type\":\"track\"}]".to_vec(),
        b"\"a string\"".to_vec(),
        vec![b'{', b'"', 0xff, 0xfe, b'"', b':', b'1', b'}'],
    ];
    for body in bodies {
        for path in ["/v1/track", "/v1/batch"] {
            let req = post_raw(path, &[("authorization", &basic_key(WEB_KEY)), ("content-type", "application/json")], body.clone());
            h.send(req).await.assert_error_shape(StatusCode::BAD_REQUEST);
        }
    }
    // A batch whose `batch` is not an array of events.
    for b in [json!({}), json!({"batch": {"type": "track"}}), json!({"batch": "nope"})] {
        h.send(post_json("/v1/batch", Some(WEB_KEY), &b)).await.assert_error_shape(StatusCode::BAD_REQUEST);
    }
    assert!(h.records().is_empty());
}

// ---------------------------------------------------------------------------
// Invalid items in a batch

#[tokio::test]
async fn an_invalid_batch_item_is_dropped_and_counted_and_the_rest_accepted() {
    let h = Harness::new();
    let items = vec![
        event("track", "good-1"),
        json!({"type": "track", "event": "no identity", "messageId": "bad-1"}),
        json!({"type": "group", "userId": "u", "messageId": "bad-2"}),
        json!(42),
        json!({"type": "alias", "userId": "u", "messageId": "bad-3"}),
        event("alias", "good-2"),
        json!({"userId": "u", "messageId": "bad-4"}),
    ];
    h.send(post_json("/v1/batch", Some(WEB_KEY), &batch(items))).await.assert_success();
    let mut ids: Vec<String> = h.events().iter().map(|e| e["messageId"].as_str().unwrap().to_owned()).collect();
    ids.sort();
    assert_eq!(ids, ["good-1", "good-2"]);
    let m = &h.ingest.metrics;
    assert_eq!(m.rejected("missing_user_id"), 1);
    assert_eq!(m.rejected("missing_field"), 2);
    assert_eq!(m.rejected("invalid_event"), 1);
    assert_eq!(m.rejected("invalid_type"), 1);
    assert_eq!(m.accepted(WEB), 2);
}

#[tokio::test]
async fn a_batch_of_only_invalid_items_is_400() {
    let h = Harness::new();
    let items = vec![json!({"type": "track", "userId": "u"}), json!({"type": "identify"}), json!("x")];
    h.send(post_json("/v1/batch", Some(WEB_KEY), &batch(items))).await.assert_error_shape(StatusCode::BAD_REQUEST);
    assert!(h.records().is_empty());
    assert_eq!(h.ingest.metrics.rejected("missing_field"), 1);
    assert_eq!(h.ingest.metrics.rejected("missing_user_id"), 1);
    assert_eq!(h.ingest.metrics.rejected("invalid_event"), 1);
}

// ---------------------------------------------------------------------------
// Rate limit

#[tokio::test]
async fn a_source_over_its_rate_limit_gets_429_with_retry_after_and_others_are_unaffected() {
    // 1 event/s with a burst of 3: a batch of 3 empties the bucket, and
    // refilling 3 tokens takes 3 s, so the next batch of 3 is refused.
    let srcs = vec![source(WEB, WEB_KEY, Some(1), Some(3)), source(APP, APP_KEY, Some(1), Some(3))];
    let h = Harness::with(settings(), &srcs);
    let three = |p: &str| batch((0..3).map(|i| event("track", &format!("{p}-{i}"))).collect());

    h.send(post_json("/v1/batch", Some(WEB_KEY), &three("web-a"))).await.assert_success();
    let resp = h.send(post_json("/v1/batch", Some(WEB_KEY), &three("web-b"))).await;
    resp.assert_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    let retry = resp.retry_after().expect("429 carries Retry-After");
    assert!(retry >= 1, "Retry-After {retry}");
    // A single call is limited too.
    let resp = h.send(post_json("/v1/track", Some(WEB_KEY), &event("track", "web-c"))).await;
    resp.assert_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    assert!(resp.retry_after().is_some());

    // Another source has its own bucket.
    h.send(post_json("/v1/batch", Some(APP_KEY), &three("app-a"))).await.assert_success();

    let mut ids: Vec<String> = h.records().iter().map(|r| r.key.clone()).collect();
    ids.sort();
    assert_eq!(ids, ["app/app-a-0", "app/app-a-1", "app/app-a-2", "web/web-a-0", "web/web-a-1", "web/web-a-2"]);
}

// ---------------------------------------------------------------------------
// Log failure, durability, partitioning

/// A log whose appends always fail.
struct FailingLog {
    appends: AtomicUsize,
}

#[async_trait]
impl Log for FailingLog {
    fn partitions(&self, _topic: &str) -> Result<u32, LogError> {
        Ok(4)
    }
    async fn append(&self, _topic: &str, _partition: u32, _records: Vec<Record>) -> Result<u64, LogError> {
        self.appends.fetch_add(1, Ordering::SeqCst);
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

#[tokio::test]
async fn a_log_failure_is_503_with_retry_after_json() {
    let log = Arc::new(FailingLog { appends: AtomicUsize::new(0) });
    let dyn_log: Arc<dyn Log> = log.clone();
    let ingest = Arc::new(Ingest::new(dyn_log, settings(), &sources(), 0).unwrap());
    let app = router(ingest.clone());
    for (path, body) in [("/v1/track", event("track", "m1")), ("/v1/batch", batch(vec![event("track", "m2"), event("page", "m3")]))] {
        let resp = send(&app, post_json(path, Some(WEB_KEY), &body)).await;
        resp.assert_error_shape(StatusCode::SERVICE_UNAVAILABLE);
        let retry = resp.retry_after().expect("503 carries Retry-After");
        assert!(retry >= 1);
    }
    assert!(log.appends.load(Ordering::SeqCst) >= 2, "the log was asked to append");
    assert_eq!(ingest.metrics.accepted(WEB), 0);
}

/// An `EmbeddedLog` whose appends wait at a gate the test opens.
struct GatedLog {
    inner: Arc<EmbeddedLog>,
    gate: tokio::sync::Semaphore,
    waiting: tokio::sync::Notify,
}

#[async_trait]
impl Log for GatedLog {
    fn partitions(&self, topic: &str) -> Result<u32, LogError> {
        self.inner.partitions(topic)
    }
    async fn append(&self, topic: &str, partition: u32, records: Vec<Record>) -> Result<u64, LogError> {
        self.waiting.notify_one();
        let _permit = self.gate.acquire().await.expect("gate");
        self.inner.append(topic, partition, records).await
    }
    async fn read(&self, t: &str, p: u32, from: u64, max: usize) -> Result<Vec<StoredRecord>, LogError> {
        self.inner.read(t, p, from, max).await
    }
    async fn offsets(&self, t: &str, p: u32) -> Result<OffsetRange, LogError> {
        self.inner.offsets(t, p).await
    }
    async fn commit(&self, at: Checkpoint<'_>) -> Result<(), LogError> {
        self.inner.commit(at).await
    }
    async fn committed(&self, g: &str, t: &str, p: u32) -> Result<Option<u64>, LogError> {
        self.inner.committed(g, t, p).await
    }
}

#[tokio::test]
async fn the_200_goes_out_only_once_the_events_are_readable_from_the_log() {
    // Plain case: right after each 200 the events are readable, both through
    // the writer and from the files on disk (a read-only opening).
    let h = Harness::new();
    for round in 0..5 {
        let items = (0..20).map(|i| event("track", &format!("d-{round}-{i}"))).collect();
        h.send(post_json("/v1/batch", Some(WEB_KEY), &batch(items))).await.assert_success();
        assert_eq!(h.records().len(), (round + 1) * 20);
        let on_disk = EmbeddedLog::open_read_only(&h.log_dir()).expect("read-only open");
        assert_eq!(read_all(&on_disk).len(), (round + 1) * 20, "round {round}: records on disk after the 200");
    }

    // Gated case: while the append is held back, no answer goes out.
    let dir = tempfile::tempdir().unwrap();
    let options = sluice_log::LogOptions { topics: vec![(INPUT_TOPIC.into(), PARTITIONS)], ..Default::default() };
    let inner = Arc::new(EmbeddedLog::open(dir.path(), options).unwrap());
    let gated = Arc::new(GatedLog { inner: inner.clone(), gate: tokio::sync::Semaphore::new(0), waiting: tokio::sync::Notify::new() });
    let dyn_log: Arc<dyn Log> = gated.clone();
    let ingest = Arc::new(Ingest::new(dyn_log, settings(), &sources(), 0).unwrap());
    let app = router(ingest);
    let mut request = tokio::spawn({
        let app = app.clone();
        async move { send(&app, post_json("/v1/track", Some(WEB_KEY), &event("track", "gated"))).await }
    });
    tokio::time::timeout(Duration::from_secs(10), gated.waiting.notified()).await.expect("the handler appends");
    assert!(tokio::time::timeout(Duration::from_millis(300), &mut request).await.is_err(), "answered before the append completed");
    assert!(read_all(&inner).is_empty());
    gated.gate.add_permits(1000);
    let resp = tokio::time::timeout(Duration::from_secs(10), request).await.expect("answer after the append").unwrap();
    resp.assert_success();
    let recs = read_all(&inner);
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].key, format!("{WEB}/gated"));
}

#[tokio::test]
async fn records_land_in_the_partition_of_their_message_id_keyed_source_slash_message_id() {
    let h = Harness::new();
    let items: Vec<Value> = (0..200).map(|i| event("track", &format!("msg-{i:04}-{}", i * 7919))).collect();
    h.send(post_json("/v1/batch", Some(WEB_KEY), &batch(items))).await.assert_success();
    let mut no_id = event("track", "x");
    no_id.as_object_mut().unwrap().remove("messageId");
    h.send(post_json("/v1/track", Some(APP_KEY), &no_id)).await.assert_success();

    let recs = h.records();
    assert_eq!(recs.len(), 201);
    let mut used = std::collections::HashSet::new();
    for r in &recs {
        let id = r.event["messageId"].as_str().unwrap();
        assert_eq!(r.partition, partition_for(id, PARTITIONS), "record {id}");
        let source = if id.starts_with("msg-") { WEB } else { APP };
        assert_eq!(r.key, format!("{source}/{id}"));
        used.insert(r.partition);
    }
    assert!(used.len() > 1, "200 ids spread over more than one partition");
}

// ---------------------------------------------------------------------------
// Protection: body read timeout, header read timeout, bounded connections

#[tokio::test]
async fn a_body_that_does_not_arrive_in_time_is_408_json() {
    let mut s = settings();
    s.body_read_timeout = Duration::from_millis(200);
    let h = Harness::with(s, &sources());
    let first: Result<Bytes, std::io::Error> = Ok(Bytes::from_static(b"{\"type\":\"track\","));
    let stream = futures_util::stream::StreamExt::chain(futures_util::stream::iter([first]), futures_util::stream::pending());
    let req = Request::post("/v1/track")
        .header(header::AUTHORIZATION, basic_key(WEB_KEY))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), h.send(req)).await.expect("answered, not hung");
    resp.assert_error_shape(StatusCode::REQUEST_TIMEOUT);
    assert!(h.records().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stalls_on_the_real_server_is_408_json() {
    let mut s = settings();
    s.body_read_timeout = Duration::from_millis(300);
    let server = Server::start(Harness::with(s, &sources()), ServeOptions::default()).await;
    let mut conn = server.connect().await;
    let head = format!(
        "POST /v1/track HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n{{\"type\":",
        basic_key(WEB_KEY)
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), read_response(&mut conn)).await.expect("answered").expect("response");
    assert_eq!(resp.status, 408);
    let v = resp.json();
    assert!(v["code"].is_string() && v["message"].is_string(), "{v}");
    assert!(server.harness.records().is_empty());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stalls_in_its_headers_is_disconnected() {
    let options = ServeOptions { header_read_timeout: Duration::from_millis(300), ..ServeOptions::default() };
    let server = Server::start(Harness::new(), options).await;

    // A prompt client is served on the same server.
    let mut ok = server.connect().await;
    let body = event("track", "prompt").to_string();
    let resp = roundtrip(&mut ok, &raw_post("/v1/track", WEB_KEY, &body)).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.json(), json!({"success": true}));

    // Half the headers, then nothing.
    let mut slow = server.connect().await;
    slow.write_all(b"POST /v1/track HTTP/1.1\r\nHost: localhost\r\nContent-Ty").await.unwrap();
    let closed = wait_closed(&mut slow, Duration::from_secs(10)).await;
    assert!(closed.is_ok(), "the server kept a connection with half-sent headers open for 10 s");
    assert_eq!(server.harness.records().len(), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_bounded() {
    let options = ServeOptions { max_connections: 1, header_read_timeout: Duration::from_secs(60), ..ServeOptions::default() };
    let server = Server::start(Harness::new(), options).await;

    // The first connection is served and stays open (keep-alive).
    let mut first = server.connect().await;
    let resp = roundtrip(&mut first, &raw_post("/v1/track", WEB_KEY, &event("track", "c1").to_string())).await;
    assert_eq!(resp.status, 200);

    // The second one is not served while the first is open ...
    let mut second = server.connect().await;
    second.write_all(&raw_post("/v1/track", WEB_KEY, &event("track", "c2").to_string())).await.unwrap();
    let early = tokio::time::timeout(Duration::from_millis(500), read_response(&mut second)).await;
    assert!(early.is_err(), "second connection served while the first was open: {early:?}");
    assert_eq!(server.harness.records().len(), 1);

    // ... and the first keeps working meanwhile ...
    let resp = roundtrip(&mut first, &raw_post("/v1/track", WEB_KEY, &event("track", "c1b").to_string())).await;
    assert_eq!(resp.status, 200);

    // ... and it is served once the first closes.
    drop(first);
    let resp = tokio::time::timeout(Duration::from_secs(20), read_response(&mut second))
        .await
        .expect("second connection served after the first closed")
        .expect("response");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.json(), json!({"success": true}));
    let mut keys: Vec<String> = server.harness.records().into_iter().map(|r| r.key).collect();
    keys.sort();
    assert_eq!(keys, ["web/c1", "web/c1b", "web/c2"]);
    drop(second);
    server.stop().await;
}
