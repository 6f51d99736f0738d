//! The Tracking API, request bytes → stored events, through the real axum
//! router (`sluice_ingest::router`) over an `EmbeddedLog` in a temporary
//! directory, then read back from the log.
//!
//! First input byte:
//! - bits 0-2: the endpoint (`batch track identify page screen group alias import`);
//! - bits 3-4: authentication: a known key in Basic auth, none (the body's
//!   `writeKey`, if any), an unknown key in Basic auth, a malformed header;
//! - bit 5: the body is gzipped by the harness (`Content-Encoding: gzip`);
//! - bit 6: the body is sent as is but declared `gzip` (fuzzes the decoder);
//! - bit 7: the "tight" ingest (small limits, unknown keys accepted and
//!   dropped) instead of the defaults.
//!
//! The rest is the body. Invariants checked on every request:
//! - no panic anywhere (libFuzzer aborts on one, even inside the handler's
//!   `catch_unwind`), and never a 500;
//! - every answer is JSON: `{"success":true}` for 200, `code` and `message`
//!   otherwise; nothing is stored unless the answer is 200;
//! - every stored event parses as a `serde_json::Value` object, is at most
//!   `max_event_bytes`, passes `check_stored`, has a string `messageId` (at
//!   most 100 characters), a `type` among the six, a `receivedAt`, no
//!   `writeKey`; its record key is `<source>/<messageId>` and it sits in
//!   partition `partition_for(messageId)`; a single call stores one event of
//!   the path's type; one request stores at most `max_stored_bytes`.

#![no_main]

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use sluice_core::config::{Config, SourceConfig, UnknownWriteKey};
use sluice_core::partition_for;
use sluice_ingest::event::check_stored;
use sluice_ingest::{router, Ingest, IngestSettings, INPUT_TOPIC};
use sluice_log::{EmbeddedLog, Log, LogOptions};
use tower::ServiceExt;

const PARTITIONS: u32 = 4;
const SOURCE: &str = "web";
const KEY: &str = "wk_fuzz";
const PATHS: [&str; 8] = ["batch", "track", "identify", "page", "screen", "group", "alias", "import"];
/// Executions between two retention passes over the log (it only grows).
const RETENTION_EVERY: u64 = 2000;

struct Harness {
    settings: IngestSettings,
    log: Arc<EmbeddedLog>,
    app: Router,
    /// Per partition, the end offset already checked.
    ends: Vec<u64>,
    runs: u64,
    _dir: tempfile::TempDir,
}

impl Harness {
    fn new(settings: IngestSettings) -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = LogOptions {
            topics: vec![(INPUT_TOPIC.into(), PARTITIONS)],
            segment_bytes: 1 << 20,
            retention: Duration::from_millis(1),
            fsync: false,
            ..LogOptions::default()
        };
        let log = Arc::new(EmbeddedLog::open(&dir.path().join("log"), options).expect("open log"));
        let sources = [SourceConfig { id: SOURCE.into(), write_key: KEY.into(), rate_limit: None, rate_burst: None, workspace: None, function: None }];
        let dyn_log: Arc<dyn Log> = log.clone();
        let ingest = Arc::new(Ingest::new(dyn_log, settings.clone(), &sources, 0).expect("ingest"));
        let app = router(ingest);
        Harness { settings, log, app, ends: vec![0; PARTITIONS as usize], runs: 0, _dir: dir }
    }
}

fn harnesses() -> &'static [Mutex<Harness>; 2] {
    static H: OnceLock<[Mutex<Harness>; 2]> = OnceLock::new();
    H.get_or_init(|| {
        let defaults = IngestSettings::from_config(&Config::default());
        let tight = IngestSettings {
            unknown_write_key: UnknownWriteKey::AcceptAndDrop,
            max_request_bytes: 4096,
            max_event_bytes: 1024,
            max_batch_events: 8,
            body_read_timeout: Duration::from_secs(5),
            // A cell: requests with X-Sluice-Cell are checked against its id too.
            cell: Some("fuzz-cell".into()),
        };
        // Enter the runtime: the log and router may start timers.
        let _guard = sluice_fuzz::runtime().enter();
        [Mutex::new(Harness::new(defaults)), Mutex::new(Harness::new(tight))]
    })
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).expect("gzip");
    enc.finish().expect("gzip")
}

fn basic(userpass: &str) -> String {
    use std::fmt::Write;
    // Base64 by hand: the fuzz crate keeps its dependencies few.
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = userpass.as_bytes();
    let mut s = String::from("Basic ");
    for c in b.chunks(3) {
        let n = (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                s.write_char(T[((n >> (18 - 6 * i)) & 63) as usize] as char).unwrap();
            } else {
                s.push('=');
            }
        }
    }
    s
}

fn run(data: &[u8]) {
    let Some((&mode, body)) = data.split_first() else { return };
    let path = PATHS[(mode & 7) as usize];
    let mut h = harnesses()[(mode >> 7) as usize].lock().unwrap_or_else(|e| e.into_inner());
    let mut req = Request::post(format!("/v1/{path}")).header(header::CONTENT_TYPE, "application/json");
    req = match (mode >> 3) & 3 {
        0 => req.header(header::AUTHORIZATION, basic(&format!("{KEY}:"))),
        1 => req,
        2 => req.header(header::AUTHORIZATION, basic("wk_unknown:")),
        _ => req.header(header::AUTHORIZATION, "Basic !!not base64"),
    };
    let body = if mode & 0x20 != 0 {
        req = req.header(header::CONTENT_ENCODING, "gzip");
        gzip(body)
    } else if mode & 0x40 != 0 {
        req = req.header(header::CONTENT_ENCODING, "gzip");
        body.to_vec()
    } else {
        body.to_vec()
    };
    let req = req.body(Body::from(body)).expect("request");

    let app = h.app.clone();
    let (status, resp_body) = sluice_fuzz::runtime().block_on(async move {
        let resp = app.oneshot(req).await.expect("the router is infallible");
        let status = resp.status();
        (status, axum::body::to_bytes(resp.into_body(), usize::MAX).await.expect("response body"))
    });
    assert_ne!(status, StatusCode::INTERNAL_SERVER_ERROR, "500: {}", String::from_utf8_lossy(&resp_body));
    let answer: Value = serde_json::from_slice(&resp_body).expect("every answer is JSON");
    if status == StatusCode::OK {
        assert_eq!(answer, serde_json::json!({"success": true}));
    } else {
        assert!(answer["code"].as_str().is_some_and(|c| !c.is_empty()), "error without a code: {answer}");
        assert!(answer["message"].as_str().is_some_and(|m| !m.trim().is_empty()), "error without a message: {answer}");
    }

    // Everything this request stored.
    let settings = h.settings.clone();
    let mut stored = 0usize;
    let mut count = 0usize;
    for p in 0..PARTITIONS {
        let end = h.log.offsets_blocking(INPUT_TOPIC, p).expect("offsets").end;
        let from = h.ends[p as usize];
        if end == from {
            continue;
        }
        assert_eq!(status, StatusCode::OK, "events stored although the answer was {status}: {answer}");
        let recs = h.log.read_blocking(INPUT_TOPIC, p, from, usize::MAX).expect("read back");
        assert_eq!(recs.len() as u64, end - from, "partition {p}: read returns the whole new range");
        for r in &recs {
            count += 1;
            stored += r.value.len();
            assert!(r.value.len() <= settings.max_event_bytes, "stored event of {} bytes > max_event_bytes", r.value.len());
            check_stored(&r.value).unwrap_or_else(|e| panic!("stored event fails check_stored ({e}): {:?}", String::from_utf8_lossy(&r.value)));
            let ev: Value = serde_json::from_slice(&r.value)
                .unwrap_or_else(|e| panic!("stored event is not JSON ({e}): {:?}", String::from_utf8_lossy(&r.value)));
            let obj = ev.as_object().expect("stored event is an object");
            let id = obj.get("messageId").and_then(Value::as_str).expect("string messageId");
            assert!(!id.is_empty() && id.chars().count() <= 100, "messageId {id:?}");
            let ty = obj.get("type").and_then(Value::as_str).expect("string type");
            assert!(PATHS[1..7].contains(&ty), "type {ty:?}");
            if !matches!(path, "batch" | "import") {
                assert_eq!(ty, path, "a single call stores its path's type");
            }
            assert!(obj.get("receivedAt").and_then(Value::as_str).is_some(), "receivedAt");
            assert!(obj.get("timestamp").and_then(Value::as_str).is_some(), "timestamp");
            assert!(!obj.contains_key("writeKey"), "writeKey is stored");
            assert_eq!(&r.key[..], format!("{SOURCE}/{id}").as_bytes(), "record key");
            assert_eq!(partition_for(id, PARTITIONS), p, "partition of {id:?}");
        }
        h.ends[p as usize] = end;
    }
    assert!(stored <= settings.max_stored_bytes(), "one request stored {stored} bytes > {}", settings.max_stored_bytes());
    if !matches!(path, "batch" | "import") {
        assert!(count <= 1, "a single call stored {count} events");
    }
    if status == StatusCode::OK && count == 0 && !matches!(path, "batch" | "import") {
        // A single call answered 200 stored its event, unless its key was
        // unknown under accept_and_drop (an empty batch stores nothing).
        assert_eq!(settings.unknown_write_key, UnknownWriteKey::AcceptAndDrop, "200 with nothing stored");
    }
    h.runs += 1;
    if h.runs % RETENTION_EVERY == 0 {
        h.log.enforce_retention(SystemTime::now() + Duration::from_secs(1)).expect("retention");
    }
}

fuzz_target!(|data: &[u8]| run(data));
