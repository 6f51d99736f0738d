//! `type = "postgres"` against the real binary and the Debian PostgreSQL:
//! every event lands as one row per table (`tracks` and its event's table,
//! `identifies`, `pages`) through a server stop and restart under traffic;
//! a crash between the commit and the `succeeded` rows loads those jobs
//! again without a second row (exactly once on messageId); schema
//! evolution: a new property adds a column, a value of another type is
//! recorded in `sluice_type_conflicts`, not fatal; a value the server
//! refuses in a batch holds back only its own event; a URL whose TLS mode
//! may fall back to plain text is refused at load.
//!
//! The suite (scripts/test.sh) sets `SLUICE_TEST_POSTGRES_URL`; without it
//! these tests skip, or fail with `SLUICE_REQUIRE_SQL`.

mod util;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use sqlx::{Connection, Row};
use util::*;

/// The shared server of the suite, or `None` (skip).
fn server_url() -> Option<String> {
    match std::env::var("SLUICE_TEST_POSTGRES_URL") {
        Ok(url) => Some(url),
        Err(_) if std::env::var_os("SLUICE_REQUIRE_SQL").is_some() => panic!("SLUICE_REQUIRE_SQL is set but SLUICE_TEST_POSTGRES_URL is not"),
        Err(_) => {
            eprintln!("skipped: SLUICE_TEST_POSTGRES_URL is not set (scripts/test.sh sets it)");
            None
        }
    }
}

/// A PostgreSQL instance of this test's own (scripts/sql.sh), to stop and start.
struct OwnPostgres {
    dir: PathBuf,
    port: u16,
}

impl OwnPostgres {
    fn start(dir: &Path) -> OwnPostgres {
        std::fs::create_dir_all(dir).unwrap();
        // The postgres user must reach the data directory.
        for d in [dir.parent().unwrap(), dir] {
            std::process::Command::new("chmod").arg("755").arg(d).status().unwrap();
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let pg = OwnPostgres { dir: dir.to_owned(), port };
        pg.run("start-postgres");
        pg
    }

    fn run(&self, what: &str) {
        let script = repo_root().join("scripts/sql.sh");
        let mut cmd = std::process::Command::new("bash");
        cmd.arg(script).arg(what).arg(&self.dir);
        if what == "start-postgres" {
            cmd.arg(self.port.to_string());
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "sql.sh {what}: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        self.run("stop");
    }
}

/// Run `sql` on `url`; each row's columns as text (NULL: "NULL").
fn query(url: &str, sql: &str) -> Vec<Vec<String>> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut c = sqlx::PgConnection::connect(url).await.unwrap_or_else(|e| panic!("connect to {url}: {e}"));
        let rows = sqlx::query(sql).fetch_all(&mut c).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
        rows.iter().map(|r| (0..r.len()).map(|i| r.try_get::<Option<String>, _>(i).unwrap().unwrap_or_else(|| "NULL".into())).collect()).collect()
    })
}

fn count(url: &str, sql: &str) -> u64 {
    try_count(url, sql).unwrap_or_else(|| panic!("{sql}: no count"))
}

/// Wait until `sql` (a count) reaches `want`; the last count.
fn wait_count(url: &str, sql: &str, want: u64, timeout: Duration) -> u64 {
    let at_least = wait_for(
        timeout,
        || {
            // The table may not exist yet.
            let n = try_count(url, sql)?;
            (n >= want).then_some(n)
        },
        || format!("{sql}: {:?} of {want}", try_count(url, sql)),
    );
    // Late repeats, if any, would show within a moment.
    std::thread::sleep(Duration::from_millis(500));
    at_least.max(count(url, sql))
}

fn try_count(url: &str, sql: &str) -> Option<u64> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut c = sqlx::PgConnection::connect(url).await.ok()?;
        let n: i64 = sqlx::query(sql).fetch_one(&mut c).await.ok()?.try_get(0).ok()?;
        Some(n as u64)
    })
}

fn pg_dest(id: &str, url: &str, extra: &str) -> String {
    format!(
        "[[destinations]]\nid = \"{id}\"\ntype = \"postgres\"\nurl = \"{url}\"\nallow_private_network = true\n\
         request_timeout = \"20s\"\ninitial_backoff = \"200ms\"\nmax_backoff = \"1s\"\nbatch_max_age = \"200ms\"\n{extra}\n"
    )
}

/// Event `i` of a mix: tracks of two names, identifies, pages.
fn mixed_event(prefix: &str, i: usize) -> Value {
    let id = format!("{prefix}-{i}");
    match i % 4 {
        0 | 1 => {
            json!({"type": "track", "messageId": id, "userId": format!("u{i}"), "event": if i % 4 == 0 { "Order Completed" } else { "Signed Up" },
                        "properties": {"i": i, "total": i as f64 + 0.5, "tags": ["a", "b"], "address": {"city": "Oslo"}},
                        "timestamp": "2026-12-01T10:00:00.000Z"})
        }
        2 => json!({"type": "identify", "messageId": id, "userId": format!("u{i}"), "traits": {"email": format!("u{i}@example.com"), "plan": "pro"}}),
        _ => {
            json!({"type": "page", "messageId": id, "anonymousId": format!("a{i}"), "name": "Home", "properties": {"url": "https://example.com/", "i": i}})
        }
    }
}

#[test]
fn postgres_destinations_load_each_event_once_through_a_server_restart() {
    if server_url().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pg = OwnPostgres::start(&dir.path().join("pg"));
    let url = pg.url();
    let sink = TestSink::start();
    let extra = format!("{}[[connections]]\nsource = \"{SOURCE_ID}\"\ndestinations = [\"warehouse\"]\n", pg_dest("warehouse", &url, ""));
    let config = write_config(dir.path(), &extra);
    let server = Server::start(&config);
    let events: Vec<Value> = (0..400).map(|i| mixed_event("r", i)).collect();
    let post = |range: std::ops::Range<usize>| {
        for chunk in events[range].chunks(25) {
            sink.post_batch(&server.addr, chunk).unwrap();
        }
    };
    post(0..100);
    let tracks = "SELECT count(*) FROM web.tracks";
    wait_count(&url, tracks, 50, Duration::from_secs(60));
    // The warehouse goes away under traffic and comes back on the same data and port.
    pg.run("stop");
    post(100..300);
    std::thread::sleep(Duration::from_secs(3));
    pg.run("start-postgres");
    post(300..400);

    assert_eq!(wait_count(&url, tracks, 200, Duration::from_secs(120)), 200, "every track event once in tracks");
    assert_eq!(wait_count(&url, "SELECT count(*) FROM web.order_completed", 100, Duration::from_secs(30)), 100);
    assert_eq!(wait_count(&url, "SELECT count(*) FROM web.signed_up", 100, Duration::from_secs(30)), 100);
    assert_eq!(wait_count(&url, "SELECT count(*) FROM web.identifies", 100, Duration::from_secs(30)), 100);
    assert_eq!(wait_count(&url, "SELECT count(*) FROM web.pages", 100, Duration::from_secs(30)), 100);
    // Retries happened (the stop was seen) and every job ended succeeded.
    let counts = wait_counts(&config, "warehouse", Duration::from_secs(30), |c| c.get("succeeded").copied() == Some(400));
    assert_eq!(counts.get("discarded"), None, "{counts:?}");

    // The rows: Segment's columns, properties flattened, types inferred.
    let row = query(
        &url,
        "SELECT id, user_id, event, event_text, i::text, total::text, tags, address_city, \
         (timestamp IS NOT NULL)::text, (received_at IS NOT NULL)::text FROM web.order_completed WHERE id = 'r-4'",
    );
    assert_eq!(
        row,
        vec![vec!["r-4", "u4", "order_completed", "Order Completed", "4", "4.5", "[\"a\",\"b\"]", "Oslo", "true", "true"]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>()]
    );
    let types = query(
        &url,
        "SELECT column_name::text, data_type::text FROM information_schema.columns WHERE table_schema = 'web' AND table_name = 'order_completed' \
         AND column_name IN ('i', 'total', 'tags', 'timestamp') ORDER BY column_name",
    );
    assert_eq!(
        types,
        [["i", "bigint"], ["tags", "text"], ["timestamp", "timestamp with time zone"], ["total", "double precision"]]
            .iter()
            .map(|r| r.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .collect::<Vec<_>>()
    );
    assert_eq!(query(&url, "SELECT email, plan FROM web.identifies WHERE id = 'r-2'"), vec![vec!["u2@example.com".to_owned(), "pro".to_owned()]]);
    server.stop();

    // A URL whose TLS mode may fall back to plain text is refused at load, naming the key.
    let (ok, stderr) = config_check(dir.path(), &format!("[[destinations]]\nid = \"w\"\ntype = \"postgres\"\nurl = \"{url}?sslmode=prefer\"\n"));
    assert!(!ok && stderr.contains("destinations[0].url") && stderr.contains("plain text"), "{stderr}");
}

/// Commit point 4 for `postgres`: a crash between the load's commit and
/// the `succeeded` rows (`deliver.after_http_success`) makes the restarted
/// director load those jobs again; `ON CONFLICT (id) DO NOTHING` keeps one
/// row each.
#[test]
fn a_crash_after_the_commit_loads_again_without_a_second_row() {
    let Some(server_url) = server_url() else { return };
    let url = create_database("postgres", &server_url, "pgdest_crash");
    let dir = tempfile::tempdir().unwrap();
    let sink = TestSink::start();
    let data = dir.path().join("data");
    let extra = format!(
        "{}[[connections]]\nsource = \"{SOURCE_ID}\"\ndestinations = [\"warehouse\"]\n",
        pg_dest("warehouse", &url, "batch_max_events = 10\nmax_in_flight = 2")
    );
    let config = write_config(dir.path(), &extra);
    let executing = crash_after_delivery(&sink, &config, &[]);
    let loaded_before = count(&url, "SELECT count(*) FROM web.tracks");
    assert!(loaded_before > 0 && loaded_before < 200, "the crash came mid-delivery ({loaded_before} loaded)");
    // Some of the `executing` jobs were committed before the crash: their load comes again.
    let committed_executing = query(&url, "SELECT id FROM web.tracks").into_iter().filter(|r| executing.contains(&r[0])).count();
    assert!(committed_executing > 0, "jobs were committed but not yet recorded succeeded at the crash");

    let acked = read_input(&data).len() as u64;
    let server = Server::start(&config);
    assert_eq!(wait_count(&url, "SELECT count(*) FROM web.tracks", acked, Duration::from_secs(90)), acked, "one row per acknowledged event");
    assert_eq!(count(&url, "SELECT count(*) FROM web.deliver_test"), acked, "one row per event in its event table");
    let counts = wait_counts(&config, "warehouse", Duration::from_secs(30), |c| c.get("succeeded").copied() == Some(acked));
    assert_eq!(counts.get("discarded"), None, "{counts:?}");
    server.stop();
}

/// Schema evolution: a new property adds a column; a value of another type
/// is left out of the row and recorded in `sluice_type_conflicts`; a value
/// the server refuses (too long for a column the user made `varchar(3)`)
/// holds back only its own event, discarded with the server's message.
#[test]
fn new_properties_add_columns_and_type_conflicts_are_recorded_not_fatal() {
    let Some(server_url) = server_url() else { return };
    let url = create_database("postgres", &server_url, "pgdest_schema");
    let dir = tempfile::tempdir().unwrap();
    let sink = TestSink::start();
    let extra = format!("{}[[connections]]\nsource = \"{SOURCE_ID}\"\ndestinations = [\"warehouse\"]\n", pg_dest("warehouse", &url, ""));
    let config = write_config(dir.path(), &extra);
    let server = Server::start(&config);
    let track = |id: &str, properties: Value| json!({"type": "track", "messageId": id, "userId": "u", "event": "Checkout", "properties": properties});

    sink.post_batch(&server.addr, &[track("s-1", json!({"amount": 5}))]).unwrap();
    wait_count(&url, "SELECT count(*) FROM web.checkout", 1, Duration::from_secs(60));
    // The user narrows a column of their own.
    query(&url, "ALTER TABLE web.checkout ADD COLUMN code varchar(3)");
    sink.post_batch(
        &server.addr,
        &[
            track("s-2", json!({"amount": "five", "color": "red"})),
            track("s-3", json!({"amount": 2.5, "code": "ABC"})),
            track("s-4", json!({"amount": 7, "code": "TOO LONG"})),
            track("s-5", json!({"amount": 8, "coupon": {"code": "X", "rate": 0.1}})),
        ],
    )
    .unwrap();
    let counts = wait_counts(&config, "warehouse", Duration::from_secs(60), |c| {
        c.get("succeeded").copied().unwrap_or(0) + c.get("discarded").copied().unwrap_or(0) == 5
    });
    assert_eq!((counts.get("succeeded"), counts.get("discarded")), (Some(&4), Some(&1)), "{counts:?}");
    let rows = query(&url, "SELECT id, amount::text, color, code, coupon_code, coupon_rate::text FROM web.checkout ORDER BY id");
    let rows: Vec<String> = rows.into_iter().map(|r| r.join("|")).collect();
    assert_eq!(
        rows,
        ["s-1|5|NULL|NULL|NULL|NULL", "s-2|NULL|red|NULL|NULL|NULL", "s-3|NULL|NULL|ABC|NULL|NULL", "s-5|8|NULL|NULL|X|0.1"],
        "the conflicting amounts left out; color and coupon_* added; s-4 not loaded"
    );
    let conflicts: Vec<String> =
        query(&url, "SELECT message_id, table_name, column_name, reason, value FROM web.sluice_type_conflicts ORDER BY message_id")
            .into_iter()
            .map(|r| r.join("|"))
            .collect();
    assert_eq!(
        conflicts,
        [
            "s-2|checkout|amount|the column is bigint; the value is text|\"five\"",
            "s-3|checkout|amount|the column is bigint; the value is double precision|2.5"
        ]
    );
    let inspected = jobs_inspect_json(&config, "s-4").unwrap().to_string();
    assert!(inspected.contains("22001") && inspected.contains("too long"), "the server's message: {inspected}");

    // More new keys than one load makes (200 schema changes): the event waits for the next
    // load, which makes the rest, and is loaded whole. Three keys for one column: each
    // value left out is recorded (none silently dropped).
    let wide: serde_json::Map<String, Value> = (0..250).map(|k| (format!("w{k}"), json!(k))).collect();
    sink.post_batch(
        &server.addr,
        &[
            json!({"type": "track", "messageId": "s-6", "userId": "u", "event": "Wide", "properties": wide}),
            track("s-7", json!({"productId": "a", "product_id": "b", "PRODUCT ID": "c"})),
        ],
    )
    .unwrap();
    wait_count(&url, "SELECT count(*) FROM web.wide", 1, Duration::from_secs(60));
    assert_eq!(query(&url, "SELECT w0::text, w249::text FROM web.wide WHERE id = 's-6'"), vec![vec!["0".to_owned(), "249".to_owned()]]);
    let dups: Vec<String> =
        query(&url, "SELECT value FROM web.sluice_type_conflicts WHERE message_id = 's-7' ORDER BY value").into_iter().map(|r| r.join("")).collect();
    let kept = query(&url, "SELECT product_id FROM web.checkout WHERE id = 's-7'").remove(0).remove(0);
    let mut all = dups.clone();
    all.push(format!("\"{kept}\""));
    all.sort();
    assert_eq!((dups.len(), all), (2, vec!["\"a\"".to_owned(), "\"b\"".to_owned(), "\"c\"".to_owned()]), "one kept, both others recorded");

    // A table the user broke (its primary key dropped) holds back only its own events.
    query(&url, "ALTER TABLE web.checkout DROP CONSTRAINT checkout_pkey");
    sink.post_batch(
        &server.addr,
        &[track("s-8", json!({"amount": 9})), json!({"type": "track", "messageId": "s-9", "userId": "u", "event": "Elsewhere"})],
    )
    .unwrap();
    wait_count(&url, "SELECT count(*) FROM web.elsewhere", 1, Duration::from_secs(60));
    let inspected = jobs_inspect_json(&config, "s-8").unwrap().to_string();
    assert!(inspected.contains("42P10") && !inspected.contains("\"discarded\""), "retried with the server's reason: {inspected}");
    query(&url, "ALTER TABLE web.checkout ADD PRIMARY KEY (id)");
    wait_count(&url, "SELECT count(*) FROM web.checkout WHERE id = 's-8'", 1, Duration::from_secs(60));
    server.stop();
}
