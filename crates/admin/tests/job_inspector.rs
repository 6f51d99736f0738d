//! `GET /api/jobs/{key}` finds jobs wherever the JobDBs live: SQLite files
//! in `data_dir/jobs`, or MariaDB / PostgreSQL (`deliver.jobdb_url`), the
//! same lookup as `sluice jobs inspect`. The SQL engines run on the servers
//! named by `SLUICE_TEST_MYSQL_URL` / `SLUICE_TEST_POSTGRES_URL`, one fresh
//! database per test; without a URL the test is skipped with a message,
//! unless `SLUICE_REQUIRE_SQL=1`, when it fails.

mod common;

use axum::http::StatusCode;
use bytes::Bytes;
use serde_json::{json, Value};
use sluice_deliver::ksuid::{Ksuid, KsuidGenerator};
use sluice_deliver::store::{JobState, NewJob, Transition};
use sqlx::Connection;

use common::*;

#[derive(Clone, Copy, Debug)]
enum Engine {
    MariaDb,
    Postgres,
}

impl Engine {
    fn env(self) -> &'static str {
        match self {
            Engine::MariaDb => "SLUICE_TEST_MYSQL_URL",
            Engine::Postgres => "SLUICE_TEST_POSTGRES_URL",
        }
    }

    /// Run `statements` on the server at `server`.
    fn run(self, server: &str, statements: &[String]) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            match self {
                Engine::MariaDb => {
                    let mut c = sqlx::MySqlConnection::connect(server).await.unwrap_or_else(|e| panic!("connect to {server}: {e}"));
                    for s in statements {
                        sqlx::raw_sql(s).execute(&mut c).await.unwrap_or_else(|e| panic!("{s}: {e}"));
                    }
                }
                Engine::Postgres => {
                    let mut c = sqlx::PgConnection::connect(server).await.unwrap_or_else(|e| panic!("connect to {server}: {e}"));
                    for s in statements {
                        sqlx::raw_sql(s).execute(&mut c).await.unwrap_or_else(|e| panic!("{s}: {e}"));
                    }
                }
            }
        });
    }

    fn drop_statement(self, name: &str) -> String {
        match self {
            Engine::MariaDb => format!("DROP DATABASE IF EXISTS {name}"),
            Engine::Postgres => format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        }
    }
}

/// A database of its own for one test, dropped at the end.
struct Database {
    engine: Engine,
    server: String,
    name: String,
    url: String,
}

impl Database {
    /// `None` (printed) without the engine's server, unless `SLUICE_REQUIRE_SQL=1`: then it panics.
    fn fresh(engine: Engine, test: &str) -> Option<Database> {
        let server = match std::env::var(engine.env()) {
            Ok(u) if !u.is_empty() => u,
            _ if std::env::var("SLUICE_REQUIRE_SQL").as_deref() == Ok("1") => panic!("{} is not set and SLUICE_REQUIRE_SQL=1", engine.env()),
            _ => {
                eprintln!("SKIPPED {test} on {engine:?}: {} is not set (scripts/sql.sh starts a server)", engine.env());
                return None;
            }
        };
        let name = format!("sluice_admin_{test}_{}", std::process::id());
        engine.run(&server, &[engine.drop_statement(&name), format!("CREATE DATABASE {name}")]);
        let mut url = url::Url::parse(&server).expect("a server URL");
        url.set_path(&format!("/{name}"));
        Some(Database { engine, server, name, url: url.to_string() })
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.engine.run(&self.server, &[self.engine.drop_statement(&self.name)]);
        }
    }
}

fn job(message_id: &str, destination: &str, created_at: i64) -> NewJob {
    NewJob {
        message_id: message_id.into(),
        source: "web".into(),
        destination: destination.into(),
        generation: 0,
        endpoint: "https://user:hunter2@example.com/hook".into(),
        payload: Bytes::from_static(b"{}"),
        created_at,
        expires_at: created_at + 3_600_000,
        received_at: created_at - 5,
    }
}

fn transition(job_id: Ksuid, seq: i64, state: JobState, status: Option<u16>, error: Option<&str>) -> Transition {
    Transition { job_id, seq, state, at: 1_700_000_000_000 + seq * 1000, attempt: seq, status, error: error.map(str::to_owned), retry_at: None }
}

/// Jobs of messageId `m-1` in two JobDBs, one with a history, and a job of
/// another message; ask the API for them by messageId and by job id.
async fn inspector_finds_jobs_in_every_jobdb(f: &Fixture, jobdb_name: &str) {
    let jobdbs = f.state.jobdbs.clone();
    jobdbs.list().await.expect("the JobDBs' directory or registry");
    let mut ids = KsuidGenerator::default();
    // Both stay open (locked, as a running director holds them) while the API reads.
    let mut first = jobdbs.open(1).await.expect("JobDB 1");
    let mut second = jobdbs.open(2).await.expect("JobDB 2");
    let (a, b, other, c) = (ids.next(1_700_000_000), ids.next(1_700_000_000), ids.next(1_700_000_000), ids.next(1_700_000_100));
    // A JobDB's store blocks (an SQL one drives its own session runtime), as on a director's writer thread.
    tokio::task::block_in_place(|| {
        let store = &mut first.store;
        store.begin().unwrap();
        assert!(store.insert_job(a, &job("m-1", "hook", 1_700_000_000_000)).unwrap());
        assert!(store.insert_job(b, &job("m-1", "warehouse", 1_700_000_000_000)).unwrap());
        assert!(store.insert_job(other, &job("m-2", "hook", 1_700_000_000_000)).unwrap());
        store.append_transition(&transition(a, 1, JobState::Executing, None, None)).unwrap();
        store.append_transition(&transition(a, 2, JobState::AwaitingRetry, Some(503), Some("Service Unavailable"))).unwrap();
        store.commit().unwrap();
        let store = &mut second.store;
        store.begin().unwrap();
        let mut regenerated = job("m-1", "hook", 1_700_000_100_000);
        regenerated.generation = 1;
        assert!(store.insert_job(c, &regenerated).unwrap());
        store.commit().unwrap();
    });

    let by_message = f.call("GET", "/api/jobs/m-1", None).await;
    assert_eq!(by_message.status, StatusCode::OK, "{}", by_message.text);
    let found = by_message.json.as_array().expect("a list");
    let mut summary: Vec<(String, String, i64, String)> = found
        .iter()
        .map(|j| {
            (
                j["id"].as_str().unwrap().to_owned(),
                j["destination"].as_str().unwrap().to_owned(),
                j["generation"].as_i64().unwrap(),
                j["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    summary.sort();
    let mut expected = vec![
        (a.to_string(), "hook".to_owned(), 0, "awaiting_retry".to_owned()),
        (b.to_string(), "warehouse".to_owned(), 0, "awaiting_scheduling".to_owned()),
        (c.to_string(), "hook".to_owned(), 1, "awaiting_scheduling".to_owned()),
    ];
    expected.sort();
    assert_eq!(summary, expected, "{}", by_message.text);
    assert!(!by_message.text.contains("hunter2"), "an endpoint's password shows: {}", by_message.text);

    let job_a = found.iter().find(|j| j["id"] == a.to_string().as_str()).unwrap();
    assert!(job_a["jobdb"].as_str().unwrap().contains(&format!("{jobdb_name}000001")), "{}", job_a["jobdb"]);
    assert_eq!(job_a["endpoint"], "https://user:***@example.com/hook");
    assert_eq!((job_a["message_id"].clone(), job_a["source"].clone()), (json!("m-1"), json!("web")));
    let transitions: Vec<Value> = job_a["transitions"].as_array().unwrap().iter().map(|t| json!([t["seq"], t["state"], t["status"]])).collect();
    assert_eq!(transitions, vec![json!([0, "awaiting_scheduling", null]), json!([1, "executing", null]), json!([2, "awaiting_retry", 503])]);
    assert_eq!(job_a["transitions"][2]["error"], "Service Unavailable");
    let job_c = found.iter().find(|j| j["id"] == c.to_string().as_str()).unwrap();
    assert!(job_c["jobdb"].as_str().unwrap().contains(&format!("{jobdb_name}000002")), "{}", job_c["jobdb"]);

    let by_id = f.call("GET", &format!("/api/jobs/{other}"), None).await;
    assert_eq!(by_id.status, StatusCode::OK);
    let by_id = by_id.json.as_array().unwrap();
    assert_eq!(by_id.len(), 1);
    assert_eq!((by_id[0]["message_id"].clone(), by_id[0]["destination"].clone()), (json!("m-2"), json!("hook")));

    // Nothing found is an empty list (as before; the console shows "no job").
    let none = f.call("GET", "/api/jobs/m-unknown", None).await;
    assert_eq!((none.status, none.json), (StatusCode::OK, json!([])));
    let refused = f.raw("GET", "/api/jobs/m-1", None, None).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    drop((first, second));
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("a tokio runtime")
}

#[test]
fn inspector_finds_jobs_in_sqlite_files() {
    let f = Fixture::new();
    runtime().block_on(inspector_finds_jobs_in_every_jobdb(&f, "jobdb-"));
}

#[test]
fn inspector_finds_jobs_in_mariadb() {
    let Some(db) = Database::fresh(Engine::MariaDb, "inspector") else { return };
    let f = Fixture::with(Some(TOKEN), Some(&db.url));
    runtime().block_on(inspector_finds_jobs_in_every_jobdb(&f, "jobs_"));
}

#[test]
fn inspector_finds_jobs_in_postgresql() {
    let Some(db) = Database::fresh(Engine::Postgres, "inspector") else { return };
    let f = Fixture::with(Some(TOKEN), Some(&db.url));
    runtime().block_on(inspector_finds_jobs_in_every_jobdb(&f, "jobs_"));
}
