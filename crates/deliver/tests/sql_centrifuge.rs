//! The Centrifuge with its JobDBs in MariaDB and PostgreSQL
//! (`deliver.jobdb_url`): delivery, rotation by DROP TABLE, idempotency
//! across sealed JobDBs, pick-up after a restart, and the director lock
//! keeping a second process out. (`delivery.rs` covers the same on SQLite
//! files, and much more.)

mod common;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Backend, Engine};
use sluice_core::Config;
use sluice_deliver::backend::JobDbs;
use sluice_deliver::director::LOCK_CHECK_INTERVAL;
use sluice_deliver::inspect;
use sluice_deliver::jobdb::JobState;
use sluice_deliver::sink::{Behaviour, Sink};
use sluice_deliver::sqljobdb::{SqlEngine, SqlJobDbs};
use sluice_deliver::{Catalog, Centrifuge, CentrifugeOptions, DeliverError, DeliverMetrics, NewJob};

macro_rules! engines {
    ($($test:ident),* $(,)?) => {$(
        mod $test {
            #[test]
            fn mariadb() {
                super::run(super::Engine::MariaDb, stringify!($test), super::$test);
            }
            #[test]
            fn postgres() {
                super::run(super::Engine::Postgres, stringify!($test), super::$test);
            }
        }
    )*};
}

engines!(
    jobs_are_delivered_and_finished_jobdbs_are_dropped_as_tables,
    a_restart_picks_up_unfinished_jobs_and_the_lock_keeps_out_a_second_process,
    a_director_whose_lock_session_ends_takes_the_lock_again_or_stops_if_another_has_it,
    a_director_pauses_while_the_database_is_unreachable_and_resumes_when_it_is_back,
);

/// The test's database: its JobDBs and its URL.
#[derive(Clone)]
struct Db {
    sql: SqlJobDbs,
    url: String,
}

fn run<F: Future<Output = ()>>(engine: Engine, name: &str, test: fn(Db) -> F) {
    // The backend (which drops the database at the end, blocking) stays outside the runtime.
    if let Some(backend) = Backend::new(engine, &format!("{name}_{engine:?}")) {
        let db = Db { sql: backend.sql.clone().expect("SQL"), url: backend.database_url.clone().expect("SQL") };
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("a runtime");
        rt.block_on(test(db));
    }
}

fn config(b: &Db, data_dir: &std::path::Path, toml: &str) -> Config {
    let text = format!(
        "[server]\ndata_dir = \"{}\"\n[[sources]]\nid = \"s1\"\nwrite_key = \"k1\"\n[deliver]\njobdb_url = \"{}\"\n{toml}",
        data_dir.display(),
        b.url
    );
    Config::from_toml_with_env(&text, "", &HashMap::new()).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

async fn open(config: &Config) -> Result<Arc<Centrifuge>, DeliverError> {
    let catalog = Catalog::open(config).expect("the control database");
    Centrifuge::open(CentrifugeOptions::from_config(config), catalog, DeliverMetrics::default()).await
}

fn job(message_id: &str, destination: &str) -> NewJob {
    let now = sluice_deliver::now_ms();
    NewJob {
        message_id: message_id.into(),
        source: "s1".into(),
        destination: destination.into(),
        generation: 0,
        endpoint: String::new(),
        payload: Bytes::from(format!("{{\"type\":\"track\",\"messageId\":\"{message_id}\"}}")),
        created_at: now,
        expires_at: now + 3_600_000,
        received_at: now,
    }
}

fn dest(id: &str, url: &str, extra: &str) -> String {
    format!("[[destinations]]\nid = \"{id}\"\nurl = \"{url}\"\nallow_private_network = true\n{extra}\n")
}

/// Poll `done` every 50 ms until it holds; panic with `what()` at the deadline.
async fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool, what: impl Fn() -> String) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "{}", what());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The registered JobDBs and the JobDB tables in the database.
async fn jobdbs(sql: &SqlJobDbs) -> (Vec<u64>, Vec<String>) {
    let sql = sql.clone();
    tokio::task::spawn_blocking(move || (sql.list().unwrap().into_iter().map(|(s, _)| s).collect(), sql.tables().unwrap())).await.unwrap()
}

async fn jobdbs_become(sql: &SqlJobDbs, want: &[u64]) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (registered, tables) = jobdbs(sql).await;
        if registered == want {
            let expected: Vec<String> = want
                .iter()
                .flat_map(|s| {
                    let (j, t) = sluice_deliver::sqljobdb::table_names(*s);
                    [t, j]
                })
                .collect();
            let mut expected = expected;
            expected.sort();
            assert_eq!(tables, expected, "the tables of dropped JobDBs are gone");
            return;
        }
        assert!(Instant::now() < deadline, "JobDBs {registered:?}, want {want:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn jobs_are_delivered_and_finished_jobdbs_are_dropped_as_tables(b: Db) {
    let sql = b.sql.clone();
    let sink = Sink::start().await.unwrap();
    sink.set("/hold", Behaviour::status(503));
    let data = tempfile::tempdir().unwrap();
    let toml = [
        "jobdb_max_jobs = 10\n".to_owned(),
        dest("ok", &sink.url("/ok"), ""),
        dest("hold", &sink.url("/hold"), "initial_backoff = \"50ms\"\nmax_backoff = \"100ms\""),
    ]
    .concat();
    let config = config(&b, data.path(), &toml);
    let centrifuge = open(&config).await.expect("the Centrifuge opens on the database");
    centrifuge.insert(vec![job("held", "hold")], sluice_deliver::now_ms()).await.unwrap();
    for batch in 0..4 {
        let n = centrifuge.insert((0..10).map(|i| job(&format!("m-{batch}-{i}"), "ok")).collect(), sluice_deliver::now_ms()).await.unwrap();
        assert_eq!(n, 10);
    }
    let delivered = || sink.received_on("/ok").len();
    wait_until(Duration::from_secs(20), || delivered() >= 40, || format!("only {} of 40 delivered", delivered())).await;
    // Rotated every 10 jobs; the finished sealed JobDBs (2, 3) are dropped, tables and registry row.
    jobdbs_become(&sql, &[1, 4]).await;
    assert!(!std::fs::exists(data.path().join("jobs/jobdb-000001.sqlite")).unwrap(), "no SQLite file is made");

    // Inserts are idempotent across the sealed JobDB still alive (an event logged before the newest existed).
    // (The insert first rotates the full JobDB 4 to a new newest, 5; 4 is finished, so it is dropped.)
    assert_eq!(centrifuge.insert(vec![job("held", "hold")], 0).await.unwrap(), 0);
    jobdbs_become(&sql, &[1, 5]).await;
    // Heal the held job: its JobDB goes too.
    sink.set("/hold", Behaviour::default());
    jobdbs_become(&sql, &[5]).await;
    centrifuge.close().await;
}

async fn a_restart_picks_up_unfinished_jobs_and_the_lock_keeps_out_a_second_process(b: Db) {
    let sql = b.sql.clone();
    let sink = Sink::start().await.unwrap();
    sink.set("/d", Behaviour::status(503));
    let data = tempfile::tempdir().unwrap();
    let config = config(&b, data.path(), &dest("d", &sink.url("/d"), "initial_backoff = \"100ms\"\nmax_backoff = \"200ms\""));
    let centrifuge = open(&config).await.expect("open");
    centrifuge.insert((0..20).map(|i| job(&format!("m-{i}"), "d")).collect(), sluice_deliver::now_ms()).await.unwrap();
    wait_until(Duration::from_secs(20), || sink.received_on("/d").len() >= 20, || "first attempts".into()).await;

    // A second process on the same database (another data_dir) is refused by the director lock.
    let elsewhere = tempfile::tempdir().unwrap();
    let second = open(&self::config(&b, elsewhere.path(), &dest("d", &sink.url("/d"), ""))).await;
    assert!(matches!(second, Err(DeliverError::SqlLocked { .. })), "a second director was let in: {:?}", second.err());
    centrifuge.close().await;

    // After a restart, the unfinished jobs are paged back in and delivered.
    sink.set("/d", Behaviour::default());
    let centrifuge = open(&config).await.expect("reopen");
    let succeeded = || sink.received_on("/d").iter().filter(|r| r.answered == Some(200)).count();
    wait_until(Duration::from_secs(20), || succeeded() >= 20, || format!("{} of 20 succeeded after the restart", succeeded())).await;
    // `sluice jobs stats|inspect` read the same database.
    let jobdbs = JobDbs::Sql(sql);
    let succeeded_in_jobdbs = || {
        let (_, stats) = inspect::stats_in(&jobdbs).unwrap();
        stats.get("d").and_then(|s| s.get("succeeded")).copied().unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::task::block_in_place(succeeded_in_jobdbs) < 20 {
        assert!(Instant::now() < deadline, "outcome rows not written: {:?}", tokio::task::block_in_place(|| inspect::stats_in(&jobdbs)).unwrap());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (count, stats) = tokio::task::block_in_place(|| inspect::stats_in(&jobdbs)).unwrap();
    assert_eq!((count, stats["d"].len()), (1, 1), "one JobDB, every job succeeded: {stats:?}");
    let found = tokio::task::block_in_place(|| inspect::find_in(&jobdbs, "m-3")).unwrap();
    assert_eq!(found.len(), 1);
    let states: Vec<JobState> = found[0].history.iter().map(|t| t.state).collect();
    assert_eq!(states.first(), Some(&JobState::Executing));
    assert_eq!(states.last(), Some(&JobState::Succeeded), "{states:?}");
    assert!(states.contains(&JobState::AwaitingRetry), "{states:?}");
    centrifuge.close().await;
}

/// End the database session that holds JobDB 1's director lock (as a network
/// failure or an operator would); returns once it is gone.
async fn kill_lock_session(b: &Db) {
    use sqlx::{Connection, Row};
    let lock = b.sql.mysql_lock_name("jobs_000001");
    match b.sql.engine() {
        SqlEngine::MySql => {
            let mut c = sqlx::MySqlConnection::connect(&b.url).await.unwrap();
            let row = sqlx::query("SELECT IS_USED_LOCK(?)").bind(&lock).fetch_one(&mut c).await.unwrap();
            let holder: i64 = row.try_get::<Option<i64>, _>(0).unwrap().expect("the lock is held");
            sqlx::raw_sql(&format!("KILL {holder}")).execute(&mut c).await.unwrap();
        }
        SqlEngine::Postgres => {
            let mut c = sqlx::PgConnection::connect(&b.url).await.unwrap();
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

async fn a_director_whose_lock_session_ends_takes_the_lock_again_or_stops_if_another_has_it(b: Db) {
    let sink = Sink::start().await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let config = config(&b, data.path(), &dest("d", &sink.url("/d"), ""));
    let centrifuge = open(&config).await.expect("open");
    let insert = |m: &str| centrifuge.insert(vec![job(m, "d")], sluice_deliver::now_ms());
    assert_eq!(insert("before").await.unwrap(), 1);

    // The session ends and nobody else wants the lock: the director takes it again and carries on.
    kill_lock_session(&b).await;
    tokio::time::sleep(LOCK_CHECK_INTERVAL + Duration::from_secs(2)).await;
    let elsewhere = tempfile::tempdir().unwrap();
    let second = open(&self::config(&b, elsewhere.path(), &dest("d", &sink.url("/d"), ""))).await;
    assert!(matches!(second, Err(DeliverError::SqlLocked { .. })), "the lock was taken again: {:?}", second.err());
    assert_eq!(insert("after").await.unwrap(), 1);
    wait_until(Duration::from_secs(10), || sink.received_on("/d").len() >= 2, || "both delivered".into()).await;

    // The session ends and another director takes the lock first: this one stops (its JobDB closes).
    kill_lock_session(&b).await;
    let thief = retry_lock(&b.sql).await;
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
    centrifuge.close().await;
}

/// The database goes away (every connection to it cut, new ones refused:
/// a restart, a failover, a network partition) for longer than a lock
/// check, then comes back. The director must not give up its JobDB for
/// good (it used to stop, and nothing served the JobDB until the process
/// restarted): it sends nothing while it cannot confirm its lock, then takes
/// the lock again and delivers what was and is inserted.
async fn a_director_pauses_while_the_database_is_unreachable_and_resumes_when_it_is_back(b: Db) {
    let target = url::Url::parse(&b.url).unwrap();
    let proxy = Proxy::start(&format!("{}:{}", target.host_str().unwrap(), target.port().unwrap())).await;
    let mut through = target.clone();
    through.set_host(Some("127.0.0.1")).unwrap();
    through.set_port(Some(proxy.port)).unwrap();
    let db = Db { sql: b.sql.clone(), url: through.to_string() };
    let sink = Sink::start().await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let centrifuge = open(&config(&db, data.path(), &dest("d", &sink.url("/d"), ""))).await.expect("open");
    let insert = |m: &'static str| {
        let c = centrifuge.clone();
        async move { c.insert(vec![job(m, "d")], sluice_deliver::now_ms()).await }
    };
    assert_eq!(insert("before").await.unwrap(), 1);
    wait_until(Duration::from_secs(10), || sink.received_on("/d").len() == 1, || "delivered before the outage".into()).await;

    proxy.set_up(false);
    // Two lock checks fail while it is away.
    tokio::time::sleep(LOCK_CHECK_INTERVAL * 2 + Duration::from_secs(1)).await;
    let (held, _) = lock_holder_sessions(&b).await;
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
    let (held, _) = lock_holder_sessions(&b).await;
    assert_eq!(held, 1, "the director holds its lock again");
    // And it still keeps a second director out.
    let elsewhere = tempfile::tempdir().unwrap();
    let second = open(&config(&b, elsewhere.path(), &dest("d", &sink.url("/d"), ""))).await;
    assert!(matches!(second, Err(DeliverError::SqlLocked { .. })), "a second director got in: {:?}", second.err());
    centrifuge.close().await;
}

/// How many sessions hold JobDB 1's director lock (0 or 1), asked directly.
async fn lock_holder_sessions(b: &Db) -> (usize, Option<i64>) {
    let holder = b.sql.jobdb_lock_holder(1).await.expect("ask the database");
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
