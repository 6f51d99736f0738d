//! The admin router in process: a control database (SQLite, in a temp
//! dir) seeded from a small config, an `EmbeddedLog`, and the Tracking API
//! of the same process, so a change through the API can be checked where it
//! takes effect. Requests go through `tower::ServiceExt::oneshot`.
#![allow(dead_code)] // each test file uses its own part

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap, Request, StatusCode};
use axum::Router;
use base64::Engine;
use serde_json::Value;
use sluice_admin::AdminState;
use sluice_core::config::JobDbUrl;
use sluice_core::metrics::Registry;
use sluice_core::Config;
use sluice_deliver::backend::JobDbs;
use sluice_deliver::Catalog;
use sluice_ingest::{Ingest, IngestSettings, INPUT_TOPIC};
use sluice_log::{EmbeddedLog, LogOptions};
use tower::ServiceExt;

pub const TOKEN: &str = "admin-token-for-tests-0123456789";
pub const WRITE_KEY: &str = "wk_web_seeded";

/// The config the fixture's control database is seeded from: source `web`,
/// destination `hook` (with a secret and a password in its URL), connected.
fn config_toml(data_dir: &std::path::Path) -> String {
    format!(
        "[server]\ndata_dir = \"{}\"\n\
         [[sources]]\nid = \"web\"\nwrite_key = \"{WRITE_KEY}\"\n\
         [[destinations]]\nid = \"hook\"\nurl = \"https://user:hunter2@example.com/hook\"\nsecret = \"s3cret-signing-key\"\n\
         [[connections]]\nsource = \"web\"\ndestinations = [\"hook\"]\n",
        data_dir.display()
    )
}

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub state: Arc<AdminState>,
    pub ingest: Arc<Ingest>,
}

/// An answer: status, headers, and the body as JSON (`Null` if it is not JSON) and as text.
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub json: Value,
    pub text: String,
}

impl Answer {
    /// The error code of a `{"code","message"}` answer.
    pub fn code(&self) -> &str {
        self.json["code"].as_str().unwrap_or_else(|| panic!("not an API error: {} {}", self.status, self.text))
    }
}

impl Fixture {
    /// With `admin.token` = [`TOKEN`] and JobDB files in `data_dir/jobs`.
    pub fn new() -> Fixture {
        Self::with(Some(TOKEN), None)
    }

    /// `token`: `admin.token` (`None`: the API is off). `jobdb_url`: where the inspector finds JobDBs.
    pub fn with(token: Option<&str>, jobdb_url: Option<&str>) -> Fixture {
        let dir = tempfile::tempdir().expect("a temp dir");
        let data_dir = dir.path().join("data");
        let config = Config::from_toml_with_env(&config_toml(&data_dir), "", &HashMap::new()).expect("the test config");
        let catalog = Catalog::open(&config).expect("the control database");
        let options = LogOptions { topics: vec![(INPUT_TOPIC.into(), 2)], fsync: false, ..LogOptions::default() };
        let log = Arc::new(EmbeddedLog::open(&data_dir.join("log"), options).expect("the log"));
        let ingest = Arc::new(Ingest::new(log.clone(), IngestSettings::from_config(&config), &config.sources, 0).expect("the Tracking API"));
        let state = Arc::new(AdminState {
            registry: Arc::new(Registry::default()),
            log,
            jobdbs: JobDbs::new(&data_dir.join("jobs"), jobdb_url.map(|u| JobDbUrl::parse(u).expect("a JobDB URL")).as_ref()).expect("the JobDBs"),
            catalog,
            ingest: Some(ingest.clone()),
            token: token.map(str::to_owned),
            metrics_token: None,
            default_rate_limit: 0,
            retry_policy: config.deliver.retry_policy(),
            body_read_timeout: Duration::from_secs(5),
        });
        sluice_admin::apply_sources(&state);
        Fixture { dir, state, ingest }
    }

    pub fn router(&self) -> Router {
        sluice_admin::router(self.state.clone())
    }

    /// Send `method path` with `token` as a bearer token and `body` as JSON text (sent as is, so it may be malformed).
    pub async fn raw(&self, method: &str, path: &str, token: Option<&str>, body: Option<&str>) -> Answer {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = match body {
            Some(b) => req.header(header::CONTENT_TYPE, "application/json").body(Body::from(b.to_owned())),
            None => req.body(Body::empty()),
        }
        .expect("a request");
        let resp = self.router().oneshot(req).await.expect("the router answers");
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = http_body_util::BodyExt::collect(resp.into_body()).await.expect("the body").to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        Answer { status, headers, json: serde_json::from_slice(&bytes).unwrap_or(Value::Null), text }
    }

    /// `method path` with the right token and `body`.
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Answer {
        self.raw(method, path, Some(TOKEN), body.map(|b| b.to_string()).as_deref()).await
    }

    /// The status the Tracking API of this process gives a track call with `write_key`.
    pub async fn track_with(&self, write_key: &str) -> StatusCode {
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{write_key}:"));
        let body = serde_json::json!({"type": "track", "event": "Signed Up", "userId": "u1", "messageId": format!("m-{}", rand_suffix())});
        let req = Request::builder()
            .method("POST")
            .uri("/v1/track")
            .header(header::AUTHORIZATION, format!("Basic {auth}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .expect("a request");
        sluice_ingest::router(self.ingest.clone()).oneshot(req).await.expect("the Tracking API answers").status()
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}
