//! Helpers for the Tracking API spec tests: an `Ingest` over a real
//! `EmbeddedLog` in a temporary directory, request builders, response
//! checks, reading the `input` topic back, and a tiny raw HTTP/1.1 client
//! for the tests that drive the real server loop.
#![allow(dead_code)]

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap, Request, StatusCode};
use axum::Router;
use base64::Engine;
use bytes::Bytes;
use serde_json::Value;
use sluice_core::config::{Config, SourceConfig};
use sluice_ingest::server::{serve, ServeOptions};
use sluice_ingest::{router, Ingest, IngestSettings, INPUT_TOPIC};
use sluice_log::{EmbeddedLog, Log, LogOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt;

/// Source `web`: no rate limit.
pub const WEB: &str = "web";
pub const WEB_KEY: &str = "wk_web_test";
/// Source `app`: no rate limit.
pub const APP: &str = "app";
pub const APP_KEY: &str = "wk_app_test";
/// Partitions of the `input` topic in these tests.
pub const PARTITIONS: u32 = 8;

/// The two sources every harness knows unless told otherwise.
pub fn sources() -> Vec<SourceConfig> {
    vec![source(WEB, WEB_KEY, None, None), source(APP, APP_KEY, None, None)]
}

pub fn source(id: &str, key: &str, rate_limit: Option<u32>, rate_burst: Option<u32>) -> SourceConfig {
    SourceConfig { id: id.into(), write_key: key.into(), rate_limit, rate_burst, workspace: None, function: None }
}

/// The settings of the default configuration (so the spec's limits are
/// checked against the defaults a user gets).
pub fn settings() -> IngestSettings {
    IngestSettings::from_config(&Config::default())
}

/// An `Ingest` over an `EmbeddedLog` in a temporary directory.
pub struct Harness {
    pub log: Arc<EmbeddedLog>,
    pub ingest: Arc<Ingest>,
    pub app: Router,
    pub dir: tempfile::TempDir,
}

impl Harness {
    pub fn new() -> Self {
        Self::with(settings(), &sources())
    }

    pub fn with(settings: IngestSettings, sources: &[SourceConfig]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = LogOptions { topics: vec![(INPUT_TOPIC.into(), PARTITIONS)], ..LogOptions::default() };
        let log = Arc::new(EmbeddedLog::open(&dir.path().join("log"), options).expect("open log"));
        let dyn_log: Arc<dyn Log> = log.clone();
        let ingest = Arc::new(Ingest::new(dyn_log, settings, sources, 0).expect("ingest"));
        let app = router(ingest.clone());
        Self { log, ingest, app, dir }
    }

    pub fn log_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("log")
    }

    /// Send one request through the router (axum's `oneshot` pattern).
    pub async fn send(&self, req: Request<Body>) -> Resp {
        send(&self.app, req).await
    }

    /// Every record of the `input` topic, all partitions.
    pub fn records(&self) -> Vec<Stored> {
        read_all(&self.log)
    }

    /// The stored events' JSON, all partitions.
    pub fn events(&self) -> Vec<Value> {
        self.records().into_iter().map(|r| r.event).collect()
    }

    /// The only stored event (fails unless there is exactly one).
    pub fn single_event(&self) -> Stored {
        let mut recs = self.records();
        assert_eq!(recs.len(), 1, "expected exactly one stored event, found {recs:#?}");
        recs.pop().unwrap()
    }

    /// The stored record whose event has `messageId == id`.
    pub fn by_message_id(&self, id: &str) -> Stored {
        let recs = self.records();
        let mut found: Vec<Stored> = recs.into_iter().filter(|r| r.event["messageId"] == id).collect();
        assert_eq!(found.len(), 1, "expected one stored event with messageId {id:?}, found {found:#?}");
        found.pop().unwrap()
    }
}

pub async fn send(app: &Router, req: Request<Body>) -> Resp {
    let resp = app.clone().oneshot(req).await.expect("router is infallible");
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = axum::body::to_bytes(resp.into_body(), usize::MAX).await.expect("response body");
    Resp { status, headers, body }
}

/// A record read back from the log, with its event parsed.
#[derive(Debug, Clone)]
pub struct Stored {
    pub partition: u32,
    pub offset: u64,
    pub key: String,
    pub event: Value,
    /// Bytes of the record's value as stored.
    pub size: usize,
}

pub fn read_all(log: &EmbeddedLog) -> Vec<Stored> {
    let partitions = log.partitions(INPUT_TOPIC).expect("input topic");
    let mut out = Vec::new();
    for p in 0..partitions {
        let range = log.offsets_blocking(INPUT_TOPIC, p).expect("offsets");
        let recs = log.read_blocking(INPUT_TOPIC, p, range.start, usize::MAX).expect("read");
        assert_eq!(recs.len() as u64, range.end - range.start, "partition {p}: read returns the whole range");
        for r in recs {
            let event: Value = serde_json::from_slice(&r.value)
                .unwrap_or_else(|e| panic!("stored value is not JSON ({e}): {:?}", String::from_utf8_lossy(&r.value)));
            let key = String::from_utf8(r.key.to_vec()).expect("key is UTF-8");
            out.push(Stored { partition: p, offset: r.offset, key, event, size: r.value.len() });
        }
    }
    out
}

/// A response, body collected.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; fails (with the body) when it is not JSON or the
    /// content type does not say JSON.
    pub fn json(&self) -> Value {
        let ct = self.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        assert!(ct.starts_with("application/json"), "{} response has Content-Type {ct:?}, body {:?}", self.status, self.text());
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{} response body is not JSON ({e}): {:?}", self.status, self.text()))
    }

    /// Assert a 200 `{"success":true}`.
    pub fn assert_success(&self) {
        assert_eq!(self.status, StatusCode::OK, "body: {}", self.text());
        assert_eq!(self.json(), serde_json::json!({"success": true}));
    }

    /// Assert an error answer: the status, a JSON body with a string `code`
    /// equal to `code` and a non-empty string `message`. Returns the message.
    pub fn assert_error(&self, status: StatusCode, code: &str) -> String {
        assert_eq!(self.status, status, "body: {}", self.text());
        let v = self.json();
        assert_eq!(v["code"], code, "error body: {v}");
        let message = v["message"].as_str().unwrap_or_else(|| panic!("error body lacks a string `message`: {v}"));
        assert!(!message.trim().is_empty(), "error message is empty: {v}");
        message.to_owned()
    }

    /// Assert any error answer with the status, carrying both `code` and
    /// `message` as non-empty strings. Returns the code.
    pub fn assert_error_shape(&self, status: StatusCode) -> String {
        assert_eq!(self.status, status, "body: {}", self.text());
        let v = self.json();
        let code = v["code"].as_str().unwrap_or_else(|| panic!("error body lacks a string `code`: {v}"));
        assert!(!code.is_empty(), "empty code: {v}");
        let message = v["message"].as_str().unwrap_or_else(|| panic!("error body lacks a string `message`: {v}"));
        assert!(!message.trim().is_empty(), "empty message: {v}");
        code.to_owned()
    }

    pub fn retry_after(&self) -> Option<u64> {
        self.headers
            .get(header::RETRY_AFTER)
            .map(|v| v.to_str().ok().and_then(|s| s.trim().parse().ok()).unwrap_or_else(|| panic!("Retry-After is not a number of seconds: {v:?}")))
    }
}

/// `Basic base64(user:password)`.
pub fn basic(userpass: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(userpass))
}

/// `Basic` with the write key as user name and the trailing colon, as the
/// SDKs send it.
pub fn basic_key(key: &str) -> String {
    basic(&format!("{key}:"))
}

/// A POST with a JSON body, authenticated with `key` (Basic) when given.
pub fn post_json(path: &str, key: Option<&str>, body: &Value) -> Request<Body> {
    let mut b = Request::post(path).header(header::CONTENT_TYPE, "application/json");
    if let Some(key) = key {
        b = b.header(header::AUTHORIZATION, basic_key(key));
    }
    b.body(Body::from(body.to_string())).expect("request")
}

/// A POST with arbitrary headers and body bytes.
pub fn post_raw(path: &str, headers: &[(&str, &str)], body: impl Into<Body>) -> Request<Body> {
    let mut b = Request::post(path);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(body.into()).expect("request")
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).expect("gzip");
    enc.finish().expect("gzip")
}

/// A valid event of `ty` with its required fields and `messageId = id`.
pub fn event(ty: &str, id: &str) -> Value {
    let mut v = serde_json::json!({"type": ty, "messageId": id, "userId": "user-1"});
    match ty {
        "track" => v["event"] = "Clicked".into(),
        "group" => v["groupId"] = "group-1".into(),
        "alias" => v["previousId"] = "prev-1".into(),
        _ => {}
    }
    v
}

pub const TYPES: [&str; 6] = ["identify", "track", "page", "screen", "group", "alias"];

// ---------------------------------------------------------------------------
// The real server loop, driven with raw TCP.

/// A running `serve` loop on 127.0.0.1:0.
pub struct Server {
    pub addr: SocketAddr,
    pub harness: Harness,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Server {
    pub async fn start(harness: Harness, options: ServeOptions) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let app = harness.app.clone();
        let task = tokio::spawn(serve(listener, app, options, async move {
            let _ = rx.await;
        }));
        Self { addr, harness, stop: Some(tx), task: Some(task) }
    }

    pub async fn connect(&self) -> TcpStream {
        TcpStream::connect(self.addr).await.expect("connect")
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(15), task).await;
        }
    }
}

/// The bytes of an HTTP/1.1 POST with a JSON body, Basic-authenticated.
pub fn raw_post(path: &str, key: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        basic_key(key),
        body.len()
    )
    .into_bytes()
}

/// A response read off a raw connection.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        let ct = self.header("content-type").unwrap_or("");
        assert!(ct.starts_with("application/json"), "response has Content-Type {ct:?}");
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
}

/// Read one response (status line, headers, `Content-Length` body).
pub async fn read_response(stream: &mut TcpStream) -> std::io::Result<RawResponse> {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed before a response"));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status: u16 = status_line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> =
        lines.filter(|l| !l.is_empty()).filter_map(|l| l.split_once(':').map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))).collect();
    let len: usize = headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("content-length")).and_then(|(_, v)| v.parse().ok()).unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed mid-body"));
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(len);
    Ok(RawResponse { status, headers, body })
}

/// Write a request and read its response.
pub async fn roundtrip(stream: &mut TcpStream, request: &[u8]) -> RawResponse {
    stream.write_all(request).await.expect("write request");
    tokio::time::timeout(Duration::from_secs(20), read_response(stream)).await.expect("a response within 20 s").expect("a response")
}

/// Read until the peer closes the connection; `Ok(bytes read)` on EOF or a
/// reset, `Err(())` if the connection is still open after `within`.
pub async fn wait_closed(stream: &mut TcpStream, within: Duration) -> Result<Vec<u8>, ()> {
    let mut seen = Vec::new();
    let res = tokio::time::timeout(within, async {
        loop {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) => return,
                Ok(n) => seen.extend_from_slice(&chunk[..n]),
                Err(_) => return,
            }
        }
    })
    .await;
    res.map(|_| seen).map_err(|_| ())
}
