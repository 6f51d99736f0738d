//! A webhook sink for tests, benchmarks and trying Sluice out
//! (`sluice sink`). It records every request and answers, per path, what it
//! is told: 200 (default), any status, 429 with `Retry-After`, a delay, or
//! never (a timeout). Behaviour is set in process ([`Sink::set`]) or by the
//! URL's query (`?status=500&delay_ms=2000&retry_after=3`), so a destination
//! URL in a config can pick its own.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
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

#[derive(Default)]
pub struct SinkState {
    behaviours: Mutex<HashMap<String, Behaviour>>,
    received: Mutex<Vec<Received>>,
    count: AtomicU64,
    by_path: Mutex<HashMap<String, u64>>,
    /// Per path: requests being answered now, and the most at once.
    concurrency: Mutex<HashMap<String, (u64, u64)>>,
    /// Keep every request (tests); off, only counts and arrival times by Idempotency-Key are kept.
    pub record: bool,
    arrivals: Mutex<Vec<(String, Instant)>>,
    pub record_arrivals: bool,
}

impl SinkState {
    /// Requests received on `path` so far.
    pub fn path_count(&self, path: &str) -> u64 {
        self.by_path.lock().expect("lock").get(path).copied().unwrap_or(0)
    }

    /// The most requests on `path` the sink was answering at once.
    pub fn max_concurrent(&self, path: &str) -> u64 {
        self.concurrency.lock().expect("lock").get(path).map_or(0, |c| c.1)
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
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(SinkState { record, record_arrivals, ..SinkState::default() });
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

    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().expect("lock").clone()
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
    *state.by_path.lock().expect("lock").entry(path.clone()).or_default() += 1;
    let b = state.behaviours.lock().expect("lock").get(&path).cloned().or(query_behaviour).unwrap_or_default();
    if state.record_arrivals && !b.hang && (200..300).contains(&b.status) {
        if let Some(k) = headers.get("idempotency-key").and_then(|v| v.to_str().ok()) {
            state.arrivals.lock().expect("lock").push((k.to_owned(), at));
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
        resp.headers_mut().insert(axum::http::header::RETRY_AFTER, s.into());
    }
    resp
}

/// Counts a request as being answered until dropped (also when the client gives up).
struct Busy<'a> {
    state: &'a SinkState,
    path: String,
}

impl<'a> Busy<'a> {
    fn enter(state: &'a SinkState, path: &str) -> Self {
        let mut c = state.concurrency.lock().expect("lock");
        let e = c.entry(path.to_owned()).or_default();
        e.0 += 1;
        e.1 = e.1.max(e.0);
        Busy { state, path: path.to_owned() }
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        if let Some(e) = self.state.concurrency.lock().expect("lock").get_mut(&self.path) {
            e.0 -= 1;
        }
    }
}
