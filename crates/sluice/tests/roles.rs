//! Each stage as its own process (`sluice ingest | dedup | route |
//! director`), sharing one real Kafka broker and one SQL database
//! (MariaDB, then PostgreSQL): events sent to the ingest process are
//! deduplicated, routed, handed to the director over RPC and delivered once.

mod util;

use std::time::Duration;

use util::*;

fn separate_roles_deliver_every_event_once(engine: &str) {
    let Some(db) = fresh_database(engine, "roles") else { return };
    let root = tempfile::tempdir().unwrap();
    let Some(broker) = Broker::start(&root.path().join("kafka"), &format!("sluice-test-roles-{engine}")) else { return };
    let sink = TestSink::start();
    let hook = sink.sink.url("/hook");
    let cfg = |name: &str| role_config(root.path(), name, &broker, &db, &hook, "d1", "");

    let director = Server::start_role("director", &cfg("director"), &[]);
    // A second director under the same name is refused (it would share d1's JobDBs).
    let twin = sluice_cmd(&["director", "--config", cfg("director-twin").to_str().unwrap()]);
    assert!(!twin.status.success(), "a second director named d1 must not start");
    let err = String::from_utf8_lossy(&twin.stderr);
    assert!(err.contains("already running"), "{err}");
    let dedup = Server::start_role("dedup", &cfg("dedup"), &[]);
    let route = Server::start_role("route", &cfg("route"), &[]);
    let ingest = Server::start_role("ingest", &cfg("ingest"), &[]);
    assert_eq!(director.addr, "off", "only ingest serves the Tracking API");

    let events: Vec<_> = (0..300).map(|i| track_event(&format!("r-{i}"), i)).collect();
    for chunk in events.chunks(50) {
        sink.post_batch(&ingest.addr, chunk).unwrap();
    }
    sink.post_batch(&ingest.addr, &events[100..102]).unwrap(); // a client resend
    let all = || {
        format!(
            "300 deliveries, got {}\ningest:\n{}\ndedup:\n{}\nroute:\n{}\ndirector:\n{}",
            sink.by_message_id("/hook").len(),
            ingest.stderr_tail(10),
            dedup.stderr_tail(10),
            route.stderr_tail(10),
            director.stderr_tail(10)
        )
    };
    wait_for(Duration::from_secs(120), || (sink.by_message_id("/hook").len() >= 300).then_some(()), all);
    std::thread::sleep(Duration::from_secs(2));
    let got = sink.by_message_id("/hook");
    assert_eq!(got.len(), 300);
    assert!(got.values().all(|v| v.len() == 1), "each event delivered once");
    for s in [ingest, route, dedup, director] {
        s.stop();
    }
}

#[test]
fn separate_roles_on_mariadb() {
    separate_roles_deliver_every_event_once("mysql");
}

#[test]
fn separate_roles_on_postgres() {
    separate_roles_deliver_every_event_once("postgres");
}

#[test]
fn a_role_refuses_the_embedded_log() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let out = sluice_cmd(&["ingest", "--config", config.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("log.backend = \"kafka\""), "{err}");
}
