//! The HTTP server loop shared by the Tracking API, the admin port and the
//! benchmark's null server: hyper's HTTP/1.1 with keep-alive, a header read
//! timeout, a bound on open connections and on connections per client
//! address, and graceful shutdown.
//!
//! Invariant: one client address holds at most `max_connections_per_client`
//! of the `max_connections` slots; a connection past its share is answered
//! `429` and closed at once, without taking a slot for longer than that.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use sluice_core::config::ServerConfig;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// The largest request head (request line and headers) the server reads.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Connections one client address may hold at once; 0 = no limit.
    pub max_connections_per_client: usize,
    /// Time allowed for a request's headers (also bounds idle keep-alive).
    pub header_read_timeout: Duration,
    /// How long shutdown waits for open connections to finish.
    pub shutdown_grace: Duration,
}

impl ServeOptions {
    pub fn from_config(server: &ServerConfig) -> Self {
        Self {
            max_connections: server.max_connections,
            max_connections_per_client: server.max_connections_per_client,
            header_read_timeout: server.header_read_timeout,
            shutdown_grace: server.shutdown_grace,
        }
    }
}

/// The configuration's defaults: one place defines them.
impl Default for ServeOptions {
    fn default() -> Self {
        Self::from_config(&ServerConfig::default())
    }
}

/// Serve `app` on `listener` until `shutdown` resolves, then let open
/// requests finish (up to `shutdown_grace`).
pub async fn serve(listener: TcpListener, app: Router, options: ServeOptions, shutdown: impl Future<Output = ()>) {
    let permits = Arc::new(Semaphore::new(options.max_connections));
    let per_client = PerClient::new(options.max_connections_per_client);
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    // A request head larger than MAX_HEAD_BYTES is answered 431 (hyper's
    // default lets one grow to ~400 KB per connection).
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        .keep_alive(true)
        .max_header_size(MAX_HEAD_BYTES);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        while connections.try_join_next().is_some() {} // reap finished ones
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("semaphore never closed"),
            _ = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(conn) => conn,
                Err(e) => {
                    // EMFILE and friends: back off rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let Some(share) = per_client.claim(peer.ip()) else {
            tracing::debug!(%peer, "client over max_connections_per_client; answered 429");
            connections.spawn(refuse(stream));
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        connections.spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop((permit, share));
        });
    }
    drop(listener);
    if tokio::time::timeout(options.shutdown_grace, graceful.shutdown()).await.is_err() {
        tracing::warn!(open = connections.len(), "shutdown grace period over; closing open connections");
        connections.abort_all();
    }
    // Wait until every connection task is gone, so nothing they hold (the
    // log, for the Tracking API) outlives `serve`.
    while connections.join_next().await.is_some() {}
}

/// Open connections per client address.
#[derive(Clone)]
struct PerClient {
    limit: usize,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One connection's share of its client's allowance; given back on drop.
struct Share {
    ip: IpAddr,
    open: Option<Arc<Mutex<HashMap<IpAddr, usize>>>>,
}

impl PerClient {
    fn new(limit: usize) -> Self {
        Self { limit, open: Arc::default() }
    }

    /// A share for one more connection from `ip`, or `None` when it holds
    /// its limit already.
    fn claim(&self, ip: IpAddr) -> Option<Share> {
        if self.limit == 0 {
            return Some(Share { ip, open: None });
        }
        let mut open = self.open.lock().expect("per-client lock");
        let n = open.entry(ip).or_insert(0);
        if *n >= self.limit {
            return None;
        }
        *n += 1;
        Some(Share { ip, open: Some(self.open.clone()) })
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        if let Some(open) = &self.open {
            let mut open = open.lock().expect("per-client lock");
            if let Some(n) = open.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    open.remove(&self.ip);
                }
            }
        }
    }
}

/// Answer a connection over its client's share with a `429` and close it,
/// reading (and discarding) what the client sends for a moment first, so
/// the answer is not lost to a reset. `Access-Control-Allow-Origin: *` so
/// a browser (analytics.js) sees the 429 rather than a CORS failure.
async fn refuse(mut stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const BODY: &str = r#"{"code":"too_many_connections","message":"this client holds too many connections; reuse one or retry later"}"#;
    let answer = format!(
        "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nretry-after: 1\r\naccess-control-allow-origin: *\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(answer.as_bytes()).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<(), std::io::Error>(())
    })
    .await;
}
