//! `type = "batch_webhook"` against the real binary: events arrive as
//! `{"batch": [...]}` requests of at most `batch_max_events` and
//! `batch_max_bytes`, each event once, signed over the whole body; a
//! partial batch goes out after `batch_max_age`; an endpoint that fails for
//! a while gets every event once it answers again (at least once: a batch
//! resent after a failure may repeat events, never lose one).

mod util;

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;
use sluice_deliver::sink::{Behaviour, Received};
use util::*;

/// Every event of every batch request on `path`: messageId → times received.
fn events_on(sink: &TestSink, path: &str) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for r in sink.sink.received_on(path).iter().filter(|r| r.answered == Some(200)) {
        for e in r.json()["batch"].as_array().unwrap_or_else(|| panic!("a batch body: {}", String::from_utf8_lossy(&r.body))) {
            *seen.entry(e["messageId"].as_str().unwrap().to_owned()).or_default() += 1;
        }
    }
    seen
}

fn wait_all(sink: &TestSink, path: &str, n: usize) {
    wait_for(
        Duration::from_secs(60),
        || (events_on(sink, path).len() >= n).then_some(()),
        || format!("{} of {n} events at {path}", events_on(sink, path).len()),
    );
}

fn batch_sizes(requests: &[Received]) -> Vec<usize> {
    requests.iter().map(|r| r.json()["batch"].as_array().map_or(0, Vec::len)).collect()
}

#[test]
fn batch_webhooks_group_events_by_count_bytes_and_age_and_lose_none_to_a_failing_endpoint() {
    let sink = TestSink::start();
    let dir = tempfile::tempdir().unwrap();
    let dest = |id: &str, extra: &str| {
        format!(
            "[[destinations]]\nid = \"{id}\"\ntype = \"batch_webhook\"\nurl = \"{}\"\nallow_private_network = true\nsecret = \"s3cret\"\n\
             initial_backoff = \"100ms\"\nmax_backoff = \"300ms\"\n{extra}\n",
            sink.sink.url(&format!("/{id}"))
        )
    };
    let extra = format!(
        "{}{}{}[[connections]]\nsource = \"{SOURCE_ID}\"\ndestinations = [\"count\", \"bytes\", \"flaky\"]\n",
        dest("count", "batch_max_events = 50\nbatch_max_age = \"200ms\""),
        dest("bytes", "batch_max_bytes = 2048\nbatch_max_age = \"200ms\""),
        dest("flaky", "batch_max_events = 20\nbatch_max_age = \"100ms\""),
    );
    let config = write_config(dir.path(), &extra);
    sink.sink.set("/flaky", Behaviour::status(503));
    let server = Server::start(&config);

    let n = 230;
    let events: Vec<Value> = (0..n).map(|i| track_event(&format!("b-{i}"), i)).collect();
    for chunk in events.chunks(46) {
        sink.post_batch(&server.addr, chunk).unwrap();
    }
    wait_all(&sink, "/count", n);
    wait_all(&sink, "/bytes", n);

    // By count: at most 50 per request, each event exactly once (the endpoint never failed), fewer requests than events.
    let count = sink.sink.received_on("/count");
    let sizes = batch_sizes(&count);
    assert!(sizes.iter().all(|&k| (1..=50).contains(&k)), "{sizes:?}");
    assert!(count.len() < n / 4, "batched: {} requests for {n} events ({sizes:?})", count.len());
    let seen = events_on(&sink, "/count");
    assert!(seen.len() == n && seen.values().all(|&k| k == 1), "each event once: {seen:?}");
    for r in &count {
        // Signed over the whole body, as a single event's request is; a key of its jobs.
        let (sha1, _) = sluice_deliver::executor::signatures(b"s3cret", &r.body, 0);
        assert_eq!(r.header("x-signature"), Some(sha1.as_str()));
        assert!(r.header("x-sluice-signature").is_some_and(|v| v.starts_with("t=")));
        assert!(r.header("idempotency-key").is_some_and(|k| k.starts_with("batch-")), "{:?}", r.header("idempotency-key"));
    }
    // By bytes: a request's events fit 2 KiB (one event is ~150 bytes).
    let bytes = sink.sink.received_on("/bytes");
    for r in &bytes {
        let events_bytes: usize = r.json()["batch"].as_array().unwrap().iter().map(|e| e.to_string().len() + 1).sum();
        assert!(events_bytes <= 2048 + 64, "{events_bytes} bytes of events in one request");
    }
    assert!(bytes.len() > count.len(), "smaller batches by bytes: {} vs {}", bytes.len(), count.len());
    assert_eq!(events_on(&sink, "/bytes").len(), n);

    // The failing endpoint: nothing lost once it answers again.
    wait_for(Duration::from_secs(20), || (sink.sink.received_on("/flaky").len() >= 5).then_some(()), || "retries to /flaky".into());
    assert!(events_on(&sink, "/flaky").is_empty(), "nothing was accepted while it failed");
    sink.sink.set("/flaky", Behaviour::default());
    wait_all(&sink, "/flaky", n);
    let flaky = sink.sink.received_on("/flaky").into_iter().filter(|r| r.answered == Some(200)).collect::<Vec<_>>();
    assert!(batch_sizes(&flaky).iter().all(|&k| (1..=20).contains(&k)), "{:?}", batch_sizes(&flaky));

    // A type's keys are its own.
    let (ok, stderr) = config_check(dir.path(), "[[destinations]]\nid = \"w\"\nurl = \"http://127.0.0.1:9/w\"\nbatch_max_events = 10\n");
    assert!(!ok && stderr.contains("batch_max_events"), "{stderr}");
    server.stop();
}
