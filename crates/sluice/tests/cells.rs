//! Cells (issue 14): `sluice router` in front of two real `sluice serve`
//! cells, with the global store in an SQLite file. One test in phases (the
//! processes are started once).

mod util;

use std::io::Write;
use std::time::{Duration, Instant};

use sluice_cells::{Cell, CellState, GlobalStore, Tier, Workspace};
use util::*;

const SECOND_KEY: &str = "wk_test_second";

fn cell(id: &str, server: &Server) -> Cell {
    Cell {
        id: id.into(),
        tier: Tier::Smb,
        ingest_url: format!("http://{}", server.addr),
        admin_url: String::new(),
        state: CellState::Active,
        attributes: Default::default(),
    }
}

fn workspace(id: &str) -> Workspace {
    Workspace { id: id.into(), name: String::new(), tier: Tier::Smb, constraints: Default::default(), disabled: false }
}

/// `(status, x-sluice-cell, retry-after, body)` of a POST.
fn post(client: &reqwest::blocking::Client, url: &str, key: Option<&str>, headers: &[(&str, &str)], body: Vec<u8>) -> (u16, String, String, String) {
    let mut req = client.post(url).header("content-type", "application/json").body(body);
    if let Some(k) = key {
        req = req.basic_auth(k, Some(""));
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().expect("request");
    let header = |name: &str| resp.headers().get(name).map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    let (cell, retry) = (header("x-sluice-cell"), header("retry-after"));
    let status = resp.status().as_u16();
    (status, cell, retry, resp.text().unwrap())
}

fn track(message_id: &str) -> Vec<u8> {
    format!(r#"{{"type":"track","event":"Routed","userId":"u1","messageId":"{message_id}"}}"#).into_bytes()
}

fn stored_ids(server: &Server) -> Vec<String> {
    let data = server.config.parent().unwrap().join("data");
    read_input(&data).into_iter().map(|s| s.event["messageId"].as_str().unwrap_or_default().to_owned()).collect()
}

/// Wait (up to `secs`) until `f` holds.
fn eventually(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "not within {secs} s: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_router_sends_each_workspace_to_its_one_cell() {
    let second_source = format!("[[sources]]\nid = \"second\"\nwrite_key = \"{SECOND_KEY}\"\n");
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // The cells trust the router's address with their per-client limits (it carries every client).
    // A cell behind a router knows its id (it confirms it on its answers; the router relays nothing else).
    let cell_config = |dir: &std::path::Path, id: &str| {
        let path = write_config(dir, &format!("{second_source}[cell]\nid = \"{id}\"\n"));
        let text = std::fs::read_to_string(&path).unwrap().replacen("[server]\n", "[server]\ntrusted_proxies = [\"127.0.0.1\"]\n", 1);
        std::fs::write(&path, text).unwrap();
        path
    };
    let cell_a = Server::start(&cell_config(dir_a.path(), "cell-a"));
    let mut cell_b = Some(Server::start(&cell_config(dir_b.path(), "cell-b")));

    let store_dir = tempfile::tempdir().unwrap();
    let store_path = store_dir.path().join("global.sqlite").display().to_string();
    let store = GlobalStore::open(&store_path).unwrap();
    store.put_cell(&cell("cell-a", &cell_a)).unwrap();
    store.put_cell(&cell("cell-b", cell_b.as_ref().unwrap())).unwrap();
    for (ws, key, source) in [("w1", WRITE_KEY, SOURCE_ID), ("w2", SECOND_KEY, "second")] {
        store.put_workspace(&workspace(ws)).unwrap();
        assert!(store.add_write_key(key, ws, source).unwrap());
    }
    store.put_workspace(&Workspace { disabled: true, ..workspace("off") }).unwrap();
    store.add_write_key("wk_disabled", "off", "off-web").unwrap();

    let router_config = write_config(store_dir.path(), "");
    let router = Server::start_role(
        "router",
        &router_config,
        &[("SLUICE_GLOBAL_STORE", &store_path), ("SLUICE_ROUTER__LISTEN", "127.0.0.1:0"), ("SLUICE_ROUTER__ADMIN_LISTEN", "127.0.0.1:0")],
    );
    let client = reqwest::blocking::Client::new();
    let url = |path: &str| router.url(path);

    // 1. Basic auth: w1 is placed on the least-loaded cell (both empty: cell-a by id) and stays there.
    let (status, at, _, body) = post(&client, &url("/v1/track"), Some(WRITE_KEY), &[], track("m-1"));
    assert_eq!((status, at.as_str(), body.as_str()), (200, "cell-a", r#"{"success":true}"#));
    // w2 goes to the other, now less loaded, cell.
    let (status, at, _, _) = post(&client, &url("/v1/t"), Some(SECOND_KEY), &[], track("m-2"));
    assert_eq!((status, at.as_str()), (200, "cell-b"));
    assert!(stored_ids(&cell_a).contains(&"m-1".to_owned()));
    assert!(!stored_ids(cell_b.as_ref().unwrap()).contains(&"m-1".to_owned()), "nowhere else");

    // 2. The key in the body (analytics.js), gzip: forwarded untouched, answered by the cell.
    let batch = format!(r#"{{"writeKey":"{WRITE_KEY}","batch":[{{"type":"track","event":"E","userId":"u","messageId":"m-3"}}]}}"#);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(batch.as_bytes()).unwrap();
    let (status, at, _, _) = post(&client, &url("/v1/batch"), None, &[("content-encoding", "gzip")], gz.finish().unwrap());
    assert_eq!((status, at.as_str()), (200, "cell-a"));
    eventually(10, "m-3 stored in cell-a", || stored_ids(&cell_a).contains(&"m-3".to_owned()));

    // 3. Bad keys get ingest's own answers, word for word.
    for (key, body) in [(Some("wk_nobody"), track("m-x")), (None, track("m-y")), (None, br#"{"writeKey":7}"#.to_vec())] {
        let routed = post(&client, &url("/v1/track"), key, &[], body.clone());
        let direct = post(&client, &cell_a.url("/v1/track"), key, &[], body);
        assert_eq!((routed.0, &routed.3), (direct.0, &direct.3), "{key:?}");
        assert_eq!(routed.0, 401);
    }
    // Bodies ingest cannot read, and an empty key, get ingest's answers too; so does analytics.js's telemetry.
    for (path, body) in [
        ("/v1/track", b"{not json".to_vec()),
        ("/v1/batch", b"{\"batch\":[],\"writeKey\":\"\xff\"}".to_vec()),
        ("/v1/track", br#"{"writeKey":""}"#.to_vec()),
        ("/v1/m", br#"{"series":[]}"#.to_vec()),
    ] {
        let routed = post(&client, &url(path), None, &[], body.clone());
        let direct = post(&client, &cell_a.url(path), None, &[], body);
        assert_eq!((routed.0, &routed.3), (direct.0, &direct.3), "{path}");
    }
    let (status, _, _, body) = post(&client, &url("/v1/track"), Some("wk_disabled"), &[], track("m-z"));
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("workspace_disabled"), "{body}");
    let (status, _, _, body) = post(&client, &url("/v1/nonsense"), Some(WRITE_KEY), &[], track("m-n"));
    assert_eq!(status, 404, "{body}");

    // 4. One client's refused requests through the router do not spend the
    // cell's per-client budget for everyone (red team): the router is a trusted proxy.
    let from = |ip: &str| reqwest::blocking::Client::builder().local_address(ip.parse::<std::net::IpAddr>().unwrap()).build().unwrap();
    // Five clients, each within the router's own budget for it, 400 refusals
    // in all: a 429 among them would be the cell charging the router's address.
    let noisy: Vec<_> = (10..15)
        .map(|i| {
            let (client, url) = (from(&format!("127.0.0.{i}")), url("/v1/track"));
            std::thread::spawn(move || {
                for _ in 0..80 {
                    let (status, ..) = post(&client, &url, Some(WRITE_KEY), &[], br#"{"type":"track","event":"no user"}"#.to_vec());
                    assert_eq!(status, 400);
                }
            })
        })
        .collect();
    noisy.into_iter().for_each(|t| t.join().unwrap());
    let (status, at, _, body) = post(&from("127.0.0.3"), &url("/v1/track"), Some(SECOND_KEY), &[], track("m-quiet"));
    assert_eq!((status, at.as_str()), (200, "cell-b"), "{body}");
    let (status, at, _, body) = post(&from("127.0.0.3"), &url("/v1/track"), Some(WRITE_KEY), &[], track("m-quiet-a"));
    assert_eq!((status, at.as_str()), (200, "cell-a"), "{body}");

    // 5. A mapping change (an override) reaches the router through the version poll.
    store.set_override("w1", "cell-b", "test").unwrap();
    store.set_override("w2", "cell-a", "test").unwrap();
    eventually(10, "w1 served by cell-b", || post(&client, &url("/v1/track"), Some(WRITE_KEY), &[], track("m-4")).1 == "cell-b");
    assert!(stored_ids(cell_b.as_ref().unwrap()).contains(&"m-4".to_owned()));
    eventually(10, "w2 served by cell-a", || post(&client, &url("/v1/track"), Some(SECOND_KEY), &[], track("m-4b")).1 == "cell-a");

    // 6. A cell that is down: its workspaces get 503 + Retry-After; the others see no error.
    cell_b.take().unwrap().stop();
    let (status, _, retry, body) = post(&client, &url("/v1/track"), Some(WRITE_KEY), &[], track("m-5"));
    assert_eq!(status, 503, "{body}");
    assert!(!retry.is_empty() && body.contains("cell cell-b is unavailable"), "{retry} {body}");
    let (status, at, _, _) = post(&client, &url("/v1/track"), Some(SECOND_KEY), &[], track("m-6"));
    assert_eq!((status, at.as_str()), (200, "cell-a"));
}

/// `sluice bench router` runs end to end (a real cell and router, briefly):
/// the benchmark of docs/BENCHMARKS.md stays runnable. No speed is asserted.
#[test]
fn the_router_benchmark_runs() {
    let out = sluice_cmd(&["bench", "router", "--rounds", "1", "--seconds", "1", "--warmup", "1", "--probes", "3", "--connections", "4"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let result = stdout.lines().find(|l| l.starts_with("RESULT bench=router")).unwrap_or_else(|| panic!("no RESULT line:\n{stdout}"));
    assert!(result.contains(" ratio=") && result.contains(" hit_p99_us="), "{result}");
}
