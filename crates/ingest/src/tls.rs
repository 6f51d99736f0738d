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
//! - The certificate and key are re-read when either file's content changes
//!   (compared every [`RELOAD_EVERY`]); a new pair that does not load
//!   (unreadable, not PEM, key not matching the certificate) leaves the one
//!   in use in place, is logged once per distinct error and counted
//!   (`sluice_tls_reloads_total{result="error"}`), and is tried again at
//!   every check until it loads. New connections get the new certificate;
//!   open ones keep theirs.
//! - A PEM file is read only if it is a regular file (not a FIFO or a
//!   device, which could block or never end) of at most [`MAX_PEM_BYTES`].
//! - Handshakes run on their own tasks with a deadline, so a client that
//!   opens a connection and sends nothing never delays another's accept.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock, Weak};
use std::time::Duration;

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

/// The largest PEM file read (a chain of a few certificates is a few KB; a
/// CA bundle a few hundred).
pub const MAX_PEM_BYTES: u64 = 1 << 20;

/// The bytes of the PEM file at `path`: a regular file (after symlinks) of
/// at most [`MAX_PEM_BYTES`].
pub fn read_pem(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path).and_then(|f| f.take(MAX_PEM_BYTES + 1).read_to_end(&mut bytes)).map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(format!("larger than {} KiB: not a PEM certificate or key file", MAX_PEM_BYTES >> 10));
    }
    Ok(bytes)
}

/// The certificates of a PEM file (a chain, or CAs); at least one.
pub fn load_certs(link: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file_err = |cause: String| TlsError::File { link: link.into(), path: path.into(), cause };
    let pem = read_pem(path).map_err(file_err)?;
    match CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>() {
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

/// Check that `cert` and `key` load as a pair a server could use (for
/// `sluice config check`), without setting up a server.
pub fn check_pair(link: &str, cert: &Path, key: &Path) -> Result<(), TlsError> {
    load_pair(link, cert, key).map(drop)
}

/// A certificate chain and its private key, checked to belong together.
fn load_pair(link: &str, cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let chain = load_certs(link, cert)?;
    let key_err = |cause: String| TlsError::File { link: link.into(), path: key.into(), cause };
    let pem = read_pem(key).map_err(key_err)?;
    let der = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        key_err(if String::from_utf8_lossy(&pem).contains("ENCRYPTED") {
            "an encrypted private key: give it unencrypted (`openssl pkey -in key.pem -out plain.pem`), readable only by Sluice".into()
        } else {
            format!("not a PEM private key: {e}")
        })
    })?;
    CertifiedKey::from_der(chain, der, &provider()).map_err(|e| TlsError::Setup {
        link: link.into(),
        problem: format!(
            "{} and {} do not make a usable pair (the certificate first must be the one of this key): {e}",
            cert.display(),
            key.display()
        ),
    })
}

/// What identifies a version of a file pair: a hash of both files' content
/// (or of why one cannot be read), so a copy that keeps the modification
/// time (`cp -p`, `rsync -t`) is noticed too.
type Stamp = u64;

fn stamp(cert: &Path, key: &Path) -> Stamp {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    read_pem(cert).hash(&mut h);
    read_pem(key).hash(&mut h);
    h.finish()
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
    /// The pair in use, the stamp of the files it was loaded from, and the
    /// last reload error (so a pair that keeps failing is reported once).
    current: RwLock<(Arc<CertifiedKey>, Stamp, Option<String>)>,
}

impl ReloadingCert {
    fn load(link: &str, cert: &Path, key: &Path) -> Result<ReloadingCert, TlsError> {
        let before = stamp(cert, key);
        let pair = load_pair(link, cert, key)?;
        Ok(ReloadingCert { link: link.into(), cert: cert.into(), key: key.into(), current: RwLock::new((Arc::new(pair), before, None)) })
    }

    /// Load the files again if their content changed since the pair in use
    /// was loaded: `Ok(true)` when a new pair is in use, `Err` (the old pair
    /// kept) when it failed. A failing pair is tried again at every call
    /// (permissions fixed, a half-written file finished); `Err` comes only
    /// when the error differs from the last one.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let now = stamp(&self.cert, &self.key);
        if self.current.read().unwrap_or_else(|p| p.into_inner()).1 == now {
            return Ok(false);
        }
        let labels = |result: &str| vec![("listener".to_owned(), self.link.clone()), ("result".to_owned(), result.to_owned())];
        let loaded = load_pair(&self.link, &self.cert, &self.key);
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        match loaded {
            Ok(pair) => {
                *current = (Arc::new(pair), now, None);
                reloads_total().get_or_create(&labels("ok")).inc();
                Ok(true)
            }
            Err(e) => {
                let text = e.to_string();
                if current.2.as_deref() == Some(text.as_str()) {
                    return Ok(false);
                }
                current.2 = Some(text);
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
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

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
const MAX_HANDSHAKES: usize = 4096;
/// Handshakes in progress at once from one client (an address, as
/// [`crate::server::client_key`] reads it); its further connections are
/// closed at once, so a few stalling clients cannot fill
/// [`MAX_HANDSHAKES`] and hold up the others' connections.
const MAX_HANDSHAKES_PER_CLIENT: usize = 16;

/// A TCP listener that yields connections once their TLS handshake is
/// done, for `axum::serve` (the director RPC). Handshakes run on tasks of
/// their own, bounded in time, in number and per client; failed ones are
/// logged at debug and dropped.
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
        let per_client = crate::server::PerClient::new(MAX_HANDSHAKES_PER_CLIENT);
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
                let Some(share) = per_client.claim(crate::server::client_key(peer.ip())) else {
                    tracing::debug!(%peer, "too many TLS handshakes in progress from this client; closed");
                    continue;
                };
                let (tls, tx) = (tls.clone(), tx.clone());
                tokio::spawn(async move {
                    let handshake = tls.accept(stream, HANDSHAKE_TIMEOUT).await;
                    drop((permit, share));
                    match handshake {
                        Ok(s) => {
                            let _ = tx.send((s, peer)).await;
                        }
                        Err(e) => tracing::debug!(%peer, error = %e, "connection closed"),
                    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The test certificates (`scripts/certs.sh`), once per test process.
    fn certs() -> PathBuf {
        static DIR: OnceLock<PathBuf> = OnceLock::new();
        DIR.get_or_init(|| {
            if let Some(d) = std::env::var_os("SLUICE_TEST_CERT_DIR") {
                return PathBuf::from(d);
            }
            let dir = std::env::temp_dir().join(format!("sluice-tls-unit-certs-{}", std::process::id()));
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/certs.sh");
            let out = std::process::Command::new("bash").arg(script).arg(&dir).output().expect("run scripts/certs.sh");
            assert!(out.status.success(), "scripts/certs.sh: {}", String::from_utf8_lossy(&out.stderr));
            dir
        })
        .clone()
    }

    #[test]
    fn only_small_regular_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.pem");
        std::fs::File::create(&big).unwrap().set_len(MAX_PEM_BYTES + 1).unwrap();
        assert!(read_pem(&big).unwrap_err().contains("larger than"));
        assert!(read_pem(dir.path()).unwrap_err().contains("not a regular file"));
        let fifo = dir.path().join("fifo.pem");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(made.success());
        // Would block forever if opened.
        assert!(read_pem(&fifo).unwrap_err().contains("not a regular file"));
        let err = load_certs("x", &fifo).unwrap_err().to_string();
        assert!(err.contains("x: cannot read") && err.contains("fifo.pem"), "{err}");
    }

    #[test]
    fn a_failed_reload_is_retried_and_a_copy_keeping_size_and_mtime_is_noticed() {
        let c = certs();
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("s.pem"), dir.path().join("s.key"));
        std::fs::copy(c.join("server.pem"), &cert).unwrap();
        std::fs::copy(c.join("server.key"), &key).unwrap();
        let r = ReloadingCert::load("test", &cert, &key).unwrap();
        assert!(!r.reload_if_changed().unwrap(), "nothing changed");

        // A key that does not match: refused, reported once, old pair kept.
        std::fs::copy(c.join("server2.key"), &key).unwrap();
        r.reload_if_changed().expect_err("mismatched pair");
        assert!(!r.reload_if_changed().unwrap(), "the same failure is not reported twice");
        // Completed: loaded at the next check, without another change needed.
        std::fs::copy(c.join("server2.pem"), &cert).unwrap();
        assert!(r.reload_if_changed().unwrap());

        // Back to the first pair, with the second's modification times (and
        // the same sizes, as here): the content differs, so it is reloaded.
        let times = |p: &Path| std::fs::metadata(p).unwrap().modified().unwrap();
        let (t_cert, t_key) = (times(&cert), times(&key));
        std::fs::copy(c.join("server.pem"), &cert).unwrap();
        std::fs::copy(c.join("server.key"), &key).unwrap();
        std::fs::File::options().write(true).open(&cert).unwrap().set_modified(t_cert).unwrap();
        std::fs::File::options().write(true).open(&key).unwrap().set_modified(t_key).unwrap();
        assert!(r.reload_if_changed().unwrap());
        let served = r.current.read().unwrap().0.cert[0].clone();
        assert_eq!(served, load_certs("x", &c.join("server.pem")).unwrap()[0]);
    }
}
