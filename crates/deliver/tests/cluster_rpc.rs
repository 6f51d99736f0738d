//! The director's side of the route → director RPC (`RpcServer`), in
//! process, on a Centrifuge over SQLite: signatures, size, destinations.
//! (`crates/sluice/tests/rpc_auth.rs` checks the same through a real
//! `sluice director`.)

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderValue, CONTENT_LENGTH};
use reqwest::StatusCode;
use sluice_core::metrics::{render, Registry};
use sluice_core::Config;
use sluice_deliver::cluster::{
    encode_requests, InsertRequest, Rejection, RpcSecret, RpcServer, WireJob, MAX_CLOCK_SKEW, MAX_REQUEST_BYTES, SIGNATURE_HEADER,
};
use sluice_deliver::{Catalog, Centrifuge, CentrifugeOptions, DeliverMetrics};

const SECRET: &str = "rpc-test-secret-0123456789abcdef0123";

struct Fixture {
    rt: tokio::runtime::Runtime,
    dir: tempfile::TempDir,
    catalog: Arc<Catalog>,
    centrifuge: Arc<Centrifuge>,
    registry: Registry,
    server: Arc<RpcServer>,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        // The destination is paused below: nothing is sent anywhere.
        let text = format!(
            "[server]\ndata_dir = \"{}\"\n[director]\nrpc_secret = \"{SECRET}\"\n\
             [[sources]]\nid = \"web\"\nwrite_key = \"wk_web\"\n\
             [[destinations]]\nid = \"hook\"\nurl = \"http://127.0.0.1:9/hook\"\n\
             [[connections]]\nsource = \"web\"\ndestinations = [\"hook\"]\n",
            dir.path().join("data").display()
        );
        let config = Config::from_toml_with_env(&text, "", &HashMap::new()).unwrap();
        let catalog = Catalog::open(&config).unwrap();
        catalog.with_control(|db| db.put_qos("hook", &sluice_deliver::gate::Qos { paused: true, ..Default::default() })).unwrap();
        catalog.refresh().unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let metrics = DeliverMetrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let centrifuge = rt.block_on(Centrifuge::open(CentrifugeOptions::from_config(&config), catalog.clone(), metrics)).unwrap();
        let server = RpcServer::new(centrifuge.clone(), RpcSecret::new(SECRET));
        Fixture { rt, dir, catalog, centrifuge, registry, server }
    }

    /// Admit, then insert, as the director's HTTP handler does.
    fn call(&self, headers: &HeaderMap, body: Vec<u8>) -> Result<u64, Rejection> {
        self.rt.block_on(async {
            self.server.admit(headers)?;
            Ok(self.server.insert(headers, Bytes::from(body)).await?.inserted)
        })
    }

    /// Every job of `message_id` in the JobDBs.
    fn stored(&self, message_id: &str) -> usize {
        sluice_deliver::inspect::find(&self.dir.path().join("data/jobs"), message_id).unwrap().len()
    }

    fn close(self) {
        self.rt.block_on(self.centrifuge.close());
    }
}

fn job(message_id: &str, destination: &str) -> WireJob {
    let now = chrono_now_ms();
    WireJob {
        message_id: message_id.into(),
        source: "web".into(),
        destination: destination.into(),
        generation: 0,
        endpoint: "http://127.0.0.1:9/hook".into(),
        payload: format!("{{\"messageId\":\"{message_id}\",\"type\":\"track\"}}"),
        created_at: now,
        expires_at: now + 3_600_000,
        received_at: now,
    }
}

fn chrono_now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

fn now_unix() -> i64 {
    chrono_now_ms() / 1000
}

fn body(jobs: Vec<WireJob>) -> Vec<u8> {
    serde_json::to_vec(&InsertRequest { oldest_event_ms: 0, jobs }).unwrap()
}

fn signed(secret: &str, body: &[u8], unix: i64) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(SIGNATURE_HEADER, HeaderValue::from_str(&RpcSecret::new(secret).sign(body, unix)).unwrap());
    h
}

fn refused(r: Result<u64, Rejection>) -> Rejection {
    r.expect_err("the request must be refused")
}

#[test]
fn a_signed_request_is_inserted_once() {
    let f = Fixture::new();
    let b = body(vec![job("m-1", "hook"), job("m-2", "hook")]);
    assert_eq!(f.call(&signed(SECRET, &b, now_unix()), b.clone()).unwrap(), 2);
    assert_eq!(f.call(&signed(SECRET, &b, now_unix()), b).unwrap(), 0, "a replayed request inserts nothing");
    assert_eq!(f.stored("m-1"), 1);
    f.close();
}

#[test]
fn a_request_without_a_signature_is_refused() {
    let f = Fixture::new();
    let b = body(vec![job("m-unsigned", "hook")]);
    let r = refused(f.call(&HeaderMap::new(), b.clone()));
    assert_eq!((r.status, r.code), (StatusCode::UNAUTHORIZED, "unauthorized"), "{r}");
    let mut garbage = HeaderMap::new();
    garbage.insert(SIGNATURE_HEADER, HeaderValue::from_static("t=1,v1=nothex"));
    assert_eq!(refused(f.call(&garbage, b)).status, StatusCode::UNAUTHORIZED);
    assert_eq!(f.stored("m-unsigned"), 0, "nothing inserted");
    f.close();
}

#[test]
fn a_request_signed_with_another_secret_is_refused() {
    let f = Fixture::new();
    let b = body(vec![job("m-other", "hook")]);
    let r = refused(f.call(&signed("another-secret-0123456789abcdef0123", &b, now_unix()), b));
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{r}");
    assert_eq!(f.stored("m-other"), 0);
    f.close();
}

#[test]
fn a_tampered_body_is_refused() {
    let f = Fixture::new();
    let b = body(vec![job("m-orig", "hook")]);
    let headers = signed(SECRET, &b, now_unix());
    let forged = body(vec![job("m-forged", "hook")]);
    let r = refused(f.call(&headers, forged));
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{r}");
    assert_eq!(f.stored("m-forged"), 0);
    f.close();
}

#[test]
fn a_signature_outside_the_clock_skew_is_refused() {
    let f = Fixture::new();
    let b = body(vec![job("m-stale", "hook")]);
    let skew = MAX_CLOCK_SKEW.as_secs() as i64 + 60;
    for t in [now_unix() - skew, now_unix() + skew] {
        let r = refused(f.call(&signed(SECRET, &b, t), b.clone()));
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{r}");
        assert!(r.message.contains("clock"), "{r}");
    }
    assert_eq!(f.stored("m-stale"), 0);
    f.close();
}

#[test]
fn an_oversize_request_is_refused() {
    let f = Fixture::new();
    // A declared length over the limit: refused from the headers alone.
    let mut headers = signed(SECRET, b"", now_unix());
    headers.insert(CONTENT_LENGTH, HeaderValue::from(MAX_REQUEST_BYTES as u64 + 1));
    let r = f.server.admit(&headers).expect_err("declared length over the limit");
    assert_eq!((r.status, r.code), (StatusCode::PAYLOAD_TOO_LARGE, "too_large"));
    // A body over the limit (read without a declared length), even signed.
    let big = vec![b' '; MAX_REQUEST_BYTES + 1];
    let r = refused(f.call(&signed(SECRET, &big, now_unix()), big));
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{r}");
    f.close();
}

#[test]
fn jobs_for_an_unknown_destination_are_refused_whole() {
    let f = Fixture::new();
    let b = body(vec![job("m-known", "hook"), job("m-ghost", "ghost")]);
    let r = refused(f.call(&signed(SECRET, &b, now_unix()), b));
    assert_eq!((r.status, r.code), (StatusCode::CONFLICT, "unknown_destination"), "{r}");
    assert_eq!(r.destinations, vec!["ghost".to_owned()]);
    assert_eq!(f.stored("m-known") + f.stored("m-ghost"), 0, "nothing of the request is inserted");
    let text = render(&f.registry);
    assert!(!text.contains("ghost"), "no metric series for an unknown id:\n{text}");
    assert!(!f.catalog.snapshot().destinations.contains_key("ghost"));
    f.close();
}

#[test]
fn a_destination_added_since_the_last_refresh_is_accepted() {
    let f = Fixture::new();
    // Written to the control database by another process: this catalog has not re-read it.
    let late: sluice_core::config::DestinationConfig =
        serde_json::from_value(serde_json::json!({"id": "late", "url": "http://127.0.0.1:9/late"})).unwrap();
    f.catalog.with_control(|db| db.put_destination(&late)).unwrap();
    f.catalog.with_control(|db| db.put_qos("late", &sluice_deliver::gate::Qos { paused: true, ..Default::default() })).unwrap();
    assert!(!f.catalog.snapshot().destinations.contains_key("late"));
    let b = body(vec![job("m-late", "late")]);
    assert_eq!(f.call(&signed(SECRET, &b, now_unix()), b).unwrap(), 1, "the director re-reads its catalog before refusing");
    assert_eq!(f.stored("m-late"), 1);
    f.close();
}

#[test]
fn requests_are_split_under_the_limit() {
    let jobs: Vec<WireJob> = (0..200).map(|i| job(&format!("m-{i}"), "hook")).collect();
    let one = serde_json::to_vec(&jobs[0]).unwrap().len();
    let max = one * 10 + 100;
    let bodies = encode_requests(jobs.clone(), 7, max).unwrap();
    assert!(bodies.len() >= 20, "{} bodies", bodies.len());
    let mut seen = Vec::new();
    for b in &bodies {
        assert!(b.len() <= max, "{} > {max}", b.len());
        let r: InsertRequest = serde_json::from_slice(b).unwrap();
        assert_eq!(r.oldest_event_ms, 7);
        seen.extend(r.jobs.into_iter().map(|j| j.message_id));
    }
    assert_eq!(seen, jobs.iter().map(|j| j.message_id.clone()).collect::<Vec<_>>(), "every job once, in order");
    assert_eq!(encode_requests(Vec::new(), 0, max).unwrap().len(), 0);
    assert!(encode_requests(jobs, 0, one).is_err(), "a job that cannot fit is an error, not an oversize request");
}

#[test]
fn jobs_go_to_the_directors_url_for_the_destination_not_the_requests() {
    let f = Fixture::new();
    let mut forged = job("m-elsewhere", "hook");
    forged.endpoint = "http://attacker.example/steal".into();
    let b = body(vec![forged]);
    assert_eq!(f.call(&signed(SECRET, &b, now_unix()), b).unwrap(), 1);
    let found = sluice_deliver::inspect::find(&f.dir.path().join("data/jobs"), "m-elsewhere").unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].job.job.endpoint, "http://127.0.0.1:9/hook");
    f.close();
}

#[test]
fn request_bodies_held_at_once_are_bounded_and_the_room_comes_back() {
    use sluice_deliver::cluster::MAX_UNVERIFIED_BYTES;
    let f = Fixture::new();
    f.rt.block_on(async {
        // Clients without the secret declare the largest bodies and stall: the room fills up.
        let mut held = Vec::new();
        for _ in 0..MAX_UNVERIFIED_BYTES / MAX_REQUEST_BYTES {
            held.push(f.server.reserve_body(Some(MAX_REQUEST_BYTES as u64)).await.expect("room for a full-size body"));
        }
        let r = f.server.try_reserve_body(Some(10)).expect_err("no room left");
        assert_eq!((r.status, r.code), (StatusCode::SERVICE_UNAVAILABLE, "busy"));
        // One stalled body gone (its connection closed or timed out): room again, but not for an
        // undeclared length, which counts as the largest.
        held.pop();
        let small = f.server.try_reserve_body(Some(10)).expect("room after a body is released");
        assert_eq!(f.server.try_reserve_body(None).expect_err("no room for 32 MiB").code, "busy");
        drop(small);
        let _full = f.server.reserve_body(None).await.expect("room for the largest body again");
    });
    // And signed requests still go through.
    let b = body(vec![job("after-the-flood", "hook")]);
    assert_eq!(f.call(&signed(SECRET, &b, now_unix()), b).unwrap(), 1);
}
