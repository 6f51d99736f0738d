//! Crash test of the first commit point: kill -9 the server while clients
//! send, restart it, and check that every event that got a 200 is in the
//! log, that nothing is stored twice, and that the log reopens cleanly.

mod util;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use util::*;

const CLIENTS: usize = 4;
const BATCH: usize = 50;

/// Send batches until `stop` or until the server goes away; return the
/// messageIds of every batch answered 200.
async fn client(url: String, round: usize, c: usize, stop: Arc<AtomicBool>, acked: Arc<Mutex<Vec<String>>>) {
    let http = reqwest::Client::new();
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let ids: Vec<String> = (0..BATCH).map(|i| format!("r{round}-c{c}-b{n}-{i}")).collect();
        let batch: Vec<_> = ids
            .iter()
            .map(|id| serde_json::json!({"type":"track","userId":"u","event":"Crash Test","messageId":id,"properties":{"pad":"x".repeat(200)}}))
            .collect();
        let resp = http.post(&url).basic_auth(WRITE_KEY, Some("")).json(&serde_json::json!({ "batch": batch })).send().await;
        match resp {
            Ok(r) if r.status() == 200 => acked.lock().unwrap().extend(ids),
            Ok(r) => panic!("unexpected status {}", r.status()),
            Err(_) => return, // the server died mid-request: not acknowledged
        }
        n += 1;
    }
}

#[test]
fn kill9_while_sending_loses_no_acknowledged_event() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let acked = Arc::new(Mutex::new(Vec::new()));
    for round in 0..3 {
        let server = Server::start(&config);
        let stop = Arc::new(AtomicBool::new(false));
        let before = acked.lock().unwrap().len();
        let tasks: Vec<_> = (0..CLIENTS).map(|c| rt.spawn(client(server.url("/v1/batch"), round, c, stop.clone(), acked.clone()))).collect();
        // Let traffic flow, then kill while requests are in flight.
        std::thread::sleep(Duration::from_millis(1500));
        server.kill9();
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            rt.block_on(t).unwrap();
        }
        assert!(acked.lock().unwrap().len() > before, "round {round}: no batch was acknowledged before the kill");
    }

    // The log reopens cleanly (the server becomes ready) and keeps working.
    let server = Server::start(&config);
    assert_eq!(rt.block_on(post_one(server.url("/v1/track"))), 200);
    server.stop();

    let stored = read_input(&dir.path().join("data"));
    let ids: Vec<&str> = stored.iter().map(|s| s.event["messageId"].as_str().unwrap()).collect();
    let unique: HashSet<&str> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "no event stored twice");
    let acked = acked.lock().unwrap();
    let missing: Vec<&String> = acked.iter().filter(|id| !unique.contains(id.as_str())).collect();
    assert!(missing.is_empty(), "{} acknowledged events lost, e.g. {:?}", missing.len(), &missing[..missing.len().min(5)]);
    assert!(unique.contains("after-restart"));
    eprintln!("{} acknowledged events, {} stored, all acknowledged ones present", acked.len(), stored.len());
}

/// One single track call; returns the HTTP status.
async fn post_one(url: String) -> u16 {
    reqwest::Client::new()
        .post(url)
        .basic_auth(WRITE_KEY, Some(""))
        .json(&serde_json::json!({"userId":"u","event":"After Restart","messageId":"after-restart"}))
        .send()
        .await
        .expect("server answers after restart")
        .status()
        .as_u16()
}
