//! The Centrifuge against a real HTTP sink: every outcome, the request
//! headers, the SSRF guard, rotation and drop, pick-up after a restart,
//! QoS, fairness and the bounded cache.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hmac::{Hmac, Mac};
use sluice_core::Config;
use sluice_deliver::inspect;
use sluice_deliver::jobdb::{list_jobdbs, JobState};
use sluice_deliver::sink::{Behaviour, Sink};
use sluice_deliver::{Catalog, Centrifuge, CentrifugeOptions, DeliverMetrics, NewJob};

struct Env {
    dir: tempfile::TempDir,
    config: Config,
    catalog: Arc<Catalog>,
    centrifuge: Arc<Centrifuge>,
    metrics: DeliverMetrics,
}

fn config(dir: &Path, toml: &str) -> Config {
    let text = format!(
        "[server]\ndata_dir = \"{}\"\n[[sources]]\nid = \"s1\"\nwrite_key = \"k1\"\n[[sources]]\nid = \"s2\"\nwrite_key = \"k2\"\n{toml}",
        dir.join("data").display()
    );
    Config::from_toml_with_env(&text, "", &HashMap::new()).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

async fn open(dir: tempfile::TempDir, toml: &str) -> Env {
    let config = config(dir.path(), toml);
    let catalog = Catalog::open(&config).unwrap();
    let metrics = DeliverMetrics::default();
    let centrifuge = Centrifuge::open(CentrifugeOptions::from_config(&config), catalog.clone(), metrics.clone()).await.unwrap();
    Env { dir, config, catalog, centrifuge, metrics }
}

impl Env {
    fn jobs_dir(&self) -> std::path::PathBuf {
        self.config.server.data_dir.join("jobs")
    }

    async fn insert(&self, jobs: Vec<NewJob>) -> u64 {
        self.centrifuge.insert(jobs, sluice_deliver::now_ms()).await.unwrap()
    }

    /// Wait until `n` jobs are terminal (panics with the stats at the deadline).
    async fn wait_terminal(&self, n: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let (_, stats) = inspect::stats(&self.jobs_dir()).unwrap();
            let done: u64 = stats.values().flat_map(|m| ["succeeded", "discarded", "archived"].map(|s| m.get(s).copied().unwrap_or(0))).sum();
            if done >= n {
                return;
            }
            assert!(Instant::now() < deadline, "only {done} of {n} jobs terminal after {timeout:?}: {stats:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn states(&self, message_id: &str) -> HashMap<String, Vec<JobState>> {
        inspect::find(&self.jobs_dir(), message_id)
            .unwrap()
            .into_iter()
            .map(|f| (f.job.job.destination.clone(), f.history.iter().map(|t| t.state).collect()))
            .collect()
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

fn job(message_id: &str, source: &str, destination: &str) -> NewJob {
    let now = sluice_deliver::now_ms();
    NewJob {
        message_id: message_id.into(),
        source: source.into(),
        destination: destination.into(),
        generation: 0,
        endpoint: String::new(),
        payload: Bytes::from(format!("{{\"type\":\"track\",\"messageId\":\"{message_id}\",\"event\":\"E\"}}")),
        created_at: now,
        expires_at: now + 3_600_000,
        received_at: now,
    }
}

fn dest(id: &str, url: &str, extra: &str) -> String {
    format!("[[destinations]]\nid = \"{id}\"\nurl = \"{url}\"\nallow_private_network = true\n{extra}\n")
}

use JobState::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_outcome_is_recorded_as_transitions() {
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
        "[deliver]\ncircuit_failures = 1000\n".to_owned(),
    ]
    .concat();
    let env = open(tempfile::tempdir().unwrap(), &toml).await;
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

    let found = inspect::find(&env.jobs_dir(), "m-1").unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_carry_signatures_user_agent_and_idempotency_key() {
    let sink = Sink::start().await.unwrap();
    let toml = [dest("signed", &sink.url("/signed"), "secret = \"s3cret\""), dest("plain", &sink.url("/plain"), "")].concat();
    let env = open(tempfile::tempdir().unwrap(), &toml).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ssrf_guard_refuses_private_targets_unless_allowed() {
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
    let env = open(tempfile::tempdir().unwrap(), &toml).await;
    env.insert(["literal", "by-name", "metadata", "allowed"].iter().map(|d| job("m-ssrf", "s1", d)).collect()).await;
    env.wait_terminal(4, Duration::from_secs(10)).await;
    let found = inspect::find(&env.jobs_dir(), "m-ssrf").unwrap();
    for f in &found {
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

    // The global switch lets them all through.
    let sink2 = Sink::start().await.unwrap();
    let toml = format!("[deliver]\nallow_private_network = true\n{}", guarded("by-name", format!("http://localhost:{}/x", sink2.addr.port())));
    let env = open(tempfile::tempdir().unwrap(), &toml).await;
    env.insert(vec![job("m-ssrf2", "s1", "by-name")]).await;
    env.wait_terminal(1, Duration::from_secs(10)).await;
    assert_eq!(sink2.received_on("/x").len(), 1);
    env.centrifuge.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobdbs_rotate_by_count_and_finished_ones_are_deleted_whole() {
    let sink = Sink::start().await.unwrap();
    sink.set("/hold", Behaviour::status(503));
    let toml = [
        "[deliver]\njobdb_max_jobs = 10\n".to_owned(),
        dest("ok", &sink.url("/ok"), ""),
        dest("hold", &sink.url("/hold"), "initial_backoff = \"50ms\"\nmax_backoff = \"100ms\""),
    ]
    .concat();
    let env = open(tempfile::tempdir().unwrap(), &toml).await;
    // One job that cannot finish yet, in the first JobDB.
    env.insert(vec![job("held", "s1", "hold")]).await;
    for batch in 0..4 {
        env.insert((0..10).map(|i| job(&format!("m-{batch}-{i}"), "s1", "ok")).collect()).await;
    }
    let files = list_jobdbs(&env.jobs_dir()).unwrap();
    // Rotation is checked before each insert (a batch is never split): 1 + 10 jobs in the
    // first, then 10 each. The fourth is the newest; finished sealed ones may already be gone.
    assert_eq!(files.last().unwrap().0, 4, "rotated every 10 jobs: {files:?}");
    // (Counting terminal jobs does not work here: dropped JobDBs take their jobs with them.)
    let delivered = || sink.received_on("/ok").len();
    wait_until(Duration::from_secs(20), || delivered() >= 40, || format!("only {} of 40 delivered", delivered())).await;
    // Every sealed JobDB but the first (which holds the unfinished job) is deleted.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now: Vec<u64> = list_jobdbs(&env.jobs_dir()).unwrap().into_iter().map(|(s, _)| s).collect();
        if now.len() == 2 {
            assert_eq!(now, vec![1, 4], "the JobDB with an unfinished job and the newest stay");
            break;
        }
        assert!(Instant::now() < deadline, "finished JobDBs not dropped: {now:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let live: Vec<u64> = list_jobdbs(&env.jobs_dir()).unwrap().into_iter().map(|(s, _)| s).collect();
    let leftovers: Vec<_> = std::fs::read_dir(env.jobs_dir()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert!(
        leftovers.iter().all(|f| live.iter().any(|s| f.starts_with(&format!("jobdb-{s:06}.")))),
        "no WAL, shm or lock file of a dropped JobDB is left behind: {leftovers:?}"
    );
    assert_eq!(env.metrics.jobdbs_dropped.get(), 2);
    // Heal the held job: its JobDB goes too.
    sink.set("/hold", Behaviour::default());
    wait_until(Duration::from_secs(10), || list_jobdbs(&env.jobs_dir()).unwrap().len() == 1, || "first JobDB not dropped".into()).await;
    // A job whose JobDB was dropped can be made again (dropped means gone; the route only
    // replays its uncommitted batch), but within live JobDBs inserts are idempotent:
    let again = env.centrifuge.insert(vec![job("m-0-5", "s1", "ok")], 0).await.unwrap();
    let twice = env.centrifuge.insert(vec![job("m-0-5", "s1", "ok")], 0).await.unwrap();
    assert_eq!((again, twice), (1, 0));
    env.centrifuge.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inserts_are_idempotent_across_sealed_jobdbs() {
    let sink = Sink::start().await.unwrap();
    sink.set("/hold", Behaviour::status(503));
    let toml =
        ["[deliver]\njobdb_max_jobs = 3\n".to_owned(), dest("hold", &sink.url("/hold"), "initial_backoff = \"1h\"\nmax_backoff = \"1h\"")].concat();
    let env = open(tempfile::tempdir().unwrap(), &toml).await;
    let event_time = sluice_deliver::now_ms() - 1000; // logged before the newest JobDB existed
    let first: Vec<_> = (0..3).map(|i| job(&format!("m-{i}"), "s1", "hold")).collect();
    assert_eq!(env.centrifuge.insert(first.clone(), event_time).await.unwrap(), 3);
    // The next insert rotates; the same events again (a route replay) make no new jobs.
    assert_eq!(env.centrifuge.insert(first.clone(), event_time).await.unwrap(), 0);
    assert!(list_jobdbs(&env.jobs_dir()).unwrap().len() >= 2);
    // A replay generation is a new job.
    let mut replayed = first[0].clone();
    replayed.generation = 7;
    assert_eq!(env.centrifuge.insert(vec![replayed], event_time).await.unwrap(), 1);
    assert_eq!(env.metrics.jobs_duplicate.get(), 3);
    env.centrifuge.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_picks_up_unfinished_jobs_and_the_lock_keeps_out_a_second_director() {
    let sink = Sink::start().await.unwrap();
    sink.set("/d", Behaviour::status(503));
    let toml = dest("d", &sink.url("/d"), "initial_backoff = \"100ms\"\nmax_backoff = \"200ms\"");
    let dir = tempfile::tempdir().unwrap();
    let env = open(dir, &toml).await;
    env.insert((0..20).map(|i| job(&format!("m-{i}"), "s1", "d")).collect()).await;
    while sink.received_on("/d").len() < 20 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A second process on the same data_dir is refused.
    let second = Centrifuge::open(CentrifugeOptions::from_config(&env.config), env.catalog.clone(), DeliverMetrics::default()).await;
    assert!(matches!(second, Err(sluice_deliver::DeliverError::Locked(_))), "second director was let in");
    env.centrifuge.close().await;
    let Env { dir, .. } = env;

    sink.set("/d", Behaviour::default());
    let env = open(dir, &toml).await;
    env.wait_terminal(20, Duration::from_secs(20)).await;
    let (_, stats) = inspect::stats(&env.jobs_dir()).unwrap();
    assert_eq!(stats["d"].get("succeeded"), Some(&20), "{stats:?}");
    env.centrifuge.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pausing_a_destination_by_sql_holds_its_jobs_until_resumed() {
    let sink = Sink::start().await.unwrap();
    let toml = [dest("p", &sink.url("/p"), ""), dest("q", &sink.url("/q"), "")].concat();
    let env = open(tempfile::tempdir().unwrap(), &toml).await;
    let control = rusqlite::Connection::open(env.config.server.data_dir.join("control.sqlite")).unwrap();
    // The README's statement.
    control.execute("UPDATE destination_qos SET paused = 1 WHERE destination = 'p'", []).unwrap();
    env.catalog.refresh().unwrap(); // what the 2 s refresher does
    env.insert((0..10).flat_map(|i| [job(&format!("m-{i}"), "s1", "p"), job(&format!("m-{i}"), "s1", "q")]).collect()).await;
    env.wait_terminal(10, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.received_on("/q").len(), 10);
    assert_eq!(sink.received_on("/p").len(), 0, "a paused destination gets nothing");
    control.execute("UPDATE destination_qos SET paused = 0 WHERE destination = 'p'", []).unwrap();
    env.catalog.refresh().unwrap();
    env.wait_terminal(20, Duration::from_secs(10)).await;
    assert_eq!(sink.received_on("/p").len(), 10);
    env.centrifuge.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_and_a_failing_destination_do_not_hold_up_the_others() {
    let sink = Sink::start().await.unwrap();
    sink.set("/slow", Behaviour { delay: Duration::from_secs(2), ..Behaviour::default() });
    sink.set("/fail", Behaviour::status(500));
    let toml = [
        "[deliver]\ncircuit_failures = 3\ncircuit_cooldown = \"1s\"\n".to_owned(),
        dest("slow", &sink.url("/slow"), "max_in_flight = 2"),
        dest("fail", &sink.url("/fail"), "initial_backoff = \"100ms\"\nmax_backoff = \"500ms\""),
        dest("a", &sink.url("/a"), ""),
        dest("b", &sink.url("/b"), ""),
    ]
    .concat();
    let env = open(tempfile::tempdir().unwrap(), &toml).await;
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
    let (_, stats) = inspect::stats(&env.jobs_dir()).unwrap();
    for d in ["slow", "fail", "a", "b"] {
        assert_eq!(stats[d].get("succeeded"), Some(&(2 * per as u64)), "{d}: {stats:?}");
    }
    env.centrifuge.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairs_of_one_destination_take_turns() {
    let sink = Sink::start().await.unwrap();
    let toml = dest("one", &sink.url("/one"), "max_in_flight = 1");
    let env = open(tempfile::tempdir().unwrap(), &toml).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_cache_pages_jobs_in_and_loses_none() {
    let sink = Sink::start().await.unwrap();
    let toml = ["[deliver]\ncache_jobs = 100\n".to_owned(), dest("d", &sink.url("/d"), "max_in_flight = 4")].concat();
    let env = open(tempfile::tempdir().unwrap(), &toml).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_destination_spills_to_the_jobdb_without_keeping_others_out() {
    let sink = Sink::start().await.unwrap();
    sink.set("/dead", Behaviour::status(503));
    // cache_jobs = 100: one destination may hold 25 jobs in memory.
    let toml = [
        "[deliver]\ncache_jobs = 100\ncircuit_failures = 1000\n".to_owned(),
        dest("dead", &sink.url("/dead"), "initial_backoff = \"200ms\"\nmax_backoff = \"400ms\""),
        dest("live", &sink.url("/live"), ""),
    ]
    .concat();
    let env = open(tempfile::tempdir().unwrap(), &toml).await;
    env.insert((0..300).map(|i| job(&format!("d-{i}"), "s1", "dead")).collect()).await;
    env.insert((0..300).map(|i| job(&format!("l-{i}"), "s1", "live")).collect()).await;
    let live = || sink.received_on("/live").len();
    wait_until(Duration::from_secs(30), || live() >= 300, || format!("live destination stuck behind a dead one: {}", live())).await;
    let dead_keys: std::collections::HashSet<String> =
        sink.received_on("/dead").iter().map(|r| r.header("idempotency-key").unwrap().to_owned()).collect();
    assert!(dead_keys.len() <= 100, "at most the cache's worth of the dead one's jobs were tried: {}", dead_keys.len());
    sink.set("/dead", Behaviour::default());
    env.wait_terminal(600, Duration::from_secs(60)).await;
    let ok: Vec<String> =
        sink.received_on("/dead").iter().filter(|r| r.answered == Some(200)).map(|r| r.header("idempotency-key").unwrap().to_owned()).collect();
    let unique: std::collections::HashSet<_> = ok.iter().collect();
    assert_eq!((ok.len(), unique.len()), (300, 300), "every spilled job delivered once after recovery");
    env.centrifuge.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobdbs_rotate_by_age() {
    let sink = Sink::start().await.unwrap();
    let toml = ["[deliver]\njobdb_rotate_after = \"300ms\"\n".to_owned(), dest("d", &sink.url("/d"), "")].concat();
    let env = open(tempfile::tempdir().unwrap(), &toml).await;
    env.insert(vec![job("m-1", "s1", "d")]).await;
    let first = list_jobdbs(&env.jobs_dir()).unwrap();
    assert_eq!(first.len(), 1);
    tokio::time::sleep(Duration::from_millis(400)).await;
    // What the housekeeping timer does every second (and every insert does first).
    env.centrifuge.maybe_rotate().await.unwrap();
    env.insert(vec![job("m-2", "s1", "d")]).await;
    let seqs: Vec<u64> = list_jobdbs(&env.jobs_dir()).unwrap().into_iter().map(|(s, _)| s).collect();
    assert!(seqs.contains(&2), "a JobDB older than jobdb_rotate_after took no new jobs: {seqs:?}");
    assert_eq!(inspect::find(&env.jobs_dir(), "m-2").unwrap()[0].jobdb.contains("jobdb-000002"), true);
    env.centrifuge.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_destination_in_flight_and_rate_limits_hold() {
    let sink = Sink::start().await.unwrap();
    sink.set("/narrow", Behaviour { delay: Duration::from_millis(50), ..Behaviour::default() });
    let toml = [dest("narrow", &sink.url("/narrow"), "max_in_flight = 3"), dest("slowrate", &sink.url("/slowrate"), "rate_limit = 20")].concat();
    let env = open(tempfile::tempdir().unwrap(), &toml).await;
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
