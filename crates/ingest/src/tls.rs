//! TLS for Sluice's servers: the Tracking API and the admin port
//! (`server.tls_*`, `admin.tls_*`, through [`crate::server::serve`]) and the
//! director RPC (`director.tls_*`, through [`TlsListener`]).
//!
//! Invariants:
//! - rustls with the `ring` provider only, passed explicitly (no process-wide
//!   default is needed or installed).
//! - A listener with TLS configured never answers in plain text: a client
//!   that does not complete a handshake within the handshake timeout is
//!   disconnected, and nothing else is served on that port.
//! - The certificate and key are re-read when either file changes (checked
//!   every [`RELOAD_EVERY`]); a new pair that does not load (unreadable, not
//!   PEM, key not matching the certificate) leaves the one in use in place
//!   and is logged and counted (`sluice_tls_reloads_total{result="error"}`).
//!   New connections get the new certificate; open ones keep theirs.
//! - Handshakes run on their own tasks with a deadline, so a client that
//!   opens a connection and sends nothing never delays another's accept.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock, Weak};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use sluice_core::metrics::{Counter, Family};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
pub use tokio_rustls::TlsAcceptor;

/// How often the certificate and key files are checked for a change.
pub const RELOAD_EVERY: Duration = Duration::from_secs(10);

/// A TLS setup problem, naming the listener (`https server.listen`) and the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{link}: cannot read {path}: {cause}")]
    File { link: String, path: PathBuf, cause: String },
    #[error("{link}: {problem}")]
    Setup { link: String, problem: String },
}

/// The one crypto provider Sluice uses.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider())).clone()
}

/// The certificates of a PEM file (a chain, or CAs); at least one.
pub fn load_certs(link: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file_err = |cause: String| TlsError::File { link: link.into(), path: path.into(), cause };
    let certs = CertificateDer::pem_file_iter(path).map_err(|e| file_err(e.to_string()))?.collect::<Result<Vec<_>, _>>();
    match certs {
        Ok(c) if !c.is_empty() => Ok(c),
        Ok(_) => Err(file_err("no PEM certificate in it".into())),
        Err(e) => Err(file_err(format!("not a PEM certificate file: {e}"))),
    }
}

/// The CAs of a PEM file as a root store.
pub fn load_roots(link: &str, path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(link, path)? {
        roots.add(cert).map_err(|e| TlsError::File { link: link.into(), path: path.into(), cause: format!("not a usable CA certificate: {e}") })?;
    }
    Ok(roots)
}

/// A certificate chain and its private key, checked to belong together.
fn load_pair(link: &str, cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let chain = load_certs(link, cert)?;
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::File {
        link: link.into(),
        path: key.into(),
        cause: format!("not a PEM private key: {e}"),
    })?;
    CertifiedKey::from_der(chain, der, &provider()).map_err(|e| TlsError::Setup {
        link: link.into(),
        problem: format!("{} and {} do not make a usable pair: {e}", cert.display(), key.display()),
    })
}

/// What identifies a version of a file pair: modification times and sizes.
type Stamp = [(Option<SystemTime>, u64); 2];

fn stamp(cert: &Path, key: &Path) -> Stamp {
    let one = |p: &Path| std::fs::metadata(p).map_or((None, 0), |m| (m.modified().ok(), m.len()));
    [one(cert), one(key)]
}

/// `sluice_tls_reloads_total{listener, result}`: certificate reloads by outcome.
pub fn reloads_total() -> &'static Family<Vec<(String, String)>, Counter> {
    static RELOADS: OnceLock<Family<Vec<(String, String)>, Counter>> = OnceLock::new();
    RELOADS.get_or_init(Family::default)
}

/// The server certificate in use, replaced when its files change.
#[derive(Debug)]
pub struct ReloadingCert {
    link: String,
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<(Arc<CertifiedKey>, Stamp)>,
}

impl ReloadingCert {
    fn load(link: &str, cert: &Path, key: &Path) -> Result<ReloadingCert, TlsError> {
        let before = stamp(cert, key);
        let pair = load_pair(link, cert, key)?;
        Ok(ReloadingCert { link: link.into(), cert: cert.into(), key: key.into(), current: RwLock::new((Arc::new(pair), before)) })
    }

    /// Load the files again if they changed since the last load: `Ok(true)`
    /// when a new pair is in use, `Err` (the old pair kept) when it failed.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let now = stamp(&self.cert, &self.key);
        if self.current.read().unwrap_or_else(|p| p.into_inner()).1 == now {
            return Ok(false);
        }
        let labels = |result: &str| vec![("listener".to_owned(), self.link.clone()), ("result".to_owned(), result.to_owned())];
        let loaded = load_pair(&self.link, &self.cert, &self.key);
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        // Not retried until the files change again (a half-written pair
        // becomes whole with another write, which changes the stamp).
        current.1 = now;
        match loaded {
            Ok(pair) => {
                current.0 = Arc::new(pair);
                reloads_total().get_or_create(&labels("ok")).inc();
                Ok(true)
            }
            Err(e) => {
                reloads_total().get_or_create(&labels("error")).inc();
                Err(e)
            }
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|p| p.into_inner()).0.clone())
    }
}

/// A handshake on a [`TlsListener`] must be done within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A server's TLS: its acceptor and the certificate it reloads.
#[derive(Clone)]
pub struct ServerTls {
    acceptor: TlsAcceptor,
    cert: Arc<ReloadingCert>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").field("link", &self.cert.link).field("cert", &self.cert.cert).finish()
    }
}

impl ServerTls {
    /// TLS for the listener named `link` (`https server.listen`) with the
    /// certificate chain `cert` and key `key`; with `client_ca`, a client
    /// certificate signed by it is required (mutual TLS). `alpn`: the
    /// protocols offered, e.g. `[b"h2", b"http/1.1"]`.
    pub fn new(link: &str, cert: &Path, key: &Path, client_ca: Option<&Path>, alpn: &[&[u8]]) -> Result<ServerTls, TlsError> {
        let resolver = Arc::new(ReloadingCert::load(link, cert, key)?);
        let setup = |problem: String| TlsError::Setup { link: link.into(), problem };
        let builder =
            rustls::ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions().map_err(|e| setup(e.to_string()))?;
        let builder = match client_ca {
            Some(ca) => {
                let roots = Arc::new(load_roots(link, ca)?);
                let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider()).build().map_err(|e| setup(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(resolver.clone());
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(ServerTls { acceptor: TlsAcceptor::from(Arc::new(config)), cert: resolver })
    }

    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        self.cert.reload_if_changed()
    }

    /// Check the files every `every` until this `ServerTls` (every clone)
    /// is dropped; log reloads and failed ones.
    pub fn spawn_reloader(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let weak: Weak<ReloadingCert> = Arc::downgrade(&self.cert);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(cert) = weak.upgrade() else { return };
                let link = cert.link.clone();
                match tokio::task::spawn_blocking(move || cert.reload_if_changed()).await {
                    Ok(Ok(true)) => tracing::info!(listener = %link, "TLS certificate reloaded"),
                    Ok(Ok(false)) => {}
                    Ok(Err(e)) => tracing::error!(error = %e, "TLS certificate reload failed; the previous certificate stays in use"),
                    Err(e) => tracing::error!(listener = %link, error = %e, "TLS certificate reload task failed"),
                }
            }
        })
    }

    /// Handshake on `stream` within `timeout`.
    pub async fn accept(&self, stream: TcpStream, timeout: Duration) -> Result<TlsStream<TcpStream>, String> {
        match tokio::time::timeout(timeout, self.acceptor.accept(stream)).await {
            Ok(Ok(tls)) => Ok(tls),
            Ok(Err(e)) => Err(format!("TLS handshake failed: {e}")),
            Err(_) => Err(format!("no TLS handshake within {timeout:?}")),
        }
    }
}

/// Handshakes in progress at once on a [`TlsListener`]; more connections
/// wait in the listen backlog.
const MAX_HANDSHAKES: usize = 256;

/// A TCP listener that yields connections once their TLS handshake is
/// done, for `axum::serve` (the director RPC). Handshakes run on tasks of
/// their own; failed ones are logged at debug and dropped.
pub struct TlsListener {
    local: std::net::SocketAddr,
    ready: tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, std::net::SocketAddr)>,
    accepting: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    pub fn new(listener: TcpListener, tls: ServerTls) -> std::io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let (tx, ready) = tokio::sync::mpsc::channel(64);
        let permits = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        let accepting = tokio::spawn(async move {
            loop {
                let Ok(permit) = permits.clone().acquire_owned().await else { return };
                let (stream, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                if tx.is_closed() {
                    return;
                }
                let (tls, tx) = (tls.clone(), tx.clone());
                tokio::spawn(async move {
                    match tls.accept(stream, HANDSHAKE_TIMEOUT).await {
                        Ok(s) => {
                            let _ = tx.send((s, peer)).await;
                        }
                        Err(e) => tracing::debug!(%peer, error = %e, "connection closed"),
                    }
                    drop(permit);
                });
            }
        });
        Ok(TlsListener { local, ready, accepting })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accepting task only ends when this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
