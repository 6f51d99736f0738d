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
    sink.set("/down", sluice_deliver::sink::Behaviour::status(503));
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        "[[destinations]]\nid = \"hook\"\nurl = \"{}\"\nallow_private_network = true\n\
         [[destinations]]\nid = \"gone\"\nurl = \"{}\"\nallow_private_network = true\n\
         [[destinations]]\nid = \"down\"\nurl = \"{}\"\nallow_private_network = true\ninitial_backoff = \"1h\"\nmax_backoff = \"1h\"\n\
         [[connections]]\nsource = \"{SOURCE_ID}\"\ndestinations = [\"hook\", \"gone\", \"down\"]\n",
        sink.url("/hook"),
        sink.url("/gone"),
        sink.url("/down")
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
            && sample(&text, "sluice_deliver_outcomes_total{destination=\"gone\",outcome=\"discarded\"}") == Some(200.0)
            && sample(&text, "sluice_deliver_pending{source=\"web\",destination=\"down\"}") == Some(200.0)
            && sum_of(&text, "sluice_consumer_lag") == 0.0;
        if done || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(sample(&text, "sluice_deliver_outcomes_total{destination=\"hook\",outcome=\"succeeded\"}"), Some(200.0), "{text}");
    assert_eq!(sample(&text, "sluice_deliver_outcomes_total{destination=\"gone\",outcome=\"discarded\"}"), Some(200.0));
    assert_eq!(sample(&text, "sluice_route_events_total"), Some(200.0));
    assert_eq!(sample(&text, "sluice_route_jobs_total"), Some(600.0));
    assert_eq!(sample(&text, "sluice_deliver_jobs_inserted_total"), Some(600.0));
    // The retry queue of the pair whose endpoint answers 503, and its age.
    assert_eq!(sample(&text, "sluice_deliver_pending{source=\"web\",destination=\"down\"}"), Some(200.0), "{text}");
    assert_eq!(sample(&text, "sluice_deliver_pending{source=\"web\",destination=\"hook\"}").unwrap_or(0.0), 0.0);
    assert!(sample(&text, "sluice_deliver_oldest_pending_seconds{source=\"web\",destination=\"down\"}").is_some());
    // Consumer lag per group and partition, drained.
    assert!(text.contains("sluice_consumer_lag{group=\"route\",topic=\"output\",partition=\"0\"}"), "{text}");
    assert!(text.contains("sluice_consumer_lag{group=\"dedup\",topic=\"input\",partition=\"3\"}"));
    assert_eq!(sum_of(&text, "sluice_consumer_lag"), 0.0);
    // End to end: one observation per first delivery that succeeded.
    assert_eq!(sample(&text, "sluice_deliver_end_to_end_seconds_count"), Some(200.0));
    assert!(sample(&text, "sluice_route_batch_seconds_count").unwrap() >= 1.0);
    assert!(sample(&text, "sluice_dedup_batch_seconds_count").unwrap() >= 1.0);
    assert_eq!(sample(&text, "sluice_deliver_jobdbs"), Some(1.0));
    assert!(
        text.lines().any(|l| l.starts_with("sluice_deliver_attempt_seconds_bucket{") && l.contains("destination=\"hook\"")),
        "attempt latency per destination:\n{text}"
    );
    assert_eq!(sink.received_on("/hook").len(), 200);
    server.stop();
}

/// Metric names (`sluice_…`) an expression file refers to, with the
/// exposition suffixes taken off (`_total`, `_bucket`, `_sum`, `_count`).
fn referenced_metrics(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("sluice_") {
        let start = i + pos;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        let mut name = &text[start..end];
        for suffix in ["_total", "_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                name = base;
                break;
            }
        }
        out.insert(name.to_owned());
        i = end;
    }
    out
}

#[test]
fn alert_rules_and_dashboard_use_only_metrics_that_exist() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sink = rt.block_on(sluice_deliver::sink::Sink::start()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let extra = hook_destination_toml(&sink.url("/hook"));
    let server = Server::start(&write_config(dir.path(), &extra));
    let text = scrape(&rt, &server);
    let declared: std::collections::HashSet<&str> =
        text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.split(' ').next()).collect();
    let root = repo_root();
    for file in ["deploy/prometheus/sluice-alerts.yml", "deploy/grafana/sluice-dashboard.json"] {
        let content = std::fs::read_to_string(root.join(file)).unwrap();
        if file.ends_with(".json") {
            let _: serde_json::Value = serde_json::from_str(&content).unwrap_or_else(|e| panic!("{file} is not JSON: {e}"));
        }
        let names = referenced_metrics(&content);
        assert!(names.len() >= 8, "{file}: {names:?}");
        let unknown: Vec<_> = names.iter().filter(|n| !declared.contains(n.as_str())).collect();
        assert!(unknown.is_empty(), "{file} refers to metrics /metrics does not have: {unknown:?}");
    }
    server.stop();
}

/// GET `path` on the admin port with an optional bearer token: status and body.
fn get_admin(rt: &tokio::runtime::Runtime, server: &Server, path: &str, token: Option<&str>) -> (u16, String) {
    rt.block_on(async {
        let mut req = reqwest::Client::new().get(format!("http://{}{path}", server.admin));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    })
}

#[test]
fn metrics_are_public_unless_admin_metrics_token_is_set() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Default: public (as it always was).
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&write_config(dir.path(), ""));
    let (status, text) = get_admin(&rt, &server, "/metrics", None);
    assert_eq!(status, 200);
    assert!(text.contains("sluice_ingest_events_accepted"), "{text}");
    server.stop();

    // With admin.metrics_token: that token or admin.token.
    const METRICS_TOKEN: &str = "metrics-token-0123456789";
    const ADMIN_TOKEN: &str = "admin-token-0123456789abc";
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    set_admin_token(&config, ADMIN_TOKEN);
    let text = std::fs::read_to_string(&config).unwrap().replacen("[admin]\n", &format!("[admin]\nmetrics_token = \"{METRICS_TOKEN}\"\n"), 1);
    std::fs::write(&config, text).unwrap();
    let server = Server::start(&config);
    let longer = format!("{METRICS_TOKEN}0");
    let same_length: String = METRICS_TOKEN.chars().rev().collect();
    for token in [None, Some(same_length.as_str()), Some(&METRICS_TOKEN[..METRICS_TOKEN.len() - 1]), Some(longer.as_str())] {
        let (status, text) = get_admin(&rt, &server, "/metrics", token);
        assert_eq!(status, 401, "token {token:?}");
        assert!(!text.contains("sluice_"), "no metrics in a refusal: {text}");
        assert!(!text.contains(SOURCE_ID), "no source ids in a refusal: {text}");
    }
    for token in [METRICS_TOKEN, ADMIN_TOKEN] {
        let (status, text) = get_admin(&rt, &server, "/metrics", Some(token));
        assert_eq!(status, 200, "token {token:?}");
        assert!(text.contains("sluice_ingest_events_accepted"), "{text}");
    }
    assert_eq!(get_admin(&rt, &server, "/healthz", None).0, 200, "/healthz stays public");
    server.stop();
}
