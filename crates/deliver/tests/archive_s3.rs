//! The archive on S3 (object_store's S3 backend) against moto's S3 server
//! (`moto[server]` from PyPI, installed by scripts/setup-s3.sh), which each
//! test starts on 127.0.0.1 and stops when it ends: a job past its retry
//! window lands in the bucket under `<prefix>/<destination>/<day>/<id>.json`;
//! while S3 is down the job is not recorded as archived and is archived once
//! S3 is back; `deliver.archive_url` and its companions are validated.
//!
//! Finding moto: `SLUICE_MOTO_SERVER` (scripts/test.sh exports it), else
//! `$SLUICE_CACHE/compat/venv/bin/moto_server` if installed. With
//! `SLUICE_REQUIRE_S3` or `CI` set, a missing moto fails the tests;
//! otherwise (run by hand) they print why and skip.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use object_store::path::Path as ObjectPath;
use object_store::ObjectStore;
use sluice_core::config::ArchiveTarget;
use sluice_core::Config;
use sluice_deliver::archive::{Archive, ArchivedJob};
use sluice_deliver::inspect;
use sluice_deliver::ksuid::KsuidGenerator;
use sluice_deliver::sink::{Behaviour, Sink};
use sluice_deliver::store::{JobState, Transition};
use sluice_deliver::{Catalog, Centrifuge, CentrifugeOptions, DeliverMetrics, NewJob};

const BUCKET: &str = "sluice-archive";

#[path = "moto/mod.rs"]
mod moto;
use moto::*;

/// The archive reads its credentials from the standard variables (set
/// once, before any test reads the environment).
fn aws_credentials() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        std::env::set_var("AWS_ACCESS_KEY_ID", "sluice-test");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "sluice-test-secret");
    });
}

// ---------------------------------------------------------------- captured logs

/// Warnings and errors logged by any thread, as `field=value` lines.
fn captured() -> &'static Arc<Mutex<Vec<String>>> {
    static LINES: OnceLock<Arc<Mutex<Vec<String>>>> = OnceLock::new();
    LINES.get_or_init(|| {
        let lines = Arc::new(Mutex::new(Vec::new()));
        tracing::subscriber::set_global_default(Capture(lines.clone())).expect("no other global subscriber in this test binary");
        lines
    })
}

struct Capture(Arc<Mutex<Vec<String>>>);

struct Fields(String);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.push_str(&format!("{}={:?} ", field.name(), value));
    }
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, meta: &tracing::Metadata<'_>) -> bool {
        *meta.level() <= tracing::Level::WARN
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut f = Fields(String::new());
        event.record(&mut f);
        self.0.lock().unwrap().push(f.0);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

// ---------------------------------------------------------------- the pipeline

struct Env {
    _dir: tempfile::TempDir,
    config: Config,
    centrifuge: Arc<Centrifuge>,
}

fn config(dir: &Path, toml: &str) -> Result<Config, sluice_core::ConfigError> {
    let text = format!("[server]\ndata_dir = \"{}\"\n[[sources]]\nid = \"s1\"\nwrite_key = \"k1\"\n{toml}", dir.join("data").display());
    Config::from_toml_with_env(&text, "", &HashMap::new())
}

async fn open(toml: &str) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), toml).unwrap_or_else(|e| panic!("{e}\n{toml}"));
    let catalog = Catalog::open(&config).unwrap();
    let centrifuge = Centrifuge::open(CentrifugeOptions::from_config(&config), catalog, DeliverMetrics::default()).await.unwrap();
    Env { _dir: dir, config, centrifuge }
}

impl Env {
    fn jobs_dir(&self) -> PathBuf {
        self.config.server.data_dir.join("jobs")
    }

    fn found(&self, message_id: &str) -> inspect::Found {
        let mut found = inspect::find(&self.jobs_dir(), message_id).unwrap();
        assert_eq!(found.len(), 1, "one job for {message_id}");
        found.remove(0)
    }

    fn states(&self, message_id: &str) -> Vec<JobState> {
        self.found(message_id).history.iter().map(|t| t.state).collect()
    }

    async fn wait_state(&self, message_id: &str, state: JobState, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.states(message_id).last() != Some(&state) {
            assert!(Instant::now() < deadline, "{message_id}: not {state:?} after {timeout:?}: {:?}", self.states(message_id));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A job whose retry window (1 s) ends after a few failed attempts.
fn short_lived_job(message_id: &str, destination: &str) -> NewJob {
    let now = sluice_deliver::now_ms();
    NewJob {
        message_id: message_id.into(),
        source: "s1".into(),
        destination: destination.into(),
        generation: 0,
        endpoint: String::new(),
        payload: Bytes::from(format!("{{\"type\":\"track\",\"messageId\":\"{message_id}\",\"event\":\"E\"}}")),
        created_at: now,
        expires_at: now + 1000,
        received_at: now,
    }
}

/// A destination that always answers 500, and the `[deliver]` table of an S3 archive at `endpoint`.
fn toml(sink: &Sink, endpoint: &str, prefix: &str) -> String {
    format!(
        "[[destinations]]\nid = \"dead\"\nurl = \"{}\"\nallow_private_network = true\ninitial_backoff = \"100ms\"\nmax_backoff = \"200ms\"\nretry_window = \"1s\"\n\
         [deliver]\ncircuit_failures = 1000\narchive_url = \"s3://{BUCKET}/{prefix}\"\narchive_s3_endpoint = \"{endpoint}\"\n",
        sink.url("/dead")
    )
}

fn day(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).unwrap().format("%Y-%m-%d").to_string()
}

fn state_names(history: &[Transition]) -> Vec<String> {
    history.iter().map(|t| t.state.as_str().to_owned()).collect()
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_archived_job_lands_in_the_bucket_under_its_key() {
    let Some(bin) = moto_server() else { return };
    aws_credentials();
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(&bin, dir.path()).await;
    moto.create_bucket(BUCKET).await;
    let sink = Sink::start().await.unwrap();
    sink.set("/dead", Behaviour::status(500));
    let env = open(&toml(&sink, &moto.endpoint(), "prod/jobs/")).await;
    assert_eq!(
        env.config.archive_target(),
        ArchiveTarget::S3 { bucket: BUCKET.into(), prefix: "prod/jobs".into(), endpoint: Some(moto.endpoint()), region: None, ca_file: None }
    );

    env.centrifuge.insert(vec![short_lived_job("m-s3", "dead")], sluice_deliver::now_ms()).await.unwrap();
    env.wait_state("m-s3", JobState::Archived, Duration::from_secs(60)).await;
    let found = env.found("m-s3");
    assert!(found.history.iter().filter(|t| t.state == JobState::Executing).count() >= 2, "retried before archiving: {:?}", found.history);

    // The object is at <prefix>/<destination>/<day>/<id>.json, and is the only one.
    let store = moto.store(BUCKET);
    let day_dir = ObjectPath::from(format!("prod/jobs/dead/{}", day(found.job.job.created_at)));
    let listed = store.list_with_delimiter(Some(&day_dir)).await.unwrap();
    let keys: Vec<String> = listed.objects.iter().map(|o| o.location.to_string()).collect();
    let key = format!("{day_dir}/{}.json", found.job.id);
    assert_eq!(keys, vec![key.clone()]);
    let bytes = store.get(&ObjectPath::from(key.as_str())).await.unwrap().bytes().await.unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(doc["id"], found.job.id.to_string());
    assert_eq!(doc["message_id"], "m-s3");
    assert_eq!(doc["source"], "s1");
    assert_eq!(doc["destination"], "dead");
    assert_eq!(doc["generation"], 0);
    assert_eq!(doc["created_at"], found.job.job.created_at);
    assert_eq!(doc["payload"], serde_json::json!({"type": "track", "messageId": "m-s3", "event": "E"}));
    // The whole history, ending in `archived`, as the JobDB has it.
    let archived: Vec<String> = doc["transitions"].as_array().unwrap().iter().map(|t| t["state"].as_str().unwrap().to_owned()).collect();
    assert_eq!(archived, state_names(&found.history), "{doc:#}");
    assert_eq!(doc["transitions"].as_array().unwrap().last().unwrap()["status"], 500);
    // Nothing went to the local default.
    assert!(!env.config.server.data_dir.join("archive").exists());
    env.centrifuge.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_s3_is_down_a_job_is_not_archived_and_is_archived_once_it_is_back() {
    let Some(bin) = moto_server() else { return };
    aws_credentials();
    let logs = captured();
    let dir = tempfile::tempdir().unwrap();
    let mut moto = Moto::start(&bin, dir.path()).await;
    moto.stop(); // down: nothing listens on its port any more
    let sink = Sink::start().await.unwrap();
    sink.set("/dead", Behaviour::status(500));
    let env = open(&toml(&sink, &moto.endpoint(), "down")).await;

    env.centrifuge.insert(vec![short_lived_job("m-down", "dead")], sluice_deliver::now_ms()).await.unwrap();
    let id = {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(f) = inspect::find(&env.jobs_dir(), "m-down").unwrap().pop() {
                break f.job.id.to_string();
            }
            assert!(Instant::now() < deadline, "job not inserted");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    // The director tried to archive it and failed.
    let failed = || logs.lock().unwrap().iter().filter(|l| l.contains("archive write failed") && l.contains(&id)).count();
    let deadline = Instant::now() + Duration::from_secs(60);
    while failed() == 0 {
        assert!(Instant::now() < deadline, "no failed archive write logged for {id}: {:?}", env.states("m-down"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ...so it is not recorded as archived: still unfinished, waiting for the next try.
    let states = env.states("m-down");
    assert!(!states.contains(&JobState::Archived), "{states:?}");
    assert!(!states.last().unwrap().is_terminal(), "{states:?}");
    let (_, stats) = inspect::stats(&env.jobs_dir()).unwrap();
    assert_eq!(stats["dead"].get("archived").copied().unwrap_or(0), 0, "{stats:?}");

    // S3 is back (same port, a fresh bucket): the next try archives it.
    moto.run().await.unwrap();
    moto.create_bucket(BUCKET).await;
    env.wait_state("m-down", JobState::Archived, Duration::from_secs(120)).await;
    let found = env.found("m-down");
    let key = format!("down/dead/{}/{id}.json", day(found.job.job.created_at));
    let bytes = moto.store(BUCKET).get(&ObjectPath::from(key.as_str())).await.unwrap().bytes().await.unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(doc["id"], id);
    assert_eq!(doc["message_id"], "m-down");
    assert_eq!(state_names(&found.history).last().map(String::as_str), Some("archived"));
    env.centrifuge.close().await;
}

fn archived_job<'a>(payload: &'a [u8], history: &'a [Transition]) -> ArchivedJob<'a> {
    let now = sluice_deliver::now_ms();
    ArchivedJob {
        id: KsuidGenerator::default().next((now / 1000) as u64),
        message_id: "m-direct",
        source: "s1",
        destination: "d1",
        generation: 0,
        created_at: now,
        expires_at: now,
        payload,
        history,
    }
}

/// No server at all (nothing listens on the port): `put` fails, it does not hang or pretend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_to_an_unreachable_s3_endpoint_is_an_error() {
    aws_credentials();
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    let archive = Archive::s3(BUCKET, "x", Some(&endpoint), None, None).unwrap();
    assert_eq!(archive.location, format!("s3://{BUCKET}/x (at {endpoint})"));
    let err = archive.put(&archived_job(b"{}", &[])).await.unwrap_err();
    assert!(err.to_string().contains("archive write failed"), "{err}");
}

/// `Archive::open` of the target a config names, straight to moto, without the director.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_from_config_writes_to_s3_without_a_prefix() {
    let Some(bin) = moto_server() else { return };
    aws_credentials();
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(&bin, dir.path()).await;
    moto.create_bucket(BUCKET).await;
    let toml =
        format!("[deliver]\narchive_url = \"s3://{BUCKET}\"\narchive_s3_endpoint = \"{}/\"\narchive_s3_region = \"eu-west-1\"\n", moto.endpoint());
    let config = config(dir.path(), &toml).unwrap();
    let archive = Archive::from_config(&config).unwrap();
    let job = archived_job(b"not json", &[]);
    let path = archive.put(&job).await.unwrap();
    assert_eq!(path, format!("d1/{}/{}.json", day(job.created_at), job.id));
    let bytes = moto.store(BUCKET).get(&ObjectPath::from(path.as_str())).await.unwrap().bytes().await.unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(doc["payload"], "not json", "a payload that is not JSON is kept as a string");
    assert_eq!(doc["transitions"], serde_json::json!([]));
}

// ---------------------------------------------------------------- configuration

fn config_error(toml: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    match config(dir.path(), toml) {
        Ok(c) => panic!("accepted: {toml}\n{:?}", c.archive_target()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_archive_settings_are_refused_naming_the_key() {
    let cases = [
        ("archive_url = \"gs://bucket/x\"", "deliver.archive_url", "\"gs\""),
        ("archive_url = \"ftp://bucket/x\"", "deliver.archive_url", "unknown scheme"),
        ("archive_url = \"bucket/x\"", "deliver.archive_url", "not a URL"),
        ("archive_url = \"s3://\"", "deliver.archive_url", "bucket"),
        ("archive_url = \"s3://Bad_Bucket/x\"", "deliver.archive_url", "Bad_Bucket"),
        ("archive_url = \"s3://bucket/a//b\"", "deliver.archive_url", "prefix"),
        ("archive_url = \"s3://bucket/a/../b\"", "deliver.archive_url", "prefix"),
        ("archive_url = \"s3://bucket/x?versionId=1\"", "deliver.archive_url", "query"),
        ("archive_url = \"file://relative/dir\"", "deliver.archive_url", "absolute"),
        ("archive_url = \"s3://bucket/x\"\narchive_dir = \"/tmp/a\"", "deliver.archive_url", "not both"),
        ("archive_url = \"s3://bucket/x\"\narchive_s3_endpoint = \"localhost:9000\"", "deliver.archive_s3_endpoint", "http"),
        ("archive_url = \"s3://bucket/x\"\narchive_s3_region = \"\"", "deliver.archive_s3_region", "region"),
        ("archive_s3_endpoint = \"http://127.0.0.1:9000\"", "deliver.archive_s3_endpoint", "s3://"),
        ("archive_url = \"file:///tmp/a\"\narchive_s3_region = \"us-east-1\"", "deliver.archive_s3_region", "s3://"),
        ("archive_urll = \"s3://bucket/x\"", "archive_urll", ""),
    ];
    for (body, key, detail) in cases {
        let err = config_error(&format!("[deliver]\n{body}\n"));
        assert!(err.contains(key) && err.contains(detail), "{body}: {err}");
    }
}

#[test]
fn archive_settings_name_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let target = |toml: &str| config(dir.path(), &format!("[deliver]\n{toml}\n")).unwrap().archive_target();
    let data = dir.path().join("data");
    assert_eq!(target(""), ArchiveTarget::Local(data.join("archive")));
    assert_eq!(target("archive_url = \"\""), ArchiveTarget::Local(data.join("archive")));
    assert_eq!(target("archive_dir = \"/srv/archive\""), ArchiveTarget::Local("/srv/archive".into()));
    assert_eq!(target("archive_url = \"file:///srv/archive\""), ArchiveTarget::Local("/srv/archive".into()));
    assert_eq!(
        target("archive_url = \"s3://my-bucket\""),
        ArchiveTarget::S3 { bucket: "my-bucket".into(), prefix: String::new(), endpoint: None, region: None, ca_file: None }
    );
    assert_eq!(
        target("archive_url = \"s3://my.bucket-1/a/b/\"\narchive_s3_endpoint = \"https://s3.example.com/\"\narchive_s3_region = \"eu-west-1\""),
        ArchiveTarget::S3 {
            bucket: "my.bucket-1".into(),
            prefix: "a/b".into(),
            endpoint: Some("https://s3.example.com".into()),
            region: Some("eu-west-1".into()),
            ca_file: None
        }
    );
    // The usual environment override works for the new keys.
    let env = HashMap::from([("SLUICE_DELIVER__ARCHIVE_URL".to_owned(), "s3://from-env/p".to_owned())]);
    let c = Config::from_toml_with_env("", "", &env).unwrap();
    assert_eq!(c.archive_target().to_string(), "s3://from-env/p");
    assert_eq!(config(dir.path(), "[deliver]\narchive_url = \"file:///srv/a\"\n").unwrap().archive_dir(), PathBuf::from("/srv/a"));
}

// ---------------------------------------------------------------- HTTPS

/// The test certificates (`scripts/certs.sh`; `SLUICE_TEST_CERT_DIR` when
/// `scripts/test.sh` made them already).
fn certs() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(d) = std::env::var_os("SLUICE_TEST_CERT_DIR") {
            return PathBuf::from(d);
        }
        let dir = std::env::temp_dir().join(format!("sluice-s3-certs-{}", std::process::id()));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/certs.sh");
        let out = Command::new("bash").arg(script).arg(&dir).output().expect("run scripts/certs.sh");
        assert!(out.status.success(), "scripts/certs.sh: {}", String::from_utf8_lossy(&out.stderr));
        dir
    })
    .clone()
}

/// An S3-compatible server over HTTPS with its own CA: the archive writes
/// to it with `deliver.archive_s3_ca_file`; without that CA, with another
/// CA, with an expired server certificate, or over `http://` to the HTTPS
/// port, the write fails (and is never retried in plain text).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_archive_reaches_an_https_s3_server_through_its_ca_only() {
    let Some(bin) = moto_server() else { return };
    aws_credentials();
    let dir = tempfile::tempdir().unwrap();
    let c = certs();
    let moto = Moto::start_https(&bin, dir.path(), &c.join("server.pem"), &c.join("server.key")).await;
    let endpoint = format!("https://localhost:{}", moto.port);
    let ca = reqwest::Certificate::from_pem(&std::fs::read(c.join("ca.pem")).unwrap()).unwrap();
    let http = reqwest::Client::builder().add_root_certificate(ca).build().unwrap();
    let r = http.put(format!("{endpoint}/{BUCKET}")).send().await.unwrap();
    assert!(r.status().is_success(), "create bucket over https: {}", r.status());

    let job = archived_job(br#"{"messageId":"m-direct"}"#, &[]);
    let archive = Archive::s3(BUCKET, "tls", Some(&endpoint), None, Some(&c.join("ca.pem"))).unwrap();
    let key = archive.put(&job).await.unwrap_or_else(|e| panic!("write over https with the CA: {e}"));
    let listed = http.get(format!("{endpoint}/{BUCKET}?list-type=2")).send().await.unwrap().text().await.unwrap();
    assert!(listed.contains(&key), "the object is in the bucket: {listed}");

    let refused = [
        ("no CA (system roots only)", Archive::s3(BUCKET, "tls", Some(&endpoint), None, None).unwrap(), "UnknownIssuer"),
        ("another CA", Archive::s3(BUCKET, "tls", Some(&endpoint), None, Some(&c.join("wrongca.pem"))).unwrap(), "UnknownIssuer"),
        ("http:// to the https port", Archive::s3(BUCKET, "tls", Some(&format!("http://localhost:{}", moto.port)), None, None).unwrap(), ""),
    ];
    for (case, archive, says) in refused {
        let err = archive.put(&job).await.expect_err(case).to_string();
        assert!(err.contains("archive write failed") && err.contains(&endpoint[8..]) && err.contains(says), "{case}: {err}");
    }
    drop(moto);

    // A server certificate past its validity.
    let moto = Moto::start_https(&bin, dir.path(), &c.join("expired.pem"), &c.join("server.key")).await;
    let endpoint = format!("https://localhost:{}", moto.port);
    let archive = Archive::s3(BUCKET, "tls", Some(&endpoint), None, Some(&c.join("ca.pem"))).unwrap();
    let err = archive.put(&job).await.expect_err("an expired certificate is refused").to_string();
    assert!(err.contains("certificate expired"), "{err}");

    // A CA file that holds no certificate is refused when the archive is opened.
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    let err = Archive::s3(BUCKET, "tls", Some(&endpoint), None, Some(&empty)).err().expect("no CA in the file");
    assert!(err.to_string().contains("s3 archive: CA file"), "{err}");
}
