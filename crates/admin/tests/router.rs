//! The admin router in process (`oneshot`): who may call the API, what each
//! route answers (status and body), and that a change is in effect when
//! the answer comes (the catalog, and the Tracking API of the same process).
//! The real-process tests (crates/sluice/tests/admin_api.rs,
//! admin_hardening.rs, console.rs) check the same port over TCP.

mod common;

use axum::http::{header, StatusCode};
use serde_json::{json, Value};
use sluice_deliver::control::NewDeadLetter;

use common::*;

// ---------------------------------------------------------------------------
// Authentication

#[tokio::test]
async fn api_refuses_a_missing_or_wrong_token_and_accepts_the_right_one() {
    let f = Fixture::new();
    let none = f.raw("GET", "/api/sources", None, None).await;
    assert_eq!(none.status, StatusCode::UNAUTHORIZED);
    assert_eq!(none.code(), "unauthorized");
    let wrong = f.raw("GET", "/api/sources", Some("admin-token-for-tests-012345678X"), None).await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    // A prefix of the token is not the token.
    let prefix = f.raw("GET", "/api/sources", Some(&TOKEN[..10]), None).await;
    assert_eq!(prefix.status, StatusCode::UNAUTHORIZED);
    // A refused change changes nothing.
    let refused = f.raw("POST", "/api/sources", Some("wrong"), Some(r#"{"id":"sneaky"}"#)).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert!(f.state.catalog.snapshot().sources.iter().all(|(s, _)| s.id != "sneaky"));

    let right = f.call("GET", "/api/sources", None).await;
    assert_eq!(right.status, StatusCode::OK, "{}", right.text);
    assert_eq!(right.json[0]["id"], "web");
    assert_eq!(right.headers[header::CACHE_CONTROL], "no-store");
}

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive() {
    let f = Fixture::new();
    let req = axum::http::Request::builder()
        .uri("/api/qos")
        .header(header::AUTHORIZATION, format!("bEaReR {TOKEN}"))
        .body(axum::body::Body::empty())
        .unwrap();
    let resp = tower::ServiceExt::oneshot(f.router(), req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test]
async fn without_a_configured_token_the_api_is_off() {
    let f = Fixture::with(None, None);
    for token in [None, Some(TOKEN), Some("")] {
        let a = f.raw("POST", "/api/sources", token, Some(r#"{"id":"app"}"#)).await;
        assert_eq!(a.status, StatusCode::FORBIDDEN);
        assert_eq!(a.code(), "api_disabled");
    }
    assert_eq!(f.state.catalog.snapshot().sources.len(), 1, "nothing was created");
}

#[tokio::test]
async fn console_healthz_and_metrics_are_served_without_a_token() {
    let f = Fixture::new();
    for path in ["/", "/console"] {
        let page = f.raw("GET", path, None, None).await;
        assert_eq!(page.status, StatusCode::OK, "{path}");
        assert!(page.headers[header::CONTENT_TYPE].to_str().unwrap().starts_with("text/html"), "{path}");
        assert!(page.text.contains("<title>Sluice console</title>"), "{path}: not the console page");
        assert_eq!(page.headers[header::X_FRAME_OPTIONS], "DENY", "{path}");
    }
    let health = f.raw("GET", "/healthz", None, None).await;
    assert_eq!(health.status, StatusCode::OK);
    assert_eq!(health.json, json!({"status": "ok"}));
    let metrics = f.raw("GET", "/metrics", None, None).await;
    assert_eq!(metrics.status, StatusCode::OK);
    assert!(metrics.text.ends_with("# EOF\n"), "an OpenMetrics exposition: {}", metrics.text);
}

// ---------------------------------------------------------------------------
// Sources

#[tokio::test]
async fn a_created_source_is_listed_and_accepted_by_the_tracking_api_at_once() {
    let f = Fixture::new();
    let created = f.call("POST", "/api/sources", Some(json!({"id": "app", "rate_limit": 50}))).await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    assert_eq!(created.json["id"], "app");
    let key = created.json["write_key"].as_str().expect("a generated write key").to_owned();
    assert!(key.starts_with("wk_") && key.len() == 35, "{key}");
    assert_eq!(f.track_with(&key).await, StatusCode::OK);

    let list = f.call("GET", "/api/sources", None).await;
    let app = list.json.as_array().unwrap().iter().find(|s| s["id"] == "app").expect("app listed").clone();
    assert_eq!(app, json!({"id": "app", "write_key": key, "rate_limit": 50, "rate_burst": null, "disabled": false, "function": null}));

    // The same id, or another source's write key, is refused.
    let again = f.call("POST", "/api/sources", Some(json!({"id": "app"}))).await;
    assert_eq!((again.status, again.code()), (StatusCode::CONFLICT, "exists"));
    let same_key = f.call("POST", "/api/sources", Some(json!({"id": "other", "write_key": WRITE_KEY}))).await;
    assert_eq!(same_key.status, StatusCode::CONFLICT);
    // An invalid id is refused before anything is written.
    let bad = f.call("POST", "/api/sources", Some(json!({"id": "has space"}))).await;
    assert_eq!((bad.status, bad.code()), (StatusCode::BAD_REQUEST, "invalid"));
    assert_eq!(f.state.catalog.snapshot().sources.len(), 2);
}

#[tokio::test]
async fn rotating_a_key_retires_the_old_one_at_once() {
    let f = Fixture::new();
    let rotated = f.call("POST", "/api/sources/web/rotate-key", None).await;
    assert_eq!(rotated.status, StatusCode::OK, "{}", rotated.text);
    assert_eq!(rotated.json["id"], "web");
    let new_key = rotated.json["write_key"].as_str().unwrap().to_owned();
    assert_ne!(new_key, WRITE_KEY);
    assert_eq!(f.track_with(WRITE_KEY).await, StatusCode::UNAUTHORIZED);
    assert_eq!(f.track_with(&new_key).await, StatusCode::OK);
    let list = f.call("GET", "/api/sources", None).await;
    assert_eq!(list.json[0]["write_key"], new_key.as_str());

    let unknown = f.call("POST", "/api/sources/nope/rotate-key", None).await;
    assert_eq!((unknown.status, unknown.code()), (StatusCode::NOT_FOUND, "not_found"));
}

#[tokio::test]
async fn a_disabled_source_is_refused_until_enabled_again() {
    let f = Fixture::new();
    assert_eq!(f.track_with(WRITE_KEY).await, StatusCode::OK);
    let off = f.call("POST", "/api/sources/web/disable", None).await;
    assert_eq!((off.status, off.json.clone()), (StatusCode::OK, json!({"disabled": true})));
    assert_eq!(f.track_with(WRITE_KEY).await, StatusCode::UNAUTHORIZED);
    let list = f.call("GET", "/api/sources", None).await;
    assert_eq!(list.json[0]["disabled"], true);

    let on = f.call("POST", "/api/sources/web/enable", None).await;
    assert_eq!((on.status, on.json.clone()), (StatusCode::OK, json!({"disabled": false})));
    assert_eq!(f.track_with(WRITE_KEY).await, StatusCode::OK);

    for path in ["/api/sources/nope/disable", "/api/sources/nope/enable"] {
        let a = f.call("POST", path, None).await;
        assert_eq!((a.status, a.code()), (StatusCode::NOT_FOUND, "not_found"), "{path}");
    }
}

// ---------------------------------------------------------------------------
// Destinations

#[tokio::test]
async fn destination_listings_never_show_the_secret_or_the_url_password() {
    let f = Fixture::new();
    let list = f.call("GET", "/api/destinations", None).await;
    assert_eq!(list.status, StatusCode::OK);
    assert!(!list.text.contains("s3cret") && !list.text.contains("hunter2"), "a credential shows: {}", list.text);
    let hook = &list.json[0];
    assert_eq!(hook["id"], "hook");
    assert!(hook.get("secret").is_none(), "{hook}");
    assert_eq!(hook["secret_set"], true);
    assert_eq!(hook["url"], "https://user:***@example.com/hook");

    // The listing sent back as is keeps the stored password and secret.
    let mut back = hook.clone();
    back.as_object_mut().unwrap().remove("secret_set");
    back["max_in_flight"] = json!(7);
    let put = f.call("PUT", "/api/destinations/hook", Some(back)).await;
    assert_eq!(put.status, StatusCode::OK, "{}", put.text);
    assert!(!put.text.contains("s3cret") && !put.text.contains("hunter2"), "{}", put.text);
    let stored = f.state.catalog.snapshot().destinations["hook"].clone();
    assert_eq!(stored.url, "https://user:hunter2@example.com/hook");
    assert_eq!(stored.secret.as_deref(), Some("s3cret-signing-key"));
    assert_eq!(stored.max_in_flight, Some(7));

    // `null` removes the secret.
    let cleared = f.call("PUT", "/api/destinations/hook", Some(json!({"url": "https://example.com/hook", "secret": null}))).await;
    assert_eq!((cleared.status, cleared.json["secret_set"].clone()), (StatusCode::OK, json!(false)));
    assert_eq!(f.state.catalog.snapshot().destinations["hook"].secret, None);
}

/// A CA in the shape the config's check takes (a DER sequence in PEM).
const OTHER_CA: &str = "-----BEGIN CERTIFICATE-----\nMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAw\n-----END CERTIFICATE-----\n";

/// Destination `id` as `GET /api/destinations` shows it.
async fn listed(f: &Fixture, id: &str) -> Value {
    let list = f.call("GET", "/api/destinations", None).await;
    list.json.as_array().unwrap().iter().find(|d| d["id"] == id).unwrap().clone()
}

/// A write-only key left out of a PUT is kept only while the keys it is
/// bound to stay: a caller who cannot read a secret cannot send it (or
/// what it signs) to a server of theirs.
#[tokio::test]
async fn a_stored_secret_is_kept_only_while_the_keys_it_is_bound_to_stay() {
    let f = Fixture::new();
    let kafka = json!({"type": "kafka", "url": "kafka://broker.example:9093/events", "kafka_security_protocol": "sasl_ssl",
        "kafka_sasl_mechanism": "SCRAM-SHA-512", "kafka_sasl_username": "bob", "kafka_sasl_password": "kafka-pw"});
    let s3 = json!({"type": "s3", "url": "s3://lake/x", "s3_endpoint": "https://minio.example:9000",
        "s3_access_key_id": "AK", "s3_secret_access_key": "s3-secret-key"});
    let cases: [(&str, Value, &str, &[(&str, &str)]); 3] = [
        (
            "k",
            kafka,
            "kafka_sasl_password",
            &[
                ("url", "kafka://evil.example:9092/events"),
                ("kafka_sasl_mechanism", "PLAIN"),
                ("kafka_security_protocol", "sasl_plaintext"),
                ("kafka_sasl_username", "mallory"),
                // Another CA: a server with a certificate of the caller's would get the password.
                ("kafka_tls_ca", OTHER_CA),
            ],
        ),
        (
            "l",
            s3,
            "s3_secret_access_key",
            &[("s3_endpoint", "https://evil.example"), ("s3_region", "eu-west-1"), ("url", "s3://other-lake/x"), ("s3_access_key_id", "AK2")],
        ),
        ("hook", Value::Null, "secret", &[("url", "https://evil.example/hook")]),
    ];
    for (id, body, key, changes) in cases {
        if !body.is_null() {
            let created = f.call("PUT", &format!("/api/destinations/{id}"), Some(body)).await;
            assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
        }
        let shown = listed(&f, id).await;
        assert_eq!(shown[format!("{key}_set")], true, "{shown}");
        let stored = |f: &Fixture| serde_json::to_value(&f.state.catalog.snapshot().destinations[id]).unwrap()[key].clone();
        let before = stored(&f);
        // Sent back as shown: kept.
        let back = f.call("PUT", &format!("/api/destinations/{id}"), Some(shown.clone())).await;
        assert_eq!(back.status, StatusCode::OK, "{}", back.text);
        assert_eq!(stored(&f), before);
        // A bound key changed without the secret: refused, naming both.
        for (bound, value) in changes {
            let mut changed = shown.clone();
            changed[*bound] = json!(value);
            let r = f.call("PUT", &format!("/api/destinations/{id}"), Some(changed)).await;
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{id} {bound}: {}", r.text);
            assert!(r.text.contains(key) && r.text.contains(bound), "{}", r.text);
            assert_eq!(stored(&f), before, "refused changes change nothing");
        }
        // Sent again with the change: taken.
        let (bound, value) = changes[0];
        let mut resent = shown.clone();
        resent[bound] = json!(value);
        resent[key] = json!("a-new-secret-value");
        let r = f.call("PUT", &format!("/api/destinations/{id}"), Some(resent)).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(stored(&f), json!("a-new-secret-value"));
    }
    // Another type: the old type's secret is not carried over.
    let retyped = f.call("PUT", "/api/destinations/k", Some(json!({"type": "webhook", "url": "https://example.com/k"}))).await;
    assert_eq!((retyped.status, retyped.json["secret_set"].clone()), (StatusCode::OK, json!(false)), "{}", retyped.text);
    assert_eq!(f.state.catalog.snapshot().destinations["k"].kafka_sasl_password, None);

    // A postgres URL naming the server's files: refused before anything reads them.
    for param in ["sslrootcert=/etc/shadow", "sslcert=/etc/passwd&sslkey=/etc/shadow", "ssl%2Dca=/nonexistent"] {
        let body = json!({"type": "postgres", "url": format!("postgres://u:p@db.example:5432/db?sslmode=verify-full&{param}")});
        let r = f.call("PUT", "/api/destinations/wh", Some(body)).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{param}: {}", r.text);
        assert!(r.text.contains("names a file on the server") && !r.text.contains("No such file"), "{}", r.text);
    }

    // A URL shown with `***` for its password, changed around it: refused (not stored as the password `***`).
    f.call("PUT", "/api/destinations/pw", Some(json!({"url": "https://user:hunter2@example.com/in"}))).await;
    let r = f.call("PUT", "/api/destinations/pw", Some(json!({"url": "https://user:***@evil.example/in"}))).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    assert!(r.text.contains("***"), "{}", r.text);
    assert_eq!(f.state.catalog.snapshot().destinations["pw"].url, "https://user:hunter2@example.com/in");
}

#[tokio::test]
async fn destinations_are_created_replaced_and_deleted() {
    let f = Fixture::new();
    let body = json!({"url": "https://example.org/in", "secret": "another-secret"});
    let created = f.call("PUT", "/api/destinations/d2", Some(body.clone())).await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    assert_eq!((created.json["id"].clone(), created.json["secret_set"].clone()), (json!("d2"), json!(true)));
    assert!(f.state.catalog.snapshot().destinations.contains_key("d2"));
    let replaced = f.call("PUT", "/api/destinations/d2", Some(body)).await;
    assert_eq!(replaced.status, StatusCode::OK);

    let other_id = f.call("PUT", "/api/destinations/d2", Some(json!({"id": "d3", "url": "https://example.org/in"}))).await;
    assert_eq!(other_id.status, StatusCode::BAD_REQUEST);
    assert!(other_id.json["message"].as_str().unwrap().contains("differs"), "{}", other_id.text);
    let clash = f.call("PUT", "/api/destinations/d4", Some(json!({"url": "https://example.org/in", "name": "hook"}))).await;
    assert_eq!((clash.status, clash.code()), (StatusCode::CONFLICT, "exists"));

    let deleted = f.call("DELETE", "/api/destinations/d2", None).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    assert!(!f.state.catalog.snapshot().destinations.contains_key("d2"));
    let again = f.call("DELETE", "/api/destinations/d2", None).await;
    assert_eq!((again.status, again.code()), (StatusCode::NOT_FOUND, "not_found"));
}

// ---------------------------------------------------------------------------
// Connections, QoS, replays

#[tokio::test]
async fn connections_are_listed_created_and_deleted() {
    let f = Fixture::new();
    let list = f.call("GET", "/api/connections", None).await;
    assert_eq!(list.json, json!([{"source": "web", "destination": "hook"}]));
    assert_eq!(f.call("PUT", "/api/destinations/d2", Some(json!({"url": "https://example.org/in"}))).await.status, StatusCode::CREATED);
    let created = f.call("POST", "/api/connections", Some(json!({"source": "web", "destination": "d2"}))).await;
    assert_eq!((created.status, created.json.clone()), (StatusCode::CREATED, json!({"source": "web", "destination": "d2"})));
    let connected = f.state.catalog.snapshot().connections["web"].clone();
    assert!(connected.iter().any(|d| d == "d2"), "{connected:?}");
    assert_eq!(f.call("GET", "/api/connections", None).await.json.as_array().unwrap().len(), 2);

    let no_source = f.call("POST", "/api/connections", Some(json!({"source": "nope", "destination": "d2"}))).await;
    assert_eq!(no_source.status, StatusCode::BAD_REQUEST);
    assert!(no_source.json["message"].as_str().unwrap().contains("no source"), "{}", no_source.text);
    let no_dest = f.call("POST", "/api/connections", Some(json!({"source": "web", "destination": "nope"}))).await;
    assert_eq!(no_dest.status, StatusCode::BAD_REQUEST);

    assert_eq!(f.call("DELETE", "/api/connections/web/d2", None).await.status, StatusCode::NO_CONTENT);
    assert_eq!(f.call("GET", "/api/connections", None).await.json, json!([{"source": "web", "destination": "hook"}]));
    let again = f.call("DELETE", "/api/connections/web/d2", None).await;
    assert_eq!((again.status, again.code()), (StatusCode::NOT_FOUND, "not_found"));
}

#[tokio::test]
async fn qos_changes_only_the_columns_sent_and_applies_at_once() {
    let f = Fixture::new();
    let list = f.call("GET", "/api/qos", None).await;
    assert_eq!(list.json, json!([{"destination": "hook", "paused": false, "max_in_flight": null, "rate_per_sec": null, "priority": 1}]));
    let paused = f.call("PUT", "/api/qos/hook", Some(json!({"paused": true, "rate_per_sec": 20}))).await;
    assert_eq!(paused.status, StatusCode::OK, "{}", paused.text);
    assert_eq!(paused.json, json!({"paused": true, "max_in_flight": null, "rate_per_sec": 20, "priority": 1}));
    let priority = f.call("PUT", "/api/qos/hook", Some(json!({"priority": 5}))).await;
    assert_eq!(priority.json, json!({"paused": true, "max_in_flight": null, "rate_per_sec": 20, "priority": 5}));
    let live = f.state.catalog.snapshot().qos["hook"].clone();
    assert!(live.paused && live.priority == 5 && live.rate_per_sec == Some(20), "{live:?}");

    for bad in [json!({"priority": 0}), json!({"priority": 101}), json!({"max_in_flight": 0}), json!({"paused": "yes"}), json!([1])] {
        let a = f.call("PUT", "/api/qos/hook", Some(bad.clone())).await;
        assert_eq!((a.status, a.code()), (StatusCode::BAD_REQUEST, "invalid"), "{bad}");
    }
    let unknown = f.call("PUT", "/api/qos/nope", Some(json!({"paused": true}))).await;
    assert_eq!((unknown.status, unknown.code()), (StatusCode::NOT_FOUND, "not_found"));
    assert_eq!(f.state.catalog.snapshot().qos["hook"].priority, 5, "refused changes changed nothing");
}

#[tokio::test]
async fn a_replay_is_filed_and_can_be_read_back() {
    let f = Fixture::new();
    let filed = f.call("POST", "/api/replays", Some(json!({"destination": "hook", "since_ms": 1_700_000_000_000_i64}))).await;
    assert_eq!(filed.status, StatusCode::ACCEPTED, "{}", filed.text);
    assert_eq!(filed.json["state"], "pending");
    let id = filed.json["id"].as_i64().expect("an id");
    let read = f.call("GET", &format!("/api/replays/{id}"), None).await;
    assert_eq!(read.status, StatusCode::OK);
    assert_eq!(
        read.json,
        json!({"id": id, "destination": "hook", "since_ms": 1_700_000_000_000_i64, "state": "pending", "events": 0, "jobs": 0, "error": null})
    );

    let unknown_dest = f.call("POST", "/api/replays", Some(json!({"destination": "nope", "since_ms": 0}))).await;
    assert_eq!((unknown_dest.status, unknown_dest.code()), (StatusCode::NOT_FOUND, "not_found"));
    let unknown = f.call("GET", &format!("/api/replays/{}", id + 1000), None).await;
    assert_eq!((unknown.status, unknown.code()), (StatusCode::NOT_FOUND, "not_found"));
    let not_a_number = f.call("GET", "/api/replays/abc", None).await;
    assert_eq!((not_a_number.status, not_a_number.code()), (StatusCode::BAD_REQUEST, "invalid"));
}

// ---------------------------------------------------------------------------
// Dead letters

fn store_dead_letters(f: &Fixture, n: u64) {
    let letters: Vec<NewDeadLetter> = (0..n)
        .map(|i| NewDeadLetter {
            stage: "route",
            topic: "output".into(),
            partition: 0,
            offset: i,
            generation: 0,
            destination: None,
            record_ms: 1_700_000_000_000,
            key: format!("web/m-{i}").into_bytes(),
            payload: format!("not json {i}").into_bytes(),
            reason: "value is not JSON".into(),
        })
        .collect();
    f.state.catalog.with_control(|db| db.insert_dead_letters(&letters)).expect("stored");
}

#[tokio::test]
async fn dead_letters_are_listed_shown_replayed_and_discarded() {
    let f = Fixture::new();
    store_dead_letters(&f, 3);
    let list = f.call("GET", "/api/dead-letters?limit=2", None).await;
    assert_eq!(list.status, StatusCode::OK, "{}", list.text);
    let letters = list.json["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len(), 2);
    assert!(letters[0]["id"].as_i64() > letters[1]["id"].as_i64(), "newest first");
    assert_eq!(letters[0]["payload_excerpt"], "not json 2");
    assert!(letters[0].get("payload_base64").is_none(), "a listing has excerpts only");
    let next = list.json["next_before"].as_i64().expect("a next page");
    let page2 = f.call("GET", &format!("/api/dead-letters?before={next}"), None).await;
    assert_eq!(page2.json["dead_letters"].as_array().unwrap().len(), 1);
    assert!(page2.json["next_before"].is_null());

    let id = letters[0]["id"].as_i64().unwrap();
    let one = f.call("GET", &format!("/api/dead-letters/{id}"), None).await;
    assert_eq!(one.json["payload"], "not json 2");
    assert_eq!(one.json["payload_base64"], "bm90IGpzb24gMg==");
    assert_eq!(one.json["key"], "web/m-2");

    let replay = f.call("POST", &format!("/api/dead-letters/{id}/replay"), None).await;
    assert_eq!((replay.status, replay.json.clone()), (StatusCode::ACCEPTED, json!({"id": id, "state": "replay_requested"})));
    let other = letters[1]["id"].as_i64().unwrap();
    let discard = f.call("POST", &format!("/api/dead-letters/{other}/discard"), None).await;
    assert_eq!((discard.status, discard.json.clone()), (StatusCode::OK, json!({"id": other, "state": "discarded"})));
    let finished = f.call("POST", &format!("/api/dead-letters/{other}/replay"), None).await;
    assert_eq!((finished.status, finished.code()), (StatusCode::CONFLICT, "finished"));
    assert_eq!(f.call("GET", &format!("/api/dead-letters/{other}"), None).await.json["state"], "discarded");

    let discard_all = f.call("POST", "/api/dead-letters/discard", None).await;
    assert_eq!(discard_all.json, json!({"discarded": 2}), "the two still open");
    let replay_all = f.call("POST", "/api/dead-letters/replay", None).await;
    assert_eq!((replay_all.status, replay_all.json.clone()), (StatusCode::ACCEPTED, json!({"requested": 0})));

    for path in ["/api/dead-letters/999999", "/api/dead-letters/999999/replay", "/api/dead-letters/999999/discard"] {
        let method = if path.ends_with("999999") { "GET" } else { "POST" };
        let a = f.call(method, path, None).await;
        assert_eq!((a.status, a.code()), (StatusCode::NOT_FOUND, "not_found"), "{path}");
    }
    let bad_query = f.call("GET", "/api/dead-letters?limit=lots", None).await;
    assert_eq!((bad_query.status, bad_query.code()), (StatusCode::BAD_REQUEST, "invalid"));
}

// ---------------------------------------------------------------------------
// Malformed requests, unknown paths

#[tokio::test]
async fn malformed_json_and_unknown_fields_get_a_400_that_says_why() {
    let f = Fixture::new();
    let cases = [
        ("POST", "/api/sources", r#"{"id": "app""#, "EOF"),
        ("POST", "/api/sources", r#"{"id": "app", "colour": "red"}"#, "colour"),
        ("POST", "/api/sources", r#"{"write_key": "wk_x"}"#, "id"),
        ("PUT", "/api/destinations/d2", r#"{"url": "https://example.org/in", "colour": "red"}"#, "colour"),
        ("PUT", "/api/destinations/d2", "[]", "expected struct DestinationConfig"),
        ("POST", "/api/connections", r#"{"source": "web", "destination": "hook", "colour": 1}"#, "colour"),
        ("PUT", "/api/qos/hook", r#"{"colour": 1}"#, "colour"),
        ("POST", "/api/replays", r#"{"destination": "hook"}"#, "since_ms"),
    ];
    for (method, path, body, says) in cases {
        let a = f.raw(method, path, Some(TOKEN), Some(body)).await;
        assert_eq!((a.status, a.code()), (StatusCode::BAD_REQUEST, "invalid"), "{method} {path} {body}: {}", a.text);
        let message = a.json["message"].as_str().unwrap();
        assert!(message.contains(says), "{method} {path} {body}: {message:?} does not mention {says:?}");
    }
    let snap = f.state.catalog.snapshot();
    assert_eq!((snap.sources.len(), snap.destinations.len()), (1, 1), "nothing was written");

    // A body without a JSON content type: the JSON extractor's rejection, as a 400 that says so.
    let req = axum::http::Request::builder()
        .method("POST")
        .uri("/api/sources")
        .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
        .body(axum::body::Body::from(r#"{"id":"app"}"#))
        .unwrap();
    let resp = tower::ServiceExt::oneshot(f.router(), req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let body = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
    let error: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(error["code"], "invalid");
    assert!(error["message"].as_str().unwrap().contains("Content-Type: application/json"), "{error}");
}

#[tokio::test]
async fn unknown_paths_and_methods_answer_json_errors() {
    let f = Fixture::new();
    let path = f.call("GET", "/api/nothing-here", None).await;
    assert_eq!((path.status, path.code()), (StatusCode::NOT_FOUND, "not_found"));
    let method = f.call("DELETE", "/api/sources", None).await;
    assert_eq!((method.status, method.code()), (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"));
    let allow = method.headers[header::ALLOW].to_str().unwrap();
    assert!(allow.contains("GET") && allow.contains("POST"), "{allow}");
    // Outside /api too, but without the token check.
    let page = f.raw("GET", "/nothing-here", None, None).await;
    assert_eq!((page.status, page.code()), (StatusCode::NOT_FOUND, "not_found"));
}
