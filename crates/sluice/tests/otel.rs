//! OpenTelemetry traces (feature `otel`, on by default): `sluice serve` with
//! `SLUICE_OTLP_ENDPOINT` exports the spans of every stage to an OTLP/HTTP
//! collector (here a fake one that records what it is sent).
#![cfg(feature = "otel")]

mod util;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use sluice_deliver::sink::Sink;
use util::*;

#[test]
fn spans_of_every_stage_reach_an_otlp_collector() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sink = rt.block_on(Sink::start()).unwrap();
    // The fake collector: every POST body to /v1/traces (OTLP protobuf).
    let bodies: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let collector = {
        let bodies = bodies.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| {
                let bodies = bodies.clone();
                async move {
                    bodies.lock().unwrap().push(body.to_vec());
                    axum::http::StatusCode::OK
                }
            }),
        );
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        rt.spawn(async move { axum::serve(listener, app).await.unwrap() });
        addr
    };
    let dir = tempfile::tempdir().unwrap();
    let extra = hook_destination_toml(&sink.url("/hook"));
    let config = write_config(dir.path(), &extra);
    let endpoint = format!("http://{collector}/v1/traces");
    let server = Server::start_with_env(&config, &[("SLUICE_OTLP_ENDPOINT", endpoint.as_str())]);
    let status = rt.block_on(async {
        reqwest::Client::new()
            .post(server.url("/v1/track"))
            .basic_auth(WRITE_KEY, Some(""))
            .json(&json!({"userId": "u", "event": "Traced", "messageId": "t-1"}))
            .send()
            .await
            .unwrap()
            .status()
    });
    assert_eq!(status, 200);
    let deadline = Instant::now() + Duration::from_secs(20);
    while sink.received_on("/hook").is_empty() {
        assert!(Instant::now() < deadline, "t-1 not delivered");
        std::thread::sleep(Duration::from_millis(50));
    }
    // A graceful stop flushes the exporter's last batch.
    server.stop();
    let all: Vec<u8> = bodies.lock().unwrap().concat();
    assert!(!all.is_empty(), "the collector received nothing");
    let has = |needle: &str| all.windows(needle.len()).any(|w| w == needle.as_bytes());
    for span in ["ingest.request", "dedup.batch", "route.batch", "deliver.attempt"] {
        assert!(has(span), "no {span} span exported");
    }
    assert!(has("sluice"), "service.name sluice");
}
