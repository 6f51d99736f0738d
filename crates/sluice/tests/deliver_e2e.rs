//! Delivery end to end, against the real `sluice serve` and a webhook sink
//! in the test process: the official SDKs' events (with client retries)
//! reach the webhook once each, signed and intact; `sluice replay` delivers
//! them again under a new generation; `sluice jobs inspect` shows the
//! history; a destination paused with one SQL statement holds its jobs
//! until it is resumed.
//!
//! Every wait is bounded; no assertion depends on timing.

mod util;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde_json::Value;
use util::*;

const SECRET: &str = "s3cret";
/// Generous bound for delivery on this 2-core machine.
const DELIVER_TIMEOUT: Duration = Duration::from_secs(120);
/// A graceful stop that takes longer is a hang (directors get 5 s for requests in flight).
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// hex(HMAC-SHA1(secret, body)): what `X-Signature` must be.
fn hmac_sha1_hex(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// Wait until `jobs stats` shows exactly `n` jobs for "hook", all succeeded.
fn wait_all_succeeded(config: &Path, server: &Server, n: u64) {
    wait_for(
        DELIVER_TIMEOUT,
        || {
            let st = jobs_stats(config);
            (stats_for(&st, "hook").get("succeeded").copied() == Some(n) && unfinished_in(&st) == 0).then_some(())
        },
        || format!("not every job succeeded: {}\nserver stderr:\n{}", jobs_stats(config), server.stderr_tail(30)),
    );
}

/// Wait until the sink has received every id in `ids` at least `times` times on /hook.
fn wait_received(sink: &TestSink, server: &Server, ids: &HashSet<String>, times: usize) {
    wait_for(
        DELIVER_TIMEOUT,
        || {
            let got = sink.by_message_id("/hook");
            ids.iter().all(|id| got.get(id).map_or(0, Vec::len) >= times).then_some(())
        },
        || {
            let got = sink.by_message_id("/hook");
            let missing = ids.iter().filter(|id| got.get(*id).map_or(0, Vec::len) < times).count();
            format!("{missing} of {} messageIds not received {times} time(s) yet\nserver stderr:\n{}", ids.len(), server.stderr_tail(30))
        },
    );
}

#[test]
fn official_sdks_events_reach_the_webhook_once_each_signed_and_intact() {
    let sink = TestSink::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = write_config(dir.path(), &hook_toml(&sink.sink.url("/hook"), &format!("secret = \"{SECRET}\"")));
    let server = Server::start(&config);

    // 500 events per SDK; every 167th (0.6%) sent a second time by the client.
    let (count, resend_every) = (500, 167);
    let mut sent = run_e2e_script("python", &server, "a", count, resend_every);
    let py_resent = sent.iter().filter(|s| s["resent"] == true).count();
    let node = run_e2e_script("node", &server, "a", count, resend_every);
    let node_resent = node.iter().filter(|s| s["resent"] == true).count();
    sent.extend(node);
    assert_eq!(sent.len(), 2 * count, "the scripts report every unique event they sent");
    assert!(py_resent >= 3 && node_resent >= 3, "client retries: python {py_resent}, node {node_resent}");
    let expected: HashMap<String, &Value> = sent.iter().map(|s| (s["messageId"].as_str().unwrap().to_owned(), s)).collect();
    assert_eq!(expected.len(), sent.len(), "unique messageIds");
    let ids: HashSet<String> = expected.keys().cloned().collect();

    wait_received(&sink, &server, &ids, 1);
    // Every job finished: nothing more will be sent.
    wait_all_succeeded(&config, &server, ids.len() as u64);
    let stats = jobs_stats(&config);
    assert_eq!(
        stats_for(&stats, "hook"),
        [("succeeded".to_owned(), ids.len() as u64)].into(),
        "jobs stats: one job per unique event, all succeeded: {stats}"
    );

    // The verifier itself, against `printf '%s' '{"a":1}' | openssl dgst -sha1 -hmac s3cret`.
    assert_eq!(hmac_sha1_hex(SECRET, br#"{"a":1}"#), "79999786a1bff10cd4d7dd0b0752574af76be0b5");
    let received = sink.sink.received();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for r in &received {
        assert_eq!(r.path, "/hook", "a request on another path");
        let key = r.header("idempotency-key").expect("Idempotency-Key header").to_owned();
        let body = r.json();
        assert_eq!(body["messageId"].as_str(), Some(key.as_str()), "Idempotency-Key is the body's messageId: {body}");
        assert_eq!(r.header("x-signature"), Some(hmac_sha1_hex(SECRET, &r.body).as_str()), "X-Signature of {key} is hex HMAC-SHA1(secret, body)");
        assert!(r.header("content-type").is_some_and(|c| c.starts_with("application/json")), "content type of {key}");
        *seen.entry(key.clone()).or_default() += 1;
        let s = expected.get(&key).unwrap_or_else(|| panic!("the sink received an event nobody sent: {body}"));
        assert_eq!(body["type"], s["type"], "type of {key}: {body}");
        assert_eq!(body["userId"], s["userId"], "userId of {key}: {body}");
        match s["type"].as_str().unwrap() {
            "track" => {
                assert_eq!(body["event"], s["event"], "{body}");
                assert_eq!(body["properties"], s["properties"], "properties of {key}");
            }
            "identify" => assert_eq!(body["traits"], s["traits"], "traits of {key}"),
            "page" | "screen" => assert_eq!(body["properties"], s["properties"], "properties of {key}"),
            other => panic!("unexpected type {other}"),
        }
        let library = if key.starts_with("py-") { "analytics-python" } else { "@segment/analytics-node" };
        assert_eq!(body["context"]["library"]["name"], library, "{body}");
        assert!(body.get("writeKey").is_none(), "the write key is not forwarded: {body}");
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "messageIds delivered more than once: {twice:?}");
    assert_eq!(seen.len(), ids.len(), "every unique messageId delivered");
    assert_eq!(received.len(), ids.len(), "nothing else delivered");
    server.stop_within(STOP_TIMEOUT);

    // The client retries really reached Sluice twice (dedup dropped the copies).
    let mut in_input: HashMap<String, usize> = HashMap::new();
    for s in read_input(&data) {
        *in_input.entry(s.event["messageId"].as_str().unwrap().to_owned()).or_default() += 1;
    }
    for s in &sent {
        let id = s["messageId"].as_str().unwrap();
        let want = if s["resent"] == true { 2 } else { 1 };
        assert_eq!(in_input.get(id).copied(), Some(want), "{id} in input");
    }
    eprintln!("delivered {} events once each ({} client retries dropped by dedup)", ids.len(), py_resent + node_resent);
}

#[test]
fn replay_redelivers_every_event_and_jobs_inspect_shows_the_history() {
    let sink = TestSink::start();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &hook_toml(&sink.sink.url("/hook"), ""));
    let cfg = config.to_str().unwrap();
    let server = Server::start(&config);

    let n = 60;
    let ids: Vec<String> = (0..n).map(|i| format!("replay-{i}")).collect();
    for (b, chunk) in ids.chunks(20).enumerate() {
        let events: Vec<Value> = chunk.iter().enumerate().map(|(i, id)| track_event(id, b * 20 + i)).collect();
        sink.post_batch(&server.addr, &events).expect("post a batch to a running server");
    }
    let idset: HashSet<String> = ids.iter().cloned().collect();
    wait_received(&sink, &server, &idset, 1);
    wait_all_succeeded(&config, &server, n as u64);
    assert_eq!(sink.sink.count(), n as u64, "each event delivered once before the replay");

    // A replay for an unknown destination is refused with a clear message.
    let out = sluice_cmd(&["replay", "--config", cfg, "--destination", "nope", "--since", "1h"]);
    assert!(!out.status.success(), "replay to an unknown destination must fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no destination \"nope\""), "stderr: {err}");

    let out = sluice_cmd(&["replay", "--config", cfg, "--destination", "hook", "--since", "1h"]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "sluice replay failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    eprintln!("{}", stdout.trim());
    // "replay N done: X events read, Y jobs made for hook"
    let line = stdout.lines().find(|l| l.starts_with("replay ")).unwrap_or_else(|| panic!("no replay line in {stdout:?}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let replay_id: i64 = words[1].parse().unwrap_or_else(|_| panic!("replay id in {line:?}"));
    assert!(replay_id > 0);
    assert!(line.contains(&format!("done: {n} events read, {n} jobs made")), "{line}");

    wait_received(&sink, &server, &idset, 2);
    wait_all_succeeded(&config, &server, 2 * n as u64);
    let by_id = sink.by_message_id("/hook");
    assert_eq!(by_id.len(), n, "only the events sent: {:?}", by_id.keys().collect::<Vec<_>>());
    for id in &ids {
        let got = &by_id[id];
        assert_eq!(got.len(), 2, "{id}: delivered once, then once by the replay");
        let keys: Vec<&str> = got.iter().map(|r| r.header("idempotency-key").unwrap()).collect();
        assert_eq!(keys, vec![id.clone(), format!("{id}:replay-{replay_id}")], "{id}: a replay's copy has its own Idempotency-Key");
        assert_eq!(got[0].body, got[1].body, "{id}: the replay sends the same event");
        assert_eq!(got[1].json()["messageId"], id.as_str());
        assert!(got[0].at < got[1].at, "{id}: the replayed copy comes second");

        let jobs = jobs_inspect_json(&config, id).unwrap_or_else(|e| panic!("jobs inspect {id}: {e}"));
        let jobs = jobs.as_array().expect("an array of jobs");
        assert_eq!(jobs.len(), 2, "{id}: the original job and the replay's: {jobs:?}");
        let mut gens: Vec<i64> = jobs.iter().map(|j| j["generation"].as_i64().unwrap()).collect();
        gens.sort();
        assert_eq!(gens, vec![0, replay_id], "{id}: generations");
        for j in jobs {
            assert_eq!(j["message_id"], id.as_str());
            assert_eq!(j["source"], SOURCE_ID);
            assert_eq!(j["destination"], "hook");
            assert_eq!(j["state"], "succeeded", "{j}");
            let states: Vec<&str> = j["transitions"].as_array().unwrap().iter().map(|t| t["state"].as_str().unwrap()).collect();
            assert_eq!(states, ["awaiting_scheduling", "executing", "succeeded"], "{id} transitions: {j}");
            let last = j["transitions"].as_array().unwrap().last().unwrap();
            assert_eq!(last["status"], 200, "{j}");
            assert_eq!(last["attempt"], 1, "{j}");
            let seqs: Vec<i64> = j["transitions"].as_array().unwrap().iter().map(|t| t["seq"].as_i64().unwrap()).collect();
            assert_eq!(seqs, [0, 1, 2], "{j}");
        }
    }

    // The text form shows both jobs and their transitions.
    let out = sluice_cmd(&["jobs", "inspect", &ids[0], "--config", cfg]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "jobs inspect: {}", String::from_utf8_lossy(&out.stderr));
    eprintln!("{text}");
    assert_eq!(text.matches(&format!("messageId {}", ids[0])).count(), 2, "{text}");
    assert!(text.contains("generation 0") && text.contains(&format!("generation {replay_id}")), "{text}");
    for state in ["awaiting_scheduling", "executing", "succeeded"] {
        assert_eq!(text.matches(state).count(), if state == "succeeded" { 4 } else { 2 }, "{state} in:\n{text}");
    }

    // An unknown id: non-zero exit and a clear message.
    let out = sluice_cmd(&["jobs", "inspect", "no-such-message", "--config", cfg]);
    assert!(!out.status.success(), "inspect of an unknown id must fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no job with messageId or id \"no-such-message\""), "stderr: {err}");
    assert!(out.stdout.is_empty(), "nothing on stdout: {}", String::from_utf8_lossy(&out.stdout));
    server.stop_within(STOP_TIMEOUT);
}

#[test]
fn a_destination_paused_by_sql_holds_its_jobs_until_resumed() {
    let sink = TestSink::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = write_config(dir.path(), &hook_toml(&sink.sink.url("/hook"), ""));
    let server = Server::start(&config);

    // The README's statement, by SQL on the running server's control database.
    assert_eq!(set_paused(&data, "hook", true), 1, "one destination_qos row for hook");
    // Directors re-read the control database every 2 s.
    std::thread::sleep(Duration::from_secs(3));

    let n = 40;
    let ids: Vec<String> = (0..n).map(|i| format!("paused-{i}")).collect();
    let events: Vec<Value> = ids.iter().enumerate().map(|(i, id)| track_event(id, i)).collect();
    sink.post_batch(&server.addr, &events).expect("post to a running server");

    // The route made every job: they wait, unsent.
    wait_for(
        DELIVER_TIMEOUT,
        || (stats_for(&jobs_stats(&config), "hook").values().sum::<u64>() == n as u64).then_some(()),
        || format!("the route did not make {n} jobs: {}", jobs_stats(&config)),
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(sink.sink.count(), 0, "a paused destination receives nothing");
    assert_eq!(stats_for(&jobs_stats(&config), "hook"), [("awaiting_scheduling".to_owned(), n as u64)].into(), "paused jobs are not started");

    assert_eq!(set_paused(&data, "hook", false), 1);
    let idset: HashSet<String> = ids.iter().cloned().collect();
    wait_received(&sink, &server, &idset, 1);
    wait_all_succeeded(&config, &server, n as u64);
    let by_key = sink.by_key("/hook");
    assert_eq!(by_key.len(), n, "only the events sent");
    for id in &ids {
        assert_eq!(by_key[id].len(), 1, "{id} delivered exactly once after the resume");
    }
    assert_eq!(sink.sink.count(), n as u64);
    server.stop_within(STOP_TIMEOUT);
}

/// Events acknowledged while delivery is switched off (with connections
/// configured) are delivered once it is on again, even when `output`'s
/// retention has passed meanwhile: the route guards `output` whenever
/// connections exist. Before, with `deliver.enabled = false` nothing guarded
/// it, retention removed every sealed segment, and turning delivery on
/// delivered only the newest events, silently.
#[test]
fn events_kept_while_delivery_is_off_are_delivered_once_it_is_on() {
    let sink = TestSink::start();
    let dir = tempfile::tempdir().unwrap();
    let hook = hook_toml(&sink.sink.url("/hook"), "");
    let write = |deliver: bool| {
        let config = write_config(dir.path(), &format!("[dedup]\nwindow = \"1s\"\n[deliver]\nenabled = {deliver}\n{hook}"));
        // One partition and small segments: many sealed segments for retention to remove.
        let text = std::fs::read_to_string(&config).unwrap().replace("[log]\npartitions = 4\n", "[log]\npartitions = 1\nsegment_bytes = 4096\n");
        std::fs::write(&config, text).unwrap();
        config
    };
    let config = write(false);
    let server = Server::start(&config);
    assert!(server.stderr_text().contains("delivery is off"), "the start says output is kept:\n{}", server.stderr_tail(10));
    let ids: Vec<String> = (0..300).map(|i| format!("kept-{i}")).collect();
    for chunk in ids.chunks(50) {
        let events: Vec<Value> = chunk.iter().enumerate().map(|(i, id)| track_event(id, i)).collect();
        sink.post_batch(&server.addr, &events).expect("post to a running server");
    }
    wait_for_dedup_drained(&dir.path().join("data"), DELIVER_TIMEOUT);
    server.stop_within(STOP_TIMEOUT);
    let segments = || std::fs::read_dir(dir.path().join("data/log/output/0")).unwrap().count();
    let before = segments();
    assert!(before > 3, "output has sealed segments ({before} files)");
    // Past the retention (the 1 s window); the log enforces it at open.
    std::thread::sleep(Duration::from_secs(2));
    Server::start(&config).stop_within(STOP_TIMEOUT);
    assert_eq!(segments(), before, "no output segment removed while the route has not read it");

    let config = write(true);
    let server = Server::start(&config);
    wait_received(&sink, &server, &ids.iter().cloned().collect(), 1);
    server.stop_within(STOP_TIMEOUT);
}

/// A panic while a request is sent (a bug, or one in a client library)
/// does not leave its jobs `executing` until a restart: they are retried,
/// the cause in their history, and delivered.
#[test]
fn a_panic_while_sending_is_retried_not_stuck() {
    let sink = TestSink::start();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &hook_toml(&sink.sink.url("/hook"), "initial_backoff = \"100ms\"\nmax_backoff = \"200ms\""));
    let server = Server::start_with_env(&config, &[("SLUICE_PANIC_AT", "deliver.send_request:2")]);
    let events: Vec<Value> = (0..3).map(|i| track_event(&format!("panic-{i}"), i)).collect();
    sink.post_batch(&server.addr, &events).expect("post");
    let ids: HashSet<String> = (0..3).map(|i| format!("panic-{i}")).collect();
    wait_received(&sink, &server, &ids, 1);
    wait_all_succeeded(&config, &server, 3);
    let errors: Vec<String> = ids
        .iter()
        .flat_map(|id| jobs_inspect_json(&config, id).unwrap().as_array().unwrap().clone())
        .flat_map(|job| job["transitions"].as_array().unwrap().clone())
        .filter_map(|t| t["error"].as_str().map(str::to_owned))
        .collect();
    assert!(errors.iter().any(|e| e.contains("inside Sluice") && e.contains("panic point")), "{errors:?}");
}
