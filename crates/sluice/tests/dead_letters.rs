//! Dead letters through a real `sluice serve`: `output` records the route
//! cannot plan (written to the embedded log before the server starts) land
//! in the dead-letter store, the route's offset passes them, and an
//! operator sees, replays and discards them with `sluice dead-letters` and
//! the admin API (token-protected like the rest of /api); the console has
//! the section; `/metrics` counts them. Run with the control database in
//! `control.sqlite`, and in MariaDB and PostgreSQL (`deliver.jobdb_url`;
//! servers from `SLUICE_TEST_MYSQL_URL` / `SLUICE_TEST_POSTGRES_URL`,
//! skipped without them unless `SLUICE_REQUIRE_SQL=1`).

mod util;

use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Value};
use sluice_deliver::control::{ControlDb, NewDeadLetter};
use sluice_log::{EmbeddedLog, Log, LogOptions, Record};
use util::*;

const TOKEN: &str = "dead-letter-admin-token-0123456789";

struct Admin {
    rt: tokio::runtime::Runtime,
    http: reqwest::Client,
    base: String,
}

impl Admin {
    fn new(admin: &str) -> Admin {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        Admin { rt, http: reqwest::Client::new(), base: format!("http://{admin}") }
    }

    fn text(&self, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
        self.rt.block_on(async {
            let mut req = self.http.request(method.parse().unwrap(), format!("{}{path}", self.base));
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            let resp = req.send().await.unwrap();
            (resp.status().as_u16(), resp.text().await.unwrap())
        })
    }

    fn call(&self, method: &str, path: &str, token: Option<&str>) -> (u16, Value) {
        let (status, text) = self.text(method, path, token);
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    fn ok(&self, method: &str, path: &str) -> Value {
        let (status, v) = self.call(method, path, Some(TOKEN));
        assert!((200..300).contains(&status), "{method} {path}: {status} {v}");
        v
    }

    fn metric(&self, name: &str) -> f64 {
        let text = self.text("GET", "/metrics", None).1;
        text.lines().find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')).map(|v| v.trim().parse().unwrap())).unwrap_or(-1.0)
    }
}

fn cli(config: &std::path::Path, args: &[&str]) -> std::process::Output {
    let mut all = vec!["dead-letters"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--config", config.to_str().unwrap()]);
    sluice_cmd(&all)
}

fn cli_ok(config: &std::path::Path, args: &[&str]) -> String {
    let out = cli(config, args);
    assert!(out.status.success(), "sluice dead-letters {args:?}: {}\n{}", String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn dead_letters_are_listed_replayed_and_discarded_through_cli_and_api() {
    run(None);
}

#[test]
fn the_same_with_the_control_tables_in_mariadb() {
    if let Some(url) = sql_database("SLUICE_TEST_MYSQL_URL", false) {
        run(Some(&url));
        sql_database("SLUICE_TEST_MYSQL_URL", true);
    }
}

#[test]
fn the_same_with_the_control_tables_in_postgres() {
    if let Some(url) = sql_database("SLUICE_TEST_POSTGRES_URL", false) {
        run(Some(&url));
        sql_database("SLUICE_TEST_POSTGRES_URL", true);
    }
}

/// A fresh database on the server named by `env` (its URL), or `None`
/// (skipped); `drop_only`: just drop it.
fn sql_database(env: &str, drop_only: bool) -> Option<String> {
    use sqlx::Connection;
    let server = match std::env::var(env) {
        Ok(u) if !u.is_empty() => u,
        _ if std::env::var("SLUICE_REQUIRE_SQL").is_ok_and(|v| v == "1") => panic!("{env} is not set and SLUICE_REQUIRE_SQL=1"),
        _ => {
            eprintln!("SKIPPED: {env} is not set (start a server with scripts/sql.sh)");
            return None;
        }
    };
    let name = "sluice_t_dead_letters_cli";
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        if server.starts_with("mysql") {
            let mut c = sqlx::MySqlConnection::connect(&server).await.unwrap();
            sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {name}")).execute(&mut c).await.unwrap();
            if !drop_only {
                sqlx::raw_sql(&format!("CREATE DATABASE {name}")).execute(&mut c).await.unwrap();
            }
        } else {
            let mut c = sqlx::PgConnection::connect(&server).await.unwrap();
            sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut c).await.unwrap();
            if !drop_only {
                sqlx::raw_sql(&format!("CREATE DATABASE {name}")).execute(&mut c).await.unwrap();
            }
        }
    });
    let mut url = url::Url::parse(&server).unwrap();
    url.set_path(&format!("/{name}"));
    Some(url.to_string())
}

fn run(jobdb_url: Option<&str>) {
    let sink = TestSink::start();
    let dir = tempfile::tempdir().unwrap();
    let mut extra = hook_toml(&sink.sink.url("/hook"), "");
    if let Some(url) = jobdb_url {
        extra = format!("[deliver]\njobdb_url = \"{url}\"\n{extra}");
    }
    let config = write_config(dir.path(), &extra);
    set_admin_token(&config, TOKEN);
    let data = dir.path().join("data");

    // Two unplannable records on output, as a producer writing straight to it could leave.
    {
        let options = LogOptions { topics: vec![("output".into(), 4)], ..LogOptions::default() };
        let log = EmbeddedLog::open(&data.join("log"), options).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let records = vec![
            Record { key: Bytes::from_static(b"web/not-json"), value: Bytes::from_static(b"{\"type\": \"track\", oops") },
            Record { key: Bytes::from_static(b"no-slash"), value: Bytes::from_static(b"{}") },
        ];
        rt.block_on(log.append("output", 0, records)).unwrap();
    }

    let server = Server::start(&config);
    let admin = Admin::new(&server.admin);
    wait_for(Duration::from_secs(20), || route_drained(&data).then_some(()), || format!("route lag {:?}", route_lag(&data)));

    // The CLI lists them (newest first) and shows one whole.
    let list: Value = serde_json::from_str(&cli_ok(&config, &["list", "--json"])).unwrap();
    assert_eq!(list["counts"]["open"], 2, "{list}");
    let letters = list["dead_letters"].as_array().unwrap();
    assert_eq!(letters.iter().map(|d| d["key"].as_str().unwrap()).collect::<Vec<_>>(), ["no-slash", "web/not-json"]);
    let (bad_json, no_slash) = (letters[1]["id"].as_i64().unwrap(), letters[0]["id"].as_i64().unwrap());
    assert_eq!((letters[1]["stage"].as_str(), letters[1]["state"].as_str(), letters[1]["offset"].as_u64()), (Some("route"), Some("new"), Some(0)));
    assert!(letters[1]["reason"].as_str().unwrap().starts_with("event is not JSON"), "{}", letters[1]);
    let text = cli_ok(&config, &["list"]);
    assert!(text.contains("2 open") && text.contains("output/0@1") && text.contains("no-slash"), "{text}");
    let shown: Value = serde_json::from_str(&cli_ok(&config, &["show", &bad_json.to_string(), "--json"])).unwrap();
    assert_eq!(shown["payload"], "{\"type\": \"track\", oops");
    let text = cli_ok(&config, &["show", &bad_json.to_string()]);
    assert!(text.contains("event is not JSON") && text.contains("oops"), "{text}");
    let missing = cli(&config, &["show", "999999"]);
    assert!(!missing.status.success() && String::from_utf8_lossy(&missing.stderr).contains("no dead letter 999999"));

    // /metrics.
    assert_eq!(admin.metric("sluice_route_dead_letters"), 2.0);
    assert_eq!(admin.metric("sluice_route_dead_lettered_total"), 2.0);
    assert_eq!(admin.metric("sluice_route_unroutable_total"), 2.0);
    assert_eq!(admin.metric("sluice_route_dead_letters_full_total"), 0.0);

    // The admin API: no token, a wrong one, the right one.
    for path in ["/api/dead-letters", &format!("/api/dead-letters/{bad_json}")] {
        assert_eq!(admin.call("GET", path, None).0, 401);
        assert_eq!(admin.call("GET", path, Some("wrong")).0, 401);
    }
    for path in [
        "/api/dead-letters/replay",
        "/api/dead-letters/discard",
        &format!("/api/dead-letters/{bad_json}/replay"),
        &format!("/api/dead-letters/{bad_json}/discard"),
    ] {
        assert_eq!(admin.call("POST", path, None).0, 401, "{path}");
        assert_eq!(admin.call("POST", path, Some("wrong")).0, 401, "{path}");
    }
    let page = admin.ok("GET", "/api/dead-letters?limit=1");
    assert_eq!(page["dead_letters"].as_array().unwrap().len(), 1);
    assert_eq!(page["dead_letters"][0]["id"], no_slash);
    assert_eq!(page["dead_letters"][0]["payload_excerpt"], "{}");
    assert_eq!(page["counts"]["open"], 2);
    let next = admin.ok("GET", &format!("/api/dead-letters?limit=1&before={}", page["next_before"]));
    assert_eq!(next["dead_letters"][0]["id"], bad_json);
    let one = admin.ok("GET", &format!("/api/dead-letters/{bad_json}"));
    assert_eq!(
        (one["payload"].as_str(), one["topic"].as_str(), one["partition"].as_u64()),
        (Some("{\"type\": \"track\", oops"), Some("output"), Some(0))
    );
    assert_eq!(admin.call("GET", "/api/dead-letters/999999", Some(TOKEN)).0, 404);
    assert_eq!(admin.call("POST", "/api/dead-letters/999999/replay", Some(TOKEN)).0, 404);

    // Replaying an unplannable record fails and keeps it, with the error (CLI: exit status 1).
    let out = cli(&config, &["replay", &bad_json.to_string()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("replay failed: event is not JSON"), "{}", String::from_utf8_lossy(&out.stderr));
    let after = admin.ok("GET", &format!("/api/dead-letters/{bad_json}"));
    assert_eq!((after["state"].as_str(), after["attempts"].as_i64()), (Some("replay_failed"), Some(1)));
    assert_eq!(admin.ok("POST", &format!("/api/dead-letters/{no_slash}/replay"))["state"], "replay_requested");
    wait_for(
        Duration::from_secs(20),
        || (admin.ok("GET", &format!("/api/dead-letters/{no_slash}"))["state"] == "replay_failed").then_some(()),
        || "the API's replay to fail".into(),
    );

    // A record the current planner can plan (stored as an older Sluice's
    // route would have left it) is replayed to the connected destination.
    let db = ControlDb::open_for(&sluice_core::Config::load(Some(&config)).unwrap()).unwrap();
    if jobdb_url.is_some() {
        assert!(!data.join("control.sqlite").exists(), "the control tables are in the SQL database");
    }
    let event = json!({"type": "track", "event": "E", "userId": "u", "messageId": "dl-ok"});
    db.insert_dead_letters(&[NewDeadLetter {
        stage: "route",
        topic: "output".into(),
        partition: 1,
        offset: 0,
        generation: 0,
        destination: None,
        record_ms: sluice_deliver::now_ms(),
        key: b"web/dl-ok".to_vec(),
        payload: serde_json::to_vec(&event).unwrap(),
        reason: "left by an older planner".into(),
    }])
    .unwrap();
    let ok_id = db.dead_letters(None, 1).unwrap()[0].id;
    let text = cli_ok(&config, &["replay", &ok_id.to_string()]);
    assert!(text.contains(&format!("dead letter {ok_id} replayed: 1 jobs")), "{text}");
    wait_for(Duration::from_secs(20), || sink.by_key("/hook").get("dl-ok").map(|_| ()), || "the replayed event at the hook".into());
    assert_eq!(sink.by_key("/hook")["dl-ok"][0].json()["messageId"], "dl-ok");
    assert_eq!(admin.call("POST", &format!("/api/dead-letters/{ok_id}/replay"), Some(TOKEN)).0, 409, "replayed already");
    let out = cli(&config, &["replay", &ok_id.to_string()]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("replayed already"));

    // Discarding: one through the API, the rest through the CLI.
    assert_eq!(admin.ok("POST", &format!("/api/dead-letters/{no_slash}/discard"))["state"], "discarded");
    assert_eq!(admin.call("POST", &format!("/api/dead-letters/{no_slash}/discard"), Some(TOKEN)).0, 409);
    assert_eq!(admin.ok("POST", "/api/dead-letters/replay")["requested"], 1, "only the open one");
    let text = cli_ok(&config, &["discard", "--all"]);
    assert!(text.contains("1 dead letter(s) discarded"), "{text}");
    let counts = admin.ok("GET", "/api/dead-letters")["counts"].clone();
    assert_eq!((counts["open"].as_i64(), counts["replayed"].as_i64(), counts["discarded"].as_i64()), (Some(0), Some(1), Some(2)), "{counts}");
    assert_eq!(admin.ok("POST", "/api/dead-letters/discard")["discarded"], 0);
    wait_for(Duration::from_secs(20), || (admin.metric("sluice_route_dead_letters") == 0.0).then_some(()), || "the gauge at 0".into());

    // The console has the section and calls the API.
    let page = admin.text("GET", "/", None).1;
    assert!(page.contains("Dead letters") && page.contains("/api/dead-letters"));
    server.stop_within(Duration::from_secs(30));
}
