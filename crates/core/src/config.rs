//! Configuration: a TOML file, then `SLUICE_<SECTION>__<KEY>` environment
//! overrides, then CLI flags (applied by the binary), over defaults that work.
//!
//! Invariants:
//! - Unknown keys are errors, never silently ignored (a typo in a limit must
//!   not leave the default in force unnoticed).
//! - Every validation error names the key (`sources[1].write_key`) and the
//!   problem, and `sluice serve` refuses to start on one.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The sample configuration shipped in the repository (`config/sluice.toml`),
/// used when `sluice serve` gets no `--config`.
pub const SAMPLE_CONFIG: &str = include_str!("../../../config/sluice.toml");

/// A configuration problem, always naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid config{origin}: {source}")]
    Parse { origin: String, source: Box<toml::de::Error> },
    #[error("invalid config: `{key}`: {problem}")]
    Invalid { key: String, problem: String },
}

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), problem: problem.into() }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub admin: AdminConfig,
    pub ingest: IngestConfig,
    pub log: LogConfig,
    pub dedup: DedupConfig,
    pub sources: Vec<SourceConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address of the Tracking API.
    pub listen: String,
    /// Root of everything Sluice stores locally (the embedded log lives in `log/`).
    pub data_dir: PathBuf,
    /// Accepted connections at once; further clients wait in the kernel backlog.
    pub max_connections: usize,
    /// A client must send its request headers within this time.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A client must send its whole body within this time (408 otherwise).
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// How long a graceful shutdown waits for requests in flight.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of the admin endpoint (`/metrics`, `/healthz`); empty disables it.
    pub listen: String,
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
    pub max_batch_events: usize,
    /// Events per second per source when the source sets none; 0 = unlimited.
    pub default_rate_limit: u32,
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
    pub batch_size: usize,
}

impl Default for DedupConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            window: Duration::from_secs(28 * 86400),
            bloom_bits_per_key: 10.0,
            block_cache_bytes: 256 << 20,
            batch_size: 1000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Stable name of the source; `[A-Za-z0-9_-]`, at most 64 characters.
    pub id: String,
    pub write_key: String,
    /// Events per second; absent = `ingest.default_rate_limit`; 0 = unlimited.
    #[serde(default)]
    pub rate_limit: Option<u32>,
    /// Bucket size for bursts; absent = one second's worth of `rate_limit`.
    #[serde(default)]
    pub rate_burst: Option<u32>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8088".into(),
            data_dir: PathBuf::from("./data"),
            max_connections: 1024,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self { listen: "127.0.0.1:8089".into() }
    }
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            unknown_write_key: UnknownWriteKey::Reject,
            max_request_bytes: 500 * 1024,
            max_event_bytes: 32 * 1024,
            max_batch_events: 2500,
            default_rate_limit: 0,
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
        }
    }
}

impl Config {
    /// Load `path` (or the sample config when `None`), apply the process's
    /// environment overrides, and validate.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with(path, |_| {})
    }

    /// Like [`Self::load`], with `flags` (the CLI's overrides, highest
    /// precedence) applied before validation.
    pub fn load_with(path: Option<&Path>, flags: impl FnOnce(&mut Config)) -> Result<Self, ConfigError> {
        let env: HashMap<String, String> = std::env::vars().collect();
        let mut config = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|source| ConfigError::Read { path: p.to_owned(), source })?;
                Self::parse(&text, &format!(" in {}", p.display()), &env)?
            }
            None => Self::parse(SAMPLE_CONFIG, " (built-in sample config/sluice.toml)", &env)?,
        };
        flags(&mut config);
        config.validate()?;
        Ok(config)
    }

    /// Parse TOML text, apply overrides from `env`, validate.
    pub fn from_toml_with_env(
        text: &str,
        origin: &str,
        env: &HashMap<String, String>,
    ) -> Result<Self, ConfigError> {
        let config = Self::parse(text, origin, env)?;
        config.validate()?;
        Ok(config)
    }

    fn parse(text: &str, origin: &str, env: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let parse_err = |e: toml::de::Error| ConfigError::Parse { origin: origin.to_owned(), source: Box::new(e) };
        let mut doc: toml::Table = toml::from_str(text).map_err(parse_err)?;
        apply_env_overrides(&mut doc, env)?;
        toml::Value::Table(doc).try_into().map_err(parse_err)
    }

    /// Check every rule serde cannot express; errors name the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        parse_addr("server.listen", &self.server.listen)?;
        if !self.admin.listen.is_empty() {
            parse_addr("admin.listen", &self.admin.listen)?;
        }
        if self.server.data_dir.as_os_str().is_empty() {
            return Err(invalid("server.data_dir", "must not be empty"));
        }
        if self.server.max_connections == 0 {
            return Err(invalid("server.max_connections", "must be at least 1"));
        }
        for (key, d) in [
            ("server.header_read_timeout", self.server.header_read_timeout),
            ("server.body_read_timeout", self.server.body_read_timeout),
        ] {
            if d.is_zero() {
                return Err(invalid(key, "must be greater than zero"));
            }
        }
        let ing = &self.ingest;
        if ing.max_event_bytes == 0 || ing.max_event_bytes > ing.max_request_bytes {
            return Err(invalid("ingest.max_event_bytes", "must be between 1 and ingest.max_request_bytes"));
        }
        if ing.max_batch_events == 0 {
            return Err(invalid("ingest.max_batch_events", "must be at least 1"));
        }
        if !(1..=4096).contains(&self.log.partitions) {
            return Err(invalid("log.partitions", format!("must be between 1 and 4096, got {}", self.log.partitions)));
        }
        if self.log.segment_bytes < 4096 {
            return Err(invalid("log.segment_bytes", "must be at least 4096"));
        }
        if self.log.retention.is_zero() {
            return Err(invalid("log.retention", "must be greater than zero"));
        }
        let d = &self.dedup;
        if d.window.is_zero() {
            return Err(invalid("dedup.window", "must be greater than zero"));
        }
        if self.output_retention() < d.window {
            return Err(invalid(
                "log.output_retention",
                "must be at least dedup.window: the dedup index is rebuilt from what output still holds",
            ));
        }
        if !(1.0..=64.0).contains(&d.bloom_bits_per_key) {
            return Err(invalid("dedup.bloom_bits_per_key", format!("must be between 1 and 64, got {}", d.bloom_bits_per_key)));
        }
        if d.block_cache_bytes < 1 << 20 {
            return Err(invalid("dedup.block_cache_bytes", "must be at least 1048576 (1 MiB)"));
        }
        if d.batch_size == 0 || d.batch_size > 100_000 {
            return Err(invalid("dedup.batch_size", "must be between 1 and 100000"));
        }
        let mut ids = HashMap::new();
        let mut keys = HashMap::new();
        for (i, s) in self.sources.iter().enumerate() {
            if s.id.is_empty()
                || s.id.len() > 64
                || !s.id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return Err(invalid(
                    format!("sources[{i}].id"),
                    format!("{:?} must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'", s.id),
                ));
            }
            if s.write_key.is_empty() || s.write_key.contains(':') || s.write_key.chars().any(char::is_whitespace) {
                return Err(invalid(
                    format!("sources[{i}].write_key"),
                    "must be non-empty, without ':' or whitespace",
                ));
            }
            if let Some(j) = ids.insert(s.id.as_str(), i) {
                return Err(invalid(format!("sources[{i}].id"), format!("duplicate id {:?} (also sources[{j}])", s.id)));
            }
            if let Some(j) = keys.insert(s.write_key.as_str(), i) {
                return Err(invalid(format!("sources[{i}].write_key"), format!("duplicate write key (also sources[{j}])")));
            }
        }
        Ok(())
    }

    /// Retention of the `output` topic: `log.output_retention`, or the dedup window.
    pub fn output_retention(&self) -> Duration {
        self.log.output_retention.unwrap_or(self.dedup.window)
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.server.listen.parse().expect("validated")
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        (!self.admin.listen.is_empty()).then(|| self.admin.listen.parse().expect("validated"))
    }
}

fn parse_addr(key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value
        .parse()
        .map_err(|_| invalid(key, format!("{value:?} is not an address of the form IP:PORT")))
}

/// `SLUICE_SERVER__LISTEN=0.0.0.0:9000` sets `server.listen`. The value is
/// read as a TOML literal when it is one (numbers, booleans), else as a string.
fn apply_env_overrides(doc: &mut toml::Table, env: &HashMap<String, String>) -> Result<(), ConfigError> {
    let mut vars: Vec<_> = env.iter().filter(|(k, _)| k.starts_with("SLUICE_") && k.contains("__")).collect();
    vars.sort();
    for (name, raw) in vars {
        let path = &name["SLUICE_".len()..];
        let (section, key) = path.split_once("__").expect("filtered");
        let (section, key) = (section.to_ascii_lowercase(), key.to_ascii_lowercase());
        if section.is_empty() || key.is_empty() || key.contains("__") {
            return Err(invalid(name.clone(), "environment overrides have the form SLUICE_<SECTION>__<KEY>"));
        }
        let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw.clone()));
        let table = doc
            .entry(section.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| invalid(name.clone(), format!("`{section}` is not a table")))?;
        table.insert(key, value);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_with_env(text, "", &HashMap::new())
    }

    #[test]
    fn sample_config_is_valid() {
        let c = load(SAMPLE_CONFIG).expect("sample config");
        assert!(!c.sources.is_empty());
    }

    #[test]
    fn empty_file_gives_working_defaults() {
        let c = load("").unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:8088");
        assert_eq!(c.log.partitions, 8);
        assert_eq!(c.log.retention, Duration::from_secs(7 * 86400));
        assert_eq!(c.ingest.max_batch_events, 2500);
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
        let err = load(
            "[[sources]]\nid = \"a\"\nwrite_key = \"k\"\n[[sources]]\nid = \"b\"\nwrite_key = \"k\"\n",
        )
        .unwrap_err()
        .to_string();
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
        assert_eq!(c.server.listen, "127.0.0.1:9999");
        assert_eq!(c.log.partitions, 3);
        assert_eq!(c.log.retention, Duration::from_secs(2 * 86400));
    }

    #[test]
    fn env_override_with_unknown_key_fails() {
        let env = HashMap::from([("SLUICE_LOG__PARTITONS".to_string(), "3".to_string())]);
        let err = Config::from_toml_with_env("", "", &env).unwrap_err().to_string();
        assert!(err.contains("partitons"), "{err}");
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
    fn bad_duration_is_reported() {
        let err = load("[log]\nretention = \"seven days\"\n").unwrap_err().to_string();
        assert!(err.contains("retention"), "{err}");
    }
}
