//! The global store's suite, run against every engine: an SQLite file, and
//! MariaDB and PostgreSQL when `SLUICE_TEST_MYSQL_URL` /
//! `SLUICE_TEST_POSTGRES_URL` name servers (`scripts/sql.sh` starts them;
//! with `SLUICE_REQUIRE_SQL=1` a missing server fails the test instead of
//! skipping it).

use std::collections::BTreeMap;
use std::sync::{Arc, Barrier};

use sluice_cells::store::key_hash;
use sluice_cells::{Cell, CellState, CellsError, GlobalStore, Phase, Tier, UsageRow, Workspace};
use sluice_core::BucketSet;

/// A fresh store on one engine, and what keeps it alive.
struct Db {
    location: String,
    _dir: Option<tempfile::TempDir>,
}

impl Db {
    fn open(&self) -> GlobalStore {
        GlobalStore::open(&self.location).unwrap_or_else(|e| panic!("open {}: {e}", self.location))
    }
}

fn sqlite() -> Option<Db> {
    let dir = tempfile::tempdir().unwrap();
    Some(Db { location: dir.path().join("global.sqlite").display().to_string(), _dir: Some(dir) })
}

fn server(var: &str, engine: &str, test: &str) -> Option<Db> {
    use sqlx::Connection;
    let url = match std::env::var(var) {
        Ok(u) if !u.is_empty() => u,
        _ if std::env::var("SLUICE_REQUIRE_SQL").as_deref() == Ok("1") => panic!("{var} is not set and SLUICE_REQUIRE_SQL=1"),
        _ => {
            eprintln!("skipped: {var} is not set (scripts/sql.sh starts a server)");
            return None;
        }
    };
    // (MySQL names stop at 64 characters: the test's name is hashed.)
    let tag = test.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    let name = format!("sluice_cells_{tag:016x}_{}", std::process::id());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        if engine == "mysql" {
            let mut c = sqlx::MySqlConnection::connect(&url).await.unwrap();
            sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {name}")).execute(&mut c).await.unwrap();
            sqlx::raw_sql(&format!("CREATE DATABASE {name}")).execute(&mut c).await.unwrap();
        } else {
            let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
            sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut c).await.unwrap();
            sqlx::raw_sql(&format!("CREATE DATABASE {name}")).execute(&mut c).await.unwrap();
        }
    });
    let mut u = url::Url::parse(&url).unwrap();
    u.set_path(&format!("/{name}"));
    Some(Db { location: u.to_string(), _dir: None })
}

macro_rules! every_engine {
    ($($test:ident),* $(,)?) => {
        $(
            mod $test {
                #[test]
                fn sqlite() {
                    super::$test(super::sqlite().unwrap());
                }
                #[test]
                fn mariadb() {
                    if let Some(db) = super::server("SLUICE_TEST_MYSQL_URL", "mysql", stringify!($test)) {
                        super::$test(db);
                    }
                }
                #[test]
                fn postgres() {
                    if let Some(db) = super::server("SLUICE_TEST_POSTGRES_URL", "postgres", stringify!($test)) {
                        super::$test(db);
                    }
                }
            }
        )*
    };
}

every_engine!(
    workspaces_keys_and_cells_round_trip_and_keys_are_kept_hashed,
    routers_racing_to_place_a_workspace_agree_on_one_cell,
    an_override_wins_and_every_mapping_change_bumps_the_version,
    a_workspace_no_cell_can_take_is_refused_with_the_reason,
    a_usage_report_sent_twice_counts_once,
    bad_input_is_refused_with_a_clear_error,
    a_key_is_routed_in_one_read,
    a_cells_feed_holds_exactly_the_enabled_workspaces_it_serves,
    a_migration_moves_buckets_step_by_step_and_flips_the_assignment_last,
    a_migration_is_started_once_and_aborted_only_before_anything_moved,
);

fn a_cells_feed_holds_exactly_the_enabled_workspaces_it_serves(db: Db) {
    let store = db.open();
    store.put_cell(&cell("fa", Tier::Smb, &[])).unwrap();
    for w in ["w1", "w2", "w3"] {
        store.put_workspace(&workspace(w, Tier::Smb, &[])).unwrap();
        store.add_write_key(&format!("wk_{w}"), w, &format!("{w}-web")).unwrap();
    }
    let dest = |id: &str| serde_json::json!({"id": id, "url": format!("https://example.com/{id}")});
    store.put_destination("w1", "w1-hook", &dest("w1-hook")).unwrap();
    store.put_destination("w2", "w2-hook", &dest("w2-hook")).unwrap();
    store.put_connection("w1", "w1-web", "w1-hook").unwrap();
    store.put_connection("w2", "w2-web", "w2-hook").unwrap();
    store.place("w1").unwrap();
    store.place("w2").unwrap();
    store.put_cell(&cell("fb", Tier::Smb, &[])).unwrap();
    store.set_override("w2", "fb", "testing").unwrap();

    let a = store.cell_feed("fa").unwrap();
    assert_eq!(a.workspaces, ["w1"]);
    assert_eq!(a.sources.len(), 1);
    assert_eq!((a.sources[0].id.as_str(), a.sources[0].workspace.as_deref()), ("w1-web", Some("w1")));
    assert_eq!(a.sources[0].write_key, format!("sha256:{}", hex::encode(key_hash("wk_w1"))), "the key's hash, never the key");
    assert_eq!(a.destinations.len(), 1);
    assert_eq!(a.destinations[0].config["id"], "w1-hook");
    assert_eq!(a.connections.len(), 1);
    let b = store.cell_feed("fb").unwrap();
    assert_eq!((b.workspaces.as_slice(), b.sources[0].id.as_str()), (["w2".to_owned()].as_slice(), "w2-web"), "the override's cell");
    assert!(store.key_served_by("fb", &key_hash("wk_w2")).unwrap());
    assert!(!store.key_served_by("fa", &key_hash("wk_w2")).unwrap());
    assert!(!store.key_served_by("fa", &key_hash("wk_w3")).unwrap(), "w3 is not placed");

    // The ETag follows the content, nothing else.
    let (_, etag) = a.body_and_etag();
    assert_eq!(store.cell_feed("fa").unwrap().body_and_etag().1, etag);
    store.put_destination("w1", "w1-hook", &serde_json::json!({"id": "w1-hook", "url": "https://example.com/moved"})).unwrap();
    assert_ne!(store.cell_feed("fa").unwrap().body_and_etag().1, etag);
    // A disabled workspace leaves its cell's feed.
    store.put_workspace(&Workspace { disabled: true, ..workspace("w1", Tier::Smb, &[]) }).unwrap();
    let a = store.cell_feed("fa").unwrap();
    assert!(a.workspaces.is_empty() && a.sources.is_empty() && a.destinations.is_empty() && a.connections.is_empty(), "{a:?}");

    // Ids are owned: another workspace's destination or source is refused, with the reason.
    let err = store.put_destination("w2", "w1-hook", &dest("w1-hook")).unwrap_err().to_string();
    assert!(err.contains("belongs to workspace \"w1\""), "{err}");
    assert!(store.put_connection("w2", "w1-web", "w2-hook").is_err(), "w1's source");
    assert!(store.put_connection("w2", "w2-web", "w1-hook").is_err(), "w1's destination");
    assert!(store.put_destination("w1", "bad", &serde_json::json!({"id": "bad", "url": "ftp://x"})).is_err());
    assert!(store.put_destination("w1", "other", &dest("w1-hook")).is_err(), "the id inside must match");
    // One key per source; a rotation replaces it.
    let err = store.add_write_key("wk_second", "w2", "w2-web").unwrap_err().to_string();
    assert!(err.contains("has a key already"), "{err}");
    assert!(store.rotate_write_key("w2", "w2-web", "wk_w2_new").unwrap());
    assert!(store.route_key("wk_w2").unwrap().is_none());
    assert_eq!(store.route_key("wk_w2_new").unwrap().unwrap().source, "w2-web");
    // A removed source's id is never another workspace's (its events stay in the logs under it); its own may add it again.
    store.add_write_key("wk_gone", "w1", "w1-gone").unwrap();
    assert!(store.remove_source("w1", "w1-gone").unwrap());
    let err = store.add_write_key("wk_taken", "w2", "w1-gone").unwrap_err().to_string();
    assert!(err.contains("never given to another workspace"), "{err}");
    assert!(store.add_write_key("wk_back", "w1", "w1-gone").unwrap());
    // All placements in one read agree with each workspace's own.
    for (w, at) in store.placements().unwrap() {
        assert_eq!(at, store.resolve(&w.id).unwrap(), "{}", w.id);
    }
    assert!(store.placements().unwrap().iter().any(|(w, at)| w.id == "w3" && at.is_none()), "w3 is not placed");
    assert!(store.delete_destination("w2", "w2-hook").unwrap());
    assert!(store.cell_feed("fb").unwrap().connections.is_empty(), "its connections went with it");

    // Cell tokens: kept hashed, replaced by a new one.
    let t1 = store.new_cell_token("fa").unwrap();
    assert!(store.cell_token_matches("fa", &t1).unwrap());
    assert!(!store.cell_token_matches("fb", &t1).unwrap());
    let t2 = store.new_cell_token("fa").unwrap();
    assert!(!store.cell_token_matches("fa", &t1).unwrap() && store.cell_token_matches("fa", &t2).unwrap());
    assert!(matches!(store.new_cell_token("nope"), Err(CellsError::NoCell(_))));
}

/// `route_key`, a router's cache miss in one statement: the key's
/// workspace, its override or assignment, and that cell's row.
fn a_key_is_routed_in_one_read(db: Db) {
    let store = db.open();
    store.put_cell(&cell("r1", Tier::Smb, &[])).unwrap();
    store.put_cell(&cell("r2", Tier::Smb, &[])).unwrap();
    let w = workspace("routed", Tier::Smb, &[]);
    store.put_workspace(&w).unwrap();
    store.add_write_key("wk_routed", "routed", "app").unwrap();
    let before = store.route_key("wk_routed").unwrap().unwrap();
    assert!(before.served.is_none());
    let (placed, row) = store.place_new(before.workspace.as_ref().unwrap()).unwrap();
    assert!(placed.new);
    assert_eq!(row.as_ref().map(|c| c.id.as_str()), Some(placed.cell.as_str()));
    // A second placement (a router that had read "not placed" too) loses the race and reads the winner.
    let (again, row) = store.place_new(&w).unwrap();
    assert_eq!((again.cell.as_str(), again.new), (placed.cell.as_str(), false));
    assert_eq!(row.unwrap().id, placed.cell);
    let (p, c) = store.route_key("wk_routed").unwrap().unwrap().served.unwrap();
    assert_eq!((p.cell.as_str(), p.new, c.unwrap()), (placed.cell.as_str(), false, cell(&placed.cell, Tier::Smb, &[])));
    let other = if placed.cell == "r1" { "r2" } else { "r1" };
    store.set_override("routed", other, "testing").unwrap();
    let (p, c) = store.route_key("wk_routed").unwrap().unwrap().served.unwrap();
    assert_eq!((p.cell.as_str(), p.reason.as_str(), c.unwrap().id.as_str()), (other, "override: testing", other));
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn workspace(id: &str, tier: Tier, constraints: &[(&str, &str)]) -> Workspace {
    Workspace { id: id.into(), name: format!("{id} Inc."), tier, constraints: map(constraints), disabled: false }
}

fn cell(id: &str, tier: Tier, attributes: &[(&str, &str)]) -> Cell {
    Cell {
        id: id.into(),
        tier,
        ingest_url: format!("http://127.0.0.1:1/{id}"),
        admin_url: String::new(),
        state: CellState::Active,
        attributes: map(attributes),
    }
}

fn workspaces_keys_and_cells_round_trip_and_keys_are_kept_hashed(db: Db) {
    let store = db.open();
    let w = workspace("acme", Tier::Mid, &[("data_residency", "eu")]);
    store.put_workspace(&w).unwrap();
    assert_eq!(store.workspace("acme").unwrap(), Some(w.clone()));
    assert_eq!(store.workspace("nobody").unwrap(), None);

    assert!(store.add_write_key("wk_secret_key_123", "acme", "web").unwrap());
    assert!(!store.add_write_key("wk_secret_key_123", "acme", "other").unwrap(), "a key names one source");
    let entry = store.route_key("wk_secret_key_123").unwrap().expect("found");
    assert_eq!((entry.workspace_id.as_str(), entry.source.as_str(), entry.workspace.as_ref()), ("acme", "web", Some(&w)));
    assert!(entry.served.is_none(), "not placed yet");
    assert!(store.route_key("wk_secret_key_124").unwrap().is_none());
    assert!(matches!(store.add_write_key("k", "nobody", "s"), Err(CellsError::NoWorkspace(_))));

    // A disabled workspace's keys resolve, marked disabled (the router refuses them).
    store.put_workspace(&Workspace { disabled: true, ..w.clone() }).unwrap();
    assert!(store.route_key("wk_secret_key_123").unwrap().unwrap().workspace.unwrap().disabled);

    // Reopened (another process): the same rows.
    let again = db.open();
    let c = cell("eu-1", Tier::Mid, &[("data_residency", "eu")]);
    again.put_cell(&c).unwrap();
    assert_eq!(store.cells().unwrap(), vec![c.clone()]);
    store.set_cell_state("eu-1", CellState::Full).unwrap();
    assert_eq!(again.cell("eu-1").unwrap().unwrap().state, CellState::Full);
    assert!(matches!(store.set_cell_state("nope", CellState::Full), Err(CellsError::NoCell(_))));

    assert!(store.remove_write_key("wk_secret_key_123").unwrap());
    assert!(!store.remove_write_key("wk_secret_key_123").unwrap());
    assert!(store.route_key("wk_secret_key_123").unwrap().is_none());

    // The key itself is nowhere in the database: only its SHA-256.
    store.put_workspace(&w).unwrap();
    store.add_write_key("wk_plain_text_must_not_leak", "acme", "web").unwrap();
    let dump = dump_write_keys(&db);
    assert!(!dump.contains("wk_plain_text_must_not_leak"), "{dump}");
    assert!(dump.contains(&hex::encode(key_hash("wk_plain_text_must_not_leak"))), "{dump}");
}

/// Every column of the write_keys table as text (bytes as hex), via the engine's own client.
fn dump_write_keys(db: &Db) -> String {
    use sqlx::{Connection, Row};
    let sql = "SELECT key_hash, workspace, source FROM sluice_global_write_keys";
    if !db.location.contains("://") {
        let c = rusqlite_open(&db.location);
        return c;
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut out = String::new();
        if db.location.starts_with("mysql") {
            let mut c = sqlx::MySqlConnection::connect(&db.location).await.unwrap();
            for r in sqlx::query(sql).fetch_all(&mut c).await.unwrap() {
                // (Key columns are binary-collated: bytes to sqlx.)
                let text = |i: usize| String::from_utf8_lossy(&r.get::<Vec<u8>, _>(i)).into_owned();
                out.push_str(&format!("{} {} {}\n", hex::encode(r.get::<Vec<u8>, _>(0)), text(1), text(2)));
            }
        } else {
            let mut c = sqlx::PgConnection::connect(&db.location).await.unwrap();
            for r in sqlx::query(sql).fetch_all(&mut c).await.unwrap() {
                let hash: Vec<u8> = r.get(0);
                out.push_str(&format!("{} {} {}\n", hex::encode(hash), r.get::<String, _>(1), r.get::<String, _>(2)));
            }
        }
        out
    })
}

/// The SQLite file's bytes, as lossy text with the hashes in hex: the raw
/// file must not hold the key anywhere (pages, free lists, WAL aside).
fn rusqlite_open(path: &str) -> String {
    let mut out = String::new();
    for file in [path.to_owned(), format!("{path}-wal")] {
        if let Ok(bytes) = std::fs::read(&file) {
            out.push_str(&String::from_utf8_lossy(&bytes));
            out.push_str(&hex::encode(&bytes));
        }
    }
    out
}

fn routers_racing_to_place_a_workspace_agree_on_one_cell(db: Db) {
    let store = db.open();
    for id in ["smb-1", "smb-2", "smb-3"] {
        store.put_cell(&cell(id, Tier::Smb, &[])).unwrap();
    }
    for round in 0..5 {
        let ws = format!("new-{round}");
        store.put_workspace(&workspace(&ws, Tier::Smb, &[])).unwrap();
        let before = store.mapping_version().unwrap();
        // Eight routers, each with its own connection, place it at the same moment.
        let barrier = Arc::new(Barrier::new(8));
        let placements: Vec<_> = (0..8)
            .map(|_| {
                let (router, barrier, ws) = (db.open(), barrier.clone(), ws.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    router.place(&ws).unwrap()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        let cells: std::collections::HashSet<&str> = placements.iter().map(|p| p.cell.as_str()).collect();
        assert_eq!(cells.len(), 1, "round {round}: {placements:?}");
        assert_eq!(placements.iter().filter(|p| p.new).count(), 1, "one placement made it: {placements:?}");
        assert_eq!(store.mapping_version().unwrap(), before, "a first placement changes nothing a router cached: no bump");
        assert_eq!(store.resolve(&ws).unwrap().unwrap().cell, placements[0].cell);
    }
    // Least loaded: five workspaces over three empty cells spread 2/2/1.
    let mut counts: Vec<u64> = store.workspace_counts().unwrap().into_values().collect();
    counts.sort();
    assert_eq!(counts, [1, 2, 2]);
}

fn an_override_wins_and_every_mapping_change_bumps_the_version(db: Db) {
    let store = db.open();
    let v0 = store.mapping_version().unwrap();
    store.put_cell(&cell("a", Tier::Enterprise, &[])).unwrap();
    store.put_cell(&cell("b", Tier::Enterprise, &[])).unwrap();
    store.put_workspace(&workspace("big", Tier::Enterprise, &[])).unwrap();
    store.add_write_key("wk_big", "big", "web").unwrap();
    assert_eq!(store.mapping_version().unwrap(), v0 + 4);
    let placed = store.place("big").unwrap();
    assert_eq!((placed.cell.as_str(), placed.new), ("a", true), "a, by id, both empty");
    assert!(placed.reason.contains("least-loaded active enterprise cell"), "{}", placed.reason);
    let again = store.place("big").unwrap();
    assert_eq!((again.cell.as_str(), again.new), ("a", false), "placed once");
    assert_eq!(store.mapping_version().unwrap(), v0 + 4, "a first placement: no bump");

    store.set_override("big", "b", "quarantine").unwrap();
    let over = store.resolve("big").unwrap().unwrap();
    assert_eq!(over.cell, "b");
    assert_eq!(over.reason, "override: quarantine");
    assert_eq!(store.place("big").unwrap().cell, "b");
    assert_eq!(store.mapping_version().unwrap(), v0 + 5);
    assert!(matches!(store.set_override("big", "zzz", "x"), Err(CellsError::NoCell(_))));
    // Red team: an override for a workspace that does not exist, or to a cell that serves nobody.
    assert!(matches!(store.set_override("ghost", "a", "x"), Err(CellsError::NoWorkspace(_))));
    store.put_cell(&Cell { state: CellState::Retired, ..cell("old", Tier::Enterprise, &[]) }).unwrap();
    assert!(store.set_override("big", "old", "x").unwrap_err().to_string().contains("is retired"));
    assert!(store.clear_override("big").unwrap());
    assert!(!store.clear_override("big").unwrap());
    assert_eq!(store.resolve("big").unwrap().unwrap().cell, "a", "back to its assignment");
    store.set_cell_state("b", CellState::Draining).unwrap();
    assert_eq!(store.mapping_version().unwrap(), v0 + 8, "(the retired cell's put counts too)");
}

fn a_workspace_no_cell_can_take_is_refused_with_the_reason(db: Db) {
    let store = db.open();
    store.put_workspace(&workspace("eu-co", Tier::Mid, &[("data_residency", "eu")])).unwrap();
    match store.place("eu-co") {
        Err(CellsError::Unplaceable { reason, .. }) => assert_eq!(reason, "there are no cells"),
        other => panic!("{other:?}"),
    }
    store.put_cell(&cell("us-1", Tier::Mid, &[("data_residency", "us")])).unwrap();
    store.put_cell(&Cell { state: CellState::Full, ..cell("eu-full", Tier::Mid, &[("data_residency", "eu")]) }).unwrap();
    let err = store.place("eu-co").unwrap_err().to_string();
    assert!(err.contains("workspace \"eu-co\" cannot be placed"), "{err}");
    assert!(err.contains("us-1: data_residency = \"us\", not \"eu\""), "{err}");
    assert!(err.contains("eu-full: state full"), "{err}");
    assert_eq!(store.resolve("eu-co").unwrap(), None, "nothing assigned");
    assert!(matches!(store.place("ghost"), Err(CellsError::NoWorkspace(_))));
    // A cell that satisfies it arrives: placed there.
    store.put_cell(&cell("eu-2", Tier::Mid, &[("data_residency", "eu")])).unwrap();
    assert_eq!(store.place("eu-co").unwrap().cell, "eu-2");
}

fn a_usage_report_sent_twice_counts_once(db: Db) {
    let store = db.open();
    for (c, w) in [("cell-1", "acme"), ("cell-2", "beta")] {
        store.put_cell(&cell(c, Tier::Smb, &[])).unwrap();
        store.put_workspace(&workspace(w, Tier::Smb, &[])).unwrap();
        store.set_override(w, c, "testing").unwrap();
    }
    let hour = 1_764_590_400; // 2025-12-01T12:00:00Z
    let row_of = move |workspace: &str, metric: &str, destination: &str, value: i64| UsageRow {
        workspace: workspace.into(),
        hour,
        destination: destination.into(),
        metric: metric.into(),
        value,
    };
    let row = move |metric: &str, destination: &str, value: i64| row_of("acme", metric, destination, value);
    let report = vec![row("accepted", "", 100), row("duplicates", "", 3), row("delivered", "crm", 97)];
    let counted = |o: sluice_cells::ReportOutcome| o.counted;
    assert!(counted(store.record_usage("cell-1", "cell-1/1764590400/1", &report).unwrap()));
    assert!(!counted(store.record_usage("cell-1", "cell-1/1764590400/1", &report).unwrap()), "the same report again");
    // Another report of the same hour adds; report ids are per cell.
    assert!(counted(store.record_usage("cell-1", "cell-1/1764590400/2", &[row("accepted", "", 5)]).unwrap()));
    let other = store.record_usage("cell-2", "cell-1/1764590400/1", &[row_of("beta", "accepted", "", 7)]).unwrap();
    assert!(other.counted && other.refused.is_empty(), "ids are per cell: {other:?}");
    // Red team: copies of one row add up before writing (23,500 copies were 23,500 updates of one row),
    // and many distinct rows go in several statements.
    assert!(counted(store.record_usage("cell-1", "copies", &vec![row("copied", "", 2); 500]).unwrap()));
    let many: Vec<UsageRow> = (0..450).map(|i| row("per_destination", &format!("d{i}"), 1)).collect();
    assert!(counted(store.record_usage("cell-1", "many", &many).unwrap()));
    let usage = store.usage("acme", hour, hour + 3600).unwrap();
    assert_eq!(usage.iter().filter(|r| r.metric == "copied").map(|r| r.value).collect::<Vec<_>>(), [1000]);
    assert_eq!(usage.iter().filter(|r| r.metric == "per_destination").count(), 450);
    // Red team: a cell reporting for a workspace it does not serve (or that does not exist) adds nothing to it.
    let forged = store.record_usage("cell-2", "forged", &[row("accepted", "", 1_000_000), row_of("ghost", "accepted", "", 1)]).unwrap();
    assert_eq!(forged.refused, ["acme", "ghost"]);
    let usage = store.usage("acme", hour, hour + 3600).unwrap();
    let total = |metric: &str| usage.iter().filter(|r| r.metric == metric).map(|r| r.value).sum::<i64>();
    assert_eq!((total("accepted"), total("duplicates"), total("delivered")), (105, 3, 97));
    assert!(store.usage("acme", hour + 3600, hour + 7200).unwrap().is_empty());
    assert!(store.usage("other", hour, hour + 3600).unwrap().is_empty());

    // Reports racing from several threads, each sent twice: every one counted once.
    let threads: Vec<_> = (0..6)
        .map(|i| {
            let store = db.open();
            std::thread::spawn(move || {
                for _ in 0..2 {
                    store.record_usage("cell-1", &format!("r{i}"), &[row("accepted", "", 10)]).unwrap();
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    let usage = store.usage("acme", hour, hour + 3600).unwrap();
    assert_eq!(usage.iter().filter(|r| r.metric == "accepted").map(|r| r.value).sum::<i64>(), 165);
}

fn bad_input_is_refused_with_a_clear_error(db: Db) {
    let store = db.open();
    for id in ["", "has space", "semi;colon", &"x".repeat(65)] {
        let e = store.put_workspace(&workspace(id, Tier::Smb, &[])).unwrap_err().to_string();
        assert!(e.contains("invalid workspace id"), "{e}");
        let e = store.put_cell(&cell(id, Tier::Smb, &[])).unwrap_err().to_string();
        assert!(e.contains("invalid cell id"), "{e}");
    }
    // Red team: a URL the router would append `/v1/track` to after a query.
    for url in ["http://127.0.0.1:1/?a=b", "http://h/#x", "ftp://h", "http://", "http:///path", "http://h/ x"] {
        let c = Cell { ingest_url: url.into(), ..cell("c1", Tier::Smb, &[]) };
        assert!(store.put_cell(&c).unwrap_err().to_string().contains("invalid ingest_url"), "{url}");
    }
    store.put_cell(&Cell { ingest_url: "https://lb.example/cell-1".into(), ..cell("c1", Tier::Smb, &[]) }).expect("a path prefix is fine");
    store.put_workspace(&workspace("ok", Tier::Smb, &[])).unwrap();
    assert!(store.add_write_key("", "ok", "s").is_err());
    assert!(store.add_write_key(&"k".repeat(2000), "ok", "s").is_err());
    let bad_row = UsageRow { workspace: "ok".into(), hour: 0, destination: String::new(), metric: "accepted".into(), value: -1 };
    assert!(store.record_usage("c", "r", std::slice::from_ref(&bad_row)).is_err(), "negative counts");
    // Red team: a value that would overflow the sums, an hour that is not an hour's start, one far in the future.
    for bad in [
        UsageRow { value: i64::MAX, ..bad_row.clone() },
        UsageRow { value: 1, hour: 1801, ..bad_row.clone() },
        UsageRow { value: 1, hour: -3600, ..bad_row.clone() },
        UsageRow { value: 1, hour: 4_102_444_800, ..bad_row.clone() },
    ] {
        assert!(store.record_usage("c", "r", std::slice::from_ref(&bad)).is_err(), "{bad:?}");
    }
    assert!(store.record_usage("c", "", &[]).is_err(), "empty report id");
    // Nothing half-written by the refusals.
    assert_eq!(store.workspaces().unwrap().len(), 1);
    assert_eq!(store.cells().unwrap().len(), 1, "only the valid cell");
    assert!(store.usage("ok", 0, 3600).unwrap().is_empty());
    // A key with quotes, NUL and non-ASCII is just bytes to hash.
    assert!(store.add_write_key("k'\"\0é\u{1F600}", "ok", "s").unwrap());
    assert_eq!(store.route_key("k'\"\0é\u{1F600}").unwrap().unwrap().workspace_id, "ok");
}

/// Red team: a router kept its connection on a store file that had been
/// replaced (a backup restored with `mv`) or deleted, and routed from the
/// old rows without a word. The path is opened again when its file
/// changes; a file removed is an error, never a new empty store.
#[test]
fn an_sqlite_store_replaced_or_removed_under_an_open_handle_is_noticed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("global.sqlite");
    let router = GlobalStore::open(path.to_str().unwrap()).unwrap();
    router.put_workspace(&workspace("old", Tier::Smb, &[])).unwrap();
    // Another store file, moved over the path.
    let other_path = dir.path().join("restored.sqlite");
    let other = GlobalStore::open(other_path.to_str().unwrap()).unwrap();
    other.put_workspace(&workspace("restored", Tier::Smb, &[])).unwrap();
    drop(other);
    std::fs::rename(&other_path, &path).unwrap();
    let ids: Vec<String> = router.workspaces().unwrap().into_iter().map(|w| w.id).collect();
    assert_eq!(ids, ["restored"], "the file now at the path is read");
    // Removed: an error, and nothing created.
    std::fs::remove_file(&path).unwrap();
    let e = router.workspaces().unwrap_err().to_string();
    assert!(e.contains("removed while in use"), "{e}");
    assert!(!path.exists(), "no new empty store");
}

/// Two cells, one workspace placed in the first, with a key.
fn moving_workspace(store: &GlobalStore) {
    store.put_cell(&cell("src", Tier::Smb, &[])).unwrap();
    store.put_cell(&cell("dst", Tier::Smb, &[])).unwrap();
    store.put_workspace(&workspace("mover", Tier::Smb, &[])).unwrap();
    store.add_write_key("wk_mover", "mover", "mover-app").unwrap();
    store.set_override("mover", "src", "placed for the test").unwrap();
}

fn a_migration_moves_buckets_step_by_step_and_flips_the_assignment_last(db: Db) {
    let store = db.open();
    moving_workspace(&store);
    store.place("mover").unwrap();
    let v0 = store.mapping_version().unwrap();
    let m = store.start_migration("mover", "dst", &[10, 50, 100], false).unwrap();
    assert_eq!((m.phase, m.step, m.moved, m.fenced, m.source_cell.as_str()), (Phase::Copying, 0, BucketSet::NONE, BucketSet::NONE, "src"));
    assert!(store.mapping_version().unwrap() > v0, "routers must see the migration");
    // Both cells serve the workspace while it moves (the target needs its config, the source delivers what it holds).
    assert_eq!(store.served_by("dst").unwrap(), vec!["mover".to_owned()]);
    assert_eq!(store.served_by("src").unwrap(), vec!["mover".to_owned()]);
    assert!(store.key_served_by("dst", &key_hash("wk_mover")).unwrap());
    let split = store.route_key("wk_mover").unwrap().unwrap().split.unwrap();
    assert_eq!(
        (split.target_cell.as_str(), split.moved, split.fenced, split.target.unwrap().id),
        ("dst", BucketSet::NONE, BucketSet::NONE, "dst".into())
    );
    // An override would take the workspace from under the migration: neither set nor cleared.
    assert!(err_text(store.set_override("mover", "dst", "no")).contains("being moved"));
    assert!(err_text(store.clear_override("mover")).contains("being moved"));

    let mut expected_moved = BucketSet::NONE;
    for (step, percent) in [10u8, 50, 100].into_iter().enumerate() {
        // Out of order or twice changes nothing.
        assert!(!store.finish_cutover(&m.id, step).unwrap());
        assert!(!store.begin_cutover(&m.id, step + 1).unwrap());
        let v = store.mapping_version().unwrap();
        assert!(store.begin_cutover(&m.id, step).unwrap());
        assert!(!store.begin_cutover(&m.id, step).unwrap(), "a replayed transition changes nothing");
        assert!(store.mapping_version().unwrap() > v);
        let now = store.migration(&m.id).unwrap().unwrap();
        let fenced = BucketSet::first(percent).minus(expected_moved);
        assert_eq!((now.phase, now.fenced, now.moved), (Phase::Cutover, fenced, expected_moved));
        // No bucket is accepted by both sides, and the fenced ones by neither.
        let (a, b) = (now.accepted_by("src").unwrap(), now.accepted_by("dst").unwrap());
        assert!(a.intersect(b).is_empty() && a.union(b).union(fenced) == BucketSet::ALL && a.union(b).intersect(fenced).is_empty());
        let route = store.route_key("wk_mover").unwrap().unwrap();
        assert_eq!(route.split.as_ref().unwrap().fenced, fenced);
        assert_eq!(route.served.unwrap().0.cell, "src", "the assignment flips with the last step only");
        assert!(store.abort_migration(&m.id).is_err(), "no abort during a cutover");
        assert!(store.finish_cutover(&m.id, step).unwrap());
        assert!(!store.finish_cutover(&m.id, step).unwrap());
        expected_moved = BucketSet::first(percent);
        let now = store.migration(&m.id).unwrap().unwrap();
        assert_eq!((now.moved, now.fenced, now.step), (expected_moved, BucketSet::NONE, step + 1));
    }
    let now = store.migration(&m.id).unwrap().unwrap();
    assert_eq!(now.phase, Phase::Draining);
    let route = store.route_key("wk_mover").unwrap().unwrap();
    let (placed, row) = route.served.unwrap();
    assert_eq!((placed.cell.as_str(), row.unwrap().id.as_str()), ("dst", "dst"));
    assert!(placed.reason.contains(&m.id), "{}", placed.reason);
    assert!(err_text(store.abort_migration(&m.id)).contains("move the workspace back"));
    // The source keeps the workspace's config while it drains.
    assert_eq!(store.served_by("src").unwrap(), vec!["mover".to_owned()]);
    assert!(store.report_migration(&m.id, "source", &serde_json::json!({"pending_jobs": 3})).unwrap());
    assert!(store.report_migration(&m.id, "target", &serde_json::json!({"keys_imported": 7})).unwrap());
    let p = store.migration(&m.id).unwrap().unwrap().progress;
    assert_eq!((p["source"]["pending_jobs"].as_i64(), p["target"]["keys_imported"].as_i64()), (Some(3), Some(7)));
    assert!(store.report_migration(&m.id, "anyone", &serde_json::json!({})).is_err());
    assert!(!store.finish_migration(&m.id).unwrap(), "cleanup comes first");
    assert!(store.begin_cleanup(&m.id).unwrap());
    assert!(store.finish_migration(&m.id).unwrap());
    assert!(!store.finish_migration(&m.id).unwrap());
    assert_eq!(store.migration(&m.id).unwrap().unwrap().phase, Phase::Done);
    assert!(store.served_by("src").unwrap().is_empty());
    assert!(store.route_key("wk_mover").unwrap().unwrap().split.is_none());
    assert!(store.active_migrations().unwrap().is_empty());
    // Not straight back into the cell it left (its cleanup's forget records could take the returning keys)...
    assert!(err_text(store.start_migration("mover", "src", &[100], false)).contains("minutes ago"));
    // ...but on to a third.
    store.put_cell(&cell("third", Tier::Smb, &[])).unwrap();
    let on = store.start_migration("mover", "third", &[100], false).unwrap();
    assert_eq!((on.source_cell.as_str(), on.target_cell.as_str()), ("dst", "third"));
    // A workspace's moves, oldest first (where a replay finds its earlier cells); a settings report is kept beside the others.
    let all: Vec<String> = store.migrations_of_workspace("mover").unwrap().into_iter().map(|m| m.id).collect();
    assert_eq!(all, vec![m.id.clone(), on.id.clone()]);
    assert!(store.migrations_of_workspace("nobody").unwrap().is_empty());
    assert!(store.report_migration(&on.id, "settings", &serde_json::json!({"copy_rate": 5})).unwrap());
    assert!(store.report_migration(&on.id, "source", &serde_json::json!({"keys_sent": 1})).unwrap());
    let progress = store.migration(&on.id).unwrap().unwrap().progress;
    assert_eq!((&progress["settings"]["copy_rate"], &progress["source"]["keys_sent"]), (&serde_json::json!(5), &serde_json::json!(1)));
    assert!(store.report_migration(&on.id, "anyone", &serde_json::json!({})).is_err());
}

fn err_text<T: std::fmt::Debug>(r: Result<T, CellsError>) -> String {
    r.unwrap_err().to_string()
}

fn a_migration_is_started_once_and_aborted_only_before_anything_moved(db: Db) {
    let store = db.open();
    moving_workspace(&store);
    store.put_workspace(&workspace("unplaced", Tier::Smb, &[])).unwrap();
    assert!(err_text(store.start_migration("unplaced", "dst", &[100], false)).contains("not placed"));
    assert!(err_text(store.start_migration("mover", "src", &[100], false)).contains("already"));
    assert!(matches!(store.start_migration("mover", "nowhere", &[100], false), Err(CellsError::NoCell(_))));
    for bad in [&[][..], &[50], &[0, 100], &[50, 10, 100], &[100, 100]] {
        assert!(err_text(store.start_migration("mover", "dst", bad, false)).contains("rising percentages"), "{bad:?}");
    }
    store.set_cell_state("dst", CellState::Full).unwrap();
    assert!(err_text(store.start_migration("mover", "dst", &[100], false)).contains("only an active cell"));
    store.set_cell_state("dst", CellState::Active).unwrap();
    // Racing starts: one wins.
    let store = Arc::new(store);
    let barrier = Arc::new(Barrier::new(4));
    let wins: Vec<bool> = (0..4)
        .map(|_| {
            let (location, barrier) = (db.location.clone(), barrier.clone());
            std::thread::spawn(move || {
                let store = GlobalStore::open(&location).unwrap();
                barrier.wait();
                store.start_migration("mover", "dst", &[100], false).is_ok()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    assert_eq!(wins.iter().filter(|w| **w).count(), 1, "{wins:?}");
    let m = store.active_migrations().unwrap().pop().unwrap();
    assert!(store.set_migration_paused(&m.id, true).unwrap());
    assert!(!store.begin_cutover(&m.id, 0).unwrap(), "a paused migration starts no cutover");
    assert!(store.set_migration_paused(&m.id, false).unwrap());
    store.abort_migration(&m.id).unwrap();
    assert_eq!(store.migration(&m.id).unwrap().unwrap().phase, Phase::Aborted);
    assert!(store.route_key("wk_mover").unwrap().unwrap().split.is_none());
    assert!(store.served_by("dst").unwrap().is_empty());
    assert!(!store.set_migration_paused(&m.id, true).unwrap(), "an ended migration cannot be paused");
    assert!(err_text(store.abort_migration(&m.id)).contains("aborted already"));
    assert_eq!(store.migrations(10).unwrap().len(), 1);
}
