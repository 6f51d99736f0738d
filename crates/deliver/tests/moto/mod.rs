//! moto's S3 server (`moto[server]` from PyPI, installed by
//! scripts/setup-s3.sh) for tests: found, started on 127.0.0.1, stopped
//! when dropped. Shared by `crates/deliver/tests/archive_s3.rs` and
//! `crates/sluice/tests/s3_destination.rs` (included by `#[path]`).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use object_store::aws::AmazonS3Builder;
use object_store::ObjectStore;

pub fn is_set(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
}

/// The `moto_server` executable, or `None` (with the reason printed) when
/// the tests may skip.
pub fn moto_server() -> Option<PathBuf> {
    let required = is_set("SLUICE_REQUIRE_S3") || is_set("CI");
    if let Ok(p) = std::env::var("SLUICE_MOTO_SERVER") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "SLUICE_MOTO_SERVER={} does not exist: run scripts/setup-s3.sh", p.display());
        return Some(p);
    }
    let cache = std::env::var_os("SLUICE_CACHE").map(PathBuf::from).or_else(|| {
        let base = std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from).or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")));
        base.map(|b| b.join("sluice"))
    });
    if let Some(p) = cache.map(|c| c.join("compat/venv/bin/moto_server")).filter(|p| p.is_file()) {
        return Some(p);
    }
    assert!(
        !required,
        "SLUICE_REQUIRE_S3 or CI is set but moto is missing: SLUICE_MOTO_SERVER is unset and no moto_server is in the cache (scripts/setup-s3.sh installs it)"
    );
    // Straight to stderr: the test harness would swallow `eprintln!` of a passing test.
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED: moto's S3 server is not installed; run scripts/setup-s3.sh (or scripts/test.sh) to run this test");
    None
}

/// A moto S3 server on 127.0.0.1, killed when dropped.
pub struct Moto {
    pub bin: PathBuf,
    pub child: Option<Child>,
    pub port: u16,
    pub log: PathBuf,
    /// HTTPS with this certificate and key (`moto_server -c -k`).
    pub tls: Option<(PathBuf, PathBuf)>,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A free port below the kernel's ephemeral range, so that no socket gets
/// it by chance while moto is stopped (the outage test restarts it there).
pub fn moto_port() -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if low > 11_000 {
        for _ in 0..200 {
            let port = rand::Rng::gen_range(&mut rand::thread_rng(), 10_000..low);
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    free_port()
}

impl Moto {
    /// Start on a free port (a few tries, in case another process takes the port first).
    pub async fn start(bin: &Path, dir: &Path) -> Moto {
        let mut last = String::new();
        for i in 0..3 {
            let mut m = Moto { bin: bin.to_owned(), child: None, port: moto_port(), log: dir.join(format!("moto-{i}.log")), tls: None };
            match m.run().await {
                Ok(()) => return m,
                Err(e) => last = e,
            }
        }
        panic!("moto did not start: {last}");
    }

    /// Start serving HTTPS with `cert` and `key` (one try, on a free port).
    pub async fn start_https(bin: &Path, dir: &Path, cert: &Path, key: &Path) -> Moto {
        let tls = Some((cert.to_owned(), key.to_owned()));
        let mut m = Moto { bin: bin.to_owned(), child: None, port: moto_port(), log: dir.join("moto-https.log"), tls };
        m.run().await.unwrap_or_else(|e| panic!("moto (https) did not start: {e}"));
        m
    }

    /// (Re)start on `self.port`; returns once it answers HTTP (or accepts
    /// connections, with HTTPS).
    pub async fn run(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let mut tls_args = Vec::new();
        if let Some((cert, key)) = &self.tls {
            tls_args = vec!["-c".into(), cert.display().to_string(), "-k".into(), key.display().to_string()];
        }
        let child = Command::new(&self.bin)
            .args(["-H", "127.0.0.1", "-p", &self.port.to_string()])
            .args(&tls_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.bin.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        let client = reqwest::Client::new();
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Err(format!("moto_server exited with {status}: {}", std::fs::read_to_string(&self.log).unwrap_or_default()));
            }
            if self.tls.is_some() {
                if tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.is_ok() {
                    return Ok(());
                }
            } else if let Ok(r) = client.get(self.endpoint()).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(format!("moto_server did not answer on port {} within 60 s", self.port));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub async fn create_bucket(&self, name: &str) {
        let r = reqwest::Client::new().put(format!("{}/{name}", self.endpoint())).send().await.unwrap();
        assert!(r.status().is_success(), "create bucket {name}: {}", r.status());
    }

    /// A client of the bucket, independent of the archive's own.
    pub fn store(&self, bucket: &str) -> impl ObjectStore {
        AmazonS3Builder::new()
            .with_endpoint(self.endpoint())
            .with_allow_http(true)
            .with_bucket_name(bucket)
            .with_region("us-east-1")
            .with_access_key_id("sluice-test")
            .with_secret_access_key("sluice-test-secret")
            .build()
            .unwrap()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
    }
}
