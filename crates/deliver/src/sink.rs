//! A webhook sink for tests, benchmarks and trying Sluice out
//! (`sluice sink`). It records every request and answers, per path, what it
//! is told: 200 (default), any status, 429 with `Retry-After`, a delay, or
//! never (a timeout). Behaviour is set in process ([`Sink::set`]) or by the
//! URL's query (`?status=500&delay_ms=2000&retry_after=3`), so a destination
//! URL in a config can pick its own.
//!
//! Memory: [`Sink::start`] keeps every request (tests read them all back);
//! [`Sink::start_bounded`] (what `sluice sink` runs) keeps counts and only
//! the newest requests, at most `keep` of them and `keep_bytes` of paths,
//! headers and bodies together (a kept path is cut to [`MAX_KEPT_PATH`]),
//! and [`Sink::received_since`] hands over the new ones without copying
//! the rest. Per-path counters stop at [`MAX_PATHS`] distinct paths, and
//! paths longer than [`MAX_COUNTED_PATH`] are counted under one key,
//! [`LONG_PATHS`].

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// What the sink answers on a path.
#[derive(Debug, Clone, PartialEq)]
pub struct Behaviour {
    pub status: u16,
    pub retry_after: Option<u64>,
    pub delay: Duration,
    /// Never answer (the client times out).
    pub hang: bool,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour { status: 200, retry_after: None, delay: Duration::ZERO, hang: false }
    }
}

impl Behaviour {
    pub fn status(status: u16) -> Self {
        Behaviour { status, ..Self::default() }
    }

    fn from_query(q: &str) -> Option<Self> {
        let mut b = Behaviour::default();
        let mut any = false;
        for kv in q.split('&') {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            any = true;
            match k {
                "status" => b.status = v.parse().ok()?,
                "retry_after" => b.retry_after = v.parse().ok(),
                "delay_ms" => b.delay = Duration::from_millis(v.parse().ok()?),
                "hang" => b.hang = true,
                _ => any = false,
            }
        }
        any.then_some(b)
    }
}

/// One request the sink received.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub at: Instant,
    /// The status the sink answered (None: it hung up without answering).
    pub answered: Option<u16>,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// Distinct paths counted per path (`path_count`, `max_concurrent`); a
/// request on a path past these is counted only in the total.
pub const MAX_PATHS: usize = 10_000;

/// Paths longer than this (bytes) are counted together, under [`LONG_PATHS`]:
/// with [`MAX_PATHS`], the counters' keys hold at most ~2.5 MB.
pub const MAX_COUNTED_PATH: usize = 256;

/// The per-path counters' key for every path longer than [`MAX_COUNTED_PATH`].
pub const LONG_PATHS: &str = "<long paths>";

/// A kept request's path is cut to this many bytes (at a character boundary).
pub const MAX_KEPT_PATH: usize = 1024;

/// The per-path counters' key for `path`.
fn counter_key(path: &str) -> &str {
    if path.len() > MAX_COUNTED_PATH {
        LONG_PATHS
    } else {
        path
    }
}

/// `s` cut to at most `max` bytes, at a character boundary.
fn cut(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.shrink_to_fit();
    }
}

/// Bytes counted per kept request besides its path, headers and body (the
/// record itself, the header map's entries).
const REQUEST_OVERHEAD: usize = 128;
const HEADER_OVERHEAD: usize = 32;

/// Bytes a kept request holds, as counted against [`Keep::bytes`].
fn kept_bytes(r: &Received) -> usize {
    let headers: usize = r.headers.iter().map(|(k, v)| k.as_str().len() + v.len() + HEADER_OVERHEAD).sum();
    REQUEST_OVERHEAD + r.path.len() + headers + r.body.len()
}

/// How many received requests are kept.
#[derive(Debug, Clone, Copy)]
pub struct Keep {
    /// Requests kept (the oldest go first).
    pub requests: usize,
    /// Bytes kept, all requests together: paths, headers and bodies (and a
    /// small overhead per request and header). A single body longer than
    /// what is left of this after its request's path and headers is kept
    /// cut to it; a request whose path and headers alone exceed it is not
    /// kept (it is counted as missed).
    pub bytes: usize,
}

impl Keep {
    pub const ALL: Keep = Keep { requests: usize::MAX, bytes: usize::MAX };
}

/// The newest requests received, numbered from 0 in arrival order.
struct Ring {
    items: VecDeque<Received>,
    /// The number of `items[0]`.
    first: u64,
    bytes: usize,
    keep: Keep,
}

impl Default for Ring {
    fn default() -> Self {
        Ring { items: VecDeque::new(), first: 0, bytes: 0, keep: Keep::ALL }
    }
}

impl Ring {
    fn push(&mut self, mut r: Received) {
        if self.keep.requests == 0 {
            self.first += 1;
            return;
        }
        cut(&mut r.path, MAX_KEPT_PATH);
        // Copies of the body and header values: hyper hands them over as
        // slices of the connection's read buffer, which a kept slice keeps
        // whole (a 2-byte body after a 60 KB path kept ~90 KB alive).
        r.headers = r
            .headers
            .iter()
            .filter_map(|(k, v)| Some((HeaderName::from_bytes(k.as_str().as_bytes()).ok()?, HeaderValue::from_bytes(v.as_bytes()).ok()?)))
            .collect();
        let room = self.keep.bytes.saturating_sub(kept_bytes(&r) - r.body.len());
        r.body = Bytes::copy_from_slice(&r.body[..r.body.len().min(room)]);
        self.bytes += kept_bytes(&r);
        self.items.push_back(r);
        while self.items.len() > self.keep.requests || self.bytes > self.keep.bytes {
            let old = self.items.pop_front().expect("not empty");
            self.bytes -= kept_bytes(&old);
            self.first += 1;
        }
    }

    fn end(&self) -> u64 {
        self.first + self.items.len() as u64
    }
}

/// What [`Sink::received_since`] returns.
#[derive(Debug, Clone)]
pub struct Since {
    /// The requests numbered from the asked number on that are still kept.
    pub received: Vec<Received>,
    /// The number to ask for next time.
    pub next: u64,
    /// Requests after the asked number that were no longer kept.
    pub missed: u64,
}

#[derive(Default)]
pub struct SinkState {
    behaviours: Mutex<HashMap<String, Behaviour>>,
    received: Mutex<Ring>,
    count: AtomicU64,
    by_path: Mutex<HashMap<String, u64>>,
    /// Per path: events received (a `{"batch": [...]}` body counts its elements).
    events_by_path: Mutex<HashMap<String, u64>>,
    /// Per path: requests being answered now, and the most at once.
    concurrency: Mutex<HashMap<String, (u64, u64)>>,
    /// Keep requests (all, or the newest: `Keep`); off, only counts and arrival times by Idempotency-Key are kept.
    pub record: bool,
    arrivals: Mutex<Vec<(String, Instant)>>,
    pub record_arrivals: bool,
}

impl SinkState {
    /// Requests received on `path` so far (for a path longer than
    /// [`MAX_COUNTED_PATH`]: on all such paths together).
    pub fn path_count(&self, path: &str) -> u64 {
        self.by_path.lock().expect("lock").get(counter_key(path)).copied().unwrap_or(0)
    }

    /// Events received on `path` so far: one per request, or a batch
    /// body's elements (a `batch_webhook`'s `{"batch": [...]}`).
    pub fn event_count(&self, path: &str) -> u64 {
        self.events_by_path.lock().expect("lock").get(counter_key(path)).copied().unwrap_or(0)
    }

    /// The most requests on `path` the sink was answering at once (for a
    /// path longer than [`MAX_COUNTED_PATH`]: on all such paths together).
    pub fn max_concurrent(&self, path: &str) -> u64 {
        self.concurrency.lock().expect("lock").get(counter_key(path)).map_or(0, |c| c.1)
    }

    /// Bytes the kept requests hold, as counted against [`Keep::bytes`].
    pub fn kept_bytes(&self) -> usize {
        self.received.lock().expect("lock").bytes
    }

    /// Count events that reached `path` some other way than an HTTP
    /// request (a benchmark's reader of a `kafka` destination's topic): as
    /// one request of `keys.len()` events, answered 2xx, each key an arrival.
    pub fn record_delivered(&self, path: &str, keys: Vec<String>, at: Instant) {
        self.count.fetch_add(1, Ordering::Relaxed);
        bump(&self.by_path, path, 1);
        bump(&self.events_by_path, path, keys.len() as u64);
        if self.record_arrivals {
            self.arrivals.lock().expect("lock").extend(keys.into_iter().map(|k| (k, at)));
        }
    }

    /// The per-path counters' keys, in bytes (all counters together).
    pub fn counter_key_bytes(&self) -> usize {
        let by_path: usize = self.by_path.lock().expect("lock").keys().map(String::len).sum();
        let busy: usize = self.concurrency.lock().expect("lock").keys().map(String::len).sum();
        by_path + busy
    }
}

/// A running sink.
pub struct Sink {
    pub addr: SocketAddr,
    pub state: Arc<SinkState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Sink {
    /// A sink on 127.0.0.1 (a free port) that records every request.
    pub async fn start() -> std::io::Result<Sink> {
        Self::start_on("127.0.0.1:0".parse().expect("address"), true, false).await
    }

    pub async fn start_on(addr: SocketAddr, record: bool, record_arrivals: bool) -> std::io::Result<Sink> {
        Self::start_with(addr, record.then_some(Keep::ALL), record_arrivals).await
    }

    /// A sink on `addr` that keeps counts and the newest requests only (`keep`).
    pub async fn start_bounded(addr: SocketAddr, keep: Keep) -> std::io::Result<Sink> {
        Self::start_with(addr, Some(keep), false).await
    }

    async fn start_with(addr: SocketAddr, keep: Option<Keep>, record_arrivals: bool) -> std::io::Result<Sink> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(SinkState { record: keep.is_some(), record_arrivals, ..SinkState::default() });
        state.received.lock().expect("lock").keep = keep.unwrap_or(Keep::ALL);
        let app = axum::Router::new().fallback(handle).with_state(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Sink { addr, state, task })
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn set(&self, path: &str, b: Behaviour) {
        self.state.behaviours.lock().expect("lock").insert(path.to_owned(), b);
    }

    /// Every request kept (with [`Sink::start`]: every request received).
    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().expect("lock").items.iter().cloned().collect()
    }

    /// The kept requests numbered `from` on (0 is the first request ever
    /// received): copies only those, however many are kept.
    pub fn received_since(&self, from: u64) -> Since {
        let ring = self.state.received.lock().expect("lock");
        let start = from.max(ring.first);
        let received = ring.items.iter().skip((start - ring.first) as usize).cloned().collect::<Vec<_>>();
        Since { received, next: ring.end().max(from), missed: start - from }
    }

    pub fn received_on(&self, path: &str) -> Vec<Received> {
        self.received().into_iter().filter(|r| r.path == path).collect()
    }

    pub fn count(&self) -> u64 {
        self.state.count.load(Ordering::Relaxed)
    }

    /// (Idempotency-Key, arrival) pairs of requests answered 2xx, when `record_arrivals`.
    pub fn take_arrivals(&self) -> Vec<(String, Instant)> {
        std::mem::take(&mut *self.state.arrivals.lock().expect("lock"))
    }
}

async fn handle(State(state): State<Arc<SinkState>>, req: Request) -> Response {
    let at = Instant::now();
    let path = req.uri().path().to_owned();
    let query_behaviour = req.uri().query().and_then(Behaviour::from_query);
    let headers = req.headers().clone();
    let body = axum::body::to_bytes(req.into_body(), 16 << 20).await.unwrap_or_default();
    state.count.fetch_add(1, Ordering::Relaxed);
    bump(&state.by_path, &path, 1);
    // A batch body's events (their messageIds); `None`: one event.
    let batch = body.starts_with(b"{\"batch\":[").then(|| serde_json::from_slice::<BatchBody>(&body).map(|b| b.batch).unwrap_or_default());
    bump(&state.events_by_path, &path, batch.as_ref().map_or(1, Vec::len) as u64);
    let b = state.behaviours.lock().expect("lock").get(&path).cloned().or(query_behaviour).unwrap_or_default();
    if state.record_arrivals && !b.hang && (200..300).contains(&b.status) {
        let mut arrivals = state.arrivals.lock().expect("lock");
        match &batch {
            Some(events) => arrivals.extend(events.iter().filter_map(|e| e.message_id.clone()).map(|id| (id, at))),
            None => {
                if let Some(k) = headers.get("idempotency-key").and_then(|v| v.to_str().ok()) {
                    arrivals.push((k.to_owned(), at));
                }
            }
        }
    }
    let answered = (!b.hang).then_some(b.status);
    if state.record {
        state.received.lock().expect("lock").push(Received { path: path.clone(), headers, body, at, answered });
    }
    let _busy = Busy::enter(&state, &path);
    if b.hang {
        std::future::pending::<()>().await;
    }
    if !b.delay.is_zero() {
        tokio::time::sleep(b.delay).await;
    }
    let status = StatusCode::from_u16(b.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = (status, format!("{{\"sink_status\":{}}}", b.status)).into_response();
    if let Some(s) = b.retry_after {
        resp.headers_mut().insert(http::header::RETRY_AFTER, s.into());
    }
    resp
}

/// Add `n` to `path`'s count in `counter` (at most [`MAX_PATHS`] paths are counted).
fn bump(counter: &Mutex<HashMap<String, u64>>, path: &str, n: u64) {
    let key = counter_key(path);
    let mut counter = counter.lock().expect("lock");
    if let Some(c) = counter.get_mut(key) {
        *c += n;
    } else if counter.len() < MAX_PATHS {
        counter.insert(key.to_owned(), n);
    }
}

/// What the sink reads of a batch body.
#[derive(serde::Deserialize)]
struct BatchBody {
    batch: Vec<BatchEvent>,
}

#[derive(serde::Deserialize)]
struct BatchEvent {
    #[serde(rename = "messageId")]
    message_id: Option<String>,
}

/// Counts a request as being answered until dropped (also when the client gives up).
struct Busy<'a> {
    state: &'a SinkState,
    path: String,
    /// Whether the path is counted (at most `MAX_PATHS` are).
    counted: bool,
}

impl<'a> Busy<'a> {
    fn enter(state: &'a SinkState, path: &str) -> Self {
        let path = counter_key(path);
        let mut c = state.concurrency.lock().expect("lock");
        let counted = c.len() < MAX_PATHS || c.contains_key(path);
        if counted {
            let e = c.entry(path.to_owned()).or_default();
            e.0 += 1;
            e.1 = e.1.max(e.0);
        }
        Busy { state, path: path.to_owned(), counted }
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        if !self.counted {
            return;
        }
        if let Some(e) = self.state.concurrency.lock().expect("lock").get_mut(&self.path) {
            e.0 -= 1;
        }
    }
}
