//! The Centrifuge against a real HTTP sink, one suite over every JobDB
//! backend: SQLite files, MariaDB and PostgreSQL (`deliver.jobdb_url`).
//! Every outcome, the request headers, the SSRF guard, rotation and drop
//! (files or tables), idempotency across sealed JobDBs, pick-up after a
//! restart and the director lock, QoS, fairness and the bounded cache; then,
//! on the database servers only, what a server adds: a lock session that
//! ends, and a database that goes away and comes back.
//!
//! Each test runs once per engine (`<test>::sqlite`, `::mariadb`,
//! `::postgres`) on a database of its own (tests/common). Without a server
//! URL the server variants are skipped with a printed reason, unless
//! `SLUICE_REQUIRE_SQL=1` (scripts/test.sh), which makes them fail.

#[macro_use]
mod common;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{job, Backend, Engine};
use hmac::{Hmac, Mac};
use sluice_core::Config;
use sluice_deliver::backend::JobDbs;
use sluice_deliver::director::LOCK_CHECK_INTERVAL;
use sluice_deliver::inspect::{self, Found};
use sluice_deliver::sink::{Behaviour, Sink};
use sluice_deliver::sqljobdb::{SqlEngine, SqlJobDbs};
use sluice_deliver::store::JobState;
use sluice_deliver::{Catalog, Centrifuge, CentrifugeOptions, DeliverError, DeliverMetrics, NewJob};

every_engine!(
    every_outcome_is_recorded_as_transitions,
    requests_carry_signatures_user_agent_and_idempotency_key,
    the_ssrf_guard_refuses_private_targets_unless_allowed,
    jobdbs_rotate_by_count_and_finished_ones_are_deleted_whole,
    inserts_are_idempotent_across_sealed_jobdbs,
    a_restart_picks_up_unfinished_jobs_and_the_lock_keeps_out_a_second_director,
    pausing_a_destination_in_the_control_tables_holds_its_jobs_until_resumed,
    a_slow_and_a_failing_destination_do_not_hold_up_the_others,
    pairs_of_one_destination_take_turns,
    a_full_cache_pages_jobs_in_and_loses_none,
    a_dead_destination_spills_to_the_jobdb_without_keeping_others_out,
    jobdbs_rotate_by_age,
    per_destination_in_flight_and_rate_limits_hold,
);

server_engines!(
    a_director_whose_lock_session_ends_takes_the_lock_again_or_stops_if_another_has_it,
    a_director_pauses_while_the_database_is_unreachable_and_resumes_when_it_is_back,
    readers_skip_a_jobdb_caught_between_its_drop_and_its_unregistering,
    readers_see_every_directors_scope_and_create_nothing,
);

/// Where a test's JobDBs live: SQLite files under its data_dir, or a database of its own.
#[derive(Clone)]
struct Db {
    engine: Engine,
    /// The test database's URL (servers only).
    url: Option<String>,
    sql: Option<SqlJobDbs>,
}

impl Db {
    fn url(&self) -> &str {
        self.url.as_deref().expect("a database server")
    }

    fn sql(&self) -> &SqlJobDbs {
        self.sql.as_ref().expect("a database server")
    }
}

fn run<F: Future<Output = ()>>(engine: Engine, name: &str, test: fn(Db) -> F) {
    // The backend (which drops the database at the end, blocking) stays outside the runtime.
    let Some(backend) = Backend::new(engine, &format!("{name}_{engine:?}")) else { return };
    let db = Db { engine, url: backend.database_url.clone(), sql: backend.sql.clone() };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("a runtime");
    rt.block_on(test(db));
    drop(rt);
    drop(backend);
}

/// `deliver`: keys of `[deliver]` (jobdb_url is added for the servers); `rest`: destinations etc.
fn config(db: &Db, data_dir: &Path, deliver: &str, rest: &str) -> Config {
    let jobdb_url = db.url.as_ref().map(|u| format!("jobdb_url = \"{u}\"\n")).unwrap_or_default();
    let text = format!(
        "[server]\ndata_dir = \"{}\"\n[[sources]]\nid = \"s1\"\nwrite_key = \"k1\"\n[[sources]]\nid = \"s2\"\nwrite_key = \"k2\"\n\
         [deliver]\n{jobdb_url}{deliver}\n{rest}",
        data_dir.display()
    );
    Config::from_toml_with_env(&text, "", &HashMap::new()).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

async fn open_centrifuge(config: &Config) -> Result<(Arc<Catalog>, Arc<Centrifuge>, DeliverMetrics), DeliverError> {
    let catalog = Catalog::open(config)?;
    let metrics = DeliverMetrics::default();
    let centrifuge = Centrifuge::open(CentrifugeOptions::from_config(config), catalog.clone(), metrics.clone()).await?;
    Ok((catalog, centrifuge, metrics))
}

/// One process's delivery wing on a test's database.
struct Env {
    db: Db,
    dir: tempfile::TempDir,
    config: Config,
    catalog: Arc<Catalog>,
    centrifuge: Arc<Centrifuge>,
    metrics: DeliverMetrics,
    jobdbs: JobDbs,
}

impl Env {
    async fn open(db: &Db, dir: tempfile::TempDir, deliver: &str, rest: &str) -> Env {
        let config = config(db, &dir.path().join("data"), deliver, rest);
        let (catalog, centrifuge, metrics) = open_centrifuge(&config).await.expect("the Centrifuge opens");
        let jobdbs = JobDbs::new(&config.server.data_dir.join("jobs"), config.deliver.jobdb_url.as_ref()).expect("the JobDBs");
        Env { db: db.clone(), dir, config, catalog, centrifuge, metrics, jobdbs }
    }

    async fn insert(&self, jobs: Vec<NewJob>) -> u64 {
        self.centrifuge.insert(jobs, sluice_deliver::now_ms()).await.unwrap()
    }

    /// The JobDBs that exist, oldest first.
    fn seqs(&self) -> Vec<u64> {
        tokio::task::block_in_place(|| self.jobdbs.list_blocking()).unwrap()
    }

    /// (destination → state → count), as `sluice jobs stats` reads it.
    fn stats(&self) -> inspect::StateCounts {
        tokio::task::block_in_place(|| inspect::stats_in(&self.jobdbs)).unwrap().1
    }

    /// Every job of `message_id`, as `sluice jobs inspect` finds it.
    fn find(&self, message_id: &str) -> Vec<Found> {
        tokio::task::block_in_place(|| inspect::find_in(&self.jobdbs, message_id)).unwrap()
    }

    /// Wait until `n` jobs are terminal (panics with the stats at the deadline).
    async fn wait_terminal(&self, n: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let stats = self.stats();
            let done: u64 = stats.values().flat_map(|m| ["succeeded", "discarded", "archived"].map(|s| m.get(s).copied().unwrap_or(0))).sum();
            if done >= n {
                return;
            }
            assert!(Instant::now() < deadline, "only {done} of {n} jobs terminal after {timeout:?}: {stats:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn states(&self, message_id: &str) -> HashMap<String, Vec<JobState>> {
        self.find(message_id).into_iter().map(|f| (f.job.job.destination.clone(), f.history.iter().map(|t| t.state).collect())).collect()
    }

    /// Run an operator's statement on the control tables (docs/CONFIG.md):
    /// `table` without the prefix the database servers' tables carry.
    async fn control_sql(&self, statement_on: impl Fn(&str) -> String) {
        match self.db.engine {
            Engine::Sqlite => {
                let control = rusqlite::Connection::open(self.config.server.data_dir.join("control.sqlite")).unwrap();
                control.execute(&statement_on("destination_qos"), []).unwrap();
            }
            _ => execute(&self.db, &statement_on("sluice_control_destination_qos")).await,
        }
    }

    /// Nothing is left of the JobDBs that are gone: no WAL, shm or lock file,
    /// or no table, besides those of the live ones.
    fn assert_nothing_left_of_dropped_jobdbs(&self) {
        let live = self.seqs();
        match &self.jobdbs {
            JobDbs::Files(dir) => {
                let leftovers: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
                assert!(
                    leftovers.iter().all(|f| live.iter().any(|s| f.starts_with(&format!("jobdb-{s:06}.")))),
                    "no WAL, shm or lock file of a dropped JobDB is left behind: {leftovers:?}"
                );
            }
            JobDbs::Sql(sql) => {
                let tables = tokio::task::block_in_place(|| sql.tables()).unwrap();
                let mut expected: Vec<String> = live
                    .iter()
                    .flat_map(|s| {
                        let (j, t) = sluice_deliver::sqljobdb::table_names(*s);
                        [t, j]
                    })
                    .collect();
                expected.sort();
                assert_eq!(tables, expected, "the tables of dropped JobDBs are gone");
                assert!(!self.config.server.data_dir.join("jobs/jobdb-000001.sqlite").exists(), "no SQLite file is made");
            }
        }
    }
}

/// Run `sql` on the test's database as another client.
async fn execute(db: &Db, sql: &str) {
    use sqlx::Connection;
    match db.engine {
        Engine::MariaDb => {
            let mut c = sqlx::MySqlConnection::connect(db.url()).await.unwrap();
            sqlx::raw_sql(sql).execute(&mut c).await.unwrap();
        }
        Engine::Postgres => {
            let mut c = sqlx::PgConnection::connect(db.url()).await.unwrap();
            sqlx::raw_sql(sql).execute(&mut c).await.unwrap();
        }
        Engine::Sqlite => unreachable!("servers only"),
    }
}

/// Poll `done` every 20 ms until it holds; panic with `what()` at the deadline.
async fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool, what: impl Fn() -> String) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "{}", what());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn dest(id: &str, url: &str, extra: &str) -> String {
    format!("[[destinations]]\nid = \"{id}\"\nurl = \"{url}\"\nallow_private_network = true\n{extra}\n")
}

fn director_refused(result: Result<(Arc<Catalog>, Arc<Centrifuge>, DeliverMetrics), DeliverError>) -> bool {
    matches!(result, Err(DeliverError::Locked(_) | DeliverError::SqlLocked { .. }))
}

use JobState::*;

async fn every_outcome_is_recorded_as_transitions(db: Db) {
    let sink = Sink::start().await.unwrap();
    sink.set("/gone", Behaviour::status(404));
    sink.set("/ni", Behaviour::status(501));
    sink.set("/flaky", Behaviour::status(503));
    sink.set("/busy", Behaviour { retry_after: Some(1), ..Behaviour::status(429) });
    sink.set("/hang", Behaviour { hang: true, ..Behaviour::default() });
    sink.set("/dead", Behaviour::status(500));
    let fast = "initial_backoff = \"50ms\"\nmax_backoff = \"100ms\"";
    let toml = [
        dest("ok", &sink.url("/ok"), ""),
        dest("gone", &sink.url("/gone"), ""),
        dest("ni", &sink.url("/ni"), ""),
        dest("flaky", &sink.url("/flaky"), fast),
        dest("busy", &sink.url("/busy"), fast),
        dest("hang", &sink.url("/hang"), &format!("{fast}\nrequest_timeout = \"300ms\"")),
        dest("refused", "http://127.0.0.1:9/nothing-listens", fast),
        dest("dead", &sink.url("/dead"), "initial_backoff = \"100ms\"\nmax_backoff = \"200ms\"\nretry_window = \"1s\""),
    ]
    .concat();
    let env = Env::open(&db, tempfile::tempdir().unwrap(), "circuit_failures = 1000", &toml).await;
    let dests = ["ok", "gone", "ni", "flaky", "busy", "hang", "refused", "dead"];
    let jobs = dests.iter().map(|d| {
        let mut j = job("m-1", "s1", d);
        if *d == "dead" {
            j.expires_at = j.created_at + 1000; // the route sets it from the destination's retry_window
        }
        j
    });
    let n = env.insert(jobs.collect()).await;
    assert_eq!(n, 8);

    // Let the retrying ones fail a few times, then heal them.
    let retried = || ["/flaky", "/busy", "/hang"].iter().all(|p| sink.received_on(p).len() >= 2);
    wait_until(Duration::from_secs(20), retried, || format!("retries did not happen: {:?}", env.states("m-1"))).await;
    for p in ["/flaky", "/busy", "/hang"] {
        sink.set(p, Behaviour::default());
    }
    // `refused` never heals: it is archived when its window ends; shorten nothing, just check it retried.
    env.wait_terminal(7, Duration::from_secs(30)).await;
    let states = env.states("m-1");
    assert_eq!(states["ok"], vec![Executing, Succeeded]);
    assert_eq!(states["gone"], vec![Executing, Discarded]);
    assert_eq!(states["ni"], vec![Executing, Discarded], "501 is not retried");
    for d in ["flaky", "busy", "hang"] {
        let s = &states[d];
        assert_eq!(s.last(), Some(&Succeeded), "{d}: {s:?}");
        assert!(s.contains(&AwaitingRetry), "{d}: {s:?}");
        assert_eq!(s.iter().filter(|x| **x == Executing).count(), s.iter().filter(|x| **x != Executing).count(), "{d}: one outcome per attempt");
    }
    assert!(states["refused"].starts_with(&[Executing, AwaitingRetry]), "{:?}", states["refused"]);
    assert_eq!(states["dead"].last(), Some(&Archived), "{:?}", states["dead"]);

    let found = env.find("m-1");
    let by_dest: HashMap<_, _> = found.iter().map(|f| (f.job.job.destination.as_str(), f)).collect();
    // 4xx: status and a body excerpt recorded.
    let gone = by_dest["gone"].history.last().unwrap();
    assert_eq!(gone.status, Some(404));
    assert!(gone.error.as_deref().unwrap().contains("sink_status"), "{gone:?}");
    // 429 with Retry-After: 1 → the retry is scheduled at least 1 s after the answer.
    let busy_retry = by_dest["busy"].history.iter().find(|t| t.state == AwaitingRetry).unwrap();
    assert_eq!(busy_retry.status, Some(429));
    assert!(busy_retry.retry_at.unwrap() - busy_retry.at >= 1000, "{busy_retry:?}");
    // A timeout and a refused connection are retried with their error recorded.
    let hang_retry = by_dest["hang"].history.iter().find(|t| t.state == AwaitingRetry).unwrap();
    assert!(hang_retry.error.as_deref().unwrap().contains("timeout"), "{hang_retry:?}");
    let refused_retry = by_dest["refused"].history.iter().find(|t| t.state == AwaitingRetry).unwrap();
    assert!(refused_retry.error.as_deref().unwrap().contains("connection"), "{refused_retry:?}");
    // Archived: the object holds the job and its whole history, and was written before `archived`.
    let dead = by_dest["dead"];
    let day = chrono_day(dead.job.job.created_at);
    let path = env.config.archive_dir().join("dead").join(day).join(format!("{}.json", dead.job.id));
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap();
    assert_eq!(doc["message_id"], "m-1");
    assert_eq!(doc["payload"]["event"], "E");
    let archived_states: Vec<_> = doc["transitions"].as_array().unwrap().iter().map(|t| t["state"].as_str().unwrap().to_owned()).collect();
    assert!(archived_states.len() >= 3 && archived_states.last().unwrap() == "archived", "{archived_states:?}");
    assert!(dead.history.iter().filter(|t| t.state == Executing).count() >= 2, "retried before archiving");
    env.centrifuge.close().await;
    drop(env.dir);
}

fn chrono_day(ms: i64) -> String {
    let days = ms.div_euclid(86_400_000);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    format!("{:04}-{:02}-{:02}", if m <= 2 { y + 1 } else { y }, m, d)
}

async fn requests_carry_signatures_user_agent_and_idempotency_key(db: Db) {
    let sink = Sink::start().await.unwrap();
    let toml = [dest("signed", &sink.url("/signed"), "secret = \"s3cret\""), dest("plain", &sink.url("/plain"), "")].concat();
    let env = Env::open(&db, tempfile::tempdir().unwrap(), "", &toml).await;
    env.insert(vec![job("m-sig", "s1", "signed"), job("m-sig", "s1", "plain")]).await;
    env.wait_terminal(2, Duration::from_secs(10)).await;

    let r = &sink.received_on("/signed")[0];
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("user-agent"), Some(concat!("Sluice/", env!("CARGO_PKG_VERSION"))));
    assert_eq!(r.header("idempotency-key"), Some("m-sig"));
    assert_eq!(r.json()["messageId"], "m-sig");
    let mut sha1 = Hmac::<sha1::Sha1>::new_from_slice(b"s3cret").unwrap();
    sha1.update(&r.body);
    assert_eq!(r.header("x-signature"), Some(hex::encode(sha1.finalize().into_bytes()).as_str()));
    let sluice_sig = r.header("x-sluice-signature").unwrap();
    let (t, v1) = sluice_sig.split_once(',').unwrap();
    let t = t.strip_prefix("t=").unwrap();
    let mut sha256 = Hmac::<sha2::Sha256>::new_from_slice(b"s3cret").unwrap();
    sha256.update(format!("{t}.").as_bytes());
    sha256.update(&r.body);
    assert_eq!(v1, format!("v1={}", hex::encode(sha256.finalize().into_bytes())));
    assert!((t.parse::<i64>().unwrap() - sluice_deliver::now_ms() / 1000).abs() < 600, "t is the unix time");

    let p = &sink.received_on("/plain")[0];
    assert_eq!(p.header("idempotency-key"), Some("m-sig"));
    assert!(p.header("x-signature").is_none() && p.header("x-sluice-signature").is_none(), "no secret, no signature");
    env.centrifuge.close().await;
}

async fn the_ssrf_guard_refuses_private_targets_unless_allowed(db: Db) {
    let sink = Sink::start().await.unwrap();
    let port = sink.addr.port();
    let guarded = |id: &str, url: String| format!("[[destinations]]\nid = \"{id}\"\nurl = \"{url}\"\n");
    let toml = [
        guarded("literal", format!("http://127.0.0.1:{port}/literal")),
        guarded("by-name", format!("http://localhost:{port}/by-name")),
        guarded("metadata", "http://169.254.169.254/latest/meta-data".into()),
        dest("allowed", &sink.url("/allowed"), ""),
    ]
    .concat();
    let env = Env::open(&db, tempfile::tempdir().unwrap(), "", &toml).await;
    env.insert(["literal", "by-name", "metadata", "allowed"].iter().map(|d| job("m-ssrf", "s1", d)).collect()).await;
    env.wait_terminal(4, Duration::from_secs(10)).await;
    for f in &env.find("m-ssrf") {
        let last = f.history.last().unwrap();
        if f.job.job.destination == "allowed" {
            assert_eq!(last.state, Succeeded);
        } else {
            assert_eq!(last.state, Discarded, "{}", f.job.job.destination);
            let e = last.error.as_deref().unwrap();
            assert!(e.contains("SSRF guard") && e.contains("allow_private_network"), "{e}");
        }
    }
    assert_eq!(sink.received().iter().map(|r| r.path.as_str()).collect::<Vec<_>>(), vec!["/allowed"], "nothing else reached the sink");
    env.centrifuge.close().await;
    drop(env);

    // The global switch lets them all through.
    let sink2 = Sink::start().await.unwrap();
    let toml = guarded("by-name", format!("http://localhost:{}/x", sink2.addr.port()));
    let env = Env::open(&db, tempfile::tempdir().unwrap(), "allow_private_network = true", &toml).await;
    env.insert(vec![job("m-ssrf2", "s1", "by-name")]).await;
    // (On a server the first part's JobDBs are still there, terminal: count arrivals instead.)
    wait_until(Duration::from_secs(10), || !sink2.received_on("/x").is_empty(), || "not delivered with the switch on".into()).await;
    assert_eq!(env.states("m-ssrf2")["by-name"], vec![Executing, Succeeded]);
    env.centrifuge.close().await;
}

async fn jobdbs_rotate_by_count_and_finished_ones_are_deleted_whole(db: Db) {
    let sink = Sink::start().await.unwrap();
    sink.set("/hold", Behaviour::status(503));
    let toml = [dest("ok", &sink.url("/ok"), ""), dest("hold", &sink.url("/hold"), "initial_backoff = \"50ms\"\nmax_backoff = \"100ms\"")].concat();
    let env = Env::open(&db, tempfile::tempdir().unwrap(), "jobdb_max_jobs = 10", &toml).await;
    // One job that cannot finish yet, in the first JobDB.
    env.insert(vec![job("held", "s1", "hold")]).await;
    for batch in 0..4 {
        assert_eq!(env.insert((0..10).map(|i| job(&format!("m-{batch}-{i}"), "s1", "ok")).collect()).await, 10);
    }
    // Rotation is checked before each insert (a batch is never split): 1 + 10 jobs in the
    // first, then 10 each. The fourth is the newest; finished sealed ones may already be gone.
    let seqs = env.seqs();
    assert_eq!(seqs.last(), Some(&4), "rotated every 10 jobs: {seqs:?}");
    // (Counting terminal jobs does not work here: dropped JobDBs take their jobs with them.)
    let delivered = || sink.received_on("/ok").len();
    wait_until(Duration::from_secs(20), || delivered() >= 40, || format!("only {} of 40 delivered", delivered())).await;
    // Every sealed JobDB but the first (which holds the unfinished job) is deleted whole.
    wait_until(Duration::from_secs(15), || env.seqs() == [1, 4], || format!("finished JobDBs not dropped: {:?}", env.seqs())).await;
    env.assert_nothing_left_of_dropped_jobdbs();
    assert_eq!(env.metrics.jobdbs_dropped.get(), 2);

    // Inserts are idempotent across the sealed JobDB still alive (the event was logged before
    // the newest existed). The insert first rotates the full JobDB 4 to a new newest, 5; 4 is
    // finished, so it is dropped.
    assert_eq!(env.centrifuge.insert(vec![job("held", "s1", "hold")], 0).await.unwrap(), 0);
    wait_until(Duration::from_secs(15), || env.seqs() == [1, 5], || format!("JobDBs {:?}, want [1, 5]", env.seqs())).await;
    // Heal the held job: its JobDB goes too.
    sink.set("/hold", Behaviour::default());
    wait_until(Duration::from_secs(15), || env.seqs() == [5], || format!("first JobDB not dropped: {:?}", env.seqs())).await;
    env.assert_nothing_left_of_dropped_jobdbs();
    // A job whose JobDB was dropped can be made again (dropped means gone; the route only
    // replays its uncommitted batch), but within live JobDBs inserts are idempotent:
    let again = env.centrifuge.insert(vec![job("m-0-5", "s1", "ok")], 0).await.unwrap();
    let twice = env.centrifuge.insert(vec![job("m-0-5", "s1", "ok")], 0).await.unwrap();
    assert_eq!((again, twice), (1, 0));
    env.centrifuge.close().await;
}

async fn inserts_are_idempotent_across_sealed_jobdbs(db: Db) {
    let sink = Sink::start().await.unwrap();
    sink.set("/hold", Behaviour::status(503));
    let toml = dest("hold", &sink.url("/hold"), "initial_backoff = \"1h\"\nmax_backoff = \"1h\"");
    let env = Env::open(&db, tempfile::tempdir().unwrap(), "jobdb_max_jobs = 3", &toml).await;
    let event_time = sluice_deliver::now_ms() - 1000; // logged before the newest JobDB existed
    let first: Vec<_> = (0..3).map(|i| job(&format!("m-{i}"), "s1", "hold")).collect();
    assert_eq!(env.centrifuge.insert(first.clone(), event_time).await.unwrap(), 3);
    // The next insert rotates; the same events again (a route replay) make no new jobs.
    assert_eq!(env.centrifuge.insert(first.clone(), event_time).await.unwrap(), 0);
    assert!(env.seqs().len() >= 2);
    // A replay generation is a new job.
    let mut replayed = first[0].clone();
    replayed.generation = 7;
    assert_eq!(env.centrifuge.insert(vec![replayed], event_time).await.unwrap(), 1);
    assert_eq!(env.metrics.jobs_duplicate.get(), 3);
    env.centrifuge.close().await;
}

async fn a_restart_picks_up_unfinished_jobs_and_the_lock_keeps_out_a_second_director(db: Db) {
    let sink = Sink::start().await.unwrap();
    sink.set("/d", Behaviour::status(503));
    let toml = dest("d", &sink.url("/d"), "initial_backoff = \"100ms\"\nmax_backoff = \"200ms\"");
    let env = Env::open(&db, tempfile::tempdir().unwrap(), "", &toml).await;
    env.insert((0..20).map(|i| job(&format!("m-{i}"), "s1", "d")).collect()).await;
    wait_until(Duration::from_secs(20), || sink.received_on("/d").len() >= 20, || "first attempts".into()).await;
    // A second process on the same JobDBs is refused: the same data_dir's lock file, or the
    // database's director lock (another data_dir, the same database).
    assert!(director_refused(open_centrifuge(&env.config).await), "a second director was let in on the same data_dir");
    if db.engine != Engine::Sqlite {
        let elsewhere = tempfile::tempdir().unwrap();
        let second = open_centrifuge(&config(&db, elsewhere.path(), "", &toml)).await;
        assert!(matches!(second, Err(DeliverError::SqlLocked { .. })), "a second director was let in: {:?}", second.err());
    }
    env.centrifuge.close().await;
    let Env { dir, .. } = env;

    // After a restart, the unfinished jobs are paged back in and delivered.
    sink.set("/d", Behaviour::default());
    let env = Env::open(&db, dir, "", &toml).await;
    env.wait_terminal(20, Duration::from_secs(20)).await;
    let stats = env.stats();
    assert_eq!(stats["d"].get("succeeded"), Some(&20), "{stats:?}");
    assert_eq!(stats["d"].len(), 1, "every job succeeded: {stats:?}");
    let found = env.find("m-3");
    assert_eq!(found.len(), 1);
    let states: Vec<JobState> = found[0].history.iter().map(|t| t.state).collect();
    assert_eq!(states.first(), Some(&Executing));
    assert_eq!(states.last(), Some(&Succeeded), "{states:?}");
    assert!(states.contains(&AwaitingRetry), "{states:?}");
    env.centrifuge.close().await;
}

async fn pausing_a_destination_in_the_control_tables_holds_its_jobs_until_resumed(db: Db) {
    let sink = Sink::start().await.unwrap();
    let toml = [dest("p", &sink.url("/p"), ""), dest("q", &sink.url("/q"), "")].concat();
    let env = Env::open(&db, tempfile::tempdir().unwrap(), "", &toml).await;
    // The statement docs/CONFIG.md gives operators.
    env.control_sql(|table| format!("UPDATE {table} SET paused = 1 WHERE destination = 'p'")).await;
    tokio::task::block_in_place(|| env.catalog.refresh()).unwrap(); // what the 2 s refresher does
    env.insert((0..10).flat_map(|i| [job(&format!("m-{i}"), "s1", "p"), job(&format!("m-{i}"), "s1", "q")]).collect()).await;
    env.wait_terminal(10, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.received_on("/q").len(), 10);
    assert_eq!(sink.received_on("/p").len(), 0, "a paused destination gets nothing");
    env.control_sql(|table| format!("UPDATE {table} SET paused = 0 WHERE destination = 'p'")).await;
    tokio::task::block_in_place(|| env.catalog.refresh()).unwrap();
    env.wait_terminal(20, Duration::from_secs(10)).await;
    assert_eq!(sink.received_on("/p").len(), 10);
    env.centrifuge.close().await;
}

async fn a_slow_and_a_failing_destination_do_not_hold_up_the_others(db: Db) {
    let sink = Sink::start().await.unwrap();
    sink.set("/slow", Behaviour { delay: Duration::from_secs(2), ..Behaviour::default() });
    sink.set("/fail", Behaviour::status(500));
    let toml = [
        dest("slow", &sink.url("/slow"), "max_in_flight = 2"),
        dest("fail", &sink.url("/fail"), "initial_backoff = \"100ms\"\nmax_backoff = \"500ms\""),
        dest("a", &sink.url("/a"), ""),
        dest("b", &sink.url("/b"), ""),
    ]
    .concat();
    let env = Env::open(&db, tempfile::tempdir().unwrap(), "circuit_failures = 3\ncircuit_cooldown = \"1s\"", &toml).await;
    let per = 50;
    let mut jobs = Vec::new();
    for i in 0..per {
        for d in ["slow", "fail", "a", "b"] {
            for s in ["s1", "s2"] {
                jobs.push(job(&format!("m-{s}-{i}"), s, d));
            }
        }
    }
    env.insert(jobs).await;
    let healthy_done = || sink.received_on("/a").len() >= 2 * per && sink.received_on("/b").len() >= 2 * per;
    wait_until(Duration::from_secs(30), healthy_done, || "healthy destinations stalled".into()).await;
    let slow_so_far = sink.received_on("/slow").len();
    let fail_attempts = sink.received_on("/fail").len();
    assert!(slow_so_far < 2 * per, "the slow one ({slow_so_far}) finished no earlier than the healthy ones");
    // The circuit keeps the failing endpoint from being hammered: far fewer attempts than jobs.
    assert!(fail_attempts < 2 * per, "{fail_attempts} attempts on the failing endpoint");
    let a_last = sink.received_on("/a").last().unwrap().at;
    // Recovery: the failing endpoint heals; its jobs drain after the circuit's probe.
    sink.set("/fail", Behaviour::default());
    sink.set("/slow", Behaviour::default());
    env.wait_terminal(8 * per as u64, Duration::from_secs(60)).await;
    let slow_last = sink.received_on("/slow").last().unwrap().at;
    assert!(a_last < slow_last, "order: the healthy destinations finished before the slow one");
    let stats = env.stats();
    for d in ["slow", "fail", "a", "b"] {
        assert_eq!(stats[d].get("succeeded"), Some(&(2 * per as u64)), "{d}: {stats:?}");
    }
    env.centrifuge.close().await;
}

async fn pairs_of_one_destination_take_turns(db: Db) {
    let sink = Sink::start().await.unwrap();
    let toml = dest("one", &sink.url("/one"), "max_in_flight = 1");
    let env = Env::open(&db, tempfile::tempdir().unwrap(), "", &toml).await;
    // s1 queues 300 first, then s2 queues 10: round-robin serves s2 long before s1 is done.
    env.insert((0..300).map(|i| job(&format!("a-{i}"), "s1", "one")).collect()).await;
    env.insert((0..10).map(|i| job(&format!("b-{i}"), "s2", "one")).collect()).await;
    env.wait_terminal(310, Duration::from_secs(30)).await;
    let order: Vec<String> = sink.received_on("/one").iter().map(|r| r.header("idempotency-key").unwrap().to_owned()).collect();
    assert_eq!(order.len(), 310);
    let last_b = order.iter().rposition(|k| k.starts_with("b-")).unwrap();
    assert!(last_b < 100, "s2's 10 jobs waited behind s1's: the last arrived at position {last_b}");
    env.centrifuge.close().await;
}

async fn a_full_cache_pages_jobs_in_and_loses_none(db: Db) {
    let sink = Sink::start().await.unwrap();
    let toml = dest("d", &sink.url("/d"), "max_in_flight = 4");
    let env = Env::open(&db, tempfile::tempdir().unwrap(), "cache_jobs = 100", &toml).await;
    for b in 0..10 {
        env.insert((0..100).map(|i| job(&format!("m-{b}-{i}"), "s1", "d")).collect()).await;
    }
    env.wait_terminal(1000, Duration::from_secs(60)).await;
    let mut keys: Vec<String> = sink.received_on("/d").iter().map(|r| r.header("idempotency-key").unwrap().to_owned()).collect();
    let n = keys.len();
    keys.sort();
    keys.dedup();
    assert_eq!((n, keys.len()), (1000, 1000), "each job delivered once");
    env.centrifuge.close().await;
}

async fn a_dead_destination_spills_to_the_jobdb_without_keeping_others_out(db: Db) {
    let sink = Sink::start().await.unwrap();
    sink.set("/dead", Behaviour::status(503));
    // cache_jobs = 100: one destination may hold 25 jobs in memory.
    let toml =
        [dest("dead", &sink.url("/dead"), "initial_backoff = \"200ms\"\nmax_backoff = \"400ms\""), dest("live", &sink.url("/live"), "")].concat();
    let env = Env::open(&db, tempfile::tempdir().unwrap(), "cache_jobs = 100\ncircuit_failures = 1000", &toml).await;
    env.insert((0..300).map(|i| job(&format!("d-{i}"), "s1", "dead")).collect()).await;
    env.insert((0..300).map(|i| job(&format!("l-{i}"), "s1", "live")).collect()).await;
    let live = || sink.received_on("/live").len();
    wait_until(Duration::from_secs(30), || live() >= 300, || format!("live destination stuck behind a dead one: {}", live())).await;
    let dead_keys: HashSet<String> = sink.received_on("/dead").iter().map(|r| r.header("idempotency-key").unwrap().to_owned()).collect();
    assert!(dead_keys.len() <= 100, "at most the cache's worth of the dead one's jobs were tried: {}", dead_keys.len());
    sink.set("/dead", Behaviour::default());
    env.wait_terminal(600, Duration::from_secs(60)).await;
    let ok: Vec<String> =
        sink.received_on("/dead").iter().filter(|r| r.answered == Some(200)).map(|r| r.header("idempotency-key").unwrap().to_owned()).collect();
    let unique: HashSet<_> = ok.iter().collect();
    assert_eq!((ok.len(), unique.len()), (300, 300), "every spilled job delivered once after recovery");
    env.centrifuge.close().await;
}

async fn jobdbs_rotate_by_age(db: Db) {
    let sink = Sink::start().await.unwrap();
    let env = Env::open(&db, tempfile::tempdir().unwrap(), "jobdb_rotate_after = \"300ms\"", &dest("d", &sink.url("/d"), "")).await;
    env.insert(vec![job("m-1", "s1", "d")]).await;
    assert_eq!(env.seqs().len(), 1);
    tokio::time::sleep(Duration::from_millis(400)).await;
    // What the housekeeping timer does every second (and every insert does first).
    env.centrifuge.maybe_rotate().await.unwrap();
    env.insert(vec![job("m-2", "s1", "d")]).await;
    let seqs = env.seqs();
    assert!(seqs.contains(&2), "a JobDB older than jobdb_rotate_after took no new jobs: {seqs:?}");
    assert_eq!(env.find("m-2")[0].jobdb, env.jobdbs.name(2), "the new job is in the new JobDB");
    env.centrifuge.close().await;
}

async fn per_destination_in_flight_and_rate_limits_hold(db: Db) {
    let sink = Sink::start().await.unwrap();
    sink.set("/narrow", Behaviour { delay: Duration::from_millis(50), ..Behaviour::default() });
    let toml = [dest("narrow", &sink.url("/narrow"), "max_in_flight = 3"), dest("slowrate", &sink.url("/slowrate"), "rate_limit = 20")].concat();
    let env = Env::open(&db, tempfile::tempdir().unwrap(), "", &toml).await;
    env.insert((0..40).map(|i| job(&format!("n-{i}"), "s1", "narrow")).collect()).await;
    env.insert((0..60).map(|i| job(&format!("r-{i}"), "s1", "slowrate")).collect()).await;
    env.wait_terminal(100, Duration::from_secs(60)).await;
    assert_eq!(sink.received_on("/narrow").len(), 40);
    assert_eq!(sink.state.max_concurrent("/narrow"), 3, "never more than max_in_flight at once, and it is used");
    // 20 requests/s with a one-second bucket: 60 requests cannot arrive in less than ~2 s.
    // (A lower bound only: a slow machine makes it longer, never shorter.)
    let at: Vec<Instant> = sink.received_on("/slowrate").iter().map(|r| r.at).collect();
    assert_eq!(at.len(), 60);
    let span = *at.iter().max().unwrap() - *at.iter().min().unwrap();
    assert!(span >= Duration::from_millis(1800), "60 requests at 20/s took only {span:?}");
    env.centrifuge.close().await;
}

// ---- Database servers only ----

/// The read-only tools (`sluice jobs`, the admin API's inspector) read every
/// scope of the database — each `sluice director` keeps its JobDBs under
/// its name — and create nothing (a reader may lack CREATE).
async fn readers_see_every_directors_scope_and_create_nothing(db: Db) {
    use sluice_deliver::store::JobStore;
    let unscoped = db.sql().clone();
    let tables = |dbs: &SqlJobDbs| {
        let dbs = dbs.clone();
        tokio::task::block_in_place(move || dbs.every_scope().unwrap().len())
    };
    // A fresh database: nothing to find, and nothing created by looking.
    let jobdbs = JobDbs::Sql(unscoped.clone());
    assert!(tokio::task::block_in_place(|| inspect::find_in(&jobdbs, "m-a")).unwrap().is_empty());
    assert_eq!(tokio::task::block_in_place(|| inspect::stats_in(&jobdbs)).unwrap().0, 0);
    assert_eq!(tables(&unscoped), 0, "a reader created a registry");
    // Two directors' scopes, each with a job.
    let writer = unscoped.clone();
    tokio::task::spawn_blocking(move || {
        for (scope, m, byte) in [("director_a", "m-a", 1u8), ("director_b", "m-b", 2u8)] {
            let mut jobdb = writer.clone().scoped(scope).open(1).unwrap();
            jobdb.begin().unwrap();
            assert!(jobdb.insert_job(sluice_deliver::Ksuid::from_slice(&[byte; 20]).unwrap(), &job(m, "s1", "d")).unwrap());
            jobdb.commit().unwrap();
        }
    })
    .await
    .unwrap();
    let found = tokio::task::block_in_place(|| inspect::find_in(&jobdbs, "m-b")).unwrap();
    assert_eq!(found.len(), 1);
    assert!(found[0].jobdb.contains("director_b_jobs_000001"), "{}", found[0].jobdb);
    let (count, states) = tokio::task::block_in_place(|| inspect::stats_in(&jobdbs)).unwrap();
    assert_eq!((count, states["d"]["awaiting_scheduling"]), (2, 2));
    assert_eq!(tables(&unscoped), 2, "the two directors' registries, and no unscoped one");
    // Red team: another application's table named like a registry made every lookup fail.
    // (`_jobdb_registry` was read as the unscoped registry once more: every job counted twice.)
    let foreign = "CREATE TABLE other_app_jobdb_registry (note TEXT); CREATE TABLE _jobdb_registry (note TEXT)";
    match db.sql().engine() {
        SqlEngine::MySql => {
            let mut c = <sqlx::MySqlConnection as sqlx::Connection>::connect(db.url()).await.unwrap();
            sqlx::raw_sql(foreign).execute(&mut c).await.unwrap();
        }
        SqlEngine::Postgres => {
            let mut c = <sqlx::PgConnection as sqlx::Connection>::connect(db.url()).await.unwrap();
            sqlx::raw_sql(foreign).execute(&mut c).await.unwrap();
        }
    }
    assert_eq!(tables(&unscoped), 3, "other_app_ looks like a scope; _ does not");
    let found = tokio::task::block_in_place(|| inspect::find_in(&jobdbs, "m-b")).expect("the foreign table is skipped");
    assert_eq!(found.len(), 1);
    let (count, _) = tokio::task::block_in_place(|| inspect::stats_in(&jobdbs)).expect("stats skip it too");
    assert_eq!(count, 2);
}

/// Rotation drops a JobDB's tables, then its registry row: a reader (the
/// inspector, `sluice jobs`) that lists it before and reads it in between
/// skips it instead of failing (seen as a rare failure of
/// `jobdbs_rotate_by_age` on PostgreSQL).
async fn readers_skip_a_jobdb_caught_between_its_drop_and_its_unregistering(db: Db) {
    use sluice_deliver::store::JobStore;
    let scoped = db.sql().clone().scoped("reader_race");
    let writer = scoped.clone();
    tokio::task::spawn_blocking(move || {
        for (seq, m) in [(1, "m-old"), (2, "m-new")] {
            let mut jobdb = writer.open(seq).unwrap();
            jobdb.begin().unwrap();
            assert!(jobdb.insert_job(sluice_deliver::Ksuid::from_slice(&[seq as u8; 20]).unwrap(), &job(m, "s1", "d")).unwrap());
            jobdb.commit().unwrap();
        }
    })
    .await
    .unwrap();
    // JobDB 1 half-removed: tables gone, registry row still there.
    let (jobs, transitions) = scoped.table_names(1);
    match db.sql().engine() {
        SqlEngine::MySql => {
            let mut c = <sqlx::MySqlConnection as sqlx::Connection>::connect(db.url()).await.unwrap();
            sqlx::raw_sql(&format!("DROP TABLE {transitions}, {jobs}")).execute(&mut c).await.unwrap();
        }
        SqlEngine::Postgres => {
            let mut c = <sqlx::PgConnection as sqlx::Connection>::connect(db.url()).await.unwrap();
            sqlx::raw_sql(&format!("DROP TABLE {transitions}, {jobs}")).execute(&mut c).await.unwrap();
        }
    }
    let jobdbs = JobDbs::Sql(scoped);
    assert_eq!(tokio::task::block_in_place(|| jobdbs.list_blocking()).unwrap(), [1, 2], "JobDB 1 is still registered");
    let found = tokio::task::block_in_place(|| inspect::find_in(&jobdbs, "m-new")).expect("the half-removed JobDB is skipped");
    assert_eq!(found.len(), 1);
    assert!(tokio::task::block_in_place(|| inspect::find_in(&jobdbs, "m-old")).unwrap().is_empty());
    let (count, states) = tokio::task::block_in_place(|| inspect::stats_in(&jobdbs)).expect("stats skip it too");
    assert_eq!((count, states["d"]["awaiting_scheduling"]), (2, 1));
}

/// End the database session that holds JobDB 1's director lock (as a network
/// failure or an operator would); returns once it is gone.
async fn kill_lock_session(db: &Db) {
    use sqlx::{Connection, Row};
    match db.sql().engine() {
        SqlEngine::MySql => {
            let lock = db.sql().mysql_lock_name("jobs_000001");
            let mut c = sqlx::MySqlConnection::connect(db.url()).await.unwrap();
            let row = sqlx::query("SELECT IS_USED_LOCK(?)").bind(&lock).fetch_one(&mut c).await.unwrap();
            let holder: i64 = row.try_get::<Option<i64>, _>(0).unwrap().expect("the lock is held");
            sqlx::raw_sql(&format!("KILL {holder}")).execute(&mut c).await.unwrap();
        }
        SqlEngine::Postgres => {
            let mut c = sqlx::PgConnection::connect(db.url()).await.unwrap();
            let killed: Vec<bool> = sqlx::query(
                "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted
                   AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            )
            .fetch_all(&mut c)
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
            assert_eq!(killed, [true], "one director lock held");
        }
    }
}

async fn a_director_whose_lock_session_ends_takes_the_lock_again_or_stops_if_another_has_it(db: Db) {
    let sink = Sink::start().await.unwrap();
    let toml = dest("d", &sink.url("/d"), "");
    let env = Env::open(&db, tempfile::tempdir().unwrap(), "", &toml).await;
    let insert = |m: &str| env.centrifuge.insert(vec![job(m, "s1", "d")], sluice_deliver::now_ms());
    assert_eq!(insert("before").await.unwrap(), 1);

    // The session ends and nobody else wants the lock: the director takes it again and carries on.
    kill_lock_session(&db).await;
    tokio::time::sleep(LOCK_CHECK_INTERVAL + Duration::from_secs(2)).await;
    let elsewhere = tempfile::tempdir().unwrap();
    let second = open_centrifuge(&config(&db, elsewhere.path(), "", &toml)).await;
    assert!(matches!(second, Err(DeliverError::SqlLocked { .. })), "the lock was taken again: {:?}", second.err());
    assert_eq!(insert("after").await.unwrap(), 1);
    wait_until(Duration::from_secs(10), || sink.received_on("/d").len() >= 2, || "both delivered".into()).await;

    // The session ends and another director takes the lock first: this one stops (its JobDB closes).
    kill_lock_session(&db).await;
    let thief = retry_lock(db.sql()).await;
    let deadline = Instant::now() + LOCK_CHECK_INTERVAL + Duration::from_secs(5);
    loop {
        match insert("late").await {
            Err(DeliverError::Closed) => break,
            Ok(_) => assert!(Instant::now() < deadline, "the director kept running without its lock"),
            Err(e) => panic!("unexpected {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    thief.release().await;
    env.centrifuge.close().await;
}

/// The database goes away (every connection to it cut, new ones refused:
/// a restart, a failover, a network partition) for longer than a lock
/// check, then comes back. The director must not give up its JobDB for
/// good (it used to stop, and nothing served the JobDB until the process
/// restarted): it sends nothing while it cannot confirm its lock, then takes
/// the lock again and delivers what was and is inserted.
async fn a_director_pauses_while_the_database_is_unreachable_and_resumes_when_it_is_back(db: Db) {
    let target = url::Url::parse(db.url()).unwrap();
    let proxy = Proxy::start(&format!("{}:{}", target.host_str().unwrap(), target.port().unwrap())).await;
    let mut through = target.clone();
    through.set_host(Some("127.0.0.1")).unwrap();
    through.set_port(Some(proxy.port)).unwrap();
    let via_proxy = Db { url: Some(through.to_string()), ..db.clone() };
    let sink = Sink::start().await.unwrap();
    let toml = dest("d", &sink.url("/d"), "");
    let env = Env::open(&via_proxy, tempfile::tempdir().unwrap(), "", &toml).await;
    let insert = |m: &'static str| {
        let c = env.centrifuge.clone();
        async move { c.insert(vec![job(m, "s1", "d")], sluice_deliver::now_ms()).await }
    };
    assert_eq!(insert("before").await.unwrap(), 1);
    wait_until(Duration::from_secs(10), || sink.received_on("/d").len() == 1, || "delivered before the outage".into()).await;

    proxy.set_up(false);
    // Two lock checks fail while it is away.
    tokio::time::sleep(LOCK_CHECK_INTERVAL * 2 + Duration::from_secs(1)).await;
    let (held, _) = lock_holder_sessions(&db).await;
    assert_eq!(held, 0, "the lock's session ended with its connection");
    proxy.set_up(true);

    // Inserted once it is back (a JobDB that was closed answers Closed here).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match insert("after").await {
            Ok(1) => break,
            Err(DeliverError::Closed) => panic!("the director gave up its JobDB while the database was away"),
            other => assert!(Instant::now() < deadline, "no insert within 30 s of the database's return: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_until(
        Duration::from_secs(LOCK_CHECK_INTERVAL.as_secs() * 3 + 10),
        || sink.received_on("/d").len() >= 2,
        || format!("delivered after the outage: {:?}", sink.received_on("/d").len()),
    )
    .await;
    let (held, _) = lock_holder_sessions(&db).await;
    assert_eq!(held, 1, "the director holds its lock again");
    // And it still keeps a second director out.
    let elsewhere = tempfile::tempdir().unwrap();
    let second = open_centrifuge(&config(&db, elsewhere.path(), "", &toml)).await;
    assert!(matches!(second, Err(DeliverError::SqlLocked { .. })), "a second director got in: {:?}", second.err());
    env.centrifuge.close().await;
}

/// How many sessions hold JobDB 1's director lock (0 or 1), asked directly.
async fn lock_holder_sessions(db: &Db) -> (usize, Option<i64>) {
    let holder = db.sql().jobdb_lock_holder(1).await.expect("ask the database");
    (holder.is_some() as usize, holder)
}

/// A TCP forwarder in front of the database that can be taken down (every
/// connection through it cut, new ones refused) and brought back.
struct Proxy {
    port: u16,
    up: Arc<std::sync::atomic::AtomicBool>,
    cut: tokio::sync::watch::Sender<u64>,
}

impl Proxy {
    async fn start(target: &str) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (cut, cuts) = tokio::sync::watch::channel(0u64);
        let (target, up2) = (target.to_owned(), up.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else { return };
                if !up2.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: refused
                }
                let (target, mut cuts) = (target.clone(), cuts.clone());
                cuts.borrow_and_update();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(&target).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cuts.changed() => {}
                    }
                });
            }
        });
        Proxy { port, up, cut }
    }

    fn set_up(&self, up: bool) {
        self.up.store(up, std::sync::atomic::Ordering::SeqCst);
        if !up {
            self.cut.send_modify(|n| *n += 1);
        }
    }
}

async fn retry_lock(sql: &SqlJobDbs) -> sluice_deliver::sqljobdb::DirectorLock {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match sql.lock_jobdb(1).await {
            Ok(lock) => return lock,
            Err(DeliverError::SqlLocked { .. }) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => panic!("{e}"),
        }
    }
}
