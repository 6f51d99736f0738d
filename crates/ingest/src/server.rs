//! The HTTP server loop shared by the Tracking API, the admin port and the
//! benchmark's null server: hyper's HTTP/1.1 with keep-alive, a header read
//! timeout, a bound on open connections and on connections per client
//! address, and graceful shutdown.
//!
//! Invariant: one client holds at most `max_connections_per_client` of the
//! `max_connections` slots; a connection past its share is answered `429`
//! and closed at once, without taking a slot for longer than that. A client
//! is its address as [`client_key`] reads it: an IPv6 client by its /64
//! (one subscriber's allocation: it could take a new address per
//! connection), an IPv4-mapped IPv6 address as the IPv4 address.
//!
//! A client that keeps getting client errors is slowed by its error budget
//! ([`crate::budget`], `server.client_error_budget`): past it, its requests
//! are held for [`crate::budget::PENALTY`] unread and answered `429`.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use sluice_core::config::ServerConfig;
use tokio::net::TcpListener;

use crate::budget::{ErrorBudget, PENALTY};
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
    /// Refused requests per second one client may have (bursts of 5×);
    /// 0 = no budget. Requests that hyper refuses itself (a malformed or
    /// oversize head: 400, 431) spend it too, and on the Tracking API a
    /// client over it is refused at accept, before anything is read.
    /// `/healthz` and `/metrics` are never held.
    pub client_error_budget: u32,
    /// The admin port: answers the server itself writes (429s) carry the
    /// admin API's security headers and no `Access-Control-Allow-Origin`
    /// (the Tracking API's carry `*`, so browsers see them).
    pub same_origin: bool,
    /// Time allowed for a request's headers (also bounds idle keep-alive).
    pub header_read_timeout: Duration,
    /// How long shutdown waits for open connections to finish.
    pub shutdown_grace: Duration,
    /// HTTPS: every connection starts with a TLS handshake (within
    /// `header_read_timeout`, holding its connection slot); nothing is
    /// served in plain text.
    pub tls: Option<crate::tls::ServerTls>,
    /// Peers (as [`client_key`]s) exempt from the per-client limits
    /// (`server.trusted_proxies`).
    pub trusted: Vec<IpAddr>,
}

impl ServeOptions {
    pub fn from_config(server: &ServerConfig) -> Self {
        Self {
            max_connections: server.max_connections.get(),
            max_connections_per_client: server.max_connections_per_client,
            client_error_budget: server.client_error_budget,
            same_origin: false,
            header_read_timeout: server.header_read_timeout,
            shutdown_grace: server.shutdown_grace,
            tls: None,
            trusted: server.trusted_proxies.iter().map(|ip| client_key(*ip)).collect(),
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
    let budget = ErrorBudget::new(options.client_error_budget, options.client_error_budget.saturating_mul(5)).map(Arc::new);
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    // A request head larger than MAX_HEAD_BYTES is answered 431 (hyper's
    // default lets one grow to ~400 KB per connection).
    builder.timer(TokioTimer::new()).header_read_timeout(options.header_read_timeout).keep_alive(true).max_header_size(MAX_HEAD_BYTES);
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
        let key = client_key(peer.ip());
        // A trusted proxy carries many clients' requests and limits them itself.
        let trusted = options.trusted.contains(&key);
        let budget = if trusted { None } else { budget.clone() };
        // (Not on the admin port: a health probe from the same address must
        // still get through, and only a read request says what it is.)
        if !options.same_origin && budget.as_ref().is_some_and(|b| b.exhausted(key)) {
            crate::budget::held_total().inc();
            refuse_or_close(&mut connections, &options, stream, Refusal::ErrorBudget);
            continue;
        }
        let share = if trusted {
            None
        } else {
            let Some(share) = per_client.claim(key) else {
                tracing::debug!(%peer, "client over max_connections_per_client; answered 429");
                refuse_or_close(&mut connections, &options, stream, Refusal::TooManyConnections);
                continue;
            };
            Some(share)
        };
        let service = TowerToHyperService::new(Budgeted { app: app.clone(), key, budget: budget.clone(), same_origin: options.same_origin });
        let conn_budget = budget;
        let (tls, builder, watcher, head_timeout) = (options.tls.clone(), builder.clone(), graceful.watcher(), options.header_read_timeout);
        connections.spawn(async move {
            let result = match tls {
                None => watcher.watch(builder.serve_connection(TokioIo::new(stream), service)).await,
                // The handshake is bounded like a request head, and holds
                // the connection's slot meanwhile.
                Some(tls) => match tls.accept(stream, head_timeout).await {
                    Ok(stream) => watcher.watch(builder.serve_connection(TokioIo::new(stream), service)).await,
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "connection closed");
                        Ok(())
                    }
                },
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
                // hyper answered 400/431 itself (a malformed or oversize
                // head): a refusal like any other.
                if e.is_parse() || e.is_parse_too_large() || e.is_parse_status() {
                    if let Some(b) = &conn_budget {
                        b.record(key, 400);
                    }
                }
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

/// Refuse a connection over a limit: a plain-text one gets its `429`; a
/// TLS one is closed at once (a handshake to say 429 would spend the CPU the
/// limit is there to save).
fn refuse_or_close(connections: &mut JoinSet<()>, options: &ServeOptions, stream: tokio::net::TcpStream, why: Refusal) {
    if options.tls.is_none() {
        connections.spawn(refuse(stream, why, options.same_origin));
    }
}

/// The client a peer address belongs to, for per-client limits: an IPv4
/// address itself; an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, what a
/// dual-stack listener sees of IPv4 clients) as that IPv4 address; any
/// other IPv6 address as its /64 prefix (the rest zero), since a host
/// usually holds a whole /64 and can pick a new address in it for every
/// connection.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// `app` behind its client's error budget: an exhausted client's request
/// is held and refused unread; every answer is recorded against it.
#[derive(Clone)]
struct Budgeted {
    app: Router,
    key: IpAddr,
    budget: Option<Arc<ErrorBudget>>,
    same_origin: bool,
}

/// Paths never held by the error budget: health probes and metric scrapes
/// from a shared address must not fail because of another client.
const BUDGET_EXEMPT: [&str; 2] = ["/healthz", "/metrics"];

impl tower::Service<hyper::Request<hyper::body::Incoming>> for Budgeted {
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(())) // a Router is always ready
    }

    fn call(&mut self, req: hyper::Request<hyper::body::Incoming>) -> Self::Future {
        let (mut app, key, budget, same_origin) = (self.app.clone(), self.key, self.budget.clone(), self.same_origin);
        Box::pin(async move {
            let Some(budget) = budget else { return tower::Service::call(&mut app, req).await };
            if budget.exhausted(key) && !BUDGET_EXEMPT.contains(&req.uri().path()) {
                drop(req); // unread: the connection closes after the answer
                crate::budget::held_total().inc();
                tracing::debug!(client = %key, "client over its error budget; held and answered 429");
                tokio::time::sleep(PENALTY).await;
                return Ok(over_budget(same_origin));
            }
            let answer = tower::Service::call(&mut app, req).await?;
            budget.record(key, answer.status().as_u16());
            Ok(answer)
        })
    }
}

/// The answer to a request over its client's error budget.
fn over_budget(same_origin: bool) -> axum::response::Response {
    use axum::http::{HeaderName, HeaderValue, StatusCode};
    let mut answer = axum::response::Response::new(axum::body::Body::from(Refusal::ErrorBudget.body()));
    *answer.status_mut() = StatusCode::TOO_MANY_REQUESTS;
    let h = answer.headers_mut();
    for (name, value) in refusal_headers(same_origin) {
        h.insert(HeaderName::from_static(name), HeaderValue::from_static(value));
    }
    answer
}

/// A 429 the server loop writes itself.
#[derive(Clone, Copy)]
enum Refusal {
    TooManyConnections,
    ErrorBudget,
}

impl Refusal {
    fn body(self) -> &'static str {
        match self {
            Refusal::TooManyConnections => {
                r#"{"code":"too_many_connections","message":"this client holds too many connections; reuse one or retry later"}"#
            }
            Refusal::ErrorBudget => {
                r#"{"code":"client_error_budget","message":"too many refused requests from this client; fix the requests (see the earlier answers' messages) and retry later"}"#
            }
        }
    }
}

/// The headers of a 429 the server loop writes: a browser on the Tracking
/// API must be able to read it; the admin port keeps its security headers
/// and stays same-origin.
fn refusal_headers(same_origin: bool) -> Vec<(&'static str, &'static str)> {
    let mut h = vec![("content-type", "application/json"), ("retry-after", "1"), ("connection", "close")];
    if same_origin {
        h.extend([
            ("x-frame-options", "DENY"),
            ("content-security-policy", "frame-ancestors 'none'"),
            ("x-content-type-options", "nosniff"),
            ("referrer-policy", "no-referrer"),
            ("cache-control", "no-store"),
        ]);
    } else {
        h.push(("access-control-allow-origin", "*"));
    }
    h
}

/// Open connections per client ([`client_key`]).
#[derive(Clone)]
pub(crate) struct PerClient {
    limit: usize,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One connection's share of its client's allowance; given back on drop.
pub(crate) struct Share {
    ip: IpAddr,
    open: Option<Arc<Mutex<HashMap<IpAddr, usize>>>>,
}

impl PerClient {
    pub(crate) fn new(limit: usize) -> Self {
        Self { limit, open: Arc::default() }
    }

    /// A share for one more connection from `ip`, or `None` when it holds
    /// its limit already.
    pub(crate) fn claim(&self, ip: IpAddr) -> Option<Share> {
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

/// Answer a connection over its client's share, or from a client over its
/// error budget, with a `429` and close it, reading (and discarding) what
/// the client sends for a moment first, so the answer is not lost to a
/// reset ([`refusal_headers`]: browsers can read it on the Tracking API).
async fn refuse(mut stream: tokio::net::TcpStream, why: Refusal, same_origin: bool) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = why.body();
    let mut answer = String::from("HTTP/1.1 429 Too Many Requests\r\n");
    for (name, value) in refusal_headers(same_origin) {
        answer += &format!("{name}: {value}\r\n");
    }
    answer += &format!("content-length: {}\r\n\r\n{body}", body.len());
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(answer.as_bytes()).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<(), std::io::Error>(())
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> String {
        client_key(s.parse().unwrap()).to_string()
    }

    #[test]
    fn ipv6_clients_are_keyed_by_their_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(key("203.0.113.7"), "203.0.113.7");
        assert_eq!(key("127.0.0.1"), "127.0.0.1");
        assert_eq!(key("::ffff:203.0.113.7"), "203.0.113.7");
        assert_eq!(key("::ffff:127.0.0.1"), "127.0.0.1");
        // Every address of one /64 is one client.
        assert_eq!(key("2001:db8:1:2:aaaa:bbbb:cccc:dddd"), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:2::1"), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:2:ffff:ffff:ffff:ffff"), "2001:db8:1:2::");
        // Neighbouring /64s are not.
        assert_eq!(key("2001:db8:1:3::1"), "2001:db8:1:3::");
        assert_eq!(key("::1"), "::");
        assert_eq!(key("fe80::1234:5678:9abc:def0"), "fe80::");
    }

    #[test]
    fn a_client_rotating_through_its_64_gets_no_more_connections() {
        let per_client = PerClient::new(2);
        let mut held = Vec::new();
        for i in 1..=2u16 {
            let ip = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 7, 0, 0, 0, i));
            held.push(per_client.claim(client_key(ip)).expect("within the limit"));
        }
        for i in 3..50u16 {
            let ip = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 7, i, i, i, i));
            assert!(per_client.claim(client_key(ip)).is_none(), "address {i} of the same /64 got a slot");
        }
        let other = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 8, 0, 0, 0, 1));
        assert!(per_client.claim(client_key(other)).is_some(), "another /64 is another client");
        drop(held);
        assert!(per_client.claim(client_key(IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 7, 9, 9, 9, 9)))).is_some(), "slots given back");
    }

    /// Through the real server loop on a dual-stack listener: IPv4 clients
    /// (seen as `::ffff:127.0.0.1`) share one allowance, `::1` has its own.
    #[tokio::test]
    async fn the_server_loop_counts_mapped_ipv4_and_ipv6_loopback_apart() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(listener) = TcpListener::bind("[::]:0").await else { return }; // no IPv6 here
        let port = listener.local_addr().unwrap().port();
        let options = ServeOptions { max_connections_per_client: 2, ..ServeOptions::default() };
        let app = Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, app, options, async move {
            let _ = stopped.await;
        }));
        async fn ask(addr: &str) -> String {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
            let mut buf = vec![0u8; 512];
            let n = s.read(&mut buf).await.unwrap();
            // Kept open (the connection holds its slot) by leaking it into a task.
            tokio::spawn(async move {
                let _s = s;
                std::future::pending::<()>().await
            });
            String::from_utf8_lossy(&buf[..n]).into_owned()
        }
        let v4 = format!("127.0.0.1:{port}");
        let Ok(_) = tokio::net::TcpStream::connect(format!("[::1]:{port}")).await else { return }; // no ::1
        assert!(ask(&v4).await.starts_with("HTTP/1.1 200"));
        assert!(ask(&v4).await.starts_with("HTTP/1.1 200"));
        assert!(ask(&v4).await.starts_with("HTTP/1.1 429"), "a third IPv4 connection");
        assert!(ask(&format!("[::1]:{port}")).await.starts_with("HTTP/1.1 200"), "::1 is another client");
        let _ = stop.send(());
        server.abort();
    }
}
