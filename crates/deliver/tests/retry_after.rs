//! Issue 11 (7): an endpoint answering `503` with a huge `Retry-After`
//! (`9223372036854775` seconds) overflowed `retry_at` into the past, and the
//! director retried the job at once, in a loop. The wait is now clamped to
//! the job's retry window: the retry is scheduled after the answer and no
//! later than the window's end, and no second request goes out meanwhile.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sluice_core::Config;
use sluice_deliver::inspect;
use sluice_deliver::sink::{Behaviour, Sink};
use sluice_deliver::store::JobState;
use sluice_deliver::{Catalog, Centrifuge, CentrifugeOptions, DeliverMetrics, NewJob};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_retry_after_is_clamped_to_the_retry_window() {
    let sink = Sink::start().await.unwrap();
    // 2^63 ms is ~9.22e15 s: this many seconds in ms sits just under i64::MAX,
    // so `now + it` overflowed. The second is past u64 seconds altogether.
    sink.set("/huge", Behaviour { retry_after: Some(9_223_372_036_854_775), ..Behaviour::status(503) });
    sink.set("/max", Behaviour { retry_after: Some(u64::MAX), ..Behaviour::status(503) });
    let dir = tempfile::tempdir().unwrap();
    let mut toml = format!("[server]\ndata_dir = \"{}\"\n[[sources]]\nid = \"s1\"\nwrite_key = \"k1\"\n", dir.path().join("data").display());
    for (id, path) in [("huge", "/huge"), ("max", "/max")] {
        toml += &format!(
            "[[destinations]]\nid = \"{id}\"\nurl = \"{}\"\nallow_private_network = true\n\
             initial_backoff = \"10ms\"\nmax_backoff = \"20ms\"\nretry_window = \"1h\"\n",
            sink.url(path)
        );
    }
    let config = Config::from_toml_with_env(&toml, "", &HashMap::new()).unwrap();
    let catalog = Catalog::open(&config).unwrap();
    let centrifuge: Arc<Centrifuge> = Centrifuge::open(CentrifugeOptions::from_config(&config), catalog, DeliverMetrics::default()).await.unwrap();
    let jobs_dir = config.server.data_dir.join("jobs");

    let now = sluice_deliver::now_ms();
    let window_end = now + 3_600_000;
    let jobs = ["huge", "max"]
        .map(|d| NewJob {
            message_id: format!("m-{d}"),
            source: "s1".into(),
            destination: d.into(),
            generation: 0,
            endpoint: String::new(),
            payload: Bytes::from_static(b"{\"type\":\"track\",\"event\":\"E\"}"),
            created_at: now,
            expires_at: window_end,
            received_at: now,
        })
        .to_vec();
    assert_eq!(centrifuge.insert(jobs, now).await.unwrap(), 2);

    // Wait for each job's `awaiting_retry` row.
    let deadline = Instant::now() + Duration::from_secs(20);
    let retries = loop {
        let found: Vec<_> = ["m-huge", "m-max"]
            .iter()
            .filter_map(|m| {
                let f = inspect::find(&jobs_dir, m).unwrap().into_iter().next()?;
                f.history.iter().find(|t| t.state == JobState::AwaitingRetry).cloned()
            })
            .collect();
        if found.len() == 2 {
            break found;
        }
        assert!(Instant::now() < deadline, "no awaiting_retry rows yet: {found:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for t in &retries {
        let retry_at = t.retry_at.expect("awaiting_retry has a retry_at");
        assert_eq!(t.status, Some(503));
        assert!(retry_at > t.at, "retry_at {retry_at} is not after the answer at {}: {t:?}", t.at);
        assert!(retry_at <= window_end, "retry_at {retry_at} is past the retry window's end {window_end}: {t:?}");
        assert_eq!(retry_at, window_end, "a Retry-After longer than the window waits until its end: {t:?}");
    }

    // The old code retried at once, in a loop: hundreds of requests within
    // this pause. Now the next attempt is an hour away; one request each.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sink.received_on("/huge").len(), 1, "the job was retried instead of waiting");
    assert_eq!(sink.received_on("/max").len(), 1, "the job was retried instead of waiting");
    for m in ["m-huge", "m-max"] {
        let f = inspect::find(&jobs_dir, m).unwrap().into_iter().next().unwrap();
        let states: Vec<_> = f.history.iter().map(|t| t.state).collect();
        assert_eq!(states, vec![JobState::Executing, JobState::AwaitingRetry], "{m}");
    }
    centrifuge.close().await;
}
