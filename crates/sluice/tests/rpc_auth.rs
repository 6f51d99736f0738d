//! The route → director RPC through real processes: `sluice route` and
//! `sluice director` refuse to start without `director.rpc_secret`; a
//! director refuses unsigned, wrongly signed, oversize and unknown-destination
//! requests; a route whose requests are refused retries its batch (nothing
//! committed, nothing lost) until it can hand the jobs over.
//! (`crates/deliver/tests/cluster_rpc.rs` checks the director's side in process.)

mod util;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use sluice_deliver::cluster::{InsertRequest, RpcSecret, WireJob, INSERT_PATH, SIGNATURE_HEADER};
use util::*;

/// A config with the Kafka log and a SQL database that are never reached:
/// the secret is checked before either is.
fn unreachable_kafka_config(dir: &Path) -> std::path::PathBuf {
    let config = write_config(
        dir,
        "[deliver]\njobdb_url = \"postgres://sluice:sluice@127.0.0.1:1/none\"\n[log.kafka.primary]\nbootstrap_servers = \"127.0.0.1:1\"\n",
    );
    let text = std::fs::read_to_string(&config).unwrap().replace("[log]\n", "[log]\nbackend = \"kafka\"\n");
    std::fs::write(&config, text).unwrap();
    config
}

fn run_role(role: &str, config: &Path, env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.args([role, "--config"]).arg(config).env_remove("SLUICE_DIRECTOR__RPC_SECRET").stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run sluice")
}

#[test]
fn route_and_director_refuse_to_start_without_the_rpc_secret() {
    let dir = tempfile::tempdir().unwrap();
    let config = unreachable_kafka_config(dir.path());
    for role in ["route", "director"] {
        let out = run_role(role, &config, &[]);
        assert!(!out.status.success(), "`sluice {role}` without director.rpc_secret must not start");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("director.rpc_secret") && err.contains("SLUICE_DIRECTOR__RPC_SECRET"), "{role}: {err}");
        // Too short a secret is a config error naming the key.
        let out = run_role(role, &config, &[("SLUICE_DIRECTOR__RPC_SECRET", "short")]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("director.rpc_secret") && err.contains("at least 32"), "{role}: {err}");
    }
}

fn wire_job(message_id: &str, destination: &str, endpoint: &str) -> WireJob {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    WireJob {
        message_id: message_id.into(),
        source: SOURCE_ID.into(),
        destination: destination.into(),
        generation: 0,
        endpoint: endpoint.into(),
        payload: serde_json::json!({"messageId": message_id, "type": "track", "event": "Forged?"}).to_string(),
        created_at: now,
        expires_at: now + 3_600_000,
        received_at: now,
    }
}

/// The RPC address a director process logged when it registered.
fn rpc_address(director: &Server) -> String {
    director
        .json_log()
        .iter()
        .find(|l| l["fields"]["message"].as_str().is_some_and(|m| m.starts_with("director registered")))
        .and_then(|l| l["fields"]["rpc"].as_str().map(str::to_owned))
        .expect("the director logs its RPC address")
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// POST `body` to the director with `signature` (if any): status and JSON answer.
fn post(sink: &TestSink, rpc: &str, body: &[u8], signature: Option<String>) -> (u16, Value) {
    sink.block_on(async {
        let mut req = sink.http.post(format!("{rpc}{INSERT_PATH}")).header("content-type", "application/json").body(body.to_vec());
        if let Some(s) = signature {
            req = req.header(SIGNATURE_HEADER, s);
        }
        let resp = req.send().await.expect("director answers");
        let status = resp.status().as_u16();
        (status, serde_json::from_str(&resp.text().await.unwrap()).unwrap_or(Value::Null))
    })
}

/// Send only the headers of a request declaring a 100 MiB body, and read
/// the answer: a director that waits for the body never answers (the read
/// fails after a minute).
fn post_headers_only(rpc: &str, signature: &str) -> String {
    let addr = rpc.trim_start_matches("http://");
    let head = format!(
        "POST {INSERT_PATH} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n{SIGNATURE_HEADER}: {signature}\r\nContent-Length: {}\r\n\r\n",
        100u64 << 20
    );
    raw_status_line(addr, &head, Duration::from_secs(60)).unwrap_or_else(|e| panic!("no answer before the body was sent: {e}"))
}

#[test]
fn director_refuses_forged_requests_and_route_retries_refused_batches() {
    let Some(db) = fresh_database("postgres", "rpcauth") else { return };
    let root = tempfile::tempdir().unwrap();
    let Some(broker) = Broker::start(&root.path().join("kafka"), "sluice-test-rpcauth") else { return };
    let sink = TestSink::start();
    let hook = sink.sink.url("/hook");
    let cfg = |name: &str| role_config(root.path(), name, &broker, &db, &hook, "d1", "");

    let director = Server::start_role("director", &cfg("director"), &[]);
    let rpc = rpc_address(&director);
    let secret = RpcSecret::new(RPC_SECRET);
    let body = |jobs: Vec<WireJob>| serde_json::to_vec(&InsertRequest { oldest_event_ms: 0, jobs }).unwrap();

    // Unsigned, and signed with another secret: 401, nothing inserted.
    let forged = body(vec![wire_job("f-1", "hook", &hook)]);
    let (status, v) = post(&sink, &rpc, &forged, None);
    assert_eq!((status, v["code"].as_str()), (401, Some("unauthorized")), "{v}");
    let other = RpcSecret::new("not-the-secret-0123456789abcdef0123456789");
    let (status, v) = post(&sink, &rpc, &forged, Some(other.sign(&forged, unix_now())));
    assert_eq!(status, 401, "{v}");

    // A declared body over the limit: 413 from the headers alone.
    let status_line = post_headers_only(&rpc, &secret.sign(b"", unix_now()));
    assert!(status_line.contains(" 413"), "{status_line}");

    // A destination the control database does not have: 409, no series.
    let ghost = body(vec![wire_job("g-1", "hook", &hook), wire_job("g-2", "ghost", "http://127.0.0.1:9/x")]);
    let (status, v) = post(&sink, &rpc, &ghost, Some(secret.sign(&ghost, unix_now())));
    assert_eq!((status, v["code"].as_str()), (409, Some("unknown_destination")), "{v}");
    assert_eq!(v["destinations"], serde_json::json!(["ghost"]));
    let metrics = sink.block_on(async { reqwest::get(format!("http://{}/metrics", director.admin)).await.unwrap().text().await.unwrap() });
    assert!(!metrics.contains("ghost"), "no metric series for an unknown destination:\n{metrics}");

    // The refused job, now properly signed, is new to the JobDBs and delivered once.
    let (status, v) = post(&sink, &rpc, &forged, Some(secret.sign(&forged, unix_now())));
    assert_eq!((status, v["inserted"].as_u64()), (200, Some(1)), "{v}");
    wait_for(Duration::from_secs(30), || sink.by_message_id("/hook").contains_key("f-1").then_some(()), || director.stderr_tail(20));

    // A route with the wrong secret: every hand-over is refused, the batch
    // is retried, its offset stays uncommitted.
    let dedup = Server::start_role("dedup", &cfg("dedup"), &[]);
    let ingest = Server::start_role("ingest", &cfg("ingest"), &[]);
    let wrong = [("SLUICE_DIRECTOR__RPC_SECRET", "a-wrong-secret-0123456789abcdef0123456789")];
    let route = Server::start_role("route", &cfg("route"), &wrong);
    let events: Vec<_> = (0..40).map(|i| track_event(&format!("r-{i}"), i)).collect();
    sink.post_batch(&ingest.addr, &events).unwrap();
    wait_for(
        Duration::from_secs(120),
        || route.stderr_text().contains("wrong signature").then_some(()),
        || format!("route:\n{}\ndedup:\n{}", route.stderr_tail(20), dedup.stderr_tail(20)),
    );
    assert!(!sink.by_message_id("/hook").keys().any(|k| k.starts_with("r-")), "nothing handed over with the wrong secret");
    route.stop();

    // The same route with the right secret hands every event over, once.
    let route = Server::start_role("route", &cfg("route"), &[]);
    let delivered = || sink.by_message_id("/hook").into_iter().filter(|(k, _)| k.starts_with("r-")).collect::<Vec<_>>();
    wait_for(
        Duration::from_secs(120),
        || (delivered().len() >= 40).then_some(()),
        || format!("{} of 40 delivered\nroute:\n{}\ndirector:\n{}", delivered().len(), route.stderr_tail(20), director.stderr_tail(20)),
    );
    std::thread::sleep(Duration::from_secs(2));
    let got = delivered();
    assert_eq!(got.len(), 40);
    assert!(got.iter().all(|(_, v)| v.len() == 1), "each event delivered once");
    for s in [route, ingest, dedup, director] {
        s.stop();
    }
}

/// A director whose JobDB locks another director took (it adopted them
/// while this one could not reach the database: a restart of the database
/// ends the lock sessions, and the heartbeats go stale) closes its JobDBs,
/// waits for them to be handed back, opens them again and serves; it used
/// to answer `503 the JobDB is closed` until restarted (found by the chaos
/// soak). Here the test plays the adopter: it ends the director's lock
/// session and takes the lock itself, then hands it back.
#[test]
fn a_director_whose_jobdbs_were_taken_opens_them_again_once_handed_back() {
    let Some(db) = fresh_database("postgres", "rpcreopen") else { return };
    let root = tempfile::tempdir().unwrap();
    let Some(broker) = Broker::start(&root.path().join("kafka"), "sluice-test-rpcreopen") else { return };
    let sink = TestSink::start();
    let hook = sink.sink.url("/hook");
    let director = Server::start_role("director", &role_config(root.path(), "director", &broker, &db, &hook, "d1", ""), &[]);
    let rpc = rpc_address(&director);
    let secret = RpcSecret::new(RPC_SECRET);
    let send = |id: &str| {
        let body = serde_json::to_vec(&InsertRequest { oldest_event_ms: 0, jobs: vec![wire_job(id, "hook", &hook)] }).unwrap();
        post(&sink, &rpc, &body, Some(secret.sign(&body, unix_now())))
    };
    assert_eq!(send("before").0, 200);
    wait_for(Duration::from_secs(30), || sink.by_message_id("/hook").contains_key("before").then_some(()), || director.stderr_tail(20));

    // The "adopter" ends the director's lock session and takes the lock before the director takes it again.
    let sluice_deliver::backend::JobDbs::Sql(jobdbs) =
        sluice_deliver::backend::JobDbs::scoped(root.path(), Some(&sluice_core::config::JobDbUrl::parse(&db).unwrap()), "d1").unwrap()
    else {
        panic!("SQL JobDBs")
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let taken = rt.block_on(async {
        use sqlx::Connection;
        for _ in 0..20 {
            let holder = jobdbs.jobdb_lock_holder(1).await.unwrap().expect("the director holds its lock");
            let mut c = sqlx::PgConnection::connect(&db).await.unwrap();
            sqlx::query("SELECT pg_terminate_backend($1::int)").bind(holder).execute(&mut c).await.unwrap();
            for _ in 0..100 {
                match jobdbs.lock_jobdb(1).await {
                    Ok(lock) => return lock,
                    Err(sluice_deliver::DeliverError::SqlLocked { .. }) => tokio::time::sleep(Duration::from_millis(10)).await,
                    Err(e) => panic!("{e}"),
                }
            }
        }
        panic!("the director took its lock back every time");
    });
    wait_for(
        Duration::from_secs(30),
        || director.stderr_text().contains("another director took this director's JobDB locks").then_some(()),
        || director.stderr_tail(20),
    );
    // Handed back: the director opens its JobDBs again and serves.
    rt.block_on(taken.release());
    wait_for(Duration::from_secs(60), || director.stderr_text().contains("JobDBs are open again").then_some(()), || director.stderr_tail(20));
    let (status, v) = send("after");
    assert_eq!(status, 200, "{v}");
    wait_for(Duration::from_secs(30), || sink.by_message_id("/hook").contains_key("after").then_some(()), || director.stderr_tail(20));
    assert_eq!(sink.by_message_id("/hook")["before"].len(), 1, "the job finished before is not sent again");
    director.stop();
}
