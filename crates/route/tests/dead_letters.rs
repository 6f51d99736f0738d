//! The route's dead letters, in process: an `output` record the route cannot
//! plan (value not JSON, key without `/`, key not UTF-8) is stored in the
//! control database's dead-letter store before the offset passes it —
//! exactly once though its batch runs twice — and the offset advances;
//! replays re-plan the stored record (a record still unplannable stays,
//! with its error; a plannable one makes its jobs and is marked replayed);
//! `sluice replay` files its failures under its own generation; a full store
//! holds the partition back instead of dropping, until room is made.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sluice_core::metrics::{render, Registry};
use sluice_core::{Config, Shutdown};
use sluice_deliver::control::{DeadLetter, DeadLetterLimits, NewDeadLetter};
use sluice_deliver::{Catalog, NewJob};
use sluice_log::{EmbeddedLog, Log, LogOptions, Record};
use sluice_route::{JobSink, RouteError, RouteMetrics, RouteSettings, GROUP, OUTPUT_TOPIC};

/// Jobs handed over, idempotent on (messageId, destination, generation) as
/// the JobDBs are; the first `fail` calls fail (a crash between the
/// dead-letter write and the offset commit, as far as the route can tell).
#[derive(Default)]
struct Jobs {
    fail: AtomicUsize,
    calls: AtomicUsize,
    jobs: Mutex<HashMap<(String, String, i64), NewJob>>,
}

#[async_trait::async_trait]
impl JobSink for Jobs {
    async fn insert_jobs(&self, jobs: Vec<NewJob>, _oldest_event_ms: i64) -> Result<(), RouteError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.fail.load(Ordering::SeqCst) > 0 {
            self.fail.fetch_sub(1, Ordering::SeqCst);
            return Err(RouteError::Director("injected failure".into()));
        }
        let mut all = self.jobs.lock().unwrap();
        for j in jobs {
            all.entry((j.message_id.clone(), j.destination.clone(), j.generation)).or_insert(j);
        }
        Ok(())
    }
}

impl Jobs {
    fn keys(&self) -> Vec<(String, String, i64)> {
        let mut k: Vec<_> = self.jobs.lock().unwrap().keys().cloned().collect();
        k.sort();
        k
    }
}

struct Fixture {
    rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
    log: Arc<EmbeddedLog>,
    catalog: Arc<Catalog>,
    jobs: Arc<Jobs>,
    metrics: RouteMetrics,
    registry: Registry,
    stop: Shutdown,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "[server]\ndata_dir = \"{}\"\n\
             [[sources]]\nid = \"web\"\nwrite_key = \"wk_web\"\n\
             [[destinations]]\nid = \"d1\"\nurl = \"http://127.0.0.1:9/d1\"\n\
             [[destinations]]\nid = \"d2\"\nurl = \"http://127.0.0.1:9/d2\"\n\
             [[connections]]\nsource = \"web\"\ndestinations = [\"d1\", \"d2\"]\n",
            dir.path().join("data").display()
        );
        let config = Config::from_toml_with_env(&text, "", &HashMap::new()).unwrap();
        let catalog = Catalog::open(&config).unwrap();
        let options = LogOptions { topics: vec![(OUTPUT_TOPIC.into(), 1)], fsync: false, ..LogOptions::default() };
        let log = Arc::new(EmbeddedLog::open(&dir.path().join("data/log"), options).unwrap());
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let metrics = RouteMetrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let stop = Shutdown::new();
        Fixture { rt, _dir: dir, log, catalog, jobs: Arc::new(Jobs::default()), metrics, registry, stop, tasks: Vec::new() }
    }

    fn append(&self, records: &[(&[u8], &[u8])]) -> u64 {
        let records = records.iter().map(|(k, v)| Record { key: Bytes::copy_from_slice(k), value: Bytes::copy_from_slice(v) }).collect();
        self.rt.block_on(self.log.append(OUTPUT_TOPIC, 0, records)).unwrap()
    }

    /// Start the route on partition 0 and the replay runner.
    fn start(&mut self) {
        let settings = RouteSettings { batch_size: 100, poll_interval: Duration::from_millis(5) };
        let log: Arc<dyn Log> = self.log.clone();
        let jobs: Arc<dyn JobSink> = self.jobs.clone();
        let _guard = self.rt.enter();
        self.tasks.push(tokio::spawn(sluice_route::run_partition(
            log.clone(),
            0,
            self.catalog.clone(),
            jobs.clone(),
            settings,
            self.metrics.clone(),
            self.stop.clone(),
        )));
        self.tasks.push(tokio::spawn(sluice_route::run_replays(log, self.catalog.clone(), jobs, Default::default(), self.stop.clone())));
    }

    fn committed(&self) -> Option<u64> {
        self.rt.block_on(self.log.committed(GROUP, OUTPUT_TOPIC, 0)).unwrap()
    }

    fn wait_committed(&self, offset: u64) {
        wait_for(Duration::from_secs(20), || self.committed() == Some(offset), || format!("committed {:?}, want {offset}", self.committed()));
    }

    fn letters(&self) -> Vec<DeadLetter> {
        let mut all = self.catalog.with_control(|db| db.dead_letters(None, 1000)).unwrap();
        all.reverse();
        all
    }

    fn letter(&self, id: i64) -> DeadLetter {
        self.catalog.with_control(|db| db.dead_letter(id)).unwrap().expect("a dead letter")
    }

    /// A metric's value in this process's rendering (0 when absent).
    fn metric(&self, name: &str) -> f64 {
        render(&self.registry)
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')).map(|v| v.trim().parse::<f64>().unwrap()))
            .unwrap_or(0.0)
    }

    fn replay_and_wait(&self, id: Option<i64>) {
        assert!(self.catalog.with_control(|db| db.request_dead_letter_replay(id)).unwrap() > 0);
        wait_for(
            Duration::from_secs(20),
            || self.catalog.with_control(|db| db.dead_letter_counts()).unwrap().replay_requested == 0,
            || "the requested dead-letter replays to run".into(),
        );
    }

    fn stop(mut self) {
        self.stop.trigger();
        for t in std::mem::take(&mut self.tasks) {
            self.rt.block_on(t).unwrap();
        }
    }
}

fn wait_for(timeout: Duration, mut ok: impl FnMut() -> bool, what: impl Fn() -> String) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting: {}", what());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn event(message_id: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"type": "track", "event": "E", "userId": "u", "messageId": message_id})).unwrap()
}

#[test]
fn unplannable_records_are_stored_once_and_the_offset_advances() {
    let mut f = Fixture::new();
    let (m1, m5) = (event("m1"), event("m5"));
    f.append(&[(b"web/m1", &m1), (b"web/m2", b"not json {"), (b"no-slash-key", &m1), (&[0xff, 0xfe, b'/', b'x'], &m1), (b"web/m5", &m5)]);
    // The first hand-over fails after the dead letters are stored: the batch runs again.
    f.jobs.fail.store(1, Ordering::SeqCst);
    f.start();
    f.wait_committed(5);
    assert_eq!(f.jobs.calls.load(Ordering::SeqCst), 2, "the batch ran twice");
    let letters = f.letters();
    assert_eq!(letters.iter().map(|d| d.offset).collect::<Vec<_>>(), [1, 2, 3], "each once: {letters:#?}");
    assert!(letters.iter().all(|d| d.stage == "route" && d.topic == "output" && d.partition == 0 && d.generation == 0 && d.destination.is_none()));
    let full = f.letter(letters[0].id);
    assert_eq!((full.key.as_slice(), full.payload.as_slice()), (&b"web/m2"[..], &b"not json {"[..]));
    assert!(full.reason.starts_with("event is not JSON"), "{}", full.reason);
    assert!(letters[1].reason.contains("is not <source>/<messageId>"), "{}", letters[1].reason);
    assert_eq!(letters[2].key, [0xff, 0xfe, b'/', b'x']);
    assert_eq!(letters[2].reason, "record key is not UTF-8");
    // The routable ones were routed, to both destinations.
    let keys = f.jobs.keys();
    let want: Vec<(String, String, i64)> =
        [("m1", "d1"), ("m1", "d2"), ("m5", "d1"), ("m5", "d2")].iter().map(|(m, d)| (m.to_string(), d.to_string(), 0)).collect();
    assert_eq!(keys, want);
    assert_eq!(f.metric("sluice_route_unroutable_total"), 6.0, "3 per run of the batch");
    // (`sluice_route_dead_letters`, one gauge per process, is checked with a real process: tests/dead_letters.rs of crates/sluice.)

    // The offset passed them: new records are routed as usual.
    let m6 = event("m6");
    f.append(&[(b"web/m6", &m6)]);
    f.wait_committed(6);
    assert_eq!(f.letters().len(), 3);
    f.stop();
}

#[test]
fn replays_replan_the_stored_record() {
    let mut f = Fixture::new();
    f.append(&[(b"web/m2", b"not json {"), (b"no-slash-key", b"{}")]);
    f.start();
    f.wait_committed(2);
    let letters = f.letters();
    assert_eq!(letters.len(), 2);

    // Still unplannable: the replay fails, the row stays open with the error.
    f.replay_and_wait(None);
    for d in &letters {
        let after = f.letter(d.id);
        assert_eq!((after.state(), after.attempts, after.replayed_at_ms), ("replay_failed", 1, None));
        assert_eq!(after.last_error.as_deref(), Some(d.reason.as_str()), "the same planner says the same");
    }
    assert!(f.jobs.keys().is_empty());

    // A dead letter the current planner can plan (as one an earlier
    // version could not: the store's own insert stands for that version's
    // route) is replayed with the route's generation to every connected
    // destination; one filed by a replay keeps that replay's generation
    // and destination.
    let good = |offset: u64, generation: i64, destination: Option<&str>, message_id: &str| NewDeadLetter {
        stage: if generation == 0 { "route" } else { "replay" },
        topic: OUTPUT_TOPIC.into(),
        partition: 0,
        offset,
        generation,
        destination: destination.map(str::to_owned),
        record_ms: 1,
        key: format!("web/{message_id}").into_bytes(),
        payload: event(message_id),
        reason: "planned by an older Sluice".into(),
    };
    f.catalog.with_control(|db| db.insert_dead_letters(&[good(100, 0, None, "m9"), good(101, 7, Some("d1"), "m10")])).unwrap();
    let ids: Vec<i64> = f.letters().iter().skip(2).map(|d| d.id).collect();
    f.replay_and_wait(None);
    assert_eq!(f.jobs.keys(), [("m10", "d1", 7), ("m9", "d1", 0), ("m9", "d2", 0)].map(|(m, d, g)| (m.to_string(), d.to_string(), g)).to_vec());
    assert_eq!(f.letter(ids[0]).replayed_jobs, Some(2));
    assert_eq!(f.letter(ids[1]).replayed_jobs, Some(1));
    assert!(ids.iter().all(|id| f.letter(*id).state() == "replayed"));
    // The unplannable ones were asked for again and failed again.
    assert!(letters.iter().all(|d| f.letter(d.id).attempts == 2 && f.letter(d.id).state() == "replay_failed"));
    assert_eq!(f.catalog.with_control(|db| db.dead_letter_counts()).unwrap().open, 2);

    // A hand-over that fails (a director down) is a failed replay too; asked again, it succeeds.
    f.catalog.with_control(|db| db.insert_dead_letters(&[good(102, 0, None, "m11")])).unwrap();
    let id = f.letters().last().unwrap().id;
    f.jobs.fail.store(1, Ordering::SeqCst);
    f.replay_and_wait(Some(id));
    let d = f.letter(id);
    assert_eq!(d.state(), "replay_failed");
    assert!(d.last_error.as_deref().unwrap().contains("injected failure"), "{d:?}");
    f.replay_and_wait(Some(id));
    assert_eq!(f.letter(id).state(), "replayed");
    assert!(f.jobs.keys().contains(&("m11".to_string(), "d2".to_string(), 0)));
    f.stop();
}

#[test]
fn a_replay_files_what_it_cannot_plan_under_its_generation() {
    let mut f = Fixture::new();
    let m1 = event("m1");
    f.append(&[(b"web/m1", &m1), (b"web/m2", b"not json {")]);
    f.start();
    f.wait_committed(2);
    let replay = f.catalog.with_control(|db| db.request_replay("d1", 0)).unwrap();
    wait_for(
        Duration::from_secs(20),
        || f.catalog.with_control(|db| db.replay(replay)).unwrap().unwrap().state == "done",
        || "the replay to finish".into(),
    );
    let letters = f.letters();
    assert_eq!(letters.len(), 2, "the route's, and the replay's: {letters:#?}");
    let r = &letters[1];
    assert_eq!((r.stage.as_str(), r.offset, r.generation, r.destination.as_deref()), ("replay", 1, replay, Some("d1")));
    assert!(f.jobs.keys().contains(&("m1".to_string(), "d1".to_string(), replay)));
    f.stop();
}

#[test]
fn a_full_store_holds_the_partition_back_until_room_is_made() {
    let mut f = Fixture::new();
    f.catalog
        .with_control(|db| {
            db.set_dead_letter_limits(DeadLetterLimits { max_rows: 2, ..db.dead_letter_limits() });
            Ok(())
        })
        .unwrap();
    let m9 = event("m9");
    f.append(&[(b"web/m1", b"x"), (b"web/m2", b"y")]);
    f.start();
    f.wait_committed(2);
    let full_before = f.metric("sluice_route_dead_letters_full_total");
    // A third does not fit: its batch (and the good event after it) waits.
    f.append(&[(b"web/m3", b"z"), (b"web/m9", &m9)]);
    wait_for(
        Duration::from_secs(20),
        || f.metric("sluice_route_dead_letters_full_total") >= full_before + 2.0,
        || "the route to retry the refused batch".into(),
    );
    assert_eq!(f.committed(), Some(2), "held back, not skipped");
    assert_eq!(f.letters().len(), 2);
    assert!(f.jobs.keys().is_empty());
    // Discarding one makes room: the batch goes through.
    let first = f.letters()[0].id;
    assert_eq!(f.catalog.with_control(|db| db.discard_dead_letters(Some(first))).unwrap(), 1);
    f.wait_committed(4);
    let offsets: Vec<u64> = f.letters().iter().map(|d| d.offset).collect();
    assert_eq!(offsets, [1, 2], "the discarded row made room");
    assert!(f.jobs.keys().contains(&("m9".to_string(), "d1".to_string(), 0)));
    f.stop();
}

/// Key records (a moving workspace's dedup keys, docs/plans/MIGRATION.md)
/// reach `output` like events; the route passes them by: no job, no dead
/// letter, and the offset advances.
#[test]
fn key_records_make_no_jobs_and_no_dead_letters() {
    let mut f = Fixture::new();
    let m1 = event("m1");
    let key_record = [sluice_core::topics::KEY_RECORD, b"1700000000000"].concat();
    f.append(&[(b"web/k1", &key_record), (b"web/m1", &m1), (b"web/k2", &key_record)]);
    f.start();
    f.wait_committed(3);
    assert!(f.letters().is_empty(), "{:#?}", f.letters());
    let want: Vec<(String, String, i64)> = [("m1", "d1"), ("m1", "d2")].iter().map(|(m, d)| (m.to_string(), d.to_string(), 0)).collect();
    assert_eq!(f.jobs.keys(), want);
    assert_eq!(f.metric("sluice_route_unroutable_total"), 0.0);
    f.stop();
}
