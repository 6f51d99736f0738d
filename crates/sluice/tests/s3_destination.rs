//! `type = "s3"` against the real binary and moto's S3 server: every event
//! lands in a gzip-compressed newline-delimited JSON object under
//! `<prefix>/source=<id>/dt=<date>/hour=<HH>/<first job id>.ndjson.gz`
//! (the hour of its `receivedAt`), through a stretch where the server does
//! not answer (moto stopped with SIGSTOP under traffic, then continued):
//! the writes are retried, nothing is lost, and an event is in two objects
//! only when a write was retried in another group (at least once). A
//! crash between the PUT and the `succeeded` rows writes those jobs again.
//! A URL that is not `s3://bucket/prefix` is refused at load. A
//! destination's own credentials sign its writes; without them the
//! process's `AWS_*` do. With `s3_format = "parquet"` the objects are
//! Parquet files, read back with an independent reader (pyarrow, PyPI).

mod util;

#[path = "../../deliver/tests/moto/mod.rs"]
mod moto;

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt;
use object_store::ObjectStore;
use serde_json::Value;
use util::*;

const BUCKET: &str = "sluice-lake";
const AWS_ENV: [(&str, &str); 2] = [("AWS_ACCESS_KEY_ID", "sluice-test"), ("AWS_SECRET_ACCESS_KEY", "sluice-test-secret")];

fn s3_dest(id: &str, endpoint: &str, extra: &str) -> String {
    format!(
        "[[destinations]]\nid = \"{id}\"\ntype = \"s3\"\nurl = \"s3://{BUCKET}/events\"\ns3_endpoint = \"{endpoint}\"\ns3_region = \"us-east-1\"\n\
         allow_private_network = true\nrequest_timeout = \"2s\"\ninitial_backoff = \"200ms\"\nmax_backoff = \"1s\"\nbatch_max_age = \"200ms\"\n{extra}\n"
    )
}

/// Every object under `events/`: its path and its lines as JSON.
fn read_lake(sink: &TestSink, m: &moto::Moto) -> Vec<(String, Vec<Value>)> {
    let store = m.store(BUCKET);
    sink.block_on(async {
        let listed: Vec<_> = store.list(Some(&"events".into())).collect().await;
        let mut out = Vec::new();
        for meta in listed {
            let meta = meta.unwrap();
            let gz = store.get(&meta.location).await.unwrap().bytes().await.unwrap();
            let mut text = String::new();
            std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&gz[..]), &mut text).expect("a gzip object");
            assert!(text.ends_with('\n'), "{}: lines end with a newline", meta.location);
            let lines = text.lines().map(|l| serde_json::from_str(l).expect("a line of JSON")).collect();
            out.push((meta.location.to_string(), lines));
        }
        out
    })
}

/// messageId → how many times it is in the lake, checking each object's path against its lines.
fn ids_in(lake: &[(String, Vec<Value>)]) -> HashMap<String, usize> {
    let mut times: HashMap<String, usize> = HashMap::new();
    for (path, lines) in lake {
        let parts: Vec<&str> = path.split('/').collect();
        assert_eq!(parts.len(), 5, "events/source=…/dt=…/hour=…/<id>.ndjson.gz: {path}");
        assert_eq!(parts[1], format!("source={SOURCE_ID}"), "{path}");
        assert!(parts[4].ends_with(".ndjson.gz") && parts[4].len() == 27 + 10, "named by a job id: {path}");
        for line in lines {
            let received = line["receivedAt"].as_str().expect("receivedAt");
            assert_eq!(format!("dt={}", &received[..10]), parts[2], "{path}: {received}");
            assert_eq!(format!("hour={}", &received[11..13]), parts[3], "{path}: {received}");
            *times.entry(line["messageId"].as_str().unwrap().to_owned()).or_default() += 1;
        }
    }
    times
}

#[test]
fn s3_destinations_write_each_event_through_a_server_that_stops_answering() {
    let Some(bin) = moto::moto_server() else { return };
    let dir = tempfile::tempdir().unwrap();
    let sink = TestSink::start();
    let mut m = sink.block_on(moto::Moto::start(&bin, dir.path()));
    sink.block_on(m.create_bucket(BUCKET));
    let extra = format!(
        "{}{}[[connections]]\nsource = \"{SOURCE_ID}\"\ndestinations = [\"lake\", \"guarded\"]\n",
        // Its own credentials (the server has none in its environment).
        s3_dest("lake", &m.endpoint(), "batch_max_events = 40\ns3_access_key_id = \"lake-writer\"\ns3_secret_access_key = \"lake-secret\""),
        // 127.0.0.1 without allow_private_network: the guard refuses it.
        s3_dest("guarded", &m.endpoint(), "").replace("allow_private_network = true\n", "")
    );
    let config = write_config(dir.path(), &extra);
    let server = Server::start(&config);
    let events: Vec<Value> = (0..300).map(|i| track_event(&format!("s-{i}"), i)).collect();
    let post = |range: std::ops::Range<usize>| {
        for chunk in events[range].chunks(25) {
            sink.post_batch(&server.addr, chunk).unwrap();
        }
    };
    post(0..100);
    wait_for(Duration::from_secs(60), || (ids_in(&read_lake(&sink, &m)).len() >= 100).then_some(()), || "the first 100 events in the lake".into());
    // The server stops answering under traffic (its PUTs time out), then answers again.
    let pid = m.child.as_ref().unwrap().id().to_string();
    std::process::Command::new("kill").args(["-STOP", &pid]).status().unwrap();
    post(100..200);
    std::thread::sleep(Duration::from_secs(5));
    std::process::Command::new("kill").args(["-CONT", &pid]).status().unwrap();
    post(200..300);

    let counts = wait_counts(&config, "lake", Duration::from_secs(90), |c| c.get("succeeded").copied() == Some(300));
    assert_eq!(counts.get("discarded"), None, "{counts:?}");
    let times = ids_in(&read_lake(&sink, &m));
    assert_eq!(times.len(), 300, "every event in the lake");
    // At least once: a repeat only of an event whose write was retried (sent while the server
    // stood still: a PUT that timed out may still have landed, and its retry in another group
    // is another object). Those written before the stop are there once.
    for (id, n) in &times {
        let i: usize = id.trim_start_matches("s-").parse().unwrap();
        assert!(*n == 1 || i >= 100, "{id} is there {n} times though written before the server stopped");
    }

    // The refused destination: discarded, the reason recorded.
    wait_counts(&config, "guarded", Duration::from_secs(30), |c| c.get("discarded").copied() == Some(300));
    let inspected = jobs_inspect_json(&config, "s-0").unwrap().to_string();
    assert!(inspected.contains("SSRF guard"), "{inspected}");
    server.stop();
    m.stop();

    // An s3 URL is checked at load, naming the key.
    let (ok, stderr) = config_check(dir.path(), "[[destinations]]\nid = \"l\"\ntype = \"s3\"\nurl = \"s3://UPPER/x\"\n");
    assert!(!ok && stderr.contains("destinations[0].url") && stderr.contains("bucket"), "{stderr}");
}

/// Commit point 4 for `s3`: a crash between the PUT and the `succeeded`
/// rows writes those jobs again after the restart; every acknowledged
/// event is in the lake, and only events whose job was `executing` at the
/// crash may be there twice.
#[test]
fn a_crash_after_the_put_loses_nothing_and_repeats_only_executing_jobs() {
    let Some(bin) = moto::moto_server() else { return };
    let dir = tempfile::tempdir().unwrap();
    let sink = TestSink::start();
    let m = sink.block_on(moto::Moto::start(&bin, dir.path()));
    sink.block_on(m.create_bucket(BUCKET));
    let data = dir.path().join("data");
    let extra = format!(
        "{}[[connections]]\nsource = \"{SOURCE_ID}\"\ndestinations = [\"lake\"]\n",
        s3_dest("lake", &m.endpoint(), "batch_max_events = 10\nmax_in_flight = 2")
    );
    let config = write_config(dir.path(), &extra);
    let executing = crash_after_delivery(&sink, &config, &AWS_ENV);
    let before = ids_in(&read_lake(&sink, &m));
    assert!(!before.is_empty() && before.len() < 200, "the crash came mid-delivery ({} written)", before.len());

    let acked = read_input(&data).len();
    let server = Server::start_with_env(&config, &AWS_ENV);
    let times = wait_for(
        Duration::from_secs(90),
        || {
            let t = ids_in(&read_lake(&sink, &m));
            (t.len() >= acked).then_some(t)
        },
        || format!("{} of {acked} events in the lake", ids_in(&read_lake(&sink, &m)).len()),
    );
    assert_eq!(times.len(), acked, "every acknowledged event");
    for (id, n) in &times {
        assert!(*n == 1 || executing.contains(id), "{id} is there {n} times but was not executing at the crash");
    }
    server.stop();
}

/// `s3_format = "parquet"`: `.parquet` objects in the same layout, read
/// back with pyarrow (not the crate that wrote them): the typed columns
/// and the whole event, every event there.
#[test]
fn parquet_objects_read_back_with_pyarrow() {
    let Some(bin) = moto::moto_server() else { return };
    let python = bin.with_file_name("python");
    let dir = tempfile::tempdir().unwrap();
    let sink = TestSink::start();
    let mut m = sink.block_on(moto::Moto::start(&bin, dir.path()));
    sink.block_on(m.create_bucket(BUCKET));
    let extra = format!(
        "{}[[connections]]\nsource = \"{SOURCE_ID}\"\ndestinations = [\"lake\"]\n",
        s3_dest("lake", &m.endpoint(), "batch_max_events = 50\ns3_format = \"parquet\"")
    );
    let config = write_config(dir.path(), &extra);
    let server = Server::start_with_env(&config, &AWS_ENV);
    let mut events: Vec<Value> = (0..120).map(|i| track_event(&format!("p-{i}"), i)).collect();
    events.push(serde_json::json!({"type": "identify", "messageId": "p-identify", "userId": 7, "traits": {"plan": "pro", "n": 1.5}}));
    events.push(
        serde_json::json!({"type": "page", "messageId": "p-page", "anonymousId": "anon", "name": "Home", "timestamp": "2026-11-30T23:59:59.5+02:00"}),
    );
    for chunk in events.chunks(40) {
        sink.post_batch(&server.addr, chunk).unwrap();
    }
    wait_counts(&config, "lake", Duration::from_secs(90), |c| c.get("succeeded").copied() == Some(events.len() as u64));
    server.stop();

    // Every object: a .parquet file in the layout, downloaded for the reader.
    let store = m.store(BUCKET);
    let files: Vec<std::path::PathBuf> = sink.block_on(async {
        let listed: Vec<_> = store.list(Some(&"events".into())).collect().await;
        let mut files = Vec::new();
        for (n, meta) in listed.into_iter().enumerate() {
            let meta = meta.unwrap();
            let path = meta.location.to_string();
            let parts: Vec<&str> = path.split('/').collect();
            assert_eq!(parts.len(), 5, "{path}");
            assert_eq!(parts[1], format!("source={SOURCE_ID}"), "{path}");
            assert!(parts[2].starts_with("dt=") && parts[3].starts_with("hour="), "{path}");
            assert!(parts[4].ends_with(".parquet") && parts[4].len() == 27 + 8, "named by a job id: {path}");
            let bytes = store.get(&meta.location).await.unwrap().bytes().await.unwrap();
            let file = dir.path().join(format!("{n}.parquet"));
            std::fs::write(&file, &bytes).unwrap();
            files.push(file);
        }
        files
    });
    assert!(!files.is_empty());
    const READER: &str = r#"
import json, sys
import pyarrow.parquet as pq
rows = []
for f in sys.argv[1:]:
    t = pq.read_table(f)
    types = {field.name: str(field.type) for field in t.schema}
    for r in t.to_pylist():
        r = {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in r.items()}
        r["_types"] = types
        rows.append(r)
print(json.dumps(rows))
"#;
    let out = std::process::Command::new(&python).arg("-c").arg(READER).args(&files).output().expect("the venv's python");
    assert!(out.status.success(), "pyarrow could not read the objects (run scripts/setup-s3.sh): {}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let mut by_id: HashMap<String, Value> = HashMap::new();
    for row in rows {
        assert_eq!(row["_types"]["received_at"], "timestamp[us, tz=UTC]", "{row}");
        assert_eq!(row["_types"]["message_id"], "string", "{row}");
        let event: Value = serde_json::from_str(row["json"].as_str().expect("json is text")).expect("json holds the event");
        assert_eq!(row["message_id"], event["messageId"], "{row}");
        assert_eq!(row["type"], event["type"], "{row}");
        // receivedAt as the reader sees it: the same instant as the event's text.
        let seen = chrono::DateTime::parse_from_rfc3339(row["received_at"].as_str().expect("received_at set")).unwrap();
        let sent = chrono::DateTime::parse_from_rfc3339(event["receivedAt"].as_str().unwrap()).unwrap();
        assert_eq!(seen.timestamp_micros(), sent.timestamp_micros(), "{row}");
        by_id.insert(row["message_id"].as_str().unwrap().to_owned(), row);
    }
    // At least once: every event there (a write retried after a timeout may add a repeat).
    for e in &events {
        let id = e["messageId"].as_str().unwrap();
        let row = by_id.get(id).unwrap_or_else(|| panic!("{id} is not in the lake"));
        let held: Value = serde_json::from_str(row["json"].as_str().unwrap()).unwrap();
        for key in ["properties", "traits", "event", "name"] {
            assert_eq!(held.get(key), e.get(key), "{id}: {key}");
        }
    }
    assert_eq!(by_id["p-0"]["event"], "Deliver Test");
    assert_eq!(by_id["p-0"]["user_id"], "user-0");
    assert_eq!(by_id["p-identify"]["user_id"], "7", "a numeric userId as its text");
    assert_eq!(by_id["p-page"]["name"], "Home");
    assert_eq!(by_id["p-page"]["anonymous_id"], "anon");
    // A time with an offset: the same instant, in UTC.
    let page = &by_id["p-page"];
    let held: Value = serde_json::from_str(page["json"].as_str().unwrap()).unwrap();
    let (column, text) = (page["timestamp"].as_str().expect("timestamp set"), held["timestamp"].as_str().unwrap());
    assert_eq!(
        chrono::DateTime::parse_from_rfc3339(column).unwrap().timestamp_micros(),
        chrono::DateTime::parse_from_rfc3339(text).unwrap().timestamp_micros(),
        "{column} vs {text}"
    );
    assert!(column.ends_with("+00:00"), "{column}");
    m.stop();
}
