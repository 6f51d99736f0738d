//! Configuration: a TOML file, then `SLUICE_<SECTION>__<KEY>` environment
//! overrides (any depth: `SLUICE_LOG__KAFKA__PRIMARY__SASL_PASSWORD`), then
//! CLI flags (applied by the binary), over defaults that work.
//!
//! Invariants:
//! - Unknown keys are errors, never silently ignored (a typo in a limit must
//!   not leave the default in force unnoticed).
//! - Every validation error names the key (`sources[1].write_key`) and the
//!   problem, and `sluice serve` refuses to start on one.
//! - Values are parsed into their types as they are read, so a loaded
//!   `Config` is used as it is, never parsed again: listen addresses are
//!   `SocketAddr`s, counts that must not be zero are `NonZero*`, URLs are
//!   [`JobDbUrl`], [`HttpUrl`] and [`ArchiveUrl`], durations `Duration`s. A
//!   value that does not parse is refused while the document is read, and
//!   its error names the key like a validation error does
//!   (`` `server.listen`: … ``). Rules that join several keys (the admin
//!   port is not the API's, `rpc_url`'s scheme fits the TLS keys, the
//!   archive keys fit together) stay in [`Config::validate`].
//! - CLI flags ([`Flags`]) win over the file and the environment: their keys
//!   are taken out of the document before it is read.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

/// The sample configuration shipped in the repository (`config/sluice.toml`),
/// used when `sluice serve` gets no `--config`.
pub const SAMPLE_CONFIG: &str = include_str!("../../../config/sluice.toml");

/// A configuration problem, always naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid config{origin}: {}", clip(&source.to_string()))]
    Parse { origin: String, source: Box<toml::de::Error> },
    #[error("invalid config: `{key}`: {}", clip(problem))]
    Invalid { key: String, problem: String },
    /// A value of the file that does not read as its type (an address, a
    /// count, a URL, a duration…), named by its key like `Invalid`.
    #[error("invalid config{origin}: `{key}`: {}", clip(problem))]
    Value { origin: String, key: String, problem: String },
    /// A value set by an environment override is at fault: named by the variable.
    #[error("invalid config: environment variable {var}: {}", clip(problem))]
    Env { var: String, problem: String },
}

/// The longest server timeout (header, body, shutdown grace).
const MAX_SERVER_TIMEOUT: Duration = Duration::from_secs(3600);

/// The host and port of an `http(s)://` URL: a host is present and a port,
/// if given, is 1-65535 (checked here so a destination that can never be
/// reached is refused at load, not discarded job by job).
fn check_authority(url: &str) -> Result<(), String> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = match host_port.strip_prefix('[') {
        Some(v6) => {
            let (host, after) = v6.split_once(']').ok_or("an IPv6 host lacks its closing ']'")?;
            (host, after.strip_prefix(':'))
        }
        None => match host_port.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (host_port, None),
        },
    };
    if host.is_empty() {
        return Err("no host".into());
    }
    if let Some(port) = port {
        match port.parse::<u16>() {
            Ok(p) if p > 0 => {}
            _ => return Err(format!("port {port:?} is not 1-65535")),
        }
    }
    Ok(())
}

/// Each line of an error message cut to 200 characters: the message quotes
/// the file (TOML's own errors show the line), and a hostile file's line can
/// be megabytes.
fn clip(message: &str) -> String {
    message
        .lines()
        .map(|line| match line.char_indices().nth(200) {
            Some((cut, _)) => format!("{}… ({} bytes)", &line[..cut], line.len()),
            None => line.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `text` quoted, cut to its first 80 characters: an error must stay
/// readable whatever a config holds (a hostile filter can be megabytes).
/// A URL as an error may show it: user info (`user:password@`) cut to `…@`.
fn without_user_info(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..end].rfind('@') {
        Some(at) => format!("{scheme}://…{}", &rest[at..]),
        None => url.to_owned(),
    }
}

fn excerpt(text: &str) -> String {
    match text.char_indices().nth(80) {
        Some((cut, _)) => format!("{:?}… ({} bytes)", &text[..cut], text.len()),
        None => format!("{text:?}"),
    }
}

/// `text` as one of the names of enum `T` (as the config file spells
/// them); the error lists the names.
fn parse_name<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    T::deserialize(serde::de::value::StrDeserializer::<serde::de::value::Error>::new(text)).map_err(|e| format!("{}: {e}", excerpt(text)))
}

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), problem: problem.into() }
}

/// A nonzero count literal (a default), checked when compiled.
macro_rules! nz {
    ($n:expr) => {
        const {
            match std::num::NonZero::new($n) {
                Some(n) => n,
                None => panic!("a zero default"),
            }
        }
    };
}

// ---------------------------------------------------------------- typed values
//
// Each reader below turns a TOML value into its type, or refuses it with a
// message; toml adds the key's path (`in `server.listen``), so every error
// still names the key, and an environment override at fault is named by
// `Config::parse`.

fn de_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    parse_addr(&text).map_err(serde::de::Error::custom)
}

/// `""` is `None` (the admin port off).
fn de_opt_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let text = String::deserialize(d)?;
    if text.is_empty() {
        return Ok(None);
    }
    parse_addr(&text).map(Some).map_err(serde::de::Error::custom)
}

/// A listen address, `IP:PORT` (no host names: the address bound is the
/// one written). The message is the one every listen key and flag gives.
pub fn parse_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse().map_err(|_| format!("{} is not an address of the form IP:PORT", excerpt(text)))
}

macro_rules! de_nonzero {
    ($name:ident, $ty:ty, $int:ty) => {
        /// A count that must not be zero ("must be at least 1").
        fn $name<'de, D: Deserializer<'de>>(d: D) -> Result<$ty, D::Error> {
            <$ty>::new(<$int>::deserialize(d)?).ok_or_else(|| serde::de::Error::custom("must be at least 1"))
        }
    };
}
de_nonzero!(de_nonzero_usize, NonZeroUsize, usize);
de_nonzero!(de_nonzero_u32, NonZeroU32, u32);
de_nonzero!(de_nonzero_u64, NonZeroU64, u64);

/// A string key whose empty (or blank) value means "not set", parsed by
/// `parse` otherwise: the one place such a value is trimmed.
fn de_opt_parsed<'de, D: Deserializer<'de>, T>(d: D, parse: impl FnOnce(&str) -> Result<T, String>) -> Result<Option<T>, D::Error> {
    let text = String::deserialize(d)?;
    match text.trim() {
        "" => Ok(None),
        t => parse(t).map(Some).map_err(serde::de::Error::custom),
    }
}

fn de_opt_jobdb_url<'de, D: Deserializer<'de>>(d: D) -> Result<Option<JobDbUrl>, D::Error> {
    de_opt_parsed(d, JobDbUrl::parse)
}

fn de_opt_archive_url<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ArchiveUrl>, D::Error> {
    de_opt_parsed(d, ArchiveUrl::parse)
}

/// `director.rpc_url`: taken as written (surrounding spaces are refused, not trimmed).
fn de_opt_http_url<'de, D: Deserializer<'de>>(d: D) -> Result<Option<HttpUrl>, D::Error> {
    let text = String::deserialize(d)?;
    HttpUrl::parse(&text).map(Some).map_err(serde::de::Error::custom)
}

/// An S3 region's name: 1–64 of `A-Z a-z 0-9 - _`. Without an endpoint the
/// region is part of the host (`s3.<region>.amazonaws.com`): anything else
/// (`@`, `/`, `:`) could point the client, and its signed requests, at
/// another server, past the SSRF guard.
fn check_region(r: &str) -> Result<(), String> {
    if r.is_empty() || r.len() > 64 || !r.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return Err(format!("{} is not a region name (1–64 of A-Z a-z 0-9 - _)", excerpt(r)));
    }
    Ok(())
}

/// `deliver.archive_s3_region`: trimmed; see [`check_region`].
fn de_region<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let text = String::deserialize(d)?;
    let r = text.trim();
    check_region(r).map_err(serde::de::Error::custom)?;
    Ok(Some(r.to_owned()))
}

/// `deliver.archive_s3_endpoint`: trimmed; a trailing `/` dropped.
fn de_endpoint<'de, D: Deserializer<'de>>(d: D) -> Result<Option<HttpUrl>, D::Error> {
    let text = String::deserialize(d)?;
    HttpUrl::parse(text.trim().trim_end_matches('/')).map(Some).map_err(serde::de::Error::custom)
}

/// An `http://` or `https://` URL with a host, without surrounding spaces.
/// The scheme is kept as written; [`HttpUrl::is_https`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    text: String,
    https: bool,
}

impl HttpUrl {
    pub fn parse(text: &str) -> Result<HttpUrl, String> {
        let lower = text.to_ascii_lowercase();
        let (https, host) = match (lower.strip_prefix("https://"), lower.strip_prefix("http://")) {
            (Some(h), _) => (true, h),
            (None, Some(h)) => (false, h),
            (None, None) => return Err(format!("{} is not an http:// or https:// URL with a host", excerpt(text))),
        };
        if text != text.trim() || host.is_empty() || host.starts_with('/') || host.contains(char::is_whitespace) {
            return Err(format!("{} is not an http:// or https:// URL with a host", excerpt(text)));
        }
        Ok(HttpUrl { text: text.to_owned(), https })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn is_https(&self) -> bool {
        self.https
    }
}

impl std::fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// The engine a [`JobDbUrl`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobDbEngine {
    /// `mysql://` or `mariadb://`.
    MySql,
    /// `postgres://` or `postgresql://`.
    Postgres,
}

/// `deliver.jobdb_url` when set: a MySQL/MariaDB or PostgreSQL URL, trimmed.
/// Its TLS parameters are checked by [`Config::validate`] (they name files);
/// the driver parses the rest when it connects (`SqlJobDbs::new`). `Debug`
/// hides the user, password and query.
#[derive(Clone, PartialEq, Eq)]
pub struct JobDbUrl {
    text: String,
    engine: JobDbEngine,
}

impl JobDbUrl {
    /// `text` (already trimmed and not empty) as a JobDB URL.
    pub fn parse(text: &str) -> Result<JobDbUrl, String> {
        let engine = match text.split_once("://").map(|(s, _)| s) {
            Some("mysql" | "mariadb") => JobDbEngine::MySql,
            Some("postgres" | "postgresql") => JobDbEngine::Postgres,
            _ => return Err("must be empty (SQLite files) or a mysql://, mariadb://, postgres:// or postgresql:// URL".into()),
        };
        // An unencoded '@', '/' or '#' in the password splits the URL elsewhere, and the
        // part after the split would be logged as the host or database.
        let rest = text.split_once("://").map_or("", |(_, r)| r);
        let after_authority = rest.find(['/', '?', '#']).map_or("", |i| &rest[i..]);
        if after_authority.contains('@') || text.contains('#') {
            return Err("percent-encode the user name and password ('@' as %40, '/' as %2F, '#' as %23, ':' as %3A)".into());
        }
        Ok(JobDbUrl { text: text.to_owned(), engine })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn engine(&self) -> JobDbEngine {
        self.engine
    }
}

impl std::fmt::Debug for JobDbUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Scheme and host only (no user, password or query), and a hash of
        // the whole, as `Secret` does.
        use std::hash::{Hash, Hasher};
        let (scheme, rest) = self.text.split_once("://").unwrap_or(("", &self.text));
        let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h).split(['/', '?']).next().unwrap_or("");
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.text.hash(&mut h);
        write!(f, "JobDbUrl({scheme}://{host}/…#{:x})", h.finish() & 0xffff)
    }
}

/// `deliver.archive_url` when set: a local directory or an S3 bucket and
/// prefix. With the other `archive_*` keys it makes the [`ArchiveTarget`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArchiveUrl {
    /// `file:///abs/path`.
    File(PathBuf),
    /// `s3://bucket[/prefix]`: `prefix` without a leading or trailing `/`; may be empty.
    S3 { bucket: String, prefix: String },
}

impl ArchiveUrl {
    /// `url` (trimmed, not empty) as an archive URL.
    pub fn parse(url: &str) -> Result<ArchiveUrl, String> {
        const USAGE: &str = "use file:///path/to/dir or s3://bucket/prefix";
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(format!("{} is not a URL: {USAGE}", excerpt(url)));
        };
        if rest.contains(['?', '#']) {
            return Err(format!("{}: a query or fragment is not supported: {USAGE}", excerpt(url)));
        }
        match scheme.to_ascii_lowercase().as_str() {
            "file" => {
                let path = rest.strip_prefix("localhost").unwrap_or(rest);
                if !path.starts_with('/') {
                    return Err(format!("{}: a file URL needs an absolute path (file:///path/to/dir)", excerpt(url)));
                }
                Ok(ArchiveUrl::File(PathBuf::from(path)))
            }
            "s3" => {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                let bucket_ok = (3..=63).contains(&bucket.len())
                    && bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
                    && bucket.starts_with(|c: char| c.is_ascii_alphanumeric())
                    && bucket.ends_with(|c: char| c.is_ascii_alphanumeric());
                if !bucket_ok {
                    return Err(format!("{}: {} is not an S3 bucket name (3-63 characters of a-z 0-9 . -)", excerpt(url), excerpt(bucket)));
                }
                let prefix = prefix.trim_matches('/');
                if !prefix.is_empty() && prefix.split('/').any(|p| p.is_empty() || p == "." || p == ".." || p.chars().any(char::is_control)) {
                    return Err(format!("{}: the prefix {} has an empty, `.` or `..` part", excerpt(url), excerpt(prefix)));
                }
                Ok(ArchiveUrl::S3 { bucket: bucket.to_owned(), prefix: prefix.to_owned() })
            }
            other => Err(format!("unknown scheme {} in {}: {USAGE}", excerpt(other), excerpt(url))),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub admin: AdminConfig,
    pub ingest: IngestConfig,
    pub log: LogConfig,
    pub dedup: DedupConfig,
    pub deliver: DeliverConfig,
    pub director: DirectorConfig,
    pub router: RouterConfig,
    pub control: ControlConfig,
    pub cell: CellConfig,
    pub functions: FunctionsConfig,
    pub sources: Vec<SourceConfig>,
    pub destinations: Vec<DestinationConfig>,
    pub connections: Vec<ConnectionConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address of the Tracking API (`IP:PORT`).
    #[serde(deserialize_with = "de_addr")]
    pub listen: SocketAddr,
    /// Root of everything Sluice stores locally (the embedded log lives in `log/`).
    pub data_dir: PathBuf,
    /// Accepted connections at once; further clients wait in the kernel backlog.
    #[serde(deserialize_with = "de_nonzero_usize")]
    pub max_connections: NonZeroUsize,
    /// Connections one client address may hold at once (0 = no limit), so
    /// one client, slow or hostile, cannot take every slot.
    pub max_connections_per_client: usize,
    /// Requests per second one client address may have refused with a
    /// client error (4xx other than 429), bursts up to five times that;
    /// past it, its requests are held for a second and answered `429`
    /// unread (0 = no budget). A client that sends valid requests is never
    /// slowed by it.
    pub client_error_budget: u32,
    /// A client must send its request headers within this time.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A client must send its whole body within this time (408 otherwise).
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// How long a graceful shutdown waits for requests in flight.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// HTTPS: the certificate chain (PEM) of the Tracking API; with
    /// `tls_key_file`. Both files are re-read when they change.
    pub tls_cert_file: Option<PathBuf>,
    /// HTTPS: the private key (PEM) of `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
    /// Peers exempt from the per-client limits (`max_connections_per_client`,
    /// `client_error_budget`): a cell router or load balancer in front,
    /// whose one address carries every client's requests and which limits
    /// clients itself.
    #[serde(deserialize_with = "de_ips")]
    pub trusted_proxies: Vec<std::net::IpAddr>,
}

/// A list of IP addresses.
fn de_ips<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<std::net::IpAddr>, D::Error> {
    let texts = Vec::<String>::deserialize(d)?;
    texts
        .iter()
        .map(|t| t.trim().parse::<std::net::IpAddr>().map_err(|_| serde::de::Error::custom(format!("{} is not an IP address", excerpt(t)))))
        .collect()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of the admin endpoint (`/metrics`, `/healthz`, `/api`);
    /// `None` (written `""`) disables it.
    #[serde(deserialize_with = "de_opt_addr")]
    pub listen: Option<SocketAddr>,
    /// Bearer token of the admin API (`/api/...`); absent = the API answers 403.
    pub token: Option<String>,
    /// Bearer token of `GET /metrics` (`admin.token` is accepted too);
    /// absent = `/metrics` is public, as it always was.
    pub metrics_token: Option<String>,
    /// HTTPS on the admin port: certificate chain (PEM), with `tls_key_file`.
    pub tls_cert_file: Option<PathBuf>,
    /// HTTPS on the admin port: the private key (PEM).
    pub tls_key_file: Option<PathBuf>,
}

/// `[router]`: a `sluice router` process, the edge in front of the cells.
/// Its Tracking API also follows `[server]` (connection limits, timeouts,
/// TLS) and `[ingest]` (body limits, `unknown_write_key`); its admin port
/// follows `admin.metrics_token` and `admin.token`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouterConfig {
    /// Where the router serves the Tracking API (`IP:PORT`).
    #[serde(deserialize_with = "de_addr")]
    pub listen: SocketAddr,
    /// Where the router serves `/metrics` and `/healthz`; `""` disables it.
    #[serde(deserialize_with = "de_opt_addr")]
    pub admin_listen: Option<SocketAddr>,
    /// The global store: a mysql://, mariadb://, postgres:// URL or an
    /// SQLite file path (`--store` and `SLUICE_GLOBAL_STORE` take precedence).
    pub store: Option<Secret>,
    /// Connections to the store that cache misses share (one each).
    #[serde(deserialize_with = "de_nonzero_usize")]
    pub store_connections: NonZeroUsize,
    /// How often the mapping version is read: a mapping change reaches the
    /// router's cache within this.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// How long a cell may take to answer a forwarded request.
    #[serde(with = "humantime_serde")]
    pub forward_timeout: Duration,
    /// `Retry-After` when a cell or the store cannot be reached.
    #[serde(with = "humantime_serde")]
    pub retry_after: Duration,
    /// Write keys the routing cache holds (known and unknown) before it is emptied.
    #[serde(deserialize_with = "de_nonzero_usize")]
    pub cache_entries: NonZeroUsize,
    /// Cache misses waiting for the store at once; more are answered `503` at once.
    #[serde(deserialize_with = "de_nonzero_usize")]
    pub max_waiting_lookups: NonZeroUsize,
    /// How long a request of a workspace that is moving between cells may
    /// wait out a cutover (its buckets fenced) before it is answered `503`.
    #[serde(with = "humantime_serde")]
    pub cutover_wait: Duration,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8070)),
            admin_listen: Some(SocketAddr::from(([127, 0, 0, 1], 8071))),
            store: None,
            store_connections: nz!(4),
            poll_interval: Duration::from_millis(250),
            forward_timeout: Duration::from_secs(30),
            retry_after: Duration::from_secs(5),
            cache_entries: nz!(100_000),
            max_waiting_lookups: nz!(256),
            cutover_wait: Duration::from_secs(10),
        }
    }
}

/// `[control]`: a `sluice control` process, the control plane of the cells.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    /// Where the control plane serves its API, `/metrics` and `/healthz`.
    #[serde(deserialize_with = "de_addr")]
    pub listen: SocketAddr,
    /// Bearer token of the operators' API (`/api/...` but the cells' own
    /// calls, which use each cell's token). Required by `sluice control`.
    pub token: Option<String>,
    /// The global store (`--store` and `SLUICE_GLOBAL_STORE` take precedence).
    pub store: Option<Secret>,
    /// How often each cell's `/metrics` is read and held against its tier's thresholds.
    #[serde(with = "humantime_serde")]
    pub scrape_interval: Duration,
    /// Bearer token sent when reading cells' `/metrics` (their `admin.metrics_token`).
    pub cell_metrics_token: Option<String>,
    /// The provisioner: a command (program and arguments) that creates a
    /// cell. It gets a JSON request on stdin and prints the new cell's
    /// URLs as JSON (docs/CELLS.md); empty = no automatic provisioning.
    pub provision_command: Vec<String>,
    /// How long a provisioning command, then the new cell's health checks, may take.
    #[serde(with = "humantime_serde")]
    pub provision_timeout: Duration,
    /// The least time between two steps of a gradual migration (10% →
    /// 50% → 100%): the target's errors and latency can be watched between them.
    #[serde(with = "humantime_serde")]
    pub migration_step_interval: Duration,
    /// Let workspaces' destinations reach private addresses
    /// (`allow_private_network`): off, as a tenant must not reach a cell's network.
    pub allow_private_network_destinations: bool,
    /// Capacity thresholds per tier; crossing one marks the cell `full`.
    pub thresholds: TierThresholds,
}

/// `[control.thresholds.<tier>]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TierThresholds {
    pub enterprise: Thresholds,
    pub mid: Thresholds,
    pub smb: Thresholds,
}

/// One tier's capacity thresholds (the seed's table: enterprise and SMB
/// cells; `mid` between them).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Thresholds {
    /// Workspaces assigned to the cell.
    pub workspaces: u64,
    /// Share of the cell's cores its processes use (0–1).
    pub cpu: f64,
    /// How far behind the cell's consumers are, in time.
    #[serde(with = "humantime_serde")]
    pub consumer_lag: Duration,
    /// Share of the JobDB server's connections in use (0–1).
    pub db_connections: f64,
    /// The cell's Tracking API p99 (acknowledgement latency).
    #[serde(with = "humantime_serde")]
    pub ingest_p99: Duration,
}

impl Default for TierThresholds {
    fn default() -> Self {
        let t = |workspaces, cpu, lag, db, p99| Thresholds {
            workspaces,
            cpu,
            consumer_lag: Duration::from_secs(lag),
            db_connections: db,
            ingest_p99: Duration::from_millis(p99),
        };
        Self { enterprise: t(50, 0.60, 60, 0.70, 200), mid: t(500, 0.65, 180, 0.75, 350), smb: t(2000, 0.70, 300, 0.80, 500) }
    }
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8060)),
            token: None,
            store: None,
            scrape_interval: Duration::from_secs(10),
            cell_metrics_token: None,
            provision_command: Vec::new(),
            provision_timeout: Duration::from_secs(300),
            migration_step_interval: Duration::from_secs(30),
            allow_private_network_destinations: false,
            thresholds: TierThresholds::default(),
        }
    }
}

/// `[cell]`: this Sluice is one cell of a deployment with a control plane.
/// With `control_url` set, the workspaces the control plane places here
/// arrive as sources, destinations and connections of origin `global`, and
/// usage is reported to it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CellConfig {
    /// This cell's id in the global store; a request a router meant for
    /// another cell (`X-Sluice-Cell`) is refused with `421`.
    pub id: Option<String>,
    /// The control plane (`http://host:port`).
    pub control_url: Option<String>,
    /// This cell's token for the control plane (`POST /api/cells/{id}/token` makes one).
    pub token: Option<String>,
    /// How often the workspaces' configuration is fetched.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// How often usage is counted and reported.
    #[serde(with = "humantime_serde")]
    pub report_interval: Duration,
}

impl Default for CellConfig {
    fn default() -> Self {
        Self { id: None, control_url: None, token: None, poll_interval: Duration::from_secs(2), report_interval: Duration::from_secs(10) }
    }
}

/// What the Tracking API does with a write key it does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownWriteKey {
    /// 401 with a message naming the problem (the default).
    Reject,
    /// 200 and drop the events, as Segment does; counted in metrics.
    AcceptAndDrop,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    pub unknown_write_key: UnknownWriteKey,
    /// Largest request body, after gzip decoding.
    pub max_request_bytes: usize,
    /// Largest single event, as JSON.
    pub max_event_bytes: usize,
    /// Most events in one batch.
    #[serde(deserialize_with = "de_nonzero_usize")]
    pub max_batch_events: NonZeroUsize,
    /// Events per second per source when the source sets none; 0 = unlimited.
    pub default_rate_limit: u32,
    /// With `log.backend = "kafka"`: an append to Kafka not done within this
    /// time is written to the on-disk spool (`data_dir/spool`) instead.
    #[serde(with = "humantime_serde")]
    pub spool_after: Duration,
    /// Events the spool may hold before ingest answers 503 with Retry-After.
    #[serde(deserialize_with = "de_nonzero_u64")]
    pub spool_max_events: NonZeroU64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Partitions of the `input` topic. Fixed once the topic exists on disk.
    pub partitions: u32,
    /// A segment file is rolled once it reaches this size.
    pub segment_bytes: u64,
    /// Whole sealed segments last written (file mtime) longer ago than this
    /// are deleted; `input` segments dedup has not read yet are kept.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// fsync each group commit before acknowledging. Turning it off trades
    /// durability on power loss for speed; a process crash loses nothing either way.
    pub fsync: bool,
    /// Retention of the `output` topic; absent = `dedup.window`. The dedup
    /// index can only be rebuilt from what `output` still holds, so a shorter
    /// value is refused.
    #[serde(with = "humantime_serde")]
    pub output_retention: Option<Duration>,
    /// `embedded` (files under `data_dir/log`) or `kafka` (`[log.kafka]`).
    pub backend: LogBackend,
    pub kafka: KafkaConfig,
}

/// `[director]`: a `sluice director` process (the scaled-out mode).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DirectorConfig {
    /// This director's name: unique among the directors sharing
    /// `deliver.jobdb_url`, and kept across restarts (its JobDBs carry it).
    pub name: String,
    /// Where the route's RPC calls are served (HTTP/2; over TLS when
    /// `tls_cert_file` is set). `IP:PORT`.
    #[serde(deserialize_with = "de_addr")]
    pub rpc_listen: SocketAddr,
    /// The URL routes use to reach it; default `http://<rpc_listen>`, or
    /// `https://<rpc_listen>` with TLS.
    #[serde(deserialize_with = "de_opt_http_url")]
    pub rpc_url: Option<HttpUrl>,
    /// The secret routes sign their RPC calls with (HMAC), the same in every
    /// `sluice route` and `sluice director`; they refuse to start without it.
    pub rpc_secret: Option<String>,
    /// Director: its RPC server certificate (PEM). Route: its client
    /// certificate, presented when directors require one. With `tls_key_file`.
    pub tls_cert_file: Option<PathBuf>,
    /// The private key (PEM) of `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
    /// The CA (PEM) that signed the other side's certificate. Setting it on a
    /// route turns TLS on: it then verifies directors with it and refuses
    /// plain-text directors. On a director with `tls_client_auth`, it
    /// verifies routes' client certificates.
    pub tls_ca_file: Option<PathBuf>,
    /// Director: require a client certificate signed by `tls_ca_file` (mutual TLS).
    pub tls_client_auth: bool,
}

impl DirectorConfig {
    /// Whether this process talks TLS on the director RPC: a director with a
    /// certificate, a route with a CA to verify directors by.
    pub fn tls_enabled(&self) -> bool {
        self.tls_cert_file.is_some() || self.tls_ca_file.is_some()
    }
}

/// The shortest `director.rpc_secret` accepted.
pub const MIN_RPC_SECRET_LEN: usize = 32;

impl Default for DirectorConfig {
    fn default() -> Self {
        Self {
            name: "director".into(),
            rpc_listen: SocketAddr::from(([127, 0, 0, 1], 8090)),
            rpc_url: None,
            rpc_secret: None,
            tls_cert_file: None,
            tls_key_file: None,
            tls_ca_file: None,
            tls_client_auth: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogBackend {
    #[default]
    Embedded,
    Kafka,
}

/// `[log.kafka]`: the scaled-out log. Topics `input` and `output` are
/// created with `log.partitions` partitions when missing.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    pub primary: KafkaCluster,
    /// A second cluster: new `input` writes move there while the primary is
    /// unhealthy, and dedup reads both (`output` stays on the primary).
    pub secondary: Option<KafkaCluster>,
    /// With a secondary: an append to the primary slower than this counts
    /// against its health, like a failed one.
    #[serde(with = "humantime_serde")]
    pub failover_slow_after: Duration,
    /// Replication factor of the topics Sluice creates (use 3 in production).
    pub replication_factor: u32,
    /// An append not acknowledged by all in-sync replicas within this time fails.
    #[serde(with = "humantime_serde")]
    pub produce_timeout: Duration,
    /// Metadata, offset and commit requests fail after this long.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// `client.id`, and the prefix of the dedup stage's transactional ids.
    pub client_id: String,
    /// Put before every topic and consumer group name (`cell-a.input`,
    /// `cell-a.dedup`): cells sharing one Kafka cluster each give their own.
    pub topic_prefix: String,
    /// Extra librdkafka settings for every client, e.g. `"socket.keepalive.enable" = "true"`.
    pub settings: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaCluster {
    /// `host:port[,host:port…]`.
    pub bootstrap_servers: String,
    /// How the link is protected: `plaintext` (default), `ssl`,
    /// `sasl_plaintext` or `sasl_ssl`.
    pub security_protocol: KafkaSecurity,
    /// The CA (PEM) that signed the brokers' certificates; absent = the
    /// system's CAs. Only with `ssl` or `sasl_ssl`.
    pub tls_ca_file: Option<PathBuf>,
    /// A client certificate (PEM) for brokers that require one; with `tls_key_file`.
    pub tls_cert_file: Option<PathBuf>,
    /// The private key (PEM) of `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
    /// Check that a broker's certificate names the host it was reached at
    /// (default true; turning it off is logged as a warning).
    pub tls_verify_hostname: bool,
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`; required with `sasl_*`.
    pub sasl_mechanism: Option<SaslMechanism>,
    pub sasl_username: Option<String>,
    /// Better set from the environment:
    /// `SLUICE_LOG__KAFKA__PRIMARY__SASL_PASSWORD`.
    pub sasl_password: Option<Secret>,
}

/// `log.kafka.*.security_protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KafkaSecurity {
    #[default]
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl KafkaSecurity {
    /// librdkafka's `security.protocol` value.
    pub fn as_librdkafka(self) -> &'static str {
        match self {
            Self::Plaintext => "plaintext",
            Self::Ssl => "ssl",
            Self::SaslPlaintext => "sasl_plaintext",
            Self::SaslSsl => "sasl_ssl",
        }
    }

    pub fn uses_tls(self) -> bool {
        matches!(self, Self::Ssl | Self::SaslSsl)
    }

    pub fn uses_sasl(self) -> bool {
        matches!(self, Self::SaslPlaintext | Self::SaslSsl)
    }
}

/// `log.kafka.*.sasl_mechanism`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum SaslMechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    /// librdkafka's `sasl.mechanisms` value.
    pub fn as_librdkafka(self) -> &'static str {
        match self {
            Self::Plain => "PLAIN",
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// A secret from the config (a password): never shown by `Debug`.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A hash of it, not the value, so two configs whose secrets differ
        // still print differently.
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.0.hash(&mut h);
        write!(f, "Secret(#{:x})", h.finish() & 0xffff)
    }
}

impl Default for KafkaCluster {
    fn default() -> Self {
        Self {
            bootstrap_servers: String::new(),
            security_protocol: KafkaSecurity::Plaintext,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            tls_verify_hostname: true,
            sasl_mechanism: None,
            sasl_username: None,
            sasl_password: None,
        }
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            primary: KafkaCluster::default(),
            secondary: None,
            failover_slow_after: Duration::from_secs(1),
            replication_factor: 1,
            produce_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(10),
            client_id: "sluice".into(),
            topic_prefix: String::new(),
            settings: Default::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DedupConfig {
    /// Run the dedup stage in `sluice serve`.
    pub enabled: bool,
    /// A repeat of a messageId (per source) within this time is dropped.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Bloom filter bits per key: 10 gives about 1% false positives.
    pub bloom_bits_per_key: f64,
    /// RocksDB block cache shared by all partitions (filters, indexes, data).
    pub block_cache_bytes: usize,
    /// Records read from `input` per batch.
    #[serde(deserialize_with = "de_nonzero_usize")]
    pub batch_size: NonZeroUsize,
}

impl Default for DedupConfig {
    fn default() -> Self {
        Self { enabled: true, window: Duration::from_secs(28 * 86400), bloom_bits_per_key: 10.0, block_cache_bytes: 256 << 20, batch_size: nz!(1000) }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Stable name of the source; `[A-Za-z0-9_-]`, at most 64 characters.
    pub id: String,
    /// The key itself, or `sha256:<64 hex digits>`, its SHA-256: then the
    /// key is nowhere on the cell (sources a control plane hands over).
    pub write_key: String,
    /// Events per second; absent = `ingest.default_rate_limit`; 0 = unlimited.
    #[serde(default)]
    pub rate_limit: Option<u32>,
    /// Bucket size for bursts; absent = one second's worth of `rate_limit`.
    #[serde(default)]
    pub rate_burst: Option<u32>,
    /// The workspace (tenant) the source belongs to; absent = `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<String>,
    /// A source function: run on each of the source's events before routing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<FunctionRef>,
}

/// How functions run (`[functions]`, docs/FUNCTIONS.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FunctionsConfig {
    /// Threads that run functions (each function's engine lives on one of them).
    #[serde(deserialize_with = "de_nonzero_usize")]
    pub threads: NonZeroUsize,
    /// Time one call may take before it is stopped (class `Timeout`).
    #[serde(with = "humantime_serde")]
    pub time_per_call: Duration,
    /// Memory one function's engine may hold (class `OutOfMemory` past it).
    pub memory_bytes: usize,
}

impl Default for FunctionsConfig {
    fn default() -> Self {
        FunctionsConfig { threads: nz!(2), time_per_call: Duration::from_millis(100), memory_bytes: 32 << 20 }
    }
}

/// A function attached to a source or a destination (docs/FUNCTIONS.md):
/// the id it was deployed under, and the settings its handlers get.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FunctionRef {
    pub id: String,
    /// The handlers' second argument (`settings`); absent = `{}`.
    #[serde(default)]
    pub settings: serde_json::Map<String, serde_json::Value>,
}

impl FunctionRef {
    fn validate(&self, key: String) -> Result<(), ConfigError> {
        if !valid_id(&self.id) {
            return Err(invalid(format!("{key}.id"), format!("{:?} must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'", self.id)));
        }
        let size = serde_json::to_vec(&self.settings).map_or(usize::MAX, |v| v.len());
        if size > MAX_FUNCTION_SETTINGS {
            return Err(invalid(format!("{key}.settings"), format!("{size} bytes as JSON; at most {MAX_FUNCTION_SETTINGS}")));
        }
        Ok(())
    }
}

/// Largest `function.settings`, as JSON (they cross into the engine on every call).
pub const MAX_FUNCTION_SETTINGS: usize = 16 << 10;

/// The prefix of a write key given as its SHA-256 (`sha256:<64 hex digits>`).
pub const HASHED_WRITE_KEY: &str = "sha256:";

/// Whether `key` is a write key given as its SHA-256.
pub fn is_hashed_write_key(key: &str) -> bool {
    key.strip_prefix(HASHED_WRITE_KEY).is_some_and(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

/// The delivery stage (Centrifuge): JobDBs, directors, the HTTP executor.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliverConfig {
    /// Run the route and delivery stages in `sluice serve`.
    pub enabled: bool,
    /// A new JobDB is started when the newest is this old...
    #[serde(with = "humantime_serde")]
    pub jobdb_rotate_after: Duration,
    /// ...or holds this many jobs.
    #[serde(deserialize_with = "de_nonzero_u64")]
    pub jobdb_max_jobs: NonZeroU64,
    /// Where the JobDBs live: `None` (written `""`) = SQLite files in
    /// `data_dir/jobs`; or a MySQL/MariaDB
    /// (`mysql://user:password@host:port/database`) or PostgreSQL
    /// (`postgres://user:password@host:port/database`) database, one table
    /// set per JobDB.
    #[serde(deserialize_with = "de_opt_jobdb_url")]
    pub jobdb_url: Option<JobDbUrl>,
    /// Awaiting jobs each director keeps in memory; the rest wait in the JobDB.
    pub cache_jobs: usize,
    /// First retry delay (before jitter); doubles per attempt.
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Longest delay between two attempts (before jitter).
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// A job still failing this long after it was created is archived.
    #[serde(with = "humantime_serde")]
    pub retry_window: Duration,
    /// Whole-request timeout (connect, send, response headers and body).
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Default most requests in flight per destination.
    #[serde(deserialize_with = "de_nonzero_usize")]
    pub max_in_flight: NonZeroUsize,
    /// Default requests per second per destination; 0 = unlimited.
    pub rate_limit: u32,
    /// TCP connect timeout.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Consecutive failures that open a destination's circuit.
    #[serde(deserialize_with = "de_nonzero_u32")]
    pub circuit_failures: NonZeroU32,
    /// How long an open circuit waits before one probe request; doubles per failed probe up to `max_backoff`.
    #[serde(with = "humantime_serde")]
    pub circuit_cooldown: Duration,
    /// Let every destination reach loopback/private/link-local addresses.
    pub allow_private_network: bool,
    /// Where jobs past their retry window are archived (a local directory); default `data_dir/archive`.
    pub archive_dir: Option<PathBuf>,
    /// Where jobs are archived, as a URL: `file:///path` or `s3://bucket[/prefix]`;
    /// `None` (written `""`) = `archive_dir`. Exclusive with `archive_dir`.
    #[serde(deserialize_with = "de_opt_archive_url")]
    pub archive_url: Option<ArchiveUrl>,
    /// S3-compatible server to use instead of AWS (`http://` allowed); default `AWS_ENDPOINT` or AWS.
    #[serde(deserialize_with = "de_endpoint")]
    pub archive_s3_endpoint: Option<HttpUrl>,
    /// S3 region; default `AWS_REGION`/`AWS_DEFAULT_REGION`, else `us-east-1`.
    #[serde(deserialize_with = "de_region")]
    pub archive_s3_region: Option<String>,
    /// A CA (PEM) to trust, besides the system's, for an `https://`
    /// `archive_s3_endpoint` (an S3-compatible server with its own CA).
    pub archive_s3_ca_file: Option<PathBuf>,
}

/// Where archived jobs are written: `deliver.archive_url`, else
/// `deliver.archive_dir`, else `data_dir/archive`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArchiveTarget {
    /// A local directory.
    Local(PathBuf),
    /// An S3 bucket (or a bucket of the S3-compatible server at `endpoint`);
    /// objects go under `prefix` (no leading or trailing `/`; may be empty).
    /// Credentials come from the standard `AWS_*` environment variables.
    /// `ca_file`: a CA (PEM) trusted besides the system's.
    S3 { bucket: String, prefix: String, endpoint: Option<String>, region: Option<String>, ca_file: Option<PathBuf> },
}

impl std::fmt::Display for ArchiveTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ArchiveTarget::Local(dir) => write!(f, "{}", dir.display()),
            ArchiveTarget::S3 { bucket, prefix, endpoint, .. } => {
                write!(f, "s3://{bucket}/{prefix}")?;
                match endpoint {
                    Some(e) => write!(f, " (at {e})"),
                    None => Ok(()),
                }
            }
        }
    }
}

/// A retry policy: exponential backoff with full jitter, for `retry_window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub retry_window: Duration,
    pub request_timeout: Duration,
}

impl RetryPolicy {
    pub const DEFAULT: RetryPolicy = RetryPolicy {
        initial_backoff: Duration::from_secs(1),
        max_backoff: Duration::from_secs(600),
        retry_window: Duration::from_secs(4 * 3600),
        request_timeout: Duration::from_secs(10),
    };
}

impl Default for DeliverConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            jobdb_rotate_after: Duration::from_secs(30 * 60),
            jobdb_max_jobs: nz!(1_000_000),
            jobdb_url: None,
            cache_jobs: 100_000,
            initial_backoff: RetryPolicy::DEFAULT.initial_backoff,
            max_backoff: RetryPolicy::DEFAULT.max_backoff,
            retry_window: RetryPolicy::DEFAULT.retry_window,
            request_timeout: RetryPolicy::DEFAULT.request_timeout,
            max_in_flight: nz!(64),
            rate_limit: 0,
            connect_timeout: Duration::from_secs(5),
            circuit_failures: nz!(5),
            circuit_cooldown: Duration::from_secs(5),
            allow_private_network: false,
            archive_dir: None,
            archive_url: None,
            archive_s3_endpoint: None,
            archive_s3_region: None,
            archive_s3_ca_file: None,
        }
    }
}

impl DeliverConfig {
    /// The retry policy of destinations that set none of their own.
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            initial_backoff: self.initial_backoff,
            max_backoff: self.max_backoff,
            retry_window: self.retry_window,
            request_timeout: self.request_timeout,
        }
    }

    /// The archive keys together: `archive_url` or `archive_dir`, and the
    /// `archive_s3_*` keys only with an `s3://` URL; an error names the key.
    fn check_archive(&self) -> Result<(), ConfigError> {
        let s3 = matches!(self.archive_url, Some(ArchiveUrl::S3 { .. }));
        if !s3 {
            for (key, set) in [
                ("archive_s3_endpoint", self.archive_s3_endpoint.is_some()),
                ("archive_s3_region", self.archive_s3_region.is_some()),
                ("archive_s3_ca_file", self.archive_s3_ca_file.is_some()),
            ] {
                if set {
                    return Err(invalid(format!("deliver.{key}"), "is only used with an s3:// deliver.archive_url"));
                }
            }
        }
        if self.archive_url.is_some() && self.archive_dir.is_some() {
            return Err(invalid("deliver.archive_url", "set either deliver.archive_url or deliver.archive_dir, not both"));
        }
        if self.archive_s3_ca_file.is_some() && self.archive_s3_endpoint.as_ref().is_some_and(|e| !e.is_https()) {
            return Err(invalid("deliver.archive_s3_ca_file", "is for an https:// archive_s3_endpoint; this one is http:// (plain text)"));
        }
        Ok(())
    }
}

/// A destination: where events of connected sources are delivered.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DestinationConfig {
    /// Stable name; `[A-Za-z0-9_-]`, at most 64 characters.
    pub id: String,
    /// The key an event's `integrations` object uses for this destination
    /// (case-sensitive); absent = `id`.
    #[serde(default)]
    pub name: Option<String>,
    /// `"webhook"` (one event per request), `"batch_webhook"` (many
    /// events per request: `{"batch": [...]}`), `"kafka"` (a topic of
    /// the user's own Kafka cluster) or `"postgres"` (a warehouse: a table
    /// per event type, loaded with `COPY`); see docs/DESTINATIONS.md.
    #[serde(rename = "type", default = "webhook")]
    pub kind: String,
    /// Webhooks: the `http://` or `https://` URL the events are POSTed to.
    /// `kafka`: `kafka://host:port[,host:port…]/topic`.
    /// `postgres`: `postgres://user:password@host:port/database[?sslmode=…]`.
    pub url: String,
    /// The workspace (tenant) the destination belongs to; absent = `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<String>,
    /// HMAC key for the `X-Signature` and `X-Sluice-Signature` headers; absent = unsigned.
    #[serde(default)]
    pub secret: Option<String>,
    /// Let this destination reach loopback/private/link-local addresses.
    #[serde(default)]
    pub allow_private_network: bool,
    /// Most requests in flight; absent = `deliver.max_in_flight`.
    #[serde(default)]
    pub max_in_flight: Option<usize>,
    /// Requests per second; absent = `deliver.rate_limit`; 0 = unlimited.
    #[serde(default)]
    pub rate_limit: Option<u32>,
    /// Retry policy overrides; absent keys fall back to `[deliver]`.
    #[serde(default, with = "humantime_serde")]
    pub initial_backoff: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub max_backoff: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub retry_window: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub request_timeout: Option<Duration>,
    /// Filters, applied in order (see docs/CONFIG.md for the condition syntax).
    #[serde(default)]
    pub filters: Vec<FilterConfig>,
    /// A destination function: run on each job before it is sent; what it
    /// returns is what is delivered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<FunctionRef>,
    /// `batch_webhook`: most events per request (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_max_events: Option<usize>,
    /// `batch_webhook`: most bytes of events per request (default 512 KiB;
    /// an event larger than this goes alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_max_bytes: Option<usize>,
    /// `batch_webhook`: how long a ready event may wait for its batch to fill (default 1 s).
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub batch_max_age: Option<Duration>,
    /// `kafka`: the message key, `"message_id"` (default) or `"user_id"`
    /// (the event's userId, else its anonymousId: one user's events stay in
    /// one partition, in order).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka_key: Option<String>,
    /// `kafka`: how the link to the cluster is protected: `plaintext`
    /// (default), `ssl`, `sasl_plaintext` or `sasl_ssl`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka_security_protocol: Option<String>,
    /// `kafka` with `sasl_*`: `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka_sasl_mechanism: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka_sasl_username: Option<String>,
    /// Write-only on the admin API, as `secret`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka_sasl_password: Option<String>,
    /// `kafka` with `ssl` or `sasl_ssl`: the CA that signed the brokers'
    /// certificates, as PEM text (not a file: destinations come from the
    /// admin API too); absent = the system's CAs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka_tls_ca: Option<String>,
    /// `s3`: an S3-compatible server's `http://` or `https://` endpoint
    /// (absent: AWS, or `AWS_ENDPOINT`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_endpoint: Option<String>,
    /// `s3`: the bucket's region (absent: `AWS_REGION`, else `us-east-1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_region: Option<String>,
    /// `s3`: this destination's own credentials (with
    /// `s3_secret_access_key`, write-only on the admin API); absent: the
    /// process's `AWS_*` environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_access_key_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_secret_access_key: Option<String>,
    /// `s3`: the objects' format, `"ndjson"` (gzip, the default) or `"parquet"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_format: Option<String>,
}

/// Where a destination reached through its own system's client (not
/// HTTP) sends a request's jobs, each getting its own outcome.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NativeTarget {
    Kafka(KafkaTarget),
    /// `postgres`: the destination's `url` is the database.
    Postgres,
    S3(S3Target),
}

/// Where an `s3` destination writes, from its `url`, `s3_endpoint`,
/// `s3_region` and credentials. `Debug` never shows the secret key.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct S3Target {
    pub bucket: String,
    /// Without a leading or trailing `/`; may be empty.
    pub prefix: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// (access key id, secret access key); `None`: the process's `AWS_*`.
    pub credentials: Option<(String, String)>,
    pub format: LakeFormat,
}

/// The format of an `s3` destination's objects (`s3_format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum LakeFormat {
    /// One event per line, gzip-compressed (`.ndjson.gz`).
    #[default]
    Ndjson,
    /// Apache Parquet, a row per event (`.parquet`).
    Parquet,
}

impl std::fmt::Debug for S3Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Target")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("credentials", &self.credentials.as_ref().map(|(id, _)| (id, "***")))
            .field("format", &self.format)
            .finish()
    }
}

/// Where a `kafka` destination publishes, from its `url`, `kafka_key`
/// and link keys. `Debug` never shows the SASL password.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct KafkaTarget {
    /// `host:port,host:port…` (librdkafka's `bootstrap.servers`).
    pub bootstrap: String,
    pub topic: String,
    pub key: KafkaKey,
    /// librdkafka's `security.protocol`, `ssl.*` and `sasl.*` settings.
    pub link: Vec<(String, String)>,
}

impl std::fmt::Debug for KafkaTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let link: Vec<(&str, &str)> = self.link.iter().map(|(k, v)| (k.as_str(), if k.contains("password") { "***" } else { v.as_str() })).collect();
        f.debug_struct("KafkaTarget")
            .field("bootstrap", &self.bootstrap)
            .field("topic", &self.topic)
            .field("key", &self.key)
            .field("link", &link)
            .finish()
    }
}

/// What a `kafka` destination's message key is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KafkaKey {
    MessageId,
    UserId,
}

impl KafkaTarget {
    /// Parse `kafka://host:port[,host:port…]/topic`; the error says what is wrong.
    pub fn parse_url(url: &str) -> Result<(String, String), String> {
        let rest = url.strip_prefix("kafka://").ok_or("is not a kafka://host:port/topic URL")?;
        let (hosts, topic) = rest.split_once('/').ok_or("names no topic (kafka://host:port/topic)")?;
        if hosts.is_empty() {
            return Err("names no broker (kafka://host:port/topic)".into());
        }
        // A few bootstrap brokers find the rest of the cluster; thousands would each be dialed.
        const MOST_BROKERS: usize = 100;
        if hosts.split(',').count() > MOST_BROKERS {
            return Err(format!("names more than {MOST_BROKERS} bootstrap brokers"));
        }
        for host in hosts.split(',') {
            if host.contains('@') {
                // Not echoed: it would hold a password.
                return Err("a broker may not hold user info (user:password@); a SASL link's credentials are kafka_sasl_*".into());
            }
            if host.contains(['?', '#']) || host.contains(char::is_whitespace) {
                return Err(format!("broker {} is not host:port", excerpt(host)));
            }
            check_authority(host).map_err(|problem| format!("broker {}: {problem}", excerpt(host)))?;
            let Some((name, port)) = host.rsplit_once(':').filter(|(_, p)| !p.is_empty() && !p.ends_with(']')) else {
                return Err(format!("broker {} has no port (host:port)", excerpt(host)));
            };
            if !port.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("broker {}: the port must be digits", excerpt(host)));
            }
            // A host name, an IPv4 address, or an IPv6 address in brackets.
            let bracketed = name.starts_with('[') && name.ends_with(']');
            let plain = !name.is_empty()
                && !name.starts_with(['-', '.'])
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
            if !bracketed && !plain {
                return Err(format!("broker {}: the host must be a name, an IPv4 address or [an IPv6 address]", excerpt(host)));
            }
        }
        if topic.starts_with("__") {
            return Err(format!("topic {} is one of Kafka's internal topics (names starting \"__\")", excerpt(topic)));
        }
        // Kafka's own rule for topic names.
        if topic.is_empty()
            || topic.len() > 249
            || topic == "."
            || topic == ".."
            || !topic.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(format!("topic {} must be 1-249 characters of A-Z, a-z, 0-9, '.', '_' or '-'", excerpt(topic)));
        }
        Ok((hosts.to_owned(), topic.to_owned()))
    }
}

/// The batching of a `batch_webhook` destination, defaults filled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    pub max_events: usize,
    pub max_bytes: usize,
    pub max_age: Duration,
}

impl BatchLimits {
    pub const DEFAULT: BatchLimits = BatchLimits { max_events: 100, max_bytes: 512 << 10, max_age: Duration::from_secs(1) };
    /// Upper bounds of the keys.
    pub const MAX_EVENTS: usize = 10_000;
    pub const MAX_BYTES: usize = 16 << 20;
    pub const MAX_AGE: Duration = Duration::from_secs(60);
}

fn webhook() -> String {
    "webhook".into()
}

impl DestinationConfig {
    /// The `integrations` key of this destination.
    pub fn integration_name(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.id)
    }

    /// Check this destination alone; errors name `<prefix>.<key>`.
    pub fn validate(&self, prefix: &str, global: RetryPolicy) -> Result<(), ConfigError> {
        let key = |k: &str| format!("{prefix}.{k}");
        if !valid_id(&self.id) {
            return Err(invalid(key("id"), format!("{:?} must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'", self.id)));
        }
        if self.secret.as_deref() == Some("") {
            return Err(invalid(key("secret"), "is empty: leave it out for unsigned requests"));
        }
        // A NUL or line break would be cut or read differently by the client that takes the URL.
        if self.url.chars().any(char::is_control) {
            return Err(invalid(key("url"), "holds a control character (NUL, a line break…)"));
        }
        // Each type's own keys, refused on the others.
        let (kind, keys): (&str, &[(&str, bool)]) = (
            self.kind.as_str(),
            &[
                ("batch_max_events", self.batch_max_events.is_some()),
                ("batch_max_bytes", self.batch_max_bytes.is_some()),
                ("batch_max_age", self.batch_max_age.is_some()),
                ("kafka_key", self.kafka_key.is_some()),
                ("kafka_security_protocol", self.kafka_security_protocol.is_some()),
                ("kafka_sasl_mechanism", self.kafka_sasl_mechanism.is_some()),
                ("kafka_sasl_username", self.kafka_sasl_username.is_some()),
                ("kafka_sasl_password", self.kafka_sasl_password.is_some()),
                ("kafka_tls_ca", self.kafka_tls_ca.is_some()),
                ("secret", self.secret.is_some()),
                ("s3_endpoint", self.s3_endpoint.is_some()),
                ("s3_region", self.s3_region.is_some()),
                ("s3_access_key_id", self.s3_access_key_id.is_some()),
                ("s3_secret_access_key", self.s3_secret_access_key.is_some()),
                ("s3_format", self.s3_format.is_some()),
            ],
        );
        let allowed: &[&str] = match kind {
            "webhook" => &["secret"],
            "batch_webhook" => &["batch_max_events", "batch_max_bytes", "batch_max_age", "secret"],
            "kafka" => &[
                "batch_max_events",
                "batch_max_age",
                "kafka_key",
                "kafka_security_protocol",
                "kafka_sasl_mechanism",
                "kafka_sasl_username",
                "kafka_sasl_password",
                "kafka_tls_ca",
            ],
            "postgres" => &["batch_max_events", "batch_max_age"],
            "s3" => &["batch_max_events", "batch_max_age", "s3_endpoint", "s3_region", "s3_access_key_id", "s3_secret_access_key", "s3_format"],
            other => {
                return Err(invalid(
                    key("type"),
                    format!(
                        "unknown destination type {}; the types are \"webhook\", \"batch_webhook\", \"kafka\", \"postgres\" and \"s3\"",
                        excerpt(other)
                    ),
                ))
            }
        };
        if let Some((k, _)) = keys.iter().find(|(k, set)| *set && !allowed.contains(k)) {
            return Err(invalid(key(k), format!("is not a key of type = {kind:?} destinations")));
        }
        if let Some(b) = self.batch_limits() {
            if !(1..=BatchLimits::MAX_EVENTS).contains(&b.max_events) {
                return Err(invalid(key("batch_max_events"), format!("must be between 1 and {}", BatchLimits::MAX_EVENTS)));
            }
            if !(1024..=BatchLimits::MAX_BYTES).contains(&b.max_bytes) {
                return Err(invalid(key("batch_max_bytes"), format!("must be between 1024 and {}", BatchLimits::MAX_BYTES)));
            }
            if b.max_age > BatchLimits::MAX_AGE {
                return Err(invalid(key("batch_max_age"), "must be at most 60s"));
            }
        }
        if kind == "kafka" {
            KafkaTarget::parse_url(&self.url)
                .map_err(|problem| invalid(key("url"), format!("{} {problem}", excerpt(&without_user_info(&self.url)))))?;
            if let Some(k) = &self.kafka_key {
                if !matches!(k.as_str(), "message_id" | "user_id") {
                    return Err(invalid(key("kafka_key"), format!("{} is not \"message_id\" or \"user_id\"", excerpt(k))));
                }
            }
            self.kafka_link().map_err(|(k, problem)| invalid(key(k), problem))?;
        } else if kind == "s3" {
            self.s3_parts().map_err(|(k, problem)| invalid(key(k), problem))?;
        } else if kind == "postgres" {
            // The URL's TLS mode and parameters are checked where it is used
            // (`sluice_deliver::warehouse::check_url`, at load and on the admin API).
            // Shown without user, password or query.
            let shown = || excerpt(&format!("{:?}", JobDbUrl { text: self.url.clone(), engine: JobDbEngine::Postgres }));
            if !(self.url.starts_with("postgres://") || self.url.starts_with("postgresql://")) || self.url.contains(char::is_whitespace) {
                return Err(invalid(key("url"), format!("{} is not a postgres:// URL", shown())));
            }
            JobDbUrl::parse(&self.url).map_err(|problem| invalid(key("url"), format!("{}: {problem}", shown())))?;
            check_authority(&self.url).map_err(|problem| invalid(key("url"), format!("{}: {problem}", shown())))?;
        } else {
            if !(self.url.starts_with("http://") || self.url.starts_with("https://")) || self.url.contains(char::is_whitespace) {
                return Err(invalid(key("url"), format!("{:?} is not an http:// or https:// URL", self.url)));
            }
            check_authority(&self.url).map_err(|problem| invalid(key("url"), format!("{}: {problem}", excerpt(&self.url))))?;
        }
        if self.max_in_flight == Some(0) {
            return Err(invalid(key("max_in_flight"), "must be at least 1"));
        }
        check_retry(prefix, &self.retry_policy(global))?;
        for (j, f) in self.filters.iter().enumerate() {
            let fkey = |k: &str| format!("{prefix}.filters[{j}].{k}");
            if let Some(cond) = &f.condition {
                crate::filter::Condition::parse(cond).map_err(|e| invalid(fkey("if"), format!("{}: {e}", excerpt(cond))))?;
            }
            match f.action.as_str() {
                "drop" => {}
                "sample" => match f.rate {
                    Some(r) if (0.0..=1.0).contains(&r) => {}
                    _ => return Err(invalid(fkey("rate"), "`sample` needs a rate between 0.0 and 1.0")),
                },
                "allow_fields" | "block_fields" => {
                    if f.fields.is_empty() || f.fields.iter().any(|p| p.is_empty() || p.split('.').any(str::is_empty)) {
                        return Err(invalid(fkey("fields"), "needs one or more dotted paths such as \"properties.email\""));
                    }
                }
                other => return Err(invalid(fkey("action"), format!("unknown action {other:?}; use drop, sample, allow_fields or block_fields"))),
            }
        }
        if let Some(f) = &self.function {
            f.validate(key("function"))?;
        }
        Ok(())
    }

    /// How the director groups this destination's jobs (its keys over the
    /// type's defaults): a `batch_webhook`'s requests, a `kafka`
    /// destination's groups of messages sent under one permit (500 ready
    /// jobs at most, sent at once: librdkafka batches them itself).
    /// `None` for webhooks.
    pub fn batch_limits(&self) -> Option<BatchLimits> {
        let defaults = match self.kind.as_str() {
            "batch_webhook" => BatchLimits::DEFAULT,
            "kafka" => BatchLimits { max_events: 500, max_bytes: BatchLimits::MAX_BYTES, max_age: Duration::ZERO },
            // A warehouse load is a transaction: fewer, larger ones load faster.
            "postgres" => BatchLimits { max_events: 5000, max_bytes: BatchLimits::MAX_BYTES, max_age: Duration::from_secs(1) },
            // A data lake wants few, large files.
            "s3" => BatchLimits { max_events: 10_000, max_bytes: BatchLimits::MAX_BYTES, max_age: Duration::from_secs(10) },
            _ => return None,
        };
        Some(BatchLimits {
            max_events: self.batch_max_events.unwrap_or(defaults.max_events),
            max_bytes: self.batch_max_bytes.unwrap_or(defaults.max_bytes),
            max_age: self.batch_max_age.unwrap_or(defaults.max_age),
        })
    }

    /// An `s3` destination's bucket, prefix, endpoint, region and
    /// credentials; `None` for other types (or a URL [`validate`](Self::validate) refuses).
    pub fn s3_target(&self) -> Option<S3Target> {
        if self.kind != "s3" {
            return None;
        }
        self.s3_parts().ok()
    }

    /// An `s3` destination's target from its keys; the key at fault and why.
    fn s3_parts(&self) -> Result<S3Target, (&'static str, String)> {
        let usage = || ("url", format!("{} is not an s3://bucket/prefix URL", excerpt(&self.url)));
        if !self.url.starts_with("s3://") {
            return Err(usage());
        }
        let (bucket, prefix) = match ArchiveUrl::parse(&self.url).map_err(|problem| ("url", problem))? {
            ArchiveUrl::S3 { bucket, prefix } => (bucket, prefix),
            ArchiveUrl::File(_) => return Err(usage()),
        };
        // S3's rules beyond the archive's: no `..`, not an IP address, no reserved prefix or suffix.
        if bucket.contains("..")
            || bucket.split('.').all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
            || bucket.starts_with("xn--")
            || bucket.starts_with("sthree-")
            || bucket.ends_with("-s3alias")
            || bucket.ends_with("--ol-s3")
        {
            return Err(("url", format!("{} is not a bucket name S3 takes", excerpt(&bucket))));
        }
        // Written as given: characters object_store would escape (and so change) are refused.
        if !prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b"/!-_.*'()=".contains(&b)) {
            return Err(("url", format!("the prefix {} may hold only A-Z a-z 0-9 and / ! - _ . * ' ( ) =", excerpt(&prefix))));
        }
        if let Some(e) = &self.s3_endpoint {
            HttpUrl::parse(e).map_err(|problem| ("s3_endpoint", problem))?;
            check_authority(e).map_err(|problem| ("s3_endpoint", format!("{}: {problem}", excerpt(&without_user_info(e)))))?;
            // scheme://host[:port] only: a path or query would be put before every object's key,
            // and credentials in it would not be used (and would be shown back).
            let rest = e.split_once("://").map_or("", |(_, r)| r).trim_end_matches('/');
            if rest.contains(['/', '?', '#', '@']) {
                return Err(("s3_endpoint", format!("{} must be scheme://host[:port] (no path, query or user)", excerpt(&without_user_info(e)))));
            }
        }
        if self.s3_access_key_id.is_some() != self.s3_secret_access_key.is_some() {
            return Err(("s3_secret_access_key", "s3_access_key_id and s3_secret_access_key go together".into()));
        }
        if let Some(r) = &self.s3_region {
            check_region(r).map_err(|problem| ("s3_region", problem))?;
        }
        let format = match self.s3_format.as_deref() {
            None | Some("ndjson") => LakeFormat::Ndjson,
            Some("parquet") => LakeFormat::Parquet,
            Some(other) => return Err(("s3_format", format!("{} is not \"ndjson\" or \"parquet\"", excerpt(other)))),
        };
        Ok(S3Target {
            bucket,
            prefix,
            endpoint: self.s3_endpoint.as_ref().map(|e| e.trim_end_matches('/').to_owned()),
            region: self.s3_region.clone(),
            credentials: self.s3_access_key_id.clone().zip(self.s3_secret_access_key.clone()),
            format,
        })
    }

    /// The target of a `kafka`, `postgres` or `s3` destination; `None` for
    /// webhooks (or a URL [`validate`](Self::validate) refuses).
    pub fn native_target(&self) -> Option<NativeTarget> {
        match self.kind.as_str() {
            "kafka" => self.kafka_target().map(NativeTarget::Kafka),
            "postgres" => Some(NativeTarget::Postgres),
            "s3" => self.s3_target().map(NativeTarget::S3),
            _ => None,
        }
    }

    /// Whether this is a `postgres` (warehouse) destination.
    pub fn is_postgres(&self) -> bool {
        self.kind == "postgres"
    }

    /// A `kafka` destination's brokers, topic and key; `None` for other
    /// types (or a URL [`validate`](Self::validate) refuses).
    pub fn kafka_target(&self) -> Option<KafkaTarget> {
        if self.kind != "kafka" {
            return None;
        }
        let (bootstrap, topic) = KafkaTarget::parse_url(&self.url).ok()?;
        let key = if self.kafka_key.as_deref() == Some("user_id") { KafkaKey::UserId } else { KafkaKey::MessageId };
        Some(KafkaTarget { bootstrap, topic, key, link: self.kafka_link().ok()? })
    }

    /// A `kafka` destination's link settings for librdkafka, from its
    /// `kafka_security_protocol`, `kafka_sasl_*` and `kafka_tls_ca`; the
    /// key at fault and why.
    fn kafka_link(&self) -> Result<Vec<(String, String)>, (&'static str, String)> {
        let protocol: KafkaSecurity =
            parse_name(self.kafka_security_protocol.as_deref().unwrap_or("plaintext")).map_err(|e| ("kafka_security_protocol", e))?;
        let mut link = vec![("security.protocol".to_owned(), protocol.as_librdkafka().to_owned())];
        if protocol.uses_tls() {
            // The broker's certificate must name the host it was reached at.
            link.push(("ssl.endpoint.identification.algorithm".into(), "https".into()));
            if let Some(pem) = &self.kafka_tls_ca {
                if pem.len() > 256 << 10 {
                    return Err(("kafka_tls_ca", "must be at most 256 KiB of PEM text".into()));
                }
                check_pem_certificates(pem).map_err(|problem| ("kafka_tls_ca", problem))?;
                link.push(("ssl.ca.pem".into(), pem.clone()));
            }
        } else if self.kafka_tls_ca.is_some() {
            return Err(("kafka_tls_ca", format!("is for ssl or sasl_ssl links; this one is {}", protocol.as_librdkafka())));
        }
        let sasl = [
            ("kafka_sasl_mechanism", &self.kafka_sasl_mechanism),
            ("kafka_sasl_username", &self.kafka_sasl_username),
            ("kafka_sasl_password", &self.kafka_sasl_password),
        ];
        if protocol.uses_sasl() {
            if let Some((k, _)) = sasl.iter().find(|(_, v)| v.as_deref().is_none_or(str::is_empty)) {
                return Err((k, format!("is required with kafka_security_protocol = {:?}", protocol.as_librdkafka())));
            }
            let mechanism: SaslMechanism =
                parse_name(self.kafka_sasl_mechanism.as_deref().unwrap_or_default()).map_err(|e| ("kafka_sasl_mechanism", e))?;
            link.push(("sasl.mechanisms".into(), mechanism.as_librdkafka().to_owned()));
            link.push(("sasl.username".into(), self.kafka_sasl_username.clone().unwrap_or_default()));
            link.push(("sasl.password".into(), self.kafka_sasl_password.clone().unwrap_or_default()));
        } else if let Some((k, _)) = sasl.iter().find(|(_, v)| v.is_some()) {
            return Err((k, format!("is for sasl_plaintext or sasl_ssl links; this one is {}", protocol.as_librdkafka())));
        }
        Ok(link)
    }

    /// This destination's retry policy: its own keys over `global`.
    pub fn retry_policy(&self, global: RetryPolicy) -> RetryPolicy {
        RetryPolicy {
            initial_backoff: self.initial_backoff.unwrap_or(global.initial_backoff),
            max_backoff: self.max_backoff.unwrap_or(global.max_backoff),
            retry_window: self.retry_window.unwrap_or(global.retry_window),
            request_timeout: self.request_timeout.unwrap_or(global.request_timeout),
        }
    }
}

/// One destination filter: when `if` matches an event, apply `action`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// A condition (docs/CONFIG.md); absent = every event.
    #[serde(rename = "if", default)]
    pub condition: Option<String>,
    /// `drop`, `sample`, `allow_fields` or `block_fields`.
    pub action: String,
    /// For `sample`: the fraction kept, 0.0–1.0 (decided by messageId, so a replay decides the same).
    #[serde(default)]
    pub rate: Option<f64>,
    /// For `allow_fields` / `block_fields`: dotted paths such as `properties.email`.
    #[serde(default)]
    pub fields: Vec<String>,
}

/// Which destinations receive a source's events.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConnectionConfig {
    pub source: String,
    pub destinations: Vec<String>,
}

impl SourceConfig {
    /// Check this source alone; errors name `<prefix>.<key>`.
    pub fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        if !valid_id(&self.id) {
            return Err(invalid(format!("{prefix}.id"), format!("{:?} must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'", self.id)));
        }
        // It travels as HTTP Basic's user name: visible ASCII only (a NUL or
        // a non-ASCII byte cannot be sent in a header), no ':' (the separator).
        let plain = !self.write_key.is_empty() && self.write_key.len() <= 256 && self.write_key.bytes().all(|b| b.is_ascii_graphic() && b != b':');
        if !plain && !is_hashed_write_key(&self.write_key) {
            return Err(invalid(
                format!("{prefix}.write_key"),
                "must be 1-256 visible ASCII characters, without ':' or whitespace (or sha256:<64 lowercase hex digits>, the key's SHA-256)",
            ));
        }
        if let Some(w) = &self.workspace {
            if !valid_id(w) {
                return Err(invalid(format!("{prefix}.workspace"), format!("{w:?} must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'")));
            }
        }
        if let Some(f) = &self.function {
            f.validate(format!("{prefix}.function"))?;
        }
        Ok(())
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8088)),
            data_dir: PathBuf::from("./data"),
            max_connections: nz!(1024),
            max_connections_per_client: 256,
            client_error_budget: 20,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
            tls_cert_file: None,
            tls_key_file: None,
            trusted_proxies: Vec::new(),
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self { listen: Some(SocketAddr::from(([127, 0, 0, 1], 8089))), token: None, metrics_token: None, tls_cert_file: None, tls_key_file: None }
    }
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            unknown_write_key: UnknownWriteKey::Reject,
            max_request_bytes: 500 * 1024,
            max_event_bytes: 32 * 1024,
            max_batch_events: nz!(2500),
            default_rate_limit: 0,
            spool_after: Duration::from_secs(2),
            spool_max_events: nz!(5_000_000),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            partitions: 8,
            segment_bytes: 128 * 1024 * 1024,
            retention: Duration::from_secs(7 * 24 * 3600),
            fsync: true,
            output_retention: None,
            backend: LogBackend::Embedded,
            kafka: KafkaConfig::default(),
        }
    }
}

impl Config {
    /// Load `path` (or the sample config when `None`), apply the process's
    /// environment overrides, and validate.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with(path, Flags::default())
    }

    /// Like [`Self::load`], with `flags` (the CLI's overrides, highest
    /// precedence) in place of their keys' values.
    pub fn load_with(path: Option<&Path>, flags: Flags) -> Result<Self, ConfigError> {
        let env: HashMap<String, String> = std::env::vars().collect();
        match path {
            Some(p) => {
                let text = read_config_file(p)?;
                Self::load_text(&text, &format!(" in {}", p.display()), &env, flags)
            }
            None => Self::load_text(SAMPLE_CONFIG, " (built-in sample config/sluice.toml)", &env, flags),
        }
    }

    /// Parse TOML text, apply overrides from `env`, validate.
    pub fn from_toml_with_env(text: &str, origin: &str, env: &HashMap<String, String>) -> Result<Self, ConfigError> {
        Self::load_text(text, origin, env, Flags::default())
    }

    fn load_text(text: &str, origin: &str, env: &HashMap<String, String>, flags: Flags) -> Result<Self, ConfigError> {
        let (mut config, set) = Self::parse(text, origin, env, &flags)?;
        flags.apply(&mut config);
        config.validate().map_err(|e| blame_env(e, &set))?;
        Ok(config)
    }

    /// The config of `text` with `env`'s overrides, and which variable set
    /// which key (`section.key`). An error an override causes names the
    /// variable, not the file.
    /// The keys `flags` set are taken out of the document before it is read:
    /// a flag's value wins, so the value it replaces is never refused.
    fn parse(text: &str, origin: &str, env: &HashMap<String, String>, flags: &Flags) -> Result<(Self, Vec<(String, String)>), ConfigError> {
        let parse_err = |e: toml::de::Error| match keyed(&e) {
            Some((key, problem)) => ConfigError::Value { origin: origin.to_owned(), key, problem },
            None => ConfigError::Parse { origin: origin.to_owned(), source: Box::new(e) },
        };
        let mut doc: toml::Table = toml::from_str(text).map_err(parse_err)?;
        let overrides = env_overrides(env)?;
        if overrides.is_empty() {
            flags.strip(&mut doc);
            return Ok((toml::Value::Table(doc).try_into().map_err(parse_err)?, Vec::new()));
        }
        let base = doc.clone();
        for o in &overrides {
            o.apply(&mut doc)?;
        }
        flags.strip(&mut doc);
        // A key a flag sets is not blamed on the environment.
        let flagged: Vec<String> = flags.keys().map(|(section, key)| format!("{section}.{key}")).collect();
        let set = overrides.iter().map(|o| (o.var.clone(), o.dotted())).filter(|(_, key)| !flagged.contains(key)).collect();
        match toml::Value::Table(doc).try_into() {
            Ok(config) => Ok((config, set)),
            Err(e) => {
                // The file alone first; then the overrides one by one, in
                // order: the first that makes it fail is named.
                let mut doc = base;
                flags.strip(&mut doc);
                toml::Value::Table(doc.clone()).try_into::<Config>().map_err(parse_err)?;
                for o in &overrides {
                    o.apply(&mut doc)?;
                    flags.strip(&mut doc);
                    if let Err(e) = toml::Value::Table(doc.clone()).try_into::<Config>() {
                        let problem = keyed(&e).map_or_else(|| e.to_string(), |(key, problem)| format!("`{key}`: {problem}"));
                        return Err(ConfigError::Env { var: o.var.clone(), problem });
                    }
                }
                Err(parse_err(e))
            }
        }
    }

    /// `[control]`'s and `[cell]`'s rules.
    fn validate_cells(&self) -> Result<(), ConfigError> {
        let c = &self.control;
        for (key, token) in [("control.token", &c.token), ("control.cell_metrics_token", &c.cell_metrics_token), ("cell.token", &self.cell.token)] {
            if token.as_deref().is_some_and(|t| t.len() < 16 || t.chars().any(|c| c.is_whitespace() || c.is_control())) {
                return Err(invalid(key, "must be at least 16 characters, without spaces or control characters"));
            }
        }
        if c.scrape_interval < Duration::from_secs(1) || c.scrape_interval > MAX_SERVER_TIMEOUT {
            return Err(invalid("control.scrape_interval", "must be between 1s and 1 hour"));
        }
        if c.provision_timeout.is_zero() || c.provision_timeout > Duration::from_secs(4 * 3600) {
            return Err(invalid("control.provision_timeout", "must be between 1s and 4 hours"));
        }
        if c.migration_step_interval > Duration::from_secs(3600) {
            return Err(invalid("control.migration_step_interval", "must be at most 1h"));
        }
        if c.provision_command.first().is_some_and(|p| p.trim().is_empty()) {
            return Err(invalid("control.provision_command", "its first element is the program to run"));
        }
        for (tier, t) in [("enterprise", &c.thresholds.enterprise), ("mid", &c.thresholds.mid), ("smb", &c.thresholds.smb)] {
            let key = |k: &str| format!("control.thresholds.{tier}.{k}");
            if t.workspaces == 0 {
                return Err(invalid(key("workspaces"), "must be at least 1"));
            }
            for (k, v) in [("cpu", t.cpu), ("db_connections", t.db_connections)] {
                if !(v > 0.0 && v <= 1.0) {
                    return Err(invalid(key(k), "must be a share above 0 and at most 1 (0.7 = 70%)"));
                }
            }
            for (k, d) in [("consumer_lag", t.consumer_lag), ("ingest_p99", t.ingest_p99)] {
                if d.is_zero() {
                    return Err(invalid(key(k), "must be greater than zero"));
                }
            }
        }
        let cell = &self.cell;
        if let Some(id) = &cell.id {
            if !valid_id(id) {
                return Err(invalid("cell.id", format!("{id:?} must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'")));
            }
        }
        if let Some(url) = &cell.control_url {
            HttpUrl::parse(url).map_err(|e| invalid("cell.control_url", e))?;
            if cell.id.is_none() || cell.token.is_none() {
                return Err(invalid("cell.control_url", "needs cell.id and cell.token (the control plane knows a cell by both)"));
            }
        }
        for (key, d) in [("cell.poll_interval", cell.poll_interval), ("cell.report_interval", cell.report_interval)] {
            if d < Duration::from_millis(100) || d > MAX_SERVER_TIMEOUT {
                return Err(invalid(key, "must be between 100ms and 1 hour"));
            }
        }
        Ok(())
    }

    /// `[router]`'s rules (the keys only a `sluice router` reads).
    fn validate_router(&self) -> Result<(), ConfigError> {
        let r = &self.router;
        if r.admin_listen.is_some_and(|a| a.port() != 0 && a == r.listen) {
            return Err(invalid("router.admin_listen", "is router.listen: the router's admin port needs its own port"));
        }
        // A zero poll would spin on the store; past a second the issue's promise (a change reaches every router within a second) breaks.
        if r.poll_interval < Duration::from_millis(10) || r.poll_interval > Duration::from_secs(1) {
            return Err(invalid("router.poll_interval", "must be between 10ms and 1s"));
        }
        for (key, d) in [("router.forward_timeout", r.forward_timeout), ("router.retry_after", r.retry_after)] {
            if d.as_secs() == 0 || d > MAX_SERVER_TIMEOUT {
                return Err(invalid(key, "must be between 1s and 1 hour"));
            }
        }
        if r.store_connections.get() > 64 {
            return Err(invalid("router.store_connections", "must be at most 64"));
        }
        if r.cache_entries.get() > 10_000_000 {
            return Err(invalid("router.cache_entries", "must be at most 10000000 (about 1 GiB of memory)"));
        }
        if r.max_waiting_lookups.get() > 100_000 {
            return Err(invalid("router.max_waiting_lookups", "must be at most 100000"));
        }
        if r.cutover_wait > Duration::from_secs(120) {
            return Err(invalid("router.cutover_wait", "must be at most 2m (a client's request waits this long)"));
        }
        if r.store.as_ref().is_some_and(|s| s.expose().trim().is_empty()) {
            return Err(invalid("router.store", "must not be empty (remove the key to give the store with --store)"));
        }
        Ok(())
    }

    /// Check every rule serde cannot express; errors name the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let listen = self.server.listen;
        if let Some(admin) = self.admin.listen {
            if admin.port() != 0
                && admin.port() == listen.port()
                && (admin.ip() == listen.ip() || admin.ip().is_unspecified() || listen.ip().is_unspecified())
            {
                return Err(invalid("admin.listen", format!("{admin} is also server.listen ({listen}): the admin port needs its own port")));
            }
        }
        // Whitespace cannot survive an HTTP header (it is trimmed): such a
        // token would refuse every request.
        for (key, token) in [("admin.token", &self.admin.token), ("admin.metrics_token", &self.admin.metrics_token)] {
            if token.as_deref().is_some_and(|t| t.len() < 16 || t.chars().any(|c| c.is_whitespace() || c.is_control())) {
                return Err(invalid(key, "must be at least 16 characters, without spaces or control characters"));
            }
        }
        if self.director.rpc_secret.as_deref().is_some_and(|s| s.len() < MIN_RPC_SECRET_LEN) {
            return Err(invalid("director.rpc_secret", format!("must be at least {MIN_RPC_SECRET_LEN} characters (e.g. `openssl rand -hex 32`)")));
        }
        if self.server.data_dir.as_os_str().is_empty() {
            return Err(invalid("server.data_dir", "must not be empty"));
        }
        for (key, d) in [("server.header_read_timeout", self.server.header_read_timeout), ("server.body_read_timeout", self.server.body_read_timeout)]
        {
            if d.is_zero() {
                return Err(invalid(key, "must be greater than zero"));
            }
        }
        // Added to the clock per connection: an enormous value overflowed it
        // on every request.
        for (key, d) in [
            ("server.header_read_timeout", self.server.header_read_timeout),
            ("server.body_read_timeout", self.server.body_read_timeout),
            ("server.shutdown_grace", self.server.shutdown_grace),
        ] {
            if d > MAX_SERVER_TIMEOUT {
                return Err(invalid(key, "must be at most 1 hour"));
            }
        }
        self.validate_router()?;
        self.validate_cells()?;
        let ing = &self.ingest;
        // Bounded: a request is held in memory whole (and stored events up to twice that).
        if !(1024..=64 << 20).contains(&ing.max_request_bytes) {
            return Err(invalid("ingest.max_request_bytes", "must be between 1 KiB (1024) and 64 MiB (67108864)"));
        }
        // 4 MiB: a job (the event as a JSON string, escaped up to 6x) must
        // fit in one route -> director RPC request (32 MiB).
        if ing.max_event_bytes == 0 || ing.max_event_bytes > ing.max_request_bytes || ing.max_event_bytes > 4 << 20 {
            return Err(invalid("ingest.max_event_bytes", "must be between 1 and ingest.max_request_bytes, and at most 4 MiB (4194304)"));
        }
        if ing.spool_after < Duration::from_millis(10) {
            return Err(invalid("ingest.spool_after", "must be at least 10ms"));
        }
        // Each partition is a writer thread, a dedup worker with its own
        // RocksDB and a route task in every process that owns it.
        if !(1..=256).contains(&self.log.partitions) {
            return Err(invalid("log.partitions", format!("must be between 1 and 256, got {}", self.log.partitions)));
        }
        if self.log.segment_bytes < 4096 {
            return Err(invalid("log.segment_bytes", "must be at least 4096"));
        }
        if self.log.retention.is_zero() {
            return Err(invalid("log.retention", "must be greater than zero"));
        }
        let name = &self.director.name;
        if name.is_empty() || name.len() > 32 || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(invalid("director.name", format!("use 1-32 letters, digits or '_' (it prefixes the director's JobDB tables), got {name:?}")));
        }
        if self.log.backend == LogBackend::Kafka {
            let k = &self.log.kafka;
            if k.primary.bootstrap_servers.trim().is_empty() {
                return Err(invalid("log.kafka.primary.bootstrap_servers", "is required when log.backend = \"kafka\" (host:port[,host:port…])"));
            }
            if let Some(secondary) = &k.secondary {
                if secondary.bootstrap_servers.trim().is_empty() {
                    return Err(invalid("log.kafka.secondary.bootstrap_servers", "is required in [log.kafka.secondary]"));
                }
                if secondary.bootstrap_servers.trim() == k.primary.bootstrap_servers.trim() {
                    return Err(invalid("log.kafka.secondary.bootstrap_servers", "must be another cluster than the primary"));
                }
                if self.ingest.spool_after <= k.failover_slow_after {
                    return Err(invalid(
                        "ingest.spool_after",
                        "must be longer than log.kafka.failover_slow_after, so an append can fail over to the secondary before it is spooled",
                    ));
                }
            }
            if !(1..=32).contains(&k.replication_factor) {
                return Err(invalid("log.kafka.replication_factor", "must be between 1 and 32"));
            }
            // Kafka's topic names: at most 249 of [A-Za-z0-9._-]; the longest topic is `input.secondary`.
            if k.topic_prefix.len() > 200 || !k.topic_prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
                return Err(invalid("log.kafka.topic_prefix", "must be at most 200 of A-Z, a-z, 0-9, '.', '_' or '-'"));
            }
            for (key, d) in [("log.kafka.produce_timeout", k.produce_timeout), ("log.kafka.request_timeout", k.request_timeout)] {
                if d < Duration::from_millis(100) {
                    return Err(invalid(key, "must be at least 100ms"));
                }
            }
        }
        let d = &self.dedup;
        if d.window.is_zero() {
            return Err(invalid("dedup.window", "must be greater than zero"));
        }
        if self.output_retention() < d.window {
            return Err(invalid("log.output_retention", "must be at least dedup.window: the dedup index is rebuilt from what output still holds"));
        }
        if !(1.0..=64.0).contains(&d.bloom_bits_per_key) {
            return Err(invalid("dedup.bloom_bits_per_key", format!("must be between 1 and 64, got {}", d.bloom_bits_per_key)));
        }
        if d.block_cache_bytes < 1 << 20 {
            return Err(invalid("dedup.block_cache_bytes", "must be at least 1048576 (1 MiB)"));
        }
        if d.batch_size.get() > 100_000 {
            return Err(invalid("dedup.batch_size", "must be between 1 and 100000"));
        }
        let mut ids = HashMap::new();
        let mut keys = HashMap::new();
        for (i, s) in self.sources.iter().enumerate() {
            s.validate(&format!("sources[{i}]"))?;
            if let Some(j) = ids.insert(s.id.as_str(), i) {
                return Err(invalid(format!("sources[{i}].id"), format!("duplicate id {:?} (also sources[{j}])", s.id)));
            }
            if let Some(j) = keys.insert(s.write_key.as_str(), i) {
                return Err(invalid(format!("sources[{i}].write_key"), format!("duplicate write key (also sources[{j}])")));
            }
        }
        self.validate_deliver()?;
        let f = &self.functions;
        if f.threads.get() > 64 {
            return Err(invalid("functions.threads", "must be at most 64"));
        }
        if f.time_per_call < Duration::from_millis(1) || f.time_per_call > Duration::from_secs(30) {
            return Err(invalid("functions.time_per_call", "must be between 1ms and 30s"));
        }
        if !(1 << 20..=1 << 30).contains(&f.memory_bytes) {
            return Err(invalid("functions.memory_bytes", "must be between 1 MiB and 1 GiB"));
        }
        self.validate_links()
    }

    /// The TLS and SASL keys of every link: pairs set together, files that
    /// exist, nothing that would quietly leave a link in plain text.
    fn validate_links(&self) -> Result<(), ConfigError> {
        check_cert_pair("server", &self.server.tls_cert_file, &self.server.tls_key_file)?;
        check_cert_pair("admin", &self.admin.tls_cert_file, &self.admin.tls_key_file)?;
        if self.admin.listen.is_none() && self.admin.tls_cert_file.is_some() {
            return Err(invalid("admin.tls_cert_file", "is set but admin.listen is empty (the admin port is off)"));
        }
        let dir = &self.director;
        check_cert_pair("director", &dir.tls_cert_file, &dir.tls_key_file)?;
        check_file("director.tls_ca_file", &dir.tls_ca_file)?;
        if dir.tls_client_auth && (dir.tls_ca_file.is_none() || dir.tls_cert_file.is_none()) {
            return Err(invalid(
                "director.tls_client_auth",
                "needs director.tls_cert_file (the director's certificate) and director.tls_ca_file (the CA of the routes' client certificates)",
            ));
        }
        if let Some(url) = &dir.rpc_url {
            let tls = dir.tls_cert_file.is_some();
            if tls && !url.is_https() {
                return Err(invalid(
                    "director.rpc_url",
                    format!("{:?} is plain text while director.tls_cert_file is set: use https://", url.as_str()),
                ));
            }
            if !tls && url.is_https() {
                return Err(invalid("director.rpc_url", format!("{:?} is https:// but director.tls_cert_file is not set", url.as_str())));
            }
        }
        let k = &self.log.kafka;
        let clusters = [("log.kafka.primary", Some(&k.primary)), ("log.kafka.secondary", k.secondary.as_ref())];
        for (prefix, cluster) in clusters {
            if let Some(c) = cluster {
                check_kafka_cluster(prefix, c)?;
            }
        }
        for name in k.settings.keys() {
            let n = name.trim().to_ascii_lowercase();
            if n == "bootstrap.servers" || n == "metadata.broker.list" {
                return Err(invalid(
                    format!("log.kafka.settings.\"{name}\""),
                    "the brokers are log.kafka.primary.bootstrap_servers (and secondary's), not a setting",
                ));
            }
            if n == "security.protocol" || n.starts_with("ssl.") || n.starts_with("sasl.") || n == "enable.ssl.certificate.verification" {
                return Err(invalid(
                    format!("log.kafka.settings.\"{name}\""),
                    "the link's security is set by the security_protocol, tls_* and sasl_* keys of [log.kafka.primary] / [log.kafka.secondary], not here",
                ));
            }
        }
        if let Some(url) = &self.deliver.jobdb_url {
            check_sql_tls_mode("deliver.jobdb_url", url)?;
        }
        check_file("deliver.archive_s3_ca_file", &self.deliver.archive_s3_ca_file)
    }

    fn validate_deliver(&self) -> Result<(), ConfigError> {
        let d = &self.deliver;
        if d.jobdb_rotate_after.is_zero() {
            return Err(invalid("deliver.jobdb_rotate_after", "must be greater than zero"));
        }
        if d.cache_jobs < 100 {
            return Err(invalid("deliver.cache_jobs", "must be at least 100"));
        }
        check_retry("deliver", &d.retry_policy())?;
        // Doubled per failed probe (capped): a longer one would never probe again.
        if d.circuit_cooldown > Duration::from_secs(24 * 3600) {
            return Err(invalid("deliver.circuit_cooldown", "must be at most 24h"));
        }
        d.check_archive()?;
        let mut ids = HashMap::new();
        let mut names = HashMap::new();
        for (i, dest) in self.destinations.iter().enumerate() {
            let key = |k: &str| format!("destinations[{i}].{k}");
            dest.validate(&format!("destinations[{i}]"), d.retry_policy())?;
            if let Some(j) = ids.insert(dest.id.as_str(), i) {
                return Err(invalid(key("id"), format!("duplicate id {:?} (also destinations[{j}])", dest.id)));
            }
            if let Some(j) = names.insert(dest.integration_name(), i) {
                return Err(invalid(key("name"), format!("integrations name {:?} is also used by destinations[{j}]", dest.integration_name())));
            }
        }
        let sources: HashMap<&str, ()> = self.sources.iter().map(|s| (s.id.as_str(), ())).collect();
        for (i, c) in self.connections.iter().enumerate() {
            if !sources.contains_key(c.source.as_str()) {
                return Err(invalid(format!("connections[{i}].source"), format!("no source has id {:?}", c.source)));
            }
            for (j, dest) in c.destinations.iter().enumerate() {
                if !ids.contains_key(dest.as_str()) {
                    return Err(invalid(format!("connections[{i}].destinations[{j}]"), format!("no destination has id {dest:?}")));
                }
            }
        }
        Ok(())
    }

    /// Where archived jobs go: `deliver.archive_url`, else
    /// `deliver.archive_dir`, else `data_dir/archive`, with the
    /// `archive_s3_*` keys for S3.
    pub fn archive_target(&self) -> ArchiveTarget {
        let d = &self.deliver;
        match &d.archive_url {
            None => ArchiveTarget::Local(self.archive_dir()),
            Some(ArchiveUrl::File(dir)) => ArchiveTarget::Local(dir.clone()),
            Some(ArchiveUrl::S3 { bucket, prefix }) => ArchiveTarget::S3 {
                bucket: bucket.clone(),
                prefix: prefix.clone(),
                endpoint: d.archive_s3_endpoint.as_ref().map(|e| e.as_str().to_owned()),
                region: d.archive_s3_region.clone(),
                ca_file: d.archive_s3_ca_file.clone(),
            },
        }
    }

    /// The local archive directory: a `file://` `deliver.archive_url`,
    /// `deliver.archive_dir`, or `data_dir/archive` (also when the archive
    /// is on S3, where nothing is written locally).
    pub fn archive_dir(&self) -> PathBuf {
        match (&self.deliver.archive_url, &self.deliver.archive_dir) {
            (Some(ArchiveUrl::File(dir)), _) | (None, Some(dir)) => dir.clone(),
            _ => self.server.data_dir.join("archive"),
        }
    }

    /// Retention of the `output` topic: `log.output_retention`, or the dedup window.
    pub fn output_retention(&self) -> Duration {
        self.log.output_retention.unwrap_or(self.dedup.window)
    }
}

/// The workspace of a source or destination that names none (a single-tenant config).
pub const DEFAULT_WORKSPACE: &str = "default";

/// An id of a source, destination, workspace or cell: 1–64 of `A-Z a-z 0-9 _ -`.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// PEM text holding one or more certificates, each block's base64 a DER
/// sequence: a CA that cannot be read is refused at load, not found out
/// at delivery.
fn check_pem_certificates(pem: &str) -> Result<(), String> {
    use base64::Engine as _;
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let mut rest = pem;
    let mut count = 0;
    while let Some(at) = rest.find(BEGIN) {
        let body = &rest[at + BEGIN.len()..];
        let Some(end) = body.find(END) else { return Err(format!("certificate {} has no {END} line", count + 1)) };
        let text: String = body[..end].chars().filter(|c| !c.is_ascii_whitespace()).collect();
        let der =
            base64::engine::general_purpose::STANDARD.decode(text.as_bytes()).map_err(|e| format!("certificate {} is not base64: {e}", count + 1))?;
        if der.len() < 64 || der[0] != 0x30 {
            return Err(format!("certificate {} is not a DER certificate", count + 1));
        }
        count += 1;
        rest = &body[end + END.len()..];
    }
    if count == 0 {
        return Err(format!("must be PEM text holding one or more certificates ({BEGIN})"));
    }
    Ok(())
}

/// The retry policy's bounds: above zero, and at most what a delivery
/// can mean (a longer time added to a clock or multiplied would overflow).
fn check_retry(prefix: &str, p: &RetryPolicy) -> Result<(), ConfigError> {
    const HOUR: u64 = 3600;
    for (k, d, most) in [
        ("initial_backoff", p.initial_backoff, (24 * HOUR, "24h")),
        ("max_backoff", p.max_backoff, (24 * HOUR, "24h")),
        ("retry_window", p.retry_window, (30 * 24 * HOUR, "30 days")),
        ("request_timeout", p.request_timeout, (HOUR, "1h")),
    ] {
        if d.is_zero() && k != "max_backoff" {
            return Err(invalid(format!("{prefix}.{k}"), "must be greater than zero"));
        }
        if d > Duration::from_secs(most.0) {
            return Err(invalid(format!("{prefix}.{k}"), format!("must be at most {}", most.1)));
        }
    }
    if p.max_backoff < p.initial_backoff {
        return Err(invalid(format!("{prefix}.max_backoff"), "must be at least initial_backoff"));
    }
    Ok(())
}

/// Largest config file read: a config is a few KB; a path to a device or a
/// huge file must not be read until memory runs out.
const MAX_CONFIG_BYTES: u64 = 4 << 20;

fn read_config_file(path: &Path) -> Result<String, ConfigError> {
    use std::io::Read;
    let read_err = |source| ConfigError::Read { path: path.to_owned(), source };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1).read_to_end(&mut bytes).map_err(read_err)?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(read_err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {} MiB: not a config file", MAX_CONFIG_BYTES >> 20),
        )));
    }
    String::from_utf8(bytes).map_err(|_| read_err(std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text: not a config file")))
}

/// `key` names a file that can be opened (it is read, and parsed, when the
/// link is set up).
fn check_file(key: &str, path: &Option<PathBuf>) -> Result<(), ConfigError> {
    let Some(path) = path else { return Ok(()) };
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => std::fs::File::open(path).map(drop).map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display()))),
        Ok(_) => Err(invalid(key, format!("{} is not a file", path.display()))),
        Err(e) => Err(invalid(key, format!("cannot read {}: {e}", path.display()))),
    }
}

/// `<prefix>.tls_cert_file` and `<prefix>.tls_key_file`: both or neither, readable.
fn check_cert_pair(prefix: &str, cert: &Option<PathBuf>, key: &Option<PathBuf>) -> Result<(), ConfigError> {
    match (cert, key) {
        (Some(_), None) => return Err(invalid(format!("{prefix}.tls_key_file"), format!("is required with {prefix}.tls_cert_file"))),
        (None, Some(_)) => return Err(invalid(format!("{prefix}.tls_cert_file"), format!("is required with {prefix}.tls_key_file"))),
        _ => {}
    }
    check_file(&format!("{prefix}.tls_cert_file"), cert)?;
    check_file(&format!("{prefix}.tls_key_file"), key)
}

fn check_kafka_cluster(prefix: &str, c: &KafkaCluster) -> Result<(), ConfigError> {
    let key = |k: &str| format!("{prefix}.{k}");
    let protocol = c.security_protocol;
    if !protocol.uses_tls() {
        for (name, set) in
            [("tls_ca_file", c.tls_ca_file.is_some()), ("tls_cert_file", c.tls_cert_file.is_some()), ("tls_key_file", c.tls_key_file.is_some())]
        {
            if set {
                return Err(invalid(key(name), format!("needs security_protocol = \"ssl\" or \"sasl_ssl\" (it is {:?})", protocol.as_librdkafka())));
            }
        }
    }
    check_cert_pair(prefix, &c.tls_cert_file, &c.tls_key_file)?;
    check_file(&key("tls_ca_file"), &c.tls_ca_file)?;
    if protocol.uses_sasl() {
        if c.sasl_mechanism.is_none() {
            return Err(invalid(key("sasl_mechanism"), "is required with a sasl_ security_protocol: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"));
        }
        if c.sasl_username.as_deref().is_none_or(str::is_empty) {
            return Err(invalid(key("sasl_username"), "is required with a sasl_ security_protocol"));
        }
        if c.sasl_password.as_ref().is_none_or(|p| p.expose().is_empty()) {
            let var = format!("SLUICE_{}__SASL_PASSWORD", prefix.to_ascii_uppercase().replace('.', "__"));
            return Err(invalid(key("sasl_password"), format!("is required with a sasl_ security_protocol (set it from the environment: {var})")));
        }
    } else {
        for (name, set) in [
            ("sasl_mechanism", c.sasl_mechanism.is_some()),
            ("sasl_username", c.sasl_username.is_some()),
            ("sasl_password", c.sasl_password.is_some()),
        ] {
            if set {
                return Err(invalid(
                    key(name),
                    format!("needs security_protocol = \"sasl_ssl\" or \"sasl_plaintext\" (it is {:?})", protocol.as_librdkafka()),
                ));
            }
        }
    }
    Ok(())
}

/// The TLS parameters of a JobDB URL, checked so that what the URL asks
/// for is what the driver does: a mode that may fall back to plain text
/// (`prefer`/`allow` for PostgreSQL, `PREFERRED` for MySQL) is refused, and
/// so is any parameter the driver would ignore with a mere notice — an
/// `ssl…` key it does not know (`SSLMODE`, `ssl_mode`), one of the other
/// engine's (`sslrootcert` on MySQL), or a mode given twice — since the
/// link would then quietly be plain text. Files it names must be readable.
fn check_sql_tls_mode(key: &str, url: &JobDbUrl) -> Result<(), ConfigError> {
    let Some((_, query)) = url.as_str().split_once('?') else { return Ok(()) };
    let mysql = url.engine() == JobDbEngine::MySql;
    let (modes, files): (&[&str], &[&str]) = if mysql {
        (&["ssl-mode", "sslmode"], &["ssl-ca", "sslca", "ssl-cert", "ssl-key"])
    } else {
        (&["sslmode", "ssl-mode"], &["sslrootcert", "ssl-root-cert", "ssl-ca", "sslcert", "sslkey"])
    };
    let mut mode_seen: Option<String> = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let (name, value) = (percent_decode(name), percent_decode(value));
        if modes.contains(&name.as_str()) {
            if let Some(first) = &mode_seen {
                return Err(invalid(key, format!("the TLS mode is given twice ({first} and {name}={value}): give it once")));
            }
            mode_seen = Some(format!("{name}={value}"));
            let v = value.to_ascii_lowercase().replace('_', "-");
            match v.as_str() {
                "disable" | "disabled" | "require" | "required" | "verify-ca" | "verify-full" | "verify-identity" => {}
                "prefer" | "preferred" | "allow" => {
                    return Err(invalid(
                        key,
                        format!("{name}={value} may fall back to plain text: use disable, require, verify-ca or verify-full (PostgreSQL), or DISABLED, REQUIRED, VERIFY_CA or VERIFY_IDENTITY (MySQL)"),
                    ))
                }
                _ => return Err(invalid(key, format!("{name}={value:?} is not a TLS mode"))),
            }
        } else if files.contains(&name.as_str()) {
            check_file(&format!("{key} ({name})"), &Some(PathBuf::from(&value)))?;
        } else if name.to_ascii_lowercase().contains("ssl") || name.to_ascii_lowercase().contains("tls") {
            let engine = if mysql { "MySQL/MariaDB" } else { "PostgreSQL" };
            let known: Vec<&str> = modes.iter().chain(files).copied().collect();
            return Err(invalid(
                key,
                format!("{name:?} is not a TLS parameter {engine} URLs take (the driver would ignore it, leaving the link as the rest says); they are: {}", known.join(", ")),
            ));
        }
    }
    Ok(())
}

/// `%XX` escapes decoded (as URL parsers do before a query key is compared).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The command line's overrides of `sluice serve` and the tools (highest
/// precedence), typed by the CLI already.
#[derive(Debug, Clone, Default)]
pub struct Flags {
    /// `--listen`: `server.listen`.
    pub listen: Option<SocketAddr>,
    /// `--data-dir`: `server.data_dir`.
    pub data_dir: Option<PathBuf>,
    /// `--admin-listen`: `admin.listen`; `Some(None)` turns the admin port off.
    pub admin_listen: Option<Option<SocketAddr>>,
}

impl Flags {
    /// The keys set, as (table, key).
    fn keys(&self) -> impl Iterator<Item = (&'static str, &'static str)> {
        [
            (self.listen.is_some(), ("server", "listen")),
            (self.data_dir.is_some(), ("server", "data_dir")),
            (self.admin_listen.is_some(), ("admin", "listen")),
        ]
        .into_iter()
        .filter_map(|(set, key)| set.then_some(key))
    }

    /// Take the keys set out of `doc` (the file with the environment's overrides).
    fn strip(&self, doc: &mut toml::Table) {
        for (table, key) in self.keys() {
            if let Some(t) = doc.get_mut(table).and_then(toml::Value::as_table_mut) {
                t.remove(key);
            }
        }
    }

    fn apply(self, config: &mut Config) {
        if let Some(listen) = self.listen {
            config.server.listen = listen;
        }
        if let Some(dir) = self.data_dir {
            config.server.data_dir = dir;
        }
        if let Some(admin) = self.admin_listen {
            config.admin.listen = admin;
        }
    }
}

/// A value serde refused, split into its key and the problem, so it reads
/// like a validation error (`` `server.listen`: … ``). toml names the key on
/// a last line, `` in `server.listen` ``, for errors of a value (those carry
/// no span: the document was parsed already); anything else is `None` and
/// shown as toml wrote it.
fn keyed(e: &toml::de::Error) -> Option<(String, String)> {
    if e.span().is_some() {
        return None;
    }
    let text = e.to_string();
    let (problem, key) = text.trim_end().rsplit_once("\nin `")?;
    let key = key.strip_suffix('`')?;
    Some((key.to_owned(), problem.trim_end().to_owned()))
}

/// A validation error about a key an environment variable set (`set`:
/// variable and `section.key`) names the variable.
fn blame_env(e: ConfigError, set: &[(String, String)]) -> ConfigError {
    let ConfigError::Invalid { key, problem } = e else { return e };
    let by = set.iter().rev().find(|(_, k)| key == *k || key.starts_with(&format!("{k}.")) || key.starts_with(&format!("{k}[")));
    match by {
        Some((var, _)) => ConfigError::Env { var: var.clone(), problem: format!("`{key}`: {problem}") },
        None => ConfigError::Invalid { key, problem },
    }
}

/// One environment override: `SLUICE_SERVER__LISTEN=0.0.0.0:9000` sets
/// `server.listen`; `SLUICE_LOG__KAFKA__PRIMARY__SASL_PASSWORD` sets
/// `log.kafka.primary.sasl_password` (tables on the way are created).
struct EnvOverride {
    var: String,
    /// The key's path: a section, tables, the key (at least two parts).
    path: Vec<String>,
    value: toml::Value,
}

/// The deepest key an override can name (`log.kafka.primary.sasl_password` is 4).
const MAX_ENV_DEPTH: usize = 6;

impl EnvOverride {
    fn dotted(&self) -> String {
        self.path.join(".")
    }

    fn apply(&self, doc: &mut toml::Table) -> Result<(), ConfigError> {
        let (key, tables) = self.path.split_last().expect("at least two parts");
        let mut table = doc;
        for (i, name) in tables.iter().enumerate() {
            table = table
                .entry(name.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .ok_or_else(|| ConfigError::Env { var: self.var.clone(), problem: format!("`{}` is not a table", self.path[..=i].join(".")) })?;
        }
        table.insert(key.clone(), self.value.clone());
        Ok(())
    }
}

/// The config's tables an environment override can set (`SLUICE_<SECTION>__<KEY>`).
const ENV_SECTIONS: &[&str] = &["server", "admin", "ingest", "log", "dedup", "deliver", "director", "router", "control", "cell"];

/// `SLUICE_*` variables Sluice reads itself that begin like a misspelt
/// override (a section name, then one underscore) but are not overrides.
const ENV_NOT_OVERRIDES: &[&str] = &["SLUICE_LOG_FORMAT"];

/// A variable that looks like an override misspelt with one underscore
/// after the section (`SLUICE_SERVER_LISTEN`): the right spelling
/// (`SLUICE_SERVER__LISTEN`). Variables without a section name after
/// `SLUICE_` (`SLUICE_TEST_*`, `SLUICE_SOAK_*`, ...) and those in
/// [`ENV_NOT_OVERRIDES`] are not overrides and are left alone.
fn misspelt_override(name: &str) -> Option<String> {
    let rest = name.strip_prefix("SLUICE_")?;
    if name.contains("__") || ENV_NOT_OVERRIDES.iter().any(|n| n.eq_ignore_ascii_case(name)) {
        return None;
    }
    ENV_SECTIONS.iter().find_map(|section| {
        let head = rest.get(..section.len())?;
        let key = rest[section.len()..].strip_prefix('_')?;
        (head.eq_ignore_ascii_case(section) && !key.is_empty()).then(|| format!("SLUICE_{head}__{key}"))
    })
}

/// Keys whose value an environment override always sets as the raw string
/// (never read as a TOML literal): secrets and URLs. A password of digits
/// must not become a number, and so be echoed in a type error, nor lose
/// quotes or a `#…` tail to TOML's syntax.
const ENV_RAW_KEYS: &[&str] =
    &["sasl_password", "sasl_username", "token", "metrics_token", "rpc_secret", "jobdb_url", "rpc_url", "bootstrap_servers", "store"];

/// The overrides in `env`, sorted by name. The value is read as a TOML
/// literal when it is one (numbers, booleans), else as a string; the keys
/// of [`ENV_RAW_KEYS`] always as the string. A misspelt override
/// (`SLUICE_SERVER_LISTEN`) is an error, not ignored.
fn env_overrides(env: &HashMap<String, String>) -> Result<Vec<EnvOverride>, ConfigError> {
    let mut misspelt: Vec<_> = env.keys().filter_map(|k| Some((k, misspelt_override(k)?))).collect();
    misspelt.sort();
    if let Some((name, right)) = misspelt.into_iter().next() {
        return Err(ConfigError::Env {
            var: name.clone(),
            problem: format!("not a config override: they have the form SLUICE_<SECTION>__<KEY>, with two underscores (did you mean {right}?)"),
        });
    }
    let mut vars: Vec<_> = env.iter().filter(|(k, _)| k.starts_with("SLUICE_") && k.contains("__")).collect();
    vars.sort();
    let mut out = Vec::with_capacity(vars.len());
    for (name, raw) in vars {
        let path = &name["SLUICE_".len()..];
        let malformed = || ConfigError::Env {
            var: name.clone(),
            problem: format!(
                "environment overrides have the form SLUICE_<SECTION>__<KEY> (or SLUICE_<SECTION>__<TABLE>__<KEY>, at most {MAX_ENV_DEPTH} parts)"
            ),
        };
        // `SLUICE__X` passes the filter (its `__` touches the prefix) but has
        // an empty section (found by fuzzing; was a panic).
        let parts: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
        if parts.len() < 2 || parts.len() > MAX_ENV_DEPTH || parts.iter().any(String::is_empty) {
            return Err(malformed());
        }
        let raw_key = parts.last().is_some_and(|k| ENV_RAW_KEYS.contains(&k.as_str()));
        let value = (!raw_key)
            .then(|| toml::from_str::<toml::Table>(&format!("v = {raw}")).ok().and_then(|mut t| t.remove("v")))
            .flatten()
            .unwrap_or_else(|| toml::Value::String(raw.clone()));
        out.push(EnvOverride { var: name.clone(), path: parts, value });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_with_env(text, "", &HashMap::new())
    }

    #[test]
    fn kafka_destinations_parse_their_url_and_refuse_other_types_keys() {
        let dest = |keys: &str| load(&format!("[[destinations]]\nid = \"k\"\n{keys}\n"));
        let c = dest("type = \"kafka\"\nurl = \"kafka://127.0.0.1:9092,b2:9093/events.v1\"\nkafka_key = \"user_id\"").unwrap();
        let d = &c.destinations[0];
        assert_eq!(
            d.kafka_target(),
            Some(KafkaTarget {
                bootstrap: "127.0.0.1:9092,b2:9093".into(),
                topic: "events.v1".into(),
                key: KafkaKey::UserId,
                link: vec![("security.protocol".into(), "plaintext".into())]
            })
        );
        assert_eq!(d.batch_limits().map(|b| (b.max_events, b.max_age)), Some((500, Duration::ZERO)));
        assert_eq!(dest("type = \"kafka\"\nurl = \"kafka://h:1/t\"").unwrap().destinations[0].kafka_target().unwrap().key, KafkaKey::MessageId);
        assert!(dest("type = \"kafka\"\nurl = \"kafka://[::1]:9092,b_2.example:1/t\"").is_ok());
        // A DER sequence's shape (what the check at load reads; OpenSSL reads the rest).
        let der = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [0x30u8; 96]);
        let secure = dest(&format!(
            "type = \"kafka\"\nurl = \"kafka://b:9096/t\"\nkafka_security_protocol = \"sasl_ssl\"\nkafka_sasl_mechanism = \"SCRAM-SHA-512\"\n\
             kafka_sasl_username = \"u\"\nkafka_sasl_password = \"hunter2\"\nkafka_tls_ca = \"-----BEGIN CERTIFICATE-----\\n{der}\\n-----END CERTIFICATE-----\\n\"",
        ))
        .unwrap();
        let target = secure.destinations[0].kafka_target().unwrap();
        let link: HashMap<&str, &str> = target.link.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!((link["security.protocol"], link["sasl.mechanisms"], link["sasl.password"]), ("sasl_ssl", "SCRAM-SHA-512", "hunter2"));
        assert_eq!(link["ssl.endpoint.identification.algorithm"], "https");
        assert!(link["ssl.ca.pem"].starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(!format!("{target:?}").contains("hunter2"), "Debug hides the password");
        for (keys, named) in [
            ("type = \"kafka\"\nurl = \"http://h:1/t\"", "destinations[0].url"),
            ("type = \"kafka\"\nurl = \"kafka://h:1\"", "no topic"),
            ("type = \"kafka\"\nurl = \"kafka://h/t\"", "no port"),
            ("type = \"kafka\"\nurl = \"kafka:///t\"", "no broker"),
            ("type = \"kafka\"\nurl = \"kafka://u@h:1/t\"", "user info"),
            ("type = \"kafka\"\nurl = \"kafka://h:1/a b\"", "topic"),
            ("type = \"kafka\"\nurl = \"kafka://h:1/..\"", "topic"),
            ("type = \"kafka\"\nurl = \"kafka://h:99999/t\"", "port"),
            ("type = \"kafka\"\nurl = \"kafka://::1:9092/t\"", "IPv6"),
            ("type = \"kafka\"\nurl = \"kafka://h:1:2/t\"", "host"),
            ("type = \"kafka\"\nurl = \"kafka://-h:1/t\"", "host"),
            ("type = \"kafka\"\nurl = \"kafka://h:+1/t\"", "digits"),
            ("type = \"kafka\"\nurl = \"kafka://h:1/__consumer_offsets\"", "internal"),
            ("type = \"kafka\"\nurl = \"kafka://h:1/t\"\nkafka_key = \"email\"", "destinations[0].kafka_key"),
            ("type = \"kafka\"\nurl = \"kafka://u:pw@h:1/t\"", "kafka://…@h:1/t"),
            ("type = \"kafka\"\nurl = \"kafka://h:1\\u0000/t\"", "control character"),
            ("type = \"kafka\"\nurl = \"kafka://h:1/t\"\nkafka_security_protocol = \"tls\"", "destinations[0].kafka_security_protocol"),
            ("type = \"kafka\"\nurl = \"kafka://h:1/t\"\nkafka_security_protocol = \"sasl_ssl\"", "destinations[0].kafka_sasl_mechanism"),
            (
                "type = \"kafka\"\nurl = \"kafka://h:1/t\"\nkafka_security_protocol = \"sasl_ssl\"\nkafka_sasl_mechanism = \"GSSAPI\"\nkafka_sasl_username = \"u\"\nkafka_sasl_password = \"p\"",
                "GSSAPI",
            ),
            ("type = \"kafka\"\nurl = \"kafka://h:1/t\"\nkafka_tls_ca = \"-----BEGIN CERTIFICATE-----\"", "destinations[0].kafka_tls_ca"),
            // Markers around what is not a certificate: refused at load, not found out at delivery.
            (
                "type = \"kafka\"\nurl = \"kafka://h:1/t\"\nkafka_security_protocol = \"ssl\"\n\
                 kafka_tls_ca = \"-----BEGIN CERTIFICATE-----\\nnot*base64!\\n-----END CERTIFICATE-----\"",
                "not base64",
            ),
            (
                "type = \"kafka\"\nurl = \"kafka://h:1/t\"\nkafka_security_protocol = \"ssl\"\n\
                 kafka_tls_ca = \"-----BEGIN CERTIFICATE-----\\nQUJD\\n-----END CERTIFICATE-----\"",
                "not a DER certificate",
            ),
            (
                "type = \"kafka\"\nurl = \"kafka://h:1/t\"\nkafka_security_protocol = \"ssl\"\nkafka_tls_ca = \"-----BEGIN CERTIFICATE-----\\nQUJD\"",
                "no -----END CERTIFICATE-----",
            ),
            ("type = \"kafka\"\nurl = \"kafka://h:1/t\"\nkafka_security_protocol = \"ssl\"\nkafka_tls_ca = \"/etc/ca.pem\"", "PEM text"),
            ("type = \"kafka\"\nurl = \"kafka://h:1/t\"\nkafka_security_protocol = \"ssl\"\nkafka_sasl_password = \"p\"", "destinations[0].kafka_sasl_password"),
            ("url = \"http://h:1/t\"\nkafka_security_protocol = \"ssl\"", "destinations[0].kafka_security_protocol"),
            ("type = \"kafka\"\nurl = \"kafka://h:1/t\"\nsecret = \"s\"", "destinations[0].secret"),
            ("type = \"kafka\"\nurl = \"kafka://h:1/t\"\nbatch_max_bytes = 2048", "destinations[0].batch_max_bytes"),
            ("type = \"kafka\"\nurl = \"kafka://h:1/t\"\nbatch_max_events = 0", "destinations[0].batch_max_events"),
            ("url = \"http://h:1/t\"\nkafka_key = \"user_id\"", "destinations[0].kafka_key"),
            ("type = \"batch_webhook\"\nurl = \"http://h:1/t\"\nkafka_key = \"user_id\"", "destinations[0].kafka_key"),
            ("url = \"kafka://h:1/t\"", "http://"),
            ("type = \"smoke_signals\"\nurl = \"http://h:1/t\"", "unknown destination type"),
        ] {
            let err = dest(keys).unwrap_err().to_string();
            assert!(err.contains(named), "{keys}: {err}");
        }
        let brokers: Vec<String> = (0..101).map(|i| format!("b{i}:9092")).collect();
        let err = dest(&format!("type = \"kafka\"\nurl = \"kafka://{}/t\"", brokers.join(","))).unwrap_err().to_string();
        assert!(err.contains("more than 100 bootstrap brokers"), "{err}");
    }

    #[test]
    fn postgres_destinations_take_a_postgres_url_and_batch_keys_only() {
        let dest = |keys: &str| load(&format!("[[destinations]]\nid = \"w\"\n{keys}\n"));
        let c = dest("type = \"postgres\"\nurl = \"postgres://u:p@db.example:5432/warehouse?sslmode=verify-full\"").unwrap();
        let d = &c.destinations[0];
        assert!(d.is_postgres() && d.kafka_target().is_none());
        assert_eq!(d.batch_limits().map(|b| (b.max_events, b.max_age)), Some((5000, Duration::from_secs(1))));
        assert!(dest("type = \"postgres\"\nurl = \"postgresql://h/db\"\nbatch_max_events = 5000\nbatch_max_age = \"5s\"").is_ok());
        for (keys, named) in [
            ("type = \"postgres\"\nurl = \"http://h/db\"", "not a postgres:// URL"),
            ("type = \"postgres\"\nurl = \"postgres://h:99999/db\"", "port"),
            ("type = \"postgres\"\nurl = \"postgres://h/db\"\nsecret = \"s\"", "destinations[0].secret"),
            ("type = \"postgres\"\nurl = \"postgres://h/db\"\nkafka_key = \"user_id\"", "destinations[0].kafka_key"),
            ("type = \"postgres\"\nurl = \"postgres://h/db\"\nbatch_max_bytes = 2048", "destinations[0].batch_max_bytes"),
            ("url = \"postgres://h/db\"", "http://"),
        ] {
            let err = dest(keys).unwrap_err().to_string();
            assert!(err.contains(named), "{keys}: {err}");
        }
        // The password is not in the error.
        let err = dest("type = \"postgres\"\nurl = \"postgres://u:hunter2@h:99999/db\"").unwrap_err().to_string();
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn s3_destinations_take_a_bucket_url_and_their_server_keys() {
        let dest = |keys: &str| load(&format!("[[destinations]]\nid = \"l\"\n{keys}\n"));
        let c =
            dest("type = \"s3\"\nurl = \"s3://my-lake/events/raw/\"\ns3_endpoint = \"http://127.0.0.1:9000/\"\ns3_region = \"eu-west-1\"").unwrap();
        assert_eq!(
            c.destinations[0].s3_target(),
            Some(S3Target {
                bucket: "my-lake".into(),
                prefix: "events/raw".into(),
                endpoint: Some("http://127.0.0.1:9000".into()),
                region: Some("eu-west-1".into()),
                credentials: None,
                format: LakeFormat::Ndjson,
            })
        );
        let parquet = dest("type = \"s3\"\nurl = \"s3://lake\"\ns3_format = \"parquet\"").unwrap();
        assert_eq!(parquet.destinations[0].s3_target().map(|t| t.format), Some(LakeFormat::Parquet));
        assert_eq!(c.destinations[0].batch_limits().map(|b| (b.max_events, b.max_age)), Some((10_000, Duration::from_secs(10))));
        assert_eq!(dest("type = \"s3\"\nurl = \"s3://lake\"").unwrap().destinations[0].s3_target().unwrap().prefix, "");
        for (keys, named) in [
            ("type = \"s3\"\nurl = \"file:///tmp/x\"", "not an s3://"),
            ("type = \"s3\"\nurl = \"s3://Upper/x\"", "bucket"),
            ("type = \"s3\"\nurl = \"s3://lake/a/../b\"", "prefix"),
            ("type = \"s3\"\nurl = \"s3://lake\"\ns3_endpoint = \"ftp://h\"", "destinations[0].s3_endpoint"),
            ("type = \"s3\"\nurl = \"s3://lake\"\ns3_region = \"eu west\"", "destinations[0].s3_region"),
            // The region is part of AWS's host name: nothing that could point it elsewhere.
            ("type = \"s3\"\nurl = \"s3://lake\"\ns3_region = \"x@127.0.0.1:41203/\"", "destinations[0].s3_region"),
            ("type = \"s3\"\nurl = \"s3://lake\"\ns3_region = \"us-east-1/../../x\"", "destinations[0].s3_region"),
            ("type = \"s3\"\nurl = \"s3://lake\"\ns3_region = \"127.0.0.1:9000\"", "destinations[0].s3_region"),
            ("type = \"s3\"\nurl = \"s3://lake\"\nsecret = \"s\"", "destinations[0].secret"),
            ("type = \"s3\"\nurl = \"http://h/x\"", "not an s3://"),
            ("type = \"s3\"\nurl = \"s3://lake..x/p\"", "bucket name"),
            ("type = \"s3\"\nurl = \"s3://192.168.1.1/p\"", "bucket name"),
            ("type = \"s3\"\nurl = \"s3://lake/a%20b\"", "prefix"),
            ("type = \"s3\"\nurl = \"s3://lake/é\"", "prefix"),
            ("type = \"s3\"\nurl = \"s3://lake\"\ns3_endpoint = \"http://h:9000/path\"", "scheme://host[:port]"),
            ("type = \"s3\"\nurl = \"s3://lake\"\ns3_endpoint = \"http://u:pw@h:9000\"", "destinations[0].s3_endpoint"),
            ("type = \"s3\"\nurl = \"s3://lake\"\ns3_access_key_id = \"AK\"", "go together"),
            ("url = \"http://h/x\"\ns3_region = \"eu-west-1\"", "destinations[0].s3_region"),
            ("type = \"s3\"\nurl = \"s3://lake\"\ns3_format = \"csv\"", "destinations[0].s3_format"),
            ("url = \"https://h.example/x\"\nsecret = \"\"", "destinations[0].secret"),
            ("type = \"kafka\"\nurl = \"kafka://h:1/t\"\ns3_format = \"parquet\"", "destinations[0].s3_format"),
        ] {
            let err = dest(keys).unwrap_err().to_string();
            assert!(err.contains(named), "{keys}: {err}");
        }
    }

    #[test]
    fn sample_config_is_valid() {
        let c = load(SAMPLE_CONFIG).expect("sample config");
        assert!(!c.sources.is_empty());
    }

    #[test]
    fn empty_file_gives_working_defaults() {
        let c = load("").unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8088");
        assert_eq!(c.log.partitions, 8);
        assert_eq!(c.log.retention, Duration::from_secs(7 * 86400));
        assert_eq!(c.ingest.max_batch_events.get(), 2500);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = load("[server]\nlissten = \"127.0.0.1:1\"\n").unwrap_err().to_string();
        assert!(err.contains("lissten"), "{err}");
    }

    #[test]
    fn bad_address_names_the_key() {
        let err = load("[server]\nlisten = \"nowhere\"\n").unwrap_err().to_string();
        assert!(err.contains("server.listen") && err.contains("nowhere"), "{err}");
    }

    #[test]
    fn duplicate_write_key_names_the_source() {
        let err = load("[[sources]]\nid = \"a\"\nwrite_key = \"k\"\n[[sources]]\nid = \"b\"\nwrite_key = \"k\"\n").unwrap_err().to_string();
        assert!(err.contains("sources[1].write_key"), "{err}");
    }

    #[test]
    fn bad_source_id_is_named() {
        let err = load("[[sources]]\nid = \"a/b\"\nwrite_key = \"k\"\n").unwrap_err().to_string();
        assert!(err.contains("sources[0].id"), "{err}");
    }

    #[test]
    fn env_overrides_file() {
        let env = HashMap::from([
            ("SLUICE_SERVER__LISTEN".to_string(), "127.0.0.1:9999".to_string()),
            ("SLUICE_LOG__PARTITIONS".to_string(), "3".to_string()),
            ("SLUICE_LOG__RETENTION".to_string(), "2d".to_string()),
        ]);
        let c = Config::from_toml_with_env("[server]\nlisten = \"127.0.0.1:1\"\n", "", &env).unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:9999");
        assert_eq!(c.log.partitions, 3);
        assert_eq!(c.log.retention, Duration::from_secs(2 * 86400));
    }

    #[test]
    fn misspelt_env_override_is_an_error_naming_the_right_spelling() {
        for (var, right) in [
            ("SLUICE_SERVER_LISTEN", "SLUICE_SERVER__LISTEN"),
            ("SLUICE_ADMIN_TOKEN", "SLUICE_ADMIN__TOKEN"),
            ("SLUICE_LOG_PARTITIONS", "SLUICE_LOG__PARTITIONS"),
            ("SLUICE_DELIVER_MAX_ATTEMPTS", "SLUICE_DELIVER__MAX_ATTEMPTS"),
            ("SLUICE_DIRECTOR_RPC_SECRET", "SLUICE_DIRECTOR__RPC_SECRET"),
        ] {
            let env = HashMap::from([(var.to_string(), "x".to_string())]);
            let err = Config::from_toml_with_env("", "", &env).unwrap_err().to_string();
            assert!(err.contains(var) && err.contains(right), "{var}: {err}");
        }
        // The right spelling still works.
        let env = HashMap::from([("SLUICE_SERVER__LISTEN".to_string(), "127.0.0.1:9999".to_string())]);
        assert_eq!(Config::from_toml_with_env("", "", &env).unwrap().server.listen.to_string(), "127.0.0.1:9999");
    }

    #[test]
    fn sluice_variables_that_are_not_overrides_are_left_alone() {
        let names = [
            "SLUICE_LOG_FORMAT",
            "SLUICE_CONFIG",
            "SLUICE_OTLP_ENDPOINT",
            "SLUICE_TEST_KAFKA",
            "SLUICE_REQUIRE_KAFKA",
            "SLUICE_SOAK_SECONDS",
            "SLUICE_BENCH_EVENTS",
            "SLUICE_FUZZ_SECONDS",
            "SLUICE_CACHE",
            "SLUICE_PYTHON",
            "SLUICE_NODE_MODULES",
            "SLUICE_CRASH_AT",
            "SLUICE_RESTART_COUNT",
            "SLUICE_SERVER",
            "SLUICE_SERVERLESS",
            "SLUICE_LOGGING",
            "SLUICE_DEDUPE",
            "OTHER_SERVER_LISTEN",
        ];
        for name in names {
            assert_eq!(misspelt_override(name), None, "{name}");
        }
        let env: HashMap<_, _> = names.iter().map(|n| (n.to_string(), "1".to_string())).collect();
        Config::from_toml_with_env("", "", &env).unwrap();
    }

    /// A kafka-mode config with `[log.kafka.primary]` lines `primary`.
    fn kafka(primary: &str, env: &[(&str, &str)]) -> Result<Config, String> {
        let text = format!("[log]\nbackend = \"kafka\"\n[log.kafka.primary]\nbootstrap_servers = \"b:9092\"\n{primary}");
        let env: HashMap<String, String> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Config::from_toml_with_env(&text, "", &env).map_err(|e| e.to_string())
    }

    #[test]
    fn nested_env_overrides_reach_tables_at_any_depth() {
        let sasl = "security_protocol = \"sasl_ssl\"\nsasl_mechanism = \"SCRAM-SHA-512\"\nsasl_username = \"u\"\n";
        let c = kafka(sasl, &[("SLUICE_LOG__KAFKA__PRIMARY__SASL_PASSWORD", "s3cret"), ("SLUICE_LOG__KAFKA__REQUEST_TIMEOUT", "3s")]).unwrap();
        assert_eq!(c.log.kafka.primary.sasl_password.as_ref().map(Secret::expose), Some("s3cret"));
        assert_eq!(c.log.kafka.request_timeout, Duration::from_secs(3));
        assert!(!format!("{c:?}").contains("s3cret"), "Debug never shows a secret");
        // A whole table from the environment (created on the way).
        let c = kafka("", &[("SLUICE_LOG__KAFKA__SECONDARY__BOOTSTRAP_SERVERS", "other:9092")]).unwrap();
        assert_eq!(c.log.kafka.secondary.unwrap().bootstrap_servers, "other:9092");
        // The password missing: the error names the variable to set.
        let err = kafka(sasl, &[]).unwrap_err();
        assert!(err.contains("log.kafka.primary.sasl_password") && err.contains("SLUICE_LOG__KAFKA__PRIMARY__SASL_PASSWORD"), "{err}");
        // An unknown nested key, a key under a non-table, an empty part, too deep.
        let err = kafka("", &[("SLUICE_LOG__KAFKA__PRIMARY__SASL_PASWORD", "x")]).unwrap_err();
        assert!(err.contains("SLUICE_LOG__KAFKA__PRIMARY__SASL_PASWORD") && err.contains("sasl_pasword"), "{err}");
        let err = kafka("", &[("SLUICE_LOG__PARTITIONS__X", "1")]).unwrap_err();
        assert!(err.contains("SLUICE_LOG__PARTITIONS__X") && err.contains("log.partitions"), "{err}");
        let text = "[log]\npartitions = 2\n";
        let env = HashMap::from([("SLUICE_LOG__PARTITIONS__X".to_string(), "1".to_string())]);
        let err = Config::from_toml_with_env(text, "", &env).unwrap_err().to_string();
        assert!(err.contains("SLUICE_LOG__PARTITIONS__X") && err.contains("`log.partitions` is not a table"), "{err}");
        for var in ["SLUICE_LOG____X", "SLUICE_A__B__C__D__E__F__G"] {
            let err = kafka("", &[(var, "1")]).unwrap_err();
            assert!(err.contains(var) && err.contains("SLUICE_<SECTION>__<KEY>"), "{var}: {err}");
        }
    }

    #[test]
    fn kafka_link_keys_must_fit_the_protocol() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "x").unwrap();
        let ca = ca.display();
        let pw = [("SLUICE_LOG__KAFKA__PRIMARY__SASL_PASSWORD", "pw")];
        kafka(&format!("security_protocol = \"ssl\"\ntls_ca_file = \"{ca}\"\n"), &[]).unwrap();
        kafka("security_protocol = \"sasl_ssl\"\nsasl_mechanism = \"PLAIN\"\nsasl_username = \"u\"\n", &pw).unwrap();
        let cases: &[(&str, &str)] = &[
            // TLS keys on a plain-text link would be ignored: refused.
            (&format!("tls_ca_file = \"{ca}\"\n"), "log.kafka.primary.tls_ca_file"),
            ("security_protocol = \"sasl_plaintext\"\nsasl_username = \"u\"\n", "log.kafka.primary.sasl_mechanism"),
            ("security_protocol = \"sasl_ssl\"\nsasl_mechanism = \"SCRAM-SHA-256\"\n", "log.kafka.primary.sasl_username"),
            ("sasl_username = \"u\"\n", "log.kafka.primary.sasl_username"),
            ("security_protocol = \"ssl\"\ntls_ca_file = \"/no/such/ca.pem\"\n", "log.kafka.primary.tls_ca_file"),
            (&format!("security_protocol = \"ssl\"\ntls_cert_file = \"{ca}\"\n"), "log.kafka.primary.tls_key_file"),
            ("security_protocol = \"tls\"\n", "security_protocol"),
            ("security_protocol = \"sasl_ssl\"\nsasl_mechanism = \"GSSAPI\"\n", "sasl_mechanism"),
        ];
        for (primary, key) in cases {
            let err = kafka(primary, &pw).unwrap_err();
            assert!(err.contains(key), "{primary}: {err}");
        }
        // `settings` cannot change the link's security behind its keys' back.
        for setting in
            ["security.protocol", "ssl.ca.location", "sasl.password", "enable.ssl.certificate.verification", " SSL.endpoint.identification.algorithm"]
        {
            let text = format!("[log.kafka.settings]\n\"{setting}\" = \"x\"\n");
            let err = Config::from_toml_with_env(&text, "", &HashMap::new()).unwrap_err().to_string();
            assert!(err.contains("log.kafka.settings") && err.contains("security_protocol"), "{setting}: {err}");
        }
    }

    #[test]
    fn tls_keys_of_servers_databases_and_s3_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f.pem");
        std::fs::write(&f, "x").unwrap();
        let f = f.display();
        let load = |text: &str| Config::from_toml_with_env(text, "", &HashMap::new()).map_err(|e| e.to_string());
        load(&format!("[server]\ntls_cert_file = \"{f}\"\ntls_key_file = \"{f}\"\n")).unwrap();
        load(&format!("[director]\ntls_cert_file = \"{f}\"\ntls_key_file = \"{f}\"\ntls_ca_file = \"{f}\"\ntls_client_auth = true\n")).unwrap();
        load(&format!("[deliver]\njobdb_url = \"postgres://h/db?sslmode=verify-full&sslrootcert={f}\"\n")).unwrap();
        load("[deliver]\njobdb_url = \"mysql://h/db?ssl-mode=VERIFY_IDENTITY\"\n").unwrap();
        let cases: &[(String, &str)] = &[
            (format!("[server]\ntls_cert_file = \"{f}\"\n"), "server.tls_key_file"),
            (format!("[admin]\ntls_key_file = \"{f}\"\n"), "admin.tls_cert_file"),
            ("[admin]\ntls_cert_file = \"/nope.pem\"\ntls_key_file = \"/nope.key\"\n".into(), "admin.tls_cert_file"),
            (format!("[director]\ntls_cert_file = \"{f}\"\ntls_key_file = \"{f}\"\ntls_client_auth = true\n"), "director.tls_client_auth"),
            (format!("[director]\ntls_cert_file = \"{f}\"\ntls_key_file = \"{f}\"\nrpc_url = \"http://d:8090\"\n"), "director.rpc_url"),
            ("[director]\nrpc_url = \"https://d:8090\"\n".into(), "director.rpc_url"),
            (format!("[admin]\nlisten = \"\"\ntls_cert_file = \"{f}\"\ntls_key_file = \"{f}\"\n"), "admin.listen is empty"),
            ("[deliver]\njobdb_url = \"postgres://h/db?sslmode=prefer\"\n".into(), "plain text"),
            ("[deliver]\njobdb_url = \"mysql://h/db?ssl-mode=PREFERRED\"\n".into(), "plain text"),
            ("[deliver]\njobdb_url = \"postgres://h/db?sslmode=allow\"\n".into(), "deliver.jobdb_url"),
            ("[deliver]\njobdb_url = \"postgres://h/db?sslmode=sure\"\n".into(), "not a TLS mode"),
            (format!("[deliver]\narchive_s3_ca_file = \"{f}\"\n"), "deliver.archive_s3_ca_file"),
            (
                format!("[deliver]\narchive_url = \"s3://bkt\"\narchive_s3_endpoint = \"http://s3:9000\"\narchive_s3_ca_file = \"{f}\"\n"),
                "deliver.archive_s3_ca_file",
            ),
        ];
        for (text, expect) in cases {
            let err = load(text).unwrap_err();
            assert!(err.contains(expect), "{text}: {err}");
        }
    }

    #[test]
    fn secrets_from_the_environment_are_taken_as_written() {
        let sasl = "security_protocol = \"sasl_ssl\"\nsasl_mechanism = \"PLAIN\"\nsasl_username = \"u\"\n";
        for pw in ["12345678", "true", "1e5", "nan", "\"quoted\" # tail"] {
            let c = kafka(sasl, &[("SLUICE_LOG__KAFKA__PRIMARY__SASL_PASSWORD", pw)]).unwrap_or_else(|e| panic!("{pw}: {e}"));
            assert_eq!(c.log.kafka.primary.sasl_password.as_ref().map(Secret::expose), Some(pw));
        }
        let env = HashMap::from([("SLUICE_ADMIN__TOKEN".to_string(), "1234567890123456789".to_string())]);
        let c = Config::from_toml_with_env("", "", &env).unwrap();
        assert_eq!(c.admin.token.as_deref(), Some("1234567890123456789"));
        // Other keys still read literals.
        let env = HashMap::from([("SLUICE_LOG__PARTITIONS".to_string(), "3".to_string())]);
        assert_eq!(Config::from_toml_with_env("", "", &env).unwrap().log.partitions, 3);
    }

    #[test]
    fn jobdb_tls_parameters_the_driver_would_ignore_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "x").unwrap();
        let ca = ca.display();
        let load =
            |url: &str| Config::from_toml_with_env(&format!("[deliver]\njobdb_url = \"{url}\"\n"), "", &HashMap::new()).map_err(|e| e.to_string());
        load(&format!("postgres://h/db?sslmode=verify-full&sslrootcert={ca}&application_name=x")).unwrap();
        load(&format!("mysql://h/db?ssl-mode=VERIFY_IDENTITY&ssl-ca={ca}")).unwrap();
        let cases = [
            ("postgres://h/db?SSLMODE=verify-full".to_owned(), "\"SSLMODE\" is not a TLS parameter"),
            ("postgres://h/db?ssl_mode=verify-full".to_owned(), "\"ssl_mode\""),
            ("postgres://h/db?sslmode=verify-full&sslmode=disable".to_owned(), "given twice"),
            ("postgres://h/db?sslmode=verify-full&ssl-mode=disable".to_owned(), "given twice"),
            ("postgres://h/db?ssl%6Dode=prefer".to_owned(), "may fall back to plain text"),
            (format!("mysql://h/db?ssl-mode=VERIFY_IDENTITY&sslrootcert={ca}"), "\"sslrootcert\""),
            ("postgres://h/db?sslmode=verify-full&sslrootcert=/no/such/ca.pem".to_owned(), "sslrootcert"),
            // An unencoded '@' or '/' in the password: the rest would be logged as the host and database.
            ("mysql://sluice:p@ss/w0rd@127.0.0.1:33307/rt1".to_owned(), "percent-encode"),
            ("postgres://u:p#w0rd@h/db".to_owned(), "percent-encode"),
        ];
        for (url, expect) in cases {
            let err = load(&url).unwrap_err();
            assert!(err.contains("deliver.jobdb_url") && err.contains(expect), "{url}: {err}");
            assert!(!err.contains("w0rd"), "{url}: {err}");
        }
        load("mysql://sluice:p%40ss%2Fw0rd@127.0.0.1:33307/rt1").unwrap();
    }

    #[test]
    fn brokers_and_rpc_urls_cannot_be_slipped_in_sideways() {
        for setting in ["bootstrap.servers", "Metadata.Broker.List"] {
            let text = format!("[log.kafka.settings]\n\"{setting}\" = \"evil:9092\"\n");
            let err = Config::from_toml_with_env(&text, "", &HashMap::new()).unwrap_err().to_string();
            assert!(err.contains("bootstrap_servers"), "{setting}: {err}");
        }
        for url in [" http://d:8090", "d:8090", "ftp://d", "https://", "http:// d"] {
            let text = format!("[director]\nrpc_url = \"{url}\"\n");
            let err = Config::from_toml_with_env(&text, "", &HashMap::new()).unwrap_err().to_string();
            assert!(err.contains("director.rpc_url"), "{url}: {err}");
        }
        // With TLS on, a plain-text address in any spelling.
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f.pem");
        std::fs::write(&f, "x").unwrap();
        let text = format!("[director]\ntls_cert_file = \"{0}\"\ntls_key_file = \"{0}\"\nrpc_url = \"HTTP://d:8090\"\n", f.display());
        let err = Config::from_toml_with_env(&text, "", &HashMap::new()).unwrap_err().to_string();
        assert!(err.contains("director.rpc_url") && err.contains("plain text"), "{err}");
    }

    #[test]
    fn env_override_with_unknown_key_fails() {
        let env = HashMap::from([("SLUICE_LOG__PARTITONS".to_string(), "3".to_string())]);
        let err = Config::from_toml_with_env("", " in sluice.toml", &env).unwrap_err().to_string();
        assert!(err.contains("partitons") && err.contains("SLUICE_LOG__PARTITONS"), "{err}");
        assert!(!err.contains("sluice.toml"), "the file is not at fault: {err}");
    }

    #[test]
    fn an_error_from_an_env_override_names_the_variable_not_the_file() {
        let err = |vars: &[(&str, &str)], text: &str| {
            let env = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            Config::from_toml_with_env(text, " in /etc/sluice.toml", &env).unwrap_err().to_string()
        };
        // A type error (found while deserializing) and a validation error.
        for (vars, needle) in [
            (vec![("SLUICE_LOG__PARTITIONS", "many")], "log.partitions"),
            (vec![("SLUICE_LOG__PARTITIONS", "0")], "log.partitions"),
            (vec![("SLUICE_SERVER__LISTEN", "nope"), ("SLUICE_LOG__RETENTION", "2d")], "server.listen"),
            (vec![("SLUICE_ADMIN__TOKEN", "short")], "admin.token"),
            (vec![("SLUICE_SERVER__MAX_CONNECTIONS", "-1")], "max_connections"),
            (vec![("SLUICE_SOURCES__X", "1")], "sources"),
        ] {
            let e = err(&vars, "");
            let var = vars[0].0;
            assert!(e.contains(var) && e.contains(needle), "{vars:?}: {e}");
            assert!(!e.contains("/etc/sluice.toml"), "{vars:?}: the file is named: {e}");
        }
        // Only the variable at fault is named.
        let e = err(&[("SLUICE_LOG__PARTITIONS", "4"), ("SLUICE_LOG__RETENTION", "soon")], "");
        assert!(e.contains("SLUICE_LOG__RETENTION") && !e.contains("SLUICE_LOG__PARTITIONS"), "{e}");
        // The file's own errors still name the file, whatever the environment holds.
        let e = err(&[("SLUICE_LOG__PARTITIONS", "4")], "[server]\nlisten = 5\n");
        assert!(e.contains("/etc/sluice.toml") && !e.contains("SLUICE_"), "{e}");
        let e = err(&[("SLUICE_LOG__PARTITIONS", "4")], "[log]\nretention = \"soon\"\n");
        assert!(e.contains("/etc/sluice.toml") && !e.contains("SLUICE_"), "{e}");
        let e = err(&[("SLUICE_LOG__PARTITIONS", "4")], "[server]\nlisten = \"nope\"\n");
        assert!(e.contains("server.listen") && !e.contains("SLUICE_"), "{e}");
    }

    #[test]
    fn dedup_defaults_and_validation() {
        let c = load("").unwrap();
        assert!(c.dedup.enabled);
        assert_eq!(c.dedup.window, Duration::from_secs(28 * 86400));
        assert_eq!(c.dedup.bloom_bits_per_key, 10.0);
        assert_eq!(c.output_retention(), c.dedup.window);
        let c = load("[dedup]\nwindow = \"60d\"\n").unwrap();
        assert_eq!(c.output_retention(), Duration::from_secs(60 * 86400), "follows the window");
        let err = load("[log]\noutput_retention = \"7d\"\n").unwrap_err().to_string();
        assert!(err.contains("log.output_retention"), "{err}");
        let err = load("[dedup]\nbloom_bits_per_key = 0.5\n").unwrap_err().to_string();
        assert!(err.contains("dedup.bloom_bits_per_key"), "{err}");
        let err = load("[dedup]\nwindow = \"0s\"\n").unwrap_err().to_string();
        assert!(err.contains("dedup.window"), "{err}");
    }

    #[test]
    fn a_kafka_topic_prefix_is_checked() {
        let kafka = |prefix: &str| {
            load(&format!(
                "[log]\nbackend = \"kafka\"\n[log.kafka]\ntopic_prefix = \"{prefix}\"\n[log.kafka.primary]\nbootstrap_servers = \"k:9092\"\n"
            ))
        };
        assert_eq!(kafka("cell-a.").unwrap().log.kafka.topic_prefix, "cell-a.");
        for bad in ["a b", "a/b", "é", &"x".repeat(201)] {
            let err = kafka(bad).unwrap_err().to_string();
            assert!(err.contains("log.kafka.topic_prefix"), "{bad}: {err}");
        }
    }

    #[test]
    fn router_keys_have_defaults_and_are_checked() {
        let c = load("").unwrap();
        assert_eq!(c.router.listen.to_string(), "127.0.0.1:8070");
        assert_eq!(c.router.admin_listen.map(|a| a.to_string()).as_deref(), Some("127.0.0.1:8071"));
        assert!(c.router.store.is_none());
        let c = load("[router]\nstore = \"postgres://u:pw@db/g\"\npoll_interval = \"100ms\"\nadmin_listen = \"\"\n").unwrap();
        assert_eq!(c.router.poll_interval, Duration::from_millis(100));
        assert!(c.router.admin_listen.is_none());
        assert!(!format!("{c:?}").contains("pw@"), "the store URL is not shown");
        for (toml, key) in [
            ("poll_interval = \"0s\"", "router.poll_interval"),
            ("poll_interval = \"5s\"", "router.poll_interval"),
            ("retry_after = \"0s\"", "router.retry_after"),
            ("forward_timeout = \"2h\"", "router.forward_timeout"),
            ("store_connections = 0", "router.store_connections"),
            ("cache_entries = 100000000", "router.cache_entries"),
            ("store = \" \"", "router.store"),
            ("admin_listen = \"127.0.0.1:8070\"", "router.admin_listen"),
            ("lisen = \"127.0.0.1:1\"", "lisen"),
        ] {
            let err = load(&format!("[router]\n{toml}\n")).unwrap_err().to_string();
            assert!(err.contains(key), "{toml}: {err}");
        }
    }

    #[test]
    fn rpc_secret_and_metrics_token_are_checked() {
        let c = load("").unwrap();
        assert!(c.director.rpc_secret.is_none() && c.admin.metrics_token.is_none());
        let err = load("[director]\nrpc_secret = \"short\"\n").unwrap_err().to_string();
        assert!(err.contains("director.rpc_secret"), "{err}");
        let err = load("[admin]\nmetrics_token = \"short\"\n").unwrap_err().to_string();
        assert!(err.contains("admin.metrics_token"), "{err}");
        let secret = "0123456789abcdef0123456789abcdef";
        let env = HashMap::from([("SLUICE_DIRECTOR__RPC_SECRET".to_string(), secret.to_string())]);
        let c = Config::from_toml_with_env("", "", &env).unwrap();
        assert_eq!(c.director.rpc_secret.as_deref(), Some(secret), "settable from the environment");
    }

    #[test]
    fn the_admin_port_cannot_be_the_tracking_api_port() {
        let err = load("[server]\nlisten = \"127.0.0.1:8088\"\n[admin]\nlisten = \"127.0.0.1:8088\"\n").unwrap_err().to_string();
        assert!(err.contains("admin.listen") && err.contains("own port"), "{err}");
        let err = load("[server]\nlisten = \"0.0.0.0:8088\"\n[admin]\nlisten = \"127.0.0.1:8088\"\n").unwrap_err().to_string();
        assert!(err.contains("admin.listen"), "{err}");
        load("[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n").expect("port 0 twice: two free ports");
        load("[server]\nlisten = \"127.0.0.1:8088\"\n[admin]\nlisten = \"127.0.0.2:8088\"\n").expect("same port, other address");
    }

    #[test]
    fn a_config_file_that_is_not_one_is_refused_without_reading_it_all() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.toml");
        std::fs::write(&big, vec![b'#'; (MAX_CONFIG_BYTES + 10) as usize]).unwrap();
        let err = Config::load(Some(&big)).unwrap_err().to_string();
        assert!(err.contains("not a config file") && err.contains("big.toml"), "{err}");
        let binary = dir.path().join("bin.toml");
        std::fs::write(&binary, [0xff, 0xfe, 0x00, 0x41]).unwrap();
        let err = Config::load(Some(&binary)).unwrap_err().to_string();
        assert!(err.contains("not UTF-8"), "{err}");
        #[cfg(unix)]
        {
            let err = Config::load(Some(Path::new("/dev/zero"))).unwrap_err().to_string();
            assert!(err.contains("not a config file"), "{err}");
        }
    }

    #[test]
    fn a_write_key_that_cannot_travel_in_a_header_is_refused() {
        for key in ["k\\u0000y", "ké", "a:b", "a b", ""] {
            let err = load(&format!("[[sources]]\nid = \"a\"\nwrite_key = \"{key}\"\n")).unwrap_err().to_string();
            assert!(err.contains("sources[0].write_key"), "{key:?}: {err}");
        }
        load("[[sources]]\nid = \"a\"\nwrite_key = \"wk_AZaz09-._~!\"\n").expect("visible ASCII");
        let hashed = format!("sha256:{}", "ab".repeat(32));
        load(&format!("[[sources]]\nid = \"a\"\nwrite_key = \"{hashed}\"\nworkspace = \"acme\"\n")).expect("a key given as its SHA-256");
        for bad in [format!("sha256:{}", "AB".repeat(32)), format!("sha256:{}", "ab".repeat(31)), "sha256:".into(), "md5:abc".into()] {
            let err = load(&format!("[[sources]]\nid = \"a\"\nwrite_key = \"{bad}\"\n")).unwrap_err().to_string();
            assert!(err.contains("sources[0].write_key"), "{bad}: {err}");
        }
        let err = load("[[sources]]\nid = \"a\"\nwrite_key = \"k\"\nworkspace = \"a b\"\n").unwrap_err().to_string();
        assert!(err.contains("sources[0].workspace"), "{err}");
    }

    #[test]
    fn each_typed_key_refuses_a_bad_value_naming_the_key() {
        let cases = [
            ("[server]\nlisten = \"nonsense\"\n", "server.listen", "\"nonsense\" is not an address of the form IP:PORT"),
            ("[server]\nlisten = \"127.0.0.1\"\n", "server.listen", "IP:PORT"),
            ("[admin]\nlisten = \"localhost:8089\"\n", "admin.listen", "IP:PORT"),
            ("[director]\nrpc_listen = \"nonsense\"\n", "director.rpc_listen", "IP:PORT"),
            ("[server]\nmax_connections = 0\n", "server.max_connections", "must be at least 1"),
            ("[ingest]\nmax_batch_events = 0\n", "ingest.max_batch_events", "must be at least 1"),
            ("[ingest]\nspool_max_events = 0\n", "ingest.spool_max_events", "must be at least 1"),
            ("[dedup]\nbatch_size = 0\n", "dedup.batch_size", "must be at least 1"),
            ("[dedup]\nbatch_size = 100001\n", "dedup.batch_size", "between 1 and 100000"),
            ("[deliver]\njobdb_max_jobs = 0\n", "deliver.jobdb_max_jobs", "must be at least 1"),
            ("[deliver]\nmax_in_flight = 0\n", "deliver.max_in_flight", "must be at least 1"),
            ("[deliver]\ncircuit_failures = 0\n", "deliver.circuit_failures", "must be at least 1"),
            ("[deliver]\ncircuit_cooldown = \"18446744073709551615s\"\n", "deliver.circuit_cooldown", "at most 24h"),
            ("[deliver]\njobdb_url = \"sqlite://x\"\n", "deliver.jobdb_url", "mysql://"),
            ("[deliver]\njobdb_url = \"postgres//h/db\"\n", "deliver.jobdb_url", "postgres://"),
            ("[director]\nrpc_url = \"d:8090\"\n", "director.rpc_url", "http:// or https://"),
            ("[deliver]\narchive_url = \"s3:/bucket\"\n", "deliver.archive_url", "not a URL"),
            ("[deliver]\narchive_url = \"s3://b\"\narchive_s3_endpoint = \"s3.local\"\n", "deliver.archive_s3_endpoint", "http://"),
            ("[deliver]\nretry_window = \"4 fortnights\"\n", "deliver.retry_window", "fortnights"),
            // Bounded: a longer time added to a clock or multiplied would overflow.
            ("[deliver]\nrequest_timeout = \"18446744073709551615s\"\n", "deliver.request_timeout", "at most 1h"),
            ("[deliver]\nretry_window = \"31days\"\n", "deliver.retry_window", "at most 30 days"),
            ("[deliver]\nmax_backoff = \"25h\"\n", "deliver.max_backoff", "at most 24h"),
            (
                "[[destinations]]\nid = \"d\"\nurl = \"https://x.example/\"\nrequest_timeout = \"2h\"\n",
                "destinations[0].request_timeout",
                "at most 1h",
            ),
            ("[deliver]\narchive_url = \"s3://b\"\narchive_s3_region = \"x@127.0.0.1:9/\"\n", "deliver.archive_s3_region", "region name"),
            ("[server]\nshutdown_grace = 10\n", "server.shutdown_grace", ""),
        ];
        for (text, key, detail) in cases {
            // The key first, as validation errors have it.
            let err = Config::from_toml_with_env(text, " in sluice.toml", &HashMap::new()).unwrap_err().to_string();
            assert!(err.contains(&format!("`{key}`: ")) && err.contains(detail), "{text}: {err}");
        }
        // From the environment: the variable and the key are named.
        for (var, value, key) in [
            ("SLUICE_SERVER__LISTEN", "nonsense", "server.listen"),
            ("SLUICE_DELIVER__MAX_IN_FLIGHT", "0", "deliver.max_in_flight"),
            ("SLUICE_DELIVER__JOBDB_URL", "redis://h", "deliver.jobdb_url"),
            ("SLUICE_DIRECTOR__RPC_URL", "ftp://d", "director.rpc_url"),
        ] {
            let env = HashMap::from([(var.to_string(), value.to_string())]);
            let err = Config::from_toml_with_env("", " in sluice.toml", &env).unwrap_err().to_string();
            assert!(err.contains(var) && err.contains(&format!("`{key}`: ")) && !err.contains("sluice.toml"), "{var}: {err}");
        }
    }

    #[test]
    fn typed_values_are_parsed_once_at_load() {
        let c = load("").unwrap();
        assert_eq!(c.server.listen, SocketAddr::from(([127, 0, 0, 1], 8088)));
        assert_eq!(c.admin.listen, Some(SocketAddr::from(([127, 0, 0, 1], 8089))));
        assert_eq!(c.director.rpc_listen, SocketAddr::from(([127, 0, 0, 1], 8090)));
        assert_eq!((c.deliver.max_in_flight.get(), c.deliver.circuit_failures.get(), c.deliver.jobdb_max_jobs.get()), (64, 5, 1_000_000));
        assert!(c.deliver.jobdb_url.is_none() && c.director.rpc_url.is_none());
        assert_eq!(load("[admin]\nlisten = \"\"\n").unwrap().admin.listen, None, "\"\" turns the admin port off");
        // Blank is unset; a URL is trimmed once, here, and keeps its engine.
        assert!(load("[deliver]\njobdb_url = \"  \"\n").unwrap().deliver.jobdb_url.is_none());
        let c = load("[deliver]\njobdb_url = \" mysql://u:hunter2@db:3306/sluice?ssl-mode=DISABLED \"\n").unwrap();
        let url = c.deliver.jobdb_url.as_ref().unwrap();
        assert_eq!((url.as_str(), url.engine()), ("mysql://u:hunter2@db:3306/sluice?ssl-mode=DISABLED", JobDbEngine::MySql));
        let debug = format!("{c:?}");
        assert!(!debug.contains("hunter2") && debug.contains("mysql://db:3306/"), "Debug hides the password: {debug}");
        let c = load("[deliver]\njobdb_url = \"postgresql://h/db\"\n").unwrap();
        assert_eq!(c.deliver.jobdb_url.unwrap().engine(), JobDbEngine::Postgres);
        let c = load("[director]\nrpc_url = \"HTTP://d:8090\"\n").unwrap();
        assert!(!c.director.rpc_url.as_ref().unwrap().is_https());
        assert_eq!(c.director.rpc_url.unwrap().as_str(), "HTTP://d:8090", "kept as written");
    }

    #[test]
    fn a_flag_replaces_its_key_before_the_value_is_read() {
        let env = |vars: &[(&str, &str)]| vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<HashMap<_, _>>();
        let addr = SocketAddr::from(([127, 0, 0, 1], 7000));
        let flags = Flags { listen: Some(addr), admin_listen: Some(None), data_dir: Some("/srv/d".into()) };
        // A bad value a flag overrides, from the file or the environment, is not refused.
        let c = Config::load_text(
            "[server]\nlisten = \"nope\"\ndata_dir = 7\n[admin]\nlisten = \"nope\"\n",
            "",
            &env(&[("SLUICE_SERVER__LISTEN", "256.0.0.1:1")]),
            flags.clone(),
        )
        .unwrap();
        assert_eq!((c.server.listen, c.admin.listen, c.server.data_dir), (addr, None, PathBuf::from("/srv/d")));
        // Other keys are still read, and a bad one named by its variable.
        let err = Config::load_text("", "", &env(&[("SLUICE_SERVER__LISTEN", "nope"), ("SLUICE_DEDUP__BATCH_SIZE", "0")]), flags.clone())
            .unwrap_err()
            .to_string();
        assert!(err.contains("SLUICE_DEDUP__BATCH_SIZE") && err.contains("`dedup.batch_size`") && !err.contains("SERVER"), "{err}");
        // A validation error on a key a flag set is not blamed on the environment.
        let flags = Flags { admin_listen: Some(Some(SocketAddr::from(([127, 0, 0, 1], 8088)))), ..Flags::default() };
        let err = Config::load_text("", "", &env(&[("SLUICE_ADMIN__LISTEN", "127.0.0.1:1")]), flags).unwrap_err().to_string();
        assert!(err.contains("`admin.listen`") && !err.contains("SLUICE_ADMIN__LISTEN"), "{err}");
    }

    #[test]
    fn bad_duration_is_reported() {
        let err = load("[log]\nretention = \"seven days\"\n").unwrap_err().to_string();
        assert!(err.contains("retention"), "{err}");
    }
}
