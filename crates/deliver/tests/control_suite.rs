//! The control database, one suite over every engine: the SQLite file in
//! `data_dir`, and MariaDB and PostgreSQL (`deliver.jobdb_url`), where
//! processes with their own data_dirs share the `sluice_control_*` tables.
//! The seeded catalog, QoS changes and replays made through one process's
//! catalog reach the others at their refresh; seeding by several at once
//! neither fails nor duplicates, and API deletions survive a reseed. On
//! SQLite the "processes" share one data_dir (the only way to share the
//! file); replays claimed per process are a server-only test, since two
//! processes on one data_dir are one claimant.

#[macro_use]
mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{Backend, Engine};
use sluice_core::Config;
use sluice_deliver::control::TABLE_PREFIX;
use sluice_deliver::gate::Qos;
use sluice_deliver::Catalog;
use sqlx::{Connection, Row};

every_engine!(
    two_processes_see_the_seeded_catalog,
    a_pause_through_one_reaches_the_other_after_refresh,
    seeding_twice_or_concurrently_neither_fails_nor_duplicates,
    a_control_planes_rows_are_replaced_whole_and_give_way_to_the_config,
    a_tracking_plan_is_stored_versioned_and_survives_a_reseed,
    functions_are_versioned_restored_and_deleted,
);

/// Functions: each deploy a new version made live, concurrent deploys get
/// distinct numbers, a restore goes back, the other process sees the live
/// code at its refresh, a reseed keeps them, deleting removes every version.
fn functions_are_versioned_restored_and_deleted(db: &Db<'_>) {
    let (_a_dir, _, a) = process(db);
    let (_b_dir, _, b) = process(db);
    let code = |v: u32| format!("async function onTrack(e) {{ e.v = {v}; return e; }}");
    assert_eq!(a.with_control(|c| c.deploy_function("f", &code(1))).unwrap(), 1);
    // Two processes deploying at once: two versions, neither lost.
    let versions: Vec<i64> = std::thread::scope(|s| {
        let (a, b) = (&a, &b);
        let one = s.spawn(move || a.with_control(|c| c.deploy_function("f", &code(2))).unwrap());
        let two = s.spawn(move || b.with_control(|c| c.deploy_function("f", &code(3))).unwrap());
        vec![one.join().unwrap(), two.join().unwrap()]
    });
    let mut sorted = versions.clone();
    sorted.sort();
    assert_eq!(sorted, [2, 3]);
    b.refresh().unwrap();
    let live = b.snapshot().functions["f"].clone();
    assert_eq!(live.version, 3, "the later deploy (the higher number) is live");
    assert!(a.with_control(|c| c.restore_function("f", 1)).unwrap());
    assert!(!a.with_control(|c| c.restore_function("f", 9)).unwrap(), "no version 9");
    assert!(!a.with_control(|c| c.restore_function("nope", 1)).unwrap());
    let (_c_dir, _, c) = process(db);
    let live = c.snapshot().functions["f"].clone();
    assert_eq!((live.version, &*live.code), (1, code(1).as_str()), "restored, and kept across a reseed");
    let listed = c.with_control(|c| c.function_versions("f")).unwrap();
    assert_eq!(listed.iter().map(|v| v.version).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(count(db, "functions"), 3);
    assert!(c.with_control(|c| c.delete_function("f")).unwrap());
    assert!(!c.with_control(|c| c.delete_function("f")).unwrap());
    assert_eq!((count(db, "functions"), count(db, "function_live")), (0, 0));
    // A deleted id starts again at version 1.
    assert_eq!(c.with_control(|c| c.deploy_function("f", &code(4))).unwrap(), 1);
    a.refresh().unwrap();
    assert_eq!(&*a.snapshot().functions["f"].code, code(4).as_str());
}

/// A source's tracking plan: stored through one process, seen by the
/// other at its refresh, its version counting edits; a restart (reseed)
/// keeps it; deleting it twice says the second time there was none.
fn a_tracking_plan_is_stored_versioned_and_survives_a_reseed(db: &Db<'_>) {
    let (_a_dir, _, a) = process(db);
    let (_b_dir, _, b) = process(db);
    let plan = serde_json::json!({"name": "p", "invalid": "flag", "track": {"Order Completed": {"required": ["event"]}}});
    assert_eq!(a.with_control(|c| c.put_plan("s1", &plan)).unwrap(), 1);
    assert!(b.snapshot().plans.is_empty(), "B has not refreshed yet");
    b.refresh().unwrap();
    let stored = &b.snapshot().plans["s1"];
    assert_eq!((&stored.doc, stored.version), (&plan, 1));
    assert!(stored.updated_at_ms > 0);
    let edited = serde_json::json!({"name": "p", "invalid": "block"});
    assert_eq!(b.with_control(|c| c.put_plan("s1", &edited)).unwrap(), 2);
    assert_eq!(count(db, "tracking_plans"), 1);
    let (_c_dir, _, c) = process(db);
    let stored = &c.snapshot().plans["s1"];
    assert_eq!((&stored.doc, stored.version), (&edited, 2));
    assert!(c.with_control(|c| c.delete_plan("s1")).unwrap());
    assert!(!c.with_control(|c| c.delete_plan("s1")).unwrap());
    a.refresh().unwrap();
    assert!(a.snapshot().plans.is_empty());
}

/// A cell's rows from its control plane (origin `global`): replaced whole
/// by each feed, skipped (and named) where the config holds the id, and on
/// a restart the config file's row replaces a global one under its id
/// (red team: the global row stayed, and the file's source lost silently).
fn a_control_planes_rows_are_replaced_whole_and_give_way_to_the_config(db: &Db<'_>) {
    use sluice_core::config::{DestinationConfig, SourceConfig};
    let (_dir, _, catalog) = process(db);
    let source = |id: &str, key: &str| SourceConfig {
        id: id.into(),
        write_key: key.into(),
        rate_limit: None,
        rate_burst: None,
        workspace: Some("acme".into()),
        function: None,
    };
    let dest = |id: &str| -> DestinationConfig {
        serde_json::from_value(serde_json::json!({"id": id, "url": format!("http://127.0.0.1:9/{id}"), "workspace": "acme"})).unwrap()
    };
    let feed = |sources: Vec<SourceConfig>, dests: Vec<DestinationConfig>, conns: Vec<(&str, &str)>| {
        let conns: Vec<(String, String)> = conns.into_iter().map(|(a, b)| (a.to_owned(), b.to_owned())).collect();
        catalog.with_control(|c| c.replace_global(&sources, &dests, &conns)).unwrap()
    };
    // s1 and d1 are the config's: skipped, and said.
    let skipped = feed(vec![source("g1", "kg1"), source("s1", "kx")], vec![dest("gd"), dest("d1")], vec![("g1", "gd"), ("s1", "gd")]);
    assert_eq!(skipped.len(), 3, "{skipped:?}");
    catalog.refresh().unwrap();
    let snap = catalog.snapshot();
    assert!(snap.sources.iter().any(|(s, _)| s.id == "g1" && s.workspace.as_deref() == Some("acme")));
    assert_eq!(snap.sources.iter().find(|(s, _)| s.id == "s1").unwrap().0.write_key, "k1", "the config's s1 stays");
    assert_eq!(snap.connections["g1"], ["gd"]);
    assert_eq!(snap.destinations["gd"].workspace.as_deref(), Some("acme"));
    // The next feed replaces the whole set: g1 and gd gone, g2 in.
    assert!(feed(vec![source("g2", "kg2")], vec![], vec![]).is_empty());
    catalog.refresh().unwrap();
    let snap = catalog.snapshot();
    assert!(!snap.sources.iter().any(|(s, _)| s.id == "g1") && snap.sources.iter().any(|(s, _)| s.id == "g2"));
    assert!(!snap.destinations.contains_key("gd") && !snap.connections.contains_key("g1"));
    // A config file that now names s9 and g2: on restart its g2 replaces the control plane's.
    let text = format!(
        "[server]\ndata_dir = \"{}\"\n{}{CATALOG}[[sources]]\nid = \"g2\"\nwrite_key = \"local-key\"\n",
        _dir.as_ref().map_or(db.shared.path(), |d| d.path()).display(),
        db.url.as_ref().map(|u| format!("[deliver]\njobdb_url = \"{u}\"\n")).unwrap_or_default()
    );
    let config = Config::from_toml_with_env(&text, "", &HashMap::new()).unwrap();
    let restarted = Catalog::open(&config).expect("reopen");
    let g2 = restarted.snapshot().sources.iter().find(|(s, _)| s.id == "g2").unwrap().0.clone();
    assert_eq!(g2.write_key, "local-key", "the config file's row");
}

server_engines!(a_replay_filed_through_one_is_seen_and_run_by_one_other);

struct Db<'a> {
    backend: &'a Backend,
    /// The test database (servers).
    url: Option<String>,
    /// SQLite: the data_dir every "process" shares.
    shared: tempfile::TempDir,
}

impl Db<'_> {
    fn engine(&self) -> Engine {
        self.backend.engine
    }
}

fn run(engine: Engine, name: &str, test: fn(&Db<'_>)) {
    if let Some(backend) = Backend::new(engine, &format!("ctl_{name}_{engine:?}")) {
        let url = backend.database_url.clone();
        test(&Db { backend: &backend, url, shared: tempfile::tempdir().expect("a temp dir") });
    }
}

const CATALOG: &str = r#"
[[sources]]
id = "s1"
write_key = "k1"
[[destinations]]
id = "d1"
url = "http://127.0.0.1:9/d1"
[[destinations]]
id = "d2"
url = "http://127.0.0.1:9/d2"
[[connections]]
source = "s1"
destinations = ["d1", "d2"]
"#;

fn config(db: &Db<'_>, data_dir: &Path) -> Config {
    let jobdb_url = db.url.as_ref().map(|u| format!("[deliver]\njobdb_url = \"{u}\"\n")).unwrap_or_default();
    let text = format!("[server]\ndata_dir = \"{}\"\n{jobdb_url}{CATALOG}", data_dir.display());
    Config::from_toml_with_env(&text, "", &HashMap::new()).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// A process's Catalog: its own data_dir and the shared database, or on
/// SQLite the shared data_dir (the returned path is the process's data_dir).
fn process(db: &Db<'_>) -> (Option<tempfile::TempDir>, PathBuf, Arc<Catalog>) {
    let (own, data_dir) = match db.engine() {
        Engine::Sqlite => (None, db.shared.path().to_owned()),
        _ => {
            let dir = tempfile::tempdir().expect("a temp dir");
            let path = dir.path().to_owned();
            (Some(dir), path)
        }
    };
    let catalog = Catalog::open(&config(db, &data_dir)).expect("open the control database");
    (own, data_dir, catalog)
}

/// `SELECT count(*)` of control table `table` (without the prefix), as another client.
fn count(db: &Db<'_>, table: &str) -> i64 {
    let sql = format!("SELECT count(*) FROM {TABLE_PREFIX}{table}");
    let url = || db.url.as_deref().expect("a server");
    match db.engine() {
        Engine::Sqlite => {
            let c = rusqlite::Connection::open(db.shared.path().join("control.sqlite")).expect("open control.sqlite");
            c.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0)).expect("count")
        }
        Engine::MariaDb => common::runtime().block_on(async {
            let mut c = sqlx::MySqlConnection::connect(url()).await.expect("connect");
            sqlx::query(&sql).fetch_one(&mut c).await.expect("count").get::<i64, _>(0)
        }),
        Engine::Postgres => common::runtime().block_on(async {
            let mut c = sqlx::PgConnection::connect(url()).await.expect("connect");
            sqlx::query(&sql).fetch_one(&mut c).await.expect("count").get::<i64, _>(0)
        }),
    }
}

fn assert_seeded(catalog: &Catalog) {
    let snap = catalog.snapshot();
    let sources: Vec<&str> = snap.sources.iter().map(|(s, _)| s.id.as_str()).collect();
    assert_eq!(sources, ["s1"]);
    let mut destinations: Vec<&str> = snap.destinations.keys().map(String::as_str).collect();
    destinations.sort();
    assert_eq!(destinations, ["d1", "d2"]);
    assert_eq!(snap.connections.get("s1").map(Vec::as_slice), Some(&["d1".to_owned(), "d2".to_owned()][..]));
    assert_eq!(snap.qos.len(), 2);
    assert!(snap.qos.values().all(|q| !q.paused));
}

fn two_processes_see_the_seeded_catalog(db: &Db<'_>) {
    let (_a_dir, a_data, a) = process(db);
    let (_b_dir, b_data, b) = process(db);
    assert_seeded(&a);
    assert_seeded(&b);
    // On a server the control database is the shared one, not a file in either data_dir.
    for dir in [&a_data, &b_data] {
        assert_eq!(dir.join("control.sqlite").exists(), db.engine() == Engine::Sqlite);
    }
    // A destination created through one process's API reaches the other at its refresh.
    let mut d3 = b.snapshot().destinations["d1"].clone();
    d3.id = "d3".into();
    d3.url = "http://127.0.0.1:9/d3".into();
    a.with_control(|c| c.put_destination(&d3)).unwrap();
    a.with_control(|c| c.put_connection("s1", "d3")).unwrap();
    b.refresh().unwrap();
    let snap = b.snapshot();
    assert_eq!(snap.destinations["d3"].url, "http://127.0.0.1:9/d3");
    assert!(snap.connections["s1"].contains(&"d3".to_owned()));
    assert!(snap.qos.contains_key("d3"));
}

fn a_pause_through_one_reaches_the_other_after_refresh(db: &Db<'_>) {
    let (_a_dir, _, a) = process(db);
    let (_b_dir, _, b) = process(db);
    assert!(!b.destination("d1").is_paused());
    let paused = Qos { paused: true, max_in_flight: Some(3), rate_per_sec: Some(7), priority: 5 };
    a.with_control(|c| c.put_qos("d1", &paused)).unwrap();
    a.refresh().unwrap();
    assert!(a.destination("d1").is_paused());
    // B sees it at its next refresh (the 2 s timer in a server), not before.
    assert!(!b.destination("d1").is_paused());
    b.refresh().unwrap();
    assert!(b.destination("d1").is_paused());
    assert!(!b.destination("d2").is_paused());
    let q = &b.snapshot().qos["d1"];
    assert_eq!((q.paused, q.max_in_flight, q.rate_per_sec, q.priority), (true, Some(3), Some(7), 5));
    // Resume through B; A follows.
    b.with_control(|c| c.put_qos("d1", &Qos::default())).unwrap();
    a.refresh().unwrap();
    assert!(!a.destination("d1").is_paused());
    // A restart (a reseed) keeps the operator's QoS.
    a.with_control(|c| c.put_qos("d2", &paused)).unwrap();
    let (_c_dir, _, c) = process(db);
    assert!(c.destination("d2").is_paused());
}

fn seeding_twice_or_concurrently_neither_fails_nor_duplicates(db: &Db<'_>) {
    // Six processes starting at once.
    let catalogs: Vec<(Option<tempfile::TempDir>, PathBuf, Arc<Catalog>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..6).map(|_| scope.spawn(|| process(db))).collect();
        handles.into_iter().map(|h| h.join().expect("a process opened its catalog")).collect()
    });
    for (_, _, c) in &catalogs {
        assert_seeded(c);
    }
    let counts = |db: &Db<'_>| ["sources", "destinations", "connections", "destination_qos"].map(|t| count(db, t));
    assert_eq!(counts(db), [1, 2, 2, 2]);
    // And again, one after the other: nothing changes.
    let (_d1, _, _) = process(db);
    let (_d2, _, _) = process(db);
    assert_eq!(counts(db), [1, 2, 2, 2]);

    // API rows win over the config, and API deletions are remembered by a reseed.
    let a = &catalogs[0].2;
    assert!(a.with_control(|c| c.delete_destination("d2")).unwrap());
    assert!(a.with_control(|c| c.set_source_disabled("s1", true)).unwrap());
    assert!(!a.with_control(|c| c.set_source_disabled("nope", true)).unwrap());
    let (_d3, _, again) = process(db);
    let snap = again.snapshot();
    assert!(!snap.destinations.contains_key("d2"));
    assert_eq!(snap.connections["s1"], ["d1"]);
    assert_eq!(snap.sources.len(), 1);
    assert!(snap.sources[0].1, "the API's disable survives a reseed");
    assert_eq!(count(db, "api_deletions"), 1);
    // Creating a source checks id and write key across processes.
    let mut src = snap.sources[0].0.clone();
    assert!(!again.with_control(|c| c.insert_source(&src)).unwrap());
    src.id = "s2".into();
    assert!(!again.with_control(|c| c.insert_source(&src)).unwrap(), "write key k1 is taken");
    src.write_key = "k2".into();
    assert!(again.with_control(|c| c.insert_source(&src)).unwrap());
    assert!(a.with_control(|c| c.read()).unwrap().sources.iter().any(|(s, _)| s.id == "s2"));

    // A config whose source takes the API source's write key is refused, and changes nothing.
    let own = tempfile::tempdir().expect("a temp dir");
    let data_dir = if db.engine() == Engine::Sqlite { db.shared.path().to_owned() } else { own.path().to_owned() };
    let mut clash = config(db, &data_dir);
    clash.sources[0].write_key = "k2".into();
    clash.sources[0].id = "s0".into();
    let err = Catalog::open(&clash).err().expect("refused").to_string();
    assert!(err.contains("\"s0\"") && err.contains("\"s2\"") && err.contains("same write key"), "{err}");
    let ids: Vec<String> = a.with_control(|c| c.read()).unwrap().sources.into_iter().map(|(s, _)| s.id).collect();
    assert_eq!(ids, ["s1", "s2"], "the refused seed left the sources as they were");
}

fn a_replay_filed_through_one_is_seen_and_run_by_one_other(db: &Db<'_>) {
    let (_a_dir, _, a) = process(db);
    let (_b_dir, b_data, b) = process(db);
    let id = a.with_control(|c| c.request_replay("d1", 1234)).unwrap();
    let second = a.with_control(|c| c.request_replay("d2", 5678)).unwrap();
    assert!(second > id);
    let seen = b.with_control(|c| c.replay(id)).unwrap().expect("B sees A's replay");
    assert_eq!((seen.destination.as_str(), seen.since_ms, seen.state.as_str()), ("d1", 1234, "pending"));
    // B's route asks first: both replays are B's to run, and A's route does not run them too.
    let claimed: Vec<i64> = b.with_control(|c| c.unfinished_replays()).unwrap().iter().map(|r| r.id).collect();
    assert_eq!(claimed, [id, second]);
    assert!(a.with_control(|c| c.unfinished_replays()).unwrap().is_empty());
    b.with_control(|c| c.update_replay(id, "running", 0, 0, None)).unwrap();
    b.with_control(|c| c.update_replay(second, "done", 10, 4, None)).unwrap();
    // B restarted on its data_dir resumes its running replay.
    drop(b);
    let b_again = Catalog::open(&config(db, &b_data)).unwrap();
    let resumed: Vec<i64> = b_again.with_control(|c| c.unfinished_replays()).unwrap().iter().map(|r| r.id).collect();
    assert_eq!(resumed, [id]);
    b_again.with_control(|c| c.update_replay(id, "failed", 3, 0, Some("boom"))).unwrap();
    let r = a.with_control(|c| c.replay(id)).unwrap().unwrap();
    assert_eq!((r.state.as_str(), r.events, r.error.as_deref()), ("failed", 3, Some("boom")));
    let r = a.with_control(|c| c.replay(second)).unwrap().unwrap();
    assert_eq!((r.state.as_str(), r.events, r.jobs), ("done", 10, 4));
    assert!(a.with_control(|c| c.replay(id + 1000)).unwrap().is_none());
}
