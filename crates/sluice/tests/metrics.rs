//! The admin port's Prometheus metrics for ingest, the log, dedup, route and delivery,
//! against the real binary.

mod util;

use std::time::{Duration, Instant};

use util::*;

fn scrape(rt: &tokio::runtime::Runtime, server: &Server) -> String {
    rt.block_on(async { reqwest::get(format!("http://{}/metrics", server.admin)).await.unwrap().text().await.unwrap() })
}

/// The value of a sample line `name{labels} value` (labels given verbatim, or none).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

fn sum_of(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && (l[name.len()..].starts_with('{') || l[name.len()..].starts_with(' ')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn metrics_report_ingest_log_and_dedup() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let server = Server::start(&config);
    let rt = tokio::runtime::Runtime::new().unwrap();
    // 300 unique events, then the same 300 again, plus one invalid item.
    let batch: Vec<_> = (0..300).map(|i| serde_json::json!({"type":"track","userId":"u","event":"E","messageId":format!("mm-{i}")})).collect();
    let mut with_invalid = batch.clone();
    with_invalid.push(serde_json::json!({"type":"track","userId":"u"}));
    for body in [batch.clone(), with_invalid] {
        let status = rt.block_on(async {
            reqwest::Client::new()
                .post(server.url("/v1/batch"))
                .basic_auth(WRITE_KEY, Some(""))
                .json(&serde_json::json!({ "batch": body }))
                .send()
                .await
                .unwrap()
                .status()
        });
        assert_eq!(status, 200);
    }
    wait_for_dedup_drained(&dir.path().join("data"), Duration::from_secs(60));

    // Gauges refresh every few seconds; wait for the index to show its keys.
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let text = scrape(&rt, &server);
        if sum_of(&text, "sluice_dedup_index_keys") >= 300.0 || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(sample(&text, "sluice_ingest_events_accepted_total{source=\"web\"}"), Some(600.0), "{text}");
    assert_eq!(sample(&text, "sluice_ingest_events_rejected_total{reason=\"missing_field\"}"), Some(1.0));
    assert_eq!(sample(&text, "sluice_log_appended_records_total"), Some(900.0), "600 to input + 300 to output");
    assert_eq!(sample(&text, "sluice_dedup_messages_in_total"), Some(600.0));
    assert_eq!(sample(&text, "sluice_dedup_duplicates_dropped_total"), Some(300.0));
    assert_eq!(sample(&text, "sluice_dedup_published_total"), Some(300.0));
    assert_eq!(sum_of(&text, "sluice_dedup_index_keys"), 300.0, "index keys per partition sum to the unique ids");
    assert_eq!(sum_of(&text, "sluice_dedup_catchup_remaining"), 0.0);
    assert!(text.contains("sluice_dedup_rocksdb_bloom_useful"), "bloom statistics are exported");
    assert!(text.contains("sluice_dedup_rocksdb_bloom_full_positive"));
    assert!(text.contains("sluice_ingest_ack_seconds_bucket"));
    server.stop();
}

#[test]
fn metrics_report_route_and_delivery() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sink = rt.block_on(sluice_deliver::sink::Sink::start()).unwrap();
    sink.set("/gone", sluice_deliver::sink::Behaviour::status(410));
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        "[[destinations]]\nid = \"hook\"\nurl = \"{}\"\nallow_private_network = true\n\
         [[destinations]]\nid = \"gone\"\nurl = \"{}\"\nallow_private_network = true\n\
         [[connections]]\nsource = \"{SOURCE_ID}\"\ndestinations = [\"hook\", \"gone\"]\n",
        sink.url("/hook"),
        sink.url("/gone")
    );
    let config = write_config(dir.path(), &extra);
    let server = Server::start(&config);
    let batch: Vec<_> = (0..200).map(|i| serde_json::json!({"type":"track","userId":"u","event":"E","messageId":format!("md-{i}")})).collect();
    let status = rt.block_on(async {
        reqwest::Client::new()
            .post(server.url("/v1/batch"))
            .basic_auth(WRITE_KEY, Some(""))
            .json(&serde_json::json!({ "batch": batch }))
            .send()
            .await
            .unwrap()
            .status()
    });
    assert_eq!(status, 200);
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let text = scrape(&rt, &server);
        let done = sample(&text, "sluice_deliver_outcomes_total{destination=\"hook\",outcome=\"succeeded\"}") == Some(200.0)
            && sample(&text, "sluice_deliver_outcomes_total{destination=\"gone\",outcome=\"discarded\"}") == Some(200.0);
        if done || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(sample(&text, "sluice_deliver_outcomes_total{destination=\"hook\",outcome=\"succeeded\"}"), Some(200.0), "{text}");
    assert_eq!(sample(&text, "sluice_deliver_outcomes_total{destination=\"gone\",outcome=\"discarded\"}"), Some(200.0));
    assert_eq!(sample(&text, "sluice_route_events_total"), Some(200.0));
    assert_eq!(sample(&text, "sluice_route_jobs_total"), Some(400.0));
    assert_eq!(sample(&text, "sluice_deliver_jobs_inserted_total"), Some(400.0));
    assert_eq!(sample(&text, "sluice_deliver_jobdbs"), Some(1.0));
    assert!(
        text.lines().any(|l| l.starts_with("sluice_deliver_attempt_seconds_bucket{") && l.contains("destination=\"hook\"")),
        "attempt latency per destination:\n{text}"
    );
    assert_eq!(sink.received_on("/hook").len(), 200);
    server.stop();
}
