//! The control plane (issue 14): `sluice control`, two real `sluice serve`
//! cells that take their workspaces from it, a `sluice router`, and a sink.
//! One test in phases (the processes start once): workspaces made through
//! the API reach their cell live (the first request of a new workspace
//! included), events land in their workspace's cell and are delivered once,
//! usage is metered exactly, capacity thresholds provision a third cell
//! with the bundled local provisioner, and bad input gets clear answers.

mod util;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use util::*;

const TOKEN: &str = "control-token-0123456789";

struct Api {
    base: String,
    http: reqwest::blocking::Client,
}

impl Api {
    /// `(status, body)` of an operator call.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self.http.request(method.parse().unwrap(), format!("{}{path}", self.base)).bearer_auth(TOKEN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().expect("control plane answers");
        let status = resp.status().as_u16();
        (status, resp.json().unwrap_or(Value::Null))
    }

    fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, v) = self.call(method, path, body);
        assert!((200..300).contains(&status), "{method} {path}: {status} {v}");
        v
    }
}

fn cell_config(dir: &Path, id: &str, control: &str, token: &str) -> std::path::PathBuf {
    let path = dir.join("sluice.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\ntrusted_proxies = [\"127.0.0.1\"]\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n[log]\npartitions = 2\n\
             [deliver]\ninitial_backoff = \"100ms\"\n\
             [cell]\nid = \"{id}\"\ncontrol_url = \"{control}\"\ntoken = \"{token}\"\npoll_interval = \"300ms\"\nreport_interval = \"500ms\"\n",
            dir.join("data").display()
        ),
    )
    .unwrap();
    path
}

/// Register cell `id` (a placeholder URL until it runs), start it with its token, then give the store its real URLs.
fn start_cell(api: &Api, dir: &Path, id: &str) -> Server {
    api.ok("PUT", &format!("/api/cells/{id}"), Some(json!({"tier": "smb", "ingest_url": "http://127.0.0.1:9", "state": "provisioning"})));
    let token = api.ok("POST", &format!("/api/cells/{id}/token"), None)["token"].as_str().unwrap().to_owned();
    let server = Server::start(&cell_config(dir, id, &api.base, &token));
    api.ok(
        "PUT",
        &format!("/api/cells/{id}"),
        Some(json!({"tier": "smb", "ingest_url": format!("http://{}", server.addr), "admin_url": format!("http://{}", server.admin)})),
    );
    server
}

/// A workspace with one source (its new key returned) and one destination at `hook`.
fn make_workspace(api: &Api, id: &str, hook: &str) -> String {
    api.ok("PUT", &format!("/api/workspaces/{id}"), Some(json!({"tier": "smb"})));
    let (status, made) = api.call("POST", &format!("/api/workspaces/{id}/sources"), Some(json!({"id": format!("{id}-web")})));
    assert_eq!(status, 201, "{made}");
    api.ok("PUT", &format!("/api/workspaces/{id}/destinations/{id}-hook"), Some(json!({"url": hook, "allow_private_network": true})));
    api.ok("PUT", &format!("/api/workspaces/{id}/connections/{id}-web/{id}-hook"), None);
    made["write_key"].as_str().unwrap().to_owned()
}

/// `(status, x-sluice-cell)` of a batch of `ids` through `url` with `key`.
fn send(http: &reqwest::blocking::Client, url: &str, key: &str, ids: &[String], headers: &[(&str, &str)]) -> (u16, String) {
    let events: Vec<Value> = ids.iter().enumerate().map(|(i, id)| track_event(id, i)).collect();
    let mut req = http.post(format!("{url}/v1/batch")).basic_auth(key, Some("")).json(&json!({ "batch": events }));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().expect("answer");
    let cell = resp.headers().get("x-sluice-cell").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    (resp.status().as_u16(), cell)
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

fn totals(api: &Api, workspace: &str) -> HashMap<String, i64> {
    let v = api.ok("GET", &format!("/api/usage?workspace={workspace}"), None);
    v["totals"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_i64().unwrap())).collect()
}

#[test]
fn the_control_plane_hands_workspaces_to_cells_meters_them_and_grows_the_fleet() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("global.sqlite").display().to_string();
    let provisioned = dir.path().join("provisioned");
    let control_config = dir.path().join("control.toml");
    std::fs::write(
        &control_config,
        format!(
            "[control]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\nscrape_interval = \"1s\"\nallow_private_network_destinations = true\n\
             provision_command = [{bin:?}, \"provision-local\", \"--dir\", {dir:?}]\nprovision_timeout = \"90s\"\n\
             [control.thresholds.smb]\nworkspaces = 3\ncpu = 1.0\nconsumer_lag = \"1h\"\ndb_connections = 1.0\ningest_p99 = \"1h\"\n",
            bin = env!("CARGO_BIN_EXE_sluice"),
            dir = provisioned.display().to_string(),
        ),
    )
    .unwrap();
    let control = Server::start_role("control", &control_config, &[("SLUICE_GLOBAL_STORE", &store)]);
    let api = Api { base: format!("http://{}", control.addr), http: reqwest::blocking::Client::new() };

    // Operators authenticate; a cell's calls need its own token.
    assert_eq!(api.http.get(format!("{}/api/cells", api.base)).send().unwrap().status(), 401);
    assert_eq!(api.http.get(format!("{}/api/cells/c1/config", api.base)).bearer_auth(TOKEN).send().unwrap().status(), 401);

    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let c1 = start_cell(&api, dir_a.path(), "c1");
    let mut c2 = Some(start_cell(&api, dir_b.path(), "c2"));

    let router_dir = tempfile::tempdir().unwrap();
    let router_config = router_dir.path().join("router.toml");
    std::fs::write(&router_config, "[router]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\npoll_interval = \"100ms\"\n").unwrap();
    let router = Server::start_role("router", &router_config, &[("SLUICE_GLOBAL_STORE", &store)]);
    let http = reqwest::blocking::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let sink = TestSink::start();

    // 1. Two workspaces made through the API. Their first requests through the router
    //    are accepted at once: the cell asks the control plane about a key it does not know yet.
    let acme_key = make_workspace(&api, "acme", &sink.sink.url("/acme"));
    let globex_key = make_workspace(&api, "globex", &sink.sink.url("/globex"));
    let router_url = format!("http://{}", router.addr);
    let (status, at) = send(&http, &router_url, &acme_key, &ids("acme", 20), &[]);
    assert_eq!((status, at.as_str()), (200, "c1"), "acme's very first request");
    let (status, at) = send(&http, &router_url, &globex_key, &ids("globex", 10), &[]);
    assert_eq!((status, at.as_str()), (200, "c2"), "the least loaded cell");

    // Each workspace's events are delivered once, to its own destination.
    let delivered = |path: &str, n: usize| {
        wait_for(Duration::from_secs(30), || (sink.by_message_id(path).len() >= n).then_some(()), || format!("{n} deliveries at {path}"));
    };
    delivered("/acme", 20);
    delivered("/globex", 10);
    assert!(sink.by_message_id("/acme").values().all(|v| v.len() == 1), "once each");
    assert!(sink.by_message_id("/acme").keys().all(|k| k.starts_with("acme-")), "nothing of another workspace");

    // 2. A key straight to a cell that does not serve its workspace: unknown there.
    let c2_url = format!("http://{}", c2.as_ref().unwrap().addr);
    assert_eq!(send(&http, &c2_url, &acme_key, &ids("stray", 1), &[]).0, 401);
    // A request a router meant for another cell is refused, not stored.
    let c1_url = format!("http://{}", c1.addr);
    assert_eq!(send(&http, &c1_url, &acme_key, &ids("misrouted", 1), &[("x-sluice-cell", "c2")]).0, 421);

    // 3. A change made in one place reaches the cell live: a second destination for acme.
    api.ok("PUT", "/api/workspaces/acme/destinations/acme-audit", Some(json!({"url": sink.sink.url("/audit"), "allow_private_network": true})));
    api.ok("PUT", "/api/workspaces/acme/connections/acme-web/acme-audit", None);
    let mut probe = 0;
    wait_for(
        Duration::from_secs(20),
        || {
            probe += 1;
            let _ = send(&http, &router_url, &acme_key, &ids(&format!("probe{probe}"), 1), &[]);
            (!sink.by_message_id("/audit").is_empty()).then_some(())
        },
        || "the new destination receiving".into(),
    );

    // 4. Metering: what the cells counted equals what the sink received, repeats counted apart.
    assert_eq!(send(&http, &router_url, &globex_key, &ids("globex", 1), &[]).0, 200, "a resend of globex-0");
    wait_for(
        Duration::from_secs(30),
        || {
            let t = totals(&api, "globex");
            (t.get("accepted") == Some(&11) && t.get("duplicates") == Some(&1) && t.get("delivered/globex-hook") == Some(&10)).then_some(())
        },
        || format!("globex's usage: {:?}", totals(&api, "globex")),
    );
    let acme_delivered = sink.by_message_id("/acme").len() as i64;
    wait_for(
        Duration::from_secs(30),
        || (totals(&api, "acme").get("delivered/acme-hook") == Some(&acme_delivered)).then_some(()),
        || format!("acme's usage {:?} against {acme_delivered} delivered", totals(&api, "acme")),
    );
    // A report sent twice counts once.
    let c1_token = std::fs::read_to_string(dir_a.path().join("sluice.toml")).unwrap();
    let c1_token = c1_token.lines().find_map(|l| l.strip_prefix("token = \"")).unwrap().trim_end_matches('"').to_owned();
    let report = json!({"report_id": "replayed-1", "rows": [{"workspace": "acme", "hour": 0, "metric": "accepted", "value": 5}]});
    for expected in [true, false] {
        let resp = http.post(format!("{}/api/cells/c1/usage", api.base)).bearer_auth(&c1_token).json(&report).send().unwrap();
        assert_eq!(resp.json::<Value>().unwrap()["counted"], expected);
    }
    let at_zero = api.ok("GET", "/api/usage?workspace=acme&from=0&to=3600", None);
    assert_eq!(at_zero["totals"]["accepted"], 5, "{at_zero}");
    // Another cell's token is not c1's.
    let resp = http.post(format!("{}/api/cells/c2/usage", api.base)).bearer_auth(&c1_token).json(&report).send().unwrap();
    assert_eq!(resp.status(), 401);

    // 5. Capacity: three workspaces fill an SMB cell (threshold 3); with both full, a third cell is provisioned.
    for w in ["w3", "w4", "w5", "w6"] {
        api.ok("PUT", &format!("/api/workspaces/{w}"), Some(json!({"tier": "smb"})));
        api.ok("POST", &format!("/api/workspaces/{w}/place"), None);
    }
    let decided = |kind: &str| -> Vec<Value> {
        api.ok("GET", "/api/decisions", None)["decisions"].as_array().unwrap().iter().filter(|d| d["kind"] == kind).cloned().collect()
    };
    wait_for(Duration::from_secs(30), || (decided("full").len() == 2).then_some(()), || format!("both cells full: {:?}", decided("full")));
    assert!(decided("full")[0]["reason"].as_str().unwrap().contains("workspaces 3 (threshold 3)"), "{:?}", decided("full"));
    wait_for(
        Duration::from_secs(90),
        || (!decided("joined").is_empty()).then_some(()),
        || format!("a cell joined: {:?}", api.ok("GET", "/api/decisions", None)),
    );
    let new_cell = decided("joined")[0]["cell"].as_str().unwrap().to_owned();
    assert_eq!(new_cell, "smb-1");
    api.ok("PUT", "/api/workspaces/w7", Some(json!({"tier": "smb"})));
    let placed = api.ok("POST", "/api/workspaces/w7/place", None);
    assert_eq!(placed["placement"]["cell"], "smb-1", "the next new workspace goes to the new cell: {placed}");
    // And it serves: a source of w7 through the router lands there.
    let (_, made) = api.call("POST", "/api/workspaces/w7/sources", Some(json!({"id": "w7-web"})));
    let (status, at) = send(&http, &router_url, made["write_key"].as_str().unwrap(), &ids("w7", 3), &[]);
    assert_eq!((status, at.as_str()), (200, "smb-1"));

    // 6. Bad input: a placement no cell satisfies says why; an unknown key and a disabled workspace get ingest's answers.
    api.ok("PUT", "/api/workspaces/mars", Some(json!({"tier": "smb", "constraints": {"region": "mars"}})));
    let (status, why) = api.call("POST", "/api/workspaces/mars/place", None);
    assert_eq!(status, 409, "{why}");
    assert!(why["message"].as_str().unwrap().contains("region"), "{why}");
    assert_eq!(send(&http, &router_url, "wk_nobody_knows", &ids("x", 1), &[]).0, 401);
    api.ok("PUT", "/api/workspaces/globex", Some(json!({"tier": "smb", "disabled": true})));
    wait_for(
        Duration::from_secs(10),
        || (send(&http, &router_url, &globex_key, &ids("off", 1), &[]).0 == 403).then_some(()),
        || "globex refused once disabled".into(),
    );
    let (status, v) = api.call("PUT", "/api/workspaces/acme/destinations/x", Some(json!({"url": "ftp://nope"})));
    assert_eq!(status, 400, "{v}");

    // 7. A cell that stops: only its workspaces get 503; the others see no error.
    api.ok("PUT", "/api/workspaces/globex", Some(json!({"tier": "smb"})));
    c2.take().unwrap().stop();
    wait_for(
        Duration::from_secs(10),
        || (send(&http, &router_url, &globex_key, &ids("down", 1), &[]).0 == 503).then_some(()),
        || "globex 503 with its cell stopped".into(),
    );
    assert_eq!(send(&http, &router_url, &acme_key, &ids("still", 5), &[]).0, 200);

    // The provisioned cell runs on in its own process group: stop it.
    if let Ok(pid) = std::fs::read_to_string(provisioned.join("smb-1").join("sluice.pid")) {
        let _ = std::process::Command::new("kill").args(["-TERM", pid.trim()]).status();
    }
    drop(c1);
}
