//! Crash tests of the delivery commit points (ARCHITECTURE.md), against the
//! real `sluice serve` and a webhook sink in the test process:
//!
//! - a director dies between an endpoint's 2xx and the `succeeded` row
//!   (`deliver.after_http_success`), or the process is `kill -9`ed
//!   mid-delivery: after a restart every event reaches the endpoint at least
//!   once, and only jobs whose latest state was `executing` when the process
//!   died are sent again;
//! - the route dies after its jobs are durable but before it commits its
//!   `output` offset (`route.after_insert`): the replayed batch makes no
//!   second job, and the endpoint gets each event exactly once — with a
//!   source function and a tracking plan that rewrite every event, both
//!   changed between the crash and the restart (the transformation stage's
//!   row of the crash matrix);
//! - with a destination function, the `kill -9` mid-delivery delivers every
//!   event transformed (the function runs again for a re-executed job).
//!
//! Every wait is bounded; no assertion depends on timing.

mod util;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_deliver::sink::Behaviour;
use util::*;

const SIGABRT: i32 = 6;
const TIMEOUT: Duration = Duration::from_secs(120);
/// A graceful stop that takes longer is a hang (directors get 5 s for requests in flight).
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// `n` messageIds in batches of `per_batch`.
fn batches(tag: &str, n: usize, per_batch: usize) -> Vec<Vec<Value>> {
    let events: Vec<Value> = (0..n).map(|i| track_event(&format!("{tag}-{i}"), i)).collect();
    events.chunks(per_batch).map(<[Value]>::to_vec).collect()
}

fn ids_of(batches: &[Vec<Value>]) -> HashSet<String> {
    batches.iter().flatten().map(|e| e["messageId"].as_str().unwrap().to_owned()).collect()
}

/// Post every batch; the ones that failed (the server died) are returned,
/// for a client to send again once the server is back.
fn post_all(sink: &TestSink, server: &Server, batches: &[Vec<Value>]) -> Vec<Vec<Value>> {
    let mut failed = Vec::new();
    for b in batches {
        if let Err(e) = sink.post_batch(&server.addr, b) {
            eprintln!("a batch of {} failed ({e}); it is sent again after the restart", b.len());
            failed.push(b.clone());
        }
    }
    failed
}

fn resend(sink: &TestSink, server: &Server, failed: &[Vec<Value>]) {
    for b in failed {
        sink.post_batch(&server.addr, b).unwrap_or_else(|e| panic!("resending to the restarted server: {e}\n{}", server.stderr_tail(30)));
    }
}

/// Every event the sink took on /hook, by messageId: a webhook's body, or
/// each element of a `batch_webhook`'s `{"batch": [...]}`. A single
/// event's `Idempotency-Key` is its messageId.
fn events_at_hook(sink: &TestSink) -> HashMap<String, Vec<Value>> {
    let mut out: HashMap<String, Vec<Value>> = HashMap::new();
    for r in sink.sink.received_on("/hook").into_iter().filter(|r| r.answered == Some(200)) {
        let body = r.json();
        let events = match body.get("batch") {
            Some(Value::Array(events)) => events.clone(),
            _ => {
                assert_eq!(r.header("idempotency-key"), body["messageId"].as_str(), "Idempotency-Key is the body's messageId");
                vec![body]
            }
        };
        for e in events {
            out.entry(e["messageId"].as_str().unwrap_or("<none>").to_owned()).or_default().push(e);
        }
    }
    out
}

/// Latest states of the jobs of "hook" in the JobDBs of a dead server.
fn states_after_death(data: &Path) -> (BTreeMap<String, usize>, HashSet<String>) {
    let rows = jobdb_rows(data);
    let mut states: BTreeMap<String, usize> = BTreeMap::new();
    let mut executing = HashSet::new();
    for r in &rows {
        assert_eq!(r.destination, "hook");
        *states.entry(r.state.clone()).or_default() += 1;
        if r.state == "executing" {
            executing.insert(r.message_id.clone());
        }
    }
    (states, executing)
}

/// Wait until every id in `ids` reached the sink, the route has routed all
/// of `output`, and no job is unfinished.
fn wait_delivered(sink: &TestSink, server: &Server, config: &Path, data: &Path, ids: &HashSet<String>) {
    wait_for(
        TIMEOUT,
        || {
            let got = events_at_hook(sink);
            (ids.iter().all(|id| got.contains_key(id))
                && try_wait_for_dedup_drained(data, Duration::ZERO).is_ok()
                && route_drained(data)
                && unfinished_in(&jobs_stats(config)) == 0)
                .then_some(())
        },
        || {
            let got = events_at_hook(sink);
            let missing = ids.iter().filter(|id| !got.contains_key(*id)).count();
            format!(
                "{missing} of {} not delivered; route lag {:?}; jobs {}\nserver stderr:\n{}",
                ids.len(),
                route_lag(data),
                jobs_stats(config),
                server.stderr_tail(30)
            )
        },
    );
}

/// The at-least-once checks after a death and a restart: every id received,
/// nothing else; duplicates only of jobs that were `executing` at the
/// death, each at most twice; and every `executing` job the endpoint had
/// already received (`before`: the messageIds the sink held just after the
/// death) was sent again. Returns the number of duplicated messageIds.
fn check_at_least_once(sink: &TestSink, ids: &HashSet<String>, executing: &HashSet<String>, before: &HashSet<String>) -> usize {
    let by_key = events_at_hook(sink);
    let unknown: Vec<&String> = by_key.keys().filter(|k| !ids.contains(*k)).collect();
    assert!(unknown.is_empty(), "the sink received messageIds nobody sent: {unknown:?}");
    let missing: Vec<&String> = ids.iter().filter(|id| !by_key.contains_key(*id)).collect();
    assert!(missing.is_empty(), "never delivered: {missing:?}");
    let dups: BTreeMap<&String, usize> = by_key.iter().filter(|(_, rs)| rs.len() > 1).map(|(k, rs)| (k, rs.len())).collect();
    for (k, n) in &dups {
        assert!(executing.contains(*k), "{k} was delivered {n} times but its job was not executing when the process died");
        assert_eq!(*n, 2, "{k}: re-executed once after the restart, not more");
    }
    assert!(dups.len() <= executing.len(), "{} duplicates > {} jobs executing at the death", dups.len(), executing.len());
    let mut not_resent: Vec<&String> = before.intersection(executing).filter(|k| !dups.contains_key(*k)).collect();
    not_resent.sort();
    assert!(not_resent.is_empty(), "jobs executing at the death, already received, not sent again: {not_resent:?}");
    dups.len()
}

#[test]
fn a_director_crash_after_a_2xx_redelivers_only_executing_jobs() {
    let sink = TestSink::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = write_config(dir.path(), &hook_toml(&sink.sink.url("/hook"), ""));
    let k = 30;
    let mut server = Server::start_with_env(&config, &[("SLUICE_CRASH_AT", &format!("deliver.after_http_success:{k}"))]);

    let batches = batches("dcrash", 200, 25);
    let ids = ids_of(&batches);
    let failed = post_all(&sink, &server, &batches);
    let status = server.wait_exit(TIMEOUT).unwrap_or_else(|| panic!("the crash point was not reached\n{}", server.stderr_tail(30)));
    assert_eq!(status.signal(), Some(SIGABRT), "aborted at the crash point: {status}\n{}", server.stderr_tail(10));
    assert!(server.stderr_text().contains("crash point deliver.after_http_success reached"));
    drop(server);

    let (states, executing) = states_after_death(&data);
    let before = sink.sink.count();
    let received_before: HashSet<String> = events_at_hook(&sink).into_keys().collect();
    eprintln!("at the crash: sink had {before} requests; jobs by state {states:?}");
    assert!(before >= k, "the crash came after the {k}th 2xx: the sink saw {before} requests");
    assert!(!executing.is_empty(), "the job whose 2xx was never recorded is still executing");

    let server = Server::start(&config);
    resend(&sink, &server, &failed);
    wait_delivered(&sink, &server, &config, &data, &ids);
    let dups = check_at_least_once(&sink, &ids, &executing, &received_before);
    eprintln!("duplicates: {dups} (of {} jobs executing at the crash)", executing.len());
    assert!(dups >= 1, "the job whose 2xx was lost in the crash is sent again");
    server.stop_within(STOP_TIMEOUT);
}

/// Seed the control database with a first start, then deploy `code` as function `id`.
fn set_function_before_start(config: &Path, data: &Path, id: &str, code: &str) {
    Server::start(config).stop_within(STOP_TIMEOUT);
    set_function(data, id, code);
}

#[test]
fn kill9_mid_delivery_redelivers_only_executing_jobs() {
    kill9_mid_delivery("");
}

/// A batch destination: a job executing at the kill is sent again in a later batch; none is lost.
#[test]
fn kill9_mid_batch_delivery_redelivers_only_executing_jobs() {
    kill9_mid_delivery("type = \"batch_webhook\"\nbatch_max_events = 5\nbatch_max_age = \"20ms\"\n");
}

fn kill9_mid_delivery(destination_keys: &str) {
    let sink = TestSink::start();
    // Slow endpoint and few requests in flight: delivery takes a while, so the kill lands mid-way.
    sink.sink.set("/hook", Behaviour { delay: Duration::from_millis(20), ..Behaviour::default() });
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = write_config(
        dir.path(),
        &hook_toml(&sink.sink.url("/hook"), &format!("max_in_flight = 4\nfunction = {{ id = \"rename\" }}\n{destination_keys}")),
    );
    // A destination function renames a property of every event it delivers.
    set_function_before_start(
        &config,
        &data,
        "rename",
        "async function onTrack(e) { e.properties.renamed = e.properties.i; delete e.properties.i; return e; }",
    );
    let server = Server::start(&config);

    let n = 200;
    let batches = batches("kill9", n, 25);
    let ids = ids_of(&batches);
    let mut rng = Rng::from_clock();
    let target = rng.range(10, n as u64 / 4 * 3);
    let failed = post_all(&sink, &server, &batches);
    assert!(failed.is_empty(), "the server is up while the events are sent");
    let received = || events_at_hook(&sink).len() as u64;
    wait_for(TIMEOUT, || (received() >= target).then_some(()), || format!("the sink got {} of {target} events", received()));
    server.kill9();
    let before = sink.sink.count();
    let received_before: HashSet<String> = events_at_hook(&sink).into_keys().collect();

    let (states, executing) = states_after_death(&data);
    eprintln!("killed after {before} requests (target {target}); jobs by state {states:?}");
    assert!((received_before.len() as u64) < n as u64, "the kill landed mid-delivery ({} of {n} delivered)", received_before.len());

    let server = Server::start(&config);
    wait_delivered(&sink, &server, &config, &data, &ids);
    let dups = check_at_least_once(&sink, &ids, &executing, &received_before);
    eprintln!("duplicates: {dups} (of {} jobs executing at the kill)", executing.len());
    for (id, received) in events_at_hook(&sink) {
        for e in received {
            let props = &e["properties"];
            assert!(props.get("i").is_none() && props["renamed"].is_u64(), "{id} went out through the function: {props}");
        }
    }
    server.stop_within(STOP_TIMEOUT);
}

#[test]
fn a_route_crash_after_insert_makes_no_second_job() {
    let sink = TestSink::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = write_config(dir.path(), &format!("function = {{ id = \"via\" }}\n{}", hook_toml(&sink.sink.url("/hook"), "")));

    // Hold delivery (the README's pause) so that every job stays in its JobDB
    // until it has been counted; a first start seeds the control database.
    Server::start(&config).stop_within(STOP_TIMEOUT);
    assert_eq!(set_paused(&data, "hook", true), 1);
    // A source function marks every event with its version; version 2 comes between the crash and the restart.
    let via = |v: u32| format!("async function onTrack(e) {{ e.properties.via = {v}; return e; }}");
    set_function(&data, "via", &via(1));
    // A tracking plan rewrites every event (flags it as unplanned); after the crash it is edited
    // (flags a missing field instead): whichever plan an event met, it gets one job.
    set_tracking_plan(&data, SOURCE_ID, &serde_json::json!({"unplanned": "flag"}));

    let mut server = Server::start_with_env(&config, &[("SLUICE_CRASH_AT", "route.after_insert:1")]);
    let batches = batches("rcrash", 200, 25);
    let ids = ids_of(&batches);
    let failed = post_all(&sink, &server, &batches);
    let status = server.wait_exit(TIMEOUT).unwrap_or_else(|| panic!("the crash point was not reached\n{}", server.stderr_tail(30)));
    assert_eq!(status.signal(), Some(SIGABRT), "aborted at the crash point: {status}\n{}", server.stderr_tail(10));
    drop(server);

    // The jobs of the crashed batch are durable, and their events are past the route's committed offset.
    let rows = jobdb_rows(&data);
    assert!(!rows.is_empty(), "the crashed route batch's jobs are in the JobDB");
    let with_job: HashSet<&str> = rows.iter().map(|r| r.message_id.as_str()).collect();
    let lag = route_lag(&data);
    let output = read_topic(&data, "output");
    let mut by_partition: HashMap<u32, u64> = HashMap::new();
    let mut replayed = 0;
    for s in &output {
        let offset = by_partition.entry(s.partition).or_default();
        let committed = lag[s.partition as usize].0.unwrap_or(0);
        if *offset >= committed && with_job.contains(s.event["messageId"].as_str().unwrap()) {
            replayed += 1;
        }
        *offset += 1;
    }
    eprintln!("at the crash: {} jobs; route lag {lag:?}; {replayed} events with a job will be routed again", rows.len());
    assert!(replayed > 0, "the crash left jobs whose events the route had not committed");

    set_tracking_plan(&data, SOURCE_ID, &serde_json::json!({"invalid": "flag", "common": {"required": ["no_such_field"]}}));
    set_function(&data, "via", &via(2));
    let server = Server::start(&config);
    resend(&sink, &server, &failed);
    wait_for(
        TIMEOUT,
        || (try_wait_for_dedup_drained(&data, Duration::ZERO).is_ok() && route_drained(&data) && jobdb_rows(&data).len() >= ids.len()).then_some(()),
        || format!("route lag {:?}, {} jobs\n{}", route_lag(&data), jobdb_rows(&data).len(), server.stderr_tail(30)),
    );
    let rows = jobdb_rows(&data);
    let mut jobs_per_id: HashMap<&str, usize> = HashMap::new();
    for r in &rows {
        assert_eq!((r.destination.as_str(), r.generation), ("hook", 0), "{r:?}");
        assert_eq!(r.state, "awaiting_scheduling", "paused: nothing started: {r:?}");
        *jobs_per_id.entry(r.message_id.as_str()).or_default() += 1;
    }
    let twice: Vec<_> = jobs_per_id.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "messageIds with more than one job: {twice:?}");
    assert_eq!(jobs_per_id.keys().map(|k| k.to_string()).collect::<HashSet<_>>(), ids, "one job per messageId");
    // The CLI agrees, for a job made before the crash.
    let first = rows.iter().find(|r| with_job.contains(r.message_id.as_str())).unwrap();
    let inspected = jobs_inspect_json(&config, &first.message_id).unwrap();
    assert_eq!(inspected.as_array().map(Vec::len), Some(1), "{inspected}");
    assert_eq!(sink.sink.count(), 0, "paused: nothing delivered yet");

    set_paused(&data, "hook", false);
    let started = Instant::now();
    wait_delivered(&sink, &server, &config, &data, &ids);
    eprintln!("delivered after the resume in {:?}", started.elapsed());
    let by_key = sink.by_key("/hook");
    assert_eq!(by_key.len(), ids.len(), "only the events sent");
    let mut by_plan: HashMap<String, usize> = HashMap::new();
    let mut by_function: BTreeMap<u64, usize> = BTreeMap::new();
    for id in &ids {
        assert_eq!(by_key[id].len(), 1, "{id} delivered exactly once");
        let violations = by_key[id][0].json()["context"]["violations"].clone();
        let types: Vec<&str> =
            violations.as_array().unwrap_or_else(|| panic!("{id} carries its violations")).iter().filter_map(|v| v["type"].as_str()).collect();
        // The first plan lists one violation (the event is unplanned); the second adds the missing field.
        let plan = if types.contains(&"Required") { "second" } else { "first" };
        *by_plan.entry(plan.to_owned()).or_default() += 1;
        let via = by_key[id][0].json()["properties"]["via"].as_u64().unwrap_or_else(|| panic!("{id} went through the source function"));
        *by_function.entry(via).or_default() += 1;
    }
    eprintln!("delivered per plan: {by_plan:?}; per source function version: {by_function:?}");
    assert!(by_plan.contains_key("first") && by_plan.contains_key("second"), "both plans were met: {by_plan:?}");
    assert!(by_function.contains_key(&1) && by_function.contains_key(&2), "both function versions were met: {by_function:?}");
    server.stop_within(STOP_TIMEOUT);
}
